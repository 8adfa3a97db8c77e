"""irno.GraphedIRNO: the eager fallback, early stop, argument checks, the graph bookkeeping (cache,
LRU, static buffers) with a simulated graph on CPU, and on a GPU: replay vs eager after poisoning
the static output, recapture per shape, bf16 autocast, early stop, torch.compile(reduce-overhead);
plus a CPU smoke run of benchmarks/bench_irno.py."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import irno.graphed as graphed_mod
import pytest
import torch
from irno import FNO, IRNO, GraphedIRNO, UNetRefiner
from irno.graphed import _CudaGraph
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")
gpu = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent


def _model(device="cpu", K=3, cx=2, cy=1, modes=4, width=8, depth=2, uwidth=4):
    torch.manual_seed(0)
    base = FNO(n_modes=(modes, modes), in_channels=cx, out_channels=cy, hidden_channels=width, n_layers=2)
    refiner = UNetRefiner(cx + cy, cy, depth=depth, width=uwidth, out_gain=1.0)  # steps change h visibly
    return IRNO(base, refiner, alpha=0.3, K=K).to(device).eval()


class _Contraction(nn.Module):
    """Phi(x, h) = c - h on the h channels (x ignored): h_k = c + (1 - alpha)^k (h_0 - c), so the
    residual alpha ||c - h_k|| / ||h_k|| decays geometrically. ``fused`` exposes forward_features and
    a 1x1 out_conv, so IRNO takes the fused update path; otherwise the residual_update path."""

    def __init__(self, cx, cy, c=1.0, fused=False):
        super().__init__()
        conv = nn.Conv2d(cx + cy, cy, 1)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, cx:, 0, 0] = -torch.eye(cy)
            conv.bias.fill_(c)
        if fused:
            self.out_conv = conv
        else:
            self.conv = conv

    def forward_features(self, z):
        return z

    def forward(self, z):
        return self.out_conv(z) if hasattr(self, "out_conv") else self.conv(z)


def _contraction_model(device="cpu", fused=False, alpha=0.2, K=4):
    base = nn.Conv2d(1, 1, 1)  # h_0 = 2 x - 0.5: far from the fixed point c = 1
    with torch.no_grad():
        base.weight.fill_(2.0)
        base.bias.fill_(-0.5)
    model = IRNO(base, _Contraction(1, 1, fused=fused), alpha=alpha, K=K, in_channels=1, out_channels=1)
    if not fused:
        model.refiner.forward_features = None  # not fusable: the plain residual update
    return model.to(device).eval()


def _expected_stop(model, x, steps, tol, chunk):
    """Steps an early stop must take, from the eager trajectory: the first chunk end whose last step's
    residual max_b ||h_{k+1} - h_k|| / ||h_k|| is below tol (or steps). Also the residuals."""
    with torch.no_grad():
        traj = model(x, steps=steps, return_trajectory=True)
    res = [
        float(((b.double() - a.double()).flatten(1).norm(dim=1) / a.double().flatten(1).norm(dim=1)).max())
        for a, b in zip(traj[:-1], traj[1:])
    ]
    done = 0
    while done < steps:
        done = min(done + chunk, steps)
        if res[done - 1] < tol:
            break
    return done, res, traj


# ---------------------------------------------------------------------------------------------
# eager fallback (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [None, 0, 1, 5])
def test_eager_fallback_equals_irno_forward(steps):
    model = _model()
    x = torch.randn(2, 2, 20, 28)
    g = GraphedIRNO(model)
    with torch.no_grad():
        want = model(x, steps=steps)
    out, used = g(x, steps, return_steps=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert used == g.last_steps == (model.K if steps is None else steps)
    assert not out.requires_grad  # inference only, whatever the grad mode
    assert len(g) == 0 and g.n_captures == 0  # no graph on CPU


def test_graphed_method_and_constructor_steps():
    model = _model()
    x = torch.randn(1, 2, 16, 16)
    g = model.graphed(x, steps=2)
    assert isinstance(g, GraphedIRNO) and g.model is model
    with torch.no_grad():
        torch.testing.assert_close(g(x), model(x, steps=2), rtol=0, atol=0)
        torch.testing.assert_close(g(x, 4), model(x, steps=4), rtol=0, atol=0)
    assert g.last_steps == 4
    assert model.graphed(None).steps is None


def test_input_that_requires_grad_is_refused():
    g = GraphedIRNO(_model())
    x = torch.randn(1, 2, 16, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="x: requires grad"):
        g(x)
    with torch.no_grad():
        g(x)  # fine without grad mode
    g(x.detach())


# ---------------------------------------------------------------------------------------------
# early stop (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_early_stop_stops_at_the_right_step(fused, chunk):
    model = _contraction_model(fused=fused)
    assert model.uses_fused_update == fused
    x = torch.rand(2, 1, 8, 12) + 0.5
    steps = 30
    _, res, _ = _expected_stop(model, x, steps, 1.0, 1)
    assert all(b < a for a, b in zip(res, res[1:]))  # the residual decays
    k = 9
    tol = (res[k] * res[k - 1]) ** 0.5  # between two residuals: no rounding at the boundary
    want_steps, _, traj = _expected_stop(model, x, steps, tol, chunk)
    assert want_steps == (k + 1 if chunk == 1 else -(-(k + 1) // chunk) * chunk)
    g = GraphedIRNO(model, steps, tol=tol, chunk=chunk)
    out, used = g(x, return_steps=True)
    assert used == g.last_steps == want_steps
    assert g.last_residual == pytest.approx(res[used - 1], rel=1e-4)
    assert (g.last_residual < tol) == (used < steps or res[used - 1] < tol)
    torch.testing.assert_close(out, traj[used], rtol=1e-6, atol=1e-6)


def test_early_stop_limits_and_remainder():
    model = _contraction_model()
    x = torch.rand(2, 1, 8, 8) + 0.5
    g = GraphedIRNO(model)
    assert g(x, 7, tol=1e-12, chunk=3, return_steps=True)[1] == 7  # never converges: 3 + 3 + 1 steps
    assert g(x, 7, tol=10.0, chunk=3, return_steps=True)[1] == 3  # converged after the first chunk
    assert g(x, 2, tol=10.0, chunk=3, return_steps=True)[1] == 2  # only the remainder
    out, used = g(x, 0, tol=1e-3, return_steps=True)
    assert used == 0
    with torch.no_grad():
        torch.testing.assert_close(out, model.base(x), rtol=0, atol=0)


def test_early_stop_with_the_unet_equals_the_trajectory():
    model = _model()
    x = torch.randn(2, 2, 16, 16)
    want, res, traj = _expected_stop(model, x, 6, 1.0, 2)
    tol = (res[3] + res[2]) / 2 if res[3] < res[2] else 1e-12
    want, _, _ = _expected_stop(model, x, 6, tol, 2)
    out, used = GraphedIRNO(model)(x, 6, tol=tol, chunk=2, return_steps=True)
    assert used == want
    torch.testing.assert_close(out, traj[used], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"steps": -1}, ValueError, "steps"),
        ({"steps": 1.5}, TypeError, "steps"),
        ({"chunk": 0, "tol": 1e-3}, ValueError, "chunk"),
        ({"chunk": 2}, ValueError, "chunk"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"tol": -1e-3}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"tol": float("inf")}, ValueError, "tol"),
        ({"tol": "small"}, TypeError, "tol"),
        ({"max_graphs": 0}, ValueError, "max_graphs"),
        ({"warmup": 0}, ValueError, "warmup"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, exc, name):
    model = _model()
    with pytest.raises(exc, match=f"^{name}:"):
        GraphedIRNO(model, **kwargs)
    call_kw = {k: v for k, v in kwargs.items() if k not in ("max_graphs", "warmup")}
    if call_kw:
        with pytest.raises(exc, match=f"^{name}:"):
            GraphedIRNO(model)(torch.randn(1, 2, 8, 8), **call_kw)


def test_bad_inputs_name_x_or_model():
    g = GraphedIRNO(_model())
    with pytest.raises(ValueError, match=r"^x: expected 2 channels"):
        g(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"^x: expected a 4-D tensor"):
        g(torch.randn(2, 8, 8))
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor"):
        g([[1.0]])
    with pytest.raises(ValueError, match=r"^x: expected a floating-point"):
        g(torch.ones(1, 2, 8, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^model: expected an irno.IRNO"):
        GraphedIRNO(nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------------------------------------
# graph bookkeeping on CPU, with a simulated graph
# ---------------------------------------------------------------------------------------------
def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


class _SimGraph:
    """Stands in for a CUDA graph: replay re-runs the captured function and writes its results into
    the tensors the capture returned, as a replay writes into the graph's static memory (in-place
    updates of static tensors happen by themselves)."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        for o, n in zip(_flat(self.out), _flat(self.fn())):
            if o is not n:
                o.copy_(n)


