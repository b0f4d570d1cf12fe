from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_bit_for_bit, family
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import ladle


def naive(fn, *models):
    """Per-key float64 reference, cast to model 0's dtype."""
    out = {}
    for key, ref in models[0].items():
        if ref.is_floating_point():
            out[key] = fn(*(m[key].double() for m in models)).to(ref.dtype)
        else:
            out[key] = ref
    return out


def assert_equal_dicts(actual, expected, **tol):
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(actual[key], expected[key], **tol)


@given(seed=st.integers(0, 1000), alpha=st.floats(-3, 3))
def test_add_sub_scale_lerp_match_naive_per_key_computation(seed, alpha):
    a, b = family(2, seed=seed)
    assert_equal_dicts(ladle.add(a, b, alpha=alpha), naive(lambda x, y: x + alpha * y, a, b))
    assert_equal_dicts(ladle.sub(a, b), naive(lambda x, y: x - y, a, b))
    assert_equal_dicts(ladle.scale(a, alpha), naive(lambda x: alpha * x, a))
    t = abs(alpha) / 3
    assert_equal_dicts(ladle.lerp(a, b, t), naive(lambda x, y: (1 - t) * x + t * y, a, b))


@given(seed=st.integers(0, 1000), n=st.integers(1, 5))
def test_weighted_sum_matches_naive(seed, n):
    models = family(n, seed=seed)
    weights = [0.5 + i for i in range(n)]
    expected = naive(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *models)
    assert_equal_dicts(ladle.weighted_sum(models, weights), expected, rtol=1e-6, atol=1e-6)


def test_lerp_is_exact_at_endpoints():
    a, b = family(2, seed=3)
    for key in ("layer.weight", "scalar"):
        assert torch.equal(ladle.lerp(a, b, 0.0)[key], a[key])
        assert torch.equal(ladle.lerp(a, b, 1.0)[key], b[key])


def test_task_vector_copies_integer_buffers_from_base_and_adds_back():
    ft, base = family(2, seed=4)
    tau = ladle.task_vector(ft, base)
    assert tau["bn.num_batches_tracked"].item() == base["bn.num_batches_tracked"].item()
    back = ladle.add(base, tau)
    torch.testing.assert_close(back["layer.weight"], ft["layer.weight"])


def test_bf16_inputs_accumulate_in_float32():
    # 256 + 1 is not representable in bf16; float32 accumulation keeps the 1 until the end.
    a = {"w": torch.tensor([256.0], dtype=torch.bfloat16)}
    ones = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    out = ladle.weighted_sum([a, ones, ones], [1.0, 1.0, 1.0])
    assert out["w"].dtype == torch.bfloat16
    assert out["w"].item() == 258.0  # bf16 step-by-step would give 256


def test_inputs_are_not_modified():
    a, b = family(2, seed=5)
    before = {k: v.clone() for k, v in a.items()}
    ladle.weighted_sum([a, b], [1.0, 2.0])
    ladle.add(a, b)
    for key in a:
        assert torch.equal(a[key], before[key])


def test_mismatched_shape_names_key_and_shapes():
    a, b = family(2)
    b["layer.weight"] = torch.zeros(4, 5)
    with pytest.raises(
        ladle.IncompatibleError, match=r"b: key 'layer.weight' has shape \(4, 5\), a has \(4, 3\)"
    ):
        ladle.add(a, b)


def test_mismatched_keys_lists_missing_and_extra():
    a, b = family(2)
    del b["layer.bias"]
    b["extra.key"] = torch.zeros(1)
    with pytest.raises(
        ladle.IncompatibleError, match=r"missing 1 \('layer.bias'\); extra 1 \('extra.key'\)"
    ):
        ladle.sub(a, b)


def test_weighted_sum_rejects_wrong_number_of_weights():
    with pytest.raises(ValueError, match="weights"):
        ladle.weighted_sum(family(2), [1.0])


@pytest.mark.parametrize(
    ("weights", "found"),
    [
        *((0.5, "float"), (None, "None"), (torch.tensor(0.5), "Tensor"), (b"\x01", "bytes")),
        ({0: 1.0}, "dict"),  # was its keys: weight 0
    ],
)
def test_weighted_sum_weights_that_are_no_sequence_are_a_type_error_naming_them(weights, found):
    # Was "object of type 'float' has no len()" (and bytes were read as small integers).
    with pytest.raises(
        TypeError, match=rf"^weights: expected a sequence of numbers, found {found}$"
    ):
        ladle.weighted_sum([{"w": torch.ones(2)}], weights)


