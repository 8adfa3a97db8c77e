"""Pieces shared by the Triton kernels: the interpreter switch, launch helpers and op registration.

Every Triton op is a torch.library op in the ``irno_triton`` namespace with a fake (meta) kernel and
an autograd formula, so torch.compile and CUDA-graph capture see through it.

Registration differs by how triton runs:

* compiled (a GPU): ``torch.library.triton_op`` + ``wrap_triton``. The fake kernel is the Python
  body itself, traced with fake tensors, and Inductor sees the kernels inside.
* interpreted (``TRITON_INTERPRET=1``, CPU tensors): ``torch.library.custom_op`` + an explicit fake.
  ``triton_op`` cannot work there: its fake kernel runs the body on fake tensors, and the
  interpreter reads their data pointers (torch 2.13 / triton 3.9; opcheck and torch.compile fail).

Launch configurations are fixed per shape class (no autotuning: kernels get captured in CUDA graphs).
Triton compiles a kernel once per combination of integer arguments equal to 1 or divisible by 16
(0.5-2 s each). Arguments that only bound masks or split the program id (channel counts, the number
of rows, block counts: ``UNSPECIALISED``) are excluded with ``do_not_specialize``, so that the
U-Net's kernels, called at every level of every field shape, compile fewer variants; strides and
the row length keep it, since they decide whether loads are vectorised.
The interpreter's cost grows with the number of programs, so there blocks are as large as the data.
"""

from __future__ import annotations

import torch
import triton
from torch.fx.experimental.proxy_tensor import get_proxy_mode

NAMESPACE = "irno_triton"


@triton.jit
def _probe():
    pass


#: integer kernel arguments never specialised on (the module docstring; checked by the tests)
UNSPECIALISED = frozenset({"C", "CO", "F", "S1", "nblk", "ncblk", "nchunk", "chunk"})

#: True when triton.jit gives interpreted functions (TRITON_INTERPRET was set before triton loaded).
INTERPRET = type(_probe).__name__ == "InterpretedFunction"


def register(name: str, fake, mutates_args=()):
    """Decorator: make ``fn`` the op ``irno_triton::<name>`` (see the module docstring)."""

    def deco(fn):
        qualname = f"{NAMESPACE}::{name}"
        if INTERPRET:
            op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
            op.register_fake(fake)
        else:
            op = torch.library.triton_op(qualname, fn, mutates_args=mutates_args)
        return op

    return deco


#: tensor types a kernel can read in eager mode. nn.Parameter counts as plain: a module's weights
#: arrive as Parameters (autograd.Function passes them through), and Parameter(FakeTensor) keeps the
#: FakeTensor type, so a Parameter always holds real data.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tracing(args) -> bool:
    """Whether a launch with these arguments is being traced (torch.compile, make_fx, fake or
    functional tensors), so that it must go through ``wrap_triton`` to be recorded."""
    if torch.compiler.is_compiling() or get_proxy_mode() is not None:
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN for a in args)


def launch(kernel, grid, *args, fp_fusion: bool = True, **meta):
    """Run ``kernel`` on ``grid``; under tracing (make_fx, torch.compile) through ``wrap_triton`` so
    that the trace records it, in eager mode straight through triton's launcher: ``wrap_triton``
    dispatches a higher-order op per launch even in eager mode, a fixed cost of the order of the
    kernel's own time on small fields.

    Contraction of a*b + c into an fma is always requested explicitly (triton 3.9 warns about the
    implicit default, which later versions turn off); kernels that must round like torch, op for
    op, pass ``fp_fusion=False``.
    """
    if _tracing(args):
        torch.library.wrap_triton(kernel)[grid](*args, enable_fp_fusion=fp_fusion, **meta)
    else:
        kernel[grid](*args, enable_fp_fusion=fp_fusion, **meta)


def pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1), in plain Python (triton.next_power_of_2 goes through a
    constexpr-function wrapper: microseconds per call on the launch path)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints, in plain Python (see pow2)."""
    return -(-a // b)


def is_f64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """A (B, C, S1, S2) view of a (B, C, *S) tensor (of an (N,) one as (1, 1, 1, N)).

    Kernels address the four dims through strides, so transposed and sliced inputs are read in
    place; only a tensor with more than two spatial dims that cannot be merged into one is copied.
    """
    if t.dim() == 1:
        return t.view(1, 1, 1, -1)
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        return t[:, :, None, :]
    if t.dim() == 4:
        return t
    return t.flatten(2, -2)

