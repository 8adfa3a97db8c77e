"""The paper's refinement operator Phi: a U-Net over cat(x, h_k) that returns a correction for h_k.

    depth 4, base width 16: encoder widths 16-32-64-128, bottleneck 256
    block   = 2 x (3x3 conv -> LayerNorm over channels -> GELU)
    down    = 2x2 max-pool
    up      = bilinear x2 upsampling (periodic at the edges for periodic nets) -> 3x3 conv (halves
              the width), concat with the skip, block
    output  = 1x1 conv, xavier-uniform gain 0.1, zero bias (Phi starts near 0: h_1 ~ h_0)

Boundaries are a keyword (periodic as in the released code, zero or replicate for open domains).
Grids that are not multiples of 2^depth are padded at the bottom/right up to one (with the same
boundary rule) and cropped back, so any H x W works (e.g. 33 x 47).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

import irno_kernels as ik
from irno.models._layers import (
    ChannelLayerNorm,
    Conv2d,
    conv_padding_mode,
    crop,
    pad_to_multiple,
    upsample2x_periodic,
)
from irno_kernels._checks import within
from irno_kernels.backend import TRITON_MAX_ELEMENTS, resolve
from irno_kernels.norm import channel_layer_norm_triton
from irno_kernels.pad import periodic_pad_cat_triton, periodic_upsample2x_triton

__all__ = ["UNetRefiner", "ConvBlock", "periodic_coordinates"]


def _triton_serves(op: str, x: torch.Tensor) -> bool:
    """Whether the automatic (or IRNO_BACKEND's) choice for ``op`` on x is its Triton kernel; a forced
    backend that lacks the op means no (the module chain runs)."""
    try:
        return resolve(op, x.device, None, (x,)) == "triton"
    except RuntimeError:
        return False


def _check_batched(name: str, x: torch.Tensor) -> None:
    """The blocks take (B, C, H, W): an unbatched (C, H, W) field would have its LayerNorm taken over
    H (dim 1), silently, wherever H equals the width."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a (B, C, H, W) tensor, got {got} (add the batch dim: x[None])")


def _fused_on(x: torch.Tensor) -> bool:
    """The fused Triton path may serve x (4-D, floating point): IRNO_FUSED_BLOCKS is not 0, and the
    Triton LayerNorm and periodic pad serve it (the automatic choice on CUDA; on CPU only when
    IRNO_BACKEND=triton forces triton's interpreter)."""
    return (os.environ.get("IRNO_FUSED_BLOCKS", "1") != "0" and x.dim() == 4 and x.is_floating_point()
            and _triton_serves("channel_layer_norm", x) and _triton_serves("periodic_pad2d", x))


def _unchecked_ok(x: torch.Tensor, out_elements: int, *params: torch.Tensor | None) -> bool:
    """The kernels may run without the ops' per-call checks (irno_kernels.*_triton): no forward-mode AD
    level is open (the checked ops route tangents to the references), not tracing (compiled graphs
    keep the checked ops), the largest tensor made stays within the kernels' 32-bit reach, and the
    parameters live on x's device."""
    return (torch.autograd.forward_ad._current_level < 0 and not torch.compiler.is_compiling()
            and out_elements < TRITON_MAX_ELEMENTS and within(x, TRITON_MAX_ELEMENTS)
            and all(p is None or p.device == x.device for p in params))


