"""Model Stock (Jang et al. 2024): interpolate from the base towards the mean, per tensor.

Two passes over the inputs. The first folds, chunk of rows by chunk of rows, the Gram matrix
``Gᵢⱼ = ⟨τᵢ, τⱼ⟩`` of the task vectors ``τᵢ = modelᵢ − base`` of every key; the
second folds the mean ``Σᵢ modelᵢ/N`` into one accumulator and finishes each chunk with that
key's ratio ``t``. Memory is a few chunks per model, never a whole tensor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import overload

import torch

from ..checkpoint import Checkpoint, StateDict, StateDictLike
from ..engine import (
    FOLD_CHUNK_BYTES,
    Kernel,
    Progress,
    Scratch,
    check_chunk_bytes,
    check_models,
    current_partition,
    float64_home,
    fold,
    merge,
    resolve_device,
    scale_,
)
from ..errors import warn
from ..writer import DEFAULT_MAX_SHARD_SIZE
from .soup import weighted_mean_kernel

__all__ = [
    "EPS",
    "T_MIN",
    "ModelStockWarning",
    "gram_kernel",
    "key_grams",
    "mean_cosine",
    "model_stock",
    "stock_kernel",
    "stock_ratio",
]

EPS = 1e-8
"""The released code's epsilon: added to ``‖τᵢ‖·‖τⱼ‖`` and to the denominator of ``t``."""

T_MIN = -1.0
"""Lower bound of ``t``; the formula's pole at ``(N−1)·cos θ + 1 = 0`` is clamped to it."""


class ModelStockWarning(UserWarning):
    """A key's ratio ``t`` fell below :data:`T_MIN` (near the formula's pole) and was clamped.

    Example:
        >>> import warnings, torch, ladle
        >>> base = {"w": torch.zeros(2)}
        >>> opposite = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([-1.0, 0.0])}]
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always", ladle.ModelStockWarning)
        ...     merged = ladle.model_stock(opposite, base, device="cpu")
        >>> [w.category.__name__ for w in caught], merged["w"].tolist()  # t = T_MIN = -1
        (['ModelStockWarning'], [0.0, 0.0])
    """


def mean_cosine(gram: Sequence[Sequence[float]]) -> float:
    """The mean over pairs ``i < j`` of ``Gᵢⱼ / (√(Gᵢᵢ·Gⱼⱼ) + 1e-8)``, each clamped to [−1, 1].

    ``gram`` is the N×N Gram matrix of the task vectors (only its upper triangle and diagonal
    are read). Summed with :func:`math.fsum`, so the order of the pairs does not matter.

    Example:
        >>> mean_cosine([[25.0, 15.0], [15.0, 25.0]])  # τ₁ = [5, 0], τ₂ = [3, 4]
        0.59999999976
    """
    n = len(gram)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            product = gram[i][i] * gram[j][j]  # past float's range (norms ≈ 1e77): apart
            norms = (
                math.sqrt(product)
                if product < math.inf
                else math.sqrt(gram[i][i]) * math.sqrt(gram[j][j])
            )
            cosine = gram[i][j] / (norms + EPS)
            cosines.append(cosine if math.isnan(cosine) else min(1.0, max(-1.0, cosine)))
    return math.fsum(cosines) / len(cosines)


def stock_ratio(cosine: float, n: int, *, key: str = "") -> float:
    """Model Stock's interpolation ratio ``t = N·cos θ / ((N−1)·cos θ + 1 + 1e-8)``, clamped.

    For real vectors the mean pairwise cosine is at least ``−1/(N−1)`` (the unit task vectors
    sum to a vector of squared norm ``N + N(N−1)·cos θ ≥ 0``), so ``t ≤ 1`` and ``t`` has a pole
    only where the unit task vectors cancel exactly. Near it ``t`` runs to −∞: ``t`` below
    :data:`T_MIN` (also a non-positive denominator, which only rounding produces) becomes
    ``T_MIN`` with a :class:`ModelStockWarning` naming ``key``. Elsewhere it is the released
    code's value; a NaN cosine (task vectors holding NaN or Inf, merged with
    ``allow_nonfinite=True``) gives NaN, as the formula does.

    Example:
        >>> round(stock_ratio(0.6, 2), 6)
        0.75
    """
    if math.isnan(cosine):  # no pole: the formula's own NaN
        return math.nan
    denominator = (n - 1) * cosine + 1 + EPS
    ratio = n * cosine / denominator if denominator > 0 else -math.inf
    if not ratio >= T_MIN:
        warn(
            f"model_stock: key {key!r}: t = {ratio:.6g} (mean cosine {cosine:.9g} of {n} task "
            f"vectors, near the pole at cos θ = {-1 / (n - 1):.6g}) clamped to {T_MIN:g}",
            ModelStockWarning,
        )
        return T_MIN
    return ratio


