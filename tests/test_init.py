"""The package itself: its public names, imported on first use, and what ``import ladle``
alone costs."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import ladle


def _run(code: str) -> str:
    """``code`` run by a fresh interpreter (nothing imported yet); its standard output."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_public_name_is_the_object_its_module_defines():
    assert set(ladle._PUBLIC) | {"__version__", "distributed"} == set(ladle.__all__)
    for name, module in ladle._PUBLIC.items():
        assert getattr(ladle, name) is getattr(importlib.import_module(f"ladle.{module}"), name)
    assert ladle.distributed is importlib.import_module("ladle.distributed")
    assert set(ladle.__all__) <= set(dir(ladle))


def test_star_import_gives_every_public_name():
    names: dict[str, object] = {}
    exec("from ladle import *", names)
    assert set(ladle.__all__) <= set(names)
    assert names["ties"] is ladle.ties


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="module 'ladle' has no attribute 'merge_all'"):
        ladle.merge_all  # noqa: B018
    with pytest.raises(ImportError, match="merge_all"):
        exec("from ladle import merge_all", {})
    assert not hasattr(ladle, "__wrapped__")  # inspect and doctest ask for such names
    assert not hasattr(ladle, "a.b") and getattr(ladle, "cli.main", None) is None


def test_importing_ladle_and_parsing_a_command_line_load_no_torch():
    # `ladle --help` answers at once: torch takes a second or more to load. (The values of
    # --density, --dtype, ... are checked by the API's own functions, which import it.)
    loaded = _run(
        "import contextlib, io, sys, ladle, ladle.cli\n"
        "ladle.cli.build_parser().parse_args(['ties', 'a', 'b', '--base', 'c', '-o', 'o'])\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    ladle.cli.main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))\n"
    )
    assert loaded == "[]\n"


def test_submodules_are_reached_from_a_plain_import():
    # As when the package imported them all: `import ladle` then `ladle.engine.fold`.
    out = _run(
        "import ladle\n"  # the methods first: other modules import them
        "print(ladle.methods.ties.magnitude_thresholds.__module__, ladle.methods.soup.__name__)\n"
        "print(ladle.engine.__name__, ladle.distributed.merge.__module__, ladle.testing.__name__)"
    )
    assert out.splitlines() == [
        "ladle.methods.ties ladle.methods.soup",
        "ladle.engine ladle.distributed ladle.testing",
    ]
