"""The streaming loop: keys -> fetch (device) -> kernel -> sink.

A merge method supplies a :class:`Kernel`: its per-chunk math, folded over the models one
tensor at a time, as an optax transformation is folded over steps. The engine owns everything
else: opening sources, checking that they agree, the order of keys, cutting huge tensors into
chunks of rows, placing them on the device in the compute dtype, progress, and handing results
to a sink (an in-memory dict or the safetensors writer).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import contextvars
import errno
import json
import math
import numbers
import operator
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, Protocol, TypeGuard, TypeVar, Union

import numpy as np
import torch
from numpy.typing import NDArray

from ._version import __version__
from .checkpoint import (
    Checkpoint,
    StateDict,
    StateDictLike,
    check_source,
    declared_quantization,
    first_names,
    is_adapter,
    open_checkpoint,
    recorded_name,
    refuse_past_room,
    second_names,
    stored_quantization,
    tied_names,
)
from .errors import (
    CheckpointError,
    IncompatibleError,
    LadleError,
    NonFiniteError,
    OutputError,
    check_flag,
    one_line,
    type_name,
)
from .hub import PREFIX as HUB_PREFIX
from .modelcard import output_files
from .writer import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsWriter,
    Spec,
    _rows_of,
    aligned_order,
    check_amendment,
    check_output_free,
    check_output_name,
    check_storable,
    parse_size,
    single_file,
    stale_leftovers,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FOLD_CHUNK_BYTES",
    "Kernel",
    "NumberLike",
    "NumbersLike",
    "Partition",
    "Progress",
    "Scratch",
    "current_partition",
    "fold",
    "merge",
    "open_models",
    "partitioned",
]

T = TypeVar("T")

ALLOW_NONFINITE = "allow_nonfinite=True (--allow-nonfinite)"
"""How errors about NaN and Inf say to go on anyway (a recipe's steps say it their way)."""

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Largest chunk of one tensor, per model, counted as float32 entries (64 MiB; a float64
chunk of as many entries takes twice that)."""

FOLD_CHUNK_BYTES = 4 * 2**20
"""Chunk size for methods whose passes are plain folds over the models (soups, task
arithmetic, Model Stock): small enough that accumulators stay in the CPU's cache while every
model's chunk is folded in. Measured against 64 MiB chunks on 12 fp32 models of 89 MiB:
uniform soup 0.44 s vs 0.64 s, Model Stock 2.1 s and 62 MiB vs 2.7 s and 600 MiB. TIES
uses it too; DARE keeps 64 MiB (its random numbers are drawn per block of 2²⁰ entries, the
blocks of a chunk on several threads). See docs/streaming.md, "Chunks of rows"."""

READERS = 4
"""Most threads that read inputs for an accelerator by default (:func:`reading_threads`): one
thread's copies out of the page cache ran at 17 GB/s here (2 threads: 27 GB/s), a third of
an H200's pinned host-to-device copies (about 50 GB/s)."""

MAPPED_BYTES_KEPT = 4 * 2**30
"""Inputs of at most this many bytes in all stay mapped for the whole merge, so that passes
after the first cost no page faults; larger inputs are released tensor by tensor as each pass
is done with them (:meth:`Checkpoint.release`), so the page tables (about 0.2% of the bytes
mapped: 3.4 GB for twelve 70B-parameter bf16 models) stay a few tensors' worth."""

Progress = Union[bool, Callable[..., Any], None]  # noqa: UP007 (a runtime alias on Python 3.10)
"""``True``: a tqdm bar over bytes; a tqdm-like class: your own; ``None``/``False``: none."""

NumberLike = Union[  # noqa: UP007 (a runtime alias on Python 3.10)
    float,
    torch.Tensor,
    np.floating[Any],
    np.integer[Any],
    NDArray[np.floating[Any] | np.integer[Any]],
]
"""A real number as the merge methods take it (``density``, ``scale``, ``factor``...): an
int or float, a numpy real scalar (``np.float32(0.5)``), or a 0-d tensor or array
(``torch.tensor(0.5)``, a metric's value). Checked at run time by :func:`check_number`: a
bool, or a tensor or array of any other shape, is a ``TypeError``."""

IntegerLike = Union[  # noqa: UP007 (a runtime alias on Python 3.10)
    int, torch.Tensor, np.integer[Any], NDArray[np.integer[Any]]
]
"""An integer as the merge methods take it (DARE's ``seed``): an int, a numpy integer, or a
0-d tensor or array holding one. Checked at run time (:func:`~ladle.methods.dare.check_seed`):
a number that is no integer is a ``ValueError``, a bool a ``TypeError``."""

NumbersLike = Union[  # noqa: UP007 (a runtime alias on Python 3.10)
    Sequence[NumberLike], torch.Tensor, NDArray[np.floating[Any] | np.integer[Any]]
]
"""Numbers as the merge methods take them (``weights``, ``scores``): a sequence of
:data:`NumberLike`, or a 1-d tensor or array (``torch.softmax(logits, 0)``,
``np.array([1, 3])``). Checked at run time by :func:`check_numbers`: a string, a lone number
or a 0-d tensor is a ``TypeError``, the wrong length a ``ValueError``."""


class Kernel(NamedTuple):
    """The per-chunk math of a merge method, folded over the models.

    For every chunk of rows of every floating or complex key the engine calls
    ``state = init(key, rows, base)``, then ``state = update(state, i, x_i)`` for each model
    ``i`` in order, then ``finalize(state)`` for the merged chunk. ``base`` and ``x_i`` arrive on
    the merge device in the compute dtype (float32, or float64 for float64 inputs); complex
    chunks as their real and imaginary parts (:func:`real_view`), so that every method
    merges a complex number as two real ones. ``base`` is ``None`` for methods without one.
    Inputs are borrowed: never modify them in place, and do not keep ``x_i`` past its
    ``update`` nor ``base`` past ``finalize`` (the engine reuses their memory for the next
    reads); accumulate into tensors the state owns. The engine writes or copies each result
    before the next ``init``, so a kernel may reuse its own buffers (see :class:`Scratch`):
    a kernel serves one merge at a time; merges running at once (in threads) each need their
    own, as the methods make one per call.

    ``propagates_nonfinite`` (see the field) lets the engine check results, not inputs, for
    NaN/Inf.

    ``amend``, optional, is called once after the last chunk of a :func:`merge`, for methods
    whose last statistic is known only then (TIES's sign for ties, a vote over every entry):
    it yields ``(key, index, values)``, flat indices into ``key``'s tensor and the merged
    values that replace what was produced there, already written or not.

    Example:
        >>> import torch
        >>> from ladle.engine import Kernel, merge
        >>> elementwise_max = Kernel(
        ...     init=lambda key, rows, base: None,
        ...     update=lambda state, i, x: x.clone() if state is None else torch.maximum(state, x),
        ...     finalize=lambda state: state,
        ... )
        >>> a = {"w": torch.tensor([1.0, 5.0]), "steps": torch.tensor(7)}
        >>> b = {"w": torch.tensor([4.0, 2.0]), "steps": torch.tensor(9)}
        >>> merge([a, b], elementwise_max, method="max", parameters={}, device="cpu")
        {'w': tensor([4., 5.]), 'steps': tensor(7)}
    """

    init: Callable[[str, slice, torch.Tensor | None], Any]
    update: Callable[[Any, int, torch.Tensor], Any]
    finalize: Callable[[Any], torch.Tensor]
    amend: Callable[[], Iterable[tuple[str, torch.Tensor, torch.Tensor]]] | None = None
    propagates_nonfinite: bool = False
    """Every input reaches the result through additions and multiplications alone (a weighted
    sum, a Gram matrix), so a NaN or Inf in any input leaves a NaN or Inf in the result
    (IEEE: ``0·Inf`` and ``0·NaN`` are NaN). On the CPU the engine then checks each result
    instead of each input, and only where a result is not finite looks for the input to
    blame."""


class Scratch:
    """One reusable buffer per dtype and device, handed out as views of the requested shape.

    Fresh large tensors cost page faults on every allocation; a kernel that owns a
    ``Scratch`` reuses the same memory for every chunk. A view is valid until the next
    ``take`` of the same dtype and device.

    Example:
        >>> import torch
        >>> scratch, cpu = Scratch(), torch.device("cpu")
        >>> x = scratch.take((2, 3), torch.float32, cpu)
        >>> y = scratch.take((6,), torch.float32, cpu)  # the same memory, reshaped
        >>> tuple(y.shape), x.data_ptr() == y.data_ptr()
        ((6,), True)
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def take(
        self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((dtype, device))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[(dtype, device)] = buffer
        return buffer[:numel].view(shape)


class Sink(Protocol):
    """Where :func:`merge` writes: ``write(key, chunk)`` for each chunk of rows, key by key
    in the output's order (:func:`~ladle.writer.aligned_order`), then any ``amend``, inside
    ``with``."""

    def write(self, key: str, chunk: torch.Tensor) -> None: ...

    def amend(self, key: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the entries at flat ``index`` of ``key``'s tensor, after every write."""
        ...

    def __enter__(self) -> Any: ...

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any, /) -> Any: ...


class Partition(Protocol):
    """This process's share of a merge split across processes (see :mod:`ladle.distributed`).

    Inside :func:`partitioned`, the :func:`merge` to the split's output (``writes(out)``)
    merges only ``keys(reference)`` (``reference``: the base, else model 0) and hands them
    to ``writer``; any other merge in the block (in memory, or to another output: a method's
    own intermediate steps) runs whole, as without the split. Statistics passes in a method's
    ``prepare`` may run over the same keys alone, combining what spans keys (TIES's global
    threshold) with ``all_reduce``; a method that ignores the partition still gives the
    right result, gathering statistics over all keys.

    Example:
        >>> import tempfile, torch, ladle
        >>> from ladle.writer import SafetensorsWriter
        >>> class Whole:  # one process that merges every key: the merge as if unsplit
        ...     def writes(self, out): return out is not None
        ...     def keys(self, reference): return list(reference.keys())
        ...     def all_reduce(self, tensor): return tensor
        ...     def writer(self, out, specs, *, keys, metadata, extra_files, max_shard_size):
        ...         return SafetensorsWriter(out, specs, metadata=metadata,
        ...                                  extra_files=extra_files, max_shard_size=max_shard_size)
        >>> models = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]
        >>> with partitioned(Whole()):
        ...     out = ladle.uniform_soup(models, out=tempfile.mkdtemp() + "/soup.safetensors")
        >>> ladle.load(out)["w"].tolist()
        [2.0, 3.0]
    """

    def writes(self, out: str | os.PathLike | None) -> bool:
        """Whether a merge to ``out`` is the one split (``None``, in memory: never)."""
        ...

    def keys(self, reference: Checkpoint) -> list[str]:
        """The keys of ``reference`` this process merges, in ``reference``'s order."""
        ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place; every process must call it alike."""
        ...

    def writer(
        self,
        out: Path,
        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        *,
        keys: Sequence[str],
        metadata: Mapping[str, str],
        extra_files: Mapping[str, bytes | str | os.PathLike] | None,
        max_shard_size: int | str,
    ) -> Sink:
        """A sink for this process's ``keys`` of the output ``out``, whose tensors are ``specs``."""
        ...


# A context variable rather than a parameter: the method functions (their signatures are the
# public contract) reach the engine only through merge(), and a split merge must pass through
# them unchanged. Set only by partitioned(), scoped to its block and to the calling thread.
_PARTITION: contextvars.ContextVar[Partition | None] = contextvars.ContextVar(
    "ladle_partition", default=None
)


@contextlib.contextmanager
def partitioned(partition: Partition) -> Iterator[Partition]:
    """Within the block, :func:`merge` (and methods that ask) work on ``partition``'s share.

    The block is scoped to the calling thread (a context variable); :mod:`ladle.distributed`
    uses it to split a method's merge across processes (see :class:`Partition`).

    Example:
        >>> class Everything:  # a Partition that keeps every key (see Partition's example)
        ...     def keys(self, reference): return list(reference.keys())
        >>> with partitioned(Everything()) as part:
        ...     current_partition() is part
        True
        >>> current_partition() is None
        True
    """
    token = _PARTITION.set(partition)
    try:
        yield partition
    finally:
        _PARTITION.reset(token)


def current_partition() -> Partition | None:
    """The partition set by the innermost :func:`partitioned` block, or ``None``.

    Example:
        >>> import ladle
        >>> current_partition() is None  # outside any block: merges run whole
        True
    """
    return _PARTITION.get()


class _Preparation:
    """The one "preparing" bar of a merge's ``prepare`` passes: made by the first pass that
    reads, each later pass (TIES with ``trim="tensor"`` makes one per large tensor) adding
    its bytes to its total, closed when ``prepare`` returns."""

    def __init__(self, progress: Any, bar: Any = None) -> None:
        self.progress = progress
        self.bar: Any = bar  # given: a bar of the merge's own, grown, closed by the merge

    def reading(self, total: int) -> Callable[[int], object]:
        """The bar's ``update``, for a pass reading ``total`` bytes more."""
        if self.bar is None:
            self.bar = _bar(self.progress, total, desc="preparing")
        elif hasattr(self.bar, "total"):  # tqdm's; a tqdm-like class may lack it
            self.bar.total += total
            getattr(self.bar, "refresh", lambda: None)()
        return self.bar.update

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Set by merge() while a method's ``prepare`` runs, when it shows progress: the passes that
# gather statistics (TIES's thresholds, Model Stock's angles) report to one "preparing" bar,
# instead of leaving a long first half of the merge without one.
_PREPARING: contextvars.ContextVar[_Preparation | None] = contextvars.ContextVar(
    "ladle_preparing", default=None
)


@contextlib.contextmanager
def _preparing(progress: Any) -> Iterator[None]:
    """Within the block, :func:`fold` calls without ``on_bytes`` report to a "preparing" bar
    of ``progress`` (none when it is false)."""
    progress = check_progress(progress)
    preparation = _Preparation(progress) if progress is not None else None
    token = _PREPARING.set(preparation)
    try:
        yield
    finally:
        _PREPARING.reset(token)
        if preparation is not None:
            preparation.close()


