"""Which kernels one call of an op launches, and for how long: torch.profiler over a few calls of the
ops behind the unmet GPU targets, per provider, at bench_ops.py's shapes. Where bench_ops gives a
ratio, this says where the time goes (a slow kernel, many small ones, or host gaps between them).

    python benchmarks/profile_ops.py                        # every case below, on CUDA
    python benchmarks/profile_ops.py --cases mix --top 6
    python benchmarks/profile_ops.py --device cpu --cases layer --calls 2    # a quick look on CPU

For each (case, provider): the wall time per call (host and device, synchronised), the device time
per call summed over kernels, the kernel count, and the top kernels by device time. On a GPU a wall
time well above the device time means the call is host-bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import PROVIDER_BACKEND, fwdbwd_call, loss_case, spectral_conv_case, spectral_mix_case  # noqa: E402

import irno_kernels as ik  # noqa: E402

#: name -> (case, mode, providers): the ops of the unmet targets (benchmarks/targets.py)
CASES = {
    "layer": (lambda: spectral_conv_case(16, 64, 256, 256, 16), "fwd", ("reference", "cuda", "triton", "dft")),
    "layer_bwd": (lambda: spectral_conv_case(16, 64, 256, 256, 16), "fwdbwd", ("reference", "dft", "triton")),
    "mix": (lambda: spectral_mix_case(16, 64, 256, 256, 16), "fwdbwd", ("reference", "triton", "triton_few")),
    "loss": (lambda: loss_case(16, 4, 128, 384, "magnitude"), "fwdbwd", ("reference", "cuda", "triton")),
}


def _callable(case, provider: str, mode: str, args):
    if provider == "reference":
        fn = case.ref
    elif provider in case.extra:
        fn = case.extra[provider][1]
    else:
        fn = lambda *a: case.fast(*a, backend=provider)  # noqa: E731
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*args)
        return call
    return fwdbwd_call(fn, args, case.grad_args)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_one(call, device: str, calls: int, top: int) -> list[str]:
    for _ in range(3):  # warm-up: compilation, cuFFT plans, caches
        call()
    _sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        call()
    _sync(device)
    wall = (time.perf_counter() - t) / calls
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            call()
        _sync(device)
    events = prof.key_averages()
    if device == "cuda":
        timed = [e for e in events if getattr(e, "self_device_time_total", 0) > 0]
        kernels = [e for e in timed if "cuda" in str(getattr(e, "device_type", "")).lower()] or timed
        key = "self_device_time_total"
    else:
        kernels = [e for e in events if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
        key = "self_cpu_time_total"
    kernels.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in kernels) / calls / 1e3
    count = sum(e.count for e in kernels) / calls
    lines = [f"    wall {wall * 1e3:8.3f} ms/call, {'device' if device == 'cuda' else 'aten self'} "
             f"{total:8.3f} ms/call in {count:.0f} {'kernels' if device == 'cuda' else 'ops'}"]
    for e in kernels[:top]:
        lines.append(f"      {getattr(e, key) / calls / 1e3:8.3f} ms  x{e.count / calls:<4.0f} {e.key[:110]}")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--top", type=int, default=5)
    a = p.parse_args(argv)
    names = [c for c in a.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; expected names from {list(CASES)}")
    if a.calls < 1:
        p.error(f"--calls: expected >= 1, got {a.calls}")
    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"profile_ops on {dev_name}, torch {torch.__version__}")
    for name in names:
        make_case, mode, providers = CASES[name]
        case = make_case()
        args = case.make(a.device, torch.float32)
        base = "spectral_conv2d" if case.op == "spectral_mix" else case.op.split("[")[0]
        print(f"{name}: {case.op} {case.shape} {mode}")
        for prov in providers:
            need = case.extra[prov][0] if prov in case.extra else PROVIDER_BACKEND.get(prov)
            if need is not None and not ik.available(base, need, a.device):
                continue
            print(f"  {prov}")
            try:
                print("\n".join(profile_one(_callable(case, prov, mode, args), a.device, a.calls, a.top)))
            except Exception as err:  # a provider that fails is reported, not fatal
                print(f"    FAILED {type(err).__name__}: {str(err)[:200]}")


if __name__ == "__main__":
    main()
