"""Triton kernels for ``irno_kernels.periodic_pad_cat`` (periodic padding of a concatenation) and
``irno_kernels.periodic_upsample2x`` (periodic bilinear x2 written with a halo), forward and backward.

Forward: one launch per input. A program takes a tile of one batch item, a block of channels by a
block of grid points, reads it once and writes it to each of its copies in the padded result at the
input's channel offset: the interior copy, plus the wrapped ones for points within ``halo`` of an
edge (up to 9 in all, the same positions as the fused LayerNorm's halo, irno_kernels/triton/norm.py).
Every element of the result is written exactly once, in the result's dtype (a cast on the fly).

Backward (the adjoint): each grid point of an input adds up its copies' gradients (read at up to 9
positions of the padded gradient, at the input's channel offset), in float32 (float64 for float64),
and writes the input's gradient once, in its dtype and memory format.

Both address every tensor through its strides (NCHW, channels-last, views); the result is
channels-last when the first input is. Every kernel is a registered op (``irno_triton::periodic_*``,
fake kernels and autograd), which torch.compile traces; eager mode runs autograd.Functions over the
same functions without the ops' Python dispatch (the refiner calls them ~30 times per step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from irno_kernels._checks import channels_last_like
from irno_kernels.triton._lib import INTERPRET, backward_fn, cdiv, launch, needs_autograd, pow2, register
from irno_kernels.triton.norm import _halo_copy

__all__ = ["periodic_pad_cat", "periodic_upsample2x"]


@triton.jit
def _tile(C, S1, S2, nblk, ncblk, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's tile: batch item b, channels c (valid: cmask) by grid points (i, j) (nmask)."""
    pid = tl.program_id(0)
    b = pid // (nblk * ncblk)
    rest = pid % (nblk * ncblk)
    c = (rest // nblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = (rest % nblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, c, c < C, n // S2, n % S2, n < S1 * S2


@triton.jit
def _store_copies(y_ptr, base, c, cmask, r, q, nmask, v, ys1, ys2, ys3, S1, S2, HALO: tl.constexpr):
    """v at (r, q) of an S1 x S2 grid and at its periodic halo copies."""
    for a in tl.static_range(3):
        for e in tl.static_range(3):
            rr, qq, ok = _halo_copy(r, q, nmask, a, e, S1, S2, HALO)
            tl.store(y_ptr + base + c[:, None] * ys1 + (rr * ys2 + qq * ys3)[None, :], v,
                     mask=cmask[:, None] & ok[None, :])


@triton.jit
def _pad_part(x_ptr, y_ptr, b, c, cmask, i, j, nmask, xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3, S1, S2,
              HALO: tl.constexpr):
    x = tl.load(x_ptr + b * xs0 + c[:, None] * xs1 + (i * xs2 + j * xs3)[None, :],
                mask=cmask[:, None] & nmask[None, :], other=0.0)
    _store_copies(y_ptr, b * ys0, c, cmask, i, j, nmask, x.to(y_ptr.dtype.element_ty), ys1, ys2, ys3, S1, S2, HALO)


@triton.jit(do_not_specialize=["C", "C2", "S1", "nblk", "ncblk", "ncblk2"])  # _lib.UNSPECIALISED
def _pad_fwd_kernel(
    x_ptr, x2_ptr, y_ptr, C, C2, S1, S2, nblk, ncblk, ncblk2,
    xs0, xs1, xs2, xs3, x2s0, x2s1, x2s2, x2s3, ys0, ys1, ys2, ys3,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HALO: tl.constexpr,
):
    """x (C channels) then x2 (C2 channels, ncblk2 channel blocks; 0 for one input) written padded
    into y: one launch for a two-input concatenation (the U-Net decoder's skip and upsampled fields)."""
    pid = tl.program_id(0)
    per_b = nblk * (ncblk + ncblk2)
    b = pid // per_b
    rest = pid % per_b
    cb = rest // nblk
    n = (rest % nblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    i, j, nmask = n // S2, n % S2, n < S1 * S2
    if cb < ncblk:
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        _pad_part(x_ptr, y_ptr, b, c, c < C, i, j, nmask, xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3, S1, S2, HALO)
    else:
        c = (cb - ncblk) * BLOCK_C + tl.arange(0, BLOCK_C)
        _pad_part(x2_ptr, y_ptr + C * ys1, b, c, c < C2, i, j, nmask, x2s0, x2s1, x2s2, x2s3, ys0, ys1, ys2, ys3,
                  S1, S2, HALO)


@triton.jit(do_not_specialize=["C", "S1", "nblk", "ncblk"])  # _lib.UNSPECIALISED
def _pad_bwd_kernel(
    g_ptr, gx_ptr, C, S1, S2, nblk, ncblk,
    gs0, gs1, gs2, gs3, os0, os1, os2, os3,
    IS_F64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HALO: tl.constexpr,
):
    b, c, cmask, i, j, nmask = _tile(C, S1, S2, nblk, ncblk, BLOCK_C, BLOCK_P)
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    g = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_ty)
    for a in tl.static_range(3):
        for e in tl.static_range(3):
            r, q, ok = _halo_copy(i, j, nmask, a, e, S1, S2, HALO)
            g += tl.load(g_ptr + b * gs0 + c[:, None] * gs1 + (r * gs2 + q * gs3)[None, :],
                         mask=cmask[:, None] & ok[None, :], other=0.0).to(acc_ty)
    tl.store(gx_ptr + b * os0 + c[:, None] * os1 + (i * os2 + j * os3)[None, :],
             g.to(gx_ptr.dtype.element_ty), mask=cmask[:, None] & nmask[None, :])


def _blocks(C: int, N: int, values: int = 4096) -> tuple[int, int]:
    """(channels, grid points) per program: tiles of about ``values`` values on a GPU (at least 32
    points), the whole field per batch item under the interpreter (its cost grows with the program
    count)."""
    if INTERPRET:
        bc = pow2(C)
        return bc, max(32, min(pow2(N), 65536 // bc))
    bc = min(pow2(C), 64)
    return bc, max(32, min(256, values // bc))


def _tiles(B: int, C: int, N: int, values: int = 4096) -> tuple[tuple[int], int, int, int, int]:
    bc, bp = _blocks(C, N, values)
    nblk, ncblk = cdiv(N, bp), cdiv(C, bc)
    return (B * nblk * ncblk,), nblk, ncblk, bc, bp


#: the upsampling kernels hold a 3 x 3 neighbourhood (forward) or 16 taps (backward) per point: 8 warps,
#: and tiles of 2048 values for the backward, keep them in registers (ptxas for sm_90: no spills; 4
#: warps spilled 0.25 KB forward, 3.5 KB backward per thread)
UP_WARPS, UP_BWD_VALUES = 8, 2048


def _pad_into(x: torch.Tensor, y: torch.Tensor, halo: int, x2: torch.Tensor | None = None) -> None:
    """Write x (B, C, H, W) padded by halo into y (B, C, H + 2 halo, W + 2 halo), any strides; with
    x2 (B, C2, H, W), y has C + C2 channels and takes x2's after x's, in the same launch."""
    B, C, H, W = x.shape
    C2 = 0 if x2 is None else x2.shape[1]
    bc, bp = _blocks(max(C, C2), H * W)
    nblk, ncblk, ncblk2 = cdiv(H * W, bp), cdiv(C, bc), cdiv(C2, bc)
    other = x if x2 is None else x2
    launch(_pad_fwd_kernel, (B * nblk * (ncblk + ncblk2),), x, other, y, C, C2, H, W, nblk, ncblk, ncblk2,
           *x.stride(), *other.stride(), *y.stride(), BLOCK_C=bc, BLOCK_P=bp, HALO=halo, num_warps=4)


def _fold(g: torch.Tensor, shape, dtype: torch.dtype, channels_last: bool, halo: int) -> torch.Tensor:
    """The adjoint of _pad_into: g (B, C, H + 2 halo, W + 2 halo) -> (B, C, H, W) = shape, in dtype,
    channels-last or not."""
    B, C, H, W = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gx = torch.empty(shape, dtype=dtype, device=g.device, memory_format=fmt)
    grid, nblk, ncblk, bc, bp = _tiles(B, C, H * W)
    launch(_pad_bwd_kernel, grid, g, gx, C, H, W, nblk, ncblk, *g.stride(), *gx.stride(),
           IS_F64=torch.float64 in (g.dtype, dtype), BLOCK_C=bc, BLOCK_P=bp, HALO=halo, num_warps=4)
    return gx


def _pad_cat(xs: list[torch.Tensor], halo: int, out_dtype: torch.dtype) -> torch.Tensor:
    B, _, H, W = xs[0].shape
    fmt = torch.channels_last if channels_last_like(xs[0]) else torch.contiguous_format
    y = torch.empty((B, sum(x.shape[1] for x in xs), H + 2 * halo, W + 2 * halo), dtype=out_dtype,
                    device=xs[0].device, memory_format=fmt)
    off = 0
    for k in range(0, len(xs), 2):  # two inputs per launch (the decoder's concatenation: one)
        pair = xs[k:k + 2]
        width = sum(x.shape[1] for x in pair)
        _pad_into(pair[0], y[:, off:off + width], halo, pair[1] if len(pair) == 2 else None)
        off += width
    return y


class _PeriodicPadCat(torch.autograd.Function):
    """The padded concatenation; backward folds each input's channels of the gradient back (the
    registered op's formula, ``_pad_cat_grads``), forward mode pads the tangents (the map is linear).
    ctx-style forward: Function.apply binds the signature of a setup_context-style forward on every
    call (~10 us of host time)."""

    @staticmethod
    def forward(ctx, halo, out_dtype, *xs):
        ctx.halo, ctx.out_dtype, ctx.device = halo, out_dtype, xs[0].device
        # what the gradients must look like, not the inputs themselves (nothing is kept alive)
        ctx.metas = [(x.shape, x.dtype, channels_last_like(x)) for x in xs]
        ctx.eager = True  # _lib.backward_fn
        return _pad_cat(list(xs), halo, out_dtype)

    @staticmethod
    def backward(ctx, gy):
        metas = [(shape[1], dtype, cl) for shape, dtype, cl in ctx.metas]
        return (None, None, *_pad_cat_grads(ctx, gy, metas, ctx.needs_input_grad[2:]))

    @staticmethod
    def jvp(ctx, _dhalo, _ddtype, *tangents):
        ts = [t if t is not None else torch.zeros(shape, dtype=dtype, device=ctx.device)
              for t, (shape, dtype, _) in zip(tangents, ctx.metas)]
        return _pad_cat(ts, ctx.halo, ctx.out_dtype)


def periodic_pad_cat(xs: list[torch.Tensor], halo: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """cat(xs, 1) padded periodically by halo (arguments validated by irno_kernels.periodic_pad_cat).
    out_dtype defaults to the inputs' promoted dtype, as torch.cat."""
    if out_dtype is None:
        out_dtype = xs[0].dtype
        for x in xs[1:]:
            out_dtype = torch.promote_types(out_dtype, x.dtype)
    if torch.compiler.is_compiling():
        return _pad_cat_op(list(xs), int(halo), out_dtype)
    if not needs_autograd(xs):  # Function.apply costs ~10 us of host time for nothing to record
        return _pad_cat(list(xs), int(halo), out_dtype)
    return _PeriodicPadCat.apply(int(halo), out_dtype, *xs)


# ---------------------------------------------------------------------------------------------
# periodic bilinear x2 upsampling with a halo (irno_kernels.periodic_upsample2x)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _wrap(k, n):
    """k in [-1, n] taken modulo n."""
    return tl.where(k < 0, k + n, tl.where(k >= n, k - n, k))


@triton.jit
def _lerp_row(x_ptr, base, c, cmask, r, j, nmask, xs1, xs2, xs3, S2, acc_ty: tl.constexpr):
    """Row r of x interpolated along the grid's second dim at columns 2j and 2j + 1:
    (0.25 x[r, j-1] + 0.75 x[r, j], 0.75 x[r, j] + 0.25 x[r, j+1]), periodic."""
    m = cmask[:, None] & nmask[None, :]
    row = base + c[:, None] * xs1 + (r * xs2)[None, :]
    left = tl.load(x_ptr + row + (_wrap(j - 1, S2) * xs3)[None, :], mask=m, other=0.0).to(acc_ty)
    mid = tl.load(x_ptr + row + (j * xs3)[None, :], mask=m, other=0.0).to(acc_ty)
    right = tl.load(x_ptr + row + (_wrap(j + 1, S2) * xs3)[None, :], mask=m, other=0.0).to(acc_ty)
    return 0.25 * left + 0.75 * mid, 0.75 * mid + 0.25 * right


@triton.jit(do_not_specialize=["C", "S1", "nblk", "ncblk"])  # _lib.UNSPECIALISED
def _up_fwd_kernel(
    x_ptr, y_ptr, C, S1, S2, nblk, ncblk,
    xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3,
    IS_F64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HALO: tl.constexpr,
):
    """The four outputs (2i + a, 2j + e) of each input point of the tile, from its 3 x 3 periodic
    neighbourhood (interpolated along the columns first, then the rows, as ATen's bilinear kernel),
    each written with its halo copies into y (B, C, 2 S1 + 2 HALO, 2 S2 + 2 HALO)."""
    b, c, cmask, i, j, nmask = _tile(C, S1, S2, nblk, ncblk, BLOCK_C, BLOCK_P)
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    xb = b * xs0
    u0, u1 = _lerp_row(x_ptr, xb, c, cmask, _wrap(i - 1, S1), j, nmask, xs1, xs2, xs3, S2, acc_ty)
    m0, m1 = _lerp_row(x_ptr, xb, c, cmask, i, j, nmask, xs1, xs2, xs3, S2, acc_ty)
    d0, d1 = _lerp_row(x_ptr, xb, c, cmask, _wrap(i + 1, S1), j, nmask, xs1, xs2, xs3, S2, acc_ty)
    yb = b * ys0
    ty = y_ptr.dtype.element_ty
    _store_copies(y_ptr, yb, c, cmask, 2 * i, 2 * j, nmask, (0.25 * u0 + 0.75 * m0).to(ty),
                  ys1, ys2, ys3, 2 * S1, 2 * S2, HALO)
    _store_copies(y_ptr, yb, c, cmask, 2 * i, 2 * j + 1, nmask, (0.25 * u1 + 0.75 * m1).to(ty),
                  ys1, ys2, ys3, 2 * S1, 2 * S2, HALO)
    _store_copies(y_ptr, yb, c, cmask, 2 * i + 1, 2 * j, nmask, (0.75 * m0 + 0.25 * d0).to(ty),
                  ys1, ys2, ys3, 2 * S1, 2 * S2, HALO)
    _store_copies(y_ptr, yb, c, cmask, 2 * i + 1, 2 * j + 1, nmask, (0.75 * m1 + 0.25 * d1).to(ty),
                  ys1, ys2, ys3, 2 * S1, 2 * S2, HALO)


@triton.jit(do_not_specialize=["C", "S1", "nblk", "ncblk"])  # _lib.UNSPECIALISED
def _up_bwd_kernel(
    g_ptr, gx_ptr, C, S1, S2, nblk, ncblk,
    gs0, gs1, gs2, gs3, os0, os1, os2, os3,
    IS_F64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The adjoint of the upsampling, for g the gradient of the (2 S1, 2 S2) field (halo folded):
    per axis, grad x_i = 3/4 (g_2i + g_2i+1) + 1/4 (g_2i-1 + g_2i+2), periodic: 16 taps per point."""
    b, c, cmask, i, j, nmask = _tile(C, S1, S2, nblk, ncblk, BLOCK_C, BLOCK_P)
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    m = cmask[:, None] & nmask[None, :]
    base = g_ptr + b * gs0 + c[:, None] * gs1
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_ty)
    for a in tl.static_range(4):
        wa = 0.25 if (a == 0 or a == 3) else 0.75
        r = _wrap(2 * i + a - 1, 2 * S1)
        row = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_ty)
        for e in tl.static_range(4):
            we = 0.25 if (e == 0 or e == 3) else 0.75
            q = _wrap(2 * j + e - 1, 2 * S2)
            row += we * tl.load(base + (r * gs2 + q * gs3)[None, :], mask=m, other=0.0).to(acc_ty)
        acc += wa * row
    tl.store(gx_ptr + b * os0 + c[:, None] * os1 + (i * os2 + j * os3)[None, :],
             acc.to(gx_ptr.dtype.element_ty), mask=m)


def _upsample(x: torch.Tensor, halo: int, out_dtype: torch.dtype) -> torch.Tensor:
    B, C, H, W = x.shape
    fmt = torch.channels_last if channels_last_like(x) else torch.contiguous_format
    y = torch.empty((B, C, 2 * H + 2 * halo, 2 * W + 2 * halo), dtype=out_dtype, device=x.device,
                    memory_format=fmt)
    grid, nblk, ncblk, bc, bp = _tiles(B, C, H * W)
    launch(_up_fwd_kernel, grid, x, y, C, H, W, nblk, ncblk, *x.stride(), *y.stride(),
           IS_F64=torch.float64 in (x.dtype, out_dtype), BLOCK_C=bc, BLOCK_P=bp, HALO=halo, num_warps=UP_WARPS)
    return y


def _upsample_adjoint(gy: torch.Tensor, shape, dtype: torch.dtype, channels_last: bool, halo: int) -> torch.Tensor:
    B, C, H, W = shape
    f64 = torch.float64 in (gy.dtype, dtype)
    if halo:  # fold the halo first, in the accumulation precision
        gy = _fold(gy, (B, C, 2 * H, 2 * W), torch.float64 if f64 else torch.float32, channels_last, halo)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gx = torch.empty(shape, dtype=dtype, device=gy.device, memory_format=fmt)
    grid, nblk, ncblk, bc, bp = _tiles(B, C, H * W, UP_BWD_VALUES)
    launch(_up_bwd_kernel, grid, gy, gx, C, H, W, nblk, ncblk, *gy.stride(), *gx.stride(),
           IS_F64=f64, BLOCK_C=bc, BLOCK_P=bp, num_warps=UP_WARPS)
    return gx


class _PeriodicUpsample2x(torch.autograd.Function):
    """The upsampling; backward is the registered op's formula (``_upsample_backward``), forward mode
    upsamples the tangent (the map is linear)."""

    @staticmethod
    def forward(ctx, x, halo, out_dtype):
        ctx.halo, ctx.out_dtype = halo, out_dtype
        ctx.dtype, ctx.cl = x.dtype, channels_last_like(x)
        ctx.eager = True  # _lib.backward_fn
        return _upsample(x, halo, out_dtype)

    @staticmethod
    def backward(ctx, gy):
        return _upsample_backward(ctx, gy)

    @staticmethod
    def jvp(ctx, t, _dhalo, _ddtype):
        return _upsample(t, ctx.halo, ctx.out_dtype)


def periodic_upsample2x(x: torch.Tensor, halo: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Periodic bilinear x2 of x padded by halo (arguments validated by irno_kernels.periodic_upsample2x)."""
    if torch.compiler.is_compiling():
        return _upsample_op(x, int(halo), out_dtype)
    if not needs_autograd((x,)):
        return _upsample(x, int(halo), out_dtype)
    return _PeriodicUpsample2x.apply(x, int(halo), out_dtype)


# ---------------------------------------------------------------------------------------------
# registered ops (torch.library: fake kernels and autograd), what torch.compile traces; eager mode
# runs the autograd.Functions above over the same functions, without the ops' Python dispatch
# ---------------------------------------------------------------------------------------------
def _empty(like: torch.Tensor, shape, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _pad_cat_fake(xs, halo, out_dtype):
    B, _, H, W = xs[0].shape
    return _empty(xs[0], (B, sum(x.shape[1] for x in xs), H + 2 * halo, W + 2 * halo), out_dtype,
                  channels_last_like(xs[0]))


def _pad_fold(gy: torch.Tensor, halo: int, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    B, C, Hp, Wp = gy.shape
    return _fold(gy, (B, C, Hp - 2 * halo, Wp - 2 * halo), dtype, channels_last, halo)


def _pad_fold_fake(gy, halo, dtype, channels_last):
    B, C, Hp, Wp = gy.shape
    return _empty(gy, (B, C, Hp - 2 * halo, Wp - 2 * halo), dtype, channels_last)


def _upsample_fake(x, halo, out_dtype):
    B, C, H, W = x.shape
    return _empty(x, (B, C, 2 * H + 2 * halo, 2 * W + 2 * halo), out_dtype, channels_last_like(x))


def _up_adjoint(gy: torch.Tensor, halo: int, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    B, C, Hp, Wp = gy.shape
    return _upsample_adjoint(gy, (B, C, (Hp - 2 * halo) // 2, (Wp - 2 * halo) // 2), dtype, channels_last, halo)


def _up_adjoint_fake(gy, halo, dtype, channels_last):
    B, C, Hp, Wp = gy.shape
    return _empty(gy, (B, C, (Hp - 2 * halo) // 2, (Wp - 2 * halo) // 2), dtype, channels_last)


_pad_cat_op = register("periodic_pad_cat", _pad_cat_fake)(_pad_cat)
_pad_fold_op = register("periodic_pad_fold", _pad_fold_fake)(_pad_fold)
_upsample_op = register("periodic_upsample2x", _upsample_fake)(_upsample)
_up_adjoint_op = register("periodic_upsample2x_adjoint", _up_adjoint_fake)(_up_adjoint)


def _pad_cat_setup(ctx, inputs, output):
    xs, halo, _ = inputs
    ctx.halo = halo
    ctx.metas = [(x.shape[1], x.dtype, channels_last_like(x)) for x in xs]


def _pad_cat_grads(ctx, gy, metas, needs):
    """Each input's gradient: its channels of gy folded back (metas: (channels, dtype, channels-last)
    per input). Through the fold op when a second backward could follow (_lib.backward_fn)."""
    fold = backward_fn(ctx, _pad_fold, _pad_fold_op)
    grads, off = [], 0
    for (c, dtype, cl), need in zip(metas, needs):
        grads.append(fold(gy[:, off:off + c], ctx.halo, dtype, cl) if need else None)
        off += c
    return grads


def _pad_cat_backward(ctx, gy):
    return _pad_cat_grads(ctx, gy, ctx.metas, ctx.needs_input_grad[0]), None, None


def _upsample_setup(ctx, inputs, output):
    x, halo, _ = inputs
    ctx.halo, ctx.dtype, ctx.cl = halo, x.dtype, channels_last_like(x)


def _upsample_backward(ctx, gy):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return backward_fn(ctx, _up_adjoint, _up_adjoint_op)(gy, ctx.halo, ctx.dtype, ctx.cl), None, None


_pad_cat_op.register_autograd(_pad_cat_backward, setup_context=_pad_cat_setup)
_upsample_op.register_autograd(_upsample_backward, setup_context=_upsample_setup)


# The backward ops are linear, and each is the adjoint of a forward op: their own backward is that
# forward op (registered, with autograd), so derivatives of every order are exact.
def _adjoint_setup(ctx, inputs, output):
    gy, halo, _, _ = inputs
    ctx.halo, ctx.dtype = halo, gy.dtype


def _pad_fold_backward(ctx, gg):
    return _pad_cat_op([gg], ctx.halo, ctx.dtype), None, None, None


def _up_adjoint_backward(ctx, gg):
    return _upsample_op(gg, ctx.halo, ctx.dtype), None, None, None


_pad_fold_op.register_autograd(_pad_fold_backward, setup_context=_adjoint_setup)
_up_adjoint_op.register_autograd(_up_adjoint_backward, setup_context=_adjoint_setup)
