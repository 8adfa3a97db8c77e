"""Command line: ``irno <command> [--config FILE] [--set key.path=value ...]``.

    irno generate    --config configs/navier_stokes.yaml     make (or find cached) data
    irno train-base  --config ...                            train the base operator
    irno train       --config ...  [--base RUN/base/best]    train IRNO on a frozen base
    irno evaluate    --config ...  [--model RUN/irno/best] [--transfer-base OTHER/base/best]
    irno demo        [--config demo]                         everything, then the report
    irno predict     --model RUN --input x.npy --out y.npy   a trained model on raw inputs

--config takes a YAML file or the name of a built-in config (demo, navier_stokes, super_resolution,
well_tr2d, well_active_matter: the files of the repository's configs/, installed with irno);
`irno demo` without --config runs the built-in demo config, the other commands irno.pipeline.DEFAULTS.

Every command takes ``--resume`` where it trains, and ``--set`` overrides any config key, e.g.
``--set irno.K=4 --set base.train.time_budget_s=120``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from irno import pipeline


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="irno", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("generate", "generate or find the cached data set"),
                        ("train-base", "train the base operator"),
                        ("train", "train IRNO's refiner on a frozen base"),
                        ("evaluate", "score every refinement step and write the report"),
                        ("demo", "the whole job: data, base, IRNO, control, evaluation, report")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", default="demo" if name == "demo" else None,
                       help="YAML file or built-in config name (default: "
                            + ("demo)" if name == "demo" else "irno.pipeline.DEFAULTS)"))
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key (dotted path; value parsed as YAML)")
        if name in ("train-base", "train", "demo"):
            s.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
        if name == "train":
            s.add_argument("--base", type=Path, default=None, help="base checkpoint (default RUN_DIR/base/best)")
        if name == "evaluate":
            s.add_argument("--model", type=Path, default=None, help="IRNO checkpoint (default RUN_DIR/irno/best)")
            s.add_argument("--transfer-base", type=Path, default=None,
                           help="another base's checkpoint: evaluate the refiner on its predictions")
    s = sub.add_parser("predict", help="run a trained model on raw inputs (physical units in and out)")
    s.add_argument("--model", type=Path, required=True,
                   help="run folder (its irno/best) or checkpoint folder (an IRNO or a base)")
    s.add_argument("--input", type=Path, required=True,
                   help="x as a (B, C_in, H, W) array: .npy, .npz (array --key) or .pt (a tensor)")
    s.add_argument("--key", default="x", help="array name inside an .npz input (default x)")
    s.add_argument("--out", type=Path, required=True, help="where to write the predictions: .npy or .pt")
    s.add_argument("--steps", type=int, default=None, help="refinement steps (default the model's K)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    s.add_argument("--graphs", choices=["auto", "on", "off"], default="auto",
                   help="replay an IRNO from CUDA graphs: auto (on CUDA from 4 full batches), on, off")
    return p


def _read_array(path: Path, key: str):
    import numpy as np
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"input: no such file {path}")
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".npy", ".npz"):
        raise ValueError(f"input: expected a .npy, .npz or .pt file, got {path}")
    try:
        if suffix == ".pt":
            t = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"input: {path} holds a {type(t).__name__}, expected a tensor")
            return t
        if suffix == ".npy":
            a = np.load(path)
        else:
            with np.load(path) as z:
                if key not in z:
                    raise ValueError(f"input: {path} has no array {key!r} (it has {sorted(z.files)}); pass --key")
                a = z[key]
    except ValueError:
        raise
    except Exception as err:  # pickle, zip and numpy format errors of a damaged or foreign file
        raise ValueError(f"input: cannot read {path} ({type(err).__name__}: {' '.join(str(err).split())[:160]})") \
            from None
    if a.dtype.kind not in "biuf":
        raise ValueError(f"input: expected a real numeric array, got dtype {a.dtype} in {path}")
    return torch.from_numpy(np.ascontiguousarray(a.astype(a.dtype.newbyteorder("="), copy=False)))


def _write_array(path: Path, y) -> None:
    """Written to a temporary file beside ``path``, then renamed: never a half-written output."""

    import numpy as np
    import torch

    suffix = path.suffix.lower()
    if suffix not in (".npy", ".pt"):
        raise ValueError(f"out: expected a .npy or .pt file name, got {path}")
    if path.is_dir():
        raise ValueError(f"out: {path} is a folder; name a file in it, e.g. {path / ('predictions' + suffix)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"out: cannot make the folder {path.parent} (a file of that name is in the way)") from None
    from irno.checkpoint import atomic_write  # temporary file beside path, fsync, rename; removed on error

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a temporary name
            if suffix == ".npy":
                np.save(f, y.numpy())
            else:
                torch.save(y, f)

    atomic_write(path, write)


def _check_writable(run: Path) -> None:
    """Create the run folder and write a probe file in it: a read-only, full or foreign folder is
    named now, not after the first epoch's training."""
    import tempfile

    try:
        run.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run):
            pass
    except OSError as err:
        raise OSError(f"run_dir: cannot write to {run} ({err.strerror or err})") from None


