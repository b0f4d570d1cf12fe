from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("script", "rows"),
    [
        ("soup_in_training_loop.py", ["best single run", "uniform soup of 6", "greedy soup of"]),
        ("ratatouille.py", ["target run 0", "ratatouille (uniform)", "ratatouille (greedy"]),
    ],
)
def test_example_runs_at_a_reduced_size_and_prints_its_table(
    script, rows, monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr(sys, "argv", [script, "--steps", "20"])
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # the scripts seed the global generator
            runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for row in rows:
        assert row in out
