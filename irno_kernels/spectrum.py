"""Radial energy spectrum and the progressive spectral loss (DESIGN sections 1 and 3.3).

With F = rfft2(x, norm="ortho") of a (B, C, H, W) field, fy = fftfreq(H) and fx = rfftfreq(W) in
cycles per sample, L = max(H, W) and |f| = sqrt(fy^2 + fx^2):

    shell_index(H, W)        r(f) = round(L * |f|), int64 (H, W//2+1); R = 1 + max r
    radial_spectrum(x)       E[b, c, r] = sum_{f in shell r} c(f) |F[b, c, f]|^2         (B, C, R)
                             c(f) = 2 on rfft columns other than 0 and (even W) W/2, else 1,
                             so that E.sum(-1) == (x ** 2).sum((-2, -1))  (Parseval)
    spectral_weights(H, W)   w(f) = 1 + (|f| / f0) ** lam, divided by its mean over (H, W//2+1)
    spectral_loss(p, y)      mean over the (B, C, H, W//2+1) entries, each once, of
                             w * (|F(p)| - |F(y)|)^2   (mode "magnitude")
                             w * |F(p - y)|^2          (mode "error")

The compiled kernels (csrc/spectrum.cpp) take the spectra from at::fft_rfft2 and reduce them in one
fused pass; their backward applies the adjoint of rfft2 (irfft2 with the non-edge columns halved).
"""

from __future__ import annotations

import math

import torch

from irno_kernels import _checks
from irno_kernels.backend import HAS_C, call_backward_op, no_second_derivative, resolve

__all__ = [
    "radial_spectrum", "radial_spectrum_ref", "spectral_loss", "spectral_loss_ref",
    "shell_index", "spectral_weights", "num_shells", "LOSS_MODES",
]

LOSS_MODES = ("magnitude", "error")


# ---------------------------------------------------------------------------------------------
# frequency grids
# ---------------------------------------------------------------------------------------------
def _freq_sq(H: int, W: int, device=None) -> torch.Tensor:
    """fy^2 + fx^2 in float64, (H, W//2+1), cycles per sample."""
    fy = torch.fft.fftfreq(H, dtype=torch.float64, device=device)
    fx = torch.fft.rfftfreq(W, dtype=torch.float64, device=device)
    return (fy * fy)[:, None] + (fx * fx)[None, :]


def shell_index(H: int, W: int, device=None) -> torch.Tensor:
    """Radial shell of every rfft2 entry: round(max(H, W) * |f|), int64 (H, W//2+1).

    On a square grid this is the rounded length of the integer wavenumber vector. Rounding is
    half-to-even (torch.round), computed in float64.
    """
    H, W = _grid("H", H), _grid("W", W)
    return torch.round(max(H, W) * torch.sqrt(_freq_sq(H, W, device))).to(torch.int64)


