"""spectral_conv2d: the C++ kernel against the reference (forward and backward), gradcheck, opcheck,
torch.compile, argument checks, backend forcing and the neuraloperator weight converters; the CUDA
kernel against the float64 reference, in 16 bits, determinism, opcheck and CUDA graphs (marked gpu)."""

import pytest
import torch
from _cuda_graphs import replay_after_poisoning
from conftest import tol
from hypothesis import given, settings
from hypothesis import strategies as st

import irno_kernels as ik
from irno_kernels.spectral_conv import spectral_conv2d_ref

needs_c = pytest.mark.skipif(not ik.HAS_C, reason="irno_kernels._C not built")

# (rtol, atol relative to the largest entry of the reference) per dtype
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12)}
CDTYPE = {torch.float32: torch.complex64, torch.float64: torch.complex128}

# (B, C_in, C_out, H, W, m1, m2). The last three pin each transform choice of the kernel whatever
# its cost model says: every mode along H and few along W, the reverse, and every mode on both.
SHAPES = [
    (2, 3, 4, 33, 47, 5, 7),       # odd sizes
    (1, 2, 3, 128, 384, 16, 20),   # non-power-of-two, batch 1
    (3, 4, 2, 16, 24, 8, 13),      # 2*m1 == H, m2 == W//2+1 (Nyquist column kept)
    (2, 2, 3, 6, 1, 3, 1),         # W == 1
    (1, 2, 2, 128, 128, 64, 2),    # H by FFT, W by GEMM
    (1, 2, 2, 128, 128, 1, 65),    # H by GEMM, W by FFT
    (2, 3, 2, 128, 96, 64, 49),    # FFT on both axes
]


def _weight(ci, co, m1, m2, dtype, H, W):
    """A random weight scaled so that y has entries of order one."""
    scale = (H * W / (2 * m1 * m2 * ci)) ** 0.5
    return torch.randn(ci, co, 2 * m1, m2, dtype=CDTYPE[dtype]) * scale


def _x(B, ci, H, W, dtype, layout):
    if layout == "transposed":
        x = torch.randn(B, ci, W, H, dtype=dtype).transpose(2, 3)
    elif layout == "sliced":
        x = torch.randn(B, 2 * ci, H, W + 3, dtype=dtype)[:, ::2, :, 1:W + 1]
    else:
        x = torch.randn(B, ci, H, W, dtype=dtype)
    assert x.shape == (B, ci, H, W) and x.is_contiguous() == (layout == "contiguous")
    return x


def _close(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * float(want.detach().abs().max()))


