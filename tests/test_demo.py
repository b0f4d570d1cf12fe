from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.nn import functional as F

import ladle
import ladle.demo
from ladle.cli import main
from ladle.demo import Data, DemoRow, format_table, run_demo

BASE_ROWS = [
    "linear probe",
    "best single fine-tuning",
    "uniform soup",
    "greedy soup",
    "ratatouille (uniform)",
    "ratatouille (greedy)",
]


@pytest.mark.parametrize(
    ("seed", "error", "message"),
    [
        (-1, ValueError, "seed: expected an integer in [0, 2**63), found -1"),
        (2**63, ValueError, "seed: expected an integer in [0, 2**63), found 9223372036854775808"),
        (2**64, ValueError, "seed: expected an integer in [0, 2**63), found 18446744073709551616"),
        (1.5, ValueError, "seed: expected an integer, found 1.5"),
        (True, TypeError, "seed: expected an integer, found bool"),
        ("3", TypeError, "seed: expected an integer, found str"),
    ],
)
def test_run_demo_refuses_the_seeds_the_cli_refuses_before_anything_runs(
    tmp_path, seed, error, message
):
    # Before: run_demo took seeds the CLI refuses (-1 ran the demo), and seed=2**64 failed in
    # torch ("Overflow when unpacking long long") after creating the workdir.
    with pytest.raises(error) as caught:
        run_demo(seed=seed, size="small", workdir=tmp_path / "w", stream=io.StringIO())
    assert str(caught.value) == message
    assert not (tmp_path / "w").exists()


def test_ladle_demo_small_exits_0_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--size", "small", "--seed", "3", "--workdir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert header == 1  # the problem's line, then the table: progress goes to stderr
    assert "ladle demo: pre-training on a 16-class task over 6 domains" in err.splitlines()
    assert lines[header].split() == ["method", "models", "in-domain", "out-of-domain"]
    for name, line in zip(BASE_ROWS, lines[header + 1 :]):
        assert line.startswith(name)
        *_, models, in_domain, out_of_domain = line.split()
        assert int(models) >= 1
        assert 0 <= float(in_domain.rstrip("%")) <= 100
        assert 0 <= float(out_of_domain.rstrip("%")) <= 100


def test_demo_merges_the_checkpoints_it_wrote(tmp_path):
    rows = run_demo(size="small", workdir=tmp_path, stream=io.StringIO())
    runs = sorted(tmp_path.glob("ft-pretrained-*.safetensors"))
    aux_runs = sorted(tmp_path.glob("ft-aux-*.safetensors"))
    assert [row.method for row in rows[:6]] == BASE_ROWS
    assert rows[2].models == len(runs) and rows[4].models == len(aux_runs)
    for name, models in [("uniform-soup", runs), ("ratatouille", aux_runs)]:
        written = ladle.load(tmp_path / "merged" / f"{name}.safetensors")
        expected = ladle.uniform_soup(models, device="cpu")
        assert all(torch.equal(written[k], expected[k]) for k in expected)
    init = ladle.load(tmp_path / "init-aux-0.safetensors")
    aux, probe = (
        ladle.load(tmp_path / "aux-0.safetensors"),
        ladle.load(tmp_path / "probe.safetensors"),
    )
    assert torch.equal(init["features.0.weight"], aux["features.0.weight"])
    assert torch.equal(init["head.weight"], probe["head.weight"])


