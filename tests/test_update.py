"""residual_update / refine_update (and in-place forms): every backend against the reference."""

import pytest
import torch
from conftest import tol

import irno_kernels as ik

needs_c = pytest.mark.skipif(not ik.HAS_C, reason="irno_kernels._C not built")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(1, 1, 33, 47), (2, 3, 16, 24), (3, 4, 128, 384), (2, 5, 7), (2, 3, 5, 6, 7)]


def _backends(device):
    return [b for b in ("cpu", "cuda", "triton") if ik.available("refine_update", b, device)]


def _rand(shape, dtype, device, noncontig=False, requires_grad=False):
    if noncontig:  # a transposed view with the requested logical shape
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype, device=device).transpose(-1, -2)
        assert not t.is_contiguous()
    else:
        t = torch.randn(*shape, dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


@needs_c
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noncontig", [False, True])
def test_residual_update_matches_reference(device, shape, dtype, noncontig):
    for backend in [b for b in _backends(device)]:
        h = _rand(shape, dtype, device, noncontig, True)
        phi = _rand(shape, dtype, device, noncontig, True)
        g = torch.randn(shape, dtype=dtype, device=device)
        out = ik.residual_update(h, phi, 0.2, backend=backend)
        ref = ik.residual_update_ref(h, phi, 0.2)
        rtol, atol = tol(dtype)
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
        got = torch.autograd.grad(out, (h, phi), g)
        want = torch.autograd.grad(ref, (h, phi), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@needs_c
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("noncontig", [False, True])
def test_refine_update_matches_reference(device, shape, dtype, bias, noncontig):
    B, Co, *S = shape
    F = 6
    rtol, atol = tol(dtype)
    for backend in _backends(device):
        h = _rand(shape, dtype, device, noncontig, True)
        z = _rand((B, F, *S), dtype, device, noncontig, True)
        w = torch.randn(Co, F, dtype=dtype, device=device, requires_grad=True)
        b = torch.randn(Co, dtype=dtype, device=device, requires_grad=True) if bias else None
        g = torch.randn(shape, dtype=dtype, device=device)
        out = ik.refine_update(h, z, w, b, 0.3, backend=backend)
        ref = ik.refine_update_ref(h, z, w, b, 0.3)
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol * F)
        inputs = [t for t in (h, z, w, b) if t is not None]
        got = torch.autograd.grad(out, inputs, g)
        want = torch.autograd.grad(ref, inputs, g)
        if dtype == torch.float64:
            for a, c in zip(got, want):
                torch.testing.assert_close(a, c, rtol=rtol * 10, atol=atol * 100)
            continue
        # float32: the weight and bias gradients are sums over every grid point (147k terms at 128 x
        # 384), whose rounding depends on the summation order (the BLAS build, the CPU's vector width):
        # each side is compared with a float64 computation, ours within twice the reference's error
        d64 = [t.detach().double().requires_grad_() for t in inputs]
        ref64 = ik.refine_update_ref(*d64[:3], d64[3] if bias else None, 0.3)
        exact = torch.autograd.grad(ref64, d64, g.double())
        for a, c, e in zip(got, want, exact):
            ours, theirs = (a.double() - e).abs().max().item(), (c.double() - e).abs().max().item()
            assert ours <= 2 * theirs + atol * 10 * max(1.0, e.abs().max().item()), (backend, ours, theirs)


@needs_c
def test_refine_update_accepts_conv_weight():
    h, z = torch.randn(2, 3, 9, 11), torch.randn(2, 5, 9, 11)
    conv = torch.nn.Conv2d(5, 3, 1)
    with torch.no_grad():
        out = ik.refine_update(h, z, conv.weight, conv.bias, 0.5)
        torch.testing.assert_close(out, h + 0.5 * conv(z), rtol=1e-5, atol=1e-5)


@needs_c
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    h = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = tuple(t for t in (h, z, w, b) if t is not None)

    def refine(*a):
        return ik.refine_update(a[0], a[1], a[2], a[3] if bias else None, 0.3, backend="cpu")

    assert torch.autograd.gradcheck(refine, inputs)
    assert torch.autograd.gradcheck(lambda a, c: ik.residual_update(a, c, -0.7, backend="cpu"), (h, z[:, :3]))


@needs_c
@pytest.mark.parametrize("inplace", ["residual_update_", "refine_update_"])
@pytest.mark.parametrize("noncontig", [False, True])
def test_inplace_matches_out_of_place(inplace, noncontig):
    for device in DEVICES:
        h = _rand((2, 3, 10, 13), torch.float32, device, noncontig)
        z = torch.randn(2, 4, 10, 13, device=device)
        w, b = torch.randn(3, 4, device=device), torch.randn(3, device=device)
        if inplace == "residual_update_":
            want = ik.residual_update_ref(h, z[:, :3], 0.2)
            got = ik.residual_update_(h, z[:, :3], 0.2)
        else:
            want = ik.refine_update_ref(h, z, w, b, 0.2)
            got = ik.refine_update_(h, z, w, b, 0.2)
        assert got is h
        torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)


