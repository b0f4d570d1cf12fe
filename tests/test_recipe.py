"""Recipes: valid ones run step by step; invalid ones fail up front naming step and field."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_bit_for_bit, family
from safetensors.torch import save, save_file

import ladle
import ladle.testing
from ladle.cli import main
from ladle.recipe import StepRef, load_callable, load_recipe, run_recipe

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
            'method = "soup"\nmodels = ["hf://o/a--b"]\noutput = "o"\n',
            r"models\[0\]: hf://o/a--b: malformed repository id 'o/a--b' \(Cannot have --",
        ),
        (
            'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n[parameters]\nscale = 2\n',
            r"recipe\.parameters\.scale: uniform_soup has no parameter 'scale'; expected one of "
            r"weights, chunk_bytes, allow_nonfinite$",
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
            '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\nmax_shard_size = "1GB"\n'
            '[steps.b]\nmethod = "soup"\nmodels = ["a"]\noutput = "o"\n',
            r"steps\.a\.max_shard_size: applies to a directory output; this step has no output",
        ),
        (
            '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors", "a"]\noutput = "o"\n',
            r"steps\.a\.models\[1\]: 'a': no such file .*this step's own name",
        ),
        (
            '[steps.a]\nmethod = "ties"\nmodels = ["m0.safetensors"]\nbase = "a"\noutput = "o"\n',
            r"steps\.a\.base: 'a': no such file .*this step's own name",
        ),
        (
            'output = "o"\n[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\n',
            r"output: with \[steps\.\*\] tables",
        ),
        (
            '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n'
            '[steps.b]\nmethod = "soup"\nmodels = ["a"]\noutput = "o"\n',
            r"steps\.a\.output: step 'b' writes .*o too",
        ),
        (
            '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n'
            '[steps.b]\nmethod = "soup"\nmodels = ["a"]\noutput = "./sub/../o"\n',
            r"steps\.a\.output: step 'b' writes",
        ),
        (
            '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n'
            '[steps.b]\nmethod = "soup"\nmodels = ["a"]\noutput = "o/b.safetensors"\n',
            r"steps\.a\.output: step 'b' writes .*o/b\.safetensors too",
        ),
        (  # one file on a volume that ignores case (macOS): the second replaced the first
            '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "Out.safetensors"\n'
            '[steps.b]\nmethod = "soup"\nmodels = ["a"]\noutput = "out.safetensors"\n',
            r"steps\.a\.output: step 'b' writes .*/out\.safetensors too \(one place where names "
            r"ignore case, as on macOS\)$",
        ),
        (  # and a step writing into the other's folder
            '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "Merged"\n'
            '[steps.b]\nmethod = "soup"\nmodels = ["a"]\noutput = "merged/b.safetensors"\n',
            r"steps\.a\.output: step 'b' writes .*/merged/b\.safetensors too \(one place",
        ),
        (
            '[steps.x]\nmethod = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
            'output = "m2.safetensors"\n'
            '[steps.y]\nmethod = "soup"\nmodels = ["x", "m2.safetensors"]\noutput = "e"\n',
            r"steps\.x\.output: .*m2\.safetensors would overwrite .*m2\.safetensors, an input "
            r"of step 'y'; a recipe never writes over its inputs; to use this step's output, "
            r"name 'x' in its models",
        ),
        (
            'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "m0.safetensors"\n',
            r"recipe\.output: .* would overwrite .*, an input of the recipe",
        ),
        (
            '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "s1"\n'
            '[steps.b]\nmethod = "soup"\nmodels = ["s1", "m1.safetensors"]\noutput = "o"\n',
            r"steps\.b\.models\[0\]: 's1': no such file or directory .*; to use step 'a''s "
            r"output, name 'a'",
        ),
        (
            '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "s1"\n'
            '[steps.b]\nmethod = "soup"\nmodels = ["x/../s1", "m1.safetensors"]\noutput = "o"\n',
            r"steps\.b\.models\[0\]: 'x/\.\./s1': no such file .*; to use step 'a''s output",
        ),
        (
            'method = "greedy_soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n',
            r"recipe\.parameters\.evaluate: required by greedy_soup",
        ),
        (
            'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n'
            "[parameters]\nweights = 3\n",
            r"recipe\.parameters\.weights: expected a list of numbers, found 3",
        ),
        (
            'method = "ties"\nmodels = ["m0.safetensors"]\nbase = "m1.safetensors"\n'
            'output = "o"\n[parameters]\ndensity = "0.2"\n',
            r"recipe\.parameters\.density: expected a number, found '0\.2'",
        ),
        (
            'method = "dare"\nmodels = ["m0.safetensors"]\nbase = "m1.safetensors"\n'
            'output = "o"\n[parameters]\nseed = 1.5\n',
            r"recipe\.parameters\.seed: expected an integer, found 1\.5",
        ),
        (
            'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\nmax_shard_size = true\n',
            r"recipe\.max_shard_size: expected",
        ),
        (
            '[steps.one]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "a"\n'
            '[steps.two]\nmethod = "soup"\nmodels = ["one"]\noutput = "b"\n'
            'max_shard_size = "banana"\n',
            r"steps\.two\.max_shard_size: expected e\.g\. '5GB', found 'banana'",
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


def test_an_output_below_a_file_is_refused_before_any_step_runs(folder):
    (folder / "notes.txt").write_text("mine")
    recipe = write(
        folder,
        '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "a.safetensors"\n'
        '[steps.b]\nmethod = "soup"\nmodels = ["a"]\noutput = "notes.txt/merged"\n',
    )
    with pytest.raises(
        ladle.OutputError, match=r"^steps\.b\.output: .*notes\.txt/merged: .*notes\.txt is a file"
    ):
        run_recipe(recipe, device="cpu")
    assert not (folder / "a.safetensors").exists()
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ('models = ["m0.safetensors", "m1\\u0000.safetensors"]', r"recipe\.models\[1\]: a path"),
        ('models = ["m0.safetensors"]\nbase = "m1\\u0000"', r"recipe\.base: a path"),
        (
            'models = ["m0.safetensors"]\noutput = "o\\u0000.safetensors"',
            r"recipe\.output: .*a path",
        ),
    ],
)
def test_a_nul_character_in_a_path_is_refused_naming_the_field(folder, fields, message):
    method = "ties" if "base" in fields else "soup"
    with pytest.raises(ValueError, match=message + " cannot hold a NUL character"):
        load_recipe(write(folder, f'method = "{method}"\n{fields}\n'))


def test_an_output_folder_name_too_long_is_refused_naming_the_field(folder):
    text = f'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "{"x" * 300}/merged"\n'
    with pytest.raises(ValueError, match=r"recipe\.output: .*folder name x+… is 300 bytes long"):
        load_recipe(write(folder, text))


def test_overwrite_refuses_a_later_output_that_is_no_earlier_output_before_any_step(folder):
    (folder / "notes").write_text("mine")  # a file where a folder output goes
    recipe = write(
        folder,
        '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "a.safetensors"\n'
        '[steps.b]\nmethod = "soup"\nmodels = ["a"]\noutput = "notes"\n',
    )
    with pytest.raises(ladle.LadleError, match=r"^steps\.b\.output: .*notes: is a file, where"):
        run_recipe(recipe, device="cpu", overwrite=True)
    assert not (folder / "a.safetensors").exists()
    assert (folder / "notes").read_text() == "mine"


def test_cli_run_prints_outputs_and_reports_errors_in_one_line(folder, capsys):
    recipe = write(folder, 'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n')
    assert main(["run", str(recipe), "--device", "cpu"]) == 0
    assert capsys.readouterr().out == f"main: {folder / 'o'}\n"
    assert main(["run", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert main(["run", str(recipe), "--overwrite", "--device", "cpu"]) == 0


def test_a_bad_device_fails_before_any_step_runs(folder):
    recipe = write(
        folder, 'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o.safetensors"\n'
    )
    for device in ("tpu", "cuda:99"):
        with pytest.raises(ValueError, match=r"^device: "):  # no step's, checked up front
            run_recipe(recipe, device=device)
    assert not (folder / "o.safetensors").exists()


def test_an_evaluate_that_cannot_be_imported_fails_before_any_step_runs(folder):
    recipe = write(
        folder,
        '[steps.first]\nmethod = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "first.safetensors"\n'
        '[steps.greedy]\nmethod = "greedy_soup"\nmodels = ["first", "m2.safetensors"]\n'
        'output = "g.safetensors"\n[steps.greedy.parameters]\nevaluate = "nosuchmod:acc"\n',
    )
    with pytest.raises(
        ValueError,
        match=r"steps\.greedy\.parameters\.evaluate: cannot import 'nosuchmod:acc': "
        r"ModuleNotFoundError",
    ):
        run_recipe(recipe, device="cpu")
    assert not (folder / "first.safetensors").exists()


EVALUATE = """
from __future__ import annotations
from dataclasses import dataclass
from helpers import weight_of

