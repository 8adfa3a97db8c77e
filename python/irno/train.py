"""Training loops: a base operator on (x, y) pairs, and IRNO's refiner on a frozen base.

One :class:`Trainer` serves both. It implements the published optimiser recipe by default (Adam,
lr 3e-4, weight decay 1e-5, cosine decay to 1e-6 over the run, gradient-norm clip 1.0, batch 16),
skips and counts batches whose loss is not finite, validates after every epoch, keeps the best
weights, and checkpoints atomically so that ``resume=True`` continues a killed run exactly:

* the data order of epoch e is a permutation drawn from ``seed + e`` (not from the running RNG),
  so a resumed epoch sees the same batches in the same order;
* a checkpoint holds weights, optimiser, scheduler, RNG states and the position (epoch, step);
  steps already done in the interrupted epoch are skipped on resume.

Data parallel: launched under ``torchrun --nproc_per_node N`` (or with a process group already
initialised), each rank takes its share of every epoch's permutation (DistributedSampler) and the
gradients are averaged across ranks after each backward; only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from irno.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, float], "tuple[torch.Tensor, dict]"]
ValFn = Callable[[torch.nn.Module], dict]


@dataclass
class TrainConfig:
    """Optimiser and loop settings (defaults: the published recipe)."""

    epochs: int = 10
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-5
    lr_min: float = 1e-6
    grad_clip: float = 1.0
    seed: int = 0
    time_budget_s: float | None = None  # stop when this much training time has passed (mid-epoch);
    # with a budget, the cosine schedule runs over the budget's seconds instead of over the epochs
    max_steps: int | None = None  # a budget in optimiser steps instead of seconds (same lr schedule:
    # constant, then a cosine over the last decay_fraction); reproducible whatever the machine's speed
    decay_fraction: float = 0.3  # with a budget: the final share of it over which the lr decays
    patience: int | None = None  # stop after this many epochs without a better validation score
    monitor: str = "val_loss"  # key of the validation dict that decides "best" (lower is better)
    checkpoint_every: int = 0  # also checkpoint every N optimiser steps inside an epoch (0: epoch ends)
    num_workers: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form, stored with the checkpoint

    def check(self) -> None:
        """Raise a ValueError naming the first setting of a wrong type or out of range (settings
        that would train nothing, e.g. epochs 0 or patience 0, included)."""
        def need(name, ok, expected, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            kinds = (int,) if expected.startswith("an int") else (int, float)
            if isinstance(v, bool) or not isinstance(v, kinds) or not ok(v) or v != v:
                raise ValueError(f"train.{name}: expected {expected}{' or null' if optional else ''}, got {v!r}")

        need("epochs", lambda v: v >= 1, "an int >= 1")
        need("batch_size", lambda v: v >= 1, "an int >= 1")
        need("lr", lambda v: 0 < v < math.inf, "a number > 0")
        need("weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0")
        need("lr_min", lambda v: 0 <= v <= self.lr, "a number in [0, lr]")  # lr is checked above
        need("grad_clip", lambda v: 0 <= v <= math.inf, "a number >= 0 (0: no clipping)", optional=True)
        need("seed", lambda v: v >= 0, "an int >= 0")
        need("time_budget_s", lambda v: 0 < v <= math.inf, "a number of seconds > 0", optional=True)
        need("max_steps", lambda v: v >= 1, "an int >= 1", optional=True)
        need("decay_fraction", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        need("patience", lambda v: v >= 1, "an int >= 1", optional=True)
        need("checkpoint_every", lambda v: v >= 0, "an int >= 0 (0: at epoch ends)")
        need("num_workers", lambda v: v >= 0, "an int >= 0")
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"train.monitor: expected the name of a validation value, got {self.monitor!r}")


class NonFiniteLossError(RuntimeError):
    pass


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``) reached a single-process run: the step in progress
    finished and the run was checkpointed to ``last`` first, so ``--resume`` continues exactly."""


