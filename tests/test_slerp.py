from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_bit_for_bit
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import ladle
from ladle.cli import main
from ladle.methods.slerp import slerp_coefficients
from ladle.testing import BUFFER_KEY, assert_state_dicts_close, model_families


def naive_slerp(a, b, t):
    """Flatten each tensor, numpy float64, the formula of docs/methods/slerp.md."""
    out = {}
    for key, x in a.items():
        if not x.is_floating_point():
            out[key] = x.clone()
            continue
        u, v = x.double().numpy().ravel(), b[key].double().numpy().ravel()
        norms = np.linalg.norm(u) * np.linalg.norm(v)
        cosine = np.dot(u, v) / norms if norms > 0 else 1.0  # a zero tensor: linear
        if abs(cosine) > 0.9995:
            merged = (1 - t) * u + t * v
        else:
            theta = np.arccos(cosine)
            merged = (np.sin(theta - t * theta) * u + np.sin(t * theta) * v) / np.sin(theta)
        out[key] = torch.from_numpy(merged.reshape(x.shape)).to(x.dtype)
    return out


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_hand_worked_values():
    # "q": orthogonal, norm 2: θ = π/2, s₀ = sin(π/2 − π/6) = √3/2, s₁ = sin(π/6) = 1/2.
    # "e": 45° apart: θ = π/4, s₀ = s₁ = sin(π/8)/sin(π/4) = 0.5411961 at t = 1/2.
    # "c": b = 2a, colinear: linear, 0.75·a + 0.25·b. "o": opposite (cos = −1): linear too.
    # "z": a zero tensor has no direction: linear, 0.5·b. "s": equal tiny tensors are
    # colinear, whatever their norm: linear, the tensor itself.
    a = {"q": t([2.0, 0.0]), "e": t([1.0, 0.0]), "c": t([1.0, 2.0]), "o": t([1.0, 0.0])}
    b = {"q": t([0.0, 2.0]), "e": t([1.0, 1.0]), "c": t([2.0, 4.0]), "o": t([-3.0, 0.0])}
    a["z"], b["z"] = t([0.0, 0.0]), t([0.0, 2.0])
    a["s"], b["s"] = t([1e-13, 0.0]), t([1e-13, 0.0])
    third = ladle.slerp([a, b], t=1 / 3, device="cpu")
    torch.testing.assert_close(third["q"], t([math.sqrt(3), 1.0]))
    half = ladle.slerp([a, b], t=0.5, device="cpu")
    torch.testing.assert_close(half["e"], t([1.0823922, 0.5411961]))
    torch.testing.assert_close(half["o"], t([-1.0, 0.0]))
    torch.testing.assert_close(half["z"], t([0.0, 1.0]))
    torch.testing.assert_close(half["s"], t([1e-13, 0.0]), rtol=2.4e-7, atol=0)
    quarter = ladle.slerp([a, b], t=0.25, device="cpu")
    torch.testing.assert_close(quarter["c"], t([1.25, 2.5]))


def test_coefficients_follow_the_threshold():
    # cos θ = 0.9995 exactly is still interpolated on the circle; just above it, linearly.
    on_circle = slerp_coefficients([[1.0, 0.9995], [0.9995, 1.0]], 0.5)
    theta = math.acos(0.9995)
    assert on_circle == (math.sin(theta / 2) / math.sin(theta),) * 2
    assert slerp_coefficients([[1.0, 0.99951], [0.99951, 1.0]], 0.5) == (0.5, 0.5)
    assert slerp_coefficients([[math.inf, 0.0], [0.0, 1.0]], 0.3) == (0.7, 0.3)
    assert slerp_coefficients([[0.0, 0.0], [0.0, 1.0]], 0.3) == (0.7, 0.3)
    tiny = slerp_coefficients([[1e-26, 0.0], [0.0, 1e-26]], 0.5)  # tiny, orthogonal: a circle
    assert tiny == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)), rel=1e-15)


@given(model_families(n=1), st.floats(-0.5, 1.5))
def test_agrees_with_a_naive_implementation(family, where):
    a, (b,) = family
    merged = ladle.slerp([a, b], t=where, device="cpu")
    expected = naive_slerp(a, b, where)
    low = any(v.dtype in (torch.bfloat16, torch.float16) for v in a.values())
    # float32 arithmetic against float64; low-precision outputs within one step of theirs.
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if low else {"rtol": 1e-4, "atol": 1e-4}
    assert_state_dicts_close(merged, expected, **tolerance)


