"""The README's Python examples run as written (on CPU, in order, sharing one namespace), so the
documentation cannot drift from the API."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README lost its Python examples"
    torch.manual_seed(0)
    namespace: dict = {}
    for k, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {k}", "exec"), namespace)  # noqa: S102
    # what the blocks promise
    assert namespace["h_K"].shape == (8, 1, 64, 64)
    assert len(namespace["traj"]) == 13
    assert torch.isfinite(namespace["loss"]).item()
    assert set(namespace["parts"]) >= {"mse", "spec", "fp"}