def test_lerp_keeps_infinities_and_is_exact_at_the_ends():
    inf = float("inf")
    a = {"mask": torch.tensor([0.0, -inf, 1.0]), "w": torch.tensor([-3e38, 2.0, 5.0])}
    b = {"mask": torch.tensor([0.0, -inf, -inf]), "w": torch.tensor([3e38, 4.0, 5.0])}
    for t, mask in ((0.0, [0.0, -inf, 1.0]), (0.25, [0.0, -inf, -inf]), (1.0, [0.0, -inf, -inf])):
        merged = ladle.lerp(a, b, t)
        assert merged["mask"].tolist() == mask, t
    assert ladle.lerp(a, b, 0.5)["w"].tolist() == [0.0, 3.0, 5.0]  # y − x would overflow
    # Off the middle, (1 − t)·x + t·y weighs x by 1 − t: 0.75·(−3e38) + 0.25·3e38.
    x, y = a["w"][:1], b["w"][:1]
    assert torch.equal(ladle.lerp(a, b, 0.25)["w"][:1], 0.75 * x + 0.25 * y)
    assert ladle.lerp(a, b, 0.25)["w"][0].item() == pytest.approx(-1.5e38, rel=1e-6)
    assert torch.equal(ladle.lerp(a, b, 0.0)["w"], a["w"])
    assert torch.equal(ladle.lerp(a, b, 1.0)["w"], b["w"])
    # Finite entries are torch.lerp's own, bit for bit.
    x, y = torch.randn(100), torch.randn(100)
    assert torch.equal(ladle.lerp({"w": x}, {"w": y}, 0.3)["w"], torch.lerp(x, y, 0.3))


def test_complex_tensors_are_computed_not_copied():
    a = {"c": torch.tensor([1 + 1j, 2 - 1j]), "n": torch.tensor(3)}
    b = {"c": torch.tensor([2 + 2j, 0 + 1j]), "n": torch.tensor(4)}
    assert ladle.add(a, b)["c"].tolist() == [3 + 3j, 2 + 0j]
    assert ladle.scale(a, 2.0)["c"].tolist() == [2 + 2j, 4 - 2j]
    assert ladle.lerp(a, b, 0.5)["c"].tolist() == [1.5 + 1.5j, 1 + 0j]
    assert ladle.task_vector(b, a)["c"].tolist() == [1 + 1j, -2 + 2j]
    assert ladle.add(a, b)["n"].item() == 3  # integers still come from the first


def test_arithmetic_takes_modules_and_files_like_every_function(tmp_path):
    module = torch.nn.Linear(2, 1)
    ladle.save(module.state_dict(), tmp_path / "m.safetensors")
    doubled = ladle.add(module, tmp_path / "m.safetensors")
    for key, value in module.state_dict().items():
        assert torch.equal(doubled[key], value * 2)
        assert not doubled[key].requires_grad


def test_weighted_sum_of_a_single_model_is_a_type_error_as_in_every_method():
    model = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match="models: expected a sequence of models, found a single"):
        ladle.weighted_sum(model, [1.0])  # was read as a path per key: "w: no such file"
    with pytest.raises(TypeError, match="models: expected a sequence of models"):
        ladle.weighted_sum(torch.nn.Linear(2, 1), [1.0])


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda a: ladle.scale(a, True), "factor"),
        (lambda a: ladle.scale(a, torch.tensor(False)), "factor"),
        (lambda a: ladle.add(a, a, alpha=True), "alpha"),
        (lambda a: ladle.lerp(a, a, False), "t"),
        (lambda a: ladle.weighted_sum([a, a], [1.0, True]), "weights[1]"),
    ],
)
def test_a_bool_scalar_is_a_type_error_naming_it(call, name):
    # Before: scale(a, True) returned a itself (1.0x), lerp(a, b, False) returned a.
    with pytest.raises(TypeError) as err:
        call({"w": torch.ones(2)})
    assert str(err.value) == f"{name}: expected a number, found bool"


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda a: ladle.scale(a, np.timedelta64(2, "s")), "factor"),
        (lambda a: ladle.lerp(a, a, np.timedelta64(1, "s")), "t"),
        (lambda a: ladle.weighted_sum([a, a], [1.0, np.timedelta64(1, "s")]), "weights[1]"),
    ],
)
def test_a_numpy_duration_scalar_is_a_type_error_naming_it(call, name):
    # Before: scale(a, np.timedelta64(2, "s")) doubled a: numpy's durations are integers to Python.
    with pytest.raises(TypeError) as err:
        call({"w": torch.ones(2)})
    assert str(err.value) == f"{name}: expected a number, found timedelta64"


