"""Directory outputs in the Hugging Face layout: weights, loader files, model card."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from conftest import assert_bit_for_bit, family
from safetensors.torch import save_file
from test_hub import COMMIT_A, write_cached_repo

import ladle
from ladle.errors import LadleError
from ladle.modelcard import license_fields, model_card
from ladle.writer import SafetensorsWriter

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

LOADER_FILES = {
    "config.json": b'{"model_type": "toy"}',
    "generation_config.json": b"{}",
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b"{}",
    "special_tokens_map.json": b"{}",
    "merges.txt": b"#version: 0.2\n",
    "vocab.json": b"{}",
    "tokenizer.model": b"\x00\x01",
}


def model_dir(path, model, extra=LOADER_FILES):
    path.mkdir()
    save_file(model, path / "model.safetensors")
    for name, data in extra.items():
        (path / name).write_bytes(data)
    (path / "training_args.bin").write_bytes(b"not copied")
    (path / "README.md").write_text("the input's card, not copied")
    return path


def front_matter(card: str) -> list[str]:
    assert card.startswith("---\n")
    return card.split("---\n")[1].splitlines()


def test_directory_output_copies_loader_files_from_the_first_model(tmp_path):
    a, b = family(2, seed=1)
    first = model_dir(tmp_path / "a", a)
    second = model_dir(tmp_path / "b", b, extra={"config.json": b'{"other": 1}'})
    out = ladle.uniform_soup([first, second], out=tmp_path / "merged", device="cpu")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*LOADER_FILES, "README.md", "model.safetensors"])
    for name, data in LOADER_FILES.items():
        assert (out / name).read_bytes() == data
    assert not (out / name).is_symlink()


def test_loader_files_come_from_the_base_when_there_is_one(tmp_path):
    model = family(1, seed=2)[0]
    base = model_dir(tmp_path / "base", model, extra={"config.json": b'{"from": "base"}'})
    plain = tmp_path / "m.safetensors"
    save_file(model, plain)
    merged = ladle.engine.merge(
        [plain],
        ladle.methods.soup.weighted_mean_kernel([1.0]),
        base=base,
        method="test",
        parameters={},
        out=tmp_path / "out",
        device="cpu",
    )
    assert (merged / "config.json").read_bytes() == b'{"from": "base"}'


def test_model_card_front_matter_lists_base_models_and_tags(tmp_path):
    a, b = family(2, seed=3)
    paths = []
    for i, model in enumerate((a, b)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    out = ladle.uniform_soup(paths, weights=[3, 1], out=tmp_path / "soup", device="cpu")
    card = (out / "README.md").read_text()
    assert front_matter(card) == [  # local files are no Hub repo ids: no base_model
        "tags:",
        '- "merge"',
        '- "ladle"',
    ]
    assert "**uniform_soup**" in card and "`weights`: `[3.0, 1.0]`" in card


def test_model_card_recipe_is_valid_toml_that_names_resolved_revisions(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = family(1, seed=4)[0]
    from safetensors.torch import save

    write_cached_repo(
        cache,
        "org/a",
        COMMIT_A,
        {"model.safetensors": save(model), **LOADER_FILES},
        refs={"main": COMMIT_A},
    )
    out = ladle.uniform_soup(["hf://org/a", "hf://org/a"], out=tmp_path / "soup", device="cpu")
    card = (out / "README.md").read_text()
    assert front_matter(card)[:4] == [  # listed once
        "base_model:",
        '- "org/a"',
        "base_model_relation: merge",
        "tags:",
    ]
    assert f"| model 0 | `org/a` | `{COMMIT_A}` |" in card
    recipe = tomllib.loads(card.split("```toml\n")[1].split("```")[0])
    assert recipe["method"] == "uniform_soup"
    assert recipe["models"] == [f"hf://org/a@{COMMIT_A}"] * 2
    assert recipe["parameters"] == {"weights": [0.5, 0.5]}
    for name, data in LOADER_FILES.items():  # copied out of the snapshot, not symlinked
        assert (out / name).read_bytes() == data and not (out / name).is_symlink()


def test_single_file_output_gets_no_companions(tmp_path):
    model = family(1, seed=5)[0]
    source = model_dir(tmp_path / "src", model)
    ladle.uniform_soup([source], out=tmp_path / "out" / "m.safetensors", device="cpu")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.safetensors"]


def test_sharded_output_keeps_the_index_and_the_card(tmp_path):
    model = family(1, seed=6)[0]
    source = model_dir(tmp_path / "src", model)
    out = ladle.uniform_soup([source], out=tmp_path / "out", device="cpu", max_shard_size=40)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model)
    assert (out / "README.md").exists() and (out / "config.json").exists()


def test_failed_merge_leaves_no_companions_behind(tmp_path):
    a = family(1, seed=7)[0]
    source = model_dir(tmp_path / "src", a)
    bad = {"other": torch.zeros(1)}
    with pytest.raises(ladle.IncompatibleError):
        ladle.uniform_soup([source, bad], out=tmp_path / "out", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(
    "name", ["model.safetensors", "model.safetensors.index.json", "a/b", "a\\b", ""]
)
def test_writer_refuses_extra_files_that_clash_with_weights(tmp_path, name):
    with pytest.raises(LadleError, match="cannot be an extra file"):
        SafetensorsWriter(tmp_path / "d", {}, extra_files={name: b"x"})


def test_writer_refuses_extra_files_for_a_single_file_output(tmp_path):
    with pytest.raises(LadleError, match="directory output"):
        SafetensorsWriter(tmp_path / "m.safetensors", {}, extra_files={"README.md": b"x"})


def test_merged_tiny_model_loads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    sources = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
        model.save_pretrained(tmp_path / f"m{seed}")
        sources.append(tmp_path / f"m{seed}")
    out = ladle.uniform_soup(sources, out=tmp_path / "merged", device="cpu")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = ladle.uniform_soup(sources, device="cpu")
    state = merged.state_dict()
    for key, tensor in expected.items():
        if key in state:
            assert torch.allclose(state[key], tensor)


def _card_recipe(folder) -> str:
    card = (folder / "README.md").read_text()
    return card.split("```toml\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize(
    "method",
    [
        "uniform_soup",
        "task_arithmetic",
        "ties",
        "dare",
        "model_stock",
        "greedy_soup",
        "ratatouille",
        "slerp",
    ],
)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_every_methods_card_recipe_runs_and_gives_its_weights(tmp_path, method, dtype):
    from ladle.recipe import run_recipe

    base, *models = family(4, seed=21)
    paths = []
    for i, model in enumerate([base, *models]):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    base_path, model_paths = paths[0], paths[1:]
    out = tmp_path / "merged"
    evaluate = lambda sd: -float(sd["layer.weight"].sum())  # noqa: E731
    kw = {"out": out, "dtype": dtype}
    call = {
        "uniform_soup": lambda: ladle.uniform_soup(model_paths, weights=[1, 2, 3], **kw),
        "task_arithmetic": lambda: ladle.task_arithmetic(model_paths, base_path, scale=0.5, **kw),
        "ties": lambda: ladle.ties(model_paths, base_path, density=0.4, trim="tensor", **kw),
        "dare": lambda: ladle.dare(model_paths, base_path, density=0.5, seed=3, **kw),
        # Chunks this small change the Gram sums' rounding: the recipe must carry them.
        "model_stock": lambda: ladle.model_stock(model_paths, base_path, chunk_bytes=64, **kw),
        "greedy_soup": lambda: ladle.greedy_soup(model_paths, evaluate, **kw),
        "ratatouille": lambda: ladle.ratatouille(
            model_paths, selection="greedy", evaluate=evaluate, **kw
        ),
        # As Model Stock's: small chunks change the norms' rounding.
        "slerp": lambda: ladle.slerp(model_paths[:2], t=0.3, chunk_bytes=64, **kw),
    }[method]
    call()
    # As the card says: saved beside the output, whose folder its paths are relative to.
    (tmp_path / "recipe.toml").write_text(_card_recipe(out).replace('"replayed"', '"again"'))
    run_recipe(tmp_path / "recipe.toml", device="cpu")
    original, again = ladle.load(out), ladle.load(tmp_path / "again")
    assert original.keys() == again.keys()
    for key in original:
        assert again[key].dtype == original[key].dtype, key
        if method in ("greedy_soup", "ratatouille"):  # a running mean against a mean
            tolerance = {} if dtype is not None else {"rtol": 1e-6, "atol": 1e-7}
            torch.testing.assert_close(again[key], original[key], **tolerance)
        else:
            assert torch.equal(again[key], original[key]), key


def test_a_card_recipe_gives_float64_weights_bit_for_bit_for_weights_given(tmp_path):
    # The soup recorded its weights divided by their sum; divided again by the recipe, they
    # changed in the last bit, and so did 3339 of 4096 float64 entries.
    from ladle.recipe import run_recipe

    gen = torch.Generator().manual_seed(1)
    paths = []
    for i in range(5):
        w = torch.randn(64, 64, dtype=torch.float64, generator=gen)
        paths.append(ladle.save({"w": w}, tmp_path / f"m{i}.safetensors"))
    out = ladle.uniform_soup(paths, weights=[0.2, 1, 0.05, 1, 0.2], out=tmp_path / "merged")
    assert '"weights" = [0.2, 1.0, 0.05, 1.0, 0.2]' in _card_recipe(out)  # as given
    (tmp_path / "recipe.toml").write_text(_card_recipe(out).replace('"replayed"', '"again"'))
    run_recipe(tmp_path / "recipe.toml", device="cpu")
    assert torch.equal(ladle.load(tmp_path / "again")["w"], ladle.load(out)["w"])


@pytest.mark.parametrize("method", ["uniform_soup", "ties", "greedy_soup"])
def test_a_card_recipe_lets_through_the_nan_its_merge_let_through(tmp_path, method):
    # The recipe had no allow_nonfinite: `ladle run` refused the input the merge had taken.
    from ladle.recipe import run_recipe

    base, *models = family(3, seed=5)
    models[1]["layer.weight"][0, 0] = float("nan")
    paths = [ladle.save(m, tmp_path / f"m{i}.safetensors") for i, m in enumerate([base, *models])]
    kw = {"out": tmp_path / "merged", "allow_nonfinite": True}
    out = {
        "uniform_soup": lambda: ladle.uniform_soup(paths[1:], **kw),
        "ties": lambda: ladle.ties(paths[1:], paths[0], density=0.5, **kw),
        "greedy_soup": lambda: ladle.greedy_soup(paths[1:], lambda sd: 0.0, **kw).state_dict,
    }[method]()
    assert '"allow_nonfinite" = true' in _card_recipe(tmp_path / "merged")
    (tmp_path / "recipe.toml").write_text(
        _card_recipe(tmp_path / "merged").replace('"replayed"', '"again"')
    )
    run_recipe(tmp_path / "recipe.toml", device="cpu")
    again, original = ladle.load(tmp_path / "again"), ladle.load(tmp_path / "merged")
    exact = {} if method != "greedy_soup" else {"rtol": 1e-6, "atol": 1e-7}  # a running mean
    for key in original:
        torch.testing.assert_close(again[key], original[key], equal_nan=True, **exact)
    assert again["layer.weight"].isnan().any() and out is not None


def test_card_inputs_table_keeps_a_hub_subfolder():
    from ladle.modelcard import model_card

    commit = "a" * 40
    card = model_card(
        "uniform_soup", {}, [f"hf://org/m@{commit}/text_encoder", f"hf://org/m@{commit}"]
    )
    assert f"| model 0 | `org/m/text_encoder` | `{commit}` |" in card
    assert f"| model 1 | `org/m` | `{commit}` |" in card


def test_output_config_says_the_output_dtype_and_custom_code_is_copied(tmp_path):
    for i in range(2):
        model_dir(tmp_path / f"m{i}", {k: v.bfloat16() for k, v in family(1, seed=i)[0].items()})
        config = {"torch_dtype": "bfloat16", "auto_map": {"AutoModel": "modeling_custom.M"}}
        (tmp_path / f"m{i}" / "config.json").write_text(json.dumps(config))
        (tmp_path / f"m{i}" / "modeling_custom.py").write_text("# custom code\n")
        (tmp_path / f"m{i}" / "train_secret.py").write_text("TOKEN = 'x'\n")  # named by nothing
        (tmp_path / f"m{i}" / "processor_config.json").write_text("{}")
    out = ladle.uniform_soup(
        [tmp_path / "m0", tmp_path / "m1"], out=tmp_path / "o", dtype=torch.float16, device="cpu"
    )
    assert json.loads((out / "config.json").read_text()) == {
        "torch_dtype": "float16",
        "auto_map": {"AutoModel": "modeling_custom.M"},
    }
    assert (out / "modeling_custom.py").read_text() == "# custom code\n"
    assert not (out / "train_secret.py").exists()
    assert (out / "processor_config.json").exists()
    same = ladle.uniform_soup([tmp_path / "m0", tmp_path / "m1"], out=tmp_path / "p", device="cpu")
    assert (same / "config.json").read_bytes() == (tmp_path / "m0" / "config.json").read_bytes()


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["as is", "dtype set"])
def test_a_config_nested_too_deeply_for_json_is_copied_as_it_is(tmp_path, dtype):
    # json.loads recurses once per level: "[[[[..." raised RecursionError out of the merge
    nested = b"[" * 100_000
    for i in range(2):
        model_dir(tmp_path / f"m{i}", family(1, seed=i)[0])
        (tmp_path / f"m{i}" / "config.json").write_bytes(nested)
        (tmp_path / f"m{i}" / "tokenizer_config.json").write_bytes(nested)
    models = [tmp_path / "m0", tmp_path / "m1"]
    out = ladle.uniform_soup(models, out=tmp_path / "o", dtype=dtype, device="cpu")
    assert (out / "config.json").read_bytes() == nested
    assert (out / "tokenizer_config.json").read_bytes() == nested


def test_custom_code_is_copied_only_from_beside_the_config(tmp_path):
    from ladle.modelcard import companion_files

    (tmp_path / "secret.py").write_text("TOKEN = 'x'\n")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "modeling_a.py").write_text("# a\n")
    (folder / "tokenization_t.py").write_text("# t\n")
    auto_map = {
        "AutoModel": "modeling_a.M",
        "AutoConfig": "../secret.C",  # a path: never followed
        "AutoTokenizer": ["tokenization_t.T", None],
        "AutoProcessor": "org/repo--processing_p.P",  # another repo's code
    }
    (folder / "config.json").write_text(json.dumps({"auto_map": auto_map}))
    assert sorted(companion_files(folder)) == ["config.json", "modeling_a.py", "tokenization_t.py"]


def test_named_chat_templates_folder_is_copied(tmp_path):
    for i in range(2):
        model_dir(tmp_path / f"m{i}", family(1, seed=i)[0])
        (tmp_path / f"m{i}" / "additional_chat_templates").mkdir()
        (tmp_path / f"m{i}" / "additional_chat_templates" / "tool_use.jinja").write_text("{{ x }}")
    out = ladle.uniform_soup([tmp_path / "m0", tmp_path / "m1"], out=tmp_path / "o", device="cpu")
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ x }}"


def test_a_card_recipe_naming_a_path_with_a_del_character_is_valid_toml(tmp_path):
    odd = tmp_path / "b\x7f.safetensors"
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.full((2,), 3.0)}, odd)
    out = ladle.uniform_soup([tmp_path / "a.safetensors", odd], out=tmp_path / "merged")
    recipe = tomllib.loads(_card_recipe(out))
    assert recipe["models"] == ["a.safetensors", odd.name]


def test_a_card_recipe_names_an_output_dtype_recipes_cannot_hold_in_a_comment(tmp_path):
    save_file({"w": torch.ones(4)}, tmp_path / "a.safetensors")
    out = ladle.uniform_soup(
        [tmp_path / "a.safetensors"] * 2, out=tmp_path / "f", dtype=torch.float8_e4m3fn
    )
    recipe = _card_recipe(out)
    assert "# merged into float8_e4m3fn, which a recipe cannot name" in recipe
    assert "dtype =" not in recipe
    assert tomllib.loads(recipe)["method"] == "uniform_soup"


def test_a_single_file_model_folder_is_recorded_as_the_folder_and_its_recipe_copies_its_files(
    tmp_path, monkeypatch
):
    from ladle.recipe import run_recipe

    monkeypatch.chdir(tmp_path)
    for i, model in enumerate(family(2, seed=5)):
        (tmp_path / f"m{i}").mkdir()
        save_file(model, tmp_path / f"m{i}" / "model.safetensors")
        (tmp_path / f"m{i}" / "config.json").write_text('{"model_type": "toy"}')
    out = ladle.uniform_soup(["m0", "m1"], out="merged")
    with ladle.open_checkpoint(out) as ckpt:
        assert json.loads(ckpt.metadata["ladle.inputs"]) == ["m0", "m1"]
    with ladle.open_checkpoint("m0") as ckpt:  # errors still name the file itself
        assert ckpt.name == str(Path("m0") / "model.safetensors")
    card = (out / "README.md").read_text()
    # It said "Reproduce this merge with `ladle run recipe.toml`, the recipe saved in the
    # directory the merge ran from", as if a recipe.toml had been written there.
    assert "save this recipe as `recipe.toml` beside this model's\nfolder" in card
    assert "(no recipe file was written)" in card and not (tmp_path / "recipe.toml").exists()
    (tmp_path / "recipe.toml").write_text(_card_recipe(out).replace('"replayed"', '"again"'))
    run_recipe(tmp_path / "recipe.toml", device="cpu")
    assert (tmp_path / "again" / "config.json").is_file()  # the folders were the inputs


def test_inputs_in_the_home_folder_are_recorded_from_tilde_and_the_recipe_still_runs(
    tmp_path, monkeypatch
):
    from ladle.recipe import run_recipe

    home = tmp_path / "home" / "alice"
    monkeypatch.setenv("HOME", str(home))
    (home / "models").mkdir(parents=True)
    a, b = family(2, seed=3)
    save_file(a, home / "models" / "a.safetensors")
    model_dir(home / "models" / "b", b)
    save_file(a, tmp_path / "elsewhere.safetensors")
    inputs = [
        home / "models" / "a.safetensors",
        home / "models" / "b",
        tmp_path / "elsewhere.safetensors",
    ]
    out = ladle.uniform_soup(inputs, out=tmp_path / "merged")
    # Relative to tmp_path, which holds the output, the first two would name alice.
    recorded = ["~/models/a.safetensors", "~/models/b", "elsewhere.safetensors"]
    with ladle.open_checkpoint(out) as ckpt:
        assert json.loads(ckpt.metadata["ladle.inputs"]) == recorded
    card = (out / "README.md").read_text()
    assert "alice" not in card
    assert "| model 0 | `~/models/a.safetensors` | - |" in card
    assert tomllib.loads(_card_recipe(out))["models"] == recorded
    (tmp_path / "recipe.toml").write_text(_card_recipe(out).replace('"replayed"', '"again"'))
    run_recipe(tmp_path / "recipe.toml", device="cpu")  # ~ is the home folder again
    again, merged = ladle.load(tmp_path / "again"), ladle.load(out)
    assert all(torch.equal(again[k], merged[k]) for k in merged)


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_model_card_of_a_merge_with_a_hub_base_in_full():
    from ladle.modelcard import model_card

    commit = "c" * 40
    card = model_card(
        "ties",
        {"density": 0.5, "trim": "tensor", "eps": 1e-8},  # eps: no parameter of ties
        [f"hf://org/ft@{commit}", "models/local.safetensors"],
        f"hf://org/base@{commit}/unet",
        title="my-merge",
        dtype=torch.bfloat16,
    )
    assert card == "\n".join(
        [
            "---",
            "base_model:",
            '- "org/base"',  # the base first
            '- "org/ft"',
            "base_model_relation: merge",
            "tags:",
            '- "merge"',
            '- "ladle"',
            "---",
            "",
            "# my-merge",
            "",
            f"This model was merged with [ladle](https://pypi.org/project/ladle/) "
            f"{ladle.__version__} using **ties**.",
            "",
            "## Inputs",
            "",
            "| role | source | revision |",
            "| --- | --- | --- |",
            f"| base | `org/base/unet` | `{commit}` |",
            f"| model 0 | `org/ft` | `{commit}` |",
            "| model 1 | `models/local.safetensors` | - |",
            "",
            "## Parameters",
            "",
            "- `density`: `0.5`",
            '- `trim`: `"tensor"`',
            "- `eps`: `1e-08`",
            "",
            "## Recipe",
            "",
            "To reproduce this merge, save this recipe as `recipe.toml` beside this model's",
            "folder (relative paths below are relative to the folder holding both; `~` is the",
            "home folder) and run `ladle run recipe.toml` (no recipe file was written); it",
            "writes `replayed` there:",
            "",
            "```toml",
            'method = "ties"',
            f'base = "hf://org/base@{commit}/unet"',
            f'models = ["hf://org/ft@{commit}", "models/local.safetensors"]',
            'output = "replayed"',
            'dtype = "bfloat16"',
            "",
            "[parameters]",
            '"density" = 0.5',
            '"trim" = "tensor"',
            "```",
            "",
        ]
    )


def test_model_card_recipe_writes_flags_non_finite_numbers_and_tables_as_toml():
    from ladle.modelcard import model_card

    nan, inf = float("nan"), float("inf")
    card = model_card("greedy_soup", {"strict": True, "scores": [nan, inf, -inf, 2]}, ["a"])
    recipe = card.split("```toml\n", 1)[1].split("```", 1)[0]
    assert recipe.splitlines()[-2:] == ['"strict" = true', '"scores" = [nan, inf, -inf, 2]']
    card = model_card("ties", {"trim": {"a key": [1.5, False]}}, ["a"], "b")
    recipe = tomllib.loads(card.split("```toml\n", 1)[1].split("```", 1)[0])
    assert recipe["parameters"] == {"trim": {"a key": [1.5, False]}}


def test_model_card_without_parameters_or_with_an_input_in_memory():
    from ladle.modelcard import model_card

    card = model_card("uniform_soup", {}, ["a.safetensors"])
    assert "## Parameters\n\nNone.\n\n## Recipe" in card
    card = model_card("uniform_soup", {"weights": [0.5, 0.5]}, ["<state dict>", "a.safetensors"])
    assert card.endswith(
        "## Recipe\n\nSome inputs were in memory, not files: no recipe can reproduce this merge.\n"
    )
    assert "```toml" not in card
    card = model_card("ties", {}, ["a.safetensors"], "<state dict>")  # the base too
    assert "no recipe can reproduce this merge" in card and "```toml" not in card


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"dtype": "float32"}, {"dtype": "bfloat16"}),  # newer transformers: no torch_dtype
        (
            {"torch_dtype": "float32", "dtype": "float32"},
            {"torch_dtype": "bfloat16", "dtype": "bfloat16"},
        ),
        ({"model_type": "toy"}, {"model_type": "toy", "torch_dtype": "bfloat16"}),
        (  # a composite model's sub-configs say theirs too; others are left as they are
            {"dtype": "float32", "text_config": {"dtype": "float32", "n": 1}, "v": {"n": 2}},
            {"dtype": "bfloat16", "text_config": {"dtype": "bfloat16", "n": 1}, "v": {"n": 2}},
        ),
    ],
)
def test_output_config_dtype_fields_are_those_the_config_has(tmp_path, config, expected):
    from ladle.modelcard import output_files

    folder = ladle.save({"w": torch.ones(2)}, tmp_path / "m")
    (folder / "config.json").write_text(json.dumps(config))
    with ladle.open_checkpoint(folder) as ckpt:
        files = output_files(
            "uniform_soup", {}, [ckpt], None, out=tmp_path / "o", dtype=torch.bfloat16
        )
    assert json.loads(files["config.json"]) == expected


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_an_output_config_leaves_out_where_its_sub_configs_were_loaded_from(tmp_path, dtype):
    # A composite model (LLaVA, a VLM) records in text_config and vision_config where each
    # part was loaded from: "/home/alice/..." was published in the copy.
    from ladle.modelcard import output_files

    loaded = {"_name_or_path": "/home/alice/ckpts/llm", "dtype": "float32"}
    config = {"_name_or_path": "/home/alice/vlm", "text_config": loaded, "v": {"n": 2}}
    folder = ladle.save({"w": torch.ones(2)}, tmp_path / "m")
    (folder / "config.json").write_text(json.dumps(config))
    with ladle.open_checkpoint(folder) as ckpt:
        files = output_files("uniform_soup", {}, [ckpt], None, out=tmp_path / "o", dtype=dtype)
    named = {} if dtype is None else {"torch_dtype": "bfloat16"}
    assert json.loads(files["config.json"]) == {
        "text_config": {"dtype": "float32" if dtype is None else "bfloat16"},
        "v": {"n": 2},
        **named,
    }
    (folder / "config.json").write_text(json.dumps({"text_config": loaded}))
    with ladle.open_checkpoint(folder) as ckpt:  # a sub-config's alone is left out too
        files = output_files("uniform_soup", {}, [ckpt], None, out=tmp_path / "o")
    assert json.loads(files["config.json"]) == {"text_config": {"dtype": "float32"}}


def test_an_output_config_that_is_no_json_object_is_copied_as_it_is(tmp_path):
    from ladle.modelcard import output_files

    folder = ladle.save({"w": torch.ones(2)}, tmp_path / "m")
    (folder / "config.json").write_text("[1, 2]")
    with ladle.open_checkpoint(folder) as ckpt:
        files = output_files(
            "uniform_soup", {}, [ckpt], None, out=tmp_path / "o", dtype=torch.bfloat16
        )
    assert files["config.json"] == folder / "config.json"
    assert "\n# o\n" in files["README.md"].decode()  # headed by the output's name


@pytest.mark.parametrize(
    ("home", "recorded"),
    [
        ("alice", ["~/a.safetensors", "alice2/b.safetensors"]),  # not alice's folder
        ("alice/", ["~/a.safetensors", "alice2/b.safetensors"]),  # HOME with a slash
        ("./alice", ["~/a.safetensors", "alice2/b.safetensors"]),  # HOME not normalised
        ("/", ["alice/a.safetensors", "alice2/b.safetensors"]),  # no user's folder
    ],
)
def test_only_paths_inside_the_home_folder_are_recorded_from_tilde(
    tmp_path, monkeypatch, home, recorded
):
    for folder in ("alice", "alice2"):
        (tmp_path / folder).mkdir()
    a, b = tmp_path / "alice" / "a.safetensors", tmp_path / "alice2" / "b.safetensors"
    save_file({"w": torch.ones(2)}, a)
    save_file({"w": torch.zeros(2)}, b)
    monkeypatch.setenv("HOME", home if home == "/" else f"{tmp_path}/{home}")
    out = ladle.uniform_soup([a, b], out=tmp_path / "o.safetensors")
    with ladle.open_checkpoint(out) as ckpt:
        inputs = json.loads(ckpt.metadata["ladle.inputs"])
    assert inputs == [name.format(tmp=tmp_path) for name in recorded]


# Hub conventions for the front matter: a card huggingface_hub parses, whose lineage
# (base_model, base_model_relation) the Hub's model tree shows as a merge of what it holds.


def test_a_card_with_one_hub_input_says_it_is_a_merge_as_the_hub_reads_it():
    from huggingface_hub import ModelCard

    from ladle.modelcard import model_card

    commit = "c" * 40
    card = model_card("ties", {"density": 0.5}, ["ft/a", "ft/b"], f"hf://org/base@{commit}")
    # The Hub guesses the relation of a single base_model from the files ("finetune" for a
    # config and weights): the merge was listed as a fine-tune of its base.
    assert front_matter(card) == [
        "base_model:",
        '- "org/base"',
        "base_model_relation: merge",
        "tags:",
        '- "merge"',
        '- "ladle"',
    ]
    data = ModelCard(card).data.to_dict()
    assert data == {
        "base_model": ["org/base"],
        "base_model_relation": "merge",
        "tags": ["merge", "ladle"],
    }
    # With no Hub input there is no base_model, and no relation to one.
    assert "base_model_relation" not in model_card("ties", {}, ["ft/a"], "base")


def test_a_greedy_soups_card_lists_only_the_hub_models_it_kept_as_base_models():
    from huggingface_hub import ModelCard

    from ladle.modelcard import model_card

    a, b, c = (f"hf://org/{name}@{'c' * 40}" for name in "abc")
    for method, parameters in [
        ("greedy_soup", {"strict": False, "selected": [2, 0], "score": 1.0}),
        ("ratatouille", {"selection": "greedy", "strict": False, "selected": [2, 0]}),
    ]:
        card = model_card(method, parameters, [a, b, c])
        # org/b was tried and left out: the output holds none of its weights, and the Hub
        # listed the soup among org/b's merges.
        assert ModelCard(card).data.base_model == ["org/c", "org/a"], method
        assert "| model 1 | `org/b` |" in card  # the inputs table still shows every input
        recipe = card.split("```toml\n", 1)[1].splitlines()
        assert recipe[:4] == [
            f"# The greedy selection ({method}) kept models [2, 0]; this averages them, as",
            "# its output does (up to float32 rounding: the selection folds a running mean).",
            "# Re-running the selection needs your evaluate function.",
            'method = "uniform_soup"',
        ]


# Local inputs are recorded relative to the folder holding the output: a published card or
# header shows no folder above them, and the card's recipe, saved beside the output, runs.


def test_a_cards_recipe_run_beside_the_output_rewrites_its_weights_byte_for_byte(
    tmp_path, monkeypatch
):
    from ladle.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    base, a, b = family(3, seed=31)
    from safetensors.torch import save

    write_cached_repo(
        cache, "org/base", COMMIT_A, {"model.safetensors": save(base)}, refs={"main": COMMIT_A}
    )
    ckpts = tmp_path / "data" / "alice" / "ckpts"
    ckpts.mkdir(parents=True)
    model_dir(ckpts / "run3", a)
    save_file(b, ckpts / "b.safetensors")
    merges = tmp_path / "data" / "alice" / "merges"
    merges.mkdir()
    monkeypatch.chdir(tmp_path)  # one input relative to the working folder, one absolute
    argv = [
        "ties",
        "--base",
        "hf://org/base",
        "data/alice/ckpts/run3",
        str(ckpts / "b.safetensors"),
    ]
    assert main([*argv, "--density", "0.5", "-o", str(merges / "out"), "--no-progress"]) == 0
    out = merges / "out"
    recorded = ["../ckpts/run3", "../ckpts/b.safetensors"]
    recipe = tomllib.loads(_card_recipe(out))
    # They were "data/alice/ckpts/run3" (from where the merge ran) and "/tmp/.../ckpts/...".
    assert recipe["models"] == recorded
    assert recipe["base"] == f"hf://org/base@{COMMIT_A}"
    with ladle.open_checkpoint(out) as ckpt:
        assert json.loads(ckpt.metadata["ladle.inputs"]) == recorded
    assert str(tmp_path) not in (out / "README.md").read_text()

    (merges / "recipe.toml").write_text(_card_recipe(out).replace('"replayed"', '"again"'))
    monkeypatch.chdir(ckpts)  # the recipe's folder, not the working one, anchors its paths
    assert main(["run", str(merges / "recipe.toml"), "--no-progress"]) == 0
    again = merges / "again"
    # The same names in the header (ladle run recorded the absolute paths it resolved):
    # the weights file is the same bytes.
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert tomllib.loads(_card_recipe(again))["models"] == recorded
    assert str(tmp_path) not in (again / "README.md").read_text()


def test_inputs_are_recorded_relative_to_the_output_folder_as_its_links_resolve(tmp_path):
    from ladle.recipe import run_recipe

    a, b = family(2, seed=32)
    (tmp_path / "ckpts").mkdir()
    save_file(a, tmp_path / "ckpts" / "run7.safetensors")
    (tmp_path / "ckpts" / "latest.safetensors").symlink_to("run7.safetensors")
    save_file(b, tmp_path / "ckpts" / "b.safetensors")
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    inputs = [tmp_path / "ckpts" / "latest.safetensors", tmp_path / "ckpts" / "b.safetensors"]
    out = ladle.uniform_soup(inputs, out=tmp_path / "link" / "out")
    # "../ckpts/..." from link/ would be real/ckpts/...: the real path climbs two folders.
    # A linked file is named as given (latest, not run7).
    expected = ["../../ckpts/latest.safetensors", "../../ckpts/b.safetensors"]
    assert tomllib.loads(_card_recipe(out))["models"] == expected
    (tmp_path / "link" / "recipe.toml").write_text(_card_recipe(out).replace('"replayed"', '"r"'))
    run_recipe(tmp_path / "link" / "recipe.toml", device="cpu")
    again, merged = ladle.load(tmp_path / "link" / "r"), ladle.load(out)
    assert all(torch.equal(again[k], merged[k]) for k in merged)


def test_an_input_sharing_only_the_root_with_the_output_is_recorded_absolute(tmp_path, monkeypatch):
    from ladle.checkpoint import recorded_name

    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    root = Path(os.path.abspath(os.sep))
    with ladle.open_checkpoint(tmp_path / "a.safetensors") as ckpt:
        assert recorded_name(ckpt, root / "merged") == str(tmp_path / "a.safetensors")
        assert recorded_name(ckpt, tmp_path / "merged") == "a.safetensors"
        assert recorded_name(ckpt) == str(tmp_path / "a.safetensors")  # no output: as given
        monkeypatch.setenv("HOME", os.sep)  # the root as home folder: no user's folder
        assert recorded_name(ckpt) == str(tmp_path / "a.safetensors")


def test_an_input_in_a_linked_folder_is_recorded_through_the_link(tmp_path):
    from ladle.checkpoint import recorded_name

    (tmp_path / "ckpts" / "v2").mkdir(parents=True)
    (tmp_path / "ckpts" / "latest").symlink_to("v2")
    save_file({"w": torch.ones(2)}, tmp_path / "ckpts" / "v2" / "a.safetensors")
    with ladle.open_checkpoint(tmp_path / "ckpts" / "latest" / "a.safetensors") as ckpt:
        recorded = recorded_name(ckpt, tmp_path / "merges" / "out")
    assert recorded == "../ckpts/latest/a.safetensors"  # as named, not the link's target


@pytest.mark.parametrize("size", [50, "50B"])
def test_a_sharded_outputs_card_recipe_names_its_shard_size_and_rewrites_its_shards(tmp_path, size):
    from ladle.recipe import run_recipe

    paths = []
    for i, model in enumerate(family(2, seed=33)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    out = ladle.uniform_soup(paths, out=tmp_path / "merged", max_shard_size=size)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1
    recipe = tomllib.loads(_card_recipe(out))
    assert recipe["max_shard_size"] == size  # it had none: the recipe wrote one file
    (tmp_path / "recipe.toml").write_text(_card_recipe(out).replace('"replayed"', '"again"'))
    run_recipe(tmp_path / "recipe.toml", device="cpu")
    again = tmp_path / "again"
    assert sorted(p.name for p in again.glob("model-*.safetensors")) == shards
    for name in [*shards, "model.safetensors.index.json"]:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    ladle.greedy_soup(paths, lambda sd: 0.0, out=tmp_path / "g", max_shard_size=size)
    assert tomllib.loads(_card_recipe(tmp_path / "g"))["max_shard_size"] == size


def test_a_card_recipe_leaves_out_the_default_shard_size(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    for size in (ladle.writer.DEFAULT_MAX_SHARD_SIZE, 5 * 10**9):
        out = ladle.uniform_soup(
            [tmp_path / "a.safetensors"], out=tmp_path / f"o{size}", max_shard_size=size
        )
        assert "max_shard_size" not in _card_recipe(out)


def test_an_output_leaves_out_where_its_inputs_were_loaded_from(tmp_path):
    # transformers writes the folder a model was loaded from into config.json
    # (_name_or_path) and, before 4.27, tokenizer_config.json (name_or_path): a published
    # merge showed the user's folders, and named the base as the model it is.
    config = {"_name_or_path": "/home/alice/ckpts/base", "model_type": "toy"}
    tokenizer = {"name_or_path": "/home/alice/ckpts/base", "model_max_length": 8}
    for i in range(2):
        model_dir(tmp_path / f"m{i}", family(1, seed=i)[0])
        (tmp_path / f"m{i}" / "config.json").write_text(json.dumps(config))
        (tmp_path / f"m{i}" / "tokenizer_config.json").write_text(json.dumps(tokenizer))
        (tmp_path / f"m{i}" / "generation_config.json").write_text('{"_name_or_path": "x"}')
    models = [tmp_path / "m0", tmp_path / "m1"]
    for dtype, expected in ((None, {}), (torch.bfloat16, {"torch_dtype": "bfloat16"})):
        out = ladle.uniform_soup(models, out=tmp_path / f"o{dtype}", dtype=dtype, device="cpu")
        assert json.loads((out / "config.json").read_text()) == {"model_type": "toy", **expected}
        assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 8}
        # files that name no loading path are copied byte for byte
        generation = (out / "generation_config.json").read_bytes()
        assert generation == (tmp_path / "m0" / "generation_config.json").read_bytes()
    for name in ("config.json", "tokenizer_config.json"):  # the inputs are left as they were
        assert "/home/alice" in (tmp_path / "m0" / name).read_text()


def test_configs_are_read_as_utf_8_whatever_the_locale(tmp_path):
    # Read in the locale's encoding, a config under LC_ALL=C (ASCII) was no JSON, so copied
    # unedited (its dtype unchanged, the user's folder kept); under Latin-1, re-encoded
    # as mojibake ("cafÃ©").
    config = {"_name_or_path": "/home/alice/base", "note": "café ▁", "torch_dtype": "float32"}
    for i in range(2):
        model_dir(tmp_path / f"m{i}", family(1, seed=i)[0])
        text = json.dumps(config, ensure_ascii=False)  # as transformers writes it
        (tmp_path / f"m{i}" / "config.json").write_text(text, encoding="utf-8")
    # m1 sharded, its index's metadata not ASCII: the index was read in the locale's encoding
    shard = "model-00001-of-00001.safetensors"
    (tmp_path / "m1" / "model.safetensors").rename(tmp_path / "m1" / shard)
    keys = ladle.open_checkpoint(tmp_path / "m1").keys()
    index = {"metadata": {"note": "café"}, "weight_map": dict.fromkeys(keys, shard)}
    (tmp_path / "m1" / "model.safetensors.index.json").write_text(
        json.dumps(index, ensure_ascii=False), encoding="utf-8"
    )
    script = (
        "import sys, torch, ladle; "
        "ladle.uniform_soup(sys.argv[1:3], out=sys.argv[3], dtype=torch.bfloat16, device='cpu')"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    args = [str(tmp_path / "m0"), str(tmp_path / "m1"), str(tmp_path / "out")]
    subprocess.run([sys.executable, "-c", script, *args], env=env, check=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert written == {"note": "café ▁", "torch_dtype": "bfloat16"}


def test_an_unreadable_companion_file_is_named_before_the_merge(tmp_path, monkeypatch):
    # Its copy failed as the output was committed, after the merge: "out: finishing the
    # output failed: Permission denied", naming neither the file nor the input.
    from ladle import modelcard

    for i in range(2):
        model_dir(tmp_path / f"m{i}", family(1, seed=i)[0])
    locked = tmp_path / "m0" / "tokenizer.json"
    opened = os.open

    def refusing(path, flags, *args):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied")
        return opened(path, flags, *args)

    monkeypatch.setattr(modelcard.os, "open", refusing)
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.uniform_soup([tmp_path / "m0", tmp_path / "m1"], out=tmp_path / "out")
    assert str(info.value) == (
        f"{locked}: cannot read it (Permission denied); it is copied beside the output"
    )
    assert not (tmp_path / "out").exists()


def _table_cells(row: str) -> list[str]:
    """A Markdown table row's cells as GitHub renders them: split at every ``|`` not escaped,
    ``\\|`` read as ``|``, a code span's fence (and the one space padding both ends) dropped."""
    cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]
    shown = []
    for cell in (cell.replace("\\|", "|") for cell in cells):
        fence = re.match("`*", cell).group()
        if fence:  # closed by a run of backticks as long, and no longer
            assert re.search("`*$", cell).group() == fence and len(cell) > 2 * len(fence)
            cell = cell[len(fence) : -len(fence)]
            # A run of backticks as long as the fence inside would close the span there.
            assert len(fence) not in {len(run) for run in re.findall("`+", cell)}
            if cell.startswith(" ") and cell.endswith(" ") and cell.strip():
                cell = cell[1:-1]
        shown.append(cell)
    return shown


