from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_bit_for_bit, assert_close_by_dtype, families, family, save_all
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import ladle
from ladle.cli import main
from ladle.testing import model_families


def naive_task_arithmetic(models, base, *, scale=1.0, weights=None):
    """Flatten nothing, trust nothing: numpy float64 of the formula."""
    weights = weights or [1.0] * len(models)
    out = {}
    for key, ref in base.items():
        if not ref.is_floating_point():
            out[key] = ref
            continue
        b = ref.double().numpy()
        total = sum(w * (m[key].double().numpy() - b) for w, m in zip(weights, models))
        out[key] = torch.from_numpy(np.asarray(b + scale * total)).to(ref.dtype)
    return out


def assert_close(actual, expected):
    assert_close_by_dtype(actual, expected, precise=(1e-5, 1e-5), low=(2**-7, 1e-2))


def test_worked_example_adds_scaled_task_vectors():
    base = {"w": torch.tensor([1.0, 1.0])}
    a, b = {"w": torch.tensor([2.0, 3.0])}, {"w": torch.tensor([0.0, 2.0])}
    # τa = [1, 2], τb = [−1, 1]; Σ = [0, 3]; 1 + 0.5·Σ = [1, 2.5].
    assert ladle.task_arithmetic([a, b], base, scale=0.5)["w"].tolist() == [1.0, 2.5]
    # 2·τa − τb = [3, 3]; 1 + 0.5·[3, 3] = [2.5, 2.5].
    merged = ladle.task_arithmetic([a, b], base, scale=0.5, weights=[2, -1])
    assert merged["w"].tolist() == [2.5, 2.5]


def test_negative_weight_subtracts_a_task_and_weights_are_not_normalised():
    base = {"w": torch.tensor([0.0, 4.0])}
    model = {"w": torch.tensor([1.0, 6.0])}
    # τ = [1, 2]: weight −1 gives [−1, 2]; weights [3] give [3, 10] (no division by 3).
    assert ladle.task_arithmetic([model], base, weights=[-1])["w"].tolist() == [-1.0, 2.0]
    assert ladle.task_arithmetic([model], base, weights=[3])["w"].tolist() == [3.0, 10.0]


@given(families(min_n=2), st.floats(-2, 2), st.booleans())
def test_task_arithmetic_matches_naive_reference(fam, scale, weighted):
    base, *models = fam
    weights = [0.5 - i for i in range(len(models))] if weighted else None
    actual = ladle.task_arithmetic(models, base, scale=scale, weights=weights, device="cpu")
    assert_close(actual, naive_task_arithmetic(models, base, scale=scale, weights=weights))


@given(model_families(n=st.integers(1, 4)), st.floats(-2, 2), st.booleans())
def test_task_arithmetic_matches_naive_reference_on_ladle_testing_families(family, scale, weighted):
    # ladle.testing's families: hypothesis floats in float32, bfloat16 or float16, with 0-d
    # tensors and an integer buffer (copied from the base).
    base, models = family
    weights = [0.5 - i for i in range(len(models))] if weighted else None
    actual = ladle.task_arithmetic(models, base, scale=scale, weights=weights, device="cpu")
    expected = naive_task_arithmetic(models, base, scale=scale, weights=weights)
    # The sums reach about 200 (bound 10, weights up to 2.5, scale up to 2): float32 steps of
    # 1.5e-5 there, whatever the (cancelled) result.
    assert_close_by_dtype(actual, expected, precise=(1e-5, 1e-4), low=(2**-7, 1e-2))


@given(families(min_n=2))
def test_scale_one_over_n_equals_the_uniform_soup(fam):
    base, *models = fam
    models = [{k: v.float() if v.is_floating_point() else v for k, v in m.items()} for m in models]
    base = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
    merged = ladle.task_arithmetic(models, base, scale=1 / len(models), device="cpu")
    soup = ladle.uniform_soup(models, device="cpu")
    for key in base:
        if base[key].is_floating_point():
            torch.testing.assert_close(merged[key], soup[key], rtol=1e-5, atol=1e-5)


