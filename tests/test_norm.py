"""channel_layer_norm: the reference against the definition, argument errors, the Triton kernel (through
the interpreter on CPU) against the reference forward and backward on odd shapes and layouts, opcheck,
and on a GPU: 16-bit error, paper-sized fields and CUDA-graph replay (marked gpu)."""

from __future__ import annotations

import pytest
import torch
from _cuda_graphs import replay_after_poisoning
from irno.models import ChannelLayerNorm

import irno_kernels as ik

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _definition(x, w, b, eps):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).square().mean(1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.view(shape)
    if b is not None:
        y = y + b.view(shape)
    return y


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 11), (2, 4, 3, 5, 6), (3, 1, 4, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_reference_is_the_definition(shape, affine):
    x = torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(shape[1], dtype=torch.float64) if affine else None
    b = torch.randn(shape[1], dtype=torch.float64) if affine else None
    torch.testing.assert_close(ik.channel_layer_norm_ref(x, w, b, 1e-3), _definition(x, w, b, 1e-3))
    torch.testing.assert_close(ik.channel_layer_norm(x, w, b, 1e-3), _definition(x, w, b, 1e-3))


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\)"):
        ik.channel_layer_norm(x, torch.ones(4))
    with pytest.raises(ValueError, match=r"bias: expected a 1-D tensor"):
        ik.channel_layer_norm(x, torch.ones(3), torch.ones(3, 1))
    with pytest.raises(ValueError, match="eps: expected a number >= 0"):
        ik.channel_layer_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="x: expected at least 2 dims"):
        ik.channel_layer_norm(torch.randn(5))
    with pytest.raises(ValueError, match="backend: expected one of"):
        ik.channel_layer_norm(x, backend="fast")
    with pytest.raises(RuntimeError, match="has no compiled kernel.*'reference' and 'triton'"):
        ik.channel_layer_norm(x, backend="cpu")


def test_module_matches_reference_and_trains():
    m = ChannelLayerNorm(4).double()
    with torch.no_grad():
        m.weight.normal_(), m.bias.normal_()
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(m(x), _definition(x, m.weight, m.bias, m.eps))
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))


# ---------------------------------------------------------------------------------------------
# the Triton kernel (interpreter on CPU, compiled on a GPU)
# ---------------------------------------------------------------------------------------------
triton_only = pytest.mark.skipif(not ik.available("channel_layer_norm", "triton", DEVICE),
                                 reason="needs triton (and a GPU or TRITON_INTERPRET=1)")


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


def _compare(shape, dtype, layout="contiguous", affine=True, eps=1e-5, factor=1.0, activation=None, halo=0,
             out_dtype=None, in_bias=False):
    g = torch.Generator().manual_seed(sum(shape))
    x = _layout(torch.randn(*shape, dtype=dtype, generator=g).to(DEVICE), layout).requires_grad_()
    w = (torch.randn(shape[1], dtype=dtype, generator=g).to(DEVICE).requires_grad_() if affine else None)
    b = (torch.randn(shape[1], dtype=dtype, generator=g).to(DEVICE).requires_grad_() if affine else None)
    s = (3 * torch.randn(shape[1], dtype=dtype, generator=g)).to(DEVICE).requires_grad_() if in_bias else None
    kw = {"activation": activation, "halo": halo, "out_dtype": out_dtype, "in_bias": s}
    y = ik.channel_layer_norm(x, w, b, eps, backend="triton", **kw)
    want = ik.channel_layer_norm_ref(x, w, b, eps, **kw)
    out_shape = (*shape[:-2], shape[-2] + 2 * halo, shape[-1] + 2 * halo) if halo else shape
    assert y.dtype == (out_dtype or x.dtype) and y.shape == want.shape == out_shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)  # the layout is kept
    rtol = (1e-5 if torch.float32 in (dtype, y.dtype) else 1e-10) * factor
    torch.testing.assert_close(y, want, rtol=rtol, atol=rtol)
    with torch.no_grad():  # the direct launch (no registered op) gives the same values
        direct = ik.channel_layer_norm(x, w, b, eps, backend="triton", **kw)
    from irno_kernels.triton.norm import MAX_CHANNELS

    if shape[1] > MAX_CHANNELS:  # with a gradient the reference ran, without it the forward kernel
        torch.testing.assert_close(direct, y.detach(), rtol=rtol, atol=rtol)
    else:
        assert torch.equal(direct, y.detach())
    gy = torch.randn(*out_shape, dtype=y.dtype, generator=g).to(DEVICE)
    leaves = [t for t in (x, w, b, s) if t is not None]
    for a, e in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(want, leaves, gy)):
        torch.testing.assert_close(a, e, rtol=rtol * 10, atol=rtol * 10 * max(1.0, e.abs().max().item()))


