"""benchmarks/pareto.py on a tiny trained run: the rows pair each step's evaluated error with its FLOPs
and measured time, plain and the project agree, the front is the non-dominated set, bad input is
refused with the argument named."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from irno import cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import pareto
finally:
    sys.path.pop(0)


def test_pareto_front_is_the_non_dominated_set():
    pts = [(3.0, 0.5), (1.0, 0.9), (2.0, 0.6), (2.5, 0.7), (4.0, 0.5), (5.0, 0.4)]
    assert pareto.pareto_front(pts) == [(1.0, 0.9), (2.0, 0.6), (3.0, 0.5), (5.0, 0.4)]
    assert pareto.pareto_front([]) == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from test_pipeline import _args

    tmp = tmp_path_factory.mktemp("pareto")
    old = Path.cwd()
    import os

    os.chdir(ROOT)
    try:
        assert cli.main(["demo", *_args(tmp), "--set", "control.enabled=false"]) == 0
    finally:
        os.chdir(old)
    return tmp / "run"


def test_pareto_on_a_trained_run(tiny_run, tmp_path, capsys):
    out_csv, out_png = tmp_path / "p.csv", tmp_path / "p.png"
    argv = ["--run", str(tiny_run), "--threads", "1", "--batch", "2", "--min-time", "0.05",
            "--csv", str(out_csv), "--plot", str(out_png)]
    assert pareto.main(argv) == 0
    text = capsys.readouterr().out
    assert "plain vs irno at k = 4: relative L2 error" in text  # K = 2, two extra steps: 0..4
    rows = list(csv.DictReader(out_csv.open()))
    payload = json.loads((tiny_run / "metrics.json").read_text())
    metrics, controls = payload["results"]["IRNO"], payload["controls"]
    vrmse = [m["mean"] for m in metrics["metrics"]["vrmse"]]
    assert {r["variant"] for r in rows} == {"plain", "irno"}  # graphed: CUDA only
    for variant in ("plain", "irno"):
        mine = [r for r in rows if r["variant"] == variant]
        assert [int(r["steps"]) for r in mine] == list(range(len(vrmse)))
        for r in mine:
            k = int(r["steps"])
            assert float(r["vrmse"]) == pytest.approx(vrmse[k], abs=1e-6)
            want = (metrics["flops_base"] + k * metrics["flops_step"]) / 1e9
            assert float(r["gflop_per_sample"]) == pytest.approx(want, abs=1e-4)
            assert float(r["ms_per_sample"]) > 0
        # a point is on the FLOPs front exactly when no cheaper-or-equal point (or control other than
        # the base itself, at the base's cost) has a lower error
        others = [(float(o["gflop_per_sample"]), float(o["vrmse"])) for o in mine]
        others += [(metrics["flops_base"] / 1e9, c["vrmse"]) for name, c in controls.items() if name != "base"]
        for r in mine:
            c, e = float(r["gflop_per_sample"]), float(r["vrmse"])
            dominated = any(oc <= c and oe < e for oc, oe in others)
            assert (r["front_flops"] == "True") == (not dominated)
    assert float(rows[0]["plain_vs_irno_rel_err"]) < 1e-4
    assert out_png.stat().st_size > 10_000


def test_pareto_random_grid_and_step_subset(tiny_run, tmp_path):
    out_csv = tmp_path / "p.csv"
    assert pareto.main(["--run", str(tiny_run), "--threads", "1", "--batch", "3", "--grid", "12x20",
                        "--min-time", "0.05", "--steps", "2,0", "--csv", str(out_csv)]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["variant"], r["steps"], r["grid"], r["batch"]) for r in rows] == [
        ("plain", "0", "12x20", "3"), ("plain", "2", "12x20", "3"),
        ("irno", "0", "12x20", "3"), ("irno", "2", "12x20", "3")]


def test_pareto_bad_input_names_the_argument(tiny_run, tmp_path, capsys):
    assert pareto.main(["--run", str(tmp_path), "--grid", "8x8"]) == 2
    err = capsys.readouterr().err
    assert "--run:" in err and "has no metrics.json" in err
    assert pareto.main(["--run", str(tiny_run), "--steps", "0,99", "--grid", "8x8"]) == 2
    assert "--steps: [99] were not evaluated" in capsys.readouterr().err
    assert pareto.main(["--run", str(tiny_run), "--metric", "nope", "--grid", "8x8"]) == 2
    assert "--metric: " in capsys.readouterr().err
    for bad in (["--grid", "8by8"], ["--steps", "-1"], ["--batch", "0"], ["--min-time", "0"]):
        with pytest.raises(SystemExit):
            pareto.main(["--run", str(tiny_run), *bad])
