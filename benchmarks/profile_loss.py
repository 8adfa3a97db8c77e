"""Where the host time of an eager spectral loss forward+backward goes: torch.profiler (CPU side) over
a few calls of irno_kernels.spectral_loss / radial_spectrum per backend, at one of bench_ops' field
shapes. Eager timings of these ops are host-bound on a GPU (the kernels take tens of microseconds);
this shows which calls cost the host time.

    python benchmarks/profile_loss.py --device cuda --shape 16,1,64,64 --backends reference,cuda,triton
    python benchmarks/profile_loss.py --device cpu --shape 4,1,32,32 --backends reference,cpu
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import irno_kernels as ik


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="16,1,64,64", help="B,C,H,W")
    p.add_argument("--op", choices=["spectral_loss", "radial_spectrum"], default="spectral_loss")
    p.add_argument("--mode", default="magnitude")
    p.add_argument("--backends", default="reference,cuda,triton")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--top", type=int, default=10)
    a = p.parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split(","))
    if len(shape) != 4:
        p.error(f"--shape must be B,C,H,W, got {a.shape!r}")
    torch.manual_seed(0)
    pred = torch.randn(shape, device=a.device)
    target = torch.randn(shape, device=a.device)

    for backend in [b for b in a.backends.split(",") if b]:
        if not ik.available(a.op, backend, a.device):
            print(f"{backend}: not available for {a.op} on {a.device}")
            continue
        leaves = [pred.detach().requires_grad_(), target.detach().requires_grad_()]

        if a.op == "spectral_loss":
            def fwd(p_, t_, b=backend):
                return ik.spectral_loss(p_, t_, 1.5, 0.5, a.mode, backend=b)
        else:
            def fwd(p_, t_, b=backend):
                return ik.radial_spectrum(p_, backend=b).sum()

        def fwdbwd(fwd=fwd, leaves=leaves):
            out = fwd(*leaves)
            return torch.autograd.grad(out, leaves, allow_unused=True)

        def fwd_only(fwd=fwd, leaves=leaves):
            with torch.no_grad():
                return fwd(*leaves)

        for name, fn in (("fwd", fwd_only), ("fwdbwd", fwdbwd)):
            for _ in range(5):
                fn()
            _sync(a.device)
            t0 = time.perf_counter()
            for _ in range(a.iters):
                fn()
            host = (time.perf_counter() - t0) / a.iters
            _sync(a.device)
            total = (time.perf_counter() - t0) / a.iters
            print(f"{a.op} {backend:9s} {name:6s} host {host * 1e3:7.3f} ms/call, "
                  f"with the device {total * 1e3:7.3f} ms/call")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                fwdbwd()
            _sync(a.device)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
