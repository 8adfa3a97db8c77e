"""The GPU targets of issues 5 and 6, read off one run's CSV files: each target with its measured
ratio and whether it is met.

    python benchmarks/targets.py OUT/bench_ops.csv OUT/bench_irno.csv

gpu_check.sh prints this table last (only the tail of a GPU run's output is seen). Every number is a
ratio of two timings of the same run (bench_ops: speedup_vs_ref; bench_irno: speedup_vs_plain); the
best fast provider or variant counts, and it is named.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

LAYER = ("spectral_conv2d", "B16 C64 256x256 m16")


def _rows(path: str | None) -> list[dict]:
    if not path or not Path(path).is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _best(rows: list[dict], ratio: str, **match) -> tuple[float, str] | None:
    """The largest ``ratio`` among the rows matching every key=value (values may be tuples)."""
    best = None
    for r in rows:
        if all(r.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in match.items()) and r.get(ratio):
            cand = (float(r[ratio]), r.get("provider") or r.get("variant", ""))
            if best is None or cand[0] > best[0]:
                best = cand
    return best


def targets(ops: list[dict], irno: list[dict]) -> list[tuple[str, str, float, tuple[float, str] | None]]:
    """(issue, target, threshold, (measured, by whom) or None) per target."""
    fast = ("cuda", "triton", "dft", "dft_tf32", "triton_tf32", "triton_einsum")
    out = []
    rows = [r for r in ops if r["op"] == "spectral_mix" and r["shape"].startswith("B16 C64 256x256")]
    for mode, need in (("fwd", 3.0), ("fwdbwd", 3.0), ("fwd_graph", 3.0), ("fwdbwd_graph", 3.0)):
        value = _best(rows, "speedup_vs_ref", mode=mode, provider="triton")
        if value is not None or not mode.endswith("_graph"):  # graph rows: runs after 3b528f8
            out.append(("5", f"spectral mixing alone, {mode}, B16 C64 256x256 m16", need, value))
        if mode == "fwd":
            ref = [r for r in rows if r["mode"] == mode and r["provider"] == "reference" and r.get("roofline_frac")]
            if ref and float(ref[0]["roofline_frac"]) > 0:
                # a mixing must write the whole zero-padded spectrum: at best it moves its least
                # traffic at the copy bandwidth, 1 / (the reference's fraction of it) times faster
                out.append(("5", "  bound: the least traffic at copy bandwidth (1 / reference's fraction)", need,
                            (round(1 / float(ref[0]["roofline_frac"]), 3), "copy bandwidth")))
    out.append(("5", "whole spectral layer, fwd, B16 C64 256x256 m16 (Triton)", 2.0,
                _best(ops, "speedup_vs_ref", op=LAYER[0], shape=LAYER[1], mode="fwd",
                      provider=("triton", "triton_einsum"))))
    out.append(("6", "fused spectral layer, fwd, fp32 (cuda / dft / triton)", 3.0,
                _best(ops, "speedup_vs_ref", op=LAYER[0], shape=LAYER[1], mode="fwd",
                      provider=("cuda", "dft", "triton", "triton_einsum"))))
    out.append(("6", "fused spectral layer, fwd, TF32 allowed", 3.0,
                _best(ops, "speedup_vs_ref", op=LAYER[0], shape=LAYER[1], mode="fwd", provider=fast)))
    out.append(("6", "fused spectral layer, fwd+bwd", 2.0,
                _best(ops, "speedup_vs_ref", op=LAYER[0], shape=LAYER[1], mode="fwdbwd", provider=fast)))
    roof = _best(ops, "roofline_frac", op=LAYER[0], shape=LAYER[1], mode="fwd", provider=fast)
    out.append(("6", "fused spectral layer within 2x of the memory roofline (fraction >= 0.5)", 0.5, roof))
    loss_rows = [r for r in ops if r["op"].startswith("spectral_loss")]
    for issue, provs in (("5", ("triton",)), ("6", ("cuda",))):
        for graph in ("", "_graph"):
            how = "graph replay" if graph else "eager"
            out.append((issue, f"spectral loss fwd+bwd, {provs[0]}, {how}, worst shape", 4.0,
                        _worst_of_best(loss_rows, "fwdbwd" + graph, provs)))
    floor = _worst_of_best(loss_rows, "fwdbwd_graph", ("fft_floor",))
    if floor is not None:
        out.append(("5/6", "  bound: the transforms alone (fft_floor), graph replay, worst shape", 4.0, floor))
    for case, need in (("256x256 B1 4->1", 3.0), ("256x256 B16 4->1", 1.5)):
        out.append(("6", f"inference {case} vs plain eager", need,
                    _best(irno, "speedup_vs_plain", kind="infer", case=case,
                          variant=("irno", "graphed", "graphed+bf16"))))
    out.append(("6", "training step vs plain eager", 1.3,
                _best(irno, "speedup_vs_plain", kind="train", variant=("irno", "graphed", "graphed+bf16"))))
    return out


def _worst_of_best(rows: list[dict], mode: str, providers: tuple[str, ...]) -> tuple[float, str] | None:
    """Over the (op, shape) cases of ``mode``: the smallest of each case's best provider ratio."""
    cases = sorted({(r["op"], r["shape"]) for r in rows if r["mode"] == mode})
    worst = None
    for op, shape in cases:
        b = _best(rows, "speedup_vs_ref", op=op, shape=shape, mode=mode, provider=providers)
        if b is not None and (worst is None or b[0] < worst[0]):
            worst = (b[0], f"{b[1]} at {op} {shape}")
    return worst


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ops, irno = _rows(argv[0] if argv else None), _rows(argv[1] if len(argv) > 1 else None)
    if not ops and not irno:
        print("targets: no CSV rows to read")
        return 1
    print(f"{'issue':5s} {'target':72s} {'need':>5s} {'got':>7s}  met  by")
    for issue, name, need, got in targets(ops, irno):
        if got is None:
            print(f"{issue:5s} {name[:72]:72s} {need:5.2f} {'-':>7s}   -   not measured in this run")
            continue
        print(f"{issue:5s} {name[:72]:72s} {need:5.2f} {got[0]:7.2f}  {'yes' if got[0] >= need else 'NO '}  {got[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
