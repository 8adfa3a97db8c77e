"""irno.report: metrics.json, report.md and the figures of a run folder, from evaluate_irno's dict."""

import json
import math
import re

import numpy as np
import pytest
import torch
from irno import FNO, IRNO
from irno.evaluate import evaluate_irno
from irno.report import FIGURES, fmt, fmt_pct, pick_steps, print_summary, to_jsonable, write_report
from torch.utils.data import DataLoader, TensorDataset

matplotlib = pytest.importorskip("matplotlib")
from matplotlib import image as mpimg  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# DESIGN section 8: the plain run's VRMSE per step (K = 4), continued to K + 6
CALIBRATION = [0.158, 0.121, 0.101, 0.095, 0.099, 0.108, 0.118, 0.127, 0.136, 0.150, 0.170]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_results(vrmse=CALIBRATION, K=4, fields=("vorticity",), n_samples=8, R=23, seed=0) -> dict:
    """A dict with the structure of irno.evaluate.evaluate_irno's, VRMSE means as given."""
    g = np.random.default_rng(seed)
    n = len(vrmse) - 1
    offsets = np.linspace(-0.1, 0.1, len(fields)) if len(fields) > 1 else np.zeros(1)

    def per_step(means):
        return [{"mean": float(m), **{f: float(m * (1 + o)) for f, o in zip(fields, offsets)}} for m in means]

    v = np.asarray(vrmse, dtype=float)
    acc = 1 - v ** 2 / 2
    metrics = {"vrmse": per_step(v), "nrmse": per_step(0.8 * v), "rfne": per_step(0.8 * v),
               "rel_l2": per_step(0.81 * v), "acc": per_step(acc)}
    r = np.arange(R)
    radial = [list(np.ones(R))] + [list(1 - 0.6 * (1 - k / (n + 2)) * np.exp(-r / 8) + 0.02 * k * r / R)
                                   for k in range(1, n + 1)]
    bias = g.uniform(0.5, 2.0, n_samples)
    floor = 3 * bias + g.normal(0, 0.2, n_samples)
    return {
        "steps": list(range(n + 1)), "metrics": metrics,
        "spectral_ratio": [[1.0, 1.0, 1.0]] + [[float(x) for x in (0.6 ** k + 0.1, 0.8 ** k + 0.1, 1 - 0.01 * k)]
                                                for k in range(1, n + 1)],
        "spectral_bands": ["low", "mid", "high"],
        "radial_ratio": radial,
        "radial_error_spectrum": [list(float(e) * np.exp(-r / 10)) for e in v],
        "radial_target_spectrum": list(np.exp(-r / 6)),
        "K": K, "n_samples": n_samples,
        "time_base_s": 0.0021, "time_step_s": 0.0035, "flops_base": 1.5e9, "flops_step": 2.4e9,
        "contraction": {"at_hK_median": 0.93, "at_y_median": 0.97, "at_hK": [0.93] * 3, "at_y": [0.97] * 3},
        "bias_floor": {"bias": bias.tolist(), "floor": floor.tolist(), "min_error": (floor - 0.1).tolist(),
                       "pearson_r": float(np.corrcoef(bias, floor)[0, 1]) if n_samples > 1 else math.nan,
                       "pearson_r_min": float(np.corrcoef(bias, floor - 0.1)[0, 1]) if n_samples > 1 else math.nan},
    }


