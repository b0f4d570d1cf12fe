"""ladle.diff and the `ladle diff` / `ladle inspect` commands on known inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import family
from hypothesis import given
from safetensors.torch import save_file

import ladle
from ladle.cli import main

A = {"w": torch.tensor([[3.0, 0.0]]), "b": torch.tensor([1.0, 1.0]), "n": torch.tensor(7)}
B = {"w": torch.tensor([[0.0, 4.0]]), "b": torch.tensor([1.0, 1.0]), "n": torch.tensor(8)}
BASE = {"w": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([0.0, 0.0]), "n": torch.tensor(0)}


def test_diff_hand_worked_norms_and_cosines():
    report = ladle.diff(A, B)
    w, b = report.tensors
    assert w == ladle.TensorDiff("w", 3.0, 4.0, 5.0, 0.0)
    assert b.key == "b" and b.norm_diff == 0.0 and b.cosine == pytest.approx(1.0)
    assert report.skipped == ["n"]
    # whole model: a = [3, 0, 1, 1], b = [0, 4, 1, 1]: ⟨a,b⟩ = 2, ‖a‖² = 11, ‖b‖² = 18
    assert report.total.norm_diff == 5.0
    assert report.total.cosine == pytest.approx(2 / math.sqrt(11 * 18))


def test_diff_with_base_compares_task_vectors():
    report = ladle.diff(A, B, base=BASE)
    w, b = report.tensors
    # task vectors of w: [2, -1] and [-1, 3]: ⟨,⟩ = -5, norms √5 and √10
    assert w.norm_a == pytest.approx(math.sqrt(5)) and w.norm_b == pytest.approx(math.sqrt(10))
    assert w.cosine == pytest.approx(-5 / math.sqrt(50)) and w.norm_diff == 5.0
    assert b.cosine == pytest.approx(1.0)


def test_identical_tensors_have_cosine_exactly_1_and_opposite_ones_minus_1(tmp_path, capsys):
    a = {"w": torch.tensor([1.0, 1.0])}  # ‖a‖² = 2, and √2·√2 = 2.0000000000000004
    report = ladle.diff(a, {"w": a["w"].clone()})
    assert report.tensors == [ladle.TensorDiff("w", math.sqrt(2), math.sqrt(2), 0.0, 1.0)]
    assert report.total == ladle.TensorDiff("", math.sqrt(2), math.sqrt(2), 0.0, 1.0)
    assert ladle.diff(a, {"w": -a["w"]}).tensors[0].cosine == -1.0
    assert ladle.diff(a, {"w": 4 * a["w"]}).tensors[0].cosine == 1.0
    twice = {"w": torch.tensor([3.0, 3.0])}  # task vectors [2, 2] and [2, 2]
    assert ladle.diff(twice, twice, base=a).total.cosine == 1.0
    save_file(a, tmp_path / "a.safetensors")
    argv = ["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors")]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["w", "1.41421", "1.41421", "0", "1"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["cosine"] == 1.0


def test_zero_task_vectors_have_nan_cosine():
    assert math.isnan(ladle.diff(A, A, base=A).tensors[0].cosine)


@given(models=__import__("conftest").families(min_n=2, max_n=2))
def test_diff_matches_a_naive_float64_reference_and_is_chunk_independent(models):
    a, b = models
    report = ladle.diff(a, b, chunk_bytes=8)
    for row in report.tensors:
        x, y = a[row.key].double().flatten(), b[row.key].double().flatten()
        assert row.norm_diff == pytest.approx(float((x - y).norm()), rel=1e-9, abs=1e-12)
        assert row.norm_a == pytest.approx(float(x.norm()), rel=1e-9, abs=1e-12)
        if x.norm() > 0 and y.norm() > 0:
            assert row.cosine == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-9)


def test_diff_of_incompatible_models_names_them():
    with pytest.raises(ladle.IncompatibleError, match="'w'"):
        ladle.diff(A, {**B, "w": torch.zeros(2, 2)})


@pytest.mark.parametrize(
    ("a", "b", "error", "message"),
    [
        (
            A,
            {**B, "w": torch.zeros(2, 2)},
            ladle.IncompatibleError,
            "b (<state dict>): key 'w' has shape (2, 2), a (<state dict>) has (1, 2)",
        ),
        (
            {"w": A["w"]},
            A,
            ladle.IncompatibleError,
            "b (<state dict>): keys differ from a (<state dict>): extra 2 ('b', 'n')",
        ),
        (
            {**A, "w": torch.tensor([[math.nan, 0.0]])},
            B,
            ladle.NonFiniteError,
            "a (<state dict>): key 'w' holds NaN or Inf values; pass allow_nonfinite=True "
            "(--allow-nonfinite) to go on anyway",
        ),
        (
            A,
            {**B, "w": torch.empty(1, 2, device="meta")},
            ladle.CheckpointError,
            "b (<state dict>): tensor 'w' is on the meta device (no data); ladle merges dense "
            "tensors with data",
        ),
        (3, B, TypeError, "a: expected a mapping, nn.Module, path or Checkpoint, found int"),
    ],
)
def test_diff_errors_call_the_models_a_and_b_as_its_parameters(a, b, error, message):
    # Before: "model 1 (<state dict>): ... model 0 (<state dict>) ...", the engine's names
    # for a list of models; diff takes two arguments, a and b.
    with pytest.raises(error) as caught:
        ladle.diff(a, b)
    assert str(caught.value) == message


def test_cli_diff_error_names_a_and_b_with_the_paths_typed(files, tmp_path, capsys):
    odd = tmp_path / "odd.safetensors"
    save_file({**B, "w": torch.zeros(2, 2)}, odd)
    assert main(["diff", files["a"], str(odd), "--base", files["base"]]) == 1
    assert capsys.readouterr().err == (
        f"ladle: error: b ({odd}): key 'w' has shape (2, 2), base ({files['base']}) has (1, 2)\n"
    )
    assert main(["diff", str(odd), files["b"]]) == 1
    assert capsys.readouterr().err == (
        f"ladle: error: b ({files['b']}): key 'w' has shape (1, 2), a ({odd}) has (2, 2)\n"
    )


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, model in {"a": A, "b": B, "base": BASE}.items():
        save_file(model, tmp_path / f"{name}.safetensors")
        paths[name] = str(tmp_path / f"{name}.safetensors")
    return paths


def test_cli_diff_table_and_summary(files, capsys):
    assert main(["diff", files["a"], files["b"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "|A|", "|B|", "|A-B|", "cosine"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}  # files sort keys
    assert rows == {"w": ["3", "4", "5", "0"], "b": ["1.41421", "1.41421", "0", "1"]}
    assert lines[-1].startswith(
        "2 tensors: |A| 3.31662, |B| 4.24264, |A-B| 5, cosine of the models"
    )
    assert lines[-1].endswith("1 identical; 1 integer or bool skipped")


def test_cli_diff_json_with_base(files, capsys):
    assert main(["diff", files["a"], files["b"], "--base", files["base"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["base"] == files["base"]
    w = {t["key"]: t for t in report["tensors"]}["w"]
    assert w["norm_diff"] == 5.0
    assert w["cosine"] == pytest.approx(-5 / math.sqrt(50))
    assert main(["diff", files["a"], files["a"], "--base", files["a"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["cosine"] is None  # NaN is not JSON


def test_cli_inspect_shows_shards_path_and_full_metadata(tmp_path, capsys):
    model = family(1, seed=3)[0]
    out = ladle.uniform_soup([model, model], out=tmp_path / "m", max_shard_size=40, device="cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    shard_lines = [line for line in text.splitlines() if line.startswith("shard ")]
    assert [line.split(":")[0] for line in shard_lines] == [f"shard {n}" for n in shard_names]
    counts = [sum(f == n for f in index["weight_map"].values()) for n in shard_names]
    assert [int(line.split(": ")[1].split()[0]) for line in shard_lines] == counts
    assert 'metadata ladle.parameters: {"weights": [0.5, 0.5]}' in text
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["file"] for s in report["shards"]] == shard_names
    assert sum(s["bytes"] for s in report["shards"]) == report["bytes"]
    assert {t["key"]: t["file"] for t in report["tensors"]} == index["weight_map"]
    assert report["metadata"]["ladle.method"] == "uniform_soup"


def test_cosine_stays_within_minus_one_and_one_so_acos_takes_it():
    # sqrt(aa)·sqrt(bb) rounds below |ab| for some tensors compared with themselves (or
    # their negation): a cosine of 1.0000000000000002, which math.acos refuses.
    gen = torch.Generator().manual_seed(0)
    model = {f"w{i}": torch.randn(64, 16, generator=gen) for i in range(32)}
    negated = {k: -v for k, v in model.items()}
    for other in (model, negated):
        report = ladle.diff(model, other)
        for row in [*report.tensors, report.total]:
            assert -1.0 <= row.cosine <= 1.0, row
            math.acos(row.cosine)


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_a_cosine_that_rounds_above_one_is_clamped_to_exactly_one():
    # b is a rounded to float32 after scaling by 2.69: ⟨a,b⟩ / √(‖a‖²·‖b‖²) rounds to
    # 1.0000000000000002 in float64, which math.acos refuses.
    a = torch.tensor([-0.014956028200685978, -0.14325273036956787])
    b = torch.tensor([-0.04023582860827446, -0.3853892385959625])
    assert ladle.diff({"w": a}, {"w": b}).tensors[0].cosine == 1.0
    assert ladle.diff({"w": a}, {"w": -b}).tensors[0].cosine == -1.0


def test_a_zero_task_vector_against_a_nonzero_one_has_nan_cosine_and_true_norms():
    report = ladle.diff(A, B, base=A)  # a − base = 0; b − base = [[-3, 4]] for w
    w = report.tensors[0]
    assert (w.key, w.norm_a, w.norm_b, w.norm_diff) == ("w", 0.0, 5.0, 5.0)
    assert math.isnan(w.cosine)
    assert math.isnan(report.total.cosine)


def test_cosine_of_float64_values_whose_squared_norms_overflow_or_underflow_in_product():
    # ‖a‖²·‖b‖² is inf (1e200·2e200) or 0 (1e-170·2e-170) in float64 though each is finite
    # and positive: the cosine is still 1/√2 = 0.7071... A subnormal product (1e-80: about
    # 1e-319) kept too few bits, the cosine off by 5e-8.
    for scale in (1e100, 1e-85, 1e-80):
        a = {"w": torch.tensor([scale, 0.0], dtype=torch.float64)}
        b = {"w": torch.tensor([scale, scale], dtype=torch.float64)}
        row = ladle.diff(a, b).tensors[0]
        assert row.cosine == pytest.approx(1 / math.sqrt(2), rel=1e-15)
        assert row.norm_b == pytest.approx(math.sqrt(2) * scale, rel=1e-15)


def test_diff_counts_a_tensor_every_input_ties_once_in_the_total():
    # A torch file or module of a tied model names its embedding twice: the total counted
    # it twice, so the same models compared from safetensors (stored once) differed.
    # Hand-worked: emb a = [3, 0], b = [0, 4]; body a = b = [1, 1]. Once: ‖a‖² = 11,
    # ‖b‖² = 18, ⟨a,b⟩ = 2, ‖a−b‖ = 5 (twice, the embedding's share doubled: ‖a−b‖ = √50).
    emb_a, emb_b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    a = {"emb": emb_a, "body": torch.ones(2), "head": emb_a}
    b = {"emb": emb_b, "body": torch.ones(2), "head": emb_b}
    report = ladle.diff(a, b)
    assert [row.key for row in report.tensors] == ["emb", "body", "head"]
    assert report.tensors[2] == ladle.TensorDiff("head", 3.0, 4.0, 5.0, 0.0)
    assert report.total.norm_diff == 5.0
    assert report.total.norm_a == math.sqrt(11) and report.total.norm_b == math.sqrt(18)
    assert report.total.cosine == pytest.approx(2 / math.sqrt(11 * 18))
    once = ladle.diff({"emb": emb_a, "body": torch.ones(2)}, {"emb": emb_b, "body": torch.ones(2)})
    assert report.total == once.total


def test_identical_tensors_whose_squared_norm_overflows_still_have_cosine_exactly_1():
    # ‖a‖² = 2e310 is inf in float64: ⟨a,b⟩ / (‖a‖·‖b‖) was inf / inf, NaN, for a == b; and
    # the norms were inf until the sums were scaled (below).
    a = {"w": torch.tensor([1e155, 1e155], dtype=torch.float64)}
    (row,) = ladle.diff(a, {"w": a["w"].clone()}).tensors
    assert (row.norm_diff, row.cosine) == (0.0, 1.0)
    assert row.norm_a == row.norm_b == pytest.approx(math.sqrt(2) * 1e155, rel=1e-15)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1e200, 1e200], [1e200, -1e200], (math.sqrt(2) * 1e200, math.sqrt(2) * 1e200, 2e200, 0.0)),
        ([1e-200, 0.0], [2e-200, 0.0], (1e-200, 2e-200, 1e-200, 1.0)),
        ([3e-170, 4e-170], [0.0, 4e-170], (5e-170, 4e-170, 3e-170, 0.8)),
        # One scale for a and b made the smaller's norm 0 and the cosine NaN; past 2**1023 the
        # norms' power of two raised OverflowError (a traceback from `ladle diff`).
        ([3e-201, 0.0], [-0.34, 0.0], (3e-201, 0.34, 0.34, -1.0)),
        ([7.7e199, 0.0], [0.65, 0.0], (7.7e199, 0.65, 7.7e199, 1.0)),
        ([1e308, 0.0], [1.0, 0.0], (1e308, 1.0, 1e308, 1.0)),
        ([1e308, 0.0], [-1e308, 0.0], (1e308, 1e308, math.inf, -1.0)),
    ],
)
def test_float64_entries_whose_squares_leave_float64_s_range_keep_their_figures(a, b, expected):
    # Σa² overflowed past about 1e154 (norms inf, a NaN cosine) and underflowed below about
    # 1e-154 (norms 0, a NaN cosine, and different tensors counted as identical).
    a64, b64 = (torch.tensor(v, dtype=torch.float64) for v in (a, b))
    report = ladle.diff({"w": a64}, {"w": b64})
    (row,) = report.tensors
    assert (row.norm_a, row.norm_b, row.norm_diff, row.cosine) == pytest.approx(expected, rel=1e-14)
    assert report.total == row._replace(key="")


def test_chunks_of_very_different_magnitudes_add_up_at_the_larger_scale():
    # One chunk's sums scaled by 2^-666, another's as they are: the small one vanishes beside.
    a = torch.tensor([[1e200, 0.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1e200], [1.0, 1.0]], dtype=torch.float64)
    (row,) = ladle.diff({"w": a}, {"w": b}, chunk_bytes=16).tensors  # one row a chunk
    assert (row.norm_a, row.norm_b, row.cosine) == pytest.approx((1e200, 1e200, 0.0), rel=1e-14)
    assert row.norm_diff == pytest.approx(math.sqrt(2) * 1e200, rel=1e-14)


@pytest.mark.parametrize("chunk_bytes", [64, 2**30])
def test_tiny_entries_beside_zeros_keep_their_figures_whatever_the_chunks(chunk_bytes):
    # A chunk (or key) of zeros summed at power 0 and the tiny chunk's sums, scaled by
    # 2^-664, were divided by 4^664 when added: norms 0 and a NaN cosine with small chunks.
    a = torch.zeros(64, 4, dtype=torch.float64)
    a[:32] = 3e-200
    b = (a / 3) * 4
    expected = (math.sqrt(128) * 3e-200, math.sqrt(128) * 4e-200, math.sqrt(128) * 1e-200, 1.0)
    (row,) = ladle.diff({"w": a}, {"w": b}, chunk_bytes=chunk_bytes).tensors
    assert (row.norm_a, row.norm_b, row.norm_diff, row.cosine) == pytest.approx(expected, rel=1e-14)
    for other in (torch.zeros(2, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)):
        x, y = (
            torch.tensor([3e-200], dtype=torch.float64),
            torch.tensor([4e-200], dtype=torch.float64),
        )
        total = ladle.diff({"w": x, "z": other}, {"w": y, "z": other}).total
        assert (total.norm_a, total.norm_b, total.norm_diff, total.cosine) == pytest.approx(
            (3e-200, 4e-200, 1e-200, 1.0), rel=1e-14
        )


def test_task_vectors_are_taken_in_float64_not_in_the_models_dtype():
    # a − base = 2**-30 − 1 exactly in float64; float32 rounds it to −1 = b − base, and the
    # two fine-tunes looked identical (|A-B| 0).
    report = ladle.diff(
        {"w": torch.tensor([2.0**-30])}, {"w": torch.tensor([0.0])}, base={"w": torch.ones(1)}
    )
    row = report.tensors[0]
    assert (row.norm_a, row.norm_b, row.norm_diff) == (1 - 2**-30, 1.0, 2**-30)


def test_with_a_base_rows_follow_the_bases_key_order():
    # As the merges order their outputs: task_arithmetic's keys are the base's.
    base = {"b": torch.zeros(1), "w": torch.zeros(2)}
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([1.0])}
    b = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([3.0])}
    report = ladle.diff(a, b, base=base)
    assert [row.key for row in report.tensors] == ["b", "w"]
    assert report.tensors[0] == ladle.TensorDiff("b", 1.0, 3.0, 2.0, 1.0)


def test_a_tensor_tied_in_one_model_only_is_compared_under_each_name():
    # b untied its head: the head's row is its own, not the embedding's, and counts in the
    # total. a = [3, 0, 3, 0], b = [3, 0, 0, 4]: ‖a‖² = 18, ‖b‖² = 25, ⟨a,b⟩ = 9, ‖a−b‖ = 5.
    emb = torch.tensor([3.0, 0.0])
    report = ladle.diff(
        {"emb": emb, "head": emb}, {"emb": emb.clone(), "head": torch.tensor([0.0, 4.0])}
    )
    assert report.tensors == [
        ladle.TensorDiff("emb", 3.0, 3.0, 0.0, 1.0),
        ladle.TensorDiff("head", 3.0, 4.0, 5.0, 0.0),
    ]
    assert report.total == ladle.TensorDiff("", math.sqrt(18), 5.0, 5.0, 9 / math.sqrt(450))


def test_every_non_floating_key_is_skipped_whatever_its_dtype():
    a = {"w": torch.ones(2), "mask": torch.tensor([True, False]), "n": torch.tensor(3).int()}
    report = ladle.diff(a, {key: value.clone() for key, value in a.items()})
    assert [row.key for row in report.tensors] == ["w"]
    assert report.skipped == ["mask", "n"]


def test_models_without_floating_tensors_have_no_rows_and_a_zero_total():
    report = ladle.diff({"n": torch.tensor(1)}, {"n": torch.tensor(2)})
    assert (report.tensors, report.skipped) == ([], ["n"])
    assert report.total[:4] == ("", 0.0, 0.0, 0.0)
    assert math.isnan(report.total.cosine)


def test_cli_diff_with_base_labels_the_task_vectors(files, capsys):
    # Task vectors of the whole model: [2, -1, 1, 1] and [-1, 3, 1, 1]: ‖·‖² = 7 and 12,
    # ⟨,⟩ = -3, cosine -3/√84.
    assert main(["diff", files["a"], files["b"], "--base", files["base"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "|A-base|", "|B-base|", "|A-B|", "cosine"]
    assert lines[-1] == (
        "2 tensors: |A-base| 2.64575, |B-base| 3.4641, |A-B| 5, cosine of the task vectors "
        "-0.327327; 1 identical; 1 integer or bool skipped"
    )
    assert main(["diff", files["a"], files["b"], "--base", files["base"], "--json"]) == 0
    total = json.loads(capsys.readouterr().out)["total"]
    assert list(total) == ["norm_a", "norm_b", "norm_diff", "cosine"]


def test_cli_diff_counts_as_identical_only_tensors_that_are_equal(tmp_path, capsys):
    # b = 2a: a cosine of 1, but not identical.
    save_file({"w": torch.tensor([1.0, 1.0])}, tmp_path / "a.safetensors")
    save_file({"w": torch.tensor([2.0, 2.0])}, tmp_path / "b.safetensors")
    assert main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("cosine of the models 1; 0 identical")


def test_a_packed_dtype_is_refused_naming_a_or_b():
    packed = {"w": torch.ones(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}
    with pytest.raises(ValueError, match=r"^a \(<state dict>\): key 'w' is stored as float4"):
        ladle.diff(packed, dict(packed))
