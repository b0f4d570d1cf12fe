from __future__ import annotations

import pytest
import torch
from conftest import family
from hypothesis import given
from hypothesis import strategies as st

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


def test_lerp_keeps_infinities_and_is_exact_at_the_ends():
    inf = float("inf")
    a = {"mask": torch.tensor([0.0, -inf, 1.0]), "w": torch.tensor([-3e38, 2.0, 5.0])}
    b = {"mask": torch.tensor([0.0, -inf, -inf]), "w": torch.tensor([3e38, 4.0, 5.0])}
    for t, mask in ((0.0, [0.0, -inf, 1.0]), (0.25, [0.0, -inf, -inf]), (1.0, [0.0, -inf, -inf])):
        merged = ladle.lerp(a, b, t)
        assert merged["mask"].tolist() == mask, t
    assert ladle.lerp(a, b, 0.5)["w"].tolist() == [0.0, 3.0, 5.0]  # y − x would overflow
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
