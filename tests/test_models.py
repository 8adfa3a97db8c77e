"""irno.models: spectral convs, FNO, TFNO (and its weight cache), WDSR, the U-Net and FNO refiners."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from irno.models import (
    FNO,
    TFNO,
    WDSR,
    ChannelLayerNorm,
    ChannelMLP,
    ConvBlock,
    FNORefiner,
    GridEmbedding2D,
    SoftGating,
    SpectralConv2d,
    TuckerSpectralConv2d,
    UNetRefiner,
    WDSRBlock,
    tucker_ranks,
)
from irno.models._layers import (
    Conv2d,
    circular_pad2d,
    conv_padding_mode,
    crop,
    make_skip,
    pad_to_multiple,
)
from irno.models.fno import effective_modes
from torch import nn

import irno_kernels
from irno_kernels._checks import channels_last_like

pytestmark = pytest.mark.usefixtures("one_thread")


def _spectral_ref(x, w):
    """y = irfft2(Mix(rfft2(x))) written out, for the weight layout (Cin, Cout, 2*m1, m2)."""
    B, _, H, W = x.shape
    m1, m2 = w.shape[2] // 2, w.shape[3]
    X = torch.fft.rfft2(x, norm=irno_kernels.FFT_NORM)
    out = torch.zeros(B, w.shape[1], H, W // 2 + 1, dtype=X.dtype)
    out[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", X[:, :, :m1, :m2], w[:, :, :m1])
    out[:, :, H - m1:, :m2] = torch.einsum("bixy,ioxy->boxy", X[:, :, H - m1:, :m2], w[:, :, m1:])
    return torch.fft.irfft2(out, s=(H, W), norm=irno_kernels.FFT_NORM)


def _smooth(n, c=1, b=1):
    g = torch.arange(n) / n * 2 * math.pi
    Y, X = torch.meshgrid(g, g, indexing="ij")
    f = torch.sin(X) + 0.5 * torch.cos(2 * Y + X) + 0.2 * torch.sin(3 * Y)
    return f.expand(b, c, n, n).clone()


# ---------------------------------------------------------------------------------------------
# spectral conv
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 3, 12, 9)])
def test_spectral_conv_matches_written_out_fft(shape):
    torch.manual_seed(0)
    conv = SpectralConv2d(3, 4, (4, 3))
    assert conv.weight.shape == (3, 4, 8, 3) and conv.weight.dtype == torch.cfloat
    x = torch.randn(*shape)
    torch.testing.assert_close(conv(x), _spectral_ref(x, conv.weight.detach()), rtol=1e-4, atol=1e-5)


def test_spectral_conv_coarse_grid_uses_existing_modes():
    torch.manual_seed(0)
    conv = SpectralConv2d(2, 2, (8, 8))
    x = torch.randn(1, 2, 8, 6)
    assert effective_modes(conv.n_modes, 8, 6) == (4, 4)
    w = conv.weight.detach()
    w_kept = torch.cat([w[:, :, :4, :4], w[:, :, 12:, :4]], dim=2)
    torch.testing.assert_close(conv(x), _spectral_ref(x, w_kept), rtol=1e-4, atol=1e-5)


def test_spectral_conv_gradients_reach_weight():
    conv = SpectralConv2d(2, 2, 3)
    conv(torch.randn(2, 2, 8, 8)).square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# FNO
# ---------------------------------------------------------------------------------------------
def _small_fno(**kw):
    kw = {"n_modes": (6, 6), "in_channels": 1, "out_channels": 2, "hidden_channels": 8, "n_layers": 2, **kw}
    return FNO(**kw)


def test_fno_shapes_and_neuralop_names():
    torch.manual_seed(0)
    f = _small_fno()
    assert (f.in_channels, f.out_channels, f.hidden_channels, f.n_layers, f.n_modes) == (1, 2, 8, 2, (6, 6))
    x = torch.randn(3, 1, 20, 24)
    y = f(x)
    assert y.shape == (3, 2, 20, 24)
    torch.testing.assert_close(f.out_conv(f.forward_features(x)), y)
    y.square().mean().backward()
    assert all(p.grad is not None for p in f.parameters() if p.requires_grad)


def test_fno_default_width_and_parameters():
    f = FNO(in_channels=4, out_channels=1)  # width 32, 12 modes, 4 layers (DESIGN 8: about 1.2M)
    n = sum(p.numel() for p in f.parameters())  # complex entries count once, as torch counts them
    assert 1.1e6 < n < 1.3e6


def test_fno_resolution_independent_64_to_128():
    torch.manual_seed(0)
    f = FNO(n_modes=(8, 8), in_channels=1, out_channels=1, hidden_channels=8, n_layers=2).eval()
    with torch.no_grad():
        lo, hi = f(_smooth(64)), f(_smooth(128))
    assert hi.shape == (1, 1, 128, 128)
    # the same function sampled twice as finely: on the shared points the outputs agree
    assert ((hi[..., ::2, ::2] - lo).norm() / lo.norm()).item() < 1e-2


@pytest.mark.parametrize("kw", [
    {"positional_embedding": None},
    {"use_channel_mlp": False},
    {"fno_skip": "identity", "channel_mlp_skip": "linear"},
    {"fno_skip": None, "channel_mlp_skip": None},
    {"fno_skip": "soft-gating", "channel_mlp_skip": "identity"},
    {"lifting_channel_ratio": 0, "projection_channel_ratio": 1},
    {"domain_padding": 0.25},
    {"domain_padding": (0.25, 0.1), "domain_padding_mode": "symmetric"},
])
def test_fno_options(kw):
    f = _small_fno(**kw)
    assert f(torch.randn(2, 1, 12, 10)).shape == (2, 2, 12, 10)


def test_fno_domain_padding_changes_the_answer_on_open_domains():
    torch.manual_seed(0)
    f = _small_fno(positional_embedding=None)
    x = torch.randn(1, 1, 16, 16)
    y0 = f(x)
    f.domain_padding = (0.25, 0.25)
    assert not torch.allclose(f(x), y0)


def test_fno_bad_arguments():
    with pytest.raises(ValueError, match="n_modes"):
        FNO(n_modes=(0, 4))
    with pytest.raises(ValueError, match="factorization"):
        FNO(factorization="cp")
    with pytest.raises(ValueError, match="positional_embedding"):
        FNO(positional_embedding="sine")
    with pytest.raises(ValueError, match="skip"):
        FNO(fno_skip="gated")


def test_fno_refiner_starts_near_zero_and_is_fusable():
    torch.manual_seed(0)
    r = FNORefiner(3, 2, n_modes=4, hidden_channels=8, n_layers=2)
    assert r.positional_embedding is None and torch.all(r.out_conv.bias == 0)
    fan_in, fan_out = r.out_conv.in_channels, r.out_conv.out_channels
    assert r.out_conv.weight.abs().max() <= 0.1 * math.sqrt(6 / (fan_in + fan_out))  # xavier gain 0.1
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(r.out_conv(r.forward_features(x)), r(x))


# ---------------------------------------------------------------------------------------------
# TFNO
# ---------------------------------------------------------------------------------------------
def test_tucker_ranks():
    shape = (8, 8, 12, 6)
    ranks = tucker_ranks(shape, 0.1)
    n_params = math.prod(ranks) + sum(s * r for s, r in zip(shape, ranks))
    assert n_params <= 0.1 * math.prod(shape)
    full = tucker_ranks(shape, 1.0)  # as many parameters as the dense tensor, not more
    assert math.prod(full) + sum(s * r for s, r in zip(shape, full)) <= math.prod(shape)
    assert all(r > q for r, q in zip(full, ranks))
    assert tucker_ranks(shape, (2, 3, 4, 100)) == (2, 3, 4, 6)
    with pytest.raises(ValueError):
        tucker_ranks(shape, 1.5)


def test_tucker_conv_equals_dense_conv_of_its_reconstruction():
    torch.manual_seed(0)
    t = TuckerSpectralConv2d(4, 3, (3, 3), rank=0.5)
    assert t.weight.shape == (4, 3, 6, 3)
    d = SpectralConv2d(4, 3, (3, 3))
    with torch.no_grad():
        d.weight.copy_(t.reconstruct())
    x = torch.randn(2, 4, 10, 10)
    torch.testing.assert_close(t(x), d(x), rtol=1e-4, atol=1e-5)
    # the reconstructed weight has roughly the dense init's scale
    assert 0.3 < t.reconstruct().abs().pow(2).mean().sqrt().item() / math.sqrt(2 / 7) < 3


def test_tfno_forward_and_factor_gradients():
    torch.manual_seed(0)
    f = TFNO(n_modes=(4, 4), in_channels=1, out_channels=1, hidden_channels=8, n_layers=2)
    assert all(isinstance(c, TuckerSpectralConv2d) for c in f.convs)
    dense = sum(p.numel() for p in _small_fno(n_modes=(4, 4), out_channels=1).convs.parameters())
    assert sum(p.numel() for p in f.convs.parameters()) < 0.2 * dense
    f(torch.randn(2, 1, 12, 12)).sum().backward()
    assert all(c.core.grad is not None and all(u.grad is not None for u in c.factors) for c in f.convs)


def test_tfno_frozen_weight_cache():
    torch.manual_seed(0)
    f = TFNO(n_modes=(4, 4), in_channels=1, out_channels=1, hidden_channels=8, n_layers=2)
    conv = f.convs[0]
    x = torch.randn(1, 1, 12, 12)

    # train mode: rebuilt every call, nothing cached
    f.train()
    with torch.no_grad():
        f(x), f(x)
    assert conv.n_reconstructions == 2 and not conv.cached

    # frozen (eval + no grad): rebuilt once, reused
    f.eval()
    with torch.no_grad():
        y1 = f(x)
        y2 = f(x)
    assert conv.n_reconstructions == 3 and conv.cached
    torch.testing.assert_close(y1, y2)

    # eval with grad on: no cache (gradients must reach the factors)
    f(x)
    assert conv.n_reconstructions == 4 and not conv.cached
    with torch.no_grad():
        f(x)
    assert conv.n_reconstructions == 5

    # an in-place change of the factors (optimizer step, load_state_dict) invalidates the cache
    with torch.no_grad():
        conv.core.mul_(2.0)
        y3 = f(x)
    assert conv.n_reconstructions == 6 and not torch.allclose(y3, y1)
    with torch.no_grad():
        f(x)
    assert conv.n_reconstructions == 6

    # train() drops the cache
    f.train()
    assert not conv.cached
    f.eval()
    conv.clear_cache()
    assert not conv.cached


# ---------------------------------------------------------------------------------------------
# WDSR
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [2, 4, 8, 16])
def test_wdsr_scales(scale):
    m = WDSR(in_channels=2, out_channels=1, scale=scale, n_features=4, n_resblocks=1)
    assert m(torch.randn(1, 2, 3, 5)).shape == (1, 1, 3 * scale, 5 * scale)


def test_wdsr_default_recipe():
    m = WDSR(in_channels=1, scale=8)
    assert len(m.body) == 18 and m.out_channels == 1
    block = m.body[0]
    assert isinstance(block, WDSRBlock) and block.res_scale == 0.1
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert convs[0].out_channels == 32
    assert block.body[0].out_channels == 128  # expansion 4
    assert all(hasattr(c, "parametrizations") and hasattr(c.parametrizations, "weight") for c in convs)
    assert isinstance(m.tail[-1], nn.PixelShuffle) and m.tail[-1].upscale_factor == 8


@pytest.mark.parametrize("padding", ["zero", "periodic", "replicate", "reflect"])
def test_wdsr_padding(padding):
    m = WDSR(1, scale=2, n_features=4, n_resblocks=1, padding=padding)
    assert all(c.padding_mode == conv_padding_mode(padding) for c in m.modules() if isinstance(c, nn.Conv2d))
    assert m(torch.randn(1, 1, 6, 6)).shape == (1, 1, 12, 12)
    with pytest.raises(ValueError):
        WDSR(1, scale=0)


# ---------------------------------------------------------------------------------------------
# U-Net refiner
# ---------------------------------------------------------------------------------------------
def test_unet_recipe_and_parameter_count():
    u = UNetRefiner(2, 1)
    assert u.depth == 4 and u.width == 16 and u.padding == "periodic"
    widths = [b.net[0].out_channels for b in u.down] + [u.bottleneck.net[0].out_channels]
    assert widths == [16, 32, 64, 128, 256]
    block = u.down[0].net
    assert [type(m) for m in block] == [Conv2d, ChannelLayerNorm, nn.GELU] * 2
    assert all(isinstance(m, nn.Conv2d) for m in block[::3])
    convs3 = [m for m in u.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 2 * 4 + 2 + 4 * 3 and all(m.padding_mode == "circular" for m in convs3)
    assert u.out_conv.kernel_size == (1, 1) and torch.all(u.out_conv.bias == 0)
    # xavier-uniform gain 0.1: bound = 0.1 * sqrt(6 / (16 + 1))
    assert u.out_conv.weight.abs().max() <= 0.1 * math.sqrt(6 / 17)
    # 2.16M parameters with in=2, out=1 (DESIGN 8 reports "2.2M" for the published U-Net)
    assert sum(p.numel() for p in u.parameters()) == 2_161_505


@pytest.mark.parametrize("padding", ["periodic", "zero", "replicate"])
@pytest.mark.parametrize("hw", [(33, 47), (16, 16), (5, 3)])
def test_unet_any_grid(padding, hw):
    torch.manual_seed(0)
    u = UNetRefiner(3, 2, depth=3, width=4, padding=padding)
    x = torch.randn(2, 3, *hw)
    y = u(x)
    assert y.shape == (2, 2, *hw)
    torch.testing.assert_close(u.out_conv(u.forward_features(x)), y)
    assert u.forward_features(x).shape == (2, 4, *hw)


def test_unet_starts_near_zero_and_trains():
    torch.manual_seed(0)
    u = UNetRefiner(2, 1, depth=2, width=8)
    x = torch.randn(2, 2, 16, 16)
    y = u(x)
    assert y.abs().mean() < 0.3  # features are LayerNorm-ed (O(1)); the 0.1-gain output keeps Phi small
    y.sum().backward()
    assert all(p.grad is not None for p in u.parameters())


def test_unet_padding_modes_differ():
    torch.manual_seed(0)
    a = UNetRefiner(1, 1, depth=2, width=4, padding="periodic")
    b = UNetRefiner(1, 1, depth=2, width=4, padding="zero")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 12, 12)
    assert not torch.allclose(a(x), b(x))
    with pytest.raises(ValueError, match="padding"):
        UNetRefiner(1, 1, padding="mirror")


# ---------------------------------------------------------------------------------------------
# small layers
# ---------------------------------------------------------------------------------------------
def test_layers():
    x = torch.randn(2, 3, 5, 7)
    assert GridEmbedding2D()(x).shape == (2, 5, 5, 7)
    g = GridEmbedding2D()(torch.zeros(1, 0, 4, 2))
    torch.testing.assert_close(g[0, 0, :, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))
    torch.testing.assert_close(g[0, 1, 0], torch.tensor([0.0, 0.5]))
    mlp = ChannelMLP(3, 4, 6, n_layers=3)
    assert mlp(x).shape == (2, 4, 5, 7) and len(mlp.layers) == 3
    torch.testing.assert_close(mlp.layers[-1](mlp.hidden(x)), mlp(x))
    ln = ChannelLayerNorm(3)(x)
    torch.testing.assert_close(ln.mean(1), torch.zeros(2, 5, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(ln, torch.nn.functional.layer_norm(x.movedim(1, -1), (3,)).movedim(-1, 1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(SoftGating(3)(x), x)
    assert make_skip(None, 3, 3) is None
    with pytest.raises(ValueError):
        make_skip("identity", 3, 4)
    assert isinstance(ConvBlock(3, 4).net[0], nn.Conv2d)


@pytest.mark.parametrize("padding", ["periodic", "zero", "replicate", "reflect"])
def test_pad_to_multiple_and_crop(padding):
    x = torch.arange(15.0).view(1, 1, 3, 5)
    p, size = pad_to_multiple(x, 4, padding)
    assert p.shape == (1, 1, 4, 8) and size == (3, 5)
    torch.testing.assert_close(crop(p, size), x)
    if padding == "periodic":
        torch.testing.assert_close(p[..., 3, :5], x[..., 0, :])
    if padding == "zero":
        assert torch.all(p[..., 3, :] == 0)
    small, _ = pad_to_multiple(torch.ones(1, 1, 1, 2), 16, padding)
    assert small.shape == (1, 1, 16, 16)


def test_spectral_conv_half_precision_input():
    conv = SpectralConv2d(2, 2, 3)
    x = torch.randn(1, 2, 8, 8)
    y = conv(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), conv(x.bfloat16().float()), rtol=1e-2, atol=1e-2)
    assert conv(x.double()).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# periodic padding with a folded backward, and the fused channel LayerNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,p", [((2, 3, 5, 7), 1), ((1, 2, 3, 3), 3), ((4, 6, 6), 2), ((1, 1, 9, 4), 4)])
def test_circular_pad2d_matches_f_pad_and_gradchecks(shape, p):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.equal(circular_pad2d(x, p), F.pad(x, (p,) * 4, mode="circular"))
    torch.autograd.gradcheck(lambda t: circular_pad2d(t, p), (x,))
    torch.autograd.gradgradcheck(lambda t: circular_pad2d(t, p), (x,))
    torch.autograd.gradcheck(lambda t: circular_pad2d(t, p), (x,), check_forward_ad=True, check_backward_ad=False)
    with torch.no_grad():  # the no-grad path (ATen's pad, or the copies for other layouts) agrees
        assert torch.equal(circular_pad2d(x, p), F.pad(x, (p,) * 4, mode="circular"))
        xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, not contiguous
        assert torch.equal(circular_pad2d(xt, p), F.pad(x, (p,) * 4, mode="circular"))


def test_circular_pad2d_channels_last_and_errors():
    x = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    out = circular_pad2d(x, 1)
    assert torch.equal(out, F.pad(x, (1,) * 4, mode="circular"))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert circular_pad2d(x, 0) is x
    big = torch.randn(2, 8, 96, 96).contiguous(memory_format=torch.channels_last)  # the large-tensor path
    out = circular_pad2d(big, 1)
    assert torch.equal(out, F.pad(big, (1,) * 4, mode="circular"))
    assert out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="p:"):
        circular_pad2d(torch.randn(1, 1, 2, 5), 3)


@pytest.mark.parametrize("size", [6, 96])  # the small (cat) and the large (_wrap_pad) no-grad paths
@pytest.mark.parametrize("grad", [False, True])
def test_circular_pad2d_keeps_cropped_channels_last_views_channels_last(size, grad):
    """A view cropped out of a channels-last tensor (the U-Net's upsampled fields) is neither
    contiguous nor channels-last contiguous; its padded copy must still be channels-last (it went
    NCHW once, and with it the whole decoder of a channels-last U-Net)."""
    full = torch.randn(2, 8, size + 4, size + 4).contiguous(memory_format=torch.channels_last)
    view = full[..., 2:-2, 2:-2].requires_grad_(grad) if not grad else full.requires_grad_()[..., 2:-2, 2:-2]
    assert channels_last_like(view) and not view.is_contiguous(memory_format=torch.channels_last)
    out = circular_pad2d(view, 1)
    assert torch.equal(out, F.pad(view.detach(), (1,) * 4, mode="circular"))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not channels_last_like(torch.randn(2, 8, 5, 5)[..., 1:, 1:])  # NCHW views stay NCHW
    assert not channels_last_like(torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)[:, :1])


def test_channels_last_unet_runs_every_conv_channels_last(monkeypatch):
    """UNetRefiner on channels-last input: every convolution (encoder, decoder, the up-convs after the
    cropped upsampling) reads a channels-last tensor, in inference and in training."""
    seen = []
    conv2d = F.conv2d

    def spy(x, w, *args, **kwargs):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return conv2d(x, w, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    net = UNetRefiner(3, 1, depth=3, width=4)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        net(x)
    net(x).sum().backward()
    # per call: 3 encoder blocks x 2, the bottleneck 2, 3 x (up-conv + 2), the 1x1 output conv
    assert len(seen) == 2 * (3 * 2 + 2 + 3 * 3 + 1) and all(seen), seen


def test_periodic_conv2d_equals_nn_conv2d_forward_and_backward():
    torch.manual_seed(0)
    ours = Conv2d(3, 4, 3, padding=1, padding_mode="circular").double()
    ref = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular").double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a, b = ours(x), ref(x2)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    # a grid smaller than the halo falls back to nn.Conv2d's own padding (which then raises as it does)
    small = Conv2d(1, 1, 5, padding=2, padding_mode="zeros")
    assert small(torch.randn(1, 1, 1, 1)).shape == (1, 1, 1, 1)


def test_channel_layer_norm_matches_definition():
    torch.manual_seed(0)
    ln = ChannelLayerNorm(5).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    mean = x.mean(1, keepdim=True)
    var = (x - mean).square().mean(1, keepdim=True)
    ref = (x - mean) / torch.sqrt(var + ln.eps) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), ref)
    torch.autograd.gradcheck(ln, (x,))
    assert ln(torch.randn(2, 5, 8, dtype=torch.float64)).shape == (2, 5, 8)  # any number of spatial dims


_triton_cpu = pytest.mark.skipif(not irno_kernels.available("channel_layer_norm", "triton", "cpu"),
                                 reason="needs triton with TRITON_INTERPRET=1")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=_triton_cpu)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_block_fused_path_is_the_same_function(backend, layout):
    """ConvBlock.forward_fused (LN + GELU in one pass, the first written into the second conv's
    periodic halo) equals the module chain, forward and backward, in both layouts."""
    torch.manual_seed(0)
    blk = ConvBlock(3, 5).double()
    with torch.no_grad():
        for m in (blk.net[1], blk.net[4]):
            m.weight.normal_(), m.bias.normal_()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    want, got = blk.net(x), blk.forward_fused(x, backend=backend)
    torch.testing.assert_close(got, want)
    leaves = [x, *blk.parameters()]
    gy = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, leaves, gy)):
        torch.testing.assert_close(a, e)
    # the decoder's form: a list of inputs, concatenated into the first conv's padded input
    parts = [x[:, :1].detach().clone().requires_grad_(), x[:, 1:].detach().clone().requires_grad_()]
    want, got = blk.net(torch.cat(parts, 1)), blk.forward_fused(parts, backend=backend)
    torch.testing.assert_close(got, want)
    for a, e in zip(torch.autograd.grad(got, parts, gy), torch.autograd.grad(want, parts, gy)):
        torch.testing.assert_close(a, e)


@_triton_cpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unet_fused_triton_path_is_the_module_chain(monkeypatch, layout):
    """The whole refiner on its fused path (what CUDA runs; here IRNO_BACKEND=triton through the
    interpreter): every block fused, the decoder's concatenations and every conv's input padded by the
    Triton pad, the upsampling written with the up-conv's halo; equal to the module chain
    (IRNO_BACKEND=reference) in float64, output and every gradient."""
    import irno.models.unet as unet

    torch.manual_seed(0)
    net = UNetRefiner(3, 2, width=4, depth=2, out_gain=1.0).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ChannelLayerNorm):
                m.weight.normal_(), m.bias.normal_()
    x = torch.randn(2, 3, 12, 20, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [x.requires_grad_(), *net.parameters()]

    def run():
        y = net(x)
        return y, torch.autograd.grad(y.square().sum(), leaves)

    monkeypatch.setenv("IRNO_BACKEND", "reference")
    want = run()
    fused, ups = [], []
    monkeypatch.setattr(unet.ConvBlock, "_fused",
                        lambda self, xs, b, u, _f=unet.ConvBlock._fused: fused.append(u) or _f(self, xs, b, u))
    monkeypatch.setattr(unet, "periodic_upsample2x_triton",
                        lambda *a, _f=unet.periodic_upsample2x_triton: ups.append(1) or _f(*a))
    monkeypatch.setenv("IRNO_BACKEND", "triton")
    got = run()
    # depth 2: every block (through the kernels without the ops' per-call checks), every upsampling
    assert fused == [True] * (2 * 2 + 1) and len(ups) == 2
    torch.testing.assert_close(got[0], want[0])
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e)


@_triton_cpu
def test_unet_fused_path_skips_the_ops_checks_but_not_where_they_matter(monkeypatch):
    """The refiner's fused blocks call the Triton routes without the public ops' per-call checks and
    backend choice (their host cost was the eager refiner's bottleneck on a GPU), and go back to the
    checked ops where those decide something: under forward-mode AD (the checked ops give tangents
    through the references), a parameter on another device, a block input of another grid."""
    import irno.models.unet as unet
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    net = UNetRefiner(3, 2, width=4, depth=2).double()
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    monkeypatch.setenv("IRNO_BACKEND", "triton")
    checked = []

    def spy(name):
        fn = getattr(irno_kernels, name)
        return lambda *a, **k: checked.append(name) or fn(*a, **k)

    for name in ("channel_layer_norm", "periodic_pad_cat", "periodic_upsample2x"):
        monkeypatch.setattr(irno_kernels, name, spy(name))
    with torch.no_grad():
        y = net(x)
    assert checked == []
    monkeypatch.setenv("IRNO_BACKEND", "reference")
    with torch.no_grad():
        torch.testing.assert_close(y, net(x))

    # forward-mode AD with tangents on the parameters only (x plain, so the blocks stay fused): the
    # checked ops, whose choice sees the dual weights: the forced Triton backend refuses them by name
    # (the automatic choice would take the references), where the kernels would drop the tangents
    params = dict(net.named_parameters())
    monkeypatch.setenv("IRNO_BACKEND", "triton")
    with fwAD.dual_level():
        dual = {k: fwAD.make_dual(v.detach(), torch.randn_like(v)) for k, v in params.items()}
        with pytest.raises(RuntimeError, match="no forward-mode AD formula for channel_layer_norm"):
            torch.func.functional_call(net, dual, (x,))
    assert checked == ["periodic_pad_cat", "channel_layer_norm"]

    blk = net.down[0]
    assert blk._unchecked([x])
    assert not blk._unchecked([x, torch.randn(2, 1, 8, 10, dtype=torch.float64)])  # another grid
    assert not blk._unchecked([x, torch.randn(1, 1, 8, 12, dtype=torch.float64)])  # another batch
    monkeypatch.setattr(blk.net[1], "weight", nn.Parameter(torch.ones(4, dtype=torch.float64, device="meta")))
    assert not blk._unchecked([x])  # a LayerNorm weight on another device: the checked op names it
    monkeypatch.setattr(unet, "TRITON_MAX_ELEMENTS", 2 * 4 * 10 * 14)  # the block's widest padded tensor
    assert not net.down[1]._unchecked([torch.randn(2, 4, 8, 12, dtype=torch.float64)])
    monkeypatch.undo()
    monkeypatch.setenv("IRNO_BACKEND", "triton")

    # what the checked norm validates per call: a LayerNorm weight of the wrong shape (a view into a
    # longer buffer, which the kernel would read past) is refused by name, a bad eps too; an empty
    # batch and an unbatched field raise as before
    blk = ConvBlock(3, 4).double()
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    buf = torch.tensor([1.0, 1.0, 1000.0, 1000.0], dtype=torch.float64)
    blk.net[4].weight = nn.Parameter(buf[:2])
    with pytest.raises(ValueError, match=r"weight: expected shape \(4,\)"):
        blk(x)
    blk = ConvBlock(3, 4).double()
    blk.net[1].eps = -1.0
    with pytest.raises(ValueError, match="eps: expected a number >= 0"):
        blk(x)
    with pytest.raises(ValueError, match="expected a non-empty tensor"):
        ConvBlock(3, 4).double()(x[:0])
    with pytest.raises(ValueError, match=r"x: expected a \(B, C, H, W\) tensor, got \(3, 4, 8\)"):
        ConvBlock(3, 4)(torch.randn(3, 4, 8))


def test_conv_block_fuses_only_what_it_can(monkeypatch):
    import irno.models.unet as unet

    x = torch.randn(1, 2, 6, 6)
    assert not ConvBlock(2, 3)._fusable(x)  # CPU: the norm's backend is the reference
    monkeypatch.setattr(unet, "resolve", lambda *a: "triton")
    assert ConvBlock(2, 3)._fusable(x)
    monkeypatch.setenv("IRNO_FUSED_BLOCKS", "0")
    assert not ConvBlock(2, 3)._fusable(x)
    monkeypatch.delenv("IRNO_FUSED_BLOCKS")
    assert not ConvBlock(2, 3, padding_mode="zeros")._fusable(x)
    assert not ConvBlock(2, 3, kernel_size=15)._fusable(x)  # a halo of 7 on a 6 x 6 grid
    tanh = ConvBlock(2, 3)
    tanh.net[2] = nn.GELU(approximate="tanh")
    assert not tanh._fusable(x)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_unet_fused_blocks_match_the_module_chain(monkeypatch, autocast):
    """On CUDA the blocks take the fused path; the refiner's output and gradients match the plain
    module chain (fp32: to fp32 rounding; bf16 autocast: to bf16 rounding)."""
    import irno.models.unet as unet

    torch.manual_seed(0)
    net = UNetRefiner(5, 1, width=8, out_gain=1.0).cuda()
    x = torch.randn(4, 5, 64, 96, device="cuda").contiguous(memory_format=torch.channels_last)
    calls = []
    fused = unet.ConvBlock._fused
    monkeypatch.setattr(unet.ConvBlock, "_fused", lambda self, xs, b, u: calls.append(u) or fused(self, xs, b, u))

    def run():
        net.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = net(x)
        y.float().square().mean().backward()
        return y.float(), [p.grad.clone() for p in net.parameters()]

    ups = []
    monkeypatch.setattr(unet, "periodic_upsample2x_triton",
                        lambda *a, _f=unet.periodic_upsample2x_triton: ups.append(1) or _f(*a))
    got = run()
    assert calls == [True] * (2 * 4 + 1)  # every block of depth 4: 4 down, the bottleneck, 4 up
    assert len(ups) == 4  # every upsampling written padded for its conv
    monkeypatch.setenv("IRNO_FUSED_BLOCKS", "0")  # the module chain (blocks and upsampling)
    want = run()
    assert len(calls) == 9 and len(ups) == 4
    tol = 2e-2 if autocast else 1e-4
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol * want[0].abs().max().item())
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * max(e.abs().max().item(), 1e-6) * 5)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=_triton_cpu)])
def test_unet_block_trains_under_torch_compile_fullgraph(fused):
    """torch.compile(fullgraph=True) traces a block's forward and backward: the module chain (its
    periodic pad falls back to ATen's under tracing) and the fused path (the registered Triton ops)."""
    torch.manual_seed(0)
    blk = ConvBlock(3, 4)
    with torch.no_grad():
        for m in (blk.net[1], blk.net[4]):
            m.weight.normal_(), m.bias.normal_()
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    fn = (lambda t: blk.forward_fused(t, backend="triton")) if fused else blk
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    want = blk.net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    leaves = [x, *blk.parameters()]
    for a, e in zip(torch.autograd.grad(got.square().sum(), leaves), torch.autograd.grad(want.square().sum(), leaves)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 1, 4), (2, 4, 6, 6)])
