"""Triton kernels (irno_kernels.triton) against the references: forward and backward with one shared
grad_output, both launch configurations, determinism, opcheck and torch.compile; GPU-only checks
(bf16, strided paper-sized inputs, CUDA graphs, Inductor) are marked ``gpu``.

Without CUDA, conftest sets TRITON_INTERPRET=1 and the kernels run on CPU tensors through triton's
interpreter: float32/float64 only there (it computes bf16 wrongly), and tiny shapes, since its cost
grows with the number of programs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _cuda_graphs import replay_after_poisoning
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")
tr = pytest.importorskip("irno_kernels.triton")

import irno_kernels as ik  # noqa: E402
from irno_kernels import backend as bk  # noqa: E402
from irno_kernels.spectrum import num_shells  # noqa: E402
from irno_kernels.triton import spectral_conv as tr_conv  # noqa: E402
from irno_kernels.triton import spectral_dft as tr_dft  # noqa: E402
from irno_kernels.triton import spectrum as tr_spec  # noqa: E402
from irno_kernels.triton import update as tr_update  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tr.INTERPRET:
    pytest.skip("Triton needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

ops = torch.ops.irno_triton
gpu = pytest.mark.gpu
FIELD_SHAPES = [(2, 3, 5, 7), (1, 2, 9, 12), (2, 1, 33, 47)]
# float32 compares with an atol relative to the largest expected entry (sums reorder)
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-12)}
COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def close(actual, expected, dtype=None, factor=1.0):
    dtype = dtype or expected.dtype
    rtol, atol = TOL[dtype.to_real() if dtype.is_complex else dtype]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol * factor, atol=atol * factor * scale)


def randn(*shape, dtype=torch.float32, strided=False, requires_grad=False, device=DEVICE):
    """A random tensor; ``strided`` gives a transposed view (last two dims) of the same shape."""
    if strided:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype, device=device).transpose(-1, -2)
    else:
        t = torch.randn(*shape, dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def check_fwd_bwd(fast, ref, inputs, dtype, factor=1.0):
    """Outputs and every input gradient of ``fast`` vs ``ref``, with one shared grad_output."""
    out, want = fast(*inputs), ref(*inputs)
    assert out.shape == want.shape and out.dtype == want.dtype
    close(out, want, dtype, factor)
    grad = torch.randn_like(want)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(out, leaves, grad)
    exp = torch.autograd.grad(want, leaves, grad)
    for g, e in zip(got, exp):
        assert g.shape == e.shape and g.dtype == e.dtype
        close(g, e, dtype, factor)


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
def test_every_op_has_a_triton_kernel_and_the_backend_finds_it():
    assert set(tr.OPS) == set(bk.OPS)
    for op in tr.OPS:
        assert ik.available(op, "triton", DEVICE)
        assert bk.resolve(op, DEVICE, "triton") == "triton"


def test_eager_launches_with_module_weights_skip_wrap_triton(monkeypatch):
    """A module's weights reach the kernels as nn.Parameter; in eager mode that must not count as
    tracing (wrap_triton costs a higher-order-op dispatch per launch, of the order of a small
    kernel's own time). Under make_fx the same calls must go through wrap_triton."""
    from irno_kernels.triton import _lib

    real = torch.library.wrap_triton
    calls = []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda k: calls.append(k) or real(k))
    P = torch.nn.Parameter

    def run():
        x = randn(2, 5, 6, 7, requires_grad=True)
        w, b = P(randn(5)), P(randn(5))
        y = ik.channel_layer_norm(x, w, b, activation="gelu", halo=1, backend="triton")
        z = ik.refine_update(randn(2, 3, 6, 7), y[..., 1:-1, 1:-1], P(randn(3, 5)), P(randn(3)), 0.3,
                             backend="triton")
        s = ik.spectral_conv2d(z, P(randn(3, 2, 4, 3, dtype=torch.complex64)), backend="triton")
        s.square().sum().backward()
        return x.grad

    assert not _lib._tracing((P(randn(3)), randn(3), 1.0))
    run()
    assert calls == []  # every launch, forward and backward, went straight to triton's launcher
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = []
    make_fx(lambda a: seen.append(_lib._tracing((P(torch.ones(2)), a))) or a + 1)(randn(3))
    assert seen == [True]  # under make_fx the same arguments are traced

# ---------------------------------------------------------------------------------------------
# update ops
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 33, 47), (2, 3, 7), (5,), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strided", [False, True])
def test_residual_update(shape, dtype, strided):
    strided = strided and len(shape) >= 2
    h = randn(*shape, dtype=dtype, strided=strided, requires_grad=True)
    phi = randn(*shape, dtype=dtype, strided=strided, requires_grad=True)
    check_fwd_bwd(lambda a, b: ik.residual_update(a, b, 0.2, backend="triton"),
                  lambda a, b: ik.residual_update_ref(a, b, 0.2), (h, phi), dtype)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 33, 47), (2, 4, 9, 12), (2, 3, 7), (1, 2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_refine_update(shape, dtype, bias, strided):
    B, Co, *S = shape
    F = 5
    h = randn(*shape, dtype=dtype, strided=strided, requires_grad=True)
    z = randn(B, F, *S, dtype=dtype, strided=strided, requires_grad=True)
    w = randn(Co, F, dtype=dtype, requires_grad=True)
    b = randn(Co, dtype=dtype, requires_grad=True) if bias else None
    check_fwd_bwd(lambda *a: ik.refine_update(*a, 0.3, backend="triton"),
                  lambda *a: ik.refine_update_ref(*a, 0.3), (h, z, w, b), dtype, factor=10)


def test_refine_update_grad_of_some_inputs_only():
    h, z = randn(2, 3, 5, 7), randn(2, 4, 5, 7, requires_grad=True)
    w, b = randn(3, 4, requires_grad=True), randn(3)
    (gz, gw) = torch.autograd.grad(tr.refine_update(h, z, w, b, 0.5).sum(), (z, w))
    (ez, ew) = torch.autograd.grad(ik.refine_update_ref(h, z, w, b, 0.5).sum(), (z, w))
    close(gz, ez)
    close(gw, ew, factor=10)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 3, 7), (1, 2, 3, 4, 5)])
@pytest.mark.parametrize("strided", [False, True])
def test_in_place_forms(shape, strided):
    B, Co, *S = shape
    h = randn(*shape, strided=strided)
    z, phi = randn(B, 4, *S, strided=strided), randn(*shape)
    w, b = randn(Co, 4), randn(Co)
    with torch.no_grad():
        want = ik.refine_update_ref(h, z, w, b, 0.3)
        ptr = h.data_ptr()
        assert tr.refine_update_(h, z, w, b, 0.3) is h and h.data_ptr() == ptr
        close(h, want)
        want = ik.residual_update_ref(h, phi, 0.7)
        assert tr.residual_update_(h, phi, 0.7) is h
        close(h, want)


# ---------------------------------------------------------------------------------------------
# spectrum ops
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", FIELD_SHAPES + [(1, 1, 16, 24), (1, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radial_spectrum(shape, dtype):
    x = randn(*shape, dtype=dtype, requires_grad=True)
    check_fwd_bwd(lambda a: ik.radial_spectrum(a, backend="triton"), ik.radial_spectrum_ref, (x,), dtype)
    with torch.no_grad():  # Parseval: the shells add up to the energy of the field
        close(tr.radial_spectrum(x).sum(-1), x.square().sum((-2, -1)), dtype)


