"""Command line: ``irno <command> [--config FILE] [--set key.path=value ...]``.

    irno generate    --config configs/navier_stokes.yaml     make (or find cached) data
    irno train-base  --config ...                            train the base operator
    irno train       --config ...  [--base RUN/base/best]    train IRNO on a frozen base
    irno evaluate    --config ...  [--model RUN/irno/best] [--transfer-base OTHER/base/best]
    irno demo        [--config demo]                         everything, then the report

--config takes a YAML file or the name of a built-in config (demo, navier_stokes, super_resolution,
well_tr2d, well_active_matter: the files of the repository's configs/, installed with irno);
`irno demo` without --config runs the built-in demo config, the other commands irno.pipeline.DEFAULTS.

Every command takes ``--resume`` where it trains, and ``--set`` overrides any config key, e.g.
``--set irno.K=4 --set base.train.time_budget_s=120``.
"""

from __future__ import annotations

import argparse
import json
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
    return p


def _load(loader, path, device, flag: str, produce: str | None = None):
    """``loader(path, device)[0]``, or None after a one-line message when there is no complete
    checkpoint at path (which command writes it, or which flag names another)."""
    try:
        return loader(path, device)[0]
    except FileNotFoundError as err:
        hint = f"run `{produce}` first, or name one with {flag}" if produce else f"check {flag}"
        print(f"irno: no checkpoint to load ({err}); {hint}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = pipeline.load_config(args.config, args.overrides)
    except (FileNotFoundError, ValueError) as err:
        print(f"irno: {err}", file=sys.stderr)
        return 2
    run = Path(cfg["run_dir"])
    from irno.train import init_distributed_from_env

    init_distributed_from_env()  # a no-op unless launched by torchrun
    if args.command == "generate":
        data = pipeline.datasets(cfg)
        for split, ds in data.items():
            print(f"{split}: {len(ds)} pairs, x {tuple(ds[0][0].shape)}, y {tuple(ds[0][1].shape)}")
    elif args.command == "train-base":
        _, info = pipeline.train_base(cfg, resume=args.resume)
        print(f"base: best validation VRMSE {info['best_val_vrmse']:.4f} after {info['train_s']:.0f} s; "
              f"checkpoint {run / 'base' / 'best'}")
    elif args.command == "train":
        device = pipeline.device_of(cfg)
        base = _load(pipeline.load_base, args.base or run / "base" / "best", device, "--base",
                     f"irno train-base --config {args.config}")
        if base is None:
            return 2
        _, info = pipeline.train_irno(cfg, base, resume=args.resume)
        print(f"IRNO: best validation VRMSE at K {info['best_val_vrmse']:.4f}; checkpoint {run / 'irno' / 'best'}")
    elif args.command == "evaluate":
        device = pipeline.device_of(cfg)
        model = _load(pipeline.load_irno, args.model or run / "irno" / "best", device, "--model",
                      f"irno train --config {args.config}")
        other = _load(pipeline.load_base, args.transfer_base, device, "--transfer-base") if args.transfer_base else None
        if model is None or (args.transfer_base and other is None):
            return 2
        results = {"IRNO": pipeline.evaluate(cfg, model)}
        if other is not None:
            results["transfer"] = pipeline.evaluate(cfg, model, refine_from=other)
        try:
            from irno.report import print_summary, write_report

            report = write_report(run, results, run_info={"config": cfg})
            print(print_summary(results))
            print(f"report: {report}")
        except ImportError:
            print(json.dumps({k: pipeline.improvement(v) for k, v in results.items()}, indent=2))
    elif args.command == "demo":
        pipeline.demo(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
