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


@pytest.mark.parametrize("stage", ["writing", "between_renames", "before_cleanup"])
def test_a_killed_rewrite_never_loses_the_checkpoint(tmp_path, monkeypatch, stage):
    """Rewriting a checkpoint (as the trainer does with last/ every few steps) and dying at any point
    leaves a complete checkpoint to load: the old one while the new is being written, the new one
    once it is complete; the next save cleans up."""
    folder = tmp_path / "last"
    old_model, new_model = _model(), _model()
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(1.0)
    ck.save_checkpoint(folder, old_model, {"v": 1})

    class Killed(BaseException):
        pass

    if stage == "writing":
        import safetensors.torch

        def die(*a, **k):
            raise Killed

        monkeypatch.setattr(safetensors.torch, "save_file", die)
    else:
        real, calls = os.replace, []

        def replace(src, dst):
            calls.append(dst)
            if stage == "between_renames" and str(src).endswith(".new"):
                raise Killed
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        if stage == "before_cleanup":
            import shutil

            real_rmtree = shutil.rmtree

            def rmtree(path, *a, **k):
                if str(path).endswith(".old") and folder.exists():
                    raise Killed
                return real_rmtree(path, *a, **k)

            monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        ck.save_checkpoint(folder, new_model, {"v": 2})
    monkeypatch.undo()
    sd, cfg = ck.load_checkpoint(folder)
    want = old_model if stage == "writing" else new_model
    assert cfg == {"v": 1 if stage == "writing" else 2}
    for k, v in want.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert ck.find_checkpoint(folder) is not None
    ck.save_checkpoint(folder, new_model, {"v": 3})  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert ck.load_checkpoint(folder)[1] == {"v": 3}
