"""Pieces shared by the Triton kernels: the interpreter switch, launch helpers and op registration.

Every Triton op is a torch.library op in the ``irno_triton`` namespace with a fake (meta) kernel and
an autograd formula, so torch.compile and CUDA-graph capture see through it. In eager mode the
public functions skip the ops (``with_autograd``, ``mutate``): an op's Python dispatch and Python
autograd node cost ~80-100 us per call on an H200, several times a small field's kernels.

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
UNSPECIALISED = frozenset({"C", "C2", "CO", "F", "S1", "nblk", "ncblk", "ncblk2", "nchunk", "chunk"})

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
    functional tensors), so that it must go through ``wrap_triton`` to be recorded. Meta tensors
    count too: they hold no data to launch on (the public functions then call the registered op,
    whose fake kernel gives the result's shape)."""
    if torch.compiler.is_compiling() or get_proxy_mode() is not None:
        return True
    return any(isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.is_meta) for a in args)


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


# ---------------------------------------------------------------------------------------------
# eager fast path: the registered ops' functions and autograd formulas without their dispatch
# ---------------------------------------------------------------------------------------------
def with_autograd(op, fn, setup, backward):
    """Give ``op`` (registered from ``fn``) the autograd formula ``setup``/``backward``, and return
    the function the public entry point calls with the op's arguments:

    * ``op`` itself whenever anything traces (torch.compile, make_fx, fake or meta tensors:
      ``_tracing``): Inductor and the fake kernels must see the op;
    * in eager mode, ``fn`` when no input needs a gradient, else an autograd.Function whose forward
      is ``fn`` followed by ``setup`` and whose backward is ``backward``: the same kernels and
      formulas without the op's dispatch. Its ctx is marked ``eager`` (see ``backward_fn``).
    """
    op.register_autograd(backward, setup_context=setup)

    def forward(ctx, *args):
        out = fn(*args)
        setup(ctx, args, out)
        ctx.eager = True
        return out

    name = "_Eager" + "".join(w.capitalize() for w in fn.__name__.split("_"))
    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward),
                     "__doc__": f"{fn.__name__} and its registered op's autograd, without the op (eager mode)."})

    def call(*args):
        if _tracing(args):
            return op(*args)
        if torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return function.apply(*args)
        return fn(*args)

    return call


def needs_autograd(tensors) -> bool:
    """Whether a call on ``tensors`` (None entries skipped) must go through an autograd.Function: grad
    mode is on and one of them requires grad, or a forward-mode AD level is open (a tangent needs the
    Function's jvp)."""
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def backward_fn(ctx, fn, op):
    """The function a registered backward calls to compute a gradient: ``fn``, the plain function
    of the backward op ``op``, in the backward of an eager autograd.Function (``with_autograd``'s,
    or a hand-written one that marks its ctx ``eager`` and shares the op's formula), unless that
    backward is recorded (create_graph=True) or traced; ``op`` otherwise. The plain launches would
    give gradients silently cut from the graph; ``op`` gives what the registered forward gives: a
    second backward through an op without a derivative raises (irno_kernels.backend.
    no_second_derivative), one through an op with autograd works.
    """
    if getattr(ctx, "eager", False) and not torch.is_grad_enabled() and not _tracing(()):
        return fn
    return op


def mutate(op, fn, *args) -> None:
    """Run the in-place op ``op`` (registered from ``fn``, which writes into ``args[0]``): the op
    whenever anything traces; in eager mode ``fn`` as the op runs it, below autograd (nothing is
    recorded and a leaf that requires grad raises no error, where a body's ``copy_`` would), then
    the target's version counter bumped as the op's dispatch bumps it (the kernels write through its
    pointer, unseen by autograd), so that a backward needing the old value raises.
    """
    if _tracing(args):
        op(*args)
        return
    with torch.no_grad():
        fn(*args)
    torch.autograd.graph.increment_version(args[0])
