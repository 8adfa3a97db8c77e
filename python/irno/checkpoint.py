"""Checkpoints: weights in safetensors plus a JSON config, training state beside them, every file
written atomically (temporary file in the same folder, fsync, os.replace), so an interrupted
write never leaves a broken or half-old checkpoint behind.

A checkpoint is a folder:

    model.safetensors   the model's state_dict (tensors only; shared storage is de-duplicated)
    config.json         whatever JSON-able description the caller gives (model keywords, data
                        normalisation statistics, metrics, versions)
    state.pt            optional training state: optimiser, scheduler, RNG states, epoch, step

``save_checkpoint`` writes config and training state first and the weights last, then a
``complete`` marker; ``load_checkpoint`` refuses a folder without the marker.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"
MARKER = "complete"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then move the file into place atomically (same folder, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(Path(path), write)


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training run draws from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002 (the global stream is what users seed)
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_dict_for_safetensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage: store contiguous private copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def save_checkpoint(folder: str | os.PathLike, model: torch.nn.Module | dict, config: dict | None = None,
                    training_state: dict | None = None) -> Path:
    """Write a checkpoint folder atomically (file by file, weights last, then the marker).

    Args:
        folder: destination folder (created).
        model: an nn.Module or a state_dict.
        config: JSON-able description stored in config.json.
        training_state: optional dict (optimiser/scheduler state_dicts, RNG, counters) for resume.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if marker.exists():
        marker.unlink()  # the folder is incomplete while it is being rewritten
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    atomic_write_text(folder / CONFIG, json.dumps(config or {}, indent=2, sort_keys=True, default=_json_default))
    if training_state is not None:
        atomic_write(folder / STATE, lambda tmp: torch.save(training_state, tmp))
    elif (folder / STATE).exists():
        (folder / STATE).unlink()
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(_state_dict_for_safetensors(state), tmp))
    atomic_write_text(marker, "ok\n")
    return folder


def load_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu",
                    with_state: bool = False) -> tuple[dict, dict] | tuple[dict, dict, dict | None]:
    """Read a checkpoint folder: (state_dict, config) or, with ``with_state``, also the training state."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint: {folder} is not a folder")
    if not (folder / MARKER).exists():
        raise RuntimeError(f"checkpoint: {folder} is incomplete (no '{MARKER}' marker): it was being written "
                           f"when the writer stopped")
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).exists():
            raise FileNotFoundError(f"checkpoint: {folder} has no {name}")
    state_dict = load_file(str(folder / WEIGHTS), device=str(map_location))
    config = json.loads((folder / CONFIG).read_text())
    if not with_state:
        return state_dict, config
    state = None
    if (folder / STATE).exists():
        state = torch.load(folder / STATE, map_location=map_location, weights_only=False)
    return state_dict, config, state


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"config: {type(obj).__name__} is not JSON-serialisable")
