from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import assert_bit_for_bit, assert_close_by_dtype, families, family, save_all
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import ladle
from ladle.cli import main
from ladle.methods import ties as ties_module
from ladle.methods.ties import magnitude_thresholds
from ladle.testing import model_families


def floating_keys(model):
    return [k for k, v in model.items() if v.is_floating_point()]


def compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def task_vector(model, base, key):
    """τ as the library defines it: model − base in the compute dtype."""
    dtype = compute_dtype(model[key], base[key])
    return model[key].to(dtype) - base[key].to(dtype)


def kth_magnitude(magnitudes, density):
    """torch.kthvalue at the paper code's rank, or None when nothing is trimmed."""
    d = magnitudes.numel()
    k = d - int(d * density)
    return magnitudes.kthvalue(k).values.item() if k >= 1 else None


def naive_ties(models, base, *, density, scale, trim):
    """Flatten everything; trim on the float32 magnitudes; elect and average in float64."""
    keys = floating_keys(base)
    offsets, segments, trimmed = naive_trim(models, base, density=density, trim=trim)
    merged = naive_elect(trimmed, segments)
    out = dict(base)
    for key, lo, hi in zip(keys, offsets[:-1], offsets[1:]):
        value = base[key].double().numpy().ravel() + scale * merged[lo:hi]
        out[key] = torch.from_numpy(value.reshape(base[key].shape)).to(base[key].dtype)
    return out


def naive_trim(models, base, *, density, trim):
    """The floating keys' offsets in the flattened model, the trim's segments of it, and the
    trimmed task vectors: a models × entries float64 array."""
    keys = floating_keys(base)
    sizes = [base[k].numel() for k in keys]
    offsets = np.cumsum([0, *sizes])
    taus = [np.concatenate([task_vector(m, base, k).numpy().ravel() for k in keys]) for m in models]
    segments = [(0, offsets[-1])] if trim == "global" else list(itertools.pairwise(offsets))
    trimmed = []
    for tau in taus:
        kept = tau.copy()
        for lo, hi in segments:
            magnitude = np.abs(tau[lo:hi])
            d = hi - lo
            k = d - int(d * density)
            if k >= 1:
                kept[lo:hi][magnitude < np.sort(magnitude)[k - 1]] = 0
        trimmed.append(kept.astype(np.float64))
    return offsets, segments, np.stack(trimmed)


def elections_are_exact(deltas):
    """Whether every entry's sum over the models of ``deltas`` (a models × entries float64
    array of float32 values) is 0 or far from float32 rounding of 0: where it is not, the
    elected sign depends on the order of the additions (ladle adds the positive values, then
    the negative ones, in float32)."""
    total, size = np.abs(deltas.sum(axis=0)), np.abs(deltas).sum(axis=0)
    return bool(np.all((total == 0) | (total > 2.0**-16 * size)))


def naive_elect(deltas, segments):
    """Sign election and disjoint mean of the rows of ``deltas``; γ = 0 takes the sign of
    Σγ over its segment."""
    total = deltas.sum(axis=0)
    gamma = np.sign(total)
    for lo, hi in segments:
        majority = np.sign(gamma[lo:hi].sum())
        gamma[lo:hi][gamma[lo:hi] == 0] = majority
    agree = (np.sign(deltas) == gamma) & (deltas != 0)
    count = np.maximum(agree.sum(axis=0), 1)
    return np.where(agree, deltas, 0).sum(axis=0) / count


def assert_close(actual, expected):
    assert_close_by_dtype(
        actual,
        expected,
        precise=(1e-5, 1e-5),
        low=(2**-7, 1e-3),
        precise_dtypes=(torch.float32, torch.float64),
    )


