"""Benchmark: uniform soup of a family of fp32 checkpoints, streamed to a file.

Reports, as ratios measured in the same run:
- time: ladle's net wall time (minus interpreter and import start-up) over the read floor
  (``cat`` of the inputs with a warm page cache) and over a naive load-all-then-mean script;
- memory: peak extra anonymous memory (RssAnon, sampled from /proc; mmap'd file pages are
  page cache, not anonymous) over the size of one checkpoint and of the largest tensor,
  for N = 4 and N = 12 models, to show it does not grow with N.

Usage: python benchmarks/soup.py [--models 12] [--mb 90] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

NAIVE = """
import sys, torch
from safetensors.torch import load_file, save_file
models = [load_file(p) for p in sys.argv[2:]]
out = {k: (sum(m[k].float() for m in models) / len(models)).to(models[0][k].dtype)
       for k in models[0]}
if sys.argv[1] != "-":
    save_file(out, sys.argv[1])
"""
IN_MEMORY = "import sys, ladle; ladle.uniform_soup(sys.argv[1:], device='cpu')"
STARTUP = "import torch, safetensors, ladle"


def make_family(workdir: Path, count: int, megabytes: float) -> list[Path]:
    """``count`` fp32 checkpoints of about ``megabytes`` MB: one large embedding plus layers."""
    hidden = 1024
    embed_rows = int(megabytes * 0.35e6 / (4 * hidden))
    layer_numel = hidden * 1152
    layers = max(1, int((megabytes * 1e6 - embed_rows * hidden * 4) / (4 * layer_numel)))
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        tensors = {"embed.weight": torch.randn(embed_rows, hidden, generator=gen)}
        for layer in range(layers):
            tensors[f"layers.{layer}.weight"] = torch.randn(hidden, 1152, generator=gen)
            tensors[f"layers.{layer}.bias"] = torch.randn(1152, generator=gen)
        tensors["num_batches_tracked"] = torch.tensor(i)
        path = workdir / f"model{i:02d}.safetensors"
        save_file(tensors, path)
        paths.append(path)
    return paths


def run(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RssAnon bytes of a child process (sampled every millisecond)."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    status = Path(f"/proc/{child.pid}/status")
    peak = 0
    while child.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(argv)}")
    return elapsed, peak


def best_of(repeat: int, argv: list[str]) -> tuple[float, int]:
    runs = [run(argv) for _ in range(repeat)]
    return min(t for t, _ in runs), max(m for _, m in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--mb", type=float, default=90.0, help="size of each checkpoint")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ladle-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        paths = make_family(workdir, args.models, args.mb)
        one = paths[0].stat().st_size
        largest = max(t.nbytes for t in _sizes(paths[0]))
        files = [str(p) for p in paths]
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm cache
        py = sys.executable
        cat_s, _ = best_of(args.repeat, ["cat", *files])
        start_s, start_mem = best_of(args.repeat, [py, "-c", STARTUP])
        out = str(workdir / "soup.safetensors")
        cli = [
            py,
            "-m",
            "ladle.cli",
            "soup",
            "--no-progress",
            "--device",
            "cpu",
            "--overwrite",
            "-o",
            out,
        ]
        ladle_s, ladle_mem = best_of(args.repeat, [*cli, *files])
        _, small_mem = best_of(args.repeat, [*cli, *files[:4]])
        naive_s, naive_mem = best_of(args.repeat, [py, "-c", NAIVE, out, *files])
        memory_s, _ = best_of(args.repeat, [py, "-c", IN_MEMORY, *files])
        naive_memory_s, _ = best_of(args.repeat, [py, "-c", NAIVE, "-", *files])
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    net = ladle_s - start_s
    mib = 2**20
    print(
        f"uniform soup of {args.models} fp32 checkpoints of {one / mib:.1f} MiB "
        f"(largest tensor {largest / mib:.1f} MiB), out= a .safetensors file, best of "
        f"{args.repeat}"
    )
    print(f"  read floor (cat, warm cache)   {cat_s:7.3f} s")
    print(f"  start-up (python + imports)    {start_s:7.3f} s")
    print(
        f"  ladle soup -o file, net        {net:7.3f} s   {net / cat_s:5.2f}x read floor "
        "(output fsync'd before its rename)"
    )
    print(
        f"  naive load-all -o file, net    {naive_s - start_s:7.3f} s   "
        f"ladle is {(naive_s - start_s) / net:5.2f}x faster (naive does not fsync)"
    )
    mem_net, naive_mem_net = memory_s - start_s, naive_memory_s - start_s
    print(f"  ladle soup in memory, net      {mem_net:7.3f} s   {mem_net / cat_s:5.2f}x read floor")
    print(
        f"  naive load-all in memory, net  {naive_mem_net:7.3f} s   "
        f"ladle is {naive_mem_net / mem_net:5.2f}x faster"
    )
    for label, mem in (
        (f"ladle N={args.models}", ladle_mem),
        ("ladle N=4", small_mem),
        (f"naive N={args.models}", naive_mem),
    ):
        extra = max(mem - start_mem, 0)
        print(
            f"  peak extra RssAnon {label:<10}  {extra / mib:8.1f} MiB = "
            f"{extra / one:5.2f}x one checkpoint = {extra / largest:5.2f}x largest tensor"
        )


def _sizes(path: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(path).values())


if __name__ == "__main__":
    main()
