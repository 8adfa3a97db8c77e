"""The IRNO wrapper: a frozen base operator and a shared-weight refiner applied again and again.

    h_0     = T_base(x)                         frozen: eval mode, no grad
    h_{k+1} = h_k + alpha * Phi(cat(x~, h_k))   k = 0 .. steps-1

x~ is x resampled to h's grid when the grids differ (super-resolution); cat is along channels.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

import irno_kernels

__all__ = ["IRNO", "RESAMPLE_MODES", "fourier_resample", "pick_refiner_dtype", "resample"]


#: the resampling modes of :func:`resample` by name ("fourier": band-limited, periodic)
RESAMPLE_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact", "area", "fourier")


def check_resample_mode(mode):
    """mode itself if it is one of RESAMPLE_MODES or a callable; else a ValueError naming it."""
    if callable(mode) or (isinstance(mode, str) and mode in RESAMPLE_MODES):
        return mode
    raise ValueError(f"resample_mode: expected one of {RESAMPLE_MODES} or a callable (x, size) -> tensor, "
                     f"got {mode!r}")


def fourier_resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Band-limited resampling of a periodic field: x (B, C, H, W) -> (B, C, H', W').

    The rfft2 modes with |k| < min(n, n') / 2 along each dimension (n, n' the old and new sizes) are
    kept, amplitudes unchanged, the rest are zero; a field made of those modes is resampled exactly
    (an interpolation that reads the grid as periodic, where F.interpolate clamps at the edges). The
    Nyquist mode of the smaller grid (even sizes) is dropped: it has no unique place on the other
    grid. Computed in float32 at least; returned in x's dtype.
    """
    H, W = x.shape[-2:]
    H2, W2 = (int(s) for s in size)
    wide = torch.promote_types(x.dtype, torch.float32)
    X = torch.fft.rfft2(x.to(wide), norm="forward")
    Y = X.new_zeros((*X.shape[:-2], H2, W2 // 2 + 1))
    rows, cols = min(H, H2), min(W, W2)
    pos, neg, kc = (rows + 1) // 2, (rows - 1) // 2, (cols + 1) // 2  # |k| < rows / 2, 0 <= k < cols / 2
    Y[..., :pos, :kc] = X[..., :pos, :kc]
    if neg:
        Y[..., H2 - neg:, :kc] = X[..., H - neg:, :kc]
    return torch.fft.irfft2(Y, s=(H2, W2), norm="forward").to(x.dtype)


def resample(x: torch.Tensor, size: tuple[int, int], mode: str | Callable = "bicubic") -> torch.Tensor:
    """x (B, C, H, W) on the grid ``size`` = (H', W'); x itself when the grid already matches.

    ``mode``: an ``F.interpolate`` mode ('bicubic', 'bilinear', 'nearest', 'nearest-exact', 'area')
    with align_corners=False, 'fourier' (:func:`fourier_resample`: band-limited and periodic), or a
    callable (x, size) -> tensor.
    """
    check_resample_mode(mode)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if callable(mode):
        return mode(x, size)
    if mode == "fourier":
        return fourier_resample(x, size)
    kw = {} if mode in ("nearest", "area", "nearest-exact") else {"align_corners": False}
    return F.interpolate(x, size=tuple(size), mode=mode, **kw)


def pick_refiner_dtype(device: str | torch.device, choice: str | torch.dtype | None = "auto") -> torch.dtype | None:
    """The refiner's autocast dtype for a setting: 'auto', 'bf16', 'fp16', 'off'/'fp32'/None, or a dtype.

    'auto' takes bfloat16 where it is fast: a CUDA device with bf16 support, or a CPU with AMX tiles
    (bf16 matrix units; there the U-Net's convolutions run about 1.5x faster). Elsewhere None.
    """
    if isinstance(choice, torch.dtype) or choice is None:
        return choice
    if choice is False:  # YAML reads an unquoted off as false
        return None
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "off": None, "fp32": None, "float32": None, "none": None}
    key = str(choice).lower()
    if key in names:
        return names[key]
    if key != "auto":
        raise ValueError(f"refiner_dtype: expected 'auto', 'bf16', 'fp16' or 'off', got {choice!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if dev.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return torch.bfloat16 if amx is not None and amx() else None
    return None


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (
            isinstance(value, float) and value.is_integer()) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point()):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _is_fusable(refiner: nn.Module) -> bool:
    conv = getattr(refiner, "out_conv", None)
    return (callable(getattr(refiner, "forward_features", None)) and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and conv.padding in ((0, 0), "valid"))


class IRNO(nn.Module):
    """Iterative Refinement Neural Operator.

    Args:
        base: any module x (B, Cx, h, w) -> y (B, Cy, H, W) (FNO, TFNO, WDSR, a neuraloperator model...).
        refiner: Phi, a module cat(x~, h) (B, Cx + Cy, H, W) -> (B, Cy, H, W). None builds the paper's
            :class:`irno.models.UNetRefiner` (depth 4, width 16) with ``refiner_kwargs``.
        alpha: step size (0.2).
        K: refinement steps in training and the default of ``forward`` (6).
        freeze_base: keep the base in eval mode with ``requires_grad=False`` and run it under no_grad
            (True, the paper's setting). False trains the base jointly.
        in_channels, out_channels: Cx and Cy; read from ``base.in_channels`` / ``base.out_channels``
            when not given (needed only to build the default refiner).
        resample_mode: how x is brought to h's grid ('bicubic'; 'fourier' for periodic fields; see
            :func:`resample`).
        checkpoint: recompute each step's activations in backward (gradient checkpointing) so that
            training memory grows by one h per step instead of one U-Net's activations per step.
        fused: use ``irno_kernels.refine_update`` (Phi's last 1x1 conv fused into the update) when the
            refiner exposes ``forward_features`` and a 1x1 ``out_conv``; otherwise, or with False,
            ``irno_kernels.residual_update`` on Phi's output.
        refiner_kwargs: keywords for the default UNetRefiner (e.g. ``padding="zero"``).
        refiner_dtype: run Phi under ``torch.autocast`` to this dtype (``torch.bfloat16`` or
            ``torch.float16``; None: no autocast of its own). Only the refiner's layers run in low
            precision (master weights stay fp32); the base, the iterate h and the update keep h's
            dtype, so h_0 is exactly the base's answer. See :func:`irno.pick_refiner_dtype`.
        channels_last: hand the refiner its input in ``torch.channels_last`` memory format (NHWC
            convolutions; the U-Net's LayerNorm permutes become views). Values are unchanged; only
            speed can differ. (Until 2026-11-27 the U-Net's decoder fell back to NCHW after its
            upsampling, so the earlier GPU measurements of this option, no gain on an H200 at 256x256
            batch 16 with a bf16 refiner, predate the fix.)

    ``model.train()`` never puts a frozen base in train mode.
    """

    def __init__(self, base: nn.Module, refiner: nn.Module | None = None, alpha: float = 0.2, K: int = 6,
                 freeze_base: bool = True, *, in_channels: int | None = None,
                 out_channels: int | None = None, resample_mode: str | Callable = "bicubic",
                 checkpoint: bool = False, fused: bool = True, refiner_kwargs: dict | None = None,
                 refiner_dtype: torch.dtype | None = None, channels_last: bool = False):
        super().__init__()
        K = _int_arg("K", K, 0)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha: expected a finite step size > 0, got {alpha!r}")
        if refiner_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"refiner_dtype: expected None, torch.bfloat16 or torch.float16, got {refiner_dtype!r}")
        self.refiner_dtype = refiner_dtype
        self.channels_last = bool(channels_last)
        self.base = base
        self.alpha, self.K = float(alpha), int(K)
        self.freeze_base = freeze_base
        self.resample_mode = check_resample_mode(resample_mode)
        self.checkpoint = checkpoint
        self.fused = fused
        self.in_channels = in_channels if in_channels is not None else getattr(base, "in_channels", None)
        self.out_channels = out_channels if out_channels is not None else getattr(base, "out_channels", None)
        if refiner is None:
            if self.in_channels is None or self.out_channels is None:
                raise ValueError("in_channels, out_channels: the base has no in_channels/out_channels "
                                 "attributes; pass them (or a refiner) to build the default U-Net refiner")
            from irno.models.unet import UNetRefiner

            refiner = UNetRefiner(self.in_channels + self.out_channels, self.out_channels,
                                  **(refiner_kwargs or {}))
        self.refiner = refiner
        if freeze_base:
            for p in self.base.parameters():
                p.requires_grad_(False)
            self.base.eval()

    # -----------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_base:
            self.base.eval()
        return self

    def refiner_parameters(self):
        """The parameters to optimise (the refiner's; also the base's when it is not frozen)."""
        return (p for p in self.parameters() if p.requires_grad)

    @property
    def uses_fused_update(self) -> bool:
        return self.fused and _is_fusable(self.refiner)

    # -----------------------------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """h_0 = T_base(x); under no_grad (and eval mode) when the base is frozen."""
        if self.freeze_base:
            if self.base.training:
                self.base.eval()
            with torch.no_grad():
                return self.base(x)
        return self.base(x)

    def condition(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x resampled to h's grid: (B, Cx, h, w) -> (B, Cx, H, W)."""
        return resample(x, h.shape[-2:], self.resample_mode)

    def phi(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The correction Phi(x, h): x (B, Cx, h, w), h (B, Cy, H, W) -> (B, Cy, H, W). The refiner's
        own forward (no fused update), so forward-mode AD goes through it wherever the refiner's
        ops support it."""
        with self._refiner_autocast(h):
            return self.refiner(self._layout(torch.cat([self.condition(x, h), h], dim=1))).to(h.dtype)

    def _layout(self, inp: torch.Tensor) -> torch.Tensor:
        return inp.contiguous(memory_format=torch.channels_last) if self.channels_last else inp

    def _refiner_autocast(self, h: torch.Tensor):
        # Forward-mode AD (the contraction estimate's JVPs) runs Phi in full precision: autocast does
        # not cast the tangents of dual tensors, so a low-precision conv would see mixed dtypes.
        if self.refiner_dtype is None or torch.autograd.forward_ad._current_level >= 0:
            return contextlib.nullcontext()
        return torch.autocast(device_type=h.device.type, dtype=self.refiner_dtype)

    def update(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The map G(h) = h + alpha * Phi(x, h) in plain PyTorch (for analysis)."""
        return h + self.alpha * self.phi(x, h)

    def step(self, xr: torch.Tensor, h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """One refinement step on the output grid: xr (B, Cx, H, W) already resampled, h (B, Cy, H, W).

        ``inplace`` (inference only) writes h_{k+1} into h.
        """
        inp = self._layout(torch.cat([xr, h], dim=1))
        if self.uses_fused_update:
            with self._refiner_autocast(h):
                z = self.refiner.forward_features(inp)
            conv = self.refiner.out_conv
            weight, bias = conv.weight, conv.bias
            if z.dtype != h.dtype or weight.dtype != h.dtype:  # e.g. features in bf16 under autocast
                z, weight = z.to(h.dtype), weight.to(h.dtype)
                bias = None if bias is None else bias.to(h.dtype)
            fn = irno_kernels.refine_update_ if inplace else irno_kernels.refine_update
            return fn(h, z, weight, bias, self.alpha)
        with self._refiner_autocast(h):
            phi = self.refiner(inp)
        fn = irno_kernels.residual_update_ if inplace else irno_kernels.residual_update
        return fn(h, phi.to(h.dtype), self.alpha)

    # -----------------------------------------------------------------------------------------
    def refine(self, x: torch.Tensor, h0: torch.Tensor, steps: int | None = None,
               return_trajectory: bool = False):
        """Refine a given initial estimate h0 (B, Cy, H, W) of the answer to x (B, Cx, h, w).

        Works for any h0, e.g. another base's output (transfer). Returns h_steps (B, Cy, H, W), or the
        list [h_0, ..., h_steps] with ``return_trajectory`` (h_0 is h0 itself). steps defaults to K.
        """
        self._check_inputs(x, h0)
        return self._refine(x, h0, steps, return_trajectory)

    def _refine(self, x: torch.Tensor, h0: torch.Tensor, steps: int | None, return_trajectory: bool):
        steps = self.K if steps is None else _int_arg("steps", steps, 0)
        xr = self.condition(x, h0)
        grad = torch.is_grad_enabled()
        traj = [h0]
        h = h0
        # inference without a trajectory: update one private buffer in place
        inplace = not grad and not return_trajectory and steps > 0
        if inplace:
            h = h0.clone()
        for _ in range(steps):
            if inplace:
                self.step(xr, h, inplace=True)
            elif self.checkpoint and grad:
                h = _checkpoint(self.step, xr, h, use_reentrant=False)
            else:
                h = self.step(xr, h)
            if return_trajectory:
                traj.append(h)
        return traj if return_trajectory else h

    def forward(self, x: torch.Tensor, steps: int | None = None, return_trajectory: bool = False):
        """x (B, Cx, h, w) -> h_steps (B, Cy, H, W) (steps defaults to K), or [h_0, ..., h_steps].

        steps=0 returns the base's output itself.
        """
        self._check_inputs(x)
        return self._refine(x, self.base_forward(x), steps, return_trajectory)

    def _channels(self) -> tuple[int | None, int | None]:
        """(Cx, Cy) as far as they are known (from the constructor, the base or the refiner)."""
        cy = self.out_channels if self.out_channels is not None else getattr(self.refiner, "out_channels", None)
        cx = self.in_channels
        r_in = getattr(self.refiner, "in_channels", None)
        if cx is None and isinstance(r_in, int) and isinstance(cy, int):
            cx = r_in - cy
        return (cx if isinstance(cx, int) else None), (cy if isinstance(cy, int) else None)

    def _check_inputs(self, x, h0=None) -> None:
        """Clear errors for inputs the base or the refiner would reject obscurely (or not at all)."""
        cx, cy = self._channels()
        for name, t, c, what in (("x", x, cx, "(B, Cx, h, w)"), ("h0", h0, cy, "(B, Cy, H, W)")):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name}: expected a 4-D tensor {what}, got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
            if c is not None and t.shape[1] != c:
                src = "input channels (Cx)" if name == "x" else "output channels (Cy)"
                raise ValueError(f"{name}: expected {c} channels along dim 1 (the model's {src}), got shape "
                                 f"{tuple(t.shape)}")
        if h0 is not None and h0.shape[0] != x.shape[0]:
            raise ValueError(f"h0: expected the batch size of x ({x.shape[0]}), got shape {tuple(h0.shape)}")

    def graphed(self, example_x: torch.Tensor | None, steps: int | None = None, **kw):
        """A :class:`irno.GraphedIRNO` replaying this model's inference as CUDA graphs; captures for
        ``example_x`` now when it is given (and on CUDA). ``kw``: tol, chunk, max_graphs, warmup."""
        from irno.graphed import GraphedIRNO

        g = GraphedIRNO(self, steps, **kw)
        return g if example_x is None else g.capture(example_x)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, K={self.K}, freeze_base={self.freeze_base}, "
                f"fused={self.uses_fused_update}, checkpoint={self.checkpoint}"
                + (f", refiner_dtype={self.refiner_dtype}" if self.refiner_dtype is not None else "")
                + (", channels_last=True" if self.channels_last else ""))
