"""Model soups (Wortsman et al. 2022): the mean of fine-tuned models, uniform or greedy."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, overload

import torch

from ..checkpoint import Checkpoint, StateDict, StateDictLike, TensorMapCheckpoint, tied_names
from ..engine import (
    FOLD_CHUNK_BYTES,
    Kernel,
    NumberLike,
    NumbersLike,
    Progress,
    Scratch,
    _bar,
    _check_merged,
    _check_output,
    _check_saturating,
    add_scaled_,
    cast,
    check_compatible,
    check_mergeable,
    check_models,
    check_number,
    check_numbers,
    check_output_dtypes,
    check_room,
    check_unpacked,
    compute_dtype,
    fold,
    is_merged_dtype,
    merge,
    open_models,
    output_dtype,
    output_record,
    output_specs,
    resolve_device,
    resolve_dtype,
    saturation_limit,
    scaled,
)
from ..errors import LadleError, check_flag, type_name
from ..writer import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsWriter,
    check_storable,
)

__all__ = [
    "Evaluate",
    "GreedySoupResult",
    "GreedySoupStep",
    "greedy_soup",
    "normalized_weights",
    "run_greedy",
    "running_mean_kernel",
    "uniform_soup",
    "weighted_mean_kernel",
]


def normalized_weights(weights: NumbersLike | None, count: int) -> list[float]:
    """``weights`` divided by their sum (uniform when ``None``); checked for length and sum
    (``ValueError``) and to be numbers (``TypeError``).

    Example:
        >>> normalized_weights([1, 3], 2), normalized_weights(None, 4)
        ([0.25, 0.75], [0.25, 0.25, 0.25, 0.25])
        >>> normalized_weights([1, -1], 2)
        Traceback (most recent call last):
        ValueError: weights: expected finite weights with a non-zero sum, found [1.0, -1.0]
    """
    if count == 0:
        raise ValueError("models: expected at least one model, found none")
    if weights is None:
        return [1.0 / count] * count
    values = check_numbers("weights", weights, count, "weights (one per model)")
    # A message, not an exception kept in a local: raised, it would hold this frame (and
    # the callers', ladle.distributed's process group among them) in a cycle.
    bad = f"weights: expected finite weights with a non-zero sum, found {values}"
    if not all(math.isfinite(w) for w in values):
        raise ValueError(bad)
    try:
        total = math.fsum(values)
    except OverflowError:  # finite, but their sum passes float's range: scale them down first
        largest = max(abs(w) for w in values)
        values = [w / largest for w in values]
        total = math.fsum(values)
    if total == 0:
        raise ValueError(bad)
    normalized = [w / total for w in values]
    if not all(math.isfinite(w) for w in normalized):  # a sum tiny beside the weights
        raise ValueError(
            f"weights: {values} divided by their sum ({total!r}) pass float's range; "
            "expected weights whose sum is not nearly zero beside them"
        )
    return normalized


def weighted_mean_kernel(weights: Sequence[float]) -> Kernel:
    """Fold ``Σᵢ wᵢ·xᵢ`` one model at a time into one accumulator (memory independent of N).

    The accumulator is one scratch buffer reused from chunk to chunk: allocating a fresh
    tensor per key costs more (page faults on new memory) than the arithmetic itself.

    Example:
        >>> import torch
        >>> from ladle.engine import merge
        >>> models = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
        >>> merge(models, weighted_mean_kernel([0.25, 0.75]), method="soup", parameters={},
        ...       device="cpu")
        {'w': tensor([2.5000, 5.0000])}
    """
    scratch = Scratch()

    def init(key: str, rows: slice, base: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def update(acc: torch.Tensor | None, index: int, x: torch.Tensor) -> torch.Tensor:
        if acc is None:  # x may be a read-only view of a file: never write into it
            return scaled(x, weights[index], scratch.take(x.shape, x.dtype, x.device))
        return add_scaled_(acc, x, weights[index])  # weights of 1e-44 too (see scaled)

    def finalize(acc: torch.Tensor) -> torch.Tensor:
        return acc

    return Kernel(init, update, finalize, propagates_nonfinite=True)


@overload
def uniform_soup(
    models: Sequence[StateDictLike],
    *,
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
def uniform_soup(
    models: Sequence[StateDictLike],
    *,
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


def uniform_soup(
    models: Sequence[StateDictLike],
    *,
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
        overwrite: replace an earlier output at ``out`` (atomically) instead of refusing.
        chunk_bytes: largest piece of one tensor processed at a time, per model.
        allow_nonfinite: merge inputs holding NaN or Inf, and keep merged values that
            overflow the output dtype, instead of raising NonFiniteError.

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
    check_models(models)
    normalized = normalized_weights(weights, len(models))
    # Recorded as given (uniform: as used): a recipe replaying the merge divides them by
    # their sum as this did. Weights divided twice may differ in the last bit (float64).
    recorded = (
        normalized
        if weights is None
        else check_numbers("weights", weights, len(models), "weights (one per model)")
    )
    return merge(
        models,
        weighted_mean_kernel(normalized),
        method="uniform_soup",
        parameters={"weights": recorded},
        out=out,
        device=device,
        dtype=dtype,
        progress=progress,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        allow_nonfinite=allow_nonfinite,
    )


@dataclass(frozen=True)
class GreedySoupStep:
    """One try of the greedy soup: model ``index`` (into ``models``), the score of the soup
    with it (the first: that model's own), and whether the rule kept it.

    Example:
        >>> import torch, ladle
        >>> models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([9.0])}]
        >>> soup = ladle.greedy_soup(models, lambda sd: -float(sd["w"]), device="cpu")
        >>> [(step.index, step.score, step.accepted) for step in soup.history]
        [(0, -1.0, True), (1, -5.0, False)]
    """

    index: int
    score: float
    accepted: bool


class GreedySoupResult(NamedTuple):
    """What :func:`greedy_soup` returns.

    Attributes:
        state_dict: the final soup, on the CPU in the output dtype (also with ``out=``).
        selected: indices into ``models`` of the ingredients, in the order they were added
            (the best-scoring model first).
        score: ``evaluate``'s score of ``state_dict`` (for one ingredient: that model's score).
        history: one :class:`GreedySoupStep` per model, in rank order; the first is the
            starting ingredient with its own score, each later one a candidate soup.

    Example:
        >>> import torch, ladle
        >>> models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
        >>> def accuracy(state_dict):  # best at w = 2
        ...     return 10.0 - abs(state_dict["w"].item() - 2.0)
        >>> state_dict, selected, score, history = ladle.greedy_soup(models, accuracy)
        >>> selected, score, history[1]
        ([0, 1], 10.0, GreedySoupStep(index=1, score=10.0, accepted=True))
    """

    state_dict: StateDict
    selected: list[int]
    score: float
    history: list[GreedySoupStep]


Evaluate = Callable[[StateDict], NumberLike]
"""``evaluate(state_dict) -> score``; higher is better (a held-out accuracy): a number (not a
bool), or a 0-d tensor or array, as :data:`~ladle.engine.NumberLike`."""


def running_mean_kernel(count: int) -> Kernel:
    """Fold ``(soup, model)`` into ``soup·n/(n+1) + model/(n+1)`` with ``n = count``.

    Computed as ``torch.lerp(soup, model, 1/(n+1))``, and exactly ``soup`` where the two
    agree bit for bit (lerp's ``soup + w·(model − soup)`` makes ``+0.0`` of two ``−0.0``
    and NaN of two infinities); where lerp makes no finite value of numbers that are not
    NaN (an infinity beside a number, or ``model − soup`` past float's range), as
    ``soup·n/(n+1) + model/(n+1)`` in float64. With ``count == 0`` the only input is
    the model and the result is an owned copy.

    Example:
        >>> import torch
        >>> from ladle.engine import merge
        >>> soup = {"w": torch.tensor([2.0, 4.0])}  # the mean of 2 models so far
        >>> merge([soup, {"w": torch.tensor([5.0, 1.0])}], running_mean_kernel(2),
        ...       method="soup", parameters={}, device="cpu")
        {'w': tensor([3., 3.])}
    """

    def init(key: str, rows: slice, base: torch.Tensor | None) -> None:
        return None

    def update(state: torch.Tensor | None, index: int, x: torch.Tensor) -> torch.Tensor:
        if state is None:
            # With count > 0, model 0 is the running soup, a dict in memory whose tensors the
            # engine hands over as they are; a model read from a file is only valid during
            # this call, so the first model of a new soup is copied.
            return x if count else x.clone()
        merged = torch.lerp(state, x, 1.0 / (count + 1))
        same = torch.eq(state, x).logical_and_(torch.signbit(state) == torch.signbit(x))
        result = torch.where(same, state, merged)
        # lerp's own non-finite values: inf − inf inside (an infinity and a number), or
        # model − soup past float's range (opposite signs near the largest value)
        if not torch.isfinite(merged).all():
            lost = (~torch.isfinite(merged)).logical_and_(~state.isnan()).logical_and_(~x.isnan())
            s, m = state[lost].double(), x[lost].double()
            # float64 holds soup·n + model of float32 values exactly enough to round once;
            # of float64 values it may overflow, so their weights go first
            if x.dtype == torch.float64:
                wide = s * (count / (count + 1)) + m / (count + 1)
            else:
                wide = (s * count + m) / (count + 1)
            result[lost] = wide.to(result.dtype)  # the mean's infinity, or its finite value
        return result

    def finalize(state: torch.Tensor) -> torch.Tensor:
        return state

    return Kernel(init, update, finalize)


def _checked_scores(scores: NumbersLike, count: int) -> list[float]:
    values = check_numbers("scores", scores, count, "scores (one per model)")
    if any(math.isnan(s) for s in values):
        raise ValueError(f"scores: expected numbers, found NaN in {values}")
    return values


def _running_mean(
    sources: list[Checkpoint],
    numbers: list[int],
    n: int,
    *,
    keys: list[str],
    device: torch.device,
    allow_nonfinite: bool,
) -> StateDict:
    """``sources[0]`` (a soup of ``n`` models, or a model for ``n = 0``) with ``sources[1]``
    folded into its running mean (:func:`running_mean_kernel`), in memory on ``device``
    (``evaluate`` needs it there). Folded a chunk of rows at a time, so that the fold's
    buffers (pinned on CUDA) are chunks, not tensors; ``numbers`` are the sources' places in
    the caller's ``models``, which errors name."""
    soup: StateDict = {}
    for key, rows, chunk in fold(
        sources,
        running_mean_kernel(n),
        keys=keys,
        device=device,
        chunk_bytes=FOLD_CHUNK_BYTES,
        copy_others=True,
        allow_nonfinite=allow_nonfinite,
        numbers=numbers,
    ):
        if rows == slice(None):  # the kernel's own tensor, or a copy of an input's
            soup[key] = chunk
            continue
        if key not in soup:
            shape = tuple(sources[0].shape(key))
            soup[key] = torch.empty(shape, dtype=chunk.dtype, device=chunk.device)
        soup[key].view(-1, *chunk.shape[1:])[rows] = chunk  # rows of chunk_shape
    return soup


def _score(evaluate: Evaluate, bar: Any, state_dict: StateDict, what: str) -> float:
    """``evaluate(state_dict)``, checked: a number, not NaN (``what`` names the candidate in
    the error); counted on ``bar``."""
    returned = evaluate(state_dict)
    try:  # as any number ladle takes: no bool, no string, within float's range
        value = check_number("evaluate", returned)
    except (TypeError, ValueError):
        raise ValueError(f"evaluate: returned {returned!r} for {what}; expected a number") from None
    if bar is not None:
        bar.update(1)
    if math.isnan(value):
        raise ValueError(f"evaluate: returned NaN for {what}; scores must be comparable")
    return value


def _greedy(
    checkpoints: Sequence[Checkpoint],
    evaluate: Evaluate,
    *,
    scores: NumbersLike | None,
    strict: bool,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: Progress,
    allow_nonfinite: bool,
    where: str = "the greedy soup",
    check_best: Callable[[int, Checkpoint], None] | None = None,
) -> GreedySoupResult:
    """The greedy rule over opened, checked checkpoints. Unless ``allow_nonfinite``, each
    soup is checked as every merge's output is, before ``evaluate`` sees it and before it
    is returned: no NaN or Inf, none made by the cast to the output dtype, and no value
    past the range of a dtype whose casts saturate (see
    :func:`~ladle.engine.saturation_limit`), ``where`` naming it in the error. A tensor
    every model names twice (tied weights) is averaged once, under its first name, and
    handed out under both, one tensor. Every state dict handed out has model 0's keys, as
    every merge has its reference's: a second name that model 0 lacks (it stores the
    tensor once) is read from no model. ``check_best(index, checkpoint)`` is called on the
    best-ranked model, whose dtypes the soup takes, once the ranking is known: before any
    evaluation where ``scores`` are given, else before the soups are evaluated."""
    count = len(checkpoints)
    tied = tied_names(checkpoints)
    names = checkpoints[0].keys()  # the reference's (open_models answers its second names)
    keys = [key for key in names if key not in tied]  # tied: the first name
    bar = _bar(progress, count - 1 + (count if scores is None else 0), "greedy soup", "eval")
    soup_of = functools.partial(
        _running_mean, keys=keys, device=device, allow_nonfinite=allow_nonfinite
    )
    score_of = functools.partial(_score, evaluate, bar)

    def output(
        soup: Mapping[str, torch.Tensor], reference: Checkpoint, to: torch.device | str = device
    ) -> StateDict:
        # On ``to`` (``device`` for evaluate): integer buffers come from the inputs as they are.
        # Checked before evaluate sees it: an overflow of the output dtype is the error, not
        # the NaN an evaluation through it makes.
        converted = {}
        for key, tensor in soup.items():
            target = output_dtype(reference.dtype(key), dtype)
            if not allow_nonfinite and tensor.is_floating_point():
                limit = saturation_limit(target)
                _check_saturating(tensor, limit, target, key, slice(None), checkpoints, None, where)
            converted[key] = cast(tensor.to(to), target)  # rounded once
            if not allow_nonfinite:
                _check_merged(converted[key], key, slice(None), checkpoints, None, where)
        return {key: converted[tied.get(key, key)] for key in names}

    try:
        if scores is None:
            values = [
                score_of(output(soup_of([c], [i], 0), c), f"model {i} ({c.name})")
                for i, c in enumerate(checkpoints)
            ]
        else:
            values = _checked_scores(scores, count)
        ranked = sorted(range(count), key=lambda i: -values[i])  # stable: ties keep input order
        best = checkpoints[ranked[0]]
        if check_best is not None:
            check_best(ranked[0], best)
        soup = soup_of([best], ranked[:1], 0)
        selected, score = [ranked[0]], values[ranked[0]]
        history = [GreedySoupStep(ranked[0], score, True)]
        for index in ranked[1:]:
            candidate = soup_of(  # the soup (finite: checked) named after the first model in it
                [TensorMapCheckpoint(soup), checkpoints[index]],
                [ranked[0], index],
                len(selected),
            )
            tried = score_of(output(candidate, best), f"the soup with model {index}")
            accepted = tried > score if strict else tried >= score
            history.append(GreedySoupStep(index, tried, accepted))
            if accepted:
                soup, score = candidate, tried
                selected.append(index)
            del candidate  # at most the soup and one candidate are alive
    finally:
        if bar is not None:
            bar.close()
    return GreedySoupResult(output(soup, best, to="cpu"), selected, score, history)


def _check_greedy_room(checkpoints: Sequence[Checkpoint]) -> None:
    """:func:`~ladle.engine.check_room` for the greedy rule on the CPU, which holds two soups
    in memory whatever ``out`` is: the running soup and a candidate, each floating tensor in
    its compute dtype (float32, or float64), a tensor named twice (tied weights) once."""
    tied = tied_names(checkpoints)
    reference = checkpoints[0]
    specs = {}
    for key in reference.keys():
        if key in tied:
            continue
        held = reference.dtype(key)  # an integer buffer: a copy of model 0's
        if is_merged_dtype(held):
            held = compute_dtype([c.dtype(key) for c in checkpoints])
        specs[key] = (tuple(reference.shape(key)), held)
    check_room(
        specs,
        copies=2,
        what="the greedy soup (the running soup and a candidate, held in memory)",
        hint="the greedy rule holds them whatever out= is: fewer or smaller models, or a GPU",
    )


def _config_dtype(
    state: Mapping[str, torch.Tensor], best: Checkpoint, first: Checkpoint
) -> torch.dtype | None:
    """The dtype a greedy soup's config (model 0's) says: ``None`` (as model 0's config says)
    where the best-ranked model stores every floating key as model 0 does, else the floating
    dtype that holds the most of ``state``'s bytes (a float32 norm beside bfloat16 weights
    is a bfloat16 model, as its config says).

    Example:
        >>> import torch, ladle
        >>> half = torch.ones(8, dtype=torch.bfloat16)
        >>> a = ladle.open_checkpoint({"n": torch.ones(2), "w": half})
        >>> b = ladle.open_checkpoint({"n": torch.ones(2), "w": torch.ones(8)})
        >>> _config_dtype({"n": torch.ones(2), "w": torch.ones(8)}, b, a)
        torch.float32
        >>> print(_config_dtype({}, a, a))
        None
    """

    def floating(checkpoint: Checkpoint) -> dict[str, torch.dtype]:
        return {k: d for k, (_, d) in output_specs(checkpoint, None).items() if d.is_floating_point}

    if floating(best) == floating(first):
        return None
    sizes: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel() * tensor.itemsize
    return max(sizes, key=sizes.__getitem__, default=None)


def run_greedy(
    models: Sequence[StateDictLike],
    evaluate: Evaluate,
    *,
    method: str,
    parameters: Mapping[str, object],
    scores: NumbersLike | None,
    strict: bool,
    out: str | os.PathLike | None,
    device: str | torch.device | None,
    dtype: torch.dtype | str | None,
    progress: Progress,
    max_shard_size: int | str,
    overwrite: bool,
    allow_nonfinite: bool,
) -> GreedySoupResult:
    """Open and check ``models``, run the greedy rule, write the soup to ``out`` if given.

    The body of :func:`greedy_soup` and of ``ratatouille(..., selection="greedy")``, every
    parameter explicit.
    ``method`` and ``parameters`` are what the output's provenance and model card record
    (with the selection and its score); the rest are :func:`greedy_soup`'s, and so are the
    result and the errors.

    Example:
        >>> import tempfile, torch, ladle
        >>> models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
        >>> out = tempfile.mkdtemp() + "/soup.safetensors"
        >>> result = run_greedy(
        ...     models, lambda sd: 10 - abs(sd["w"].item() - 2.0), method="my_greedy_soup",
        ...     parameters={"note": "kept ties"}, scores=None, strict=False, out=out,
        ...     device="cpu", dtype=None, progress=None, max_shard_size="5GB",
        ...     overwrite=False, allow_nonfinite=False)
        >>> result.selected, ladle.load(out)["w"].tolist()
        ([0, 1], [2.0])
        >>> with ladle.open_checkpoint(out) as written:
        ...     written.metadata["ladle.method"], written.metadata["ladle.parameters"]
        ('my_greedy_soup', '{"note": "kept ties", "score": 10.0, "selected": [0, 1]}')
    """
    check_flag("strict", strict)
    check_flag("allow_nonfinite", allow_nonfinite)
    if not callable(evaluate):
        raise TypeError(f"evaluate: expected a callable, found {type_name(evaluate)}")
    dtype = resolve_dtype(dtype)
    with ExitStack() as stack:
        checkpoints, _ = open_models(models, None, stack)
        check_compatible(checkpoints)
        check_mergeable(checkpoints)
        for i, checkpoint in enumerate(checkpoints):  # torch computes nothing in these
            check_unpacked(checkpoint, label=f"model {i} ({checkpoint.name})")
        # Refused before the (costly) evaluations, not after.
        _check_output(out, checkpoints, overwrite=overwrite, max_shard_size=max_shard_size)

        def check_written(index: int, model: Checkpoint, ranked: str = "") -> None:
            label = f"model {index} ({model.name}){ranked}"
            check_output_dtypes(model, dtype, label=label)
            if out is not None:
                try:
                    check_storable(out, output_specs(model, dtype))
                except LadleError as err:  # it names the output alone
                    raise type(err)(f"{err} (the soup takes the dtypes of {label})") from None

        # The soup is written in the best-ranked model's dtypes; another model's that no
        # output can hold are no obstacle (a uniform soup takes model 0's too). Where no
        # model's can be written, refused before any evaluation.
        refused = []
        for i, checkpoint in enumerate(checkpoints):
            try:
                check_written(i, checkpoint)
            except (ValueError, LadleError) as err:
                refused.append(err)
        if len(refused) == len(checkpoints):
            raise refused[0]
        check_best = functools.partial(check_written, ranked=", ranked best")

        target = resolve_device(device)
        if target.type == "cpu":  # before the (costly) evaluations
            _check_greedy_room(checkpoints)
        where = "the greedy soup" if out is None else str(out)
        result = _greedy(
            checkpoints,
            evaluate,
            scores=scores,
            strict=strict,
            device=target,
            dtype=dtype,
            progress=progress,
            allow_nonfinite=allow_nonfinite,
            where=where,
            check_best=check_best,
        )
        if out is not None:
            state = result.state_dict
            # Model 0's config, with the dtype written (the best-ranked model's) where the
            # best is another model whose floating keys are stored otherwise: the config
            # described model 0's. The card's recipe asks for no dtype: a soup of the kept
            # models, best first, writes the best one's dtypes, key by key (the dtype of one
            # key, asked for, was written for every key).
            best = checkpoints[result.selected[0]]
            written = _config_dtype(state, best, checkpoints[0])
            meta, extra = output_record(
                method,
                {**parameters, "selected": result.selected, "score": result.score},
                checkpoints,
                None,
                out,
                dtype=dtype,
                max_shard_size=max_shard_size,
                allow_nonfinite=allow_nonfinite,
                config_dtype=None if dtype is not None else written,
            )
            with SafetensorsWriter(
                out,
                {key: (tuple(t.shape), t.dtype) for key, t in state.items()},
                max_shard_size=max_shard_size,
                metadata=meta,
                overwrite=overwrite,
                extra_files=extra,
            ) as writer:
                for key in writer.order:
                    writer.write(key, state[key])
    return result


def greedy_soup(
    models: Sequence[StateDictLike],
    evaluate: Evaluate,
    *,
    scores: NumbersLike | None = None,
    strict: bool = False,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Progress = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
) -> GreedySoupResult:
    """The greedy soup: add models best first, keeping each one that does not lower the score.

    Models are ranked by score, best first (ties keep input order). The soup starts as the
    best model; for each next model ``θ`` the candidate is the running mean with it added,
    ``soup·n/(n+1) + θ/(n+1)`` for a soup of ``n`` ingredients, and is kept when
    ``evaluate(candidate) ≥ best score so far`` (``>`` with ``strict=True``). Greedy soup of
    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time", ICML 2022 (Algorithm 1; ``≥`` as in the
    paper and the DiWA/ratatouille code, ``>`` as in the model-soups code).

    ``evaluate`` is called once per candidate, and once per model only when ``scores`` is
    ``None``. The running mean is computed in float32 (float64 stays float64) on ``device``,
    as ``torch.lerp(soup, θ, 1/(n+1))``, and handed to ``evaluate`` in the output dtype. The
    returned ``state_dict`` is exactly the last accepted candidate, so ``score`` is its score;
    it equals ``uniform_soup([models[i] for i in selected])`` up to float32 rounding (the
    running mean rounds once per ingredient). Integer buffers come from the best-ranked
    model. Memory: the running soup and one candidate, whatever the number of models; models
    are read lazily, one tensor at a time.

    Args:
        models: the fine-tuned models (mappings, modules, paths or checkpoints).
        evaluate: ``evaluate(state_dict) -> float``, higher is better. It receives tensors on
            ``device`` in the output dtype and must not modify them in place (load them into
            a module, or call ``torch.func.functional_call`` in eval mode).
        scores: each model's own score, when known; default: ``evaluate`` each model once.
        strict: keep a candidate only when it improves the score strictly.
        out: also write the final soup there (``.safetensors`` or a directory), atomically.
        device: where the arithmetic runs; default CUDA when available, else the CPU.
        dtype: output dtype of floating tensors; default that of the best-ranked model.
        progress: ``True`` for a tqdm bar over evaluations, or a tqdm-like class.
        max_shard_size: largest shard of a directory output.
        overwrite: replace an earlier output at ``out`` (atomically) instead of refusing.
        allow_nonfinite: merge inputs holding NaN or Inf, and keep merged values that
            overflow the output dtype, instead of raising NonFiniteError.

    Returns:
        ``GreedySoupResult(state_dict, selected, score, history)``; the state dict is on the
        CPU, and is returned with ``out`` too (it was in memory for ``evaluate`` anyway).

    Example:
        >>> import torch, ladle
        >>> models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])},
        ...           {"w": torch.tensor([9.0])}]
        >>> closeness_to_2 = lambda sd: 1 / (1 + abs(sd["w"].item() - 2.0))
        >>> result = ladle.greedy_soup(models, closeness_to_2, device="cpu")
        >>> result.selected, result.score, result.state_dict
        ([0, 1], 1.0, {'w': tensor([2.])})
        >>> [(step.index, step.accepted) for step in result.history]
        [(0, True), (1, True), (2, False)]
    """
    return run_greedy(
        models,
        evaluate,
        method="greedy_soup",
        parameters={"strict": strict},
        scores=scores,
        strict=strict,
        out=out,
        device=device,
        dtype=dtype,
        progress=progress,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
    )
