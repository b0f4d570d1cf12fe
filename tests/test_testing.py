from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import ladle
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
    # Both at once: the dtype was left out where the shape differed too
    text = message_of({"w": torch.zeros(3)}, {"w": torch.zeros(1, 3, dtype=torch.float16)})
    assert text == (
        "state dicts are not close:\n"
        "  'w': dtype torch.float32, expected torch.float16\n"
        "  'w': shape (3,), expected (1, 3)"
    )


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
    assert lines[7] == "  ... and 1 more key"


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


def test_a_nan_is_counted_apart_and_does_not_hide_the_other_errors():
    actual = {"w": torch.tensor([math.nan, 2.5, 1.0]), "v": torch.tensor([1.0, math.nan])}
    expected = {"w": torch.tensor([1.0, 2.0, 1.0]), "v": torch.tensor([math.nan, 2.0])}
    with pytest.raises(AssertionError) as raised:
        assert_state_dicts_close(actual, expected)
    lines = str(raised.value).splitlines()
    # |2.5 − 2| = 0.5 is the largest error without a NaN: the NaN made both maxima NaN
    (w,) = [line for line in lines if line.startswith("  'w'")]
    assert "2 of 3 elements differ (1 NaN); max abs error 0.5, max rel error 0.25" in w
    (v,) = [line for line in lines if line.startswith("  'v'")]
    assert "2 of 2 elements differ (2 NaN); max abs error nan, max rel error nan" in v


def test_values_that_are_not_tensors_are_a_type_error_naming_the_side_and_key():
    with pytest.raises(TypeError, match=r"actual: expected a tensor for key 'w', found float"):
        assert_state_dicts_close({"w": 1.0}, {"w": torch.ones(())})
    with pytest.raises(TypeError, match=r"expected: expected a tensor for key 'b', found list"):
        assert_state_dicts_close({"b": torch.ones(2)}, {"b": [1.0, 1.0]})


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


@pytest.mark.parametrize(
    ("tolerances", "message"),
    [
        ({"rtol": True}, "rtol: expected a number, found bool"),
        ({"atol": "1e-3"}, "atol: expected a number, found str"),
        ({"atol": torch.ones(2)}, "atol: expected a number, found a tensor of shape (2,)"),
    ],
)
def test_tolerances_that_are_no_number_are_type_errors_naming_them(tolerances, message):
    # Before: rtol=True compared as rtol=1 (the check passed nearly anything), a string
    # failed in a bare comparison naming neither tolerance.
    sd = {"w": torch.zeros(1)}
    with pytest.raises(TypeError) as err:
        assert_state_dicts_close(sd, sd, **tolerances)
    assert str(err.value) == message


def test_paths_are_loaded(tmp_path):
    sd = {"w": torch.tensor([1.0, 2.0])}
    save_file(sd, tmp_path / "a.safetensors")
    assert_state_dicts_close(tmp_path / "a.safetensors", sd)
    assert "'w'" in message_of(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 3.0])})


def test_default_tolerances_are_those_of_torch_testing():
    assert default_tolerances(torch.float32) == (1.3e-6, 1e-5)
    assert default_tolerances(torch.float16) == (1e-3, 1e-5)
    assert default_tolerances(torch.bfloat16) == (1.6e-2, 1e-5)
    assert default_tolerances(torch.float64) == (1e-7, 1e-7)
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


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_state_dicts_and_families_draw_each_part_within_the_bound(dtype):
    @given(model_families(n=2, dtypes=[dtype], bound=0.5, buffers=False))
    def check(family):
        base, models = family
        for key, value in base.items():
            assert value.dtype == dtype
            parts = torch.view_as_real(value)
            assert float(parts.abs().max()) <= 0.5
            for model in models:  # the base's parts plus a task vector's, each within 0.5
                delta = torch.view_as_real(model[key]).double() - parts.double()
                assert float(delta.abs().max()) <= 0.5 + 1e-6

    @given(state_dicts(dtypes=[dtype], bound=2.0))
    def check_one(state_dict):
        for key, value in state_dict.items():
            assert value.dtype == (torch.int64 if key == BUFFER_KEY else dtype)

    check()
    check_one()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtypes": []}, "dtypes"),
        ({"dtypes": [torch.int64]}, "dtypes"),
        ({"dtypes": [torch.complex32]}, "dtypes"),
        ({"max_keys": 0}, "max_keys"),
        ({"max_side": 0}, "max_side"),
        ({"bound": 0}, "bound"),
        ({"keys": ["a", "a"]}, "keys"),
        ({"keys": [BUFFER_KEY]}, "keys"),
        ({"dtypes": [torch.float32, torch.int64]}, "dtypes"),
        ({"keys": []}, "keys"),
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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [  # AttributeError ('str' object has no attribute 'is_floating_point'), "'torch.dtype'
        # object is not iterable", keys "abc" read as 'a', 'b', 'c'
        (
            {"dtypes": ["float16"]},
            "dtypes: expected a sequence of torch dtypes, found the item 'float16'",
        ),
        (
            {"dtypes": torch.float16},
            "dtypes: expected a sequence of torch dtypes, found torch.float16 alone",
        ),
        ({"keys": "abc"}, "keys: expected a sequence of names, found 'abc' alone"),
        ({"keys": [1, 2]}, "keys: expected a sequence of names, found the item 1"),
    ],
)
def test_strategy_arguments_of_the_wrong_type_are_type_errors_naming_them(kwargs, message):
    for strategy in (state_dicts, model_families):
        with pytest.raises(TypeError) as info:
            strategy(**kwargs)
        assert str(info.value) == message


