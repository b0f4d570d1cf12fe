"""Pure state-dict arithmetic: new dicts out, inputs untouched.

Arguments are mappings of names to tensors, modules (their ``state_dict()``), or anything
:func:`ladle.load` reads (files, directories, ``hf://`` repos, read whole). Floating tensors
are computed in float32 (float64 stays float64), complex ones in complex64 (complex128 stays
complex128), and returned in the dtype of the first argument (``base`` for
:func:`task_vector`); integer and boolean tensors, such as ``num_batches_tracked``, are
copied from that same argument, and the result is on that argument's device (the others'
tensors are moved there). Key sets and shapes must agree, else
:class:`~ladle.IncompatibleError` names the argument, the key and both shapes. A result
whose dtype cannot hold signed values one per element (``float8_e8m0fnu``, packed
``float4_e2m1fn_x2``) is a ``ValueError``, as in every merge method: convert it first.
Quantized weights (codes and scales) and PEFT adapters (LoRA factors), which added entry by
entry make a model that loads and is wrong, are a :class:`~ladle.CheckpointError`, as in
every merge method (``docs/sources.md``).

Tied weights (one tensor under two names, as a tied module's state dict, or a torch file of
it, holds its embedding and head): a tensor that every argument names twice is computed
once and returned under both names, one tensor. Where the first argument (``base`` for
:func:`task_vector`) names it twice and another stores it once, under its first name
(``save_pretrained``'s safetensors), that one answers the second name with it; a second
name that the first argument lacks is not read. The result has the first argument's keys.

Scalars (``alpha``, ``factor``, ``t``, ``weights``) are numbers: ints, floats, numpy
scalars or 0-d tensors; anything else, a bool or a tensor of more than one element included,
is a ``TypeError`` naming it. A complex scalar needs complex tensors. A scalar that float32
would round beyond its precision (a nonzero magnitude below 1.18e-38 or above 3.4e38) is
applied in float64, so that the result is still the exact one rounded once.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

from .checkpoint import (
    Checkpoint,
    StateDict,
    StateDictLike,
    TensorMapCheckpoint,
    check_source,
    load_tied,
    open_checkpoint,
    second_names,
    tied_names,
    unwrap_averaged,
)
from .engine import (
    NumberLike,
    NumbersLike,
    _expanded,
    beyond_float32,
    cast,
    check_compatible,
    check_mergeable,
    check_models,
    check_output_dtypes,
    check_sequence,
    compute_dtype,
    is_merged_dtype,
    is_real,
    past_saturation,
    real_float,
    saturation_limit,
    unwrap_scalar,
)
from .errors import type_name

__all__ = ["add", "lerp", "scale", "sub", "task_vector", "weighted_sum"]

Tensors = StateDictLike  # a mapping, module, path, hf:// repo or Checkpoint
ComplexLike = Union[NumberLike, complex, np.complexfloating[Any, Any]]  # noqa: UP007
"""A scalar of the arithmetic: a :data:`~ladle.NumberLike`, or a complex number (Python's or
numpy's) for complex tensors."""
Scalar = float | complex


def _scalar(name: str, value: object) -> Scalar:
    """``value`` as a Python float, or a complex with a nonzero imaginary part: a number, a
    numpy scalar or a 0-d tensor (or array); anything else (a bool too) is a ``TypeError``
    naming ``name``.

    Example:
        >>> _scalar("t", torch.tensor(0.5)), _scalar("t", 2), _scalar("t", 1 + 0j)
        (0.5, 2.0, 1.0)
    """
    value = unwrap_scalar(name, value)
    if is_real(value):  # int, float, numpy's real scalars
        return real_float(name, value)
    if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        number = complex(value)
        return number if number.imag else number.real
    raise TypeError(f"{name}: expected a number, found {type_name(value)}")


def _map(
    fn: Callable[..., torch.Tensor],
    named: Sequence[tuple[str, Tensors]],
    reference: int = 0,
    scalars: Sequence[tuple[str, Scalar]] = (),
) -> StateDict:
    """Apply ``fn`` key by key to the upcast tensors of ``named``; dtypes follow ``reference``.

    ``scalars`` (already checked by :func:`_scalar`) are those ``fn`` applies: a complex one
    is refused for real tensors, and one float32 cannot hold computes in float64.
    """
    for name, sd in named:
        check_source(name, sd)
    opened = [_opened(_named(name, sd), sd) for name, sd in named]
    ref = opened[reference]
    # A tied tensor that the reference names twice and an argument stores once (a module
    # beside save_pretrained's safetensors): that argument answers the second name with it.
    named_twice = ref.aliases()
    checkpoints = [c if c is ref else second_names(c, named_twice) for c in opened]
    check_compatible(checkpoints, ref, named=True)
    check_output_dtypes(ref, None, remedy="convert it first (tensor.float())")
    wide = any(beyond_float32(value) for _, value in scalars)
    imaginary = next(((n, v) for n, v in scalars if isinstance(v, complex)), None)
    # A tensor every argument names twice (tied weights) is computed once, returned twice.
    tied = tied_names([ref, *checkpoints])
    result: StateDict = {}
    for key in ref.keys():
        if key in tied:
            continue
        tensors = [c.get_slice(key, slice(None)) for c in checkpoints]  # on their devices
        ref_tensor = tensors[reference]
        if not is_merged_dtype(ref_tensor.dtype):
            result[key] = ref_tensor.detach().clone()
            continue
        if ref_tensor.is_complex():
            wide_input = any(t.dtype == torch.complex128 for t in tensors)
            dtype = torch.complex128 if wide or wide_input else torch.complex64
        elif imaginary is not None:
            name, value = imaginary
            raise TypeError(
                f"{name}: {value} is complex, and key {key!r} is real ({ref_tensor.dtype}); "
                "its result would lose the imaginary part"
            )
        else:
            dtype = torch.float64 if wide else compute_dtype([t.dtype for t in tensors])
        # On the first argument's device: a module's state dict on a GPU beside a file
        # read to the CPU (torch refuses tensors of two devices in one operation).
        widened = (_copied_if_expanded(t.to(ref_tensor.device, dtype)) for t in tensors)
        result[key] = _cast(fn(*widened), ref_tensor.dtype)
    return {key: result[tied.get(key, key)] for key in ref.keys()}


def _copied_if_expanded(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied where it repeats entries through a stride of 0: torch's CPU
    arithmetic on such a tensor fuses a multiply-add in its vector loop only, so equal
    entries came out a rounding apart (``add(a, b, alpha=1/3)`` of ``expand``-ed tensors)."""
    return tensor.contiguous() if _expanded(tensor) else tensor


def _cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``; in one to which torch's cast saturates (``float8_e4m3fn``:
    Inf and 520 become 448), what overflows is NaN, as other dtypes show an overflow.

    Example:
        >>> _cast(torch.tensor([1.0, 520.0, -math.inf]), torch.float8_e4m3fn).float().tolist()
        [1.0, nan, nan]
    """
    limit = saturation_limit(dtype)
    if limit is not None:
        values = values.masked_fill(past_saturation(values, limit), math.nan)
    return cast(values, dtype)  # float64 rounded once


def _named(argument: str, source: object) -> str:
    """The argument's name, and where it was read from for a source read from storage (a
    path, an ``hf://`` repo, a checkpoint): ``b (/data/ft.safetensors)``."""
    if isinstance(source, (Mapping, torch.nn.Module)):
        return argument
    if isinstance(source, Checkpoint):  # of files (a path), or of tensors in memory (none)
        return argument if source.path is None else f"{argument} ({source.name})"
    where = os.fsdecode(source) if isinstance(source, os.PathLike) else source
    return f"{argument} ({where})"


def _opened(name: str, source: object) -> TensorMapCheckpoint:
    """The tensors of ``source``, called ``name``: a mapping as it is; a module's
    ``state_dict()``; anything else read whole, a tensor it names twice (a torch file's tied
    weights) once, under both names (:func:`load_tied`), as a mapping or module holds it. An
    ``AveragedModel``'s tensors are the averaged model's own (:func:`unwrap_averaged`).

    Tensors that are no weights to add entry by entry (quantized codes and scales, a PEFT
    adapter's factors) are a :class:`~ladle.CheckpointError`, as in the merge methods
    (:func:`~ladle.engine.check_mergeable`); a folder's config is read before its tensors.
    """
    if isinstance(source, (Mapping, torch.nn.Module)):
        state = source if isinstance(source, Mapping) else source.state_dict()
        opened = TensorMapCheckpoint(unwrap_averaged(state), name=name)
        check_mergeable([opened], names=[name])
        return opened
    checkpoint = open_checkpoint(source)  # type: ignore[arg-type]  # a path, hf://, Checkpoint
    try:
        check_mergeable([checkpoint], names=[name])
        return TensorMapCheckpoint(load_tied(checkpoint), name=name)
    finally:
        if checkpoint is not source:
            checkpoint.close()


def add(a: Tensors, b: Tensors, alpha: ComplexLike = 1.0) -> StateDict:
    """``a + alpha·b``, key by key.

    Args:
        a: a state dict, module or checkpoint (the result's dtypes, device and integer
            buffers are its own).
        b: another, of the same keys and shapes.
        alpha: the factor of ``b``: a number, complex for complex tensors.

    Returns:
        A new state dict; ``a`` and ``b`` are untouched.

    Example:
        >>> import torch, ladle
        >>> ladle.add({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])}, alpha=2)
        {'w': tensor([3., 4.])}
    """
    number = _scalar("alpha", alpha)
    return _map(
        lambda x, y: torch.add(x, y, alpha=number),
        [("a", a), ("b", b)],
        scalars=[("alpha", number)],
    )


def sub(a: Tensors, b: Tensors) -> StateDict:
    """``a − b``, key by key.

    Args:
        a: a state dict, module or checkpoint (the result's dtypes, device and integer
            buffers are its own).
        b: another, of the same keys and shapes.

    Returns:
        A new state dict; ``a`` and ``b`` are untouched.

    Example:
        >>> import torch, ladle
        >>> ladle.sub({"w": torch.tensor([3.0])}, {"w": torch.tensor([1.0])})
        {'w': tensor([2.])}
    """
    return _map(torch.sub, [("a", a), ("b", b)])


def scale(a: Tensors, factor: ComplexLike) -> StateDict:
    """``factor·a``, key by key.

    Args:
        a: a state dict, module or checkpoint (integer buffers are copied as they are).
        factor: a number, complex for complex tensors.

    Returns:
        A new state dict in ``a``'s dtypes, on its device; ``a`` is untouched.

    Example:
        >>> import torch, ladle
        >>> ladle.scale({"w": torch.tensor([1.0, -2.0])}, 0.5)
        {'w': tensor([ 0.5000, -1.0000])}
    """
    number = _scalar("factor", factor)
    return _map(lambda x: x * number, [("a", a)], scalars=[("factor", number)])


def lerp(a: Tensors, b: Tensors, t: ComplexLike) -> StateDict:
    """``(1−t)·a + t·b``, key by key (exactly ``a`` at t = 0 and ``b`` at t = 1).

    Computed as ``torch.lerp``; where that is not finite, as the formula itself, which keeps
    the infinities of ``-inf`` mask entries and does not overflow on ``b − a``.

    Args:
        a: a state dict, module or checkpoint (the result's dtypes, device and integer
            buffers are its own).
        b: another, of the same keys and shapes.
        t: the weight of ``b``: a number (extrapolates outside [0, 1]), complex for complex
            tensors.

    Returns:
        A new state dict; ``a`` and ``b`` are untouched.

    Example:
        >>> import torch, ladle
        >>> ladle.lerp({"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}, 0.25)
        {'w': tensor([1.])}
    """
    number = _scalar("t", t)
    return _map(lambda x, y: _lerp(x, y, number), [("a", a), ("b", b)], scalars=[("t", number)])


def _lerp(x: torch.Tensor, y: torch.Tensor, t: Scalar) -> torch.Tensor:
    """``torch.lerp`` (exact at the ends, monotonic) where it is finite; elsewhere
    ``(1−t)·x + t·y``, which keeps infinities (``-inf`` mask entries) that ``lerp``'s
    ``y − x`` turns into NaN, and does not overflow where ``y − x`` would; where ``x`` and
    ``y`` are equal (real, with their signs), ``x``."""
    if t == 0:
        return x.clone()
    if t == 1:
        return y.clone()
    merged = torch.lerp(x, y, t)
    odd = ~torch.isfinite(merged)
    if bool(odd.any()):
        merged = torch.where(odd, (1 - t) * x + t * y, merged)
    if not merged.is_complex():  # equal ends: that value, as the formula gives (lerp's
        # x + t·(y − x) made +0.0 of two −0.0 for t < 0.5)
        same = torch.eq(x, y).logical_and_(torch.signbit(x) == torch.signbit(y))
        merged = torch.where(same, x, merged)
    return merged


def weighted_sum(
    models: Sequence[Tensors], weights: NumbersLike | Sequence[ComplexLike]
) -> StateDict:
    """``Σᵢ weights[i]·models[i]``, key by key (weights are used as given, not normalised).

    Args:
        models: one or more state dicts, modules or checkpoints of the same keys and shapes
            (the result's dtypes, device and integer buffers are model 0's).
        weights: one number per model (a sequence, or a 1-d tensor or array).

    Returns:
        A new state dict; the models are untouched. For a normalised mean that streams from
        files, see :func:`ladle.uniform_soup`.

    Example:
        >>> import torch, ladle
        >>> ms = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
        >>> ladle.weighted_sum(ms, [0.5, 0.5])
        {'w': tensor([2.])}
    """
    check_models(models)
    given = check_sequence("weights", weights)
    if len(given) != len(models):
        raise ValueError(f"weights: expected {len(models)} weights, found {len(given)}")
    values = [_scalar(f"weights[{i}]", weight) for i, weight in enumerate(given)]

    def combine(*tensors: torch.Tensor) -> torch.Tensor:
        total = tensors[0] * values[0]
        for weight, tensor in zip(values[1:], tensors[1:]):
            total.add_(tensor, alpha=weight)
        return total

    named = [(f"model {i}", m) for i, m in enumerate(models)]
    return _map(combine, named, scalars=[(f"weights[{i}]", w) for i, w in enumerate(values)])


def task_vector(finetuned: Tensors, base: Tensors) -> StateDict:
    """The task vector ``finetuned − base`` (Ilharco et al. 2023); integer buffers from ``base``.

    Args:
        finetuned: a state dict, module or checkpoint fine-tuned from ``base``.
        base: the model it was fine-tuned from (the result's dtypes, device and integer
            buffers are its own).

    Returns:
        A new state dict: the task vector; ``finetuned`` and ``base`` are untouched.

    Example:
        >>> import torch, ladle
        >>> ladle.task_vector({"w": torch.tensor([1.5])}, {"w": torch.tensor([1.0])})
        {'w': tensor([0.5000])}
    """
    return _map(lambda ft, b: ft - b, [("finetuned", finetuned), ("base", base)], reference=1)
