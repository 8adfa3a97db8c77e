"""The run folder of an evaluation: ``metrics.json``, ``report.md`` and the figures.

    results = evaluate_irno(model, test_loader)                  # or {"IRNO": .., "transfer: ..": ..}
    write_report("runs/demo", results, run_info={...}, controls={"base": {"vrmse": 0.158}},
                 samples={"x": x, "y": y, "trajectory": traj})
    print(print_summary(results))

Writes into ``run_dir``::

    metrics.json               every input number (NaN and infinities as null)
    report.md                  run info and tables, links to the figures
    figures/error_vs_step.png  VRMSE and nRMSE per step, K and the base error marked
    figures/spectral_ratio.png radial error ratio E_k(r) / E_0(r) per step; band ratios per step
    figures/fields.png         truth, base and later steps of one sample; their errors below
    figures/pareto.png         VRMSE vs cumulative FLOPs per sample, with the controls
    figures/bias_floor.png     ||Phi(x, y)|| vs the error floor of a long run, Pearson r

A figure whose inputs are absent is skipped (an old file of that name is removed) and report.md
says why. Figures need matplotlib; without it every figure is skipped and the rest is written.
Every file is written atomically (temporary file in the same folder, then os.replace), report.md
last, so its presence means the folder is complete.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irno.checkpoint import atomic_write, atomic_write_text

FIGURES = ("error_vs_step", "spectral_ratio", "fields", "pareto", "bias_floor")
METRIC_LABELS = {"vrmse": "VRMSE", "nrmse": "nRMSE", "rfne": "RFNE", "rel_l2": "rel. L2", "acc": "ACC"}
HIGHER_IS_BETTER = {"acc"}
DPI = 120
MAX_FIELD_PANELS = 6


class _Skip(Exception):
    """A figure cannot be drawn from the given inputs; the message says why."""


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------

def _entries(results: Mapping) -> dict[str, dict]:
    """One evaluate_irno dict, or a mapping name -> such dicts -> {name: dict}."""
    if "metrics" in results and "steps" in results:
        return {"IRNO": dict(results)}
    return {str(k): dict(v) for k, v in results.items()}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(res: dict, metric: str = "vrmse", field: str = "mean") -> list[float]:
    """Per-step values of one metric; NaN where missing."""
    out = []
    for d in res.get("metrics", {}).get(metric, []):
        v = d.get(field) if isinstance(d, Mapping) else None
        out.append(float(v) if v is not None else math.nan)
    return out


def _change_pct(e: float, e0: float) -> float:
    """Relative change of e over e0 in percent (negative: lower than k = 0)."""
    if not (_finite(e) and _finite(e0)) or e0 == 0:
        return math.nan
    return 100.0 * (e - e0) / e0


def _best_step(values: Sequence[float], higher_is_better: bool = False) -> int | None:
    v = np.asarray(values, dtype=float)
    if v.size == 0 or not np.isfinite(v).any():
        return None
    v = np.where(np.isfinite(v), v, -np.inf if higher_is_better else np.inf)
    return int(np.argmax(v) if higher_is_better else np.argmin(v))


def _at(values: Sequence[float], k: int | None) -> float:
    return float(values[k]) if k is not None and 0 <= k < len(values) else math.nan


def summarize_entry(res: dict, metric: str = "vrmse") -> dict[str, Any]:
    """k = 0, K, 2K, last and best step of one metric (mean over fields), with changes in %."""
    vals = _series(res, metric)
    K = res.get("K")
    hib = metric in HIGHER_IS_BETTER
    best = _best_step(vals, hib)
    e0 = _at(vals, 0)
    last = len(vals) - 1 if vals else None
    out = {"metric": metric, "K": K, "k0": e0, "at_K": _at(vals, K), "best_step": best, "best": _at(vals, best),
           "at_2K": _at(vals, 2 * K if K is not None else None), "last_step": last, "last": _at(vals, last)}
    for key in ("at_K", "best", "at_2K", "last"):
        out[f"change_{key}_pct"] = _change_pct(out[key], e0)
    return out


def fmt(v, digits: int = 4) -> str:
    """A metric value: fixed point in the usual range, scientific outside it, 'n/a' if not finite."""
    if not _finite(v):
        return "n/a"
    v = float(v)
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.{digits}f}"
    return f"{v:.{digits - 1}e}"


def fmt_pct(p) -> str:
    """A relative change in percent with its sign: '-37.3%'."""
    return f"{p:+.1f}%" if _finite(p) else "n/a"


def _fmt_count(v) -> str:
    if not _finite(v):
        return "n/a"
    for unit, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= s:
            return f"{v / s:.3g} {unit}"
    return f"{v:.3g}"


def to_jsonable(obj):
    """Tensors, arrays and numpy scalars to lists and floats; NaN and infinities to None."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().tolist()
    elif isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------

