"""irno_kernels.periodic_pad_cat / periodic_pad2d: the reference pinned by hand, the Triton kernels
(through the interpreter on CPU) against it on odd shapes, layouts, halos up to the grid, several
inputs and mixed dtypes, forward, backward and forward mode; the GPU checks are marked ``gpu``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _cuda_graphs import replay_after_poisoning

import irno_kernels as ik

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = ik.available("periodic_pad2d", "triton", DEVICE)
needs_triton = pytest.mark.skipif(not TRITON, reason="needs triton (and a GPU or TRITON_INTERPRET=1)")
gpu = pytest.mark.gpu


def field(*shape, dtype=torch.float32, layout="contiguous", seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":  # a view with the grid dims swapped in memory
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":  # channels 1.. of a wider tensor
        t = torch.randn(shape[0], shape[1] + 1, *shape[2:], generator=g, dtype=dtype)[:, 1:]
    return t.to(device)


def test_reference_hand_computed():
    x = torch.arange(6.0).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    want = torch.tensor([[5.0, 3, 4, 5, 3],
                         [2.0, 0, 1, 2, 0],
                         [5.0, 3, 4, 5, 3],
                         [2.0, 0, 1, 2, 0]]).view(1, 1, 4, 5)
    torch.testing.assert_close(ik.periodic_pad_cat_ref([x], 1), want)
    y = torch.full((1, 1, 2, 3), 7.0)
    both = ik.periodic_pad_cat_ref([x, y], 1)
    assert both.shape == (1, 2, 4, 5)
    torch.testing.assert_close(both[:, :1], want)
    assert (both[:, 1] == 7).all()
    same = ik.periodic_pad2d(x, 0, backend="reference")
    torch.testing.assert_close(same, x)
    assert same.data_ptr() != x.data_ptr()  # a new tensor, never the input itself


CASES = [  # (input channel counts, B, H, W, halo)
    ((3,), 2, 5, 7, 1),
    ((2, 5), 1, 9, 4, 2),
    ((1, 1, 3), 2, 3, 3, 3),  # halo = the whole grid: 9 copies of every point
    ((4,), 1, 1, 6, 1),  # H = 1: the row wraps onto itself
    ((2, 3), 3, 6, 5, 0),  # no halo: a concatenation
]


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced"])
def test_triton_matches_reference(case, dtype, layout):
    chans, B, H, W, halo = case
    xs = [field(B, c, H, W, dtype=dtype, layout=layout, seed=k).requires_grad_() for k, c in enumerate(chans)]
    got = ik.periodic_pad_cat(xs, halo, backend="triton")
    want = ik.periodic_pad_cat_ref(xs, halo)
    assert got.shape == (B, sum(chans), H + 2 * halo, W + 2 * halo) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # a copy: bit for bit
    if layout == "channels_last" and chans[0] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)
    elif layout == "contiguous":
        assert got.is_contiguous()
    gy = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, xs, gy), torch.autograd.grad(want, xs, gy)):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e)
        if layout == "channels_last" and a.shape[1] > 1:
            assert a.is_contiguous(memory_format=torch.channels_last)


@needs_triton
def test_mixed_dtypes_out_dtype_and_grads_of_some_inputs():
    a = field(2, 3, 6, 5, dtype=torch.float64, seed=1).requires_grad_()
    b = field(2, 2, 6, 5, dtype=torch.float32, seed=2)  # no gradient wanted
    got = ik.periodic_pad_cat([a, b], 1, backend="triton")
    assert got.dtype == torch.float64  # promoted, as torch.cat
    torch.testing.assert_close(got, ik.periodic_pad_cat_ref([a, b], 1))
    low = ik.periodic_pad_cat([a, b], 1, out_dtype=torch.float32, backend="triton")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ik.periodic_pad_cat_ref([a, b], 1, torch.float32), rtol=0, atol=0)
    (ga,) = torch.autograd.grad(low.square().sum(), [a])
    (ea,) = torch.autograd.grad(ik.periodic_pad_cat_ref([a, b], 1, torch.float32).square().sum(), [a])
    assert ga.dtype == torch.float64
    torch.testing.assert_close(ga, ea)


@needs_triton
def test_gradcheck_and_forward_mode():
    from irno_kernels.triton.pad import periodic_pad_cat as tr

    a = field(1, 2, 4, 3, dtype=torch.float64, seed=3).requires_grad_()
    b = field(1, 1, 4, 3, dtype=torch.float64, seed=4).requires_grad_()
    torch.autograd.gradcheck(lambda p, q: tr([p, q], 2), (a, b), fast_mode=True)
    import torch.autograd.forward_ad as fwAD

    ta, tb = torch.randn_like(a), torch.randn_like(b)
    with fwAD.dual_level():
        out = tr([fwAD.make_dual(a.detach(), ta), fwAD.make_dual(b.detach(), tb)], 1)
        tangent = fwAD.unpack_dual(out).tangent
        # the public op hands tangents to the reference (its autograd has forward mode)
        ref = ik.periodic_pad_cat([fwAD.make_dual(a.detach(), ta), b.detach()], 1)
        ref_tangent = fwAD.unpack_dual(ref).tangent
    torch.testing.assert_close(tangent, ik.periodic_pad_cat_ref([ta, tb], 1))
    torch.testing.assert_close(ref_tangent, ik.periodic_pad_cat_ref([ta, torch.zeros_like(b)], 1))


@needs_triton
@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU every test already runs the GPU configurations")
def test_gpu_launch_configuration_under_the_interpreter(monkeypatch):
    """The GPU tiles (64 channels x 64 points): several channel blocks and point blocks per item."""
    from irno_kernels.triton import pad

    monkeypatch.setattr(pad, "INTERPRET", False)
    assert pad._blocks(70, 300) == (64, 64)
    xs = [field(2, 70, 11, 30, seed=5, layout="channels_last").requires_grad_(), field(2, 3, 11, 30, seed=6)]
    got = ik.periodic_pad_cat(xs, 1, backend="triton")
    torch.testing.assert_close(got, ik.periodic_pad_cat_ref(xs, 1), rtol=0, atol=0)
    gy = torch.randn_like(got)
    (a,) = torch.autograd.grad(got, xs[:1], gy)
    (e,) = torch.autograd.grad(ik.periodic_pad_cat_ref(xs, 1), xs[:1], gy)
    torch.testing.assert_close(a, e)


@needs_triton
def test_fields_beyond_32_bit_offsets_go_to_the_reference(monkeypatch):
    """The Triton kernels (pad and LayerNorm) address with 32-bit offsets: a field whose input or
    output reaches 2^31 elements runs the reference (the limit is lowered here to a small field)."""
    import irno_kernels.triton as tr
    from irno_kernels import _checks

    def refuse(*a, **k):
        raise AssertionError("the Triton kernel was called")

    monkeypatch.setattr(tr, "periodic_pad_cat", refuse)
    monkeypatch.setattr(tr, "channel_layer_norm", refuse)
    monkeypatch.setattr(_checks, "INT32_ELEMENTS", 100)
    x = field(1, 2, 6, 7)  # 84 elements in, 144 out with the halo
    torch.testing.assert_close(ik.periodic_pad2d(x, 1, backend="triton"), F.pad(x, (1,) * 4, mode="circular"))
    y = ik.channel_layer_norm(x, halo=1, backend="triton")
    torch.testing.assert_close(y, ik.channel_layer_norm_ref(x, halo=1))
    with pytest.raises(AssertionError, match="Triton kernel was called"):
        ik.periodic_pad2d(x, 0, backend="triton")  # 84 elements each way: the kernel


def test_views_reaching_beyond_32_bit_offsets_go_to_the_reference(monkeypatch):
    """A small view of a large tensor reaches as far into memory as its strides say: the guard
    counts that reach, not the view's elements (the limit is lowered here: a view of 60 elements whose
    batch stride spans 12 channels reaches 1 + 1*240 + 1*20 + 2*5 + 4*1 = 275 elements)."""
    import irno_kernels.triton as tr
    from irno_kernels import _checks

    def refuse(*a, **k):
        raise AssertionError("the Triton kernel was called")

    big = torch.randn(2, 12, 4, 5)
    view = big[:, :2, :3]
    assert view.numel() == 60 and _checks.reach(view) == 275
    assert _checks.reach(big) == big.numel() and _checks.reach(big.transpose(1, 3)) == big.numel()
    monkeypatch.setattr(tr, "periodic_pad_cat", refuse)
    monkeypatch.setattr(_checks, "INT32_ELEMENTS", 200)
    torch.testing.assert_close(ik.periodic_pad2d(view, 1, backend="triton"), F.pad(view, (1,) * 4, mode="circular"))
    monkeypatch.setattr(_checks, "INT32_ELEMENTS", 400)
    with pytest.raises(AssertionError, match="Triton kernel was called"):
        ik.periodic_pad2d(view, 1, backend="triton")


def test_bad_inputs_name_the_argument():
    x = torch.randn(1, 2, 4, 5)
    with pytest.raises(TypeError, match="xs: expected a non-empty sequence"):
        ik.periodic_pad_cat(x, 1)
    with pytest.raises(TypeError, match="xs: expected a non-empty sequence"):
        ik.periodic_pad_cat([], 1)
    with pytest.raises(ValueError, match=r"xs\[1\]: expected \(B, C, H, W\) = \(1, C, 4, 5\)"):
        ik.periodic_pad_cat([x, torch.randn(1, 2, 4, 6)], 1)
    with pytest.raises(ValueError, match=r"xs\[0\]: expected a 4-D tensor"):
        ik.periodic_pad2d(torch.randn(2, 4, 5), 1)
    with pytest.raises(ValueError, match="halo: a periodic halo of 5 wraps at most once"):
        ik.periodic_pad2d(x, 5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="halo: expected an int >= 0"):
            ik.periodic_pad2d(x, bad)
    with pytest.raises(ValueError, match="out_dtype"):
        ik.periodic_pad2d(x, 1, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"xs\[0\]: expected dtype"):
        ik.periodic_pad2d(x.long(), 1)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    """torch.compile(fullgraph) traces both ops (the Triton backend through its registered ops, with
    their fake kernels and autograd) and gives eager's values and gradients."""
    torch._dynamo.reset()
    a = field(2, 3, 5, 4, seed=16, device=DEVICE).requires_grad_()
    b = field(2, 2, 5, 4, seed=17, device=DEVICE).requires_grad_()

    def fn(p, q):
        y = ik.periodic_pad_cat([p, q], 1, backend=backend)
        return y.square().sum() + ik.periodic_upsample2x(p, 1, backend=backend).sin().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(a, b), fn(a, b)
    torch.testing.assert_close(got, want)
    for g, e in zip(torch.autograd.grad(got, [a, b]), torch.autograd.grad(want, [a, b])):
        torch.testing.assert_close(g, e)


