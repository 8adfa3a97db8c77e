"""A tiny deterministic training job driven by tests/test_train.py (as a subprocess or via torchrun).

    python tests/_train_job.py OUT_DIR [--resume] [--sleep S] [--epochs N]
Writes OUT_DIR/final_rank{r}.pt with the final parameters and history.
"""

import argparse
import sys
import time

import torch
from irno.train import TrainConfig, Trainer, TrainingInterrupted, distributed_info, init_distributed_from_env
from torch.utils.data import TensorDataset


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--nan-every", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    init_distributed_from_env()
    rank, world = distributed_info()
    g = torch.Generator().manual_seed(123)
    x = torch.randn(64, 2, 8, 8, generator=g)
    y = x.roll(1, -1).sum(1, keepdim=True) + 0.1 * torch.randn(64, 1, 8, 8, generator=g)
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, 1, 1))
    calls = {"n": 0}

    def loss_fn(m, xb, yb, epoch):
        time.sleep(a.sleep)
        calls["n"] += 1
        noise = 0.01 * torch.randn(()).item()  # draws from the RNG: resume must restore it
        loss = torch.nn.functional.mse_loss(m(xb), yb) * (1 + noise)
        if a.nan_every and calls["n"] % a.nan_every == 0:
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}

    def val_fn(m):
        with torch.no_grad():
            return {"val_loss": float(torch.nn.functional.mse_loss(m(x[:16]), y[:16]))}

    cfg = TrainConfig(epochs=a.epochs, batch_size=8, lr=1e-2, checkpoint_every=3, progress=False)
    tr = Trainer(model, loss_fn, TensorDataset(x, y), val_fn, cfg, out_dir=a.out, model_config={"kind": "toy"})
    try:
        hist = tr.fit(resume=a.resume)
    except TrainingInterrupted:  # SIGTERM: record how many steps ran, for the test to compare
        torch.save({"loss_calls": calls["n"]}, f"{a.out}/interrupted_rank{rank}.pt")
        sys.exit(143)
    torch.save({"params": [q.detach().clone() for q in model.parameters()], "history": hist,
                "skipped": tr.skipped}, f"{a.out}/final_rank{rank}.pt")
    print(f"rank {rank}/{world} done", file=sys.stderr)


if __name__ == "__main__":
    main()