def test_scalars_are_numbers_not_tensors_that_broadcast_into_other_shapes():
    a, b = {"w": torch.ones(2)}, {"w": torch.ones(2)}
    with pytest.raises(
        TypeError, match=r"factor: expected a number, found a tensor of shape \(3, 1\)"
    ):
        ladle.scale(a, torch.ones(3, 1))  # broadcast the result to (3, 2)
    with pytest.raises(TypeError, match=r"weights\[0\]: expected a number, found a tensor"):
        ladle.weighted_sum([a], torch.tensor([[1.0, 2.0]]))  # scaled entry by entry
    with pytest.raises(TypeError, match=r"t: expected a number, found a tensor of shape \(2,\)"):
        ladle.lerp(a, b, torch.tensor([0.5, 0.2]))
    with pytest.raises(TypeError, match=r"t: expected a number, found ndarray of shape \(2,\)"):
        ladle.lerp(a, b, np.array([0.5, 0.2]))  # it said "a tensor"
    with pytest.raises(TypeError, match=r"alpha: expected a number, found str"):
        ladle.add(a, b, alpha="2")
    # Numbers of any kind are fine: ints, numpy scalars, 0-d tensors, one weight per model.
    for factor in (2, np.float32(2.0), np.int64(2), torch.tensor(2.0), torch.tensor(2)):
        assert ladle.scale(a, factor)["w"].tolist() == [2.0, 2.0]
    assert ladle.weighted_sum([a, b], torch.tensor([1.0, 2.0]))["w"].tolist() == [3.0, 3.0]
    assert ladle.weighted_sum([a, b], np.array([1.0, 2.0]))["w"].tolist() == [3.0, 3.0]
    assert ladle.lerp(a, {"w": torch.full((2,), 3.0)}, torch.tensor(0.5))["w"].tolist() == [2.0] * 2
    assert ladle.scale(a, 2**70)["w"].tolist() == [2.0**70] * 2  # was an OverflowError


def test_a_complex_scalar_with_real_tensors_is_refused_not_cast_to_its_real_part():
    a = {"w": torch.ones(2), "c": torch.ones(2, dtype=torch.complex64)}
    with pytest.raises(
        TypeError, match=r"factor: 1j is complex, and key 'w' is real \(torch.float32\)"
    ):
        ladle.scale(a, 1j)  # was [0., 0.] with a UserWarning
    with pytest.raises(TypeError, match=r"weights\[1\]: 2j is complex, and key 'w' is real"):
        ladle.weighted_sum([a, a], [1.0, 2j])
    complex_only = {"c": torch.tensor([1 + 1j])}
    assert ladle.scale(complex_only, 1j)["c"].tolist() == [-1 + 1j]
    assert ladle.scale(a, 2 + 0j)["w"].tolist() == [2.0, 2.0]  # no imaginary part: real


@given(
    x=st.floats(1e-30, 1e30),
    factor=st.one_of(st.floats(1e-60, 1e-38), st.floats(1e38, 1e60)),
    negative=st.booleans(),
)
def test_scalars_outside_float32s_normal_range_keep_float32_precision(x, factor, negative):
    # torch rounds a scalar to the compute dtype: 1e-40 kept ~5 digits in float32, 1e-46
    # became 0, 1e39 inf, whatever the tensor; the result must be x·factor rounded once.
    factor = -factor if negative else factor
    a = {"w": torch.tensor([x], dtype=torch.float32)}
    x32 = float(a["w"])
    expected = torch.tensor([x32 * factor], dtype=torch.float64).float()
    b = {"w": torch.zeros(1)}
    torch.testing.assert_close(ladle.scale(a, factor)["w"], expected)
    torch.testing.assert_close(ladle.weighted_sum([a, b], [factor, 1.0])["w"], expected)
    torch.testing.assert_close(ladle.add(b, a, alpha=factor)["w"], expected)
    assert ladle.scale(a, factor)["w"].dtype == torch.float32


