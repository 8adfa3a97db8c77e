"""Shared helpers of the benchmark scripts: timing, environment facts, CSV output."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """$IRNO_COMMIT if set (a copied tree may carry a stale .git), else the checkout's HEAD."""
    if os.environ.get("IRNO_COMMIT"):
        return os.environ["IRNO_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=root, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux) with its widest vector/matrix extension, e.g.
    "AMD EPYC (AVX2)" (which decides the speed of the CPU kernels and of bf16), else ""."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    isa = next((name for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                if flag in flags), "")
    return f"{model} ({isa})" if model and isa else model


def environment(device: str) -> dict:
    """Facts every result row carries: device, versions, date, commit, threads."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_model() or platform.processor() or platform.machine()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "triton": triton_version,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
    }


def time_fn(fn, device: str, min_run_time: float = 0.5) -> float:
    """Median seconds per call of ``fn()`` after warm-up (CUDA events via triton.testing.do_bench
    on the GPU when available, torch.utils.benchmark otherwise)."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
        except ImportError:
            pass
    from torch.utils.benchmark import Timer

    fn()  # warm-up (allocations, torch.compile)
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median


def graphed(call):
    """``call`` captured once in a CUDA graph (after warm-up on a side stream); returns the replay
    function, whose time is the GPU time of ``call`` without its CPU launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def copy_bandwidth(device: str, nbytes: int = 256 * 2**20) -> float:
    """Measured bytes/s of a device-to-device copy (read + write), the memory roofline's rate."""
    n = nbytes // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, min_run_time=0.2)
    return 2 * nbytes / t


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        if new:
            w.writeheader()
        w.writerows(rows)