def test_demo_is_deterministic_for_a_seed_and_leaves_the_callers_random_state(tmp_path):
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    first = run_demo(size="small", seed=1, workdir=tmp_path / "a", stream=io.StringIO())
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(2)  # the demo's initialisations do not draw from the caller's generator
    second = run_demo(size="small", seed=1, workdir=tmp_path / "b", stream=io.StringIO())
    assert first == second
    files = [path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*.safetensors")]
    assert len(files) == len(list((tmp_path / "b").rglob("*.safetensors")))
    for name in files:  # the same checkpoints, down to the pre-trained model's
        a, b = ladle.load(tmp_path / "a" / name), ladle.load(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_rows_for_methods_with_a_base_follow_the_soups(monkeypatch):
    calls = []

    def fake(models, base, *, scale=1.0, **kwargs):  # a stand-in with the contract's signature
        calls.append(scale)
        return ladle.uniform_soup(models, **kwargs)

    for name in ("model_stock", "task_arithmetic", "ties"):
        monkeypatch.setattr(ladle, name, fake, raising=False)
    stream = io.StringIO()
    rows = run_demo(size="small", stream=stream)
    methods = [row.method for row in rows]
    assert methods[:6] == BASE_ROWS
    assert methods[6] == "Model Stock"
    assert methods[7].startswith("task arithmetic (scale ")
    assert methods[8].startswith("TIES")
    assert "Model Stock" in stream.getvalue()
    assert len(calls) == 10 + 3  # task arithmetic: a grid of 10 scales on validation, then 3


def test_bad_size_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--size", "huge"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="size"):
        run_demo(size="huge")


def test_default_workdir_is_removed_afterwards(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    run_demo(size="small", stream=io.StringIO())
    assert list(tmp_path.iterdir()) == []
    assert "ladle.demo" in sys.modules


@pytest.mark.parametrize("file", ["afile", "afile/merged"])
def test_a_workdir_or_merged_folder_that_is_a_file_is_one_error_line_before_training(
    tmp_path, capsys, monkeypatch, file
):
    # workdir/merged a file: "[Errno 17] File exists: 'w/merged'", after all the training.
    from ladle import demo
    from ladle.cli import main

    workdir = tmp_path / "afile"
    if file != "afile":
        workdir.mkdir()
    (tmp_path / file).write_text("mine")
    monkeypatch.setattr(demo, "_save", None)  # the training's first save: never reached
    assert main(["demo", "--size", "small", "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"{tmp_path / file}: the demo writes a directory there; found a file\n")
    assert (tmp_path / file).read_text() == "mine"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        # A folder where a checkpoint goes: refused after the training and 6 of the 7 merges.
        ("merged/ties.safetensors", "the demo writes a checkpoint there; found a folder"),
        ("pretrained.safetensors", "the demo writes a checkpoint there; found a folder"),
        # "this is a file", of a FIFO or a link leading nowhere; a file above the workdir:
        # "[Errno 20] Not a directory: '.../f/sub/merged'", naming not the file at fault.
        (
            "fifo",
            "the demo writes a directory there; found a special file (a FIFO, socket or device)",
        ),
        (
            "broken link",
            "the demo writes a directory there; found a broken symbolic link (to {w}/nowhere)",
        ),
        ("file above", "the demo writes a directory there; {w}/f is a file, not a directory"),
    ],
)
def test_what_stands_where_the_demo_writes_is_named_before_training(
    tmp_path, capsys, monkeypatch, case, message
):
    from ladle import demo
    from ladle.cli import main

    workdir = tmp_path / "demo"
    where = workdir
    if case.endswith(".safetensors"):
        (workdir / case).mkdir(parents=True)
        where = workdir / case
    elif case == "fifo":
        os.mkfifo(workdir)
    elif case == "broken link":
        workdir.symlink_to(tmp_path / "nowhere")
    else:
        (tmp_path / "f").write_text("mine")
        workdir = where = tmp_path / "f" / "sub"
    monkeypatch.setattr(demo, "_save", None)  # the training's first save: never reached
    assert main(["demo", "--size", "small", "--workdir", str(workdir)]) == 1
    expected = f"ladle: error: {where}: {message.format(w=tmp_path)}\n"
    assert capsys.readouterr().err == expected


def test_the_table_is_as_wide_as_its_header_when_the_methods_are_shorter():
    assert format_table([DemoRow("a", 12, 0.5, 0.125)]) == (
        "method  models  in-domain  out-of-domain\na           12      50.0%          12.5%"
    )


@pytest.mark.parametrize(("weight_decay", "head_only"), [(0.1, False), (0.0, True)])
def test_the_written_out_adamw_steps_as_torchs_on_the_same_minibatches(weight_decay, head_only):
    gen = torch.Generator().manual_seed(0)
    data = Data(torch.randn(100, 24, generator=gen), torch.randint(5, (100,), generator=gen))
    model = ladle.demo._new_model(5, 1, torch.device("cpu"))
    reference = ladle.demo._new_model(5, 1, torch.device("cpu"))
    trained = list(model.head.parameters()) if head_only else None
    ladle.demo._train(
        model, data, steps=20, lr=0.01, weight_decay=weight_decay, seed=7, parameters=trained
    )

    params = list((reference.head if head_only else reference).parameters())
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=weight_decay, foreach=False)
    order = torch.Generator().manual_seed(7)  # the minibatches of 64 _train draws
    for _ in range(20):
        index = torch.randint(100, (64,), generator=order)
        optimizer.zero_grad()
        F.cross_entropy(reference(data.x[index]), data.y[index]).backward()
        optimizer.step()
    initial = ladle.demo._new_model(5, 1, torch.device("cpu")).state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], rtol=1e-5, atol=1e-6)
        assert torch.equal(value, initial[key]) == (head_only and not key.startswith("head."))


