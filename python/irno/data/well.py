"""HDF5 files in The Well's layout: writer, checked reader, and a next-step torch Dataset.

The layout (PolymathicAI/the_well, docs/data_format.md), B trajectories, T steps, grid S = (Nx, Ny):

    /                      @dataset_name @grid_type @n_spatial_dims @n_trajectories
                           @simulation_parameters (names) and one attribute per parameter
    /dimensions            @spatial_dims = ['x', 'y'];  time (T,);  x (Nx,);  y (Ny,)
                           (each with @sample_varying, @time_varying)
    /boundary_conditions/<name>   @bc_type ('periodic' | 'wall' | 'open') @associated_dims
                           @associated_fields @sample_varying @time_varying;  mask (bool, on the dims)
    /scalars               @field_names; one dataset per scalar
    /t0_fields             @field_names; scalar fields  (B, T, Nx, Ny)
    /t1_fields             @field_names; vector fields  (B, T, Nx, Ny, D)
    /t2_fields             @field_names; tensor fields  (B, T, Nx, Ny, D, D)

A field's leading B and T axes exist only when its @sample_varying / @time_varying is true, and
only the spatial axes whose @dim_varying entry is true are stored; the reader broadcasts the rest.
Real Well files (e.g. turbulent_radiative_layer_2D: density, pressure and velocity;
active_matter: concentration, velocity and the 2x2 tensors D and E) read the same way as the files
written here.

Channels. A frame's C channels are the selected fields in order (by default the time-varying
fields of t0_fields, then t1_fields, then t2_fields, each group in its @field_names order); a
vector field gives D channels (``velocity_x``, ``velocity_y``), a tensor field D*D channels
(``E_xx``, ``E_xy``, ``E_yx``, ``E_yy``), as The Well names them. Samples are channel-first with the
frames stacked time-major: x[t * C + c] is channel c of input frame t (t = 0 the oldest), and
y[t * C + c] is channel c of output frame t (t = 0 the frame right after the last input).
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FIELD_GROUPS = ("t0_fields", "t1_fields", "t2_fields")
SPLITS = ("train", "valid", "test")
_SUFFIXES = (".hdf5", ".h5")


class WellFormatError(ValueError):
    """A file that is not a readable HDF5 file in The Well's layout; the message names the file."""

    def __init__(self, path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _h5py():
    try:
        import h5py
    except ImportError as err:  # fail soft at import of irno.data, loud at use
        raise ImportError("irno.data needs h5py to read and write HDF5 files: pip install h5py") from err
    return h5py


# --------------------------------------------------------------------------------------------
# Writing


def write_well_file(
    path,
    *,
    dataset_name: str,
    time,
    coords: Mapping[str, np.ndarray],
    t0_fields: Mapping[str, np.ndarray] | None = None,
    t1_fields: Mapping[str, np.ndarray] | None = None,
    t2_fields: Mapping[str, np.ndarray] | None = None,
    simulation_parameters: Mapping[str, float] | None = None,
    boundary_conditions: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    grid_type: str = "cartesian",
) -> Path:
    """Write one file; every field varies over trajectories, time and all spatial dims.

    coords: ordered {dim name: coordinates}; their order is the field's spatial axis order.
    t0 arrays: (B, T, *S); t1: (B, T, *S, D); t2: (B, T, *S, D, D), with D = len(coords).
    boundary_conditions: {group name: (bc_type, associated dims)}; default: periodic on every dim.
    simulation_parameters are written as root attributes and as constant scalars.
    The file is written under a temporary name and renamed into place (atomic).
    """
    h5py = _h5py()
    path = Path(path)
    dims = list(coords)
    n_dims = len(dims)
    spatial = tuple(len(coords[d]) for d in dims)
    time = np.asarray(time, dtype=np.float32).reshape(-1)
    groups = {"t0_fields": t0_fields or {}, "t1_fields": t1_fields or {}, "t2_fields": t2_fields or {}}
    n_traj = None
    for order, group in enumerate(FIELD_GROUPS):
        for name, arr in groups[group].items():
            arr = np.asarray(arr)
            expected = spatial + (n_dims,) * order
            if arr.ndim != 2 + len(expected) or arr.shape[1] != len(time) or arr.shape[2:] != expected:
                raise ValueError(
                    f"{group}/{name}: expected shape (B, {len(time)}, {', '.join(map(str, expected))}), got {arr.shape}"
                )
            if n_traj is not None and arr.shape[0] != n_traj:
                raise ValueError(f"{group}/{name}: {arr.shape[0]} trajectories, other fields have {n_traj}")
            n_traj = arr.shape[0]
    if n_traj is None:
        raise ValueError("write_well_file needs at least one field")
    if boundary_conditions is None:
        boundary_conditions = {f"{d}_periodic": ("periodic", [d]) for d in dims}
    params = dict(simulation_parameters or {})

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["dataset_name"] = dataset_name
            f.attrs["grid_type"] = grid_type
            f.attrs["n_spatial_dims"] = n_dims
            f.attrs["n_trajectories"] = n_traj
            f.attrs["simulation_parameters"] = _str_array(params)
            for key, value in params.items():
                f.attrs[key] = value

            g = f.create_group("dimensions")
            g.attrs["spatial_dims"] = _str_array(dims)
            ds = g.create_dataset("time", data=time)
            ds.attrs["sample_varying"] = False
            ds.attrs["time_varying"] = True
            for d in dims:
                ds = g.create_dataset(d, data=np.asarray(coords[d], dtype=np.float32))
                ds.attrs["sample_varying"] = False
                ds.attrs["time_varying"] = False

            g = f.create_group("boundary_conditions")
            for name, (bc_type, assoc) in boundary_conditions.items():
                assoc = list(assoc)
                unknown = [d for d in assoc if d not in dims]
                if unknown:
                    raise ValueError(f"boundary condition {name!r}: unknown dims {unknown}, have {dims}")
                bc = g.create_group(name)
                bc.attrs["bc_type"] = bc_type
                bc.attrs["associated_dims"] = _str_array(assoc)
                bc.attrs["associated_fields"] = _str_array([])
                bc.attrs["sample_varying"] = False
                bc.attrs["time_varying"] = False
                mask = np.zeros([len(coords[d]) for d in assoc], dtype=bool)
                for axis in range(len(assoc)):  # the boundary: first and last point along each dim
                    index = [slice(None)] * len(assoc)
                    index[axis] = [0, -1]
                    mask[tuple(index)] = True
                bc.create_dataset("mask", data=mask)

            g = f.create_group("scalars")
            g.attrs["field_names"] = _str_array(params)
            for key, value in params.items():
                ds = g.create_dataset(key, data=np.asarray(value, dtype=np.float32))
                ds.attrs["sample_varying"] = False
                ds.attrs["time_varying"] = False

            for order, group in enumerate(FIELD_GROUPS):
                g = f.create_group(group)
                g.attrs["field_names"] = _str_array(groups[group])
                for name, arr in groups[group].items():
                    ds = g.create_dataset(name, data=np.asarray(arr, dtype=np.float32))
                    ds.attrs["dim_varying"] = np.ones(n_dims, dtype=bool)
                    ds.attrs["sample_varying"] = True
                    ds.attrs["time_varying"] = True
                    if order == 2:
                        ds.attrs["symmetric"] = False
                        ds.attrs["antisymmetric"] = False
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _str_array(names) -> np.ndarray:
    return np.array([str(n) for n in names], dtype=_h5py().string_dtype())


# --------------------------------------------------------------------------------------------
# Reading and checking


@dataclass(frozen=True)
class FieldInfo:
    """One field of a file: where it is and which axes it stores."""

    name: str
    group: str  # t0_fields, t1_fields or t2_fields
    order: int  # 0 scalar, 1 vector, 2 tensor
    sample_varying: bool
    time_varying: bool
    dim_varying: tuple[bool, ...]
    shape: tuple[int, ...]  # as stored
    components: tuple[str, ...]  # channel name suffixes: ('',), ('x', 'y'), ('xx', 'xy', ...)

    @property
    def channel_names(self) -> list[str]:
        return [f"{self.name}_{c}" if c else self.name for c in self.components]


@dataclass(frozen=True)
class WellFileInfo:
    """The checked structure of one file (no field data)."""

    path: str
    dataset_name: str
    n_spatial_dims: int
    n_trajectories: int
    n_steps: int
    spatial_dims: tuple[str, ...]
    spatial_shape: tuple[int, ...]
    fields: tuple[FieldInfo, ...]
    boundary_conditions: dict = field(default_factory=dict)  # group name -> bc_type
    attrs: dict = field(default_factory=dict)  # root attributes
    periodic_dims: tuple[str, ...] = ()  # spatial dims a 'periodic' boundary condition names

    def field(self, name: str) -> FieldInfo:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.path}: no field {name!r}; fields are {[f.name for f in self.fields]}")


