"""Models: bases (FNO, TFNO, WDSR) and refiners (UNetRefiner, FNORefiner).

Any nn.Module that maps x -> y serves as a base of :class:`irno.IRNO`; any module that maps
cat(x, h) -> correction serves as a refiner (one that exposes ``forward_features`` and a 1x1
``out_conv`` gets the fused update).
"""

from irno.models._layers import ChannelLayerNorm, ChannelMLP, GridEmbedding2D, SoftGating
from irno.models.fno import FNO, FNORefiner, SpectralConv2d
from irno.models.tfno import TFNO, TuckerSpectralConv2d, tucker_ranks
from irno.models.unet import ConvBlock, UNetRefiner
from irno.models.wdsr import WDSR, WDSRBlock

__all__ = [
    "FNO", "TFNO", "WDSR", "UNetRefiner", "FNORefiner",
    "SpectralConv2d", "TuckerSpectralConv2d", "tucker_ranks",
    "ChannelMLP", "ChannelLayerNorm", "GridEmbedding2D", "SoftGating", "ConvBlock", "WDSRBlock",
]
