"""LayerNorm over the channels of a field, at every grid point (the refiner U-Net's normalisation).

    y[b, c, s] = (x[b, c, s] - mu[b, s]) / sqrt(var[b, s] + eps) * weight[c] + bias[c]
    mu[b, s] = mean_c x[b, c, s],  var[b, s] = mean_c (x[b, c, s] - mu[b, s])^2   (biased)

x: (B, C, *S). This is ``nn.LayerNorm(C)`` applied to the channels-last view of x, and the reference
computes it exactly so. Backends: "reference" (F.layer_norm on the permuted view: the fastest route
on CPU) and "triton" (irno_kernels/triton/norm.py: one pass each way, NCHW or channels-last in place;
the automatic choice on CUDA tensors when triton is present).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irno_kernels import _checks
from irno_kernels.backend import resolve

__all__ = ["channel_layer_norm", "channel_layer_norm_ref"]


def channel_layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                           eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over dim 1 of x (B, C, *S), in pure PyTorch. weight, bias: (C,) or None.
    Returns (B, C, *S) of x's dtype (under autocast: float32, as F.layer_norm)."""
    perm = (0, *range(2, x.dim()), 1)
    inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return F.layer_norm(x.permute(perm), (x.shape[1],), weight, bias, eps).permute(inv)


def _check(x, weight, bias, eps) -> float:
    _checks.tensor("x", x, min_ndim=2)
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _checks.tensor(name, t, ndim=1)
        if t.shape[0] != C:
            raise ValueError(f"{name}: expected shape ({C},) (x has C = {C} along dim 1), got {tuple(t.shape)}")
        _checks.same_device(x=x, **{name: t})
    eps = _checks.finite_scalar("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps}")
    return eps


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the channels (dim 1) of x (B, C, *S) at every grid point, differentiable in x,
    weight and bias (module docstring). weight, bias: (C,) or None. Returns (B, C, *S) in x's dtype
    and memory format; under torch.autocast it computes and returns float32, as F.layer_norm does.
    ``backend`` forces "reference" or "triton".
    """
    eps = _check(x, weight, bias, eps)
    impl = resolve("channel_layer_norm", x.device, backend, (x, weight, bias))
    if impl == "reference" or x.dim() > 4 or x.dim() < 3:
        return channel_layer_norm_ref(x, weight, bias, eps)
    from irno_kernels.triton import channel_layer_norm as tr

    if torch.is_autocast_enabled(x.device.type):  # F.layer_norm's autocast policy: float32
        with torch.autocast(x.device.type, enabled=False):
            return tr(x.float(), None if weight is None else weight.float(), None if bias is None else bias.float(),
                      eps)
    return tr(x, weight, bias, eps)
