"""The main job, step by step: data -> base operator -> IRNO -> evaluation -> report.

Each step is a function of one config dict (see configs/*.yaml); ``irno.cli`` exposes them as
``irno generate | train-base | train | evaluate | demo``. A run folder holds:

    base/best, base/last      checkpoints of the base (safetensors + config.json)
    irno/best, irno/last      checkpoints of IRNO (its refiner and the frozen base inside)
    control/best              the base trained further for IRNO's training time (the control)
    metrics.json, report.md, figures/
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

DEFAULTS: dict = {
    "run_dir": "runs/demo",
    "seed": 0,
    "device": "auto",
    "threads": None,
    "data": {
        "kind": "navier_stokes",  # or "well" (Well-layout HDF5 files)
        "root": "data/navier_stokes",  # navier_stokes: cache root; well: data set root with data/<split>/
        "navier_stokes": {},  # NavierStokesConfig overrides
        "n_steps_input": 4,
        "n_steps_output": 1,
        "fields": None,
        "task": "next_step",  # or "super_resolution": x = antialiased bicubic downsampling of y
        "scale": 4,  # super-resolution factor
        "boundary": "auto",  # super-resolution downsampling: auto (the data's boundary conditions) |
        # periodic | none | [H, W] pair of them
    },
    "base": {
        "model": "fno",  # fno | tfno | wdsr
        "kwargs": {"n_modes": [12, 12], "hidden_channels": 32, "n_layers": 4},
        "loss": "l2",  # relative L2 (LpLoss) | h1 | mse
        "train": {"epochs": 30, "batch_size": 16, "lr": 1e-3, "weight_decay": 1e-5, "lr_min": 1e-6,
                  "grad_clip": 1.0, "time_budget_s": None, "patience": None},
    },
    "irno": {
        "alpha": 0.2,
        "K": 6,
        "refiner": {"kind": "unet", "width": 16, "depth": 4, "padding": "periodic"},
        "loss": {"beta_s": 1.0, "beta_fp": 0.01, "fp_warmup_epochs": 5, "spectral_mode": "magnitude",
                 "f0": 0.5, "lam_min": 1.0, "lam_max": 2.0,
                 # irno's stability terms, off by default: pipeline.deep_state_loss (deep_steps n, or
                 # [lo, hi] drawn per batch) and the resting term mean(Phi(x, h_K)^2), h_K detached
                 "deep_steps": 0, "beta_deep": 0.0, "beta_rest": 0.0,
                 "start_noise": 0.0},  # pipeline.perturb_start: train from noisy h_0 (relative level)
        "checkpoint": False,
        "refiner_dtype": "auto",  # autocast of Phi: auto (bf16 on CUDA / AMX CPUs) | bf16 | fp16 | off
        "resample_mode": "bicubic",  # x onto h's grid (super-resolution): bicubic | bilinear | fourier | ...
        "train": {"epochs": 10, "batch_size": 16, "lr": 3e-4, "weight_decay": 1e-5, "lr_min": 1e-6,
                  "grad_clip": 1.0, "time_budget_s": None, "patience": None},
    },
    "evaluate": {"extra_steps": 6, "batch_size": 32, "split": "test"},
    "control": {"enabled": True},
}


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def merge(base: dict, over: dict) -> dict:
    """Recursive dict update (returns a new dict)."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: config sections whose keys are free (checked by what reads them: NavierStokesConfig, the model's
#: constructor, the refiner's builder)
FREE_SECTIONS = (("data", "navier_stokes"), ("base", "kwargs"), ("irno", "refiner"))
#: sections read as irno.train.TrainConfig: any of its fields may be set
TRAIN_SECTIONS = (("base", "train"), ("irno", "train"))


def _unknown_key(node: dict, key, where: tuple) -> str | None:
    """Why ``key`` may not stand at ``where`` (a config path) in ``node``, or None where it may: any key
    in a free section, a TrainConfig field in a train section, else only the keys ``node`` has. The
    message names the place and the known keys."""
    from dataclasses import fields

    from irno.train import TrainConfig

    if any(where[:len(f)] == f for f in FREE_SECTIONS):
        return None
    known = set(node) | ({f.name for f in fields(TrainConfig)} if where in TRAIN_SECTIONS else set())
    if key in known:
        return None
    at = f"under {'.'.join(where)!r}" if where else "at the top level"
    return f"no key {key!r} {at} (known: {', '.join(sorted(map(str, known)))})"


