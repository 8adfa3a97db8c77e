"""Score an IRNO at every refinement step, k = 0 .. n (default n = K + 6).

``evaluate_irno`` runs the model over a test set once with ``return_trajectory=True`` and returns
a JSON-able dict:

    steps                 [0, 1, ..., n]
    metrics[name]         per step: {"mean": .., "<field>": ..} for vrmse, nrmse, rfne, rel_l2, acc
    spectral_ratio        per step: median over samples of the binned error / base's (low, mid, high)
    radial_ratio          per step: median over samples and fields of the radial error spectrum ratio
    time_base_s, time_step_s   wall time of one base call and of one refinement step, per sample
    flops_base, flops_step     FLOPs per sample (see irno.analysis.count_flops)
    contraction           local contraction factor at h_K and at y (median over a batch)
    bias_floor            per-sample ||Phi(x, y)|| vs error floor of a long run, and Pearson r

All metrics are channel-first and follow irno.metrics exactly. The optional ``refine_from`` base
evaluates transfer: the refiner applied to another base's prediction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

from irno import analysis, metrics

METRICS: dict[str, Callable] = {
    "vrmse": metrics.vrmse,
    "nrmse": metrics.nrmse,
    "rfne": metrics.rfne,
    "rel_l2": metrics.relative_l2,
}


def _batches(loader, desc: str | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) per batch; with ``desc``, a progress bar (shown on a terminal only)."""
    if desc is not None:
        from tqdm.auto import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None
        loader = tqdm(loader, desc=desc, total=total, leave=False, disable=None, dynamic_ncols=True)
    for item in loader:
        yield (item["x"], item["y"]) if isinstance(item, dict) else (item[0], item[1])


@torch.no_grad()
def collect_trajectories(model, loader, steps: int, device, refine_from: torch.nn.Module | None = None):
    """Run the model over ``loader``: returns (trajectories (steps+1, N, C, H, W), targets (N, C, H, W),
    inputs (N, Cx, h, w)), on the CPU."""
    model.eval()
    trajs, ys, xs = [], [], []
    for x, y in _batches(loader, desc="evaluate"):
        x, y = x.to(device), y.to(device)
        if refine_from is None:
            traj = model(x, steps=steps, return_trajectory=True)
        else:
            refine_from.eval()
            traj = model.refine(x, refine_from(x), steps=steps, return_trajectory=True)
        trajs.append(torch.stack([h.float().cpu() for h in traj]))
        ys.append(y.float().cpu())
        xs.append(x.float().cpu())
    return torch.cat(trajs, dim=1), torch.cat(ys), torch.cat(xs)


def _time(fn, repeats: int = 5) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def score_trajectory(traj: torch.Tensor, y: torch.Tensor, field_names: list[str] | None = None) -> dict:
    """Metrics of every step of ``traj`` (n+1, N, C, H, W) against ``y`` (N, C, H, W)."""
    out: dict = {"steps": list(range(traj.shape[0])), "metrics": {k: [] for k in [*METRICS, "acc"]}}
    clim = y.mean(dim=0, keepdim=True)  # climatology: the mean over the evaluated set
    for h in traj:
        for name, fn in METRICS.items():
            out["metrics"][name].append(metrics.summarize(fn(h, y), field_names))
        out["metrics"]["acc"].append(metrics.summarize(metrics.acc(h, y, climatology=clim), field_names))
    ratio = metrics.spectral_error_ratio(list(traj), y)  # (n+1, N, C, bands)
    out["spectral_ratio"] = ratio.flatten(1, 2).median(dim=1).values.tolist()
    out["spectral_bands"] = ["low", "mid", "high"]
    rr = metrics.radial_error_ratio(list(traj), y)  # (n+1, N, C, R)
    out["radial_ratio"] = rr.flatten(1, 2).median(dim=1).values.tolist()
    err_spec = torch.stack([metrics.radial_error_spectrum(h, y) for h in traj]).flatten(1, 2).mean(1)
    out["radial_error_spectrum"] = err_spec.tolist()
    out["radial_target_spectrum"] = metrics.radial_spectrum(y).flatten(0, 1).mean(0).tolist()
    return out


def evaluate_irno(model, loader, steps: int | None = None, device: str | torch.device = "cpu",
                  field_names: list[str] | None = None, refine_from: torch.nn.Module | None = None,
                  analyse: bool = True, bias_steps: int | None = None) -> dict:
    """Score ``model`` (an irno.IRNO) at every step 0..steps on ``loader``'s (x, y) batches.

    steps defaults to K + 6. ``analyse`` adds timing, FLOPs, the contraction estimate and the
    bias / error-floor check (a few extra forward passes on the first batch).
    """
    steps = model.K + 6 if steps is None else int(steps)
    traj, y, x = collect_trajectories(model, loader, steps, device, refine_from)
    out = score_trajectory(traj, y, field_names)
    out["K"] = model.K
    out["n_samples"] = int(y.shape[0])
    if not analyse:
        return out
    xb, yb = x[:8].to(device), y[:8].to(device)
    with torch.no_grad():
        h0 = model.base_forward(xb) if refine_from is None else refine_from(xb)
        xr = model.condition(xb, h0)
        out["time_base_s"] = _time(lambda: model.base_forward(xb)) / xb.shape[0]
        out["time_step_s"] = _time(lambda: model.step(xr, h0)) / xb.shape[0]
    out["flops_base"] = analysis.base_flops(model, xb[:1]).total
    out["flops_step"] = analysis.step_flops(model, xb[:1]).total
    hK = traj[model.K, :8].to(device)
    q_hK = analysis.contraction_factor(model, xb, hK, n_iter=10)
    q_y = analysis.contraction_factor(model, xb, yb, n_iter=10)
    out["contraction"] = {"at_hK_median": float(q_hK.median()), "at_y_median": float(q_y.median()),
                          "at_hK": q_hK.tolist(), "at_y": q_y.tolist()}
    bf = analysis.bias_error_floor(model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, min(len(x), 64), 16)],
                                   n_steps=bias_steps or max(3 * model.K, steps))
    out["bias_floor"] = {"bias": bf.bias.tolist(), "floor": bf.floor.tolist(), "min_error": bf.min_error.tolist(),
                         "pearson_r": bf.r, "pearson_r_min": bf.r_min}
    return out


@torch.no_grad()
def evaluate_base(model: torch.nn.Module, loader, device="cpu", field_names=None) -> dict:
    """VRMSE / nRMSE / RFNE / rel L2 of a plain operator's one-shot prediction."""
    model.eval()
    preds, ys = [], []
    for x, y in _batches(loader):
        preds.append(model(x.to(device)).float().cpu())
        ys.append(y.float())
    p, y = torch.cat(preds), torch.cat(ys)
    return {name: metrics.summarize(fn(p, y), field_names) for name, fn in METRICS.items()}
