"""radial_spectrum and spectral_loss: hand-computed cases, Parseval, C++ vs the reference (forward
and backward), gradcheck, opcheck, torch.compile, bad inputs and backend choice; the CUDA kernels
against the float64 reference, in 16 bits, determinism, opcheck and CUDA graphs (marked gpu)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _cuda_graphs import replay_after_poisoning
from conftest import tol
from hypothesis import given, settings
from hypothesis import strategies as st

import irno_kernels
from irno_kernels import spectrum as sp
from irno_kernels.spectrum import (
    num_shells,
    radial_spectrum,
    shell_index,
    spectral_loss,
    spectral_loss_ref,
    spectral_weights,
)

HAS_CPU_KERNEL = irno_kernels.available("spectral_loss", "cpu", "cpu") and irno_kernels.available(
    "radial_spectrum", "cpu", "cpu")
needs_c = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="irno_kernels._C (C++ spectrum kernels) is not built")
BACKENDS = ["reference", pytest.param("cpu", marks=needs_c)]
DTYPES = [torch.float32, torch.float64]
MODES = ["magnitude", "error"]

# float32: the reference sums in float32, the kernel in float64
TOL = {torch.float32: (2e-5, 2e-6), torch.float64: (1e-11, 1e-13)}


def close(actual, expected, dtype=None):
    """assert_close with a per-dtype rtol and an atol relative to the largest expected entry."""
    rtol, atol = TOL[dtype or expected.dtype]
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(scale, 1e-30))


def field(shape, dtype=torch.float32, seed=0, contiguous=True):
    """A random (B, C, H, W) field; non-contiguous ones are the transpose of a (B, C, W, H) tensor."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    if contiguous:
        return torch.randn(B, C, H, W, generator=g, dtype=dtype)
    return torch.randn(B, C, W, H, generator=g, dtype=dtype).transpose(-1, -2)


# ---------------------------------------------------------------------------------------------
# shells and weights, pinned by hand
# ---------------------------------------------------------------------------------------------
def test_shell_index_hand_computed():
    # 4x4: ky in (0, 1, -2, -1), kx in (0, 1, 2); r = round(|(ky, kx)|)
    assert shell_index(4, 4).tolist() == [[0, 1, 2], [1, 1, 2], [2, 2, 3], [1, 1, 2]]
    # 5x5: ky in (0, 1, 2, -2, -1)
    assert shell_index(5, 5).tolist() == [[0, 1, 2], [1, 1, 2], [2, 2, 3], [2, 2, 3], [1, 1, 2]]
    # 3x8: L = 8, r = round(sqrt((8 ky / 3)^2 + kx^2)); ky = +-1 gives 2.67, 2.85, 3.33, 4.01, 4.81
    assert shell_index(3, 8).tolist() == [[0, 1, 2, 3, 4], [3, 3, 3, 4, 5], [3, 3, 3, 4, 5]]
    assert shell_index(3, 8).dtype == torch.int64
    assert num_shells(4, 4) == 4 and num_shells(5, 5) == 4 and num_shells(3, 8) == 6


@pytest.mark.parametrize("n", [6, 15, 16])
def test_shell_index_square_is_integer_wavenumber_length(n):
    k = np.rint(np.fft.fftfreq(n) * n).astype(np.int64)
    kx = np.arange(n // 2 + 1)
    expected = np.rint(np.sqrt(k[:, None] ** 2 + kx[None, :] ** 2)).astype(np.int64)
    np.testing.assert_array_equal(shell_index(n, n).numpy(), expected)


def test_num_shells_matches_shell_index():
    for H in range(1, 41):
        for W in (1, 2, 3, 7, 8, 31, 64, 97):
            assert num_shells(H, W) == int(shell_index(H, W).max()) + 1, (H, W)


def test_spectral_weights_hand_computed():
    # 2x2, f0 = 0.5, lam = 2: |f| = [[0, .5], [.5, .7071]], (|f| / f0)^2 = [[0, 1], [1, 2]]
    w = spectral_weights(2, 2, 2.0, 0.5, dtype=torch.float64)
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.0], [1.0, 1.5]], dtype=torch.float64))
    assert spectral_weights(6, 9, 1.3).mean().item() == pytest.approx(1.0)
    assert spectral_weights(6, 9, 1.3).dtype == torch.get_default_dtype()
    torch.testing.assert_close(spectral_weights(5, 7, 0.0), torch.ones(5, 4))  # 0^0 = 1: flat weight