@pytest.mark.parametrize(
    "name",
    ["runs/a|b.safetensors", "x`y", "`edge`", "edge`", "a``b|`c", "plain/path.safetensors"],
)
def test_a_source_name_shows_whole_in_its_own_cell_of_the_inputs_table(name):
    # A "|" in a path ended the cell (even inside backticks), and a backtick ended the code
    # span: the table showed a fourth column, or the path cut short.
    card = model_card("soup", {}, [name])
    (row,) = [line for line in card.splitlines() if line.startswith("| model 0 |")]
    assert _table_cells(row) == ["model 0", name, "-"]


def test_a_line_break_in_a_source_name_stays_in_its_row_of_the_inputs_table():
    # The row was split at the line break: a malformed table.
    card = model_card("soup", {}, ["ckpt\nA", "plain"])
    rows = [line for line in card.splitlines() if line.startswith("| model ")]
    assert [_table_cells(row) for row in rows] == [
        ["model 0", "'ckpt\\nA'", "-"],
        ["model 1", "plain", "-"],
    ]


def test_license_fields_keep_the_line_breaks_yaml_folds_inside_quoted_values(tmp_path):
    # NEL, U+2028 and U+2029 were written raw inside a double-quoted value, which YAML reads
    # as a space each: the card recorded another link than the input's.
    from huggingface_hub import ModelCard

    card = tmp_path / "README.md"
    card.write_text(
        '---\nlicense: other\nlicense_link: "https://x/\\Ny\\Lz\\Pw"\n---\n', encoding="utf-8"
    )
    fields = license_fields(card)
    written = "".join(f"{field}: {value}\n" for field, value in fields.items())
    assert ModelCard(f"---\n{written}---\n").data.to_dict() == {
        "license": "other",
        "license_link": "https://x/\x85y\u2028z\u2029w",
    }