# ---------------------------------------------------------------------------------------------
# periodic bilinear x2 upsampling with a halo
# ---------------------------------------------------------------------------------------------
def test_upsample_reference_hand_computed():
    # H = 1, W = 2: along W, 2j -> 1/4 x_{j-1} + 3/4 x_j and 2j+1 -> 3/4 x_j + 1/4 x_{j+1}
    x = torch.tensor([[[[0.0, 4.0]]]])
    row = torch.tensor([1.0, 1.0, 3.0, 3.0])
    torch.testing.assert_close(ik.periodic_upsample2x_ref(x), row.expand(2, 4).reshape(1, 1, 2, 4))
    torch.testing.assert_close(ik.periodic_upsample2x_ref(x, 1)[0, 0, 1], torch.tensor([3.0, 1, 1, 3, 3, 1]))
    from irno.models._layers import upsample2x_periodic  # the U-Net's own route, the same function

    y = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(ik.periodic_upsample2x_ref(y), upsample2x_periodic(y))


UP_CASES = [((2, 3, 5, 7), 1), ((1, 2, 1, 4), 2), ((2, 4, 6, 6), 0), ((1, 1, 2, 1), 2), ((1, 3, 3, 8), 6)]


@needs_triton
@pytest.mark.parametrize("case", UP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_upsample_triton_matches_reference(case, dtype, layout):
    shape, halo = case
    x = field(*shape, dtype=dtype, layout=layout, seed=11).requires_grad_()
    got = ik.periodic_upsample2x(x, halo, backend="triton")
    want = ik.periodic_upsample2x_ref(x, halo)
    assert got.shape == want.shape == (shape[0], shape[1], 2 * shape[2] + 2 * halo, 2 * shape[3] + 2 * halo)
    tol = {torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if layout == "channels_last" and shape[1] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)
    gy = torch.randn_like(want)
    (a,), (e,) = torch.autograd.grad(got, [x], gy), torch.autograd.grad(want, [x], gy)
    assert a.dtype == dtype
    torch.testing.assert_close(a, e, rtol=10 * tol, atol=10 * tol)


@needs_triton
def test_upsample_out_dtype_gradcheck_forward_mode_and_gpu_tiles(monkeypatch):
    from irno_kernels.triton import pad
    from irno_kernels.triton.pad import periodic_upsample2x as tr

    x = field(2, 3, 4, 5, dtype=torch.float64, seed=12).requires_grad_()
    low = ik.periodic_upsample2x(x, 1, out_dtype=torch.float32, backend="triton")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ik.periodic_upsample2x_ref(x, 1, torch.float32))
    torch.autograd.gradcheck(lambda t: tr(t, 2, torch.float64), (x[:1, :2, :3].detach().requires_grad_(),),
                             fast_mode=True)
    import torch.autograd.forward_ad as fwAD

    t = torch.randn_like(x)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(tr(fwAD.make_dual(x.detach(), t), 1, torch.float64)).tangent
    torch.testing.assert_close(tangent, ik.periodic_upsample2x_ref(t, 1))
    monkeypatch.setattr(pad, "INTERPRET", False)  # GPU tiles: 2 channel blocks, several point blocks
    y = field(1, 70, 9, 20, seed=13, layout="channels_last").requires_grad_()
    got = ik.periodic_upsample2x(y, 1, backend="triton")
    torch.testing.assert_close(got, ik.periodic_upsample2x_ref(y, 1), rtol=1e-6, atol=1e-6)
    gy = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, [y], gy)[0],
                               torch.autograd.grad(ik.periodic_upsample2x_ref(y, 1), [y], gy)[0],
                               rtol=1e-5, atol=1e-5)


