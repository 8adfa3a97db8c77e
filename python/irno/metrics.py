"""Evaluation metrics (DESIGN section 4), channel-first.

Every metric takes pred and target of shape (B, C, *spatial) (``channel_dim`` moves another layout
there first) and returns one value per (sample, field): a (B, C) tensor, reduced over the spatial
dims only, except where a docstring says otherwise. :func:`field_mean` and :func:`overall_mean`
average those values; :func:`summarize` gives both.

Passing channel-last data (B, H, W, C) without ``channel_dim=-1`` makes H the "fields" and pools the
real fields into the spatial reduction: a different, wrong number. The tests pin the layout.

    VRMSE   sqrt( mean_s (p - y)^2 / (var_s(y) + 1e-7) ),   var Bessel-corrected (The Well)
    nRMSE   sqrt( mean_s (p - y)^2 / (mean_s(y^2) + 1e-7) )
    RFNE    ||y - p||_2 / ||y||_2 over space (SuperBench)
    ACC     sum (p - c)(y - c) / sqrt( sum (p - c)^2 sum (y - c)^2 ), c a climatology
    rel L2  ||p - y||_2 / (||y||_2 + 1e-8) (neuraloperator's LpLoss, p=2, relative)
    binned spectral error   residual power / target power per radial band (The Well's bands)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import irno_kernels

__all__ = [
    "vrmse", "nrmse", "rfne", "acc", "relative_l2",
    "radial_spectrum", "radial_error_spectrum", "radial_error_ratio",
    "well_bands", "binned_spectral_error", "spectral_error_ratio",
    "field_mean", "overall_mean", "summarize",
]

EPS = 1e-7


def _cf(pred: torch.Tensor, target: torch.Tensor, channel_dim: int):
    if pred.shape != target.shape:
        raise ValueError(f"pred, target: expected equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dim() < 3:
        raise ValueError(f"pred: expected (B, C, *spatial) with at least one spatial dim, got {tuple(pred.shape)}")
    if channel_dim not in (1, 1 - pred.dim()):
        pred, target = pred.movedim(channel_dim, 1), target.movedim(channel_dim, 1)
    return pred, target, tuple(range(2, pred.dim()))


def vrmse(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS, channel_dim: int = 1) -> torch.Tensor:
    """Variance-scaled RMSE (The Well). (B, C, *S) -> (B, C), reducing over the spatial dims S.

    sqrt( mean_S((p - y)^2) / (var_S(y) + eps) ), var with Bessel's correction (divides by N - 1).
    """
    pred, target, s = _cf(pred, target, channel_dim)
    mse = (pred - target).square().mean(dim=s)
    return torch.sqrt(mse / (target.var(dim=s, correction=1) + eps))


def nrmse(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS, channel_dim: int = 1) -> torch.Tensor:
    """Normalised RMSE. (B, C, *S) -> (B, C): sqrt( mean_S((p - y)^2) / (mean_S(y^2) + eps) )."""
    pred, target, s = _cf(pred, target, channel_dim)
    return torch.sqrt((pred - target).square().mean(dim=s) / (target.square().mean(dim=s) + eps))


def rfne(pred: torch.Tensor, target: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Relative Frobenius norm error (SuperBench). (B, C, *S) -> (B, C): ||y - p||_2 / ||y||_2 over S.

    SuperBench reports the mean of these values (:func:`overall_mean`).
    """
    pred, target, s = _cf(pred, target, channel_dim)
    return torch.linalg.vector_norm(target - pred, dim=s) / torch.linalg.vector_norm(target, dim=s)


def relative_l2(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8, channel_dim: int = 1) -> torch.Tensor:
    """Relative L2 (neuraloperator's LpLoss, p=2, relative). (B, C, *S) -> (B, C):
    ||p - y||_2 / (||y||_2 + eps) over S. neuraloperator's loss is the sum of these values
    (reduction='sum'); :func:`overall_mean` gives their mean."""
    pred, target, s = _cf(pred, target, channel_dim)
    return torch.linalg.vector_norm(pred - target, dim=s) / (torch.linalg.vector_norm(target, dim=s) + eps)


def acc(pred: torch.Tensor, target: torch.Tensor, climatology: torch.Tensor | None = None,
        weights: torch.Tensor | None = None, channel_dim: int = 1) -> torch.Tensor:
    """Anomaly correlation coefficient. (B, C, *S) -> (B, C), sums over the spatial dims S.

    acc = sum_S w (p - c)(y - c) / sqrt( sum_S w (p - c)^2 * sum_S w (y - c)^2 ).

    climatology c: broadcastable to (B, C, *S) in the channel-first layout, e.g. (C, *S) or (1, C, *S);
    None uses the mean of the target over the evaluated set (over B): the same c for both anomalies.
    That needs B >= 2: with one sample the target is its own climatology, its anomaly is 0 and acc
    is 0/0, so B = 1 without a climatology raises a ValueError. Wherever an anomaly is 0 over all of
    S (p or y equal to c), acc is 0/0 and comes out NaN.
    weights w: broadcastable to *S (e.g. cos(latitude) per row); None means no latitude weighting.
    """
    pred, target, s = _cf(pred, target, channel_dim)
    if climatology is None and target.shape[0] < 2:
        raise ValueError("acc: climatology=None takes the mean over the batch as the climatology, which "
                         f"needs at least 2 samples, got a batch of {target.shape[0]} (the anomaly would be "
                         "0 and acc 0/0); pass a climatology")
    c = target.mean(dim=0, keepdim=True) if climatology is None else climatology
    pa, ya = pred - c, target - c
    w = 1.0 if weights is None else weights
    num = (w * pa * ya).sum(dim=s)
    return num / torch.sqrt((w * pa.square()).sum(dim=s) * (w * ya.square()).sum(dim=s))


