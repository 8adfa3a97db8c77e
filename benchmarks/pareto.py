"""Accuracy against cost for a trained IRNO: the FLOPs/accuracy Pareto front, and the same front in
measured time per sample, for plain PyTorch and the project's implementations side by side.

Reads a run folder written by `irno demo` / `irno train` + `irno evaluate` (RUN/metrics.json: the
test error at every step k = 0..n, the FLOPs of the base and of one step, the controls) and the
trained model (RUN/irno/best). For every step count k it times inference of one batch of test
inputs, h_k = base + k refinement steps, in each variant, in one run on one device:

    plain     IRNO written in plain PyTorch (benchmarks/_plain.py), the trained weights copied in
              (FNO base + U-Net refiner only; other models skip this variant), float32
    irno      the project's eager IRNO, as trained (its refiner dtype included)
    graphed   irno.GraphedIRNO: the base and k steps replayed as one CUDA graph (CUDA only)

Every point of the front pairs the error that the evaluation measured at step k with the cost of
reaching step k: FLOPs per sample (base + k x step, irno.analysis.count_flops) and milliseconds per
sample (median time of one batch call / batch size). The run's controls (the base trained longer)
cost what the base costs (its "base" entry is step 0 itself). Before timing, plain's h_n must agree with the project's
(relative L2 error; 1e-4 for a float32 refiner, recorded but not checked for a bf16/fp16 one).

    python benchmarks/pareto.py --run runs/demo                        # CPU, after `make demo`
    python benchmarks/pareto.py --run runs/demo --device cuda --csv pareto.csv --plot pareto.png

CSV rows (device, versions, date, commit, run, batch, steps, GFLOP and ms per sample, the metric, and
whether the point is on the front) are appended to --csv. Exit status 1 when plain disagrees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, time_fn, write_csv  # noqa: E402
from irno.report import pareto_front  # noqa: E402


def _controls(controls: dict, metric: str) -> dict:
    """The run's controls with a value of ``metric``, less "base" (the base itself: step k = 0)."""
    return {name: c for name, c in controls.items()
            if name != "base" and isinstance(c, dict) and isinstance(c.get(metric), (int, float))}


def load_run(run: Path, metric: str) -> tuple[dict, dict]:
    """(the IRNO entry of RUN/metrics.json, its controls), with a clear error for what is missing."""
    path = run / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"--run: {run} has no metrics.json (run `make demo`, or `irno evaluate` on a "
                                f"trained run, first)")
    payload = json.loads(path.read_text())
    results = payload.get("results", {})
    entry = results.get("IRNO") or next(iter(results.values()), None)
    if entry is None or metric not in entry.get("metrics", {}):
        raise ValueError(f"--metric: {path} holds no per-step {metric!r} of an IRNO entry "
                         f"(found: {sorted(entry.get('metrics', {})) if entry else 'no results'})")
    for key in ("flops_base", "flops_step"):
        if not isinstance(entry.get(key), (int, float)):
            raise ValueError(f"--run: {path} lacks {key} (evaluate with the analysis on)")
    return entry, payload.get("controls") or {}


def test_inputs(run: Path, meta: dict, batch: int, grid: tuple[int, int] | None, device: str) -> torch.Tensor:
    """One batch of the run's test inputs (the data set of the run's config; generated if not cached),
    or random inputs on ``grid`` (the time does not depend on the values)."""
    if grid is not None:
        return torch.randn(batch, meta["in_channels"], *grid, device=device)
    from irno import pipeline

    payload = json.loads((run / "metrics.json").read_text())
    cfg = payload.get("run_info", {}).get("config")
    if cfg is None:
        raise ValueError(f"--run: {run}/metrics.json records no config; pass --grid HxW")
    data = pipeline.datasets(cfg, progress=False)
    ds = pipeline._split(data, cfg.get("evaluate", {}).get("split", "test"))
    n = min(batch, len(ds))
    if n < batch:
        print(f"  the test split has {len(ds)} samples: batch {n}")
    return torch.stack([ds[i][0] for i in range(n)]).to(device)