def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return lines + [""]


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _show_value(v) -> str:
    v = to_jsonable(v)
    if isinstance(v, float):
        return fmt(v)
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= 100 else s[:97] + "..."


def _step_label(k: int, K: int | None, best: int | None = None) -> str:
    tags = (["K"] if k == K else []) + (["best"] if k == best else [])
    return f"**{k}** ({', '.join(tags)})" if tags else str(k)


def _fields_of(res: dict) -> list[str]:
    first = (res.get("metrics", {}).get("vrmse") or [{}])[0]
    return [f for f in first if f != "mean"]


def _entry_sections(name: str, res: dict) -> list[str]:
    ms = [m for m in METRIC_LABELS if res.get("metrics", {}).get(m)]
    ms += [m for m in res.get("metrics", {}) if m not in ms]
    steps = res.get("steps") or list(range(len(_series(res, ms[0])) if ms else 0))
    K = res.get("K")
    s = summarize_entry(res)
    lines = [f"### {name}", ""]
    if ms:
        lines += [f"Samples: {res.get('n_samples', 'n/a')}; K = {K}; steps k = 0 .. {steps[-1] if steps else '?'}. "
                  f"VRMSE {fmt(s['k0'])} at k = 0, {fmt(s['at_K'])} at k = K ({fmt_pct(s['change_at_K_pct'])}), "
                  f"best {fmt(s['best'])} at k = {s['best_step']} ({fmt_pct(s['change_best_pct'])}), "
                  f"{fmt(s['at_2K'])} at k = 2K ({fmt_pct(s['change_at_2K_pct'])}).", ""]
        # improvement of every metric at K and at its best step (ACC: higher is better)
        rows = []
        for m in ms:
            sm = summarize_entry(res, m)
            rows.append([METRIC_LABELS.get(m, m), fmt(sm["k0"]), fmt(sm["at_K"]), fmt_pct(sm["change_at_K_pct"]),
                         sm["best_step"], fmt(sm["best"]), fmt_pct(sm["change_best_pct"])])
        lines += ["Change over k = 0 (mean over fields; best = lowest error, highest ACC):", ""]
        lines += _table(["metric", "k = 0", f"k = K = {K}", "change at K", "best k", "best", "change at best"], rows)

        vr = _series(res, "vrmse")
        best = _best_step(vr)
        header = ["k"] + [METRIC_LABELS.get(m, m) for m in ms] + ["VRMSE vs k = 0"]
        rows = []
        for i, k in enumerate(steps):
            rows.append([_step_label(k, K, best)] + [fmt(_at(_series(res, m), i)) for m in ms]
                        + [fmt_pct(_change_pct(_at(vr, i), _at(vr, 0)))])
        lines += ["Every metric per step (mean over fields and samples):", ""] + _table(header, rows)

        fields = _fields_of(res)
        if len(fields) > 1:
            for m in ms:
                rows = [[_step_label(k, K)] + [fmt(_at(_series(res, m, f), i)) for f in ["mean", *fields]]
                        for i, k in enumerate(steps)]
                lines += [f"{METRIC_LABELS.get(m, m)} per field:", ""] + _table(["k", "mean", *fields], rows)

    sr = res.get("spectral_ratio")
    if sr:
        bands = res.get("spectral_bands") or [f"band {i}" for i in range(len(sr[0]))]
        rows = [[_step_label(k, K)] + [fmt(v) for v in r] for k, r in zip(steps, sr)]
        lines += ["Binned spectral error ratio, error power per band at step k / at k = 0 "
                  "(median over samples and fields; below 1: the step removed error in that band):", ""]
        lines += _table(["k", *bands], rows)

    extra = []
    c = res.get("contraction")
    if c:
        extra.append(f"- Contraction factor of h -> h + alpha Phi(x, h) (median over samples): "
                     f"{fmt(c.get('at_hK_median'))} at h_K, {fmt(c.get('at_y_median'))} at the truth y "
                     "(below 1: locally contracting).")
    bf = res.get("bias_floor")
    if bf:
        b = np.asarray([v if v is not None else np.nan for v in bf.get("bias", [])], dtype=float)
        f = np.asarray([v if v is not None else np.nan for v in bf.get("floor", [])], dtype=float)
        extra.append(f"- Bias ||Phi(x, y)|| vs error floor over {b.size} samples: Pearson r = "
                     f"{fmt(bf.get('pearson_r'), 3)} (with the minimum error over steps: "
                     f"{fmt(bf.get('pearson_r_min'), 3)}); mean bias {fmt(np.nanmean(b) if b.size else None)}, "
                     f"mean floor {fmt(np.nanmean(f) if f.size else None)}.")
    tb, ts, fb, fs = (res.get(k) for k in ("time_base_s", "time_step_s", "flops_base", "flops_step"))
    if any(_finite(v) for v in (tb, ts, fb, fs)):
        ratio = fs / fb if _finite(fs) and _finite(fb) and fb else math.nan
        extra.append(f"- Cost per sample: base {_ms(tb)}, {_fmt_count(fb)}FLOP; one refinement step {_ms(ts)}, "
                     f"{_fmt_count(fs)}FLOP ({fmt(ratio, 2)} x the base's FLOPs).")
        if K is not None:
            tot_t = tb + K * ts if _finite(tb) and _finite(ts) else math.nan
            tot_f = fb + K * fs if _finite(fb) and _finite(fs) else math.nan
            extra.append(f"- Base plus K = {K} steps: {_ms(tot_t)}, {_fmt_count(tot_f)}FLOP per sample.")
    if extra:
        lines += extra + [""]
    return lines