@st.composite
def task_families(draw, min_n=1, max_n=4, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """A base and fine-tunes; half the time every weight is a multiple of 0.25 and the task
    vectors lie in [−0.75, 0.75], so magnitudes tie, many are exactly zero, every sum is exact
    and sign elections often cancel exactly (the majority rule decides)."""
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from(dtypes))
    coarse = draw(st.booleans())
    base = family(1, seed=seed, dtype=dtype)[0]
    gen = torch.Generator().manual_seed(seed + 1)
    if coarse:
        base = {
            k: (torch.randint(-8, 9, v.shape, generator=gen) * 0.25).to(dtype)
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
    models = []
    for i in range(n):
        model = {}
        for key, value in base.items():
            if not value.is_floating_point():
                model[key] = value + i + 1
                continue
            if coarse:
                tau = torch.randint(-3, 4, value.shape, generator=gen).double() * 0.25
            else:
                tau = torch.randn(value.shape, generator=gen, dtype=torch.float64)
            model[key] = (value.double() + tau).to(dtype)
        models.append(model)
    return models, base


# --- hand-worked formulas ------------------------------------------------------------------


def test_worked_example_trims_elects_and_takes_the_disjoint_mean():
    base = {"w": torch.ones(4)}
    taus = [[1.0, -2.0, 0.5, 3.0], [-1.5, 1.0, 2.0, -0.5], [-2.5, 0.25, 4.0, -1.0]]
    models = [{"w": torch.tensor(t) + 1} for t in taus]
    # density 0.5, d = 4: keep |τ| ≥ the 2nd smallest magnitude (1.0 for each model):
    # trimmed [1, −2, 0, 3], [−1.5, 1, 2, 0], [−2.5, 0, 4, −1]; Σ = [−3, −1, 6, 2];
    # γ = [−, −, +, +]; disjoint means [−2, −2, 3, 3]; 1 + 0.5·merged = [0, 0, 2.5, 2.5].
    for trim in ("global", "tensor"):
        merged = ladle.ties(models, base, density=0.5, scale=0.5, trim=trim, device="cpu")
        assert merged["w"].tolist() == [0.0, 0.0, 2.5, 2.5]


@pytest.mark.parametrize("trim", ["global", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_entries_tied_with_the_threshold_are_all_kept(dtype, trim):
    # float64 trims through its own path (the number below the threshold in float64).
    base = {"w": torch.zeros(4, dtype=dtype)}
    model = {"w": torch.tensor([1.0, -1.0, 1.0, 0.5], dtype=dtype)}
    # d = 4, density 0.5: the 2nd smallest magnitude is 1.0, and all three 1.0s are kept.
    merged = ladle.ties([model], base, density=0.5, trim=trim, device="cpu")
    assert merged["w"].dtype == dtype
    assert merged["w"].tolist() == [1.0, -1.0, 1.0, 0.0]


def test_sign_ties_take_the_majority_of_the_trim_scope():
    base = {"a": torch.zeros(4), "b": torch.zeros(3)}
    one = {"a": torch.tensor([1.0, 2.0, 3.0, -1.0]), "b": torch.tensor([-2.0, 1.0, -1.0])}
    two = {"a": torch.tensor([-1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([-1.0, -1.0, 1.0])}
    # Σ: a = [0, 3, 4, 0], b = [−3, 0, 0]; γ over a: [0, +, +, 0] (vote +2); over b: [−, 0, 0]
    # (vote −1); over the whole model the vote is +1.
    per_tensor = ladle.ties([one, two], base, density=1.0, trim="tensor")
    assert per_tensor["a"].tolist() == [1.0, 1.5, 2.0, 1.0]
    assert per_tensor["b"].tolist() == [-1.5, -1.0, -1.0]
    whole = ladle.ties([one, two], base, density=1.0, trim="global")
    assert whole["a"].tolist() == [1.0, 1.5, 2.0, 1.0]
    assert whole["b"].tolist() == [-1.5, 1.0, 1.0]


def test_entries_stay_at_the_base_when_the_majority_is_zero_too():
    base = {"w": torch.tensor([5.0, 5.0])}
    models = [{"w": torch.tensor([6.0, 4.0])}, {"w": torch.tensor([4.0, 6.0])}]
    assert ladle.ties(models, base, density=1.0)["w"].tolist() == [5.0, 5.0]


def test_global_trim_ranks_across_tensors_and_tensor_trim_within_each():
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    model = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 20.0])}
    # global: d = 4, k = 4 − 2 = 2: threshold 2, so a loses 1; tensor: d = 2, k = 1: keep all.
    assert ladle.ties([model], base, density=0.5, trim="global")["a"].tolist() == [0.0, 2.0]
    assert ladle.ties([model], base, density=0.5, trim="tensor")["a"].tolist() == [1.0, 2.0]


def test_integer_buffers_come_from_the_base_and_dtype_is_kept():
    base, *models = family(3, dtype=torch.bfloat16)
    merged = ladle.ties(models, base, device="cpu")
    assert merged["bn.num_batches_tracked"].item() == 100
    assert merged["layer.weight"].dtype == torch.bfloat16


# --- thresholds: the streaming radix select equals torch.kthvalue ---------------------------


def check_thresholds(models, base, density, trim, chunk_bytes):
    found = magnitude_thresholds(
        models, base, density=density, trim=trim, device="cpu", chunk_bytes=chunk_bytes
    )
    keys = floating_keys(base)
    for i, model in enumerate(models):
        taus = {key: task_vector(model, base, key) for key in keys}
        scopes = [keys] if trim == "global" else [[key] for key in keys]
        for scope in scopes:
            wide = any(taus[k].dtype == torch.float64 for k in scope)
            magnitudes = torch.cat(
                [
                    taus[k].abs().flatten().to(torch.float64 if wide else torch.float32)
                    for k in scope
                ]
            )
            expected = kth_magnitude(magnitudes, density)
            for key in scope:
                if expected is None:
                    assert found[i][key] == 0.0
                elif taus[key].dtype == magnitudes.dtype:
                    assert found[i][key] == expected, (i, key)
                else:  # a float32 tensor ranked among float64 ones: the same entries survive
                    assert torch.equal(
                        taus[key].abs() >= found[i][key], taus[key].abs().double() >= expected
                    )


SELECTIONS = {  # module attributes patched: how the thresholds are found
    "sample brackets it (one pass)": {},
    "one pass, each chunk's window counted at once": {"INSIDE_BATCH": 1},
    "tiny sample (guesses miss)": {"SAMPLE": 3},
    "radix select only (two passes)": {"_select_in_window": lambda *a, **k: None},
}


@given(
    task_families(dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)),
    st.floats(0.01, 1.0),
    st.sampled_from(["global", "tensor"]),
    st.sampled_from([4, 12, 48, 2**20]),
    st.sampled_from(sorted(SELECTIONS)),
)
def test_radix_select_threshold_equals_kthvalue_exactly(
    family_and_base, density, trim, chunk, selection
):
    models, base = family_and_base
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SELECTIONS[selection].items():
            patch.setattr(ties_module, name, value)
        check_thresholds(models, base, density, trim, chunk)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_radix_select_on_larger_chunked_tensors_with_many_ties(seed, trim):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"emb": (300, 7), "proj": (33, 5), "bias": (5,)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    models = []
    for i in range(3):
        model = {}
        for key, value in base.items():
            tau = torch.randint(-40, 41, value.shape, generator=gen) * 2.0**-6
            if i == 1:  # fine magnitudes that share the top 16 bits, and zeros
                tau = (1.0 + torch.randint(0, 64, value.shape, generator=gen) * 2.0**-23) * (
                    torch.randint(0, 2, value.shape, generator=gen)
                )
            model[key] = value + tau
        models.append(model)
    for density in (0.05, 0.5, 0.93, 1.0):
        check_thresholds(models, base, density, trim, chunk_bytes=256)


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_a_sample_finds_thresholds_in_one_pass_and_a_bad_guess_falls_back(monkeypatch, trim):
    gen = torch.Generator().manual_seed(5)
    base = {"emb": torch.randn(400, 64, generator=gen), "bias": torch.randn(64, generator=gen)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}]
    models += [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()}]
    calls = []
    original = ties_module._radix_select
    monkeypatch.setattr(
        ties_module, "_radix_select", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    monkeypatch.setattr(ties_module, "SAMPLE", 2**12)  # fewer than the 25,664 entries
    monkeypatch.setattr(ties_module, "WINDOW", 2**24)  # so few sampled: wide windows
    for density in (0.03, 0.2, 0.5, 0.97):
        check_thresholds(models, base, density, trim, chunk_bytes=2**16)
    assert calls == []  # every threshold found by the one-pass window select
    monkeypatch.setattr(ties_module, "_SPREAD", -3.0)  # windows that miss the rank
    for density in (0.2, 0.5):
        check_thresholds(models, base, density, trim, chunk_bytes=2**16)
    assert len(calls) == 2


def test_the_sample_holds_about_sample_entries_when_every_key_has_long_rows(monkeypatch):
    # 300 keys of 2 rows of 2048: a key's share of the sample is 54 entries, far less than a
    # row. Whole rows made a sample of 300 × 2048 = 614,400 entries per model (a 70B LLaMA
    # layout: 6.2M, 24 MiB per model) where SAMPLE promises about 2**15 here.
    gen = torch.Generator().manual_seed(9)
    base = {f"k{i:03d}": torch.randn(2, 2048, generator=gen) for i in range(300)}
    models = [
        {k: v + torch.randn(v.shape, generator=gen) * (1 + i) for k, v in base.items()}
        for i in range(2)
    ]
    monkeypatch.setattr(ties_module, "SAMPLE", 2**15)
    sizes, fallbacks = [], []
    kth, radix = ties_module._kth_patterns, ties_module._radix_select
    monkeypatch.setattr(
        ties_module,
        "_kth_patterns",
        lambda bits, ranks: sizes.append(bits.numel()) or kth(bits, ranks),
    )
    monkeypatch.setattr(
        ties_module, "_radix_select", lambda *a, **k: fallbacks.append(1) or radix(*a, **k)
    )
    check_thresholds(models, base, 0.2, "global", chunk_bytes=2**16)
    assert sizes and max(sizes) <= 1.1 * 2**15, sizes  # each key's share, rounded up a little
    assert min(sizes) >= 2**15, sizes
    assert fallbacks == []  # the smaller sample still brackets the threshold: one pass


@pytest.mark.parametrize("flush", [False, True])
def test_thresholds_among_subnormal_and_huge_magnitudes_are_exact(flush):
    # Windows in the subnormal range, at zero, and between huge normals: the window count
    # compares bit patterns there, floats elsewhere (also with subnormals flushed to zero).
    gen = torch.Generator().manual_seed(11)
    base = {"w": torch.zeros(64, 32), "v": torch.randn(500, generator=gen)}
    models = []
    for _ in range(2):
        tiny = torch.randint(-9, 10, (64, 32), generator=gen) * 2.0**-140  # subnormal
        huge = torch.randn(64, 32, generator=gen) * 2.0**120
        pick = torch.rand(64, 32, generator=gen)
        tau = torch.where(pick < 0.6, tiny, torch.where(pick < 0.8, huge, 0.0))
        models.append({"w": base["w"] + tau, "v": base["v"] + torch.randn(500, generator=gen)})
    supported = torch.set_flush_denormal(flush)
    try:
        if flush and not supported:
            pytest.skip("flushing subnormals is not supported on this CPU")
        for density in (0.1, 0.3, 0.5, 0.7, 0.95):
            check_thresholds(models, base, density, "tensor", chunk_bytes=512)
            check_thresholds(models, base, density, "global", chunk_bytes=512)
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("rest", ["none", "subnormal", "normal"])
def test_mostly_zero_task_vectors_count_their_zeros_apart_exactly(monkeypatch, flush, rest):
    # Frozen layers, or a fine-tune equal to the base: most of τ is 0 and the threshold 0 or
    # just above. A window from pattern 0 counts the zeros with a sum and gathers only the
    # other patterns inside it: those of subnormal or, past the end of a wider window, of
    # normal magnitudes (the window's end compared as patterns, then as a float).
    gen = torch.Generator().manual_seed(13)
    base = {"w": torch.zeros(64, 32), "v": torch.zeros(300)}  # τ this small stays whole
    values = {
        "none": lambda shape: torch.zeros(shape),
        "subnormal": lambda shape: torch.randint(-9, 10, shape, generator=gen) * 2.0**-140,
        "normal": lambda shape: torch.randn(shape, generator=gen) * 1e-30,
    }[rest]
    models = []
    for share in (0.1, 0.3):  # of entries not frozen
        model = {}
        for key, value in base.items():
            live = torch.rand(value.shape, generator=gen) < share
            model[key] = value + torch.where(live, values(value.shape), 0.0)
        models.append(model)
    from_zero, radix = ties_module._from_zero, ties_module._radix_select
    calls, fallbacks = [], []
    monkeypatch.setattr(ties_module, "_from_zero", lambda *a: calls.append(a[2]) or from_zero(*a))
    monkeypatch.setattr(
        ties_module, "_radix_select", lambda *a, **k: fallbacks.append(1) or radix(*a, **k)
    )
    monkeypatch.setattr(ties_module, "SAMPLE", 2**8)  # fewer than the entries: a guess
    monkeypatch.setattr(ties_module, "WINDOW", 2**31)  # windows up to normal magnitudes
    supported = torch.set_flush_denormal(flush)
    try:
        if flush and not supported:
            pytest.skip("flushing subnormals is not supported on this CPU")
        for density in (0.05, 0.2, 0.75):
            for trim in ("global", "tensor"):
                check_thresholds(models, base, density, trim, chunk_bytes=512)
    finally:
        torch.set_flush_denormal(False)
    assert calls  # the windows from 0 were counted so
    # Wider than the zeros where τ has others (flushed, subnormal τ are zeros)
    assert (max(calls) > 1) == (rest == "normal" or (rest == "subnormal" and not flush))
    assert (max(calls) >= 2**23) == (rest == "normal")  # reaching normal magnitudes
    assert fallbacks == []


@given(
    st.lists(
        st.one_of(
            st.floats(width=32, allow_nan=True, allow_infinity=True),
            st.sampled_from([0.0, -0.0, 1e-45, 1.0, 1.0]),  # subnormals, repeats
        ),
        min_size=1,
        max_size=300,
    ),
    st.sampled_from([torch.float32, torch.float64]),
    st.data(),
)
def test_kth_patterns_by_sorting_bit_patterns_equals_kthvalue(values, dtype, data):
    magnitudes = torch.tensor(values, dtype=dtype).abs()
    bits = magnitudes.view(torch.int64 if dtype == torch.float64 else torch.int32)
    ranks = data.draw(st.lists(st.integers(1, magnitudes.numel()), min_size=1, max_size=3))
    for sort_below in (0, len(values)):  # the histogram of top bits, and one sort of all
        found = ties_module._kth_patterns(bits, ranks, sort_below=sort_below)
        for rank, pattern in zip(ranks, found):
            expected = magnitudes.kthvalue(rank).values
            got = torch.tensor(pattern, dtype=bits.dtype).view(dtype)
            assert torch.equal(got, expected) or (got.isnan() and expected.isnan())


@given(
    st.lists(st.booleans(), max_size=100).map(lambda bits: bits * 3),  # runs of words
    st.integers(0, 2),
    st.integers(0, 9),
)
def test_flat_nonzero_by_words_equals_nonzero(entries, density, offset):
    mask = torch.tensor(entries, dtype=torch.bool)
    if density == 0 and entries:  # sparse: most words empty
        mask &= torch.arange(mask.numel()) % 13 == 0
    if density == 2:
        mask |= torch.arange(mask.numel()) % 2 == 0  # dense: every word has a hit
    padded = torch.zeros(offset + mask.numel(), dtype=torch.bool)
    padded[offset:] = mask
    for flat in (mask, padded[offset:]):  # a word-aligned start, and maybe not
        got = ties_module._flat_nonzero(flat)
        assert got.dtype == torch.int64
        assert torch.equal(got, torch.nonzero(flat).squeeze(1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_window_pass_names_a_nonfinite_input(monkeypatch, bad):
    # The window pass checks its sums of magnitudes, not each input: the error must still
    # name the model and the key, from that pass alone.
    monkeypatch.setattr(ties_module, "SAMPLE", 2**10)
    monkeypatch.setattr(ties_module, "WINDOW", 2**24)
    monkeypatch.setattr(ties_module, "_radix_select", lambda *a, **k: pytest.fail("radix"))
    gen = torch.Generator().manual_seed(2)
    base = {"emb": torch.randn(400, 64, generator=gen), "bias": torch.randn(64, generator=gen)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}]
    models *= 3
    models[1] = {k: v.clone() for k, v in models[1].items()}
    models[1]["emb"][397, 5] = bad
    for trim in ("global", "tensor"):
        with pytest.raises(ladle.NonFiniteError, match=r"model 1 .*'emb'"):
            ladle.ties(models, base, trim=trim, device="cpu", chunk_bytes=2**12)


def test_mixed_float32_and_float64_tensors_rank_together_exactly():
    gen = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(50, generator=gen), "b": torch.randn(40, generator=gen).double()}
    models = [{k: v + torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()}]
    for density in (0.1, 0.37, 0.8):
        check_thresholds(models, base, density, "global", chunk_bytes=16)


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_a_key_a_model_stores_in_float64_and_the_base_in_float32_ranks_in_float64(selection):
    # τ of key "a" is float64 (the model's dtype), though the base stores it in float32: the
    # radix select must read its magnitudes as 64-bit patterns, not the base's 32.
    gen = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(50, generator=gen), "b": torch.randn(40, generator=gen)}
    models = [
        {
            "a": base["a"].double() + torch.randn(50, generator=gen, dtype=torch.float64),
            "b": base["b"] + torch.randn(40, generator=gen),
        }
    ]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SELECTIONS[selection].items():
            patch.setattr(ties_module, name, value)
        for density in (0.1, 0.37, 0.8):
            check_thresholds(models, base, density, "global", chunk_bytes=16)
            check_thresholds(models, base, density, "tensor", chunk_bytes=16)