@pytest.mark.parametrize("n", [2.0, True, "2"])
def test_model_families_n_that_is_no_int_or_strategy_is_a_type_error(n):
    # 2.0 was taken for a strategy: AttributeError inside hypothesis, at the first draw
    with pytest.raises(TypeError, match=r"^n: expected an int or a strategy of ints, found "):
        model_families(n=n)


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


# Infinite entries must match exactly, whatever the tolerances.

INF = float("inf")


@pytest.mark.parametrize(
    ("actual", "expected", "shown"),
    [
        (-INF, INF, "actual -inf, expected inf"),
        (5.0, INF, "actual 5, expected inf"),
        (INF, 5.0, "actual inf, expected 5"),
        (-1e30, -INF, "actual -1.00000002e+30, expected -inf"),
    ],
)
def test_infinite_entries_must_match_an_infinity_of_the_same_sign(actual, expected, shown):
    text = message_of({"w": torch.tensor([1.0, actual])}, {"w": torch.tensor([1.0, expected])})
    assert text.splitlines()[-1] == (
        "  'w': 1 of 2 elements differ; max abs error inf, max rel error inf "
        f"(rtol=1.3e-06, atol=1e-05); worst at index (1,): {shown}"
    )


@given(
    st.floats(allow_nan=False, width=32),
    st.sampled_from([INF, -INF]),
    st.floats(0, 1e30),
    st.floats(0, 1e30),
)
def test_an_infinity_only_matches_itself_whatever_the_tolerance(value, inf, rtol, atol):
    actual, expected = {"w": torch.tensor([value])}, {"w": torch.tensor([inf])}
    if value == inf:
        assert_state_dicts_close(actual, expected, rtol=rtol, atol=atol)
    else:
        message_of(actual, expected, rtol=rtol, atol=atol)
        message_of(expected, actual, rtol=rtol, atol=atol)


# Integer tensors are compared and reported exactly.


def test_integers_beyond_2_53_are_compared_and_reported_exactly():
    text = message_of({"w": torch.tensor([2**53 + 1])}, {"w": torch.tensor([2**53])})
    assert text.splitlines()[-1] == (
        "  'w': 1 of 1 elements differ; max abs error 1, max rel error 1.11022e-16 "
        "(rtol=0, atol=0); worst at index (0,): actual 9007199254740993, "
        "expected 9007199254740992"
    )


def test_integers_at_the_int64_extremes_do_not_overflow():
    low, high = -(2**63), 2**63 - 1
    text = message_of({"w": torch.tensor([low, 0])}, {"w": torch.tensor([high, 0])})
    assert text.splitlines()[-1] == (
        "  'w': 1 of 2 elements differ; max abs error 18446744073709551615, max rel error 2 "
        "(rtol=0, atol=0); worst at index (0,): actual -9223372036854775808, "
        "expected 9223372036854775807"
    )


def test_integer_tolerances_are_applied_to_the_exact_difference():
    big = 2**60
    a, e = {"n": torch.tensor([big + 1])}, {"n": torch.tensor([big])}
    assert_state_dicts_close(a, e, atol=1)
    assert "max abs error 1," in message_of(a, e, atol=0.5)


@given(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1))
def test_int64_tensors_are_close_exactly_when_equal(x, y):
    actual, expected = {"n": torch.tensor([x])}, {"n": torch.tensor([y])}
    if x == y:
        assert_state_dicts_close(actual, expected)
    else:
        text = message_of(actual, expected)
        assert f"max abs error {abs(x - y)}," in text
        assert text.endswith(f"actual {x}, expected {y}")


def test_uint64_and_bool_tensors_are_compared_exactly():
    top = torch.tensor([2**64 - 1, 7], dtype=torch.uint64)
    below = torch.tensor([2**64 - 2, 6], dtype=torch.uint64)
    text = message_of({"u": top}, {"u": below})
    assert text.splitlines()[-1] == (
        "  'u': 2 of 2 elements differ; max abs error 1, max rel error 0.166667 "
        "(rtol=0, atol=0); worst at index (0,): actual 18446744073709551615, "
        "expected 18446744073709551614"
    )
    assert_state_dicts_close({"u": top}, {"u": top.clone()})
    text = message_of({"b": torch.tensor([[True, False]])}, {"b": torch.tensor([[True, True]])})
    assert text.endswith("worst at index (0, 1): actual 0, expected 1")


# Complex tensors are compared by the magnitude of the difference and shown in full.