@given(model_families(n=1))
def test_ends_are_the_models_exactly(family):
    a, (b,) = family
    assert_bit_for_bit(ladle.slerp([a, b], t=0, device="cpu"), a)
    at_one = ladle.slerp([a, b], t=1, device="cpu")
    assert_bit_for_bit(
        {k: v for k, v in at_one.items() if k != BUFFER_KEY},
        {k: v for k, v in b.items() if k != BUFFER_KEY},
    )
    if BUFFER_KEY in a:  # integer tensors come from the first model, whatever t
        assert torch.equal(at_one[BUFFER_KEY], a[BUFFER_KEY])


@given(model_families(n=1), st.floats(0, 1))
def test_identical_models_give_that_model(family, where):
    _, (model,) = family
    merged = ladle.slerp([model, model], t=where, device="cpu")
    for key, value in model.items():
        if value.dtype in (torch.bfloat16, torch.float16) or not value.is_floating_point():
            assert torch.equal(merged[key], value), key  # float32 rounding, then the dtype's
        else:  # (1 − t)·x + t·x in float32: within a step of x
            torch.testing.assert_close(merged[key], value, rtol=2.4e-7, atol=0)


@given(model_families(n=1, dtypes=[torch.float32], buffers=False), st.floats(0, 1))
def test_reversed_models_and_t_give_the_same_point(family, where):
    a, (b,) = family
    forward = ladle.slerp([a, b], t=where, device="cpu")
    backward = ladle.slerp([b, a], t=1 - where, device="cpu")
    assert_state_dicts_close(forward, backward, rtol=1e-5, atol=1e-5)


@given(st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_keeps_the_norm_of_models_of_equal_norm(seed, where):
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 64, generator=generator, dtype=torch.float64)
    b = b * (a.norm() / b.norm())  # equal norms; random directions are far from colinear
    merged = ladle.slerp([{"w": a}, {"w": b}], t=where, device="cpu")["w"]
    assert float(merged.norm()) == pytest.approx(float(a.norm()), rel=1e-12)
    # ... and the angle to a is t·θ
    theta = math.acos(float(a @ b) / float(a.norm() * b.norm()))
    angle = math.acos(min(1.0, float(a @ merged) / float(a.norm() * merged.norm())))
    assert angle == pytest.approx(where * theta, abs=1e-6)


@given(model_families(n=1), st.integers(4, 64), st.sampled_from([None, torch.bfloat16]))
def test_streaming_output_equals_in_memory_bit_for_bit(tmp_path_factory, family, chunk, dtype):
    a, (b,) = family
    directory = tmp_path_factory.mktemp("slerp")
    paths = []
    for name, model in (("a", a), ("b", b)):
        save_file(model, directory / f"{name}.safetensors")
        paths.append(directory / f"{name}.safetensors")
    kwargs = {"t": 0.3, "device": "cpu", "dtype": dtype, "chunk_bytes": chunk}
    in_memory = ladle.slerp([a, b], **kwargs)
    out = ladle.slerp(paths, out=directory / "out.safetensors", **kwargs)
    with safe_open(out, "pt") as f:
        assert_bit_for_bit({k: f.get_tensor(k) for k in f.keys()}, in_memory)


def test_chunked_norms_change_only_rounding():
    generator = torch.Generator().manual_seed(0)
    a, b = ({"w": torch.randn(64, 32, generator=generator)} for _ in range(2))
    whole = ladle.slerp([a, b], device="cpu")
    rows = ladle.slerp([a, b], device="cpu", chunk_bytes=128)
    torch.testing.assert_close(rows["w"], whole["w"], rtol=1e-6, atol=1e-7)


