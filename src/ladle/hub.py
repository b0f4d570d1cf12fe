"""Hugging Face Hub sources (``hf://owner/repo[@revision][/subfolder]``) through huggingface_hub.

A Hub source is resolved to a local snapshot in the Hugging Face cache by
``huggingface_hub.snapshot_download``, downloading only what a merge needs: the safetensors
weights (and their index), or the torch weights when a repo has no safetensors, plus the
config and tokenizer files. The revision (a branch, a tag or a commit hash) is resolved to a
commit hash, which names the opened checkpoint (``hf://owner/repo@<commit>``) and so is
recorded in the output's provenance. ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` / ``HF_HOME``,
``HF_ENDPOINT`` and ``HF_TOKEN`` (or the stored login) are honoured, read when a source is
opened; no token is ever printed.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shlex
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote

from ._version import __version__
from .checkpoint import (
    NOT_WEIGHTS,
    TORCH_SUFFIXES,
    Checkpoint,
    _some,
    is_trainer_state,
    shard_names,
    weights_layout,
)
from .errors import CheckpointError, LadleError, one_line, type_name

__all__ = [
    "COMPANION_FILES",
    "COMPANION_FOLDERS",
    "LICENSE_FILES",
    "HubSource",
    "fetched",
    "open_hub_checkpoint",
    "open_snapshot",
    "parse_hf_url",
    "pinned",
    "push_to_hub",
    "snapshot",
]

PREFIX = "hf://"

COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "*.model",
    "*.tiktoken",
)
"""Files beside the weights that a loader needs: config, tokenizer and processor files
(``*.model`` for sentencepiece tokenizers, ``*.tiktoken``). Custom code (``*.py``) is
fetched too, and copied to outputs only where a config's ``auto_map`` names it."""

LICENSE_FILES = (
    "LICENSE",
    "LICENSE.*",
    "LICENCE",
    "LICENCE.*",
    "NOTICE",
    "NOTICE.*",
    "USE_POLICY.md",
)
"""The license texts and use policies a model's terms ask redistributions to carry (Llama's
``LICENSE`` and ``USE_POLICY.md``, Apache's ``NOTICE``): fetched beside the weights and
copied to directory outputs like :data:`COMPANION_FILES`. The model card (``README.md``) is
fetched too, for its ``license`` fields, and never copied: the output gets a card of its own.
For a subfolder (``hf://org/sd/unet``) the repository root's are fetched too, and used where
the subfolder has none."""

COMPANION_FOLDERS = ("additional_chat_templates",)
"""Folders beside the weights that a loader reads (named chat templates, ``*.jinja``): fetched
from the Hub and copied whole into directory outputs."""

_OTHER_REPO_TYPES = ("datasets", "spaces", "buckets", "kernels")
_SPECIAL_REF = re.compile(r"refs/(?:pr/\d+|convert/[\w.-]+)(?=/|$)")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubSource(NamedTuple):
    """A parsed ``hf://`` source: repository id, revision (``None``: the default branch) and
    subfolder (``""``: the repository root).

    Example:
        >>> source = HubSource("org/model", "release/v2", "unet")
        >>> source.url()
        'hf://org/model@release%2Fv2/unet'
        >>> source.url("0123abcd" * 5)  # the commit it resolved to
        'hf://org/model@0123abcd0123abcd0123abcd0123abcd0123abcd/unet'
    """

    repo_id: str
    revision: str | None
    subfolder: str

    def url(self, revision: str | None = None) -> str:
        """The ``hf://`` form, with ``revision`` (e.g. the resolved commit) in place of ours.

        Example:
            >>> source = parse_hf_url("hf://org/model@release%2Fv2/text")
            >>> source.url(), source.url("0123abc")
            ('hf://org/model@release%2Fv2/text', 'hf://org/model@0123abc/text')
        """
        rev = self.revision if revision is None else revision
        text = PREFIX + self.repo_id
        if rev is not None:
            text += "@" + (rev if _SPECIAL_REF.fullmatch(rev) else rev.replace("/", "%2F"))
        return text + (f"/{self.subfolder}" if self.subfolder else "")


