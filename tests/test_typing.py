"""What a type checker sees: the public signatures type-check in natural use."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import typing
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


OVERLOADED = {  # each method, and the parameters that tell its overloads apart
    "uniform_soup": {"out"},
    "task_arithmetic": {"out"},
    "ties": {"out"},
    "dare": {"out"},
    "model_stock": {"out"},
    "ratatouille": {"selection", "evaluate", "scores", "out"},
}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads: Python 3.11")
@pytest.mark.parametrize("name", list(OVERLOADED))
def test_overloads_take_every_argument_type_the_function_takes(name):
    # The overloads are what a type checker sees: ratatouille(dtype="bf16") ran but was
    # refused by mypy. Each overload takes every parameter, with the implementation's type.
    function = getattr(ladle, name)
    implementation = inspect.signature(function).parameters
    overloads = typing.get_overloads(function)
    assert len(overloads) >= 2
    for overload in overloads:
        parameters = inspect.signature(overload).parameters
        assert list(parameters) == list(implementation), name
        for argument, parameter in parameters.items():
            if argument not in OVERLOADED[name]:
                assert parameter.annotation == implementation[argument].annotation, argument