def test_a_threshold_on_the_last_pattern_of_the_samples_window_takes_one_pass(monkeypatch):
    # Magnitudes a = 1 and b = 1 + 2⁻²⁰ (8 patterns apart), half each, shuffled. The rank
    # 2130 of 4096 lies just past the a's: the threshold is b. The sample's window runs from
    # a's pattern to b's, b's included: counted inside it, no radix passes are needed.
    a, b = 1.0, 1.0 + 2.0**-20
    gen = torch.Generator().manual_seed(4)
    magnitude = torch.where(torch.randperm(4096, generator=gen) < 2048, a, b)
    density = 0.48  # k = 4096 − ⌊4096·0.48⌋ = 2130 > 2048
    models, base, calls = _sampled_quarter(monkeypatch, magnitude, gen)
    assert magnitude_thresholds(models, base, density=density, device="cpu") == [{"w": b}]
    assert calls == []  # found by the one-pass window select
    check_thresholds(models, base, density, "global", chunk_bytes=2**12)


def _sampled_quarter(monkeypatch, magnitude, gen):
    """A model of 4096 entries of ``magnitude`` (64 × 64) with random signs over a zero base,
    a sample of a quarter of the entries, and the list that each radix-select call (a
    fallback from the one-pass window select) appends to."""
    sign = torch.randint(0, 2, (4096,), generator=gen) * 2.0 - 1.0
    base = {"w": torch.zeros(64, 64)}
    models = [{"w": (magnitude * sign).reshape(64, 64)}]
    monkeypatch.setattr(ties_module, "SAMPLE", 2**10)  # a quarter of the entries
    calls: list[int] = []
    original = ties_module._radix_select
    monkeypatch.setattr(
        ties_module, "_radix_select", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    return models, base, calls


# --- properties -----------------------------------------------------------------------------


@given(families(min_n=2), st.floats(0.05, 1.0), st.sampled_from(["global", "tensor"]))
def test_ties_matches_naive_flattened_reference(fam, density, trim):
    base, *models = fam
    expected = naive_ties(models, base, density=density, scale=0.7, trim=trim)
    actual = ladle.ties(models, base, density=density, scale=0.7, trim=trim, device="cpu")
    assert_close(actual, expected)


@settings(max_examples=25)
@given(task_families(min_n=2), st.floats(0.05, 1.0), st.sampled_from(["global", "tensor"]))
def test_ties_matches_naive_reference_with_tied_and_zero_magnitudes(fb, density, trim):
    models, base = fb
    expected = naive_ties(models, base, density=density, scale=1.0, trim=trim)
    actual = ladle.ties(models, base, density=density, trim=trim, device="cpu", chunk_bytes=8)
    assert_close(actual, expected)


@given(
    model_families(n=st.integers(1, 4)), st.floats(0.05, 1.0), st.sampled_from(["global", "tensor"])
)
def test_ties_matches_naive_reference_on_ladle_testing_families(family, density, trim):
    # ladle.testing's families: a base plus task vectors of hypothesis floats (zeros, repeated
    # and subnormal values, so that magnitudes tie at the threshold), in float32, bfloat16 or
    # float16, with 0-d tensors and an integer buffer.
    base, models = family
    assume(elections_are_exact(naive_trim(models, base, density=density, trim=trim)[2]))
    expected = naive_ties(models, base, density=density, scale=0.7, trim=trim)
    actual = ladle.ties(models, base, density=density, scale=0.7, trim=trim, device="cpu")
    assert_close(actual, expected)


@given(st.integers(1, 5), st.integers(0, 2**16), st.floats(-2, 2), st.booleans())
def test_density_one_without_sign_conflicts_equals_base_plus_scaled_mean_task_vector(
    n, seed, scale, tensor_trim
):
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) for k, s in {"a": (5, 3), "b": (4,)}.items()}
    signs = {k: torch.randint(0, 2, v.shape, generator=gen) * 2.0 - 1 for k, v in base.items()}
    taus = [
        {k: signs[k] * (0.1 + torch.rand(v.shape, generator=gen)) for k, v in base.items()}
        for _ in range(n)
    ]
    models = [{k: base[k] + t[k] for k in base} for t in taus]
    trim = "tensor" if tensor_trim else "global"
    merged = ladle.ties(models, base, density=1.0, scale=scale, trim=trim, device="cpu")
    for key in base:
        mean = sum((m[key] - base[key]).double() for m in models) / n
        expected = base[key].double() + scale * mean
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6)


