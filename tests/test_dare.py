from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import assert_bit_for_bit, assert_close_by_dtype, families, family, save_all
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_ties import elections_are_exact, naive_elect

import ladle
from ladle.cli import main
from ladle.methods.dare import BLOCK, keep_mask, uniform_numbers
from ladle.testing import model_families


def naive_mask(seed, index, key, numel, density):
    """The documented mask, written out again: a generator per block of 2**20 entries."""
    pieces = []
    for block, first in enumerate(range(0, numel, 2**20)):
        text = f"ladle.dare:{seed}:{index}:{key}:{block}".encode()
        block_seed = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
        generator = torch.Generator().manual_seed(block_seed)
        pieces.append(torch.rand(min(2**20, numel - first), generator=generator))
    # Compared as real numbers (float64 holds every float32 and the density exactly).
    return torch.cat(pieces).double() < density if pieces else torch.zeros(0, dtype=torch.bool)


def naive_dropped(models, base, *, density, seed):
    """Every model's task vector (float32, as the library computes it) with the dropped
    entries zeroed, flattened over the floating keys: a models × entries float64 array."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    dropped = []
    for i, model in enumerate(models):
        parts = []
        for key in keys:
            tau = (model[key].float() - base[key].float()).flatten()
            keep = naive_mask(seed, i, key, tau.numel(), density)
            parts.append(torch.where(keep, tau, 0.0).double().numpy())
        dropped.append(np.concatenate(parts))
    return np.stack(dropped)


def naive_dare(models, base, *, density, scale, seed, combine):
    """Flatten everything, drop with the documented masks, rescale, combine in float64.

    The sign election of "ties" sums the dropped task vectors before the rescale by
    1/density, which is the same sign in exact arithmetic (a common positive factor) and
    exact in float64 for these few float32 terms."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    offsets = np.cumsum([0, *(base[k].numel() for k in keys)])
    stacked = naive_dropped(models, base, density=density, seed=seed)
    # "ties": no trim; the sign for γ = 0 is the majority over the whole model.
    if combine == "sum":
        merged = (stacked / density).sum(axis=0)
    else:
        merged = naive_elect(stacked, [(0, offsets[-1])]) / density
    out = dict(base)
    for key, lo, hi in zip(keys, offsets[:-1], offsets[1:]):
        value = base[key].double().numpy().ravel() + scale * merged[lo:hi]
        out[key] = torch.from_numpy(value.reshape(base[key].shape)).to(base[key].dtype)
    return out


def assert_close(actual, expected):
    assert_close_by_dtype(actual, expected, precise=(1e-5, 1e-4), low=(2**-7, 1e-2))


# --- hand-worked formulas ------------------------------------------------------------------


def test_survivors_are_rescaled_by_one_over_density_and_the_rest_dropped():
    base = {"w": torch.full((1000,), 2.0)}
    model = {"w": torch.full((1000,), 3.0)}  # τ = 1 everywhere
    merged = ladle.dare([model], base, density=0.25, scale=1.0, seed=7)["w"]
    keep = naive_mask(7, 0, "w", 1000, 0.25)
    # kept: 2 + 1/0.25 = 6; dropped: the base, 2.
    assert torch.equal(merged, torch.where(keep, 6.0, 2.0))
    assert 0.2 < keep.float().mean().item() < 0.3


def test_sum_combines_like_task_arithmetic_of_the_dropped_vectors():
    base = {"w": torch.zeros(6)}
    a, b = {"w": torch.full((6,), 1.0)}, {"w": torch.full((6,), -3.0)}
    keep_a, keep_b = (naive_mask(1, i, "w", 6, 0.5) for i in range(2))
    # δa = 2·keep_a, δb = −6·keep_b; θ = 0.5·(δa + δb).
    expected = 0.5 * (2.0 * keep_a - 6.0 * keep_b)
    assert torch.equal(ladle.dare([a, b], base, density=0.5, scale=0.5, seed=1)["w"], expected)


def test_ties_combine_elects_a_sign_and_averages_the_agreeing_deltas():
    base = {"w": torch.zeros(4)}
    models = [
        {"w": torch.tensor([1.0, -2.0, 3.0, 0.5])},
        {"w": torch.tensor([3.0, 1.0, -1.0, 0.5])},
    ]
    # density 1 keeps everything: Σ = [4, −1, 2, 1]; γ = [+, −, +, +];
    # disjoint means: [2, −2, 3, 0.5].
    merged = ladle.dare(models, base, density=1.0, combine="ties")
    assert merged["w"].tolist() == [2.0, -2.0, 3.0, 0.5]


def test_ties_combine_elects_on_the_task_vectors_before_the_rescale():
    # Entry 0's task vectors cancel exactly (bf16 values: −0.59765625 + 0.181640625 +
    # 0.416015625 = 0), so γ = 0 and the model's majority (+, from entry 1) decides. Divided by
    # 0.625 first, the three quotients would round and sum to −6e-8 in float32: γ = −.
    density = 0.625
    seed = next(
        s for s in range(1000) if all(naive_mask(s, i, "w", 2, density).all() for i in range(3))
    )
    base = {"w": torch.zeros(2)}
    taus = [[-0.59765625, 1.0], [0.181640625, 1.0], [0.416015625, 1.0]]
    merged = ladle.dare(
        [{"w": torch.tensor(t)} for t in taus], base, density=density, seed=seed, combine="ties"
    )["w"]
    # The mean of the positive entries, rescaled: (0.181640625 + 0.416015625) / 2 / 0.625.
    expected = torch.tensor([0.298828125 / density, 1.0 / density])
    assert torch.equal(merged, expected)


