"""Backend choice: defaults, forcing by keyword and by IRNO_BACKEND, clear errors, and import
without the compiled module."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import irno_kernels as ik
from irno_kernels import backend as bk


def test_backends_reports_every_op_and_device():
    table = ik.backends()
    assert set(table) == set(bk.OPS)
    for op, per_device in table.items():
        assert set(per_device) == {"cpu", "cuda"}
        assert per_device["cpu"] in ("cpu", "reference")
        assert per_device["cuda"] in ("cuda", "triton", "reference")
        if ik.HAS_C and op in ("residual_update", "refine_update"):
            assert per_device["cpu"] == "cpu"


def test_keyword_forces_a_backend():
    h, phi = torch.randn(2, 3), torch.randn(2, 3)
    assert bk.resolve("residual_update", "cpu", "reference") == "reference"
    torch.testing.assert_close(ik.residual_update(h, phi, 0.5, backend="reference"), h + 0.5 * phi)


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("IRNO_BACKEND", "reference")
    assert bk.resolve("refine_update", "cpu") == "reference"
    monkeypatch.setenv("IRNO_BACKEND", "auto")
    assert bk.resolve("refine_update", "cpu") == ("cpu" if ik.HAS_C else "reference")
    monkeypatch.setenv("IRNO_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run refine_update on cpu tensors"):
        ik.refine_update(torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(2, 2), None, 0.1)
    monkeypatch.setenv("IRNO_BACKEND", "fortran")
    with pytest.raises(ValueError, match="IRNO_BACKEND: expected one of"):
        bk.resolve("refine_update", "cpu")


def test_keyword_wins_over_environment(monkeypatch):
    monkeypatch.setenv("IRNO_BACKEND", "cuda")
    assert bk.resolve("residual_update", "cpu", "reference") == "reference"


def test_absent_backends_raise_with_a_hint(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton on CPU tensors needs the interpreter
    with pytest.raises(RuntimeError, match="'cuda' backend takes CUDA tensors only|compiled without CUDA"):
        bk.resolve("residual_update", "cpu", "cuda")
    with pytest.raises(RuntimeError, match="triton"):
        bk.resolve("residual_update", "cpu", "triton")
    with pytest.raises(ValueError, match="backend: expected one of"):
        bk.resolve("residual_update", "cpu", "numpy")
    with pytest.raises(ValueError, match="op: expected one of"):
        bk.resolve("conv3d", "cpu")


@pytest.mark.skipif(not bk._triton_ops(), reason="needs triton")
def test_fields_too_large_for_32_bit_offsets_skip_triton(monkeypatch):
    """The automatic choice passes over Triton for inputs of TRITON_MAX_ELEMENTS or more (its kernels
    address with 32-bit offsets); forcing it then is a clear error (the limit is lowered here)."""
    monkeypatch.setattr(bk, "TRITON_MAX_ELEMENTS", 100)
    small, big = torch.empty(2, 3, 4, 4), torch.empty(2, 3, 5, 4)  # 96 and 120 elements
    cuda = torch.device("cuda")  # resolve looks at the device type only: no GPU needed
    assert bk.resolve("periodic_pad2d", cuda, None, (small,)) == "triton"
    assert bk.resolve("periodic_pad2d", cuda, None, (small, big)) == "reference"
    # a view of fewer elements counts by how far its strides reach into the storage
    assert bk.resolve("periodic_pad2d", cuda, None, (torch.empty(2, 12, 4, 4)[:, :1],)) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="cannot run periodic_pad2d on a tensor of 100 elements or more, or a view"):
        bk.resolve("periodic_pad2d", "cpu", "triton", (big,))


def test_build_info_reports_the_build():
    info = ik.build_info()
    if ik.HAS_C:
        assert info["built"] is True
        assert info["torch_version"] == torch.__version__.split("+")[0]
        assert isinstance(info["with_cuda"], bool)
        assert info["cxx_compiler"]
    else:
        assert info["built"] is False and info["error"]


def test_import_without_compiled_module_falls_back_to_reference():
    """With _C unavailable, import warns once, the references serve, and forcing 'cpu' explains."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["irno_kernels._C"] = None          # makes `from irno_kernels import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import irno_kernels as ik
        import torch
        msgs = [str(w.message) for w in caught if "irno_kernels._C" in str(w.message)]
        assert len(msgs) == 1 and "pip install --no-build-isolation" in msgs[0], msgs
        assert not ik.HAS_C and ik.backends()["refine_update"]["cpu"] == "reference"
        h, phi = torch.randn(2, 3), torch.randn(2, 3)
        assert torch.equal(ik.residual_update(h, phi, 0.5), h + 0.5 * phi)
        try:
            ik.residual_update(h, phi, 0.5, backend="cpu")
        except RuntimeError as e:
            assert "not built" in str(e), e
        else:
            raise AssertionError("forcing an absent backend must fail")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "IRNO_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