@given(families(min_n=2, max_n=2), st.floats(0.05, 1.0), st.sampled_from(["global", "tensor"]))
def test_one_model_keeps_exactly_its_trimmed_task_vector(fam, density, trim):
    base, model = (
        {k: v.float() if v.is_floating_point() else v for k, v in m.items()} for m in fam
    )
    merged = ladle.ties([model], base, density=density, scale=1.0, trim=trim, device="cpu")
    keys = floating_keys(base)
    taus = {k: model[k] - base[k] for k in keys}
    limits = {}
    if trim == "global":
        limit = kth_magnitude(torch.cat([t.abs().flatten() for t in taus.values()]), density)
        limits = dict.fromkeys(keys, limit)
    else:
        limits = {k: kth_magnitude(t.abs().flatten(), density) for k, t in taus.items()}
    for key, tau in taus.items():
        kept = tau if limits[key] is None else tau.where(tau.abs() >= limits[key], 0.0)
        assert torch.equal(merged[key], base[key] + kept), key


@settings(max_examples=20)
@given(families(min_n=3), st.floats(0.05, 1.0), st.sampled_from(["global", "tensor"]), st.randoms())
def test_ties_is_invariant_to_the_order_of_models(fam, density, trim, rng):
    base, *models = fam
    order = list(range(len(models)))
    rng.shuffle(order)
    a = ladle.ties(models, base, density=density, trim=trim, device="cpu")
    b = ladle.ties([models[i] for i in order], base, density=density, trim=trim, device="cpu")
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-2, atol=1e-5)


@settings(max_examples=15)
@given(
    families(min_n=2),
    st.sampled_from(["global", "tensor"]),
    st.integers(4, 64),
    st.sampled_from([None, torch.float32, torch.bfloat16]),
)
def test_streaming_output_equals_in_memory_bit_for_bit(tmp_path_factory, fam, trim, chunk, dtype):
    directory = tmp_path_factory.mktemp("ties")
    base_path, *paths = save_all(fam, directory)
    base, *models = fam
    options = {"density": 0.3, "scale": 0.8, "trim": trim, "device": "cpu", "dtype": dtype}
    in_memory = ladle.ties(models, base, chunk_bytes=chunk, **options)
    out = ladle.ties(
        paths, base_path, out=directory / "out", chunk_bytes=chunk, max_shard_size=64, **options
    )
    streamed = ladle.load(out)
    assert_bit_for_bit(streamed, in_memory)


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_chunk_size_does_not_change_a_single_bit(trim):
    base, *models = family(4, seed=5)
    base["big"] = torch.randn(40, 9)
    for i, model in enumerate(models):
        model["big"] = base["big"] + torch.randn(40, 9, generator=torch.Generator().manual_seed(i))
    whole = ladle.ties(models, base, density=0.3, trim=trim, device="cpu")
    for chunk in (1, 40, 400):
        rows = ladle.ties(models, base, density=0.3, trim=trim, device="cpu", chunk_bytes=chunk)
        for key in whole:
            assert torch.equal(whole[key], rows[key]), (chunk, key)


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_the_default_chunks_differ_by_pass_and_change_no_bit(monkeypatch, trim):
    # By default the threshold passes read FOLD_CHUNK_BYTES and the merging pass
    # MERGE_CHUNK_BYTES; shrunk here so that "big" (1,440 bytes) is one chunk of the first and
    # four of the second. A tensor trimmed inside the merge kernel must be one merge chunk,
    # else each chunk would be trimmed by its own rank (trim="tensor").
    monkeypatch.setattr(ties_module, "FOLD_CHUNK_BYTES", 4000)
    monkeypatch.setattr(ties_module, "MERGE_CHUNK_BYTES", 400)
    seen: list[tuple[str, int]] = []

    def spy(name):
        called = getattr(ties_module, name)
        monkeypatch.setattr(
            ties_module,
            name,
            lambda *args, **kwargs: (
                seen.append((name, kwargs["chunk_bytes"])) or called(*args, **kwargs)
            ),
        )

    spy("_thresholds")
    spy("merge")
    base, *models = family(3, seed=8)
    base["big"] = torch.randn(40, 9, generator=torch.Generator().manual_seed(8))
    for i, model in enumerate(models):
        model["big"] = base["big"] + torch.randn(40, 9, generator=torch.Generator().manual_seed(i))
    merged = ladle.ties(models, base, density=0.3, trim=trim, device="cpu")
    assert seen == [("merge", 400), ("_thresholds", 4000)]  # merge calls prepare
    assert_close(merged, naive_ties(models, base, density=0.3, scale=1.0, trim=trim))
    sizes = (400, 4000, 2**20)
    for chunk in sizes:  # given, one size for every pass
        rows = ladle.ties(models, base, density=0.3, trim=trim, device="cpu", chunk_bytes=chunk)
        assert_bit_for_bit(rows, merged)
    assert seen[2:] == [(name, size) for size in sizes for name in ("merge", "_thresholds")]


# --- errors and the command line --------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5, float("nan")])
def test_density_outside_the_unit_interval_is_a_value_error(density):
    base, model = family(2)
    with pytest.raises(ValueError, match="density"):
        ladle.ties([model], base, density=density)


def test_bad_trim_and_empty_models_are_value_errors():
    base, model = family(2)
    with pytest.raises(ValueError, match="trim"):
        ladle.ties([model], base, trim="layer")
    with pytest.raises(ValueError, match="models"):
        ladle.ties([], base)
    with pytest.raises(ValueError, match="scale"):
        ladle.ties([model], base, scale=float("inf"))


def test_mismatched_shapes_raise_naming_the_model_and_key():
    base, *models = family(3)
    models[1]["layer.weight"] = torch.zeros(4, 7)
    with pytest.raises(ladle.IncompatibleError, match=r"model 1 .*'layer.weight'"):
        ladle.ties(models, base)


def test_cli_ties_writes_the_merge(tmp_path, capsys):
    base_path, *paths = save_all(family(4, seed=2), tmp_path)
    out = tmp_path / "merged"
    argv = ["ties", "--base", str(base_path), *map(str, paths), "--density", "0.4"]
    argv += ["--scale", "0.9", "--trim", "tensor", "-o", str(out), "--device", "cpu"]
    assert main(argv) == 0
    expected = ladle.ties(paths, base_path, density=0.4, scale=0.9, trim="tensor", device="cpu")
    merged = ladle.load(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert capsys.readouterr().out.strip() == str(out)


def test_cli_ties_rejects_a_bad_density_with_one_line(tmp_path, capsys):
    # A usage error (status 2) found by the parser, before any merging.
    base_path, path = save_all(family(2), tmp_path)
    argv = ["ties", "--base", str(base_path), str(path), "--density", "2", "-o", "x"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --density: expected a number in (0, 1], found 2.0" in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("coarse", [False, True])
def test_in_memory_select_of_a_large_tensor_equals_kthvalue(dtype, coarse):
    from ladle.methods.ties import _kth_magnitude

    gen = torch.Generator().manual_seed(11)
    if coarse:  # few distinct magnitudes, many zeros
        tau = (torch.randint(-5, 6, (300, 300), generator=gen) * 0.125).to(dtype)
    else:
        tau = torch.randn(300, 300, generator=gen, dtype=dtype)
    for rank in (1, 2, 4500, 45000, 72001, 90000):
        expected = tau.abs().flatten().kthvalue(rank).values.item()
        assert _kth_magnitude(tau, rank, torch.empty_like(tau)) == expected, rank


def test_tensor_trim_of_a_large_tensor_is_the_same_in_one_chunk_or_many():
    gen = torch.Generator().manual_seed(12)
    base = {"big": torch.randn(300, 300, generator=gen)}
    models = [{"big": base["big"] + torch.randn(300, 300, generator=gen)} for _ in range(3)]
    whole = ladle.ties(models, base, density=0.2, trim="tensor", device="cpu")
    rows = ladle.ties(models, base, density=0.2, trim="tensor", device="cpu", chunk_bytes=40_000)
    assert torch.equal(whole["big"], rows["big"])
    expected = naive_ties(models, base, density=0.2, scale=1.0, trim="tensor")
    torch.testing.assert_close(whole["big"], expected["big"], rtol=1e-5, atol=1e-5)


def test_exact_cancellation_uses_the_majority_sign_streaming_or_not(tmp_path):
    # e0: +3 and -3 cancel (elected sign 0); e1, e2 elect "-": the model's majority is "-",
    # so e0 takes the mean of its negative entries, -3. Without the majority it would be +3.
    base = {"w": torch.zeros(3)}
    models = [
        {"w": torch.tensor([3.0, -1.0, -2.0])},
        {"w": torch.tensor([-3.0, -1.0, -2.0])},
        {"w": torch.tensor([0.0, -1.0, 0.0])},
    ]
    expected = [-3.0, -1.0, -2.0]
    assert ladle.ties(models, base, density=1.0)["w"].tolist() == expected
    paths = []
    for i, model in enumerate([base, *models]):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    out = ladle.ties(paths[1:], paths[0], density=1.0, out=tmp_path / "out.safetensors")
    assert ladle.load(out)["w"].tolist() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m0.safetensors",
        "m1.safetensors",
        "m2.safetensors",
        "m3.safetensors",
        "out.safetensors",
    ]


def tied_family(seed, n=3, shape=(64, 8)):
    """Task vectors of quarter steps in [-1, 1]: many entries cancel exactly (+a, -a)."""
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(shape, generator=gen), "b": torch.randn(shape[0], generator=gen)}

    def tau(size):
        return torch.randint(-4, 5, size, generator=gen).float() / 4

    models = [{k: v + tau(v.shape) for k, v in base.items()} for _ in range(n)]
    return models, base


