"""SLERP: spherical linear interpolation between two models, tensor by tensor.

Shoemake's interpolation along the great circle between two vectors ("Animating rotation
with quaternion curves", SIGGRAPH 1985), applied to each tensor of two models as mergekit
does (Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models",
EMNLP 2024 industry track), its most used merge of two models.

Two passes over the inputs, as Model Stock makes them: the first folds, chunk of rows by
chunk of rows, the Gram matrix of the two models' tensors of every key
(:func:`~ladle.methods.stock.gram_kernel` without a base); the second folds
``s₀·a + s₁·b`` with that key's coefficients. Memory is a few chunks, never a whole tensor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import torch

from ..checkpoint import Checkpoint, StateDict, StateDictLike
from ..engine import (
    FOLD_CHUNK_BYTES,
    Kernel,
    NumberLike,
    Progress,
    Scratch,
    add_scaled_,
    check_chunk_bytes,
    check_models,
    check_number,
    merge,
    resolve_device,
    scaled,
)
from ..writer import DEFAULT_MAX_SHARD_SIZE
from .stock import key_grams

__all__ = ["DOT_THRESHOLD", "check_t", "slerp", "slerp_coefficients", "slerp_kernel"]

DOT_THRESHOLD = 0.9995
"""Where ``|cos θ|`` exceeds it, the two tensors are taken as colinear and interpolated
linearly (``sin θ`` would be too small to divide by): mergekit's threshold."""


def check_t(t: NumberLike) -> float:
    """``t`` as a float, or a ``ValueError`` when it is not finite (a ``TypeError`` for what
    is no number).

    Example:
        >>> check_t(0.25)
        0.25
        >>> check_t(float("nan"))
        Traceback (most recent call last):
        ValueError: t: expected a finite number, found nan
    """
    value = check_number("t", t)
    if not math.isfinite(value):
        raise ValueError(f"t: expected a finite number, found {value}")
    return value


