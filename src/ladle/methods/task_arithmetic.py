"""Task arithmetic (Ilharco et al. 2023): add scaled task vectors to the base."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import overload

import torch

from ..checkpoint import StateDict, StateDictLike
from ..engine import (
    FOLD_CHUNK_BYTES,
    Kernel,
    NumberLike,
    NumbersLike,
    Progress,
    Scratch,
    check_models,
    check_number,
    check_numbers,
    merge,
    scale_,
)
from ..writer import DEFAULT_MAX_SHARD_SIZE

__all__ = [
    "check_inputs",
    "check_scale",
    "check_weights",
    "task_arithmetic",
    "task_vector_sum_kernel",
]

Delta = Callable[[str, slice, int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``delta(key, rows, index, tau, scratch)``: what model ``index`` contributes, given its task
vector ``tau`` (the kernel's own buffer: change it in place and return it) and ``scratch``, a
buffer of the same shape and dtype free to overwrite."""


def check_weights(weights: NumbersLike | None, count: int) -> list[float]:
    """Task arithmetic's ``weights`` for ``count`` models as floats (1.0 each for ``None``),
    or a ``ValueError`` naming them: one finite number per model (a ``TypeError`` for what is
    no sequence of numbers).

    Example:
        >>> check_weights(None, 2), check_weights([1, 0.5], 2)
        ([1.0, 1.0], [1.0, 0.5])
    """
    if weights is None:
        return [1.0] * count
    checked = check_numbers("weights", weights, count, "weights (one per model)")
    if not all(math.isfinite(w) for w in checked):
        raise ValueError(f"weights: expected finite numbers, found {checked}")
    return checked


