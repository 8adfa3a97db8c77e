"""Registers, spills, shared memory and occupancy of the Triton DFT and mixing kernels for sm_90, on
any machine.

Triton compiles a kernel for a GPU target without the GPU, and ptxas (shipped with triton) reports
what each compiled kernel takes. This script compiles grid_to_modes and modes_to_grid
(irno_kernels/triton/spectral_dft.py) under the current ``CONFIG`` and every alternative that
benchmarks/tune_dft.py times, for both precisions. It then compiles the FFT route's mixing kernel
(irno_kernels/triton/spectral_conv.py, forward and input gradient) with 1, 4 and 8 input channels per
loop step and with the largest tiles. It uses the specialisation a launch at the targets' shape gets
(B16 C64 256x256 m16: sizes that are multiples of 16 marked so, 16-byte-aligned pointers). For each
one it prints:

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


def _resources(kernel, pointers, consts: dict, num_warps: int, num_stages: int, divisible) -> dict:
    """Compile ``kernel`` for sm_90 (float32 pointers, i32 integers, those named in ``divisible``
    known to be multiples of 16) and return its resources (keys: regs, spill_bytes, smem_bytes, mma,
    programs_per_sm, warps_per_sm)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        else:
            sig[p.name] = "*fp32" if p.name in pointers else "i32"
        if p.name in pointers or p.name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", str(path), "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores", out)
    smem = int(compiled.metadata.shared)
    programs = min(REGS_PER_SM // (regs * 32 * num_warps), SMEM_PER_SM // max(smem, 1), MAX_PROGRAMS_PER_SM,
                   MAX_WARPS_PER_SM // num_warps)
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
    return dict(regs=regs, spill_bytes=int(spill.group(1)) if spill else 0, smem_bytes=smem, mma=mma,
                programs_per_sm=programs, warps_per_sm=programs * num_warps)


def compile_sm90(name: str, prec: str, cfg: dict, rp: int = 32, mp: int = 16) -> dict:
    """Resources of DFT kernel ``name`` with launch configuration ``cfg`` in precision ``prec``
    (_resources' keys)."""
    consts = dict(PREC=prec, BH=cfg["BH"], BW=cfg["BW"], RP=rp, MP=mp)
    if name == "grid_to_modes":
        consts["PARTS"] = cfg.get("PARTS", 1)
    return _resources(KERNELS[name], POINTERS[name], consts, cfg["num_warps"], cfg["num_stages"], DIVISIBLE)


def mix_resources(unroll: int, conj: bool, min_programs: int | None = None) -> dict:
    """Resources of the FFT route's mixing kernel (irno_kernels/triton/spectral_conv.py) at B16 C64
    m16 (_resources' keys): ``unroll`` input channels per loop step, the conj-transposed launch of the
    input gradient with ``conj``, the tiles of MIN_PROGRAMS = ``min_programs`` (None: the module's)."""
    from irno_kernels.triton import spectral_conv as C

    old = C.MIN_PROGRAMS
    C.MIN_PROGRAMS = old if min_programs is None else min_programs
    try:
        bm, bb, bo = C._mix_blocks(16, 16, 64, 32)
    finally:
        C.MIN_PROGRAMS = old
    consts = dict(CONJ_W=conj, IS_F64=False, BLOCK_M=bm, BLOCK_B=bb, BLOCK_O=bo, UNROLL=unroll,
                  BLOCK_Z=C.ZERO_BLOCK)
    # sizes and weight strides that are multiples of 16 at that shape (Wr = 129 and the column
    # stride 2 are not; n_mix and n_out are never specialised)
    divisible = ("B", "CI", "CO", "H", "M1", "M2", "ws_i", "ws_o", "ws_r")
    return _resources(C._spectral_mix_kernel, ("a_ptr", "w_ptr", "out_ptr"), consts, 4, 3, divisible)


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
    from irno_kernels.triton import spectral_conv as C

    # the mixing kernel: the module's settings, then the other channel counts per loop step that
    # tune_dft times, and the largest tiles
    variants = [(C.MIX_UNROLL, None, " (current)")] + [(u, None, "") for u in (1, 4, 8) if u != C.MIX_UNROLL]
    variants += [(C.MIX_UNROLL, 0, "")]
    for conj in (False, True):
        for unroll, min_programs, tag in variants[:1] if a.quick else variants:
            r = mix_resources(unroll, conj, min_programs)
            label = (f"UNROLL={unroll}" + (f" MIN_PROGRAMS={min_programs}" if min_programs is not None else "")
                     + tag)
            name = "mix input grad" if conj else "mix forward"
            line = (f"{name:14s} {'fp32':5s} {label:50s} {r['regs']:4d} {r['spill_bytes']:5d} {r['smem_bytes']:6d} "
                    f"{r['mma']:8s} {r['programs_per_sm']:8d} {r['warps_per_sm']:8d}")
            lines.append(line)
            print(line, flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
