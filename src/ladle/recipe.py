"""Recipes: merges written down in a TOML file and run with ``ladle run RECIPE.toml``.

A recipe is one step (``method``, ``models``, ``base``, ``parameters``, ``output`` at the top
level) or several named steps (``[steps.NAME]`` tables, run in file order), where a later
step may name an earlier step in ``models`` or ``base`` to use its output. The whole recipe is
checked before anything runs; errors name the step and the field. Relative paths are relative
to the recipe file. See ``docs/recipes.md``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .checkpoint import StateDict
from .errors import LadleError
from .hub import PREFIX, parse_hf_url

__all__ = ["Recipe", "Step", "StepRef", "load_recipe", "run_recipe"]

METHODS = (
    "dare",
    "greedy_soup",
    "model_stock",
    "ratatouille",
    "task_arithmetic",
    "ties",
    "uniform_soup",
)
"""Merge methods a recipe may name (those present in ``ladle`` when the recipe is loaded)."""

ALIASES = {"soup": "uniform_soup", "stock": "model_stock"}
"""Short names (the CLI's sub-commands); ``-`` may be written for ``_``."""

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

STEP_KEYS = ("method", "models", "base", "parameters", "output", "dtype", "max_shard_size")
# Set by the recipe's own fields or by run_recipe, never inside [parameters].
RESERVED = ("models", "base", "out", "device", "dtype", "progress", "overwrite", "max_shard_size")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class StepRef(NamedTuple):
    """An input that is the output of an earlier step."""

    step: str


Input = str | StepRef


class Step(NamedTuple):
    """One checked step of a recipe."""

    name: str
    method: str
    models: tuple[Input, ...]
    base: Input | None
    parameters: dict[str, Any]
    output: Path | None
    dtype: torch.dtype | None
    max_shard_size: int | str | None


class Recipe(NamedTuple):
    """A checked recipe: its file, its device (if set) and its steps in order."""

    path: Path
    device: str | None
    steps: tuple[Step, ...]


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise LadleError(
                f"{path}: reading recipes needs Python 3.11 or later (tomllib), or the "
                "'tomli' package on Python 3.10 (pip install tomli)"
            ) from None
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as err:
        raise ValueError(f"recipe: cannot read {path} ({err.strerror or err})") from err
    except tomllib.TOMLDecodeError as err:  # its message gives the line and column
        raise ValueError(f"{path}: not valid TOML: {err}") from err


def _function(method: str) -> Callable[..., Any]:
    import ladle

    return getattr(ladle, method)  # type: ignore[no-any-return]


def _method_name(value: object, where: str) -> str:
    import ladle

    if not isinstance(value, str):
        raise ValueError(f"{where}.method: expected a string, found {type(value).__name__}")
    name = value.replace("-", "_")
    name = ALIASES.get(name, name)
    available = [m for m in METHODS if hasattr(ladle, m)]
    if name not in available:
        known = ", ".join(sorted([*available, *(a for a, m in ALIASES.items() if m in available)]))
        missing = " (not in this version of ladle)" if name in METHODS else ""
        raise ValueError(
            f"{where}.method: unknown method {value!r}{missing}; expected one of {known}"
        )
    return name


def _source(
    value: object, field: str, earlier: Sequence[str], later: Sequence[str], root: Path
) -> Input:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field}: expected a path, hf:// URL or step name, found {value!r}")
    if value in earlier:
        return StepRef(value)
    if value in later:
        raise ValueError(f"{field}: step {value!r} comes later; a step may only use earlier ones")
    if value.startswith(PREFIX):
        try:
            parse_hf_url(value)
        except LadleError as err:
            raise ValueError(f"{field}: {err}") from None
        return value
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise ValueError(f"{field}: {value!r}: no such file or directory ({path})")
    return str(path)


