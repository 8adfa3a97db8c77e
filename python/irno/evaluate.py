"""Score an IRNO at every refinement step, k = 0 .. n (default n = K + 6).

``evaluate_irno`` runs the model over a test set once with ``return_trajectory=True`` and returns
a JSON-able dict:

    steps                 [0, 1, ..., n]
    metrics[name]         per step: {"mean": .., "<field>": ..} for vrmse, nrmse, rfne, rel_l2, and acc
                          (with 2 or more samples: its climatology is the evaluated set's mean)
    spectral_ratio        per step: median over samples of the binned error / base's (low, mid, high)
    radial_ratio          per step: median over samples and fields of the radial error spectrum ratio
    time_base_s, time_step_s   wall time of one base call and of one refinement step, per sample
    flops_base, flops_step     FLOPs per sample (see irno.analysis.count_flops)
    contraction           local contraction factor at h_K and at y (median over a batch)
    bias_floor            per-sample ||Phi(x, y)|| vs error floor of a long run, and Pearson r

All metrics are channel-first and follow irno.metrics exactly. With the data's ``normalization``
(data z-scored per channel for the model), every metric but VRMSE, and the spectra, are computed in
physical units, on the denormalised prediction and target (as The Well and the paper report them);
VRMSE, invariant to a per-channel affine map up to its epsilon, is computed on the normalised values
the model sees. Medians over samples are true medians (the mean of the two middle values for an even
count). The optional ``refine_from`` base evaluates transfer: the refiner applied to another base's
prediction; every number of the entry (step 0, time_base_s, flops_base, the bias floor's runs) then
describes that base.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

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
    inputs (N, Cx, h, w)), on the CPU; trajectories and targets in float32 or wider (float64 stays
    float64), inputs as the loader gives them."""
    model.eval()
    trajs, ys, xs = [], [], []
    for x, y in _batches(loader, desc="evaluate"):
        x, y = x.to(device), y.to(device)
        if refine_from is None:
            traj = model(x, steps=steps, return_trajectory=True)
        else:
            refine_from.eval()
            traj = model.refine(x, refine_from(x), steps=steps, return_trajectory=True)
        trajs.append(torch.stack([_wide(h).cpu() for h in traj]))
        ys.append(_wide(y).cpu())
        xs.append(x.cpu())
    return torch.cat(trajs, dim=1), torch.cat(ys), torch.cat(xs)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or in its own dtype where that is wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _denormalizer(normalization) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """t (..., C, H, W) -> t in physical units, from an ``irno.data.Normalization`` (or anything with
    ``denormalize(t, channel_dim)``) or its dict; None for data used as it is."""
    if normalization is None:
        return None
    if isinstance(normalization, Mapping):
        from irno.data import Normalization

        normalization = Normalization.from_dict(normalization)
    return lambda t: normalization.denormalize(t, channel_dim=-3)


