"""Triton kernels for the radial spectrum and the progressive spectral loss (DESIGN section 3.3).

The spectra come from torch.fft.rfft2 unscaled (norm "backward") and reach the kernels as real
(re, im) pairs (``torch.view_as_real``: triton takes no complex pointers); the definition's "ortho"
factors are folded into the kernels' scale arguments (on CUDA, torch applies any other
normalisation as one more pass over the spectrum). Each kernel makes one pass over them;
frequencies, shell indices and loss weights are computed inline from the entry's (row, column):

    fy = fftfreq(H)[row], fx = rfftfreq(W)[col]           cycles per sample
    shell = round(max(H, W) * sqrt(fy^2 + fx^2))           float64, half to even, as shell_index()
    w = (1 + (|f| / f0) ** lam) / mean_w                   mean_w over the (H, W//2+1) grid

Reductions are deterministic: each program writes its partial sums to a buffer that torch adds up
in a fixed order (no float atomics).

Backward: the kernels write dL/dSpectrum and torch applies the adjoint of rfft2, which is irfft2
(unscaled: norm "forward") with the non-edge columns (those standing for a conjugate pair) halved;
the halving and the scale are folded into the kernels. The forward ops also return the spectra,
which autograd keeps for the backward instead of transforming the inputs again.

bfloat16/float16 fields are transformed in float32 (torch's FFTs take no bfloat16), reduced like
float32 ones, and their results and gradients are returned in their dtype.

(A one-kernel variant for fields up to 64 x 64, both transforms as DFT matrix products with one
program per plane, was measured on an H200 at 4x the time of this route at B16 C1 64x64 in graph
replay and removed: benchmarks/results/gpu_h200_2026-11-27_3b528f8.)
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from irno_kernels._checks import LOW_PRECISION
from irno_kernels.backend import no_second_derivative
from irno_kernels.spectrum import num_shells
from irno_kernels.triton._lib import INTERPRET, backward_fn, cdiv, is_f64, launch, pow2, register, with_autograd

__all__ = ["radial_spectrum", "spectral_loss"]

_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


# ---------------------------------------------------------------------------------------------
# inline frequency helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _signed_row(i, H):
    """Row i of an fft axis of length H as a signed wavenumber (fftfreq's order)."""
    return tl.where(i < (H + 1) // 2, i, i - H)


@triton.jit
def _shell(i, j, H, W):
    """round(max(H, W) * |f|) in float64 with half-to-even rounding, op for op as shell_index()
    (the launch disables fp fusion so that fy*fy + fx*fx is not contracted into an fma)."""
    Hf = tl.cast(H, tl.float64)
    Wf = tl.cast(W, tl.float64)
    fy = _signed_row(i, H).to(tl.float64) * (1.0 / Hf)
    fx = j.to(tl.float64) * (1.0 / Wf)
    v = tl.maximum(Hf, Wf) * tl.sqrt(fy * fy + fx * fx)
    fl = tl.floor(v)
    d = v - fl
    odd = (fl.to(tl.int32) % 2) == 1
    return fl.to(tl.int32) + ((d > 0.5) | ((d == 0.5) & odd)).to(tl.int32)


@triton.jit
def _loss_weight(i, j, H, W, lam, inv_f0, inv_mean, zero_pow, acc_ty: tl.constexpr):
    """w = (1 + (|f| / f0) ** lam) / mean_w in the accumulation dtype (zero_pow = 0 ** lam)."""
    fy = _signed_row(i, H).to(acc_ty) / H
    fx = j.to(acc_ty) / W
    t = tl.sqrt(fy * fy + fx * fx) * _scalar(inv_f0, acc_ty)
    tpow = tl.where(t > 0, tl.exp(_scalar(lam, acc_ty) * tl.log(tl.maximum(t, 1e-30))), _scalar(zero_pow, acc_ty))
    return (1.0 + tpow) * _scalar(inv_mean, acc_ty)


@triton.jit
def _scalar(x, acc_ty: tl.constexpr):
    """A float64 kernel argument as a (1,) tensor of acc_ty (also under the interpreter, where
    the argument arrives as a Python float)."""
    return (tl.zeros((1,), dtype=acc_ty) + x).to(acc_ty)


@triton.jit
def _edge_halving(j, W):
    """0.5 on rfft columns that stand for a conjugate pair, 1 on column 0 and (even W) W/2."""
    return tl.where((j == 0) | (2 * j == W), 1.0, 0.5)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _radial_spectrum_fwd_kernel(
    x_ptr, part_ptr, H, W, Wr, R, nchunk, rows_per_chunk, scale: tl.float64,
    IS_F64: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, RW: tl.constexpr, R_PAD: tl.constexpr,
):
    """Energy per shell of one chunk of rows of one (b, c) spectrum -> part[plane, chunk, :R].

    The shells are held as R_PAD // RW blocks of RW. A BH x BW tile of frequencies spans at most RW
    consecutive shells (RW bounds the tile's extent in |f|), so its entries fall into two adjacent
    blocks, starting at the block of the tile's lowest shell: the tile is binned into those two
    blocks (compare-and-select sums over RW x tile), which are then added to the accumulator.
    Everything stays in registers.
    """
    pid = tl.program_id(0)
    plane = pid // nchunk
    row0 = (pid % nchunk) * rows_per_chunk
    row1 = tl.minimum(row0 + rows_per_chunk, H)
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    NQ: tl.constexpr = R_PAD // RW
    t = tl.arange(0, BH * BW)
    k2 = tl.arange(0, 2)
    win = tl.arange(0, RW)
    q = tl.arange(0, NQ)
    acc = tl.zeros((NQ, RW), dtype=acc_ty)
    base = x_ptr + plane * H * Wr * 2
    for r0 in range(row0, row1, BH):
        for c0 in range(0, Wr, BW):
            i = r0 + t // BW
            j = c0 + t % BW
            mask = (i < row1) & (j < Wr)
            v = tl.load(base + (i * Wr + j)[:, None] * 2 + k2[None, :], mask=mask[:, None], other=0.0)
            v = v.to(acc_ty)
            mult = tl.where((j == 0) | (2 * j == W), 1.0, 2.0)  # conjugate pairs count twice
            e = tl.sum(v * v, axis=1) * mult * _scalar(scale, acc_ty)
            r = _shell(i, j, H, W)
            q0 = tl.min(tl.where(mask, r, 1 << 30), axis=0) // RW
            local = tl.where(mask, r - q0 * RW, 2 * RW)  # in [0, 2 RW); masked entries outside
            lo = tl.sum(tl.where(win[:, None] == local[None, :], e[None, :], 0.0), axis=1)
            hi = tl.sum(tl.where((win + RW)[:, None] == local[None, :], e[None, :], 0.0), axis=1)
            acc += tl.where(q[:, None] == q0, lo[None, :], 0.0) + tl.where(q[:, None] == q0 + 1, hi[None, :], 0.0)
    shells = q[:, None] * RW + win[None, :]
    tl.store(part_ptr + pid * R + shells, acc, mask=shells < R)


@triton.jit
def _radial_spectrum_bwd_kernel(
    x_ptr, g_ptr, gx_ptr, total, H, W, Wr, R, scale: tl.float64, BLOCK: tl.constexpr, IS_F64: tl.constexpr,
):
    """dL/dX for E[r] = sum_shell c |X|^2, with the adjoint's halving folded in: scale g[shell] X
    (scale = 2 / (H W) for an unscaled X and an unscaled inverse transform)."""
    pid = tl.program_id(0)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    j = e % Wr
    i = (e // Wr) % H
    plane = e // (H * Wr)
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    r = _shell(i, j, H, W)
    g = tl.load(g_ptr + plane * R + r, mask=mask, other=0.0).to(acc_ty)
    offs = e[:, None] * 2 + tl.arange(0, 2)[None, :]
    v = tl.load(x_ptr + offs, mask=mask[:, None], other=0.0).to(acc_ty)
    tl.store(gx_ptr + offs, (g * _scalar(scale, acc_ty))[:, None] * v, mask=mask[:, None])


@triton.jit
def _spectral_loss_fwd_kernel(
    p_ptr, y_ptr, part_ptr, total, H, W, Wr,
    lam: tl.float64, inv_f0: tl.float64, inv_mean: tl.float64, zero_pow: tl.float64, scale: tl.float64,
    ERROR_MODE: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr,
):
    """part[pid] = scale * sum over one block of spectrum entries of w * (|P| - |Y|)^2, or of
    w * |D|^2 in error mode (p_ptr then holds D = rfft2(pred - target)). With scale =
    1 / (numel * H W) for unscaled spectra the partials add up to the loss."""
    pid = tl.program_id(0)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    j = e % Wr
    i = (e // Wr) % H
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    w = _loss_weight(i, j, H, W, lam, inv_f0, inv_mean, zero_pow, acc_ty)
    offs = e[:, None] * 2 + tl.arange(0, 2)[None, :]
    p = tl.load(p_ptr + offs, mask=mask[:, None], other=0.0).to(acc_ty)
    if ERROR_MODE:
        err = tl.sum(p * p, axis=1)
    else:
        y = tl.load(y_ptr + offs, mask=mask[:, None], other=0.0).to(acc_ty)
        diff = tl.sqrt(tl.sum(p * p, axis=1)) - tl.sqrt(tl.sum(y * y, axis=1))
        err = diff * diff
    tl.store(part_ptr + pid, tl.sum(w * err * _scalar(scale, acc_ty), axis=0))


@triton.jit
def _spectral_loss_bwd_kernel(
    p_ptr, y_ptr, g_ptr, gp_ptr, gy_ptr, total, H, W, Wr,
    lam: tl.float64, inv_f0: tl.float64, inv_mean: tl.float64, zero_pow: tl.float64, scale: tl.float64,
    ERROR_MODE: tl.constexpr, NEED_Y: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr,
):
    """dL/dP (and dL/dY) times the adjoint's column halving, for one block of entries.

    magnitude: dL/dP = scale w (|P| - |Y|) P / |P|, dL/dY = -scale w (|P| - |Y|) Y / |Y| (0 where the
    modulus is 0, as autograd of abs); error: dL/dD = scale w D. scale = 2 / (numel * H W) * grad
    for unscaled spectra and an unscaled inverse transform.
    """
    pid = tl.program_id(0)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    j = e % Wr
    i = (e // Wr) % H
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    g = tl.load(g_ptr + tl.arange(0, 1)).to(acc_ty)
    coef = _loss_weight(i, j, H, W, lam, inv_f0, inv_mean, zero_pow, acc_ty) * _edge_halving(j, W)
    coef = coef * g * _scalar(scale, acc_ty)
    offs = e[:, None] * 2 + tl.arange(0, 2)[None, :]
    m2 = mask[:, None]
    p = tl.load(p_ptr + offs, mask=m2, other=0.0).to(acc_ty)
    if ERROR_MODE:
        tl.store(gp_ptr + offs, coef[:, None] * p, mask=m2)
    else:
        y = tl.load(y_ptr + offs, mask=m2, other=0.0).to(acc_ty)
        ap = tl.sqrt(tl.sum(p * p, axis=1))
        ay = tl.sqrt(tl.sum(y * y, axis=1))
        d = coef * (ap - ay)
        sp = tl.where(ap > 0, d / tl.where(ap > 0, ap, 1.0), 0.0)
        tl.store(gp_ptr + offs, sp[:, None] * p, mask=m2)
        if NEED_Y:
            sy = tl.where(ay > 0, -d / tl.where(ay > 0, ay, 1.0), 0.0)
            tl.store(gy_ptr + offs, sy[:, None] * y, mask=m2)


# ---------------------------------------------------------------------------------------------
# launch configurations (fixed per shape class) and host-side constants
# ---------------------------------------------------------------------------------------------
def _flat_block(total: int) -> int:
    return min(pow2(total), 1 << 15) if INTERPRET else 1024


def _radial_config(H: int, W: int, R: int) -> dict:
    """Tile (BH, BW), shell block RW and rows per program of the radial-spectrum kernel.

    The binning holds an RW x tile block of selects (triton caps a block at 2^20 elements). On a
    GPU: the tile of 128 or 256 frequencies that costs the fewest selects per entry (~2 RW for the
    binning, 2 R_PAD / tile for the accumulation), rows in chunks of 64 per program. Under the
    interpreter, whose cost is per block operation: the fewest tiles (the whole spectrum when it
    fits), one program per plane.
    """
    Wr = W // 2 + 1
    L = max(H, W)
    r_pad = pow2(R)
    limit = (1 << 18) if INTERPRET else (1 << 13)
    rows = H if INTERPRET else 64

    def shell_block(bh, bw):
        # |f| varies by at most this much over a tile; rounding adds one shell, float error one more
        span = L * math.hypot((min(bh, H) - 1) / H, (min(bw, Wr) - 1) / W)
        return min(pow2(int(span) + 3), r_pad)

    bh, bw = pow2(H), pow2(Wr)
    if bh * bw * shell_block(bh, bw) <= limit:  # the whole spectrum in one tile
        return {"BH": bh, "BW": bw, "RW": shell_block(bh, bw), "R_PAD": r_pad, "rows": rows}

    def search(tiles):
        best = None
        for tile in tiles:
            for bh in (1 << k for k in range(17)):
                bw = tile // bh
                if bw < 1 or bh > pow2(H) or bw > pow2(Wr):
                    continue
                rw = shell_block(bh, bw)
                if rw * tile > limit:
                    continue
                if INTERPRET:
                    cost = (cdiv(H, bh) * cdiv(Wr, bw), rw)
                else:
                    cost = (2 * rw + 2 * r_pad / tile, 0)
                if best is None or cost < best[0]:
                    best = (cost, bh, bw, rw)
        return best

    # on a GPU a tile of fewer than 128 entries would leave most of the 256 threads idle; smaller
    # tiles only for grids so elongated that no 128-tile fits the limit (tile 1 always fits)
    best = search([1 << k for k in range(16, 6, -1)] if INTERPRET else [256, 128])
    best = best or search([1 << k for k in range(6, -1, -1)])
    _, bh, bw, rw = best
    return {"BH": bh, "BW": bw, "RW": rw, "R_PAD": r_pad, "rows": rows}


@functools.lru_cache(maxsize=256)
def _weight_mean(H: int, W: int, lam: float, f0: float) -> float:
    """Mean over the (H, W//2+1) grid of 1 + (|f| / f0) ** lam, float64 (numpy: no tensor is made,
    so this also runs while torch traces with fake tensors)."""
    fy = np.fft.fftfreq(H)
    fx = np.fft.rfftfreq(W)
    f = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return float(np.mean(1.0 + (f / f0) ** lam))


def _weight_args(H: int, W: int, lam: float, f0: float) -> tuple[float, float, float, float]:
    """(lam, 1/f0, 1/mean_w, 0**lam) for the kernels."""
    return float(lam), 1.0 / f0, 1.0 / _weight_mean(H, W, float(lam), float(f0)), (1.0 if lam == 0 else 0.0)


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    """rfft2(x) unscaled (|X|^2 is H W times the ortho spectrum's: the kernels' scales undo it),
    contiguous: the kernels index it as (B*C, H, Wr, 2). A bfloat16/float16 x is transformed in
    float32 (torch's FFTs take no bfloat16, and float16 at powers of two only): complex64."""
    return torch.fft.rfft2(x.float() if x.dtype in LOW_PRECISION else x, norm="backward").contiguous()


def _empty_spectrum(x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    return x.new_empty((B, C, H, W // 2 + 1), dtype=_COMPLEX.get(x.dtype, torch.complex64))


def _real_of(spec: torch.Tensor) -> torch.dtype:
    return torch.float64 if spec.dtype == torch.complex128 else torch.float32


# ---------------------------------------------------------------------------------------------
# ops: radial_spectrum
# ---------------------------------------------------------------------------------------------
def _radial_fake(x):
    B, C, H, W = x.shape
    return x.new_empty((B, C, num_shells(int(H), int(W)))), _empty_spectrum(x)


def _radial_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = (int(s) for s in x.shape)
    R = num_shells(H, W)
    X = _spectrum(x)
    cfg = _radial_config(H, W, R)
    nchunk = cdiv(H, cfg["rows"])
    acc_dtype = torch.float64 if is_f64(x) else torch.float32
    part = torch.empty((B * C, nchunk, R), dtype=acc_dtype, device=x.device)
    launch(_radial_spectrum_fwd_kernel, (B * C * nchunk,), torch.view_as_real(X), part,
           H, W, W // 2 + 1, R, nchunk, cfg["rows"], 1.0 / (H * W),
           IS_F64=is_f64(x), BH=cfg["BH"], BW=cfg["BW"], RW=cfg["RW"], R_PAD=cfg["R_PAD"],
           num_warps=8, fp_fusion=False)
    energy = part.sum(1) if nchunk > 1 else part[:, 0]
    return energy.to(x.dtype).view(B, C, R), X


def _radial_bwd_fake(grad, X, W):
    B, C, H, _ = X.shape
    return grad.new_empty((B, C, H, W))


def _radial_spectrum_backward(grad: torch.Tensor, X: torch.Tensor, W: int) -> torch.Tensor:
    B, C, H, Wr = (int(s) for s in X.shape)
    R = int(grad.shape[-1])
    G = torch.empty_like(X)
    total = B * C * H * Wr
    block = _flat_block(total)
    launch(_radial_spectrum_bwd_kernel, (cdiv(total, block),), torch.view_as_real(X),
           grad.to(_real_of(X)).contiguous(), torch.view_as_real(G), total, H, W, Wr, R, 2.0 / (H * W),
           BLOCK=block, IS_F64=X.dtype == torch.complex128, num_warps=4, fp_fusion=False)
    return torch.fft.irfft2(G, s=(H, W), norm="forward").to(grad.dtype)


_radial_spectrum_op = register("radial_spectrum", _radial_fake)(_radial_spectrum)
_radial_spectrum_backward_op = register("radial_spectrum_backward", _radial_bwd_fake)(_radial_spectrum_backward)
no_second_derivative(_radial_spectrum_backward_op, "radial_spectrum", "Triton")  # a second backward raises


def _radial_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.W = inputs[0].shape[-1]
    ctx.save_for_backward(output[1])


def _radial_backward(ctx, grad, _grad_spectrum):
    (X,) = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return None
    return backward_fn(ctx, _radial_spectrum_backward, _radial_spectrum_backward_op)(grad, X, ctx.W)


# eager mode calls _radial_spectrum without the op (its dispatch cost more than the kernels of a
# 64 x 64 field on an H200); tracing calls the op (_lib.with_autograd)
_radial_spectrum_call = with_autograd(_radial_spectrum_op, _radial_spectrum, _radial_setup, _radial_backward)


# ---------------------------------------------------------------------------------------------
# ops: spectral_loss ("magnitude" and "error" are separate ops: they keep different spectra)
# ---------------------------------------------------------------------------------------------
def _loss_reduce(P: torch.Tensor, Y: torch.Tensor | None, H: int, W: int, lam: float, f0: float) -> torch.Tensor:
    total = P.numel()
    block = _flat_block(total)
    nprog = cdiv(total, block)
    acc_dtype = _real_of(P)
    part = torch.empty((nprog,), dtype=acc_dtype, device=P.device)
    Pr = torch.view_as_real(P)
    launch(_spectral_loss_fwd_kernel, (nprog,), Pr, torch.view_as_real(Y) if Y is not None else Pr, part,
           total, H, W, W // 2 + 1, *_weight_args(H, W, lam, f0), 1.0 / (total * H * W),
           ERROR_MODE=Y is None, IS_F64=acc_dtype == torch.float64, BLOCK=block, num_warps=4)
    return part.sum()


def _loss_magnitude_fake(pred, target, lam, f0):
    return pred.new_empty(()), _empty_spectrum(pred), _empty_spectrum(target)


def _loss_magnitude(pred: torch.Tensor, target: torch.Tensor, lam: float,
                    f0: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    H, W = int(pred.shape[-2]), int(pred.shape[-1])
    P, Y = _spectrum(pred), _spectrum(target)
    return _loss_reduce(P, Y, H, W, lam, f0).to(pred.dtype), P, Y


def _loss_error_fake(pred, target, lam, f0):
    return pred.new_empty(()), _empty_spectrum(pred)


def _loss_error(pred: torch.Tensor, target: torch.Tensor, lam: float, f0: float) -> tuple[torch.Tensor, torch.Tensor]:
    H, W = int(pred.shape[-2]), int(pred.shape[-1])
    dtype = pred.dtype
    if dtype in LOW_PRECISION:  # the difference in float32, not rounded to 16 bits
        pred, target = pred.float(), target.float()
    D = _spectrum(pred - target)  # |P - Y|^2 needs only the spectrum of the difference
    return _loss_reduce(D, None, H, W, lam, f0).to(dtype), D


_loss_magnitude_op = register("spectral_loss_magnitude", _loss_magnitude_fake)(_loss_magnitude)
_loss_error_op = register("spectral_loss_error", _loss_error_fake)(_loss_error)


def _loss_grads(grad, P, Y, W, lam, f0, need_y):
    """(grad_pred, grad_target or None): the kernel's dL/dSpectrum, then irfft2 (the adjoint)."""
    B, C, H, Wr = (int(s) for s in P.shape)
    total = B * C * H * Wr
    block = _flat_block(total)
    error_mode = Y is None
    GP = torch.empty_like(P)
    GY = torch.empty_like(Y) if need_y and not error_mode else None
    Pr = torch.view_as_real(P)
    launch(_spectral_loss_bwd_kernel, (cdiv(total, block),), Pr,
           torch.view_as_real(Y) if Y is not None else Pr, grad.reshape(1).to(_real_of(P)),
           torch.view_as_real(GP), torch.view_as_real(GY) if GY is not None else Pr,
           total, H, W, Wr, *_weight_args(H, W, lam, f0), 2.0 / (total * H * W),
           ERROR_MODE=error_mode, NEED_Y=GY is not None, IS_F64=_real_of(P) == torch.float64,
           BLOCK=block, num_warps=4)
    gp = torch.fft.irfft2(GP, s=(H, W), norm="forward").to(grad.dtype)
    gy = torch.fft.irfft2(GY, s=(H, W), norm="forward").to(grad.dtype) if GY is not None else None
    return gp, gy


def _loss_magnitude_bwd_fake(grad, P, Y, W, lam, f0, need_target):
    B, C, H, _ = P.shape
    gp = grad.new_empty((B, C, H, W))
    return gp, (grad.new_empty((B, C, H, W)) if need_target else grad.new_empty((0,)))


def _loss_magnitude_bwd(grad: torch.Tensor, P: torch.Tensor, Y: torch.Tensor, W: int, lam: float,
                        f0: float, need_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gp, gy = _loss_grads(grad, P, Y, W, lam, f0, need_target)
    return gp, (gy if gy is not None else grad.new_empty((0,)))


def _loss_error_bwd_fake(grad, D, W, lam, f0):
    B, C, H, _ = D.shape
    return grad.new_empty((B, C, H, W))


def _loss_error_bwd(grad: torch.Tensor, D: torch.Tensor, W: int, lam: float, f0: float) -> torch.Tensor:
    return _loss_grads(grad, D, None, W, lam, f0, False)[0]


_loss_magnitude_bwd_op = register("spectral_loss_magnitude_backward", _loss_magnitude_bwd_fake)(_loss_magnitude_bwd)
_loss_error_bwd_op = register("spectral_loss_error_backward", _loss_error_bwd_fake)(_loss_error_bwd)
no_second_derivative(_loss_magnitude_bwd_op, "spectral_loss", "Triton")  # a second backward raises
no_second_derivative(_loss_error_bwd_op, "spectral_loss", "Triton")


def _loss_setup(ctx, inputs, output):
    pred, target, lam, f0 = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.W, ctx.lam, ctx.f0 = pred.shape[-1], lam, f0
    ctx.save_for_backward(*output[1:])


def _loss_magnitude_backward(ctx, grad, *_grad_spectra):
    P, Y = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[:2]
    if grad is None or not (need_pred or need_target):
        return None, None, None, None
    bwd = backward_fn(ctx, _loss_magnitude_bwd, _loss_magnitude_bwd_op)  # the op when recorded or traced
    gp, gy = bwd(grad, P, Y, ctx.W, ctx.lam, ctx.f0, need_target)
    return (gp if need_pred else None), (gy if need_target else None), None, None


def _loss_error_backward(ctx, grad, _grad_spectrum=None):
    (D,) = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[:2]
    if grad is None or not (need_pred or need_target):
        return None, None, None, None
    gp = backward_fn(ctx, _loss_error_bwd, _loss_error_bwd_op)(grad, D, ctx.W, ctx.lam, ctx.f0)
    return (gp if need_pred else None), (-gp if need_target else None), None, None


_loss_magnitude_op.register_autograd(_loss_magnitude_backward, setup_context=_loss_setup)
_loss_error_op.register_autograd(_loss_error_backward, setup_context=_loss_setup)


# ---------------------------------------------------------------------------------------------
# public functions (arguments already validated by irno_kernels' wrappers)
# ---------------------------------------------------------------------------------------------
def radial_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Energy of rfft2(x, norm="ortho") per radial shell, differentiable.

    x: (B, C, H, W) float32/float64 -> (B, C, R), R = num_shells(H, W).
    """
    return _radial_spectrum_call(x)[0]


def spectral_loss(pred: torch.Tensor, target: torch.Tensor, lam: float, f0: float = 0.5,
                  mode: str = "magnitude") -> torch.Tensor:
    """Weighted spectral loss (a 0-D tensor), differentiable in pred and target.

    pred, target: (B, C, H, W) float32/float64; see irno_kernels.spectral_loss_ref.
    """
    if mode not in ("magnitude", "error"):
        raise ValueError(f"mode: expected 'magnitude' or 'error', got {mode!r}")
    lam, f0 = float(lam), float(f0)
    if torch.compiler.is_compiling():
        op = _loss_magnitude_op if mode == "magnitude" else _loss_error_op
        return op(pred, target, lam, f0)[0]
    if torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad):
        return _EagerSpectralLoss.apply(pred, target, lam, f0, mode)
    return (_loss_magnitude if mode == "magnitude" else _loss_error)(pred, target, lam, f0)[0]


class _EagerSpectralLoss(torch.autograd.Function):
    """The registered ops' kernels and formulas without their Python dispatch (eager mode: on small
    fields the dispatch cost more than the kernels). The backward is the registered op's: the plain
    kernels, or the backward op when a second backward could follow (_lib.backward_fn)."""

    @staticmethod
    def forward(ctx, pred, target, lam, f0, mode):
        out = (_loss_magnitude if mode == "magnitude" else _loss_error)(pred, target, lam, f0)
        ctx.W, ctx.lam, ctx.f0, ctx.mode = pred.shape[-1], lam, f0, mode
        ctx.save_for_backward(*out[1:])  # the spectra, as _loss_setup keeps them
        ctx.eager = True
        return out[0]

    @staticmethod
    def backward(ctx, grad):
        bwd = _loss_magnitude_backward if ctx.mode == "magnitude" else _loss_error_backward
        return (*bwd(ctx, grad), None)
