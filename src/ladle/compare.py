"""Comparing two checkpoints tensor by tensor: norms of their difference and their cosine."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch

from .checkpoint import StateDictLike, tied_names
from .engine import (
    DEFAULT_CHUNK_BYTES,
    Kernel,
    check_compatible,
    check_unpacked,
    float64_home,
    fold,
    is_merged_dtype,
    open_models,
    resolve_device,
)
from .errors import LadleError, check_flag

__all__ = ["DiffReport", "TensorDiff", "diff"]


class TensorDiff(NamedTuple):
    """How two tensors (or the whole models, for ``DiffReport.total``) differ.

    Attributes:
        key: the tensor's name (``""`` for the total).
        norm_a: ‖a‖₂, or ‖a − base‖₂ with a base.
        norm_b: ‖b‖₂, or ‖b − base‖₂ with a base.
        norm_diff: ‖a − b‖₂.
        cosine: ⟨a, b⟩ / (‖a‖·‖b‖) (of the task vectors with a base), rounded into [-1, 1];
            exactly 1 for identical tensors (``norm_diff`` 0), NaN when a norm is 0.

    Example:
        >>> import torch, ladle
        >>> report = ladle.diff({"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])})
        >>> row = report.tensors[0]
        >>> row.key, row.norm_a, row.norm_b, row.norm_diff, row.cosine
        ('w', 3.0, 4.0, 5.0, 0.0)
    """

    key: str
    norm_a: float
    norm_b: float
    norm_diff: float
    cosine: float


class DiffReport(NamedTuple):
    """What :func:`diff` returns.

    Attributes:
        tensors: one :class:`TensorDiff` per floating or complex tensor (a complex one as
            its real and imaginary parts: the cosine of ``Re⟨a, b⟩``), in the reference's
            key order.
        total: the same over all floating tensors taken as one vector, a tensor named twice
            in every input (tied weights: its rows are equal) counted once.
        skipped: keys of integer and bool tensors (buffers), not compared.

    Example:
        >>> import torch, ladle
        >>> a = {"w": torch.tensor([1.0, 0.0]), "steps": torch.tensor(3)}
        >>> b = {"w": torch.tensor([1.0, 1.0]), "steps": torch.tensor(5)}
        >>> tensors, total, skipped = ladle.diff(a, b)
        >>> [row.key for row in tensors], round(total.cosine, 4), skipped
        (['w'], 0.7071, ['steps'])
    """

    tensors: list[TensorDiff]
    total: TensorDiff
    skipped: list[str]


def _row(key: str, exponent: float, aa: float, bb: float, ab: float, dd: float) -> TensorDiff:
    """The row of the sums Σa², Σb², Σab, Σ(a−b)², of the entries divided by 2^``exponent``
    (:func:`_scaled_sums`): identical tensors (Σ(a−b)² = 0) have the same norm and a cosine of
    exactly 1 (NaN if both are 0)."""
    scale = math.ldexp(1.0, int(exponent))  # 1.0 but for entries past float64's squares
    if dd == 0.0:  # a == b: whatever order the dot products summed in
        norm = math.sqrt(aa) * scale
        return TensorDiff(key, norm, norm, 0.0, 1.0 if aa > 0 else math.nan)
    product = aa * bb  # √(aa·bb) rounds once: ±1 exactly for b = ±2ᵏ·a (√aa·√bb: 0.99...98)
    # (a subnormal product keeps too few bits: √aa·√bb then)
    normal = sys.float_info.min <= product < math.inf
    denominator = math.sqrt(product) if normal else math.sqrt(aa) * math.sqrt(bb)
    cosine = ab / denominator if denominator > 0 else math.nan
    if abs(cosine) > 1.0:  # rounding (1.0000000000000002): acos-safe
        cosine = math.copysign(1.0, cosine)
    norms = (math.sqrt(aa) * scale, math.sqrt(bb) * scale, math.sqrt(dd) * scale)
    return TensorDiff(key, *norms, cosine)


SCALED_BEYOND = 2.0**500
"""Entries whose magnitude passes it (or all lie below its inverse) are summed divided by a
power of two: their float64 squares would overflow (past about 1e154) or underflow (below
about 1e-154). Others are summed as they are, so their figures keep every bit."""


def _scaled_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[e, Σa², Σb², Σab, Σ(a−b)²]`` of the float64 ``a`` and ``b`` divided by 2^e, where
    ``e`` is 0 unless their largest magnitude passes :data:`SCALED_BEYOND` (or is below its
    inverse), then that magnitude's exponent: ``diff`` of entries near 1e200 gave infinite
    norms and a NaN cosine, of entries near 1e-200 norms of 0.

    Example:
        >>> x = torch.tensor([3e200, 0.0], dtype=torch.float64)
        >>> e, aa, *_ = _scaled_sums(x, x).tolist()
        >>> e, math.sqrt(aa) * 2**e
        (666.0, 3e+200)
    """
    largest = float(torch.maximum(a.abs().max(), b.abs().max())) if a.numel() else 0.0
    exponent = 0
    if math.isfinite(largest) and (largest > SCALED_BEYOND or 0 < largest < 1 / SCALED_BEYOND):
        exponent = math.frexp(largest)[1]
        a, b = torch.ldexp(a, torch.tensor(-exponent)), torch.ldexp(b, torch.tensor(-exponent))
    d = a - b
    sums = torch.stack([a.dot(a), b.dot(b), a.dot(b), d.dot(d)]).cpu()
    return torch.cat([torch.tensor([float(exponent)], dtype=torch.float64), sums])


def _added(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sums of :func:`_scaled_sums` ``x`` and ``y``, at the larger of their exponents
    (the other's sums divided by 4 to the difference: past float64's range, nothing)."""
    if x[0] < y[0]:
        x, y = y, x
    shift = int(x[0] - y[0])
    return torch.cat([x[:1], x[1:] + torch.ldexp(y[1:], torch.tensor(-2 * shift))])


def _float64(x: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``x``, where float64 lives (:func:`~ladle.engine.float64_home`)."""
    return x.to(float64_home(x.device), torch.float64, copy=True)


def _stats_kernel() -> Kernel:
    """Per chunk: [Σa², Σb², Σab, Σ(a−b)²] in float64, a and b the task vectors with a base."""

    def init(key: str, rows: slice, base: torch.Tensor | None) -> list[Any]:
        # base, a, b; in float64 on the CPU for a device without it
        return [None if base is None else _float64(base), None, None]

    def update(state: list[Any], index: int, x: torch.Tensor) -> list[Any]:
        # x is only valid during this call: keep an owned copy
        state[1 + index] = _float64(x) if state[0] is None else _float64(x).sub_(state[0])
        return state

    def finalize(state: list[Any]) -> torch.Tensor:
        return _scaled_sums(state[1].reshape(-1), state[2].reshape(-1))

    return Kernel(init, update, finalize)


@contextmanager
def _named_a_and_b(names: list[str]) -> Iterator[None]:
    """Errors inside called by the parameters' names: ``a`` and ``b``, where the engine says
    "model 0" and "model 1" (its inputs are a list). ``names`` holds the checkpoints' names
    once they are open: until then, only the input that failed to open is named, first.
    """
    try:
        yield
    except (LadleError, TypeError) as err:
        if len(err.args) == 1 and isinstance(err.args[0], str):
            err.args = (_renamed(err.args[0], names),)
        raise


def _renamed(message: str, names: list[str]) -> str:
    """``message`` with the engine's labels of the two models, ``model 0 (NAME)`` (or the
    leading ``model 0`` of a source that did not open) and ``model 1``, as ``a`` and ``b``.

    Example:
        >>> _renamed("model 1 (y.pt): key 'w' has shape (3,), model 0 (x.pt) has (2,)",
        ...          ["x.pt", "y.pt"])
        "b (y.pt): key 'w' has shape (3,), a (x.pt) has (2,)"
        >>> _renamed("model 1: expected a mapping, nn.Module, path or Checkpoint, found int", [])
        'b: expected a mapping, nn.Module, path or Checkpoint, found int'
    """
    for index, label in enumerate(("a", "b")):
        engine = f"model {index}"
        if message.startswith((f"{engine} (", f"{engine}:")):
            message = label + message[len(engine) :]
        if index < len(names):
            message = message.replace(f"{engine} ({names[index]})", f"{label} ({names[index]})")
    return message


def diff(
    a: StateDictLike,
    b: StateDictLike,
    *,
    base: StateDictLike | None = None,
    device: str | torch.device = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    allow_nonfinite: bool = False,
) -> DiffReport:
    """Per-tensor L2 norms of ``a − b`` and the cosine of ``a`` and ``b`` (or of their task
    vectors ``a − base``, ``b − base``), streamed key by key.

    ``cos = ⟨a, b⟩ / (‖a‖₂·‖b‖₂)`` per tensor and over the whole model; sums run in float64.
    With a base, the cosine of task vectors is the quantity Model Stock (Jang et al. 2024)
    builds on; ≈1 means two fine-tunings moved the same way. Only a chunk of each tensor is in
    memory at a time.

    Args:
        a: the first model (anything :func:`ladle.open_checkpoint` accepts).
        b: the second model; same keys and shapes.
        base: a common base; compare the task vectors ``a − base`` and ``b − base``.
        device: where the sums run.
        chunk_bytes: largest piece of one tensor read at a time.
        allow_nonfinite: compare models holding NaN or Inf (their norms and cosines are then
            NaN or Inf where those values are) instead of raising NonFiniteError.

    Returns:
        A :class:`DiffReport`.

    Raises:
        IncompatibleError: the models' keys, shapes or dtype kinds differ; the message names
            them ``a`` and ``b`` (and ``base``), each with its file: "b (ft.safetensors): key
            'w' has shape (3,), a (pre.safetensors) has (2,)".
        NonFiniteError: a model holds NaN or Inf, unless ``allow_nonfinite``.
        CheckpointError: a model cannot be read (or a state dict holds a tensor without
            data, named ``a`` or ``b`` as above).
        TypeError: ``a``, ``b`` or ``base`` is no model (named so).

    Example:
        >>> import torch, ladle
        >>> a = {"w": torch.tensor([3.0, 0.0])}
        >>> b = {"w": torch.tensor([0.0, 4.0])}
        >>> report = ladle.diff(a, b)
        >>> report.tensors[0]
        TensorDiff(key='w', norm_a=3.0, norm_b=4.0, norm_diff=5.0, cosine=0.0)
        >>> ladle.diff(a, {"w": torch.tensor([6.0, 0.0])}, base={"w": torch.zeros(2)}).total
        TensorDiff(key='', norm_a=3.0, norm_b=6.0, norm_diff=3.0, cosine=1.0)
    """
    check_flag("allow_nonfinite", allow_nonfinite)
    names: list[str] = []
    with ExitStack() as stack, _named_a_and_b(names):
        (ckpt_a, ckpt_b), ckpt_base = open_models([a, b], base, stack)
        names += [ckpt_a.name, ckpt_b.name]
        check_compatible([ckpt_a, ckpt_b], ckpt_base)
        for checkpoint in (ckpt_a, ckpt_b):  # a base agrees with them: checked with them
            check_unpacked(checkpoint)
        reference = ckpt_base if ckpt_base is not None else ckpt_a
        keys = reference.keys()
        # A tensor that every input names twice (tied weights) is compared once, under its
        # first name, and counted once in the total, as when it is stored once.
        tied = tied_names([reference, ckpt_a, ckpt_b])
        sums: dict[str, torch.Tensor] = {}
        for key, _, stats in fold(
            [ckpt_a, ckpt_b],
            _stats_kernel(),
            base=ckpt_base,
            keys=[key for key in keys if key not in tied],
            device=resolve_device(device),
            chunk_bytes=chunk_bytes,
            allow_nonfinite=allow_nonfinite,
        ):
            sums[key] = _added(sums[key], stats) if key in sums else stats
        skipped = [key for key in keys if not is_merged_dtype(reference.dtype(key))]
    found = [(key, sums.get(tied.get(key, key))) for key in keys]
    tensors = [_row(key, *stats.tolist()) for key, stats in found if stats is not None]
    total = functools.reduce(_added, sums.values()).tolist() if sums else [0.0] * 5
    return DiffReport(tensors, _row("", *total), skipped)