def test_inplace_refuses_autograd():
    h = torch.randn(1, 2, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="residual_update_ works in place"):
        ik.residual_update_(h, torch.randn(1, 2, 4, 4), 0.1)
    with pytest.raises(RuntimeError, match="refine_update_ works in place"):
        ik.refine_update_(torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4), torch.randn(2, 3, requires_grad=True),
                          None, 0.1)


@needs_c
def test_opcheck_all_update_ops():
    h = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.irno.residual_update.default, (h, z[:, :3].detach().clone(), 0.2))
    torch.library.opcheck(torch.ops.irno.refine_update.default, (h, z, w, b, 0.3))
    torch.library.opcheck(torch.ops.irno.refine_update.default, (h, z, w, None, 0.3))
    d = [t.detach() for t in (h, z, w, b)]
    torch.library.opcheck(torch.ops.irno.residual_update_.default, (d[0].clone(), d[1][:, :3].clone(), 0.2))
    torch.library.opcheck(torch.ops.irno.refine_update_.default, (d[0].clone(), d[1], d[2], d[3], 0.2))


@needs_c
def test_torch_compile_fullgraph():
    h = torch.randn(2, 3, 6, 5, requires_grad=True)
    z = torch.randn(2, 4, 6, 5, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)

    def step(h, z, w):
        return ik.residual_update(ik.refine_update(h, z, w, None, 0.2), h, 0.5)

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(h, z, w)
    ref = ik.residual_update_ref(ik.refine_update_ref(h, z, w, None, 0.2), h, 0.5)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, c in zip(torch.autograd.grad(out, (h, z, w), g), torch.autograd.grad(ref, (h, z, w), g)):
        torch.testing.assert_close(a, c)


BAD = [
    ("h", lambda: ik.residual_update(torch.randn(0, 3), torch.randn(0, 3), 0.1), "non-empty"),
    ("phi", lambda: ik.residual_update(torch.randn(2, 3), torch.randn(2, 4), 0.1), r"phi: expected shape \(2, 3\)"),
    ("phi", lambda: ik.residual_update(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), 0.1),
     "phi: expected dtype torch.float32"),
    ("alpha", lambda: ik.residual_update(torch.randn(2, 3), torch.randn(2, 3), float("nan")), "alpha"),
    ("h", lambda: ik.residual_update(torch.randint(0, 3, (2, 3)), torch.randn(2, 3), 0.1), "h: expected dtype"),
    ("z", lambda: ik.refine_update(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 5), torch.randn(3, 5), None, 1.0),
     "z: expected shape"),
    ("z", lambda: ik.refine_update(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4), torch.randn(3, 5), None, 1.0),
     "z: expected 4 dims"),
    ("weight", lambda: ik.refine_update(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), torch.randn(3, 4),
                                        None, 1.0), r"weight: expected shape \(3, 5\)"),
    ("weight", lambda: ik.refine_update(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4),
                                        torch.randn(3, 5, 3, 3), None, 1.0), "weight: expected .* 1x1 conv"),
    ("bias", lambda: ik.refine_update(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), torch.randn(3, 5),
                                      torch.randn(4), 1.0), r"bias: expected shape \(3,\)"),
    ("h", lambda: ik.refine_update(torch.randn(3), torch.randn(2, 5, 4, 4), torch.randn(3, 5), None, 1.0),
     "h: expected at least 2 dims"),
    ("h", lambda: ik.refine_update("h", torch.randn(2, 5, 4, 4), torch.randn(3, 5), None, 1.0),
     "h: expected a torch.Tensor"),
    ("bias", lambda: ik.refine_update(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), torch.randn(3, 5), 0.0, 1.0),
     "bias: expected a torch.Tensor, got float"),
    ("alpha", lambda: ik.residual_update(torch.randn(2, 3), torch.randn(2, 3), "0.5"),
     "alpha: expected a real number, got str"),
]


