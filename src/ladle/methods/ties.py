"""TIES-Merging (Yadav et al. 2023): trim task vectors, elect signs, take the disjoint mean.

Streaming needs each task vector's magnitude threshold before the merge pass. It is found
exactly, without loading a model: magnitudes are non-negative floats, whose bit patterns order
like the integers they spell. Usually one pass does, counting every bit pattern inside a
window that a sample of the magnitudes says holds the threshold; where the sample misleads,
a radix select finds it 16 bits at a time from histograms gathered by two passes (float32).
The sign-tie majority is patched into the output after the merge pass (:class:`_TiesLater`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, overload

import torch

from ..checkpoint import Checkpoint, StateDict, StateDictLike, tied_names
from ..engine import (
    FOLD_CHUNK_BYTES,
    Kernel,
    NumberLike,
    Progress,
    Scratch,
    _merged_view,
    _shaped,
    check_chunk_bytes,
    check_compatible,
    check_mergeable,
    check_number,
    compute_dtype,
    current_partition,
    entry_count,
    fold,
    is_merged_dtype,
    merge,
    open_models,
    real_view,
    resolve_device,
    row_chunks,
    scale_,
)
from ..writer import DEFAULT_MAX_SHARD_SIZE
from .task_arithmetic import Delta, check_inputs, check_scale

__all__ = [
    "SignElection",
    "check_density",
    "elect_later",
    "elected",
    "election_kernel",
    "keep_rank",
    "magnitude_thresholds",
    "majority_election",
    "majority_votes",
    "ties",
]

TRIMS = ("global", "tensor")

MERGE_CHUNK_BYTES = 2**20
"""Chunk of TIES's merging pass (and of its vote pass, in a merge split across processes) on
the CPU by default, per model: 1 MiB, where its threshold passes, and every pass on an
accelerator (whose copies and kernels each cost a fixed few microseconds), take
``FOLD_CHUNK_BYTES`` (4 MiB). The sign election works through seven arrays of a chunk's
size, about nine operations per model and value, which run faster on chunks that stay nearer
the CPU's cores; the threshold passes' work per chunk (gathering and counting the magnitudes
in each model's window) runs faster on larger ones. On 12 fp32 models of 89 MiB, in memory
(2 cores, 2 MiB of L2 cache each, 2026-12-03), TIES took 2.07-2.21 s against 2.31-2.53 s
with 4 MiB chunks for both (five alternating runs each; the same bits), the merging pass
alone 0.71-0.91 s against 1.12-1.20 s; 2 MiB chunks gained less, 256 KiB ones lost. Soups,
task arithmetic and Model Stock gained nothing from smaller chunks."""

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the processes of a split merge (``Partition.all_reduce``), in place."""
_DIGIT = 16
_BINS = 1 << _DIGIT


def check_density(density: NumberLike) -> float:
    """``density`` as a float in (0, 1], or a ``ValueError`` naming it (a ``TypeError`` for
    what is no number).

    Example:
        >>> check_density(0.2)
        0.2
        >>> check_density(0)
        Traceback (most recent call last):
        ValueError: density: expected a number in (0, 1], found 0.0
    """
    density = check_number("density", density)
    if not 0.0 < density <= 1.0:  # also false for NaN
        raise ValueError(f"density: expected a number in (0, 1], found {density}")
    return density


def keep_rank(count: int, density: float) -> int:
    """The paper code's rank ``k = d − int(d·density)``: keep ``|τ| ≥`` the k-th smallest.

    Below 1 (``density = 1``, or no entries) nothing is trimmed.

    Example:
        >>> keep_rank(10, 0.2), keep_rank(10, 1.0), keep_rank(3, 0.5)
        (8, 0, 2)
    """
    return count - int(count * density)


# --- exact k-th smallest magnitude by radix select -------------------------------------------


def _exact_count_dtype(numel: int) -> torch.dtype:
    """The dtype in which a sum of ``numel`` values of -1, 0 or 1 is exact: float32 (faster)
    below 2²⁴ values, as it holds every integer up to 2²⁴; float64 from there on.

    Example:
        >>> _exact_count_dtype(2**24 - 1), _exact_count_dtype(2**24)
        (torch.float32, torch.float64)
    """
    return torch.float32 if numel < 2**24 else torch.float64


def _magnitude_bits(tau: torch.Tensor, width: int) -> torch.Tensor:
    """``|tau|`` (owned, overwritten) as integers of ``width`` bits that order like the floats."""
    magnitude = tau.abs_()
    if width == 64:
        return magnitude.to(torch.float64).view(torch.int64).flatten()
    return magnitude.view(torch.int32).flatten()


def _histogram_kernel(
    groups: Mapping[str, str],
    widths: Mapping[str, int],
    prefixes: Mapping[str, list[int]],
    step: int,
    counts: dict[str, torch.Tensor],
    models: int,
) -> Kernel:
    """Count, per group and model, digit ``step`` (16 bits, most significant first) of the
    magnitudes whose higher digits equal the prefix found so far, into ``counts[group]`` (a
    models × 65536 tensor that outlives the chunk; the kernel's own result is empty)."""

    scratch = Scratch()  # one buffer for every model's |τ|, reused from chunk to chunk

    def init(key: str, rows: slice, base: torch.Tensor | None) -> tuple:
        assert base is not None
        return key, base, scratch.take(base.shape, base.dtype, base.device)

    def update(state: tuple, index: int, x: torch.Tensor) -> tuple:
        key, base, buffer = state
        group = groups[key]
        width = widths[group]
        shift = width - _DIGIT * (step + 1)
        bits = _magnitude_bits(torch.sub(x, base, out=buffer), width)
        if step > 0:
            bits = bits[(bits >> (shift + _DIGIT)) == prefixes[group][index]]
        digits = bits >> shift  # a new tensor: bits may be the buffer's view
        if step > 0:  # drop the prefix's bits
            digits &= _BINS - 1
        if group not in counts:
            counts[group] = torch.zeros(models, _BINS, dtype=torch.int64, device=x.device)
        if digits.numel() < _BINS // 16:  # a small chunk: no pass over all bins
            counts[group][index].index_add_(0, digits, torch.ones_like(digits, dtype=torch.int64))
        else:
            counts[group][index] += torch.bincount(digits, minlength=_BINS)
        return state

    return _counting(init, update)


def _counting(init: Callable[..., Any], update: Callable[..., Any]) -> Kernel:
    """A kernel that only counts into tensors of its own: its merged chunk is empty."""
    return Kernel(init, update, lambda state: torch.empty(0, device="cpu"))


def _radix_select(
    models: Sequence[Checkpoint],
    base: Checkpoint,
    *,
    groups: Mapping[str, str],
    ranks: Mapping[str, int],
    device: torch.device,
    chunk_bytes: int,
    allow_nonfinite: bool = False,
    reduce: Reduce | None = None,
) -> dict[str, list[float]]:
    """For every group ``g`` of keys and model ``i``: the ``ranks[g]``-th smallest (1-based)
    ``|modelᵢ − base|`` over all entries of the keys of ``g``, exactly as ``torch.kthvalue``
    over their concatenation would find it, in float32 (float64 if a key of ``g`` is).

    With ``reduce`` (a merge split across processes), each group's keys are spread over the
    processes, which all pass the same ``ranks``: histograms are summed with ``reduce``.
    """
    n = len(models)
    widths: dict[str, int] = {}
    for key, group in groups.items():
        wide = compute_dtype([c.dtype(key) for c in [*models, base]]).to_real() == torch.float64
        widths[group] = max(widths.get(group, 32), 64 if wide else 32)
    if reduce is not None:  # float64 anywhere widens the group everywhere
        for group in sorted(ranks):
            anywhere = reduce(torch.tensor(int(widths.get(group, 32) == 64), device="cpu"))
            widths[group] = 64 if int(anywhere) else 32
    prefixes = {group: [0] * n for group in ranks}
    left = {group: [ranks[group]] * n for group in ranks}
    counts: dict[str, torch.Tensor] = {}

    def resolve(group: str) -> None:
        histogram = counts.pop(group, None)
        if histogram is None:  # this process holds none of the group's keys
            histogram = torch.zeros(n, _BINS, dtype=torch.int64, device=device)
        if reduce is not None:
            histogram = reduce(histogram)
        cumulative = histogram.cpu().cumsum(1)
        for i in range(n):  # the first digit whose cumulative count reaches the rank
            digit = int(torch.searchsorted(cumulative[i], left[group][i]))
            left[group][i] -= int(cumulative[i, digit - 1]) if digit else 0
            prefixes[group][i] = (prefixes[group][i] << _DIGIT) | digit

    for step in range(64 // _DIGIT):
        active = sorted(g for g in ranks if step < widths[g] // _DIGIT)
        if not active:
            break
        keys = [k for k, g in groups.items() if g in ranks and step < widths[g] // _DIGIT]
        done = set()
        kernel = _histogram_kernel(groups, widths, prefixes, step, counts, n)
        current = None
        # Keys come in order, so a group's counts are complete when the next group starts:
        # one models × 65536 histogram is held at a time.
        for key, _, _ in fold(
            models,
            kernel,
            base=base,
            keys=keys,
            device=device,
            chunk_bytes=chunk_bytes,
            allow_nonfinite=allow_nonfinite or step > 0,  # the first pass checked every key
        ):
            if groups[key] != current and current is not None:
                resolve(current)
                done.add(current)
            current = groups[key]
        if current is not None:
            resolve(current)
            done.add(current)
        for group in active:  # split across processes: every process resolves alike
            if group not in done:
                resolve(group)

    found: dict[str, list[float]] = {}
    for group, bits in prefixes.items():
        kind = (torch.int64, torch.float64) if widths[group] == 64 else (torch.int32, torch.float32)
        found[group] = torch.tensor(bits, dtype=kind[0], device="cpu").view(kind[1]).tolist()
    return found


# --- one pass, when a sample locates the threshold ---------------------------------------------

SAMPLE = 2**17
"""Magnitudes sampled per model and group of keys to guess where the threshold lies."""

WINDOW = 2**19
"""Most float32 bit patterns a guessed window may span (its histogram: 4 MiB per model)."""

_SPREAD = 5.0  # standard deviations of the sample's rank kept on either side of the guess


SAMPLE_BLOCK = 1024
"""Entries sampled from a tensor per block of rows read, at least (one block for fewer): each
block is a read, and a model of many small tensors (5000 of 64 entries) spent 9 of its 10 s
sampling them 2 rows at a time."""


def _sample_blocks(shape: tuple[int, ...], entries: int) -> list[slice]:
    """At most 16 evenly spaced, disjoint blocks of rows of a tensor of ``shape``, holding at
    least ``entries`` (every row when it has fewer): at most one block per
    :data:`SAMPLE_BLOCK` entries they hold together, and at least one (none for an empty
    tensor, or for ``entries`` 0)."""
    if not shape:
        return [slice(None)]
    rows, width = shape[0], max(1, math.prod(shape[1:]))
    wanted = min(rows, -(-entries // width))
    if wanted == 0 or math.prod(shape) == 0:  # an empty tensor, or nothing asked of it
        return []
    count = max(1, min(wanted, 16, wanted * width // SAMPLE_BLOCK))
    length = -(-wanted // count)
    starts = sorted({j * rows // count for j in range(count)})
    stops = [*starts[1:], rows]  # a block never reaches into the next: no entry twice
    return [slice(start, min(start + length, stop)) for start, stop in zip(starts, stops)]


def _rows(
    checkpoint: Checkpoint, key: str, rows: slice, view: tuple[int, ...] | None
) -> torch.Tensor:
    """Rows of ``key`` (of its merged ``view``, if any), never to write: a view of the file's
    pages where the checkpoint has one (no copy, and the first touch is in the map the passes
    read later: sampling took 27–31 ms against 31–51 ms through ``get_slice`` on 13 files of
    89 MiB), else ``get_rows``."""
    mapped = checkpoint.map_rows(key, rows, *_shaped(view))
    return mapped if mapped is not None else checkpoint.get_rows(key, rows, view)


def _windows(
    models: Sequence[Checkpoint],
    base: Checkpoint,
    keys: Sequence[str],
    rank: int,
    size: int,
    chunk_bytes: int,
) -> list[tuple[int, int]] | None:
    """Per model, a window ``(low, span)`` of float32 bit patterns of magnitudes that should
    hold the ``rank``-th smallest of the ``size`` entries of ``keys``: :data:`_SPREAD`
    deviations of a sample's rank either side, the sample read from a few blocks of rows of
    each key (rows of :func:`~ladle.engine.chunk_shape`: a ``(1, n)`` tensor's one row is not
    a block). ``None`` if a window would span more than :data:`WINDOW` patterns."""
    samples: list[list[torch.Tensor]] = [[] for _ in models]
    for key in keys:
        stored = tuple(base.shape(key))
        view = _merged_view(stored, chunk_bytes)
        per = 2 if base.dtype(key).is_complex else 1  # a complex entry is two numbers
        entries = -(-SAMPLE * math.prod(stored) * per // size)
        blocks = _sample_blocks(view or stored, -(-entries // per))
        for rows in blocks:
            origin = real_view(_rows(base, key, rows, view))
            # Blocks are whole rows: where they hold more than this key's share, every
            # ``step``-th entry (a strided view), so that a model of many keys whose rows
            # are long still samples about SAMPLE entries, not a row of every key.
            step = max(1, origin.numel() * len(blocks) // max(entries, 1))
            # On the CPU: sources in memory may hold their tensors on other devices.
            origin = origin.flatten()[::step].to("cpu", torch.float32)
            for i, model in enumerate(models):
                rows_of_model = real_view(_rows(model, key, rows, view)).flatten()[::step]
                tau = rows_of_model.to("cpu", torch.float32) - origin
                samples[i].append(_magnitude_bits(tau, 32))
    windows = []
    for parts in samples:
        sample = torch.cat(parts)
        count, fraction = sample.numel(), rank / size
        spread = _SPREAD * math.sqrt(count * fraction * (1 - fraction)) + 1
        first = min(max(math.floor(fraction * count - spread), 1), count)
        last = min(max(math.ceil(fraction * count + spread), 1), count)
        if count >= size:  # the sample is every entry: the answer itself
            first = last = rank
        low, high = _kth_patterns(sample, [first, last])
        if high - low >= WINDOW:
            return None
        windows.append((low, max(high - low + 1, 1)))
    return windows


_NORMAL, _INFINITY = 0x00800000, 0x7F800000
"""Bit patterns of the smallest normal float32 and of infinity."""


def _as_float(bits: int, dtype: torch.dtype = torch.float32) -> float:
    """The number of ``dtype`` (float32 or float64) whose bit pattern is ``bits``."""
    integer = torch.int64 if dtype == torch.float64 else torch.int32
    return torch.tensor([bits], dtype=integer, device="cpu").view(dtype).item()


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The indices of the true entries of a flat, contiguous bool tensor, in order: what
    ``torch.nonzero(mask).squeeze(1)`` gives, found faster when few entries are true.

    One ``nonzero`` over the mask read as 64-bit words (8 entries each) finds the words that
    hold a true entry; a second searches those words alone. On 2²⁰ entries of which 2% are
    true: 340 µs, against 425 µs for ``torch.nonzero`` over every entry. On an accelerator,
    and for a mask that does not start on a word, ``torch.nonzero`` itself.
    """
    if mask.device.type != "cpu" or mask.storage_offset() % 8:
        return torch.nonzero(mask).squeeze(1)
    whole = mask.numel() // 8 * 8
    words = mask[:whole].view(torch.int64)
    hit = torch.nonzero(words).squeeze(1)
    found = torch.nonzero(words.index_select(0, hit).view(torch.bool)).squeeze(1)
    index = hit.index_select(0, found >> 3).mul_(8).add_(found & 7)
    if whole == mask.numel():
        return index
    return torch.cat([index, torch.nonzero(mask[whole:]).squeeze(1).add_(whole)])


INSIDE_BATCH = 2**16
"""In-window bit patterns gathered per model (256 KiB) before they are counted with one
``bincount``. Adding each chunk's few thousand with ``index_add_`` into a histogram out of the
CPU's cache took 39 ms of the window pass on 12 fp32 models of 89 MiB; batches of 2¹⁶ take
18 ms, batches of 2¹⁸ 10 ms but 9 MiB more memory."""


class _WindowCounts:
    """Per model, a histogram of the magnitudes' bit patterns inside its window, one bin per
    pattern, made on the first batch counted, and the count of those below the window (those
    above it are the rest: the search needs no count of them). A window that starts at 0
    also counts its zeros apart, added to its first bin when it is searched."""

    def __init__(self, windows: Sequence[tuple[int, int]]) -> None:
        self.windows = windows
        self.histograms: list[torch.Tensor | None] = [None] * len(windows)
        self.below = [0] * len(windows)
        self.zeros = [0] * len(windows)
        self.pending: list[list[torch.Tensor]] = [[] for _ in windows]
        self.waiting = [0] * len(windows)

    def add(self, index: int, below: int, inside: torch.Tensor, zeros: int = 0) -> None:
        """Count ``below`` the window, ``inside``: offsets into it, and ``zeros``: offsets 0
        not among ``inside``."""
        self.below[index] += below
        self.zeros[index] += zeros
        self.pending[index].append(inside)
        self.waiting[index] += inside.numel()
        if self.waiting[index] >= INSIDE_BATCH:
            self._count(index)

    def _count(self, index: int) -> None:
        if self.waiting[index]:
            counted = torch.bincount(
                torch.cat(self.pending[index]), minlength=self.windows[index][1]
            )
            histogram = self.histograms[index]
            self.histograms[index] = counted if histogram is None else histogram.add_(counted)
        self.pending[index], self.waiting[index] = [], 0

    def offset_of(self, index: int, rank: int) -> int | None:
        """The offset in model ``index``'s window of its ``rank``-th smallest pattern (every
        pattern gathered so far counted), or ``None`` where that lies below or above the
        window. Searched where the histogram is: only two numbers reach the host."""
        self._count(index)
        below, histogram = self.below[index], self.histograms[index]
        if self.zeros[index]:
            if histogram is None:
                histogram = torch.zeros(self.windows[index][1], dtype=torch.int64)
            histogram[0] += self.zeros[index]
        if histogram is None or rank <= below:
            return None
        cumulative = histogram.cumsum_(0)  # the histogram is done with
        if rank - below > int(cumulative[-1]):
            return None
        return int(torch.searchsorted(cumulative, rank - below))


def _from_zero(
    magnitudes: torch.Tensor,
    bits: torch.Tensor,
    span: int,
    past: float | None,
    buffers: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, int]:
    """The bit patterns (``bits``, flat) of ``magnitudes`` inside a window ``(0, span)`` but
    for the zeros, and the number of zeros. Where a task vector is mostly 0 (frozen layers,
    a fine-tune that is the base) and the threshold is 0 or just above it, gathering every
    zero into the histogram made the pass 1.7–2.3× as slow as on random task vectors.
    Zeros are found by their pattern, exact where subnormal numbers flush to zero; the end
    of the window by comparing floats where it is a normal ``past``, else patterns."""
    scratch, mask = buffers
    zero = torch.eq(bits, 0, out=scratch.flatten())  # 1.0 or 0.0
    zeros = int(zero.sum(dtype=_exact_count_dtype(zero.numel())))
    if span == 1:  # the window is the zeros alone
        return bits[:0], zeros
    if past is not None:
        end = torch.lt(magnitudes, past, out=mask)
    else:
        end = torch.lt(bits.view_as(magnitudes), span, out=mask)
    inside = end.flatten().sub_(zero).bool()
    return bits.index_select(0, _flat_nonzero(inside)), zeros


def _window_kernel(windows: Sequence[tuple[int, int]], counts: _WindowCounts) -> Kernel:
    """Count each model's magnitudes below and inside its window into ``counts``.

    A chunk's result is each model's sum of magnitudes: NaN or Inf in the base or a model
    makes it non-finite, so the engine checks these sums (``propagates_nonfinite``) instead
    of every input, summed again from memory.
    """

    buffers = Scratch(), Scratch(), Scratch()  # reused from chunk to chunk: no page faults
    # Each window's first pattern as a float and, for a window between two normal floats
    # or from 0 to a normal float, the float just past it (``None`` elsewhere): found once,
    # not for every chunk.
    lows = [_as_float(low) for low, _ in windows]
    pasts = [
        _as_float(low + span)
        if (low >= _NORMAL or low == 0) and _NORMAL <= low + span <= _INFINITY
        else None
        for low, span in windows
    ]

    def init(key: str, rows: slice, base: torch.Tensor | None) -> tuple:
        assert base is not None
        return base, *(b.take(base.shape, base.dtype, base.device) for b in buffers), []

    def update(state: tuple, index: int, x: torch.Tensor) -> tuple:
        base, buffer, scratch, mask, sums = state
        low, span = windows[index]
        magnitudes = torch.sub(x, base, out=buffer).abs_()
        sums.append(magnitudes.sum())  # in cache now; the bit patterns below overwrite it
        # Most magnitudes fall outside the window: count those below with a sum (a histogram
        # of such lopsided bins is slow), then histogram the few inside.
        under = torch.lt(magnitudes, lows[index], out=scratch)  # 1.0 or 0.0
        below = int(under.sum(dtype=_exact_count_dtype(under.numel())))
        bits = magnitudes.view(torch.int32).flatten()
        past = pasts[index]
        if low == 0:  # nothing below; zeros counted with one sum, not gathered one by one
            counts.add(index, 0, *_from_zero(magnitudes, bits, span, past, (scratch, mask)))
            return state
        if past is not None:
            # Between two normal floats, float order is bit-pattern order (flushing
            # subnormals to zero cannot change it); comparisons into float masks run several
            # times faster than comparisons into bool ones.
            end = torch.lt(magnitudes, past, out=mask).sub_(under).flatten().bool()
            inside = bits.index_select(0, _flat_nonzero(end)).sub_(low)
        else:  # a window reaching subnormal, infinite or NaN patterns: compare the patterns
            offsets = bits.sub_(low)
            inside = offsets[(offsets >= 0).logical_and_(offsets < span)]
        counts.add(index, below, inside)
        return state

    return Kernel(init, update, lambda state: torch.stack(state[-1]), propagates_nonfinite=True)


def _select_in_window(
    models: Sequence[Checkpoint],
    base: Checkpoint,
    *,
    keys: Sequence[str],
    rank: int,
    size: int,
    device: torch.device,
    chunk_bytes: int,
    allow_nonfinite: bool,
) -> list[float] | None:
    """The radix select's answer for one group of keys in one pass, or ``None`` when a guess
    misses.

    A sample of the magnitudes brackets each model's threshold with a window of float32 bit
    patterns; one pass counts every pattern inside the window (and those below it); where
    the rank falls inside, the pattern that reaches it is the exact answer.
    Memory: the sample, and per model one histogram of at most :data:`WINDOW` bins and
    about :data:`INSIDE_BATCH` patterns waiting to be counted.
    """
    windows = _windows(models, base, keys, rank, size, chunk_bytes)
    if windows is None:
        return None
    counts = _WindowCounts(windows)
    for _ in fold(
        models,
        _window_kernel(windows, counts),
        base=base,
        keys=keys,
        device=device,
        chunk_bytes=chunk_bytes,
        allow_nonfinite=allow_nonfinite,
    ):
        pass
    found = []
    for index, (low, _) in enumerate(windows):
        offset = counts.offset_of(index, rank)
        if offset is None:
            return None  # the k-th smallest lies below or above the window
        found.append(_as_float(low + offset))
    return found


def _at_least(value: float, dtype: torch.dtype) -> float:
    """The smallest number of ``dtype`` that is ``≥ value`` (so ``|τ| ≥`` it stays exact)."""
    if dtype == torch.float64:
        return value
    rounded = torch.tensor(value, dtype=torch.float64, device="cpu").to(dtype)
    if rounded.item() < value:
        rounded = torch.nextafter(rounded, torch.tensor(float("inf"), dtype=dtype, device="cpu"))
    return rounded.item()


def _thresholds(
    models: Sequence[Checkpoint],
    base: Checkpoint,
    *,
    keys: Sequence[str],
    density: float,
    trim: str,
    device: torch.device,
    chunk_bytes: int,
    allow_nonfinite: bool = False,
    reduce: Reduce | None = None,
    tied: Mapping[str, str] | None = None,
) -> dict[str, list[float]]:
    """Per key, per model: the magnitude below which an entry is trimmed (0.0: keep all).

    ``reduce`` (``trim="global"`` only): ``keys`` are this process's share of a merge split
    across processes; counts and histograms are summed over the processes with it.
    ``tied`` (``trim="global"`` only; :func:`~ladle.checkpoint.tied_names`): keys naming the
    tensor of another key, left out of the ranking (a tied tensor counts once, as in the
    paper code, whose scripts drop the tied copies by name) and given its thresholds.
    """
    if reduce is not None and trim != "global":
        raise ValueError(f"reduce: only trim='global' spans processes, found trim={trim!r}")
    if tied and trim != "global":
        raise ValueError(f"tied: only trim='global' ranks keys together, found trim={trim!r}")
    tied = tied or {}
    every = {key: "" if trim == "global" else key for key in keys}  # the keys given limits
    groups = {key: group for key, group in every.items() if key not in tied}  # those ranked
    # Magnitudes are of real numbers: a complex entry's two parts are two of them.
    dtypes = {key: compute_dtype([c.dtype(key) for c in [*models, base]]).to_real() for key in keys}
    counts: dict[str, int] = {"": 0} if reduce is not None else {}
    for key, group in groups.items():
        size = entry_count(base.shape(key), base.dtype(key))
        counts[group] = counts.get(group, 0) + size
    if reduce is not None:  # the whole model's count, over every process's keys
        counts[""] = int(reduce(torch.tensor(counts[""], dtype=torch.int64, device="cpu")))
    ranks = {g: keep_rank(c, density) for g, c in counts.items() if keep_rank(c, density) >= 1}
    found: dict[str, list[float]] = {}
    if reduce is None:  # one pass for each group a sample brackets; float32 groups only
        members_of: dict[str, list[str]] = {}  # once: a search per group is quadratic in keys
        for key, group in groups.items():
            members_of.setdefault(group, []).append(key)
        for group, rank in ranks.items():
            members = members_of[group]
            if all(dtypes[key] != torch.float64 for key in members):
                window = _select_in_window(
                    models,
                    base,
                    keys=members,
                    rank=rank,
                    size=counts[group],
                    device=device,
                    chunk_bytes=chunk_bytes,
                    allow_nonfinite=allow_nonfinite,
                )
                if window is not None:
                    found[group] = window
    missed = {group: rank for group, rank in ranks.items() if group not in found}
    if missed:  # two radix passes (four for float64) over the keys of the other groups
        found |= _radix_select(
            models,
            base,
            groups={key: group for key, group in groups.items() if group in missed},
            ranks=missed,
            device=device,
            chunk_bytes=chunk_bytes,
            allow_nonfinite=allow_nonfinite,
            reduce=reduce,
        )
    limits = {}
    for key, group in every.items():
        limits[key] = [_at_least(v, dtypes[key]) for v in found.get(group, [0.0] * len(models))]
    return limits


def magnitude_thresholds(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    density: NumberLike = 0.2,
    trim: str = "global",
    device: str | torch.device | None = None,
    chunk_bytes: int = FOLD_CHUNK_BYTES,
) -> list[dict[str, float]]:
    """TIES trim thresholds, found by streaming passes: per model, per floating key.

    Model ``i`` keeps the entries of ``τᵢ = modelᵢ − base`` with ``|τᵢ| ≥ tᵢ``, ``tᵢ`` the
    ``(d − ⌊d·density⌋)``-th smallest magnitude (``torch.kthvalue``'s rank, 1-based), ``d`` the
    number of entries: of the whole model (``trim="global"``: every key gets the same
    threshold) or of each tensor (``trim="tensor"``). Where nothing is trimmed it is 0.0.
    Each key's threshold is given in the dtype its magnitudes are compared in (float32, or
    float64 for float64 tensors): the least value of it at or above ``tᵢ``, which keeps the
    same entries; so a model mixing float64 and float32 keys shows ``tᵢ`` for the first and
    ``tᵢ`` rounded up to float32 for the others.
    Found by a radix select over the magnitudes' bit patterns, never holding a whole tensor.

    Args:
        models: the fine-tuned models.
        base: the model they were fine-tuned from.
        density: the fraction of entries kept, in (0, 1].
        trim: ``"global"`` or ``"tensor"``, the scope of the ranking.
        device: where the arithmetic runs; default CUDA when available, else the CPU.
        chunk_bytes: largest piece of one tensor processed at a time, per model; default
            4 MiB, as :func:`ties` (the thresholds do not depend on it).

    Returns:
        One dict per model, mapping each floating key to its threshold.

    Example:
        >>> import torch
        >>> from ladle.methods.ties import magnitude_thresholds
        >>> base = {"w": torch.zeros(4)}
        >>> magnitude_thresholds([{"w": torch.tensor([0.5, -3.0, 1.0, 2.0])}], base, density=0.5)
        [{'w': 1.0}]
    """
    density = check_density(density)
    if trim not in TRIMS:
        raise ValueError(f"trim: expected one of {TRIMS}, found {trim!r}")
    check_inputs(models, base)
    with ExitStack() as stack:
        checkpoints, base_ckpt = open_models(models, base, stack)
        assert base_ckpt is not None
        check_compatible(checkpoints, base_ckpt)
        check_mergeable(checkpoints, base_ckpt)
        keys = [k for k in base_ckpt.keys() if is_merged_dtype(base_ckpt.dtype(k))]
        limits = _thresholds(
            checkpoints,
            base_ckpt,
            keys=keys,
            density=density,
            trim=trim,
            device=resolve_device(device),
            chunk_bytes=chunk_bytes,
            tied=tied_names([base_ckpt, *checkpoints]) if trim == "global" else None,
        )
    return [{key: limits[key][i] for key in keys} for i in range(len(checkpoints))]


# --- sign election and disjoint mean ---------------------------------------------------------


class SignElection:
    """Running sums for TIES's sign election and disjoint mean, one task vector at a time.

    Holds the positive and negative mass of each entry and two counts: four tensors of the
    chunk's size whatever the number of models, plus two buffers reused for every model
    (``tau``, for ``x − base``, and ``scratch``). ``Σᵢ τᵢ`` is the positive mass plus the
    negative mass. The counts are kept as ``Σᵢ sign(τᵢ)`` and ``Σᵢ sign(τᵢ)²`` (one sign and
    two additions per model, against two comparisons and two additions for the positive and
    negative counts themselves: about 5% of the election's time), exact integers from which
    the counts of positive and negative entries follow once every model is in. The six
    tensors, and the mask :meth:`ties` finds, come from ``buffers`` (seven :class:`Scratch`,
    reused from chunk to chunk: fresh memory costs page faults, and a fresh mask per chunk
    between the small tie records kept to the end grew the heap of a long merge by tens of
    MiB), or are new when it is ``None``.

    Example (the third entry's election is a tie, ``3 − 3 = 0``, which the majority breaks):
        >>> import torch
        >>> election = SignElection("w", slice(None), base=torch.zeros(3))
        >>> for tau in (torch.tensor([1.0, -2.0, 3.0]), torch.tensor([3.0, 3.0, -3.0])):
        ...     _ = election.add(tau)
        >>> [count.tolist() for count in election.counts()]  # positive, negative
        [[2.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
        >>> election.vote()  # Σ γ: two positive elections, one tie
        tensor(2.)
        >>> election.merged(majority=-1.0)  # disjoint means: (1 + 3)/2, 3/1, then −3/1
        tensor([ 2.,  3., -3.])
    """

    def __init__(
        self, key: str, rows: slice, base: torch.Tensor, buffers: Sequence[Scratch] | None = None
    ) -> None:
        self.key, self.rows, self.base = key, rows, base
        given = list(buffers) if buffers is not None else [None] * 7
        tensors = [
            torch.empty_like(base) if b is None else b.take(base.shape, base.dtype, base.device)
            for b in given[:6]
        ]
        self._masks = given[6] if len(given) > 6 else None
        # signs: Σᵢ sign(τᵢ), then the positive count; nonzero: Σᵢ sign(τᵢ)², then the negative
        self.tau, self.scratch, self.pos_sum, self.neg_sum, self._signs, self._nonzero = tensors
        self._empty = True
        self._total: torch.Tensor | None = None  # Σᵢ τᵢ, once every model is folded in
        self._counted: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, delta: torch.Tensor) -> SignElection:
        """Fold in one model's ``delta`` (which may be ``self.tau``, not ``self.scratch``)."""
        if self._empty:
            self._empty = False
            torch.clamp(delta, min=0, out=self.pos_sum)
            torch.clamp(delta, max=0, out=self.neg_sum)
            torch.abs(torch.sign(delta, out=self._signs), out=self._nonzero)
            return self
        # out= into one scratch buffer: fresh large temporaries cost more than the arithmetic.
        scratch = self.scratch
        self.pos_sum.add_(torch.clamp(delta, min=0, out=scratch))
        self.neg_sum.add_(torch.clamp(delta, max=0, out=scratch))
        signs = torch.sign(delta, out=scratch)  # 0 for NaN (torch on the CPU): both masses are NaN
        self._signs.add_(signs)
        self._nonzero.addcmul_(signs, signs)
        return self

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The number of models whose ``τᵢ`` is positive, and negative, per entry (floats
        holding integers), found in place of the sums of signs once every model is in."""
        if self._counted is None:
            negative = self._nonzero.sub_(self._signs).mul_(0.5)  # exact: integers < 2²⁴
            self._counted = self._signs.add_(negative), negative
        return self._counted

    def _mass(self) -> torch.Tensor:
        """``Σᵢ τᵢ``, added once, into ``tau`` (free once every model is folded in)."""
        if self._total is None:
            self._total = torch.add(self.pos_sum, self.neg_sum, out=self.tau)
        return self._total

    def vote(self) -> torch.Tensor:
        """``Σ sign(γ)`` over the entries: positive minus negative elected signs (a 0-d float
        tensor holding an integer). Before ``merged``."""
        # Signs as ±1.0/0.0 floats (a float sign is several times faster than two bool
        # comparisons), summed exactly.
        signs = torch.sign(self._mass(), out=self.scratch)
        return signs.nansum(dtype=_exact_count_dtype(signs.numel()))

    def ties(self) -> torch.Tensor:
        """Flat indices, within the chunk, of the entries whose sign election is a tie
        (``Σᵢ τᵢ = 0`` while some ``τᵢ ≠ 0``): those the majority decides. Before ``merged``."""
        # A float mask (in scratch): zero mass times a positive count of positive values;
        # float comparisons are several times faster than bool ones.
        tied = torch.eq(self._mass(), 0, out=self.scratch).mul_(self.counts()[0]).flatten()
        masks = self._masks
        mask = None if masks is None else masks.take(tied.shape, torch.bool, tied.device)
        return _flat_nonzero(torch.ne(tied, 0, out=mask))

    def tie_values(self, index: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``base + scale·mean`` at flat ``index`` for a positive, then a negative majority:
        bit for bit what ``scale_(merged(±1), scale).add_(base)`` gives there. Before
        ``merged``."""

        def mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
            return total.flatten()[index].div_(count.flatten()[index].clamp_(min=1))

        base, (pos_count, neg_count) = self.base.flatten()[index], self.counts()
        up = scale_(mean(self.pos_sum, pos_count), scale).add_(base)
        down = scale_(mean(self.neg_sum, neg_count), scale).add_(base)
        return up, down

    def merged(self, majority: float | None) -> torch.Tensor:
        """The disjoint mean: per entry, the mean of the ``τᵢ`` whose sign is the elected one.

        ``γ = sign(Σᵢ τᵢ)``; where ``γ = 0``, ``majority`` (or, for ``None``, the sign of this
        chunk's vote); where that is 0 too, the entry is 0. Consumes the state.
        """
        if majority is None:
            majority = float(torch.sign(self.vote()))
        mass = self._mass()
        pos_count, neg_count = self.counts()
        positive = self.pos_sum.div_(pos_count.clamp_(min=1))
        negative = self.neg_sum.div_(neg_count.clamp_(min=1))
        # Elected signs as 1.0/0.0 masks in the count buffers (now free): multiplying by a
        # float mask is many times faster than masked_fill_ with a bool one.
        up = (torch.ge if majority > 0 else torch.gt)(mass, 0, out=pos_count)
        down = (torch.le if majority < 0 else torch.lt)(mass, 0, out=neg_count)
        return positive.mul_(up).add_(negative.mul_(down))


def election_kernel(delta: Delta, finish: Callable[[SignElection], torch.Tensor]) -> Kernel:
    """Fold ``δᵢ = delta(modelᵢ − base)`` into a :class:`SignElection`, then ``finish`` it.

    Example (a sign election without trimming, ties broken up, as :func:`elected` does):
        >>> import torch
        >>> from ladle.engine import merge
        >>> def keep(key, rows, index, tau, scratch): return tau  # no trimming
        >>> models = [{"w": torch.tensor([1.0, -2.0, 3.0])}, {"w": torch.tensor([3.0, 3.0, -3.0])}]
        >>> kernel = election_kernel(keep, elected({"w": 1.0}, scale=1.0))
        >>> merge(models, kernel, base={"w": torch.zeros(3)}, method="elect", parameters={})
        {'w': tensor([2., 3., 3.])}
    """

    buffers = [Scratch() for _ in range(7)]  # the engine copies a result before the next init

    def init(key: str, rows: slice, base: torch.Tensor | None) -> SignElection:
        assert base is not None  # task-vector methods always merge against a base
        return SignElection(key, rows, base, buffers)

    def update(state: SignElection, index: int, x: torch.Tensor) -> SignElection:
        tau = torch.sub(x, state.base, out=state.tau)
        return state.add(delta(state.key, state.rows, index, tau, state.scratch))

    return Kernel(init, update, finish)


def majority_votes(
    models: Sequence[Checkpoint],
    base: Checkpoint,
    delta: Delta,
    *,
    keys: Sequence[str],
    per_tensor: bool,
    device: torch.device,
    chunk_bytes: int,
    allow_nonfinite: bool = False,
    reduce: Reduce | None = None,
    uncounted: Collection[str] = (),
) -> dict[str, float]:
    """The paper code's sign for ``γ = 0``: ``sign(Σ sign(γ))`` over all entries of ``keys``
    (one value for every key), or over each key's entries with ``per_tensor``; a pass.

    ``reduce`` (not with ``per_tensor``): ``keys`` are this process's share of a merge split
    across processes; the vote is summed over the processes with it. ``uncounted`` (not
    with ``per_tensor``): keys whose entries do not vote (tied copies of another key's
    tensor), given the sign too.

    Example (``γ = (+, +, 0)``: a positive majority):
        >>> import torch, ladle
        >>> def keep(key, rows, index, tau, scratch): return tau  # no trimming
        >>> models = [ladle.open_checkpoint({"w": torch.tensor([1.0, -2.0, 3.0])}),
        ...           ladle.open_checkpoint({"w": torch.tensor([3.0, 3.0, -3.0])})]
        >>> base = ladle.open_checkpoint({"w": torch.zeros(3)})
        >>> majority_votes(models, base, keep, keys=["w"], per_tensor=False,
        ...                device=torch.device("cpu"), chunk_bytes=2**20)
        {'w': 1.0}
    """
    skipped = set(uncounted)
    counted = [key for key in keys if key not in skipped]
    votes = dict.fromkeys(counted, 0)
    kernel = election_kernel(delta, SignElection.vote)
    for key, _, vote in fold(
        models,
        kernel,
        base=base,
        keys=counted,
        device=device,
        chunk_bytes=chunk_bytes,
        allow_nonfinite=allow_nonfinite,
    ):
        votes[key] += int(vote)
    if per_tensor:
        return {key: float((v > 0) - (v < 0)) for key, v in votes.items()}
    total = sum(votes.values())
    if reduce is not None:
        total = int(reduce(torch.tensor(total, dtype=torch.int64, device="cpu")))
    return dict.fromkeys(keys, float((total > 0) - (total < 0)))


MergeAgain = Callable[
    [set[str], Mapping[str, int]], Iterator[tuple[str, torch.Tensor, torch.Tensor]]
]
"""Merges ``keys`` again given the majority sign of each scope: ``(key, index, values)``, the
flat indices of their tied entries and the merged values there."""

TIE_RECORD_LIMIT = 2**20
"""Most tied entries :func:`ties` remembers while merging; past it, keys are merged again."""


class _TiesLater:
    """The merge pass of TIES without a pass for the sign-tie majority first.

    The majority (the sign of ``Σ γ`` over a scope: the model, or a tensor) only decides the
    entries whose election is a tie, exact cancellations that are rare in real task vectors.
    So the merge pass gives ties the value for majority 0 (the base), counts the votes, and
    remembers each tie's two possible values; ``amend`` then yields the right ones. Should
    more than :data:`TIE_RECORD_LIMIT` ties turn up, the keys holding the rest are merged
    again once the majority is known, so memory stays bounded, and their ties alone are
    patched (bf16 task vectors, multiples of a few ulps, cancel exactly often: patching every
    entry of those keys made a merge of 4 models of 48 M entries 4 times slower).
    """

    def __init__(
        self,
        scopes: Mapping[str, str],
        scale: float,
        again: MergeAgain,
        uncounted: Collection[str] = (),
    ) -> None:
        self.scopes, self.scale, self.merge_again = scopes, scale, again
        self.uncounted = frozenset(uncounted)  # tied copies: decided by the vote, not in it
        self.votes = dict.fromkeys(scopes.values(), 0)
        self.found: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.remembered = 0
        self.redo: set[str] = set()

    def finish(self, state: SignElection) -> torch.Tensor:
        key = state.key
        if key not in self.uncounted:
            self.votes[self.scopes[key]] += int(state.vote())
        tied = state.ties() if key not in self.redo else torch.empty(0, device="cpu")
        if tied.numel() and self.remembered + tied.numel() > TIE_RECORD_LIMIT:
            self.redo.add(key)
        elif tied.numel():
            up, down = state.tie_values(tied, self.scale)
            start = (state.rows.start or 0) * math.prod(state.base.shape[1:])
            self.found.append((key, tied.add_(start), up, down))
            self.remembered += tied.numel()
        return scale_(state.merged(0.0), self.scale).add_(state.base)

    def amend(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        majority = {scope: (v > 0) - (v < 0) for scope, v in self.votes.items()}
        for key, index, up, down in self.found:
            sign = majority[self.scopes[key]]
            if key not in self.redo and sign:
                yield key, index, up if sign > 0 else down
        if self.redo:
            yield from self.merge_again(self.redo, majority)


def elected(majority: Mapping[str, float], scale: float) -> Callable[[SignElection], torch.Tensor]:
    """Finish a chunk: ``base + scale·disjoint mean``, ties broken by ``majority[key]`` (keys
    absent from it: by the chunk's own vote, a whole tensor's when it is one chunk).

    Example:
        >>> import torch
        >>> election = SignElection("w", slice(None), base=torch.ones(2))
        >>> _ = election.add(torch.tensor([2.0, -4.0]))
        >>> elected({"w": 1.0}, scale=0.5)(election)  # 1 + 0.5·τ
        tensor([ 2., -1.])
    """

    def finish(state: SignElection) -> torch.Tensor:
        return scale_(state.merged(majority.get(state.key)), scale).add_(state.base)

    return finish


def elect_later(
    models: Sequence[Checkpoint],
    base: Checkpoint,
    delta: Delta,
    *,
    scopes: Mapping[str, str],
    scale: float,
    device: torch.device,
    chunk_bytes: int,
    uncounted: Collection[str] = (),
) -> Kernel:
    """The merge kernel of a sign election whose tie-breaking majority is found while merging.

    ``scopes`` maps each key whose ties the majority of a scope decides to that scope (``""``
    for one vote over all of them, the key itself for a vote per tensor); other keys break
    ties with their chunk's own vote. The kernel's ``amend`` patches the ties afterwards
    (:class:`_TiesLater`), so no pass over the checkpoints is spent on the vote.

    Example (the third entry is a tie; the vote over ``scopes``' one scope ``""`` is +2):
        >>> import torch, ladle
        >>> def keep(key, rows, index, tau, scratch): return tau  # no trimming
        >>> models = [ladle.open_checkpoint({"w": torch.tensor([1.0, -2.0, 3.0])}),
        ...           ladle.open_checkpoint({"w": torch.tensor([3.0, 3.0, -3.0])})]
        >>> base, cpu = ladle.open_checkpoint({"w": torch.zeros(3)}), torch.device("cpu")
        >>> kernel = elect_later(models, base, keep, scopes={"w": ""}, scale=1.0, device=cpu,
        ...                      chunk_bytes=2**20)
        >>> ladle.engine.merge(models, kernel, base=base, method="elect", parameters={})
        {'w': tensor([2., 3., 3.])}
    """

    def again(
        keys: set[str], signs: Mapping[str, int]
    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        majority = {key: float(signs[scopes[key]]) for key in keys}
        merge_chunk = elected(majority, scale)
        tied: list[torch.Tensor] = []  # each chunk's, found before its state is consumed

        def finish(state: SignElection) -> torch.Tensor:
            tied.append(state.ties())
            return merge_chunk(state)

        for key, rows, merged in fold(
            models,
            election_kernel(delta, finish),
            base=base,
            keys=[key for key in scopes if key in keys],
            device=device,
            chunk_bytes=chunk_bytes,
            allow_nonfinite=True,  # checked by the first pass over these keys
        ):
            index, real = tied.pop(0), real_view(merged)  # a complex key's: of its real view
            values = real.flatten()[index].to("cpu")
            start = (rows.start or 0) * math.prod(real.shape[1:])
            yield key, index.to("cpu").add_(start), values

    later = _TiesLater(scopes, scale, again, uncounted)
    in_pass = elected({}, scale)

    def finish(state: SignElection) -> torch.Tensor:
        return (later.finish if state.key in scopes else in_pass)(state)

    return election_kernel(delta, finish)._replace(amend=later.amend)


def majority_election(
    models: Sequence[Checkpoint],
    base: Checkpoint,
    delta: Delta,
    *,
    keys: Sequence[str],
    per_tensor: bool,
    scale: float,
    device: torch.device,
    chunk_bytes: int,
    allow_nonfinite: bool,
    split: bool,
    reduce: Reduce | None = None,
    uncounted: Collection[str] = (),
) -> Kernel:
    """The merge kernel of a sign election in which the ties of ``keys`` break by the paper
    code's majority, over all of them or (``per_tensor``) over each; the entries of
    ``uncounted`` keys (tied copies of another key's tensor) follow it without voting.

    In one process the majority is found while merging and the ties patched afterwards
    (:func:`elect_later`). In a merge ``split`` across processes, whose shards are committed
    as it goes, a vote pass (:func:`majority_votes`, summed over the processes with
    ``reduce``) runs first. Both give the same numbers.

    Example:
        >>> import torch, ladle
        >>> def keep(key, rows, index, tau, scratch): return tau  # no trimming
        >>> models = [ladle.open_checkpoint({"w": torch.tensor([1.0, -2.0, 3.0])}),
        ...           ladle.open_checkpoint({"w": torch.tensor([3.0, 3.0, -3.0])})]
        >>> base, cpu = ladle.open_checkpoint({"w": torch.zeros(3)}), torch.device("cpu")
        >>> for split in (False, True):
        ...     kernel = majority_election(models, base, keep, keys=["w"], per_tensor=False,
        ...         scale=1.0, device=cpu, chunk_bytes=2**20, allow_nonfinite=False, split=split)
        ...     print(ladle.engine.merge(models, kernel, base=base, method="e", parameters={}))
        {'w': tensor([2., 3., 3.])}
        {'w': tensor([2., 3., 3.])}
    """
    if not split:
        return elect_later(
            models,
            base,
            delta,
            scopes={key: key if per_tensor else "" for key in keys},
            scale=scale,
            device=device,
            chunk_bytes=chunk_bytes,
            uncounted=uncounted,
        )
    majority = majority_votes(
        models,
        base,
        delta,
        keys=keys,
        per_tensor=per_tensor,
        device=device,
        chunk_bytes=chunk_bytes,
        allow_nonfinite=allow_nonfinite,
        reduce=reduce,
        uncounted=uncounted,
    )
    return election_kernel(delta, elected(majority, scale))


def _kth_magnitude(tau: torch.Tensor, rank: int, scratch: torch.Tensor) -> float:
    """The ``rank``-th smallest ``|tau|`` of an in-memory tensor, as ``torch.kthvalue`` finds
    it (:func:`_kth_patterns` over the magnitudes' bit patterns)."""
    magnitude = torch.abs(tau, out=scratch).flatten()
    bits = magnitude.view(torch.int64 if magnitude.dtype == torch.float64 else torch.int32)
    (pattern,) = _kth_patterns(bits, [rank])
    return _as_float(pattern, magnitude.dtype)


def _kth_patterns(
    bits: torch.Tensor, ranks: Sequence[int], *, sort_below: int = _BINS
) -> list[int]:
    """The ``ranks``-th smallest (1-based) of a flat tensor of magnitudes' bit patterns
    (int32 or int64 with the sign bit clear, which order like the numbers they spell).

    Up to ``sort_below`` patterns are sorted (a radix sort of integers, a few times faster
    than ``torch.kthvalue`` on floats). Past it a histogram of the top 16 bits picks each
    rank's bucket and a sort finishes inside it: 0.25 ms for two ranks of 2¹⁷ patterns
    against 1.0 ms for sorting them all.
    """
    if bits.numel() <= sort_below:
        ordered = bits.sort().values
        return [int(ordered[rank - 1]) for rank in ranks]
    top = bits >> (8 * bits.element_size() - _DIGIT)
    cumulative = torch.bincount(top, minlength=_BINS).cumsum(0)
    found = []
    for rank in ranks:
        digit = int(torch.searchsorted(cumulative, rank))
        below = int(cumulative[digit - 1]) if digit else 0
        bucket = bits.index_select(0, _flat_nonzero(top == digit))
        found.append(int(bucket.sort().values[rank - below - 1]))
    return found


def _below32(value: float) -> float:
    """The largest float32 number below ``value`` (a positive float32 number)."""
    as_float = torch.tensor(value, dtype=torch.float32, device="cpu")
    return torch.nextafter(as_float, torch.zeros_like(as_float)).item()


def _trimmer(limits: Mapping[str, list[float]], density: float) -> Delta:
    """Zero the entries of ``τᵢ`` below its threshold (in place); keys without one are whole
    tensors, trimmed within themselves here (finding what the streaming select would)."""

    def trim(
        key: str, rows: slice, index: int, tau: torch.Tensor, scratch: torch.Tensor
    ) -> torch.Tensor:
        found = limits.get(key)
        if found is not None:
            limit = found[index]
        else:
            rank = keep_rank(tau.numel(), density)
            limit = _kth_magnitude(tau, rank, scratch) if rank >= 1 else 0.0
        if limit <= 0:  # nothing to trim (every |τ| ≥ 0)
            return tau
        # |τ| ≥ limit is |τ| > the next number of τ's dtype below limit: one hardshrink.
        below = math.nextafter(limit, 0.0) if tau.dtype == torch.float64 else _below32(limit)
        return torch.hardshrink(tau, below, out=tau)

    return trim


@overload
def ties(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    density: NumberLike = ...,
    scale: NumberLike = ...,
    trim: str = ...,
    out: None = ...,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    chunk_bytes: int | None = ...,
    allow_nonfinite: bool = ...,
) -> StateDict: ...


@overload
def ties(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    density: NumberLike = ...,
    scale: NumberLike = ...,
    trim: str = ...,
    out: str | os.PathLike,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    chunk_bytes: int | None = ...,
    allow_nonfinite: bool = ...,
) -> Path: ...


def ties(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    density: NumberLike = 0.2,
    scale: NumberLike = 1.0,
    trim: str = "global",
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Progress = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    chunk_bytes: int | None = None,
    allow_nonfinite: bool = False,
) -> StateDict | Path:
    """TIES-Merging: trim each task vector, elect a sign per entry, average the agreeing ones.

    With ``τᵢ = θᵢ − θ_base``: (1) trim: keep the entries of ``τᵢ`` with ``|τᵢ| ≥`` its
    ``(d − ⌊d·density⌋)``-th smallest magnitude, ``d`` the number of entries of the whole model
    (``trim="global"``, as the paper's code) or of each tensor (``trim="tensor"``, as mergekit
    and PEFT), zero the rest; (2) elect ``γ = sign(Σᵢ τ̂ᵢ)``, and where ``γ = 0`` use the sign
    of ``Σ γ`` over the same scope as the trim (the paper code's "majority" rule); (3) disjoint
    mean: per entry, the mean of the ``τ̂ᵢ`` whose sign is ``γ`` (0 if none); (4)
    ``θ = θ_base + scale·merged``. Yadav et al., "TIES-Merging: Resolving interference when
    merging models", NeurIPS 2023.

    Streaming: the thresholds come from one pass over the checkpoints where a sample of the
    magnitudes brackets them, else from two radix-select passes (float32), so memory stays a
    few chunks (``chunk_bytes``) per model whatever the model's size; the majority sign,
    known only at the end of the merge pass, is patched into the few sign-tied entries
    afterwards. ``trim="tensor"`` needs a threshold pass only for tensors larger than one
    chunk of the merging pass.

    Args:
        models: the fine-tuned models (mappings, modules, paths or checkpoints).
        base: the model they were fine-tuned from; task vectors are ``model − base``.
        density: the fraction of each task vector's entries kept, in (0, 1].
        scale: the factor λ applied to the merged task vector.
        trim: ``"global"`` (rank over all floating entries of the model) or ``"tensor"``
            (rank within each tensor); the scope of the sign-tie majority follows it.
        out: ``None`` to return a state dict on the CPU; a ``.safetensors`` path or a directory
            to stream the result to disk and return its path.
        device: where the arithmetic runs; default CUDA when available, else the CPU.
        dtype: output dtype of floating tensors; default that of the base.
        progress: ``True`` for tqdm bars over bytes read ("preparing" for the thresholds'
            passes, then "merging"), or a tqdm-like class.
        max_shard_size: largest shard of a directory output.
        overwrite: replace an earlier output at ``out`` (atomically) instead of refusing.
        chunk_bytes: largest piece of one tensor processed at a time, per model; default
            4 MiB for the threshold passes (``FOLD_CHUNK_BYTES``; on 12 fp32 models of
            89 MiB about as fast as 64 MiB, with 65 MiB of extra memory instead of 245 MiB
            for ``trim="tensor"``) and, on the CPU, 1 MiB for the merging pass
            (:data:`MERGE_CHUNK_BYTES`, about 10% faster in all); given, it is both.
        allow_nonfinite: merge inputs holding NaN or Inf, and keep merged values that
            overflow the output dtype, instead of raising NonFiniteError.

    Returns:
        The merged state dict, or the path written.

    Example:
        >>> import torch, ladle
        >>> base = {"w": torch.ones(4)}
        >>> taus = [[1.0, -2.0, 0.5, 3.0], [-1.5, 1.0, 2.0, -0.5], [-2.5, 0.25, 4.0, -1.0]]
        >>> models = [{"w": base["w"] + torch.tensor(t)} for t in taus]
        >>> ladle.ties(models, base, density=0.5, scale=0.5)
        {'w': tensor([0.0000, 0.0000, 2.5000, 2.5000])}
    """
    density = check_density(density)
    scale = check_scale(scale)
    if trim not in TRIMS:
        raise ValueError(f"trim: expected one of {TRIMS}, found {trim!r}")
    check_inputs(models, base)
    target = resolve_device(device)
    statistics = FOLD_CHUNK_BYTES if chunk_bytes is None else check_chunk_bytes(chunk_bytes)
    on_cpu = target.type == "cpu"  # an accelerator's copies and kernels favour large chunks
    chunk_bytes = MERGE_CHUNK_BYTES if chunk_bytes is None and on_cpu else statistics

    def prepare(checkpoints: list[Checkpoint], base_ckpt: Checkpoint | None) -> Kernel:
        assert base_ckpt is not None
        part = current_partition()  # a merge split across processes: this one's keys
        own = base_ckpt.keys() if part is None else part.keys(base_ckpt)
        reduce = part.all_reduce if part is not None and trim == "global" else None
        floating = [k for k in own if is_merged_dtype(base_ckpt.dtype(k))]
        if trim == "global":
            streamed = floating
        else:  # tensors of one merging chunk are trimmed and voted on inside the merge kernel
            streamed = [k for k in floating if len(row_chunks(base_ckpt.shape(k), chunk_bytes)) > 1]
        # A tied tensor (a module's or torch file's head naming the embedding) counts once in
        # the model-wide ranking and vote, as when it is stored once.
        tied = tied_names([base_ckpt, *checkpoints]) if trim == "global" else {}
        limits = _thresholds(
            checkpoints,
            base_ckpt,
            keys=streamed,
            density=density,
            trim=trim,
            device=target,
            chunk_bytes=statistics,
            allow_nonfinite=allow_nonfinite,
            reduce=reduce,
            tied=tied,
        )
        return majority_election(
            checkpoints,
            base_ckpt,
            _trimmer(limits, density),
            keys=streamed,
            per_tensor=trim == "tensor",
            scale=scale,
            device=target,
            chunk_bytes=chunk_bytes,
            allow_nonfinite=allow_nonfinite,
            split=part is not None,
            reduce=reduce,
            uncounted=tied,
        )

    return merge(
        models,
        election_kernel(_trimmer({}, density), SignElection.vote),  # replaced by prepare
        base=base,
        method="ties",
        parameters={"density": density, "scale": scale, "trim": trim},
        out=out,
        device=target,
        dtype=dtype,
        progress=progress,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        allow_nonfinite=allow_nonfinite,
        # A global trim below density 1 runs a threshold pass over every floating key first,
        # which checks them for NaN and Inf; the merge pass need not check again.
        inputs_checked=trim == "global" and density < 1.0,
        prepare=prepare,
    )
