"""Triton kernels for ``irno_kernels.periodic_pad_cat`` (periodic padding of a concatenation), forward
and backward.

Forward: one launch per input. A program takes a tile of one batch item, a block of channels by a
block of grid points, reads it once and writes it to each of its copies in the padded result at the
input's channel offset: the interior copy, plus the wrapped ones for points within ``halo`` of an
edge (up to 9 in all, the same positions as the fused LayerNorm's halo, irno_kernels/triton/norm.py).
Every element of the result is written exactly once, in the result's dtype (a cast on the fly).

Backward (the adjoint): each grid point of an input adds up its copies' gradients (read at up to 9
positions of the padded gradient, at the input's channel offset), in float32 (float64 for float64),
and writes the input's gradient once, in its dtype and memory format.

Both address every tensor through its strides (NCHW, channels-last, views); the result is
channels-last when the first input is. Eager mode runs an autograd.Function over the raw kernels;
``irno_kernels.periodic_pad_cat`` traces the reference under torch.compile instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from irno_kernels._checks import channels_last_like
from irno_kernels.triton._lib import INTERPRET, launch, pow2
from irno_kernels.triton.norm import _halo_copy

__all__ = ["periodic_pad_cat"]


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
def _pad_fwd_kernel(
    x_ptr, y_ptr, C, S1, S2, nblk, ncblk,
    xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HALO: tl.constexpr,
):
    b, c, cmask, i, j, nmask = _tile(C, S1, S2, nblk, ncblk, BLOCK_C, BLOCK_P)
    x = tl.load(x_ptr + b * xs0 + c[:, None] * xs1 + (i * xs2 + j * xs3)[None, :],
                mask=cmask[:, None] & nmask[None, :], other=0.0)
    y = x.to(y_ptr.dtype.element_ty)
    for a in tl.static_range(3):
        for e in tl.static_range(3):
            r, q, ok = _halo_copy(i, j, nmask, a, e, S1, S2, HALO)
            tl.store(y_ptr + b * ys0 + c[:, None] * ys1 + (r * ys2 + q * ys3)[None, :], y,
                     mask=cmask[:, None] & ok[None, :])


@triton.jit
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


def _blocks(C: int, N: int) -> tuple[int, int]:
    """(channels, grid points) per program: tiles of about 4096 values on a GPU (at least 32 points),
    the whole field per batch item under the interpreter (its cost grows with the program count)."""
    if INTERPRET:
        bc = pow2(C)
        return bc, max(32, min(pow2(N), 65536 // bc))
    bc = min(pow2(C), 64)
    return bc, max(32, min(256, 4096 // bc))


def _tiles(B: int, C: int, N: int) -> tuple[tuple[int], int, int, int, int]:
    bc, bp = _blocks(C, N)
    nblk, ncblk = triton.cdiv(N, bp), triton.cdiv(C, bc)
    return (B * nblk * ncblk,), nblk, ncblk, bc, bp


def _pad_into(x: torch.Tensor, y: torch.Tensor, halo: int) -> None:
    """Write x (B, C, H, W) padded by halo into y (B, C, H + 2 halo, W + 2 halo), any strides."""
    B, C, H, W = x.shape
    grid, nblk, ncblk, bc, bp = _tiles(B, C, H * W)
    launch(_pad_fwd_kernel, grid, x, y, C, H, W, nblk, ncblk, *x.stride(), *y.stride(),
           BLOCK_C=bc, BLOCK_P=bp, HALO=halo, num_warps=4)


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
    for x in xs:
        _pad_into(x, y[:, off:off + x.shape[1]], halo)
        off += x.shape[1]
    return y


class _PeriodicPadCat(torch.autograd.Function):
    """The padded concatenation; backward folds each input's channels of the gradient back, forward
    mode pads the tangents (the map is linear)."""

    @staticmethod
    def forward(halo, out_dtype, *xs):
        return _pad_cat(list(xs), halo, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        halo, out_dtype, *xs = inputs
        ctx.halo, ctx.out_dtype, ctx.device = halo, out_dtype, xs[0].device
        # what the gradients must look like, not the inputs themselves (nothing is kept alive)
        ctx.metas = [(x.shape, x.dtype, channels_last_like(x)) for x in xs]

    @staticmethod
    def backward(ctx, gy):
        grads, off = [], 0
        for (shape, dtype, cl), need in zip(ctx.metas, ctx.needs_input_grad[2:]):
            grads.append(_fold(gy[:, off:off + shape[1]], shape, dtype, cl, ctx.halo) if need else None)
            off += shape[1]
        return (None, None, *grads)

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
    return _PeriodicPadCat.apply(int(halo), out_dtype, *xs)
