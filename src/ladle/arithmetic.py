"""Pure state-dict arithmetic: new dicts out, inputs untouched, no I/O.

Floating tensors are computed in float32 (float64 stays float64) and returned in the dtype of
the first argument (``base`` for :func:`task_vector`); non-floating tensors, such as
``num_batches_tracked``, are copied from that same argument. Key sets and shapes must agree,
else :class:`~ladle.IncompatibleError` names the argument, the key and both shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .checkpoint import StateDict, TensorMapCheckpoint
from .engine import check_compatible, compute_dtype

__all__ = ["add", "lerp", "scale", "sub", "task_vector", "weighted_sum"]

Tensors = Mapping[str, torch.Tensor]


def _map(
    fn: Callable[..., torch.Tensor],
    named: Sequence[tuple[str, Tensors]],
    reference: int = 0,
) -> StateDict:
    """Apply ``fn`` key by key to the upcast tensors of ``named``; dtypes follow ``reference``."""
    checkpoints = [TensorMapCheckpoint(sd, name=name) for name, sd in named]
    ref = checkpoints[reference]
    check_compatible(checkpoints, ref, named=True)
    result: StateDict = {}
    for key, ref_tensor in named[reference][1].items():
        if not ref_tensor.is_floating_point():
            result[key] = ref_tensor.detach().clone()
            continue
        tensors = [sd[key].detach() for _, sd in named]
        dtype = compute_dtype([t.dtype for t in tensors])
        result[key] = fn(*(t.to(dtype) for t in tensors)).to(ref_tensor.dtype)
    return result


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
    return _map(lambda x, y: torch.lerp(x, y, t), [("a", a), ("b", b)])


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
