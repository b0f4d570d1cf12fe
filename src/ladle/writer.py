"""Streaming safetensors writer: sharded, atomic, with provenance metadata.

The output's keys, shapes and dtypes are known before any data is merged, so each shard's
header is written before its data and tensor bytes are appended as they are computed, one
chunk of rows at a time: the whole state dict never sits in memory. Everything is written under a
temporary name beside the destination and renamed into place only once complete and re-read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import math
import operator
import os
import re
import shutil
import socket
import stat
import struct
import sys
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, NoReturn

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import (
    SAFETENSORS_DTYPES,
    TORCH_SUFFIXES,
    _some,
    finder_metadata,
    not_a_dense_tensor,
    pread_into,
)
from .errors import LadleError, OutputError, check_flag, type_name, warn
from .hub import PREFIX

__all__ = ["SafetensorsWriter", "parse_size", "save"]

INDEX_NAME = "model.safetensors.index.json"
TEMP_MARK = ".ladle-tmp-"
OLD_MARK = ".ladle-old-"
"""Marks of a write's temporary output and of the output it replaces (renamed aside, then
deleted), each followed by ``PID-HOST-XXXXXXXX``: the writing process's id, a tag of its
host (:func:`_host_tag`) and 8 random hex digits."""
DEFAULT_MAX_SHARD_SIZE = "5GB"
"""The default ``max_shard_size`` of every function that writes a directory output, and of
the CLI's ``--max-shard-size``: huggingface_hub's (``split_torch_state_dict_into_shards``)."""
SYNC_EVERY = 64 * 2**20  # bytes between background write-backs of the output

_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

Spec = tuple[tuple[int, ...], torch.dtype]


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``.
    Anything else (a bool, a float, ``None``) is a ``TypeError``, a string that is no size or
    a size below one byte a ``ValueError``, naming ``max_shard_size``.

    Example:
        >>> parse_size("5GB"), parse_size("1KiB"), parse_size(42)
        (5000000000, 1024, 42)
        >>> parse_size(True)
        Traceback (most recent call last):
        TypeError: max_shard_size: expected bytes (an int) or a string such as '5GB', found bool
    """
    if not isinstance(size, str):
        boolean = isinstance(size, bool) or getattr(size, "dtype", None) == torch.bool
        try:  # numpy's integers and 0-d integer tensors too, as chunk_bytes takes them
            value = operator.index(size) if not boolean else None
        except TypeError:
            value = None
        if value is None:
            raise TypeError(
                "max_shard_size: expected bytes (an int) or a string such as '5GB', "
                f"found {type_name(size)}"
            )
    else:
        # ASCII: "٥GB" (an Arabic-Indic five) or "５GB" is no size argparse users mean
        match = re.fullmatch(r"\s*([+-]?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size, re.ASCII)
        unit = match.group(2).upper() if match else ""
        if not match or unit not in _UNITS:
            raise ValueError(f"max_shard_size: expected e.g. '5GB' or '500MiB', found {size!r}")
        # exact: float(...) overflowed for 400 digits and rounded 17 of them
        exact = Fraction(match.group(1)) * _UNITS[unit]
        if exact >= 1 and exact.denominator != 1:  # "1.5" was 1 byte: every tensor a shard
            raise ValueError(
                f"max_shard_size: expected a whole number of bytes, found {size!r} "
                f"({_decimal(exact)} bytes; a unit such as '1.5GB' names a larger size)"
            )
        value = int(exact)
    if value <= 0:  # "0.5B" too: a size below one byte
        raise ValueError(f"max_shard_size: expected at least 1 byte, found {size!r}")
    return value


def _decimal(value: Fraction) -> str:
    """``value``, a fraction whose denominator divides a power of ten (a decimal size times a
    unit of bytes), written out exactly: ``float`` showed ``1.0000001`` as ``1``.

    Example:
        >>> _decimal(Fraction(2000001, 2000))
        '1000.0005'
    """
    whole, rest = divmod(value.numerator, value.denominator)
    digits = ""
    while rest:
        digit, rest = divmod(rest * 10, value.denominator)
        digits += str(digit)
    return f"{whole}.{digits}" if digits else str(whole)


def _check_not_split(out: Path) -> None:
    """A ``LadleError`` for ``out`` written whole while a merge to it is split across
    processes (:func:`ladle.engine.partitioned`): a method that writes it itself, not
    through :func:`ladle.engine.merge` (a greedy soup, ``ladle.save`` of a merge in memory),
    would have every process write it, and replace the others' writes."""
    from .engine import current_partition  # engine imports this module

    part = current_partition()
    if part is not None and part.writes(out):
        raise LadleError(
            f"{out}: written whole by the method, not through ladle.engine.merge, while the "
            "merge is split across processes: run it in one process"
        )


def _nbytes(spec: Spec) -> int:
    shape, dtype = spec
    numel = 1
    for size in shape:
        numel *= size
    return numel * dtype.itemsize


def aligned_order(specs: Mapping[str, Spec]) -> list[str]:
    """Keys in the order a file lays them out: by element size, largest first, in their own
    order within one size. After the 8-byte aligned header every tensor then starts at a
    multiple of its element size, as safetensors' own writer arranges (a float32 tensor after
    3 bytes of bool would not: zero-copy readers need aligned data).

    Example:
        >>> aligned_order({"m": ((3,), torch.bool), "w": ((2,), torch.float32),
        ...                "h": ((1,), torch.float16), "b": ((2,), torch.float32)})
        ['w', 'b', 'h', 'm']
    """
    return sorted(specs, key=lambda key: -specs[key][1].itemsize)


def _plan_shards(specs: Mapping[str, Spec], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        nbytes = _nbytes(spec)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


MISLEADING_SUFFIXES = (*TORCH_SUFFIXES, ".safetensor", ".st")
"""Output suffixes of other weight formats, or misspellings of ``.safetensors``: an output
so named would be a directory (only ``.safetensors`` makes a file), which loaders pointed
at it take for a file."""


def single_file(out: str | os.PathLike) -> bool:
    """Whether output ``out`` is one safetensors file (a ``.safetensors`` name) rather than a
    directory: the writer's rule, which every caller that must know beforehand asks here."""
    return Path(out).suffix == ".safetensors"


def output_taken(out: str | os.PathLike) -> bool:
    """Whether something stands at ``out`` that only ``overwrite`` may replace: anything but
    an empty directory where a directory output goes (``mkdir out`` first), which the output
    replaces by a rename, as it replaces nothing. A directory holding only the Finder's
    metadata (``.DS_Store``, once macOS showed it; see
    :func:`~ladle.checkpoint.finder_metadata`) counts as empty: those files are deleted.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> output_taken(folder), output_taken(folder / "new")
        (False, False)
        >>> (folder / "x").touch(); output_taken(folder)
        True
    """
    path = physical_path(out)  # "missing/../x" is x once its folders are made
    if not os.path.lexists(path):
        return False
    if single_file(path) or path.is_symlink() or not path.is_dir():
        return True
    try:
        with os.scandir(path) as entries:
            return any(not finder_metadata(entry.name) for entry in entries)
    except FileNotFoundError:  # deleted meanwhile (or only just, by another NFS client)
        return False
    except OSError:  # unreadable: not known to be empty
        return True


def check_output_free(out: str | os.PathLike, *, overwrite: bool) -> None:
    """Raise a :class:`LadleError` naming ``out`` where writing it would replace what it may
    not: without ``overwrite``, anything there (see :func:`output_taken`); with it, anything
    but an earlier output of the same kind (see :func:`_not_an_output`). So ``overwrite``
    never deletes a folder of other files (a project, a training run's logs) nor turns a file
    into a folder or the reverse. An :class:`OutputError` where a folder of ``out`` is a file
    (the output could never be created: found before any work, not once a recipe's earlier
    steps have written theirs).

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> (folder / "code").mkdir(); (folder / "code" / "main.py").touch()
        >>> try:
        ...     check_output_free(folder / "code", overwrite=True)
        ... except LadleError as err:
        ...     print(str(err).split(": ")[1])
        is a folder without safetensors weights (main.py)
    """
    check_flag("overwrite", overwrite)
    blocked = _not_a_folder(physical_path(out))
    if blocked is not None:  # found now, not when the output is created
        raise OutputError(f"{out}: {blocked}") from NotADirectoryError(errno.ENOTDIR, blocked)
    if not output_taken(out):
        return
    if not overwrite:
        raise LadleError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    why = _not_an_output(physical_path(out))
    if why is not None:
        raise LadleError(
            f"{out}: {why}: overwrite replaces only an earlier output; move it away or choose "
            "another output"
        )


def _not_a_folder(target: Path) -> str | None:
    """What stands where a folder of ``target`` must be (the deepest of them that exists is
    a file, or a broken symbolic link), or ``None``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "notes.txt").write_text("not a folder")
        >>> _not_a_folder(folder / "notes.txt" / "merged").endswith("is a file, not a directory")
        True
    """
    for folder in target.parents:
        if os.path.lexists(folder):
            if folder.is_dir():
                return None
            what = "a broken symbolic link" if folder.is_symlink() else "a file"
            return f"{folder} is {what}, not a directory"
    return None


def _not_an_output(path: Path) -> str | None:
    """Why what stands at ``path`` is no earlier output that ``overwrite`` may replace, or
    ``None``: a file (not a folder) where a ``.safetensors`` output goes; a folder holding
    safetensors weights (a ``*.safetensors`` file or a ``*.safetensors.index.json``) where a
    folder output goes; a symbolic link, which is replaced itself (never what it points to)."""
    try:  # one look: other writers may be moving outputs in and out meanwhile
        mode = os.lstat(path).st_mode
    except FileNotFoundError:  # gone: another writer moved it aside
        return None
    if stat.S_ISLNK(mode):
        return None
    if single_file(path):
        return "is a folder, where a .safetensors output is a file" if stat.S_ISDIR(mode) else None
    if not stat.S_ISDIR(mode):
        return "is a file, where an output not named *.safetensors is a folder"
    try:
        names = sorted(entry.name for entry in os.scandir(path))
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"is a folder that cannot be listed ({err.strerror or err})"
    # Empty: nothing to lose (also a replaced output emptied by its writer while listed).
    names = [name for name in names if not finder_metadata(name)]
    if not names or any(
        name.endswith((".safetensors", ".safetensors.index.json")) for name in names
    ):
        return None
    return f"is a folder without safetensors weights ({_some(names)})"


def physical_path(out: str | os.PathLike) -> Path:
    """``out`` made absolute as the system finds it: a ``..`` after a symbolic link to a folder
    leads to the parent of the folder linked to, where ``os.path.abspath`` drops ``link/..``
    as text (naming another folder than the one the system writes to). What follows the
    last ``..`` is kept as given (resolved by the system as it is written: a link as the
    last name is replaced, never written through). A file before a ``..`` is an
    :class:`OutputError`, as the system refuses it (``os.path.realpath`` drops ``file/..``).

    Example:
        >>> import os
        >>> from ladle.writer import physical_path
        >>> here = Path(os.getcwd()).resolve()
        >>> physical_path("merged.safetensors") == here / "merged.safetensors"
        True
    """
    parts = Path(out).parts  # ".." kept: pathlib parses without collapsing it
    if ".." not in parts:  # the text is the place: folders are created as named
        return Path(os.path.abspath(out))
    last = len(parts) - 1 - parts[::-1].index("..")
    climbed = Path(os.getcwd(), *parts[:last])  # what the last ".." leads out of
    for folder in (*reversed(climbed.parents), climbed):  # realpath would drop a file and ..
        if os.path.lexists(folder) and not folder.is_dir():
            what = "a broken symbolic link" if folder.is_symlink() else "a file"
            raise OutputError(
                f"{out}: {folder} is {what}, not a directory: the system cannot resolve the "
                "'..' after it"
            )
    return Path(os.path.realpath(Path(os.getcwd(), *parts[: last + 1])), *parts[last + 1 :])


def check_amendment(
    owner: str, key: str, index: torch.Tensor, values: torch.Tensor, spec: Spec | None
) -> None:
    """A ``LadleError`` (its message begun with ``owner``) unless ``index`` and ``values``
    are entries of a tensor of ``spec`` (its shape and dtype; ``None``: no such tensor),
    flat indices into it (into its real view, for complex), each once, and values of its
    dtype.

    Example:
        >>> check_amendment("out", "w", torch.tensor([1]), torch.ones(1), ((2,), torch.float32))
    """
    if spec is None:
        raise LadleError(f"{owner}: amend({key!r}) of a tensor not planned")
    if index.dtype not in (torch.int64, torch.int32):  # uint8 would index as a mask
        raise LadleError(
            f"{owner}: amend({key!r}) expected an index of torch.int64 or torch.int32, got "
            f"{index.dtype}"
        )
    if index.dim() != 1:  # flat indices: in memory a 2-D one indexed, the writer failed
        raise LadleError(
            f"{owner}: amend({key!r}) expected a 1-D index of flat positions, got one of shape "
            f"{tuple(index.shape)}"
        )
    dtype = spec[1].to_real()  # a complex tensor's parts
    if values.dtype != dtype or values.shape != index.shape:
        raise LadleError(
            f"{owner}: amend({key!r}) expected {tuple(index.shape)} values of {dtype}, got "
            f"{tuple(values.shape)} of {values.dtype}"
        )
    if index.numel() == 0:
        return
    numel = _nbytes(spec) // dtype.itemsize  # parts, for complex
    increasing = _increasing(index)  # as merges give them: no entry twice, and no sort
    low, high = (index[0], index[-1]) if increasing else (index.min(), index.max())
    if int(low) < 0 or int(high) >= numel:
        raise LadleError(
            f"{owner}: amend({key!r}) index {int(low) if low < 0 else int(high)} is outside "
            f"the tensor's {numel} entries"
        )
    if increasing:
        return
    ordered = index.sort().values
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.numel():  # which value lands was torch's choice, another in memory than here
        raise LadleError(
            f"{owner}: amend({key!r}) names entry {int(repeated[0])} more than once; one "
            "value per entry"
        )


def _increasing(index: torch.Tensor) -> bool:
    """Whether the flat ``index`` is strictly increasing: each entry once, in order, as the
    merges' amendments come (a linear test: sorting each amendment, twice checked and once
    to patch, took half of a TIES merge whose bf16 sign ties filled whole keys).

    Example:
        >>> _increasing(torch.tensor([1, 4, 9])), _increasing(torch.tensor([1, 1]))
        (True, False)
    """
    return bool((index[1:] > index[:-1]).all())


_SEPARATORS = tuple({os.sep, os.altsep or os.sep})


def check_output_name(out: str | os.PathLike, name: str = "out") -> None:
    """A ``TypeError`` naming parameter ``name`` for an output that is no path of ``str``
    (bytes, or an ``os.PathLike`` whose ``os.fspath`` gives bytes); a
    ``LadleError`` for an output path that cannot mean what it says: empty, an ``hf://``
    URL (a local ``hf:/`` folder otherwise), ending in ``.`` or ``..`` (a folder's own name),
    in ``.safetensors`` not in lower case (a directory) or followed by a slash, in another
    weight format's suffix (:data:`MISLEADING_SUFFIXES`), or named with more bytes than a
    file name may have.

    Example:
        >>> from ladle.writer import check_output_name
        >>> check_output_name("merged.safetensors"), check_output_name("merged")
        (None, None)
        >>> try:
        ...     check_output_name("merged.pt")
        ... except LadleError as err:
        ...     print(str(err).split(":")[:2])
        ['merged.pt', ' ladle writes safetensors']
    """
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a str or os.PathLike path, found {type_name(out)}")
    if not isinstance(os.fspath(out), str):
        raise TypeError(f"{name}: expected a path of str, found {type_name(out)} of bytes")
    if not os.fspath(out):
        raise LadleError(f"{name}: expected a path, found an empty one")
    if "\0" in os.fspath(out):  # else Python's "embedded null byte", naming nothing
        raise LadleError(f"{name}: a path cannot hold a NUL character, found {os.fspath(out)!r}")
    if os.fspath(out).startswith(PREFIX):  # else written to the local folder hf:/owner/name
        raise LadleError(
            f"{out}: an output is a local path, not a Hub repo; write a directory and upload "
            "it with --push-to-hub OWNER/REPO (ladle.hub.push_to_hub in Python)"
        )
    if Path(out).name in ("", ".."):  # ".", "/", "x/..": a folder's own name, never renamed into
        raise LadleError(
            f"{out}: names no file or folder of its own (it ends in '.' or '..'); name the "
            "output, e.g. DIR/merged or DIR/merged.safetensors"
        )
    suffix = Path(out).suffix
    if suffix.lower() == ".safetensors" and os.fspath(out).endswith(_SEPARATORS):
        raise LadleError(  # else one file, the slash dropped as pathlib drops it
            f"{os.fspath(out)}: ends in {os.fspath(out)[-1]!r} (a directory) but names a "
            f".safetensors file; write {Path(out)} (one file) or a directory named without "
            "the suffix"
        )
    if suffix.lower() == ".safetensors" and suffix != ".safetensors":
        raise LadleError(
            f"{out}: only a lower-case .safetensors suffix writes one file (this would be a "
            "directory): name it NAME.safetensors"
        )
    if suffix.lower() in MISLEADING_SUFFIXES:
        raise LadleError(
            f"{out}: ladle writes safetensors: name the output NAME.safetensors (one file) "
            "or a directory without a weights suffix"
        )
    size = len(os.fsencode(Path(out).name))
    if size > _NAME_MAX:  # else refused by the final rename, once the merge is done
        raise LadleError(
            f"{out}: its name is {size} bytes long; a file name may have {_NAME_MAX} at most"
        )
    for folder in Path(out).parent.parts:  # else the system's "File name too long"
        size = len(os.fsencode(folder))
        if size > _NAME_MAX:
            raise LadleError(
                f"{out}: its folder name {folder[:40]}… is {size} bytes long; a name may have "
                f"{_NAME_MAX} at most"
            )


HEADER_LIMIT = 100_000_000
"""Largest header safetensors reads (its ``MAX_HEADER_SIZE``): bytes of JSON per file."""


def _is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogate, as a torch file's key may hold)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_storable(out: str | os.PathLike, specs: Mapping[str, Spec]) -> None:
    """A ``LadleError`` naming output ``out`` for a tensor of ``specs`` that safetensors cannot
    store: one named ``__metadata__`` or by no string, or of a dtype it has no code for
    (``complex128``). Merges call it before their first pass over the inputs.

    Example:
        >>> import torch
        >>> check_storable("out.safetensors", {"z": ((2,), torch.complex128)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ladle.errors.LadleError: out.safetensors: tensor 'z': safetensors cannot store dtype ...
    """
    for key, (_, dtype) in specs.items():
        if not isinstance(key, str):
            raise LadleError(
                f"{out}: tensor {key!r}: safetensors names tensors by strings, found "
                f"{type_name(key)}"
            )
        if key == "__metadata__":
            raise LadleError(
                f"{out}: tensor '__metadata__': safetensors keeps that name for the header's "
                "metadata and cannot store a tensor under it; rename the key"
            )
        if not _is_utf8(key):  # a lone surrogate: JSON escapes it, safetensors refuses it
            raise LadleError(
                f"{out}: tensor {key!r}: its name is no valid UTF-8 text, which safetensors "
                "needs; rename the key"
            )
        if dtype not in _DTYPE_CODES:
            raise LadleError(f"{out}: tensor {key!r}: safetensors cannot store dtype {dtype}")


def _header(
    out: Path, specs: Mapping[str, Spec], keys: list[str], metadata: Mapping[str, str]
) -> bytes:
    """A shard's header (length, JSON, padding), or a ``LadleError`` naming output ``out`` for
    what safetensors could not read back: a tensor named ``__metadata__`` or by no string, a
    dtype it has no code for, a header past :data:`HEADER_LIMIT`; metadata that is not text
    is a bad argument, a ``TypeError`` naming ``out`` too, and a ``"format"`` other than
    ``"pt"`` a ``ValueError``."""
    for name, value in metadata.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(
                f"{out}: metadata: safetensors stores text only; found {type_name(name)} "
                f"{name!r} -> {type_name(value)}"
            )
        if not (_is_utf8(name) and _is_utf8(value)):
            raise ValueError(
                f"{out}: metadata: {name!r} -> {value!r} is no valid UTF-8 text (a lone "
                "surrogate), which safetensors needs"
            )
    if metadata.get("format", "pt") != "pt":
        raise ValueError(
            f"{out}: metadata: 'format' names the framework of the tensors, 'pt' for torch "
            f"(transformers reads it to choose a loader); found {metadata['format']!r}"
        )
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    check_storable(out, {key: specs[key] for key in keys})
    offset = 0
    for key in keys:
        shape, dtype = specs[key]
        end = offset + _nbytes(specs[key])
        entries[key] = {
            "dtype": _DTYPE_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    # As safetensors writes it: UTF-8 (names and metadata checked to be), not \uXXXX escapes,
    # which made a header of CJK names twice the size of the one it was read from.
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned
    if len(text) > HEADER_LIMIT:
        raise LadleError(
            f"{out}: header of {len(text)} bytes: safetensors reads at most {HEADER_LIMIT} "
            "(shorter metadata, or more shards with a smaller max_shard_size)"
        )
    return struct.pack("<Q", len(text)) + text


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` in row-major order.

    torch calls a tensor of one element contiguous whatever its strides (``w[::4][:1]``, a
    column of a one-row matrix), and ``view(torch.uint8)`` refuses such a tensor whose
    stride is not 1: it is copied first."""
    # conjugate and negative views (x.conj(), x.conj().imag) have no bytes of their own yet
    flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.numel() and flat.stride(0) != 1:
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


@contextlib.contextmanager
def _output_errors(out: Path, what: str) -> Iterator[None]:
    """An ``OSError`` raised inside (a full disk, a file-size limit, no permission, an I/O
    error) as an :class:`OutputError` naming the output ``out`` and ``what`` failed."""
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"{out}: {what} failed: {err.strerror or err}") from err


_KEEP_SIZE = 1  # FALLOC_FL_KEEP_SIZE: reserve disk blocks, leave the file's size as it is
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate(fd, mode, offset, length)`` on Linux; ``None`` elsewhere.

    Not ``os.posix_fallocate``: that sets the file's size, and glibc emulates it, writing a
    byte in every block, on filesystems that cannot allocate without writing. Looked up for
    each output file (microseconds), not cached.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, "fallocate64", None)
        if function is None and ctypes.sizeof(ctypes.c_long) == 8:  # a 64-bit off_t
            function = libc.fallocate
    except (OSError, AttributeError):
        return None
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


def _create_reserved(path: Path, size: int, out: Path) -> None:
    """Create the empty file ``path`` with ``size`` bytes of disk reserved for it.

    A disk or quota that cannot hold it raises ``OutputError`` now, naming ``out``, rather than
    once the merge has run for as long as it takes to get there. The reservation also makes
    the writes cheaper: on ext4, 89 MiB were written in 9.6 ms instead of 15.6 ms. Where the
    system cannot reserve (no ``fallocate``: macOS), the writes allocate as they go, and a
    file larger than the disk's free space is still refused now (a quota is not seen then).
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if size == 0:
            return
        # Refused first where the disk has not the room: a failed fallocate keeps what it got
        # (ext4), so the disk was full for every other writer until the file went.
        free = shutil.disk_usage(path.parent).free
        if size > free:
            _no_room(out, size, os.strerror(errno.ENOSPC), free)
        function = _fallocate()
        if function is None or function(descriptor, _KEEP_SIZE, 0, size) == 0:
            return
        code = ctypes.get_errno()
        if code in _FULL:  # a quota, or a disk filled meanwhile
            os.ftruncate(descriptor, 0)  # gives back what was reserved, before measuring
            _no_room(out, size, os.strerror(code), shutil.disk_usage(path.parent).free)
    finally:
        os.close(descriptor)


def _no_room(out: Path, size: int, why: str, free: int) -> NoReturn:
    raise OutputError(
        f"{out}: cannot reserve {size} bytes of disk for the output ({why}); {free} bytes are "
        "free there"
    )


def _flush_to_disk(descriptor: int) -> None:
    """Flush a file's data to the disk itself before it is renamed into place: ``os.fsync``,
    or on macOS ``fcntl(F_FULLFSYNC)``, since its ``fsync`` leaves the data in the drive's
    cache, where a power cut loses it (``fsync`` where a filesystem refuses the call)."""
    import fcntl  # POSIX only: here, so that importing ladle needs none of it

    full = getattr(fcntl, "F_FULLFSYNC", None)
    if full is not None:
        try:
            fcntl.fcntl(descriptor, full)
            return
        except OSError:  # a filesystem without it (some network ones): fsync at least
            pass
    os.fsync(descriptor)


def _write_back(descriptor: int) -> None:
    """Write a file's data to disk: ``os.fdatasync`` where Python has it, else ``os.fsync``
    (macOS has no ``fdatasync``)."""
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(descriptor)


def _host_tag() -> str:
    """This host's tag in the names of temporary outputs: 8 hex digits of a hash of its name
    and, on Linux, of its process-id namespace.

    A process id names a process of its own host only; on a filesystem that several hosts
    mount, the tag tells which host can judge whether the writer is still running. Containers
    on one host often share its name (host networking, or one ``--hostname`` for all) but
    not its process ids: by name alone, one took another's running writer, whose pid its own
    namespace lacks, for dead, and deleted its temporary output. The host's own namespace is
    the same one across reboots, so a bare host's tag stays as it was.
    """
    name = socket.gethostname()
    with contextlib.suppress(OSError):  # no /proc (macOS): the name alone
        name += "\0" + os.readlink("/proc/self/ns/pid")
    return hashlib.blake2b(name.encode(), digest_size=4).hexdigest()


def _marked(path: Path, mark: str) -> Path:
    """A new name beside ``path`` for this process's write: ``.NAME{mark}PID-HOST-XXXXXXXX``
    (NAME shortened where the whole would pass a file name's 255 bytes: :func:`_stem`)."""
    suffix = f"{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex[:8]}"
    return path.parent / f".{_stem(path.name, mark)}{mark}{suffix}"


_NAME_MAX = 255
"""The bytes most filesystems allow in a file name (ext4, XFS, APFS, NTFS's 255 characters)."""


def _stem(name: str, mark: str) -> str:
    """``name`` as the names of temporaries beside it begin: whole, or where one of them would
    pass :data:`_NAME_MAX` bytes (an output named with 230 bytes is a name the system takes,
    its temporary was not), its first characters and a hash of the whole.

    Example:
        >>> _stem("out.safetensors", TEMP_MARK)
        'out.safetensors'
        >>> long = _stem("a" * 230 + ".safetensors", TEMP_MARK)
        >>> len(long), long[:3], long[-9]
        (215, 'aaa', '~')
        >>> _stem("a" * 215, TEMP_MARK) == "a" * 215, _stem("a" * 216, TEMP_MARK)[-9]
        (True, '~')
    """
    room = _NAME_MAX - len(f".{mark}{_MAX_PID}-{'0' * 8}-{'0' * 8}")
    if len(os.fsencode(name)) <= room:
        return name
    digest = "~" + hashlib.blake2b(os.fsencode(name), digest_size=4).hexdigest()
    cut = name
    while len(os.fsencode(cut + digest)) > room:
        cut = cut[:-1]
    return cut + digest


def _temporary_beside(path: Path) -> Path:
    return _marked(path, TEMP_MARK)


_MAX_PID = 2**31 - 1
"""The largest process id there can be (``pid_t`` is 32 bits; ``os.kill`` raises
``OverflowError`` past it)."""


def stale_leftovers(path: Path) -> Iterator[Path]:
    """Leftovers of earlier writes to ``path`` whose process is gone (killed, crashed):
    temporary outputs, and replaced outputs renamed aside, which the next write to ``path``
    deletes. Only this host's are judged: the process of another host's leftover may be
    running there (a filesystem several mount)."""
    host = _host_tag()
    for mark in (TEMP_MARK, OLD_MARK):
        for leftover in path.parent.glob(f".{glob.escape(_stem(path.name, mark))}{mark}*"):
            fields = leftover.name.rsplit(mark, 1)[1].split("-")
            if len(fields) != 3 or fields[1] != host or not fields[0].isdigit():
                continue
            pid = int(fields[0])
            if 0 < pid <= _MAX_PID and not _alive(pid):  # others: no write of ours made them
                yield leftover


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the :func:`stale_leftovers` of earlier writes to ``path``."""
    for leftover in list(stale_leftovers(path)):
        _remove(leftover)


def _discard(temp: Path, made: list[Path]) -> None:
    """Delete a writer's temporary output ``temp`` and the folders ``made`` for it (deepest
    first), as :meth:`SafetensorsWriter.abort` does, where nothing ended the writer."""
    _remove(temp)
    for folder in made:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _remove(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a directory tree, quietly (even
    where the name itself is refused, too long: it must not hide why we are here)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


RENAME_ATTEMPTS = 16
"""Tries to swap a directory output in while other writers swap theirs (see
:func:`rename_into_place`)."""


_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)
"""What a rename onto an output fails with where another output took its place meanwhile: a
non-empty directory, or an output of the other kind (a file where a directory goes, or the
reverse)."""


def rename_into_place(temp: Path, out: Path, *, overwrite: bool) -> None:
    """Move a finished output from its temporary name ``temp`` to ``out`` by renames only.

    A file replaces a file in one rename. Otherwise an existing ``out`` (only with
    ``overwrite``) is first renamed aside, then deleted once the new output is in place, so a
    reader sees the old output or the new one, never a mix. Where the new one cannot take
    its place, the old one goes back (see :func:`_put_back`).
    """
    if not overwrite:
        appeared = f"{out}: appeared while merging; the result is left unwritten"
        if output_taken(out):  # a symbolic link, even a dangling one, counts as there
            raise LadleError(appeared)
        try:  # replaces an empty directory too; fails if anything else appeared meanwhile
            _clear_finder_metadata(out)
            os.replace(temp, out)
        except OSError as err:
            if err.errno in _TAKEN:
                raise LadleError(appeared) from err
            raise
        return
    # Other writers may be swapping outputs in at the same time: whatever stands at ``out``
    # is renamed aside (it may be gone already) and ours renamed in; where another output
    # took the place in between (a directory cannot replace a non-empty one, nor an output
    # of the other kind: _TAKEN), again.
    for _ in range(RENAME_ATTEMPTS):
        why = _not_an_output(out)  # nothing there, or an empty folder, passes too
        if why is not None:  # another writer's output passes; anything else stays
            raise LadleError(
                f"{out}: {why} (it appeared while merging): overwrite replaces only an earlier "
                "output; the result is left unwritten"
            )
        in_one = temp.is_file() and not out.is_dir() and not out.is_symlink()
        old = None if in_one else _marked(out, OLD_MARK)
        try:
            if old is not None:
                with contextlib.suppress(FileNotFoundError):  # gone: another writer moved it
                    os.replace(out, old)
            os.replace(temp, out)  # a file replaces a file (or nothing) in this one rename
        except BaseException as err:  # an interrupt too: the old output must not stay aside
            if old is not None:
                _put_back(old, out)
            if isinstance(err, OSError) and err.errno in _TAKEN and os.path.lexists(out):
                continue
            raise
        if old is not None:
            try:
                _remove(old)
            except BaseException:  # Ctrl-C while deleting: ours is in place, the old must go
                _remove(old)
                raise
            if os.path.lexists(old):  # a folder of read-only folders, say: it stays hidden
                warn(
                    f"{out}: written; the earlier output, moved aside to {old}, could not be "
                    "deleted (permissions?): delete it yourself"
                )
        return
    raise LadleError(f"{out}: other writers kept replacing it; the result is left unwritten")


def _clear_finder_metadata(folder: Path) -> None:
    """Delete the Finder's files (see :func:`~ladle.checkpoint.finder_metadata`) from
    ``folder``, if it is one, so that a rename may replace it (only an empty one can be)."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if finder_metadata(entry.name) and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _put_back(old: Path, out: Path) -> None:
    """Return the output renamed aside to ``old`` to ``out``, where ours failed to take its
    place. Where another output took the place meanwhile, the old one is superseded by it and
    deleted; where it can go neither back nor away (the only copy), it stays aside."""
    if not os.path.lexists(old):  # never moved aside: it was gone already
        return
    if not os.path.lexists(out):
        with contextlib.suppress(OSError):  # e.g. a non-empty directory appeared meanwhile
            os.replace(old, out)
    if os.path.lexists(old) and os.path.lexists(out):
        _remove(old)


def write_extra_files(
    directory: Path, files: Mapping[str, bytes | str | os.PathLike], *, out: Path | None = None
) -> None:
    """Write each ``name: content`` into ``directory``: bytes as they are, a file or a folder
    copied (links followed: a Hub snapshot's files are links into its blobs); each flushed to
    disk, as the weights are, before the folder is renamed into place. A failure is an
    :class:`OutputError` naming the output ``out`` (default ``directory``) and the file."""
    for name, content in files.items():
        target = directory / name
        what = (
            f"writing {name!r}"
            if isinstance(content, bytes)
            else f"copying {os.fsdecode(content)!r} into it as {name!r}"  # an input's, say
        )
        with _output_errors(directory if out is None else out, what):
            _write_extra(target, content)


def _write_extra(target: Path, content: bytes | str | os.PathLike) -> None:
    if isinstance(content, bytes):
        _write_flushed(target, content)
        return
    if Path(content).is_dir():
        shutil.copytree(content, target)
    else:
        shutil.copyfile(content, target)
    for file in [p for p in target.rglob("*") if p.is_file()] if target.is_dir() else [target]:
        with open(file, "rb") as handle:
            _flush_to_disk(handle.fileno())


def write_index_file(directory: Path, total_size: int, weight_map: Mapping[str, str]) -> None:
    """Write ``model.safetensors.index.json`` into ``directory``, flushed to disk.

    A file's data reaches the disk later than its name: without the flush, a power cut soon
    after the folder was renamed into place could leave an empty index under the final name.
    """
    _write_flushed(directory / INDEX_NAME, index_bytes(total_size, weight_map))


def index_bytes(total_size: int, weight_map: Mapping[str, str]) -> bytes:
    """The text of ``model.safetensors.index.json`` in transformers' format, its
    ``weight_map`` in the output's order of keys (transformers sorts them; ladle reads a
    sharded model's keys in its index's order, so a merge of this output keeps the order)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}
    return (json.dumps(index, indent=2) + "\n").encode()


def _write_flushed(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        _flush_to_disk(handle.fileno())


def _checked_extra_files(
    out: Path, single_file: bool, files: Mapping[str, bytes | str | os.PathLike]
) -> dict[str, bytes | str | os.PathLike]:
    """Extra files of a directory output: plain names that are not weights or the index."""
    if files and single_file:
        raise LadleError(f"{out}: extra files need a directory output, not a .safetensors file")
    for name in files:
        if (
            name in ("", ".", "..", INDEX_NAME)
            or "/" in name
            or "\\" in name
            or name.endswith(".safetensors")
        ):
            raise LadleError(f"{out}: {name!r} cannot be an extra file of the output")
    return dict(files)


def _rows_of(chunk: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether ``chunk`` holds rows of a tensor of ``shape``: its own rows, or rows of it with
    leading dimensions merged (``engine.chunk_shape``, for a tensor one row of which exceeds a
    chunk), which never hold more than one of its own rows between them."""
    if chunk.dim() == 0:  # a scalar: the whole of a 0-d tensor, no rows of any other
        return len(shape) == 0
    rest, shape = tuple(chunk.shape[1:]), tuple(shape)
    if rest == shape[1:]:
        return True
    merged = {tuple(shape[start:]) for start in range(2, len(shape) + 1)}
    return rest in merged and chunk.numel() <= math.prod(shape[1:])


FoundSpec = tuple[tuple[int, ...], object]  # a shape, and a dtype or a dtype's code


def _found_spec(handle, key: str) -> FoundSpec:  # type: ignore[no-untyped-def]
    """The shape and dtype of ``key`` in an open safetensors file (the dtype's code where
    torch has no such dtype)."""
    view = handle.get_slice(key)
    code = view.get_dtype()
    return tuple(view.get_shape()), SAFETENSORS_DTYPES.get(code, code)


def _first_difference(expected: Mapping[str, FoundSpec], found: Mapping[str, FoundSpec]) -> str:
    """The first key, in planned order, whose shape and dtype differ from those planned (or
    the first key found that was not planned), as "expected ..., found ..."."""

    def spec(value: FoundSpec | None) -> str:
        return "none" if value is None else f"{tuple(value[0])} {value[1]}"

    for key, planned in expected.items():
        if found.get(key) != planned:
            return f"expected {key!r} {spec(planned)}, found {spec(found.get(key))}"
    extra = next(key for key in found if key not in expected)
    return f"expected no {extra!r}, found {spec(found[extra])}"


_ENDED = {
    "committed": "already committed (its output is in place)",
    "aborted": "already aborted (its temporary output is deleted)",
    "commit failed": "whose commit() failed (only abort() is left to call)",
    "write failed": "whose write() failed (only abort() is left to call)",
    "amend failed": "whose amend() failed (only abort() is left to call)",
}
"""How a writer ended, as the error for a later write says it."""


class SafetensorsWriter:
    """Write tensors, in a planned order and a chunk of rows at a time, into safetensors.

    ``out`` ending in ``.safetensors`` is one file; any other ``out`` is a directory holding
    ``model.safetensors``, or shards of at most ``max_shard_size`` bytes (a tensor larger than
    that gets a shard of its own) with ``model.safetensors.index.json``, plus ``extra_files``
    (a name to bytes or to a file to copy: a config, a model card) written into the temporary
    directory so that they land with the weights. Making a writer creates the temporary
    output's files with their disk space reserved (where the filesystem can): a disk or
    quota too small raises ``OutputError`` then, before anything is merged. Use as a context
    manager: leaving it without an exception re-reads the output and renames it into place;
    leaving it with one deletes the temporary output.

    Example:
        >>> import tempfile, torch, ladle
        >>> from ladle.writer import SafetensorsWriter
        >>> path = tempfile.mkdtemp() + "/merged.safetensors"
        >>> with SafetensorsWriter(path, {"w": ((2, 2), torch.float32)}) as writer:
        ...     writer.write("w", torch.ones(1, 2))  # row 0
        ...     writer.write("w", torch.zeros(1, 2))  # row 1
        >>> ladle.load(path)["w"].tolist()
        [[1.0, 1.0], [0.0, 0.0]]
    """

    def __init__(
        self,
        out: str | os.PathLike,
        specs: Mapping[str, Spec],
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
        extra_files: Mapping[str, bytes | str | os.PathLike] | None = None,
    ) -> None:
        check_output_name(out)
        self.out = Path(out)
        _check_not_split(self.out)
        check_output_free(self.out, overwrite=overwrite)
        # In the write order; shapes as ints (a Checkpoint subclass's may be numpy's)
        self._specs = {
            key: (tuple(int(side) for side in specs[key][0]), specs[key][1])
            for key in aligned_order(specs)
        }
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(
                f"metadata: expected a mapping of str to str, found {type_name(metadata)}"
            )
        self._metadata = {"format": "pt", **(metadata or {})}
        self._single_file = single_file(self.out)
        self._extra = _checked_extra_files(self.out, self._single_file, extra_files or {})
        shards = (
            [list(self._specs)]
            if self._single_file
            else _plan_shards(self._specs, parse_size(max_shard_size))
        )
        # Each shard's header, built once: written first, its length places the data and
        # sizes the file. Built before anything is created, so that a dtype or metadata it
        # refuses leaves nothing.
        self._headers = [_header(self.out, self._specs, keys, self._metadata) for keys in shards]
        # Every file operation names absolute paths: the working directory may change while
        # the merge runs (another thread's chdir), the output's place must not.
        self._target = physical_path(self.out)
        self._temp = _temporary_beside(self._target)
        self._made: list[Path] = []  # folders made for the output, deepest first
        self._overwrite = overwrite
        if self._single_file:
            self._files = [self._temp]
        else:
            names = (
                ["model.safetensors"]
                if len(shards) == 1
                else [
                    f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    for i in range(1, len(shards) + 1)
                ]
            )
            self._files = [self._temp / name for name in names]
        self._shards = shards
        self._queue = [(shard, key) for shard, keys in enumerate(shards) for key in keys]
        self._amending: dict[int, int] = {}  # shard -> descriptor patched by amend, till commit
        self._data_starts: dict[str, tuple[int, int]] = {}  # key -> (shard, offset of its data)
        self._position = 0  # index into self._queue of the key being written
        self._written = 0  # bytes of that key written so far
        self._handle: BinaryIO | None = None
        self._shard = -1
        self._unsynced = 0  # bytes written since the last write-back started
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ladle-sync")
        self._sync: Future[None] | None = None
        self._ended: str | None = None  # how it ended: a key of _ENDED
        # Everything abort() needs is set: from here, whatever stops the constructor (an
        # error, Ctrl-C) takes away what it made.
        self._unfinished: weakref.finalize[[Path, list[Path]], SafetensorsWriter] | None = None
        try:
            with _output_errors(self.out, "creating the output"):
                self._create()
            # Ctrl-C before a with statement takes charge of the writer, or at the first
            # instruction of its __exit__, runs neither commit nor abort: what was made then
            # goes when the writer is collected, or at exit.
            self._unfinished = weakref.finalize(self, _discard, self._temp, self._made)
        except BaseException:
            self.abort()
            raise

    def _create(self) -> None:
        """Make the output's folders, the temporary output and every shard's disk space."""
        blocked = _not_a_folder(self._target)
        if blocked is not None:
            raise NotADirectoryError(errno.ENOTDIR, blocked)
        # Folders made for the output go again with it, should it never be written.
        above = (self._target.parent, *self._target.parent.parents)
        self._made = [folder for folder in above if not os.path.lexists(folder)]
        self._target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(self._target)
        if not self._single_file:
            self._temp.mkdir(parents=False)
        for shard, file in enumerate(self._files):  # before anything is merged
            _create_reserved(file, self._shard_bytes(shard), self.out)
        if not self._single_file:  # room left for the index and extra files (not reserved)
            needed, free = self._companion_bytes(), shutil.disk_usage(self._temp).free
            if needed > free:
                raise OutputError(
                    f"{self.out}: no room for its index and extra files ({needed} bytes, "
                    f"beside its weights' {sum(map(self._shard_bytes, range(len(self._files))))}"
                    f" reserved); {free} bytes are free there"
                )

    @property
    def order(self) -> list[str]:
        """The keys in the order they are to be written: :func:`aligned_order` of ``specs``
        (their own order where their dtypes agree). Writes in another order are refused."""
        return list(self._specs)

    def write(self, key: str, chunk: torch.Tensor) -> None:
        """Append ``chunk`` (the next rows of ``key``, or all of it) to the output; its rows
        may be those of ``key`` with leading dimensions merged (``(E·H, I)`` for a tensor of
        shape ``(E, H, I)``)."""
        self._check_open(f"write({key!r})")
        if chunk.numel() == 0 and key in self._specs:
            return  # nothing to write; empty tensors are skipped in order
        self._check_rows(key, chunk)  # a refused write leaves the writer as it was
        # Until the chunk is written: one that fails part-way (a full disk, an interrupt)
        # leaves the output and the writer's count of it out of step, so nothing follows.
        self._ended = "write failed"
        with _output_errors(self.out, f"writing {key!r}"):
            self._write(chunk)
        self._ended = None

    def _check_rows(self, key: str, chunk: torch.Tensor) -> None:
        """A ``LadleError`` unless ``chunk`` holds the next rows due: of the next tensor
        planned, of its dtype, no more than it has left. Reads the writer, changes nothing."""
        position = self._due()
        if position >= len(self._queue):
            raise LadleError(f"writer for {self.out}: got {key!r} after the last planned tensor")
        expected = self._queue[position][1]
        shape, dtype = self._specs[expected]
        if key != expected or chunk.dtype != dtype or not _rows_of(chunk, shape):
            raise LadleError(
                f"writer for {self.out}: expected the next rows of {expected!r} ({dtype}, rows "
                f"of shape {tuple(shape[1:])}), got {key!r} ({chunk.dtype}, {tuple(chunk.shape)})"
            )
        total, nbytes = _nbytes((shape, dtype)), chunk.numel() * dtype.itemsize
        if self._written + nbytes > total:
            raise LadleError(
                f"writer for {self.out}: more bytes for {key!r} than its shape {tuple(shape)}: "
                f"{self._written} of its {total} bytes written, then {nbytes}"
            )

    def _due(self) -> int:
        """The position in the queue of the tensor due next: the current one, or where
        :meth:`_skip_empty` will move past empty tensors (found here without moving)."""
        position = self._position
        while position < len(self._queue) and _nbytes(self._specs[self._queue[position][1]]) == 0:
            position += 1
        return position

    def _write(self, chunk: torch.Tensor) -> None:
        """Append ``chunk``, which :meth:`_check_rows` found due."""
        self._skip_empty()
        shard, key = self._queue[self._position]
        if shard != self._shard:
            self._start_shard(shard)
        assert self._handle is not None
        data = _raw_bytes(chunk)
        total = _nbytes(self._specs[key])
        self._handle.write(data)
        self._unsynced += data.nbytes
        if self._unsynced >= SYNC_EVERY and (self._sync is None or self._sync.done()):
            if self._sync is not None:  # its failure (EIO) is this write's: never dropped
                self._sync.result()
            # Start writing back what is written so far, on a thread, while merging goes on,
            # so that the fsync before the rename has little left to wait for.
            self._handle.flush()
            self._sync = self._syncer.submit(_write_back, self._handle.fileno())
            self._unsynced = 0
        self._written += data.nbytes
        if self._written == total:
            self._position += 1
            self._written = 0
            self._skip_empty()

    def amend(self, key: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the entries at flat ``index`` of ``key``, once every tensor is written.

        For merges whose last statistic is known only at the end: the entries are patched in
        the temporary output, in place, before it is renamed. ``values`` are of the tensor's
        dtype; for a complex tensor, of its real dtype, and ``index`` is into its real view
        (:func:`torch.view_as_real`: entry ``2k`` is the real part of entry ``k``, ``2k + 1``
        its imaginary part), as merges compute.
        """
        self._check_open(f"amend({key!r})")
        self._check_amend(key, index, values)  # a refused amend leaves the writer as it was
        self._ended = "amend failed"  # until every entry is patched: never commit a part
        with _output_errors(self.out, f"amending {key!r}"):
            self._amend(key, index, values)
        self._ended = None

    def _check_open(self, call: str) -> None:
        """A ``LadleError`` for ``call`` on a writer that has ended: committed, aborted, or
        whose commit, a write or an amend failed (then only ``abort`` is left to call). A
        writer writes one output, once: writing again takes a new writer."""
        if self._ended is not None:
            raise LadleError(
                f"writer for {self.out}: {call} on a writer {_ENDED[self._ended]}; a writer "
                "writes its output once: make a new SafetensorsWriter to write again"
            )

    def _check_amend(self, key: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """A ``LadleError`` unless every tensor is written and ``index`` and ``values`` are
        entries of ``key``. Reads the writer, changes nothing."""
        if self._due() < len(self._queue):
            raise LadleError(
                f"writer for {self.out}: amend({key!r}) before every tensor is written"
            )
        check_amendment(f"writer for {self.out}", key, index, values, self._specs.get(key))

    def _amend(self, key: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Patch the entries, which :meth:`_check_amend` found to be ``key``'s."""
        if index.numel() == 0:
            return
        dtype = self._specs[key][1].to_real()
        if self._handle is not None:
            self._handle.flush()
        shard, start = self._data_start(key)
        if shard not in self._amending:  # kept open, and flushed once, at commit
            if len(self._amending) >= AMEND_OPEN_FILES:  # the oldest, flushed and closed
                _close_descriptor(self._amending.pop(next(iter(self._amending))), sync=True)
            self._amending[shard] = os.open(self._files[shard], os.O_RDWR)
        fd = self._amending[shard]
        if not _increasing(index):
            order = torch.argsort(index)
            index, values = index[order], values[order]
        index, values = index.cpu().contiguous(), values.cpu()  # a strided view: searched
        # Patch a window of at most 1 MiB at a time: read it, change it, write it back.
        step = max(1, 2**20 // dtype.itemsize)
        first = 0
        while first < index.numel():
            low = int(index[first])
            last = int(torch.searchsorted(index, low + step))
            span = int(index[last - 1]) - low + 1
            window = torch.empty(span * dtype.itemsize, dtype=torch.uint8, device="cpu")
            view = memoryview(window.numpy())  # type: ignore[arg-type]
            if pread_into(fd, view, start + low * dtype.itemsize) != view.nbytes:
                raise LadleError(f"{self.out}: short read while amending {key!r}")
            window.view(dtype)[index[first:last] - low] = values[first:last]
            if os.pwrite(fd, view, start + low * dtype.itemsize) != view.nbytes:
                raise LadleError(f"{self.out}: short write while amending {key!r}")
            first = last

    def _data_start(self, key: str) -> tuple[int, int]:
        """The shard holding ``key`` and the offset of its data there (all keys, found once)."""
        if not self._data_starts:
            for shard, keys in enumerate(self._shards):
                offset = len(self._headers[shard])
                for name in keys:
                    self._data_starts[name] = (shard, offset)
                    offset += _nbytes(self._specs[name])
        return self._data_starts[key]

    def _close_amended(self, *, sync: bool) -> None:
        """Close the files ``amend`` patched, flushed to disk first with ``sync``."""
        while self._amending:
            _close_descriptor(self._amending.popitem()[1], sync=sync)

    def _skip_empty(self) -> None:
        """Zero-sized tensors take no bytes and need no write: move past them (to
        :meth:`_due`), beginning the shards they lie in."""
        for _ in range(self._due() - self._position):
            shard = self._queue[self._position][0]
            if shard != self._shard:
                self._start_shard(shard)
            self._position += 1

    def _start_shard(self, shard: int) -> None:
        self._close_handle()
        self._shard = shard
        # "r+b": the file exists, empty, with its disk reserved; "wb" would free that space.
        self._handle = open(self._files[shard], "r+b")  # noqa: SIM115 (closed in _close_handle)
        self._handle.write(self._headers[shard])

    def _close_handle(self) -> None:
        if self._sync is not None:
            self._sync.result()
            self._sync = None
        if self._handle is not None:
            self._handle.flush()
            _flush_to_disk(self._handle.fileno())
            self._handle.close()
            self._handle = None
        self._unsynced = 0

    def commit(self) -> Path:
        """Check the output is complete, then rename it into place; returns the final path.

        Once called, the writer writes nothing more, even where the commit fails: then only
        :meth:`abort` is left to call.
        """
        self._check_open("commit()")
        self._ended = "commit failed"  # until it succeeds
        with _output_errors(self.out, "finishing the output"):
            path = self._commit()
        self._ended = "committed"
        if self._unfinished is not None:
            self._unfinished.detach()
        return path

    def _commit(self) -> Path:
        self._skip_empty()
        if self._position < len(self._queue) or self._written:
            missing = self._queue[self._position][1]
            raise LadleError(f"writer for {self.out}: closed before {missing!r} was written")
        for shard in range(len(self._shards)):  # shards of only empty tensors still need a header
            if shard > self._shard:
                self._start_shard(shard)
        self._close_handle()
        self._close_amended(sync=True)
        if not self._single_file:
            self._write_index()
            write_extra_files(self._temp, self._extra, out=self.out)  # renamed with the weights
        self._syncer.shutdown()
        self._verify()
        self._rename_into_place()
        return self.out

    def abort(self) -> None:
        """Delete the temporary output; nothing appears under the final name. Again, or after
        a commit that succeeded, it does nothing."""
        if self._ended == "committed":
            return
        self._ended = "aborted"
        if self._unfinished is not None:
            self._unfinished.detach()  # done here
        self._close_amended(sync=False)
        if self._sync is not None:
            with contextlib.suppress(OSError):
                self._sync.result()  # never close a file a write-back still uses
            self._sync = None
        self._syncer.shutdown()
        if self._handle is not None:
            handle, self._handle = self._handle, None
            # Closing flushes what is buffered, which fails again where the flush that brought
            # us here failed (a file-size limit, a full disk): the file goes anyway.
            with contextlib.suppress(OSError):
                handle.close()
        _remove(self._temp)  # quietly: a failure to delete must not hide why we are here
        for folder in self._made:  # deepest first; one something else put a file in stays
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _index(self) -> tuple[int, dict[str, str]] | None:
        """The index's ``total_size`` and ``weight_map``; ``None`` for one file, which has none."""
        if len(self._files) == 1:
            return None
        total = sum(_nbytes(spec) for spec in self._specs.values())
        return total, {key: self._files[shard].name for shard, key in self._queue}

    def _write_index(self) -> None:
        index = self._index()
        if index is not None:
            write_index_file(self._temp, *index)

    def _companion_bytes(self) -> int:
        """Disk the index and extra files will take, each rounded up to whole blocks of the
        output's filesystem (a file being copied that cannot be asked counts as empty: its
        copy fails later, naming it)."""
        block = max(os.statvfs(self._temp).f_frsize, 1)
        index = self._index()
        sizes = [] if index is None else [len(index_bytes(*index))]
        for content in self._extra.values():
            if isinstance(content, bytes):
                sizes.append(len(content))
                continue
            root = Path(content)
            files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
            for file in files:
                with contextlib.suppress(OSError):
                    sizes.append(file.stat().st_size)
        return sum(-(-size // block) * block for size in sizes)

    def _verify(self) -> None:
        """Re-read every header: the keys, shapes and dtypes must be those planned, and each
        file as long as they make it."""
        for shard, (file, keys) in enumerate(zip(self._files, self._shards)):
            where = (
                f"{self.out}: the written file {self.out.name if self._single_file else file.name}"
            )
            try:
                with safe_open(str(file), framework="numpy") as handle:
                    found = {key: _found_spec(handle, key) for key in handle.keys()}
            except (SafetensorError, OSError) as err:
                raise LadleError(f"{where} does not read back ({err})") from err
            expected = {key: (tuple(self._specs[key][0]), self._specs[key][1]) for key in keys}
            if found != expected:
                raise LadleError(
                    f"{where} does not hold what was planned: {_first_difference(expected, found)}"
                )
            size, planned = file.stat().st_size, self._shard_bytes(shard)
            if size != planned:
                raise LadleError(f"{where} has {size} bytes, expected {planned}")

    def _shard_bytes(self, shard: int) -> int:
        """The size of finished shard ``shard``: its header, then its tensors' data."""
        return len(self._headers[shard]) + sum(
            _nbytes(self._specs[key]) for key in self._shards[shard]
        )

    def _rename_into_place(self) -> None:
        rename_into_place(self._temp, self._target, overwrite=self._overwrite)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


def _close_descriptor(descriptor: int, *, sync: bool) -> None:
    """Close ``descriptor``, its writes flushed to disk first with ``sync``."""
    try:
        if sync:
            _flush_to_disk(descriptor)
    finally:
        os.close(descriptor)


AMEND_OPEN_FILES = 8
"""Most shards :meth:`SafetensorsWriter.amend` keeps open at once (amendments come in key
order, so in shard order): one descriptor per patched shard, kept to the commit, failed with
"Too many open files" past about 250 shards under macOS's limit of 256 (1,020 under Linux's
1,024) that a TIES merge patched."""


def save(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``state_dict`` as safetensors, atomically.

    Args:
        state_dict: names to tensors (any device; written as they are, larger elements
            first: :func:`aligned_order`).
        path: a ``.safetensors`` file, or a directory written Hugging Face style
            (``model.safetensors``, or shards with ``model.safetensors.index.json``).
        max_shard_size: largest shard of a directory output, e.g. ``"5GB"`` (the default,
            :data:`DEFAULT_MAX_SHARD_SIZE`) or ``"500MiB"``.
        metadata: strings stored in every shard's header.
        overwrite: replace an earlier output (atomically) instead of refusing: a file where
            a ``.safetensors`` output goes, a directory holding safetensors weights where a
            directory output goes (anything else is refused: see :func:`check_output_free`).

    Returns:
        The path written.

    Raises:
        TypeError: ``state_dict`` maps something other than strings to tensors, or
            ``metadata`` something other than strings to strings (naming the output),
            ``path`` is no path of ``str`` (bytes, say), or (for a directory
            output) ``max_shard_size`` is neither an int nor a string.
        ValueError: a tensor is sparse or on the meta device (no data to write), ``metadata``
            gives a ``"format"`` other than ``"pt"`` (the default, which transformers reads),
            or (for a directory output) ``max_shard_size`` is no positive size.
        LadleError: the output exists (without ``overwrite``) or is no earlier output (with
            it), its name is refused (:func:`check_output_name`), or safetensors cannot hold
            a tensor's dtype or the header; the message names the output.
        OutputError: writing failed (a full disk, no permission), naming the output.

    Example:
        >>> import tempfile, torch, ladle
        >>> out = ladle.save({"w": torch.ones(3)}, tempfile.mkdtemp() + "/model")
        >>> sorted(p.name for p in out.iterdir())
        ['model.safetensors']
    """
    check_output_name(path, "path")
    if not isinstance(state_dict, Mapping):  # a module: "'Linear' has no attribute 'items'"
        hint = "; pass its .state_dict()" if isinstance(state_dict, torch.nn.Module) else ""
        raise TypeError(
            f"state_dict: expected a mapping of str to torch.Tensor, found "
            f"{type_name(state_dict)}{hint}"
        )
    for key, tensor in state_dict.items():
        problem = not_a_dense_tensor(key, tensor)
        if problem is None:
            continue
        if isinstance(key, str) and isinstance(tensor, torch.Tensor):  # without dense data
            raise ValueError(f"state_dict: {problem}; safetensors stores dense tensors")
        raise TypeError(f"state_dict: {problem}")
    specs = {key: (tuple(t.shape), t.dtype) for key, t in state_dict.items()}
    with SafetensorsWriter(
        path, specs, max_shard_size=max_shard_size, metadata=metadata, overwrite=overwrite
    ) as writer:
        for key in writer.order:
            writer.write(key, state_dict[key])
    return Path(path)