def num_shells(H: int, W: int) -> int:
    """R = 1 + shell_index(H, W).max(), from the corner frequency alone (r grows with |f|).

    Plain Python floats, so that fake kernels and traced code get R without touching a tensor;
    the arithmetic repeats torch.fft.fftfreq's (k * (1 / n)) so the result is the same bit for bit.
    """
    fy = (H // 2) * (1.0 / H)
    fx = (W // 2) * (1.0 / W)
    return 1 + round(max(H, W) * math.sqrt(fy * fy + fx * fx))


def _column_multiplicity(W: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """c per rfft column (W//2+1,): 2 for the columns that stand for a conjugate pair, else 1."""
    c = torch.full((W // 2 + 1,), 2.0, dtype=dtype, device=device)
    c[0] = 1.0
    if W % 2 == 0:
        c[-1] = 1.0
    return c


def spectral_weights(H: int, W: int, lam: float, f0: float = 0.5, device=None, dtype=None) -> torch.Tensor:
    """w(f) = 1 + (|f| / f0) ** lam over the rfft2 grid, divided by its mean: (H, W//2+1).

    Computed in float64 and returned in ``dtype`` (default: torch's default dtype).
    """
    H, W = _grid("H", H), _grid("W", W)
    lam, f0 = _check_lam_f0(lam, f0)
    w = 1.0 + (torch.sqrt(_freq_sq(H, W, device)) / f0) ** lam
    w = w / w.mean()
    return w.to(dtype if dtype is not None else torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------
# references (the specification)
# ---------------------------------------------------------------------------------------------
def radial_spectrum_ref(x: torch.Tensor) -> torch.Tensor:
    """Energy of rfft2(x, norm="ortho") per radial shell.  x: (B, C, H, W) -> (B, C, R), x's dtype."""
    B, C, H, W = x.shape
    F = torch.fft.rfft2(x, norm="ortho")
    energy = torch.view_as_real(F).square().sum(-1) * _column_multiplicity(W, x.device, x.dtype)
    idx = shell_index(H, W, x.device).flatten()
    out = x.new_zeros(B, C, num_shells(H, W))
    return out.index_add(-1, idx, energy.flatten(-2))


def spectral_loss_ref(pred: torch.Tensor, target: torch.Tensor, lam: float, f0: float = 0.5,
                      mode: str = "magnitude") -> torch.Tensor:
    """Weighted spectral loss (DESIGN section 1), a 0-D tensor in pred's dtype.

    pred, target: (B, C, H, W). Mean over the (B, C, H, W//2+1) rfft2 entries, each once, of
    w(f) * (|P| - |Y|)^2 ("magnitude") or w(f) * |P - Y|^2 ("error"), P = rfft2(pred, norm="ortho"),
    Y = rfft2(target, norm="ortho"), w = spectral_weights(H, W, lam, f0).
    """
    mode = _check_mode(mode)
    H, W = pred.shape[-2:]
    w = spectral_weights(H, W, lam, f0, device=pred.device, dtype=pred.dtype)
    P = torch.fft.rfft2(pred, norm="ortho")
    Y = torch.fft.rfft2(target, norm="ortho")
    if mode == "magnitude":
        err = (P.abs() - Y.abs()).square()
    else:
        err = torch.view_as_real(P - Y).square().sum(-1)
    return (w * err).mean()


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _grid(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name}: expected an int grid size, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name}: expected a grid size >= 1, got {n}")
    return n


def _check_mode(mode) -> str:
    if not isinstance(mode, str):
        raise TypeError(f"mode: expected a str, one of {LOSS_MODES}, got {type(mode).__name__}")
    if mode not in LOSS_MODES:
        raise ValueError(f"mode: expected one of {LOSS_MODES}, got {mode!r}")
    return mode


def _check_lam_f0(lam, f0) -> tuple[float, float]:
    lam = _checks.finite_scalar("lam", lam)
    f0 = _checks.finite_scalar("f0", f0)
    if lam < 0:
        raise ValueError(f"lam: expected a number >= 0, got {lam}")
    if f0 <= 0:
        raise ValueError(f"f0: expected a number > 0, got {f0}")
    return lam, f0


def _check_field(name: str, t) -> torch.Tensor:
    _checks.tensor(name, t, ndim=4, dtypes=_checks.FLOAT_DTYPES)  # 16-bit: see _checks.low_precision_backend
    return t


# ---------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------
def radial_spectrum(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Energy of rfft2(x, norm="ortho") per radial shell, differentiable.

    x: (B, C, H, W) float32/float64 -> (B, C, R), R = num_shells(H, W); the shells sum to
    (x ** 2).sum((-2, -1)). On CUDA tensors the "cuda" and "triton" backends also take
    bfloat16/float16 (computed in float32, returned in x's dtype; the CUDA kernel sums in float64).
    """
    _check_field("x", x)
    impl = resolve("radial_spectrum", x.device, backend, (x,))
    _checks.low_precision_backend("x", x, impl)
    if impl == "reference":
        return radial_spectrum_ref(x)
    if impl == "triton":
        from irno_kernels.triton import radial_spectrum as tr

        return tr(x)
    return torch.ops.irno.radial_spectrum(x)


def spectral_loss(pred: torch.Tensor, target: torch.Tensor, lam: float, f0: float = 0.5,
                  mode: str = "magnitude", *, backend: str | None = None) -> torch.Tensor:
    """Progressive spectral loss (a 0-D tensor), differentiable in pred and target.

    pred, target: (B, C, H, W), same shape, dtype (float32/float64; bfloat16/float16 on CUDA tensors
    with the "cuda" or "triton" backend) and device. lam >= 0 and f0 > 0 shape the weight
    w(f) = 1 + (|f| / f0) ** lam (normalised to mean 1); mode is "magnitude" (|P| - |Y|)^2 or
    "error" |P - Y|^2. See spectral_loss_ref for the definition.
    """
    _check_field("pred", pred)
    _check_field("target", target)
    _checks.same_device(pred=pred, target=target)
    _checks.same_dtype(pred=pred, target=target)
    _checks.same_shape(pred=pred, target=target)
    lam, f0 = _check_lam_f0(lam, f0)
    mode = _check_mode(mode)
    impl = resolve("spectral_loss", pred.device, backend, (pred, target))
    _checks.low_precision_backend("pred", pred, impl)
    if impl == "reference":
        return spectral_loss_ref(pred, target, lam, f0, mode)
    if impl == "triton":
        from irno_kernels.triton import spectral_loss as tr

        return tr(pred, target, lam, f0, mode)
    if torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad):
        # the op that also returns the spectra it read: the backward reuses them (no second rfft2).
        # Eager mode goes through a plain autograd.Function (the same formulas): the registered
        # op's Python autograd costs more than the kernels on a small field; torch.compile traces
        # the op and its registered autograd.
        if not torch.compiler.is_compiling():
            return _EagerSpectralLoss.apply(pred, target, lam, f0, mode)
        return torch.ops.irno.spectral_loss_spectra(pred, target, lam, f0, mode)[0]
    return torch.ops.irno.spectral_loss(pred, target, lam, f0, mode)


# ---------------------------------------------------------------------------------------------
# fake (meta) kernels and autograd of the compiled ops
# ---------------------------------------------------------------------------------------------
if HAS_C:

    @torch.library.register_fake("irno::radial_spectrum")
    def _radial_spectrum_fake(x):
        B, C, H, W = x.shape
        return x.new_empty(B, C, num_shells(int(H), int(W)))

    @torch.library.register_fake("irno::radial_spectrum_backward")
    def _radial_spectrum_backward_fake(grad, x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("irno::spectral_loss")
    def _spectral_loss_fake(pred, target, lam, f0, mode):
        return pred.new_empty(())

    @torch.library.register_fake("irno::spectral_loss_spectra")
    def _spectral_loss_spectra_fake(pred, target, lam, f0, mode):
        B, C, H, W = pred.shape
        cdtype = torch.complex128 if pred.dtype == torch.float64 else torch.complex64
        P = pred.new_empty((B, C, H, W // 2 + 1), dtype=cdtype)
        Y = pred.new_empty((B, C, H, W // 2 + 1) if mode == "magnitude" else (0,), dtype=cdtype)
        return pred.new_empty(()), P, Y

    @torch.library.register_fake("irno::spectral_loss_backward")
    def _spectral_loss_backward_fake(grad, pred, target, lam, f0, mode, wrt_target, spec_pred=None,
                                     spec_target=None):
        return torch.empty_like(pred, memory_format=torch.contiguous_format)

    def _radial_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _radial_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None
        return call_backward_op(torch.ops.irno.radial_spectrum_backward, grad, x)

    torch.library.register_autograd("irno::radial_spectrum", _radial_backward, setup_context=_radial_setup)
    # the backward ops' own derivatives are not written: a second backward through them raises
    no_second_derivative("irno::radial_spectrum_backward", "radial_spectrum", "compiled (cpu/cuda)")
    no_second_derivative("irno::spectral_loss_backward", "spectral_loss", "compiled (cpu/cuda)")

    def _loss_setup(ctx, inputs, output):
        pred, target, lam, f0, mode = inputs
        ctx.lam, ctx.f0, ctx.mode = lam, f0, mode
        ctx.save_for_backward(pred, target)

    def _loss_backward(ctx, grad):
        pred, target = ctx.saved_tensors
        need_pred, need_target = ctx.needs_input_grad[:2]
        args = (ctx.lam, ctx.f0, ctx.mode)
        gp = gt = None
        if need_pred:
            gp = call_backward_op(torch.ops.irno.spectral_loss_backward, grad, pred, target, *args, False)
        if need_target:
            if ctx.mode == "error" and gp is not None:
                gt = -gp  # |P - Y|^2 is symmetric: the target's gradient is the pred's, negated
            else:
                gt = call_backward_op(torch.ops.irno.spectral_loss_backward, grad, pred, target, *args, True)
        return gp, gt, None, None, None

    torch.library.register_autograd("irno::spectral_loss", _loss_backward, setup_context=_loss_setup)

    def _spectra_setup(ctx, inputs, output):
        pred, target, lam, f0, mode = inputs
        _, P, Y = output
        ctx.mark_non_differentiable(P, Y)
        ctx.lam, ctx.f0, ctx.mode = lam, f0, mode
        ctx.save_for_backward(pred, target, P, Y)

    def _spectra_backward(ctx, grad, _grad_P, _grad_Y):
        pred, target, P, Y = ctx.saved_tensors
        need_pred, need_target = ctx.needs_input_grad[:2]
        args = (ctx.lam, ctx.f0, ctx.mode)
        saved = (P, Y if ctx.mode == "magnitude" else None)
        gp = gt = None
        if need_pred or (need_target and ctx.mode == "error"):
            gp = call_backward_op(torch.ops.irno.spectral_loss_backward, grad, pred, target, *args, False, *saved)
        if need_target:
            if ctx.mode == "error":
                gt = -gp  # |P - Y|^2 is symmetric: the target's gradient is the pred's, negated
            else:
                gt = call_backward_op(torch.ops.irno.spectral_loss_backward, grad, pred, target, *args, True, *saved)
        return (gp if need_pred else None), gt, None, None, None

    torch.library.register_autograd("irno::spectral_loss_spectra", _spectra_backward, setup_context=_spectra_setup)

    class _EagerSpectralLoss(torch.autograd.Function):
        """spectral_loss_spectra with its registered autograd formulas, for eager mode."""

        @staticmethod
        def forward(ctx, pred, target, lam, f0, mode):
            with torch._C._AutoDispatchBelowAutograd():  # straight to the kernel (grad is off here)
                loss, P, Y = torch.ops.irno.spectral_loss_spectra(pred, target, lam, f0, mode)
            ctx.lam, ctx.f0, ctx.mode = lam, f0, mode
            ctx.save_for_backward(pred, target, P, Y)
            return loss

        @staticmethod
        def backward(ctx, grad):
            return _spectra_backward(ctx, grad, None, None)
