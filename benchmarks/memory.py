"""Benchmark: peak extra memory of every method streamed to a file, against its chunks.

docs/streaming.md bounds the extra memory of a merge streamed to a file by a few chunks per
input (``chunk_bytes`` each), not by the tensors or the model. This measures, in a fresh
process per run, peak RssAnon above start-up for every method at each ``chunk_bytes`` asked,
on a bf16 family (a base and N fine-tunes, tiny LLaMA models of a few hundred MiB) stored as
safetensors files and as zip torch files, and reports it in MiB and as a ratio to
``(N + 1) × chunk_bytes``. A figure that grows with the model (``--layers``) instead of the
chunk is a defect: it was, before the fixes of 2026-12-02, up to 24× the chunks for DARE
with ``combine="ties"`` and 1 MiB chunks (memory the allocator kept after freeing buffers
made afresh for every chunk).

Usage: python benchmarks/memory.py [--models 3] [--layers 4] [--chunks 1,4] [--formats
       safetensors,pt] [--methods "soup,dare (ties)"] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from common import LADLE_SETUP, MIB, llama_family, run, weights_file
from safetensors.torch import load_file

CALLS = {
    "soup": "ladle.uniform_soup([base, *models], out=out, chunk_bytes=chunk)",
    "task arithmetic": "ladle.task_arithmetic(models, base, out=out, chunk_bytes=chunk)",
    "ties (global)": "ladle.ties(models, base, out=out, chunk_bytes=chunk)",
    "ties (tensor)": "ladle.ties(models, base, trim='tensor', out=out, chunk_bytes=chunk)",
    "stock": "ladle.model_stock(models, base, out=out, chunk_bytes=chunk)",
    "dare (sum)": "ladle.dare(models, base, out=out, chunk_bytes=chunk)",
    "dare (ties)": "ladle.dare(models, base, combine='ties', out=out, chunk_bytes=chunk)",
}


def family(workdir: Path, count: int, layers: int) -> list[Path]:
    """The base's and the fine-tunes' safetensors files (made again unless in ``workdir``,
    in a folder named after ``layers``: a family of other layers was reused, and measured
    as this one)."""
    folder = workdir / f"safetensors-{layers}-layers"
    made = [
        folder / name / "model.safetensors"
        for name in ["base", *(f"ft{i:02d}" for i in range(count))]
    ]
    if all(file.exists() for file in made):
        return made
    base, models = llama_family(
        folder, count, hidden=2048, intermediate=5632, layers=layers,
        vocab=16384, dtype=torch.bfloat16, spread=0.002,
    )  # fmt: skip
    return [weights_file(d) for d in (base, *models)]


def as_torch_files(files: list[Path], folder: Path) -> list[Path]:
    """The same tensors saved by ``torch.save`` (zip torch files, memory-mapped by ladle)."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = [folder / f"{index}.pt" for index in range(len(files))]
    for file, target in zip(files, saved):
        if not target.exists() or target.stat().st_mtime < file.stat().st_mtime:
            torch.save(load_file(file), target)
    return saved


def measure(method: str, base: Path, models: list[Path], chunk: int, out: Path) -> int:
    """Peak RssAnon of one merge's process, in bytes."""
    code = (
        f"{LADLE_SETUP}\nbase, models = {str(base)!r}, {[str(m) for m in models]!r}\n"
        f"out, chunk = {str(out)!r}, {chunk}\n{CALLS[method]}\n"
    )
    try:
        return run([sys.executable, "-c", code]).peak_anon
    finally:
        if out.exists():
            out.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers, ~100 MiB each")
    parser.add_argument("--chunks", default="1,4", help="chunk_bytes to run, in MiB")
    parser.add_argument("--formats", default="safetensors,pt")
    parser.add_argument("--methods", default=",".join(CALLS), help="of: " + ", ".join(CALLS))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    chunks = [int(c) * MIB for c in args.chunks.split(",")]
    kinds, methods = args.formats.split(","), args.methods.split(",")
    if not set(methods) <= set(CALLS):
        parser.error(f"--methods: expected some of {', '.join(CALLS)}, found {args.methods!r}")
    if not set(kinds) <= {"safetensors", "pt"}:
        parser.error(f"--formats: expected safetensors and/or pt, found {args.formats!r}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ladle-memory-"))
    try:
        idle = run([sys.executable, "-c", LADLE_SETUP]).peak_anon
        stored = family(workdir, args.models, args.layers)
        for kind in kinds:
            torch_files = workdir / f"pt-{args.layers}-layers"  # the family's, as above
            files = stored if kind == "safetensors" else as_torch_files(stored, torch_files)
            base, models = files[0], files[1:]
            size = base.stat().st_size
            print(f"{kind}: base + {len(models)} bf16 models of {size / MIB:.0f} MiB")
            print(f"{'method':18} {'chunk':>7} {'extra':>10} {'/ (N+1) chunks':>15}")
            for method in methods:
                for chunk in chunks:
                    peak = measure(method, base, models, chunk, workdir / "out.safetensors")
                    extra = max(peak - idle, 0)
                    ratio = extra / ((len(models) + 1) * chunk)
                    print(
                        f"{method:18} {chunk // MIB:>5}Mi {extra / MIB:>7.1f}MiB {ratio:>15.2f}",
                        flush=True,
                    )
            print()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
