from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from ladle.testing import (
    BUFFER_KEY,
    FLOAT_DTYPES,
    KEY_NAMES,
    assert_state_dicts_close,
    default_tolerances,
    model_families,
    state_dicts,
)


def message_of(actual, expected, **kwargs) -> str:
    with pytest.raises(AssertionError) as info:
        assert_state_dicts_close(actual, expected, **kwargs)
    return str(info.value)


def test_equal_state_dicts_pass_including_integer_and_inf_entries():
    sd = {"w": torch.tensor([1.0, float("inf"), -float("inf")]), "n": torch.tensor(3)}
    assert_state_dicts_close(sd, {k: v.clone() for k, v in sd.items()})


def test_differences_within_the_dtype_default_tolerance_pass():
    # float32: atol 1e-5 + rtol 1.3e-6·|x|; bfloat16: rtol 1.6e-2.
    assert_state_dicts_close({"w": torch.tensor([100.0001])}, {"w": torch.tensor([100.0])})
    a = torch.tensor([1.0], dtype=torch.bfloat16)
    assert_state_dicts_close({"w": a + a * 2**-7}, {"w": a})


def test_difference_beyond_the_default_tolerance_fails():
    message_of({"w": torch.tensor([100.001])}, {"w": torch.tensor([100.0])})


def test_failure_lists_missing_and_extra_keys_with_counts():
    expected = {k: torch.zeros(1) for k in ["a", "b", "c", "d", "e", "f", "g"]}
    actual = {"a": torch.zeros(1), "x": torch.zeros(1)}
    text = message_of(actual, expected)
    assert "missing keys (in expected, not in actual): 6 ('b', 'c', 'd', 'e', 'f', ...)" in text
    assert "extra keys (in actual, not in expected): 1 ('x')" in text


def test_failure_names_dtype_and_shape_differences():
    text = message_of(
        {"w": torch.zeros(2, dtype=torch.float16), "v": torch.zeros(2, 3)},
        {"w": torch.zeros(2), "v": torch.zeros(3, 2)},
    )
    assert "'w': dtype torch.float16, expected torch.float32" in text
    assert "'v': shape (2, 3), expected (3, 2)" in text


def test_failure_shows_the_worst_five_keys_with_max_abs_and_rel_error_worst_first():
    expected = {f"k{i}": torch.tensor([1.0, 2.0, 4.0]) for i in range(7)}
    actual = {f"k{i}": torch.tensor([1.0, 2.0, 4.0 + i]) for i in range(7)}
    text = message_of(actual, expected)
    lines = text.splitlines()
    assert lines[0] == "state dicts are not close:"
    assert lines[1] == "  values differ in 6 keys, worst first:"
    assert [re.match(r"  '(k\d)'", line).group(1) for line in lines[2:7]] == [
        "k6",
        "k5",
        "k4",
        "k3",
        "k2",
    ]
    assert lines[2] == (
        "  'k6': 1 of 3 elements differ; max abs error 6, max rel error 1.5 "
        "(rtol=1.3e-06, atol=1e-05); worst at index (2,): actual 10, expected 4"
    )
    assert lines[7] == "  ... and 1 more keys"


def test_integer_tensors_must_match_exactly_and_report_the_index():
    text = message_of({"n": torch.tensor([[1, 2], [3, 5]])}, {"n": torch.tensor([[1, 2], [3, 4]])})
    assert (
        "'n': 1 of 4 elements differ; max abs error 1, max rel error 0.25 (rtol=0, atol=0)" in text
    )
    assert "worst at index (1, 1): actual 5, expected 4" in text


def test_large_int64_values_are_compared_exactly():
    big = 2**62
    message_of({"n": torch.tensor(big + 1)}, {"n": torch.tensor(big)})


def test_nan_fails_unless_equal_nan():
    nan = {"w": torch.tensor([float("nan"), 1.0])}
    assert "1 of 2 elements differ" in message_of(nan, {"w": torch.tensor([0.0, 1.0])})
    message_of(nan, {k: v.clone() for k, v in nan.items()})
    assert_state_dicts_close(nan, {k: v.clone() for k, v in nan.items()}, equal_nan=True)


def test_explicit_tolerances_override_the_defaults():
    assert_state_dicts_close({"w": torch.tensor([1.5])}, {"w": torch.tensor([1.0])}, atol=0.5)
    text = message_of({"w": torch.tensor([1.5])}, {"w": torch.tensor([1.0])}, rtol=0.1, atol=0)
    assert "(rtol=0.1, atol=0)" in text