@pytest.mark.parametrize("arg,call,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_name_the_argument(arg, call, match):
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        call()


@needs_c
def test_compiled_ops_check_their_arguments():
    """Direct torch.ops calls (bypassing the wrappers) raise RuntimeError naming the argument."""
    with pytest.raises(RuntimeError, match="phi: expected shape"):
        torch.ops.irno.residual_update(torch.randn(2, 3), torch.randn(3, 2), 0.1)
    with pytest.raises(RuntimeError, match="weight: expected shape"):
        torch.ops.irno.refine_update(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(5, 3), None, 0.1)
    with pytest.raises(RuntimeError, match="h: expected a non-empty tensor"):
        torch.ops.irno.residual_update(torch.randn(0, 3), torch.randn(0, 3), 0.1)
    with pytest.raises(RuntimeError, match="z: expected dtype"):
        torch.ops.irno.refine_update(torch.randn(2, 3, 4), torch.randn(2, 5, 4).double(), torch.randn(3, 5), None, 1.0)


@pytest.mark.gpu
def test_cuda_device_mismatch_is_an_error():
    with pytest.raises((RuntimeError, ValueError), match="phi: expected a tensor on cuda"):
        ik.residual_update(torch.randn(2, 3, device="cuda"), torch.randn(2, 3), 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_error_within_twice_pytorch(dtype):
    h, z = torch.randn(4, 3, 64, 64, device="cuda"), torch.randn(4, 16, 64, 64, device="cuda")
    w, b = torch.randn(3, 16, device="cuda") / 4, torch.randn(3, device="cuda")
    exact = ik.refine_update_ref(h.double(), z.double(), w.double(), b.double(), 0.2)
    ours = ik.refine_update(h.to(dtype), z.to(dtype), w.to(dtype), b.to(dtype), 0.2, backend="cuda")
    torch_lp = ik.refine_update_ref(h.to(dtype), z.to(dtype), w.to(dtype), b.to(dtype), 0.2)
    err_ours = (ours.double() - exact).abs().max()
    err_torch = (torch_lp.double() - exact).abs().max()
    assert err_ours <= 2 * err_torch + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("co", [1, 3])
@pytest.mark.parametrize("alias", ["same", "shifted"])
def test_cuda_inplace_ops_read_overlapping_inputs_from_a_copy(co, alias):
    """The registered CUDA in-place ops called directly (no Python wrapper): z or phi sharing h's
    memory (h itself, or a view one channel plane further / one row back in h's buffer) gives the
    values of the out-of-place op on the inputs before the update."""
    if not ik.available("refine_update", "cuda", "cuda"):
        pytest.skip("CUDA kernels not built")
    dev, f64 = "cuda", torch.float64
    w, b = torch.randn(co, co, dtype=f64, device=dev), torch.randn(co, dtype=f64, device=dev)
    n, plane = 2 * co * 4000, 4000  # enough points for many blocks: a race shows
    buf = torch.randn(n + plane, dtype=f64, device=dev)
    h = buf[:n].view(2, co, 50, 80)
    z = h if alias == "same" else buf[plane:].view(2, co, 50, 80)
    want = ik.refine_update_ref(h, z, w, b, 0.5)
    with torch.no_grad():
        torch.ops.irno.refine_update_(h, z, w, b, 0.5)
    torch.testing.assert_close(h, want)

    buf = torch.randn(n + 80, dtype=f64, device=dev)
    h = buf[80:].view(2, co, 50, 80)
    phi = h if alias == "same" else buf[:n].view(2, co, 50, 80)
    want = h + 0.5 * phi
    with torch.no_grad():
        torch.ops.irno.residual_update_(h, phi, 0.5)
    torch.testing.assert_close(h, want)


def test_forward_mode_ad_uses_the_reference():
    """The compiled kernels have no forward-AD formula: auto falls back to the reference (exact
    tangents); forcing a kernel under forward AD is an error, never a silent zero tangent."""
    import torch.autograd.forward_ad as fwAD

    h, z = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 4, 5, 4, dtype=torch.float64)
    w, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, 5, 4, dtype=torch.float64)
    with fwAD.dual_level():
        out = ik.refine_update(h, fwAD.make_dual(z, t), w, None, 0.3)
        tangent = fwAD.unpack_dual(out).tangent
        torch.testing.assert_close(tangent, 0.3 * torch.einsum("of,bfhw->bohw", w, t))
        if ik.HAS_C:
            with pytest.raises(RuntimeError, match="no forward-mode AD formula"):
                ik.residual_update(fwAD.make_dual(h, h), h, 0.3, backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_inplace_every_backend_on_strided_h(backend):
    if not ik.available("refine_update", backend, "cpu"):
        pytest.skip(f"{backend} not available on cpu")
    h = _rand((2, 3, 9, 11), torch.float32, "cpu", noncontig=True)
    z, w, b = torch.randn(2, 4, 9, 11), torch.randn(3, 4), torch.randn(3)
    want_r = ik.residual_update_ref(h, z[:, :3], 0.3)
    want = ik.refine_update_ref(want_r, z, w, b, 0.2)
    ik.residual_update_(h, z[:, :3], 0.3, backend=backend)
    ik.refine_update_(h, z, w, b, 0.2, backend=backend)
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)


