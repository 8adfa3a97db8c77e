"""`make demo` until the full pipeline lands: a short tour of the compiled ops.

Runs each op of irno_kernels on a 64x64 turbulent-looking field through the reference and the
fastest present backend, and prints the build, the backend table, the agreement and the time.

    python -m irno.showcase
"""

from __future__ import annotations

import time

import torch

import irno_kernels as ik


def _field(B: int, C: int, n: int, seed: int = 0) -> torch.Tensor:
    """A random field with a k^-5/3-like spectrum: a stand-in for a turbulent snapshot."""
    g = torch.Generator().manual_seed(seed)
    k = torch.fft.fftfreq(n) * n
    kk = torch.sqrt(k[:, None] ** 2 + k[None, : n // 2 + 1] ** 2).clamp_min(1.0)
    spec = torch.randn(B, C, n, n // 2 + 1, 2, generator=g)
    spec = torch.view_as_complex(spec) * kk ** (-11 / 6)
    x = torch.fft.irfft2(spec, s=(n, n))
    return x / x.std()


def _time(fn, reps: int = 20) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("irno op showcase")
    print("build:", ik.build_info())
    print("backends (op -> device -> default):")
    for op, per in ik.backends().items():
        print(f"  {op:18s} cpu={per['cpu']:9s} cuda={per['cuda']}")
    x = _field(8, 16, 64)
    y = _field(8, 4, 64, seed=1)
    w_spec = torch.randn(16, 16, 24, 12, dtype=torch.complex64) / 16
    z = torch.randn(8, 16, 64, 64)
    w1, b1 = torch.randn(4, 16) / 4, torch.randn(4)
    cases = {
        "spectral_conv2d": (lambda be: ik.spectral_conv2d(x, w_spec, backend=be)),
        "refine_update": (lambda be: ik.refine_update(y, z, w1, b1, 0.2, backend=be)),
        "residual_update": (lambda be: ik.residual_update(y, y, 0.2, backend=be)),
        "radial_spectrum": (lambda be: ik.radial_spectrum(y, backend=be)),
        "spectral_loss": (lambda be: ik.spectral_loss(y, y.flip(-1), 1.6, backend=be)),
    }
    print(f"\n{'op':18s} {'backend':9s} {'max |diff| vs ref':>18s} {'ms':>8s} {'ref ms':>8s}")
    with torch.no_grad():
        for op, run in cases.items():
            fast = ik.resolve(op, "cpu")
            ref = run("reference")
            out = run(fast)
            diff = (out - ref).abs().max().item()
            print(f"{op:18s} {fast:9s} {diff:18.2e} {_time(lambda r=run, f=fast: r(f)) * 1e3:8.3f} "
                  f"{_time(lambda r=run: r('reference')) * 1e3:8.3f}")
    spec = ik.radial_spectrum(y)
    print(f"\nParseval check: sum of the radial spectrum {spec.sum().item():.4f} "
          f"vs sum of squares {(y ** 2).sum().item():.4f}")


if __name__ == "__main__":
    main()
