"""irno.analysis: contraction factor (power iteration on JVPs), bias vs error floor, FLOP counting."""

import math

import pytest
import torch
from irno import FNO, IRNO, TFNO, SpectralConv2d, UNetRefiner
from irno.analysis import (
    BiasFloor,
    base_flops,
    bias_error_floor,
    contraction_factor,
    count_flops,
    fft_flops,
    pearson_r,
    step_flops,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import irno_kernels

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_irno(A, alpha=0.2, cx=1):
    """IRNO whose refiner is Phi(x, h) = A h (a 1x1 conv that ignores x): G(h) = (I + alpha A) h."""
    C = A.shape[0]
    conv = nn.Conv2d(cx + C, C, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, cx:, 0, 0] = A
    return IRNO(nn.Identity(), conv, alpha=alpha, in_channels=cx, out_channels=C)


def test_contraction_factor_symmetric_linear_refiner():
    # A symmetric with eigenvalues -1 and -3: J = I + 0.2 A has eigenvalues 0.8 and 0.4 -> q = 0.8
    Q, _ = torch.linalg.qr(torch.randn(2, 2, generator=torch.Generator().manual_seed(0)))
    A = Q @ torch.diag(torch.tensor([-1.0, -3.0])) @ Q.T
    m = _linear_irno(A)
    x, h = torch.randn(3, 1, 8, 8), torch.randn(3, 2, 8, 8)
    for kind, method in (("norm", "auto"), ("radius", "forward"), ("radius", "reverse")):
        q = contraction_factor(m, x, h, n_iter=40, kind=kind, method=method)
        assert q.shape == (3,)
        torch.testing.assert_close(q, torch.full((3,), 0.8), rtol=1e-4, atol=1e-4)
    q_all, hist = contraction_factor(m, x, h, n_iter=10, per_sample=False, return_history=True)
    assert q_all.dim() == 0 and hist.shape == (10, 3)
    assert q_all.item() == pytest.approx(0.8, abs=1e-3)


def test_contraction_factor_non_normal_linear_refiner():
    # J = I + 0.2 A = [[0.8, 0.4], [0, 0.6]]: spectral radius 0.8, spectral norm larger
    A = torch.tensor([[-1.0, 2.0], [0.0, -2.0]])
    m = _linear_irno(A)
    J = torch.eye(2) + 0.2 * A
    x, h = torch.randn(2, 1, 4, 4), torch.randn(2, 2, 4, 4)
    radius = contraction_factor(m, x, h, n_iter=80, kind="radius")
    norm = contraction_factor(m, x, h, n_iter=80, kind="norm")
    torch.testing.assert_close(radius, torch.full((2,), 0.8), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(norm, torch.full((2,), torch.linalg.matrix_norm(J, ord=2).item()), rtol=1e-4, atol=1e-4)
    assert norm[0] > radius[0] + 0.05
    with pytest.raises(ValueError, match="kind"):
        contraction_factor(m, x, h, kind="max")


def test_contraction_factor_through_a_custom_op_without_forward_ad():
    # a callable update built on the op layer: the jvp may fall back to the double-vjp trick
    A = torch.tensor([[-1.0, 0.0], [0.0, -2.0]])

    def update(x, h):
        return irno_kernels.residual_update(h, torch.einsum("oc,bchw->bohw", A, h), 0.25)

    h = torch.randn(2, 2, 4, 4)
    for method in ("auto", "reverse"):
        q = contraction_factor(update, None, h, n_iter=40, method=method)
        torch.testing.assert_close(q, torch.full((2,), 0.75), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="method"):
        contraction_factor(update, None, h, method="fd")


def test_contraction_factor_unet():
    torch.manual_seed(0)
    m = IRNO(nn.Identity(), UNetRefiner(2, 1, depth=2, width=4), in_channels=1, out_channels=1).eval()
    q = contraction_factor(m, torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), n_iter=5)
    assert q.shape == (2,) and torch.all(q > 0) and torch.all(torch.isfinite(q))


def test_pearson_r_hand_value():
    # a = [1,2,3], b = [2,4,7]: sum ab' = 5, sum a'^2 = 2, sum b'^2 = 114/9
    assert pearson_r(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 7])) == pytest.approx(5 / math.sqrt(2 * 114 / 9))


