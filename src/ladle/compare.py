"""Comparing two checkpoints tensor by tensor: norms of their difference and their cosine."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator, Sequence
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


def _row(key: str, sums: Sequence[float]) -> TensorDiff:
    """The row of the :func:`_scaled_sums` ``sums`` (Σa², Σb², Σab, Σ(a−b)², each with its
    power of two): identical tensors (Σ(a−b)² = 0) have the same norm and a cosine of exactly
    1 (NaN if both are 0)."""
    (eaa, aa), (ebb, bb), (eab, ab), (edd, dd) = zip(sums[::2], sums[1::2])
    root_a = _times_two_to(math.sqrt(aa), eaa / 2)  # the exponents of squares are even
    if dd == 0.0:  # a == b: whatever order the dot products summed in
        return TensorDiff(key, root_a, root_a, 0.0, 1.0 if aa > 0 else math.nan)
    product = aa * bb  # √(aa·bb) rounds once: ±1 exactly for b = ±2ᵏ·a (√aa·√bb: 0.99...98)
    # (a subnormal product keeps too few bits: √aa·√bb then)
    normal = sys.float_info.min <= product < math.inf
    denominator = math.sqrt(product) if normal else math.sqrt(aa) * math.sqrt(bb)
    cosine = math.nan
    if denominator > 0:  # |cos| ≤ 1: the power of two cannot overflow
        cosine = _times_two_to(ab / denominator, eab - (eaa + ebb) / 2)
    if abs(cosine) > 1.0:  # rounding (1.0000000000000002): acos-safe
        cosine = math.copysign(1.0, cosine)
    norms = (root_a, _times_two_to(math.sqrt(bb), ebb / 2), _times_two_to(math.sqrt(dd), edd / 2))
    return TensorDiff(key, *norms, cosine)


def _times_two_to(x: float, exponent: float) -> float:
    """``x·2^exponent`` (an integer exponent), infinite where that passes float64's range."""
    try:
        return math.ldexp(x, int(exponent))
    except OverflowError:  # math.ldexp raises where float arithmetic gives inf
        return math.copysign(math.inf, x)


SCALED_BEYOND = 2.0**500
"""Entries whose magnitude passes it (or all lie below its inverse) are summed divided by a
power of two: their float64 squares would overflow (past about 1e154) or underflow (below
about 1e-154). Others are summed as they are, so their figures keep every bit."""


def _exponent(x: torch.Tensor) -> int:
    """0 where the largest magnitude of ``x`` lies within :data:`SCALED_BEYOND` (or is 0 or
    not finite), else that magnitude's binary exponent."""
    largest = float(x.abs().max()) if x.numel() else 0.0
    if math.isfinite(largest) and (largest > SCALED_BEYOND or 0 < largest < 1 / SCALED_BEYOND):
        return math.frexp(largest)[1]
    return 0


def _scaled_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[2p, Σa'², 2q, Σb'², p + q, Σa'b', 2r, Σ(a''−b'')²]`` of the float64 ``a`` and ``b``,
    where ``a' = a/2^p``, ``b' = b/2^q`` and ``a'', b''`` are both divided by ``2^r``, ``r``
    the larger of ``p`` and ``q``: each sum with the power of two it is to be multiplied by.
    ``p`` is 0 unless the largest magnitude of ``a`` passes :data:`SCALED_BEYOND` (or is
    below its inverse), then that magnitude's exponent; ``q`` likewise of ``b``: ``diff`` of
    entries near 1e200 gave infinite norms and a NaN cosine, of entries near 1e-200 norms
    of 0, and one shared scale made the smaller of two very different tensors' norm 0.

    Example:
        >>> x = torch.tensor([3e200, 0.0], dtype=torch.float64)
        >>> e, aa, *_ = _scaled_sums(x, x).tolist()
        >>> e, math.sqrt(aa) * 2 ** (e / 2)
        (1332.0, 3e+200)
    """
    p, q = _exponent(a), _exponent(b)
    r = max(p, q)
    scaled_a, scaled_b = (torch.ldexp(x, torch.tensor(-e)) if e else x for x, e in ((a, p), (b, q)))
    d = (
        scaled_a - scaled_b
        if p == q
        else torch.ldexp(a, torch.tensor(-r)) - torch.ldexp(b, torch.tensor(-r))
    )
    sums = torch.stack(
        [scaled_a.dot(scaled_a), scaled_b.dot(scaled_b), scaled_a.dot(scaled_b), d.dot(d)]
    ).cpu()
    exponents = torch.tensor([2 * p, 2 * q, p + q, 2 * r], dtype=torch.float64)
    return torch.stack([exponents, sums], dim=1).flatten()


def _added(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The :func:`_scaled_sums` ``x`` and ``y`` added, each sum at the larger of its two
    powers of two (the other divided by 2 to the difference: past float64's range, nothing);
    a sum of 0 (a part of zeros, or empty) takes the other's power, never lowering it."""
    found = []
    for (ex, sx), (ey, sy) in zip(x.view(-1, 2).tolist(), y.view(-1, 2).tolist()):
        if sx == 0.0 or (sy != 0.0 and ey > ex):  # the larger power first, a 0 last
            (ex, sx), (ey, sy) = (ey, sy), (ex, sx)
        found += [ex, sx + (_times_two_to(sy, ey - ex) if sy != 0.0 else 0.0)]
    return torch.tensor(found, dtype=torch.float64)


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
        ValueError: ``a`` or ``b`` stores a key in a dtype that packs several values per
            element (``float4_e2m1fn_x2``), named so.

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
        for label, checkpoint in (("a", ckpt_a), ("b", ckpt_b)):  # a base agrees with them
            check_unpacked(checkpoint, f"{label} ({checkpoint.name})")
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
    tensors = [_row(key, stats.tolist()) for key, stats in found if stats is not None]
    total = functools.reduce(_added, sums.values()).tolist() if sums else [0.0] * 8
    return DiffReport(tensors, _row("", total), skipped)
