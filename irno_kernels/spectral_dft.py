"""The spectral convolution as a truncated DFT: matrix products over the kept modes only.

Same function as :func:`irno_kernels.spectral_conv2d_ref` (irfft2 read as Re(ifft2), DESIGN 3.1),
computed without any FFT: a layer keeps 2*m1 x m2 modes of an H x W grid, and when those are few the
forward transform restricted to them and the inverse transform from them are skinny GEMMs, which
cuBLAS runs on tensor cores (TF32/bf16 when PyTorch allows it, fp32 otherwise) while an FFT must pass
over the whole grid several times. Five products per call, all in PyTorch:

    T  = x (N*H, W) @ [cos, -sin] (W, 2*m2)                 along W: kept rfft columns 0..m2-1
    X  = E (2*m1, H) @ T (N, H, m2), / (H*W)                along H: kept rows 0..m1-1, -m1..-1
    S  = Mix(X)                                             the same einsum as the reference
    S' = E^H (H, 2*m1) @ S (N, 2*m1, m2)                    back along H
    y  = [Re S', Im S'] (N*H, 2*m2) @ [c*cos ; -c*sin]      back along W; c = 1 on column 0 and the
                                                            Nyquist column of an even W, else 2

Real and imaginary parts are interleaved along the 2*m2 axis ([cos_0, -sin_0, cos_1, -sin_1, ...]),
so the real GEMMs read and write complex tensors through view_as_real / view_as_complex, no copies.

The last line is irfft along W of a one-sided spectrum under the Re(ifft2) reading, which is the
op's definition (see :func:`irno_kernels.spectral_conv.hermitian_edges`). Autograd differentiates the
products exactly, and forward-mode AD works. The DFT matrices are built on the device with torch ops
(so a first call may happen inside CUDA-graph capture) and cached per (H, W, m1, m2, dtype, device).

Selected with ``spectral_conv2d(..., backend="dft")``, and automatically on CUDA tensors for large
fields with few kept modes (:func:`prefer_dft`): on an H100 (benchmarks/results/gpu_h100_2026-11-27,
bench_ops.py) at B16 C64 256x256 m16 it ran the forward 2.98x faster than rfft2 + einsum + irfft2
(the CUDA FFT-route kernels: 1.03x), 4.5x with TF32, and forward+backward 4.5x (CUDA kernels 1.44x);
at B4 C32 128x384 and B16 C32 64x64 (6M and 2M values, launch-bound) the FFT-route kernels were
faster (1.8x and 5.7x vs 0.9x and 2.0x). On CPU the C++ kernel (which takes the same GEMM route when
it pays, csrc/spectral_conv.cpp) is faster, so it is never chosen there.
"""

from __future__ import annotations

import math

import torch

__all__ = ["spectral_conv2d_dft", "dft_matrices", "prefer_dft", "DFT_MIN_VALUES", "DFT_MAX_MODES"]

#: the automatic choice on CUDA takes the dft route from this many input values (B * C_in * H * W) on:
#: between the largest size measured faster on the FFT route (6.3M) and the smallest measured faster
#: here (67M); bench_ops.py's crossover sweep (256x256 C64 m16, B = 1..16) checks where it lies
DFT_MIN_VALUES = 1 << 24
#: ... and only while the kept modes are few (the products grow with 2*m1 and m2, the FFT does not)
DFT_MAX_MODES = 32