def test_ties_combine_breaks_sign_ties_by_the_majority_of_the_whole_model():
    # Σ: a = [0, 3, 4, 0], b = [−3, 0, 0]; elected over a: [0, +, +, 0] (vote +2), over b:
    # [−, 0, 0] (vote −1); over the whole model +1, which decides b's ties too (b's own vote
    # would make them −1).
    base = {"a": torch.zeros(4), "b": torch.zeros(3)}
    one = {"a": torch.tensor([1.0, 2.0, 3.0, -1.0]), "b": torch.tensor([-2.0, 1.0, -1.0])}
    two = {"a": torch.tensor([-1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([-1.0, -1.0, 1.0])}
    merged = ladle.dare([one, two], base, density=1.0, combine="ties", device="cpu")
    assert merged["a"].tolist() == [1.0, 1.5, 2.0, 1.0]
    assert merged["b"].tolist() == [-1.5, 1.0, 1.0]


def test_a_density_just_below_one_still_drops_entries():
    base = {"w": torch.full((4000,), 2.0)}
    model = {"w": torch.full((4000,), 3.0)}  # τ = 1 everywhere
    merged = ladle.dare([model], base, density=0.99, seed=5, device="cpu")["w"]
    keep = naive_mask(5, 0, "w", 4000, 0.99)
    assert 0 < int((~keep).sum()) < 100  # about 40 dropped
    assert torch.equal(merged[~keep], torch.full((int((~keep).sum()),), 2.0))
    kept = torch.ones(1).mul_(1 / 0.99).add_(2.0)  # base + τ/density, in float32
    assert torch.equal(merged[keep], kept.expand(int(keep.sum())))


# --- the mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("numel", "start", "count"),
    [
        (10, 0, 10),
        (10, 3, 4),
        (3 * BLOCK, BLOCK - 5, BLOCK + 10),  # parts of blocks
        (2 * BLOCK + 7, 0, 2 * BLOCK + 7),  # whole blocks and a short one
        (3 * BLOCK, BLOCK, BLOCK),  # exactly one block
    ],
)
def test_mask_of_a_slice_is_the_slice_of_the_whole_mask(numel, start, count):
    whole = naive_mask(3, 1, "layer.weight", numel, 0.3)
    part = keep_mask(3, 1, "layer.weight", numel=numel, start=start, count=count, density=0.3)
    assert torch.equal(part, whole[start : start + count])


@pytest.mark.parametrize(("start", "count"), [(0, 3 * BLOCK + 7), (BLOCK - 5, BLOCK + 10)])
def test_numbers_drawn_on_threads_are_those_drawn_in_turn(start, count):
    numel = 3 * BLOCK + 7
    alone = uniform_numbers(2, 4, "w", numel=numel, start=start, count=count)
    with ThreadPoolExecutor(3) as threads:
        together = uniform_numbers(
            2, 4, "w", numel=numel, start=start, count=count, threads=threads
        )
    assert torch.equal(together, alone)
    assert torch.equal(alone < 0.3, naive_mask(2, 4, "w", numel, 0.3)[start : start + count])


@pytest.mark.parametrize("step", [1000, BLOCK // 3, BLOCK + 1])
def test_consecutive_parts_draw_each_block_once_with_a_kept_block(monkeypatch, step):
    import ladle.methods.dare as dare_module

    numel = 3 * BLOCK + 5
    whole = uniform_numbers(1, 2, "w", numel=numel, start=0, count=numel)
    seeds = []
    original = dare_module.block_seed
    monkeypatch.setattr(
        dare_module, "block_seed", lambda *args: seeds.append(args) or original(*args)
    )
    kept: dict = {}
    parts = []
    for start in range(0, 2 * BLOCK, step):  # two models' chunks interleaved, as merges ask
        for index in (2, 0):
            count = min(step, numel - start)
            part = uniform_numbers(1, index, "w", numel=numel, start=start, count=count, kept=kept)
            if index == 2:
                parts.append(part)
    assert torch.equal(torch.cat(parts), whole[: sum(p.numel() for p in parts)])
    blocks = [args[3] for args in seeds if args[1] == 2]
    assert sorted(blocks) == sorted(set(blocks))  # no block drawn twice
    # A kept block is used again only for its own key: another key draws its own numbers.
    other = uniform_numbers(1, 2, "v", numel=numel, start=step, count=5, kept=kept)
    assert torch.equal(other, uniform_numbers(1, 2, "v", numel=numel, start=step, count=5))


@pytest.mark.parametrize("step", [1000, BLOCK // 3, BLOCK + 1])
def test_parts_drawn_into_reused_memory_are_the_numbers_drawn_afresh(step):
    # A merge with chunks smaller than a block reuses a model's spent block and its chunks'
    # buffers (fresh ones, made on reading threads and freed on the merging one, grew the
    # heap of a long merge by hundreds of MiB): the numbers stay the same.
    numel = 3 * BLOCK + 5
    whole = uniform_numbers(1, 2, "w", numel=numel, start=0, count=numel)
    kept: dict = {}
    spares: dict = {}
    out = torch.full((step,), -1.0)
    parts, blocks = [], set()
    for start in range(0, numel, step):
        count = min(step, numel - start)
        part = uniform_numbers(
            1, 2, "w", numel=numel, start=start, count=count, kept=kept, spares=spares, out=out
        )
        assert part.data_ptr() == out.data_ptr()  # the numbers lie in ``out``
        parts.append(part.clone())
        held = [*(b for blocks in spares.values() for b in blocks), *(b for _, b in kept.values())]
        blocks |= {block.untyped_storage().data_ptr() for block in held}
    assert torch.equal(torch.cat(parts), whole)
    if step < BLOCK:  # blocks used in part: two blocks' memory served all four
        assert len(blocks) == 2


def test_a_block_draws_only_the_numbers_of_its_own_entries(monkeypatch):
    # L = min(BLOCK, numel − b·BLOCK) numbers per block (the module docs): a small tensor, or
    # the last block of a large one, draws its own entries' numbers, not a block's 2**20.
    sizes = []
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda size, **kw: sizes.append(size) or rand(size, **kw))
    small = uniform_numbers(0, 0, "w", numel=10, start=2, count=3)
    last = uniform_numbers(0, 0, "w", numel=BLOCK + 10, start=BLOCK + 4, count=6)
    assert sizes == [10, 10]
    monkeypatch.undo()
    assert torch.equal(small, uniform_numbers(0, 0, "w", numel=10, start=0, count=10)[2:5])
    whole = uniform_numbers(0, 0, "w", numel=BLOCK + 10, start=BLOCK, count=10)
    assert torch.equal(last, whole[4:])


def test_masks_differ_between_seeds_models_and_keys():
    masks = [
        keep_mask(seed, index, key, numel=256, start=0, count=256, density=0.5)
        for seed, index, key in [(0, 0, "a"), (1, 0, "a"), (0, 1, "a"), (0, 0, "b")]
    ]
    for i in range(len(masks)):
        for j in range(i):
            assert not torch.equal(masks[i], masks[j])


def test_chunk_size_and_key_order_do_not_change_a_single_bit():
    gen = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(50, 7, generator=gen), "b": torch.randn(5, generator=gen)}
    base["experts"] = torch.randn(6, 3, 4, generator=gen)  # rows of 3·4 entries
    models = [
        {k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)
    ]
    for combine in ("sum", "ties"):
        whole = ladle.dare(models, base, density=0.4, seed=3, combine=combine, device="cpu")
        for chunk in (1, 60, 600):
            rows = ladle.dare(
                models, base, density=0.4, seed=3, combine=combine, device="cpu", chunk_bytes=chunk
            )
            assert all(torch.equal(whole[k], rows[k]) for k in whole), (combine, chunk)
        reversed_keys = [dict(reversed(m.items())) for m in models]
        flipped = ladle.dare(
            reversed_keys, dict(reversed(base.items())), density=0.4, seed=3, combine=combine
        )
        assert all(torch.equal(whole[k], flipped[k]) for k in whole), combine


def test_tensors_of_several_blocks_draw_the_documented_mask_and_leave_no_threads():
    gen = torch.Generator().manual_seed(1)
    numel = 2 * BLOCK + 3  # blocks drawn on the merge's threads
    # Beside keys too small to draw the next model's numbers ahead (AHEAD_ENTRIES), in turns.
    sizes = {"a": 10, "w": numel, "z": 1000}
    base = {key: torch.randn(size, generator=gen) for key, size in sizes.items()}
    models = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in "12"]
    merged = ladle.dare(models, base, density=0.25, seed=5, device="cpu")
    for key, size in sizes.items():
        kept = [naive_mask(5, i, key, size, 0.25) for i in range(2)]
        total = sum((m[key] - base[key]) * k for m, k in zip(models, kept))
        torch.testing.assert_close(merged[key], base[key] + total / 0.25, rtol=0, atol=1e-5)
    assert not [t for t in threading.enumerate() if t.name.startswith("ladle-dare")]


# --- properties -----------------------------------------------------------------------------


@given(
    families(min_n=2), st.floats(0.1, 1.0), st.integers(0, 2**32), st.sampled_from(["sum", "ties"])
)
def test_dare_matches_naive_reference(fam, density, seed, combine):
    base, *models = fam
    if combine == "ties":
        # Where the float32 task vectors' exact sum lies within float32 rounding of zero
        # without being zero, the elected sign depends on the order of the additions.
        dropped = naive_dropped(models, base, density=density, seed=seed)
        total, size = np.abs(dropped.sum(axis=0)), np.abs(dropped).sum(axis=0)
        assume(np.all((total == 0) | (total > 2.0**-16 * size)))
    actual = ladle.dare(
        models, base, density=density, scale=0.8, seed=seed, combine=combine, device="cpu"
    )
    expected = naive_dare(models, base, density=density, scale=0.8, seed=seed, combine=combine)
    assert_close(actual, expected)


@given(
    model_families(n=st.integers(1, 4), bound=2.0),
    st.floats(0.1, 1.0),
    st.integers(0, 2**32),
    st.sampled_from(["sum", "ties"]),
)
def test_dare_matches_naive_reference_on_ladle_testing_families(family, density, seed, combine):
    # ladle.testing's families: hypothesis floats (zeros, subnormals, repeated values) in
    # float32, bfloat16 or float16, with 0-d tensors and an integer buffer.
    base, models = family
    if combine == "ties":
        assume(elections_are_exact(naive_dropped(models, base, density=density, seed=seed)))
    actual = ladle.dare(
        models, base, density=density, scale=0.8, seed=seed, combine=combine, device="cpu"
    )
    expected = naive_dare(models, base, density=density, scale=0.8, seed=seed, combine=combine)
    assert_close(actual, expected)


@given(families(min_n=2), st.floats(-2, 2))
def test_density_one_equals_task_arithmetic_bit_for_bit(fam, scale):
    base, *models = fam
    dare = ladle.dare(models, base, density=1.0, scale=scale, device="cpu")
    arithmetic = ladle.task_arithmetic(models, base, scale=scale, device="cpu")
    assert all(torch.equal(dare[k], arithmetic[k]) for k in dare)


@given(families(min_n=2), st.floats(-2, 2))
def test_density_one_with_ties_combine_equals_ties_without_trim(fam, scale):
    base, *models = fam
    dare = ladle.dare(models, base, density=1.0, scale=scale, combine="ties", device="cpu")
    ties = ladle.ties(models, base, density=1.0, scale=scale, device="cpu")
    assert all(torch.equal(dare[k], ties[k]) for k in dare)


@settings(max_examples=20)
@given(families(min_n=3), st.sampled_from(["sum", "ties"]), st.randoms())
def test_density_one_is_invariant_to_the_order_of_models(fam, combine, rng):
    # Below density 1 each model's mask follows its position, so reordering redraws them.
    base, *models = fam
    order = list(range(len(models)))
    rng.shuffle(order)
    a = ladle.dare(models, base, density=1.0, combine=combine, device="cpu")
    b = ladle.dare([models[i] for i in order], base, density=1.0, combine=combine, device="cpu")
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-2, atol=1e-5)


@settings(max_examples=15)
@given(
    families(min_n=2),
    st.sampled_from(["sum", "ties"]),
    st.integers(4, 64),
    st.sampled_from([None, torch.float32, torch.bfloat16]),
)
def test_streaming_output_equals_in_memory_bit_for_bit(
    tmp_path_factory, fam, combine, chunk, dtype
):
    directory = tmp_path_factory.mktemp("dare")
    base_path, *paths = save_all(fam, directory)
    base, *models = fam
    options = {"density": 0.3, "seed": 5, "combine": combine, "device": "cpu", "dtype": dtype}
    in_memory = ladle.dare(models, base, chunk_bytes=chunk, **options)
    out = ladle.dare(
        paths, base_path, out=directory / "out", chunk_bytes=chunk, max_shard_size=64, **options
    )
    streamed = ladle.load(out)
    assert_bit_for_bit(streamed, in_memory)


def test_integer_buffers_come_from_the_base():
    base, *models = family(3)
    assert ladle.dare(models, base, device="cpu")["bn.num_batches_tracked"].item() == 100


# --- errors and the command line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.01}, "density"),
        ({"combine": "mean"}, "combine"),
        ({"seed": 1.5}, "seed"),
        ({"scale": float("inf")}, "scale"),
    ],
)
def test_bad_arguments_are_value_errors_naming_the_parameter(kwargs, match):
    base, *models = family(3)
    with pytest.raises(ValueError, match=match):
        ladle.dare(models, base, **kwargs)