def variant_fns(model, device: str) -> tuple[dict, list[str]]:
    """variant -> fn(x, k) returning h_k; and notes on the variants left out."""
    fns, notes = {}, []
    try:
        from _plain import PlainIRNO

        plain = PlainIRNO.from_irno(model).to(device).eval()

        def run_plain(x, k):
            with torch.no_grad():
                return plain(x, k)
        fns["plain"] = run_plain
    except (ValueError, AttributeError, TypeError) as err:
        notes.append(f"plain: not built for this model ({err})")

    def run_irno(x, k):
        with torch.no_grad():
            return model(x, steps=k)
    fns["irno"] = run_irno
    if device == "cuda":
        from irno import GraphedIRNO

        graphed = GraphedIRNO(model, max_graphs=64)
        fns["graphed"] = lambda x, k: graphed(x, k)
    else:
        notes.append("graphed: CUDA only")
    return fns, notes


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(run: Path, metric: str = "vrmse", device: str = "cpu", batch: int = 16,
            grid: tuple[int, int] | None = None, steps: list[int] | None = None,
            min_time: float = 1.0) -> tuple[list[dict], dict]:
    """Rows (one per variant and step count) and facts of the run (its controls, the agreement)."""
    import irno

    entry, controls = load_run(run, metric)
    model, meta = irno.load(run, device=device)
    if not isinstance(model, irno.IRNO):
        raise ValueError(f"--run: {run} holds a {type(model).__name__}, not an IRNO")
    errors = [m["mean"] for m in entry["metrics"][metric]]
    evaluated = entry.get("steps") or list(range(len(errors)))
    steps = evaluated if steps is None else steps
    bad = [k for k in steps if k not in evaluated]
    if bad:
        raise ValueError(f"--steps: {bad} were not evaluated in {run}/metrics.json "
                         f"(steps {evaluated[0]}..{evaluated[-1]})")
    err_of = dict(zip(evaluated, errors))
    x = test_inputs(run, meta, batch, grid, device)
    B = x.shape[0]
    fns, notes = variant_fns(model, device)
    for n in notes:
        print("  " + n)
    facts = {"controls": controls, "K": model.K, "batch": B, "grid": tuple(x.shape[-2:]),
             "gflop_base": entry["flops_base"] / 1e9,
             "refiner_dtype": str(model.refiner_dtype).replace("torch.", "") if model.refiner_dtype else "float32"}
    if "plain" in fns:
        n = max(steps)
        err = rel_err(fns["plain"](x, n), fns["irno"](x, n))
        facts["plain_vs_irno_rel_err"] = err
        exact = model.refiner_dtype is None
        note = "" if exact else f" ({facts['refiner_dtype']} refiner: not checked)"
        print(f"  plain vs irno at k = {n}: relative L2 error {err:.2e}{note}")
        if exact and err > 1e-4:
            facts["disagrees"] = True
            return [], facts
    rows = []
    gf_base, gf_step = entry["flops_base"] / 1e9, entry["flops_step"] / 1e9
    # the variants side by side at each step count (a busy machine's slow spell then hits both)
    for k in steps:
        for variant, fn in fns.items():
            t = time_fn(lambda fn=fn, k=k: fn(x, k), device, min_run_time=min_time)
            rows.append({"variant": variant, "steps": k, "batch": B,
                         "gflop_per_sample": round(gf_base + k * gf_step, 4),
                         "ms_per_sample": round(t * 1e3 / B, 5), metric: round(err_of[k], 6)})
            print(f"  {variant:8s} k = {k:2d}  {rows[-1]['ms_per_sample']:9.4f} ms/sample  "
                  f"{rows[-1]['gflop_per_sample']:8.3f} GFLOP/sample  {metric} {err_of[k]:.4f}")
    rows.sort(key=lambda r: list(fns).index(r["variant"]))  # stable: by variant, then steps
    # the front by FLOPs (the same for every variant; the controls cost the base's FLOPs) and by
    # each variant's time
    ctrl = [(gf_base, c[metric]) for c in _controls(controls, metric).values()]
    on_flops = set(pareto_front([(r["gflop_per_sample"], r[metric]) for r in rows] + ctrl))
    plain_ms = {r["steps"]: r["ms_per_sample"] for r in rows if r["variant"] == "plain"}
    for variant in fns:
        mine = [r for r in rows if r["variant"] == variant]
        on_time = set(pareto_front([(r["ms_per_sample"], r[metric]) for r in mine]))
        for r in mine:
            r["front_flops"] = (r["gflop_per_sample"], r[metric]) in on_flops
            r["front_time"] = (r["ms_per_sample"], r[metric]) in on_time
            r["speedup_vs_plain"] = round(plain_ms[r["steps"]] / r["ms_per_sample"], 3) if plain_ms else ""
    return rows, facts


