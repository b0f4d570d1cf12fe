"""Pure state-dict arithmetic: new dicts out, inputs untouched.

Arguments are mappings of names to tensors, modules (their ``state_dict()``), or anything
:func:`ladle.load` reads (files, directories, ``hf://`` repos, read whole). Floating tensors
are computed in float32 (float64 stays float64), complex ones in complex64 (complex128 stays
complex128), and returned in the dtype of the first argument (``base`` for
:func:`task_vector`); integer and boolean tensors, such as ``num_batches_tracked``, are
copied from that same argument. Key sets and shapes must agree, else
:class:`~ladle.IncompatibleError` names the argument, the key and both shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .checkpoint import StateDict, StateDictLike, TensorMapCheckpoint, load
from .engine import check_compatible, compute_dtype

__all__ = ["add", "lerp", "scale", "sub", "task_vector", "weighted_sum"]

Tensors = StateDictLike  # a mapping, module, path, hf:// repo or Checkpoint


def _map(
    fn: Callable[..., torch.Tensor],
    named: Sequence[tuple[str, Tensors]],
    reference: int = 0,
) -> StateDict:
    """Apply ``fn`` key by key to the upcast tensors of ``named``; dtypes follow ``reference``."""
    opened = [(name, _tensors(sd)) for name, sd in named]
    checkpoints = [TensorMapCheckpoint(sd, name=name) for name, sd in opened]
    ref = checkpoints[reference]
    check_compatible(checkpoints, ref, named=True)
    result: StateDict = {}
    for key, ref_tensor in opened[reference][1].items():
        tensors = [sd[key].detach() for _, sd in opened]
        if not (ref_tensor.is_floating_point() or ref_tensor.is_complex()):
            result[key] = ref_tensor.detach().clone()
            continue
        if any(t.is_complex() for t in tensors):
            wide = any(t.dtype in (torch.complex128, torch.float64) for t in tensors)
            dtype = torch.complex128 if wide else torch.complex64
        else:
            dtype = compute_dtype([t.dtype for t in tensors])
        result[key] = fn(*(t.to(dtype) for t in tensors)).to(ref_tensor.dtype)
    return result


def _tensors(source: object) -> Mapping[str, torch.Tensor]:
    """A mapping as it is; a module's ``state_dict()``; anything else read with :func:`load`."""
    if isinstance(source, Mapping):
        return source
    if isinstance(source, torch.nn.Module):
        return source.state_dict()
    return load(source)  # type: ignore[arg-type]  # a path, hf:// repo or Checkpoint


def add(a: Tensors, b: Tensors, alpha: float = 1.0) -> StateDict:
    """``a + alpha·b``, key by key.

    Example:
        >>> import torch, ladle
        >>> ladle.add({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])}, alpha=2)
        {'w': tensor([3., 4.])}
    """
    return _map(lambda x, y: torch.add(x, y, alpha=alpha), [("a", a), ("b", b)])


def sub(a: Tensors, b: Tensors) -> StateDict:
    """``a − b``, key by key.

    Example:
        >>> import torch, ladle
        >>> ladle.sub({"w": torch.tensor([3.0])}, {"w": torch.tensor([1.0])})
        {'w': tensor([2.])}
    """
    return _map(torch.sub, [("a", a), ("b", b)])


def scale(a: Tensors, factor: float) -> StateDict:
    """``factor·a``, key by key.

    Example:
        >>> import torch, ladle
        >>> ladle.scale({"w": torch.tensor([1.0, -2.0])}, 0.5)
        {'w': tensor([ 0.5000, -1.0000])}
    """
    return _map(lambda x: x * factor, [("a", a)])


def lerp(a: Tensors, b: Tensors, t: float) -> StateDict:
    """``(1−t)·a + t·b``, key by key (exactly ``a`` at t = 0 and ``b`` at t = 1).

    Example:
        >>> import torch, ladle
        >>> ladle.lerp({"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}, 0.25)
        {'w': tensor([1.])}
    """
    return _map(lambda x, y: _lerp(x, y, t), [("a", a), ("b", b)])


def _lerp(x: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    """``torch.lerp`` (exact at the ends, monotonic) where it is finite; elsewhere
    ``(1−t)·x + t·y``, which keeps infinities (``-inf`` mask entries) that ``lerp``'s
    ``y − x`` turns into NaN, and does not overflow where ``y − x`` would."""
    if t == 0:
        return x.clone()
    if t == 1:
        return y.clone()
    merged = torch.lerp(x, y, t)
    odd = ~torch.isfinite(merged)
    if bool(odd.any()):
        merged = torch.where(odd, (1 - t) * x + t * y, merged)
    return merged


def weighted_sum(models: Sequence[Tensors], weights: Sequence[float]) -> StateDict:
    """``Σᵢ weights[i]·models[i]``, key by key (weights are used as given, not normalised).

    Example:
        >>> import torch, ladle
        >>> ms = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
        >>> ladle.weighted_sum(ms, [0.5, 0.5])
        {'w': tensor([2.])}
    """
    if len(models) == 0:
        raise ValueError("models: expected at least one model, found none")
    if len(weights) != len(models):
        raise ValueError(f"weights: expected {len(models)} weights, found {len(weights)}")

    def combine(*tensors: torch.Tensor) -> torch.Tensor:
        total = tensors[0] * weights[0]
        for weight, tensor in zip(weights[1:], tensors[1:]):
            total.add_(tensor, alpha=weight)
        return total

    return _map(combine, [(f"model {i}", m) for i, m in enumerate(models)])


def task_vector(finetuned: Tensors, base: Tensors) -> StateDict:
    """The task vector ``finetuned − base`` (Ilharco et al. 2023); integer buffers from ``base``.

    Example:
        >>> import torch, ladle
        >>> ladle.task_vector({"w": torch.tensor([1.5])}, {"w": torch.tensor([1.0])})
        {'w': tensor([0.5000])}
    """
    return _map(lambda ft, b: ft - b, [("finetuned", finetuned), ("base", base)], reference=1)