def check_keys(loaded: dict, source: str, defaults: dict | None = None, where: tuple = ()) -> None:
    """Refuse a key of a config file that the defaults do not have (the rules of ``set_dotted``,
    ``_unknown_key``): a misspelt key would otherwise be a setting that nothing reads."""
    defaults = DEFAULTS if defaults is None else defaults
    for key, value in loaded.items():
        why = _unknown_key(defaults, key, where)
        if why:
            raise ValueError(f"config: {source}: {why}")
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            check_keys(value, source, defaults[key], (*where, key))


def set_dotted(cfg: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML: numbers, lists, null, true).

    The path must name a key the config has (or a TrainConfig field in a train section, or any key
    in a free section such as ``base.kwargs``): a misspelt key is an error, not a new setting that
    nothing reads."""
    import yaml

    if "=" not in assignment:
        raise ValueError(f"override: expected key.path=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    node = cfg
    parts = key.strip().split(".")
    for i, p in enumerate(parts):
        why = _unknown_key(node, p, tuple(parts[:i]))
        if why:
            raise ValueError(f"override {key.strip()!r}: {why}")
        if i == len(parts) - 1:
            break
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    try:
        # YAML 1.1 reads 010 as octal 8 and 0x10 as 16: a leading-zero number on the command line is decimal
        value = int(raw.strip()) if re.fullmatch(r"[+-]?0[0-9]+", raw.strip()) else yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"override {key.strip()!r}: cannot read the value {raw!r} ({type(err).__name__})") from None
    if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string: take numbers as numbers
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
        raise ValueError(f"override {key.strip()!r}: that is a section ({', '.join(map(str, node[parts[-1]]))}); "
                         f"set one of its keys, e.g. {key.strip()}.<key>=...")
    node[parts[-1]] = value


def builtin_configs() -> dict[str, Path]:
    """The configs that come with irno, by name (file stem): ``{"demo": .../demo.yaml, ...}``.

    An installed irno carries them as irno/configs/ (copied from the repository's configs/ at build
    time); an editable install or a source checkout reads the repository's configs/ itself.
    """
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parents[1] / "configs"):
        if folder.is_dir():
            found = {p.stem: p for p in sorted(folder.glob("*.yaml"))}
            if found:
                return found
    return {}


def config_path(config: str | Path) -> Path:
    """A config file: ``config`` itself when that file exists, else the built-in config of that
    name (``"demo"`` or ``"demo.yaml"``: see :func:`builtin_configs`)."""
    p = Path(config)
    if p.is_file():
        return p
    known = builtin_configs()
    if p.parent == Path(".") and (p.stem if p.suffix in (".yaml", ".yml") else p.name) in known:
        return known[p.stem if p.suffix in (".yaml", ".yml") else p.name]
    names = ", ".join(known) or "none found"
    raise FileNotFoundError(f"config: no such file {p}, and no built-in config of that name (built-in: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """DEFAULTS, updated by a YAML file (a path, or the name of a built-in config such as "demo"),
    updated by ``key.path=value`` overrides."""
    import yaml

    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = config_path(path)
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"config: {p} is not valid YAML ({' '.join(str(err).split())})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config: {p} must hold a mapping of sections (data, base, irno, ...), "
                             f"got a {type(loaded).__name__}")
        check_keys(loaded or {}, str(p))
        cfg = merge(cfg, loaded or {})
    for a in overrides or []:
        set_dotted(cfg, a)
    return cfg


def device_of(cfg: dict) -> torch.device:
    """The config's device ("auto": CUDA when available), checked: a name torch knows, and a CUDA
    device only where there is one."""
    d = cfg.get("device", "auto")
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(d)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {d!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {d!r} asked for, but this torch sees no CUDA device (use auto or cpu)")
    return dev


def _setup(cfg: dict) -> torch.device:
    for key in ("seed", "threads"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{key}: expected an int >= 0{' or null' if key == 'threads' else ''}, got {v!r}")
    torch.manual_seed(int(cfg.get("seed", 0)))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    return device_of(cfg)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
class _SuperRes(torch.utils.data.Dataset):
    """SuperResolutionDataset with the source's channel names and normalisation passed through."""

    def __init__(self, source, scale: int, boundary: str):
        from irno.data import SuperResolutionDataset

        self.inner = SuperResolutionDataset(source, scale=scale, boundary=boundary)
        self.channel_names = list(source.channel_names)
        self.normalization = source.normalization

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def datasets(cfg: dict, progress: bool = True) -> dict:
    """{split: dataset of (x, y)} for the configured data (generated and cached when built-in)."""
    d = cfg["data"]
    task = d.get("task", "next_step")
    if task == "next_step":
        return _next_step_datasets(d, progress)
    if task == "super_resolution":
        frames = _next_step_datasets({**d, "n_steps_input": 1, "n_steps_output": 0}, progress)
        boundary = d.get("boundary", "auto")
        scale = _scale(cfg)
        return {k: _SuperRes(v, scale, _boundaries_of(v) if boundary in (None, "auto") else boundary)
                for k, v in frames.items()}
    raise ValueError(f"data.task: expected 'next_step' or 'super_resolution', got {task!r}")