def plot(rows: list[dict], facts: dict, metric: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax_f, ax_t = fig.subplots(1, 2, sharey=True)
    first = rows[0]["variant"]
    mine = [r for r in rows if r["variant"] == first]
    f = [r["gflop_per_sample"] for r in mine]
    e = [r[metric] for r in mine]
    K = facts.get("K")
    ax_f.plot(f, e, "o-", ms=4, color="C0", label="IRNO, k steps")
    at_k = [r for r in mine if r["steps"] == K]
    if at_k:
        ax_f.plot(at_k[0]["gflop_per_sample"], at_k[0][metric], "o", ms=10, mfc="none", mec="C0", mew=2,
                  label=f"k = K = {K}")
    for r in mine:
        ax_f.annotate(str(r["steps"]), (r["gflop_per_sample"], r[metric]), textcoords="offset points",
                      xytext=(3, 5), fontsize=7, color="0.25")
    controls = list(_controls(facts.get("controls", {}), metric).items())
    base_f = facts["gflop_base"]
    points = list(zip(f, e))
    for (name, c), marker in zip(controls, "s^DvP*"):
        ax_f.plot(base_f, c[metric], marker, ms=8, color="0.35", label=f"control: {name}")
        points.append((base_f, c[metric]))
    front = pareto_front(points)
    if len(front) > 1:
        fx, fy = zip(*front)
        ax_f.step(fx, fy, where="post", color="0.6", lw=1, ls="--", label="Pareto front", zorder=0)
    ax_f.set_xlabel("GFLOP per sample (base + k x step)")
    ax_f.set_ylabel(f"{metric} (test, mean over fields)")
    ax_f.set_title("error vs compute")
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        vr = [r for r in rows if r["variant"] == variant]
        ax_t.plot([r["ms_per_sample"] for r in vr], [r[metric] for r in vr], "o-", ms=4, color=f"C{i}", label=variant)
        if K is not None:
            at_k = [r for r in vr if r["steps"] == K]
            if at_k:
                ax_t.plot(at_k[0]["ms_per_sample"], at_k[0][metric], "o", ms=10, mfc="none", mec=f"C{i}", mew=2)
    ax_t.set_xlabel(f"ms per sample (batch {facts.get('batch')}; circles: k = K = {K})")
    ax_t.set_title("error vs measured time")
    for ax in (ax_f, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 64x64, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return h, w


def _steps(text: str) -> list[int]:
    try:
        out = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected step counts such as 0,1,2,4, got {text!r}") from None
    if not out or out[0] < 0:
        raise argparse.ArgumentTypeError(f"expected step counts >= 0, got {text!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder with metrics.json and irno/best (e.g. runs/demo)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads (pinned, reported)")
    p.add_argument("--batch", type=int, default=16, help="samples per timed call (16)")
    p.add_argument("--grid", type=_grid, default=None,
                   help="time random inputs on this HxW grid instead of loading the run's test data")
    p.add_argument("--steps", type=_steps, default=None, help="step counts to time (default: every evaluated one)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="seconds of repeated calls per timing on the CPU (median of them; 1.0)")
    p.add_argument("--metric", default="vrmse", help="the error metric of metrics.json (vrmse)")
    p.add_argument("--csv", default="", help="append result rows to this CSV file")
    p.add_argument("--plot", default="", help="write the two-panel figure (PNG) here")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if not a.min_time > 0:
        p.error(f"--min-time: expected seconds > 0, got {a.min_time}")
    if a.batch < 1:
        p.error(f"--batch: expected >= 1, got {a.batch}")
    torch.set_num_threads(a.threads)
    env = environment(a.device)
    print("env:", env)
    try:
        rows, facts = measure(Path(a.run), a.metric, a.device, a.batch, a.grid, a.steps, a.min_time)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if facts.get("disagrees"):
        print(f"FAILED: plain and irno disagree (relative L2 error {facts['plain_vs_irno_rel_err']:.2e} > 1e-4)")
        return 1
    grid = "x".join(map(str, facts["grid"]))
    shared = {**env, "run": str(a.run), "grid": grid, "refiner_dtype": facts["refiner_dtype"],
              "plain_vs_irno_rel_err": facts.get("plain_vs_irno_rel_err", "")}
    rows = [{**shared, **r} for r in rows]
    if a.csv:
        write_csv(a.csv, rows)
        print(f"wrote {len(rows)} rows to {a.csv}")
    if a.plot:
        plot(rows, facts, a.metric, a.plot,
             f"IRNO ({a.run}), {env['device_name']}, {grid}, refiner {facts['refiner_dtype']}")
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
