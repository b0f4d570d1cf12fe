"""Recipes: valid ones run step by step; invalid ones fail up front naming step and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import family
from safetensors.torch import save_file

import ladle
from ladle.cli import main
from ladle.recipe import StepRef, load_recipe, run_recipe

EXAMPLES = Path(__file__).parent.parent / "examples" / "recipes"


@pytest.fixture
def folder(tmp_path):
    for i, model in enumerate(family(3, seed=11)):
        save_file(model, tmp_path / f"m{i}.safetensors")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "recipe.toml"
    path.write_text(text)
    return path


def test_single_step_recipe_equals_the_direct_call(folder):
    recipe = write(
        folder,
        'method = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "out.safetensors"\n[parameters]\nweights = [1, 3]\n',
    )
    results = run_recipe(recipe, device="cpu")
    assert results == {"main": folder / "out.safetensors"}
    expected = ladle.uniform_soup(
        [folder / "m0.safetensors", folder / "m1.safetensors"], weights=[1, 3], device="cpu"
    )
    merged = ladle.load(folder / "out.safetensors")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_later_step_uses_an_earlier_steps_output_in_memory_or_on_disk(folder):
    recipe = write(
        folder,
        """
[steps.pair]
method = "uniform_soup"
models = ["m0.safetensors", "m1.safetensors"]

[steps.saved]
method = "soup"
models = ["pair", "m2.safetensors"]
output = "saved.safetensors"

[steps.final]
method = "soup"
models = ["saved", "pair"]
dtype = "bf16"
output = "final"
""",
    )
    steps = load_recipe(recipe).steps
    assert steps[1].models == (StepRef("pair"), str(folder / "m2.safetensors"))
    results = run_recipe(recipe, device="cpu")
    assert results["saved"] == folder / "saved.safetensors"
    assert results["final"] == folder / "final"
    m0, m1, m2 = family(3, seed=11)
    pair = (m0["layer.weight"] + m1["layer.weight"]) / 2
    saved = (pair + m2["layer.weight"]) / 2
    final = ladle.load(folder / "final")["layer.weight"]
    assert final.dtype == torch.bfloat16
    assert torch.allclose(final.float(), ((saved + pair) / 2).bfloat16().float())
    assert (folder / "final" / "README.md").exists()


def test_example_recipes_are_valid(tmp_path):
    for example in sorted(EXAMPLES.glob("*.toml")):
        copy = tmp_path / example.stem
        copy.mkdir()
        shutil.copy(example, copy / example.name)
        for name in ("base", "a", "b", "c"):  # the local inputs the examples name
            save_file(family(1, seed=1)[0], copy / f"{name}.safetensors")
        try:
            load_recipe(copy / example.name)
        except ValueError as err:
            if "not in this version" not in str(err) and "hf://" not in str(err):
                raise


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('method = "soup"\nmodels = ["m0.safetensors"]\n', r"recipe\.output: missing"),
        ('models = ["m0.safetensors"]\noutput = "o"\n', r"recipe\.method: missing"),
        ('method = "blend"\nmodels = ["m0.safetensors"]\noutput = "o"\n', "unknown method 'blend'"),
        ('method = "soup"\nmodels = []\noutput = "o"\n', r"recipe\.models: expected a non-empty"),
        (
            'method = "soup"\nmodels = ["nope.pt"]\noutput = "o"\n',
            r"models\[0\]: 'nope.pt': no such",
        ),
        ('method = "soup"\nmodels = ["hf://x"]\noutput = "o"\n', r"models\[0\]: hf://x: no repo"),
        (
            'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n[parameters]\nscale = 2\n',
            r"recipe\.parameters\.scale: uniform_soup has no parameter 'scale'",
        ),
        (
            'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n[parameters]\nout = "x"\n',
            r"recipe\.parameters\.out: set by the recipe itself",
        ),
        (
            'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\nweights = [1]\n',
            r"recipe\.weights: unknown field",
        ),
        (
            'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\ndtype = "int8"\n',
            r"recipe\.dtype: expected one of",
        ),
        (
            'method = "soup"\nmodels = ["m0.safetensors"]\nbase = "m1.safetensors"\noutput = "o"\n',
            r"recipe\.base: uniform_soup takes no base model",
        ),
        ('method = "soup"\nmodels = [1.0.0]\noutput = "o"\n', r"not valid TOML: .*line 2"),
        (
            '[steps.a]\nmethod = "soup"\nmodels = ["b"]\n'
            '[steps.b]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n',
            r"steps\.a\.models\[0\]: step 'b' comes later",
        ),
        (
            'output = "o"\n[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\n',
            r"output: with \[steps\.\*\] tables",
        ),
        (
            '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n'
            '[steps.b]\nmethod = "soup"\nmodels = ["a"]\noutput = "o"\n',
            r"steps\.a\.output: another step writes",
        ),
    ],
)
def test_invalid_recipe_fails_up_front_naming_the_field(folder, text, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(write(folder, text))
    assert sorted(p.name for p in folder.iterdir() if p.name != "recipe.toml") == [
        "m0.safetensors",
        "m1.safetensors",
        "m2.safetensors",
    ]


def test_method_needing_a_base_requires_one(folder):
    if not hasattr(ladle, "task_arithmetic"):
        pytest.skip("task_arithmetic is not in this checkout")
    text = 'method = "task-arithmetic"\nmodels = ["m0.safetensors"]\noutput = "o"\n'
    with pytest.raises(ValueError, match=r"recipe\.base: missing; task_arithmetic needs a base"):
        load_recipe(write(folder, text))


def test_existing_output_is_refused_before_any_step_runs(folder):
    recipe = write(
        folder,
        '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "a.safetensors"\n'
        '[steps.b]\nmethod = "soup"\nmodels = ["a"]\noutput = "m1.safetensors"\n',
    )
    with pytest.raises(ladle.LadleError, match=r"steps\.b\.output: .* already exists"):
        run_recipe(recipe, device="cpu")
    assert not (folder / "a.safetensors").exists()


def test_cli_run_prints_outputs_and_reports_errors_in_one_line(folder, capsys):
    recipe = write(folder, 'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n')
    assert main(["run", str(recipe), "--device", "cpu"]) == 0
    assert capsys.readouterr().out == f"main: {folder / 'o'}\n"
    assert main(["run", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert main(["run", str(recipe), "--overwrite", "--device", "cpu"]) == 0
