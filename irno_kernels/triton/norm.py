"""Triton kernels for the channel LayerNorm (``irno_kernels.channel_layer_norm``), forward and backward.

    y[b, :, s] = (x[b, :, s] - mean) / sqrt(var + eps) * weight + bias

with the biased mean and variance over the C channels of one grid point s. Each program normalises
a block of grid points of one batch item with all C channels in registers, reading x once and
writing y once, in NCHW or channels-last (any strides: x is addressed as (B, C, S1, S2) through its
strides, and y keeps x's memory format). PyTorch's own route, ``F.layer_norm`` over a permuted view,
launches one row per grid point of only C elements and copies a non-channels-last input first; on
an H100 it took half of a U-Net refiner's time at 256 x 256 (benchmarks/profile_irno.py).

Statistics and arithmetic are fp32 (fp64 for fp64 data); 16-bit x is read as it is (no cast pass).

Two fusions for the refiner's conv -> LayerNorm -> GELU -> (periodic pad) -> conv chain:
``gelu`` applies the exact (erf) GELU to y in the same pass, and ``halo = h`` writes y periodically
padded by h on both sides of both grid dims, (B, C, H + 2h, W + 2h): the input of the next 3 x 3
periodic convolution, with no pad copy. ``out_dtype`` sets y's dtype (bf16 for a conv under autocast,
which would cast it to bf16 anyway). The backward folds the halo's gradient back (each grid point
reads its up to 9 copies) and applies GELU's derivative, recomputed from x and the saved statistics.

Backward, with xhat = (x - mean) * rstd, g = grad_y (halo copies added, times GELU'(z) at
z = xhat * weight + bias when fused) and gh = g * weight:
    grad_x = rstd * (gh - mean_c(gh) - xhat * mean_c(gh * xhat))
    grad_weight = sum_{b,s} g * xhat,   grad_bias = sum_{b,s} g
the last two from per-program partial sums added up by torch in a fixed order (deterministic).
The forward saves the per-point mean and rstd (fp32, B x S) for the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from irno_kernels._checks import channels_last_like
from irno_kernels.backend import no_second_derivative
from irno_kernels.triton import _lib
from irno_kernels.triton._lib import INTERPRET, as_4d, backward_fn, cdiv, is_f64, launch, pow2, register

__all__ = ["channel_layer_norm"]


@triton.jit
def _halo_copy(i, j, nmask, a: tl.constexpr, e: tl.constexpr, S1, S2, HALO: tl.constexpr):
    """Copy (a, e) in {0, 1, 2}^2 of grid point (i, j) in the field padded periodically by HALO:
    position (i + HALO + (a - 1) * S1, j + HALO + (e - 1) * S2) and whether it lies inside the padded
    field (the interior copy a = e = 1 always does; the wrapped ones only near the edges)."""
    r = i + HALO + (a - 1) * S1
    q = j + HALO + (e - 1) * S2
    ok = nmask & (r >= 0) & (r < S1 + 2 * HALO) & (q >= 0) & (q < S2 + 2 * HALO)
    return r, q, ok


@triton.jit(do_not_specialize=["C", "S1", "nblk"])  # _lib.UNSPECIALISED
def _cln_fwd_kernel(
    x_ptr, s_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, eps: tl.float64,
    C, S1, S2, nblk,
    xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3,
    HAS_S: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_F64: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, GELU: tl.constexpr, HALO: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // nblk
    N = S1 * S2
    n = (pid % nblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    nmask = n < N
    i = n // S2
    j = n % S2
    c = tl.arange(0, C_PAD)
    cmask = c < C
    mask = cmask[:, None] & nmask[None, :]
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    x = tl.load(x_ptr + b * xs0 + c[:, None] * xs1 + (i * xs2 + j * xs3)[None, :], mask=mask, other=0.0)
    x = x.to(acc_ty)
    if HAS_S:  # the preceding conv's bias, folded in (0 on padded channels)
        x = x + tl.load(s_ptr + c, mask=cmask, other=0.0).to(acc_ty)[:, None]
    mean = tl.sum(x, axis=0) / C
    d = tl.where(mask, x - mean[None, :], 0.0)
    var = tl.sum(d * d, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    y = d * rstd[None, :]
    if HAS_W:
        y = y * tl.load(w_ptr + c, mask=cmask, other=0.0).to(acc_ty)[:, None]
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=cmask, other=0.0).to(acc_ty)[:, None]
    if GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    y = y.to(y_ptr.dtype.element_ty)
    if HALO == 0:
        tl.store(y_ptr + b * ys0 + c[:, None] * ys1 + (i * ys2 + j * ys3)[None, :], y, mask=mask)
    else:
        for a in tl.static_range(3):
            for e in tl.static_range(3):
                r, q, ok = _halo_copy(i, j, nmask, a, e, S1, S2, HALO)
                tl.store(y_ptr + b * ys0 + c[:, None] * ys1 + (r * ys2 + q * ys3)[None, :], y,
                         mask=cmask[:, None] & ok[None, :])
    tl.store(mean_ptr + b * N + n, mean.to(mean_ptr.dtype.element_ty), mask=nmask)
    tl.store(rstd_ptr + b * N + n, rstd.to(rstd_ptr.dtype.element_ty), mask=nmask)


@triton.jit(do_not_specialize=["C", "S1", "nchunk", "chunk"])  # _lib.UNSPECIALISED
def _cln_bwd_kernel(
    g_ptr, x_ptr, s_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, gx_ptr, pw_ptr, pb_ptr, ps_ptr,
    C, S1, S2, nchunk, chunk,
    gs0, gs1, gs2, gs3, xs0, xs1, xs2, xs3, os0, os1, os2, os3,
    HAS_S: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_F64: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, GELU: tl.constexpr, HALO: tl.constexpr,
):
    """grad_x for the points of one chunk of one batch item, and that chunk's partial sums of
    g * xhat and g per channel (rows of pw, pb), g the gradient at the normalised, affine output,
    and with HAS_S of grad_x (rows of ps: the gradient of the folded-in input bias)."""
    pid = tl.program_id(0)
    b = pid // nchunk
    start = (pid % nchunk) * chunk
    N = S1 * S2
    c = tl.arange(0, C_PAD)
    cmask = c < C
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(acc_ty)
    else:
        w = tl.where(cmask, 1.0, 0.0).to(acc_ty)
    if HAS_B:
        bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(acc_ty)
    if HAS_S:
        shift = tl.load(s_ptr + c, mask=cmask, other=0.0).to(acc_ty)
    acc_w = tl.zeros((C_PAD,), dtype=acc_ty)
    acc_b = tl.zeros((C_PAD,), dtype=acc_ty)
    acc_s = tl.zeros((C_PAD,), dtype=acc_ty)
    for n0 in range(start, tl.minimum(start + chunk, N), BLOCK_P):
        n = n0 + tl.arange(0, BLOCK_P)
        nmask = n < N
        i = n // S2
        j = n % S2
        mask = cmask[:, None] & nmask[None, :]
        sp = (i * xs2 + j * xs3)[None, :]
        x = tl.load(x_ptr + b * xs0 + c[:, None] * xs1 + sp, mask=mask, other=0.0).to(acc_ty)
        if HAS_S:
            x = x + shift[:, None]
        if HALO == 0:
            g = tl.load(g_ptr + b * gs0 + c[:, None] * gs1 + (i * gs2 + j * gs3)[None, :], mask=mask,
                        other=0.0).to(acc_ty)
        else:  # the adjoint of the periodic halo: add up the point's copies
            g = tl.zeros((C_PAD, BLOCK_P), dtype=acc_ty)
            for a in tl.static_range(3):
                for e in tl.static_range(3):
                    r, q, ok = _halo_copy(i, j, nmask, a, e, S1, S2, HALO)
                    g += tl.load(g_ptr + b * gs0 + c[:, None] * gs1 + (r * gs2 + q * gs3)[None, :],
                                 mask=cmask[:, None] & ok[None, :], other=0.0).to(acc_ty)
        mean = tl.load(mean_ptr + b * N + n, mask=nmask, other=0.0).to(acc_ty)
        rstd = tl.load(rstd_ptr + b * N + n, mask=nmask, other=0.0).to(acc_ty)
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        if GELU:  # GELU'(z) = Phi(z) + z phi(z) at the pre-activation z, recomputed
            z = xhat * w[:, None]
            if HAS_B:
                z = z + bias[:, None]
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
            g = g * (cdf + z * pdf)
        gh = g * w[:, None]
        c1 = tl.sum(gh * xhat, axis=0) / C
        c2 = tl.sum(gh, axis=0) / C
        gx = (gh - c2[None, :] - xhat * c1[None, :]) * rstd[None, :]
        tl.store(gx_ptr + b * os0 + c[:, None] * os1 + (i * os2 + j * os3)[None, :],
                 gx.to(gx_ptr.dtype.element_ty), mask=mask)
        acc_w += tl.sum(g * xhat, axis=1)
        acc_b += tl.sum(g, axis=1)
        if HAS_S:  # points off the grid add 0 (g and xhat are 0 there); padded channels are not stored
            acc_s += tl.sum(gx, axis=1)
    tl.store(pw_ptr + pid * C + c, acc_w, mask=cmask)
    tl.store(pb_ptr + pid * C + c, acc_b, mask=cmask)
    if HAS_S:
        tl.store(ps_ptr + pid * C + c, acc_s, mask=cmask)


#: channels the kernels take; wider fields run the reference. On an H200 (tree fb66a22) the weight and
#: bias gradients came out wrong for C = 200 (C_PAD = 256) while grad_x and the forward were right and
#: C <= 128 was right throughout; the interpreter with the GPU tiles gets C = 200 and 256 right
#: (tests/test_norm.py), so the fault lies in compiled code. Until it is understood on a GPU, C > 128
#: runs the reference whenever a gradient may follow, and ...
MAX_CHANNELS = 128
#: ... the forward kernel (one launch, where the reference's permuted layer_norm, GELU and circular
#: pad launch about eight kernels) up to this many channels when none can: inference through the
#: paper's U-Net, whose bottleneck has 256 channels.
MAX_CHANNELS_FORWARD = 256


def _block(n: int, c_pad: int, values: int = 4096, min_points: int = 32) -> int:
    """Grid points per tile: about ``values`` values (the whole field in the interpreter, whose cost
    grows with the number of programs), at least ``min_points`` points."""
    if INTERPRET:
        return max(min_points, min(pow2(n), 65536 // c_pad))
    return max(min_points, min(256, values // c_pad))


def _fwd_warps(c_pad: int) -> int:
    """The forward's warps: 8 from 256 padded channels (ptxas for sm_90, C_PAD = 256 and 32 points
    with GELU and a halo: 4 warps spill, 8 do not; 4 warps suffice below)."""
    return 8 if c_pad >= 256 else 4


def _bwd_min_points(c_pad: int) -> int:
    """The backward's least points per tile: 8 from 256 padded channels, so that a tile stays at
    BWD_VALUES values (ptxas for sm_90 at C_PAD = 256 on 8 warps: 8 points do not spill, 16 spill
    0.4 KB, 32 spill 7 KB per thread, with 32 registers in use); 32 below (coalesced NCHW rows)."""
    return 8 if c_pad >= 256 else 32


#: the backward's tiles and warps: 2048 values on 8 warps (ptxas for sm_90: no spills at C = 16, 0.4 KB
#: per thread at C = 128 with a halo; 4096 values on 4 warps spilled 1-2.5 KB)
BWD_VALUES, BWD_WARPS = 2048, 8


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if is_f64(x) else torch.float32


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
def _out_like(x: torch.Tensor, halo: int, out_dtype: torch.dtype | None) -> torch.Tensor:
    """y: x's shape (grid dims + 2 * halo), dtype ``out_dtype`` (default x's), x's memory format."""
    dtype = out_dtype if out_dtype is not None else x.dtype
    if halo == 0:
        return torch.empty_like(x, dtype=dtype)  # keeps x's memory format (channels-last stays so)
    B, C, H, W = x.shape
    fmt = torch.channels_last if channels_last_like(x) else torch.contiguous_format
    return torch.empty((B, C, H + 2 * halo, W + 2 * halo), dtype=dtype, device=x.device, memory_format=fmt)