def test_bias_error_floor_linear_case():
    # Phi(x, h) = (1 + c) x - h with y = x: bias b = Phi(x, y) = c x; the iteration (q = 1 - alpha)
    # settles at h* = (1 + c) x, so the floor ||h* - y|| = |c| ||x|| = alpha ||b|| / (1 - q) exactly
    c, alpha = 0.3, 0.5
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight[0, :, 0, 0] = torch.tensor([1 + c, -1.0])
    m = IRNO(nn.Identity(), conv, alpha=alpha, in_channels=1, out_channels=1)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 1, 6, 6, generator=g) * s for s in (0.5, 1.0, 2.0)]
    res = bias_error_floor(m, [(x, x) for x in xs], n_steps=40)
    assert isinstance(res, BiasFloor) and res.bias.shape == (9,) and res.errors.shape == (41, 9)
    torch.testing.assert_close(res.floor, res.bias, rtol=1e-5, atol=1e-6)
    assert res.r == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(res.min_error, torch.zeros(9), atol=1e-6, rtol=0)  # h_0 = x = y
    # one batch, and dict batches
    assert bias_error_floor(m, (xs[0], xs[0]), n_steps=5).bias.shape == (3,)
    assert bias_error_floor(m, [{"x": xs[1], "y": xs[1]}], n_steps=5).floor.shape == (3,)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def test_flop_counter_does_not_count_ffts():
    """Why count_flops adds FFTs itself: torch's FlopCounterMode gives them 0."""
    x = torch.randn(2, 3, 16, 16)
    with FlopCounterMode(display=False) as fc:
        torch.fft.irfft2(torch.fft.rfft2(x), s=(16, 16))
    assert fc.get_total_flops() == 0
    rep = count_flops(lambda t: torch.fft.irfft2(torch.fft.rfft2(t), s=(16, 16)), x)
    assert rep.n_fft == 12  # 6 fields forward, 6 back
    assert rep.fft == rep.total == 12 * 5 * 256 * 8
    assert fft_flops(256) == 5 * 256 * 8 and fft_flops(1) == 0


def test_spectral_conv_flops():
    B, ci, co, H, W, m1, m2 = 2, 3, 4, 16, 12, 3, 4
    conv = SpectralConv2d(ci, co, (m1, m2))
    rep = count_flops(conv, torch.randn(B, ci, H, W))
    assert rep.n_fft == B * (ci + co)
    assert rep.fft == pytest.approx(B * (ci + co) * 5 * H * W * math.log2(H * W), abs=2)  # integer counts
    # the mode mixing: one complex multiply-add (8 real flops) per (b, i, o, kept mode)
    assert rep.total - rep.fft == pytest.approx(8 * B * ci * co * 2 * m1 * m2)


def test_fno_flops_count_every_fft_and_frozen_tfno_costs_a_dense_fno():
    kw = dict(n_modes=(4, 4), in_channels=1, out_channels=1, hidden_channels=8, n_layers=3)
    fno, tfno = FNO(**kw), TFNO(**kw)
    x = torch.randn(2, 1, 16, 16)
    m = IRNO(fno, UNetRefiner(2, 1, depth=2, width=4))
    rep = base_flops(m, x)
    assert rep.n_fft == 3 * 2 * (8 + 8)  # layers x batch x (rfft of 8 fields + irfft of 8 fields)
    assert rep.counted > 0 and rep.total == pytest.approx(rep.counted + rep.fft + rep.custom)
    tfno.eval()
    dense = count_flops(fno, x).total
    first = count_flops(tfno, x).total  # the first frozen call rebuilds the dense weight once
    assert first > dense
    assert count_flops(tfno, x).total == pytest.approx(dense)  # then reuses it: a dense FNO's cost
    tfno.train()  # rebuilding the weight from the Tucker factors costs extra
    assert count_flops(tfno, x).total > dense


def test_step_flops_unet():
    torch.manual_seed(0)
    base = FNO(n_modes=(4, 4), in_channels=1, out_channels=1, hidden_channels=4, n_layers=1)
    ref = UNetRefiner(2, 1, depth=2, width=4)
    fused, plain = IRNO(base, ref), IRNO(base, ref, fused=False)
    x = torch.randn(1, 1, 16, 16)
    a, b = step_flops(fused, x), step_flops(plain, x)
    assert a.total == b.total > 0 and a.fft == 0
    # the first 3x3 conv alone: 2 * (in 2 -> out 4) * 9 per pixel
    assert a.total > 2 * 2 * 4 * 9 * 256
    # the refiner's cost scales with the grid: 4x the pixels, 4x the flops
    assert step_flops(fused, torch.randn(1, 1, 32, 32)).total == pytest.approx(4 * a.total)


