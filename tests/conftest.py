"""Shared test helpers: small model families and a naive reference."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import ladle

# Timings on shared CI machines vary too much for per-example deadlines. The default keeps
# CI short; `pytest --hypothesis-profile thorough` tries 500 examples per property.
settings.register_profile("ladle", deadline=None, max_examples=40)
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile("ladle")


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_under_pytest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Temporary files of the tests, of the processes they start (``torchrun``) and of the
    docstring examples run after them (``tempfile.mkdtemp()``) go under pytest's own base
    directory, which pytest prunes to the last three runs, instead of piling up in the
    system's. Session-wide: it stays in place until the last test of the run."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    before = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield
    if before[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before[0]
    tempfile.tempdir = before[1]


SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,), "head.weight": (2, 4), "scalar": ()}


def family(n: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict]:
    """``n`` models sharing keys and shapes, with an integer buffer."""
    gen = torch.Generator().manual_seed(seed)
    models = []
    for i in range(n):
        model = {k: torch.randn(s, generator=gen).to(dtype) for k, s in SHAPES.items()}
        model["bn.num_batches_tracked"] = torch.tensor(100 + i)
        models.append(model)
    return models


@st.composite
def families(draw: st.DrawFn, min_n: int = 1, max_n: int = 5) -> list[dict]:
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return family(n, seed=seed, dtype=dtype)


def save_all(models, directory) -> list[Path]:
    """Save each model as ``directory/m{i}.safetensors``; return the paths."""
    paths = []
    for i, model in enumerate(models):
        save_file(model, directory / f"m{i}.safetensors")
        paths.append(directory / f"m{i}.safetensors")
    return paths


def assert_close_by_dtype(actual, expected, *, precise, low, precise_dtypes=(torch.float32,)):
    """Same keys in order and dtypes; ``precise_dtypes`` within ``precise`` (rtol, atol), other
    floating dtypes (one rounding of a float32 result) within ``low``, the rest equal."""
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        if value.dtype in precise_dtypes:
            torch.testing.assert_close(actual[key], value, rtol=precise[0], atol=precise[1])
        elif value.is_floating_point():
            torch.testing.assert_close(actual[key].float(), value.float(), rtol=low[0], atol=low[1])
        else:
            assert torch.equal(actual[key], value)


def recording_bar(calls: list) -> type:
    """A tqdm-like class (a method's ``progress``) that records into ``calls``: ``("init",
    total, unit)`` when made, ``("update", n)``, then ``("close",)``."""

    class Bar:
        def __init__(self, total, **kwargs):
            calls.append(("init", total, kwargs["unit"]))

        def update(self, n):
            calls.append(("update", n))

        def close(self):
            calls.append(("close",))

    return Bar


def assert_bit_for_bit(actual, expected):
    """Same key set, and every tensor equal in dtype and in every bit."""
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


class DictCheckpoint(ladle.Checkpoint):
    """A user's own checkpoint over a dict of tensors: only what the docs ask a subclass to
    implement (``keys``, ``shape``, ``dtype``, ``get_slice``)."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str = "user's") -> None:
        self.name, self.metadata, self.tensors = name, {}, tensors

    def keys(self):
        return list(self.tensors)

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def dtype(self, key):
        return self.tensors[key].dtype

    def get_slice(self, key, rows):
        tensor = self.tensors[key]
        return tensor if tensor.dim() == 0 else tensor[rows]


DEAD_PID = 999_999_999
"""A process id above any pid_max (at most 2²² on Linux): no process has it."""


def leftover(out: Path, *, host: str | None = None, mark: str = ".ladle-tmp-") -> Path:
    """The name that a write to ``out`` by process :data:`DEAD_PID` on ``host`` (default:
    this one) gives its temporary output (``mark`` ``.ladle-old-``: the output it replaces),
    as the writer names it there; nothing is made."""
    from ladle.writer import TEMP_MARK, _temporary_beside

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "getpid", lambda: DEAD_PID)
        if host is not None:
            patch.setattr(socket, "gethostname", lambda: host)
        made = _temporary_beside(out)
    return made.with_name(made.name.replace(TEMP_MARK, mark))
