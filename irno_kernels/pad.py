"""Periodic padding of a field, optionally of several fields concatenated along the channels (the
inputs of the refiner U-Net's periodic 3 x 3 convolutions), and periodic bilinear x2 upsampling
written with such a halo (the input of its up-convolutions; second part of this module).

    periodic_pad_cat([x_1, ..., x_n], h)[b, :, r, q] = cat(x_1, ..., x_n)[b, :, (r - h) mod H, (q - h) mod W]

for r < H + 2h, q < W + 2h: the channels of the inputs one after the other, each grid padded by h
periodically on both sides of both dims (h <= H, W: one wrap at most), which is
``F.pad(torch.cat(xs, 1), (h,) * 4, mode="circular")``. ``periodic_pad2d(x, h)`` is the one-input case.

Backends: "reference" (torch.cat + F.pad: the CPU route) and "triton" (irno_kernels/triton/pad.py: one
launch per input writes its channels of the padded result, NCHW or channels-last, reading the input
once; the automatic choice for CUDA tensors when triton is present; registered ops with fake kernels
and autograd under torch.compile). On CUDA, ATen's circular pad
stitches the result together from about five strided copies, and the U-Net's concatenation is one
more pass: an H100 profile of the refiner spent 16 % of its GPU time in such copy kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from irno_kernels import _checks
from irno_kernels.backend import resolve

__all__ = ["periodic_pad2d", "periodic_pad_cat", "periodic_pad_cat_ref", "periodic_pad_cat_triton",
           "periodic_upsample2x", "periodic_upsample2x_ref", "periodic_upsample2x_triton"]


def periodic_pad_cat_ref(xs: Sequence[torch.Tensor], halo: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.pad(torch.cat(xs, 1), (halo,) * 4, mode="circular")`` in ``out_dtype`` (default: the inputs'
    promoted dtype, as torch.cat), in pure PyTorch. xs: (B, C_k, H, W) -> (B, sum C_k, H + 2h, W + 2h)."""
    y = xs[0] if len(xs) == 1 else torch.cat(list(xs), 1)
    if out_dtype is not None:
        y = y.to(out_dtype)
    if halo:
        return F.pad(y, (halo,) * 4, mode="circular")
    return y.clone() if y is xs[0] else y  # always a new tensor, as the kernel's


def _check(xs, halo, out_dtype) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence) or len(xs) == 0:
        raise TypeError(f"xs: expected a non-empty sequence of tensors, got {type(xs).__name__}")
    xs = list(xs)
    for k, x in enumerate(xs):
        _checks.tensor(f"xs[{k}]", x, ndim=4)
        if x.shape[0] != xs[0].shape[0] or x.shape[2:] != xs[0].shape[2:]:
            raise ValueError(f"xs[{k}]: expected (B, C, H, W) = ({xs[0].shape[0]}, C, {xs[0].shape[2]}, "
                             f"{xs[0].shape[3]}) like xs[0], got {tuple(x.shape)}")
        if x.device != xs[0].device:
            raise ValueError(f"xs[{k}]: expected device {xs[0].device} like xs[0], got {x.device}")
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(f"halo: expected an int >= 0, got {halo!r}")
    H, W = xs[0].shape[-2:]
    if halo > min(H, W):
        raise ValueError(f"halo: a periodic halo of {halo} wraps at most once, so it needs a grid of at least "
                         f"{halo} x {halo}, got {H} x {W}")
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected None or one of {_checks.FLOAT_DTYPES}, got {out_dtype!r}")
    return xs


