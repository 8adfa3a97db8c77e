"""Build and install irno (the `irno` package) and irno_kernels (the op layer with its `_C` extension).

`pip install --no-build-isolation .` (or `-e .`) runs CMake on CMakeLists.txt with Ninja.

Environment:
  IRNO_CUDA=auto|0|1      compile the CUDA kernels: auto (default) when a CUDA toolkit and a CUDA
                          build of torch are both present; 0 never; 1 always (fails if impossible).
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0").
  IRNO_BUILD_DIR          CMake build folder (default build/<python tag>-<cpu|cuda>).
  MAX_JOBS                parallel compile jobs for Ninja.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CUDA_CMAKE_MIN = (3, 26)


def _cmake_binary() -> tuple[str, tuple[int, ...]]:
    """The newest CMake on offer: the PyPI `cmake` package if installed, else the one on PATH."""
    candidates = []
    try:
        import cmake  # the PyPI package ships its own binary

        candidates.append(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))
    except ImportError:
        pass
    if shutil.which("cmake"):
        candidates.append(shutil.which("cmake"))
    best = None
    for exe in candidates:
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        m = re.search(r"(\d+)\.(\d+)", out)
        if m:
            ver = (int(m.group(1)), int(m.group(2)))
            if best is None or ver > best[1]:
                best = (exe, ver)
    if best is None:
        raise RuntimeError("irno needs CMake to build its extension: `pip install 'cmake>=4'`")
    return best


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None


def _want_cuda(torch) -> tuple[bool, str]:
    mode = os.environ.get("IRNO_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"IRNO_CUDA must be auto, 0 or 1; got {mode!r}")
    have_torch = torch.version.cuda is not None
    home = _cuda_home()
    if mode == "0":
        return False, "IRNO_CUDA=0"
    if mode == "1":
        if not have_torch:
            raise RuntimeError(f"IRNO_CUDA=1 but torch {torch.__version__} is a CPU build")
        if home is None:
            raise RuntimeError("IRNO_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return True, "IRNO_CUDA=1"
    if have_torch and home is not None:
        return True, f"auto: torch {torch.__version__} + toolkit at {home}"
    why = "torch is a CPU build" if not have_torch else "no CUDA toolkit (nvcc) found"
    return False, f"auto: {why}"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        with_cuda, why = _want_cuda(torch)
        cmake, ver = _cmake_binary()
        if with_cuda and ver < CUDA_CMAKE_MIN:
            raise RuntimeError(
                f"the CUDA build needs CMake >= {CUDA_CMAKE_MIN[0]}.{CUDA_CMAKE_MIN[1]}, found "
                f"{ver[0]}.{ver[1]} at {cmake}: `pip install 'cmake>=4'` (or IRNO_CUDA=0)")
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-{'cuda' if with_cuda else 'cpu'}"
        build_dir = Path(os.environ.get("IRNO_BUILD_DIR", ROOT / "build" / tag)).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        print(f"irno: building _C with CUDA={'on' if with_cuda else 'off'} ({why}); cmake {ver}; {build_dir}")

        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DIRNO_OUTPUT_DIR={out_dir}",
            f"-DIRNO_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        try:
            import ninja  # prefer the PyPI ninja when present

            args.append(f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}")
        except ImportError:
            pass
        if with_cuda:
            args += _cuda_args()
        env = dict(os.environ)
        env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        subprocess.run([cmake, *args], check=True, env=env)
        build = [cmake, "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True, env=env)


def _cuda_args() -> list[str]:
    """Point CMake at the CUDA toolkit and at the headers/libs shipped in nvidia-* wheels."""
    home = _cuda_home()
    args = [f"-DCUDA_TOOLKIT_ROOT_DIR={home}", f"-DCMAKE_CUDA_COMPILER={home}/bin/nvcc"]
    # pip's CUDA torch ships cuBLAS/cuSPARSE/nvrtc in nvidia/*; a bare toolkit may lack their headers
    includes, nvrtc = [], None
    for sp in map(Path, sys.path):
        nv = sp / "nvidia"
        if not nv.is_dir():
            continue
        for inc in sorted(nv.glob("*/include")):
            includes.append(str(inc))
        for lib in sorted(nv.glob("*/lib/libnvrtc.so*")):
            nvrtc = nvrtc or str(lib)
        break
    if includes:
        joined = ";".join(includes)
        args += [f"-DCMAKE_CXX_FLAGS=-I{' -I'.join(includes)}", f"-DCMAKE_CUDA_FLAGS=-I{' -I'.join(includes)}",
                 f"-DCMAKE_INCLUDE_PATH={joined}"]
    if nvrtc:
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
    return args


class BuildPyWithConfigs(build_py):
    """Also ship the repository's configs/*.yaml as irno/configs/, so that an installed irno finds
    its built-in configs by name (``irno demo`` runs configs/demo.yaml; see irno.pipeline.builtin_configs).
    An editable install reads them from the repository's configs/ instead."""

    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib, "irno", "configs")
        dest.mkdir(parents=True, exist_ok=True)
        for cfg in sorted((ROOT / "configs").glob("*.yaml")):
            self.copy_file(str(cfg), str(dest / cfg.name))


setup(
    packages=["irno_kernels", *(f"irno_kernels.{p}" for p in find_packages("irno_kernels")),
              "irno", *(f"irno.{p}" for p in find_packages("python/irno"))],
    package_dir={"irno_kernels": "irno_kernels", "irno": "python/irno"},
    ext_modules=[CMakeExtension("irno_kernels._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithConfigs},
)
