"""irno.evaluate: scoring a trajectory and the analysis of evaluate_irno (transfer, dtypes, units)."""

import math

import pytest
import torch
from irno import FNO, IRNO, UNetRefiner, metrics
from irno.analysis import count_flops
from irno.data import Normalization
from irno.evaluate import evaluate_irno, score_trajectory
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _fno(width=4, layers=1, modes=4):
    return FNO(n_modes=(modes, modes), in_channels=1, out_channels=1, hidden_channels=width, n_layers=layers)


def _still_irno(base, K=2):
    """An IRNO whose Phi is 0 (a zeroed 1x1 conv): every step keeps h_0."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    nn.init.zeros_(conv.weight)
    return IRNO(base, conv, K=K, in_channels=1, out_channels=1)


class _Counted(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_transfer_reports_the_refined_base():
    torch.manual_seed(0)
    own, other = _Counted(_fno()), _fno(width=16, layers=2, modes=6)
    m = _still_irno(own)
    x, y = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    res = evaluate_irno(m, [(x, y)], steps=3, refine_from=other)
    assert own.calls == 0  # neither timed nor run for the bias floor
    assert res["flops_base"] == count_flops(other, x[:1]).total != count_flops(own, x[:1]).total
    with torch.no_grad():
        e_other = (other(x) - y).flatten(1).norm(dim=1)
    torch.testing.assert_close(torch.tensor(res["bias_floor"]["min_error"]), e_other)
    torch.testing.assert_close(torch.tensor(res["bias_floor"]["floor"]), e_other)
    own_res = evaluate_irno(m, [(x, y)], steps=3)
    assert own_res["flops_base"] == count_flops(own, x[:1]).total


def test_medians_are_true_medians():
    g = torch.Generator().manual_seed(0)
    y, e = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    h1 = y + torch.tensor([0.5, 1.0]).view(2, 1, 1, 1) * e  # error ratios 0.25 and 1 in every band
    out = score_trajectory(torch.stack([y + e, h1]), y)
    assert out["spectral_ratio"][1] == pytest.approx([0.625] * 3, rel=1e-4)
    assert out["radial_ratio"][1][1:4] == pytest.approx([0.625] * 3, rel=1e-4)


def test_float64_model_keeps_its_dtype():
    torch.manual_seed(0)
    m = IRNO(_fno(), UNetRefiner(2, 1, depth=2, width=4), K=2).double()
    x, y = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.randn(2, 1, 16, 16, dtype=torch.float64)
    res = evaluate_irno(m, [(x, y)], steps=3)
    with torch.no_grad():
        traj = m(x, steps=3, return_trajectory=True)
    for k in (0, 3):
        assert res["metrics"]["nrmse"][k]["mean"] == pytest.approx(float(metrics.nrmse(traj[k], y).mean()), rel=1e-12)
    assert all(math.isfinite(q) for q in res["contraction"]["at_hK"] + res["bias_floor"]["floor"])


def test_steps_below_K_with_analysis():
    torch.manual_seed(0)
    m = IRNO(_fno(), UNetRefiner(2, 1, depth=2, width=4), K=4)
    x, y = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="steps"):
        evaluate_irno(m, [(x, y)], steps=2)
    assert len(evaluate_irno(m, [(x, y)], steps=2, analyse=False)["metrics"]["vrmse"]) == 3


def test_one_sample_leaves_acc_out():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, 2, 8, 8, generator=g)
    out = score_trajectory(torch.stack([y + 0.1, y + 0.05]), y, ["u", "v"])
    assert "acc" not in out["metrics"] and len(out["metrics"]["vrmse"]) == 2
    assert all(math.isfinite(v) for d in out["metrics"]["nrmse"] for v in d.values())
    two = score_trajectory(torch.stack([y.repeat(2, 1, 1, 1)]), y.repeat(2, 1, 1, 1), ["u", "v"])
    assert "acc" in two["metrics"]


def test_metrics_in_physical_units():
    # the model sees z-scored fields; nRMSE, RFNE and rel L2 are reported on the denormalised ones,
    # VRMSE (invariant to the per-channel affine map) is unchanged, spectral ratios too
    torch.manual_seed(0)
    norm = Normalization(("a", "b"), (10.0, -3.0), (0.1, 4.0))
    base = FNO(n_modes=(4, 4), in_channels=2, out_channels=2, hidden_channels=4, n_layers=1)
    m = IRNO(base, UNetRefiner(4, 2, depth=2, width=4), K=2)
    x, y = torch.randn(3, 2, 16, 16), torch.randn(3, 2, 16, 16)
    plain = evaluate_irno(m, [(x, y)], steps=3, analyse=False)
    phys = evaluate_irno(m, [(x, y)], steps=3, analyse=False, normalization=norm.to_dict())
    with torch.no_grad():
        traj = m(x, steps=3, return_trajectory=True)
    P, Y = norm.denormalize(traj[2], 1), norm.denormalize(y, 1)
    assert phys["metrics"]["nrmse"][2]["field1"] == pytest.approx(float(metrics.nrmse(P, Y)[:, 1].mean()), rel=1e-5)
    assert phys["metrics"]["rfne"][2]["mean"] == pytest.approx(float(metrics.rfne(P, Y).mean()), rel=1e-5)
    assert phys["metrics"]["nrmse"][2]["mean"] != pytest.approx(plain["metrics"]["nrmse"][2]["mean"], rel=1e-2)
    assert phys["metrics"]["vrmse"] == plain["metrics"]["vrmse"]
    torch.testing.assert_close(torch.tensor(phys["spectral_ratio"]), torch.tensor(plain["spectral_ratio"]), rtol=1e-3,
                               atol=0)
    assert phys["radial_ratio"][2] == pytest.approx(plain["radial_ratio"][2], rel=1e-3)
    assert phys["metrics"]["acc"][2]["mean"] == pytest.approx(plain["metrics"]["acc"][2]["mean"], rel=1e-4)


def test_pipeline_evaluate_scores_in_the_data_units():
    from irno import pipeline

    class _Set(torch.utils.data.TensorDataset):
        channel_names = ["a"]
        normalization = Normalization(("a",), (5.0,), (0.5,))

    torch.manual_seed(0)
    m = IRNO(_fno(), UNetRefiner(2, 1, depth=2, width=4), K=1)
    x, y = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16)
    cfg = {"evaluate": {"batch_size": 2, "extra_steps": 1}, "device": "cpu", "seed": 0}
    res = pipeline.evaluate(cfg, m, {"test": _Set(x, y)})
    ref = evaluate_irno(m, [(x, y)], steps=2, analyse=False, field_names=["a"], normalization=_Set.normalization)
    for name in ("vrmse", "nrmse", "rfne"):
        assert [d["a"] for d in res["metrics"][name]] == pytest.approx([d["a"] for d in ref["metrics"][name]], rel=1e-5)
    assert res["metrics"]["nrmse"][0]["a"] < 0.5  # the physical fields sit near 5: a small relative error


def test_field_names_of_several_output_frames():
    # a data set's channel_names list one frame's fields; y may stack several frames (time-major)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 4, 8, 8, generator=g)
    out = score_trajectory(torch.stack([y + 0.1]), y, ["u", "v"])
    assert set(out["metrics"]["nrmse"][0]) == {"mean", "u_t0", "v_t0", "u_t1", "v_t1"}
    with pytest.raises(ValueError, match="names"):
        score_trajectory(torch.stack([y + 0.1]), y, ["u", "v", "w"])