def _check_parameters(
    value: object, where: str, method: str, signature: inspect.Signature
) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}.parameters: expected a table, found {type(value).__name__}")
    accepted = [
        name
        for name, p in signature.parameters.items()
        if name not in RESERVED and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    for key in value:
        if key in RESERVED:
            raise ValueError(
                f"{where}.parameters.{key}: set by the recipe itself, not under [parameters]"
            )
        if key not in accepted:
            raise ValueError(
                f"{where}.parameters.{key}: {method} has no parameter {key!r}; "
                f"expected one of {', '.join(accepted)}"
            )
    evaluate = value.get("evaluate")
    if evaluate is not None and (
        not isinstance(evaluate, str) or not re.fullmatch(r"[\w.]+:[\w.]+", evaluate)
    ):
        raise ValueError(
            f"{where}.parameters.evaluate: expected 'package.module:function', found {evaluate!r}"
        )
    required = [
        name
        for name, p in signature.parameters.items()
        if name not in RESERVED and p.default is p.empty and p.kind is not p.VAR_KEYWORD
    ]
    for name in required:
        if name not in value:
            raise ValueError(f"{where}.parameters.{name}: required by {method}")
    return dict(value)


def _step(
    name: str,
    table: Mapping[str, Any],
    where: str,
    earlier: Sequence[str],
    later: Sequence[str],
    root: Path,
) -> Step:
    unknown = [key for key in table if key not in STEP_KEYS]
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]}: unknown field; expected one of {', '.join(STEP_KEYS)}"
        )
    if "method" not in table:
        raise ValueError(f"{where}.method: missing")
    method = _method_name(table["method"], where)
    signature = inspect.signature(_function(method))
    models = table.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{where}.models: expected a non-empty list of models, found {models!r}")
    sources = tuple(
        _source(m, f"{where}.models[{i}]", earlier, later, root) for i, m in enumerate(models)
    )
    base: Input | None = None
    if "base" in signature.parameters:
        if "base" in table:
            base = _source(table["base"], f"{where}.base", earlier, later, root)
        elif signature.parameters["base"].default is inspect.Parameter.empty:
            raise ValueError(f"{where}.base: missing; {method} needs a base model")
    elif "base" in table:
        raise ValueError(f"{where}.base: {method} takes no base model")
    parameters = _check_parameters(table.get("parameters"), where, method, signature)
    output = table.get("output")
    if output is not None:
        if not isinstance(output, str) or not output:
            raise ValueError(f"{where}.output: expected a path, found {output!r}")
        output = Path(os.path.expanduser(output))
        output = output if output.is_absolute() else root / output
    dtype = table.get("dtype")
    if dtype is not None:
        if not isinstance(dtype, str) or dtype.lower() not in DTYPES:
            raise ValueError(f"{where}.dtype: expected one of {', '.join(DTYPES)}, found {dtype!r}")
        dtype = DTYPES[dtype.lower()]
    shard = table.get("max_shard_size")
    if shard is not None and not isinstance(shard, (int, str)):
        raise ValueError(f"{where}.max_shard_size: expected e.g. '5GB', found {shard!r}")
    return Step(name, method, sources, base, parameters, output, dtype, shard)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file; nothing is merged.

    Args:
        path: a TOML file: one step at the top level, or ``[steps.NAME]`` tables.

    Returns:
        A :class:`Recipe` whose inputs are resolved paths, ``hf://`` URLs or :class:`StepRef`.

    Raises:
        ValueError: the file is not valid TOML, or a field is wrong; the message names the
            step and field (``steps.final.parameters.scale``).

    Example:
        >>> import pathlib, tempfile, torch, ladle
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = ladle.save({"w": torch.ones(2)}, folder / "a.safetensors")
        >>> _ = (folder / "r.toml").write_text('method = "soup"\\nmodels = ["a.safetensors"]\\n'
        ...                                    'output = "out.safetensors"\\n')
        >>> [(s.name, s.method, s.output.name) for s in load_recipe(folder / "r.toml").steps]
        [('main', 'uniform_soup', 'out.safetensors')]
    """
    file = Path(path)
    data = _read_toml(file)
    root = file.resolve().parent
    device = data.get("device")
    if device is not None and not isinstance(device, str):
        raise ValueError(f"device: expected a string such as 'cpu', found {device!r}")
    if "steps" in data:
        extra = [key for key in data if key not in ("steps", "device")]
        if extra:
            raise ValueError(
                f"{extra[0]}: with [steps.*] tables, every field belongs to a step; "
                "move it into one"
            )
        tables = data["steps"]
        if not isinstance(tables, dict) or not tables:
            raise ValueError("steps: expected one or more [steps.NAME] tables")
    else:
        tables = {"main": {k: v for k, v in data.items() if k != "device"}}
    names = list(tables)
    steps = []
    for i, name in enumerate(names):
        where = "recipe" if "steps" not in data else f"steps.{name}"
        if not _NAME.fullmatch(name):
            raise ValueError(f"{where}: step names are letters, digits, '_' and '-'")
        if not isinstance(tables[name], dict):
            raise ValueError(f"{where}: expected a table, found {type(tables[name]).__name__}")
        steps.append(_step(name, tables[name], where, names[:i], names[i + 1 :], root))
    if steps[-1].output is None:
        where = "recipe" if "steps" not in data else f"steps.{steps[-1].name}"
        raise ValueError(f"{where}.output: missing; the last step must write its result")
    outputs = [s.output for s in steps if s.output is not None]
    for step in steps:
        if step.output is not None and outputs.count(step.output) > 1:
            raise ValueError(f"steps.{step.name}.output: another step writes {step.output} too")
    return Recipe(file, device, tuple(steps))


def _evaluate(reference: str) -> Callable[..., Any]:
    module, _, attr = reference.partition(":")
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"parameters.evaluate: {reference} is not callable")
    return target  # type: ignore[no-any-return]


def run_recipe(
    recipe: str | os.PathLike | Recipe,
    *,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: Any = None,
) -> dict[str, StateDict | Path]:
    """Run every step of a recipe in order; a step without ``output`` stays in memory.

    Args:
        recipe: a recipe file, or a :class:`Recipe` from :func:`load_recipe`.
        device: where the arithmetic runs; default the recipe's ``device``, else CUDA when
            available, else the CPU.
        overwrite: replace existing outputs (atomically) instead of refusing.
        progress: ``True`` for tqdm bars, or a tqdm-like class.

    Returns:
        Each step's result by name: the path written, or the state dict kept in memory.

    Example:
        >>> import pathlib, tempfile, torch, ladle
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = ladle.save({"w": torch.tensor([1.0, 3.0])}, folder / "a.safetensors")
        >>> _ = ladle.save({"w": torch.tensor([3.0, 5.0])}, folder / "b.safetensors")
        >>> _ = (folder / "r.toml").write_text('''
        ... [steps.mean]
        ... method = "soup"
        ... models = ["a.safetensors", "b.safetensors"]
        ... [steps.final]
        ... method = "soup"
        ... models = ["mean", "a.safetensors"]
        ... output = "final.safetensors"
        ... ''')
        >>> results = run_recipe(folder / "r.toml", device="cpu")
        >>> ladle.load(results["final"])["w"].tolist()
        [1.5, 3.5]
    """
    checked = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if not overwrite:
        for step in checked.steps:
            if step.output is not None and step.output.exists():
                raise LadleError(
                    f"steps.{step.name}.output: {step.output} already exists; "
                    "pass overwrite=True (--overwrite) to replace it"
                )
    results: dict[str, StateDict | Path] = {}

    def resolve(source: Input) -> Any:
        return results[source.step] if isinstance(source, StepRef) else source

    for step in checked.steps:
        function = _function(step.method)
        accepted = inspect.signature(function).parameters
        kwargs: dict[str, Any] = dict(step.parameters)
        if "evaluate" in kwargs:
            kwargs["evaluate"] = _evaluate(kwargs["evaluate"])
        if step.base is not None:
            kwargs["base"] = resolve(step.base)
        options = {
            "out": step.output,
            "device": device if device is not None else checked.device,
            "dtype": step.dtype,
            "progress": progress,
            "overwrite": overwrite,
            "max_shard_size": step.max_shard_size,
        }
        kwargs.update({k: v for k, v in options.items() if k in accepted and v is not None})
        result = function([resolve(m) for m in step.models], **kwargs)
        if step.output is not None:
            results[step.name] = step.output
        elif isinstance(result, (Mapping, Path)):
            results[step.name] = result  # type: ignore[assignment]
        else:  # GreedySoupResult and the like
            results[step.name] = result.state_dict
    return results
