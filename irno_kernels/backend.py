"""Which backend serves which op, and the one function that decides it.

Backends, in order of preference per device:

    CUDA tensors: "cuda" (CUDA kernels in _C) > "triton" > "reference"
    CPU tensors:  "cpu"  (C++ kernels in _C)  > "reference"

and "dft" for spectral_conv2d: the truncated DFT as matrix products in PyTorch
(irno_kernels/spectral_dft.py), on any device when asked for, and in place of "cuda" for large fields
with few modes (a shape rule measured on an H100: irno_kernels.spectral_dft.prefer_dft; applied by
spectral_conv2d, so ``backends()`` still reports "cuda" for it).

"reference" is the pure-PyTorch specification of each op and is always there. A backend is forced
for one call with the ``backend=`` keyword of every op, or for the whole process with the
environment variable ``IRNO_BACKEND`` (read at each call, so tests can set it). Forcing a backend
that is absent raises a RuntimeError that says how to get it.
"""

from __future__ import annotations

import os
import warnings

import torch

from irno_kernels._checks import INT32_ELEMENTS, within

BACKENDS = ("reference", "cpu", "cuda", "triton", "dft")
#: ops with a "dft" implementation (pure PyTorch matrix products; automatic for large CUDA fields)
DFT_OPS = ("spectral_conv2d",)
ENV_VAR = "IRNO_BACKEND"

#: public op name -> name of the compiled op in torch.ops.irno
OPS = ("spectral_conv2d", "residual_update", "refine_update", "radial_spectrum", "spectral_loss",
       "channel_layer_norm", "periodic_pad2d", "periodic_upsample2x")
#: ops with kernels in the compiled module _C (channel_layer_norm, periodic_pad2d and periodic_upsample2x
#: have a reference and a Triton kernel)
C_OPS = OPS[:5]

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository root "
    "(CUDA kernels need a CUDA build of torch and nvcc; see README)"
)

try:
    from irno_kernels import _C  # noqa: F401  (loading it registers torch.ops.irno.*)

    HAS_C = True
    _C_ERROR: str | None = None
except ImportError as err:  # the package stays usable through the references
    HAS_C = False
    _C_ERROR = str(err)
    warnings.warn(
        f"irno_kernels._C is not built ({err}); every op runs its pure-PyTorch reference. To use the "
        f"C++/CUDA kernels, {_BUILD_HINT}.",
        stacklevel=2,
    )


# (op, dispatch key) pairs with a compiled kernel, read once: the registrations are fixed when _C
# loads, and a plain set lookup is something torch.compile can trace through.
_KERNELS = frozenset(
    (op, key)
    for op in C_OPS
    for key in ("CPU", "CUDA")
    if HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key(f"irno::{op}", key)
)
_TRITON_OPS: frozenset[str] | None = None

# Under torch.autocast the compiled kernels would see a mix of dtypes chosen by the ops they call
# inside (e.g. a bf16 matmul in the CPU spectral mixing); they are fp32 kernels, so autocast runs them
# in float32 with autocast off, as it does for its own fp32-list ops. Explicit bf16/fp16 inputs
# outside autocast still reach the CUDA kernels' low-precision paths.
if HAS_C:
    for _op in (*C_OPS, "spectral_loss_spectra"):
        for _dev in ("cpu", "cuda"):
            torch.library.register_autocast(f"irno::{_op}", _dev, torch.float32)


def _has_kernel(op: str, key: str) -> bool:
    return (op, key) in _KERNELS


def _triton_ops() -> frozenset[str]:
    """Ops that have a Triton kernel in irno_kernels.triton (empty when triton is absent)."""
    global _TRITON_OPS
    if _TRITON_OPS is None:
        try:
            from irno_kernels import triton as _tr

            _TRITON_OPS = frozenset(getattr(_tr, "OPS", ()))
        except ImportError:
            _TRITON_OPS = frozenset()
    return _TRITON_OPS


def available(op: str, backend: str, device: torch.device | str) -> bool:
    """Whether ``backend`` can run ``op`` on tensors of ``device``."""
    dev = device.type if isinstance(device, torch.device) else torch.device(device).type
    interp = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    key = (op, backend, dev, interp)
    found = _AVAILABLE.get(key)
    if found is None:
        found = _AVAILABLE[key] = _available(op, backend, dev, interp)
    return found


#: available()'s answers: they depend on the op, the backend, the device type and (for triton) the
#: interpreter switch only, all fixed once the extension and irno_kernels.triton are loaded, and the
#: choice runs before every op call (tens of them per refinement step)
_AVAILABLE: dict[tuple[str, str, str, bool], bool] = {}


def _available(op: str, backend: str, dev: str, interp: bool) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return dev == "cpu" and _has_kernel(op, "CPU")
    if backend == "cuda":
        return dev == "cuda" and _has_kernel(op, "CUDA")
    if backend == "dft":
        return op in DFT_OPS
    if backend == "triton":
        return (dev == "cuda" or (dev == "cpu" and interp)) and op in _triton_ops()
    return False