@pytest.mark.parametrize(
    ("seed", "found"),
    [
        ("3", "str"),
        (None, "None"),
        (1j, "complex"),
        (True, "bool"),
        (np.timedelta64(3, "s"), "timedelta64"),  # was a ValueError, as though a number
        (torch.tensor(2.5), None),
    ],
)
def test_seed_that_is_no_integer_number_is_a_type_error_naming_it(seed, found):
    # docs/safety.md: a value that is no number is a TypeError naming the parameter; a real
    # number that is no integer (1.5, a 0-d float tensor) is a ValueError.
    base, *models = family(2)
    if found is None:
        with pytest.raises(ValueError, match=r"^seed: expected an integer, found 2\.5$"):
            ladle.dare(models, base, seed=seed)
        return
    with pytest.raises(TypeError, match=rf"^seed: expected an integer, found {found}$"):
        ladle.dare(models, base, seed=seed)


def test_seed_may_be_a_zero_dimensional_integer_tensor():
    base, *models = family(2)
    expected = ladle.dare(models, base, density=0.5, seed=7, device="cpu")
    merged = ladle.dare(models, base, density=0.5, seed=torch.tensor(7), device="cpu")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_empty_models_is_a_value_error():
    with pytest.raises(ValueError, match="models"):
        ladle.dare([], family(1)[0])


