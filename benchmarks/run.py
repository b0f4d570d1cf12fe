"""Benchmark every ladle method against the read floor, a naive script and (if present) mergekit.

Builds its own inputs: a base and N fine-tunes as tiny LLaMA directories (config.json +
model.safetensors) that mergekit can read too, one family in fp32 and one in bf16. Every
number is measured in this run:
- time: wall seconds net of the tool's own start-up (interpreter and imports), as a ratio to
  the read floor (``cat`` of the run's own inputs, warm page cache: the N fine-tunes for the
  soups, the base too for the methods that take one, two fine-tunes for SLERP) and to
  ladle's uniform soup;
- memory: peak RssAnon (anonymous memory; mmap'd file pages excluded) above start-up, as a
  ratio to one checkpoint;
- agreement: where ladle and mergekit compute the same thing (linear, task arithmetic, TIES
  with per-tensor trim, Model Stock, SLERP), the largest absolute difference of their outputs.

mergekit is never a dependency of ladle: install it in a separate venv (see
docs/benchmarks.md) and pass ``--mergekit /path/to/venv/bin/mergekit-yaml``.

Usage: python benchmarks/run.py [--quick] [--models 12] [--dtypes fp32,bf16] [--mergekit PATH]
       [--workdir DIR]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    LADLE_MAIN,
    LADLE_SETUP,
    MIB,
    SETTLED,
    Run,
    at_least,
    best_of,
    fresh,
    llama_family,
    python_timed,
    read_floor,
    warm,
    weights_file,
)

NAIVE_SETUP = "import sys, torch\nfrom safetensors.torch import load_file, save_file"
NAIVE_WORK = """
models = [load_file(p) for p in sys.argv[2:]]
out = {k: (sum(m[k].float() for m in models) / len(models)).to(models[0][k].dtype)
       for k in models[0]}
save_file(out, sys.argv[1])
"""
FLOAT32_EPS = torch.finfo(torch.float32).eps

MERGEKIT = {  # ladle label -> mergekit merge_method and per-model parameters
    "soup": ("linear", {"weight": 1.0}, {"normalize": True}),
    "task-arithmetic": ("task_arithmetic", {"weight": 1.0}, {"normalize": False}),
    "ties (trim=tensor)": ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True}),
    "stock": ("model_stock", {}, {}),
    "slerp": ("slerp", {}, {"t": 0.5}),  # of the first two fine-tunes, the first as base
}

TWO_MODELS = ("slerp",)
"""Methods of two models: they read the first two fine-tunes, and their floor is those two."""


def ladle_commands(base: Path, models: list[Path]) -> dict[str, list[str]]:
    """The ladle CLI arguments of each method, but for ``-o OUT``."""
    common = ["--device", "cpu", "--no-progress"]
    ms, b = [str(m) for m in models], ["--base", str(base)]
    return {
        "soup": ["soup", *ms, *common],
        "task-arithmetic": ["task-arithmetic", *b, *ms, *common],
        "ties (trim=global)": ["ties", *b, *ms, "--density", "0.2", *common],
        "ties (trim=tensor)": ["ties", *b, *ms, "--density", "0.2", "--trim", "tensor", *common],
        "stock": ["stock", *b, *ms, *common],
        "dare": ["dare", *b, *ms, "--density", "0.1", "--seed", "0", *common],
        "slerp": ["slerp", *ms[:2], "--t", "0.5", *common],
    }


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mergekit_config(method: str, base: Path, models: list[Path], dtype: str) -> str:
    """mergekit computes in float32 and writes the inputs' dtype, as ladle does."""
    merge_method, per_model, parameters = MERGEKIT[method]
    out_dtype = "bfloat16" if dtype == "bf16" else "float32"
    lines = [f"merge_method: {merge_method}", "dtype: float32", f"out_dtype: {out_dtype}"]
    if method in TWO_MODELS:  # mergekit's slerp starts from its base_model: ladle's model A
        base, models = models[0], models[:2]
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