def test_complex_values_are_compared_by_magnitude_and_shown_in_full():
    text = message_of({"z": torch.tensor([1 + 1j, 2j])}, {"z": torch.tensor([1 + 0j, 2j])})
    assert text.splitlines()[-1] == (
        "  'z': 1 of 2 elements differ; max abs error 1, max rel error 1 "
        "(rtol=1.3e-06, atol=1e-05); worst at index (0,): actual 1+1j, expected 1+0j"
    )
    # |(3+4j) − 0| = 5: within atol=5, beyond atol=4.9 (not checked part by part).
    assert_state_dicts_close({"z": torch.tensor([3 + 4j])}, {"z": torch.tensor([0j])}, atol=5)
    message_of({"z": torch.tensor([3 + 4j])}, {"z": torch.tensor([0j])}, atol=4.9)


def test_complex_default_tolerances_are_those_of_torch_testing():
    assert default_tolerances(torch.complex64) == (1.3e-6, 1e-5)
    assert default_tolerances(torch.complex128) == (1e-7, 1e-7)
    assert default_tolerances(torch.complex32) == (1e-3, 1e-5)
    z = torch.tensor([1 + 1j])
    assert_state_dicts_close({"z": z + 1e-6}, {"z": z})


def test_complex_infinities_and_nans():
    inf = torch.tensor([complex(INF, 0)])
    assert_state_dicts_close({"z": inf}, {"z": inf.clone()})
    message_of({"z": torch.tensor([complex(5, 0)])}, {"z": inf}, rtol=1)
    nan = torch.tensor([complex(float("nan"), 1)])
    message_of({"z": nan}, {"z": nan.clone()})
    assert_state_dicts_close({"z": nan}, {"z": nan.clone()}, equal_nan=True)


def test_complex_errors_leave_out_elements_with_a_nan_and_keep_infinite_ones():
    nan = float("nan")
    # The only differing element holds a NaN: its error (|−inf + NaNj| is inf) is left out.
    text = message_of(
        {"z": torch.tensor([0j, complex(0, nan)])}, {"z": torch.tensor([0j, complex(INF, 0)])}
    )
    assert "differ (1 NaN); max abs error nan, max rel error nan " in text
    # |0 − (inf + infj)| is inf (torch's complex subtraction gives NaN + NaNj).
    text = message_of({"z": torch.tensor([0j, 1 + 0j])}, {"z": torch.tensor([INF * (1 + 1j), 1])})
    assert "1 of 2 elements differ; max abs error inf, max rel error inf " in text
    # A finite error beside a NaN element is the maximum, as for real tensors.
    text = message_of({"z": torch.tensor([complex(nan, 0), 3 + 4j])}, {"z": torch.tensor([0j, 0j])})
    assert "2 of 2 elements differ (1 NaN); max abs error 5, max rel error inf " in text


# bound: any positive finite bound works, rounded down; values stay finite and within it.


@pytest.mark.parametrize(
    ("dtype", "bound"),
    [
        (dtype, bound)
        for dtype in [torch.float32, torch.float64, torch.bfloat16, torch.float16]
        for bound in [0.1, 1e-3, 1 / 3, 1e-7 if dtype == torch.float16 else 1e-30]
    ],
)
def test_state_dicts_accept_any_bound_and_stay_within_it(dtype, bound):
    @given(state_dicts(keys=["w"], dtypes=[dtype], bound=bound, buffers=False))
    def check(sd):
        assert sd["w"].dtype == dtype
        assert bool(torch.isfinite(sd["w"]).all())
        assert float(sd["w"].abs().max()) <= bound

    check()


@pytest.mark.parametrize(
    ("dtype", "bound"),
    [(torch.float16, 65504.0), (torch.bfloat16, 3.3895313892515355e38), (torch.float32, 3e38)],
)
def test_state_dicts_up_to_the_largest_finite_value_stay_finite(dtype, bound):
    @given(state_dicts(shapes={"w": (4,)}, dtypes=[dtype], bound=bound, buffers=False))
    def check(sd):
        assert bool(torch.isfinite(sd["w"]).all())
        assert float(sd["w"].abs().max()) <= bound

    check()


@pytest.mark.parametrize("bound", [0.1, 1e-3, 30000.0])
def test_model_families_accept_any_bound_and_stay_finite(bound):
    @given(model_families(n=2, keys=["w"], dtypes=[torch.float16], bound=bound, buffers=False))
    def check(family):
        base, models = family
        for model in [base, *models]:
            assert bool(torch.isfinite(model["w"]).all())
        assert float(base["w"].abs().max()) <= bound
        for model in models:
            assert float((model["w"].float() - base["w"].float()).abs().max()) <= 2 * bound

    check()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bound": float("inf")}, "bound: expected a finite number > 0, found inf"),
        ({"bound": float("nan")}, "bound: expected a finite number > 0, found nan"),
        ({"bound": -1.0}, "bound: expected a finite number > 0, found -1.0"),
        (
            {"bound": 1e39, "dtypes": [torch.float64]},
            "bound: expected at most 3.40282347e+38 (the largest finite torch.float32, "
            "in which values are drawn), found 1e+39",
        ),
        (
            {"bound": 1e5, "dtypes": [torch.float32, torch.float16]},
            "bound: expected at most 65504 (the largest finite torch.float16), found 100000.0",
        ),
        (
            {"bound": 1e-10, "dtypes": [torch.float16]},
            "bound: expected at least 5.96046448e-08 (the smallest positive torch.float16), "
            "found 1e-10",
        ),
    ],
)
def test_bad_bounds_are_value_errors_with_the_limit(kwargs, message):
    with pytest.raises(ValueError) as info:
        state_dicts(**kwargs)
    assert str(info.value) == message


