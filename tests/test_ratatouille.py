from __future__ import annotations

import inspect
import math
import os
from unittest import mock

import pytest
import torch
from conftest import families, family, recording_bar
from hypothesis import given
from safetensors import safe_open
from safetensors.torch import save_file

import ladle


def auxiliary() -> dict:
    return {
        "body.weight": torch.arange(12.0).reshape(4, 3),
        "body.bias": torch.ones(4),
        "bn.num_batches_tracked": torch.tensor(7),
        "aux_head.weight": torch.zeros(10, 4),
        "aux_head.bias": torch.zeros(10),
    }


def probe() -> dict:
    return {"head.weight": torch.full((5, 4), 0.5), "head.bias": torch.arange(5.0)}


def test_init_drops_the_auxiliary_head_and_puts_the_probe_in():
    init = ladle.ratatouille_init(auxiliary(), probe(), drop=["aux_head.*"])
    assert list(init) == [
        "body.weight",
        "body.bias",
        "bn.num_batches_tracked",
        "head.weight",
        "head.bias",
    ]
    assert torch.equal(init["body.weight"], auxiliary()["body.weight"])
    assert init["bn.num_batches_tracked"].item() == 7
    assert torch.equal(init["head.bias"], torch.arange(5.0))


def test_head_keys_replace_dropped_keys_of_another_shape_and_come_last():
    aux = {"body.weight": torch.ones(4, 3), "head.weight": torch.zeros(10, 4), "z": torch.ones(1)}
    init = ladle.ratatouille_init(aux, {"head.weight": torch.ones(5, 4)}, drop=["head.weight"])
    assert list(init) == ["body.weight", "z", "head.weight"]
    assert init["head.weight"].shape == (5, 4)


def test_head_keys_replace_kept_keys_of_the_same_shape():
    aux = {"body.weight": torch.ones(4, 3), "head.weight": torch.zeros(5, 4)}
    init = ladle.ratatouille_init(aux, {"head.weight": torch.ones(5, 4)})
    assert torch.equal(init["head.weight"], torch.ones(5, 4))


def test_drop_patterns_are_whole_key_globs():
    aux = {"head.weight": torch.zeros(2), "head.bias": torch.zeros(2), "headless.w": torch.ones(1)}
    init = ladle.ratatouille_init(aux, {}, drop=["head.*"])
    assert list(init) == ["headless.w"]
    only = ladle.ratatouille_init(aux, {}, drop=["head.bias"])
    assert list(only) == ["head.weight", "headless.w"]


def test_a_head_key_of_another_shape_than_a_kept_key_is_incompatible():
    with pytest.raises(
        ladle.IncompatibleError,
        match=r"head .*'body.weight' has shape \(2, 3\), auxiliary .* has \(4, 3\)",
    ):
        ladle.ratatouille_init(auxiliary(), {"body.weight": torch.zeros(2, 3)}, drop=["aux_*"])


def test_a_head_key_of_another_dtype_kind_than_a_kept_key_is_incompatible():
    with pytest.raises(ladle.IncompatibleError, match="bn.num_batches_tracked"):
        ladle.ratatouille_init(auxiliary(), {"bn.num_batches_tracked": torch.tensor(1.0)})


@pytest.mark.parametrize(
    ("kept", "head"),
    [(torch.complex64, torch.int8), (torch.float32, torch.float4_e2m1fn_x2)],
)
def test_dtype_kinds_are_the_engines_kinds(kept, head):
    # Kinds as merges tell them (floating, packed, complex, integer): an integer head key
    # cannot stand in for a complex one, nor a packed float4 one for float32.
    aux = {"w": torch.zeros(2, 3, dtype=kept)}
    with pytest.raises(ladle.IncompatibleError, match=r"key 'w' has dtype torch\."):
        ladle.ratatouille_init(aux, {"w": torch.zeros(2, 3, dtype=torch.uint8).view(head)})


def test_a_drop_pattern_matching_nothing_is_incompatible():
    with pytest.raises(ladle.IncompatibleError, match="'classifier.*' matches none"):
        ladle.ratatouille_init(auxiliary(), probe(), drop=["classifier.*"])


def test_drop_must_be_a_sequence_of_patterns_not_a_string():
    with pytest.raises(TypeError, match="drop"):
        ladle.ratatouille_init(auxiliary(), probe(), drop="aux_head.*")  # type: ignore[arg-type]


