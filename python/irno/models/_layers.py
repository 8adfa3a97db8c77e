"""Small building blocks shared by the models: channel MLPs, skips, grid embedding, padding.

Every layer here is pointwise in space or builds its own coordinates from the input's shape, so
the models that use them run on any grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import irno_kernels as ik
from irno_kernels._checks import channels_last_like
from irno_kernels.backend import resolve

__all__ = [
    "PADDING_MODES", "conv_padding_mode", "pad_mode", "pad_to_multiple", "crop",
    "circular_pad2d", "upsample2x_periodic", "Conv2d",
    "ChannelMLP", "SoftGating", "make_skip", "GridEmbedding2D", "ChannelLayerNorm",
]

#: user-facing boundary names -> the ``padding_mode`` of ``nn.Conv2d``
PADDING_MODES = {
    "periodic": "circular",
    "circular": "circular",
    "zero": "zeros",
    "zeros": "zeros",
    "replicate": "replicate",
    "reflect": "reflect",
}


def conv_padding_mode(padding: str) -> str:
    """The ``nn.Conv2d`` padding_mode for a boundary name (periodic / zero / replicate / reflect)."""
    try:
        return PADDING_MODES[padding]
    except KeyError:
        raise ValueError(f"padding: expected one of {sorted(PADDING_MODES)}, got {padding!r}") from None


def pad_mode(padding: str) -> str:
    """The ``F.pad`` mode for a boundary name."""
    return {"circular": "circular", "zeros": "constant", "replicate": "replicate",
            "reflect": "reflect"}[conv_padding_mode(padding)]


def pad_to_multiple(x: torch.Tensor, multiple: int, padding: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two dims of x (B, C, H, W) at the bottom/right up to multiples of ``multiple``.

    Returns the padded tensor and the original (H, W) for :func:`crop`. The pad values follow the
    boundary condition (periodic wraps around, zero pads zeros, replicate repeats the edge).
    """
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph == 0 and pw == 0:
        return x, (H, W)
    mode = pad_mode(padding)
    if mode == "circular" and (ph > H or pw > W):
        # F.pad's circular mode wraps at most once; tile first for grids smaller than the pad
        reps = (1 + math.ceil(ph / H), 1 + math.ceil(pw / W))
        return x.repeat(1, 1, *reps)[..., : H + ph, : W + pw], (H, W)
    if mode == "reflect" and (ph >= H or pw >= W):
        mode = "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (H, W)


def _wrap_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """(..., H, W) -> (..., H + 2p, W + 2p), periodic; one write of the interior plus the halos."""
    H, W = x.shape[-2:]
    fmt = torch.channels_last if channels_last_like(x) else torch.contiguous_format
    out = torch.empty((*x.shape[:-2], H + 2 * p, W + 2 * p), dtype=x.dtype, device=x.device, memory_format=fmt)
    out[..., p:p + H, p:p + W] = x
    out[..., :p, p:p + W] = x[..., H - p:, :]
    out[..., p + H:, p:p + W] = x[..., :p, :]
    out[..., :, :p] = out[..., :, W:W + p]
    out[..., :, p + W:] = out[..., :, p:2 * p]
    return out


def _wrap_fold(g: torch.Tensor, p: int) -> torch.Tensor:
    """The adjoint of :func:`_wrap_pad`: (..., H + 2p, W + 2p) -> (..., H, W), halos added back."""
    H, W = g.shape[-2] - 2 * p, g.shape[-1] - 2 * p
    cols = g[..., :, p:p + W].clone()
    cols[..., :, W - p:] += g[..., :, :p]
    cols[..., :, :p] += g[..., :, p + W:]
    out = cols[..., p:p + H, :].clone()
    out[..., H - p:, :] += cols[..., :p, :]
    out[..., :p, :] += cols[..., p + H:, :]
    return out


class _CircularPad2d(torch.autograd.Function):
    """Periodic padding whose backward folds the halos back in place of ATen's composite backward
    (which zero-fills a full-size gradient for each of the pieces it stitches together: about a
    quarter of the U-Net refiner's training step on CPU)."""

    @staticmethod
    def forward(ctx, x, p):  # ctx-style: Function.apply binds a setup_context-style signature per call
        ctx.p = p
        return _wrap_pad(x, p)

    @staticmethod
    def backward(ctx, g):
        return _wrap_fold(g, ctx.p), None

    @staticmethod
    def jvp(ctx, t, _):
        return _wrap_pad(t, ctx.p)