def check_scale(scale: NumberLike) -> float:
    """``scale`` as a float, or a ``ValueError`` when it is not finite (a ``TypeError`` naming
    it for what is no number).

    Example:
        >>> check_scale(2)
        2.0
        >>> check_scale(float("inf"))
        Traceback (most recent call last):
        ValueError: scale: expected a finite number, found inf
    """
    scale = check_number("scale", scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, found {scale}")
    return scale


def check_inputs(models: Sequence[StateDictLike], base: StateDictLike | None) -> None:
    """:func:`~ladle.engine.check_models` (``TypeError`` for one model or no sequence,
    ``ValueError`` for none), and a ``ValueError`` for a missing base.

    Example:
        >>> import torch
        >>> check_inputs([{"w": torch.ones(1)}], None)
        Traceback (most recent call last):
        ValueError: base: task-vector methods need the base model, found None
    """
    check_models(models)
    if base is None:
        raise ValueError("base: task-vector methods need the base model, found None")


def task_vector_sum_kernel(
    weights: Sequence[float],
    scale: float,
    delta: Delta | None = None,
    *,
    delta_propagates_nonfinite: bool = False,
) -> Kernel:
    """Fold ``base + scale·Σᵢ wᵢ·δᵢ`` one model at a time, ``δᵢ = delta(τᵢ)`` (default ``τᵢ``).

    The state is the base chunk, one accumulator and a buffer (two with ``delta``), so memory
    does not grow with the number of models. The kernel propagates NaN/Inf (the engine then
    checks results, not inputs) without ``delta``, or with one that keeps every NaN/Inf of
    ``τᵢ`` non-finite (``delta_propagates_nonfinite``).

    Example:
        >>> import torch
        >>> from ladle.engine import merge
        >>> models = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
        >>> merge(models, task_vector_sum_kernel([1.0, 1.0], 0.5), base={"w": torch.ones(2)},
        ...       method="task_arithmetic", parameters={}, device="cpu")  # 1 + 0.5·(τ₁ + τ₂)
        {'w': tensor([2., 4.])}
    """

    # The accumulator, the buffer and the scratch of every chunk: reused from chunk to chunk
    # (fresh large allocations cost more than the arithmetic; the engine copies a result
    # before the next chunk starts).
    memory = Scratch(), Scratch(), Scratch()

    def take(which: int, like: torch.Tensor) -> torch.Tensor:
        return memory[which].take(like.shape, like.dtype, like.device)

    def init(key: str, rows: slice, base: torch.Tensor | None) -> list:
        assert base is not None  # task-vector methods always merge against a base
        return [key, rows, base, None, None, None]  # ..., accumulator, buffer, scratch

    def update(state: list, index: int, x: torch.Tensor) -> list:
        key, rows, base, acc, buffer, scratch = state
        # x and base may be read-only views of a file; the first τ becomes the accumulator,
        # later ones reuse one buffer.
        if acc is None:
            tau = torch.sub(x, base, out=take(0, base))
        else:
            buffer = state[4] = take(1, base) if buffer is None else buffer
            tau = torch.sub(x, base, out=buffer)
        if delta is not None:
            scratch = state[5] = take(2, base) if scratch is None else scratch
            tau = delta(key, rows, index, tau, scratch)
        # Two separately rounded operations, never add_(alpha=): a fused multiply-add in some
        # kernels' vector paths would make the bits depend on how a tensor is chunked.
        if weights[index] != 1.0:
            scale_(tau, weights[index])
        if acc is None:
            state[3] = tau
        else:
            acc.add_(tau)
        return state

    def finalize(state: list) -> torch.Tensor:
        acc, base = state[3], state[2]
        return scale_(acc, scale).add_(base)

    propagates = delta is None or delta_propagates_nonfinite
    return Kernel(init, update, finalize, propagates_nonfinite=propagates)


@overload
def task_arithmetic(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    scale: NumberLike = ...,
    weights: NumbersLike | None = ...,
    out: None = ...,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    chunk_bytes: int = ...,
    allow_nonfinite: bool = ...,
) -> StateDict: ...


@overload
def task_arithmetic(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    scale: NumberLike = ...,
    weights: NumbersLike | None = ...,
    out: str | os.PathLike,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    chunk_bytes: int = ...,
    allow_nonfinite: bool = ...,
) -> Path: ...


def task_arithmetic(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    scale: NumberLike = 1.0,
    weights: NumbersLike | None = None,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Progress = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    chunk_bytes: int = FOLD_CHUNK_BYTES,
    allow_nonfinite: bool = False,
) -> StateDict | Path:
    """Task arithmetic: add the (weighted, scaled) sum of task vectors to the base.

    ``θ = θ_base + scale·Σᵢ wᵢ·(θᵢ − θ_base)`` with ``wᵢ = 1`` by default. The weights are used
    as given, not normalised: a negative weight subtracts a task ("forgetting by negation").
    Ilharco et al., "Editing models with task arithmetic", ICLR 2023. Models are folded in one
    at a time into a float32 accumulator, so memory does not grow with their number.

    Args:
        models: the fine-tuned models (mappings, modules, paths or checkpoints).
        base: the model they were fine-tuned from; task vectors are ``model − base``.
        scale: the factor λ applied to the summed task vectors.
        weights: one weight per task vector, used as given (default 1 each).
        out: ``None`` to return a state dict on the CPU; a ``.safetensors`` path or a directory
            to stream the result to disk and return its path.
        device: where the arithmetic runs; default CUDA when available, else the CPU.
        dtype: output dtype of floating tensors; default that of the base.
        progress: ``True`` for a tqdm bar over bytes read, or a tqdm-like class.
        max_shard_size: largest shard of a directory output.
        overwrite: replace an earlier output at ``out`` (atomically) instead of refusing.
        chunk_bytes: largest piece of one tensor processed at a time, per model.
        allow_nonfinite: merge inputs holding NaN or Inf, and keep merged values that
            overflow the output dtype, instead of raising NonFiniteError.

    Returns:
        The merged state dict, or the path written.

    Example:
        >>> import torch, ladle
        >>> base = {"w": torch.tensor([1.0, 1.0])}
        >>> a, b = {"w": torch.tensor([2.0, 3.0])}, {"w": torch.tensor([0.0, 2.0])}
        >>> ladle.task_arithmetic([a, b], base, scale=0.5)
        {'w': tensor([1.0000, 2.5000])}
        >>> ladle.task_arithmetic([a, b], base, scale=0.5, weights=[1, -1])
        {'w': tensor([2.0000, 1.5000])}
    """
    check_inputs(models, base)
    scale = check_scale(scale)
    checked = check_weights(weights, len(models))
    return merge(
        models,
        task_vector_sum_kernel(checked, scale),
        base=base,
        method="task_arithmetic",
        parameters={"scale": scale, "weights": checked},
        out=out,
        device=device,
        dtype=dtype,
        progress=progress,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        allow_nonfinite=allow_nonfinite,
    )