def _exact_float32_matmul(device: torch.device) -> bool:
    """Whether a float32 matrix product on ``device`` is computed in float32 (IEEE), not in
    TF32 or bfloat16 as ``torch.set_float32_matmul_precision("high" | "medium")`` allows, or
    the ``fp32_precision`` settings (``torch.backends.mkldnn.matmul.fp32_precision``, which
    follows ``torch.backends.fp32_precision``)."""
    if device.type != "cpu":
        return False
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # raised once an fp32_precision is set: the CPU's is read below
        legacy = "highest"
    return legacy == "highest" and getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


def gram_kernel(n: int, *, float64: bool = False) -> Kernel:
    """Fold the Gram matrix ``⟨τᵢ, τⱼ⟩`` of one chunk of rows, one model at a time; with no
    base (a fold without one), of the models themselves: ``⟨xᵢ, xⱼ⟩``. ``float64``: the
    products in float64 wherever they run (SLERP's two tensors, whose angle near 0 or π
    is ill-conditioned: float32 products put its results a thousand float32 steps off).

    The state holds an N×rows matrix of the task vectors in the compute dtype; ``finalize``
    multiplies it by its transpose (:func:`_gram`) and returns the chunk's Gram matrix in
    float64, for the caller to sum over a key's chunks in float64. Float32 chunks are
    multiplied in float32 on the CPU (faster than float64; on the benchmarks' 12 fine-tunes of
    89 MiB, 0.16% of the output entries differ from an all-float64 computation, 1.6% with
    the blocks of 65,536 columns :func:`_gram` used until 2026-12-02),
    and in float64 wherever float32 products may run at reduced precision (TF32 or bfloat16
    under ``torch.set_float32_matmul_precision`` or ``fp32_precision``, CUDA). The matrix
    lives in one scratch buffer that this kernel reuses from chunk to chunk (the engine
    finishes a chunk before it starts the next), so fresh memory is not faulted in for every
    chunk.

    Example:
        >>> import torch
        >>> from ladle import open_checkpoint
        >>> from ladle.engine import fold
        >>> base = open_checkpoint({"w": torch.zeros(2)})
        >>> models = [open_checkpoint({"w": torch.tensor([3.0, 0.0])}),
        ...           open_checkpoint({"w": torch.tensor([3.0, 4.0])})]
        >>> [(key, gram.tolist()) for key, _, gram in
        ...  fold(models, gram_kernel(2), base=base, device=torch.device("cpu"))]
        [('w', [[9.0, 9.0], [9.0, 25.0]])]
    """
    scratch = Scratch()

    def init(key: str, rows: slice, base: torch.Tensor | None) -> tuple:
        return (base, None) if base is None else _matrix(base, base)

    def update(state: tuple, index: int, x: torch.Tensor) -> tuple:
        base, taus = state if state[1] is not None else _matrix(x, None)
        flat = x.reshape(-1).to(taus.device)  # the CPU's, for a device without float64
        if base is None:
            taus[index].copy_(flat)
        elif flat.dtype == taus.dtype:
            torch.sub(flat, base, out=taus[index])
        else:  # cast, then subtract in place: faster than a mixed-dtype subtraction
            taus[index].copy_(flat).sub_(base)
        return base, taus

    def _matrix(like: torch.Tensor, base: torch.Tensor | None) -> tuple:
        """The flat base (or ``None``) and the N × entries matrix, for chunks like ``like``."""
        exact = _exact_float32_matmul(like.device) and not float64
        dtype = like.dtype if exact else torch.float64
        home = like.device if exact else float64_home(like.device)
        flat = None if base is None else base.reshape(-1).to(home, dtype)
        return flat, scratch.take((n, like.numel()), dtype, home)

    def finalize(state: tuple) -> torch.Tensor:
        taus = state[1]
        gram = _gram(taus)
        overflowed = not bool(torch.isfinite(gram).all()) and bool(torch.isfinite(taus).all())
        if taus.dtype == torch.float32 and overflowed:
            # Products of entries past ~1.8e19 overflow float32 (finite inputs, a NaN cosine,
            # and t clamped to -1: the task vector reflected). Again in float64, which holds
            # them; non-finite inputs stay non-finite there, for the engine's check to name.
            gram = _gram(taus.double())
        return gram

    # A NaN or Inf in the base or a model makes its τ, and so the Gram matrix, non-finite.
    return Kernel(init, update, finalize, propagates_nonfinite=True)