def test_upsample2x_periodic_values_adjoint_and_jvp(shape):
    """Periodic bilinear x2: the values of F.interpolate on the 1-pixel periodic halo (cropped); on
    CPU with gradients the written-out adjoint is the backward (gradcheck), and forward-mode AD works."""
    from irno.models._layers import _Upsample2xPeriodic, upsample2x_periodic

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    want = F.interpolate(F.pad(x, (1,) * 4, mode="circular"), scale_factor=2, mode="bilinear")[..., 2:-2, 2:-2]
    assert torch.equal(upsample2x_periodic(x), want)
    assert torch.autograd.gradcheck(_Upsample2xPeriodic.apply, (x,))
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(upsample2x_periodic(x), x, g)[0],
                               torch.autograd.grad(want, x, g)[0])
    import torch.autograd.forward_ad as fwAD

    t = torch.randn_like(x)
    with fwAD.dual_level():
        out = upsample2x_periodic(fwAD.make_dual(x, t))  # x requires grad: the Function path
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, upsample2x_periodic(t))


@pytest.mark.parametrize("cls_name", ["FNO", "TFNO"])
def test_module_casts_keep_complex_spectral_weights(cls_name):
    """model.to(torch.float64) used to drop the imaginary parts of the spectral weights (a different
    operator, with a UserWarning) and model.double() to leave them complex64: both give complex128
    now, the same operator; a cast to bf16 keeps them complex64; state_dict keys keep their order."""
    import warnings

    import irno

    torch.manual_seed(0)
    cls = getattr(irno, cls_name)
    m = cls(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2).eval()
    keys = list(m.state_dict())
    x = torch.randn(2, 2, 16, 12)
    with torch.no_grad():
        ref = m(x).double()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            to64 = copy.deepcopy(m).to(torch.float64)
            dbl = copy.deepcopy(m).double()
        for m64 in (to64, dbl):
            assert {p.dtype for p in m64.parameters() if p.is_complex()} == {torch.complex128}
            torch.testing.assert_close(m64(x.double()), ref, rtol=1e-5, atol=1e-5)
            assert list(m64.state_dict()) == keys
    bf = copy.deepcopy(m).to(torch.bfloat16)
    assert {p.dtype for p in bf.parameters() if p.is_complex()} == {torch.complex64}
    meta = copy.deepcopy(m).to("meta")  # another device type: new Parameters, as Module._apply makes
    assert all(p.is_meta for p in meta.parameters()) and any(p.is_complex() for p in meta.parameters())


def test_reflect_padding_on_a_grid_too_small_for_its_depth_is_a_clear_error():
    with pytest.raises(ValueError, match="'reflect' needs at least 2 x 2 points after 4 poolings"):
        UNetRefiner(3, 1, padding="reflect")(torch.randn(1, 3, 16, 16))
    assert UNetRefiner(3, 1, padding="reflect", depth=2)(torch.randn(1, 3, 16, 16)).shape == (1, 1, 16, 16)
