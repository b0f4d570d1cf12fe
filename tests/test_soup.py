from __future__ import annotations

import pytest
import torch
from conftest import assert_bit_for_bit, assert_close_by_dtype, families, family, save_all
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import ladle
from ladle.methods.soup import normalized_weights


def naive_soup(models, weights=None):
    """Load everything, mean in float64."""
    weights = weights or [1.0] * len(models)
    total = sum(weights)
    out = {}
    for key, ref in models[0].items():
        if ref.is_floating_point():
            acc = sum(w * m[key].double() for w, m in zip(weights, models)) / total
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = ref
    return out


def assert_close_to_naive(actual, expected):
    assert_close_by_dtype(actual, expected, precise=(1e-6, 1e-6), low=(2**-7, 1e-3))


@given(families())
def test_uniform_soup_matches_naive_mean(models):
    assert_close_to_naive(ladle.uniform_soup(models, device="cpu"), naive_soup(models))


@given(families(min_n=2), st.lists(st.floats(0.1, 10), min_size=5, max_size=5))
def test_weights_normalise(models, weights):
    weights = weights[: len(models)]
    scaled = [3.0 * w for w in weights]
    a = ladle.uniform_soup(models, weights=weights, device="cpu")
    b = ladle.uniform_soup(models, weights=scaled, device="cpu")
    assert_close_to_naive(a, naive_soup(models, weights))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@given(families(min_n=2), st.randoms())
def test_permutation_invariance(models, rng):
    order = list(range(len(models)))
    rng.shuffle(order)
    a = ladle.uniform_soup(models, device="cpu")
    b = ladle.uniform_soup([models[i] for i in order], device="cpu")
    for key in a:
        if a[key].is_floating_point():  # float sums are reassociated: equal within rounding
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-2, atol=1e-5)


def test_a_weight_float32_cannot_hold_is_applied_in_float64(tmp_path):
    # Normalised weights [1, 1e-44]: float32 keeps 1e-44 as a subnormal of four bits, 2%
    # off, and the soup of [0] and [3e38] was 2.9427e-06, not 3e-06.
    models = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([3e38])}]
    expected = (torch.tensor([3e38]).double() * 1e-44).float()
    assert torch.equal(ladle.uniform_soup(models, weights=[1, 1e-44], device="cpu")["w"], expected)
    out = ladle.uniform_soup(models, weights=[1, 1e-44], out=tmp_path / "s.safetensors")
    assert torch.equal(ladle.load(out)["w"], expected)


@given(st.integers(1, 6), st.sampled_from([torch.bfloat16, torch.float16]), st.integers(0, 99))
def test_soup_of_identical_low_precision_models_is_that_model_exactly(n, dtype, seed):
    model = family(1, seed=seed, dtype=dtype)[0]
    soup = ladle.uniform_soup([model] * n, device="cpu")
    for key in model:
        assert torch.equal(soup[key], model[key])


@given(st.integers(1, 6), st.integers(0, 99))
def test_soup_of_identical_float32_models_is_that_model(n, seed):
    model = family(1, seed=seed)[0]
    soup = ladle.uniform_soup([model] * n, device="cpu")
    for key in model:
        torch.testing.assert_close(soup[key], model[key], rtol=2e-7, atol=0)


@given(families(), st.integers(4, 64), st.sampled_from([None, torch.float32, torch.bfloat16]))
def test_streaming_output_equals_in_memory_bit_for_bit(tmp_path_factory, models, chunk, dtype):
    directory = tmp_path_factory.mktemp("soup")
    paths = save_all(models, directory)
    in_memory = ladle.uniform_soup(models, device="cpu", dtype=dtype, chunk_bytes=chunk)
    out = ladle.uniform_soup(
        paths,
        out=directory / "out",
        device="cpu",
        dtype=dtype,
        chunk_bytes=chunk,
        max_shard_size=64,
    )
    streamed = ladle.load(out)
    assert_bit_for_bit(streamed, in_memory)


def test_chunking_does_not_change_the_result():
    models = family(3, seed=1)
    whole = ladle.uniform_soup(models, device="cpu")
    rows = ladle.uniform_soup(models, device="cpu", chunk_bytes=1)
    for key in whole:
        assert torch.equal(whole[key], rows[key])


def test_bf16_inputs_accumulate_in_float32():
    big = {"w": torch.full((4,), 256.0, dtype=torch.bfloat16)}
    one = {"w": torch.ones(4, dtype=torch.bfloat16)}
    # mean = (256 + 1 + 1 + 1 + 1) / 5 = 52; folding in bf16 would lose every +1/5 step.
    soup = ladle.uniform_soup([big, one, one, one, one], device="cpu")
    assert soup["w"].dtype == torch.bfloat16
    assert soup["w"].tolist() == [52.0] * 4


