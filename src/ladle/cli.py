"""The ``ladle`` command: parses arguments and calls the public API, nothing more.

Exit status: 0 on success, 1 on a merge error (one line on stderr; ``--debug`` for the
traceback), 2 on a usage error, 130 when interrupted (Ctrl-C) and 143 when terminated
(SIGTERM), the output being written deleted either way; 141, silently, when the reader of
its standard output goes first (``ladle inspect X | head``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO, TypeVar, cast

from ._version import __version__
from .errors import LadleError, one_line

if TYPE_CHECKING:
    import torch

    from .checkpoint import Checkpoint
    from .compare import TensorDiff

# What needs torch (the methods, checkpoints, the writer) is imported where a command runs,
# not here: parsing the command line (``ladle --help``, a usage error) takes no second.

__all__ = ["main"]


def _dtype(text: str) -> torch.dtype:
    from .recipe import DTYPES

    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(DTYPES)}, found {text!r}"
        ) from None


_N = TypeVar("_N", int, float)


def _repo_id(text: str) -> str:
    """A Hub repo id, checked as the Hub checks it, before any merging."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as err:
        raise argparse.ArgumentTypeError(one_line(err)) from None
    return text


def _later(module: str, name: str) -> Callable[..., Any]:
    """``ladle.<module>.<name>``, imported when first called (building the parser imports
    no torch)."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(f".{module}", __package__), name)(*args)

    return call


def _checked(kind: Callable[[str], _N], check: Callable[[_N], _N]) -> Callable[[str], _N]:
    """An argparse type: a number of ``kind`` (``int`` or ``float``) that ``check`` (the API's
    own check of the parameter) takes, so that a bad ``--density``, ``--scale`` or ``--seed``
    is a usage error with the API's message, found before any merging."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> _N:
        try:
            value = kind(text)
        except ValueError:
            digits, limit = re.sub(r"[\s+\-_]", "", text), sys.get_int_max_str_digits()
            if kind is int and digits.isdecimal() and len(digits) > limit:  # Python's limit
                raise argparse.ArgumentTypeError(
                    f"expected an integer of at most {limit} digits, found {len(digits)}"
                ) from None
            shown = repr(text) if len(text) <= 80 else f"{text[:40]!r}... ({len(text)} characters)"
            raise argparse.ArgumentTypeError(f"expected {noun}, found {shown}") from None
        try:
            return check(value)
        except ValueError as err:  # "density: expected ...": argparse names the option
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

    return parse


def _demo_seed(seed: int) -> int:
    from .demo import check_demo_seed  # the demo module loads when its command runs

    return check_demo_seed(seed)


def _size(text: str) -> int:
    from .writer import parse_size

    try:
        return parse_size(text)
    except ValueError as err:  # "max_shard_size: expected ...": argparse names the option
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None


class _Parser(argparse.ArgumentParser):
    """argparse's parser, reading ``-1e-3``, ``-inf`` and ``-5GB`` as the values they are:
    argparse before Python 3.13 knows only ``-1`` and ``-0.5``, and took the others for
    options (``--weights 1 -1e-3``: "unrecognized arguments"; ``--max-shard-size -5GB``:
    "expected one argument")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:[a-z]+)?$|^-inf(?:inity)?$",
            re.IGNORECASE,
        )

    def print_usage(self, file: Any = None) -> None:
        """As argparse, but nowhere where standard error is closed (``2>&-``): argparse's
        ``error`` prints usage to ``sys.stderr``, and to standard output where that is
        ``None``, among what the command prints."""
        if file is None and sys.stderr is None:
            return
        super().print_usage(file)

    def _print_message(self, message: str, file: Any = None) -> None:
        """As argparse prints ``--help``, ``--version`` and usage, but a failure to write
        standard output raised, named as its (argparse ignores it: exit status 0, nothing
        printed). Where standard error is closed (``2>&-``: ``None``) or fails, nothing, as
        argparse does from Python 3.11 (3.10's raised ``AttributeError``: a usage error
        exited with status 1 instead of 2)."""
        if not message:
            return
        if file is sys.stdout:
            _STDOUT.write(message)
            return
        with contextlib.suppress(AttributeError, OSError):
            (file or sys.stderr).write(message)


def merge_options() -> _Parser:
    """Options every merge sub-command shares."""
    parent = _Parser(add_help=False)
    parent.add_argument(
        "-o",
        "--out",
        required=True,
        help="output: a .safetensors file, or a directory (sharded, HF style)",
    )
    parent.add_argument(
        "--device",
        default=None,
        help="where the arithmetic runs (default: cuda if available, else cpu)",
    )
    parent.add_argument(
        "--dtype",
        type=_dtype,
        default=None,
        metavar="DTYPE",
        help="output dtype of floating tensors: float32 (fp32), bfloat16 (bf16), float16 (fp16) "
        "or float64 (fp64) (default: the base's, else the first model's; for greedy-soup, the "
        "best-ranked model's)",
    )
    parent.add_argument(
        "--max-shard-size",
        type=_size,
        default=None,
        metavar="SIZE",
        # writer.DEFAULT_MAX_SHARD_SIZE, which a test compares (the writer imports torch)
        help="largest shard of a directory output: 500MB, 2GiB, ... (default: 5GB)",
    )
    parent.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output at -o (a .safetensors file, or a directory holding "
        "safetensors weights; anything else is refused)",
    )
    parent.add_argument(
        "--push-to-hub",
        metavar="OWNER/REPO",
        type=_repo_id,
        default=None,
        help="after merging, upload the output directory to this Hub model repo",
    )
    parent.add_argument("--no-progress", action="store_true", help="no progress bar")
    parent.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="merge inputs holding NaN or Inf, and write merged values that overflow the "
        "output dtype, instead of stopping with an error",
    )
    return parent


def merge_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for a merge function from the shared options."""
    from .writer import DEFAULT_MAX_SHARD_SIZE

    return {
        "out": args.out,
        "device": args.device,
        "dtype": args.dtype,
        "max_shard_size": (
            DEFAULT_MAX_SHARD_SIZE if args.max_shard_size is None else args.max_shard_size
        ),
        "overwrite": args.overwrite,
        "progress": _progress(args),
        "allow_nonfinite": args.allow_nonfinite,
    }