def _names(value) -> list[str]:
    """A list of names from an HDF5 attribute (str, bytes, or an array of either)."""
    if isinstance(value, (str, bytes, np.bytes_, np.str_)):
        value = [value]
    return [v.decode() if isinstance(v, (bytes, np.bytes_)) else str(v) for v in np.asarray(value).reshape(-1)]


def _plain(value):
    """An HDF5 attribute as plain Python (str, number, bool or list)."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OSU":
            return _names(value)
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open(path):
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        if "truncated" in str(err):
            problem = f"file is truncated (shorter than its HDF5 header says; an interrupted copy?): {err}"
        elif not h5py.is_hdf5(path):
            problem = "not an HDF5 file (no HDF5 signature)"
        else:
            problem = f"cannot be opened as HDF5: {err}"
        raise WellFormatError(path, problem) from err


def _inspect_open(f, path) -> WellFileInfo:
    h5py = _h5py()

    def group(name):
        obj = f.get(name)
        if not isinstance(obj, h5py.Group):
            raise WellFormatError(
                path,
                f"missing group '{name}/' (The Well's layout has dimensions/ and t0_fields/, t1_fields/, t2_fields/)",
            )
        return obj

    def attr(obj, key, where):
        if key not in obj.attrs:
            raise WellFormatError(path, f"missing attribute '{key}' on {where}")
        return obj.attrs[key]

    def count(obj, key, where):
        value = attr(obj, key, where)
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = -1
        if n < 0:
            raise WellFormatError(path, f"attribute '{key}' on {where} is {_plain(value)!r}, not an integer >= 0")
        return n

    n_dims = count(f, "n_spatial_dims", "the root group")
    n_traj = count(f, "n_trajectories", "the root group")
    dims_group = group("dimensions")
    spatial_dims = tuple(_names(attr(dims_group, "spatial_dims", "dimensions/")))
    if len(spatial_dims) != n_dims:
        raise WellFormatError(
            path, f"dimensions/@spatial_dims {list(spatial_dims)} does not match n_spatial_dims = {n_dims}"
        )
    for d in (*spatial_dims, "time"):
        if not isinstance(dims_group.get(d), h5py.Dataset):
            raise WellFormatError(path, f"missing dataset 'dimensions/{d}'")
        if dims_group[d].ndim == 0:  # the length of a dim is the last axis of its coordinates
            raise WellFormatError(path, f"dimensions/{d} is a scalar; expected its coordinates, shape (N,) or (B, N)")
    spatial_shape = tuple(int(dims_group[d].shape[-1]) for d in spatial_dims)
    n_steps = int(dims_group["time"].shape[-1])

    fields = []
    for order, gname in enumerate(FIELD_GROUPS):
        g = group(gname)
        listed = _names(attr(g, "field_names", f"{gname}/"))
        comps = tuple("".join(c) for c in itertools.product(spatial_dims, repeat=order))
        for name in listed:
            ds = g.get(name)
            if not isinstance(ds, h5py.Dataset):
                raise WellFormatError(
                    path, f"{gname}/@field_names lists '{name}' but there is no dataset {gname}/{name}"
                )
            sample_varying = bool(ds.attrs.get("sample_varying", True))
            time_varying = bool(ds.attrs.get("time_varying", True))
            dim_varying = tuple(bool(v) for v in np.asarray(ds.attrs.get("dim_varying", [True] * n_dims)).reshape(-1))
            if len(dim_varying) != n_dims:
                raise WellFormatError(
                    path, f"{gname}/{name}: @dim_varying has {len(dim_varying)} entries for {n_dims} spatial dims"
                )
            lead = ((n_traj,) if sample_varying else ()) + ((n_steps,) if time_varying else ())
            grid = tuple(s for s, v in zip(spatial_shape, dim_varying) if v)
            accepted = [lead + grid + (n_dims,) * order]
            if order == 2:  # the format notes D^2 trailing values; the released files store (D, D)
                accepted.append(lead + grid + (n_dims * n_dims,))
            if tuple(ds.shape) not in accepted:
                raise WellFormatError(
                    path,
                    f"{gname}/{name} has shape {tuple(ds.shape)}, expected {accepted[0]} from n_trajectories="
                    f"{n_traj}, {n_steps} time steps, grid {spatial_shape} and its sample/time/dim_varying flags",
                )
            fields.append(
                FieldInfo(name, gname, order, sample_varying, time_varying, dim_varying, tuple(ds.shape), comps)
            )

    bcs = {}
    periodic: list[str] = []
    if isinstance(f.get("boundary_conditions"), h5py.Group):
        for name, bc in f["boundary_conditions"].items():
            bcs[name] = _names(bc.attrs.get("bc_type", "unknown"))[0]
            if bcs[name].lower() == "periodic":
                periodic += [d for d in _names(bc.attrs.get("associated_dims", [])) if d in spatial_dims]
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    return WellFileInfo(
        path=str(path),
        dataset_name=str(attrs.get("dataset_name", Path(path).stem)),
        n_spatial_dims=n_dims,
        n_trajectories=n_traj,
        n_steps=n_steps,
        spatial_dims=spatial_dims,
        spatial_shape=spatial_shape,
        fields=tuple(fields),
        boundary_conditions=bcs,
        attrs=attrs,
        periodic_dims=tuple(d for d in spatial_dims if d in periodic),
    )


def inspect_well_file(path) -> WellFileInfo:
    """Check a file's structure and return it; a WellFormatError names the file and the problem."""
    with _open(path) as f:
        return _inspect_open(f, path)