def test_license_texts_and_card_license_come_from_the_input_whose_config_is_copied(tmp_path):
    base, model = family(2, seed=4)
    model_dir(tmp_path / "base", base)
    model_dir(tmp_path / "ft", model)
    terms = {
        "LICENSE": "LLAMA 3 COMMUNITY LICENSE AGREEMENT\n",
        "USE_POLICY.md": "# Acceptable Use Policy\n",
        "NOTICE.txt": "notice\n",
    }
    for name, text in terms.items():
        (tmp_path / "base" / name).write_text(text)
    (tmp_path / "base" / "README.md").write_text(
        "---\nlanguage:\n- en\nlicense: other\nlicense_name: llama3\n"
        "license_link: LICENSE\ntags: [a, b]\n---\n# Base\nlicense: not front matter\n"
    )
    (tmp_path / "ft" / "LICENSE").write_text("the fine-tune's own: not copied\n")
    (tmp_path / "ft" / "README.md").write_text("---\nlicense: mit\n---\n")
    out = ladle.task_arithmetic([tmp_path / "ft"], tmp_path / "base", out=tmp_path / "o")
    assert {name: (out / name).read_text() for name in terms} == terms
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert front.splitlines()[:3] == [
        "license: other",
        "license_name: llama3",
        "license_link: LICENSE",
    ]
    assert "# Base" not in card and "mit" not in front


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# no front matter\nlicense: mit\n", {}),
        ("---\nlicense: mit\n", {}),  # never closed: no front matter
        ("---\nlicense: [unclosed\n---\n", {}),  # no YAML: nothing of it taken
        ("---\nlicense: |\n  custom terms\n---\n", {"license": "custom terms"}),
        ("---\nlicense:\n---\n", {}),
        (
            "---\nextra:\n  license: mit\nlicense: 'apache-2.0' # ok\n---\n",
            {"license": "apache-2.0"},
        ),
        ("---\r\nlicense: mit\r\n---\r\n", {"license": "mit"}),
        ("\ufeff---\nlicense: mit\n---\n", {"license": "mit"}),
        ("\n \n---\nlicense: mit\n---\n", {"license": "mit"}),  # the Hub reads it too
        (
            "---\nlicense: other\nlicense_link: https://example.com/LICENSE\n---\n",
            {"license": "other", "license_link": "https://example.com/LICENSE"},
        ),
        ("---\nlicense: # to be decided\n---\n", {}),  # a comment: no value
        (b"---\nlicense: mit\n---\n# Mod\xe8le\n", {"license": "mit"}),  # Latin-1, not UTF-8
        ("---\n" + "tags:\n" + "- x\n" * 50_000 + "license: mit\n---\n", {"license": "mit"}),
        # Values that go on over the next lines, as YAML reads them (a line-by-line reading
        # copied the first line alone, or took a line inside a value for a field)
        (
            '---\nlicense: other\nlicense_name: "acme research\n  license v2"\n---\n',
            {"license": "other", "license_name": "acme research license v2"},
        ),
        (
            '---\nlicense: other\ndescription: "terms\n  license: apache-2.0"\n---\n',
            {"license": "other"},
        ),
        ("---\nlicense: ['mit',\n  'apache-2.0']\n---\n", {"license": ["mit", "apache-2.0"]}),
        ("---\nlanguage: &l apache-2.0\nlicense: *l\n---\n", {"license": "apache-2.0"}),
        (
            "---\nlicense: 'yes'\nlicense_name: 'a: b'\n---\n",
            {"license": "yes", "license_name": "a: b"},
        ),
        # What ModelCard, json.dumps or the output card choked on, or what could blow up:
        ("---\nlicense: mit\n2024: release\n---\n", {"license": "mit"}),  # a key no string
        ("---\nlicense: &a [*a]\nlicense_name: x\n---\n", {"license_name": "x"}),  # a cycle
        (
            '---\nlicense: other\nlicense_name: "acme\\x80 terms\\uFFFE"\n---\n',
            {"license": "other", "license_name": "acme\x80 terms\ufffe"},
        ),
        (
            "---\na: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
            "license: [*b, *b, *b, *b, *b, *b, *b, *b]\nlicense_link: L\n---\n",
            {"license_link": "L"},
        ),
        ("---\nlicense: !!timestamp foo\nlicense_name: x\n---\n", {}),  # PyYAML raised
        (
            "---\nlicense: other\nlicense_name: smile 😀\n---\n",
            {"license": "other", "license_name": "smile 😀"},
        ),
    ],
    ids=[
        "none",
        "unclosed",
        "no yaml",
        "block scalar",
        "empty",
        "nested and quoted",
        "crlf",
        "bom",
        "blank lines first",
        "link",
        "comment",
        "latin-1",
        "long front matter",
        "quote over two lines",
        "field-like line inside a value",
        "flow list over two lines",
        "anchor",
        "quoted where plain would read otherwise",
        "key no string",
        "cycle",
        "characters yaml refuses raw",
        "aliases",
        "a tag pyyaml cannot build",
        "past U+FFFF",
    ],
)
def test_license_fields_are_the_front_matters_values_written_back_as_yaml(tmp_path, text, expected):
    from huggingface_hub import ModelCard

    card = tmp_path / "README.md"
    card.write_bytes(text if isinstance(text, bytes) else text.encode())
    fields = license_fields(card)
    written = "".join(f"{field}: {value}\n" for field, value in fields.items())
    read_back = ModelCard(f"---\n{written}---\n").data.to_dict() if fields else {}
    assert read_back == expected
    assert license_fields(tmp_path / "missing.md") == {}


