"""irno.GraphedTrainStep: the eager fallback is a plain training step; argument checks; on a GPU
(marked ``gpu``) replayed steps equal eager steps from the same weights, a new batch shape
captures anew, and a non-capturable Adam is refused with a clear message."""

from __future__ import annotations

import copy

import pytest
import torch
from irno import FNO, IRNO, GraphedTrainStep, IRNOLoss, UNetRefiner

gpu = pytest.mark.gpu


def _model(device="cpu"):
    torch.manual_seed(0)
    base = FNO(n_modes=(4, 4), in_channels=3, out_channels=1, hidden_channels=8, n_layers=2)
    return IRNO(base, refiner=UNetRefiner(4, 1, width=4, depth=2), alpha=0.3, K=2).to(device)


def _batch(B=2, H=16, W=24, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, H, W, generator=g).to(device), torch.randn(B, 1, H, W, generator=g).to(device)


def _setup(model, capturable=False):
    loss = IRNOLoss(K=2, beta_fp=0.1)
    params = list(model.refiner.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, capturable=capturable)
    return (lambda x, y: loss(model, x, y)[0]), params, opt


def test_cpu_fallback_is_the_plain_training_step():
    a, b = _model(), _model()
    fn_a, params_a, opt_a = _setup(a)
    fn_b, params_b, opt_b = _setup(b)
    step = GraphedTrainStep(fn_a, params_a, opt_a, clip=0.5)
    for seed in (1, 2, 3):
        x, y = _batch(seed=seed)
        got = step(x, y)
        opt_b.zero_grad(set_to_none=True)
        want = fn_b(x, y)
        want.backward()
        torch.nn.utils.clip_grad_norm_(params_b, 0.5)
        opt_b.step()
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert len(step) == 0  # nothing captured on CPU


def test_cpu_fallback_takes_a_capturable_optimizer():
    """Code written for the GPU (Adam with capturable=True) runs on CPU parameters: the flag, which
    PyTorch refuses there, is turned off, and the step is the plain one."""
    a, b = _model(), _model()
    fn_a, params_a, opt_a = _setup(a, capturable=True)
    fn_b, params_b, opt_b = _setup(b)
    step = GraphedTrainStep(fn_a, params_a, opt_a)
    for seed in (1, 2):
        x, y = _batch(seed=seed)
        got = step(x, y)
        opt_b.zero_grad(set_to_none=True)
        want = fn_b(x, y)
        want.backward()
        opt_b.step()
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    assert all(not g["capturable"] for g in opt_a.param_groups)
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bad_arguments_name_the_argument():
    fn, params, opt = _setup(_model())
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        GraphedTrainStep(3, params, opt)
    with pytest.raises(ValueError, match="params: expected a non-empty iterable"):
        GraphedTrainStep(fn, [], opt)
    with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer"):
        GraphedTrainStep(fn, params, "adam")
    with pytest.raises(ValueError, match="clip: expected a number > 0"):
        GraphedTrainStep(fn, params, opt, clip=0)
    with pytest.raises(ValueError, match="warmup: expected an int >= 1"):
        GraphedTrainStep(fn, params, opt, warmup=0)
    with pytest.raises(ValueError, match="loss_fn: expected a scalar loss tensor"):
        GraphedTrainStep(lambda x, y: x, params, opt)(*_batch())


class _SimGraph:
    """Stands in for a CUDA graph of a training step: replay runs the step again and writes its loss
    into the tensor the capture returned."""

    def __init__(self, step, static, loss):
        self.step, self.static, self.loss = step, static, loss

    def replay(self):
        self.loss.copy_(self.step._step(self.static))