# ---------------------------------------------------------------------------------------------
# hand-computed values of the ops
# ---------------------------------------------------------------------------------------------
PRED_2x2 = [[1.0, 2.0], [3.0, 4.0]]  # rfft2 ortho: F00 = 5, F01 = -1, F10 = -2, F11 = 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_radial_spectrum_hand_computed(backend):
    x = torch.tensor(PRED_2x2, dtype=torch.float64).view(1, 1, 2, 2)
    # shells round(2 |f|) = [[0, 1], [1, 1]]; column 1 is the Nyquist column (counted once)
    out = radial_spectrum(x, backend=backend)
    torch.testing.assert_close(out, torch.tensor([[[25.0, 5.0]]], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_spectral_loss_hand_computed_2x2(backend):
    pred = torch.tensor(PRED_2x2, dtype=torch.float64).view(1, 1, 2, 2)
    target = torch.tensor([[0.0, 0.0], [0.0, -1.0]], dtype=torch.float64).view(1, 1, 2, 2)
    # Y = (-.5, .5, .5, -.5); w / mean(w) = (.5, 1, 1, 1.5) (lam = 2, f0 = .5)
    # magnitude: (|P| - |Y|)^2 = (20.25, .25, 2.25, .25) -> (10.125 + .25 + 2.25 + .375) / 4
    mag = spectral_loss(pred, target, 2.0, 0.5, "magnitude", backend=backend)
    assert mag.item() == pytest.approx(3.25, rel=1e-12)
    # error: |P - Y|^2 = (30.25, 2.25, 6.25, .25) -> (15.125 + 2.25 + 6.25 + .375) / 4
    err = spectral_loss(pred, target, 2.0, 0.5, "error", backend=backend)
    assert err.item() == pytest.approx(6.0, rel=1e-12)
    assert mag.shape == () and mag.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_spectral_loss_numpy_1x4(backend, mode):
    pred = np.array([[[[0.3, -1.2, 2.0, 0.7]]], [[[1.1, 0.4, -0.6, 0.0]]]])  # (2, 1, 1, 4)
    target = np.array([[[[1.0, 0.5, -0.25, 2.0]]], [[[0.0, -1.0, 0.5, 0.5]]]])
    lam, f0 = 1.6, 0.25
    P, Y = np.fft.rfft2(pred, norm="ortho"), np.fft.rfft2(target, norm="ortho")
    f = np.array([0.0, 0.25, 0.5])  # H = 1: fy = 0; fx = rfftfreq(4)
    w = 1.0 + (f / f0) ** lam
    w = w / w.mean()
    e = (np.abs(P) - np.abs(Y)) ** 2 if mode == "magnitude" else np.abs(P - Y) ** 2
    expected = (w * e).mean()
    got = spectral_loss(torch.from_numpy(pred), torch.from_numpy(target), lam, f0, mode, backend=backend)
    assert got.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Parseval
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw", [(33, 47), (32, 48), (2, 2), (3, 2), (1, 5)])
def test_parseval(backend, dtype, hw):
    x = field((2, 3, *hw), dtype, seed=1)
    E = radial_spectrum(x, backend=backend)
    assert E.shape == (2, 3, num_shells(*hw)) and E.dtype == dtype
    assert (E >= 0).all()
    close(E.sum(-1), (x * x).sum((-2, -1)))


# ---------------------------------------------------------------------------------------------
# C++ vs the reference, forward and backward with one shared grad_output
# ---------------------------------------------------------------------------------------------
SHAPES = [
    ((2, 3, 33, 47), True),
    ((1, 2, 128, 384), True),
    ((1, 1, 32, 48), True),
    ((2, 2, 33, 47), False),  # strided input
    ((3, 1, 16, 17), False),
]


def _radial_both(x, grad):
    outs = []
    for backend in ("reference", "cpu"):
        xr = x.detach().clone().requires_grad_()
        E = radial_spectrum(xr, backend=backend)
        E.backward(grad)
        outs.append((E.detach(), xr.grad))
    return outs


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,contiguous", SHAPES)
def test_radial_spectrum_cpu_matches_reference(shape, contiguous, dtype):
    x = field(shape, dtype, seed=2, contiguous=contiguous)
    g = torch.randn(shape[0], shape[1], num_shells(*shape[2:]), dtype=dtype,
                    generator=torch.Generator().manual_seed(3))
    (E_ref, gx_ref), (E_c, gx_c) = _radial_both(x, g)
    close(E_c, E_ref)
    close(gx_c, gx_ref)


def _loss_both(pred, target, lam, f0, mode, grad_out, need=(True, True)):
    outs = []
    for backend in ("reference", "cpu"):
        p = pred.detach().clone().requires_grad_(need[0])
        t = target.detach().clone().requires_grad_(need[1])
        loss = spectral_loss(p, t, lam, f0, mode, backend=backend)
        loss.backward(grad_out)
        outs.append((loss.detach(), p.grad, t.grad))
    return outs


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,contiguous", SHAPES)
def test_spectral_loss_cpu_matches_reference(shape, contiguous, mode, dtype):
    pred = field(shape, dtype, seed=4, contiguous=contiguous)
    target = field(shape, dtype, seed=5, contiguous=contiguous)
    grad_out = torch.tensor(0.7, dtype=dtype)
    for lam, f0 in [(1.0, 0.5), (1.6, 0.5), (2.0, 0.5), (1.6, 0.2), (0.0, 1.0)]:
        (l_ref, gp_ref, gt_ref), (l_c, gp_c, gt_c) = _loss_both(pred, target, lam, f0, mode, grad_out)
        close(l_c, l_ref)
        close(gp_c, gp_ref)
        close(gt_c, gt_ref)


@needs_c
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_spectral_loss_one_sided_grad(mode, need):
    pred, target = field((2, 2, 9, 10), torch.float64, 6), field((2, 2, 9, 10), torch.float64, 7)
    (_, gp_ref, gt_ref), (_, gp_c, gt_c) = _loss_both(pred, target, 1.6, 0.5, mode, torch.tensor(1.3,
                                                      dtype=torch.float64), need)
    assert (gp_c is None) == (not need[0]) and (gt_c is None) == (not need[1])
    close(gp_c if need[0] else gt_c, gp_ref if need[0] else gt_ref)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_spectral_loss_magnitude_grad_at_zero_modes(dtype):
    # cos(2 pi x / 4) on a 4x4 grid: every rfft2 entry but (0, 1) is exactly 0, where |P| has no
    # derivative; the kernel takes 0 there, as autograd of the reference does (sgn(0) = 0)
    row = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=dtype)
    zeros = row.expand(4, 4).reshape(1, 1, 4, 4).repeat(2, 1, 1, 1)
    other = field((2, 1, 4, 4), dtype, seed=8)
    P = torch.fft.rfft2(zeros, norm="ortho")
    assert (P == 0).sum() == 2 * (4 * 3 - 1)
    g = torch.tensor(1.0, dtype=dtype)
    for pred, target in [(zeros, other), (other, zeros), (torch.zeros_like(other), other)]:
        (l_ref, gp_ref, gt_ref), (l_c, gp_c, gt_c) = _loss_both(pred, target, 1.6, 0.5, "magnitude", g)
        close(l_c, l_ref)
        close(gp_c, gp_ref)
        close(gt_c, gt_ref)
        assert torch.isfinite(gp_c).all() and torch.isfinite(gt_c).all()


@needs_c
def test_spectral_loss_deterministic():
    pred, target = field((3, 2, 40, 50), seed=9), field((3, 2, 40, 50), seed=10)
    a = torch.ops.irno.spectral_loss(pred, target, 1.6, 0.5, "magnitude")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = torch.ops.irno.spectral_loss(pred, target, 1.6, 0.5, "magnitude")
    finally:
        torch.set_num_threads(n)
    assert a.item() == b.item()  # fixed chunks summed in order: independent of the thread count


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, through the public functions)
# ---------------------------------------------------------------------------------------------
@needs_c
@pytest.mark.parametrize("mode", MODES)
def test_spectral_loss_gradcheck(mode):
    pred = field((2, 1, 5, 6), torch.float64, 11).requires_grad_()
    target = field((2, 1, 5, 6), torch.float64, 12).requires_grad_()
    fn = lambda p, t: spectral_loss(p, t, 1.6, 0.3, mode, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred, target))
    # the target's gradient alone (pred constant)
    fn_t = lambda t: spectral_loss(pred.detach(), t, 2.0, 0.5, mode, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn_t, (target,))


