"""Model ratatouille (Ramé et al. 2023): recycle fine-tunings of auxiliary tasks.

The recipe: fine-tune the pre-trained model on auxiliary tasks; train a linear probe for the
target task on the pre-trained featurizer; fine-tune on the target task starting from each
auxiliary model with the probe put in (:func:`ratatouille_init`); average the target
fine-tunings (:func:`ratatouille`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal, overload

import torch

from ..checkpoint import Checkpoint, StateDict, StateDictLike, check_source, open_checkpoint
from ..engine import (
    FOLD_CHUNK_BYTES,
    NumbersLike,
    Progress,
    _bar,
    _check_output,
    _kind,
    cast,
    check_chunk_bytes,
    check_models,
    check_output_dtypes,
    chunk_shape,
    merge,
    output_dtype,
    past_saturation,
    resolve_device,
    resolve_dtype,
    row_chunks,
    saturation_limit,
)
from ..errors import CheckpointError, IncompatibleError, NonFiniteError, check_flag, type_name
from ..writer import DEFAULT_MAX_SHARD_SIZE, SafetensorsWriter
from .soup import Evaluate, GreedySoupResult, normalized_weights, run_greedy, weighted_mean_kernel

__all__ = ["ratatouille", "ratatouille_init"]

SELECTIONS = ("uniform", "greedy")


@overload
def ratatouille_init(
    auxiliary: StateDictLike,
    head: StateDictLike,
    *,
    drop: Sequence[str] = ...,
    out: None = ...,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
) -> StateDict: ...


@overload
def ratatouille_init(
    auxiliary: StateDictLike,
    head: StateDictLike,
    *,
    drop: Sequence[str] = ...,
    out: str | os.PathLike,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
) -> Path: ...


def ratatouille_init(
    auxiliary: StateDictLike,
    head: StateDictLike,
    *,
    drop: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Progress = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> StateDict | Path:
    """An initialisation for one target fine-tuning: auxiliary weights with the target's head.

    ``init = {k: auxiliary[k] for k not matching drop} | head``: the auxiliary model's weights,
    without the keys that match a pattern of ``drop`` (the auxiliary task's own head), with
    every key of ``head`` (the target task's linear probe, trained on the pre-trained
    featurizer) put in. Step 3 of model ratatouille, Ramé et al., "Model Ratatouille:
    Recycling diverse models for out-of-distribution generalization", ICML 2023.

    ``drop`` holds ``fnmatch``-style globs matched against whole keys, case-sensitively
    (``"head.*"``, ``"classifier.weight"``); a key without wildcards matches only itself. A
    head key that replaces a dropped key, or that is new, may have any shape; a head key that
    replaces a kept auxiliary key must have its shape and dtype kind. Key order: the
    auxiliary's kept keys (a head key that replaces one in its place), then the head's other
    keys, those that replace dropped keys included. Tensors are copies, in their own dtypes;
    auxiliary keys naming one tensor (tied weights, as a tied module's state dict holds them)
    name one copy. A head key that is such a name while another stays the auxiliary's is
    refused: a model that ties them cannot hold both the probe and that tensor.

    It takes the keywords every method takes: ``out`` writes the init (a ``.safetensors``
    file, or a directory of weights alone: the auxiliary's ``config.json`` describes its own
    task's head, so none is copied); ``dtype`` casts its floating tensors; ``device`` is
    checked as every method checks it, and the init, which holds copies and computes
    nothing, is put together on the CPU; ``progress`` shows the bytes copied.

    Args:
        auxiliary: the model fine-tuned on an auxiliary task (a mapping, module or path).
        head: the target task's head: names to tensors (a mapping, module or path).
        drop: glob patterns of auxiliary keys to remove (its task's head); each must match.
        out: ``None`` to return the init; a ``.safetensors`` path or a directory to write it
            to (atomically) and return its path. Never one of the inputs.
        device: checked as the merges check it (``"cuda"`` without CUDA is a ``ValueError``).
        dtype: dtype of the floating tensors (default: each its own).
        progress: ``True`` for a tqdm bar over the bytes copied, or a tqdm-like class.
        max_shard_size: largest shard of a directory output.
        overwrite: replace an earlier output at ``out`` instead of refusing.

    Returns:
        A new state dict on the CPU, ready to load into the target model; with ``out``, the
        path written.

    Raises:
        IncompatibleError: a pattern of ``drop`` matches no key, a head key disagrees in
            shape or dtype kind with a kept auxiliary key, or is tied to a kept auxiliary key
            (one tensor, two names) that the head does not replace.
        NonFiniteError: a finite value past the range of ``dtype`` (1e5 in float16).

    Example:
        >>> import torch, ladle
        >>> aux = {"body.weight": torch.ones(4, 3), "head.weight": torch.zeros(10, 4),
        ...        "head.bias": torch.zeros(10)}
        >>> probe = {"head.weight": torch.full((5, 4), 0.5), "head.bias": torch.zeros(5)}
        >>> init = ladle.ratatouille_init(aux, probe, drop=["head.*"])
        >>> {key: tuple(t.shape) for key, t in init.items()}
        {'body.weight': (4, 3), 'head.weight': (5, 4), 'head.bias': (5,)}
    """
    check_flag("overwrite", overwrite)
    resolve_device(device)  # checked as every method checks it; nothing runs there
    dtype = resolve_dtype(dtype)
    if isinstance(drop, str):
        raise TypeError(f"drop: expected a sequence of patterns, found the string {drop!r}")
    if not isinstance(drop, Sequence) or not all(isinstance(p, str) for p in drop):
        found = type_name(drop) if not isinstance(drop, Sequence) else repr(drop)
        raise TypeError(f"drop: expected a sequence of patterns (strings), found {found}")
    check_source("auxiliary", auxiliary)
    check_source("head", head)
    aux = _opened("auxiliary", auxiliary)
    try:
        probe = _opened("head", head)
    except BaseException:
        if aux is not auxiliary:
            aux.close()
        raise
    try:
        keys = aux.keys()
        for pattern in drop:
            if not any(fnmatchcase(key, pattern) for key in keys):
                shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
                raise IncompatibleError(
                    f"auxiliary ({aux.name}): drop pattern {pattern!r} matches none of its "
                    f"{len(keys)} keys ({shown})"
                )
        kept = [key for key in keys if not any(fnmatchcase(key, p) for p in drop)]
        kept_set = set(kept)
        for key in probe.keys():
            if key not in kept_set:
                continue
            shape, aux_shape = probe.shape(key), aux.shape(key)
            if shape != aux_shape:
                raise IncompatibleError(
                    f"head ({probe.name}): key {key!r} has shape {shape}, auxiliary "
                    f"({aux.name}) has {aux_shape}; if it belongs to the auxiliary task's "
                    f"head, pass drop=[{key!r}]"
                )
            if _kind(probe.dtype(key)) != _kind(aux.dtype(key)):
                raise IncompatibleError(
                    f"head ({probe.name}): key {key!r} has dtype {probe.dtype(key)}, "
                    f"auxiliary ({aux.name}) has {aux.dtype(key)}"
                )
        head_keys = set(probe.keys())
        tied = aux.aliases()
        _check_tied(keys, kept_set, head_keys, tied, aux.name, probe.name)
        for opened in (aux, probe):
            check_output_dtypes(opened, dtype)
        _check_output(out, [aux, probe], overwrite=overwrite, max_shard_size=max_shard_size)
        where = "the init" if out is None else str(out)
        # Where each key of the init is read: the head's keys from it, the others from aux.
        read = {key: probe if key in head_keys else aux for key in kept}
        read.update({key: probe for key in probe.keys() if key not in read})
        shared = {key: tied.get(key, key) for key in kept if key not in head_keys}
        if out is None:  # tied weights are one copy
            total = sum(aux.nbytes(k) for k in set(shared.values()))
            total += sum(map(probe.nbytes, head_keys))
        else:  # and written under each name
            total = sum(origin.nbytes(key) for key, origin in read.items())
        bar = _bar(progress, total, desc="init")
        try:
            copy = functools.partial(_copied, dtype=dtype, where=where, bar=bar)
            if out is not None:
                return _write_init(read, out, copy, dtype, max_shard_size, overwrite=overwrite)
            init: StateDict = {}
            copies: StateDict = {}  # tied weights the head takes none of: one copy, every name
            for key, origin in read.items():
                first = shared.get(key)  # its first name, which drop may have removed
                if first is None:  # the head's
                    init[key] = copy(origin, key)
                    continue
                if first not in copies:
                    copies[first] = copy(aux, key)
                init[key] = copies[first]
        finally:
            if bar is not None:
                bar.close()
        return init
    finally:
        for checkpoint, source in ((aux, auxiliary), (probe, head)):
            if checkpoint is not source:
                checkpoint.close()


def _opened(role: str, source: StateDictLike) -> Checkpoint:
    """``source`` opened; a ``CheckpointError`` it raises names its ``role`` first."""
    try:
        return open_checkpoint(source)
    except CheckpointError as err:
        raise type(err)(f"{role}: {err}") from err  # an UnsafeCheckpointError stays one


def _write_init(
    read: Mapping[str, Checkpoint],
    out: str | os.PathLike,
    copy: Callable[..., torch.Tensor],
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    *,
    overwrite: bool,
) -> Path:
    """Write the init to ``out``, each key read from ``read[key]`` and copied (``copy``: a
    :func:`_copied` casting to ``dtype``) a chunk of rows at a time
    (:data:`~ladle.engine.FOLD_CHUNK_BYTES`), so that no whole tensor, nor the model, is held
    in memory."""
    specs = {}
    for key, source in read.items():
        shape = tuple(source.shape(key))
        specs[key] = (shape, output_dtype(source.dtype(key), dtype))
    with SafetensorsWriter(out, specs, max_shard_size=max_shard_size, overwrite=overwrite) as sink:
        for key in sink.order:
            shape = specs[key][0]
            view = chunk_shape(shape, FOLD_CHUNK_BYTES)
            for rows in row_chunks(shape, FOLD_CHUNK_BYTES):
                sink.write(key, copy(read[key], key, rows=rows, view=view))
    return Path(out)


def _copied(
    source: Checkpoint,
    key: str,
    *,
    dtype: torch.dtype | None,
    where: str,
    bar: object,
    rows: slice = slice(None),
    view: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """A copy on the CPU of ``rows`` of ``source``'s tensor ``key`` (of it read as ``view``:
    :meth:`~ladle.Checkpoint.get_rows`), its floating values cast to ``dtype`` (rounded once:
    :func:`~ladle.engine.cast`); a finite value that the cast would make infinite, or
    saturate (``float8_e4m3fn``), is a :class:`NonFiniteError` counting every such value of
    the key."""
    tensor = source.get_rows(key, rows, view).to("cpu", copy=True)
    if bar is not None:
        bar.update(tensor.numel() * tensor.element_size())  # type: ignore[attr-defined]
    target = output_dtype(tensor.dtype, dtype)
    if target == tensor.dtype:
        return tensor
    result = cast(tensor, target)
    lost = _lost(tensor, result)
    if bool(lost.any()):
        stored = tuple(source.shape(key))
        count = int(lost.sum())
        if rows != slice(None):  # the other rows of the key read again, on the way to an error
            chunks = row_chunks(stored, FOLD_CHUNK_BYTES)
            parts = (source.get_rows(key, part, view) for part in chunks if part != rows)
            count += sum(int(_lost(part, cast(part, target)).sum()) for part in parts)
        name = str(target).removeprefix("torch.")
        raise NonFiniteError(
            f"{where}: {count} of the {math.prod(stored)} values of key {key!r} "
            f"({source.name}) are past the range of {name} (largest finite value "
            f"{torch.finfo(target).max:g}); keep a wider dtype"
        )
    return result


def _lost(tensor: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Where casting ``tensor`` to ``result`` lost a finite value: made it infinite, or
    saturated it (``float8_e4m3fn``, which has no infinity)."""

    def wide(values: torch.Tensor) -> torch.Tensor:  # torch compares no float8 on the CPU
        return values.float() if values.dtype.itemsize == 1 else values

    limit = saturation_limit(result.dtype)
    past = past_saturation(wide(tensor), limit) if limit is not None else ~wide(result).isfinite()
    return past & torch.isfinite(wide(tensor))


def _check_tied(
    keys: Sequence[str],
    kept: Collection[str],
    head_keys: Collection[str],
    tied: Mapping[str, str],
    aux: str,
    probe: str,
) -> None:
    """An :class:`IncompatibleError` where the head gives one name of a tensor that the
    auxiliary names twice (``tied``: its :meth:`~ladle.Checkpoint.aliases`, tied weights), a
    name dropped or not, and another name stays the auxiliary's (in ``kept``): loaded into a
    model that ties them, one parameter would take both, the last loaded."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(tied.get(key, key), []).append(key)
    for names in groups.values():
        given = [key for key in names if key in head_keys]
        others = [key for key in names if key in kept and key not in head_keys]
        if given and others:
            key, other = given[0], others[0]
            raise IncompatibleError(
                f"head ({probe}): key {key!r} is tied to {other!r} in auxiliary ({aux}) (one "
                f"tensor, two names): a model that ties them loads the probe and the "
                f"auxiliary's {other!r} into one parameter, and keeps the one loaded last. A "
                "linear probe needs a head of its own: untie it in the target model "
                "(transformers: tie_word_embeddings=False) and pass the auxiliary as that "
                f"untied model, or with {key!r} cloned"
            )


@overload
def ratatouille(
    models: Sequence[StateDictLike],
    *,
    selection: str = ...,  # "uniform", or a str known at run time alone (a config's)
    evaluate: None = ...,
    scores: None = ...,
    strict: bool = ...,
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
def ratatouille(
    models: Sequence[StateDictLike],
    *,
    selection: str = ...,  # "uniform", or a str known at run time alone (a config's)
    evaluate: None = ...,
    scores: None = ...,
    strict: bool = ...,
    out: str | os.PathLike,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    chunk_bytes: int = ...,
    allow_nonfinite: bool = ...,
) -> Path: ...


@overload
def ratatouille(
    models: Sequence[StateDictLike],
    *,
    selection: Literal["greedy"],
    evaluate: Evaluate,
    scores: NumbersLike | None = ...,
    strict: bool = ...,
    out: str | os.PathLike | None = ...,
    device: str | torch.device | None = ...,
    dtype: torch.dtype | str | None = ...,
    progress: Progress = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    chunk_bytes: int = ...,
    allow_nonfinite: bool = ...,
) -> GreedySoupResult: ...


def ratatouille(
    models: Sequence[StateDictLike],
    *,
    selection: str = "uniform",
    evaluate: Evaluate | None = None,
    scores: NumbersLike | None = None,
    strict: bool = False,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Progress = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    chunk_bytes: int = FOLD_CHUNK_BYTES,
    allow_nonfinite: bool = False,
) -> StateDict | Path | GreedySoupResult:
    """The ratatouille: average the target fine-tunings that started from auxiliary inits.

    ``θ = (1/M) Σⱼ θⱼ`` over the M target fine-tunings (one or more per auxiliary
    initialisation from :func:`ratatouille_init`), or with ``selection="greedy"`` the greedy
    rule of :func:`greedy_soup` (keep a fine-tuning when the held-out score does not drop).
    Step 4 of Ramé et al., "Model Ratatouille: Recycling diverse models for out-of-distribution
    generalization", ICML 2023. ``selection="uniform"`` gives exactly ``uniform_soup(models)``
    (the same fold, bit for bit); only what the output records (method, parameters) differs.

    Args:
        models: the target fine-tunings (mappings, modules, paths or checkpoints).
        selection: ``"uniform"`` (all of them) or ``"greedy"``.
        evaluate: ``evaluate(state_dict) -> float``, higher is better; ``"greedy"`` only.
        scores: the models' own scores, when known; ``"greedy"`` only.
        strict: with ``"greedy"``, keep a candidate only when it improves the score strictly.
        out: ``None`` for an in-memory result, or a path to write the soup to.
        device: where the arithmetic runs; default CUDA when available, else the CPU.
        dtype: output dtype of floating tensors; default that of model 0 (``"greedy"``: of
            the best-ranked model).
        progress: ``True`` for a tqdm bar, or a tqdm-like class.
        max_shard_size: largest shard of a directory output.
        overwrite: replace an earlier output at ``out`` (atomically) instead of refusing.
        chunk_bytes: largest piece of one tensor processed at a time (``"uniform"``; with
            ``"greedy"`` any other value than the default is a ``ValueError``).
        allow_nonfinite: merge inputs holding NaN or Inf, and keep merged values that
            overflow the output dtype, instead of raising NonFiniteError.

    Returns:
        ``"uniform"``: the state dict, or the path written. ``"greedy"``: a
        :class:`~ladle.GreedySoupResult` (its state dict populated also with ``out``).

    Example:
        >>> import torch, ladle
        >>> runs = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
        >>> ladle.ratatouille(runs)
        {'w': tensor([0.5000, 0.5000])}
        >>> ladle.ratatouille(runs, selection="greedy", scores=[0.7, 0.8],
        ...                   evaluate=lambda sd: 0.9).selected
        [1, 0]
    """
    check_models(models)
    if selection not in SELECTIONS:
        raise ValueError(f"selection: expected one of {SELECTIONS}, found {selection!r}")
    if selection == "uniform":
        given = [
            name
            for name, value in (("evaluate", evaluate), ("scores", scores), ("strict", strict))
            if value is not None and value is not False
        ]
        if given:
            raise ValueError(
                f"{given[0]}: used only with selection='greedy'; "
                f"pass selection='greedy' or leave {' and '.join(given)} out"
            )
        return merge(
            models,
            weighted_mean_kernel(normalized_weights(None, len(models))),
            method="ratatouille",
            parameters={"selection": "uniform"},
            out=out,
            device=device,
            dtype=dtype,
            progress=progress,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            chunk_bytes=chunk_bytes,
            allow_nonfinite=allow_nonfinite,
        )
    if evaluate is None:
        raise ValueError("evaluate: selection='greedy' needs evaluate(state_dict) -> float")
    if check_chunk_bytes(chunk_bytes) != FOLD_CHUNK_BYTES:  # the greedy rule folds its own
        raise ValueError(
            f"chunk_bytes: used only with selection='uniform' (the greedy rule folds "
            f"{FOLD_CHUNK_BYTES} bytes at a time); leave chunk_bytes out, found {chunk_bytes}"
        )
    return run_greedy(
        models,
        evaluate,
        method="ratatouille",
        parameters={"selection": "greedy", "strict": strict},
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