def test_results_in_a_dtype_that_cannot_hold_them_are_refused_as_in_every_method():
    e8 = torch.float8_e8m0fnu  # unsigned, powers of two only: 1 − 4 was written as 4
    a = {"s": torch.tensor([1.0, 4.0]).to(e8), "w": torch.ones(2)}
    b = {"s": torch.tensor([4.0, 4.0]).to(e8), "w": torch.ones(2)}
    with pytest.raises(ValueError, match=r"a: key 's' is stored as float8_e8m0fnu.*float\(\)"):
        ladle.sub(a, b)
    with pytest.raises(ValueError, match=r"base: key 's' is stored as float8_e8m0fnu"):
        ladle.task_vector(a, b)
    with pytest.raises(ValueError, match=r"a: key 's' is stored as float8_e8m0fnu"):
        ladle.scale(a, -2.0)
    # As an input beside a dtype that holds the result it is read fine.
    as_float = {k: v.float() for k, v in a.items()}
    assert ladle.sub(as_float, b)["s"].tolist() == [-3.0, 0.0]
    packed = {"w": torch.tensor([1, 2], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}
    with pytest.raises(ValueError, match=r"packs several values per element: unpack it"):
        ladle.add(packed, packed)  # was a NotImplementedError from torch's copy kernel


def test_a_wider_argument_after_the_first_makes_the_computation_wider():
    # Computed in float64 (complex128) when any argument is, though returned in the first's
    # dtype: 1 − (1 + 2⁻⁴⁰) is −2⁻⁴⁰, exact in float32; in float32 1 + 2⁻⁴⁰ would be 1.
    one = torch.tensor([1.0])
    wide = torch.tensor([1.0 + 2.0**-40], dtype=torch.float64)
    assert ladle.sub({"w": one}, {"w": wide})["w"].tolist() == [-(2.0**-40)]
    assert ladle.sub({"w": one}, {"w": wide})["w"].dtype == torch.float32
    assert ladle.add({"w": one}, {"w": wide}, alpha=-1.0)["w"].tolist() == [-(2.0**-40)]
    assert ladle.weighted_sum([{"w": one}, {"w": wide}], [1, -1])["w"].tolist() == [-(2.0**-40)]
    complex_one = {"c": one.to(torch.complex64)}
    complex_wide = {"c": wide.to(torch.complex128)}
    found = ladle.sub(complex_one, complex_wide)["c"]
    assert found.dtype == torch.complex64 and found.tolist() == [complex(-(2.0**-40), 0.0)]


# --- tied weights ----------------------------------------------------------------------------


def tied(emb: torch.Tensor, body: torch.Tensor) -> dict[str, torch.Tensor]:
    """A model whose head is its embedding: one tensor under two names, as a tied module's
    state dict (or a torch file of it) holds them."""
    return {"emb.weight": emb, "body.weight": body, "head.weight": emb, "steps": torch.tensor(3)}


def stored_once(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model`` with its tied head left out, as save_pretrained's safetensors store it."""
    return {key: value for key, value in model.items() if key != "head.weight"}


ARITHMETIC = {
    "add": lambda a, b: ladle.add(a, b, alpha=0.5),
    "sub": ladle.sub,
    "scale": lambda a, b: ladle.scale(a, 3),
    "lerp": lambda a, b: ladle.lerp(a, b, 0.25),
    "weighted_sum": lambda a, b: ladle.weighted_sum([a, b, a], [1, 2, 3]),
    "task_vector": ladle.task_vector,
}


@pytest.mark.parametrize("name", list(ARITHMETIC))
def test_a_tensor_every_argument_ties_comes_back_once_under_both_names(name):
    # Each name came back as a tensor of its own, computed twice: twice the memory.
    gen = torch.Generator().manual_seed(4)
    a = tied(torch.randn(6, 3, generator=gen), torch.randn(5, generator=gen))
    b = tied(torch.randn(6, 3, generator=gen), torch.randn(5, generator=gen))
    result = ARITHMETIC[name](a, b)
    assert list(result) == ["emb.weight", "body.weight", "head.weight", "steps"]
    assert result["head.weight"] is result["emb.weight"]
    once = ARITHMETIC[name](stored_once(a), stored_once(b))  # the values, bit for bit
    assert all(torch.equal(result[key], once[key]) for key in once)
    assert result["emb.weight"].dtype == torch.float32


def test_a_tied_module_takes_the_result_and_stays_tied():
    def lm(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False))
        model[1].weight = model[0].weight
        return model

    merged = ladle.lerp(lm(0), lm(1), 0.5)
    assert merged["1.weight"] is merged["0.weight"]
    target = lm(2)
    target.load_state_dict(merged, strict=True)
    assert target[1].weight is target[0].weight
    expected = torch.lerp(lm(0)[0].weight.detach(), lm(1)[0].weight.detach(), 0.5)
    assert torch.equal(target[0].weight.detach(), expected)


def test_keys_tied_in_one_argument_only_are_computed_each_on_its_own():
    a = tied(torch.ones(4), torch.ones(2))
    b = {**tied(torch.ones(4), torch.ones(2)), "head.weight": torch.full((4,), 3.0)}
    result = ladle.add(a, b)
    assert result["emb.weight"].tolist() == [2.0] * 4
    assert result["head.weight"].tolist() == [4.0] * 4


@pytest.mark.parametrize("name", list(ARITHMETIC))
@pytest.mark.parametrize("twice", ["a", "b"])
def test_arguments_storing_a_tied_tensor_once_or_twice_give_what_storing_it_once_gives(name, twice):
    # A tied module (two names) as the first argument (base, for task_vector) beside
    # save_pretrained's safetensors (the embedding once) was an IncompatibleError, "missing
    # 1 ('head.weight'); in a, 'head.weight' names the tensor of 'emb.weight' (tied
    # weights)". The argument storing it once answers the head's name with its embedding.
    gen = torch.Generator().manual_seed(5)
    a = tied(torch.randn(6, 3, generator=gen), torch.randn(5, generator=gen))
    b = tied(torch.randn(6, 3, generator=gen), torch.randn(5, generator=gen))
    args = (a, stored_once(b)) if twice == "a" else (stored_once(a), b)
    result = ARITHMETIC[name](*args)
    reference = args[1] if name == "task_vector" else args[0]
    assert list(result) == list(reference)  # a second name it lacks is not read
    if "head.weight" in reference:
        assert result["head.weight"] is result["emb.weight"]
    once = ARITHMETIC[name](stored_once(a), stored_once(b))
    assert all(torch.equal(result[key], once[key]) for key in once)


@pytest.mark.parametrize("name", list(ARITHMETIC))
@pytest.mark.parametrize("once", [None, "a", "b"])
def test_a_torch_file_of_a_tied_model_computes_as_the_state_dict_saved_in_it(name, once, tmp_path):
    # A path was read with ladle.load, which copies each name: a torch file's tied head was
    # a tensor of its own. So the result held it twice, and beside save_pretrained's
    # safetensors (the embedding once) the file was refused, "keys differ from a: extra 1
    # ('head.weight')" (or "missing 1" as the base of task_vector), where the state dict
    # saved in the file, a module or task_arithmetic took them.
    gen = torch.Generator().manual_seed(6)
    given = {
        "a": tied(torch.randn(6, 3, generator=gen), torch.randn(5, generator=gen)),
        "b": tied(torch.randn(6, 3, generator=gen), torch.randn(5, generator=gen)),
    }
    paths, in_memory = [], []
    for label, model in given.items():
        if label == once:
            in_memory.append(stored_once(model))
            paths.append(tmp_path / f"{label}.safetensors")
            save_file(in_memory[-1], paths[-1])
        else:
            in_memory.append(model)
            paths.append(tmp_path / f"{label}.pt")
            torch.save(model, paths[-1])
    result = ARITHMETIC[name](*paths)
    assert_bit_for_bit(result, ARITHMETIC[name](*in_memory))  # the keys and every bit
    if "head.weight" in result:
        assert result["head.weight"] is result["emb.weight"]


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_lerp_extrapolates_beyond_the_ends():
    # (1 − t)·a + t·b holds for every t: t = 2 and t = −1 are not b and a.
    a, b = {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([4.0, 3.0])}
    assert ladle.lerp(a, b, 2.0)["w"].tolist() == [8.0, 5.0]
    assert ladle.lerp(a, b, -1.0)["w"].tolist() == [-4.0, -1.0]


def test_a_complex_scalar_with_a_part_outside_float32s_range_is_applied_in_complex128():
    # The imaginary part 2⁻¹⁵⁰ is below float32's subnormals: complex64 made it 0, and
    # 3·(1 + 2⁻¹⁵⁰j) lost its imaginary part; rounded once, 1.5·2⁻¹⁴⁹ is 2⁻¹⁴⁸ (ties to even).
    a = {"c": torch.tensor([3 + 0j], dtype=torch.complex64)}
    found = ladle.scale(a, complex(1.0, 2.0**-150))["c"]
    assert found.dtype == torch.complex64
    assert found.tolist() == [complex(3.0, 2.0**-148)]


def test_integer_tensors_of_a_result_are_copies_not_the_inputs_own():
    a = {"w": torch.ones(2), "steps": torch.tensor([5])}
    b = {"w": torch.ones(2), "steps": torch.tensor([7])}
    for result in (ladle.add(a, b), ladle.scale(a, 2.0), ladle.task_vector(b, a)):
        result["steps"] += 1  # a result is new: changing it leaves the inputs alone
    assert a["steps"].tolist() == [5] and b["steps"].tolist() == [7]


@pytest.mark.parametrize(
    ("weight", "expected"),
    [
        (0.0, 1.0),
        (2.0**-126, 1.0),  # float32's smallest normal: held exactly
        (torch.finfo(torch.float32).max, 1.0),
        (2.0**-127, 1.0 + 2.0**-23),  # below it: the computation is float64
    ],
)
def test_only_scalars_beyond_float32s_normal_range_widen_the_computation(weight, expected):
    # 1 + 2⁻²⁴ + 2⁻²⁴ is 1 in float32 (each sum ties to even) and 1 + 2⁻²³ computed in
    # float64: a weight of 0, or one at the edges of float32's range, keeps it in float32.
    def model(value):
        return {"w": torch.tensor([value])}

    models = [model(0.0), model(1.0), model(2.0**-24), model(2.0**-24)]
    result = ladle.weighted_sum(models, [weight, 1.0, 1.0, 1.0])["w"]
    assert result.dtype == torch.float32 and result.tolist() == [expected]


def test_lerp_at_its_ends_returns_copies_not_the_inputs_own_tensors():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}
    for t in (0.0, 1.0):
        ladle.lerp(a, b, t)["w"].add_(10.0)  # a result is new: changing it leaves a, b alone
    assert a["w"].tolist() == [1.0, 2.0] and b["w"].tolist() == [3.0, 4.0]