@pytest.fixture
def simulated(monkeypatch):
    def capture(self, fn, device):
        for _ in range(self.warmup):
            fn()
        out = fn()
        self.n_captures += 1
        return _SimGraph(fn, out), out

    monkeypatch.setattr(GraphedIRNO, "_use_graphs", staticmethod(lambda x: True))
    monkeypatch.setattr(GraphedIRNO, "_capture", capture)


def test_simulated_replay_uses_the_static_buffers(simulated):
    model = _model()
    g = GraphedIRNO(model, warmup=1)
    x1, x2 = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    out1 = g(x1)
    assert g.n_captures == 1 and len(g) == 1
    entry = next(iter(g._cache.values()))
    assert out1.data_ptr() != entry.out.data_ptr()  # a clone, not the static buffer
    entry.out.fill_(float("nan"))
    out2 = g(x2)
    with torch.no_grad():
        torch.testing.assert_close(out2, model(x2), rtol=0, atol=0)
        torch.testing.assert_close(out1, model(x1), rtol=0, atol=0)  # the returned clone was not overwritten
    assert g.n_captures == 1


def test_simulated_cache_keys_and_lru(simulated, monkeypatch):
    model = _model()
    g = GraphedIRNO(model, max_graphs=2, warmup=1)
    a, b, c = torch.randn(1, 2, 16, 16), torch.randn(2, 2, 16, 16), torch.randn(1, 2, 16, 24)
    g(a)
    g(a)
    assert g.n_captures == 1
    g(b)  # new shape
    assert g.n_captures == 2
    g(a)  # a is now the most recently used
    g(a, steps=2)  # new steps: evicts the least recently used, b
    assert g.n_captures == 3 and len(g) == 2
    g(a)
    assert g.n_captures == 3
    g(b)  # evicts (a, steps=2)
    assert g.n_captures == 4
    g(a)
    assert g.n_captures == 4
    g(c)  # evicts b
    assert g.n_captures == 5 and len(g) == 2
    assert graphed_mod._autocast_dtype(c.device) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert graphed_mod._autocast_dtype(c.device) == torch.bfloat16
    with monkeypatch.context() as mp:  # the autocast dtype is part of the key
        mp.setattr(graphed_mod, "_autocast_dtype", lambda device: torch.bfloat16)
        g(c)
        g(c)
    assert g.n_captures == 6
    model.train()  # so is the training flag
    g(c)
    assert g.n_captures == 7
    model.eval()
    g.clear()
    assert len(g) == 0