def test_model_families_bound_leaves_room_for_base_plus_task_vector():
    with pytest.raises(ValueError) as info:
        model_families(dtypes=[torch.float16], bound=40000)
    assert str(info.value) == (
        "bound: expected at most 32752 (half the largest finite torch.float16, as a fine-tune "
        "is the base plus a task vector), found 40000.0"
    )
    model_families(dtypes=[torch.float16], bound=32752)


# shapes: like keys, must not use the buffer's name.


def test_shapes_with_the_buffer_key_are_a_value_error():
    message = (
        f"shapes: expected keys other than {BUFFER_KEY!r}, found ['w', 'bn.num_batches_tracked']"
    )
    for strategy in (state_dicts, model_families):
        with pytest.raises(ValueError) as info:
            strategy(shapes={"w": (2,), BUFFER_KEY: (1,)})
        assert str(info.value) == message
        with pytest.raises(ValueError):
            strategy(shapes={BUFFER_KEY: ()}, buffers=False)


def test_keys_infinitely_beyond_tolerance_rank_by_their_largest_error():
    # Both are infinitely beyond tolerance: the infinite error outranks the error of 1 (they
    # tied, and came in key order).
    text = message_of(
        {"n": torch.tensor(2**53 + 1), "w": torch.tensor([5.0, INF])},
        {"n": torch.tensor(2**53), "w": torch.tensor([INF, INF])},
    )
    assert [line[:5] for line in text.splitlines()[2:]] == ["  'w'", "  'n'"]


@given(model_families(n=st.integers(1, 4)))
def test_model_families_buffers_are_distinct_so_provenance_is_testable(family):
    base, models = family
    values = [int(m[BUFFER_KEY]) for m in [base, *models]]
    assert len(set(values)) == len(values)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@given(data=st.data())
def test_float8_draws_stay_within_a_bound_float8_cannot_hold(dtype, data):
    state = data.draw(state_dicts(dtypes=[dtype], bound=0.1))
    for tensor in state.values():
        if tensor.is_floating_point() and tensor.numel():
            assert float(tensor.float().abs().max()) <= 0.1


def test_drawn_shapes_are_mostly_vectors_and_matrices_with_a_0d_tensor_now_and_then():
    from hypothesis import settings

    dims: list[int] = []

    @settings(max_examples=300, database=None, derandomize=True)
    @given(state_dicts(buffers=False))
    def collect(sd):
        dims.extend(v.dim() for v in sd.values())

    collect()
    share = dims.count(0) / len(dims)
    assert 0 < share < 0.2, share  # one_of(shapes, ()) drew 0-d as often as vectors (~38%)


def test_default_draws_reach_every_float_dtype_and_opposite_task_vectors():
    # Property tests built on the defaults rely on them to reach the cases that matter:
    # bfloat16 and float16 besides float32, and fine-tunes that move an entry in opposite
    # directions (the sign conflicts TIES resolves).
    from hypothesis import settings

    dtypes: dict[str, set[torch.dtype]] = {"state_dicts": set(), "model_families": set()}
    conflicts = []

    @settings(max_examples=200, database=None, derandomize=True)
    @given(state_dicts(buffers=False), model_families(n=2, buffers=False))
    def collect(sd, family):
        dtypes["state_dicts"].update(v.dtype for v in sd.values())
        base, (one, two) = family
        dtypes["model_families"].update(v.dtype for v in base.values())
        for key, value in base.items():
            first, second = one[key].float() - value.float(), two[key].float() - value.float()
            conflicts.append(bool((first * second < 0).any()))

    collect()
    assert dtypes == {key: set(FLOAT_DTYPES) for key in dtypes}
    assert 0.2 < sum(conflicts) / len(conflicts) < 1, sum(conflicts) / len(conflicts)


@pytest.mark.parametrize(
    "shapes, shown",
    [({"w": (-1, 2)}, r"\(-1, 2\)"), ({"w": (2.5,)}, r"\(2.5,\)"), ({}, r"\{\}")],
)
def test_bad_fixed_shapes_are_value_errors_when_the_strategy_is_built(shapes, shown):
    # A negative side was "negative dimensions are not allowed" from numpy, mid-test, naming
    # no parameter; an empty mapping drew buffer-only dicts, where keys=[] is refused.
    for strategy in (state_dicts, model_families):
        with pytest.raises(ValueError, match=rf"shapes: expected .*, found .*{shown}"):
            strategy(shapes=shapes)
    from hypothesis import find

    empty = find(state_dicts(shapes={"w": (0, 3)}), lambda sd: True)  # empty tensors are fine
    assert empty["w"].shape == (0, 3)