def test_companion_files_of_no_folder_and_of_code_a_config_names_but_lacks(tmp_path):
    from ladle.modelcard import companion_files

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "LICENSE.d").mkdir()  # a folder, though named like a license file
    (folder / "tokenization_t.py").write_text("# t\n")
    (folder / "config.json").write_text(
        json.dumps({"auto_map": {"AutoModel": "modeling_absent.M"}})  # its file is missing
    )
    # The tokenizer's code is named by tokenizer_config.json alone.
    auto_map = {"AutoTokenizer": ["tokenization_t.T", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map}))
    assert sorted(companion_files(folder)) == [
        "config.json",
        "tokenization_t.py",
        "tokenizer_config.json",
    ]
    assert companion_files(folder / "config.json") == {}  # a file is no folder
    assert companion_files(tmp_path / "missing") == {}


@pytest.mark.parametrize("auto_map", [None, ["modeling_a.M"], "modeling_a.M"])
def test_a_config_whose_auto_map_is_no_object_names_no_custom_code(tmp_path, auto_map):
    from ladle.modelcard import companion_files

    (tmp_path / "modeling_a.py").write_text("# a\n")
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": auto_map}))
    assert sorted(companion_files(tmp_path)) == ["config.json"]


def test_a_recipe_writes_a_tuple_as_a_list_and_leaves_out_evaluate():
    card = model_card("ties", {"density": (0.5, 0.25)}, ["a"], "b")
    recipe = tomllib.loads(card.split("```toml\n", 1)[1].split("```", 1)[0])
    assert recipe["parameters"] == {"density": [0.5, 0.25]}
    # ratatouille takes an evaluate function, which no recipe can hold
    card = model_card("ratatouille", {"selection": "uniform", "evaluate": "<function f>"}, ["a"])
    recipe = tomllib.loads(card.split("```toml\n", 1)[1].split("```", 1)[0])
    assert recipe["parameters"] == {"selection": "uniform"}