def test_simulated_settings_read_at_capture_are_part_of_the_key(simulated, monkeypatch):
    """A graph bakes in what its kernels were given or chosen by at capture: the model's alpha (a
    Python number), IRNO_BACKEND / IRNO_FUSED_BLOCKS and the TF32 switches. Changing any of them
    captures anew (a replay would silently keep the old step size or kernels); changing it back
    finds the earlier graph."""
    model = _model()
    g = GraphedIRNO(model, warmup=1)
    x = torch.randn(1, 2, 16, 16)
    g(x)
    assert g.n_captures == 1
    model.alpha = 0.5
    with torch.no_grad():
        torch.testing.assert_close(g(x), model(x), rtol=0, atol=0)
    assert g.n_captures == 2
    model.alpha = 0.3
    g(x)
    assert g.n_captures == 2  # the first graph again
    monkeypatch.setenv("IRNO_FUSED_BLOCKS", "0")
    g(x)
    assert g.n_captures == 3
    monkeypatch.setenv("IRNO_BACKEND", "reference")
    g(x)
    assert g.n_captures == 4
    monkeypatch.delenv("IRNO_BACKEND")
    monkeypatch.delenv("IRNO_FUSED_BLOCKS")
    g(x)
    assert g.n_captures == 4
    before = graphed_mod._tf32_state()
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if old == "highest" else "highest")
    try:
        assert graphed_mod._tf32_state() != before
        g(x)
    finally:
        torch.set_float32_matmul_precision(old)
    assert g.n_captures == 5