# ---------------------------------------------------------------------------------------------
# spectra
# ---------------------------------------------------------------------------------------------
def radial_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Energy per radial shell of rfft2(x, norm='ortho'): (B, C, H, W) -> (B, C, R) (irno_kernels'
    definition: shell r = round(max(H, W) * |f|), f in cycles per sample; sums to sum x^2)."""
    return irno_kernels.radial_spectrum(x)


def radial_error_spectrum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Radial spectrum of the error: (B, C, H, W) -> (B, C, R) = radial_spectrum(pred - target)."""
    return irno_kernels.radial_spectrum(pred - target)


def radial_error_ratio(trajectory: Sequence[torch.Tensor], target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The paper's normalised spectral error ratio per shell, E~^(k)(w) = E^(k)(w) / E^(0)(w).

    trajectory: [h_0, ..., h_n], each (B, C, H, W); target (B, C, H, W) -> (n + 1, B, C, R);
    entry 0 is 1 wherever the base has error.
    """
    e = torch.stack([radial_error_spectrum(h, target) for h in trajectory])
    return e / (e[0] + eps)


def well_bands(spatial_shape: Sequence[int], n_bands: int = 3, device=None) -> torch.Tensor:
    """The Well's band edges in rad/sample: n_bands + 1 edges log-spaced from 2*pi / max(N) to
    pi * sqrt(ndim) (+1e-6 so the corner frequency falls inside), the first edge set to 0.
    For 3 bands: low, mid, high."""
    ndim = len(spatial_shape)
    lo = math.log10(2 * math.pi / max(spatial_shape))
    hi = math.log10(math.pi * math.sqrt(ndim) + 1e-6)
    edges = torch.logspace(lo, hi, n_bands + 1, dtype=torch.float64, device=device)
    edges[0] = 0.0
    return edges


def _band_index(spatial_shape: Sequence[int], edges: torch.Tensor) -> torch.Tensor:
    """Band of every full-FFT frequency of the grid: -1 outside the edges. Shape = spatial_shape."""
    k2 = torch.zeros(tuple(spatial_shape), dtype=torch.float64, device=edges.device)
    for i, n in enumerate(spatial_shape):
        k = 2 * math.pi * torch.fft.fftfreq(n, dtype=torch.float64, device=edges.device)
        k2 = k2 + k.view((n,) + (1,) * (len(spatial_shape) - 1 - i)) ** 2
    idx = torch.bucketize(k2.sqrt(), edges, right=True) - 1  # edges[j] <= |k| < edges[j + 1]
    idx[idx >= len(edges) - 1] = -1
    return idx


def binned_spectral_error(pred: torch.Tensor, target: torch.Tensor, edges: torch.Tensor | None = None,
                          normalize: bool = True, eps: float = EPS, channel_dim: int = 1) -> torch.Tensor:
    """Binned spectral error (The Well's binned_spectral_mse). (B, C, *S) -> (B, C, n_bands).

    Over the full FFT of the spatial dims S (N points), band j holds the frequencies with
    edges[j] <= |k| < edges[j+1], |k| in rad/sample. MSE_j = sum_{k in j} |F(p - y)|^2 / N^2 (the
    band's share of mean_S (p - y)^2, by Parseval); with ``normalize`` (default) the result is
    MSE_j / (P_j + eps), P_j = sum_{k in j} |F(y)|^2 / N^2 the target's power in the band.
    ``edges`` defaults to :func:`well_bands` (low, mid, high).
    """
    pred, target, s = _cf(pred, target, channel_dim)
    shape = pred.shape[2:]
    if edges is None:
        edges = well_bands(shape, device=pred.device)
    edges = torch.as_tensor(edges, dtype=torch.float64, device=pred.device)
    n_bands = len(edges) - 1
    idx = _band_index(shape, edges).flatten()
    keep = idx >= 0
    N = math.prod(shape)

    def band_power(v):
        p = torch.fft.fftn(v, dim=s).abs().square().flatten(2)[..., keep] / N ** 2
        out = p.new_zeros(*p.shape[:2], n_bands)
        return out.index_add_(-1, idx[keep], p)

    err = band_power(pred - target)
    if not normalize:
        return err
    return err / (band_power(target) + eps)


def spectral_error_ratio(trajectory: Sequence[torch.Tensor], target: torch.Tensor,
                         edges: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Normalised spectral error ratio per band and step: binned error of step k / of the base (k=0).

    trajectory [h_0, ..., h_n] each (B, C, *S) -> (n + 1, B, C, n_bands); row 0 is 1. Take the median
    over B (``.quantile(0.5, dim=1)``: ``.median`` gives the lower middle value for an even B) for the
    paper's dataset-level curves.
    """
    e = torch.stack([binned_spectral_error(h, target, edges, normalize=False) for h in trajectory])
    return e / (e[0] + eps)


# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------
def field_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over samples of per-(sample, field) values: (B, C, ...) -> (C, ...)."""
    return values.mean(dim=0)


def overall_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over samples and fields: (B, C) -> scalar (for (B, C, n) values -> (n,))."""
    return values.flatten(0, 1).mean(dim=0)


def summarize(values: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, float]:
    """{'mean': overall mean, '<field name>': per-field mean, ...} from (B, C) values.

    ``names``: one per field (C of them; a ValueError otherwise); None names them field0, field1, ...
    """
    per_field = field_mean(values)
    if names is not None and len(names) != per_field.shape[0]:
        raise ValueError(f"names: expected one per field ({per_field.shape[0]}), got {len(names)}: {list(names)}")
    names = names or [f"field{i}" for i in range(per_field.shape[0])]
    out = {"mean": float(overall_mean(values))}
    out.update({n: float(v) for n, v in zip(names, per_field)})
    return out