def test_init_returns_copies_and_reads_paths(tmp_path):
    save_file(auxiliary(), tmp_path / "aux.safetensors")
    save_file(probe(), tmp_path / "probe.safetensors")
    init = ladle.ratatouille_init(
        tmp_path / "aux.safetensors", tmp_path / "probe.safetensors", drop=["aux_head.*"]
    )
    init["body.weight"].add_(1)  # writable: not a read-only view of the file
    assert torch.equal(
        ladle.load(tmp_path / "aux.safetensors")["body.weight"], auxiliary()["body.weight"]
    )
    assert set(init) == {
        "body.weight",
        "body.bias",
        "bn.num_batches_tracked",
        "head.weight",
        "head.bias",
    }


def test_init_loads_into_the_target_module():
    torch.manual_seed(0)
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5))
    aux = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 10))
    head = {k: v for k, v in target.state_dict().items() if k.startswith("1.")}
    init = ladle.ratatouille_init(aux, head, drop=["1.*"])
    target.load_state_dict(init)
    assert torch.equal(target[0].weight, aux[0].weight)


@given(families())
def test_uniform_ratatouille_equals_uniform_soup_exactly(models):
    soup = ladle.uniform_soup(models, device="cpu")
    rat = ladle.ratatouille(models, device="cpu")
    assert list(rat) == list(soup)
    assert all(torch.equal(rat[k], soup[k]) and rat[k].dtype == soup[k].dtype for k in soup)


def test_uniform_ratatouille_streams_like_uniform_soup(tmp_path):
    paths = []
    for i, model in enumerate(family(3, seed=2)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    out = ladle.ratatouille(paths, out=tmp_path / "r.safetensors", device="cpu")
    soup = ladle.uniform_soup(paths, device="cpu")
    written = ladle.load(out)
    assert all(torch.equal(written[k], soup[k]) for k in soup)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ladle.method"] == "ratatouille"


def test_greedy_ratatouille_is_the_greedy_soup():
    models = family(4, seed=5)

    def evaluate(state_dict):
        return -float(state_dict["layer.bias"].abs().sum())

    scores = [0.3, 0.1, 0.4, 0.2]
    rat = ladle.ratatouille(
        models, selection="greedy", evaluate=evaluate, scores=scores, device="cpu"
    )
    soup = ladle.greedy_soup(models, evaluate, scores=scores, device="cpu")
    assert (rat.selected, rat.score, rat.history) == (soup.selected, soup.score, soup.history)
    assert all(torch.equal(rat.state_dict[k], soup.state_dict[k]) for k in soup.state_dict)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"selection": "best"}, "^selection:"),
        ({"selection": "greedy"}, "^evaluate:"),
        ({"selection": "greedy", "scores": [1.0, 2.0]}, "^evaluate: selection='greedy' needs"),
        ({"evaluate": lambda sd: 0.0}, "^evaluate:"),
        ({"scores": [1.0, 2.0]}, "^scores:"),
    ],
)
def test_bad_arguments_are_value_errors_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ladle.ratatouille(family(2), **kwargs)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"scores": [1.0, 2.0]}, r"scores: used only with selection='greedy'; .* leave scores out"),
        ({"strict": True}, r"strict: used only with selection='greedy'"),
        ({"scores": torch.tensor([1.0, 2.0])}, r"scores: used only with selection='greedy'"),
        (
            {"evaluate": lambda sd: 1.0, "scores": [1.0, 2.0]},
            r"evaluate: used only .* leave evaluate and scores out",
        ),
    ],
)
def test_greedy_only_arguments_with_uniform_selection_are_named(extra, message):
    runs = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
    with pytest.raises(ValueError, match=message):
        ladle.ratatouille(runs, **extra)