def _boundaries_of(frames) -> tuple[str, str]:
    """How downsampling treats the grid's edges when data.boundary is "auto": per dimension, as the
    data's boundary conditions say (a Well file's 'periodic' groups; open or walled dims are not
    wrapped), periodic for the built-in Navier-Stokes set."""
    bounds = getattr(frames, "boundaries", None)
    return tuple(bounds) if bounds is not None and len(bounds) == 2 else ("periodic", "periodic")


def _next_step_datasets(d: dict, progress: bool) -> dict:
    from irno.data import NavierStokesConfig, WellDataset
    from irno.data.navier_stokes import navier_stokes_datasets

    if d["kind"] == "navier_stokes":
        ns = NavierStokesConfig(**(d.get("navier_stokes") or {}))
        return navier_stokes_datasets(d["root"], ns, d["n_steps_input"], d["n_steps_output"], progress=progress)
    if d["kind"] == "well":
        # train first: valid and test take its fields in its order (without data.fields, each split's
        # first file would pick the order, and a permuted split would pass unseen: statistics match by name)
        out = {"train": WellDataset(d["root"], d["n_steps_input"], d["n_steps_output"], fields=d.get("fields"),
                                    normalization="train", split="train")}
        for split in ("valid", "test"):
            try:
                out[split] = WellDataset(d["root"], d["n_steps_input"], d["n_steps_output"],
                                         fields=out["train"].fields, normalization="train", split=split)
            except FileNotFoundError:
                pass
        return out
    raise ValueError(f"data.kind: expected 'navier_stokes' or 'well', got {d['kind']!r}")


def _scale(cfg: dict) -> int:
    d = cfg.get("data") or {}
    if d.get("task") != "super_resolution":
        return 1
    scale = d.get("scale", 4)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"data.scale: expected an int >= 1 (the super-resolution factor), got {scale!r}")
    return scale


def _channels(ds) -> tuple[int, int]:
    x, y = ds[0]
    return x.shape[0], y.shape[0]


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
class UpsampleThen(torch.nn.Module):
    """Bicubic upsampling by ``scale`` followed by ``model``: an FNO/TFNO base for super-resolution."""

    def __init__(self, model: torch.nn.Module, scale: int):
        super().__init__()
        self.model, self.scale = model, int(scale)
        self.in_channels, self.out_channels = model.in_channels, model.out_channels

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.model(x)


def build_base(spec: dict, in_channels: int, out_channels: int, scale: int = 1) -> torch.nn.Module:
    """The base operator named by ``spec`` ({"model": fno|tfno|wdsr, "kwargs": {...}}).

    ``scale`` > 1 (super-resolution): WDSR upsamples itself; an FNO/TFNO is preceded by bicubic
    upsampling."""
    from irno.models import FNO, TFNO, WDSR

    kind, kw = spec["model"], dict(spec.get("kwargs") or {})
    if kind in ("fno", "tfno"):
        cls = FNO if kind == "fno" else TFNO
        if "n_modes" in kw:
            kw["n_modes"] = tuple(kw["n_modes"])
        model = cls(in_channels=in_channels, out_channels=out_channels, **kw)
        return UpsampleThen(model, scale) if scale > 1 else model
    if kind == "wdsr":
        return WDSR(in_channels=in_channels, out_channels=out_channels, scale=scale, **kw)
    raise ValueError(f"base.model: expected 'fno', 'tfno' or 'wdsr', got {kind!r}")


def build_irno(spec: dict, base: torch.nn.Module, in_channels: int, out_channels: int, device="cpu"):
    from irno import IRNO, pick_refiner_dtype
    from irno.models import FNORefiner, UNetRefiner

    r = dict(spec.get("refiner") or {})
    kind = r.pop("kind", "unet")
    cin = in_channels + out_channels
    if kind == "unet":
        refiner = UNetRefiner(cin, out_channels, **r)
    elif kind == "fno":
        if "n_modes" in r:
            r["n_modes"] = tuple(r["n_modes"])
        refiner = FNORefiner(cin, out_channels, **r)
    else:
        raise ValueError(f"irno.refiner.kind: expected 'unet' or 'fno', got {kind!r}")
    return IRNO(base, refiner, alpha=spec["alpha"], K=spec["K"], in_channels=in_channels, out_channels=out_channels,
                checkpoint=bool(spec.get("checkpoint", False)),
                resample_mode=spec.get("resample_mode", "bicubic"),
                refiner_dtype=pick_refiner_dtype(device, spec.get("refiner_dtype", "auto")))


