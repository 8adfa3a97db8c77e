"""irno.data: the Navier-Stokes generator, The Well's HDF5 layout, the loaders and the cache."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

h5py = pytest.importorskip("h5py")

from irno.data import (  # noqa: E402
    NavierStokesConfig,
    Normalization,
    SuperResolutionDataset,
    VorticitySolver,
    WellDataset,
    WellFormatError,
    downsample,
    ensure_navier_stokes,
    inspect_well_file,
    read_well_file,
    simulate,
    snapshot_statistics,
    write_well_file,
)
from irno.data import navier_stokes as ns  # noqa: E402

TINY = NavierStokesConfig(
    resolution=16,
    sim_resolution=32,
    spinup_time=0.2,
    snapshot_interval=0.04,
    n_frames=6,
    n_train=2,
    n_valid=1,
    n_test=1,
)


def grid(n):
    return torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)


# ---------------------------------------------------------------------------------------------
# Solver


@pytest.mark.parametrize("drag", [0.0, 0.1])
def test_single_fourier_mode_decays_exactly(drag):
    # A lone mode has no nonlinear interaction (u is perpendicular to grad w), so the integrating
    # factor makes the decay exp(-(nu |k|^2 + mu) t) exact up to round-off, whatever dt.
    n, nu, kx, ky = 16, 0.02, 2, 3
    cfg = NavierStokesConfig(
        resolution=n,
        sim_resolution=n,
        viscosity=nu,
        drag=drag,
        forcing_amplitude=0.0,
        dt=0.05,
        spinup_time=0.0,
        snapshot_interval=0.5,
        n_frames=5,
    )
    x, y = torch.meshgrid(grid(n), grid(n), indexing="ij")
    w0 = 3.0 * torch.cos(kx * x + ky * y) + 0.0
    frames = simulate(cfg, initial=w0[None], dtype=torch.float64, progress=False)
    for f in range(cfg.n_frames):
        t = f * cfg.snapshot_interval
        expected = w0 * math.exp(-(nu * (kx**2 + ky**2) + drag) * t)
        torch.testing.assert_close(frames[0, f], expected, rtol=0, atol=1e-12)


def test_velocity_is_divergence_free_and_its_curl_is_the_vorticity():
    n = 32
    solver = VorticitySolver(n, viscosity=1e-3)
    w0 = ns.random_initial_vorticity(NavierStokesConfig(sim_resolution=n, resolution=n), [0, 1])
    w_hat = solver.to_spectral(w0) * solver.dealias  # the solver's states are de-aliased
    w = solver.to_physical(w_hat)
    u, v = solver.velocity(w_hat)
    u_hat, v_hat = solver.to_spectral(u), solver.to_spectral(v)
    div = solver.to_physical(solver.ikx * u_hat + solver.iky * v_hat)
    curl = solver.to_physical(solver.ikx * v_hat - solver.iky * u_hat)
    assert div.abs().max() < 1e-12 * w.abs().max()
    torch.testing.assert_close(curl, w - w.mean(dim=(-2, -1), keepdim=True), rtol=0, atol=1e-12)
    # the forcing -A cos(n y) varies along the last axis only
    assert torch.allclose(
        solver.to_physical(solver.forcing_hat)[:, 5],
        torch.zeros(n, dtype=torch.float64) + solver.to_physical(solver.forcing_hat)[0, 5],
    )


def test_spectral_truncation_samples_a_resolved_field_on_the_coarse_grid():
    solver = VorticitySolver(32, viscosity=1e-3)
    x, y = torch.meshgrid(grid(32), grid(32), indexing="ij")
    xc, yc = torch.meshgrid(grid(16), grid(16), indexing="ij")
    w_hat = solver.to_spectral(torch.cos(2 * x + 3 * y) + 0.5 * torch.sin(5 * x - 7 * y))
    torch.testing.assert_close(
        solver.to_physical(w_hat, 16), torch.cos(2 * xc + 3 * yc) + 0.5 * torch.sin(5 * xc - 7 * yc), rtol=0, atol=1e-12
    )


def test_simulation_is_seeded_and_chunk_independent():
    a = simulate(TINY, progress=False)
    b = simulate(TINY, progress=False, batch_size=1)
    c = simulate(NavierStokesConfig(**{**TINY.to_dict(), "seed": 1}), progress=False)
    assert a.shape == (TINY.n_trajectories, TINY.n_frames, 16, 16) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # trajectories differ from each other
    # trajectory i depends on (seed, i) only
    torch.testing.assert_close(simulate(TINY, trajectories=[2], progress=False)[0], a[2], rtol=0, atol=1e-6)


def test_config_checks_and_key():
    with pytest.raises(ValueError, match="multiple"):
        NavierStokesConfig(snapshot_interval=0.015)
    with pytest.raises(ValueError, match="sim_resolution"):
        NavierStokesConfig(resolution=64, sim_resolution=32)
    assert NavierStokesConfig().key() == NavierStokesConfig(forcing_amplitude=4, n_frames=44.0).key()
    with pytest.raises(ValueError, match="integer"):
        NavierStokesConfig(n_frames=4.5)
    assert NavierStokesConfig().key() != NavierStokesConfig(viscosity=2e-3).key()


def test_snapshot_statistics_by_hand():
    frames = torch.zeros(1, 3, 4, 4)
    frames[0, 0] = torch.arange(16.0).view(4, 4)
    frames[0, 1] = frames[0, 0]  # no change: 0
    frames[0, 2] = 2 * frames[0, 0]  # difference = w, std change 1
    s = snapshot_statistics(frames)
    assert s["std_change"] == pytest.approx(0.5)
    w = frames[0, 0].double()
    vrmse_2 = math.sqrt((w**2).mean() / (4 * w.var() + 1e-7))
    assert s["copy_last_vrmse"] == pytest.approx(vrmse_2 / 2)


# ---------------------------------------------------------------------------------------------
# HDF5 layout

D = {"x": np.linspace(0, 1, 8, endpoint=False), "y": np.linspace(0, 1, 4, endpoint=False)}


def coded_fields(n_traj=2, n_time=6):
    """Values that spell out where they came from: 1000 b + 100 f + t + 0.01 i (i the x index)."""
    b = np.arange(n_traj)[:, None, None, None]
    t = np.arange(n_time)[None, :, None, None]
    i = np.arange(8)[None, None, :, None] * 0.01
    base = 1000.0 * b + t + i + np.zeros((1, 1, 8, 4))

    t0 = {"density": base + 100, "pressure": base + 200}
    t1 = {"velocity": np.stack([base + 300, base + 400], axis=-1)}
    t2 = {"E": np.stack([np.stack([base + 500, base + 501], -1), np.stack([base + 510, base + 511], -1)], -2)}
    return t0, t1, t2


def write_coded(path, n_traj=2, n_time=6, with_t2=True):
    t0, t1, t2 = coded_fields(n_traj, n_time)
    return write_well_file(
        path,
        dataset_name="coded",
        time=np.arange(n_time) * 0.5,
        coords=D,
        t0_fields=t0,
        t1_fields=t1,
        t2_fields=t2 if with_t2 else None,
        simulation_parameters={"Re": 100.0},
        boundary_conditions={"x_periodic": ("periodic", ["x"]), "y_wall": ("wall", ["y"])},
    )


def test_layout_round_trip(tmp_path):
    path = write_coded(tmp_path / "a.hdf5")
    with h5py.File(path, "r") as f:
        assert f.attrs["dataset_name"] == "coded" and f.attrs["grid_type"] == "cartesian"
        assert f.attrs["n_spatial_dims"] == 2 and f.attrs["n_trajectories"] == 2
        assert list(f.attrs["simulation_parameters"]) == ["Re"] and f.attrs["Re"] == 100.0
        assert list(f["dimensions"].attrs["spatial_dims"]) == ["x", "y"]
        assert f["dimensions/time"].shape == (6,) and f["dimensions/x"].shape == (8,)
        for d in ("time", "x", "y"):
            assert "sample_varying" in f["dimensions"][d].attrs and "time_varying" in f["dimensions"][d].attrs
        bc = f["boundary_conditions/y_wall"]
        assert bc.attrs["bc_type"] == "wall" and list(bc.attrs["associated_dims"]) == ["y"]
        assert "associated_fields" in bc.attrs
        assert bc["mask"][()].tolist() == [True, False, False, True]
        assert list(f["t0_fields"].attrs["field_names"]) == ["density", "pressure"]
        assert list(f["t1_fields"].attrs["field_names"]) == ["velocity"]
        assert f["t1_fields/velocity"].shape == (2, 6, 8, 4, 2)
        assert f["t2_fields/E"].shape == (2, 6, 8, 4, 2, 2)
        for ds in (f["t0_fields/density"], f["t2_fields/E"]):
            assert ds.dtype == np.float32
            assert list(ds.attrs["dim_varying"]) == [True, True]
            assert ds.attrs["sample_varying"] and ds.attrs["time_varying"]
        assert list(f["scalars"].attrs["field_names"]) == ["Re"]
    back = read_well_file(path)
    t0, t1, t2 = coded_fields()
    np.testing.assert_allclose(back.fields["pressure"], t0["pressure"], rtol=1e-6)
    np.testing.assert_allclose(back.fields["velocity"], t1["velocity"], rtol=1e-6)
    np.testing.assert_allclose(back.fields["E"], t2["E"], rtol=1e-6)
    np.testing.assert_allclose(back.time, np.arange(6) * 0.5)
    info = back.info
    assert info.spatial_shape == (8, 4) and info.n_steps == 6 and info.dataset_name == "coded"
    assert info.boundary_conditions == {"x_periodic": "periodic", "y_wall": "wall"}
    assert info.field("E").channel_names == ["E_xx", "E_xy", "E_yx", "E_yy"]


def test_loader_shapes_and_channel_order(tmp_path):
    write_coded(tmp_path / "a.hdf5")
    ds = WellDataset(tmp_path / "a.hdf5", n_steps_input=2, n_steps_output=1)
    assert ds.channel_names == ["density", "pressure", "velocity_x", "velocity_y", "E_xx", "E_xy", "E_yx", "E_yy"]
    assert len(ds) == 2 * (6 - 3 + 1)
    x, y = ds[5]  # trajectory 1, first step 1
    assert x.shape == (2 * 8, 8, 4) and y.shape == (8, 8, 4)
    codes = [100, 200, 300, 400, 500, 501, 510, 511]
    expect_x = [1000 + t + c for t in (1, 2) for c in codes]  # time-major, fields within a frame
    expect_y = [1000 + 3 + c for c in codes]
    torch.testing.assert_close(x[:, 0, 0], torch.tensor(expect_x, dtype=torch.float32))
    torch.testing.assert_close(y[:, 0, 0], torch.tensor(expect_y, dtype=torch.float32))
    torch.testing.assert_close(x[0, :, 1] - x[0, 0, 1], torch.arange(8) * 0.01, atol=1e-4, rtol=0)  # dim 1 = x
    assert ds.locate(5) == (0, 1, 1)

    vel = WellDataset(tmp_path / "a.hdf5", n_steps_input=3, n_steps_output=2, fields=["velocity"])
    x, y = vel[0]
    assert x.shape == (6, 8, 4) and y.shape == (4, 8, 4)
    torch.testing.assert_close(y[:, 0, 0], torch.tensor([303.0, 403.0, 304.0, 404.0]))

    lazy = WellDataset(tmp_path / "a.hdf5", n_steps_input=2, n_steps_output=1, in_memory=False)
    for i in (0, 7):
        for a, b in zip(lazy[i], ds[i]):
            torch.testing.assert_close(a, b)
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert xb.shape == (3, 16, 8, 4) and yb.shape == (3, 8, 8, 4)
    assert ds.n_snapshots == 12 and ds.snapshot(7)[:, 0, 0].tolist()[0] == pytest.approx(1101.0)


def test_loader_reads_partially_varying_fields_like_the_wells(tmp_path):
    # Real Well files may hold fields constant over trajectories, time or some axes.
    path = write_coded(tmp_path / "a.hdf5", with_t2=False)
    with h5py.File(path, "a") as f:
        g = f["t0_fields"]
        ds = g.create_dataset("obstacle", data=np.arange(8, dtype=np.float32))  # varies along x only
        ds.attrs["dim_varying"] = np.array([True, False])
        ds.attrs["sample_varying"] = False
        ds.attrs["time_varying"] = False
        g.attrs["field_names"] = np.array(["density", "pressure", "obstacle"], dtype=h5py.string_dtype())
    ds = WellDataset(path, n_steps_input=1, n_steps_output=1)
    assert ds.fields == ["density", "pressure", "velocity"]  # constants are not prediction targets
    both = WellDataset(path, n_steps_input=1, n_steps_output=1, fields=["density", "obstacle"])
    x, _ = both[3]
    assert x.shape == (2, 8, 4)
    torch.testing.assert_close(x[1], torch.arange(8.0)[:, None].expand(8, 4))


def make_split(root, split, loc, scale, seed):
    rng = np.random.default_rng(seed)
    data = {"u": (loc + scale * rng.standard_normal((3, 5, 8, 4))).astype(np.float32)}
    write_well_file(
        root / "data" / split / f"{split}.hdf5", dataset_name="gauss", time=np.arange(5.0), coords=D, t0_fields=data
    )
    return data["u"]


def test_normalization_comes_from_the_training_split(tmp_path):
    train = make_split(tmp_path, "train", 5.0, 2.0, 0)
    valid = make_split(tmp_path, "valid", -3.0, 0.5, 1)
    ds = WellDataset(tmp_path, split="valid", n_steps_input=2, normalization="train")
    norm = ds.normalization
    assert norm.channel_names == ("u",)
    assert norm.mean[0] == pytest.approx(train.astype(np.float64).mean(), rel=1e-9)
    assert norm.std[0] == pytest.approx(train.astype(np.float64).std(), rel=1e-9)
    assert norm.source[0].endswith("train.hdf5")
    x, y = ds[0]
    expected = (torch.from_numpy(valid[0, :2]) - norm.mean[0]) / norm.std[0]
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(ds.denormalize(y), torch.from_numpy(valid[0, 2:3]), rtol=1e-5, atol=1e-5)
    # stored with a checkpoint as JSON and restored: same numbers, same samples
    restored = Normalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert restored == norm
    again = WellDataset(tmp_path / "data" / "valid", n_steps_input=2, normalization=restored.to_dict())
    torch.testing.assert_close(again[0][0], x)
    # the sibling-folder rule finds the same training split
    assert WellDataset(tmp_path / "data" / "valid", n_steps_input=2, normalization="train").normalization == norm
    # batched denormalisation: (B, n_out * C, H, W)
    torch.testing.assert_close(norm.denormalize(norm.normalize(torch.ones(2, 3, 8, 4))), torch.ones(2, 3, 8, 4))


def _break(kind, path):
    with h5py.File(path, "a") as f:
        if kind == "missing group":
            del f["t1_fields"]
        elif kind == "missing field_names":
            del f["t0_fields"].attrs["field_names"]
        elif kind == "listed field without data":
            del f["t0_fields/pressure"]
        elif kind == "inconsistent shape":
            del f["t0_fields/pressure"]
            f["t0_fields"].create_dataset("pressure", data=np.zeros((2, 5, 8, 4), np.float32))
        elif kind == "missing coordinate":
            del f["dimensions/y"]
        elif kind == "missing root attribute":
            del f.attrs["n_trajectories"]


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing group", "missing group 't1_fields/'"),
        ("missing field_names", "missing attribute 'field_names' on t0_fields/"),
        ("listed field without data", "lists 'pressure' but there is no dataset t0_fields/pressure"),
        ("inconsistent shape", r"t0_fields/pressure has shape \(2, 5, 8, 4\), expected \(2, 6, 8, 4\)"),
        ("missing coordinate", "missing dataset 'dimensions/y'"),
        ("missing root attribute", "missing attribute 'n_trajectories' on the root group"),
    ],
)
def test_malformed_files_name_the_file_and_the_problem(tmp_path, kind, message):
    path = write_coded(tmp_path / "bad.hdf5", with_t2=False)
    _break(kind, path)
    for load in (inspect_well_file, WellDataset):
        with pytest.raises(WellFormatError, match=message) as err:
            load(path)
        assert str(path) in str(err.value)


def test_truncated_and_non_hdf5_files(tmp_path):
    path = write_coded(tmp_path / "cut.hdf5", with_t2=False)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(WellFormatError, match="file is truncated") as err:
        WellDataset(path)
    assert str(path) in str(err.value)
    text = tmp_path / "notes.h5"
    text.write_text("not an HDF5 file\n")
    with pytest.raises(WellFormatError, match="not an HDF5 file") as err:
        inspect_well_file(text)
    assert str(text) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .hdf5 or .h5 files"):
        WellDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such file"):
        WellDataset(tmp_path / "missing.hdf5")


# ---------------------------------------------------------------------------------------------
# Cache


def test_ensure_generates_once_and_regenerates_on_a_changed_option(tmp_path, monkeypatch):
    calls = []
    real = ns.simulate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ns, "simulate", counting)
    cfg = NavierStokesConfig(**{**TINY.to_dict(), "n_frames": 5})
    first = ensure_navier_stokes(tmp_path, cfg, progress=False)
    train_file = first / "data" / "train" / "navier_stokes_kolmogorov_2d.hdf5"
    mtime = train_file.stat().st_mtime_ns
    assert first.name == cfg.key() and len(calls) == 1
    assert ensure_navier_stokes(tmp_path, cfg, progress=False) == first
    assert len(calls) == 1 and train_file.stat().st_mtime_ns == mtime
    other = ensure_navier_stokes(tmp_path, NavierStokesConfig(**{**cfg.to_dict(), "viscosity": 2e-3}), progress=False)
    assert other != first and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no temp leftovers
    for split, n_traj in (("train", 2), ("valid", 1), ("test", 1)):
        ds = WellDataset(first, split=split, normalization="train")
        assert len(ds) == n_traj * (5 - 4) and ds[0][0].shape == (4, 16, 16)
    # a damaged cache (config.json gone) is rebuilt, not trusted
    (first / "config.json").unlink()
    ensure_navier_stokes(tmp_path, cfg, progress=False)
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------
# Super-resolution


@pytest.mark.parametrize("scale", [4, 8])
def test_super_resolution_shapes(tmp_path, scale):
    hi = torch.randn(5, 2, 32, 64)
    x, y = SuperResolutionDataset(hi, scale=scale)[3]
    assert x.shape == (2, 32 // scale, 64 // scale) and torch.equal(y, hi[3])
    x, y = SuperResolutionDataset(hi[:, 0], scale=scale, boundary="periodic")[0]
    assert x.shape == (1, 32 // scale, 64 // scale)
    path = write_coded(tmp_path / "a.hdf5", with_t2=False)
    with pytest.raises(ValueError, match="divisible"):
        SuperResolutionDataset(WellDataset(path), scale=8)  # an 8 x 4 grid
    frames = SuperResolutionDataset(torch.randn(1, 1, 64, 64), scale=scale)
    assert len(frames) == 1


def test_super_resolution_from_well_frames(tmp_path):
    big = {"u": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    coords = {"x": np.arange(32.0), "y": np.arange(32.0)}
    write_well_file(tmp_path / "a.hdf5", dataset_name="big", time=np.arange(3.0), coords=coords, t0_fields=big)
    sr = SuperResolutionDataset(WellDataset(tmp_path / "a.hdf5", n_steps_input=1), scale=4)
    assert len(sr) == 6
    x, y = sr[4]  # trajectory 1, step 1
    torch.testing.assert_close(y[0], torch.from_numpy(big["u"][1, 1]))
    assert x.shape == (1, 8, 8)


def test_downsampling_is_antialiased():
    # Stripes at 20 cycles per 64 cells are far above the 16^2 grid's Nyquist frequency (8): a
    # low-pass downsampling removes them, plain bicubic sampling aliases them onto coarse scales.
    n = 64
    i = torch.arange(n, dtype=torch.float32)
    stripes = torch.cos(2 * math.pi * 20 * i / n)[:, None].expand(n, n)[None, None]
    aa = downsample(stripes, 4)
    plain = F.interpolate(stripes, size=(16, 16), mode="bicubic", antialias=False, align_corners=False)
    assert plain.std() > 0.3
    assert aa.std() < 0.1 * plain.std()
    assert downsample(stripes, 4, boundary="periodic").abs().max() < 0.01  # no edges: all gone
    torch.testing.assert_close(downsample(stripes, 4, antialias=False), plain)
    # a smooth field survives, a constant exactly
    smooth = torch.cos(2 * math.pi * i / n)[:, None].expand(n, n)
    coarse = downsample(smooth, 4, boundary="periodic")
    centres = 4 * torch.arange(16.0) + 1.5  # coarse cell centres in fine-grid coordinates
    torch.testing.assert_close(coarse, torch.cos(2 * math.pi * centres / n)[:, None].expand(16, 16), atol=1e-2, rtol=0)
    torch.testing.assert_close(downsample(torch.full((32, 32), 2.5), 8), torch.full((4, 4), 2.5))


def test_periodic_downsampling_commutes_with_shifts():
    y = torch.randn(2, 64, 64)
    for shift in (4, 12):
        rolled = downsample(torch.roll(y, shifts=(shift, -shift), dims=(-2, -1)), 4, boundary="periodic")
        torch.testing.assert_close(
            rolled, torch.roll(downsample(y, 4, boundary="periodic"), shifts=(shift // 4, -shift // 4), dims=(-2, -1))
        )
    with pytest.raises(ValueError, match="divisible"):
        downsample(y, 5)


def test_downsampling_per_dimension_boundaries():
    """A pair of boundaries treats each dim as its own: ("none", "periodic") wraps W only, so it
    commutes with shifts along W and matches the open downsampling along H (rows far from W's edges
    are the open result's too)."""
    y = torch.randn(2, 32, 64)
    mixed = downsample(y, 4, boundary=("none", "periodic"))
    torch.testing.assert_close(downsample(torch.roll(y, 8, dims=-1), 4, boundary=("none", "periodic")),
                               torch.roll(mixed, 2, dims=-1))
    assert not torch.allclose(downsample(torch.roll(y, 8, dims=-2), 4, boundary=("none", "periodic")),
                              torch.roll(mixed, 2, dims=-2), atol=1e-3)  # H is not wrapped
    open_ = downsample(y, 4)
    torch.testing.assert_close(mixed[..., 3:-3], open_[..., 3:-3])  # interior columns: the same
    assert not torch.allclose(mixed[..., 0], open_[..., 0], atol=1e-3)  # edge columns: wrapped
    both = downsample(y, 4, boundary=("periodic", "periodic"))
    torch.testing.assert_close(both, downsample(y, 4, boundary="periodic"))
    for bad in ("wrap", ("none",), ("none", "open"), ("periodic", "none", "none")):
        with pytest.raises(ValueError, match="boundary: expected"):
            downsample(y, 4, boundary=bad)
    with pytest.raises(ValueError, match="boundary: expected"):
        SuperResolutionDataset(y[:, None], scale=4, boundary="wrap")


def test_well_boundaries_come_from_its_boundary_conditions(tmp_path):
    """WellDataset.boundaries: 'periodic' on the dims a periodic condition names, 'none' elsewhere;
    the pipeline's super-resolution data downsample so when data.boundary is "auto" (the default)."""
    from irno import pipeline

    u = {"u": np.random.default_rng(0).standard_normal((1, 3, 16, 32)).astype(np.float32)}
    coords = {"x": np.arange(16.0), "y": np.arange(32.0)}
    bcs = {"x_periodic": ("periodic", ["x"]), "y_open": ("open", ["y"])}
    write_well_file(tmp_path / "a.hdf5", dataset_name="ch", time=np.arange(3.0), coords=coords, t0_fields=u,
                    boundary_conditions=bcs)
    ds = WellDataset(tmp_path / "a.hdf5", n_steps_input=1)
    assert ds.boundaries == ("periodic", "none")
    assert pipeline._boundaries_of(ds) == ("periodic", "none")
    write_well_file(tmp_path / "b.hdf5", dataset_name="p", time=np.arange(3.0), coords=coords, t0_fields=u)
    assert WellDataset(tmp_path / "b.hdf5", n_steps_input=1).boundaries == ("periodic", "periodic")
    assert pipeline._boundaries_of(torch.zeros(1)) == ("periodic", "periodic")  # no conditions known


@pytest.mark.parametrize("n", [12, 48, 64])
def test_two_thirds_rule_leaves_no_alias_on_a_kept_mode(n):
    """Every kept wavenumber K satisfies 3K < n, so products of kept modes alias only onto zeroed
    ones (with |k| <= n/3 kept, n a multiple of 3 aliased 2n/3 onto the kept -n/3: 1e-2 relative
    error in the tendency at n = 48)."""
    from irno.data.navier_stokes import VorticitySolver

    s = VorticitySolver(n, viscosity=1e-3)
    kx = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)[:, None].expand(n, n // 2 + 1)
    ky = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64)[None, :].expand(n, n // 2 + 1)
    kept = s.dealias > 0
    K = max(kx[kept].abs().max().item(), ky[kept].abs().max().item())
    assert 3 * K < n
    assert K == (n - 1) // 3  # and nothing more is cut


def test_forcing_above_the_dealiased_band_is_refused():
    from irno.data.navier_stokes import NavierStokesConfig

    with pytest.raises(ValueError, match="forcing_wavenumber must be > 0 and below sim_resolution / 3"):
        NavierStokesConfig(resolution=8, sim_resolution=8, forcing_wavenumber=4)


# ---------------------------------------------------------------------------------------------
# Review fixes


def test_train_normalization_uses_the_whole_training_folder(tmp_path):
    """normalization="train" gives the same statistics, from every file of train/, whether the
    dataset is one file inside train/, one in valid/, or the train split of the root."""
    for name, loc in (("a", 0.0), ("b", 100.0)):
        u = {"u": (loc + np.random.default_rng(int(loc)).standard_normal((1, 5, 8, 4))).astype(np.float32)}
        write_well_file(tmp_path / "data" / "train" / f"{name}.hdf5", dataset_name="g", time=np.arange(5.0),
                        coords=D, t0_fields=u)
    make_split(tmp_path, "valid", 0.0, 1.0, 2)
    inside = WellDataset(tmp_path / "data" / "train" / "a.hdf5", n_steps_input=1, normalization="train")
    beside = WellDataset(tmp_path / "data" / "valid" / "valid.hdf5", n_steps_input=1, normalization="train")
    split = WellDataset(tmp_path, split="train", n_steps_input=1, normalization="train")
    assert inside.normalization == beside.normalization == split.normalization
    assert [os.path.basename(s) for s in inside.normalization.source] == ["a.hdf5", "b.hdf5"]
    assert inside.normalization.mean[0] == pytest.approx(50.0, abs=1.0)


def test_an_empty_training_split_is_an_error_naming_its_files(tmp_path):
    """No trajectories to learn statistics from (or to sample) is a ValueError naming the files,
    not mean 0 and std min_std (which scaled the other splits by 1e4)."""
    empty = write_well_file(tmp_path / "data" / "train" / "a.hdf5", dataset_name="e", time=np.arange(5.0),
                            coords=D, t0_fields={"u": np.zeros((0, 5, 8, 4), np.float32)})
    make_split(tmp_path, "valid", 5.0, 2.0, 0)
    with pytest.raises(ValueError, match="no values") as err:
        Normalization.compute([empty])
    assert str(empty) in str(err.value)
    with pytest.raises(ValueError, match="no values") as err:
        WellDataset(tmp_path, split="valid", n_steps_input=2, normalization="train")
    assert str(empty) in str(err.value)
    with pytest.raises(ValueError, match="no samples") as err:
        WellDataset(tmp_path, split="train", n_steps_input=2)
    assert str(empty) in str(err.value)
    with pytest.raises(ValueError, match="at least one file"):
        Normalization.compute([])


def test_a_generation_racing_a_finished_one_keeps_the_finished_data_set(tmp_path, monkeypatch):
    """Process A finds no cache; process B completes the data set meanwhile (here: inside A's first
    check); A must then use B's copy, never delete it."""
    cfg = NavierStokesConfig(resolution=16, sim_resolution=16, spinup_time=0.02, snapshot_interval=0.02,
                             n_frames=4, n_train=1, n_valid=0, n_test=0)
    real = ns._is_complete
    calls = []

    def b_finishes_during_the_first_check(folder, config):
        calls.append(1)
        result = real(folder, config)
        if len(calls) == 1:
            ensure_navier_stokes(tmp_path, config, progress=False)  # process B
            (tmp_path / config.key() / "B_IS_READING").write_text("B's copy")
        return result

    monkeypatch.setattr(ns, "_is_complete", b_finishes_during_the_first_check)
    target = ensure_navier_stokes(tmp_path, cfg, progress=False)  # process A
    assert (target / "B_IS_READING").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [cfg.key()]  # no temp leftovers


def _scalar(group, name):
    def breaks(f):
        del f[group][name]
        f[group].create_dataset(name, data=np.float32(0))

    return breaks


@pytest.mark.parametrize(
    "breaks, message",
    [
        (_scalar("dimensions", "time"), "dimensions/time is a scalar"),
        (_scalar("dimensions", "y"), "dimensions/y is a scalar"),
        (lambda f: f.attrs.__setitem__("n_trajectories", "one"), "attribute 'n_trajectories' on the root group"),
        (lambda f: f.attrs.__setitem__("n_spatial_dims", "two"), "attribute 'n_spatial_dims' on the root group"),
        (lambda f: f.attrs.__setitem__("n_trajectories", -1), "attribute 'n_trajectories' on the root group"),
    ],
)
def test_scalar_dimensions_and_non_integer_counts_are_format_errors(tmp_path, breaks, message):
    path = write_coded(tmp_path / "bad.hdf5", with_t2=False)
    with h5py.File(path, "a") as f:
        breaks(f)
    for load in (inspect_well_file, WellDataset):
        with pytest.raises(WellFormatError, match=message) as err:
            load(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("scale", [8, 16])
def test_periodic_downsampling_to_grids_below_3x3(scale):
    """A coarse grid of 2x2 or 1x1 wraps the field more than once: the result is that of the
    field tiled periodically (the middle tile of a 5x5 tiling), and a constant stays constant."""
    y = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    n = 16 // scale
    tiled = F.interpolate(y.repeat(1, 1, 5, 5), size=(5 * n, 5 * n), mode="bicubic", antialias=True,
                          align_corners=False)[..., 2 * n:3 * n, 2 * n:3 * n]
    torch.testing.assert_close(downsample(y, scale, boundary="periodic"), tiled)
    torch.testing.assert_close(downsample(torch.full((16, 32), 2.5), scale, boundary="periodic"),
                               torch.full((n, 2 * n), 2.5))
    x, _ = SuperResolutionDataset(y[:, 0], scale=scale, boundary=("periodic", "none"))[0]
    assert x.shape == (1, n, n)
