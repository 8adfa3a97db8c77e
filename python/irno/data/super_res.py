"""Super-resolution pairs: high-res fields y and their antialiased bicubic downsampling x.

x = downsample(y, s): torch.nn.functional.interpolate(mode="bicubic", antialias=True) to
(H / s, W / s). The antialiased kernel is the bicubic kernel stretched by s, a low-pass filter, so
scales finer than the coarse grid are averaged away instead of aliasing onto coarse ones (plain
bicubic sampling reads 4 neighbours of each coarse point and folds fine structure into the
result). The task is to recover y from x; IRNO's refiner sees x resampled to y's grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .well import WellDataset


def _boundaries(boundary) -> tuple[str, str]:
    """("periodic" | "none") for H and W from one name or a pair; a ValueError otherwise."""
    pair = (boundary, boundary) if isinstance(boundary, str) else tuple(boundary)
    if len(pair) != 2 or any(b not in ("none", "periodic") for b in pair):
        raise ValueError(f"boundary: expected 'none', 'periodic' or a pair of them (H, W), got {boundary!r}")
    return pair


def downsample(y: torch.Tensor, scale: int, antialias: bool = True,
               boundary: str | tuple[str, str] = "none") -> torch.Tensor:
    """Bicubic downsampling of (..., H, W) by an integer ``scale`` -> (..., H / scale, W / scale).

    boundary: "none" (torch's kernel, renormalised at the edges: for open domains), "periodic"
    (the field is wrapped before filtering, right for periodic data such as the Navier-Stokes set),
    or a pair for (H, W), e.g. ("none", "periodic") for a channel periodic along W only.
    H and W must be multiples of ``scale``.
    """
    if y.dim() < 2:
        raise ValueError(f"downsample needs (..., H, W), got shape {tuple(y.shape)}")
    scale = int(scale)
    h, w = y.shape[-2:]
    if scale < 1 or h % scale or w % scale:
        raise ValueError(f"grid {h}x{w} is not divisible by scale {scale}")
    bh, bw = _boundaries(boundary)
    if scale == 1:
        return y.clone()
    lead = y.shape[:-2]
    z = y.reshape(-1, 1, h, w)
    if not z.is_floating_point():
        z = z.float()
    # The stretched bicubic kernel reaches 2 * scale fine cells from a coarse centre; a pad of
    # 3 * scale covers it and, being a multiple of scale, keeps the coarse cells where they were.
    # The pad wraps by index (i mod n), so it may span the grid more than once (coarse grids
    # under 3 cells, where F.pad's circular mode refuses); the values are those of F.pad otherwise.
    ph = 3 * scale if bh == "periodic" else 0
    pw = 3 * scale if bw == "periodic" else 0
    if ph:
        z = z[..., torch.arange(-ph, h + ph, device=z.device) % h, :]
    if pw:
        z = z[..., torch.arange(-pw, w + pw, device=z.device) % w]
    out = F.interpolate(
        z, size=(z.shape[-2] // scale, z.shape[-1] // scale), mode="bicubic", antialias=antialias, align_corners=False
    )
    ch, cw = ph // scale, pw // scale
    out = out[..., ch:out.shape[-2] - ch, cw:out.shape[-1] - cw]
    return out.reshape(*lead, h // scale, w // scale)


class SuperResolutionDataset(Dataset):
    """(x, y) = (downsample(y, scale), y) for each high-res frame y of ``source``.

    source: a tensor (N, C, H, W) or (N, H, W) (one channel), or a WellDataset, whose every stored
        frame (``WellDataset.snapshot``, normalised if the WellDataset is) becomes one sample.
    Returns x (C, H / scale, W / scale) and y (C, H, W).
    """

    def __init__(
        self,
        source: torch.Tensor | WellDataset,
        scale: int = 4,
        antialias: bool = True,
        boundary: str = "none",
    ) -> None:
        super().__init__()
        if isinstance(source, WellDataset):
            if len(source.spatial_shape) != 2:
                raise ValueError(f"super-resolution needs 2-D data, got grid {source.spatial_shape}")
            h, w = source.spatial_shape
        elif isinstance(source, torch.Tensor):
            if source.dim() == 3:
                source = source.unsqueeze(1)
            if source.dim() != 4:
                raise ValueError(f"source tensor must be (N, C, H, W) or (N, H, W), got {tuple(source.shape)}")
            h, w = source.shape[-2:]
        else:
            raise TypeError(f"source must be a tensor or a WellDataset, got {type(source).__name__}")
        if h % scale or w % scale:
            raise ValueError(f"grid {h}x{w} is not divisible by scale {scale}")
        _boundaries(boundary)
        self.source, self.scale, self.antialias, self.boundary = source, int(scale), antialias, boundary

    def __len__(self) -> int:
        if isinstance(self.source, WellDataset):
            return self.source.n_snapshots
        return self.source.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.source, WellDataset):
            y = self.source.snapshot(index)
        else:
            y = self.source[index]
        x = downsample(y, self.scale, antialias=self.antialias, boundary=self.boundary)
        return x, y