@contextlib.contextmanager
def _run_dir_lock(run: Path):
    """Hold the run folder's lock while a command trains (rank 0 of a torchrun job, or the only
    process): a second training process on the same folder is refused by name, where the two would
    overwrite each other's checkpoints. An advisory lock (fcntl), released however the process ends;
    none on Windows."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    from irno.train import distributed_info

    if distributed_info()[0] != 0:
        yield
        return
    with open(run / ".irno.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise OSError(f"run_dir: {run} is in use by another irno process (pid {holder}); wait for it, or "
                          f"use another run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _saved(best: Path, section: str) -> bool:
    """Whether training left a best checkpoint; says why not on stderr (it stopped before its first
    validation: a time or step budget smaller than an epoch's first steps)."""
    from irno.checkpoint import find_checkpoint
    from irno.train import distributed_info

    if distributed_info()[0] != 0 or find_checkpoint(best) is not None:  # rank 0 writes the checkpoints
        return True
    print(f"irno: training stopped before its first validation, so no checkpoint was written to {best} "
          f"({section}.time_budget_s or {section}.max_steps too small?)", file=sys.stderr)
    return False


def _predict(args) -> int:
    if args.out.suffix.lower() not in (".npy", ".pt"):  # before the work, not after
        raise ValueError(f"out: expected a .npy or .pt file name, got {args.out}")
    x = _read_array(args.input, args.key)
    if not x.is_floating_point():
        x = x.float()
    graphs = {"auto": "auto", "on": True, "off": False}[args.graphs]
    device = None if args.device is None else pipeline.device_of({"device": args.device})
    y = pipeline.predict(args.model, x, steps=args.steps, batch_size=args.batch_size, device=device,
                         graphs=graphs)
    _write_array(args.out, y)
    print(f"predictions {tuple(y.shape)} written to {args.out}")
    return 0


def _load(loader, path, device, flag: str, produce: str | None = None, kind: str = "checkpoint"):
    """``loader(path, device)`` (model, meta), or None after a one-line message when there is no complete
    checkpoint at path (which command writes it, or which flag names another) or it holds another
    kind of model (``kind``: what the command needs)."""
    try:
        return loader(path, device)
    except FileNotFoundError as err:
        hint = f"run `{produce}` first, or name one with {flag}" if produce else f"check {flag}"
        print(f"irno: no checkpoint to load ({err}); {hint}", file=sys.stderr)
    except (KeyError, RuntimeError) as err:  # a base where an IRNO is needed, weights of another shape
        detail = f"no {err} entry in its config" if isinstance(err, KeyError) else str(err).splitlines()[0]
        print(f"irno: {path} is not {kind} this command can use ({detail}); check {flag}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error (a bad config value, a wrong path) is one line on stderr and
    exit status 2 (IRNO_DEBUG=1 shows the traceback instead)."""
    args = _parser().parse_args(argv)
    try:
        return _predict(args) if args.command == "predict" else _run(args)
    except (OSError, ValueError, TypeError) as err:  # OSError: a path that cannot be read or written
        if os.environ.get("IRNO_DEBUG"):
            raise
        print(f"irno: {type(err).__name__ + ': ' if isinstance(err, TypeError) else ''}{err} "
              f"(IRNO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (irno.train.TrainingInterrupted: checkpointed first)
        if os.environ.get("IRNO_DEBUG"):
            raise
        from irno.train import TrainingInterrupted

        trains = args.command in ("train", "train-base", "demo")
        resume = " (`--resume` continues from the last checkpoint)" if trains else ""
        detail = f": {err}" if isinstance(err, TrainingInterrupted) else ""
        print(f"irno: interrupted{detail}{resume}", file=sys.stderr)
        return 143 if isinstance(err, TrainingInterrupted) else 130


def _warn_if_other_statistics(meta: dict, data: dict) -> None:
    """The evaluation normalises with this config's training split; say so when the model was trained
    on data with other statistics (another config, a changed data set)."""
    norm = data["train"].normalization
    mine = norm.to_dict() if norm is not None else None
    if meta.get("normalization") != mine:
        print("irno: warning: the model was trained with other normalisation statistics than this config's "
              "data gives; the evaluation uses the data's (evaluate with the config the model was trained with)",
              file=sys.stderr)


def _previous_metrics(run: Path) -> dict:
    try:
        return json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _run(args) -> int:
    cfg = pipeline.load_config(args.config, args.overrides)
    if not cfg.get("run_dir"):
        raise ValueError("run_dir: expected a folder name, got an empty value")
    run = Path(cfg["run_dir"]).expanduser()
    cfg["run_dir"] = str(run)
    if args.command != "generate":
        _check_writable(run)
    from irno.train import init_distributed_from_env

    init_distributed_from_env()  # a no-op unless launched by torchrun
    if args.command in ("train-base", "train", "demo"):
        with _run_dir_lock(run):
            return _command(args, cfg, run)
    return _command(args, cfg, run)


def _command(args, cfg: dict, run: Path) -> int:
    if args.command == "generate":
        data = pipeline.datasets(cfg)
        for split, ds in data.items():
            print(f"{split}: {len(ds)} pairs, x {tuple(ds[0][0].shape)}, y {tuple(ds[0][1].shape)}")
    elif args.command == "train-base":
        _, info = pipeline.train_base(cfg, resume=args.resume)
        if not _saved(run / "base" / "best", "base.train"):
            return 2
        print(f"base: best validation VRMSE {info['best_val_vrmse']:.4f} after {info['train_s']:.0f} s; "
              f"checkpoint {run / 'base' / 'best'}")
    elif args.command == "train":
        device = pipeline.device_of(cfg)
        base = _load(pipeline.load_base, args.base or run / "base" / "best", device, "--base",
                     f"irno train-base --config {args.config}", kind="a base checkpoint")
        if base is None:
            return 2
        _, info = pipeline.train_irno(cfg, base[0], resume=args.resume, base_meta=base[1])
        if not _saved(run / "irno" / "best", "irno.train"):
            return 2
        print(f"IRNO: best validation VRMSE at K {info['best_val_vrmse']:.4f}; checkpoint {run / 'irno' / 'best'}")
    elif args.command == "evaluate":
        device = pipeline.device_of(cfg)
        model = _load(pipeline.load_irno, args.model or run / "irno" / "best", device, "--model",
                      f"irno train --config {args.config}", kind="an IRNO checkpoint")
        other = (_load(pipeline.load_base, args.transfer_base, device, "--transfer-base", kind="a base checkpoint")
                 if args.transfer_base else None)
        if model is None or (args.transfer_base and other is None):
            return 2
        (model, meta), data = model, pipeline.datasets(cfg)
        _warn_if_other_statistics(meta, data)
        results = {"IRNO": pipeline.evaluate(cfg, model, data)}
        if other is not None:
            results["transfer"] = pipeline.evaluate(cfg, model, data, refine_from=other[0])
        try:
            from irno.report import print_summary, write_report

            # a report already in the run folder (irno demo) keeps what this command does not
            # recompute: the controls and the run's record (histories, wall times)
            kept = _previous_metrics(run)
            run_info = {**(kept.get("run_info") or {}), "config": cfg}
            report = write_report(run, results, run_info=run_info, controls=kept.get("controls") or None)
            print(print_summary(results))
            print(f"report: {report}")
        except ImportError:
            print(json.dumps({k: pipeline.improvement(v) for k, v in results.items()}, indent=2))
    elif args.command == "demo":
        pipeline.demo(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