@triton_only
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 16, 12, 10), (3, 3, 11), (1, 33, 5, 6), (2, 1, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_matches_reference(shape, dtype):
    _compare(shape, dtype)


@triton_only
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_triton_strided_layouts_and_no_affine(layout):
    _compare((2, 6, 9, 7), torch.float32, layout)
    _compare((2, 6, 9, 7), torch.float64, layout, affine=False, eps=0.0)


@triton_only
@pytest.mark.parametrize("C", [128, 129])
def test_triton_widest_tile_and_the_reference_beyond(C):
    _compare((2, C, 5, 7), torch.float32)


@triton_only
@pytest.mark.parametrize("gelu,halo,out_dtype", [(False, 0, None), (True, 1, torch.bfloat16), (True, 0, None)])
def test_triton_beyond_the_widest_tile_under_autocast_computes_in_float32(monkeypatch, gelu, halo, out_dtype):
    """C > MAX_CHANNELS (the U-Net's 256-channel bottleneck) runs the reference inside the Triton
    backend, with autocast turned off by the caller around a 16-bit x and float32 weights: CUDA's
    layer_norm refuses that mix, so the reference must see one dtype (float32, as autocast's
    layer_norm), and return float32 (or out_dtype) like the kernel."""
    import torch.nn.functional as F

    real = F.layer_norm
    seen = []

    def strict(x, shape, weight=None, bias=None, eps=1e-5):
        seen.append((x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype))
        assert weight is None or weight.dtype == x.dtype, (x.dtype, weight.dtype)
        return real(x, shape, weight, bias, eps)

    monkeypatch.setattr(F, "layer_norm", strict)
    x = torch.randn(2, 200, 5, 6, device=DEVICE).bfloat16().requires_grad_()  # training: the reference
    w, b = torch.randn(200, device=DEVICE), torch.randn(200, device=DEVICE)
    act = "gelu" if gelu else None
    with torch.autocast(DEVICE, torch.bfloat16):
        y = ik.channel_layer_norm(x, w, b, activation=act, halo=halo, out_dtype=out_dtype, backend="triton")
    assert seen == [(torch.float32, torch.float32, torch.float32)]
    assert y.dtype == (out_dtype or torch.float32)
    want = ik.channel_layer_norm_ref(x.float(), w, b, activation=act, halo=halo)
    torch.testing.assert_close(y, want.to(y.dtype))


@pytest.mark.parametrize("C", [200, 256])
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=triton_only),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_wide_channel_kernels_forward_and_backward(monkeypatch, device, C):
    """The kernels themselves at MAX_CHANNELS < C <= 256 (the GPU tiles; on CPU through the
    interpreter), forward and every gradient against the reference: the check that would let
    MAX_CHANNELS rise to 256 (the U-Net's bottleneck in training). On an H200 (tree fb66a22, a tile
    that spilled) the weight and bias gradients came out wrong at C = 200, so the public entry point
    sends C > MAX_CHANNELS with gradients to the reference; a pass on a GPU says the fault is gone."""
    from irno_kernels.triton import norm as tn

    if device == "cpu" and DEVICE != "cpu":
        pytest.skip("the interpreter runs on CPU-only machines")
    if device == "cpu":
        monkeypatch.setattr(tn, "INTERPRET", False)
    g = torch.Generator().manual_seed(C)
    x = torch.randn(2, C, 9, 10, generator=g).to(device).requires_grad_()
    w = torch.randn(C, generator=g).to(device).requires_grad_()
    b = torch.randn(C, generator=g).to(device).requires_grad_()
    y = tn._EagerChannelLayerNorm.apply(x, w, b, 1e-5, True, 1, None)
    want = ik.channel_layer_norm_ref(x, w, b, 1e-5, activation="gelu", halo=1)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    gy = torch.randn(want.shape, generator=g).to(device)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(want, (x, w, b), gy)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()))