def test_radial_spectrum_shells_match_shell_index():
    """A field whose spectrum is 1 at one frequency puts its energy in that frequency's shell.
    16x24 and 12x18 have half-way ties (round to even); at (1, 6) of 6x15 the float64 value is
    6.500000000000001 (shell 7) but 6.5 (shell 6) if fy*fy + fx*fx is contracted into an fma, which
    the kernels' launches switch off; 33x47 has odd sizes."""
    for H, W in [(16, 24), (12, 18), (6, 15), (33, 47)]:
        shells = ik.shell_index(H, W)
        for ky, kx in [(1, 1), (1, 2), (1, 6), (H - 1, 2), (H // 2, W // 2), (3, 0), (H - 3, W // 2 - 1)]:
            spec = torch.zeros(1, 1, H, W // 2 + 1, dtype=torch.complex128)
            spec[0, 0, ky, kx] = 1.0
            x = torch.fft.irfft2(spec, s=(H, W), norm="ortho").to(DEVICE)
            assert tr.radial_spectrum(x)[0, 0].argmax().item() == shells[ky, kx].item()


@pytest.mark.parametrize("shape", FIELD_SHAPES)
@pytest.mark.parametrize("mode", ["magnitude", "error"])
@pytest.mark.parametrize("lam", [1.0, 1.7, 0.0])
def test_spectral_loss(shape, mode, lam):
    pred = randn(*shape, requires_grad=True)
    target = randn(*shape, strided=True, requires_grad=True)
    check_fwd_bwd(lambda p, t: ik.spectral_loss(p, t, lam, 0.5, mode, backend="triton"),
                  lambda p, t: ik.spectral_loss_ref(p, t, lam, 0.5, mode), (pred, target), torch.float32)


@pytest.mark.parametrize("mode", ["magnitude", "error"])
def test_spectral_loss_float64_and_pred_only(mode):
    pred = randn(2, 3, 9, 12, dtype=torch.float64, requires_grad=True)
    target = randn(2, 3, 9, 12, dtype=torch.float64)
    check_fwd_bwd(lambda p, t: tr.spectral_loss(p, t, 1.4, 0.3, mode),
                  lambda p, t: ik.spectral_loss_ref(p, t, 1.4, 0.3, mode), (pred, target), torch.float64)


def test_spectral_loss_zero_modulus_gradient_is_zero_like_autograd():
    """|P| = 0 at the zero frequency of a zero-mean field: autograd of abs gives 0 there."""
    pred = randn(1, 2, 8, 8)
    pred = (pred - pred.mean((-2, -1), keepdim=True)).requires_grad_()
    target = randn(1, 2, 8, 8)
    check_fwd_bwd(lambda p, t: tr.spectral_loss(p, t, 1.0), lambda p, t: ik.spectral_loss_ref(p, t, 1.0),
                  (pred, target), torch.float32)


# ---------------------------------------------------------------------------------------------
# spectral convolution
# ---------------------------------------------------------------------------------------------
CONV_CASES = [  # (B, C_in, C_out, H, W, m1, m2)
    (2, 3, 4, 5, 7, 2, 3),
    (1, 2, 3, 9, 12, 4, 7),  # 2*m1 < H; m2 = W//2+1 (every column, Nyquist included)
    (2, 3, 2, 33, 47, 5, 6),
    (1, 2, 2, 8, 6, 4, 4),  # 2*m1 = H: the two row blocks meet
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_conv2d(case, dtype):
    B, Ci, Co, H, W, m1, m2 = case
    x = randn(B, Ci, H, W, dtype=dtype, requires_grad=True)
    w = randn(Ci, Co, 2 * m1, m2, dtype=COMPLEX[dtype], requires_grad=True)
    check_fwd_bwd(lambda a, b: ik.spectral_conv2d(a, b, backend="triton"), ik.spectral_conv2d_ref, (x, w), dtype)


def test_spectral_conv2d_strided_input_and_conjugate_weight():
    x = randn(2, 3, 9, 12, strided=True, requires_grad=True)
    base = randn(4, 3, 6, 5, dtype=torch.complex64)
    w = base.transpose(0, 1).conj().requires_grad_()  # a transposed, lazily conjugated view
    assert not w.is_contiguous() and w.is_conj()
    check_fwd_bwd(tr.spectral_conv2d, ik.spectral_conv2d_ref, (x, w), torch.float32)


def test_spectral_conv2d_grad_of_weight_only():
    x, w = randn(2, 3, 9, 12), randn(3, 2, 4, 5, dtype=torch.complex64, requires_grad=True)
    (gw,) = torch.autograd.grad(tr.spectral_conv2d(x, w).square().sum(), (w,))
    (ew,) = torch.autograd.grad(ik.spectral_conv2d_ref(x, w).square().sum(), (w,))
    close(gw, ew)


# odd sizes, channel counts not powers of two, 2*m1 < H, m2 < W//2+1; the mixing loop takes 1 input
# channel per step forward (5 channels), 4 backward (12)
ODD_CASE = (3, 5, 12, 11, 13, 3, 4)


@pytest.mark.parametrize(("dtype", "gpu_config"), [(torch.float32, False), (torch.float64, False),
                                                   (torch.float32, True)], ids=["f32", "f64", "f32-gpu-config"])
def test_mix_into_writes_every_entry_of_a_poisoned_spectrum(dtype, gpu_config, monkeypatch):
    """With zeroed=False the mixing launch writes the whole spectrum: the kept modes (= the mixing)
    and exact zeros everywhere else, over a NaN-filled buffer; with the default (a zeroed buffer,
    kept modes only) the same bits. gpu_config: the GPU tiles and 64-float zero chunks (87 forward,
    37 backward: unmasked ones between the kept rows, masked ones, ones across two planes)."""
    if gpu_config:
        monkeypatch.setattr(tr_conv, "INTERPRET", False)
        monkeypatch.setattr(tr_conv, "ZERO_BLOCK", 64)
    _check_mix_writes_every_entry(ODD_CASE, dtype)


@pytest.mark.parametrize("case", CONV_CASES)
def test_mix_into_zero_chunks_at_the_layer_cases(case, monkeypatch):
    """The same with the GPU tiles and 32-float zero chunks at every layer case: all rows kept (2*m1 =
    H), every column kept (m2 = W//2+1), chunks shorter than a row and spanning planes."""
    monkeypatch.setattr(tr_conv, "INTERPRET", False)
    monkeypatch.setattr(tr_conv, "ZERO_BLOCK", 32)
    _check_mix_writes_every_entry(case, torch.float32)


def _check_mix_writes_every_entry(case, dtype):
    B, Ci, Co, H, W, m1, m2 = case
    Wr, cdt = W // 2 + 1, COMPLEX[dtype]
    rows = [*range(m1), *range(H - m1, H)]
    kept = torch.zeros(H, Wr, dtype=torch.bool, device=DEVICE)
    kept[rows, :m2] = True
    X = torch.fft.rfft2(randn(B, Ci, H, W, dtype=dtype), norm="forward")
    G = torch.fft.rfft2(randn(B, Co, H, W, dtype=dtype))
    w = randn(Ci, Co, 2 * m1, m2, dtype=cdt)
    for a, wt, conj_transpose in ((X, w, False), (G, w.transpose(0, 1).conj(), True)):
        want = torch.zeros(B, wt.shape[1], H, Wr, dtype=cdt, device=DEVICE)
        want[:, :, rows, :m2] = torch.einsum("bixy,ioxy->boxy", a[:, :, rows, :m2], wt)
        out = torch.full_like(want, complex(float("nan"), float("nan")))
        tr_conv._mix_into(out, a, w, m1, m2, conj_transpose=conj_transpose, zeroed=False)
        assert torch.equal(out[:, :, ~kept], torch.zeros_like(out[:, :, ~kept]))
        close(out[:, :, kept], want[:, :, kept])
        zeroed = torch.zeros_like(want)
        tr_conv._mix_into(zeroed, a, w, m1, m2, conj_transpose=conj_transpose)
        assert torch.equal(zeroed, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_conv2d_fused_zero_and_zero_filled_paths_agree(dtype, monkeypatch):
    """FUSED_ZERO (torch.empty spectra, zeros written by the mixing launch) and the former path
    (torch.zeros, kept modes only): both equal to the reference, forward and backward, and to
    each other bit for bit."""
    B, Ci, Co, H, W, m1, m2 = ODD_CASE
    x = randn(B, Ci, H, W, dtype=dtype, requires_grad=True)
    w = randn(Ci, Co, 2 * m1, m2, dtype=COMPLEX[dtype], requires_grad=True)
    g = randn(B, Co, H, W, dtype=dtype)
    ref = ik.spectral_conv2d_ref(x, w)
    want = (ref, *torch.autograd.grad(ref, (x, w), g))
    got = {}
    for fused in (True, False):
        monkeypatch.setattr(tr_conv, "FUSED_ZERO", fused)
        y = tr.spectral_conv2d(x, w)
        got[fused] = (y, *torch.autograd.grad(y, (x, w), g))
        for a, e in zip(got[fused], want):
            close(a, e, dtype)
    for a, b in zip(got[True], got[False]):
        assert torch.equal(a, b)


# the truncated-DFT kernels (irno_kernels/triton/spectral_dft.py)
DFT_CASES = CONV_CASES + [(2, 3, 4, 37, 50, 8, 12), (2, 2, 3, 6, 1, 3, 1), (2, 4, 3, 40, 64, 4, 16)]


@pytest.fixture
def dft_everywhere(monkeypatch):
    """The Triton backend's routing takes the dft kernels for every float32 field."""
    from irno_kernels import spectral_dft

    monkeypatch.setattr(spectral_dft, "prefer_dft", lambda x, w: True)


@pytest.mark.parametrize("mix", ["einsum", "triton"])
@pytest.mark.parametrize("case", DFT_CASES)
def test_spectral_conv2d_dft_kernels(case, mix, dft_everywhere, monkeypatch):
    monkeypatch.setattr(tr_dft, "COMPACT_MIX", mix)  # the compact spectra mixed by einsum or Triton
    B, Ci, Co, H, W, m1, m2 = case
    x = randn(B, Ci, H, W, requires_grad=True)
    w = randn(Ci, Co, 2 * m1, m2, dtype=torch.complex64, requires_grad=True)
    calls = []
    real = tr_dft.spectral_conv2d_dft
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr_dft, "spectral_conv2d_dft", lambda *a: calls.append(1) or real(*a))
        check_fwd_bwd(lambda a, b: ik.spectral_conv2d(a, b, backend="triton"), ik.spectral_conv2d_ref, (x, w),
                      torch.float32, factor=2)
    assert calls  # the dft kernels ran


def test_spectral_conv2d_dft_kernels_route_and_limits(dft_everywhere):
    x64 = randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    w64 = randn(2, 2, 4, 3, dtype=torch.complex128, requires_grad=True)
    check_fwd_bwd(tr.spectral_conv2d, ik.spectral_conv2d_ref, (x64, w64), torch.float64)  # FFT route
    assert tr_dft.fits(torch.empty(1, 1, 64, 32)) and not tr_dft.fits(torch.empty(1, 1, 66, 8))
    x = randn(1, 2, 70, 20, requires_grad=True)
    w = randn(2, 2, 66, 5, dtype=torch.complex64, requires_grad=True)  # too many rows: the FFT route
    check_fwd_bwd(tr.spectral_conv2d, ik.spectral_conv2d_ref, (x, w), torch.float32)


def test_dft_transforms_are_adjoint_pairs():
    """<G x, z> = <x, G^H z> for both maps, i.e. the backward kernels are the exact adjoints."""
    H, W, m1, m2 = 11, 14, 3, 5
    x = randn(2, H, W)
    z = randn(2, 2 * m1, m2, dtype=torch.complex64)
    gx = tr_dft.grid_to_modes(x, m1, m2)
    torch.testing.assert_close(gx, torch.fft.rfft2(x, norm="forward")[..., [*range(m1), *range(H - m1, H)], :m2],
                               rtol=1e-5, atol=1e-6)
    xr = x.clone().requires_grad_()
    (adj,) = torch.autograd.grad(tr_dft.grid_to_modes(xr, m1, m2), xr, z)
    lhs = (torch.conj(gx) * z).real.sum()  # Re <G x, z>
    torch.testing.assert_close(lhs, (x * adj).sum(), rtol=1e-4, atol=1e-5)
    zr = z.clone().requires_grad_()
    y = tr_dft.modes_to_grid(zr, H, W)
    (adj_z,) = torch.autograd.grad(y, zr, x)
    torch.testing.assert_close((y * x).sum(), (torch.conj(z) * adj_z).real.sum(), rtol=1e-4, atol=1e-5)


# 16-bit fields (bfloat16/float16; on CPU through the interpreter): stored in 16 bits, computed in
# float32, outputs and input gradients in the field's dtype (complex64 weights and their gradients)
LOW_PRECISION = [torch.bfloat16, torch.float16]


def _low_precision_errors(fn, ref, inputs, dtype):
    """[(ours, torch's, scale)] for the output and each input gradient: the max error against ``ref``
    in float64 on the same rounded inputs of ``fn`` on the 16-bit ``inputs``, and of ``ref`` on
    float32 copies with the results rounded to ``dtype`` (what a PyTorch computation of a 16-bit
    spectrum gives: its FFTs take no bfloat16); scale: the largest exact value. One grad_output, in
    ``dtype``. Complex inputs (weights) stay complex64 (complex128 for the exact run). Checks ours'
    dtypes."""

    def widen(real, cplx):
        return [a.detach().to(cplx if a.is_complex() else real) for a in inputs]

    def run(f, args, g):
        leaves = [a.requires_grad_() for a in args]
        out = f(*leaves)
        return (out.detach(), *torch.autograd.grad(out, leaves, g.to(out.dtype)))

    exact_in = widen(torch.float64, torch.complex128)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    g = torch.randn(ref(*exact_in).shape, dtype=torch.float64, device=DEVICE, generator=gen).to(dtype).double()
    ours = run(fn, [a.detach() for a in inputs], g)
    low = run(ref, widen(torch.float32, torch.complex64), g)
    exact = run(ref, exact_in, g)
    result = []
    for k, (o, lp, e) in enumerate(zip(ours, low, exact)):
        real = not e.is_complex()
        assert o.dtype == (dtype if real else torch.complex64), (k, o.dtype)
        lp = lp.to(dtype) if real else lp
        result.append(((o.to(e.dtype) - e).abs().max().item(), (lp.to(e.dtype) - e).abs().max().item(),
                       e.abs().max().item()))
    return result


def _low_precision_cases(dtype):
    """name -> (fn on the triton backend, its reference, 16-bit inputs): odd shapes, both routes of
    spectral_conv2d."""
    x, t = randn(2, 3, 11, 13).to(dtype), randn(2, 3, 11, 13).to(dtype)
    w = randn(3, 4, 6, 4, dtype=torch.complex64) / 3

    def loss(mode, backend):
        return lambda a, b: ik.spectral_loss(a, b, 1.5, 0.5, mode, backend=backend)

    return {
        "spectral_conv2d[fft]": (lambda a, b: ik.spectral_conv2d(a, b, backend="triton"), ik.spectral_conv2d_ref,
                                 (x, w)),
        "spectral_conv2d[dft]": (tr_dft.spectral_conv2d_dft, ik.spectral_conv2d_ref, (x, w)),
        "radial_spectrum": (lambda a: ik.radial_spectrum(a, backend="triton"), ik.radial_spectrum_ref, (x,)),
        "spectral_loss[magnitude]": (loss("magnitude", "triton"), loss("magnitude", "reference"), (x, t)),
        "spectral_loss[error]": (loss("error", "triton"), loss("error", "reference"), (x, t)),
    }


@pytest.mark.parametrize("name", list(_low_precision_cases(torch.float32)))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
def test_low_precision_fields_within_twice_torch_error(name, dtype):
    """The 16-bit rule of the CUDA kernels (tests/test_spectral_conv.py, test_spectrum.py) for the
    Triton ones: error against float64 at most twice that of the float32 computation rounded to the
    16-bit dtype, output and every gradient. The interpreter rounds float32 -> bfloat16 stores
    toward zero (GPUs: to nearest), up to twice the error: there the dft route's bfloat16 y and
    grad_x get 4x (a dropped conversion or term would be off by the size of the values)."""
    fn, ref, inputs = _low_precision_cases(dtype)[name]
    factor = 4 if (tr.INTERPRET and dtype == torch.bfloat16 and name.endswith("[dft]")) else 2
    for k, (ours, torch_err, scale) in enumerate(_low_precision_errors(fn, ref, inputs, dtype)):
        assert ours <= factor * torch_err + 1e-5 * scale, (k, ours, torch_err, scale)


def test_low_precision_dft_route_reads_and_writes_16_bits(dft_everywhere):
    """The routing sends 16-bit fields to the dft kernels as well (no float32 copy of x or y); the
    transforms refuse other dtypes by name."""
    x = randn(2, 3, 11, 13).to(torch.bfloat16).requires_grad_()
    w = (randn(3, 4, 6, 4, dtype=torch.complex64) / 3).requires_grad_()
    calls = []
    real = tr_dft.spectral_conv2d_dft
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr_dft, "spectral_conv2d_dft", lambda *a: calls.append(1) or real(*a))
        y = ik.spectral_conv2d(x, w, backend="triton")
    assert calls and y.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.complex64
    z = tr_dft.grid_to_modes(x.detach(), 3, 4)
    assert z.dtype == torch.complex64
    assert tr_dft.modes_to_grid(z, 11, 13, torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match=r"x: expected dtype in .*got torch.float64"):
        tr_dft.grid_to_modes(x.detach().double(), 3, 4)
    with pytest.raises(ValueError, match=r"dtype: expected one of .*got torch.float64"):
        tr_dft.modes_to_grid(z, 11, 13, torch.float64)


def test_low_precision_still_refused_by_the_reference_and_cpu_backends():
    x = randn(2, 3, 8, 8).to(torch.bfloat16)
    w = randn(3, 2, 4, 3, dtype=torch.complex64)
    for backend in ("reference", "cpu") if bk.HAS_C else ("reference",):
        if not ik.available("spectral_conv2d", backend, x.device):
            continue
        with pytest.raises(ValueError, match=rf"x: expected dtype .*'{backend}' backend.*'triton' backend"):
            ik.spectral_conv2d(x, w, backend=backend)
        with pytest.raises(ValueError, match=rf"pred: expected dtype .*'{backend}' backend"):
            ik.spectral_loss(x, x, 1.0, backend=backend)


# the DFT route's mixing of the compact spectra by the Triton mixing kernels (COMPACT_MIX = "triton")
COMPACT_CASES = [(2, 3, 4, 2, 3), (3, 5, 12, 3, 4), (17, 2, 33, 1, 9)]  # (B, C_in, C_out, m1, m2)


def _compact(case, requires_grad=True):
    """Compact spectra X (B, C_in, 2*m1, m2) and a weight given as a conjugated, transposed view."""
    B, Ci, Co, m1, m2 = case
    X = randn(B, Ci, 2 * m1, m2, dtype=torch.complex64, requires_grad=requires_grad)
    w = randn(Co, Ci, 2 * m1, m2, dtype=torch.complex64).transpose(0, 1).conj().requires_grad_(requires_grad)
    assert w.is_conj() and not w.is_contiguous()
    return X, w


@pytest.mark.parametrize("case", COMPACT_CASES)
def test_compact_mix_triton_matches_einsum(case, monkeypatch):
    """Forward and both gradients (the Triton kernels, which ran) against torch.einsum's."""
    calls = []
    real = tr_conv._mix_into
    monkeypatch.setattr(tr_conv, "_mix_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    X, w = _compact(case)
    check_fwd_bwd(lambda a, b: tr_dft.compact_mix(a, b, "triton"), lambda a, b: tr_dft.compact_mix(a, b, "einsum"),
                  (X, w), torch.complex64)
    assert len(calls) == 2  # the forward and the input gradient (the weight's has its own kernel)
    with pytest.raises(ValueError, match="how: expected 'einsum' or 'triton', got 'bmm'"):
        tr_dft.compact_mix(X, w, "bmm")


def test_compact_mix_triton_under_torch_compile():
    """fullgraph aot_eager: the registered ops, their fake kernels and autograd."""
    X, w = _compact(COMPACT_CASES[0])
    compiled = torch.compile(lambda a, b: tr_dft.compact_mix(a, b, "triton"), backend="aot_eager", fullgraph=True)
    check_fwd_bwd(compiled, lambda a, b: tr_dft.compact_mix(a, b, "einsum"), (X, w), torch.complex64)


def test_compact_mix_triton_second_derivatives():
    """A backward that is differentiated (create_graph) uses torch's formulas: the second derivatives
    equal einsum's."""
    X, w = _compact(COMPACT_CASES[1])

    def second(how):
        S = tr_dft.compact_mix(X, w, how)
        g = torch.autograd.grad(torch.view_as_real(S).pow(3).sum(), (X, w), create_graph=True)
        return torch.autograd.grad(sum(torch.view_as_real(t).square().sum() for t in g), (X, w))

    for a, e in zip(second("triton"), second("einsum")):
        close(a, e, torch.complex64, factor=10)


#: aten ops that launch no kernel: allocations, views, metadata
_NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "as_strided",
              "t", "transpose", "permute", "expand", "view_as_real", "view_as_complex", "detach", "alias",
              "resolve_conj", "_conj", "conj", "unsqueeze", "squeeze", "slice", "select", "lift_fresh", "ones_like",
              "empty_like", "is_same_size", "_has_compatible_shallow_copy_type"}


def test_dft_layer_eager_fwd_bwd_launches_only_its_kernels(dft_everywhere, monkeypatch):
    """At cb16083 the Triton DFT layer's forward + backward was host-bound on an H200 (2.27 ms of wall
    time for 1.05 ms of kernels, 25 kernels): with the compact spectra mixed by Triton and the
    adjoint matrices cached, eager forward + backward dispatches no torch computation at all, only
    allocations and views around its 7 Triton launches (3 forward, 4 backward)."""
    monkeypatch.setattr(tr_dft, "COMPACT_MIX", "triton")
    x = randn(2, 3, 11, 13, requires_grad=True)
    w = (randn(3, 4, 6, 4, dtype=torch.complex64) / 3).requires_grad_()
    g = randn(2, 4, 11, 13)
    y = ik.spectral_conv2d(x, w, backend="triton")  # the matrices made and cached (torch ops, once)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    launches = []
    with pytest.MonkeyPatch.context() as mp:  # launches recorded, not run (the interpreter runs torch ops)
        for mod in (tr_dft, tr_conv):
            mp.setattr(mod, "launch", lambda kernel, *a, **k: launches.append(kernel.__name__))
        with _OpLog() as log:
            torch.autograd.grad(ik.spectral_conv2d(x, w, backend="triton"), (x, w), g)
    computed = sorted({n.split("::")[1].split(".")[0] for n in log.names} - _NO_KERNEL)
    assert computed == [], computed
    assert sorted(launches) == sorted(["_grid_to_modes_kernel", "_spectral_mix_kernel", "_modes_to_grid_kernel",
                                       "_grid_to_modes_kernel", "_spectral_mix_kernel",
                                       "_spectral_mix_grad_w_kernel", "_modes_to_grid_kernel"]), launches
    want = ik.spectral_conv2d_ref(x, w)
    for a, e in zip((y, gx, gw), (want, *torch.autograd.grad(want, (x, w), g))):
        close(a, e, factor=2)


# launch configurations of the DFT kernels (tr_dft.CONFIG): every alternative that
# benchmarks/tune_dft.py times computes the same layer, forward and backward, including grid_to_modes
# cut into bands of rows; with the GPU tilings (INTERPRET switched off in the module)
@pytest.fixture
def gpu_tiles(monkeypatch):
    monkeypatch.setattr(tr_dft, "INTERPRET", False)
    monkeypatch.setattr(tr_dft, "CONFIG", {k: {p: dict(c) for p, c in v.items()} for k, v in tr_dft.CONFIG.items()})
    return tr_dft.CONFIG


@pytest.mark.parametrize("split,bh,bw,parts", [(1, 32, 64, 1), (2, 16, 64, 1), (3, 16, 32, 1), (8, 32, 128, 1),
                                               (1, 32, 64, 2), (3, 16, 32, 2)])
def test_grid_to_modes_bands_and_tiles_match_the_reference(gpu_tiles, split, bh, bw, parts):
    """H = 70 rows and W = 45 columns: bands of whole tiles, the last one short (16-row tiles in 3
    bands: 32, 32 and 6 rows); more bands asked for than there are tiles: one band per tile; the real
    and imaginary columns in programs of their own (PARTS = 2), alone and with bands."""
    assert tr_dft._precision() == "tf32x3"  # float32 with PyTorch's TF32 switch off: the accurate mode
    gpu_tiles["grid_to_modes"]["tf32x3"].update(SPLIT=split, BH=bh, BW=bw, PARTS=parts)
    gpu_tiles["modes_to_grid"]["tf32x3"].update(BH=bh, BW=bw)
    H, W, m1, m2 = 70, 45, 5, 7
    bands, per = tr_dft._split(H, bh)
    assert bands <= split and per % bh == 0 and (bands - 1) * per < H <= bands * per
    x = torch.randn(2, 3, H, W, device=DEVICE)
    z = tr_dft.grid_to_modes(x, m1, m2)
    want = torch.fft.rfft2(x, norm="forward")[..., [*range(m1), *range(H - m1, H)], :m2]
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the whole layer, forward and both gradients, against the reference
    xr = x[:1].clone().requires_grad_()
    w = (torch.randn(3, 2, 2 * m1, m2, dtype=torch.complex64, device=DEVICE) / 3).requires_grad_()
    y = tr_dft.spectral_conv2d_dft(xr, w)
    ref = ik.spectral_conv2d_ref(xr, w)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.detach().abs().max()))
    g = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(y, (xr, w), g), torch.autograd.grad(ref, (xr, w), g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def test_tune_dft_smoke_run_agrees(capsys):
    """benchmarks/tune_dft.py on CPU: the interpreter runs a tiny shape under two alternatives per
    kernel and mixing setting; every alternative agrees with the current configuration (exit status
    0) and the summary names the best per kernel and precision."""
    if DEVICE != "cpu":
        pytest.skip("the smoke run is the CPU (interpreter) mode; gpu_check.sh runs the sweep on a GPU")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import tune_dft
    finally:
        sys.path.pop(0)
    assert tune_dft.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "best per kernel and precision" in out
    for kernel in ("grid_to_modes", "modes_to_grid"):
        assert out.count(kernel) >= 4, out
    # the mixing kernel's settings: the current ones and MIX_UNROLL 1 (4 is the current one's at C=4)
    assert out.count("mix forward") >= 3 and out.count("mix input grad") >= 3, out
    assert tr_dft.INTERPRET and tr_conv.INTERPRET  # restored after the run


# ---------------------------------------------------------------------------------------------
# eager fast path: outside tracing the public functions run the ops' plain functions and autograd
# formulas without the registered ops (_lib.with_autograd, _lib.mutate); tracing sees the ops
# ---------------------------------------------------------------------------------------------
class _OpLog(TorchDispatchMode):
    """Records the ops dispatched while active (``namespace::name.overload``). A plain mode, not a
    tracing one: the eager path stays eager under it, and a registered op shows up as ``irno_triton::``."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(f"{func.namespace}::{func.__name__}")
        return func(*args, **(kwargs or {}))

    def registered(self):
        return [n for n in self.names if n.startswith(f"{tr.NAMESPACE}::")]


def _fast_path_cases(shape, dtype):
    """name -> (public function, the same through the registered ops, reference, inputs)."""
    B, C, H, W = shape
    F, m1, m2 = 4, min(2, H // 2), min(3, W // 2 + 1)
    h, phi = randn(*shape, dtype=dtype, strided=True), randn(*shape, dtype=dtype)
    z, w, b = randn(B, F, H, W, dtype=dtype), randn(C, F, dtype=dtype), randn(C, dtype=dtype)
    cw = randn(C, 2, 2 * m1, m2, dtype=COMPLEX[dtype])
    cases = {
        "residual_update": (lambda *a: tr.residual_update(*a, 0.3), lambda *a: ops.residual_update(*a, 0.3),
                            lambda *a: ik.residual_update_ref(*a, 0.3), (h, phi)),
        "refine_update": (lambda *a: tr.refine_update(*a, 0.3), lambda *a: ops.refine_update(*a, 0.3),
                          lambda *a: ik.refine_update_ref(*a, 0.3), (h, z, w, b)),
        "refine_update[no bias]": (lambda *a: tr.refine_update(*a, None, 0.3),
                                   lambda *a: ops.refine_update(*a, None, 0.3),
                                   lambda *a: ik.refine_update_ref(*a, None, 0.3), (h, z, w)),
        "radial_spectrum": (tr.radial_spectrum, lambda x: ops.radial_spectrum(x)[0], ik.radial_spectrum_ref, (h,)),
        "spectral_conv2d": (tr.spectral_conv2d, lambda x, cw: ops.spectral_conv2d(x, cw)[0],
                            ik.spectral_conv2d_ref, (h, cw)),
    }
    if dtype == torch.float32:  # the truncated-DFT route (float32 only), its two transforms as ops
        fwd, inv = tr_dft._matrices(H, W, m1, m2, DEVICE)[:2]

        def dft_ops(x, cw):
            modes = ops.dft_mix(ops.dft_grid_to_modes(x, *fwd), cw)
            return ops.dft_modes_to_grid(modes, *inv, x.dtype)

        cases["spectral_conv2d[dft]"] = (tr_dft.spectral_conv2d_dft, dft_ops, ik.spectral_conv2d_ref, (h, cw))
    return cases


FAST_PATH_CASES = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}") for dtype in (torch.float32, torch.float64)
                   for name in _fast_path_cases((2, 3, 5, 7), dtype)]


@pytest.mark.parametrize("name,dtype", FAST_PATH_CASES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 9, 12)])
@pytest.mark.parametrize("grads", ["all", "some", "none"])
def test_eager_fast_path_skips_the_registered_ops(name, shape, dtype, grads):
    """Forward and backward in eager mode dispatch no registered op, and give bit for bit what the
    registered ops give (the same kernels and formulas), within tolerance the reference's; inputs
    that do not require grad get no gradient."""
    fast, registered, ref, inputs = _fast_path_cases(shape, dtype)[name]
    need = [grads == "all" or (grads == "some" and k == len(inputs) - 1) for k in range(len(inputs))]
    inputs = tuple(t.requires_grad_(n) for t, n in zip(inputs, need))
    leaves = [t for t in inputs if t.requires_grad]
    with _OpLog() as log:
        out = fast(*inputs)
        assert out.requires_grad == bool(leaves)
        gy = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, gy) if leaves else ()
    assert log.registered() == [], "the eager path went through a registered op"
    with _OpLog() as log:  # the log sees the registered ops where they are called
        want = registered(*inputs)
        exp = torch.autograd.grad(want, leaves, gy) if leaves else ()
    assert log.registered()
    assert out.dtype == want.dtype and torch.equal(out, want)
    assert len(got) == len(exp) and all(torch.equal(g, e) for g, e in zip(got, exp))
    if leaves:
        check_fwd_bwd(fast, ref, inputs, dtype, factor=10)
    else:
        close(out, ref(*inputs), dtype, factor=10)
    with torch.no_grad():  # without autograd: the plain function, the same values
        assert torch.equal(fast(*inputs), out)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 9, 12), (1, 2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_in_place_forms_skip_the_registered_ops(shape, dtype):
    """The in-place forms in eager mode: no registered op dispatched, h written in place with the
    registered op's values (5-D h: computed aside and copied back), h's version counter bumped, and
    the op's autograd behaviour: nothing recorded, no error for h a leaf that requires grad, a backward
    that saved h's old value raises."""
    B, C, *S = shape
    z, w, b = randn(B, 4, *S, dtype=dtype), randn(C, 4, dtype=dtype), randn(C, dtype=dtype)
    phi = randn(*shape, dtype=dtype, strided=True)
    forms = [(tr.residual_update_, ops.residual_update_, ik.residual_update_ref, (phi, 0.7)),
             (tr.refine_update_, ops.refine_update_, ik.refine_update_ref, (z, w, b, 0.3)),
             (tr.refine_update_, ops.refine_update_, ik.refine_update_ref, (z, w, None, 0.3))]
    for fast, registered, ref, args in forms:
        h = randn(*shape, dtype=dtype, strided=True)
        want = ref(h, *args)
        h_op = h.clone()
        registered(h_op, *args)
        ptr, version = h.data_ptr(), h._version
        with _OpLog() as log:
            assert fast(h, *args) is h
        assert log.registered() == []
        assert h.data_ptr() == ptr and h._version > version
        assert torch.equal(h, h_op)
        close(h, want)
        for run in (fast, registered):  # autograd: the fast path behaves as the registered op
            leaf = randn(*shape, dtype=dtype, requires_grad=True)
            run(leaf, *args)
            assert leaf.is_leaf and leaf.grad_fn is None
            a = randn(*shape, dtype=dtype, requires_grad=True)
            saved = randn(*shape, dtype=dtype)
            loss = (a * saved).sum()  # mul saves its other operand
            run(saved, *args)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()


def test_eager_double_backward_behaves_as_the_registered_ops():
    """With create_graph=True the eager backward records the registered backward ops: a second
    backward through a kernel-computed gradient is differentiated as under the registered forward
    (the update's backward ops have exact derivatives), or raises as it does there (the plain
    launches would give gradients silently cut from the graph); the identity gradient of h and the
    DFT transforms (whose backward ops have autograd) stay differentiable."""
    h, phi = randn(2, 3, 5, 7, requires_grad=True), randn(2, 3, 5, 7, requires_grad=True)
    gy = randn(2, 3, 5, 7, requires_grad=True)
    for f in (tr.residual_update, ops.residual_update):
        gh, gphi = torch.autograd.grad(f(h, phi, 0.3), (h, phi), gy, create_graph=True)
        assert gh.requires_grad and gphi.requires_grad
        torch.testing.assert_close(torch.autograd.grad(gh.sum(), gy)[0], torch.ones_like(gy))
        torch.testing.assert_close(torch.autograd.grad(gphi.sum(), gy)[0], torch.full_like(gy, 0.3))
    x = randn(2, 3, 9, 12, requires_grad=True)
    (gx,) = torch.autograd.grad(tr.radial_spectrum(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        gx.sum().backward()
    H, W, m1, m2 = 9, 12, 2, 3
    gz = randn(2, 3, 2 * m1, m2, dtype=torch.complex64, requires_grad=True)
    v = randn(2, 3, H, W)
    seconds = []
    for f in (lambda t: tr_dft.grid_to_modes(t, m1, m2),
              lambda t: ops.dft_grid_to_modes(t, *tr_dft._matrices(H, W, m1, m2, DEVICE)[0])):
        with _OpLog() as log:
            (gx,) = torch.autograd.grad(f(x), x, gz, create_graph=True)
        seconds.append(torch.autograd.grad(gx, gz, v)[0])  # d<gx, v>/dgz = G v
        assert "irno_triton::dft_modes_to_grid.default" in log.registered()
    assert torch.equal(*seconds)
    torch.testing.assert_close(seconds[0], tr_dft.grid_to_modes(v, m1, m2))


def test_meta_tensors_take_the_registered_ops():
    """Meta tensors hold no data to launch on: the public functions call the registered ops, whose
    fake kernels give the results' shapes, forward and backward."""
    h, z = torch.empty(2, 3, 5, 7, device="meta"), torch.empty(2, 4, 5, 7, device="meta", requires_grad=True)
    w, cw = torch.empty(3, 4, device="meta"), torch.empty(3, 2, 4, 3, dtype=torch.complex64, device="meta")
    with _OpLog() as log:
        y = tr.refine_update(tr.residual_update(h, h, 0.3), z, w, None, 0.2)
        e, s = tr.radial_spectrum(y), tr.spectral_conv2d(y, cw)
        (gz,) = torch.autograd.grad(e.sum() + s.sum(), z)
        assert tr.residual_update_(h, h, 0.3) is h and tr.refine_update_(h, z.detach(), w, None, 0.3) is h
    assert y.is_meta and y.shape == h.shape and e.shape == (2, 3, num_shells(5, 7)) and s.shape == (2, 2, 5, 7)
    assert gz.is_meta and gz.shape == z.shape
    assert {"residual_update", "refine_update", "radial_spectrum", "spectral_conv2d", "residual_update_",
            "refine_update_"} <= {n.split("::")[1].split(".")[0] for n in log.registered()}


def test_torch_compile_traces_the_registered_ops():
    """Under torch.compile the public functions call the registered ops (Inductor must see them):
    their names stand in the forward and backward graphs, and the results are eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = []

    def record(gm, _inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    h, phi = randn(2, 3, 5, 7, requires_grad=True), randn(2, 3, 5, 7, strided=True, requires_grad=True)
    z, w, b = randn(2, 4, 5, 7, requires_grad=True), randn(3, 4, requires_grad=True), randn(3, requires_grad=True)
    cw = randn(3, 3, 4, 3, dtype=torch.complex64, requires_grad=True)

    def step(h, phi, z, w, b, cw):
        y = tr.refine_update(tr.residual_update(h, phi, 0.5), z, w, b, 0.2)
        return (tr.radial_spectrum(y).mean() + tr.spectral_conv2d(y, cw).square().mean()
                + tr_dft.spectral_conv2d_dft(y, cw).square().mean())

    inputs = (h, phi, z, w, b, cw)
    out = torch.compile(step, backend=backend, fullgraph=True)(*inputs)
    got = torch.autograd.grad(out, inputs)
    want = step(*inputs)
    close(out, want)
    for g, e in zip(got, torch.autograd.grad(want, inputs)):
        close(g, e, factor=10)

    def in_place(h, phi, z, w, b):
        h = h.clone()
        tr.residual_update_(h, phi, 0.7)
        tr.refine_update_(h, z, w, b, 0.3)
        return h

    plain = [t.detach() for t in (h, phi, z, w, b)]
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(in_place, backend=backend, fullgraph=True)(*plain),
                                   in_place(*plain), rtol=0, atol=0)
    code = "\n".join(graphs)
    for op in ("residual_update", "residual_update_grad_phi", "refine_update", "refine_update_grad_z",
               "refine_update_grad_weight_bias", "radial_spectrum", "radial_spectrum_backward", "spectral_conv2d",
               "spectral_conv2d_backward", "dft_grid_to_modes", "dft_modes_to_grid", "residual_update_",
               "refine_update_"):
        assert f"{tr.NAMESPACE}.{op}.default" in code, op


# ---------------------------------------------------------------------------------------------
# the GPU launch configurations, run through the interpreter
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU every test already runs the GPU configurations")
def test_gpu_launch_configurations_under_the_interpreter(monkeypatch):
    """The configurations chosen for a GPU (small blocks, several programs and chunks per plane,
    shell windows) on shapes that need several of each."""
    for mod in (tr_update, tr_spec, tr_conv):
        monkeypatch.setattr(mod, "INTERPRET", False)
    h, phi = randn(1, 2, 40, 30, requires_grad=True), randn(1, 2, 40, 30, requires_grad=True)
    check_fwd_bwd(lambda a, b: tr.residual_update(a, b, 0.4), lambda a, b: ik.residual_update_ref(a, b, 0.4),
                  (h, phi), torch.float32)
    z, w, b = randn(1, 3, 100, 90, requires_grad=True), randn(2, 3, requires_grad=True), randn(2, requires_grad=True)
    h = randn(1, 2, 100, 90, requires_grad=True)
    check_fwd_bwd(lambda *a: tr.refine_update(*a, 0.4), lambda *a: ik.refine_update_ref(*a, 0.4),
                  (h, z, w, b), torch.float32, factor=10)
    x = randn(1, 1, 70, 100, requires_grad=True)  # 2 row chunks of 8x16 tiles, 4 blocks of 32 shells
    assert tr_spec._radial_config(70, 100, num_shells(70, 100))["R_PAD"] // 32 == 4
    check_fwd_bwd(tr.radial_spectrum, ik.radial_spectrum_ref, (x,), torch.float32)
    y = randn(1, 1, 70, 100)
    for mode in ("magnitude", "error"):
        check_fwd_bwd(lambda p, t, m=mode: tr.spectral_loss(p, t, 1.5, 0.5, m),
                      lambda p, t, m=mode: ik.spectral_loss_ref(p, t, 1.5, 0.5, m), (x, y), torch.float32)
    monkeypatch.setattr(tr_dft, "INTERPRET", False)
    xd = randn(1, 2, 70, 100, requires_grad=True)  # 3 row tiles of 32, 2 column tiles of 64
    wd = randn(2, 3, 16, 12, dtype=torch.complex64, requires_grad=True)
    check_fwd_bwd(tr_dft.spectral_conv2d_dft, ik.spectral_conv2d_ref, (xd, wd), torch.float32, factor=2)
    x = randn(17, 2, 6, 16, requires_grad=True)  # 2 batch blocks
    w = randn(2, 33, 2, 9, dtype=torch.complex64, requires_grad=True)  # 2 mode blocks, 2 channel blocks
    check_fwd_bwd(tr.spectral_conv2d, ik.spectral_conv2d_ref, (x, w), torch.float32)


# ---------------------------------------------------------------------------------------------
# the compiled path, without a GPU: every kernel through triton's compiler down to a cubin
# ---------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from irno_kernels.triton import _lib, norm as N, pad as P, spectral_conv as C, spectral_dft as D, spectrum as S
    from irno_kernels.triton import update as U
    assert not _lib.INTERPRET
    for mod in (C, S, U, N, D, P):
        mod.INTERPRET = False  # the GPU launch configurations

    # counts and sizes that only bound masks or split the program id are not specialised on (a new
    # field shape would otherwise compile the U-Net's kernels anew: _lib's docstring)
    for mod in (N, P, U):
        for name in dir(mod):
            k = getattr(mod, name)
            if name.endswith("_kernel") and isinstance(k, triton.runtime.jit.JITFunction):
                for p in k.params:
                    if p.name in _lib.UNSPECIALISED:
                        assert p.do_not_specialize, (name, p.name)

    def build(kernel, ptrs, consts, fusion=True, num_warps=4, ints=None, aligned=False):
        # ints: types of integer arguments other than i32; aligned: pointers 16-byte aligned, as a
        # launch specialises them (vectorised loads and stores)
        sig = {}
        for p in kernel.params:
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            elif p.name in ptrs:
                sig[p.name] = "*" + ptrs[p.name]
            else:
                sig[p.name] = (ints or {}).get(p.name) or p.annotation_type or "i32"
        attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if p.name in ptrs}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs if aligned else None)
        opts = {"num_warps": num_warps, "enable_fp_fusion": fusion}
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)

    f32 = dict(IS_F64=False)
    build(U._residual_update_kernel, dict(h_ptr="fp32", phi_ptr="fp32", out_ptr="fp32"),
          dict(HAS_H=True, BLOCK=1024, **f32))
    build(U._refine_update_kernel, dict(h_ptr="bf16", z_ptr="bf16", w_ptr="bf16", bias_ptr="bf16", out_ptr="bf16"),
          dict(HAS_H=True, HAS_BIAS=True, CO_PAD=4, BLOCK_N=U._projection_block(1 << 16, 4), **f32))
    build(U._refine_update_wb_kernel, dict(g_ptr="fp32", z_ptr="fp32", pw_ptr="fp32", pb_ptr="fp32"),
          dict(CO_PAD=4, F_PAD=16, BLOCK_N=U._reduction_config(1 << 16, 4)[0], **f32))
    cfg = S._radial_config(128, 384, 273)
    build(S._radial_spectrum_fwd_kernel, dict(x_ptr="fp32", part_ptr="fp32"),
          dict(BH=cfg["BH"], BW=cfg["BW"], RW=cfg["RW"], R_PAD=cfg["R_PAD"], **f32), fusion=False)
    build(S._radial_spectrum_bwd_kernel, dict(x_ptr="fp32", g_ptr="fp32", gx_ptr="fp32"),
          dict(BLOCK=1024, **f32), fusion=False)
    for err in (False, True):
        build(S._spectral_loss_fwd_kernel, dict(p_ptr="fp32", y_ptr="fp32", part_ptr="fp32"),
              dict(ERROR_MODE=err, BLOCK=1024, **f32))
        build(S._spectral_loss_bwd_kernel, dict(p_ptr="fp32", y_ptr="fp32", g_ptr="fp32", gp_ptr="fp32", gy_ptr="fp32"),
              dict(ERROR_MODE=err, NEED_Y=True, BLOCK=1024, **f32))
    # the mixing with its zero programs (B16 C64 m16): both directions, and float64 with a spectrum
    # of over 2^31 floats (n_out an i64)
    bm, bb, bo = C._mix_blocks(16, 16, 64, 32)
    mix = dict(UNROLL=C._unroll(64), BLOCK_Z=C.ZERO_BLOCK)
    for conj in (False, True):
        build(C._spectral_mix_kernel, dict(a_ptr="fp32", w_ptr="fp32", out_ptr="fp32"),
              dict(CONJ_W=conj, BLOCK_M=bm, BLOCK_B=bb, BLOCK_O=bo, **mix, **f32), aligned=True)
    build(C._spectral_mix_kernel, dict(a_ptr="fp64", w_ptr="fp64", out_ptr="fp64"),
          dict(CONJ_W=True, BLOCK_M=bm, BLOCK_B=bb, BLOCK_O=bo, IS_F64=True, **mix), ints=dict(n_out="i64"),
          aligned=True)
    for edge in (True, False):  # the FFT route's column factors, and none (the DFT route's compact spectra)
        build(C._spectral_mix_grad_w_kernel, dict(x_ptr="fp32", g_ptr="fp32", gw_ptr="fp32"),
              dict(BLOCK_M=bm, BLOCK_I=bb, BLOCK_O=bo, EDGE=edge, **f32))
    fp = dict(x_ptr="fp32", ar_ptr="fp32", ai_ptr="fp32", er_ptr="fp32", ei_ptr="fp32", z_ptr="fp32")
    for prec in ("tf32x3", "tf32"):  # each precision's CONFIG, with its warps and stages
        bh, bw, rp, mp = D._blocks(256, 256, 32, 16, "grid_to_modes", prec)
        build(D._grid_to_modes_kernel, fp, dict(PREC=prec, BH=bh, BW=bw, RP=rp, MP=mp, PARTS=1),
              num_warps=D._launch_opts("grid_to_modes", prec)["num_warps"])
        build(D._grid_to_modes_kernel, fp, dict(PREC=prec, BH=bh, BW=bw, RP=rp, MP=mp, PARTS=2))
        bh, bw, rp, mp = D._blocks(256, 256, 64, 32, "modes_to_grid", prec)
        build(D._modes_to_grid_kernel, dict(z_ptr="fp32", pr_ptr="fp32", pi_ptr="fp32", qr_ptr="fp32",
                                            qi_ptr="fp32", y_ptr="fp32"), dict(PREC=prec, BH=bh, BW=bw, RP=rp, MP=mp),
              num_warps=D._launch_opts("modes_to_grid", prec)["num_warps"])
    # 16-bit grids: grid_to_modes reads them, modes_to_grid writes them
    for dt in ("bf16", "fp16"):
        bh, bw, rp, mp = D._blocks(256, 256, 32, 16, "grid_to_modes")
        build(D._grid_to_modes_kernel, {**fp, "x_ptr": dt}, dict(PREC="tf32x3", BH=bh, BW=bw, RP=rp, MP=mp, PARTS=1))
        bh, bw, rp, mp = D._blocks(256, 256, 32, 16, "modes_to_grid")
        build(D._modes_to_grid_kernel, dict(z_ptr="fp32", pr_ptr="fp32", pi_ptr="fp32", qr_ptr="fp32",
                                            qi_ptr="fp32", y_ptr=dt), dict(PREC="tf32x3", BH=bh, BW=bw, RP=rp, MP=mp))
    # the U-Net's fused blocks: GELU, a halo and the conv's bias folded in (in_bias, HAS_S)
    for dt, fused in (("fp32", (False, 0)), ("bf16", (False, 0)), ("fp32", (True, 1)), ("bf16", (True, 1))):
        gelu, halo = fused
        build(N._cln_fwd_kernel, dict(x_ptr=dt, s_ptr="fp32", w_ptr="fp32", b_ptr="fp32", y_ptr=dt,
                                      mean_ptr="fp32", rstd_ptr="fp32"),
              dict(HAS_S=gelu, HAS_W=True, HAS_B=True, C_PAD=16, BLOCK_P=N._block(1 << 16, 16), GELU=gelu,
                   HALO=halo, **f32))
        build(N._cln_bwd_kernel, dict(g_ptr=dt, x_ptr=dt, s_ptr="fp32", w_ptr="fp32", b_ptr="fp32", mean_ptr="fp32",
                                      rstd_ptr="fp32", gx_ptr=dt, pw_ptr="fp32", pb_ptr="fp32", ps_ptr="fp32"),
              dict(HAS_S=gelu, HAS_W=True, HAS_B=True, C_PAD=128, BLOCK_P=N._block(1 << 16, 128, N.BWD_VALUES),
                   GELU=gelu, HALO=halo, **f32), num_warps=N.BWD_WARPS)
    # the bottleneck's 256 channels: the forward (inference) and the backward's tile for them
    build(N._cln_fwd_kernel, dict(x_ptr="fp32", s_ptr="fp32", w_ptr="fp32", b_ptr="fp32", y_ptr="fp32",
                                  mean_ptr="fp32", rstd_ptr="fp32"),
          dict(HAS_S=True, HAS_W=True, HAS_B=True, C_PAD=256, BLOCK_P=N._block(1 << 16, 256), GELU=True, HALO=1,
               **f32), num_warps=N._fwd_warps(256))
    build(N._cln_bwd_kernel, dict(g_ptr="fp32", x_ptr="fp32", s_ptr="fp32", w_ptr="fp32", b_ptr="fp32",
                                  mean_ptr="fp32", rstd_ptr="fp32", gx_ptr="fp32", pw_ptr="fp32", pb_ptr="fp32",
                                  ps_ptr="fp32"),
          dict(HAS_S=True, HAS_W=True, HAS_B=True, C_PAD=256,
               BLOCK_P=N._block(1 << 16, 256, N.BWD_VALUES, N._bwd_min_points(256)), GELU=True, HALO=1, **f32),
          num_warps=N.BWD_WARPS)
    for src, dst, halo in (("fp32", "bf16", 1), ("bf16", "bf16", 1), ("fp32", "fp32", 0)):
        bc, bp = P._blocks(32, 1 << 16)
        build(P._pad_fwd_kernel, dict(x_ptr="fp32", x2_ptr=src, y_ptr=dst), dict(BLOCK_C=bc, BLOCK_P=bp, HALO=halo))
        build(P._pad_bwd_kernel, dict(g_ptr=dst, gx_ptr=src), dict(IS_F64=False, BLOCK_C=bc, BLOCK_P=bp, HALO=halo))
        build(P._up_fwd_kernel, dict(x_ptr=src, y_ptr=dst), dict(IS_F64=False, BLOCK_C=bc, BLOCK_P=bp, HALO=halo),
              num_warps=P.UP_WARPS)
        bc, bp = P._blocks(32, 1 << 16, P.UP_BWD_VALUES)
        build(P._up_bwd_kernel, dict(g_ptr="fp32", gx_ptr=src), dict(IS_F64=False, BLOCK_C=bc, BLOCK_P=bp),
              num_warps=P.UP_WARPS)
    print("ok")
""")


@pytest.mark.skipif(DEVICE != "cpu", reason="a GPU runs the compiled kernels in every other test")
def test_every_kernel_compiles_for_sm90():
    """The interpreter runs kernels as Python and accepts code that triton's compiler rejects:
    compile each kernel (GPU configurations) for sm_90 in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("triton's ptxas is not available")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_kernel_resources_reports_the_dft_kernels_for_sm90():
    """benchmarks/kernel_resources.py --quick (a process without TRITON_INTERPRET): for each DFT kernel
    and precision the current CONFIG and one alternative, and the mixing kernel both ways, compile for
    sm_90, with registers within ptxas's range and a resident-warp count the registers allow."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_resources.py")
    out = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("triton's ptxas is not available")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("grid_to_modes", "modes_to_grid"))]
    assert len(rows) == 8, out.stdout
    assert sum("(current)" in r for r in rows) == 4
    mix = [line.split() for line in out.stdout.splitlines() if line.startswith("mix ")]
    assert len(mix) == 2 and all("(current)" in r for r in mix), out.stdout  # forward, input gradient
    for r in rows + mix:
        regs, spill, smem, warps = int(r[-6]), int(r[-5]), int(r[-4]), int(r[-1])
        assert 16 <= regs <= 255 and spill >= 0 and smem > 0, r
        assert 1 <= warps <= 64 and warps * 32 * regs <= 65536, r


# ---------------------------------------------------------------------------------------------
# determinism, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def test_reductions_are_deterministic():
    x, y = randn(2, 3, 33, 47, requires_grad=True), randn(2, 3, 33, 47)
    z, w = randn(2, 5, 33, 47), randn(3, 5, requires_grad=True)
    h = randn(2, 3, 33, 47)

    def run():
        e = tr.radial_spectrum(x)
        loss = tr.spectral_loss(x, y, 1.5) + e.sum() + tr.refine_update(h, z, w, None, 0.2).square().sum()
        return (e.detach(), loss.detach(), *torch.autograd.grad(loss, (x, w)))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_tf32_switch_is_read_by_the_api_that_set_it():
    """The DFT kernels' precision follows PyTorch's matmul TF32 setting whichever API set it; reading
    the legacy allow_tf32 raises once the new fp32_precision API was used (torch >= 2.9)."""
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has the legacy TF32 switch only")
    saved = m.fp32_precision, getattr(torch.backends, "fp32_precision", None), torch.get_float32_matmul_precision()
    try:
        for setting, want in (("ieee", False), ("tf32", True)):
            m.fp32_precision = setting
            assert tr_dft.matmul_tf32() is want and tr_dft._precision() == ("tf32" if want else "tf32x3")
        torch.set_float32_matmul_precision("highest")
        assert not tr_dft.matmul_tf32()
        m.allow_tf32 = True
        assert tr_dft.matmul_tf32()
        torch.set_float32_matmul_precision("highest")
        m.fp32_precision = "tf32"  # the new API: the legacy read would raise
        assert tr_dft._precision() == "tf32"
    finally:
        m.fp32_precision = saved[0]
        if saved[1] is not None:
            torch.backends.fp32_precision = saved[1]
        torch.set_float32_matmul_precision(saved[2])


def _opcheck_cases():
    h, z = randn(2, 3, 5, 7, requires_grad=True), randn(2, 4, 5, 7, requires_grad=True)
    w, b = randn(3, 4, requires_grad=True), randn(3, requires_grad=True)
    x, y = randn(2, 3, 5, 7, requires_grad=True), randn(2, 3, 5, 7, requires_grad=True)
    cw = randn(3, 2, 4, 3, dtype=torch.complex64, requires_grad=True)
    P = torch.fft.rfft2(x.detach())  # unscaled, as the ops keep it
    X = torch.fft.rfft2(x.detach(), norm="forward")
    g0 = torch.tensor(1.5, device=DEVICE)
    xb, yb = (t.detach().to(torch.bfloat16).requires_grad_() for t in (x, y))
    xh, yh = (t.detach().to(torch.float16).requires_grad_() for t in (x, y))
    return {
        "residual_update": (ops.residual_update, (h, z[:, :3], 0.2)),
        "residual_update_grad_phi": (ops.residual_update_grad_phi, (h.detach(), 0.2)),
        "residual_update_": (ops.residual_update_, (h.detach().clone(), x.detach(), 0.2)),
        "refine_update": (ops.refine_update, (h, z, w, b, 0.2)),
        "refine_update[no bias]": (ops.refine_update, (h, z, w, None, 0.2)),
        "refine_update_grad_z": (ops.refine_update_grad_z, (h.detach(), w.detach(), 0.2)),
        "refine_update_grad_weight_bias": (ops.refine_update_grad_weight_bias, (h.detach(), z.detach(), 0.2)),
        "refine_update_": (ops.refine_update_, (h.detach().clone(), z.detach(), w.detach(), b.detach(), 0.2)),
        "radial_spectrum": (ops.radial_spectrum, (x,)),
        "radial_spectrum_backward": (ops.radial_spectrum_backward, (randn(2, 3, 5), P, 7)),
        "spectral_loss_magnitude": (ops.spectral_loss_magnitude, (x, y, 1.5, 0.5)),
        "spectral_loss_error": (ops.spectral_loss_error, (x, y, 1.5, 0.5)),
        "spectral_loss_magnitude_backward": (ops.spectral_loss_magnitude_backward, (g0, P, 2 * P, 7, 1.5, 0.5, True)),
        "spectral_loss_error_backward": (ops.spectral_loss_error_backward, (g0, P, 7, 1.5, 0.5)),
        "spectral_conv2d": (ops.spectral_conv2d, (x, cw)),
        "spectral_conv2d_backward": (ops.spectral_conv2d_backward,
                                     (randn(2, 2, 5, 7), X, cw.detach(), True, True)),
        "dft_grid_to_modes": (ops.dft_grid_to_modes, (x, *tr_dft._matrices(5, 7, 2, 3, DEVICE)[0])),
        "dft_mix": (ops.dft_mix, _compact(COMPACT_CASES[1])),
        "dft_mix_backward": (ops.dft_mix_backward,
                             (randn(3, 12, 6, 4, dtype=torch.complex64), *_compact(COMPACT_CASES[1], False),
                              True, True)),
        "dft_modes_to_grid": (ops.dft_modes_to_grid,
                              (randn(2, 3, 4, 3, dtype=torch.complex64, requires_grad=True),
                               *tr_dft._matrices(5, 7, 2, 3, DEVICE)[1], torch.float32)),
        # 16-bit fields: read and written in 16 bits
        "dft_grid_to_modes[bf16]": (ops.dft_grid_to_modes, (xb, *tr_dft._matrices(5, 7, 2, 3, DEVICE)[0])),
        "dft_modes_to_grid[bf16 out]": (ops.dft_modes_to_grid,
                                        (randn(2, 3, 4, 3, dtype=torch.complex64, requires_grad=True),
                                         *tr_dft._matrices(5, 7, 2, 3, DEVICE)[1], torch.bfloat16)),
        "radial_spectrum[bf16]": (ops.radial_spectrum, (xb,)),
        "spectral_loss_magnitude[fp16]": (ops.spectral_loss_magnitude, (xh, yh, 1.5, 0.5)),
        "spectral_loss_error[bf16]": (ops.spectral_loss_error, (xb, yb, 1.5, 0.5)),
        "periodic_pad_cat": (ops.periodic_pad_cat,
                             ([x, h.contiguous(memory_format=torch.channels_last)], 1, torch.float32)),
        "periodic_pad_cat[f64 out]": (ops.periodic_pad_cat, ([x], 2, torch.float64)),
        "periodic_pad_fold": (ops.periodic_pad_fold, (randn(2, 3, 7, 9), 1, torch.float32, True)),
        "periodic_upsample2x": (ops.periodic_upsample2x,
                                (x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(), 1,
                                 torch.float32)),
        "periodic_upsample2x_adjoint": (ops.periodic_upsample2x_adjoint, (randn(2, 3, 12, 16), 1, torch.float32,
                                                                          False)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_aot_eager():
    """One graph through every differentiable op, forward and backward (fake kernels + autograd)."""
    x, y = randn(2, 3, 9, 12, requires_grad=True), randn(2, 3, 9, 12)
    w = randn(3, 3, 4, 5, dtype=torch.complex64, requires_grad=True)
    pw, pb = randn(3, 3, requires_grad=True), randn(3, requires_grad=True)

    def step(x, y, w, pw, pb, m):
        f = m.spectral_conv2d(x, w)
        h = m.refine_update(m.residual_update(x, f, 0.5), f, pw, pb, 0.2)
        return (m.spectral_loss(h, y, 1.5, 0.5, "magnitude") + m.spectral_loss(h, y, 1.0, 0.5, "error")
                + m.radial_spectrum(h).mean())

    class Ref:
        spectral_conv2d = staticmethod(ik.spectral_conv2d_ref)
        refine_update = staticmethod(ik.refine_update_ref)
        residual_update = staticmethod(ik.residual_update_ref)
        spectral_loss = staticmethod(ik.spectral_loss_ref)
        radial_spectrum = staticmethod(ik.radial_spectrum_ref)

    compiled = torch.compile(lambda *a: step(*a, tr), backend="aot_eager", fullgraph=True)
    out, want = compiled(x, y, w, pw, pb), step(x, y, w, pw, pb, Ref)
    close(out, want)
    for g, e in zip(torch.autograd.grad(out, (x, w, pw, pb)), torch.autograd.grad(want, (x, w, pw, pb))):
        close(g, e, factor=10)


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------
def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_ops_low_precision_within_twice_torch_error(dtype):
    """Kernel error vs the fp32 reference <= 2x the error of the same computation in torch at dtype."""
    B, Co, F, H, W = 4, 4, 16, 128, 384
    lo = [t.to(dtype) for t in (randn(B, Co, H, W), randn(B, F, H, W), randn(Co, F) / 4, randn(Co),
                                 randn(B, Co, H, W))]
    h, z, w, b, phi = lo
    ref = ik.refine_update_ref(*[t.float() for t in lo[:4]], 0.2)  # the same rounded inputs, fp32 math
    assert _err(tr.refine_update(h, z, w, b, 0.2), ref) <= 2 * _err(ik.refine_update_ref(h, z, w, b, 0.2), ref) + 1e-6
    ref = ik.residual_update_ref(h.float(), phi.float(), 0.2)
    assert _err(tr.residual_update(h, phi, 0.2), ref) <= 2 * _err(ik.residual_update_ref(h, phi, 0.2), ref) + 1e-6
    # gradients: same rule, one shared grad_output
    leaves = [t.clone().requires_grad_() for t in (h, z, w, b)]
    g = randn(B, Co, H, W).to(dtype)
    got = torch.autograd.grad(tr.refine_update(*leaves, 0.2), leaves, g)
    low = torch.autograd.grad(ik.refine_update_ref(*leaves, 0.2), leaves, g)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    exp = torch.autograd.grad(ik.refine_update_ref(*leaves32, 0.2), leaves32, g.float())
    for a, lw, e in zip(got, low, exp):
        assert _err(a, e) <= 2 * _err(lw, e) + 1e-6


@gpu
def test_paper_sized_strided_inputs():
    """The GPU configurations on paper-sized grids, with channels_last and sliced inputs."""
    x = randn(4, 11, 128, 384).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = randn(4, 12, 128, 384)[:, 1:]
    assert not x.is_contiguous() and not y.is_contiguous()
    for mode in ("magnitude", "error"):
        check_fwd_bwd(lambda p, t, m=mode: tr.spectral_loss(p, t, 1.5, 0.5, m),
                      lambda p, t, m=mode: ik.spectral_loss_ref(p, t, 1.5, 0.5, m), (x, y), torch.float32)
    check_fwd_bwd(tr.radial_spectrum, ik.radial_spectrum_ref, (x,), torch.float32, factor=10)
    z = randn(4, 16, 128, 384).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = randn(11, 16, requires_grad=True), randn(11, requires_grad=True)
    check_fwd_bwd(lambda *a: tr.refine_update(*a, 0.2), lambda *a: ik.refine_update_ref(*a, 0.2),
                  (x, z, w, b), torch.float32, factor=10)
    check_fwd_bwd(lambda a, c: tr.residual_update(a, c, 0.2), lambda a, c: ik.residual_update_ref(a, c, 0.2),
                  (x, y), torch.float32)
    xs = randn(16, 64, 256, 256)[:, ::2].requires_grad_()  # every other channel: a strided view
    cw = (randn(32, 32, 32, 16, dtype=torch.complex64) / 32).requires_grad_()
    check_fwd_bwd(tr.spectral_conv2d, ik.spectral_conv2d_ref, (xs, cw), torch.float32, factor=10)


@gpu
def test_cuda_graph_capture_and_replay_equals_eager():
    """Warm up on a side stream, capture forward+backward of every op, poison the outputs, replay."""
    x = randn(2, 3, 64, 96, requires_grad=True)
    y = randn(2, 3, 64, 96)
    w = randn(3, 3, 16, 12, dtype=torch.complex64, requires_grad=True)
    pw, pb = randn(3, 3, requires_grad=True), randn(3, requires_grad=True)

    def step():
        f = tr.spectral_conv2d(x, w)
        h = tr.refine_update(tr.residual_update(x, f, 0.5), f, pw, pb, 0.2)
        loss = tr.spectral_loss(h, y, 1.5) + tr.spectral_loss(h, y, 1.0, 0.5, "error") + tr.radial_spectrum(h).mean()
        return (loss, *torch.autograd.grad(loss, (x, w, pw, pb)))

    static, eager = replay_after_poisoning(step)
    for s, e in zip(static, eager):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("mix", ["einsum", "triton"])
def test_dft_kernels_paper_sized_accuracy_and_graph_capture(mix, monkeypatch):
    """The accurate mode (tf32x3 products) against the float64 reference at B4 C32 256x256 m16, and
    forward + backward replayed from a CUDA graph; the compact spectra mixed by einsum or Triton."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(tr_dft, "COMPACT_MIX", mix)
    x = randn(4, 32, 256, 256, requires_grad=True)
    w = (randn(32, 32, 32, 16, dtype=torch.complex64) / 32).requires_grad_()
    g = randn(4, 32, 256, 256)
    got = (tr_dft.spectral_conv2d_dft(x, w), *torch.autograd.grad(tr_dft.spectral_conv2d_dft(x, w), (x, w), g))
    xd, wd = x.detach().double().requires_grad_(), w.detach().to(torch.complex128).requires_grad_()
    ref = ik.spectral_conv2d_ref(xd, wd)
    want = (ref, *torch.autograd.grad(ref, (xd, wd), g.double()))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.to(e.dtype), e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))

    xs, ws = randn(2, 3, 64, 96, requires_grad=True), randn(3, 4, 16, 12, dtype=torch.complex64, requires_grad=True)
    gy = randn(2, 4, 64, 96)

    def step():
        y = tr_dft.spectral_conv2d_dft(xs, ws)
        return (y, *torch.autograd.grad(y, (xs, ws), gy))

    static, eager = replay_after_poisoning(step)
    for s_, e in zip(static, eager):
        torch.testing.assert_close(s_, e, rtol=1e-6, atol=1e-6)


@gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
def test_low_precision_paper_sized_within_twice_torch_error(dtype, monkeypatch):
    """The 16-bit rule on paper-sized fields (GPU stores round to nearest: factor 2 throughout):
    spectral_conv2d on the dft route (B4 C32 256x256 m16, the accurate mode) and on the FFT route
    (B4 C11 128x384 m16), radial_spectrum and both spectral losses at B4 C11 128x384."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x, w = randn(4, 32, 256, 256).to(dtype), randn(32, 32, 32, 16, dtype=torch.complex64) / 32
    f, t = randn(4, 11, 128, 384).to(dtype), randn(4, 11, 128, 384).to(dtype)
    wf = randn(11, 11, 32, 16, dtype=torch.complex64) / 11
    from irno_kernels.spectral_dft import prefer_dft

    assert not prefer_dft(f, wf)  # the FFT route

    def loss(mode, backend):
        return lambda a, b: ik.spectral_loss(a, b, 1.5, 0.5, mode, backend=backend)

    cases = [(tr_dft.spectral_conv2d_dft, ik.spectral_conv2d_ref, (x, w)),
             (lambda a, b: ik.spectral_conv2d(a, b, backend="triton"), ik.spectral_conv2d_ref, (f, wf)),
             (lambda a: ik.radial_spectrum(a, backend="triton"), ik.radial_spectrum_ref, (f,)),
             (loss("magnitude", "triton"), loss("magnitude", "reference"), (f, t)),
             (loss("error", "triton"), loss("error", "reference"), (f, t))]
    for c, (fn, ref, inputs) in enumerate(cases):
        for k, (ours, torch_err, scale) in enumerate(_low_precision_errors(fn, ref, inputs, dtype)):
            assert ours <= 2 * torch_err + 1e-5 * scale, (c, k, ours, torch_err, scale)


@gpu
def test_torch_compile_inductor():
    """With a GPU the ops are triton_ops: Inductor sees their kernels."""
    x, y = randn(2, 3, 32, 48, requires_grad=True), randn(2, 3, 32, 48)
    w = randn(3, 3, 8, 10, dtype=torch.complex64, requires_grad=True)

    def f(x, y, w):
        return tr.spectral_loss(tr.spectral_conv2d(x, w), y, 1.5, 0.5, "magnitude") + tr.radial_spectrum(x).mean()

    out = torch.compile(f, fullgraph=True)(x, y, w)
    want = (ik.spectral_loss_ref(ik.spectral_conv2d_ref(x, w), y, 1.5, 0.5, "magnitude")
            + ik.radial_spectrum_ref(x).mean())
    close(out, want)
    for g, e in zip(torch.autograd.grad(out, (x, w)), torch.autograd.grad(want, (x, w))):
        close(g, e, factor=10)


@gpu
def test_torch_compile_inductor_dft_route(monkeypatch):
    """The Triton DFT route (both transforms and the compact mixing as triton_ops) under Inductor,
    forward and backward, in the accurate mode."""
    from irno_kernels import spectral_dft

    monkeypatch.setattr(spectral_dft, "prefer_dft", lambda x, w: True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x = randn(2, 3, 40, 36, requires_grad=True)
    w = (randn(3, 4, 8, 6, dtype=torch.complex64) / 3).requires_grad_()
    out = torch.compile(lambda a, b: tr.spectral_conv2d(a, b).square().mean(), fullgraph=True)(x, w)
    want = ik.spectral_conv2d_ref(x, w).square().mean()
    close(out, want, factor=2)
    for g, e in zip(torch.autograd.grad(out, (x, w)), torch.autograd.grad(want, (x, w))):
        close(g, e, factor=10)


@gpu
def test_gpu_repeats_the_interpreter_checks_on_cuda():
    """benchmarks/gpu_check.sh runs only ``-m gpu``: the unmarked checks again, on CUDA, where the ops
    are triton_ops (opcheck then tests the traced fake kernels) and the kernels are compiled."""
    for op, args in _opcheck_cases().values():
        torch.library.opcheck(op, args)
    test_torch_compile_fullgraph_aot_eager()
    test_reductions_are_deterministic()
    test_radial_spectrum_shells_match_shell_index()
    for shape in FIELD_SHAPES:
        test_residual_update(shape, torch.float32, True)
        test_refine_update(shape, torch.float32, True, True)
        test_radial_spectrum(shape, torch.float64)
        for mode in ("magnitude", "error"):
            test_spectral_loss(shape, mode, 1.7)
    for case in CONV_CASES:
        test_spectral_conv2d(case, torch.float32)
    test_spectral_conv2d_strided_input_and_conjugate_weight()
    test_in_place_forms((2, 3, 5, 7), True)
    test_dft_transforms_are_adjoint_pairs()
    for dtype in LOW_PRECISION:  # GPU stores round to nearest: the factor is 2 for every case here
        for name in _low_precision_cases(dtype):
            test_low_precision_fields_within_twice_torch_error(name, dtype)