def test_simulated_pool_is_renewed_when_no_graph_is_left(monkeypatch):
    """Graphs share one pool while any of them lives; once none does (clear, an eviction with
    max_graphs=1, a failed capture) the next capture gets a new pool (PyTorch asserts otherwise)."""
    used = []

    def capture(self, fn, device):
        used.append(self._pools.setdefault(device, object()))
        out = fn()
        if getattr(self, "fail_next", False):
            self.fail_next = False
            raise RuntimeError("capture failed")
        self.n_captures += 1
        return _SimGraph(fn, out), out

    monkeypatch.setattr(GraphedIRNO, "_use_graphs", staticmethod(lambda x: True))
    monkeypatch.setattr(GraphedIRNO, "_capture", capture)
    g = GraphedIRNO(_model(), max_graphs=2, warmup=1)
    a, b = torch.randn(1, 2, 16, 16), torch.randn(2, 2, 16, 16)
    g(a)
    g(b)
    assert used[0] is used[1]  # shared while graphs live
    g.clear()
    g(a)
    assert used[2] is not used[1]
    g.fail_next = True
    g.clear()
    with pytest.raises(RuntimeError, match="capture failed"):
        g(a)
    g(a)
    assert used[4] is not used[3] and len(g) == 1
    one = GraphedIRNO(_model(), max_graphs=1, warmup=1)
    n = len(used)
    one(a)
    one(b)  # evicts a's graph first: nothing holds the old pool
    assert used[n + 1] is not used[n]


def test_simulated_new_parameter_storage_recaptures(simulated):
    model = _model()
    g = GraphedIRNO(model, warmup=1)
    x = torch.randn(1, 2, 16, 16)
    g(x)
    with torch.no_grad():
        model.refiner.out_conv.weight.mul_(2)  # in place: the graph sees it, no recapture
    with torch.no_grad():
        torch.testing.assert_close(g(x), model(x), rtol=0, atol=0)
    assert g.n_captures == 1
    p = model.refiner.out_conv.weight
    p.data = p.data.clone()  # new storage, as model.to(...) gives: recapture
    g(x)
    assert g.n_captures == 2 and len(g) == 1


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_simulated_early_stop_equals_eager(simulated, chunk):
    model = _contraction_model(fused=True)
    x = torch.rand(2, 1, 8, 12) + 0.5
    _, res, traj = _expected_stop(model, x, 20, 1.0, 1)
    tol = (res[6] * res[5]) ** 0.5
    want, _, _ = _expected_stop(model, x, 20, tol, chunk)
    g = GraphedIRNO(model, 20, tol=tol, chunk=chunk, warmup=2)
    for _ in range(2):  # the second call replays (the prologue resets h)
        out, used = g(x, return_steps=True)
        assert used == want
        torch.testing.assert_close(out, traj[used], rtol=1e-6, atol=1e-6)
    assert g.n_captures == (2 if 20 % chunk == 0 else 3)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@gpu