def _compare(x, w, backend, dtype):
    """Forward and both gradients of `backend` against the reference, for one shared grad_y."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    got = ik.spectral_conv2d(x, w, backend=backend)
    want = spectral_conv2d_ref(x, w)
    _close(got, want, dtype)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(want, (x, w), g)):
        _close(a, b, dtype)


@needs_c
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference(shape, dtype):
    B, ci, co, H, W, m1, m2 = shape
    _compare(_x(B, ci, H, W, dtype, "contiguous"), _weight(ci, co, m1, m2, dtype, H, W), "cpu", dtype)


@needs_c
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference_on_strided_inputs(layout, dtype):
    B, ci, co, H, W, m1, m2 = 2, 3, 4, 20, 18, 4, 6
    w = _weight(ci, co, m1, m2, dtype, H, W)
    w = torch.cat([w, w], dim=1)[:, ::2]  # a non-contiguous weight too
    assert not w.is_contiguous()
    _compare(_x(B, ci, H, W, dtype, layout), w, "cpu", dtype)


@needs_c
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), ci=st.integers(1, 4), co=st.integers(1, 4), H=st.integers(2, 72),
       W=st.integers(1, 72), data=st.data())
def test_cpu_matches_reference_property(B, ci, co, H, W, data):
    m1 = data.draw(st.integers(1, H // 2), label="m1")
    m2 = data.draw(st.integers(1, W // 2 + 1), label="m2")
    dtype = torch.float64
    _compare(_x(B, ci, H, W, dtype, "contiguous"), _weight(ci, co, m1, m2, dtype, H, W), "cpu", dtype)


@needs_c
def test_gradcheck():
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, 3, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: ik.spectral_conv2d(x, w, backend="cpu"), (x, w))


@needs_c
def test_only_the_needed_gradients_are_returned():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    w = torch.randn(2, 2, 4, 3, dtype=torch.complex64)
    ik.spectral_conv2d(x, w, backend="cpu").sum().backward()
    assert x.grad is not None and w.grad is None
    x2 = x.detach()
    w2 = w.clone().requires_grad_()
    ik.spectral_conv2d(x2, w2, backend="cpu").sum().backward()
    assert w2.grad is not None and x2.grad is None


@needs_c
def test_opcheck():
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 4, 3, dtype=torch.complex128, requires_grad=True)
    torch.library.opcheck(torch.ops.irno.spectral_conv2d.default, (x, w))
    gy = torch.randn(2, 2, 10, 9, dtype=torch.float64)
    torch.library.opcheck(torch.ops.irno.spectral_conv2d_backward.default, (gy, x.detach(), w.detach()))


@needs_c
def test_torch_compile_fullgraph():
    x = torch.randn(2, 3, 12, 10, requires_grad=True)
    w = torch.randn(3, 4, 6, 4, dtype=torch.complex64, requires_grad=True)

    def layer(x, w):
        return torch.nn.functional.gelu(ik.spectral_conv2d(x, w, (3, 4)) + x.mean(1, keepdim=True))

    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, w)
    want = layer(x, w)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(want, (x, w), g)):
        torch.testing.assert_close(a, b)


@needs_c
def test_compiled_autograd_traces_the_backward_in_one_graph():
    """Compiled autograd (dynamo tracing the backward formulas) with fullgraph=True: the compiled
    ops' backward formulas must be traceable (a dispatch guard in them was not), and give eager's
    gradients."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no compiled_autograd._enable")
    torch._dynamo.reset()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    w = torch.randn(3, 4, 8, 5, dtype=torch.complex64, requires_grad=True)
    y = torch.randn(2, 4, 16, 16)

    def loss():
        out = ik.spectral_conv2d(x, w, backend="cpu")
        return ik.spectral_loss(out, y, 1.5, backend="cpu") + ik.radial_spectrum(out, backend="cpu").mean()

    want = torch.autograd.grad(loss(), (x, w))
    x.grad = w.grad = None
    try:
        with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
            loss().backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(x.grad, want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, want[1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _xw(B=2, ci=3, co=4, H=8, W=8, m1=2, m2=3, dtype=torch.float32, cdtype=torch.complex64):
    return torch.randn(B, ci, H, W, dtype=dtype), torch.randn(ci, co, 2 * m1, m2, dtype=cdtype)


X, WT = _xw()
BAD = [
    ("x-rank", lambda: ik.spectral_conv2d(X[0], WT), ValueError, r"x: expected a 4-D tensor, got shape \(3, 8, 8\)"),
    ("x-type", lambda: ik.spectral_conv2d(X.numpy(), WT), TypeError, "x: expected a torch.Tensor, got ndarray"),
    ("x-dtype", lambda: ik.spectral_conv2d(X.half(), WT), ValueError, "x: expected dtype .* got torch.float16"),
    ("x-empty", lambda: ik.spectral_conv2d(X[:0], WT), ValueError, r"x: expected a non-empty tensor, got shape \(0,"),
    ("w-rank", lambda: ik.spectral_conv2d(X, WT[0]), ValueError, "weight: expected a 4-D tensor"),
    ("w-real", lambda: ik.spectral_conv2d(X, WT.real), TypeError,
     "weight: expected a complex tensor .*torch.complex64.*, got torch.float32"),
    ("w-precision", lambda: ik.spectral_conv2d(X, WT.to(torch.complex128)), ValueError,
     "weight: expected dtype torch.complex64 .*float32.*, got torch.complex128"),
    ("w-channels", lambda: ik.spectral_conv2d(X, torch.randn(5, 4, 4, 3, dtype=torch.complex64)), ValueError,
     r"weight: expected C_in = 3 .* got shape \(5, 4, 4, 3\)"),
    ("w-odd-rows", lambda: ik.spectral_conv2d(X, torch.randn(3, 4, 5, 3, dtype=torch.complex64)), ValueError,
     "weight: expected an even size 2\\*m1"),
    ("w-m1", lambda: ik.spectral_conv2d(X, torch.randn(3, 4, 10, 3, dtype=torch.complex64)), ValueError,
     r"weight: 2\*m1 = 10 modes along H need H >= 10, got x with H = 8"),
    ("w-m2", lambda: ik.spectral_conv2d(X, torch.randn(3, 4, 4, 6, dtype=torch.complex64)), ValueError,
     r"weight: m2 = 6 modes along W need m2 <= W//2\+1 = 5"),
    ("w-device", lambda: ik.spectral_conv2d(X, WT.to("meta")), RuntimeError,
     "weight: expected a tensor on cpu .* got meta"),
    ("w-empty", lambda: ik.spectral_conv2d(X, WT[:, :0]), ValueError, "weight: expected a non-empty tensor"),
    ("modes", lambda: ik.spectral_conv2d(X, WT, (3, 3)), ValueError,
     r"modes: expected \(m1, m2\) = \(2, 3\) .* got \(3, 3\)"),
    ("modes-int", lambda: ik.spectral_conv2d(X, WT, 2), ValueError, r"modes: expected \(m1, m2\) = \(2, 3\)"),
    ("modes-type", lambda: ik.spectral_conv2d(X, WT, 2.5), TypeError, r"modes: expected an int or a pair"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@needs_c
def test_compiled_ops_check_their_arguments():
    """Direct torch.ops calls (no wrapper) raise RuntimeError naming the argument, never crash."""
    op, bwd = torch.ops.irno.spectral_conv2d, torch.ops.irno.spectral_conv2d_backward
    with pytest.raises(RuntimeError, match="x: expected a 4-D tensor"):
        op(X[0], WT)
    with pytest.raises(RuntimeError, match="weight: expected dtype ComplexFloat"):
        op(X, WT.real.contiguous())
    with pytest.raises(RuntimeError, match="weight: expected C_in = 3"):
        op(X, torch.randn(5, 4, 4, 3, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="weight: 2\\*m1 = 10 modes along H need H >= 10"):
        op(X, torch.randn(3, 4, 10, 3, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="weight: m2 = 6 modes along W"):
        op(X, torch.randn(3, 4, 4, 6, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="x: expected a non-empty tensor"):
        op(X[:0], WT)
    with pytest.raises(RuntimeError, match=r"grad_y: expected shape \(2, 4, 8, 8\)"):
        bwd(torch.randn(2, 3, 8, 8), X, WT)
    with pytest.raises(RuntimeError, match="grad_y: expected dtype Float"):
        bwd(torch.randn(2, 4, 8, 8, dtype=torch.float64), X, WT)


# ---------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------
@needs_c
def test_forced_backends_agree():
    x, w = _xw(H=12, W=10)
    torch.testing.assert_close(ik.spectral_conv2d(x, w, backend="cpu"),
                               ik.spectral_conv2d(x, w, backend="reference"), rtol=1e-4, atol=1e-5)


def test_environment_variable_forces_a_backend(monkeypatch):
    from irno_kernels import spectral_conv as mod

    calls = []
    ref = mod.spectral_conv2d_ref
    monkeypatch.setattr(mod, "spectral_conv2d_ref", lambda x, w: calls.append(1) or ref(x, w))
    x, w = _xw()
    monkeypatch.setenv("IRNO_BACKEND", "reference")
    mod.spectral_conv2d(x, w)
    assert calls == [1]
    if ik.HAS_C:
        monkeypatch.setenv("IRNO_BACKEND", "cpu")
        mod.spectral_conv2d(x, w)
        assert calls == [1]
    monkeypatch.setenv("IRNO_BACKEND", "fast")
    with pytest.raises(ValueError, match="IRNO_BACKEND: expected one of"):
        mod.spectral_conv2d(x, w)


def test_forward_mode_ad_uses_the_reference():
    import torch.autograd.forward_ad as fwAD

    x, w = _xw(dtype=torch.float64, cdtype=torch.complex128)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        out = ik.spectral_conv2d(fwAD.make_dual(x, t), w)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, spectral_conv2d_ref(t, w))  # linear in x
        if ik.HAS_C:
            with pytest.raises(RuntimeError, match="no forward-mode AD formula"):
                ik.spectral_conv2d(fwAD.make_dual(x, t), w, backend="cpu")


# ---------------------------------------------------------------------------------------------
# neuraloperator weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fft_norm_is_neuraloperators_default():
    assert ik.FFT_NORM == "forward"
    neuralop = pytest.importorskip("neuralop")
    import inspect

    default = inspect.signature(neuralop.layers.spectral_convolution.SpectralConv).parameters["fft_norm"].default
    assert default == ik.FFT_NORM


def _neuralop_layout_forward(x, w):
    """neuraloperator's dense 2-D SpectralConv forward (no bias, all stored modes used), written
    from its layout rules: rfft2, fftshift along H, the n1 rows centred on frequency 0 (row j is
    frequency j - n1//2) and the first n2//2+1 columns mixed, fftshift back, irfft2."""
    H, W = x.shape[-2:]
    n1, c2 = w.shape[-2:]
    X = torch.fft.fftshift(torch.fft.rfft2(x, norm="forward"), dim=-2)
    out = torch.zeros(x.shape[0], w.shape[1], H, W // 2 + 1, dtype=X.dtype)
    rows = slice(H // 2 - n1 // 2, H // 2 - n1 // 2 + n1)
    out[:, :, rows, :c2] = torch.einsum("bixy,ioxy->boxy", X[:, :, rows, :c2], w)
    return torch.fft.irfft2(torch.fft.fftshift(out, dim=-2), s=(H, W), norm="forward")


@pytest.mark.parametrize("n1,n2", [(8, 10), (7, 10), (6, 7)])
def test_converter_matches_neuraloperator_layout(n1, n2):
    x = torch.randn(2, 3, 16, 14, dtype=torch.float64)
    theirs = torch.randn(3, 4, n1, n2 // 2 + 1, dtype=torch.complex128)
    ours = ik.weight_from_neuralop(theirs)
    assert ours.shape == (3, 4, 2 * ((n1 + 1) // 2), n2 // 2 + 1)
    torch.testing.assert_close(spectral_conv2d_ref(x, ours), _neuralop_layout_forward(x, theirs))
    torch.testing.assert_close(ik.weight_to_neuralop(ours, (n1, n2)), theirs)


def test_converter_to_neuralop_pads_and_refuses_to_drop_modes():
    w = torch.randn(2, 3, 4, 3, dtype=torch.complex64)  # m1 = 2, m2 = 3
    wide = ik.weight_to_neuralop(w, (8, 8))  # frequencies -4..3, 5 columns: zeros around w
    assert wide.shape == (2, 3, 8, 5)
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(_neuralop_layout_forward(x, wide), spectral_conv2d_ref(x, w))
    with pytest.raises(ValueError, match=r"n_modes: \(3, 4\)"):
        ik.weight_to_neuralop(w, (3, 4))  # no room for frequency -2 nor column 2
    with pytest.raises(ValueError, match="n_modes: expected two positive ints"):
        ik.weight_to_neuralop(w, 8)
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor"):
        ik.weight_from_neuralop([1, 2])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script inside tensorly-torch
@pytest.mark.parametrize("n_modes", [(8, 10), (7, 9)])
def test_converter_against_neuraloperator(n_modes):
    spectral_convolution = pytest.importorskip("neuralop.layers.spectral_convolution")
    conv = spectral_convolution.SpectralConv(3, 4, n_modes=n_modes, bias=False)
    x = torch.randn(2, 3, 32, 22)  # even H: neuraloperator 2.0.0 mis-shifts odd H (fftshift twice)
    with torch.no_grad():
        ours = ik.weight_from_neuralop(conv.weight)
        torch.testing.assert_close(ik.spectral_conv2d(x, ours), conv(x), rtol=1e-4, atol=1e-5)
        back = spectral_convolution.SpectralConv(3, 4, n_modes=n_modes, bias=False)
        back.weight.to_tensor().copy_(ik.weight_to_neuralop(ours, n_modes))
        torch.testing.assert_close(back(x), conv(x))


# ---------------------------------------------------------------------------------------------
# CUDA kernels (csrc/spectral_conv.cu): marked gpu, skipped without a CUDA device
# ---------------------------------------------------------------------------------------------
# (B, C_in, C_out, H, W, m1, m2)
CUDA_SHAPES = [
    (3, 5, 5, 37, 50, 8, 12),  # odd and non-power-of-two sizes; B not a multiple of the batch tile (4)
    (2, 4, 6, 128, 384, 16, 20),  # non-power-of-two, C_out not a multiple of the weight-grad tile (4)
    (2, 11, 11, 256, 256, 16, 16),
    (5, 3, 2, 16, 24, 8, 13),  # 2*m1 == H, m2 == W//2+1 (Nyquist column kept)
    (2, 2, 3, 6, 1, 3, 1),  # W == 1
    (4, 64, 64, 64, 64, 12, 12),  # wide channels
]


def _cuda_x(B, ci, H, W, dtype=torch.float32, layout="contiguous"):
    if layout == "transposed":
        return torch.randn(B, ci, W, H, device="cuda").transpose(2, 3).to(dtype)
    if layout == "sliced":
        return torch.randn(B, 2 * ci, H, W + 3, device="cuda").to(dtype)[:, ::2, :, 1 : W + 1]
    x = torch.randn(B, ci, H, W, device="cuda").to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _run(fn, x, w, g):
    """(y, grad_x, grad_w) of fn at (x, w) for grad_y = g."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w)
    return (y.detach(), *torch.autograd.grad(y, (x, w), g))


def _cuda(x, w):
    return ik.spectral_conv2d(x, w, backend="cuda")


def _run_ops(x, w, g):
    """(y, grad_x, grad_w) from the compiled ops directly (no autograd leaf: works for conjugate views)."""
    return (torch.ops.irno.spectral_conv2d(x, w), *torch.ops.irno.spectral_conv2d_backward(g, x, w))


def _compare_cuda_fp32(x, w, direct=False):
    """Forward and both gradients of the CUDA kernels (float32) against the float64 reference, one shared
    grad_y; atol relative to the largest entry of the reference."""
    g = torch.randn(x.shape[0], w.shape[1], *x.shape[2:], device="cuda", dtype=torch.float64)
    got = _run_ops(x, w, g.float()) if direct else _run(_cuda, x, w, g.float())
    want = _run(spectral_conv2d_ref, x.double(), w.resolve_conj().to(torch.complex128), g)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.complex64
    rtol, atol = tol(torch.float32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol * float(b.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_float64_reference(shape):
    B, ci, co, H, W, m1, m2 = shape
    _compare_cuda_fp32(_cuda_x(B, ci, H, W), _weight(ci, co, m1, m2, torch.float32, H, W).cuda())


@pytest.mark.gpu
def test_cuda_float64_matches_reference():
    B, ci, co, H, W, m1, m2 = CUDA_SHAPES[0]
    x = _cuda_x(B, ci, H, W, torch.float64)
    w = _weight(ci, co, m1, m2, torch.float64, H, W).cuda()
    g = torch.randn(B, co, H, W, device="cuda", dtype=torch.float64)
    for a, b in zip(_run(_cuda, x, w, g), _run(spectral_conv2d_ref, x, w, g)):
        _close(a, b, torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_cuda_strided_inputs_and_weights(layout):
    B, ci, co, H, W, m1, m2 = CUDA_SHAPES[0]
    x = _cuda_x(B, ci, H, W, layout=layout)
    assert not x.is_contiguous()
    w = _weight(ci, co, m1, m2, torch.float32, H, W).cuda()
    _compare_cuda_fp32(x, torch.cat([w, w], dim=1)[:, ::2])  # a non-contiguous weight
    wc = w.conj()  # a conjugate view: the kernel must read the conjugated values
    assert wc.is_conj()
    _compare_cuda_fp32(x, wc, direct=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [CUDA_SHAPES[0], CUDA_SHAPES[2]], ids=lambda s: "x".join(map(str, s)))
def test_cuda_low_precision_error_within_twice_torch(shape, dtype):
    """16-bit x with a complex64 weight: the kernel's error against float64 (same rounded inputs) is at
    most twice that of the reference run on the same inputs (torch's FFT has no bfloat16 and needs
    powers of two for float16: it computes in float32 and stores the result in the 16-bit dtype)."""
    B, ci, co, H, W, m1, m2 = shape
    x = torch.randn(B, ci, H, W, device="cuda").to(dtype)
    w = _weight(ci, co, m1, m2, torch.float32, H, W).cuda()
    g = torch.randn(B, co, H, W, device="cuda").to(dtype)
    ours = _run(_cuda, x, w, g)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == torch.complex64
    torch_lp = _run(spectral_conv2d_ref, x.float(), w, g.float())
    torch_lp = (torch_lp[0].to(dtype), torch_lp[1].to(dtype), torch_lp[2])
    exact = _run(spectral_conv2d_ref, x.double(), w.to(torch.complex128), g.double())
    for name, o, lp, e in zip(("y", "grad_x", "grad_w"), ours, torch_lp, exact):
        err_ours = (o.to(e.dtype) - e).abs().max().item()
        err_torch = (lp.to(e.dtype) - e).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-5 * e.abs().max().item(), (name, err_ours, err_torch)


@pytest.mark.gpu
def test_cuda_low_precision_only_on_the_cuda_backend():
    x = torch.randn(2, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3, 4, 4, 3, device="cuda", dtype=torch.complex64)
    assert ik.spectral_conv2d(x, w).dtype == torch.bfloat16  # auto picks the CUDA kernel
    with pytest.raises(ValueError, match="x: expected dtype .*'reference' backend.* got torch.bfloat16"):
        ik.spectral_conv2d(x, w, backend="reference")
    with pytest.raises(RuntimeError, match="weight: expected dtype ComplexFloat"):
        torch.ops.irno.spectral_conv2d(x, w.to(torch.complex128))


@pytest.mark.gpu
def test_cuda_deterministic():
    B, ci, co, H, W, m1, m2 = CUDA_SHAPES[1]
    x = _cuda_x(B, ci, H, W)
    w = _weight(ci, co, m1, m2, torch.float32, H, W).cuda()
    g = torch.randn(B, co, H, W, device="cuda")
    first, second = _run(_cuda, x, w, g), _run(_cuda, x, w, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # no atomics: the weight gradient sums the batch in order


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # float64: the CPU opcheck
def test_cuda_opcheck(dtype):
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    x = torch.randn(2, 3, 10, 9, device="cuda").to(dtype).requires_grad_()
    w = torch.randn(3, 2, 4, 3, dtype=cdtype, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.irno.spectral_conv2d.default, (x, w))
    gy = torch.randn(2, 2, 10, 9, device="cuda").to(dtype)
    torch.library.opcheck(torch.ops.irno.spectral_conv2d_backward.default, (gy, x.detach(), w.detach()))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_equals_eager():
    """Warm up on a side stream, capture forward + backward, poison the outputs, replay, compare."""
    x = torch.randn(2, 3, 64, 96, device="cuda", requires_grad=True)
    w = (torch.randn(3, 4, 16, 12, dtype=torch.complex64, device="cuda") / 10).requires_grad_()
    gy = torch.randn(2, 4, 64, 96, device="cuda")

    def step():
        y = ik.spectral_conv2d(x, w, backend="cuda")
        return (y, *torch.autograd.grad(y, (x, w), gy))

    static, eager = replay_after_poisoning(step)
    for s, e in zip(static, eager):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6 * float(e.abs().max()))


@needs_c
def test_compiled_ops_run_in_float32_under_autocast():
    """Autocast must not leak bf16 into the fp32 kernels (the CPU mixing calls a matmul inside)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 15, 12, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 6, 4, dtype=torch.complex64, generator=g)
    h = torch.randn(2, 4, 15, 12, generator=g)
    want = ik.spectral_conv2d(x, w, backend="cpu")
    want_loss = ik.spectral_loss(want, h, 0.7, backend="cpu")
    (gx_want,) = torch.autograd.grad(want_loss, x)
    with torch.autocast("cpu", torch.bfloat16):
        y = ik.spectral_conv2d(x, w, backend="cpu")
        loss = ik.spectral_loss(y, h, 0.7, backend="cpu")
        u = ik.residual_update(h, y, 0.5, backend="cpu")
    assert y.dtype == u.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(loss, want_loss)
    (gx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(gx, gx_want)


@pytest.mark.parametrize("H, W, m2", [(16, 12, 4), (15, 9, 5), (16, 24, 13), (7, 2, 2), (6, 1, 1)])
def test_hermitian_edges_defines_irfft2_of_a_mixed_spectrum(H, W, m2):
    """The self-conjugate columns come out Hermitian along H; under pocketfft's Re(ifft2) reading
    (CPU) irfft2 is unchanged, so the projection only pins down what other FFT libraries compute."""
    from irno_kernels.spectral_conv import hermitian_edges

    g = torch.Generator().manual_seed(H * 100 + W)
    S = torch.randn(2, 3, H, W // 2 + 1, dtype=torch.complex128, generator=g)
    S[..., m2:] = 0
    P = hermitian_edges(S, W, m2)
    flip = (-torch.arange(H)) % H
    cols = [0] + ([W // 2] if W % 2 == 0 and 0 < W // 2 < m2 else [])
    for c in cols:
        torch.testing.assert_close(P[..., flip, c], P[..., c].conj())
    others = [k for k in range(W // 2 + 1) if k not in cols]
    assert torch.equal(P[..., others], S[..., others])
    torch.testing.assert_close(torch.fft.irfft2(P, s=(H, W)), torch.fft.irfft2(S, s=(H, W)))
    Sg = S[:1, :1].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: torch.view_as_real(hermitian_edges(t, W, m2)), (Sg,))


# ---------------------------------------------------------------------------------------------
# the truncated-DFT route (backend="dft", irno_kernels/spectral_dft.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5, 4, 37, 50, 8, 12), (2, 3, 2, 16, 24, 8, 13), (2, 2, 3, 6, 1, 3, 1),
                                   (1, 3, 3, 15, 9, 7, 5), (2, 4, 3, 40, 64, 4, 33)])
def test_dft_route_matches_reference_forward_and_backward(shape):
    B, ci, co, H, W, m1, m2 = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(B, ci, H, W, dtype=torch.float64, generator=g)
    w = torch.randn(ci, co, 2 * m1, m2, dtype=torch.complex128, generator=g)
    gy = torch.randn(B, co, H, W, dtype=torch.float64, generator=g)
    for dtype, cdtype, rtol in ((torch.float64, torch.complex128, 1e-10), (torch.float32, torch.complex64, 2e-5)):
        xs, ws = x.to(dtype).requires_grad_(), w.to(cdtype).requires_grad_()
        got = ik.spectral_conv2d(xs, ws, backend="dft")
        want = spectral_conv2d_ref(x.requires_grad_(), w.requires_grad_())
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale)
        ga = torch.autograd.grad(got, (xs, ws), gy.to(dtype))
        gb = torch.autograd.grad(want, (x, w), gy)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=rtol * float(b.abs().max()))
        x, w = x.detach(), w.detach()


def test_dft_route_gradcheck_forward_ad_and_autocast():
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, 4, dtype=torch.complex128, requires_grad=True)
    fn = lambda a, b: ik.spectral_conv2d(a, b, backend="dft")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradcheck(fn, (x, w), check_forward_ad=True, check_backward_ad=False)
    xf, wf = x.detach().float(), w.detach().to(torch.complex64)
    with torch.autocast("cpu", torch.bfloat16):  # runs in fp32 regardless
        y = ik.spectral_conv2d(xf, wf, backend="dft")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, spectral_conv2d_ref(xf, wf), rtol=1e-5, atol=1e-5)


def test_dft_backend_serves_the_spectral_layer_only():
    h = torch.randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="'dft' backend serves spectral_conv2d only"):
        ik.residual_update(h, h, 0.5, backend="dft")
    assert ik.backends()["spectral_conv2d"]["cpu"] != "dft"  # never the automatic choice


def _lp_errors(x, w, g, fn):
    """Max-abs errors against float64 of fn and of the float32 reference rounded to x's dtype, for
    (y, grad_x, grad_w), plus the scale of each float64 result."""
    dt = x.dtype
    ours = _run(fn, x, w, g)
    torch_lp = _run(spectral_conv2d_ref, x.float(), w, g.float())
    torch_lp = (torch_lp[0].to(dt), torch_lp[1].to(dt), torch_lp[2])
    exact = _run(spectral_conv2d_ref, x.double(), w.to(torch.complex128), g.double())
    assert ours[0].dtype == ours[1].dtype == dt and ours[2].dtype == torch.complex64
    return [((o.to(e.dtype) - e).abs().max().item(), (lp.to(e.dtype) - e).abs().max().item(), e.abs().max().item())
            for o, lp, e in zip(ours, torch_lp, exact)]


def _check_dft_16bit(device):
    """The 16-bit dft route rounds the grid-sized products to 16 bits, so it is not as exact as the
    CUDA kernels (which compute in float32): y and grad_x within 4x the error of the float32 reference
    rounded to the 16-bit dtype (measured on CPU: 1.3x-2.6x), grad_w (summed in complex64 from
    16-bit-rounded spectra) within 16-bit precision of its largest entry."""
    fn = lambda a, b: ik.spectral_conv2d(a, b, backend="dft")  # noqa: E731
    for B, ci, co, H, W, m1, m2 in [(3, 5, 5, 37, 50, 8, 12), (2, 8, 8, 64, 64, 12, 12)]:
        for dt in (torch.bfloat16, torch.float16):
            g = torch.Generator().manual_seed(B * H + W)
            x = torch.randn(B, ci, H, W, generator=g).to(device, dt)
            w = (torch.randn(ci, co, 2 * m1, m2, dtype=torch.complex64, generator=g) / ci**0.5).to(device)
            gy = torch.randn(B, co, H, W, generator=g).to(device, dt)
            (ey, ty, _), (ex, tx, _), (ew, _, sw) = _lp_errors(x, w, gy, fn)
            assert ey <= 4 * ty and ex <= 4 * tx, (dt, ey, ty, ex, tx)
            assert ew <= 4 * torch.finfo(dt).eps * sw, (dt, ew, sw)


def test_dft_route_16bit_cpu():
    _check_dft_16bit("cpu")


# the dft route on the GPU: cuBLAS products (TF32 off, PyTorch's default), the float64 reference
@pytest.mark.gpu
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_dft_route_matches_float64_reference(shape):
    B, ci, co, H, W, m1, m2 = shape
    x = _cuda_x(B, ci, H, W)
    w = _weight(ci, co, m1, m2, torch.float32, H, W).cuda()
    g = torch.randn(B, co, H, W, device="cuda", dtype=torch.float64)
    got = _run(lambda a, b: ik.spectral_conv2d(a, b, backend="dft"), x, w, g.float())
    want = _run(spectral_conv2d_ref, x.double(), w.to(torch.complex128), g)
    rtol, atol = tol(torch.float32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol * float(b.abs().max()))


@pytest.mark.gpu
def test_cuda_dft_route_16bit():
    _check_dft_16bit("cuda")


@pytest.mark.gpu
def test_cuda_automatic_choice_takes_the_dft_route_for_large_fields(monkeypatch):
    from irno_kernels import spectral_dft
    from irno_kernels.spectral_dft import DFT_MIN_VALUES, prefer_dft

    calls = []
    real = spectral_dft.spectral_conv2d_dft
    monkeypatch.setattr(spectral_dft, "spectral_conv2d_dft", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("IRNO_BACKEND", raising=False)
    w = (torch.randn(64, 64, 32, 16, dtype=torch.complex64, device="cuda") / 64)
    big = torch.randn(DFT_MIN_VALUES // (64 * 256 * 256), 64, 256, 256, device="cuda")
    small = big[:, :, :64, :64]
    assert prefer_dft(big, w) and not prefer_dft(small, w) and not prefer_dft(big.cpu(), w.cpu())
    y = ik.spectral_conv2d(big, w)
    assert len(calls) == 1
    ik.spectral_conv2d(small, w)
    assert len(calls) == 1  # the FFT-route kernels
    monkeypatch.setenv("IRNO_BACKEND", "cuda")  # a named backend is obeyed
    y_cuda = ik.spectral_conv2d(big, w)
    assert len(calls) == 1
    torch.testing.assert_close(y, y_cuda, rtol=1e-4, atol=1e-4 * float(y_cuda.abs().max()))


@pytest.mark.skipif(not ik.available("spectral_conv2d", "triton", "cpu"), reason="needs triton with TRITON_INTERPRET=1")
def test_triton_guard_counts_the_output_spectrum(monkeypatch):
    """The Triton mixing writes the output spectrum (B, C_out, H, W//2+1) (and its backward reads
    grad_y's, as large) with 32-bit offsets: with C_out > C_in it passes 2^31 real values while x
    stays small. Such shapes leave Triton (the automatic choice) or raise (forced)."""
    from irno_kernels import backend as bk
    from irno_kernels import spectral_conv as sc

    # the reviewer's shape, on meta tensors (nothing allocated): 2 * 130 * 4096 * 2048 real values
    x = torch.empty(1, 1, 4096, 4094, device="meta")
    w = torch.empty(1, 130, 2, 1, dtype=torch.complex64, device="meta")
    extra = sc._spectrum_elements(x, w)
    assert extra == 2 * 130 * 4096 * 2048
    assert bk.resolve("spectral_conv2d", "cuda", None, (x, w), extra=extra) != "triton"
    fits = sc._spectrum_elements(x, w[:, :120])  # 2^31 - 2^24: below the 32-bit reach
    assert bk.resolve("spectral_conv2d", "cuda", None, (x, w[:, :120]), extra=fits) in ("cuda", "triton")
    # through the public op, the 32-bit limit lowered: x (1, 2, 8, 8) is 128 values, the spectrum of
    # 6 output channels 2 * 6 * 8 * 5 = 480
    monkeypatch.setattr(bk, "INT32_ELEMENTS", 400)
    x = torch.randn(1, 2, 8, 8)
    made = r"cannot run spectral_conv2d .* nor make one of 400 or more \(this call makes 480\)"
    with pytest.raises(RuntimeError, match=made):
        ik.spectral_conv2d(x, torch.randn(2, 6, 2, 2, dtype=torch.complex64), backend="triton")
    w = torch.randn(2, 2, 2, 2, dtype=torch.complex64)
    torch.testing.assert_close(ik.spectral_conv2d(x, w, backend="triton"), spectral_conv2d_ref(x, w))