@dataclass
class WellFile:
    """A whole file in memory: ``fields`` maps a field name to its array as stored."""

    info: WellFileInfo
    time: np.ndarray
    coords: dict[str, np.ndarray]
    fields: dict[str, np.ndarray]


def read_well_file(path) -> WellFile:
    """Read a whole file (checked first). Small files only: everything goes to memory."""
    with _open(path) as f:
        info = _inspect_open(f, path)
        try:
            data = {fi.name: f[fi.group][fi.name][()] for fi in info.fields}
            time = f["dimensions"]["time"][()]
            coords = {d: f["dimensions"][d][()] for d in info.spatial_dims}
        except OSError as err:
            raise WellFormatError(path, f"reading the data failed (file damaged or truncated?): {err}") from err
    return WellFile(info=info, time=time, coords=coords, fields=data)


def find_well_files(path_or_dir, split: str | None = None) -> list[Path]:
    """The HDF5 files of a file, a folder of files, or a data set root with a split.

    With ``split``, path_or_dir is a data set root in The Well's layout (root/data/<split>/*.hdf5)
    or a folder with one subfolder per split (root/<split>/*.hdf5).
    """
    path = Path(path_or_dir)
    if split is not None:
        for candidate in (path / "data" / split, path / split):
            if candidate.is_dir():
                path = candidate
                break
        else:
            raise FileNotFoundError(f"{path_or_dir}: no split '{split}' (looked for data/{split}/ and {split}/)")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES and p.is_file())
    if not files:
        hint = " (a data set root? pass split='train', 'valid' or 'test')" if (path / "data").is_dir() else ""
        raise FileNotFoundError(f"{path}: no .hdf5 or .h5 files{hint}")
    return files


