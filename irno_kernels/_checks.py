"""Argument checks shared by the op wrappers: each error names the argument, what was expected
and what was received, and is raised before any kernel runs."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
COMPLEX_OF = {
    torch.float32: torch.complex64,
    torch.float64: torch.complex128,
    torch.bfloat16: torch.complex64,
    torch.float16: torch.complex64,
}


def tensor(name: str, t, *, ndim: int | tuple[int, ...] | None = None, min_ndim: int | None = None,
           dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Check that ``t`` is a non-empty tensor of an allowed rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name}: expected a {want}-D tensor, got shape {tuple(t.shape)} ({t.dim()}-D)")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
    return t


def same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.device != v0.device:
            raise RuntimeError(f"{k}: expected a tensor on {v0.device} (the device of {k0}), got {v.device}")


def same_dtype(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.dtype != v0.dtype:
            raise ValueError(f"{k}: expected dtype {v0.dtype} (the dtype of {k0}), got {v.dtype}")


def same_shape(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.shape != v0.shape:
            raise ValueError(f"{k}: expected shape {tuple(v0.shape)} (the shape of {k0}), got {tuple(v.shape)}")


def finite_scalar(name: str, value) -> float:
    """``value`` as a finite float: an int, a float, a numpy scalar or a 0-d tensor (not a string,
    which float() would parse)."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    return v


def low_precision_backend(name: str, t: torch.Tensor, backend: str) -> None:
    """bfloat16/float16 fields of the spectral ops run on the CUDA and Triton kernels (stored in 16
    bits, computed in float32) and, for spectral_conv2d, on the "dft" route (16-bit matrix
    products): the references and the C++ CPU kernels take float32/float64."""
    if t.dtype in LOW_PRECISION and backend not in ("cuda", "triton", "dft"):
        raise ValueError(
            f"{name}: expected dtype in ['torch.float32', 'torch.float64'] for the {backend!r} backend "
            f"(bfloat16 and float16 run on CUDA tensors with the 'cuda' or 'triton' backend, and on the "
            f"'dft' route of spectral_conv2d), got {t.dtype}"
        )


def channels_last_like(t: torch.Tensor) -> bool:
    """True for a 4-D t laid out channels-last, dense or not: its channel stride is the smallest.

    A view cropped out of a channels-last tensor (the U-Net's upsampled, cropped fields) is neither
    contiguous nor channels-last contiguous, but what is made from it should stay channels-last:
    made NCHW, every conv after it ran NCHW (cuDNN transposing its input each time) in a
    channels-last net.
    """
    if t.dim() != 4 or t.shape[1] < 2 or t.is_contiguous():
        return False
    return all(t.stride(1) < t.stride(d) for d in (2, 3) if t.shape[d] > 1)


#: elements a Triton kernel of this project addresses with 32-bit offsets (program ids, strides)
INT32_ELEMENTS = (1 << 31) - 1


def reach(t: torch.Tensor) -> int:
    """Elements from a tensor's first element to its last in memory, plus one: how far a kernel that
    addresses it by its strides reaches (a view of a larger tensor reaches beyond its numel)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def within(t: torch.Tensor, limit: int) -> bool:
    """Whether t's elements and its reach in memory (``reach``) are both below ``limit`` (a contiguous
    tensor reaches exactly its numel: the common case skips the strides' sum, on the launch path)."""
    return t.numel() < limit and (t.is_contiguous() or reach(t) < limit)


def int32_addressable(*tensors: torch.Tensor, extra: int = 0) -> bool:
    """Whether every tensor (its numel and its reach in memory, see ``reach``) and an output of
    ``extra`` elements stay below 2^31 - 1, the reach of the Triton kernels' 32-bit offsets; larger
    fields go to the reference."""
    return all(within(t, INT32_ELEMENTS) for t in tensors) and extra < INT32_ELEMENTS
