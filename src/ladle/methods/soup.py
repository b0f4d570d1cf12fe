"""Model soups (Wortsman et al. 2022): the (weighted) mean of fine-tuned models."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import StateDict, StateDictLike
from ..engine import DEFAULT_CHUNK_BYTES, Kernel, Progress, merge

__all__ = ["normalized_weights", "uniform_soup", "weighted_mean_kernel"]


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` divided by their sum (uniform when ``None``); checked for length and sum."""
    if count == 0:
        raise ValueError("models: expected at least one model, found none")
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"weights: expected {count} weights (one per model), found {len(weights)}")
    total = math.fsum(weights)
    if not all(math.isfinite(w) for w in weights) or total == 0 or not math.isfinite(total):
        raise ValueError(f"weights: expected finite weights with a non-zero sum, found {weights}")
    return [w / total for w in weights]


def weighted_mean_kernel(weights: Sequence[float]) -> Kernel:
    """Fold ``Σᵢ wᵢ·xᵢ`` one model at a time into one accumulator (memory independent of N)."""

    def init(key: str, rows: slice, base: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def update(acc: torch.Tensor | None, index: int, x: torch.Tensor) -> torch.Tensor:
        if acc is None:
            return x * weights[index]  # a new tensor the kernel owns; x may be a file's view
        return acc.add_(x, alpha=weights[index])

    def finalize(acc: torch.Tensor) -> torch.Tensor:
        return acc

    return Kernel(init, update, finalize)


def uniform_soup(
    models: Sequence[StateDictLike],
    *,
    weights: Sequence[float] | None = None,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> StateDict | Path:
    """The uniform (or weighted) soup: the mean of the models' weights.

    ``θ = Σᵢ wᵢ·θᵢ / Σᵢ wᵢ`` with ``wᵢ = 1`` by default; the uniform soup of Wortsman et al.,
    "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
    increasing inference time", ICML 2022. Models are folded in one at a time into a float32
    accumulator, so memory does not grow with their number.

    Args:
        models: the models to average (mappings, modules, paths or checkpoints).
        weights: one weight per model, normalised to sum to 1; default uniform.
        out: ``None`` to return a state dict on the CPU; a ``.safetensors`` path or a directory
            to stream the result to disk and return its path.
        device: where the arithmetic runs; default CUDA when available, else the CPU.
        dtype: output dtype of floating tensors; default that of model 0.
        progress: ``True`` for a tqdm bar over bytes read, or a tqdm-like class.
        max_shard_size: largest shard of a directory output.
        overwrite: replace an existing ``out`` (atomically) instead of refusing.
        chunk_bytes: largest piece of one tensor processed at a time, per model.

    Returns:
        The merged state dict, or the path written.

    Example:
        >>> import torch, ladle
        >>> a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
        >>> ladle.uniform_soup([a, b])
        {'w': tensor([2., 4.])}
        >>> ladle.uniform_soup([a, b], weights=[3, 1])
        {'w': tensor([1.5000, 3.0000])}
    """
    normalized = normalized_weights(weights, len(models))
    return merge(
        models,
        weighted_mean_kernel(normalized),
        method="uniform_soup",
        parameters={"weights": normalized},
        out=out,
        device=device,
        dtype=dtype,
        progress=progress,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
    )