@triton_only
@pytest.mark.parametrize("C", [129, 200, 256, 257])
def test_triton_wide_fields_take_the_forward_kernel_when_no_gradient_follows(monkeypatch, C):
    """Inference through the U-Net's 256-channel bottleneck: MAX_CHANNELS < C <= MAX_CHANNELS_FORWARD
    runs the forward kernel (on CPU with the GPU tiles, under the interpreter) when no gradient can
    follow, equal to the reference, also under bf16 autocast (16-bit x read as it is, float32 out);
    with an input that requires grad, under forward-mode AD, or for wider fields, the reference."""
    import torch.autograd.forward_ad as fwAD

    from irno_kernels.triton import norm as tn

    if DEVICE == "cpu":
        monkeypatch.setattr(tn, "INTERPRET", False)
    kernel = C <= tn.MAX_CHANNELS_FORWARD
    calls = []
    monkeypatch.setattr(tn, "_cln_fwd", lambda *a, _f=tn._cln_fwd: calls.append(a[0].shape[1]) or _f(*a))
    g = torch.Generator().manual_seed(C)
    x = torch.randn(2, C, 5, 7, generator=g).to(DEVICE)
    w, b = torch.randn(C, generator=g).to(DEVICE), torch.randn(C, generator=g).to(DEVICE)
    with torch.no_grad():
        y = ik.channel_layer_norm(x, w, b, activation="gelu", halo=1, backend="triton")
    assert calls == ([C] if kernel else [])
    want = ik.channel_layer_norm_ref(x, w, b, activation="gelu", halo=1)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast(DEVICE, torch.bfloat16):
        yb = ik.channel_layer_norm(x.bfloat16(), w, b, activation="gelu", halo=1, backend="triton")
    assert yb.dtype == torch.float32 and calls == ([C, C] if kernel else [])
    torch.testing.assert_close(yb, ik.channel_layer_norm_ref(x.bfloat16().float(), w, b, activation="gelu", halo=1))
    calls.clear()
    ik.channel_layer_norm(x.clone().requires_grad_(), w, b, backend="triton")
    with fwAD.dual_level():  # a tangent on the weight: the reference carries it
        y = tn.channel_layer_norm(x, fwAD.make_dual(w, torch.ones_like(w)), b, 1e-5)
        tangent = fwAD.unpack_dual(y).tangent
    assert calls == [] and tangent is not None


