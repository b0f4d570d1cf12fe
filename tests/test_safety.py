"""Bad input and faults: nothing lost, nothing executed, one clear error."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import family
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import ladle
from ladle.writer import TEMP_MARK

VALID = None


def valid_file_bytes() -> bytes:
    global VALID
    if VALID is None:
        import io

        from safetensors.torch import save

        VALID = save({"a": torch.randn(4, 3), "b": torch.arange(5)}, metadata={"k": "v"})
        assert isinstance(io.BytesIO(VALID).read(), bytes)
    return VALID


def read_everything(path) -> None:
    with ladle.open_checkpoint(path) as ckpt:
        for key in ckpt.keys():
            ckpt.shape(key), ckpt.dtype(key)
            ckpt.get(key)


@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 400)),
)
def test_fuzzed_safetensors_raise_only_checkpoint_error(tmp_path_factory, flips, cut):
    data = bytearray(valid_file_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[:cut]
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(bytes(data))
    try:
        read_everything(path)
    except ladle.CheckpointError as err:
        assert "m.safetensors" in str(err)


@given(header=st.binary(max_size=200))
def test_random_headers_raise_only_checkpoint_error(tmp_path_factory, header):
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    try:
        read_everything(path)
    except ladle.CheckpointError as err:
        assert "m.safetensors" in str(err)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("<Q", 2**60) + b"{}",  # header size far beyond the file
        struct.pack("<Q", 8) + b'{"a":1}',  # not a header of tensors
        b"PK\x03\x04" + b"\0" * 60,  # wrong magic: a zip where safetensors is expected
    ],
)
def test_oversized_or_wrong_headers_are_checkpoint_errors(tmp_path, data):
    (tmp_path / "m.safetensors").write_bytes(data)
    with pytest.raises(ladle.CheckpointError, match="m.safetensors"):
        read_everything(tmp_path / "m.safetensors")


def test_truncated_file_fails_in_cli_with_one_line(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(family(1)[0], good)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-10])
    result = run_cli("soup", str(good), str(bad), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "bad.safetensors" in result.stderr
    assert not (tmp_path / "out").exists()


def run_cli(*args: str, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ladle.cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        timeout=120,
    )


def leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if TEMP_MARK in name]


def save_family(tmp_path, n=3, rows=256):
    paths = []
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        model = {"big": torch.randn(rows, 1024, generator=gen), "small": torch.randn(3)}
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("out_name", ["soup", "soup.safetensors"])
def test_file_size_limit_mid_write_fails_cleanly(tmp_path, out_name):
    import resource
    import signal

    paths = save_family(tmp_path)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "out" / out_name
    out.parent.mkdir()
    result = run_cli("soup", *paths, "-o", str(out), "--no-progress", preexec=limit)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ladle: error:")
    # The line names the output and the tensor being written, and why it failed.
    assert f"{out}: writing 'big' failed: File too large" in result.stderr, result.stderr
    assert os.listdir(out.parent) == []  # no final file, no temporaries


@pytest.mark.slow
def test_a_failed_write_is_an_output_error_and_an_os_error(tmp_path):
    paths = save_family(tmp_path, n=2)
    out = tmp_path / "soup.safetensors"
    code = textwrap.dedent(
        f"""
        import errno, resource, signal, sys, ladle
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            ladle.uniform_soup({paths!r}, out={str(out)!r}, device="cpu")
        except ladle.OutputError as err:
            assert isinstance(err, OSError) and isinstance(err, ladle.LadleError)
            assert err.__cause__.errno == errno.EFBIG
            print(err)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}: writing 'big' failed: File too large\n"
    assert sorted(os.listdir(tmp_path)) == ["m0.safetensors", "m1.safetensors"]


KILLER = textwrap.dedent(
    """
    import os, signal, sys, ladle

    class KillHalfway:
        def __init__(self, total, **kwargs):
            self.total, self.done = total, 0
        def update(self, n):
            self.done += n
            if self.done > self.total // 2:
                os.kill(os.getpid(), signal.SIGKILL)
        def close(self):
            pass

    ladle.uniform_soup(sys.argv[2:], out=sys.argv[1], progress=KillHalfway, device="cpu",
                       chunk_bytes=64 * 1024, max_shard_size=300_000)
    """
)


@pytest.mark.slow
def test_sigkill_mid_write_leaves_no_final_output_and_next_run_cleans_up(tmp_path):
    paths = save_family(tmp_path)
    out = tmp_path / "out" / "soup"
    out.parent.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLER, str(out), *paths], timeout=120)
    assert killed.returncode == -9
    assert not out.exists()
    assert len(leftovers(out.parent)) == 1  # recognisable by its temporary name
    ladle.uniform_soup(paths, out=out, device="cpu")
    assert leftovers(out.parent) == []  # the dead process's leftovers were removed
    expected = ladle.uniform_soup(paths, device="cpu")
    merged = ladle.load(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_two_merges_writing_the_same_output_one_wins_whole(tmp_path):
    paths = save_family(tmp_path, n=4, rows=512)
    out = tmp_path / "out" / "soup"
    out.parent.mkdir()
    groups = [paths[:2], paths[2:]]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ladle.cli",
                "soup",
                *group,
                "-o",
                str(out),
                "--overwrite",
                "--max-shard-size",
                "1MB",
                "--no-progress",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group in groups
    ]
    for p in procs:
        p.communicate(timeout=120)
    codes = [p.returncode for p in procs]
    assert 0 in codes
    merged = ladle.load(out)
    candidates = [ladle.uniform_soup(group, device="cpu") for group in groups]
    assert any(all(torch.equal(merged[k], c[k]) for k in c) for c in candidates)
    assert leftovers(out.parent) == []


