"""Recipes: merges written down in a TOML file and run with ``ladle run RECIPE.toml``.

A recipe is one step (``method``, ``models``, ``base``, ``parameters``, ``output`` at the top
level; the step is named ``main``) or several named steps (``[steps.NAME]`` tables, run in
file order), where a later step may name an earlier step in ``models`` or ``base`` to use its
output. The whole recipe is checked before anything runs; errors name the step and the field.
Relative paths are relative to the recipe file. See ``docs/recipes.md``.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import re
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .checkpoint import MISSING, StateDict, open_checkpoint
from .engine import (
    ALLOW_NONFINITE,
    DTYPE_NAMES,
    FOLD_CHUNK_BYTES,
    Destination,
    check_chunk_bytes,
    overlapping,
    reads,
    resolve_device,
    resolved_output,
)
from .errors import LadleError, type_name
from .hub import PREFIX, parse_hf_url, pinned
from .writer import check_output_free, check_output_name, parse_size, single_file

__all__ = ["Recipe", "Step", "StepRef", "load_callable", "load_recipe", "run_recipe"]

METHODS = (
    "dare",
    "greedy_soup",
    "model_stock",
    "ratatouille",
    "slerp",
    "task_arithmetic",
    "ties",
    "uniform_soup",
)
"""Merge methods a recipe may name (those present in ``ladle`` when the recipe is loaded)."""

ALIASES = {"soup": "uniform_soup", "stock": "model_stock"}
"""Short names (the CLI's sub-commands); ``-`` may be written for ``_``."""

DTYPES = {
    **{str(d).removeprefix("torch."): d for d in DTYPE_NAMES.values()},
    **DTYPE_NAMES,
}
"""The output dtypes ``--dtype`` and recipes name: torch's names and the short ones."""

STEP_KEYS = ("method", "models", "base", "parameters", "output", "dtype", "max_shard_size")
# Set by the recipe's own fields or by run_recipe, never inside [parameters].
RESERVED = ("models", "base", "out", "device", "dtype", "progress", "overwrite", "max_shard_size")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class StepRef(NamedTuple):
    """An input that is the output of an earlier step, named in a recipe by the step's name.

    Example:
        >>> import pathlib, tempfile, torch, ladle
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = ladle.save({"w": torch.ones(2)}, folder / "a.safetensors")
        >>> _ = (folder / "r.toml").write_text(
        ...     '[steps.soup]\\nmethod = "soup"\\nmodels = ["a.safetensors"]\\n'
        ...     '[steps.final]\\nmethod = "soup"\\nmodels = ["soup", "a.safetensors"]\\n'
        ...     'output = "out.safetensors"\\n')
        >>> load_recipe(folder / "r.toml").steps[1].models[0]
        StepRef(step='soup')
    """

    step: str


Input = str | StepRef


class Step(NamedTuple):
    """One checked step of a recipe: its inputs resolved, its method's full name, its
    parameters as the method takes them (checked), ``output`` ``None`` for a step whose
    result stays in memory (an input of later steps).

    Example:
        >>> import pathlib, tempfile, torch, ladle
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = ladle.save({"w": torch.ones(2)}, folder / "a.safetensors")
        >>> _ = (folder / "r.toml").write_text(
        ...     'method = "task_arithmetic"\\nmodels = ["a.safetensors"]\\n'
        ...     'base = "a.safetensors"\\noutput = "out.safetensors"\\ndtype = "bf16"\\n'
        ...     '[parameters]\\nscale = 0.5\\n')
        >>> step = load_recipe(folder / "r.toml").steps[0]
        >>> step.method, step.parameters, step.dtype, pathlib.Path(step.base).name
        ('task_arithmetic', {'scale': 0.5}, torch.bfloat16, 'a.safetensors')
    """

    name: str
    method: str
    models: tuple[Input, ...]
    base: Input | None
    parameters: dict[str, Any]
    output: Path | None
    dtype: torch.dtype | None
    max_shard_size: int | str | None


class Recipe(NamedTuple):
    """A checked recipe, as :func:`load_recipe` returns it: its file, its device (if set)
    and its steps in order; :func:`run_recipe` runs it.

    Example:
        >>> import pathlib, tempfile, torch, ladle
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = ladle.save({"w": torch.ones(2)}, folder / "a.safetensors")
        >>> _ = (folder / "r.toml").write_text(
        ...     'device = "cpu"\\nmethod = "soup"\\nmodels = ["a.safetensors"]\\n'
        ...     'output = "out.safetensors"\\n')
        >>> recipe = load_recipe(folder / "r.toml")
        >>> recipe.device, len(recipe.steps), recipe.single, recipe.path.name
        ('cpu', 1, True, 'r.toml')
    """

    path: Path
    device: str | None
    steps: tuple[Step, ...]
    single: bool = False
    """A one-step recipe written at the top level (its errors say ``recipe.``)."""


def _toml_reader(path: Path) -> Any:
    """tomllib, or on Python 3.10 tomli, its original (a LadleError naming ``path`` if it is
    missing)."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:  # pragma: no cover - Python 3.10
        import tomli

        return tomli
    except ImportError:  # pragma: no cover
        raise LadleError(
            f"{path}: reading recipes needs Python 3.11 or later (tomllib), or the "
            "'tomli' package on Python 3.10, which installing ladle brings (pip install tomli)"
        ) from None


def _read_toml(path: Path) -> dict[str, Any]:
    tomllib = _toml_reader(path)
    try:
        with path.open("rb") as handle:
            data = handle.read()
        # A byte-order mark, as some editors write before UTF-8 text, is no TOML statement:
        # tomllib said "Invalid statement (at line 1, column 1)" of a line that looks right.
        return tomllib.loads(data.removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except OSError as err:
        raise ValueError(f"recipe: cannot read {path} ({err.strerror or err})") from err
    except tomllib.TOMLDecodeError as err:  # its message gives the line and column
        raise ValueError(f"{path}: not valid TOML: {err}") from err
    except UnicodeDecodeError as err:  # a checkpoint named by mistake, say
        raise ValueError(
            f"{path}: not a TOML recipe (not UTF-8 text: byte {err.object[err.start]:#04x} "
            f"at offset {err.start})"
        ) from err
    except RecursionError:  # tomllib recurses into arrays: "a = [[[[...]]]]" from a stranger
        raise ValueError(f"{path}: not a TOML recipe (nested too deeply)") from None
    except ValueError as err:  # int() of a literal past Python's 4300 digits (after the
        # UnicodeDecodeError above, a ValueError too)
        said = str(err).split("; use sys.")[0]  # not Python's remedy: the file is wrong
        raise ValueError(f"{path}: not a TOML recipe ({said})") from None


def _in_file_order(names: list[str], file: Path) -> list[str]:
    """Step ``names`` in the order of their ``[steps.NAME]`` headers in ``file``, where each
    has one: tomllib orders them by the first table naming them, and TOML lets
    ``[steps.NAME.parameters]`` come before ``[steps.NAME]``. Steps written otherwise
    (inline tables, dotted keys) keep tomllib's order."""
    tomllib = _toml_reader(file)
    found: dict[str, int] = {}
    text = file.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8")
    for number, line in enumerate(text.splitlines()):
        if not line.lstrip().startswith("[") or line.lstrip().startswith("[["):
            continue
        try:  # a header alone is a TOML document: tomllib reads its quoted names
            header = tomllib.loads(line)
        except (tomllib.TOMLDecodeError, ValueError):  # a line of a multi-line value
            continue
        steps = header.get("steps")
        if isinstance(steps, dict) and len(steps) == 1:
            (name, table), *_ = steps.items()
            if table == {} and name in names:  # [steps.NAME] itself, not a sub-table
                found.setdefault(name, number)
    if len(found) < len(names):
        return names
    return sorted(names, key=found.__getitem__)


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
    value: object,
    field: str,
    earlier: Sequence[str],
    later: Sequence[str],
    root: Path,
    written: Mapping[Path, str],
    own: str = "",
) -> Input:
    """An input: an earlier step (by name), an ``hf://`` URL or an existing path; ``written``
    maps the resolved outputs of earlier steps to their names, and ``own`` is the name of
    the step asking, for the error's hint."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field}: expected a path, hf:// URL or step name, found {value!r}")
    if "\0" in value:  # else Python's "embedded null byte", naming nothing
        raise ValueError(f"{field}: a path cannot hold a NUL character, found {value!r}")
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
    if not _exists(path, f"{field}: {value!r}"):
        try:
            step = written.get(path.resolve())
        except (OSError, RuntimeError):  # a symbolic-link loop, say: no step's output
            step = None
        hint = f"; to use step {step!r}'s output, name {step!r}" if step is not None else ""
        if value == own:
            hint = "; that is this step's own name, and a step may only use earlier ones"
        raise ValueError(f"{field}: {value!r}: no such file or directory ({path}){hint}")
    return str(path)


def _exists(path: Path, where: str) -> bool:
    """Whether ``path`` names a file or folder. An error stating it that does not say it
    names nothing (no permission on a folder above it, a name too long, an I/O error) is a
    ``ValueError`` naming ``where``, the path and why, not "no such file"."""
    try:
        path.stat()
    except OSError as err:
        if err.errno in MISSING:
            return False
        raise ValueError(f"{where}: cannot read {path} ({err.strerror or err})") from err
    return True


def _check_parameters(
    value: object, where: str, method: str, signature: inspect.Signature
) -> dict[str, Any]:
    if value is None:
        value = {}
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
        not isinstance(evaluate, str) or not re.fullmatch(r"[^:]+:[\w.]+", evaluate)
    ):
        raise ValueError(
            f"{where}.parameters.evaluate: expected 'package.module:function' or "
            f"'file.py:function', found {evaluate!r}"
        )
    for key, item in value.items():
        if key != "evaluate":
            _check_type(item, signature.parameters[key].annotation, f"{where}.parameters.{key}")
    required = [
        name
        for name, p in signature.parameters.items()
        if name not in RESERVED and p.default is p.empty and p.kind is not p.VAR_KEYWORD
    ]
    for name in required:
        if name not in value:
            raise ValueError(f"{where}.parameters.{name}: required by {method}")
    return dict(value)


def _check_values(method: str, parameters: Mapping[str, Any], count: int, where: str) -> None:
    """The values of a built-in method's parameters (types already checked), as the method
    itself checks them when it runs: ranges, choices, one weight or score per model, and
    ratatouille's selection rules; ``count`` is the step's number of models. An error names
    the step and key (``steps.NAME.parameters.density: ...``)."""
    from .methods import dare, ratatouille, slerp, soup, task_arithmetic, ties

    def check(key: str, rule: Callable[[Any], object]) -> None:
        if key not in parameters:
            return
        try:
            rule(parameters[key])
        except ValueError as err:  # the method's own message, "key: expected ..."
            message = str(err).removeprefix(f"{key}: ")
            raise ValueError(f"{where}.parameters.{key}: {message}") from None

    def choice(choices: Sequence[str]) -> Callable[[Any], None]:
        def rule(value: Any) -> None:
            if value not in choices:
                expected = ", ".join(repr(c) for c in choices)
                raise ValueError(f"expected one of {expected}, found {value!r}")

        return rule

    if parameters.get("chunk_bytes") is not None:  # TIES takes None: its default
        check("chunk_bytes", check_chunk_bytes)
    if method in ("task_arithmetic", "ties", "dare"):
        check("scale", task_arithmetic.check_scale)
    if method == "uniform_soup":
        check("weights", lambda value: soup.normalized_weights(value, count))
    elif method == "task_arithmetic":
        check("weights", lambda value: task_arithmetic.check_weights(value, count))
    elif method == "ties":
        check("density", ties.check_density)
        check("trim", choice(ties.TRIMS))
    elif method == "dare":
        check("density", dare.check_dare_density)
        check("combine", choice(dare.COMBINES))
        density = parameters.get(
            "density", inspect.signature(dare.dare).parameters["density"].default
        )
        check("scale", lambda value: dare.check_rescale(float(value), float(density)))
    elif method == "model_stock" and count < 2:
        raise ValueError(f"{where}.models: model_stock needs at least 2 models, found {count}")
    elif method == "slerp":
        check("t", slerp.check_t)
        if count != 2:
            raise ValueError(f"{where}.models: slerp interpolates exactly 2 models, found {count}")
    if method == "ratatouille":
        check("selection", choice(ratatouille.SELECTIONS))
        if parameters.get("selection", "uniform") == "uniform":
            for key in ("evaluate", "scores", "strict"):
                if parameters.get(key, False) is not False:
                    raise ValueError(
                        f"{where}.parameters.{key}: used only with selection = 'greedy'; "
                        f"set selection = 'greedy' or leave {key} out"
                    )
        elif "evaluate" not in parameters:
            raise ValueError(
                f"{where}.parameters.evaluate: required by ratatouille with "
                "selection = 'greedy' ('package.module:function' or 'file.py:function')"
            )
        elif parameters.get("chunk_bytes", FOLD_CHUNK_BYTES) != FOLD_CHUNK_BYTES:
            raise ValueError(  # as the method refuses it: the greedy rule folds its own size
                f"{where}.parameters.chunk_bytes: used only with selection = 'uniform' (the "
                f"greedy rule folds {FOLD_CHUNK_BYTES} bytes at a time); leave it out"
            )
    if method in ("greedy_soup", "ratatouille"):
        check("scores", lambda value: soup._checked_scores(value, count))


def _check_type(value: object, annotation: object, where: str) -> None:
    """``value`` (from TOML) against a method parameter's annotation (a string, as the
    methods' modules use postponed annotations): numbers (``NumberLike``), integers
    (``IntegerLike``), lists of numbers (``NumbersLike``), flags, text."""
    text = str(annotation)

    def number(item: object) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if value is None and "None" in text:
        return
    if "Sequence[float]" in text or "NumbersLike" in text:
        ok, kind = isinstance(value, list) and all(number(v) for v in value), "a list of numbers"
    elif text.startswith("bool"):
        ok, kind = isinstance(value, bool), "true or false"
    elif "float" in text or "NumberLike" in text:
        ok, kind = number(value), "a number"
    elif text.startswith(("int", "IntegerLike")):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif text.startswith("str"):
        ok, kind = isinstance(value, str), "a string"
    else:  # a type this check does not know: the method checks it
        return
    if not ok:
        raise ValueError(f"{where}: expected {kind}, found {value!r}")


def _folded(path: Path) -> Path:
    """``path`` as a file system that ignores case and Unicode normalization sees it (APFS
    and HFS+, macOS's defaults): ``Out.safetensors`` and ``out.safetensors`` are one file.

    Example:
        >>> _folded(Path("/m/Out.safetensors")) == _folded(Path("/m/out.safetensors"))
        True
    """
    return Path(unicodedata.normalize("NFD", str(path)).casefold())


def _check_outputs(steps: Sequence[Step], single: bool) -> None:
    """No two steps write the same place, and no step writes over an input of any step
    (paths compared resolved: ``out.safetensors`` and ``../here/out.safetensors`` are one;
    outputs also as names that ignore case, :func:`_folded`)."""

    def inputs(step: Step) -> list[str]:
        sources = [*step.models, *([step.base] if step.base is not None else [])]
        return [s for s in sources if isinstance(s, str) and not s.startswith(PREFIX)]

    # Each path resolved once (each a few system calls): S steps compare S² pairs.
    places = {id(step): resolved_output(step.output) for step in steps if step.output is not None}
    folded = {key: _folded(place) for key, place in places.items()}
    read = {id(step): [(s, Path(s).resolve()) for s in inputs(step)] for step in steps}
    for position, step in enumerate(steps):
        if step.output is None:
            continue
        where = "recipe" if single else f"steps.{step.name}"
        written = places[id(step)]
        for later, other in enumerate(steps):
            theirs = None if other is step or other.output is None else other.output
            place = None if theirs is None else places[id(other)]
            if place is not None and overlapping(folded[id(step)], folded[id(other)]):
                differ = not overlapping(written, place)
                same = " (one place where names ignore case, as on macOS)" if differ else ""
                raise ValueError(f"{where}.output: step {other.name!r} writes {theirs} too{same}")
            for source, resolved in read[id(other)]:
                if overlapping(written, resolved):
                    hint = (  # a later step reading this output by its path: by name instead
                        f"; to use this step's output, name {step.name!r} in its models"
                        if later > position
                        else ""
                    )
                    raise ValueError(
                        f"{where}.output: {step.output} would overwrite {source}, an input of "
                        f"{'the recipe' if single else f'step {other.name!r}'}; a recipe never "
                        f"writes over its inputs{hint}"
                    )


def _step(
    name: str,
    table: Mapping[str, Any],
    where: str,
    earlier: Sequence[str],
    later: Sequence[str],
    root: Path,
    written: Mapping[Path, str],
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
        _source(m, f"{where}.models[{i}]", earlier, later, root, written, name)
        for i, m in enumerate(models)
    )
    base: Input | None = None
    if "base" in signature.parameters:
        if "base" in table:
            base = _source(table["base"], f"{where}.base", earlier, later, root, written, name)
        elif signature.parameters["base"].default is inspect.Parameter.empty:
            raise ValueError(f"{where}.base: missing; {method} needs a base model")
    elif "base" in table:
        raise ValueError(f"{where}.base: {method} takes no base model")
    parameters = _check_parameters(table.get("parameters"), where, method, signature)
    _check_values(method, parameters, len(sources), where)
    output = table.get("output")
    if output is not None:
        if not isinstance(output, str) or not output:
            raise ValueError(f"{where}.output: expected a path, found {output!r}")
        try:
            check_output_name(output)
        except LadleError as err:
            raise ValueError(f"{where}.output: {err}") from None
        output = Path(os.path.expanduser(output))
        output = output if output.is_absolute() else root / output
        try:  # compared resolved with every input and output below
            resolved_output(output)
        except LadleError as err:
            raise ValueError(f"{where}.output: {err}") from None
    dtype = table.get("dtype")
    if dtype is not None:
        if not isinstance(dtype, str) or dtype.lower() not in DTYPES:
            raise ValueError(f"{where}.dtype: expected one of {', '.join(DTYPES)}, found {dtype!r}")
        dtype = DTYPES[dtype.lower()]
    shard = table.get("max_shard_size")
    if shard is not None:
        try:
            parse_size(shard)
        except (TypeError, ValueError):  # TOML gives true, 1.5 or a list as well
            raise ValueError(
                f"{where}.max_shard_size: expected e.g. '5GB', found {shard!r}"
            ) from None
        if output is None:
            raise ValueError(
                f"{where}.max_shard_size: applies to a directory output; this step has no "
                "output (it is kept in memory)"
            )
        if single_file(output):  # as the CLI refuses it
            raise ValueError(
                f"{where}.max_shard_size: applies to a directory output; {output.name} is one file"
            )
    return Step(name, method, sources, base, parameters, output, dtype, shard)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file; nothing is merged.

    Args:
        path: a TOML file: one step at the top level, or ``[steps.NAME]`` tables.

    Returns:
        A :class:`Recipe` whose inputs are resolved paths, ``hf://`` URLs or :class:`StepRef`.

    Raises:
        ValueError: the file is not valid TOML, or a field is wrong (a parameter's value
            too: one the method would refuse when it runs); the message names the step and
            field (``steps.final.parameters.scale``).

    Example:
        >>> import pathlib, tempfile, torch, ladle
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = ladle.save({"w": torch.ones(2)}, folder / "a.safetensors")
        >>> _ = (folder / "r.toml").write_text('method = "soup"\\nmodels = ["a.safetensors"]\\n'
        ...                                    'output = "out.safetensors"\\n')
        >>> [(s.name, s.method, s.output.name) for s in load_recipe(folder / "r.toml").steps]
        [('main', 'uniform_soup', 'out.safetensors')]
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike path, found {type_name(path)}")
    # Absolute: run later from another working directory, a Recipe finds its evaluate
    # files where it was loaded (its inputs and outputs are resolved here already).
    file = Path(path).absolute()
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
    names = _in_file_order(list(tables), file) if "steps" in data else list(tables)
    steps: list[Step] = []
    written: dict[Path, str] = {}  # outputs of the steps so far, resolved, to their names
    for i, name in enumerate(names):
        where = "recipe" if "steps" not in data else f"steps.{name}"
        if not _NAME.fullmatch(name):
            raise ValueError(f"{where}: step names are letters, digits, '_' and '-'")
        if not isinstance(tables[name], dict):
            raise ValueError(f"{where}: expected a table, found {type(tables[name]).__name__}")
        steps.append(_step(name, tables[name], where, names[:i], names[i + 1 :], root, written))
        if steps[-1].output is not None:
            written[resolved_output(steps[-1].output)] = name
    if steps[-1].output is None:
        where = "recipe" if "steps" not in data else f"steps.{steps[-1].name}"
        raise ValueError(f"{where}.output: missing; the last step must write its result")
    single = "steps" not in data
    _check_outputs(steps, single)
    return Recipe(file, device, tuple(steps), single)


def load_callable(reference: str, *, folder: str | os.PathLike | None = None) -> Callable[..., Any]:
    """The function ``reference`` names: ``package.module:function`` or
    ``path/to/file.py:function`` (``attr.attr`` paths too), imported.

    Relative file paths are relative to ``folder`` (default: the working directory); modules
    are searched in ``folder`` and the working directory first, as ``python -m`` would (a
    console script does not). A file's own folder is searched last while it runs, so it may
    import modules beside it but never shadows an installed one (an ``evaluate.py`` that
    imports the ``evaluate`` library gets the library). It runs once per process, registered
    in ``sys.modules`` under a name of its own (dataclasses need that), never under a name an
    import could mean.

    Raises:
        ValueError: the reference is malformed, cannot be imported (the message says why:
            the module's own exception), or names something not callable; or a module of
            that name, imported before in this process, came from another file than the one
            ``folder`` or the working directory holds now (Python would return the first).

    Example:
        >>> load_callable("math:sqrt")(16.0)
        4.0
    """
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"expected MODULE:FUNCTION, e.g. mypkg.evals:accuracy, found {reference!r}"
        )
    here = Path(folder) if folder is not None else Path.cwd()
    try:
        with _IMPORTING:  # sys.path and the files' modules are the process's
            if module_name.endswith(".py"):
                module = _import_file(here / os.path.expanduser(module_name))
            else:
                folders = [str(here), os.getcwd()]
                _check_not_imported_elsewhere(module_name, folders)
                with _searched(folders):
                    module = importlib.import_module(module_name)
    except Exception as err:  # the user's module may raise anything while importing
        raise ValueError(f"cannot import {reference!r}: {type(err).__name__}: {err}") from err
    target: Any = module
    owner = module_name  # named as the reference names it, not as sys.modules does
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except Exception as err:  # a module's __getattr__ or a property may raise anything
            why = (
                f"{owner} has no attribute {part!r}"
                if isinstance(err, AttributeError)
                else f"{type(err).__name__}: {err}"
            )
            raise ValueError(f"cannot import {reference!r}: {why}") from err
        owner += f"{'.' if owner != module_name else ':'}{part}"
    if not callable(target):
        raise ValueError(f"{reference!r} is a {type(target).__name__}, not a callable")
    return target  # type: ignore[no-any-return]


def _check_not_imported_elsewhere(name: str, folders: Sequence[str]) -> None:
    """Refuse a module ``name`` whose top package this process imported from another file
    than the one ``folders`` hold now: an import would return the first (a second recipe's
    ``evals.py`` would be scored with the first recipe's)."""
    top = name.partition(".")[0]
    imported = sys.modules.get(top)
    found = importlib.machinery.PathFinder.find_spec(top, list(folders))
    if imported is None or found is None or found.origin is None:
        return  # not imported yet, or not in these folders (an installed module, say)
    before = getattr(imported, "__file__", None)
    if before is None or Path(before).resolve() != Path(found.origin).resolve():
        raise ImportError(
            f"module {top!r} is already imported from {before}, not from {found.origin}; "
            f"name the file instead (path/to/file.py:function)"
        )


def reported(evaluate: Callable[..., Any], label: str) -> Callable[..., Any]:
    """``evaluate``, whose exceptions become one :class:`LadleError` line naming it by
    ``label`` (``--evaluate evals:score``); the user's own exception is its cause, so a
    traceback (``ladle --debug``) still shows where it came from."""

    def call(state_dict: Any) -> Any:
        try:
            return evaluate(state_dict)
        except Exception as err:
            raise LadleError(f"{label}: raised {type(err).__name__}: {err}") from err

    return call


_IMPORTING = threading.RLock()
"""Held by :func:`load_callable` while it imports. Imports in several threads at once (two
recipes run by one program) each put their folders on ``sys.path`` and took them off: one
that found a folder there already took it as staying, and its module's imports of modules
beside it failed once the other was done; one found a file's module registered but not yet
run, without the function it names."""


@contextlib.contextmanager
def _searched(folders: Sequence[str], *, last: bool = False) -> Iterator[None]:
    """``folders`` on ``sys.path`` (those not there yet) for one import: at the front, or
    with ``last`` at the end, where they never shadow an installed module."""
    added = [f for f in dict.fromkeys(folders) if f not in sys.path]
    if last:
        sys.path.extend(added)
    else:
        sys.path[:0] = added
    try:
        yield
    finally:
        for folder in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def _import_file(path: Path) -> Any:
    """The module of a ``.py`` file, run once per process: registered in ``sys.modules`` as
    ``ladle_evaluate_<stem>_<digest of its path>``, looked up there by that name afterwards."""
    if not path.is_file():
        raise ImportError(f"no such file {path}")
    resolved = path.resolve()
    digest = hashlib.blake2b(str(resolved).encode(), digest_size=6).hexdigest()
    stem = re.sub(r"\W", "_", path.stem)
    name = f"ladle_evaluate_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _searched([str(resolved.parent)], last=True):  # modules beside the file
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _named(err: Exception, where: str) -> Exception | None:
    """``err`` again, of the same type and attributes, its message prefixed with ``where``
    (``steps.NAME: ...``); ``None`` for an exception that cannot be rebuilt from a message
    (the original is raised as it is). An ``OSError`` keeps its ``errno`` but not its
    ``filename`` or ``strerror`` (both are in the message, and on the cause)."""
    # A recipe has no --allow-nonfinite: its steps take the parameter.
    said = str(err).replace(ALLOW_NONFINITE, "allow_nonfinite = true (in the step's parameters)")
    message = f"{where}: {said}"
    try:
        named = type(err)(message)
    except Exception:
        return None
    if str(named) != message:  # a KeyError quotes its message, say
        return None
    named.__dict__.update(getattr(err, "__dict__", {}))
    if isinstance(err, OSError) and isinstance(named, OSError):
        named.errno = err.errno  # the message stays as given: no strerror or filename
    return named


class _Naming:
    """Within the block, an exception is raised again named after ``where`` (:func:`_named`),
    from the original; one that cannot be rebuilt from a message is raised as it is. A
    class, not a generator: a ``StopIteration`` raised from a generator becomes a
    ``RuntimeError``."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, err: BaseException | None, traceback: object) -> None:
        if isinstance(err, Exception):
            named = _named(err, self.where)
            if named is not None:
                raise named from err


def _check_inputs_kept(
    steps: Sequence[Step], where: Callable[[Step], str]
) -> dict[str, tuple[Path, str]]:
    """No step writes over a file that any step reads, found as the merges find them: each
    input opened (a folder's weights file may link elsewhere, an ``hf://`` input is a
    snapshot in the Hub's cache), where :func:`load_recipe` compared the paths written.

    Returns each ``hf://`` input's snapshot folder and name at the commit it resolved to,
    for the steps to open (:func:`~ladle.hub.open_snapshot`): every step reads one commit
    of a repository, whatever its branch does meanwhile, with no second round of requests.
    """
    writing = []  # each output's place found once: a recipe of S steps checks S² pairs
    for step in steps:
        if step.output is not None:
            try:
                writing.append((step, Destination(step.output)))
            except LadleError as err:
                raise type(err)(f"{where(step)}.output: {err}") from None
    snapshots: dict[str, tuple[Path, str]] = {}
    seen: set[str] = set()
    for step in steps:
        for source in (*step.models, *([step.base] if step.base is not None else [])):
            if not isinstance(source, str) or source in seen:
                continue
            seen.add(source)
            # One input open at a time: a torch file that cannot be mapped is in memory. Its
            # errors name the step, as when the step runs.
            with _Naming(where(step)):
                opened = open_checkpoint(source)
            with opened:
                if source.startswith(PREFIX):
                    assert opened.path is not None  # the snapshot folder
                    snapshots[source] = (opened.path, opened.name)
                read = reads(opened)
                for writer, destination in writing:
                    try:
                        destination.check(read)
                    except LadleError as err:
                        raise type(err)(f"{where(writer)}.output: {err}") from None
    return snapshots


def run_recipe(
    recipe: str | os.PathLike | Recipe,
    *,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: Any = None,
    on_output: Callable[[str, Path], object] | None = None,
) -> dict[str, StateDict | Path]:
    """Run every step of a recipe in order; a step without ``output`` stays in memory.

    Args:
        recipe: a recipe file, or a :class:`Recipe` from :func:`load_recipe`.
        device: where the arithmetic runs; default the recipe's ``device``, else CUDA when
            available, else the CPU.
        overwrite: replace existing outputs (atomically) instead of refusing.
        progress: ``True`` for tqdm bars, or a tqdm-like class.
        on_output: called with a step's name and path as soon as its output is written
            (``ladle run`` prints them so: a later step's failure leaves them on disk).

    Returns:
        Each step's result by name: the path written, or the state dict kept in memory. A
        one-step recipe's step is named ``main``.

    Raises:
        ValueError, LadleError: as :func:`load_recipe`, and for what fails while a step runs
            (an unreadable input, models that disagree): the same type, its message prefixed
            with the step (``steps.final: ...``; ``recipe: ...`` for a one-step recipe).
            An ``evaluate`` function that raises is a ``LadleError`` naming the step and the
            function, the function's own exception its cause.

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
    if on_output is not None and not callable(on_output):  # before any step writes
        raise TypeError(f"on_output: expected a callable or None, found {type_name(on_output)}")
    if not isinstance(recipe, (str, os.PathLike, Recipe)):  # load_recipe would say "path"
        raise TypeError(
            f"recipe: expected a recipe file's path or a Recipe, found {type_name(recipe)}"
        )
    checked = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)

    def where(step: Step) -> str:
        return "recipe" if checked.single else f"steps.{step.name}"

    try:  # a bad device fails now
        resolve_device(device if device is not None else checked.device)
    except ValueError as err:
        if device is not None:
            raise
        # The recipe's own: the caller may not know it is set there, nor how to choose another.
        raise ValueError(
            f"{checked.path}: {err}; device= (--device) runs the recipe on another"
        ) from None
    for step in checked.steps:  # none is written if one cannot be
        if step.output is not None:
            try:
                check_output_free(step.output, overwrite=overwrite)
            except LadleError as err:
                raise type(err)(f"{where(step)}.output: {err}") from None
    snapshots = _check_inputs_kept(checked.steps, where)
    # Every evaluate function imported before the first step runs: a bad one leaves nothing.
    evaluators = {}
    for step in checked.steps:
        if "evaluate" in step.parameters:
            try:
                spec = step.parameters["evaluate"]
                function = load_callable(spec, folder=checked.path.resolve().parent)
            except ValueError as err:
                raise ValueError(f"{where(step)}.parameters.evaluate: {err}") from None
            evaluators[step.name] = reported(function, f"evaluate {spec}")
    results: dict[str, StateDict | Path] = {}

    def resolve(source: Input, opened: contextlib.ExitStack) -> Any:
        """An earlier step's result, an ``hf://`` input's snapshot (opened on ``opened``, at
        the commit checked) or a path."""
        if isinstance(source, StepRef):
            return results[source.step]
        return pinned(source, snapshots, opened)

    for step in checked.steps:
        function = _function(step.method)
        accepted = inspect.signature(function).parameters
        kwargs: dict[str, Any] = dict(step.parameters)
        if step.name in evaluators:
            kwargs["evaluate"] = evaluators[step.name]
        options = {
            "out": step.output,
            "device": device if device is not None else checked.device,
            "dtype": step.dtype,
            "progress": progress,
            "overwrite": overwrite,
            "max_shard_size": step.max_shard_size,
        }
        kwargs.update({k: v for k, v in options.items() if k in accepted and v is not None})
        # The step's name on the one line the CLI prints; its hf:// inputs closed after it.
        with contextlib.ExitStack() as opened, _Naming(where(step)):
            if step.base is not None:
                kwargs["base"] = resolve(step.base, opened)
            result = function([resolve(m, opened) for m in step.models], **kwargs)
        if step.output is not None:
            results[step.name] = step.output
            if on_output is not None:
                on_output(step.name, step.output)
        elif isinstance(result, (Mapping, Path)):
            results[step.name] = result  # type: ignore[assignment]
        else:  # GreedySoupResult and the like
            results[step.name] = result.state_dict
    return results
