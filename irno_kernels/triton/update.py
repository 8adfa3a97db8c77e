"""Triton kernels for the refinement update (DESIGN section 3.2), forward and backward.

    residual_update(h, phi, alpha)            h + alpha * phi
    refine_update(h, z, weight, bias, alpha)  h + alpha * (weight @ z + bias), the 1x1 projection of
                                              Phi's last features fused with the update: Phi's
                                              output is never written to memory
    refine_update_(...), residual_update_(...) the same, written into h (inference, no autograd)

Tensors are (B, C, *S) with any strides: the kernels read them as (B, C, S1, S2) through strides
(see ``_lib.as_4d``) and write a contiguous result. Accumulation is fp32 (fp64 for fp64 data).

Backward: grad_h = g; grad_phi = alpha * g; grad_z = alpha * weight^T @ g (the forward kernel with
the weight's strides swapped); grad_weight = alpha * sum_{b,s} g z^T and grad_bias = alpha *
sum_{b,s} g from per-program partial sums, added up by torch in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from irno_kernels.triton._lib import (
    INTERPRET,
    as_4d,
    backward_fn,
    cdiv,
    is_f64,
    launch,
    mutate,
    pow2,
    register,
    with_autograd,
)

__all__ = ["residual_update", "residual_update_", "refine_update", "refine_update_"]


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["C", "S1", "nblk"])  # _lib.UNSPECIALISED
def _residual_update_kernel(
    h_ptr, phi_ptr, out_ptr, alpha: tl.float64,
    C, S1, S2, nblk,
    hs0, hs1, hs2, hs3, ps0, ps1, ps2, ps3, os0, os1, os2, os3,
    HAS_H: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = h + alpha * phi (or alpha * phi without h) on one block of one (b, c) plane."""
    pid = tl.program_id(0)
    plane = pid // nblk
    b = plane // C
    c = plane % C
    n = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
    mask = n < S1 * S2
    i = n // S2
    j = n % S2
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    phi = tl.load(phi_ptr + b * ps0 + c * ps1 + i * ps2 + j * ps3, mask=mask, other=0.0).to(acc_ty)
    val = (phi * alpha).to(acc_ty)
    if HAS_H:
        val += tl.load(h_ptr + b * hs0 + c * hs1 + i * hs2 + j * hs3, mask=mask, other=0.0).to(acc_ty)
    tl.store(out_ptr + b * os0 + c * os1 + i * os2 + j * os3, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["CO", "F", "S1", "nblk"])  # _lib.UNSPECIALISED
