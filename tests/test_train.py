"""Training loop: recipe defaults, non-finite batches, exact resume after SIGKILL, and DDP (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from irno.checkpoint import find_checkpoint
from irno.train import TrainConfig

JOB = str(Path(__file__).with_name("_train_job.py"))


def _run(out, *extra, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, JOB, str(out), *extra], capture_output=True, text=True, env=env,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(Path(out) / "final_rank0.pt")


def test_defaults_are_the_published_recipe():
    c = TrainConfig()
    assert (c.lr, c.weight_decay, c.lr_min, c.grad_clip, c.batch_size) == (3e-4, 1e-5, 1e-6, 1.0, 16)


def test_non_finite_batches_are_skipped_and_counted(tmp_path):
    res = _run(tmp_path, "--epochs", "1", "--nan-every", "3")
    assert res["skipped"] == 8 // 3  # 8 steps per epoch, every third loss is NaN
    assert all(torch.isfinite(p).all() for p in res["params"])


def _start_slow_job(out):
    """The toy training job in a subprocess, 0.05 s per step (to be interrupted)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, JOB, str(out), "--sleep", "0.05"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    ref = _run(tmp_path / "ref")
    out = tmp_path / "killed"
    proc = _start_slow_job(out)
    marker = out / "last" / "complete"
    deadline = time.time() + 60
    # wait for the second epoch (mid-epoch checkpoints are written every 3 steps)
    while time.time() < deadline:
        if marker.exists():
            try:
                if json.loads((out / "last" / "config.json").read_text())["epoch"] >= 1:
                    break
            except (OSError, ValueError, KeyError):
                pass  # being rewritten
        time.sleep(0.05)
    time.sleep(0.3)  # a few more steps past the checkpoint, then kill mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final_rank0.pt").exists()
    last = find_checkpoint(out / "last")  # last/ itself, or its complete sibling if killed mid-swap
    assert json.loads((last / "config.json").read_text())["epoch"] < 3  # killed before the end
    res = _run(out, "--resume")
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    for a, b in zip(ref["params"], res["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["val_loss"] for h in ref["history"]] == [h["val_loss"] for h in res["history"]]
    # the epoch cut by the kill reports its mean training loss over all its steps, as uninterrupted
    assert [h["loss"] for h in ref["history"]] == [h["loss"] for h in res["history"]]


def test_sigterm_checkpoints_the_step_reached_and_resume_matches(tmp_path):
    """SIGTERM (a scheduler's preemption) ends a single-process run after the step in progress, with
    last/ checkpointed at that step (between the every-3-steps checkpoints), and --resume then ends
    exactly where an uninterrupted run does."""
    from irno.checkpoint import load_checkpoint

    ref = _run(tmp_path / "ref")
    out = tmp_path / "term"
    proc = _start_slow_job(out)
    marker = out / "last" / "complete"
    deadline = time.time() + 60
    while time.time() < deadline and not marker.exists():
        time.sleep(0.05)
    time.sleep(0.4)  # into the run, between checkpoints
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()[-2000:]
    calls = torch.load(out / "interrupted_rank0.pt")["loss_calls"]
    _, _, state = load_checkpoint(out / "last", with_state=True)
    assert state["global_step"] == calls  # every step that ran is in the checkpoint
    res = _run(out, "--resume")
    for a, b in zip(ref["params"], res["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["loss"] for h in ref["history"]] == [h["loss"] for h in res["history"]]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_process_gloo_training_stays_in_sync(tmp_path):
    # --standalone: torchrun picks a free port (a fixed one failed with EADDRINUSE when two test
    # runs shared the machine)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           JOB, str(tmp_path), "--epochs", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    r0 = torch.load(tmp_path / "final_rank0.pt")
    r1 = torch.load(tmp_path / "final_rank1.pt")
    for a, b in zip(r0["params"], r1["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the job learned something: the loss went down
    assert r0["history"][-1]["loss"] < r0["history"][0]["loss"]


def test_time_budget_stops_mid_epoch_with_a_cosine_over_the_budget():
    from irno.train import Trainer
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    data = TensorDataset(torch.randn(400, 1, 8, 8), torch.randn(400, 1, 8, 8))

    def slow_loss(m, x, y, epoch):
        time.sleep(0.01)
        return torch.nn.functional.mse_loss(m(x), y), {}

    cfg = TrainConfig(epochs=5, batch_size=4, lr=1e-2, lr_min=1e-4, time_budget_s=0.6, progress=False)
    tr = Trainer(model, slow_loss, data, config=cfg)
    hist = tr.fit()
    assert len(hist) == 1 and tr.global_step < tr.steps_per_epoch  # stopped inside the first epoch
    assert hist[0]["lr"] < 0.2 * cfg.lr  # the schedule ran (almost) to its end with the time


def test_step_budget_stops_at_max_steps_with_the_same_schedule_shape():
    from irno.train import Trainer
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    data = TensorDataset(torch.randn(40, 1, 8, 8), torch.randn(40, 1, 8, 8))
    lrs = []

    def loss(m, x, y, epoch):
        lrs.append(tr.optimizer.param_groups[0]["lr"])
        return torch.nn.functional.mse_loss(m(x), y), {}

    cfg = TrainConfig(epochs=10, batch_size=4, lr=1e-2, lr_min=1e-4, max_steps=25, decay_fraction=0.4,
                      progress=False)
    tr = Trainer(model, loss, data, config=cfg)
    hist = tr.fit()
    assert tr.global_step == 25 and len(lrs) == 25 and len(hist) == 3  # 10 steps per epoch: stops mid-epoch 3
    assert lrs[:15] == [cfg.lr] * 15  # constant for the first 60% of the steps
    assert all(a > b for a, b in zip(lrs[15:], lrs[16:]))  # then a cosine down
    assert lrs[-1] < 0.05 * cfg.lr


def _tiny_trainer(out, scores, **cfg_kw):
    """A Trainer on a tiny conv whose validation scores are given per epoch (1-based list)."""
    from irno.train import Trainer
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    data = TensorDataset(torch.randn(16, 1, 6, 6), torch.randn(16, 1, 6, 6))

    def loss(m, x, y, epoch):
        return torch.nn.functional.mse_loss(m(x), y), {}

    def val(m):
        return {"val_loss": scores[len(tr.history)]}

    cfg = TrainConfig(**{"epochs": len(scores), "batch_size": 4, "progress": False, **cfg_kw})
    tr = Trainer(model, loss, data, val_fn=val, config=cfg, out_dir=out)
    return tr


def test_an_interrupted_best_checkpoint_is_not_claimed_by_last(tmp_path, monkeypatch):
    """An interruption while best/ is written must not leave last/ recording that best score: the
    resumed run redoes the epoch and writes best/ (before the fix, best/ kept older, worse weights
    and last/ claimed the better score, so later better epochs were never kept)."""
    from irno.checkpoint import load_checkpoint
    from irno.train import Trainer

    scores = [0.9, 0.5, 0.8, 0.7]
    tr = _tiny_trainer(tmp_path, scores)
    real = Trainer.save

    def interrupted(self, name="last"):
        if name == "best" and self.epoch == 2:
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(Trainer, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    monkeypatch.setattr(Trainer, "save", real)
    tr = _tiny_trainer(tmp_path, scores)
    tr.fit(resume=True)
    _, cfg, state = load_checkpoint(tmp_path / "best", with_state=True)
    assert cfg["epoch"] == 2 and state["best_score"] == 0.5 and tr.best_score == 0.5


def test_resume_after_patience_does_not_train_again(tmp_path):
    scores = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    tr = _tiny_trainer(tmp_path, scores, patience=2)
    assert [h["epoch"] for h in tr.fit()] == [1, 2, 3]  # two epochs without a better score
    for _ in range(2):
        tr = _tiny_trainer(tmp_path, scores, patience=2)
        assert len(tr.fit(resume=True)) == 3


def test_resume_with_more_epochs_stretches_the_schedule_and_says_so(tmp_path):
    tr = _tiny_trainer(tmp_path, [1.0, 0.9], lr=1e-2, lr_min=1e-4)
    tr.fit()
    tr = _tiny_trainer(tmp_path, [1.0, 0.9, 0.8, 0.7], lr=1e-2, lr_min=1e-4)
    with pytest.warns(UserWarning, match=r"epochs: 2 -> 4"):
        hist = tr.fit(resume=True)
    fresh = _tiny_trainer(tmp_path / "fresh", [1.0, 0.9, 0.8, 0.7], lr=1e-2, lr_min=1e-4).fit()
    # from the resume on, the schedule of a run planned for 4 epochs (the old one, past its end, rose
    # again: a cosine's second half)
    for a, b in zip(hist[2:], fresh[2:]):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert hist[3]["lr"] < hist[2]["lr"]


def test_a_mid_epoch_checkpoint_counts_the_epoch_time_so_far(tmp_path):
    from irno.train import Trainer

    tr = _tiny_trainer(tmp_path, [1.0], checkpoint_every=1)
    real = Trainer._train_epoch

    def slow_epoch(self):
        time.sleep(0.2)
        return real(self)

    saved = []
    real_state = Trainer._state

    def recording_state(self):
        state = real_state(self)
        if 0 < self.step_in_epoch:  # inside the epoch
            saved.append(state["elapsed"])
        return state

    Trainer._train_epoch, Trainer._state = slow_epoch, recording_state
    try:
        tr.fit()
    finally:
        Trainer._train_epoch, Trainer._state = real, real_state
    # the mid-epoch checkpoints were written after the 0.2 s sleep: they count it (they said 0 before)
    assert saved and min(saved) >= 0.2


def test_fewer_samples_than_a_batch_is_a_clear_error():
    from irno.train import Trainer
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(10, 1, 4, 4), torch.randn(10, 1, 4, 4))
    with pytest.raises(ValueError, match="batch_size: 10 training samples give no full batch of 16"):
        Trainer(torch.nn.Conv2d(1, 1, 1), lambda m, x, y, e: (m(x).mean(), {}), data)


def test_resume_into_another_model_shape_is_a_clear_error(tmp_path):
    from irno.train import Trainer
    from torch.utils.data import TensorDataset

    _tiny_trainer(tmp_path, [1.0]).fit()
    data = TensorDataset(torch.randn(16, 1, 6, 6), torch.randn(16, 1, 6, 6))
    other = Trainer(torch.nn.Conv2d(1, 1, 5, padding=2), lambda m, x, y, e: (m(x).mean(), {}), data,
                    config=TrainConfig(epochs=2, batch_size=4, progress=False), out_dir=tmp_path)
    with pytest.raises(ValueError, match="holds a model of another shape"):
        other.fit(resume=True)


def test_a_time_budget_that_cuts_a_step_budget_short_says_so():
    from irno.train import Trainer
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(40, 1, 4, 4), torch.randn(40, 1, 4, 4))

    def slow(m, x, y, e):
        time.sleep(0.02)
        return torch.nn.functional.mse_loss(m(x), y), {}

    cfg = TrainConfig(epochs=5, batch_size=4, max_steps=1000, time_budget_s=0.2, progress=False)
    tr = Trainer(torch.nn.Conv2d(1, 1, 1), slow, data, config=cfg)
    with pytest.warns(UserWarning, match=r"time budget \(0.2 s\) ended training after \d+ of max_steps=1000"):
        tr.fit()