def test_simulated_graphs_are_kept_lru_and_a_fresh_pool_follows_the_last(monkeypatch):
    """At most max_graphs graphs, the least recently used dropped first; once none is left (an
    eviction with max_graphs = 1, a failed capture) the next capture takes a new memory pool
    (simulated graphs on CPU)."""
    pools = []

    def record(self, static):
        pools.append(self._pool)
        if self._pool is None:  # what a capture does: a new pool, which later captures share
            self._pool = object()
        loss = self._step(static)
        return _SimGraph(self, static, loss), loss

    monkeypatch.setattr(GraphedTrainStep, "_use_graphs", lambda self, on_cuda: True)
    monkeypatch.setattr(GraphedTrainStep, "_record", record)
    fn, params, _ = _setup(_model())
    opt = torch.optim.SGD(params, lr=1e-3)  # needs no capturable flag (Adam's is refused on CPU tensors)
    step = GraphedTrainStep(fn, params, opt, max_graphs=2, warmup=1)
    a, b, c = _batch(H=16, W=16), _batch(H=16, W=24), _batch(H=32, W=16)
    for batch, captures, size in ((a, 1, 1), (a, 1, 1), (b, 2, 2), (a, 2, 2), (c, 3, 2), (a, 3, 2), (b, 4, 2)):
        step(*batch)
        assert (step.n_captures, len(step)) == (captures, size)
    assert pools[0] is None and all(p is pools[1] for p in pools[1:])  # one pool while a graph lives
    single = GraphedTrainStep(fn, params, opt, max_graphs=1, warmup=1)
    pools.clear()
    single(*a)
    single(*b)  # evicts a's graph: no graph holds the pool, so b's capture takes a new one
    assert pools == [None, None]
    monkeypatch.setattr(GraphedTrainStep, "_record", lambda self, static: 1 / 0)
    fresh = GraphedTrainStep(fn, params, opt, warmup=1)
    fresh._pool = object()
    with pytest.raises(ZeroDivisionError):
        fresh(*a)
    assert fresh._pool is None and len(fresh) == 0
    with pytest.raises(ValueError, match="max_graphs: expected an int >= 1"):
        GraphedTrainStep(fn, params, opt, max_graphs=0)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replayed_steps_equal_eager_steps_and_new_shapes_recapture():
    """Replays train like eager steps: each replayed loss equals the eager loss of the weights it
    started from, and three graphed steps move the weights as three eager steps do (up to cuDNN's
    nondeterministic backward, which Adam can amplify on near-zero gradients: compared as a relative
    norm of the updates)."""
    graphed_model = _model("cuda")
    eager_model = copy.deepcopy(graphed_model)
    init = [p.detach().clone() for p in graphed_model.refiner.parameters()]
    fn_g, params_g, opt_g = _setup(graphed_model, capturable=True)
    fn_e, params_e, opt_e = _setup(eager_model, capturable=True)
    step = GraphedTrainStep(fn_g, params_g, opt_g, clip=1.0, warmup=2)
    eager = GraphedTrainStep(fn_e, params_e, opt_e, clip=1.0, enabled=False)
    x, y = _batch(device="cuda")
    step(x, y)  # 2 warm-up steps + the captured one, replayed
    for _ in range(3):
        eager(x, y)
    for seed in (2, 3):
        xb, yb = _batch(device="cuda", seed=seed)
        snap = copy.deepcopy(graphed_model)
        got = step(xb, yb)
        with torch.no_grad():
            want = IRNOLoss(K=2, beta_fp=0.1)(snap.train(), xb, yb)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        eager(xb, yb)
    moved_g = torch.cat([(p.detach() - q).flatten() for p, q in zip(params_g, init)])
    moved_e = torch.cat([(p.detach() - q).flatten() for p, q in zip(params_e, init)])
    assert moved_e.norm() > 0
    assert (moved_g - moved_e).norm() / moved_e.norm() < 1e-2
    assert len(step) == 1
    x2, y2 = _batch(B=3, H=32, W=16, device="cuda", seed=4)
    step(x2, y2)
    assert len(step) == 2
    bad = GraphedTrainStep(fn_g, params_g, torch.optim.Adam(params_g, lr=1e-3))
    with pytest.raises(ValueError, match="capturable=True"):
        bad(x, y)
    cpu_state = GraphedTrainStep(fn_g, params_g, torch.optim.Adagrad(params_g, lr=1e-3))
    with pytest.raises(ValueError, match="keeps its state 'step' on the CPU"):
        cpu_state(x, y)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loading_an_optimizer_state_recaptures():
    """optimizer.load_state_dict replaces the state tensors a graph updates by address: the next
    call captures anew, and the replays then train from the loaded state as eager steps do."""
    model = _model("cuda")
    twin = copy.deepcopy(model)
    fn, params, opt = _setup(model, capturable=True)
    fn_t, params_t, opt_t = _setup(twin, capturable=True)
    step = GraphedTrainStep(fn, params, opt, warmup=1)
    x, y = _batch(device="cuda")
    step(x, y)
    saved_w = [p.detach().clone() for p in params]
    saved_opt = copy.deepcopy(opt.state_dict())
    step(x, y)
    assert len(step) == 1
    with torch.no_grad():  # back to the saved point, in both
        for p, q, w in zip(params, params_t, saved_w):
            p.copy_(w)
            q.copy_(w)
    opt.load_state_dict(saved_opt)
    opt_t.load_state_dict(copy.deepcopy(saved_opt))
    step(x, y)  # captures anew: 1 warm-up step + the captured one
    assert len(step) == 1
    eager = GraphedTrainStep(fn_t, params_t, opt_t, enabled=False)
    eager(x, y)
    eager(x, y)
    moved = torch.cat([(p.detach() - w).flatten() for p, w in zip(params, saved_w)])
    moved_t = torch.cat([(p.detach() - w).flatten() for p, w in zip(params_t, saved_w)])
    assert (moved - moved_t).norm() / moved_t.norm() < 1e-2


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_changed_kernel_switch_recaptures(monkeypatch):
    """IRNO_FUSED_BLOCKS (like IRNO_BACKEND and TF32) chooses kernels at capture: changing it
    captures a graph of its own; changing it back finds the first one."""
    fn, params, opt = _setup(_model("cuda"), capturable=True)
    step = GraphedTrainStep(fn, params, opt, warmup=1)
    x, y = _batch(device="cuda")
    step(x, y)
    step(x, y)
    assert len(step) == 1
    monkeypatch.setenv("IRNO_FUSED_BLOCKS", "0")
    step(x, y)
    assert len(step) == 2
    monkeypatch.delenv("IRNO_FUSED_BLOCKS")
    step(x, y)
    assert len(step) == 2