@pytest.mark.parametrize("selected", ["all", ["a"], [0.5], None])
def test_a_selected_parameter_that_is_no_list_of_indices_is_no_greedy_selection(selected):
    # A method of the user's (engine.merge) may record a "selected" of its own.
    a, b = (f"hf://org/{name}@{'c' * 40}" for name in "ab")
    card = model_card("uniform_soup", {"selected": selected}, [a, b])
    assert front_matter(card)[:3] == ["base_model:", '- "org/a"', '- "org/b"']
    recipe = card.split("```toml\n", 1)[1]
    assert recipe.startswith('method = "uniform_soup"\n') and "greedy" not in recipe


@pytest.mark.parametrize(
    ("subfolder", "own"),
    [("unet", True), ("unet", False), ("models/unet", False)],
    ids=["own card", "root's terms", "nested"],
)
def test_a_hub_subfolders_terms_are_its_own_card_s_else_the_repository_root_s(
    tmp_path, monkeypatch, subfolder, own
):
    from safetensors.torch import save

    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    files = {
        "LICENSE": b"the repository's license",
        "README.md": b"---\nlicense: openrail\n---\n",
        "config.json": b'{"of": "the root model"}',  # only the root's terms are taken
        f"{subfolder}/model.safetensors": save(family(1, seed=8)[0]),
        f"{subfolder}/config.json": b'{"of": "the subfolder model"}',
    }
    if own:  # a card, and no license file, of the subfolder's own
        files[f"{subfolder}/README.md"] = b"---\nlicense: apache-2.0\n---\n"
    write_cached_repo(cache, "org/sd", COMMIT_A, files, refs={"main": COMMIT_A})
    source = f"hf://org/sd/{subfolder}"
    out = ladle.uniform_soup([source] * 2, out=tmp_path / "merged", device="cpu")
    assert front_matter((out / "README.md").read_text())[0] == (
        "license: apache-2.0" if own else "license: openrail"
    )
    assert (out / "LICENSE").exists() is not own
    assert (out / "config.json").read_bytes() == files[f"{subfolder}/config.json"]


