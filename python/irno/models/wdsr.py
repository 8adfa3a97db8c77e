"""WDSR (Yu et al. 2018, "Wide activation for efficient and accurate image super-resolution"), type A,
as used for ERA5 super-resolution in SuperBench and as a base in the IRNO paper.

    x (B, in_channels, h, w)
      body: wn-conv3x3 -> n_resblocks x [x + res_scale * wn-conv3x3(ReLU(wn-conv3x3_expand(x)))]
            -> wn-conv3x3 to out_channels * scale^2 -> PixelShuffle(scale)
      skip: wn-conv5x5 to out_channels * scale^2 -> PixelShuffle(scale)
      y = body + skip  (B, out_channels, scale*h, scale*w)

"wn" is weight normalisation (``torch.nn.utils.parametrizations.weight_norm``). The upsampling is one
pixel shuffle by the full scale, as in WDSR.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from irno.models._layers import conv_padding_mode

__all__ = ["WDSR", "WDSRBlock"]


def _wn_conv(cin: int, cout: int, k: int, padding_mode: str) -> nn.Module:
    return weight_norm(nn.Conv2d(cin, cout, k, padding=k // 2, padding_mode=padding_mode))


class WDSRBlock(nn.Module):
    """x + res_scale * conv(ReLU(conv_expand(x))): (B, C, H, W) -> (B, C, H, W); the first conv widens
    to ``expansion * C`` channels before the activation (the "wide activation")."""

    def __init__(self, channels: int, expansion: int = 4, res_scale: float = 0.1, kernel_size: int = 3,
                 padding_mode: str = "zeros"):
        super().__init__()
        self.body = nn.Sequential(
            _wn_conv(channels, channels * expansion, kernel_size, padding_mode),
            nn.ReLU(inplace=True),
            _wn_conv(channels * expansion, channels, kernel_size, padding_mode),
        )
        self.res_scale = res_scale

    def forward(self, x):
        return x + self.res_scale * self.body(x)


class WDSR(nn.Module):
    """Super-resolution by an integer ``scale``: (B, in_channels, h, w) -> (B, out_channels, s*h, s*w).

    Args:
        in_channels, out_channels: fields in and out (out defaults to in).
        scale: upsampling factor (2, 4, 8, 16 in the paper's ERA5 runs; any int >= 1 works).
        n_features: width of the body (32).
        n_resblocks: residual blocks (18).
        expansion: width multiplier inside a block (4).
        res_scale: scale of each block's residual (0.1).
        kernel_size: body kernel (3); the skip branch uses 5.
        padding: boundary of every conv: 'zero' (WDSR's), 'periodic', 'replicate' or 'reflect'.
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, scale: int = 4,
                 n_features: int = 32, n_resblocks: int = 18, expansion: int = 4, res_scale: float = 0.1,
                 kernel_size: int = 3, padding: str = "zero"):
        super().__init__()
        if int(scale) != scale or scale < 1:
            raise ValueError(f"scale: expected a positive int, got {scale}")
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels, self.scale = in_channels, out_channels, int(scale)
        mode = conv_padding_mode(padding)
        up = out_channels * self.scale ** 2
        self.head = _wn_conv(in_channels, n_features, kernel_size, mode)
        self.body = nn.Sequential(*(WDSRBlock(n_features, expansion, res_scale, kernel_size, mode)
                                    for _ in range(n_resblocks)))
        self.tail = nn.Sequential(_wn_conv(n_features, up, kernel_size, mode), nn.PixelShuffle(self.scale))
        self.skip = nn.Sequential(_wn_conv(in_channels, up, 5, mode), nn.PixelShuffle(self.scale))

    def forward(self, x):
        """(B, in_channels, h, w) -> (B, out_channels, scale*h, scale*w)."""
        return self.tail(self.body(self.head(x))) + self.skip(x)