def test_cli_dare_writes_the_merge(tmp_path, capsys):
    base_path, *paths = save_all(family(3, seed=6), tmp_path)
    out = tmp_path / "merged"
    argv = ["dare", "--base", str(base_path), *map(str, paths), "--density", "0.5", "--seed", "9"]
    argv += ["--combine", "ties", "--scale", "0.7", "-o", str(out), "--device", "cpu"]
    assert main(argv) == 0
    expected = ladle.dare(
        paths, base_path, density=0.5, seed=9, combine="ties", scale=0.7, device="cpu"
    )
    merged = ladle.load(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert capsys.readouterr().out.strip() == str(out)


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_ties_combine_breaks_exact_cancellations_with_the_majority_streamed_or_not(
    tmp_path, density
):
    # Quarter-step task vectors cancel exactly in many entries: the majority (found during
    # the merge pass and patched in afterwards) decides them, as in the naive reference.
    from test_ties import tied_family

    models, base = tied_family(seed=11)
    expected = naive_dare(models, base, density=density, scale=0.5, seed=3, combine="ties")
    options = {"density": density, "scale": 0.5, "seed": 3, "combine": "ties", "device": "cpu"}
    in_memory = ladle.dare(models, base, chunk_bytes=256, **options)
    assert_close(in_memory, expected)
    paths = save_all([base, *models], tmp_path)
    out = ladle.dare(paths[1:], paths[0], out=tmp_path / "o", chunk_bytes=256, **options)
    assert_bit_for_bit(ladle.load(out), in_memory)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("combine", ["sum", "ties"])
def test_a_nonfinite_entry_that_the_mask_drops_is_still_an_error(tmp_path, bad, combine):
    # DARE (sum) checks its results, not its inputs: a dropped NaN or Inf is multiplied by
    # 0.0, which leaves a NaN, so the error still names the model and the key.
    base, *models = family(3)
    numel = models[1]["layer.weight"].numel()
    kept = keep_mask(0, 1, "layer.weight", numel=numel, start=0, count=numel, density=0.1)
    dropped = int(torch.nonzero(~kept)[0])
    models[1]["layer.weight"].view(-1)[dropped] = bad
    paths = save_all([base, *models], tmp_path)
    with pytest.raises(ladle.NonFiniteError, match=r"model 1 .*'layer.weight'"):
        ladle.dare(paths[1:], paths[0], density=0.1, seed=0, combine=combine, device="cpu")


def test_a_density_float32_would_round_down_keeps_the_numbers_below_it():
    density = 0.5 + 2**-26  # float32(density) is 0.5: a number of exactly 0.5 must be kept
    numel = 2**24
    numbers = uniform_numbers(0, 0, "w", numel=numel, start=0, count=numel)
    halves = torch.nonzero(numbers == 0.5).flatten()
    assert halves.numel() > 0  # with this seed, two entries draw exactly 0.5
    mask = keep_mask(0, 0, "w", numel=numel, start=0, count=numel, density=density)
    assert mask[halves].all()
    assert torch.equal(mask, naive_mask(0, 0, "w", numel, density))
    base = {"w": torch.zeros(numel)}
    merged = ladle.dare([{"w": torch.ones(numel)}], base, density=density, scale=density)
    assert torch.equal(merged["w"] != 0, mask)


def test_densities_float32_random_numbers_cannot_draw_are_refused():
    base, model = {"w": torch.zeros(4)}, {"w": torch.ones(4)}
    with pytest.raises(ValueError, match=r"density: expected at least 2\*\*-24"):
        ladle.dare([model], base, density=1e-8)
    assert ladle.dare([model], base, density=2.0**-24)["w"].shape == (4,)


def test_a_kept_block_serves_only_the_seed_and_tensor_it_was_drawn_for():
    # The kept block is block 2 of "w", of 10 entries; each call asks for the rest of block 2
    # of another seed, of a tensor whose block 2 is longer (its first 10 numbers are the
    # same: torch.rand's are a prefix of a longer draw's), or of another key.
    kept: dict = {}
    first, numel = 2 * BLOCK, 2 * BLOCK + 10
    for seed, size, key in [(1, numel, "w"), (0, numel + 10, "w"), (0, numel, "v")]:
        uniform_numbers(0, 0, "w", numel=numel, start=first, count=5, kept=kept)
        rest = {"numel": size, "start": first + 5, "count": size - first - 5}
        again = uniform_numbers(seed, 0, key, **rest, kept=kept)
        assert torch.equal(again, uniform_numbers(seed, 0, key, **rest)), (seed, size, key)


def test_numbers_drawn_ahead_are_used_only_for_the_call_they_were_drawn_for():
    # The dropper draws model i + 1's numbers while model i's chunk is computed. Calls in
    # another order (a key merged again, say) must get their own numbers all the same.
    from ladle.methods.dare import _dropper

    shapes = {"a": (3, 5), "b": (7,)}
    with ThreadPoolExecutor(2) as threads, ThreadPoolExecutor(1) as ahead:
        sizes = {key: math.prod(shape) for key, shape in shapes.items()}
        drop = _dropper(sizes, 9, 0.5, threads, models=3, ahead=ahead)
        calls = [("a", 0), ("a", 1), ("b", 0), ("a", 2), ("b", 1), ("b", 2), ("a", 1), ("a", 2)]
        for key, index in calls:
            tau = torch.arange(1.0, 1.0 + torch.Size(shapes[key]).numel()).view(shapes[key])
            dropped = drop(key, slice(None), index, tau.clone(), torch.empty(shapes[key]))
            mask = keep_mask(
                9, index, key, numel=tau.numel(), start=0, count=tau.numel(), density=0.5
            )
            assert torch.equal(dropped, tau * mask.view(tau.shape)), (key, index)


def test_torch_threads_are_fewer_while_numbers_are_drawn_and_restored_after():
    # DARE computes on fewer torch threads while its own threads draw numbers; the process's
    # count must come back, also when the merge fails. From 4 threads, so that fewer shows
    # whatever OMP_NUM_THREADS the suite runs under.
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        before = torch.get_num_threads()
        seen = []

        class Bar:  # progress reports arrive while the merge runs
            def __init__(self, **kwargs):
                pass

            def update(self, n):
                seen.append(torch.get_num_threads())

            def close(self):
                pass

        models, base = family(2, seed=3), family(1, seed=4)[0]
        ladle.dare(models, base, density=0.5, progress=Bar, device="cpu")
        assert seen and max(seen) == max(1, before - min(8, os.cpu_count() or 1))
        assert torch.get_num_threads() == before
        bad = {**models[0], "layer.weight": torch.ones(5)}
        with pytest.raises(ladle.IncompatibleError):
            ladle.dare([bad, models[1]], base, device="cpu")
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(previous)


# --- tied weights ------------------------------------------------------------------------


class Tied(torch.nn.Module):
    """A language model in miniature whose head is its embedding (``tie_word_embeddings``),
    with integer weights: DARE at density 0.5 and scale 0.5 (factor 1) is then exact."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(6, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight  # one tensor, two names in the state dict
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randint(-9, 10, parameter.shape, generator=gen))


def dare_by_hand(models, base, *, names=None):
    """DARE at density 0.5, scale 0.5, seed 0 with the documented masks, key ``k`` drawing
    under ``names.get(k, k)``: base + Σᵢ mᵢ⊙τᵢ, exact for integer weights."""
    merged = {}
    for key, value in base.items():
        total = value.clone()
        for i, model in enumerate(models):
            tau = model[key] - value
            keep = keep_mask(
                0,
                i,
                (names or {}).get(key, key),
                numel=tau.numel(),
                start=0,
                count=tau.numel(),
                density=0.5,
            )
            total += tau * keep.view(tau.shape)
        merged[key] = total
    return merged


def as_source(model, kind, path):
    """``model`` given to ladle as a module, its state dict or a torch file of that."""
    if kind == "module":
        return model
    if kind == "state_dict":
        return model.state_dict()
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["module", "state_dict", "torch_file"])
@pytest.mark.parametrize("to_disk", [False, True])
def test_tied_weights_draw_one_mask_and_stay_tied(tmp_path, kind, to_disk):
    base, *models = Tied(0), Tied(1), Tied(2)
    sources = [as_source(m, kind, tmp_path / f"m{i}.bin") for i, m in enumerate([base, *models])]
    out = tmp_path / "out.safetensors" if to_disk else None
    merged = ladle.dare(sources[1:], sources[0], density=0.5, scale=0.5, seed=0, out=out)
    merged = ladle.load(merged) if to_disk else merged
    assert torch.equal(merged["head.weight"], merged["emb.weight"])
    # The head draws the embedding's masks (the first of its names in the base's order);
    # every other key its own, bit for bit as before.
    states = [m.state_dict() for m in models]
    expected = dare_by_hand(states, base.state_dict(), names={"head.weight": "emb.weight"})
    assert_bit_for_bit(merged, expected)
    separately = dare_by_hand(states, base.state_dict())  # masks by name, as before: untied
    assert not torch.equal(separately["head.weight"], separately["emb.weight"])
    assert all(torch.equal(separately[k], merged[k]) for k in merged if k != "head.weight")


@pytest.mark.parametrize("combine", ["sum", "ties"])
def test_tied_weights_stay_tied_whatever_the_chunks_and_combination(combine):
    base, *models = Tied(0), Tied(1), Tied(2), Tied(3)
    options = {"density": 0.3, "seed": 5, "combine": combine, "device": "cpu"}
    whole = ladle.dare(models, base, **options)
    chunked = ladle.dare(models, base, chunk_bytes=16, **options)
    assert_bit_for_bit(chunked, whole)
    assert torch.equal(whole["head.weight"], whole["emb.weight"])


def test_keys_tied_in_the_base_but_untied_in_a_model_keep_their_own_masks():
    base, *models = Tied(0), Tied(1), Tied(2)
    untied = models[1].state_dict()
    untied["head.weight"] = untied["head.weight"].clone()  # equal values, its own tensor
    states = [models[0].state_dict(), untied]
    merged = ladle.dare(states, base, density=0.5, scale=0.5, seed=0)
    assert_bit_for_bit(merged, dare_by_hand(states, base.state_dict()))
    assert not torch.equal(merged["head.weight"], merged["emb.weight"])


def test_a_sharded_torch_checkpoint_keeps_its_tied_weights_tied(tmp_path):
    base, model = Tied(0), Tied(1)
    folders = []
    for name, module in [("base", base), ("model", model)]:
        folder = tmp_path / name
        folder.mkdir()
        state = module.state_dict()
        torch.save({k: state[k] for k in ("emb.weight", "head.weight")}, folder / "a.bin")
        torch.save({k: state[k] for k in ("body.weight", "body.bias")}, folder / "b.bin")
        weight_map = {"emb.weight": "a.bin", "head.weight": "a.bin"}
        weight_map.update({"body.weight": "b.bin", "body.bias": "b.bin"})
        index = folder / "pytorch_model.bin.index.json"
        index.write_text(json.dumps({"weight_map": weight_map}))
        folders.append(folder)
    with ladle.open_checkpoint(folders[0]) as opened:
        assert opened.aliases() == {"head.weight": "emb.weight"}
    merged = ladle.dare([folders[1]], folders[0], density=0.5, scale=0.5, seed=0)
    expected = dare_by_hand([model.state_dict()], base.state_dict())
    expected["head.weight"] = expected["emb.weight"]
    assert_bit_for_bit(merged, {k: expected[k] for k in merged})


def test_keys_tied_in_every_model_but_not_in_the_base_keep_their_own_masks():
    # A base whose head is a tensor of its own (untied), fine-tunes that tie it: the keys
    # name one tensor in the models alone, so each draws its own mask.
    base, *models = Tied(0), Tied(1), Tied(2)
    untied = base.state_dict()
    untied["head.weight"] = untied["head.weight"].clone()
    states = [model.state_dict() for model in models]
    merged = ladle.dare(states, untied, density=0.5, scale=0.5, seed=0)
    assert_bit_for_bit(merged, dare_by_hand(states, untied))
    assert not torch.equal(merged["head.weight"], merged["emb.weight"])


def test_tied_keys_draw_under_the_first_name_in_the_base_s_order_whatever_the_models_order():
    # Fine-tunes listing the head before the embedding (a torch file of another layout):
    # the masks are still the embedding's, as the base lists it first.
    base, *models = Tied(0), Tied(1), Tied(2)
    reordered = [dict(reversed(model.state_dict().items())) for model in models]
    assert next(iter(reordered[0])) == "head.weight"
    merged = ladle.dare(reordered, base, density=0.5, scale=0.5, seed=0)
    expected = dare_by_hand([m.state_dict() for m in models], base.state_dict())
    expected["head.weight"] = expected["emb.weight"]
    assert_bit_for_bit(merged, expected)


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_a_merge_draws_each_block_of_each_model_once_and_nothing_at_density_one(monkeypatch):
    import ladle.methods.dare as dare_module

    drawn = []
    original = dare_module.block_seed
    monkeypatch.setattr(
        dare_module, "block_seed", lambda *args: drawn.append(args) or original(*args)
    )
    # "big" is read in chunks of exactly one block (1024 rows of 1024 entries): a chunk that
    # ends on a block's end draws no numbers of the next block, and no model past the last
    # has its numbers drawn ahead.
    base = {"big": torch.zeros(2048, 1024), "small": torch.zeros(3)}
    models = [{"big": torch.ones(2048, 1024), "small": torch.ones(3)} for _ in range(2)]
    merged = ladle.dare(models, base, density=0.5, seed=4, chunk_bytes=4 * BLOCK, device="cpu")
    expected = [(4, i, key, block) for i in range(2) for key, block in [("big", 0), ("big", 1)]]
    expected += [(4, i, "small", 0) for i in range(2)]
    assert sorted(drawn) == sorted(expected)
    # τ = 1: each entry is 2 (1/0.5) per model that keeps it.
    kept = sum(naive_mask(4, i, "small", 3, 0.5).float() for i in range(2))
    assert torch.equal(merged["small"], 2.0 * kept)
    drawn.clear()
    merged = ladle.dare(models, base, density=1.0, seed=4, device="cpu")
    assert drawn == []  # every number in [0, 1) is below 1: nothing to draw
    assert torch.equal(merged["small"], torch.full((3,), 2.0))


def test_numbers_drawn_ahead_serve_neither_another_key_of_that_shape_nor_another_model():
    # After model 0's chunk of "a", model 1's numbers for it are drawn ahead: "c" (same
    # shape and rows) of model 1, "a" of model 0 again, and model 1's next row of "a" (as
    # many entries), must draw their own.
    from ladle.methods.dare import _dropper

    shapes = {"a": (2, 3), "c": (2, 3)}
    tau = torch.arange(1.0, 7.0).view(2, 3)
    with ThreadPoolExecutor(2) as threads, ThreadPoolExecutor(1) as ahead:
        sizes = {key: math.prod(shape) for key, shape in shapes.items()}
        drop = _dropper(sizes, 9, 0.5, threads, models=3, ahead=ahead)
        for key, index in [("a", 0), ("c", 1), ("a", 0), ("a", 0), ("a", 2)]:
            dropped = drop(key, slice(None), index, tau.clone(), torch.empty(2, 3))
            mask = naive_mask(9, index, key, 6, 0.5).view(2, 3)
            assert torch.equal(dropped, tau * mask), (key, index)
        for row, index in [(0, 0), (1, 1)]:
            rows = slice(row, row + 1)
            dropped = drop("a", rows, index, tau[rows].clone(), torch.empty(1, 3))
            mask = naive_mask(9, index, "a", 6, 0.5).view(2, 3)[rows]
            assert torch.equal(dropped, tau[rows] * mask), (row, index)


@pytest.mark.parametrize(("seed", "other"), [(-1, 1), (2**32 + 1, 1), (2**64 + 5, 5)])
def test_negative_and_large_seeds_are_hashed_as_they_are(seed, other):
    # block_seed hashes the seed's decimal digits, sign included, whatever its size: -1 and
    # 1, 2**32 + 1 and 1, 2**64 + 5 and 5 draw other masks.
    mask = keep_mask(seed, 0, "w", numel=64, start=0, count=64, density=0.5)
    assert torch.equal(mask, naive_mask(seed, 0, "w", 64, 0.5))
    assert not torch.equal(mask, naive_mask(other, 0, "w", 64, 0.5))
    merged = ladle.dare([{"w": torch.ones(64)}], {"w": torch.zeros(64)}, density=0.5, seed=seed)
    assert torch.equal(merged["w"], 2.0 * mask.float())


def test_float64_survivors_are_rescaled_by_scale_over_density_as_documented():
    # θ = θ₀ + (scale/density)·Σᵢ mᵢ⊙τᵢ: in float64, 0.3/0.7 is 0.4285714285714286, while
    # 0.3·(1/0.7) rounds to 0.42857142857142855.
    base, model = {"w": torch.zeros(64, dtype=torch.float64)}, {"w": torch.ones(64).double()}
    merged = ladle.dare([model], base, density=0.7, scale=0.3, seed=2, device="cpu")["w"]
    keep = naive_mask(2, 0, "w", 64, 0.7)
    assert torch.equal(merged, torch.zeros(64, dtype=torch.float64).masked_fill(keep, 0.3 / 0.7))
    assert 0.3 / 0.7 != 0.3 * (1 / 0.7)


def test_no_base_is_a_value_error_naming_it():
    with pytest.raises(ValueError) as info:
        ladle.dare([{"w": torch.ones(2)}], None)
    assert str(info.value) == "base: task-vector methods need the base model, found None"


@pytest.mark.parametrize("combine", ["sum", "ties"])
def test_an_empty_tensor_merges_to_an_empty_tensor_beside_dropped_ones(combine):
    # No entries, no blocks: nothing is drawn for it (test_distributed.py's split merges hold
    # one too, but only in a spawned process group).
    base = {"empty": torch.zeros(0, 3), "w": torch.zeros(4)}
    models = [{"empty": torch.zeros(0, 3), "w": torch.ones(4)}]
    merged = ladle.dare(models, base, density=0.5, seed=1, combine=combine, chunk_bytes=8)
    assert merged["empty"].shape == (0, 3)
    assert torch.equal(merged["w"], 2.0 * naive_mask(1, 0, "w", 4, 0.5).float())


def test_a_seed_past_python_s_digit_limit_is_refused_before_the_merge():
    # It passed the check, then failed inside the drawing threads: "Exceeds the limit (4300
    # digits) for integer string conversion"
    limit = sys.get_int_max_str_digits()
    if limit == 0:
        pytest.skip("this Python writes integers of any length")
    with pytest.raises(ValueError) as info:
        ladle.dare([{"w": torch.ones(8)}], {"w": torch.zeros(8)}, seed=10**limit, device="cpu")
    assert str(info.value) == f"seed: expected an integer of at most {limit} digits"


def test_a_tied_tensor_votes_once_in_the_majority_written_to_a_file_too(tmp_path):
    # Votes: "w" +4, the tied tensor −3 (−6 were it counted under both names): the majority
    # is +, so the sign-tied entry of "t" takes the positive mean, +1.
    def model(w: float, tied: float, t: float) -> dict[str, torch.Tensor]:
        shared = torch.full((3,), tied)
        return {"w": torch.full((4,), w), "emb": shared, "head": shared, "t": torch.tensor([t])}

    base, models = model(0.0, 0.0, 0.0), [model(1.0, -1.0, 1.0), model(1.0, -1.0, -1.0)]
    for out in (None, tmp_path / "m.safetensors"):
        merged = ladle.dare(models, base, density=1.0, combine="ties", out=out, device="cpu")
        t = ladle.load(merged)["t"] if out is not None else merged["t"]
        assert t.tolist() == [1.0]


def test_a_density_just_below_the_floor_names_the_floor_in_full():
    # "expected at least 2**-24 (5.96e-08) ...; found 5.96e-08": the floor rounded to the text
    # of the density refused.
    from ladle.methods.dare import check_dare_density

    with pytest.raises(ValueError) as info:
        check_dare_density(5.96e-08)
    assert str(info.value).startswith("density: expected at least 2**-24 (5.960464477539063e-08)")
    assert str(info.value).endswith("; found 5.96e-08")
    assert check_dare_density(2**-24) == 2**-24


def test_a_scale_whose_quotient_by_density_overflows_is_refused_naming_both():
    # scale/density was inf: 0·inf made every dropped entry (and a zero task vector) NaN,
    # reported as "the arithmetic made NaN" of finite inputs.
    model = {"w": torch.tensor([1.0, 2.0, 3.0])}
    for combine in ("sum", "ties"):
        with pytest.raises(ValueError) as info:
            ladle.dare([model], model, density=1e-5, scale=1e305, combine=combine, device="cpu")
        assert str(info.value) == (
            "scale: 1e+305 / density 1e-05 is beyond float64's range, and DARE applies "
            "scale/density as one factor; lower the scale"
        )
    merged = ladle.dare([model], model, density=1e-3, scale=1e300, device="cpu")
    assert torch.equal(merged["w"], model["w"])


def test_uniform_numbers_fill_a_caller_s_buffer_made_under_inference_mode():
    # Decorated to run outside inference mode, it could not write into such a buffer.
    from ladle.methods.dare import uniform_numbers

    expected = uniform_numbers(0, 0, "w", numel=10, start=0, count=10)
    with torch.inference_mode():
        buffer = torch.empty(10)
        filled = uniform_numbers(0, 0, "w", numel=10, start=0, count=10, out=buffer)
        assert filled.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, expected)