@pytest.mark.parametrize("count", [1, 3])
def test_weighted_sum_with_too_few_or_too_many_weights_says_how_many_it_expected(count):
    with pytest.raises(ValueError) as info:
        ladle.weighted_sum(family(2), [1.0] * count)
    assert str(info.value) == f"weights: expected 2 weights, found {count}"


BEYOND_FLOAT = "expected a number within float's range, found one beyond it"


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m: ladle.scale(m[0], 10**400), "factor"),
        (lambda m: ladle.add(m[0], m[1], alpha=-(10**400)), "alpha"),
        (lambda m: ladle.lerp(m[0], m[1], 10**400), "t"),
        (lambda m: ladle.weighted_sum(m, [10**400, 1]), "weights[0]"),
        (lambda m: ladle.task_arithmetic(m, m[1], scale=10**400, device="cpu"), "scale"),
        (lambda m: ladle.uniform_soup(m, weights=[1, 10**400], device="cpu"), "weights[1]"),
        (lambda m: ladle.ties(m, m[1], density=10**400, device="cpu"), "density"),
    ],
)
def test_an_int_beyond_float_s_range_is_a_value_error_naming_it(call, name):
    # float(10**400) raised a bare OverflowError, naming no parameter.
    models = [{"w": torch.ones(2)}, {"w": torch.zeros(2)}]
    with pytest.raises(ValueError) as info:
        call(models)
    assert str(info.value) == f"{name}: {BEYOND_FLOAT}"


