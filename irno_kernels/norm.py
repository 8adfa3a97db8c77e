"""LayerNorm over the channels of a field, at every grid point (the refiner U-Net's normalisation).

    y[b, c, s] = (x[b, c, s] - mu[b, s]) / sqrt(var[b, s] + eps) * weight[c] + bias[c]
    mu[b, s] = mean_c x[b, c, s],  var[b, s] = mean_c (x[b, c, s] - mu[b, s])^2   (biased)

x: (B, C, *S); an optional per-channel ``in_bias`` is added to x first (a preceding convolution's bias,
folded into this pass). This is ``nn.LayerNorm(C)`` applied to the channels-last view of x, and the reference
computes it exactly so. Backends: "reference" (F.layer_norm on the permuted view: the fastest route
on CPU) and "triton" (irno_kernels/triton/norm.py: one pass each way, NCHW or channels-last in place;
the automatic choice on CUDA tensors when triton is present).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irno_kernels import _checks
from irno_kernels.backend import resolve

__all__ = ["channel_layer_norm", "channel_layer_norm_ref", "channel_layer_norm_triton", "ACTIVATIONS"]


ACTIVATIONS = (None, "gelu")


def channel_layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                           eps: float = 1e-5, activation: str | None = None, halo: int = 0,
                           out_dtype: torch.dtype | None = None, in_bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over dim 1 of x (B, C, *S), in pure PyTorch. weight, bias: (C,) or None; in_bias
    (C,) or None is added to x first (x + in_bias[c] rounded to x's dtype, as a convolution with that
    bias gives it). Then ``F.gelu`` (exact) when activation is "gelu", then
    ``F.pad(.., (halo,) * 4, mode="circular")`` (4-D x), then the cast to ``out_dtype``. Returns
    (B, C, *S) (grid dims + 2 * halo) of x's dtype (under autocast: float32, as F.layer_norm) or
    out_dtype."""
    if in_bias is not None:
        x = (x + in_bias.view(-1, *(1,) * (x.dim() - 2))).to(x.dtype)
    weight, bias = _in_compute_dtype(weight, x), _in_compute_dtype(bias, x)
    perm = (0, *range(2, x.dim()), 1)
    inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
    y = F.layer_norm(x.permute(perm), (x.shape[1],), weight, bias, eps).permute(inv)
    if activation == "gelu":
        y = F.gelu(y)
    if halo:
        y = F.pad(y, (halo,) * 4, mode="circular")
    return y if out_dtype is None else y.to(out_dtype)


def _in_compute_dtype(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A parameter (C,) as F.layer_norm takes it with x: in x's dtype, or float32 for 16-bit x (its
    compute precision, the dtype it keeps there: the refiner's fp32 parameters under autocast). Any
    other float dtype is cast, differentiably: the Triton kernel reads parameters of any float dtype
    in x's compute precision, and F.layer_norm on CPU refuses the mix (an unnamed "mixed dtype" error)."""
    if p is None or p.dtype == x.dtype or (p.dtype == torch.float32 and x.dtype in _checks.LOW_PRECISION):
        return p
    return p.to(torch.float32 if x.dtype in _checks.LOW_PRECISION else x.dtype)


def _check(x, weight, bias, eps, activation, halo, out_dtype, in_bias=None) -> float:
    _checks.tensor("x", x, min_ndim=2)
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("in_bias", in_bias)):
        if t is None:
            continue
        _checks.tensor(name, t, ndim=1)
        if t.shape[0] != C:
            raise ValueError(f"{name}: expected shape ({C},) (x has C = {C} along dim 1), got {tuple(t.shape)}")
        _checks.same_device(x=x, **{name: t})
    eps = _checks.finite_scalar("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(f"halo: expected an int >= 0, got {halo!r}")
    if halo and (x.dim() != 4 or halo > min(x.shape[-2:])):
        raise ValueError(f"halo: a periodic halo of {halo} needs a 4-D x with both grid dims >= {halo}, "
                         f"got shape {tuple(x.shape)}")
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected None or one of {_checks.FLOAT_DTYPES}, got {out_dtype!r}")
    return eps


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       eps: float = 1e-5, *, activation: str | None = None, halo: int = 0,
                       out_dtype: torch.dtype | None = None, in_bias: torch.Tensor | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the channels (dim 1) of x (B, C, *S) at every grid point, differentiable in x,
    weight, bias and in_bias (module docstring). weight, bias: (C,) or None.

    ``in_bias`` (C,) is added to x before the normalisation: a preceding convolution's bias folded in,
    so that the convolution runs without one (cuDNN adds a bias in a separate pass over its output).

    Fusions for a conv -> norm -> GELU -> periodic conv chain: ``activation="gelu"`` applies the exact
    GELU, ``halo=h`` returns the result periodically padded by h on both sides of both grid dims
    (4-D x: (B, C, H + 2h, W + 2h), the input of a k = 2h + 1 periodic convolution with padding 0),
    ``out_dtype`` the dtype of the result. Returns (B, C, *S) in x's dtype (under torch.autocast:
    float32, as F.layer_norm) or out_dtype, in x's memory format. ``backend`` forces "reference" or
    "triton" (16-bit x is read directly, with no cast pass).
    """
    eps = _check(x, weight, bias, eps, activation, halo, out_dtype, in_bias)
    impl = resolve("channel_layer_norm", x.device, backend, (x, weight, bias, in_bias))
    out_numel = x.numel() if not halo else x.shape[0] * x.shape[1] * (x.shape[2] + 2 * halo) * (x.shape[3] + 2 * halo)
    if impl == "reference" or x.dim() > 4 or x.dim() < 3 or not _checks.int32_addressable(x, extra=out_numel):
        return channel_layer_norm_ref(x, weight, bias, eps, activation, halo, out_dtype, in_bias)
    return channel_layer_norm_triton(x, weight, bias, eps, activation == "gelu", halo, out_dtype, in_bias)


def channel_layer_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                              gelu: bool, halo: int, out_dtype: torch.dtype | None,
                              in_bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`channel_layer_norm`'s Triton route without its argument checks and backend choice, for a
    caller that made both once for many calls (the U-Net's fused blocks: irno.models.unet): x 4-D
    (B, C, H, W) floating point on a device the Triton kernel serves, weight, bias and in_bias (C,) or
    None on x's device, no forward-mode tangents, the result (grid dims + 2 * halo) below
    ``irno_kernels.backend.TRITON_MAX_ELEMENTS`` elements. Same result and autocast rule."""
    from irno_kernels.triton import channel_layer_norm as tr

    if torch.is_autocast_enabled(x.device.type):  # F.layer_norm's autocast policy: computed in float32
        with torch.autocast(x.device.type, enabled=False):
            return tr(x, weight, bias, eps, gelu, halo, out_dtype if out_dtype is not None else torch.float32, in_bias)
    return tr(x, weight, bias, eps, gelu, halo, out_dtype, in_bias)
