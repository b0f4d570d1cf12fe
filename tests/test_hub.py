"""hf:// sources against a Hub cache written here in the real layout (no network).

The cache is ``models--owner--repo/{blobs,refs,snapshots}``: blobs named by content hash,
snapshot files as relative symlinks into blobs, refs holding commit hashes; exactly what
``huggingface_hub.snapshot_download`` writes and reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import family
from safetensors.torch import save, save_file

import ladle
from ladle.hub import parse_hf_url, push_to_hub, snapshot

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def weights(model: dict[str, torch.Tensor]) -> bytes:
    return save(model)


def write_cached_repo(
    cache: Path,
    repo_id: str,
    commit: str,
    files: dict[str, bytes],
    refs: dict[str, str] | None = None,
) -> Path:
    """A snapshot of ``repo_id`` at ``commit`` in the HF cache layout; returns its folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot_dir = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot_dir / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, target in (refs or {}).items():
        path = storage / "refs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(target)
    return snapshot_dir


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub: HF_HUB_CACHE points at an empty cache under tmp_path."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return cache


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("hf://org/model", ("org/model", None, "")),
        ("hf://org/model/", ("org/model", None, "")),
        ("hf://models/org/model", ("org/model", None, "")),
        ("hf://org/model@main", ("org/model", "main", "")),
        ("hf://org/model@v1.0/text_encoder", ("org/model", "v1.0", "text_encoder")),
        ("hf://org/model/unet/fp16", ("org/model", None, "unet/fp16")),
        ("hf://org/model@" + COMMIT_A + "/sub", ("org/model", COMMIT_A, "sub")),
        ("hf://org/model@release%2Fv2/sub", ("org/model", "release/v2", "sub")),
        ("hf://org/model@refs/pr/12/sub", ("org/model", "refs/pr/12", "sub")),
        ("hf://org/model@refs/convert/parquet", ("org/model", "refs/convert/parquet", "")),
    ],
)
def test_parse_hf_url_splits_repo_revision_and_subfolder(url, expected):
    assert tuple(parse_hf_url(url)) == expected


@pytest.mark.parametrize(
    "url",
    [
        "hf://",
        "hf://org",
        "hf://org/model@",
        "hf://datasets/org/data",
        "hf://spaces/org/app",
        "hf://buckets/org/b",
        "hf://kernels/org/k",
        "hf://org/m/../x",
        "x",
    ],
)
def test_parse_hf_url_rejects_malformed_urls_naming_them(url):
    with pytest.raises(ladle.CheckpointError, match="expected|subfolder") as err:
        parse_hf_url(url)
    assert url in str(err.value)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("hf://my org/my model", r"must use alphanumeric chars.*length is 96\)$"),
        ("hf://org/a--b", r"Cannot have -- or \.\. in repo_id\)$"),
        ("hf://org/m.git@v1/sub", r"cannot end by '\.git'\)$"),
    ],
)
def test_a_repo_id_the_hub_refuses_is_a_checkpoint_error_naming_the_url(url, why):
    # huggingface_hub's HFValidationError escaped, without the source, once it was fetched
    repo_id = url.removeprefix("hf://").split("@")[0]
    with pytest.raises(ladle.CheckpointError, match=rf"malformed repository id .*{why}") as err:
        parse_hf_url(url)
    assert str(err.value).startswith(f"{url}: malformed repository id {repo_id!r} (")
    with pytest.raises(ladle.CheckpointError, match=why):
        ladle.load(url)


def test_url_round_trips_through_parse():
    # A branch named like a PR ref, but longer, stays percent-encoded: not refs/pr/3 and /x.
    branch = "hf://o/m@refs%2Fpr%2F3%2Fx"
    for url in [
        "hf://o/m",
        "hf://o/m@v1/sub",
        "hf://o/m@release%2Fv2",
        "hf://o/m@refs/pr/3/s",
        branch,
    ]:
        assert parse_hf_url(url).url() == url


def test_hf_source_reads_the_cached_snapshot_of_the_default_branch(hub_cache):
    model = family(1, seed=1)[0]
    write_cached_repo(
        hub_cache,
        "org/model",
        COMMIT_A,
        {"model.safetensors": weights(model), "config.json": b"{}"},
        refs={"main": COMMIT_A},
    )
    with ladle.open_checkpoint("hf://org/model") as ckpt:
        assert ckpt.name == f"hf://org/model@{COMMIT_A}"
        assert sorted(ckpt.keys()) == sorted(model)
    loaded = ladle.load("hf://org/model")
    assert all(torch.equal(loaded[k], model[k]) for k in model)


def test_revision_pins_a_branch_a_tag_or_a_commit(hub_cache):
    old, new = family(2, seed=2)
    write_cached_repo(hub_cache, "org/m", COMMIT_A, {"model.safetensors": weights(old)})
    write_cached_repo(hub_cache, "org/m", COMMIT_B, {"model.safetensors": weights(new)})
    refs = hub_cache / "models--org--m" / "refs"
    refs.mkdir()
    (refs / "main").write_text(COMMIT_B)
    (refs / "v1.0").write_text(COMMIT_A)  # a tag: refs are stored by name, like branches

    def weight(url: str) -> torch.Tensor:
        return ladle.load(url)["layer.weight"]

    assert torch.equal(weight("hf://org/m"), new["layer.weight"])
    assert torch.equal(weight("hf://org/m@main"), new["layer.weight"])
    assert torch.equal(weight("hf://org/m@v1.0"), old["layer.weight"])
    assert torch.equal(weight(f"hf://org/m@{COMMIT_A}"), old["layer.weight"])
    with ladle.open_checkpoint("hf://org/m@v1.0") as ckpt:
        assert ckpt.name == f"hf://org/m@{COMMIT_A}"


def test_subfolder_reads_only_that_folder(hub_cache):
    top, sub = family(2, seed=3)
    write_cached_repo(
        hub_cache,
        "org/pipe",
        COMMIT_A,
        {"model.safetensors": weights(top), "text_encoder/model.safetensors": weights(sub)},
        refs={"main": COMMIT_A},
    )
    with ladle.open_checkpoint("hf://org/pipe/text_encoder") as ckpt:
        assert ckpt.name == f"hf://org/pipe@{COMMIT_A}/text_encoder"
        assert torch.equal(ckpt.get("head.weight"), sub["head.weight"])


def test_sharded_hub_source_is_read_through_its_index(hub_cache):
    model = family(1, seed=4)[0]
    first = {k: v for k, v in model.items() if k.startswith("layer")}
    second = {k: v for k, v in model.items() if not k.startswith("layer")}
    index = {
        "metadata": {},
        "weight_map": {
            **dict.fromkeys(first, "model-00001-of-00002.safetensors"),
            **dict.fromkeys(second, "model-00002-of-00002.safetensors"),
        },
    }
    write_cached_repo(
        hub_cache,
        "org/sharded",
        COMMIT_A,
        {
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": weights(first),
            "model-00002-of-00002.safetensors": weights(second),
        },
        refs={"main": COMMIT_A},
    )
    loaded = ladle.load("hf://org/sharded")
    assert set(loaded) == set(model) and all(torch.equal(loaded[k], model[k]) for k in model)


