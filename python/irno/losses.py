"""Training losses of IRNO, and the relative Lp / H1 losses of neuraloperator's convention.

The IRNO objective (DESIGN section 1):

    L = (1/K) sum_{k=0}^{K-1} [ MSE(h_{k+1}, y) + beta_s * L_spec(h_{k+1}, y; lambda_k) ]
        + beta_fp(epoch) * mean(Phi(x, y)^2)

    lambda_k = lam_min + (lam_max - lam_min) * k / (K - 1)    (1 -> 2)
    beta_fp(epoch) = beta_fp * min(1, epoch / fp_warmup_epochs) (0.01, ramped over 5 epochs)

L_spec is ``irno_kernels.spectral_loss`` (weights w(f) = 1 + (|f| / f0)^lambda, normalised to mean 1).
All tensors are channel-first (B, C, H, W).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import irno_kernels

__all__ = [
    "ProgressiveSpectralLoss", "spectral_lambda", "fixed_point_weight", "fixed_point_loss",
    "IRNOLoss", "LpLoss", "H1Loss",
]


def spectral_lambda(k: int, K: int, lam_min: float = 1.0, lam_max: float = 2.0) -> float:
    """lambda_k = lam_min + (lam_max - lam_min) * k / (K - 1), k = 0..K-1 (lam_min when K == 1).

    A step beyond the unrolled ones (k >= K, e.g. a deeper step of a stability term) keeps the last
    step's weighting, lambda_{K-1} (= lam_max for K > 1): the schedule is not extrapolated. A negative
    k raises a ValueError.
    """
    k = _check_number("k", k, integer=True)
    if K <= 1:
        return float(lam_min)
    return float(lam_min + (lam_max - lam_min) * min(k, K - 1) / (K - 1))


class ProgressiveSpectralLoss(nn.Module):
    """L_spec(pred, target; lambda_k): the spectral loss of step k, on ``irno_kernels.spectral_loss``.

    Args:
        K: number of training steps (sets the lambda schedule).
        lam_min, lam_max: the schedule's ends (1 and 2).
        f0: the reference frequency in cycles per sample (0.5, Nyquist).
        mode: 'magnitude' compares |F(pred)| with |F(target)|; 'error' uses |F(pred - target)|.

    ``forward(pred, target, k)``: pred, target (B, C, H, W) -> scalar. ``lam(k)`` is lambda_k
    (:func:`spectral_lambda`: k >= K keeps lambda_{K-1}, k < 0 raises).
    """

    def __init__(self, K: int = 6, lam_min: float = 1.0, lam_max: float = 2.0, f0: float = 0.5,
                 mode: str = "magnitude"):
        super().__init__()
        if mode not in ("magnitude", "error"):
            raise ValueError(f"mode: expected 'magnitude' or 'error', got {mode!r}")
        K = _check_number("K", K, minimum=1, integer=True)
        lam_min, lam_max = _check_number("lam_min", lam_min), _check_number("lam_max", lam_max)
        f0 = _check_number("f0", f0, positive=True)
        self.K, self.lam_min, self.lam_max, self.f0, self.mode = int(K), lam_min, lam_max, f0, mode

    def lam(self, k: int) -> float:
        return spectral_lambda(k, self.K, self.lam_min, self.lam_max)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
        return irno_kernels.spectral_loss(pred, target, self.lam(k), self.f0, self.mode)


def _check_number(name: str, value, minimum: float = 0.0, positive: bool = False, integer: bool = False):
    """A finite number >= minimum (> 0 with ``positive``; an int with ``integer``), else a ValueError
    naming the argument."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or value < minimum or (positive and value <= 0):
        what = "an int" if integer else "a finite number"
        bound = "> 0" if positive else f">= {minimum:g}"
        raise ValueError(f"{name}: expected {what} {bound}, got {value!r}")
    return value


def fixed_point_weight(epoch: float | None, beta_fp: float = 0.01, warmup_epochs: float = 5) -> float:
    """beta_fp * min(1, epoch / warmup_epochs): the linear warm-up of the fixed-point term.

    ``epoch`` counts from 0 and may be fractional (epoch + batch / batches) for a smooth ramp; None
    means warm-up finished (full weight). warmup_epochs <= 0 disables the ramp.
    """
    if epoch is None or warmup_epochs <= 0:
        return float(beta_fp)
    return float(beta_fp) * min(1.0, max(0.0, float(epoch) / warmup_epochs))


def fixed_point_loss(model, x: torch.Tensor, y: torch.Tensor, epoch: float | None = None,
                     beta_fp: float = 0.01, warmup_epochs: float = 5) -> torch.Tensor:
    """beta_fp(epoch) * mean(Phi(x, y)^2): pulls the refiner's bias b = Phi(x, y_true) toward 0.

    model: an :class:`irno.IRNO` (its ``phi``); x (B, Cx, h, w), y (B, Cy, H, W) -> scalar. With the
    default ``epoch=None`` the full weight beta_fp applies; pass beta_fp=1 for the bare mean.
    """
    w = fixed_point_weight(epoch, beta_fp, warmup_epochs)
    return w * model.phi(x, y).square().mean()