def term_magnitudes(label: str, base: Path, models: list[Path]) -> dict[str, torch.Tensor]:
    """Per entry, the sum of the magnitudes of the terms ``label``'s float32 arithmetic adds
    up (an upper bound where a method picks some): ``Σ|θᵢ|/n`` for the soup, ``|a| + |b|``
    for SLERP, ``|θ_base| + Σ|θᵢ − θ_base|`` for the task-vector methods. Rounding in
    another order moves an entry by a few float32 steps of this, whatever its neighbours."""
    import ladle

    if label in TWO_MODELS:
        sources, origin = models[:2], None
    else:
        sources, origin = models, (None if label == "soup" else ladle.load(base))
    sums: dict[str, torch.Tensor] = {}
    for path in sources:
        for key, value in ladle.load(path).items():
            if not value.is_floating_point():
                continue
            term = value.double() if origin is None else value.double() - origin[key].double()
            sums[key] = sums[key].add_(term.abs_()) if key in sums else term.abs_()
    for key, total in sums.items():
        if label == "soup":
            total.div_(len(sources))
        if origin is not None:
            total.add_(origin[key].double().abs())
    return sums


def difference(a: Path, b: Path, terms: dict[str, torch.Tensor], count: int) -> str:
    """Largest absolute difference of two outputs, how many entries differ at all, and a
    verdict: they agree where no entry differs by more than rounding, one step of its dtype
    (``eps · max(|a|, |b|)``) plus ``count`` float32 steps of the magnitude its arithmetic
    adds up (``terms``: :func:`term_magnitudes`; ``count``, the number of terms: float32
    sums in another order); the keys of one output alone are named."""
    import ladle

    x, y = ladle.load(a), ladle.load(b)
    keys = [k for k in x if k in y]
    differing = beyond = total = 0
    largest = 0.0
    for key in keys:
        p, q = x[key].double(), y[key].double()
        if p.shape != q.shape or x[key].dtype != y[key].dtype:  # nothing to compare: differ
            count_here = max(p.numel(), q.numel(), 1)
            differing, beyond, total = (
                differing + count_here,
                beyond + count_here,
                total + count_here,
            )
            continue
        if p.numel() == 0:
            continue
        finite = torch.isfinite(p) & torch.isfinite(q)
        # NaN against NaN, or the same infinity, agree; any other non-finite entry differs
        special = ~finite & ~((p == q) | (p.isnan() & q.isnan()))
        delta = (p - q).abs().where(finite, 0.0)
        tolerance = torch.zeros_like(delta)
        if x[key].is_floating_point():
            magnitude = torch.maximum(p.abs(), q.abs()).where(finite, 0.0)
            summed = terms[key].reshape(delta.shape) * (count * FLOAT32_EPS)
            tolerance = magnitude.mul_(torch.finfo(x[key].dtype).eps).add_(summed)
        differing += int((delta > 0).sum()) + int(special.sum())
        beyond += int((delta > tolerance).sum()) + int(special.sum())
        total += delta.numel()
        largest = max(largest, float(delta.max()), math.inf if bool(special.any()) else 0.0)
    alone = [k for k in x if k not in y], [k for k in y if k not in x]
    keys_differ = "".join(
        f"; {len(names)} keys in {who}'s alone ({', '.join(names[:3])})"
        for who, names in zip(("ladle", "mergekit"), alone)
        if names
    )
    verdict = "agree" if beyond == 0 and not keys_differ else "DIFFER"
    return (
        f"{verdict}: {beyond} of {total} entries beyond rounding, {differing} differ at all; "
        f"max |ladle - mergekit| = {largest:.3g}{keys_differ}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small models, 4 unless --models, one repeat unless --repeat",
    )
    parser.add_argument("--models", type=at_least(2), default=None, help="fine-tunes (default 12)")
    parser.add_argument(
        "--repeat", type=at_least(1), default=None, help="runs, best taken (default 3)"
    )
    parser.add_argument("--mergekit", type=Path, default=None, help="path to mergekit-yaml")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--dtypes", default="fp32,bf16", help="families to run, of fp32 and bf16 (default both)"
    )
    args = parser.parse_args()
    count = args.models if args.models is not None else 4 if args.quick else 12
    repeat = args.repeat if args.repeat is not None else 1 if args.quick else 3
    size = {"layers": 1, "vocab": 1024} if args.quick else {"layers": 1, "vocab": 5120}

    names = args.dtypes.split(",")
    for name in names:  # all checked before the first family runs
        if name not in DTYPES:
            parser.error(f"--dtypes: expected fp32 and/or bf16, found {name!r}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ladle-bench-"))
    try:
        for name in names:
            report(workdir / name, count, repeat, size, name, args.mergekit)
            print()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def report(
    workdir: Path, count: int, repeat: int, size: dict, name: str, mergekit: Path | None
) -> None:
    """One family (``name``: fp32 or bf16): every run, and mergekit's when given."""
    base, models = llama_family(workdir / "inputs", count, **size, dtype=DTYPES[name])
    files = [weights_file(d) for d in (base, *models)]
    one = files[0].stat().st_size
    warm(files)
    py = sys.executable
    cat = read_floor(repeat, files)
    cat_models = read_floor(repeat, files[1:])  # the soups read no base
    cat_two = read_floor(repeat, files[1:3])  # SLERP reads two fine-tunes
    idle = {
        "ladle": best_of(repeat, [py, "-c", LADLE_SETUP]),
        "naive": best_of(repeat, [py, "-c", NAIVE_SETUP]),
    }
    results: dict[str, tuple[Run, Run]] = {}  # label -> (run, idle run of the same imports)
    outputs: dict[str, Path] = {}
    naive_argv = [str(workdir / "naive.safetensors"), *map(str, files[1:])]
    results["naive load-all soup"] = (
        best_of(repeat, python_timed(fresh(NAIVE_SETUP, naive_argv[0]), NAIVE_WORK, *naive_argv)),
        idle["naive"],
    )
    for label, args in ladle_commands(base, models).items():
        out = workdir / f"ladle-{len(outputs)}"  # deleted before each run: a new output
        argv = python_timed(
            fresh(LADLE_SETUP, out), LADLE_MAIN, *args, "-o", str(out), settled=SETTLED
        )
        results[f"ladle {label}"] = (best_of(repeat, argv), idle["ladle"])
        outputs[label] = out

    print(
        f"{count} fine-tunes + base, {name}, {one / MIB:.1f} MiB each; best of {repeat}; read "
        f"floor: cat of the {len(models)} fine-tunes {cat_models.seconds:.3f} s (the soups' "
        f"floor), of all {len(files)} files {cat.seconds:.3f} s (the others'), of 2 "
        f"{cat_two.seconds:.3f} s (SLERP's); times exclude start-up"
    )
    soup = results["ladle soup"][0].seconds
    print(f"{'run':<30}{'s':>8}{'x floor':>9}{'x soup':>8}{'extra RssAnon':>15}{'x ckpt':>8}")
    for label, (run, baseline) in results.items():
        extra = max(run.peak_anon - baseline.peak_anon, 0)
        floor = cat_models if label in ("naive load-all soup", "ladle soup") else cat
        floor = cat_two if label.removeprefix("ladle ") in TWO_MODELS else floor
        print(
            f"{label:<30}{run.seconds:8.3f}{run.seconds / floor.seconds:9.2f}"
            f"{run.seconds / soup:8.2f}{extra / MIB:11.1f} MiB{extra / one:8.2f}"
        )
    if mergekit is None:
        print("mergekit: not run (pass --mergekit /path/to/venv/bin/mergekit-yaml)")
        return
    mk_python = str(Path(mergekit).parent / "python")
    mk_setup = "import sys\nfrom mergekit.scripts.run_yaml import main"
    mk_idle = best_of(repeat, [mk_python, "-c", mk_setup])
    found: dict[str, dict[str, torch.Tensor]] = {}  # one sum per kind of terms

    def terms(label: str) -> dict[str, torch.Tensor]:
        kind = label if label in ("soup", *TWO_MODELS) else "task vectors"
        if kind not in found:
            found[kind] = term_magnitudes(kind, base, models)
        return found[kind]

    def summed(label: str) -> int:  # the number of terms each entry's arithmetic adds up
        return 2 if label in TWO_MODELS else len(models) + 1

    for label in MERGEKIT:
        method = MERGEKIT[label][0]
        config = workdir / f"mergekit-{method}.yml"
        config.write_text(mergekit_config(label, base, models, name))
        out = workdir / f"mergekit-{method}"
        work = "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code"
        argv = python_timed(
            fresh(mk_setup, out),
            work,
            *(str(config), str(out), "--allow-crimes", "--quiet", "--device", "cpu"),
        )
        run = best_of(repeat, [mk_python, *argv[1:]])
        mine, _ = results[f"ladle {label}"]
        extra = max(run.peak_anon - mk_idle.peak_anon, 0)
        mine_extra = max(mine.peak_anon - idle["ladle"].peak_anon, 0)
        print(
            f"mergekit {method:<16} {run.seconds:7.3f} s = {run.seconds / mine.seconds:5.2f}x "
            f"ladle; extra RssAnon {extra / MIB:6.1f} MiB = {extra / max(mine_extra, MIB):5.2f}x "
            f"ladle; {difference(outputs[label], out, terms(label), summed(label))}"
        )


if __name__ == "__main__":
    main()