@pytest.mark.parametrize("drawn", [2.0, True])
def test_model_families_with_a_count_strategy_drawing_no_int_is_a_type_error(drawn):
    # 2.0 raised range()'s bare TypeError, naming no argument; True drew one fine-tune.
    from hypothesis import settings

    @settings(max_examples=1, database=None)
    @given(model_families(n=st.just(drawn)))
    def check(family):
        pass

    with pytest.raises(TypeError) as info:
        check()
    assert str(info.value) == f"n: expected a strategy of ints, drew {drawn!r} from just({drawn!r})"


def test_model_families_with_a_count_strategy_drawing_below_one_is_a_value_error():
    from hypothesis import settings

    @settings(max_examples=5, database=None)
    @given(model_families(n=st.just(0)))
    def check(family):
        pass  # drew (base, []): not the "n fine-tunes" asked for

    with pytest.raises(ValueError, match=r"n: expected at least 1 fine-tune, drew 0"):
        check()


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_keys_whose_dtypes_differ_are_compared_with_the_looser_tolerance_and_reported():
    # float16 1.0005 is 1.00048828125: within float16's rtol 1e-3 of 1.0, not float32's
    # 1.3e-6. Only the dtype is wrong, and it is all the message says.
    text = message_of(
        {"w": torch.tensor([1.0005], dtype=torch.float16)}, {"w": torch.tensor([1.0])}
    )
    assert text == "state dicts are not close:\n  'w': dtype torch.float16, expected torch.float32"
    # A key whose dtype differs still has its values compared: both problems are listed.
    text = message_of({"w": torch.tensor([2.0], dtype=torch.float16)}, {"w": torch.tensor([1.0])})
    assert text.splitlines()[1:] == [
        "  'w': dtype torch.float16, expected torch.float32",
        "  values differ in 1 key, worst first:",
        "  'w': 1 of 1 elements differ; max abs error 1, max rel error 1 (rtol=0.001, "
        "atol=1e-05); worst at index (0,): actual 2, expected 1",
    ]


def test_exactly_five_differing_or_missing_keys_are_all_shown_with_no_more_line():
    expected = {f"k{i}": torch.tensor([1.0]) for i in range(5)}
    actual = {f"k{i}": torch.tensor([2.0 + i]) for i in range(5)}
    lines = message_of(actual, expected).splitlines()
    assert lines[1] == "  values differ in 5 keys, worst first:"
    assert [line[:6] for line in lines[2:]] == ["  'k4'", "  'k3'", "  'k2'", "  'k1'", "  'k0'"]
    text = message_of({}, expected)
    assert text.splitlines()[1] == (
        "  missing keys (in expected, not in actual): 5 ('k0', 'k1', 'k2', 'k3', 'k4')"
    )


def test_equal_nan_matches_a_nan_only_with_a_nan_at_the_same_place():
    nan = math.nan
    for actual, expected in [([nan, 1.0], [1.0, 1.0]), ([1.0, 1.0], [1.0, nan])]:
        text = message_of(
            {"w": torch.tensor(actual)}, {"w": torch.tensor(expected)}, equal_nan=True
        )
        assert "'w': 1 of 2 elements differ (1 NaN)" in text
    text = message_of(
        {"w": torch.tensor([nan, 1.0])}, {"w": torch.tensor([1.0, nan])}, equal_nan=True
    )
    assert "'w': 2 of 2 elements differ (2 NaN)" in text


def test_a_nan_is_the_worst_element_and_ranks_its_key_first():
    # A NaN is infinitely far off: it is the worst element shown, and a key with only a NaN
    # ranks before a key that is off by a finite amount.
    text = message_of(
        {"a": torch.tensor([1.0, 100.0]), "b": torch.tensor([1.0, 2.5, math.nan])},
        {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([1.0, 2.0, 1.0])},
    )
    lines = text.splitlines()
    assert lines[2] == (
        "  'b': 2 of 3 elements differ (1 NaN); max abs error 0.5, max rel error 0.25 "
        "(rtol=1.3e-06, atol=1e-05); worst at index (2,): actual nan, expected 1"
    )
    assert lines[3].startswith("  'a': 1 of 2 elements differ")


@pytest.mark.parametrize(
    ("dtype", "bound"),
    [
        (torch.float32, 0.5),
        (torch.float16, 65504.0),
        (torch.bfloat16, 0.25),
        (torch.float64, 2.0),
        (torch.float16, 2.0**-24),  # its smallest positive value: the least bound allowed
    ],
)
def test_a_bound_the_dtype_holds_exactly_is_kept_and_can_be_drawn(dtype, bound):
    # Rounded down only when the dtype cannot hold it: a bound it holds stays as it is.
    from hypothesis import find, settings

    strategy = state_dicts(shapes={"w": (3,)}, dtypes=[dtype], bound=bound, buffers=False)
    found = find(
        strategy,
        lambda sd: float(sd["w"].abs().max()) == bound,
        settings=settings(database=None, max_examples=1000),
    )
    assert float(found["w"].abs().max()) == bound