@pytest.mark.parametrize(("chunk_bytes", "error"), [(2**20, ValueError), ("4MB", TypeError)])
def test_a_chunk_size_with_greedy_selection_is_refused_before_any_evaluation(chunk_bytes, error):
    # The greedy rule folds chunks of its own size: a chunk size given with it was ignored.
    calls = []
    with pytest.raises(error, match="^chunk_bytes: "):
        ladle.ratatouille(
            family(2), selection="greedy", evaluate=calls.append, chunk_bytes=chunk_bytes
        )
    assert calls == []


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_an_unknown_selection_is_refused_naming_the_choices():
    with pytest.raises(ValueError) as info:
        ladle.ratatouille(family(2), selection="Greedy", evaluate=lambda sd: 1.0)
    assert str(info.value) == "selection: expected one of ('uniform', 'greedy'), found 'Greedy'"


def test_the_output_records_the_selection_and_for_greedy_strict_and_what_was_kept(tmp_path):
    import json

    runs = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
    out = ladle.ratatouille(runs, out=tmp_path / "u.safetensors")
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["ladle.parameters"]) == {"selection": "uniform"}
    ladle.ratatouille(
        runs,
        selection="greedy",
        evaluate=lambda sd: 1.0,
        scores=[2.0, 1.0],
        strict=True,
        out=tmp_path / "g.safetensors",
    )
    with safe_open(tmp_path / "g.safetensors", "pt") as f:
        assert json.loads(f.metadata()["ladle.parameters"]) == {
            "selection": "greedy",
            "strict": True,
            "selected": [0],
            "score": 2.0,
        }


def test_a_head_key_replacing_a_kept_key_takes_its_place():
    aux = {"a": torch.ones(1), "head.weight": torch.zeros(2), "z": torch.ones(1)}
    init = ladle.ratatouille_init(aux, {"head.weight": torch.ones(2), "new": torch.ones(3)})
    assert list(init) == ["a", "head.weight", "z", "new"]
    assert torch.equal(init["head.weight"], torch.ones(2))


def test_a_drop_pattern_matching_nothing_names_the_first_five_keys():
    aux = {k: torch.ones(1) for k in "abcdef"}
    with pytest.raises(ladle.IncompatibleError) as info:
        ladle.ratatouille_init(aux, {}, drop=["head.*"])
    assert str(info.value) == (
        "auxiliary (<state dict>): drop pattern 'head.*' matches none of its 6 keys "
        "('a', 'b', 'c', 'd', 'e', ...)"
    )
    with pytest.raises(ladle.IncompatibleError) as info:
        ladle.ratatouille_init({k: torch.ones(1) for k in "abcde"}, {}, drop=["head.*"])
    assert str(info.value).endswith("matches none of its 5 keys ('a', 'b', 'c', 'd', 'e')")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_init_from_paths_closes_the_files_it_opened(tmp_path):
    save_file(auxiliary(), tmp_path / "aux.safetensors")
    save_file(probe(), tmp_path / "probe.safetensors")
    before = len(os.listdir("/proc/self/fd"))
    ladle.ratatouille_init(
        tmp_path / "aux.safetensors", tmp_path / "probe.safetensors", drop=["aux_head.*"]
    )
    assert len(os.listdir("/proc/self/fd")) == before


# --- tied weights ----------------------------------------------------------------------------