def parse_hf_url(url: str) -> HubSource:
    """Parse ``hf://owner/repo[@revision][/subfolder]`` (HfFileSystem's syntax, model repos).

    A revision is a branch, a tag or a commit hash; one holding ``/`` is written
    percent-encoded (``@release%2Fv1``), except ``refs/pr/N`` and ``refs/convert/NAME``, which
    are written as they are. A leading ``models/`` is accepted; datasets and spaces are not.

    Args:
        url: the source, starting with ``hf://``.

    Returns:
        A :class:`HubSource`.

    Raises:
        CheckpointError: the URL is malformed; the message shows the expected form.

    Example:
        >>> parse_hf_url("hf://org/model@v1.0/unet")
        HubSource(repo_id='org/model', revision='v1.0', subfolder='unet')
        >>> parse_hf_url("hf://org/model@refs/pr/3")
        HubSource(repo_id='org/model', revision='refs/pr/3', subfolder='')
    """
    usage = "expected hf://owner/repo[@revision][/subfolder]"
    if not isinstance(url, str):
        raise TypeError(f"url: expected a str, found {type_name(url)}")
    if not url.startswith(PREFIX):
        raise CheckpointError(f"{url}: not a Hugging Face Hub source; {usage}")
    rest = url[len(PREFIX) :].strip("/")
    if rest.startswith("models/"):
        rest = rest[len("models/") :]
    if rest.split("/", 1)[0] in _OTHER_REPO_TYPES:
        raise CheckpointError(f"{url}: only model repositories hold checkpoints; {usage}")
    parts = rest.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise CheckpointError(f"{url}: no repository id; {usage}")
    owner, name, tail = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
    revision: str | None = None
    if "@" in name:
        name, after = name.split("@", 1)
        after = f"{after}/{tail}" if tail else after
        special = _SPECIAL_REF.match(after)
        if special is None and after.startswith("refs/"):
            raise CheckpointError(
                f"{url}: revision {after!r}: expected refs/pr/N or refs/convert/NAME; {usage}"
            )
        if special is not None:
            revision, tail = special.group(0), after[special.end() :].lstrip("/")
        else:
            encoded, _, tail = after.partition("/")
            revision = unquote(encoded)
        if not revision:
            raise CheckpointError(f"{url}: empty revision after '@'; {usage}")
        _check_revision(url, revision)
    if "@" in owner or not name:
        raise CheckpointError(f"{url}: malformed repository id; {usage}")
    subfolder = "/".join(part for part in tail.split("/") if part)
    if any(part in (".", "..") for part in subfolder.split("/")):
        raise CheckpointError(f"{url}: subfolder may not contain '.' or '..'")
    _check_repo_id(url, f"{owner}/{name}")
    return HubSource(f"{owner}/{name}", revision, subfolder)


def _check_revision(url: str, revision: str) -> None:
    """A ``CheckpointError`` for a revision no branch, tag or commit can have: a ``.`` or
    ``..`` part, a leading ``/``, a backslash or a control character (git refuses them in
    ref names). huggingface_hub joins a revision into the cache's ``refs/`` folder unchecked:
    ``@%2Ftmp%2Fx`` or ``@..%2F..%2Fx`` named a file outside the cache.

    Example:
        >>> _check_revision("hf://o/m@v1", "v1")
        >>> _check_revision("hf://o/m@..%2Fx", "../x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ladle.errors.CheckpointError: hf://o/m@..%2Fx: revision '../x' is no branch, tag or ...
    """
    odd = any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in revision)
    dots = any(part in (".", "..") for part in revision.split("/"))
    if odd or dots or revision.startswith("/"):
        raise CheckpointError(
            f"{url}: revision {revision!r} is no branch, tag or commit (it has a '.' or '..' "
            "part, a leading '/', a backslash or a control character)"
        )


def _repo_id_problem(repo_id: str) -> str | None:
    """Why the Hub refuses ``repo_id`` (``a b/c``, ``org/m--x``), as huggingface_hub checks
    it, or ``None`` where it takes it.

    Example:
        >>> _repo_id_problem("org/model") is None, _repo_id_problem("org/a--b")
        (True, "malformed repository id 'org/a--b' (Cannot have -- or .. in repo_id)")
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        why = one_line(err).removesuffix(f": '{repo_id}'.")
        return f"malformed repository id {repo_id!r} ({why})"
    return None


def _check_repo_id(url: str, repo_id: str) -> None:
    """A ``CheckpointError`` naming ``url`` for a repo id the Hub refuses
    (:func:`_repo_id_problem`); huggingface_hub's own ``HFValidationError`` did not name the
    source, and escaped only when the repository was fetched."""
    problem = _repo_id_problem(repo_id)
    if problem is not None:
        raise CheckpointError(f"{url}: {problem}")


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now, or was when huggingface_hub was imported.

    huggingface_hub reads it (or ``TRANSFORMERS_OFFLINE``) once, at import, and from then on
    refuses every request while it was set, whatever the variable says later: unsetting it
    in a running program opens no connection, so ladle reads the cache alone then too
    (asking the Hub failed even for a source the cache holds). Set later, it takes effect
    when a source is opened (ladle keeps no state).
    """
    from huggingface_hub import constants

    return _env_flag("HF_HUB_OFFLINE") is True or bool(constants.HF_HUB_OFFLINE)


def _offline_variable() -> str:
    """The variable that makes huggingface_hub offline, for messages: ``TRANSFORMERS_OFFLINE``
    where it alone is set (huggingface_hub honours either), else ``HF_HUB_OFFLINE``."""
    if _env_flag("HF_HUB_OFFLINE") is not True and _env_flag("TRANSFORMERS_OFFLINE") is True:
        return "TRANSFORMERS_OFFLINE"
    return "HF_HUB_OFFLINE"