@given(model_families(n=st.integers(1, 3)))
def test_every_family_member_has_a_0d_int64_buffer(family):
    base, models = family
    for state in [base, *models]:
        assert state[BUFFER_KEY].dtype == torch.int64 and state[BUFFER_KEY].dim() == 0


def test_uint64_zero_is_compared_as_zero():
    # uint64 is read through its int64 bits: only bits < 0 (values of 2**63 and more) need
    # 2**64 added, not a zero.
    text = message_of(
        {"u": torch.tensor([0, 5], dtype=torch.uint64)},
        {"u": torch.tensor([1, 5], dtype=torch.uint64)},
    )
    assert text.splitlines()[-1] == (
        "  'u': 1 of 2 elements differ; max abs error 1, max rel error 1 (rtol=0, atol=0); "
        "worst at index (0,): actual 0, expected 1"
    )


def test_integer_max_abs_error_is_the_largest_of_the_differing_elements():
    text = message_of({"n": torch.tensor([10, 1, 3])}, {"n": torch.tensor([0, 0, 3])})
    assert "'n': 2 of 3 elements differ; max abs error 10, max rel error inf" in text


@pytest.mark.parametrize(
    ("actual", "expected", "shown"),
    [
        (torch.tensor([1 + 1j]), torch.tensor([1.0]), "actual 1+1j, expected 1+0j"),
        (torch.tensor([2.0]), torch.tensor([1 + 0j]), "actual 2+0j, expected 1+0j"),
    ],
)
def test_a_complex_key_against_a_real_one_is_compared_as_complex(actual, expected, shown):
    # Both sides widen to complex128 when either is complex: the imaginary part counts.
    text = message_of({"z": actual}, {"z": expected})
    assert text.splitlines()[1:] == [
        f"  'z': dtype {actual.dtype}, expected {expected.dtype}",
        "  values differ in 1 key, worst first:",
        "  'z': 1 of 1 elements differ; max abs error 1, max rel error 1 (rtol=1.3e-06, "
        f"atol=1e-05); worst at index (0,): {shown}",
    ]


def test_an_infinity_is_not_close_to_a_value_whose_tolerance_overflows():
    # rtol·|expected| = 1e10·1e300 is inf in float64, and inf − 1e300 ≤ inf holds.
    text = message_of(
        {"w": torch.tensor([math.inf], dtype=torch.float64)},
        {"w": torch.tensor([1e300], dtype=torch.float64)},
        rtol=1e10,
    )
    assert text.endswith("worst at index (0,): actual inf, expected 1e+300")


def test_keys_rank_by_their_error_over_atol_plus_rtol_times_expected():
    # 'a': 100 / (1e-5 + 1.3e-6·1e6) ≈ 77 tolerances off; 'b': 5e-4 / 1e-5 = 50. With rtol
    # and atol swapped ('a' ≈ 10, 'b' ≈ 385), or by max rel error alone, they swap.
    text = message_of(
        {"a": torch.tensor([1e6 + 100], dtype=torch.float64), "b": torch.tensor([5e-4])},
        {"a": torch.tensor([1e6], dtype=torch.float64), "b": torch.tensor([0.0])},
        rtol=1.3e-6,
        atol=1e-5,
    )
    assert [line[:5] for line in text.splitlines()[2:]] == ["  'a'", "  'b'"]


