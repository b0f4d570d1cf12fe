"""The one exception hierarchy of ladle.

``LadleError`` is the root; catch it to handle every failure ladle reports on purpose.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from types import FrameType

__all__ = [
    "CheckpointError",
    "IncompatibleError",
    "LadleError",
    "NonFiniteError",
    "OutputError",
    "UnsafeCheckpointError",
]


class LadleError(Exception):
    """Base class of every error ladle raises on purpose.

    Example:
        >>> import torch, ladle
        >>> try:
        ...     ladle.uniform_soup([{"w": torch.ones(2)}, {"v": torch.ones(2)}])
        ... except ladle.LadleError as err:
        ...     print(type(err).__name__)
        IncompatibleError
    """


class CheckpointError(LadleError):
    """A checkpoint cannot be found, opened or read; the message names the file.

    Example:
        >>> import ladle
        >>> ladle.load("no/such/model.safetensors")
        Traceback (most recent call last):
        ladle.errors.CheckpointError: no/such/model.safetensors: no such file or directory
    """


class UnsafeCheckpointError(CheckpointError):
    """A torch file needs more than tensors to unpickle; it was not loaded and nothing ran.

    Example:
        >>> import pathlib, pickle, tempfile, ladle
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.pt"
        >>> _ = path.write_bytes(pickle.dumps({"w": print}, protocol=2))  # a reference to code
        >>> try:
        ...     ladle.load(path)
        ... except ladle.UnsafeCheckpointError as err:
        ...     print("refused to unpickle" in str(err), "it references print" in str(err))
        True True
    """


class IncompatibleError(LadleError, ValueError):
    """Models disagree on keys, shapes or kinds of dtype; the message names model and key.

    Example:
        >>> import torch, ladle
        >>> try:
        ...     ladle.uniform_soup([{"w": torch.ones(2)}, {"w": torch.ones(3)}])
        ... except ladle.IncompatibleError as err:
        ...     print(err)
        model 1 (<state dict>): key 'w' has shape (3,), model 0 (<state dict>) has (2,)
    """


class NonFiniteError(LadleError, ValueError):
    """An input tensor holds NaN or Inf (the message names the model and key), or merged
    values overflow the output dtype although every input is finite (it names the output,
    the key, the dtype and how many values).

    Example:
        >>> import torch, ladle
        >>> bad = {"w": torch.tensor([1.0, float("nan")])}
        >>> try:
        ...     ladle.uniform_soup([{"w": torch.ones(2)}, bad])
        ... except ladle.NonFiniteError as err:
        ...     print(str(err).split(";")[0])
        model 1 (<state dict>): key 'w' holds NaN or Inf values
        >>> ladle.uniform_soup([{"w": torch.ones(2)}, bad], allow_nonfinite=True)["w"]
        tensor([1., nan])
    """


class OutputError(LadleError, OSError):
    """The output cannot be written (a full disk or quota, a file-size limit, no permission,
    an I/O error); the message names the output and what was being written. Also an
    ``OSError``, like the failure it wraps (``__cause__``).

    Example:
        >>> import pathlib, tempfile, torch, ladle
        >>> a_file = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
        >>> _ = a_file.write_text("not a folder")
        >>> try:
        ...     ladle.save({"w": torch.ones(2)}, a_file / "merged.safetensors")
        ... except ladle.OutputError as err:
        ...     print(isinstance(err, OSError), str(err).endswith("is a file, not a directory"))
        True True
    """


def type_name(value: object) -> str:
    """What the argument checks say they found where a value is of the wrong kind: its type's
    name, or ``None``.

    Example:
        >>> type_name("0.5"), type_name(None), type_name(1j)
        ('str', 'None', 'complex')
    """
    return "None" if value is None else type(value).__name__


def one_line(message: object) -> str:
    """``str(message)`` with every run of whitespace, line breaks included, as one space: an
    error of another library quoted inside one of ours, which the CLI prints as one line.

    Example:
        >>> one_line(ValueError("bad header:\\n  offsets overlap "))
        'bad header: offsets overlap'
    """
    return " ".join(str(message).split())


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the caller's line that called into ladle, however deep
    inside ladle the warning arises (a fixed ``stacklevel`` named a line of ladle's own).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("look")
        >>> caught[0].message.args, caught[0].filename.startswith("<doctest")
        (('look',), True)
    """
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    with _bars_cleared():
        warnings.warn(message, category, stacklevel=level if frame is not None else 2)


def _bars_cleared() -> contextlib.AbstractContextManager[None]:
    """Where tqdm is loaded (a merge's ``progress`` bars), its bars on the standard streams
    cleared while a warning prints and redrawn after it: printed on a bar's line, the warning
    was glued to the bar. tqdm is not imported for this."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None or sys.stderr is None:
        return contextlib.nullcontext()
    return tqdm.tqdm.external_write_mode(file=sys.stderr)


def check_flag(name: str, value: object) -> bool:
    """``value`` as a bool: ``True`` or ``False`` (a numpy bool too); anything else is a
    ``TypeError`` naming parameter ``name`` (``overwrite="no"``, being truthy, replaced an
    output).

    Example:
        >>> check_flag("overwrite", False)
        False
        >>> check_flag("overwrite", "no")
        Traceback (most recent call last):
        TypeError: overwrite: expected True or False, found str
    """
    numpy = sys.modules.get("numpy")  # not imported, so no numpy bool (``import ladle`` is light)
    if isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected True or False, found {type_name(value)}")