def test_float8_e4m3fn_results_that_overflow_are_nan_not_the_saturated_448():
    # torch's cast to float8_e4m3fn (no Inf) saturates: Inf and 1e30 came back as ±448, a
    # finite and wrong number, where the docs promise NaN or Inf as computed.
    f8 = {"w": torch.tensor([1.0, -2.0, 224.0, 0.0]).to(torch.float8_e4m3fn)}
    assert ladle.scale(f8, 2.0)["w"].float().tolist() == [2.0, -4.0, 448.0, 0.0]
    tie = ladle.scale(f8, 464.0)["w"].float()  # halfway to the next step: rounds to 448
    assert tie[0].item() == 448.0 and tie[1:3].isnan().all() and tie[3].item() == 0.0
    assert ladle.scale(f8, 465.0)["w"].float()[0].isnan()
    infinite = ladle.scale(f8, math.inf)["w"].float()
    assert infinite[:3].isnan().all() and infinite[3].isnan()  # 0·Inf is NaN already
    added = ladle.add(f8, f8, alpha=1e30)["w"].float()
    assert added[:3].isnan().all() and added[3].item() == 0.0
    e5m2 = {"w": torch.tensor([1.0, -2.0]).to(torch.float8_e5m2)}  # holds Inf: as computed
    assert ladle.scale(e5m2, math.inf)["w"].float().tolist() == [math.inf, -math.inf]


