"""Model soups from plain training code: a hyper-parameter sweep, then uniform and greedy soup.

Every run of the sweep starts from the same initialisation (in practice: the pre-trained
weights), which is what makes their weights averageable. The state dicts stay in memory and
go straight to ladle; `evaluate` scores a candidate soup on held-out data through
`torch.func.functional_call`, without touching the module's own parameters.

    python examples/soup_in_training_loop.py            # a few seconds on a laptop CPU
    python examples/soup_in_training_loop.py --steps 50 # a quicker check
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.func import functional_call

import ladle


def make_data(gen: torch.Generator, n: int, teacher: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A 4-class problem: the label is the argmax of a noisy random linear teacher."""
    x = torch.randn(n, teacher.shape[0], generator=gen)
    y = (x @ teacher + 0.8 * torch.randn(n, teacher.shape[1], generator=gen)).argmax(dim=1)
    return x, y


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per fine-tuning run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tensors this small only lose time to threads

    gen = torch.Generator().manual_seed(args.seed)
    teacher = torch.randn(20, 4, generator=gen)
    x_train, y_train = make_data(gen, 400, teacher)
    x_val, y_val = make_data(gen, 500, teacher)  # held out: chooses the greedy soup's ingredients
    x_test, y_test = make_data(gen, 2000, teacher)  # reported

    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    init = {k: v.clone() for k, v in model.state_dict().items()}  # the shared starting point

    # 1. An ordinary training loop, once per hyper-parameter setting; keep each run's weights.
    sweep = [(1e-3, 0.0), (3e-3, 0.0), (1e-2, 0.0), (1e-3, 1e-2), (3e-3, 1e-2), (1e-2, 1e-2)]
    runs = []
    for run, (lr, weight_decay) in enumerate(sweep):
        model.load_state_dict(init)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(args.seed + run)
        for _ in range(args.steps):
            batch = torch.randint(len(y_train), (32,), generator=order)
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        runs.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    # 2. Score a state dict on held-out data without loading it into the module.
    def evaluate(
        state_dict: ladle.StateDict, x: torch.Tensor = x_val, y: torch.Tensor = y_val
    ) -> float:
        with torch.no_grad():
            return accuracy(functional_call(model, state_dict, (x,)), y)

    # 3. Merge: the uniform soup of every run, and the greedy soup (best first, keep a run
    #    when the held-out accuracy does not drop).
    uniform = ladle.uniform_soup(runs, device="cpu")
    greedy = ladle.greedy_soup(runs, evaluate, device="cpu")
    best = max(range(len(runs)), key=lambda i: evaluate(runs[i]))

    print(f"{'model':<28} {'val':>6} {'test':>6}")
    for name, state_dict in [
        (f"best single run (#{best})", runs[best]),
        (f"uniform soup of {len(runs)}", uniform),
        (f"greedy soup of {len(greedy.selected)} {greedy.selected}", greedy.state_dict),
    ]:
        print(
            f"{name:<28} {evaluate(state_dict):>6.3f} {evaluate(state_dict, x_test, y_test):>6.3f}"
        )

    # 4. Use the soup like any other weights.
    model.load_state_dict(greedy.state_dict)


if __name__ == "__main__":
    main()
