"""Launch configurations of the Triton truncated-DFT kernels (irno_kernels.triton.spectral_dft.CONFIG):
every alternative that benchmarks/tune_dft.py times computes the same layer, forward and backward,
including grid_to_modes cut into bands of rows. On CPU through triton's interpreter with the GPU
tilings (INTERPRET switched off in the module, as tests/test_triton.py does)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
tr = pytest.importorskip("irno_kernels.triton")

import irno_kernels as ik  # noqa: E402
from irno_kernels.triton import spectral_dft as D  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tr.INTERPRET:
    pytest.skip("Triton needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpu_tiles(monkeypatch):
    monkeypatch.setattr(D, "INTERPRET", False)
    monkeypatch.setattr(D, "CONFIG", {k: dict(v) for k, v in D.CONFIG.items()})
    return D.CONFIG


@pytest.mark.parametrize("split,bh,bw", [(1, 32, 64), (2, 16, 64), (3, 16, 32), (8, 32, 128)])
def test_grid_to_modes_bands_and_tiles_match_the_reference(gpu_tiles, split, bh, bw):
    """H = 70 rows and W = 45 columns: bands of whole tiles, the last one short (16-row tiles in 3
    bands: 32, 32 and 6 rows); more bands asked for than there are tiles: one band per tile."""
    gpu_tiles["grid_to_modes"].update(SPLIT=split, BH=bh, BW=bw)
    gpu_tiles["modes_to_grid"].update(BH=bh, BW=bw)
    H, W, m1, m2 = 70, 45, 5, 7
    bands, per = D._split(H, bh)
    assert bands <= split and per % bh == 0 and (bands - 1) * per < H <= bands * per
    x = torch.randn(2, 3, H, W, device=DEVICE)
    z = D.grid_to_modes(x, m1, m2)
    want = torch.fft.rfft2(x, norm="forward")[..., [*range(m1), *range(H - m1, H)], :m2]
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the whole layer, forward and both gradients, against the reference
    xr = x[:1].clone().requires_grad_()
    w = (torch.randn(3, 2, 2 * m1, m2, dtype=torch.complex64, device=DEVICE) / 3).requires_grad_()
    y = D.spectral_conv2d_dft(xr, w)
    ref = ik.spectral_conv2d_ref(xr, w)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.detach().abs().max()))
    g = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(y, (xr, w), g), torch.autograd.grad(ref, (xr, w), g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def test_tune_dft_smoke_run_agrees(capsys):
    """benchmarks/tune_dft.py on CPU: the interpreter runs a tiny shape under two alternatives per
    kernel; every alternative agrees with the current configuration (exit status 0) and the summary
    names the best per kernel and precision."""
    if DEVICE != "cpu":
        pytest.skip("the smoke run is the CPU (interpreter) mode; gpu_check.sh runs the sweep on a GPU")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import tune_dft
    finally:
        sys.path.pop(0)
    assert tune_dft.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "best per kernel and precision" in out
    for kernel in ("grid_to_modes", "modes_to_grid"):
        assert out.count(kernel) >= 4, out
    assert D.INTERPRET  # restored after the run
