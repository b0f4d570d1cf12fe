"""Benchmark: merging state dicts already in memory, as training code does (no files).

A family of ViT-B/16-shaped state dicts (86 M float32 parameters, 151 tensors) sits in
memory: a base and ``--models`` fine-tunes of it. Reported, measured in the same process and
run: ladle's uniform soup, task arithmetic and TIES (``trim="global"``, the paper's rule)
against the code a user would write instead: a dict comprehension for the soup and task
arithmetic, and for TIES the paper code's way (every task vector flattened into one
N × D matrix, ``kthvalue`` per row, sign election with the majority rule, disjoint mean).
The outputs are compared (largest absolute difference). Times are the best of ``--repeat``.

Usage: python benchmarks/in_memory.py [--models 6] [--repeat 2] [--threads 0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import at_least, load_ladle

import ladle

StateDict = dict[str, torch.Tensor]


def vit_b16(gen: torch.Generator) -> StateDict:
    """A state dict with the keys' shapes of a ViT-B/16 (patch 16, width 768, 12 blocks)."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 197, 768),
        "patch_embed.weight": (768, 3, 16, 16),
        "patch_embed.bias": (768,),
    }
    block = {
        "norm1.weight": (768,),
        "norm1.bias": (768,),
        "attn.qkv.weight": (2304, 768),
        "attn.qkv.bias": (2304,),
        "attn.proj.weight": (768, 768),
        "attn.proj.bias": (768,),
        "norm2.weight": (768,),
        "norm2.bias": (768,),
        "mlp.fc1.weight": (3072, 768),
        "mlp.fc1.bias": (3072,),
        "mlp.fc2.weight": (768, 3072),
        "mlp.fc2.bias": (768,),
    }
    for i in range(12):
        shapes |= {f"blocks.{i}.{name}": shape for name, shape in block.items()}
    shapes |= {"norm.weight": (768,), "norm.bias": (768,), "head.weight": (1000, 768)}
    return {key: 0.02 * torch.randn(shape, generator=gen) for key, shape in shapes.items()}


def naive_soup(models: list[StateDict]) -> StateDict:
    return {key: sum(m[key] for m in models) / len(models) for key in models[0]}


def naive_task_arithmetic(models: list[StateDict], base: StateDict) -> StateDict:
    return {key: base[key] + sum(m[key] - base[key] for m in models) for key in base}


def naive_ties(models: list[StateDict], base: StateDict, density: float = 0.2) -> StateDict:
    """TIES as the paper's code computes it, on the whole model flattened."""
    keys = list(base)
    origin = torch.cat([base[key].flatten() for key in keys])
    taus = torch.stack([torch.cat([m[key].flatten() for key in keys]) - origin for m in models])
    count = taus.shape[1]
    rank = count - int(count * density)
    for tau in taus:  # keep |τ| ≥ the rank-th smallest magnitude
        threshold = tau.abs().kthvalue(rank).values
        tau[tau.abs() < threshold] = 0
    sign = torch.sign(taus.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())  # the "majority" rule for sign ties
    agree = torch.where(sign > 0, taus > 0, taus < 0)
    merged = (taus * agree).sum(0) / agree.sum(0).clamp(min=1)
    flat, out, start = origin + merged, {}, 0
    for key in keys:
        out[key] = flat[start : start + base[key].numel()].view_as(base[key])
        start += base[key].numel()
    return out


def best(repeat: int, run: Callable[[], StateDict]) -> tuple[float, StateDict]:
    """The shortest of ``repeat`` runs, and the result of the last."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def largest_difference(a: StateDict, b: StateDict) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=6, help="fine-tunes (default 6)")
    parser.add_argument("--repeat", type=at_least(1), default=2, help="runs of each, best kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    load_ladle()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    base = vit_b16(gen)
    models = [
        {k: v + 0.001 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(args.models)
    ]
    size = sum(t.nbytes for t in base.values()) / 2**20
    print(
        f"{args.models} fine-tunes + base in memory, ViT-B/16 shapes ({len(base)} float32 "
        f"tensors, {size:.0f} MiB each); best of {args.repeat}; {torch.get_num_threads()} threads"
    )
    runs: dict[str, tuple[Callable[[], StateDict], Callable[[], StateDict]]] = {
        "uniform soup": (
            lambda: ladle.uniform_soup(models, device="cpu"),
            lambda: naive_soup(models),
        ),
        "task arithmetic": (
            lambda: ladle.task_arithmetic(models, base, device="cpu"),
            lambda: naive_task_arithmetic(models, base),
        ),
        "ties (trim=global)": (
            lambda: ladle.ties(models, base, device="cpu"),
            lambda: naive_ties(models, base),
        ),
    }
    print(f"{'method':<20}{'ladle s':>9}{'naive s':>9}{'naive ÷ ladle':>15}  max |ladle - naive|")
    for name, (mine, theirs) in runs.items():
        ours, merged = best(args.repeat, mine)
        naive, expected = best(args.repeat, theirs)
        difference = largest_difference(merged, expected)
        print(f"{name:<20}{ours:9.3f}{naive:9.3f}{naive / ours:15.2f}  {difference:.3g}")


if __name__ == "__main__":
    main()