def distributed_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Initialise the default process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if not (dist.is_available() and "RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def _allreduce_mean_(params: list[torch.Tensor], world: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


class Trainer:
    """Train ``model``'s parameters that require grad with ``loss_fn(model, x, y, epoch) -> (loss, parts)``.

    Args:
        model: the module (for IRNO, the wrapper; its frozen base takes no gradients).
        loss_fn: returns a scalar loss and a dict of detached parts; ``epoch`` is fractional
            (epoch index + fraction done), for warm-up ramps.
        train_set: a Dataset of (x, y) pairs.
        val_fn: ``val_fn(model) -> dict`` of validation scores, run after every epoch (rank 0).
        config: :class:`TrainConfig`.
        out_dir: where ``last/`` and ``best/`` checkpoints go (None: nowhere).
        model_config: JSON-able description saved with every checkpoint (how to rebuild the model,
            normalisation statistics, ...).
        device: torch device of the model and batches.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, train_set: Dataset, val_fn: ValFn | None = None,
                 config: TrainConfig | None = None, out_dir: str | os.PathLike | None = None,
                 model_config: dict | None = None, device: str | torch.device = "cpu"):
        self.model = model
        self.loss_fn = loss_fn
        self.train_set = train_set
        self.val_fn = val_fn
        self.cfg = config or TrainConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.model_config = model_config or {}
        self.device = torch.device(device)
        self.rank, self.world = distributed_info()
        if len(train_set) == 0:
            raise ValueError("train_set: expected a non-empty dataset")
        self.cfg.check()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: no parameter requires grad (is everything frozen?)")
        self.optimizer = torch.optim.Adam(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        per_rank = len(train_set) // self.world  # the sampler and the loader drop the remainders
        if per_rank < self.cfg.batch_size:
            ranks = f" over {self.world} ranks" if self.world > 1 else ""
            raise ValueError(f"batch_size: {len(train_set)} training samples{ranks} give no full batch of "
                             f"{self.cfg.batch_size} (incomplete batches are dropped); lower batch_size or add data")
        self.steps_per_epoch = per_rank // self.cfg.batch_size
        total = self.steps_per_epoch * self.cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(total, 1),
                                                                    eta_min=self.cfg.lr_min)
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # optimiser steps done in the current epoch
        self.global_step = 0
        self.skipped = 0  # batches with a non-finite loss
        self.history: list[dict] = []
        self.best_score = math.inf
        self.bad_epochs = 0
        self.elapsed = 0.0
        self._epoch_start: float | None = None  # perf_counter at the start of the epoch in progress
        self._stop_signal: int | None = None  # a SIGTERM received during fit (see fit)
        self._epoch_sums: dict[str, float] = {}  # the epoch in progress: summed step losses ...
        self._epoch_count = 0  # ... over this many finite steps

    # ------------------------------------------------------------------------------------------
    def _loader(self, epoch: int) -> DataLoader:
        sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)  # the permutation depends on (seed, epoch) only
        # the loader's own generator: creating its iterator must not draw from the global RNG, or a
        # run resumed mid-epoch would see a shifted random stream
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.cfg.num_workers, generator=gen)

    def _state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "skipped": self.skipped, "history": self.history,
                "best_score": self.best_score, "bad_epochs": self.bad_epochs,
                # a checkpoint inside an epoch counts the epoch's time so far (a resumed budget goes on
                # from there, not from the epoch's start)
                "elapsed": self.elapsed + (time.perf_counter() - self._epoch_start
                                           if self._epoch_start is not None else 0.0),
                "train_config": asdict(self.cfg),
                # the epoch's running loss sums, so that a run resumed mid-epoch reports the epoch's
                # mean over all its steps (not only those after the resume)
                "epoch_sums": dict(self._epoch_sums), "epoch_count": self._epoch_count}

    def save(self, name: str = "last") -> Path | None:
        if self.out_dir is None or self.rank != 0:
            return None
        cfg = {**self.model_config, "train": asdict(self.cfg), "epoch": self.epoch, "history": self.history}
        return save_checkpoint(self.out_dir / name, self.model, cfg, self._state())

    def load(self, folder: str | os.PathLike) -> None:
        state_dict, saved_config, state = load_checkpoint(folder, map_location=self.device, with_state=True)
        try:
            self.model.load_state_dict(state_dict)
        except RuntimeError as err:  # the config now builds another model
            first = str(err).strip().splitlines()[-1].strip()
            raise ValueError(f"resume: {folder} holds a model of another shape than the config builds ({first}); "
                             f"restore the model settings, or train afresh without --resume") from None
        if state is None:
            raise ValueError(f"resume: {folder} holds weights but no training state (start without --resume)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        for k in ("epoch", "step_in_epoch", "global_step", "skipped", "history", "best_score", "bad_epochs",
                  "elapsed"):
            setattr(self, k, state[k])
        self._epoch_sums = dict(state.get("epoch_sums") or {})  # absent from checkpoints before 2026-11-27
        self._epoch_count = int(state.get("epoch_count") or 0)
        self._reconcile_config(state.get("train_config") or {})
        self._warn_changed_model_config(saved_config)

    def _warn_changed_model_config(self, saved: dict) -> None:
        """Say which model, loss or data settings differ from the checkpoint's (K, alpha, the loss
        weights...: the weights still fit, so the run goes on, with the new settings)."""
        def flat(d, prefix=""):  # dotted keys; train sections are _reconcile_config's
            out = {}
            for k, v in d.items():
                if k == "train" or (not prefix and k in ("epoch", "history")):
                    continue
                if isinstance(v, dict):
                    out.update(flat(v, f"{prefix}{k}."))
                else:
                    out[f"{prefix}{k}"] = v
            return out

        import json

        from irno.checkpoint import _json_default

        # compared as the checkpoint stored them (JSON: tuples as lists, numpy numbers as floats)
        now = json.loads(json.dumps(self.model_config, default=_json_default))
        old, now = flat(saved or {}), flat(now)
        changed = {k: (old[k], now[k]) for k in now if k in old and old[k] != now[k]}
        if changed and self.rank == 0:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:8])
            more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
            warnings.warn(f"resume: model, loss or data settings changed since the checkpoint ({what}{more}); "
                          f"the run goes on with the new ones", stacklevel=3)

    def _reconcile_config(self, saved: dict) -> None:
        """A resumed run keeps the checkpoint's optimiser and schedule; say which settings changed, and
        stretch the epoch schedule to a changed length (a cosine past its end would climb back up)."""
        now = asdict(self.cfg)
        cosmetic = ("progress", "num_workers", "checkpoint_every")
        changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k] and k not in cosmetic}
        if not changed:
            return
        total = max(self.steps_per_epoch * self.cfg.epochs, 1)
        if self.scheduler.T_max != total and not self._budgeted:
            # the cosine of a run planned for the new length, from the step reached: the scheduler's
            # recursive update then carries on from this learning rate
            step = min(self.scheduler.last_epoch, total)
            for g in self.optimizer.param_groups:
                base = g.get("initial_lr", self.cfg.lr)
                g["lr"] = self.cfg.lr_min + 0.5 * (base - self.cfg.lr_min) * (1 + math.cos(math.pi * step / total))
            self.scheduler.T_max = total
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.rank == 0:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            warnings.warn(f"resume: the training settings changed since the checkpoint ({what}); the run goes on "
                          f"with the checkpoint's optimiser state (the epoch schedule follows the new length)",
                          stacklevel=3)

    # ------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict]:
        """Train until ``epochs``, the time budget or the patience runs out; returns the history.

        In a single-process run on the main thread, SIGTERM ends training after the step in progress,
        with ``last`` checkpointed there (``TrainingInterrupted``, a KeyboardInterrupt); a torchrun job
        keeps the default (its checkpoints stay consistent, the steps since the last one are lost).
        """
        import signal
        import threading

        self._stop_signal = None
        handle = self.world == 1 and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_signal) if handle else None
        try:
            return self._fit(resume)
        finally:
            if handle:
                signal.signal(signal.SIGTERM, previous)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _stop_if_signalled(self, mid_epoch: bool) -> None:
        if self._stop_signal is None:
            return
        if mid_epoch:
            self.save("last")
        where = f"epoch {self.epoch}, step {self.step_in_epoch}" if mid_epoch else f"epoch {self.epoch}"
        raise TrainingInterrupted(f"signal {self._stop_signal}: stopped at {where}; last checkpointed")

    def _fit(self, resume: bool) -> list[dict]:
        if not resume and self.out_dir is not None and self.rank == 0 and find_checkpoint(self.out_dir / "best"):
            print(f"[irno] {self.out_dir} already holds a trained model: training afresh replaces it after the "
                  f"first epoch (--resume continues it instead)", flush=True)
        if resume and self.out_dir is not None and find_checkpoint(self.out_dir / "last") is not None:
            self.load(self.out_dir / "last")
            if self.rank == 0:
                print(f"resumed from {self.out_dir / 'last'} at epoch {self.epoch}, step {self.step_in_epoch}")
        while self.epoch < self.cfg.epochs:
            self._stop_if_signalled(mid_epoch=False)  # between epochs: last holds the finished one
            if self._out_of_budget() or self._out_of_patience():  # also a resumed run that had stopped
                break
            t0 = self._epoch_start = time.perf_counter()
            train_parts = self._train_epoch()
            self.elapsed += time.perf_counter() - t0
            self._epoch_start = None
            self.epoch += 1
            self.step_in_epoch = 0
            record = {"epoch": self.epoch, "elapsed_s": round(self.elapsed, 2), "skipped": self.skipped,
                      "lr": self.optimizer.param_groups[0]["lr"], **train_parts}
            if self.val_fn is not None and self.rank == 0:
                self.model.eval()
                record.update(self.val_fn(self.model))
                self.model.train()
            self.history.append(record)
            # best before last: last records the best score, so it must never claim a best that an
            # interruption kept from being written (a resume from the older last redoes the epoch)
            if self._track_best(record):
                self.save("best")
            self.save("last")
            if self.rank == 0:
                print("  ".join(f"{k}={_fmt(v)}" for k, v in record.items()), flush=True)
        if (self.rank == 0 and self.cfg.max_steps and self.global_step < self.cfg.max_steps
                and self.cfg.time_budget_s is not None and self.elapsed >= self.cfg.time_budget_s):
            warnings.warn(f"the time budget ({self.cfg.time_budget_s:g} s) ended training after {self.global_step} of "
                          f"max_steps={self.cfg.max_steps} steps: this machine is slower or busier than the budget "
                          f"assumes, so the model differs from a run that reaches max_steps", stacklevel=2)
        return self.history

    def _out_of_patience(self) -> bool:
        return self.cfg.patience is not None and self.bad_epochs >= self.cfg.patience

    @property
    def _budgeted(self) -> bool:
        return bool(self.cfg.time_budget_s) or bool(self.cfg.max_steps)

    def _out_of_budget(self) -> bool:
        if self.cfg.max_steps and self.global_step >= self.cfg.max_steps:
            return True
        return self.cfg.time_budget_s is not None and self.elapsed >= self.cfg.time_budget_s

    def _budget_spent(self, epoch_start: float) -> bool:
        if self.cfg.max_steps and self.global_step >= self.cfg.max_steps:
            return True  # the same step on every rank
        if not self.cfg.time_budget_s:
            return False
        spent = self.elapsed + time.perf_counter() - epoch_start >= self.cfg.time_budget_s
        if self.world > 1:  # every rank stops at the same step
            flag = torch.tensor([float(spent)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            spent = bool(flag[0])
        return spent

    def _set_time_lr(self, epoch_start: float) -> None:
        """With a budget (seconds, or steps with max_steps) the schedule runs over it, not over epochs, so the
        learning rate reaches lr_min when the time is up whatever the speed of the machine: constant for
        the first ``1 - decay_fraction`` of the budget, then a cosine down to lr_min."""
        if self.cfg.max_steps:
            frac = min(1.0, self.global_step / self.cfg.max_steps)
        else:
            frac = min(1.0, (self.elapsed + time.perf_counter() - epoch_start) / self.cfg.time_budget_s)
        d = min(max(self.cfg.decay_fraction, 1e-6), 1.0)
        t = max(0.0, (frac - (1 - d)) / d)
        lr = self.cfg.lr_min + 0.5 * (self.cfg.lr - self.cfg.lr_min) * (1 + math.cos(math.pi * t))
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def _track_best(self, record: dict) -> bool:
        score = record.get(self.cfg.monitor, record.get("loss"))
        if score is None or not math.isfinite(score):
            return False
        if score < self.best_score:
            self.best_score, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    def _train_epoch(self) -> dict:
        from tqdm.auto import tqdm

        self.model.train()
        loader = self._loader(self.epoch)
        if self.step_in_epoch == 0:  # a fresh epoch; a resumed one goes on from the checkpoint's sums
            self._epoch_sums, self._epoch_count = {}, 0
        sums = self._epoch_sums
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}",
                   disable=None if (self.cfg.progress and self.rank == 0) else True,  # None: off when not a TTY
                   leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(loader):
            if i >= self.steps_per_epoch:
                break
            if i < self.step_in_epoch:  # done before an interruption
                continue
            if self._budget_spent(t0):
                break  # the time budget ends the run mid-epoch
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            frac = self.epoch + i / self.steps_per_epoch
            if self._budgeted:
                self._set_time_lr(t0)
            loss, parts = self.loss_fn(self.model, x, y, frac)
            finite = torch.isfinite(loss.detach())
            if self.world > 1:  # every rank skips together
                flag = finite.float().reshape(1)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite = flag.bool()[0]
            self.optimizer.zero_grad(set_to_none=True)
            if bool(finite):
                loss.backward()
                _allreduce_mean_(self.params, self.world)
                if self.cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
                self.optimizer.step()
                for k, v in {"loss": loss.detach(), **parts}.items():
                    if isinstance(v, torch.Tensor) and v.numel() == 1:
                        sums[k] = sums.get(k, 0.0) + float(v)
                    elif isinstance(v, float | int):
                        sums[k] = sums.get(k, 0.0) + float(v)
                self._epoch_count += 1
            else:
                self.skipped += 1
            if not self._budgeted:
                self.scheduler.step()
            self.global_step += 1
            self.step_in_epoch = i + 1
            seen += x.shape[0] * self.world
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}", samples_s=f"{seen / (time.perf_counter() - t0):.1f}")
            if self.cfg.checkpoint_every and self.step_in_epoch % self.cfg.checkpoint_every == 0 \
                    and self.step_in_epoch < self.steps_per_epoch:
                self.save("last")
            if self.step_in_epoch < self.steps_per_epoch:  # the epoch's last step: its end saves
                self._stop_if_signalled(mid_epoch=True)
        bar.close()
        out = {k: v / max(self._epoch_count, 1) for k, v in sums.items()}
        out["samples_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
        return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
