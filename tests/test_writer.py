from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEAD_PID, family, leftover
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

import ladle
from ladle.writer import TEMP_MARK, SafetensorsWriter, parse_size


@given(max_shard=st.integers(1, 400), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_sharded_round_trip_save_then_load(tmp_path_factory, max_shard, dtype):
    model = family(1, seed=max_shard, dtype=dtype)[0]
    out = ladle.save(model, tmp_path_factory.mktemp("out") / "model", max_shard_size=max_shard)
    loaded = ladle.load(out)
    assert set(loaded) == set(model)
    for key in model:
        assert loaded[key].dtype == model[key].dtype and torch.equal(loaded[key], model[key])
    files = sorted(p.name for p in out.iterdir())
    if len(files) > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.values())
        assert set(index["weight_map"]) == set(model)
        assert set(index["weight_map"].values()) | {"model.safetensors.index.json"} == set(files)
    else:
        assert files == ["model.safetensors"]


def test_shards_respect_max_size_unless_one_tensor_is_larger(tmp_path):
    model = {f"t{i}": torch.zeros(10) for i in range(5)}  # 40 bytes each
    out = ladle.save(model, tmp_path / "m", max_shard_size=100)
    shards = sorted(out.glob("*.safetensors"))
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # as transformers names
    assert [shard.name for shard in shards] == names  # 2 + 2 + 1 tensors
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 200},
        "weight_map": {f"t{i}": names[i // 2] for i in range(5)},
    }
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert sum(f.get_tensor(k).nbytes for k in f.keys()) <= 100


def test_tensors_that_fill_a_shard_exactly_share_it(tmp_path):
    model = {"a": torch.zeros(5), "b": torch.ones(5)}  # 20 bytes each
    out = ladle.save(model, tmp_path / "fits", max_shard_size=40)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    out = ladle.save(model, tmp_path / "over", max_shard_size=39)
    assert len(list(out.glob("*.safetensors"))) == 2


def test_chunked_writes_equal_whole_writes(tmp_path):
    tensor = torch.arange(20.0).reshape(5, 4)
    with SafetensorsWriter(tmp_path / "a.safetensors", {"w": ((5, 4), torch.float32)}) as w:
        for rows in (slice(0, 2), slice(2, 3), slice(3, 5)):
            w.write("w", tensor[rows])
    ladle.save({"w": tensor}, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_failed_write_leaves_no_file_under_final_name_nor_temporaries(tmp_path):
    specs = {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}
    with pytest.raises(RuntimeError), SafetensorsWriter(tmp_path / "out", specs) as w:
        w.write("a", torch.ones(2))
        raise RuntimeError("merge failed half-way")
    assert os.listdir(tmp_path) == []


def test_incomplete_write_is_refused_and_cleaned(tmp_path):
    specs = {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}
    with (
        pytest.raises(ladle.LadleError, match="'b'"),
        SafetensorsWriter(tmp_path / "o.safetensors", specs) as w,
    ):
        w.write("a", torch.ones(2))
    assert os.listdir(tmp_path) == []


def test_rows_of_a_merged_view_are_written_but_a_flattened_chunk_of_rows_is_refused(tmp_path):
    # (2, 3, 4) read as (6, 4) or (24,) when a row of 48 bytes exceeds the chunk: such chunks
    # never hold more than one stored row (12 entries)
    tensor = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    specs = {"t": ((2, 3, 4), torch.float32)}
    with SafetensorsWriter(tmp_path / "o.safetensors", specs) as w:
        w.write("t", tensor.view(6, 4)[:3])  # rows of (6, 4)
        w.write("t", tensor.view(24)[12:20])  # entries of (24,)
        w.write("t", tensor[1, 2:])  # the last row of (6, 4)
    assert torch.equal(ladle.load(tmp_path / "o.safetensors")["t"], tensor)
    with (
        pytest.raises(ladle.LadleError, match=r"expected the next rows of 't'.*\(24,\)"),
        SafetensorsWriter(tmp_path / "p.safetensors", specs) as w,
    ):
        w.write("t", tensor.reshape(24))  # two stored rows flattened: not rows of any view


def test_out_of_order_or_wrong_dtype_writes_are_refused(tmp_path):
    specs = {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}
    with (
        pytest.raises(ladle.LadleError, match="expected the next rows of 'a'"),
        SafetensorsWriter(tmp_path / "o.safetensors", specs) as w,
    ):
        w.write("b", torch.ones(2))
    with (
        pytest.raises(ladle.LadleError, match="torch.float16"),
        SafetensorsWriter(tmp_path / "o.safetensors", specs) as w,
    ):
        w.write("a", torch.ones(2, dtype=torch.float16))


def _project(folder):
    folder.mkdir()
    (folder / "main.py").write_text("print('mine')")
    (folder / "logs").mkdir()
    return folder


@pytest.mark.parametrize(
    ("name", "make", "why"),
    [
        ("code", _project, r"is a folder without safetensors weights \(logs, main\.py\)"),
        ("notes.py", lambda p: p.write_text("mine"), "is a file, where an output not named"),
        ("m.safetensors", _project, "is a folder, where a .safetensors output is a file"),
    ],
    ids=["a folder of other files", "a file", "a folder named .safetensors"],
)
def test_overwrite_replaces_no_folder_of_other_files_nor_a_thing_of_the_other_kind(
    tmp_path, name, make, why
):
    # --overwrite deleted a folder of source code given as -o, and turned a file into a folder.
    out = tmp_path / name
    make(out)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ladle.LadleError, match=rf"^{re.escape(str(out))}: {why}.*only an earlier"):
        ladle.save({"w": torch.ones(1)}, out, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if out.is_file():
        assert out.read_text() == "mine"


@pytest.mark.parametrize("weights", ["model.safetensors", "model.safetensors.index.json"])
def test_overwrite_replaces_a_folder_holding_safetensors_weights_with_other_files(
    tmp_path, weights
):
    # A downloaded or earlier checkpoint: its weights file or index, beside config files.
    out = tmp_path / "merged"
    out.mkdir()
    (out / weights).write_text("old")
    (out / "config.json").write_text("{}")
    (out / "tokenizer").mkdir()
    ladle.save({"w": torch.ones(1)}, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert ladle.load(out)["w"].item() == 1.0


def test_overwrite_replaces_a_link_not_what_it_points_to(tmp_path):
    target = _project(tmp_path / "code")
    (tmp_path / "out").symlink_to(target)
    ladle.save({"w": torch.ones(1)}, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out").is_symlink() and (target / "main.py").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    path = ladle.save({"w": torch.zeros(1)}, tmp_path / "m.safetensors")
    with pytest.raises(ladle.LadleError, match="already exists"):
        ladle.save({"w": torch.ones(1)}, path)
    ladle.save({"w": torch.ones(1)}, path, overwrite=True)
    assert ladle.load(path)["w"].item() == 1.0
    directory = ladle.save({"w": torch.zeros(1)}, tmp_path / "d")
    ladle.save({"w": torch.ones(1)}, directory, overwrite=True)
    assert ladle.load(directory)["w"].item() == 1.0
    assert sorted(os.listdir(tmp_path)) == ["d", "m.safetensors"]


def test_metadata_and_format_are_stored(tmp_path):
    path = ladle.save({"w": torch.zeros(1)}, tmp_path / "m.safetensors", metadata={"k": "v"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


def test_metadata_may_repeat_format_pt_but_no_other_format(tmp_path):
    kept = ladle.save({"w": torch.zeros(1)}, tmp_path / "m.safetensors", metadata={"format": "pt"})
    with safe_open(str(kept), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    for out in (tmp_path / "np.safetensors", tmp_path / "dir"):
        with pytest.raises(ValueError) as caught:
            ladle.save({"w": torch.zeros(1)}, out, metadata={"format": "np", "k": "v"})
        assert str(caught.value).startswith(f"{out}: metadata: 'format' names the framework")
        assert str(caught.value).endswith("found 'np'")
        assert not out.exists() and not list(tmp_path.glob(".*"))  # nothing left behind


def test_empty_and_scalar_tensors_round_trip(tmp_path):
    model = {"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "w": torch.ones(2)}
    loaded = ladle.load(ladle.save(model, tmp_path / "m", max_shard_size=1))
    assert loaded["empty"].shape == (0, 3) and loaded["scalar"].item() == 2.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MiB", 500 * 2**20),
        ("1.5KB", 1500),
        ("42", 42),
        ("2TB", 2 * 10**12),
        ("3GiB", 3 * 2**30),
        ("1TiB", 2**40),
        ("9" * 400, int("9" * 400)),  # was an OverflowError (float) from argparse
        ("12345678901234567891", 12345678901234567891),  # exact past 2**53
        ("0.001KB", 1),
        ("5 GB", 5 * 10**9),  # spaces, as "--max-shard-size '5 GB'" gives them
        (" 500 MiB ", 500 * 2**20),
        ("+5KB", 5000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "\u0665GB", "\uff15GB", "5\u3000GB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["-1GB", "-0.5KB", "-1", "+0"])
def test_a_size_below_one_byte_is_named_as_that(text):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == f"max_shard_size: expected at least 1 byte, found {text!r}"


@pytest.mark.parametrize(
    ("text", "bytes_"),
    [
        ("1.5", "1.5"),
        ("2.0001KB", "2000.1"),
        ("1.0000001", "1.0000001"),  # the size written exactly: float's :g showed "1"
        ("1000000.5", "1000000.5"),
        ("1.0000001KiB", "1024.0001024"),
    ],
)
def test_a_size_that_is_no_whole_number_of_bytes_is_refused(text, bytes_):
    # "1.5" was 1 byte (the fraction dropped): a shard per tensor, where 1.5 GB was meant
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == (
        f"max_shard_size: expected a whole number of bytes, found {text!r} ({bytes_} bytes; "
        "a unit such as '1.5GB' names a larger size)"
    )
    assert parse_size("1.5KB") == 1500 and parse_size("2.0") == 2


def test_background_write_back_keeps_the_output_exact_and_leaves_no_threads(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr("ladle.writer.SYNC_EVERY", 64)  # a write-back after every 64 bytes
    model = {f"t{i}": torch.randn(7, 5) for i in range(20)}
    before = threading.active_count()
    out = ladle.save(model, tmp_path / "m", max_shard_size=500)
    loaded = ladle.load(out)
    assert all(torch.equal(loaded[k], model[k]) for k in model)
    with (
        pytest.raises(RuntimeError),
        SafetensorsWriter(
            tmp_path / "x.safetensors", {k: (tuple(t.shape), t.dtype) for k, t in model.items()}
        ) as writer,
    ):
        for key in list(model)[:10]:
            writer.write(key, model[key])
        raise RuntimeError("fails after several write-backs")
    assert not (tmp_path / "x.safetensors").exists()
    assert threading.active_count() == before


@given(
    picks=st.lists(st.integers(0, 3 * 2**18 - 1), max_size=40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    max_shard=st.sampled_from([10**9, 1]),
)
def test_amend_patches_entries_in_the_written_output(tmp_path_factory, picks, dtype, max_shard):
    # Entries of "big" span three 1 MiB windows (float32); "small" sits in its own shard at 1.
    tmp_path = tmp_path_factory.mktemp("amend")
    tensors = {
        "small": torch.arange(6.0).reshape(2, 3).to(dtype),
        "big": torch.arange(3 * 2**18, dtype=torch.float32).reshape(-1, 1024).to(dtype),
    }
    specs = {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}
    index = torch.tensor(sorted(set(picks), reverse=True), dtype=torch.int64)
    values = -(index.float() + 1).to(dtype)
    out = tmp_path / "out"
    with SafetensorsWriter(out, specs, max_shard_size=max_shard) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
        writer.amend("big", index, values)
        writer.amend("small", torch.tensor([4]), torch.tensor([9.0], dtype=dtype))
    expected = {key: t.clone() for key, t in tensors.items()}
    expected["big"].view(-1)[index] = values
    expected["small"].view(-1)[4] = 9.0
    loaded = ladle.load(out)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


@pytest.mark.parametrize("step", [1, -1])
def test_amend_takes_an_index_that_is_a_strided_view_in_either_order(tmp_path, step):
    # Increasing, it is not sorted (so not copied): torch.searchsorted warned of a
    # non-contiguous boundary tensor, an error under -W error that left the writer failed.
    held = torch.tensor([0, 99, 2, 99, 5, 99])
    index = held[::2] if step == 1 else held.flip(0)[1::2]  # [0, 2, 5] or [5, 2, 0], strided
    assert not index.is_contiguous()
    with SafetensorsWriter(tmp_path / "o.safetensors", {"w": ((8,), torch.float32)}) as writer:
        writer.write("w", torch.zeros(8))
        writer.amend("w", index, index.float() + 1)
    assert ladle.load(tmp_path / "o.safetensors")["w"].tolist() == [1, 0, 3, 0, 0, 6, 0, 0]


def test_amend_of_a_complex_tensor_patches_parts_of_its_real_view(tmp_path):
    # Merges compute a complex tensor as its parts (torch.view_as_real): entry 2k is the real
    # part of entry k, 2k + 1 its imaginary part; values come in the real dtype.
    z = torch.tensor([1 + 2j, 3 + 4j, 5 + 6j])
    with SafetensorsWriter(tmp_path / "z.safetensors", {"z": ((3,), z.dtype)}) as writer:
        writer.write("z", z)
        writer.amend("z", torch.tensor([1, 4, 5]), torch.tensor([-2.0, -5.0, 0.5]))
        with pytest.raises(ladle.LadleError, match=r"expected \(1,\) values of torch.float32"):
            writer.amend("z", torch.tensor([0]), torch.tensor([1j]))
        with pytest.raises(ladle.LadleError, match="index 6 is outside the tensor's 6 entries"):
            writer.amend("z", torch.tensor([6]), torch.tensor([1.0]))
    assert ladle.load(tmp_path / "z.safetensors")["z"].tolist() == [1 - 2j, 3 + 4j, -5 + 0.5j]


def test_amend_before_the_last_write_or_with_wrong_values_is_refused(tmp_path):
    specs = {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}
    early = pytest.raises(ladle.LadleError, match="before every tensor")
    with early, SafetensorsWriter(tmp_path / "out", specs) as writer:
        writer.write("a", torch.ones(2))
        writer.amend("a", torch.tensor([0]), torch.zeros(1))
    wrong = pytest.raises(ladle.LadleError, match=r"expected \(1,\) values of torch.float32")
    with wrong, SafetensorsWriter(tmp_path / "out", specs) as writer:
        writer.write("a", torch.ones(2))
        writer.write("b", torch.ones(2))
        writer.amend("a", torch.tensor([0]), torch.zeros(1, dtype=torch.float64))
    assert os.listdir(tmp_path) == []


def _reserves_disk(directory) -> bool:
    """Whether files in ``directory`` get disk reserved by ``fallocate`` (Linux, most
    filesystems); elsewhere the writer allocates as it writes and cannot fail early."""
    from ladle.writer import _fallocate

    function = _fallocate()
    if function is None:
        return False
    probe = directory / "probe"
    descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT)
    try:
        return function(descriptor, 1, 0, 4096) == 0
    finally:
        os.close(descriptor)
        probe.unlink()


@pytest.mark.parametrize("out", ["o.safetensors", "sharded"])
def test_an_output_the_disk_cannot_hold_is_refused_before_any_write(tmp_path, out):
    if not _reserves_disk(tmp_path):
        pytest.skip("this filesystem reserves no disk ahead of writes")
    huge = 2**58  # 1 EiB of float32: past any disk and past ext4's largest file
    specs = {"a": ((2,), torch.float32), "b": ((huge,), torch.float32)}
    pattern = rf"{out}: cannot reserve (\d+) bytes of disk for the output \(.+\); \d+ bytes are"
    with pytest.raises(ladle.OutputError, match=pattern) as caught:
        SafetensorsWriter(tmp_path / out, specs, max_shard_size=100)
    reserved = int(caught.value.args[0].split("cannot reserve ")[1].split()[0])
    assert reserved > 4 * huge  # the data and its header
    assert os.listdir(tmp_path) == []  # the temporary output is gone


def test_an_output_larger_than_the_free_disk_is_refused_without_reserving_any(
    tmp_path, monkeypatch
):
    # fallocate was asked for it all: failing, it kept what it got (ext4), so every other
    # writer to the disk met ENOSPC until the temporary was deleted; and the message then
    # said "0 bytes are free".
    import shutil

    calls = []
    monkeypatch.setattr("ladle.writer._fallocate", lambda: lambda *args: calls.append(args) or 0)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    out = tmp_path / "o.safetensors"
    with pytest.raises(ladle.OutputError) as caught:
        ladle.save({"w": torch.zeros(1000)}, out)
    found = re.fullmatch(
        rf"{re.escape(str(out))}: cannot reserve (\d+) bytes of disk for the output \(No space "
        r"left on device\); 1000 bytes are free there",
        str(caught.value),
    )
    assert found and int(found.group(1)) >= 4000  # the data and a header
    assert calls == [] and os.listdir(tmp_path) == []


def test_reserved_disk_leaves_the_size_to_the_writes(tmp_path):
    # Only what was written counts in the size: a short output still fails the size check.
    specs = {"a": ((2**14,), torch.float32), "b": ((2**14,), torch.float32)}  # 64 KiB each
    with SafetensorsWriter(tmp_path / "o.safetensors", specs) as writer:
        (temporary,) = tmp_path.iterdir()
        assert temporary.stat().st_size == 0
        writer.write("a", torch.ones(2**14))  # past the file's buffer: on disk now
        header = temporary.stat().st_size - 2**16
        assert 0 < header < 2**10
        if _reserves_disk(tmp_path):  # still reserved for what is to come (not truncated away)
            assert temporary.stat().st_blocks * 512 >= header + 2**17
        writer.write("b", torch.ones(2**14))
    assert (tmp_path / "o.safetensors").stat().st_size == header + 2**17


@pytest.mark.parametrize(
    ("code", "refused"), [(errno.EOPNOTSUPP, False), (errno.ENOSPC, True), (errno.EDQUOT, True)]
)
def test_a_filesystem_that_cannot_reserve_still_gets_the_output(
    tmp_path, monkeypatch, code, refused
):
    # fallocate failing: a full disk or quota refuses the output; no support for it (NFSv3,
    # some FUSE filesystems) leaves the writes to allocate as they go.
    def failing(descriptor: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr("ladle.writer._fallocate", lambda: failing)
    model = {"w": torch.arange(6.0).reshape(2, 3)}
    if refused:  # the reservation's own message, not wrapped in "creating the output failed"
        named = re.escape(f"{tmp_path / 'o.safetensors'}: cannot reserve ")
        with pytest.raises(ladle.OutputError, match=rf"^{named}\d+ .*\({os.strerror(code)}\)"):
            ladle.save(model, tmp_path / "o.safetensors")
        assert os.listdir(tmp_path) == []
    else:
        assert torch.equal(
            ladle.load(ladle.save(model, tmp_path / "o.safetensors"))["w"], model["w"]
        )


def test_an_output_that_cannot_be_created_is_an_output_error_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "a-file" / "o.safetensors"
    failed = rf"^{out}: {tmp_path / 'a-file'} is a file, not a directory$"  # before any work
    with pytest.raises(ladle.OutputError, match=failed) as caught:
        ladle.save({"w": torch.ones(2)}, out)
    assert isinstance(caught.value, OSError) and isinstance(caught.value.__cause__, OSError)
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_an_output_under_a_broken_link_says_the_link_is_broken(tmp_path):
    (tmp_path / "dl").symlink_to(tmp_path / "nowhere")  # was "dl is a file, not a directory"
    out = tmp_path / "dl" / "o.safetensors"
    failed = rf"^{out}: {tmp_path / 'dl'} is a broken symbolic link, not a directory$"
    with pytest.raises(ladle.OutputError, match=failed):
        ladle.save({"w": torch.ones(2)}, out)
    assert os.listdir(tmp_path) == ["dl"] and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("name", ["out", "out.safetensors"])
def test_what_the_header_refuses_is_refused_before_anything_is_created(tmp_path, name):
    out = tmp_path / name
    named = re.escape(f"{out}: ")  # each message starts with the output
    with pytest.raises(ladle.LadleError, match=rf"^{named}tensor 'w': safetensors cannot store"):
        ladle.save({"w": torch.zeros(2, dtype=torch.complex128)}, out)
    for metadata, found in (({"epochs": 3}, "str 'epochs' -> int"), ({3: "x"}, "int 3 -> str")):
        # a bad argument: a TypeError, as docs/safety.md has it, not a LadleError
        with pytest.raises(TypeError) as caught:
            ladle.save({"w": torch.zeros(2)}, out, metadata=metadata)
        assert str(caught.value) == f"{out}: metadata: safetensors stores text only; found {found}"
    with pytest.raises(ladle.LadleError, match=rf"^{named}.*safetensors reads at most 100000000"):
        ladle.save({"w": torch.zeros(2)}, out, metadata={"notes": "x" * 100_000_001})
    with pytest.raises(ladle.LadleError, match=rf"^{named}tensor '__metadata__': safetensors"):
        ladle.save({"__metadata__": torch.zeros(2)}, out)
    with pytest.raises(ladle.LadleError, match=rf"^{named}tensor '__metadata__': safetensors"):
        # refused when the writer is made, before any merging
        model = {"__metadata__": torch.ones(3)}
        ladle.uniform_soup([model, model], out=out, device="cpu")
    with pytest.raises(ladle.LadleError, match=rf"^{named}tensor 1: safetensors names tensors"):
        SafetensorsWriter(out, {1: ((2,), torch.float32)})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("state_dict", "error", "message"),
    [
        (
            {"w": 1.0},
            TypeError,
            "state_dict: expected a mapping of str to torch.Tensor, found str -> float for 'w'",
        ),
        (
            {1: torch.ones(1)},
            TypeError,
            "state_dict: expected a mapping of str to torch.Tensor, found int -> Tensor for 1",
        ),
        (
            {"w": torch.empty(2, device="meta")},
            ValueError,
            "state_dict: tensor 'w' is on the meta device (no data); safetensors stores dense "
            "tensors",
        ),
        (
            {"w": torch.ones(2).to_sparse()},
            ValueError,
            "state_dict: tensor 'w' is torch.sparse_coo; safetensors stores dense tensors",
        ),
    ],
    ids=["no tensor", "no str", "meta", "sparse"],
)
def test_save_refuses_what_is_no_dense_tensor_under_a_string_naming_the_key(
    tmp_path, state_dict, error, message
):
    # AttributeError, NotImplementedError or torch's RuntimeError escaped; an int key was
    # written as "1" and then failed the read-back check
    with pytest.raises(error) as err:
        ladle.save(state_dict, tmp_path / "out.safetensors")
    assert str(err.value) == message
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_dead_process_are_removed_whatever_the_output_is_called(tmp_path):
    for name in ("model[v2].safetensors", "a*b.safetensors", "plain.safetensors"):
        dead = leftover(tmp_path / name)  # of this host, of no process
        dead.write_bytes(b"partial")
        ladle.save({"w": torch.ones(1)}, tmp_path / name)
        assert not dead.exists(), name


def _skip_unless_the_system_encodes(name: str) -> None:
    """Skip where the file system encoding has no bytes for ``name`` (an ASCII locale without
    Python's UTF-8 mode), as Python's own ``open`` would refuse it there."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        pytest.skip(f"the file system encoding ({sys.getfilesystemencoding()}) cannot encode it")


@pytest.mark.parametrize(
    "name", ["a" * 230 + ".safetensors", "é" * 120 + ".safetensors", "b" * 250, "c" * 255]
)
def test_an_output_name_the_system_takes_is_written_however_long(tmp_path, name):
    _skip_unless_the_system_encodes(name)
    # Its temporary, ".NAME.ladle-tmp-PID-HOST-XXXXXXXX", passed 255 bytes: "File name too
    # long", blamed on the output, and for one file masked by the clean-up's own OSError.
    dead = leftover(tmp_path / name)  # a dead writer's leftover, named as the writer names it
    dead.write_bytes(b"partial")
    ladle.save({"w": torch.ones(2)}, tmp_path / name)
    assert ladle.load(tmp_path / name)["w"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # the leftover removed
    assert len(os.fsencode(dead.name)) <= 255


@pytest.mark.parametrize("name", ["c" * 256, "é" * 124 + ".safetensors"])
def test_an_output_name_longer_than_a_file_name_may_be_is_refused_before_any_work(tmp_path, name):
    _skip_unless_the_system_encodes(name)
    with pytest.raises(ladle.LadleError) as info:
        ladle.uniform_soup([{"w": torch.ones(2)}], out=tmp_path / name)
    size = len(os.fsencode(name))
    assert str(info.value) == (
        f"{tmp_path / name}: its name is {size} bytes long; a file name may have 255 at most"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_name_too_long_is_refused_before_any_work(tmp_path):
    # It was the system's own "[Errno 36] File name too long", naming neither the output nor
    # which name: raised by the search for an earlier write's leftovers beside it.
    out = tmp_path / ("x" * 300) / "merged"
    with pytest.raises(ladle.LadleError) as info:
        ladle.uniform_soup([{"w": torch.ones(2)}], out=out)
    assert str(info.value) == (
        f"{out}: its folder name {'x' * 40}… is 300 bytes long; a name may have 255 at most"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_output_below_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "merged"
    monkeypatch.setattr(ladle.engine, "fold", None)  # a pass over the inputs would fail
    with pytest.raises(ladle.OutputError) as info:
        ladle.uniform_soup([{"w": torch.ones(2)}], out=out)
    assert str(info.value) == f"{out}: {tmp_path / 'notes.txt'} is a file, not a directory"
    assert isinstance(info.value, OSError)


def test_a_nul_character_in_an_output_path_is_refused_naming_the_argument(tmp_path):
    # Python's bare "embedded null byte" named neither the argument nor the character.
    with pytest.raises(
        ladle.LadleError, match=r"^out: a path cannot hold a NUL character, found 'o\\x00'$"
    ):
        ladle.uniform_soup([{"w": torch.ones(2)}], out="o\0")
    # An input's NUL names no file, as Path.exists says (test_checkpoint).
    with pytest.raises(ladle.CheckpointError, match="no such file"):
        ladle.uniform_soup([{"w": torch.ones(2)}, tmp_path / "m\0.safetensors"])


def test_save_writes_the_values_of_conjugate_and_negative_views(tmp_path):
    # torch's lazy conjugate (x.conj()) and negative (x.conj().imag) views: view(uint8)
    # raised a RuntimeError; their values are written.
    x = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    views = {"c": x.conj(), "r": x.conj().imag}
    assert views["c"].is_conj() and views["r"].is_neg()
    loaded = ladle.load(ladle.save(views, tmp_path / "v.safetensors"))
    assert loaded["c"].tolist() == [1 - 2j, 3 + 4j] and loaded["r"].tolist() == [-2.0, 4.0]


def test_a_leftover_naming_a_pid_no_process_can_have_is_left_alone(tmp_path):
    # A name this host's writers never make (pid 0, or past what os.kill takes): not judged,
    # not deleted, and no OverflowError from os.kill ends the save.
    made = leftover(tmp_path / "out.safetensors")
    for pid in ("0", "9" * 20):
        fields = made.name.split("-")
        fields[-3] = pid  # .NAME.ladle-tmp-PID-HOST-XXXXXXXX
        made.with_name("-".join(fields)).write_bytes(b"not ours")
    ladle.save({"w": torch.ones(1)}, tmp_path / "out.safetensors")
    assert sorted(p.name.split("-")[-3] for p in tmp_path.glob(".out*")) == ["0", "9" * 20]


@pytest.mark.parametrize(
    ("size", "found"), [(True, "bool"), (1.5e9, "float"), (None, "None"), ([5], "list")]
)
def test_parse_size_refuses_what_is_not_bytes_or_a_size_string(size, found):
    # A TypeError naming the type found, as chunk_bytes' check: it was a ValueError ("found
    # True"), where every other numeric parameter given no number raises a TypeError.
    with pytest.raises(TypeError) as err:
        parse_size(size)
    assert str(err.value) == (
        f"max_shard_size: expected bytes (an int) or a string such as '5GB', found {found}"
    )


def test_writer_refuses_rows_of_the_wrong_shape_and_amends_outside_a_tensor(tmp_path):
    specs = {"a": ((2, 3), torch.float32), "b": ((4,), torch.float32)}
    writer = SafetensorsWriter(tmp_path / "o.safetensors", specs)
    with writer:
        with pytest.raises(ladle.LadleError, match=r"rows of shape \(3,\)\), got 'a' .*\(3, 2\)"):
            writer.write("a", torch.zeros(3, 2))  # as many bytes, other rows
        writer.write("a", torch.zeros(2, 3))
        writer.write("b", torch.zeros(4))
        for index in (-1, 6):
            with pytest.raises(ladle.LadleError, match=rf"index {index} is outside .* 6 entries"):
                writer.amend("a", torch.tensor([index]), torch.tensor([9.0]))
        writer.amend("a", torch.tensor([5]), torch.tensor([9.0]))
    loaded = ladle.load(tmp_path / "o.safetensors")
    assert loaded["a"].flatten().tolist() == [0, 0, 0, 0, 0, 9] and loaded["b"].tolist() == [0] * 4


@pytest.mark.parametrize("kind", ["dangling", "to a directory", "to a file"])
def test_an_output_that_is_a_symbolic_link(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "to a directory":
        target.mkdir()
        (target / "keep.txt").write_text("kept")
    elif kind == "to a file":
        target.write_text("kept")
    for out in (tmp_path / "out", tmp_path / "out.safetensors"):
        out.symlink_to(target)
        with pytest.raises(ladle.LadleError, match="already exists"):  # refused up front
            ladle.save({"w": torch.ones(2)}, out)
        ladle.save({"w": torch.ones(2)}, out, overwrite=True)  # the link is replaced
        assert not out.is_symlink() and torch.equal(ladle.load(out)["w"], torch.ones(2))
        leftovers = [p.name for p in tmp_path.iterdir() if "ladle-" in p.name]
        assert leftovers == []
    if kind == "to a directory":  # what the link pointed to is untouched
        assert (target / "keep.txt").read_text() == "kept"
    elif kind == "to a file":
        assert target.read_text() == "kept"


def _overwrite_many(out: str, value: float, count: int) -> list[str]:
    errors = []
    for _ in range(count):
        try:
            ladle.save({"w": torch.full((4,), value)}, out, overwrite=True)
        except Exception as err:  # reported to the test, not raised in the worker
            errors.append(f"{type(err).__name__}: {err}")
    return errors


def test_writers_racing_to_replace_one_directory_output_all_succeed(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    out = str(tmp_path / "out")
    with ProcessPoolExecutor(2) as pool:
        runs = [pool.submit(_overwrite_many, out, float(v), 150) for v in (1, 2)]
        errors = [e for run in runs for e in run.result()]
    assert errors == []
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no ladle-tmp or ladle-old leftovers
    value = ladle.load(out)["w"]
    assert torch.equal(value, torch.full((4,), 1.0)) or torch.equal(value, torch.full((4,), 2.0))


def test_a_temporary_output_of_another_host_is_left_alone(tmp_path):
    # On a filesystem several hosts mount, a process id names a process of its own host only:
    # a write here deleted another host's temporary output (a merge still running there)
    # whenever no process of this host had its writer's id.
    theirs = leftover(tmp_path / "out", host="node-b.example")
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"being written on node-b")
    ours = leftover(tmp_path / "out")  # this host's, of a process gone: removed
    ours.mkdir()
    assert str(DEAD_PID) in theirs.name and str(DEAD_PID) in ours.name
    ladle.save({"w": torch.ones(1)}, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", theirs.name])
    assert (theirs / "model.safetensors").read_bytes() == b"being written on node-b"


def test_leftovers_of_a_replaced_output_are_removed_once_their_process_is_gone(tmp_path):
    from ladle.writer import OLD_MARK

    dead = leftover(tmp_path / "out", mark=OLD_MARK)
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"old")
    ladle.save({"w": torch.ones(1)}, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("at", ["__enter__", "__exit__"])
@pytest.mark.parametrize("name", ["o.safetensors", "o"])
def test_ctrl_c_as_the_with_statement_takes_or_ends_the_writer_leaves_nothing(tmp_path, at, name):
    # CPython raises a pending KeyboardInterrupt at a function's first instruction: there,
    # __enter__ had not handed the writer to the with statement, and __exit__ ran neither
    # its commit nor its abort; the reserved temporary output stayed on disk.
    import gc

    def interrupt(frame, event, arg):
        if event == "call" and frame.f_code.co_name == at and "writer" in frame.f_code.co_filename:
            sys.settrace(None)
            raise KeyboardInterrupt
        return None

    models = family(2)
    sys.settrace(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            ladle.uniform_soup(models, out=tmp_path / name)
    finally:
        sys.settrace(None)
    gc.collect()  # a writer no with statement took is collected: what it made goes with it
    assert os.listdir(tmp_path) == []
    ladle.uniform_soup(models, out=tmp_path / name)  # and the same merge then succeeds
    assert os.listdir(tmp_path) == [name]


def test_the_header_holds_names_and_metadata_as_utf8_as_safetensors_writes_them(tmp_path):
    # json.dumps escaped every non-ASCII character (权 as \u6743, 3 bytes as 6): a model of
    # long CJK names read from a 61 MB header was written as 121 MB, past safetensors' limit.
    from safetensors.torch import save

    tensors = {"权重." + "层" * 50: torch.ones(2), "emoji 🙂": torch.zeros(1)}
    metadata = {"format": "pt", "note": "für ✓"}
    path = ladle.save(tensors, tmp_path / "m.safetensors", metadata=metadata)
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = path.read_bytes()[8 : 8 + size]
    assert "权重.".encode() in header and "für ✓".encode() in header and b"\\u" not in header
    theirs = save(tensors, metadata=metadata)  # safetensors' own writer: the same length
    assert size == struct.unpack("<Q", theirs[:8])[0]
    ours, their_header = json.loads(header), json.loads(theirs[8 : 8 + size])
    for entries in (ours, their_header):  # the data's order is each writer's own
        for entry in entries.values():
            entry.pop("data_offsets", None)
    assert ours == their_header
    loaded = ladle.load(path)
    assert loaded.keys() == tensors.keys() and ladle.open_checkpoint(path).metadata == metadata


@pytest.mark.parametrize("given", ["folder", "file"])
def test_an_output_set_aside_by_a_stopped_write_is_not_deleted_while_it_is_an_input(
    tmp_path, given
):
    # A killed --overwrite leaves the output it replaced aside; merging that back into the
    # same output deleted it before reading it (both outputs lost).
    from ladle.writer import OLD_MARK

    aside = leftover(tmp_path / "out", mark=OLD_MARK)
    aside.mkdir()
    earlier = {"w": torch.arange(4.0)}
    ladle.save(earlier, aside / "model.safetensors")
    source = aside if given == "folder" else aside / "model.safetensors"
    with pytest.raises(ladle.LadleError, match=rf"input .* is or lies in {re.escape(aside.name)}"):
        ladle.uniform_soup([source, {"w": torch.ones(4)}], out=tmp_path / "out")
    assert torch.equal(ladle.load(aside)["w"], earlier["w"])
    assert sorted(os.listdir(tmp_path)) == [aside.name]
    elsewhere = tmp_path / "elsewhere"  # another output: the leftover is not its to delete
    ladle.uniform_soup([source, {"w": torch.ones(4)}], out=elsewhere)
    assert torch.equal(ladle.load(elsewhere)["w"], torch.tensor([0.5, 1.0, 1.5, 2.0]))


@pytest.mark.parametrize("name", ["o.safetensors", "o"])
def test_a_failure_to_delete_the_temporary_output_does_not_hide_the_error(
    tmp_path, monkeypatch, name
):
    import pathlib

    out = tmp_path / name
    real_unlink, real_rmdir = pathlib.Path.unlink, os.rmdir

    def refuse_rename(source, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    def refuse_unlink(path, missing_ok=False):
        if "ladle-tmp" in path.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path, missing_ok=missing_ok)

    def refuse_rmdir(path, *args, **kwargs):  # the temporary directory of a directory output
        if "ladle-tmp" in os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse_rename)
    monkeypatch.setattr(pathlib.Path, "unlink", refuse_unlink)
    monkeypatch.setattr(os, "rmdir", refuse_rmdir)
    with pytest.raises(ladle.OutputError, match=rf"/{name}: finishing the output failed"):
        ladle.save({"w": torch.ones(2)}, out)


def _offsets(path) -> list[tuple[str, int, int]]:
    """(key, absolute data offset, element size) of every tensor in a safetensors file."""
    import struct

    from ladle.checkpoint import SAFETENSORS_DTYPES

    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    return [
        (key, 8 + size + entry["data_offsets"][0], SAFETENSORS_DTYPES[entry["dtype"]].itemsize)
        for key, entry in header.items()
        if key != "__metadata__"
    ]


ALIGN_DTYPES = [torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int64]


@given(
    layout=st.lists(
        st.tuples(st.sampled_from(ALIGN_DTYPES), st.integers(0, 7)), min_size=1, max_size=8
    ),
    shards=st.sampled_from([None, 16, 64]),
)
def test_every_tensor_written_starts_at_a_multiple_of_its_element_size(
    tmp_path_factory, layout, shards
):
    state = {f"k{i}": torch.ones(n, dtype=dtype) for i, (dtype, n) in enumerate(layout)}
    folder = tmp_path_factory.mktemp("aligned")
    out = ladle.save(
        state, folder / ("m" if shards else "m.safetensors"), max_shard_size=shards or "5GB"
    )
    files = sorted(out.glob("*.safetensors")) if out.is_dir() else [out]
    for file in files:
        for key, offset, itemsize in _offsets(file):
            assert offset % itemsize == 0, (file.name, key, offset, itemsize)
    loaded = ladle.load(out)
    assert list(loaded) != [] and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_merge_of_aligned_inputs_writes_aligned_output(tmp_path):
    from safetensors.torch import save_file

    paths = []
    for i in range(2):  # safetensors' own writer: aligned inputs
        save_file(
            {
                "attn.mask": torch.tensor([True, False, True]),
                "h.weight": torch.full((4, 4), float(i)),
            },
            tmp_path / f"m{i}.safetensors",
        )
        paths.append(tmp_path / f"m{i}.safetensors")
    out = ladle.uniform_soup(paths, out=tmp_path / "soup.safetensors", device="cpu")
    assert all(offset % size == 0 for _, offset, size in _offsets(out))
    # And the output's float tensor can be viewed in place (no copy) when read back.
    with ladle.open_checkpoint(out) as ckpt:
        assert ckpt.map_rows("h.weight", slice(None)) is not None


@pytest.mark.parametrize(
    "name", ["merged.pt", "merged.BIN", "m.pth", "m.ckpt", "m.safetensor", "m.st"]
)
def test_outputs_named_like_another_weight_format_are_refused_before_any_work(tmp_path, name):
    model = {"w": torch.ones(2)}
    out = tmp_path / name
    with pytest.raises(ladle.LadleError, match=r"ladle writes safetensors: name the output"):
        ladle.save(model, out)
    with pytest.raises(ladle.LadleError, match=r"ladle writes safetensors"):
        ladle.uniform_soup([model, model], out=out)
    with pytest.raises(ladle.LadleError, match=r"ladle writes safetensors"):
        ladle.greedy_soup([model, model], lambda sd: 1.0, out=out)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_output_path_is_refused_naming_out(tmp_path, monkeypatch):
    from ladle.cli import main

    monkeypatch.chdir(tmp_path)
    model = {"w": torch.ones(2)}
    with pytest.raises(ladle.LadleError, match=r"out: expected a path, found an empty one"):
        ladle.uniform_soup([model, model], out="")
    ladle.save(model, tmp_path / "a.safetensors")
    with pytest.raises(SystemExit) as caught:  # a usage error naming -o (see test_cli.py)
        main(["soup", "a.safetensors", "a.safetensors", "-o", ""])
    assert caught.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


@pytest.mark.parametrize(("out", "found"), [(b"o.safetensors", "bytes"), (5, "int")])
def test_an_output_that_is_no_str_path_is_a_type_error_naming_out(
    tmp_path, monkeypatch, out, found
):
    # bytes: "startswith first arg must be bytes or a tuple of bytes, not str"
    monkeypatch.chdir(tmp_path)
    model = {"w": torch.ones(2)}
    for write, name in (
        (lambda: ladle.uniform_soup([model, model], out=out), "out"),
        (lambda: ladle.save(model, out), "path"),  # save's parameter
    ):
        with pytest.raises(TypeError) as info:
            write()
        assert str(info.value) == f"{name}: expected a str or os.PathLike path, found {found}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["M.SAFETENSORS", "m.SafeTensors"])
def test_a_safetensors_suffix_not_in_lower_case_is_refused(tmp_path, name):
    with pytest.raises(ladle.LadleError, match=r"only a lower-case .safetensors suffix"):
        ladle.save({"w": torch.ones(2)}, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_a_safetensors_name_followed_by_a_slash_is_refused(tmp_path):
    # pathlib drops the slash: "m.safetensors/" (a directory, as written) became one file.
    model = {"w": torch.ones(2)}
    for out in (f"{tmp_path}/m.safetensors/", f"{tmp_path}/m.safetensors//"):
        with pytest.raises(ladle.LadleError) as info:
            ladle.uniform_soup([model, model], out=out)
        assert str(info.value) == (
            f"{out}: ends in '/' (a directory) but names a .safetensors file; write "
            f"{tmp_path}/m.safetensors (one file) or a directory named without the suffix"
        )
    assert list(tmp_path.iterdir()) == []
    ladle.uniform_soup([model, model], out=f"{tmp_path}/m/")  # a directory, as before
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_a_split_merge_checks_its_output_name_first(tmp_path):
    from ladle.distributed import merge

    model = {"w": torch.ones(2)}
    with pytest.raises(ladle.LadleError, match=r"out: expected a path, found an empty one"):
        merge("soup", [model, model], out="")


@pytest.mark.parametrize("out", ["hf://me/merged", "hf://me/merged.safetensors"])
def test_an_hf_url_as_output_is_refused_before_any_work(tmp_path, monkeypatch, out):
    # Path("hf://me/merged") is the local folder hf:/me/merged: the user meant the Hub.
    monkeypatch.chdir(tmp_path)
    model = {"w": torch.ones(2)}
    with pytest.raises(ladle.LadleError, match=r"hf://me/merged.*--push-to-hub"):
        ladle.uniform_soup([model, model], out=out)
    with pytest.raises(ladle.LadleError, match=r"push-to-hub"):
        ladle.save(model, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [".", "sub/..", "/"])
def test_an_output_naming_a_folder_by_dot_or_dot_dot_is_refused_before_anything_is_made(
    tmp_path, monkeypatch, name
):
    """Such an output could never be renamed into place: it was found out only once the merge
    was done ("Device or resource busy"), having made the folders before ``..``."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ladle.LadleError, match=r"names no file or folder of its own"):
        ladle.save({"w": torch.ones(2)}, name, overwrite=True)
    with pytest.raises(ladle.LadleError, match=r"names no file or folder of its own"):
        ladle.uniform_soup([{"w": torch.ones(2)}] * 2, out=name, overwrite=True)
    assert os.listdir(tmp_path) == []


def _written_temporary(out) -> str:
    (temporary,) = [name for name in os.listdir(out.parent) if ".ladle-tmp-" in name]
    return os.path.join(out.parent, temporary)


def _retype_v(path: str) -> None:
    """Change tensor 'v' from F32 to I32 in a file's header: same length, same size."""
    data = Path(path).read_bytes()
    at = data.index(b'"F32"', data.index(b'"v"'))
    with open(path, "r+b") as file:
        file.seek(at)
        file.write(b'"I32"')


def _rename_v(path: str) -> None:
    data = Path(path).read_bytes()
    with open(path, "r+b") as file:
        file.seek(data.index(b'"v"'))
        file.write(b'"u"')


def _cut(path: str) -> None:
    os.truncate(path, os.path.getsize(path) - 4)


def _rewrite_without_metadata(path: str) -> None:
    """The same tensors, shapes and dtypes, as safetensors writes them without metadata: a
    readable file of another size (a shorter header)."""
    from safetensors.torch import load_file, save

    data = save(load_file(path))
    with open(path, "r+b") as file:
        file.truncate(0)
        file.write(data)


@pytest.mark.parametrize(
    ("change", "found"),
    [
        (_cut, r"does not read back \(.*not fully covered"),
        (
            _rename_v,
            r"does not hold what was planned: expected 'v' \(3,\) torch\.float32, found none",
        ),
        (
            _retype_v,
            r"does not hold what was planned: expected 'v' \(3,\) torch\.float32, "
            r"found \(3,\) torch\.int32",
        ),
        (_rewrite_without_metadata, r"has \d+ bytes, expected \d+"),
    ],
    ids=["cut", "renamed key", "changed dtype", "other header"],
)
def test_an_output_changed_before_its_rename_is_never_renamed_into_place(tmp_path, change, found):
    out = tmp_path / "o.safetensors"
    specs = {"w": ((64, 64), torch.float32), "v": ((3,), torch.float32)}
    with (
        pytest.raises(
            ladle.LadleError, match=rf"o\.safetensors: the written file o\.safetensors {found}"
        ),
        SafetensorsWriter(out, specs) as writer,
    ):
        writer.write("w", torch.ones(64, 64))  # larger than the write buffer: on disk already
        writer.write("v", torch.ones(3))
        writer._handle.flush()
        change(_written_temporary(out))
    assert os.listdir(tmp_path) == []


def test_writes_past_a_tensor_or_the_last_tensor_are_refused_saying_how_much(tmp_path):
    specs = {"w": ((4, 3), torch.float32)}
    too_many = r"more bytes for 'w' than its shape \(4, 3\): 36 of its 48 bytes written, then 24"
    with (
        pytest.raises(ladle.LadleError, match=too_many),
        SafetensorsWriter(tmp_path / "o.safetensors", specs) as writer,
    ):
        writer.write("w", torch.ones(3, 3))
        writer.write("w", torch.ones(2, 3))
    one_more = r"more bytes for 'v' than its shape \(2,\): 0 of its 8 bytes written, then 12"
    with (
        pytest.raises(ladle.LadleError, match=one_more),
        SafetensorsWriter(tmp_path / "o.safetensors", {"v": ((2,), torch.float32)}) as writer,
    ):
        writer.write("v", torch.ones(3))  # one entry past the tensor
    with (
        pytest.raises(ladle.LadleError, match=r"got 'x' after the last planned tensor"),
        SafetensorsWriter(tmp_path / "o.safetensors", specs) as writer,
    ):
        writer.write("w", torch.ones(4, 3))
        writer.write("x", torch.ones(0))  # not planned, even empty
    assert os.listdir(tmp_path) == []


def test_an_output_that_appears_while_merging_is_kept_and_the_merge_refused(tmp_path):
    out = tmp_path / "o.safetensors"
    with (
        pytest.raises(ladle.LadleError, match=r"o\.safetensors: appeared while merging"),
        SafetensorsWriter(out, {"w": ((2,), torch.float32)}) as writer,
    ):
        writer.write("w", torch.ones(2))
        out.write_bytes(b"someone else's")
    assert out.read_bytes() == b"someone else's"
    assert os.listdir(tmp_path) == ["o.safetensors"]


def test_temporary_outputs_of_live_processes_are_left_alone(tmp_path):
    """Two writers of one output at once in one process, and leftovers of a live process of
    this host (pid 1), of no process (no pid), or named otherwise (no host): a new writer
    removes none of them."""
    from ladle.writer import _host_tag

    out = tmp_path / "out"
    first = SafetensorsWriter(out, {"w": ((2,), torch.float32)})
    host = _host_tag()
    foreign = [
        tmp_path / f".out{TEMP_MARK}{name}"
        for name in (f"1-{host}-0123abcd", f"x-{host}-0123abcd", f"{DEAD_PID}-0123abcd")
    ]
    for path in foreign:
        path.mkdir()
    with SafetensorsWriter(out, {"w": ((2,), torch.float32)}, overwrite=True) as second:
        second.write("w", torch.zeros(2))
    assert all(path.is_dir() for path in foreign)
    first.write("w", torch.ones(2))
    with pytest.raises(ladle.LadleError, match=r"out: appeared while merging"):
        first.commit()
    first.abort()
    assert ladle.load(out)["w"].tolist() == [0.0, 0.0]
    assert sorted(os.listdir(tmp_path)) == sorted(["out", *(path.name for path in foreign)])


def _interfering_replace(monkeypatch, out, times: int, make) -> None:
    """After each time the writer moves ``out`` aside, another writer's output (``make``)
    takes its place, ``times`` times: the interleaving a race between writers gives."""
    import ladle.writer as module

    real = os.replace
    left = [times]

    def replace(source, target):
        real(source, target)
        if os.fspath(source) == os.fspath(out) and left[0] > 0:
            left[0] -= 1
            make(out)

    monkeypatch.setattr(module.os, "replace", replace)


def _other_output(out) -> None:
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"another writer's")


def test_an_output_taken_again_by_other_writers_is_replaced_once_it_stays(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ladle.save({"w": torch.zeros(2)}, out)
    _interfering_replace(monkeypatch, out, 3, _other_output)
    ladle.save({"w": torch.ones(2)}, out, overwrite=True)
    assert ladle.load(out)["w"].tolist() == [1.0, 1.0]
    assert os.listdir(tmp_path) == ["out"]


def test_an_output_other_writers_keep_taking_is_left_to_them(tmp_path, monkeypatch):
    from ladle.writer import RENAME_ATTEMPTS

    out = tmp_path / "out"
    ladle.save({"w": torch.zeros(2)}, out)
    _interfering_replace(monkeypatch, out, RENAME_ATTEMPTS, _other_output)
    with pytest.raises(ladle.LadleError, match=r"out: other writers kept replacing it"):
        ladle.save({"w": torch.ones(2)}, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == b"another writer's"
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_rename_into_place_puts_the_replaced_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ladle.save({"w": torch.zeros(2)}, out)
    _failing_rename_into_place(monkeypatch, out, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ladle.OutputError, match=r"out: finishing the output failed: No space"):
        ladle.save({"w": torch.ones(2)}, out, overwrite=True)
    assert ladle.load(out)["w"].tolist() == [0.0, 0.0]
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="reads /proc/self/fd (Linux)")
def test_a_merge_failing_after_amend_closes_what_it_patched_and_leaves_nothing(tmp_path):
    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = descriptors()
    with (
        pytest.raises(RuntimeError, match="after the amend"),
        SafetensorsWriter(tmp_path / "out", {"w": ((2,), torch.float32)}) as writer,
    ):
        writer.write("w", torch.ones(2))
        writer.amend("w", torch.tensor([1]), torch.tensor([5.0]))
        raise RuntimeError("after the amend")
    assert descriptors() == before
    assert os.listdir(tmp_path) == []


def test_amending_a_temporary_output_cut_short_is_refused(tmp_path):
    out = tmp_path / "o.safetensors"
    with (
        pytest.raises(ladle.LadleError, match=r"short read while amending 'w'"),
        SafetensorsWriter(out, {"w": ((64, 64), torch.float32)}) as writer,
    ):
        writer.write("w", torch.ones(64, 64))  # larger than the write buffer: on disk already
        os.truncate(_written_temporary(out), 1024)
        writer.amend("w", torch.tensor([4000]), torch.tensor([5.0]))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("out", ["o.safetensors", "o"])
def test_an_empty_state_dict_is_written_as_a_header_alone(tmp_path, out):
    path = ladle.save({}, tmp_path / out, metadata={"k": "v"})
    assert ladle.load(path) == {}
    with ladle.open_checkpoint(path) as checkpoint:
        assert checkpoint.metadata == {"format": "pt", "k": "v"}


def _stray_file(out) -> None:
    out.write_bytes(b"a stray file")


def _stray_directory(out) -> None:
    out.mkdir()
    (out / "x").write_bytes(b"a stray directory")


@pytest.mark.parametrize(
    ("name", "appears"),
    [("out", _stray_file), ("o.safetensors", _stray_directory)],
    ids=["a file where a directory goes", "a directory where a file goes"],
)
def test_a_stray_of_the_other_kind_taking_the_place_stays_and_nothing_is_left_aside(
    tmp_path, monkeypatch, name, appears
):
    """The rename fails with ENOTDIR or EISDIR, not ENOTEMPTY: the replaced output used to
    stay aside as .NAME.ladle-old-PID-... A file where a folder output goes (or the reverse)
    is no earlier output, which is all that ``overwrite`` replaces: it stays, and the merge
    fails saying so, leaving nothing aside."""
    out = tmp_path / name
    if name == "o.safetensors":  # renamed aside, not replaced in one rename: a link
        target = ladle.save({"w": torch.zeros(2)}, tmp_path / "old.safetensors")
        out.symlink_to(target)
    else:
        ladle.save({"w": torch.zeros(2)}, out)
    _interfering_replace(monkeypatch, out, 1, appears)
    with pytest.raises(ladle.LadleError, match="appeared while merging.*left unwritten"):
        ladle.save({"w": torch.ones(2)}, out, overwrite=True)
    stray = out / "x" if name == "o.safetensors" else out
    assert stray.read_bytes().startswith(b"a stray")
    assert sorted(os.listdir(tmp_path)) == sorted([name] + ["old.safetensors"] * (name != "out"))


def _failing_rename_into_place(monkeypatch, out, error: BaseException, make=None) -> None:
    """Renaming the temporary output to ``out`` raises ``error``; ``make`` first puts another
    output at ``out`` (taken meanwhile by another writer)."""
    import ladle.writer as module

    real = os.replace

    def replace(source, target):
        if os.fspath(target) == os.fspath(out) and TEMP_MARK in os.fspath(source):
            if make is not None:
                make(out)
            raise error
        real(source, target)

    monkeypatch.setattr(module.os, "replace", replace)


def test_a_replaced_output_superseded_by_another_is_deleted_when_ours_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ladle.save({"w": torch.zeros(2)}, out)
    denied = PermissionError(errno.EACCES, "Permission denied")
    _failing_rename_into_place(monkeypatch, out, denied, make=_other_output)
    with pytest.raises(ladle.OutputError, match=r"out: finishing the output failed: Permission"):
        ladle.save({"w": torch.ones(2)}, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == b"another writer's"
    assert os.listdir(tmp_path) == ["out"]  # the old output is not left aside


def test_an_interrupted_rename_into_place_puts_the_replaced_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ladle.save({"w": torch.zeros(2)}, out)
    _failing_rename_into_place(monkeypatch, out, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        ladle.save({"w": torch.ones(2)}, out, overwrite=True)
    assert ladle.load(out)["w"].tolist() == [0.0, 0.0]
    assert os.listdir(tmp_path) == ["out"]


def test_a_replaced_output_that_cannot_go_back_is_kept_aside(tmp_path, monkeypatch):
    """Its only copy: never deleted, whatever fails."""
    import ladle.writer as module

    out = tmp_path / "out"
    ladle.save({"w": torch.zeros(2)}, out)
    real = os.replace

    def replace(source, target):
        if os.fspath(target) == os.fspath(out):  # ours, and the old one going back
            raise OSError(errno.EIO, "Input/output error")
        real(source, target)

    monkeypatch.setattr(module.os, "replace", replace)
    with pytest.raises(ladle.OutputError, match=r"out: finishing the output failed: Input/output"):
        ladle.save({"w": torch.ones(2)}, out, overwrite=True)
    (aside,) = os.listdir(tmp_path)
    assert aside.startswith(".out.ladle-old-")
    assert ladle.load(tmp_path / aside)["w"].tolist() == [0.0, 0.0]


class _FillingUp:
    """An output file whose disk fills up at its second write (the first data after the
    header): half of that write is stored, then it fails, as a full disk makes it."""

    def __init__(self, file) -> None:  # type: ignore[no-untyped-def]
        self._file, self._writes = file, 0

    def write(self, data) -> int:  # type: ignore[no-untyped-def]
        self._writes += 1
        if self._writes == 2:
            self._file.write(memoryview(data).cast("B")[: len(memoryview(data).cast("B")) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._file, name)


def _input_output_error(*args: object) -> int:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


def _ended_writer(out, how: str) -> SafetensorsWriter:
    """A writer of ``w`` (2 rows) and ``v`` ended ``how``: committed, aborted half-way,
    whose commit failed (the output appeared meanwhile), whose write failed half-way (a full
    disk) or whose amend failed (an I/O error), and that was not aborted."""
    writer = SafetensorsWriter(out, {"w": ((2, 2), torch.float32), "v": ((2,), torch.float32)})
    if how == "write failed":
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                "ladle.writer.open",
                lambda *args: _FillingUp(open(*args)),  # noqa: SIM115 (the writer closes it)
                raising=False,
            )
            with pytest.raises(ladle.OutputError, match="writing 'w' failed: No space left"):
                writer.write("w", torch.ones(1, 2))
        return writer
    writer.write("w", torch.ones(1, 2))
    if how == "aborted":
        writer.abort()
        return writer
    writer.write("w", torch.ones(1, 2))
    writer.write("v", torch.ones(2))
    if how == "committed":
        writer.commit()
    elif how == "amend failed":
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "pwrite", _input_output_error)
            with pytest.raises(ladle.OutputError, match="amending 'v' failed: Input/output"):
                writer.amend("v", torch.tensor([0]), torch.tensor([5.0]))
    else:
        Path(out).write_bytes(b"someone else's")
        with pytest.raises(ladle.LadleError, match="appeared while merging"):
            writer.commit()
    return writer


@pytest.mark.parametrize("name", ["o.safetensors", "o"])
@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("committed", r"already committed \(its output is in place\)"),
        ("aborted", r"already aborted \(its temporary output is deleted\)"),
        ("commit failed", r"whose commit\(\) failed \(only abort\(\) is left to call\)"),
        ("write failed", r"whose write\(\) failed \(only abort\(\) is left to call\)"),
        ("amend failed", r"whose amend\(\) failed \(only abort\(\) is left to call\)"),
    ],
    ids=["committed", "aborted", "commit failed", "write failed", "amend failed"],
)
@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda writer: writer.write("w", torch.ones(1, 2)), r"write\('w'\)"),
        (lambda writer: writer.amend("w", torch.tensor([0]), torch.zeros(1)), r"amend\('w'\)"),
        (lambda writer: writer.commit(), r"commit\(\)"),
    ],
    ids=["write", "amend", "commit"],
)
def test_writing_with_a_writer_that_has_ended_is_refused_saying_how_it_ended(
    tmp_path, name, how, said, call, named
):
    """It used to fail as whatever the deleted or renamed files made of it: an
    AssertionError, an OutputError ("No such file"), "after the last planned tensor". After a
    write that failed half-way, another write was taken, its bytes after the half written
    (the output then too long, which only commit's check of its size caught); after a failed
    amend, commit put the output in place without the patch."""
    out = tmp_path / name
    writer = _ended_writer(out, how)
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}
    message = re.escape(f"writer for {out}: ") + rf"{named} on a writer {said}; a writer writes "
    with pytest.raises(ladle.LadleError, match=message) as caught:
        call(writer)
    assert type(caught.value) is ladle.LadleError  # not an OutputError: nothing failed on disk
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == before
    writer.abort()  # still allowed: it deletes what is left, or does nothing
    if how == "committed":
        assert ladle.load(out)["v"].tolist() == [1.0, 1.0]
    assert sorted(os.listdir(tmp_path)) == ([name] if how in ("committed", "commit failed") else [])


def test_every_writing_function_defaults_to_the_one_max_shard_size():
    """``DEFAULT_MAX_SHARD_SIZE``, "5GB" as before, is the default everywhere: the functions
    that write, the engine, the writer and the CLI (its value and its help)."""
    import inspect

    from ladle.cli import merge_kwargs, merge_options
    from ladle.engine import merge
    from ladle.writer import DEFAULT_MAX_SHARD_SIZE

    assert DEFAULT_MAX_SHARD_SIZE == "5GB"
    public = [getattr(ladle, name) for name in ladle.__all__]
    writing = [
        function
        for function in [*filter(inspect.isfunction, public), merge, SafetensorsWriter]
        if "max_shard_size" in inspect.signature(function).parameters
    ]
    names = {function.__name__ for function in writing}
    assert {"save", "uniform_soup", "ties", "dare", "merge", "SafetensorsWriter"} <= names
    defaults = {
        function.__name__: inspect.signature(function).parameters["max_shard_size"].default
        for function in writing
    }
    assert defaults == dict.fromkeys(names, DEFAULT_MAX_SHARD_SIZE)
    parser = merge_options()
    assert merge_kwargs(parser.parse_args(["-o", "out"]))["max_shard_size"] == "5GB"
    (option,) = [a for a in parser._actions if "--max-shard-size" in a.option_strings]
    assert option.help == "largest shard of a directory output: 500MB, 2GiB, ... (default: 5GB)"


def test_keys_sharing_storage_are_each_written_with_their_own_bytes(tmp_path):
    """Tied weights (docs/sources.md): both keys are written, as safetensors' save_file
    would refuse to and save_model would not (it keeps one name)."""
    from safetensors.torch import load_file

    embedding = torch.arange(6.0).reshape(3, 2)
    tied = {"embed_tokens.weight": embedding, "lm_head.weight": embedding}
    out = ladle.save(tied, tmp_path / "o.safetensors")
    loaded = load_file(out)
    assert sorted(loaded) == ["embed_tokens.weight", "lm_head.weight"]
    assert all(torch.equal(loaded[key], embedding) for key in loaded)
    assert out.stat().st_size == len(_header_bytes(out)) + 2 * embedding.nbytes


def _header_bytes(path) -> bytes:
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        return size.to_bytes(8, "little") + file.read(size)


@pytest.mark.parametrize(
    ("key", "index", "message"),
    [
        ("x", torch.tensor([0]), r"amend\('x'\) of a tensor not planned"),
        ("w", torch.tensor([0.0]), r"amend\('w'\) expected an index .* got torch\.float32"),
        ("w", torch.tensor([1], dtype=torch.uint8), r"amend\(.w.\) expected .* got torch\.uint8"),
    ],
    ids=["unknown key", "float index", "uint8 index (a mask)"],
)
def test_amend_of_an_unknown_key_or_with_an_index_that_is_not_integers_is_refused(
    tmp_path, key, index, message
):
    """They were a KeyError, an IndexError from torch, and a uint8 index taken for a mask."""
    with (
        pytest.raises(ladle.LadleError, match=re.escape(f"writer for {tmp_path}/o: ") + message),
        SafetensorsWriter(tmp_path / "o", {"w": ((2,), torch.float32)}) as writer,
    ):
        writer.write("w", torch.ones(2))
        writer.amend(key, index, torch.zeros(1))
    assert os.listdir(tmp_path) == []


def test_without_preadv_and_fdatasync_writes_amends_and_reads_are_the_same(tmp_path, monkeypatch):
    # macOS has no os.fdatasync (every write-back raised AttributeError on its thread, and
    # the commit then failed), and Python built for macOS before 11 no os.preadv.
    import ladle.writer as module

    monkeypatch.delattr(os, "preadv", raising=False)
    monkeypatch.delattr(os, "fdatasync", raising=False)
    monkeypatch.setattr(module, "SYNC_EVERY", 1024)  # a write-back every 4 rows
    tensor = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    out = tmp_path / "out.safetensors"
    with SafetensorsWriter(out, {"w": ((64, 64), torch.float32)}) as writer:
        for start in range(0, 64, 8):
            writer.write("w", tensor[start : start + 8])
        writer.amend("w", torch.tensor([5, 4000]), torch.tensor([-1.0, -2.0]))
    expected = tensor.clone()
    expected.view(-1)[torch.tensor([5, 4000])] = torch.tensor([-1.0, -2.0])
    assert torch.equal(ladle.load(out)["w"], expected)
    with ladle.open_checkpoint(out) as checkpoint:
        into = torch.empty(64 * 64 * 4, dtype=torch.uint8)
        assert torch.equal(checkpoint.read_rows("w", slice(10, 63), into), expected[10:63])


def test_outputs_are_flushed_past_the_drive_cache_where_fsync_is_not_enough(tmp_path, monkeypatch):
    # macOS: fsync leaves the data in the drive's cache (fcntl F_FULLFSYNC flushes it); a
    # power cut after the rename could leave a partial file under the final name.
    import fcntl

    calls: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)  # macOS's value
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, command: calls.append(f"fcntl {command}"))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    out = ladle.save({"w": torch.ones(3)}, tmp_path / "m.safetensors")
    assert ladle.load(out)["w"].tolist() == [1.0, 1.0, 1.0]
    assert calls == ["fcntl 51"]  # the output file, flushed with F_FULLFSYNC, not fsync

    def refused(fd, command):  # a filesystem without F_FULLFSYNC: fsync instead
        raise OSError(25, "Inappropriate ioctl for device")

    monkeypatch.setattr(fcntl, "fcntl", refused)
    calls.clear()
    ladle.save({"w": torch.zeros(3)}, tmp_path / "n.safetensors")
    assert "fsync" in calls


def test_an_empty_directory_is_no_output_to_refuse_where_a_directory_output_goes(tmp_path):
    # `mkdir out` before the merge: nothing in it to lose, so no overwrite is needed; the
    # output replaces it by a rename. Anything in it, or a file output's name, still counts.
    models = family(2, seed=5)
    (tmp_path / "made").mkdir()
    written = ladle.uniform_soup(models, out=tmp_path / "made")
    assert ladle.load(written).keys() == models[0].keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made"]
    (tmp_path / "saved").mkdir()
    ladle.save(models[0], tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    (tmp_path / "d.safetensors").mkdir()
    for taken in ("full", "d.safetensors"):
        with pytest.raises(ladle.LadleError, match="already exists"):
            ladle.uniform_soup(models, out=tmp_path / taken)
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"


def test_a_directory_filled_while_merging_is_not_replaced(tmp_path, monkeypatch):
    # Empty when the merge began, not when its output is renamed into place: the rename
    # fails (a non-empty directory), and the error says the output appeared.
    from ladle import writer

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "theirs").write_text("theirs")
    (tmp_path / "temp").mkdir()
    monkeypatch.setattr(writer, "output_taken", lambda out: False)  # as at the start
    with pytest.raises(ladle.LadleError, match="appeared while merging"):
        writer.rename_into_place(tmp_path / "temp", tmp_path / "out", overwrite=False)
    assert (tmp_path / "out" / "theirs").read_text() == "theirs"


@pytest.mark.parametrize(
    "tensor",
    [torch.arange(8.0)[::4][:1], torch.arange(8)[::4][:1], torch.arange(6.0).reshape(1, 6)[:, 2]],
    ids=["float one of every four", "int64 one of every four", "column of a one-row matrix"],
)
def test_a_one_element_view_whose_stride_is_not_1_is_saved(tmp_path, tensor):
    """torch calls such a view contiguous; its bytes are still written (was a RuntimeError:
    'self.stride(-1) must be 1 to view ... as Byte')."""
    from safetensors.torch import load_file

    assert tensor.numel() == 1 and tensor.stride(0) != 1 and tensor.is_contiguous()
    out = ladle.save({"w": tensor}, tmp_path / "o.safetensors")
    loaded = load_file(out)["w"]
    assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
    assert loaded.tolist() == tensor.tolist()


def test_a_merge_copying_a_transposed_integer_buffer_in_one_element_chunks_writes_it(tmp_path):
    """Non-floating tensors are copied in chunks of ``chunk_bytes``; one element of a
    transposed buffer is a one-element view with stride 4, which the writer refused."""
    buffer = torch.arange(16).reshape(4, 4).t()
    models = [{"w": torch.ones(2), "buf": buffer}, {"w": torch.zeros(2), "buf": buffer.t()}]
    out = ladle.uniform_soup(models, out=tmp_path / "o.safetensors", chunk_bytes=8, device="cpu")
    loaded = ladle.load(out)
    assert torch.equal(loaded["buf"], buffer) and loaded["w"].tolist() == [0.5, 0.5]


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_abort_after_a_commit_keeps_the_output_and_the_writer_says_it_was_committed(tmp_path):
    out = tmp_path / "o.safetensors"
    writer = SafetensorsWriter(out, {"w": ((2,), torch.float32)})
    writer.write("w", torch.ones(2))
    assert writer.commit() == out
    writer.abort()  # does nothing once committed
    assert torch.equal(ladle.load(out)["w"], torch.ones(2))
    with pytest.raises(ladle.LadleError, match=r"on a writer already committed \(its output"):
        writer.write("w", torch.ones(2))


def test_a_symbolic_link_to_an_empty_directory_is_an_existing_output(tmp_path):
    # An empty directory is no output yet (mkdir out first); a link to one is a link.
    target = tmp_path / "empty"
    target.mkdir()
    out = tmp_path / "out"
    out.symlink_to(target)
    with pytest.raises(ladle.LadleError, match="already exists"):
        ladle.save({"w": torch.ones(2)}, out)
    assert out.is_symlink() and list(target.iterdir()) == []


def test_a_leftover_of_a_process_this_user_may_not_signal_is_left_alone(tmp_path, monkeypatch):
    # os.kill(pid, 0) refused (PermissionError): the process runs, under another user.
    made = leftover(tmp_path / "out.safetensors")
    made.write_bytes(b"another user's write")

    def refused(pid: int, signal: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)
    ladle.save({"w": torch.ones(1)}, tmp_path / "out.safetensors")
    assert made.read_bytes() == b"another user's write"


def test_a_rename_into_a_path_under_a_file_fails_at_once_with_the_os_error(tmp_path):
    from ladle.writer import rename_into_place

    temp = tmp_path / "temp"
    temp.mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):  # no retries that end in "other writers kept..."
        rename_into_place(temp, tmp_path / "file" / "out", overwrite=True)
    assert temp.is_dir()


def test_overwrite_writes_into_an_empty_directory(tmp_path):
    # `mkdir out` then --overwrite: the empty folder is nothing to lose, before the merge and
    # at the rename alike (it read 'is a folder without safetensors weights ()').
    (tmp_path / "out").mkdir()
    ladle.save({"w": torch.ones(2)}, tmp_path / "out", overwrite=True)
    assert os.listdir(tmp_path) == ["out"]
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    assert ladle.load(tmp_path / "out")["w"].tolist() == [1.0, 1.0]


def _unlistable(monkeypatch, folder: Path, error: type[OSError] = PermissionError) -> None:
    """``folder`` cannot be listed (as without read permission, which root ignores); with
    ``FileNotFoundError``, as when another writer moves it away once it was looked at."""
    scandir = os.scandir
    code = errno.ENOENT if error is FileNotFoundError else errno.EACCES

    def refused(path=".", *args, **kwargs):
        if not isinstance(path, int) and os.fspath(path) == os.fspath(folder):  # not an fd
            raise error(code, os.strerror(code), os.fspath(path))
        return scandir(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", refused)


def test_a_folder_that_cannot_be_listed_is_taken_and_overwrite_does_not_replace_it(
    tmp_path, monkeypatch
):
    # Not known to be empty: without overwrite it already exists (not 'appeared while
    # merging' once the merge is done); with it, it is no known earlier output.
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _unlistable(monkeypatch, out)
    with pytest.raises(ladle.LadleError, match=rf"^{re.escape(str(out))}: already exists; pass"):
        ladle.save({"w": torch.ones(1)}, out)
    with pytest.raises(
        ladle.LadleError,
        match=rf"^{re.escape(str(out))}: is a folder that cannot be listed \(Permission denied\): "
        "overwrite replaces only an earlier output",
    ):
        ladle.save({"w": torch.ones(1)}, out, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out"]
    assert (out / "notes.txt").read_text() == "keep me" and os.listdir(out) == ["notes.txt"]


def test_overwrite_replaces_a_file_output_in_one_rename_never_leaving_it_missing(
    tmp_path, monkeypatch
):
    # A reader opening the output at any moment finds the old file or the new one.
    out = ladle.save({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    replace = os.replace
    present = []

    def recorded(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if out in (Path(src), Path(dst)):
            present.append(os.path.lexists(out))

    monkeypatch.setattr(os, "replace", recorded)
    ladle.save({"w": torch.ones(2)}, out, overwrite=True)
    monkeypatch.undo()
    assert present == [True]
    assert ladle.load(out)["w"].tolist() == [1.0, 1.0] and os.listdir(tmp_path) == [out.name]


def test_a_folder_output_moved_away_while_listed_is_replaced_with_overwrite(tmp_path, monkeypatch):
    # Another writer renamed the old output aside between the look at it and its listing:
    # nothing there to keep, so overwrite goes on (it is no "folder that cannot be listed").
    out = ladle.save({"w": torch.zeros(2)}, tmp_path / "out")
    _unlistable(monkeypatch, out, FileNotFoundError)
    ladle.save({"w": torch.ones(2)}, out, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out"] and ladle.load(out)["w"].tolist() == [1.0, 1.0]


@pytest.mark.slow  # 200 MB of headers written and read
def test_a_header_of_exactly_the_limit_safetensors_reads_is_written_one_past_it_refused(tmp_path):
    # safetensors reads a header of HEADER_LIMIT bytes, no more; padding keeps a header's
    # length a multiple of 8 (as the limit is), so one more byte of metadata makes it 8 more.
    from ladle.writer import HEADER_LIMIT

    probe = ladle.save({"w": torch.ones(2)}, tmp_path / "probe.safetensors", metadata={"n": ""})
    unpadded = len(_header_bytes(probe)[8:].rstrip(b" "))  # of the JSON, with empty notes
    notes = "x" * (HEADER_LIMIT - unpadded)
    out = ladle.save({"w": torch.ones(2)}, tmp_path / "at.safetensors", metadata={"n": notes})
    assert len(_header_bytes(out)) == 8 + HEADER_LIMIT
    assert ladle.load(out)["w"].tolist() == [1.0, 1.0]
    past = re.escape(f"{tmp_path / 'past.safetensors'}: header of {HEADER_LIMIT + 8} bytes")
    with pytest.raises(ladle.LadleError, match=rf"^{past}: safetensors reads at most"):
        ladle.save({"w": torch.ones(2)}, tmp_path / "past.safetensors", metadata={"n": notes + "x"})


def test_a_file_beside_the_output_not_named_as_a_leftover_is_left_alone(tmp_path):
    # .NAME.ladle-tmp- followed by other than PID-HOST-XXXXXXXX: no write of ladle's made it
    # (nor was the save to end in an IndexError for it).
    made = leftover(tmp_path / "out.safetensors")  # of this host, of a dead process
    prefix, fields = made.name.split(TEMP_MARK)
    for odd in (fields.split("-")[0], f"{fields}-copy"):
        (tmp_path / f"{prefix}{TEMP_MARK}{odd}").write_bytes(b"not ours")
    ladle.save({"w": torch.ones(1)}, tmp_path / "out.safetensors")
    assert len(list(tmp_path.glob(f"*{TEMP_MARK}*"))) == 2


def test_a_single_file_output_takes_no_max_shard_size_so_checks_none(tmp_path):
    # As save documents: max_shard_size is parsed (and refused) for a directory output only.
    model = {"w": torch.ones(3)}
    for size in ("no size", None, 1):
        out = tmp_path / f"{size}.safetensors"
        ladle.save(model, out, max_shard_size=size)  # type: ignore[arg-type]
        assert ladle.load(out)["w"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="max_shard_size: expected e.g."):
        ladle.save(model, tmp_path / "folder", max_shard_size="no size")


def test_amend_with_fewer_values_than_entries_is_refused_not_broadcast(tmp_path):
    specs = {"w": ((4,), torch.float32)}
    with (
        pytest.raises(ladle.LadleError, match=r"amend\('w'\) expected \(2,\) values .* got \(1,\)"),
        SafetensorsWriter(tmp_path / "o.safetensors", specs) as writer,
    ):
        writer.write("w", torch.zeros(4))
        writer.amend("w", torch.tensor([0, 3]), torch.tensor([9.0]))  # not 9 at both
    assert os.listdir(tmp_path) == []


def test_amended_entries_are_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    # The patch goes through a descriptor of its own: without a flush of that one too, a
    # power cut after the rename could leave the output with entries unpatched.
    import ladle.writer as module

    events: list[str] = []
    flush, pwrite = module._flush_to_disk, os.pwrite
    monkeypatch.setattr(module, "_flush_to_disk", lambda fd: events.append("flush") or flush(fd))
    monkeypatch.setattr(os, "pwrite", lambda *args: events.append("patch") or pwrite(*args))
    out = tmp_path / "o.safetensors"
    with SafetensorsWriter(out, {"w": ((4,), torch.float32)}) as writer:
        writer.write("w", torch.zeros(4))
        writer.amend("w", torch.tensor([1]), torch.tensor([5.0]))
        events.append("commit")
    assert events == ["patch", "commit", "flush", "flush"]  # the written file, the patched one
    assert ladle.load(out)["w"].tolist() == [0.0, 5.0, 0.0, 0.0]


def test_save_of_a_module_says_to_pass_its_state_dict(tmp_path):
    # Every other function takes modules; save raised "'Linear' object has no attribute
    # 'items'".
    with pytest.raises(TypeError) as info:
        ladle.save(torch.nn.Linear(2, 2), tmp_path / "o.safetensors")  # type: ignore[arg-type]
    assert str(info.value) == (
        "state_dict: expected a mapping of str to torch.Tensor, found Linear; pass its "
        ".state_dict()"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["x/o.safetensors", "x/odir"])
def test_a_relative_output_stays_put_when_the_working_directory_changes_mid_merge(
    tmp_path, monkeypatch, out
):
    # The writer reopened shards and renamed by the relative name: "writing 'w' failed: No
    # such file or directory", and the temporary output was left in x/.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    models = [{"w": torch.randn(256, 64), "v": torch.randn(256, 64)} for _ in range(2)]

    class Moving:  # a progress bar whose first update changes the working directory
        def __init__(self, **kwargs):
            self.moved = False

        def update(self, n):
            if not self.moved:
                os.chdir(tmp_path / "y")
                self.moved = True

        def close(self):
            pass

    written = ladle.uniform_soup(models, out=out, progress=Moving, chunk_bytes=4096)
    assert written == Path(out)  # as given
    result = ladle.load(tmp_path / out)
    expected = ladle.uniform_soup(models)
    assert all(torch.equal(result[k], expected[k]) for k in expected)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [Path(out).name]
    assert list((tmp_path / "y").iterdir()) == []


def test_names_that_are_no_utf8_are_refused_before_any_work(tmp_path):
    # A torch file's key may hold a lone surrogate; JSON escapes it and safetensors refuses
    # it: the whole merge ran, then "the written file ... does not read back".
    torch.save({"\ud800": torch.ones(2)}, tmp_path / "s.pt")
    with pytest.raises(ladle.LadleError) as info:
        ladle.uniform_soup([tmp_path / "s.pt"] * 2, out=tmp_path / "o.safetensors")
    assert str(info.value) == (
        f"{tmp_path / 'o.safetensors'}: tensor '\\ud800': its name is no valid UTF-8 text, which "
        "safetensors needs; rename the key"
    )
    with pytest.raises(ValueError) as info:
        ladle.save({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata={"a": "\udc80"})
    assert str(info.value) == (
        f"{tmp_path / 'm.safetensors'}: metadata: 'a' -> '\\udc80' is no valid UTF-8 text (a "
        "lone surrogate), which safetensors needs"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def test_metadata_that_is_no_mapping_is_a_type_error_naming_it(tmp_path):
    with pytest.raises(TypeError) as info:  # was "'list' object is not a mapping"
        ladle.save({"w": torch.ones(2)}, tmp_path / "a.safetensors", metadata=[("a", "b")])
    assert str(info.value) == "metadata: expected a mapping of str to str, found list"


def test_a_failed_write_removes_the_folders_it_made_for_the_output(tmp_path):
    # new/sub was made for the output and left behind, empty, when the write failed.
    (tmp_path / "keep").mkdir()
    for out in (tmp_path / "new" / "sub" / "o.safetensors", tmp_path / "keep" / "sub" / "o"):
        nan = {"w": torch.tensor([1.0, float("nan")])}  # found while merging, once made
        with pytest.raises(ladle.NonFiniteError):
            ladle.uniform_soup([nan, {"w": torch.ones(2)}], out=out)
        writer = SafetensorsWriter(out, {"w": ((2,), torch.float32)})  # makes the folders
        with pytest.raises(RuntimeError, match="boom"), writer:
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["keep"] and os.listdir(tmp_path / "keep") == []


def test_an_earlier_output_that_cannot_be_deleted_is_named_in_a_warning(tmp_path, monkeypatch):
    # A folder of read-only folders cannot be deleted: it stayed, hidden, with no word.
    ladle.save({"w": torch.ones(2)}, tmp_path / "out")
    monkeypatch.setattr("ladle.writer._remove", lambda path: None)  # as a read-only tree
    with pytest.warns(
        UserWarning,
        match=r"out: written; the earlier output, moved aside to .*"
        r"\.out\.ladle-old-.*, could not be deleted",
    ):
        ladle.save({"w": torch.zeros(2)}, tmp_path / "out", overwrite=True)
    assert ladle.load(tmp_path / "out")["w"].tolist() == [0.0, 0.0]


def test_ctrl_c_while_the_replaced_output_is_deleted_still_deletes_it(tmp_path, monkeypatch):
    # The new output was in place; the old one, renamed aside, stayed for good (the next
    # write skips leftovers of a live process: this one).
    import shutil

    ladle.save({"w": torch.ones(2)}, tmp_path / "out")
    real, calls = shutil.rmtree, []

    def interrupted(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr("ladle.writer.shutil.rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ladle.save({"w": torch.zeros(2)}, tmp_path / "out", overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and len(calls) == 2
    assert ladle.load(tmp_path / "out")["w"].tolist() == [0.0, 0.0]


def test_ctrl_c_while_the_writer_is_being_made_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # The temporary folder was made before the writer's thread pool, outside the try that
    # aborts: Ctrl-C between them left it.
    monkeypatch.setattr("ladle.writer.ThreadPoolExecutor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SafetensorsWriter(tmp_path / "new" / "o", {"w": ((2,), torch.float32)})
    assert os.listdir(tmp_path) == []


# Found by mutation testing (each test fails on a one-token change the suite let through).


def test_a_shard_index_is_indented_json_ending_in_a_newline(tmp_path):
    out = ladle.save({"a": torch.ones(4), "b": torch.ones(4)}, tmp_path / "m", max_shard_size=16)
    text = (out / "model.safetensors.index.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"


@pytest.mark.parametrize(("pid", "removed"), [(2**31 - 1, True), (2**31, False)])
def test_a_leftover_of_the_largest_pid_is_judged_and_one_past_it_left(tmp_path, pid, removed):
    # No process has pid 2³¹ − 1 here: its leftover is stale. Past pid_t's range, no write of
    # ours made it: left alone.
    from ladle.writer import _host_tag

    leftover = tmp_path / f".o.safetensors{TEMP_MARK}{pid}-{_host_tag()}-deadbeef"
    leftover.write_bytes(b"x")
    ladle.save({"w": torch.zeros(4)}, tmp_path / "o.safetensors")
    assert leftover.exists() != removed


def test_an_output_larger_than_the_free_disk_but_not_twice_it_is_refused(tmp_path, monkeypatch):
    import shutil

    calls = []
    monkeypatch.setattr("ladle.writer._fallocate", lambda: lambda *args: calls.append(args) or 0)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=3000))
    with pytest.raises(ladle.OutputError, match=r"3000 bytes are free there"):
        ladle.save({"w": torch.zeros(1000)}, tmp_path / "o.safetensors")  # about 4.1 KB
    assert calls == [] and os.listdir(tmp_path) == []


# --- pinned by mutation testing (round 5): each fails on the mutant named -------------------


def test_a_folder_named_with_an_upper_case_safetensors_suffix_is_a_folder_output(tmp_path):
    # round 5 mutant V04
    import ladle.writer as writer_module

    out = tmp_path / "m.SAFETENSORS"  # a directory output, not one file
    ladle.save({"w": torch.ones(2)}, out / "model.safetensors")
    # An earlier folder output, which overwrite may replace (no error raised).
    writer_module.check_output_free(out, overwrite=True)


def test_physical_path_follows_the_last_dotdot(tmp_path, monkeypatch):
    # round 5 mutant V14
    import ladle.writer as writer_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    assert writer_module.physical_path("x/../y/../out") == tmp_path.resolve() / "out"


def test_physical_path_keeps_a_link_named_after_the_last_dotdot(tmp_path):
    # round 5 mutant V16
    import ladle.writer as writer_module

    (tmp_path / "d").mkdir()
    (tmp_path / "target.safetensors").write_bytes(b"")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "target.safetensors")
    found = writer_module.physical_path(tmp_path / "d" / ".." / "link.safetensors")
    assert found == tmp_path.resolve() / "link.safetensors"  # the link itself, not its target


def test_a_metadata_name_that_is_no_utf8_is_refused_before_anything_is_written(tmp_path):
    # round 5 mutant V31
    out = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="UTF-8"):
        ladle.save({"w": torch.ones(2)}, out, metadata={"\ud800": "x"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["o.safetensors", "sharded"])
def test_an_output_larger_than_the_free_disk_is_refused_where_nothing_can_be_reserved(
    tmp_path, monkeypatch, out
):
    # Without fallocate (macOS) the check of the free space was skipped with the reservation:
    # a merge larger than the disk ran until a write failed (found by a static review for
    # macOS). No fallocate is asked for, as there is none.
    import shutil

    monkeypatch.setattr("ladle.writer._fallocate", lambda: None)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(ladle.OutputError) as caught:
        ladle.save(
            {"a": torch.zeros(1000), "b": torch.zeros(1000)}, tmp_path / out, max_shard_size=5000
        )
    found = re.fullmatch(
        rf"{re.escape(str(tmp_path / out))}: cannot reserve (\d+) bytes of disk for the output "
        r"\(No space left on device\); 1000 bytes are free there",
        str(caught.value),
    )
    assert found and int(found.group(1)) >= 4000
    assert os.listdir(tmp_path) == []  # the temporary output is gone
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10**9))
    assert ladle.load(ladle.save({"a": torch.ones(3)}, tmp_path / out))["a"].tolist() == [1.0] * 3


def test_containers_sharing_a_host_name_but_not_process_ids_have_tags_of_their_own(
    tmp_path, monkeypatch
):
    # Containers with the host's network share its name, not its pids: a leftover of a writer
    # running in another container carried this tag and a pid this namespace lacks, and the
    # next write to the output deleted it mid-merge (found by a review for shared
    # filesystems). The pid namespace now enters the tag.
    import ladle.writer as writer

    readlink = os.readlink
    namespace = {"now": "pid:[4026532001]"}

    def link(path, *args, **kwargs):
        if str(path) == "/proc/self/ns/pid":
            return namespace["now"]
        return readlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "readlink", link)
    theirs = writer._host_tag()
    namespace["now"] = "pid:[4026532002]"
    ours = writer._host_tag()
    assert ours != theirs and len(ours) == len(theirs) == 8
    out = tmp_path / "o.safetensors"
    dead = next(pid for pid in range(writer._MAX_PID, 1, -1) if not writer._alive(pid))
    running_elsewhere = tmp_path / f".o.safetensors.ladle-tmp-{dead}-{theirs}-x"
    running_elsewhere.write_bytes(b"another container's merge")
    ours_left = tmp_path / f".o.safetensors.ladle-tmp-{dead}-{ours}-x"  # a crash of ours
    ours_left.write_bytes(b"left by a killed merge here")
    ladle.save({"w": torch.ones(2)}, out)
    assert running_elsewhere.read_bytes() == b"another container's merge"
    assert not ours_left.exists()


def test_an_output_deleted_while_checked_is_free(tmp_path, monkeypatch):
    # On NFS a folder deleted by another client can still look present from cached
    # attributes; reading it then finds it gone (FileNotFoundError), which counted as "taken":
    # the merge refused an output that was free.
    import ladle.writer as writer

    out = tmp_path / "merged"
    out.mkdir()

    def gone(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(writer.os, "scandir", gone)
    assert writer.output_taken(out) is False


def test_an_output_exactly_as_large_as_the_free_disk_is_written(tmp_path, monkeypatch):
    # round 5 mutant V37
    import shutil as _shutil

    import ladle.writer as writer

    if writer._fallocate() is None:
        pytest.skip("no fallocate here")
    first = ladle.save({"w": torch.ones(16)}, tmp_path / "first.safetensors")
    size = first.stat().st_size
    real = _shutil.disk_usage

    def usage(path):
        return real(path)._replace(free=size)

    monkeypatch.setattr(writer.shutil, "disk_usage", usage)
    out = ladle.save({"w": torch.ones(16)}, tmp_path / "second.safetensors")
    assert out.stat().st_size == size


def test_a_file_output_replaces_a_directory_that_passed_the_check(tmp_path, monkeypatch):
    # round 5 mutant V49
    import ladle.writer as writer

    temp = tmp_path / ".tmp-out"
    temp.write_bytes(b"new")
    out = tmp_path / "out.safetensors"
    out.mkdir()  # as if it appeared right after the check (the race rename_into_place handles)
    monkeypatch.setattr(writer, "_not_an_output", lambda path: None)
    writer.rename_into_place(temp, out, overwrite=True)
    assert out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_the_index_name_is_refused_as_an_extra_file(tmp_path):
    # round 5 mutant V58
    from ladle.writer import INDEX_NAME, SafetensorsWriter

    with pytest.raises(ladle.LadleError, match="cannot be an extra file"):
        SafetensorsWriter(
            tmp_path / "out", {"w": ((2,), torch.float32)}, extra_files={INDEX_NAME: b"{}"}
        )
    assert not (tmp_path / "out").exists()


def test_an_output_aside_is_not_put_back_over_one_that_took_its_place(tmp_path):
    # round 5 mutant V54
    from ladle.writer import _put_back

    old, out = tmp_path / ".old", tmp_path / "out.safetensors"
    old.write_bytes(b"old")
    out.write_bytes(b"another writer's")
    _put_back(old, out)
    assert out.read_bytes() == b"another writer's"
    assert not old.exists()


def _failing_write_back(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A write-back after every write (``SYNC_EVERY = 1``), the first failing with EIO;
    returns the descriptors written back so far."""
    import errno

    import ladle.writer as writer_module

    calls: list[int] = []

    def failing_once(descriptor: int) -> None:
        calls.append(descriptor)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_module, "SYNC_EVERY", 1)
    monkeypatch.setattr(writer_module, "_write_back", failing_once)
    return calls


def test_a_failed_background_write_back_fails_the_next_write_not_lost(tmp_path, monkeypatch):
    # The next write-back replaced the failed one's future unread: with a second write
    # before the commit, an EIO of the write-back was never seen and the output committed
    # (the final fsync on Linux need not report the same error again).
    import time

    from ladle.writer import SafetensorsWriter

    calls = _failing_write_back(monkeypatch)
    writer = SafetensorsWriter(tmp_path / "o.safetensors", {"w": ((4,), torch.float32)})
    writer.write("w", torch.ones(2))
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:  # the write-back ran, and failed
        time.sleep(0.01)
    time.sleep(0.05)
    with pytest.raises(ladle.OutputError, match=r"writing 'w' failed: Input/output error"):
        writer.write("w", torch.ones(2))
    writer.abort()
    assert os.listdir(tmp_path) == []


# --- pinned by mutation testing (round 6): each fails on the mutant named -------------------


def test_a_failed_background_write_back_fails_the_commit(tmp_path, monkeypatch):
    # round 6 mutant V82
    from ladle.writer import SafetensorsWriter

    _failing_write_back(monkeypatch)
    out = tmp_path / "o.safetensors"
    writer = SafetensorsWriter(out, {"w": ((4,), torch.float32)})
    writer.write("w", torch.ones(4))
    with pytest.raises(ladle.OutputError, match="Input/output error"):
        writer.commit()
    writer.abort()
    assert not out.exists()


def test_abort_after_amend_does_not_flush_and_cannot_fail_on_it(tmp_path, monkeypatch):
    # round 6 mutant V99
    import errno

    import ladle.writer as writer

    out = tmp_path / "o.safetensors"
    w = writer.SafetensorsWriter(out, {"w": ((4,), torch.float32)})
    w.write("w", torch.ones(4))
    w.amend("w", torch.tensor([1]), torch.tensor([5.0]))

    def failing(descriptor):  # the disk failing now: abort must still clean up, quietly
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer, "_flush_to_disk", failing)
    w.abort()  # no flush of what is being thrown away
    assert list(tmp_path.iterdir()) == []


def test_extra_files_are_written_into_a_directory_output(tmp_path):
    # round 6 mutant V85
    import ladle.writer as writer

    out = tmp_path / "merged"
    with writer.SafetensorsWriter(
        out, {"w": ((2,), torch.float32)}, extra_files={"config.json": b'{"a": 1}'}
    ) as w:
        w.write("w", torch.ones(2))
    assert (out / "config.json").read_bytes() == b'{"a": 1}'
    assert (out / "model.safetensors").is_file()


def test_an_extra_folder_is_copied_into_a_directory_output(tmp_path):
    # round 6 mutant V56
    import ladle.writer as writer

    extra = tmp_path / "tokenizer"
    extra.mkdir()
    (extra / "vocab.txt").write_text("a b")
    out = tmp_path / "merged"
    with writer.SafetensorsWriter(
        out, {"w": ((2,), torch.float32)}, extra_files={"tokenizer": extra}
    ) as w:
        w.write("w", torch.ones(2))
    assert (out / "tokenizer" / "vocab.txt").read_text() == "a b"


def test_every_file_of_a_directory_output_reaches_the_disk_before_it_is_renamed(
    tmp_path, monkeypatch
):
    # The shards were flushed (fsync; F_FULLFSYNC on macOS) before the rename, the index and
    # the extra files (config, tokenizer) were not: a file's data reaches the disk after its
    # name, so a power cut could leave an empty index under the final name (found by a
    # static review for macOS). Files are told apart by inode, which the rename keeps.
    import ladle.writer as writer

    flushed: list[int] = []
    real_flush, real_rename = writer._flush_to_disk, writer.rename_into_place
    monkeypatch.setattr(
        writer, "_flush_to_disk", lambda fd: flushed.append(os.fstat(fd).st_ino) or real_flush(fd)
    )
    before_rename: list[set[int]] = []
    monkeypatch.setattr(
        writer,
        "rename_into_place",
        lambda *args, **kwargs: before_rename.append(set(flushed)) or real_rename(*args, **kwargs),
    )
    tokenizer = tmp_path / "tokenizer"
    (tokenizer / "deeper").mkdir(parents=True)
    (tokenizer / "deeper" / "vocab.txt").write_text("a b")
    (tmp_path / "config.json").write_text("{}")
    out = tmp_path / "merged"
    extra = {"config.json": tmp_path / "config.json", "card.md": b"# card", "tokenizer": tokenizer}
    specs = {"a": ((100,), torch.float32), "b": ((100,), torch.float32)}
    with writer.SafetensorsWriter(out, specs, max_shard_size=500, extra_files=extra) as w:
        w.write("a", torch.ones(100))
        w.write("b", torch.ones(100))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "card.md",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer/deeper/vocab.txt",
    ]
    assert len(before_rename) == 1
    unflushed = [name for name in files if (out / name).stat().st_ino not in before_rename[0]]
    assert unflushed == []


def test_extra_files_of_a_single_file_output_are_refused(tmp_path):
    # round 6 mutant V57
    import ladle.writer as writer

    out = tmp_path / "o.safetensors"
    with pytest.raises(ladle.LadleError, match="extra files need a directory output"):
        writer.SafetensorsWriter(
            out, {"w": ((2,), torch.float32)}, extra_files={"config.json": b"{}"}
        )
    assert list(tmp_path.iterdir()) == []


def test_an_extra_file_named_as_weights_is_refused(tmp_path):
    # round 6 mutant V59
    import ladle.writer as writer

    with pytest.raises(ladle.LadleError, match="cannot be an extra file"):
        writer.SafetensorsWriter(
            tmp_path / "m", {"w": ((2,), torch.float32)}, extra_files={"x.safetensors": b""}
        )
    assert list(tmp_path.iterdir()) == []


def test_a_path_like_of_bytes_is_a_type_error(tmp_path):
    # round 6 mutant V23
    import os

    class BytesPath(os.PathLike):
        def __fspath__(self):
            return b""  # an empty path of bytes: refused as bytes, before its emptiness

    with pytest.raises(TypeError, match="^path: expected a path of str, found BytesPath of bytes$"):
        ladle.save({"w": torch.ones(2)}, BytesPath())
    with pytest.raises(TypeError, match="^out: expected a path of str, found BytesPath of bytes$"):
        ladle.uniform_soup([{"w": torch.ones(2)}], out=BytesPath())
    with pytest.raises(TypeError, match="^path: expected a str or os.PathLike path, found None$"):
        ladle.save({"w": torch.ones(2)}, None)  # type: ignore[arg-type]


def test_a_reservation_failing_part_way_gives_back_what_it_got(tmp_path, monkeypatch):
    # round 6 mutant V39
    import ctypes
    import errno
    import os
    import shutil
    import sys

    import ladle.writer as writer

    real = writer._fallocate()
    if real is None or not sys.platform.startswith("linux"):
        pytest.skip("needs fallocate")
    seen = {}

    def part_way(descriptor, mode, offset, length):  # reserves, then a quota stops it
        if real(descriptor, mode, offset, length) != 0:
            pytest.skip("this filesystem cannot reserve")
        seen["fd"] = descriptor
        ctypes.set_errno(errno.EDQUOT)
        return -1

    usage = shutil.disk_usage

    def measured(path):  # the free space is measured after what was reserved is given back
        if "fd" in seen:
            seen.setdefault("blocks", os.fstat(seen["fd"]).st_blocks)
        return usage(path)

    monkeypatch.setattr(writer, "_fallocate", lambda: part_way)
    monkeypatch.setattr(shutil, "disk_usage", measured)
    with pytest.raises(ladle.OutputError, match="cannot reserve"):
        ladle.save({"w": torch.ones(2**16)}, tmp_path / "o.safetensors")
    assert seen["blocks"] == 0


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_holding_only_the_finders_files_is_an_empty_output_folder(tmp_path, overwrite):
    # `mkdir merged`, opened in macOS's Finder, holds a .DS_Store (and, on exFAT or SMB, its
    # AppleDouble twin): without overwrite it was "already exists", with it "a folder
    # without safetensors weights", so only deleting a hidden file let anything be written.
    models = family(2, seed=6)
    out = tmp_path / "merged"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"Bud1")
    (out / "._.DS_Store").write_bytes(b"\x00\x05\x16\x07")
    written = ladle.uniform_soup(models, out=out, overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]
    expected = (models[0]["layer.weight"] + models[1]["layer.weight"]) / 2
    assert torch.equal(ladle.load(written)["layer.weight"], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_folder_with_a_file_beside_the_finders_is_still_taken(tmp_path):
    models = family(2, seed=6)
    out = tmp_path / "merged"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"Bud1")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ladle.LadleError, match="already exists"):
        ladle.uniform_soup(models, out=out)
    with pytest.raises(ladle.LadleError, match=r"without safetensors weights \(notes.txt\)"):
        ladle.uniform_soup(models, out=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".DS_Store", "notes.txt"]


class _Counted:
    """A progress class counting the bytes merged."""

    merged = 0

    def __init__(self, total: int, **_: object) -> None:
        _Counted.merged = 0

    def update(self, n: int) -> None:
        _Counted.merged += n

    def close(self) -> None:
        pass


def _model_dirs(tmp_path: Path, tokenizer: str) -> list[Path]:
    folders = []
    for i, model in enumerate(family(2, seed=7)):
        folder = ladle.save(model, tmp_path / f"m{i}")
        (folder / "tokenizer.json").write_text(tokenizer)
        folders.append(folder)
    return folders


def test_a_disk_without_room_for_the_extra_files_fails_before_merging(tmp_path, monkeypatch):
    # Only the shards were reserved: the tokenizer copied at the end met a full disk after
    # the whole merge ("finishing the output failed: No space left on device").
    import shutil

    models = _model_dirs(tmp_path, "{" + " " * 50_000 + "}")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=20_000))
    out = tmp_path / "merged"
    with pytest.raises(ladle.OutputError) as caught:
        ladle.uniform_soup(models, out=out, progress=_Counted)
    found = re.fullmatch(
        rf"{re.escape(str(out))}: no room for its index and extra files \((\d+) bytes, beside "
        r"its weights' \d+ reserved\); 20000 bytes are free there",
        str(caught.value),
    )
    assert found and int(found.group(1)) >= 50_002  # the tokenizer, the card
    assert _Counted.merged == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1"]
    monkeypatch.undo()  # with the room: written, the tokenizer copied
    ladle.uniform_soup(models, out=out)
    assert (out / "tokenizer.json").stat().st_size == 50_002


def test_an_extra_file_gone_before_it_is_copied_is_named(tmp_path):
    # "finishing the output failed: No such file or directory" named neither the file nor
    # that it was an input's.
    models = _model_dirs(tmp_path, "{}")

    class Removing(_Counted):
        def update(self, n: int) -> None:
            (models[0] / "tokenizer.json").unlink(missing_ok=True)

    out = tmp_path / "merged"
    with pytest.raises(ladle.OutputError) as caught:
        ladle.uniform_soup(models, out=out, progress=Removing)
    assert str(caught.value) == (
        f"{out}: copying {str(models[0] / 'tokenizer.json')!r} into it as 'tokenizer.json' "
        "failed: No such file or directory"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_amending_many_shards_keeps_few_files_open(tmp_path):
    # One descriptor per patched shard, kept to the commit: "amending 'k00251' failed: Too
    # many open files" past about 250 shards under a soft limit of 256.
    import resource

    base = {f"k{i:03d}": torch.zeros(16) for i in range(120)}
    a = {k: torch.full((16,), 1.0) for k in base}
    b = {k: torch.full((16,), -1.0) for k in base}  # cancel exactly: every entry a sign tie
    a["k000"] = b["k000"] = torch.full((16,), 2.0)  # a positive majority: ties patched to +1
    expected = ladle.ties([a, b], base, density=1.0, device="cpu")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 60, hard))
    try:
        out = ladle.ties([a, b], base, density=1.0, out=tmp_path / "m", max_shard_size=64)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(list(out.glob("model-*.safetensors"))) == 120  # one per key, each patched
    written = ladle.load(out)
    assert written["k001"].tolist() == [1.0] * 16 == expected["k001"].tolist()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