def test_output_dtypes():
    a = {"h": t([1.0, 0.0], torch.bfloat16), "d": t([1.0, 0.0], torch.float64)}
    b = {"h": t([0.0, 1.0], torch.bfloat16), "d": t([0.0, 1.0], torch.float64)}
    merged = ladle.slerp([a, b], device="cpu")
    assert merged["h"].dtype == torch.bfloat16 and merged["d"].dtype == torch.float64
    assert merged["d"].tolist() == pytest.approx([math.sqrt(0.5)] * 2, rel=1e-15)
    assert ladle.slerp([a, b], device="cpu", dtype=torch.float32)["h"].dtype == torch.float32


def test_coefficients_float32_cannot_hold_are_applied_in_float64():
    # torch refused a coefficient past float32's range ("value cannot be converted to type
    # float without overflow", a traceback from the CLI), and rounded 1e-44 to a subnormal
    # of four bits (2% off).
    zero = {"w": t([0.0, 0.0])}
    far = ladle.slerp([zero, {"w": t([1e-30, 0.0])}], t=1e39, device="cpu")["w"]
    assert far.tolist() == pytest.approx([1e9, 0.0], rel=1e-6)
    near = ladle.slerp([{"w": t([0.0])}, {"w": t([3e38])}], t=1e-44, device="cpu")["w"]
    assert near.item() == torch.tensor(1e-44 * 3e38).item()  # 3e-6, rounded once
    assert near.item() == ladle.lerp({"w": t([0.0])}, {"w": t([3e38])}, 1e-44)["w"].item()


@pytest.mark.parametrize("scale", [1e-23, 1.0, 1e18])
def test_the_angle_does_not_depend_on_the_tensors_scale(scale):
    # Float32 products of entries near 1e-23 underflowed to 0: the key counted as a zero
    # tensor and was interpolated linearly.
    a, b = t([1.0, 1.0]) * scale, t([1.0, 2.0]) * scale
    merged = ladle.slerp([{"w": a}, {"w": b}], device="cpu")["w"] / scale
    expected = naive_slerp({"w": a.double()}, {"w": b.double()}, 0.5)["w"] / scale
    torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=0)
    assert abs(float(merged[0]) - 1.0) > 0.01  # on the circle, not the line: [1.013, 1.520]


def test_nearly_opposite_tensors_stay_near_the_float64_result():
    # cos θ = -0.99925, just inside the circle's branch, where the angle is ill-conditioned:
    # with float32 products in the norms the result was 88 float32 steps (of its largest
    # entry) from a float64 computation (1281 on another such pair), now 13; mergekit's 690.
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(28, generator=generator)
    b = -(a + 0.03 * torch.randn(28, generator=generator))
    cosine = float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))
    assert -0.9995 < cosine < -0.999
    merged = ladle.slerp([{"w": a}, {"w": b}], t=0.519, device="cpu")["w"].double()
    exact = naive_slerp({"w": a.double()}, {"w": b.double()}, 0.519)["w"]
    step = float(exact.abs().max()) * 2**-23
    assert float((merged - exact).abs().max()) < 32 * step


def test_nonfinite_inputs_are_refused_or_interpolated_linearly():
    a, b = {"w": t([math.inf, 1.0, 0.0])}, {"w": t([1.0, 1.0, 2.0])}
    with pytest.raises(ladle.NonFiniteError, match="'w'"):
        ladle.slerp([a, b], device="cpu")
    merged = ladle.slerp([a, b], t=0.25, device="cpu", allow_nonfinite=True)
    assert merged["w"].tolist() == [math.inf, 1.0, 0.5]


def test_an_end_leaves_the_other_model_out_its_signed_zeros_and_infinities_too():
    # "t = 0 gives a and t = 1 gives b, both exactly": the other model's term, whose
    # coefficient is 0, is left out, not added as 0·x (0·Inf is NaN, -0.0 + 0·x is +0.0).
    a, b = {"w": t([1.0, 0.0, 3.0])}, {"w": t([-0.0, 1.0, -0.0])}
    for first, second, at in ((a, b, 1.0), (b, a, 0.0)):
        merged = ladle.slerp([first, second], t=at, device="cpu")["w"]
        assert merged.tolist() == [0.0, 1.0, 0.0]
        assert torch.signbit(merged).tolist() == [True, False, True]
    infinite = {"w": t([math.inf, 1.0, -math.inf])}
    for first, second, at in ((infinite, b, 1.0), (b, infinite, 0.0)):
        merged = ladle.slerp([first, second], t=at, device="cpu", allow_nonfinite=True)["w"]
        assert torch.signbit(merged).tolist() == [True, False, True]
        assert merged.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("count", [1, 3])