def test_replay_equals_eager_after_poisoning_the_output():
    model = _model("cuda", K=4, modes=6, width=16, depth=3, uwidth=8)
    g = GraphedIRNO(model)
    x1, x2 = torch.randn(2, 2, 40, 56, device="cuda"), torch.randn(2, 2, 40, 56, device="cuda")
    g(x1)
    entry = next(iter(g._cache.values()))
    assert isinstance(entry.graphs["all"], _CudaGraph)
    entry.out.fill_(float("nan"))
    out = g(x2)
    torch.cuda.synchronize()
    with torch.no_grad():
        want = model(x2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert g.n_captures == 1


@gpu
def test_recapture_after_clear_with_the_dft_route(monkeypatch):
    """The dft route's matmuls make cuBLAS workspaces during a capture; recapturing after clear()
    into the old pool failed an allocator assert (H200): clear() now starts a fresh pool."""
    from irno_kernels import spectral_dft

    monkeypatch.setattr(spectral_dft, "prefer_dft", lambda x, w: x.is_cuda)
    model = _model("cuda", K=3)
    g = GraphedIRNO(model)
    x = torch.randn(2, 2, 32, 32, device="cuda")
    first = g(x)
    for _ in range(2):
        g.clear()
        again = g(x)
        torch.testing.assert_close(again, first, rtol=1e-6, atol=1e-6)
    assert g.n_captures == 3


@gpu
def test_tfno_base_replays_after_train_eval_and_a_new_state_dict():
    """A frozen TFNO base caches its dense weights in eval mode; model.train() frees that cache. The
    capture rebuilds them inside the graph, so a replay after train()/eval() reads live memory, and
    a load_state_dict of new Tucker factors reaches the next replay."""
    from irno import TFNO

    torch.manual_seed(0)
    base = TFNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
    model = IRNO(base, UNetRefiner(3, 1, depth=2, width=4, out_gain=1.0), alpha=0.3, K=3).cuda().eval()
    g = GraphedIRNO(model)
    x = torch.randn(2, 2, 32, 32, device="cuda")
    g(x)
    model.train()
    model.eval()
    torch.empty(1 << 20, device="cuda").fill_(float("nan"))  # reuse whatever was freed
    with torch.no_grad():
        torch.testing.assert_close(g(x), model(x), rtol=1e-5, atol=1e-5)
        state = {k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()}
        base.load_state_dict(state)
        torch.testing.assert_close(g(x), model(x), rtol=1e-5, atol=1e-5)
    assert g.n_captures == 1


@gpu
def test_dft_matrices_read_by_a_graph_outlive_the_cache_bound(monkeypatch):
    """The dft route's matrices are cached with a bound; those a captured graph reads stay cached
    however many other shapes pass through afterwards."""
    from irno_kernels import spectral_dft

    monkeypatch.setattr(spectral_dft, "prefer_dft", lambda x, w: x.is_cuda)
    monkeypatch.setattr(spectral_dft, "_CACHE_MAX", 4)  # few shapes overflow it (each new shape
    # compiles the U-Net's Triton kernels again: seconds)
    model = _model("cuda", K=2)
    g = GraphedIRNO(model)
    x = torch.randn(2, 2, 32, 32, device="cuda")
    first = g(x)
    with torch.no_grad():
        for n in range(8):  # more keys than the cache holds
            model(torch.randn(1, 2, 24 + 4 * n, 24, device="cuda"))
    assert spectral_dft._PINNED and all(k in spectral_dft._CACHE for k in spectral_dft._PINNED)
    torch.empty(1 << 20, device="cuda").fill_(float("nan"))
    torch.testing.assert_close(g(x), first, rtol=1e-6, atol=1e-6)


@gpu
def test_new_shape_recaptures():
    model = _model("cuda")
    g = GraphedIRNO(model, max_graphs=2)
    shapes = [(1, 2, 32, 32), (3, 2, 32, 32), (1, 2, 24, 40)]
    xs = [torch.randn(*s, device="cuda") for s in shapes]
    for i, x in enumerate(xs[:2]):
        g(x)
        g(x)
        assert g.n_captures == i + 1
    g(xs[2])  # evicts the first
    assert g.n_captures == 3 and len(g) == 2
    g(xs[0])
    assert g.n_captures == 4
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(g(x), model(x), rtol=1e-5, atol=1e-5)


@gpu
def test_bf16_autocast_replay_close_to_eager_autocast():
    model = _model("cuda", modes=6, width=16, depth=3, uwidth=8)
    g = GraphedIRNO(model)
    x = torch.randn(2, 2, 48, 48, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        g(x)  # capture
        out = g(x + 0.1)
        with torch.no_grad():
            want = model(x + 0.1)
    assert g.n_captures == 1 and out.dtype == want.dtype
    with torch.no_grad():
        exact = model(x + 0.1)
    g(x)  # fp32: another key
    assert g.n_captures == 2
    err_graph = (out.float() - exact).abs().max()
    err_eager = (want.float() - exact).abs().max()
    assert err_graph <= 2 * err_eager + 1e-3  # replay is as accurate as eager bf16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2 * float(exact.abs().max()))


@gpu
@pytest.mark.parametrize("fused", [False, True])
def test_early_stop_on_gpu_agrees_with_eager(fused):
    model = _contraction_model("cuda", fused=fused)
    x = torch.rand(2, 1, 32, 48, device="cuda") + 0.5
    _, res, traj = _expected_stop(model, x, 24, 1.0, 1)
    tol = (res[7] * res[6]) ** 0.5
    for chunk in (1, 3, 5):
        want, _, _ = _expected_stop(model, x, 24, tol, chunk)
        g = GraphedIRNO(model, 24, tol=tol, chunk=chunk)
        out, used = g(x, return_steps=True)
        assert used == want
        torch.testing.assert_close(out, traj[used], rtol=1e-5, atol=1e-5)
        assert g.n_captures == (2 if 24 % chunk == 0 else 3)
    # the U-Net model: replay and eager fallback take the same number of steps
    unet = _model("cuda", K=6)
    xu = torch.randn(2, 2, 32, 32, device="cuda")
    g = GraphedIRNO(unet, 8, tol=1e-2, chunk=2)
    out, used = g(xu, return_steps=True)
    with torch.no_grad():
        want_out, want_used = g._eager(xu, 8, 1e-2, 2)
    assert used == want_used
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)


@gpu
def test_torch_compile_reduce_overhead_matches_eager(monkeypatch):
    # TF32 off: inductor picks its own conv algorithms, and TF32 rounding (on by default for cuDNN
    # convolutions) then differs from eager's by ~1e-3, which would hide real errors
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = _model("cuda", K=2)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(2, 2, 32, 32, device="cuda")
    with torch.no_grad():
        want = model(x, steps=2)
        for _ in range(3):  # record, then replay the CUDA graph
            out = compiled(x, steps=2).clone()
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        x2 = torch.randn_like(x)
        torch.testing.assert_close(compiled(x2, steps=2).clone(), model(x2, steps=2), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the benchmark script, on CPU
# ---------------------------------------------------------------------------------------------
def test_bench_irno_quick_cpu(tmp_path):
    csv_path, png = tmp_path / "bench_irno.csv", tmp_path / "bench_irno.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_irno.py"),
            "--device",
            "cpu",
            "--quick",
            "--threads",
            "1",
            "--csv",
            str(csv_path),
            "--plot",
            str(png),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "agreement with plain: all ok" in proc.stdout
    assert "skipping graphed, graphed+bf16: they need CUDA" in proc.stdout
    rows = list(csv.DictReader(open(csv_path)))
    kinds = {(r["kind"], r["variant"]) for r in rows}
    for kind in ("infer", "train", "sweep"):
        for variant in ("plain", "irno"):
            assert (kind, variant) in kinds
    assert not any(r["variant"].startswith("graphed") for r in rows)
    for r in rows:
        assert r["device"] == "cpu" and r["threads"] == "1" and r["torch"] == torch.__version__
        assert r["commit"] and r["date"] and r["shape"] and float(r["median_ms"]) > 0
        if r["kind"] != "sweep":
            assert r["agree"] == "True" and float(r["speedup_vs_plain"]) > 0
    assert png.stat().st_size > 1000
    print(f"bench_irno --quick took {time.time() - t0:.1f} s")