def _field_names(names: list[str] | None, n_channels: int) -> list[str] | None:
    """One name per channel: ``names`` as given, or, for several output frames stacked time-major
    (n_channels a multiple of len(names), as irno.data.WellDataset gives them), '<name>_t<j>' for
    frame j. Any other count is passed on, for irno.metrics.summarize to reject."""
    if not names or len(names) == n_channels or n_channels % len(names):
        return names
    return [f"{name}_t{j}" for j in range(n_channels // len(names)) for name in names]


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


def score_trajectory(traj: torch.Tensor, y: torch.Tensor, field_names: list[str] | None = None,
                     normalization=None) -> dict:
    """Metrics of every step of ``traj`` (n+1, N, C, H, W) against ``y`` (N, C, H, W).

    ``normalization`` (an ``irno.data.Normalization`` or its dict; None: the values are physical)
    denormalises traj and y for every metric but VRMSE (see the module's docstring). ACC needs
    N >= 2 (its climatology is the set's mean): with one sample it is left out. ``field_names``: one
    per channel, or one frame's names when y stacks several output frames (then '<name>_t<j>').
    """
    denorm = _denormalizer(normalization)
    field_names = _field_names(field_names, y.shape[1])
    traj_p, y_p = (traj, y) if denorm is None else (denorm(traj), denorm(y))
    names = [*METRICS, "acc"] if y.shape[0] >= 2 else list(METRICS)
    out: dict = {"steps": list(range(traj.shape[0])), "metrics": {k: [] for k in names}}
    clim = y_p.mean(dim=0, keepdim=True)  # climatology: the mean over the evaluated set
    for h, h_p in zip(traj, traj_p):
        for name, fn in METRICS.items():
            vals = fn(h, y) if name == "vrmse" else fn(h_p, y_p)
            out["metrics"][name].append(metrics.summarize(vals, field_names))
        if "acc" in names:
            out["metrics"]["acc"].append(metrics.summarize(metrics.acc(h_p, y_p, climatology=clim), field_names))
    ratio = metrics.spectral_error_ratio(list(traj_p), y_p)  # (n+1, N, C, bands)
    out["spectral_ratio"] = ratio.flatten(1, 2).quantile(0.5, dim=1).tolist()
    out["spectral_bands"] = ["low", "mid", "high"]
    rr = metrics.radial_error_ratio(list(traj_p), y_p)  # (n+1, N, C, R)
    out["radial_ratio"] = rr.flatten(1, 2).quantile(0.5, dim=1).tolist()
    err_spec = torch.stack([metrics.radial_error_spectrum(h, y_p) for h in traj_p]).flatten(1, 2).mean(1)
    out["radial_error_spectrum"] = err_spec.tolist()
    out["radial_target_spectrum"] = metrics.radial_spectrum(y_p).flatten(0, 1).mean(0).tolist()
    return out


def evaluate_irno(model, loader, steps: int | None = None, device: str | torch.device = "cpu",
                  field_names: list[str] | None = None, refine_from: torch.nn.Module | None = None,
                  analyse: bool = True, bias_steps: int | None = None, normalization=None) -> dict:
    """Score ``model`` (an irno.IRNO) at every step 0..steps on ``loader``'s (x, y) batches.

    steps defaults to K + 6 (at least K with ``analyse``). ``analyse`` adds timing, FLOPs, the
    contraction estimate and the bias / error-floor check (a few extra forward passes on the first
    batch, in the model's dtype). ``refine_from``: another base whose h_0 the refiner starts from
    (transfer); the timing, FLOPs and bias floor then describe it. ``normalization``: the data's
    (``irno.data.Normalization`` or its dict), to report the metrics in physical units (see
    :func:`score_trajectory`); None scores the values as the loader gives them.
    """
    steps = model.K + 6 if steps is None else int(steps)
    if analyse and steps < model.K:
        raise ValueError(f"steps: expected >= K = {model.K} with analyse=True (the contraction is taken at h_K), "
                         f"got {steps}; pass analyse=False to score fewer steps")
    traj, y, x = collect_trajectories(model, loader, steps, device, refine_from)
    out = score_trajectory(traj, y, field_names, normalization)
    out["K"] = model.K
    out["n_samples"] = int(y.shape[0])
    if not analyse:
        return out
    base = model.base_forward if refine_from is None else refine_from
    xb = x[:8].to(device)
    with torch.no_grad():
        h0 = base(xb)
        xr = model.condition(xb, h0)
        out["time_base_s"] = _time(lambda: base(xb)) / xb.shape[0]
        out["time_step_s"] = _time(lambda: model.step(xr, h0)) / xb.shape[0]
    out["flops_base"] = analysis.count_flops(model.base if refine_from is None else refine_from, xb[:1]).total
    out["flops_step"] = analysis.step_flops(model, xb[:1], h0[:1]).total
    dtype = h0.dtype  # the model's: the trajectory and targets may have been widened
    yb, hK = y[:8].to(device, dtype), traj[model.K, :8].to(device, dtype)
    q_hK = analysis.contraction_factor(model, xb, hK, n_iter=10)
    q_y = analysis.contraction_factor(model, xb, yb, n_iter=10)
    out["contraction"] = {"at_hK_median": float(q_hK.quantile(0.5)), "at_y_median": float(q_y.quantile(0.5)),
                          "at_hK": q_hK.tolist(), "at_y": q_y.tolist()}
    pairs = [(x[i:i + 16], y[i:i + 16].to(dtype)) for i in range(0, min(len(x), 64), 16)]
    bf = analysis.bias_error_floor(model, pairs, n_steps=bias_steps or max(3 * model.K, steps), h0=refine_from)
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
    field_names = _field_names(field_names, y.shape[1])
    return {name: metrics.summarize(fn(p, y), field_names) for name, fn in METRICS.items()}