@needs_c
def test_radial_spectrum_gradcheck():
    x = field((1, 2, 5, 6), torch.float64, 13).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: radial_spectrum(t, backend="cpu"), (x,))
    x = field((1, 1, 4, 7), torch.float64, 14).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: radial_spectrum(t, backend="cpu"), (x,))


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x = field((2, 2, 7, 10), dtype, 15)
    y = field((2, 2, 7, 10), dtype, 16)
    g_r = torch.randn(2, 2, num_shells(7, 10), dtype=dtype)
    g = torch.tensor(0.5, dtype=dtype)
    ops = torch.ops.irno
    torch.library.opcheck(ops.radial_spectrum, (x.clone().requires_grad_(),))
    torch.library.opcheck(ops.radial_spectrum_backward, (g_r, x))
    for mode in MODES:
        torch.library.opcheck(ops.spectral_loss, (x.clone().requires_grad_(), y.clone().requires_grad_(),
                                                  1.6, 0.5, mode))
        for wrt_target in (False, True):
            torch.library.opcheck(ops.spectral_loss_backward, (g, x, y, 1.6, 0.5, mode, wrt_target))
        _, P, Y = ops.spectral_loss_spectra(x, y, 1.6, 0.5, mode)
        torch.library.opcheck(ops.spectral_loss_spectra, (x.clone().requires_grad_(), y.clone().requires_grad_(),
                                                          1.6, 0.5, mode))
        saved = (P, Y if mode == "magnitude" else None)
        for wrt_target in (False, True):
            torch.library.opcheck(ops.spectral_loss_backward, (g, x, y, 1.6, 0.5, mode, wrt_target, *saved))
            # reusing the forward's spectra gives the recomputed gradient, and leaves them intact
            P0 = P.clone()
            torch.testing.assert_close(ops.spectral_loss_backward(g, x, y, 1.6, 0.5, mode, wrt_target, *saved),
                                       ops.spectral_loss_backward(g, x, y, 1.6, 0.5, mode, wrt_target))
            assert torch.equal(P, P0)