def _fwd_fake(x, weight, bias, eps, gelu=False, halo=0, out_dtype=None, in_bias=None):
    B, N = x.shape[0], x[0, 0].numel()
    st = _stats_dtype(x)
    return _out_like(x, halo, out_dtype), x.new_empty((B, N), dtype=st), x.new_empty((B, N), dtype=st)


def _cln_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
             gelu: bool = False, halo: int = 0, out_dtype: torch.dtype | None = None,
             in_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = _out_like(x, halo, out_dtype)
    x4, y4 = as_4d(x), as_4d(y)
    B, C, S1, S2 = x4.shape
    N = S1 * S2
    st = _stats_dtype(x)
    mean = torch.empty((B, N), dtype=st, device=x.device)
    rstd = torch.empty((B, N), dtype=st, device=x.device)
    c_pad = pow2(C)
    block = _block(N, c_pad)
    nblk = cdiv(N, block)
    launch(_cln_fwd_kernel, (B * nblk,), x4, _or(in_bias, x4), _or(weight, x4), _or(bias, x4), y4, mean, rstd,
           float(eps), C, S1, S2, nblk, *x4.stride(), *y4.stride(), HAS_S=in_bias is not None,
           HAS_W=weight is not None, HAS_B=bias is not None, IS_F64=is_f64(x),
           C_PAD=c_pad, BLOCK_P=block, GELU=bool(gelu), HALO=int(halo), num_warps=_fwd_warps(c_pad))
    return y, mean, rstd