def test_mixed_float_dtypes_merge_in_float32_and_output_in_model_0_dtype():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([2.0, 4.0])}
    soup = ladle.uniform_soup([a, b], device="cpu")
    assert soup["w"].dtype == torch.bfloat16 and soup["w"].tolist() == [1.5, 3.0]
    assert ladle.uniform_soup([b, a], device="cpu")["w"].dtype == torch.float32


def test_integer_buffers_are_copied_from_model_0():
    models = family(3)
    soup = ladle.uniform_soup(models, device="cpu")
    assert soup["bn.num_batches_tracked"].item() == 100
    assert soup["bn.num_batches_tracked"].dtype == torch.int64


def test_dtype_argument_sets_output_of_floating_tensors_only():
    soup = ladle.uniform_soup(family(2), device="cpu", dtype=torch.float16)
    assert soup["layer.weight"].dtype == torch.float16
    assert soup["bn.num_batches_tracked"].dtype == torch.int64


def test_mismatched_shapes_raise_with_model_key_and_shapes():
    models = family(3)
    models[2]["layer.weight"] = torch.zeros(4, 7)
    with pytest.raises(
        ladle.IncompatibleError,
        match=r"model 2 .*'layer.weight' has shape \(4, 7\), model 0 \(.*\) has \(4, 3\)",
    ):
        ladle.uniform_soup(models)


def test_mismatched_keys_raise_listing_a_few_and_how_many():
    models = family(2)
    for key in ["x1", "x2", "x3", "x4"]:
        models[1][key] = torch.zeros(1)
    with pytest.raises(
        ladle.IncompatibleError, match=r"model 1 .*extra 4 \('x1', 'x2', 'x3', \.\.\.\)"
    ):
        ladle.uniform_soup(models)


def test_integer_versus_float_for_one_key_is_an_error():
    a, b = family(2)
    b["layer.bias"] = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ladle.IncompatibleError, match="layer.bias"):
        ladle.uniform_soup([a, b])


@pytest.mark.parametrize(
    ("weights", "match"),
    [([1.0], "weights"), ([1.0, -1.0], "weights"), ([float("nan"), 1.0], "weights")],
)
def test_bad_weights_are_value_errors_naming_the_parameter(weights, match):
    with pytest.raises(ValueError, match=match):
        ladle.uniform_soup(family(2), weights=weights)


def test_empty_model_list_is_a_value_error():
    with pytest.raises(ValueError, match="models"):
        ladle.uniform_soup([])