def periodic_pad_cat(xs: Sequence[torch.Tensor], halo: int, *, out_dtype: torch.dtype | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """The concatenation of xs along dim 1, padded periodically by ``halo`` (module docstring),
    differentiable in every input (and in forward mode).

    xs: tensors (B, C_k, H, W) on one device, floating point; halo: 0 <= halo <= min(H, W).
    Returns (B, sum C_k, H + 2 halo, W + 2 halo) in ``out_dtype`` (default: the promoted dtype of the
    inputs), channels-last when xs[0] is. ``backend`` forces "reference" or "triton".
    """
    xs = _check(xs, halo, out_dtype)
    impl = resolve("periodic_pad2d", xs[0].device, backend, xs)
    B, _, H, W = xs[0].shape
    out_numel = B * sum(x.shape[1] for x in xs) * (H + 2 * halo) * (W + 2 * halo)
    if impl == "reference" or not _checks.int32_addressable(*xs, extra=out_numel):
        return periodic_pad_cat_ref(xs, halo, out_dtype)
    return periodic_pad_cat_triton(xs, halo, out_dtype)


def periodic_pad_cat_triton(xs: list[torch.Tensor], halo: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`periodic_pad_cat`'s Triton route without its argument checks and backend choice, for a
    caller that made both (the U-Net's fused blocks: irno.models.unet): xs a list of 4-D floating
    tensors with one B, H and W on a device the Triton kernels serve, 0 <= halo <= min(H, W), no
    forward-mode tangents when the caller skips the checks, the result below
    ``irno_kernels.backend.TRITON_MAX_ELEMENTS`` elements."""
    from irno_kernels.triton import periodic_pad_cat as tr

    return tr(xs, halo, out_dtype)


def periodic_pad2d(x: torch.Tensor, halo: int, *, out_dtype: torch.dtype | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """x (B, C, H, W) padded periodically by ``halo`` on both sides of both grid dims:
    ``F.pad(x, (halo,) * 4, mode="circular")``; see :func:`periodic_pad_cat`."""
    return periodic_pad_cat([x], halo, out_dtype=out_dtype, backend=backend)


# ---------------------------------------------------------------------------------------------
# periodic bilinear x2 upsampling, optionally written with the next conv's periodic halo
# ---------------------------------------------------------------------------------------------
def periodic_upsample2x_ref(x: torch.Tensor, halo: int = 0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Bilinear x2 upsampling (align_corners=False) of a periodic field, in pure PyTorch: x padded by
    one periodic pixel, ``F.interpolate``, cropped to (2H, 2W) (so the edges interpolate across the
    wrap), cast to ``out_dtype``, then padded periodically by ``halo``.
    x: (B, C, H, W) -> (B, C, 2H + 2 halo, 2W + 2 halo). The U-Net's unfused route
    (irno.models._layers.upsample2x_periodic) computes the same values with its layout-keeping pad."""
    up = F.interpolate(F.pad(x, (1,) * 4, mode="circular"), scale_factor=2, mode="bilinear",
                       align_corners=False)[..., 2:-2, 2:-2]
    if out_dtype is not None:
        up = up.to(out_dtype)
    return F.pad(up, (halo,) * 4, mode="circular") if halo else up


def periodic_upsample2x(x: torch.Tensor, halo: int = 0, *, out_dtype: torch.dtype | None = None,
                        backend: str | None = None) -> torch.Tensor:
    """Periodic bilinear x2 upsampling with an optional periodic halo (the input of the refiner
    U-Net's up-convolution, written in that conv's dtype): see :func:`periodic_upsample2x_ref`.

    Per output axis, sample 2i takes 3/4 of x_i and 1/4 of x_{i-1}, sample 2i+1 3/4 of x_i and 1/4
    of x_{i+1} (indices modulo the grid). Differentiable in x (and in forward mode). The Triton
    kernel (CUDA) reads x once and writes the padded result once; its backward folds the halo and
    applies the adjoint stencil, deterministically (ATen's bilinear backward adds with atomics).
    x: (B, C, H, W) floating point; 0 <= halo <= min(2H, 2W). Returns (B, C, 2H + 2 halo, 2W + 2 halo)
    in out_dtype (default x's), channels-last when x is.
    """
    _checks.tensor("x", x, ndim=4)
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(f"halo: expected an int >= 0, got {halo!r}")
    H, W = x.shape[-2:]
    if halo > 2 * min(H, W):
        raise ValueError(f"halo: a periodic halo of {halo} wraps at most once, so it needs an upsampled grid of "
                         f"at least {halo} x {halo}, got {2 * H} x {2 * W}")
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected None or one of {_checks.FLOAT_DTYPES}, got {out_dtype!r}")
    impl = resolve("periodic_upsample2x", x.device, backend, (x,))
    out_numel = x.shape[0] * x.shape[1] * (2 * H + 2 * halo) * (2 * W + 2 * halo)
    if impl == "reference" or not _checks.int32_addressable(x, extra=out_numel):
        return periodic_upsample2x_ref(x, halo, out_dtype)
    return periodic_upsample2x_triton(x, halo, out_dtype)


def periodic_upsample2x_triton(x: torch.Tensor, halo: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`periodic_upsample2x`'s Triton route without its argument checks and backend choice (see
    :func:`periodic_pad_cat_triton`): x 4-D floating, 0 <= halo <= min(2H, 2W)."""
    from irno_kernels.triton import periodic_upsample2x as tr

    return tr(x, halo, out_dtype if out_dtype is not None else x.dtype)