@pytest.mark.parametrize("trim", ["global", "tensor"])
@pytest.mark.parametrize("remembered", [0, 3, None])
def test_ties_remembered_or_merged_again_give_the_same_bits(
    monkeypatch, tmp_path, trim, remembered
):
    # TIES merges sign ties as if the majority were 0 and amends them once the vote is in:
    # from remembered values, or past TIE_RECORD_LIMIT by merging the keys again.
    models, base = tied_family(seed=7)
    expected = naive_ties(models, base, density=0.6, scale=0.5, trim=trim)
    if remembered is not None:
        monkeypatch.setattr(ties_module, "TIE_RECORD_LIMIT", remembered)
    kwargs = dict(density=0.6, scale=0.5, trim=trim, device="cpu", chunk_bytes=256)
    in_memory = ladle.ties(models, base, **kwargs)
    assert_close(in_memory, expected)
    paths = save_all([base, *models], tmp_path)
    streamed = ladle.load(ladle.ties(paths[1:], paths[0], out=tmp_path / "out", **kwargs))
    assert_bit_for_bit(streamed, in_memory)
    monkeypatch.undo()
    assert_bit_for_bit(ladle.ties(models, base, **kwargs), in_memory)


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_keys_merged_again_patch_their_tied_entries_alone(monkeypatch, tmp_path, trim):
    # Past TIE_RECORD_LIMIT every entry of a key merged again was rewritten through the
    # writer's amend (an index per entry, sorted): 4 bf16 models of 48 M entries took 16.8 s
    # instead of 5.0 s. The ties are the entries whose τ sum to 0 while some τ is not 0.
    models, base = tied_family(seed=7)
    taus = {key: torch.stack([m[key] - base[key] for m in models]) for key in base}
    tied = {key: int(((t.sum(0) == 0) & (t != 0).any(0)).sum()) for key, t in taus.items()}
    assert all(tied.values())
    amended: dict[str, int] = {}
    amend = ladle.writer.SafetensorsWriter.amend

    def counting(self, key, index, values):
        amended[key] = amended.get(key, 0) + index.numel()
        return amend(self, key, index, values)

    monkeypatch.setattr(ladle.writer.SafetensorsWriter, "amend", counting)
    monkeypatch.setattr(ties_module, "TIE_RECORD_LIMIT", 0)
    kwargs = dict(density=1.0, trim=trim, device="cpu", chunk_bytes=256)
    written = ladle.ties(models, base, out=tmp_path / "out.safetensors", **kwargs)
    # With trim="tensor" a tensor of one chunk ("b") breaks its ties in the pass, by its vote.
    assert amended == (tied if trim == "global" else {"w": tied["w"]})
    monkeypatch.undo()
    assert_bit_for_bit(ladle.load(written), ladle.ties(models, base, **kwargs))


@pytest.mark.parametrize("out", [None, "out.safetensors"])
def test_keys_merged_again_report_their_bytes_to_the_merging_bar(monkeypatch, tmp_path, out):
    # The pass that merges keys again past TIE_RECORD_LIMIT read on no bar: "merging" sat at
    # 100% for what was up to half of the merge's time. Its bytes grow the bar's total now.
    models, base = tied_family(seed=7)

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.done, self.desc = total, 0, kwargs["desc"]
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            pass

    monkeypatch.setattr(ties_module, "TIE_RECORD_LIMIT", 0)
    target = None if out is None else tmp_path / out
    ladle.ties(models, base, density=1.0, device="cpu", out=target, progress=Bar)
    merging = [bar for bar in bars if bar.desc == "merging"]
    read = sum(v.numel() * v.element_size() for m in [base, *models] for v in m.values())
    floating = sum(
        v.numel() * v.element_size()
        for m in [base, *models]
        for v in m.values()
        if v.is_floating_point()
    )
    assert len(merging) == 1
    assert merging[0].done == merging[0].total == read + floating  # every floating key again


def test_tied_family_has_ties_the_majority_decides():
    # The family above must exercise the amend path: some entries tie, and the vote is not 0.
    from ladle.methods.ties import SignElection

    models, base = tied_family(seed=7)
    state = SignElection("w", slice(None), base["w"])
    for model in models:
        state.add(model["w"] - base["w"])
    assert state.ties().numel() > 0
    assert int(state.vote()) != 0


def test_tensor_trim_selects_one_tensor_at_a_time(monkeypatch):
    # Per-tensor thresholds: each tensor is its own group, sampled, counted and resolved on
    # its own, so memory holds one tensor's histograms, whatever the number of tensors.
    seen = []
    original = ties_module._select_in_window
    monkeypatch.setattr(
        ties_module,
        "_select_in_window",
        lambda *a, **k: seen.append(list(k["keys"])) or original(*a, **k),
    )
    gen = torch.Generator().manual_seed(4)
    base = {f"k{i}": torch.randn(30, 8, generator=gen) for i in range(4)}
    models = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()}]
    check_thresholds(models, base, 0.3, "tensor", chunk_bytes=64)
    assert seen == [["k0"], ["k1"], ["k2"], ["k3"]]
    seen.clear()
    check_thresholds(models, base, 0.3, "global", chunk_bytes=64)
    assert seen == [["k0", "k1", "k2", "k3"]]


@pytest.mark.parametrize(
    ("shape", "entries"),
    [
        ((20, 3), 10**6),
        ((20, 3), 30),
        ((1000, 7), 700),
        ((5,), 100),
        ((1000, 7), 7000),  # every row, in 6 blocks of ⌈1000/6⌉ rows: each stops at the next
    ],
)
def test_sample_blocks_never_read_a_row_twice_and_cover_small_tensors(shape, entries):
    blocks = ties_module._sample_blocks(shape, entries)
    rows = [row for block in blocks for row in range(*block.indices(shape[0]))]
    assert len(rows) == len(set(rows)) and len(blocks) <= 16
    width = shape[1] if len(shape) > 1 else 1
    wanted = min(shape[0], -(-entries // width))  # rows asked for, rounded up per block
    assert wanted <= len(rows) < wanted + len(blocks)


@pytest.mark.parametrize(
    ("shape", "entries", "count"),
    [((64,), 27, 1), ((5000, 1), 3000, 2), ((5120, 1024), 29_600, 16), ((4096,), 9, 1)],
)
def test_sample_blocks_are_few_for_small_tensors(shape, entries, count):
    # each block is a read per model: a model of 5000 tensors of 64 entries read 16 blocks of
    # 2 rows from each; blocks of fewer than SAMPLE_BLOCK entries only where one block is all
    blocks = ties_module._sample_blocks(shape, entries)
    assert len(blocks) == count
    sizes = [len(range(*b.indices(shape[0]))) * math.prod(shape[1:]) for b in blocks]
    assert sum(sizes) >= min(entries, math.prod(shape))
    assert count == 1 or min(sizes) >= ties_module.SAMPLE_BLOCK


@pytest.mark.parametrize("empty", [(0, 4), (3, 0)])
def test_empty_tensors_beside_others_in_a_global_trim(empty):
    base = {"w": torch.zeros(4), "e": torch.zeros(empty)}
    model = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5]), "e": torch.zeros(empty)}
    merged = ladle.ties([model], base, density=0.5, device="cpu")
    # |τ| = 1, 2, 3, 0.5: rank 4 − ⌊4·0.5⌋ = 2 keeps |τ| ≥ 1 (the empty tensor adds no entries)
    assert torch.equal(merged["w"], torch.tensor([1.0, -2.0, 3.0, 0.0]))
    assert merged["e"].shape == empty
    from ladle.methods.ties import magnitude_thresholds

    thresholds = magnitude_thresholds([model], base, density=0.5)
    assert thresholds[0]["w"] == 1.0