class TiedLM(torch.nn.Module):
    """A language model whose output head is its embedding (``tie_word_embeddings``), with a
    classifier for the target task; ``tied=False`` gives the head a parameter of its own."""

    def __init__(self, seed: int, *, tied: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(6, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.classifier = torch.nn.Linear(4, 3)
        if tied:
            self.head.weight = self.emb.weight


@pytest.mark.parametrize("drop", [(), ["head.weight"], ["head.*"]])
def test_a_probe_under_a_tied_name_of_the_auxiliary_is_refused_naming_both_keys(drop):
    # The init held the auxiliary's embedding and the probe as two tensors; loaded into the
    # tied model, both went into one parameter and the probe replaced the embedding.
    aux = TiedLM(0)
    probe = {"head.weight": torch.full((6, 4), 0.5)}
    with pytest.raises(ladle.IncompatibleError) as info:
        ladle.ratatouille_init(aux, probe, drop=drop)
    assert str(info.value) == (
        "head (<state dict>): key 'head.weight' is tied to 'emb.weight' in auxiliary "
        "(<TiedLM>) (one tensor, two names): a model that ties them loads the probe and the "
        "auxiliary's 'emb.weight' into one parameter, and keeps the one loaded last. A linear "
        "probe needs a head of its own: untie it in the target model (transformers: "
        "tie_word_embeddings=False) and pass the auxiliary as that untied model, or with "
        "'head.weight' cloned"
    )
    if not drop:  # the first name given, the second kept: the same
        with pytest.raises(ladle.IncompatibleError, match=r"key 'emb\.weight' is tied to 'head"):
            ladle.ratatouille_init(aux, {"emb.weight": torch.ones(6, 4)})


def test_an_auxiliary_with_its_head_untied_takes_the_probe_for_an_untied_target():
    aux = TiedLM(0)
    untied = {**aux.state_dict(), "head.weight": aux.head.weight.detach().clone()}
    probe = {"head.weight": torch.full((6, 4), 0.5)}
    target = TiedLM(1, tied=False)
    target.load_state_dict(ladle.ratatouille_init(untied, probe), strict=True)
    assert torch.equal(target.emb.weight, aux.emb.weight)
    assert torch.equal(target.head.weight, probe["head.weight"])


def test_tied_auxiliary_weights_stay_one_tensor_beside_a_probe_of_their_own():
    aux = TiedLM(0)
    probe = {f"classifier.{k}": v for k, v in TiedLM(2).classifier.state_dict().items()}
    init = ladle.ratatouille_init(aux, probe, drop=["classifier.*"])
    assert init["head.weight"] is init["emb.weight"]  # one copy, as the auxiliary has it
    assert init["emb.weight"] is not aux.emb.weight
    target = TiedLM(1)
    target.load_state_dict(init, strict=True)
    assert target.head.weight is target.emb.weight
    assert torch.equal(target.emb.weight, aux.emb.weight)
    assert torch.equal(target.classifier.weight, probe["classifier.weight"])


def test_names_of_a_tied_tensor_kept_after_its_first_is_dropped_stay_one_copy():
    # T5 names its shared embedding thrice and more: with the first name dropped, each
    # other name got a copy of its own (the tensor's memory twice), not one copy.
    shared, body = torch.arange(6.0), torch.ones(2)
    aux = {"shared": shared, "body": body, "enc.embed": shared, "dec.embed": shared}
    init = ladle.ratatouille_init(aux, {"classifier": torch.zeros(3)}, drop=["shared"])
    assert list(init) == ["body", "enc.embed", "dec.embed", "classifier"]
    assert init["dec.embed"] is init["enc.embed"]
    assert init["enc.embed"].tolist() == shared.tolist()
    assert init["enc.embed"] is not shared


def test_a_head_giving_every_name_of_a_tied_tensor_replaces_it():
    aux, probe = TiedLM(0), torch.full((6, 4), 0.5)
    init = ladle.ratatouille_init(aux, {"emb.weight": probe, "head.weight": probe})
    assert torch.equal(init["emb.weight"], probe)
    assert torch.equal(init["head.weight"], probe)


def test_every_drop_pattern_removes_its_keys():
    aux = {"a.w": torch.ones(1), "b.w": torch.ones(1), "c.w": torch.ones(1)}
    assert list(ladle.ratatouille_init(aux, {}, drop=["a.*", "b.*"])) == ["c.w"]


def test_a_head_key_of_another_floating_dtype_replaces_a_kept_key_in_its_own_dtype():
    # Only the dtype kind must agree: a bfloat16 probe stands in for a float32 head.
    aux = {"body.weight": torch.ones(2), "head.weight": torch.zeros(3, 2)}
    init = ladle.ratatouille_init(aux, {"head.weight": torch.ones(3, 2, dtype=torch.bfloat16)})
    assert init["head.weight"].dtype == torch.bfloat16
    assert init["body.weight"].dtype == torch.float32


def test_init_tensors_share_no_memory_with_the_input_mappings():
    # Head keys replacing a kept key, head keys of their own and the auxiliary's kept keys:
    # writing to the init leaves both inputs as they were.
    aux, head = auxiliary(), {**probe(), "body.bias": torch.zeros(4)}
    init = ladle.ratatouille_init(aux, head, drop=["aux_head.*"])
    for tensor in init.values():
        tensor.add_(1)
    for state, fresh in ((aux, auxiliary()), (head, {**probe(), "body.bias": torch.zeros(4)})):
        assert all(torch.equal(state[key], fresh[key]) for key in fresh)


def test_a_probe_for_a_tied_name_is_taken_when_the_other_names_are_dropped():
    # No other name of the tensor stays the auxiliary's: nothing for the probe to clash with.
    probe = torch.full((6, 4), 0.5)
    init = ladle.ratatouille_init(TiedLM(0), {"head.weight": probe}, drop=["emb.weight"])
    assert "emb.weight" not in init
    assert torch.equal(init["head.weight"], probe)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["enc.embed", "dec.embed"], "key 'enc.embed' is tied to 'shared'"),
        (["dec.embed"], "key 'dec.embed' is tied to 'shared'"),
    ],
)
def test_a_tied_probe_is_refused_naming_the_first_name_given_and_the_first_kept(names, message):
    shared = torch.arange(6.0)
    aux = {"shared": shared, "enc.embed": shared, "dec.embed": shared}
    with pytest.raises(ladle.IncompatibleError, match=message):
        ladle.ratatouille_init(aux, {key: torch.zeros(6) for key in names})


