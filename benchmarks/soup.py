"""Benchmark: uniform soup of a family of fp32 checkpoints, streamed to a file.

Reports, as ratios measured in the same run:
- time: ladle's net wall time (minus interpreter and import start-up) over the read floor
  (``cat`` of the inputs with a warm page cache) and over a naive load-all-then-mean script,
  writing a new output file (the previous one deleted before the clock starts), replacing
  an existing one (whose pages are freed inside the timed rename), and in memory;
- memory: peak extra anonymous memory (RssAnon, sampled from /proc; mmap'd file pages are
  page cache, not anonymous) over the size of one checkpoint and of the largest tensor,
  for N = 4 and N = 12 models, to show it does not grow with N.

Usage: python benchmarks/soup.py [--models 12] [--repeat 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

from common import (
    LADLE_MAIN,
    LADLE_SETUP,
    MIB,
    SETTLED,
    at_least,
    best_of,
    fresh,
    llama_family,
    python_timed,
    read_floor,
    warm,
    weights_file,
)
from safetensors import safe_open

NAIVE_SETUP = "import sys, torch\nfrom safetensors.torch import load_file, save_file"
NAIVE_WORK = """
models = [load_file(p) for p in sys.argv[2:]]
out = {k: (sum(m[k].float() for m in models) / len(models)).to(models[0][k].dtype)
       for k in models[0]}
if sys.argv[1] != "-":
    save_file(out, sys.argv[1])
"""


def largest_tensor(path: Path) -> int:
    """Bytes of the largest tensor in a float32 safetensors file."""
    with safe_open(str(path), "pt") as f:
        return max(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--repeat", type=at_least(1), default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()
    if args.models <= 4:  # a row of 4 models is compared with N: N=2 gave it twice
        parser.error(
            f"--models: expected more than 4 (the memory of N and of 4 models), found {args.models}"
        )

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ladle-bench-"))
    if args.keep:  # else they would be kept where no one could find them
        print(f"inputs kept in {workdir}")
    # What a given --workdir held before is never deleted, only what this run made there
    before = set(workdir.iterdir()) if args.workdir is not None and workdir.is_dir() else None
    try:
        # ~90 MB each: two 5120 x 1024 embeddings and one decoder layer, float32
        _, dirs = llama_family(workdir, args.models, layers=1, vocab=5120)
        files = [str(weights_file(d)) for d in dirs]
        one, largest = Path(files[0]).stat().st_size, largest_tensor(Path(files[0]))
        warm([Path(f) for f in files])
        py, r = sys.executable, args.repeat
        cat = read_floor(r, [Path(f) for f in files])
        ladle_idle = best_of(r, [py, "-c", LADLE_SETUP])
        naive_idle = best_of(r, [py, "-c", NAIVE_SETUP])
        out = str(workdir / "soup.safetensors")
        cli = ["soup", "--no-progress", "--device", "cpu", "--overwrite", "-o", out]
        soup = LADLE_MAIN
        # A new output (the previous one deleted before the clock starts), then the same
        # output replaced: the replaced file's pages are freed inside the timed rename.
        ladle_run = best_of(
            r, python_timed(fresh(LADLE_SETUP, out), soup, *cli, *files, settled=SETTLED)
        )
        replace_run = best_of(r, python_timed(LADLE_SETUP, soup, *cli, *files, settled=SETTLED))
        small_run = best_of(
            r, python_timed(fresh(LADLE_SETUP, out), soup, *cli, *files[:4], settled=SETTLED)
        )
        naive_run = best_of(r, python_timed(fresh(NAIVE_SETUP, out), NAIVE_WORK, out, *files))
        naive_replace_run = best_of(r, python_timed(NAIVE_SETUP, NAIVE_WORK, out, *files))
        in_memory = "ladle.uniform_soup(sys.argv[1:], device='cpu')"
        memory_run = best_of(r, python_timed(LADLE_SETUP, in_memory, *files, settled=SETTLED))
        naive_memory_run = best_of(r, python_timed(NAIVE_SETUP, NAIVE_WORK, "-", *files))
    finally:
        if not args.keep and before is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for made in set(workdir.iterdir()) - before:
                shutil.rmtree(made) if made.is_dir() else made.unlink()

    print(
        f"uniform soup of {args.models} fp32 checkpoints of {one / MIB:.1f} MiB (largest "
        f"tensor {largest / MIB:.1f} MiB), best of {r}; times exclude interpreter start-up"
    )
    print(f"  read floor (cat, warm cache)         {cat.seconds:7.3f} s")
    rows = [
        ("ladle soup -o new file (fsync'd)", ladle_run, naive_run),
        ("ladle soup -o file, replacing it", replace_run, naive_replace_run),
        ("ladle soup in memory", memory_run, naive_memory_run),
    ]
    for label, mine, naive in rows:
        print(
            f"  {label:<35}{mine.seconds:7.3f} s  = {mine.seconds / cat.seconds:5.2f}x read "
            f"floor; naive {naive.seconds:.3f} s = {naive.seconds / mine.seconds:4.2f}x ladle"
        )
    for label, run, idle in (
        (f"ladle N={args.models}", ladle_run, ladle_idle),
        (f"ladle N={len(files[:4])}", small_run, ladle_idle),
        (f"naive N={args.models}", naive_run, naive_idle),
    ):
        extra = max(run.peak_anon - idle.peak_anon, 0)
        print(
            f"  peak extra RssAnon {label:<11} {extra / MIB:7.1f} MiB = "
            f"{extra / one:5.2f}x one checkpoint = {extra / largest:5.2f}x largest tensor"
        )


if __name__ == "__main__":
    main()