@dataclass
class Config:
    key: str = "layer.weight"

def score(state_dict):
    return -weight_of(state_dict, Config().key)
"""


@pytest.mark.parametrize("reference", ["evals:score", "evals.py:score", "sub/evals.py:score"])
def test_evaluate_is_found_beside_the_recipe_from_any_working_directory(
    folder, tmp_path_factory, monkeypatch, reference
):
    where = folder / "sub" if reference.startswith("sub/") else folder
    where.mkdir(exist_ok=True)
    (where / "evals.py").write_text(EVALUATE)  # a dataclass under postponed annotations
    (where / "helpers.py").write_text(  # and a sibling import
        "def weight_of(sd, key):\n    return float(sd[key].abs().sum())\n"
    )
    if reference == "evals:score":  # a module is searched for beside the recipe
        (folder / "helpers.py").write_text((where / "helpers.py").read_text())
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # restored afterwards
    for name in ("evals", "helpers"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    recipe = write(
        folder,
        'method = "greedy_soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        f'output = "g.safetensors"\n[parameters]\nevaluate = "{reference}"\n',
    )
    assert run_recipe(recipe, device="cpu")["main"] == folder / "g.safetensors"
    models = [folder / f"m{i}.safetensors" for i in range(2)]
    direct = ladle.greedy_soup(models, lambda sd: -float(sd["layer.weight"].abs().sum()))
    written = ladle.load(folder / "g.safetensors")
    assert written.keys() == direct.state_dict.keys()
    assert all(torch.equal(written[k], direct.state_dict[k]) for k in written)


def test_an_evaluate_file_named_like_the_library_it_imports_gets_the_library(tmp_path, monkeypatch):
    from ladle.recipe import load_callable

    site = tmp_path / "site" / "evallib_x"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("def load(name):\n    return len(name)\n")
    work = tmp_path / "work"
    work.mkdir()
    runs = tmp_path / "runs.txt"
    (work / "evallib_x.py").write_text(  # the user's file, named like the library
        f"import evallib_x\nwith open({str(runs)!r}, 'a') as f:\n    f.write('ran\\n')\n"
        "metric = evallib_x.load('accuracy')\n\ndef score(sd):\n    return float(metric)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    first = load_callable("work/evallib_x.py:score", folder=tmp_path)
    again = load_callable("work/evallib_x.py:score", folder=tmp_path)
    assert first({}) == 8.0 and again is first  # the library's load("accuracy"); run once
    assert runs.read_text() == "ran\n"
    assert __import__("sys").modules["evallib_x"].__file__ == str(site / "__init__.py")


def test_a_dangling_link_as_a_later_steps_output_is_refused_before_any_step_runs(folder):
    (folder / "link.safetensors").symlink_to(folder / "nowhere" / "x.safetensors")
    recipe = write(
        folder,
        '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "a.safetensors"\n'
        '[steps.b]\nmethod = "soup"\nmodels = ["a", "m2.safetensors"]\n'
        'output = "link.safetensors"\n',
    )
    with pytest.raises(ladle.LadleError, match=r"steps\.b\.output: .*link\.safetensors: already"):
        run_recipe(recipe, device="cpu")
    assert not (folder / "a.safetensors").exists()


def test_an_input_that_is_a_symbolic_link_loop_is_one_error(folder):
    (folder / "loop1").symlink_to(folder / "loop2")
    (folder / "loop2").symlink_to(folder / "loop1")
    recipe = write(folder, 'method = "soup"\nmodels = ["m0.safetensors", "loop1"]\noutput = "o"\n')
    with pytest.raises(ValueError, match=r"recipe\.models\[1\]: 'loop1': no such file"):
        load_recipe(recipe)


def test_an_input_that_cannot_be_stated_is_refused_naming_field_and_path(folder):
    # os.stat failing otherwise than "no such file" (a name too long here; no permission on
    # a folder above it) escaped load_recipe as a bare OSError naming no field.
    name = "x" * 300 + ".safetensors"
    recipe = write(
        folder, f'method = "soup"\nmodels = ["m0.safetensors", "{name}"]\noutput = "o"\n'
    )
    with pytest.raises(
        ValueError, match=rf"^recipe\.models\[1\]: '{name}': cannot read {folder}/{name} \(File"
    ):
        load_recipe(recipe)


def test_an_os_error_while_a_step_runs_keeps_the_file_in_its_message(folder, monkeypatch):
    # _named rebuilds the error from its message: the file named there stays named.
    def unreadable(source):
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(ladle, "uniform_soup", lambda models, **kwargs: unreadable(models[1]))
    recipe = write(
        folder,
        'method = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "o.safetensors"\n',
    )
    with pytest.raises(PermissionError) as info:
        run_recipe(recipe, device="cpu")
    assert str(info.value) == (
        f"recipe: [Errno 13] Permission denied: '{folder / 'm1.safetensors'}'"
    )
    assert info.value.errno == 13 and info.value.__cause__.filename == str(
        folder / "m1.safetensors"
    )


TIES = (
    'method = "ties"\nmodels = ["m0.safetensors", "m1.safetensors"]\nbase = "m2.safetensors"\n'
    'output = "o"\n'
)
DARE = TIES.replace('"ties"', '"dare"')
ARITHMETIC = TIES.replace('"ties"', '"task_arithmetic"')
SOUP = 'method = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\noutput = "o"\n'
GREEDY = SOUP.replace('"soup"', '"greedy_soup"')
RATATOUILLE = SOUP.replace('"soup"', '"ratatouille"')
STOCK = 'method = "stock"\nmodels = ["m0.safetensors"]\nbase = "m2.safetensors"\noutput = "o"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            TIES + "[parameters]\ndensity = 50\n",
            r"density: expected a number in \(0, 1\], found 50",
        ),
        (TIES + "[parameters]\ndensity = 0\n", r"density: expected a number in \(0, 1\]"),
        (TIES + '[parameters]\ntrim = "layer"\n', r"trim: expected one of 'global', 'tensor'"),
        (TIES + "[parameters]\nscale = inf\n", r"scale: expected a finite number, found inf"),
        (DARE + "[parameters]\nscale = inf\n", r"scale: expected a finite number, found inf"),
        (DARE + '[parameters]\ncombine = "tie"\n', r"combine: expected one of 'sum', 'ties'"),
        (DARE + "[parameters]\ndensity = 1e-9\n", r"density: expected at least 2\*\*-24"),
        (DARE + "[parameters]\ndensity = 1.5\n", r"density: expected a number in \(0, 1\]"),
        (ARITHMETIC + "[parameters]\nweights = [1, 2, 3]\n", r"weights: expected 2 weights"),
        (ARITHMETIC + "[parameters]\nweights = [1, nan]\n", r"weights: expected finite numbers"),
        (ARITHMETIC + "[parameters]\nscale = nan\n", r"scale: expected a finite number"),
        (SOUP + "[parameters]\nweights = [1, 2, 3]\n", r"weights: expected 2 weights \(one per"),
        (SOUP + "[parameters]\nweights = [1, -1]\n", r"weights: expected finite weights with a"),
        (
            GREEDY + '[parameters]\nevaluate = "math:fabs"\nscores = [0.5]\n',
            r"scores: expected 2 scores \(one per model\), found 1",
        ),
        (
            RATATOUILLE + '[parameters]\nselection = "greedyy"\n',
            r"selection: expected one of 'uniform', 'greedy', found 'greedyy'",
        ),
        (
            RATATOUILLE + '[parameters]\nevaluate = "math:fabs"\n',
            r"evaluate: used only with selection = 'greedy'",
        ),
        (
            RATATOUILLE + "[parameters]\nstrict = true\n",
            r"strict: used only with selection = 'greedy'",
        ),
        (
            RATATOUILLE + "[parameters]\nscores = [1, 2]\n",
            r"scores: used only with selection = 'greedy'",
        ),
        (RATATOUILLE + "[parameters]\nscores = []\n", r"scores: used only with selection"),
        (
            GREEDY + '[parameters]\nevaluate = "m:f"\nscores = [1, "a"]\n',
            r"scores: expected a list of numbers, found \[1, 'a'\]",
        ),
        (
            GREEDY + '[parameters]\nevaluate = "evals:"\n',
            r"evaluate: expected 'package\.module:function' or 'file\.py:function'",
        ),
        (
            RATATOUILLE + '[parameters]\nselection = "greedy"\n',
            r"evaluate: required by ratatouille with selection = 'greedy'",
        ),
        (
            RATATOUILLE + '[parameters]\nselection = "greedy"\nevaluate = "math:fabs"\n'
            "scores = [1, nan]\n",
            r"scores: expected numbers, found NaN",
        ),
        # was accepted, then refused when the step ran, after the steps before it had written
        (SOUP + "[parameters]\nchunk_bytes = 0\n", r"chunk_bytes: expected a positive number"),
        (TIES + "[parameters]\nchunk_bytes = -4\n", r"chunk_bytes: expected a positive number"),
    ],
)
def test_parameter_values_are_checked_before_anything_runs(folder, text, message):
    with pytest.raises(ValueError, match=r"^recipe\.parameters\." + message):
        load_recipe(write(folder, text))


def test_model_stock_needs_two_models_before_anything_runs(folder):
    with pytest.raises(ValueError, match=r"^recipe\.models: model_stock needs at least 2 models"):
        load_recipe(write(folder, STOCK))


def test_a_later_steps_bad_value_fails_before_the_first_step_writes(folder):
    recipe = write(
        folder,
        '[steps.first]\nmethod = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "first.safetensors"\n'
        '[steps.t2]\nmethod = "ties"\nmodels = ["first", "m2.safetensors"]\n'
        'base = "m0.safetensors"\noutput = "t2.safetensors"\n'
        "[steps.t2.parameters]\ndensity = 50\n",
    )
    with pytest.raises(
        ValueError, match=r"^steps\.t2\.parameters\.density: expected a number in \(0, 1\]"
    ):
        run_recipe(recipe, device="cpu")
    assert not (folder / "first.safetensors").exists()


def test_valid_parameter_values_pass_the_check(folder):
    for text in (
        TIES + '[parameters]\ndensity = 1\ntrim = "tensor"\nscale = 0.5\n',
        DARE + '[parameters]\ndensity = 0.5\ncombine = "ties"\nseed = 3\n',
        ARITHMETIC + "[parameters]\nweights = [1, -1]\n",
        SOUP + "[parameters]\nweights = [3, 1]\n",
        RATATOUILLE + '[parameters]\nselection = "greedy"\nevaluate = "math:fabs"\n'
        "scores = [1, 2]\nstrict = true\n",
        RATATOUILLE + "[parameters]\nstrict = false\n",
        GREEDY + '[parameters]\nevaluate = "evals:Metrics.score"\n',  # a dotted attribute
        STOCK.replace('["m0.safetensors"]', '["m0.safetensors", "m1.safetensors"]'),
        SOUP + "[parameters]\nchunk_bytes = 64\n",
    ):
        load_recipe(write(folder, text))


def test_an_error_while_a_step_runs_names_the_step_and_keeps_its_type(folder, capsys):
    save_file({"layer.weight": torch.zeros(5)}, folder / "odd.safetensors")
    recipe = write(
        folder,
        '[steps.first]\nmethod = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "first.safetensors"\n'
        '[steps.t2]\nmethod = "soup"\nmodels = ["first", "odd.safetensors"]\n'
        'output = "t2.safetensors"\n',
    )
    with pytest.raises(ladle.IncompatibleError, match=r"^steps\.t2: ") as caught:
        run_recipe(recipe, device="cpu", overwrite=True)
    assert isinstance(caught.value.__cause__, ladle.IncompatibleError)
    assert str(caught.value) == f"steps.t2: {caught.value.__cause__}"
    assert main(["run", str(recipe), "--device", "cpu", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ladle: error: steps.t2: ") and err.count("\n") == 1
    (folder / "bad.safetensors").write_bytes(b"\x00" * 16)
    single = write(folder, 'method = "soup"\nmodels = ["bad.safetensors"]\noutput = "o"\n')
    with pytest.raises(ladle.CheckpointError, match=r"^recipe: .*bad\.safetensors"):
        run_recipe(single, device="cpu")


def test_a_stop_iteration_from_a_step_is_named_and_stays_one(folder, monkeypatch):
    # Renamed inside a generator-based context manager, it became "RuntimeError: generator
    # raised StopIteration" (PEP 479). A method that raises it stands for any such bug.
    def method(models, **options):
        raise StopIteration("no data")

    monkeypatch.setattr("ladle.recipe._function", lambda name: method)
    with pytest.raises(StopIteration, match=r"^recipe: no data$") as caught:
        run_recipe(write(folder, SOUP), device="cpu")
    assert isinstance(caught.value.__cause__, StopIteration)


def test_a_recipe_saved_with_a_byte_order_mark_runs_as_without(folder):
    # tomllib refused it: "Invalid statement (at line 1, column 1)", of a line that looks right
    (folder / "bom.toml").write_text("\ufeff" + SOUP, encoding="utf-8")
    run_recipe(folder / "bom.toml", device="cpu")
    expected = ladle.uniform_soup([folder / "m0.safetensors", folder / "m1.safetensors"])
    assert_bit_for_bit(ladle.load(folder / "o"), expected)


def test_a_binary_file_is_not_a_recipe_and_the_error_names_it(folder, capsys):
    path = folder / "m0.safetensors"
    with pytest.raises(ValueError, match=r"m0\.safetensors: not a TOML recipe \(not UTF-8 text"):
        load_recipe(path)
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ladle: error: {path}: not a TOML recipe") and err.count("\n") == 1


def test_a_recipe_nested_too_deeply_is_one_error_line(folder, capsys):
    # tomllib recursed into the arrays: a RecursionError, and its traceback of ~2800 lines.
    path = write(folder, "a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: not a TOML recipe (nested too deeply)"
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"ladle: error: {path}: not a TOML recipe (nested too deeply)\n"


def test_the_docs_name_a_one_step_recipes_step_as_it_is_named(folder, capsys):
    docs = (Path(__file__).parent.parent / "docs" / "recipes.md").read_text(encoding="utf-8")
    recipe = write(folder, 'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "soup"\n')
    assert main(["run", str(recipe), "--device", "cpu"]) == 0
    name = load_recipe(recipe).steps[0].name
    printed = capsys.readouterr().out
    assert printed == f"{name}: {folder / 'soup'}\n"
    assert f"step is named `{name}`" in docs and f"prints `{name}: " in docs


def test_a_later_steps_output_named_like_another_format_is_refused_before_any_step(tmp_path):
    for name in ("a", "b", "c"):
        ladle.save({"w": torch.rand(4)}, tmp_path / f"{name}.safetensors")
    (tmp_path / "r.toml").write_text(
        '[steps.first]\nmethod = "soup"\nmodels = ["a.safetensors", "b.safetensors"]\n'
        'output = "first"\n'
        '[steps.final]\nmethod = "soup"\nmodels = ["first", "c.safetensors"]\n'
        'output = "final.pt"\n'
    )
    with pytest.raises(ValueError, match=r"steps.final.output: .*final.pt: ladle writes"):
        ladle.load_recipe(tmp_path / "r.toml")
    assert not (tmp_path / "first").exists()


def test_max_shard_size_with_a_single_file_output_is_refused_as_the_cli_refuses_it(tmp_path):
    for name in ("a", "b"):
        ladle.save({"w": torch.rand(4)}, tmp_path / f"{name}.safetensors")
    (tmp_path / "r.toml").write_text(
        'method = "soup"\nmodels = ["a.safetensors", "b.safetensors"]\n'
        'output = "o.safetensors"\nmax_shard_size = "1MB"\n'
    )
    with pytest.raises(ValueError, match=r"max_shard_size: applies to a directory output"):
        ladle.load_recipe(tmp_path / "r.toml")


def test_an_hf_url_as_output_is_refused_naming_the_field(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "soup"\nmodels = ["a.safetensors"]\noutput = "hf://me/merged"\n')
    with pytest.raises(ValueError, match=r"recipe\.output: hf://me/merged.*--push-to-hub"):
        ladle.load_recipe(recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "r.toml"]


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_paths_of_a_recipe_loaded_by_a_relative_name_are_absolute(folder, monkeypatch):
    write(folder, 'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "o.safetensors"\n')
    monkeypatch.chdir(folder)
    (step,) = load_recipe("recipe.toml").steps
    assert step.models == (str(folder / "m0.safetensors"),)
    assert step.output == folder / "o.safetensors"


def test_an_output_under_the_home_folder_is_written_from_tilde(folder, monkeypatch):
    home = folder / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    recipe = write(folder, 'method = "soup"\nmodels = ["m0.safetensors"]\noutput = "~/o"\n')
    assert load_recipe(recipe).steps[0].output == home / "o"


def test_the_recipe_device_applies_to_every_step_and_the_device_argument_overrides_it(folder):
    # A single-step recipe may set device too (it is no field of the step); with steps, at
    # the top level beside them. "cuda:99" exists on no test machine: the override wins.
    single = 'device = "cuda:99"\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n'
    steps = (
        'device = "cuda:99"\n'
        '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "p"\n'
    )
    for text, name, out in [(single, "main", "o"), (steps, "a", "p")]:
        recipe = write(folder, text)
        assert load_recipe(recipe).device == "cuda:99"
        assert run_recipe(recipe, device="cpu") == {name: folder / out}
        # Without the override, the error says the device is the recipe's, and how to choose
        # another (it read "device: 'cuda:99', but ...", as if the caller had passed it).
        with pytest.raises(ValueError) as caught:
            run_recipe(recipe)
        assert str(caught.value).startswith(f"{recipe}: device: 'cuda:99', but ")
        assert str(caught.value).endswith("; device= (--device) runs the recipe on another")


def test_a_greedy_soup_step_kept_in_memory_feeds_its_state_dict_to_a_later_step(folder):
    (folder / "ev.py").write_text("def score(sd):\n    return float(sd['layer.weight'].sum())\n")
    recipe = write(
        folder,
        '[steps.g]\nmethod = "greedy_soup"\n'
        'models = ["m0.safetensors", "m1.safetensors", "m2.safetensors"]\n'
        '[steps.g.parameters]\nevaluate = "ev.py:score"\n'
        '[steps.final]\nmethod = "soup"\nmodels = ["g", "m0.safetensors"]\n'
        'output = "o.safetensors"\n',
    )
    results = run_recipe(recipe, device="cpu")
    paths = [folder / f"m{i}.safetensors" for i in range(3)]
    score = load_callable("ev.py:score", folder=folder)
    greedy = ladle.greedy_soup(paths, score, device="cpu").state_dict
    assert set(results["g"]) == set(greedy)
    assert all(torch.equal(results["g"][k], greedy[k]) for k in greedy)
    expected = ladle.uniform_soup([greedy, paths[0]], device="cpu")
    merged = ladle.load(folder / "o.safetensors")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_an_output_inside_an_input_folder_is_refused(folder):
    ladle.save(family(1, seed=2)[0], folder / "d")
    text = 'method = "soup"\nmodels = ["d", "m0.safetensors"]\noutput = "d/merged.safetensors"\n'
    with pytest.raises(ValueError) as info:
        load_recipe(write(folder, text))
    assert str(info.value) == (
        f"recipe.output: {folder / 'd' / 'merged.safetensors'} would overwrite "
        f"{folder / 'd'}, an input of the recipe; a recipe never writes over its inputs"
    )


def test_an_output_over_the_steps_own_input_gets_no_hint_to_name_the_step(folder):
    text = (
        '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "m1.safetensors"\n'
    )
    with pytest.raises(ValueError) as info:
        load_recipe(write(folder, text))
    assert str(info.value) == (
        f"steps.a.output: {folder / 'm1.safetensors'} would overwrite "
        f"{folder / 'm1.safetensors'}, an input of step 'a'; a recipe never writes over its "
        "inputs"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (TIES + "[parameters]\ndensity = true\n", "recipe.parameters.density: expected a number"),
        (
            GREEDY + '[parameters]\nevaluate = "score"\n',
            "recipe.parameters.evaluate: expected 'package.module:function' or "
            "'file.py:function', found 'score'",
        ),
        (
            '[steps.1st]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n',
            "steps.1st: step names are letters, digits, '_' and '-'",
        ),
        ("[steps]\na = 1\n", "steps.a: expected a table, found int"),
        ("steps = {}\n", "steps: expected one or more [steps.NAME] tables"),
        (
            'device = 1\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "o"\n',
            "device: expected a string such as 'cpu', found 1",
        ),
        (
            'method = 1\nmodels = ["m0.safetensors"]\noutput = "o"\n',
            "recipe.method: expected a string, found int",
        ),
        (
            'method = "blend"\nmodels = ["m0.safetensors"]\noutput = "o"\n',
            "recipe.method: unknown method 'blend'; expected one of dare, greedy_soup, "
            "model_stock, ratatouille, slerp, soup, stock, task_arithmetic, ties, uniform_soup",
        ),
        (
            'method = "soup"\nmodels = "m0.safetensors"\noutput = "o"\n',
            "recipe.models: expected a non-empty list of models, found 'm0.safetensors'",
        ),
        (
            'method = "soup"\nmodels = ["m0.safetensors", ""]\noutput = "o"\n',
            "recipe.models[1]: expected a path, hf:// URL or step name, found ''",
        ),
        (
            'method = "soup"\nmodels = [1]\noutput = "o"\n',
            "recipe.models[0]: expected a path, hf:// URL or step name, found 1",
        ),
        (
            'method = "soup"\nmodels = ["m0.safetensors"]\noutput = 1\n',
            "recipe.output: expected a path, found 1",
        ),
        (SOUP + "parameters = 3\n", "recipe.parameters: expected a table, found int"),
        (
            SOUP + '[parameters]\nweights = [1, "a"]\n',
            "recipe.parameters.weights: expected a list of numbers, found [1, 'a']",
        ),
        (
            GREEDY + '[parameters]\nevaluate = "m:f"\nstrict = 1\n',
            "recipe.parameters.strict: expected true or false, found 1",
        ),
        (DARE + "[parameters]\nseed = true\n", "recipe.parameters.seed: expected an integer"),
    ],
)
def test_more_invalid_recipes_fail_up_front_naming_the_field(folder, text, message):
    with pytest.raises(ValueError) as info:
        load_recipe(write(folder, text))
    assert str(info.value).startswith(message)


def test_an_output_folder_holding_an_input_or_over_the_base_is_refused(folder):
    ladle.save(family(1, seed=2)[0], folder / "d" / "x.safetensors")
    text = 'method = "soup"\nmodels = ["d/x.safetensors", "m0.safetensors"]\noutput = "d"\n'
    with pytest.raises(ValueError) as info:
        load_recipe(write(folder, text))
    assert str(info.value) == (
        f"recipe.output: {folder / 'd'} would overwrite {folder / 'd' / 'x.safetensors'}, an "
        "input of the recipe; a recipe never writes over its inputs"
    )
    with pytest.raises(ValueError) as info:
        load_recipe(write(folder, TIES.replace('"o"', '"m2.safetensors"')))
    assert str(info.value).startswith(
        f"recipe.output: {folder / 'm2.safetensors'} would overwrite {folder / 'm2.safetensors'}"
    )


def test_a_missing_recipe_file_is_a_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError) as info:
        load_recipe(tmp_path / "none.toml")
    assert str(info.value) == (
        f"recipe: cannot read {tmp_path / 'none.toml'} (No such file or directory)"
    )


def test_a_dtype_is_named_in_any_case_as_the_cli_takes_it(folder):
    text = SOUP.replace('output = "o"', 'output = "o"\ndtype = "BF16"')
    assert load_recipe(write(folder, text)).steps[0].dtype == torch.bfloat16


def test_a_steps_max_shard_size_shards_its_output(folder):
    recipe = write(folder, SOUP + "max_shard_size = 64\n")
    assert run_recipe(recipe, device="cpu") == {"main": folder / "o"}
    assert len(list((folder / "o").glob("model-*-of-*.safetensors"))) > 1
    expected = ladle.uniform_soup([folder / "m0.safetensors", folder / "m1.safetensors"])
    merged = ladle.load(folder / "o")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_load_callable_follows_dotted_names_and_refuses_what_it_cannot_call():
    import os.path

    assert load_callable("os:path.join") is os.path.join
    with pytest.raises(ValueError, match=r"^'math:pi' is a float, not a callable$"):
        load_callable("math:pi")
    for reference in (":sqrt", "math:", "math"):
        with pytest.raises(ValueError, match=r"^expected MODULE:FUNCTION, e\.g\. "):
            load_callable(reference)


def test_load_callable_leaves_sys_path_as_it_found_it(tmp_path, monkeypatch):
    import sys

    (tmp_path / "h80_scores.py").write_text("def score(sd):\n    return 1.0\n")
    monkeypatch.delitem(sys.modules, "h80_scores", raising=False)  # removed again afterwards
    before = list(sys.path)
    assert load_callable("h80_scores:score", folder=tmp_path)({}) == 1.0
    assert load_callable("h80_scores.py:score", folder=tmp_path)({}) == 1.0
    assert sys.path == before


def test_an_evaluate_file_that_failed_to_import_is_imported_again_once_fixed(tmp_path):
    (tmp_path / "ev.py").write_text("raise RuntimeError('not yet')\n")
    with pytest.raises(ValueError, match=r"cannot import 'ev\.py:score': RuntimeError: not yet"):
        load_callable("ev.py:score", folder=tmp_path)
    (tmp_path / "ev.py").write_text("def score(state_dict):\n    return 2.0\n")
    assert load_callable("ev.py:score", folder=tmp_path)({}) == 2.0


def test_an_evaluate_function_a_module_lacks_is_named_as_the_reference_names_the_module(
    tmp_path,
):
    # It said "AttributeError: module 'ladle_evaluate_ev_3f2a...' has no attribute 'nope'",
    # the name the file is registered under, which the user never wrote.
    (tmp_path / "ev.py").write_text("class Scores:\n    pass\ndef score(sd):\n    return 1\n")
    cases = {
        "ev.py:nope": "ev.py has no attribute 'nope'",
        "ev.py:Scores.top1": "ev.py:Scores has no attribute 'top1'",
        "math:nope": "math has no attribute 'nope'",
        "math:pi.real.x": "math:pi.real has no attribute 'x'",
    }
    for reference, why in cases.items():
        with pytest.raises(ValueError) as info:
            load_callable(reference, folder=tmp_path)
        assert str(info.value) == f"cannot import {reference!r}: {why}"
        assert isinstance(info.value.__cause__, AttributeError)
    (tmp_path / "lazy.py").write_text("def __getattr__(name):\n    raise KeyError(name)\n")
    with pytest.raises(ValueError, match=r"^cannot import 'lazy\.py:f': KeyError: 'f'$"):
        load_callable("lazy.py:f", folder=tmp_path)


def test_an_error_while_a_step_runs_keeps_its_attributes_or_is_raised_as_it_is(folder, monkeypatch):
    class Refused(ValueError):
        key = None

    def raising(err: Exception):
        def merge(models, **kwargs):
            raise err

        return merge

    refused = Refused("bad key")
    refused.key = "layer.weight"
    recipe = write(folder, SOUP)
    monkeypatch.setattr(ladle, "uniform_soup", raising(refused))
    with pytest.raises(Refused) as info:
        run_recipe(recipe, device="cpu")
    assert str(info.value) == "recipe: bad key" and info.value.key == "layer.weight"
    # A KeyError would quote a message rebuilt from it: it is raised unchanged.
    missing = KeyError("layer.weight")
    monkeypatch.setattr(ladle, "uniform_soup", raising(missing))
    with pytest.raises(KeyError) as info:
        run_recipe(recipe, device="cpu")
    assert info.value is missing


def test_a_step_gets_the_recipes_device_and_the_callers_progress_and_overwrite(folder, monkeypatch):
    import functools

    seen = []
    real = ladle.uniform_soup

    @functools.wraps(real)
    def spy(models, **kwargs):
        seen.append(kwargs)
        return real(models, **kwargs)

    monkeypatch.setattr(ladle, "uniform_soup", spy)
    recipe = write(folder, 'device = "cpu"\n' + SOUP)
    assert run_recipe(recipe, progress=False) == {"main": folder / "o"}
    assert run_recipe(recipe, progress=True, overwrite=True) == {"main": folder / "o"}
    out = folder / "o"
    assert seen == [
        {"out": out, "device": "cpu", "progress": False, "overwrite": False},
        {"out": out, "device": "cpu", "progress": True, "overwrite": True},
    ]


def test_cli_run_prints_only_the_outputs_written(folder, capsys):
    recipe = write(
        folder,
        '[steps.pair]\nmethod = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        '[steps.final]\nmethod = "soup"\nmodels = ["pair", "m2.safetensors"]\noutput = "f"\n',
    )
    assert main(["run", str(recipe), "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().out == f"final: {folder / 'f'}\n"


def test_a_step_may_use_an_earlier_steps_output_as_its_base(folder):
    recipe = write(
        folder,
        '[steps.pair]\nmethod = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        '[steps.t]\nmethod = "task_arithmetic"\nmodels = ["m2.safetensors"]\nbase = "pair"\n'
        'output = "t.safetensors"\n[steps.t.parameters]\nscale = 0.5\n',
    )
    run_recipe(recipe, device="cpu")
    m0, m1, m2 = family(3, seed=11)
    merged = ladle.load(folder / "t.safetensors")
    for key in ("layer.weight", "layer.bias"):
        pair = (m0[key] + m1[key]) / 2
        assert torch.allclose(merged[key], pair + 0.5 * (m2[key] - pair)), key


def test_an_existing_output_of_a_middle_step_is_refused_before_the_first_step_writes(folder):
    (folder / "mid.safetensors").write_bytes(b"mine")
    recipe = write(
        folder,
        '[steps.first]\nmethod = "soup"\nmodels = ["m0.safetensors"]\noutput = "f.safetensors"\n'
        '[steps.mid]\nmethod = "soup"\nmodels = ["first"]\noutput = "mid.safetensors"\n'
        '[steps.last]\nmethod = "soup"\nmodels = ["mid"]\noutput = "l.safetensors"\n',
    )
    with pytest.raises(ladle.LadleError, match=r"^steps\.mid\.output: .*already exists"):
        run_recipe(recipe, device="cpu")
    assert not (folder / "f.safetensors").exists()
    assert (folder / "mid.safetensors").read_bytes() == b"mine"


@pytest.mark.parametrize(
    ("body", "raised"),
    [
        ("return 1 / 0", "ZeroDivisionError: division by zero"),
        ("return float(sd['missing'].sum())", "KeyError: 'missing'"),  # no message to prefix
    ],
)
def test_an_evaluate_that_raises_is_one_line_naming_the_step_and_function(
    folder, capsys, body, raised
):
    (folder / "ev.py").write_text(f"def score(sd):\n    {body}\n")
    recipe = write(
        folder,
        '[steps.g]\nmethod = "greedy_soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "o.safetensors"\n[steps.g.parameters]\nevaluate = "ev.py:score"\n',
    )
    assert main(["run", str(recipe), "--device", "cpu"]) == 1
    assert (
        capsys.readouterr().err == f"ladle: error: steps.g: evaluate ev.py:score: raised {raised}\n"
    )
    with pytest.raises(ladle.LadleError) as info:  # the function's own exception is the cause
        run_recipe(recipe, device="cpu")
    assert type(info.value.__cause__.__cause__).__name__ == raised.partition(":")[0]
    assert not (folder / "o.safetensors").exists()


def test_a_module_imported_from_another_recipes_folder_is_refused_not_reused(
    folder, tmp_path_factory, monkeypatch
):
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # restored afterwards
    monkeypatch.delitem(__import__("sys").modules, "evals_twice", raising=False)
    recipes = []
    for sign in ("-", ""):  # the two recipes' functions choose different models
        where = tmp_path_factory.mktemp("recipe")
        (where / "evals_twice.py").write_text(
            f"def score(sd):\n    return {sign}float(sd['layer.weight'].sum())\n"
        )
        recipes.append(
            write(
                where,
                'method = "greedy_soup"\n'
                f'models = ["{folder}/m0.safetensors", "{folder}/m1.safetensors"]\n'
                'output = "g.safetensors"\n[parameters]\nevaluate = "evals_twice:score"\n',
            )
        )
    run_recipe(recipes[0], device="cpu")
    first = __import__("sys").modules["evals_twice"].__file__
    with pytest.raises(ValueError) as info:
        run_recipe(recipes[1], device="cpu")
    assert str(info.value) == (
        "recipe.parameters.evaluate: cannot import 'evals_twice:score': ImportError: module "
        f"'evals_twice' is already imported from {first}, not from "
        f"{recipes[1].parent / 'evals_twice.py'}; name the file instead "
        "(path/to/file.py:function)"
    )
    assert not (recipes[1].parent / "g.safetensors").exists()
    assert run_recipe(recipes[0], device="cpu", overwrite=True)  # its own module: still fine


def test_a_greedy_ratatouille_step_with_its_own_chunk_size_is_refused_up_front(folder):
    # It passed load_recipe and failed when the step ran, after the evaluators were imported
    text = (
        'method = "ratatouille"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "r.safetensors"\n[parameters]\nselection = "greedy"\n'
        'evaluate = "math:fabs"\nchunk_bytes = 100\n'
    )
    with pytest.raises(ValueError, match=r"^recipe\.parameters\.chunk_bytes: used only with"):
        load_recipe(write(folder, text))


def test_a_step_writing_over_a_file_another_steps_input_folder_links_to_is_refused(folder):
    # m/model.safetensors -> store/ft.safetensors: the paths differ, the file is one; only
    # each step's own inputs were checked as they resolve, so step b replaced step a's input.
    (folder / "store").mkdir()
    shutil.copy(folder / "m0.safetensors", folder / "store" / "ft.safetensors")
    (folder / "m").mkdir()
    (folder / "m" / "model.safetensors").symlink_to("../store/ft.safetensors")
    text = (
        '[steps.a]\nmethod = "soup"\nmodels = ["m", "m1.safetensors"]\n'
        '[steps.b]\nmethod = "soup"\nmodels = ["a", "m2.safetensors"]\n'
        'output = "store/ft.safetensors"\n'
    )
    before = ladle.load(folder / "m0.safetensors")
    with pytest.raises(ladle.LadleError) as info:
        run_recipe(write(folder, text), device="cpu", overwrite=True)
    assert str(info.value) == (
        f"steps.b.output: {folder / 'store' / 'ft.safetensors'}: refusing to write over or "
        f"inside input {folder / 'm' / 'model.safetensors'}; choose another output path"
    )
    kept = ladle.load(folder / "store" / "ft.safetensors")
    assert all(torch.equal(kept[key], before[key]) for key in before)


def test_an_unreadable_input_of_a_later_step_stops_the_recipe_before_any_step_writes(folder):
    text = (
        '[steps.a]\nmethod = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "a.safetensors"\n'
        '[steps.b]\nmethod = "soup"\nmodels = ["a", "bad.safetensors"]\n'
        'output = "b.safetensors"\n'
    )
    (folder / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ladle.CheckpointError, match=r"^steps\.b: .*bad\.safetensors"):
        run_recipe(write(folder, text), device="cpu")
    assert not (folder / "a.safetensors").exists()


def test_an_output_through_a_loop_of_links_is_a_value_error_naming_the_field(folder):
    (folder / "loop").symlink_to(folder / "loop")
    text = 'method = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
    with pytest.raises(ValueError, match=r"^recipe\.output: .*loop/o\.safetensors: cannot resolve"):
        load_recipe(write(folder, text + 'output = "loop/o.safetensors"\n'))


def test_an_output_whose_name_is_a_loop_of_links_loads_as_any_output_name(folder):
    # Its folder resolves; the looping link is replaced when written (with overwrite): the
    # recipe's own comparisons of outputs raised pathlib's RuntimeError.
    (folder / "o.safetensors").symlink_to(folder / "o.safetensors")
    text = 'method = "soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
    recipe = load_recipe(write(folder, text + 'output = "o.safetensors"\n'))
    assert recipe.steps[0].output == folder / "o.safetensors"


# Found by mutation testing: recipe fields refused when loaded, not later.


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GREEDY + '[parameters]\nevaluate = "evals:score junk"\n',
            r"^recipe\.parameters\.evaluate: expected 'package\.module:function'",
        ),
        ('[steps."bad name!"]\n' + SOUP, r"^steps\.bad name!: step names are letters, digits"),
        (
            SOUP.replace('output = "o"', 'output = ""'),
            r"^recipe\.output: expected a path, found ''$",
        ),
    ],
    ids=["evaluate with trailing text", "step name", "empty output"],
)
def test_fields_are_checked_whole_when_the_recipe_is_loaded(folder, text, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(write(folder, text))


def test_an_on_output_that_cannot_be_called_is_refused_before_anything_is_written(folder):
    recipe = write(folder, SOUP)
    with pytest.raises(TypeError, match=r"^on_output: expected a callable or None, found int$"):
        run_recipe(recipe, device="cpu", on_output=5)
    assert not (folder / "o").exists()


@pytest.mark.parametrize(("recipe", "found"), [({"method": "soup"}, "dict"), (None, "None")])
def test_a_recipe_that_is_no_path_or_recipe_is_refused_naming_the_parameter(recipe, found):
    # It was load_recipe's "path: expected a str or os.PathLike path".
    with pytest.raises(TypeError) as info:
        run_recipe(recipe)
    assert str(info.value) == f"recipe: expected a recipe file's path or a Recipe, found {found}"


def test_an_evaluate_module_is_found_in_the_working_directory_too(tmp_path, monkeypatch):
    here, elsewhere = tmp_path / "cwd", tmp_path / "recipe-folder"
    here.mkdir()
    elsewhere.mkdir()
    (here / "evals_in_cwd.py").write_text("def score(sd):\n    return 1.0\n")
    monkeypatch.chdir(here)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # restored afterwards
    monkeypatch.delitem(__import__("sys").modules, "evals_in_cwd", raising=False)
    assert load_callable("evals_in_cwd:score", folder=elsewhere)({}) == 1.0


def test_a_module_imported_before_without_a_file_is_not_taken_for_one_in_the_folder(
    tmp_path, monkeypatch
):
    import types

    (tmp_path / "evals_stale.py").write_text("def score(sd):\n    return 'from the file'\n")
    stale = types.ModuleType("evals_stale")  # imported earlier, from no file
    stale.score = lambda sd: "stale"  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "evals_stale", stale)
    with pytest.raises(ValueError, match=r"already imported from None, not from .*evals_stale\.py"):
        load_callable("evals_stale:score", folder=tmp_path)


def test_functions_imported_in_two_threads_at_once_import_modules_beside_them(
    tmp_path, monkeypatch
):
    # Each import put the file's folder on sys.path and took it off after. One that found it
    # there already (another thread's import running) took it as staying; the other, done
    # first, took it off, and the first file's import of a module beside it failed.
    import threading
    import types

    from ladle.recipe import load_callable

    events = types.SimpleNamespace(
        a_in=threading.Event(), b_in=threading.Event(), a_done=threading.Event()
    )
    monkeypatch.setitem(sys.modules, "_ladle_test_events", events)
    (tmp_path / "a.py").write_text(
        "import _ladle_test_events as ev\nev.a_in.set()\nev.b_in.wait(1)\n"
        "def f(sd):\n    return 1.0\n"
    )
    (tmp_path / "b.py").write_text(
        "import _ladle_test_events as ev\nev.b_in.set()\nev.a_done.wait(10)\n"
        "import helper_beside_b\ndef f(sd):\n    return helper_beside_b.VALUE\n"
    )
    (tmp_path / "helper_beside_b.py").write_text("VALUE = 2.0\n")
    found = {}

    def load(name: str) -> None:
        try:
            found[name] = load_callable(f"{name}.py:f", folder=tmp_path)({})
        except ValueError as err:
            found[name] = str(err)

    a = threading.Thread(target=load, args=("a",))
    a.start()
    assert events.a_in.wait(10)
    b = threading.Thread(target=load, args=("b",))
    b.start()
    a.join()
    events.a_done.set()
    b.join()
    sys.modules.pop("helper_beside_b", None)
    assert found == {"a": 1.0, "b": 2.0}
    assert str(tmp_path) not in sys.path


def test_every_step_reads_the_commit_an_hf_input_resolved_to_before_the_first(
    folder, tmp_path, monkeypatch
):
    # The repository's main moves while the recipe runs (after step one is written): step
    # two still reads the commit that was checked, and the Hub is asked once for it.
    from unittest import mock

    from test_hub import COMMIT_A, COMMIT_B, write_cached_repo

    import ladle.hub

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    old, new = family(2, seed=12)
    write_cached_repo(
        cache, "org/m", COMMIT_A, {"model.safetensors": save(old)}, refs={"main": COMMIT_A}
    )

    def moved(name: str, path: Path) -> None:
        if name == "one":
            write_cached_repo(
                cache, "org/m", COMMIT_B, {"model.safetensors": save(new)}, refs={"main": COMMIT_B}
            )

    recipe = write(
        folder,
        '[steps.one]\nmethod = "soup"\nmodels = ["hf://org/m", "m0.safetensors"]\n'
        'output = "one.safetensors"\n'
        '[steps.two]\nmethod = "task_arithmetic"\nbase = "m1.safetensors"\n'
        'models = ["hf://org/m"]\noutput = "two.safetensors"\n',
    )
    with mock.patch.object(ladle.hub, "snapshot", wraps=ladle.hub.snapshot) as fetched:
        run_recipe(recipe, device="cpu", on_output=moved)
    assert [call.args[0] for call in fetched.call_args_list] == ["hf://org/m"]
    m0, m1 = (ladle.load(folder / f"m{i}.safetensors") for i in range(2))
    with ladle.open_checkpoint(folder / "two.safetensors") as two:
        assert two.metadata["ladle.inputs"] == f'["hf://org/m@{COMMIT_A}"]'
    # (what the in-memory merges give: the point is which commit each step read)
    expected = {
        "one": ladle.uniform_soup([old, m0]),
        "two": ladle.task_arithmetic([old], m1),
    }
    moved_two = ladle.task_arithmetic([new], m1)
    for name, merged in expected.items():
        ladle.testing.assert_state_dicts_close(
            ladle.load(folder / f"{name}.safetensors"), merged, rtol=0, atol=0
        )
    assert not all(torch.equal(moved_two[k], expected["two"][k]) for k in old)
    # Run again, the same recipe reads main's new commit.
    run_recipe(recipe, device="cpu", overwrite=True)
    ladle.testing.assert_state_dicts_close(
        ladle.load(folder / "two.safetensors"), moved_two, rtol=0, atol=0
    )


def test_a_recipe_loaded_from_a_relative_path_runs_from_another_folder(folder, monkeypatch):
    # Recipe.path was kept relative: run from another working directory, `evaluate` was
    # imported from that folder (another evals.py silently scored the soup), or not found.
    (folder / "evals.py").write_text("def score(sd):\n    return float(sd['layer.bias'].sum())\n")
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "evals.py").write_text("def score(sd):\n    raise AssertionError('wrong file')\n")
    write(
        folder,
        'method = "greedy_soup"\nmodels = ["m0.safetensors", "m1.safetensors"]\n'
        'output = "out.safetensors"\n[parameters]\nevaluate = "evals.py:score"\n',
    )
    monkeypatch.chdir(folder)
    recipe = load_recipe("recipe.toml")
    assert recipe.path == folder / "recipe.toml"
    monkeypatch.chdir(elsewhere)
    assert run_recipe(recipe, device="cpu") == {"main": folder / "out.safetensors"}


def test_steps_run_in_the_order_of_their_headers_whatever_table_comes_first(folder):
    # TOML lets [steps.final.parameters] come before [steps.final]; tomllib orders steps by
    # the first table naming them: "steps.final.models[0]: step 'pair' comes later".
    recipe = write(
        folder,
        """
