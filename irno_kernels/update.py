"""The refinement update h_{k+1} = h_k + alpha * Phi(x, h_k), plain and with Phi's last 1x1
projection fused in.

    residual_update(h, phi, alpha)            h + alpha * phi
    refine_update(h, z, weight, bias, alpha)  h + alpha * (conv1x1(z; weight, bias))

The fused form saves writing Phi's output to memory and reading it back. ``*_`` variants update h
in place and are meant for inference (they refuse tensors that require grad).
"""

from __future__ import annotations

import torch

from irno_kernels import _checks
from irno_kernels.backend import HAS_C, resolve

__all__ = [
    "residual_update", "residual_update_", "residual_update_ref",
    "refine_update", "refine_update_", "refine_update_ref",
]


# ---------------------------------------------------------------------------------------------
# references (the specification)
# ---------------------------------------------------------------------------------------------
def residual_update_ref(h: torch.Tensor, phi: torch.Tensor, alpha: float) -> torch.Tensor:
    """h + alpha * phi.  h, phi: (B, C, *spatial), same shape and dtype -> (B, C, *spatial)."""
    return h + alpha * phi


def refine_update_ref(h: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      alpha: float) -> torch.Tensor:
    """h + alpha * (conv1x1(z) + bias).

    h: (B, Co, *S); z: (B, F, *S) Phi's last features; weight: (Co, F); bias: (Co,) or None.
    Returns (B, Co, *S).
    """
    proj = torch.einsum("of,bf...->bo...", weight, z)
    if bias is not None:
        proj = proj + bias.view(1, -1, *([1] * (h.dim() - 2)))
    return h + alpha * proj


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_residual(h, phi, alpha) -> float:
    _checks.tensor("h", h, min_ndim=1)
    _checks.tensor("phi", phi, min_ndim=1)
    _checks.same_device(h=h, phi=phi)
    _checks.same_dtype(h=h, phi=phi)
    _checks.same_shape(h=h, phi=phi)
    return _checks.finite_scalar("alpha", alpha)


