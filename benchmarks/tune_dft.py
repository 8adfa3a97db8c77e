"""Launch configurations of the Triton truncated-DFT kernels, timed side by side on one GPU.

The two kernels of irno_kernels/triton/spectral_dft.py (grid_to_modes: the kept rfft2 modes of each
plane; modes_to_grid: the inverse) run with the tiles, warps, pipeline stages and (grid_to_modes)
row bands of ``CONFIG``, one configuration per kernel and precision. This script times each kernel
under a list of alternatives on the layer shape of the targets (B16 C64 256x256 m16: 1024 planes), in
the accurate mode (tf32x3) and the fast mode (tf32), each with its own list, checks every alternative
against the current configuration's result, and prints the best per kernel and mode with its time
relative to the current one: the numbers to set ``CONFIG[kernel][mode]`` from.

    python benchmarks/tune_dft.py --csv OUT/tune_dft.csv          # CUDA
    TRITON_INTERPRET=1 python benchmarks/tune_dft.py --quick      # CPU smoke run (interpreter)

Each alternative compiles its kernel once (about a second); the full list fits in well under a minute.

After them it times the mixing of the DFT route's compact spectra (the layer's step between the two
kernels): torch.einsum (the baseline, the former default) against the Triton mixing kernels
(COMPACT_MIX = "triton") with their default tiles and with MIN_PROGRAMS 0 and 2048, forward and
forward + backward.

Last, the FFT route's mixing kernel (irno_kernels/triton/spectral_conv.py, forward and the input
gradient's conj-transposed launch) under its module settings: input channels per loop step
(MIX_UNROLL), floats per zero program (ZERO_BLOCK), the zero-filled spectrum of before FUSED_ZERO, and
the largest tiles (MIN_PROGRAMS = 0); each result against the current settings' one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, time_fn, write_csv  # noqa: E402

from irno_kernels.triton import spectral_conv as MX  # noqa: E402
from irno_kernels.triton import spectral_dft as D  # noqa: E402

#: alternatives per kernel and precision (the current CONFIG is timed first, as the baseline of the
#: ratios). The registers ptxas gives each for sm_90 (benchmarks/kernel_resources.py) in brackets:
#: in tf32x3 the current grid_to_modes tiles take 255 (two 4-warp programs per SM), hence the small
#: tiles there; "wgmma": 64-row tiles on one warpgroup, the shape Hopper's warpgroup MMA takes.
G2M = {
    "tf32x3": [
        # the real and imaginary columns in programs of their own (PARTS = 2): one DFT matrix per program
        dict(BH=32, BW=32, num_warps=4, num_stages=3, SPLIT=1, PARTS=2),  # [127]
        dict(BH=32, BW=32, num_warps=4, num_stages=4, SPLIT=1, PARTS=2),  # [127]
        dict(BH=16, BW=16, num_warps=2, num_stages=3, SPLIT=1, PARTS=2),  # [96]
        dict(BH=32, BW=64, num_warps=4, num_stages=3, SPLIT=1, PARTS=2),  # [183]
        dict(BH=16, BW=16, num_warps=2, num_stages=3, SPLIT=1),  # [128]
        dict(BH=16, BW=16, num_warps=4, num_stages=2, SPLIT=1),  # [128]
        dict(BH=16, BW=32, num_warps=2, num_stages=2, SPLIT=1),  # [167]
        dict(BH=32, BW=32, num_warps=4, num_stages=4, SPLIT=2),  # [202]
        dict(BH=32, BW=64, num_warps=4, num_stages=3, SPLIT=4),  # [255] bands
        dict(BH=64, BW=32, num_warps=4, num_stages=4, SPLIT=2),  # [255, wgmma]
    ],
    "tf32": [
        dict(BH=32, BW=64, num_warps=4, num_stages=3, SPLIT=1, PARTS=2),  # [94]
        dict(BH=32, BW=128, num_warps=8, num_stages=2, SPLIT=4),  # [99]
        dict(BH=16, BW=128, num_warps=4, num_stages=3, SPLIT=4),  # [128]
        dict(BH=32, BW=32, num_warps=4, num_stages=4, SPLIT=2),  # [128]
        dict(BH=32, BW=64, num_warps=4, num_stages=3, SPLIT=4),  # [142] bands
        dict(BH=32, BW=64, num_warps=4, num_stages=4, SPLIT=4),  # [168]
        dict(BH=64, BW=32, num_warps=4, num_stages=4, SPLIT=2),  # [206, wgmma]
        dict(BH=64, BW=64, num_warps=8, num_stages=3, SPLIT=4),  # [190, wgmma]
    ],
}
M2G = {
    "tf32x3": [
        dict(BH=64, BW=32, num_warps=4, num_stages=3),  # [116, wgmma]
        dict(BH=64, BW=32, num_warps=4, num_stages=2),  # [116, wgmma]
        dict(BH=64, BW=64, num_warps=4, num_stages=3),  # [161, wgmma]
        dict(BH=16, BW=64, num_warps=2, num_stages=3),  # [157]
        dict(BH=32, BW=64, num_warps=2, num_stages=3),  # [152]
        dict(BH=16, BW=64, num_warps=4, num_stages=3),  # [153]
        dict(BH=32, BW=128, num_warps=4, num_stages=3),  # [154]
    ],
    "tf32": [
        dict(BH=16, BW=64, num_warps=4, num_stages=3),  # [64]
        dict(BH=32, BW=128, num_warps=8, num_stages=2),  # [64]
        dict(BH=16, BW=256, num_warps=8, num_stages=2),  # [64]
        dict(BH=32, BW=32, num_warps=4, num_stages=4),  # [84]
        dict(BH=32, BW=128, num_warps=4, num_stages=3),  # [80]
        dict(BH=64, BW=64, num_warps=4, num_stages=3),  # [114, wgmma]
        dict(BH=64, BW=64, num_warps=8, num_stages=3),  # [86, wgmma]
    ],
}


@contextlib.contextmanager
def configured(kernel: str, cfg: dict, tf32: bool):
    """D.CONFIG[kernel][precision] = cfg and PyTorch's TF32 matmul switch, which picks the kernels'
    precision ("tf32" on, "tf32x3" off)."""
    prec = "tf32" if tf32 else "tf32x3"
    old_cfg, old_tf32 = copy.deepcopy(D.CONFIG[kernel][prec]), torch.backends.cuda.matmul.allow_tf32
    D.CONFIG[kernel][prec] = dict(cfg)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        D.CONFIG[kernel][prec] = old_cfg
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


def label(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def run(args) -> list[dict]:
    dev = args.device
    B, C, H, W, m = (2, 3, 40, 36, 6) if args.quick else (16, 64, 256, 256, 16)
    x = torch.randn(B, C, H, W, device=dev)
    z = torch.randn(B, C, 2 * m, m, dtype=torch.complex64, device=dev)
    calls = {"grid_to_modes": lambda: D.grid_to_modes(x, m, m), "modes_to_grid": lambda: D.modes_to_grid(z, H, W)}
    # bytes each kernel must move: the field once, the compact spectrum once
    nbytes = B * C * H * W * 4 + B * C * 2 * m * m * 8
    env = environment(dev)
    rows = []
    for kernel, alts in (("grid_to_modes", G2M), ("modes_to_grid", M2G)):
        fn = calls[kernel]
        for tf32 in (False, True):
            mode = "tf32" if tf32 else "tf32x3"
            with torch.no_grad(), configured(kernel, D.CONFIG[kernel][mode], tf32):
                want = fn().clone()
                base_t = time_fn(fn, dev, min_run_time=0.05)
            results = [(dict(D.CONFIG[kernel][mode]), base_t, 0.0)]
            for cfg in (alts[mode][:2] if args.quick else alts[mode]):
                try:
                    with torch.no_grad(), configured(kernel, cfg, tf32):
                        got = fn()
                        err = float((got - want).abs().max() / want.abs().max())
                        t = time_fn(fn, dev, min_run_time=0.05)
                except Exception as exc:  # a configuration that does not compile is reported, not fatal
                    print(f"  {kernel} {mode} {label(cfg)}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                results.append((cfg, t, err))
            for i, (cfg, t, err) in enumerate(results):
                ok = err <= (1e-5 if mode == "tf32x3" else 2e-3)
                rows.append({**env, "kernel": kernel, "shape": f"B{B} C{C} {H}x{W} m{m}", "precision": mode,
                             "config": label(cfg) + (" (current)" if i == 0 else ""),
                             "median_ms": round(t * 1e3, 4), "GB_s": round(nbytes / t / 1e9, 1),
                             "x_current": round(base_t / t, 3), "max_rel_diff": f"{err:.1e}", "agree": ok})
                print(f"  {kernel:13s} {mode:6s} {t * 1e3:8.3f} ms {nbytes / t / 1e9:8.1f} GB/s "
                      f"x{base_t / t:5.2f} diff {err:.1e}{'' if ok else ' DISAGREES'}  {rows[-1]['config']}")
    return rows


#: the mixing kernel's alternatives: module settings of irno_kernels.triton.spectral_conv ("fused":
#: False is the zero-filled spectrum and the kept-modes-only launch)
MIX = [
    dict(MIX_UNROLL=1), dict(MIX_UNROLL=4), dict(MIX_UNROLL=8),
    dict(ZERO_BLOCK=1024), dict(ZERO_BLOCK=16384),
    dict(fused=False), dict(MIN_PROGRAMS=0),
]


@contextlib.contextmanager
def mix_settings(cfg: dict):
    """The mixing module's settings of cfg (all but "fused") for the duration."""
    old = {k: getattr(MX, k) for k in cfg if k != "fused"}
    for k in old:
        setattr(MX, k, cfg[k])
    try:
        yield cfg.get("fused", MX.FUSED_ZERO)
    finally:
        for k, v in old.items():
            setattr(MX, k, v)


