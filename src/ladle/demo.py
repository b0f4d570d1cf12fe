"""``ladle demo``: the whole recipe, end to end, on a synthetic domain-generalisation problem.

Everything is generated from the seed and trained on the spot (nothing is downloaded):

1. A *problem*: inputs are a latent point seen through a domain-specific distortion, plus a
   few "spurious" features that predict the class through a per-class code of each domain's
   own, so what a model learns of the training domains' codes is of no use in the unseen
   test domain. Several training domains, one test domain.
2. A tiny MLP *pre-trained* on a broad task (many classes, many other domains).
3. *Auxiliary* fine-tunings of it on other tasks.
4. A *linear probe* for the target task on the pre-trained features, then *target
   fine-tunings*: from the pre-trained init with varied hyper-parameters (the model-soups
   setting), and from each auxiliary init (:func:`ladle.ratatouille_init`, the ratatouille).
5. Every checkpoint is written as safetensors into the work directory, and merged from those
   files through the public API, streaming (``out=``): uniform and greedy soup, ratatouille
   (uniform and greedy), and Model Stock, task arithmetic and TIES when this ladle has them.

The table reports in-domain accuracy (held-out samples of the training domains) and
out-of-domain accuracy (the unseen domain); choices that need data (the best single model,
greedy selection, the task-arithmetic scale) use a separate in-domain validation split.
Whatever the numbers are is what is printed.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

import torch
from torch import nn
from torch.nn import functional as F

import ladle
from ladle.engine import resolve_device
from ladle.errors import LadleError, type_name
from ladle.methods.dare import check_seed
from ladle.writer import _not_a_folder, physical_path

__all__ = ["DemoRow", "check_demo_seed", "format_table", "run_demo"]

LATENT, OBSERVED, SPURIOUS, HIDDEN = 8, 16, 8, 64
TARGET_CLASSES, PRETRAIN_CLASSES, AUX_CLASSES = 5, 16, 6
TRAIN_DOMAINS, PRETRAIN_DOMAINS = 3, 6
HEAD = ("head.*",)  # the keys of a task's own head, dropped by ratatouille_init


class Size(NamedTuple):
    pretrain_samples: int
    pretrain_steps: int
    aux_tasks: int
    aux_steps: int
    train_per_domain: int
    eval_per_domain: int
    ood_samples: int
    probe_steps: int
    pretrained_runs: int
    runs_per_aux: int
    step_scale: float


SIZES = {
    "small": Size(1500, 150, 2, 60, 80, 60, 300, 80, 3, 1, 0.3),
    "default": Size(6000, 600, 4, 300, 150, 200, 2000, 300, 6, 2, 1.0),
}

# Target fine-tuning hyper-parameters: (learning rate, steps, weight decay), used in turn.
HYPER = [(1e-3, 300, 0.0), (3e-3, 200, 1e-4), (1e-3, 500, 1e-4), (3e-3, 400, 0.0),
         (2e-3, 300, 1e-3), (5e-3, 150, 0.0), (2e-3, 400, 0.0), (1e-3, 200, 1e-3)]  # fmt: skip


class DemoRow(NamedTuple):
    """One line of the demo's table (:func:`run_demo`): the method, how many fine-tunes it
    merged, and its accuracies on the training domains and the held-out ones, as fractions
    in [0, 1].

    Example:
        >>> row = DemoRow("uniform soup", models=6, in_domain=0.9, out_of_domain=0.75)
        >>> row.out_of_domain - row.in_domain
        -0.15000000000000002
    """

    method: str
    models: int
    in_domain: float
    out_of_domain: float


class Domain(NamedTuple):
    mixing: torch.Tensor  # OBSERVED x LATENT
    offset: torch.Tensor  # OBSERVED
    spurious: torch.Tensor  # TARGET_CLASSES x SPURIOUS: this domain's class codes


class Data(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


class Problem(NamedTuple):
    """The synthetic problem: its domains, the target task, and the generator that drew them
    (which goes on to draw every task and sample)."""

    gen: torch.Generator
    pretrain_domains: list[Domain]
    train_domains: list[Domain]
    test_domain: Domain
    target: torch.Tensor  # the target task's class prototypes


class MLP(nn.Module):
    """``features`` (two hidden ReLU layers) and a linear ``head``."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(LATENT + OBSERVED, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
        )
        self.head = nn.Linear(HIDDEN, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _domain(shared: torch.Tensor, gen: torch.Generator) -> Domain:
    distortion = torch.eye(LATENT) + 0.6 * torch.randn(LATENT, LATENT, generator=gen) / 3
    return Domain(
        shared @ distortion,
        0.5 * torch.randn(OBSERVED, generator=gen),
        1.5 * torch.randn(TARGET_CLASSES, SPURIOUS, generator=gen),
    )


def _prototypes(classes: int, gen: torch.Generator) -> torch.Tensor:
    """The class prototypes of a new task: a point in the latent space per class."""
    return 1.2 * torch.randn(classes, LATENT, generator=gen)


def _sample(
    prototypes: torch.Tensor, domain: Domain, n: int, gen: torch.Generator, *, target: bool
) -> Data:
    """``n`` labelled inputs of a task (its class prototypes) seen through ``domain``."""
    y = torch.randint(len(prototypes), (n,), generator=gen)
    z = prototypes[y] + torch.randn(n, LATENT, generator=gen)
    observed = z @ domain.mixing.T + domain.offset + 0.3 * torch.randn(n, OBSERVED, generator=gen)
    noise = torch.randn(n, SPURIOUS, generator=gen)
    spurious = domain.spurious[y] + 0.5 * noise if target else noise
    return Data(torch.cat([observed, spurious], dim=1), y)


def _concat(parts: Sequence[Data]) -> Data:
    return Data(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def _train(
    model: nn.Module,
    data: Data,
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int,
    parameters: Sequence[nn.Parameter] | None = None,
) -> None:
    """AdamW on minibatches of 64, written out (cheaper to start than ``torch.optim``)."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters()) if parameters is None else list(parameters)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, max(steps, 1) + 1):
        index = torch.randint(len(data.y), (64,), generator=gen).to(data.x.device)
        loss = F.cross_entropy(model(data.x[index]), data.y[index])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, (m, v) in zip(params, grads, moments):
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denominator = (v / (1 - beta2**step)).sqrt_().add_(eps)
                p.mul_(1 - lr * weight_decay)
                p.addcdiv_(m, denominator, value=-lr / (1 - beta1**step))


def _accuracy(model: nn.Module, state_dict: ladle.StateDict | None, data: Data) -> float:
    with torch.no_grad():
        if state_dict is None:
            logits = model(data.x)
        else:
            placed = {key: t.to(data.x.device) for key, t in state_dict.items()}
            logits = torch.func.functional_call(model, placed, (data.x,))
    return float((logits.argmax(dim=1) == data.y).float().mean())


def _new_model(classes: int, seed: int, device: torch.device) -> MLP:
    with torch.random.fork_rng(devices=[]):  # deterministic init; the caller's RNG untouched
        torch.manual_seed(seed)
        return MLP(classes).to(device)


def _to(data: Data, device: torch.device) -> Data:
    return Data(data.x.to(device), data.y.to(device))


def _features(model: MLP) -> dict[str, torch.Tensor]:
    """The model's state dict without its head: what a new task's model starts from."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def _save(model: nn.Module | ladle.StateDict, path: Path) -> Path:
    tensors = model.state_dict() if isinstance(model, nn.Module) else model
    return ladle.save({k: t.detach().cpu() for k, t in tensors.items()}, path, overwrite=True)


def check_demo_seed(seed: object) -> int:
    """``seed`` as an int in [0, 2**63): it seeds torch's generators directly (with small
    offsets, one per training run), unlike DARE's, which is hashed and may be any integer
    (:func:`~ladle.methods.dare.check_seed`: a number that is no integer is a ``ValueError``,
    what is no number a ``TypeError``). An integer outside the range is a ``ValueError``
    naming ``seed``.

    Example:
        >>> check_demo_seed(7)
        7
        >>> check_demo_seed(-1)
        Traceback (most recent call last):
        ValueError: seed: expected an integer in [0, 2**63), found -1
    """
    value = check_seed(seed)
    if not 0 <= value < 2**63:
        raise ValueError(f"seed: expected an integer in [0, 2**63), found {value}")
    return value


def format_table(rows: Sequence[DemoRow]) -> str:
    """The rows as a text table (accuracies in percent).

    Example:
        >>> print(format_table([DemoRow("uniform soup", 6, 0.9, 0.75)]))
        method        models  in-domain  out-of-domain
        uniform soup       6      90.0%          75.0%
    """
    width = max([len("method"), *(len(row.method) for row in rows)])
    lines = [f"{'method':<{width}}  models  in-domain  out-of-domain"]
    for row in rows:
        lines.append(
            f"{row.method:<{width}}  {row.models:>6}  {100 * row.in_domain:>8.1f}%  "
            f"{100 * row.out_of_domain:>12.1f}%"
        )
    return "\n".join(lines)


def run_demo(
    *,
    seed: int = 0,
    size: str = "default",
    workdir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    stream: TextIO | None = None,
) -> list[DemoRow]:
    """Run the demo: train, write checkpoints, merge them from disk, print the table.

    Pre-train a tiny MLP, fine-tune it on auxiliary tasks, fine-tune it on a target task
    from the pre-trained init (model soups, Wortsman et al. ICML 2022) and from each
    auxiliary init (model ratatouille, Ramé et al. ICML 2023), then compare merges of the
    target fine-tunings in and out of the training domains. Deterministic for ``seed`` on a
    given machine and torch version.

    Args:
        seed: seeds the problem (domains, tasks, samples) and every training run: an
            integer in [0, 2**63) (:func:`check_demo_seed`), checked before anything runs.
        size: ``"default"`` (a few seconds on two CPU cores) or ``"small"`` (a few seconds).
        workdir: where checkpoints are written and kept (files named by the demo are
            replaced); default a temporary directory, deleted afterwards.
        device: where training and merging run.
        stream: where the table goes; default standard output. Progress goes to stderr.

    Returns:
        The table's rows.

    Example:
        >>> import io
        >>> rows = run_demo(size="small", stream=io.StringIO())
        >>> [row.method for row in rows][:3]
        ['linear probe', 'best single fine-tuning', 'uniform soup']
    """
    seed = check_demo_seed(seed)
    if workdir is not None and not isinstance(workdir, (str, os.PathLike)):
        raise TypeError(f"workdir: expected a path, found {type_name(workdir)}")
    if workdir is not None and not os.fspath(workdir):  # "" is the working directory itself
        raise ValueError("workdir: expected a path, found an empty one")
    if not isinstance(size, str) or size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, found {size!r}")
    out = sys.stdout if stream is None else stream
    target = resolve_device(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small only lose time to threads (restored below)
    try:
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="ladle-demo-") as temporary:
                return _run(seed, SIZES[size], Path(temporary), target, out)
        rows = _run(seed, SIZES[size], Path(workdir), target, out)
        _log(f"checkpoints and merges kept in {workdir}")
        return rows
    finally:
        torch.set_num_threads(threads)


def _log(message: str) -> None:
    if sys.stderr is not None:  # closed (2>&-): print would write to standard output
        print(f"ladle demo: {message}", file=sys.stderr)


def _run(seed: int, size: Size, workdir: Path, device: torch.device, out: TextIO) -> list[DemoRow]:
    """Train, save, merge and score, in the order of the module's docstring; every random
    draw of the problem comes from one generator, in this order, so a seed is one table."""
    start = time.perf_counter()
    _make_folders(workdir, size)
    problem = _problem(seed)
    train, val, test, ood = _target_splits(problem, size, device)
    pretrained = _pretrain(problem, size, seed, device, workdir)
    aux_paths = _aux_fine_tunings(problem, pretrained, size, seed, device, workdir)
    inits = _inits(pretrained, aux_paths, train, size, seed, device, workdir)
    model, runs = _target_fine_tunings(inits, train, size, seed, device, workdir)
    rows = _merge_and_score(model, runs, inits["pretrained"], workdir, device, val, test, ood)
    _print_table(rows, seed, out)
    _log(f"done in {time.perf_counter() - start:.1f} s")
    return rows


MERGED = (
    "uniform-soup",
    "greedy-soup",
    "ratatouille",
    "ratatouille-greedy",
    "model-stock",
    "task-arithmetic",
    "ties",
)
"""The names of the merges the demo writes into ``WORKDIR/merged`` (``.safetensors``)."""


def _outputs(workdir: Path, size: Size) -> list[Path]:
    """Every file the demo writes into ``workdir``, in the order it writes them.

    Example:
        >>> [p.stem for p in _outputs(Path("w"), SIZES["small"])][:6]
        ['pretrained', 'aux-0', 'aux-1', 'probe', 'init-pretrained', 'init-aux-0']
    """
    aux = [f"aux-{task}" for task in range(size.aux_tasks)]
    runs = [f"ft-pretrained-{j}" for j in range(size.pretrained_runs)]
    runs += [f"ft-{name}-{j}" for name in aux for j in range(size.runs_per_aux)]
    names = ["pretrained", *aux, "probe", *(f"init-{n}" for n in ["pretrained", *aux]), *runs]
    return [workdir / f"{name}.safetensors" for name in names] + [
        workdir / "merged" / f"{name}.safetensors" for name in MERGED
    ]


def _found(path: Path) -> str:
    """What stands at ``path`` (which exists, or is a link), in words."""
    if path.is_symlink() and not path.exists():
        return f"a broken symbolic link (to {os.readlink(path)})"
    if path.is_file():
        return "a file"
    return "a folder" if path.is_dir() else "a special file (a FIFO, socket or device)"


def _make_folders(workdir: Path, size: Size) -> None:
    """The demo's folders, made, and each name it will write checked, before the training,
    not after it: a folder (or a FIFO) where a checkpoint goes stopped the demo once the
    training and the merges before it were done."""
    for folder in (workdir, workdir / "merged"):
        if os.path.lexists(folder) and not folder.is_dir():
            raise LadleError(f"{folder}: the demo writes a directory there; found {_found(folder)}")
        blocked = _not_a_folder(physical_path(folder))  # a file in the way, above it
        if blocked is not None:
            raise LadleError(f"{folder}: the demo writes a directory there; {blocked}")
    for path in _outputs(workdir, size):  # replaced: a file, or a link (itself)
        if os.path.lexists(path) and not (path.is_symlink() or path.is_file()):
            raise LadleError(f"{path}: the demo writes a checkpoint there; found {_found(path)}")
    (workdir / "merged").mkdir(parents=True, exist_ok=True)


def _problem(seed: int) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(OBSERVED, LATENT, generator=gen) / math.sqrt(LATENT)
    pretrain_domains = [_domain(shared, gen) for _ in range(PRETRAIN_DOMAINS)]
    train_domains = [_domain(shared, gen) for _ in range(TRAIN_DOMAINS)]
    test_domain = _domain(shared, gen)
    target = _prototypes(TARGET_CLASSES, gen)
    return Problem(gen, pretrain_domains, train_domains, test_domain, target)


def _target_splits(problem: Problem, size: Size, device: torch.device) -> list[Data]:
    """Train, validation and test samples of the training domains, and the unseen domain's."""

    def sample(domain: Domain, count: int) -> Data:
        return _sample(problem.target, domain, count, problem.gen, target=True)

    def split(per_domain: int) -> Data:
        return _concat([sample(domain, per_domain) for domain in problem.train_domains])

    train = split(size.train_per_domain)
    val = split(size.eval_per_domain)
    test = split(size.eval_per_domain)
    ood = sample(problem.test_domain, size.ood_samples)
    return [_to(data, device) for data in (train, val, test, ood)]


def _pretrain(problem: Problem, size: Size, seed: int, device: torch.device, workdir: Path) -> MLP:
    _log(f"pre-training on a {PRETRAIN_CLASSES}-class task over {PRETRAIN_DOMAINS} domains")
    broad = _prototypes(PRETRAIN_CLASSES, problem.gen)
    per_domain = size.pretrain_samples // PRETRAIN_DOMAINS
    samples = [
        _sample(broad, d, per_domain, problem.gen, target=False) for d in problem.pretrain_domains
    ]
    pretrained = _new_model(PRETRAIN_CLASSES, seed, device)
    _train(pretrained, _to(_concat(samples), device), steps=size.pretrain_steps, lr=3e-3, seed=seed)
    _save(pretrained, workdir / "pretrained.safetensors")
    return pretrained


def _aux_fine_tunings(
    problem: Problem, pretrained: MLP, size: Size, seed: int, device: torch.device, workdir: Path
) -> list[Path]:
    """Fine-tune the pre-trained features on auxiliary tasks over every domain; their files."""
    _log(f"fine-tuning on {size.aux_tasks} auxiliary tasks")
    per_domain = size.pretrain_samples // PRETRAIN_DOMAINS // 2
    paths = []
    for task in range(size.aux_tasks):
        prototypes = _prototypes(AUX_CLASSES, problem.gen)
        domains = [*problem.train_domains, *problem.pretrain_domains]
        data = _concat(
            [_sample(prototypes, d, per_domain, problem.gen, target=False) for d in domains]
        )
        aux = _new_model(AUX_CLASSES, seed + 1 + task, device)
        aux.load_state_dict(_features(pretrained), strict=False)
        _train(aux, _to(data, device), steps=size.aux_steps, lr=2e-3, seed=seed + 100 + task)
        paths.append(_save(aux, workdir / f"aux-{task}.safetensors"))
    return paths


def _inits(
    pretrained: MLP,
    aux_paths: list[Path],
    train: Data,
    size: Size,
    seed: int,
    device: torch.device,
    workdir: Path,
) -> dict[str, Path]:
    """A linear probe of the target task on the pre-trained features, and the inits of the
    target fine-tunings: each of the pre-trained and auxiliary models with the probe's head
    (:func:`ladle.ratatouille_init`), by name ("pretrained", "aux-0", ...)."""
    _log("linear probe on the pre-trained features, then target fine-tunings")
    probe = _new_model(TARGET_CLASSES, seed + 50, device)
    probe.load_state_dict(_features(pretrained), strict=False)
    head = list(probe.head.parameters())
    _train(probe, train, steps=size.probe_steps, lr=1e-2, seed=seed + 200, parameters=head)
    head_path = _save(
        {k: v for k, v in probe.state_dict().items() if k.startswith("head.")},
        workdir / "probe.safetensors",
    )
    sources = [("pretrained", workdir / "pretrained.safetensors")]
    sources += [(f"aux-{i}", path) for i, path in enumerate(aux_paths)]
    return {
        name: _save(
            ladle.ratatouille_init(source, head_path, drop=HEAD),
            workdir / f"init-{name}.safetensors",
        )
        for name, source in sources
    }


def _target_fine_tunings(
    inits: dict[str, Path],
    train: Data,
    size: Size,
    seed: int,
    device: torch.device,
    workdir: Path,
) -> tuple[MLP, dict[str, list[Path]]]:
    """Fine-tune the target task from each init with varied hyper-parameters; the module
    the evaluations run through, and the runs' files from the pre-trained init ("pretrained")
    and from the auxiliary ones ("aux")."""
    model = _new_model(TARGET_CLASSES, seed, device)
    runs: dict[str, list[Path]] = {"pretrained": [], "aux": []}
    plan = [("pretrained", j) for j in range(size.pretrained_runs)] + [
        (f"aux-{i}", j) for i in range(size.aux_tasks) for j in range(size.runs_per_aux)
    ]
    for number, (name, j) in enumerate(plan):
        lr, steps, weight_decay = HYPER[number % len(HYPER)]
        model.load_state_dict(ladle.load(inits[name], device=device))
        _train(
            model,
            train,
            steps=round(steps * size.step_scale),
            lr=lr,
            weight_decay=weight_decay,
            seed=seed + 1000 + number,
        )
        path = _save(model, workdir / f"ft-{name}-{j}.safetensors")
        runs["pretrained" if name == "pretrained" else "aux"].append(path)
    return model, runs


def _print_table(rows: Sequence[DemoRow], seed: int, out: TextIO) -> None:
    print(
        f"ladle demo (seed {seed}): {TRAIN_DOMAINS} training domains, 1 unseen test domain, "
        f"{TARGET_CLASSES} classes; MLP {LATENT + OBSERVED}-{HIDDEN}-{HIDDEN}-{TARGET_CLASSES}",
        file=out,
    )
    print(format_table(rows), file=out)
    print(
        "in-domain: held-out samples of the training domains; out-of-domain: the unseen "
        "domain.\nBest single model, greedy selection and the task-arithmetic scale are "
        "chosen on a separate in-domain validation split.",
        file=out,
    )


def _merge_and_score(
    model: nn.Module,
    runs: dict[str, list[Path]],
    base: Path,
    workdir: Path,
    device: torch.device,
    val: Data,
    test: Data,
    ood: Data,
) -> list[DemoRow]:
    merged = workdir / "merged"  # made by _run

    def val_accuracy(state_dict: ladle.StateDict) -> float:
        return _accuracy(model, state_dict, val)

    def row(method: str, count: int, source: ladle.StateDictLike) -> DemoRow:
        state_dict = ladle.load(source, device=device)
        return DemoRow(
            method, count, _accuracy(model, state_dict, test), _accuracy(model, state_dict, ood)
        )

    everything = runs["pretrained"] + runs["aux"]
    scores = {path: val_accuracy(ladle.load(path, device=device)) for path in everything}
    best = max(everything, key=lambda p: scores[p])  # max keeps the first of equal scores
    soups, ratatouilles = runs["pretrained"], runs["aux"]
    rows = [row("linear probe", 1, base), row("best single fine-tuning", 1, best)]

    _log("merging the checkpoints from disk")
    out = ladle.uniform_soup(
        soups, out=merged / "uniform-soup.safetensors", device=device, overwrite=True
    )
    rows.append(row("uniform soup", len(soups), out))
    greedy = ladle.greedy_soup(
        soups,
        val_accuracy,
        scores=[scores[p] for p in soups],
        out=merged / "greedy-soup.safetensors",
        device=device,
        overwrite=True,
    )
    rows.append(row("greedy soup", len(greedy.selected), merged / "greedy-soup.safetensors"))
    out = ladle.ratatouille(
        ratatouilles, out=merged / "ratatouille.safetensors", device=device, overwrite=True
    )
    rows.append(row("ratatouille (uniform)", len(ratatouilles), out))
    greedy = ladle.ratatouille(
        ratatouilles,
        selection="greedy",
        evaluate=val_accuracy,
        scores=[scores[p] for p in ratatouilles],
        out=merged / "ratatouille-greedy.safetensors",
        device=device,
        overwrite=True,
    )
    rows.append(
        row(
            "ratatouille (greedy)",
            len(greedy.selected),
            merged / "ratatouille-greedy.safetensors",
        )
    )
    rows.extend(_rows_with_base(soups, base, merged, device, val_accuracy, row))
    return rows


def _rows_with_base(
    soups: list[Path],
    base: Path,
    merged: Path,
    device: torch.device,
    val_accuracy: Callable[[ladle.StateDict], float],
    row: Callable[[str, int, ladle.StateDictLike], DemoRow],
) -> list[DemoRow]:
    """Rows for the methods with a base (the probe init is the base)."""
    out = ladle.model_stock(
        soups, base, out=merged / "model-stock.safetensors", device=device, overwrite=True
    )
    rows = [row("Model Stock", len(soups), out)]
    grid = [round(0.1 * i, 1) for i in range(1, 11)]  # the paper's grid, on validation
    chosen = max(
        grid,
        key=lambda s: val_accuracy(ladle.task_arithmetic(soups, base, scale=s, device=device)),
    )
    out = ladle.task_arithmetic(
        soups,
        base,
        scale=chosen,
        out=merged / "task-arithmetic.safetensors",
        device=device,
        overwrite=True,
    )
    rows.append(row(f"task arithmetic (scale {chosen})", len(soups), out))
    out = ladle.ties(soups, base, out=merged / "ties.safetensors", device=device, overwrite=True)
    rows.append(row("TIES (density 0.2, scale 1)", len(soups), out))
    return rows
