"""irno.metrics, pinned with hand-computed values on tiny arrays (DESIGN section 4)."""

import math

import pytest
import torch
from irno import metrics as M

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair():
    """pred, target of shape (B=1, C=2, 2, 2). Field 0: y = [[1,2],[3,4]], p - y = [[0,0],[0,2]].
    Field 1: y = [[0,0],[0,4]], p = y + 1 everywhere."""
    y = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 4.0]]]], dtype=torch.float64)
    p = y.clone()
    p[0, 0, 1, 1] += 2.0
    p[0, 1] += 1.0
    return p, y


# field 0: mse = 4/4 = 1; var_bessel(y) = ((1.5^2 + 0.5^2) * 2) / 3 = 5/3; mean(y^2) = 30/4 = 7.5;
#          ||p - y|| = 2, ||y|| = sqrt(30)
# field 1: mse = 1; mean(y) = 1, var_bessel = (1 + 1 + 1 + 9) / 3 = 4; mean(y^2) = 4; ||p - y|| = 2, ||y|| = 4
VRMSE = [math.sqrt(1 / (5 / 3 + 1e-7)), math.sqrt(1 / (4 + 1e-7))]
NRMSE = [math.sqrt(1 / (7.5 + 1e-7)), math.sqrt(1 / (4 + 1e-7))]
RFNE = [2 / math.sqrt(30), 2 / 4]
RELL2 = [2 / (math.sqrt(30) + 1e-8), 2 / (4 + 1e-8)]


@pytest.mark.parametrize("fn, expected", [(M.vrmse, VRMSE), (M.nrmse, NRMSE), (M.rfne, RFNE),
                                          (M.relative_l2, RELL2)])
def test_pointwise_metrics_hand_values(fn, expected):
    p, y = _pair()
    out = fn(p, y)
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64), rtol=1e-12, atol=0)


def test_vrmse_values_to_four_digits():
    p, y = _pair()
    torch.testing.assert_close(M.vrmse(p, y), torch.tensor([[0.7746, 0.5]], dtype=torch.float64), atol=1e-4, rtol=0)


def test_channel_last_layout_is_pinned():
    p, y = _pair()
    p_last, y_last = p.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1)  # (B, H, W, C): same shape here
    right = torch.tensor([VRMSE], dtype=torch.float64)
    torch.testing.assert_close(M.vrmse(p_last, y_last, channel_dim=-1), right)
    torch.testing.assert_close(M.vrmse(p_last, y_last, channel_dim=3), right)
    wrong = M.vrmse(p_last, y_last)  # read as channel-first: rows are taken for fields
    assert wrong.shape == right.shape
    assert not torch.allclose(wrong, right, rtol=1e-3)


def test_acc_hand_values():
    # (B=2, C=1, N=2). Targets [1,3], [3,5]: climatology over the set = [2, 4].
    y = torch.tensor([[[1.0, 3.0]], [[3.0, 5.0]]], dtype=torch.float64)
    p = torch.tensor([[[2.0, 2.0]], [[4.0, 6.0]]], dtype=torch.float64)
    # sample 0: p' = [0, -2], y' = [-1, -1]: 2 / sqrt(4 * 2); sample 1: p' = [2, 2], y' = [1, 1]: 4 / 4
    torch.testing.assert_close(M.acc(p, y), torch.tensor([[1 / math.sqrt(2)], [1.0]], dtype=torch.float64))
    # with a given climatology c = 0: sample 0: 8 / sqrt(8 * 10)
    zero = torch.zeros(1, 2, dtype=torch.float64)
    assert M.acc(p, y, climatology=zero)[0, 0].item() == pytest.approx(8 / math.sqrt(80), rel=1e-12)
    # latitude-style weights w = [1, 0] keep only the first point: anomalies -1 vs 0 -> 0 / 0 is nan,
    # so weight [1, 3]: sample 1 (p' = y' * 2) stays perfectly correlated
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert M.acc(p, y, weights=w)[1, 0].item() == pytest.approx(1.0, rel=1e-12)


