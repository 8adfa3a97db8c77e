"""Where the time of one IRNO inference call goes: torch.profiler over the eager project model at
the end-to-end benchmark's 256x256 case (FNO base + K U-Net refiner steps), kernels grouped by name.

    python benchmarks/profile_irno.py --device cuda --batch 16 --variant bf16
    python benchmarks/profile_irno.py --device cpu --batch 1 --size 64     # a quick look on CPU
    python benchmarks/profile_irno.py --device cpu --batch 8 --size 64 --K 4 --variant bf16 --train

Prints the top kernels by self device time and the share of the conv / norm / elementwise / FFT
families, so the next optimisation targets what dominates rather than what is guessed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _plain import plain_irno_loss, spectral_weight  # noqa: E402
from bench_irno import BETA_FP, Case, build, train_step_fn  # noqa: E402
from irno import IRNOLoss  # noqa: E402
from irno.losses import spectral_lambda  # noqa: E402

FAMILIES = {
    "conv": ("conv", "cudnn", "implicit_gemm", "sm90_xmma", "gemm", "cutlass", "wgrad", "dgrad"),
    "fft": ("fft", "spectral", "regular_fft", "vector_fft"),
    "norm": ("layer_norm", "LayerNorm", "norm_kernel", "_cln_"),  # _cln_*: the Triton channel LayerNorm (+ GELU)
    "pool/upsample/pad": ("max_pool", "upsample", "pad", "circular"),
    "copy/cat/layout": ("copy", "cat", "nchwToNhwc", "nhwcToNchw", "transpose", "CatArray"),
}


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES.items():
        if any(k.lower() in low for k in keys):
            return fam
    return "other (elementwise, update, ...)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--K", type=int, default=6)
    p.add_argument("--variant", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: refiner_dtype=bf16 and channels_last, as bench_irno's graphed+bf16")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--plain", action="store_true",
                   help="profile the plain-PyTorch model of bench_irno instead of the project's eager model")
    p.add_argument("--train", action="store_true",
                   help="one training step (IRNO loss over K unrolled steps, backward, clip, Adam) instead of "
                        "an inference call")
    a = p.parse_args(argv)
    case = Case("train" if a.train else "infer", a.batch, 4, 1, a.size, a.size, 16 if a.size >= 128 else 8,
                64 if a.size >= 128 else 16)
    model, plain = build(case, a.device, a.K)
    model.train(a.train)
    if a.variant == "bf16":
        model.refiner_dtype, model.channels_last = torch.bfloat16, True
    x = torch.randn(case.B, case.cx, case.H, case.W, device=a.device)
    if a.train:
        y = torch.randn(case.B, case.cy, case.H, case.W, device=a.device)
        if a.plain:
            weights = [spectral_weight(case.H, case.W, spectral_lambda(k, a.K), device=a.device) for k in range(a.K)]
            net = plain.train()
            call, _ = train_step_fn(lambda: plain_irno_loss(net, x, y, a.K, weights, beta_fp=BETA_FP),
                                    list(net.phi.parameters()))
        else:
            call, _ = train_step_fn(lambda: IRNOLoss(a.K, beta_fp=BETA_FP)(model, x, y)[0],
                                    list(model.refiner_parameters()))
    else:
        call = (lambda: plain(x, a.K)) if a.plain else (lambda: model(x))
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    with torch.set_grad_enabled(a.train):
        for _ in range(3):
            call()
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            call()
        sync()
        wall = (time.perf_counter() - t0) / 5
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                call()
            sync()
    dev = "cuda" if a.device == "cuda" else "cpu"

    def self_time(e) -> float:  # torch >= 2.4 names the accelerator's time "device"
        if dev == "cpu":
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    events = [e for e in prof.key_averages() if self_time(e) > 0]
    if dev == "cpu":  # on CPU, operators rather than kernels
        events = [e for e in events if e.key.startswith("aten::")]
    else:  # kernels only (an operator's device time is its kernels' time: do not count it twice)
        events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
                  and not e.key.startswith(("aten::", "irno"))]
    total = sum(self_time(e) for e in events) or 1.0
    launches = sum(e.count for e in events) // 3
    events.sort(key=lambda e: -self_time(e))
    who = ("plain PyTorch" if a.plain else "IRNO eager") + (" training step" if a.train else "")
    print(f"{who}, {case.H}x{case.W} B{case.B}, K={a.K}, {a.variant}, {dev}: {wall * 1e3:.2f} ms wall, "
          f"{total / 3 / 1e3:.2f} ms of {dev} time, {launches} kernels per call")
    fams: dict[str, float] = {}
    for e in events:
        t = self_time(e)
        fams[family(e.key)] = fams.get(family(e.key), 0.0) + t
    print("by family: " + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(fams.items(), key=lambda kv: -kv[1])))
    for e in events[: a.top]:
        t = self_time(e)
        print(f"  {t / total:6.1%} {t / 3 / 1e3:8.3f} ms  x{e.count // 3:<4d} {e.key[:90]}")


if __name__ == "__main__":
    main()