def _refine_update_kernel(
    h_ptr, z_ptr, w_ptr, bias_ptr, out_ptr, alpha: tl.float64,
    CO, F, S1, S2, nblk,
    hs0, hs1, hs2, hs3, zs0, zs1, zs2, zs3, ws0, ws1, os0, os1, os2, os3,
    HAS_H: tl.constexpr, HAS_BIAS: tl.constexpr, IS_F64: tl.constexpr,
    CO_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[b, :, n] = h[b, :, n] + alpha * (w @ z[b, :, n] + bias) for one block of positions n.

    All CO outputs of a position come from one program, so z is read exactly once; the loop over
    the F input channels reads one contiguous row of z per step.
    """
    pid = tl.program_id(0)
    b = pid // nblk
    n = (pid % nblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < S1 * S2
    i = n // S2
    j = n % S2
    o = tl.arange(0, CO_PAD)
    omask = o < CO
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    acc = tl.zeros((CO_PAD, BLOCK_N), dtype=acc_ty)
    z_row = z_ptr + b * zs0 + i * zs2 + j * zs3
    for f in range(F):
        zf = tl.load(z_row + f * zs1, mask=nmask, other=0.0).to(acc_ty)
        wf = tl.load(w_ptr + o * ws0 + f * ws1, mask=omask, other=0.0).to(acc_ty)
        acc += wf[:, None] * zf[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=omask, other=0.0).to(acc_ty)[:, None]
    acc = (acc * alpha).to(acc_ty)
    mask = omask[:, None] & nmask[None, :]
    if HAS_H:
        hp = h_ptr + b * hs0 + o[:, None] * hs1 + (i * hs2 + j * hs3)[None, :]
        acc += tl.load(hp, mask=mask, other=0.0).to(acc_ty)
    op = out_ptr + b * os0 + o[:, None] * os1 + (i * os2 + j * os3)[None, :]
    tl.store(op, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["CO", "F", "S1", "nchunk", "chunk"])  # _lib.UNSPECIALISED
def _refine_update_wb_kernel(
    g_ptr, z_ptr, pw_ptr, pb_ptr,
    CO, F, S1, S2, nchunk, chunk,
    gs0, gs1, gs2, gs3, zs0, zs1, zs2, zs3,
    IS_F64: tl.constexpr, CO_PAD: tl.constexpr, F_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial sums over one chunk of positions of one batch item:
    pw[p] = sum_n g[b, :, n] z[b, :, n]^T  (CO, F) and pb[p] = sum_n g[b, :, n]  (CO,)."""
    pid = tl.program_id(0)
    b = pid // nchunk
    start = (pid % nchunk) * chunk
    N = S1 * S2
    o = tl.arange(0, CO_PAD)
    omask = o < CO
    fcol = tl.arange(0, F_PAD)
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    acc_w = tl.zeros((CO_PAD, F_PAD), dtype=acc_ty)
    acc_b = tl.zeros((CO_PAD,), dtype=acc_ty)
    for n0 in range(start, tl.minimum(start + chunk, N), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < N
        i = n // S2
        j = n % S2
        gp = g_ptr + b * gs0 + o[:, None] * gs1 + (i * gs2 + j * gs3)[None, :]
        g = tl.load(gp, mask=omask[:, None] & nmask[None, :], other=0.0).to(acc_ty)
        acc_b += tl.sum(g, axis=1)
        z_row = z_ptr + b * zs0 + i * zs2 + j * zs3
        for f in range(F):
            zf = tl.load(z_row + f * zs1, mask=nmask, other=0.0).to(acc_ty)
            part = tl.sum(g * zf[None, :], axis=1)
            # column f of the accumulator; a select keeps the (CO_PAD, F_PAD) tile in registers
            acc_w += tl.where(fcol[None, :] == f, part[:, None], 0.0)
    wmask = omask[:, None] & (fcol < F)[None, :]
    tl.store(pw_ptr + pid * CO * F + o[:, None] * F + fcol[None, :], acc_w, mask=wmask)
    tl.store(pb_ptr + pid * CO + o, acc_b, mask=omask)


# ---------------------------------------------------------------------------------------------
# launch configurations (fixed per shape class)
# ---------------------------------------------------------------------------------------------
def _elementwise_block(n: int) -> int:
    return min(pow2(n), 1 << 16) if INTERPRET else 1024


def _projection_block(n: int, co_pad: int) -> int:
    """Positions per program of the projection: a (CO_PAD, BLOCK_N) fp32 tile of ~2K values."""
    if INTERPRET:
        return min(pow2(n), max(64, (1 << 16) // co_pad))
    return max(32, min(1024, 2048 // co_pad))


def _reduction_config(n: int, co_pad: int) -> tuple[int, int]:
    """(BLOCK_N, positions per program) of the weight/bias reduction."""
    if INTERPRET:
        block = min(pow2(n), max(64, (1 << 15) // co_pad))
        return block, n
    block = max(16, min(256, 2048 // co_pad))
    return block, 8192


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


# ---------------------------------------------------------------------------------------------
# drivers
# ---------------------------------------------------------------------------------------------
def _residual_into(out: torch.Tensor, h: torch.Tensor | None, phi: torch.Tensor, alpha: float) -> None:
    """out = h + alpha * phi (h may be None); all three are (B, C, S1, S2) views."""
    B, C, S1, S2 = phi.shape
    block = _elementwise_block(S1 * S2)
    nblk = cdiv(S1 * S2, block)
    hh = h if h is not None else phi
    launch(_residual_update_kernel, (B * C * nblk,), hh, phi, out, float(alpha), C, S1, S2, nblk,
           *_strides4(hh), *_strides4(phi), *_strides4(out),
           HAS_H=h is not None, IS_F64=is_f64(phi), BLOCK=block, num_warps=4)


def _project_into(out: torch.Tensor, h: torch.Tensor | None, z: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, alpha: float) -> None:
    """out = h + alpha * (weight @ z + bias) per position; out, h: (B, CO, S1, S2), z: (B, F, S1, S2),
    weight: (CO, F) with any strides (a transposed view gives weight^T @ z)."""
    B, F, S1, S2 = z.shape
    CO = weight.shape[0]
    co_pad = pow2(CO)
    block = _projection_block(S1 * S2, co_pad)
    nblk = cdiv(S1 * S2, block)
    hh = h if h is not None else out
    launch(_refine_update_kernel, (B * nblk,), hh, z, weight, bias if bias is not None else weight, out,
           float(alpha), CO, F, S1, S2, nblk,
           *_strides4(hh), *_strides4(z), weight.stride(0), weight.stride(1), *_strides4(out),
           HAS_H=h is not None, HAS_BIAS=bias is not None, IS_F64=is_f64(z),
           CO_PAD=co_pad, BLOCK_N=block, num_warps=4)


def _new_like(t: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    shape = list(t.shape)
    if channels is not None:
        shape[1] = channels
    return torch.empty(shape, dtype=t.dtype, device=t.device)


# ---------------------------------------------------------------------------------------------
# ops: residual_update (the plain functions are the registered ops' bodies; in eager mode the public
# functions call them without the ops: _lib.with_autograd, _lib.mutate)
# ---------------------------------------------------------------------------------------------
def _residual_fake(h, phi, alpha):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _residual_update(h: torch.Tensor, phi: torch.Tensor, alpha: float) -> torch.Tensor:
    out = _new_like(h)
    _residual_into(as_4d(out), as_4d(h), as_4d(phi), alpha)
    return out


def _residual_grad_fake(grad, alpha):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _residual_grad_phi(grad: torch.Tensor, alpha: float) -> torch.Tensor:
    out = _new_like(grad)
    _residual_into(as_4d(out), None, as_4d(grad), alpha)
    return out


_residual_update_op = register("residual_update", _residual_fake)(_residual_update)
_residual_grad_phi_op = register("residual_update_grad_phi", _residual_grad_fake)(_residual_grad_phi)


# The backward op is linear (alpha * grad): its own backward is itself, so derivatives of every order
# are exact (create_graph=True records it through its registered autograd, _lib.backward_fn).
def _residual_grad_setup(ctx, inputs, output):
    ctx.alpha = inputs[1]


def _residual_grad_backward(ctx, gg):
    return _residual_grad_phi_op(gg, ctx.alpha), None


_residual_grad_phi_op.register_autograd(_residual_grad_backward, setup_context=_residual_grad_setup)


def _residual_setup(ctx, inputs, output):
    ctx.alpha = inputs[2]


def _residual_backward(ctx, grad):
    need = ctx.needs_input_grad
    gphi = backward_fn(ctx, _residual_grad_phi, _residual_grad_phi_op)(grad, ctx.alpha) if need[1] else None
    return (grad if need[0] else None), gphi, None


_residual_update_call = with_autograd(_residual_update_op, _residual_update, _residual_setup, _residual_backward)


def _residual_inplace_fake(h, phi, alpha):
    return None


def _residual_update_inplace(h: torch.Tensor, phi: torch.Tensor, alpha: float) -> None:
    if h.dim() <= 4:  # as_4d gives a view of h; each element reads h before writing it
        h4 = as_4d(h)
        _residual_into(h4, h4, as_4d(phi), alpha)
    else:  # h could not be viewed as 4-D: compute aside and copy back
        h.copy_(_residual_update(h, phi, alpha))


_residual_update_inplace_op = register("residual_update_", _residual_inplace_fake,
                                       mutates_args=("h",))(_residual_update_inplace)


# ---------------------------------------------------------------------------------------------
# ops: refine_update
# ---------------------------------------------------------------------------------------------
def _refine_fake(h, z, weight, bias, alpha):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _refine_update(h: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   alpha: float) -> torch.Tensor:
    out = _new_like(h)
    _project_into(as_4d(out), as_4d(h), as_4d(z), weight, bias, alpha)
    return out


def _grad_z_fake(grad, weight, alpha):
    return grad.new_empty((grad.shape[0], weight.shape[1], *grad.shape[2:]))


def _refine_grad_z(grad: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    gz = _new_like(grad, weight.shape[1])
    _project_into(as_4d(gz), None, as_4d(grad), weight.t(), None, alpha)
    return gz


def _grad_wb_fake(grad, z, alpha):
    CO, F = grad.shape[1], z.shape[1]
    return grad.new_empty((CO, F)), grad.new_empty((CO,))


def _refine_grad_wb(grad: torch.Tensor, z: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    g4, z4 = as_4d(grad), as_4d(z)
    B, CO, S1, S2 = g4.shape
    F = z4.shape[1]
    N = S1 * S2
    co_pad, f_pad = pow2(CO), pow2(F)
    block, chunk = _reduction_config(N, co_pad)
    chunk = cdiv(min(chunk, N), block) * block
    nchunk = cdiv(N, chunk)
    acc_dtype = torch.float64 if is_f64(grad) else torch.float32
    pw = torch.empty((B * nchunk, CO, F), dtype=acc_dtype, device=grad.device)
    pb = torch.empty((B * nchunk, CO), dtype=acc_dtype, device=grad.device)
    launch(_refine_update_wb_kernel, (B * nchunk,), g4, z4, pw, pb, CO, F, S1, S2, nchunk, chunk,
           *_strides4(g4), *_strides4(z4),
           IS_F64=is_f64(grad), CO_PAD=co_pad, F_PAD=f_pad, BLOCK_N=block, num_warps=4)
    gw = pw.sum(0).mul_(alpha).to(grad.dtype)
    gb = pb.sum(0).mul_(alpha).to(grad.dtype)
    return gw, gb


_refine_update_op = register("refine_update", _refine_fake)(_refine_update)
_refine_grad_z_op = register("refine_update_grad_z", _grad_z_fake)(_refine_grad_z)
_refine_grad_wb_op = register("refine_update_grad_weight_bias", _grad_wb_fake)(_refine_grad_wb)


# The backward ops are bilinear, and their derivatives are the same two ops again, so derivatives of
# every order are exact:
#   gz = alpha W^T g               d/dg: alpha W gg        = grad_z(gg, W^T)   d/dW: alpha g gg^T = grad_wb(g, gg)
#   gW = alpha sum g z^T, gb = alpha sum g
#                                  d/dg: alpha (ggW z + ggb) = grad_z(z, ggW^T) + alpha ggb
#                                  d/dz: alpha ggW^T g       = grad_z(g, ggW)
def _grad_z_setup(ctx, inputs, output):
    grad, weight, alpha = inputs
    ctx.alpha = alpha
    ctx.save_for_backward(grad, weight)


def _grad_z_backward(ctx, gg):
    grad, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_grad = _refine_grad_z_op(gg, weight.t(), ctx.alpha) if need[0] else None
    d_weight = _refine_grad_wb_op(grad, gg, ctx.alpha)[0] if need[1] else None
    return d_grad, d_weight, None


def _grad_wb_setup(ctx, inputs, output):
    grad, z, alpha = inputs
    ctx.alpha = alpha
    ctx.save_for_backward(grad, z)


def _grad_wb_backward(ctx, ggw, ggb):
    grad, z = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_grad = d_z = None
    if need[0]:
        d_grad = _refine_grad_z_op(z, ggw.t(), ctx.alpha)
        d_grad = d_grad + ctx.alpha * ggb.view(1, -1, *([1] * (grad.dim() - 2)))
    if need[1]:
        d_z = _refine_grad_z_op(grad, ggw, ctx.alpha)
    return d_grad, d_z, None


_refine_grad_z_op.register_autograd(_grad_z_backward, setup_context=_grad_z_setup)
_refine_grad_wb_op.register_autograd(_grad_wb_backward, setup_context=_grad_wb_setup)


def _refine_setup(ctx, inputs, output):
    h, z, weight, bias, alpha = inputs
    ctx.alpha = alpha
    ctx.has_bias = bias is not None
    ctx.save_for_backward(z, weight)


def _refine_backward(ctx, grad):
    z, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_b = ctx.has_bias and need[3]
    gz = gw = gb = None
    if need[1]:
        gz = backward_fn(ctx, _refine_grad_z, _refine_grad_z_op)(grad, weight, ctx.alpha)
    if need[2] or need_b:
        gw, gb = backward_fn(ctx, _refine_grad_wb, _refine_grad_wb_op)(grad, z, ctx.alpha)
    return (grad if need[0] else None), gz, (gw if need[2] else None), (gb if need_b else None), None


_refine_update_call = with_autograd(_refine_update_op, _refine_update, _refine_setup, _refine_backward)


def _refine_inplace_fake(h, z, weight, bias, alpha):
    return None


def _refine_update_inplace(h: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           alpha: float) -> None:
    if h.dim() <= 4:  # as_4d gives a view of h; each position reads h before writing it
        h4 = as_4d(h)
        _project_into(h4, h4, as_4d(z), weight, bias, alpha)
    else:
        h.copy_(_refine_update(h, z, weight, bias, alpha))


_refine_update_inplace_op = register("refine_update_", _refine_inplace_fake,
                                     mutates_args=("h",))(_refine_update_inplace)


# ---------------------------------------------------------------------------------------------
# public functions (arguments already validated by irno_kernels' wrappers). Under tracing they call
# the registered ops; in eager mode the plain functions above, without the ops' dispatch (~80-100 us
# per call on an H200, several times the kernels of a small field; _lib.with_autograd, _lib.mutate)
# ---------------------------------------------------------------------------------------------
def residual_update(h: torch.Tensor, phi: torch.Tensor, alpha: float) -> torch.Tensor:
    """h + alpha * phi, differentiable.  h, phi: (B, C, *S) -> (B, C, *S) contiguous."""
    return _residual_update_call(h, phi, float(alpha))


def residual_update_(h: torch.Tensor, phi: torch.Tensor, alpha: float) -> torch.Tensor:
    """h += alpha * phi in place (inference: nothing is recorded for autograd); returns h."""
    mutate(_residual_update_inplace_op, _residual_update_inplace, h, phi, float(alpha))
    return h


def refine_update(h: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  alpha: float) -> torch.Tensor:
    """h + alpha * (weight @ z + bias) per position, differentiable in h, z, weight and bias.

    h: (B, Co, *S); z: (B, F, *S); weight: (Co, F); bias: (Co,) or None -> (B, Co, *S) contiguous.
    """
    return _refine_update_call(h, z, weight, bias, float(alpha))


def refine_update_(h: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   alpha: float) -> torch.Tensor:
    """``refine_update`` written into h (inference: nothing is recorded for autograd); returns h."""
    mutate(_refine_update_inplace_op, _refine_update_inplace, h, z, weight, bias, float(alpha))
    return h