def _endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now, without the trailing ``/`` huggingface_hub strips from its
    own default but not from an ``endpoint=`` argument (``https://hf-mirror.com/`` asked
    ``https://hf-mirror.com//api/...``, which mirrors answer with 404); ``None`` if unset."""
    return (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None


def _cache_dir() -> str:
    """``HF_HUB_CACHE`` (or the older ``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME``/hub, as set
    now; else huggingface_hub's default."""
    from huggingface_hub import constants

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.path.expandvars(os.environ[name]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub")
    return str(constants.HF_HUB_CACHE)


def _patterns(prefix: str, names: tuple[str, ...] | list[str]) -> list[str]:
    return [prefix + name for name in names]


def _listed(repo_id: str, commit: str, subfolder: str) -> list[str]:
    """The names of the files directly in ``subfolder`` (``""``: the root) of ``repo_id`` at
    ``commit``, as the Hub lists them, and of the folders there, each with a ``/`` after it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    api = HfApi(
        endpoint=_endpoint(),
        library_name="ladle",
        library_version=__version__,
    )
    prefix = f"{subfolder}/" if subfolder else ""
    try:
        entries = list(api.list_repo_tree(repo_id, path_in_repo=subfolder or None, revision=commit))
    except EntryNotFoundError:  # a subfolder the repository lacks: no files
        return []
    return [
        entry.path[len(prefix) :] + ("/" if isinstance(entry, RepoFolder) else "")
        for entry in entries
        if isinstance(entry, (RepoFile, RepoFolder))
        and entry.path.startswith(prefix)
        and "/" not in entry.path[len(prefix) :]
    ]


def _weight_files(folder: Path, names: list[str], where: str) -> list[str]:
    """The files of ``folder`` that hold its weights, chosen from ``names`` (the folder's
    files, on the Hub or in the cache) as a directory is read (:func:`weights_layout`): an
    index's shards (the index itself is fetched with the JSON files), or the one file; none
    where there are none; a ``CheckpointError`` where no single one is there (variants)."""
    chosen, seen = weights_layout(names)
    if chosen is None:
        if seen:
            raise CheckpointError(
                f"{where}: expected one weights file or a *.index.json, found {_some(seen)}"
            )
        return []
    if chosen.endswith(".index.json"):
        try:
            return sorted(set(shard_names(folder / chosen).values()))
        except CheckpointError as err:  # named by the source, not by the cache's path
            raise type(err)(f"{where}: {err}") from err
    return [chosen]


def _answers(err: BaseException) -> Iterator[tuple[int, BaseException]]:
    """The HTTP statuses the Hub answered with, in ``err`` and what caused it, each with the
    error that carries it (none where no answer came: a network failure)."""
    cause: BaseException | None = err
    for _ in range(8):  # the chain's first links (a cycle would never end)
        if cause is None:
            return
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(status, int):
            yield status, cause
        cause = cause.__cause__ or cause.__context__


def _check_access(err: BaseException, url: str, repo_id: str) -> None:
    """A ``CheckpointError`` where the Hub answered ``err`` (or what caused it) with 401 or
    403: it was reached, and refused this login (a fine-grained token without the repository,
    a disabled repository); else nothing."""
    for status, cause in _answers(err):
        if status in (401, 403):
            raise CheckpointError(
                f"{url}: the Hub refused access to {repo_id} ({status}: "
                f"{one_line(cause)}); set HF_TOKEN or run `hf auth login` with "
                "an account that can read it"
            ) from err


def snapshot(url: str, *, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Fetch what a merge needs from ``url`` into the Hugging Face cache.

    Downloads (or, offline, finds in the cache) the config and tokenizer files, named chat
    templates (``additional_chat_templates/*.jinja``), then only the weights files a local
    folder holding the same files would be read from (:func:`~ladle.checkpoint.weights_layout`):
    a shard index's shards, or the one weights file (``model.safetensors`` beside variants).
    Files in other subfolders are never fetched, but for shards an index places below it.

    Args:
        url: ``hf://owner/repo[@revision][/subfolder]``.
        cache_dir: the Hugging Face cache; default ``HF_HUB_CACHE`` (or ``HF_HOME``/hub).

    Returns:
        The local folder holding the weights (the snapshot, or its subfolder) and the commit
        hash the revision resolved to.

    Raises:
        CheckpointError: the repository or revision does not exist or is not accessible, it
            is not cached while offline, or it holds no weights.

    Example:
        >>> import os, pathlib, tempfile, torch, ladle
        >>> from unittest import mock
        >>> cache = pathlib.Path(tempfile.mkdtemp())  # a Hub cache as huggingface_hub has it
        >>> commit, repo = "0123456789abcdef" * 2 + "01234567", cache / "models--org--name"
        >>> _ = ladle.save({"w": torch.ones(2)}, repo / "snapshots" / commit / "model.safetensors")
        >>> (repo / "refs").mkdir(); _ = (repo / "refs" / "main").write_text(commit)
        >>> with mock.patch.dict(os.environ, HF_HUB_OFFLINE="1"):  # the cache alone
        ...     folder, found = snapshot("hf://org/name", cache_dir=cache)
        >>> found == commit, sorted(path.name for path in folder.iterdir())
        (True, ['model.safetensors'])
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    source = parse_hf_url(url)
    # fnmatch patterns: a subfolder named "ckpt[1]" is no character class
    prefix = f"{glob.escape(source.subfolder)}/" if source.subfolder else ""
    offline = _offline()
    cache = str(cache_dir) if cache_dir is not None else _cache_dir()

    def fetch(revision: str | None, allow: list[str], depth: int = 1) -> Path:
        try:
            with _unmatched_patterns_unsaid():
                found = snapshot_download(
                    source.repo_id,
                    revision=revision,
                    cache_dir=cache,
                    local_files_only=offline,
                    allow_patterns=allow,
                    # nothing from deeper folders, no optimizer or trainer state
                    ignore_patterns=[prefix + "*/" * depth + "*", *_patterns(prefix, NOT_WEIGHTS)],
                    endpoint=_endpoint(),
                    library_name="ladle",
                    library_version=__version__,
                )
            return Path(found)
        except LocalEntryNotFoundError as err:
            # huggingface_hub ≥ 1: offline, a snapshot whose cached file list names files
            # these patterns match and the cache lacks (a README, a tokenizer) is refused
            # whole; what it holds is checked below, as a folder's would be.
            partial = getattr(err, "snapshot_path", None)
            if partial is None and type(err).__name__ == "IncompleteSnapshotError":
                partial = _cached_snapshot(cache, source.repo_id, revision)  # 1.22: no path
            if partial is None:
                raise
            return Path(partial)
        except (RuntimeError, ValueError) as err:
            if isinstance(err, HfHubHTTPError):  # a 400: the Hub's answer, told below
                raise
            # The download's own failures: hf_transfer's RuntimeError, a server's missing
            # Xet headers (ValueError), hf_xet's integrity and configuration errors.
            raise CheckpointError(
                f"{url}: cannot fetch from the Hub ({type(err).__name__}: {one_line(err)})"
            ) from err
        except _MALFORMED as err:
            raise _not_the_hub(url, err) from err

    files: list[str] = []  # the weights files the snapshot's folder names
    try:
        root = fetch(
            source.revision,
            [
                *_patterns(prefix, (*COMPANION_FILES, *LICENSE_FILES, "README.md")),
                prefix + "*.json",
                prefix + "*.py",
                # A subfolder's model (diffusers' unet/) comes under the repository's terms.
                *(_patterns("", (*LICENSE_FILES, "README.md")) if prefix else []),
            ],
        )
        commit = root.name  # snapshots/<commit hash>
        folder = root / source.subfolder if source.subfolder else root
        if offline:  # what the cache holds; a shard missing there is named below
            found_here = folder.iterdir() if folder.is_dir() else []
            names = [p.name + ("/" if p.is_dir() else "") for p in found_here]
        else:  # the Hub's own list: which files are the weights (the cache may hold a variant)
            try:
                names = _listed(source.repo_id, commit, source.subfolder)
            except Exception as err:  # snapshot_download fell back on the cache; this cannot
                if isinstance(err, _MALFORMED):
                    raise _not_the_hub(url, err) from err
                if not _unreachable(err):
                    raise
                raise CheckpointError(
                    f"{url}: the Hub could not be reached ({one_line(err)}); to "
                    "read what the Hugging Face cache holds, set HF_HUB_OFFLINE=1"
                ) from err
        # Only folders that are there: huggingface_hub warns of patterns that match nothing.
        templates = [f"{prefix}{name}/*.jinja" for name in COMPANION_FOLDERS if f"{name}/" in names]
        if templates:
            fetch(commit, templates, depth=2)
        files = _weight_files(folder, names, source.url(commit))
        if files:
            # exact names, a shard in a folder below the index's too
            deepest = max(name.count("/") for name in files) + 1
            fetch(commit, [prefix + glob.escape(name) for name in files], depth=deepest)
    except Exception as err:
        error = _fetch_failure(err, url, source, offline=offline, cache=cache)
        if error is None:
            raise
        raise error from err
    if not _COMMIT.fullmatch(commit):  # a refs file holding no commit (cut short, say)
        raise CheckpointError(
            f"{url}: resolved to {root}, which is not a cached snapshot (the cache's refs "
            f"file for {source.revision or 'main'!r} names no commit)"
        )
    # Links in the snapshot with no blob behind them first (a download cut short, or the
    # cache cleaned), else any weights file the cache lacks (an index's shard, offline).
    broken = [n for n in files if (folder / n).is_symlink() and not (folder / n).is_file()]
    missing = broken or [n for n in files if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{source.url(commit)}: {missing[0]!r} ({len(missing)} of its {len(files)} weights "
            f"files) is not in the Hugging Face cache ({cache})"
            + (
                ": its snapshot's link leads to no file (a download cut short, or the cache "
                "cleaned)"
                if broken
                else ""
            )
            + (f"; {_offline_variable()} is set" if offline else "")
        )
    if not files:
        raise _no_weights(url, source, folder, commit, offline=offline, cache=cache)
    return folder, commit


@contextlib.contextmanager
def _unmatched_patterns_unsaid() -> Iterator[None]:
    """Within the block, this thread's fetches do not log huggingface_hub's "No files
    matched allow_patterns=[...]" warning: :func:`snapshot` asks for the config, card and
    license files a repository may have, and one with its weights alone (as a training
    script pushes them) has none, which is no problem to report."""
    logger = logging.getLogger("huggingface_hub._snapshot_download")
    thread = threading.get_ident()

    def said(record: logging.LogRecord) -> bool:
        return record.thread != thread or not str(record.msg).startswith("No files matched")

    logger.addFilter(said)
    try:
        yield
    finally:
        logger.removeFilter(said)


def _cached_snapshot(cache: str, repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder of ``repo_id`` at ``revision`` (a commit, or a branch or tag the
    cache's ``refs/`` resolve) in ``cache``, where huggingface_hub left it; ``None`` if none.
    What ``IncompleteSnapshotError.snapshot_path`` says since huggingface_hub 1.23 or so;
    1.22 raised it without.

    Example:
        >>> import tempfile
        >>> _cached_snapshot(tempfile.mkdtemp(), "org/m", "main") is None
        True
    """
    folder = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    commit = revision or "main"
    if not _COMMIT.fullmatch(commit):
        try:
            commit = (folder / "refs" / commit).read_text().strip()
        except OSError:
            return None
    snapshot = folder / "snapshots" / commit
    return snapshot if _COMMIT.fullmatch(commit) and snapshot.is_dir() else None


_MALFORMED = (KeyError, AssertionError, TypeError)
"""What huggingface_hub raises reading answers that are JSON but not the Hub's (``{}``:
``KeyError: 'id'``; no commit: its ``AssertionError``): an endpoint that is no Hub."""


def _slash_hint(source: HubSource) -> str:
    """Where ``source``'s revision was not found and a subfolder follows it, how to write the
    revision that holds the subfolder's first part (``release/v2``: its ``/`` is ``%2F`` in a
    URL, as HfFileSystem writes it); else nothing.

    Example:
        >>> _slash_hint(parse_hf_url("hf://org/model@release/v2"))
        "; for the revision 'release/v2', write hf://org/model@release%2Fv2"
        >>> _slash_hint(parse_hf_url("hf://org/model@v2/unet/fp16"))
        "; for the revision 'v2/unet', write hf://org/model@v2%2Funet/fp16"
    """
    if not source.revision or not source.subfolder or _COMMIT.fullmatch(source.revision):
        return ""
    first, _, rest = source.subfolder.partition("/")
    meant = HubSource(source.repo_id, f"{source.revision}/{first}", rest)
    return f"; for the revision {meant.revision!r}, write {meant.url()}"


def _beneath_hint(ref: Path, source: HubSource) -> str:
    """Where ``ref``, the cache's refs entry of ``source``'s revision, is a folder: the first
    revision the cache holds beneath it (``release/v2`` beneath ``release``), written as a
    URL; else nothing."""
    assert source.revision is not None
    refs = ref.parents[source.revision.count("/")]
    held = sorted(p.relative_to(refs).as_posix() for p in ref.rglob("*") if p.is_file())
    if not held:
        return ""
    meant = HubSource(source.repo_id, held[0], source.subfolder)
    return f"; it holds the revision {held[0]!r} beneath it: write {meant.url()}"


def _not_the_hub(url: str, err: Exception) -> CheckpointError:
    """The error of an endpoint whose answers huggingface_hub could not read (:data:`_MALFORMED`):
    a traceback of huggingface_hub's before, from the CLI too.

    Example:
        >>> print(_not_the_hub("hf://org/m", KeyError("id")))  # doctest: +ELLIPSIS
        hf://org/m: cannot fetch from the Hub (KeyError: 'id'): the answers of ... HF_ENDPOINT
    """
    endpoint = _endpoint() or "https://huggingface.co"
    return CheckpointError(
        f"{url}: cannot fetch from the Hub ({type(err).__name__}: {one_line(err)}): the answers "
        f"of {endpoint} are not a Hugging Face Hub's; check HF_ENDPOINT"
    )


def _fetch_failure(
    err: Exception, url: str, source: HubSource, *, offline: bool, cache: str
) -> CheckpointError | None:
    """The error :func:`snapshot` raises for ``err``, met while fetching ``url``; ``None`` for
    an error that is not the Hub's or the network's (a bug: raised as it is). A refusal of
    access (401/403) is raised here, naming the login to use."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, GatedRepoError):  # a RepositoryNotFoundError, but it was found
        return CheckpointError(
            f"{url}: {source.repo_id} is gated: ask for access on its page on the Hub, then "
            f"use an account that has it (set HF_TOKEN or run `hf auth login`) ({one_line(err)})"
        )
    if isinstance(err, RepositoryNotFoundError):
        return CheckpointError(
            f"{url}: repository not found on the Hub, or private or gated and not accessible "
            "with the current login (set HF_TOKEN or run `hf auth login`)"
        )
    if isinstance(err, RevisionNotFoundError):
        return CheckpointError(
            f"{url}: revision {source.revision or 'main'!r} not found in {source.repo_id}"
            f"{_slash_hint(source)}"
        )
    # Offline, the cache's refs file of a revision beneath which others lie (``release``,
    # of ``release/v2``) is a folder: huggingface_hub's read of it fails so.
    folder_ref = None
    if isinstance(err, IsADirectoryError) and source.revision is not None:
        path = Path(str(err.filename))
        if path.parts[-2 - source.revision.count("/") :] == ("refs", *source.revision.split("/")):
            folder_ref = path
    if isinstance(err, LocalEntryNotFoundError) or folder_ref is not None:
        _check_access(err, url, source.repo_id)  # reached, and refused: not a network failure
        # huggingface_hub's own text advises `local_files_only=False`, which ladle has not.
        revision = f" --revision {shlex.quote(source.revision)}" if source.revision else ""
        # `hf` came with huggingface_hub 0.34; `huggingface-cli` before it.
        repo = shlex.quote(source.repo_id)
        fetch_first = f"`hf download {repo}{revision}`, or `huggingface-cli download`"
        # huggingface_hub wraps the Hub's answer (a 429, a 503) as it does a network failure
        answer = next(_answers(err), None)
        if offline:
            why = f"{_offline_variable()} is set: unset it, or fetch it first ({fetch_first})"
        elif answer is not None:
            why = f"the Hub answered {answer[0]} ({one_line(answer[1])})"
        else:
            why = f"the Hub could not be reached ({one_line(err)})"
        what = f"revision {source.revision!r} of " if source.revision else ""
        hint = _slash_hint(source)
        if folder_ref is not None and not hint:
            hint = _beneath_hint(folder_ref, source)
        return CheckpointError(
            f"{url}: {what}{source.repo_id} is not in the Hugging Face cache ({cache}) and {why}"
            f"{hint}"
        )
    if isinstance(err, HfHubHTTPError):
        _check_access(err, url, source.repo_id)
    elif _unreachable(err):
        return CheckpointError(f"{url}: the Hub could not be reached ({one_line(err)})")
    elif not isinstance(err, OSError):  # a disk error writing the cache is one
        return None
    if offline:  # nothing was fetched: the cache itself could not be read
        return CheckpointError(f"{url}: cannot read the Hugging Face cache ({one_line(err)})")
    return CheckpointError(f"{url}: cannot fetch from the Hub ({one_line(err)})")


def _no_weights(
    url: str, source: HubSource, folder: Path, commit: str, *, offline: bool, cache: str
) -> CheckpointError:
    """The error of a snapshot (``folder``, at ``commit``) that holds no weights to read:
    ``url`` naming a file rather than a folder, or what the folder holds instead."""
    last = source.subfolder.rpartition("/")[2]
    if last.endswith((".safetensors", ".json", *TORCH_SUFFIXES)):  # a file's name
        parent = source.subfolder.rpartition("/")[0]
        named = PREFIX + source.repo_id + (f"/{parent}" if parent else "")
        return CheckpointError(
            f"{url}: an hf:// source names a repository or a folder in it, not a file "
            f"({last!r}); name the folder holding it: {named}"
        )
    where = f"subfolder {source.subfolder!r}" if source.subfolder else "the repository root"
    names = sorted(p.name for p in folder.iterdir())[:5] if folder.is_dir() else []
    if offline:  # only the cache was asked: the Hub may well have them
        where += f" in the Hugging Face cache ({cache}), and {_offline_variable()} is set"
    return CheckpointError(
        f"{source.url(commit)}: no weights in {where}: expected *.safetensors or a torch "
        f"file (*.bin, *.pt, *.pth, *.ckpt), or every shard of an index; found "
        f"{', '.join(names) if names else 'none'}"
    )


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` is the HTTP client's failure to get an answer from the Hub (refused,
    no route, a timeout, a broken answer): a request error of ``httpx`` (huggingface_hub
    1.0 and later; no ``OSError``) or of ``requests`` (before). The Hub's own answers
    (``HfHubHTTPError``, a ``requests`` error too before 1.0) are not such failures."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        return False
    return any(
        (cls.__name__ == "RequestError" and cls.__module__.startswith("httpx"))
        or (cls.__name__ == "RequestException" and cls.__module__.startswith("requests"))
        for cls in type(err).__mro__
    )


def _is_weights_file(name: str) -> bool:
    """Whether ``name`` is a weights file or shard index of any format a folder is read from
    (a trainer's state beside them, ``optimizer.pt``, ``training_args.bin``, is not)."""
    if is_trainer_state(name):
        return False
    return name.endswith((".safetensors", ".index.json")) or name.endswith(TORCH_SUFFIXES)


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None) -> str:
    """Upload a merged output directory to the Hub repository ``repo_id`` (created if needed).

    Uses ``HfApi.create_repo`` and ``HfApi.upload_folder`` with the current login
    (``HF_TOKEN`` or ``hf auth login``). Weights files and shard indexes at the repository's
    root that ``folder`` lacks (an earlier merge's shards) are deleted in the same commit,
    so the repository holds this output's weights alone; other files are left as they are.

    Args:
        folder: a directory written by a merge (weights, config, tokenizer, model card).
        repo_id: ``owner/name`` of the model repository.
        private: create the repository as private (``None``: the Hub's default).

    Returns:
        The URL of the commit made.

    Raises:
        ValueError: ``folder`` is no directory, or ``repo_id`` one the Hub refuses
            (``TypeError`` for no string); checked before anything is sent.
        LadleError: the upload failed.

    Example:
        >>> import tempfile, torch, ladle
        >>> out = ladle.uniform_soup([{"w": torch.ones(2)}], out=tempfile.mkdtemp() + "/merged")
        >>> push_to_hub(out, "me/merged-model")  # doctest: +SKIP
        'https://huggingface.co/me/merged-model/commit/...'
        >>> push_to_hub(out, "me/not a name")  # checked before anything is sent
        Traceback (most recent call last):
        ValueError: push_to_hub: repo_id: malformed repository id ...; nothing was sent
    """
    from huggingface_hub import HfApi

    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"push_to_hub: expected an output directory, found {path}")
    if not isinstance(repo_id, str):
        raise TypeError(f"push_to_hub: repo_id: expected a str, found {type_name(repo_id)}")
    problem = _repo_id_problem(repo_id)
    if problem is not None:
        raise ValueError(f"push_to_hub: repo_id: {problem}; nothing was sent")
    api = HfApi(endpoint=_endpoint(), library_name="ladle")
    try:
        if private is None:  # sent as JSON null before huggingface_hub 0.27: left out
            api.create_repo(repo_id, repo_type="model", exist_ok=True)
        else:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        # Weights an earlier upload left at the root and this output lacks go in the same
        # commit: a stale index beside new single-file weights would be read instead of them.
        stale = [
            name
            for name in api.list_repo_files(repo_id, repo_type="model")
            if "/" not in name and _is_weights_file(name) and not (path / name).exists()
        ]
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=path,
            commit_message="Upload merge made with ladle",
            delete_patterns=[glob.escape(name) for name in stale] or None,
        )
    except Exception as err:  # HTTP errors, and the transport's own (refused connections)
        raise LadleError(
            f"push_to_hub: uploading {path} to {repo_id} failed: {type(err).__name__}: "
            f"{one_line(err)}"
        ) from err
    return str(getattr(info, "commit_url", info))


def open_hub_checkpoint(url: str, *, cache_dir: str | os.PathLike | None = None) -> Checkpoint:
    """Open ``url`` (``hf://...``) as a lazy checkpoint over its snapshot in the HF cache.

    The checkpoint's ``name`` is ``url`` with the revision replaced by the resolved commit hash
    (``hf://owner/repo@<commit>[/subfolder]``), so provenance and error messages name exactly
    what was read; its ``path`` is the local snapshot folder. ``ladle.open_checkpoint`` and
    every merge open ``hf://`` sources through it.

    Raises:
        CheckpointError: as :func:`snapshot`, or the snapshot's weights cannot be read (the
            message names ``url`` at the resolved commit).

    Example:
        >>> import os, pathlib, tempfile, torch, ladle
        >>> from unittest import mock
        >>> cache = pathlib.Path(tempfile.mkdtemp())  # a Hub cache as huggingface_hub has it
        >>> commit, repo = "0123456789abcdef" * 2 + "01234567", cache / "models--org--name"
        >>> _ = ladle.save({"w": torch.ones(2)}, repo / "snapshots" / commit / "model.safetensors")
        >>> (repo / "refs").mkdir(); _ = (repo / "refs" / "main").write_text(commit)
        >>> with mock.patch.dict(os.environ, HF_HUB_OFFLINE="1"):  # the cache alone
        ...     checkpoint = open_hub_checkpoint("hf://org/name", cache_dir=cache)
        >>> checkpoint.name == "hf://org/name@" + commit, checkpoint.get("w").tolist()
        (True, [1.0, 1.0])
        >>> checkpoint.close()
    """
    folder, commit = snapshot(url, cache_dir=cache_dir)
    return open_snapshot(folder, parse_hf_url(url).url(commit))


@contextlib.contextmanager
def progress_bars_off() -> Iterator[None]:
    """Within the block, huggingface_hub shows no progress bars (its "Fetching N files",
    downloads and uploads), as ``ladle --no-progress`` shows none of its own; then they are
    as they were. ``HF_HUB_DISABLE_PROGRESS_BARS``, where set, decides instead.

    Example:
        >>> from huggingface_hub.utils import are_progress_bars_disabled
        >>> with progress_bars_off():
        ...     are_progress_bars_disabled()
        True
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if constants.HF_HUB_DISABLE_PROGRESS_BARS is not None or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def fetched(sources: Iterable[object]) -> dict[str, tuple[Path, str]]:
    """Each ``hf://`` URL among ``sources`` (other sources are skipped), fetched once
    (:func:`snapshot`): its folder, and its name at the commit found, for
    :func:`open_snapshot`.

    Example:
        >>> import os, pathlib, tempfile, torch, ladle
        >>> from unittest import mock
        >>> cache = pathlib.Path(tempfile.mkdtemp())  # a Hub cache as huggingface_hub has it
        >>> commit, repo = "0123456789abcdef" * 2 + "01234567", cache / "models--org--name"
        >>> _ = ladle.save({"w": torch.ones(2)}, repo / "snapshots" / commit / "model.safetensors")
        >>> (repo / "refs").mkdir(); _ = (repo / "refs" / "main").write_text(commit)
        >>> with mock.patch.dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache)):
        ...     found = fetched(["hf://org/name", "local.safetensors", "hf://org/name"])
        >>> [(url, name == f"hf://org/name@{commit}") for url, (_, name) in found.items()]
        [('hf://org/name', True)]
    """
    found: dict[str, tuple[Path, str]] = {}
    for source in sources:
        if isinstance(source, str) and source.startswith(PREFIX) and source not in found:
            folder, commit = snapshot(source)
            found[source] = (folder, parse_hf_url(source).url(commit))
    return found


def pinned(
    source: object, snapshots: Mapping[str, tuple[Path, str]], stack: contextlib.ExitStack
) -> Any:
    """``source`` as it is, or, for an ``hf://`` URL of ``snapshots`` (from :func:`fetched`),
    its snapshot opened (:func:`open_snapshot`) and closed with ``stack``.

    Example:
        >>> import contextlib, pathlib, tempfile, torch, ladle
        >>> folder = pathlib.Path(tempfile.mkdtemp())  # as if fetched by snapshot()
        >>> _ = ladle.save({"w": torch.ones(2)}, folder / "model.safetensors")
        >>> snapshots = {"hf://org/name": (folder, "hf://org/name@" + "0" * 40)}
        >>> with contextlib.ExitStack() as stack:
        ...     opened = pinned("hf://org/name", snapshots, stack)
        ...     print(opened.name[-8:], opened.keys(), pinned("local.pt", snapshots, stack))
        00000000 ['w'] local.pt
    """
    if isinstance(source, str) and source in snapshots:
        return stack.enter_context(open_snapshot(*snapshots[source]))
    return source


def open_snapshot(folder: Path, name: str) -> Checkpoint:
    """The weights of ``folder``, a snapshot :func:`snapshot` fetched, opened as a checkpoint
    named ``name`` (its URL at the commit, as :func:`open_hub_checkpoint` names it), without
    asking the Hub again: a recipe resolves each ``hf://`` input once and every step reads
    that commit, and so does every rank of a split merge (:func:`fetched`).

    Raises:
        CheckpointError: the weights cannot be read (the message names ``name``);
            :class:`UnsafeCheckpointError` where a torch file would need arbitrary
            unpickling, as for a local file.

    Example:
        >>> import pathlib, tempfile, torch, ladle
        >>> folder = pathlib.Path(tempfile.mkdtemp())  # as if fetched by snapshot()
        >>> _ = ladle.save({"w": torch.ones(2)}, folder / "model.safetensors")
        >>> checkpoint = open_snapshot(folder, "hf://org/name@" + "0" * 40)
        >>> checkpoint.name.endswith("0" * 40), checkpoint.path == folder, checkpoint.keys()
        (True, True, ['w'])
        >>> checkpoint.close()
    """
    from .checkpoint import _open_directory

    try:
        checkpoint = _open_directory(folder)
    except CheckpointError as err:  # its own class: an UnsafeCheckpointError stays one
        raise type(err)(f"{name}: {err}") from err
    except OSError as err:  # the folder gone (a pruned cache) or no folder
        raise CheckpointError(
            f"{name}: cannot read its snapshot {folder} ({err.strerror or err}); fetch it again"
        ) from err
    checkpoint.name = name
    return checkpoint