def make_samples(n_steps=10, C=1, H=32, seed=0) -> dict:
    """A smooth random truth and a trajectory whose error shrinks then grows, as in CALIBRATION."""
    g = torch.Generator().manual_seed(seed)
    k = torch.fft.fftfreq(H) * H
    kk = (k[:, None] ** 2 + k[None, : H // 2 + 1] ** 2).sqrt().clamp_min(1)

    def field():
        spec = torch.view_as_complex(torch.randn(C, H, H // 2 + 1, 2, generator=g)) * kk ** -1.8
        f = torch.fft.irfft2(spec, s=(H, H))
        return f / f.std()

    y, noise = field(), field()
    scale = torch.tensor(CALIBRATION[: n_steps + 1])
    traj = y + scale[:, None, None, None] * noise
    return {"x": torch.cat([y - 0.3 * noise, y - 0.1 * noise, y]), "y": y, "trajectory": traj}


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300, (path, img.shape)
    assert img[..., :3].std() > 0.01, f"{path} is blank"


def _table_rows(md: str, heading: str) -> list[list[str]]:
    """Data rows of the first markdown table after the line starting with ``heading``."""
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(heading))
    while not lines[i].startswith("|"):
        i += 1
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_full_report(tmp_path):
    res = make_results()
    controls = {"base": {"vrmse": 0.158, "time_s": 300, "flops": 1.5e9},
                "base + more training (same time as IRNO)": {"vrmse": 0.137, "time_s": 720, "flops": 1.5e9},
                "24-mode base": {"vrmse": 0.110, "flops": 5.2e9}}
    run_info = {"data": {"resolution": 64, "nu": 1e-3}, "wall_time_s": {"base": 300, "irno": 420},
                "params": {"base": 1_200_000, "refiner": 2_200_000}, "versions": {"torch": torch.__version__}}
    out = write_report(tmp_path / "run", {"IRNO": res, "transfer: IRNO on base B": make_results(
        [0.110, 0.104, 0.101, 0.100, 0.100, 0.103, 0.107, 0.112, 0.118, 0.124, 0.131], seed=1)},
        run_info=run_info, controls=controls, samples=make_samples())
    run = tmp_path / "run"
    assert out == run / "report.md"
    for name in FIGURES:
        _png_ok(run / "figures" / f"{name}.png")
    assert not list(run.rglob("*.tmp"))
    md = out.read_text()

    # the per-step table: one row per step, K and the best step marked
    rows = _table_rows(md, "Every metric per step")
    assert len(rows) == len(CALIBRATION)
    assert rows[4][0] == "**4** (K)" and rows[3][0] == "**3** (best)"
    assert [r[1] for r in rows] == [fmt(v) for v in CALIBRATION]
    # improvements over k = 0, computed here from the input
    at_k = 100 * (CALIBRATION[4] - CALIBRATION[0]) / CALIBRATION[0]
    best = 100 * (min(CALIBRATION) - CALIBRATION[0]) / CALIBRATION[0]
    assert (fmt_pct(at_k), fmt_pct(best)) == ("-37.3%", "-39.9%")
    summary = _table_rows(md, "## Summary")
    assert summary[0][:8] == ["IRNO", "4", "0.1580", "0.0990", "-37.3%", "3", "0.0950", "-39.9%"]
    assert len(summary) == 2
    assert "0.0990 at k = K (-37.3%), best 0.0950 at k = 3 (-39.9%)" in md
    # spectral bands, controls, stability and cost
    bands = _table_rows(md, "Binned spectral error ratio")
    assert bands[0] == ["0", "1.0000", "1.0000", "1.0000"] and len(bands) == len(CALIBRATION)
    ctrl = _table_rows(md, "## Controls")
    assert [r[0] for r in ctrl] == list(controls)
    assert ctrl[1][-1] == fmt_pct(100 * (0.099 - 0.137) / 0.137)
    assert "Pearson r = " + fmt(res["bias_floor"]["pearson_r"], 3) in md
    assert "0.9300 at h_K" in md and "2.1 ms" in md and "3.5 ms" in md
    assert "resolution" in md and "1200000" in md
    for name in FIGURES:
        assert f"](figures/{name}.png)" in md
    assert "skipped" not in md

    # metrics.json round-trips
    back = json.loads((run / "metrics.json").read_text())
    assert back["results"]["IRNO"] == to_jsonable(res)
    assert back["controls"] == controls and back["run_info"]["data"] == run_info["data"]
    assert back["summary"]["IRNO"]["vrmse"]["best_step"] == 3
    assert math.isclose(back["summary"]["IRNO"]["vrmse"]["change_at_K_pct"], at_k)

    text = print_summary({"IRNO": res})
    assert "-37.3%" in text and "0.1580" in text and "0.1360" in text and "0.1700 (10)" in text


def test_several_fields_and_nonfinite(tmp_path):
    v = list(CALIBRATION)
    v[7] = float("nan")
    res = make_results(v, fields=("u", "v", "p"))
    res["bias_floor"]["pearson_r"] = float("nan")
    res["contraction"]["at_y_median"] = float("inf")
    out = write_report(tmp_path, res, samples=make_samples(C=3))
    md = out.read_text()
    for m in ("VRMSE", "nRMSE", "RFNE", "rel. L2", "ACC"):
        rows = _table_rows(md, f"{m} per field")
        assert len(rows) == len(v) and len(rows[0]) == 5  # k, mean, u, v, p
    assert _table_rows(md, "VRMSE per field")[0][2:] == [fmt(0.158 * 0.9), fmt(0.158), fmt(0.158 * 1.1)]
    assert _table_rows(md, "Every metric per step")[7][1] == "n/a"
    back = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: NaN and inf became null
    assert back["results"]["IRNO"]["metrics"]["vrmse"][7]["mean"] is None
    assert back["results"]["IRNO"]["bias_floor"]["pearson_r"] is None
    assert back["results"]["IRNO"]["contraction"]["at_y_median"] is None
    for name in FIGURES:
        _png_ok(tmp_path / "figures" / f"{name}.png")


def test_missing_inputs_skip_figures(tmp_path):
    full = make_results()
    write_report(tmp_path, full, samples=make_samples())
    assert all((tmp_path / "figures" / f"{n}.png").exists() for n in FIGURES)
    # the same folder, rewritten without the analysis keys, samples or spectra: stale figures go
    bare = {k: full[k] for k in ("steps", "metrics", "K", "n_samples")}
    md = write_report(tmp_path, bare).read_text()
    _png_ok(tmp_path / "figures" / "error_vs_step.png")
    for name in ("spectral_ratio", "fields", "pareto", "bias_floor"):
        assert not (tmp_path / "figures" / f"{name}.png").exists()
        line = next(line for line in md.splitlines() if f"`figures/{name}.png` skipped" in line)
        assert len(line) > 40
    assert "](figures/error_vs_step.png)" in md
    assert "Controls" not in md and "## Run" not in md
    assert len(_table_rows(md, "Every metric per step")) == len(CALIBRATION)
    # too few bias samples, and samples of the wrong shape, skip with a reason
    one = make_results(n_samples=1)
    samples = make_samples()
    samples["trajectory"] = samples["trajectory"][:, :, :8]
    md = write_report(tmp_path / "b", one, samples=samples).read_text()
    assert "`figures/bias_floor.png` skipped" in md and "`figures/fields.png` skipped: sample shapes" in md


def test_real_evaluate_dict(tmp_path):
    torch.manual_seed(0)
    base = FNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
    model = IRNO(base, K=2, refiner_kwargs={"depth": 1, "width": 4})
    x, y = torch.randn(6, 2, 16, 16), torch.randn(6, 1, 16, 16)
    res = evaluate_irno(model, DataLoader(TensorDataset(x, y), batch_size=3), steps=5)
    with torch.no_grad():
        traj = model(x[:1], steps=5, return_trajectory=True)
    samples = {"x": x[0], "y": y[0], "trajectory": [h[0] for h in traj]}
    out = write_report(tmp_path, {"IRNO": res}, controls={"base": {"vrmse": res["metrics"]["vrmse"][0]["mean"]}},
                       samples=samples, run_info={"field_names": ["w"]})
    for name in FIGURES:
        _png_ok(tmp_path / "figures" / f"{name}.png")
    md = out.read_text()
    assert len(_table_rows(md, "Every metric per step")) == 6
    v = [d["mean"] for d in res["metrics"]["vrmse"]]
    assert fmt_pct(100 * (v[2] - v[0]) / v[0]) in _table_rows(md, "## Summary")[0]
    assert json.loads((tmp_path / "metrics.json").read_text())["results"]["IRNO"]["steps"] == list(range(6))
    assert re.search(r"\| IRNO +\|", print_summary(res)) is None  # plain text, not markdown
    assert print_summary(res).splitlines()[2].startswith("IRNO")


def test_pick_steps():
    assert pick_steps(10, 4) == [0, 2, 4, 6, 8, 10]
    assert pick_steps(12, 6) == [0, 2, 6, 8, 10, 12]
    s = pick_steps(30, 5)
    assert len(s) <= 6 and {0, 5, 30} <= set(s)
    assert pick_steps(3, 1) == [0, 1, 2, 3]


def test_real_evaluate_dict_one_sample(tmp_path):
    # ACC takes the evaluated set's mean as its climatology: with one sample it is left out, not NaN
    torch.manual_seed(0)
    base = FNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
    model = IRNO(base, K=2, refiner_kwargs={"depth": 1, "width": 4})
    x, y = torch.randn(1, 2, 16, 16), torch.randn(1, 1, 16, 16)
    res = evaluate_irno(model, [(x, y)], steps=3)
    assert "acc" not in res["metrics"] and res["n_samples"] == 1
    md = write_report(tmp_path, {"IRNO": res}).read_text()
    rows = _table_rows(md, "Every metric per step")
    assert len(rows) == 4 and all("nan" not in c.lower() for r in rows for c in r)
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("Every metric per step"))
    header = next(line for line in lines[i:] if line.startswith("|"))
    assert "nRMSE" in header and "ACC" not in header