def _rank() -> int:
    """This process's rank among those ``torchrun`` launched (its ``RANK``); -1 for a value
    that is none."""
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isascii() and rank.isdigit() else -1  # not "²"


def _flush_stdout() -> None:
    """Standard output flushed; closed (``>&-``: ``sys.stdout`` is ``None``, and ``print``
    writes nothing) there is nothing to flush."""
    if sys.stdout is not None:
        with _on_stdout():
            sys.stdout.flush()


@contextlib.contextmanager
def _on_stdout() -> Iterator[None]:
    """Inside, a failure to write standard output (a full disk, ``>/dev/full``) is named as
    standard output's: a merge's own output is written by then, and "No space left on
    device" alone read as the merge's failure. What is buffered is dropped, since it can never
    be written (the interpreter's flush at exit failed again: status 120, and a traceback). A
    closed pipe stays itself (exit 141)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as err:
        _discard_stdout()
        raise OSError(err.errno, f"writing to standard output: {err.strerror or err}") from err


class _Stdout:
    """What ``print`` needs of standard output (``sys.stdout`` as it is at each call), a
    failure named as standard output's (:func:`_on_stdout`); closed (``>&-``), nowhere."""

    def write(self, text: str) -> int:
        if sys.stdout is None:
            return len(text)
        with _on_stdout():
            return sys.stdout.write(text)

    def flush(self) -> None:
        _flush_stdout()


_STDOUT = _Stdout()


