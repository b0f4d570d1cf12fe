from __future__ import annotations

import io
import sys

import pytest
import torch

import ladle
from ladle.cli import main
from ladle.demo import run_demo

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
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
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


def test_demo_is_deterministic_for_a_seed(tmp_path):
    first = run_demo(size="small", seed=1, workdir=tmp_path / "a", stream=io.StringIO())
    second = run_demo(size="small", seed=1, workdir=tmp_path / "b", stream=io.StringIO())
    assert first == second


def test_rows_for_methods_with_a_base_appear_exactly_when_ladle_has_them(monkeypatch):
    for name in ("model_stock", "task_arithmetic", "ties"):
        monkeypatch.delattr(ladle, name, raising=False)
    rows = run_demo(size="small", stream=io.StringIO())
    assert [row.method for row in rows] == BASE_ROWS

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


def test_a_workdir_that_is_a_file_is_one_error_line(tmp_path, capsys):
    from ladle.cli import main

    (tmp_path / "afile").write_text("mine")
    assert main(["demo", "--size", "small", "--workdir", str(tmp_path / "afile")]) == 1
    err = capsys.readouterr().err
    assert err.endswith("afile: the demo's workdir must be a directory; this is a file\n")
    assert (tmp_path / "afile").read_text() == "mine"