@pytest.mark.parametrize("selection", ["uniform", "greedy"])
def test_the_merge_options_reach_either_selections_merge(selection, tmp_path):
    # dtype, allow_nonfinite, max_shard_size, overwrite and progress are passed on to the
    # uniform soup's fold and to the greedy soup alike.
    runs = [
        {"a": torch.tensor([1.0, math.nan]), "b": torch.tensor([2.0])},
        {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([4.0])},
    ]
    bar = mock.MagicMock()  # a tqdm-like class: bar(total=..., ...) makes the bar
    greedy = {"evaluate": lambda sd: 1.0, "scores": [1.0, 1.0]} if selection == "greedy" else {}
    options = {"dtype": torch.float16, "allow_nonfinite": True, "max_shard_size": 4, **greedy}
    ladle.ratatouille(runs, selection=selection, out=tmp_path / "soup", **options)
    ladle.ratatouille(
        runs, selection=selection, out=tmp_path / "soup", overwrite=True, progress=bar, **options
    )
    assert bar.called
    assert len(list((tmp_path / "soup").glob("*.safetensors"))) == 2  # a: 4 bytes, b: 2
    soup = ladle.load(tmp_path / "soup")
    assert soup["a"].dtype == soup["b"].dtype == torch.float16
    assert soup["a"][0].item() == 2.0 and math.isnan(soup["a"][1].item())
    assert soup["b"].tolist() == [3.0]


@pytest.mark.parametrize(("strict", "selected"), [(False, [0, 1]), (True, [0])])
def test_greedy_strict_keeps_a_candidate_only_when_the_score_rises(strict, selected):
    runs = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
    result = ladle.ratatouille(
        runs, selection="greedy", evaluate=lambda sd: 1.0, scores=[1.0, 1.0], strict=strict
    )
    assert result.selected == selected


@pytest.mark.parametrize(("drop", "found"), [(None, "None"), ([3], "[3]"), (b"head", "b'head'")])
def test_a_drop_that_is_no_sequence_of_patterns_is_a_type_error_naming_it(drop, found):
    # "'NoneType' object is not iterable", "object of type 'int' has no len()"
    aux, probe = {"body": torch.ones(2), "head.w": torch.zeros(3)}, {"head.w": torch.ones(5)}
    with pytest.raises(TypeError) as info:
        ladle.ratatouille_init(aux, probe, drop=drop)
    assert str(info.value) == f"drop: expected a sequence of patterns (strings), found {found}"


def test_ratatouille_init_names_the_argument_whose_source_is_bad():
    with pytest.raises(ladle.CheckpointError, match=r"^head: <state dict>: expected a mapping"):
        ladle.ratatouille_init({"w": torch.ones(2)}, {1: torch.ones(2)})


def test_drop_patterns_match_keys_case_sensitively():
    # Found by mutation testing: a case-folding match would drop "HEAD.b" too.
    aux = {"head.w": torch.zeros(2), "HEAD.b": torch.ones(2), "body": torch.ones(3)}
    init = ladle.ratatouille_init(aux, {"head.w": torch.full((4,), 0.5)}, drop=["head.*"])
    assert sorted(init) == ["HEAD.b", "body", "head.w"]
    assert init["head.w"].tolist() == [0.5] * 4 and init["HEAD.b"].tolist() == [1.0, 1.0]