def _print(*values: object, flush: bool = False) -> None:
    """``print`` to standard output, a failure to write it named as such (a merge's output,
    whose path is printed, is complete by then)."""
    print(*values, file=_STDOUT, flush=flush)


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars: unless ``--no-progress``, where standard error is a terminal (closed,
    ``2>&-``, ``sys.stderr`` is ``None``)."""
    quiet = getattr(args, "no_progress", False)  # inspect and diff show bars of downloads alone
    return not quiet and sys.stderr is not None and sys.stderr.isatty()


def _stderr(line: str) -> None:
    """``line`` on standard error; closed (``2>&-``), nowhere: ``print`` to ``None`` writes
    to standard output, among what the command prints."""
    if sys.stderr is not None:
        print(line, file=sys.stderr)


def _world_size() -> int:
    """The number of processes ``torchrun`` launched together (its ``WORLD_SIZE``), else 1."""
    size = os.environ.get("WORLD_SIZE", "1")
    return int(size) if size.isascii() and size.isdigit() else 1  # not "²"


def _merge(method: Callable[..., Any], models: Sequence[str], **kwargs: Any) -> Any:
    """Call a merge method; under torchrun, split across the processes (ladle.distributed)."""
    if _world_size() > 1:
        from .distributed import merge

        return merge(method, models, **kwargs)
    return method(models, **kwargs)


def _run_method(args: argparse.Namespace) -> None:
    """A merge sub-command: its method with the parameters it declared, plus the shared ones."""
    params = {name: getattr(args, name) for name in args.params}
    method = getattr(importlib.import_module(__package__), args.method)  # ladle.ties, ...
    _print(_merge(method, args.models, **params, **merge_kwargs(args)))


def _callable(spec: str) -> Callable[..., Any]:
    """``pkg.module:function`` (or ``path/to/file.py:function``), imported; its exceptions
    become one ``LadleError`` line naming ``--evaluate SPEC``; else a usage error."""
    from .recipe import load_callable, reported

    try:
        return reported(load_callable(spec), f"--evaluate {spec}")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _run_greedy_soup(args: argparse.Namespace) -> None:
    from .methods.soup import greedy_soup

    result = greedy_soup(
        args.models, args.evaluate, scores=args.scores, strict=args.strict, **merge_kwargs(args)
    )
    width = max(len(str(len(args.models) - 1)), len("model"))
    # Each row scores the soup with that model added (the first: the best model alone).
    _print(f"{'model':<{width}}  {'soup score':>10}  kept  source")
    for step in result.history:
        kept = "yes" if step.accepted else "no"
        score = _number(step.score)
        _print(f"{step.index:<{width}}  {score:>10}  {kept:<4}  {args.models[step.index]}")
    _print(
        f"selected {len(result.selected)} of {len(args.models)} "
        f"{_plural(len(args.models), 'model')} "
        f"({', '.join(map(str, result.selected))}); score {_number(result.score)}"
    )
    _print(Path(args.out))  # as the other merge commands print their method's return


def _run_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    stdout = cast(TextIO, _STDOUT)  # the table printed; a failure named as stdout's
    run_demo(
        seed=args.seed, size=args.size, workdir=args.workdir, device=args.device, stream=stdout
    )


def _plural(count: int, noun: str) -> str:
    """``noun`` as it follows the number ``count``: "tensor" for 1, else "tensors"."""
    return noun if count == 1 else f"{noun}s"


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _shards(ckpt: Checkpoint, keys: Sequence[str]) -> list[dict[str, Any]]:
    """The files of a checkpoint in order of first use: name, tensors, bytes."""
    files = ckpt.files()
    shards: dict[str, dict[str, Any]] = {}
    for key in keys:
        if key in files:
            shard = shards.setdefault(
                str(files[key]), {"file": files[key].name, "tensors": 0, "bytes": 0}
            )
            shard["tensors"] += 1
            shard["bytes"] += ckpt.nbytes(key)
    return list(shards.values())


def _printable(key: str) -> str:
    """``key`` as it is, or escaped as ``repr`` does where it holds what would break a line of
    the table or the output's encoding (a line break, a control character, a lone surrogate
    from a torch file).

    Example:
        >>> _printable("model.layer.0.weight"), _printable("a\\nb"), _printable("c\\udce9")
        ('model.layer.0.weight', "'a\\\\nb'", "'c\\\\udce9'")
    """
    return key if key.isprintable() else repr(key)


def _printable_value(value: str) -> str:
    """A metadata ``value`` as it is, or where it holds what would break the line (a line
    break, a control character, a lone surrogate) as a JSON string whose unprintable
    characters are all escaped (JSON escapes those below U+0020 alone: NEL, U+2028 and a C1
    control such as the terminal's CSI went out raw).

    Example:
        >>> print(_printable_value("pt"), _printable_value("a\\nb\\x85c\\u2028d"))
        pt "a\\nb\\u0085c\\u2028d"
    """
    if value.isprintable():
        return value
    dumped = json.dumps(value, ensure_ascii=False)
    return "".join(c if c.isprintable() or ord(c) > 0xFFFF else f"\\u{ord(c):04x}" for c in dumped)


def _run_inspect(args: argparse.Namespace) -> None:
    from .checkpoint import declared_quantization, is_adapter, open_checkpoint, stored_quantization

    with open_checkpoint(args.checkpoint) as ckpt:
        keys = ckpt.keys()
        rows = [(key, ckpt.shape(key), ckpt.dtype(key), ckpt.nbytes(key)) for key in keys]
        tied = ckpt.aliases()  # tied weights: one tensor under several names, counted once
        own = [row for row in rows if row[0] not in tied]
        params = sum(nbytes // dtype.itemsize for _, _, dtype, nbytes in own)
        total = sum(nbytes for *_, nbytes in own)
        shards = _shards(ckpt, [key for key in keys if key not in tied])
        found = _Inventory(
            rows,
            tied,
            params,
            total,
            shards,
            declared_quantization(ckpt),
            stored_quantization(ckpt),
            is_adapter(ckpt),
        )
        (_inspect_json if args.json else _inspect_table)(ckpt, found)


class _Inventory(NamedTuple):
    """What ``ladle inspect`` reports of a checkpoint: its tensors (key, shape, dtype,
    bytes), tied names, parameters and bytes (a tied tensor counted once), its files, and
    what a merge would refuse (a declared quantization, quantized tensors, a PEFT adapter)."""

    rows: list[tuple[str, tuple[int, ...], torch.dtype, int]]
    tied: dict[str, str]
    params: int
    total: int
    shards: list[dict[str, Any]]
    quantization: str | None
    stored_quantization: str | None
    adapter: bool


def _inspect_json(ckpt: Checkpoint, found: _Inventory) -> None:
    files = {key: path.name for key, path in ckpt.files().items()}
    _print(
        json.dumps(
            {
                "source": ckpt.name,
                "tensors": [
                    {
                        "key": k,
                        "shape": list(s),
                        "dtype": str(d).removeprefix("torch."),
                        "bytes": n,
                        "file": files.get(k),
                        "tied_to": found.tied.get(k),
                    }
                    for k, s, d, n in found.rows
                ],
                "parameters": found.params,
                "bytes": found.total,
                "path": None if ckpt.path is None else str(ckpt.path),
                "shards": found.shards,
                # sorted: safetensors hands the header's metadata out in a random order
                "metadata": dict(sorted(ckpt.metadata.items())),
                "quantization": found.quantization,
                "stored_quantization": found.stored_quantization,
                "adapter": found.adapter,
            },
            indent=2,
        )
    )


def _inspect_table(ckpt: Checkpoint, found: _Inventory) -> None:
    rows, tied, params, total = found.rows, found.tied, found.params, found.total
    printed = [_printable(key) for key, *_ in rows]
    width = max((len(k) for k in printed), default=3)
    dtypes = [str(dtype).removeprefix("torch.") for _, _, dtype, _ in rows]
    shapes = ["x".join(map(str, shape)) or "scalar" for _, shape, _, _ in rows]
    dtype_width = max([9, *map(len, dtypes)])  # float8_e4m3fn, 2x3x224x224x16: aligned too
    dims_width = max([16, *map(len, shapes)])
    for key, (name, *_, nbytes), dtype, dims in zip(printed, rows, dtypes, shapes):
        size = _format_bytes(nbytes)
        line = f"{key:<{width}}  {dtype:<{dtype_width}} {dims:<{dims_width}} {size}"
        original = tied.get(name)
        _print(line if original is None else f"{line}  (tied to {_printable(original)})")
    shared = f" ({len(tied)} tied to another)" if tied else ""
    _print(
        f"{len(rows)} {_plural(len(rows), 'tensor')}{shared}, "
        f"{params:,} {_plural(params, 'parameter')}, "
        f"{_format_bytes(total)} ({ckpt.name})"
    )
    if ckpt.path is not None and ckpt.path not in (Path(ckpt.name), Path(ckpt.name).parent):
        # e.g. the snapshot in the HF cache of an hf:// source; not the folder of a model
        # folder holding one weights file, which its name (folder/file) shows already
        _print(f"path {ckpt.path}")
    for shard in found.shards if len(found.shards) > 1 else []:
        count = shard["tensors"]
        _print(
            f"shard {shard['file']}: {count} {_plural(count, 'tensor')}, "
            f"{_format_bytes(shard['bytes'])}"
        )
    for name, value in sorted(ckpt.metadata.items()):
        # A name or value from a downloaded file could hold line breaks: one line each.
        _print(f"metadata {_printable(name)}: {_printable_value(value)}")
    if found.quantization is not None:  # what a merge would refuse, and why (docs/sources.md)
        _print(f"quantized ({found.quantization!r}): merges refuse it; dequantize it first")
    elif found.stored_quantization is not None:
        _print(f"quantized: {found.stored_quantization}: merges refuse it; dequantize it first")
    if found.adapter:
        _print("a PEFT adapter: merges refuse it; merge it into its base model first")


def _number(value: float) -> str:
    """``value`` in 6 significant digits; ``nan``, and ``0`` for -0.0 (never ``-0``)."""
    return "nan" if math.isnan(value) else f"{value + 0.0:.6g}"  # -0.0 + 0.0 is 0.0


def _run_diff(args: argparse.Namespace) -> None:
    from .compare import diff

    report = diff(
        args.a,
        args.b,
        base=args.base,
        device="cpu" if args.device is None else args.device,  # "" is refused, as by merges
        allow_nonfinite=args.allow_nonfinite,
    )
    if args.json:
        from .engine import json_ready

        def fields(row: TensorDiff) -> dict[str, Any]:
            return json_ready(row._asdict())  # JSON has no NaN or Infinity: null

        _print(
            json.dumps(
                {
                    "a": args.a,
                    "b": args.b,
                    "base": args.base,
                    "tensors": [fields(row) for row in report.tensors],
                    "total": {k: v for k, v in fields(report.total).items() if k != "key"},
                    "skipped": report.skipped,
                },
                indent=2,
            )
        )
        return
    a, b = ("|A-base|", "|B-base|") if args.base is not None else ("|A|", "|B|")
    printed = [_printable(row.key) for row in report.tensors]
    width = max([len(key) for key in printed] + [3])
    _print(f"{'key':<{width}}  {a:>12}  {b:>12}  {'|A-B|':>12}  {'cosine':>9}")
    for key, row in zip(printed, report.tensors):
        _print(
            f"{key:<{width}}  {_number(row.norm_a):>12}  {_number(row.norm_b):>12}  "
            f"{_number(row.norm_diff):>12}  {_number(row.cosine):>9}"
        )
    total = report.total
    same = sum(row.norm_diff == 0 for row in report.tensors)
    what = "task vectors" if args.base is not None else "models"
    _print(
        f"{len(report.tensors)} {_plural(len(report.tensors), 'tensor')}: "
        f"{a} {_number(total.norm_a)}, {b} "
        f"{_number(total.norm_b)}, |A-B| {_number(total.norm_diff)}, cosine of the {what} "
        f"{_number(total.cosine)}; {same} identical"
        + (f"; {len(report.skipped)} integer or bool skipped" if report.skipped else "")
    )


def _run_recipe(args: argparse.Namespace) -> None:
    from .recipe import run_recipe

    # Each output as it is written: a later step's failure leaves the earlier ones on disk.
    run_recipe(
        args.recipe,
        device=args.device,
        overwrite=args.overwrite,
        progress=_progress(args),
        on_output=lambda name, path: _print(f"{name}: {path}", flush=True),
    )


_SOURCE = "a file, a directory or hf://OWNER/REPO[@REVISION][/SUBFOLDER]"
_SOURCES = "files, directories or hf://OWNER/REPO[@REVISION][/SUBFOLDER]"
_FINETUNED = f"fine-tuned checkpoints: {_SOURCES}"


_SCALE = _checked(float, _later("methods.task_arithmetic", "check_scale"))


def _merge_command(
    commands: Any,
    name: str,
    help: str,
    method: str,
    params: tuple[str, ...],
    *,
    models_help: str = _FINETUNED,
    base: bool = True,
) -> argparse.ArgumentParser:
    """A merge sub-command: the shared options, the models, ``--base`` where the method takes
    one; it runs ``method`` (its name in ``ladle``) with ``params`` (:func:`_run_method`)."""
    command = commands.add_parser(name, parents=[merge_options()], help=help)
    command.add_argument("models", nargs="+", metavar="MODEL", help=models_help)
    if base:
        command.add_argument("--base", required=True, help="the model they were tuned from")
    command.set_defaults(run=_run_method, method=method, params=params)
    return command


def _add_soup(commands: Any) -> None:
    """``ladle soup``: the uniform or weighted soup of the models."""
    soup = _merge_command(
        commands,
        "soup",
        "uniform or weighted mean of models",
        "uniform_soup",
        ("weights",),
        models_help=f"checkpoints: {_SOURCES}",
        base=False,
    )
    soup.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        help="one weight per model (normalised to sum to 1)",
    )


def _add_task_arithmetic(commands: Any) -> None:
    """``ladle task-arithmetic``: base + scale·Σ wᵢ·τᵢ."""
    arithmetic = _merge_command(
        commands,
        "task-arithmetic",
        "task arithmetic: base + scale·Σ wᵢ·(modelᵢ − base)",
        "task_arithmetic",
        ("base", "scale", "weights"),
    )
    arithmetic.add_argument("--scale", type=_SCALE, default=1.0, help="λ (default: 1.0)")
    arithmetic.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        help="one weight per task vector, used as given (default: 1 each; negative negates)",
    )


def _add_ties(commands: Any) -> None:
    """``ladle ties``: TIES-Merging."""
    ties_parser = _merge_command(
        commands,
        "ties",
        "TIES-Merging: trim, elect signs, disjoint mean",
        "ties",
        ("base", "density", "scale", "trim"),
    )
    ties_parser.add_argument(
        "--density",
        type=_checked(float, _later("methods.ties", "check_density")),
        default=0.2,
        help="fraction of entries kept, in (0, 1] (default: 0.2)",
    )
    ties_parser.add_argument("--scale", type=_SCALE, default=1.0, help="λ (default: 1.0)")
    ties_parser.add_argument(
        "--trim",
        choices=["global", "tensor"],
        default="global",
        help="rank magnitudes over the whole model (paper) or per tensor (default: global)",
    )


def _add_dare(commands: Any) -> None:
    """``ladle dare``: DARE, combined by sum or TIES."""
    dare_parser = _merge_command(
        commands,
        "dare",
        "DARE: drop and rescale task-vector entries, then sum or TIES-combine",
        "dare",
        ("base", "density", "scale", "seed", "combine"),
    )
    dare_parser.add_argument(
        "--density",
        type=_checked(float, _later("methods.dare", "check_dare_density")),
        default=0.1,
        help="probability of keeping an entry, in [2**-24, 1] (default: 0.1)",
    )
    dare_parser.add_argument("--scale", type=_SCALE, default=1.0, help="λ (default: 1.0)")
    dare_parser.add_argument(
        "--seed",
        type=_checked(int, _later("methods.dare", "check_seed")),
        default=0,
        help="seed of the masks, any integer (default: 0)",
    )
    dare_parser.add_argument(
        "--combine", choices=["sum", "ties"], default="sum", help="how to combine (default: sum)"
    )


def _add_stock(commands: Any) -> None:
    """``ladle stock``: Model Stock."""
    _merge_command(
        commands,
        "stock",
        "Model Stock: per tensor, t·mean + (1 − t)·base, t from the task vectors' angle",
        "model_stock",
        ("base",),
        models_help=f"two or more {_FINETUNED}",
    )


def _add_slerp(commands: Any) -> None:
    """``ladle slerp``: spherical interpolation of two models."""
    command = _merge_command(
        commands,
        "slerp",
        "SLERP: per tensor, along the great circle from model A (t = 0) to B (t = 1)",
        "slerp",
        ("t",),
        models_help=f"two checkpoints, A and B: {_SOURCES}",
        base=False,
    )
    command.add_argument(
        "--t",
        type=_checked(float, _later("methods.slerp", "check_t")),
        default=0.5,
        help="where to stop: 0 is A, 1 is B; outside [0, 1] extrapolates (default: 0.5)",
    )


def _add_greedy_soup(commands: Any) -> None:
    """``ladle greedy-soup``: models added best first while a score holds."""
    greedy = commands.add_parser(
        "greedy-soup",
        parents=[merge_options()],
        help="greedy soup: add models best first while a held-out score does not drop",
    )
    greedy.add_argument("models", nargs="+", metavar="MODEL", help=f"checkpoints: {_SOURCES}")
    greedy.add_argument(
        "--evaluate",
        type=_callable,
        required=True,
        metavar="MODULE:FUNCTION",
        help="evaluate(state_dict) -> float, higher is better: MODULE:FUNCTION, or "
        "path/to/file.py:FUNCTION",
    )
    greedy.add_argument(
        "--scores",
        type=float,
        nargs="+",
        default=None,
        help="the models' own scores (default: evaluate each model once)",
    )
    greedy.add_argument(
        "--strict", action="store_true", help="keep a model only if the score improves"
    )
    greedy.set_defaults(run=_run_greedy_soup)


def _add_demo(commands: Any) -> None:
    """``ladle demo``: the end-to-end demo (:mod:`ladle.demo`)."""
    demo = commands.add_parser(
        "demo", help="an end-to-end demo on a synthetic problem (a few seconds on a laptop CPU)"
    )
    demo.add_argument(
        "--seed",
        type=_checked(int, _demo_seed),
        default=0,
        help="seed of the problem and training, in [0, 2**63) (default: 0)",
    )
    demo.add_argument(
        "--size",
        choices=["small", "default"],
        default="default",
        help="small: a quick check (default: default)",
    )
    demo.add_argument(
        "--workdir",
        default=None,
        help="keep the checkpoints and merges here, replacing files of the names the demo "
        "writes (default: a temporary directory, deleted afterwards)",
    )
    demo.add_argument(
        "--device", default="cpu", help="where training and merging run (default: cpu)"
    )
    demo.set_defaults(run=_run_demo)


_DOWNLOAD_BARS = "no progress bar of downloads (hf:// sources)"


def _add_inspect(commands: Any) -> None:
    """``ladle inspect``: a checkpoint's keys, shapes, dtypes and size."""
    inspect = commands.add_parser("inspect", help="keys, shapes, dtypes and size of a checkpoint")
    inspect.add_argument("checkpoint", metavar="CKPT", help=f"a checkpoint: {_SOURCE}")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--no-progress", action="store_true", help=_DOWNLOAD_BARS)
    inspect.set_defaults(run=_run_inspect)


def _add_diff(commands: Any) -> None:
    """``ladle diff``: per-tensor norms and cosines of two models' difference."""
    compare = commands.add_parser(
        "diff", help="per-tensor norms of A - B (or of task vectors) and their cosine"
    )
    compare.add_argument("a", metavar="A", help=f"a checkpoint: {_SOURCE}")
    compare.add_argument("b", metavar="B", help="another, of the same keys and shapes")
    compare.add_argument("--base", default=None, help="compare the task vectors A - BASE, B - BASE")
    compare.add_argument("--device", default=None, help="where the sums run (default: cpu)")
    compare.add_argument("--json", action="store_true", help="machine-readable output")
    compare.add_argument("--no-progress", action="store_true", help=_DOWNLOAD_BARS)
    compare.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="compare models holding NaN or Inf instead of stopping with an error",
    )
    compare.set_defaults(run=_run_diff)


