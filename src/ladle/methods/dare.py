"""DARE (Yu et al. 2024): drop task-vector entries at random, rescale the survivors, combine.

The mask is a function of (seed, model index, key, position) alone, so a merge gives the same
numbers on the CPU and a GPU, streamed or in memory, whatever the chunk size or key order:
each tensor, flattened in row-major order, is cut into blocks of ``BLOCK`` entries; block ``b``
of key ``K`` of model ``i`` draws ``torch.rand(L)`` (``L = min(BLOCK, numel − b·BLOCK)``,
float32) from a CPU ``torch.Generator`` seeded with :func:`block_seed`, and an entry survives
where its number is ``< density`` (compared exactly: :func:`keep_below`). Tied weights, keys
naming one tensor in the base and in every model (:func:`tied_names`), draw their masks under
the first of their names in the base's key order, so they stay equal.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
import sys
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import overload

import torch

from ..checkpoint import Checkpoint, StateDict, StateDictLike, tied_names
from ..engine import (
    DEFAULT_CHUNK_BYTES,
    IntegerLike,
    Kernel,
    NumberLike,
    Progress,
    _threads_beside_readers,
    current_partition,
    entry_count,
    is_merged_dtype,
    is_real,
    merge,
    one_thread_here,
    resolve_device,
    unwrap_scalar,
)
from ..errors import type_name
from ..writer import DEFAULT_MAX_SHARD_SIZE
from .task_arithmetic import Delta, check_inputs, check_scale, task_vector_sum_kernel
from .ties import check_density, majority_election

__all__ = [
    "BLOCK",
    "block_seed",
    "check_dare_density",
    "check_seed",
    "dare",
    "keep_below",
    "keep_mask",
    "tied_names",
    "uniform_numbers",
]

BLOCK = 2**20
"""Entries per block of the flattened tensor; each block has its own generator."""

COMBINES = ("sum", "ties")


AHEAD_ENTRIES = 2**19
"""Fewest entries of a chunk whose next model's numbers are drawn ahead, on a thread: on
smaller chunks the hand-over costs more than the overlap gains (4 float32 models on 2 cores:
5,000 keys of 64 entries 7.6 s drawn ahead, 4.2 s drawn in turn; keys of 2¹⁸ entries 7%
faster in turn; of 2¹⁹ 5% faster ahead, of 2²⁰ 12%)."""

DENSITY_FLOOR = 2.0**-24
"""Smallest DARE density: ``torch.rand``'s float32 numbers lie on a grid of 2⁻²⁴, so an entry
is kept with probability ⌈density·2²⁴⌉/2²⁴, density rounded up to the grid (survivors are
still rescaled by 1/density, the paper's rule): 1.3% above density at 1e-6, 2.4e-7 at 0.1, and
never below 2⁻²⁴."""


def check_dare_density(density: NumberLike) -> float:
    """``density`` as a float in [:data:`DENSITY_FLOOR`, 1], or a ``ValueError`` naming it.

    Example:
        >>> check_dare_density(0.1)
        0.1
        >>> check_dare_density(1e-9)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: density: expected at least 2**-24 (5.960464477539063e-08) for DARE, ...e-09
    """
    density = check_density(density)
    if density < DENSITY_FLOOR:
        raise ValueError(
            f"density: expected at least 2**-24 ({DENSITY_FLOOR!r}) for DARE, whose float32 "
            f"random numbers keep an entry with probability at least that; found {density}"
        )
    return density


def check_rescale(scale: float, density: float) -> float:
    """``scale / density``, the one factor DARE applies, or a ``ValueError`` naming both
    where it is beyond float64's range (an infinite factor made ``0·∞`` = NaN of every
    dropped entry). Both are checked already (``check_scale``, :func:`check_dare_density`).

    Example:
        >>> check_rescale(1.0, 0.5)
        2.0
        >>> check_rescale(1e305, 1e-5)
        Traceback (most recent call last):
        ValueError: scale: 1e+305 / density 1e-05 is beyond float64's range, ...
    """
    rescaled = scale / density
    if not math.isfinite(rescaled):
        raise ValueError(
            f"scale: {scale} / density {density} is beyond float64's range, and DARE applies "
            "scale/density as one factor; lower the scale"
        )
    return rescaled


def check_seed(seed: object) -> int:
    """``seed`` as an int: any integer, negative or beyond 64 bits too (it is hashed into each
    block's generator seed by :func:`block_seed`, never given to a generator itself). A number
    that is not an integer (``1.5``) is a ``ValueError``, what is no number (a string,
    ``None``, a bool) a ``TypeError``, as for every numeric parameter.

    Example:
        >>> check_seed(3), check_seed(torch.tensor(4)), check_seed(-1)
        (3, 4, -1)
        >>> check_seed("3")
        Traceback (most recent call last):
        TypeError: seed: expected an integer, found str
    """
    value = unwrap_scalar("seed", seed)  # a 0-d tensor or array: the number it holds
    if isinstance(value, bool):  # operator.index takes it as 0 or 1
        raise TypeError("seed: expected an integer, found bool")
    try:
        seed = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        if is_real(value):
            raise ValueError(f"seed: expected an integer, found {value!r}") from None
        raise TypeError(f"seed: expected an integer, found {type_name(value)}") from None
    try:  # block_seed writes it in decimal: Python refuses more digits than its limit
        str(seed)
    except ValueError:
        limit = sys.get_int_max_str_digits()
        raise ValueError(f"seed: expected an integer of at most {limit} digits") from None
    return seed


def keep_below(density: float) -> float:
    """The float32 number that ``uniform_numbers`` are compared with: ``⌈density·2²⁴⌉/2²⁴``.

    Every number drawn is a multiple of 2⁻²⁴, and ``u < keep_below(d)`` exactly when ``u < d``
    (as real numbers), so an entry is kept with probability ``⌈d·2²⁴⌉/2²⁴``. Comparing with
    ``d`` itself would round it to float32 first, onto a multiple of 2⁻²⁴ below ``d`` for
    densities a little above one: 0.5 + 2⁻²⁶ became 0.5, 0.125 + 2⁻⁴⁰ became 0.125.

    Example:
        >>> from ladle.methods.dare import keep_below
        >>> keep_below(0.5 + 2**-26) == 0.5 + 2**-24, keep_below(0.5), keep_below(1.0)
        (True, 0.5, 1.0)
    """
    return math.ceil(density * 2**24) / 2**24


def block_seed(seed: int, index: int, key: str, block: int) -> int:
    """The generator seed of block ``block`` of tensor ``key`` of model ``index``.

    ``blake2b(f"ladle.dare:{seed}:{index}:{key}:{block}", digest_size=8)`` (a digest of its
    own, not the first bytes of the default one) read as a little-endian integer and shifted
    right by one bit: stable across runs, machines and Python versions.

    Example:
        >>> block_seed(0, 0, "w", 0), block_seed(0, 0, "w", 0) != block_seed(0, 0, "w", 1)
        (6416004986558706948, True)
    """
    text = f"ladle.dare:{seed}:{index}:{key}:{block}".encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def uniform_numbers(
    seed: int,
    index: int,
    key: str,
    *,
    numel: int,
    start: int,
    count: int,
    threads: Executor | None = None,
    kept: dict[int, tuple[tuple[int, str, int, int], torch.Tensor]] | None = None,
    spares: dict[int, list[torch.Tensor]] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The uniform numbers in [0, 1) that decide entries ``start .. start+count`` of flattened
    tensor ``key`` (of ``numel`` entries) of model ``index``: a flat float32 CPU tensor, the
    first ``count`` entries of ``out`` where given (a flat float32 CPU tensor at least that
    long, which a caller drawing chunk after chunk reuses: fresh ones, freed on another
    thread than the one that made them, grew the heap of a long merge by hundreds of MiB).

    With ``threads``, the blocks are drawn on them at once (each block has its own
    generator, and a CPU generator draws on one core): the same numbers, sooner. With
    ``kept`` (a dict owned by the caller), a block of which only a part was asked for is
    kept there for model ``index`` (one block per model, 4 MiB), so that asking for the
    next entries does not draw it again: chunks smaller than a block draw each block once.
    With ``spares`` too (another dict of the caller's), blocks a model no longer needs are
    kept there and their memory reused for the model's next blocks: two blocks per model at
    most, kept and spare together.

    Example:
        >>> from ladle.methods.dare import uniform_numbers
        >>> whole = uniform_numbers(0, 0, "w", numel=10, start=0, count=10)
        >>> part = uniform_numbers(0, 0, "w", numel=10, start=4, count=3)
        >>> bool((part == whole[4:7]).all()), bool(((0 <= whole) & (whole < 1)).all())
        (True, True)
    """
    # Float32 on the CPU, whatever torch's defaults. Memory made here is never an inference
    # tensor (under the caller's torch.inference_mode()): the drawing threads, outside it,
    # write into it, which torch refuses for inference tensors.
    if out is None:
        with torch.inference_mode(False):
            numbers = torch.empty(count, dtype=torch.float32, device="cpu")
    else:
        numbers = out[:count]
    stop = start + count

    held = kept.get(index) if kept is not None else None
    partial: dict[int, torch.Tensor] = {}  # blocks drawn whole but used in part

    def draw(block: int) -> None:
        first = block * BLOCK
        size = min(BLOCK, numel - first)
        low, high = max(start, first), min(stop, first + size)
        whole = (low, high) == (first, first + size)
        if not whole and held is not None and held[0] == (seed, key, numel, block):
            drawn = held[1]
        else:
            seeded = torch.Generator(device="cpu").manual_seed(block_seed(seed, index, key, block))
            if whole:  # drawn in place
                torch.rand(
                    size, generator=seeded, device="cpu", out=numbers[low - start : high - start]
                )
                return
            spare = _pop(spares.get(index, [])) if spares is not None else None
            if spare is not None:  # a whole block's memory: this one's first ``size`` entries
                drawn = spare
                torch.rand(size, generator=seeded, device="cpu", out=spare[:size])
            else:
                with torch.inference_mode(False):  # kept for later calls, on other threads
                    drawn = torch.rand(size, generator=seeded, dtype=torch.float32, device="cpu")
        numbers[low - start : high - start] = drawn[low - first : high - first]
        partial[block] = drawn

    blocks = range(start // BLOCK, -(-stop // BLOCK))
    if threads is not None and len(blocks) > 1:
        list(threads.map(draw, blocks))
    else:
        for block in blocks:
            draw(block)
    if kept is None:
        return numbers
    now = partial.get(blocks[-1]) if blocks else None  # the next chunk starts there
    if now is not None:
        kept[index] = ((seed, key, numel, blocks[-1]), now)
    else:
        kept.pop(index, None)
    if spares is not None:  # fresh blocks, freed between allocations kept, grew the heap
        keep = spares.setdefault(index, [])
        for spent in {id(b): b for b in [*partial.values(), *([held[1]] if held else [])]}.values():
            if spent is not now and spent.numel() == BLOCK and len(keep) + (now is not None) < 2:
                keep.append(spent)
    return numbers


def _pop(blocks: list[torch.Tensor]) -> torch.Tensor | None:
    """The last of ``blocks``, taken out (``list.pop`` is atomic: drawing threads share it)."""
    try:
        return blocks.pop()
    except IndexError:
        return None


def keep_mask(
    seed: int, index: int, key: str, *, numel: int, start: int, count: int, density: float
) -> torch.Tensor:
    """Which of entries ``start .. start+count`` of flattened tensor ``key`` (of ``numel``
    entries) model ``index`` keeps: a flat boolean CPU tensor.

    Example:
        >>> from ladle.methods.dare import keep_mask
        >>> whole = keep_mask(0, 0, "w", numel=10, start=0, count=10, density=0.5)
        >>> part = keep_mask(0, 0, "w", numel=10, start=4, count=3, density=0.5)
        >>> bool((whole[4:7] == part).all())
        True
    """
    numbers = uniform_numbers(seed, index, key, numel=numel, start=start, count=count)
    return numbers < keep_below(density)


def _dropper(
    sizes: dict[str, int],
    seed: int,
    density: float,
    threads: Executor,
    *,
    models: int,
    ahead: Executor,
    names: dict[str, str] | None = None,
) -> Delta:
    """``mᵢ ⊙ τᵢ``, the mask ``mᵢ`` drawn per block of the flattened tensor (on ``threads``);
    the rescale by ``1/density`` is left to the combination (see :func:`dare`). A key in
    ``names`` (:func:`tied_names`) draws its mask under the name it maps to.

    While model ``i``'s chunk is computed, model ``i + 1``'s numbers for the same rows are
    drawn on ``ahead`` (one thread): the random numbers, most of DARE's CPU time, overlap
    the arithmetic (for chunks of :data:`AHEAD_ENTRIES` or more). One chunk's numbers more are
    held (float32, a chunk's entries)."""

    kept: dict[int, tuple[tuple[int, str, int, int], torch.Tensor]] = {}  # per model: a block
    spares: dict[int, list[torch.Tensor]] = {}  # per model: blocks' memory to draw the next in
    threshold = keep_below(density)
    waiting: list[tuple[tuple[str, int, int, int], int, Future[torch.Tensor]]] = []
    # The numbers of the chunk being dropped and of the next model's, drawn ahead: two
    # buffers, taken in turns, as long as the longest chunk.
    ring = [torch.empty(0, dtype=torch.float32, device="cpu") for _ in range(2)]

    def numbers(key: str, start: int, count: int, index: int) -> torch.Tensor:
        @torch.inference_mode(False)  # buffers both threads write: see uniform_numbers
        def draw(index: int, slot: int) -> torch.Tensor:
            if ring[slot].numel() < count:
                ring[slot] = torch.empty(count, dtype=torch.float32, device="cpu")
            return uniform_numbers(
                seed,
                index,
                key,
                numel=sizes[key],
                start=start,
                count=count,
                threads=threads,
                kept=kept,
                spares=spares,
                out=ring[slot],
            )

        drawn, slot = None, 0
        if waiting:
            ((wanted, ahead_slot, future),) = waiting
            waiting.clear()
            ahead_of_time = future.result()  # also when not these: two draws would share kept
            if wanted == (key, start, count, index):
                drawn, slot = ahead_of_time, ahead_slot
        if drawn is None:
            drawn = draw(index, slot)
        if index + 1 < models and count >= AHEAD_ENTRIES:
            # Into the other buffer: this one is used until the next call.
            following = (key, start, count, index + 1)
            waiting.append((following, 1 - slot, ahead.submit(draw, index + 1, 1 - slot)))
        return drawn

    def drop(
        key: str, rows: slice, index: int, tau: torch.Tensor, scratch: torch.Tensor
    ) -> torch.Tensor:
        if density == 1.0:  # every uniform number in [0, 1) survives
            return tau
        if names:
            key = names.get(key, key)  # tied weights: one mask for every name of the tensor
        row_size = math.prod(tau.shape[1:])  # the rows read (engine.chunk_shape), not stored
        drawn = numbers(key, (rows.start or 0) * row_size, tau.numel(), index)
        # 1.0 where kept, 0.0 where dropped: multiplying by a float mask is many times faster
        # than masked_fill_ with a bool one (a dropped entry becomes ±0.0).
        keep = torch.lt(drawn, threshold, out=drawn).view(tau.shape).to(tau.device)
        return tau.mul_(keep)

    return drop


@overload
def dare(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    density: NumberLike = ...,
    scale: NumberLike = ...,
    seed: IntegerLike = ...,
    combine: str = ...,
    out: None = ...,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    chunk_bytes: int = ...,
    allow_nonfinite: bool = ...,
) -> StateDict: ...


@overload
def dare(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    density: NumberLike = ...,
    scale: NumberLike = ...,
    seed: IntegerLike = ...,
    combine: str = ...,
    out: str | os.PathLike,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    chunk_bytes: int = ...,
    allow_nonfinite: bool = ...,
) -> Path: ...


def dare(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    density: NumberLike = 0.1,
    scale: NumberLike = 1.0,
    seed: IntegerLike = 0,
    combine: str = "sum",
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Progress = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    allow_nonfinite: bool = False,
) -> StateDict | Path:
    """DARE: drop each task-vector entry with probability ``1 − density``, rescale, combine.

    With ``τᵢ = θᵢ − θ_base`` and a Bernoulli(``density``) mask ``mᵢ`` per entry,
    ``δᵢ = mᵢ ⊙ τᵢ / density``; then ``combine="sum"``: ``θ = θ_base + scale·Σᵢ δᵢ`` (task
    arithmetic of the ``δᵢ``), or ``combine="ties"``: TIES's sign election and disjoint mean
    over the ``δᵢ`` (no trim), ``θ = θ_base + scale·merged``, the sign for ``γ = 0`` being the
    majority over the whole model. Yu et al., "Language models are Super Mario: absorbing
    abilities from homologous models as a free lunch", ICML 2024. The rescale by
    ``1/density`` is applied once, to the combination (the same in exact arithmetic), so the
    signs are elected on the task vectors' own sums: exact cancellations elect 0.

    The masks depend only on ``seed``, the model's position in ``models``, the key and the
    entry's position (see the module docs), so results are reproducible across devices, chunk
    sizes and key orders; reordering ``models`` changes which mask each model gets. Keys that
    name one tensor (tied weights) in the base and every model (a module, its state dict, a
    torch file) draw the masks of the first of them in the base's key order, and stay equal.

    Args:
        models: the fine-tuned models (mappings, modules, paths or checkpoints).
        base: the model they were fine-tuned from; task vectors are ``model − base``.
        density: the probability that an entry is kept, in [2⁻²⁴, 1]
            (:data:`DENSITY_FLOOR`).
        scale: the factor λ applied to the combined task vectors.
        seed: seeds the masks: any integer, negative ones too (:func:`check_seed`).
        combine: ``"sum"`` or ``"ties"``.
        out: ``None`` to return a state dict on the CPU; a ``.safetensors`` path or a directory
            to stream the result to disk and return its path.
        device: where the arithmetic runs; default CUDA when available, else the CPU. Masks are
            drawn on the CPU.
        dtype: output dtype of floating tensors; default that of the base.
        progress: ``True`` for a tqdm bar over bytes read by the merge pass, or a tqdm-like
            class.
        max_shard_size: largest shard of a directory output.
        overwrite: replace an earlier output at ``out`` (atomically) instead of refusing.
        chunk_bytes: largest piece of one tensor processed at a time, per model.
        allow_nonfinite: merge inputs holding NaN or Inf, and keep merged values that
            overflow the output dtype, instead of raising NonFiniteError.

    Returns:
        The merged state dict, or the path written.

    Example:
        >>> import torch, ladle
        >>> base, model = {"w": torch.zeros(8)}, {"w": torch.ones(8)}
        >>> ladle.dare([model], base, density=0.5, seed=0)["w"]  # survivors rescaled to 1/0.5
        tensor([0., 0., 2., 0., 2., 2., 2., 0.])
        >>> ladle.dare([model], base, density=1.0)["w"]  # nothing dropped: task arithmetic
        tensor([1., 1., 1., 1., 1., 1., 1., 1.])
    """
    density = check_dare_density(density)
    scale = check_scale(scale)
    if combine not in COMBINES:
        raise ValueError(f"combine: expected one of {COMBINES}, found {combine!r}")
    seed = check_seed(seed)
    check_inputs(models, base)
    target = resolve_device(device)

    # The rescale by 1/density multiplies every δᵢ alike, so it is applied once, to the
    # combination: Σᵢ δᵢ = (Σᵢ mᵢ⊙τᵢ)/density, and the sign election and disjoint mean of the
    # δᵢ are those of the mᵢ⊙τᵢ, divided by density. The election then sums the task vectors'
    # own values: entries that cancel exactly elect 0 (the majority rule), where rounded
    # quotients τᵢ/density would leave a rounding error of either sign.
    rescaled = check_rescale(scale, density)

    # Threads that draw the random numbers' blocks, and one that has them draw the next
    # model's numbers while this model's chunk is computed, for this merge alone. Torch
    # computes on as many threads fewer meanwhile (at least one): the numbers take most of
    # the CPU time, and torch's threads, spinning between operations, took it from them
    # (on 2 cores: 0.86 s with two torch threads, 0.69–0.71 s with one, 12 fp32 models of
    # 89 MiB).
    drawers = min(8, os.cpu_count() or 1)
    # A core each: they drew on the lowered count of the merging thread, which torch (OpenMP)
    # gave every thread starting meanwhile, and no longer does (set_own_threads).
    threads = ThreadPoolExecutor(drawers, "ladle-dare", initializer=one_thread_here)
    ahead = ThreadPoolExecutor(1, "ladle-dare-ahead", initializer=one_thread_here)

    def prepare(checkpoints: list[Checkpoint], base_ckpt: Checkpoint | None) -> Kernel:
        assert base_ckpt is not None
        # Entries as kernels see them: a complex one is two, its real and imaginary parts.
        sizes = {
            key: entry_count(base_ckpt.shape(key), base_ckpt.dtype(key)) for key in base_ckpt.keys()
        }
        names = tied_names([base_ckpt, *checkpoints])
        dropper = _dropper(
            sizes, seed, density, threads, models=len(checkpoints), ahead=ahead, names=names
        )
        if combine == "sum":
            # A dropped entry is multiplied by 0.0, and 0·NaN, 0·Inf are NaN: non-finite inputs
            # still show in the result.
            return task_vector_sum_kernel(
                [1.0] * len(checkpoints), rescaled, dropper, delta_propagates_nonfinite=True
            )
        part = current_partition()  # a merge split across processes: votes of its keys, summed
        own = base_ckpt.keys() if part is None else part.keys(base_ckpt)
        return majority_election(
            checkpoints,
            base_ckpt,
            dropper,
            keys=[k for k in own if is_merged_dtype(base_ckpt.dtype(k))],
            per_tensor=False,
            scale=rescaled,
            device=target,
            chunk_bytes=chunk_bytes,
            allow_nonfinite=allow_nonfinite,
            split=part is not None,
            reduce=None if part is None else part.all_reduce,
            uncounted=names,
        )

    # The numbers are drawn on the CPU whatever the device: fewer CPU torch threads there too.
    beside = _threads_beside_readers(torch.device("cpu"), drawers)
    with threads, ahead, beside:  # all undone with the merge
        return merge(
            models,
            task_vector_sum_kernel([], scale),  # replaced by prepare
            base=base,
            method="dare",
            parameters={"density": density, "scale": scale, "seed": seed, "combine": combine},
            out=out,
            device=target,
            dtype=dtype,
            progress=progress,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            chunk_bytes=chunk_bytes,
            allow_nonfinite=allow_nonfinite,
            prepare=prepare,
        )
