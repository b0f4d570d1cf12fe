"""What a type checker sees: the public signatures type-check in natural use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ladle

# A user's merge script: every line runs; each assert_type is what mypy must infer.
USER_SCRIPT = """
from pathlib import Path

import torch
from typing_extensions import assert_type

import ladle

models = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
base = {"w": torch.zeros(2)}
folder = Path("merged")

assert_type(ladle.uniform_soup(models), dict[str, torch.Tensor])
assert_type(ladle.uniform_soup(models, weights=[1, 2], out=folder / "s.safetensors"), Path)
assert_type(ladle.task_arithmetic(models, base, scale=0.5), dict[str, torch.Tensor])
assert_type(ladle.task_arithmetic(models, base, out="ta"), Path)
assert_type(ladle.ties(models, base, density=0.5), dict[str, torch.Tensor])
assert_type(ladle.ties(models, base, out=folder), Path)
assert_type(ladle.dare(models, base, seed=1), dict[str, torch.Tensor])
assert_type(ladle.dare(models, base, out=folder), Path)
assert_type(ladle.model_stock(models, base), dict[str, torch.Tensor])
assert_type(ladle.model_stock(models, base, out=folder), Path)
assert_type(ladle.ratatouille(models), dict[str, torch.Tensor])
assert_type(ladle.ratatouille(models, out=folder), Path)
assert_type(
    ladle.ratatouille(models, selection="greedy", evaluate=lambda sd: 0.0),
    ladle.GreedySoupResult,
)
maybe: str | None = None
assert_type(ladle.uniform_soup(models, out=maybe), dict[str, torch.Tensor] | Path)
torch.nn.Linear(2, 2).load_state_dict(ladle.uniform_soup([torch.nn.Linear(2, 2)]))
"""


@pytest.mark.slow
def test_merge_methods_return_a_state_dict_without_out_and_a_path_with_it(tmp_path):
    # Every method returned "dict[str, Tensor] | Path" to mypy, whatever out was:
    # model.load_state_dict(ladle.uniform_soup(models)) failed to type-check.
    pytest.importorskip("mypy")
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    source = Path(ladle.__file__).resolve().parent.parent  # the ladle under test
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--config-file",
            os.devnull,
            "--cache-dir",
            str(tmp_path / "cache"),
            str(script),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MYPYPATH": str(source)},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
