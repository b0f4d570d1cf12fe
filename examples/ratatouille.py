"""Model ratatouille, step by step (Ramé et al., ICML 2023).

1. Fine-tune the pre-trained model on auxiliary tasks (here: other labelings of the inputs).
2. Train a linear probe for the target task on the frozen pre-trained features.
3. Fine-tune on the target task from each auxiliary model, with its head swapped for the
   probe (`ladle.ratatouille_init`).
4. Average the target fine-tunings (`ladle.ratatouille`), uniformly or greedily.

Checkpoints are written as safetensors into a directory and merged from the files, the way
one does with real models.

    python examples/ratatouille.py             # a few seconds on a laptop CPU
    python examples/ratatouille.py --steps 40  # a quicker check
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

import ladle

FEATURES, HIDDEN = 16, 48


class Net(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.head = nn.Linear(HIDDEN, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def task(gen: torch.Generator, classes: int) -> torch.Tensor:
    """A labeling of the inputs: the nearest of `classes` random centres."""
    return torch.randn(classes, FEATURES, generator=gen)


def sample(gen: torch.Generator, centres: torch.Tensor, n: int, shift: float = 0.0):
    x = torch.randn(n, FEATURES, generator=gen) * 1.5 + shift
    y = torch.cdist(x, centres).argmin(dim=1)
    return x + 0.5 * torch.randn(n, FEATURES, generator=gen), y


def fit(model: nn.Module, x, y, *, steps: int, lr: float, seed: int, params=None) -> nn.Module:
    optimizer = torch.optim.AdamW(params or model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(y), (64,), generator=order)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description="Model ratatouille, step by step.")
    parser.add_argument("--steps", type=int, default=300, help="steps per training run")
    parser.add_argument("--workdir", default=None, help="keep the checkpoints here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tensors this small only lose time to threads
    with tempfile.TemporaryDirectory(prefix="ratatouille-") as temporary:
        workdir = Path(args.workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        recipe(workdir, args.steps)


def recipe(workdir: Path, steps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    # 0. A "pre-trained" model: a broad 12-class task.
    pretrained = fit(Net(12), *sample(gen, task(gen, 12), 3000), steps=2 * steps, lr=3e-3, seed=0)
    ladle.save(pretrained.state_dict(), workdir / "pretrained.safetensors", overwrite=True)

    # 1. Auxiliary fine-tunings, each from the pre-trained weights with a new head.
    auxiliaries = []
    for i in range(3):
        aux = Net(6)
        aux.body.load_state_dict(pretrained.body.state_dict())
        fit(aux, *sample(gen, task(gen, 6), 1500), steps=steps, lr=2e-3, seed=10 + i)
        auxiliaries.append(
            ladle.save(aux.state_dict(), workdir / f"aux-{i}.safetensors", overwrite=True)
        )

    # 2. The target task (few labels; tested also on shifted inputs) and its linear probe.
    target = task(gen, 5)
    x_train, y_train = sample(gen, target, 300)
    x_val, y_val = sample(gen, target, 500)
    x_shift, y_shift = sample(gen, target, 2000, shift=0.7)
    probe = Net(5)
    probe.body.load_state_dict(pretrained.body.state_dict())
    fit(
        probe, x_train, y_train, steps=steps, lr=1e-2, seed=20, params=list(probe.head.parameters())
    )
    head = {f"head.{k}": v for k, v in probe.head.state_dict().items()}

    # 3. Target fine-tunings, one from each auxiliary model with the probe put in.
    model = Net(5)
    runs = []
    for i, aux_path in enumerate(auxiliaries):
        init = ladle.ratatouille_init(aux_path, head, drop=["head.*"])  # the 6-class head goes
        model.load_state_dict(init)
        fit(model, x_train, y_train, steps=steps, lr=1e-3, seed=30 + i)
        runs.append(
            ladle.save(model.state_dict(), workdir / f"target-{i}.safetensors", overwrite=True)
        )

    # 4. The ratatouille: the average of the target fine-tunings, streamed from the files.
    def evaluate(
        state_dict: ladle.StateDict, x: torch.Tensor = x_val, y: torch.Tensor = y_val
    ) -> float:
        with torch.no_grad():
            return float((functional_call(model, state_dict, (x,)).argmax(1) == y).float().mean())

    uniform = ladle.ratatouille(
        runs, out=workdir / "ratatouille.safetensors", overwrite=True, device="cpu"
    )
    greedy = ladle.ratatouille(runs, selection="greedy", evaluate=evaluate, device="cpu")
    print(f"{'model':<24} {'val':>6} {'shifted':>8}")
    for i, run in enumerate(runs):
        weights = ladle.load(run)
        name = f"target run {i}"
        print(f"{name:<24} {evaluate(weights):>6.3f} {evaluate(weights, x_shift, y_shift):>8.3f}")
    for name, weights in [
        ("ratatouille (uniform)", ladle.load(uniform)),
        (f"ratatouille (greedy {len(greedy.selected)})", greedy.state_dict),
    ]:
        print(f"{name:<24} {evaluate(weights):>6.3f} {evaluate(weights, x_shift, y_shift):>8.3f}")


if __name__ == "__main__":
    main()
