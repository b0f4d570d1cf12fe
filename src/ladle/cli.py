"""The ``ladle`` command: parses arguments and calls the public API, nothing more.

Exit status: 0 on success, 1 on a merge error (one line on stderr; ``--debug`` for the
traceback), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import __version__
from .checkpoint import open_checkpoint
from .errors import LadleError
from .methods.soup import uniform_soup
from .writer import parse_size

__all__ = ["main"]

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


def _dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(DTYPES)}, found {text!r}"
        ) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def merge_options() -> argparse.ArgumentParser:
    """Options every merge sub-command shares."""
    parent = argparse.ArgumentParser(add_help=False)
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
        help="output dtype of floating tensors (default: that of the inputs)",
    )
    parent.add_argument(
        "--max-shard-size",
        type=_size,
        default="5GB",
        help="largest shard of a directory output (default: 5GB)",
    )
    parent.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parent.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parent


def merge_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for a merge function from the shared options."""
    return {
        "out": args.out,
        "device": args.device,
        "dtype": args.dtype,
        "max_shard_size": args.max_shard_size,
        "overwrite": args.overwrite,
        "progress": not args.no_progress and sys.stderr.isatty(),
    }


def _run_soup(args: argparse.Namespace) -> None:
    out = uniform_soup(args.models, weights=args.weights, **merge_kwargs(args))
    print(out)


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _run_inspect(args: argparse.Namespace) -> None:
    with open_checkpoint(args.checkpoint) as ckpt:
        keys = ckpt.keys()
        rows = [(key, ckpt.shape(key), ckpt.dtype(key), ckpt.nbytes(key)) for key in keys]
        params = sum(nbytes // dtype.itemsize for _, _, dtype, nbytes in rows)
        total = sum(nbytes for *_, nbytes in rows)
        if args.json:
            print(
                json.dumps(
                    {
                        "source": ckpt.name,
                        "tensors": [
                            {
                                "key": k,
                                "shape": list(s),
                                "dtype": str(d).removeprefix("torch."),
                                "bytes": n,
                            }
                            for k, s, d, n in rows
                        ],
                        "parameters": params,
                        "bytes": total,
                        "metadata": ckpt.metadata,
                    },
                    indent=2,
                )
            )
            return
        width = max((len(k) for k in keys), default=3)
        for key, shape, dtype, nbytes in rows:
            dims = "x".join(map(str, shape)) or "scalar"
            print(
                f"{key:<{width}}  {str(dtype).removeprefix('torch.'):<9} {dims:<16} "
                f"{_format_bytes(nbytes)}"
            )
        print(f"{len(keys)} tensors, {params:,} parameters, {_format_bytes(total)} ({ckpt.name})")
        for name, value in sorted(ckpt.metadata.items()):
            print(f"metadata {name}: {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ladle", description="Merge neural-network weights (model soups and more)."
    )
    parser.add_argument("--version", action="version", version=f"ladle {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    soup = commands.add_parser(
        "soup", parents=[merge_options()], help="uniform or weighted mean of models"
    )
    soup.add_argument("models", nargs="+", help="checkpoints: files or directories")
    soup.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        help="one weight per model (normalised to sum to 1)",
    )
    soup.set_defaults(run=_run_soup)

    inspect = commands.add_parser("inspect", help="keys, shapes, dtypes and size of a checkpoint")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_run_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ladle`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except (LadleError, ValueError, OSError) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())
        print(f"ladle: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