def test_a_device_the_demo_cannot_use_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError) as caught:
        run_demo(size="small", device="meta", workdir=tmp_path / "w", stream=io.StringIO())
    assert str(caught.value) == "device: 'meta' holds no data; use cpu, cuda or another device"
    assert not (tmp_path / "w").exists()


def test_a_rerun_in_a_workdir_replaces_the_files_of_the_names_the_demo_writes(tmp_path):
    workdir = tmp_path / "kept" / "demo"  # its parent does not exist yet either
    first = run_demo(size="small", workdir=workdir, stream=io.StringIO())
    for name in ("pretrained.safetensors", "merged/ties.safetensors"):
        (workdir / name).write_bytes(b"not a checkpoint")
    (workdir / "notes.txt").write_text("mine")
    assert run_demo(size="small", workdir=workdir, stream=io.StringIO()) == first
    assert ladle.load(workdir / "pretrained.safetensors")["head.weight"].shape == (16, 64)
    assert ladle.load(workdir / "merged" / "ties.safetensors")["head.weight"].shape == (5, 64)
    assert (workdir / "notes.txt").read_text() == "mine"
    written = {p for p in workdir.rglob("*.safetensors")}
    assert written == set(ladle.demo._outputs(workdir, ladle.demo.SIZES["small"]))  # checked


class Training(NamedTuple):
    start: dict[str, torch.Tensor]  # the model's state when the training began
    trained: set[str]  # the parameters it trains
    data: Data
    steps: int
    lr: float
    weight_decay: float
    seed: int
    threads: int