@needs_c
def test_saved_spectra_are_checked():
    x, y = field((2, 2, 7, 10), torch.float64, 1), field((2, 2, 7, 10), torch.float64, 2)
    g = torch.tensor(1.0, dtype=torch.float64)
    _, P, Y = torch.ops.irno.spectral_loss_spectra(x, y, 1.6, 0.5, "magnitude")
    back = torch.ops.irno.spectral_loss_backward
    with pytest.raises(RuntimeError, match="spec_target: required"):
        back(g, x, y, 1.6, 0.5, "magnitude", False, P, None)
    with pytest.raises(RuntimeError, match="spec_pred: expected shape"):
        back(g, x, y, 1.6, 0.5, "magnitude", False, P[:, :, :-1].contiguous(), Y)
    with pytest.raises(RuntimeError, match="spec_pred: expected dtype"):
        back(g, x, y, 1.6, 0.5, "magnitude", False, P.to(torch.complex64), Y)
    with pytest.raises(RuntimeError, match="spec_target: given without spec_pred"):
        back(g, x, y, 1.6, 0.5, "magnitude", False, None, Y)


@needs_c
@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    def step(p, t):
        spec = radial_spectrum(p, backend="cpu")
        return spectral_loss(p, t, 1.6, 0.5, mode, backend="cpu") + 1e-3 * spec[..., 1:].sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    pred, target = field((2, 3, 12, 10), seed=17), field((2, 3, 12, 10), seed=18)
    results = []
    for fn in (step, compiled):
        p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
        out = fn(p, t)
        out.backward()
        results.append((out.detach(), p.grad, t.grad))
    for a, b in zip(results[1], results[0]):
        close(a, b)


@needs_c
@pytest.mark.slow
def test_torch_compile_inductor():
    def step(p, t):  # default backend: the C++ kernels on CPU tensors
        return spectral_loss(p, t, 2.0, 0.5) + radial_spectrum(p)[..., -1].mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    pred, target = field((1, 2, 9, 14), seed=19), field((1, 2, 9, 14), seed=20)
    results = []
    for fn in (step, compiled):
        p = pred.clone().requires_grad_()
        out = fn(p, target)
        out.backward()
        results.append((out.detach(), p.grad))
    for a, b in zip(results[1], results[0]):
        close(a, b)


# ---------------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------------
shapes = st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 24), st.integers(1, 24))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property_parseval(shape, dtype, seed):
    x = field(shape, dtype, seed)
    for backend in ("reference", "cpu") if HAS_CPU_KERNEL else ("reference",):
        E = radial_spectrum(x, backend=backend)
        assert E.shape[-1] == num_shells(*shape[2:])
        close(E.sum(-1), (x * x).sum((-2, -1)))


@needs_c
@settings(max_examples=25, deadline=None)
@given(shape=shapes, mode=st.sampled_from(MODES), lam=st.floats(0.0, 3.0), f0=st.floats(0.05, 2.0),
       seed=st.integers(0, 2**16))
