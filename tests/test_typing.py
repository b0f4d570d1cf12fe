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
assert_type(ladle.ties(models, base, out=folder / "ties"), Path)
assert_type(ladle.dare(models, base, seed=1), dict[str, torch.Tensor])
assert_type(ladle.dare(models, base, out=folder / "dare"), Path)
assert_type(ladle.model_stock(models, base), dict[str, torch.Tensor])
assert_type(ladle.model_stock(models, base, out=folder / "model_stock"), Path)
assert_type(ladle.ratatouille(models), dict[str, torch.Tensor])
assert_type(ladle.ratatouille(models, out=folder / "ratatouille"), Path)
assert_type(ladle.ratatouille_init(models[0], {"h": torch.ones(1)}), dict[str, torch.Tensor])
assert_type(ladle.ratatouille_init(models[0], {"h": torch.ones(1)}, out="init"), Path)
assert_type(
    ladle.ratatouille(models, selection="greedy", evaluate=lambda sd: 0.0),
    ladle.GreedySoupResult,
)
maybe: str | None = None
assert_type(ladle.uniform_soup(models, out=maybe), dict[str, torch.Tensor] | Path)
configured: str = "uniform"  # a selection known at run time alone: without evaluate, uniform
assert_type(ladle.ratatouille(models, selection=configured), dict[str, torch.Tensor])
assert_type(ladle.ratatouille(models, selection=configured, out=folder / "r2"), Path)
from ladle.checkpoint import TensorMapCheckpoint

with TensorMapCheckpoint(base) as opened:  # a subclass's with-statement: the subclass
    assert_type(opened, TensorMapCheckpoint)
torch.nn.Linear(2, 2).load_state_dict(ladle.uniform_soup([torch.nn.Linear(2, 2)]))
"""

# Numbers as users hold them (0-d tensors, metrics, numpy scalars, 1-d tensors and arrays of
# weights) where ladle.NumberLike / NumbersLike are taken: each call type-checks (part of the
# script above) and gives exactly what the plain floats give (run on its own too).
NUMBERS_SCRIPT = """
import numpy as np
import torch

import ladle

pair = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([5.0, 10.0])}]
origin = {"w": torch.tensor([1.0, 1.0])}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (a, b)


def score(state_dict: dict[str, torch.Tensor]) -> torch.Tensor:  # a metric, not a float
    return -(state_dict["w"] - 2.0).abs().sum()


soup = ladle.uniform_soup(pair, weights=[1, 3])
same(ladle.uniform_soup(pair, weights=torch.tensor([1.0, 3.0])), soup)
same(ladle.uniform_soup(pair, weights=np.array([1.0, 3.0])), soup)
same(ladle.uniform_soup(pair, weights=[torch.tensor(1.0), np.float32(3)]), soup)
same(ladle.uniform_soup(pair, weights=torch.softmax(torch.zeros(2), 0)), ladle.uniform_soup(pair))
same(
    ladle.task_arithmetic(pair, origin, scale=torch.tensor(0.5), weights=torch.tensor([1, 2])),
    ladle.task_arithmetic(pair, origin, scale=0.5, weights=[1, 2]),
)
same(
    ladle.task_arithmetic(pair, origin, scale=np.float32(0.5), weights=np.array([1, 2])),
    ladle.task_arithmetic(pair, origin, scale=0.5, weights=[1, 2]),
)
same(
    ladle.ties(pair, origin, density=torch.tensor(0.5), scale=np.array(2.0)),
    ladle.ties(pair, origin, density=0.5, scale=2.0),
)
same(
    ladle.dare(pair, origin, density=np.float64(0.5), scale=torch.tensor(2.0), seed=3),
    ladle.dare(pair, origin, density=0.5, scale=2.0, seed=3),
)
same(ladle.scale(pair[0], torch.tensor(0.5)), ladle.scale(pair[0], 0.5))
same(ladle.add(pair[0], pair[1], alpha=np.float32(2)), ladle.add(pair[0], pair[1], alpha=2))
same(ladle.lerp(pair[0], pair[1], np.array(0.25)), ladle.lerp(pair[0], pair[1], 0.25))
same(ladle.weighted_sum(pair, torch.tensor([0.5, 0.25])), ladle.weighted_sum(pair, [0.5, 0.25]))
same(ladle.weighted_sum(pair, np.array([0.5, 0.25])), ladle.weighted_sum(pair, [0.5, 0.25]))
from ladle.testing import assert_state_dicts_close, state_dicts