def test_provenance_is_stored_in_the_header(tmp_path):
    paths = []
    for i, model in enumerate(family(2)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    out = ladle.uniform_soup(paths, weights=[1, 3], out=tmp_path / "o.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ladle.method"] == "uniform_soup"
    assert meta["ladle.version"] == ladle.__version__
    assert '"weights": [1.0, 3.0]' in meta["ladle.parameters"]  # as given
    assert "m0.safetensors" in meta["ladle.inputs"] and "m1.safetensors" in meta["ladle.inputs"]


def test_output_equal_to_or_inside_an_input_is_refused(tmp_path):
    model = family(1)[0]
    ladle.save(model, tmp_path / "a")
    ladle.save(model, tmp_path / "b.safetensors")
    for out in (tmp_path / "a", tmp_path / "a" / "merged.safetensors", tmp_path / "b.safetensors"):
        with pytest.raises(ladle.LadleError, match="refusing"):
            ladle.uniform_soup(
                [tmp_path / "a", tmp_path / "b.safetensors"], out=out, overwrite=True
            )
    assert torch.equal(
        ladle.load(tmp_path / "b.safetensors")["layer.weight"], model["layer.weight"]
    )


def test_progress_accepts_a_tqdm_like_class():
    seen = []

    class Bar:
        def __init__(self, total, **kwargs):
            seen.append(("total", total))

        def update(self, n):
            seen.append(("update", n))

        def close(self):
            seen.append(("close", None))

    models = family(2)
    ladle.uniform_soup(models, progress=Bar, device="cpu")
    total = seen[0][1]
    assert total == sum(t.nbytes for m in models for t in m.values())
    assert sum(n for what, n in seen if what == "update") == total
    assert seen[-1] == ("close", None)


def test_module_inputs_work():
    torch.manual_seed(0)
    nets = [torch.nn.Linear(3, 2) for _ in range(3)]
    soup = ladle.uniform_soup(nets, device="cpu")
    expected = sum(n.weight.detach() for n in nets) / 3
    torch.testing.assert_close(soup["weight"], expected)


def test_huge_finite_weights_are_normalised_like_small_ones():
    models = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    huge = ladle.uniform_soup(models, weights=[1e308, 1e308], device="cpu")
    assert torch.equal(huge["w"], ladle.uniform_soup(models, device="cpu")["w"])
    with pytest.raises(ValueError, match="weights: expected finite weights with a non-zero sum"):
        ladle.uniform_soup(models, weights=[1e308, -1e308], device="cpu")


def test_huge_negative_weights_are_scaled_down_by_their_largest_magnitude():
    # Σ overflows: divided first by the largest |w| (1e308), not the largest w (1.0, which
    # would overflow again): [−1, −1, 1e-308], sum −2.
    from ladle.methods.soup import normalized_weights

    assert normalized_weights([-1e308, -1e308, 1.0], 3) == [0.5, 0.5, -5e-309]
    models = [{"w": torch.tensor([2.0])}, {"w": torch.tensor([4.0])}, {"w": torch.tensor([8.0])}]
    merged = ladle.uniform_soup(models, weights=[-1e308, -1e308, 1.0], device="cpu")
    assert merged["w"].tolist() == [3.0]


def test_weights_whose_sum_is_tiny_beside_them_are_a_value_error_not_an_overflow():
    # 1e300 / 1e-300 passes float's range: the weights became [1.0, inf, -inf], and the
    # merge failed on its output, "overflow float32 ... although every input is finite".
    models = [{"w": torch.ones(2)}] * 3
    with pytest.raises(ValueError) as info:
        ladle.uniform_soup(models, weights=[1e-300, 1e300, -1e300], device="cpu")
    assert str(info.value) == (
        "weights: [1e-300, 1e+300, -1e+300] divided by their sum (1e-300) pass float's range; "
        "expected weights whose sum is not nearly zero beside them"
    )


# Gaps found by mutation testing: each test below fails on a small change to the code.


@pytest.mark.parametrize(
    "weights", [[float("inf"), 1.0], [1.0, float("nan")], [float("-inf"), float("inf")]]
)
def test_a_weight_that_is_no_finite_number_is_refused_before_merging(weights):
    # Refused by the check of the weights, not by the merge's check of its results (an
    # infinite weight made every merged value NaN: "overflow float32 ... lower the scale or
    # weights"), nor by math.fsum ("-inf + inf in fsum").
    with pytest.raises(ValueError) as info:
        ladle.uniform_soup(family(2), weights=weights, device="cpu")
    assert type(info.value) is ValueError
    assert str(info.value) == (
        f"weights: expected finite weights with a non-zero sum, found {weights}"
    )


@pytest.mark.parametrize("weights", [None, []])
def test_normalized_weights_of_no_models_is_a_value_error_naming_the_models(weights):
    # Not a ZeroDivisionError (1/0 for uniform weights), nor the weights' message (an empty
    # sum is 0).
    from ladle.methods.soup import normalized_weights

    with pytest.raises(ValueError) as info:
        normalized_weights(weights, 0)
    assert str(info.value) == "models: expected at least one model, found none"


def test_weights_are_divided_by_their_sum_not_multiplied_by_its_inverse():
    # 3/10 is 0.3 and 7/10 is 0.7 (the doubles nearest), while 3·(1/10) and 7·(1/10) round to
    # 0.30000000000000004 and 0.7000000000000001.
    from ladle.methods.soup import normalized_weights

    assert normalized_weights([3, 7], 2) == [0.3, 0.7]
    assert [3 * (1 / 10), 7 * (1 / 10)] != [0.3, 0.7]


def test_a_nan_in_model_0_of_weight_zero_is_still_an_error():
    # 0·NaN is NaN: the fold starts from model 0 times its weight, 0 too, so the NaN shows
    # in the result and is reported with the model and key (test_safety.py: later models).
    models = [{"w": torch.ones(3)}, {"w": torch.ones(3)}]
    models[0]["w"][1] = float("nan")
    with pytest.raises(ladle.NonFiniteError, match=r"model 0 .*'w'"):
        ladle.uniform_soup(models, weights=[0.0, 1.0], device="cpu")


def test_refused_weights_leave_no_reference_cycle_holding_the_callers_frames():
    # The error was kept in a local and raised: a cycle through normalized_weights' frame
    # kept every caller's frame alive until the collector ran (ladle.distributed's process
    # group outlived destroy_process_group, and the process aborted at exit now and then).
    import gc
    import weakref

    class Marker:
        pass

    def call(marker: Marker) -> None:
        ladle.uniform_soup([{"w": torch.ones(1)}] * 2, weights=[1, -1])

    marker = Marker()
    alive = weakref.ref(marker)
    gc.disable()
    try:
        with pytest.raises(ValueError, match="non-zero sum"):
            call(marker)
        del marker
        assert alive() is None
    finally:
        gc.enable()


def test_weights_whose_sum_passes_floats_range_still_normalise():
    # 3 × 1.7e308 is inf, and so is half of it: the weights are scaled by the largest.
    assert normalized_weights([1.7e308] * 3, 3) == [1 / 3] * 3
    merged = ladle.uniform_soup([{"w": torch.tensor([3.0])}] * 3, weights=[1.7e308] * 3)
    assert merged["w"].tolist() == [3.0]
