"""The 2-D spectral convolution of a Fourier neural operator layer (DESIGN 3.1).

    y = irfft2(Mix(rfft2(x)), s=(H, W)),   Mix: out[b, o, kx, ky] = sum_i X[b, i, kx, ky] * W[i, o, kx, ky]

on the kept modes and zero elsewhere. Shapes: x (B, C_in, H, W) real; weight (C_in, C_out, 2*m1, m2)
complex; y (B, C_out, H, W). Rows 0..m1-1 of the weight act on the H-frequencies 0..m1-1, rows
m1..2*m1-1 on -m1..-1; columns act on the rfft frequencies 0..m2-1 along W. The modes must fit the
grid: 1 <= m1, 2*m1 <= H, 1 <= m2 <= W//2 + 1.

FFT normalisation: ``FFT_NORM = "forward"``, i.e. rfft2 divides by H*W and irfft2 does not. This is
the default ``fft_norm`` of neuraloperator's ``SpectralConv`` (neuralop/layers/spectral_convolution.py,
``fft_norm="forward"`` in ``SpectralConv.__init__``, checked against neuraloperator 2.0.0), so a weight
trained there gives the same output here after a pure re-layout: ``weight_from_neuralop`` and
``weight_to_neuralop`` convert between the two layouts. The compiled kernels hard-code this
normalisation; the reference reads the constant.

Complex gradients follow PyTorch's convention (grad = dL/dRe + i dL/dIm), so the weight trains with
any torch optimiser exactly as the reference would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from irno_kernels import _checks
from irno_kernels.backend import ENV_VAR, HAS_C, call_backward_op, no_second_derivative, resolve

__all__ = [
    "FFT_NORM", "spectral_conv2d", "spectral_conv2d_ref", "weight_from_neuralop", "weight_to_neuralop",
]

#: normalisation of the forward/inverse FFT pair; neuraloperator's SpectralConv default
FFT_NORM = "forward"


# ---------------------------------------------------------------------------------------------
# reference (the specification)
# ---------------------------------------------------------------------------------------------
def hermitian_edges(S: torch.Tensor, W: int, m2: int | None = None) -> torch.Tensor:
    """The rfft2 spectrum S (..., H, W//2+1) with its self-conjugate columns made Hermitian along H.

    Columns ky = 0 and (for even W) ky = W/2 hold the Fourier coefficients of real rows, so a real
    field has S[-kx, ky] = conj(S[kx, ky]) there. A mixed spectrum breaks that, and irfft2 of such
    input is implementation-defined: pocketfft (CPU) returns Re(ifft2) of the one-sided spectrum,
    cuFFT (e.g. 256 x 256) need not. Replacing those columns by their Hermitian part
    (S[kx] + conj(S[-kx])) / 2 changes nothing under the Re(ifft2) reading and makes every FFT library
    agree with it, and with the gradients autograd and the kernels compute. Only columns < m2 (the
    kept ones; the rest are zero) are touched. Out of place; differentiable.
    """
    Wr = S.shape[-1]
    m2 = Wr if m2 is None else m2
    n_cols = 2 if W % 2 == 0 and 0 < W // 2 < min(m2, Wr) else 1
    H = S.shape[-2]
    # indices made on the device (no host-to-device copy, so this can run inside CUDA-graph capture)
    flip = (-torch.arange(H, device=S.device)) % H
    idx = torch.arange(n_cols, device=S.device) * (W // 2)  # columns 0 (and W/2)
    edge = S.index_select(-1, idx)
    # conj_physical, not the lazy conj: the conjugate bit was seen dropped when this runs inside a
    # custom op under AOT dispatch
    edge = 0.5 * (edge + torch.conj_physical(edge.index_select(-2, flip)))
    return S.index_copy(-1, idx, edge)


def spectral_conv2d_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = irfft2(Mix(rfft2(x, norm=FFT_NORM)), s=(H, W), norm=FFT_NORM), in pure PyTorch.

    x: (B, C_in, H, W) float32/float64; weight: (C_in, C_out, 2*m1, m2) complex64/complex128.
    Returns y: (B, C_out, H, W) of x's dtype. The spectrum of x is (B, C_in, H, W//2+1); the
    corner blocks [:m1, :m2] (frequencies 0..m1-1) and [H-m1:, :m2] (frequencies -m1..-1) are mixed
    with weight rows [:m1] and [m1:]; every other mode of the output spectrum is zero.
    """
    B, _, H, W = x.shape
    m1, m2 = weight.shape[2] // 2, weight.shape[3]
    X = torch.fft.rfft2(x, norm=FFT_NORM)
    out = torch.zeros(B, weight.shape[1], H, W // 2 + 1, dtype=X.dtype, device=x.device)
    out[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", X[:, :, :m1, :m2], weight[:, :, :m1])
    out[:, :, H - m1:, :m2] = torch.einsum("bixy,ioxy->boxy", X[:, :, H - m1:, :m2], weight[:, :, m1:])
    return torch.fft.irfft2(hermitian_edges(out, W, m2), s=(H, W), norm=FFT_NORM)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check(x, weight, modes) -> None:
    _checks.tensor("x", x, ndim=4, dtypes=_checks.FLOAT_DTYPES)  # 16-bit: see _checks.low_precision_backend
    _checks.tensor("weight", weight, ndim=4, dtypes=None)
    _checks.same_device(x=x, weight=weight)
    want = _checks.COMPLEX_OF[x.dtype]
    if not weight.is_complex():
        raise TypeError(f"weight: expected a complex tensor ({want} for {x.dtype} x), got {weight.dtype}")
    if weight.dtype != want:
        raise ValueError(f"weight: expected dtype {want} (the complex dtype of x's {x.dtype}), got {weight.dtype}")
    B, Ci, H, W = x.shape
    if weight.shape[0] != Ci:
        raise ValueError(f"weight: expected C_in = {Ci} (x.shape[1]) along dim 0 of (C_in, C_out, 2*m1, m2), "
                         f"got shape {tuple(weight.shape)}")
    k1, m2 = weight.shape[2], weight.shape[3]
    if k1 % 2:
        raise ValueError(f"weight: expected an even size 2*m1 along dim 2, got shape {tuple(weight.shape)}")
    if k1 > H:
        raise ValueError(f"weight: 2*m1 = {k1} modes along H need H >= {k1}, got x with H = {H}")
    if m2 > W // 2 + 1:
        raise ValueError(f"weight: m2 = {m2} modes along W need m2 <= W//2+1 = {W // 2 + 1} (x has W = {W})")
    if modes is not None:
        if isinstance(modes, int):
            got = (modes, modes)
        elif isinstance(modes, Sequence) and len(modes) == 2:
            got = tuple(modes)
        else:
            raise TypeError(f"modes: expected an int or a pair (m1, m2), got {modes!r}")
        if got != (k1 // 2, m2):
            raise ValueError(f"modes: expected (m1, m2) = {(k1 // 2, m2)} from weight's shape "
                             f"{tuple(weight.shape)}, got {modes!r}")


# ---------------------------------------------------------------------------------------------
# public op
# ---------------------------------------------------------------------------------------------
def _forced(backend: str | None) -> bool:
    """Whether the caller (keyword or $IRNO_BACKEND) named a backend rather than the automatic choice."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    return name not in (None, "auto")


def _spectrum_elements(x: torch.Tensor, weight: torch.Tensor) -> int:
    """Real values of the largest spectrum the Triton route addresses: (B, max(C_in, C_out), H, W//2+1)
    complex (the output spectrum and, in the backward, grad_y's have C_out channels: with
    C_out > C_in they pass the 32-bit reach long before x does)."""
    B, Ci, H, W = x.shape
    return 2 * B * max(Ci, weight.shape[1]) * H * (W // 2 + 1)


def spectral_conv2d(x: torch.Tensor, weight: torch.Tensor, modes: int | Sequence[int] | None = None, *,
                    backend: str | None = None) -> torch.Tensor:
    """Spectral convolution y = irfft2(Mix(rfft2(x))), differentiable in x and weight.

    x: (B, C_in, H, W) float32/float64; weight: (C_in, C_out, 2*m1, m2) complex64/complex128
    (the complex dtype of x's precision). On CUDA tensors the "cuda" and "triton" backends also take
    bfloat16 / float16 x with a complex64 weight (computed in float32, y in x's dtype). ``modes``,
    when given, is (m1, m2) (or one int for both) and must match the weight's shape; it only guards
    against a weight of the wrong layout.
    Returns (B, C_out, H, W). ``backend`` forces "reference", "cpu", "cuda", "triton" or "dft" (the
    truncated DFT as matrix products, :mod:`irno_kernels.spectral_dft`). The automatic choice on
    CUDA tensors is the dft route for large fields with few modes
    (:func:`irno_kernels.spectral_dft.prefer_dft`: it was measured faster there), else "cuda". On
    the dft route float32 products follow PyTorch's matmul precision (TF32 when
    ``torch.backends.cuda.matmul.allow_tf32`` is set) and 16-bit x runs 16-bit products (see
    :func:`irno_kernels.spectral_dft.spectral_conv2d_dft` for its precision).
    """
    _check(x, weight, modes)
    impl = resolve("spectral_conv2d", x.device, backend, (x, weight), extra=_spectrum_elements(x, weight))
    if impl == "cuda" and not _forced(backend):
        from irno_kernels.spectral_dft import prefer_dft

        if prefer_dft(x, weight):
            impl = "dft"
    _checks.low_precision_backend("x", x, impl)
    if impl == "reference":
        return spectral_conv2d_ref(x, weight)
    if impl == "dft":
        from irno_kernels.spectral_dft import spectral_conv2d_dft

        return spectral_conv2d_dft(x, weight)
    if impl == "triton":
        from irno_kernels.triton import spectral_conv2d as tr

        return tr(x, weight)
    return torch.ops.irno.spectral_conv2d(x, weight)


# ---------------------------------------------------------------------------------------------
# neuraloperator weights
# ---------------------------------------------------------------------------------------------
def _dense(weight) -> torch.Tensor:
    """A plain tensor from a tensor or a tensorly-torch factorised tensor (``.to_tensor()``)."""
    if not isinstance(weight, torch.Tensor) and hasattr(weight, "to_tensor"):
        weight = weight.to_tensor()
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor or a factorised tensor with .to_tensor(), "
                        f"got {type(weight).__name__}")
    return weight


def _freqs_neuralop(n1: int) -> list[int]:
    """H-frequency of each row of a neuraloperator weight with n1 rows (centred, fftshift order)."""
    return [j - n1 // 2 for j in range(n1)]


def weight_from_neuralop(weight) -> torch.Tensor:
    """Map a neuraloperator ``SpectralConv`` dense 2-D weight to this layout.

    weight: (C_in, C_out, n1, n2//2+1) complex, as stored by ``SpectralConv(C_in, C_out,
    n_modes=(n1, n2))`` (``conv.weight``; a tensorly-torch DenseTensor is accepted too). Its rows are
    centred: row j holds H-frequency j - n1//2 (neuraloperator fftshifts the H axis and slices around
    the middle); its columns are the rfft frequencies 0..n2//2 (it halves the last mode count).
    Returns (C_in, C_out, 2*m1, n2//2+1) with m1 = ceil(n1/2): for an even n1 a pure re-ordering of
    the rows; for an odd n1 the row of frequency -m1, which neuraloperator does not have, is zero.
    ``spectral_conv2d(x, weight_from_neuralop(conv.weight))`` equals ``conv(x)`` without its bias
    when the modes fit the grid (n1 <= H and n2//2+1 <= W//2+1, 2*m1 <= H), ``conv`` uses all of
    its stored modes (n_modes == max_n_modes) and H is even: neuraloperator 2.0.0 undoes its
    fftshift with a second fftshift, which for an odd H rolls its output spectrum by one row.
    """
    w = _dense(weight)
    _checks.tensor("weight", w, ndim=4, dtypes=(torch.complex64, torch.complex128))
    n1 = w.shape[2]
    m1 = (n1 + 1) // 2
    rows = torch.tensor([f % (2 * m1) for f in _freqs_neuralop(n1)], device=w.device)
    out = w.new_zeros(w.shape[0], w.shape[1], 2 * m1, w.shape[3])
    out[:, :, rows] = w.detach()
    return out


def weight_to_neuralop(weight: torch.Tensor, n_modes: Sequence[int]) -> torch.Tensor:
    """Map a weight of this layout to a neuraloperator ``SpectralConv`` weight for ``n_modes``.

    weight: (C_in, C_out, 2*m1, m2) complex; n_modes: (n1, n2), the ``n_modes`` given to
    ``SpectralConv`` (neuraloperator stores n2//2+1 columns). Returns (C_in, C_out, n1, n2//2+1)
    in neuraloperator's centred row order; assign it with ``conv.weight.data.copy_(...)``.
    Modes that neuraloperator keeps and this weight lacks are zero; modes this weight has and
    neuraloperator cannot hold must be zero, else ValueError (the conversion would lose them).
    """
    w = _dense(weight)
    _checks.tensor("weight", w, ndim=4, dtypes=(torch.complex64, torch.complex128))
    if isinstance(n_modes, int) or len(n_modes) != 2 or not all(isinstance(n, int) and n >= 1 for n in n_modes):
        raise ValueError(f"n_modes: expected two positive ints (n1, n2) as given to SpectralConv, got {n_modes!r}")
    if w.shape[2] % 2:
        raise ValueError(f"weight: expected an even size 2*m1 along dim 2, got shape {tuple(w.shape)}")
    n1, n2 = n_modes
    c2 = n2 // 2 + 1
    m1, m2 = w.shape[2] // 2, w.shape[3]
    theirs = _freqs_neuralop(n1)
    ours = list(range(m1)) + list(range(-m1, 0))
    lost_rows = [r for r, f in enumerate(ours) if f not in theirs]
    lost = w[:, :, lost_rows].abs().amax().item() if lost_rows else 0.0
    if m2 > c2:
        lost = max(lost, w[:, :, :, c2:].abs().amax().item())
    if lost > 0:
        raise ValueError(f"n_modes: {tuple(n_modes)} (H-frequencies {theirs[0]}..{theirs[-1]}, {c2} columns) "
                         f"cannot hold this weight's modes (H-frequencies {-m1}..{m1 - 1}, {m2} columns), "
                         f"and the modes it would drop are not zero")
    out = w.new_zeros(w.shape[0], w.shape[1], n1, c2)
    keep = min(m2, c2)
    for j, f in enumerate(theirs):
        if -m1 <= f < m1:
            out[:, :, j, :keep] = w[:, :, f % (2 * m1), :keep].detach()
    return out


# ---------------------------------------------------------------------------------------------
# fake (meta) kernels and autograd of the compiled ops
# ---------------------------------------------------------------------------------------------
if HAS_C:

    @torch.library.register_fake("irno::spectral_conv2d")
    def _spectral_conv2d_fake(x, weight):
        B, _, H, W = x.shape
        return x.new_empty((B, weight.shape[1], H, W))

    @torch.library.register_fake("irno::spectral_conv2d_backward")
    def _spectral_conv2d_backward_fake(grad_y, x, weight):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    def _spectral_conv2d_setup(ctx, inputs, output):
        x, weight = inputs
        ctx.save_for_backward(x, weight)

    def _spectral_conv2d_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad
        if not (need_x or need_w):
            return None, None
        gx, gw = call_backward_op(torch.ops.irno.spectral_conv2d_backward, grad, x, weight)
        return (gx if need_x else None), (gw if need_w else None)

    torch.library.register_autograd(
        "irno::spectral_conv2d", _spectral_conv2d_backward, setup_context=_spectral_conv2d_setup
    )
    # the backward op's own derivatives are not written: a second backward through it raises
    no_second_derivative("irno::spectral_conv2d_backward", "spectral_conv2d", "compiled (cpu/cuda)")