def test_bad_tolerances_are_value_errors_naming_the_parameter():
    sd = {"w": torch.zeros(1)}
    with pytest.raises(ValueError, match="rtol"):
        assert_state_dicts_close(sd, sd, rtol=-1)
    with pytest.raises(ValueError, match="atol"):
        assert_state_dicts_close(sd, sd, atol=float("nan"))


def test_paths_are_loaded(tmp_path):
    sd = {"w": torch.tensor([1.0, 2.0])}
    save_file(sd, tmp_path / "a.safetensors")
    assert_state_dicts_close(tmp_path / "a.safetensors", sd)
    assert "'w'" in message_of(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 3.0])})


def test_default_tolerances_are_those_of_torch_testing():
    assert default_tolerances(torch.float32) == (1.3e-6, 1e-5)
    assert default_tolerances(torch.float16) == (1e-3, 1e-5)
    assert default_tolerances(torch.int64) == (0.0, 0.0)


@given(state_dicts())
def test_state_dicts_have_one_float_dtype_default_keys_and_an_int_buffer(sd):
    floats = {k: v for k, v in sd.items() if k != BUFFER_KEY}
    assert 1 <= len(floats) <= 4 and set(floats) <= set(KEY_NAMES)
    assert len({v.dtype for v in floats.values()}) == 1
    assert next(iter(floats.values())).dtype in FLOAT_DTYPES
    assert all(v.dim() <= 2 and max(v.shape, default=1) <= 4 for v in floats.values())
    assert all(bool(torch.isfinite(v).all()) and v.abs().max() <= 10 for v in floats.values())
    assert sd[BUFFER_KEY].dtype == torch.int64 and sd[BUFFER_KEY].dim() == 0


@given(state_dicts(shapes={"a": (2, 3), "b": ()}, dtypes=[torch.float64], buffers=False))
def test_state_dicts_with_fixed_shapes_and_dtype(sd):
    assert list(sd) == ["a", "b"]
    assert sd["a"].shape == (2, 3) and sd["b"].shape == ()
    assert sd["a"].dtype == sd["b"].dtype == torch.float64


@given(state_dicts(keys=["x", "y"], max_side=2, bound=0.5))
def test_state_dicts_with_given_keys_use_all_of_them(sd):
    assert list(sd) == ["x", "y", BUFFER_KEY]
    assert all(v.abs().max() <= 0.5 for k, v in sd.items() if k != BUFFER_KEY)


@given(model_families(n=st.integers(1, 4)))
def test_model_families_share_keys_shapes_and_dtype(family):
    base, models = family
    assert 1 <= len(models) <= 4
    for model in models:
        assert list(model) == list(base)
        for key in base:
            assert model[key].shape == base[key].shape
            assert model[key].dtype == base[key].dtype
    assert base[BUFFER_KEY].dtype == torch.int64
    # Fine-tunes are the base plus a task vector of entries in [-10, 10] (then rounded).
    for model in models:
        for key, value in base.items():
            if key != BUFFER_KEY:
                assert (model[key].float() - value.float()).abs().max() <= 10.1


@given(model_families(n=3, dtypes=[torch.bfloat16], buffers=False))
def test_model_families_respect_n_dtypes_and_buffers(family):
    base, models = family
    assert len(models) == 3 and BUFFER_KEY not in base
    assert all(v.dtype == torch.bfloat16 for v in base.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtypes": []}, "dtypes"),
        ({"dtypes": [torch.int64]}, "dtypes"),
        ({"max_keys": 0}, "max_keys"),
        ({"max_side": 0}, "max_side"),
        ({"bound": 0}, "bound"),
        ({"keys": ["a", "a"]}, "keys"),
        ({"keys": [BUFFER_KEY]}, "keys"),
    ],
)
def test_bad_strategy_arguments_are_value_errors_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        state_dicts(**kwargs)
    with pytest.raises(ValueError, match=match):
        model_families(**kwargs)


def test_model_families_n_below_one_is_a_value_error():
    with pytest.raises(ValueError, match="n:"):
        model_families(n=0)


@pytest.mark.slow
def test_ladle_imports_without_hypothesis():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import ladle, ladle.testing, torch\n"
        "ladle.testing.assert_state_dicts_close({'w': torch.ones(1)}, {'w': torch.ones(1)})\n"
        "try:\n    ladle.testing.state_dicts()\nexcept ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pip install hypothesis" in result.stdout