def _add_run(commands: Any) -> None:
    """``ladle run``: a TOML recipe's merge steps."""
    recipe = commands.add_parser("run", help="run the merge steps of a TOML recipe")
    recipe.add_argument("recipe", metavar="RECIPE.toml", help="the recipe (docs/recipes.md)")
    recipe.add_argument("--device", default=None, help="overrides the recipe's device")
    recipe.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    recipe.add_argument("--no-progress", action="store_true", help="no progress bar")
    recipe.set_defaults(run=_run_recipe)


_COMMANDS = (
    _add_soup,
    _add_task_arithmetic,
    _add_ties,
    _add_dare,
    _add_stock,
    _add_slerp,
    _add_greedy_soup,
    _add_demo,
    _add_inspect,
    _add_diff,
    _add_run,
)
"""Each adds its sub-command to ``ladle``'s, in this order."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``ladle``'s command line: its options and sub-commands.

    Example:
        >>> build_parser().parse_args(["soup", "a.pt", "b.pt", "-o", "out.safetensors"]).models
        ['a.pt', 'b.pt']
    """
    parser = _Parser(  # its sub-commands' parsers are of its class
        prog="ladle", description="Merge neural-network weights (model soups and more)."
    )
    parser.add_argument("--version", action="version", version=f"ladle {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:  # in the order --help lists them
        add(commands)
    for command in commands.choices.values():  # its usage errors found after parsing
        command.set_defaults(command_parser=command)
    return parser


_SPLIT_RUNS = (_run_method,)
"""Commands that torchrun splits across processes (ladle.distributed.merge)."""


@contextlib.contextmanager
def _torchrun(run: Callable[[argparse.Namespace], None], rank: int) -> Iterator[None]:
    """Under torchrun, a merge command runs in a process group (NCCL with CUDA, else gloo)
    and only rank 0 prints."""
    if _world_size() == 1 or run not in _SPLIT_RUNS:
        yield
        return
    from .distributed import _torchrun_group

    with _torchrun_group(), contextlib.ExitStack() as stack:
        if rank != 0:
            devnull = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(devnull))
        yield


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler's preemption), raised in the main thread
    like Ctrl-C, so that the same clean-up runs (see :func:`_terminate_like_interrupt`)."""


@contextlib.contextmanager
def _terminate_like_interrupt() -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`_Terminated` instead of killing the
    process outright (which left the reserved temporary output behind).

    Only where SIGTERM would kill the process anyway: not where it is ignored or handled
    already (a program calling :func:`main` with a handler of its own), not from a thread
    (handlers belong to the main thread), and not under torchrun, where a rank waiting for
    a dead peer inside a collective runs no Python handler, so torchrun's SIGTERM must kill
    it as it did (else torchrun waits 30 s and sends SIGKILL).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        or _world_size() > 1
    ):
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM, where Python handles them (a ``KeyboardInterrupt``, or
    :func:`_terminate_like_interrupt`'s), noted inside the block and acted on at its end.

    For the import of torch: torch's C code swallows a ``KeyboardInterrupt`` raised while it
    imports numpy (Ctrl-C a second into ``ladle soup`` was lost, and the merge ran to its
    end, status 0), and a signal elsewhere in it made a traceback or an abort (SIGABRT).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    handlers: dict[int, Callable[[int, Any], Any]] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            handlers[signum] = handler
            signal.signal(signum, lambda number, frame: noted.append(number))
    try:
        yield
    finally:
        for number, held in handlers.items():
            signal.signal(number, held)
    if noted:
        handlers[noted[0]](noted[0], None)  # raises what the signal would have


def _show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    """Warnings as one ``ladle: warning:`` line, like errors (no source line), on a line of
    its own where a progress bar is drawn (Model Stock warns in its "preparing" pass: the
    warning was printed at the end of the bar's line, and a stale bar left above)."""
    if sys.stderr is None:
        return
    from tqdm import tqdm

    tqdm.write(f"ladle: warning: {one_line(message)}", file=sys.stderr)  # clears the bars first


def _discard_stdout() -> None:
    """Point standard output at ``/dev/null`` once its pipe has closed, so that what is
    still buffered does not fail again when the interpreter flushes it at exit."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without one
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)


def _checked_usage(
    args: argparse.Namespace, command: argparse.ArgumentParser, run: Callable[..., None]
) -> int:
    """This process's rank (0 unless under torchrun), once the usage errors that parsing
    cannot find are refused through ``command`` (exit status 2, its usage shown): options
    for a directory output given a file, ``--push-to-hub`` offline, a file output of a
    merge split across processes, a bad ``RANK``."""
    from .writer import single_file

    _check_counts(args, command)
    push = getattr(args, "push_to_hub", None)
    if getattr(args, "out", None) == "-":  # else a directory named '-' in the working one
        command.error(
            "-o -: ladle writes files, not standard output; name a .safetensors file or a "
            "directory (./- for a directory named '-')"
        )
    if getattr(args, "out", None) == "":  # an unset "$OUT": the library's "out: ..." named no -o
        command.error("-o '': expected a path to write, found an empty one")
    file = single_file(args.out) if getattr(args, "out", None) is not None else False
    if push is not None and file:
        command.error("--push-to-hub needs a directory output (-o DIR), not a .safetensors file")
    shard = getattr(args, "max_shard_size", None)
    if shard is not None and file:
        command.error(
            "--max-shard-size applies to a directory output (-o DIR); a .safetensors output "
            "is one file"
        )
    if push is not None:
        from .hub import _offline, _offline_variable

        if _offline():  # known now: refused before the merge, not after it
            command.error(f"--push-to-hub needs the Hub, but {_offline_variable()} is set")
    if _world_size() > 1 and run in _SPLIT_RUNS and file:
        # Every rank refuses it now: found in the merge, the first rank to fail could end
        # the others (torchrun stops them) before any printed why.
        command.error(
            "a merge split across processes (torchrun) writes a directory of shards: "
            "-o DIR, not a .safetensors file"
        )
    rank = _rank() if _world_size() > 1 else 0
    if rank < 0:
        command.error(f"RANK={os.environ.get('RANK')!r}: expected the process's rank (0, 1, ...)")
    return rank


def _check_counts(args: argparse.Namespace, command: argparse.ArgumentParser) -> None:
    """Usage errors (exit status 2) that the command line shows alone: a number of models
    the method does not take (``stock``: two or more, ``slerp``: two), ``--weights`` or
    ``--scores`` that are not one per model, or weights a soup cannot normalise."""
    models = getattr(args, "models", None)
    if models is None:
        return
    count, method = len(models), getattr(args, "method", None)
    if method == "model_stock" and count < 2:
        command.error(f"Model Stock needs at least 2 models, found {count}")
    if method == "slerp" and count != 2:
        command.error(f"slerp interpolates exactly 2 models, found {count}")
    try:
        weights = getattr(args, "weights", None)
        if weights is not None:
            if method == "uniform_soup":
                from .methods.soup import normalized_weights

                normalized_weights(weights, count)
            else:
                from .methods.task_arithmetic import check_weights

                check_weights(weights, count)
        scores = getattr(args, "scores", None)
        if scores is not None:
            from .methods.soup import _checked_scores

            _checked_scores(scores, count)
    except ValueError as err:  # "weights: expected 3 weights (one per model), found 2"
        command.error(f"--{err}")


def _parsed(argv: Sequence[str] | None) -> argparse.Namespace:
    """``argv`` parsed; after ``--help`` or ``--version`` (``SystemExit(0)``) standard output
    is flushed, so that a failure to write it shows."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as done:
        if done.code == 0:
            _flush_stdout()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ladle`` command; returns the exit status.

    Args:
        argv: the arguments after ``ladle`` (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 after a merge error (one ``ladle: error:`` line on stderr), 130 or
        143 when interrupted or terminated, 141 when standard output's reader has gone;
        usage errors exit with status 2 (``SystemExit``).

    Example:
        >>> import tempfile, torch, ladle
        >>> path = ladle.save({"w": torch.ones(2, 3)}, tempfile.mkdtemp() + "/m.safetensors")
        >>> main(["inspect", str(path)])  # doctest: +ELLIPSIS
        w  float32   2x3              24 B
        1 tensor, 6 parameters, 24 B (.../m.safetensors)
        metadata format: pt
        0
    """
    # What the terminal's encoding lacks is escaped: a key's name, and --help's λ and Σ (an
    # ASCII locale without Python's UTF-8 mode raised UnicodeEncodeError there).
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        # --evaluate imports the user's module while parsing: it may take a while (torch,
        # datasets), and Ctrl-C or SIGTERM then is what it is later, not a traceback.
        with _terminate_like_interrupt():
            args = _parsed(argv)
            with _signals_held():  # torch is imported here, the longest part of start-up
                from .hub import progress_bars_off

            run: Callable[[argparse.Namespace], None] = args.run
            command: argparse.ArgumentParser = args.command_parser  # usage errors: its usage
            rank = _checked_usage(args, command, run)
    except BrokenPipeError:  # `ladle --help | head -1`
        _discard_stdout()
        return 141
    except OSError as err:  # --help or --version, and standard output cannot be written
        if "--debug" in (sys.argv[1:] if argv is None else argv):  # or torch's import failed
            raise
        _stderr(f"ladle: error: {one_line(err)}")
        return 1
    except KeyboardInterrupt as err:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        terminated = isinstance(err, _Terminated)
        _stderr(f"ladle: {'terminated' if terminated else 'interrupted'}")
        return 143 if terminated else 130
    push = getattr(args, "push_to_hub", None)
    if rank != 0 and run not in _SPLIT_RUNS:
        return 0  # under torchrun, commands that do not split run on rank 0 alone
    try:
        with _terminate_like_interrupt(), warnings.catch_warnings():
            if not args.debug:
                warnings.showwarning = _show_warning
            # huggingface_hub's bars (downloads, uploads) follow ladle's: rank 0's, if any
            quiet = rank != 0 or not _progress(args)
            with progress_bars_off() if quiet else contextlib.nullcontext(), _torchrun(run, rank):
                run(args)
                if push is not None and rank == 0:
                    from .hub import push_to_hub

                    _print(push_to_hub(args.out, push))
                _flush_stdout()  # a reader gone early fails here, not at exit
    except BrokenPipeError:  # stdout's reader left (`ladle inspect X | head`): stop quietly
        _discard_stdout()
        return 141  # 128 + SIGPIPE, as shells report a process the closed pipe stopped
    # A Warning: one that `python -W error` (or a filter of the caller's) made an error.
    except (LadleError, ValueError, OSError, MemoryError, Warning) as err:
        if args.debug:
            raise
        message = one_line(err) or "out of memory"  # a bare MemoryError says nothing
        if rank == 0:  # every rank raises a split merge's error; one line is enough
            _stderr(f"ladle: error: {message}")
        return 1
    except KeyboardInterrupt as err:  # the temporary output is deleted on the way out
        if args.debug:
            raise
        terminated = isinstance(err, _Terminated)
        if rank == 0:
            _stderr(f"ladle: {'terminated' if terminated else 'interrupted'}")
        return 143 if terminated else 130  # 128 + SIGTERM or SIGINT, as shells report them
    return 0


if __name__ == "__main__":
    sys.exit(main())