@given(families(min_n=3), st.randoms())
def test_task_arithmetic_is_invariant_to_the_order_of_models(fam, rng):
    base, *models = fam
    order = list(range(len(models)))
    rng.shuffle(order)
    a = ladle.task_arithmetic(models, base, scale=0.3, device="cpu")
    b = ladle.task_arithmetic([models[i] for i in order], base, scale=0.3, device="cpu")
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-2, atol=1e-5)


@settings(max_examples=15)
@given(
    families(min_n=2),
    st.integers(4, 64),
    st.sampled_from([None, torch.float32, torch.bfloat16]),
)
def test_streaming_output_equals_in_memory_bit_for_bit(tmp_path_factory, fam, chunk, dtype):
    directory = tmp_path_factory.mktemp("ta")
    base_path, *paths = save_all(fam, directory)
    base, *models = fam
    options = {"scale": 0.6, "weights": [1.5] * len(models), "device": "cpu", "dtype": dtype}
    in_memory = ladle.task_arithmetic(models, base, chunk_bytes=chunk, **options)
    out = ladle.task_arithmetic(
        paths, base_path, out=directory / "out", chunk_bytes=chunk, max_shard_size=64, **options
    )
    streamed = ladle.load(out)
    assert_bit_for_bit(streamed, in_memory)


def test_chunk_size_does_not_change_a_single_bit():
    base, *models = family(4, seed=1)
    whole = ladle.task_arithmetic(models, base, scale=0.7, weights=[0.3, -1.7, 2.1], device="cpu")
    rows = ladle.task_arithmetic(
        models, base, scale=0.7, weights=[0.3, -1.7, 2.1], device="cpu", chunk_bytes=1
    )
    for key in whole:
        assert torch.equal(whole[key], rows[key]), key


def test_integer_buffers_come_from_the_base_and_output_in_the_base_dtype():
    base, *models = family(3, dtype=torch.bfloat16)
    merged = ladle.task_arithmetic(models, base, device="cpu")
    assert merged["bn.num_batches_tracked"].item() == 100
    assert merged["layer.weight"].dtype == torch.bfloat16


def test_memory_does_not_grow_with_the_number_of_models():
    # The kernel holds the base chunk, one accumulator and one buffer: its state after any
    # number of updates is the same few tensors.
    from ladle.methods.task_arithmetic import task_vector_sum_kernel

    kernel = task_vector_sum_kernel([1.0] * 50, 1.0)
    base = torch.zeros(3)
    state = kernel.init("w", slice(None), base)
    for i in range(50):
        state = kernel.update(state, i, torch.full((3,), float(i)))
    tensors = [t for t in state if isinstance(t, torch.Tensor)]
    assert len(tensors) == 3
    assert kernel.finalize(state).tolist() == [1225.0] * 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [1.0]}, "weights"),
        ({"weights": [1.0, float("nan")]}, "weights"),
        ({"scale": float("nan")}, "scale"),
    ],
)
def test_bad_arguments_are_value_errors_naming_the_parameter(kwargs, match):
    base, *models = family(3)
    with pytest.raises(ValueError, match=match):
        ladle.task_arithmetic(models, base, **kwargs)


def test_empty_models_or_no_base_are_value_errors():
    base = family(1)[0]
    with pytest.raises(ValueError, match="models"):
        ladle.task_arithmetic([], base)
    with pytest.raises(ValueError, match="base"):
        ladle.task_arithmetic([base], None)


def test_mismatched_keys_raise_naming_the_model():
    base, *models = family(3)
    del models[1]["layer.bias"]
    with pytest.raises(ladle.IncompatibleError, match=r"model 1 .*missing 1 \('layer.bias'\)"):
        ladle.task_arithmetic(models, base)