@pytest.mark.parametrize(
    ("actual", "expected"), [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
def test_float64_against_float32_takes_the_looser_atol_of_either_side(actual, expected):
    # 5e-6 is within float32's atol 1e-5, not float64's 1e-7: only the dtype is wrong.
    text = message_of(
        {"w": torch.tensor([5e-6], dtype=actual)}, {"w": torch.tensor([0.0], dtype=expected)}
    )
    assert text == f"state dicts are not close:\n  'w': dtype {actual}, expected {expected}"


@pytest.mark.parametrize("name", ["rtol", "atol"])
def test_infinite_tolerances_are_value_errors_naming_them(name):
    sd = {"w": torch.zeros(1)}
    with pytest.raises(ValueError) as info:
        assert_state_dicts_close(sd, sd, **{name: math.inf})
    assert str(info.value) == f"{name}: expected a finite number ≥ 0, found inf"


def test_one_key_of_sides_one_is_the_smallest_layout_allowed():
    @given(
        state_dicts(max_keys=1, max_side=1, buffers=False),
        model_families(max_keys=1, max_side=1, buffers=False),
    )
    def check(sd, family):
        for state in (sd, family[0]):
            assert len(state) == 1
            assert all(side == 1 for tensor in state.values() for side in tensor.shape)

    check()


def test_a_single_fine_tune_can_move_by_the_whole_bound():
    from hypothesis import find, settings

    strategy = model_families(
        n=1, shapes={"w": (2,)}, dtypes=[torch.float32], bound=0.5, buffers=False
    )
    base, models = find(
        strategy,
        lambda family: float((family[1][0]["w"] - family[0]["w"]).abs().max()) == 0.5,
        settings=settings(database=None, max_examples=1000),
    )
    assert len(models) == 1
    assert float((models[0]["w"] - base["w"]).abs().max()) == 0.5


def test_with_no_tolerance_the_worst_element_and_key_are_the_largest_errors():
    # Every failing ratio of error to tolerance is inf where the tolerance is 0 (integers;
    # atol=0 where 0 is expected): the first failing element and the keys' own order were
    # reported as the worst.
    message = message_of({"n": torch.tensor([1, 1000])}, {"n": torch.tensor([0, 0])})
    assert "worst at index (1,): actual 1000, expected 0" in message
    message = message_of(
        {"small": torch.tensor([1]), "big": torch.tensor([10**9])},
        {"small": torch.tensor([0]), "big": torch.tensor([0])},
    )
    assert message.index("'big'") < message.index("'small'")
    message = message_of(
        {"w": torch.tensor([1e-3, 1000.0])}, {"w": torch.tensor([0.0, 0.0])}, rtol=0.1, atol=0
    )
    assert "worst at index (1,): actual 1000, expected 0" in message


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4)])
def test_complex_strategies_draw_empty_tensors(dtype, shape):
    # view_as_complex refused the strides of an empty array: every draw raised.
    @given(
        state_dicts(shapes={"w": shape}, dtypes=[dtype], buffers=False),
        model_families(n=2, shapes={"w": shape}, dtypes=[dtype], buffers=False),
    )
    def check(sd, family):
        base, models = family
        for tensor in [sd["w"], base["w"], *(m["w"] for m in models)]:
            assert tensor.shape == shape and tensor.dtype == dtype

    check()


def _float4() -> torch.Tensor:
    return torch.ones(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)


def _quantized() -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: torch.ones(2, device="meta"), "tensor 'w' is on the meta device (no data)"),
        (lambda: torch.ones(2).to_sparse(), "tensor 'w' is torch.sparse_coo"),
        (_quantized, "tensor 'w' is quantized (torch.quint8): dequantize it first"),
    ],
    ids=["meta", "sparse", "quantized"],
)
def test_tensors_without_values_to_compare_are_named(make, problem):
    # torch's own errors: "Cannot copy out of meta tensor; no data!", "add(sparse, dense) is
    # not supported", "Creation of quantized tensor requires quantized dtype"
    with pytest.raises(ladle.CheckpointError) as info:
        assert_state_dicts_close({"w": make()}, {"w": torch.ones(2)})
    assert str(info.value) == f"actual: {problem}"


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="no packed float4")
def test_packed_float4_is_refused_by_the_assertion_and_the_strategies():
    with pytest.raises(ladle.CheckpointError, match=r"^expected: tensor 'w' packs two values"):
        assert_state_dicts_close({"w": torch.ones(1)}, {"w": _float4()})
    with pytest.raises(ValueError, match="^dtypes: "):
        state_dicts(dtypes=[torch.float4_e2m1fn_x2])


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="no float8_e8m0fnu")
@pytest.mark.parametrize("strategy", ["state_dicts", "model_families"])
def test_the_unsigned_float8_no_merge_writes_is_refused_by_the_strategies(strategy):
    # It was drawn: -3.0 stored as 4.0, 0.0 as 5.9e-39, and the merges of such a "family"
    # refused it (a test failing inside ladle, not in the code under test).
    with pytest.raises(ValueError, match=r"^dtypes: expected .* found \(torch.float8_e8m0fnu,\)"):
        getattr(ladle.testing, strategy)(dtypes=[torch.float8_e8m0fnu])


@pytest.mark.parametrize("limit", ["max_keys", "max_side"])
@pytest.mark.parametrize("value", ["3", 1.5, True])
def test_strategy_limits_that_are_no_int_are_type_errors_naming_them(limit, value):
    with pytest.raises(TypeError, match=rf"^{limit}: expected an int, found "):
        state_dicts(**{limit: value})


def test_integers_beyond_float64s_precision_are_judged_exactly_against_the_tolerance():
    # |2⁶² + 2⁵⁴ + 1 − 2⁶²| rounded to 2⁵⁴ in float64, which rtol = 2⁻⁸ of 2⁶² allows: passed.
    expected = {"n": torch.tensor([2**62], dtype=torch.int64)}
    with pytest.raises(AssertionError, match=r"max abs error 18014398509481985"):
        assert_state_dicts_close(
            {"n": torch.tensor([2**62 + 2**54 + 1])}, expected, rtol=2**-8, atol=0
        )
    assert_state_dicts_close({"n": torch.tensor([2**62 + 2**54])}, expected, rtol=2**-8, atol=0)
    with pytest.raises(AssertionError, match=r"max abs error 9007199254740993"):
        assert_state_dicts_close(
            {"n": torch.tensor([2**53 + 1])}, {"n": torch.tensor([0])}, rtol=0, atol=2.0**53
        )


