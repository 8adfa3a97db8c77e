"""Triton spectral mixing for spectral_conv2d (DESIGN section 3.1), forward and backward.

    y = irfft2(Mix(rfft2(x, norm="forward")), s=(H, W), norm="forward")
    Mix: S[b, o, kx, ky] = sum_i X[b, i, kx, ky] * Wt[i, o, kx, ky] on the kept modes, 0 elsewhere

The mixing kernel reads the kept modes straight from the rfft2 output (a real view of it: triton
takes no complex pointers) and writes straight into the output spectrum; there is no gathered or
zero-padded copy. One program owns a block of consecutive ky modes of one kept row, a block of the
batch and a block of output channels, and accumulates the complex products over the input channels
as fp32 (fp64 for fp64 data) outer products, loading several channels before multiplying any (the
loop is bound by load latency). The same launch writes the zeros of the spectrum (FUSED_ZERO):
further programs each store zeros over a flat chunk of it, skipping the kept modes, so the spectrum
is allocated with torch.empty and no fill kernel runs.

Backward, with Gy = rfft2(grad_y, norm="backward") (the adjoint of the "forward"-normalised
irfft2 is this transform with the non-edge columns doubled, and the adjoint of rfft2 is irfft2
with them halved; for grad_x the two factors cancel):

    grad_x      = irfft2(Mix^H(Gy), s=(H, W), norm="backward"),  Mix^H: sum_o Gy * conj(Wt[i, o])
    grad_weight = c(ky) * sum_b conj(X[b, i]) * Gy[b, o]          c = 2 on non-edge columns, else 1

(PyTorch's convention for complex gradients, grad = dL/dRe + i dL/dIm.) The weight gradient sums
over the batch inside one program: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from irno_kernels._checks import LOW_PRECISION
from irno_kernels.backend import no_second_derivative
from irno_kernels.spectral_conv import FFT_NORM, hermitian_edges
from irno_kernels.triton._lib import INTERPRET, backward_fn, cdiv, launch, pow2, register, with_autograd

__all__ = ["spectral_conv2d"]

if FFT_NORM != "forward":  # the backward's transforms below are the adjoints for this normalisation only
    raise ImportError(f"irno_kernels.triton.spectral_conv is written for FFT_NORM='forward', got {FFT_NORM!r}")


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _block_of(pid, n_mb, n_rb, n_cb, H, M1):
    """(mb, rb, cb, r, kx): program pid's block of ky modes, of rows and of columns of the per-mode
    outer product (row-major over (kept row r, mb, rb, cb)), and its spectrum row kx of kept row r."""
    cb = pid % n_cb
    rest = pid // n_cb
    rb = rest % n_rb
    rest = rest // n_rb
    mb = rest % n_mb
    r = rest // n_mb
    return mb, rb, cb, r, tl.where(r < M1, r, H - 2 * M1 + r)


@triton.jit(do_not_specialize=["n_mix", "n_out"])
def _spectral_mix_kernel(
    a_ptr, w_ptr, out_ptr,
    B, CI, CO, H, Wr, M1, M2,
    ws_i, ws_o, ws_r, ws_c,
    n_mb, n_bb, n_ob, n_mix, n_out,
    CONJ_W: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, UNROLL: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    """Programs pid < n_mix: out[b, o, kx, ky] = sum_i a[b, i, kx, ky] * w[i, o, r, ky] (conj(w)
    with CONJ_W) for one block of (ky, b, o) of the kept modes; r is the weight row of spectrum row
    kx. Programs pid >= n_mix: zeros over the BLOCK_Z floats from (pid - n_mix) * BLOCK_Z of the
    n_out floats of out, skipping the kept modes (which the first kind writes).

    a: (B, CI, H, Wr, 2) and out: (B, CO, H, Wr, 2) contiguous real views of spectra; w: a real
    view with strides (ws_i, ws_o, ws_r, ws_c) for (in, out, row, col), imaginary part at +1.
    """
    pid = tl.program_id(0)
    plane = H * Wr * 2  # floats per (b, channel) spectrum
    row_len = Wr * 2
    if pid < n_mix:
        mb, bb, ob, r, kx = _block_of(pid, n_mb, n_bb, n_ob, H, M1)
        ky = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        b = bb * BLOCK_B + tl.arange(0, BLOCK_B)
        o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
        acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
        # (b, ky, o) tiles: b outermost, so that a thread's accumulators share their weight loads
        acc_re = tl.zeros((BLOCK_B, BLOCK_M, BLOCK_O), dtype=acc_ty)
        acc_im = tl.zeros((BLOCK_B, BLOCK_M, BLOCK_O), dtype=acc_ty)
        b64 = b.to(tl.int64)  # offsets of whole channels and batches can pass 2^31 floats
        plane64 = tl.cast(plane, tl.int64)
        # (b, ky) offsets of a and (ky, o) offsets of w from the channel's base pointers
        a_off = b64[:, None] * CI * plane + kx * row_len + ky[None, :] * 2
        w_off = o[None, :] * ws_o + r * ws_r + ky[:, None] * ws_c
        am = (b < B)[:, None] & (ky < M2)[None, :]
        wm = (ky < M2)[:, None] & (o < CO)[None, :]
        a_i = a_ptr  # input channel i of a and of w
        w_i = w_ptr
        for _ in range(0, CI, UNROLL):  # UNROLL divides CI
            # the loads of UNROLL channels, then their products: UNROLL loads in flight, not one
            ars = ()
            ais = ()
            wrs = ()
            wis = ()
            for u in tl.static_range(UNROLL):
                pa = a_i + u * plane64 + a_off
                pw = w_i + u * ws_i + w_off
                ars = ars + (tl.load(pa, mask=am, other=0.0),)
                ais = ais + (tl.load(pa + 1, mask=am, other=0.0),)
                wrs = wrs + (tl.load(pw, mask=wm, other=0.0),)
                wis = wis + (tl.load(pw + 1, mask=wm, other=0.0),)
            for u in tl.static_range(UNROLL):
                ar3 = ars[u].to(acc_ty)[:, :, None]
                ai3 = ais[u].to(acc_ty)[:, :, None]
                wr3 = wrs[u].to(acc_ty)[None, :, :]
                wi3 = wis[u].to(acc_ty)[None, :, :]
                if CONJ_W:
                    wi3 = -wi3
                acc_re += ar3 * wr3 - ai3 * wi3
                acc_im += ar3 * wi3 + ai3 * wr3
            a_i += UNROLL * plane64
            w_i += UNROLL * ws_i
        out_off = ((b64[:, None, None] * CO + o[None, None, :]) * plane + kx * row_len
                   + ky[None, :, None] * 2)
        mask = am[:, :, None] & (o < CO)[None, None, :]
        tl.store(out_ptr + out_off, acc_re.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + out_off + 1, acc_im.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        start = (pid - n_mix).to(tl.int64) * BLOCK_Z
        p0 = (start % plane).to(tl.int32)  # where the chunk starts in its (b, o) plane
        offs = tl.arange(0, BLOCK_Z)
        zero = tl.zeros((BLOCK_Z,), dtype=out_ptr.dtype.element_ty)
        if (p0 >= M1 * row_len) & (p0 + BLOCK_Z <= (H - M1) * row_len):
            # within the rows of one plane that hold no kept mode: an unmasked, vectorised store
            tl.store(out_ptr + start + offs, zero)
        else:
            # element j lies q rows after the chunk's first one (in row r0), in column col; rows
            # past H belong to the following planes
            r0 = p0 // row_len
            c = p0 - r0 * row_len + offs
            q = c // row_len
            col = c - q * row_len
            row = (r0 + q) % H
            kept = (col < 2 * M2) & ((row < M1) | (row >= H - M1))
            tl.store(out_ptr + start + offs, zero, mask=(offs < n_out - start) & ~kept)


@triton.jit
def _spectral_mix_grad_w_kernel(
    x_ptr, g_ptr, gw_ptr,
    B, CI, CO, H, W, Wr, M1, M2,
    n_mb, n_ib, n_ob,
    IS_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
    EDGE: tl.constexpr = True,
):
    """gw[i, o, r, ky] = c(ky) * sum_b conj(x[b, i, kx, ky]) * g[b, o, kx, ky] for one block of
    (ky, i, o); x: (B, CI, H, Wr, 2), g: (B, CO, H, Wr, 2), gw: (CI, CO, 2*M1, M2, 2), contiguous.
    EDGE: c = 2 on the non-edge rfft columns of a W-column grid (the FFT route); else c = 1 (the
    DFT route's compact spectra, H = 2*M1 and Wr = M2, where the mixing is all there is)."""
    pid = tl.program_id(0)
    mb, ib, ob, r, kx = _block_of(pid, n_mb, n_ib, n_ob, H, M1)
    ky = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    kmask = ky < M2
    x_mask = kmask[:, None] & (i < CI)[None, :]
    g_mask = kmask[:, None] & (o < CO)[None, :]
    acc_ty: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    acc_re = tl.zeros((BLOCK_M, BLOCK_I, BLOCK_O), dtype=acc_ty)
    acc_im = tl.zeros((BLOCK_M, BLOCK_I, BLOCK_O), dtype=acc_ty)
    plane = H * Wr * 2
    x_off = i[None, :] * plane + kx * (Wr * 2) + ky[:, None] * 2
    g_off = o[None, :] * plane + kx * (Wr * 2) + ky[:, None] * 2
    for b in range(B):
        xr = tl.load(x_ptr + x_off + b * (CI * plane), mask=x_mask, other=0.0).to(acc_ty)
        xi = -tl.load(x_ptr + x_off + b * (CI * plane) + 1, mask=x_mask, other=0.0).to(acc_ty)
        gr = tl.load(g_ptr + g_off + b * (CO * plane), mask=g_mask, other=0.0).to(acc_ty)
        gi = tl.load(g_ptr + g_off + b * (CO * plane) + 1, mask=g_mask, other=0.0).to(acc_ty)
        xr3 = xr[:, :, None]
        xi3 = xi[:, :, None]
        gr3 = gr[:, None, :]
        gi3 = gi[:, None, :]
        acc_re += xr3 * gr3 - xi3 * gi3
        acc_im += xr3 * gi3 + xi3 * gr3
    # non-edge rfft columns stand for a conjugate pair: the adjoint of irfft2 counts them twice
    if EDGE:
        c = tl.where((ky == 0) | (2 * ky == W), 1.0, 2.0)[:, None, None]
        acc_re = acc_re * c
        acc_im = acc_im * c
    gw_off = ((i[None, :, None] * CO + o[None, None, :]) * (2 * M1) + r) * (M2 * 2) + ky[:, None, None] * 2
    mask = kmask[:, None, None] & (i < CI)[None, :, None] & (o < CO)[None, None, :]
    tl.store(gw_ptr + gw_off, acc_re.to(gw_ptr.dtype.element_ty), mask=mask)
    tl.store(gw_ptr + gw_off + 1, acc_im.to(gw_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch configurations (fixed per shape class)
# ---------------------------------------------------------------------------------------------
#: programs the mixing kernels aim for on a GPU: the kernels loop over channels (or the batch) with
#: loads whose latency only more resident warps hide, and a grid of one 4-warp program per SM (128
#: programs at B16 C64 m16 with the largest tiles) leaves most of it exposed. Tiles shrink (columns to
#: 8, rows to 4, modes to 2) until the grid has this many programs. Not yet measured on a GPU:
#: bench_ops times the mixing with this and with 0 (provider "triton_few": the largest tiles).
MIN_PROGRAMS = 512

#: input channels per step of the mixing kernel's channel loop (at most; a power of two dividing the
#: channel count: _unroll): a step issues the loads of all its channels before any product, so that
#: this many loads are in flight where the plain loop had one (it was bound by their latency). ptxas
#: registers for sm_90 at B16 C64 m16 with 1 / 4 / 8 (benchmarks/kernel_resources.py, Triton 3.9):
#: 72 / 80 / 87 forward, 80 / 80 / 87 for the input gradient, 207 with 8 at the largest tiles
#: (MIN_PROGRAMS = 0). Not yet timed on a GPU (tune_dft.py times 1, 4 and 8); 1 is the plain loop.
MIX_UNROLL = 8

#: True: the FFT route's forward and backward allocate the spectrum handed to irfft2 with torch.empty,
#: and the mixing launch writes its zeros too (programs pid >= n_mix of _spectral_mix_kernel); False:
#: torch.zeros (a fill kernel) and a launch that writes the kept modes only. bench_ops times both.
FUSED_ZERO = True

#: floats per zero program on a GPU (32 per thread at 4 warps, stored as float4 away from the kept
#: rows); the interpreter takes up to 2^16 per program.
ZERO_BLOCK = 4096


def _mix_blocks(m2: int, rows: int, cols: int, kept_rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_ROWS, BLOCK_COLS): modes per program and a rows x cols tile of the
    per-mode product, for a grid over kept_rows x m2 modes: at most 4K complex accumulators per
    program on a GPU, smaller while the grid has fewer than MIN_PROGRAMS programs."""
    if INTERPRET:  # as few programs as possible, each block under 2^16 elements
        blocks = [pow2(m2), pow2(rows), pow2(cols)]
        while blocks[0] * blocks[1] * blocks[2] > (1 << 16):
            blocks[blocks.index(max(blocks))] //= 2
        return tuple(blocks)
    bc = min(pow2(cols), 32)
    br = min(pow2(rows), 16)
    bm = max(1, min(pow2(m2), 16, 4096 // (bc * br)))

    def programs() -> int:
        return kept_rows * cdiv(m2, bm) * cdiv(rows, br) * cdiv(cols, bc)

    while programs() < MIN_PROGRAMS:
        if bc > 8:
            bc //= 2
        elif br > 4:
            br //= 2
        elif bm > 2:
            bm //= 2
        else:
            break
    return bm, br, bc


def _mix_into(out: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, m1: int, m2: int,
              conj_transpose: bool, *, zeroed: bool = True) -> None:
    """out (B, CO, H, Wr) complex, contiguous = Mix(a): with conj_transpose the weight acts as
    conj(weight[i, o]) summed over o (a then has C_out channels, out C_in). zeroed: out holds zeros
    already and the launch writes the kept modes only; else it writes the zeros too (one launch)."""
    B, CI, H, Wr = a.shape
    CO = out.shape[1]
    wv = torch.view_as_real(weight.resolve_conj())
    s_i, s_o, s_r, s_c = wv.stride(0), wv.stride(1), wv.stride(2), wv.stride(3)
    if conj_transpose:
        s_i, s_o = s_o, s_i
    bm, bb, bo = _mix_blocks(m2, B, CO, 2 * m1)
    n_mb, n_bb, n_ob = cdiv(m2, bm), cdiv(B, bb), cdiv(CO, bo)
    n_mix = 2 * m1 * n_mb * n_bb * n_ob
    n_out = 2 * out.numel()
    bz = min(pow2(n_out), 1 << 16) if INTERPRET else ZERO_BLOCK
    n_zero = 0 if zeroed else cdiv(n_out, bz)
    launch(_spectral_mix_kernel, (n_mix + n_zero,),
           torch.view_as_real(a), wv, torch.view_as_real(out),
           B, CI, CO, H, Wr, m1, m2, s_i, s_o, s_r, s_c, n_mb, n_bb, n_ob, n_mix, n_out,
           CONJ_W=conj_transpose, IS_F64=a.dtype == torch.complex128,
           BLOCK_M=bm, BLOCK_B=bb, BLOCK_O=bo, UNROLL=_unroll(CI), BLOCK_Z=bz, num_warps=4)


def _mixed(a: torch.Tensor, weight: torch.Tensor, m1: int, m2: int, conj_transpose: bool,
           fused: bool | None = None) -> torch.Tensor:
    """A new spectrum (B, C, H, Wr) = Mix(a) (_mix_into), C the weight's output channels (its input
    channels with conj_transpose). fused (None: FUSED_ZERO): torch.empty and one launch that writes
    the zeros too; False: torch.zeros and a launch that writes the kept modes only."""
    fused = FUSED_ZERO if fused is None else fused
    B, _, H, Wr = a.shape
    C = weight.shape[0 if conj_transpose else 1]
    out = (torch.empty if fused else torch.zeros)((B, C, H, Wr), dtype=a.dtype, device=a.device)
    _mix_into(out, a, weight, m1, m2, conj_transpose, zeroed=not fused)
    return out


def _unroll(channels: int) -> int:
    """The mixing loop's channels per step: the largest power of two up to MIX_UNROLL that divides
    the channel count (so that no step needs a channel mask)."""
    u = 1
    while 2 * u <= MIX_UNROLL and channels % (2 * u) == 0:
        u *= 2
    return u


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
def _forward_fake(x, weight):
    B, _, H, W = x.shape
    return x.new_empty((B, weight.shape[1], H, W)), x.new_empty((B, x.shape[1], H, W // 2 + 1), dtype=weight.dtype)


def _spectral_conv2d(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    H, W = (int(s) for s in x.shape[-2:])
    m1, m2 = int(weight.shape[2]) // 2, int(weight.shape[3])
    X = torch.fft.rfft2(x, norm=FFT_NORM).contiguous()
    S = _mixed(X, weight, m1, m2, conj_transpose=False)
    return torch.fft.irfft2(hermitian_edges(S, W, m2), s=(H, W), norm=FFT_NORM), X


def _backward_fake(grad, X, weight, need_x, need_w):
    B, CI, H, _ = X.shape
    gx = grad.new_empty((B, CI, H, grad.shape[-1]) if need_x else (0,))
    gw = weight.new_empty(weight.shape if need_w else (0,))
    return gx, gw


def _spectral_conv2d_backward(grad: torch.Tensor, X: torch.Tensor, weight: torch.Tensor, need_x: bool,
                              need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    H, W = int(X.shape[-2]), int(grad.shape[-1])
    m1, m2 = int(weight.shape[2]) // 2, int(weight.shape[3])
    Gy = torch.fft.rfft2(grad, norm="backward").contiguous()
    if need_x:
        GX = _mixed(Gy, weight, m1, m2, conj_transpose=True)
        gx = torch.fft.irfft2(hermitian_edges(GX, W, m2), s=(H, W), norm="backward")
    else:
        gx = grad.new_empty((0,))
    gw = _mix_grad_weight(X, Gy, weight, W) if need_w else weight.new_empty((0,))
    return gx, gw


def _mix_grad_weight(X: torch.Tensor, Gy: torch.Tensor, weight: torch.Tensor, W: int,
                     edge: bool = True) -> torch.Tensor:
    """The weight's gradient of the mixing, from the input spectrum X (B, C_in, H, Wr) and the output
    spectrum's gradient Gy (B, C_out, H, Wr): (C_in, C_out, 2 m1, m2) like weight. ``edge``: the
    FFT route's factor 2 on the non-edge columns of a W-column grid; False: sum_b conj(X) * Gy alone
    (the compact spectra of the DFT route; W is then unused)."""
    B, CI, H, Wr = (int(s) for s in X.shape)
    CO, m1, m2 = int(weight.shape[1]), int(weight.shape[2]) // 2, int(weight.shape[3])
    gw = torch.empty((CI, CO, 2 * m1, m2), dtype=weight.dtype, device=weight.device)
    bm, bi, bo = _mix_blocks(m2, CI, CO, 2 * m1)
    n_mb, n_ib, n_ob = cdiv(m2, bm), cdiv(CI, bi), cdiv(CO, bo)
    launch(_spectral_mix_grad_w_kernel, (2 * m1 * n_mb * n_ib * n_ob,),
           torch.view_as_real(X), torch.view_as_real(Gy), torch.view_as_real(gw),
           B, CI, CO, H, W, Wr, m1, m2, n_mb, n_ib, n_ob,
           IS_F64=X.dtype == torch.complex128, BLOCK_M=bm, BLOCK_I=bi, BLOCK_O=bo, EDGE=edge, num_warps=4)
    return gw


_spectral_conv2d_op = register("spectral_conv2d", _forward_fake)(_spectral_conv2d)
_spectral_conv2d_backward_op = register("spectral_conv2d_backward", _backward_fake)(_spectral_conv2d_backward)
no_second_derivative(_spectral_conv2d_backward_op, "spectral_conv2d", "Triton")  # a second backward raises


def _setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], inputs[1])


def _backward(ctx, grad, _grad_spectrum):
    X, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    if grad is None or not (need_x or need_w):
        return None, None
    bwd = backward_fn(ctx, _spectral_conv2d_backward, _spectral_conv2d_backward_op)
    gx, gw = bwd(grad, X, weight, need_x, need_w)
    return (gx if need_x else None), (gw if need_w else None)


# eager mode calls _spectral_conv2d without the op (its dispatch costs of the order of a small
# layer's kernels); tracing calls the op (_lib.with_autograd)
_spectral_conv2d_call = with_autograd(_spectral_conv2d_op, _spectral_conv2d, _setup, _backward)


def spectral_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Spectral convolution y = irfft2(Mix(rfft2(x))), differentiable in x and weight.

    x: (B, C_in, H, W) float32/float64, or bfloat16/float16 with a complex64 weight (stored in 16
    bits, computed in float32: y and grad_x in x's dtype); weight: (C_in, C_out, 2*m1, m2)
    complex64/complex128 -> (B, C_out, H, W). See irno_kernels.spectral_conv2d_ref. Float32 and
    16-bit fields that the automatic CUDA choice would send to the dft route
    (irno_kernels.spectral_dft.prefer_dft) run the Triton truncated-DFT kernels
    (irno_kernels/triton/spectral_dft.py), which read and write 16-bit fields as they are; the rest
    the FFT route here (a 16-bit field is converted to float32 for the FFTs and back after).
    """
    from irno_kernels import spectral_dft
    from irno_kernels.triton import spectral_dft as tr_dft

    if x.dtype in tr_dft.GRID_DTYPES and tr_dft.fits(weight) and spectral_dft.prefer_dft(x, weight):
        return tr_dft.spectral_conv2d_dft(x, weight)
    if x.dtype in LOW_PRECISION:  # torch's FFTs take no bfloat16 (and float16 at powers of two only)
        return _spectral_conv2d_call(x.float(), weight)[0].to(x.dtype)
    return _spectral_conv2d_call(x, weight)[0]