def test_cli_task_arithmetic_writes_the_merge(tmp_path, capsys):
    base_path, *paths = save_all(family(3, seed=4), tmp_path)
    out = tmp_path / "merged.safetensors"
    argv = ["task-arithmetic", "--base", str(base_path), *map(str, paths), "--scale", "0.5"]
    argv += ["--weights", "1", "-0.5", "-o", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    expected = ladle.task_arithmetic(paths, base_path, scale=0.5, weights=[1, -0.5], device="cpu")
    merged = ladle.load(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert capsys.readouterr().out.strip() == str(out)


@pytest.mark.parametrize("command", ["task-arithmetic", "ties", "dare", "stock"])
def test_cli_task_vector_commands_need_a_base(tmp_path, capsys, command):
    paths = save_all(family(2), tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([command, *map(str, paths), "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --base" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# Gaps found by mutation testing: each test below fails on a small change to the code.


@pytest.mark.parametrize(
    ("argument", "value", "expected"),
    [
        ("weights", [float("inf"), 1.0], "weights: expected finite numbers, found [inf, 1.0]"),
        ("weights", [1.0, float("-inf")], "weights: expected finite numbers, found [1.0, -inf]"),
        ("scale", float("nan"), "scale: expected a finite number, found nan"),
        ("scale", float("inf"), "scale: expected a finite number, found inf"),
        ("scale", float("-inf"), "scale: expected a finite number, found -inf"),
    ],
)
def test_a_weight_or_scale_that_is_no_finite_number_is_refused_before_merging(
    argument, value, expected
):
    # Refused by the argument's own check (a plain ValueError), not by the merge's check of
    # its results (a NonFiniteError: inf·τ overflows, and inf·0 is NaN).
    base, *models = family(3)
    with pytest.raises(ValueError) as info:
        ladle.task_arithmetic(models, base, device="cpu", **{argument: value})
    assert type(info.value) is ValueError
    assert str(info.value) == expected


def test_a_delta_may_overwrite_its_scratch_buffer_without_changing_the_task_vectors():
    # Delta's contract: ``scratch`` is free to overwrite, ``tau`` is the model's task vector.
    # Were the scratch the buffer that holds τᵢ (i > 0), this delta would make it 99.
    from ladle.engine import merge
    from ladle.methods.task_arithmetic import task_vector_sum_kernel

    def delta(key, rows, index, tau, scratch):
        scratch.fill_(99.0)
        return tau

    base = {"w": torch.tensor([1.0, 2.0])}
    models = [{"w": torch.tensor([2.0, 4.0])}, {"w": torch.tensor([0.0, 5.0])}]
    kernel = task_vector_sum_kernel([1.0, 2.0], 0.5, delta)
    merged = merge(models, kernel, base=base, method="x", parameters={}, device="cpu")
    # τ = [1, 2] and [−1, 3]: 1·τ₁ + 2·τ₂ = [−1, 8]; base + 0.5·that = [0.5, 6].
    assert merged["w"].tolist() == [0.5, 6.0]


def test_a_delta_gets_each_models_index_and_rows_and_what_it_leaves_in_tau_is_added():
    # Delta's contract: called per chunk of rows and per model, with that model's index; τ
    # as it leaves it (changed in place, with the scratch as a temporary) is what it adds.
    from ladle.engine import merge
    from ladle.methods.task_arithmetic import task_vector_sum_kernel

    calls = []

    def delta(key, rows, index, tau, scratch):
        calls.append((key, rows, index))
        return tau.add_(torch.mul(tau, index, out=scratch))  # model i counts i + 1 times

    base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    models = [{"w": base["w"] + 1.0}, {"w": base["w"] + torch.tensor([[2.0, 0.0], [0.0, 2.0]])}]
    kernel = task_vector_sum_kernel([1.0, 1.0], 1.0, delta)
    merged = merge(
        models, kernel, base=base, method="x", parameters={}, device="cpu", chunk_bytes=8
    )
    # base + 1·τ₀ + 2·τ₁, τ₀ = 1 everywhere, τ₁ = 2 on the diagonal.
    assert merged["w"].tolist() == [[6.0, 3.0], [4.0, 9.0]]
    first, second = slice(0, 1), slice(1, 2)  # 8 bytes: one row of two float32 at a time
    assert calls == [("w", first, 0), ("w", first, 1), ("w", second, 0), ("w", second, 1)]


def test_a_weight_of_zero_leaves_its_task_out():
    base = {"w": torch.tensor([0.0, 4.0])}
    a, b = {"w": torch.tensor([1.0, 6.0])}, {"w": torch.tensor([2.0, 8.0])}
    assert ladle.task_arithmetic([a, b], base, weights=[0, 1])["w"].tolist() == [2.0, 8.0]


def test_dtype_argument_sets_output_of_floating_tensors_only():
    base, *models = family(3)
    merged = ladle.task_arithmetic(models, base, scale=0.5, device="cpu")
    half = ladle.task_arithmetic(models, base, scale=0.5, device="cpu", dtype=torch.float16)
    assert half["layer.weight"].dtype == torch.float16
    assert torch.equal(half["layer.weight"], merged["layer.weight"].half())  # rounded once
    assert half["bn.num_batches_tracked"].dtype == torch.int64


def test_provenance_records_the_method_and_the_checked_scale_and_weights(tmp_path):
    base, *models = family(3)
    out = ladle.task_arithmetic(models, base, scale=0.5, out=tmp_path / "o.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ladle.method"] == "task_arithmetic"
    assert '"scale": 0.5' in meta["ladle.parameters"]
    assert '"weights": [1.0, 1.0]' in meta["ladle.parameters"]  # the default, as used


def test_a_delta_that_may_drop_a_nan_leaves_the_inputs_checked_for_it():
    # With a delta that replaces τ (here by zeros), a NaN input need not show in the result:
    # the engine checks the inputs, unless the delta says it keeps NaN/Inf non-finite.
    from ladle.engine import merge
    from ladle.methods.task_arithmetic import task_vector_sum_kernel

    def delta(key, rows, index, tau, scratch):
        return tau.zero_()

    base = {"w": torch.zeros(2)}
    models = [{"w": torch.ones(2)}, {"w": torch.tensor([1.0, float("nan")])}]
    kernel = task_vector_sum_kernel([1.0, 1.0], 1.0, delta)
    with pytest.raises(ladle.NonFiniteError, match=r"model 1 .*'w'"):
        merge(models, kernel, base=base, method="x", parameters={}, device="cpu")
    assert not task_vector_sum_kernel([1.0], 1.0, delta).propagates_nonfinite
    assert task_vector_sum_kernel(
        [1.0], 1.0, delta, delta_propagates_nonfinite=True
    ).propagates_nonfinite


@pytest.mark.parametrize("factor", [1e-44, 3e-42, 1e-39])
def test_a_scale_or_weight_below_float32s_normals_is_applied_exactly(factor):
    # float32 kept 1e-44 as a subnormal of a few bits: 3e38 · 1e-44 came out 2.94e-6.
    base, model = {"w": torch.zeros(1)}, {"w": torch.tensor([3e38])}
    expected = torch.tensor([3e38 * factor], dtype=torch.float64).float()  # rounded once
    for merged in (
        ladle.task_arithmetic([model], base, scale=factor, device="cpu"),
        ladle.task_arithmetic([model], base, weights=[factor], device="cpu"),
    ):
        assert torch.equal(merged["w"], expected)


def test_a_saturating_output_dtype_counts_nan_and_overflowing_results_alike():
    # float8_e4m3fn's cast hides both: entry 0 is NaN (τ sums to inf, times scale 0), entry 1
    # is 1000 (past 448).
    base = {"w": torch.tensor([0.0, 1000.0])}
    models = [{"w": torch.tensor([3e38, 1000.0])}] * 2
    with pytest.raises(ladle.NonFiniteError, match=r"2 of the 2 merged values of key 'w'"):
        ladle.task_arithmetic(models, base, scale=0.0, dtype=torch.float8_e4m3fn, device="cpu")