def _check_refine(h, z, weight, bias, alpha):
    """Validate and normalise: a conv weight (Co, F, 1, ..., 1) is accepted and flattened to (Co, F)."""
    _checks.tensor("h", h, min_ndim=2)
    _checks.tensor("z", z, min_ndim=2)
    _checks.tensor("weight", weight, min_ndim=2)
    if bias is not None:  # before same_device/same_dtype, which read its attributes
        _checks.tensor("bias", bias, ndim=1)
    _checks.same_device(h=h, z=z, weight=weight, bias=bias)
    _checks.same_dtype(h=h, z=z, weight=weight, bias=bias)
    if z.dim() != h.dim():
        raise ValueError(f"z: expected {h.dim()} dims like h, (B, F, *spatial), got shape {tuple(z.shape)}")
    if z.shape[0] != h.shape[0] or z.shape[2:] != h.shape[2:]:
        raise ValueError(f"z: expected shape ({h.shape[0]}, F, {', '.join(map(str, h.shape[2:]))}) "
                         f"matching h's batch and grid, got {tuple(z.shape)}")
    if weight.dim() > 2:
        if any(s != 1 for s in weight.shape[2:]):
            raise ValueError(f"weight: expected (C_out, F) or a 1x1 conv weight (C_out, F, 1, ...), "
                             f"got shape {tuple(weight.shape)}")
        weight = weight.reshape(weight.shape[0], weight.shape[1])
    if tuple(weight.shape) != (h.shape[1], z.shape[1]):
        raise ValueError(f"weight: expected shape ({h.shape[1]}, {z.shape[1]}) = (C_out of h, F of z), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != h.shape[1]:
        raise ValueError(f"bias: expected shape ({h.shape[1]},), got {tuple(bias.shape)}")
    return weight, _checks.finite_scalar("alpha", alpha)


def _refuse_grad(name: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{name} works in place for inference and has no backward; call it under "
                           f"torch.no_grad(), or use the out-of-place form under autograd")


# ---------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------
def residual_update(h: torch.Tensor, phi: torch.Tensor, alpha: float, *, backend: str | None = None):
    """h + alpha * phi, differentiable.  h, phi: (B, C, *spatial) -> (B, C, *spatial)."""
    alpha = _check_residual(h, phi, alpha)
    impl = resolve("residual_update", h.device, backend, (h, phi))
    if impl == "cpu" and backend is None and torch.is_grad_enabled() and (h.requires_grad or phi.requires_grad):
        # under autograd on CPU, ATen's add is as fast as the kernel and skips the Python-level
        # backward of a custom op: the automatic choice takes it (a forced "cpu" still runs the kernel)
        impl = "reference"
    if impl == "reference":
        return residual_update_ref(h, phi, alpha)
    if impl == "triton":
        from irno_kernels.triton import residual_update as tr

        return tr(h, phi, alpha)
    return torch.ops.irno.residual_update(h, phi, alpha)


def residual_update_(h: torch.Tensor, phi: torch.Tensor, alpha: float, *, backend: str | None = None):
    """h += alpha * phi in place (inference only); returns h."""
    alpha = _check_residual(h, phi, alpha)
    _refuse_grad("residual_update_", h, phi)
    impl = resolve("residual_update", h.device, backend, (h, phi))
    if not torch.compiler.is_compiling() and _partial_overlap(h, phi):
        # phi reads memory that h's update writes at other positions (a shifted view of h's buffer):
        # the kernels would read values already updated (and add_ refuses it), so phi is read from a copy
        phi = phi.clone()
    if impl in ("cpu", "cuda"):
        torch.ops.irno.residual_update_(h, phi, alpha)
    elif impl == "triton":
        from irno_kernels.triton import residual_update_ as tr

        tr(h, phi, alpha)
    else:
        h.add_(phi, alpha=alpha)
    return h


def _partial_overlap(h: torch.Tensor, phi: torch.Tensor) -> bool:
    """phi shares memory with h other than element for element (phi is not h itself, or the same view)."""
    same = (phi.data_ptr() == h.data_ptr() and phi.shape == h.shape and phi.stride() == h.stride()
            and phi.dtype == h.dtype)
    return not same and torch._C._overlaps(h, phi)


def refine_update(h: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  alpha: float, *, backend: str | None = None) -> torch.Tensor:
    """h + alpha * (conv1x1(z; weight) + bias), fused; differentiable in h, z, weight and bias.

    h: (B, Co, *S); z: (B, F, *S); weight: (Co, F) or (Co, F, 1, 1); bias: (Co,) or None.
    """
    weight, alpha = _check_refine(h, z, weight, bias, alpha)
    impl = resolve("refine_update", h.device, backend, (h, z, weight, bias))
    if impl == "reference":
        return refine_update_ref(h, z, weight, bias, alpha)
    if impl == "triton":
        from irno_kernels.triton import refine_update as tr

        return tr(h, z, weight, bias, alpha)
    return torch.ops.irno.refine_update(h, z, weight, bias, alpha)


def refine_update_(h: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   alpha: float, *, backend: str | None = None) -> torch.Tensor:
    """In-place ``refine_update`` for inference; returns h."""
    weight, alpha = _check_refine(h, z, weight, bias, alpha)
    _refuse_grad("refine_update_", h, z, weight, bias)
    impl = resolve("refine_update", h.device, backend, (h, z, weight, bias))
    if impl == "triton" and not torch.compiler.is_compiling() and torch._C._overlaps(h, z):
        # z shares memory with h: a Triton program could write positions another one has yet to read
        # in z. The C++ and CUDA kernels check this themselves (csrc/update.cpp, csrc/update.cu).
        # Compiled, the functionalised op reads a copy of h already.
        z = z.clone()
    if impl in ("cpu", "cuda"):
        torch.ops.irno.refine_update_(h, z, weight, bias, alpha)
    elif impl == "triton":
        from irno_kernels.triton import refine_update_ as tr

        tr(h, z, weight, bias, alpha)
    else:
        h.copy_(refine_update_ref(h, z, weight, bias, alpha))
    return h


# ---------------------------------------------------------------------------------------------
# fake (meta) kernels and autograd of the compiled ops
# ---------------------------------------------------------------------------------------------
def _refine_grads(grad, z, weight, alpha, need):
    """Gradients of h + alpha*(W z + b) for one grad (B, Co, *S)."""
    B, Co = grad.shape[:2]
    g = grad.reshape(B, Co, -1)
    gz = gw = gb = None
    if need[1]:
        # alpha folded into the small weight: no extra pass over the (B, F, N) result
        gz = torch.matmul(weight.t().to(g.dtype) * alpha, g).reshape(z.shape)
    if need[2]:
        # a batched GEMM then a sum over the batch is ~5x faster on CPU than one einsum over (b, n)
        gw = torch.bmm(g, z.reshape(B, z.shape[1], -1).transpose(1, 2).to(g.dtype)).sum(0).mul_(alpha)
    if need[3]:
        gb = g.sum(dim=(0, 2)).mul_(alpha)
    return gz, gw, gb


if HAS_C:

    @torch.library.register_fake("irno::residual_update")
    def _residual_update_fake(h, phi, alpha):
        return torch.empty_like(h, memory_format=torch.contiguous_format)

    @torch.library.register_fake("irno::residual_update_")
    def _residual_update_inplace_fake(h, phi, alpha):
        return None

    @torch.library.register_fake("irno::refine_update")
    def _refine_update_fake(h, z, weight, bias, alpha):
        return torch.empty_like(h, memory_format=torch.contiguous_format)

    @torch.library.register_fake("irno::refine_update_")
    def _refine_update_inplace_fake(h, z, weight, bias, alpha):
        return None

    def _residual_setup(ctx, inputs, output):
        ctx.alpha = inputs[2]

    def _residual_backward(ctx, grad):
        return grad, grad * ctx.alpha, None

    torch.library.register_autograd("irno::residual_update", _residual_backward, setup_context=_residual_setup)

    def _refine_setup(ctx, inputs, output):
        h, z, weight, bias, alpha = inputs
        ctx.alpha = alpha
        ctx.has_bias = bias is not None
        ctx.save_for_backward(z, weight)

    def _refine_backward(ctx, grad):
        z, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gz, gw, gb = _refine_grads(grad, z, weight, ctx.alpha, need)
        return (grad if need[0] else None), gz, gw, (gb if ctx.has_bias else None), None

    torch.library.register_autograd("irno::refine_update", _refine_backward, setup_context=_refine_setup)