def test_well_bands_and_binned_error_hand_values_1d():
    # N = 4: |k| = [0, pi/2, pi, pi/2] rad/sample; edges log-spaced from pi/2 to pi + 1e-6, first -> 0:
    # [0, (pi/2) t^(1/3), (pi/2) t^(2/3), pi + 1e-6] with t = (pi + 1e-6) / (pi/2) (~2)
    edges = M.well_bands((4,))
    t = (math.pi + 1e-6) / (math.pi / 2)
    ref = torch.tensor([0.0, math.pi / 2 * t ** (1 / 3), math.pi / 2 * t ** (2 / 3), math.pi + 1e-6],
                       dtype=torch.float64)
    torch.testing.assert_close(edges, ref, rtol=1e-9, atol=1e-12)
    # bands: low = {0, +-pi/2}, mid = {}, high = {pi}
    y = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)   # |F(y)|^2 = 1 everywhere
    p = y + torch.tensor([[[1.0, 0.0, 1.0, 0.0]]], dtype=torch.float64)  # residual: F = [2, 0, 2, 0]
    raw = M.binned_spectral_error(p, y, normalize=False)
    torch.testing.assert_close(raw, torch.tensor([[[4 / 16, 0.0, 4 / 16]]], dtype=torch.float64))
    assert raw.sum().item() == pytest.approx(((p - y) ** 2).mean().item())  # Parseval
    norm = M.binned_spectral_error(p, y)  # / target power per band: 3/16, 0, 1/16 (+1e-7)
    expected = torch.tensor([[[0.25 / (3 / 16 + 1e-7), 0.0, 0.25 / (1 / 16 + 1e-7)]]], dtype=torch.float64)
    torch.testing.assert_close(norm, expected)


def test_binned_error_2d_parseval_and_layout():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, 16, 12, generator=g, dtype=torch.float64)
    p = y + 0.1 * torch.randn(2, 3, 16, 12, generator=g, dtype=torch.float64)
    raw = M.binned_spectral_error(p, y, normalize=False)
    assert raw.shape == (2, 3, 3)
    torch.testing.assert_close(raw.sum(-1), ((p - y) ** 2).mean(dim=(2, 3)))
    edges = M.well_bands((16, 12))
    lo, hi = 2 * math.pi / 16, math.pi * math.sqrt(2) + 1e-6  # max(N) = 16; corner frequency pi*sqrt(2)
    assert edges[0] == 0 and edges[1].item() == pytest.approx(lo * (hi / lo) ** (1 / 3), rel=1e-12)
    assert edges[3].item() == pytest.approx(hi, rel=1e-12)
    cl = M.binned_spectral_error(p.movedim(1, -1), y.movedim(1, -1), channel_dim=-1)
    torch.testing.assert_close(cl, M.binned_spectral_error(p, y))


def test_spectral_error_ratio():
    y = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    r = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]], dtype=torch.float64)
    ratio = M.spectral_error_ratio([y + r, y + 0.5 * r, y], y)
    assert ratio.shape == (3, 1, 1, 3)
    torch.testing.assert_close(ratio[:, 0, 0, 0], torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(ratio[:, 0, 0, 2], torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64))


def test_radial_spectra():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 1, 8, 8, generator=g)
    p = y + torch.randn(2, 1, 8, 8, generator=g)
    assert M.radial_spectrum(y).sum(-1).allclose((y ** 2).sum(dim=(2, 3)), rtol=1e-4)
    e = M.radial_error_spectrum(p, y)
    assert e.sum(-1).allclose(((p - y) ** 2).sum(dim=(2, 3)), rtol=1e-4)
    ratio = M.radial_error_ratio([p, y + 0.5 * (p - y)], y)
    assert ratio.shape == (2,) + e.shape
    torch.testing.assert_close(ratio[1], torch.full_like(ratio[1], 0.25), rtol=1e-4, atol=1e-6)


def test_reductions():
    v = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # (B=2, C=2)
    torch.testing.assert_close(M.field_mean(v), torch.tensor([2.0, 4.0]))
    assert M.overall_mean(v).item() == 3.0
    assert M.summarize(v, ["u", "v"]) == {"mean": 3.0, "u": 2.0, "v": 4.0}
    assert M.summarize(v) == {"mean": 3.0, "field0": 2.0, "field1": 4.0}


def test_shape_errors():
    with pytest.raises(ValueError, match="equal shapes"):
        M.vrmse(torch.zeros(1, 1, 4), torch.zeros(1, 1, 5))
    with pytest.raises(ValueError, match="spatial"):
        M.vrmse(torch.zeros(1, 4), torch.zeros(1, 4))


def test_acc_one_sample_needs_a_climatology():
    # climatology=None takes the batch mean: with B = 1 that is the target itself, acc 0/0
    p, y = _pair()
    with pytest.raises(ValueError, match="climatology"):
        M.acc(p, y)
    clim = torch.zeros_like(y)  # given: fine with one sample
    assert torch.isfinite(M.acc(p, y, climatology=clim)).all()


def test_summarize_names_must_match_fields():
    v = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # (B=2, C=2)
    with pytest.raises(ValueError, match="names"):
        M.summarize(v, ["u"])
    with pytest.raises(ValueError, match="names"):
        M.summarize(v, ["u", "v", "w"])