class DemoRun(NamedTuple):
    rows: list[DemoRow]
    table: str
    workdir: Path
    trainings: list[Training]
    val: Data
    test: Data
    ood: Data
    threads_after: int


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The small demo of seed 3 (whose greedy selections leave models out), with what it
    trained and scored with."""
    trainings, splits = [], {}
    train, merge_and_score = ladle.demo._train, ladle.demo._merge_and_score

    def spy_train(model, data, *, steps, lr, weight_decay=0.0, seed, parameters=None):
        names = {id(p): k for k, p in model.named_parameters()}
        trained = {names[id(p)] for p in (model.parameters() if parameters is None else parameters)}
        start = {k: v.clone() for k, v in model.state_dict().items()}
        threads = torch.get_num_threads()
        trainings.append(Training(start, trained, data, steps, lr, weight_decay, seed, threads))
        train(
            model,
            data,
            steps=steps,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            parameters=parameters,
        )

    def spy_merge_and_score(model, runs, base, workdir, device, val, test, ood):
        splits.update(val=val, test=test, ood=ood)
        return merge_and_score(model, runs, base, workdir, device, val, test, ood)

    workdir, stream = tmp_path_factory.mktemp("demo"), io.StringIO()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ladle.demo, "_train", spy_train)
        patch.setattr(ladle.demo, "_merge_and_score", spy_merge_and_score)
        torch.set_num_threads(3)
        try:
            rows = run_demo(size="small", seed=3, workdir=workdir, stream=stream)
            threads_after = torch.get_num_threads()
        finally:
            torch.set_num_threads(threads)
    return DemoRun(
        rows, stream.getvalue(), workdir, trainings, **splits, threads_after=threads_after
    )


def _accuracy_of(state_dict, data):
    """The fraction of ``data`` the MLP of ``state_dict`` classifies right, written out."""
    w = {k: t.float() for k, t in state_dict.items()}
    hidden = F.relu(F.linear(data.x, w["features.0.weight"], w["features.0.bias"]))
    hidden = F.relu(F.linear(hidden, w["features.2.weight"], w["features.2.bias"]))
    logits = F.linear(hidden, w["head.weight"], w["head.bias"])
    return float((logits.argmax(dim=1) == data.y).float().mean())


def _fine_tunings(workdir):
    """The target fine-tunings, in the order the demo trains them: pre-trained init first."""
    return sorted(workdir.glob("ft-pretrained-*.safetensors")) + sorted(
        workdir.glob("ft-aux-*.safetensors")
    )


def test_every_row_scores_the_file_it_names_on_held_out_and_unseen_domain_samples(demo_run):
    runs = _fine_tunings(demo_run.workdir)
    scores = [_accuracy_of(ladle.load(path), demo_run.val) for path in runs]
    best = runs[scores.index(max(scores))]  # the first of the best on validation
    merged = demo_run.workdir / "merged"
    names = ["uniform-soup", "greedy-soup", "ratatouille", "ratatouille-greedy", "model-stock"]
    files = [
        demo_run.workdir / "init-pretrained.safetensors",  # the linear probe
        best,
        *(merged / f"{name}.safetensors" for name in [*names, "task-arithmetic", "ties"]),
    ]
    assert len(demo_run.rows) == len(files)
    for row, path in zip(demo_run.rows, files):
        state_dict = ladle.load(path)
        expected = (_accuracy_of(state_dict, demo_run.test), _accuracy_of(state_dict, demo_run.ood))
        assert (row.in_domain, row.out_of_domain) == expected, row.method


def test_greedy_selections_and_the_task_arithmetic_scale_are_chosen_on_validation(demo_run):
    def on_validation(state_dict):
        return _accuracy_of(state_dict, demo_run.val)

    soups = sorted(demo_run.workdir.glob("ft-pretrained-*.safetensors"))
    aux = sorted(demo_run.workdir.glob("ft-aux-*.safetensors"))
    base = demo_run.workdir / "init-pretrained.safetensors"
    greedy = ladle.greedy_soup(soups, on_validation)
    greedy_aux = ladle.ratatouille(aux, selection="greedy", evaluate=on_validation)
    assert 1 <= len(greedy.selected) < len(soups) and len(greedy_aux.selected) < len(aux)
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    scale = max(grid, key=lambda s: on_validation(ladle.task_arithmetic(soups, base, scale=s)))
    expected = [
        ("greedy soup", "greedy-soup", greedy.state_dict, len(greedy.selected)),
        ("ratatouille (greedy)", "ratatouille-greedy", greedy_aux.state_dict,
         len(greedy_aux.selected)),
        ("Model Stock", "model-stock", ladle.model_stock(soups, base), len(soups)),
        (f"task arithmetic (scale {scale})", "task-arithmetic",
         ladle.task_arithmetic(soups, base, scale=scale), len(soups)),
        ("TIES (density 0.2, scale 1)", "ties", ladle.ties(soups, base), len(soups)),
    ]  # fmt: skip
    rows = {row.method: row for row in demo_run.rows}
    for method, name, result, count in expected:
        assert rows[method].models == count, method
        written = ladle.load(demo_run.workdir / "merged" / f"{name}.safetensors")
        assert all(torch.equal(written[k], result[k]) for k in result), method


def _same(state_dict, other):
    """Whether ``state_dict`` holds every tensor of ``other``, equal."""
    return all(torch.equal(state_dict[k], v) for k, v in other.items())


def test_every_training_starts_where_the_docs_say_and_runs_on_one_thread(demo_run):
    pretrained = ladle.load(demo_run.workdir / "pretrained.safetensors")
    features = {k: v for k, v in pretrained.items() if k.startswith("features.")}
    everything = set(pretrained)
    runs = _fine_tunings(demo_run.workdir)
    pretraining, *aux, probe = demo_run.trainings[: -len(runs)]
    fine_tunings = demo_run.trainings[-len(runs) :]
    assert pretraining.start["head.weight"].shape == (16, 64) and pretraining.trained == everything
    assert len(aux) == len(list(demo_run.workdir.glob("aux-*.safetensors")))
    for training in [*aux, probe]:  # the auxiliary tasks and the probe: pre-trained features
        assert _same(training.start, features)
    assert [t.trained for t in aux] == [everything] * len(aux)
    assert probe.trained == {"head.weight", "head.bias"}  # a linear probe: the head alone

    inits = {p.name: ladle.load(p) for p in demo_run.workdir.glob("init-*.safetensors")}
    started = [[n for n, init in inits.items() if _same(t.start, init)] for t in fine_tunings]
    assert all(len(names) == 1 for names in started)  # each from one init, every init used
    assert {names[0] for names in started} == set(inits)
    assert all(t.trained == everything and t.data is probe.data for t in fine_tunings)
    from_pretrained = [
        t for t, names in zip(fine_tunings, started) if names == ["init-pretrained.safetensors"]
    ]
    hypers = [(t.lr, t.steps, t.weight_decay) for t in from_pretrained]
    assert len(set(hypers)) == len(hypers) > 1 and any(t.weight_decay > 0 for t in from_pretrained)
    assert len({t.seed for t in fine_tunings}) == len(fine_tunings)  # each its own data order

    for split in (demo_run.val, demo_run.test, demo_run.ood):  # no training sample is scored
        assert torch.cdist(probe.data.x, split.x).min() > 0
    assert {t.threads for t in demo_run.trainings} == {1} and demo_run.threads_after == 3


def _class_means(features, labels):
    """The mean ``features`` of each of the 5 classes."""
    return torch.stack([features[labels == c].mean(dim=0) for c in range(5)])


def _distance(means, other):
    return float((means - other).norm(dim=1).mean())


def test_each_of_three_training_domains_and_the_unseen_one_has_class_codes_of_its_own(demo_run):
    # A split of the training domains holds the samples of each domain in turn. A class's
    # code in a domain, the mean of its spurious features (the last 8), is drawn with a spread
    # of 1.5 a feature: codes of two domains lie about 6 apart, one domain's splits within 1.
    def domains(split):
        return list(zip(split.x.chunk(3), split.y.chunk(3)))

    val, test = (
        [_class_means(x[:, -8:], y) for x, y in domains(split)]
        for split in (demo_run.val, demo_run.test)
    )
    ood = _class_means(demo_run.ood.x[:, -8:], demo_run.ood.y)
    for d, codes in enumerate(val):
        assert _distance(codes, test[d]) < 1.5
        assert all(_distance(codes, other) > 3 for other in [*test[:d], *test[d + 1 :], ood])
        assert float(torch.pdist(codes).min()) > 1.5  # the code predicts the class
    assert float(torch.pdist(ood).min()) > 1.5
    for x, y in domains(demo_run.val):  # and so does the latent point behind the others
        assert float(torch.pdist(_class_means(x[:, :-8], y)).mean()) > 3.5
    assert len(demo_run.val.y) == len(demo_run.test.y)
    assert not torch.equal(demo_run.val.x, demo_run.test.x)


def test_the_table_names_the_documented_problem_and_model(demo_run):
    assert demo_run.table.splitlines()[0] == (
        "ladle demo (seed 3): 3 training domains, 1 unseen test domain, 5 classes; MLP 24-64-64-5"
    )
    merged = ladle.load(demo_run.workdir / "merged" / "uniform-soup.safetensors")
    shapes = {k: tuple(v.shape) for k, v in merged.items()}
    assert shapes == {
        "features.0.weight": (64, 24),
        "features.0.bias": (64,),
        "features.2.weight": (64, 64),
        "features.2.bias": (64,),
        "head.weight": (5, 64),
        "head.bias": (5,),
    }


def test_a_size_or_workdir_of_the_wrong_kind_is_named():
    # "unhashable type: 'list'", "expected str, bytes or os.PathLike object, not int"
    from ladle.demo import run_demo

    with pytest.raises(ValueError, match=r"^size: expected one of"):
        run_demo(size=["x"])
    with pytest.raises(TypeError, match=r"^workdir: expected a path, found int$"):
        run_demo(workdir=3)


# --- pinned by mutation testing (round 4): each fails on the mutant named -------------------


def test_an_empty_workdir_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.setattr(ladle.demo, "_run", None)  # never reached
    with pytest.raises(ValueError, match="^workdir: expected a path, found an empty one$"):
        run_demo(size="small", workdir="", stream=io.StringIO())  # M04: ran in "."


def test_a_broken_link_where_the_merged_folder_goes_is_one_error_before_training(
    tmp_path, monkeypatch
):
    (tmp_path / "merged").symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(ladle.demo, "_train", None)  # never reached
    with pytest.raises(ladle.LadleError, match="merged: the demo writes a directory there"):
        run_demo(size="small", workdir=tmp_path, stream=io.StringIO())  # M07: FileExistsError


def test_the_target_fine_tunings_take_every_setting_of_hyper_parameters_in_turn(
    tmp_path, monkeypatch
):
    # The default size trains 14 target fine-tunings: all 8 settings, then the first 6 again
    # (M11: a cycle of 5 left 3 unused). Training is skipped: only its arguments are kept.
    calls = []

    def train(model, data, *, steps, lr, weight_decay=0.0, seed, parameters=None):
        calls.append((seed, lr, steps, weight_decay))

    monkeypatch.setattr(ladle.demo, "_train", train)
    run_demo(size="default", workdir=tmp_path, stream=io.StringIO())
    size = ladle.demo.SIZES["default"]
    count = size.pretrained_runs + size.aux_tasks * size.runs_per_aux
    targets = [call[1:] for call in calls if call[0] >= 1000]  # seeds seed + 1000 + number
    assert targets == [(lr, steps, wd) for lr, steps, wd in ladle.demo.HYPER * 2][:count]
    assert count == 14 and size.step_scale == 1.0


def test_progress_goes_nowhere_when_standard_error_is_closed(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", None)  # 2>&-
    ladle.demo._log("hello")
    assert capsys.readouterr().out == ""  # M13: print(file=None) wrote it to stdout
