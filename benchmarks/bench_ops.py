"""Time each irno op side by side: reference vs C++ (cpu) / CUDA / Triton / torch.compile(reference),
and for spectral_conv2d the truncated-DFT route ("dft": matrix products, no FFT). On CUDA,
"dft_tf32" and "triton_tf32" run the dft route and the Triton backend with PyTorch's TF32 matmul
switch on (the fast mode: TF32 tensor-core products, fp32 accumulation); "triton_einsum" runs the
Triton backend with the DFT route's compact spectra mixed by torch.einsum instead of the Triton
mixing kernels (irno_kernels.triton.spectral_dft.COMPACT_MIX = "einsum", the former default).

For every case it prints the median time, the achieved bandwidth from an explicit count of the
bytes the op must move, the fraction of the measured copy bandwidth (the memory roofline) and the
speed-up over the reference, and appends CSV rows (device, versions, commit, shapes) to --csv.

    python benchmarks/bench_ops.py --device cpu --threads 2
    python benchmarks/bench_ops.py --device cuda --csv benchmarks/results/ops_h100.csv
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth, environment, graphed, time_fn, write_csv  # noqa: E402

import irno_kernels as ik  # noqa: E402


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[str, torch.dtype], tuple]  # -> positional args (tensors first)
    ref: Callable
    fast: Callable  # fast(*args, backend=...)
    nbytes: Callable[[str], int]  # bytes that must move for "fwd" / "fwdbwd"
    grad_args: tuple[int, ...]  # indices of args that take gradients in "fwdbwd"
    compile: bool = False  # also time torch.compile(reference) here (each compile costs seconds)
    only: tuple[str, ...] = ()  # time only these providers (empty: all)
    graph: bool = False  # also time fwd/fwdbwd replayed from a CUDA graph (GPU time, no launch overhead)
    modes: tuple[str, ...] = ()  # time only these modes (empty: all asked for)
    # mode ("fwd"/"fwdbwd") -> a callable doing only the FFTs any cuFFT-based implementation must run;
    # timed as provider "fft_floor": its speedup_vs_ref is the best ratio such an implementation can reach
    floor: Callable[[str], Callable] | None = None
    # more providers of this case only: name -> (backend it needs, fn(*args) like ref)
    extra: dict[str, tuple[str, Callable]] = field(default_factory=dict)


#: provider name -> the backend it runs (providers not listed: "reference", "compile")
PROVIDER_BACKEND = {"cpu": "cpu", "cuda": "cuda", "triton": "triton", "dft": "dft", "dft_tf32": "dft",
                    "triton_tf32": "triton", "triton_einsum": "triton"}


def _es(dtype):
    return torch.finfo(dtype).bits // 8


def spectral_conv_case(B, C, H, W, m, dtype=torch.float32) -> Case:
    es = _es(dtype)

    def make(device, dt):
        x = torch.randn(B, C, H, W, device=device, dtype=dt)
        cdt = torch.complex64 if dt != torch.float64 else torch.complex128
        w = torch.randn(C, C, 2 * m, m, device=device, dtype=cdt) / C
        return x, w

    act = B * C * H * W * es
    wbytes = C * C * 2 * m * m * 2 * es

    def nbytes(mode):  # fwd: read x, write y; bwd: read grad_y and x, write grad_x and grad_w
        return 2 * act + wbytes if mode == "fwd" else 2 * act + wbytes + 3 * act + 2 * wbytes

    return Case("spectral_conv2d", f"B{B} C{C} {H}x{W} m{m}", make, ik.spectral_conv2d_ref,
                lambda x, w, backend: ik.spectral_conv2d(x, w, backend=backend), nbytes, (0, 1))


def spectral_conv_lp_case(B, C, H, W, m) -> Case:
    """bfloat16 x (complex64 weight) on the backends that take it ("cuda", "triton", "dft"); the
    reference runs the same values in float32 (torch's FFT has no bfloat16)."""
    case = spectral_conv_case(B, C, H, W, m, torch.bfloat16)

    def make(device, dt):
        x, w = spectral_conv_case(B, C, H, W, m).make(device, torch.float32)
        return x.to(torch.bfloat16), w

    case.op, case.make = "spectral_conv2d[bf16]", make
    case.ref = lambda x, w: ik.spectral_conv2d_ref(x.float(), w).to(x.dtype)
    return case


def refine_case(B, Co, F, H, W) -> Case:
    def make(device, dt):
        return (torch.randn(B, Co, H, W, device=device, dtype=dt), torch.randn(B, F, H, W, device=device, dtype=dt),
                torch.randn(Co, F, device=device, dtype=dt), torch.randn(Co, device=device, dtype=dt))

    n = B * H * W * 4

    def nbytes(mode):  # fwd: read h, z, write out; bwd: read g, z, write grad_h(view), grad_z
        return (2 * Co + F) * n if mode == "fwd" else (2 * Co + F) * n + (Co + 2 * F) * n

    return Case("refine_update", f"B{B} Co{Co} F{F} {H}x{W}", make,
                lambda h, z, w, b: ik.refine_update_ref(h, z, w, b, 0.2),
                lambda h, z, w, b, backend: ik.refine_update(h, z, w, b, 0.2, backend=backend), nbytes, (0, 1, 2, 3))


def residual_case(B, C, H, W) -> Case:
    def make(device, dt):
        return torch.randn(B, C, H, W, device=device, dtype=dt), torch.randn(B, C, H, W, device=device, dtype=dt)

    n = B * C * H * W * 4
    return Case("residual_update", f"B{B} C{C} {H}x{W}", make,
                lambda h, p: ik.residual_update_ref(h, p, 0.2),
                lambda h, p, backend: ik.residual_update(h, p, 0.2, backend=backend),
                lambda mode: 3 * n if mode == "fwd" else 5 * n, (0, 1))


def loss_case(B, C, H, W, mode_name, lam=1.6) -> Case:
    def make(device, dt):
        return torch.randn(B, C, H, W, device=device, dtype=dt), torch.randn(B, C, H, W, device=device, dtype=dt)

    n = B * C * H * W * 4
    return Case(f"spectral_loss[{mode_name}]", f"B{B} C{C} {H}x{W}", make,
                lambda p, t: ik.spectral_loss_ref(p, t, lam, 0.5, mode_name),
                lambda p, t, backend: ik.spectral_loss(p, t, lam, 0.5, mode_name, backend=backend),
                lambda mode: 2 * n if mode == "fwd" else 5 * n, (0,), floor=_loss_floor(mode_name, H, W))


def _loss_floor(mode_name: str, H: int, W: int) -> Callable[[str], Callable]:
    """The transforms of the spectral loss: rfft2 of pred and target ("magnitude") or of pred - target
    ("error": one transform, the difference is the fused path's too), and for the backward the
    irfft2 of a gradient spectrum (here the forward's spectrum; its values do not change the time).
    Unscaled (norm "backward" / "forward"): a fused implementation folds the scaling into its kernels."""
    def floor(mode: str) -> Callable:
        def fn(p, t):
            P = torch.fft.rfft2(p if mode_name == "magnitude" else p - t)
            if mode_name == "magnitude":
                torch.fft.rfft2(t)
            return torch.fft.irfft2(P, s=(H, W), norm="forward") if mode == "fwdbwd" else P
        return fn
    return floor


def radial_case(B, C, H, W) -> Case:
    def make(device, dt):
        return (torch.randn(B, C, H, W, device=device, dtype=dt),)

    n = B * C * H * W * 4
    def floor(mode: str) -> Callable:  # rfft2 (and irfft2 of the gradient spectrum for the backward), unscaled
        def fn(x):
            X = torch.fft.rfft2(x)
            return torch.fft.irfft2(X, s=(H, W), norm="forward") if mode == "fwdbwd" else X
        return fn

    return Case("radial_spectrum", f"B{B} C{C} {H}x{W}", make, ik.radial_spectrum_ref,
                lambda x, backend: ik.radial_spectrum(x, backend=backend),
                lambda mode: n if mode == "fwd" else 3 * n, (0,), floor=floor)


def _mix_ref(X, w):
    """The reference's mixing alone: gather the kept corners, einsum, zero-padded scatter."""
    B, _, H, Wr = X.shape
    m1, m2 = w.shape[2] // 2, w.shape[3]
    out = torch.zeros(B, w.shape[1], H, Wr, dtype=X.dtype, device=X.device)
    out[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", X[:, :, :m1, :m2], w[:, :, :m1])
    out[:, :, H - m1:, :m2] = torch.einsum("bixy,ioxy->boxy", X[:, :, H - m1:, :m2], w[:, :, m1:])
    return out


@contextlib.contextmanager
def _min_programs(n: int | None):
    """irno_kernels.triton.spectral_conv.MIN_PROGRAMS set to n inside (None: unchanged)."""
    from irno_kernels.triton import spectral_conv as tc

    old = tc.MIN_PROGRAMS
    tc.MIN_PROGRAMS = old if n is None else n
    try:
        yield tc
    finally:
        tc.MIN_PROGRAMS = old


class _MixTriton(torch.autograd.Function):
    """The Triton mixing kernel alone, with the layer's backward kernels: the input spectrum's
    gradient (the mixing with conj-transposed weights: equal to autograd's of _mix_ref) and the
    weight's (autograd's of _mix_ref times the layer's conjugate-pair multiplicity, 2 on the
    non-edge columns, which the reference layer applies in irfft2's backward instead: the same
    products). ``min_programs``: the kernels' MIN_PROGRAMS for this call, forward and backward
    (None: the module's). ``fused``: the spectra are allocated with torch.empty and the mixing
    launch writes their zeros too (the layer's path); False: torch.zeros (a fill kernel) and a
    launch that writes the kept modes only (the layer's path before FUSED_ZERO)."""

    @staticmethod
    def forward(ctx, X, w, min_programs=None, fused=True):
        with _min_programs(min_programs) as tc:
            out = tc._mixed(X, w, w.shape[2] // 2, w.shape[3], False, fused)
        ctx.save_for_backward(X, w)
        ctx.min_programs, ctx.fused = min_programs, fused
        return out

    @staticmethod
    def backward(ctx, G):
        X, w = ctx.saved_tensors
        G = G.contiguous()
        with _min_programs(ctx.min_programs) as tc:
            gX = tc._mixed(G, w, w.shape[2] // 2, w.shape[3], True, ctx.fused)
            gw = tc._mix_grad_weight(X, G, w, 2 * (X.shape[-1] - 1))
        return gX, gw, None, None


def _mix_triton(X, w, backend):
    return _MixTriton.apply(X, w)


def _mix_triton_few(X, w):
    """_mix_triton with the mixing kernels' largest tiles (MIN_PROGRAMS = 0: the grid of before the
    minimum program count), to measure that choice side by side."""
    return _MixTriton.apply(X, w, 0)


def _mix_triton_fill(X, w):
    """_mix_triton on zero-filled spectra, the launch writing the kept modes only (FUSED_ZERO off),
    to measure the fused zeros side by side."""
    return _MixTriton.apply(X, w, None, False)


def spectral_mix_case(B, C, H, W, m) -> Case:
    """The mode mixing alone, on the rfft2 spectrum of the layer's input (issue target: the Triton
    kernel vs the reference's gather + einsum + zero-padded scatter), forward, and forward+backward
    (both gradients: PyTorch's autograd of the reference vs the layer's two backward kernels)."""
    def make(device, dt):
        x, w = spectral_conv_case(B, C, H, W, m).make(device, dt)
        return torch.fft.rfft2(x, norm="forward").contiguous(), w

    # the least traffic: read the kept modes and the weights, write the whole zero-padded output
    # spectrum (complex64); the backward the same again for the input's gradient, plus the kept modes
    # of x read and the weights' gradient written. The full spectrum's write dominates (B16 C64
    # 256x256 m16: 270 of 291 MB forward), so a mixing that writes its zeros is bound by it.
    full, kept, weights = B * C * H * (W // 2 + 1) * 8, B * C * 2 * m * m * 8, C * C * 2 * m * m * 8
    fwd = kept + weights + full
    return Case("spectral_mix", f"B{B} C{C} {H}x{W} m{m}", make, _mix_ref, _mix_triton,
                lambda mode: fwd if mode == "fwd" else 2 * fwd + kept + weights, (0, 1),
                only=("reference", "triton", "triton_few", "triton_fill"),
                extra={"triton_few": ("triton", _mix_triton_few), "triton_fill": ("triton", _mix_triton_fill)})


def layer_norm_case(B, C, H, W, channels_last=False, fused=False) -> Case:
    """The refiner's channel LayerNorm; ``fused``: with GELU and the periodic halo of the next 3x3 conv
    (the U-Net block's fused path) against F.layer_norm + F.gelu + circular F.pad."""
    def make(device, dt):
        x = torch.randn(B, C, H, W, device=device, dtype=dt)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randn(C, device=device, dtype=dt), torch.randn(C, device=device, dtype=dt)

    n = B * C * H * W * 4
    kw = {"activation": "gelu", "halo": 1} if fused else {}
    return Case("channel_layer_norm" + ("[gelu+halo]" if fused else ""),
                f"B{B} C{C} {H}x{W}" + (" CL" if channels_last else ""), make,
                lambda x, w, b: ik.channel_layer_norm_ref(x, w, b, **kw),
                lambda x, w, b, backend: ik.channel_layer_norm(x, w, b, backend=backend, **kw),
                lambda mode: 2 * n if mode == "fwd" else 5 * n, (0, 1, 2))


def pad_case(B, C, H, W, cat=False) -> Case:
    """The periodic pad of a 3x3 periodic conv's input, channels-last (the refiner's layout); ``cat``:
    the decoder's input, cat(skip fp32, upsampled bf16) padded and written in bf16 (autocast's conv
    dtype), against torch.cat + circular F.pad + cast."""
    def make(device, dt):
        skip = torch.randn(B, C, H, W, device=device, dtype=dt).contiguous(memory_format=torch.channels_last)
        if not cat:
            return (skip,)
        up = torch.randn(B, C, H, W, device=device, dtype=torch.bfloat16)
        return skip, up.contiguous(memory_format=torch.channels_last)

    n = B * C * H * W * (1 if not cat else 2)  # values of the result (halo aside)
    # bytes moved forward: fp32 read + fp32 write, or fp32 and bf16 halves read + bf16 write;
    # the backward moves as many (the gradient read, the inputs' gradients written)
    fwd = 8 * n if not cat else 5 * n
    out_dtype = torch.bfloat16 if cat else None
    return Case("periodic_pad2d" + ("[cat]" if cat else ""), f"B{B} C{C}{'x2' if cat else ''} {H}x{W} CL", make,
                lambda *xs: ik.periodic_pad_cat_ref(xs, 1, out_dtype),
                lambda *xs, backend: ik.periodic_pad_cat(xs, 1, out_dtype=out_dtype, backend=backend),
                lambda mode: fwd if mode == "fwd" else 2 * fwd, (0, 1) if cat else (0,))


def upsample_case(B, C, H, W) -> Case:
    """The U-Net decoder's upsampling (channels-last fp32 in, bf16 out with the up-conv's halo, the
    autocast case) against pad + F.interpolate + crop + pad + cast."""
    def make(device, dt):
        return (torch.randn(B, C, H, W, device=device, dtype=dt).contiguous(memory_format=torch.channels_last),)

    n = B * C * H * W
    fwd = 4 * n + 2 * 4 * n  # read x (fp32), write 4 outputs per point (bf16)
    return Case("periodic_upsample2x", f"B{B} C{C} {H}x{W} CL", make,
                lambda x: ik.periodic_upsample2x_ref(x, 1, torch.bfloat16),
                lambda x, backend: ik.periodic_upsample2x(x, 1, out_dtype=torch.bfloat16, backend=backend),
                lambda mode: fwd if mode == "fwd" else 2 * fwd, (0,))


def _field_cases(fields, device: str) -> list[Case]:
    out = []
    for i, (B, C, H, W) in enumerate(fields):
        out += [refine_case(B, C, 16, H, W), residual_case(B, C, H, W), loss_case(B, C, H, W, "magnitude"),
                loss_case(B, C, H, W, "error"), radial_case(B, C, H, W)]
        if i == 0:
            out[-2].compile = True  # spectral_loss[error] at the first field shape
        if device == "cuda":
            out[-3].graph = out[-2].graph = True  # the spectral losses: launch-bound in eager mode
    return out


def cases(device: str, quick: bool) -> list[Case]:
    """The cases in the order they run: on CUDA the issues' targets first (the spectral layer, then
    the field ops with the spectral losses), so a run cut short by gpu_check's timeout keeps them."""
    if device == "cuda":
        out = [spectral_conv_case(16, 64, 256, 256, 16), spectral_conv_case(4, 32, 128, 384, 16),
               spectral_conv_case(16, 32, 64, 64, 12)]
        out[0].compile = True
        if quick:
            return out[:1] + _field_cases([(16, 1, 64, 64)], device)
        out += [spectral_mix_case(16, 64, 256, 256, 16), spectral_mix_case(4, 32, 128, 384, 16)]
        out[-2].graph = out[-1].graph = True  # GPU time alone too: how much of eager is launch cost
        out += _field_cases([(16, 4, 128, 384), (16, 11, 256, 256), (16, 1, 64, 64)], device)
        out += [spectral_conv_lp_case(16, 64, 256, 256, 16), spectral_conv_lp_case(4, 32, 128, 384, 16)]
        # where the dft route overtakes the FFT route (irno_kernels.spectral_dft.DFT_MIN_VALUES = 2^24)
        for B, C, H, W in [(1, 64, 256, 256), (2, 64, 256, 256), (4, 64, 256, 256), (8, 64, 256, 256),
                           (16, 64, 128, 128), (16, 32, 128, 384)]:
            out.append(spectral_conv_case(B, C, H, W, 16))
            out[-1].op, out[-1].only = "spectral_conv2d[sweep]", ("reference", "cuda", "dft")
        # the refiner U-Net's normalisation at bench_irno's 256x256 batch 16 (widths 16 and 128)
        out += [layer_norm_case(16, 16, 256, 256), layer_norm_case(16, 16, 256, 256, True),
                layer_norm_case(16, 128, 32, 32), layer_norm_case(16, 16, 256, 256, fused=True),
                layer_norm_case(16, 16, 256, 256, True, fused=True)]
        # the U-Net's remaining pad copies (conv inputs, the decoder's concatenation)
        out += [pad_case(16, 16, 256, 256), pad_case(16, 16, 256, 256, cat=True), pad_case(16, 128, 32, 32),
                upsample_case(16, 32, 128, 128)]
        return out
    out = [spectral_conv_case(8, 32, 64, 64, 12), spectral_conv_case(4, 32, 128, 128, 16),
           spectral_conv_case(1, 64, 256, 256, 16)]
    fields = [(16, 1, 64, 64), (8, 4, 128, 384), (4, 11, 256, 256)]
    if quick:
        return out[:1] + _field_cases(fields[:1], device)
    return out + [layer_norm_case(4, 16, 64, 64)] + _field_cases(fields, device)


def fwdbwd_call(fn: Callable, args: tuple, grad_args: tuple[int, ...]) -> Callable:
    """A call of fn's forward and backward: the gradients of the args at grad_args, for an output
    gradient of ones. The output's gradient is an input of the backward, made once here (one forward
    without grad gives its shape), outside what is timed: made anew in every call, it would add a
    memset as large as the output to every provider's time."""
    leaves = [a.detach().requires_grad_(i in grad_args) for i, a in enumerate(args)]
    grads_of = [leaves[i] for i in grad_args]
    with torch.no_grad():
        grad_out = torch.ones_like(fn(*leaves))

    def call():
        return torch.autograd.grad(fn(*leaves), grads_of, grad_out)
    return call


def run_case(case: Case, device: str, providers: list[str], modes: list[str], bw: float | None,
             env: dict) -> list[dict]:
    rows = []
    args = case.make(device, torch.float32)
    if case.modes:
        modes = [m for m in modes if m in case.modes]
    if case.graph:
        modes = [*modes, *(m + "_graph" for m in modes if not m.endswith("_graph"))]
    for mode in modes:
        ref_t = None
        for prov in [*providers, *case.extra, *(["fft_floor"] if case.floor else [])]:
            base = case.op.split("[")[0]
            base = "spectral_conv2d" if base == "spectral_mix" else base
            need = case.extra[prov][0] if prov in case.extra else PROVIDER_BACKEND.get(prov)
            if need is not None and not ik.available(base, need, device):
                continue
            if case.op.endswith("[bf16]") and prov not in ("reference", "cuda", "triton", "dft", "dft_tf32"):
                continue
            if prov in ("triton_tf32", "triton_einsum") and case.op != "spectral_conv2d":  # Triton dft route only
                continue
            if case.only and prov not in case.only:
                continue
            if prov == "compile" and (not case.compile or mode.endswith("_graph")):
                continue
            if prov == "fft_floor":
                floor_fn = case.floor(mode.removesuffix("_graph"))

                def call(floor_fn=floor_fn):
                    with torch.no_grad():
                        return floor_fn(*args)
            elif prov in case.extra:
                fn = case.extra[prov][1]
            elif prov == "reference":
                fn = case.ref
            elif prov == "compile":
                fn = torch.compile(case.ref)
            elif prov in ("dft_tf32", "triton_tf32"):
                # the dft route (PyTorch matmuls, or the Triton transforms) with TF32 tensor-core
                # products: PyTorch's matmul setting, which both follow (the fast mode)
                def fn(*a, _b=PROVIDER_BACKEND[prov]):
                    old = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = True
                    try:
                        return case.fast(*a, backend=_b)
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = old
            elif prov == "triton_einsum":
                def fn(*a):
                    from irno_kernels.triton import spectral_dft as tr_dft

                    old, tr_dft.COMPACT_MIX = tr_dft.COMPACT_MIX, "einsum"
                    try:
                        return case.fast(*a, backend="triton")
                    finally:
                        tr_dft.COMPACT_MIX = old
            else:
                fn = lambda *a, _p=prov: case.fast(*a, backend=_p)  # noqa: E731
            if prov == "fft_floor":
                pass
            elif mode.startswith("fwd") and not mode.startswith("fwdbwd"):
                def call(fn=fn):
                    with torch.no_grad():
                        return fn(*args)
            else:
                try:
                    call = fwdbwd_call(fn, args, case.grad_args)
                except Exception as err:
                    print(f"  {case.op} {case.shape} {mode} {prov}: FAILED {type(err).__name__}: {err}")
                    continue
            try:
                t = time_fn(graphed(call) if mode.endswith("_graph") else call, device)
            except Exception as err:  # a provider that fails is reported, not fatal
                print(f"  {case.op} {case.shape} {mode} {prov}: FAILED {type(err).__name__}: {err}")
                continue
            if prov == "reference":
                ref_t = t
            gbs = case.nbytes(mode.removesuffix("_graph")) / t / 1e9
            row = {**env, "op": case.op, "shape": case.shape, "mode": mode, "provider": prov,
                   "median_ms": round(t * 1e3, 4), "GB_s": round(gbs, 2),
                   "roofline_frac": round(gbs * 1e9 / bw, 3) if bw else "",
                   "speedup_vs_ref": round(ref_t / t, 3) if ref_t else ""}
            rows.append(row)
            print(f"  {case.op:26s} {case.shape:24s} {mode:6s} {prov:9s} {t * 1e3:9.3f} ms "
                  f"{gbs:8.2f} GB/s  x{row['speedup_vs_ref'] if row['speedup_vs_ref'] != '' else math.nan:.2f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads (pinned, reported)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(reference) on every case (on cuda it is timed on the "
                        "first spectral_conv2d and spectral_loss cases by default)")
    p.add_argument("--quick", action="store_true", help="one shape per op")
    p.add_argument("--ops", default="", help="comma-separated op names to keep (default: all)")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--csv", default="", help="append result rows to this CSV file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    env = environment(a.device)
    print("env:", env)
    providers = ["reference", "cpu", "cuda", "triton", "dft"]
    if a.device == "cuda":
        providers += ["dft_tf32", "triton_tf32", "triton_einsum"]
    if a.compile or a.device == "cuda":
        providers.append("compile")
    all_cases = cases(a.device, a.quick)
    if a.compile:
        for c in all_cases:
            c.compile = True
    bw = copy_bandwidth(a.device) if a.device == "cuda" else None
    if bw:
        print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s")
    keep = [s for s in a.ops.split(",") if s]
    n = 0
    for case in all_cases:
        if keep and not any(case.op.startswith(k) for k in keep):
            continue
        rows = run_case(case, a.device, providers, a.modes.split(","), bw, env)
        if a.csv:  # after every case, so a run cut short keeps what it measured
            write_csv(a.csv, rows)
        n += len(rows)
    if a.csv:
        print(f"wrote {n} rows to {a.csv}")


if __name__ == "__main__":
    main()