# --------------------------------------------------------------------------------------------
# Normalisation


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std (a vector field's components each get their own).

    Computed from the training split only, then stored with a model (``to_dict`` gives plain JSON)
    so that evaluation normalises, and denormalises predictions, with the same numbers.
    ``normalize`` / ``denormalize`` take channel-first tensors whose channel count is a multiple
    of the number of fields' channels: frames stacked time-major, as WellDataset returns them.
    """

    channel_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: tuple[str, ...] = ()  # the files the statistics came from

    def __post_init__(self) -> None:
        if not (len(self.channel_names) == len(self.mean) == len(self.std)):
            raise ValueError("channel_names, mean and std must have the same length")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict:
        return {
            "channel_names": list(self.channel_names),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "source": list(self.source),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Normalization:
        missing = {"channel_names", "mean", "std"} - set(d)
        if missing:
            raise ValueError(f"normalization dict lacks {sorted(missing)}")
        return cls(
            tuple(d["channel_names"]),
            tuple(map(float, d["mean"])),
            tuple(map(float, d["std"])),
            tuple(d.get("source", ())),
        )

    def select(self, channel_names: Sequence[str]) -> Normalization:
        """The statistics of the given channels, in that order."""
        missing = [c for c in channel_names if c not in self.channel_names]
        if missing:
            raise ValueError(
                f"normalization has no statistics for channels {missing}; it has {list(self.channel_names)}"
            )
        idx = [self.channel_names.index(c) for c in channel_names]
        return Normalization(
            tuple(channel_names), tuple(self.mean[i] for i in idx), tuple(self.std[i] for i in idx), self.source
        )

    def _stats(self, t: torch.Tensor, channel_dim: int):
        n_ch = t.shape[channel_dim]
        c = len(self.channel_names)
        if n_ch % c:
            raise ValueError(
                f"tensor has {n_ch} channels (dim {channel_dim}), not a multiple of {c} ({list(self.channel_names)})"
            )
        shape = [1] * t.dim()
        shape[channel_dim] = n_ch
        mean = torch.tensor(self.mean, dtype=t.dtype, device=t.device).repeat(n_ch // c).view(shape)
        std = torch.tensor(self.std, dtype=t.dtype, device=t.device).repeat(n_ch // c).view(shape)
        return mean, std

    def normalize(self, t: torch.Tensor, channel_dim: int = -3) -> torch.Tensor:
        mean, std = self._stats(t, channel_dim)
        return (t - mean) / std

    def denormalize(self, t: torch.Tensor, channel_dim: int = -3) -> torch.Tensor:
        mean, std = self._stats(t, channel_dim)
        return t * std + mean

    @classmethod
    def compute(cls, files, fields: Sequence[str] | None = None, min_std: float = 1e-4) -> Normalization:
        """Statistics over every stored value (all trajectories and steps) of the files' fields.

        Streams one trajectory at a time, merging float64 partial moments (Chan et al.), so
        large files need no more memory than one trajectory of one field.
        """
        files = [Path(p) for p in files]
        if not files:
            raise ValueError("Normalization.compute needs at least one file of the training split")
        infos = [inspect_well_file(p) for p in files]
        selected = _select_fields(infos[0], fields)
        names, means, stds = [], [], []
        for fname in selected:
            n_comp = len(infos[0].field(fname).components)
            count, mean, m2 = 0, np.zeros(n_comp), np.zeros(n_comp)
            for path, info in zip(files, infos):
                fi = info.field(fname)
                with _open(path) as f:
                    ds = f[fi.group][fi.name]
                    chunks = range(info.n_trajectories) if fi.sample_varying else [None]
                    for b in chunks:
                        try:
                            arr = np.asarray(ds[b] if b is not None else ds[()], dtype=np.float64)
                        except OSError as err:
                            raise WellFormatError(path, f"reading {fi.group}/{fi.name} failed: {err}") from err
                        arr = arr.reshape(-1, n_comp)
                        nb = arr.shape[0]
                        mb = arr.mean(axis=0)
                        m2b = ((arr - mb) ** 2).sum(axis=0)
                        delta = mb - mean
                        total = count + nb
                        mean = mean + delta * nb / total
                        m2 = m2 + m2b + delta**2 * count * nb / total
                        count = total
            if count == 0:
                raise ValueError(
                    f"normalization: the training files {[str(p) for p in files]} hold no values of field "
                    f"{fname!r} (0 trajectories?); statistics need a non-empty training split"
                )
            std = np.maximum(np.sqrt(m2 / max(count, 1)), min_std)
            names += infos[0].field(fname).channel_names
            means += mean.tolist()
            stds += std.tolist()
        return cls(tuple(names), tuple(means), tuple(stds), tuple(str(p) for p in files))


def _select_fields(info: WellFileInfo, fields: Sequence[str] | None) -> list[str]:
    if fields is None:
        chosen = [f.name for f in info.fields if f.time_varying]
        if not chosen:
            raise WellFormatError(info.path, "has no time-varying field to predict")
        return chosen
    if isinstance(fields, str):
        fields = [fields]
    have = [f.name for f in info.fields]
    unknown = [f for f in fields if f not in have]
    if unknown:
        raise ValueError(f"{info.path}: no field(s) {unknown}; the file has {have}")
    return list(fields)


# --------------------------------------------------------------------------------------------
# Dataset


class WellDataset(Dataset):
    """Next-step prediction windows from Well-layout files: (x, y) channel-first tensors.

    x: (n_steps_input * C, *S), y: (n_steps_output * C, *S), S the grid in the file's
    dimensions/@spatial_dims order (for 2-D: H = x, W = y), frames time-major (x[t * C + c]: see
    the module docstring for the channel order; ``channel_names`` lists one frame's C channels).
    Every trajectory gives T - (n_steps_input + n_steps_output - 1) * dt_stride windows.

    path_or_dir: a file, a folder of files, or (with ``split``) a data set root holding
        data/<split>/ (The Well) or <split>/.
    fields: field names to use (default: every time-varying field of the file).
    normalization: None (raw values); "train" (statistics of the training split next to this
        one: <root>/data/train when ``split`` is given, else the sibling folder named "train", or
        the whole folder for a file inside train/);
        a Normalization, or its to_dict() (e.g. from a checkpoint).
    in_memory: load the selected fields into memory (default: when they take under 2 GiB);
        otherwise every sample is read from the files (one handle per worker process).
    """

    def __init__(
        self,
        path_or_dir,
        n_steps_input: int = 4,
        n_steps_output: int = 1,
        fields: Sequence[str] | None = None,
        normalization: Normalization | Mapping | str | None = None,
        split: str | None = None,
        dt_stride: int = 1,
        in_memory: bool | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if n_steps_input < 1 or n_steps_output < 0 or dt_stride < 1:
            raise ValueError("need n_steps_input >= 1, n_steps_output >= 0 and dt_stride >= 1")
        self.root = Path(path_or_dir)
        self.split = split
        self.files = find_well_files(path_or_dir, split)
        self.infos = [inspect_well_file(p) for p in self.files]
        self.n_steps_input, self.n_steps_output, self.dt_stride = n_steps_input, n_steps_output, dt_stride
        self.dtype = dtype

        first = self.infos[0]
        self.fields = _select_fields(first, fields)
        self._field_infos = []
        for info in self.infos:
            per_file = [info.field(name) if name in {f.name for f in info.fields} else None for name in self.fields]
            missing = [n for n, fi in zip(self.fields, per_file) if fi is None]
            if missing:
                raise WellFormatError(info.path, f"lacks field(s) {missing} that {first.path} has")
            if info.spatial_shape != first.spatial_shape or info.spatial_dims != first.spatial_dims:
                raise WellFormatError(
                    info.path,
                    f"grid {info.spatial_dims}={info.spatial_shape} differs from {first.path}'s "
                    f"{first.spatial_dims}={first.spatial_shape}",
                )
            self._field_infos.append(per_file)
        self.spatial_shape = first.spatial_shape
        #: "periodic" or "none" per spatial dim, from the first file's boundary conditions
        self.boundaries = tuple("periodic" if d in first.periodic_dims else "none" for d in first.spatial_dims)
        self.channel_names = [c for name in self.fields for c in first.field(name).channel_names]

        span = (n_steps_input + n_steps_output - 1) * dt_stride + 1
        self._windows = []
        for info in self.infos:
            w = info.n_steps - span + 1
            if w < 1:
                raise WellFormatError(
                    info.path,
                    f"{info.n_steps} time steps cannot hold {n_steps_input} input + "
                    f"{n_steps_output} output steps at stride {dt_stride}",
                )
            self._windows.append(w)
        self._offsets = [0]
        for info, w in zip(self.infos, self._windows):
            self._offsets.append(self._offsets[-1] + info.n_trajectories * w)
        if self._offsets[-1] == 0:
            raise ValueError(f"{self.root}: no samples; its file(s) {[str(p) for p in self.files]} hold 0 trajectories")
        self._snap_offsets = [0]
        for info in self.infos:
            self._snap_offsets.append(self._snap_offsets[-1] + info.n_trajectories * info.n_steps)

        if in_memory is None:
            nbytes = sum(int(np.prod(fi.shape)) * 4 for per in self._field_infos for fi in per)
            in_memory = nbytes < 2 * 2**30
        self.in_memory = in_memory
        self._arrays = [self._load(i) for i in range(len(self.files))] if in_memory else None
        self._handles: dict[int, object] = {}
        self._handles_pid = None

        self.normalization = self._resolve_normalization(normalization)

    # -- construction helpers

    def _load(self, i: int) -> dict[str, np.ndarray]:
        out = {}
        with _open(self.files[i]) as f:
            for fi in self._field_infos[i]:
                try:
                    out[fi.name] = np.asarray(f[fi.group][fi.name][()], dtype=np.float32)
                except OSError as err:
                    raise WellFormatError(self.files[i], f"reading {fi.group}/{fi.name} failed: {err}") from err
        return out

    def _train_files(self) -> list[Path]:
        if self.split is not None:
            return find_well_files(self.root, "train")
        here = self.root if self.root.is_dir() else self.root.parent
        if here.name == "train":  # a file or folder inside train/: all of train/, as for its siblings
            return find_well_files(here)
        sibling = here.parent / "train"
        if here.name in SPLITS and sibling.is_dir():
            return find_well_files(sibling)
        raise ValueError(
            f"normalization='train': cannot find the training split for {self.root}; pass split=... with a "
            "data set root, or a Normalization computed with Normalization.compute(train_files)"
        )

    def _resolve_normalization(self, normalization) -> Normalization | None:
        if normalization is None:
            return None
        if isinstance(normalization, str):
            if normalization != "train":
                raise ValueError(
                    f"normalization must be None, 'train', a Normalization or a dict, got {normalization!r}"
                )
            normalization = Normalization.compute(self._train_files(), self.fields)
        elif isinstance(normalization, Mapping):
            normalization = Normalization.from_dict(normalization)
        elif not isinstance(normalization, Normalization):
            raise TypeError(f"normalization: unsupported type {type(normalization).__name__}")
        return normalization.select(self.channel_names)

    # -- reading

    def _source(self, file_idx: int, fi: FieldInfo):
        if self._arrays is not None:
            return self._arrays[file_idx][fi.name]
        if self._handles_pid != os.getpid():  # h5py handles do not survive fork: reopen per worker
            self._handles, self._handles_pid = {}, os.getpid()
        if file_idx not in self._handles:
            self._handles[file_idx] = _open(self.files[file_idx])
        return self._handles[file_idx][fi.group][fi.name]

    def _frames(self, file_idx: int, traj: int, start: int, count: int, stride: int) -> torch.Tensor:
        """Frames start, start + stride, ... (count of them) of one trajectory: (count, C, *S)."""
        parts = []
        spatial = self.spatial_shape
        for fi in self._field_infos[file_idx]:
            index = ((traj,) if fi.sample_varying else ()) + (
                (slice(start, start + (count - 1) * stride + 1, stride),) if fi.time_varying else ()
            )
            try:
                arr = np.asarray(self._source(file_idx, fi)[index] if index else self._source(file_idx, fi)[()])
            except OSError as err:
                raise WellFormatError(self.files[file_idx], f"reading {fi.group}/{fi.name} failed: {err}") from err
            if not fi.time_varying:
                arr = arr[None]
            n_comp = len(fi.components)
            # (t, grid axes that vary, components...) -> (t, *S with 1 where not varying, n_comp)
            kept = [s if v else 1 for s, v in zip(spatial, fi.dim_varying)]
            arr = arr.reshape(arr.shape[0], *kept, n_comp)
            arr = np.broadcast_to(arr, (count, *spatial, n_comp))
            parts.append(torch.from_numpy(np.array(np.moveaxis(arr, -1, 1), dtype=np.float32, order="C")))
        return torch.cat(parts, dim=1).to(self.dtype)

    def __len__(self) -> int:
        return self._offsets[-1]

    def locate(self, index: int) -> tuple[int, int, int]:
        """(file index, trajectory, first time step) of sample ``index``."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        f = bisect.bisect_right(self._offsets, index) - 1
        traj, start = divmod(index - self._offsets[f], self._windows[f])
        return f, traj, start

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        f, traj, start = self.locate(index)
        n_in, n_out = self.n_steps_input, self.n_steps_output
        frames = self._frames(f, traj, start, n_in + n_out, self.dt_stride)
        if self.normalization is not None:
            frames = self.normalization.normalize(frames, channel_dim=1)
        x = frames[:n_in].reshape(n_in * frames.shape[1], *self.spatial_shape)
        y = frames[n_in:].reshape(n_out * frames.shape[1], *self.spatial_shape)
        return x, y

    # -- single snapshots (super-resolution and other frame-wise tasks)

    @property
    def n_snapshots(self) -> int:
        """Every stored frame of every trajectory of every file."""
        return self._snap_offsets[-1]

    def snapshot(self, index: int) -> torch.Tensor:
        """Frame ``index`` of all frames (file-major, then trajectory, then time): (C, *S), normalised."""
        if index < 0:
            index += self.n_snapshots
        if not 0 <= index < self.n_snapshots:
            raise IndexError(f"snapshot {index} out of range for {self.n_snapshots}")
        f = bisect.bisect_right(self._snap_offsets, index) - 1
        traj, t = divmod(index - self._snap_offsets[f], self.infos[f].n_steps)
        frame = self._frames(f, traj, t, 1, 1)
        if self.normalization is not None:
            frame = self.normalization.normalize(frame, channel_dim=1)
        return frame[0]

    def denormalize(self, t: torch.Tensor, channel_dim: int = -3) -> torch.Tensor:
        """Back to physical units (identity without normalisation); channels as in x or y."""
        return t if self.normalization is None else self.normalization.denormalize(t, channel_dim)

    def __del__(self) -> None:
        for h in getattr(self, "_handles", {}).values():
            try:
                h.close()
            except Exception:  # noqa: BLE001 (interpreter shutdown)
                pass

    def __getstate__(self):  # open h5py handles cannot be pickled (DataLoader workers with spawn)
        state = self.__dict__.copy()
        state["_handles"], state["_handles_pid"] = {}, None
        return state

    def __repr__(self) -> str:
        return (
            f"WellDataset({len(self)} samples from {len(self.files)} file(s), fields={self.fields}, "
            f"channels={self.channel_names}, grid={self.spatial_shape}, in={self.n_steps_input}, "
            f"out={self.n_steps_output}, normalized={self.normalization is not None})"
        )


def save_normalization(norm: Normalization, path) -> None:
    """Write a Normalization as JSON (atomic)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(norm.to_dict(), indent=2))
    os.replace(tmp, path)


def load_normalization(path) -> Normalization:
    return Normalization.from_dict(json.loads(Path(path).read_text()))