def test_upsample_bad_inputs():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="x: expected a 4-D tensor"):
        ik.periodic_upsample2x(torch.randn(2, 3, 4), 1)
    with pytest.raises(ValueError, match="halo: a periodic halo of 7 wraps at most once"):
        ik.periodic_upsample2x(x, 7)
    with pytest.raises(ValueError, match="halo: expected an int >= 0"):
        ik.periodic_upsample2x(x, -1)
    with pytest.raises(ValueError, match="out_dtype"):
        ik.periodic_upsample2x(x, 1, out_dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_pad_cat_bf16_paper_sized_and_graph_capture(layout):
    """The decoder's input at 256 x 256 (skip fp32 + upsampled bf16 -> bf16, the autocast case): bit for
    bit the reference's values; the fp32 gradients fold to fp32 rounding; capture and replay."""
    skip = field(4, 16, 256, 256, layout=layout, seed=7).requires_grad_()
    up = field(4, 16, 256, 256, dtype=torch.bfloat16, layout=layout, seed=8).requires_grad_()
    got = ik.periodic_pad_cat([skip, up], 1, out_dtype=torch.bfloat16)
    want = ik.periodic_pad_cat_ref([skip, up], 1, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gy = torch.randn_like(want)
    got_g = torch.autograd.grad(got, [skip, up], gy)
    want_g = torch.autograd.grad(want, [skip, up], gy)
    # the reference adds the (up to 4) copies of an edge point in bf16, the kernel in fp32
    torch.testing.assert_close(got_g[0], want_g[0], rtol=2e-2, atol=6e-2)
    torch.testing.assert_close(got_g[1].float(), want_g[1].float(), rtol=2e-2, atol=6e-2)
    assert (got_g[0] - want_g[0]).abs().mean() < 1e-2  # off only by rounding, at the edges
    x = field(2, 8, 64, 96, layout=layout, seed=9)
    replayed, eager = replay_after_poisoning(lambda: (ik.periodic_pad2d(x, 1),))
    torch.testing.assert_close(replayed[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(eager[0], F.pad(x, (1,) * 4, mode="circular"), rtol=0, atol=0)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_circular_pad2d_takes_the_kernel(monkeypatch):
    from irno.models._layers import circular_pad2d

    calls = []
    real = ik.periodic_pad2d
    monkeypatch.setattr(ik, "periodic_pad2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = field(2, 5, 33, 47, layout="channels_last", seed=10).requires_grad_()
    y = circular_pad2d(x, 1)
    assert calls and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.pad(x, (1,) * 4, mode="circular"), rtol=0, atol=0)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_upsample_bf16_paper_sized_and_graph_capture():
    """The decoder's upsampling at 128 -> 256 (fp32 in, bf16 out with the halo, the autocast case):
    within one bf16 rounding of the reference; fp32 gradients to fp32 rounding; capture and replay."""
    x = field(4, 32, 128, 128, layout="channels_last", seed=14).requires_grad_()
    got = ik.periodic_upsample2x(x, 1, out_dtype=torch.bfloat16)
    want = ik.periodic_upsample2x_ref(x, 1, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert (got != want).float().mean() < 1e-3  # only values at a rounding tie of the fp32 sums differ
    x32 = x.detach().requires_grad_()
    got32, want32 = ik.periodic_upsample2x(x32, 1), ik.periodic_upsample2x_ref(x32, 1)
    torch.testing.assert_close(got32, want32, rtol=1e-6, atol=1e-6)
    gy = torch.randn_like(want32)
    torch.testing.assert_close(torch.autograd.grad(got32, [x32], gy)[0], torch.autograd.grad(want32, [x32], gy)[0],
                               rtol=1e-5, atol=1e-5)
    small = field(2, 8, 32, 48, layout="channels_last", seed=15)
    replayed, eager = replay_after_poisoning(lambda: (ik.periodic_upsample2x(small, 1),))
    torch.testing.assert_close(replayed[0], eager[0], rtol=0, atol=0)