# --- ratatouille_init takes every method's keywords (DESIGN.md) -------------------------------


def _aux_and_probe():
    aux = {
        "body.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "body.steps": torch.tensor(7),
        "head.weight": torch.zeros(3, 2),
    }
    probe = {"head.weight": torch.tensor([[0.5, -0.5]])}
    return aux, probe


def test_ratatouille_init_takes_the_keywords_every_method_takes():
    # It took drop= alone: out=, device=, dtype=, progress= were TypeErrors.
    parameters = inspect.signature(ladle.ratatouille_init).parameters
    for name in ("out", "device", "dtype", "progress"):
        assert parameters[name].kind == inspect.Parameter.KEYWORD_ONLY
        assert parameters[name].default is None


def test_ratatouille_init_writes_what_it_returns(tmp_path):
    aux, probe = _aux_and_probe()
    folder = ladle.save(aux, tmp_path / "aux")
    (folder / "config.json").write_text('{"num_labels": 3}')  # the auxiliary task's
    init = ladle.ratatouille_init(folder, probe, drop=["head.*"])
    path = ladle.ratatouille_init(folder, probe, drop=["head.*"], out=tmp_path / "init.safetensors")
    assert path == tmp_path / "init.safetensors"
    written = ladle.load(path)
    assert sorted(written) == sorted(init) == ["body.steps", "body.weight", "head.weight"]
    assert all(torch.equal(written[k], init[k]) and written[k].dtype == init[k].dtype for k in init)
    directory = ladle.ratatouille_init(folder, probe, drop=["head.*"], out=tmp_path / "init")
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors"]  # no config
    with pytest.raises(ladle.LadleError, match="already exists"):
        ladle.ratatouille_init(folder, probe, drop=["head.*"], out=path)
    with pytest.raises(ladle.LadleError, match="aux"):  # an input: never replaced
        ladle.ratatouille_init(folder, probe, drop=["head.*"], out=folder, overwrite=True)
    assert torch.equal(ladle.load(folder)["head.weight"], aux["head.weight"])


def test_ratatouille_init_casts_floating_tensors_to_dtype_and_refuses_an_overflow():
    aux, probe = _aux_and_probe()
    init = ladle.ratatouille_init(aux, probe, drop=["head.*"], dtype="bf16")
    assert {k: t.dtype for k, t in init.items()} == {
        "body.weight": torch.bfloat16,
        "body.steps": torch.int64,  # an integer buffer stays as it is
        "head.weight": torch.bfloat16,
    }
    assert init["body.weight"].tolist() == aux["body.weight"].tolist()
    aux["body.weight"][0, 0] = 1e5
    with pytest.raises(ladle.NonFiniteError) as caught:
        ladle.ratatouille_init(aux, probe, drop=["head.*"], dtype=torch.float16)
    assert str(caught.value) == (
        "the init: 1 of the 4 values of key 'body.weight' (<state dict>) are past the range of "
        "float16 (largest finite value 65504); keep a wider dtype"
    )


@pytest.mark.parametrize(
    ("stored", "target"),
    [
        (torch.float8_e4m3fn, torch.float16),
        (torch.float8_e4m3fnuz, torch.bfloat16),
        (torch.float8_e5m2fnuz, torch.float32),
        (torch.float8_e5m2, torch.float8_e4m3fn),
        (torch.float16, torch.float8_e5m2),
    ],
)
def test_ratatouille_init_casts_float8_weights_and_refuses_their_overflow(tmp_path, stored, target):
    # torch has no isfinite for e4m3fn and the fnuz types, and compares no e5m2 on the CPU:
    # the cast's check raised torch's NotImplementedError where the merges cast them.
    values = torch.tensor([[1.0, -2.0], [0.5, 3.0]]).to(stored)
    aux, probe = {"w": values}, {"head.w": torch.zeros(2)}
    init = ladle.ratatouille_init(aux, probe, dtype=target)
    assert init["w"].dtype == target
    assert init["w"].float().tolist() == [[1.0, -2.0], [0.5, 3.0]]  # exact in every dtype here
    path = ladle.ratatouille_init(aux, probe, dtype=target, out=tmp_path / "init.safetensors")
    assert torch.equal(ladle.load(path)["w"].view(torch.uint8), init["w"].view(torch.uint8))
    largest = torch.finfo(target).max
    if torch.finfo(stored).max > largest:  # one value past the target's range
        past = min(2 * largest, torch.finfo(stored).max)
        aux["w"] = torch.tensor([[1.0, past], [0.5, 3.0]]).to(stored)
        with pytest.raises(ladle.NonFiniteError, match="1 of the 4 values of key 'w'"):
            ladle.ratatouille_init(aux, probe, dtype=target)