def has_tangent(tensors) -> bool:
    """Whether any tensor carries a forward-mode AD tangent (inside ``forward_ad.dual_level()``)."""
    if torch.autograd.forward_ad._current_level < 0:
        return False
    return any(isinstance(t, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
               for t in tensors)


def resolve(op: str, device: torch.device | str, backend: str | None = None, tensors=(), extra: int = 0) -> str:
    """The backend that serves ``op`` for tensors on ``device``.

    ``backend`` (or else ``$IRNO_BACKEND``) forces one; ``None``/"auto" picks the fastest present.
    The compiled and Triton kernels have no forward-mode AD formula: when ``tensors`` carry forward
    tangents, "auto" picks the reference (which has one) and a forced kernel raises. Triton serves
    ``tensors`` below ``TRITON_MAX_ELEMENTS`` and, when the op's Triton route makes a tensor larger
    than a few times its inputs (spectral_conv2d's output spectrum with many output channels),
    ``extra``, its number of elements, below 2^31 - 1; "auto" passes over it otherwise.
    """
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if not isinstance(device, torch.device):
        device = torch.device(device)
    forced = backend if backend is not None else os.environ.get(ENV_VAR) or None
    dual = has_tangent(tensors)
    if forced is not None and forced != "auto":
        if forced not in BACKENDS:
            src = "backend" if backend is not None else ENV_VAR
            raise ValueError(f"{src}: expected one of {('auto',) + BACKENDS}, got {forced!r}")
        if not available(op, forced, device):
            raise RuntimeError(_absent_message(op, forced, device))
        if dual and forced not in ("reference", "dft"):
            raise RuntimeError(f"irno backend {forced!r} has no forward-mode AD formula for {op}; use "
                               f"backend='reference' (or the automatic choice) under torch.autograd.forward_ad")
        if forced == "triton" and not _triton_fits(tensors, extra):
            made = (f", nor make one of {INT32_ELEMENTS} or more (this call makes {extra})"
                    if extra >= INT32_ELEMENTS else "")
            raise RuntimeError(f"irno backend 'triton' cannot run {op} on a tensor of {TRITON_MAX_ELEMENTS} elements "
                               f"or more, or a view reaching that far into its storage{made} (its kernels "
                               f"address with 32-bit offsets); use the automatic choice")
        return forced
    if dual:
        return "reference"
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in order:
        if available(op, name, device) and (name != "triton" or _triton_fits(tensors, extra)):
            return name
    return "reference"


#: inputs of a Triton kernel stay below this many elements (and reach no further in memory: a view of
#: a larger tensor counts by its strides): the kernels address with 32-bit offsets,
#: and an op's internal buffers (an rfft2 spectrum, a padded or upsampled output) can be up to a few
#: times its input (the ops with a larger output also check that: irno_kernels/pad.py, norm.py, and
#: spectral_conv.py through ``resolve``'s ``extra``)
TRITON_MAX_ELEMENTS = 1 << 29


def _triton_fits(tensors, extra: int = 0) -> bool:
    return extra < INT32_ELEMENTS and all(within(t, TRITON_MAX_ELEMENTS) for t in tensors
                                          if isinstance(t, torch.Tensor))


def _absent_message(op: str, backend: str, device: torch.device) -> str:
    where = f"irno backend {backend!r} cannot run {op} on {device.type} tensors"
    if backend in ("cpu", "cuda") and op not in C_OPS:
        return f"{where}: {op} has no compiled kernel (its backends are 'reference' and 'triton')"
    if backend in ("cpu", "cuda") and not HAS_C:
        return f"{where}: irno_kernels._C is not built ({_C_ERROR}); {_BUILD_HINT}"
    if backend == "cpu" and device.type != "cpu":
        return f"{where}: the 'cpu' backend takes CPU tensors only"
    if backend == "cuda" and device.type != "cuda":
        return f"{where}: the 'cuda' backend takes CUDA tensors only"
    if backend == "cuda":
        return f"{where}: _C was compiled without CUDA kernels for it; rebuild with IRNO_CUDA=1 ({_BUILD_HINT})"
    if backend == "dft":
        return f"{where}: the 'dft' backend serves {', '.join(DFT_OPS)} only"
    if backend == "triton":
        if not _triton_ops():
            return f"{where}: triton is not installed or irno_kernels.triton has no kernels"
        if op not in _triton_ops():
            return f"{where}: there is no Triton kernel for {op}"
        return f"{where}: Triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1"
    return f"{where}: no compiled kernel is registered for it; {_BUILD_HINT}"


def backends() -> dict[str, dict[str, str]]:
    """For each op, the backend the default choice uses on each device type.

    >>> backends()["residual_update"]
    {'cpu': 'cpu', 'cuda': 'reference'}   # on a CPU-only build
    """
    return {op: {dev: resolve(op, dev, "auto") for dev in ("cpu", "cuda")} for op in OPS}


# ---------------------------------------------------------------------------------------------
# second derivatives
# ---------------------------------------------------------------------------------------------
def no_second_derivative(backward_op, op: str, kernels: str) -> None:
    """Give ``backward_op`` ("namespace::name", or a torch.library.custom_op), a registered op that
    computes a first derivative of the public op ``op`` with ``kernels``, an autograd formula that
    raises a RuntimeError naming both and the way out (the reference's autograd).

    It only runs when a second backward reaches the op (a gradient recorded with create_graph=True,
    then differentiated): first derivatives are untouched. Without a formula a C++ op would get
    PyTorch's autograd fallback, which only warns and drops the gradients through it (silently wrong
    second derivatives); a torch.library.custom_op would raise a message that names no way out.
    """
    name = getattr(backward_op, "_qualname", backward_op)
    message = (f"irno: no second derivative of {op} with the {kernels} kernels ({name} has no "
               f"autograd formula); use backend='reference' for double backward (create_graph=True)")

    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(message)

    torch.library.register_autograd(backward_op, backward, setup_context=setup)


def call_backward_op(op, *args):
    """``op(*args)`` for a backward op given a formula by :func:`no_second_derivative`, called from a
    first derivative's formula. When grad mode is off (a plain backward, create_graph=False) the op
    runs below its autograd formula, as that formula's own no-grad path would (the formula's Python
    dispatch costs ~5 us a call on CPU); otherwise through it, so that a second backward raises."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        # compiling: dynamo cannot trace the dispatch guard (compiled autograd traces backward
        # formulas with it), and the trace records the op wherever it is called
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
