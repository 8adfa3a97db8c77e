"""The spectral loss of small fields as ONE Triton kernel: the rfft2 of pred and target as DFT
matrix products on the tensor cores, the weighted sum, and (when a gradient is wanted) the
gradient itself, per (batch, channel) plane, with nothing but the inputs read and the gradient
written.

On fields of up to MAX_SIDE x MAX_SIDE the FFT route (irno_kernels/triton/spectrum.py: two rfft2,
the loss kernel and a sum; then the gradient kernel and an irfft2 in the backward) is a chain of
small launches, each far from the hardware's limits; here one plane's whole computation fits one
program:

    Xr = x @ Cw - i x @ Sw                            the row transform, (H, K) complex
    X  = (Ch - i Sh) @ Xr                             the column transform, (H, K)
    loss += scale * sum_(m, k) w(m, k) * err(m, k)    err = (|P| - |Y|)^2 or |P - Y|^2
    dL/dx = Re[(Ch + i Sh) @ G @ (Cw + i Sw)^T]       G = dL/dRe X + i dL/dIm X

with Ch[m, h] = cos(2 pi m h / H), Sh the sine (symmetric: each is its own transpose), Cw[w, k] =
cos(2 pi w k / W), Sw the sine, computed inline from (m h mod H) and (w k mod W). The matrix
products cover columns k < (W + 1) // 2; for even W the Nyquist column k = W/2 (whose row factor
is (-1)^w, real) is a matrix-vector product on its own, so K, the padded width of the products, is
half the power of two above W rather than all of it.

The gradient is linear in the incoming gradient g, so the forward writes it for g = 1 and the
backward scales it (one multiplication): the whole forward+backward is the kernel, the sum of the
per-plane partials and that product. The saved gradient takes the memory of the input (the FFT
route keeps the spectra, about as much).

Precision: float32 data, products in tl.dot's "tf32x3" (three TF32 products: about float32
accuracy; a loss must not change with the TF32 switch). float64 runs under the interpreter only
(tests: the products then are exact float64); on a GPU float64 takes the FFT route.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from irno_kernels.triton._lib import INTERPRET, launch, pow2, register
from irno_kernels.triton.spectrum import _loss_weight, _weight_args

__all__ = ["MAX_SIDE", "fits", "spectral_loss_dft"]

#: the largest H and W the one-program-per-plane kernel takes (its tiles live in registers)
MAX_SIDE = 64
_PREC = "tf32x3"
#: rows of the column transform per step, and warps per program (ptxas for sm_90 at 64 x 64: the
#: fewest spill bytes of {4, 8, 16} warps x {16, 32} rows; "tf32x3" holds each operand twice)
MB, NUM_WARPS = 16, 8
_TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _trig(r, c, N, valid, acc_ty: tl.constexpr):
    """(cos, sin) of 2 pi (r c mod N) / N on the grid r[:, None] x c[None, :], 0 where not valid
    (reducing r c mod N first keeps the angle in [0, 2 pi): full float accuracy)."""
    t = (r[:, None] * c[None, :]) % N
    ang = t.to(acc_ty) * (_TWO_PI / tl.cast(N, acc_ty))
    return tl.where(valid, tl.cos(ang), 0.0), tl.where(valid, tl.sin(ang), 0.0)


@triton.jit
def _row_transform(x, cw, sw, alt, PREC: tl.constexpr):
    """(a, b, r): x @ Cw, x @ Sw (BH, BK) and the Nyquist column x @ (-1)^w (BH,) of one plane x
    (BH, BW), zero-padded; the row transform is a - i b (and r at k = W/2)."""
    a = tl.dot(x, cw, input_precision=PREC)
    b = tl.dot(x, sw, input_precision=PREC)
    return a, b, tl.sum(x * alt[None, :], axis=1)


@triton.jit
def _column_block(a, b, r, ch, sh, PREC: tl.constexpr):
    """Rows m of the block of the unscaled rfft2: (re, im) (MB, BK) on the product columns and
    (re, im) (MB,) of the Nyquist column, from the row transform and ch/sh (MB, BH) of the block."""
    re = tl.dot(ch, a, input_precision=PREC) - tl.dot(sh, b, input_precision=PREC)
    im = -(tl.dot(ch, b, input_precision=PREC) + tl.dot(sh, a, input_precision=PREC))
    return re, im, tl.sum(ch * r[None, :], axis=1), -tl.sum(sh * r[None, :], axis=1)


@triton.jit
def _adjoint_block(u, v, un, gre, gim, gnre, gnim, cht, sht, PREC: tl.constexpr):
    """Add the block's share of (Ch + i Sh)^T G to (u, v) (BH, BK) and of its Nyquist column to un
    (BH,): G = gre + i gim (MB, BK) and gnre + i gnim (MB,) on rows m of the block; cht/sht (BH, MB)
    the block's columns of Ch/Sh (each its own transpose)."""
    u += tl.dot(cht, gre, input_precision=PREC) - tl.dot(sht, gim, input_precision=PREC)
    v += tl.dot(sht, gre, input_precision=PREC) + tl.dot(cht, gim, input_precision=PREC)
    un += tl.sum(cht * gnre[None, :] - sht * gnim[None, :], axis=1)
    return u, v, un