def test_torch_bin_is_used_when_a_repo_has_no_safetensors(hub_cache):
    model = family(1, seed=5)[0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    write_cached_repo(
        hub_cache,
        "org/legacy",
        COMMIT_A,
        {"pytorch_model.bin": buffer.getvalue(), "config.json": b"{}"},
        refs={"main": COMMIT_A},
    )
    loaded = ladle.load("hf://org/legacy")
    assert all(torch.equal(loaded[k], model[k]) for k in model)


def test_offline_and_not_cached_is_a_checkpoint_error_naming_the_source(hub_cache):
    with pytest.raises(
        ladle.CheckpointError,
        match=r"^hf://org/absent: org/absent is not in the Hugging Face cache \(.*\) and "
        r"HF_HUB_OFFLINE is set: unset it, or fetch it first \(`hf download org/absent`, or "
        r"`huggingface-cli download`\)$",
    ):
        ladle.open_checkpoint("hf://org/absent")
    write_cached_repo(hub_cache, "org/m", COMMIT_A, {"model.safetensors": weights({})})
    with pytest.raises(
        ladle.CheckpointError,
        match=r"^hf://org/m@v9: revision 'v9' of org/m is not in the Hugging Face cache .*"
        r"\(`hf download org/m --revision v9`, or `huggingface-cli download`\)$",
    ) as caught:
        ladle.open_checkpoint("hf://org/m@v9")  # a revision never fetched
    assert "local_files_only" not in str(caught.value)  # huggingface_hub's advice, not ours
    # A revision holding '/' written as it is reads as a revision and a subfolder: said so.
    write_cached_repo(
        hub_cache,
        "org/m",
        COMMIT_B,
        {"model.safetensors": weights({})},
        refs={"release/v2": COMMIT_B},
    )
    assert ladle.open_checkpoint("hf://org/m@release%2Fv2").name == f"hf://org/m@{COMMIT_B}"
    with pytest.raises(
        ladle.CheckpointError,
        match=r"^hf://org/m@release/v2: revision 'release' of org/m is not in the Hugging Face "
        r"cache .*; for the revision 'release/v2', write hf://org/m@release%2Fv2$",
    ):
        ladle.open_checkpoint("hf://org/m@release/v2")


def test_repo_without_weights_is_a_checkpoint_error(hub_cache):
    write_cached_repo(
        hub_cache, "org/empty", COMMIT_A, {"config.json": b"{}"}, refs={"main": COMMIT_A}
    )
    with pytest.raises(ladle.CheckpointError, match=r"hf://org/empty@a{40}: no weights in"):
        ladle.open_checkpoint("hf://org/empty")


def test_hub_cache_from_hf_home_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    model = {"w": torch.arange(3.0)}
    write_cached_repo(
        tmp_path / "home" / "hub",
        "org/m",
        COMMIT_A,
        {"model.safetensors": weights(model)},
        refs={"main": COMMIT_A},
    )
    folder, commit = snapshot("hf://org/m")
    assert commit == COMMIT_A and folder == tmp_path / "home" / "hub" / "models--org--m" / (
        "snapshots/" + COMMIT_A
    )


def test_merge_of_hub_sources_records_resolved_commits_in_provenance(hub_cache, tmp_path):
    a, b = family(2, seed=6)
    write_cached_repo(
        hub_cache, "org/a", COMMIT_A, {"model.safetensors": weights(a)}, refs={"main": COMMIT_A}
    )
    write_cached_repo(
        hub_cache, "org/b", COMMIT_B, {"model.safetensors": weights(b)}, refs={"v2": COMMIT_B}
    )
    out = ladle.uniform_soup(
        ["hf://org/a", "hf://org/b@v2"], out=tmp_path / "soup.safetensors", device="cpu"
    )
    with ladle.open_checkpoint(out) as merged:
        inputs = json.loads(merged.metadata["ladle.inputs"])
    assert inputs == [f"hf://org/a@{COMMIT_A}", f"hf://org/b@{COMMIT_B}"]
    expected = ladle.uniform_soup([a, b], device="cpu")
    assert torch.equal(ladle.load(out)["layer.weight"], expected["layer.weight"])


def test_a_merge_of_a_quantized_hub_model_is_refused_naming_it(hub_cache, tmp_path):
    a, b = family(2, seed=6)
    write_cached_repo(
        hub_cache, "org/a", COMMIT_A, {"model.safetensors": weights(a)}, refs={"main": COMMIT_A}
    )
    config = {"quantization_config": {"quant_method": "awq", "bits": 4}}
    files = {"model.safetensors": weights(b), "config.json": json.dumps(config).encode()}
    write_cached_repo(hub_cache, "org/b-awq", COMMIT_B, files, refs={"main": COMMIT_B})
    out = tmp_path / "soup.safetensors"
    with pytest.raises(ladle.CheckpointError) as caught:
        ladle.uniform_soup(["hf://org/a", "hf://org/b-awq"], out=out, device="cpu")
    assert str(caught.value).startswith("model 1 (hf://org/b-awq")
    assert "quantized (quant_method 'awq')" in str(caught.value)
    assert not out.exists()


def test_output_inside_the_hub_cache_snapshot_is_refused(hub_cache):
    model = family(1, seed=7)[0]
    folder = write_cached_repo(
        hub_cache, "org/a", COMMIT_A, {"model.safetensors": weights(model)}, {"main": COMMIT_A}
    )
    with pytest.raises(ladle.LadleError, match="refusing to write"):
        ladle.uniform_soup(["hf://org/a"], out=folder / "merged", device="cpu")


def test_local_file_named_like_a_source_is_not_confused_with_the_hub(tmp_path):
    save_file({"w": torch.zeros(1)}, tmp_path / "hf.safetensors")
    assert ladle.load(tmp_path / "hf.safetensors")["w"].tolist() == [0.0]


class LocalHub:
    """A tiny Hub on 127.0.0.1 answering what snapshot_download and list_repo_tree call: repo
    info at a revision, the tree of a commit (recursive, or one folder's entries), and
    HEAD/GET of /{repo}/resolve/{rev}/{file}."""

    def __init__(self, repos: dict[str, dict]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import unquote, urlsplit

        self.requests: list[tuple[str, str]] = []
        self.raw_paths: list[str] = []  # as sent: "//api/..." for an endpoint ending in "/"
        self.repos = repos  # tests may add repositories
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def reply(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                # as requested: http.server collapses a leading "//" of self.path
                hub.raw_paths.append(self.requestline.split(" ")[1])
                path = unquote(urlsplit(self.path).path).strip("/").split("/")
                hub.requests.append((self.command, "/".join(path)))
                if path == ["xet-refresh"]:  # a Xet token route that leaves out its headers
                    return self.reply(200, b"{}")
                api = path[:2] == ["api", "models"]
                repo_id = "/".join(path[2:4] if api else path[:2])
                repo = repos.get(repo_id)
                if repo is None:
                    return self.reply(
                        404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"}
                    )
                if "refuse" in repo:  # a status to answer everything with (401, 403)
                    why = repo.get("why", "Access to this resource is disabled.")
                    code = {"X-Error-Code": repo["code"]} if "code" in repo else None
                    return self.reply(repo["refuse"], json.dumps({"error": why}).encode(), code)
                tree = api and path[4] == "tree"  # /api/models/{repo}/tree/{commit}[/{folder}]
                rev = path[5] if tree else "/".join(path[5:]) if api else path[3]
                commit = repo["refs"].get(rev, rev)
                files = repo["commits"].get(commit)
                if files is None:
                    return self.reply(404, b"{}", {"X-Error-Code": "RevisionNotFound"})
                if api and path[4] == "revision":
                    # huggingface_hub before 1.0 lists a snapshot's files from siblings
                    info = {
                        "id": repo_id,
                        "sha": commit,
                        "siblings": [{"rfilename": p} for p in files],
                    }
                    return self.reply(200, json.dumps(info).encode())
                if tree:  # recursive (as snapshot_download asks), or one folder's entries
                    folder = "/".join(path[6:])
                    within = f"{folder}/" if folder else ""
                    recursive = "recursive=true" in urlsplit(self.path).query.lower()
                    listed = [
                        p
                        for p in files
                        if p.startswith(within) and (recursive or "/" not in p[len(within) :])
                    ]
                    below = [p[len(within) :] for p in files if p.startswith(within)]
                    if folder and not below:  # as the Hub answers a folder it lacks
                        return self.reply(404, b"{}", {"X-Error-Code": "EntryNotFound"})
                    folders = (
                        []
                        if recursive
                        else sorted({within + p.split("/")[0] for p in below if "/" in p})
                    )
                    entries = [
                        {
                            "type": "file",
                            "path": p,
                            "size": len(files[p]),
                            "oid": hashlib.sha1(files[p]).hexdigest(),
                        }
                        for p in listed
                    ] + [{"type": "directory", "path": p, "oid": "0" * 40} for p in folders]
                    return self.reply(200, json.dumps(entries).encode())
                data = files.get("/".join(path[4:]))
                if data is None:
                    return self.reply(404, b"", {"X-Error-Code": "EntryNotFound"})
                etag = f'"{hashlib.sha1(data).hexdigest()}"'
                headers = {"X-Repo-Commit": commit, "ETag": etag}
                if repo.get("xet"):  # stored with Xet, as the Hub says in these headers
                    refresh = f"http://127.0.0.1:{self.server.server_port}/xet-refresh"
                    headers |= {"X-Xet-Hash": "0" * 64, "X-Xet-Refresh-Route": refresh}
                return self.reply(200, data, headers)

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def downloaded(self) -> set[str]:
        return {
            path.split("/", 4)[4]
            for method, path in self.requests
            if method == "GET" and "/resolve/" in f"/{path}"
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    model = family(1, seed=9)[0]
    repos = {
        "org/m": {
            "refs": {"main": COMMIT_B, "v1": COMMIT_A},
            "commits": {
                COMMIT_A: {"model.safetensors": weights({"w": torch.zeros(2)})},
                COMMIT_B: {
                    "model.safetensors": weights(model),
                    "config.json": b'{"model_type": "toy"}',
                    "pytorch_model.bin": b"never fetched: safetensors exist",
                    "training_args.bin": b"never fetched",
                    "onnx/model.safetensors": b"never fetched: deeper folder",
                    "README.md": b"---\nlicense: mit\n---\n# m\n",  # for its license fields
                    "LICENSE": b"MIT License ...",
                    "docs/LICENSE": b"never fetched: deeper folder",
                },
            },
        }
    }
    hub = LocalHub(repos)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, perhaps during an offline test.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield hub, model
    hub.close()


def test_local_hub_download_fetches_only_what_a_merge_needs(local_hub, monkeypatch):
    hub, model = local_hub
    with ladle.open_checkpoint("hf://org/m") as ckpt:
        assert ckpt.name == f"hf://org/m@{COMMIT_B}"
        assert torch.equal(ckpt.get("layer.weight"), model["layer.weight"])
    assert hub.downloaded() == {"config.json", "model.safetensors", "README.md", "LICENSE"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the ref and files are now in the cache
    hub.requests.clear()
    assert torch.equal(ladle.load("hf://org/m")["layer.weight"], model["layer.weight"])
    assert hub.requests == []


def test_local_hub_fetches_model_safetensors_alone_beside_its_variants(local_hub):
    # Every *.safetensors was downloaded (a repo's fp16 and fp32 variants too), then the
    # folder refused as ambiguous; from_pretrained reads model.safetensors.
    hub, model = local_hub
    hub.repos["org/v"] = {
        "refs": {"main": COMMIT_A},
        "commits": {
            COMMIT_A: {
                "model.safetensors": weights(model),
                "model.fp16.safetensors": b"never fetched: a variant",
                "config.json": b'{"model_type": "toy"}',
            }
        },
    }
    assert torch.equal(ladle.load("hf://org/v")["layer.weight"], model["layer.weight"])
    assert hub.downloaded() == {"config.json", "model.safetensors"}


@pytest.mark.parametrize(
    ("folder", "default", "variants"),
    [
        # transformers' model.safetensors in a diffusers repo's text_encoder/
        ("text_encoder", "model.safetensors", ["model.fp16.safetensors"]),
        # diffusers' own unet/: every *.safetensors was fetched (gigabytes of variants), then
        # the folder was refused: "expected one weights file ..., found ...fp16.safetensors"
        (
            "unet",
            "diffusion_pytorch_model.safetensors",
            [
                "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.non_ema.safetensors",
            ],
        ),
        # a variant's index sorts before the default file: its shards were fetched and read
        (
            "text_encoder",
            "model.safetensors",
            ["model.fp16.safetensors.index.json", "model.fp16-00001-of-00001.safetensors"],
        ),
    ],
)
def test_local_hub_fetches_a_subfolder_s_default_weights_alone_beside_its_variants(
    local_hub, folder, default, variants
):
    hub, model = local_hub
    files = {
        "model_index.json": b"{}",
        f"{folder}/{default}": weights(model),
        f"{folder}/config.json": b'{"model_type": "toy"}',
        **{f"{folder}/{name}": b"never fetched: a variant" for name in variants},
    }
    hub.repos["org/sd"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    loaded = ladle.load(f"hf://org/sd/{folder}")
    assert torch.equal(loaded["layer.weight"], model["layer.weight"])
    indexes = {f"{folder}/{name}" for name in variants if name.endswith(".json")}  # JSON: all
    assert hub.downloaded() == {f"{folder}/config.json", f"{folder}/{default}", *indexes}


def test_local_hub_reads_what_a_local_folder_of_the_same_files_would(local_hub, tmp_path):
    # Two safetensors variants and no default beside a torch index: a folder is read from the
    # torch shards; the Hub fetched both variants, not the shards, and failed.
    hub, model = local_hub
    buffer = io.BytesIO()
    torch.save(model, buffer)
    shard = "pytorch_model-00001-of-00001.bin"
    files = {
        "model.fp16.safetensors": b"never fetched: a variant",
        "model.fp32.safetensors": b"never fetched: a variant",
        "pytorch_model.bin.index.json": json.dumps(
            {"weight_map": dict.fromkeys(model, shard)}
        ).encode(),
        shard: buffer.getvalue(),
    }
    hub.repos["org/mixed"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    loaded = ladle.load("hf://org/mixed")
    assert all(torch.equal(loaded[k], model[k]) for k in model)
    assert hub.downloaded() == {"pytorch_model.bin.index.json", shard}


def test_local_hub_refuses_several_weights_files_before_fetching_any(local_hub):
    hub, model = local_hub
    files = {"a.safetensors": weights(model), "b.safetensors": weights(model)}
    hub.repos["org/ab"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.load("hf://org/ab")
    assert str(info.value) == (
        f"hf://org/ab@{COMMIT_A}: expected one weights file or a *.index.json, found "
        "a.safetensors, b.safetensors"
    )
    assert hub.downloaded() == set()


def test_local_hub_fetches_a_subfolder_whose_name_holds_glob_characters(local_hub):
    # "ckpt[1]" was read as a character class in the fetch's patterns: nothing was fetched.
    hub, model = local_hub
    files = {"ckpt[1]/model.safetensors": weights(model), "ckpt[1]/config.json": b"{}"}
    hub.repos["org/br"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    loaded = ladle.load("hf://org/br/ckpt[1]")
    assert torch.equal(loaded["layer.weight"], model["layer.weight"])
    assert hub.downloaded() == {"ckpt[1]/config.json", "ckpt[1]/model.safetensors"}


def test_local_hub_takes_a_single_safetensors_file_of_another_name(local_hub):
    hub, model = local_hub
    files = {"weights.safetensors": weights(model), "config.json": b"{}"}
    hub.repos["org/w"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    assert torch.equal(ladle.load("hf://org/w")["layer.weight"], model["layer.weight"])
    assert hub.downloaded() == {"config.json", "weights.safetensors"}


def test_local_hub_tag_and_errors(local_hub):
    with ladle.open_checkpoint("hf://org/m@v1") as ckpt:
        assert ckpt.name == f"hf://org/m@{COMMIT_A}"
    with pytest.raises(ladle.CheckpointError, match="hf://org/none: repository not found"):
        ladle.open_checkpoint("hf://org/none")
    with pytest.raises(ladle.CheckpointError, match="revision 'v9' not found in org/m"):
        ladle.open_checkpoint("hf://org/m@v9")


def test_a_torch_shard_left_by_an_interrupted_download_does_not_stop_the_others(
    tmp_path, monkeypatch
):
    model = family(1, seed=4)[0]
    keys = sorted(model)
    shards = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        buffer = io.BytesIO()
        torch.save({k: model[k] for k in part}, buffer)
        shards[f"pytorch_model-0000{i}-of-00002.bin"] = (part, buffer.getvalue())
    index = {"weight_map": {k: name for name, (part, _) in shards.items() for k in part}}
    files = {name: data for name, (_, data) in shards.items()}
    files["pytorch_model.bin.index.json"] = json.dumps(index).encode()
    hub = LocalHub({"org/t": {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}})
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        from huggingface_hub import constants, snapshot_download

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        cache = tmp_path / "cache"
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        first = "pytorch_model-00001-of-00002.bin"
        snapshot_download("org/t", cache_dir=cache, allow_patterns=[first], endpoint=hub.url)
        hub.requests.clear()
        loaded = ladle.load("hf://org/t")
        assert loaded.keys() == model.keys()
        assert all(torch.equal(loaded[k], model[k]) for k in model)
        assert "pytorch_model-00002-of-00002.bin" in hub.downloaded()
    finally:
        hub.close()


def test_offline_without_cached_weights_says_the_cache_was_asked(hub_cache):
    write_cached_repo(hub_cache, "org/c", COMMIT_A, {"config.json": b"{}"}, refs={"main": COMMIT_A})
    with pytest.raises(
        ladle.CheckpointError,
        match=r"no weights in the repository root in the Hugging Face cache .*HF_HUB_OFFLINE",
    ):
        ladle.open_checkpoint("hf://org/c")


def test_transformers_offline_alone_is_named_and_the_revision_quoted(hub_cache, monkeypatch):
    # huggingface_hub goes offline for TRANSFORMERS_OFFLINE too: "HF_HUB_OFFLINE is set:
    # unset it" named a variable that was not set; "--revision main " lost its space.
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ladle.CheckpointError,
        match=r"TRANSFORMERS_OFFLINE is set: unset it, or fetch it first "
        r"\(`hf download org/none --revision 'main '`",
    ):
        ladle.open_checkpoint("hf://org/none@main ")


def test_offline_with_a_shard_missing_from_the_cache_says_the_cache_was_asked(hub_cache):
    # Was "...index.json: lists shard model-00002-of-00002.safetensors, which does not exist",
    # with no word of the cache or of HF_HUB_OFFLINE.
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    files = {
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": weights({"a": torch.ones(2)}),
    }
    write_cached_repo(hub_cache, "org/part", COMMIT_A, files, refs={"main": COMMIT_A})
    # Then "no weights in the repository root ... found model-00001-of-00002.safetensors, ..."
    # (weights it had just listed), with no word of the shard missing: named now.
    with pytest.raises(
        ladle.CheckpointError,
        match=r"^hf://org/part@a{40}: 'model-00002-of-00002\.safetensors' \(1 of its 2 weights "
        r"files\) is not in the Hugging Face cache \(.*\); HF_HUB_OFFLINE is set$",
    ):
        ladle.open_checkpoint("hf://org/part")


def test_a_cached_snapshot_with_trainer_files_opens_its_weights(hub_cache):
    model = family(1, seed=6)[0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    files = {"pytorch_model.bin": buffer.getvalue(), "training_args.bin": b"trainer state"}
    write_cached_repo(hub_cache, "org/trained", COMMIT_A, files, refs={"main": COMMIT_A})
    loaded = ladle.load("hf://org/trained")
    assert all(torch.equal(loaded[k], model[k]) for k in model)


@pytest.mark.parametrize(
    "url", ["hf://org/m@refs/pr/12abc", "hf://org/m@refs/heads", "hf://org/m@refs/pr/x/sub"]
)
def test_a_refs_revision_that_is_no_pr_or_convert_ref_is_refused(url):
    with pytest.raises(ladle.CheckpointError, match=r"expected refs/pr/N or refs/convert/NAME"):
        parse_hf_url(url)
    assert parse_hf_url("hf://org/m@refs/pr/12/abc") == ("org/m", "refs/pr/12", "abc")


def test_named_chat_templates_are_fetched_and_copied_into_a_directory_output(local_hub, tmp_path):
    hub, model = local_hub
    files = {
        "model.safetensors": weights(model),
        "config.json": b'{"model_type": "toy"}',
        "additional_chat_templates/tool_use.jinja": b"{{ tools }}",
        "additional_chat_templates/old/x.jinja": b"never fetched: deeper still",
        "additional_chat_templates/notes.txt": b"never fetched: no template",
        "onnx/tool_use.jinja": b"never fetched: another folder",
    }
    hub.repos["org/t"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    out = ladle.uniform_soup(["hf://org/t", "hf://org/t"], out=tmp_path / "merged")
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_bytes() == b"{{ tools }}"
    assert hub.downloaded() == {
        "model.safetensors",
        "config.json",
        "additional_chat_templates/tool_use.jinja",
    }


@pytest.mark.parametrize(
    ("repo_id", "kind", "message"),
    [
        ("bad id//", ValueError, "repository id 'bad id//' (Repo id must be in the form"),
        ("a/b--c", ValueError, "repository id 'a/b--c' (Cannot have -- or .. in repo_id); nothing"),
        (None, TypeError, "push_to_hub: repo_id: expected a str, found None\n"),
    ],
)
def test_push_to_hub_refuses_a_bad_repo_id_as_a_bad_argument(
    tmp_path, monkeypatch, repo_id, kind, message
):
    import huggingface_hub

    def contacted(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", contacted)
    with pytest.raises(kind) as caught:
        push_to_hub(tmp_path, repo_id)
    assert not isinstance(caught.value, ladle.LadleError)  # docs/safety.md: bad arguments
    assert message in str(caught.value) + "\n"  # "\n": where it ends
    if kind is ValueError:
        assert str(caught.value).startswith("push_to_hub: repo_id: malformed repository id ")


# Gaps found by mutation testing: each test below fails on a small change to the code.


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("hf:///org/model", ("org/model", None, "")),
        ("hf://org/model/unet//fp16/", ("org/model", None, "unet/fp16")),
    ],
)
def test_parse_hf_url_drops_empty_path_parts(url, expected):
    assert tuple(parse_hf_url(url)) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("hf://org/m/./x", "hf://org/m/./x: subfolder may not contain '.' or '..'"),
        (
            "hf://org@v1/model",
            "hf://org@v1/model: malformed repository id; "
            "expected hf://owner/repo[@revision][/subfolder]",
        ),
    ],
)
def test_parse_hf_url_refuses_a_dot_subfolder_and_a_revision_on_the_owner(url, message):
    with pytest.raises(ladle.CheckpointError) as err:
        parse_hf_url(url)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("value", "offline"),
    [("1", True), (" yes ", True), ("On", True), ("TRUE", True), ("0", False), ("no", False)],
)
def test_hf_hub_offline_set_now_or_at_huggingface_hub_s_import_is_offline(
    monkeypatch, value, offline
):
    # huggingface_hub reads it once, at import, and refuses every request while it was set
    # then, whatever it says later: "0" set afterwards asked the Hub anyway, and failed for
    # a source the cache held (found by a static review of the Hub's online paths).
    from huggingface_hub import constants

    from ladle.hub import _offline

    for at_import in (True, False):  # set (or not) when huggingface_hub was imported
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", at_import)
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert _offline() is (offline or at_import)
        monkeypatch.delenv("HF_HUB_OFFLINE")
        assert _offline() is at_import


def test_a_cached_source_opens_when_hf_hub_offline_is_unset_after_huggingface_hub_refused(
    hub_cache, monkeypatch
):
    from huggingface_hub import constants

    model = family(1, seed=4)[0]
    write_cached_repo(
        hub_cache, "org/m", COMMIT_A, {"model.safetensors": weights(model)}, refs={"main": COMMIT_A}
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # set when it was imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # unset since: huggingface_hub still refuses
    loaded = ladle.load("hf://org/m")
    assert loaded.keys() == model.keys()
    assert all(torch.equal(loaded[key], model[key]) for key in model)


def test_hub_cache_variables_expand_home_and_variables_and_take_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("LADLE_TEST_ROOT", str(tmp_path / "var"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "unused"))  # the cache variables win
    model = {"w": torch.arange(3.0)}
    for name, value, cache in [
        ("HF_HUB_CACHE", "~/cache", tmp_path / "user" / "cache"),
        ("HUGGINGFACE_HUB_CACHE", "$LADLE_TEST_ROOT/cache", tmp_path / "var" / "cache"),
    ]:
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
        monkeypatch.setenv(name, value)
        write_cached_repo(
            cache, "org/m", COMMIT_A, {"model.safetensors": weights(model)}, refs={"main": COMMIT_A}
        )
        assert snapshot("hf://org/m") == (
            cache / "models--org--m" / "snapshots" / COMMIT_A,
            COMMIT_A,
        )


def test_no_weights_error_lists_the_first_five_files_found(hub_cache):
    files = {f"{c}.json": b"{}" for c in "fedcba"}
    write_cached_repo(hub_cache, "org/six", COMMIT_A, files, refs={"main": COMMIT_A})
    with pytest.raises(ladle.CheckpointError) as err:
        ladle.open_checkpoint("hf://org/six")
    assert str(err.value).endswith("; found a.json, b.json, c.json, d.json, e.json")


def test_an_unreadable_hub_weights_file_is_an_error_naming_the_source_and_commit(hub_cache):
    write_cached_repo(
        hub_cache,
        "org/bad",
        COMMIT_A,
        {"model.safetensors": b"garbage!" * 4},
        refs={"main": COMMIT_A},
    )
    with pytest.raises(ladle.CheckpointError) as err:
        ladle.open_checkpoint("hf://org/bad")
    assert str(err.value).startswith(f"hf://org/bad@{COMMIT_A}: ")
    assert "model.safetensors: not a readable safetensors file" in str(err.value)


def test_push_to_hub_of_a_file_is_refused_before_anything_is_sent(tmp_path, monkeypatch):
    import huggingface_hub

    def contacted(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", contacted)
    file = tmp_path / "merged.safetensors"
    save_file({"w": torch.ones(1)}, file)
    with pytest.raises(ValueError) as err:
        push_to_hub(file, "org/model")
    assert str(err.value) == f"push_to_hub: expected an output directory, found {file}"


def test_a_hub_models_license_files_and_license_reach_a_merged_directory(local_hub, tmp_path):
    # A Llama-style license asks redistributions to carry its text; the output had none,
    # and its card no license field (the Hub then lists the merge as unlicensed).
    out = ladle.uniform_soup(["hf://org/m", "hf://org/m"], out=tmp_path / "merged", device="cpu")
    assert (out / "LICENSE").read_bytes() == b"MIT License ..."
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\nbase_model:\n") and "# m\n" not in card


def test_a_hub_subfolders_model_comes_under_the_repositorys_license(local_hub, tmp_path):
    # diffusers keeps LICENSE.md and the card at the repository's root, not in unet/.
    hub, model = local_hub
    files = {
        "LICENSE.md": b"CreativeML Open RAIL++-M License ...",
        "README.md": b"---\nlicense: openrail++\n---\n# SD\n",
        "unet/model.safetensors": weights(model),
        "unet/config.json": b'{"_class_name": "UNet2DConditionModel"}',
        "vae/LICENSE": b"never fetched: another subfolder",
    }
    hub.repos["org/sd"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    out = ladle.uniform_soup(["hf://org/sd/unet"] * 2, out=tmp_path / "merged", device="cpu")
    assert hub.downloaded() == {
        "LICENSE.md",
        "README.md",
        "unet/config.json",
        "unet/model.safetensors",
    }
    assert (out / "LICENSE.md").read_bytes() == files["LICENSE.md"]
    assert (out / "README.md").read_text().startswith("---\nlicense: openrail++\n")
    # A subfolder with terms of its own gives those alone.
    files["unet/LICENSE"] = b"the unet's own"
    hub.repos["org/sd"]["commits"] = {COMMIT_B: files}
    hub.repos["org/sd"]["refs"] = {"main": COMMIT_B}
    again = ladle.uniform_soup(["hf://org/sd/unet"] * 2, out=tmp_path / "again", device="cpu")
    assert sorted(p.name for p in again.iterdir() if "LICENSE" in p.name) == ["LICENSE"]
    assert (again / "LICENSE").read_bytes() == b"the unet's own"
    assert (again / "README.md").read_text().startswith("---\nbase_model:")


@pytest.mark.parametrize("url", ["hf://owner//name", "hf://models//owner/name", "hf:///name"])
def test_parse_hf_url_with_an_empty_owner_or_name_has_no_repository_id(url):
    # Found by mutation testing: without the empty-part test, huggingface_hub's validator
    # answered "malformed repository id '/owner'".
    with pytest.raises(ladle.CheckpointError, match=r": no repository id; expected hf://"):
        parse_hf_url(url)


def test_parse_hf_url_refuses_a_url_without_the_hf_prefix():
    for url in ("org/model", "hf:/org/model"):
        with pytest.raises(ladle.CheckpointError) as err:
            parse_hf_url(url)
        assert str(err.value) == (
            f"{url}: not a Hugging Face Hub source; expected hf://owner/repo[@revision][/subfolder]"
        )


@pytest.mark.parametrize("stem", ["model", "model[v2]"])  # "[": no fnmatch class
def test_local_hub_fetches_a_safetensors_index_s_shards_and_no_other_safetensors(local_hub, stem):
    # Mistral's repos keep consolidated.safetensors (the same weights again) beside the shards.
    hub, model = local_hub
    keys = sorted(model)
    parts = {f"{stem}-0000{i}-of-00002.safetensors": keys[i - 1 :: 2] for i in (1, 2)}
    index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
    files = {name: weights({k: model[k] for k in part}) for name, part in parts.items()}
    files[f"{stem}.safetensors.index.json"] = json.dumps(index).encode()
    files["consolidated.safetensors"] = b"never fetched: not in the index"
    hub.repos["org/s"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    loaded = ladle.load("hf://org/s")
    assert loaded.keys() == model.keys()
    assert all(torch.equal(loaded[k], model[k]) for k in model)
    assert hub.downloaded() == {f"{stem}.safetensors.index.json", *parts}


def test_local_hub_fetches_a_torch_index_s_shards_and_no_other_torch_file(local_hub):
    # Llama 2's repos kept consolidated.00.pth (Meta's own format) beside the shards.
    hub, model = local_hub
    keys = sorted(model)
    files = {}
    for i, part in enumerate((keys[::2], keys[1::2]), start=1):
        buffer = io.BytesIO()
        torch.save({k: model[k] for k in part}, buffer)
        files[f"pytorch_model-0000{i}-of-00002.bin"] = buffer.getvalue()
    shards = sorted(files)
    index = {"weight_map": {k: shards[i % 2] for i, k in enumerate(keys)}}
    files["pytorch_model.bin.index.json"] = json.dumps(index).encode()
    files["consolidated.00.pth"] = b"never fetched: not in the index"
    hub.repos["org/t"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    loaded = ladle.load("hf://org/t")
    assert all(torch.equal(loaded[k], model[k]) for k in model)
    assert hub.downloaded() == {"pytorch_model.bin.index.json", *shards}


@pytest.mark.parametrize(
    "name",
    [
        "pytorch_model.bin",
        "model.pt",
        "model.pth",
        "model.ckpt",
        "checkpoint-500/pytorch_model.bin",
    ],
)
def test_local_hub_fetches_a_torch_file_of_each_suffix_and_no_trainer_state(local_hub, name):
    hub, model = local_hub
    buffer = io.BytesIO()
    torch.save(model, buffer)
    folder = name.rpartition("/")[0]  # a Trainer's checkpoint folder holds its state too
    trainer = ["training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"]
    files = {f"{folder}/{t}".lstrip("/"): b"never fetched: trainer state" for t in trainer}
    files[name] = buffer.getvalue()
    hub.repos["org/t"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    loaded = ladle.load(f"hf://org/t/{folder}")
    assert all(torch.equal(loaded[k], model[k]) for k in model)
    assert hub.downloaded() == {name}


def test_local_hub_fetches_the_custom_code_a_config_names(local_hub, tmp_path):
    hub, model = local_hub
    config = {"model_type": "toy", "auto_map": {"AutoModel": "modeling_toy.ToyModel"}}
    files = {
        "model.safetensors": weights(model),
        "config.json": json.dumps(config).encode(),
        "modeling_toy.py": b"class ToyModel: ...\n",
    }
    hub.repos["org/c"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    out = ladle.uniform_soup(["hf://org/c"] * 2, out=tmp_path / "merged", device="cpu")
    assert (out / "modeling_toy.py").read_bytes() == files["modeling_toy.py"]


def test_an_offline_cache_holding_only_trainer_state_has_no_weights(hub_cache):
    files = {"training_args.bin": b"trainer state", "optimizer.pt": b"trainer state"}
    write_cached_repo(hub_cache, "org/run", COMMIT_A, files, refs={"main": COMMIT_A})
    with pytest.raises(ladle.CheckpointError) as err:
        ladle.open_checkpoint("hf://org/run")
    assert str(err.value) == (
        f"hf://org/run@{COMMIT_A}: no weights in the repository root in the Hugging Face cache "
        f"({hub_cache}), and HF_HUB_OFFLINE is set: expected *.safetensors or a torch file "
        "(*.bin, *.pt, *.pth, *.ckpt), or every shard of an index; found optimizer.pt, "
        "training_args.bin"
    )


def test_no_weights_in_a_subfolder_names_the_subfolder(hub_cache):
    files = {"model.safetensors": weights({"w": torch.ones(1)}), "unet/config.json": b"{}"}
    write_cached_repo(hub_cache, "org/sd", COMMIT_A, files, refs={"main": COMMIT_A})
    with pytest.raises(ladle.CheckpointError) as err:
        ladle.open_checkpoint("hf://org/sd/unet")
    assert str(err.value).startswith(
        f"hf://org/sd@{COMMIT_A}/unet: no weights in subfolder 'unet' in the Hugging Face cache"
    )
    assert str(err.value).endswith("; found config.json")


def test_snapshot_reads_the_cache_it_is_given_over_the_environment(hub_cache, tmp_path):
    cache = tmp_path / "other-cache"
    model = {"w": torch.arange(3.0)}
    files = {"model.safetensors": weights(model)}
    write_cached_repo(cache, "org/m", COMMIT_A, files, refs={"main": COMMIT_A})
    expected = cache / "models--org--m" / "snapshots" / COMMIT_A
    assert snapshot("hf://org/m", cache_dir=cache) == (expected, COMMIT_A)


def test_a_cached_snapshot_not_named_by_a_commit_is_refused(hub_cache):
    # Refs holding no commit hash (a cache written by hand): the checkpoint, and provenance,
    # were named hf://org/m@latest, as if pinned.
    files = {"model.safetensors": weights({"w": torch.ones(1)})}
    refs = {"main": "latest", "latest": "latest"}
    folder = write_cached_repo(hub_cache, "org/m", "latest", files, refs=refs)
    with pytest.raises(ladle.CheckpointError) as err:
        ladle.open_checkpoint("hf://org/m")
    assert str(err.value) == (
        f"hf://org/m: resolved to {folder}, which is not a cached snapshot (the cache's refs "
        "file for 'main' names no commit)"
    )


def _one_line_refusal(source: str) -> str:
    """The message of the ``CheckpointError`` that opening ``source`` raises: one line."""
    with pytest.raises(ladle.CheckpointError) as err:
        ladle.open_checkpoint(source)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_hub_that_cannot_be_reached_is_a_one_line_checkpoint_error(local_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert re.fullmatch(
        r"hf://org/m: org/m is not in the Hugging Face cache \(.*\) and the Hub could not be "
        # huggingface_hub's own words: before 1.0 "...check your internet connection..."
        r"reached \(.*(Connection refused|internet connection).*\)",
        _one_line_refusal("hf://org/m"),
    )


@pytest.mark.parametrize(
    ("body", "raised"),
    [(b"{}", "KeyError: 'id'"), (b'{"id": "org/m"}', "AssertionError: ")],
)
def test_an_endpoint_answering_json_that_is_not_the_hub_s_is_a_checkpoint_error(
    local_hub, monkeypatch, body, raised
):
    # huggingface_hub's KeyError or AssertionError reading the answers came out as they were:
    # a traceback from the CLI (HF_ENDPOINT naming another service, a wrong mirror path).
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Other(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Other)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        message = _one_line_refusal("hf://org/other")
    finally:
        server.shutdown()
        server.server_close()
    assert message.startswith(f"hf://org/other: cannot fetch from the Hub ({raised}")
    assert message.endswith(
        f"the answers of {endpoint} are not a Hugging Face Hub's; check HF_ENDPOINT"
    )


def test_an_endpoint_ending_in_a_slash_asks_the_hub_s_own_paths(local_hub, monkeypatch):
    # huggingface_hub strips the "/" from its default endpoint, not from endpoint=: ladle
    # passed "https://hf-mirror.com/" on, and asked "//api/models/...", which mirrors answer
    # 404 (found by a static review of the Hub's online paths).
    hub, model = local_hub
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")
    loaded = ladle.load("hf://org/m")
    assert all(torch.equal(loaded[key], model[key]) for key in model)
    assert hub.raw_paths and not [path for path in hub.raw_paths if path.startswith("//")]


@pytest.mark.parametrize(("status", "reason"), [(503, "Service Unavailable"), (429, "Too Many")])
def test_a_hub_that_answers_with_an_error_status_is_not_said_to_be_unreachable(
    local_hub, status, reason
):
    # huggingface_hub falls back on the cache when the Hub answers 429 or 5xx, as when it
    # cannot be reached, and says it cannot find the files: the message said "the Hub could
    # not be reached" of a Hub that had answered.
    hub, _ = local_hub
    hub.repos["org/busy"] = {"refuse": status}
    message = _one_line_refusal("hf://org/busy")
    assert re.fullmatch(
        rf"hf://org/busy: org/busy is not in the Hugging Face cache \(.*\) and the Hub answered "
        rf"{status} \(.*{status}.*{reason}.*\)",
        message,
    )
    assert "could not be reached" not in message


def test_a_gated_repository_says_to_ask_for_access_with_the_hub_s_words(local_hub):
    # GatedRepoError is a RepositoryNotFoundError to huggingface_hub: it was said to be "not
    # found", and the Hub's "Visit ... to ask for access" was dropped.
    hub, _ = local_hub
    why = "Access to model org/g is restricted. Visit https://hub.example/org/g to ask for access."
    hub.repos["org/g"] = {"refuse": 403, "code": "GatedRepo", "why": why}
    message = _one_line_refusal("hf://org/g")
    assert message.startswith(
        "hf://org/g: org/g is gated: ask for access on its page on the Hub, then use an account "
        "that has it (set HF_TOKEN or run `hf auth login`) ("
    )
    assert "Visit https://hub.example/org/g to ask for access." in message


def test_a_download_s_own_failure_is_a_checkpoint_error_naming_the_source(local_hub):
    # The Hub said the weights are stored with Xet, and its token route answered without the
    # connection's headers: huggingface_hub raised a bare ValueError ("Xet headers have not
    # been correctly set by the server."), hf_transfer and hf_xet raise RuntimeErrors; none
    # named the source, and the CLI printed a traceback.
    pytest.importorskip("hf_xet")  # without it, huggingface_hub downloads over HTTP instead
    import huggingface_hub

    if int(huggingface_hub.__version__.split(".")[0]) < 2:
        # Before 2.0 it knew no Xet (0.x), or handed the headless answer to hf_xet, which
        # retried for minutes before its own network error (1.22); that is not this case.
        pytest.skip("huggingface_hub < 2 does not check the Xet token route's headers")
    hub, model = local_hub
    hub.repos["org/x"] = {
        "refs": {"main": COMMIT_A},
        "commits": {COMMIT_A: {"model.safetensors": weights(model)}},
        "xet": True,
    }
    with pytest.raises(ladle.CheckpointError) as err:
        ladle.open_checkpoint("hf://org/x")
    expected = r"hf://org/x: cannot fetch from the Hub \(ValueError: .*Xet.*\)"
    assert re.fullmatch(expected, str(err.value))
    assert isinstance(err.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("url", "revision"),
    [
        ("hf://org/m@%2Ftmp%2Fx", "/tmp/x"),
        ("hf://org/m@..%2F..%2Fx", "../../x"),
        ("hf://org/m@a%2F.%2Fb", "a/./b"),
        ("hf://org/m@a%5Cb", "a\\b"),
        ("hf://org/m@a%00b", "a\x00b"),
        ("hf://org/m@a%0Ab", "a\nb"),
    ],
)
def test_a_revision_no_git_ref_can_have_is_refused_before_the_cache_is_touched(url, revision):
    # huggingface_hub joins the revision into the cache's refs/ folder unchecked: "/tmp/x" and
    # "../../x" named files outside the cache (read offline, written once a server answered).
    with pytest.raises(ladle.CheckpointError) as err:
        parse_hf_url(url)
    assert str(err.value) == (
        f"{url}: revision {revision!r} is no branch, tag or commit (it has a '.' or '..' part, "
        "a leading '/', a backslash or a control character)"
    )


def test_a_cache_that_cannot_be_written_is_a_checkpoint_error(local_hub, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "file"))
    with pytest.raises(ladle.CheckpointError, match=r"^hf://org/m: cannot fetch from the Hub \("):
        ladle.open_checkpoint("hf://org/m")


class FakeHfApi:
    """Records what push_to_hub asks of ``huggingface_hub.HfApi``; sends nothing."""

    calls: ClassVar[list[tuple[str, dict]]] = []
    fails: ClassVar[Exception | None] = None
    remote: ClassVar[list[str]] = []  # the files the repository holds already

    def __init__(self, **kwargs: object) -> None:
        self.calls.append(("HfApi", kwargs))

    def create_repo(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def list_repo_files(self, repo_id: str, **kwargs: object) -> list[str]:
        self.calls.append(("list_repo_files", {"repo_id": repo_id, **kwargs}))
        return list(self.remote)

    def upload_folder(self, **kwargs: object) -> object:
        self.calls.append(("upload_folder", kwargs))
        if self.fails is not None:
            raise self.fails

        class CommitInfo(str):  # huggingface_hub's CommitInfo is a str of the commit URL too
            commit_url = "https://hub.example/org/merged/commit/abc"

        return CommitInfo("https://hub.example/org/merged")


@pytest.mark.parametrize("private", [None, True])
def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch, private):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    # A mirror's address with a trailing "/" gave "//api/..." URLs, which mirrors answer 404.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    url = push_to_hub(tmp_path, "org/merged", private=private)
    assert url == "https://hub.example/org/merged/commit/abc"
    # private=None is left out: huggingface_hub before 0.27 sent it as JSON null
    chosen = {} if private is None else {"private": private}
    assert FakeHfApi.calls == [
        ("HfApi", {"endpoint": "http://127.0.0.1:9", "library_name": "ladle"}),
        (
            "create_repo",
            {"repo_id": "org/merged", "repo_type": "model", **chosen, "exist_ok": True},
        ),
        ("list_repo_files", {"repo_id": "org/merged", "repo_type": "model"}),
        (
            "upload_folder",
            {
                "repo_id": "org/merged",
                "folder_path": tmp_path,
                "commit_message": "Upload merge made with ladle",
                "delete_patterns": None,
            },
        ),
    ]


def test_push_to_hub_deletes_the_weights_an_earlier_upload_left_at_the_root(tmp_path, monkeypatch):
    # An earlier sharded merge's index stayed beside the new model.safetensors, and was
    # read instead of it (the index comes first): the repository served the old merge.
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    remote = [
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model[1].bin",  # a name with glob characters
        "model.safetensors",  # replaced by the upload
        "unet/diffusion_pytorch_model.safetensors",  # another folder's: left alone
        "eval_results.json",
        # a trainer's state, no weights (ladle never reads them as such): left alone
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "training_args.bin",
    ]
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "remote", remote)
    ladle.save({"w": torch.ones(2)}, tmp_path / "out")
    push_to_hub(tmp_path / "out", "org/merged")
    patterns = FakeHfApi.calls[-1][1]["delete_patterns"]
    # huggingface_hub deletes what its own filter matches among the repository's files
    deleted = set(filter_repo_objects(remote, allow_patterns=patterns))
    assert deleted == {
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model[1].bin",
    }


def test_a_failed_push_to_hub_is_a_ladle_error_naming_the_folder_and_the_cause(
    tmp_path, monkeypatch
):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "fails", ConnectionError("refused\n  twice"))
    with pytest.raises(ladle.LadleError) as err:
        push_to_hub(tmp_path, "org/merged")
    assert str(err.value) == (
        f"push_to_hub: uploading {tmp_path} to org/merged failed: ConnectionError: refused twice"
    )


def test_offline_a_cache_without_the_card_or_tokenizer_still_merges(
    local_hub, monkeypatch, tmp_path
):
    # huggingface_hub ≥ 1 records the repository's files (trees/<commit>.json) and, offline,
    # refused the snapshot when a file ladle asks for (README.md, LICENSE) was not cached:
    # "org/m is not in the Hugging Face cache", after `hf download org/m model.safetensors`.
    from huggingface_hub import snapshot_download

    hub, model = local_hub
    snapshot_download(
        "org/m",
        allow_patterns=["model.safetensors", "config.json"],
        cache_dir=tmp_path / "cache",  # (huggingface_hub read HF_HUB_CACHE at its import)
        endpoint=hub.url,
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    loaded = ladle.load("hf://org/m")
    assert all(torch.equal(loaded[k], model[k]) for k in model)
    assert hub.requests == []


def test_a_hub_merge_logs_no_warning_of_its_own_patterns(local_hub, caplog):
    # Every hf:// input logged "No files matched allow_patterns=['additional_chat_templates/
    # *.jinja'], ignore_patterns=[...]" (huggingface_hub ≥ 1 warns of patterns that match
    # nothing): the templates folder is asked for only where the repository has one.
    _, model = local_hub
    with caplog.at_level("WARNING"):
        loaded = ladle.load("hf://org/m")
    assert torch.equal(loaded["layer.weight"], model["layer.weight"])
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def test_a_subfolder_the_repository_lacks_is_named_as_holding_no_weights(local_hub):
    # The Hub answers 404 for the tree of a folder it lacks: "cannot fetch from the Hub (404
    # Client Error. Entry Not Found for url: ...)", as if the network had failed.
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.open_checkpoint("hf://org/m/unte")
    assert str(info.value).startswith(f"hf://org/m@{COMMIT_B}/unte: no weights in subfolder 'unte'")


@pytest.mark.parametrize("status", [401, 403])
def test_a_repository_the_hub_refuses_is_named_as_refused_not_unreachable(local_hub, status):
    # "org/g is not in the Hugging Face cache (...) and the Hub could not be reached": it
    # was reached, and said no.
    hub, _ = local_hub
    hub.repos["org/g"] = {"refs": {}, "commits": {}, "refuse": status}
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.open_checkpoint("hf://org/g")
    assert str(info.value).startswith(f"hf://org/g: the Hub refused access to org/g ({status}: ")
    assert str(info.value).endswith(
        "set HF_TOKEN or run `hf auth login` with an account that can read it"
    )
    assert "\n" not in str(info.value)


def test_a_revision_the_repository_lacks_is_named_main_where_none_was_given(local_hub):
    hub, _ = local_hub
    hub.repos["org/empty"] = {"refs": {}, "commits": {}}
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.open_checkpoint("hf://org/empty")
    assert str(info.value) == "hf://org/empty: revision 'main' not found in org/empty"  # None


def test_a_hub_index_whose_shards_lie_in_a_folder_below_it_is_read(local_hub):
    # A local folder of these files is read; from the Hub the shards, one folder down, were
    # never fetched ("no weights in the repository root").
    hub, model = local_hub
    index = {"weight_map": dict.fromkeys(model, "shards/part-1.safetensors")}
    files = {
        "model.safetensors.index.json": json.dumps(index).encode(),
        "shards/part-1.safetensors": weights(model),
    }
    hub.repos["org/deep"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    loaded = ladle.load("hf://org/deep")
    assert all(torch.equal(loaded[k], model[k]) for k in model)


def test_a_bad_hub_index_is_named_by_its_source(local_hub):
    hub, _ = local_hub
    files = {"model.safetensors.index.json": b"{not json"}
    hub.repos["org/bad"] = {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: files}}
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.open_checkpoint("hf://org/bad")
    assert str(info.value).startswith(f"hf://org/bad@{COMMIT_A}: ")
    assert "model.safetensors.index.json: not a valid shard index" in str(info.value)


def test_an_hf_source_naming_a_file_says_to_name_its_folder(local_hub):
    # "no weights in subfolder 'model.safetensors' ... found none", of a file that is there
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.open_checkpoint("hf://org/m/model.safetensors")
    assert str(info.value) == (
        "hf://org/m/model.safetensors: an hf:// source names a repository or a folder in it, "
        "not a file ('model.safetensors'); name the folder holding it: hf://org/m"
    )


def _transport_error() -> Exception:
    """The error huggingface_hub's HTTP client raises for a Hub it cannot reach."""
    for client in ("httpx2", "httpx"):
        try:
            module = __import__(client)
        except ImportError:
            continue
        return module.ConnectError("[Errno 111] Connection refused")
    import requests

    return requests.ConnectionError("[Errno 111] Connection refused")


def test_a_hub_gone_after_the_download_is_a_checkpoint_error_pointing_at_the_cache(
    local_hub, monkeypatch
):
    # httpx's errors derive from no OSError: listing the repository's files after
    # snapshot_download had fallen back on the cache raised httpx's ConnectError, a
    # traceback on the command line. The listing decides which file holds the weights (the
    # cache may hold a variant alone), so without it ladle says so, and how to read the cache.
    _, model = local_hub
    ladle.load(f"hf://org/m@{COMMIT_B}")  # now in the cache

    def unreachable(*args, **kwargs):
        raise _transport_error()

    monkeypatch.setattr("ladle.hub._listed", unreachable)
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.load(f"hf://org/m@{COMMIT_B}")
    assert str(info.value).startswith(f"hf://org/m@{COMMIT_B}: the Hub could not be reached (")
    assert str(info.value).endswith(
        "; to read what the Hugging Face cache holds, set HF_HUB_OFFLINE=1"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = ladle.load(f"hf://org/m@{COMMIT_B}")
    assert torch.equal(loaded["layer.weight"], model["layer.weight"])


def test_an_unreachable_hub_while_fetching_is_a_checkpoint_error(local_hub, monkeypatch):
    def unreachable(*args, **kwargs):
        raise _transport_error()

    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable)
    with pytest.raises(ladle.CheckpointError, match=r"^hf://org/m: the Hub could not be reached"):
        ladle.open_checkpoint("hf://org/m")


# --- pinned by mutation testing (round 4): each fails on the mutant named -------------------


def test_a_bug_while_listing_the_repository_is_raised_as_itself(local_hub, monkeypatch):
    # Only an unreachable Hub is said so (H08: any exception became "the Hub could not be
    # reached ... set HF_HUB_OFFLINE=1", hiding the bug).
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the listing")

    monkeypatch.setattr("ladle.hub._listed", broken)
    with pytest.raises(RuntimeError, match="^a bug in the listing$"):
        ladle.open_checkpoint("hf://org/m")


def test_offline_a_folder_named_like_a_weights_file_is_no_weights_file(hub_cache):
    # Offline, the cache's folders are listed with a "/" (H07: without it the folder
    # b.safetensors/ counted as a second weights file: "expected one weights file").
    files = {"a.safetensors": weights({"w": torch.ones(2)}), "b.safetensors/notes.txt": b"x"}
    write_cached_repo(hub_cache, "org/name", COMMIT_A, files, refs={"main": COMMIT_A})
    with ladle.open_checkpoint("hf://org/name") as checkpoint:
        assert checkpoint.get("w").tolist() == [1.0, 1.0]


def test_an_hf_source_given_twice_to_one_merge_is_fetched_once(hub_cache):
    # Twice fetched, the two could be two commits (main moving between), and online each
    # fetch is a round of requests.
    from unittest import mock

    import ladle.hub

    _, model, other = family(3, seed=41)
    write_cached_repo(
        hub_cache, "org/m", COMMIT_A, {"model.safetensors": weights(model)}, refs={"main": COMMIT_A}
    )
    with mock.patch.object(ladle.hub, "snapshot", wraps=ladle.hub.snapshot) as fetched:
        merged = ladle.task_arithmetic(["hf://org/m", "hf://org/m", other], "hf://org/m")
    assert [call.args[0] for call in fetched.call_args_list] == ["hf://org/m"]
    # base + 2·(model − model) + (other − model), in float32 as task arithmetic sums
    expected = ladle.task_arithmetic([model, model, other], model)
    for key in model:
        assert torch.equal(merged[key], expected[key])


def test_a_repository_of_weights_alone_is_fetched_without_a_warning(local_hub, caplog):
    # huggingface_hub logged "No files matched allow_patterns=[...]" (on stderr, in the CLI)
    # for ladle's fetch of the config, card and license files it did not have.
    hub, model = local_hub
    hub.repos["org/bare"] = {
        "refs": {"main": COMMIT_A},
        "commits": {COMMIT_A: {"model.safetensors": weights(model), ".gitattributes": b"*"}},
    }
    with caplog.at_level(logging.DEBUG):
        loaded = ladle.load("hf://org/bare")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert hub.downloaded() == {"model.safetensors"}
    for key in model:
        assert torch.equal(loaded[key], model[key])


class _Payload:
    """Unpickling this would create a marker file: code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_snapshot_folder_gone_or_no_folder_is_a_checkpoint_error_naming_the_url(tmp_path):
    # A pruned cache: open_snapshot raised a bare FileNotFoundError (NotADirectoryError for
    # a file) naming neither the URL nor as a LadleError, against its docstring.
    from ladle.hub import open_snapshot

    name = f"hf://org/name@{COMMIT_A}"
    (tmp_path / "file").write_text("x")
    for folder, why in ((tmp_path / "gone", "No such file"), (tmp_path / "file", "Not a dir")):
        with pytest.raises(ladle.CheckpointError) as info:
            open_snapshot(folder, name)
        assert str(info.value).startswith(f"{name}: cannot read its snapshot {folder} ({why}")
        assert str(info.value).endswith("); fetch it again")


def test_an_unsafe_torch_file_of_a_hub_repo_is_an_unsafe_checkpoint_error(hub_cache, tmp_path):
    # Re-raised by open_snapshot as a plain CheckpointError: `except UnsafeCheckpointError`,
    # which catches the same file read locally, missed it.
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, buffer)
    write_cached_repo(
        hub_cache,
        "org/evil",
        COMMIT_A,
        {"pytorch_model.bin": buffer.getvalue()},
        refs={"main": COMMIT_A},
    )
    for call in (
        lambda: ladle.load("hf://org/evil"),
        lambda: ladle.uniform_soup(["hf://org/evil", {"w": torch.ones(2)}]),
    ):
        with pytest.raises(ladle.UnsafeCheckpointError, match=rf"^hf://org/evil@{COMMIT_A}: "):
            call()
    assert not marker.exists()


def test_a_snapshot_link_to_a_blob_the_cache_lost_is_named(hub_cache):
    # "no weights ...; found config.json, model.safetensors": the missing file listed as found.
    files = {"config.json": b"{}", "model.safetensors": weights({"w": torch.ones(2)})}
    folder = write_cached_repo(hub_cache, "org/lost", COMMIT_A, files, refs={"main": COMMIT_A})
    blob = (folder / "model.safetensors").resolve()
    blob.unlink()
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.load("hf://org/lost")
    assert str(info.value) == (
        f"hf://org/lost@{COMMIT_A}: 'model.safetensors' (1 of its 1 weights files) is not in "
        f"the Hugging Face cache ({hub_cache}): its snapshot's link leads to no file (a "
        "download cut short, or the cache cleaned); HF_HUB_OFFLINE is set"
    )


def test_a_torch_shard_s_error_names_its_hub_source(hub_cache):
    # The shards load lazily, after open_snapshot named its errors: only the cache's path.
    shard = io.BytesIO()
    torch.save({"w": torch.ones(2)}, shard)
    index = {"weight_map": {"w": "s1.bin", "v": "s1.bin"}}
    files = {"pytorch_model.bin.index.json": json.dumps(index).encode(), "s1.bin": shard.getvalue()}
    write_cached_repo(hub_cache, "org/badidx", COMMIT_A, files, refs={"main": COMMIT_A})
    with pytest.raises(ladle.CheckpointError, match=rf"^hf://org/badidx@{COMMIT_A}: .*lists 'v'"):
        ladle.load("hf://org/badidx")


def test_a_revision_the_offline_cache_cannot_read_says_so_not_a_fetch(hub_cache):
    # "cannot fetch from the Hub ([Errno 21] Is a directory: .../refs/release)" while offline,
    # then "cannot read the Hugging Face cache ([Errno 21] ...)": the revision is not cached.
    files = {"model.safetensors": weights({"w": torch.ones(2)})}
    write_cached_repo(hub_cache, "org/m", COMMIT_A, files, refs={"release/v2": COMMIT_A})
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.load("hf://org/m@release")
    assert re.fullmatch(
        r"hf://org/m@release: revision 'release' of org/m is not in the Hugging Face cache "
        r"\(.*\) and HF_HUB_OFFLINE is set: .*; it holds the revision 'release/v2' beneath it: "
        r"write hf://org/m@release%2Fv2",
        str(info.value),
    ), info.value
    assert ladle.load("hf://org/m@release%2Fv2")["w"].tolist() == [1.0, 1.0]