def test_per_tensor_trim_reads_no_per_key_map_per_tensor(tmp_path, monkeypatch):
    # trim="tensor" runs a pass per tensor larger than a chunk. Each pass asked every
    # checkpoint for its map of every key to its file (to total the bytes mapped): a pass
    # over all keys per tensor, 22.5 s instead of 10 s for 8000 keys of 4 models.
    from ladle.checkpoint import Checkpoint, SafetensorsCheckpoint

    gen = torch.Generator().manual_seed(3)
    tensors = {f"w{i}": torch.randn(4, 8, generator=gen) for i in range(6)}
    paths = []
    for m in range(3):
        path = tmp_path / f"m{m}.safetensors"
        save_file(
            {k: v + m * 0.1 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}, path
        )
        paths.append(path)
    asked = []
    for cls in (Checkpoint, SafetensorsCheckpoint):
        original = cls.files
        monkeypatch.setattr(cls, "files", lambda self, f=original: asked.append(1) or f(self))
    ladle.ties(paths[1:], paths[0], trim="tensor", device="cpu", chunk_bytes=64)
    assert asked == []


@pytest.mark.parametrize("batch", [1, 2, 2**16])
def test_window_counts_find_the_rank_inside_or_say_it_lies_outside(monkeypatch, batch):
    # Hand-worked: a window of 5 patterns; 3 magnitudes below it and, inside, the offsets
    # 0, 2, 2, 4 (counted in batches of ``batch`` patterns); the rest lie above: the ranks
    # 1–3 lie below, 4–7 at offsets 0, 2, 2, 4, and 8 on above.
    monkeypatch.setattr(ties_module, "INSIDE_BATCH", batch)

    def offset_of(rank: int) -> int | None:
        counts = ties_module._WindowCounts([(10, 5)])  # offset_of consumes the histogram
        counts.add(0, 2, torch.tensor([2, 0]))
        counts.add(0, 1, torch.tensor([4, 2]))
        return counts.offset_of(0, rank)

    assert [offset_of(rank) for rank in range(1, 10)] == [None, None, None, 0, 2, 2, 4, None, None]
    empty = ties_module._WindowCounts([(7, 3)])
    empty.add(0, 4, torch.tensor([], dtype=torch.int64))  # nothing inside: never in it
    assert empty.offset_of(0, 4) is None


def test_majority_votes_are_the_signs_of_the_summed_elected_signs_zero_included():
    # The vote pass of a merge split across processes, hand-worked (no trim): elected signs
    # w: [+, −] (Σ 0), v: Σ = [3, 2] (+2), u: Σ = [−2, −2] (−2); over the model: 0.
    from ladle import open_checkpoint
    from ladle.methods.ties import majority_votes

    base = open_checkpoint({k: torch.zeros(2) for k in ("w", "v", "u")})
    taus = [
        {"w": [1.0, -1.0], "v": [2.0, 3.0], "u": [-1.0, -2.0]},
        {"w": [0.0, 0.0], "v": [1.0, -1.0], "u": [-1.0, 0.0]},
    ]
    models = [open_checkpoint({k: torch.tensor(v) for k, v in tau.items()}) for tau in taus]

    def votes(per_tensor, reduce=None):
        return majority_votes(
            models,
            base,
            lambda key, rows, index, tau, scratch: tau,
            keys=["w", "v", "u"],
            per_tensor=per_tensor,
            device=torch.device("cpu"),
            chunk_bytes=2**20,
            reduce=reduce,
        )

    assert votes(per_tensor=True) == {"w": 0.0, "v": 1.0, "u": -1.0}
    assert votes(per_tensor=False) == {"w": 0.0, "v": 0.0, "u": 0.0}
    # Another process's vote of +1, summed in: the model's majority is +.
    assert votes(per_tensor=False, reduce=lambda t: t.add_(1)) == dict.fromkeys("wvu", 1.0)


def _tied(emb: torch.Tensor, body: torch.Tensor) -> dict[str, torch.Tensor]:
    """A model whose head is its embedding (one tensor, two names), as a tied module's
    state dict or a torch file of it holds them."""
    return {"emb.weight": emb, "body.weight": body, "head.weight": emb}


def _once(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same model with the tied tensor stored once, as save_pretrained's safetensors."""
    return {key: value for key, value in model.items() if key != "head.weight"}


@pytest.mark.parametrize("to_disk", [False, True], ids=["in memory", "streamed"])
def test_global_trim_counts_a_tied_tensor_once_as_when_it_is_stored_once(tmp_path, to_disk):
    # The head named the embedding's tensor again: the global ranking counted it twice, and
    # the same models merged from a module (two names) and from safetensors (one) differed.
    gen = torch.Generator().manual_seed(3)
    base = _tied(torch.randn(8, 4, generator=gen), torch.randn(16, 4, generator=gen))
    models = [
        _tied(base["emb.weight"] + torch.randn(8, 4, generator=gen), base["body.weight"] + 0.1)
        for _ in range(3)
    ]
    models[1]["body.weight"] = base["body.weight"] + torch.randn(16, 4, generator=gen)
    out = (lambda name: tmp_path / f"{name}.safetensors") if to_disk else (lambda name: None)
    tied = ladle.ties(models, base, density=0.3, out=out("tied"), device="cpu")
    once = ladle.ties(
        [_once(m) for m in models], _once(base), density=0.3, out=out("once"), device="cpu"
    )
    tied, once = ladle.load(tied), ladle.load(once)
    assert torch.equal(tied["head.weight"], tied["emb.weight"])
    assert_bit_for_bit(_once(tied), once)


class _EveryKey:
    """A split merge's partition in one process, holding every key: the path whose majority
    is voted in a pass before the merge (majority_votes), not patched in after it."""

    def writes(self, out):
        return True  # the in-memory merge too, which a split leaves whole otherwise

    def keys(self, reference):
        return reference.keys()

    def all_reduce(self, tensor):
        return tensor

    def writer(self, *args, **kwargs):
        raise AssertionError("in-memory merges write nothing")


@pytest.mark.parametrize("where", ["in memory", "split", "in a file"])
@pytest.mark.parametrize("method", ["ties", "dare"])
def test_the_sign_tie_majority_counts_a_tied_tensor_once(method, where, tmp_path):
    # Hand-worked: the embedding elects + on 5 of its 6 entries (5 votes), the body − on 8
    # of its 9; each ties on its last (τ = +1 and −1). Counted once: 5 − 8 < 0, the ties
    # take the mean of the negative τ, −1, the head's too (it follows the model-wide vote,
    # not its own). Counted twice (its head too): 10 − 8 > 0, +1. In a file the head is
    # merged under its own name too (in memory a tied tensor is merged once) and must not
    # vote there either.
    from ladle.engine import partitioned

    base = _tied(torch.zeros(6), torch.zeros(9))
    body = [torch.tensor([-1.0] * 8 + [1.0]), torch.tensor([-1.0] * 8 + [-1.0])]
    emb = [torch.tensor([1.0] * 5 + [1.0]), torch.tensor([1.0] * 5 + [-1.0])]
    models = [_tied(e, b) for e, b in zip(emb, body)]
    # density 1 keeps every entry: DARE's election is TIES's
    merge = ladle.ties if method == "ties" else functools.partial(ladle.dare, combine="ties")
    out = tmp_path / "merged.safetensors" if where == "in a file" else None
    with partitioned(_EveryKey()) if where == "split" else contextlib.nullcontext():
        result = merge(models, base, density=1.0, out=out, device="cpu")
    merged = ladle.load(result) if out is not None else result
    assert merged["body.weight"].tolist() == [-1.0] * 9
    assert merged["emb.weight"].tolist() == merged["head.weight"].tolist() == [1.0] * 5 + [-1.0]


def _tied_family(seed: int) -> tuple[dict, list[dict]]:
    """A tied base and two tied fine-tunes of it (each head naming its embedding)."""
    gen = torch.Generator().manual_seed(seed)
    base = _tied(torch.randn(8, 4, generator=gen), torch.randn(16, 4, generator=gen))
    models = [
        _tied(
            base["emb.weight"] + torch.randn(8, 4, generator=gen), torch.randn(16, 4, generator=gen)
        )
        for _ in range(2)
    ]
    return base, models


@pytest.mark.parametrize(
    "method", [ladle.task_arithmetic, ladle.ties, ladle.model_stock, ladle.dare]
)
def test_fine_tunes_holding_a_tied_head_merge_with_a_base_stored_once(tmp_path, method):
    # The Hub's safetensors base holds the embedding once; fine-tunes saved with torch.save
    # hold it under two names: "keys differ: extra 1 ('head.weight')". The merge follows the
    # base's keys and gives what the fine-tunes stored once give.
    base, models = _tied_family(5)
    for i, model in enumerate(models):
        torch.save(model, tmp_path / f"ft{i}.pt")
    files = [tmp_path / f"ft{i}.pt" for i in range(2)]
    merged = method(files, _once(base), device="cpu")
    assert_bit_for_bit(merged, method([_once(m) for m in models], _once(base), device="cpu"))


@pytest.mark.parametrize(
    "method", [ladle.task_arithmetic, ladle.ties, ladle.model_stock, ladle.dare]
)
def test_a_base_holding_a_tied_head_merges_with_fine_tunes_stored_once(tmp_path, method):
    # A pre-trained module (head and embedding one tensor, two names) as the base of
    # fine-tunes saved as safetensors (the embedding once): "keys differ: extra 1". The
    # models answer the head's name with the embedding; the merge has the base's keys, the
    # head equal to the embedding, and the values of the merge stored once.
    base, tied = _tied_family(6)
    models = [_once(model) for model in tied]
    for i, model in enumerate(models):
        save_file(model, tmp_path / f"ft{i}.safetensors")
    files = [tmp_path / f"ft{i}.safetensors" for i in range(2)]
    merged = method(files, base, out=tmp_path / "out.safetensors", device="cpu")
    merged = ladle.load(merged)
    assert set(merged) == set(base)
    assert torch.equal(merged["head.weight"], merged["emb.weight"])
    once = method(models, _once(base), device="cpu")
    assert_bit_for_bit(_once(merged), once)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        (ladle.task_arithmetic, {}),
        (ladle.ties, {"trim": "tensor", "chunk_bytes": 32}),  # the head's rows sampled alone
        (ladle.dare, {"density": 0.5}),
    ],
    ids=["task_arithmetic", "ties per tensor", "dare"],
)
def test_a_tied_base_merges_with_fine_tunes_stored_once_in_memory(method, extra):
    # State dicts loaded from save_pretrained's safetensors (no map of a file's pages: the
    # models' rows are read, and sampled for the per-tensor trim, under the head's name).
    base, tied = _tied_family(7)
    models = [_once(model) for model in tied]
    merged = method(models, base, device="cpu", **extra)
    assert list(merged) == list(base)
    assert torch.equal(merged["head.weight"], merged["emb.weight"])
    assert_bit_for_bit(_once(merged), method(models, _once(base), device="cpu", **extra))