@triton_only
@pytest.mark.parametrize("shape,halo", [((2, 5, 7, 9), 1), ((1, 16, 3, 10), 2), ((2, 3, 4, 5), 4), ((1, 4, 1, 6), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_fused_gelu_and_periodic_halo(shape, halo, dtype):
    """GELU and the periodic halo (up to the whole grid: a point then has all nine copies), forward and
    backward (the halo's gradient folded back), against the reference's F.gelu + circular F.pad."""
    _compare(shape, dtype, activation="gelu", halo=halo)
    _compare(shape, dtype, activation="gelu")
    _compare(shape, dtype, halo=halo, affine=False)


@triton_only
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_triton_fused_layouts_and_out_dtype(layout):
    _compare((2, 6, 9, 7), torch.float32, layout, activation="gelu", halo=1)
    _compare((2, 6, 9, 7), torch.float64, layout, activation="gelu", halo=1, out_dtype=torch.float32)
    _compare((2, 6, 9, 7), torch.float32, layout, activation="gelu", out_dtype=torch.float64)


@triton_only
@pytest.mark.parametrize("shape,layout", [((2, 5, 7, 9), "contiguous"), ((1, 16, 3, 10), "channels_last"),
                                          ((2, 3, 6, 5), "transposed"), ((1, 129, 4, 5), "contiguous")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_in_bias_is_added_before_the_norm(shape, layout, dtype):
    """in_bias (a conv's bias folded into the norm that reads the conv's output): forward and every
    gradient, in_bias's included, against the reference's x + in_bias; with and without the fusions,
    the affine parameters, and beyond the widest tile (C = 129: the reference with a gradient)."""
    _compare(shape, dtype, layout, activation="gelu", halo=1, in_bias=True)
    _compare(shape, dtype, layout, in_bias=True)
    _compare(shape, dtype, layout, affine=False, in_bias=True)


@triton_only
def test_triton_in_bias_gpu_launch_configuration_under_the_interpreter(monkeypatch):
    """Several chunks per batch item: the in_bias gradient is summed from per-program partial rows."""
    from irno_kernels.triton import norm

    monkeypatch.setattr(norm, "INTERPRET", False)
    _compare((2, 20, 40, 30), torch.float32, activation="gelu", halo=1, in_bias=True)


def test_reference_in_bias_is_a_bias_on_x():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    w, b, s = (torch.randn(3, dtype=torch.float64) for _ in range(3))
    want = _definition(x + s[:, None, None], w, b, 1e-5)
    torch.testing.assert_close(ik.channel_layer_norm_ref(x, w, b, in_bias=s), want)
    torch.testing.assert_close(ik.channel_layer_norm(x, w, b, in_bias=s), want)
    # in x's dtype, as a convolution with that bias gives its output
    assert ik.channel_layer_norm(x.float(), w.float(), b.float(), in_bias=s).dtype == torch.float32


@triton_only
def test_triton_fused_gpu_launch_configuration_under_the_interpreter(monkeypatch):
    from irno_kernels.triton import norm

    monkeypatch.setattr(norm, "INTERPRET", False)
    _compare((2, 20, 40, 30), torch.float32, activation="gelu", halo=1)


def test_fused_arguments_are_checked():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="activation: expected one of"):
        ik.channel_layer_norm(x, activation="relu")
    with pytest.raises(ValueError, match="halo: expected an int >= 0"):
        ik.channel_layer_norm(x, halo=-1)
    with pytest.raises(ValueError, match="halo: a periodic halo of 5 needs a 4-D x"):
        ik.channel_layer_norm(x, halo=5)
    with pytest.raises(ValueError, match="halo: a periodic halo of 1 needs a 4-D x"):
        ik.channel_layer_norm(torch.randn(2, 3, 7), halo=1)
    with pytest.raises(ValueError, match="out_dtype: expected None or one of"):
        ik.channel_layer_norm(x, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"in_bias: expected shape \(3,\)"):
        ik.channel_layer_norm(x, in_bias=torch.ones(4))
    with pytest.raises(ValueError, match="in_bias"):
        ik.channel_layer_norm(x, in_bias=torch.ones(3, 1))


def test_reference_fusions_are_gelu_then_circular_pad():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    y = _definition(x, w, b, 1e-5)
    want = torch.nn.functional.pad(torch.nn.functional.gelu(y), (2, 2, 2, 2), mode="circular").float()
    got = ik.channel_layer_norm(x, w, b, activation="gelu", halo=2, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


@triton_only
def test_triton_gradcheck():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ik.channel_layer_norm(*a, backend="triton"), (x, w, b))
    # fused: a halo of 2 on a 3 x 2 grid, so points have several copies (fast mode: few launches)
    x, w, b = x[:1, :, :3, :2].detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: ik.channel_layer_norm(*a, backend="triton", activation="gelu", halo=2), (x, w, b), fast_mode=True)
    s = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, s: ik.channel_layer_norm(x, w, b, backend="triton", activation="gelu", halo=2, in_bias=s),
        (x, w, b, s), fast_mode=True)


@triton_only
@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU every test already runs the GPU configuration")
def test_triton_gpu_launch_configuration_under_the_interpreter(monkeypatch):
    """Small blocks and several chunks per batch item, as on a GPU."""
    from irno_kernels.triton import norm

    monkeypatch.setattr(norm, "INTERPRET", False)
    _compare((2, 20, 40, 30), torch.float32)  # 32 points per block, 8 blocks per chunk, 5 chunks


@triton_only
def test_triton_opcheck():
    x = torch.randn(2, 3, 5, 7, device=DEVICE, requires_grad=True)
    w = torch.randn(3, device=DEVICE, requires_grad=True)
    b = torch.randn(3, device=DEVICE, requires_grad=True)
    ops = torch.ops.irno_triton
    torch.library.opcheck(ops.channel_layer_norm_fwd, (x, w, b, 1e-5))
    torch.library.opcheck(ops.channel_layer_norm_fwd, (x, None, None, 1e-5))
    torch.library.opcheck(ops.channel_layer_norm_fwd, (x, w, b, 1e-5, True, 2, torch.float64))
    _, mean, rstd = ops.channel_layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    args = (x.detach(), w.detach(), b.detach(), mean, rstd)
    torch.library.opcheck(ops.channel_layer_norm_bwd, (torch.randn_like(x), *args))
    torch.library.opcheck(ops.channel_layer_norm_bwd, (torch.randn(2, 3, 7, 9, device=DEVICE), *args, True, 1))
    s = torch.randn(3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.channel_layer_norm_fwd, (x, w, b, 1e-5, True, 1, None, s))
    _, mean, rstd = ops.channel_layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5, in_bias=s.detach())
    args = (x.detach(), w.detach(), b.detach(), mean, rstd, True, 1, s.detach())
    torch.library.opcheck(ops.channel_layer_norm_bwd, (torch.randn(2, 3, 7, 9, device=DEVICE), *args))


@triton_only
def test_triton_torch_compile_fullgraph_aot_eager():
    """Under torch.compile the registered ops (fake kernels + autograd) are traced."""
    from irno_kernels.triton import channel_layer_norm as tr

    x = torch.randn(2, 5, 6, 7, device=DEVICE, requires_grad=True)
    w = torch.randn(5, device=DEVICE, requires_grad=True)
    b = torch.randn(5, device=DEVICE, requires_grad=True)
    f = torch.compile(lambda *a: tr(*a, 1e-5).square().sum(), backend="aot_eager", fullgraph=True)
    out = f(x, w, b)
    want = ik.channel_layer_norm_ref(x, w, b).square().sum()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for a, e in zip(torch.autograd.grad(out, (x, w, b)), torch.autograd.grad(want, (x, w, b))):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@triton_only
def test_triton_deterministic():
    x = torch.randn(2, 8, 33, 47, device=DEVICE, requires_grad=True)
    w = torch.randn(8, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 8, 33, 47, device=DEVICE)

    def run():
        return torch.autograd.grad(ik.channel_layer_norm(x, w, None, backend="triton"), (x, w), g)

    for a, c in zip(run(), run()):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_picks_triton_and_paper_sized_fields():
    assert ik.backends()["channel_layer_norm"]["cuda"] == "triton"
    for layout in ("contiguous", "channels_last"):
        _compare((16, 16, 256, 256), torch.float32, layout, factor=10)
    _compare((4, 128, 32, 48), torch.float32, factor=10)
    _compare((2, 200, 9, 10), torch.float32, factor=10)  # C > MAX_CHANNELS: the reference, and
    # without gradients the forward kernel (the U-Net bottleneck's inference), compared in _compare
    _compare((2, 256, 16, 16), torch.float32, factor=10, activation="gelu", halo=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_within_twice_torch_error(dtype):
    """16-bit x, w, b: error vs the float32 computation on the same rounded inputs is at most twice
    that of PyTorch's layer_norm run in the 16-bit dtype (which also computes in float32)."""
    x = torch.randn(4, 32, 64, 96, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, device="cuda").to(dtype), torch.randn(32, device="cuda").to(dtype)
    exact = ik.channel_layer_norm_ref(x.float(), w.float(), b.float())
    ours = ik.channel_layer_norm(x, w, b)
    assert ours.dtype == dtype
    err = (ours.float() - exact).abs().max().item()
    err_torch = (ik.channel_layer_norm_ref(x, w, b).float() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.gpu
def test_cuda_fused_autocast_path_within_twice_torch_error():
    """The U-Net block's fused call under bf16 autocast: bf16 conv output in, GELU and halo fused,
    bf16 out (what the next conv reads), against the same chain in PyTorch's autocast policy (float32
    norm and GELU, then the bf16 cast the conv makes): error vs float32 at most twice PyTorch's."""
    x = torch.randn(4, 32, 64, 96, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, device="cuda"), torch.randn(32, device="cuda")
    exact = ik.channel_layer_norm_ref(x.float(), w, b, activation="gelu", halo=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = ik.channel_layer_norm(x, w, b, activation="gelu", halo=1, out_dtype=torch.bfloat16)
        theirs = ik.channel_layer_norm_ref(x, w, b, activation="gelu", halo=1).to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.shape == (4, 32, 66, 98)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    err, err_torch = ((t.float() - exact).abs().max().item() for t in (ours, theirs))
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.gpu
def test_cuda_autocast_computes_in_float32():
    x = torch.randn(2, 8, 16, 16, device="cuda")
    m = ChannelLayerNorm(8).cuda()
    with torch.autocast("cuda", torch.bfloat16):
        y = m(x.bfloat16())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ik.channel_layer_norm_ref(x.bfloat16().float(), m.weight, m.bias))


@pytest.mark.gpu
def test_cuda_autocast_beyond_the_widest_tile():
    """The U-Net's 256-channel bottleneck under bf16 autocast (the reference inside the Triton
    backend): float32 out, as autocast's layer_norm, and the fused GELU + halo form too."""
    x = torch.randn(2, 256, 8, 8, device="cuda")
    m = ChannelLayerNorm(256).cuda()
    with torch.autocast("cuda", torch.bfloat16):
        y = m(x.bfloat16())
        z = ik.channel_layer_norm(x.bfloat16(), m.weight, m.bias, activation="gelu", halo=1, out_dtype=torch.bfloat16)
    assert y.dtype == torch.float32 and z.dtype == torch.bfloat16
    torch.testing.assert_close(y, ik.channel_layer_norm_ref(x.bfloat16().float(), m.weight, m.bias))
    want = ik.channel_layer_norm_ref(x.bfloat16().float(), m.weight, m.bias, activation="gelu", halo=1)
    torch.testing.assert_close(z, want.bfloat16())


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_equals_eager():
    x = torch.randn(2, 16, 64, 96, device="cuda", requires_grad=True)
    w = torch.randn(16, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    gy = torch.randn(2, 16, 64, 96, device="cuda")

    def step():
        y = ik.channel_layer_norm(x, w, b)
        return (y, *torch.autograd.grad(y, (x, w, b), gy))

    static, eager = replay_after_poisoning(step)
    for s, e in zip(static, eager):
        assert torch.equal(s, e)


@pytest.mark.gpu
def test_gpu_repeats_the_interpreter_checks_on_cuda():
    """gpu_check runs ``-m gpu`` only: the unmarked Triton checks again on CUDA (compiled kernels)."""
    for shape in [(2, 5, 7, 9), (1, 33, 5, 6), (3, 3, 11)]:
        _compare(shape, torch.float32)
        _compare(shape, torch.float64)
    test_triton_strided_layouts_and_no_affine("channels_last")
    test_triton_in_bias_is_added_before_the_norm((2, 5, 7, 9), "channels_last", torch.float32)
    test_triton_in_bias_is_added_before_the_norm((2, 20, 40, 30), "contiguous", torch.float32)  # several chunks
    test_triton_gradcheck()
    test_triton_opcheck()
    test_triton_deterministic()
    test_triton_torch_compile_fullgraph_aot_eager()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=triton_only)])
def test_parameters_of_another_float_dtype_are_used_in_x_precision(backend):
    """float64 (or 16-bit) weight and bias with float32 x: both routes use them in x's compute
    precision, as the Triton kernel reads them (F.layer_norm on CPU alone would refuse the mix)."""
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    w = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3, dtype=torch.float16, device=DEVICE, requires_grad=True)
    y = ik.channel_layer_norm(x, w, b, backend=backend)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ik.channel_layer_norm_ref(x, w.detach().float(), b.detach().float()))
    gw, gb = torch.autograd.grad(y.sum(), (w, b))
    assert gw.dtype == torch.float64 and gb.dtype == torch.float16
    # 16-bit x with float32 parameters (the refiner under autocast) is unchanged
    xb = x.bfloat16()
    yb = ik.channel_layer_norm(xb, w.detach().float(), b.detach().float(), backend=backend)
    torch.testing.assert_close(yb.float(), ik.channel_layer_norm_ref(xb.float(), w.detach().float(),
                                                                     b.detach().float()), rtol=2e-2, atol=2e-2)
