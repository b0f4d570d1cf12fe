from __future__ import annotations

import inspect
import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_bit_for_bit
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import ladle
from ladle.cli import main
from ladle.engine import fold
from ladle.methods import stock
from ladle.methods.stock import ModelStockWarning, stock_ratio
from ladle.testing import BUFFER_KEY, assert_state_dicts_close, model_families


def naive_model_stock(models, base):
    """Flatten everything, numpy float64; the clamp rule of the docs."""
    n = len(models)
    out = {}
    for key, ref in base.items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        b = ref.double().numpy().ravel()
        xs = [m[key].double().numpy().ravel() for m in models]
        taus = [x - b for x in xs]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                norms = np.sqrt(np.dot(taus[i], taus[i]) * np.dot(taus[j], taus[j]))
                cosines.append(np.clip(np.dot(taus[i], taus[j]) / (norms + 1e-8), -1.0, 1.0))
        cos = float(np.mean(cosines))
        denominator = (n - 1) * cos + 1 + 1e-8
        t = n * cos / denominator if denominator > 0 else -math.inf
        t = max(t, -1.0)
        merged = t * np.mean(xs, axis=0) + (1 - t) * b
        out[key] = torch.from_numpy(merged.reshape(ref.shape)).to(ref.dtype)
    return out