def test_a_key_whose_worst_error_is_nan_is_listed_first_and_hides_no_larger_error():
    # NaN in the sort key left the order undefined: 'big' (error 5) came after 'small' (1).
    actual = {
        "small": torch.tensor([1.0]),
        "nan": torch.tensor([math.nan]),
        "big": torch.tensor([5.0]),
    }
    expected = {key: torch.zeros(1) for key in actual}
    with pytest.raises(AssertionError) as info:
        assert_state_dicts_close(actual, expected, rtol=0, atol=0)
    listed = [line.split("'")[1] for line in str(info.value).splitlines()[2:]]
    assert listed == ["nan", "big", "small"]


@pytest.mark.parametrize("strategy", [state_dicts, model_families])
@pytest.mark.parametrize("shape", [3, None])
def test_a_shape_that_is_no_sequence_is_a_type_error_naming_shapes(strategy, shape):
    with pytest.raises(TypeError, match=r"^shapes: expected a sequence of sides for key 'w'"):
        strategy(shapes={"w": shape})


# Found by mutation testing: boundaries of |actual − expected| ≤ atol + rtol·|expected|.


def test_the_relative_tolerance_is_of_the_expected_value():
    # |2 − 1| = 1 > 0.5·|1|, though ≤ 0.5·|2|.
    one, two = {"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}
    message_of(two, one, rtol=0.5, atol=0.0)
    assert_state_dicts_close(one, two, rtol=0.5, atol=0.0)


def test_an_integer_difference_equal_to_the_tolerance_passes():
    assert_state_dicts_close({"n": torch.tensor([3])}, {"n": torch.tensor([1])}, rtol=0, atol=2.0)
    message_of({"n": torch.tensor([4])}, {"n": torch.tensor([1])}, rtol=0, atol=2.0)


def test_integers_beyond_float64s_precision_are_judged_exactly_by_their_expected_size():
    # expected 2⁵⁴ + 6 (2⁵⁴ + 8 in float64), rtol 0.25: the bound is 2⁵² + 1.5 exactly (2⁵² + 2
    # in float64), so a difference of 2⁵² + 2 fails.
    expected = 2**54 + 6
    actual = {"n": torch.tensor([expected - (2**52 + 2)])}
    message_of(actual, {"n": torch.tensor([expected])}, rtol=0.25, atol=0)


def test_the_strategies_annotations_resolve_at_run_time():
    # SearchStrategy was imported for type checkers alone: typing.get_type_hints (and the
    # documentation and runtime type-checking tools built on it) failed with a NameError.
    import typing

    from hypothesis.strategies import SearchStrategy

    for strategy in (ladle.testing.state_dicts, ladle.testing.model_families):
        returned = typing.get_type_hints(strategy)["return"]
        assert typing.get_origin(returned) is SearchStrategy


def test_complex_elements_with_an_equal_infinite_part_report_the_other_part_s_error():
    # hypot(inf − inf, 1 − 2) was NaN: "max abs error nan" for elements holding no NaN.
    inf = float("inf")
    with pytest.raises(AssertionError, match=r"max abs error 1, max rel error 0 "):
        assert_state_dicts_close(
            {"w": torch.tensor([complex(inf, 1)])}, {"w": torch.tensor([complex(inf, 2)])}
        )


def test_an_error_beside_an_infinity_ranks_first_not_last():
    # inf+0j against inf+1e6j fails, but its ratio to the tolerance (rtol·inf) was 0: the key
    # ranked below every other failing key, past the five shown. Its relative error is 0 (1e6
    # of inf): it fails as infinities do, unless equal.
    inf = math.inf
    actual = {f"k{i}": torch.tensor([1.0]) for i in range(5)}
    expected = {f"k{i}": torch.tensor([1.0 + 2e-5 * (i + 1)]) for i in range(5)}
    actual["z"] = torch.tensor([complex(inf, 0.0)])
    expected["z"] = torch.tensor([complex(inf, 1e6)])
    lines = message_of(actual, expected).splitlines()
    assert lines[2] == (
        "  'z': 1 of 1 elements differ; max abs error 1e+06, max rel error 0 "
        "(rtol=1.3e-06, atol=1e-05); worst at index (0,): actual inf+0j, expected inf+1000000j"
    )
    assert lines[-1] == "  ... and 1 more key"


def test_a_difference_past_float64s_range_fails_whatever_the_tolerance():
    # |-1.5e308 − 1e308| = 2.5e308 > 1.8·1e308, but both were inf in float64, and inf ≤ inf.
    actual, expected = (
        {"w": torch.tensor([-1.5e308], dtype=torch.float64)},
        {"w": torch.tensor([1e308], dtype=torch.float64)},
    )
    with pytest.raises(AssertionError):
        torch.testing.assert_close(actual["w"], expected["w"], rtol=1.8, atol=0)  # as torch
    assert message_of(actual, expected, rtol=1.8, atol=0).splitlines()[2] == (
        "  'w': 1 of 1 elements differ; max abs error inf, max rel error inf (rtol=1.8, atol=0); "
        "worst at index (0,): actual -1.5e+308, expected 1e+308"
    )
    assert_state_dicts_close(expected, expected, rtol=1.8, atol=0)