def test_property_cpu_matches_reference(shape, mode, lam, f0, seed):
    pred, target = field(shape, torch.float64, seed), field(shape, torch.float64, seed + 1)
    grad_out = torch.tensor(0.9, dtype=torch.float64)
    (l_ref, gp_ref, gt_ref), (l_c, gp_c, gt_c) = _loss_both(pred, target, lam, f0, mode, grad_out)
    close(l_c, l_ref)
    close(gp_c, gp_ref)
    close(gt_c, gt_ref)
    g = torch.randn(shape[0], shape[1], num_shells(*shape[2:]), dtype=torch.float64)
    (E_ref, gx_ref), (E_c, gx_c) = _radial_both(pred, g)
    close(E_c, E_ref)
    close(gx_c, gx_ref)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_public(backend):
    x = field((2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor"):
        radial_spectrum(x[0], backend=backend)
    with pytest.raises(ValueError, match=r"x: expected dtype"):
        radial_spectrum(x.to(torch.int32), backend=backend)
    with pytest.raises(ValueError, match=r"x: expected dtype"):
        radial_spectrum(x.to(torch.float16), backend=backend)
    with pytest.raises(ValueError, match=r"x: expected a non-empty tensor"):
        radial_spectrum(x[:0], backend=backend)
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
        radial_spectrum(x.numpy(), backend=backend)

    y = field((2, 1, 8, 8), seed=1)
    with pytest.raises(ValueError, match=r"pred: expected a 4-D tensor"):
        spectral_loss(x[0], y[0], 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"target: expected shape \(2, 1, 8, 8\)"):
        spectral_loss(x, y[:, :, :7], 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"target: expected dtype torch.float32"):
        spectral_loss(x, y.double(), 1.0, backend=backend)
    with pytest.raises(RuntimeError, match=r"target: expected a tensor on cpu"):
        spectral_loss(x, y.to("meta"), 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"pred: expected a non-empty tensor"):
        spectral_loss(x[:0], y[:0], 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"mode: expected one of \('magnitude', 'error'\), got 'phase'"):
        spectral_loss(x, y, 1.0, mode="phase", backend=backend)
    with pytest.raises(TypeError, match=r"mode: expected a str"):
        spectral_loss(x, y, 1.0, mode=1, backend=backend)
    with pytest.raises(ValueError, match=r"lam: expected a number >= 0, got -0.5"):
        spectral_loss(x, y, -0.5, backend=backend)
    with pytest.raises(ValueError, match=r"lam: expected a finite number"):
        spectral_loss(x, y, math.nan, backend=backend)
    with pytest.raises(TypeError, match=r"lam: expected a real number"):
        spectral_loss(x, y, "two", backend=backend)
    with pytest.raises(ValueError, match=r"f0: expected a number > 0, got 0.0"):
        spectral_loss(x, y, 1.0, 0.0, backend=backend)
    with pytest.raises(ValueError, match=r"f0: expected a finite number"):
        spectral_loss(x, y, 1.0, math.inf, backend=backend)


def test_bad_grid_sizes():
    with pytest.raises(ValueError, match=r"H: expected a grid size >= 1, got 0"):
        shell_index(0, 4)
    with pytest.raises(TypeError, match=r"W: expected an int grid size"):
        spectral_weights(4, 4.0, 1.0)
    with pytest.raises(ValueError, match=r"f0: expected a number > 0"):
        spectral_weights(4, 4, 1.0, -1.0)


@needs_c
def test_bad_inputs_compiled_ops():
    ops = torch.ops.irno
    x, y = field((2, 1, 8, 8)), field((2, 1, 8, 8), seed=1)
    with pytest.raises(RuntimeError, match=r"x: expected a 4-D tensor"):
        ops.radial_spectrum(x[0])
    with pytest.raises(RuntimeError, match=r"x: expected dtype float32 or float64"):
        ops.radial_spectrum(x.to(torch.int64))
    with pytest.raises(RuntimeError, match=r"grad: expected shape \(2, 1, 7\)"):
        ops.radial_spectrum_backward(torch.zeros(2, 1, 6), x)
    with pytest.raises(RuntimeError, match=r'mode: expected "magnitude" or "error", got "phase"'):
        ops.spectral_loss(x, y, 1.0, 0.5, "phase")
    with pytest.raises(RuntimeError, match=r"f0: expected a finite number > 0"):
        ops.spectral_loss(x, y, 1.0, 0.0, "error")
    with pytest.raises(RuntimeError, match=r"lam: expected a finite number >= 0"):
        ops.spectral_loss(x, y, -1.0, 0.5, "error")
    with pytest.raises(RuntimeError, match=r"target: expected shape"):
        ops.spectral_loss(x, y[..., :5], 1.0, 0.5, "magnitude")
    with pytest.raises(RuntimeError, match=r"grad: expected a 0-D tensor"):
        ops.spectral_loss_backward(torch.ones(2), x, y, 1.0, 0.5, "magnitude", False)


# ---------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------
def _spy_reference(monkeypatch):
    calls = []
    real = sp.spectral_loss_ref

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(sp, "spectral_loss_ref", spy)
    return calls


def test_backend_keyword_and_env(monkeypatch):
    x, y = field((1, 1, 8, 8)), field((1, 1, 8, 8), seed=1)
    calls = _spy_reference(monkeypatch)
    monkeypatch.delenv("IRNO_BACKEND", raising=False)
    spectral_loss(x, y, 1.0, backend="reference")
    assert len(calls) == 1
    monkeypatch.setenv("IRNO_BACKEND", "reference")
    spectral_loss(x, y, 1.0)
    assert len(calls) == 2
    if HAS_CPU_KERNEL:
        spectral_loss(x, y, 1.0, backend="cpu")  # the keyword wins over the environment
        monkeypatch.setenv("IRNO_BACKEND", "cpu")
        spectral_loss(x, y, 1.0)
        monkeypatch.delenv("IRNO_BACKEND")
        spectral_loss(x, y, 1.0)  # default on CPU: the C++ kernel
        assert len(calls) == 2
    monkeypatch.setenv("IRNO_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"IRNO_BACKEND: expected one of"):
        radial_spectrum(x)
    with pytest.raises(RuntimeError, match=r"'cuda' backend takes CUDA tensors only|not built"):
        radial_spectrum(x, backend="cuda")


def test_forward_mode_ad_uses_the_reference():
    import torch.autograd.forward_ad as fwAD

    pred, target = field((1, 2, 6, 5), torch.float64, 21), field((1, 2, 6, 5), torch.float64, 22)
    tangent = field((1, 2, 6, 5), torch.float64, 23)
    eps = 1e-6
    for mode in MODES:
        with fwAD.dual_level():
            out = spectral_loss(fwAD.make_dual(pred, tangent), target, 1.6, 0.5, mode)
            jvp = fwAD.unpack_dual(out).tangent
        fd = (spectral_loss_ref(pred + eps * tangent, target, 1.6, 0.5, mode)
              - spectral_loss_ref(pred - eps * tangent, target, 1.6, 0.5, mode)) / (2 * eps)
        assert jvp.item() == pytest.approx(fd.item(), rel=1e-6)
    if HAS_CPU_KERNEL:
        with fwAD.dual_level(), pytest.raises(RuntimeError, match="no forward-mode AD formula"):
            radial_spectrum(fwAD.make_dual(pred, tangent), backend="cpu")


# ---------------------------------------------------------------------------------------------
# CUDA kernels (csrc/spectrum.cu): marked gpu, skipped without a CUDA device
# ---------------------------------------------------------------------------------------------
CUDA_SHAPES = [
    (3, 5, 37, 50),  # odd and non-power-of-two sizes
    (2, 4, 128, 384),
    (2, 11, 256, 256),
    (2, 3, 33, 47),
    (3, 2, 16, 17),
    (2, 1, 3, 8),  # non-square: shells of irrational radius
    (1, 1, 2, 2),
    (2, 1, 1, 5),
    (1, 1, 2, 17000),  # R = 8501 > 6144 shells: the radial kernel bins in shell windows
]
CUDA_LOSS_PARAMS = [(1.0, 0.5), (1.6, 0.5), (2.0, 0.2), (0.0, 1.0)]


def cuda_field(shape, dtype=torch.float32, layout="contiguous"):
    """A random (B, C, H, W) CUDA field, contiguous or a strided view of the requested layout."""
    B, C, H, W = shape
    if layout == "transposed":
        t = torch.randn(B, C, W, H, device="cuda").transpose(-1, -2)
    elif layout == "sliced":
        t = torch.randn(B, 2 * C, H, W + 3, device="cuda")[:, ::2, :, 1 : W + 1]
    elif layout == "channels_last":
        t = torch.randn(B, C, H, W, device="cuda").contiguous(memory_format=torch.channels_last)
    else:
        t = torch.randn(B, C, H, W, device="cuda")
    return t.to(dtype)


def _radial_run(fn, x, g):
    """(E, grad_x) of fn at x for grad_E = g."""
    x = x.detach().requires_grad_()
    E = fn(x)
    return E.detach(), torch.autograd.grad(E, x, g)[0]


def _loss_run(fn, p, t, g):
    """(loss, grad_pred, grad_target) of fn at (p, t) for grad_loss = g."""
    p, t = p.detach().requires_grad_(), t.detach().requires_grad_()
    L = fn(p, t)
    return (L.detach(), *torch.autograd.grad(L, (p, t), g))


def _cuda_radial(x):
    return radial_spectrum(x, backend="cuda")


def _cuda_loss(lam, f0, mode):
    return lambda p, t: spectral_loss(p, t, lam, f0, mode, backend="cuda")


def _ref_loss(lam, f0, mode):
    return lambda p, t: spectral_loss_ref(p, t, lam, f0, mode)


def _close_fp32(got, want):
    """float32 results against float64 ones: conftest's float32 rtol, atol relative to the largest entry."""
    rtol, atol = tol(torch.float32)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol * max(float(b.abs().max()), 1e-30))


def _radial_grad(x, dtype=torch.float64):
    B, C, H, W = x.shape
    return torch.randn(B, C, num_shells(H, W), device="cuda", dtype=torch.float64).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_radial_spectrum_matches_float64_reference(shape):
    x = cuda_field(shape)
    g = _radial_grad(x)
    got = _radial_run(_cuda_radial, x, g.float())
    assert got[0].dtype == torch.float32 and got[0].shape[-1] == num_shells(*shape[2:])
    _close_fp32(got, _radial_run(sp.radial_spectrum_ref, x.double(), g))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_float64_shells_exact(shape):
    """float64: every entry lands in the reference's shell (a misplaced entry would move O(1) energy)."""
    x = cuda_field(shape, torch.float64)
    g = _radial_grad(x)
    for a, b in zip(_radial_run(_cuda_radial, x, g), _radial_run(sp.radial_spectrum_ref, x, g)):
        close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_spectral_loss_matches_float64_reference(shape, mode):
    p, t = cuda_field(shape), cuda_field(shape)
    g = torch.tensor(0.7, device="cuda", dtype=torch.float64)
    for lam, f0 in CUDA_LOSS_PARAMS:
        got = _loss_run(_cuda_loss(lam, f0, mode), p, t, g.float())
        assert got[0].shape == () and got[0].dtype == torch.float32
        _close_fp32(got, _loss_run(_ref_loss(lam, f0, mode), p.double(), t.double(), g))
    got = _loss_run(_cuda_loss(1.6, 0.5, mode), p.double(), t.double(), g)
    for a, b in zip(got, _loss_run(_ref_loss(1.6, 0.5, mode), p.double(), t.double(), g)):
        close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_cuda_strided_inputs(layout):
    shape = CUDA_SHAPES[0]
    x, y = cuda_field(shape, layout=layout), cuda_field(shape, layout=layout)
    assert not x.is_contiguous()
    g = _radial_grad(x)
    _close_fp32(_radial_run(_cuda_radial, x, g.float()), _radial_run(sp.radial_spectrum_ref, x.double(), g))
    g = torch.tensor(1.3, device="cuda", dtype=torch.float64)
    for mode in MODES:
        _close_fp32(
            _loss_run(_cuda_loss(1.6, 0.5, mode), x, y, g.float()),
            _loss_run(_ref_loss(1.6, 0.5, mode), x.double(), y.double(), g),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [CUDA_SHAPES[0], CUDA_SHAPES[2]], ids=lambda s: "x".join(map(str, s)))
def test_cuda_low_precision_error_within_twice_torch(shape, dtype):
    """16-bit fields: the kernels' error against float64 (same rounded inputs) is at most twice that of
    the reference run on the same inputs (torch's FFT has no bfloat16 and needs powers of two for
    float16: it computes in float32 and stores the results in the 16-bit dtype)."""

    def check(ours, torch_lp, exact):
        for o, lp, e in zip(ours, torch_lp, exact):
            assert o.dtype == dtype
            err_ours = (o.double() - e).abs().max().item()
            err_torch = (lp.to(dtype).double() - e).abs().max().item()
            assert err_ours <= 2 * err_torch + 1e-5 * e.abs().max().item(), (err_ours, err_torch)

    x, y = cuda_field(shape, dtype), cuda_field(shape, dtype)
    g = _radial_grad(x, dtype)
    check(
        _radial_run(_cuda_radial, x, g),
        _radial_run(sp.radial_spectrum_ref, x.float(), g.float()),
        _radial_run(sp.radial_spectrum_ref, x.double(), g.double()),
    )
    g = torch.tensor(0.7, device="cuda").to(dtype)
    for mode in MODES:
        check(
            _loss_run(_cuda_loss(1.6, 0.5, mode), x, y, g),
            _loss_run(_ref_loss(1.6, 0.5, mode), x.float(), y.float(), g.float()),
            _loss_run(_ref_loss(1.6, 0.5, mode), x.double(), y.double(), g.double()),
        )


@pytest.mark.gpu
def test_cuda_low_precision_only_on_the_cuda_backend():
    x, y = cuda_field((2, 3, 16, 16), torch.bfloat16), cuda_field((2, 3, 16, 16), torch.bfloat16)
    assert radial_spectrum(x).dtype == torch.bfloat16  # auto picks the CUDA kernel
    assert spectral_loss(x, y, 1.6).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"x: expected dtype .*'reference' backend.* got torch.bfloat16"):
        radial_spectrum(x, backend="reference")
    with pytest.raises(ValueError, match=r"pred: expected dtype .*'reference' backend.* got torch.bfloat16"):
        spectral_loss(x, y, 1.6, backend="reference")


@pytest.mark.gpu
def test_cuda_deterministic():
    """Two runs are bitwise equal: fixed-shape partials added in order, no atomics."""
    x, y = cuda_field(CUDA_SHAPES[2]), cuda_field(CUDA_SHAPES[2])
    g = _radial_grad(x, torch.float32)
    for a, b in zip(_radial_run(_cuda_radial, x, g), _radial_run(_cuda_radial, x, g)):
        assert torch.equal(a, b)
    g = torch.tensor(0.7, device="cuda")
    for mode in MODES:
        fn = _cuda_loss(1.6, 0.5, mode)
        for a, b in zip(_loss_run(fn, x, y, g), _loss_run(fn, x, y, g)):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_spectral_loss_magnitude_grad_at_zero_modes(dtype):
    # every rfft2 entry of cos(2 pi x / 4) on a 4x4 grid but one is 0, where |P| has no derivative
    row = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=dtype, device="cuda")
    zeros = row.expand(4, 4).reshape(1, 1, 4, 4).repeat(2, 1, 1, 1)
    other = cuda_field((2, 1, 4, 4), dtype)
    g = torch.tensor(1.0, dtype=dtype, device="cuda")
    for p, t in [(zeros, other), (other, zeros), (torch.zeros_like(other), other)]:
        got = _loss_run(_cuda_loss(1.6, 0.5, "magnitude"), p, t, g)
        for a, b in zip(got, _loss_run(_ref_loss(1.6, 0.5, "magnitude"), p, t, g)):
            close(a, b)
            assert torch.isfinite(a).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # float64: the CPU opcheck