def run_mix(args) -> list[dict]:
    """The mixing launch of the FFT route alone, spectrum allocation included, under each of MIX."""
    dev = args.device
    B, C, H, W, m = (2, 4, 40, 36, 6) if args.quick else (16, 64, 256, 256, 16)
    a = torch.fft.rfft2(torch.randn(B, C, H, W, device=dev), norm="forward").contiguous()
    w = torch.randn(C, C, 2 * m, m, dtype=torch.complex64, device=dev)
    # bytes the launch must move: the kept modes and the weights read, the whole spectrum written
    nbytes = B * C * 2 * m * m * 8 + C * C * 2 * m * m * 8 + a.numel() * 8
    env = environment(dev)
    current = {k: getattr(MX, k) for k in ("MIX_UNROLL", "ZERO_BLOCK", "MIN_PROGRAMS", "FUSED_ZERO")}
    rows = []
    def launcher(conj: bool, cfg: dict):
        def call():
            with mix_settings(cfg) as fused:  # (every variant pays the same few setattr)
                out = (torch.empty_like if fused else torch.zeros_like)(a)
                MX._mix_into(out, a, w, m, m, conj_transpose=conj, zeroed=not fused)
                return out
        return call

    for direction, conj in (("forward", False), ("input grad", True)):
        call = launcher(conj, {})
        want = call().clone()
        base_t = time_fn(call, dev, min_run_time=0.05)
        results = [({}, base_t, 0.0)]
        for cfg in (MIX[:3] if args.quick else MIX):
            if all(current["FUSED_ZERO" if k == "fused" else k] == v for k, v in cfg.items()):
                continue  # the current settings, timed above
            call = launcher(conj, cfg)
            try:
                err = float((call() - want).abs().max() / want.abs().max())
                t = time_fn(call, dev, min_run_time=0.05)
            except Exception as exc:  # reported, not fatal
                print(f"  mix {direction} {label(cfg)}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                continue
            results.append((dict(cfg), t, err))
        for c, t, err in results:
            ok = err <= 1e-6
            name = label(c) if c else "current: " + label(current)
            rows.append({**env, "kernel": f"mix {direction}", "shape": f"B{B} C{C} {H}x{W} m{m}",
                         "precision": "fp32", "config": name, "median_ms": round(t * 1e3, 4),
                         "GB_s": round(nbytes / t / 1e9, 1), "x_current": round(base_t / t, 3),
                         "max_rel_diff": f"{err:.1e}", "agree": ok})
            print(f"  mix {direction:10s} {t * 1e3:8.3f} ms {nbytes / t / 1e9:8.1f} GB/s x{base_t / t:5.2f} "
                  f"diff {err:.1e}{'' if ok else ' DISAGREES'}  {name}")
    return rows


#: the compact mixing's alternatives to torch.einsum: (how, the mixing module's settings)
COMPACT = [("triton", {}), ("triton", dict(MIN_PROGRAMS=0)), ("triton", dict(MIN_PROGRAMS=2048))]


def run_compact(args) -> list[dict]:
    """The DFT route's compact mixing (irno_kernels.triton.spectral_dft.compact_mix): einsum against
    the Triton kernels, forward and forward + backward, on the layer shape's compact spectra."""
    dev = args.device
    B, C, m = (2, 4, 6) if args.quick else (16, 64, 16)
    X = torch.randn(B, C, 2 * m, m, dtype=torch.complex64, device=dev)
    w = torch.randn(C, C, 2 * m, m, dtype=torch.complex64, device=dev) / C
    g = torch.randn_like(X)
    # bytes the mixing must move: X and the weight read, S written (backward: gS, X, weight read,
    # grad_X and grad_weight written)
    nbytes = {"forward": (2 * X.numel() + w.numel()) * 8, "fwd+bwd": (5 * X.numel() + 3 * w.numel()) * 8}
    env = environment(dev)
    rows = []

    def launcher(direction: str, how: str, cfg: dict):
        Xl, wl = X.clone().requires_grad_(direction != "forward"), w.clone().requires_grad_(direction != "forward")

        def call():
            with mix_settings(cfg):
                if direction == "forward":
                    with torch.no_grad():
                        return (D.compact_mix(Xl, wl, how),)
                S = D.compact_mix(Xl, wl, how)
                return (S.detach(), *torch.autograd.grad(S, (Xl, wl), g))
        return call

    for direction in ("forward", "fwd+bwd"):
        call = launcher(direction, "einsum", {})
        want = [t.clone() for t in call()]
        base_t = time_fn(call, dev, min_run_time=0.05)
        results = [("einsum", base_t, 0.0)]
        for how, cfg in COMPACT:
            call = launcher(direction, how, cfg)
            name = how + (" " + label(cfg) if cfg else "")
            try:
                err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(call(), want))
                t = time_fn(call, dev, min_run_time=0.05)
            except Exception as exc:  # reported, not fatal
                print(f"  compact mix {direction} {name}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                continue
            results.append((name, t, err))
        for name, t, err in results:
            ok = err <= 1e-5
            rows.append({**env, "kernel": f"compact mix {direction}", "shape": f"B{B} C{C} m{m}",
                         "precision": "fp32", "config": name if name != "einsum" else "current: einsum",
                         "median_ms": round(t * 1e3, 4), "GB_s": round(nbytes[direction] / t / 1e9, 1),
                         "x_current": round(base_t / t, 3), "max_rel_diff": f"{err:.1e}", "agree": ok})
            print(f"  compact mix {direction:8s} {t * 1e3:8.3f} ms {nbytes[direction] / t / 1e9:8.1f} GB/s "
                  f"x{base_t / t:5.2f} diff {err:.1e}{'' if ok else ' DISAGREES'}  {name}")
    return rows


def summary(rows: list[dict]) -> None:
    print("best per kernel and precision (x: speed-up over the current CONFIG):")
    for kernel in ("grid_to_modes", "modes_to_grid", "mix forward", "mix input grad", "compact mix forward",
                   "compact mix fwd+bwd"):
        for mode in ("fp32",) if "mix" in kernel else ("tf32x3", "tf32"):
            rs = [r for r in rows if r["kernel"] == kernel and r["precision"] == mode and r["agree"]]
            if rs:
                best = min(rs, key=lambda r: r["median_ms"])
                print(f"  {kernel:13s} {mode:6s} {best['median_ms']:8.3f} ms x{best['x_current']:.2f}  "
                      f"{best['config']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="a tiny shape and two alternatives per kernel")
    p.add_argument("--csv", default="", help="append result rows to this CSV file")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if a.device == "cpu" and not D.INTERPRET:
        p.error("--device cpu: set TRITON_INTERPRET=1 before starting (triton's interpreter runs the kernels)")
    interpret = D.INTERPRET
    if a.device == "cpu":
        a.quick = True  # the interpreter: a smoke run only (its times say nothing about a GPU)
        D.INTERPRET = False  # ... of the GPU launch configurations
    try:
        MX.INTERPRET = D.INTERPRET
        rows = run(a)
        rows += run_compact(a)  # before the FFT route's mixing settings: it concerns the layer's target
        rows += run_mix(a)
    finally:
        D.INTERPRET = MX.INTERPRET = interpret
    summary(rows)
    if a.csv:
        write_csv(a.csv, rows)
        print(f"wrote {len(rows)} rows to {a.csv}")
    return 0 if all(r["agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
