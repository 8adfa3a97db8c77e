"""Checkpoints: round trip, training state, atomicity and clear errors."""

import os

import pytest
import torch
from irno import checkpoint as ck


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GELU(), torch.nn.Conv2d(3, 1, 1))
    return m


def test_round_trip_weights_config_and_state(tmp_path):
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.randn(1, 2, 5, 5)).sum().backward()
    opt.step()
    ck.save_checkpoint(tmp_path / "c", m, {"width": 3, "stats": torch.tensor([1.0, 2.0])},
                       {"optimizer": opt.state_dict(), "epoch": 4, "rng": ck.rng_state()})
    sd, cfg, st = ck.load_checkpoint(tmp_path / "c", with_state=True)
    m2 = _model()
    m2.load_state_dict(sd)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert cfg == {"width": 3, "stats": [1.0, 2.0]}
    assert st["epoch"] == 4 and "state" in st["optimizer"]


def test_rng_state_restores_the_stream():
    state = ck.rng_state()
    a = torch.rand(3)
    ck.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    ck.atomic_write_text(path, "old")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary left behind


def test_incomplete_folder_is_refused(tmp_path):
    ck.save_checkpoint(tmp_path / "c", _model(), {})
    (tmp_path / "c" / ck.MARKER).unlink()
    with pytest.raises(RuntimeError, match="incomplete"):
        ck.load_checkpoint(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ck.load_checkpoint(tmp_path / "missing")


def test_unserialisable_config_names_the_type(tmp_path):
    with pytest.raises(TypeError, match="object is not JSON-serialisable"):
        ck.save_checkpoint(tmp_path / "c", _model(), {"bad": object()})