@contextlib.contextmanager
def _amending_on(bar: Any) -> Iterator[None]:
    """Within the block, :func:`fold` calls without ``on_bytes`` report to the merging
    ``bar``, its total grown by their bytes: a kernel's ``amend()`` that reads the inputs
    again (TIES past :data:`~ladle.methods.ties.TIE_RECORD_LIMIT` ties) was on no bar, which
    showed 100% for what could be half of the merge's time."""
    if bar is None:
        yield
        return
    token = _PREPARING.set(_Preparation(None, bar))
    try:
        yield
    finally:
        _PREPARING.reset(token)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means CUDA when available, else the CPU.

    A string torch does not know, ``meta`` (no data), or a CUDA device or other accelerator
    (``mps``, ``xpu``) this machine lacks is a ``ValueError`` naming it, before any work
    (torch would fail later, with a traceback of its own).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool):  # torch.device(True) is cuda:1
        raise TypeError("device: expected a torch device or its name, found bool")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError, OverflowError) as err:  # 10**400: ValueError
        index = device if isinstance(device, int) and isinstance(err, RuntimeError) else -1
        if index >= 0 and not torch.accelerator.is_available():  # a CPU build of torch
            raise ValueError(_no_accelerator(index)) from err
        raise ValueError(
            f"device: expected cpu, cuda, cuda:N or another torch device, found {device!r}"
        ) from err
    if resolved.type == "meta":
        raise ValueError(f"device: {device!r} holds no data; use cpu, cuda or another device")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 and isinstance(device, int):  # a CUDA build of torch, without a GPU
            raise ValueError(_no_accelerator(device))
        if count == 0:
            raise ValueError(f"device: {device!r}, but CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device: {device!r}, but this machine has {count} CUDA device(s)")
    elif resolved.type != "cpu":  # mps, xpu, ...: usable only if a tensor can live there
        try:
            torch.empty(1, device=resolved)
        except Exception as err:  # torch raises RuntimeError, AssertionError, ImportError...
            why = one_line(err)
            why = why if len(why) <= 160 else why[:157] + "..."  # torch may list every backend
            raise ValueError(
                f"device: {device!r} is not usable here ({type(err).__name__}: {why})"
            ) from err
    return resolved


def _no_accelerator(index: int) -> str:
    """What ``device=index`` (an int, which torch reads as an accelerator's index) is where
    this machine has none: the same words whether torch was built for CUDA or not."""
    return (
        f"device: {index!r} is accelerator {index} to torch, but this machine has no "
        "accelerator (CUDA is not available); use 'cpu'"
    )


DTYPE_NAMES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
"""Short names of output dtypes (the CLI's ``--dtype``), besides torch's own names."""


OUTPUT_DTYPES = (
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
)
"""Dtypes a merge may write: signed floating types that hold one value per element (not
the unsigned, scale-only ``float8_e8m0fnu``, which turned -2 into 2 and 0 into 5.9e-39, nor
packed ``float4_e2m1fn_x2``)."""


def output_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a merge writes a tensor stored as ``stored`` in: ``dtype`` for a floating
    tensor when one is given, else ``stored``."""
    return dtype if dtype is not None and stored.is_floating_point else stored


MERGE_REMEDY = "pass an output dtype (dtype=torch.float32, --dtype float32)"


def output_specs(
    checkpoint: Checkpoint, dtype: torch.dtype | None
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each key's shape and the dtype a merge writes it in (:func:`output_dtype`), in the
    checkpoint's order: the specs of an output whose tensors take ``checkpoint``'s."""
    return {
        key: (checkpoint.shape(key), output_dtype(checkpoint.dtype(key), dtype))
        for key in checkpoint.keys()
    }


def check_output_dtypes(
    checkpoint: Checkpoint,
    dtype: torch.dtype | None,
    *,
    remedy: str = MERGE_REMEDY,
    label: str | None = None,
) -> None:
    """A ``ValueError`` for a floating key of ``checkpoint`` that packs several values per
    element, or whose output dtype (:func:`output_dtype`) is none of :data:`OUTPUT_DTYPES`:
    merged values would be written in it wrongly (``float8_e8m0fnu`` holds no sign: -2
    became 2). ``remedy``: what the message advises for the latter; ``label``: how the
    message names the checkpoint (``model 0 (NAME)``; default its name)."""
    label = checkpoint.name if label is None else label
    check_unpacked(checkpoint, label)
    for key in checkpoint.keys():
        written = output_dtype(checkpoint.dtype(key), dtype)
        if written.is_floating_point and written not in OUTPUT_DTYPES:
            raise ValueError(
                f"{label}: key {key!r} is stored as "
                f"{str(written).removeprefix('torch.')}, in which results cannot be written "
                f"(unsigned, powers of two only); {remedy}"
            )


def check_unpacked(checkpoint: Checkpoint, label: str | None = None) -> None:
    """A ``ValueError`` for a key of ``checkpoint`` (named ``label``, default its name) stored
    in a dtype that packs several values per element (``float4_e2m1fn_x2``): torch computes
    nothing in it."""
    for key in checkpoint.keys():
        stored = checkpoint.dtype(key)
        if _kind(stored) == "packed":
            raise ValueError(
                f"{checkpoint.name if label is None else label}: key {key!r} is stored as "
                f"{str(stored).removeprefix('torch.')}, which packs several values per element: "
                "unpack it first"
            )


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """An output dtype as a floating ``torch.dtype``: given as one, by torch's name for it
    (``"bfloat16"``, ``"float8_e4m3fn"``) or by a short name (``"bf16"``, ``"fp16"``,
    ``"fp32"``, ``"fp64"``); ``None`` stays ``None``; anything else is a ``ValueError``.

    Example:
        >>> import torch
        >>> from ladle.engine import resolve_dtype
        >>> resolve_dtype("bf16"), resolve_dtype("float16"), resolve_dtype(torch.float64)
        (torch.bfloat16, torch.float16, torch.float64)
    """
    resolved: object = dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        resolved = DTYPE_NAMES.get(name, getattr(torch, name, None))
    if dtype is None:
        return None
    if resolved not in OUTPUT_DTYPES:
        raise ValueError(
            f"dtype: expected a signed floating output dtype (torch.bfloat16, or a name such "
            f"as 'bf16', 'float16', 'float8_e4m3fn'), found {dtype!r}"
        )
    assert isinstance(resolved, torch.dtype)
    return resolved


_FLOAT32 = torch.finfo(torch.float32)


def beyond_float32(value: float | complex) -> bool:
    """Whether float32 would round ``value`` (a part of it) to fewer than its 24 bits: a
    finite nonzero magnitude below its smallest normal or above its largest value.

    Example:
        >>> beyond_float32(1e-44), beyond_float32(0.5), beyond_float32(0.0)
        (True, False, False)
    """
    parts = (value.real, value.imag) if isinstance(value, complex) else (value,)
    return any(
        part != 0
        and math.isfinite(part)
        and not (_FLOAT32.smallest_normal <= abs(part) <= _FLOAT32.max)
        for part in parts
    )


def scale_(values: torch.Tensor, factor: float) -> torch.Tensor:
    """``values`` multiplied by ``factor``, in place. A float32 tensor times a factor float32
    cannot hold (:func:`beyond_float32`: ``1e-44``, which float32 keeps as a subnormal of
    four bits, 2 % off) is multiplied in float64, then rounded back.

    Example:
        >>> x = torch.tensor([3e38])
        >>> scale_(x.clone(), 1e-44).item(), x.mul_(1e-44).item()  # 3e-6 exactly rounded
        (3.000000106112566e-06, 2.9427267236314947e-06)
    """
    if values.dtype == torch.float32 and beyond_float32(factor):
        return values.copy_(values.double().mul_(factor))
    return values.mul_(factor)


def scaled(x: torch.Tensor, factor: float, out: torch.Tensor) -> torch.Tensor:
    """``factor·x`` into ``out`` (a buffer of ``x``'s shape and dtype): ``torch.mul``, or
    for float32 and a factor float32 cannot hold (:func:`beyond_float32`: torch refuses one
    past its range, and rounds ``1e-44`` to a subnormal of four bits) :func:`scale_`'s
    float64 product, rounded once.

    Example:
        >>> scaled(torch.tensor([3e38]), 1e-44, torch.empty(1)).item()  # 3e-6, not 2.94e-6
        3.000000106112566e-06
    """
    if out.dtype == torch.float32 and beyond_float32(factor):
        return scale_(out.copy_(x), factor)
    return torch.mul(x, factor, out=out)


