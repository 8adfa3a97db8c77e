"""Analysis of a trained IRNO: contraction, the bias / error-floor relation, and FLOPs.

- :func:`contraction_factor`: the local contraction factor q of the update map
  G(h) = h + alpha * Phi(x, h) at a point h, by power iteration on Jacobian-vector products.
- :func:`bias_error_floor`: per sample, the bias ||Phi(x, y)|| and the error after a long iteration,
  with their Pearson r (the paper's Corollary 3.3: ||e*|| <= alpha ||b|| / (1 - q) + O(||b||^2)).
- :func:`count_flops`, :func:`base_flops`, :func:`step_flops`: FLOPs per call, from
  ``torch.utils.flop_counter.FlopCounterMode`` plus the FFTs it does not count.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.autograd import forward_ad
from torch.utils.flop_counter import FlopCounterMode, addmm_flop, baddbmm_flop, bmm_flop, mm_flop

from irno_kernels.backend import ENV_VAR

__all__ = [
    "contraction_factor", "bias_error_floor", "pearson_r",
    "FlopReport", "count_flops", "base_flops", "step_flops", "fft_flops",
]


# ---------------------------------------------------------------------------------------------
# contraction
# ---------------------------------------------------------------------------------------------
def _quiet_forward_ad_import() -> None:
    """torch scripts its jvp decompositions on first use and warns that torch.jit.script is
    deprecated (a torch-internal matter): import them once with that warning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def _jvp_forward(fn: Callable, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """J_fn(h) v by forward-mode AD, or None when no tangent comes out (an op without a forward-mode
    formula, e.g. a compiled custom op that registers only a backward, drops it silently)."""
    _quiet_forward_ad_import()
    with torch.no_grad(), forward_ad.dual_level():
        out = fn(forward_ad.make_dual(h, v))
        tangent = forward_ad.unpack_dual(out).tangent
    return None if tangent is None else tangent.detach()


def _jvp_reverse(fn: Callable, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J_fn(h) v by reverse mode only (the double-vjp trick: u -> J^T u is linear, its vjp with v is
    J v). Needs every op's backward to be differentiable."""
    with torch.enable_grad():
        hh = h.detach().requires_grad_(True)
        out = fn(hh)
        u = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, hh, u, create_graph=True)
        (jv,) = torch.autograd.grad(g, u, v)
    return jv.detach()


def _vjp(fn: Callable, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """J_fn(h)^T u by reverse mode."""
    with torch.enable_grad():
        hh = h.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(hh), hh, u)
    return g.detach()


def _pick_jvp(fn: Callable, h: torch.Tensor, v: torch.Tensor, method: str) -> Callable:
    """The jvp to use. 'auto' tries forward mode and checks it once against a central finite
    difference (forward mode can lose part of the tangent inside ops without a forward formula);
    on a mismatch or a missing tangent it uses reverse mode."""
    if method == "forward":
        return lambda a, b: _jvp_forward(fn, a, b)
    if method == "reverse":
        return lambda a, b: _jvp_reverse(fn, a, b)
    jv = _jvp_forward(fn, h, v)
    if jv is not None:
        eps = 1e-3 * max(float(h.abs().max()), 1.0)
        with torch.no_grad():
            fd = (fn(h + eps * v) - fn(h - eps * v)) / (2 * eps)
        if torch.allclose(jv, fd, rtol=5e-2, atol=5e-2 * float(fd.abs().max()) + 1e-6):
            return lambda a, b: _jvp_forward(fn, a, b)
    return lambda a, b: _jvp_reverse(fn, a, b)


def contraction_factor(model, x: torch.Tensor, h: torch.Tensor, n_iter: int = 20, kind: str = "norm",
                       per_sample: bool = True, seed: int | None = 0, method: str = "auto",
                       return_history: bool = False):
    """Local contraction factor of G(h) = h + alpha * Phi(x, h) at h, by power iteration.

    Args:
        model: an :class:`irno.IRNO` (uses ``model.update``, plain PyTorch, so forward-mode AD works),
            or any callable (x, h) -> G(h).
        x: (B, Cx, h, w) input; h: (B, Cy, H, W) the point (e.g. h_K or y).
        n_iter: power iterations.
        kind: 'norm' estimates the spectral norm ||J||_2 = sqrt(lambda_max(J^T J)) (a Lipschitz bound,
            the q of the contraction argument), with one jvp and one vjp per iteration;
            'radius' estimates the spectral radius max |eig(J)| from jvps alone (the asymptotic rate
            of the linearised iteration) as the geometric mean of the growth ||J v_i|| over the
            second half of the iterations, i = n_iter // 2 .. n_iter - 1, i.e.
            (||J^m v|| / ||v||)^(1/m) from v = v_{n_iter // 2}: a single step's growth overshoots for
            a non-normal J and oscillates for a complex eigenpair; the mean over m steps converges,
            with an error of order 1/m in log q (less for a normal J). The two agree for a normal J.
        per_sample: the samples of a batch do not interact, so J is block-diagonal; True returns one
            factor per sample (B,), False the factor of the whole batch (a scalar, the max).
        seed: seed of the random start vector (None: the global generator).
        method: how J v is computed: 'forward' (``torch.autograd.forward_ad``, one forward pass),
            'reverse' (two backward passes; works through any op whose backward is differentiable),
            or 'auto' (forward mode, checked once against a finite difference, else reverse).

    Returns q (B,) or a scalar; with ``return_history`` also the (n_iter, B) estimates (row i: the
    estimate of a run with n_iter = i + 1). Run it with the model in eval mode. For kind='norm' the
    estimate approaches ||J||_2 from below (it is non-decreasing in n_iter); for kind='radius' it may
    approach max |eig(J)| from either side.
    """
    if kind not in ("norm", "radius"):
        raise ValueError(f"kind: expected 'norm' or 'radius', got {kind!r}")
    if method not in ("auto", "forward", "reverse"):
        raise ValueError(f"method: expected 'auto', 'forward' or 'reverse', got {method!r}")
    update = model.update if hasattr(model, "update") else model

    def G(hh):
        return update(x, hh)

    gen = torch.Generator(device=h.device).manual_seed(seed) if seed is not None else None
    v = torch.randn(h.shape, generator=gen, device=h.device, dtype=h.dtype)
    B = h.shape[0]

    def norms(t):
        return t.flatten(1).norm(dim=1) if per_sample else t.norm().expand(B)

    def normalise(t):
        n = norms(t).clamp_min(1e-30)
        return t / n.view(-1, *([1] * (t.dim() - 1)))

    v = normalise(v)
    h = h.detach()
    jvp = _pick_jvp(G, h, v, method)
    hist, logs = [], []
    est = torch.zeros(B, device=h.device, dtype=h.dtype)
    for i in range(n_iter):
        jv = jvp(h, v)
        if jv is None:
            raise RuntimeError("contraction_factor: forward-mode AD gave no tangent (an op without a "
                               "forward-mode formula); use method='reverse' or 'auto'")
        if kind == "norm":
            w = _vjp(G, h, jv)  # J^T J v
            est = norms(w).sqrt()  # ||J^T J v|| -> sigma_max^2 for unit v
        else:
            w = jv
            logs.append(norms(w).clamp_min(1e-30).log())
            est = torch.stack(logs[(i + 1) // 2:]).mean(dim=0).exp()  # geometric mean, second half
        hist.append(est.detach().clone())
        v = normalise(w)
    q = est if per_sample else est[0]
    if return_history:
        return q, torch.stack(hist)
    return q


# ---------------------------------------------------------------------------------------------
# bias and error floor
# ---------------------------------------------------------------------------------------------
def pearson_r(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (float64)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / torch.sqrt(a.square().sum() * b.square().sum()))


def _batches(loader_or_pairs) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(loader_or_pairs, (tuple, list)) and len(loader_or_pairs) == 2 and all(
            isinstance(t, torch.Tensor) for t in loader_or_pairs):
        loader_or_pairs = [loader_or_pairs]  # one (x, y) batch
    for item in loader_or_pairs:
        if isinstance(item, dict):
            yield item["x"], item["y"]
        else:
            yield item[0], item[1]


@dataclass
class BiasFloor:
    """Result of :func:`bias_error_floor`; tensors have one entry per sample."""
    bias: torch.Tensor        # ||Phi(x, y)||_2 per sample
    floor: torch.Tensor       # ||h_n - y||_2 per sample, after n_steps
    min_error: torch.Tensor   # min_k ||h_k - y||_2 per sample
    r: float                  # Pearson r(bias, floor)
    r_min: float              # Pearson r(bias, min_error)
    errors: torch.Tensor = field(repr=False)  # (n_steps + 1, N) ||h_k - y|| per step and sample


@torch.no_grad()
def bias_error_floor(model, loader_or_pairs, n_steps: int = 50,
                     h0: Callable[[torch.Tensor], torch.Tensor] | None = None) -> BiasFloor:
    """Per sample: the bias ||Phi(x, y)||_2 and the error of a long iteration, and Pearson r.

    model: an :class:`irno.IRNO`. loader_or_pairs: one (x, y) batch, or an iterable of (x, y) batches
    (tuples or dicts with keys 'x', 'y'), x (B, Cx, h, w), y (B, Cy, H, W). Norms are L2 over all of
    (Cy, H, W) per sample. n_steps: length of the iteration (well beyond K, so it settles).
    h0: x -> the iteration's start h_0 (e.g. another base, for transfer: ``model.refine`` from it);
    None starts from the model's own base.
    """
    device = next(model.parameters()).device
    bias, errs = [], []
    for x, y in _batches(loader_or_pairs):
        x, y = x.to(device), y.to(device)
        bias.append(model.phi(x, y).flatten(1).norm(dim=1))
        if h0 is None:
            traj = model(x, steps=n_steps, return_trajectory=True)
        else:
            traj = model.refine(x, h0(x), steps=n_steps, return_trajectory=True)
        errs.append(torch.stack([(h - y).flatten(1).norm(dim=1) for h in traj]))
    bias_t = torch.cat(bias).cpu()
    errors = torch.cat(errs, dim=1).cpu()
    floor, min_err = errors[-1], errors.min(dim=0).values
    return BiasFloor(bias_t, floor, min_err, pearson_r(bias_t, floor), pearson_r(bias_t, min_err), errors)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def fft_flops(n: int, batch: int = 1) -> float:
    """5 N log2 N per transform of N points (the classic radix-2 count), times ``batch`` transforms.

    Used for real and inverse-real 2-D FFTs too (N = H * W): an upper-bound convention; a real FFT
    needs about half of it.
    """
    return 5.0 * n * math.log2(n) * batch if n > 1 else 0.0


class _Tally:
    def __init__(self):
        self.fft = 0.0
        self.n_fft = 0  # individual transforms (one per field and sample)
        self.fft_calls = 0


def _fft_formulas(tally: _Tally) -> dict:
    """Raw FlopCounterMode formulas for the aten FFT ops and the irno custom ops."""
    aten = torch.ops.aten

    def transform(points, total_elems):
        n = math.prod(points)
        batch = total_elems // max(n, 1)
        tally.fft_calls += 1
        tally.n_fft += batch
        f = int(fft_flops(n, batch))  # FlopCounterMode keeps integers
        tally.fft += f
        return f

    def r2c(x, dim, *args, out_val=None, **kw):  # real input: N = sizes along dim
        return transform([x.shape[d] for d in dim], x.numel())

    def c2r(x, dim, normalization, last_dim_size, *args, out_val=None, **kw):  # real output
        return transform([out_val.shape[d] for d in dim], out_val.numel())

    def c2c(x, dim, *args, out_val=None, **kw):
        return transform([x.shape[d] for d in dim], x.numel())

    def spectral_conv(x, weight, *args, out_val=None, **kw):
        B, ci, H, W = x.shape
        co = weight.shape[1]
        modes = weight.shape[2] * weight.shape[3]
        f = transform([H, W], B * ci * H * W) + transform([H, W], B * co * H * W)
        return f + 8 * B * ci * co * modes  # complex multiply-add = 8 real flops

    def complex_aware(base):  # base: torch's registered (shape-wrapped) mm / addmm / bmm / baddbmm formula
        def f(*args, out_val=None, **kw):
            n = base(*args, out_val=out_val, **kw)
            cplx = any(isinstance(t, torch.Tensor) and t.is_complex() for t in args)
            return 4 * n if cplx else n  # a complex multiply-add is 4 real ones
        return f

    def addbmm(inp, b1, b2, *args, out_val=None, **kw):  # torch has no formula: bmm's (the add is free)
        return bmm_flop(b1, b2)

    # FlopCounterMode counts no elementwise op; the update ops follow suit and count only their matmul
    def update_formula(h, z, weight, bias, alpha, *args, out_val=None, **kw):
        S = h.numel() // (h.shape[0] * h.shape[1])
        return 2 * h.shape[0] * h.shape[1] * z.shape[1] * S

    def residual_formula(h, phi, alpha, *args, out_val=None, **kw):
        return 0

    table = {
        aten._fft_r2c: r2c, aten._fft_c2r: c2r, aten._fft_c2c: c2c,
        aten.mm: complex_aware(mm_flop), aten.bmm: complex_aware(bmm_flop),
        aten.addmm: complex_aware(addmm_flop), aten.baddbmm: complex_aware(baddbmm_flop),
        aten.addbmm: complex_aware(addbmm),
    }
    irno_ops = getattr(torch.ops, "irno", None)
    for name, fn in (("spectral_conv2d", spectral_conv), ("refine_update", update_formula),
                     ("refine_update_", update_formula), ("residual_update", residual_formula),
                     ("residual_update_", residual_formula)):
        try:
            table[getattr(irno_ops, name)] = fn
        except (AttributeError, RuntimeError):
            pass
    for fn in table.values():
        fn._get_raw = True
    return table


@dataclass
class FlopReport:
    """FLOPs of one call. ``total`` = ``counted`` (what FlopCounterMode's own formulas give: matmuls,
    convolutions, ...) + ``fft`` (5 N log2 N per transform, which FlopCounterMode does not count)
    + ``custom`` (irno's compiled ops, by explicit formulas: spectral mode mixing, the 1x1 projection of
    the fused update; 0 unless ``fn`` forces a compiled backend, as :func:`count_flops` runs the
    references, whose matmuls land in ``counted``). Elementwise ops (activations, norms, the residual
    add) count 0, as in FlopCounterMode."""
    total: float
    counted: float
    fft: float
    custom: float
    n_fft: int            # transforms counted (each field of each sample, forward and inverse)
    by_module: dict = field(repr=False, default_factory=dict)


@contextlib.contextmanager
def _reference_backend():
    """Force irno_kernels' reference backend (``IRNO_BACKEND``, read at each op call) for the block."""
    prev = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "reference"
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = prev


def count_flops(fn: Callable, *args, **kwargs) -> FlopReport:
    """FLOPs of ``fn(*args, **kwargs)`` (run once, under no_grad).

    FlopCounterMode counts matmuls and convolutions but gives 0 for ``aten._fft_*`` (checked in the
    tests) and knows nothing of irno's custom ops. Both are added here with explicit formulas: each
    FFT of N points costs 5 N log2 N (:func:`fft_flops`); the spectral convolution op costs its two
    FFTs plus 8 flops per complex multiply-add of the mode mixing; a complex matmul (mm, addmm, bmm,
    baddbmm, addbmm, so a complex Linear too) counts 4 real ones.

    ``fn`` runs with every irno op on its reference route (``IRNO_BACKEND=reference`` for the call,
    the previous setting restored after), so the count does not depend on the device or on which
    kernels are built: the automatic choice could otherwise pick the spectral conv's "dft" route
    (matrix products instead of FFTs, chosen on CUDA for large fields), which counts differently.
    An op given an explicit ``backend=`` keyword inside ``fn`` still runs that backend; the compiled
    spectral conv counts as the reference does.
    """
    tally = _Tally()
    table = _fft_formulas(tally)
    with torch.no_grad(), _reference_backend(), FlopCounterMode(display=False, custom_mapping=table) as counter:
        fn(*args, **kwargs)
    counts = counter.get_flop_counts()
    glob = counts.get("Global", {})
    fft_ops = (torch.ops.aten._fft_r2c, torch.ops.aten._fft_c2r, torch.ops.aten._fft_c2c)
    total = float(sum(glob.values()))
    aten_fft = float(sum(v for k, v in glob.items() if k in fft_ops))
    custom = float(sum(v for k, v in glob.items() if str(k).startswith("irno.")))
    # the compiled spectral conv's formula includes its two FFTs: report them under fft
    fft_in_custom = tally.fft - aten_fft
    return FlopReport(total=total, counted=total - aten_fft - custom, fft=tally.fft,
                      custom=custom - fft_in_custom, n_fft=tally.n_fft,
                      by_module={k: float(sum(v.values())) for k, v in counts.items()})


def base_flops(model, x: torch.Tensor) -> FlopReport:
    """FLOPs of one call of the IRNO's base on x (B, Cx, h, w)."""
    base = getattr(model, "base", model)
    return count_flops(base, x)


def step_flops(model, x: torch.Tensor, h: torch.Tensor | None = None) -> FlopReport:
    """FLOPs of one refinement step h -> h + alpha * Phi(x~, h) on h's grid (resampling of x excluded:
    it is done once per call, not per step). h defaults to the base's output on x."""
    with torch.no_grad():
        if h is None:
            h = model.base_forward(x)
        xr = model.condition(x, h)
    return count_flops(model.step, xr, h)
