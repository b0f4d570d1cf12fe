"""Checkpoints: a lazy, read-only state dict over any source.

A :class:`Checkpoint` answers ``keys()``, ``shape(key)`` and ``dtype(key)`` without reading
tensor data, and reads a tensor (``get``) or a range of its rows (``get_slice``) on demand.
Safetensors files are memory-mapped; torch files are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import math
import mmap
import os
import pickle
import pickletools
import re
import resource
import struct
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, UnsafeCheckpointError, one_line, type_name

__all__ = ["Checkpoint", "StateDict", "StateDictLike", "load", "open_checkpoint"]

T = TypeVar("T")
C = TypeVar("C", bound="Checkpoint")  # a subclass's with-statement gives the subclass

StateDict = dict[str, torch.Tensor]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})
"""Errors stating a path that say it names nothing (as ``Path.exists`` reads them); any other
(no permission on a folder above it, a name too long, an I/O error) makes it unreadable."""

NOT_WEIGHTS = (  # torch files that trainers save beside the weights (fnmatch patterns)
    "training_args.bin",
    "optimizer.*",
    "scheduler.*",
    "scaler.*",
    "rng_state*",
)


def is_trainer_state(name: str) -> bool:
    """Whether file ``name`` (its last part) is a trainer's state saved beside the weights
    (:data:`NOT_WEIGHTS`), not weights.

    Example:
        >>> is_trainer_state("ckpt/optimizer.pt"), is_trainer_state("pytorch_model.bin")
        (True, False)
    """
    last = name.rpartition("/")[2]
    return any(fnmatch.fnmatchcase(last, pattern) for pattern in NOT_WEIGHTS)


SAFETENSORS_DTYPES = {  # safetensors' dtype codes; the writer uses the inverse
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    # Codes of newer safetensors releases (0.8 reads and writes them); merges compute complex
    # tensors as their real and imaginary parts.
    "C64": torch.complex64,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}


class Checkpoint:
    """A lazy, read-only state dict.

    Subclasses implement ``keys`` (a list, or another collection that can be read more than
    once, of distinct ``str``), ``shape``, ``dtype`` (a ``torch.dtype``) and ``get_slice`` (a
    dense tensor of the rows asked for, in that dtype: another shape or dtype is a
    :class:`~ladle.CheckpointError`); ``get`` reads a whole tensor. Tensors returned may be views
    of a memory map of the file (a private one: a write changes this process's pages, not
    the file): treat them as inputs and never modify them in place. Merges on an accelerator
    (and on the CPU with ``prefetch``) call ``get_slice`` and ``read_rows`` from several
    reading threads at once: a subclass must allow that.

    Attributes:
        name: how error messages refer to this checkpoint (a path, or a description, which
            an output records as its input as given).
        path: the file or directory it reads, or ``None`` for in-memory sources.
        metadata: string metadata stored with the checkpoint (safetensors header), if any;
            a subclass need not set it (none is read as ``{}``).

    Example:
        >>> import tempfile, torch, ladle
        >>> path = ladle.save({"w": torch.arange(6.0).reshape(3, 2)},
        ...                   tempfile.mkdtemp() + "/model.safetensors", metadata={"note": "x"})
        >>> with ladle.open_checkpoint(path) as ckpt:  # reads the header only
        ...     print(ckpt.keys(), ckpt.shape("w"), ckpt.dtype("w"), ckpt.nbytes("w"))
        ...     print(ckpt.get_slice("w", slice(1, 3)).tolist(), ckpt.metadata["note"])
        ['w'] (3, 2) torch.float32 24
        [[2.0, 3.0], [4.0, 5.0]] x
    """

    name: str = "<checkpoint>"  # a subclass sets its own
    path: Path | None = None
    metadata: dict[str, str]  # annotated alone: a dataclass subclass may make it a field

    if not TYPE_CHECKING:  # type checkers see the attributes above, and no others

        def __getattr__(self, name: str) -> Any:
            """``metadata`` of a subclass that sets none: ``{}``, kept as its own.

            Example:
                >>> Checkpoint().metadata
                {}
            """
            if name != "metadata":
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            metadata: dict[str, str] = {}
            with contextlib.suppress(AttributeError):  # __slots__ without it: not kept
                object.__setattr__(self, "metadata", metadata)
            return metadata

    def keys(self) -> list[str]:
        """The tensors' names, in the checkpoint's order (a subclass implements it).

        Example:
            >>> import torch, ladle
            >>> ladle.open_checkpoint({"b": torch.ones(2), "a": torch.zeros(3)}).keys()
            ['b', 'a']
        """
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor ``key``, read without its data (a subclass implements it).

        Example:
            >>> import torch, ladle
            >>> ladle.open_checkpoint({"w": torch.ones(2, 3)}).shape("w")
            (2, 3)
        """
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        """The dtype of tensor ``key``, read without its data (a subclass implements it).

        Example:
            >>> import torch, ladle
            >>> ladle.open_checkpoint({"w": torch.ones(2, dtype=torch.bfloat16)}).dtype("w")
            torch.bfloat16
        """
        raise NotImplementedError

    def get_slice(self, key: str, rows: slice) -> torch.Tensor:
        """Rows ``rows`` (a slice along dimension 0) of tensor ``key``; for a 0-d tensor,
        ``rows`` is ``slice(None)``, and the tensor itself is the answer.

        Example:
            >>> import torch, ladle
            >>> ckpt = ladle.open_checkpoint({"w": torch.arange(6.0).reshape(3, 2)})
            >>> ckpt.get_slice("w", slice(1, 3)).tolist()
            [[2.0, 3.0], [4.0, 5.0]]
        """
        raise NotImplementedError

    def get(self, key: str, *, device: str | torch.device = "cpu") -> torch.Tensor:
        """The whole tensor ``key``, on ``device`` (checked as :func:`load` checks it).

        Example:
            >>> import torch, ladle
            >>> ladle.open_checkpoint({"w": torch.arange(3.0)}).get("w")
            tensor([0., 1., 2.])
        """
        return self._sliced(key, slice(None), tuple(self.shape(key))).to(_target(device))

    def _sliced(self, key: str, rows: slice, stored: tuple[int, ...]) -> torch.Tensor:
        """:meth:`get_slice`, checked to hold the rows asked for: a subclass's slice of too
        few rows was broadcast by the merges' arithmetic (its first row, repeated)."""
        # Detached: a subclass over a live module's parameters hands out tensors that require
        # grad, on which the merges' out= arithmetic raised torch's autograd error.
        tensor = self.get_slice(key, rows)
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_meta:
            # a subclass's numpy array, meta or sparse tensor failed deep in a merge's arithmetic
            if not isinstance(tensor, torch.Tensor):
                what = type_name(tensor)
            else:
                what = "a meta tensor" if tensor.is_meta else f"a {tensor.layout} tensor"
            raise CheckpointError(
                f"{self.name}: get_slice({key!r}, {rows}) gave {what}, expected a dense "
                "torch.Tensor with data"
            )
        if tensor.requires_grad:
            tensor = tensor.detach()
        expected = (len(range(*rows.indices(stored[0]))), *stored[1:]) if stored else ()
        found = tuple(getattr(tensor, "shape", ()))
        if found != expected:
            raise CheckpointError(
                f"{self.name}: get_slice({key!r}, {rows}) gave a tensor of shape {found}, "
                f"expected {expected} (rows of a tensor of shape {stored})"
            )
        declared = self.dtype(key)
        if tensor.dtype != declared:  # merged as declared, but load gave what get_slice did
            raise CheckpointError(
                f"{self.name}: get_slice({key!r}, {rows}) gave a tensor of dtype "
                f"{tensor.dtype}, expected {declared} (its dtype())"
            )
        return tensor

    def check_unchanged(self) -> None:
        """A ``CheckpointError`` where a file this checkpoint reads from changed since it was
        opened (rewritten or replaced, even at the same size: a trainer saving over it).
        Merges call it before each pass over the inputs: a pass after a rewrite would read
        other numbers than the passes before it (TIES's thresholds), or stop the process
        where the file was cut short. Tensors in memory never change.

        Example:
            >>> import tempfile, torch, ladle
            >>> path = ladle.save({"w": torch.ones(2)}, tempfile.mkdtemp() + "/m.safetensors")
            >>> with ladle.open_checkpoint(path) as ckpt:
            ...     ckpt.check_unchanged()  # as opened: nothing to say
            ...     _ = ladle.save({"w": torch.zeros(2)}, path, overwrite=True)
            ...     ckpt.check_unchanged()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ladle.errors.CheckpointError: ...m.safetensors: changed since it was opened...
        """

    def get_rows(self, key: str, rows: slice, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Rows ``rows`` of ``key`` read as ``shape``: its own shape (the default: what
        :meth:`get_slice` gives) or its own with leading dimensions merged, whose rows are
        pieces of its rows (how a merge reads a tensor one row of which exceeds a chunk:
        :func:`ladle.engine.chunk_shape`). This default reads the stored rows that hold
        them with :meth:`get_slice` and views them as ``shape``; where their strides cannot be
        merged (a transposed or permuted tensor in memory), only the rows asked for are
        copied, never the whole tensor. Safetensors files read the rows alone; a subclass
        whose ``get_slice`` reads from storage reads such a stored row once per chunk in it
        unless it overrides this method.

        Example:
            >>> import torch, ladle
            >>> ckpt = ladle.open_checkpoint({"w": torch.arange(8.0).reshape(2, 2, 2)})
            >>> ckpt.get_rows("w", slice(1, 3), (4, 2)).tolist()  # rows of a (4, 2) view
            [[2.0, 3.0], [4.0, 5.0]]
        """
        check_rows(rows)
        stored = tuple(self.shape(key))  # a subclass may answer a list
        if shape is None or tuple(shape) == stored:
            return self._sliced(key, rows, stored)
        check_reshape(key, stored, tuple(shape))
        return _merged_rows(partial(self._sliced, key, stored=stored), stored, rows, tuple(shape))

    def read_rows(
        self, key: str, rows: slice, into: torch.Tensor, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Rows ``rows`` of ``key`` (read as ``shape``, see :meth:`get_rows`), read into the
        bytes of ``into`` (a flat uint8 CPU tensor) where the source is a safetensors file;
        other sources (tensors in memory, torch files) return their own view and leave
        ``into`` untouched (the caller tells by comparing storages). ``into`` must hold the
        rows.

        Example:
            >>> import tempfile, torch, ladle
            >>> path = ladle.save({"w": torch.arange(4.0)}, tempfile.mkdtemp() + "/m.safetensors")
            >>> into = torch.empty(16, dtype=torch.uint8)
            >>> with ladle.open_checkpoint(path) as ckpt:
            ...     rows = ckpt.read_rows("w", slice(1, 3), into)
            >>> rows.tolist(), rows.untyped_storage().data_ptr() == into.data_ptr()
            ([1.0, 2.0], True)
        """
        return self.get_rows(key, rows, shape)

    def map_rows(
        self, key: str, rows: slice, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor | None:
        """Rows ``rows`` of ``key`` (read as ``shape``, see :meth:`get_rows`) as a view of the
        file's pages in the page cache (no copy), or ``None`` where the source cannot give
        one. Never write to it.

        Example:
            >>> import tempfile, torch, ladle
            >>> path = ladle.save({"w": torch.arange(4.0)}, tempfile.mkdtemp() + "/m.safetensors")
            >>> with ladle.open_checkpoint(path) as ckpt:
            ...     print(ckpt.map_rows("w", slice(2, None)).tolist())
            ...     ckpt.release("w")  # done with the view
            [2.0, 3.0]
            >>> print(ladle.open_checkpoint({"w": torch.ones(2)}).map_rows("w", slice(None)))
            None
        """
        check_rows(rows)
        return None

    def release(self, key: str) -> None:
        """Let go of this process's view of tensor ``key``'s pages (:meth:`map_rows`); a later
        read maps them again. Sources without views ignore it.

        Example:
            >>> import torch, ladle
            >>> ladle.open_checkpoint({"w": torch.ones(2)}).release("w")  # no view: nothing
        """

    def files(self) -> dict[str, Path]:
        """The file holding each tensor (shards of a sharded checkpoint); empty in memory.

        Example:
            >>> import tempfile, torch, ladle
            >>> path = ladle.save({"w": torch.ones(2)}, tempfile.mkdtemp() + "/m.safetensors")
            >>> with ladle.open_checkpoint(path) as ckpt:
            ...     ckpt.files() == {"w": path}, ckpt.file_sizes() == {path: path.stat().st_size}
            (True, True)
        """
        return {}

    def file_sizes(self) -> dict[Path, int]:
        """Each distinct file of :meth:`files` and its size in bytes. Subclasses answer
        without a pass over every key: a merge asks once per pass, and TIES's per-tensor trim
        once per tensor (a pass over every key each time made that quadratic in the keys).

        Example:
            >>> import torch, ladle
            >>> ladle.open_checkpoint({"w": torch.ones(2)}).file_sizes()  # in memory: no files
            {}
        """
        return {file: file.stat().st_size for file in dict.fromkeys(self.files().values())}

    def aliases(self) -> dict[str, str]:
        """Each key naming the very tensor an earlier key names (same storage, offset, shape,
        strides and dtype: tied weights, such as ``lm_head.weight`` of a model with
        ``tie_word_embeddings``) -> the first key in :meth:`keys` order that names it; keys
        naming a tensor of their own are absent. This default finds none: a safetensors file
        cannot hold one tensor twice (``save_model`` keeps one name of each).

        Example:
            >>> import torch, ladle
            >>> embed = torch.ones(4, 2)
            >>> ladle.open_checkpoint({"embed": embed, "head": embed}).aliases()
            {'head': 'embed'}
        """
        return {}

    def nbytes(self, key: str) -> int:
        """Bytes of tensor ``key`` as stored.

        Example:
            >>> import torch, ladle
            >>> ladle.open_checkpoint({"w": torch.ones(3, dtype=torch.bfloat16)}).nbytes("w")
            6
        """
        numel = 1
        for size in self.shape(key):
            numel *= size
        return numel * self.dtype(key).itemsize

    def _missing(self, key: str) -> CheckpointError:
        return CheckpointError(f"{self.name}: no tensor named {key!r}")

    def close(self) -> None:
        """Release open files. Reading tensors afterwards is a ``CheckpointError`` for
        checkpoints of files (tensors in memory stay readable); views read before stay
        valid.

        Example:
            >>> import tempfile, torch, ladle
            >>> path = ladle.save({"w": torch.ones(2)}, tempfile.mkdtemp() + "/m.safetensors")
            >>> ckpt = ladle.open_checkpoint(path)
            >>> kept = ckpt.get("w")
            >>> ckpt.close()
            >>> kept.tolist()
            [1.0, 1.0]
        """

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __contains__(self, key: object) -> bool:
        return key in set(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({len(self)} tensors)>"


# After the class, naming it itself: a "Checkpoint" string would be looked up in the module
# of each function annotated with it (typing.get_type_hints: NameError where it is not).
StateDictLike = Mapping[str, torch.Tensor] | torch.nn.Module | str | os.PathLike | Checkpoint


def check_reshape(key: str, stored: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """A ``ValueError`` where a tensor of shape ``stored`` cannot be read as ``shape`` (as
    ``reshape`` would): another number of entries, or a 0-d tensor as rows or rows as one."""
    if math.prod(shape) != math.prod(stored) or bool(shape) != bool(stored):
        raise ValueError(f"{key!r}: cannot read a tensor of shape {stored} as {shape}")


def _merged_rows(
    read: Callable[[slice], torch.Tensor],
    stored: tuple[int, ...],
    rows: slice,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """Rows ``rows`` of a tensor of shape ``stored`` read as ``shape``, its leading dimensions
    merged, from ``read(stored_rows)``: the stored rows holding them, viewed as ``shape`` where
    their strides allow, else the rows asked for alone gathered (reshaping a permuted tensor
    copies all of it, for every chunk)."""
    merged = len(stored) - len(shape) + 1  # leading dimensions merged into shape[0]
    plain = rows.step in (None, 1) and math.prod(stored) > 0  # contiguous rows of data
    if merged < 2 or stored[merged:] != shape[1:] or not plain:
        return read(slice(None)).reshape(shape)[rows]  # not such a view (or nothing to read)
    first, stop = rows.indices(shape[0])[:2]
    per_row = math.prod(stored[1:merged])  # rows of ``shape`` in a stored row
    low = first // per_row
    block = read(slice(low, max(low, -(-stop // per_row))))
    start, count = first - low * per_row, max(stop - first, 0)
    try:  # strides that merge (a contiguous tensor): a view
        return block.view(-1, *shape[1:])[start : start + count]
    except RuntimeError:  # a copy of these rows alone, found by their index in each dimension
        positions = torch.arange(start, start + count, device=block.device)
        index = torch.unravel_index(positions, block.shape[:merged])
        return block[index]


def pread_into(descriptor: int, target: memoryview, offset: int) -> int:
    """Read into ``target`` from ``offset`` of an open file, as ``os.preadv`` does (straight
    into ``target``); the bytes read, fewer at the end of the file. Where Python has no
    ``os.preadv`` (macOS before 11), ``os.pread`` of at most :data:`PREAD_MOST` bytes and a
    copy: fewer than asked there too, and the caller reads on.

    Example:
        >>> import os, tempfile
        >>> fd, name = tempfile.mkstemp()
        >>> _ = os.write(fd, b"abcdef")
        >>> buffer = bytearray(4)
        >>> pread_into(fd, memoryview(buffer), 2), bytes(buffer)
        (4, b'cdef')
        >>> os.close(fd); os.remove(name)
    """
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        return int(preadv(descriptor, [target], offset))
    data = os.pread(descriptor, min(target.nbytes, PREAD_MOST), offset)
    target.cast("B")[: len(data)] = data
    return len(data)


PREAD_MOST = 2**30
"""Most bytes :func:`pread_into` asks of ``os.pread`` at once, where Python has no
``os.preadv`` (macOS before 11): its kernel refuses reads of 2 GiB and more."""


SHELL_DTYPES = frozenset(
    [f"uint{bits}" for bits in range(1, 8)]
    + [f"int{bits}" for bits in range(1, 8)]
    + ["bits1x8", "bits2x4", "bits4x2", "bits8", "bits16"]
)
"""torch's dtypes without kernels (``torch.uint4``, ``torch.bits16``, ...), by name: reached
through ``view``, no ``clone`` or sum of them runs."""


def _wraps_tensors(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a subclass wrapping other tensors (a DTensor), by torch's mark
    of one: it has no storage of its own."""
    return hasattr(tensor, "__tensor_flatten__")


def past_int64(shape: Sequence[int]) -> str | None:
    """Why torch cannot index a tensor of ``shape`` with int64 (a side, or a contiguous
    stride, the product of the sides after one, of 2**63 or more, even with no entries: a
    side of 0 counts 1 in a stride), or ``None`` where it can.

    Example:
        >>> past_int64((0, 2**62, 4)) is None  # no entries, but a stride of 2**64
        False
        >>> past_int64((0, 2**62)) is None
        True
    """
    first_stride = math.prod(max(side, 1) for side in shape[1:])  # the largest
    if any(side >= 2**63 for side in shape) or first_stride >= 2**63:
        return (
            f"has shape {tuple(shape)}, past what torch can index (2**63 - 1): a side or the "
            "product of the sides after one"
        )
    return None


def not_a_dense_tensor(key: object, value: object) -> str | None:
    """Why ``key: value`` is no entry of a state dict that ladle reads or writes (a ``str`` key,
    a dense tensor holding data), or ``None`` where it is one.

    Example:
        >>> import torch
        >>> not_a_dense_tensor("w", torch.ones(2)) is None
        True
        >>> not_a_dense_tensor("w", 1.0)
        "expected a mapping of str to torch.Tensor, found str -> float for 'w'"
    """
    if not isinstance(key, str) or not isinstance(value, torch.Tensor):
        return (
            "expected a mapping of str to torch.Tensor, "
            f"found {type_name(key)} -> {type_name(value)} for {key!r}"
        )
    if value.layout != torch.strided or value.is_meta:
        what = "on the meta device (no data)" if value.is_meta else f"{value.layout}"
        return f"tensor {key!r} is {what}"
    if value.is_quantized:  # integer codes with scales: averaged entry by entry, a wrong model
        return f"tensor {key!r} is quantized ({value.dtype}): dequantize it first"
    if _wraps_tensors(value):
        # No storage of its own: its data pointer is an error, its values not one array.
        what = type(value).__name__
        if hasattr(value, "full_tensor"):  # a DTensor (FSDP2's fully_shard, tensor parallel)
            return (
                f"tensor {key!r} is a {what} (a shard or replica of a distributed tensor): "
                "gather it first, with .full_tensor() or torch.distributed.checkpoint's "
                "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
                "cpu_offload=True))"
            )
        return f"tensor {key!r} is a {what}, a tensor subclass wrapping other tensors"
    if value.is_nested:  # strided in layout, but no one shape
        return f"tensor {key!r} is a nested tensor"
    if str(value.dtype).removeprefix("torch.") in SHELL_DTYPES:
        return (
            f"tensor {key!r} is {value.dtype}, a dtype without torch kernels (no sums, "
            "mostly no copies): convert it first"
        )
    if isinstance(value, (torch.nn.UninitializedParameter, torch.nn.UninitializedBuffer)):
        return f"tensor {key!r} is an uninitialized parameter of a lazy module: run it once first"
    past = past_int64(value.shape)  # no entries, or strides of its own: no copy can be made
    if past is not None:
        return f"tensor {key!r} {past}"
    return None


AVERAGED_PREFIX = "module."
"""The prefix of every parameter and buffer key of a ``torch.optim.swa_utils.AveragedModel``,
whose state dict also counts the models averaged in ``n_averaged``."""


def unwrap_averaged(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The model's own tensors where ``tensors`` is the state dict of a
    ``torch.optim.swa_utils.AveragedModel`` (an ``n_averaged`` entry, every other key
    ``module.``-prefixed): the prefix stripped, ``n_averaged`` dropped; else ``tensors``.

    So an SWA or EMA average merges with plain fine-tunes of the same model, and the result
    loads into the model itself.

    Example:
        >>> import torch
        >>> swa = {"module.w": torch.ones(2), "n_averaged": torch.tensor(5)}
        >>> list(unwrap_averaged(swa)), list(unwrap_averaged({"w": torch.ones(2)}))
        (['w'], ['w'])
    """
    if "n_averaged" not in tensors or len(tensors) < 2:
        return tensors
    if not all(key.startswith(AVERAGED_PREFIX) for key in tensors if key != "n_averaged"):
        return tensors
    cut = len(AVERAGED_PREFIX)
    return {key[cut:]: value for key, value in tensors.items() if key != "n_averaged"}


def tensor_aliases(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """Each key of ``tensors`` whose tensor is exactly an earlier one's (the same storage,
    storage offset, shape, strides and dtype: an alias, not merely equal values) -> the first
    key holding it (see :meth:`Checkpoint.aliases`). Tensors without entries alias nothing.

    Example:
        >>> import torch
        >>> w = torch.ones(2, 3)
        >>> tensor_aliases([("emb", w), ("head", w), ("copy", w.clone()), ("t", w.t())])
        {'head': 'emb'}
    """
    first: dict[tuple[object, ...], str] = {}
    aliases = {}
    for key, tensor in tensors:
        if tensor.numel() == 0:  # no bytes: every empty storage may sit at address 0
            continue
        storage = tensor.untyped_storage()
        identity = (
            tensor.device,
            storage.data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
            tensor.is_conj(),  # a lazy conjugate or negative view: the same bytes, read
            tensor.is_neg(),  # as other values
        )
        holder = first.setdefault(identity, key)
        if holder != key:
            aliases[key] = holder
    return aliases


def tied_names(checkpoints: Sequence[Checkpoint]) -> dict[str, str]:
    """Each key that names one tensor with an earlier key in every one of ``checkpoints``
    (:meth:`Checkpoint.aliases`: tied weights) -> the first such key in the first
    checkpoint's key order (the base's). A merge in memory computes such a tensor once, under
    that name (:func:`first_names`); DARE draws the masks of that name, so tied keys stay
    equal; TIES's model-wide statistics count that name alone, so a tied tensor counts
    once. Keys tied in some inputs only (a fine-tune that untied them holds two tensors)
    keep their own names.

    Example:
        >>> import torch, ladle
        >>> w, v = torch.ones(2), torch.zeros(2)
        >>> tied = ladle.open_checkpoint({"emb": w, "head": w, "x": w, "y": w})
        >>> untied = ladle.open_checkpoint({"emb": v, "head": v, "x": v, "y": v.clone()})
        >>> tied_names([tied, untied])
        {'head': 'emb', 'x': 'emb'}
    """
    maps = []
    for checkpoint in checkpoints:
        aliases = checkpoint.aliases()
        if not aliases:  # no key is tied in every input (the usual case: safetensors files)
            return {}
        maps.append(aliases)
    first: dict[tuple[str, ...], str] = {}  # each group of keys tied everywhere: its first
    names = {}
    for key in checkpoints[0].keys():
        group = tuple(aliases.get(key, key) for aliases in maps)
        name = first.setdefault(group, key)
        if name != key:
            names[key] = name
    return names


class _Renamed(Checkpoint):
    """``checkpoint`` with second names for some of its tensors (``names``: each new key ->
    the key holding the tensor), as :func:`second_names` makes it, or without some of its
    keys (``hidden``), as :func:`first_names` makes it."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        names: Mapping[str, str] | None = None,
        hidden: Collection[str] = (),
    ) -> None:
        self._inner, self._names = checkpoint, dict(names or {})
        self._hidden = frozenset(hidden)
        self.name, self.path = checkpoint.name, checkpoint.path
        # a subclass of one's own may set none: the docs ask for the four methods alone
        self.metadata = dict(getattr(checkpoint, "metadata", {}))

    def __getattr__(self, attribute: str) -> Any:  # what a source kind adds (a Hub commit)
        if attribute in ("_inner", "_names", "_hidden"):  # not set yet: no recursion
            raise AttributeError(attribute)
        return getattr(self._inner, attribute)

    def _key(self, key: str) -> str:
        return self._names.get(key, key)

    def keys(self) -> list[str]:
        return [*(key for key in self._inner.keys() if key not in self._hidden), *self._names]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._inner.shape(self._key(key))

    def dtype(self, key: str) -> torch.dtype:
        return self._inner.dtype(self._key(key))

    def get_slice(self, key: str, rows: slice) -> torch.Tensor:
        return self._inner.get_slice(self._key(key), rows)

    def check_unchanged(self) -> None:
        self._inner.check_unchanged()

    def get(self, key: str, *, device: str | torch.device = "cpu") -> torch.Tensor:
        return self._inner.get(self._key(key), device=device)

    def get_rows(self, key: str, rows: slice, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return self._inner.get_rows(self._key(key), rows, shape)

    def read_rows(
        self, key: str, rows: slice, into: torch.Tensor, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        return self._inner.read_rows(self._key(key), rows, into, shape)

    def map_rows(
        self, key: str, rows: slice, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor | None:
        return self._inner.map_rows(self._key(key), rows, shape)

    def release(self, key: str) -> None:
        self._inner.release(self._key(key))

    def files(self) -> dict[str, Path]:
        files = {k: f for k, f in self._inner.files().items() if k not in self._hidden}
        return {**files, **{new: files[old] for new, old in self._names.items() if old in files}}

    def file_sizes(self) -> dict[Path, int]:
        return self._inner.file_sizes()

    def aliases(self) -> dict[str, str]:
        tied = {new: old for new, old in self._inner.aliases().items() if new not in self._hidden}
        return {**tied, **{new: tied.get(old, old) for new, old in self._names.items()}}

    def nbytes(self, key: str) -> int:
        return self._inner.nbytes(self._key(key))


def second_names(checkpoint: Checkpoint, tied: Mapping[str, str]) -> Checkpoint:
    """``checkpoint`` answering, besides its own keys, the other names ``tied`` gives to
    tensors it holds (tied weights: ``{"lm_head.weight": "model.embed_tokens.weight"}``, the
    :meth:`Checkpoint.aliases` of a reference that names the tensor twice), where it lacks
    them, whichever of the names it holds (``save_pretrained`` keeps the embedding's,
    safetensors' ``save_model`` the first in sorted order: ``lm_head.weight``);
    ``checkpoint`` itself where it lacks none. So a model stored once (safetensors) merges
    beside a base named twice (a module), and the result has the base's keys.

    Example:
        >>> import torch
        >>> once = open_checkpoint({"emb": torch.ones(2)})
        >>> named = second_names(once, {"head": "emb"})
        >>> named.keys(), named.get("head").tolist(), named.aliases()
        (['emb', 'head'], [1.0, 1.0], {'head': 'emb'})
        >>> second_names(open_checkpoint({"head": torch.ones(2)}), {"head": "emb"}).keys()
        ['head', 'emb']
    """
    own = set(checkpoint.keys())
    groups: dict[str, list[str]] = {}  # each tensor's first name -> its names
    for new, old in tied.items():
        groups.setdefault(old, [old]).append(new)
    names = {}
    for group in groups.values():
        held = next((key for key in group if key in own), None)  # a name it is stored under
        if held is not None:
            names.update({key: held for key in group if key not in own})
    return _Renamed(checkpoint, names) if names else checkpoint


def first_names(checkpoint: Checkpoint, tied: Mapping[str, str]) -> Checkpoint:
    """``checkpoint`` without the second names of ``tied`` (:func:`tied_names`: keys naming
    the tensor of an earlier key in every input), so that a merge in memory computes a tied
    tensor once, under its first name, and returns it under every name
    (:func:`ladle.engine.merge`); ``checkpoint`` itself where it holds none of them.

    Example:
        >>> import torch
        >>> w = torch.ones(2)
        >>> once = first_names(open_checkpoint({"emb": w, "head": w}), {"head": "emb"})
        >>> once.keys(), once.aliases()
        (['emb'], {})
    """
    hidden = set(tied).intersection(checkpoint.keys())
    return _Renamed(checkpoint, hidden=hidden) if hidden else checkpoint


class TensorMapCheckpoint(Checkpoint):
    """A checkpoint over tensors already in hand (a mapping, a module, a loaded torch file,
    whose ``file`` :meth:`files` reports for every key). An ``AveragedModel``'s tensors are
    the averaged model's own (:func:`unwrap_averaged`)."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        name: str = "<state dict>",
        path: Path | None = None,
        file: Path | None = None,
    ) -> None:
        # As stored (an AveragedModel's module.w too); a torch file's, load_torch_file checked.
        for key, value in tensors.items() if file is None else ():
            problem = not_a_dense_tensor(key, value)
            if problem is not None:
                raise CheckpointError(f"{name}: {problem}; ladle merges dense tensors with data")
        tensors = unwrap_averaged(tensors)
        self._tensors = tensors
        self.name = name
        self.path = path
        self.metadata = {}
        self._file = file  # the torch file the tensors were loaded from, if any
        self._mapped = None if file is None else _mapped_identity(file)
        self._sizes = {} if file is None else _sizes_of([file])
        self._closed = False
        self._tied: dict[str, str] = {}  # the aliases, once closed

    def keys(self) -> list[str]:
        return list(self._tensors)

    def files(self) -> dict[str, Path]:
        return {} if self._file is None else dict.fromkeys(self._tensors, self._file)

    def aliases(self) -> dict[str, str]:
        """Keys naming one tensor (a module's or a loaded torch file's tied weights): see
        :meth:`Checkpoint.aliases`."""
        return self._tied if self._closed else tensor_aliases(self._tensors.items())

    def close(self) -> None:
        """Of a torch file: let go of its tensors (and so of its memory map), keeping their
        names, shapes and dtypes; tensors in memory stay readable."""
        if self._file is None or self._closed:
            return
        self._tied = self.aliases()
        self._tensors = {
            key: torch.empty(t.shape, dtype=t.dtype, device="meta")
            for key, t in self._tensors.items()
        }
        self._closed = True

    def file_sizes(self) -> dict[Path, int]:
        """The torch file's size when loaded (none for tensors in memory): one deleted or
        moved since is no error here (a legacy file's tensors are all in memory)."""
        return dict(self._sizes)

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise self._missing(key) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor(key).dtype

    def get_slice(self, key: str, rows: slice) -> torch.Tensor:
        check_rows(rows)
        if self._closed:
            raise _closed_error(self.name)
        self.check_unchanged()  # a memory-mapped file cut short: SIGBUS, not an error
        tensor = self._tensor(key).detach()
        return tensor if tensor.dim() == 0 else tensor[rows]

    def check_unchanged(self) -> None:
        if self._file is not None:
            _check_same_file(self._file, self._mapped, MAPPED_GONE)


OPEN_ATTEMPTS = 3
"""Times a safetensors file replaced while being opened is opened again before giving up."""

# A memory map keeps a duplicate of its file's descriptor for size() and resize(), which
# ladle never calls; Python 3.13+ can map without it: one descriptor per input file, not two.
_UNTRACKED: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}
_KEPT_PER_FILE = "one" if _UNTRACKED else "two (the file and its map)"


class SafetensorsCheckpoint(Checkpoint):
    """One safetensors file, or the shards of one model, memory-mapped."""

    def __init__(self, files: Mapping[str, Path], *, name: str, path: Path) -> None:
        """``files`` maps each tensor key to the file holding it (one file, or shards)."""
        self.name = name
        self.path = path
        self._handles: dict[Path, object] = {}
        self._descriptors: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._unmappable: set[Path] = set()  # files on filesystems that cannot map them
        # (file, key) -> absolute offset of the key's data in that file. Per file: a key that
        # an index puts in one shard may also lie, stale, in another.
        self._spans: dict[tuple[Path, str], int] = {}
        self._identities: dict[Path, tuple[int, ...]] = {}  # each file as safe_open found it
        self._specs: dict[str, tuple[tuple[int, ...], str]] = {}  # key -> (shape, dtype code)
        self._files = dict(files)
        self._closed = False
        self.metadata = {}
        for file in dict.fromkeys(self._files.values()):
            self.metadata.update(self._open(file).metadata() or {})

    @classmethod
    def from_file(cls, file: Path) -> SafetensorsCheckpoint:
        self = cls({}, name=str(file), path=file)
        handle = self._open(file)
        self._files = {key: file for key in handle.keys()}
        self.metadata = dict(handle.metadata() or {})
        return self

    def match_index(self, index: Path) -> None:
        """Reconcile ``index`` with its shards' headers (read on opening). Every key it lists
        must be in the shard it names: else the key would look missing from the other models,
        or a merge would fail midway. A tensor that a shard holds and the index lists in no
        shard is read from that shard, as transformers loads it (a merge dropped it without
        a word before); two shards holding such a tensor are a ``CheckpointError``. A stale
        second copy of a listed tensor is read from the shard the index names."""
        held: dict[Path, set[str]] = {}
        for key, file in self._files.items():
            if file not in held:
                held[file] = set(self._open(file).keys())
            if key not in held[file]:
                raise _not_in_its_shard(index, key, file)
        unlisted: dict[str, Path] = {}
        for file, keys in held.items():
            for key in sorted(keys.difference(self._files)):
                if key in unlisted:
                    raise _in_no_shard_but_two(index, key, unlisted[key], file)
                unlisted[key] = file
        self._files.update(unlisted)

    def _open(self, file: Path):  # type: ignore[no-untyped-def]
        handle = self._handles.get(file)
        if handle is None:
            if self._closed:  # every read of data comes here first (via _descriptor)
                raise _closed_error(self.name)
            try:
                handle = self._opened(file)
            except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                # safetensors says "No such file or directory" whatever kept it from opening
                # (torch's map of it raises a RuntimeError, a file gone meanwhile)
                why = _unopenable(file) if isinstance(err, (OSError, RuntimeError)) else None
                if why is not None:
                    raise CheckpointError(f"{file}: cannot read it ({why})") from err
                if _is_lfs_pointer(file):
                    raise CheckpointError(f"{file}: {FETCH_LFS}") from err
                raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
            self._handles[file] = handle
        return handle

    def _opened(self, file: Path):  # type: ignore[no-untyped-def]
        """``safe_open`` of ``file``, its identity noted (:meth:`check_unchanged`): the same
        before and after, or the file was replaced meanwhile (an output being overwritten)
        and the header read may be the old file's, the bytes the new one's; tried again."""
        for _ in range(OPEN_ATTEMPTS):
            before = _identity(os.stat(file))
            # safe_open says "No such file" where the process may open no more files: a
            # descriptor of ours first, which makes room (:func:`open_reading`) or says why.
            os.close(open_reading(file))
            handle = safe_open(str(file), framework="numpy")
            identity = _identity(os.stat(file))
            if identity == before:
                self._identities[file] = identity
                return handle
        raise CheckpointError(
            f"{file}: replaced while being opened, {OPEN_ATTEMPTS} times; is something "
            "rewriting it?"
        )

    def _slice(self, key: str):  # type: ignore[no-untyped-def]
        try:
            file = self._files[key]
        except KeyError:
            raise self._missing(key) from None
        try:
            return self._open(file).get_slice(key)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({err})") from err

    def keys(self) -> list[str]:
        return list(self._files)

    def files(self) -> dict[str, Path]:
        return dict(self._files)

    def file_sizes(self) -> dict[Path, int]:
        """Sizes as each file was when opened (every file is, on opening the checkpoint): a
        file changed since is refused when read (:meth:`_descriptor`)."""
        return {file: identity[2] for file, identity in self._identities.items()}

    def _spec(self, key: str) -> tuple[tuple[int, ...], str]:
        """``key``'s shape and safetensors dtype code, asked of its header once: a merge asks
        for them several times per chunk read."""
        spec = self._specs.get(key)
        if spec is None:
            view = self._slice(key)
            shape = tuple(view.get_shape())
            past = past_int64(shape)
            if past is not None:
                raise CheckpointError(f"{self._files[key]}: tensor {key!r} {past}")
            spec = self._specs[key] = (shape, view.get_dtype())
        return spec

    def shape(self, key: str) -> tuple[int, ...]:
        return self._spec(key)[0]

    def dtype(self, key: str) -> torch.dtype:
        code = self._spec(key)[1]
        try:
            return SAFETENSORS_DTYPES[code]
        except KeyError:
            raise CheckpointError(
                f"{self._files[key]}: tensor {key!r} has dtype {code}, which ladle does not read"
                + (" (4-bit values packed two to a byte)" if code == "F4" else "")
            ) from None

    def get_slice(self, key: str, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of ``key``, read as :meth:`get_rows` reads them: a file cut short or
        replaced since it was opened is a ``CheckpointError``, never zeros or a crash (SIGBUS)
        from reading through safetensors' own map. A step (``slice(0, 6, 2)``) reads the rows
        it spans; a 0-d tensor is read whole whatever ``rows``."""
        check_rows(rows)
        shape = self.shape(key)
        if not shape:
            return self.get_rows(key, slice(None))
        first, stop, step = rows.indices(shape[0])
        if step < 0:  # as torch refuses for tensors in memory
            raise ValueError(f"rows: expected a positive step, found {rows}")
        if step == 1:
            return self.get_rows(key, slice(first, stop))
        return self.get_rows(key, slice(first, max(first, stop)))[::step]

    def get_rows(self, key: str, rows: slice, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Rows ``rows`` of ``key`` read as ``shape`` (:meth:`Checkpoint.get_rows`): a view of
        the file's pages (:meth:`map_rows`), else (unaligned data, a file that cannot be
        mapped, no rows) read into memory of their own (:meth:`read_rows`)."""
        check_rows(rows)
        mapped = self.map_rows(key, rows, shape)
        if mapped is not None:
            return mapped
        into = torch.empty(self._extent(key, rows, shape)[2], dtype=torch.uint8, device="cpu")
        return self.read_rows(key, rows, into, shape)

    def _extent(
        self, key: str, rows: slice, shape: tuple[int, ...] | None = None
    ) -> tuple[Path, int, int, tuple[int, ...], torch.dtype]:
        """The file, byte offset and byte count of rows ``rows`` of ``key`` read as ``shape``
        (default its own), their shape and the tensor's dtype."""
        check_rows(rows)
        if rows.step not in (None, 1):
            raise ValueError(f"rows: expected contiguous rows (step 1), found {rows}")
        stored, dtype = self.shape(key), self.dtype(key)
        if shape is None:
            shape = stored
        else:
            check_reshape(key, stored, shape)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        first, stop = rows.indices(shape[0])[:2] if shape else (0, 1)
        count = max(stop - first, 0)
        nbytes = count * row_bytes if shape else dtype.itemsize
        file = self._files[key]
        offset = self._data_offset(file, key) + first * row_bytes
        return file, offset, nbytes, ((count, *shape[1:]) if shape else ()), dtype

    def map_rows(
        self, key: str, rows: slice, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor | None:
        """A view of the rows in a private (copy-on-write) map of the file: the page cache's
        pages themselves, so reading costs no copy; a stray write would change only this
        process's copy, never the file. ``None`` where the data is not aligned to its dtype,
        or the file cannot be mapped (callers then read it)."""
        file, offset, nbytes, shape, dtype = self._extent(key, rows, shape)
        if offset % dtype.itemsize or nbytes == 0:
            return None
        if file in self._unmappable:
            return None
        descriptor = self._descriptor(file)
        mapped = self._maps.get(file)
        if mapped is None:
            try:
                mapped = _more_files_if_needed(
                    lambda: mmap.mmap(descriptor, 0, access=mmap.ACCESS_COPY, **_UNTRACKED)
                )
            except OSError:  # a filesystem that cannot map files (some FUSE ones): read them
                self._unmappable.add(file)
                return None
            self._maps[file] = mapped
        # Pages past the end of a file that shrank since it was mapped cannot be read (the
        # process would get SIGBUS): check the file's size now, as a read would.
        size = min(len(mapped), os.fstat(descriptor).st_size)
        if offset + nbytes > size:
            raise CheckpointError(
                f"{file}: tensor {key!r} ends early; expected {nbytes} bytes at offset "
                f"{offset}, the file has {size} (was it changed while being read?)"
            )
        flat = torch.frombuffer(mapped, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        return flat.view(shape)

    def release(self, key: str) -> None:
        """Unmap the whole pages of tensor ``key`` from this process (``MADV_DONTNEED``): they
        stay in the page cache, and a later read maps them again. The page tables of a
        mapping take about 0.2% of the bytes mapped, so merges of very large models release
        each tensor once a pass is done with it."""
        file = self._files.get(key)
        if file is None:
            raise self._missing(key)
        mapped = self._maps.get(file)
        if mapped is None:
            return
        _, offset, nbytes, _, _ = self._extent(key, slice(None))
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: a page shared
        stop = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE  # with a neighbour stays
        if stop > start:
            mapped.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def read_rows(
        self, key: str, rows: slice, into: torch.Tensor, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Read the rows with ``pread`` into ``into``: no memory map, no page faults."""
        file, offset, nbytes, shape, dtype = self._extent(key, rows, shape)
        if into.dtype != torch.uint8 or into.dim() != 1 or into.numel() < nbytes:
            raise ValueError(
                f"into: expected a flat uint8 tensor of at least {nbytes} bytes for rows {rows} "
                f"of {key!r}, found {into.dtype} of shape {tuple(into.shape)}"
            )
        view = into[:nbytes]
        done = 0
        while done < nbytes:  # a read may return less than asked (large or interrupted reads)
            target = memoryview(view[done:].numpy())  # type: ignore[arg-type]
            try:
                got = pread_into(self._descriptor(file), target, offset + done)
            except OSError as err:  # an I/O error, a file gone from a network filesystem
                raise CheckpointError(
                    f"{file}: cannot read tensor {key!r} ({err.strerror or err})"
                ) from err
            if got <= 0:
                raise CheckpointError(
                    f"{file}: tensor {key!r} ends early; expected {nbytes} bytes at offset "
                    f"{offset}, found {done}"
                )
            done += got
        return view.view(dtype).view(shape)

    def check_unchanged(self) -> None:
        for file, identity in list(self._identities.items()):
            _check_same_file(file, identity, "its header no longer describes its data")

    def _descriptor(self, file: Path) -> int:
        """The file opened for reading, checked to be the file :meth:`_open` read the header
        of: shapes and dtypes come from that header, data from this descriptor."""
        if file not in self._descriptors:
            self._open(file)
            descriptor = open_reading(file)
            if _identity(os.fstat(descriptor)) != self._identities[file]:
                os.close(descriptor)
                raise CheckpointError(f"{file}: {CHANGED}; its header no longer describes its data")
            # Reading threads may open a file at once: the first descriptor stored is kept.
            if self._descriptors.setdefault(file, descriptor) != descriptor:
                os.close(descriptor)
        return self._descriptors[file]

    def _data_offset(self, file: Path, key: str) -> int:
        if (file, key) not in self._spans:  # the header was validated by safe_open already
            descriptor = self._descriptor(file)
            (size,) = struct.unpack("<Q", os.pread(descriptor, 8, 0))
            header = json.loads(os.pread(descriptor, size, 8))
            for name, entry in header.items():
                if name != "__metadata__":
                    self._spans[(file, name)] = 8 + size + int(entry["data_offsets"][0])
        return self._spans[(file, key)]

    def close(self) -> None:
        self._closed = True
        self._handles.clear()
        # Dropped, not closed: every view map_rows made holds the map (torch.frombuffer keeps
        # a reference), which is unmapped when the last view goes. Closing it would leave
        # live views (a failed merge's traceback holds some) pointing at unmapped memory.
        self._maps.clear()
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()


def check_rows(rows: object) -> None:
    """A ``TypeError`` naming ``rows`` for what is no slice of int bounds (``0``, a list, a
    bool: a tensor in memory took them as an index, dropping or adding a dimension, a file
    raised its own error)."""
    if not isinstance(rows, slice) or not all(
        bound is None or (hasattr(bound, "__index__") and not isinstance(bound, bool))
        for bound in (rows.start, rows.stop, rows.step)
    ):
        raise TypeError(f"rows: expected a slice of int bounds (slice(0, 8)), found {rows!r}")


def _closed_error(name: str) -> CheckpointError:
    """The error for reading a checkpoint's data after :meth:`Checkpoint.close`."""
    return CheckpointError(f"{name}: closed; open it again to read its tensors")


def _shard(index: Path, shard: Path) -> str:
    """``shard`` as ``index`` names it: relative to its folder (``x/s1.safetensors``)."""
    return (
        str(shard.relative_to(index.parent)) if shard.is_relative_to(index.parent) else str(shard)
    )


def _not_in_its_shard(index: Path, key: str, shard: Path) -> CheckpointError:
    """The error for a shard ``index`` lists ``key`` in that does not hold it."""
    return CheckpointError(
        f"{index}: lists {key!r} in {_shard(index, shard)}, which does not hold it (the index "
        "and its shards disagree: was a shard replaced, or the index edited?)"
    )


def _in_no_shard_but_two(index: Path, key: str, first: Path, second: Path) -> CheckpointError:
    """The error for ``key``, which ``index`` lists in no shard, held by two shards."""
    return CheckpointError(
        f"{index}: lists {key!r} in no shard, and both {_shard(index, first)} and "
        f"{_shard(index, second)} hold "
        "it: which one to read is not known"
    )


def open_reading(file: Path) -> int:
    """A descriptor of ``file`` opened for reading. Where this process may open no more
    files, its limit is raised first (:func:`_more_open_files`); past the hard limit, a
    :class:`CheckpointError` says so."""
    try:
        return _more_files_if_needed(lambda: os.open(file, os.O_RDONLY))
    except OSError as err:
        why = err.strerror or str(err)
        if err.errno == errno.EMFILE:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            why += (
                f": this process may open {soft} files at once, and a merge keeps {_KEPT_PER_FILE}"
                " open per input file; raise the limit (ulimit -n) or merge in steps"
            )
        raise CheckpointError(f"{file}: cannot read it ({why})") from err


def _more_files_if_needed(opening: Callable[[], T]) -> T:
    """``opening()``, once more after raising the limit of open files where it failed on it."""
    try:
        return opening()
    except OSError as err:
        if err.errno != errno.EMFILE or not _more_open_files():
            raise
    return opening()


def _more_open_files() -> bool:
    """Raise this process's soft limit of open files to its hard limit, as any process may:
    a merge keeps one or two descriptors per input file (see `_UNTRACKED`), and 30 models
    of 5 shards are past macOS's default of 256. Whether the limit rose."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = math.inf if hard == resource.RLIM_INFINITY else hard
    # Where the hard limit is unlimited, the system's own ceiling (Linux's nr_open, macOS's
    # OPEN_MAX of 10240) refuses it: the largest of these that it takes.
    for wanted in (hard, 2**20, 65536, 10240):
        if wanted != resource.RLIM_INFINITY and soft < wanted <= ceiling:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            except (ValueError, OSError):
                continue
            return True
    return False


def _unopenable(file: Path) -> str | None:
    """Why ``file`` cannot be opened for reading, as the system says (no permission, gone),
    or ``None``."""
    try:
        os.close(os.open(file, os.O_RDONLY))
    except OSError as err:
        return err.strerror or str(err)
    return None


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    """What tells a file from its replacement: device, inode, size and modification time."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


CHANGED = "changed since it was opened (replaced or rewritten while being merged)"


def _sizes_of(files: Sequence[Path]) -> dict[Path, int]:
    """Each file's size now, or a ``CheckpointError`` naming one that cannot be asked."""
    sizes = {}
    for file in files:
        try:
            sizes[file] = file.stat().st_size
        except OSError as err:
            raise CheckpointError(f"{file}: cannot read it ({err.strerror or err})") from err
    return sizes


def _mapped_identity(file: Path) -> tuple[int, ...] | None:
    """The :func:`_identity` of a torch file that ``torch.load`` memory-maps (a zip archive:
    its tensors are read from the file while merging); ``None`` for one read whole."""
    try:
        return _identity(os.stat(file)) if _is_zip(file) else None
    except OSError:
        return None


def _check_same_file(file: Path, identity: tuple[int, ...] | None, why: str) -> None:
    """A ``CheckpointError`` where ``file`` is no longer the file of ``identity`` (``None``:
    nothing to check), saying ``why`` that matters: a file cut short stops a reader of its
    memory map (SIGBUS), one rewritten gives other numbers than a pass before read."""
    if identity is None:
        return
    try:
        now: tuple[int, ...] | None = _identity(os.stat(file))
    except OSError:  # gone
        now = None
    if now != identity:
        raise CheckpointError(f"{file}: {CHANGED}; {why}")


MAPPED_GONE = "its tensors can no longer be read"


ZIP_MAGIC = b"PK\x03\x04"
"""How a zip archive torch writes begins (torch reads any other file as a legacy pickle)."""

LFS_POINTER = b"version https://git-lfs.github.com/spec/"
"""How a Git LFS pointer begins: what a clone without ``git lfs pull`` holds for weights."""

FETCH_LFS = "a Git LFS pointer, not the weights: fetch them (git lfs pull)"


def _is_zip(file: Path) -> bool:
    """Whether torch reads ``file`` as a zip archive: as torch decides, by its first bytes
    (``zipfile.is_zipfile`` looks for an archive's end anywhere in the last 64 KiB: a
    legacy file whose tensors hold the bytes ``PK\x05\x06`` there passed for one)."""
    with open(file, "rb") as handle:
        return handle.read(len(ZIP_MAGIC)) == ZIP_MAGIC


def _is_lfs_pointer(file: Path) -> bool:
    """Whether ``file`` is a Git LFS pointer (``False`` where it cannot be read)."""
    try:
        with open(file, "rb") as handle:
            return handle.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        return False


def _not_a_torch_file(file: Path) -> str | None:
    """Why ``file`` cannot be a torch file, judged from its first bytes, or ``None``.

    torch writes a zip archive, or (the legacy format) a pickle, which starts with the PROTO
    opcode. A Git LFS pointer (a clone without ``git lfs pull``) and a safetensors file under
    a torch suffix are common mistakes worth naming.
    """
    try:
        with open(file, "rb") as handle:
            head = handle.read(64)
    except OSError as err:
        return f"cannot read it ({err.strerror or err})"
    if head.startswith(LFS_POINTER):
        return FETCH_LFS
    if len(head) >= 10 and head[8:10] == b'{"':  # a header length, then a JSON header
        if file.suffix == ".safetensors":  # read as a torch file: a torch index lists it
            return "a safetensors file, which a torch index (*.bin.index.json) lists as a shard"
        return "a safetensors file under a torch suffix: give it the .safetensors suffix"
    if head.startswith(b"PK") and ZIP_MAGIC.startswith(head):  # torch would unpickle "PK"
        return f"not a readable torch file (a zip archive's signature alone: {ENDS_EARLY})"
    if not head.startswith((ZIP_MAGIC, b"\x80")):
        return (
            "not a torch file ladle can load (neither a zip archive nor a pickle of "
            "protocol 2 or later)"
        )
    return None


_WARNING_FILTERS = threading.Lock()
_IGNORED: dict[str, int] = {}
"""How many of ladle's reads running now ignore each message (:func:`_ignoring`)."""


@contextlib.contextmanager
def _ignoring(message: str) -> Iterator[None]:
    """Inside, warnings whose text begins with a match of ``message`` (a regular expression)
    are ignored. Before Python 3.14's context-aware warnings the filters are the process's,
    not a thread's: the first read to ask adds one filter and the last to finish removes it,
    leaving the others as they are. ``catch_warnings`` put back on exit the filters it found
    on entry, undoing those a program's other threads set meanwhile, and its lock, held for
    a whole load, hung a child forked meanwhile at its first load of a torch file."""
    if getattr(sys.flags, "context_aware_warnings", False):  # a thread's or task's own
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=message)
            yield
        return
    with _WARNING_FILTERS:
        if message not in _IGNORED:
            warnings.filterwarnings("ignore", message=message)
        _IGNORED[message] = _IGNORED.get(message, 0) + 1
    try:
        yield
    finally:
        with _WARNING_FILTERS:
            _IGNORED[message] -= 1
            if not _IGNORED[message]:
                del _IGNORED[message]
                ours = ("ignore", re.compile(message, re.I), Warning, None, 0)  # as added
                with contextlib.suppress(ValueError):  # gone: resetwarnings() meanwhile
                    warnings.filters.remove(ours)  # type: ignore[attr-defined]


def load_torch_file(file: Path) -> dict[str, torch.Tensor]:
    """Load a torch file with ``weights_only=True``; a pickle that needs more is refused."""
    why = _not_a_torch_file(file)
    if why is not None:
        raise CheckpointError(f"{file}: {why}")
    _check_room_to_decompress(file)
    try:
        # The legacy (non-zip) format cannot be memory-mapped; nor a file whose path is no
        # UTF-8 (torch's map takes a str it encodes so): read whole.
        mmap = _is_zip(file) and os.fsencode(file) == str(file).encode("utf-8", "replace")
        # A map reads a record's bytes as they lie: a compressed one (an archive re-zipped
        # by a tool) as its compressed bytes. Torch's reader of the whole file decompresses.
        records = _data_records(file) if mmap else None
        if records is None or any(r.compress_type != zipfile.ZIP_STORED for r in records.values()):
            mmap = False
        # Raw pickles of other protocols are refused below if unsafe; the hint is noise. So
        # is torch 2.14's note that it validates sparse tensors: ladle refuses them anyway.
        with _ignoring("Detected pickle protocol|Validating sparse tensor invariants"):
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
            if mmap and not _records_hold_storages(loaded, records):  # type: ignore[arg-type]
                loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _ends_early(file):  # a name cut short is no allowed global: refused, but truncated
            raise _truncated(file) from err
        if "Unsupported operand 149" in str(err):  # FRAME: what it holds is unknown
            raise UnsafeCheckpointError(
                f"{file}: refused to unpickle: pickled with protocol 4 or later, which torch's "
                "weights-only loader cannot read, so whether it holds only tensors is unknown; "
                "if torch.save(..., pickle_protocol=4 or 5) wrote it, save it again with the "
                "default protocol; else convert it to safetensors in a trusted environment"
            ) from err
        raise UnsafeCheckpointError(
            f"{file}: refused to unpickle: it needs more than tensors, and loading it could run "
            f"code ({_unpickling_reason(err)}). Convert it to safetensors in a trusted "
            "environment."
        ) from err
    except MemoryError as err:
        # The machine's, unless a length in the file reaches past its end: torch allocated
        # what a corrupt length asked for before finding the bytes missing.
        if _ends_early(file):
            raise _truncated(file) from err
        raise
    except Warning:  # a warning the caller made an error (python -W error): theirs to see
        raise
    except Exception as err:
        if _out_of_memory(err, file):  # torch's allocator says so, of what the file holds
            raise MemoryError(f"{file}: {one_line(err)}") from err
        if mmap and "unable to mmap" in str(err) and "Cannot allocate memory" in str(err):
            # torch maps the file privately and writable, which Linux charges against RAM
            # and swap: larger than those, it cannot be mapped (nor loaded whole)
            raise MemoryError(
                f"{file}: torch cannot map its {file.stat().st_size} bytes, more than this "
                "machine's memory and swap allow; convert it to safetensors, which ladle "
                f"reads a piece at a time ({one_line(err)})"
            ) from err
        # Unpickling corrupt bytes raises what it meets (EOFError, IndexError, KeyError,
        # struct.error, AssertionError, zipfile.BadZipFile...): each is the file's fault,
        # and says so naming it.
        raise CheckpointError(
            f"{file}: not a readable torch file ({_load_failure(file, err)})"
        ) from err
    return _state_dict_in(file, loaded)


def _check_room_to_decompress(file: Path) -> None:
    """Raise ``MemoryError`` before torch decompresses anything if the compressed records of
    zip torch file ``file`` declare more bytes than this process has memory for: deflate packs
    zeros a thousandfold, so a file of megabytes could fill the machine's memory (a "zip
    bomb"). Torch decompresses each record whole, into a buffer of its declared size."""
    if not _is_zip(file):
        return
    try:
        with zipfile.ZipFile(file) as archive:
            records = archive.infolist()
    except Exception:  # corrupt, or past Python's reader (NotImplementedError: zip version)
        return  # torch's own reader says what is wrong, as a CheckpointError
    declared = sum(r.file_size for r in records if r.compress_type != zipfile.ZIP_STORED)
    room = memory_available()
    if declared and room is not None and declared > room:
        raise MemoryError(
            f"{file}: its compressed records decompress to {declared:,} bytes, more than the "
            f"{room:,} bytes of memory available; refused before decompressing (torch never "
            "compresses the files it saves: a tool re-zipped this one)"
        )


def memory_available() -> int | None:
    """Bytes of memory this process could take: the system's available memory and free swap
    (``/proc/meminfo``; the physical memory where there is none), at most a cgroup (v2)
    limit; ``None`` where none of them can be read."""
    room = _meminfo_available()
    if room is None:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            room = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_limit()
    if limit is not None:
        room = limit if room is None else min(room, limit)
    return room


_MEMINFO_FIELD = re.compile(rb"^(MemAvailable|SwapFree):[ \t]+([0-9]+) kB$", re.MULTILINE)


def refuse_past_room(
    sizes: Mapping[str, int],
    what: str,
    hint: str,
    *,
    describe: Callable[[str], str] = repr,
    copies: int = 1,
) -> None:
    """Raise ``MemoryError`` if ``copies`` times the bytes of ``sizes`` (key: bytes) exceed
    :func:`memory_available` (nothing is checked where it cannot be read): ``what`` needs
    them, ``describe(key)`` names its largest tensor (found only then), ``hint`` says what
    to do instead.

    Example:
        >>> refuse_past_room({"w": 24}, "the merged state dict", "pass out=")  # 24 bytes fit
    """
    needed = copies * sum(sizes.values())
    room = memory_available()
    if room is None or needed <= room:
        return
    largest = max(sizes, key=sizes.__getitem__)
    raise MemoryError(
        f"{what} needs {needed:,} bytes (the largest tensor, {describe(largest)}), more than "
        f"the {room:,} bytes of memory available; {hint}"
    )


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` + ``SwapFree`` of ``/proc/meminfo`` in bytes, or ``None``. The two
    fields found by one regular expression: splitting every line took 120 µs, a tenth of a
    small in-memory merge, which checks its room (:func:`~ladle.engine.check_room`)."""
    try:
        with open(path, "rb") as meminfo:
            text = meminfo.read()
    except OSError:
        return None
    fields = {name: int(value) * 1024 for name, value in _MEMINFO_FIELD.findall(text)}
    if b"MemAvailable" not in fields:
        return None
    return fields[b"MemAvailable"] + fields.get(b"SwapFree", 0)


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max``; what it holds now
    counts page cache the kernel would reclaim, so is not subtracted), or ``None``."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as limit:
            maximum = limit.read().strip()
        return None if maximum == "max" else int(maximum)
    except (OSError, ValueError):
        return None


def _truncated(file: Path) -> CheckpointError:
    return CheckpointError(f"{file}: not a readable torch file ({ENDS_EARLY})")


def _state_dict_in(file: Path, loaded: object) -> dict[str, torch.Tensor]:
    """The state dict that ``file`` unpickled to ``loaded``: itself, or the dict under a
    training checkpoint's ``state_dict`` or ``model``; refused unless a dict of dense
    tensors, or where tensors lie beside the wrapper or both wrappers hold tensors."""
    wrappers = [
        w
        for w in ("state_dict", "model")
        if isinstance(loaded, dict)
        and isinstance(loaded.get(w), dict)
        and any(isinstance(v, torch.Tensor) for v in loaded[w].values())
    ]
    if len(wrappers) == 2:  # which of them the model is, is unknown (the first was taken)
        raise CheckpointError(
            f"{file}: holds two state dicts, 'state_dict' and 'model'; expected a state dict, "
            "or a training checkpoint with one of them: save the one to merge on its own"
        )
    for wrapper in ("state_dict", "model"):  # common training-checkpoint layouts
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            beside = [k for k, v in loaded.items() if isinstance(v, torch.Tensor)]
            if beside:  # tensors beside the wrapper: which of them the model is, is unknown
                raise CheckpointError(
                    f"{file}: holds tensors ({_some(beside)}) beside a dict {wrapper!r}; "
                    f"expected a state dict, or a training checkpoint whose {wrapper!r} is one"
                )
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{file}: expected a state dict, found {type_name(loaded)}")
    for key, value in loaded.items():  # a shard's too, not only a file opened on its own
        problem = not_a_dense_tensor(key, value)
        if problem is not None:
            raise CheckpointError(f"{file}: {problem}; ladle merges dense tensors with data")
    return loaded


def _data_records(file: Path) -> dict[int, zipfile.ZipInfo] | None:
    """The storage records (``ARCHIVE/data/KEY``) of zip torch file ``file``, by the offset of
    their first byte of data (after the local header), or ``None`` where Python's reader
    cannot read the archive (torch's own reader then says what is wrong)."""
    try:
        with zipfile.ZipFile(file) as archive, open(file, "rb") as handle:
            starts = {}
            for info in archive.infolist():
                if info.filename.split("/")[-2:-1] != ["data"]:
                    continue
                handle.seek(info.header_offset + 26)  # the local header's two lengths
                name_length, extra_length = struct.unpack("<HH", handle.read(4))
                starts[info.header_offset + 30 + name_length + extra_length] = info
            return starts
    except (OSError, zipfile.BadZipFile, struct.error, ValueError):
        return None


def _records_hold_storages(loaded: object, records: Mapping[int, zipfile.ZipInfo]) -> bool:
    """Whether the storages of ``loaded`` (a zip torch file loaded memory-mapped) lie where
    its ``records`` (:func:`_data_records`) do: one storage per record, at the same distances
    from each other in memory as in the file. ``False`` where that cannot be told (records
    no storage uses, say): the file is then read whole, checked by torch. A record of another
    size than its storage raises ``ValueError`` naming the tensor: mapped, the bytes after a
    short record were read as its numbers."""
    storages: dict[int, tuple[str, int]] = {}
    for name, tensor in _nested_tensors(loaded):
        # Refused once loaded, whatever its bytes (a DTensor's storage has no data pointer).
        if tensor.layout != torch.strided or tensor.is_quantized or _wraps_tensors(tensor):
            return True
        storage = tensor.untyped_storage()
        if storage.nbytes():
            storages.setdefault(storage.data_ptr(), (name, storage.nbytes()))
    placed = sorted((start, info) for start, info in records.items() if info.file_size)
    if len(placed) != len(storages):
        return False
    if not storages:  # no bytes to misread: an empty state dict, tensors of no entries
        return True
    first_storage, (first_record, _) = min(storages), placed[0]
    for pointer, (start, record) in zip(sorted(storages), placed, strict=True):
        if pointer - first_storage != start - first_record:
            return False
        name, size = storages[pointer]
        if record.file_size != size:
            raise ValueError(
                f"tensor {name!r}: its record {record.filename!r} holds {record.file_size} "
                f"bytes, its storage {size}"
            )
    return True


def _nested_tensors(value: object, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors in ``value`` and in the dicts, lists and tuples in it (a training
    checkpoint's ``state_dict``, its optimizer's states), each named by its path of keys
    (``"state_dict.w"``, ``"optimizer_states.0.exp_avg"``)."""
    if isinstance(value, torch.Tensor):
        yield name, value
        return
    items: Iterable[tuple[object, object]] = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    for key, inner in items:
        yield from _nested_tensors(inner, f"{name}.{key}" if name else str(key))


def _out_of_memory(err: BaseException, file: Path) -> bool:
    """Whether ``err`` is torch's allocator out of memory (a ``RuntimeError``, "can't
    allocate memory", not the ``MemoryError`` Python raises) for no more bytes than torch
    file ``file`` holds: its storage records uncompressed (zip), or its size (legacy). A
    corrupt length asks for more (2⁶² bytes): the file's fault."""
    if not isinstance(err, RuntimeError) or "can't allocate memory" not in str(err):
        return False
    asked = re.search(r"you tried to allocate (\d+) bytes", str(err))
    if asked is None:  # worded otherwise: as a MemoryError is judged
        return not _ends_early(file)
    records = _data_records(file) if _is_zip(file) else None
    if records is not None:
        holds = sum(record.file_size for record in records.values())
    else:
        holds = file.stat().st_size
    return int(asked.group(1)) <= holds


ENDS_EARLY = "it ends early: truncated?"


def _load_failure(file: Path, err: Exception) -> str:
    """Why torch could not load ``file``: that it ends early where it does (a legacy pickle
    cut short raises a bare ``EOFError``, an ``IndexError`` or a ``struct.error``), else
    torch's message, with the exception's type where that alone would not say much."""
    if isinstance(err, EOFError) or _ends_early(file):
        return ENDS_EARLY
    if _zip_ends_early(file):
        return NO_ZIP_END
    # Some of torch's C++ errors carry their backtrace, "Exception raised from ... frame #0:
    # c10::Error::Error ...": a thousand characters more of the one line a user reads.
    message = str(err).split("\nException raised from ", 1)[0].rstrip()
    if isinstance(err, (OSError, RuntimeError, ValueError)) and message:
        return message
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


NO_ZIP_END = "a zip archive without its end record: truncated, or corrupt"
"""Why a torch file (a zip archive) cannot be read where :func:`_zip_ends_early` says so: the
zip reader's own words were "[Errno 22] Invalid argument" or a paragraph about miniz."""

ZIP_END = b"PK\x05\x06"
"""The signature of a zip archive's end record (22 bytes, then a comment of up to 65,535)."""


def _zip_ends_early(file: Path) -> bool:
    """Whether ``file``, a zip archive (torch's format since 1.6), lacks a whole end record
    within its last 65,557 bytes, where every zip archive has one: cut short (torch's
    reader says "[Errno 22] Invalid argument", or "failed finding central directory").

    Example:
        >>> import tempfile, torch
        >>> path = Path(tempfile.mkdtemp()) / "model.pt"
        >>> torch.save({"w": torch.ones(4)}, path)
        >>> _zip_ends_early(path)
        False
        >>> _ = os.truncate(path, path.stat().st_size - 10)
        >>> _zip_ends_early(path)
        True
    """
    try:
        with open(file, "rb") as handle:
            if handle.read(2) != b"PK":
                return False
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - 22 - 65535))
            tail = handle.read()
    except OSError:
        return False
    end = tail.rfind(ZIP_END)
    return end < 0 or end + 22 > len(tail)


LEGACY_PICKLES = 5
"""Pickles a legacy (non-zip) torch file begins with: magic number, protocol version, system
information, the object, its storages' keys; the storages' bytes follow."""


def _ends_early(file: Path) -> bool:
    """Whether ``file``, a legacy torch file, ends inside one of its leading pickles (not
    between them: a single pickle, as ``pickle.dump`` writes, is no file cut short).

    Parsed with ``pickletools.genops``, which reads opcodes and builds no object, from a
    memory map, whose reads stop at the end of the file (a file object would first allocate
    the bytes a corrupt length asks for): a pickle that needs bytes past the end of the file is
    one cut short, where an unknown opcode before the end is corruption. Payloads are skimmed
    (:class:`_Skimmed`): a plain pickle of a large tensor is parsed without copying it."""
    try:
        with open(file, "rb") as handle:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ, **_UNTRACKED)
    except (OSError, ValueError):  # gone, or empty (nothing to map)
        return False
    # Not closed here: views of it that :class:`_Skimmed` gave may outlive this frame (in a
    # traceback); it is unmapped when the last goes.
    if data[:2] == b"PK":  # a zip archive: its own reader says what is wrong
        return False
    try:
        # pickletools undoes escapes in a text argument (a global's name) with a warning for
        # an invalid one ("invalid escape sequence '\d'", "invalid octal escape sequence
        # '\777'"): a corrupt byte, not the caller's to see (-W error raised it).
        with _ignoring(r"invalid (octal )?escape sequence"):
            for _ in range(LEGACY_PICKLES):
                if data.tell() == len(data):  # ends between pickles: a pickle of its own
                    return False
                for _ in pickletools.genops(_Skimmed(data)):  # type: ignore[arg-type]
                    pass
    except (ValueError, AttributeError):  # AttributeError: a long Python 2 string, a view
        return data.tell() >= len(data)
    return False


SKIMMED = 1 << 16
"""Reads longer than this (bytes) are views of the map, not copies (:class:`_Skimmed`)."""


class _Skimmed:
    """A memory map as ``pickletools.genops`` reads a pickle, except that a long read (a
    tensor's bytes in a plain pickle, or a length corruption made wild) is a view of the map,
    not a copy: a pickle larger than memory is parsed in little of it. A read past the end
    stops there, as a file's would."""

    def __init__(self, data: mmap.mmap) -> None:
        self._data = data

    def read(self, size: int) -> bytes | memoryview:
        if size <= SKIMMED:
            return self._data.read(size)
        start = self._data.tell()
        stop = min(start + size, len(self._data))
        self._data.seek(stop)
        return memoryview(self._data)[start:stop]

    def readline(self) -> bytes:
        return self._data.readline()

    def tell(self) -> int:
        return self._data.tell()


TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")
"""How the lines torch wraps around its weights-only unpickler's reason begin: a preamble
advising ``weights_only=False``, a request to file an issue, a link to its documentation."""


def _unpickling_reason(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused (a global, an opcode, a structure), without
    its preamble and without its advice to load unsafely: that is for files one trusts."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it references {found.group(1)}"
    same_line = re.search(r"WeightsUnpickler error:[ \t]*(\S[^\n]*)", text)  # torch < 2.9
    if same_line:
        return same_line.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Unsupported"):
            return line
    reasons = [line for line in lines if not line.startswith(TORCH_ADVICE)]
    return reasons[0] if reasons else "weights_only load failed"


class TorchShardsCheckpoint(Checkpoint):
    """Shards of a torch checkpoint (``pytorch_model.bin.index.json``), loaded file by file.

    Which tensors a torch file holds is known only by loading it, so ``index`` is reconciled
    with each shard when that shard is first loaded, as
    :meth:`SafetensorsCheckpoint.match_index` reconciles safetensors shards on opening: a key
    the index lists in a shard that lacks it is a ``CheckpointError`` naming index, key and
    shard; a tensor a shard holds that the index lists in no shard is read from that shard,
    as transformers loads a shard's whole state dict, unless two shards hold it (an error).
    :meth:`keys`, :meth:`files` and reading a key the index does not list load every shard
    first, so they answer every tensor the shards hold. Zip-format shards (torch's default)
    are memory-mapped: loading one reads its pickle, not its tensors; legacy-format ones are
    read whole, as reading any of their tensors would."""

    def __init__(self, files: Mapping[str, Path], *, name: str, path: Path, index: Path) -> None:
        """``files`` maps each key ``index`` lists to its shard."""
        self.name = name
        self.path = path
        self.metadata = {}
        self._index = index
        self._files = dict(files)
        self._listed: dict[Path, list[str]] = {}  # each shard (once, in order): keys listed in it
        for key, file in self._files.items():
            self._listed.setdefault(file, []).append(key)
        self._shards = list(self._listed)
        self._sizes = _sizes_of(self._shards)
        self._unlisted: dict[str, Path] = {}  # tensors the index lists in no shard: their shard
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._mapped: dict[Path, tuple[int, ...] | None] = {}  # each loaded shard's identity
        self._loading = threading.Lock()  # reading threads would load a shard twice
        self._closed = False

    def _shard(self, file: Path) -> dict[str, torch.Tensor]:
        """The tensors of shard ``file``, loaded and reconciled with the index once."""
        tensors = self._loaded.get(file)
        if tensors is None:
            if self._closed:
                raise _closed_error(self.name)
            with self._loading:
                tensors = self._loaded.get(file)
                if tensors is None:
                    try:
                        tensors = load_torch_file(file)
                        self._match(file, tensors)
                    except CheckpointError as err:  # named by its source: an hf:// repo's
                        if str(err).startswith(self.name):  # a local folder's files are
                            raise
                        raise type(err)(f"{self.name}: {err}") from err
                    self._mapped[file] = _mapped_identity(file)
                    self._loaded[file] = tensors
        return tensors

    def _match(self, file: Path, tensors: Mapping[str, torch.Tensor]) -> None:
        """Reconcile shard ``file``, holding ``tensors``, with the index (see the class)."""
        for key in self._listed[file]:
            if key not in tensors:
                raise _not_in_its_shard(self._index, key, file)
        unlisted = [key for key in tensors if key not in self._files]  # not a stale copy
        for key in unlisted:
            other = self._unlisted.get(key, file)
            if other != file:
                raise _in_no_shard_but_two(self._index, key, other, file)
        self._unlisted.update(dict.fromkeys(unlisted, file))

    def _load_all(self) -> None:
        for file in self._shards:
            self._shard(file)

    def _file_of(self, key: str) -> Path:
        file = self._files.get(key)
        if file is None:  # perhaps a tensor the index leaves out: known once all are loaded
            self._load_all()
            file = self._unlisted.get(key)
            if file is None:
                raise self._missing(key)
        return file

    def _tensor(self, key: str) -> torch.Tensor:
        return self._shard(self._file_of(key))[key]

    def keys(self) -> list[str]:
        return list(self.files())

    def files(self) -> dict[str, Path]:
        """Each tensor's shard, every shard loaded: those the index lists, in its order, then
        those it leaves out, shard by shard (once closed, those found before)."""
        if not self._closed:
            self._load_all()
        order = {file: i for i, file in enumerate(self._shards)}
        unlisted = sorted(self._unlisted.items(), key=lambda item: order[item[1]])
        return {**self._files, **dict(unlisted)}

    def file_sizes(self) -> dict[Path, int]:
        """Sizes as each shard was when the checkpoint was opened: one changed since is
        refused when loaded or read (:func:`_check_same_file`)."""
        return dict(self._sizes)

    def aliases(self) -> dict[str, str]:
        """Keys naming one tensor within a shard (:meth:`Checkpoint.aliases`; every shard is
        loaded, as for :meth:`keys`). transformers writes tied weights into one shard; two
        shards cannot share a tensor."""
        return tensor_aliases((key, self._tensor(key)) for key in self.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor(key).dtype

    def get_slice(self, key: str, rows: slice) -> torch.Tensor:
        check_rows(rows)
        file = self._file_of(key)
        tensor = self._shard(file)[key]
        _check_same_file(file, self._mapped.get(file), MAPPED_GONE)  # cut short: no SIGBUS
        return tensor if tensor.dim() == 0 else tensor[rows]

    def check_unchanged(self) -> None:
        for file, identity in list(self._mapped.items()):
            _check_same_file(file, identity, MAPPED_GONE)

    def close(self) -> None:
        self._closed = True
        self._loaded.clear()


_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}
"""JSON's names for the types ``json.loads`` returns, for messages about a file's JSON."""


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of the ``*.index.json`` ``index``, checked to map names to names;
    a ``CheckpointError`` naming the index, and what it holds instead, otherwise."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{index}: not a valid shard index ({err})") from err
    except RecursionError:  # "[[[[...": json recurses once per level
        raise CheckpointError(f"{index}: not a valid shard index (nested too deeply)") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        if not isinstance(data, dict):
            found = _JSON_TYPES[type(data)]
        elif "weight_map" not in data:
            found = 'no "weight_map"'
        else:
            found = f'{_JSON_TYPES[type(weight_map)]} as "weight_map"'
        raise CheckpointError(
            f'{index}: not a valid shard index (expected a JSON object whose "weight_map" '
            f"maps each tensor to its shard file, found {found})"
        )
    for key, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(
                f"{index}: not a valid shard index (expected a shard file name for key "
                f"{key!r}, found {json.dumps(file)})"
            )
    return weight_map


def shard_names(index: Path) -> dict[str, str]:
    """Each key's shard as an ``*.index.json`` names it, checked to lie inside the index's
    folder; a ``CheckpointError`` naming the index otherwise. The shards may not exist yet
    (the Hub fetches what this lists)."""
    names = _weight_map(index)
    for name in set(names.values()):
        # A shard lies in the index's folder (or below it): never read a file elsewhere
        # because a downloaded index names "../x" or "/x".
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise CheckpointError(
                f"{index}: shard {name!r} is not a file inside {index.parent}; refused"
            )
    return names


def _read_index(index: Path) -> dict[str, Path]:
    """Each key's shard, one ``Path`` object per shard: reads look their file up in dicts
    keyed by it, where another key's equal but distinct ``Path`` costs a comparison in
    Python (a soup of 8 models of 5000 keys in 500 shards: 1.1 s against 0.7 s unsharded)."""
    names = shard_names(index)
    if not names:  # no shard is read, whatever the folder holds: an empty model, silently
        raise CheckpointError(f"{index}: lists no tensors (an empty weight_map)")
    shards = {name: index.parent / name for name in dict.fromkeys(names.values())}
    for file in shards.values():
        if not file.is_file():
            what = f"is {_not_a_file(file)}" if os.path.lexists(file) else "does not exist"
            raise CheckpointError(f"{index}: lists shard {_shard(index, file)}, which {what}")
    return {key: shards[name] for key, name in names.items()}


def recorded_name(checkpoint: Checkpoint, out: str | os.PathLike | None = None) -> str:
    """How provenance and model cards record ``checkpoint``: its name, except that a model
    folder holding one weights file is recorded as the folder the user gave (its name is the
    file, which error messages want), so that a recipe replaying the merge reads the folder,
    config and tokenizer files included; and that an absolute path in the user's home folder
    starts with ``~`` instead of that folder.

    With ``out``, the output being written, a local input is recorded relative to the folder
    holding ``out`` where the two lie below one folder other than the file system's root
    (``/data/NAME/ckpts/a`` for ``/data/NAME/merges/out`` is ``../ckpts/a``), so that a
    published card or header shows no folder above them, and the card's recipe, saved beside
    the output, reads the same files wherever the merge ran from; else, or where the input is
    in the home folder and ``out`` is not, as an absolute path (from ``~`` in the home
    folder).

    Example:
        >>> import pathlib, tempfile, torch, ladle
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = ladle.save({"w": torch.ones(1)}, folder / "a" / "model.safetensors")
        >>> with ladle.open_checkpoint(folder / "a") as ckpt:
        ...     ckpt.name == str(folder / "a" / "model.safetensors"), (
        ...         recorded_name(ckpt) == str(folder / "a"), recorded_name(ckpt, folder / "o"))
        (True, (True, 'a'))
    """
    path = checkpoint.path
    name = str(checkpoint.name)  # a subclass's may be a Path
    if path is not None and Path(name).parent == path and path.is_dir():
        name = str(path)
    elif path is not None and not name.startswith("hf://") and not os.path.lexists(name):
        # A subclass's description ("zarr store A", "bundle.safetensors[a]"): as given, not
        # a file of the working folder; its path alone may not replay it (a part of a file).
        return name
    if path is None or name.startswith("hf://"):  # in memory ("<state dict>"), or the Hub
        return _home_as_tilde(name)
    if out is None:
        return _home_as_tilde(_unmistakable(name))
    absolute, folder = _home_as_tilde(os.path.abspath(name)), Path(out).parent
    if absolute.startswith("~") and not _home_as_tilde(os.path.abspath(folder)).startswith("~"):
        return absolute  # from a folder outside the home folder, "../NAME/..." names the user
    relative = _relative_to(name, folder)
    return absolute if relative is None else _unmistakable(relative)


def _unmistakable(path: str) -> str:
    """A local ``path`` as recorded: ``./`` before a relative one starting with ``~``, which a
    recipe reads as a home folder (a folder named ``~`` beside the output), or ``<``, which
    names an input in memory (``<state dict>``).

    Example:
        >>> _unmistakable("~/x"), _unmistakable("<a>/m.safetensors"), _unmistakable("a/~")
        ('./~/x', './<a>/m.safetensors', 'a/~')
    """
    return f"./{path}" if path.startswith(("~", "<")) else path


def _relative_to(name: str, folder: Path) -> str | None:
    """``name``, a local path, relative to ``folder`` as ``folder / result`` resolves it
    (symbolic links followed, as a recipe beside ``folder``'s contents reads it), where
    the two lie below one folder other than the file system's root; else ``None``.

    Example:
        >>> import pathlib
        >>> _relative_to("/data/alice/ckpts/a", pathlib.Path("/data/alice/merges"))
        '../ckpts/a'
        >>> _relative_to("/mnt/ckpts/a", pathlib.Path("/home/alice")) is None
        True
    """
    try:
        target, start = os.path.realpath(name), os.path.realpath(folder)
        common = os.path.commonpath([target, start])
        if common == os.path.dirname(common):  # only the root ("/", a drive) holds both
            return None
        absolute = os.path.abspath(name)
        real_folder = os.path.join(os.path.realpath(os.path.dirname(absolute)), "")
        candidates = (  # as named (a link "ckpts/latest" stays so), then less and less so
            os.path.relpath(absolute, os.path.abspath(folder)),
            os.path.relpath(real_folder + os.path.basename(absolute), start),
            os.path.relpath(target, start),
        )
        # ".." after a linked folder leaves the folder it links to, not the link's parent.
        return next(
            (c for c in candidates if os.path.realpath(os.path.join(start, c)) == target), None
        )
    except ValueError:  # different drives
        return None


def _home_as_tilde(name: str) -> str:
    """``name`` with the user's home folder written ``~`` (which recipes expand), so that a
    card or header published with the weights shows no user name (the shell turns
    ``~/models/a`` into ``/home/NAME/models/a``); other names as they are.

    Example:
        >>> import os
        >>> _home_as_tilde(os.path.join(os.path.expanduser("~"), "m", "a.safetensors")) == (
        ...     os.path.join("~", "m", "a.safetensors"))
        True
        >>> _home_as_tilde("models/a.safetensors"), _home_as_tilde("hf://org/a@main")
        ('models/a.safetensors', 'hf://org/a@main')
    """
    home = os.path.expanduser("~")
    if not os.path.isabs(name) or not os.path.isabs(home):
        return name  # relative, hf://, "<state dict>"; or no home folder known
    home = os.path.normpath(home)
    if home == os.path.dirname(home):  # "/": every path is under it, none is the user's
        return name
    if name == home or name.startswith(home.rstrip(os.sep) + os.sep):
        return "~" + name[len(home) :]
    return name


DEFAULT_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)
"""transformers' and diffusers' names for unsharded weights: where a folder holds several
weights files (variants such as ``model.fp16.safetensors`` beside them), the one
``from_pretrained`` reads."""


_VARIANT = re.compile(
    r"(model|pytorch_model|diffusion_pytorch_model)\.[^.]+\.(safetensors|bin)(\.index\.json)?"
)
"""A variant of the default weights (``model.fp16.safetensors``, its shards
``model.fp16-00001-of-00002.safetensors``, ``diffusion_pytorch_model.non_ema.bin``, an index
``model.fp16.safetensors.index.json``), which ``from_pretrained`` reads only when asked to."""


def _is_default(name: str) -> bool:
    """Whether ``name`` is one of :data:`DEFAULT_WEIGHTS`, or the shard index of one."""
    return name in DEFAULT_WEIGHTS or name.removesuffix(".index.json") in DEFAULT_WEIGHTS


def _preferred(names: list[str]) -> list[str]:
    """``names``, or of several the one of them named as :data:`DEFAULT_WEIGHTS` names it (or
    its index)."""
    defaults = [name for name in names if _is_default(name)]
    return defaults if len(names) > 1 and len(defaults) == 1 else names


def finder_metadata(name: str) -> bool:
    """Whether ``name`` is a file macOS's Finder makes in the folders it shows, of no value
    to anyone else: ``.DS_Store`` (the folder's view settings) and AppleDouble ``._*`` files
    (a file's metadata, beside every file copied to a volume without extended attributes).

    Example:
        >>> [finder_metadata(n) for n in (".DS_Store", "._model.safetensors", "config.json")]
        [True, True, False]
    """
    return name == ".DS_Store" or name.startswith("._")


def weights_layout(names: Iterable[str]) -> tuple[str | None, list[str]]:
    """Which of a model folder's files (``names``) holds its weights, as a directory is read:
    the first there is of a safetensors shard index, a single ``*.safetensors`` file, a torch
    shard index (``*.bin.index.json``), a single torch weights file with no ``*.safetensors``
    beside it. Of several files (or indexes), the one
    named as :data:`DEFAULT_WEIGHTS` names it (or its index) counts as the single one; where
    one of those is there, variants (``model.fp16.safetensors``, its shards and index) are
    not weights at all: ``from_pretrained`` reads the default beside them. Names that start
    with ``._`` are none of these: macOS writes such AppleDouble files (its metadata) beside
    every file it copies to a volume without extended attributes (exFAT, SMB), and
    ``._model.safetensors`` was a second weights file, ``._x.safetensors.index.json`` the
    index chosen. Returns the chosen name and the weights files seen, or ``None`` and those
    files where no single choice is there. The Hub reader decides by it what to download.

    Example:
        >>> weights_layout(["config.json", "model.safetensors", "model.fp16.safetensors"])
        ('model.safetensors', ['model.safetensors'])
        >>> weights_layout(["pytorch_model.bin", "model.fp16.safetensors"])
        ('pytorch_model.bin', ['pytorch_model.bin'])
        >>> weights_layout(["a.safetensors", "b.safetensors"])
        (None, ['a.safetensors', 'b.safetensors'])
        >>> weights_layout(["model.bf16.bin.index.json", "model.fp16.bin.index.json"])
        (None, ['model.bf16.bin.index.json', 'model.fp16.bin.index.json'])
    """
    names = sorted(name for name in names if not finder_metadata(name))
    if any(_is_default(name) for name in names):
        names = [name for name in names if not _VARIANT.fullmatch(name)]
    indexes = _preferred([name for name in names if name.endswith(".safetensors.index.json")])
    if indexes:  # several, none the default's (variants alone): no choice, as of single files
        return (indexes[0] if len(indexes) == 1 else None), indexes
    singles = _preferred([name for name in names if name.endswith(".safetensors")])
    torch_files = _preferred(
        [
            name
            for name in names
            if os.path.splitext(name)[1] in TORCH_SUFFIXES and not is_trainer_state(name)
        ]
    )
    torch_indexes = _preferred([name for name in names if name.endswith(".bin.index.json")])
    if len(singles) == 1:
        return singles[0], singles
    if torch_indexes:
        return (torch_indexes[0] if len(torch_indexes) == 1 else None), torch_indexes
    if not singles and len(torch_files) == 1:
        return torch_files[0], torch_files
    return None, singles or torch_files


def model_folder(checkpoint: Checkpoint) -> Path | None:
    """The directory a checkpoint was opened from (a model folder, a Hub snapshot), whose
    companion files (``config.json``, ``adapter_config.json``) describe it; ``None`` for a
    file or a checkpoint in memory."""
    folder = checkpoint.path
    return folder if folder is not None and folder.is_dir() else None


_PRETRAINED_WEIGHTS = re.compile(
    r"(model|pytorch_model|diffusion_pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)"
)
"""Names ``save_pretrained`` gives weights files (a shard's too): such a file, named on its
own, is described by the configs beside it."""


def _described_by(checkpoint: Checkpoint) -> Path | None:
    """The folder whose ``config.json`` or ``adapter_config.json`` describes ``checkpoint``:
    its own directory (:func:`model_folder`), or the folder holding a weights file named as
    ``save_pretrained`` names them (``model.safetensors``, ``adapter_model.bin``, a shard)."""
    folder = model_folder(checkpoint)
    if folder is not None:
        return folder
    path = checkpoint.path
    if path is not None and _PRETRAINED_WEIGHTS.fullmatch(path.name) and path.is_file():
        return path.parent
    return None


def declared_quantization(checkpoint: Checkpoint) -> str | None:
    """The quantization a model directory (or a weights file of one, named as
    ``save_pretrained`` names them) declares for its stored weights: the ``quant_method`` of
    its ``config.json``'s ``quantization_config`` (``"unnamed"`` without one), or ``None``:
    no such folder, no readable config, no quantization, or compressed-tensors stored
    ``"dense"`` (sparsity alone: the weights are floats).

    Example:
        >>> import json, pathlib, tempfile, torch, ladle
        >>> folder = ladle.save({"w": torch.ones(2)}, pathlib.Path(tempfile.mkdtemp()) / "m")
        >>> declared_quantization(ladle.open_checkpoint(folder)) is None
        True
        >>> config = {"quantization_config": {"quant_method": "gptq", "bits": 4}}
        >>> _ = (folder / "config.json").write_text(json.dumps(config))
        >>> declared_quantization(ladle.open_checkpoint(folder))
        'gptq'
    """
    folder = _described_by(checkpoint)
    if folder is None or not (folder / "config.json").is_file():  # a FIFO: reading waits
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # none, not JSON, or nested past parsing
        return None
    declared = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(declared, dict):
        return None
    method = str(declared.get("quant_method", "unnamed"))
    if method == "compressed-tensors" and declared.get("format") == "dense":
        return None
    return method


_QUANTIZED_NAMES = (
    (".qweight", "GPTQ or AWQ: packed integer weights"),
    (".SCB", "bitsandbytes 8-bit: int8 weights and their scales"),
    (".weight_format", "bitsandbytes 8-bit: int8 weights and their scales"),
    (".absmax", "bitsandbytes 4-bit: packed weights and their scales"),
    (".quant_map", "bitsandbytes 4-bit: packed weights and their scales"),
)
"""Key endings that only quantized layers store, and what they say."""


def stored_quantization(checkpoint: Checkpoint) -> str | None:
    """What in ``checkpoint``'s tensors shows quantized weights where no config declares
    them (a weights file under another name, a state dict or module in memory): a key only
    quantized layers store (GPTQ's and AWQ's ``qweight``, bitsandbytes' ``SCB`` and
    ``absmax``, MXFP4's ``_blocks`` beside ``_scales``), or float8 or integer weights beside
    their scale (``weight_scale_inv``, ``weight_scale``: FP8 with block scales,
    compressed-tensors' int8 and FP8, NVFP4's packed bytes); ``None`` otherwise. Float8
    weights without scales are weights, and merge.

    Example:
        >>> import torch, ladle
        >>> fp8 = {"l.weight": torch.ones(2, 2).to(torch.float8_e4m3fn),
        ...        "l.weight_scale_inv": torch.ones(1, 1)}
        >>> stored_quantization(ladle.open_checkpoint(fp8))
        "float8 weights with block scales ('l.weight' beside 'l.weight_scale_inv')"
        >>> stored_quantization(ladle.open_checkpoint({"l.weight": fp8["l.weight"]})) is None
        True
    """
    keys = checkpoint.keys()
    names = set(keys)
    for key in keys:
        for ending, what in _QUANTIZED_NAMES:
            if key.endswith(ending):
                return f"{what} ({key!r})"
        if key.endswith("_blocks") and key.removesuffix("_blocks") + "_scales" in names:
            return f"MXFP4: packed 4-bit weights and their scales ({key!r})"
        for scale, kind in (("_scale_inv", "block scales"), ("_scale", "scales")):
            weight = key.removesuffix(scale)
            if weight != key and weight in names:
                codes = _codes(checkpoint.dtype(weight))
                if codes is not None:
                    return f"{codes} weights with {kind} ({weight!r} beside {key!r})"
    return None


def _codes(dtype: torch.dtype) -> str | None:
    """What a weight of ``dtype`` beside a scale is: float8 or integer codes (``None`` for
    wider floats, which a scale beside them does not make codes)."""
    if dtype.is_floating_point:
        return "float8" if dtype.itemsize == 1 else None
    return None if dtype.is_complex or dtype == torch.bool else "integer"


def is_adapter(checkpoint: Checkpoint) -> bool:
    """Whether a checkpoint is a PEFT adapter: weights read from ``adapter_model.*`` files of
    a directory that holds ``adapter_config.json`` (the directory, or such a file, named; a
    model's own weights beside an adapter, ``model.safetensors``, are read first and are no
    adapter).

    Example:
        >>> import pathlib, tempfile, torch, ladle
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = ladle.save({"w": torch.ones(2)}, folder / "adapter_model.safetensors")
        >>> _ = (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        >>> is_adapter(ladle.open_checkpoint(folder)), is_adapter(ladle.open_checkpoint({}))
        (True, False)
    """
    folder = _described_by(checkpoint)
    if folder is None or not (folder / "adapter_config.json").is_file():
        return False
    return any(file.name.startswith("adapter_model") for file in checkpoint.file_sizes())


def _not_a_file(path: Path) -> str:
    """What stands at ``path`` (which exists, or is a link) where a regular file was expected:
    a broken symbolic link, named with where it leads (a Hub snapshot's link to a blob the
    cache lost), or ``"not a regular file"`` (a folder, a FIFO).

    Example:
        >>> import os, tempfile
        >>> link = Path(tempfile.mkdtemp()) / "model.safetensors"
        >>> os.symlink("/nowhere/x.safetensors", link)
        >>> _not_a_file(link), _not_a_file(link.parent)
        ('a broken symbolic link (to /nowhere/x.safetensors)', 'not a regular file')
    """
    if path.is_symlink() and not path.exists():
        return f"a broken symbolic link (to {os.readlink(path)})"
    return "not a regular file"


def _open_directory(directory: Path) -> Checkpoint:
    """The checkpoint of a model folder, read from the file :func:`weights_layout` chooses;
    else a ``CheckpointError`` naming the weights files there."""
    name = str(directory)
    # A folder's name ends with "/", as the Hub lists it: weights_layout passes it over.
    chosen, seen = weights_layout(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    if chosen is None:
        raise CheckpointError(
            f"{directory}: expected one weights file or a *.index.json, found {_some(seen)}"
        )
    path = directory / chosen
    if not path.is_file():  # a FIFO would be waited on for ever, deaf to Ctrl-C
        raise CheckpointError(f"{path}: {_not_a_file(path)}; expected the weights")
    checkpoint: Checkpoint
    if chosen.endswith(".safetensors.index.json"):
        sharded = SafetensorsCheckpoint(_read_index(path), name=name, path=directory)
        try:
            sharded.match_index(path)
        except CheckpointError:
            sharded.close()
            raise
        return sharded
    if chosen.endswith(".index.json"):
        checkpoint = TorchShardsCheckpoint(_read_index(path), name=name, path=directory, index=path)
    else:
        checkpoint = _open_file(path)
    checkpoint.path = directory  # the whole directory is the input, not just its file
    return checkpoint


def _some(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names``, and how many more there are.

    Example:
        >>> _some([]), _some(["a", "b"]), _some(list("abcdefgh"), 3)
        ('none', 'a, b', 'a, b, c and 5 more')
    """
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _open_file(file: Path) -> Checkpoint:
    if file.name.endswith(".index.json"):
        raise CheckpointError(
            f"{file}: a shard index, not a checkpoint; name the folder that holds it and its "
            f"shards ({file.parent})"
        )
    if file.suffix == ".safetensors":
        return SafetensorsCheckpoint.from_file(file)
    if file.suffix in TORCH_SUFFIXES:
        return TensorMapCheckpoint(load_torch_file(file), name=str(file), path=file, file=file)
    raise CheckpointError(
        f"{file}: unknown checkpoint format; expected .safetensors or one of "
        f"{', '.join(TORCH_SUFFIXES)}"
    )


def _checked_keys(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint``, given as such (a subclass of the user's, maybe), once its ``keys()``
    are known to be a collection of distinct ``str`` and its ``dtype()`` of each a
    ``torch.dtype``: ladle reads the keys more than once (a generator, as a zarr group's
    ``keys()``, was empty the second time: a greedy soup of nothing, a key check passed),
    and a key listed twice was counted twice by ``diff``."""
    keys = checkpoint.keys()
    if isinstance(keys, Iterator) or not isinstance(keys, Collection):
        raise TypeError(
            f"{checkpoint.name}: keys() gave {type_name(keys)}; expected a list of str (ladle "
            "reads the keys more than once, which a generator cannot give)"
        )
    seen: set[str] = set()
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"{checkpoint.name}: keys() gave {type_name(key)} {key!r}, not a str")
        if key in seen:
            raise CheckpointError(f"{checkpoint.name}: keys() lists {key!r} more than once")
        seen.add(key)
        dtype = checkpoint.dtype(key)  # "float32" failed deep in a merge (AttributeError)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(
                f"{checkpoint.name}: dtype({key!r}) gave {type_name(dtype)} {dtype!r}, "
                "expected a torch.dtype"
            )
    return checkpoint


def open_checkpoint(source: StateDictLike) -> Checkpoint:
    """Open ``source`` as a lazy, read-only :class:`Checkpoint`.

    Args:
        source: a mapping of names to tensors, an ``nn.Module`` (its ``state_dict()``), a
            ``.safetensors`` file, a torch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``; loaded
            with ``weights_only=True``), a directory holding either (sharded with a
            ``*.index.json`` or not), a Hugging Face Hub repo
            ``hf://owner/repo[@revision][/subfolder]`` (see :mod:`ladle.hub`), or an already
            open :class:`Checkpoint`.

    Returns:
        A :class:`Checkpoint`; use it as a context manager to close its files.

    Raises:
        CheckpointError: the source is missing, unreadable or of an unknown kind.
        UnsafeCheckpointError: a torch file would need arbitrary unpickling.
        TypeError: ``source`` is none of these kinds.

    Example:
        >>> import torch, ladle
        >>> ckpt = ladle.open_checkpoint({"w": torch.zeros(2, 3)})
        >>> ckpt.keys(), ckpt.shape("w"), ckpt.dtype("w")
        (['w'], (2, 3), torch.float32)
    """
    if isinstance(source, Checkpoint):
        return _checked_keys(source)
    if isinstance(source, torch.nn.Module):
        return TensorMapCheckpoint(source.state_dict(), name=f"<{type(source).__name__}>")
    if isinstance(source, Mapping):
        return TensorMapCheckpoint(source)
    if isinstance(source, (str, os.PathLike)):
        check_source("source", source)  # a path of bytes
        text = os.fspath(source)
        if text.startswith("hf://"):
            from .hub import open_hub_checkpoint  # huggingface_hub is imported only when needed

            return open_hub_checkpoint(text)
        if not text:  # Path("") is the current directory: an unset "$MODEL" merged what is there
            raise CheckpointError("expected a path to a checkpoint, found an empty one ('')")
        path = Path(text)
        try:
            mode = path.stat().st_mode
        except (OSError, ValueError) as err:  # ValueError: a NUL in the name, naming nothing
            if not isinstance(err, OSError) or err.errno in MISSING:
                raise CheckpointError(
                    f"{path}: no such file or directory{_hub_hint(text)}"
                ) from None
            raise CheckpointError(f"{path}: cannot read it ({err.strerror or err})") from err
        if S_ISDIR(mode):
            try:
                return _open_directory(path)
            except OSError as err:  # listing it: no permission, an I/O error
                raise CheckpointError(f"{path}: cannot read it ({err.strerror or err})") from err
        if S_ISREG(mode):
            return _open_file(path)
        raise CheckpointError(f"{path}: neither a file nor a directory")
    check_source("source", source)
    raise AssertionError("unreachable: check_source accepts only the kinds above")


def _hub_hint(text: str) -> str:
    """How to write a Hub repository, where ``text``, a path that names nothing, looks like
    one misspelt: ``HF://org/m`` (the scheme is lower case), or ``hf:/org/m`` (a ``Path`` of
    the URL, which collapses its ``//``); else nothing.

    Example:
        >>> _hub_hint(str(Path("hf://org/m")))
        '; a Hugging Face Hub repository is written hf://org/m, as a str (a Path collapses //)'
        >>> _hub_hint("HF://org/m"), _hub_hint("models/m")
        ('; a Hugging Face Hub repository is written hf://org/m (in lower case)', '')
    """
    match = re.match(r"hf:/+(?=[^/])", text, re.IGNORECASE)
    if match is None:
        return ""
    url = f"hf://{text[match.end() :]}"
    if not text.startswith("hf:"):
        return f"; a Hugging Face Hub repository is written {url} (in lower case)"
    return f"; a Hugging Face Hub repository is written {url}, as a str (a Path collapses //)"


_SOURCE_KINDS = (Checkpoint, torch.nn.Module, Mapping, str, os.PathLike)


def check_source(name: str, source: object) -> None:
    """A ``TypeError`` naming argument ``name`` unless ``source`` is of a kind
    :func:`open_checkpoint` opens (it is not opened).

    Example:
        >>> check_source("model 1", None)
        Traceback (most recent call last):
        TypeError: model 1: expected a mapping, nn.Module, path or Checkpoint, found None
    """
    if not isinstance(source, _SOURCE_KINDS):
        raise TypeError(
            f"{name}: expected a mapping, nn.Module, path or Checkpoint, found {type_name(source)}"
        )
    if isinstance(source, os.PathLike) and not isinstance(os.fspath(source), str):
        raise TypeError(f"{name}: expected a path of str, found {type_name(source)} of bytes")


def load(source: StateDictLike, *, device: str | torch.device = "cpu") -> StateDict:
    """Read every tensor of ``source`` into memory.

    Args:
        source: anything :func:`open_checkpoint` accepts.
        device: where to put the tensors (``"meta"``: their shapes and dtypes, nothing read).

    Returns:
        A new state dict whose tensors the caller owns (not backed by the file).

    Raises:
        ValueError: ``device`` is one torch does not know, or one this machine lacks
            (``cuda`` without CUDA), before anything is read; as the merges check it.
        CheckpointError: ``source`` cannot be read; the message names it and why.

    Example:
        >>> import torch, ladle
        >>> ladle.load({"w": torch.ones(2)})
        {'w': tensor([1., 1.])}
    """
    return _read_whole(source, _target(device), shared=False)


def _target(device: str | torch.device) -> str | torch.device:
    """``device`` where tensors read go, checked as merges check it
    (:func:`~ladle.engine.resolve_device`: a ``ValueError`` naming it), ``"meta"`` allowed:
    shapes and dtypes, nothing read."""
    from .engine import resolve_device  # the engine builds on this module

    if not isinstance(device, bool):
        try:
            if torch.device(device).type == "meta":
                return device
        except (RuntimeError, TypeError, ValueError, OverflowError):
            pass  # resolve_device names it
    return resolve_device(device)


def load_tied(source: StateDictLike) -> StateDict:
    """Every tensor of ``source`` read into memory on the CPU, as :func:`load` reads them,
    except that a tensor ``source`` names twice (tied weights, :meth:`Checkpoint.aliases`: a
    torch file of a tied model) is read once and held under each name, one tensor, as the
    source holds it; :func:`load` gives each name a copy of its own.

    Example:
        >>> import torch
        >>> w = torch.ones(2)
        >>> tensors = load_tied({"emb": w, "head": w})
        >>> tensors["head"] is tensors["emb"], tensors["emb"] is w
        (True, False)
    """
    return _read_whole(source, "cpu", shared=True)


def _copied(checkpoint: Checkpoint, key: str, device: str | torch.device) -> torch.Tensor:
    """``key`` of ``checkpoint`` copied whole to ``device``; torch's allocator out of memory
    (a ``RuntimeError``: an input larger than the memory, or an expanded tensor of a torch
    file that is a few bytes stored) a ``MemoryError`` naming the tensor."""
    shape = tuple(checkpoint.shape(key))
    try:
        return checkpoint._sliced(key, slice(None), shape).to(device, copy=True)
    except RuntimeError as err:
        if "can't allocate memory" not in str(err) and "out of memory" not in str(err):
            raise
        raise MemoryError(
            f"{checkpoint.name}: key {key!r} (shape {shape}, {checkpoint.dtype(key)}) does not "
            f"fit in the memory of {device}: {one_line(err)}"
        ) from err


def _read_whole(source: StateDictLike, device: str | torch.device, *, shared: bool) -> StateDict:
    """Every tensor of ``source`` copied to ``device`` (checked by the caller: :func:`_target`);
    with ``shared``, a tensor it names twice (:meth:`Checkpoint.aliases`) read once, under
    each name."""
    checkpoint = open_checkpoint(source)
    try:
        tied = checkpoint.aliases() if shared else {}
        if torch.device(device).type == "cpu":  # before any copy: else the OOM killer's
            sizes = {key: checkpoint.nbytes(key) for key in checkpoint.keys() if key not in tied}
            refuse_past_room(
                sizes,
                f"{checkpoint.name}: reading it whole",
                "read it a tensor at a time (ladle.open_checkpoint), or merge with out=",
                describe=lambda key: f"{key!r}, {sizes[key]:,} bytes",
            )
        tensors: StateDict = {}
        for key in checkpoint.keys():
            first = tied.get(key)  # an earlier key: read already
            tensors[key] = tensors[first] if first is not None else _copied(checkpoint, key, device)
        return tensors
    finally:
        if checkpoint is not source:
            checkpoint.close()
