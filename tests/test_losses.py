"""irno.losses: the lambda schedule, the progressive spectral loss, the fixed-point term and its ramp,
the full IRNO objective, and the neuraloperator-convention LpLoss / H1Loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from irno import FNO, IRNO, UNetRefiner
from irno.losses import (
    H1Loss,
    IRNOLoss,
    LpLoss,
    ProgressiveSpectralLoss,
    fixed_point_loss,
    fixed_point_weight,
    spectral_lambda,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _spectral_loss_by_hand(p, y, lam, f0=0.5, mode="magnitude"):
    """DESIGN 1: mean over the rfft2 entries of w(f) * (|F p| - |F y|)^2, w = 1 + (|f|/f0)^lam / mean."""
    H, W = p.shape[-2:]
    f = torch.sqrt(torch.fft.fftfreq(H)[:, None] ** 2 + torch.fft.rfftfreq(W)[None] ** 2).to(p.dtype)
    w = 1 + (f / f0) ** lam
    w = w / w.mean()
    P, Y = torch.fft.rfft2(p, norm="ortho"), torch.fft.rfft2(y, norm="ortho")
    d = (P.abs() - Y.abs()) ** 2 if mode == "magnitude" else (P - Y).abs() ** 2
    return (w * d).mean()


def test_lambda_schedule():
    assert [spectral_lambda(k, 6) for k in range(6)] == pytest.approx([1.0, 1.2, 1.4, 1.6, 1.8, 2.0])
    assert [spectral_lambda(k, 4) for k in range(4)] == pytest.approx([1.0, 4 / 3, 5 / 3, 2.0])
    assert spectral_lambda(0, 1) == 1.0
    loss = ProgressiveSpectralLoss(K=6, lam_min=0.5, lam_max=3.0)
    assert loss.lam(0) == 0.5 and loss.lam(5) == 3.0
    with pytest.raises(ValueError, match="mode"):
        ProgressiveSpectralLoss(mode="phase")


@pytest.mark.parametrize("mode", ["magnitude", "error"])
def test_progressive_spectral_loss_matches_design(mode):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2, 3, 8, 10, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, 8, 10, generator=g, dtype=torch.float64)
    loss = ProgressiveSpectralLoss(K=4, mode=mode)
    for k in range(4):
        lam = 1 + k / 3
        torch.testing.assert_close(loss(p, y, k), _spectral_loss_by_hand(p, y, lam, mode=mode))
    assert loss(p, y, 3) != loss(p, y, 0)


def test_fixed_point_ramp():
    assert fixed_point_weight(0) == 0.0
    assert fixed_point_weight(2.5) == pytest.approx(0.005)
    assert fixed_point_weight(1) == pytest.approx(0.002)
    assert fixed_point_weight(5) == pytest.approx(0.01)
    assert fixed_point_weight(50) == pytest.approx(0.01)
    assert fixed_point_weight(None) == 0.01
    assert fixed_point_weight(0, beta_fp=0.1, warmup_epochs=0) == 0.1


def _model(K=3):
    torch.manual_seed(0)
    base = FNO(n_modes=4, in_channels=1, out_channels=1, hidden_channels=4, n_layers=1)
    m = IRNO(base, UNetRefiner(2, 1, depth=2, width=4), K=K)
    with torch.no_grad():
        m.refiner.out_conv.weight.mul_(5.0)
        m.refiner.out_conv.bias.fill_(0.1)
    return m


def test_fixed_point_loss():
    m = _model()
    x, y = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    phi = m.refiner(torch.cat([x, y], 1))
    torch.testing.assert_close(fixed_point_loss(m, x, y, beta_fp=1.0), phi.square().mean())
    torch.testing.assert_close(fixed_point_loss(m, x, y, epoch=1), 0.002 * phi.square().mean())
    fixed_point_loss(m, x, y).backward()
    assert m.refiner.out_conv.weight.grad is not None


def test_irno_loss_is_the_paper_objective():
    K = 3
    m = _model(K)
    m.train()
    x, y = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    crit = IRNOLoss(K=K, beta_s=0.5, beta_fp=0.01, fp_warmup_epochs=5)
    total, parts = crit(m, x, y, epoch=2)
    traj = m(x, return_trajectory=True)
    expected = sum(F.mse_loss(traj[k + 1], y) + 0.5 * _spectral_loss_by_hand(traj[k + 1], y, 1 + k / 2)
                   for k in range(K)) / K
    fp = m.refiner(torch.cat([x, y], 1)).square().mean()
    expected = expected + 0.004 * fp
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-7)
    assert set(parts) >= {"total", "mse", "spec", "fp", "beta_fp", "mse_steps", "spec_steps"}
    assert parts["beta_fp"] == pytest.approx(0.004) and len(parts["mse_steps"]) == K
    torch.testing.assert_close(parts["fp"], fp.detach())
    torch.testing.assert_close(parts["mse"], torch.stack([F.mse_loss(h, y) for h in traj[1:]]).mean().detach())
    total.backward()
    assert all(p.grad is not None for p in m.refiner.parameters())
    # a given trajectory is used as is; a wrong length is refused
    t2, _ = crit(m, x, y, epoch=2, trajectory=[h.detach() for h in traj])
    torch.testing.assert_close(t2, total.detach(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="trajectory"):
        crit(m, x, y, trajectory=traj[:2])
    # defaults: K=6, beta_s=1, beta_fp=0.01 over 5 epochs
    d = IRNOLoss()
    assert (d.K, d.beta_s, d.beta_fp, d.fp_warmup_epochs, d.spectral.f0) == (6, 1.0, 0.01, 5, 0.5)


def test_lp_loss_hand_values():
    y = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[3.0, 4.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    x = y.clone()
    x[0, 0, 1, 1] = 1.0  # ||x - y|| = 1, ||y|| = 1
    x[1, 0, 0, 0] = 0.0  # ||x - y|| = 3, ||y|| = 5
    rel = [1 / (1 + 1e-8), 3 / (5 + 1e-8)]
    assert LpLoss()(x, y).item() == pytest.approx(sum(rel))
    assert LpLoss(reduction="mean")(x, y).item() == pytest.approx(sum(rel) / 2)
    torch.testing.assert_close(LpLoss(reduction="none")(x, y), torch.tensor([[rel[0]], [rel[1]]]))
    # abs: quadrature (1/2)(1/2) on a 2 x 2 grid: sqrt(1/4 * 1) + sqrt(1/4 * 9)
    assert LpLoss().abs(x, y).item() == pytest.approx(0.5 + 1.5)
    assert LpLoss(p=1).rel(x, y).item() == pytest.approx(1 / (1 + 1e-8) + 3 / (7 + 1e-8))
    with pytest.raises(ValueError, match="reduction"):
        LpLoss(reduction="max")(x, y)


def test_h1_loss_hand_values():
    # 1-D, n = 4, h = 1/4, periodic central differences dy_i = (y_{i+1} - y_{i-1}) / (2h):
    # y = [1, 0, 0, 0] -> dy = [0, -2, 0, 2]; ||y||^2_H1 = 1 + 8 = 9. pred = y + 1: the error is
    # constant 1 -> ||e||^2_H1 = 4 + 0. rel = 2 / 3.
    y = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    assert H1Loss(d=1)(y + 1, y).item() == pytest.approx(2 / (3 + 1e-8))
    # non-periodic: one-sided second-order differences at the ends (torch.gradient)
    assert math.isfinite(H1Loss(d=1, periodic=False)(y + 1, y).item())
    # a pure derivative error: e = [0, 1, 0, 1] -> de = 0 (periodic), ||e||^2 = 2
    e = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]])
    assert H1Loss(d=1, reduction="mean")(y + e, y).item() == pytest.approx(math.sqrt(2) / (3 + 1e-8))


def test_losses_match_neuraloperator():
    neuralop = pytest.importorskip("neuralop")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 12, 10, generator=g)
    y = torch.randn(3, 2, 12, 10, generator=g)
    ref_lp = neuralop.losses.LpLoss(d=2, p=2)
    assert LpLoss(d=2, p=2)(x, y).item() == pytest.approx(ref_lp(x, y).item(), rel=1e-5)
    assert LpLoss(d=2).abs(x, y).item() == pytest.approx(ref_lp.abs(x, y).item(), rel=1e-5)
    ref_h1 = neuralop.losses.H1Loss(d=2)
    assert H1Loss(d=2)(x, y).item() == pytest.approx(ref_h1(x, y).item(), rel=1e-5)


def test_loss_settings_are_checked_by_name():
    """Negative or non-finite weights, a non-positive f0, K < 1: refused by name at construction
    (they trained silently, e.g. beta_s = -1 rewarded spectral error)."""
    from irno import IRNOLoss

    for kw, says in (({"beta_s": -1}, "beta_s: expected a finite number >= 0"),
                     ({"beta_fp": float("nan")}, "beta_fp: expected a finite number"),
                     ({"fp_warmup_epochs": float("inf")}, "fp_warmup_epochs"),
                     ({"f0": 0}, "f0: expected a finite number > 0"),
                     ({"lam_min": -0.5}, "lam_min"), ({"lam_max": "2"}, "lam_max"),
                     ({"K": 0}, "K: expected an int >= 1"), ({"K": 2.5}, "K: expected an int")):
        with pytest.raises(ValueError, match=says):
            IRNOLoss(**kw)
    assert IRNOLoss(K=1, beta_s=0, beta_fp=0, lam_min=2, lam_max=1).K == 1  # edge values stay allowed


def test_spectral_lambda_outside_the_schedule():
    # deeper steps (k >= K) keep the last step's lambda instead of extrapolating; k < 0 is an error
    assert spectral_lambda(6, 6) == spectral_lambda(20, 6) == 2.0
    assert ProgressiveSpectralLoss(K=4, lam_min=0.5, lam_max=3.0).lam(9) == 3.0
    assert spectral_lambda(3, 1) == 1.0
    for k in (-1, 1.5):
        with pytest.raises(ValueError, match="k"):
            spectral_lambda(k, 6)
