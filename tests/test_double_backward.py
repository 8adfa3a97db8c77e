"""Second derivatives (create_graph=True, then a second backward: gradient penalties, Hessian-vector
products) through every op with a fast backend ("cpu"/"cuda": the compiled kernels; "triton": the
Triton kernels, on CPU under the interpreter; "dft": spectral_conv2d's matrix route) either equal the
reference's (float64) or raise a RuntimeError that names the op, never silently differ. First-order
gradients stay as they were. CUDA cases run where there is a GPU (marked gpu).

The before/after table of a change is ``python tests/test_double_backward.py`` (it prints one line per
case and fast backend: "correct", "raises" or "DIFFERS").
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: the conftest's interpreter switch, before triton loads
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch

import irno_kernels as ik
from irno_kernels import backend as bk

DTYPE, CDTYPE = torch.float64, torch.complex128
SHAPE = (1, 3, 5, 7)
#: the fast backends per device type
FAST = {"cpu": ("cpu", "triton", "dft"), "cuda": ("cuda", "triton", "dft")}


def _r(*shape, dtype=DTYPE):
    return torch.randn(*shape, dtype=dtype)


def _cases():
    """name -> (op name in irno_kernels.backend.OPS, make inputs, f(*inputs, backend=...))."""
    B, C, H, W = SHAPE
    F = 4
    cases = {
        "spectral_conv2d": ("spectral_conv2d", lambda: (_r(*SHAPE), _r(C, 2, 4, 3, dtype=CDTYPE)),
                            lambda x, w, backend: ik.spectral_conv2d(x, w, backend=backend)),
        "radial_spectrum": ("radial_spectrum", lambda: (_r(*SHAPE),),
                            lambda x, backend: ik.radial_spectrum(x, backend=backend)),
        "residual_update": ("residual_update", lambda: (_r(*SHAPE), _r(*SHAPE)),
                            lambda h, phi, backend: ik.residual_update(h, phi, 0.3, backend=backend)),
        "refine_update": ("refine_update", lambda: (_r(*SHAPE), _r(B, F, H, W), _r(C, F), _r(C)),
                          lambda h, z, w, b, backend: ik.refine_update(h, z, w, b, 0.3, backend=backend)),
        "refine_update[no bias]": ("refine_update", lambda: (_r(*SHAPE), _r(B, F, H, W), _r(C, F)),
                                   lambda h, z, w, backend: ik.refine_update(h, z, w, None, 0.3, backend=backend)),
        "periodic_pad2d": ("periodic_pad2d", lambda: (_r(*SHAPE),),
                           lambda x, backend: ik.periodic_pad2d(x, 2, backend=backend)),
        "periodic_pad_cat": ("periodic_pad2d", lambda: (_r(*SHAPE), _r(B, 2, H, W)),
                             lambda a, b, backend: ik.periodic_pad_cat([a, b], 1, backend=backend)),
        "periodic_upsample2x": ("periodic_upsample2x", lambda: (_r(*SHAPE),),
                                lambda x, backend: ik.periodic_upsample2x(x, backend=backend)),
        "periodic_upsample2x[halo 2]": ("periodic_upsample2x", lambda: (_r(*SHAPE),),
                                        lambda x, backend: ik.periodic_upsample2x(x, 2, backend=backend)),
    }
    for mode in ik.spectrum.LOSS_MODES:
        cases[f"spectral_loss[{mode}]"] = (
            "spectral_loss", lambda: (_r(*SHAPE), _r(*SHAPE)),
            lambda p, t, backend, mode=mode: ik.spectral_loss(p, t, 1.6, 0.5, mode, backend=backend))
    for gelu in (None, "gelu"):
        for halo in (0, 2):
            cases[f"channel_layer_norm[{gelu}, halo {halo}]"] = (
                "channel_layer_norm", lambda: (_r(*SHAPE), _r(C), _r(C)),
                lambda x, w, b, backend, gelu=gelu, halo=halo: ik.channel_layer_norm(
                    x, w, b, activation=gelu, halo=halo, backend=backend))
    cases["channel_layer_norm[no affine]"] = ("channel_layer_norm", lambda: (_r(*SHAPE),),
                                              lambda x, backend: ik.channel_layer_norm(x, backend=backend))
    return cases


CASES = _cases()


def _serves(op: str, backend: str, device: str) -> bool:
    """Whether ``backend`` runs ``op`` on ``device`` (without a GPU: whether it would with one)."""
    if device == "cpu" or torch.cuda.is_available():
        return bk.available(op, backend, device)
    return {"cuda": op in bk.C_OPS, "dft": op in bk.DFT_OPS}.get(backend, True)


PARAMS = [pytest.param(name, dev, be, id=f"{name}-{be}-{dev}", marks=[pytest.mark.gpu] if dev == "cuda" else [])
          for dev in FAST for name, (op, _, _) in CASES.items() for be in FAST[dev] if _serves(op, be, dev)]


def _sq(t: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(t) if t.is_complex() else t).square().sum()


def _total(t: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(t) if t.is_complex() else t).sum()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(a) * torch.view_as_real(b)).sum() if a.is_complex() else (a * b).sum()


def _randn_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=t.dtype).to(t.device)


def _run(name: str, backend: str, inputs, create_graph: bool = True):
    """First-order gradients of a loss of the op's output, then (create_graph) the gradients of a
    penalty on them: (first, second), each a tuple over the inputs (zeros where None)."""
    _, _, f = CASES[name]
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    y = f(*xs, backend=backend)
    first = torch.autograd.grad(_sq(y) + _dot(y, _randn_like(y, 1)), xs, create_graph=create_graph)
    if not create_graph:
        return first, None
    u = [_randn_like(g, 2 + k) for k, g in enumerate(first)]
    # the inputs' own sum keeps a graph when the gradients have none (then only it is differentiated)
    penalty = sum(_sq(g) + _dot(g, uk) + _total(x) for g, uk, x in zip(first, u, xs))
    second = torch.autograd.grad(penalty, xs, allow_unused=True)
    return first, tuple(torch.zeros_like(x) if s is None else s for s, x in zip(second, xs))


def _close(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=1e-7, atol=1e-9) for x, y in zip(a, b))


def _inputs(name: str, device: str):
    torch.manual_seed(0)
    return [t.to(device) for t in CASES[name][1]()]


def outcome(name: str, device: str, backend: str) -> tuple[str, str]:
    """("correct" | "raises" | "DIFFERS", detail) of the second derivative of case ``name``."""
    inputs = _inputs(name, device)
    _, want = _run(name, "reference", inputs)
    try:
        _, got = _run(name, backend, inputs)
    except RuntimeError as err:
        return "raises", str(err).splitlines()[0]
    if _close(got, want):
        return "correct", ""
    err = max((g - w).abs().max().item() for g, w in zip(got, want))
    return "DIFFERS", f"max abs error {err:.3g}"


#: (case, kernels) pairs whose second derivative is computed (the rest raise); "compiled" is the
#: "cpu" and "cuda" backends (the same registered ops and formulas); "dft" is PyTorch (autograd's)
CORRECT = {
    ("spectral_conv2d", "dft"),
    ("residual_update", "compiled"), ("refine_update", "compiled"), ("refine_update[no bias]", "compiled"),
    ("residual_update", "triton"), ("refine_update", "triton"), ("refine_update[no bias]", "triton"),
    ("periodic_pad2d", "triton"), ("periodic_pad_cat", "triton"),
    ("periodic_upsample2x", "triton"), ("periodic_upsample2x[halo 2]", "triton"),
}


@pytest.mark.parametrize("name, device, backend", PARAMS)
def test_second_derivative_is_the_reference_or_raises(name, device, backend):
    op = CASES[name][0]
    status, detail = outcome(name, device, backend)
    assert status != "DIFFERS", f"{name} ({backend}): the second derivative differs silently ({detail})"
    if status == "raises":
        assert op in detail and "backend='reference'" in detail, f"the error names no op or way out: {detail}"
    kernels = "compiled" if backend in ("cpu", "cuda") else backend
    assert status == ("correct" if (name, kernels) in CORRECT else "raises"), detail


@pytest.mark.parametrize("name, device, backend", PARAMS)
def test_first_derivative_is_unchanged(name, device, backend):
    """Plain backward and the first backward of a create_graph=True pass give the reference's
    gradients, without an error (the error paths trigger in the second backward only), and the
    latter are part of the graph."""
    inputs = _inputs(name, device)
    want, _ = _run(name, "reference", inputs, create_graph=False)
    assert _close(_run(name, backend, inputs, create_graph=False)[0], want)
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    first = torch.autograd.grad(_sq(CASES[name][2](*xs, backend=backend)), xs, create_graph=True)
    assert all(g.requires_grad for g in first)


# ---------------------------------------------------------------------------------------------
# the registered compiled ops themselves (what torch.compile traces), and their backward ops
# ---------------------------------------------------------------------------------------------
needs_c = pytest.mark.skipif(not ik.HAS_C, reason="irno_kernels._C is not built")


@needs_c
def test_compiled_backward_ops_raise_under_a_second_backward():
    """Every backward op of the compiled kernels has an autograd formula (no autograd fallback with
    its silently missing gradients): a second backward through it raises, naming the op and the way
    out; opcheck's autograd-registration check passes with inputs that require grad."""
    x, t = _r(*SHAPE, dtype=DTYPE), _r(*SHAPE, dtype=DTYPE)
    w = _r(3, 2, 4, 3, dtype=CDTYPE)
    ops = torch.ops.irno
    forwards = {
        "spectral_conv2d": (lambda a, b: ops.spectral_conv2d(a, b), (x, w)),
        "radial_spectrum": (lambda a: ops.radial_spectrum(a), (x,)),
        "spectral_loss": (lambda a, b: ops.spectral_loss(a, b, 1.6, 0.5, "magnitude"), (x, t)),
        "spectral_loss_spectra": (lambda a, b: ops.spectral_loss_spectra(a, b, 1.6, 0.5, "error")[0], (x, t)),
    }
    for name, (f, inputs) in forwards.items():
        xs = [a.clone().requires_grad_() for a in inputs]
        first = torch.autograd.grad(_sq(f(*xs)), xs, create_graph=True)
        with pytest.raises(RuntimeError, match=rf"{name.removesuffix('_spectra')}.*backend='reference'"):
            sum(_sq(g) for g in first).backward()
    g_r = _r(1, 3, ik.spectrum.num_shells(5, 7))
    backward_args = {
        ops.spectral_conv2d_backward.default: (_r(1, 2, 5, 7), x, w),
        ops.radial_spectrum_backward.default: (g_r, x),
        ops.spectral_loss_backward.default: (torch.tensor(0.5, dtype=DTYPE), x, t, 1.6, 0.5, "magnitude", True),
    }
    for op, args in backward_args.items():
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        out = op(*args)
        assert all(o.requires_grad for o in (out if isinstance(out, tuple) else (out,)))