class ConvBlock(nn.Module):
    """2 x (3x3 conv -> channel LayerNorm -> GELU): (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int, padding_mode: str = "circular", kernel_size: int = 3):
        super().__init__()
        layers = []
        for a in (cin, cout):
            layers += [Conv2d(a, cout, kernel_size, padding=kernel_size // 2, padding_mode=padding_mode),
                       ChannelLayerNorm(cout), nn.GELU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        _check_batched("x", x)
        if self._fusable(x):
            return self._fused([x], None, self._unchecked([x]))
        return self.net(x)

    def forward_cat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """``self(torch.cat(xs, 1))``; on the fused path the concatenation is written straight into
        the first conv's padded input (one pass, no separate cat and pad)."""
        _check_batched("xs[0]", xs[0])
        if self._fusable(xs[0]):
            return self._fused(xs, None, self._unchecked(xs))
        return self.net(torch.cat(xs, 1))

    def _fusable(self, x: torch.Tensor) -> bool:
        """The fused path applies: periodic convs with a symmetric halo that fits the grid, exact
        GELUs, and the Triton channel LayerNorm and periodic pad serving x (``_fused_on``).
        IRNO_FUSED_BLOCKS=0 (or IRNO_BACKEND=reference) turns it off."""
        conv1, _, act1, conv2, _, act2 = self.net  # iterating: Sequential's indexing costs ~2 us a time
        for conv in (conv1, conv2):
            p = conv.padding
            if not (conv.padding_mode == "circular" and isinstance(p, tuple) and p[0] == p[1]
                    and isinstance(p[0], int) and p[0] <= min(x.shape[-2:])):
                return False
        return all(type(a) is nn.GELU and a.approximate == "none" for a in (act1, act2)) and _fused_on(x)

    def _unchecked(self, xs: list[torch.Tensor]) -> bool:
        """Whether ``_fused`` may call the kernels without the ops' argument checks (``_unchecked_ok``):
        xs share x[0]'s batch, grid and device (the U-Net's concatenations do), and every tensor the
        block makes fits the kernels."""
        x0 = xs[0]
        B, _, H, W = x0.shape
        if x0.numel() == 0:  # the checked ops refuse empty fields by name
            return False
        for x in xs[1:]:
            if x.dim() != 4 or x.shape[0] != B or x.shape[2:] != x0.shape[2:] or x.device != x0.device \
                    or not x.is_floating_point() or not within(x, TRITON_MAX_ELEMENTS):
                return False
        conv1, ln1, _, conv2, ln2, _ = self.net
        for ln, conv in ((ln1, conv1), (ln2, conv2)):  # what the checked norm validates, per call
            shape = (conv.out_channels,)
            if any(t is not None and t.shape != shape for t in (ln.weight, ln.bias, conv.bias)) \
                    or not 0.0 <= ln.eps < math.inf:
                return False
        h = max(conv1.padding[0], conv2.padding[0])
        widest = max(sum(x.shape[1] for x in xs), conv2.in_channels, conv2.out_channels)
        return _unchecked_ok(x0, B * widest * (H + 2 * h) * (W + 2 * h), ln1.weight, ln1.bias, ln2.weight, ln2.bias,
                             conv1.bias, conv2.bias)

    def forward_fused(self, x: torch.Tensor | list[torch.Tensor], backend: str | None = None) -> torch.Tensor:
        """``self.net(x)`` (of ``torch.cat(x, 1)`` for a list) in fewer passes over memory (the path on
        CUDA): the input (the concatenation) is written once, periodically padded, in the conv's
        compute dtype; each LayerNorm + GELU is one kernel, and the first writes its output straight
        into the periodic halo that the second conv reads (no pad copy), in the conv's compute dtype
        under autocast (which the conv would cast it to anyway). Same parameters, same function;
        ``backend`` forces the norm's and the pad's backend."""
        return self._fused(list(x) if isinstance(x, (list, tuple)) else [x], backend, False)

    def _fused(self, xs: list[torch.Tensor], backend: str | None, unchecked: bool) -> torch.Tensor:
        """forward_fused; ``unchecked``: through the Triton routes without the ops' per-call checks
        and backend choice (``_unchecked``; tens of microseconds of host time per call, the eager
        refiner's bottleneck on a GPU). Each conv runs without its bias, which the LayerNorm after it
        adds as it reads the conv's output (``in_bias``): cuDNN would add it in a pass of its own."""
        conv1, ln1, _, conv2, ln2, _ = self.net
        dev = xs[0].device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        h1, h2 = conv1.padding[0], conv2.padding[0]
        if unchecked:
            a = periodic_pad_cat_triton(xs, h1, dtype)
        else:
            a = ik.periodic_pad_cat(xs, h1, out_dtype=dtype, backend=backend)
        z = F.conv2d(a, conv1.weight, None, conv1.stride, 0, conv1.dilation, conv1.groups)
        if unchecked:
            a = channel_layer_norm_triton(z, ln1.weight, ln1.bias, ln1.eps, True, h2, dtype, conv1.bias)
        else:
            a = ik.channel_layer_norm(z, ln1.weight, ln1.bias, ln1.eps, activation="gelu", halo=h2,
                                      out_dtype=dtype, in_bias=conv1.bias, backend=backend)
        z = F.conv2d(a, conv2.weight, None, conv2.stride, 0, conv2.dilation, conv2.groups)
        if unchecked:
            return channel_layer_norm_triton(z, ln2.weight, ln2.bias, ln2.eps, True, 0, None, conv2.bias)
        return ik.channel_layer_norm(z, ln2.weight, ln2.bias, ln2.eps, activation="gelu", in_bias=conv2.bias,
                                     backend=backend)


def periodic_coordinates(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, H, W): sin and cos of 2 pi i / H, then of 2 pi j / W, in x's dtype."""
    B, _, H, W = x.shape
    ti = torch.arange(H, device=x.device, dtype=torch.float32) * (2 * torch.pi / H)
    tj = torch.arange(W, device=x.device, dtype=torch.float32) * (2 * torch.pi / W)
    rows = torch.stack([ti.sin(), ti.cos()])[:, :, None].expand(2, H, W)
    cols = torch.stack([tj.sin(), tj.cos()])[:, None, :].expand(2, H, W)
    return torch.cat([rows, cols]).to(x.dtype).expand(B, 4, H, W)


