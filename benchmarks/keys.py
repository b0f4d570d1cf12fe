"""Benchmark: the cost of each key, and that it does not grow with the number of keys.

Models with thousands of keys (MoE experts, every bias and norm of a wide model) pay a fixed
cost per key and model read; a cost that grows with the number of keys (a pass over every
key made once per key) is a defect that shows here. Each method merges a family of
``--keys`` float32 tensors of 64 entries and one of a quarter as many; reported, measured in
the same run: microseconds per key and input file at both sizes and their ratio (1.0 when the
cost per key is constant), and the time over a naive script that loads every model whole
and averages it. Times are net of interpreter and import start-up; output in memory.

Usage: python benchmarks/keys.py [--models 8] [--keys 5000] [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from common import LADLE_SETUP, SETTLED, at_least, best_of, python_timed, warm
from safetensors.torch import save_file

NAIVE_SETUP = "import sys, torch\nfrom safetensors.torch import load_file"
NAIVE_WORK = """
models = [load_file(p) for p in sys.argv[1:]]
out = {k: sum(m[k].float() for m in models) / len(models) for k in models[0]}
"""
METHODS = {
    "soup": "ladle.uniform_soup(sys.argv[2:], device='cpu')",
    "task arithmetic": "ladle.task_arithmetic(sys.argv[2:], sys.argv[1], device='cpu')",
    "ties (trim=global)": "ladle.ties(sys.argv[2:], sys.argv[1], device='cpu')",
    # 128-byte chunks: two per key, so every key gets a threshold pass of its own
    "ties (tensor, 2 chunks)": (
        "ladle.ties(sys.argv[2:], sys.argv[1], trim='tensor', device='cpu', chunk_bytes=128)"
    ),
    "model stock": "ladle.model_stock(sys.argv[2:], sys.argv[1], device='cpu')",
}


def family(directory: Path, models: int, keys: int, width: int) -> list[str]:
    """A base and ``models`` fine-tunes of ``keys`` float32 tensors of ``width`` entries."""
    directory.mkdir(parents=True, exist_ok=True)  # a --workdir of an earlier run: rewritten
    gen = torch.Generator().manual_seed(0)
    base = {f"layer{k}.weight": torch.randn(width, generator=gen) for k in range(keys)}
    paths = []
    for i in range(models + 1):
        state = (
            base
            if i == 0
            else {k: v + 0.01 * torch.randn(width, generator=gen) for k, v in base.items()}
        )
        paths.append(directory / f"m{i}.safetensors")
        save_file(state, paths[-1])
    warm(paths)
    return [str(p) for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--keys", type=int, default=5000)
    parser.add_argument("--repeat", type=at_least(1), default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ladle-keys-"))
    try:
        few = family(workdir / "few", args.models, args.keys // 4, 64)
        many = family(workdir / "many", args.models, args.keys, 64)
        r = args.repeat
        naive = best_of(r, python_timed(NAIVE_SETUP, NAIVE_WORK, *many[1:]))
        print(
            f"{args.models} fine-tunes + base of {args.keys // 4} and {args.keys} float32 "
            f"tensors of 64 entries; best of {r}; in memory, net of start-up"
        )
        print(f"  naive load-all soup, {args.keys} keys  {naive.seconds:7.3f} s")
        for label, work in METHODS.items():
            per_key = []  # microseconds per key and input file
            for paths, keys in ((few, args.keys // 4), (many, args.keys)):
                seconds = best_of(
                    r, python_timed(LADLE_SETUP, work, *paths, settled=SETTLED)
                ).seconds
                files = len(paths) - (label == "soup")  # the soup reads no base
                per_key.append(1e6 * seconds / (max(keys, 1) * files))
            print(
                f"  ladle {label:<23} {per_key[0]:6.1f} and {per_key[1]:6.1f} us per key and "
                f"file: {per_key[1] / per_key[0]:4.2f}x; {seconds:6.3f} s = "
                f"{seconds / naive.seconds:5.2f}x naive"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