@pytest.mark.parametrize("kind", ["broken link", "named pipe"])
def test_an_unreadable_file_in_a_companion_folder_is_refused_before_the_merge(tmp_path, kind):
    # The copy failed after the merge: "out: finishing the output failed: [(..., '.../.out.
    # ladle-tmp-.../additional_chat_templates/x.jinja', ...)]", the input blamed on the output
    for name, value in (("a", 1.0), ("b", 0.0)):
        ladle.save({"w": torch.full((2,), value)}, tmp_path / name)
    (tmp_path / "a" / "config.json").write_text("{}")
    templates = tmp_path / "a" / "additional_chat_templates"
    templates.mkdir()
    entry = templates / "x.jinja"
    if kind == "broken link":
        entry.symlink_to(tmp_path / "nowhere")
    else:
        os.mkfifo(entry)
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.uniform_soup([tmp_path / "a", tmp_path / "b"], out=tmp_path / "out")
    assert str(info.value).startswith(f"{entry}: ")
    assert str(info.value).endswith("; it is copied beside the output")
    assert not (tmp_path / "out").exists()


def test_a_greedy_soup_card_recipe_keeps_each_tensors_dtype_when_model_0_ranks_below(tmp_path):
    # The recipe asked for the first tensor's dtype (float32) where the best-ranked model was
    # not model 0, and so wrote every tensor in it: h came back float32, not float16.
    from ladle.recipe import run_recipe

    gen = torch.Generator().manual_seed(2)
    paths = [
        ladle.save(
            {"w": torch.randn(6, generator=gen), "h": torch.randn(4, generator=gen).half()},
            tmp_path / f"m{i}.safetensors",
        )
        for i in range(3)
    ]
    ladle.greedy_soup(paths, lambda sd: 0.0, scores=[0.1, 0.2, 0.9], out=tmp_path / "merged")
    assert "dtype" not in _card_recipe(tmp_path / "merged")
    (tmp_path / "recipe.toml").write_text(
        _card_recipe(tmp_path / "merged").replace('"replayed"', '"again"')
    )
    run_recipe(tmp_path / "recipe.toml", device="cpu")
    again, original = ladle.load(tmp_path / "again"), ladle.load(tmp_path / "merged")
    assert {k: t.dtype for k, t in again.items()} == {"w": torch.float32, "h": torch.float16}
    for key in original:
        torch.testing.assert_close(again[key], original[key], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes: Linux")
def test_a_card_names_an_input_whose_file_name_is_no_utf8_by_its_escape(tmp_path):
    # card.encode() raised UnicodeEncodeError on the lone surrogate, failing the merge.
    path = tmp_path / os.fsdecode(b"m\xe9.pt")  # 'm\udce9.pt': a torch file may be so named
    torch.save({"w": torch.ones(2)}, path)
    ladle.uniform_soup([path, path], out=tmp_path / "merged")
    card = (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")
    assert "m\\udce9.pt" in card
    assert torch.equal(ladle.load(tmp_path / "merged")["w"], torch.ones(2))


def test_a_card_recipe_as_written_replays_beside_the_model_and_its_inputs(tmp_path):
    # It always wrote `output = "merged"`: replaying the card of a model called merged was
    # refused as existing (with --overwrite it replaced the model it was to reproduce), and
    # so was that of a merge with an input called merged ("would overwrite ... an input").
    from ladle.recipe import run_recipe

    parts = [ladle.save(m, tmp_path / f"p{i}.safetensors") for i, m in enumerate(family(2))]
    soup = ladle.uniform_soup(parts, out=tmp_path / "merged")
    assert "(no recipe file was written); it\nwrites `replayed` there:" in _card(soup)
    (tmp_path / "recipe.toml").write_text(_card_recipe(soup))
    run_recipe(tmp_path / "recipe.toml", device="cpu")
    assert_bit_for_bit(ladle.load(tmp_path / "replayed"), ladle.load(soup))
    # A merge of that model and of one inside "replayed": the recipe writes elsewhere.
    second = ladle.save(family(1, seed=4)[0], tmp_path / "replayed" / "b.safetensors")
    final = ladle.uniform_soup([soup, second], out=tmp_path / "final")
    assert "writes `replayed-2` there:" in _card(final)
    (tmp_path / "recipe.toml").write_text(_card_recipe(final))
    run_recipe(tmp_path / "recipe.toml", device="cpu")
    assert_bit_for_bit(ladle.load(tmp_path / "replayed-2"), ladle.load(final))


def _card(folder) -> str:
    return (folder / "README.md").read_text()


def test_inputs_in_folders_named_like_home_or_memory_are_recorded_so_the_recipe_reads_them(
    tmp_path, monkeypatch
):
    # A folder "~" beside the output was recorded "~/x" (the recipe read the home folder),
    # and one named "<a>" as "<a>", an input in memory: "no recipe can reproduce this merge".
    import json

    from ladle.recipe import run_recipe

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # which has an x of its own
    for i, folder in enumerate(["~/x", "<a>", "home/x"]):
        ladle.save(family(1, seed=i)[0], tmp_path / folder / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    merged = ladle.uniform_soup([tmp_path / "~" / "x", "<a>"], out=tmp_path / "merged")
    recipe = _card_recipe(merged)
    assert 'models = ["./~/x", "./<a>"]' in recipe and "no recipe can" not in _card(merged)
    with ladle.open_checkpoint(merged) as written:
        assert json.loads(written.metadata["ladle.inputs"]) == ["./~/x", "./<a>"]
    (tmp_path / "recipe.toml").write_text(recipe)
    run_recipe(tmp_path / "recipe.toml", device="cpu")
    assert_bit_for_bit(ladle.load(tmp_path / "replayed"), ladle.load(merged))


def test_a_card_says_an_input_named_in_no_utf8_must_be_renamed_to_replay_it(tmp_path):
    # The recipe, with the name's escapes, is no TOML: `ladle run` refused it, while the
    # card said to run it.
    path = tmp_path / os.fsdecode(b"m\xe9.pt")
    torch.save({"w": torch.ones(2)}, path)
    ladle.uniform_soup([path, path], out=tmp_path / "merged")
    card = (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")
    assert (
        "An input's file name is no UTF-8 text, written below by its escapes, which\n"
        "TOML cannot hold: rename that file, and the name in the recipe, to run it."
    ) in card
    plain = ladle.save({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    ladle.uniform_soup([plain, plain], out=tmp_path / "other")
    assert "no UTF-8" not in (tmp_path / "other" / "README.md").read_text()


@pytest.mark.parametrize("output", ["ta.safetensors", "ta"])
def test_a_base_whose_file_name_is_no_utf8_is_recorded_by_its_escape(tmp_path, output):
    # Its raw name went into the header's ladle.base, which safetensors refuses: every merge
    # with such a base written to disk failed (a ValueError), the models' names being JSON.
    folder = tmp_path / os.fsdecode(b"ckpts-\xe9")
    base = ladle.save({"w": torch.ones(2)}, folder / "base.safetensors")
    model = ladle.save({"w": torch.full((2,), 3.0)}, tmp_path / "ft.safetensors")
    written = ladle.task_arithmetic([model], base=base, out=tmp_path / output)
    file = written if output.endswith(".safetensors") else written / "model.safetensors"
    with safetensors.safe_open(str(file), "pt") as handle:
        meta = handle.metadata()
    assert meta["ladle.base"] == "ckpts-\\udce9/base.safetensors"
    assert json.loads(meta["ladle.inputs"]) == ["ft.safetensors"]
    assert ladle.load(written)["w"].tolist() == [3.0, 3.0]


# Found by mutation testing: license fields the card reader must quote, or leave out.


@pytest.mark.parametrize(
    ("front", "expected"),
    [
        ('license: "Yes"', {"license": '"Yes"'}),  # a YAML word in any case stays a string
        ('license: "NO"', {"license": '"NO"'}),
        ("license: []\nlicense_name: x", {"license_name": "x"}),  # an empty list: left out
        ('license: other\nlicense_name: "' + "x " * 600 + '"', {"license": "other"}),
        ("license: other\nlicense_name: " + "x" * 1001, {"license": "other"}),  # one word too
        (
            "license: other\nlicense_name: " + "x" * 1000,
            {"license": "other", "license_name": "x" * 1000},
        ),
        ('license: other\nlicense_link: ["' + "y" * 1500 + '"]', {"license": "other"}),
        ("- license\n- mit", {}),  # front matter that is no mapping
    ],
    ids=[
        "Yes",
        "NO",
        "empty list",
        "long name",
        "long word",
        "longest word",
        "long list entry",
        "a list",
    ],
)
def test_license_fields_quote_yaml_words_and_leave_out_what_cannot_be_written(
    tmp_path, front, expected
):
    card = tmp_path / "README.md"
    card.write_text(f"---\n{front}\n---\n# M\n")
    assert license_fields(card) == expected


def test_a_remote_code_module_that_is_no_plain_name_is_not_copied(tmp_path):
    from ladle.modelcard import companion_files

    (tmp_path / "config.json").write_text('{"auto_map": {"AutoModel": "my-model.Foo"}}')
    (tmp_path / "my-model.py").write_text("x = 1\n")
    assert sorted(companion_files(tmp_path)) == ["config.json"]
