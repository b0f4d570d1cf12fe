from __future__ import annotations

import gc
import json
import math
import os
import weakref
from typing import ClassVar

import pytest
import torch
from conftest import assert_bit_for_bit, family, recording_bar
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import ladle
from ladle.checkpoint import Checkpoint
from ladle.cli import main


def one_hot_family(n: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Model i holds e_i in "w": a soup's "w" is positive exactly on its ingredients."""
    models = []
    for i in range(n):
        w = torch.zeros(n, dtype=dtype)
        w[i] = 1
        models.append({"w": w, "b": torch.full((2,), float(i), dtype=dtype), "n": torch.tensor(i)})
    return models


def ingredients(state_dict) -> frozenset[int]:
    return frozenset(int(i) for i in torch.nonzero(state_dict["w"] > 0).flatten())


class Scripted:
    """``evaluate`` scripted by the set of ingredients; records every call."""

    def __init__(self, table):
        self.table = {frozenset(k): v for k, v in table.items()}
        self.calls: list[frozenset[int]] = []

    def __call__(self, state_dict) -> float:
        subset = ingredients(state_dict)
        self.calls.append(subset)
        return self.table[subset]


# Scores 0.5, 0.9, 0.7, 0.7: ranked 1, 2, 3, 0 (2 and 3 tie: input order).
SCORES = [0.5, 0.9, 0.7, 0.7]
TABLE = {
    (1, 2): 0.9,  # equal to the best so far: kept unless strict
    (1, 2, 3): 0.92,
    (0, 1, 2, 3): 0.91,
    (1, 3): 0.89,
    (0, 1): 0.93,
}


def steps(result):
    return [(s.index, s.score, s.accepted) for s in result.history]


def test_greedy_soup_keeps_a_candidate_whose_score_equals_the_best():
    evaluate = Scripted(TABLE)
    result = ladle.greedy_soup(one_hot_family(4), evaluate, scores=SCORES, device="cpu")
    assert result.selected == [1, 2, 3]
    assert result.score == 0.92
    assert steps(result) == [(1, 0.9, True), (2, 0.9, True), (3, 0.92, True), (0, 0.91, False)]
    assert ingredients(result.state_dict) == {1, 2, 3}


def test_strict_greedy_soup_keeps_only_strict_improvements():
    evaluate = Scripted(TABLE)
    result = ladle.greedy_soup(
        one_hot_family(4), evaluate, scores=SCORES, strict=True, device="cpu"
    )
    assert result.selected == [1, 0]
    assert result.score == 0.93
    assert steps(result) == [(1, 0.9, True), (2, 0.9, False), (3, 0.89, False), (0, 0.93, True)]
    torch.testing.assert_close(result.state_dict["w"], torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_evaluate_is_called_once_per_candidate_when_scores_are_given():
    evaluate = Scripted(TABLE)
    ladle.greedy_soup(one_hot_family(4), evaluate, scores=SCORES, device="cpu")
    assert evaluate.calls == [{1, 2}, {1, 2, 3}, {0, 1, 2, 3}]


def test_evaluate_is_called_once_per_model_then_once_per_candidate_without_scores():
    table = {**TABLE, **{(i,): s for i, s in enumerate(SCORES)}}
    evaluate = Scripted(table)
    result = ladle.greedy_soup(one_hot_family(4), evaluate, device="cpu")
    assert evaluate.calls == [{0}, {1}, {2}, {3}, {1, 2}, {1, 2, 3}, {0, 1, 2, 3}]
    assert result.selected == [1, 2, 3]


def test_ties_in_scores_keep_input_order():
    evaluate = Scripted({(0, 1): 0.0, (0, 2): 0.0})
    result = ladle.greedy_soup(one_hot_family(3), evaluate, scores=[0.5, 0.5, 0.5], device="cpu")
    assert [s.index for s in result.history] == [0, 1, 2]


def naive_greedy(scores, table, strict):
    """Algorithm 1 of Wortsman et al., on subsets."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    soup, best = [order[0]], scores[order[0]]
    history = [(order[0], best, True)]
    for i in order[1:]:
        tried = table[frozenset([*soup, i])]
        kept = tried > best if strict else tried >= best
        history.append((i, tried, kept))
        if kept:
            soup, best = [*soup, i], tried
    return soup, best, history


@given(
    st.integers(1, 6),
    st.data(),
    st.booleans(),
)
def test_greedy_soup_matches_a_naive_greedy_rule(n, data, strict):
    level = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])  # few values: many ties
    scores = [data.draw(level) for _ in range(n)]
    table: dict = {}

    def evaluate(state_dict):
        return table.setdefault(ingredients(state_dict), data.draw(level))

    result = ladle.greedy_soup(one_hot_family(n), evaluate, scores=scores, strict=strict)
    assert (result.selected, result.score, steps(result)) == naive_greedy(scores, table, strict)


def test_result_is_the_last_accepted_candidate_exactly_and_near_the_uniform_soup():
    models = family(5, seed=3)
    seen = []

    def evaluate(state_dict):
        seen.append({k: v.clone() for k, v in state_dict.items()})
        return float(len(seen) % 3 != 0)  # rejects the 3rd candidate

    result = ladle.greedy_soup(models, evaluate, scores=[1.0] * 5, device="cpu")
    assert result.selected == [0, 1, 2, 4]
    last_accepted = seen[3]
    assert all(torch.equal(result.state_dict[k], last_accepted[k]) for k in last_accepted)
    uniform = ladle.uniform_soup([models[i] for i in result.selected], device="cpu")
    for key in uniform:
        torch.testing.assert_close(result.state_dict[key], uniform[key], rtol=1e-6, atol=1e-6)


def test_running_mean_of_identical_low_precision_models_is_that_model_exactly():
    model = family(1, seed=4, dtype=torch.bfloat16)[0]
    result = ladle.greedy_soup([model] * 5, lambda sd: 1.0, scores=[1.0] * 5, device="cpu")
    assert result.selected == [0, 1, 2, 3, 4]
    assert all(torch.equal(result.state_dict[k], model[k]) for k in model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_a_soup_of_identical_models_keeps_negative_zeros_and_infinities_bit_for_bit(dtype):
    # lerp's soup + w·(model − soup): −0.0 + 0.0 gave +0.0, inf − inf gave NaN
    values = torch.tensor([-0.0, float("inf"), 1.5, -float("inf"), 0.0], dtype=dtype)
    result = ladle.greedy_soup(
        [{"w": values}] * 3, lambda sd: 1.0, allow_nonfinite=True, device="cpu"
    ).state_dict["w"]
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(result.view(bits), values.view(bits))  # -0.0 == 0.0 for torch.equal


@pytest.mark.parametrize("scores", [None, [0.1, 0.2, 0.3, 0.05]])
def test_a_non_finite_model_is_named_by_its_place_among_the_models(tmp_path, scores):
    # Its place in the fold was named: "model 0" (scored alone), "model 1" (beside the soup)
    paths = []
    for i in range(4):
        w = torch.full((8,), float(i))
        w[2] = float("nan") if i == 3 else w[2]
        save_file({"w": w}, tmp_path / f"g{i}.safetensors")
        paths.append(tmp_path / f"g{i}.safetensors")
    with pytest.raises(ladle.NonFiniteError) as info:
        ladle.greedy_soup(paths, lambda sd: 1.0, scores=scores, device="cpu")
    assert str(info.value).startswith(f"model 3 ({paths[3]}): key 'w' holds NaN or Inf values")


def test_evaluate_sees_the_output_dtype_and_integer_buffers_come_from_the_best_model():
    models = one_hot_family(3, dtype=torch.bfloat16)
    dtypes = []

    def evaluate(state_dict):
        dtypes.append((state_dict["w"].dtype, state_dict["n"].dtype))
        return 1.0

    result = ladle.greedy_soup(models, evaluate, scores=[0, 2, 1], device="cpu")
    assert set(dtypes) == {(torch.bfloat16, torch.int64)}
    assert result.state_dict["w"].dtype == torch.bfloat16
    assert result.state_dict["n"].item() == 1  # model 1 ranks first
    as_fp32 = ladle.greedy_soup(models, evaluate, scores=[0, 2, 1], dtype=torch.float32)
    assert as_fp32.state_dict["w"].dtype == torch.float32
    assert as_fp32.state_dict["n"].dtype == torch.int64


def test_one_model_is_its_own_soup_and_evaluated_once_without_scores():
    evaluate = Scripted({(0,): 0.4})
    result = ladle.greedy_soup(one_hot_family(1), evaluate, device="cpu")
    assert (result.selected, result.score, steps(result)) == ([0], 0.4, [(0, 0.4, True)])
    assert evaluate.calls == [{0}]


def test_out_writes_the_returned_soup_from_paths(tmp_path):
    paths = []
    for i, model in enumerate(one_hot_family(4)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    out = tmp_path / "greedy"
    result = ladle.greedy_soup(paths, Scripted(TABLE), scores=SCORES, out=out, device="cpu")
    written = ladle.load(out)
    assert set(written) == set(result.state_dict)
    assert all(torch.equal(written[k], result.state_dict[k]) for k in written)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ladle.method"] == "greedy_soup"
    assert '"selected": [1, 2, 3]' in meta["ladle.parameters"]
    assert '"score": 0.92' in meta["ladle.parameters"]
    assert '"strict": false' in meta["ladle.parameters"]


def test_existing_output_is_refused_before_any_evaluation(tmp_path):
    ladle.save({"x": torch.zeros(1)}, tmp_path / "o.safetensors")
    evaluate = Scripted(TABLE)
    with pytest.raises(ladle.LadleError, match="already exists"):
        ladle.greedy_soup(one_hot_family(4), evaluate, out=tmp_path / "o.safetensors")
    assert evaluate.calls == []


def test_an_empty_folder_is_no_existing_output_and_a_folder_of_other_files_is_kept(tmp_path):
    # An empty folder counted as an existing output here alone; overwrite replaced anything.
    (tmp_path / "empty").mkdir()
    ladle.greedy_soup(one_hot_family(4), Scripted(TABLE), scores=SCORES, out=tmp_path / "empty")
    assert ladle.load(tmp_path / "empty")["w"].shape == (4,)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "main.py").write_text("mine")
    evaluate = Scripted(TABLE)
    with pytest.raises(ladle.LadleError, match="is a folder without safetensors weights"):
        ladle.greedy_soup(one_hot_family(4), evaluate, out=tmp_path / "code", overwrite=True)
    assert evaluate.calls == [] and os.listdir(tmp_path / "code") == ["main.py"]


def test_incompatible_models_raise_before_any_evaluation():
    models = one_hot_family(3)
    models[2]["w"] = torch.zeros(5)
    evaluate = Scripted(TABLE)
    with pytest.raises(ladle.IncompatibleError, match=r"model 2 .*'w' has shape \(5,\)"):
        ladle.greedy_soup(models, evaluate)
    assert evaluate.calls == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scores": [1.0, 2.0]}, ValueError, "scores: expected 3"),
        ({"scores": [1.0, float("nan"), 2.0]}, ValueError, "scores"),
        ({"dtype": torch.int32}, ValueError, "dtype"),
    ],
)
def test_bad_arguments_are_errors_naming_the_parameter(kwargs, error, match):
    with pytest.raises(error, match=match):
        ladle.greedy_soup(one_hot_family(3), lambda sd: 0.0, **kwargs)


def test_evaluate_must_be_callable_and_must_not_return_nan():
    with pytest.raises(TypeError, match="evaluate"):
        ladle.greedy_soup(one_hot_family(2), "acc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="evaluate: returned NaN for the soup with model 1"):
        ladle.greedy_soup(one_hot_family(2), lambda sd: float("nan"), scores=[1, 0])


class Generated(Checkpoint):
    """A model made up on read (nothing held); counts the tensors it hands out that are alive."""

    live: ClassVar[weakref.WeakSet] = weakref.WeakSet()

    def __init__(self, index: int) -> None:
        self.index, self.name, self.metadata = index, f"generated-{index}", {}

    def keys(self):
        return [f"layer{j}.weight" for j in range(4)] + ["steps"]

    def shape(self, key):
        return () if key == "steps" else (8, 8)

    def dtype(self, key):
        return torch.int64 if key == "steps" else torch.float32

    def get_slice(self, key, rows):
        if key == "steps":
            tensor = torch.tensor(self.index)
        else:
            tensor = torch.full((8, 8), float(self.index))[rows]
        Generated.live.add(tensor)
        return tensor


def tensors_alive_during_evaluate(n: int) -> tuple[int, int]:
    """(most model tensors alive at any evaluate call, tensors of their shape at the last)."""
    peak, calls, shaped = 0, 0, 0

    def evaluate(state_dict):
        nonlocal peak, calls, shaped
        peak = max(peak, len(Generated.live))
        calls += 1
        if calls == 2 * n - 1:  # the last candidate, with every model in the soup
            gc.collect()
            shaped = sum(
                1 for obj in gc.get_objects() if type(obj) is torch.Tensor and obj.shape == (8, 8)
            )
        return 1.0  # every candidate is kept

    result = ladle.greedy_soup([Generated(i) for i in range(n)], evaluate, device="cpu")
    assert result.selected == list(range(n))
    torch.testing.assert_close(result.state_dict["layer0.weight"], torch.full((8, 8), (n - 1) / 2))
    return peak, shaped


def test_memory_does_not_grow_with_the_number_of_models():
    few_inputs, few_total = tensors_alive_during_evaluate(3)
    many_inputs, many_total = tensors_alive_during_evaluate(30)
    assert many_inputs == few_inputs == 0  # no tensor read from a model outlives its use
    assert many_total == few_total == 2 * 4  # the soup and one candidate (4 tensors each)


def test_progress_counts_evaluations():
    updates = []

    class Bar:
        def __init__(self, total, **kwargs):
            updates.append(("total", total))

        def update(self, n):
            updates.append(("update", n))

        def close(self):
            updates.append(("close", None))

    ladle.greedy_soup(one_hot_family(3), lambda sd: 1.0, progress=Bar, device="cpu")
    assert updates[0] == ("total", 5) and updates[-1] == ("close", None)
    assert sum(n for what, n in updates if what == "update") == 5


@pytest.fixture
def evaluate_module(tmp_path, monkeypatch):
    (tmp_path / "soup_evals.py").write_text(
        "def score(sd):\n    return {1: 1.0, 2: 1.5, 3: 0.5}[int((sd['w'] > 0).sum())]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    paths = []
    for i, model in enumerate(one_hot_family(3)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    return paths


def test_cli_greedy_soup_imports_evaluate_and_writes_the_soup(tmp_path, evaluate_module, capsys):
    out = tmp_path / "o.safetensors"
    argv = ["greedy-soup", *evaluate_module, "--evaluate", "soup_evals:score", "-o", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out)
    assert "selected 2 of 3 models (0, 1)" in lines[-2]  # the 3-soup scores 0.5 < 1.5
    # Each row scores the soup with that model added, the first the best model alone.
    assert lines[0].split() == ["model", "soup", "score", "kept", "source"]
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["0", "1", "yes"],
        ["1", "1.5", "yes"],
        ["2", "0.5", "no"],
    ]
    expected = ladle.uniform_soup([evaluate_module[0], evaluate_module[1]])
    assert torch.equal(ladle.load(out)["w"], expected["w"])


def test_cli_greedy_soup_prints_its_output_path_as_soup_does(tmp_path, evaluate_module, capsys):
    # `-o DIR/` printed "DIR/" as typed, where `ladle soup -o DIR/` prints "DIR".
    printed = []
    for argv in (
        ["greedy-soup", *evaluate_module, "--evaluate", "soup_evals:score", "-o"],
        ["soup", *evaluate_module, "-o"],
    ):
        out = f"{tmp_path / argv[0]}/"
        assert main([*argv, out, "--device", "cpu"]) == 0
        printed.append(capsys.readouterr().out.splitlines()[-1])
    assert printed == [str(tmp_path / "greedy-soup"), str(tmp_path / "soup")]


def test_cli_greedy_soup_of_one_model_says_model_in_the_singular(tmp_path, evaluate_module, capsys):
    out = tmp_path / "o.safetensors"
    argv = ["greedy-soup", evaluate_module[0], "--evaluate", "soup_evals:score", "-o", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == "selected 1 of 1 model (0); score 1"  # was "of 1 models"


def test_cli_greedy_soup_strict_and_scores(tmp_path, evaluate_module, capsys):
    out = tmp_path / "o.safetensors"
    argv = ["greedy-soup", *evaluate_module, "--evaluate", "soup_evals:score", "-o", str(out)]
    assert main([*argv, "--scores", "1", "3", "2", "--strict"]) == 0
    assert "selected 1 of 3 models (1)" in capsys.readouterr().out  # 1.5 < 3
    # A soup scoring as the best model alone (1.5) is kept, unless --strict.
    argv = [*argv, "--scores", "1.5", "1", "1", "--overwrite"]
    assert main(argv) == 0
    assert "selected 2 of 3 models (0, 1)" in capsys.readouterr().out
    assert main([*argv, "--strict"]) == 0
    assert "selected 1 of 3 models (0)" in capsys.readouterr().out


def test_cli_greedy_soup_prints_a_negative_zero_score_as_0(tmp_path, evaluate_module, capsys):
    (tmp_path / "zero_evals.py").write_text("def score(sd):\n    return -0.0\n")
    out = tmp_path / "o.safetensors"
    argv = ["greedy-soup", *evaluate_module, "--evaluate", "zero_evals:score", "-o", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[1:4]] == [[str(i), "0", "yes"] for i in range(3)]
    assert lines[4] == "selected 3 of 3 models (0, 1, 2); score 0"


@pytest.mark.parametrize(
    "spec", ["soup_evals", "soup_evals:missing", "no_such_module_xyz:f", "soup_evals:__name__"]
)
def test_cli_bad_evaluate_spec_is_a_usage_error(tmp_path, evaluate_module, capsys, spec):
    argv = ["greedy-soup", *evaluate_module, "--evaluate", spec, "-o", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--evaluate" in capsys.readouterr().err


def test_cli_evaluate_file_with_a_dataclass_and_a_sibling_import(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "evals"
    folder.mkdir()
    (folder / "helper_counts.py").write_text(
        "def positives(sd):\n    return int((sd['w'] > 0).sum())\n"
    )
    (folder / "ev.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from helper_counts import positives\n\n"
        "@dataclass\nclass Table:\n    values: dict[int, float]\n\n"
        "def score(sd):\n    return Table({1: 1.0, 2: 1.5, 3: 0.5}).values[positives(sd)]\n"
    )
    paths = []
    for i, model in enumerate(one_hot_family(3)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.safetensors"
    argv = ["greedy-soup", *paths, "--evaluate", "evals/ev.py:score", "-o", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    assert "selected 2 of 3 models (0, 1)" in capsys.readouterr().out


def test_cli_an_evaluate_that_raises_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "failing_evals.py").write_text("def score(sd):\n    return 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    paths = []
    for i, model in enumerate(one_hot_family(2)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    out = tmp_path / "o.safetensors"
    argv = ["greedy-soup", *paths, "--evaluate", "failing_evals:score", "-o", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        "ladle: error: --evaluate failing_evals:score: raised ZeroDivisionError: division by zero\n"
    )
    assert not out.exists()


def test_cli_an_evaluate_file_that_raises_is_named_as_the_user_wrote_it(tmp_path, capsys):
    (tmp_path / "evals.py").write_text("def score(sd):\n    raise RuntimeError('boom')\n")
    paths = []
    for i, model in enumerate(one_hot_family(2)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    spec = f"{tmp_path / 'evals.py'}:score"
    argv = ["greedy-soup", *paths, "--evaluate", spec, "-o", str(tmp_path / "o.safetensors")]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        f"ladle: error: --evaluate {spec}: raised RuntimeError: boom\n"
    )


# float() raised TypeError, ValueError, OverflowError (as it was: no evaluate, no model), or
# took the string "0.5" and True (1.0) as scores
@pytest.mark.parametrize(
    "returned", [None, "high", 10**400, "0.5", True], ids=["none", "str", "huge", "digits", "bool"]
)
def test_an_evaluate_returning_no_number_is_a_value_error_naming_it(returned):
    models = one_hot_family(2)
    with pytest.raises(ValueError) as info:
        ladle.greedy_soup(models, lambda sd: returned, device="cpu")
    assert str(info.value) == (
        f"evaluate: returned {returned!r} for model 0 (<state dict>); expected a number"
    )


def test_a_greedy_soup_that_overflows_its_output_dtype_is_an_error(tmp_path):
    models = [{"w": torch.tensor([1e5, 1.0])}, {"w": torch.tensor([1e5, 2.0])}]
    seen = []  # evaluate was handed the overflowed soups (inf) first: an evaluation through a
    # network made NaN of them, and "evaluate: returned NaN" hid the cause
    with pytest.raises(
        ladle.NonFiniteError, match=r"the greedy soup: 1 of the 2 .* overflow float16"
    ):
        ladle.greedy_soup(models, lambda sd: seen.append(sd) or 1.0, dtype="fp16", device="cpu")
    assert seen == []
    with pytest.raises(ladle.NonFiniteError, match=r"o\.safetensors: .* overflow float16"):
        ladle.greedy_soup(
            models,
            lambda sd: 1.0,
            dtype=torch.float16,
            device="cpu",
            out=tmp_path / "o.safetensors",
        )
    assert not (tmp_path / "o.safetensors").exists()
    kept = ladle.greedy_soup(models, lambda sd: 1.0, dtype=torch.float16, allow_nonfinite=True)
    assert torch.isinf(kept.state_dict["w"][0])


def test_greedy_soup_folds_a_large_tensor_a_chunk_of_rows_at_a_time(monkeypatch):
    # Its folds read whole tensors (chunk_bytes=sys.maxsize): the fold's buffers, pinned on
    # CUDA, were each as large as the largest tensor in float32. The soup is the same bits.
    from conftest import DictCheckpoint

    from ladle.methods import soup as soup_module

    class CountingRows(DictCheckpoint):
        def get_slice(self, key, rows):
            if self.tensors[key].dim():
                reads.append((key, len(range(*rows.indices(self.tensors[key].shape[0])))))
            return super().get_slice(key, rows)

    gen = torch.Generator().manual_seed(3)
    models = [
        {"big": torch.randn(200, 16, generator=gen), "steps": torch.tensor(i)} for i in range(4)
    ]

    target = (models[0]["big"] + models[1]["big"]) / 2  # models 0 and 1 help, 2 and 3 not

    def evaluate(state_dict):
        return -float((state_dict["big"] - target).abs().mean())

    expected = ladle.greedy_soup(models, evaluate, device="cpu")
    reads: list[tuple[str, int]] = []
    monkeypatch.setattr(soup_module, "FOLD_CHUNK_BYTES", 640)  # ten float32 rows of 16
    found = ladle.greedy_soup([CountingRows(m) for m in models], evaluate, device="cpu")
    big = [count for key, count in reads if key == "big"]
    assert big and max(big) <= 10, sorted(set(big))
    assert 1 < len(found.selected) < 4  # candidates were both kept and refused
    assert found.selected == expected.selected and found.score == expected.score
    assert all(torch.equal(found.state_dict[k], v) for k, v in expected.state_dict.items())


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_cli_greedy_soup_table_lines_up_under_its_header(tmp_path, evaluate_module, capsys):
    out = tmp_path / "o.safetensors"
    argv = ["greedy-soup", *evaluate_module, "--evaluate", "soup_evals:score", "-o", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    m0, m1, m2 = evaluate_module
    assert capsys.readouterr().out.splitlines()[:4] == [
        "model  soup score  kept  source",
        f"0               1  yes   {m0}",
        f"1             1.5  yes   {m1}",
        f"2             0.5  no    {m2}",
    ]


@pytest.mark.filterwarnings("default")  # as a plain `ladle` process shows them
def test_cli_errors_and_warnings_with_line_breaks_are_one_line(tmp_path, evaluate_module, capsys):
    (tmp_path / "noisy_evals.py").write_text(
        "import warnings\n"
        "def warns(sd):\n    warnings.warn('first line\\n  second line')\n    return 1.0\n"
        "def fails(sd):\n    raise ValueError('bad\\nscore')\n"
    )
    out = tmp_path / "o.safetensors"
    argv = ["greedy-soup", *evaluate_module, "-o", str(out), "--device", "cpu"]
    assert main([*argv, "--evaluate", "noisy_evals:warns"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "ladle: warning: first line second line"
    assert main([*argv, "--evaluate", "noisy_evals:fails", "--overwrite"]) == 1
    assert capsys.readouterr().err == (
        "ladle: error: --evaluate noisy_evals:fails: raised ValueError: bad score\n"
    )
    with pytest.raises(ladle.LadleError) as info:  # --debug: the user's traceback, chained
        main(["--debug", *argv, "--evaluate", "noisy_evals:fails", "--overwrite"])
    assert isinstance(info.value.__cause__, ValueError)
    assert str(info.value.__cause__) == "bad\nscore"


def test_every_candidate_is_evaluated_in_the_best_ranked_models_dtypes():
    # Model 1 ranks first: float32. The candidate with model 0 (bfloat16) is float32 too.
    models = [{"w": torch.ones(2, dtype=torch.bfloat16)}, {"w": torch.zeros(2)}]
    seen: list[torch.dtype] = []
    result = ladle.greedy_soup(
        models, lambda sd: seen.append(sd["w"].dtype) or 1.0, scores=[1.0, 2.0], device="cpu"
    )
    assert seen == [torch.float32]
    assert result.state_dict["w"].dtype == torch.float32


def test_a_model_of_a_dtype_results_cannot_be_written_in_is_refused_before_evaluating():
    # Only model 1, which ranks first, is stored in such a dtype: it is checked too.
    models = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 4.0])}]
    models[1]["w"] = models[1]["w"].to(torch.float8_e8m0fnu)
    calls: list[int] = []
    with pytest.raises(ValueError, match=r"key 'w' is stored as float8_e8m0fnu, in which"):
        ladle.greedy_soup(models, lambda sd: calls.append(1) or 1.0, scores=[1.0, 2.0])
    assert calls == []


def test_a_model_ranked_best_in_a_dtype_results_cannot_be_written_in_is_refused_before_soups():
    # Without scores the ranking takes one evaluation per model; no soup is evaluated.
    models = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 4.0])}]
    models[1]["w"] = models[1]["w"].to(torch.float8_e8m0fnu)
    calls: list[int] = []
    message = r"^model 1 \(<state dict>\), ranked best: key 'w' is stored as float8_e8m0fnu"
    with pytest.raises(ValueError, match=message):
        ladle.greedy_soup(models, lambda sd: calls.append(1) or float(sd["w"][1]))
    assert calls == [1, 1]


def test_a_dtype_safetensors_cannot_store_names_the_model_ranked_best(tmp_path):
    # Model 0 alone could be written: the refusal is the ranking's, and says whose dtype.
    models = [
        {"w": torch.ones(4, dtype=torch.complex64)},
        {"w": torch.ones(4).to(torch.complex128)},
    ]
    out = tmp_path / "soup.safetensors"
    with pytest.raises(ladle.LadleError) as caught:
        ladle.greedy_soup(models, lambda sd: pytest.fail("evaluated"), scores=[1.0, 2.0], out=out)
    assert str(caught.value) == (
        f"{out}: tensor 'w': safetensors cannot store dtype torch.complex128 (the soup takes "
        "the dtypes of model 1 (<state dict>), ranked best)"
    )
    assert not out.exists()


def test_a_model_not_ranked_best_may_be_of_a_dtype_the_soup_is_not_written_in(tmp_path):
    # The soup takes the best-ranked model's dtypes, as a uniform soup takes model 0's: a
    # complex128 or float8_e8m0fnu key of another model refused the merge (the complex128
    # one naming a dtype the output would not have).
    best = {"c": torch.tensor([1 + 2j, 3 - 1j]), "w": torch.tensor([1.0, -2.0])}
    other = {
        "c": torch.tensor([2 + 2j, 1 - 1j], dtype=torch.complex128),
        "w": torch.tensor([4.0, 8.0]).to(torch.float8_e8m0fnu),
    }
    expected = {"c": torch.tensor([1.5 + 2j, 2 - 1j]), "w": torch.tensor([2.5, 3.0])}
    for scores in ([1.0, 0.5], None):  # model 0 ranks best; the soup scores as well: kept
        result = ladle.greedy_soup([best, other], lambda sd: 1.0, scores=scores, device="cpu")
        assert result.selected == [0, 1]
        out = tmp_path / "g.safetensors"
        ladle.greedy_soup([best, other], lambda sd: 1.0, scores=scores, out=out, overwrite=True)
        for merged in (result.state_dict, ladle.load(out)):
            assert {k: v.dtype for k, v in merged.items()} == {
                "c": torch.complex64,
                "w": torch.float32,
            }
            assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.skipif(
    ladle.engine.saturation_limit(torch.float8_e4m3fn) is None,
    reason="this torch casts to float8_e4m3fn with NaN for an overflow (2.8): none saturates",
)
def test_a_greedy_soup_that_saturates_float8_e4m3fn_is_an_error():
    # float8_e4m3fn has no Inf: the cast of 1000 gives 448 silently, so it is checked before.
    models = [{"w": torch.tensor([1000.0, 1.0])}, {"w": torch.tensor([1000.0, 2.0])}]
    seen = []
    with pytest.raises(
        ladle.NonFiniteError,
        match=r"^the greedy soup: 1 of the 2 merged values of key 'w' overflow float8_e4m3fn",
    ):
        ladle.greedy_soup(models, lambda sd: seen.append(sd) or 1.0, dtype=torch.float8_e4m3fn)
    assert seen == []  # checked before evaluate saw 448 for 1000
    kept = ladle.greedy_soup(
        models, lambda sd: 1.0, dtype=torch.float8_e4m3fn, device="cpu", allow_nonfinite=True
    )
    assert kept.state_dict["w"].float().tolist() == [448.0, 1.5]


def test_progress_with_scores_given_counts_the_candidates_only():
    calls = []
    ladle.greedy_soup(
        one_hot_family(3), lambda sd: 1.0, scores=[1, 2, 3], progress=recording_bar(calls)
    )
    assert calls == [("init", 2, "eval"), ("update", 1), ("update", 1), ("close",)]


def test_saturation_is_checked_in_the_best_ranked_models_dtype_not_model_0s():
    # Model 1 ranks first and is stored in float8_e4m3fn, the soup's dtype: the mean 724 of
    # 1000 (model 0, float32) and 448 would be written as 448. Model 0's dtype saw no limit.
    models = [{"w": torch.tensor([1000.0, 1.0])}, {"w": torch.tensor([448.0, 2.0])}]
    models[1]["w"] = models[1]["w"].to(torch.float8_e4m3fn)
    with pytest.raises(
        ladle.NonFiniteError,
        match=r"^the greedy soup: 1 of the 2 merged values of key 'w' (are not finite \(1 NaN\) "
        r"although every input is finite: they )?overflow float8_e4m3fn",  # torch 2.8: a NaN
    ):
        ladle.greedy_soup(models, lambda sd: 1.0, scores=[0.0, 1.0], device="cpu")


# --- tied weights ----------------------------------------------------------------------------


class TiedLM(torch.nn.Module):
    """A language model in miniature whose head is its embedding (``tie_word_embeddings``)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.emb(tokens))))