def prefer_dft(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the automatic choice runs spectral_conv2d(x, weight) on the dft route: CUDA tensors,
    at least DFT_MIN_VALUES input values, 2*m1 <= 2*DFT_MAX_MODES and m2 <= DFT_MAX_MODES."""
    return (x.is_cuda and x.numel() >= DFT_MIN_VALUES and weight.shape[2] <= 2 * DFT_MAX_MODES
            and weight.shape[3] <= DFT_MAX_MODES)

_CACHE: dict[tuple, tuple[torch.Tensor, ...]] = {}
_CACHE_MAX = 32
#: keys whose matrices a CUDA graph read while it was captured: a replay reads them by address, so
#: they stay cached (never evicted) for the life of the process
_PINNED: set[tuple] = set()


def capturing(device) -> bool:
    """Whether the current CUDA stream of ``device`` is being captured into a CUDA graph."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def cache_put(cache: dict, pinned: set, key, value, limit: int, device):
    """Insert into a bounded cache that evicts its oldest entry not in ``pinned``, pinning the key when
    a CUDA graph is being captured on ``device``; returns value."""
    if capturing(device):
        pinned.add(key)
    if len(cache) >= limit:
        old = next((k for k in cache if k not in pinned), None)
        if old is not None:
            cache.pop(old)
    cache[key] = value
    return value


def cache_get(cache: dict, pinned: set, key, device):
    """cache.get(key), pinning the key when a CUDA graph is being captured on ``device``."""
    hit = cache.get(key)
    if hit is not None and capturing(device):
        pinned.add(key)
    return hit


def _real_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.complex128 else torch.float32


def dft_matrices(H: int, W: int, m1: int, m2: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """(fw, eh, eh_inv, iw): fw (W, 2*m2) real, columns cos, -sin interleaved per kept W-frequency;
    eh (2*m1, H) complex forward rows for frequencies 0..m1-1, -m1..-1, scaled by 1/(H*W); eh_inv
    (H, 2*m1) complex inverse; iw (2*m2, W) real, rows c*cos, -c*sin interleaved. Angles are reduced
    modulo the period in integers before the trigonometry, so large grids keep full accuracy."""
    key = (H, W, m1, m2, dtype, torch.device(device))
    hit = cache_get(_CACHE, _PINNED, key, device)
    if hit is not None:
        return hit
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    wdt = torch.float64  # built in float64, rounded once
    w = torch.arange(W, device=device, dtype=torch.int64)
    ky = torch.arange(m2, device=device, dtype=torch.int64)
    ang_w = (2 * math.pi / W) * ((ky[None, :] * w[:, None]) % W).to(wdt)  # (W, m2)
    fw = torch.stack([torch.cos(ang_w), -torch.sin(ang_w)], dim=-1).reshape(W, 2 * m2)
    c = torch.full((m2,), 2.0, device=device, dtype=wdt)
    c[0] = 1.0
    if W % 2 == 0 and W // 2 < m2:
        c[W // 2] = 1.0
    iw = torch.stack([c[:, None] * torch.cos(ang_w).T, -c[:, None] * torch.sin(ang_w).T], dim=1).reshape(2 * m2, W)
    h = torch.arange(H, device=device, dtype=torch.int64)
    f = torch.cat([torch.arange(m1, device=device), torch.arange(-m1, 0, device=device)]).to(torch.int64)
    ang_h = (2 * math.pi / H) * ((f[:, None] * h[None, :]) % H).to(wdt)  # (2*m1, H)
    eh = torch.polar(torch.full_like(ang_h, 1.0 / (H * W)), -ang_h)  # forward, "forward" norm
    eh_inv = torch.polar(torch.ones_like(ang_h), ang_h).T  # (H, 2*m1)
    out = (fw.to(dtype), eh.to(cdtype), eh_inv.to(cdtype).contiguous(), iw.to(dtype))
    return cache_put(_CACHE, _PINNED, key, out, _CACHE_MAX, device)


def spectral_conv2d_dft(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = spectral_conv2d_ref(x, weight) by matrix products (module docstring).

    x: (B, C_in, H, W) float32/float64, or bfloat16/float16 with a complex64 weight (the fast mode:
    the two grid-sized products run in x's 16-bit dtype on the tensor cores with float32
    accumulation, the mode-sized ones in complex64; y comes back in x's dtype); weight:
    (C_in, C_out, 2*m1, m2) complex64/complex128. Returns (B, C_out, H, W). Arguments are checked by
    :func:`irno_kernels.spectral_conv2d`. float32 products follow PyTorch's matmul precision setting
    (``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``): TF32 when
    the user allows it, full float32 otherwise.
    """
    with torch.autocast(x.device.type, enabled=False):  # the products in x's precision, as specified
        return _dft(x, weight)


def _dft(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    B, Ci, H, W = x.shape
    Co, m1, m2 = weight.shape[1], weight.shape[2] // 2, weight.shape[3]
    fw, eh, eh_inv, iw = dft_matrices(H, W, m1, m2, _real_dtype(weight), x.device)
    low = x.dtype in (torch.bfloat16, torch.float16)
    if low:  # grid-sized products in 16 bits (tensor cores), the rest in complex64
        fw, iw = fw.to(x.dtype), iw.to(x.dtype)
    T = torch.matmul(x.reshape(B * Ci * H, W), fw)
    T = torch.view_as_complex(T.float().view(B * Ci, H, m2, 2) if low else T.view(B * Ci, H, m2, 2))
    X = torch.matmul(eh, T).view(B, Ci, 2 * m1, m2)  # kept modes, rows 0..m1-1 then -m1..-1
    S = torch.einsum("bixy,ioxy->boxy", X, weight).reshape(B * Co, 2 * m1, m2)
    Sp = torch.matmul(eh_inv, S)  # (N, H, m2)
    Sr = torch.view_as_real(Sp).reshape(B * Co * H, 2 * m2)
    y = torch.matmul(Sr.to(x.dtype) if low else Sr, iw)
    return y.view(B, Co, H, W)