[steps.final.parameters]
weights = [1, 3]

[steps.pair]
method = "uniform_soup"
models = ["m0.safetensors", "m1.safetensors"]

[steps."final"]
method = "soup"
models = ["pair", "m2.safetensors"]
output = "out.safetensors"
""",
    )
    assert [step.name for step in load_recipe(recipe).steps] == ["pair", "final"]
    run_recipe(recipe, device="cpu")
    models = [ladle.load(folder / f"m{i}.safetensors") for i in range(3)]
    pair = ladle.uniform_soup(models[:2], device="cpu")
    expected = ladle.uniform_soup([pair, models[2]], weights=[1, 3], device="cpu")
    assert_bit_for_bit(ladle.load(folder / "out.safetensors"), expected)


def test_checking_a_recipe_resolves_each_path_once_not_once_per_pair_of_steps(folder, monkeypatch):
    # Each pair of steps resolved both outputs again, and each pair of input and output
    # globbed the output's folder: 200 steps took 25 s of checks for 200 tiny merges.
    import ladle.engine
    import ladle.recipe
    from ladle.recipe import _check_inputs_kept

    steps = 40
    lines = []
    for i in range(steps):
        ladle.save({"w": torch.full((2,), float(i))}, folder / f"in{i}.safetensors")
        lines += [f"[steps.s{i}]", 'method = "soup"', f'models = ["in{i}.safetensors"]']
        lines += [f'output = "out/s{i}.safetensors"', ""]
    recipe = folder / "many.toml"
    recipe.write_text("\n".join(lines), encoding="utf-8")
    calls = {"resolved_output": 0, "stale_leftovers": 0}
    for module, name in [
        (ladle.engine, "resolved_output"),
        (ladle.recipe, "resolved_output"),
        (ladle.engine, "stale_leftovers"),
    ]:
        real = getattr(module, name)

        def counted(*args, real=real, name=name):
            calls[name] += 1
            return real(*args)

        monkeypatch.setattr(module, name, counted)
    loaded = load_recipe(recipe)
    assert calls["resolved_output"] <= 3 * steps  # a few per step (was 42 per step)
    calls.update(resolved_output=0)
    _check_inputs_kept(loaded.steps, lambda step: step.name)
    assert calls == {"resolved_output": steps, "stale_leftovers": steps}  # was steps² each


def test_an_integer_past_pythons_digit_limit_is_named_with_the_recipe(folder):
    # tomllib's int() raised "Exceeds the limit (4300 digits) ...; use
    # sys.set_int_max_str_digits()", naming no file.
    recipe = write(
        folder, f'method = "soup"\nmodels = ["m0.safetensors"]\nchunk_bytes = {"9" * 5000}\n'
    )
    with pytest.raises(ValueError) as info:
        load_recipe(recipe)
    assert re.fullmatch(  # "(4300)" on Python 3.10, "(4300 digits)" from 3.11
        rf"{re.escape(str(recipe))}: not a TOML recipe \(Exceeds the limit \(4300( digits)?\) for "
        r"integer string conversion: value has 5000 digits\)",
        str(info.value),
    ), str(info.value)


def test_a_dare_scale_whose_quotient_by_density_overflows_is_refused_before_any_step(folder):
    # ladle.dare refused it when the step ran, after earlier steps had written their outputs.
    recipe = write(
        folder,
        """
[steps.first]
method = "soup"
models = ["m0.safetensors", "m1.safetensors"]
output = "first"

[steps.second]
method = "dare"
base = "m0.safetensors"
models = ["first", "m2.safetensors"]
output = "second"
[steps.second.parameters]
density = 1e-7
scale = 1e308
""",
    )
    with pytest.raises(ValueError) as info:
        load_recipe(recipe)
    assert str(info.value) == (
        "steps.second.parameters.scale: 1e+308 / density 1e-07 is beyond float64's range, "
        "and DARE applies scale/density as one factor; lower the scale"
    )
    assert not (folder / "first").exists()
