"""Merging beyond one process, on ``torch.distributed`` (gloo on CPU, NCCL on GPUs, torchrun).

Two uses, nothing home-made underneath: collectives of the process group you already have.

- In training code, :func:`average_` replaces every rank's floating parameters and buffers by
  their (weighted) mean across a process group: soups of models fine-tuned on different
  ranks, periodic averaging.
- For large merges, :func:`merge` runs any merge method under ``torchrun``: the keys are split
  across the ranks by bytes, each rank merges its keys (streaming, on its own GPU when there
  is one) and writes its own shards, and rank 0 writes the index and renames the finished
  directory into place. The result equals the single-process merge bit for bit.

Importing this module is cheap: ``torch.distributed`` is part of ``import torch``, and the
DTensor machinery is looked at only when it was imported by the caller.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import numbers
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import Checkpoint, StateDictLike
from .engine import (
    Destination,
    NumberLike,
    NumbersLike,
    check_models,
    check_number,
    check_numbers,
    is_merged_dtype,
    is_real,
    partitioned,
    reads_of,
    real_view,
    resolve_device,
)
from .errors import IncompatibleError, LadleError, one_line, type_name
from .hub import PREFIX as HUB_PREFIX
from .hub import fetched, pinned
from .methods.dare import dare
from .methods.ratatouille import ratatouille
from .methods.slerp import slerp
from .methods.soup import greedy_soup, normalized_weights, uniform_soup
from .methods.stock import model_stock
from .methods.task_arithmetic import task_arithmetic
from .methods.ties import ties
from .recipe import ALIASES
from .writer import (
    _ENDED,
    SafetensorsWriter,
    _plan_shards,
    _remove_stale_temporaries,
    _temporary_beside,
    check_output_name,
    parse_size,
    physical_path,
    rename_into_place,
    single_file,
    write_extra_files,
    write_index_file,
)

__all__ = ["average_", "merge", "split_by_bytes"]

Averageable = TypeVar(  # bound: average_(linear) is typed as the nn.Linear given
    "Averageable",
    bound=Union[torch.nn.Module, MutableMapping[str, torch.Tensor]],  # noqa: UP007
)

BUCKET_BYTES = 64 * 2**20
"""Largest flat buffer that :func:`average_` reduces in one collective (64 MiB)."""

METHODS: dict[str, Callable[..., Any]] = {
    "dare": dare,
    "model_stock": model_stock,
    "ratatouille": ratatouille,
    "slerp": slerp,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "uniform_soup": uniform_soup,
}
"""Merge methods :func:`merge` accepts by name; also by the short names of recipes and the CLI
(``"soup"``, ``"stock"``: ``ladle.recipe.ALIASES``), and with ``-`` for ``_``."""

Spec = tuple[tuple[int, ...], torch.dtype]


# --- averaging across ranks -------------------------------------------------------------------


def _world(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    _check_group(group)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group: no process group is initialised; call torch.distributed.init_process_group "
            "(or launch with torchrun) first"
        )
    if group is not None and dist.get_rank(group) < 0:  # torch's own collectives skip it
        raise ValueError(
            f"group: this process (global rank {dist.get_rank()}) is not a member of the "
            "group; call it on the group's members only"
        )
    return group if group is not None else dist.group.WORLD  # type: ignore[return-value]


def _check_group(group: object) -> None:
    """A ``TypeError`` for a ``group`` that is no process group (``None``: the world's)."""
    # (new_group gives a process outside the group a marker of its own: told so by _world)
    outside = getattr(dist.GroupMember, "NON_GROUP_MEMBER", None)  # an int: -100
    if group is None or isinstance(group, dist.ProcessGroup):
        return
    if not (type(group) is type(outside) and group == outside):
        raise TypeError(
            f"group: expected a torch.distributed ProcessGroup, found {type_name(group)}"
        )


def _comm_device(group: dist.ProcessGroup, tensor: torch.Tensor) -> torch.device:
    """Where the backend wants ``tensor``: NCCL the current GPU, gloo the CPU."""
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return tensor.device  # a backend per device type ("cpu:gloo,cuda:nccl") or a custom one


def _all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    device = _comm_device(group, tensor)
    moved = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def _dtensor_class() -> type | None:
    """DTensor, when the caller imported it (no DTensor can exist otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local(name: str, tensor: torch.Tensor, members: set[int]) -> torch.Tensor:
    """The tensor whose elements this rank averages: a DTensor's local shard, checked to be
    the same shard on every member of the group (else the mean would mix different shards)."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(tensor, dtensor):
        return tensor
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    for dim, placement in enumerate(tensor.placements):  # type: ignore[attr-defined]
        if not placement.is_shard():
            continue  # replicated and partial (pending-sum) placements average elementwise
        holders = set(dist.get_process_group_ranks(mesh.get_group(dim)))
        if len(holders & members) > 1:
            names = mesh.mesh_dim_names
            label = f"{dim} ({names[dim]!r})" if names else str(dim)
            raise ValueError(
                f"group: {name!r} is sharded over mesh dimension {label}, which this group "
                f"spans (ranks {sorted(holders & members)} hold different shards); average "
                "over a group across which the shards match, e.g. the replicate dimension of "
                "an HSDP mesh: group=mesh.get_group('replicate')"
            )
    return tensor.to_local()  # type: ignore[attr-defined, no-any-return]


def _writable(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a ``ValueError`` naming it where its mean cannot be written into it:
    no dense tensor with data (sparse, on the meta device), an inference tensor outside
    ``inference_mode`` (a buffer reassigned in a validation pass), elements that share memory
    (an ``expand``), or a lazy conjugate (``x.conj()``), whose values a write through its
    real view would not reach. Checked before any data moves: a failed write after the
    collective left the tensors before it averaged, those after not."""
    if tensor.layout != torch.strided or tensor.is_meta:
        what = "on the meta device (no data)" if tensor.is_meta else f"{tensor.layout}"
        raise ValueError(f"{name!r}: a tensor {what} cannot be averaged in place")
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(
            f"{name!r}: an inference tensor (made under torch.inference_mode()) cannot be "
            "written outside it; replace it with a clone made outside it"
        )
    if any(stride == 0 and size > 1 for size, stride in zip(tensor.shape, tensor.stride())):
        raise ValueError(
            f"{name!r}: several of its elements are one in memory (an expanded tensor); "
            "average a tensor of its own (.clone())"
        )
    if tensor.is_conj():  # it has no real view: the mean would go to a copy of its values
        raise ValueError(
            f"{name!r}: a lazy conjugate (x.conj()) cannot be averaged in place; resolve it "
            "first (x.resolve_conj())"
        )
    return tensor


def _first(pair: tuple[str, torch.Tensor]) -> str:
    return pair[0]


def _named_tensors(target: torch.nn.Module | Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    # Sorted by name: a module on one rank and its state dict on another, or dicts in other
    # orders, list the same tensors in the same order.
    if isinstance(target, torch.nn.Module):
        # named_* skip tied duplicates and include non-persistent buffers.
        return sorted([*target.named_parameters(), *target.named_buffers()], key=_first)
    if isinstance(target, Mapping):
        return sorted(
            ((k, v) for k, v in target.items() if isinstance(v, torch.Tensor)), key=_first
        )
    raise TypeError(
        f"module_or_state_dict: expected an nn.Module or a state dict, found {type(target)}"
    )


def _plain(weights: object) -> object:
    """``weights`` as the numbers :func:`_rank_weights` checks, before they are gathered: a
    numpy scalar or a 0-d tensor or array (an accuracy from torchmetrics, say) as a float, a
    1-d one or a sequence as a list of those; an iterator, a mapping or a set (no order, or
    nothing to send) is a ``TypeError`` (raised in :func:`average_`'s checks, which every
    rank hears of); anything else as it is, for every rank to refuse alike.

    Example:
        >>> import numpy as np, torch
        >>> _plain(torch.tensor(0.5)), _plain(np.float32(2)), _plain(torch.tensor([1, 2]))
        (0.5, 2.0, [1.0, 2.0])
    """
    shape = getattr(weights, "shape", None)
    if shape is not None and len(shape) == 1 and not isinstance(weights, numbers.Number):
        weights = weights.tolist()  # type: ignore[attr-defined]
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        return [_plain(w) for w in weights]
    if shape == () and not isinstance(weights, numbers.Number):
        weights = weights.item()  # type: ignore[attr-defined]
    if is_real(weights):
        with contextlib.suppress(OverflowError):  # else refused by every rank, as the rest
            return float(weights)
    if isinstance(weights, (Iterator, Mapping, AbstractSet)):  # no order, or no pickle
        raise TypeError(
            f"weights: expected a number or a sequence of numbers, found {type_name(weights)}"
        )
    return weights


def _rank_weight(rank: int, weight: object) -> float:
    """Rank ``rank``'s own weight as a float, or a ``TypeError`` naming the rank."""
    return check_number(f"weights (rank {rank})", weight)


def _same(a: object, b: object) -> bool:
    """Whether two ranks' lists of weights agree, a NaN in both places included (which the
    checks of the weights then refuse as such)."""
    assert isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
    return len(a) == len(b) and all(x == y or (x != x and y != y) for x, y in zip(a, b))


def _rank_weights(given: Sequence[object], size: int) -> list[float] | None:
    """Every rank's ``weights`` argument, gathered: one weight per rank, or ``None``. A weight
    that is no number (:func:`~ladle.engine.check_number`: a ``bool`` neither) is a
    ``TypeError`` naming it, ``weights[i]`` in a list, ``weights (rank r)`` on its own.
    """
    if all(w is None for w in given):
        return None
    if all(isinstance(w, (list, tuple)) for w in given) and all(_same(w, given[0]) for w in given):
        found = check_numbers("weights", given[0], size, "per-rank weights (the group's size)")
    elif not any(w is None or isinstance(w, (list, tuple)) for w in given):
        found = [_rank_weight(rank, w) for rank, w in enumerate(given)]
    else:
        raise ValueError(
            "weights: every rank must pass its own weight (a float), or every rank the same "
            f"list of per-rank weights, or every rank None; found {list(given)}"
        )
    normalized_weights(found, size)  # the soup's checks: finite, a non-zero sum, in range
    return found


def _scaled(weights: Sequence[float], me: int) -> tuple[float, float]:
    """Rank ``me``'s weight and the weights' sum, both scaled by the power of two that brings
    the largest weight's magnitude into [0.5, 1).

    The reduction multiplies by the weight and divides by the sum in float32: weights far
    from 1 (2⁻¹⁶⁰, 1e39) would underflow to 0 or overflow to Inf there (a NaN mean). A power
    of two changes no digit of either, so the mean is the one of the weights as given.
    """
    _, exponent = math.frexp(max(abs(w) for w in weights))
    try:
        total = math.ldexp(math.fsum(weights), -exponent)
    except OverflowError:  # a sum past float's range ([1e308, 1e308]): scale, then add
        total = math.fsum(math.ldexp(w, -exponent) for w in weights)
    return math.ldexp(weights[me], -exponent), total


def _buckets(
    tensors: Sequence[torch.Tensor], key: Callable[[torch.Tensor], tuple]
) -> Iterator[tuple[tuple, list[torch.Tensor]]]:
    """Consecutive runs of tensors sharing ``key``, of at most BUCKET_BYTES (at least one)."""
    run: list[torch.Tensor] = []
    run_key: tuple = ()
    size = 0
    for tensor in tensors:
        k = key(tensor)
        nbytes = tensor.numel() * k[0].itemsize
        if run and (k != run_key or size + nbytes > BUCKET_BYTES):
            yield run_key, run
            run, size = [], 0
        run_key = k
        run.append(tensor)
        size += nbytes
    if run:
        yield run_key, run


def _flatten(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    offset = 0
    for tensor in tensors:
        flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
        offset += tensor.numel()
    return flat


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for tensor in tensors:  # copy_ casts back to each tensor's dtype (round to nearest)
        tensor.copy_(flat[offset : offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()


def average_(
    module_or_state_dict: Averageable,
    *,
    group: dist.ProcessGroup | None = None,
    weights: NumberLike | NumbersLike | None = None,
) -> Averageable:
    """In place, the (weighted) mean across the ranks of a process group of every floating tensor.

    ``θ ← Σᵣ wᵣ·θᵣ / Σᵣ wᵣ`` over the ranks ``r`` of ``group``, for every floating (and
    complex) parameter and buffer; afterwards every rank holds the same values. Computed with
    ``all_reduce`` in float32 (float64 stays float64) on flat buffers of at most 64 MiB, then
    cast back to each tensor's dtype. Non-floating tensors (``num_batches_tracked``, masks)
    are not averaged: rank 0's (of the group) are broadcast, as merges copy model 0's. Every
    rank must call it with the same keys, shapes and dtypes (checked: ``IncompatibleError``
    names the rank and key). The uniform soup of Wortsman et al., "Model soups", ICML 2022,
    across ranks; periodic averaging as in local SGD.

    NaN and Inf are not checked: as in :func:`ladle.weighted_sum`, a NaN or Inf on any rank
    makes those entries NaN (or Inf) on every rank, even on a rank of weight 0 (``0·NaN``
    is NaN; a weight of 0 is a weight, as in the merge methods, which refuse a NaN in a
    model of weight 0). To leave a rank out, zero its floating tensors before the call: it
    then adds exact zeros, and receives the others' mean.

    DTensor (FSDP2 ``fully_shard``, tensor parallel): each rank averages its local shard,
    which is right when every rank of ``group`` holds the same shard of each tensor, e.g. the
    replicate dimension of an HSDP mesh (``group=mesh.get_group("replicate")``); a tensor
    sharded over a mesh dimension that ``group`` spans raises ``ValueError`` (its ranks hold
    different shards). Replicated and partial placements average elementwise as they are.

    Args:
        module_or_state_dict: an ``nn.Module`` (its parameters and buffers, tied ones once)
            or a mutable mapping of names to tensors, modified in place.
        group: the process group; default the whole world.
        weights: ``None`` for the plain mean; a number, this rank's weight (ranks pass
            different numbers); or a list with one weight per rank of ``group``, the same on
            every rank. Normalised by their sum, which must be finite and non-zero. Numbers
            may be numpy scalars or 0-d tensors (a metric's value), a list a 1-d tensor.

    Returns:
        ``module_or_state_dict``, averaged.

    Example:
        >>> import tempfile, torch, torch.distributed as dist
        >>> from ladle.distributed import average_
        >>> dist.init_process_group(  # torchrun does this for you, one process per rank
        ...     "gloo", init_method=f"file://{tempfile.mkdtemp()}/rdv", rank=0, world_size=1)
        >>> model = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(3.0)
        >>> average_(model, weights=0.5).weight  # the mean over the one rank of this example
        Parameter containing:
        tensor([[3., 3.]], requires_grad=True)
        >>> dist.destroy_process_group()
    """
    world = _world(group)
    size, me = dist.get_world_size(world), dist.get_rank(world)
    members = set(dist.get_process_group_ranks(world))
    failed: Exception | None = None
    try:
        named = [
            (n, _writable(n, _local(n, t, members)))
            for n, t in _named_tensors(module_or_state_dict)
        ]
        signature = [
            (n, tuple(t.shape), str(t.dtype), _comm_device(world, t).type) for n, t in named
        ]
        shown = _plain(weights)
    except Exception as err:  # this rank alone: the others must hear of it, not wait for it
        failed, named, signature, shown = err, [], [], None
    problem = None if failed is None else f"{type(failed).__name__}: {failed}"
    given: list[Any] = [None] * size
    dist.all_gather_object(given, (signature, shown, problem), group=world)
    if failed is not None:
        try:
            raise failed
        finally:  # as in merge: no cycle through this frame (it holds the group) and the error
            failed = None
    for rank, (theirs, _, trouble) in enumerate(given):
        if trouble is not None:
            raise LadleError(f"rank {rank} of the group could not average: {trouble}")
        if theirs != signature:
            raise IncompatibleError(_first_difference(signature, theirs, me, rank))
    per_rank = _rank_weights([w for _, w, _ in given], size)
    mine, total = (1.0, float(size)) if per_rank is None else _scaled(per_rank, me)

    floating = [real_view(t) for _, t in named if is_merged_dtype(t.dtype)]
    others = [t for _, t in named if not is_merged_dtype(t.dtype)]
    with torch.no_grad():
        for (dtype, device), run in _buckets(
            floating,
            lambda t: (
                torch.float64 if t.dtype == torch.float64 else torch.float32,
                _comm_device(world, t),
            ),
        ):
            flat = _flatten(run, dtype, device)
            if mine != 1.0:
                flat.mul_(mine)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=world)
            _unflatten_into(flat.div_(total), run)
        source = dist.get_global_rank(world, 0)
        for (dtype, device), run in _buckets(
            others, lambda t: (_BROADCAST_DTYPES.get(t.dtype, t.dtype), _comm_device(world, t))
        ):
            flat = _flatten(run, dtype, device)  # cast: exact, and cast back exactly
            dist.broadcast(flat, src=source, group=world)
            _unflatten_into(flat, run)
    return module_or_state_dict


_BROADCAST_DTYPES = {
    torch.bool: torch.uint8,
    torch.int16: torch.int32,
    torch.uint16: torch.int32,
    torch.uint32: torch.int64,
    torch.uint64: torch.int64,  # the same bits, cast back to the same value
}
"""Non-floating dtypes gloo cannot broadcast, and the dtype each travels in instead."""


def _first_difference(mine: list[tuple], theirs: list[tuple], me: int, rank: int) -> str:
    names, other = {e[0]: e for e in mine}, {e[0]: e for e in theirs}
    missing = [n for n in names if n not in other]
    extra = [n for n in other if n not in names]
    if missing or extra:
        return (
            f"average_: rank {rank}'s tensors differ from rank {me}'s: "
            f"{len(missing)} missing {missing[:3]}, {len(extra)} extra {extra[:3]}"
        )
    for name, entry in names.items():
        if other[name] != entry:
            return (
                f"average_: key {name!r} has shape {entry[1]}, {entry[2]} ({entry[3]}) on rank "
                f"{me}, but {other[name][1]}, {other[name][2]} ({other[name][3]}) on rank {rank}"
            )
    return f"average_: rank {rank} lists the tensors in a different order than rank {me}"


# --- merging across processes -----------------------------------------------------------------


def split_by_bytes(sizes: Mapping[str, int], parts: int) -> list[list[str]]:
    """Split keys, in order, into ``parts`` contiguous runs of about equal bytes.

    Key ``k`` goes to part ``⌊(start + size/2)·parts / total⌋``: the part whose share of the
    byte range holds the key's midpoint. Deterministic (integer arithmetic), so every rank
    computes the same split; each part's bytes are within the largest key's of
    ``total/parts``, and parts may be empty when keys are few or very uneven.

    Args:
        sizes: bytes of each key, in the order to keep.
        parts: how many runs (the number of ranks).

    Returns:
        ``parts`` lists of keys; concatenated, they are the keys of ``sizes`` in order.

    Example:
        >>> split_by_bytes({"a": 100, "b": 100, "c": 50, "d": 150}, 2)
        [['a', 'b'], ['c', 'd']]
    """
    if isinstance(parts, bool) or not isinstance(parts, numbers.Integral):
        raise TypeError(f"parts: expected an int, found {type_name(parts)}")
    if parts < 1:
        raise ValueError(f"parts: expected at least 1, found {parts}")
    if not isinstance(sizes, Mapping):
        raise TypeError(f"sizes: expected a mapping of keys to bytes, found {type_name(sizes)}")
    for key, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"sizes[{key!r}]: expected bytes (an int), found {type_name(size)}")
        if size < 0:
            raise ValueError(f"sizes[{key!r}]: expected at least 0 bytes, found {size}")
    parts = int(parts)
    counts = [int(size) for size in sizes.values()]
    if sum(counts) == 0:  # only empty tensors: split by count instead
        counts = [1] * len(counts)
    total = sum(counts)
    split: list[list[str]] = [[] for _ in range(parts)]
    start = 0
    for key, size in zip(sizes, counts):
        split[min(parts - 1, (2 * start + size) * parts // (2 * total))].append(key)
        start += size
    return split


class _ShardWriter:
    """Write ``specs``, in order, as shards ``PREFIX-00000.safetensors``, ... of at most
    ``max_shard_size`` in ``directory``; each shard is a :class:`SafetensorsWriter` (written
    under a temporary name, re-read, renamed), then ``extra_files`` are written."""

    def __init__(
        self,
        directory: Path,
        prefix: str,
        specs: Mapping[str, Spec],
        *,
        metadata: Mapping[str, str],
        max_shard_size: int | str,
        extra_files: Mapping[str, bytes | str | os.PathLike] | None,
        empty_shard: bool,
    ) -> None:
        self._specs = dict(specs)
        plan = _plan_shards(self._specs, parse_size(max_shard_size))
        self._shards = plan if self._specs or empty_shard else []
        self.files = [directory / f"{prefix}-{j:05d}.safetensors" for j in range(len(self._shards))]
        self._shard_of = {key: j for j, keys in enumerate(self._shards) for key in keys}
        self._metadata, self._extra, self._directory = metadata, extra_files or {}, directory
        self._name = directory / f"{prefix}-*.safetensors"  # in errors
        self._open: SafetensorsWriter | None = None
        self._next = 0
        self._ended: str | None = None  # "committed" or "aborted", as SafetensorsWriter says

    @property
    def weight_map(self) -> dict[str, str]:
        return {key: self.files[j].name for key, j in self._shard_of.items()}

    def _advance(self) -> None:
        if self._open is not None:
            self._open.commit()
            self._open = None
        keys = self._shards[self._next]
        self._open = SafetensorsWriter(
            self.files[self._next], {k: self._specs[k] for k in keys}, metadata=self._metadata
        )
        self._next += 1

    def write(self, key: str, chunk: torch.Tensor) -> None:
        if self._ended is not None:  # else a new shard would be begun, or nothing be open
            raise LadleError(
                f"writer for {self._name}: write({key!r}) on a writer {_ENDED[self._ended]}"
            )
        while self._next <= self._shard_of[key]:
            self._advance()
        assert self._open is not None
        self._open.write(key, chunk)

    def amend(self, key: str, index: torch.Tensor, values: torch.Tensor) -> None:
        # Shards are committed as the merge goes; methods sum what amend would need across
        # processes before their merge pass instead (TIES's majority vote).
        raise LadleError(f"{key!r}: a merge split across processes cannot amend written tensors")

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._ended = "aborted"  # until every shard is committed
        try:
            if exc_type is None:
                while self._next < len(self._shards):
                    self._advance()
                if self._open is not None:
                    self._open.commit()
                    self._open = None
                write_extra_files(self._directory, self._extra)
                self._ended = "committed"
        finally:
            if self._open is not None:
                self._open.abort()
                self._open = None


class _OtherRankFailed(LadleError):
    """Raised on a rank that learns, at a reduction, that another rank's merge failed."""


class _Share:
    """This rank's share of a split merge (an :class:`ladle.engine.Partition`).

    Every reduction a method asks for is preceded by a reduction of a failure flag, and
    :func:`merge` ends with one: a rank whose merge fails sends its flag (1) in place of the
    reduction the others wait in, so that they stop there (:class:`_OtherRankFailed`)
    instead of waiting until the process group's timeout, and every rank meets in the
    exchange of reports.
    """

    def __init__(self, group: dist.ProcessGroup, directory: Path, out: Path) -> None:
        self.group, self.directory, self.out = group, directory, physical_path(out)
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.specs: dict[str, Spec] = {}
        self.used = False
        self.stopped = False  # another rank failed: learnt at a flag, which is then spent

    def writes(self, out: str | os.PathLike | None) -> bool:
        return out is not None and physical_path(out) == self.out

    def keys(self, reference: Checkpoint) -> list[str]:
        sizes = {key: reference.nbytes(key) for key in reference.keys()}
        return split_by_bytes(sizes, self.size)[self.rank]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.flag(0):
            self.stopped = True
            raise _OtherRankFailed("another rank's merge failed")
        return _all_reduce_sum(tensor, self.group)

    def flag(self, failed: int) -> int:
        """Sum every rank's failure flag (0 or 1): how many ranks failed."""
        return int(_all_reduce_sum(torch.tensor([failed], dtype=torch.int64), self.group))

    def writer(
        self,
        out: Path,
        specs: Mapping[str, Spec],
        *,
        keys: Sequence[str],
        metadata: Mapping[str, str],
        extra_files: Mapping[str, bytes | str | os.PathLike] | None,
        max_shard_size: int | str,
    ) -> _ShardWriter:
        if self.used:  # its shards would take the names of the first merge's
            raise LadleError(
                f"{out}: a split merge writes its output once; the method merged into it twice"
            )
        self.used, self.specs = True, dict(specs)
        writer = _ShardWriter(
            self.directory,
            f"rank{self.rank:05d}",
            {key: specs[key] for key in keys},
            metadata=metadata,
            max_shard_size=max_shard_size,
            extra_files=extra_files if self.rank == 0 else None,
            empty_shard=self.rank == 0 and not specs,  # an empty model is one empty file
        )
        self.files, self.weight_map = [f.name for f in writer.files], writer.weight_map
        return writer


def _method(method: str | Callable[..., Any], params: Mapping[str, object]) -> Callable[..., Any]:
    if isinstance(method, str):
        name = method.replace("-", "_")  # read as recipes read it: "task-arithmetic", "soup"
        name = ALIASES.get(name, name)
        named = {**METHODS, "greedy_soup": greedy_soup}  # greedy_soup: refused below, saying why
        if name not in named:
            known = sorted([*METHODS, *(a for a, m in ALIASES.items() if m in METHODS)])
            raise ValueError(
                f"method: expected one of {known} or a merge function, found {method!r}"
            )
        method = named[name]
    if not callable(method):
        raise ValueError(f"method: expected a merge function or its name, found {method!r}")
    inner, keywords = method, dict(params)  # merge's keywords, then each partial's below them
    while isinstance(inner, functools.partial):  # partial(greedy_soup, evaluate=...)
        keywords = {**inner.keywords, **keywords}
        inner = inner.func
    name = getattr(inner, "__name__", "")
    if name == "greedy_soup" or (name == "ratatouille" and keywords.get("selection") == "greedy"):
        raise ValueError(
            f"method: {name} with greedy selection evaluates whole soups and cannot be split "
            "across processes; run it in one process"
        )
    return method


def _source(group: dist.ProcessGroup) -> int:
    return dist.get_global_rank(group, 0)


def _shared_temporary(
    out: Path | None,
    group: dist.ProcessGroup,
    problem: str | None,
    commits: Mapping[str, str] | None = None,
    folders: list[Path] | None = None,
    arguments: Mapping[str, object] | None = None,
) -> Path | str:
    """Rank 0 makes the temporary directory beside ``out``; in one gather, every rank learns
    its name, whether a rank failed before (its ``problem``: its own arguments, a device
    it lacks, an ``hf://`` source it cannot fetch), so that none waits for a rank that will
    not come, and whether every rank found the same commit of each ``hf://`` source
    (``commits``: each URL's name at the commit this rank found), and whether every rank
    was given the same ``arguments`` (:func:`_arguments`; ``None`` where this rank failed).

    Returns the directory, or else, on every rank alike, ``"rank R: ..."`` naming the first
    rank that failed (rank 0, should it fail to make the directory) or found another commit
    than rank 0. Then, and should the others not learn the name (a rank gone or timed out,
    Ctrl-C), rank 0 deletes it, and the folders it made above ``out``. Those are put in
    ``folders`` (deepest first), for rank 0 to remove should the merge write nothing.
    """
    made: Path | None = None
    folders = [] if folders is None else folders
    if dist.get_rank(group) == 0 and out is not None:  # None where this rank failed
        try:
            folders[:] = [f for f in (out.parent, *out.parent.parents) if not os.path.lexists(f)]
            out.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(out)
            made = _temporary_beside(out)
            made.mkdir()
        except OSError as err:
            _discard(None, folders)
            made = None
            problem = f"{out}: cannot make the temporary directory beside it ({err})"
    given: list[Any] = [None] * dist.get_world_size(group)
    try:
        mine = (problem, None if made is None else str(made), dict(commits or {}), arguments)
        dist.all_gather_object(given, mine, group=group)
    except BaseException:
        _discard(made, folders)
        raise
    troubles = [(r, trouble) for r, (trouble, *_) in enumerate(given) if trouble is not None]
    if not troubles:
        troubles = _other_commits([found for _, _, found, _ in given])
    if not troubles:
        troubles = _other_arguments([theirs for *_, theirs in given])
    if troubles:
        _discard(made, folders)
        rank, trouble = troubles[0]
        return f"rank {rank}: {trouble}"
    return Path(given[0][1])


def _arguments(
    method: object, models: Sequence[object], out: object, params: Mapping[str, object]
) -> dict[str, object]:
    """What a split merge was asked, comparable across processes: the method, each model,
    the output and each parameter (but ``device``, each rank's own, and ``progress``), as
    :func:`_described`. Ranks given other arguments would each merge their share of
    another merge into one output."""
    described = {"method": _described(method), "out": _described(out, path=True)}
    described |= {f"models[{i}]": _described(m, path=True) for i, m in enumerate(models)}
    described |= {
        repr(name): _described(value, path=name == "base")
        for name, value in sorted(params.items())
        if name not in ("device", "progress")
    }
    return described


def _described(value: object, *, path: bool = False) -> object:
    """``value`` as another process can compare it (by its ``repr``): a model's, the base's
    or the output's local ``path`` resolved (relative ones differ with the working
    directory), an opened checkpoint by its resolved path (an in-memory one by its keys,
    shapes and dtypes), a state dict or module by its keys, shapes and dtypes (not its
    numbers), a function by its name (a ``functools.partial`` with its arguments), a small
    tensor or array by its values, other strings and numbers (numpy scalars included) as
    they are, anything else by its type.

    Example:
        >>> import torch
        >>> _described({"w": torch.ones(2)}), _described([0.5, torch.tensor(0.5)])
        (('state dict', (('w', (2,), 'torch.float32'),)), (0.5, ('tensor', 0.5)))
    """
    if isinstance(value, (str, os.PathLike)):
        text = os.fsdecode(value)
        return os.path.realpath(text) if path and not text.startswith("hf://") else text
    if isinstance(value, torch.nn.Module):
        return (type(value).__name__, _described(value.state_dict()))
    if isinstance(value, torch.Tensor):
        return ("tensor", value.tolist() if value.numel() <= 64 else tuple(value.shape))
    if isinstance(value, Mapping):
        if all(isinstance(v, torch.Tensor) for v in value.values()):
            specs = ((str(k), tuple(v.shape), str(v.dtype)) for k, v in value.items())
            return ("state dict", tuple(specs))
        return tuple((str(k), _described(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_described(v, path=path) for v in value)
    if isinstance(value, Checkpoint):
        if value.path is not None:
            return ("checkpoint", os.path.realpath(value.path))
        specs = ((k, tuple(value.shape(k)), str(value.dtype(k))) for k in value.keys())
        return ("checkpoint", value.name, tuple(specs))
    if isinstance(value, np.ndarray):
        return ("array", value.tolist() if value.size <= 64 else tuple(value.shape))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, functools.partial):
        keywords = tuple((k, _described(v)) for k, v in sorted(value.keywords.items()))
        return ("partial", _described(value.func), _described(value.args), keywords)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if value is None or isinstance(value, numbers.Number):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    return type(value).__name__


def _other_arguments(given: Sequence[Mapping[str, object] | None]) -> list[tuple[int, str]]:
    """Each rank given other arguments than rank 0 (``given``: each rank's :func:`_arguments`),
    with the first that differs.

    Example:
        >>> [(rank, said)] = _other_arguments([{"'density'": 0.2}, {"'density'": 0.9}])
        >>> rank, said.split(";")[0]
        (1, "its arguments differ from rank 0's: 'density' is 0.9, rank 0's 0.2")
    """
    if given[0] is None:
        return []
    first = given[0]
    found = []
    for rank, theirs in enumerate(given[1:], start=1):  # by repr: NaN is NaN here
        if theirs is None or repr(theirs) == repr(first):
            continue
        name = next(
            (
                n
                for n in [*first, *theirs]
                if repr(first.get(n, _ABSENT)) != repr(theirs.get(n, _ABSENT))
            ),
            "?",
        )
        found.append(
            (
                rank,
                f"its arguments differ from rank 0's: {name} is "
                f"{_shown(theirs.get(name, _ABSENT))}, rank 0's {_shown(first.get(name, _ABSENT))}"
                "; every rank calls ladle.distributed.merge with the same arguments",
            )
        )
    return found


_ABSENT = "(not given)"


def _shown(value: object) -> str:
    """A described argument, shortened for a message."""
    text = value if isinstance(value, str) else repr(value)  # a path whole, however long
    return text if isinstance(value, str) or len(text) <= 200 else text[:197] + "..."


def _discard(directory: Path | None, folders: Sequence[Path]) -> None:
    """What rank 0 made for a split merge that writes nothing: the temporary ``directory``
    (if any), then the ``folders`` made above the output, deepest first (one that something
    else put a file in stays), as a merge in one process takes its own away."""
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _other_commits(found: Sequence[Mapping[str, str]]) -> list[tuple[int, str]]:
    """Each rank that found another commit of an ``hf://`` source than rank 0 (``found``: each
    rank's URL -> name at its commit), with what it found: where ranks read different commits
    of one repository, a split merge would mix them in one output.

    Example:
        >>> a, b = "hf://org/m@" + "a" * 40, "hf://org/m@" + "b" * 40
        >>> _other_commits([{"hf://org/m": a}, {"hf://org/m": a}, {"hf://org/m": b}])[0][0]
        2
    """
    return [
        (
            rank,
            f"{url} is {name}, where rank 0 found {found[0][url]} (the branch moved between "
            "their fetches, or their Hugging Face caches differ); name the commit to read: "
            f"{found[0][url]}",
        )
        for rank, names in enumerate(found)
        for url, name in names.items()
        if found[0].get(url, name) != name
    ]


def _local_paths(sources: Iterable[object]) -> list[tuple[str, list[Path]]]:
    """The sources given as local paths (not ``hf://``): each named, with its path resolved."""
    names = [os.fspath(s) for s in sources if isinstance(s, (str, os.PathLike))]
    return [
        (name, [Path(name).resolve()])
        for name in names
        if isinstance(name, str) and not name.startswith(HUB_PREFIX)
    ]


def _check_out(out: str | os.PathLike | None, *, split: bool = False) -> None:
    """Check ``out``: given, a name that means what it says, and, for a merge ``split``
    across processes, a directory (ranks write separate shards)."""
    if out is None:
        raise ValueError(
            "out: ladle.distributed.merge writes its result to disk (a directory of shards "
            "when split across processes); pass out=PATH"
        )
    check_output_name(out)
    if split and single_file(out):
        raise ValueError(
            f"out: a merge split across processes writes a directory of shards, found {out}"
        )


def _take_device(params: dict[str, Any]) -> None:
    """This rank's ``device`` in ``params``: ``cuda:LOCAL_RANK`` when CUDA is available and
    none is given. Checked (:func:`ladle.engine.resolve_device`), then, for a CUDA device,
    made current: NCCL's tensors (:func:`_comm_device`) go to this rank's GPU."""
    if params.get("device") is None and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        params["device"] = torch.device("cuda", local % torch.cuda.device_count())
    device = resolve_device(params.get("device"))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def _finish(
    out: Path, directory: Path, specs: Mapping[str, Spec], reports: list, overwrite: bool
) -> None:
    """Rank 0, once every rank's shards are in ``directory``: names, index, rename."""
    files = [name for _, names, _ in reports for name in names]
    final = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    )
    renamed = dict(zip(files, final))
    for old, new in renamed.items():
        os.replace(directory / old, directory / new)
    if len(files) > 1:
        where: dict[str, str] = {}
        for _, _, weight_map in reports:
            where.update(weight_map)
        total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
        weight_map = {key: renamed[where[key]] for key in specs if key in where}
        write_index_file(directory, total, weight_map)
    rename_into_place(directory, out, overwrite=overwrite)


def merge(
    method: str | Callable[..., Any],
    models: Sequence[StateDictLike],
    *,
    out: str | os.PathLike,
    group: dist.ProcessGroup | None = None,
    **params: Any,
) -> Path:
    """Run a merge method split across the ranks of a process group, e.g. under ``torchrun``.

    Every rank calls it with the same arguments. The keys of the reference (the base, else
    model 0) are split into contiguous runs of about equal bytes (:func:`split_by_bytes`);
    each rank merges its run with the method's own per-key math, streaming, on
    ``cuda:LOCAL_RANK`` when CUDA is available and ``device`` is not given, and writes its
    shards into a temporary directory beside ``out``; after every rank is done, rank 0 names
    the shards ``model-0000i-of-0000n.safetensors``, writes ``model.safetensors.index.json``
    (and the config/tokenizer files and model card of a single-process merge), and renames
    the directory to ``out``: ``out`` appears only complete. Statistics that span keys are
    combined with collectives: TIES ``trim="global"`` sums its radix-select histograms, entry
    counts and majority votes with ``all_reduce`` (DARE ``combine="ties"`` its votes); Model
    Stock's angles are per key. Loading ``out`` gives the tensors of the single-process
    merge, bit for bit (on the same kind of device). An error on any rank is raised on every
    rank (``"rank R: ..."`` on the others) and leaves nothing at ``out``. Only rank 0 shows a
    progress bar (of its own share).

    Without an initialised process group, or with one rank, this is ``method(models,
    out=out, **params)``.

    Args:
        method: a merge function (``ladle.ties``) or its name (``"ties"``, ``"model_stock"``,
            ``"uniform_soup"``, ``"task_arithmetic"``, ``"dare"``, ``"ratatouille"``), also
            as recipes and the CLI write it (``"soup"``, ``"stock"``, ``"task-arithmetic"``);
            not greedy soups, which evaluate whole models.
        models: the models, as for the method; paths every rank can read.
        out: the output directory, on a filesystem every rank sees (not a single
            ``.safetensors`` file: ranks write separate shards).
        group: the process group; default the whole world.
        **params: the method's other arguments (``base=``, ``density=``, ``device=``, ...).

    Returns:
        ``out``, on every rank.

    Example:
        A script ``merge.py``, run with ``torchrun --nproc-per-node 2 merge.py``::

            import torch.distributed as dist, ladle.distributed
            dist.init_process_group("gloo")  # "nccl" on GPUs
            ladle.distributed.merge("ties", ["a", "b"], base="base", out="merged")
            dist.destroy_process_group()

        Without a process group it is the plain merge:

        >>> import tempfile, torch, ladle
        >>> a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
        >>> out = ladle.distributed.merge("uniform_soup", [a, b], out=tempfile.mkdtemp() + "/m")
        >>> ladle.load(out)
        {'w': tensor([2., 4.])}
    """
    _check_group(group)  # also where it would go unused: no process group, one rank
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        function = _method(method, params)
        _check_out(out)
        return Path(function(models, out=out, **params))
    world = _world(group)
    rank, size = dist.get_rank(world), dist.get_world_size(world)
    early: Exception | None = None
    snapshots: dict[str, tuple[Path, str]] = {}
    try:  # this rank's own arguments, device and hf:// sources, before the first collective
        function = _method(method, params)
        _check_out(out, split=True)
        _take_device(params)
        check_models(models)  # iterable, then
        snapshots = fetched([*models, params.get("base")])
        # Before rank 0 deletes the leftovers beside out: no input among them (each rank
        # checks again once the method opens its inputs).
        destination = Destination(out)
        for name, paths in _local_paths([*models, params.get("base")]):
            destination.check(reads_of(name, paths))
    except Exception as err:  # this rank alone: the others must hear of it, not wait for it
        early = err
    if rank != 0 and "progress" in params:  # bars on rank 0 alone; a method of one's
        params["progress"] = None  # own need not take the parameter
    problem = None if early is None else one_line(early)
    commits = {url: name for url, (_, name) in snapshots.items()}
    folders: list[Path] = []  # made above out by rank 0, removed should nothing be written
    arguments = _arguments(method, models, out, params) if early is None else None
    directory = _shared_temporary(
        Path(out) if early is None else None, world, problem, commits, folders, arguments
    )
    if early is not None:
        try:
            raise early
        finally:
            early = None  # as at the end: no cycle through this frame holds the group
    if isinstance(directory, str):
        raise LadleError(directory)
    out = Path(out)
    share = _Share(world, directory, out)
    error: Exception | None = None
    try:
        if not directory.is_dir():
            raise LadleError(
                f"{out}: rank 0's temporary directory {directory} is not visible on rank "
                f"{rank}; the output must be on a filesystem every rank sees"
            )
        with partitioned(share), contextlib.ExitStack() as opened:
            # Every rank reads the commits compared above: no rank asks the Hub again.
            if "base" in params:
                params["base"] = pinned(params["base"], snapshots, opened)
            function([pinned(m, snapshots, opened) for m in models], out=out, **params)
        if not share.used:
            raise LadleError(
                f"method: {getattr(function, '__name__', function)} did not write through "
                "ladle.engine.merge, so it cannot be split across processes"
            )
    except Exception as err:  # every rank learns of it before anything is renamed
        error = err
    except BaseException:  # Ctrl-C reaches every rank: rank 0 removes the shared output
        if rank == 0:
            _discard(directory, folders)
        raise
    try:  # until every rank knows the outcome; then only rank 0 touches the output
        if not share.stopped:  # the flag the others' next reduction (or this one) waits for
            share.flag(int(error is not None))
        own = error if not share.stopped else None  # a rank stopped by another reports nothing
        reports: list[Any] = [None] * size
        mine = None if own is None else one_line(own)
        dist.all_gather_object(reports, (mine, share.files, share.weight_map), group=world)
        failed = [(r, message) for r, (message, _, _) in enumerate(reports) if message is not None]
        finished: list[object] = [None]
        if rank == 0:
            try:
                if failed:
                    _discard(directory, folders)
                else:
                    _finish(out, directory, share.specs, reports, bool(params.get("overwrite")))
            except Exception as err:
                _discard(directory, folders)
                finished[0] = one_line(err)
                own = own or err
        dist.broadcast_object_list(finished, src=_source(world), group=world)
    except BaseException:  # Ctrl-C or a lost peer while waiting: no shards left behind
        if rank == 0:
            _discard(directory, folders)
        error = own = None  # as below: no cycle through this frame holds the group
        raise
    try:
        if own is not None:
            raise own
        if failed:
            raise LadleError(f"rank {failed[0][0]}: {failed[0][1]}")
        if finished[0] is not None:
            raise LadleError(f"rank 0: {finished[0]}")
        return out
    finally:
        # The error's traceback holds this frame, which holds the process group: were the
        # frame to hold the error too (a cycle, freed only by the garbage collector), the
        # group would outlive destroy_process_group, and with it gloo's worker threads, which
        # abort the process when they drop a collective's tensors while Python shuts down.
        error = own = None


GROUP_TIMEOUT = datetime.timedelta(hours=4)
"""How long a rank of the group the CLI makes under ``torchrun`` waits in a collective."""


@contextlib.contextmanager
def _torchrun_group() -> Iterator[int]:
    """The process group of a ``torchrun`` launch (NCCL with CUDA, else gloo); yields the rank.

    An existing default group is used as is; one made here is destroyed on leaving.
    """
    if dist.is_initialized():
        yield dist.get_rank()
        return
    if torch.cuda.is_available():  # the GPU _take_device gives this rank (a process may see one)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    # Ranks that finish their share first wait in a collective for the slowest: longer than
    # NCCL's default of 10 minutes (gloo's 30) where the storage is slower for some nodes.
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=GROUP_TIMEOUT)
    try:
        yield dist.get_rank()
    except BaseException as err:
        _release_frames(err)
        raise
    finally:
        dist.destroy_process_group()


def _release_frames(error: BaseException) -> None:
    """Clear the local variables of the finished frames in ``error``'s tracebacks (and its
    causes'), so that none keeps the process group alive past ``destroy_process_group``.

    The group's worker threads stop only when the group is freed. One left running when
    the interpreter shuts down (the group held by a frame of a failed merge, in a reference
    cycle or in the error the CLI is about to print) is ended there as it drops a finished
    collective's tensors, which takes the GIL: ``terminate called without an active
    exception``, SIGABRT. The lines of the traceback stay; frames still running are kept.
    """
    seen: set[int] = set()
    pending = [error]
    while pending:
        found = pending.pop()
        if id(found) not in seen:
            seen.add(id(found))
            traceback.clear_frames(found.__traceback__)
            pending += [e for e in (found.__cause__, found.__context__) if e is not None]
