"""The one exception hierarchy of ladle.

``LadleError`` is the root; catch it to handle every failure ladle reports on purpose.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "IncompatibleError",
    "LadleError",
    "NonFiniteError",
    "OutputError",
    "UnsafeCheckpointError",
]


class LadleError(Exception):
    """Base class of every error ladle raises on purpose."""


class CheckpointError(LadleError):
    """A checkpoint cannot be found, opened or read; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A torch file needs more than tensors to unpickle; it was not loaded and nothing ran."""


class IncompatibleError(LadleError, ValueError):
    """Models disagree on keys, shapes or kinds of dtype; the message names model and key."""


class NonFiniteError(LadleError, ValueError):
    """An input tensor holds NaN or Inf (the message names the model and key), or merged
    values overflow the output dtype although every input is finite (it names the output,
    the key, the dtype and how many values)."""


class OutputError(LadleError, OSError):
    """The output cannot be written (a full disk or quota, a file-size limit, no permission,
    an I/O error); the message names the output and what was being written. Also an
    ``OSError``, like the failure it wraps (``__cause__``)."""