class IRNOLoss(nn.Module):
    """The full IRNO objective; ``forward(model, x, y, epoch=None, trajectory=None) -> (total, parts)``.

    Args:
        K: refinement steps unrolled in training (6).
        beta_s: weight of the spectral term (1).
        beta_fp: weight of the fixed-point term after warm-up (0.01).
        fp_warmup_epochs: epochs of its linear ramp (5).
        lam_min, lam_max, f0, spectral_mode: the :class:`ProgressiveSpectralLoss` settings.

    ``model`` is an :class:`irno.IRNO`; x (B, Cx, h, w), y (B, Cy, H, W). ``trajectory`` (the list
    [h_0, ..., h_K] from ``model(x, steps=K, return_trajectory=True)``) is computed when not given.
    ``parts`` holds detached scalars: 'mse', 'spec' (means over the K steps), 'fp' (unweighted
    mean(Phi(x, y)^2)), 'beta_fp' (its current weight), 'total', and per-step lists 'mse_steps',
    'spec_steps'.
    """

    def __init__(self, K: int = 6, beta_s: float = 1.0, beta_fp: float = 0.01, fp_warmup_epochs: float = 5,
                 lam_min: float = 1.0, lam_max: float = 2.0, f0: float = 0.5, spectral_mode: str = "magnitude"):
        super().__init__()
        beta_s, beta_fp = _check_number("beta_s", beta_s), _check_number("beta_fp", beta_fp)
        fp_warmup_epochs = _check_number("fp_warmup_epochs", fp_warmup_epochs)
        self.spectral = ProgressiveSpectralLoss(K, lam_min, lam_max, f0, spectral_mode)
        self.K, self.beta_s, self.beta_fp, self.fp_warmup_epochs = int(K), beta_s, beta_fp, fp_warmup_epochs

    def forward(self, model, x: torch.Tensor, y: torch.Tensor, epoch: float | None = None,
                trajectory: list[torch.Tensor] | None = None):
        K = self.K
        if trajectory is None:
            trajectory = model(x, steps=K, return_trajectory=True)
        if len(trajectory) != K + 1:
            raise ValueError(f"trajectory: expected K + 1 = {K + 1} states [h_0..h_K], got {len(trajectory)}")
        mse_steps, spec_steps = [], []
        data = y.new_zeros(())
        for k in range(K):
            h = trajectory[k + 1]
            mse = F.mse_loss(h, y)
            spec = self.spectral(h, y, k) if self.beta_s else h.new_zeros(())
            data = data + mse + self.beta_s * spec
            mse_steps.append(mse.detach())
            spec_steps.append(spec.detach())
        data = data / max(K, 1)
        w_fp = fixed_point_weight(epoch, self.beta_fp, self.fp_warmup_epochs)
        fp = model.phi(x, y).square().mean() if self.beta_fp else y.new_zeros(())
        total = data + w_fp * fp
        parts = {
            "total": total.detach(),
            "mse": torch.stack(mse_steps).mean() if K else y.new_zeros(()),
            "spec": torch.stack(spec_steps).mean() if K else y.new_zeros(()),
            "fp": fp.detach(),
            "beta_fp": w_fp,
            "mse_steps": mse_steps,
            "spec_steps": spec_steps,
        }
        return total, parts


# ---------------------------------------------------------------------------------------------
# neuraloperator-convention losses
# ---------------------------------------------------------------------------------------------
def _reduce(v: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return v.sum()
    if reduction == "mean":
        return v.mean()
    if reduction == "none":
        return v
    raise ValueError(f"reduction: expected 'sum', 'mean' or 'none', got {reduction!r}")


class LpLoss(nn.Module):
    """Lp distance over the last ``d`` dims, neuraloperator's convention.

    rel(x, y) = ||x - y||_p / (||y||_p + eps) per (sample, channel) over the last d dims, then summed
    ('sum', neuraloperator's default) or averaged ('mean') over samples and channels ('none' keeps
    the (B, C) values). ``abs`` is the quadrature-weighted norm (measure / n per dim) of x - y.
    Calling the loss computes ``rel``.
    """

    def __init__(self, d: int = 2, p: float = 2, measure: float = 1.0, reduction: str = "sum",
                 eps: float = 1e-8):
        super().__init__()
        self.d, self.p, self.measure, self.reduction, self.eps = d, p, measure, reduction, eps

    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(v.flatten(-self.d), ord=self.p, dim=-1)

    def rel(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _reduce(self._norm(x - y) / (self._norm(y) + self.eps), self.reduction)

    def abs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        quad = math.prod(self.measure / n for n in x.shape[-self.d:])
        return _reduce(quad ** (1.0 / self.p) * self._norm(x - y), self.reduction)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.rel(x, y)


class H1Loss(nn.Module):
    """Relative H1 (Sobolev) distance over the last ``d`` dims, neuraloperator's convention.

    ||v||^2_H1 = sum_s v^2 + sum_dims sum_s (dv/dx_i)^2 with central differences of step 1/n_i
    (periodic: wrap around; non-periodic: one-sided second-order differences at the edges, from
    ``torch.gradient``). rel(x, y) = ||x - y||_H1 / (||y||_H1 + eps) per (sample, channel), then
    reduced as :class:`LpLoss`.
    """

    def __init__(self, d: int = 2, reduction: str = "sum", eps: float = 1e-8, periodic: bool = True):
        super().__init__()
        self.d, self.reduction, self.eps, self.periodic = d, reduction, eps, periodic

    def _sq_norm(self, v: torch.Tensor) -> torch.Tensor:
        total = v.square().flatten(-self.d).sum(-1)
        for i in range(1, self.d + 1):
            dim = v.dim() - i
            n = v.shape[dim]
            if self.periodic:
                dv = (torch.roll(v, -1, dim) - torch.roll(v, 1, dim)) * (n / 2.0)
            else:
                (dv,) = torch.gradient(v, spacing=1.0 / n, dim=dim, edge_order=2 if n > 2 else 1)
            total = total + dv.square().flatten(-self.d).sum(-1)
        return total

    def rel(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _reduce(self._sq_norm(x - y).sqrt() / (self._sq_norm(y).sqrt() + self.eps), self.reduction)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.rel(x, y)
