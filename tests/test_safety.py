"""Bad input and faults: nothing lost, nothing executed, one clear error."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DictCheckpoint, assert_bit_for_bit, family, recording_bar
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import ladle
from ladle.testing import model_families
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


TORCH_FILES: dict[bool, bytes] = {}


def torch_file_bytes(legacy: bool) -> bytes:
    """A small torch file, in the legacy (pickles, then the storages' bytes) or zip format."""
    if legacy not in TORCH_FILES:
        import io

        buffer = io.BytesIO()
        tensors = {"a": torch.randn(4, 3), "b": torch.arange(5)}
        torch.save(tensors, buffer, _use_new_zipfile_serialization=not legacy)
        TORCH_FILES[legacy] = buffer.getvalue()
    return TORCH_FILES[legacy]


@given(
    legacy=st.booleans(),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
)
def test_fuzzed_torch_files_raise_only_checkpoint_error(tmp_path_factory, legacy, flips, cut):
    """Corrupt or truncated torch files: unpickling them raised IndexError, KeyError,
    struct.error, AssertionError, TypeError, zipfile.BadZipFile or MemoryError, and a legacy
    file cut inside a global's name was called unsafe."""
    data = bytearray(torch_file_bytes(legacy))
    # The legacy format ends with the storages' bytes (48 + 40, each after an 8-byte size):
    # flipping a size there would make torch allocate gigabytes before finding it wrong.
    flippable = len(data) - (48 + 8 + 40 + 8 if legacy else 0)
    for position, value in flips:
        data[position % flippable] ^= value
    if cut is not None:
        data = data[:cut]
    path = tmp_path_factory.mktemp("fuzz") / "pytorch_model.bin"
    path.write_bytes(bytes(data))
    try:
        loaded = ladle.load(path)
    except ladle.CheckpointError as err:
        assert "pytorch_model.bin" in str(err)
        event(type(err).__name__)
        if cut is not None and not flips:  # truncated, never refused as unsafe ("PK" alone too)
            assert not isinstance(err, ladle.UnsafeCheckpointError), (cut, err)
    else:  # a flip in a name or a value: still a state dict
        assert all(isinstance(value, torch.Tensor) for value in loaded.values())


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


@pytest.mark.parametrize("out_name", ["small.safetensors", "small"])
def test_a_file_size_limit_met_at_the_final_flush_leaves_nothing(tmp_path, out_name):
    # 100 kB of tensor: written into the file's buffer, it fails only when flushed at commit.
    out = tmp_path / "out" / out_name
    out.parent.mkdir()
    code = textwrap.dedent(
        f"""
        import resource, signal, torch, ladle
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            ladle.uniform_soup([{{"w": torch.ones(25_000)}}], out={str(out)!r}, device="cpu")
        except ladle.OutputError as err:
            print(type(err).__name__, err)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OutputError {out}: "), result.stdout
    assert "File too large" in result.stdout
    assert os.listdir(out.parent) == []


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


def test_task_vectors_whose_sum_overflows_float32_are_an_error():
    base = {"w": torch.zeros(4)}
    big = {"w": torch.full((4,), 3e38)}
    message = r"4 of the 4 merged values of key 'w' overflow float32 .*every input is finite"
    with pytest.raises(ladle.NonFiniteError, match=message):
        ladle.task_arithmetic([big, big], base, device="cpu")
    merged = ladle.task_arithmetic([big, big], base, device="cpu", allow_nonfinite=True)
    assert torch.isinf(merged["w"]).all()


def overflowing_float16(tmp_path):
    """A float16 base and fine-tune whose task arithmetic at scale 3 overflows float16 in
    entry 0 alone: 6e4 + 3·(6.5e4 − 6e4) ≈ 7.5e4 > 65504."""
    base = {"w": torch.tensor([6e4, 1.0, -2.0], dtype=torch.float16), "n": torch.arange(3)}
    model = {"w": torch.tensor([6.5e4, 2.0, -1.0], dtype=torch.float16), "n": torch.arange(3)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(model, tmp_path / "m.safetensors")
    return base, model


def test_merged_values_that_overflow_the_output_dtype_are_an_error(tmp_path):
    base, model = overflowing_float16(tmp_path)
    expected = base["w"].float() + 3 * (model["w"].float() - base["w"].float())
    message = (
        r"1 of the 3 merged values of key 'w' overflow float16 \(largest finite value 65504\) "
        r"although every input is finite; lower the scale or weights where the method has them, "
        r"or merge into a wider dtype \(dtype=torch.float32, --dtype float32\); "
        r"allow_nonfinite=True \(--allow-nonfinite\) keeps them as they are"
    )
    with pytest.raises(ladle.NonFiniteError, match=r"the merged state dict: " + message):
        ladle.task_arithmetic([model], base, scale=3.0, device="cpu")
    out = tmp_path / "out.safetensors"
    paths = [str(tmp_path / "m.safetensors")], str(tmp_path / "base.safetensors")
    with pytest.raises(ladle.NonFiniteError, match=message):
        ladle.task_arithmetic(*paths, scale=3.0, out=out, device="cpu")
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "m.safetensors"]  # nothing left
    # The remedies the message names: a wider dtype keeps every value ...
    wide = ladle.task_arithmetic(*paths, scale=3.0, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(wide["w"], expected, rtol=0, atol=0)
    # ... and allow_nonfinite writes the Inf as it is.
    kept = ladle.task_arithmetic(*paths, scale=3.0, out=out, device="cpu", allow_nonfinite=True)
    written = load_file(kept)["w"]
    assert torch.isinf(written[0]) and written[0] > 0
    assert torch.equal(written[1:], expected[1:].half())


def test_overflow_names_the_rows_of_a_chunked_tensor():
    base = {"w": torch.zeros(64, 4, dtype=torch.float16)}
    model = {"w": torch.ones(64, 4, dtype=torch.float16)}
    model["w"][40, 2] = 4e4
    message = r"1 of the 16 merged values of key 'w' in rows 40–43 overflow"
    with pytest.raises(ladle.NonFiniteError, match=message):
        # 64 bytes of float32 (the compute dtype) per chunk: 4 rows of 4
        ladle.task_arithmetic([model], base, scale=2.0, device="cpu", chunk_bytes=64)


def test_overflow_in_a_row_longer_than_a_chunk_names_flat_entries_and_a_nonfinite_input():
    base = {"w": torch.zeros(1, 64, dtype=torch.float16)}
    model = {"w": torch.ones(1, 64, dtype=torch.float16)}
    model["w"][0, 41] = 4e4
    # one row of 256 bytes of float32, read 16 entries at a time (ladle.engine.chunk_shape)
    message = r"1 of the 16 merged values of key 'w' in \(flat\) entries 32–47 overflow"
    with pytest.raises(ladle.NonFiniteError, match=message):
        ladle.task_arithmetic([model], base, scale=2.0, device="cpu", chunk_bytes=64)
    model["w"][0, 41] = math.inf  # an input's own Inf is named, found in the same entries
    with pytest.raises(ladle.NonFiniteError, match=r"model 0 .*'w'"):
        ladle.task_arithmetic([model], base, device="cpu", chunk_bytes=64, dtype=torch.float16)


def test_overflow_in_a_row_longer_than_a_chunk_read_from_files_names_flat_entries(tmp_path):
    # Every input is read again, as the chunk was (16 entries of the merged view), to find
    # which holds a NaN or Inf: a safetensors file reads exactly that view's rows.
    base = {"w": torch.zeros(1, 64, dtype=torch.float16)}
    model = {"w": torch.ones(1, 64, dtype=torch.float16)}
    model["w"][0, 41] = 4e4
    save_file(base, tmp_path / "base.safetensors")
    save_file(model, tmp_path / "m.safetensors")
    message = r"1 of the 16 merged values of key 'w' in \(flat\) entries 32–47 overflow"
    with pytest.raises(ladle.NonFiniteError, match=message):
        ladle.task_arithmetic(
            [tmp_path / "m.safetensors"],
            tmp_path / "base.safetensors",
            scale=2.0,
            device="cpu",
            chunk_bytes=64,
        )


def test_overflow_in_the_cast_to_a_narrower_output_dtype_is_an_error():
    # Finite in float32, beyond bfloat16's largest finite value (3.3895e38) once rounded.
    big = {"w": torch.tensor([3.3999e38, 1.0])}
    assert ladle.uniform_soup([big, big], device="cpu")["w"][0] == big["w"][0]
    with pytest.raises(ladle.NonFiniteError, match=r"1 of the 2 .* overflow bfloat16"):
        ladle.uniform_soup([big, big], device="cpu", dtype=torch.bfloat16)


def test_each_method_checks_its_merged_values_for_overflow():
    base = {"w": torch.zeros(4, dtype=torch.float16)}
    models = [{"w": torch.full((4,), 4e4, dtype=torch.float16)} for _ in range(2)]
    with pytest.raises(ladle.NonFiniteError, match="overflow float16"):
        ladle.ties(models, base, scale=2.0, device="cpu")  # trim="global": inputs checked first
    with pytest.raises(ladle.NonFiniteError, match="overflow float16"):
        ladle.ties(models, base, scale=2.0, trim="tensor", density=1.0, device="cpu")
    with pytest.raises(ladle.NonFiniteError, match="overflow float16"):
        ladle.dare(models, base, density=0.5, device="cpu")  # survivors ×2: 8e4
    with pytest.raises(ladle.NonFiniteError, match="overflow float16"):
        ladle.dare(models, base, density=0.5, combine="ties", device="cpu")
    with pytest.raises(ladle.NonFiniteError, match="overflow float16"):
        ladle.task_arithmetic(models, base, device="cpu")  # 4e4 + 4e4


@pytest.mark.parametrize(
    "merge",
    [
        lambda models, base, scale, **kw: ladle.task_arithmetic(models, base, scale=scale, **kw),
        lambda models, base, scale, **kw: ladle.ties(models, base, scale=scale, **kw),
        lambda models, base, scale, **kw: ladle.ties(
            models, base, scale=scale, trim="tensor", **kw
        ),
        lambda models, base, scale, **kw: ladle.dare(models, base, scale=scale, density=0.5, **kw),
    ],
    ids=["task_arithmetic", "ties", "ties tensor", "dare"],
)
@given(
    family=model_families(n=st.integers(1, 3), dtypes=[torch.float16]),
    scale=st.one_of(st.floats(-1e4, 1e4), st.floats(-1e9, 1e9)),
)
def test_a_merge_fails_exactly_when_its_output_would_hold_inf(merge, family, scale):
    base, models = family
    written = merge(models, base, scale, device="cpu", allow_nonfinite=True)
    overflows = any(not torch.isfinite(t).all() for t in written.values() if t.is_floating_point())
    event(f"overflows: {overflows}")  # both branches run: see --hypothesis-show-statistics
    try:
        checked = merge(models, base, scale, device="cpu")
    except ladle.NonFiniteError as err:
        assert overflows, err
        assert "although every input is finite" in str(err)
    else:
        assert not overflows
        assert checked.keys() == written.keys()
        for key in written:
            assert torch.equal(checked[key], written[key]), key


def test_overflow_is_one_line_in_cli(tmp_path, capsys):
    overflowing_float16(tmp_path)
    from ladle.cli import main

    model, base = str(tmp_path / "m.safetensors"), str(tmp_path / "base.safetensors")
    args = ["task-arithmetic", model, "--base", base, "--scale", "3"]
    assert main([*args, "-o", str(tmp_path / "a.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ladle: ") and err.count("\n") == 1
    assert "merged values of key 'w' overflow float16" in err and "--dtype float32" in err
    assert not (tmp_path / "a.safetensors").exists()
    assert main([*args, "-o", str(tmp_path / "b.safetensors"), "--dtype", "float32"]) == 0
    assert main([*args, "-o", str(tmp_path / "c.safetensors"), "--allow-nonfinite"]) == 0


def test_overflow_in_a_patched_sign_tie_is_an_error():
    # Entry 0 is a sign tie (τ = ±6016, exact in float16) that the majority (+, from entries 1
    # and 2) decides after the merge pass: its patch (amend), base + 2·6016 = 71040, overflows
    # float16, while the pass itself wrote the base's finite value there.
    base = {"w": torch.tensor([59008.0, 1.0, 1.0], dtype=torch.float16)}
    models = [
        {"w": torch.tensor([65024.0, 2.0, 2.0], dtype=torch.float16)},
        {"w": torch.tensor([52992.0, 2.0, 2.0], dtype=torch.float16)},
    ]
    taus = [m["w"].float() - base["w"].float() for m in models]
    assert taus[0][0] == -taus[1][0] == 6016
    message = r"1 of the 1 merged values of key 'w' overflow float16"
    with pytest.raises(ladle.NonFiniteError, match=message):
        ladle.ties(models, base, density=1.0, scale=2.0, device="cpu")
    merged = ladle.ties(models, base, density=1.0, scale=2.0, device="cpu", allow_nonfinite=True)
    assert torch.isinf(merged["w"][0]) and merged["w"][0] > 0
    assert torch.equal(merged["w"][1:], torch.tensor([3.0, 3.0], dtype=torch.float16))


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


CUTTER = textwrap.dedent(
    """
    import os, sys, torch, ladle
    from safetensors.torch import save_file
    folder = sys.argv[1]
    paths = []
    for i in range(3):  # the integer key is stored last, after 64 KiB of floats
        save_file({"a": torch.randn(64, 256), "zz": torch.arange(4096, dtype=torch.int32)},
                  f"{folder}/m{i}.safetensors")
        paths.append(f"{folder}/m{i}.safetensors")

    class Cut:
        def __init__(self, total, **kwargs):
            self.done = False
        def update(self, n):
            if not self.done:  # the files lose their last bytes once merging has begun
                self.done = True
                for p in paths:
                    os.truncate(p, os.path.getsize(p) - 8192)
        def close(self):
            pass

    try:
        ladle.uniform_soup(paths, out=f"{folder}/out.safetensors", progress=Cut, device="cpu")
    except ladle.CheckpointError as err:
        print("CheckpointError", err)
    """
)


def test_an_input_cut_short_before_its_integer_tensor_is_read_is_an_error_not_a_crash(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", CUTTER, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr  # a SIGBUS would be -7
    assert result.stdout.startswith("CheckpointError "), result.stdout
    assert "'zz'" in result.stdout
    assert not [p for p in os.listdir(tmp_path) if "out" in p]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_a_failed_merge_holds_no_map_of_the_inputs_it_did_not_blame(tmp_path):
    paths = []
    for i in range(3):
        bad = float("nan") if i == 1 else 2.0
        save_file(
            {"a": torch.randn(64, 64), "z": torch.tensor([1.0, bad])},
            tmp_path / f"m{i}.safetensors",
        )
        paths.append(tmp_path / f"m{i}.safetensors")

    def mapped(path) -> int:
        with open("/proc/self/maps") as maps:
            return sum(str(path) in line for line in maps)

    try:
        ladle.uniform_soup(paths, out=tmp_path / "o.safetensors", device="cpu", chunk_bytes=4096)
    except ladle.NonFiniteError as err:
        held = err  # as a REPL's sys.last_value would
        assert "model 1" in str(held)
        assert mapped(paths[0]) == 0 and mapped(paths[2]) == 0
    else:
        raise AssertionError("the NaN was not found")


E4M3 = torch.float8_e4m3fn  # casts saturate: 520 and Inf become 448, never Inf
saturating = pytest.mark.skipif(
    ladle.engine.saturation_limit(E4M3) is None,
    reason="this torch casts to float8_e4m3fn with NaN for an overflow (2.8): none saturates",
)


@saturating
@pytest.mark.parametrize("streamed", [False, True])
def test_float8_e4m3fn_outputs_that_would_saturate_are_an_error(tmp_path, streamed):
    # base 384 and model 448 (both exact): 384 + s·64. Values up to 464, halfway to 480 (not
    # representable), round to 448 (a tie goes to the even 448); past 464 they overflow.
    base = {"w": torch.tensor([384.0, 1.0]).to(E4M3)}
    model = {"w": torch.tensor([448.0, 1.0]).to(E4M3)}
    out = {"out": tmp_path / "m.safetensors", "overwrite": True} if streamed else {}

    def merged(scale, **kw):
        result = ladle.task_arithmetic([model], base, scale=scale, device="cpu", **out, **kw)
        return ladle.load(result) if streamed else result

    assert merged(1.25)["w"].float().tolist() == [448.0, 1.0]  # 464: rounds to 448
    with pytest.raises(ladle.NonFiniteError, match=r"1 of the 2 .*'w' overflow float8_e4m3fn"):
        merged(1.2501)
    with pytest.raises(ladle.NonFiniteError, match="overflow float8_e4m3fn"):
        merged(-20.0)  # 384 − 1280: negative values saturate too
    assert merged(3.0, allow_nonfinite=True)["w"].float().tolist() == [448.0, 1.0]


@given(scale=st.floats(-12.0, 12.0), values=st.lists(st.floats(-448, 448), min_size=1, max_size=6))
def test_a_float8_e4m3fn_merge_fails_exactly_when_a_value_rounds_past_448(scale, values):
    base = {"w": torch.tensor(values).to(E4M3)}
    model = {"w": torch.tensor(values[::-1]).to(E4M3)}
    wide = ladle.task_arithmetic([model], base, scale=scale, device="cpu", dtype=torch.float32)
    overflows = bool((wide["w"].abs() > 464).any())
    event(f"overflows: {overflows}")
    try:
        narrow = ladle.task_arithmetic([model], base, scale=scale, device="cpu")
    except ladle.NonFiniteError:
        assert overflows
    else:
        assert not overflows
        assert torch.equal(narrow["w"], wide["w"].to(E4M3))


def test_a_patched_sign_tie_that_would_saturate_float8_e4m3fn_is_an_error():
    # Entry 0 ties (τ = ±32); the majority (+) patches it to 384 + 3·32 = 480 after the pass.
    base = {"w": torch.tensor([384.0, 1.0, 1.0]).to(E4M3)}
    models = [
        {"w": torch.tensor([416.0, 2.0, 2.0]).to(E4M3)},
        {"w": torch.tensor([352.0, 2.0, 2.0]).to(E4M3)},
    ]
    with pytest.raises(ladle.NonFiniteError, match=r"1 of the 1 merged values .* float8_e4m3fn"):
        ladle.ties(models, base, density=1.0, scale=3.0, device="cpu")
    patched = ladle.ties(models, base, density=1.0, scale=1.0, device="cpu")
    assert patched["w"].float().tolist() == [416.0, 2.0, 2.0]


@saturating
def test_saturation_limits_follow_the_rounding_of_torchs_casts():
    from ladle.engine import saturation_limit

    assert saturation_limit(E4M3) == (464.0, False)
    for dtype in (torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float16):
        assert saturation_limit(dtype) is None  # overflow gives Inf or NaN: checked after
    below, at, above = torch.tensor([463.99, 464.0, 464.01]).to(E4M3).float().tolist()
    assert below == at == above == 448.0  # the cast saturates, so only the limit tells
    assert torch.tensor([479.0]).to(torch.float32).to(E4M3).float().item() == 448.0


@saturating
def test_greedy_soups_that_would_saturate_float8_e4m3fn_are_an_error(tmp_path):
    a, b = {"w": torch.full((4,), 1000.0)}, {"w": torch.full((4,), 1000.0)}
    with pytest.raises(ladle.NonFiniteError, match=r"the greedy soup: 4 of the 4 .*e4m3fn"):
        ladle.greedy_soup([a, b], lambda sd: 1.0, dtype=E4M3)
    out = tmp_path / "g.safetensors"
    with pytest.raises(ladle.NonFiniteError, match=rf"{out}: 4 of the 4 .*e4m3fn"):
        ladle.greedy_soup([a, b], lambda sd: 1.0, dtype=E4M3, out=out)
    assert not out.exists()
    with pytest.raises(ladle.NonFiniteError, match="e4m3fn"):
        ladle.ratatouille([a, b], selection="greedy", evaluate=lambda sd: 1.0, dtype=E4M3)
    # Inputs already in float8_e4m3fn whose soup stays in it: the same check.
    small = {"w": torch.full((4,), 400.0).to(E4M3)}
    kept = ladle.greedy_soup([small, small], lambda sd: 1.0)
    assert kept.state_dict["w"].dtype == E4M3
    saturated = ladle.greedy_soup([a, b], lambda sd: 1.0, dtype=E4M3, allow_nonfinite=True)
    assert saturated.state_dict["w"].float().tolist() == [448.0] * 4


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="reads /proc/self/fd (Linux)")
def test_a_float8_overflow_stops_the_reading_threads_and_closes_the_inputs(tmp_path, monkeypatch):
    import functools
    import os
    import threading

    import ladle.engine as engine

    # The accelerator's reading threads, on the CPU.
    monkeypatch.setattr(engine, "fold", functools.partial(engine.fold, prefetch=4, readers=3))
    model = {f"k{j:03d}": torch.ones(64, 64) for j in range(60)}
    model["k000"] = torch.full((64, 64), 1000.0)  # first in the output's order
    paths = []
    for i in range(2):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    with pytest.raises(ladle.NonFiniteError, match="e4m3fn") as caught:
        ladle.uniform_soup(paths, out=tmp_path / "o", dtype=E4M3, chunk_bytes=4096)
    # The exception (kept, as a debugger or a REPL keeps it) holds no running merge.
    assert caught.value.__traceback__ is not None
    assert not [t for t in threading.enumerate() if t.name.startswith("ladle-read")]
    held = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
    assert not [path for path in held if path.startswith(str(tmp_path))]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("FP32", torch.float32),
        ("float8_e4m3fn", E4M3),
        (torch.float64, torch.float64),
    ],
)
def test_output_dtypes_may_be_named_as_the_cli_and_recipes_name_them(name, expected):
    models = [{"w": torch.ones(3)}, {"w": torch.full((3,), 3.0)}]
    assert ladle.uniform_soup(models, dtype=name)["w"].dtype == expected
    assert ladle.greedy_soup(models, lambda sd: 1.0, dtype=name).state_dict["w"].dtype == expected
    base = {"w": torch.zeros(3)}
    assert ladle.ties(models, base, dtype=name)["w"].dtype == expected


@pytest.mark.parametrize("name", ["fp17", "int8", "", 16, torch.int32])
def test_an_output_dtype_that_is_no_floating_dtype_is_a_value_error_naming_it(name):
    models = [{"w": torch.ones(3)}, {"w": torch.full((3,), 3.0)}]
    with pytest.raises(ValueError, match=r"dtype: expected a signed floating output dtype .*found"):
        ladle.uniform_soup(models, dtype=name)
    with pytest.raises(ValueError, match=r"dtype: expected a signed floating output dtype"):
        ladle.greedy_soup(models, lambda sd: 1.0, dtype=name)


@pytest.mark.parametrize("name", ["float8_e8m0fnu", "float4_e2m1fn_x2"])
def test_output_dtypes_that_cannot_hold_signed_values_one_per_element_are_refused(name):
    models = [{"w": torch.tensor([-1.0, 0.3])}, {"w": torch.tensor([-3.0, 0.5])}]
    with pytest.raises(ValueError, match=r"dtype: expected a signed floating output dtype"):
        ladle.uniform_soup(models, dtype=name)
    with pytest.raises(ValueError, match=r"dtype: expected a signed floating output dtype"):
        ladle.uniform_soup(models, dtype=getattr(torch, name))


def test_inputs_stored_in_an_unsigned_float_dtype_need_an_output_dtype():
    e8 = torch.float8_e8m0fnu
    base = {"s": torch.tensor([1.0, 4.0]).to(e8), "w": torch.tensor([1.0, 2.0])}
    model = {"s": torch.tensor([4.0, 4.0]).to(e8), "w": torch.tensor([1.0, 2.0])}
    with pytest.raises(ValueError, match=r"key 's' is stored as float8_e8m0fnu.*dtype="):
        ladle.task_arithmetic([model], base, scale=-1.0)
    with pytest.raises(ValueError, match=r"key 's' is stored as float8_e8m0fnu"):
        ladle.greedy_soup([model, model], lambda sd: 1.0)
    merged = ladle.task_arithmetic([model], base, scale=-1.0, dtype=torch.float32)
    assert merged["s"].tolist() == [-2.0, 4.0]  # 1 - (4 - 1), 4 - 0


def test_a_greedy_soup_checks_the_dtypes_of_every_model_that_could_rank_best():
    e8 = torch.float8_e8m0fnu
    plain, scale_only = {"s": torch.tensor([-5.0, 2.0])}, {"s": torch.tensor([1.0, 4.0]).to(e8)}
    score = lambda sd: 2.0 if sd["s"].dtype == e8 else 1.0  # noqa: E731  the e8m0 model wins
    for models in ([plain, scale_only], [scale_only, plain]):
        with pytest.raises(ValueError, match=r"key 's' is stored as float8_e8m0fnu"):
            ladle.greedy_soup(models, score)
    soup = ladle.greedy_soup([plain, scale_only], score, dtype=torch.float32)
    assert soup.state_dict["s"].tolist() == [-2.0, 3.0]


def test_unwritable_dtypes_are_refused_before_any_pass_over_the_inputs(monkeypatch):
    import ladle.methods.ties as ties_module

    def no_pass(*args, **kwargs):
        raise AssertionError("the threshold pass ran before the dtype was refused")

    monkeypatch.setattr(ties_module, "_thresholds", no_pass)
    e8 = torch.float8_e8m0fnu
    base = {"s": torch.tensor([1.0, 4.0]).to(e8), "w": torch.zeros(8)}
    model = {"s": torch.tensor([4.0, 4.0]).to(e8), "w": torch.ones(8)}
    with pytest.raises(ValueError, match=r"key 's' is stored as float8_e8m0fnu"):
        ladle.ties([model, model], base)


def test_packed_float_dtypes_cannot_be_merged_even_into_another_dtype():
    packed = {"w": torch.tensor([1, 2, 3], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}
    for dtype in (None, torch.float32):
        with pytest.raises(ValueError, match=r"packs several values per element: unpack it"):
            ladle.uniform_soup([packed, packed], dtype=dtype)
    with pytest.raises(ladle.IncompatibleError, match=r"floating and packed tensors"):
        ladle.uniform_soup([{"w": torch.zeros(3)}, packed])


def _method_call(method: str, kwargs: dict):
    """A call of ``ladle.<method>`` on a small family with ``kwargs`` (a soup takes no base;
    a greedy soup an evaluate that scores every soup 0)."""
    base, *models = family(3)
    if method in ("uniform_soup", "greedy_soup"):
        extra = {"evaluate": lambda state_dict: 0.0} if method == "greedy_soup" else {}
        return lambda: getattr(ladle, method)(models, **extra, **kwargs)
    return lambda: getattr(ladle, method)(models, base, **kwargs)


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("uniform_soup", {"weights": [1.0, "2"]}, "weights[1]: expected a number, found str"),
        ("uniform_soup", {"weights": "12"}, "weights: expected a sequence of numbers, found str"),
        ("uniform_soup", {"weights": 3}, "weights: expected a sequence of numbers, found int"),
        (
            "uniform_soup",
            {"weights": torch.tensor(3.0)},  # torch's "iteration over a 0-d tensor"
            "weights: expected a sequence of numbers, found Tensor",
        ),
        (
            "task_arithmetic",
            {"weights": np.array(3.0)},  # numpy's "iteration over a 0-d array"
            "weights: expected a sequence of numbers, found ndarray",
        ),
        ("uniform_soup", {"weights": [1.0, 1j]}, "weights[1]: expected a number, found complex"),
        ("task_arithmetic", {"scale": "0.5"}, "scale: expected a number, found str"),
        (
            "task_arithmetic",
            {"weights": [None, 1]},
            "weights[0]: expected a number, found None",
        ),
        ("ties", {"density": "0.5"}, "density: expected a number, found str"),
        ("dare", {"density": None}, "density: expected a number, found None"),
        ("dare", {"scale": [1.0]}, "scale: expected a number, found list"),
        ("greedy_soup", {"scores": ["a", 1.0]}, "scores[0]: expected a number, found str"),
        # A mapping was read as its keys (weights {0: 1.0, 1: 1.0} weighed 0 and 1), a set
        # in no order; an iterator was used up by one check and found empty by the next
        (
            "uniform_soup",
            {"weights": {0: 1.0, 1: 1.0}},
            "weights: expected a sequence of numbers, found dict",
        ),
        (
            "task_arithmetic",
            {"weights": {1.0, 3.0}},
            "weights: expected a sequence of numbers, found set",
        ),
        (
            "greedy_soup",
            {"scores": {0: 0.9, 1: 0.1}},
            "scores: expected a sequence of numbers, found dict",
        ),
        (
            "uniform_soup",
            {"weights": (w for w in (3.0, 1.0))},
            "weights: expected a sequence of numbers, found generator",
        ),
    ],
)
def test_a_parameter_that_is_no_number_is_a_type_error_naming_it(method, kwargs, message):
    # float() raised its own error, naming no parameter ("could not convert string to float"),
    # or took weights="12" as the weights 1 and 2
    call = _method_call(method, kwargs)
    with pytest.raises(TypeError) as err:
        call()
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("method", "kwargs", "name"),
    [
        ("uniform_soup", {"weights": [1.0, True]}, "weights[1]"),
        ("uniform_soup", {"weights": torch.tensor([True, False])}, "weights[0]"),
        ("task_arithmetic", {"scale": True}, "scale"),
        ("task_arithmetic", {"weights": [False, 1.0]}, "weights[0]"),
        ("ties", {"density": True}, "density"),
        ("ties", {"scale": torch.tensor(True)}, "scale"),
        ("dare", {"density": True}, "density"),
        ("dare", {"scale": np.bool_(True)}, "scale"),
        ("dare", {"seed": True}, "seed"),
        ("greedy_soup", {"scores": [True, 0.5]}, "scores[0]"),
    ],
)
def test_a_bool_where_a_number_is_expected_is_a_type_error_naming_it(method, kwargs, name):
    # Before: True was read as 1 (scale=True merged at 1.0x, density=True kept everything,
    # seed=True drew seed 1's masks): a flag passed in the wrong place ran a merge.
    call = _method_call(method, kwargs)
    kind = "an integer" if name == "seed" else "a number"
    with pytest.raises(TypeError) as err:
        call()
    assert str(err.value) == f"{name}: expected {kind}, found bool"


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("task_arithmetic", {"scale": np.timedelta64(1, "s")}, "scale: expected a number, found "),
        ("ties", {"density": np.timedelta64(1, "D")}, "density: expected a number, found "),
        (
            "uniform_soup",
            {"weights": [1.0, np.timedelta64(1, "s")]},
            "weights[1]: expected a number",
        ),
        ("dare", {"seed": np.timedelta64(3, "s")}, "seed: expected an integer, found timedelta64"),
    ],
)
def test_a_numpy_duration_where_a_number_is_expected_is_a_type_error_naming_it(
    method, kwargs, message
):
    # numpy's timedelta64 is a signed integer to Python's number classes: scale=np.timedelta64(1)
    # merged at 1.0x, density=np.timedelta64(1, "D") kept everything.
    call = _method_call(method, kwargs)
    with pytest.raises(TypeError) as err:
        call()
    assert str(err.value).startswith(message)


def test_numbers_as_numpy_scalars_and_0_d_tensors_are_still_accepted():
    base, *models = family(3)
    weights = [torch.tensor(1.0), np.float32(3.0)]
    expected = ladle.uniform_soup(models, weights=[0.25, 0.75])
    for key, tensor in ladle.uniform_soup(models, weights=weights).items():
        assert torch.equal(tensor, expected[key]), key
    merged = ladle.ties(models, base, density=torch.tensor(0.5), scale=np.int64(1))
    assert all(torch.equal(merged[k], v) for k, v in ladle.ties(models, base, density=0.5).items())


@pytest.mark.filterwarnings("ignore::ladle.ModelStockWarning")  # this family's cosines: < 0
@pytest.mark.parametrize("context", ["meta device", "float64 default", "float16 default"])
@pytest.mark.parametrize("method", ["ties", "dare", "task_arithmetic", "model_stock"])
def test_torch_s_default_device_and_dtype_change_no_merge(tmp_path, context, method):
    # DARE drew float64 numbers under torch.set_default_dtype(torch.float64): other masks for
    # the same seed (503 of 1000 entries differed); under `with torch.device("meta")` (a
    # model skeleton being built) TIES and DARE made their own tensors on the meta device.
    base, *models = family(3, seed=5)
    files = []
    for i, model in enumerate([base, *models]):
        files.append(ladle.save(model, tmp_path / f"m{i}.safetensors"))
    merge = getattr(ladle, method)
    expected = merge(models, base, device="cpu")
    default = torch.get_default_dtype()
    try:
        if context == "meta device":
            scope = torch.device("meta")
        else:
            torch.set_default_dtype(torch.float64 if "64" in context else torch.float16)
            scope = torch.device("cpu")
        with scope:
            results = [
                merge(models, base, device="cpu"),
                merge(files[1:], files[0], device="cpu"),
                ladle.load(merge(files[1:], files[0], device="cpu", out=tmp_path / "o")),
            ]
    finally:
        torch.set_default_dtype(default)
    for result in results:
        assert result.keys() == expected.keys()
        assert all(torch.equal(result[k], expected[k]) for k in expected)


METHODS = ["uniform_soup", "task_arithmetic", "ties", "dare", "model_stock"]


def _merged(method: str, models: list, base: dict) -> dict:
    if method == "uniform_soup":
        return ladle.uniform_soup(models, device="cpu")
    return getattr(ladle, method)(models, base, device="cpu")


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e4m3fnuz"])
@pytest.mark.parametrize("method", METHODS)
def test_a_float8_input_holding_nan_is_named_as_any_other(method, dtype):
    # torch has no isfinite for these two: NotImplementedError, a traceback from the CLI
    bad = torch.tensor([1.0, float("nan"), 0.5, 2.0]).to(getattr(torch, dtype))
    models = [{"w": torch.ones(4).to(bad.dtype)}, {"w": bad}]
    with pytest.raises(ladle.NonFiniteError) as info:
        _merged(method, models, {"w": torch.zeros(4)})
    assert str(info.value).startswith("model 1 (<state dict>): key 'w' holds NaN or Inf values")


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("method", METHODS)
def test_complex32_tensors_merge_as_complex64_ones_rounded_back(method):
    # The finiteness check summed the result in complex32, which torch cannot: every method
    # failed with NotImplementedError unless allow_nonfinite=True.
    values = [torch.tensor([1 + 1j, 0.5 - 2j, -3 + 0.25j]) * (i + 1) for i in range(3)]
    wide = [{"w": v.to(torch.complex64)} for v in values]
    half = [{"w": v.to(torch.complex32)} for v in values]
    merged = _merged(method, half[1:], half[0])["w"]
    assert merged.dtype == torch.complex32
    expected = _merged(method, wide[1:], wide[0])["w"].to(torch.complex32)
    assert torch.equal(torch.view_as_real(merged), torch.view_as_real(expected))


@pytest.mark.parametrize(
    ("call", "name", "found"),
    [
        (lambda out: ladle.uniform_soup(family(2), out=out, overwrite="no"), "overwrite", "str"),
        (lambda out: ladle.save(family(1)[0], out, overwrite=1), "overwrite", "int"),
        (
            lambda out: ladle.ties(family(2), family(1)[0], allow_nonfinite="no"),
            "allow_nonfinite",
            "str",
        ),
        (lambda out: ladle.greedy_soup(family(2), lambda sd: 1.0, strict="no"), "strict", "str"),
        (lambda out: ladle.diff(*family(2), allow_nonfinite=None), "allow_nonfinite", "None"),
    ],
    ids=["overwrite-soup", "overwrite-save", "allow_nonfinite", "strict", "diff"],
)
def test_a_flag_that_is_no_bool_is_a_type_error_naming_it(tmp_path, call, name, found):
    # Truthy: overwrite="no" replaced an existing output; allow_nonfinite="no" let NaN through
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"")
    with pytest.raises(TypeError) as info:
        call(out)
    assert str(info.value) == f"{name}: expected True or False, found {found}"
    assert out.read_bytes() == b""


def test_diff_of_packed_float4_tensors_is_refused_naming_the_key():
    # torch's NotImplementedError ("copy_kernel" not implemented for 'Float4_e2m1fn_x2'), a
    # traceback from the CLI; the merges already refused it so
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no packed float4")
    packed = {"w": torch.ones(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}
    with pytest.raises(ValueError, match=r"key 'w' is stored as float4_e2m1fn_x2, which packs"):
        ladle.diff(packed, packed)


class _CountingReads(DictCheckpoint):
    def __init__(self, tensors, reads):
        super().__init__(tensors)
        self.reads = reads

    def get_slice(self, key, rows):
        self.reads.append(key)
        return super().get_slice(key, rows)


@pytest.mark.parametrize("method", ["ties", "model_stock", "slerp", "dare"])
@pytest.mark.parametrize("progress", [torch.ones(2), np.array([1, 0]), 0, [], ""])
def test_a_progress_that_is_no_bar_is_refused_before_a_preparing_pass_reads(method, progress):
    # ties, model_stock and slerp took progress's truth value in their preparing pass: a
    # tensor or array raised torch's or numpy's "ambiguous" error, and 0, [] or "" was
    # refused only once a whole pass had read every model
    reads: list = []
    base, *models = [_CountingReads(t, reads) for t in family(3)]
    with pytest.raises(TypeError) as info:
        if method == "slerp":
            ladle.slerp(models, progress=progress)
        else:
            getattr(ladle, method)(models, base, progress=progress)
    found = type(progress).__name__ if not isinstance(progress, np.ndarray) else "ndarray"
    assert (
        str(info.value)
        == f"progress: expected True, False, None or a tqdm-like class, found {found}"
    )
    assert reads == []


def test_progress_bars_of_numpy_bools_and_without_a_standard_error(monkeypatch):
    # np.bool_(True) was refused ("found bool"); progress=True where sys.stderr is None
    # (pythonw, daemons) raised tqdm's AttributeError writing to None
    base, *models = family(3)
    expected = ladle.ties(models, base)
    calls: list = []
    assert_bit_for_bit(ladle.ties(models, base, progress=np.bool_(False)), expected)
    monkeypatch.setattr("tqdm.auto.tqdm", recording_bar(calls))
    assert_bit_for_bit(ladle.ties(models, base, progress=np.bool_(True)), expected)
    assert [call[0] for call in calls].count("init") == calls.count(("close",)) == 2  # 2 passes
    monkeypatch.setattr(sys, "stderr", None)
    assert_bit_for_bit(ladle.ties(models, base, progress=True), expected)


@pytest.mark.filterwarnings("ignore::ladle.ModelStockWarning")  # this family's scalar key
@pytest.mark.parametrize("method", ["uniform_soup", "ties", "model_stock", "dare", "slerp"])
def test_overwrite_and_max_shard_size_are_checked_alike_in_every_method(tmp_path, method):
    # overwrite="no" was taken without out= by every method but ratatouille_init (which
    # refused it); max_shard_size refused numpy and 0-d tensor integers that chunk_bytes takes
    base, *models = family(3)

    def run(**kwargs):
        if method == "slerp":
            return ladle.slerp(models, **kwargs)
        if method == "uniform_soup":
            return ladle.uniform_soup(models, **kwargs)
        return getattr(ladle, method)(models, base, **kwargs)

    with pytest.raises(TypeError, match="^overwrite: expected True or False, found str$"):
        run(overwrite="no")
    for size in (np.int64(300), torch.tensor(300)):
        out = run(out=tmp_path / f"{method}-{type(size).__name__}", max_shard_size=size)
        assert_bit_for_bit(ladle.load(out), run())
    with pytest.raises(TypeError, match="^max_shard_size: expected bytes .* found Tensor$"):
        run(out=tmp_path / "bool", max_shard_size=torch.tensor(True))


def _checkpoint_get(device):
    return ladle.open_checkpoint({"w": torch.ones(2)}).get("w", device=device)


@pytest.mark.parametrize(
    ("call", "kind", "message"),
    [  # each was torch's or Python's own error, or a silent misreading
        (lambda: _checkpoint_get(True), TypeError, "device: expected a torch device or its"),
        (lambda: _checkpoint_get(1.5), ValueError, "device: expected cpu, cuda, cuda:N"),
        (lambda: ladle.load({"w": torch.ones(1)}, device=10**400), ValueError, "device: expected"),
        (lambda: ladle.uniform_soup(b"ab"), TypeError, "models: expected a sequence of models"),
        (
            lambda: ladle.uniform_soup(family(2), progress=torch.ones(2)),
            TypeError,
            "progress: expected True, False, None or a tqdm-like class, found Tensor",
        ),
        (
            lambda: ladle.testing.assert_state_dicts_close(*family(2)[:1] * 2, equal_nan="no"),
            TypeError,
            "equal_nan: expected True or False, found str",
        ),
        (lambda: ladle.load_recipe(None), TypeError, "path: expected a str or os.PathLike path"),
        (
            lambda: ladle.uniform_soup(family(2), chunk_bytes=torch.tensor(True)),
            TypeError,
            "chunk_bytes: expected an int (bytes), found bool",
        ),
        (
            lambda: ladle.run_recipe("r.toml", on_output="x"),
            TypeError,
            "on_output: expected a callable or None, found str",
        ),
        (
            lambda: ladle.testing.default_tolerances("float16"),
            TypeError,
            "dtype: expected a torch.dtype, found str",
        ),
        (lambda: ladle.testing.state_dicts(bound=True), TypeError, "bound: expected a number"),
        (lambda: ladle.testing.state_dicts(buffers="no"), TypeError, "buffers: expected True"),
        (
            lambda: ladle.testing.state_dicts(shapes=[("w", (2,))]),
            TypeError,
            "shapes: expected a mapping of keys to shapes, found list",
        ),
    ],
    ids=[
        "get-bool",
        "get-float",
        "load-huge",
        "models-bytes",
        "progress-tensor",
        "equal_nan",
        "recipe-path",
        "chunk_bytes",
        "on_output",
        "tolerances",
        "bound",
        "buffers",
        "shapes",
    ],
)
def test_arguments_of_the_wrong_kind_are_named(call, kind, message):
    with pytest.raises(kind) as info:
        call()
    assert str(info.value).startswith(message)


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="no packed float4")
def test_a_dtype_no_merge_can_write_is_named_with_the_model_or_base_holding_it():
    # "<state dict>: key 'w' ...": of which state dict, the base or a model?
    packed = lambda: {"w": torch.ones(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}  # noqa: E731
    e8m0 = {"w": torch.ones(2).to(torch.float8_e8m0fnu)}
    for call, named in (
        (lambda: ladle.task_arithmetic([packed(), packed()], packed(), device="cpu"), "base"),
        (lambda: ladle.uniform_soup([e8m0, e8m0], device="cpu"), "model 0"),
        (lambda: ladle.greedy_soup([packed(), packed()], lambda sd: 1.0), "model 0"),
    ):
        with pytest.raises(ValueError, match=rf"^{named} \(<state dict>\): key 'w' is stored as"):
            call()


def test_an_overflow_of_the_float32_arithmetic_is_named_as_such_not_the_output_s():
    # float32 inputs merged into float64: the message said the values "overflow float64
    # (largest finite value 1.79769e+308)", which holds 6e38, and advised lowering weights
    # alone; bfloat16 ones (6e38 exactly 0 once scaled) were told to merge into float32.
    base = {"w": torch.tensor([0.0, 1.0])}
    models = [{"w": torch.tensor([3e38, 1.0])}] * 2
    with pytest.raises(ladle.NonFiniteError) as info:
        ladle.task_arithmetic(models, base, dtype=torch.float64, device="cpu")
    assert str(info.value) == (
        "the merged state dict: 1 of the 2 merged values of key 'w' overflow float32 (largest "
        "finite value 3.40282e+38) although every input is finite; lower the scale or weights "
        "where the method has them, or give the merge float64 inputs (it then computes in "
        "float64); allow_nonfinite=True (--allow-nonfinite) keeps them as they are"
    )
    wide = [{"w": m["w"].double()} for m in models]  # as advised: finite
    merged = ladle.task_arithmetic(wide, {"w": base["w"].double()}, device="cpu")
    assert merged["w"].tolist() == [float(torch.tensor(3e38)) * 2, 1.0]
    low, high = ({"w": torch.tensor([v], dtype=torch.bfloat16)} for v in (-3e38, 3e38))
    with pytest.raises(ladle.NonFiniteError) as info:
        ladle.task_arithmetic([high], low, scale=0.5, device="cpu")
    assert (
        "overflow bfloat16 (largest finite value 3.38953e+38) or float32, which the merge "
        "computes in, although every input is finite" in str(info.value)
    )
    assert "wider dtype" not in str(info.value)


def test_an_overflow_of_a_float32_output_of_a_float64_merge_advises_float64():
    # "merge into a wider dtype (dtype=torch.float32)" of an output already float32.
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    models = [{"w": torch.full((2,), 3e38, dtype=torch.float64)}] * 2
    with pytest.raises(ladle.NonFiniteError) as info:
        ladle.task_arithmetic(models, base, dtype=torch.float32, device="cpu")
    assert "or merge into a wider dtype (dtype=torch.float64, --dtype float64)" in str(info.value)
    assert "float32, which" not in str(info.value)