def _triton_pad(x: torch.Tensor) -> bool:
    """Whether irno_kernels.periodic_pad2d's Triton kernel serves x (not under a forced backend
    without it, nor with forward-mode tangents, where the reference's autograd is used)."""
    try:
        return resolve("periodic_pad2d", x.device, None, (x,)) == "triton"
    except RuntimeError:
        return False


def circular_pad2d(x: torch.Tensor, p: int) -> torch.Tensor:
    """Pad the last two dims of x by p on every side, periodically: same values as
    ``F.pad(x, (p, p, p, p), mode="circular")``, with a cheaper backward. p <= H and p <= W."""
    H, W = x.shape[-2:]
    if p == 0:
        return x
    if p > H or p > W:
        raise ValueError(f"p: periodic padding of {p} needs a grid of at least {p} x {p}, got {H} x {W}")
    if torch.compiler.is_compiling():  # traced: ATen's pad (dynamo cannot trace the custom jvp below)
        return F.pad(x, (p, p, p, p), mode="circular")
    if x.dim() == 4 and _triton_pad(x):  # CUDA: one Triton pass (ATen stitches ~5 copies)
        return ik.periodic_pad2d(x, p, backend="triton")
    if not (x.requires_grad and torch.is_grad_enabled()) and torch.autograd.forward_ad._current_level < 0:
        # nothing to differentiate: skip the autograd.Function (its Python costs more than the copies
        # on small grids). NCHW: ATen's circular pad, one C++ call. Other layouts (the U-Net's
        # activations are channels-last after its LayerNorm) keep their layout: two concatenations
        # on small tensors, where per-op overhead rules, the five copies of _wrap_pad on large ones.
        if x.is_contiguous():
            return F.pad(x, (p, p, p, p), mode="circular")
        if x.numel() < 1 << 17:
            rows = torch.cat([x[..., H - p:, :], x, x[..., :p, :]], dim=-2)
            return torch.cat([rows[..., W - p:], rows, rows[..., :p]], dim=-1)
        return _wrap_pad(x, p)
    return _CircularPad2d.apply(x, p)