def _param_count(m: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def _train_config(spec: dict, seed: int):
    from irno.train import TrainConfig

    t = {k: v for k, v in spec.items() if k in TrainConfig.__dataclass_fields__}
    if "monitor" in t:
        raise ValueError(f"train.monitor: the pipeline chooses its best checkpoint by validation VRMSE; "
                         f"leave monitor out (got {t['monitor']!r})")
    for k in ("lr", "weight_decay", "lr_min", "grad_clip", "time_budget_s", "decay_fraction"):
        if isinstance(t.get(k), str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                t[k] = float(t[k])
            except ValueError:
                raise ValueError(f"train.{k}: expected a number, got {t[k]!r}") from None
    return TrainConfig(**{"seed": seed, "monitor": "val_vrmse", **t})  # a train.seed overrides the run's


def _val_fn(ds, device, steps: int | None = None, batch_size: int = 32):
    """Validation VRMSE of a base (steps None) or of an IRNO at ``steps``."""
    from irno import metrics

    loader = DataLoader(ds, batch_size=batch_size)

    @torch.no_grad()
    def val(model):
        vals = []
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            p = model(x) if steps is None else model(x, steps=steps)
            vals.append(metrics.vrmse(p, y).cpu())
        return {"val_vrmse": float(torch.cat(vals).mean())}

    return val


def _base_loss(kind: str):
    from irno.losses import H1Loss, LpLoss

    fn = {"l2": LpLoss(d=2, p=2, reduction="mean"), "h1": H1Loss(d=2, reduction="mean"),
          "mse": torch.nn.functional.mse_loss}.get(kind)
    if fn is None:
        raise ValueError(f"base.loss: expected 'l2', 'h1' or 'mse', got {kind!r}")

    def loss(model, x, y, epoch):
        val = fn(model(x), y)
        return val, {}

    return loss


def train_base(cfg: dict, data: dict | None = None, resume: bool = False, out_name: str = "base",
               init_from: str | Path | None = None) -> tuple[torch.nn.Module, dict]:
    """Train the base operator; returns (model with the best weights, info)."""
    from irno.checkpoint import find_checkpoint, load_checkpoint
    from irno.train import Trainer

    device = _setup(cfg)
    data = data or datasets(cfg)
    cin, cout = _channels(data["train"])
    model = build_base(cfg["base"], cin, cout, _scale(cfg)).to(device)
    if init_from is not None:
        sd, _ = load_checkpoint(init_from, map_location=device)
        model.load_state_dict(sd)
    run = Path(cfg["run_dir"])
    meta = {"kind": "base", "base": cfg["base"], "in_channels": cin, "out_channels": cout,
            "normalization": data["train"].normalization.to_dict() if data["train"].normalization else None,
            "data": cfg["data"], "channel_names": data["train"].channel_names}
    trainer = Trainer(model, _base_loss(cfg["base"].get("loss", "l2")), data["train"],
                      _val_fn(data.get("valid", data["train"]), device),
                      _train_config(cfg["base"]["train"], cfg["seed"]), out_dir=run / out_name, model_config=meta,
                      device=device)
    t0 = time.perf_counter()
    hist = trainer.fit(resume=resume)
    wall = time.perf_counter() - t0
    best = run / out_name / "best"
    if find_checkpoint(best) is not None:
        sd, _ = load_checkpoint(best, map_location=device)
        model.load_state_dict(sd)
    return model, {"history": hist, "wall_s": wall, "train_s": trainer.elapsed, "params": _param_count(model),
                   "best_val_vrmse": trainer.best_score}


def load_base(folder: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    from irno.checkpoint import load_checkpoint

    sd, meta = load_checkpoint(folder, map_location=device)
    model = build_base(meta["base"], meta["in_channels"], meta["out_channels"], _scale(meta)).to(device)
    model.load_state_dict(sd)
    return model, meta


def _irno_loss(spec: dict):
    from irno.losses import IRNOLoss

    lc = spec.get("loss") or {}
    crit = IRNOLoss(K=spec["K"], beta_s=lc.get("beta_s", 1.0), beta_fp=lc.get("beta_fp", 0.01),
                    fp_warmup_epochs=lc.get("fp_warmup_epochs", 5), lam_min=lc.get("lam_min", 1.0),
                    lam_max=lc.get("lam_max", 2.0), f0=lc.get("f0", 0.5),
                    spectral_mode=lc.get("spectral_mode", "magnitude"))

    deep_range, beta_deep = deep_steps_range(lc.get("deep_steps", 0)), float(lc.get("beta_deep", 0.0))
    beta_rest = float(lc.get("beta_rest", 0.0))
    start_noise = float(lc.get("start_noise", 0.0))
    if not (math.isfinite(start_noise) and start_noise >= 0):
        raise ValueError(f"irno.loss.start_noise: expected a number >= 0, got {start_noise!r}")

    def loss(model, x, y, epoch):
        if start_noise:
            with torch.no_grad():
                h0 = perturb_start(model.base_forward(x), start_noise)
            traj = model.refine(x, h0, steps=spec["K"], return_trajectory=True)
        else:
            traj = model(x, steps=spec["K"], return_trajectory=True)
        total, parts = crit(model, x, y, epoch=epoch, trajectory=traj)
        out = {k: v for k, v in parts.items() if k in ("mse", "spec", "fp")}
        if deep_range[1] and beta_deep:
            lo, hi = deep_range
            n = lo if lo == hi else int(torch.randint(lo, hi + 1, ()).item())
            deep = deep_state_loss(model, x, y, traj[-1], n)
            total = total + beta_deep * deep
            out["deep"] = deep.detach()
        if beta_rest:
            # irno addition: Phi should rest where the unrolled iteration ends, so steps past K stay put
            rest = model.phi(x, traj[-1].detach()).square().mean()
            total = total + beta_rest * rest
            out["rest"] = rest.detach()
        return total, out

    return loss


def perturb_start(h0: torch.Tensor, sigma: float, smooth_modes: int = 8) -> torch.Tensor:
    """h0 (B, C, H, W) plus noise, for training the refiner from perturbed starts (irno.loss.start_noise).

    Each sample gets a level u * sigma, u ~ U(0, 1), times the std of each of its channels, of the sum
    of two unit-variance fields: white noise and white noise low-passed to wavenumbers |k| <= smooth_modes
    (the refiner's drift past K is broadband, low bands included). An irno addition to the published
    method, off by default.
    """
    B, C, H, W = h0.shape
    white = torch.randn_like(h0)
    spec = torch.fft.rfft2(torch.randn_like(h0), norm="ortho")
    ky = torch.fft.fftfreq(H, 1.0 / H, device=h0.device).abs().view(-1, 1)
    kx = torch.fft.rfftfreq(W, 1.0 / W, device=h0.device).view(1, -1)
    smooth = torch.fft.irfft2(spec * ((ky ** 2 + kx ** 2) <= smooth_modes ** 2), s=(H, W), norm="ortho")
    smooth = smooth / smooth.flatten(2).std(dim=2).clamp_min(1e-12)[..., None, None]
    level = sigma * torch.rand(B, 1, 1, 1, device=h0.device, dtype=h0.dtype)
    return h0 + level * h0.flatten(2).std(dim=2)[..., None, None] * (white + smooth) / math.sqrt(2.0)


def deep_steps_range(value) -> tuple[int, int]:
    """``irno.loss.deep_steps`` as an inclusive range (lo, hi): an int n is (n, n), a pair [lo, hi]
    draws the number of extra steps uniformly from lo..hi for every batch; 0 turns the term off."""
    pair = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair) \
            or pair[0] > pair[1]:
        raise ValueError(f"irno.loss.deep_steps: expected an int >= 0 or a pair [lo, hi] of ints with "
                         f"0 <= lo <= hi, got {value!r}")
    return pair[0], pair[1]


def deep_state_loss(model, x: torch.Tensor, y: torch.Tensor, h_K: torch.Tensor, extra_steps: int) -> torch.Tensor:
    """An irno addition to the published loss, for stability beyond K (off by default).

    From h_K (detached) the iteration runs ``extra_steps`` more steps without gradients, to a state
    h_{K+n} of the kind inference meets after K; one step from there is trained toward y:
    MSE(h_{K+n} + alpha * Phi(x, h_{K+n}), y). It teaches Phi to keep moving toward y, not away from
    it, at states beyond the unrolled horizon, at the cost of n no-grad steps and one step with grad.
    """
    with torch.no_grad():
        h = model.refine(x, h_K.detach(), steps=extra_steps)
    return torch.nn.functional.mse_loss(model.update(x, h), y)


def train_irno(cfg: dict, base: torch.nn.Module, data: dict | None = None, resume: bool = False,
               base_meta: dict | None = None):
    """Train IRNO's refiner on the frozen base; returns (model with the best weights, info).

    ``base_meta``: the meta of the checkpoint the base was loaded from (``load_base``); the IRNO
    checkpoint then records that base's own settings (a base trained with other settings than
    ``cfg["base"]`` still loads with the IRNO), and its channels must match the data's."""
    from irno.checkpoint import find_checkpoint, load_checkpoint
    from irno.train import Trainer

    device = _setup(cfg)
    data = data or datasets(cfg)
    cin, cout = _channels(data["train"])
    base_spec = cfg["base"]
    if base_meta is not None:
        got = (base_meta.get("in_channels"), base_meta.get("out_channels"))
        if got != (cin, cout):
            raise ValueError(f"--base: the base maps {got[0]} to {got[1]} channels, the data {cin} to {cout} "
                             f"(data settings other than the base's training data?)")
        base_spec = base_meta.get("base", base_spec)
    model = build_irno(cfg["irno"], base, cin, cout, device=device).to(device)
    run = Path(cfg["run_dir"])
    meta = {"kind": "irno", "base": base_spec, "irno": cfg["irno"], "in_channels": cin, "out_channels": cout,
            "normalization": data["train"].normalization.to_dict() if data["train"].normalization else None,
            "data": cfg["data"], "channel_names": data["train"].channel_names}
    trainer = Trainer(model, _irno_loss(cfg["irno"]), data["train"],
                      _val_fn(data.get("valid", data["train"]), device, steps=cfg["irno"]["K"]),
                      _train_config(cfg["irno"]["train"], cfg["seed"]), out_dir=run / "irno", model_config=meta,
                      device=device)
    t0 = time.perf_counter()
    hist = trainer.fit(resume=resume)
    wall = time.perf_counter() - t0
    best = run / "irno" / "best"
    if find_checkpoint(best) is not None:
        sd, _ = load_checkpoint(best, map_location=device)
        model.load_state_dict(sd)
    return model, {"history": hist, "wall_s": wall, "train_s": trainer.elapsed,
                   "params_refiner": _param_count(model.refiner), "best_val_vrmse": trainer.best_score}


def load_irno(folder: str | Path, device="cpu"):
    from irno.checkpoint import load_checkpoint

    sd, meta = load_checkpoint(folder, map_location=device)
    base = build_base(meta["base"], meta["in_channels"], meta["out_channels"], _scale(meta))
    model = build_irno(meta["irno"], base, meta["in_channels"], meta["out_channels"], device=device).to(device)
    model.load_state_dict(sd)
    return model, meta


def load(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """A trained model from a checkpoint folder written by irno's trainer, in eval mode.

    ``path`` is a checkpoint folder (``runs/demo/irno/best``, ``runs/demo/base/best``) or a run folder
    (``runs/demo``: its ``irno/best``). Returns (model, meta): an :class:`irno.IRNO` (frozen base
    inside) or the base operator, by what the checkpoint holds; meta is its config.json, with the
    data's normalisation statistics under "normalization" (``irno.data.Normalization.from_dict``:
    the model maps normalised x to normalised y).
    """
    from irno.checkpoint import CONFIG, find_checkpoint

    folder = Path(path)
    if find_checkpoint(folder) is None:
        folder = folder / "irno" / "best"  # a run folder
    found = find_checkpoint(folder)
    if found is None:
        raise FileNotFoundError(f"path: {path} holds no complete checkpoint (expected a folder such as "
                                f"runs/demo/irno/best, or a run folder with irno/best inside)")
    kind = json.loads((found / CONFIG).read_text()).get("kind")
    if kind not in ("irno", "base"):
        raise ValueError(f"path: {folder}/{CONFIG} says kind {kind!r}; expected 'irno' or 'base'")
    model, meta = (load_irno if kind == "irno" else load_base)(folder, device)
    return model.eval(), meta


#: predict's automatic choice replays an IRNO from CUDA graphs from this many full batches on: each new
#: batch shape costs a capture and its warm-up runs, which a few replays must pay back
GRAPH_MIN_BATCHES = 4


def _predict_graphs(graphs, model, device: torch.device, full_batches: int) -> bool:
    """Whether predict replays ``model`` (an IRNO) from CUDA graphs: graphs=True, or "auto" on a CUDA
    device with at least GRAPH_MIN_BATCHES full batches."""
    from irno.irno import IRNO

    if not isinstance(model, IRNO):
        return False
    if graphs == "auto":
        return device.type == "cuda" and full_batches >= GRAPH_MIN_BATCHES
    return graphs


def predict(model, x: torch.Tensor, *, steps: int | None = None, normalization=None, batch_size: int = 32,
            device=None, progress: bool = True, graphs: bool | str = "auto") -> torch.Tensor:
    """Predictions in physical units for raw inputs, with a trained model.

    model: a run or checkpoint folder (loaded with :func:`load`, whose stored data statistics are used
        unless ``normalization`` is given), or a model (then ``normalization`` is a dict as stored with
        a checkpoint, an ``irno.data.Normalization``, or None for data used as it is).
    x: (B, C_in, H, W) raw fields, channels as the training data's x (the input frames of every field,
        time-major).
    steps: refinement steps of an IRNO (default its K); a base model takes none.
    Returns (B, C_out, H, W) float32 on the CPU: the model's output, denormalised. Runs in batches of
    ``batch_size`` under torch.no_grad on ``device`` (default: the model's, or CUDA when available for a
    folder), with a progress bar when there are several batches.
    graphs: replay an IRNO's base + steps from CUDA graphs (:class:`irno.GraphedIRNO`, one capture per
        batch shape; the same values as eager up to kernel rounding): True, False, or "auto" (on CUDA
        from GRAPH_MIN_BATCHES full batches; a capture that fails there warns and runs eagerly).
    """
    from irno.data import Normalization
    from irno.irno import IRNO

    if isinstance(model, (str, Path)):
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, meta = load(model, dev)
        if normalization is None:
            normalization = meta.get("normalization")
    else:
        first = next(iter(model.parameters()), None)
        dev = torch.device(device) if device is not None else (first.device if first is not None else "cpu")
        model = model.to(dev)
    if isinstance(normalization, dict):
        normalization = Normalization.from_dict(normalization)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a floating-point (B, C_in, H, W) tensor, got {got}")
    if not isinstance(model, IRNO) and steps is not None:
        raise ValueError("steps: the model is a base operator (no refinement steps); leave steps out")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if graphs not in (True, False, "auto"):
        raise ValueError(f"graphs: expected True, False or 'auto', got {graphs!r}")
    from tqdm.auto import tqdm

    from irno.graphed import GraphedIRNO

    was_training = model.training
    model.eval()
    out = []
    starts = range(0, x.shape[0], batch_size)
    replay = None
    if _predict_graphs(graphs, model, dev, x.shape[0] // batch_size):
        replay = GraphedIRNO(model, warmup=2, max_graphs=2)  # the full batches' shape and the last one's

    def run(xb):
        nonlocal replay
        if replay is not None:
            try:
                return replay(xb, steps=steps)
            except RuntimeError as err:
                if graphs is True:
                    raise
                warnings.warn(f"predict: CUDA-graph capture failed ({str(err).splitlines()[0][:200]}); "
                              f"running eagerly (graphs=False skips the attempt)", stacklevel=3)
                replay.clear()
                replay = None
        return model(xb, steps=steps) if isinstance(model, IRNO) else model(xb)

    try:
        with torch.no_grad():
            for i in tqdm(starts, desc="predict", disable=None if progress and len(starts) > 1 else True):
                xb = x[i:i + batch_size].to(dev, torch.float32)
                if normalization is not None:
                    xb = normalization.normalize(xb, channel_dim=1)
                yb = run(xb)
                if normalization is not None:
                    yb = normalization.denormalize(yb.float(), channel_dim=1)
                out.append(yb.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# evaluation and the whole job
# ---------------------------------------------------------------------------------------------
def _split(data: dict, name: str):
    """The evaluation split ``name``; a data set without a test split evaluates on "valid"."""
    if name in data:
        return data[name]
    if name == "test" and "valid" in data:
        return data["valid"]
    raise ValueError(f"evaluate.split: expected one of {sorted(data)}, got {name!r}")


def evaluate(cfg: dict, model, data: dict | None = None, refine_from=None) -> dict:
    from irno.evaluate import evaluate_irno

    device = _setup(cfg)
    data = data or datasets(cfg)
    ev = cfg["evaluate"]
    ds = _split(data, ev.get("split", "test"))
    loader = DataLoader(ds, batch_size=ev.get("batch_size", 32))
    extra = ev.get("extra_steps", 6)
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise ValueError(f"evaluate.extra_steps: expected an int >= 0 (steps past K to evaluate), got {extra!r}")
    return evaluate_irno(model, loader, steps=model.K + extra, device=device, field_names=ds.channel_names,
                         refine_from=refine_from, normalization=getattr(ds, "normalization", None))


def _sample_fields(model, ds, device, steps: int) -> dict:
    x, y = ds[0]
    with torch.no_grad():
        traj = model(x[None].to(device), steps=steps, return_trajectory=True)
    return {"x": x, "y": y, "trajectory": torch.stack([h[0].cpu() for h in traj]),
            "field_names": list(getattr(ds, "channel_names", []))}


def check_irno_settings(cfg: dict) -> None:
    """Raise the ValueError that IRNO's settings would raise once its training starts (the model, the
    loss, the training loop's settings), without data: the demo runs it before the base's training."""
    _train_config(cfg["base"]["train"], cfg.get("seed", 0)).check()
    _train_config(cfg["irno"]["train"], cfg.get("seed", 0)).check()
    _irno_loss(cfg["irno"])
    build_irno(cfg["irno"], torch.nn.Identity(), 1, 1)  # channel counts do not change what is checked


def demo(cfg: dict, resume: bool = False) -> Path:
    """The whole job: data, base, IRNO, control, evaluation, report. Returns the report's path."""
    from irno import metrics

    t_start = time.perf_counter()
    device = _setup(cfg)
    check_irno_settings(cfg)  # before minutes of data generation and base training
    run = Path(cfg["run_dir"])
    run.mkdir(parents=True, exist_ok=True)
    print(f"[irno] run folder {run.resolve()}  device {device}  threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    data = datasets(cfg)
    t_data = time.perf_counter() - t0
    print(f"[irno] data ready in {t_data:.1f} s: " + ", ".join(f"{k} {len(v)} pairs" for k, v in data.items()))

    print("[irno] training the base operator")
    base, base_info = train_base(cfg, data, resume=resume)
    print("[irno] training IRNO on the frozen base")
    model, irno_info = train_irno(cfg, base, data, resume=resume)

    controls = {}
    test = _split(data, cfg["evaluate"].get("split", "test"))
    loader = DataLoader(test, batch_size=cfg["evaluate"].get("batch_size", 32))

    @torch.no_grad()
    def test_vrmse(m):
        m.eval()
        vals = [metrics.vrmse(m(x.to(device)), y.to(device)).cpu() for x, y in loader]
        return float(torch.cat(vals).mean())

    base_v = test_vrmse(base)
    controls["base"] = {"vrmse": base_v, "train_s": base_info["train_s"], "params": base_info["params"]}
    if cfg.get("control", {}).get("enabled", True):
        # the control: spend IRNO's training time on more base training (schedule restarted)
        print(f"[irno] control: training the base for IRNO's training time ({irno_info['train_s']:.0f} s)")
        ccfg = copy.deepcopy(cfg)
        ccfg["base"]["train"]["time_budget_s"] = irno_info["train_s"]
        ccfg["base"]["train"]["max_steps"] = None  # the time budget alone decides (a step budget would stop it short)
        ccfg["base"]["train"]["patience"] = None
        ccfg["base"]["train"]["epochs"] = 1_000_000  # no epoch cap: a fast base would stop short of IRNO's time
        ctrl, ctrl_info = train_base(ccfg, data, out_name="control", init_from=run / "base" / "best")
        controls["base + more training (IRNO's time)"] = {
            "vrmse": test_vrmse(ctrl), "train_s": base_info["train_s"] + ctrl_info["train_s"],
            "params": ctrl_info["params"]}

    print("[irno] evaluating every step")
    t0 = time.perf_counter()
    results = evaluate(cfg, model, data)
    t_eval = time.perf_counter() - t0
    for c in controls.values():
        c["flops"] = results.get("flops_base")
    samples = _sample_fields(model, test, device, model.K + cfg["evaluate"].get("extra_steps", 6))
    run_info = {
        "config": cfg, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "wall_s": {"data": t_data, "base": base_info["wall_s"], "irno": irno_info["wall_s"], "evaluate": t_eval,
                   "total": time.perf_counter() - t_start},
        "train_s": {"base": base_info["train_s"], "irno": irno_info["train_s"]},  # training time proper
        "params": {"base": base_info["params"], "refiner": irno_info["params_refiner"]},
        "base_history": base_info["history"], "irno_history": irno_info["history"],
    }
    try:
        from irno.report import print_summary, write_report
    except ImportError:  # report module not available: keep the raw numbers
        from irno.checkpoint import atomic_write_text

        path = run / "metrics.json"
        atomic_write_text(path, json.dumps({"results": results, "controls": controls, "run_info": run_info},
                                           default=str))
        return path
    report = write_report(run, {"IRNO": results}, run_info=run_info, controls=controls, samples=samples)
    print(print_summary({"IRNO": results}))
    total = time.perf_counter() - t_start
    print(f"[irno] done in {total / 60:.1f} min; report: {Path(report).resolve()}")
    return Path(report)


def improvement(results: dict, metric: str = "vrmse") -> dict:
    """Relative change of the mean metric at K, at 2K and at the best step vs the base (k = 0)."""
    vals = [m["mean"] for m in results["metrics"][metric]]
    K = results["K"]
    base = vals[0]
    best = min(range(len(vals)), key=lambda k: vals[k])
    out = {"base": base, "at_K": vals[K], "best_step": best, "best": vals[best],
           "change_at_K": vals[K] / base - 1, "monotone_to_K": all(vals[k + 1] <= vals[k] for k in range(K))}
    if 2 * K < len(vals):
        out["at_2K"] = vals[2 * K]
        out["2K_over_min"] = vals[2 * K] / min(vals) - 1
    out["finite"] = all(math.isfinite(v) for v in vals)
    return out