def test_a_tied_base_merges_with_fine_tunes_stored_once_whose_pages_are_released(
    tmp_path, monkeypatch
):
    # Inputs over MAPPED_BYTES_KEPT (a 3B model with tied embeddings): each tensor's pages
    # are released after its pass, the head's too, which the fine-tunes hold as the embedding.
    from ladle import engine

    base, tied = _tied_family(8)
    models = [_once(model) for model in tied]
    for i, model in enumerate(models):
        (tmp_path / f"ft{i}").mkdir()
        save_file(model, tmp_path / f"ft{i}" / "model.safetensors")
    folders = [tmp_path / f"ft{i}" for i in range(2)]
    expected = ladle.ties(models, _once(base), device="cpu")
    monkeypatch.setattr(engine, "MAPPED_BYTES_KEPT", 0)
    out = ladle.ties(folders, base, out=tmp_path / "out.safetensors", device="cpu")
    with ladle.open_checkpoint(out) as merged:  # the folders are named, as stored once
        assert json.loads(merged.metadata["ladle.inputs"]) == ["ft0", "ft1"]  # beside out
    merged = ladle.load(out)
    assert torch.equal(merged["head.weight"], merged["emb.weight"])
    assert_bit_for_bit(_once(merged), expected)


def test_magnitude_thresholds_per_tensor_of_tied_models_are_those_stored_once():
    # trim="tensor" ranks each key alone: the head's thresholds are the embedding's.
    gen = torch.Generator().manual_seed(9)
    base = _tied(torch.zeros(8), torch.zeros(16))
    models = [_tied(torch.randn(8, generator=gen), torch.randn(16, generator=gen))]
    tied = magnitude_thresholds(models, base, density=0.25, trim="tensor")
    once = magnitude_thresholds(
        [_once(m) for m in models], _once(base), density=0.25, trim="tensor"
    )
    assert tied == [{**once[0], "head.weight": once[0]["emb.weight"]}]
    assert once[0]["emb.weight"] != once[0]["body.weight"]


def test_magnitude_thresholds_count_a_tied_tensor_once_as_ties_does():
    from ladle.methods.ties import magnitude_thresholds

    gen = torch.Generator().manual_seed(8)
    base = _tied(torch.zeros(8), torch.zeros(16))
    models = [_tied(torch.randn(8, generator=gen) * 4, torch.randn(16, generator=gen))]
    tied = magnitude_thresholds(models, base, density=0.25)
    once = magnitude_thresholds([_once(m) for m in models], _once(base), density=0.25)
    assert tied == [{**once[0], "head.weight": once[0]["emb.weight"]}]


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_a_float32_key_ranked_among_float64_ones_trims_below_the_float64_threshold():
    # Magnitudes 1, 4 (float32 key a) and 1 + 2⁻³⁰, 3 (float64 key b), density 0.5: d = 4,
    # k = 2, t = 1 + 2⁻³⁰. a's 1.0 is below t and trimmed, though the float32 number nearest
    # t is 1.0: a's threshold is the float32 number just above t, 1 + 2⁻²³.
    t = 1.0 + 2.0**-30
    base = {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)}
    model = {"a": torch.tensor([1.0, -4.0]), "b": torch.tensor([-t, 3.0], dtype=torch.float64)}
    found = magnitude_thresholds([model], base, density=0.5, device="cpu")
    assert found == [{"a": 1.0 + 2.0**-23, "b": t}]
    merged = ladle.ties([model], base, density=0.5, device="cpu")
    assert merged["a"].tolist() == [0.0, -4.0]
    assert merged["b"].tolist() == [-t, 3.0]


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_a_float64_trim_keeps_nothing_a_float64_step_below_the_threshold(trim):
    # Magnitudes 1, 1 + 2⁻⁴⁰, 2, 3, density 0.5: k = 2, t = 1 + 2⁻⁴⁰, so 1.0 is trimmed; a
    # float32 step below t (1 − 2⁻²⁴, as float32 rounds t to 1.0) would keep it.
    t = 1.0 + 2.0**-40
    base = {"w": torch.zeros(4, dtype=torch.float64)}
    model = {"w": torch.tensor([1.0, -t, 2.0, -3.0], dtype=torch.float64)}
    merged = ladle.ties([model], base, density=0.5, trim=trim, device="cpu")
    assert merged["w"].tolist() == [0.0, -t, 2.0, -3.0]


def test_an_entry_every_model_leaves_at_zero_is_no_sign_tie():
    # Σ τ = [0, 0, 0, 3]: entries 0 and 2 cancel (ties the majority decides); entry 1 is 0 in
    # every model (trimmed everywhere, most entries of a TIES merge): no tie to remember.
    from ladle.methods.ties import SignElection

    state = SignElection("w", slice(None), torch.zeros(4))
    for delta in ([1.0, 0.0, 2.0, 0.0], [-1.0, 0.0, -2.0, 3.0]):
        state.add(torch.tensor(delta))
    assert state.ties().tolist() == [0, 2]


def test_sign_election_counts_the_positive_and_negative_entries_of_each_position():
    # Kept as sums of signs and of squared signs; the counts follow once every model is in.
    from ladle.methods.ties import SignElection

    deltas = [[1.0, -1.0, 0.0, 2.0, -0.5], [3.0, 0.0, 0.0, -1.0, -0.25], [-2.0, -5.0, 0.0, 4.0, -1]]
    state = SignElection("w", slice(None), torch.zeros(5))
    for delta in deltas:
        state.add(torch.tensor(delta))
    positive, negative = state.counts()
    assert positive.tolist() == [2.0, 0.0, 0.0, 2.0, 0.0]
    assert negative.tolist() == [1.0, 2.0, 0.0, 1.0, 3.0]
    assert state.counts()[0] is positive  # found once