def _or(t: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """t, or a stand-in pointer for an absent optional tensor (the kernel never reads it)."""
    return t if t is not None else other


_cln_fwd_op = register("channel_layer_norm_fwd", _fwd_fake)(_cln_fwd)


def _grad_dtypes(x, weight, bias, in_bias) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    return tuple(t.dtype if t is not None else x.dtype for t in (weight, bias, in_bias))


def _bwd_fake(grad, x, weight, bias, mean, rstd, gelu=False, halo=0, in_bias=None):
    C = x.shape[1]
    pdt, bdt, sdt = _grad_dtypes(x, weight, bias, in_bias)
    return (torch.empty_like(x), x.new_empty((C,), dtype=pdt), x.new_empty((C,), dtype=bdt),
            x.new_empty((C,) if in_bias is not None else (0,), dtype=sdt))


def _cln_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             mean: torch.Tensor, rstd: torch.Tensor, gelu: bool = False, halo: int = 0,
             in_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_in_bias); the last is empty (0,) without an in_bias."""
    gx = torch.empty_like(x)
    g4, x4, o4 = as_4d(grad), as_4d(x), as_4d(gx)
    B, C, S1, S2 = x4.shape
    N = S1 * S2
    c_pad = pow2(C)
    block = _block(N, c_pad, BWD_VALUES, _bwd_min_points(c_pad))
    # about 8 forward tiles per program on a GPU: enough programs to fill it, few partial rows to add up
    chunk = N if INTERPRET else _block(N, c_pad) * 8
    nchunk = cdiv(N, chunk)
    acc = _stats_dtype(x)
    pw = torch.empty((B * nchunk, C), dtype=acc, device=x.device)
    pb = torch.empty((B * nchunk, C), dtype=acc, device=x.device)
    ps = torch.empty((B * nchunk, C), dtype=acc, device=x.device) if in_bias is not None else None
    launch(_cln_bwd_kernel, (B * nchunk,), g4, x4, _or(in_bias, x4), _or(weight, x4), _or(bias, x4), mean, rstd,
           o4, pw, pb, _or(ps, pw),
           C, S1, S2, nchunk, chunk, *g4.stride(), *x4.stride(), *o4.stride(), HAS_S=in_bias is not None,
           HAS_W=weight is not None, HAS_B=bias is not None, IS_F64=is_f64(x), C_PAD=c_pad, BLOCK_P=block,
           GELU=bool(gelu), HALO=int(halo), num_warps=BWD_WARPS)
    pdt, bdt, sdt = _grad_dtypes(x, weight, bias, in_bias)
    gs = ps.sum(0).to(sdt) if ps is not None else x.new_empty((0,), dtype=sdt)
    return gx, pw.sum(0).to(pdt), pb.sum(0).to(bdt), gs


_cln_bwd_op = register("channel_layer_norm_bwd", _bwd_fake)(_cln_bwd)
no_second_derivative(_cln_bwd_op, "channel_layer_norm", "Triton")  # a second backward raises


def _grads(ctx, gx, gw, gb, gs):
    need = ctx.needs_input_grad
    return ((gx if need[0] else None), (gw if ctx.has_w and need[1] else None),
            (gb if ctx.has_b and need[2] else None), None, None, None, None, (gs if ctx.has_s and need[7] else None))


def _save(ctx, x, weight, bias, in_bias, mean, rstd, gelu, halo):
    ctx.has_w, ctx.has_b, ctx.has_s = weight is not None, bias is not None, in_bias is not None
    ctx.gelu, ctx.halo = gelu, halo
    ctx.save_for_backward(x, weight, bias, in_bias, mean, rstd)


def _setup(ctx, inputs, output):
    x, weight, bias, eps, gelu, halo, _, in_bias = inputs
    _, mean, rstd = output
    _save(ctx, x, weight, bias, in_bias, mean, rstd, gelu, halo)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad, _gmean=None, _grstd=None):
    x, weight, bias, in_bias, mean, rstd = ctx.saved_tensors
    bwd = backward_fn(ctx, _cln_bwd, _cln_bwd_op)  # the op when recorded (create_graph=True) or traced
    grads = bwd(grad.contiguous() if grad.dim() > 4 else grad, x, weight, bias, mean, rstd, ctx.gelu, ctx.halo,
                in_bias)
    return _grads(ctx, *grads)


_cln_fwd_op.register_autograd(_backward, setup_context=_setup)


class _EagerChannelLayerNorm(torch.autograd.Function):
    """The same kernels and formulas as the registered ops, without their Python dispatch (eager
    mode: the U-Net calls this about 100 times per step). Its backward is the registered op's
    (``_backward``): the plain kernels, or the backward op when a second backward could follow."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, gelu, halo, out_dtype, in_bias=None):
        y, mean, rstd = _cln_fwd(x, weight, bias, eps, gelu, halo, out_dtype, in_bias)
        _save(ctx, x, weight, bias, in_bias, mean, rstd, gelu, halo)
        ctx.eager = True  # _lib.backward_fn
        return y

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float, gelu: bool = False, halo: int = 0,
                       out_dtype: torch.dtype | None = None, in_bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over dim 1 of x + in_bias (B, C, *S) at every grid point; weight, bias, in_bias: (C,)
    or None; then GELU when ``gelu``; written periodically padded by ``halo`` (4-D x) in ``out_dtype``
    (default x's dtype). Returns (B, C, *S) (grid dims + 2 * halo) in x's memory format. Arguments
    arrive validated. More than MAX_CHANNELS channels run the reference, unless no gradient can follow
    (no input requires one, no forward-mode AD, not tracing) and C <= MAX_CHANNELS_FORWARD.

    Outside torch.compile the kernels run without the registered ops (directly without gradients,
    through an autograd.Function with them): the refiner calls this ~100 times per inference, and
    in eager mode the ops' Python dispatch would cost more than the kernels on a small field.
    torch.compile traces the registered ops.
    """
    gelu, halo, eps = bool(gelu), int(halo), float(eps)
    C = x.shape[1]
    params = (x, weight, bias, in_bias)
    if C > MAX_CHANNELS and (C > MAX_CHANNELS_FORWARD or torch.compiler.is_compiling()
                             or _lib.needs_autograd(params)):
        from irno_kernels.norm import channel_layer_norm_ref

        # the kernel's dtype rules, by the reference: computed in float32 at least (the caller may
        # have turned autocast off around a 16-bit x and float32 weights, which CUDA's layer_norm
        # refuses to mix), returned in out_dtype or x's dtype
        wide = torch.promote_types(x.dtype, torch.float32)
        x, weight, bias, in_bias = (t if t is None else t.to(wide) for t in params)
        y = channel_layer_norm_ref(x, weight, bias, eps, "gelu" if gelu else None, halo, in_bias=in_bias)
        return y.to(out_dtype if out_dtype is not None else params[0].dtype)
    if torch.compiler.is_compiling():
        return _cln_fwd_op(x, weight, bias, eps, gelu, halo, out_dtype, in_bias)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
        return _EagerChannelLayerNorm.apply(x, weight, bias, eps, gelu, halo, out_dtype, in_bias)
    return _cln_fwd(x, weight, bias, eps, gelu, halo, out_dtype, in_bias)[0]