@triton.jit
def _grid_of(u, v, un, cwt, swt, alt, PREC: tl.constexpr):
    """dL/dx (BH, BW) = Re[(u + i v) (Cw + i Sw)^T] + un (-1)^w: the row transform's adjoint."""
    gx = tl.dot(u, cwt, input_precision=PREC) - tl.dot(v, swt, input_precision=PREC)
    return gx + un[:, None] * alt[None, :]


@triton.jit
def _spectral_loss_dft_kernel(
    p_ptr, y_ptr, part_ptr, gp_ptr, gy_ptr,
    C, H, W, KD,
    psb, psc, psh, psw, ysb, ysc, ysh, ysw,
    lam: tl.float64, inv_f0: tl.float64, inv_mean: tl.float64, zero_pow: tl.float64, scale: tl.float64,
    ERROR_MODE: tl.constexpr, GRAD_P: tl.constexpr, GRAD_Y: tl.constexpr, NYQ: tl.constexpr,
    IS_F64: tl.constexpr, PREC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr,
    MB: tl.constexpr,
):
    """Plane n = program 0: part[n] = the plane's share of the loss; with GRAD_P / GRAD_Y, dL/dpred
    and dL/dtarget of that share for an incoming gradient of 1, written to gp / gy (B, C, H, W)
    contiguous. KD = (W + 1) // 2 columns go through the products; NYQ (even W) adds the Nyquist
    column apart. The column transform runs over blocks of MB rows m
    (each block's loss terms and its share of the adjoint at once), so only the row transforms and
    the adjoint's accumulators span the whole plane."""
    n = tl.program_id(0).to(tl.int64)
    b = n // C
    c = n % C
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    hh = tl.arange(0, BH)
    ww = tl.arange(0, BW)
    kk = tl.arange(0, BK)
    rows = hh < H
    cols = ww < W
    m2 = rows[:, None] & cols[None, :]
    cw, sw = _trig(ww, kk, W, cols[:, None] & (kk < KD)[None, :], acc_ty)
    alt = tl.where(cols, 1.0 - 2.0 * (ww % 2).to(acc_ty), 0.0)
    p = tl.load(p_ptr + b * psb + c * psc + hh[:, None] * psh + ww[None, :] * psw, mask=m2, other=0.0).to(acc_ty)
    y = tl.load(y_ptr + b * ysb + c * ysc + hh[:, None] * ysh + ww[None, :] * ysw, mask=m2, other=0.0).to(acc_ty)
    if ERROR_MODE:
        pa, pb, pr = _row_transform(p - y, cw, sw, alt, PREC)
        ya, yb, yr = pa, pb, pr  # unused
    else:
        pa, pb, pr = _row_transform(p, cw, sw, alt, PREC)
        ya, yb, yr = _row_transform(y, cw, sw, alt, PREC)
    s = (tl.zeros((1,), dtype=acc_ty) + scale).to(acc_ty)
    c2 = 2.0 * s  # d/dz of s w |z|^2-type terms
    pu = tl.zeros((BH, BK), dtype=acc_ty)
    pv = tl.zeros((BH, BK), dtype=acc_ty)
    pun = tl.zeros((BH,), dtype=acc_ty)
    yu = tl.zeros((BH, BK), dtype=acc_ty)
    yv = tl.zeros((BH, BK), dtype=acc_ty)
    yun = tl.zeros((BH,), dtype=acc_ty)
    total = tl.zeros((1,), dtype=acc_ty)
    for m0 in range(0, H, MB):
        mm = m0 + tl.arange(0, MB)
        mrow = mm < H
        ch, sh = _trig(mm, hh, H, mrow[:, None] & rows[None, :], acc_ty)
        w = tl.where(mrow[:, None] & (kk < KD)[None, :],
                     _loss_weight(mm[:, None], kk[None, :], H, W, lam, inv_f0, inv_mean, zero_pow, acc_ty), 0.0)
        if NYQ:
            wn = tl.where(mrow, _loss_weight(mm, W // 2 + 0 * mm, H, W, lam, inv_f0, inv_mean, zero_pow, acc_ty), 0.0)
        else:
            wn = tl.zeros((MB,), dtype=acc_ty)
        pre, pim, pnre, pnim = _column_block(pa, pb, pr, ch, sh, PREC)
        if ERROR_MODE:
            total += tl.sum(tl.sum(w * (pre * pre + pim * pim), axis=1), axis=0)
            total += tl.sum(wn * (pnre * pnre + pnim * pnim), axis=0)
        else:
            yre, yim, ynre, ynim = _column_block(ya, yb, yr, ch, sh, PREC)
            ap = tl.sqrt(pre * pre + pim * pim)
            ay = tl.sqrt(yre * yre + yim * yim)
            apn = tl.sqrt(pnre * pnre + pnim * pnim)
            ayn = tl.sqrt(ynre * ynre + ynim * ynim)
            total += tl.sum(tl.sum(w * (ap - ay) * (ap - ay), axis=1), axis=0)
            total += tl.sum(wn * (apn - ayn) * (apn - ayn), axis=0)
        if GRAD_P or GRAD_Y:
            cht, sht = _trig(hh, mm, H, rows[:, None] & mrow[None, :], acc_ty)
            if ERROR_MODE:  # dL/dD = c2 w D; the target's gradient is its negative
                pu, pv, pun = _adjoint_block(pu, pv, pun, c2 * w * pre, c2 * w * pim, c2 * wn * pnre,
                                             c2 * wn * pnim, cht, sht, PREC)
            else:
                d = c2 * w * (ap - ay)
                dn = c2 * wn * (apn - ayn)
                if GRAD_P:  # d|P|/dP = P / |P|, and 0 where |P| = 0 (as autograd of abs)
                    sp = tl.where(ap > 0, d / tl.where(ap > 0, ap, 1.0), 0.0)
                    spn = tl.where(apn > 0, dn / tl.where(apn > 0, apn, 1.0), 0.0)
                    pu, pv, pun = _adjoint_block(pu, pv, pun, sp * pre, sp * pim, spn * pnre, spn * pnim,
                                                 cht, sht, PREC)
                if GRAD_Y:
                    sy = tl.where(ay > 0, -d / tl.where(ay > 0, ay, 1.0), 0.0)
                    syn = tl.where(ayn > 0, -dn / tl.where(ayn > 0, ayn, 1.0), 0.0)
                    yu, yv, yun = _adjoint_block(yu, yv, yun, sy * yre, sy * yim, syn * ynre, syn * ynim,
                                                 cht, sht, PREC)
    tl.store(part_ptr + n + tl.arange(0, 1), total * s)
    if GRAD_P or GRAD_Y:
        cwt, swt = _trig(kk, ww, W, (kk < KD)[:, None] & cols[None, :], acc_ty)
        out = n * H * W + hh[:, None] * W + ww[None, :]
        if ERROR_MODE or GRAD_P:
            gx = _grid_of(pu, pv, pun, cwt, swt, alt, PREC)
            if GRAD_P:
                tl.store(gp_ptr + out, gx, mask=m2)
            if ERROR_MODE and GRAD_Y:
                tl.store(gy_ptr + out, -gx, mask=m2)
        if GRAD_Y and not ERROR_MODE:
            tl.store(gy_ptr + out, _grid_of(yu, yv, yun, cwt, swt, alt, PREC), mask=m2)


# ---------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------
def fits(pred: torch.Tensor) -> bool:
    """Whether the one-kernel route takes this field: H, W <= MAX_SIDE, float32 (float64 too under
    the interpreter, for the tests)."""
    H, W = pred.shape[-2:]
    ok_dtype = pred.dtype == torch.float32 or (INTERPRET and pred.dtype == torch.float64)
    return ok_dtype and H <= MAX_SIDE and W <= MAX_SIDE


def blocks(H: int, W: int) -> tuple[int, int, int]:
    """(BH, BW, BK): rows, columns and product columns padded to powers of two of at least 16
    (tl.dot's smallest operand)."""
    return max(16, pow2(H)), max(16, pow2(W)), max(16, pow2((W + 1) // 2))


def _run(pred, target, lam, f0, mode, grad_pred, grad_target):
    """(loss, unit gradient of pred or an empty tensor, of target or an empty tensor)."""
    B, C, H, W = (int(s) for s in pred.shape)
    N = B * C
    f64 = pred.dtype == torch.float64
    part = torch.empty((N,), dtype=pred.dtype, device=pred.device)
    none = pred.new_empty((0,))
    gp = torch.empty((B, C, H, W), dtype=pred.dtype, device=pred.device) if grad_pred else none
    gy = torch.empty((B, C, H, W), dtype=pred.dtype, device=pred.device) if grad_target else none
    bh, bw, bk = blocks(H, W)
    total = N * H * (W // 2 + 1)
    launch(_spectral_loss_dft_kernel, (N,), pred, target, part, gp if grad_pred else part,
           gy if grad_target else part, C, H, W, (W + 1) // 2, *pred.stride(), *target.stride(),
           *_weight_args(H, W, lam, f0), 1.0 / (total * H * W),
           ERROR_MODE=mode == "error", GRAD_P=grad_pred, GRAD_Y=grad_target, NYQ=W % 2 == 0, IS_F64=f64,
           PREC=_PREC, BH=bh, BW=bw, BK=bk, MB=MB, num_warps=NUM_WARPS, num_stages=1)
    return part.sum(), gp, gy


def _loss_dft_fake(pred, target, lam, f0, mode, grad_pred, grad_target):
    none = pred.new_empty((0,))
    return (pred.new_empty(()), torch.empty_like(pred, memory_format=torch.contiguous_format) if grad_pred else none,
            torch.empty_like(pred, memory_format=torch.contiguous_format) if grad_target else none)


@register("spectral_loss_dft", _loss_dft_fake)
def _loss_dft_op(pred: torch.Tensor, target: torch.Tensor, lam: float, f0: float, mode: str, grad_pred: bool,
                 grad_target: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run(pred, target, lam, f0, mode, grad_pred, grad_target)


def _loss_dft_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1:])


def _loss_dft_backward(ctx, grad, *_unit_grads):
    gp, gy = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[:2]
    if grad is None:
        return None, None, None, None, None, None, None
    return ((grad * gp if need_pred and gp.numel() else None), (grad * gy if need_target and gy.numel() else None),
            None, None, None, None, None)


_loss_dft_op.register_autograd(_loss_dft_backward, setup_context=_loss_dft_setup)


class _EagerLossDFT(torch.autograd.Function):
    """The registered op's kernel and formulas without its Python dispatch (eager mode)."""

    @staticmethod
    def forward(ctx, pred, target, lam, f0, mode):
        loss, gp, gy = _run(pred, target, lam, f0, mode, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(gp, gy)
        return loss

    @staticmethod
    def backward(ctx, grad):
        gp, gy = ctx.saved_tensors
        return ((grad * gp if ctx.needs_input_grad[0] else None), (grad * gy if ctx.needs_input_grad[1] else None),
                None, None, None)


def spectral_loss_dft(pred: torch.Tensor, target: torch.Tensor, lam: float, f0: float = 0.5,
                      mode: str = "magnitude") -> torch.Tensor:
    """spectral_loss by the one-kernel DFT route (module docstring); a 0-D tensor in pred's dtype,
    differentiable in pred and target.

    pred, target: (B, C, H, W), float32 (float64 under the interpreter), H, W <= MAX_SIDE, any strides.
    """
    lam, f0 = float(lam), float(f0)
    if torch.compiler.is_compiling():
        return _loss_dft_op(pred, target, lam, f0, mode, pred.requires_grad, target.requires_grad)[0]
    if torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad):
        return _EagerLossDFT.apply(pred, target, lam, f0, mode)
    return _run(pred, target, lam, f0, mode, False, False)[0]