def quiet_stock(models, base, **kwargs):
    """model_stock with the near-pole warning silenced (random families may reach it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModelStockWarning)
        return ladle.model_stock(models, base, device="cpu", **kwargs)


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_two_models_hand_worked_cosine_six_tenths_gives_t_three_quarters():
    # τ₁ = [5, 0], τ₂ = [3, 4]: cos = 15/25 = 0.6; t = 2·0.6/(0.6 + 1) = 0.75;
    # mean = [5, 3]; 0.75·[5, 3] + 0.25·[1, 1] = [4, 2.5].
    base = {"w": t([1.0, 1.0])}
    merged = ladle.model_stock([{"w": t([6.0, 1.0])}, {"w": t([4.0, 5.0])}], base, device="cpu")
    torch.testing.assert_close(merged["w"], t([4.0, 2.5]), rtol=0, atol=1e-6)


def test_three_models_hand_worked_mean_of_pairs_and_per_key_ratios():
    # key "w": τ₁ = [5, 0, 0], τ₂ = [3, 4, 0], τ₃ = [0, 0, 2]: cosines 0.6, 0, 0, mean 0.2;
    # t = 3·0.2/(2·0.2 + 1) = 3/7; base + t·mean(τ) = [1, 2, 3] + 3/7·[8/3, 4/3, 2/3].
    # key "o": τ₁ = [1, 1], τ₂ = [1, -1], τ₃ = [0, 0]: all cosines 0, t = 0, the base.
    # key "s": identical task vectors [2, 0]·1e3: cos = 1 − 2.5e-15, t ≈ 1, the fine-tune.
    n = torch.tensor
    base = {"w": t([1.0, 2.0, 3.0]), "o": t([0.5, -0.5]), "s": t([1.0, 1.0]), "n": n(7)}
    models = [
        {"w": t([6.0, 2.0, 3.0]), "o": t([1.5, 0.5]), "s": t([2001.0, 1.0]), "n": n(1)},
        {"w": t([4.0, 6.0, 3.0]), "o": t([1.5, -1.5]), "s": t([2001.0, 1.0]), "n": n(2)},
        {"w": t([1.0, 2.0, 5.0]), "o": t([0.5, -0.5]), "s": t([2001.0, 1.0]), "n": n(3)},
    ]
    merged = ladle.model_stock(models, base, device="cpu")
    torch.testing.assert_close(merged["w"], t([15 / 7, 18 / 7, 23 / 7]), rtol=0, atol=1e-6)
    assert torch.equal(merged["o"], base["o"])
    torch.testing.assert_close(merged["s"], t([2001.0, 1.0]), rtol=1e-7, atol=0)
    assert merged["n"].item() == 7 and merged["n"].dtype == torch.int64


def test_mildly_negative_cosine_follows_the_released_formula_without_warning():
    # τ₁ = [1, 2, 2], τ₂ = [-1, 2, -2]: cos = -1/9, t = (-2/9)/(8/9) = -0.25; mean = [0, 2, 0].
    base = {"w": t([0.0, 0.0, 0.0])}
    merged = ladle.model_stock(
        [{"w": t([1.0, 2.0, 2.0])}, {"w": t([-1.0, 2.0, -2.0])}], base, device="cpu"
    )
    torch.testing.assert_close(merged["w"], t([0.0, -0.5, 0.0]), rtol=0, atol=1e-6)


def test_opposite_task_vectors_clamp_t_to_minus_one_and_warn_naming_the_key():
    # τ₁ = [1, 2], τ₂ = -2·τ₁: cos = -1, the pole (released code: t ≈ -2e8·...); t = -1,
    # so base - mean(τ) = [1, 1] - [-0.5, -1] = [1.5, 2].
    base = {"layer.w": t([1.0, 1.0]), "fine": t([0.0, 0.0])}
    models = [
        {"layer.w": t([2.0, 3.0]), "fine": t([1.0, 0.0])},
        {"layer.w": t([-1.0, -3.0]), "fine": t([0.0, 1.0])},
    ]
    with pytest.warns(ModelStockWarning, match=r"key 'layer\.w'.*clamped to -1") as record:
        merged = ladle.model_stock(models, base, device="cpu")
    assert len(record) == 1  # only the key at the pole
    assert torch.isfinite(merged["layer.w"]).all()
    torch.testing.assert_close(merged["layer.w"], t([1.5, 2.0]), rtol=0, atol=1e-6)
    assert torch.equal(merged["fine"], base["fine"])  # orthogonal: the base


@pytest.mark.parametrize("streamed", [False, True])
def test_the_clamp_warning_points_at_the_callers_line(tmp_path, streamed):
    # stacklevel=2 named ladle's own line (methods/stock.py), whatever called model_stock.
    base = {"w": t([1.0, 1.0])}
    models = [{"w": t([2.0, 3.0])}, {"w": t([-1.0, -3.0])}]
    out = tmp_path / "o.safetensors" if streamed else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ladle.model_stock(models, base, out=out, device="cpu")  # the line named
    line = inspect.currentframe().f_lineno - 1
    assert [(w.category, w.filename, w.lineno) for w in caught] == [
        (ModelStockWarning, __file__, line)
    ]


def test_three_task_vectors_at_120_degrees_hit_the_pole_and_are_clamped():
    s = math.sqrt(3) / 2
    base = {"w": t([0.0, 0.0])}
    models = [{"w": t([1.0, 0.0])}, {"w": t([-0.5, s])}, {"w": t([-0.5, -s])}]
    with pytest.warns(ModelStockWarning, match="'w'"):
        merged = ladle.model_stock([{k: v * 1e3 for k, v in m.items()} for m in models], base)
    assert torch.isfinite(merged["w"]).all()


@pytest.mark.parametrize("cosine", [-0.5 - 1e-9, -0.5 - 0.5e-8, -0.5, -0.6, -1.0])
def test_ratio_at_or_past_the_pole_is_minus_one_never_nan_or_an_exception(cosine):
    with pytest.warns(ModelStockWarning, match="'k'"):
        assert stock_ratio(cosine, 3, key="k") == -1.0


def test_mean_cosine_clamps_each_pair_before_the_mean():
    # Gram matrices with |Gᵢⱼ| > √(Gᵢᵢ·Gⱼⱼ), which rounding of real task vectors' sums can
    # give: each pair's cosine is clamped to [−1, 1], then averaged.
    assert stock.mean_cosine([[1.0, 2.0], [2.0, 1.0]]) == 1.0
    assert stock.mean_cosine([[1.0, -2.0], [-2.0, 1.0]]) == -1.0
    # pairs (0, 1): 3 clamped to 1; (0, 2) and (1, 2): 0; the mean of [1, 0, 0].
    assert stock.mean_cosine([[1.0, 3.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) == 1 / 3


def test_a_ratio_of_exactly_t_min_is_kept_without_a_warning():
    # Clamped (with a warning) only below T_MIN: this cosine gives t = −1.0 exactly.
    cosine, n = -0.200000002, 3
    assert n * cosine / ((n - 1) * cosine + 1 + stock.EPS) == stock.T_MIN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stock_ratio(cosine, n, key="k") == stock.T_MIN


@given(st.floats(-1.0, 1.0), st.integers(2, 8))
def test_ratio_is_the_released_formula_within_minus_one_and_one(cosine, n):
    released = n * cosine / ((n - 1) * cosine + 1 + 1e-8) if (n - 1) * cosine + 1 > 0 else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ratio = stock_ratio(cosine, n)
    assert -1.0 <= ratio <= 1.0
    if released is not None and released >= -1.0:
        assert ratio == released and not caught
    else:
        assert ratio == -1.0 and len(caught) == 1


@given(model_families(n=st.integers(2, 4)))
def test_model_stock_agrees_with_a_naive_numpy_implementation(family):
    base, models = family
    assert_state_dicts_close(quiet_stock(models, base), naive_model_stock(models, base), atol=1e-4)


@given(model_families(n=2, dtypes=[torch.float64]))
def test_float64_inputs_are_merged_in_float64(family):
    base, models = family
    merged = quiet_stock(models, base)
    assert all(merged[k].dtype == base[k].dtype for k in base)
    assert_state_dicts_close(merged, naive_model_stock(models, base), rtol=1e-12, atol=1e-12)


@given(model_families(n=1), st.integers(2, 5))
def test_identical_fine_tunes_give_that_fine_tune(family, n):
    base, (model,) = family
    # The 1e-8 in the cosine keeps t a little under 1 for tiny task vectors: at most
    # √G·1e-8/(G + 1e-8) ≤ 5e-5 away.
    assert_state_dicts_close(
        {k: v for k, v in quiet_stock([model] * n, base).items() if k != BUFFER_KEY},
        {k: v for k, v in model.items() if k != BUFFER_KEY},
        atol=1e-4,
    )


@given(model_families(n=st.integers(2, 4)))
def test_orthogonal_task_vectors_give_the_base_exactly(family):
    base, models = family
    n = len(models)
    # Disjoint supports: entry e of every key moves only in model e mod n.
    for i, model in enumerate(models):
        for key, value in base.items():
            if value.is_floating_point():
                owner = torch.arange(value.numel()).reshape(value.shape) % n == i
                model[key] = torch.where(owner, model[key], value)
    merged = ladle.model_stock(models, base, device="cpu")
    for key in base:
        assert torch.equal(merged[key], base[key]), key


@given(model_families(n=st.integers(2, 4)), st.randoms())
def test_model_order_does_not_matter(family, rng):
    base, models = family
    shuffled = list(models)
    rng.shuffle(shuffled)
    # t differs by float64 rounding at most (the Gram product sees rows in another order, the
    # cosines are summed with fsum); Σ models is re-associated in float32.
    assert_state_dicts_close(quiet_stock(shuffled, base), quiet_stock(models, base), atol=1e-4)


@settings(max_examples=15)
@given(
    model_families(n=st.integers(2, 3), max_side=6),
    st.integers(4, 64),
    st.sampled_from([None, torch.float32, torch.bfloat16]),
)
def test_streaming_output_equals_in_memory_bit_for_bit(tmp_path_factory, family, chunk, dtype):
    base, models = family
    directory = tmp_path_factory.mktemp("stock")
    save_file(base, directory / "base.safetensors")
    paths = []
    for i, model in enumerate(models):
        save_file(model, directory / f"m{i}.safetensors")
        paths.append(directory / f"m{i}.safetensors")
    kwargs = {"dtype": dtype, "chunk_bytes": chunk}
    in_memory = quiet_stock(models, base, **kwargs)
    out = quiet_stock(
        paths, directory / "base.safetensors", out=directory / "out", max_shard_size=64, **kwargs
    )
    streamed = ladle.load(out)
    assert_bit_for_bit(streamed, in_memory)


def test_chunk_size_changes_the_result_only_by_rounding(monkeypatch):
    ratios = []

    def recorded(*args, **kwargs):
        ratios.append(real(*args, **kwargs))
        return ratios[-1]

    real = stock.stock_ratio
    monkeypatch.setattr(stock, "stock_ratio", recorded)
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 8, generator=gen)}
    models = [{"w": base["w"] + 0.1 * torch.randn(64, 8, generator=gen)} for _ in range(3)]
    whole = ladle.model_stock(models, base, device="cpu")
    rows = ladle.model_stock(models, base, device="cpu", chunk_bytes=32)
    # Per-chunk float32 Gram products round differently, which moves t by a few float32
    # steps: the result moves by at most two steps of its own size or of mean − base.
    step = (torch.stack([m["w"] for m in models]).mean(0) - base["w"]).abs()
    bound = 2 * 2.0**-23 * torch.maximum(whole["w"].abs(), step)
    assert ((rows["w"] - whole["w"]).abs() <= bound).all()
    assert ratios[0] != ratios[1]  # the chunks did change the rounding (of t)


def record_gram_chunks(monkeypatch):
    """The entries of every chunk the Gram pass reads, in order, as a list filled as it runs."""
    seen = []
    original = stock.gram_kernel

    def recording(n, **options):
        kernel = original(n, **options)

        def update(state, index, x):
            seen.append(x.numel())
            return kernel.update(state, index, x)

        return kernel._replace(update=update)

    monkeypatch.setattr(stock, "gram_kernel", recording)
    return seen


@pytest.mark.parametrize(
    ("gram_cap", "chunk_bytes"),
    [(None, 400), (400, 800)],
    ids=["chunk_bytes", "capped at GRAM_CHUNK_BYTES"],
)
def test_statistics_pass_holds_row_chunks_not_whole_tensors(monkeypatch, gram_cap, chunk_bytes):
    # The Gram pass's chunks are chunk_bytes (400: 10 float32 rows), capped at
    # GRAM_CHUNK_BYTES (here 400) whatever chunk_bytes the merging pass uses (800: 20 rows).
    if gram_cap is not None:
        monkeypatch.setattr(stock, "GRAM_CHUNK_BYTES", gram_cap)
    seen = record_gram_chunks(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(100, 10, generator=gen)}
    models = [{"w": torch.randn(100, 10, generator=gen)} for _ in range(3)]
    ladle.model_stock(models, base, device="cpu", chunk_bytes=chunk_bytes)
    # 10 rows (100 entries) per chunk, 10 chunks × 3 models.
    assert seen == [100] * 30


def test_integer_buffers_come_from_the_base_and_dtypes_are_kept():
    gen = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(3, 2, generator=gen).bfloat16(), "n": torch.tensor(5)}
    models = [{"w": torch.randn(3, 2, generator=gen).bfloat16(), "n": torch.tensor(9)}] * 2
    merged = ladle.model_stock(models, base, device="cpu")
    assert merged["w"].dtype == torch.bfloat16 and merged["n"].item() == 5
    assert ladle.model_stock(models, base, dtype=torch.float32)["w"].dtype == torch.float32


@pytest.mark.parametrize("count", [0, 1])
def test_fewer_than_two_models_is_a_value_error_naming_models(count):
    base = {"w": t([0.0])}
    with pytest.raises(ValueError, match="models"):
        ladle.model_stock([{"w": t([1.0])}] * count, base)


def test_missing_base_is_a_value_error_naming_base():
    with pytest.raises(ValueError, match="base"):
        ladle.model_stock([{"w": t([1.0])}] * 2, None)  # type: ignore[arg-type]


def test_mismatched_shapes_raise_incompatible_error():
    base = {"w": t([0.0, 0.0])}
    with pytest.raises(ladle.IncompatibleError, match=r"model 1 .*'w'"):
        ladle.model_stock([{"w": t([1.0, 0.0])}, {"w": t([1.0])}], base)


def test_cli_stock_writes_the_merge_and_rejects_a_single_model(tmp_path, capsys):
    base = {"w": t([1.0, 1.0])}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": t([6.0, 1.0])}, tmp_path / "a.safetensors")
    save_file({"w": t([4.0, 5.0])}, tmp_path / "b.safetensors")
    out = tmp_path / "out.safetensors"
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    args = ["stock", "--base", str(tmp_path / "base.safetensors"), "--no-progress"]
    assert main([*args, a, b, "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    torch.testing.assert_close(ladle.load(out)["w"], t([4.0, 2.5]), rtol=0, atol=1e-6)
    with pytest.raises(SystemExit) as exit_info:  # a usage error: the command line shows it
        main([*args, a, "-o", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2
    assert "Model Stock needs at least 2 models, found 1" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 2, 5, 9, 12])
@pytest.mark.parametrize("count", [1, 7, 8, 9, 24, 29])
def test_gram_over_blocks_and_a_tail_equals_the_float64_product(monkeypatch, count, n):
    monkeypatch.setattr(stock, "GRAM_BLOCK", 8)
    taus = torch.randn(n, count, generator=torch.Generator().manual_seed(count))
    expected = taus.double() @ taus.double().T
    gram = stock._gram(taus)
    torch.testing.assert_close(gram, expected, rtol=1e-6, atol=1e-6)
    assert gram.dtype == torch.float64
    assert torch.equal(gram, gram.T)  # each pair's product is computed once, for both entries


def test_task_vectors_whose_products_overflow_float32_are_merged_in_float64():
    base = {"w": torch.zeros(2)}
    model = {"w": torch.tensor([2e19, 1e19])}  # 4e38 overflows float32 in the Gram product
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "near the pole" warning: cos θ = 1, t = 1
        merged = ladle.model_stock([model, model], base, device="cpu")
    torch.testing.assert_close(merged["w"], model["w"], rtol=1e-6, atol=0)


def test_gram_sums_blocks_and_the_tail_in_float64(monkeypatch):
    # Blocks of 8 columns: block 0 gives 1, block 1 gives 4096² = 2²⁴, the tail gives 1. Each
    # product is exact in float32; their sum 2²⁴ + 2 only in float64 (float32 sums of 2²⁴ and
    # 1 round to 2²⁴), and only if no float32 product spans block 1 and the tail.
    monkeypatch.setattr(stock, "GRAM_BLOCK", 8)
    row = torch.zeros(21)
    row[0], row[8], row[16] = 1.0, 4096.0, 1.0
    gram = stock._gram(torch.stack([row, row]))
    assert gram.dtype == torch.float64
    assert gram.tolist() == [[2.0**24 + 2] * 2] * 2


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_a_reduced_float32_matmul_precision_has_the_gram_pass_compute_in_float64(precision):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)  # TF32 or bfloat16 products allowed
    try:
        assert not stock._exact_float32_matmul(torch.device("cpu"))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert not stock._exact_float32_matmul(torch.device("cuda"))


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_a_matmul_precision_set_by_fp32_precision_is_read_not_an_error():
    # torch's fp32_precision settings (which replace set_float32_matmul_precision) make
    # torch.get_float32_matmul_precision() raise: model_stock on the CPU was that RuntimeError
    # ("... used mix of the legacy and new APIs ...") for a script that asked for TF32 on CUDA.
    backends = torch.backends
    cpu, cuda = getattr(backends.mkldnn, "matmul", None), backends.cuda.matmul
    if not hasattr(cpu, "fp32_precision") or not hasattr(cuda, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision settings")
    previous = cpu.fp32_precision, cuda.fp32_precision
    legacy = torch.get_float32_matmul_precision()
    base = {"w": torch.tensor([1.0, 1.0])}
    models = [{"w": torch.tensor([6.0, 1.0])}, {"w": torch.tensor([4.0, 5.0])}]  # t = 0.75
    try:
        cuda.fp32_precision = "tf32"  # CUDA's products only: the CPU's stay float32
        assert stock._exact_float32_matmul(torch.device("cpu"))
        assert ladle.model_stock(models, base, device="cpu")["w"].tolist() == [4.0, 2.5]
        cpu.fp32_precision = "tf32"  # the CPU's products may run in TF32: float64 instead
        assert not stock._exact_float32_matmul(torch.device("cpu"))
        assert ladle.model_stock(models, base, device="cpu")["w"].tolist() == [4.0, 2.5]
    finally:
        cpu.fp32_precision, cuda.fp32_precision = previous
    assert torch.get_float32_matmul_precision() == legacy  # settings left as they were


def test_a_nan_cosine_makes_the_mean_nan_and_the_ratio_nan_without_a_warning():
    # An infinite τ₀ (allow_nonfinite) makes its Gram entries infinite and its cosines
    # inf/inf = NaN: kept NaN (not clamped to −1), so the mean is NaN. Clamped to −1, with
    # τ₁ = τ₂ = τ₃ the six cosines would be three −1s and three 1s: a mean of about 0, t ≈ 0.
    # t is NaN, as the formula gives; it was clamped to −1 with a warning about a pole that
    # is not there, reflecting the key's finite entries through the base.
    inf = math.inf
    gram = [[inf, inf, inf, inf], *([inf, 1.0, 1.0, 1.0] for _ in range(3))]
    assert math.isnan(stock.mean_cosine(gram))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(stock_ratio(stock.mean_cosine(gram), 4, key="w"))


def test_mean_cosine_divides_by_the_root_of_the_product_of_squared_norms():
    # The released code's ‖τᵢ‖·‖τⱼ‖ as √(‖τᵢ‖²·‖τⱼ‖²): for squared norms 2 and 3, √6 rounds
    # differently from √2·√3, and the cosine follows it bit for bit.
    gram = [[2.0, 1.0], [1.0, 3.0]]
    assert stock.mean_cosine(gram) == 1.0 / (math.sqrt(6.0) + 1e-8)
    assert 1.0 / (math.sqrt(2.0) * math.sqrt(3.0) + 1e-8) != stock.mean_cosine(gram)


def test_mean_cosine_sums_the_pairs_exactly_so_their_order_does_not_matter():
    # Cosines 0.1, 0.2, 0.2 (over 1 + 1e-8): summed left to right they round otherwise than
    # math.fsum's exact sum, and otherwise than in the order 0.2, 0.2, 0.1 (models reordered).
    gram = [[1.0, 0.1, 0.2], [0.1, 1.0, 0.2], [0.2, 0.2, 1.0]]
    cosines = [value / (1.0 + 1e-8) for value in (0.1, 0.2, 0.2)]
    # Added one by one (Python 3.12's sum() compensates its rounding, so not sum()).
    assert (cosines[0] + cosines[1]) + cosines[2] != math.fsum(cosines)  # the order would show
    assert stock.mean_cosine(gram) == math.fsum(cosines) / 3
    reordered = [[1.0, 0.2, 0.2], [0.2, 1.0, 0.1], [0.2, 0.1, 1.0]]  # models 2, 0, 1
    assert stock.mean_cosine(reordered) == stock.mean_cosine(gram)


def test_the_float64_gram_pass_subtracts_the_base_from_each_cast_model():
    # Under a reduced float32 matmul precision the Gram pass casts each float32 chunk to
    # float64 and subtracts the base there: the hand-worked examples hold (t = 0.75, 3/7).
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert not stock._exact_float32_matmul(torch.device("cpu"))
        two = [{"w": t([6.0, 1.0])}, {"w": t([4.0, 5.0])}]
        worked = ladle.model_stock(two, {"w": t([1.0, 1.0])}, device="cpu")
        assert worked["w"].tolist() == [4.0, 2.5]
        three = [{"w": t(v)} for v in ([6.0, 2, 3], [4.0, 6, 3], [1.0, 2, 5])]
        merged = ladle.model_stock(three, {"w": t([1.0, 2.0, 3.0])}, device="cpu")
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(merged["w"], t([15 / 7, 18 / 7, 23 / 7]), rtol=1e-6, atol=1e-6)


def test_the_clamp_warning_states_t_the_cosine_and_the_pole_and_points_at_the_caller():
    # cos θ = −0.45 of 3 task vectors: t = 3·(−0.45)/(2·(−0.45) + 1 + 1e-8) = −13.4999987;
    # the pole of N = 3 is at cos θ = −1/2.
    with pytest.warns(ModelStockWarning) as record:
        assert stock_ratio(-0.45, 3, key="k") == -1.0
    assert str(record[0].message) == (
        "model_stock: key 'k': t = -13.5 (mean cosine -0.45 of 3 task vectors, near the pole "
        "at cos θ = -0.5) clamped to -1"
    )
    assert record[0].filename == __file__  # the caller of stock_ratio, not the module


def test_mean_cosine_reads_only_the_upper_triangle_and_the_diagonal():
    # The lower triangle may hold anything: here 99, which would clamp to a cosine of 1.
    assert stock.mean_cosine([[25.0, 15.0], [99.0, 25.0]]) == 15.0 / (25.0 + 1e-8)


@pytest.mark.parametrize(("precision", "exact"), [("highest", False), ("high", True)])
def test_the_gram_pass_multiplies_float32_on_the_cpu_float64_under_tf32(precision, exact):
    # τ = [1 + 2⁻¹²]: ⟨τ, τ⟩ = 1 + 2⁻¹¹ + 2⁻²⁴ needs 25 bits. A float32 product rounds it to
    # 1 + 2⁻¹¹ (a tie, to even); a float64 one, as under a reduced precision, holds it.
    base = ladle.open_checkpoint({"w": torch.zeros(1)})
    models = [ladle.open_checkpoint({"w": torch.tensor([1.0 + 2**-12])})] * 2
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        ((_, _, gram),) = fold(models, stock.gram_kernel(2), base=base, device=torch.device("cpu"))
    finally:
        torch.set_float32_matmul_precision(previous)
    value = 1 + 2**-11 + 2**-24 if exact else 1 + 2**-11
    assert gram.tolist() == [[value, value], [value, value]]


def test_the_gram_pass_reads_chunks_of_two_mib_whatever_the_default_chunk_bytes(monkeypatch):
    # GRAM_CHUNK_BYTES is 2 MiB: a 4 MiB float32 tensor, one chunk of the merging pass, is
    # read by the Gram pass as two chunks of 512 rows per model.
    seen = record_gram_chunks(monkeypatch)
    base = {"w": torch.zeros(1024, 1024)}
    models = [{"w": torch.ones(1024, 1024)}, {"w": torch.full((1024, 1024), 2.0)}]
    merged = ladle.model_stock(models, base, device="cpu")
    assert seen == [512 * 1024] * 4
    torch.testing.assert_close(merged["w"], torch.full((1024, 1024), 1.5), rtol=1e-6, atol=0)


def test_the_gram_product_sums_float32_blocks_of_gram_block_columns_in_float64():
    # 4096² and 1² in the first block of B columns: their float32 sum 2²⁴ + 1 rounds to 2²⁴
    # (a tie, to even). The 1² in the next block is added in float64: 2²⁴ + 1. Blocks of B/2
    # columns would give 2²⁴ + 2, one float32 sum over all B + 1 columns 2²⁴ or 2²⁴ + 2.
    block = stock.GRAM_BLOCK
    assert block == 1024  # the default this test is about
    row = torch.zeros(block + 1)
    row[0], row[block // 2], row[block] = 4096.0, 1.0, 1.0
    assert stock._gram(torch.stack([row, row])).tolist() == [[2.0**24 + 1] * 2] * 2


def test_allow_nonfinite_merges_a_nan_input_into_a_nan_tensor():
    # The Gram pass lets the NaN through too: the cosine is NaN, so t is NaN and so is the
    # key, as the formula gives. It was t = −1 with a warning about the pole:
    # θ = 2·θ₀ − mean(θᵢ) = [NaN, 2 − (3 + 5)/2 = −2]. Without the flag: NonFiniteError.
    base = {"w": t([1.0, 1.0]), "v": t([1.0, 2.0])}
    models = [
        {"w": t([math.nan, 3.0]), "v": t([2.0, 3.0])},
        {"w": t([2.0, 5.0]), "v": t([3.0, 1.0])},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = ladle.model_stock(models, base, device="cpu", allow_nonfinite=True)
    assert merged["w"].isnan().all()
    expected = ladle.model_stock([{"v": m["v"]} for m in models], {"v": base["v"]}, device="cpu")
    assert torch.equal(merged["v"], expected["v"])  # other keys as without the NaN
    with pytest.raises(ladle.NonFiniteError, match=r"model 0 .*'w'"):
        ladle.model_stock(models, base, device="cpu")


def test_the_output_records_the_epsilon_the_clamp_and_the_chunk_size(tmp_path):
    base = {"w": t([1.0, 1.0])}
    models = [{"w": t([6.0, 1.0])}, {"w": t([4.0, 5.0])}]
    # chunk_bytes as the int it stands for (a numpy integer would not be one in the recipe).
    size = np.int64(64)
    out = ladle.model_stock(models, base, out=tmp_path / "o.safetensors", chunk_bytes=size)
    with safe_open(str(out), "pt") as f:
        parameters = json.loads(f.metadata()["ladle.parameters"])
    assert parameters == {"eps": 1e-8, "t_min": -1.0, "chunk_bytes": 64}


def test_float64_task_vectors_whose_norms_multiply_past_float_range_keep_their_cosine():
    # ‖τ₁‖²·‖τ₂‖² = 2e400 is inf: the cosine was 0, t = 0, and the key came back as the
    # base; parallel task vectors have cos θ = 1, t ≈ 1: their mean
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    models = [{"w": torch.tensor([s * 1e100, 0.0], dtype=torch.float64)} for s in (1.0, 2.0)]
    assert stock.mean_cosine([[1e200, 2e200], [2e200, 4e200]]) == pytest.approx(1.0, rel=1e-15)
    merged = ladle.model_stock(models, base, device="cpu")["w"]
    assert merged[0].item() == pytest.approx(1.5e100, rel=1e-7) and merged[1].item() == 0.0


def test_a_ratio_below_float32s_normals_scales_the_sum_exactly():
    # t/N = 1e-40 was rounded to a float32 subnormal first: 90 float32 steps off.
    base = {"w": torch.zeros(2)}
    models = [{"w": torch.tensor([1e30, 0.0])}, {"w": torch.tensor([1e-10, 1e30])}]
    taus = torch.stack([m["w"].double() for m in models])
    gram = taus @ taus.T
    cosine = (gram[0, 1] / (gram[0, 0].sqrt() * gram[1, 1].sqrt() + 1e-8)).item()
    t = 2 * cosine / (cosine + 1 + 1e-8)
    total = (models[0]["w"] + models[1]["w"]).double()  # Σθ as float32 folds it (exact here)
    expected = (total * (t / 2)).float()  # one rounding of the product
    assert torch.equal(ladle.model_stock(models, base, device="cpu")["w"], expected)


def test_models_whose_sum_passes_float32s_range_merge_where_their_mean_fits():
    # The models' float32 sum overflowed (NonFiniteError "... overflow float32 although
    # every input is finite"); the mean, and every other method's result, fits.
    base = {"w": torch.tensor([1.5e38, 0.0])}
    models = [{"w": torch.tensor([1.5e38, float(i)])} for i in (1, 2, 3)]
    merged = ladle.model_stock(models, base, device="cpu")["w"]
    # τᵢ = [0, i] are parallel: cos θ = 1, t = 3/(3 + 1e-8), result ≈ t·mean + (1 − t)·base
    t = 3 / (2 + 1 + 1e-8)
    expected = [1.5e38, t * 2.0]
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, torch.tensor(expected), rtol=2**-22, atol=0)


def test_key_grams_are_symmetric_bit_for_bit():
    # Each block's products are found for i <= j and mirrored: computed for both orders, the
    # float sums of 5 task vectors of 10,000 entries differed in the last bit (7e-15).
    taus = torch.randn(5, 10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = ladle.open_checkpoint({"w": torch.zeros(10_000, dtype=torch.float64)})
    models = [ladle.open_checkpoint({"w": tau.clone()}) for tau in taus]
    gram = stock.key_grams(
        models, base, device=torch.device("cpu"), chunk_bytes=2**20, allow_nonfinite=False
    )["w"]
    assert torch.equal(gram, gram.T)
    exact = [[math.fsum(x * y for x, y in zip(a.tolist(), b.tolist())) for b in taus] for a in taus]
    assert torch.allclose(gram, torch.tensor(exact, dtype=torch.float64), rtol=1e-12, atol=1e-9)


def test_a_warning_during_a_progress_bar_starts_on_a_cleared_line(capsys):
    # Python code (not the CLI, which writes through tqdm.write): Model Stock's warning in its
    # "preparing" pass was printed at the end of the bar's line, glued to it
    base = {"w": torch.zeros(2), "v": torch.zeros(3)}
    models = [
        {"w": torch.tensor([1.0, 0.0]), "v": torch.ones(3)},
        {"w": torch.tensor([-1.0, 0.0]), "v": torch.ones(3)},
    ]

    def show(message, category, filename, lineno, file=None, line=None):  # Python's own print
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():  # pytest records warnings: print them, as Python does
        warnings.simplefilter("always")
        warnings.showwarning = show
        merged = ladle.model_stock(models, base, device="cpu", progress=True)
    assert torch.equal(merged["w"], torch.zeros(2))  # t clamped to -1: the base
    err = capsys.readouterr().err
    at = err.index("ModelStockWarning: model_stock: key 'w'")
    line = err[max(err.rfind("\n", 0, at), err.rfind("\r", 0, at)) + 1 : at]
    assert line.startswith(__file__) and line.endswith(": ")  # the warning's own line
    assert "preparing" not in line and "\rpreparing:" in err[:at]  # the bar cleared before it
    assert err.index("preparing: 100%") > at  # and redrawn after it
