"""Registers, spills, shared memory and occupancy of the Triton DFT kernels for sm_90, on any machine.

Triton compiles a kernel for a GPU target without the GPU, and ptxas (shipped with triton) reports
what each compiled kernel takes. This script compiles grid_to_modes and modes_to_grid
(irno_kernels/triton/spectral_dft.py) under the current ``CONFIG`` and every alternative that
benchmarks/tune_dft.py times, for both precisions. It uses the specialisation a launch at the
targets' shape gets (B16 C64 256x256 m16: every size a multiple of 16, 16-byte-aligned pointers).
For each one it prints:

- registers per thread and the bytes spilled to local memory;
- shared memory per program;
- the MMA instructions the products became ("wgmma": Hopper's warpgroup MMA; "mma.sync": the
  warp-level one of earlier GPUs);
- the programs and warps an SM can hold at once. The bound is 64K registers, 228 KiB of shared
  memory, 32 programs and 64 warps per SM. A kernel that streams the grid through memory hides its
  load latency only with enough resident warps.

These are static facts about the code, not timings. tune_dft.py on a GPU says which configuration is
fastest; this says why one might be, and which to try. Written to --out as a plain-text table.

    python benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources_sm90.txt
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not for the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402,F401  (irno_kernels imports it; loaded first for a clean error if absent)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_dft  # noqa: E402

from irno_kernels.triton import spectral_dft as D  # noqa: E402

#: per SM on sm_90 (H100/H200)
REGS_PER_SM, SMEM_PER_SM, MAX_PROGRAMS_PER_SM, MAX_WARPS_PER_SM = 65536, 228 * 1024, 32, 64
#: integer arguments that are multiples of 16 at the targets' shape (a launch specialises them so)
DIVISIBLE = ("H", "W", "R", "M", "N", "rows_per_split")
POINTERS = {
    "grid_to_modes": ("x_ptr", "ar_ptr", "ai_ptr", "er_ptr", "ei_ptr", "z_ptr"),
    "modes_to_grid": ("z_ptr", "pr_ptr", "pi_ptr", "qr_ptr", "qi_ptr", "y_ptr"),
}
KERNELS = {"grid_to_modes": D._grid_to_modes_kernel, "modes_to_grid": D._modes_to_grid_kernel}


def _ptxas() -> str:
    """The ptxas that triton uses for sm_90 (its lookup moved between triton versions)."""
    from triton.backends.nvidia import compiler as nv

    for get in (lambda: nv.get_ptxas(90).path, lambda: nv.get_ptxas().path, lambda: nv.get_ptxas()[0]):
        try:
            path = get()
        except (AttributeError, TypeError, IndexError):
            continue
        if path:
            return path
    return str(Path(nv.__file__).parent / "bin" / "ptxas")


def compile_sm90(name: str, prec: str, cfg: dict, rp: int = 32, mp: int = 16) -> dict:
    """Compile kernel ``name`` with launch configuration ``cfg`` in precision ``prec`` for sm_90
    and return its resources (keys: regs, spill_bytes, smem_bytes, mma, programs_per_sm,
    warps_per_sm)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = KERNELS[name]
    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        else:
            sig[p.name] = "*fp32" if p.name in POINTERS[name] else "i32"
        if p.name in POINTERS[name] or p.name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    consts = dict(PREC=prec, BH=cfg["BH"], BW=cfg["BW"], RP=rp, MP=mp)
    if name == "grid_to_modes":
        consts["PARTS"] = cfg.get("PARTS", 1)
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    warps = cfg["num_warps"]
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": cfg["num_stages"]})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", str(path), "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores", out)
    smem = int(compiled.metadata.shared)
    programs = min(REGS_PER_SM // (regs * 32 * warps), SMEM_PER_SM // max(smem, 1), MAX_PROGRAMS_PER_SM,
                   MAX_WARPS_PER_SM // warps)
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
    return dict(regs=regs, spill_bytes=int(spill.group(1)) if spill else 0, smem_bytes=smem, mma=mma,
                programs_per_sm=programs, warps_per_sm=programs * warps)


def configurations(quick: bool = False):
    """(kernel, precision, label, cfg): the current CONFIG first, then tune_dft's alternatives."""
    for name, alts in (("grid_to_modes", tune_dft.G2M), ("modes_to_grid", tune_dft.M2G)):
        for prec in ("tf32x3", "tf32"):
            yield name, prec, "current", D.CONFIG[name][prec]
            for cfg in alts[prec][:1 if quick else None]:
                yield name, prec, "", cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="also write the table to this file")
    p.add_argument("--quick", action="store_true", help="the current configurations and one alternative each")
    a = p.parse_args(argv)
    import triton

    lines = [f"Triton {triton.__version__} for sm_90 (ptxas -v); B16 C64 256x256 m16 specialisation; "
             "static resources, not timings",
             f"{'kernel':13s} {'prec':6s} {'configuration':50s} {'regs':>4s} {'spill':>5s} {'smem':>6s} "
             f"{'mma':8s} {'progs/SM':>8s} {'warps/SM':>8s}"]
    print("\n".join(lines), flush=True)
    for name, prec, tag, cfg in configurations(a.quick):
        r = compile_sm90(name, prec, cfg)
        label = tune_dft.label(cfg) + (f" ({tag})" if tag else "")
        line = (f"{name:13s} {prec:6s} {label:50s} {r['regs']:4d} {r['spill_bytes']:5d} {r['smem_bytes']:6d} "
                f"{r['mma']:8s} {r['programs_per_sm']:8d} {r['warps_per_sm']:8d}")
        lines.append(line)
        print(line, flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