def test_cuda_opcheck(dtype):
    x, y = cuda_field((2, 2, 7, 10), dtype), cuda_field((2, 2, 7, 10), dtype)
    g_r = _radial_grad(x, dtype)
    g = torch.tensor(0.5, device="cuda").to(dtype)
    ops = torch.ops.irno
    torch.library.opcheck(ops.radial_spectrum, (x.clone().requires_grad_(),))
    torch.library.opcheck(ops.radial_spectrum_backward, (g_r, x))
    for mode in MODES:
        torch.library.opcheck(
            ops.spectral_loss, (x.clone().requires_grad_(), y.clone().requires_grad_(), 1.6, 0.5, mode)
        )
        for wrt_target in (False, True):
            torch.library.opcheck(ops.spectral_loss_backward, (g, x, y, 1.6, 0.5, mode, wrt_target))
        torch.library.opcheck(ops.spectral_loss_spectra, (x.clone().requires_grad_(), y.clone().requires_grad_(),
                                                          1.6, 0.5, mode))
        _, P, Y = ops.spectral_loss_spectra(x, y, 1.6, 0.5, mode)
        saved = (P, Y if mode == "magnitude" else None)
        for wrt_target in (False, True):
            torch.library.opcheck(ops.spectral_loss_backward, (g, x, y, 1.6, 0.5, mode, wrt_target, *saved))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_equals_eager():
    """Warm up on a side stream, capture forward + backward of both ops, poison the outputs, replay."""
    x = cuda_field((2, 3, 64, 96)).requires_grad_()
    y = cuda_field((2, 3, 64, 96))
    gr = _radial_grad(x, torch.float32)

    def step():
        E = radial_spectrum(x, backend="cuda")
        loss = spectral_loss(x, y, 1.6, 0.5, "magnitude", backend="cuda") + spectral_loss(
            x, y, 1.0, 0.5, "error", backend="cuda"
        )
        return (E, loss, *torch.autograd.grad((E, loss), (x,), (gr, torch.ones_like(loss))))

    static, eager = replay_after_poisoning(step)
    for s, e in zip(static, eager):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6 * float(e.abs().max()))
