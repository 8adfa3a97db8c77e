"""A whole training step replayed as one CUDA graph (PyTorch's "whole-network capture").

Training IRNO's refiner unrolls K U-Net calls forward and backward: a few thousand small launches
per step, which at moderate batch sizes cost more host time than the GPU spends running them.
:class:`GraphedTrainStep` captures

    loss = loss_fn(*batch);  loss.backward();  clip_grad_norm_(params, clip);  optimizer.step()

once per batch shape and dtype and replays it: the batch is copied into static tensors, the graph
replays, and the loss comes back as a 0-D tensor on the device (no host sync; read it when you need
it). ``benchmarks/bench_irno.py`` times it against plain eager PyTorch ("graphed" training rows).

Rules (those of CUDA-graph capture):
- The first call for a new batch shape runs ``warmup`` eager training steps on that batch on a side
  stream (so Triton compiles, cuDNN/cuFFT/cuBLAS pick their algorithms and the optimizer creates its
  state outside the capture), then captures one step and replays it: those are real training steps,
  as in PyTorch's recipe.
- The optimizer must update on the device without host syncs: Adam/AdamW with ``capturable=True``
  (checked); SGD needs nothing; an optimizer that keeps state on the CPU for CUDA parameters (e.g.
  Adagrad's step counter) is refused at capture.
- A graph per batch shape and per setting of the switches that choose kernels at capture
  (IRNO_BACKEND, IRNO_FUSED_BLOCKS, TF32: ``irno.graphed.capture_switches``); at most ``max_graphs``
  of them, the least recently used dropped first (a data set of many grid sizes would otherwise
  keep a graph, and its memory, per size). Once none is left the next capture takes a fresh pool.
- A changed optimizer state (``optimizer.load_state_dict``: new state tensors) or parameters that
  got new storage (``model.to(...)``) drop the graphs; the next call captures anew (with its warm-up
  steps).
- ``loss_fn`` may not synchronise with the host (``.item()``, data-dependent Python control flow) nor
  skip non-finite losses; the Python code runs once, at capture: Python numbers it reads (the
  model's alpha and K, loss weights) are fixed in the graph, so call ``clear()`` after changing one.
  Learning-rate changes through an LR scheduler are not seen by the graph unless the optimizer keeps
  ``lr`` as a tensor.
- Parameters are updated in place; their gradients live in the graphs' memory pool (one pool for all
  shapes of this object). Autocast inside ``loss_fn`` works (the weight-cast cache is off during
  capture, see irno.graphed).

On CPU tensors (or with ``enabled=False``) the same step runs eagerly, so code written for the GPU
runs anywhere (an optimizer over CPU parameters built with ``capturable=True`` has it turned off:
PyTorch's capturable update takes device tensors only).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

from irno.graphed import capture_switches, no_autocast_cache

__all__ = ["GraphedTrainStep"]


class GraphedTrainStep:
    """One optimisation step, captured as a CUDA graph per batch shape (module docstring).

    Args:
        loss_fn: ``loss_fn(*batch) -> loss`` (a 0-D tensor), e.g.
            ``lambda x, y: irno.IRNOLoss(K=6)(model, x, y)[0]`` (no epoch given: the fixed-point
            term at its full weight; a Python epoch for the paper's warm-up ramp is read once, at
            capture, so the ramp needs ``clear()`` whenever it should move).
        params: the parameters the optimizer updates (their gradients are clipped).
        optimizer: a torch optimizer over ``params``; Adam/AdamW need ``capturable=True``.
        clip: max total gradient norm (``torch.nn.utils.clip_grad_norm_``), or None.
        warmup: eager steps before each capture (>= 1; see the module docstring).
        enabled: False runs every step eagerly.
        max_graphs: captured graphs kept (4); the least recently used is dropped (LRU).

    ``step(*batch)`` -> the loss (0-D, detached, on the device). Tensors of the batch are copied into
    the graph's static inputs; other arguments must not change between calls of one shape.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], params: Iterable[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, clip: float | None = None, warmup: int = 3,
                 enabled: bool = True, max_graphs: int = 4):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        self.params = [p for p in params]
        if not self.params or not all(isinstance(p, torch.Tensor) for p in self.params):
            raise ValueError("params: expected a non-empty iterable of tensors (the trained parameters)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if clip is not None and not (float(clip) > 0):
            raise ValueError(f"clip: expected a number > 0 or None, got {clip!r}")
        for name, value in (("warmup", warmup), ("max_graphs", max_graphs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.clip, self.warmup, self.enabled = (None if clip is None else float(clip)), warmup, bool(enabled)
        self.max_graphs = max_graphs
        self.n_captures = 0
        self._graphs: OrderedDict = OrderedDict()  # key -> (graph, static inputs, static loss), LRU order
        self._pool = None
        self._identity = None  # what the graphs were captured against (see _state_identity)

    def __len__(self) -> int:
        """Number of captured graphs (one per batch shape seen on CUDA)."""
        return len(self._graphs)

    def _step(self, batch, zero: bool = True) -> torch.Tensor:
        if zero:
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(*batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn: expected a scalar loss tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        return loss.detach()

    def _check_capturable(self) -> None:
        for group in self.optimizer.param_groups:
            if "capturable" in group and not group["capturable"]:
                name = type(self.optimizer).__name__
                raise ValueError(f"optimizer: {name} must be built with capturable=True to be replayed in a "
                                 f"CUDA graph (e.g. torch.optim.{name}(params, ..., capturable=True))")

    def _check_state_on_device(self) -> None:
        """After the warm-up: every state tensor of a CUDA parameter is on its device (a CPU tensor,
        e.g. Adagrad's step counter, would be read once at capture and never updated)."""
        for p, st in self.optimizer.state.items():
            for name, v in st.items():
                if isinstance(v, torch.Tensor) and p.is_cuda and not v.is_cuda:
                    opt = type(self.optimizer).__name__
                    raise ValueError(f"optimizer: {opt} keeps its state {name!r} on the CPU for CUDA parameters; "
                                     f"its update cannot be replayed in a CUDA graph (use enabled=False, or an "
                                     f"optimizer with capturable=True such as Adam/AdamW)")

    def _state_identity(self) -> tuple:
        """The storage of the parameters and the optimizer's state and groups, which the graphs read by
        address: a change (model.to(...), optimizer.load_state_dict) makes them stale."""
        opt = self.optimizer
        return (tuple(p.data_ptr() for p in self.params), id(opt.state), tuple(id(g) for g in opt.param_groups))

    def _cpu_step(self, batch) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            if group.get("capturable") and not any(p.is_cuda for p in group["params"]):
                group["capturable"] = False  # PyTorch's capturable update refuses CPU tensors
        return self._step(batch)

    def clear(self) -> None:
        """Drop every captured graph (the next call on CUDA captures anew)."""
        self._graphs.clear()
        self._pool = None
        self._identity = None

    def _use_graphs(self, on_cuda: bool) -> bool:
        return self.enabled and on_cuda and torch.cuda.is_available()

    def __call__(self, *batch) -> torch.Tensor:
        tensors = [b for b in batch if isinstance(b, torch.Tensor)]
        on_cuda = any(t.is_cuda for t in tensors) or any(p.is_cuda for p in self.params)
        if not self._use_graphs(on_cuda):
            return self._cpu_step(batch) if not on_cuda else self._step(batch)
        if self._graphs and self._state_identity() != self._identity:
            self.clear()
        key = (*((tuple(b.shape), b.dtype, b.device) if isinstance(b, torch.Tensor) else ("const", repr(b))
                 for b in batch), capture_switches())
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, batch)
        else:
            self._graphs.move_to_end(key)
        graph, static, loss = entry
        for s, b in zip(static, batch):
            if isinstance(s, torch.Tensor):
                s.copy_(b)
        graph.replay()
        return loss.clone()

    def _capture(self, key, batch):
        self._check_capturable()
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        if not self._graphs:  # no live graph holds the pool: capture into a new one
            self._pool = None
        static = [b.detach().clone() if isinstance(b, torch.Tensor) else b for b in batch]
        try:
            graph, loss = self._record(static)
        except BaseException:
            if not self._graphs:  # the failed capture may have been the pool's only user
                self._pool = None
            raise
        self.n_captures += 1
        self._graphs[key] = (graph, static, loss)
        self._identity = self._state_identity()
        return self._graphs[key]

    def _record(self, static):
        """Warm up on ``static`` (eager steps on a side stream), then capture one step: (graph, loss)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), no_autocast_cache():
            for _ in range(self.warmup):
                self._step(static)
        torch.cuda.current_stream().wait_stream(side)
        self._check_state_on_device()
        # gradients set to None: the captured backward allocates them in the graph's pool and writes
        # (not accumulates) them on every replay
        self.optimizer.zero_grad(set_to_none=True)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), no_autocast_cache():
            loss = self._step(static, zero=False)
        return graph, loss