assert_state_dicts_close(pair[0], pair[0], rtol=np.float32(1e-3), atol=torch.tensor(1e-5))
state_dicts(bound=np.float32(1.0))
greedy = ladle.greedy_soup(pair, score, scores=torch.tensor([1.0, 2.0]))
assert greedy.selected == [1] and greedy.score == 2.0, greedy  # scores as given; 0 lowers it
same(greedy.state_dict, pair[1])
chosen = ladle.ratatouille(pair, selection="greedy", evaluate=score, scores=np.array([2, 1]))
assert chosen.selected == [0], chosen
same(chosen.state_dict, pair[0])
# Seeds as numbers are taken (a numpy int, a 0-d tensor); mypy refused all but int.
same(ladle.dare(pair, origin, seed=np.int64(3)), ladle.dare(pair, origin, seed=3))
same(ladle.dare(pair, origin, seed=torch.tensor(3)), ladle.dare(pair, origin, seed=3))
# numpy's complex scalars for complex tensors (np.complex64 is no Python complex)
waves = {"z": torch.tensor([1 + 2j, 3 - 1j])}
same(ladle.scale(waves, np.complex64(2j)), ladle.scale(waves, 2j))
same(ladle.lerp(waves, waves, np.complex64(0.5)), ladle.lerp(waves, waves, 0.5))
same(ladle.add(waves, waves, alpha=np.complex64(1j)), ladle.add(waves, waves, alpha=1j))
twice = [waves, waves]
same(ladle.weighted_sum(twice, [np.complex64(1j), 1]), ladle.weighted_sum(twice, [1j, 1]))
# average_ gives back the type it is given (it was nn.Module, MutableMapping).
import tempfile
import torch.distributed as dist
from ladle.distributed import average_

rendezvous = f"file://{tempfile.mkdtemp()}/rdv"
dist.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=1)
linear: torch.nn.Linear = average_(torch.nn.Linear(2, 2))
state: dict[str, torch.Tensor] = average_({"w": torch.ones(2)})
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_merge_methods_return_a_state_dict_without_out_and_a_path_with_it(tmp_path):
    # Every method returned "dict[str, Tensor] | Path" to mypy, whatever out was:
    # model.load_state_dict(ladle.uniform_soup(models)) failed to type-check.
    result = _mypy(tmp_path, textwrap.dedent(USER_SCRIPT) + textwrap.dedent(NUMBERS_SCRIPT))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_a_name_ladle_does_not_have_is_an_error_to_mypy_not_any(tmp_path):
    # The lazy imports' module __getattr__ made every unknown name Any to a type checker:
    # a typo passed mypy --strict and failed at run time.
    result = _mypy(
        tmp_path,
        "import ladle\nfrom ladle import greedy_sup\nladle.unifrom_soup([])\n"
        # submodules, reached from the package: no errors
        "ladle.engine.row_chunks((2, 3), 8)\nladle.methods.ties.keep_rank(10, 0.5)\n"
        "ladle.testing.state_dicts()\nladle.cli.main(['--version'])\n",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, result.stdout
    assert 'Module "ladle" has no attribute "greedy_sup"' in errors[0]
    assert 'Module has no attribute "unifrom_soup"; maybe "uniform_soup"?' in errors[1]


def _mypy(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """mypy --strict of a user's script holding ``text``, against the ladle under test."""
    pytest.importorskip("mypy")
    script = tmp_path / "user_script.py"
    script.write_text(text)
    source = Path(ladle.__file__).resolve().parent.parent  # the ladle under test
    env = dict(os.environ)
    if source.name not in ("site-packages", "dist-packages"):
        # A source tree (src/). An installed ladle mypy finds itself, and it refuses
        # site-packages in MYPYPATH (tox and distributions test the installed package).
        env["MYPYPATH"] = str(source)
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
        env=env,
        cwd=tmp_path,
    )
    return result


def test_the_user_scripts_run_and_numbers_given_as_tensors_or_arrays_merge_as_floats(
    tmp_path, monkeypatch
):
    # "Every line runs": the scripts that mypy checks above, run. The numbers script asserts
    # that weights=torch.tensor([1., 3.]), np.array([1., 3.]), density=torch.tensor(0.5),
    # ... merge exactly as [1, 3], 0.5 do (what ladle.NumberLike/NumbersLike promise).
    pytest.importorskip("typing_extensions")
    monkeypatch.chdir(tmp_path)
    exec(compile(textwrap.dedent(USER_SCRIPT), "user_script", "exec"), {})
    written = ["dare", "model_stock", "r2", "ratatouille", "s.safetensors", "ties"]
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == written
    exec(compile(textwrap.dedent(NUMBERS_SCRIPT), "numbers_script", "exec"), {})


OVERLOADED = {  # each method, and the parameters that tell its overloads apart
    "uniform_soup": {"out"},
    "task_arithmetic": {"out"},
    "ties": {"out"},
    "dare": {"out"},
    "model_stock": {"out"},
    "ratatouille": {"selection", "evaluate", "scores", "out"},
    "ratatouille_init": {"out"},
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
