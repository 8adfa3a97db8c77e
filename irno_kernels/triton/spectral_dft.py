"""Triton kernels for the truncated-DFT route of spectral_conv2d (irno_kernels/spectral_dft.py):
the forward transform restricted to the kept modes and the inverse transform from them, each ONE
kernel that passes over the grid once, with the products on the tensor cores (tl.dot).

    grid -> modes  Z = E @ (x @ A)              x (H, W) real, A (W, M) complex, E (R, H) complex
    modes -> grid  y = Re(P @ Z) @ Qr + Im(P @ Z) @ Qi
                                                Z (R, M) complex, P (H, R) complex, Q (M, W) real

per (batch, channel) plane. The layer is  y = modes_to_grid(Mix(grid_to_modes(x)))  with the DFT
matrices of irno_kernels.spectral_dft.dft_matrices, and the mixing on the compact (2*m1, m2)
spectra by the FFT route's mixing kernels (irno_kernels/triton/spectral_conv.py) reading and writing
the compact spectra in place (COMPACT_MIX; or torch.einsum). Each transform is linear and its adjoint
is the other kernel with transposed (conjugated) matrices, which is the whole backward of the
transforms:

    grid -> modes with (A, E):   grad_x = modes_to_grid(grad_Z) with P = E^H, Qr = Re(A)^T, Qi = Im(A)^T
    modes -> grid with (P, Q):   grad_Z = grid_to_modes(grad_y) with A = Qr^T + i Qi^T, E = P^H

(PyTorch's complex-gradient convention, grad = dL/dRe + i dL/dIm.) The intermediate x @ A of one
block of rows stays in registers, so x is read once and the compact spectrum written once; the
inverse reads the compact spectrum and writes y once.

Precision: float32 data; the products take tl.dot's "tf32x3" (three TF32 products, about float32
accuracy) unless PyTorch's matmul TF32 switch is on (``torch.backends.cuda.matmul.allow_tf32`` or
its successor ``fp32_precision``: see matmul_tf32), then "tf32" (the fast mode). bfloat16/float16
fields are stored in 16 bits and transformed like float32 ones: grid_to_modes reads them as they are
and modes_to_grid writes its result in their dtype (no float32 copy of either; the compact spectra
are complex64). float64 runs irno_kernels.spectral_dft (PyTorch matmuls) instead.

Used by the "triton" backend of spectral_conv2d where the automatic CUDA choice would take the dft
route (irno_kernels.spectral_dft.prefer_dft), with at most MAX_ROWS kept rows and MAX_COLS kept
columns (the accumulators of one plane live in registers); elsewhere that backend runs the FFT route.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from irno_kernels.triton import spectral_conv as _conv
from irno_kernels.triton._lib import INTERPRET, _tracing, backward_fn, cdiv, launch, pow2, register, with_autograd

__all__ = ["spectral_conv2d_dft", "grid_to_modes", "modes_to_grid", "compact_mix", "MAX_ROWS", "MAX_COLS",
           "GRID_DTYPES"]

#: the most kept rows (2*m1) and kept columns (m2) the kernels take
MAX_ROWS, MAX_COLS = 64, 32
#: the dtypes of the grids the kernels read and write (the compact spectra are complex64)
GRID_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _grid_to_modes_kernel(
    x_ptr, ar_ptr, ai_ptr, er_ptr, ei_ptr, z_ptr,
    H, W, R, M, N, rows_per_split,
    PREC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, RP: tl.constexpr, MP: tl.constexpr,
    PARTS: tl.constexpr = 1,
):
    """z[s, n] = E[:, rows] @ (x[n, rows] @ A) for plane n and the s-th band of ``rows_per_split``
    rows (a multiple of BH), s = program 1; x (N, H, W) contiguous, A = ar + i ai (W, M), E = er + i ei
    (R, H), z (S * PARTS, N, R, M, 2) a real view of a complex tensor (its sum over the first dim is the
    transform; with one band and PARTS = 1, z is the transform itself).

    PARTS = 1: program 0 is the plane. PARTS = 2: program 0 is 2 n + part, and a program takes one of
    the two real products of the W step (part 0: T = x @ ar, part 1: T = x @ ai) and its share of
    E @ (T_r + i T_i): part 0 adds (er + i ei) T_r, part 1 adds (-ei + i er) T_i, each to its own slice
    of z. Each program then holds one of the DFT matrices' tiles in registers instead of two (their
    tf32x3 splits are most of the registers, benchmarks/kernel_resources.py); the two programs of a
    plane run side by side, so the second read of x mostly hits L2."""
    pid = tl.program_id(0)
    n = (pid // PARTS).to(tl.int64)
    part = pid % PARTS
    s = tl.program_id(1)
    x_base = x_ptr + n * H * W
    rr = tl.arange(0, RP)
    mm = tl.arange(0, MP)
    zr = tl.zeros((RP, MP), dtype=tl.float32)
    zi = tl.zeros((RP, MP), dtype=tl.float32)
    row_end = tl.minimum(H, (s + 1) * rows_per_split)
    for h0 in range(s * rows_per_split, row_end, BH):
        hh = h0 + tl.arange(0, BH)
        tr = tl.zeros((BH, MP), dtype=tl.float32)  # with PARTS = 2: this program's T (real or imaginary)
        if PARTS == 1:
            ti = tl.zeros((BH, MP), dtype=tl.float32)
        for w0 in range(0, W, BW):
            ww = w0 + tl.arange(0, BW)
            xt = tl.load(x_base + hh[:, None] * W + ww[None, :], mask=(hh < row_end)[:, None] & (ww < W)[None, :],
                         other=0.0).to(tl.float32)
            a_off = ww[:, None] * M + mm[None, :]
            a_mask = (ww < W)[:, None] & (mm < M)[None, :]
            if PARTS == 1:
                ar = tl.load(ar_ptr + a_off, mask=a_mask, other=0.0)
                ai = tl.load(ai_ptr + a_off, mask=a_mask, other=0.0)
                tr += tl.dot(xt, ar, input_precision=PREC)
                ti += tl.dot(xt, ai, input_precision=PREC)
            else:
                a = tl.load(tl.where(part == 0, ar_ptr, ai_ptr) + a_off, mask=a_mask, other=0.0)
                tr += tl.dot(xt, a, input_precision=PREC)
        e_off = rr[:, None] * H + hh[None, :]
        e_mask = (rr < R)[:, None] & (hh < row_end)[None, :]
        if PARTS == 1:
            er = tl.load(er_ptr + e_off, mask=e_mask, other=0.0)
            ei = tl.load(ei_ptr + e_off, mask=e_mask, other=0.0)
            zr += tl.dot(er, tr, input_precision=PREC) - tl.dot(ei, ti, input_precision=PREC)
            zi += tl.dot(er, ti, input_precision=PREC) + tl.dot(ei, tr, input_precision=PREC)
        else:
            # part 0: zr += er T, zi += ei T; part 1: zr -= ei T, zi += er T
            e_re = tl.load(tl.where(part == 0, er_ptr, ei_ptr) + e_off, mask=e_mask, other=0.0)
            e_im = tl.load(tl.where(part == 0, ei_ptr, er_ptr) + e_off, mask=e_mask, other=0.0)
            zr += tl.where(part == 0, 1.0, -1.0) * tl.dot(e_re, tr, input_precision=PREC)
            zi += tl.dot(e_im, tr, input_precision=PREC)
    z_off = ((((s * PARTS + part) * N + n) * R + rr[:, None]) * M + mm[None, :]) * 2
    z_mask = (rr < R)[:, None] & (mm < M)[None, :]
    tl.store(z_ptr + z_off, zr, mask=z_mask)
    tl.store(z_ptr + z_off + 1, zi, mask=z_mask)


@triton.jit
def _modes_to_grid_kernel(
    z_ptr, pr_ptr, pi_ptr, qr_ptr, qi_ptr, y_ptr,
    H, W, R, M,
    PREC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, RP: tl.constexpr, MP: tl.constexpr,
):
    """y[n, rows] = Re(P @ z[n]) @ qr + Im(P @ z[n]) @ qi for plane n = program 0 and the block of
    rows of program 1; z (N, R, M, 2) real view, P = pr + i pi (H, R), qr, qi (M, W), y (N, H, W)."""
    n = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * BH + tl.arange(0, BH)
    rr = tl.arange(0, RP)
    mm = tl.arange(0, MP)
    z_off = ((n * R + rr[:, None]) * M + mm[None, :]) * 2
    z_mask = (rr < R)[:, None] & (mm < M)[None, :]
    zr = tl.load(z_ptr + z_off, mask=z_mask, other=0.0)
    zi = tl.load(z_ptr + z_off + 1, mask=z_mask, other=0.0)
    p_off = hh[:, None] * R + rr[None, :]
    p_mask = (hh < H)[:, None] & (rr < R)[None, :]
    pr = tl.load(pr_ptr + p_off, mask=p_mask, other=0.0)
    pi = tl.load(pi_ptr + p_off, mask=p_mask, other=0.0)
    sr = tl.dot(pr, zr, input_precision=PREC) - tl.dot(pi, zi, input_precision=PREC)
    si = tl.dot(pr, zi, input_precision=PREC) + tl.dot(pi, zr, input_precision=PREC)
    for w0 in range(0, W, BW):
        ww = w0 + tl.arange(0, BW)
        q_off = mm[:, None] * W + ww[None, :]
        q_mask = (mm < M)[:, None] & (ww < W)[None, :]
        qr = tl.load(qr_ptr + q_off, mask=q_mask, other=0.0)
        qi = tl.load(qi_ptr + q_off, mask=q_mask, other=0.0)
        yt = tl.dot(sr, qr, input_precision=PREC) + tl.dot(si, qi, input_precision=PREC)
        tl.store(y_ptr + n * H * W + hh[:, None] * W + ww[None, :], yt.to(y_ptr.dtype.element_ty),
                 mask=(hh < H)[:, None] & (ww < W)[None, :])


# ---------------------------------------------------------------------------------------------
# launch configurations
# ---------------------------------------------------------------------------------------------
def matmul_tf32() -> bool:
    """Whether PyTorch's float32 matmuls may use TF32 now, by the API that set it: the per-backend
    ``torch.backends.cuda.matmul.fp32_precision`` ("none" inherits ``torch.backends.fp32_precision``;
    ``allow_tf32 = True`` and ``set_float32_matmul_precision("high")`` set it to "tf32"). Reading
    the legacy ``allow_tf32`` raises once the new API was used, so it serves older torch only."""
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", None)
    if prec is None:
        return bool(m.allow_tf32)
    if prec == "none":
        return getattr(torch.backends, "fp32_precision", "none") == "tf32"
    return prec == "tf32"


def _precision() -> str:
    return "tf32" if matmul_tf32() else "tf32x3"


#: GPU launch configuration of each kernel per precision (tl.dot's input_precision: "tf32x3", the
#: accurate mode, takes about twice the registers of "tf32" on the same tiles, so the two may want
#: different tiles): rows (BH) and columns (BW) of the grid per tile, num_warps, num_stages and, for
#: grid_to_modes, SPLIT: the bands of rows a plane's transform is cut into, one program each, summed
#: after, and PARTS (1 or 2): 2 gives the real and imaginary columns of the W step programs of their
#: own (_grid_to_modes_kernel), summed after likewise. The values of before the tuning sweep:
#: benchmarks/tune_dft.py times alternatives side by side on a GPU, and
#: benchmarks/kernel_resources.py lists their registers, spills and occupancy for sm_90 on any
#: machine (results/kernel_resources_sm90.txt: the current grid_to_modes tiles take 255 registers
#: in tf32x3, two 4-warp programs per SM).
CONFIG = {
    "grid_to_modes": {
        "tf32x3": dict(BH=32, BW=64, num_warps=4, num_stages=3, SPLIT=1),
        "tf32": dict(BH=32, BW=64, num_warps=4, num_stages=3, SPLIT=1),
    },
    "modes_to_grid": {
        "tf32x3": dict(BH=32, BW=64, num_warps=4, num_stages=3),
        "tf32": dict(BH=32, BW=64, num_warps=4, num_stages=3),
    },
}


def _blocks(H: int, W: int, R: int, M: int, kernel: str = "grid_to_modes",
            prec: str = "tf32x3") -> tuple[int, int, int, int]:
    """(BH, BW, RP, MP): rows and columns of x per tile, kept rows and columns padded to powers of
    two of at least 16 (tl.dot's smallest operand)."""
    rp, mp = max(16, pow2(R)), max(16, pow2(M))
    if INTERPRET:  # few, large tiles: the interpreter's cost grows with the number of steps
        return max(16, min(pow2(H), 64)), max(16, min(pow2(W), 256)), rp, mp
    cfg = CONFIG[kernel][prec]
    return cfg["BH"], cfg["BW"], rp, mp


def _split(H: int, bh: int, prec: str = "tf32x3") -> tuple[int, int]:
    """(bands, rows per band) of grid_to_modes for H rows in tiles of bh: CONFIG's SPLIT, fewer when
    H has fewer tiles; every band a whole number of tiles (the interpreter: one band)."""
    tiles = cdiv(H, bh)
    split = 1 if INTERPRET else max(1, min(int(CONFIG["grid_to_modes"][prec].get("SPLIT", 1)), tiles))
    per = cdiv(tiles, split) * bh
    return cdiv(H, per), per


def _launch_opts(kernel: str, prec: str = "tf32x3") -> dict:
    if INTERPRET:
        return dict(num_warps=4)
    cfg = CONFIG[kernel][prec]
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
def _g2m_fake(x, ar, ai, er, ei):
    return x.new_empty((*x.shape[:-2], er.shape[0], ar.shape[1]), dtype=torch.complex64)


def _g2m(x: torch.Tensor, ar: torch.Tensor, ai: torch.Tensor, er: torch.Tensor, ei: torch.Tensor) -> torch.Tensor:
    *lead, H, W = (int(s) for s in x.shape)
    R, M = int(er.shape[0]), int(ar.shape[1])
    x = x.contiguous()
    N = x.numel() // (H * W)
    prec = _precision()
    bh, bw, rp, mp = _blocks(H, W, R, M, "grid_to_modes", prec)
    split, per = _split(H, bh, prec)
    parts = 1 if INTERPRET else int(CONFIG["grid_to_modes"][prec].get("PARTS", 1))
    # one band and one part: the kernel writes z itself; else one partial transform each, summed here
    k = split * parts
    z = torch.empty((*([k] if k > 1 else []), *lead, R, M), dtype=torch.complex64, device=x.device)
    launch(_grid_to_modes_kernel, (N * parts, split), x, ar, ai, er, ei, torch.view_as_real(z), H, W, R, M, N, per,
           PREC=prec, BH=bh, BW=bw, RP=rp, MP=mp, PARTS=parts, **_launch_opts("grid_to_modes", prec))
    return z if k == 1 else z.sum(0)


def _m2g_fake(z, pr, pi, qr, qi, dtype):
    return z.new_empty((*z.shape[:-2], pr.shape[0], qr.shape[1]), dtype=dtype)


def _m2g(z: torch.Tensor, pr: torch.Tensor, pi: torch.Tensor, qr: torch.Tensor, qi: torch.Tensor,
         dtype: torch.dtype) -> torch.Tensor:
    """The grid (..., H, W) in ``dtype`` (float32, bfloat16 or float16: the kernel rounds its float32
    result once, on the store)."""
    *lead, R, M = (int(s) for s in z.shape)
    H, W = int(pr.shape[0]), int(qr.shape[1])
    z = z.resolve_conj().contiguous()
    y = torch.empty((*lead, H, W), dtype=dtype, device=z.device)
    N = y.numel() // (H * W)
    prec = _precision()
    bh, bw, rp, mp = _blocks(H, W, R, M, "modes_to_grid", prec)
    launch(_modes_to_grid_kernel, (N, cdiv(H, bh)), torch.view_as_real(z), pr, pi, qr, qi, y, H, W, R, M,
           PREC=prec, BH=bh, BW=bw, RP=rp, MP=mp, **_launch_opts("modes_to_grid", prec))
    return y


_g2m_op = register("dft_grid_to_modes", _g2m_fake)(_g2m)
_m2g_op = register("dft_modes_to_grid", _m2g_fake)(_m2g)


def _adjoint_of_g2m(ar, ai, er, ei):
    """(pr, pi, qr, qi) of modes_to_grid that is the adjoint of grid_to_modes with (ar, ai, er, ei)."""
    return er.t().contiguous(), (-ei).t().contiguous(), ar.t().contiguous(), ai.t().contiguous()


def _adjoint_of_m2g(pr, pi, qr, qi):
    """(ar, ai, er, ei) of grid_to_modes that is the adjoint of modes_to_grid with (pr, pi, qr, qi)."""
    return qr.t().contiguous(), qi.t().contiguous(), pr.t().contiguous(), (-pi).t().contiguous()


def _g2m_setup(ctx, inputs, output):
    ctx.mats = inputs[1:]
    ctx.x_dtype = inputs[0].dtype


def _g2m_backward(ctx, gz):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    adj = _cached_adjoint(ctx.mats, 0) or _adjoint_of_g2m(*ctx.mats)
    gx = backward_fn(ctx, _m2g, _m2g_op)(gz, *adj, ctx.x_dtype)
    return gx, None, None, None, None


_g2m_call = with_autograd(_g2m_op, _g2m, _g2m_setup, _g2m_backward)


def _m2g_setup(ctx, inputs, output):
    ctx.mats = inputs[1:5]


def _m2g_backward(ctx, gy):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    adj = _cached_adjoint(ctx.mats, 1) or _adjoint_of_m2g(*ctx.mats)
    return backward_fn(ctx, _g2m, _g2m_op)(gy, *adj), None, None, None, None, None


# eager mode calls _g2m and _m2g without the ops (their dispatch costs of the order of the kernels on
# small fields); tracing calls the ops (_lib.with_autograd). Each backward is the other transform: with
# create_graph=True the registered op, whose own autograd gives the higher derivatives (_lib.backward_fn)
_m2g_call = with_autograd(_m2g_op, _m2g, _m2g_setup, _m2g_backward)


# ---------------------------------------------------------------------------------------------
# the mixing of the compact spectra
# ---------------------------------------------------------------------------------------------
#: how the layer mixes the compact spectra: "triton", the mixing kernels of the FFT route, reading X
#: and the weight where they are and writing S in the layout modes_to_grid reads (one launch forward;
#: the input and weight gradients one each), or "einsum" (torch.einsum: cuBLAS's batched GEMM with
#: the spectrum and the weight copied into its layout and the result copied back: 3 copies and a
#: GEMM, 0.045 ms of the Triton layer's 0.502 at B16 C64 256x256 m16 on an H200, cb16083; 10 more
#: kernels in the backward). At cb16083 the layer's eager forward + backward was host-bound there
#: (2.27 ms of wall time for 1.05 ms of kernels, 25 kernels, about 45 us of host time per kernel);
#: with "triton" and the cached adjoint matrices it launches 7. The kernels' own time against
#: einsum's is not yet measured: bench_ops' layer provider "triton_einsum" (this switch on "einsum")
#: and tune_dft.py time both.
COMPACT_MIX = "triton"


def _mix_fake(X, weight):
    return X.new_empty((X.shape[0], weight.shape[1], *X.shape[2:]))


def _mix(X: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """S[b, o] = sum_i X[b, i] * weight[i, o] for compact spectra X (B, C_in, 2*m1, m2): every mode
    is kept, so _conv's mixing launch has no zero programs."""
    m1, m2 = int(weight.shape[2]) // 2, int(weight.shape[3])
    S = torch.empty(_mix_fake(X, weight).shape, dtype=X.dtype, device=X.device)
    _conv._mix_into(S, X.contiguous(), weight, m1, m2, conj_transpose=False, zeroed=True)
    return S


def _mix_bwd_fake(gS, X, weight, need_x, need_w):
    return gS.new_empty(X.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,))


def _mix_bwd(gS: torch.Tensor, X: torch.Tensor, weight: torch.Tensor, need_x: bool,
             need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_X = sum_o gS * conj(weight[i, o]), grad_weight = sum_b conj(X) * gS), empty when not
    needed (PyTorch's complex-gradient convention)."""
    m1, m2 = int(weight.shape[2]) // 2, int(weight.shape[3])
    gS = gS.resolve_conj().contiguous()
    if need_x:  # every mode is kept: the launch writes all of grad_X, no zeros
        gX = torch.empty((X.shape[0], weight.shape[0], *X.shape[2:]), dtype=gS.dtype, device=gS.device)
        _conv._mix_into(gX, gS, weight, m1, m2, conj_transpose=True, zeroed=True)
    else:
        gX = gS.new_empty((0,))
    gw = (_conv._mix_grad_weight(X.contiguous(), gS, weight, 0, edge=False) if need_w
          else weight.new_empty((0,)))
    return gX, gw


_mix_op = register("dft_mix", _mix_fake)(_mix)
_mix_bwd_op = register("dft_mix_backward", _mix_bwd_fake)(_mix_bwd)


def _mix_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs)


def _mix_backward(ctx, gS):
    X, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    if gS is None or not (need_x or need_w):
        return None, None
    if torch.is_grad_enabled():  # a backward that is itself differentiated: torch's formulas
        gX = torch.einsum("boxy,ioxy->bixy", gS, weight.conj()) if need_x else None
        gw = torch.einsum("bixy,boxy->ioxy", X.conj(), gS) if need_w else None
        return gX, gw
    gX, gw = backward_fn(ctx, _mix_bwd, _mix_bwd_op)(gS, X, weight, need_x, need_w)
    return (gX if need_x else None), (gw if need_w else None)


_mix_call = with_autograd(_mix_op, _mix, _mix_setup, _mix_backward)


def compact_mix(X: torch.Tensor, weight: torch.Tensor, how: str | None = None) -> torch.Tensor:
    """S (B, C_out, 2*m1, m2) = sum_i X[:, i] * weight[i] on compact spectra X (B, C_in, 2*m1, m2)
    complex64, weight (C_in, C_out, 2*m1, m2) complex64; differentiable in both (to any order).
    ``how``: "einsum" or "triton" (None: COMPACT_MIX)."""
    how = COMPACT_MIX if how is None else how
    if how == "einsum":
        return torch.einsum("bixy,ioxy->boxy", X, weight)
    if how != "triton":
        raise ValueError(f"how: expected 'einsum' or 'triton', got {how!r}")
    return _mix_call(X, weight)


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------
_MATS: dict[tuple, tuple[torch.Tensor, ...]] = {}
_MATS_PINNED: set[tuple] = set()  # read by a captured CUDA graph: never evicted (spectral_dft.cache_put)
_MATS_MAX = 32


def _matrices(H: int, W: int, m1: int, m2: int, device) -> tuple[tuple[torch.Tensor, ...], ...]:
    """((ar, ai, er, ei) of the forward transform, (pr, pi, qr, qi) of the inverse, and the matrices of
    their adjoints: modes_to_grid's for grid_to_modes, grid_to_modes' for modes_to_grid), float32,
    contiguous, from irno_kernels.spectral_dft.dft_matrices (cached; kept for good once a CUDA graph
    captured reading them). The backward finds the adjoints here (_cached_adjoint): made anew, they
    cost five small kernels per transform and backward."""
    from irno_kernels.spectral_dft import cache_get, cache_put, dft_matrices

    key = (H, W, m1, m2, torch.device(device))
    hit = cache_get(_MATS, _MATS_PINNED, key, device)
    if hit is None:
        fw, eh, eh_inv, iw = dft_matrices(H, W, m1, m2, torch.float32, device)
        fwd = (fw[:, 0::2].contiguous(), fw[:, 1::2].contiguous(), eh.real.contiguous(), eh.imag.contiguous())
        inv = (eh_inv.real.contiguous(), eh_inv.imag.contiguous(), iw[0::2].contiguous(), iw[1::2].contiguous())
        entry = (fwd, inv, _adjoint_of_g2m(*fwd), _adjoint_of_m2g(*inv))
        hit = cache_put(_MATS, _MATS_PINNED, key, entry, _MATS_MAX, device)
    return hit


def _cached_adjoint(mats: tuple[torch.Tensor, ...], kind: int) -> tuple[torch.Tensor, ...] | None:
    """The cached adjoint matrices of the transform with ``mats`` (kind 0: grid_to_modes' (ar, ai, er,
    ei), 1: modes_to_grid's (pr, pi, qr, qi)) when they are _matrices' own tensors (by identity: the
    public functions pass them), else None (the caller makes them)."""
    from irno_kernels.spectral_dft import cache_get

    if _tracing(mats):  # fake or traced tensors are never the cached ones
        return None
    if kind == 0:
        H, W, m1, m2 = mats[2].shape[1], mats[0].shape[0], mats[2].shape[0] // 2, mats[0].shape[1]
    else:
        H, W, m1, m2 = mats[0].shape[0], mats[2].shape[1], mats[0].shape[1] // 2, mats[2].shape[0]
    device = mats[0].device
    hit = cache_get(_MATS, _MATS_PINNED, (int(H), int(W), int(m1), int(m2), device), device)
    if hit is None or any(a is not b for a, b in zip(hit[kind], mats)):
        return None
    return hit[2 + kind]


def grid_to_modes(x: torch.Tensor, m1: int, m2: int) -> torch.Tensor:
    """The kept rfft2 modes of x (..., H, W) float32, bfloat16 or float16 (computed in float32), norm
    "forward": (..., 2*m1, m2) complex64, rows 0..m1-1 then -m1..-1. Differentiable in x (the
    gradient in x's dtype)."""
    if x.dtype not in GRID_DTYPES:
        raise ValueError(f"x: expected dtype in {list(GRID_DTYPES)}, got {x.dtype}")
    H, W = x.shape[-2:]
    return _g2m_call(x, *_matrices(H, W, m1, m2, x.device)[0])


def modes_to_grid(z: torch.Tensor, H: int, W: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """irfft2 of the compact spectrum z (..., 2*m1, m2) (zero elsewhere), read as Re(ifft2) (DESIGN
    3.1), onto an H x W grid: (..., H, W) in ``dtype`` (float32, bfloat16 or float16; computed in
    float32 either way). Differentiable in z."""
    if dtype not in GRID_DTYPES:
        raise ValueError(f"dtype: expected one of {list(GRID_DTYPES)}, got {dtype}")
    m1, m2 = z.shape[-2] // 2, z.shape[-1]
    return _m2g_call(z, *_matrices(H, W, m1, m2, z.device)[1], dtype)


def fits(weight: torch.Tensor) -> bool:
    """Whether the kernels take this weight's modes (2*m1 <= MAX_ROWS, m2 <= MAX_COLS)."""
    return weight.shape[2] <= MAX_ROWS and weight.shape[3] <= MAX_COLS


def spectral_conv2d_dft(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """spectral_conv2d by the two Triton transforms and a compact mixing (module docstring).

    x: (B, C_in, H, W) float32, bfloat16 or float16 (16-bit fields read and written in 16 bits,
    transformed in float32); weight: (C_in, C_out, 2*m1, m2) complex64 with 2*m1 <= MAX_ROWS,
    m2 <= MAX_COLS. Returns (B, C_out, H, W) in x's dtype; grad_x comes in x's dtype too.
    """
    H, W = x.shape[-2:]
    X = grid_to_modes(x, weight.shape[2] // 2, weight.shape[3])
    return modes_to_grid(compact_mix(X, weight), H, W, x.dtype)