@pytest.mark.parametrize("method", ["greedy_soup", "ratatouille"])
def test_candidates_and_the_soup_hold_a_tensor_every_model_ties_once_under_both_names(method):
    # Each name was a tensor of its own, averaged twice: functional_call refused every
    # candidate ("got multiple values for keys ['emb.weight', 'head.weight'], which are
    # tied") unless told tie_weights=False, and the soup took the embedding's memory twice.
    module, tokens = TiedLM(9), torch.arange(10)
    seen = []

    def evaluate(state_dict):
        seen.append(
            "head.weight" not in state_dict or state_dict["head.weight"] is state_dict["emb.weight"]
        )
        with torch.no_grad():
            logits = torch.func.functional_call(module, state_dict, (tokens,))
        return -float(torch.nn.functional.cross_entropy(logits, tokens))

    def run(models):
        if method == "greedy_soup":
            return ladle.greedy_soup(models, evaluate, device="cpu")
        return ladle.ratatouille(models, selection="greedy", evaluate=evaluate, device="cpu")

    models = [TiedLM(seed) for seed in range(4)]
    result = run(models)
    assert seen == [True] * 7  # 4 models, 3 candidates
    assert list(result.state_dict) == list(models[0].state_dict())
    assert result.state_dict["head.weight"] is result.state_dict["emb.weight"]
    once = run([{k: v for k, v in m.state_dict().items() if k != "head.weight"} for m in models])
    assert result.selected == once.selected
    assert all(torch.equal(result.state_dict[k], v) for k, v in once.state_dict.items())