def _ms(t) -> str:
    return f"{1e3 * t:.3g} ms" if _finite(t) else "n/a"


def _controls_section(controls: Mapping, entries: dict[str, dict]) -> list[str]:
    keys: list[str] = []
    for c in controls.values():
        keys += [k for k in (c if isinstance(c, Mapping) else {}) if k not in keys]
    keys.sort(key=lambda k: k != "vrmse")
    main_name, main = next(iter(entries.items()))
    irno_k = summarize_entry(main)["at_K"]
    rows = []
    for name, c in controls.items():
        c = c if isinstance(c, Mapping) else {"value": c}
        rows.append([name] + [_show_value(c.get(k, "")) if c.get(k) is not None else "" for k in keys]
                    + [fmt_pct(_change_pct(irno_k, c.get("vrmse")))])
    lines = ["## Controls", "", f"The last column is {main_name}'s VRMSE at k = K ({fmt(irno_k)}) relative to each "
             "control (negative: IRNO is better).", ""]
    return lines + _table(["control", *keys, f"{main_name} at K vs control"], rows)


def _report_md(entries, run_info, controls, figures: dict[str, str | None], title: str) -> str:
    lines = [f"# {title}", ""]
    if run_info:
        lines += ["## Run", ""] + _table(["item", "value"], [[k, _show_value(v)] for k, v in _flatten(run_info)])
    lines += ["## Summary (VRMSE, mean over fields)", ""]
    rows = []
    for name, res in entries.items():
        s = summarize_entry(res)
        rows.append([name, s["K"], fmt(s["k0"]), fmt(s["at_K"]), fmt_pct(s["change_at_K_pct"]), s["best_step"],
                     fmt(s["best"]), fmt_pct(s["change_best_pct"]), fmt(s["at_2K"]), fmt(s["last"])])
    lines += _table(["run", "K", "k = 0", "k = K", "change at K", "best k", "best", "change at best", "k = 2K",
                     "last step"], rows)
    lines += ["## Error per step", ""]
    for name, res in entries.items():
        lines += _entry_sections(name, res)
    if controls:
        lines += _controls_section(controls, entries)
    lines += ["## Figures", ""]
    for name in FIGURES:
        reason = figures.get(name)
        if reason is None:
            lines += [f"![{name.replace('_', ' ')}](figures/{name}.png)", ""]
        else:
            lines += [f"- `figures/{name}.png` skipped: {reason}", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# figures (matplotlib's object API with the Agg canvas: no pyplot, no global backend change)
# ---------------------------------------------------------------------------------------------

def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _same_k(entries) -> int | None:
    Ks = {res.get("K") for res in entries.values()}
    return Ks.pop() if len(Ks) == 1 else None


def _fig_error_vs_step(entries, controls, path: Path) -> None:
    from matplotlib.figure import Figure

    panels = [m for m in ("vrmse", "nrmse") if any(np.isfinite(_series(r, m)).any() for r in entries.values())]
    if not panels:
        raise _Skip("no VRMSE or nRMSE values in the results")
    fig = Figure(figsize=(5.2 * len(panels), 5.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    K_all = _same_k(entries)
    for ax, m in zip(axes, panels):
        for color, (name, res) in zip(_colors(len(entries)), entries.items()):
            v = _series(res, m)
            steps = res.get("steps") or list(range(len(v)))
            ax.plot(steps, v, "o-", color=color, ms=4, label=name)
            base_label = "base error (k = 0)" if len(entries) == 1 else f"{name}: k = 0"
            if _finite(_at(v, 0)):
                ax.axhline(v[0], color=color, ls="--", lw=1, alpha=0.8, label=base_label)
            if K_all is None and res.get("K") is not None:
                ax.axvline(res["K"], color=color, ls=":", lw=1.2, label=f"{name}: K = {res['K']}")
        if K_all is not None:
            ax.axvline(K_all, color="0.3", ls=":", lw=1.5, label=f"K = {K_all} (training steps)")
        if m == "vrmse" and controls:
            for (cname, c), ls in zip(controls.items(), ["-.", (0, (5, 2, 1, 2)), (0, (1, 1))] * 4):
                if isinstance(c, Mapping) and _finite(c.get("vrmse")):
                    ax.axhline(c["vrmse"], color="0.45", ls=ls, lw=1, label=f"control: {cname}")
        ax.set_xlabel("refinement step k")
        ax.set_ylabel(f"{METRIC_LABELS[m]} (mean over fields)")
        ax.set_title(f"{METRIC_LABELS[m]} vs refinement step")
        ax.grid(alpha=0.3)
    # one legend below both panels (the first panel's lines include the controls), never over the data
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8)
    _save(fig, path)


def _plain_log_ticks(ax) -> None:
    """Log-scale y ticks as 0.5, 0.6, 1 instead of 5x10^-1 (ratios near 1 span less than a decade)."""
    from matplotlib.ticker import FuncFormatter

    f = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(f)
    ax.yaxis.set_minor_formatter(f)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _fig_spectral_ratio(entries, path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    name, res = next(((n, r) for n, r in entries.items() if r.get("radial_ratio") or r.get("spectral_ratio")),
                     (None, None))
    if res is None:
        raise _Skip("no radial_ratio or spectral_ratio in the results")
    rr, sr, K = res.get("radial_ratio"), res.get("spectral_ratio"), res.get("K")
    n_panels = int(bool(rr)) + int(bool(sr))
    fig = Figure(figsize=(5.6 * n_panels, 4.3), layout="constrained")
    axes = list(fig.subplots(1, n_panels, squeeze=False)[0])
    fig.suptitle(f"Spectral error ratio E_k / E_0 ({name})")
    if rr:
        ax = axes.pop(0)
        a = np.asarray([[np.nan if v is None else v for v in row] for row in rr], dtype=float)
        r = np.arange(a.shape[1])
        n = a.shape[0] - 1
        cmap, norm = colormaps["viridis"], Normalize(0, max(n, 1))
        for k in range(1, a.shape[0]):  # k = 0 is 1 by definition
            y = a[k, 1:]
            ok = np.isfinite(y) & (y > 0)
            ax.plot(r[1:][ok], y[ok], color=cmap(norm(k)), lw=2.4 if k == K else 1.2,
                    label=f"k = K = {K}" if k == K else None)
        ax.axhline(1.0, color="0.3", ls="--", lw=1, label="base (k = 0)")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_xlabel("radial wavenumber r (cycles per domain)")
        ax.set_ylabel("error power ratio E_k(r) / E_0(r)")
        ax.set_title("per radial shell (median over samples)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="refinement step k")
    if sr:
        ax = axes.pop(0)
        a = np.asarray([[np.nan if v is None else v for v in row] for row in sr], dtype=float)
        bands = res.get("spectral_bands") or [f"band {i}" for i in range(a.shape[1])]
        steps = res.get("steps") or list(range(a.shape[0]))
        for j, (band, color) in enumerate(zip(bands, ["tab:blue", "tab:orange", "tab:red", "tab:purple"] * 3)):
            ax.plot(steps, a[:, j], "o-", ms=4, color=color, label=f"{band} frequencies")
        ax.axhline(1.0, color="0.3", ls="--", lw=1)
        if K is not None:
            ax.axvline(K, color="0.3", ls=":", lw=1.5, label=f"K = {K}")
        if np.nanmin(a) > 0:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        ax.set_xlabel("refinement step k")
        ax.set_ylabel("binned error ratio E_k / E_0")
        ax.set_title("per band (The Well's bands)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    _save(fig, path)


def _as_array(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    if isinstance(t, (list, tuple)) and t and isinstance(t[0], torch.Tensor):
        return torch.stack([v.detach().float().cpu() for v in t]).numpy()
    return np.asarray(t, dtype=np.float32)


def pick_steps(n: int, K: int | None, cap: int = MAX_FIELD_PANELS) -> list[int]:
    """k = 0, 2, 4, ... and K and the last step n, thinned to at most ``cap`` (keeping 0, K and n)."""
    forced = sorted({0, n} | ({K} if K is not None and 0 <= K <= n else set()))
    rest = [k for k in range(0, n + 1, 2) if k not in forced]
    room = max(cap - len(forced), 0)
    if len(rest) > room:
        rest = [rest[i] for i in np.unique(np.linspace(0, len(rest) - 1, room).round().astype(int))] if room else []
    return sorted(set(forced) | set(rest))


def _fig_fields(samples, K, path: Path, show_steps=None, field_names=None) -> None:
    from matplotlib.figure import Figure

    if not samples or samples.get("y") is None or samples.get("trajectory") is None:
        raise _Skip("no sample fields given (samples with 'y' and 'trajectory')")
    y, traj = _as_array(samples["y"]), _as_array(samples["trajectory"])
    if y.ndim == 4:  # a batch: show its first sample
        y = y[0]
    if traj.ndim == 5:
        traj = traj[:, 0]
    if y.ndim != 3 or traj.ndim != 4 or traj.shape[1:] != y.shape:
        raise _Skip(f"sample shapes do not fit: y {tuple(y.shape)}, trajectory {tuple(traj.shape)}")
    c = int(samples.get("field", 0))
    names = samples.get("field_names") or field_names
    fname = names[c] if names and c < len(names) else f"field {c}"
    n = traj.shape[0] - 1
    steps = [k for k in (show_steps if show_steps is not None else pick_steps(n, K)) if 0 <= k <= n]
    x = samples.get("x")
    x = None if x is None else _as_array(x)
    if x is not None and x.ndim == 4:
        x = x[0]

    truth = y[c]
    preds = [traj[k, c] for k in steps]
    errs = [p - truth for p in preds]
    lo, hi = min(truth.min(), *(p.min() for p in preds)), max(truth.max(), *(p.max() for p in preds))
    signed = lo < 0 < hi
    if signed:
        m = max(-lo, hi)
        lo, hi = -m, m
    e_max = max(float(np.abs(e).max()) for e in errs) or 1.0
    var = truth.var(ddof=1) if truth.size > 1 else 0.0

    ncol = 1 + len(steps)
    fig = Figure(figsize=(2.35 * ncol + 0.6, 5.0), layout="constrained")
    axes = fig.subplots(2, ncol, squeeze=False)
    kw = dict(origin="lower", interpolation="nearest")
    im = axes[0, 0].imshow(truth, cmap="RdBu_r" if signed else "viridis", vmin=lo, vmax=hi, **kw)
    axes[0, 0].set_title("truth")
    for j, (k, p, e) in enumerate(zip(steps, preds, errs), start=1):
        title = "base, k = 0" if k == 0 else f"k = {k}" + (" (K)" if k == K else "")
        axes[0, j].imshow(p, cmap="RdBu_r" if signed else "viridis", vmin=lo, vmax=hi, **kw)
        axes[0, j].set_title(title)
        ime = axes[1, j].imshow(e, cmap="PuOr_r", vmin=-e_max, vmax=e_max, **kw)
        v = math.sqrt(float(np.mean(e ** 2)) / (var + 1e-7))
        axes[1, j].set_title(f"error, VRMSE {v:.3f}", fontsize=9)
    if x is not None and x.ndim == 3:
        xi = x[-1]
        if xi.min() < 0 < xi.max():
            m = float(np.abs(xi).max())
            axes[1, 0].imshow(xi, cmap="RdBu_r", vmin=-m, vmax=m, **kw)
        else:
            axes[1, 0].imshow(xi, cmap="viridis", **kw)
        axes[1, 0].set_title(f"input, channel {x.shape[0] - 1} (own scale)", fontsize=9)
    else:
        axes[1, 0].set_axis_off()
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[0]), shrink=0.85, label=fname)
    fig.colorbar(ime, ax=list(axes[1]), shrink=0.85, label="prediction - truth")
    fig.suptitle(f"{fname}: one test sample; top: fields, bottom: errors (shared scales per row)")
    _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (cost, error) that no other point beats in both: sorted by cost, error falling."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def _fig_pareto(entries, controls, path: Path) -> None:
    from matplotlib.figure import Figure

    have = {n: r for n, r in entries.items() if _finite(r.get("flops_base")) and _finite(r.get("flops_step"))}
    if not have:
        raise _Skip("no FLOP counts in the results (flops_base, flops_step: evaluate with analyse=True)")
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    scale = max(r["flops_base"] for r in have.values())
    unit, div = next(((u, s) for u, s in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3))
                      if scale >= s), ("FLOP", 1.0))
    points = []
    for i, (color, (name, res)) in enumerate(zip(_colors(len(have)), have.items())):
        v = np.asarray(_series(res, "vrmse"))
        steps = np.asarray(res.get("steps") or range(len(v)))
        f = (res["flops_base"] + steps * res["flops_step"]) / div
        ax.plot(f, v, "o-", ms=4, color=color, label=f"{name} (k = 0 .. {steps[-1]})")
        K = res.get("K")
        if K is not None and K < len(v):
            ax.plot(f[K], v[K], "o", ms=10, mfc="none", mec=color, mew=2, label=f"{name} at k = K = {K}")
        if i == 0:
            for k in steps:
                ax.annotate(str(k), (f[k], v[k]), textcoords="offset points", xytext=(3, 5), fontsize=7,
                            color="0.25")
        points += [(a, b) for a, b in zip(f, v) if np.isfinite(b)]
    for (cname, c), marker in zip((controls or {}).items(), ["s", "^", "D", "v", "P", "*"] * 4):
        if isinstance(c, Mapping) and _finite(c.get("flops")) and _finite(c.get("vrmse")):
            ax.plot(c["flops"] / div, c["vrmse"], marker, ms=9, color="0.35", label=f"control: {cname}")
            points.append((c["flops"] / div, c["vrmse"]))
    front = pareto_front(points)
    if len(front) > 1:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="0.6", lw=1, ls="--", label="Pareto front", zorder=0)
    ax.set_xlabel(f"cumulative cost per sample ({unit}): base + k x step")
    ax.set_ylabel("VRMSE (mean over fields)")
    ax.set_title("Error vs compute (step numbers next to the points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def _fig_bias_floor(entries, path: Path) -> None:
    from matplotlib.figure import Figure

    have = {}
    for name, res in entries.items():
        bf = res.get("bias_floor") or {}
        b = np.asarray([np.nan if v is None else v for v in bf.get("bias", [])], dtype=float)
        f = np.asarray([np.nan if v is None else v for v in bf.get("floor", [])], dtype=float)
        ok = np.isfinite(b) & np.isfinite(f)
        if b.shape == f.shape and ok.sum() >= 2:
            have[name] = (b[ok], f[ok], bf)
    if not have:
        raise _Skip("no bias / error-floor pairs (at least 2 finite samples) in the results")
    fig = Figure(figsize=(6.2, 4.6), layout="constrained")
    ax = fig.subplots()
    for color, (name, (b, f, bf)) in zip(_colors(len(have)), have.items()):
        prefix = "" if len(have) == 1 else f"{name}: "
        r = bf.get("pearson_r")
        ax.scatter(b, f, s=22, color=color, alpha=0.8,
                   label=f"{prefix}samples (Pearson r = {r:.3f})" if _finite(r) else f"{prefix}samples (r = n/a)")
        if np.ptp(b) > 0:
            slope, icpt = np.polyfit(b, f, 1)
            xs = np.linspace(b.min(), b.max(), 2)
            sign = "-" if icpt < 0 else "+"
            ax.plot(xs, slope * xs + icpt, color=color, lw=1.5, label=f"{prefix}least squares: "
                    f"floor = {slope:.3g} bias {sign} {abs(icpt):.3g}")
    ax.set_xlabel("bias ||Phi(x, y)||_2 per sample")
    ax.set_ylabel("error floor ||h_n - y||_2 (long run)")
    ax.set_title("Fixed-point bias vs error floor")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _figures(fig_dir: Path, entries, controls, samples, show_steps, field_names) -> dict[str, str | None]:
    """Draw every figure; returns {name: None if written, else the reason it was skipped}."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return dict.fromkeys(FIGURES, "matplotlib is not installed (pip install matplotlib)")
    K = next(iter(entries.values())).get("K") if entries else None
    draw = {
        "error_vs_step": lambda p: _fig_error_vs_step(entries, controls, p),
        "spectral_ratio": lambda p: _fig_spectral_ratio(entries, p),
        "fields": lambda p: _fig_fields(samples, K, p, show_steps, field_names),
        "pareto": lambda p: _fig_pareto(entries, controls, p),
        "bias_floor": lambda p: _fig_bias_floor(entries, p),
    }
    status: dict[str, str | None] = {}
    for name in FIGURES:
        path = fig_dir / f"{name}.png"
        try:
            draw[name](path)
            status[name] = None
        except _Skip as e:
            status[name] = str(e)
            path.unlink(missing_ok=True)  # never leave an older run's figure beside this report
    return status


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------

def write_report(run_dir: str | os.PathLike, results: Mapping, run_info: Mapping | None = None,
                 controls: Mapping | None = None, samples: Mapping | None = None,
                 show_steps: Sequence[int] | None = None, title: str | None = None) -> Path:
    """Write metrics.json, report.md and figures/*.png into ``run_dir``; returns report.md's path.

    Args:
        results: the dict of :func:`irno.evaluate.evaluate_irno`, or a mapping name -> such dicts (the
            first one is the main run: the fields, spectra and controls refer to it).
        run_info: anything JSON-able about the run (data config, wall times, parameter counts, versions);
            ``run_info["field_names"]`` names the channels in the fields figure.
        controls: name -> {"vrmse": .., other numbers}; entries with "flops" (per sample) and "vrmse"
            also appear in the Pareto figure.
        samples: one test sample for the fields figure: "y" (C, H, W), "trajectory" (n + 1, C, H, W)
            (tensors, arrays or a list of (C, H, W) tensors), optionally "x" (C_in, h, w) (its last
            channel is shown), "field" (the channel to show, 0) and "field_names".
        show_steps: the steps drawn in the fields figure (default k = 0, 2, 4, ..., K and the last,
            at most 6).
        title: report.md's title (default: run_info["title"] or "IRNO evaluation report").
    """
    run_dir = Path(run_dir)
    entries = _entries(results)
    if not entries:
        raise ValueError("results: expected an evaluate_irno dict or a non-empty mapping of them")
    run_info = dict(run_info or {})
    controls = dict(controls or {})
    field_names = run_info.get("field_names")
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(fig_dir, entries, controls, samples, show_steps, field_names)

    payload = {"results": entries, "controls": controls, "run_info": run_info,
               "summary": {name: {m: summarize_entry(res, m) for m in res.get("metrics", {})}
                           for name, res in entries.items()},
               "figures": {name: (f"figures/{name}.png" if why is None else None) for name, why in figures.items()}}
    atomic_write_text(run_dir / "metrics.json", json.dumps(to_jsonable(payload), indent=1, allow_nan=False) + "\n")

    title = title or run_info.get("title") or "IRNO evaluation report"
    report = run_dir / "report.md"
    atomic_write_text(report, _report_md(entries, run_info, controls, figures, title))
    return report


def print_summary(results: Mapping) -> str:
    """A compact text table: VRMSE at k = 0, K, 2K and the last step, and the change at K."""
    entries = _entries(results)
    header = ["run", "K", "k=0", "k=K", "k=2K", "last (k)", "change at K", "best (k)"]
    rows = []
    for name, res in entries.items():
        s = summarize_entry(res)
        rows.append([name, str(s["K"]), fmt(s["k0"]), fmt(s["at_K"]), fmt(s["at_2K"]),
                     f"{fmt(s['last'])} ({s['last_step']})", fmt_pct(s["change_at_K_pct"]),
                     f"{fmt(s['best'])} ({s['best_step']})"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join(["VRMSE per refinement step (mean over fields)", line(header), *map(line, rows)])
