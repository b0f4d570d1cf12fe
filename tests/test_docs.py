"""The docs against the code: every CLI option and every public name is documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import ladle
from ladle.cli import build_parser, merge_options

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """The long options of ``parser`` (and ``-o``), without ``--help``."""
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option not in ("-h", "--help") and (option.startswith("--") or option == "-o")
    }


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def test_every_option_of_the_ladle_command_is_in_docs_cli_md():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    synopsis = text.split("```text\n", 1)[1].split("```", 1)[0]
    missing = sorted(o for o in _options(build_parser()) if f"`{o}`" not in text)
    shared = _options(merge_options())
    missing += sorted(o for o in shared if not re.search(rf"`(-o, )?{o}\b", text))
    for name, command in _commands().items():
        line = next((ln for ln in synopsis.splitlines() if ln.startswith(f"ladle {name} ")), "")
        missing += [f"{name} {o}" for o in sorted(_options(command) - shared) if o not in line]
    assert not missing, f"options of `ladle --help` not in docs/cli.md: {missing}"


def test_every_public_name_is_in_the_docs():
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md")))
    missing = [name for name in ladle.__all__ if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert not missing, f"names in ladle.__all__ that no page of docs/ mentions: {missing}"