def test_an_argument_read_from_a_file_is_named_with_the_file(tmp_path):
    # "b: key 'w' has shape (2, 3), a has (3, 2)": which files a and b were went unsaid.
    x = ladle.save({"w": torch.zeros(3, 2)}, tmp_path / "x.safetensors")
    y = ladle.save({"w": torch.zeros(2, 3)}, tmp_path / "y.safetensors")
    with pytest.raises(ladle.IncompatibleError) as info:
        ladle.add(x, y)
    assert str(info.value) == f"b ({y}): key 'w' has shape (2, 3), a ({x}) has (3, 2)"
    with pytest.raises(ladle.IncompatibleError, match=r"^b: key 'w' has shape \(2, 3\), a \("):
        ladle.add(x, {"w": torch.zeros(2, 3)})  # in memory: the argument alone


def test_quantized_weights_and_adapters_are_refused_as_the_merges_refuse_them(tmp_path):
    # Before: added key by key (float8 codes scaled, integer codes copied, scales added apart;
    # an adapter's LoRA factors each scaled): a state dict that loads and is wrong.
    codes = torch.ones(2, 2).to(torch.float8_e4m3fn)
    fp8 = {"l.weight": codes, "l.weight_scale_inv": torch.ones(1)}
    said = (
        "holds quantized weights, float8 weights with block scales ('l.weight' beside "
        "'l.weight_scale_inv'): merging their codes and scales would merge no weights; "
        "dequantize it to a floating dtype first"
    )
    plain = {"l.weight": torch.ones(2, 2), "l.weight_scale_inv": torch.ones(1)}
    for call, name in [
        (lambda: ladle.add(plain, fp8), "b"),
        (lambda: ladle.scale(fp8, 2.0), "a"),
        (lambda: ladle.task_vector(fp8, plain), "finetuned"),
        (lambda: ladle.weighted_sum([plain, plain, fp8], [1, 1, 1]), "model 2"),
    ]:
        with pytest.raises(ladle.CheckpointError) as info:
            call()
        assert str(info.value) == f"{name}: {said}"
    quantized = ladle.save({"w": torch.ones(2)}, tmp_path / "q")  # a folder declaring it
    (quantized / "config.json").write_text('{"quantization_config": {"quant_method": "awq"}}')
    with pytest.raises(ladle.CheckpointError, match=rf"^b \({quantized}\): its config.json"):
        ladle.sub({"w": torch.ones(2)}, quantized)
    adapter = tmp_path / "adapter"
    ladle.save({"l.lora_A.weight": torch.ones(1, 2)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ladle.CheckpointError, match=rf"^a \({adapter}\): a PEFT adapter"):
        ladle.scale(adapter, 0.5)
    assert ladle.add(plain, plain)["l.weight"].tolist() == [[2.0, 2.0], [2.0, 2.0]]


def test_lerp_of_two_negative_zeros_is_negative_zero_for_every_t():
    # torch.lerp's a + t·(b − a) made +0.0 of two −0.0 for t < 0.5 (the formula gives −0.0),
    # as the greedy soup's running mean already guarded against.
    zeros = {"w": torch.tensor([-0.0, 0.0, -3.5])}
    other = {"w": torch.tensor([-0.0, 0.0, -3.5])}
    for t in (0.25, 0.5, 0.75, -2.0, 3.0):
        merged = ladle.lerp(zeros, other, t)["w"]
        assert torch.signbit(merged).tolist() == [True, False, True], t
        assert merged.tolist() == [0.0, 0.0, -3.5]