@needs_c
@pytest.mark.parametrize("co", [1, 3, 4, 11])
def test_refine_update_both_cpu_paths_in_and_out_of_place(co):
    """Few output channels take the fused loop, many take a batched GEMM: both match the reference."""
    h, z = torch.randn(2, co, 13, 17, dtype=torch.float64), torch.randn(2, 6, 13, 17, dtype=torch.float64)
    w, b = torch.randn(co, 6, dtype=torch.float64), torch.randn(co, dtype=torch.float64)
    want = ik.refine_update_ref(h, z, w, b, 0.3)
    torch.testing.assert_close(ik.refine_update(h, z, w, b, 0.3, backend="cpu"), want)
    hc = h.clone()
    ik.refine_update_(hc, z, w, b, 0.3, backend="cpu")
    torch.testing.assert_close(hc, want)
    ht = h.transpose(-1, -2).contiguous().transpose(-1, -2)  # strided h, in place
    ik.refine_update_(ht, z, w, None, 0.3, backend="cpu")
    torch.testing.assert_close(ht, ik.refine_update_ref(h, z, w, None, 0.3))


def test_alpha_takes_numbers_numpy_scalars_and_0d_tensors():
    np = pytest.importorskip("numpy")
    h, phi = torch.randn(2, 3), torch.randn(2, 3)
    for alpha in (1, 0.5, np.float32(0.5), np.int64(2), torch.tensor(0.5)):
        torch.testing.assert_close(ik.residual_update(h, phi, alpha), h + float(alpha) * phi)
    with pytest.raises(TypeError, match="alpha: expected a real number, got bytes"):
        ik.residual_update(h, phi, b"0.5")


needs_triton = pytest.mark.skipif(not ik.available("residual_update", "triton", "cpu"),
                                  reason="needs triton with TRITON_INTERPRET=1")