def test_contraction_radius_converges_for_non_normal_and_complex_jacobians():
    # the last step's growth ||J v|| overshoots for a non-normal J and oscillates for a complex
    # eigenpair; the geometric mean over the second half of the iterations converges
    x, h = torch.randn(2, 1, 4, 4), torch.randn(2, 2, 4, 4)
    A = torch.tensor([[-1.0, 8.0], [0.0, -2.0]])  # J = [[0.8, 1.6], [0, 0.6]]: radius 0.8, norm 1.87
    for n in (40, 41):
        q = contraction_factor(_linear_irno(A), x, h, n_iter=n, kind="radius")
        torch.testing.assert_close(q, torch.full((2,), 0.8), rtol=0.02, atol=0)
    A2 = torch.tensor([[-2.5, 5.0], [-2.5, -2.5]])  # J = [[0.5, 1], [-0.5, 0.5]]: eig 0.5 +- 0.707i
    for n in (40, 41, 80, 81):
        q = contraction_factor(_linear_irno(A2), x, h, n_iter=n, kind="radius")
        torch.testing.assert_close(q, torch.full((2,), math.sqrt(0.75)), rtol=0.03, atol=0)
    _, hist = contraction_factor(_linear_irno(A2), x, h, n_iter=6, kind="radius", return_history=True)
    assert hist[-1].tolist() == contraction_factor(_linear_irno(A2), x, h, n_iter=6, kind="radius").tolist()


def test_bias_error_floor_from_another_start():
    # h0: the iteration starts from another base's output (transfer); Phi = 0 keeps h_k = h_0
    conv = nn.Conv2d(2, 1, 1, bias=False)
    nn.init.zeros_(conv.weight)
    m = IRNO(nn.Identity(), conv, in_channels=1, out_channels=1)
    x, y = torch.randn(3, 1, 6, 6), torch.randn(3, 1, 6, 6)
    res = bias_error_floor(m, (x, y), n_steps=4, h0=lambda t: 2 * t)
    torch.testing.assert_close(res.floor, (2 * x - y).flatten(1).norm(dim=1))
    torch.testing.assert_close(bias_error_floor(m, (x, y), n_steps=4).floor, (x - y).flatten(1).norm(dim=1))


def test_complex_addmm_family_counts_four_real_flops():
    a, b, c = (torch.randn(*s, dtype=torch.cfloat) for s in ((4, 6), (6, 5), (4, 5)))
    assert count_flops(torch.mm, a, b).total == 8 * 4 * 6 * 5
    assert count_flops(torch.addmm, c, a, b).total == 8 * 4 * 6 * 5
    assert count_flops(torch.addmm, c.real, a.real, b.real).total == 2 * 4 * 6 * 5
    A, Bm, C = (torch.randn(*s, dtype=torch.cfloat) for s in ((3, 4, 6), (3, 6, 5), (3, 4, 5)))
    assert count_flops(torch.baddbmm, C, A, Bm).total == 8 * 3 * 4 * 6 * 5
    assert count_flops(torch.addbmm, c, A, Bm).total == 8 * 3 * 4 * 6 * 5
    assert count_flops(torch.addbmm, c.real, A.real, Bm.real).total == 2 * 3 * 4 * 6 * 5
    assert count_flops(nn.Linear(6, 5, dtype=torch.cfloat), a).total == 8 * 4 * 6 * 5


def test_count_flops_does_not_depend_on_the_backend(monkeypatch):
    # the dft route (automatic on CUDA for large fields) does matmuls instead of FFTs: count_flops
    # runs the reference route, and puts IRNO_BACKEND back afterwards
    B, ci, co, H, W, m1, m2 = 2, 3, 4, 16, 12, 3, 4
    conv, x = SpectralConv2d(ci, co, (m1, m2)), torch.randn(B, ci, H, W)
    ref = count_flops(conv, x)
    for forced in ("dft", "cpu" if irno_kernels.backend.HAS_C else "reference"):
        monkeypatch.setenv("IRNO_BACKEND", forced)
        rep = count_flops(conv, x)
        assert (rep.total, rep.fft, rep.n_fft) == (ref.total, ref.fft, ref.n_fft)
        assert rep.total == pytest.approx(B * (ci + co) * 5 * H * W * math.log2(H * W) + 8 * B * ci * co * 2 * m1 * m2,
                                          abs=2)
        assert irno_kernels.backend.os.environ["IRNO_BACKEND"] == forced
    monkeypatch.delenv("IRNO_BACKEND")
    count_flops(conv, x)
    assert "IRNO_BACKEND" not in irno_kernels.backend.os.environ