def test_ratatouille_init_checks_device_and_counts_progress_in_bytes():
    aux, probe = _aux_and_probe()
    with pytest.raises(ValueError, match="device"):
        ladle.ratatouille_init(aux, probe, drop=["head.*"], device="meta")
    calls = []
    ladle.ratatouille_init(aux, probe, drop=["head.*"], progress=recording_bar(calls))
    assert calls == [
        ("init", 16 + 8 + 8, "B"),
        ("update", 16),
        ("update", 8),
        ("update", 8),
        ("close",),
    ]


class _RecordingRows(ladle.checkpoint.TensorMapCheckpoint):
    """Tensors in memory, recording the number of entries of every read of rows."""

    def __init__(self, tensors, reads):
        super().__init__(tensors)
        self.reads = reads

    def get_rows(self, key, rows, shape=None):
        found = super().get_rows(key, rows, shape)
        self.reads.append((key, found.numel()))
        return found


def test_ratatouille_init_writes_a_chunk_of_rows_at_a_time_what_it_returns(tmp_path):
    # Written with out=, the init was put together whole first (with dtype=, 3.25 times the
    # auxiliary model in memory): DESIGN.md's "out=PATH never holds whole models".
    chunk = ladle.engine.FOLD_CHUNK_BYTES // 4  # float32 entries
    generator = torch.Generator().manual_seed(0)
    embed = torch.randn(2 * chunk // 512 + 3, 512, generator=generator)  # three chunks of rows
    aux = {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: written under both names
        "long": torch.randn(1, chunk + 5, generator=generator),  # a row past a chunk
        "steps": torch.tensor(3),
        "aux_head.weight": torch.zeros(4, 512),
    }
    probe = {"head.weight": torch.randn(2, 512, generator=generator)}
    for dtype in (None, torch.bfloat16):
        reads: list = []
        out = tmp_path / f"init-{dtype}"
        given = _RecordingRows(aux, reads)
        path = ladle.ratatouille_init(given, probe, drop=["aux_head.*"], dtype=dtype, out=out)
        assert max(numel for _, numel in reads) <= chunk
        written, init = (
            ladle.load(path),
            ladle.ratatouille_init(aux, probe, drop=["aux_head.*"], dtype=dtype),
        )
        assert sorted(init) == ["embed.weight", "head.weight", "lm_head.weight", "long", "steps"]
        for key in init:
            assert written[key].dtype == init[key].dtype
            assert torch.equal(written[key], init[key])
        expected = embed if dtype is None else embed.to(dtype)
        assert torch.equal(written["lm_head.weight"], expected)


def test_ratatouille_init_counts_every_value_past_the_range_when_writing_chunks(tmp_path):
    # Each chunk is cast and checked as it is written: the error, raised in the chunk of the
    # first overflow, counts those of the whole key, and no output is left.
    chunk = ladle.engine.FOLD_CHUNK_BYTES // 4
    body = torch.zeros(2 * chunk // 256 + 1, 256)
    body[-1, 0] = body[-1, 1] = 1e5  # in the last chunk
    aux, probe = {"body": body, "aux_head": torch.zeros(2)}, {"head": torch.ones(2)}
    out = tmp_path / "init.safetensors"
    for first in (False, True):  # the error in the last chunk, or in the first
        body[0, 5] = 1e5 if first else 0.0
        for where, target in (("the init", None), (str(out), out)):
            with pytest.raises(ladle.NonFiniteError) as caught:
                ladle.ratatouille_init(
                    aux, probe, drop=["aux_head"], dtype=torch.float16, out=target
                )
            assert str(caught.value) == (
                f"{where}: {2 + first} of the {body.numel()} values of key 'body' (<state "
                "dict>) are past the range of float16 (largest finite value 65504); keep a "
                "wider dtype"
            )
            assert not out.exists() and os.listdir(tmp_path) == []
