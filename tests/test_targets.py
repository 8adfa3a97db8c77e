"""benchmarks/targets.py reads a GPU run's CSVs into the issues' target table: checked on the committed
H200 run (fb66a22), whose ratios are known from its README."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "results" / "gpu_h200_2026-11-27_fb66a22"


def test_targets_of_a_committed_run(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import targets
    finally:
        sys.path.pop(0)
    ops, irno = targets._rows(str(RUN / "bench_ops.csv")), targets._rows(str(RUN / "bench_irno.csv"))
    got = {name: (need, val) for _, name, need, val in targets.targets(ops, irno)}
    need, (ratio, who) = got["fused spectral layer, fwd, fp32 (cuda / dft / triton)"]
    assert (need, ratio, who) == (3.0, 2.517, "dft")  # README of that run: dft fp32 forward 2.52x
    assert got["fused spectral layer, fwd, TF32 allowed"][1] == (3.454, "dft_tf32")
    assert got["inference 256x256 B16 4->1 vs plain eager"][1] == (2.374, "graphed+bf16")
    assert got["spectral mixing alone, fwd, B16 C64 256x256 m16"][1] is None  # not in that run
    assert targets.main([str(RUN / "bench_ops.csv"), str(RUN / "bench_irno.csv")]) == 0
    out = capsys.readouterr().out
    assert "not measured in this run" in out and " NO " in out and " yes " in out
    assert targets.main([]) == 1