def test_needs_exactly_two_models(count):
    with pytest.raises(ValueError, match=f"exactly 2 models, found {count}"):
        ladle.slerp([{"w": t([1.0])}] * count)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (math.nan, ValueError, "t: expected a finite number, found nan"),
        (math.inf, ValueError, "t: expected a finite number, found inf"),
        ("0.5", TypeError, "t: expected a number, found str"),
    ],
)
def test_bad_t(value, error, message):
    with pytest.raises(error, match=message):
        ladle.slerp([{"w": t([1.0])}] * 2, t=value)


def test_incompatible_models():
    with pytest.raises(ladle.IncompatibleError, match="'w'"):
        ladle.slerp([{"w": t([1.0])}, {"w": t([1.0, 2.0])}], device="cpu")


def test_cli_matches_the_api(tmp_path, capsys):
    generator = torch.Generator().manual_seed(1)
    a, b = ({"w": torch.randn(4, 3, generator=generator)} for _ in range(2))
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    out = tmp_path / "out.safetensors"
    inputs = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert main(["slerp", *inputs, "--t", "0.25", "-o", str(out), "--no-progress"]) == 0
    with safe_open(out, "pt") as f:
        assert torch.equal(f.get_tensor("w"), ladle.slerp([a, b], t=0.25, device="cpu")["w"])
        assert f.metadata()["ladle.method"] == "slerp"
        assert json.loads(f.metadata()["ladle.parameters"])["t"] == 0.25


def test_cli_refuses_bad_t_and_a_third_model(tmp_path, capsys):
    save_file({"w": t([1.0])}, tmp_path / "a.safetensors")
    a = str(tmp_path / "a.safetensors")
    with pytest.raises(SystemExit) as exit_:
        main(["slerp", a, a, "--t", "nan", "-o", str(tmp_path / "o.safetensors")])
    assert exit_.value.code == 2
    assert "t: expected a finite number, found nan" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["slerp", a, a, a, "-o", str(tmp_path / "o.safetensors")])
    assert exit_.value.code == 2
    assert "slerp interpolates exactly 2 models, found 3" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_recipe_step(tmp_path):
    save_file({"w": t([2.0, 0.0])}, tmp_path / "a.safetensors")
    save_file({"w": t([0.0, 2.0])}, tmp_path / "b.safetensors")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[steps.mid]\nmethod = "slerp"\nmodels = ["a.safetensors", "b.safetensors"]\n'
        'output = "mid.safetensors"\nparameters = { t = 0.5 }\n'
    )
    ladle.run_recipe(recipe, device="cpu")
    merged = ladle.load(tmp_path / "mid.safetensors")
    torch.testing.assert_close(merged["w"], t([math.sqrt(2)] * 2))


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ('models = ["a.safetensors"]', "slerp interpolates exactly 2 models, found 1"),
        ('models = ["a.safetensors", "a.safetensors"]\nparameters = { t = inf }', "t: expected"),
        ('models = ["a.safetensors", "a.safetensors"]\nbase = "a.safetensors"', "takes no base"),
    ],
)
def test_recipe_refuses_bad_steps(tmp_path, step, message):
    save_file({"w": t([1.0])}, tmp_path / "a.safetensors")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[steps.s]\nmethod = "slerp"\n{step}\noutput = "o.safetensors"\n')
    with pytest.raises(ValueError, match=message):
        ladle.load_recipe(recipe)


def test_float64_coefficients_are_the_documented_sines_bit_for_bit():
    # sin(θ − t·θ)/sin θ, mergekit's expression, not sin((1 − t)·θ)/sin θ: they differ in the
    # last bit of float64 (0.45399049973954675 against 0.4539904997395468 at t = 0.7).
    a = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    b = {"w": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    theta, at = math.pi / 2, 0.7
    merged = ladle.slerp([a, b], t=at, device="cpu")["w"]
    assert merged.dtype == torch.float64
    assert merged.tolist() == [
        math.sin(theta - at * theta) / math.sin(theta),
        math.sin(at * theta) / math.sin(theta),
    ]