@needs_triton
def test_inplace_ops_check_the_triton_32_bit_reach(monkeypatch):
    """The in-place forms pass their tensors to the backend choice like the out-of-place ones, so a
    view reaching past the Triton kernels' 32-bit offsets is refused (the limit is lowered here)."""
    from irno_kernels import backend as bk

    monkeypatch.setattr(bk, "TRITON_MAX_ELEMENTS", 100)
    h = torch.zeros(2, 12, 4, 4)[:, :3]  # 96 elements reaching 368 into the storage
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="cannot run residual_update on a tensor of 100 elements"):
            ik.residual_update_(h, torch.ones(2, 3, 4, 4), 0.5, backend="triton")
        with pytest.raises(RuntimeError, match="cannot run refine_update on a tensor of 100 elements"):
            ik.refine_update_(h, torch.ones(2, 2, 4, 4), torch.ones(3, 2), None, 0.5, backend="triton")
    assert h.abs().max() == 0  # refused before any kernel wrote


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("op", ["residual", "refine"])
def test_inplace_ops_bump_the_version_counter(backend, op):
    """Every backend's in-place form bumps h's version counter once, so that a backward needing the
    old value raises instead of computing a silently wrong gradient."""
    if not ik.available(f"{op}_update", backend, "cpu"):
        pytest.skip(f"{backend} not available on cpu")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = x * 2
    s = y.sin()  # saves y for its backward
    v = y._version
    with torch.no_grad():
        if op == "residual":
            ik.residual_update_(y, torch.ones_like(y), 0.5, backend=backend)
        else:
            ik.refine_update_(y, torch.ones(2, 2, 4, 4), torch.ones(3, 2), None, 0.5, backend=backend)
    assert y._version == v + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("co", [3, 4])  # the CPU kernel's fused loop and its batched GEMM
@pytest.mark.parametrize("alias", ["same", "shifted"])
def test_refine_update_inplace_with_z_overlapping_h(backend, co, alias):
    """z may share memory with h (z is h, or a view one channel further into h's buffer): the kernels
    write h's channels one after another, and must not read a z that was already overwritten."""
    if not ik.available("refine_update", backend, "cpu"):
        pytest.skip(f"{backend} not available on cpu")
    w, b = torch.randn(co, co, dtype=torch.float64), torch.randn(co, dtype=torch.float64)
    calls = [lambda h, z: ik.refine_update_(h, z, w, b, 0.5, backend=backend)]
    if backend == "cpu":  # the registered op itself too, without the wrapper
        calls.append(lambda h, z: torch.ops.irno.refine_update_(h, z, w, b, 0.5))
    for call in calls:
        n = 2 * co * 30
        buf = torch.randn(n + 30, dtype=torch.float64)
        h = buf[:n].view(2, co, 5, 6)  # contiguous: the kernels write it directly
        z = h if alias == "same" else buf[30:].view(2, co, 5, 6)
        want = ik.refine_update_ref(h, z, w, b, 0.5)
        with torch.no_grad():
            call(h, z)
        torch.testing.assert_close(h, want)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("alias", ["same", "shifted"])
def test_residual_update_inplace_with_phi_overlapping_h(backend, alias):
    """phi may share memory with h: h itself (element for element: fine as is) or a view one row back in
    h's buffer, which the kernels would read after updating it (and add_ refuses): h += alpha * phi
    with phi's values before the update, on every backend."""
    if not ik.available("residual_update", backend, "cpu"):
        pytest.skip(f"{backend} not available on cpu")
    buf = torch.randn(2 * 3 * 30 + 6, dtype=torch.float64)
    h = buf[6:].view(2, 3, 5, 6)
    phi = h if alias == "same" else buf[:180].view(2, 3, 5, 6)  # a forward sweep overwrites phi before reading it
    want = h + 0.5 * phi
    with torch.no_grad():
        ik.residual_update_(h, phi, 0.5, backend=backend)
    torch.testing.assert_close(h, want)
