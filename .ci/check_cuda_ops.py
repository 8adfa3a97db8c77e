"""CI check for the CUDA build: every op of a TORCH_LIBRARY_IMPL(irno, CUDA, m) block in csrc/*.cu or
csrc/*_cuda.cpp (the host code of the CUDA ops) is registered for the CUDA dispatch key.

Usage: python check_cuda_ops.py CSRC_DIR   (run outside the repository, with the CUDA build installed)
"""

import re
import sys
from pathlib import Path

import torch

import irno_kernels

info = irno_kernels.build_info()
print("build_info:", info)
if not info.get("with_cuda"):
    sys.exit("irno_kernels._C was built without CUDA")

csrc = Path(sys.argv[1])
impl = re.compile(r'TORCH_LIBRARY_IMPL\(irno,\s*CUDA,\s*m\)\s*\{(.*?)\n\}', re.S)
name = re.compile(r'm\.impl\("([A-Za-z0-9_]+)"')
missing, found = [], []
for cu in sorted([*csrc.glob("*.cu"), *csrc.glob("*_cuda.cpp")]):
    for block in impl.findall(cu.read_text()):
        for op in name.findall(block):
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"irno::{op}", "CUDA")
            (found if ok else missing).append(f"{cu.name}:{op}")
print("CUDA kernels registered:", ", ".join(found) or "none")
if not found:
    sys.exit("no TORCH_LIBRARY_IMPL(irno, CUDA, ...) block found in any .cu or _cuda.cpp file")
if missing:
    sys.exit(f"ops with a CUDA implementation in csrc but not registered for CUDA: {missing}")
print("backends:", irno_kernels.backends())