GRAM_CHUNK_BYTES = 2 * 2**20
"""Largest chunk of the Gram pass, per model (2 MiB; the merging pass uses ``chunk_bytes``).
The pass holds N chunks of task vectors: 24 MiB for 12 models, within a server CPU's last
level cache, where the Gram product reads them. On 12 fp32 models of 89 MiB, Model Stock
took 0.28 s against 0.29–0.31 s with 4 MiB chunks (1 MiB: the same as 2 MiB)."""

GRAM_BLOCK = 2**10
"""Entries per block of the batched Gram product (see :func:`_gram`)."""


def _gram(taus: torch.Tensor) -> torch.Tensor:
    """``taus @ taus.T`` in float64, as one batched product over blocks of
    :data:`GRAM_BLOCK` columns (and one of the remaining columns), the blocks' products
    summed in float64, so that each float32 sum runs over 1,024 terms at most; the upper
    triangle is mirrored, so ``gram[i, j]`` equals ``gram[j, i]`` exactly.

    Blocks of 1,024 columns (4 KiB per task vector in float32) keep a block's N rows in the
    CPU's first caches while each pair is multiplied: on 2 CPU cores and 2 MiB of rows per
    model, 1.74 ms for 12 models against 3.94 ms for the blocks of 65,536 columns and groups
    of 4 rows used until 2026-12-02, 5.3 against 7.7 ms for 16, 12.9 against 18.7 ms for 24,
    0.56 against 1.02 ms for 5, the same for 2 and 3; in float64 (SLERP's two tensors, or
    where float32 products may be reduced), 2.9 against 4.7 ms for 12 models and 0.22 against
    0.21 ms for 2. The float32 products are also closer to the float64 ones (largest relative
    error 3e-9 against 3e-7 on 12 rows of 2¹⁹ Gaussian entries)."""
    n, count = taus.shape
    whole = count // GRAM_BLOCK * GRAM_BLOCK
    gram = torch.zeros(n, n, dtype=torch.float64, device=taus.device)
    if whole:
        blocks = taus[:, :whole].view(n, -1, GRAM_BLOCK).transpose(0, 1)
        gram += _products(blocks, blocks)
    if whole < count:
        rest = taus[:, whole:].unsqueeze(0)
        gram += _products(rest, rest)
    index = torch.arange(n, device=gram.device)  # not triu: on the CPU it enters a thread
    return torch.where(index[:, None] <= index, gram, gram.T)  # pool (1 ms on a busy core)


def key_grams(
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    *,
    device: torch.device,
    chunk_bytes: int,
    allow_nonfinite: bool,
    float64: bool = False,
) -> dict[str, torch.Tensor]:
    """Each floating key's Gram matrix (:func:`gram_kernel`: of the task vectors, or of the
    models themselves without a ``base``), summed over its chunks in row order in float64;
    the chunks at most ``chunk_bytes`` and :data:`GRAM_CHUNK_BYTES`; in a merge split across
    processes, of this process's keys alone. Model Stock's and SLERP's first pass.

    Example:
        >>> import torch
        >>> from ladle import open_checkpoint
        >>> models = [open_checkpoint({"w": torch.tensor([3.0, 0.0])}),
        ...           open_checkpoint({"w": torch.tensor([3.0, 4.0])})]
        >>> key_grams(models, None, device=torch.device("cpu"), chunk_bytes=4,
        ...           allow_nonfinite=False)["w"].tolist()  # one entry per chunk, summed
        [[9.0, 9.0], [9.0, 25.0]]
    """
    part = current_partition()  # a merge split across processes: the statistics of its keys
    reference = base if base is not None else models[0]
    grams: dict[str, torch.Tensor] = {}
    for key, _, partial in fold(
        models,
        gram_kernel(len(models), float64=float64),
        base=base,
        keys=None if part is None else part.keys(reference),
        device=device,
        chunk_bytes=min(chunk_bytes, GRAM_CHUNK_BYTES),
        allow_nonfinite=allow_nonfinite,
    ):
        grams[key] = partial if key not in grams else grams[key] + partial
    return grams