@given(st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_sign_election_counts_match_counting_comparisons(models, seed):
    from ladle.methods.ties import SignElection

    generator = torch.Generator().manual_seed(seed)
    # Many exact zeros (trimmed entries), as in a TIES merge.
    deltas = [
        torch.randn(64, generator=generator).mul_(torch.rand(64, generator=generator) < 0.5)
        for _ in range(models)
    ]
    state = SignElection("w", slice(None), torch.zeros(64))
    for delta in deltas:
        state.add(delta.clone())
    positive, negative = state.counts()
    assert torch.equal(positive, sum((d > 0).float() for d in deltas))
    assert torch.equal(negative, sum((d < 0).float() for d in deltas))


def test_tensor_trim_of_tensors_of_one_chunk_runs_no_threshold_pass(monkeypatch):
    # trim="tensor": a tensor that fits in one chunk is trimmed inside the merge pass, so a
    # model of such tensors needs no pass to find thresholds (docs/methods/ties.md).
    for name in ("_select_in_window", "_radix_select"):
        monkeypatch.setattr(ties_module, name, lambda *a, **k: pytest.fail("a threshold pass"))
    gen = torch.Generator().manual_seed(6)
    base = {"a": torch.randn(8, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    models = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in "ab"]
    merged = ladle.ties(models, base, density=0.4, trim="tensor", device="cpu")
    assert_close(merged, naive_ties(models, base, density=0.4, scale=1.0, trim="tensor"))


def test_a_threshold_among_the_smallest_magnitudes_takes_one_pass(monkeypatch):
    # 819 of 4096 magnitudes are 0.5, the rest in [1, 2); density 0.99: k = 4096 − 4055 = 41,
    # inside the 0.5s. The sample's window starts at its smallest pattern (rank 1, where
    # k·count/size − spread < 1), 0.5, and holds the answer: no radix passes.
    gen = torch.Generator().manual_seed(12)
    magnitude = torch.where(torch.randperm(4096, generator=gen) < 819, 0.5, 1.0)
    magnitude += torch.rand(4096, generator=gen) * (magnitude > 0.5)
    models, base, calls = _sampled_quarter(monkeypatch, magnitude, gen)
    assert magnitude_thresholds(models, base, density=0.99, device="cpu") == [{"w": 0.5}]
    assert calls == []  # found by the one-pass window select


@pytest.mark.parametrize("selection", ["window", "radix"])
def test_the_threshold_pass_names_a_nonfinite_input_before_the_merge_pass(monkeypatch, selection):
    # The threshold pass (the window's sums of magnitudes, or the radix select's first pass)
    # is the one check of the inputs of a global trim: the merge pass does not read them
    # again for it. The error must come from that pass, not from the merged output.
    monkeypatch.setattr(ties_module, "SAMPLE", 2**10)
    monkeypatch.setattr(ties_module, "WINDOW", 2**24)
    if selection == "radix":
        monkeypatch.setattr(ties_module, "_select_in_window", lambda *a, **k: None)
    else:
        monkeypatch.setattr(ties_module, "_radix_select", lambda *a, **k: pytest.fail("radix"))
    monkeypatch.setattr(
        ties_module, "majority_election", lambda *a, **k: pytest.fail("the merge pass")
    )
    gen = torch.Generator().manual_seed(2)
    base = {"emb": torch.randn(400, 64, generator=gen), "bias": torch.randn(64, generator=gen)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}]
    models *= 3
    models[1] = {k: v.clone() for k, v in models[1].items()}
    models[1]["emb"][397, 5] = float("nan")
    with pytest.raises(ladle.NonFiniteError, match=r"model 1 .*'emb'"):
        ladle.ties(models, base, device="cpu", chunk_bytes=2**12)


def test_a_window_reaching_infinity_counts_bit_patterns_there(monkeypatch):
    # allow_nonfinite: half the magnitudes are Inf, the others within 0.1% of float32's
    # largest. The sample's window ends on Inf's pattern, past which lies no number (NaN's
    # pattern): it compares patterns, not floats, and finds what kthvalue does.
    from ladle import open_checkpoint

    gen = torch.Generator().manual_seed(3)
    magnitude = torch.finfo(torch.float32).max * (1 - torch.rand(4096, generator=gen) * 1e-3)
    magnitude[torch.randperm(4096, generator=gen)[:2048]] = math.inf
    sign = torch.randint(0, 2, (4096,), generator=gen) * 2.0 - 1.0
    base = open_checkpoint({"w": torch.zeros(64, 64)})
    model = open_checkpoint({"w": (magnitude * sign).reshape(64, 64)})
    monkeypatch.setattr(ties_module, "SAMPLE", 2**10)  # a quarter of the entries
    infinity = torch.tensor(math.inf).view(torch.int32).item()
    for rank in (2040, 2049):
        [(low, span)] = ties_module._windows([model], base, ["w"], rank, 4096, 2**14)
        assert low + span - 1 == infinity  # the window's last pattern is Inf's
        found = ties_module._select_in_window(
            [model],
            base,
            keys=["w"],
            rank=rank,
            size=4096,
            device=torch.device("cpu"),
            chunk_bytes=2**14,
            allow_nonfinite=True,
        )
        assert found == [magnitude.kthvalue(rank).values.item()]


def test_a_window_at_zero_leaves_out_the_pattern_just_past_it(monkeypatch):
    # Three quarters of τ are 0 (the first rows), the rest alternate 2⁻¹⁴⁹ (the pattern
    # just past 0) and 1. The rank, half the entries, is a 0: the window is 0's pattern
    # alone, and the chunks of the last rows, counted in later batches, hold the next one.
    rows = torch.zeros(512, 512)
    rows[384:, 0::2], rows[384:, 1::2] = 2.0**-149, 1.0
    base, models = {"w": torch.zeros(512, 512)}, [{"w": rows}]
    calls = []
    original = ties_module._radix_select
    monkeypatch.setattr(
        ties_module, "_radix_select", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    found = magnitude_thresholds(models, base, density=0.5, device="cpu", chunk_bytes=2**16)
    assert found == [{"w": 0.0}]
    assert calls == []  # found by the one-pass window select


@pytest.mark.parametrize("out", [False, True])
def test_a_sign_tied_entry_written_in_float16_from_float64_is_rounded_once(tmp_path, out):
    # The tie's value, patched in after the merge pass, went through torch's cast: float64
    # to float32 to float16, 1 + 2⁻¹¹ + 2⁻⁴⁰ to 1.0 where one rounding gives 1 + 2⁻¹⁰.
    d = 2.0**-11 + 2.0**-40
    base = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    models = [{"w": torch.tensor([1.0 + d, 1.0], dtype=torch.float64)}]
    models.append({"w": torch.tensor([1.0 - d, 1.0], dtype=torch.float64)})  # τ: +d, -d
    kw = {"density": 1.0, "device": "cpu", "dtype": torch.float16}
    for merge in (ladle.ties, functools.partial(ladle.dare, combine="ties")):
        found = merge(models, base, **kw, **({"out": tmp_path / "o.safetensors"} if out else {}))
        merged = ladle.load(found) if out else found
        assert merged["w"].tolist() == [1.0 + 2**-10, 1.0]  # majority +: the mean of +d
        if out:
            os.remove(found)


# Found by mutation testing (each test fails on a one-token change the suite let through).


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_a_nan_input_is_refused_at_density_one_too(tmp_path, trim):
    # At density 1 no threshold pass reads the inputs, so the merge pass must check them.
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, math.nan, 2.0, 3.0])}, {"w": torch.ones(4)}]
    for out in (None, tmp_path / f"{trim}.safetensors"):
        with pytest.raises(ladle.NonFiniteError, match=r"model 0 .*key 'w' holds NaN"):
            ladle.ties(models, base, density=1.0, trim=trim, out=out, device="cpu")


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_task_vectors_of_tiny_magnitudes_are_trimmed_like_any_other(trim):
    # d = 4, density 0.5: keep |τ| ≥ the 2nd smallest, whatever the scale of the magnitudes.
    tau = torch.tensor([1e-32, 2e-32, 3e-32, 4e-32])
    merged = ladle.ties([{"w": tau}], {"w": torch.zeros(4)}, density=0.5, trim=trim, device="cpu")
    assert torch.equal(merged["w"], torch.tensor([0.0, 2e-32, 3e-32, 4e-32]))


@pytest.mark.slow  # about 450 MiB for a moment
def test_the_vote_of_a_chunk_past_2_to_the_24_entries_is_exact():
    # Summed in float32, 2²⁴ + 1 positive elections would count 2²⁴ (and a majority over a
    # key voting −2²⁴ elsewhere would be 0, leaving its sign ties at the base).
    n = 2**24 + 1
    election = ties_module.SignElection("w", slice(None), base=torch.zeros(n))
    election.add(torch.ones(n))
    assert int(election.vote()) == n
