"""CUDA-graph replay of IRNO inference (DESIGN section 5).

The K-step loop is a fixed sequence of a few hundred small launches (a U-Net per step); at small
batches launching them costs more than running them. :class:`GraphedIRNO` captures

    h_0 = T_base(x);  h_{k+1} = h_k + alpha * Phi(x~, h_k),  k = 0 .. steps-1

as ONE CUDA graph per key (x's shape, dtype and device, steps, autocast dtype, the model's alpha,
mode and settings, and the switches that choose kernels at capture: IRNO_BACKEND,
IRNO_FUSED_BLOCKS, TF32) and replays it:

    static_x.copy_(x);  graph.replay();  return static_out.clone()

- Warm-up runs on a side stream before each capture, so Triton compiles its kernels, cuFFT makes its
  plans and cuDNN picks its algorithms outside the capture.
- Every graph of one GraphedIRNO allocates from one shared memory pool (per device); at most
  ``max_graphs`` graphs' inputs are cached, the least recently used is dropped first. When no
  captured graph is left (``clear()``, a failed capture, an eviction with ``max_graphs=1``) the next
  capture gets a fresh pool: PyTorch's allocator refuses to capture into a pool whose graphs are all
  gone while some block of it is still held (a cuBLAS workspace made during a capture is one such
  block; it failed an internal assert on an H200 when the dft route's matmuls were recaptured).
- Autocast: the autocast state (``torch.autocast("cuda", dtype=...)`` around the call) and the
  model's ``refiner_dtype`` are part of the key. Warm-up and capture run with autocast's weight-cast
  cache off, so the casts of the weights are recorded inside the graph (a cast cached outside the
  capture would be freed when the autocast region ends, while the graph still reads it).
- Early stop (``tol=``): a prologue graph (base + conditioning) and a graph of ``chunk`` steps are
  captured; the chunk graph is replayed until the relative fixed-point residual of its last step,

      r = max over samples b of ||h_{k+1} - h_k||_2 / ||h_k||_2 = ||alpha * Phi(x, h_k)|| / ||h_k||,

  is below ``tol`` or ``steps`` is reached (one host sync per chunk, to read r). A remainder of
  ``steps % chunk`` steps gets its own graph. In bf16 (autocast) r is quantised at about 1e-2 of
  the step: a tol below that only stops at ``steps``.

Inference only: the call runs under ``torch.no_grad()`` whatever the grad mode, and the output never
requires grad (a refiner whose parameters require grad is fine; an ``x`` that requires grad under
grad mode is an error, since gradients cannot flow through a replay). To train with CUDA graphs, capture the
whole training step instead: :class:`irno.GraphedTrainStep`.

Fallback: on CPU tensors, or when CUDA is not available, the same code runs eagerly (no capture),
so the results are those of ``model(x, steps)`` under no_grad, bit for bit, and the early-stop logic
is the same.

The graphs read the model's parameters where they were at capture: in-place changes
(``load_state_dict``, an optimiser step) are seen by the next replay; moving the model
(``.to(...)``, which gives the parameters new storage) is detected and recaptures. Replacing a
submodule (``model.refiner = ...``) is not: build a new GraphedIRNO.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["GraphedIRNO"]

_TINY = 1e-30  # floor of ||h_k|| in the residual (h_k = 0 would divide by zero)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            ok = float(value) == int(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _check_tol(tol) -> float | None:
    if tol is None:
        return None
    try:
        v = float(tol)
    except (TypeError, ValueError):
        raise TypeError(f"tol: expected a positive number or None, got {type(tol).__name__}") from None
    if not (v > 0) or math.isinf(v):
        raise ValueError(f"tol: expected a finite number > 0, got {tol}")
    return v


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for ``device``'s type, or None when autocast is off there."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


@contextlib.contextmanager
def no_autocast_cache():
    """Autocast's weight-cast cache off: a cast cached outside a capture (in the warm-up, or in an
    eager call under the same autocast region) and read inside it would be freed when the autocast
    region ends while the graph still reads it; with the cache off the casts are recorded in the graph."""
    prev = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(prev)


@dataclass
class _Entry:
    """The captured graphs of one key and the static tensors they read and write."""

    static_x: torch.Tensor
    graphs: dict = field(default_factory=dict)  # name -> graph ("all"; or "prologue", "chunk", "rest")
    out: torch.Tensor | None = None  # fixed steps: h_steps
    xr: torch.Tensor | None = None  # early stop: x on h's grid
    h: torch.Tensor | None = None  # early stop: the iterate, updated in place by the chunk graphs
    res: dict = field(default_factory=dict)  # chunk graph name -> its residual (0-D float32)


class _CudaGraph:
    """One captured CUDA graph (a thin holder so that tests can substitute a simulation)."""

    def __init__(self, graph):
        self.graph = graph

    def replay(self) -> None:
        self.graph.replay()


def _tf32_state() -> tuple:
    """The TF32 switches of float32 matmuls and cuDNN convolutions, read by whichever API the torch
    has (the per-backend ``fp32_precision`` strings where present: reading the legacy ``allow_tf32``
    raises once they were set), for graph keys: kernels chosen at capture follow them."""
    state = []
    for backend in (torch.backends.cuda.matmul, torch.backends.cudnn, getattr(torch.backends.cudnn, "conv", None)):
        if backend is None:
            continue
        prec = getattr(backend, "fp32_precision", None)
        if prec is None:
            try:
                prec = bool(getattr(backend, "allow_tf32", False))
            except RuntimeError:
                prec = None
        state.append(prec)
    state.append(getattr(torch.backends, "fp32_precision", None))
    return tuple(state)


def capture_switches() -> tuple:
    """The process-wide switches that choose kernels when a graph is captured (IRNO_BACKEND,
    IRNO_FUSED_BLOCKS, the TF32 settings): part of every graph key of irno.GraphedIRNO and
    irno.GraphedTrainStep, so that changing one captures anew instead of replaying the old choice."""
    return os.environ.get("IRNO_BACKEND"), os.environ.get("IRNO_FUSED_BLOCKS"), _tf32_state()


class GraphedIRNO:
    """CUDA-graph replay of an :class:`irno.IRNO`'s inference (see the module docstring).

    Args:
        model: the IRNO to replay (held by reference, not copied).
        steps: refinement steps per call (default ``model.K``); with ``tol``, the most steps.
        tol: early stop: stop once the relative fixed-point residual of the last step of a chunk is
            below tol (None: always run ``steps`` steps).
        chunk: steps per replay between two residual checks (1; only with ``tol``).
        max_graphs: cached keys (8); the least recently used is dropped (LRU).
        warmup: eager runs on a side stream before each capture (3; at least 1).

    Call: ``g(x, steps=None, *, tol=None, chunk=None, return_steps=False)``; x (B, Cx, h, w) ->
    h_steps (B, Cy, H, W), a fresh tensor (not the static buffer); with ``return_steps`` the tuple
    (h, steps used). ``steps``/``tol``/``chunk`` left at None take the constructor's values.
    ``last_steps`` holds the steps used by the last call and ``last_residual`` (early stop) the
    residual read last; ``n_captures`` counts the CUDA graphs captured so far; ``clear()`` drops
    every graph; ``capture(x, ...)`` captures x's key without running it.
    """

    def __init__(
        self,
        model,
        steps: int | None = None,
        *,
        tol: float | None = None,
        chunk: int | None = None,
        max_graphs: int = 8,
        warmup: int = 3,
    ):
        from irno.irno import IRNO

        if not isinstance(model, IRNO):
            raise TypeError(f"model: expected an irno.IRNO, got {type(model).__name__}")
        self.model = model
        self.steps = None if steps is None else _check_int("steps", steps, 0)
        self.tol = _check_tol(tol)
        self.chunk = None if chunk is None else _check_int("chunk", chunk, 1)
        if self.chunk is not None and self.tol is None:
            raise ValueError("chunk: only used with tol (early stop); pass tol=... as well, or leave chunk=None")
        self.max_graphs = _check_int("max_graphs", max_graphs, 1)
        self.warmup = _check_int("warmup", warmup, 1)
        self.last_steps: int | None = None
        self.last_residual: float | None = None
        self.n_captures = 0
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._pools: dict[torch.device, object] = {}
        self._tensors = [*model.parameters(), *model.buffers()]
        self._ptrs: tuple[int, ...] | None = None

    # -----------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"GraphedIRNO(steps={self.steps}, tol={self.tol}, chunk={self.chunk}, "
            f"graphs={len(self._cache)}/{self.max_graphs}, captures={self.n_captures})"
        )

    def __len__(self) -> int:
        """Number of cached keys."""
        return len(self._cache)

    def clear(self) -> None:
        """Drop every captured graph; the next capture starts a fresh memory pool."""
        self._cache.clear()
        self._pools.clear()

    # -----------------------------------------------------------------------------------------
    def _resolve(self, x, steps, tol, chunk) -> tuple[int, float | None, int]:
        model = self.model
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D tensor (B, C, H, W), got shape {tuple(x.shape)}")
        cx = model.in_channels
        if cx is not None and x.shape[1] != cx:
            raise ValueError(f"x: expected {cx} channels (the model's in_channels), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"x: expected a non-empty tensor, got shape {tuple(x.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "x: requires grad, but GraphedIRNO is inference only (it runs under no_grad and "
                "its output carries no graph); call it on x.detach(), or use the IRNO to train"
            )
        if steps is None:
            steps = self.steps if self.steps is not None else model.K
        steps = _check_int("steps", steps, 0)
        tol = self.tol if tol is None else _check_tol(tol)
        if chunk is not None:
            chunk = _check_int("chunk", chunk, 1)
            if tol is None:
                raise ValueError("chunk: only used with tol (early stop); pass tol=... as well, or leave chunk=None")
        chunk = chunk if chunk is not None else (self.chunk or 1)
        return steps, tol, chunk

    def __call__(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        *,
        tol: float | None = None,
        chunk: int | None = None,
        return_steps: bool = False,
    ):
        """x (B, Cx, h, w) -> h_steps (B, Cy, H, W), a fresh tensor; (h, steps used) with ``return_steps``.

        ``steps`` (default: the constructor's, else ``model.K``) is the number of steps, or with
        ``tol`` the most; ``tol``/``chunk`` default to the constructor's. Runs under no_grad.
        """
        steps, tol, chunk = self._resolve(x, steps, tol, chunk)
        self.last_residual = None
        with torch.no_grad():
            if self._use_graphs(x):
                out, used = self._replay(x, steps, tol, chunk)
            else:
                out, used = self._eager(x, steps, tol, chunk)
        self.last_steps = used
        return (out, used) if return_steps else out

    def capture(
        self, x: torch.Tensor, steps: int | None = None, *, tol: float | None = None, chunk: int | None = None
    ) -> GraphedIRNO:
        """Capture the graphs of x's key now (no replay; a no-op on the eager fallback). Returns self."""
        steps, tol, chunk = self._resolve(x, steps, tol, chunk)
        if self._use_graphs(x):
            with torch.no_grad():
                self._entry(x, steps, tol, chunk)
        return self

    # -----------------------------------------------------------------------------------------
    # the computation, shared by the eager fallback and the captures
    # -----------------------------------------------------------------------------------------
    def _prologue(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x on h's grid, a private copy of h_0 that the steps update in place)."""
        model = self.model
        h0 = model.base_forward(x)
        return model.condition(x, h0), h0.clone()

    def _steps(self, xr: torch.Tensor, h: torch.Tensor, n: int) -> torch.Tensor:
        """n >= 1 in-place steps on h; returns the residual of the last one (0-D float32)."""
        step = self.model.step
        for _ in range(n - 1):
            step(xr, h, inplace=True)
        prev = h.clone() if h.dtype == torch.float32 else h.float()  # h_k, kept in float32
        step(xr, h, inplace=True)
        num = (h.float() - prev).flatten(1).norm(dim=1)
        den = prev.flatten(1).norm(dim=1).clamp_min(_TINY)
        return (num / den).max()

    def _eager(self, x, steps, tol, chunk) -> tuple[torch.Tensor, int]:
        if tol is None:
            return self.model(x, steps=steps), steps
        xr, h = self._prologue(x)
        done = 0
        while done < steps:
            n = min(chunk, steps - done)
            res = self._steps(xr, h, n)
            done += n
            self.last_residual = float(res)  # one host sync per chunk
            if self.last_residual < tol:
                break
        return h, done

    # -----------------------------------------------------------------------------------------
    # graphs
    # -----------------------------------------------------------------------------------------
    @staticmethod
    def _use_graphs(x: torch.Tensor) -> bool:
        return x.is_cuda and torch.cuda.is_available()

    def _replay(self, x, steps, tol, chunk) -> tuple[torch.Tensor, int]:
        entry = self._entry(x, steps, tol, chunk)
        entry.static_x.copy_(x)
        if tol is None:
            entry.graphs["all"].replay()
            return entry.out.clone(), steps
        entry.graphs["prologue"].replay()
        done = 0
        while done < steps:
            name = "chunk" if steps - done >= chunk else "rest"
            entry.graphs[name].replay()
            done += chunk if name == "chunk" else steps - done
            self.last_residual = float(entry.res[name])  # one host sync per chunk
            if self.last_residual < tol:
                break
        return entry.h.clone(), done

    def _check_params(self) -> None:
        """Drop every graph when a parameter or buffer got new storage (e.g. ``model.to(...)``)."""
        ptrs = tuple(t.data_ptr() for t in self._tensors)
        if ptrs != self._ptrs:
            if self._ptrs is not None:
                self.clear()
            self._ptrs = ptrs

    def _key(self, x, steps, tol, chunk) -> tuple:
        """What a captured graph depends on beyond the parameters' values: x's shape, dtype and
        device, the steps, autocast, the early-stop mode, the model's mode and settings (alpha is a
        Python number the graph's kernels received at capture), and the process-wide switches that
        choose kernels at capture (IRNO_BACKEND, IRNO_FUSED_BLOCKS, the TF32 settings)."""
        mode = ("fixed",) if tol is None else ("early-stop", chunk)
        model = self.model
        return (
            tuple(x.shape),
            x.dtype,
            x.device,
            steps,
            _autocast_dtype(x.device),
            mode,
            model.training,
            getattr(model, "alpha", None),
            getattr(model, "refiner_dtype", None),
            getattr(model, "channels_last", False),
            capture_switches(),
        )

    def _entry(self, x, steps, tol, chunk) -> _Entry:
        self._check_params()
        key = self._key(x, steps, tol, chunk)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            return entry
        while len(self._cache) >= self.max_graphs:
            self._cache.popitem(last=False)
        if not self._cache:  # no live graph holds the pool: capture into a new one
            self._pools.clear()
        try:
            entry = self._build(x, steps, tol, chunk)
        except BaseException:
            if not self._cache:  # the failed capture may have been the pool's only user
                self._pools.clear()
            raise
        self._cache[key] = entry
        return entry

    def _build(self, x, steps, tol, chunk) -> _Entry:
        entry = _Entry(static_x=torch.empty_like(x, memory_format=torch.contiguous_format))
        entry.static_x.copy_(x)  # the warm-up runs on real data
        sx = entry.static_x

        if tol is None:
            entry.graphs["all"], entry.out = self._capture(lambda: self.model(sx, steps=steps), x.device)
            return entry
        entry.graphs["prologue"], (entry.xr, entry.h) = self._capture(lambda: self._prologue(sx), x.device)
        entry.graphs["prologue"].replay()  # real values in xr and h for the chunk graphs' warm-up
        sizes = {"chunk": chunk if steps >= chunk else 0, "rest": steps % chunk}
        for name, n in sizes.items():
            if n:
                entry.graphs[name], entry.res[name] = self._capture(
                    lambda n=n: self._steps(entry.xr, entry.h, n), x.device
                )
        return entry

    def _capture(self, fn: Callable, device: torch.device):
        """Warm ``fn`` up on a side stream, then capture it into the shared pool: (graph, fn's outputs)."""
        with torch.cuda.device(device):
            pool = self._pools.get(device)
            if pool is None:
                pool = self._pools[device] = torch.cuda.graph_pool_handle()
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with no_autocast_cache(), torch.cuda.stream(side):
                for _ in range(self.warmup):
                    fn()
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with no_autocast_cache(), torch.cuda.graph(graph, pool=pool):
                out = fn()
        self.n_captures += 1
        return _CudaGraph(graph), out