def _upsample2x_periodic(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 (align_corners=False) of a periodic field: a 1-pixel periodic halo, upsampled, cropped."""
    up = F.interpolate(circular_pad2d(x, 1), scale_factor=2, mode="bilinear", align_corners=False)
    return up[..., 2:-2, 2:-2]


def _upsample2x_periodic_adjoint(g: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`_upsample2x_periodic`, (B, C, 2H, 2W) -> (B, C, H, W), one axis at a time:
    output 2i takes 3/4 of x_i and 1/4 of x_{i-1}, output 2i+1 3/4 of x_i and 1/4 of x_{i+1} (indices
    modulo the grid), so grad x_i = 3/4 (g_2i + g_2i+1) + 1/4 (g_2i-1 + g_2i+2)."""
    for dim in (-1, -2):
        even = g[..., ::2] if dim == -1 else g[..., ::2, :]
        odd = g[..., 1::2] if dim == -1 else g[..., 1::2, :]
        g = 0.75 * (even + odd) + 0.25 * (torch.roll(odd, 1, dim) + torch.roll(even, -1, dim))
    return g


class _Upsample2xPeriodic(torch.autograd.Function):
    """Periodic bilinear x2 with its adjoint written out as the backward: on CPU, ATen's bilinear
    backward (a scatter) took 3-10x its forward's time and ~7 % of a U-Net refiner's training step."""

    @staticmethod
    def forward(ctx, x):
        return _upsample2x_periodic(x)

    @staticmethod
    def backward(ctx, g):
        return _upsample2x_periodic_adjoint(g)

    @staticmethod
    def jvp(ctx, t):
        return _upsample2x_periodic(t)


def upsample2x_periodic(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 upsampling (align_corners=False) of a periodic field (B, C, H, W) -> (B, C, 2H, 2W):
    the edge pixels interpolate across the wrap. Same values as ``F.interpolate`` of the field padded
    by one periodic pixel, cropped; on CPU with gradients the backward is the written-out adjoint."""
    if (x.device.type == "cpu" and x.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return _Upsample2xPeriodic.apply(x)
    return _upsample2x_periodic(x)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) whose periodic padding uses
    :func:`circular_pad2d`; every other padding mode is ``nn.Conv2d``'s own."""

    def _conv_forward(self, input, weight, bias):
        ph, pw = self.padding if isinstance(self.padding, tuple) else (None, None)
        if self.padding_mode == "circular" and ph == pw and isinstance(ph, int) and ph <= min(input.shape[-2:]):
            return F.conv2d(circular_pad2d(input, ph), weight, bias, self.stride, 0, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Keep the top-left ``size`` = (H, W) of the last two dims."""
    return x[..., : size[0], : size[1]]


class ChannelMLP(nn.Module):
    """A pointwise MLP over channels: ``n_layers`` 1x1 convolutions with a nonlinearity between them.

    (B, in_channels, *spatial) -> (B, out_channels, *spatial). ``layers[-1]`` is the output
    projection; ``hidden(x)`` returns what enters it.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int | None = None,
                 n_layers: int = 2, non_linearity: Callable[[torch.Tensor], torch.Tensor] = F.gelu,
                 dropout: float = 0.0, n_dim: int = 2):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers: expected >= 1, got {n_layers}")
        hidden_channels = hidden_channels or in_channels
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n_dim]
        widths = [in_channels] + [hidden_channels] * (n_layers - 1) + [out_channels]
        self.layers = nn.ModuleList(conv(a, b, 1) for a, b in zip(widths[:-1], widths[1:]))
        self.non_linearity = non_linearity
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.in_channels, self.out_channels = in_channels, out_channels

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but the last layer: the features the output projection reads."""
        for layer in self.layers[:-1]:
            x = self.dropout(self.non_linearity(layer(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[-1](self.hidden(x))


class SoftGating(nn.Module):
    """Per-channel scaling x * w (w initialised to 1): neuraloperator's 'soft-gating' skip."""

    def __init__(self, channels: int, n_dim: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, *([1] * n_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def make_skip(kind: str | None, in_channels: int, out_channels: int, n_dim: int = 2) -> nn.Module | None:
    """A skip connection: 'linear' (1x1 conv, no bias), 'identity', 'soft-gating' or None."""
    if kind is None:
        return None
    if kind == "linear":
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n_dim]
        return conv(in_channels, out_channels, 1, bias=False)
    if kind in ("identity", "soft-gating"):
        if in_channels != out_channels:
            raise ValueError(f"skip {kind!r} needs in_channels == out_channels, got {in_channels} and "
                             f"{out_channels}")
        return nn.Identity() if kind == "identity" else SoftGating(out_channels, n_dim)
    raise ValueError(f"skip: expected 'linear', 'identity', 'soft-gating' or None, got {kind!r}")


class GridEmbedding2D(nn.Module):
    """Append the coordinates of each grid point as two channels: (B, C, H, W) -> (B, C + 2, H, W).

    Channel C is the coordinate along H, channel C + 1 along W, each ``linspace(lo, hi, n + 1)[:-1]``
    (a periodic grid: the right end is the left end). Built from the input's shape at every call,
    so the embedding is the same function at every resolution.
    """

    def __init__(self, boundaries: Sequence[Sequence[float]] = ((0.0, 1.0), (0.0, 1.0))):
        super().__init__()
        self.boundaries = [tuple(map(float, b)) for b in boundaries]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        (y0, y1), (x0, x1) = self.boundaries
        gy = torch.linspace(y0, y1, H + 1, device=x.device, dtype=x.dtype)[:-1]
        gx = torch.linspace(x0, x1, W + 1, device=x.device, dtype=x.dtype)[:-1]
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij"))  # (2, H, W)
        return torch.cat([x, grid.expand(B, 2, H, W)], dim=1)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of (B, C, *spatial), independently at every grid point.

    On CUDA tensors it runs ``irno_kernels.channel_layer_norm`` (a Triton kernel when triton is
    present: one pass each way in NCHW or channels-last; PyTorch's layer_norm over a permuted view
    launches one row of C values per grid point and took half the refiner's GPU time). On CPU it is
    F.layer_norm over the channels-last view, the fastest route there.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return ik.channel_layer_norm(x, self.weight, self.bias, self.eps)
        return ik.channel_layer_norm_ref(x, self.weight, self.bias, self.eps)