def add_scaled_(acc: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """``acc += factor·x`` in place (``add_`` with ``alpha``), or for a float32 ``acc`` and a
    factor float32 cannot hold (see :func:`scaled`), the product and the sum in float64,
    rounded once.

    Example:
        >>> add_scaled_(torch.zeros(1), torch.tensor([1e-30]), 1e39).item()  # torch: overflow
        1000000000.0
    """
    if acc.dtype == torch.float32 and beyond_float32(factor):
        return acc.copy_(x.double().mul_(factor).add_(acc))
    return acc.add_(x, alpha=factor)


def compute_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """float64 when any input is float64, else float32; for complex inputs complex128 when
    any is complex128, else complex64.

    Example:
        >>> import torch
        >>> compute_dtype([torch.bfloat16, torch.float16]), compute_dtype([torch.complex32])
        (torch.float32, torch.complex64)
    """
    if any(dtype.is_complex for dtype in dtypes):
        return torch.complex128 if torch.complex128 in dtypes else torch.complex64
    return torch.float64 if torch.float64 in dtypes else torch.float32


def is_merged_dtype(dtype: torch.dtype) -> bool:
    """Whether merges compute on tensors of ``dtype``: floating and complex ones (the latter
    as pairs of real numbers, :func:`real_view`); integer and boolean ones are copied.

    Example:
        >>> import torch
        >>> [is_merged_dtype(d) for d in (torch.bfloat16, torch.complex64, torch.int64, torch.bool)]
        [True, True, False, False]
    """
    return dtype.is_floating_point or dtype.is_complex


def float64_home(device: torch.device) -> torch.device:
    """Where float64 statistics of work on ``device`` are kept: ``device`` itself, or the
    CPU for an accelerator without float64 (Apple's ``mps``), where a float64 tensor is
    torch's ``TypeError``. Model Stock's Gram matrix and ``diff``'s sums need float64.

    Example:
        >>> float64_home(torch.device("cpu"))
        device(type='cpu')
    """
    return device if _refusal(device, torch.float64) is None else torch.device("cpu")


def check_device_dtypes(device: torch.device, needs: Iterable[tuple[torch.dtype, str]]) -> None:
    """A ``ValueError`` where ``device`` cannot hold a dtype of ``needs`` (pairs of a dtype
    and a key that needs it; the first key of each dtype is named), before any work: Apple's
    ``mps`` has no float64 (nor complex128, float8), and torch refused them mid-merge with a
    ``TypeError`` of its own. The CPU and CUDA hold every dtype ladle merges in: ``needs`` is
    not even iterated there.

    Example:
        >>> check_device_dtypes(torch.device("cpu"), [(torch.float64, "w")])
    """
    if device.type in ("cpu", "cuda"):
        return
    asked: set[torch.dtype] = set()
    for dtype, key in needs:
        err = None if dtype in asked else _refusal(device, dtype)
        asked.add(dtype)
        if err is not None:
            raise ValueError(
                f"device: {str(device)!r} holds no {dtype} tensors, which {key!r} needs "
                f"({one_line(err)}); merge it on the CPU (device='cpu')"
            ) from err


def _refusal(device: torch.device, dtype: torch.dtype) -> Exception | None:
    """torch's error making a tensor of ``dtype`` on ``device``, or ``None`` where it can: the
    CPU and CUDA hold every dtype ladle merges in, and are not asked."""
    if device.type in ("cpu", "cuda"):
        return None
    try:
        torch.empty(0, dtype=dtype, device=device)
    except (TypeError, RuntimeError) as err:
        return err
    return None


def real_view(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts (:func:`torch.view_as_real`: a last
    dimension of 2, the same memory, but for a lazy conjugate's); any other tensor as it is.
    Kernels see complex tensors so: every method merges a complex number as two real ones.

    Example:
        >>> import torch
        >>> real_view(torch.tensor([1 + 2j])).tolist(), real_view(torch.ones(1)).tolist()
        ([[1.0, 2.0]], [1.0])
    """
    if not tensor.is_complex():
        return tensor
    # A lazy conjugate (x.conj(), a state dict's own) has no real view: its values are made.
    return torch.view_as_real(tensor.resolve_conj().resolve_neg())


def entry_count(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Real numbers in a tensor of ``shape`` and ``dtype``: two per complex entry.

    Example:
        >>> import torch
        >>> entry_count((3, 2), torch.float32), entry_count((3, 2), torch.complex64)
        (6, 12)
    """
    return math.prod(shape) * (2 if dtype.is_complex else 1)


def chunk_shape(shape: tuple[int, ...], chunk_bytes: int) -> tuple[int, ...]:
    """The shape a tensor of ``shape`` is read in, a chunk of rows at a time: its own where one
    row fits in ``chunk_bytes`` as float32, else its own with the leading dimensions merged
    until one does (fused experts ``(E, H, I)`` are read as ``(E·H, I)``, a ``(1, n)`` tensor
    as ``(n,)``), so that no chunk exceeds ``chunk_bytes`` by more than a row of that shape.
    Its rows are contiguous pieces of the stored rows."""
    view = tuple(shape)
    while len(view) > 1 and 4 * math.prod(view[1:]) > chunk_bytes:
        view = (view[0] * view[1], *view[2:])
    return view


def row_chunks(shape: tuple[int, ...], chunk_bytes: int) -> list[slice]:
    """Slices along dimension 0 of :func:`chunk_shape` ``(shape, chunk_bytes)`` whose float32
    size is at most ``chunk_bytes`` (at least one row); one, the whole tensor, for a tensor
    without entries (a ``(5, 0)`` tensor cut into rows gave chunks that a row view of the
    result, ``view(-1, 0)``, could not place)."""
    shape = chunk_shape(shape, chunk_bytes)
    if len(shape) == 0 or math.prod(shape) == 0:
        return [slice(None)]
    row_bytes = 4 * math.prod(shape[1:])
    rows = max(1, chunk_bytes // max(row_bytes, 1))
    if rows >= shape[0]:
        return [slice(None)]
    return [slice(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]


def _describe(index: int | None, checkpoint: Checkpoint) -> str:
    return f"base ({checkpoint.name})" if index is None else f"model {index} ({checkpoint.name})"


def _few(keys: Sequence[str], shown: int = 3) -> str:
    """How many ``keys`` there are, and the first ``shown`` of them.

    Example:
        >>> _few(["a", "b", "c", "d"])
        "4 ('a', 'b', 'c', ...)"
    """
    first = ", ".join(repr(key) for key in keys[:shown])
    return f"{len(keys)} ({first}{', ...' if len(keys) > shown else ''})"


_WRAPPERS = {  # prefixes that wrappers add to a module's keys, and how to unwrap it
    "_orig_mod.": "torch.compile's: pass model._orig_mod",
    "module.": "DistributedDataParallel's: pass model.module",
}


def _prefix_hint(missing: Sequence[str], extra: Sequence[str]) -> str:
    """Where one side's keys are the other's with a prefix (torch.compile's ``_orig_mod.``,
    DDP's ``module.``), a hint that says so and how to unwrap it; else ``""``.

    Example:
        >>> _prefix_hint(["w", "b"], ["_orig_mod.w", "_orig_mod.b"])
        "; the keys differ by the prefix '_orig_mod.' (torch.compile's: pass model._orig_mod, or strip it)"
        >>> _prefix_hint(["enc.w"], ["w"]), _prefix_hint(["w"], ["v"])
        ("; the keys differ by the prefix 'enc.' (strip it)", '')
    """  # noqa: E501
    for short, long in ((missing, extra), (extra, missing)):
        if not short or len(long) < len(short):
            continue
        first = short[0]
        prefix = next((k[: -len(first)] for k in long if k.endswith(first) and k != first), "")
        if prefix and set(long) >= {prefix + key for key in short}:
            how = f"{_WRAPPERS[prefix]}, or strip it" if prefix in _WRAPPERS else "strip it"
            return f"; the keys differ by the prefix {prefix!r} ({how})"
    return ""


def _tied_hint(
    missing: Sequence[str], aliases: Mapping[str, str], present: set[str], where: str
) -> str:
    """Where every key in ``missing`` is, in the checkpoint ``where``, a second name of a
    tensor (``aliases``: tied weights) whose first name is ``present``, a hint that says so;
    else ``""``.

    Example:
        >>> _tied_hint(["head"], {"head": "emb"}, {"emb", "body"}, "base")
        "; in base, 'head' names the tensor of 'emb' (tied weights), which the other inputs store once: give every input in one form (all safetensors, or all modules, state dicts or torch files)"
    """  # noqa: E501
    if not missing or any(aliases.get(key) not in present for key in missing):
        return ""
    pairs = ", ".join(f"{key!r} names the tensor of {aliases[key]!r}" for key in missing[:3])
    more = ", ..." if len(missing) > 3 else ""
    return (
        f"; in {where}, {pairs}{more} (tied weights), which the other inputs store once: give "
        "every input in one form (all safetensors, or all modules, state dicts or torch files)"
    )


def check_mergeable(
    models: Sequence[Checkpoint],
    base: Checkpoint | None = None,
    *,
    names: Sequence[str] | None = None,
) -> None:
    """A :class:`CheckpointError` for an input whose tensors are no weights to merge
    entry by entry, though their keys and shapes agree. Base first, then the models; with
    ``names`` (one per model, no base), each model is called so (the arithmetic functions
    name their arguments).

    - A model directory whose ``config.json`` declares its weights quantized
      (:func:`~ladle.checkpoint.declared_quantization`: GPTQ, AWQ, bitsandbytes, FP8 with
      scales, ...): its tensors are codes and scales, copied (integers) and averaged
      (floats) apart; the result would load, and be wrong.
    - Tensors that show quantized weights where no config declares them
      (:func:`~ladle.checkpoint.stored_quantization`: ``qweight``, bitsandbytes' ``SCB``,
      float8 weights beside their scales, ...): a weights file under another name, a state
      dict or module in memory.
    - A PEFT adapter directory (:func:`~ladle.checkpoint.is_adapter`): the mean of LoRA
      factors ``B`` and ``A`` taken apart is not the mean of the updates ``B·A``, and the
      output would be no adapter (no ``adapter_config.json``).

    Example:
        >>> import json, pathlib, tempfile, torch, ladle
        >>> folder = ladle.save({"w": torch.ones(2)}, pathlib.Path(tempfile.mkdtemp()) / "q")
        >>> config = {"quantization_config": {"quant_method": "awq"}}
        >>> _ = (folder / "config.json").write_text(json.dumps(config))
        >>> check_mergeable([ladle.open_checkpoint(folder)])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ladle.errors.CheckpointError: model 0 (...): its config.json ... (quant_method 'awq'): ...
    """
    for index, checkpoint in _labelled(models, base):
        described = _describe(index, checkpoint) if names is None else names[index or 0]
        method = declared_quantization(checkpoint)
        if method is not None:
            raise CheckpointError(
                f"{described}: its config.json declares its weights "
                f"quantized (quant_method {method!r}): merging their codes and scales would "
                "merge no weights; dequantize it to a floating dtype first"
            )
        stored = stored_quantization(checkpoint)
        if stored is not None:
            raise CheckpointError(
                f"{described}: holds quantized weights, {stored}: merging "
                "their codes and scales would merge no weights; dequantize it to a floating "
                "dtype first"
            )
        if is_adapter(checkpoint):
            raise CheckpointError(
                f"{described}: a PEFT adapter (adapter_config.json): its "
                "LoRA factors merged apart would not merge its weight updates (a mean of B·A "
                "is not the mean of B times the mean of A), and the output would be no "
                "adapter; merge each adapter into its base model first (peft: "
                "merge_and_unload), then merge those models"
            )


def check_compatible(
    models: Sequence[Checkpoint], base: Checkpoint | None = None, *, named: bool = False
) -> None:
    """Raise :class:`IncompatibleError` unless all checkpoints share keys, shapes and dtype kinds.

    The reference is the base, or model 0 when there is none (a ``base`` that is one of
    ``models`` is that model); messages name the model and the reference (their files), the
    keys (a few, and how many) or the key and both shapes. Key sets are compared first, for
    every model, then shapes and dtypes. Where the reference alone differs from models that
    all agree (a wrong base), the message blames the reference. With ``named``, checkpoints
    are called by their names alone (for arguments of the arithmetic functions).
    """
    reference = base if base is not None else models[0]
    own = next((i for i, m in enumerate(models) if m is reference), None)  # a model's index
    others = [(i, m) for i, m in enumerate(models) if m is not reference]

    def label(index: int | None, checkpoint: Checkpoint) -> str:
        return checkpoint.name if named else _describe(index, checkpoint)

    ref_label = label(own, reference)
    every = "every model" if own is None else "every other model"
    hint = "; is it the model they were fine-tuned from?" if own is None else ""

    def odd_reference(of: Callable[[Checkpoint], object]) -> bool:
        """Whether the models other than the reference (two or more) agree on ``of``."""
        return len(others) >= 2 and len({repr(of(m)) for _, m in others}) == 1

    def listed(missing: list[str], extra: list[str]) -> str:
        parts = [f"missing {_few(missing)}"] if missing else []
        return "; ".join(parts + ([f"extra {_few(extra)}"] if extra else [])) + _prefix_hint(
            missing, extra
        )

    ref_keys = reference.keys()
    ref_set = set(ref_keys)
    for index, model in others:
        keys = model.keys()
        key_set = set(keys)
        missing = [key for key in ref_keys if key not in key_set]
        extra = [key for key in keys if key not in ref_set]
        if extra:  # another name of a tensor the reference has (a tied head): never read
            first = model.aliases()
            held = {first.get(key, key) for key in keys if key in ref_set}
            extra = [key for key in extra if first.get(key, key) not in held]
        if not (missing or extra):
            continue
        # Missing names of a tensor the reference holds under another name too (tied
        # weights) would be asked of the model, which stores it once: say so.
        tied = _tied_hint(missing, reference.aliases(), key_set, ref_label) if not extra else ""
        if odd_reference(lambda m: sorted(m.keys())):  # the reference lacks or adds them
            wrapped = _prefix_hint(missing, extra) or tied  # not a wrong model
            raise IncompatibleError(
                f"{ref_label}: keys differ from those of {every}: {listed(extra, missing)}"
                + tied
                + ("" if wrapped else hint)
            )
        raise IncompatibleError(
            f"{label(index, model)}: keys differ from {ref_label}: {listed(missing, extra)}" + tied
        )
    for index, model in others:  # every model has the reference's keys now
        for key in ref_keys:
            shape, ref_shape = model.shape(key), reference.shape(key)
            if shape != ref_shape:
                if odd_reference(partial(_shape_of, key=key)):
                    raise IncompatibleError(
                        f"{ref_label}: key {key!r} has shape {ref_shape}, {every} has {shape}"
                        + hint
                    )
                raise IncompatibleError(
                    f"{label(index, model)}: key {key!r} has shape {shape}, "
                    f"{ref_label} has {ref_shape}"
                )
            dtype, ref_dtype = model.dtype(key), reference.dtype(key)
            if _kind(dtype) != _kind(ref_dtype):
                if odd_reference(partial(_kind_of, key=key)):
                    theirs = (
                        dtype
                        if odd_reference(partial(_dtype_of, key=key))
                        else f"a {_kind(dtype)} dtype"
                    )
                    raise IncompatibleError(
                        f"{ref_label}: key {key!r} has dtype {ref_dtype}, {every} has {theirs}; "
                        f"{_kind(ref_dtype)} and {_kind(dtype)} tensors cannot be merged{hint}"
                    )
                raise IncompatibleError(
                    f"{label(index, model)}: key {key!r} has dtype {dtype}, {ref_label} has "
                    f"{ref_dtype}; {_kind(ref_dtype)} and {_kind(dtype)} tensors cannot be merged"
                )


def _shape_of(checkpoint: Checkpoint, key: str) -> tuple[int, ...]:
    return checkpoint.shape(key)


def _dtype_of(checkpoint: Checkpoint, key: str) -> torch.dtype:
    return checkpoint.dtype(key)


def _kind_of(checkpoint: Checkpoint, key: str) -> str:
    return _kind(checkpoint.dtype(key))


def is_packed(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` packs several floats per element (``float4_e2m1fn_x2``): floating to
    torch, but with no arithmetic of its own."""
    return dtype.is_floating_point and str(dtype).endswith("_x2")


def _kind(dtype: torch.dtype) -> str:
    """``"floating"``, ``"packed"`` (several floats per element: ``float4_e2m1fn_x2``),
    ``"complex"`` or ``"integer"`` (bool included): dtypes of one kind merge."""
    if dtype.is_floating_point:
        return "packed" if is_packed(dtype) else "floating"
    return "complex" if dtype.is_complex else "integer"


def check_models(models: Sequence[StateDictLike]) -> None:
    """A ``TypeError`` for one model given where a sequence of them is expected (a path, a
    mapping or a module: iterating it would read its keys or characters as models) or for
    something without a length (a generator: the weights and indices count models) or order
    (a set: weights, scores and the indices a greedy soup selects follow the models' order,
    which a set of paths changes from run to run with ``PYTHONHASHSEED``), a ``ValueError``
    for none.

    Example:
        >>> check_models(iter([{}]))
        Traceback (most recent call last):
        TypeError: models: expected a sequence of models (a list or tuple), found list_iterator
    """
    if isinstance(models, (str, os.PathLike, Mapping, torch.nn.Module)):
        raise TypeError("models: expected a sequence of models, found a single model")
    of_numbers = (bytes, bytearray, torch.Tensor, np.ndarray)  # sequences, but of numbers
    if isinstance(models, (*of_numbers, AbstractSet)) or not hasattr(models, "__len__"):
        raise TypeError(
            f"models: expected a sequence of models (a list or tuple), found {type_name(models)}"
        )
    if len(models) == 0:
        raise ValueError("models: expected at least one model, found none")


def check_number(name: str, value: object) -> float:
    """``value`` as a float: a real number (int, float, numpy's real scalars) or a 0-d tensor
    or array; anything else (a bool, a string, a complex number, ``None``, a tensor or array
    that is not 0-d) is a ``TypeError`` naming parameter ``name``, where ``float()`` raised
    its own ("could not convert string to float: 'x'") or read ``True`` as 1.

    Example:
        >>> check_number("scale", torch.tensor(0.5)), check_number("scale", 2)
        (0.5, 2.0)
        >>> check_number("density", "0.5")
        Traceback (most recent call last):
        TypeError: density: expected a number, found str
        >>> check_number("scale", True)
        Traceback (most recent call last):
        TypeError: scale: expected a number, found bool
    """
    value = unwrap_scalar(name, value)
    if not is_real(value):
        raise TypeError(f"{name}: expected a number, found {type_name(value)}")
    return real_float(name, value)


def is_real(value: object) -> TypeGuard[numbers.Real]:
    """Whether ``value`` is a real number as ladle's parameters take one: an int, a float,
    numpy's real scalars; not a bool, nor numpy's ``timedelta64`` (a duration, which
    Python's number classes count as an integer: ``scale=np.timedelta64(1, "s")`` meant 1).

    Example:
        >>> import numpy as np
        >>> is_real(2), is_real(np.float32(0.5)), is_real(True), is_real(np.timedelta64(1, "s"))
        (True, True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.timedelta64))


def real_float(name: str, value: numbers.Real) -> float:
    """``float(value)``, or a ``ValueError`` naming parameter ``name`` for a number beyond
    float's range (an int of 400 digits), where ``float()`` raised a bare ``OverflowError``.

    Example:
        >>> real_float("scale", 10**400)
        Traceback (most recent call last):
        ValueError: scale: expected a number within float's range, found one beyond it
    """
    try:
        return float(value)
    except OverflowError:
        problem = "expected a number within float's range, found one beyond it"
        raise ValueError(f"{name}: {problem}") from None


def unwrap_scalar(name: str, value: object) -> object:
    """``value``, or the Python number a 0-d tensor or array holds; a tensor or array of
    any other shape is a ``TypeError`` naming parameter ``name``. For the checks of numbers
    (:func:`check_number`, the arithmetic's scalars) to judge what is left: a bool tensor
    leaves a ``bool``, which they refuse.

    Example:
        >>> unwrap_scalar("t", torch.tensor(0.5)), unwrap_scalar("t", "x")
        (0.5, 'x')
    """
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, numbers.Number):
        if tuple(shape) != ():
            kind = "a tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{name}: expected a number, found {kind} of shape {tuple(shape)}")
        if isinstance(value, torch.Tensor) and value.is_meta:  # .item(): torch's RuntimeError
            raise TypeError(f"{name}: expected a number, found a tensor on the meta device")
        return value.item()  # type: ignore[attr-defined]  # a 0-d tensor or array
    return value


def check_chunk_bytes(chunk_bytes: object) -> int:
    """``chunk_bytes`` as a positive int, or a ``TypeError`` (no integer: a string, a float,
    a bool) or ``ValueError`` (zero or negative) naming it.

    Example:
        >>> check_chunk_bytes(2**20)
        1048576
        >>> check_chunk_bytes(0)
        Traceback (most recent call last):
        ValueError: chunk_bytes: expected a positive number of bytes, found 0
    """
    value = unwrap_scalar("chunk_bytes", chunk_bytes)  # a bool tensor leaves a bool
    if isinstance(value, bool):
        raise TypeError("chunk_bytes: expected an int (bytes), found bool")
    try:
        size = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"chunk_bytes: expected an int (bytes), found {type_name(chunk_bytes)}"
        ) from None
    if size < 1:
        raise ValueError(f"chunk_bytes: expected a positive number of bytes, found {size}")
    return size


def check_sequence(name: str, values: object) -> list[object]:
    """The items of ``values`` as a list, or a ``TypeError`` naming parameter ``name`` for what
    is no sequence (or tensor, or array) of numbers: a string or bytes, a number, ``None``, a
    0-d tensor or array, a mapping or a set (whose iteration gives keys, or no order), an
    iterator (read once: a second check would see none).

    Example:
        >>> check_sequence("weights", (1, 0.5))
        [1, 0.5]
        >>> check_sequence("weights", {0: 1.0, 1: 0.5})
        Traceback (most recent call last):
        TypeError: weights: expected a sequence of numbers, found dict
    """
    shape = getattr(values, "shape", None)  # a tensor or array, iterated along its first axis
    if (
        isinstance(values, (str, bytes))
        or not (isinstance(values, Sequence) or shape is not None)
        or not isinstance(values, Iterable)
        or shape == ()  # a 0-d tensor or array: iterating it fails
    ):
        raise TypeError(f"{name}: expected a sequence of numbers, found {type_name(values)}")
    return list(values)


def check_numbers(name: str, values: object, count: int, each: str) -> list[float]:
    """``values`` as ``count`` floats (:func:`check_number` each, named ``name[i]``), or a
    ``TypeError`` for what is no sequence of numbers (a string, a number, a 0-d tensor), a
    ``ValueError`` for the wrong length; ``each`` says what one value is for ("weights (one
    per model)").

    Example:
        >>> check_numbers("weights", [1, 0.5], 2, "weights (one per model)")
        [1.0, 0.5]
        >>> check_numbers("weights", [1], 2, "weights (one per model)")
        Traceback (most recent call last):
        ValueError: weights: expected 2 weights (one per model), found 1
    """
    given = check_sequence(name, values)
    checked = [check_number(f"{name}[{i}]", value) for i, value in enumerate(given)]
    if len(checked) != count:
        raise ValueError(f"{name}: expected {count} {each}, found {len(checked)}")
    return checked


def open_models(
    models: Sequence[StateDictLike], base: StateDictLike | None, stack: ExitStack
) -> tuple[list[Checkpoint], Checkpoint | None]:
    """Open every source, closing on ``stack`` those that this call opened. Where ``stack``
    closes on an exception, ladle's frames in its traceback then forget their variables
    (:func:`_forget_views`).

    Example:
        >>> import contextlib, torch
        >>> with contextlib.ExitStack() as stack:
        ...     models, base = open_models([{"w": torch.ones(2)}], {"w": torch.zeros(2)}, stack)
        ...     print(models[0].keys(), base.shape("w"))
        ['w'] (2,)
    """
    check_models(models)
    for index, source in enumerate(models):
        check_source(f"model {index}", source)
    if base is not None:
        check_source("base", base)
    stack.push(_forget_views)  # first in: runs once the inputs are closed
    hub: dict[str, Checkpoint] = {}  # an hf:// URL given twice: one commit, fetched once

    def opened(source: StateDictLike, which: str) -> Checkpoint:
        if isinstance(source, str) and source in hub:
            return hub[source]
        try:
            checkpoint = open_checkpoint(source)
        except CheckpointError as err:  # "<state dict>: tensor 'w' is on the meta device"
            if isinstance(source, (Mapping, torch.nn.Module)):  # which of the models?
                name, _, problem = str(err).partition(": ")
                raise CheckpointError(f"{which} ({name}): {problem}") from None
            raise
        if checkpoint is not source:
            stack.callback(checkpoint.close)
        if isinstance(source, str) and source.startswith(HUB_PREFIX):
            hub[source] = checkpoint
        return checkpoint

    opened_models = [opened(m, f"model {i}") for i, m in enumerate(models)]
    opened_base = None if base is None else opened(base, "base")
    # Tied weights the reference (the base, or model 0) names twice and a model stores once
    # (a module's head and embedding beside save_pretrained's safetensors): read by either.
    reference = opened_base if opened_base is not None else opened_models[0]
    tied = reference.aliases()
    if tied:
        opened_models = [m if m is reference else second_names(m, tied) for m in opened_models]
    return opened_models, opened_base


def _forget_views(_: object, error: BaseException | None, __: object) -> None:
    """Clear the variables of ladle's frames that ``error``'s traceback (and its causes')
    keeps: chunks they held are views of the inputs' memory maps, which kept every input
    mapped and its file open as long as the exception lived (a training loop keeping its
    last error, a notebook its last traceback). The frames still say where it failed.
    Frames still running (the caller's) are left as they are."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        trace = error.__traceback__
        while trace is not None:
            if str(trace.tb_frame.f_globals.get("__name__")).partition(".")[0] == "ladle":
                with contextlib.suppress(RuntimeError):  # "cannot clear an executing frame"
                    trace.tb_frame.clear()
            trace = trace.tb_next
        error = error.__cause__ or error.__context__


def check_progress(progress: Any) -> Any:
    """``progress`` as ``True``, ``None`` (no bar: also for ``False``) or a tqdm-like class;
    anything else (0, [], a tensor: no truth value to take) a ``TypeError``, before a merge
    reads anything. numpy's bools count as bools.

    Example:
        >>> check_progress(False) is None, check_progress(np.bool_(True))
        (True, True)
    """
    if progress is None or isinstance(progress, (bool, np.bool_)):
        return True if progress else None
    if not callable(progress):
        found = type_name(progress)
        raise TypeError(f"progress: expected True, False, None or a tqdm-like class, found {found}")
    return progress


def _bar(progress: Any, total: int, desc: str = "merging", unit: str = "B") -> Any:
    """A progress bar of ``total`` ``unit`` (bytes: scaled by 1024): tqdm's for ``True``
    (disabled where there is no standard error to draw it on: ``sys.stderr`` is ``None``),
    ``progress`` itself called as tqdm is for a class; ``None`` for no bar."""
    progress = check_progress(progress)
    if progress is None:
        return None
    if progress is True:
        from tqdm.auto import tqdm

        # pythonw, some daemons: tqdm would write to None
        quiet = {"disable": True} if sys.stderr is None else {}
        progress = partial(tqdm, **quiet)
    scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return progress(total=total, unit=unit, desc=desc, **scaled)


def fold(
    models: Sequence[Checkpoint],
    kernel: Kernel,
    *,
    base: Checkpoint | None = None,
    keys: Sequence[str] | None = None,
    device: torch.device,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_bytes: Callable[[int], object] | None = None,
    copy_others: bool = False,
    allow_nonfinite: bool = False,
    prefetch: int | None = None,
    check_results: bool = True,
    readers: int | None = None,
    numbers: Sequence[int] | None = None,
) -> Generator[tuple[str, slice, torch.Tensor], None, None]:
    """Run ``kernel`` on each chunk of each floating or complex key; yield ``(key, rows, result)``.

    Keys come in the order of ``keys`` (default: the base's, or model 0's), each a chunk of
    rows of :func:`chunk_shape` at a time. Integer and boolean keys are skipped, or with
    ``copy_others`` yielded as copies of the base's (model 0's) tensor, in chunks of at most
    ``chunk_bytes`` as stored. The kernel sees complex chunks as real ones
    (:func:`real_view`); with ``copy_others`` (a fold that yields a model's tensors) their
    results come back complex, else as the kernel returns them. Methods call this directly
    for passes that gather statistics (a TIES threshold, Model Stock's angles) before the
    pass that merges; ``on_bytes`` reports bytes read.

    With ``prefetch > 0``, ``readers`` background threads read (and check) up to
    ``prefetch`` chunks ahead of the arithmetic, each chunk one model's rows, into a fixed
    pool of ``prefetch + 2`` buffers, so reading overlaps computing and memory does not
    depend on the number of models; chunks reach the kernel in order whichever thread read
    them. The default, ``None``, prefetches none on the CPU, where torch's threads use every
    core (a reading thread made no method faster on 2 cores, with the inputs in the page
    cache or not: see docs/streaming.md), and on CUDA as many chunks as there are
    reading threads: one thread's copies out of the page cache are slower than a
    host-to-device copy. On other accelerators (``mps``, ``xpu``) it prefetches none: their
    copies are synchronous, and MPS aborts on work queued from several threads. ``readers``
    defaults to :func:`reading_threads` (1 on the CPU).
    Without reading threads, CPU chunks are views of the page cache
    (:meth:`Checkpoint.map_rows`), or converted from them into pooled buffers; with them,
    they are read with ``pread`` into pooled buffers (pinned for an accelerator), so that the
    readers do the copying from the page cache, and on the CPU torch computes on as many
    threads fewer meanwhile (:func:`_threads_beside_readers`). A model's chunk is valid until
    ``update`` returns, the base's until ``finalize`` returns. A result yielded is valid until
    the next is taken: kernels may reuse their buffers (ladle's own do), so copy
    (``result.clone()``) a result kept past that.
    An input holding NaN or Inf raises :class:`NonFiniteError` naming the model (by its
    position, or its number in ``numbers``) and key,
    unless ``allow_nonfinite``; with a kernel that ``propagates_nonfinite``, on the CPU, once
    the chunk's result shows it. ``check_results=False`` leaves that check of results to the
    caller (as :func:`merge` does, after the cast to the output dtype, with
    :func:`_check_merged`); the inputs such a result would show are then not checked here
    either.

    Example:
        >>> import torch
        >>> from ladle import open_checkpoint
        >>> squares = Kernel(  # Σᵢ ‖xᵢ‖² of each chunk
        ...     init=lambda key, rows, base: torch.zeros(()),
        ...     update=lambda total, i, x: total + (x * x).sum(),
        ...     finalize=lambda total: total,
        ... )
        >>> models = [open_checkpoint({"w": torch.tensor([1.0, 2.0])}),
        ...           open_checkpoint({"w": torch.tensor([3.0, 4.0])})]
        >>> [(key, rows, total.item()) for key, rows, total in
        ...  fold(models, squares, device=torch.device("cpu"))]
        [('w', slice(None, None, None), 30.0)]
    """
    chunk_bytes = check_chunk_bytes(chunk_bytes)
    reference = base if base is not None else models[0]
    sources = [*([base] if base is not None else []), *models]
    for source in sources:  # rewritten since the pass before (a trainer saving over it)?
        source.check_unchanged()
    plan = _plan(reference, sources, keys, chunk_bytes, copy_others)
    check_device_dtypes(device, ((dtype, key) for key, _, dtype, _ in plan if dtype is not None))
    threads = reading_threads(device) if readers is None else readers
    if threads < 1:
        raise ValueError(f"readers: expected a positive number of threads, found {threads}")
    if prefetch is None:
        prefetch = _default_prefetch(device, threads)
    depth = max(prefetch, 0)
    threads = min(threads, depth)
    pool = _Pool(_largest_read(plan, sources), count=depth + 2, device=device)
    transfers = Transfers(device)  # made here: the compute stream is this thread's
    mapped = device.type == "cpu" and depth == 0
    # Such a kernel's result shows a NaN/Inf input: one check per chunk instead of one per
    # input, on the CPU (on an accelerator the inputs' checks run beside the arithmetic, on
    # the copy stream, where a check of results would stall it for every chunk).
    on_results = kernel.propagates_nonfinite and not allow_nonfinite and device.type == "cpu"
    check_inputs = not allow_nonfinite and not on_results
    check_results = check_results and on_results
    reads = _prefetched(
        _reads(
            plan, models, base, reference, device, check_inputs, mapped, pool, transfers, numbers
        ),
        depth=depth,
        threads=threads,
    )

    def take() -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next chunk read, ready for the compute stream, and the buffer it holds."""
        chunk = next(reads)
        transfers.arrived(chunk.copied)
        return chunk.tensor, chunk.held

    sizes = {file: size for source in sources for file, size in source.file_sizes().items()}
    release = mapped and sum(sizes.values()) > MAPPED_BYTES_KEPT
    with ExitStack() as stack:
        preparation = _PREPARING.get()
        if on_bytes is None and preparation is not None:  # a pass of a merge's preparation
            total = sum(
                _rows_nbytes(s, key, rows, shape=view)
                for key, rows, _, view in plan
                for s in sources
            )
            on_bytes = preparation.reading(total)
        # Before the reading threads start: they take the count set here (none taken off
        # without them; a count owed to this thread is set all the same).
        stack.enter_context(_threads_beside_readers(device, threads if depth else 0))
        stack.callback(reads.close)
        result = x = base_rows = init_base = state = None  # chunks: views of the inputs' maps
        try:
            for step, (key, rows, dtype, view) in enumerate(plan):
                if dtype is None:  # an integer (or bool) key, copied from the reference
                    result, held = take()
                    pool.release(held)
                else:  # kernels see a complex chunk as its real and imaginary parts
                    base_rows, base_held = take() if base is not None else (None, None)
                    try:
                        init_base = None if base_rows is None else real_view(base_rows)
                        state = kernel.init(key, rows, init_base)
                        for index in range(len(models)):
                            x, held = take()
                            state = kernel.update(state, index, real_view(x))
                            pool.release(held)
                        result = kernel.finalize(state)
                        _check_result_kind(result, key, device)
                    except Exception as err:  # a kernel of one's own says nothing of where it was
                        _note_where(err, key, rows, view)
                        raise
                    pool.release(base_held)
                    if check_results:
                        _check_result(result, key, rows, models, base, view, numbers)
                    if dtype.is_complex and copy_others:  # a model's tensors: complex again
                        result = torch.view_as_complex(result.contiguous())
                if on_bytes is not None:
                    on_bytes(sum(_rows_nbytes(s, key, rows, shape=view) for s in sources))
                yield key, rows, result
                if release and (step + 1 == len(plan) or plan[step + 1][0] != key):
                    for source in sources:  # the pass is done with this tensor
                        source.release(key)
        finally:  # closed or failed: this frame may outlive the call (Python 3.10 keeps it in
            # a cycle with the GeneratorExit of a close until the next collection); its
            # chunks must not, else every input stays mapped and open until then
            result = x = base_rows = init_base = state = None


def _note_where(err: Exception, key: str, rows: slice, view: tuple[int, ...] | None = None) -> None:
    """Add to ``err``'s traceback (a note: Python 3.11 and later) the key and rows the fold was
    merging (of a tensor read as ``view``, leading dimensions merged: the entries of the
    flattened tensor, as the tensor has not those rows): an error raised in a kernel's
    ``init``, ``update`` or ``finalize`` named neither. Its message, and so the CLI's one
    line, stays as it was.

    Example:
        >>> err = ValueError("boom"); _note_where(err, "w", slice(0, 4))
        >>> getattr(err, "__notes__", ["ladle: while merging key 'w', rows 0–3"])  # 3.10: none
        ["ladle: while merging key 'w', rows 0–3"]
    """
    add_note = getattr(err, "add_note", None)
    if add_note is None:
        return
    if rows == slice(None):
        part = ""
    elif view is None:
        part = f", rows {rows.start}–{rows.stop - 1}"
    else:
        width = math.prod(view[1:])
        part = f", (flat) entries {rows.start * width}–{rows.stop * width - 1}"
    add_note(f"ladle: while merging key {key!r}{part}")


def _noted_amend(kernel: Kernel) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``kernel.amend()``'s amendments (none without one); an exception raised in it gets a
    note (Python 3.11 and later) naming ``amend`` and the key it yielded last."""
    if kernel.amend is None:
        return
    last = None
    try:
        for amendment in kernel.amend():
            last = amendment[0]
            yield amendment  # the caller's errors stay its own: none is thrown in here
    except Exception as err:
        add_note = getattr(err, "add_note", None)
        if add_note is not None:
            after = "" if last is None else f", after key {last!r}"
            add_note(f"ladle: in the kernel's amend(), once every chunk was merged{after}")
        raise


def _check_result_kind(result: object, key: str, device: torch.device) -> None:
    """A ``LadleError`` unless a kernel's ``finalize`` gave a tensor with data (not on
    ``meta``, unless the merge's ``device`` is): a ``finalize`` that forgot to return, or a
    result on ``meta``, failed later with torch's own words. A result on another device is
    copied where it goes, as torch copies.

    Example:
        >>> _check_result_kind(None, "w", torch.device("cpu"))
        Traceback (most recent call last):
        ladle.errors.LadleError: merge: the kernel's result of 'w' is None, not a tensor
    """
    if not isinstance(result, torch.Tensor):
        raise LadleError(
            f"merge: the kernel's result of {key!r} is {type_name(result)}, not a tensor"
        )
    if result.device.type == "meta" and device.type != "meta":  # no data to write
        raise LadleError(
            f"merge: the kernel's result of {key!r} is on {result.device}, the merge runs on "
            f"{device}"
        )


def _default_prefetch(device: torch.device, readers: int) -> int:
    """Chunks a fold reads ahead by default: one per reading thread on CUDA; none on the CPU
    (see :func:`fold`), nor on other accelerators, whose copies are synchronous (a reading
    thread gains nothing) and where MPS aborts the process on work queued from several
    threads at once (found by a static review; not run on such a device).

    Example:
        >>> [_default_prefetch(torch.device(kind), 3) for kind in ("cuda", "cpu", "mps")]
        [3, 0, 0]
    """
    return readers if device.type == "cuda" else 0


def reading_threads(device: torch.device) -> int:
    """Threads that read a fold's inputs for ``device`` by default: 1 on the CPU; for an
    accelerator, up to :data:`READERS`, leaving a core to the thread that computes."""
    if device.type == "cpu":
        return 1
    return max(1, min(READERS, (os.cpu_count() or 1) - 1))


class _Beside:
    """Threads that the merges running now asked torch to leave free
    (:func:`_threads_beside_readers`), torch's count before the first of them began, and a
    count owed to the thread whose count this is (set by it when it next begins a merge)."""

    def __init__(self) -> None:
        self.busy = 0
        self.before = 0
        self.owed: int | None = None
        self.left = 0  # the count last set on the thread itself: a changed one is the user's


_BESIDE_LOCK = threading.Lock()
_PER_THREAD: list[bool] = []  # found once: whether torch's count is each thread's own
_BESIDE: weakref.WeakKeyDictionary[threading.Thread, _Beside] = weakref.WeakKeyDictionary()
_PROCESS = _Beside()


def _per_thread() -> bool:
    """Whether torch's thread count is each thread's own (its OpenMP backend, as in torch's
    own builds), found once (twice at worst, alike: no lock, as callers hold theirs); else
    the native thread pool's, which all threads share."""
    if not _PER_THREAD:
        _PER_THREAD.append("parallel backend: OpenMP" in torch.__config__.parallel_info())
    return _PER_THREAD[0]


_SETTING = threading.Lock()  # one change of a thread's count at a time (see below)


def _in_a_thread(work: Callable[[], T]) -> T:
    """``work()`` run on a new thread, waited for."""
    done: list[T] = []
    thread = threading.Thread(target=lambda: done.append(work()), name="ladle-count")
    thread.start()
    thread.join()
    return done[0]


def set_own_threads(count: int) -> None:
    """Set torch's thread count of the calling thread alone.

    With torch's OpenMP backend, ``torch.set_num_threads`` sets the calling thread's count
    and also the one every thread takes when it first runs torch work: a merge lowering its
    own count left threads started meanwhile (a server's, a data loader's) on the lowered
    count for good, and one restoring its count on a worker thread undid what the user had
    set since. That second count is put back as it was, by a thread of its own (whose own
    count the setting changes, and which then ends). With the native backend the count is
    the process's: set as it is.

    Example:
        >>> before = torch.get_num_threads()
        >>> set_own_threads(1); torch.get_num_threads()
        1
        >>> set_own_threads(before)
    """
    if not _per_thread() or sys.is_finalizing():  # at exit no thread may start (3.11 hung
        torch.set_num_threads(count)  # in Thread.start), and no count matters any more
        return
    with _SETTING:
        others = _in_a_thread(torch.get_num_threads)  # what a thread starting now takes
        try:
            torch.set_num_threads(count)
        finally:
            if others != count:
                _in_a_thread(lambda: torch.set_num_threads(others))


def one_thread_here() -> None:
    """Give the calling thread, one of ladle's (reading, drawing), one torch thread where the
    count is each thread's own; the native backend's count, the process's, is left alone."""
    if _per_thread():
        set_own_threads(1)


def _beside() -> tuple[_Beside, threading.Thread | None]:
    """Where :func:`_threads_beside_readers` counts, and the thread whose count it is: each
    thread's own where torch's thread count is the thread's (its OpenMP backend, as in
    torch's own builds: ``set_num_threads`` sets the calling thread's count, and the one a
    thread takes when it first runs torch work), else one for the process (``None``: the
    native thread pool, whose count all threads share)."""
    if not _per_thread():
        return _PROCESS, None
    with _BESIDE_LOCK:
        thread = threading.current_thread()
        return _BESIDE.setdefault(thread, _Beside()), thread


@contextlib.contextmanager
def _threads_beside_readers(device: torch.device, readers: int) -> Iterator[None]:
    """On the CPU, torch's intra-op threads fewer by ``readers`` (at least one) while reading
    threads run: a thread per core, not a reader fighting a team of torch threads for a core
    (on 2 cores that fight made the soup 30% slower than computing on one thread). Merges
    overlapping in one count (the thread's, or the process's: see :func:`_beside`) each take
    their readers off the count it had before the first began, which comes back when the
    last ends, whatever the order they end in.

    A merge ended on another thread than its own (a :func:`fold` generator closed there)
    cannot set its thread's count, a thread's own: it leaves it owed, set when that thread
    next begins a merge (unless the thread's count changed since, the user's to keep, or a
    merge of its own ended there first, setting it), and leaves the closing thread's alone.
    """
    if device.type != "cpu":
        yield
        return
    state, owner = _beside()
    taken = 0  # readers counted in state.busy by this merge: what the finally gives back
    try:
        with _BESIDE_LOCK:
            if state.owed is not None:  # a merge of this thread ended elsewhere (or was cut
                if torch.get_num_threads() == state.left:  # short): its count is owed, unless
                    set_own_threads(state.owed)  # the user set another
                state.owed = None
            if readers:
                if state.busy == 0:
                    state.before = torch.get_num_threads()
                # No call between these two: Ctrl-C, raised only at calls, splits neither.
                taken = readers
                state.busy += readers
                state.left = max(1, state.before - state.busy)
                set_own_threads(state.left)
        yield
    finally:
        if taken:
            with _BESIDE_LOCK:
                count = max(1, state.before - (state.busy - taken))
                state.busy -= taken  # no call between these: the count is owed from here
                state.owed = count  # until set (Ctrl-C in what follows: the next merge sets it)
                if owner is None or owner is threading.current_thread():
                    set_own_threads(count)
                    state.left, state.owed = count, None  # set here: nothing owed any more


def _expanded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` repeats entries through a stride of 0 (``expand``, or a torch file
    of such a tensor): arithmetic on it differs, by a rounding, from that on a copy.

    Example:
        >>> _expanded(torch.ones(1).expand(3)), _expanded(torch.ones(3)), _expanded(torch.ones(1))
        (True, False, False)
    """
    return tensor.numel() > 1 and 0 in tensor.stride()


def _check_result(
    result: torch.Tensor,
    key: str,
    rows: slice,
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    shape: tuple[int, ...] | None,
    numbers: Sequence[int] | None = None,
) -> None:
    """For a kernel that propagates NaN/Inf: a non-finite result has a non-finite input (or
    overflowed); find and name the input (``rows`` of the key read as ``shape``; models by
    their ``numbers``, as :func:`fold`).

    A result that overflowed from finite inputs is not an input's fault and passes here (a
    statistic of a pass); :func:`merge` checks its outputs for overflow (:func:`_check_merged`).
    """
    total = torch.sum(result)
    if torch.isfinite(total) or bool(torch.isfinite(result).all()):
        return
    _blame_input(key, rows, models, base, shape, numbers)


def _blame_input(
    key: str,
    rows: slice,
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    shape: tuple[int, ...] | None,
    numbers: Sequence[int] | None = None,
) -> None:
    """Raise :class:`NonFiniteError` naming the first input (base first, then the models)
    whose rows ``rows`` of ``key`` (read as ``shape``) hold NaN or Inf; return if none does."""
    for index, checkpoint in _labelled(models, base, numbers):
        _check_finite(checkpoint.get_rows(key, rows, shape), index, checkpoint, key)


def _check_merged(
    chunk: torch.Tensor,
    key: str,
    rows: slice,
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    where: str,
) -> None:
    """A merged chunk, in the output dtype, checked for NaN and Inf with one reduction.

    Where it holds one, a non-finite input is named, as :func:`_check_result` does; with
    every input finite, the merge overflowed the output dtype (``6e4 + 6e4`` in float16) or
    the compute dtype, and :class:`NonFiniteError` says so: an Inf written into a model
    breaks it as surely as a NaN read from one.
    """
    if not is_merged_dtype(chunk.dtype):
        return
    if chunk.dtype == torch.complex32:  # torch sums no complex32: its parts, float16, instead
        chunk = real_view(chunk)
    # A sum in the chunk's own dtype is the cheap test (summing bfloat16 into float32 costs
    # a converted copy: 0.33 ms per 2²⁰ values against 0.04 ms, first calls included). Past
    # 65504 a float16 sum overflows on its own, so a float32 sum, which cannot, decides.
    size = chunk.dtype.itemsize
    if size > 1 and torch.isfinite(torch.sum(chunk)):
        return
    if size < 4 and torch.isfinite(torch.sum(chunk, dtype=torch.float32)):
        return
    finite = torch.isfinite(chunk if size > 1 else chunk.float())
    if bool(finite.all()):  # the sum overflowed, not the values
        return
    bad = finite.numel() - int(finite.sum())
    _refuse_nonfinite(chunk, bad, chunk.dtype, key, rows, models, base, where)


def _refuse_nonfinite(
    chunk: torch.Tensor,
    count: int,
    dtype: torch.dtype,
    key: str,
    rows: slice,
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    where: str,
) -> NoReturn:
    """Raise for ``count`` of ``chunk``'s merged values that are not finite in ``dtype``: the
    :class:`NonFiniteError` naming an input of these rows that holds NaN or Inf, else the
    one saying the merge overflowed."""
    shape = _read_as(base if base is not None else models[0], key, rows, chunk)
    _blame_input(key, rows, models, base, shape)
    nan = int(torch.isnan(chunk.float() if chunk.dtype.itemsize == 1 else chunk).sum())
    inputs = [c.dtype(key) for c in [*models, *([base] if base is not None else [])]]
    computed = compute_dtype(inputs).to_real()
    _overflowed(where, key, rows, count, chunk.numel(), dtype, shape, nan=nan, computed=computed)


def _read_as(
    reference: Checkpoint, key: str, rows: slice, chunk: torch.Tensor
) -> tuple[int, ...] | None:
    """The shape ``key`` was read as (:func:`chunk_shape`) for ``chunk``, its rows ``rows``;
    ``None`` for its own shape."""
    stored, rest = tuple(reference.shape(key)), tuple(chunk.shape[1:])
    if rows == slice(None) or rest == stored[1:]:
        return None
    return (math.prod(stored) // math.prod(rest), *rest)


def _overflowed(
    where: str,
    key: str,
    rows: slice,
    count: int,
    total: int,
    dtype: torch.dtype,
    shape: tuple[int, ...] | None,
    *,
    nan: int = 0,
    computed: torch.dtype = torch.float32,
) -> NoReturn:
    """Raise the :class:`NonFiniteError` of ``count`` of ``total`` merged values of ``key``
    (``rows`` of it read as ``shape``) that overflow ``dtype`` although every input is
    finite, ``nan`` of them NaN (said as such: a kernel's 0/0 was called an overflow).

    The merge computed in ``computed``: where ``dtype`` holds all it can (float64 output of
    a float32 merge), that is what overflowed, and float64 inputs are the remedy; where
    ``dtype`` has its range (bfloat16 beside float32), either did; a narrower output (float16,
    float8) overflowed in the cast, and a wider one is the remedy."""
    limit, most = torch.finfo(dtype).max, torch.finfo(computed).max
    if limit >= most:  # the cast cannot overflow
        dtype, limit = computed, most
    if limit * 2 < most:  # the dtype the merge computes in holds them: write that
        wide = str(computed).removeprefix("torch.")
        wider = f", or merge into a wider dtype (dtype=torch.{wide}, --dtype {wide})"
    elif computed != torch.float64:
        wider = ", or give the merge float64 inputs (it then computes in float64)"
    else:
        wider = ""
    in_compute = (  # the range of what it computes in: either may have overflowed
        f" or {str(computed).removeprefix('torch.')}, which the merge computes in,"
        if dtype != computed and limit * 2 >= most
        else ""
    )
    if rows.start is None or rows.stop is None:
        part = ""
    elif shape is None:
        part = f" in rows {rows.start}–{rows.stop - 1}"
    else:  # rows of a merged view: say which entries of the flattened tensor
        width = math.prod(shape[1:])
        part = f" in (flat) entries {rows.start * width}–{rows.stop * width - 1}"
    name = str(dtype).removeprefix("torch.")
    if nan and not _holds_infinity(dtype):  # float8_e4m3fn: torch 2.8 casts an overflow to NaN
        what = (
            f"are not finite ({nan} NaN) although every input is finite: they overflow {name} "
            f"(largest finite value {limit:g}), which holds no infinity, or the arithmetic "
            "made NaN (0/0)"
        )
    elif nan:
        what = (
            f"are not finite ({nan} NaN) although every input is finite: the arithmetic made "
            f"NaN (0/0, or an overflow of {name} followed by ∞ − ∞)"
        )
    else:
        what = (
            f"overflow {name} (largest finite value {limit:g}){in_compute} although every "
            "input is finite"
        )
    raise NonFiniteError(
        f"{where}: {count} of the {total} merged values of key {key!r}{part} {what}; lower "
        f"the scale or weights where the method has them{wider}; {ALLOW_NONFINITE} keeps "
        "them as they are"
    )


def cast(values: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` in ``dtype`` (into ``out``, given), each value rounded once to nearest even.

    torch casts float64 to float16, bfloat16 and the float8 dtypes through float32, rounding
    twice (``1 + 2⁻¹¹ + 2⁻⁴⁰`` became 1.0 in float16, not ``1 + 2⁻¹⁰``; complex128 to
    complex32 likewise, through complex64). Here such values
    go through float32 rounded to odd instead (toward zero, the last bit set where inexact),
    which keeps what the first rounding dropped: float32's 24 bits are more than two beyond
    any of those dtypes', so the second rounding is the only one. Other casts are torch's.

    Example:
        >>> x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
        >>> x.to(torch.float16).item(), cast(x, torch.float16).item()
        (1.0, 1.0009765625)
    """
    if values.dtype == torch.complex128 and dtype == torch.complex32:  # each part so
        parts = cast(torch.view_as_real(values.resolve_conj()), torch.float16)
        values = torch.view_as_complex(parts)
    if values.dtype == torch.float64 and dtype.is_floating_point and dtype.itemsize < 4:
        single = values.to(torch.float32)
        widened = single.double()
        toward_zero = torch.where(  # where float32's rounding went away from zero: one back
            widened.abs() > values.abs(), torch.nextafter(single, torch.zeros_like(single)), single
        )
        inexact = toward_zero.double() != values  # NaN too: its last bit set, a NaN still
        bits = toward_zero.view(torch.int32)
        values = torch.where(inexact, bits | 1, bits).view(torch.float32)
    if out is None:
        return values.to(dtype)
    return out.copy_(values)


def _holds_infinity(dtype: torch.dtype) -> bool:
    """Whether floating ``dtype`` has an infinity (float8_e4m3fn and the fnuz dtypes have
    none: an overflow saturates to the largest value, or becomes NaN, by torch's version).

    Example:
        >>> _holds_infinity(torch.float16), _holds_infinity(torch.float8_e4m3fn)
        (True, False)
    """
    return math.isinf(torch.tensor([math.inf], device="cpu").to(dtype).float().item())


def saturation_limit(dtype: torch.dtype) -> tuple[float, bool] | None:
    """For a dtype that holds no infinity and to which torch's casts saturate
    (``float8_e4m3fn``: 520 and Inf become 448), the magnitude past which a value does not
    round to the largest finite value but overflows, and whether that magnitude itself
    overflows (a tie rounds to the even neighbour); ``None`` for other dtypes, whose casts
    give Inf or NaN on overflow.

    Example:
        >>> import torch
        >>> from ladle.engine import saturation_limit
        >>> saturation_limit(torch.bfloat16) is None  # Inf after the cast: seen as it is
        True
        >>> saturation_limit(torch.float8_e4m3fn) in ((464.0, False), None)  # None: torch 2.8
        True
    """
    if not dtype.is_floating_point or dtype.itemsize != 1:
        return None
    if not bool(torch.isfinite(torch.tensor([math.inf], device="cpu").to(dtype).float())):
        return None  # an overflow shows as Inf or NaN after the cast
    if dtype == torch.float8_e8m0fnu:  # powers of two: no halfway point
        return None
    largest = torch.tensor([torch.finfo(dtype).max], device="cpu").to(dtype)
    bits = largest.view(torch.uint8)
    below = (bits - 1).view(dtype).float().item()
    top = largest.float().item()
    return top + (top - below) / 2, bool(int(bits) & 1)


def past_saturation(values: torch.Tensor, limit: tuple[float, bool]) -> torch.Tensor:
    """Where ``values`` overflow a dtype whose cast saturates, given its ``limit``
    (:func:`saturation_limit`: the magnitude, and whether a value at it overflows), Inf
    included: a bool mask.

    Example:
        >>> import torch
        >>> past_saturation(torch.tensor([464.0, 465.0, -1e30]), (464.0, False)).tolist()
        [False, True, True]
    """
    magnitude = values.abs()
    return magnitude >= limit[0] if limit[1] else magnitude > limit[0]


def _check_saturating(
    result: torch.Tensor,
    limit: tuple[float, bool] | None,
    dtype: torch.dtype,
    key: str,
    rows: slice,
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    where: str,
) -> None:
    """``result`` (before its cast to ``dtype``, which saturates): no value past ``limit``
    (:func:`saturation_limit`) and no NaN or Inf, which the cast would hide. Nothing to
    check where ``limit`` is ``None``: ``dtype``'s casts overflow visibly."""
    if limit is None:
        return
    bad = past_saturation(result, limit) | ~torch.isfinite(result)
    if bool(bad.any()):
        _refuse_nonfinite(result, int(bad.sum()), dtype, key, rows, models, base, where)


def _checked_outputs(
    results: Iterator[tuple[str, slice, torch.Tensor]],
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    where: str,
) -> Generator[tuple[str, slice, torch.Tensor], None, None]:
    """``results``, each checked by :func:`_check_merged` before it is handed on."""
    for key, rows, chunk in results:
        _check_merged(chunk, key, rows, models, base, where)
        yield key, rows, chunk


def _checked_before_cast(
    results: Iterator[tuple[str, slice, torch.Tensor]],
    specs: Mapping[str, Spec],
    limits: Mapping[str, tuple[float, bool] | None],
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    where: str,
) -> Generator[tuple[str, slice, torch.Tensor], None, None]:
    """``results``, each floating one checked by :func:`_check_saturating` against its key's
    ``limits`` (of its dtype in ``specs``) before it is handed on to the cast that would
    hide it."""
    for key, rows, result in results:
        if result.is_floating_point():
            _check_saturating(result, limits[key], specs[key][1], key, rows, models, base, where)
        yield key, rows, result


def _amendments(
    kernel: Kernel,
    specs: Mapping[str, Spec],
    limits: Mapping[str, tuple[float, bool] | None],
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    where: str,
    *,
    allow_nonfinite: bool,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``kernel``'s amendments, once the last chunk is out: each on the CPU in its key's
    output dtype (of a complex tensor: entries of its real view, real and imaginary parts),
    checked as the merged chunks are. An error the kernel's ``amend`` raises gets a note
    saying so (and the key amended last), as :func:`_note_where` notes its other calls'."""
    for key, index, values in _noted_amend(kernel):
        if key not in specs:  # before its limits are looked up
            check_amendment(where, key, index, values, None)
        dtype = specs[key][1]
        if not allow_nonfinite:
            _check_saturating(values, limits[key], dtype, key, slice(None), models, base, where)
        index, values = index.to("cpu"), cast(values.to("cpu"), dtype.to_real())
        check_amendment(where, key, index, values, specs[key])
        if not allow_nonfinite:
            _check_merged(values, key, slice(None), models, base, where)
        yield key, index, values


def _labelled(
    models: Sequence[Checkpoint], base: Checkpoint | None, numbers: Sequence[int] | None = None
) -> list[tuple[int | None, Checkpoint]]:
    """The inputs in reading order, each with its index (``None`` for the base): its position,
    or its number in ``numbers`` (a merge of some of the caller's models names them so)."""
    indices = range(len(models)) if numbers is None else numbers
    return [*([(None, base)] if base is not None else []), *zip(indices, models, strict=True)]


Plan = list[tuple[str, slice, "torch.dtype | None", "tuple[int, ...] | None"]]


def _plan(
    reference: Checkpoint,
    sources: Sequence[Checkpoint],
    keys: Sequence[str] | None,
    chunk_bytes: int,
    copy_others: bool,
) -> Plan:
    """``(key, rows, compute dtype, shape read as)`` for every chunk, the rows of
    :func:`chunk_shape` (``None`` where that is the key's own shape); a ``None`` dtype marks
    a key to copy."""
    plan: Plan = []
    for key in reference.keys() if keys is None else keys:
        shape = tuple(reference.shape(key))
        if not is_merged_dtype(reference.dtype(key)):
            if copy_others:  # copied a chunk of rows at a time too, of chunk_bytes as stored
                budget = chunk_bytes * 4 // reference.dtype(key).itemsize  # row_chunks counts 4 B
                view = _merged_view(shape, budget)
                plan.extend((key, rows, None, view) for rows in row_chunks(shape, budget))
            continue
        dtype = compute_dtype([s.dtype(key) for s in sources])
        view = _merged_view(shape, chunk_bytes)
        plan.extend((key, rows, dtype, view) for rows in row_chunks(shape, chunk_bytes))
    return plan


def _merged_view(shape: tuple[int, ...], chunk_bytes: int) -> tuple[int, ...] | None:
    """:func:`chunk_shape`, or ``None`` where it is ``shape`` itself."""
    view = chunk_shape(shape, chunk_bytes)
    return None if view == shape else view


def _shaped(view: tuple[int, ...] | None) -> tuple[tuple[int, ...], ...]:
    """The ``shape`` argument of ``read_rows``/``map_rows``, given only for a merged view:
    a subclass that overrides them as they were before ``shape`` (``read_rows(key, rows,
    into)``) still reads every tensor whose rows fit in a chunk."""
    return () if view is None else (view,)


def _largest_read(plan: Plan, sources: Sequence[Checkpoint]) -> int:
    """Bytes of the largest chunk in the compute dtype: the size of each pooled buffer,
    rounded up to 16 so that it views as any dtype (12 bytes of a float32 key cannot hold the
    one float64 entry of another; 120 bytes, of 30 float32 entries, do not view as
    complex128, whose entries are 16 bytes)."""
    largest = 0
    for key, rows, dtype, view in plan:
        if dtype is not None:
            itemsize = max(dtype.itemsize, *(s.dtype(key).itemsize for s in sources))
            largest = max(largest, _rows_nbytes(sources[0], key, rows, itemsize, view))
    return -(-largest // 16) * 16


class _Pool:
    """A fixed set of flat byte buffers, handed out and returned; ``take`` waits for one.

    Buffers are allocated on first use; on CUDA they are pinned, for fast copies to the device,
    and may be returned with the event of a copy still reading them: ``take`` waits for it.
    """

    def __init__(self, nbytes: int, *, count: int, device: torch.device) -> None:
        self._free: queue.Queue[tuple[torch.Tensor, Any]] = queue.Queue()
        self._nbytes, self._pin = nbytes, device.type == "cuda"
        self._unmade = count
        self._lock = threading.Lock()  # several reading threads take buffers

    def take(self) -> torch.Tensor:
        # One decision under the lock: a free buffer, else a new one while some are unmade;
        # only when every buffer is made and out does a taker wait for one to come back.
        with self._lock:
            try:
                buffer, busy = self._free.get_nowait()
            except queue.Empty:
                if self._unmade:
                    self._unmade -= 1
                    return torch.empty(
                        self._nbytes, dtype=torch.uint8, device="cpu", pin_memory=self._pin
                    )
                buffer, busy = None, None
        if buffer is None:
            buffer, busy = self._free.get()
        if busy is not None:  # a copy to the device still reads it
            busy.synchronize()
        return buffer

    def release(self, buffer: torch.Tensor | None, *, after: Any = None) -> None:
        """Return ``buffer``, free for reuse once the event ``after`` (if any) completes."""
        if buffer is not None:
            self._free.put((buffer, after))


class _Chunk(NamedTuple):
    """One chunk read for :func:`fold`: the tensor, the pooled buffer it occupies (``None``
    when it occupies none) for the consumer to release, and the event its copy to the device
    records (``None`` off CUDA), which the compute stream waits on before using it."""

    tensor: torch.Tensor
    held: torch.Tensor | None = None
    copied: Any = None


def _reads(
    plan: Plan,
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    reference: Checkpoint,
    device: torch.device,
    check: bool,
    mapped: bool,
    pool: _Pool,
    transfers: Transfers,
    numbers: Sequence[int] | None = None,
) -> Iterator[Callable[[], _Chunk]]:
    """A task for every chunk ``fold`` consumes, in its order (base first, then models):
    each reads its chunk when called, on whichever thread, independently of the others.

    ``check``: raise on NaN/Inf in each chunk; ``mapped``: CPU chunks are views of the page
    cache where the source has them."""
    staging = threading.local()  # each thread's own: raw bytes awaiting conversion
    on_cpu = device.type == "cpu"

    def other(key: str, rows: slice, view: tuple[int, ...] | None) -> _Chunk:
        # Read with pread, which reports a file cut short; a map would crash. Bytes read into
        # ``into`` are this chunk's own; a source's own tensor (in memory) is copied, to the
        # CPU as a file's are: a copy on a GPU would run on this thread's stream, which the
        # stream that copies results to the host does not wait for.
        into = torch.empty(
            _rows_nbytes(reference, key, rows, shape=view), dtype=torch.uint8, device="cpu"
        )
        transfers.before_read()
        chunk = reference.read_rows(key, rows, into, *_shaped(view))
        return _Chunk(chunk if _shares(chunk, into) else chunk.to("cpu", copy=True))

    def floating(
        index: int | None,
        checkpoint: Checkpoint,
        key: str,
        rows: slice,
        dtype: torch.dtype,
        shape: tuple[int, ...] | None,
    ) -> _Chunk:
        view = checkpoint.map_rows(key, rows, *_shaped(shape)) if mapped else None
        if view is not None:  # the page cache's own pages: no copy unless converted
            ready, held = view, None
            if view.dtype != dtype:
                held = pool.take()
                ready = held.view(dtype)[: view.numel()].view(view.shape).copy_(view)
            if check:  # in the compute dtype: no temporary copy to sum
                _check_finite(ready, index, checkpoint, key)
            return _Chunk(ready, held)
        # Read into the pool when the bytes can be used as they are: on the CPU in the
        # compute dtype, or (pinned) as the source of a copy to the device.
        direct = checkpoint.dtype(key) == dtype or not on_cpu
        buffer = pool.take()
        if direct:
            raw = buffer
        else:
            if not hasattr(staging, "scratch"):
                staging.scratch = Scratch()
            raw = staging.scratch.take((buffer.numel(),), torch.uint8, buffer.device)
        transfers.before_read()
        chunk = checkpoint.read_rows(key, rows, raw, *_shaped(shape))
        if not on_cpu:  # copied on a side stream; the buffer is free once the copy is done
            checker = (
                partial(_check_finite, index=index, checkpoint=checkpoint, key=key)
                if check
                else None
            )
            try:
                moved, copied = transfers.to_device(chunk, dtype, checker)
            except BaseException:
                pool.release(buffer)  # the failed copy is over (to_device waited for it)
                raise
            pool.release(buffer, after=copied if _shares(chunk, buffer) else None)
            return _Chunk(moved, None, copied)
        if _shares(chunk, buffer):  # read straight into the pool
            ready, held = chunk, buffer
        elif _shares(chunk, raw) or (
            chunk.device == buffer.device and (chunk.dtype != dtype or _expanded(chunk))
        ):
            # Read, then converted into the pool; or a tensor in memory (a torch file's map)
            # converted there: a fresh copy per chunk, freed between allocations kept longer
            # (TIES's records of ties), grew the heap of a long merge by hundreds of MiB.
            # An expanded tensor (a stride of 0) is copied too: torch's CPU arithmetic on
            # one fuses a multiply-add in its vector loop only, so entries of equal inputs
            # came out one rounding apart depending on where the chunk ended.
            ready, held = buffer.view(dtype)[: chunk.numel()].view(chunk.shape), buffer
            ready.copy_(chunk)
        else:  # a tensor in memory already (on whichever device its source holds it)
            pool.release(buffer)
            ready, held = chunk.to(device=device, dtype=dtype), None
        if check:
            _check_finite(ready, index, checkpoint, key)
        return _Chunk(ready, held)

    for key, rows, dtype, view in plan:
        if dtype is None:
            yield partial(other, key, rows, view)
            continue
        for index, checkpoint in _labelled(models, base, numbers):
            yield partial(floating, index, checkpoint, key, rows, dtype, view)


class Transfers:
    """Copies between the host and the merge device, overlapped with the arithmetic.

    On CUDA: a chunk read into a pinned buffer is copied to the device with ``non_blocking``
    on a side stream of the calling thread's own (reading threads copy side by side), which
    records an event after the copy; :meth:`arrived` makes the compute stream (the stream
    current when this object was made) wait on it before the chunk is used, and the copy's
    memory is marked as used there (``record_stream``), so the device computes one chunk
    while others are copied. The pinned buffer may be refilled once the event completes.
    Results go back the other way through :meth:`to_host`. Elsewhere (the CPU, other
    accelerators) the same calls copy synchronously, or not at all.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        if self._cuda and device.index is None:
            # "cuda" is the current device, which is each thread's own: reading threads start
            # on device 0. This thread's, named, so that copies land where the kernel runs.
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._streams = threading.local()  # each reading thread's copy stream
        if self._cuda:
            self._compute = torch.cuda.current_stream(device)
            # What the caller queued before the fold began: work that may still be writing
            # the inputs it holds on the device (see :meth:`before_read`).
            self._written = torch.cuda.Event()
            self._written.record(self._compute)

    def before_read(self) -> None:
        """On CUDA, make this thread's current stream wait for the work the caller had queued
        on the compute stream when this object was made: a source's tensors on the device may
        be written there still (the merge running in ``torch.cuda.stream(s)`` right after a
        step on ``s``), and reading them (rows a source gathers, integer buffers copied to
        the host) runs on this thread's stream, which does not wait for ``s`` by itself (a
        reading thread's is the default stream; PyTorch's other streams do not synchronise
        with it). Only that work: the fold's own arithmetic writes no input."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._written)

    def _copy_stream(self) -> Any:
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        return stream

    def to_device(
        self,
        chunk: torch.Tensor,
        dtype: torch.dtype,
        check: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """``chunk`` on the device in ``dtype``, and the event that marks the end of the copy
        (``None`` where the copy is synchronous): pass it to :meth:`arrived` before the
        compute stream uses the chunk, and keep ``chunk``'s memory until it completes where
        it is on the host (a chunk on the device is marked as used by the copy). ``check``
        runs on the copy first (on the side stream: it waits for this copy alone).
        """
        if not self._cuda:
            moved = chunk.to(device=self.device, dtype=dtype)
            if check is not None:
                check(moved)
            return moved, None
        copy = self._copy_stream()
        if chunk.is_cuda:  # made on the compute stream, or (rows a source gathered, as of a
            # strided tensor) on this thread's current stream: wait for both
            copy.wait_stream(self._compute)
            copy.wait_stream(torch.cuda.current_stream(chunk.device))
        # The copy stream's device made current first: a reading thread starts on device 0,
        # and leaving torch.cuda.stream alone would switch it back with cudaSetDevice(0),
        # which creates a CUDA context on device 0 (hundreds of MiB) in a merge on another
        # device; torch.cuda.device's exit switches back only to a device with a context.
        with torch.cuda.device(self.device), torch.cuda.stream(copy):
            try:
                moved = chunk.to(device=self.device, non_blocking=True).to(dtype)
                if check is not None:
                    check(moved)
            except BaseException:
                copy.synchronize()  # no copy may still read ``chunk`` once this returns
                raise
            copied = torch.cuda.Event()
            copied.record(copy)
        moved.record_stream(self._compute)
        if chunk.is_cuda and chunk.device == self.device:
            # Read on the copy stream (converted, checked), which the stream that made it does
            # not wait for: rows a source gathered on this thread's stream went back to that
            # stream when dropped, and its next gather wrote them while they were converted.
            chunk.record_stream(copy)
        return moved, copied

    def arrived(self, copied: Any) -> None:
        """Make the compute stream wait for the copy that recorded ``copied`` (if any)."""
        if copied is not None:
            self._compute.wait_event(copied)

    def to_host(
        self,
        results: Iterator[tuple[str, slice, torch.Tensor]],
        dtype: Callable[[str], torch.dtype],
    ) -> Generator[tuple[str, slice, torch.Tensor], None, None]:
        """``results`` converted to ``dtype(key)`` and on the CPU.

        On CUDA each result is copied into one of two pinned buffers on the compute stream and
        handed on once the next result's copy is queued, so the device computes the next
        chunk while the caller writes this one; a result is valid until the next is taken.
        """
        if not self._cuda:  # converted into one reused buffer (fresh ones grow the heap)
            conversions = Scratch()
            for key, rows, result in results:
                if result.dtype != dtype(key):
                    buffer = conversions.take(result.shape, dtype(key), result.device)
                    result = cast(result, dtype(key), out=buffer)
                yield key, rows, result
            return
        buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8, device="cpu")] * 2
        waiting: tuple[str, slice, torch.Tensor, torch.cuda.Event] | None = None
        for turn, (key, rows, result) in enumerate(results):
            converted = cast(result, dtype(key))
            nbytes = converted.numel() * converted.element_size()
            if buffers[turn % 2].numel() < nbytes:
                buffers[turn % 2] = torch.empty(
                    nbytes, dtype=torch.uint8, device="cpu", pin_memory=True
                )
            host = buffers[turn % 2][:nbytes].view(converted.dtype).view(converted.shape)
            host.copy_(converted, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._compute)
            if waiting is not None:
                waiting[3].synchronize()
                yield waiting[:3]
            waiting = (key, rows, host, copied)
        if waiting is not None:
            waiting[3].synchronize()
            yield waiting[:3]


def _shares(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``tensor`` lies in ``buffer``'s memory (empty ones, whose address is 0, never)."""
    address = tensor.untyped_storage().data_ptr()
    return address != 0 and address == buffer.untyped_storage().data_ptr()


def _check_finite(chunk: torch.Tensor, index: int | None, checkpoint: Checkpoint, key: str) -> None:
    # One cheap reduction; only a non-finite sum (NaN, Inf, or overflow) needs the full test.
    total = torch.sum(chunk, dtype=compute_dtype([chunk.dtype]))
    # (torch has no isfinite of its own for float8_e4m3fn and e4m3fnuz)
    values = chunk.float() if chunk.dtype.itemsize == 1 else chunk
    if not torch.isfinite(total) and not bool(torch.isfinite(values).all()):
        raise NonFiniteError(
            f"{_describe(index, checkpoint)}: key {key!r} holds NaN or Inf values; "
            f"pass {ALLOW_NONFINITE} to go on anyway"
        )


def _prefetched(tasks: Iterator[Callable[[], T]], *, depth: int, threads: int = 1) -> Generator[T]:
    """The results of ``tasks``, in order, run by ``threads`` background threads at most
    ``depth`` ahead of the consumer (by the caller's thread, in turn, for ``depth == 0``).

    A task's exception is raised when the consumer reaches its result. Closing the generator
    cancels the tasks not started and waits for the running ones.
    """
    if depth == 0:
        for task in tasks:
            yield task()
        return
    pending: collections.deque[concurrent.futures.Future[T]] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, min(threads, depth)),
        thread_name_prefix="ladle-read",
        initializer=one_thread_here,  # a core each (they copy and check chunks)
    ) as workers:
        try:
            for task in tasks:
                pending.append(workers.submit(task))
                if len(pending) > depth:  # ``depth`` more stay in flight while this is used
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _rows_nbytes(
    checkpoint: Checkpoint,
    key: str,
    rows: slice,
    itemsize: int | None = None,
    shape: tuple[int, ...] | None = None,
) -> int:
    """Bytes of rows ``rows`` of ``key`` read as ``shape`` (default its own), in ``itemsize``
    bytes per entry (default as stored)."""
    shape = checkpoint.shape(key) if shape is None else shape
    itemsize = checkpoint.dtype(key).itemsize if itemsize is None else itemsize
    if not shape:
        return itemsize
    count = len(range(*rows.indices(shape[0])))
    return count * math.prod(shape[1:]) * itemsize


def _check_output(
    out: str | os.PathLike | None,
    sources: Sequence[Checkpoint],
    *,
    overwrite: bool,
    max_shard_size: int | str,
) -> None:
    """Refuse ``out`` before any pass over the inputs, not once the merge is done: a bad name,
    an input's path (or a folder holding one, or inside one), an existing output without
    ``overwrite``, or a ``max_shard_size`` that is no size (of no use for a single file or
    in memory, but a typo there is one too), or an ``overwrite`` that is no bool (likewise)."""
    parse_size(max_shard_size)
    check_flag("overwrite", overwrite)
    if out is not None:
        check_not_an_input(out, sources)
        check_output_free(out, overwrite=overwrite)


def check_not_an_input(out: str | os.PathLike, sources: Sequence[Checkpoint]) -> None:
    """A ``LadleError`` where writing ``out`` would replace or delete a file of ``sources``:
    ``out`` is one of their files or folders, lies inside one, or holds one, compared as
    they resolve and by identity (a hard link, or a bind mount of an input's folder, is the
    input); or one of them is or lies in a leftover beside ``out`` that the write deletes
    (:func:`ladle.writer.stale_leftovers`: an earlier output that a stopped ``overwrite``
    set aside, merged back). See :class:`Destination` to check many inputs against an output.

    Example:
        >>> import torch
        >>> from ladle.checkpoint import open_checkpoint
        >>> check_not_an_input("merged.safetensors", [open_checkpoint({"w": torch.ones(2)})])
    """
    destination = Destination(out)
    for checkpoint in sources:
        destination.check(reads(checkpoint))


class Reads(NamedTuple):
    """What an input reads, as :class:`Destination` compares it: its name, its files and
    folder (resolved), their identities, and those of every folder above them."""

    name: str
    paths: list[Path]
    inodes: set[tuple[int, int]]
    above: set[tuple[int, int]]


def reads(checkpoint: Checkpoint) -> Reads:
    """The :class:`Reads` of ``checkpoint``: the files it reads (a folder's weights file may
    link elsewhere) and its own path."""
    paths = [file.resolve() for file in checkpoint.file_sizes()]
    if checkpoint.path is not None:
        paths.append(checkpoint.path.resolve())
    return reads_of(checkpoint.name, paths)


def reads_of(name: str, paths: list[Path]) -> Reads:
    """The :class:`Reads` of an input named ``name`` that reads ``paths`` (resolved)."""
    inodes = {inode for inode in map(_inode, paths) if inode is not None}
    return Reads(name, paths, inodes, set().union(*map(_inodes_up, paths)))


class Destination:
    """Where writing ``out`` reaches, found once (its path resolved, its identity and its
    folders', the leftovers beside it that the write deletes), to check inputs against
    with :meth:`check`: a recipe checks every input against every output it writes.

    Example:
        >>> import torch
        >>> from ladle.checkpoint import open_checkpoint
        >>> Destination("merged").check(reads(open_checkpoint({"w": torch.ones(2)})))
    """

    def __init__(self, out: str | os.PathLike) -> None:
        check_output_name(out)
        self.out = out
        self.target = resolved_output(out)
        self.around = _inodes_up(self.target)  # its own, where it exists, then its folders'
        self.own = _inode(self.target)  # None for a new output: then it holds no input
        self.leftovers = list(stale_leftovers(self.target))

    def check(self, read: Reads) -> None:
        """A ``LadleError`` where writing the output would replace or delete what ``read``
        reads (:func:`check_not_an_input`)."""
        out = self.out
        if (
            any(overlapping(self.target, p) for p in read.paths)
            or read.inodes & self.around  # the same file or folder by another path (a bind
            or (self.own is not None and self.own in read.above)  # mount, a hard link)
        ):
            raise LadleError(
                f"{out}: refusing to write over or inside input {read.name}; "
                "choose another output path"
            )
        for leftover in self.leftovers:
            if any(overlapping(leftover, p) for p in read.paths):
                raise LadleError(
                    f"{out}: input {read.name} is or lies in {leftover.name}, an earlier output "
                    f"that a stopped write set aside and that writing {out} deletes; move or "
                    "rename it first"
                )


def overlapping(a: Path, b: Path) -> bool:
    """Whether writing ``a`` could touch ``b`` (both resolved): the same path, or one inside
    the other.

    Example:
        >>> overlapping(Path("/m/out"), Path("/m/out/model.safetensors")), overlapping(
        ...     Path("/m/a"), Path("/m/b"))
        (True, False)
    """
    shorter, longer = sorted((a.parts, b.parts), key=len)  # POSIX paths: parts compare as
    return longer[: len(shorter)] == shorter  # the paths do, and no parents are made


def resolved_output(out: str | os.PathLike) -> Path:
    """``out`` resolved: its folder, where a loop of symbolic links is an ``OutputError``
    (pathlib raises ``RuntimeError`` before Python 3.13 and goes quietly on after), then its
    own name, followed where it is a link (a loop there is a link the output replaces).

    Example:
        >>> resolved_output("merged.safetensors") == Path("merged.safetensors").resolve()
        True
    """
    path = Path(out)
    try:
        os.stat(path.parent)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutputError(f"{out}: cannot resolve the output's path ({err})") from None
    try:
        folder = path.parent.resolve()
    except (OSError, RuntimeError) as err:  # a loop found by pathlib before Python 3.13
        raise OutputError(f"{out}: cannot resolve the output's path ({err})") from None
    try:
        return (folder / path.name).resolve()
    except (OSError, RuntimeError):  # the name a loop of links: the link itself is replaced
        return folder / path.name


def _inode(path: Path) -> tuple[int, int] | None:
    """The device and inode of ``path`` (``os.path.samefile``'s test), or ``None`` where
    there is nothing to stat."""
    try:
        found = os.stat(path)
    except (OSError, ValueError):
        return None
    return found.st_dev, found.st_ino


def _inodes_up(path: Path) -> set[tuple[int, int]]:
    """The :func:`_inode` of ``path`` and of each folder above it that exists: an output
    whose set holds an input's is that input, or lies inside it."""
    found = (_inode(folder) for folder in (path, *path.parents))
    return {inode for inode in found if inode is not None}


def json_ready(value: object) -> Any:
    """``value`` with each float that is not finite, in lists, tuples and dicts too, as
    ``None`` (JSON's ``null``).

    Example:
        >>> json_ready({"score": float("inf"), "weights": [0.5, float("nan")], "t": 1})
        {'score': None, 'weights': [0.5, None], 't': 1}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value


def provenance(
    method: str,
    parameters: Mapping[str, object],
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    out: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Header metadata recording how the output ``out`` was made (local inputs relative to
    the folder holding it: :func:`~ladle.checkpoint.recorded_name`). The parameters are
    JSON, a number that is not finite (an infinite greedy-soup score) recorded as ``null``:
    JSON has no ``Infinity``, and strict readers refuse it."""
    recorded = json.dumps(json_ready(dict(parameters)), sort_keys=True, default=str)
    meta = {
        "ladle.version": __version__,
        "ladle.method": method,
        "ladle.parameters": recorded,
        "ladle.inputs": json.dumps([recorded_name(m, out) for m in models]),
    }
    if base is not None:  # a name that is no UTF-8 (lone surrogates) by its escapes, as cards
        meta["ladle.base"] = recorded_name(base, out).encode("utf-8", "backslashreplace").decode()
    return meta


def _writer(
    out: str | os.PathLike,
    specs: Mapping[str, Spec],
    part: Partition | None,
    keys: Sequence[str] | None,
    *,
    metadata: Mapping[str, str],
    extra_files: Mapping[str, bytes | str | os.PathLike] | None,
    max_shard_size: int | str,
    overwrite: bool,
) -> Sink:
    """The sink of a merge to ``out``: the whole output, or ``part``'s share (its ``keys``,
    every key of ``specs`` for ``None``) of a merge split across processes."""
    if part is None:
        return SafetensorsWriter(
            out,
            specs,
            max_shard_size=max_shard_size,
            metadata=metadata,
            overwrite=overwrite,
            extra_files=extra_files,
        )
    # Outside the split: a partition's writer may write out whole, which the writer refuses
    # to a method inside it (writer._check_not_split)
    token = _PARTITION.set(None)
    try:
        return part.writer(
            Path(out),
            specs,
            keys=list(specs) if keys is None else keys,
            metadata=metadata,
            extra_files=extra_files,
            max_shard_size=max_shard_size,
        )
    finally:
        _PARTITION.reset(token)


def output_record(
    method: str,
    parameters: Mapping[str, object],
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    allow_nonfinite: bool,
    config_dtype: torch.dtype | None = None,
) -> tuple[dict[str, str], dict[str, Path | bytes] | None]:
    """What an output ``out`` records of its merge: the header's :func:`provenance`, and for a
    directory the files placed beside the weights
    (:func:`~ladle.modelcard.output_files`: config, tokenizer, model card; ``None`` for a
    file). ``allow_nonfinite`` is recorded among the parameters, so that the card's recipe
    lets the same NaN through.

    Example:
        >>> import tempfile, torch, ladle
        >>> folder = tempfile.mkdtemp()
        >>> _ = ladle.save({"w": torch.ones(2)}, folder + "/a.safetensors")
        >>> with ladle.open_checkpoint(folder + "/a.safetensors") as model:
        ...     meta, extra = output_record("uniform_soup", {}, [model], None,
        ...                                 folder + "/soup.safetensors", dtype=None,
        ...                                 max_shard_size="5GB", allow_nonfinite=True)
        >>> meta["ladle.inputs"], meta["ladle.parameters"], extra
        ('["a.safetensors"]', '{"allow_nonfinite": true}', None)
    """
    if allow_nonfinite:
        parameters = {**parameters, "allow_nonfinite": True}
    meta = provenance(method, parameters, models, base, out)
    if single_file(out):
        return meta, None
    extra = output_files(
        method,
        parameters,
        models,
        base,
        out=out,
        dtype=dtype,
        max_shard_size=max_shard_size,
        config_dtype=config_dtype,
    )
    return meta, extra


def merge(
    models: Sequence[StateDictLike],
    kernel: Kernel,
    *,
    base: StateDictLike | None = None,
    method: str,
    parameters: Mapping[str, object],
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    allow_nonfinite: bool = False,
    prepare: Callable[[list[Checkpoint], Checkpoint | None], Kernel] | None = None,
    inputs_checked: bool = False,
) -> StateDict | Path:
    """Merge ``models`` (and ``base``) with ``kernel`` into a dict or, with ``out``, onto disk.

    Floating tensors go through the kernel and come out in ``dtype`` (default: the dtype of
    the base's, or model 0's, tensor); complex ones go through it as their real and
    imaginary parts and come out in their own dtype; integer and bool tensors are copied
    from the base or model 0.
    ``prepare``, when given, is called with the opened, checked checkpoints and returns the
    kernel to use (for methods that first gather statistics over the inputs).

    Unless ``allow_nonfinite``, inputs holding NaN or Inf raise :class:`NonFiniteError`
    naming the input, and so do merged values that overflow the output dtype (or the
    compute dtype) from finite inputs: every merged chunk is checked after its cast.
    ``inputs_checked``: ``prepare``'s passes checked every floating input already, so the
    merging pass does not check them again (its outputs still are).

    In memory, a tensor that the base and every model name twice (tied weights:
    :func:`~ladle.checkpoint.tied_names`) is merged once, under its first name (``prepare``
    and ``kernel`` see that name alone), and the dict holds it under both, one tensor, as
    the inputs do; a file holds each name's bytes.

    Example:
        >>> import tempfile, torch, ladle
        >>> from ladle.methods.soup import weighted_mean_kernel
        >>> out = merge(
        ...     [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}],
        ...     weighted_mean_kernel([0.25, 0.75]),
        ...     method="my_mean", parameters={"weights": [0.25, 0.75]},
        ...     out=tempfile.mkdtemp() + "/merged.safetensors", device="cpu",
        ... )
        >>> ladle.load(out)["w"].tolist()
        [2.5, 5.0]
    """
    dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    chunk_bytes = check_chunk_bytes(chunk_bytes)
    check_flag("allow_nonfinite", allow_nonfinite)
    progress = check_progress(progress)  # before a preparing pass reads every model
    with ExitStack() as stack:
        inputs = stack.enter_context(ExitStack())  # closed on a thread once read (see below)
        checkpoints, base_ckpt = open_models(models, base, inputs)
        check_compatible(checkpoints, base_ckpt)
        check_mergeable(checkpoints, base_ckpt)
        reference = base_ckpt if base_ckpt is not None else checkpoints[0]
        names = reference.keys()  # the result's keys, in order
        # In memory, a tensor that every input names twice (tied weights) is merged once and
        # returned under both names, as the inputs hold it; a file holds each name's bytes.
        tied = tied_names([reference, *checkpoints]) if out is None else {}
        if tied:
            checkpoints, base_ckpt = _first_names(checkpoints, base_ckpt, tied)
            reference = base_ckpt if base_ckpt is not None else checkpoints[0]
        sources = [*checkpoints, *([base_ckpt] if base_ckpt is not None else [])]
        _check_output(out, sources, overwrite=overwrite, max_shard_size=max_shard_size)
        # before prepare's passes over the inputs; the others are of the reference's kinds
        label = _describe(None if base_ckpt is not None else 0, reference)
        check_output_dtypes(reference, dtype, label=label)
        specs = output_specs(reference, dtype)
        if out is None:  # before any pass: a result past the memory ended in the OOM killer
            check_room(specs)
        # results are cast to the output dtypes on the device: before any pass
        check_device_dtypes(target, ((spec[1], key) for key, spec in specs.items()))
        if out is not None:  # a dtype safetensors has no code for: before any pass
            check_storable(out, specs)
        part = _PARTITION.get()
        if part is not None and not part.writes(out):  # a step of the method's own: whole,
            stack.callback(_PARTITION.reset, _PARTITION.set(None))  # its prepare's passes too
            part = None
        keys = None if part is None else part.keys(reference)
        if prepare is not None:
            with _preparing(progress):
                kernel = prepare(checkpoints, base_ckpt)
        total = sum(s.nbytes(key) for s in sources for key in (specs if keys is None else keys))
        if out is not None:  # merged in the order the output lays the tensors out
            mine = set(specs if keys is None else keys)
            keys = [key for key in aligned_order(specs) if key in mine]
        bar = _bar(progress, total)
        if bar is not None:
            stack.callback(bar.close)
        where = "the merged state dict" if out is None else str(out)
        folded = fold(
            checkpoints,
            kernel,
            base=base_ckpt,
            keys=keys,
            device=target,
            chunk_bytes=chunk_bytes,
            on_bytes=None if bar is None else bar.update,
            copy_others=True,
            allow_nonfinite=allow_nonfinite or inputs_checked,
            check_results=False,  # checked below, in the output dtype
        )
        stack.callback(folded.close)  # closed last, after any wrapper of it (below)
        limits = {key: saturation_limit(dtype) for key, (_, dtype) in specs.items()}
        if not allow_nonfinite and any(limits.values()):  # checked before the cast hides it
            folded = _checked_before_cast(folded, specs, limits, checkpoints, base_ckpt, where)
        results = Transfers(target).to_host(folded, lambda key: specs[key][1])
        # On a failure each generator is closed, outermost first, before the inputs are: the
        # reading threads stop, and no frame the exception keeps holds views of the inputs.
        stack.callback(folded.close)
        stack.callback(results.close)
        if not allow_nonfinite:
            results = _checked_outputs(results, checkpoints, base_ckpt, where)
        # Lazy: the kernel's amend() is called once the last chunk is out.
        amendments = _amendments(
            kernel, specs, limits, checkpoints, base_ckpt, where, allow_nonfinite=allow_nonfinite
        )
        if out is None:
            state = _to_state_dict(results, specs)
            with _amending_on(bar):
                for key, index, values in amendments:
                    real_view(state[key]).view(-1)[index] = values
            return {key: state[tied.get(key, key)] for key in names if tied.get(key, key) in state}
        meta, extra = output_record(
            method,
            parameters,
            checkpoints,
            base_ckpt,
            out,
            dtype=dtype,
            max_shard_size=max_shard_size,
            allow_nonfinite=allow_nonfinite,
        )
        # Once every read is done, the inputs are closed (their memory maps torn down) on a
        # thread while the output is committed (its fsync waits on the disk).
        closing = threading.Thread(target=inputs.close, name="ladle-close-inputs")
        try:
            sink = _writer(
                out,
                specs,
                part,
                keys,
                metadata=meta,
                extra_files=extra,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
            )
            try:
                with sink as writer:
                    for key, _, chunk in results:
                        writer.write(key, chunk)
                    with _amending_on(bar):
                        for key, index, values in amendments:
                            writer.amend(key, index, values)
                    closing.start()
            except BaseException:  # Ctrl-C at the first instruction of __exit__ ran neither
                abort = getattr(sink, "abort", None)  # its commit nor its abort (a second
                if abort is not None:  # abort, or one after a commit, does nothing)
                    abort()
                raise
        finally:
            if closing.ident is not None:
                closing.join()
        return Path(out)


def check_room(
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    copies: int = 1,
    what: str = "the merged state dict",
    hint: str = "pass out= to stream the merge to a file",
) -> None:
    """Raise ``MemoryError`` if ``copies`` state dicts of ``specs`` (key: shape, dtype) need
    more bytes than this process could take (:func:`~ladle.checkpoint.refuse_past_room`),
    before any pass: the tensors of an in-memory merge are made one by one as their first
    chunks come, so a result past the memory failed only after most of the merge (torch's
    allocator refusing one tensor), or ended in the kernel's OOM killer. ``what`` and
    ``hint`` word the error. Nothing is checked where the available memory cannot be read.

    Example:
        >>> import torch
        >>> check_room({"w": ((2, 3), torch.float32)})  # 24 bytes fit
    """
    times = f", {copies} of each tensor" if copies > 1 else ""

    def describe(key: str) -> str:
        shape, dtype = specs[key]
        return f"{key!r}, {list(shape)} {str(dtype).removeprefix('torch.')}{times}"

    sizes = {key: math.prod(shape) * dtype.itemsize for key, (shape, dtype) in specs.items()}
    refuse_past_room(sizes, what, hint, describe=describe, copies=copies)


def _first_names(
    models: Sequence[Checkpoint], base: Checkpoint | None, tied: Mapping[str, str]
) -> tuple[list[Checkpoint], Checkpoint | None]:
    """``models`` and ``base`` without the second names of ``tied`` (:func:`first_names`); a
    checkpoint given twice (a base that is one of the models) stays one object."""
    views: dict[int, Checkpoint] = {}

    def view(checkpoint: Checkpoint) -> Checkpoint:
        return views.setdefault(id(checkpoint), first_names(checkpoint, tied))

    return [view(m) for m in models], None if base is None else view(base)


def _check_result_rows(key: str, rows: slice, chunk: torch.Tensor, shape: tuple[int, ...]) -> None:
    """A ``LadleError`` unless a kernel's result ``chunk`` holds exactly ``rows`` of ``key``'s
    tensor of ``shape`` (of its own rows, or of a view with leading dimensions merged), as
    the writer checks what it writes: returned in memory, a 0-d or one-column result was
    spread over uninitialised memory, and a whole tensor's result of another shape with as
    many entries was reshaped without a word.

    Example:
        >>> _check_result_rows("w", slice(None), torch.zeros(3), (2,))
        Traceback (most recent call last):
        ladle.errors.LadleError: merge: the result of 'w' (shape (2,)) has shape (3,), expected (2,)
    """
    whole = rows == slice(None)
    count = math.prod(shape) if whole else (rows.stop - rows.start) * math.prod(chunk.shape[1:])
    if _rows_of(chunk, shape) and chunk.numel() == count:
        return
    part = "" if whole else f" for rows {rows.start}–{rows.stop - 1}"
    many = "row" if not whole and rows.stop - rows.start == 1 else "rows"
    expected = f"{shape}" if whole else f"{rows.stop - rows.start} {many} of shape {shape[1:]}"
    raise LadleError(
        f"merge: the result{part} of {key!r} (shape {shape}) has shape {tuple(chunk.shape)}, "
        f"expected {expected}"
    )


def _to_state_dict(
    results: Iterator[tuple[str, slice, torch.Tensor]],
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
) -> StateDict:
    state: StateDict = {}
    for key, rows, chunk in results:
        shape, dtype = specs[key]
        _check_result_rows(key, rows, chunk, shape)
        if rows == slice(None):
            # A copy: kernels may reuse the buffer of a result for the next chunk.
            state[key] = chunk.to("cpu", dtype, copy=True).view(shape)
        else:
            if key not in state:
                state[key] = torch.empty(shape, dtype=dtype, device="cpu")
            state[key].view(-1, *chunk.shape[1:])[rows] = chunk  # rows of chunk_shape
    return state
