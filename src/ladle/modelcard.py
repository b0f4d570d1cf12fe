"""What a merged directory holds besides its weights: loader files and a model card.

A directory output is meant to load with ``transformers``: the config, generation config and
tokenizer files of the base (or first) input are copied beside the weights when that input is
a model directory (local, or a Hub snapshot), and a ``README.md`` model card records the
merge: YAML front matter (``base_model``, ``base_model_relation: merge``, ``tags``), the
method, parameters, inputs with their resolved revisions, and a recipe that ``ladle run``
reproduces.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ._version import __version__
from .checkpoint import Checkpoint, model_folder, recorded_name
from .errors import CheckpointError
from .hub import COMPANION_FILES, COMPANION_FOLDERS, LICENSE_FILES, PREFIX, parse_hf_url
from .writer import DEFAULT_MAX_SHARD_SIZE, _is_utf8, parse_size

__all__ = ["LICENSE_FIELDS", "companion_files", "license_fields", "model_card", "output_files"]


def companion_files(directory: Path | None) -> dict[str, Path]:
    """Loader files directly inside ``directory`` (none if it is not a folder): config,
    tokenizer and processor files (:data:`~ladle.hub.COMPANION_FILES`), license texts and
    use policies (:data:`~ladle.hub.LICENSE_FILES`), the custom code a config's ``auto_map``
    names, and named chat template folders.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("config.json", "LICENSE", "model.safetensors", "README.md"):
        ...     _ = (folder / name).write_text("x")
        >>> sorted(companion_files(folder))
        ['LICENSE', 'config.json']
    """
    if directory is None or not directory.is_dir():
        return {}
    files = _files_matching(directory, (*COMPANION_FILES, *LICENSE_FILES))
    for module in sorted(_custom_code(files.values())):
        if (directory / f"{module}.py").is_file():
            files[f"{module}.py"] = directory / f"{module}.py"
    for folder in COMPANION_FOLDERS:  # named chat templates (transformers' CHAT_TEMPLATE_DIR)
        if (directory / folder).is_dir():
            files[folder] = directory / folder
    for file in files.values():  # copied as the output is committed: refused now, named
        _check_readable(file)
    return files


def _check_readable(path: Path) -> None:
    """A ``CheckpointError`` naming ``path`` (a file or folder that goes beside an output)
    where it cannot be read: the copy failed after the merge, blamed on the output."""
    try:
        if path.is_dir():  # each entry too: copied whole
            for entry in os.listdir(path):
                _check_readable(path / entry)
            return
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as err:
        raise CheckpointError(
            f"{path}: cannot read it ({err.strerror or err}); it is copied beside the output"
        ) from err
    if not path.is_file():  # a named pipe, a device: no file to copy
        raise CheckpointError(f"{path}: not a regular file; it is copied beside the output")


def _files_matching(directory: Path, patterns: Sequence[str]) -> dict[str, Path]:
    """The files directly inside ``directory`` whose names match one of ``patterns``, by name,
    in sorted order."""
    return {
        path.name: path
        for path in sorted(directory.iterdir())
        if path.is_file() and any(fnmatch.fnmatchcase(path.name, p) for p in patterns)
    }


def _custom_code(configs: Iterable[Path]) -> set[str]:
    """The local modules the ``auto_map`` of the JSON files ``configs`` names
    (``"modeling_x.MyModel"`` names ``modeling_x``; ``"org/repo--m.C"`` lives elsewhere)."""
    modules: set[str] = set()
    for config in configs:
        if config.suffix != ".json":
            continue
        try:
            auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map", {})
        except (OSError, ValueError, AttributeError, RecursionError):  # not a JSON object
            continue
        values = auto_map.values() if isinstance(auto_map, dict) else []
        for value in values:
            for name in value if isinstance(value, list) else [value]:
                module = name.rsplit(".", 1)[0] if isinstance(name, str) and "." in name else ""
                # A plain module name only: "--" names another repo's code, and anything
                # with a path in it ("../x") is not a file beside the config.
                if re.fullmatch(r"[A-Za-z_]\w*", module):
                    modules.add(module)
    return modules


def _repo_id(name: str) -> str:
    """``owner/repo`` for a Hub input (its card's ``base_model``), else the name as is."""
    if name.startswith(PREFIX):
        return parse_hf_url(name).repo_id
    return name


def _toml(value: object) -> str:
    """``value`` as a TOML value (strings, numbers, booleans, lists, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    # A basic string: JSON's escapes are TOML's, but TOML also forbids a raw DEL.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _yaml_list(key: str, items: Sequence[str]) -> str:
    # JSON strings are valid YAML double-quoted scalars, once DEL (not printable) is escaped.
    return f"{key}:\n" + "".join(f"- {_toml(item)}\n" for item in items)


def model_card(
    method: str,
    parameters: Mapping[str, object],
    models: Sequence[str],
    base: str | None = None,
    *,
    title: str = "Merged model",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    license: Mapping[str, str] | None = None,
) -> str:
    """The ``README.md`` of a merged model: YAML front matter, inputs, parameters, recipe.

    Args:
        method: the merge method's name, e.g. ``"uniform_soup"``.
        parameters: the method's parameters as recorded in the output's provenance.
        models: the inputs' names (Hub inputs as ``hf://owner/repo@<commit>``; local ones
            relative to the folder holding the output, or absolute: the recipe is read
            from there).
        base: the base model's name, if the method has one.
        title: the card's heading.
        dtype: the output dtype the merge was asked for (``dtype=``), if any: the recipe
            asks for it too.
        max_shard_size: the output's largest shard, if not the default: the recipe asks for
            it too, and writes the same shards.
        license: front matter lines to put first, ``{"license": "apache-2.0"}``: the
            ``license``, ``license_name`` and ``license_link`` of the card of the input whose
            config is copied (:func:`license_fields`), as YAML values written there.

    Returns:
        The card's text.

    Example:
        >>> card = model_card("uniform_soup", {"weights": [0.5, 0.5]},
        ...                   ["hf://org/a@" + "1" * 40, "models/b"])
        >>> print(card.split("---")[1].strip())  # a local folder is no Hub repo id
        base_model:
        - "org/a"
        base_model_relation: merge
        tags:
        - "merge"
        - "ladle"
    """
    sources = ([base] if base is not None else []) + list(models)
    in_memory = [name for name in sources if name.startswith("<")]  # "<state dict>", modules
    # The Hub takes only repo ids in base_model: local files and folders are left out. A
    # greedy selection's output holds the models it kept, and nothing of the others.
    kept = _selected(parameters, models)
    ancestors = ([base] if base is not None else []) + list(models if kept is None else kept)
    base_models = list(dict.fromkeys(_repo_id(n) for n in ancestors if n.startswith(PREFIX)))
    # base_model_relation: the Hub guesses the relation to a single base model from the
    # files ("finetune" for a config and weights); every ladle output is a merge.
    lineage = _yaml_list("base_model", base_models) + "base_model_relation: merge\n"
    terms = "".join(f"{field}: {value}\n" for field, value in (license or {}).items())
    lines = [
        "---",
        terms + (lineage if base_models else "") + _yaml_list("tags", ["merge", "ladle"]).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"This model was merged with [ladle](https://pypi.org/project/ladle/) {__version__} "
        f"using **{method}**.",
        "",
        "## Inputs",
        "",
        "| role | source | revision |",
        "| --- | --- | --- |",
    ]
    for role, name in ([("base", base)] if base is not None else []) + [
        (f"model {i}", name) for i, name in enumerate(models)
    ]:
        source = parse_hf_url(name) if name.startswith(PREFIX) else None
        shown = (
            name if source is None else "/".join(filter(None, [source.repo_id, source.subfolder]))
        )
        revision = source.revision if source is not None else None
        lines.append(
            f"| {role} | {_code_cell(shown)} | {_code_cell(revision) if revision else '-'} |"
        )
    lines += ["", "## Parameters", ""]
    lines += [f"- `{key}`: `{json.dumps(value, default=str)}`" for key, value in parameters.items()]
    if not parameters:
        lines.append("None.")
    from .recipe import METHODS  # recipe imports this module's neighbours: imported here

    lines += ["", "## Recipe", ""]
    if method not in METHODS:  # a method of the user's own (ladle.engine.merge with a Kernel)
        lines += [
            f"`{method}` is no method of ladle's, which recipes name: no recipe can reproduce "
            "this merge.",
            "",
        ]
    elif in_memory:
        lines += ["Some inputs were in memory, not files: no recipe can reproduce this merge.", ""]
    else:
        output = _replay_output(title, sources)
        recipe = _recipe(method, parameters, models, base, dtype, max_shard_size, output)
        lines += [
            "To reproduce this merge, save this recipe as `recipe.toml` beside this model's",
            "folder (relative paths below are relative to the folder holding both; `~` is the",
            "home folder) and run `ladle run recipe.toml` (no recipe file was written); it",
            f"writes `{output}` there:",
            "",
        ]
        if not all(_is_utf8(name) for name in sources):  # a path's undecodable bytes
            lines += [
                "An input's file name is no UTF-8 text, written below by its escapes, which",
                "TOML cannot hold: rename that file, and the name in the recipe, to run it.",
                "",
            ]
        lines += ["```toml", *recipe, "```", ""]
    return "\n".join(lines)


def _replay_output(title: str, sources: Sequence[str]) -> str:
    """Where a card's recipe writes: ``replayed``, else ``replayed-2``, ...: a name that is
    not the merge's own output (replaying would write over the model it reproduces) nor the
    first folder of a local input's relative path (a recipe never writes over its inputs).

    Example:
        >>> _replay_output("merged", ["replayed/a", "b"]), _replay_output("out", ["a"])
        ('replayed-2', 'replayed')
    """
    taken = {title} | {
        Path(name).parts[0] for name in sources if name and not name.startswith(PREFIX)
    }
    name, number = "replayed", 1
    while name in taken:
        number += 1
        name = f"replayed-{number}"
    return name


def _code_cell(text: str) -> str:
    """``text`` as a code span in a cell of a Markdown table, shown as it is: where it holds
    a line break or another unprintable character (which would end the table's row), as
    ``repr`` writes it; a ``|`` in it escaped (else it ends the cell, even in a code span);
    fenced by more backticks than any run of them it holds (padded where it starts or ends
    with one).

    Example:
        >>> print(_code_cell("runs/a|b"), _code_cell("x`y"), _code_cell("ckpt\\nA"))
        `runs/a\\|b` ``x`y`` `'ckpt\\nA'`
    """
    text = (text if text.isprintable() else repr(text)).replace("|", "\\|")
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _selected(parameters: Mapping[str, object], models: Sequence[str]) -> list[str] | None:
    """The models a greedy selection kept, in the order it added them (``selected``
    recorded: greedy soup, ratatouille's ``selection="greedy"``); ``None`` for other merges.

    Example:
        >>> _selected({"selected": [2, 0], "score": 0.9}, ["a", "b", "c"]), _selected({}, ["a"])
        (['c', 'a'], None)
    """
    selected = parameters.get("selected")
    if isinstance(selected, list) and all(isinstance(i, int) for i in selected):
        return [models[i] for i in selected]
    return None


def _recipe(
    method: str,
    parameters: Mapping[str, object],
    models: Sequence[str],
    base: str | None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    output: str = "replayed",
) -> list[str]:
    """The lines of a recipe that ``ladle run`` accepts and that gives this merge's weights
    (in ``dtype``, when the merge asked for one) at ``output``, in shards of
    ``max_shard_size`` unless it is the default.

    Only the method's own parameters go under ``[parameters]`` (provenance also records
    constants such as Model Stock's ``eps``), ``allow_nonfinite`` among them where the merge
    let NaN or Inf through. A greedy selection (``selected`` recorded)
    becomes the uniform soup of the models it kept: re-running the selection would need the
    user's ``evaluate``, which no file records.
    """
    import ladle  # the methods' signatures; imported here, as ladle imports this module

    comments: list[str] = []
    greedy = _selected(parameters, models)
    if greedy is not None:
        selected = parameters["selected"]
        comments = [
            f"# The greedy selection ({method}) kept models {selected}; this averages them, as",
            "# its output does (up to float32 rounding: the selection folds a running mean).",
            "# Re-running the selection needs your evaluate function.",
        ]
        nonfinite = {k: v for k, v in parameters.items() if k == "allow_nonfinite"}
        method, models, base, parameters = "uniform_soup", greedy, None, nonfinite
    function = getattr(ladle, method, None)
    taken = inspect.signature(function).parameters if function is not None else {}
    kept = {k: v for k, v in parameters.items() if k in taken and k != "evaluate"}
    recipe = [*comments, f"method = {_toml(method)}"]
    if base is not None:
        recipe.append(f"base = {_toml(base)}")
    recipe += [f"models = {_toml(list(models))}", f"output = {_toml(output)}"]
    if dtype is not None:
        from .recipe import DTYPES  # recipe imports this module's neighbours: imported here

        name = str(dtype).removeprefix("torch.")
        if DTYPES.get(name) == dtype:
            recipe.append(f"dtype = {_toml(name)}")
        else:
            recipe.append(f"# merged into {name}, which a recipe cannot name: convert after it")
    if max_shard_size is not None and parse_size(max_shard_size) != parse_size(
        DEFAULT_MAX_SHARD_SIZE
    ):
        recipe.append(f"max_shard_size = {_toml(max_shard_size)}")
    if kept:
        recipe += ["", "[parameters]"]
        recipe += [f"{_toml(str(k))} = {_toml(v)}" for k, v in kept.items()]
    return recipe


LOADING_PATHS = {"config.json": "_name_or_path", "tokenizer_config.json": "name_or_path"}
"""The field of each loader file that names where it was loaded from (a local path such as
``/home/NAME/ckpts/base``, or the base's repo id): left out of an output's copy, as
transformers leaves ``name_or_path`` out of the tokenizer files it saves, since it names
another model than the merge and may publish a user's folders."""


def _edited(file: Path, dtype: torch.dtype | None = None) -> Path | bytes:
    """``file`` as it goes beside the output: without its :data:`LOADING_PATHS` field (its
    sub-configs' too) and, with ``dtype``, a config whose dtype fields (its sub-configs' too)
    say it; the file itself where nothing changes or it is no JSON object (copied as it is,
    byte for byte)."""
    field = LOADING_PATHS.get(file.name)
    if field is None and dtype is None:
        return file
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeply
        return file
    if not isinstance(data, dict):
        return file
    # A composite model's sub-configs (text_config, vision_config...) hold both fields too:
    # transformers writes where each part was loaded from into it.
    parts = [data, *(value for value in data.values() if isinstance(value, dict))]
    if dtype is None and not any(field in part for part in parts):
        return file
    for part in parts:
        part.pop(field, None)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for key in [k for k in ("torch_dtype", "dtype") if k in data] or ["torch_dtype"]:
            data[key] = name
        for sub in parts[1:]:
            sub.update((key, name) for key in ("torch_dtype", "dtype") if key in sub)
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


LICENSE_FIELDS = ("license", "license_name", "license_link")
"""The model card metadata fields that say a model's license (the Hub's ``license``, and
``license_name`` / ``license_link`` for ``license: other``)."""


def license_fields(card: Path | None) -> dict[str, str]:
    """The :data:`LICENSE_FIELDS` of the YAML front matter of the model card ``card``, each
    as a YAML value to write (:func:`_yaml_value`); ``{}`` where the file is missing or
    unreadable, or its front matter is no YAML mapping. Read as huggingface_hub's
    ``metadata_load`` reads it (anchors resolved; a line inside a quoted value or a list is
    no field).

    Example:
        >>> import pathlib, tempfile
        >>> card = pathlib.Path(tempfile.mkdtemp()) / "README.md"
        >>> _ = card.write_text("---\\nlicense: other\\nlicense_name: x\\ntags: [a]\\n---\\n# M")
        >>> license_fields(card)
        {'license': 'other', 'license_name': 'x'}
    """
    if card is None:
        return {}
    try:
        with open(card, encoding="utf-8", errors="replace") as file:
            text = file.read(2**20)  # front matter comes first; a card may be long
    except OSError:
        return {}
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    # As huggingface_hub reads it (metadata_load): the block between the first "---" lines,
    # blank lines and a byte order mark before it allowed.
    block = REGEX_YAML_BLOCK.search(text.removeprefix("\ufeff"))
    if block is None:
        return {}
    try:
        data = yaml.safe_load(block.group(2))
    except Exception:  # no YAML (or a tag PyYAML cannot build): nothing of it is taken
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        field: written
        for field in LICENSE_FIELDS
        if (written := _yaml_value(data.get(field))) is not None
    }


_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9._+-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "null"}


def _yaml_value(value: object) -> str | None:
    """A license field's ``value`` (as YAML parsed it) written back as YAML: a plain word as
    it is (``apache-2.0``), other text as JSON with the characters YAML refuses raw escaped
    (``"a: b"``: YAML reads JSON's strings); a
    list of a few strings as a JSON list. ``None`` for anything else: no value, a number or
    date, a mapping, a list of other things or of more than :data:`_MOST` entries (aliases
    can make a short card hold a huge one), text longer than :data:`_LONGEST`."""
    if isinstance(value, str) and 0 < len(value) <= _LONGEST:
        if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
            return value
        return _unprintable_escaped(json.dumps(value, ensure_ascii=False))
    if (
        isinstance(value, list)
        and 0 < len(value) <= _MOST
        and all(isinstance(v, str) and len(v) <= _LONGEST for v in value)
    ):
        return _unprintable_escaped(json.dumps(value, ensure_ascii=False))
    return None


_UNPRINTABLE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")
"""What YAML reads only escaped (JSON escapes the controls below U+0020 itself), and the line
breaks it reads raw but folds into a space inside a quoted value (NEL, U+2028, U+2029): a
license link holding one was copied as another link."""


def _unprintable_escaped(dumped: str) -> str:
    """JSON text with the characters YAML refuses raw written as ``\\uXXXX`` (characters past
    U+FFFF stay themselves: escaped, they would be two halves YAML reads apart)."""
    return _UNPRINTABLE.sub(lambda found: f"\\u{ord(found.group()):04x}", dumped)


_MOST = 16
"""Most entries of a license field's list copied into an output card."""

_LONGEST = 1000
"""Longest license field (or entry of one) copied into an output card, in characters."""


def _terms_folder(reference: Checkpoint, folder: Path | None) -> Path | None:
    """The folder whose license files and model card give ``reference``'s terms: its own
    ``folder``, or, for a Hub subfolder (``hf://org/sd@<commit>/unet``) holding neither, the
    snapshot's root, where a repository keeps them."""
    if folder is None or not reference.name.startswith(PREFIX):
        return folder
    subfolder = parse_hf_url(reference.name).subfolder
    if not subfolder or (folder / "README.md").is_file() or _files_matching(folder, LICENSE_FILES):
        return folder
    return folder.parents[len(Path(subfolder).parts) - 1]


def output_files(
    method: str,
    parameters: Mapping[str, object],
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    *,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    config_dtype: torch.dtype | None = None,
) -> dict[str, Path | bytes]:
    """Files to place beside the weights of a directory output ``out``.

    The config and tokenizer files of the base (else model 0), when it is a model directory,
    and ``README.md`` (the model card). Keys are file names; values are files to copy or bytes.
    With ``dtype`` (the merge's output dtype), the config's ``torch_dtype`` (and ``dtype``)
    say it, as loaders that read the dtype from the config (``torch_dtype="auto"``) need;
    ``config_dtype``, where given, is the dtype the config says instead, with none asked for
    in the card's recipe (a greedy soup writes the dtypes of its best-ranked model).
    The config's ``_name_or_path`` and the tokenizer config's ``name_or_path`` (where the
    input was loaded from: :data:`LOADING_PATHS`) are left out; other files are copied as
    they are.
    ``max_shard_size`` (the output's) goes into the card's recipe.

    Example:
        >>> import json, pathlib, tempfile, torch, ladle
        >>> folder = ladle.save({"w": torch.ones(2)}, pathlib.Path(tempfile.mkdtemp()) / "m")
        >>> _ = (folder / "config.json").write_text('{"torch_dtype": "float32"}')
        >>> files = output_files("uniform_soup", {}, [ladle.open_checkpoint(folder)], None,
        ...                      out=folder.parent / "merged", dtype=torch.bfloat16)
        >>> sorted(files), json.loads(files["config.json"])
        (['README.md', 'config.json'], {'torch_dtype': 'bfloat16'})
    """
    reference = base if base is not None else models[0]
    folder = model_folder(reference)
    files: dict[str, Path | bytes] = dict(companion_files(folder))
    terms = _terms_folder(reference, folder)
    if terms is not None and terms is not folder:  # a Hub subfolder without terms: its repo's
        files |= _files_matching(terms, LICENSE_FILES)
    for name, file in list(files.items()):
        if name in LOADING_PATHS and isinstance(file, Path):
            said = config_dtype if config_dtype is not None else dtype
            files[name] = _edited(file, said if name == "config.json" else None)
    card = model_card(
        method,
        parameters,
        [recorded_name(m, out) for m in models],
        None if base is None else recorded_name(base, out),
        title=Path(out).name or "Merged model",
        dtype=dtype,
        max_shard_size=max_shard_size,
        license=license_fields(terms / "README.md" if terms is not None else None),
    )
    # A name that is no UTF-8 (a path's undecodable bytes, as lone surrogates) is written
    # as its escape (\udce9): a card is text, and its recipe names such a file no other way.
    files["README.md"] = card.encode("utf-8", "backslashreplace")
    return files