class UNetRefiner(nn.Module):
    """Phi: (B, in_channels, H, W) -> (B, out_channels, H, W), any H and W.

    Args:
        in_channels: channels of the refiner's input, i.e. channels of x plus channels of h.
        out_channels: channels of the correction (= channels of h).
        depth: number of 2x2 poolings (4).
        width: channels of the first level; level i has width * 2^i, the bottleneck width * 2^depth.
        padding: boundary of the 3x3 convs and of the alignment padding: 'periodic' (default, as the
            released code), 'zero', 'replicate' or 'reflect'.
        out_gain: xavier-uniform gain of the output 1x1 conv (0.1); its bias starts at 0.
        positional: append 4 coordinate channels sin/cos(2 pi i / H), sin/cos(2 pi j / W) to the input
            (False, as the released code). A periodic U-Net cannot otherwise tell where it is, so a
            fixed spatial pattern (a forcing term, a wall) must be inferred from the fields.

    ``forward_features(x)`` -> (B, width, H, W) is the input of ``out_conv`` (the 1x1 output conv),
    so ``forward(x) == out_conv(forward_features(x))``; IRNO fuses ``out_conv`` into the update.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int = 4, width: int = 16,
                 padding: str = "periodic", out_gain: float = 0.1, positional: bool = False):
        super().__init__()
        sizes = (("depth", depth), ("width", width), ("in_channels", in_channels), ("out_channels", out_channels))
        for name, v in sizes:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depth, self.width, self.padding = depth, width, padding
        self.positional = bool(positional)
        mode = conv_padding_mode(padding)
        widths = [width * 2 ** i for i in range(depth + 1)]  # last one is the bottleneck
        self.down = nn.ModuleList()
        cin = in_channels + (4 if self.positional else 0)
        for w in widths[:-1]:
            self.down.append(ConvBlock(cin, w, mode))
            cin = w
        self.bottleneck = ConvBlock(widths[-2], widths[-1], mode)
        self.up_convs = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(depth)):
            self.up_convs.append(Conv2d(widths[i + 1], widths[i], 3, padding=1, padding_mode=mode))
            self.up_blocks.append(ConvBlock(2 * widths[i], widths[i], mode))
        self.out_conv = nn.Conv2d(width, out_channels, 1)
        nn.init.xavier_uniform_(self.out_conv.weight, gain=out_gain)
        nn.init.zeros_(self.out_conv.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, width, H, W): the features the output 1x1 conv reads."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.positional:
            x = torch.cat([x, periodic_coordinates(x)], dim=1)
        if self.padding == "reflect":  # reflection needs more than one row and column at every level
            bh, bw = (-(-n // 2 ** self.depth) for n in x.shape[-2:])
            if min(bh, bw) < 2:
                raise ValueError(f"padding: 'reflect' needs at least 2 x 2 points after {self.depth} poolings; a "
                                 f"{x.shape[-2]} x {x.shape[-1]} grid gives {bh} x {bw} (use 'replicate', a "
                                 f"smaller depth or a larger grid)")
        x, size = pad_to_multiple(x, 2 ** self.depth, self.padding)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up_conv, block, skip in zip(self.up_convs, self.up_blocks, reversed(skips)):
            x = block.forward_cat([skip, self._up(up_conv, x)])
        return crop(x, size)

    def _up(self, up_conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``up_conv(self._upsample(x))``. On the fused path (periodic, the Triton kernel serving x) the
        upsampled field is written once, already padded for up_conv and in its compute dtype under
        autocast, by ``irno_kernels.periodic_upsample2x`` (in place of a pad, the interpolation, a
        crop, a second pad and a cast)."""
        p = up_conv.padding
        if (self.padding in ("periodic", "circular") and up_conv.padding_mode == "circular"
                and isinstance(p, tuple) and p[0] == p[1] and isinstance(p[0], int) and p[0] <= 2 * min(x.shape[-2:])
                and os.environ.get("IRNO_FUSED_BLOCKS", "1") != "0" and _triton_serves("periodic_upsample2x", x)):
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            B, C, H, W = x.shape
            if x.is_floating_point() and _unchecked_ok(x, B * C * (2 * H + 2 * p[0]) * (2 * W + 2 * p[0])):
                a = periodic_upsample2x_triton(x, p[0], dtype)
            else:
                a = ik.periodic_upsample2x(x, p[0], out_dtype=dtype)
            return F.conv2d(a, up_conv.weight, up_conv.bias, up_conv.stride, 0, up_conv.dilation, up_conv.groups)
        return up_conv(self._upsample(x))

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        """Bilinear x2. With periodic boundaries the edge pixels interpolate across the wrap (a 1-pixel
        periodic halo, upsampled and cropped), so the whole net commutes with periodic shifts by
        multiples of 2^depth; otherwise the edges clamp, as ``F.interpolate`` does."""
        if self.padding in ("periodic", "circular") and min(x.shape[-2:]) >= 1:
            return upsample2x_periodic(x)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W)."""
        return self.out_conv(self.forward_features(x))
