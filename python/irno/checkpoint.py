"""Checkpoints: weights in safetensors plus a JSON config, training state beside them, every file
written atomically (temporary file in the same folder, fsync, os.replace), so an interrupted
write never leaves a broken or half-old checkpoint behind.

A checkpoint is a folder:

    model.safetensors   the model's state_dict (tensors only; shared storage is de-duplicated)
    config.json         whatever JSON-able description the caller gives (model keywords, data
                        normalisation statistics, metrics, versions)
    state.pt            optional training state: optimiser, scheduler, RNG states, epoch, step

``save_checkpoint`` writes a new checkpoint in full beside the old one (config and training state
first, the weights last, then a ``complete`` marker) and only then swaps it in, so a killed write
never costs the previous checkpoint; ``load_checkpoint`` reads whichever complete copy stands for
the folder and refuses a folder without one.
"""

from __future__ import annotations

import json
import os
import pickle
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


def default_mode(folder: bool = False) -> int:
    """The permissions a plain ``open`` (0o666) or ``mkdir`` (0o777) would give under the process's
    umask: the private temporary files and folders that atomic writes rename into place get them,
    so that a shared run or data folder stays readable by whoever could read a plain write."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then move the file into place atomically (same folder, fsync, os.replace),
    with the permissions of a plain write (``default_mode``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
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


def _sibling(folder: Path, tag: str) -> Path:
    return folder.parent / f".{folder.name}.{tag}"


def _complete(folder: Path) -> bool:
    return (folder / MARKER).exists() and (folder / WEIGHTS).exists() and (folder / CONFIG).exists()


def save_checkpoint(folder: str | os.PathLike, model: torch.nn.Module | dict, config: dict | None = None,
                    training_state: dict | None = None) -> Path:
    """Write a checkpoint folder so that a complete checkpoint exists at every moment.

    The new checkpoint is written in full (file by file, weights last, then the marker) into the
    sibling ``.<name>.new``; then the old folder moves to ``.<name>.old``, the new one takes its
    name, and the old one is deleted. Killed at any point, the folder, or else one of the two
    siblings, is complete, and :func:`load_checkpoint` finds it.

    Args:
        folder: destination folder (created; an existing one is replaced).
        model: an nn.Module or a state_dict.
        config: JSON-able description stored in config.json.
        training_state: optional dict (optimiser/scheduler state_dicts, RNG, counters) for resume.
    """
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    new, old = _sibling(folder, "new"), _sibling(folder, "old")
    if new.exists():
        shutil.rmtree(new)  # a write that was interrupted earlier
    new.mkdir()
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    atomic_write_text(new / CONFIG, json.dumps(config or {}, indent=2, sort_keys=True, default=_json_default))
    if training_state is not None:
        atomic_write(new / STATE, lambda tmp: torch.save(training_state, tmp))
    atomic_write(new / WEIGHTS, lambda tmp: save_file(_state_dict_for_safetensors(state), tmp))
    atomic_write_text(new / MARKER, "ok\n")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(new, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def find_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The complete checkpoint that stands for ``folder``: the folder itself, or, after a write was
    killed between its two renames, the sibling ``.<name>.new`` (the newer) or ``.<name>.old``."""
    folder = Path(folder)
    for cand in (folder, _sibling(folder, "new"), _sibling(folder, "old")):
        if cand.is_dir() and _complete(cand):
            return cand
    return None


def load_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu",
                    with_state: bool = False) -> tuple[dict, dict] | tuple[dict, dict, dict | None]:
    """Read a checkpoint folder: (state_dict, config) or, with ``with_state``, also the training state.

    A folder whose last write was killed is read from the complete copy that :func:`find_checkpoint`
    names; a folder with no complete copy is refused."""
    from safetensors.torch import load_file

    folder = Path(folder)
    found = find_checkpoint(folder)
    if found is None:
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint: {folder} is not a folder")
        if (folder / MARKER).exists():
            missing = [n for n in (WEIGHTS, CONFIG) if not (folder / n).exists()]
            raise FileNotFoundError(f"checkpoint: {folder} has no {', '.join(missing)}")
        if not (folder / WEIGHTS).exists() and not (folder / CONFIG).exists():
            raise FileNotFoundError(f"checkpoint: {folder} is not a checkpoint folder (no {WEIGHTS} or {CONFIG}; "
                                    f"a run folder holds them under base/best, irno/best)")
        raise RuntimeError(f"checkpoint: {folder} is incomplete (no '{MARKER}' marker): it was being written "
                           f"when the writer stopped")
    folder = found
    try:
        state_dict = load_file(str(folder / WEIGHTS), device=str(map_location))
    except OSError:
        raise
    except Exception as err:  # safetensors' own error type for a damaged file
        raise ValueError(f"checkpoint: {folder / WEIGHTS} is damaged ({' '.join(str(err).split())[:200]})") from None
    try:
        config = json.loads((folder / CONFIG).read_text())
    except ValueError as err:
        raise ValueError(f"checkpoint: {folder / CONFIG} is not valid JSON ({err})") from None
    if not with_state:
        return state_dict, config
    state = None
    if (folder / STATE).exists():
        try:
            state = torch.load(folder / STATE, map_location=map_location, weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise ValueError(f"checkpoint: {folder / STATE} (the training state) is damaged "
                             f"({' '.join(str(err).split())[:200]})") from None
    return state_dict, config, state


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"config: {type(obj).__name__} is not JSON-serialisable")
