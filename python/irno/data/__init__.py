"""Data: a Kolmogorov-flow generator, The Well's HDF5 layout, next-step and super-resolution sets.

    navier_stokes  NavierStokesConfig, simulate, ensure_navier_stokes (cached, atomic), statistics
    well           write / inspect / read Well-layout HDF5; WellDataset (x, y); Normalization
    super_res      antialiased bicubic downsampling; SuperResolutionDataset (low-res x, high-res y)

h5py is imported on first use, so ``import irno.data`` works without it.
"""

from .navier_stokes import (
    NavierStokesConfig,
    VorticitySolver,
    ensure_navier_stokes,
    simulate,
    snapshot_statistics,
    write_navier_stokes,
)
from .super_res import SuperResolutionDataset, downsample
from .well import (
    Normalization,
    WellDataset,
    WellFile,
    WellFileInfo,
    WellFormatError,
    find_well_files,
    inspect_well_file,
    load_normalization,
    read_well_file,
    save_normalization,
    write_well_file,
)

__all__ = [
    "NavierStokesConfig",
    "Normalization",
    "SuperResolutionDataset",
    "VorticitySolver",
    "WellDataset",
    "WellFile",
    "WellFileInfo",
    "WellFormatError",
    "downsample",
    "ensure_navier_stokes",
    "find_well_files",
    "inspect_well_file",
    "load_normalization",
    "read_well_file",
    "save_normalization",
    "simulate",
    "snapshot_statistics",
    "write_navier_stokes",
    "write_well_file",
]