# ---------------------------------------------------------------------------------------------
# the registered Triton ops (what torch.compile traces)
# ---------------------------------------------------------------------------------------------
def _triton_device() -> str | None:
    try:
        from irno_kernels import triton as tr
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if tr.INTERPRET else None


TRITON_DEVICE = _triton_device()
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="needs triton (CUDA, or TRITON_INTERPRET=1)")


@needs_triton
def test_triton_linear_ops_have_exact_derivatives_of_every_order():
    """The padding and upsampling are linear, and the backward op of each is the other's adjoint:
    each backward op's autograd is the forward op (opcheck runs it in its aot-dispatch test). For a
    linear L, the gradient L^T v of <L x, v> differentiated along u with respect to v is L u."""
    ops = torch.ops.irno_triton

    def r(*shape):
        return _r(*shape).to(TRITON_DEVICE).requires_grad_()

    torch.library.opcheck(ops.periodic_pad_fold, (r(1, 2, 7, 8), 2, DTYPE, False))
    torch.library.opcheck(ops.periodic_upsample2x_adjoint, (r(1, 2, 6, 8), 1, DTYPE, False))
    checks = {
        "pad_cat": (lambda a, b: ops.periodic_pad_cat([a, b], 1, DTYPE), (r(1, 2, 3, 4), r(1, 1, 3, 4))),
        "pad_fold": (lambda g: ops.periodic_pad_fold(g, 1, DTYPE, False), (r(1, 2, 5, 6),)),
        "upsample2x": (lambda x: ops.periodic_upsample2x(x, 1, DTYPE), (r(1, 2, 2, 3),)),
        "upsample2x_adjoint": (lambda g: ops.periodic_upsample2x_adjoint(g, 1, DTYPE, False), (r(1, 2, 6, 8),)),
    }
    for name, (f, xs) in checks.items():
        y = f(*xs)
        v = r(*y.shape)
        first = torch.autograd.grad(y, xs, v, create_graph=True)  # L^T v
        us = [r(*x.shape) for x in xs]
        (lu,) = torch.autograd.grad(first, v, us, create_graph=True)
        torch.testing.assert_close(lu, f(*us), rtol=1e-12, atol=1e-12, msg=name)
        w = torch.randn_like(lu)  # third order: L^T w, through the backward op's backward
        for got, want in zip(torch.autograd.grad(lu, us, w), torch.autograd.grad(f(*xs), xs, w)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@needs_triton
def test_triton_update_ops_have_exact_derivatives_of_every_order():
    """residual_update and refine_update are (bi)linear, and the backward ops' own derivatives are the
    same backward ops: second and third derivatives of the registered ops against finite differences
    (gradgradcheck; a third order through the public function against the reference)."""
    ops = torch.ops.irno_triton

    def r(*shape):
        return _r(*shape).to(TRITON_DEVICE).requires_grad_()

    h, z, w, b = r(1, 2, 3, 2), r(1, 3, 3, 2), r(2, 3), r(2)
    checks = {
        "residual_update": (lambda h_, p_: ops.residual_update(h_, p_, 0.3), (h, r(1, 2, 3, 2))),
        "refine_update": (lambda h_, z_, w_, b_: ops.refine_update(h_, z_, w_, b_, 0.3), (h, z, w, b)),
        "refine_update[no bias]": (lambda h_, z_, w_: ops.refine_update(h_, z_, w_, None, 0.3), (h, z, w)),
    }
    for name, (f, xs) in checks.items():
        assert torch.autograd.gradgradcheck(f, xs), name

    def third(backend):
        xs = [t.detach().clone().requires_grad_() for t in (h, z, w, b)]
        y = ik.refine_update(*xs, 0.3, backend=backend)
        (gz,) = torch.autograd.grad((y * y * y).sum(), xs[1], create_graph=True)
        (gw,) = torch.autograd.grad((gz * gz).sum(), xs[2], create_graph=True)
        return torch.autograd.grad((gw * gw * gw).sum(), xs)

    for got, want in zip(third("triton"), third("reference")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@needs_triton
def test_triton_registered_ops_raise_under_a_second_backward():
    ops = torch.ops.irno_triton
    x, t = (_r(*SHAPE).to(TRITON_DEVICE).requires_grad_() for _ in range(2))
    forwards = {
        "channel_layer_norm": lambda: ops.channel_layer_norm_fwd(x, None, None, 1e-5, True, 1)[0],
        "spectral_loss": lambda: ops.spectral_loss_magnitude(x, t, 1.6, 0.5)[0],
        "radial_spectrum": lambda: ops.radial_spectrum(x)[0],
    }
    for name, f in forwards.items():
        (g,) = torch.autograd.grad(_sq(f()), x, create_graph=True)
        with pytest.raises(RuntimeError, match=rf"{name} with the Triton kernels.*backend='reference'"):
            g.square().sum().backward()


# ---------------------------------------------------------------------------------------------
# irno's own autograd.Functions (python/irno/models/_layers.py): backwards of differentiable ops
# ---------------------------------------------------------------------------------------------
def test_model_layer_functions_have_exact_second_derivatives():
    import torch.nn.functional as F
    from irno.models._layers import circular_pad2d, upsample2x_periodic

    x = _r(*SHAPE)
    pairs = {"circular_pad2d": (lambda t: circular_pad2d(t, 2), lambda t: F.pad(t, (2,) * 4, mode="circular")),
             "upsample2x_periodic": (upsample2x_periodic, ik.periodic_upsample2x_ref)}
    for name, (f, ref) in pairs.items():
        CASES[name] = (name, lambda: (x,), lambda t, backend, f=f, ref=ref: (ref if backend == "reference" else f)(t))
        try:
            _, want = _run(name, "reference", (x,))
            _, got = _run(name, "layers", (x,))
        finally:
            del CASES[name]
        assert _close(got, want), name


if __name__ == "__main__":
    for p in PARAMS:
        name, device, backend = p.values
        if device == "cpu" or torch.cuda.is_available():
            status, detail = outcome(name, device, backend)
            print(f"{name:36s} {backend:7s} {device:5s} {status:8s} {detail[:150]}")
