"""Benchmark every ladle method against the read floor, a naive script and (if present) mergekit.

Builds its own inputs: a base and N fine-tunes as tiny LLaMA directories (config.json +
model.safetensors) that mergekit can read too. Every number is measured in this run:
- time: wall seconds net of the tool's own start-up (interpreter and imports), as a ratio to
  the read floor (``cat`` of the inputs, warm page cache) and to ladle's uniform soup;
- memory: peak RssAnon (anonymous memory; mmap'd file pages excluded) above start-up, as a
  ratio to one checkpoint;
- agreement: where ladle and mergekit compute the same thing (linear, task arithmetic, TIES
  with per-tensor trim, Model Stock), the largest absolute difference of their outputs.

mergekit is never a dependency of ladle: install it in a separate venv (see
docs/benchmarks.md) and pass ``--mergekit /path/to/venv/bin/mergekit-yaml``.

Usage: python benchmarks/run.py [--quick] [--models 12] [--mergekit PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from common import MIB, STARTUP, Run, best_of, llama_family, warm, weights_file

NAIVE = """
import sys, torch
from safetensors.torch import load_file, save_file
models = [load_file(p) for p in sys.argv[2:]]
out = {k: (sum(m[k].float() for m in models) / len(models)).to(models[0][k].dtype)
       for k in models[0]}
save_file(out, sys.argv[1])
"""

MERGEKIT = {  # ladle label -> mergekit merge_method and per-model parameters
    "soup": ("linear", {"weight": 1.0}, {"normalize": True}),
    "task-arithmetic": ("task_arithmetic", {"weight": 1.0}, {"normalize": False}),
    "ties (trim=tensor)": ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True}),
    "stock": ("model_stock", {}, {}),
}


def ladle_commands(base: Path, models: list[Path], out: Path) -> dict[str, list[str]]:
    """The ladle CLI invocation of each method, writing to ``out``."""
    cli = [sys.executable, "-m", "ladle.cli"]
    common = ["--device", "cpu", "--no-progress", "--overwrite", "-o", str(out)]
    ms, b = [str(m) for m in models], ["--base", str(base)]
    return {
        "soup": [*cli, "soup", *ms, *common],
        "task-arithmetic": [*cli, "task-arithmetic", *b, *ms, *common],
        "ties (trim=global)": [*cli, "ties", *b, *ms, "--density", "0.2", *common],
        "ties (trim=tensor)": [
            *cli,
            "ties",
            *b,
            *ms,
            "--density",
            "0.2",
            "--trim",
            "tensor",
            *common,
        ],
        "stock": [*cli, "stock", *b, *ms, *common],
        "dare": [*cli, "dare", *b, *ms, "--density", "0.1", "--seed", "0", *common],
    }


def mergekit_config(method: str, base: Path, models: list[Path]) -> str:
    merge_method, per_model, parameters = MERGEKIT[method]
    lines = [f"merge_method: {merge_method}", "dtype: float32"]
    if merge_method != "linear":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for model in models:
        lines.append(f"  - model: {model}")
        if per_model:
            lines.append(f"    parameters: {per_model}")
    if parameters:
        lines.append(f"parameters: {parameters}")
    return "\n".join(lines).replace("'", "") + "\n"


def max_difference(a: Path, b: Path) -> float:
    import ladle

    x, y = ladle.load(a), ladle.load(b)
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x if k in y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 small models, one repeat")
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mergekit", type=Path, default=None, help="path to mergekit-yaml")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    count, repeat = (4, 1) if args.quick else (args.models, args.repeat)
    size = {"layers": 1, "vocab": 1024} if args.quick else {"layers": 1, "vocab": 5120}

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ladle-bench-"))
    try:
        report(workdir, count, repeat, size, args.mergekit)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def report(workdir: Path, count: int, repeat: int, size: dict, mergekit: Path | None) -> None:
    base, models = llama_family(workdir / "inputs", count, **size)
    files = [weights_file(d) for d in (base, *models)]
    one = files[0].stat().st_size
    warm(files)
    py = sys.executable
    cat = best_of(repeat, ["cat", *map(str, files)])
    start = best_of(repeat, [py, "-c", STARTUP])
    results: dict[str, Run] = {}
    outputs: dict[str, Path] = {}
    naive_out = workdir / "naive.safetensors"
    results["naive load-all soup"] = best_of(
        repeat, [py, "-c", NAIVE, str(naive_out), *map(str, files[1:])]
    )
    for label, argv in ladle_commands(base, models, workdir / "out").items():
        out = workdir / f"ladle-{label.split()[0]}-{len(outputs)}"
        argv[-1] = str(out)
        results[f"ladle {label}"] = best_of(repeat, argv)
        outputs[label] = out

    print(
        f"{count} fine-tunes + base, fp32, {one / MIB:.1f} MiB each; best of {repeat}; "
        f"read floor (cat of {len(files)} files) {cat.seconds:.3f} s; start-up "
        f"{start.seconds:.3f} s"
    )
    soup = results["ladle soup"].seconds - start.seconds
    print(f"{'run':<34}{'net s':>8}{'x floor':>9}{'x soup':>8}{'extra RssAnon':>15}{'x ckpt':>8}")
    for label, run in results.items():
        net = run.seconds - start.seconds
        extra = max(run.peak_anon - start.peak_anon, 0)
        print(
            f"{label:<34}{net:8.3f}{net / cat.seconds:9.2f}{net / soup:8.2f}"
            f"{extra / MIB:11.1f} MiB{extra / one:8.2f}"
        )
    if mergekit is None:
        print("mergekit: not run (pass --mergekit /path/to/mergekit-yaml)")
        return
    mk_start = best_of(
        repeat, [str(Path(mergekit).parent / "python"), "-c", "import mergekit.merge"]
    )
    for label in MERGEKIT:
        config = workdir / f"mergekit-{MERGEKIT[label][0]}.yml"
        config.write_text(mergekit_config(label, base, models))
        out = workdir / f"mergekit-{MERGEKIT[label][0]}"
        run = best_of(
            repeat,
            [str(mergekit), str(config), str(out), "--allow-crimes", "--quiet", "--device", "cpu"],
        )
        net = run.seconds - mk_start.seconds
        ladle_net = results[f"ladle {label}"].seconds - start.seconds
        extra = max(run.peak_anon - mk_start.peak_anon, 0)
        ladle_extra = max(results[f"ladle {label}"].peak_anon - start.peak_anon, 0)
        diff = max_difference(outputs[label], out)
        print(
            f"mergekit {MERGEKIT[label][0]:<17} net {net:7.3f} s (ladle {net / ladle_net:5.2f}x "
            f"faster), extra RssAnon {extra / MIB:7.1f} MiB (ladle {ladle_extra / MIB:.1f}); "
            f"outputs agree to max |diff| = {diff:.3g}"
        )


if __name__ == "__main__":
    main()