def slerp_coefficients(gram: Sequence[Sequence[float]], t: float) -> tuple[float, float]:
    """``(s₀, s₁)`` such that the interpolation at ``t`` is ``s₀·a + s₁·b``, from the Gram
    matrix ``[[⟨a, a⟩, ⟨a, b⟩], [⟨b, a⟩, ⟨b, b⟩]]`` of the two flattened tensors.

    ``cos θ = ⟨a, b⟩ / (‖a‖·‖b‖)``. Where ``|cos θ| > DOT_THRESHOLD``, where a tensor is
    zero (no direction, no angle), or where the Gram matrix is not finite (inputs holding
    NaN or Inf, merged under ``allow_nonfinite``): ``(1 − t, t)``, linear interpolation.
    Otherwise ``θ = arccos(cos θ)`` and ``(sin(θ − t·θ)/sin θ, sin(t·θ)/sin θ)``.

    Example (orthogonal unit vectors: the quarter circle's midpoint, 1/√2 of each):
        >>> [round(s, 6) for s in slerp_coefficients([[1.0, 0.0], [0.0, 1.0]], 0.5)]
        [0.707107, 0.707107]
        >>> slerp_coefficients([[1.0, 2.0], [2.0, 4.0]], 0.25)  # b = 2a: colinear, linear
        (0.75, 0.25)
    """
    (aa, ab), (_, bb) = gram
    if not all(math.isfinite(value) for value in (aa, ab, bb)) or aa <= 0 or bb <= 0:
        return 1.0 - t, t
    cosine = ab / (math.sqrt(aa) * math.sqrt(bb))
    if abs(cosine) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cosine)
    return math.sin(theta - t * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_kernel(coefficients: dict[str, tuple[float, float]], t: float) -> Kernel:
    """Fold ``s₀·a + s₁·b`` with each key's coefficients (``(1 − t, t)`` for a key without:
    one that holds no entries). A term whose coefficient is 0 is left out, so that the
    result is exactly ``a`` at ``t = 0`` and exactly ``b`` at ``t = 1``.

    Example:
        >>> import torch
        >>> from ladle.engine import merge
        >>> models = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
        >>> merge(models, slerp_kernel({"w": (0.5, 0.25)}, 0.5), method="slerp",
        ...       parameters={}, device="cpu")
        {'w': tensor([1., 1.])}
    """
    scratch = Scratch()

    def init(key: str, rows: slice, base: torch.Tensor | None) -> tuple:
        return coefficients.get(key, (1.0 - t, t)), None

    def update(state: tuple, index: int, x: torch.Tensor) -> tuple:
        weights, acc = state
        weight = weights[index]  # t = 1e39 or 1e-44 too, which float32 cannot hold
        if weight == 0:
            return state
        if acc is None:  # x may be a read-only view of a file: never write into it
            return weights, scaled(x, weight, scratch.take(x.shape, x.dtype, x.device))
        return weights, add_scaled_(acc, x, weight)

    def finalize(state: tuple) -> torch.Tensor:
        acc = state[1]
        assert acc is not None  # s₀ and s₁ are never both 0
        return acc

    return Kernel(init, update, finalize)


@overload
def slerp(
    models: Sequence[StateDictLike],
    *,
    t: NumberLike = ...,
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
def slerp(
    models: Sequence[StateDictLike],
    *,
    t: NumberLike = ...,
    out: str | os.PathLike,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    chunk_bytes: int = ...,
    allow_nonfinite: bool = ...,
) -> Path: ...


def slerp(
    models: Sequence[StateDictLike],
    *,
    t: NumberLike = 0.5,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Progress = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    chunk_bytes: int = FOLD_CHUNK_BYTES,
    allow_nonfinite: bool = False,
) -> StateDict | Path:
    """SLERP: interpolate two models along the great circle between them, tensor by tensor.

    For every floating key, with ``a`` and ``b`` the two models' tensors flattened::

        cos θ  = ⟨a, b⟩ / (‖a‖·‖b‖)
        merged = sin(θ − t·θ)/sin θ · a + sin(t·θ)/sin θ · b
        merged = (1 − t)·a + t·b            where |cos θ| > 0.9995 (nearly colinear),
                                            or a or b is zero

    Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; for model
    weights, mergekit's ``slerp`` (Goddard et al., EMNLP 2024 industry track), whose
    threshold this is. mergekit leaves a tensor of norm ≤ 1e-8 unnormalised, so that two
    equal tiny tensors count as orthogonal (their midpoint √2 times them) and a zero
    tensor's interpolation is ``sin(t·π/2)·b``; here any nonzero tensor is normalised and a
    zero one is interpolated linearly. ``t = 0`` gives ``a`` and ``t = 1`` gives ``b``, both
    exactly; ``t`` outside ``[0, 1]`` extrapolates along the circle. The norms and the
    inner product are summed in float64 over chunks of rows, in row order, so the in-memory
    and streaming paths agree bit for bit. Integer tensors are copied from the first model.

    Args:
        models: exactly two models (mappings, modules, paths or checkpoints): ``a``, ``b``.
        t: where to stop between them: 0 is ``a``, 1 is ``b`` (default: the midpoint).
        out: ``None`` to return a state dict on the CPU; a ``.safetensors`` path or a directory
            to stream the result to disk and return its path.
        device: where the arithmetic runs; default CUDA when available, else the CPU.
        dtype: output dtype of floating tensors; default that of the first model.
        progress: ``True`` for tqdm bars over bytes read, one per pass ("preparing" for the
            angles, then "merging"), or a tqdm-like class.
        max_shard_size: largest shard of a directory output.
        overwrite: replace an earlier output at ``out`` (atomically) instead of refusing.
        chunk_bytes: largest piece of one tensor processed at a time, per model.
        allow_nonfinite: merge inputs holding NaN or Inf (their tensors interpolated
            linearly), and keep merged values that overflow the output dtype, instead of
            raising NonFiniteError.

    Returns:
        The merged state dict, or the path written.

    Example (two orthogonal tensors of norm 2: the midpoint keeps the norm, where the mean
    would shrink it to √2):
        >>> import torch, ladle
        >>> a, b = {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}
        >>> ladle.slerp([a, b], t=0.5)
        {'w': tensor([1.4142, 1.4142])}
        >>> ladle.uniform_soup([a, b])
        {'w': tensor([1., 1.])}
    """
    check_models(models)
    if len(models) != 2:
        raise ValueError(f"models: slerp interpolates exactly 2 models, found {len(models)}")
    t = check_t(t)
    target = resolve_device(device)
    chunk_bytes = check_chunk_bytes(chunk_bytes)  # recorded in the output's parameters

    def prepare(checkpoints: list[Checkpoint], base_checkpoint: Checkpoint | None) -> Kernel:
        grams = key_grams(
            checkpoints,
            None,
            device=target,
            chunk_bytes=chunk_bytes,
            allow_nonfinite=allow_nonfinite,
            float64=True,  # the angle near 0 or π is ill-conditioned (see gram_kernel)
        )
        coefficients = {key: slerp_coefficients(gram.tolist(), t) for key, gram in grams.items()}
        return slerp_kernel(coefficients, t)

    return merge(
        models,
        slerp_kernel({}, t),  # replaced by prepare's kernel once the angles are known
        method="slerp",
        # chunk_bytes below GRAM_CHUNK_BYTES changes the Gram sums' rounding: recorded, so
        # that the card's recipe gives the same weights.
        parameters={
            "t": t,
            "dot_threshold": DOT_THRESHOLD,
            "chunk_bytes": chunk_bytes,
        },
        out=out,
        device=target,
        dtype=dtype,
        progress=progress,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        allow_nonfinite=allow_nonfinite,
        inputs_checked=True,  # prepare's pass over every floating key checked them
        prepare=prepare,
    )