def test_inputs_are_never_modified_by_a_merge(tmp_path):
    paths = save_family(tmp_path, n=2, rows=8)
    before = [Path(p).read_bytes() for p in paths]
    ladle.uniform_soup(paths, out=tmp_path / "o.safetensors")
    assert [Path(p).read_bytes() for p in paths] == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_is_an_error_naming_model_and_key(bad):
    models = family(3)
    models[2]["layer.bias"][1] = bad
    with pytest.raises(ladle.NonFiniteError, match=r"model 2 .*'layer.bias'"):
        ladle.uniform_soup(models, device="cpu")
    merged = ladle.uniform_soup(models, device="cpu", allow_nonfinite=True)
    assert not torch.isfinite(merged["layer.bias"][1])
    assert torch.isfinite(merged["layer.weight"]).all()


# Soups and task arithmetic check results rather than inputs (their kernels propagate them): a
# NaN or Inf must still be found, named, in a model whose weight is 0 and in a file.
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    ("merge", "where"),
    [
        (lambda models: ladle.uniform_soup(models, weights=[1, 1, 0], device="cpu"), "model 2"),
        (lambda models: ladle.task_arithmetic(models[:2], models[2], device="cpu"), "base"),
        (
            lambda models: ladle.task_arithmetic(
                models[1:], models[0], weights=[1.0, 0.0], scale=0.0, device="cpu"
            ),
            "model 1",
        ),
    ],
    ids=["soup weight 0", "task arithmetic base", "task arithmetic weight 0 scale 0"],
)
def test_linear_methods_name_the_nonfinite_input_whatever_its_weight(tmp_path, bad, merge, where):
    models = family(3)
    models[2]["layer.weight"][3, 0] = bad
    paths = []
    for i, model in enumerate(models):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    for sources in (models, paths):
        with pytest.raises(ladle.NonFiniteError, match=rf"{where} .*'layer.weight'"):
            merge(sources)


def test_first_nonfinite_input_of_a_chunk_is_the_one_named():
    base, *models = family(4)
    for model in models[1:]:
        model["layer.bias"][0] = float("nan")
    with pytest.raises(ladle.NonFiniteError, match=r"model 1 .*'layer.bias'"):
        ladle.task_arithmetic(models, base, device="cpu")
    base["layer.bias"][1] = float("inf")
    with pytest.raises(ladle.NonFiniteError, match=r"base .*'layer.bias'"):
        ladle.task_arithmetic(models, base, device="cpu")


def test_task_vectors_whose_sum_overflows_are_not_flagged():
    base = {"w": torch.zeros(4)}
    big = {"w": torch.full((4,), 3e38)}
    merged = ladle.task_arithmetic([big, big], base, device="cpu")
    assert torch.isinf(merged["w"]).all()


def test_large_finite_values_whose_sum_overflows_are_not_flagged():
    big = {"w": torch.full((8,), 3e38)}
    half = {"w": torch.full((8,), 6e4, dtype=torch.float16)}  # float16 sum would overflow
    assert ladle.uniform_soup([big, big], device="cpu")["w"][0].item() == pytest.approx(3e38)
    assert ladle.uniform_soup([half, half], device="cpu")["w"][0].item() == 6e4


def test_nonfinite_option_in_cli(tmp_path):
    models = family(2)
    models[1]["scalar"] = torch.tensor(float("nan"))
    paths = []
    for i, model in enumerate(models):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    from ladle.cli import main

    assert main(["soup", *paths, "-o", str(tmp_path / "a.safetensors")]) == 1
    assert main(["soup", *paths, "-o", str(tmp_path / "b.safetensors"), "--allow-nonfinite"]) == 0


def test_read_errors_on_the_prefetch_thread_reach_the_caller_and_the_thread_ends(tmp_path):
    import threading

    class Failing(ladle.Checkpoint):
        name, metadata = "failing", {}

        def keys(self):
            return ["a", "b"]

        def shape(self, key):
            return (4,)

        def dtype(self, key):
            return torch.float32

        def get_slice(self, key, rows):
            if key == "b":
                raise ladle.CheckpointError("failing: cannot read 'b'")
            return torch.ones(4)[rows]

    before = threading.active_count()
    with pytest.raises(ladle.CheckpointError, match="cannot read 'b'"):
        ladle.uniform_soup([Failing(), Failing()], device="cpu")
    assert threading.active_count() == before


METHODS_WITH_A_BASE = {
    "task_arithmetic": lambda models, base: ladle.task_arithmetic(models, base, device="cpu"),
    "ties global": lambda models, base: ladle.ties(models, base, device="cpu"),
    "ties tensor": lambda models, base: ladle.ties(models, base, trim="tensor", device="cpu"),
    "ties density 1": lambda models, base: ladle.ties(models, base, density=1.0, device="cpu"),
    "ties in chunks": lambda models, base: ladle.ties(models, base, device="cpu", chunk_bytes=8),
    "dare": lambda models, base: ladle.dare(models, base, device="cpu"),
    "dare ties": lambda models, base: ladle.dare(models, base, combine="ties", device="cpu"),
    "model_stock": lambda models, base: ladle.model_stock(models, base, device="cpu"),
}


@pytest.mark.parametrize("method", sorted(METHODS_WITH_A_BASE))
@pytest.mark.parametrize("where", ["base", "model 1"])
@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_every_method_refuses_nonfinite_inputs_naming_them(method, where, bad):
    # Methods with several passes check on the first: a later pass must not be the only one.
    base, *models = family(3)
    target = base if where == "base" else models[1]
    target["layer.weight"][2, 1] = bad
    with pytest.raises(ladle.NonFiniteError, match=rf"{where} .*'layer.weight'"):
        METHODS_WITH_A_BASE[method](models, base)
