"""Host (Python) time of the project's eager IRNO path with the GPU work taken out, on any machine.

On a GPU the eager model at small batch is host-bound: the time is spent issuing kernels, not running
them. This script measures the part of that host time the project itself adds, without a GPU: the
Triton kernels are selected as on CUDA (IRNO_BACKEND=triton, TRITON_INTERPRET=1, CPU tensors), and
every Triton launch and every convolution is replaced by a stub (a launch does nothing, a convolution
returns an empty tensor of the right shape), so what remains is the Python of the model, the op
wrappers, argument checks, backend choice, allocations and autograd bookkeeping. Outputs are
meaningless; only the time is.

    python benchmarks/host_overhead.py                    # 16x16 fields, the paper's U-Net (depth 4, width 16)
    python benchmarks/host_overhead.py --grid 32 --steps 6 --repeat 50

Reported per call (median over repeats, single thread): the refiner's forward without and with
gradients, IRNO's K refinement steps under no_grad, and one spectral layer on the Triton DFT route
(as large CUDA fields take it), forward and forward + backward, with its compact spectra mixed by the
Triton kernels (the default) and by torch.einsum (which then runs for real, on tiny CPU tensors).
Compare two trees by running it in each.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ["IRNO_BACKEND"] = "triton"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

_TRITON_MODULES = ("_lib", "norm", "pad", "update", "spectral_conv", "spectrum", "spectral_dft")


def _stub_launches() -> None:
    def launch(kernel, grid, *args, fp_fusion=True, **meta):
        return None

    for name in _TRITON_MODULES:
        mod = importlib.import_module(f"irno_kernels.triton.{name}")
        if hasattr(mod, "launch"):
            mod.launch = launch


class _StubConv(torch.autograd.Function):
    """A convolution's shapes and autograd links without its arithmetic: forward returns an empty
    tensor of the output's shape, backward empty gradients of the inputs' shapes (so the backward of
    the ops around it runs as it would). Its own Python costs ~10 us a call, counted in every tree
    alike."""

    @staticmethod
    def forward(ctx, x, w, b, H, W):
        ctx.shapes = (x.shape, w.shape, None if b is None else b.shape)
        return x.new_empty((x.shape[0], w.shape[0], H, W))

    @staticmethod
    def backward(ctx, g):
        xs, ws, bs = ctx.shapes
        return g.new_empty(xs), g.new_empty(ws), (None if bs is None else g.new_empty(bs)), None, None


def _stub_convs() -> None:
    def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        p = padding if isinstance(padding, int) else (padding[0] if isinstance(padding, (tuple, list)) else 0)
        H = x.shape[-2] + 2 * p - (w.shape[-2] - 1)
        W = x.shape[-1] + 2 * p - (w.shape[-1] - 1)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return _StubConv.apply(x, w, b, H, W)
        return x.new_empty((x.shape[0], w.shape[0], H, W))

    F.conv2d = conv2d
    torch.conv2d = conv2d


def _median_ms(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, default=16, help="H = W of the fields (>= 16: four poolings)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="refinement steps of the IRNO row")
    p.add_argument("--repeat", type=int, default=30)
    a = p.parse_args(argv)
    if a.grid < 16:
        p.error(f"--grid: expected >= 16 (the U-Net pools four times), got {a.grid}")
    torch.set_num_threads(1)
    _stub_launches()
    _stub_convs()
    from irno import FNO, IRNO
    from irno.models.unet import UNetRefiner

    torch.manual_seed(0)
    refiner = UNetRefiner(5, 1)
    x = torch.randn(a.batch, 5, a.grid, a.grid)

    def refiner_nograd():
        with torch.no_grad():
            refiner.forward_features(x)

    def refiner_grad():
        refiner.forward_features(x).sum().backward()
        assert refiner.down[0].net[0].weight.grad is not None  # the backward reached the first conv

    base = FNO(n_modes=(4, 4), in_channels=4, out_channels=1, hidden_channels=8)
    model = IRNO(base, alpha=0.2, K=a.steps).eval()
    xin, h0 = torch.randn(a.batch, 4, a.grid, a.grid), torch.randn(a.batch, 1, a.grid, a.grid)

    def irno_steps():
        with torch.no_grad():
            model.refine(xin, h0, steps=a.steps)

    import irno_kernels
    from irno_kernels import spectral_dft
    from irno_kernels.triton import spectral_dft as tr_dft

    spectral_dft.prefer_dft = lambda x, w: True  # the route of large CUDA fields, at this size
    xl = torch.randn(a.batch, 8, a.grid, a.grid, requires_grad=True)
    wl = torch.randn(8, 8, 8, 4, dtype=torch.complex64, requires_grad=True)

    def layer(mix: str, grad: bool):
        def call():
            tr_dft.COMPACT_MIX = mix
            if not grad:
                with torch.no_grad():
                    return irno_kernels.spectral_conv2d(xl, wl)
            return torch.autograd.grad(irno_kernels.spectral_conv2d(xl, wl), (xl, wl), torch.ones_like(xl))
        return call

    import irno

    print(f"host time, launches and convolutions stubbed; torch {torch.__version__}, python "
          f"{sys.version.split()[0]}, irno {getattr(irno, '__version__', '?')}, grid {a.grid}, batch {a.batch}")
    default_mix = tr_dft.COMPACT_MIX
    for name, fn in (("refiner forward, no grad", refiner_nograd),
                     ("refiner forward + backward", refiner_grad),
                     (f"IRNO {a.steps} refinement steps, no grad", irno_steps),
                     ("spectral layer (Triton DFT), forward", layer(default_mix, False)),
                     ("spectral layer (Triton DFT), fwd + bwd", layer(default_mix, True)),
                     ("  the same, mixed by einsum: forward", layer("einsum", False)),
                     ("  the same, mixed by einsum: fwd + bwd", layer("einsum", True))):
        print(f"  {name:40s} {_median_ms(fn, a.repeat):8.3f} ms")
    tr_dft.COMPACT_MIX = default_mix


if __name__ == "__main__":
    main()