def _stored_once(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s tensors with its tied head left out, as save_pretrained's safetensors."""
    return {k: v for k, v in model.state_dict().items() if k != "head.weight"}


def _greedy(method, models, **kwargs):
    if method == "greedy_soup":
        return ladle.greedy_soup(models, device="cpu", **kwargs)
    return ladle.ratatouille(models, selection="greedy", device="cpu", **kwargs)


@pytest.mark.parametrize("method", ["greedy_soup", "ratatouille"])
def test_a_soup_has_model_0s_keys_where_model_0_stores_once_what_the_best_model_ties(
    method, tmp_path
):
    # The best-ranked model's keys were the soup's: model 0, stored as save_pretrained
    # stores it (the embedding once), was asked for the head ("m0.safetensors: no tensor
    # named 'head.weight'"), where uniform_soup of the same models merges, with model 0's keys.
    models = [TiedLM(seed) for seed in range(3)]
    save_file(_stored_once(models[0]), tmp_path / "m0.safetensors")
    given = [tmp_path / "m0.safetensors", *models[1:]]
    result = _greedy(method, given, evaluate=lambda sd: 1.0, scores=[0.1, 0.9, 0.5])
    assert result.selected == [1, 2, 0]
    assert list(result.state_dict) == ladle.open_checkpoint(given[0]).keys()
    assert list(ladle.uniform_soup(given, device="cpu")) == list(result.state_dict)
    once = _greedy(
        method, [_stored_once(m) for m in models], evaluate=lambda sd: 1.0, scores=[0.1, 0.9, 0.5]
    )
    assert_bit_for_bit(result.state_dict, once.state_dict)


def test_a_soup_and_its_candidates_list_model_0s_keys_in_its_order():
    # They listed the best-ranked model's keys in its order; merges list their reference's.
    models = [{k: v * (i + 1) for k, v in TiedLM(0).state_dict().items()} for i in range(3)]
    models[2] = dict(reversed(models[2].items()))  # the best-ranked: keys in another order
    seen = []

    def evaluate(state_dict):
        seen.append(list(state_dict))
        return float(state_dict["body.bias"].sum())

    result = ladle.greedy_soup(models, evaluate, scores=[0.0, 1.0, 2.0], device="cpu")
    assert result.selected[0] == 2
    assert seen == [list(models[0])] * 2
    assert list(result.state_dict) == list(models[0])


def test_a_greedy_soup_s_config_says_the_dtype_it_wrote(tmp_path):
    # The config comes from model 0 (bf16 here); the weights are the best-ranked model's
    # dtype (float32): the config said bfloat16, which torch_dtype="auto" loads them as.
    for name, dtype, seed in (("m0", torch.bfloat16, 0), ("m1", torch.float32, 1)):
        weights = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)).to(dtype)
        ladle.save({"w": weights}, tmp_path / name)
        config = {"model_type": "toy", "torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    out = tmp_path / "o"
    ladle.greedy_soup(
        [tmp_path / "m0", tmp_path / "m1"], lambda sd: 0.0, scores=[0.1, 0.9], out=out
    )
    assert ladle.load(out)["w"].dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.mark.parametrize("scores", [[0.9, 0.1], [0.1, 0.9]])
def test_a_greedy_soup_of_mixed_dtypes_keeps_the_config_when_every_model_stores_them_alike(
    tmp_path, scores
):
    # A float32 norm beside bfloat16 weights, in every model: whichever ranks best, the
    # config says bfloat16 (it said the first floating key's dtype, float32, when model 1
    # ranked best). Where the best model stores them otherwise, the dtype of most bytes.
    gen = torch.Generator().manual_seed(0)
    for name in ("m0", "m1"):
        state = {"a_norm": torch.randn(4, generator=gen), "w": torch.randn(8, 8, generator=gen)}
        ladle.save({"a_norm": state["a_norm"], "w": state["w"].bfloat16()}, tmp_path / name)
        (tmp_path / name / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    ladle.save({"a_norm": state["a_norm"].bfloat16(), "w": state["w"]}, tmp_path / "m2")
    (tmp_path / "m2" / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    models = [tmp_path / "m0", tmp_path / "m1"]
    out = tmp_path / "o"
    ladle.greedy_soup(models, lambda sd: 0.0, scores=scores, out=out)
    written = ladle.load(out)
    assert (written["a_norm"].dtype, written["w"].dtype) == (torch.float32, torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    other = tmp_path / "o2"  # the best model stores the norm in bf16, the weights in float32
    ladle.greedy_soup([*models, tmp_path / "m2"], lambda sd: 0.0, scores=[0.1, 0.2, 0.9], out=other)
    assert ladle.load(other)["w"].dtype == torch.float32
    assert json.loads((other / "config.json").read_text())["torch_dtype"] == "float32"


def test_an_infinity_in_a_greedy_soup_stays_the_means_infinity():
    # lerp(inf, 1, 1/2) is inf − inf: NaN, where the uniform soup of the kept models is inf.
    models = [{"w": torch.tensor([math.inf, 1.0])}, {"w": torch.tensor([1.0, -math.inf])}]
    for scores in ([1.0, 0.5], [0.5, 1.0]):  # either model first, the other folded in
        soup = ladle.greedy_soup(
            models, lambda sd: 1.0, scores=scores, allow_nonfinite=True, device="cpu"
        )
        assert len(soup.selected) == 2
        assert soup.state_dict["w"].tolist() == [math.inf, -math.inf]


def test_a_greedy_soup_of_huge_values_of_opposite_signs_is_their_mean():
    # lerp's model − soup overflowed: 3e38 and -3e38 gave inf (a false NonFiniteError
    # without allow_nonfinite), where the uniform soup gives 0.
    models = [{"w": torch.tensor([3e38, 1.0])}, {"w": torch.tensor([-3e38, 3.0])}]
    soup = ladle.greedy_soup(models, lambda sd: 1.0, scores=[1.0, 0.5], device="cpu")
    assert soup.selected == [0, 1]
    assert soup.state_dict["w"].tolist() == [0.0, 2.0]


def test_a_float64_greedy_soup_of_huge_values_is_their_mean():
    # The float64 fallback computed soup·n + model, which overflows float64 itself.
    models = [{"w": torch.tensor([v], dtype=torch.float64)} for v in (1.5e308, 1.5e308, -1.5e308)]
    soup = ladle.greedy_soup(models, lambda sd: 1.0, scores=[1.0, 0.9, 0.8], device="cpu")
    assert soup.selected == [0, 1, 2]
    assert soup.state_dict["w"].item() == pytest.approx(5e307, rel=1e-15)


def test_a_soup_of_a_negative_and_a_positive_zero_is_a_positive_zero():
    # The mean of −0.0 and +0.0 is +0.0: the first model's −0.0 is no agreement of the two.
    soup = ladle.greedy_soup(
        [{"w": torch.tensor([-0.0, 1.0])}, {"w": torch.tensor([0.0, 1.0])}],
        lambda sd: 1.0,
        device="cpu",
    )
    assert soup.selected == [0, 1]
    assert torch.signbit(soup.state_dict["w"]).tolist() == [False, False]


def test_a_running_mean_past_float32s_range_is_the_mean_of_every_model_kept():
    # (3e38 + 3e38 − 3e38) / 3 = 1e38: the fallback weighs the soup by its count, not by half.
    models = [{"w": torch.tensor([value])} for value in (3e38, 3e38, -3e38)]
    soup = ladle.greedy_soup(models, lambda sd: 1.0, device="cpu")
    assert soup.selected == [0, 1, 2]
    assert torch.equal(soup.state_dict["w"], torch.tensor([1e38]))


def test_an_infinite_score_is_recorded_as_json_null(tmp_path):
    # It was written as Infinity, which is no JSON: strict readers could not read the record.
    out = tmp_path / "soup.safetensors"
    models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
    result = ladle.greedy_soup(models, lambda sd: 0.5, scores=[math.inf, 0.1], out=out)
    assert result.score == math.inf and result.selected == [0]

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    with ladle.open_checkpoint(out) as written:
        recorded = json.loads(written.metadata["ladle.parameters"], parse_constant=refuse)
    assert recorded == {"score": None, "selected": [0], "strict": False}