def _products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_blocks a @ b.T`` over a batch of blocks, summed in float64."""
    return torch.bmm(a, b.transpose(1, 2)).sum(0, dtype=torch.float64)


def stock_kernel(ratios: Mapping[str, float], n: int) -> Kernel:
    """Fold the mean ``Σᵢ modelᵢ/N`` as the uniform soup does (:func:`weighted_mean_kernel`
    with weights ``1/N``: a sum of the models would overflow float32 past about 3.4e38/N,
    where the mean fits); finish with ``t·mean + (1 − t)·base``.

    Example:
        >>> import torch
        >>> from ladle.engine import merge
        >>> models = [{"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([3.0, 4.0])}]
        >>> merge(models, stock_kernel({"w": 0.5}, 2), base={"w": torch.zeros(2)},
        ...       method="model_stock", parameters={}, device="cpu")  # t = 0.5
        {'w': tensor([1.5000, 1.0000])}
    """
    mean = weighted_mean_kernel([1 / n for _ in range(n)])

    def init(key: str, rows: slice, base: torch.Tensor | None) -> tuple:
        assert base is not None
        return ratios[key], base, mean.init(key, rows, base)

    def update(state: tuple, index: int, x: torch.Tensor) -> tuple:
        t, base, acc = state
        return t, base, mean.update(acc, index, x)

    def finalize(state: tuple) -> torch.Tensor:
        t, base, acc = state
        return scale_(mean.finalize(acc), t).add_(base, alpha=1.0 - t)

    return Kernel(init, update, finalize)


@overload
def model_stock(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
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
def model_stock(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    out: str | os.PathLike,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    chunk_bytes: int = ...,
    allow_nonfinite: bool = ...,
) -> Path: ...


def model_stock(
    models: Sequence[StateDictLike],
    base: StateDictLike,
    *,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Progress = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    chunk_bytes: int = FOLD_CHUNK_BYTES,
    allow_nonfinite: bool = False,
) -> StateDict | Path:
    """Model Stock: per tensor, move from the base towards the mean by the task vectors' angle.

    For every floating key, with ``τᵢ = θᵢ − θ_base`` flattened and N models::

        cos θᵢⱼ = clamp(⟨τᵢ, τⱼ⟩ / (‖τᵢ‖·‖τⱼ‖ + 1e-8), −1, 1)
        cos θ   = mean of cos θᵢⱼ over the pairs i < j
        t       = N·cos θ / ((N − 1)·cos θ + 1 + 1e-8)
        θ       = t·mean(θᵢ) + (1 − t)·θ_base

    Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024; the
    epsilons are those of the released code (N = 2), and the mean over pairs for N > 2 is
    mergekit's extension. Zero task vectors give ``t = 0``: the base. ``t ≤ 1`` always; near
    the pole where ``(N − 1)·cos θ + 1 = 0`` it is clamped below at ``−1``
    (:data:`T_MIN`), with a :class:`ModelStockWarning` naming the key.

    Each chunk's Gram matrix is a float32 product on the CPU (float64 on CUDA or under a
    reduced float32 matmul precision), summed over chunks in float64, in row order, so the
    in-memory and streaming paths agree bit for bit; a different ``chunk_bytes`` changes ``t``
    only by rounding. Integer tensors are copied from the base.

    Args:
        models: at least two fine-tuned models (mappings, modules, paths or checkpoints).
        base: the model they were fine-tuned from.
        out: ``None`` to return a state dict on the CPU; a ``.safetensors`` path or a directory
            to stream the result to disk and return its path.
        device: where the arithmetic runs; default CUDA when available, else the CPU.
        dtype: output dtype of floating tensors; default that of the base.
        progress: ``True`` for tqdm bars over bytes read, one per pass ("preparing" for the
            angles, then "merging"), or a tqdm-like class.
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
        >>> a, b = {"w": torch.tensor([6.0, 1.0])}, {"w": torch.tensor([4.0, 5.0])}
        >>> ladle.model_stock([a, b], base)  # cos θ = 0.6, t = 0.75
        {'w': tensor([4.0000, 2.5000])}
    """
    if base is None:
        raise ValueError("base: model_stock needs the base model, found None")
    check_models(models)
    if len(models) < 2:
        raise ValueError(f"models: model_stock needs at least 2 models, found {len(models)}")
    target = resolve_device(device)
    chunk_bytes = check_chunk_bytes(chunk_bytes)  # recorded in the output's parameters

    def prepare(checkpoints: list[Checkpoint], base_checkpoint: Checkpoint | None) -> Kernel:
        assert base_checkpoint is not None
        n = len(checkpoints)
        grams = key_grams(
            checkpoints,
            base_checkpoint,
            device=target,
            chunk_bytes=chunk_bytes,
            allow_nonfinite=allow_nonfinite,
        )
        ratios = {
            key: stock_ratio(mean_cosine(gram.tolist()), n, key=key) for key, gram in grams.items()
        }
        return stock_kernel(ratios, n)

    return merge(
        models,
        stock_kernel({}, 0),  # replaced by prepare's kernel once the ratios are known
        base=base,
        method="model_stock",
        # chunk_bytes below GRAM_CHUNK_BYTES changes the Gram sums' rounding: recorded, so
        # that the card's recipe gives the same weights.
        parameters={"eps": EPS, "t_min": T_MIN, "chunk_bytes": chunk_bytes},
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
