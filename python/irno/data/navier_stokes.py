"""2-D incompressible Navier-Stokes (vorticity form) with Kolmogorov forcing, and its data set.

The equation on the periodic square [0, 2 pi)^2, for the vorticity w = dv/dx - du/dy:

    dw/dt + u . grad(w) = nu * lap(w) - mu * w + f,     f(x, y) = -A cos(n y)
    lap(psi) = -w,   u = d(psi)/dy,   v = -d(psi)/dx    (so div(u, v) = 0 exactly)

f is the curl of the body force (A/n sin(n y), 0); mu is a linear drag that removes the energy the
inverse cascade would otherwise pile up at the largest scales.

Numerics: pseudo-spectral on an N x N grid (rfft2, norm="forward", so a Fourier coefficient does
not depend on N), the 2/3 rule on the nonlinear term, and integrating-factor RK4 (Lawson): the
linear part -nu |k|^2 - mu is integrated exactly, so a lone Fourier mode decays as
exp(-(nu |k|^2 + mu) t) to round-off whatever the step. Float64 throughout; the output is
spectrally truncated to the requested resolution and cast at the end.

Array layout: field[..., i, j] = w(x_i, y_j), x_i = 2 pi i / N along dim -2, y along dim -1. The
forcing varies along the last axis. The Well files store the same (trajectory, time, x, y) order.

Calibration (DESIGN.md section 8): nu = 1e-3, A = 4, n = 4, mu = 0.1, dt = 0.01, 15 time units
of spin-up, snapshots every 0.08 time units. The task built on top is next-step prediction: the
last ``n_steps_input`` frames in, the next ``n_steps_output`` frames out (irno.data.well).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from irno.checkpoint import default_mode

DATASET_NAME = "navier_stokes_kolmogorov_2d"
FIELD_NAME = "vorticity"
SPLITS = ("train", "valid", "test")
# Bump when the generator changes in a way that changes its output for the same config: cached
# data sets made by an older generator are then regenerated instead of silently reused.
GENERATOR_VERSION = 2  # 2: the 2/3 rule keeps |k| < n/3 (was <=: aliasing when n is a multiple of 3)


@dataclass(frozen=True)
class NavierStokesConfig:
    """Everything that determines the generated data (the cache key is a hash of these fields).

    resolution: output grid (resolution x resolution); the simulation is truncated to it spectrally.
    sim_resolution: simulation grid; must be >= resolution.
    viscosity, drag: nu and mu of the module docstring.
    forcing_amplitude, forcing_wavenumber: A and n, f = -A cos(n y).
    dt: time step; snapshot_interval and spinup_time must be multiples of it.
    spinup_time: time simulated from the random initial field before the first saved frame.
    n_frames: saved frames per trajectory (n_frames - n_in - n_out + 1 next-step pairs each).
    n_train, n_valid, n_test: trajectories per split; the splits never share a trajectory.
    ic_alpha, ic_tau, ic_std: the initial field is a Gaussian random field with power spectrum
        (|k|^2 + tau^2)^-alpha, scaled to standard deviation ic_std.
    seed: trajectory i of the whole set (train, then valid, then test) draws its initial field
        from a generator seeded with (seed, i), so adding trajectories leaves the others unchanged.

    The defaults are DESIGN.md section 8's data, simulated at 64^2: 40 + 5 + 5 trajectories of
    44 frames, i.e. 1,600 training pairs and 200 validation and 200 test pairs with 4 frames in and 1 out.
    """

    resolution: int = 64
    sim_resolution: int = 64
    viscosity: float = 1e-3
    drag: float = 0.1
    forcing_amplitude: float = 4.0
    forcing_wavenumber: int = 4
    dt: float = 0.01
    spinup_time: float = 15.0
    snapshot_interval: float = 0.08
    n_frames: int = 44
    n_train: int = 40
    n_valid: int = 5
    n_test: int = 5
    ic_alpha: float = 2.5
    ic_tau: float = 7.0
    ic_std: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Canonical types, so that equal configs hash equally (4 and 4.0 give one cache key).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or int(value) != value):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            object.__setattr__(self, f.name, int(value) if f.type == "int" else float(value))
        if self.resolution < 4 or self.resolution % 2:
            raise ValueError(f"resolution must be even and >= 4, got {self.resolution}")
        if self.sim_resolution < self.resolution or self.sim_resolution % 2:
            raise ValueError(
                f"sim_resolution must be even and >= resolution ({self.resolution}), got {self.sim_resolution}"
            )
        if self.dt <= 0 or self.viscosity < 0 or self.drag < 0:
            raise ValueError("dt must be > 0; viscosity and drag must be >= 0")
        if not 0 < self.forcing_wavenumber < self.sim_resolution / 3:
            raise ValueError(f"forcing_wavenumber must be > 0 and below sim_resolution / 3 = "
                             f"{self.sim_resolution / 3:.4g} (the 2/3 rule removes higher modes, the forcing "
                             f"with them), got {self.forcing_wavenumber}")
        self.steps_per_snapshot  # noqa: B018  (validates the multiples)
        self.spinup_steps  # noqa: B018
        if self.n_frames < 1 or min(self.n_train, self.n_valid, self.n_test) < 0:
            raise ValueError("n_frames must be >= 1 and the split sizes >= 0")

    @property
    def steps_per_snapshot(self) -> int:
        return _whole_steps(self.snapshot_interval, self.dt, "snapshot_interval", minimum=1)

    @property
    def spinup_steps(self) -> int:
        return _whole_steps(self.spinup_time, self.dt, "spinup_time", minimum=0)

    @property
    def n_trajectories(self) -> int:
        return self.n_train + self.n_valid + self.n_test

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Short stable hash of the config and the generator version: the cache folder's name."""
        payload = json.dumps({"generator": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _whole_steps(duration: float, dt: float, name: str, minimum: int) -> int:
    steps = round(duration / dt)
    if steps < minimum or not math.isclose(steps * dt, duration, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"{name} ({duration}) must be a whole multiple (>= {minimum}) of dt ({dt})")
    return steps


class VorticitySolver:
    """Pseudo-spectral solver on an n x n periodic grid; states are rfft2 spectra (norm="forward").

    A state has shape (..., n, n // 2 + 1), complex128. Use ``to_spectral`` / ``to_physical`` to
    convert from / to (..., n, n) real fields.
    """

    def __init__(
        self,
        n: int,
        viscosity: float,
        drag: float = 0.0,
        forcing_amplitude: float = 0.0,
        forcing_wavenumber: int = 4,
        dt: float = 0.01,
        device: torch.device | str | None = None,
    ) -> None:
        if n < 4 or n % 2:
            raise ValueError(f"grid size must be even and >= 4, got {n}")
        self.n, self.dt = n, dt
        dev = torch.device(device) if device is not None else torch.device("cpu")
        f64 = torch.float64
        kx = (torch.fft.fftfreq(n, d=1.0 / n, dtype=f64, device=dev))[:, None]  # along x (dim -2)
        ky = (torch.fft.rfftfreq(n, d=1.0 / n, dtype=f64, device=dev))[None, :]  # along y (dim -1)
        k2 = kx**2 + ky**2
        c128 = torch.complex128
        self.ikx = (1j * kx).to(c128)
        self.iky = (1j * ky).to(c128)
        self.inv_lap = torch.where(k2 > 0, 1.0 / k2.clamp_min(1e-30), torch.zeros_like(k2))
        # 2/3 rule: keep |k| < n/3, so that the product of two kept modes (|k| < 2n/3) aliases only onto
        # modes that are then zeroed (with <= and n a multiple of 3, 2(n/3) aliased onto the kept -n/3)
        self.dealias = ((kx.abs() < n / 3) & (ky.abs() < n / 3)).to(f64)
        self.linear = -viscosity * k2 - drag
        e_half = torch.exp(self.linear * dt / 2).to(c128)
        e_full = e_half**2
        y = torch.arange(n, dtype=f64, device=dev) * (2 * math.pi / n)
        forcing = (-forcing_amplitude * torch.cos(forcing_wavenumber * y)).expand(n, n)
        self.forcing_hat = self.to_spectral(forcing) * self.dealias
        # Precomputed factors so that a step is a few fused elementwise ops around the FFTs (the
        # grids are small: elementwise passes cost as much as the FFTs). dt is folded in.
        psi = self.inv_lap.to(c128)
        ones = torch.ones_like(psi)
        self._to_products = torch.stack((self.iky * psi, -self.ikx * psi, self.ikx * ones, self.iky * ones))
        self._dt_forcing = (dt * self.forcing_hat).to(c128)
        self._dt_neg_dealias = (-dt * self.dealias).to(c128)
        self._e_half, self._e_full = e_half, e_full
        self._e_half_2 = e_half / 2
        self._e_half_3 = e_half / 3
        self._e_full_6 = e_full / 6
        self._ws_key, self._ws = None, {}

    def to_spectral(self, w: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(w.to(torch.float64), norm="forward")

    def to_physical(self, w_hat: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Real field on a size x size grid (default n): spectral truncation, Nyquist modes dropped."""
        m = self.n if size is None else size
        if m == self.n:
            return torch.fft.irfft2(w_hat, s=(m, m), norm="forward")
        if m > self.n or m % 2:
            raise ValueError(f"output size must be even and <= {self.n}, got {m}")
        h = m // 2
        out = w_hat.new_zeros(*w_hat.shape[:-2], m, h + 1)
        out[..., :h, :h] = w_hat[..., :h, :h]
        out[..., h + 1 :, :h] = w_hat[..., -(h - 1) :, :h]
        return torch.fft.irfft2(out, s=(m, m), norm="forward")

    def velocity(self, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical (u, v) of a vorticity spectrum: u = d(psi)/dy, v = -d(psi)/dx, lap(psi) = -w."""
        psi_hat = w_hat * self.inv_lap
        u = torch.fft.irfft2(self.iky * psi_hat, s=(self.n, self.n), norm="forward")
        v = torch.fft.irfft2(-self.ikx * psi_hat, s=(self.n, self.n), norm="forward")
        return u, v

    def tendency(self, w_hat: torch.Tensor) -> torch.Tensor:
        """Spectrum of -u . grad(w) (de-aliased) + f: everything but the linear part."""
        out = torch.empty_like(w_hat)
        self._dt_tendency(w_hat, out, self._workspace(w_hat))
        return out / self.dt

    def step(self, w_hat: torch.Tensor) -> torch.Tensor:
        """One integrating-factor RK4 step; returns a new state (``step_`` updates in place)."""
        return self.step_(w_hat.clone())

    def step_(self, w_hat: torch.Tensor) -> torch.Tensor:
        """One integrating-factor RK4 (Lawson) step of size dt, in place; E = exp(L dt / 2):

        k1 = dt N(w);  k2 = dt N(E (w + k1/2));  k3 = dt N(E w + k2/2);  k4 = dt N(E^2 w + E k3)
        w' = E^2 w + (E^2 k1 + 2 E (k2 + k3) + k4) / 6

        Every intermediate lives in a reused workspace: fresh ~1 MB temporaries per op made glibc
        map and unmap memory every step, and much of the run went to page faults.
        """
        ws = self._workspace(w_hat)
        half_w, full_w, stage = ws["half_w"], ws["full_w"], ws["stage"]
        k1, k2, k3, k4 = ws["k1"], ws["k2"], ws["k3"], ws["k4"]
        torch.mul(self._e_half, w_hat, out=half_w)
        torch.mul(self._e_full, w_hat, out=full_w)
        self._dt_tendency(w_hat, k1, ws)
        self._dt_tendency(torch.addcmul(half_w, self._e_half_2, k1, out=stage), k2, ws)
        self._dt_tendency(torch.add(half_w, k2, alpha=0.5, out=stage), k3, ws)
        self._dt_tendency(torch.addcmul(full_w, self._e_half, k3, out=stage), k4, ws)
        torch.addcmul(full_w, self._e_full_6, k1, out=w_hat)
        w_hat.addcmul_(self._e_half_3, k2.add_(k3))
        return w_hat.add_(k4, alpha=1.0 / 6.0)

    def _dt_tendency(self, w_hat: torch.Tensor, out: torch.Tensor, ws: dict) -> None:
        """out = dt * tendency(w_hat)."""
        n = self.n
        factors = self._to_products.view(4, *([1] * (w_hat.dim() - 2)), n, n // 2 + 1)
        # One batched inverse FFT for u, v, dw/dx, dw/dy.
        torch.mul(factors, w_hat, out=ws["spectra"])
        torch.fft.irfft2(ws["spectra"], s=(n, n), norm="forward", out=ws["fields"])
        u, v, wx, wy = ws["fields"].unbind(0)
        product = torch.mul(u, wx, out=ws["product"]).addcmul_(v, wy)
        torch.fft.rfft2(product, norm="forward", out=ws["advection"])
        torch.addcmul(self._dt_forcing, ws["advection"], self._dt_neg_dealias, out=out)

    def _workspace(self, w_hat: torch.Tensor) -> dict:
        key = (tuple(w_hat.shape), w_hat.device)
        if self._ws_key != key:
            n, lead = self.n, tuple(w_hat.shape[:-2])
            spec = dict(dtype=torch.complex128, device=w_hat.device)
            real = dict(dtype=torch.float64, device=w_hat.device)
            self._ws = {name: torch.empty_like(w_hat) for name in ("half_w", "full_w", "stage", "k1", "k2", "k3", "k4")}
            self._ws["spectra"] = torch.empty(4, *w_hat.shape, **spec)
            self._ws["fields"] = torch.empty(4, *lead, n, n, **real)
            self._ws["product"] = torch.empty(*lead, n, n, **real)
            self._ws["advection"] = torch.empty(*w_hat.shape, **spec)
            self._ws_key = key
        return self._ws


def random_initial_vorticity(config: NavierStokesConfig, indices, device=None) -> torch.Tensor:
    """Smooth Gaussian random fields (len(indices), n, n), float64, one seeded draw per index."""
    n = config.sim_resolution
    kx = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)[:, None]
    ky = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64)[None, :]
    amplitude = (kx**2 + ky**2 + config.ic_tau**2) ** (-config.ic_alpha / 2)
    amplitude[0, 0] = 0.0  # zero mean: the mean vorticity of a periodic flow is 0
    fields = []
    for i in indices:
        seed = int(np.random.SeedSequence([config.seed, int(i)]).generate_state(1, dtype=np.uint64)[0])
        gen = torch.Generator().manual_seed(seed % (2**63))
        noise = torch.complex(
            torch.randn(n, n // 2 + 1, generator=gen, dtype=torch.float64),
            torch.randn(n, n // 2 + 1, generator=gen, dtype=torch.float64),
        )
        w = torch.fft.irfft2(noise * amplitude, s=(n, n), norm="forward")
        fields.append(w * (config.ic_std / w.std()))
    return torch.stack(fields).to(device)


def simulate(
    config: NavierStokesConfig = NavierStokesConfig(),
    trajectories=None,
    initial: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    batch_size: int = 4,
    num_threads: int | None = 1,
) -> torch.Tensor:
    """Simulate trajectories; returns (n_traj, config.n_frames, resolution, resolution).

    trajectories: indices of the trajectories to draw initial fields for (default: all
        config.n_trajectories of them, train then valid then test). Ignored when ``initial`` is given.
    initial: optional initial vorticity (n_traj, sim_resolution, sim_resolution), used instead of
        random fields (the solver checks start from a known field this way).
    Frame 0 is the state after config.spinup_time; frame k is config.snapshot_interval * k later.
    batch_size: trajectories advanced together (memory and speed only; results are identical).
    num_threads: torch's intra-op threads while simulating (restored afterwards); None keeps the
        current setting. One thread is the fast choice here: each op touches ~10^5 numbers, too
        few to split, and on a shared 2-core machine two threads ran the steps ~20x slower.
    A tqdm bar counts time steps when ``progress``.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _simulate(config, trajectories, initial, device, dtype, progress, batch_size)
    finally:
        torch.set_num_threads(previous_threads)


def _simulate(config, trajectories, initial, device, dtype, progress, batch_size) -> torch.Tensor:
    solver = VorticitySolver(
        config.sim_resolution,
        config.viscosity,
        config.drag,
        config.forcing_amplitude,
        config.forcing_wavenumber,
        config.dt,
        device,
    )
    if initial is None:
        idx = range(config.n_trajectories) if trajectories is None else list(trajectories)
        w0 = random_initial_vorticity(config, idx, device=device)
    else:
        n = config.sim_resolution
        if initial.dim() != 3 or tuple(initial.shape[1:]) != (n, n):
            raise ValueError(f"initial must have shape (n_traj, {n}, {n}), got {tuple(initial.shape)}")
        w0 = initial.to(device=device, dtype=torch.float64)
    every, spin = config.steps_per_snapshot, config.spinup_steps
    frames = torch.empty(
        w0.shape[0], config.n_frames, config.resolution, config.resolution, dtype=dtype, device=w0.device
    )
    # Trajectories run in chunks: a chunk's working set stays in cache (the grids are small, the
    # steps memory-bound), and the result does not depend on the chunk size.
    batch_size = max(1, int(batch_size))
    chunks = list(range(0, w0.shape[0], batch_size))
    total = (spin + (config.n_frames - 1) * every) * len(chunks)
    quiet = None if progress else True  # None: tqdm stays silent when stderr is not a terminal
    with torch.no_grad(), tqdm(total=total, disable=quiet, desc="navier-stokes", unit="step") as bar:
        for start in chunks:
            sl = slice(start, start + batch_size)
            w_hat = solver.to_spectral(w0[sl]) * solver.dealias
            for _ in range(spin):
                solver.step_(w_hat)
                bar.update(1)
            for f in range(config.n_frames):
                if f > 0:
                    for _ in range(every):
                        solver.step_(w_hat)
                    bar.update(every)
                frames[sl, f] = solver.to_physical(w_hat, config.resolution).to(dtype)
                if not torch.isfinite(frames[sl, f]).all():
                    raise FloatingPointError(f"the simulation blew up before frame {f}; reduce dt")
    return frames


def snapshot_statistics(frames: torch.Tensor) -> dict:
    """How much the field moves per snapshot, for frames (n_traj, n_frames, H, W).

    std_change: mean over pairs of std(w_{t+1} - w_t) / std(w_t) (DESIGN.md 8: about 0.29).
    copy_last_vrmse: mean over pairs of The Well's VRMSE of the prediction w_{t+1} = w_t,
        sqrt(mean((w_t - w_{t+1})^2) / (var(w_{t+1}) + 1e-7)), var Bessel-corrected.
    field_std: mean standard deviation of a frame.
    """
    a, b = frames[:, :-1].double(), frames[:, 1:].double()
    dims = (-2, -1)
    std_change = ((b - a).std(dim=dims) / a.std(dim=dims)).mean()
    vrmse = (((a - b) ** 2).mean(dim=dims) / (b.var(dim=dims) + 1e-7)).sqrt().mean()
    return {
        "std_change": float(std_change),
        "copy_last_vrmse": float(vrmse),
        "field_std": float(frames.double().std(dim=dims).mean()),
    }


def write_navier_stokes(
    out_dir, config: NavierStokesConfig = NavierStokesConfig(), progress: bool = True, device=None
) -> dict:
    """Simulate every split and write The Well's folder layout under out_dir.

    out_dir/data/{train,valid,test}/navier_stokes_kolmogorov_2d.hdf5 (a split with no trajectories
    is not written) and out_dir/config.json. Returns {split: path}.
    """
    from .well import write_well_file

    out_dir = Path(out_dir)
    frames = simulate(config, device=device, progress=progress).cpu().numpy()
    n = config.resolution
    coords = np.arange(n, dtype=np.float32) * np.float32(2 * np.pi / n)
    times = config.spinup_time + config.snapshot_interval * np.arange(config.n_frames)
    bounds = np.cumsum([0, config.n_train, config.n_valid, config.n_test])
    params = {
        "nu": config.viscosity,
        "drag": config.drag,
        "forcing_amplitude": config.forcing_amplitude,
        "forcing_wavenumber": config.forcing_wavenumber,
        "dt": config.dt,
        "snapshot_interval": config.snapshot_interval,
        "sim_resolution": config.sim_resolution,
        "seed": config.seed,
    }
    paths = {}
    for s, split in enumerate(SPLITS):
        part = frames[bounds[s] : bounds[s + 1]]
        if len(part) == 0:
            continue
        path = out_dir / "data" / split / f"{DATASET_NAME}.hdf5"
        write_well_file(
            path,
            dataset_name=DATASET_NAME,
            time=times,
            coords={"x": coords, "y": coords},
            t0_fields={FIELD_NAME: part},
            simulation_parameters=params,
            boundary_conditions={"x_periodic": ("periodic", ["x"]), "y_periodic": ("periodic", ["y"])},
        )
        paths[split] = path
    _write_json_atomic(out_dir / "config.json", {"generator": GENERATOR_VERSION, **config.to_dict()})
    return paths


def ensure_navier_stokes(root, config: NavierStokesConfig = NavierStokesConfig(), progress: bool = True) -> Path:
    """Generate the data set once into root/<config.key()>/ and reuse it afterwards.

    The folder is built under a temporary name in root and renamed into place when complete, so
    an interrupted run never leaves a half-written data set behind. Generation holds an exclusive
    lock on the root folder (fcntl.flock, released however the process ends) and checks the cache
    again under it, so two processes racing on the same config generate once and a complete data
    set is never removed (only an incomplete one is rebuilt); different configs in one root are
    generated one after the other. Any changed config field (or GENERATOR_VERSION) gives another
    key, hence a fresh data set. Returns the data set folder (pass it to WellDataset with a split,
    e.g. WellDataset(path, split="train")).
    """
    root = Path(root)
    target = root / config.key()
    if _is_complete(target, config):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if _is_complete(target, config):  # another process finished it while we waited
            return target
        if target.exists():  # incomplete or foreign leftovers under our key: rebuild
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{config.key()}-", dir=root))
        try:
            os.chmod(tmp, default_mode(folder=True))  # mkdtemp's folder is private; the data set is not
            write_navier_stokes(tmp, config, progress=progress)
            try:
                os.replace(tmp, target)
            except OSError:
                if not _is_complete(target, config):  # a process without the lock renamed its copy first
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive advisory lock on ``folder`` itself (no lock file is left behind); waits for
    a holder in another process. None on Windows or on a file system without flock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. a network file system without flock: go on unlocked
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def navier_stokes_datasets(
    root,
    config: NavierStokesConfig = NavierStokesConfig(),
    n_steps_input: int = 4,
    n_steps_output: int = 1,
    normalization="train",
    progress: bool = True,
) -> dict:
    """{split: WellDataset} of the (cached) data set; normalised with the training split's statistics."""
    from .well import WellDataset

    folder = ensure_navier_stokes(root, config, progress=progress)
    sizes = {"train": config.n_train, "valid": config.n_valid, "test": config.n_test}
    return {
        s: WellDataset(folder, n_steps_input, n_steps_output, normalization=normalization, split=s)
        for s in SPLITS
        if sizes[s] > 0
    }


def _is_complete(folder: Path, config: NavierStokesConfig) -> bool:
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if saved != {"generator": GENERATOR_VERSION, **config.to_dict()}:
        return False
    sizes = {"train": config.n_train, "valid": config.n_valid, "test": config.n_test}
    return all((folder / "data" / s / f"{DATASET_NAME}.hdf5").is_file() for s in SPLITS if sizes[s] > 0)


def _write_json_atomic(path: Path, obj) -> None:
    from irno.checkpoint import atomic_write_text  # temporary file, fsync, rename; removed on error

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))
