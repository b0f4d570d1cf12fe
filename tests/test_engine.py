"""The streaming engine: reading files through the buffer pool changes no result."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import sys
import threading
import warnings
from contextlib import ExitStack
from typing import ClassVar

import pytest
import torch
from conftest import DictCheckpoint, assert_bit_for_bit, family
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import ladle
import ladle.testing
from ladle.checkpoint import declared_quantization
from ladle.cli import main
from ladle.engine import (
    Kernel,
    Scratch,
    chunk_shape,
    fold,
    merge,
    open_models,
    resolve_device,
    row_chunks,
)
from ladle.methods.ties import magnitude_thresholds


def collect_kernel() -> Kernel:
    """Keeps an owned copy of every input of a chunk: shows exactly what update received."""

    def init(key, rows, base):
        return [base.clone() if base is not None else None]

    def update(state, index, x):
        state.append(x.clone())
        return state

    def finalize(state):
        parts = [t for t in state if t is not None]
        return torch.stack(parts)

    return Kernel(init, update, finalize)


@given(
    n=st.integers(1, 6),
    dtypes=st.lists(
        st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
        min_size=7,
        max_size=7,
    ),
    chunk=st.integers(1, 80),
    prefetch=st.integers(0, 4),
    readers=st.integers(1, 3),
    with_base=st.booleans(),
)
def test_file_reads_through_the_pool_equal_the_tensors_in_memory(
    tmp_path_factory, n, dtypes, chunk, prefetch, readers, with_base
):
    directory = tmp_path_factory.mktemp("engine")
    models = family(n + 1, seed=n)
    for model, dtype in zip(models, dtypes):
        for key, value in model.items():
            if value.is_floating_point():
                model[key] = value.to(dtype)
    paths = []
    for i, model in enumerate(models):
        save_file(model, directory / f"m{i}.safetensors")
        paths.append(directory / f"m{i}.safetensors")

    def run(sources):
        with ExitStack() as stack:
            opened, base = open_models(sources[1:], sources[0] if with_base else None, stack)
            return {
                (key, str(rows)): result
                for key, rows, result in fold(
                    opened,
                    collect_kernel(),
                    base=base,
                    device=resolve_device("cpu"),
                    chunk_bytes=chunk,
                    prefetch=prefetch,
                    readers=readers,
                    copy_others=True,
                )
            }

    from_files, from_memory = run(paths), run(models)
    assert from_files.keys() == from_memory.keys()
    for key in from_memory:
        assert from_files[key].dtype == from_memory[key].dtype
        assert torch.equal(from_files[key], from_memory[key]), key


def test_a_file_truncated_after_opening_is_a_checkpoint_error_naming_it(tmp_path):
    import pytest

    save_file({"w": torch.randn(64, 64)}, tmp_path / "m.safetensors")
    with ladle.open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        ckpt.shape("w")
        data = (tmp_path / "m.safetensors").read_bytes()
        (tmp_path / "m.safetensors").write_bytes(data[:-100])
        buffer = torch.empty(64 * 64 * 4, dtype=torch.uint8)
        with pytest.raises(ladle.CheckpointError, match=r"m\.safetensors: changed since it was"):
            ckpt.read_rows("w", slice(None), buffer)


def test_a_file_replaced_after_opening_is_refused_not_read_with_the_old_header(tmp_path):
    import os

    import pytest

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4), "b": torch.full((4,), 2.0)}, path)
    with ladle.open_checkpoint(path) as ckpt:
        assert ckpt.shape("a") == (4,)
        # Same keys, other layout: read with the old header, "a" would be int32 bytes.
        save_file(
            {"a": torch.full((2, 2), 5, dtype=torch.int32), "b": torch.ones(8)},
            tmp_path / "new.safetensors",
        )
        os.replace(tmp_path / "new.safetensors", path)
        buffer = torch.empty(16, dtype=torch.uint8)
        for read in (
            lambda: ckpt.read_rows("a", slice(None), buffer),
            lambda: ckpt.map_rows("a", slice(None)),
        ):
            with pytest.raises(ladle.CheckpointError, match=r"m\.safetensors: changed since"):
                read()


def test_a_file_truncated_after_mapping_is_a_checkpoint_error_not_a_crash(tmp_path):
    import pytest

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(8), "w": torch.randn(64, 64)}, path)
    with ladle.open_checkpoint(path) as ckpt:
        assert ckpt.map_rows("a", slice(None)) is not None  # the file is mapped now
        path.write_bytes(path.read_bytes()[:-100])  # truncated in place, as "wb" does
        with pytest.raises(ladle.CheckpointError, match=r"m\.safetensors.*'w'.*ends early"):
            ckpt.map_rows("w", slice(60, 64))


def test_scratch_reuses_one_buffer_per_dtype():
    scratch = Scratch()
    a = scratch.take((4, 4), torch.float32, torch.device("cpu"))
    b = scratch.take((2, 3), torch.float32, torch.device("cpu"))
    c = scratch.take((5,), torch.float64, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 3)
    assert c.dtype == torch.float64 and c.data_ptr() != a.data_ptr()


def test_sharded_directories_and_torch_files_merge_like_dicts(tmp_path):
    gen = torch.Generator().manual_seed(0)
    models = [
        {
            f"k{i}": torch.randn(7, 5, generator=gen).to(torch.bfloat16 if i % 2 else torch.float32)
            for i in range(6)
        }
        | {"n": torch.tensor(3)}
        for _ in range(3)
    ]
    shards = [ladle.save(m, tmp_path / f"m{j}", max_shard_size=100) for j, m in enumerate(models)]
    # larger elements first: [n], [k0], [k2], [k4] (float32), [k1], [k3], [k5] (bfloat16)
    assert len(list(shards[0].glob("*.safetensors"))) == 7
    for from_files, from_memory in [
        (ladle.uniform_soup(shards, chunk_bytes=40), ladle.uniform_soup(models, chunk_bytes=40)),
        (
            ladle.ties(shards[1:], shards[0], chunk_bytes=40),
            ladle.ties(models[1:], models[0], chunk_bytes=40),
        ),
    ]:
        assert all(torch.equal(from_files[k], from_memory[k]) for k in from_memory)
    for j, model in enumerate(models[:2]):
        torch.save(model, tmp_path / f"t{j}.pt")
    soup = ladle.uniform_soup([tmp_path / "t0.pt", tmp_path / "t1.pt"])
    expected = ladle.uniform_soup(models[:2])
    assert all(torch.equal(soup[k], expected[k]) for k in expected)


def test_transfers_on_the_cpu_convert_results_and_copy_nothing():
    from ladle.engine import Transfers

    transfers = Transfers(torch.device("cpu"))
    x = torch.arange(6.0)
    assert transfers.to_device(x, torch.float32) == (x, None)  # no copy, no event to wait on
    moved, copied = transfers.to_device(x, torch.float64)
    assert torch.equal(moved, x.double()) and copied is None
    transfers.arrived(None)  # nothing to wait for
    results = [("a", slice(None), x), ("b", slice(0, 2), torch.ones(2, 3))]
    out = list(transfers.to_host(iter(results), {"a": torch.float32, "b": torch.bfloat16}.get))
    assert out[0][2] is x
    assert out[1][:2] == ("b", slice(0, 2)) and out[1][2].dtype == torch.bfloat16


def test_transfers_to_cuda_without_an_index_copy_to_the_device_current_where_made(monkeypatch):
    # "cuda" is the current device, and each thread has its own: a reading thread starts on
    # device 0. After torch.cuda.set_device(1) a merge on "cuda" runs its kernel on device 1,
    # so the copy streams of the reading threads (which copy the chunks) must be device 1's
    # too, not device 0's, whose streams the compute stream's events do not order.
    import threading

    from ladle.engine import Transfers

    current = threading.local()  # the CUDA runtime's current device: per thread, 0 at first
    monkeypatch.setattr(torch.cuda, "current_device", lambda: getattr(current, "index", 0))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("compute", device))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: ("copy", device))

    recorded = []

    class Event:  # marks the work queued before the fold (Transfers.before_read)
        def record(self, stream: object) -> None:
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    current.index = 1  # torch.cuda.set_device(1) on this thread
    transfers = Transfers(torch.device("cuda"))
    made: list[object] = []
    reader = threading.Thread(target=lambda: made.append(transfers._copy_stream()))
    reader.start()
    reader.join()
    assert transfers.device == torch.device("cuda", 1)
    assert made == [("copy", torch.device("cuda", 1))]
    assert recorded == [("compute", torch.device("cuda", 1))]  # on the compute stream
    assert Transfers(torch.device("cuda", 0)).device == torch.device("cuda", 0)  # as named


def test_releasing_each_tensor_after_its_pass_changes_no_bit(tmp_path, monkeypatch):
    # Inputs larger than MAPPED_BYTES_KEPT are unmapped tensor by tensor as passes finish
    # with them; later passes map them again. Every method gives the same bits either way.
    from conftest import assert_bit_for_bit, save_all

    import ladle.engine as engine

    base, *models = family(4, seed=9)
    paths = save_all([base, *models], tmp_path)
    runs = {
        "soup": lambda: ladle.uniform_soup(paths[1:], device="cpu"),
        "ties": lambda: ladle.ties(paths[1:], paths[0], device="cpu", chunk_bytes=16),
        "stock": lambda: ladle.model_stock(paths[1:], paths[0], device="cpu", chunk_bytes=16),
        "dare": lambda: ladle.dare(paths[1:], paths[0], combine="ties", device="cpu"),
    }
    kept = {name: run() for name, run in runs.items()}
    released = []
    original = ladle.checkpoint.SafetensorsCheckpoint.release
    monkeypatch.setattr(
        ladle.checkpoint.SafetensorsCheckpoint,
        "release",
        lambda self, key: released.append(key) or original(self, key),
    )
    monkeypatch.setattr(engine, "MAPPED_BYTES_KEPT", 0)
    for name, run in runs.items():
        assert_bit_for_bit(run(), kept[name])
    assert set(released) == {k for k, v in base.items() if v.is_floating_point()} | {
        "bn.num_batches_tracked"
    }


def test_a_cpu_reading_thread_leaves_torch_one_thread_fewer_and_restores_the_count(tmp_path):
    import pytest

    save_file({"w": torch.randn(16, 4), "v": torch.randn(3)}, tmp_path / "m.safetensors")
    kernel, seen = _recording_thread_counts()
    with _torch_threads(2), ladle.open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        device = resolve_device("cpu")
        list(fold([ckpt, ckpt], kernel, device=device, prefetch=2))
        assert seen == [1] * 4 and torch.get_num_threads() == 2
        list(fold([ckpt], kernel, device=device, prefetch=0))  # no reading thread
        assert seen[4:] == [2, 2]
        with pytest.raises(RuntimeError, match="stop"):  # restored on errors too
            for _ in fold([ckpt], kernel._replace(finalize=stop), device=device, prefetch=1):
                pass
        assert torch.get_num_threads() == 2


def test_a_fold_closed_on_another_thread_leaves_that_thread_s_count_alone(tmp_path):
    # Where torch's count is each thread's (OpenMP), the closing thread took the fold's
    # thread-local state for its own: its count was set to 1, and every later merge on it
    # pinned it there (a set_num_threads(2) of the user's undone by the next merge).
    import threading

    per_thread = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    ckpt = ladle.open_checkpoint({"w": torch.ones(64, 4)})
    kernel, _ = _recording_thread_counts()
    started, seen = threading.Event(), {}
    box: dict = {}

    def worker():
        torch.set_num_threads(2)
        box["fold"] = fold(
            [ckpt, ckpt], kernel, device=resolve_device("cpu"), chunk_bytes=16, prefetch=2
        )
        next(box["fold"])
        seen["during"] = torch.get_num_threads()
        started.set()
        box["closed"].wait(60)
        seen["after"] = torch.get_num_threads()  # owed, where the count is the thread's
        ladle.uniform_soup([ckpt, ckpt], device="cpu")  # its next merge sets what is owed
        seen["next merge"] = torch.get_num_threads()

    box["closed"] = threading.Event()
    with _torch_threads(2):
        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            assert started.wait(60)
            box["fold"].close()  # here, not on the thread that began it
            assert torch.get_num_threads() == 2
        finally:
            box["closed"].set()
            thread.join(60)
        ladle.dare([{"w": torch.ones(4)}] * 3, {"w": torch.zeros(4)}, device="cpu")
        assert torch.get_num_threads() == 2
    assert seen["during"] == 1
    assert seen["after"] == (1 if per_thread else 2)
    assert seen["next merge"] == 2


def _recording_thread_counts() -> tuple[Kernel, list[int]]:
    """A kernel whose result is each chunk, and the list of torch's thread count at each
    ``update`` it appends to."""
    seen: list[int] = []

    def update(state, index, x):
        seen.append(torch.get_num_threads())
        return x.clone()

    return Kernel(lambda key, rows, base: None, update, lambda state: state), seen


@contextlib.contextmanager
def _torch_threads(count: int):
    """torch's intra-op thread count set to ``count``, then put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stop(state):
    raise RuntimeError("stop")


def test_resolve_device_refuses_what_torch_or_this_machine_cannot_use():
    import pytest

    from ladle.engine import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device: expected cpu, cuda, cuda:N .*found 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: 'cuda', but CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match=r"this machine has \d+ CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize(
    "merge",
    [
        lambda ms, b: ladle.uniform_soup(ms, device="cpu"),
        lambda ms, b: ladle.task_arithmetic(ms, b, device="cpu"),
        lambda ms, b: ladle.model_stock(ms, b, device="cpu"),
        lambda ms, b: ladle.ties(ms, b, density=0.5, device="cpu"),
        lambda ms, b: ladle.dare(ms, b, density=0.5, device="cpu"),
    ],
    ids=["soup", "task_arithmetic", "stock", "ties", "dare"],
)
def test_files_where_one_model_stores_a_key_in_float64(tmp_path, merge):
    # Key "a" (3 float32 entries, 12 bytes) sizes the read buffers; key "b" is read into one
    # as float64 (model 1 stores it so): the buffers must hold whole float64 entries.
    base = {"a": torch.zeros(3), "b": torch.zeros(1)}
    models = [
        {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.ones(1, dtype=torch.float64)},
        {"a": torch.tensor([3.0, 1.0, -1.0]), "b": torch.full((1,), 3.0)},
    ]
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, model in enumerate(models):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    from_files = merge(paths, tmp_path / "base.safetensors")
    in_memory = merge(models, base)
    assert from_files.keys() == in_memory.keys()
    for key in in_memory:
        assert torch.equal(from_files[key], in_memory[key]), key


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_resolve_device_refuses_devices_without_data_or_not_here(device):
    from ladle.engine import resolve_device

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    if device == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        pytest.skip("this machine has xpu")
    with pytest.raises(ValueError, match=rf"device: '{device}'"):
        resolve_device(device)


def test_float64_statistics_are_kept_on_the_cpu_for_a_device_without_float64(monkeypatch):
    # Model Stock's Gram matrix and diff's sums are float64: on mps, torch's TypeError
    # ("Cannot convert a MPS Tensor to float64 dtype") mid-pass (found by a static review).
    from ladle.engine import float64_home

    empty = torch.empty
    asked = []

    def without_float64(*size, dtype=None, device=None, **kwargs):
        asked.append((dtype, torch.device(device)))
        if dtype == torch.float64 and torch.device(device).type == "mps":
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype")
        return empty(*size, dtype=dtype, device=device, **kwargs)

    monkeypatch.setattr(torch, "empty", without_float64)
    assert float64_home(torch.device("mps")) == torch.device("cpu")
    assert float64_home(torch.device("meta")) == torch.device("meta")  # it has float64
    assert float64_home(torch.device("cpu")) == torch.device("cpu")  # known: nothing tried
    assert asked == [(torch.float64, torch.device("mps")), (torch.float64, torch.device("meta"))]


def test_a_device_without_a_dtype_the_merge_needs_is_refused_before_any_read(monkeypatch):
    # mps has no float64: float64 models (or --dtype fp64 results) failed mid-merge with
    # torch's TypeError, a traceback in the CLI (found by a static review for macOS). Here
    # the meta device stands in for it, torch.empty refusing float64 there.
    from ladle.engine import check_device_dtypes

    empty = torch.empty

    def without_float64(*size, dtype=None, device=None, **kwargs):
        if dtype == torch.float64 and torch.device(device).type == "meta":
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype")
        return empty(*size, dtype=dtype, device=device, **kwargs)

    monkeypatch.setattr(torch, "empty", without_float64)
    models = [
        ladle.open_checkpoint({"w": torch.ones(2, dtype=torch.float64), "b": torch.ones(2)})
        for _ in range(2)
    ]
    with pytest.raises(ValueError) as caught:
        next(fold(models, collect_kernel(), device=torch.device("meta")))
    assert str(caught.value) == (
        "device: 'meta' holds no torch.float64 tensors, which 'w' needs (Cannot convert a MPS "
        "Tensor to float64 dtype); merge it on the CPU (device='cpu')"
    )
    check_device_dtypes(torch.device("meta"), [(torch.float32, "b")])  # it has that one


def test_models_whose_floating_tensors_are_all_empty_merge_in_any_float_dtype(tmp_path):
    base = {"w": torch.zeros(0), "n": torch.tensor(1)}
    model = {"w": torch.zeros(0, dtype=torch.float8_e4m3fn), "n": torch.tensor(2)}
    for source in ([model], [tmp_path / "m.safetensors"]):
        save_file(model, tmp_path / "m.safetensors")
        merged = ladle.task_arithmetic(source, base, device="cpu")
        assert merged["w"].shape == (0,) and merged["w"].dtype == torch.float32
        assert merged["n"].item() == 1
    assert ladle.uniform_soup([base, model], device="cpu")["w"].shape == (0,)


def test_reading_threads_hand_chunks_over_in_order_whichever_finishes_first():
    import random
    import time

    from ladle.engine import _prefetched

    def task(i):
        def run():
            time.sleep(random.Random(i).uniform(0, 0.004))  # finish out of order
            return i

        return run

    for depth, threads in [(1, 1), (3, 3), (5, 2), (8, 4)]:
        assert list(_prefetched((task(i) for i in range(40)), depth=depth, threads=threads)) == [
            *range(40)
        ]


def test_reading_threads_stay_at_most_depth_ahead_and_end_when_the_consumer_stops():
    import threading
    import time

    from ladle.engine import _prefetched

    started: list[int] = []
    lock = threading.Lock()

    def task(i):
        def run():
            with lock:
                started.append(i)
            return i

        return run

    before = threading.active_count()
    results = _prefetched((task(i) for i in range(100)), depth=3, threads=3)
    assert next(results) == 0
    time.sleep(0.05)
    assert max(started) <= 3  # the first, then three ahead of the consumer
    results.close()  # tasks not started are cancelled; running ones are waited for
    assert max(started) <= 3 and threading.active_count() == before


def test_a_task_that_fails_on_a_reading_thread_raises_when_its_turn_comes():
    import threading

    from ladle.engine import _prefetched

    def task(i):
        def run():
            if i == 5:
                raise ladle.CheckpointError(f"cannot read chunk {i}")
            return i

        return run

    before = threading.active_count()
    seen = []
    with pytest.raises(ladle.CheckpointError, match="chunk 5"):
        for value in _prefetched((task(i) for i in range(20)), depth=4, threads=2):
            seen.append(value)
    assert seen == [0, 1, 2, 3, 4] and threading.active_count() == before


@pytest.mark.parametrize("readers", [1, 2, 3])
def test_several_reading_threads_merge_every_method_bit_for_bit(tmp_path, readers):
    from conftest import assert_bit_for_bit, save_all

    base, *models = family(4, seed=11)
    paths = save_all([base, *models], tmp_path)
    device = resolve_device("cpu")

    def soup(prefetch):
        from ladle.methods.soup import weighted_mean_kernel

        with ExitStack() as stack:
            opened, _ = open_models(paths[1:], None, stack)
            kernel = weighted_mean_kernel([0.25] * 4)
            return {
                f"{key}{rows}": result.clone()
                for key, rows, result in fold(
                    opened,
                    kernel,
                    device=device,
                    chunk_bytes=64,
                    prefetch=prefetch,
                    readers=readers,
                )
            }

    assert_bit_for_bit(soup(4), soup(0))


def test_fold_refuses_no_reading_threads(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    with (
        ladle.open_checkpoint(tmp_path / "m.safetensors") as ckpt,
        pytest.raises(ValueError, match="readers: expected a positive number"),
    ):
        list(fold([ckpt], collect_kernel(), device=resolve_device("cpu"), readers=0))


def test_reading_threads_for_an_accelerator_leave_a_core_to_the_arithmetic(monkeypatch):
    import ladle.engine as engine

    assert engine.reading_threads(torch.device("cpu")) == 1
    for cores, expected in [(1, 1), (2, 1), (3, 2), (16, engine.READERS), (None, 1)]:
        monkeypatch.setattr(engine.os, "cpu_count", lambda cores=cores: cores)
        assert engine.reading_threads(torch.device("cuda")) == expected


@pytest.mark.parametrize(
    ("a", "b", "kinds"),
    [
        (torch.float32, torch.int64, "floating and integer"),
        (torch.float32, torch.complex64, "floating and complex"),
        (torch.complex64, torch.int32, "complex and integer"),
        (torch.int8, torch.bool, None),  # both integers: the base's is copied
        (torch.complex64, torch.complex128, None),
    ],
)
def test_keys_of_different_kinds_are_refused_naming_both_kinds(a, b, kinds):
    first, second = {"w": torch.ones(2, dtype=a)}, {"w": torch.ones(2, dtype=b)}
    if kinds is None:
        ladle.add(first, second)
        return
    with pytest.raises(ladle.IncompatibleError, match=f"'w' has dtype {b}.*{kinds} tensors"):
        ladle.add(first, second)


class _LateCopies:
    """Stands in for :class:`Transfers` on an accelerator whose copies run late, as a GPU's
    copy engine does: each copy reads its pinned source some time after ``to_device``
    returns, and the host never waits for it (``arrived`` only orders the device's streams).
    A source refilled before its copy has read it is recorded as a violation."""

    violations: ClassVar[list[str]] = []

    def __init__(self, device):
        import concurrent.futures

        self.engine = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="late-copy")

    def to_device(self, chunk, dtype, check=None):
        import time

        moved = chunk.to(dtype=dtype, copy=True)  # what the copy will deliver
        queued = chunk.clone()

        def copy():
            time.sleep(0.001)
            if not torch.equal(chunk, queued):
                _LateCopies.violations.append("a pinned buffer was refilled before its copy")

        done = self.engine.submit(copy)
        if check is not None:
            check(moved)
        return moved, type("Event", (), {"synchronize": lambda self: done.result()})()

    def before_read(self):
        pass  # the caller queued nothing on the device before the fold

    def arrived(self, copied):
        assert copied is not None  # the device would wait on it; the host goes on


@pytest.mark.parametrize(("prefetch", "readers"), [(0, 1), (1, 1), (4, 3)])
def test_a_pinned_buffer_is_refilled_only_once_its_copy_has_read_it(
    tmp_path, monkeypatch, prefetch, readers
):
    import ladle.engine as engine

    gen = torch.Generator().manual_seed(3)
    paths = []
    for i in range(3):
        model = {"a": torch.randn(200, 8, generator=gen), "b": torch.randn(9, generator=gen)}
        model["c"] = torch.randn(30, 4, dtype=torch.complex64, generator=gen)  # read as bytes
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")

    def chunks(device):
        with ExitStack() as stack:
            opened, _ = open_models(paths, None, stack)
            results = fold(
                opened,
                collect_kernel(),
                device=device,
                chunk_bytes=256,
                prefetch=prefetch,
                readers=readers,
            )
            return [result for _, _, result in results]

    expected = chunks(resolve_device("cpu"))
    monkeypatch.setattr(engine, "Transfers", _LateCopies)
    monkeypatch.setattr(_LateCopies, "violations", [])
    # An accelerator's code path (pinned reads, copies, events), run on the CPU's tensors.
    late = chunks(torch.device("meta"))
    assert _LateCopies.violations == []
    assert len(late) == len(expected) > 20  # many chunks, each buffer reused
    assert all(torch.equal(a, b) for a, b in zip(late, expected))


def test_one_chunk_of_prefetch_is_read_while_the_consumer_uses_the_previous_one():
    import threading

    from ladle.engine import _prefetched

    started = [threading.Event() for _ in range(4)]

    def task(i):
        def run():
            started[i].set()
            return i

        return run

    results = _prefetched((task(i) for i in range(4)), depth=1, threads=1)
    assert next(results) == 0
    assert started[1].wait(timeout=10)  # read ahead before the consumer asks for it
    assert not started[2].wait(timeout=0.05)  # and no further
    assert list(results) == [1, 2, 3]


def test_pool_takers_racing_for_the_last_free_buffer_make_a_new_one_instead_of_waiting():
    import queue
    import threading
    import time

    from ladle.engine import _Pool

    class SlowQueue(queue.Queue):
        def get(self, *args, **kwargs):
            time.sleep(0.02)  # a taker descheduled between its check and its get
            return super().get(*args, **kwargs)

    pool = _Pool(8, count=3, device=torch.device("cpu"))
    pool._free = SlowQueue()
    pool.release(pool.take())  # one made and free, two unmade
    taken, barrier = [], threading.Barrier(2)

    def taker():
        barrier.wait()
        taken.append(pool.take())

    threads = [threading.Thread(target=taker, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(taken) == 2  # neither waits for a buffer while one can still be made
    assert taken[0].data_ptr() != taken[1].data_ptr()


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="reads /proc/self/fd (Linux)")
def test_threads_opening_a_file_at_once_leave_no_descriptor_behind(tmp_path):
    import os
    import threading

    save_file({"w": torch.ones(4)}, tmp_path / "m.safetensors")

    def open_descriptors():
        return len(os.listdir("/proc/self/fd"))

    before = open_descriptors()
    for _ in range(20):
        with ladle.open_checkpoint(tmp_path / "m.safetensors") as ckpt:
            barrier = threading.Barrier(6)

            def read(ckpt=ckpt, barrier=barrier):
                barrier.wait()
                ckpt.read_rows("w", slice(None), torch.empty(16, dtype=torch.uint8))

            threads = [threading.Thread(target=read) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert open_descriptors() == before


def test_incompatible_inputs_name_both_files_and_blame_a_base_every_model_disagrees_with(
    tmp_path,
):
    def saved(name, model):
        save_file(model, tmp_path / f"{name}.safetensors")
        return tmp_path / f"{name}.safetensors"

    good = [saved(f"m{i}", {"w": torch.ones(4, 2), "b": torch.ones(2)}) for i in range(2)]
    narrow = saved("narrow", {"w": torch.ones(4, 3), "b": torch.ones(2)})
    other = saved("other", {"v": torch.ones(2)})
    # A base whose shape no model has: the base is named, with a hint.
    with pytest.raises(
        ladle.IncompatibleError,
        match=r"^base \(.*narrow.safetensors\): key 'w' has shape \(4, 3\), every model has "
        r"\(4, 2\); is it the model they were fine-tuned from\?",
    ):
        ladle.task_arithmetic(good, narrow)
    with pytest.raises(
        ladle.IncompatibleError,
        match=r"^base \(.*other.safetensors\): keys differ from those of every model: "
        r"missing 2 \('b', 'w'\); extra 1 \('v'\)",
    ):
        ladle.task_arithmetic(good, other)
    # One model of three differs: that model is named, and the reference by its file.
    with pytest.raises(
        ladle.IncompatibleError,
        match=r"^model 2 \(.*narrow.safetensors\): key 'w' has shape \(4, 3\), "
        r"model 0 \(.*m0.safetensors\) has \(4, 2\)$",
    ):
        ladle.uniform_soup([*good, narrow])
    # Model 0 is the odd one of three: it is blamed, not model 1.
    with pytest.raises(
        ladle.IncompatibleError,
        match=r"^model 0 \(.*narrow.safetensors\): key 'w' has shape \(4, 3\), every other "
        r"model has \(4, 2\)$",
    ):
        ladle.uniform_soup([narrow, *good])
    # With a single model against the base, both are named; nothing tells which is wrong.
    with pytest.raises(
        ladle.IncompatibleError,
        match=r"^model 0 \(.*m0.safetensors\): key 'w' has shape \(4, 2\), "
        r"base \(.*narrow.safetensors\) has \(4, 3\)$",
    ):
        ladle.task_arithmetic(good[:1], narrow)


def test_key_sets_are_compared_for_every_model_before_any_shape():
    # Model 1 differs in shape, model 2 lacks the key: the key set is the first complaint,
    # never a read of a key model 2 does not have.
    models = [{"a": torch.zeros(2)}, {"a": torch.zeros(3)}, {"c": torch.zeros(3)}]
    with pytest.raises(ladle.IncompatibleError, match=r"^model 2 .*keys differ from model 0"):
        ladle.uniform_soup(models)
    base = {"a": torch.zeros(2), "b": torch.zeros(1)}
    odd = [{"a": torch.zeros(3), "b": torch.zeros(1)}, {"b": torch.zeros(1)}]
    with pytest.raises(ladle.IncompatibleError, match=r"^model 1 .*keys differ from base"):
        ladle.task_arithmetic(odd, base)


def test_a_weighted_sum_calls_its_first_model_a_model_not_a_base():
    a, b, c = {"w": torch.zeros(2)}, {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    with pytest.raises(ladle.IncompatibleError) as caught:
        ladle.weighted_sum([a, b, c], [1, 1, 1])
    message = str(caught.value)
    assert "every other model has (3,)" in message and "fine-tuned" not in message


def test_a_base_alone_of_another_dtype_kind_is_blamed():
    g = {"a": torch.zeros(2), "b": torch.zeros(3)}
    i = {"a": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(3)}
    with pytest.raises(
        ladle.IncompatibleError,
        match=r"^base .*'a' has dtype torch.int64, every model has torch.float32; integer and "
        r"floating tensors cannot be merged; is it the model they were fine-tuned from\?$",
    ):
        ladle.task_arithmetic([g, g], i)
    with pytest.raises(ladle.IncompatibleError, match=r"^model 0 .*every other model has"):
        ladle.uniform_soup([i, g, g])


def test_a_blamed_base_names_the_models_kind_when_their_dtypes_differ():
    a, b = {"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.bfloat16)}
    base = {"w": torch.zeros(2, dtype=torch.int64)}
    with pytest.raises(ladle.IncompatibleError, match=r"every model has a floating dtype;"):
        ladle.task_arithmetic([a, b], base)


def test_integer_tensors_are_copied_a_chunk_of_rows_at_a_time_without_a_second_copy(
    tmp_path, monkeypatch
):
    """A large non-floating tensor (quantized weights, an int8 table) is copied from the
    reference in chunks of at most ``chunk_bytes`` as stored, each read straight into memory
    of its own: no chunk, and no clone, the size of the whole tensor (it took twice the
    tensor's size in anonymous memory, whatever ``chunk_bytes``)."""
    table = torch.randint(-100, 100, (256, 64), dtype=torch.int8)
    ids = torch.arange(512, dtype=torch.int64).view(64, 8)
    for i in range(2):
        save_file({"q": table, "ids": ids, "w": torch.randn(8, 8)}, tmp_path / f"m{i}.safetensors")
    cloned = []
    original_clone = torch.Tensor.clone

    def counting_clone(self, *args, **kwargs):
        cloned.append(self.nbytes)
        return original_clone(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    sizes: dict[str, list[int]] = {"q": [], "ids": []}
    with ExitStack() as stack:
        opened, _ = open_models(
            [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"], None, stack
        )
        parts: dict[str, list[torch.Tensor]] = {"q": [], "ids": []}
        for key, _, result in fold(
            opened,
            collect_kernel(),
            device=resolve_device("cpu"),
            chunk_bytes=1024,
            copy_others=True,
        ):
            if key in sizes:
                sizes[key].append(result.nbytes)
                parts[key].append(original_clone(result))
    assert len(sizes["q"]) > 1 and max(sizes["q"]) <= 1024, sizes["q"]
    assert len(sizes["ids"]) > 1 and max(sizes["ids"]) <= 1024, sizes["ids"]
    assert torch.equal(torch.cat(parts["q"]), table) and torch.equal(torch.cat(parts["ids"]), ids)
    assert not [n for n in cloned if n > 1024], cloned  # collect_kernel clones the float key
    with_files = ladle.uniform_soup(
        [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"], chunk_bytes=1024
    )
    assert torch.equal(with_files["q"], table) and torch.equal(with_files["ids"], ids)
    out = ladle.uniform_soup(
        [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"],
        out=tmp_path / "soup.safetensors",
        chunk_bytes=1024,
        device="cpu",
    )
    written = ladle.load(out)
    assert torch.equal(written["q"], table) and torch.equal(written["ids"], ids)


@pytest.mark.parametrize(
    ("shape", "chunk_bytes", "view"),
    [
        ((8, 4), 64, (8, 4)),  # a row of 16 bytes fits: the tensor's own rows
        ((4, 16), 64, (4, 16)),  # a row of exactly 64 bytes fits too
        ((10, 3), 32, (10, 3)),  # rows of 12 bytes: 2 a chunk (24 bytes), never 3 (36)
        ((1, 100), 64, (100,)),  # one row of 400 bytes: read as entries
        ((3, 5, 4), 32, (15, 4)),  # rows of 80 bytes: fused experts read as (E·H, I)
        ((3, 5, 40), 32, (600,)),  # not even I fits
        ((2, 0, 9), 8, (2, 0, 9)),  # empty rows fit any chunk
        ((), 4, ()),
        ((7,), 4, (7,)),
    ],
)
def test_chunk_shape_merges_leading_dimensions_until_a_row_fits(shape, chunk_bytes, view):
    assert chunk_shape(shape, chunk_bytes) == view
    rows = row_chunks(shape, chunk_bytes)
    if view and math.prod(view):
        width = 4 * math.prod(view[1:])
        sizes = [len(range(*r.indices(view[0]))) * width for r in rows]
        assert sum(sizes) == 4 * math.prod(shape) and max(sizes) <= max(chunk_bytes, width)


def test_row_chunks_are_the_whole_tensor_or_end_at_its_last_row():
    assert row_chunks((5, 4), 32) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert row_chunks((4, 4), 32) == [slice(0, 2), slice(2, 4)]
    assert row_chunks((2, 4), 32) == [slice(None)]  # exactly one chunk: the whole tensor
    assert row_chunks((1, 100), 64) == [slice(i, min(i + 16, 100)) for i in range(0, 100, 16)]


def test_a_float64_input_after_the_first_makes_the_merge_compute_in_float64():
    # The mean of 1 and b = 1 + 2⁻²³ + 2⁻³⁰ in float64 is 1 + 2⁻²⁴ + 2⁻³¹, which rounds to
    # float32's 1 + 2⁻²³; with b read as float32 (1 + 2⁻²³) it is 1 + 2⁻²⁴, a tie: 1.0.
    a = {"w": torch.tensor([1.0])}
    b = {"w": torch.tensor([1.0 + 2.0**-23 + 2.0**-30], dtype=torch.float64)}
    assert ladle.uniform_soup([a, b], device="cpu")["w"].tolist() == [1.0 + 2.0**-23]
    base = {"w": torch.tensor([0.0])}
    merged = ladle.task_arithmetic([a, b], base, scale=0.5, device="cpu")
    assert merged["w"].tolist() == [1.0 + 2.0**-23]


def test_row_chunks_of_a_tensor_without_entries_is_the_whole_tensor():
    assert row_chunks((5, 0), 4) == [slice(None)]
    assert row_chunks((2, 0, 3), 1) == [slice(None)]
    assert row_chunks((0,), 1) == [slice(None)]


def family_with_long_rows(seed: int) -> list[dict[str, torch.Tensor]]:
    """A base and three fine-tunes whose tensors have rows longer than 64 bytes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"experts": (3, 5, 40), "row": (1, 300), "w": (6, 4), "half": (2, 3, 20)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    base["half"] = base["half"].to(torch.bfloat16)
    base["ids"] = torch.arange(50, dtype=torch.int64).view(1, 50)
    models = [
        {
            k: (v + torch.randn(v.shape, generator=gen).to(v.dtype)) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    return [base, *models]


MERGES = {
    "soup": lambda ms, b, **k: ladle.uniform_soup(ms, **k),
    "task_arithmetic": lambda ms, b, **k: ladle.task_arithmetic(ms, b, scale=0.7, **k),
    "ties global": lambda ms, b, **k: ladle.ties(ms, b, density=0.3, **k),
    "ties tensor": lambda ms, b, **k: ladle.ties(ms, b, density=0.3, trim="tensor", **k),
    "dare": lambda ms, b, **k: ladle.dare(ms, b, density=0.5, seed=3, **k),
    "dare ties": lambda ms, b, **k: ladle.dare(ms, b, density=0.5, combine="ties", **k),
    "model_stock": lambda ms, b, **k: ladle.model_stock(ms, b, **k),
}


@pytest.mark.parametrize(
    "method", ["soup", "ties global", "ties tensor", "dare ties", "model_stock"]
)
def test_empty_tensors_of_more_rows_than_a_chunk_merge_in_memory(method):
    """A (5, 0) tensor (and an integer (4, 0) one, copied) with chunk_bytes below its row
    count was cut into chunks of rows, which the in-memory result could not place: torch's
    "cannot reshape tensor of 0 elements into shape [-1, 0]"."""
    merge = MERGES[method]
    members = [
        {
            "e": torch.zeros(5, 0),
            "ids": torch.zeros(4, 0, dtype=torch.int64),
            "w": torch.tensor([1.0, -2.0]) * i,
        }
        for i in range(3)
    ]
    merged = merge(members[1:], members[0], chunk_bytes=4, device="cpu")
    assert merged["e"].shape == (5, 0) and merged["e"].dtype == torch.float32
    assert merged["ids"].shape == (4, 0) and merged["ids"].dtype == torch.int64
    expected = merge(members[1:], members[0], device="cpu")["w"]
    assert torch.equal(merged["w"], expected)


@pytest.mark.parametrize("method", list(MERGES))
def test_rows_longer_than_a_chunk_are_read_in_pieces_and_merge_as_if_stored_so(tmp_path, method):
    """A tensor one row of which exceeds ``chunk_bytes`` (a (1, n) tensor, fused experts) is
    read as ``chunk_shape``, its leading dimensions merged: every method gives, bit for bit,
    what it gives on the tensors stored in that shape, from files and from memory."""
    from conftest import assert_bit_for_bit, save_all

    merge = MERGES[method]
    stored = family_with_long_rows(5)
    views = [{k: v.reshape(chunk_shape(tuple(v.shape), 64)) for k, v in m.items()} for m in stored]
    expected = merge(views[1:], views[0], chunk_bytes=64, device="cpu")
    expected = {k: v.reshape(stored[0][k].shape) for k, v in expected.items()}
    paths = save_all(stored, tmp_path)
    from_files = merge(paths[1:], paths[0], chunk_bytes=64, device="cpu")
    assert_bit_for_bit(from_files, expected)
    assert_bit_for_bit(merge(stored[1:], stored[0], chunk_bytes=64, device="cpu"), expected)
    out = merge(paths[1:], paths[0], chunk_bytes=64, device="cpu", out=tmp_path / "m.safetensors")
    assert_bit_for_bit(ladle.load(out), expected)


class _CountingRows(DictCheckpoint):
    """A user's checkpoint that records how many rows of a key each read asks for."""

    def __init__(self, tensors: dict[str, torch.Tensor], reads: list[tuple[str, int]]) -> None:
        super().__init__(tensors)
        self.reads = reads

    def get_slice(self, key, rows):
        tensor = self.tensors[key]
        if tensor.dim():
            self.reads.append((key, len(range(*rows.indices(tensor.shape[0])))))
        return super().get_slice(key, rows)


@pytest.mark.parametrize("method", list(MERGES))
def test_every_pass_reads_a_large_tensor_a_chunk_of_rows_at_a_time(tmp_path, monkeypatch, method):
    """Streaming memory is a few chunks per model, never a whole tensor: TIES's threshold
    passes, Model Stock's Gram pass and every merge pass read at most a chunk of rows at a
    time (TIES's sample, at most ``SAMPLE`` entries whatever the chunk, is made small here)."""
    from ladle.methods import ties as ties_module

    monkeypatch.setattr(ties_module, "SAMPLE", 16)
    gen = torch.Generator().manual_seed(8)
    base = {"big": torch.randn(200, 16, generator=gen), "small": torch.randn(3, generator=gen)}
    models = [
        {k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)
    ]
    reads: list[tuple[str, int]] = []
    opened = [_CountingRows(m, reads) for m in [base, *models]]
    rows = 10  # 640 bytes: ten float32 rows of 16
    out = MERGES[method](opened[1:], opened[0], chunk_bytes=640, device="cpu", out=tmp_path / "o")
    big = [count for key, count in reads if key == "big"]
    assert big and max(big) <= rows, sorted(set(big))
    expected = MERGES[method](models, base, chunk_bytes=640, device="cpu")
    assert all(torch.equal(ladle.load(out)[k], expected[k]) for k in expected)


def test_a_long_row_is_read_a_chunk_at_a_time_by_reading_threads_too(tmp_path):
    from conftest import save_all

    stored = family_with_long_rows(6)
    paths = save_all(stored, tmp_path)
    for prefetch, readers in [(0, 1), (2, 2)]:
        with ExitStack() as stack:
            opened, base = open_models(paths[1:], paths[0], stack)
            seen = {}
            for key, _, result in fold(
                opened,
                collect_kernel(),
                base=base,
                device=resolve_device("cpu"),
                chunk_bytes=64,
                copy_others=True,
                prefetch=prefetch,
                readers=readers,
            ):
                assert result[0].nbytes <= 64 * (2 if result.dtype == torch.int64 else 1), key
                seen.setdefault(key, []).append(result.clone())
        for key, parts in seen.items():
            if stored[0][key].is_floating_point():
                whole = torch.cat([p.flatten(1) for p in parts], dim=1)
                for i, model in enumerate(stored):
                    assert torch.equal(whole[i].view(model[key].shape), model[key].float()), key
            else:
                assert torch.equal(
                    torch.cat([p.flatten() for p in parts]), stored[0][key].flatten()
                )


def test_subclasses_overriding_read_rows_and_map_rows_without_shape_still_merge(tmp_path):
    """``read_rows``/``map_rows`` are given ``shape`` only for a tensor read with its leading
    dimensions merged: a subclass that overrides them as they were before (no ``shape``)
    still merges every tensor whose rows fit in a chunk, in every reading mode and in TIES's
    sample."""

    class Former(DictCheckpoint):
        def read_rows(self, key, rows, into):
            return self.get_slice(key, rows)

        def map_rows(self, key, rows):
            return None

    from conftest import assert_bit_for_bit

    states = family(3, seed=2)
    expected = ladle.uniform_soup(states, device="cpu")
    formers = [Former(s) for s in states]
    assert_bit_for_bit(ladle.uniform_soup(formers, device="cpu"), expected)
    for prefetch in (0, 2):
        with ExitStack() as stack:
            opened, _ = open_models(formers, None, stack)
            for _ in fold(
                opened,
                collect_kernel(),
                device=resolve_device("cpu"),
                copy_others=True,
                prefetch=prefetch,
            ):
                pass
    merged = ladle.ties(formers[1:], formers[0], density=0.5, device="cpu")
    assert_bit_for_bit(merged, ladle.ties(states[1:], states[0], density=0.5, device="cpu"))


class _Bar:
    """A tqdm-like bar that records what a merge tells it."""

    made: ClassVar[list[_Bar]] = []

    def __init__(self, total: int, desc: str, **kwargs: object) -> None:
        self.total, self.desc, self.done, self.closed = total, desc, 0, False
        _Bar.made.append(self)

    def update(self, n: int) -> None:
        self.done += n

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("method", ["ties", "model_stock"])
@pytest.mark.filterwarnings("ignore:model_stock")  # random task vectors: some t clamped
def test_the_passes_that_prepare_a_merge_show_progress_too(method):
    # TIES's threshold pass and Model Stock's angle pass read every floating tensor before the
    # merging pass starts: half the merge, which showed no bar before.
    models, base = family(3, seed=1), family(1, seed=2)[0]
    _Bar.made.clear()
    getattr(ladle, method)(models, base, progress=_Bar, device="cpu")
    sources = [base, *models]
    floating = sum(t.nbytes for m in sources for t in m.values() if t.is_floating_point())
    everything = sum(t.nbytes for m in sources for t in m.values())
    assert [(bar.desc, bar.total) for bar in _Bar.made] == [
        ("preparing", floating),
        ("merging", everything),
    ]
    assert all(bar.done == bar.total and bar.closed for bar in _Bar.made)


@pytest.mark.parametrize("out", ["out", "out.safetensors"])
@pytest.mark.parametrize(
    "method",
    ["ties", "model_stock", "dare", "task_arithmetic", "greedy_soup", "uniform_soup", "slerp"],
)
def test_a_bad_shard_size_is_refused_before_any_pass_over_the_inputs(method, out, tmp_path):
    # It was refused by the writer, after TIES's or Model Stock's preparing pass (minutes on
    # an LLM) or after every evaluation of a greedy soup; with a single-file output, whose
    # one file has no use for it, not at all.
    models, base = family(3, seed=1), family(1, seed=2)[0]
    models = models[:2] if method == "slerp" else models
    evaluations: list[int] = []
    extra = {
        "greedy_soup": lambda: (lambda sd: evaluations.append(1) or 0.0,),
        "uniform_soup": lambda: (),
        "slerp": lambda: (),
    }.get(method, lambda: (base,))()
    _Bar.made.clear()
    with pytest.raises(ValueError, match=r"^max_shard_size: expected e\.g\. '5GB'"):
        getattr(ladle, method)(
            models, *extra, out=tmp_path / out, max_shard_size="5 apples", progress=_Bar
        )
    assert _Bar.made == [] and evaluations == []
    assert list(tmp_path.iterdir()) == []


def test_passes_of_one_preparation_share_one_bar():
    # trim="tensor" runs a threshold pass per tensor larger than a chunk (here the (4, 3) and
    # (2, 4) ones, at 16 bytes a chunk): one "preparing" bar, not one per tensor (hundreds
    # of lines for an LLM).
    models, base = family(3, seed=1), family(1, seed=2)[0]
    _Bar.made.clear()
    ladle.ties(models, base, trim="tensor", chunk_bytes=16, progress=_Bar, device="cpu")
    large = sum(m[k].nbytes for m in [base, *models] for k in ("layer.weight", "head.weight"))
    everything = sum(t.nbytes for m in [base, *models] for t in m.values())
    assert [(bar.desc, bar.total) for bar in _Bar.made] == [
        ("preparing", large),
        ("merging", everything),
    ]
    assert all(bar.done == bar.total and bar.closed for bar in _Bar.made)


def test_a_merge_without_preparation_shows_one_bar():
    _Bar.made.clear()
    ladle.task_arithmetic(family(2, seed=1), family(1, seed=2)[0], progress=_Bar, device="cpu")
    assert [bar.desc for bar in _Bar.made] == ["merging"]


def test_merges_overlapping_in_one_thread_give_torch_its_thread_count_back():
    # Each merge with threads of its own lowers torch's count while it runs; two overlapping
    # (generators taken in turns), each restoring the count it found, left fewer threads once
    # both were done.
    from ladle.engine import _threads_beside_readers

    original = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        cpu = torch.device("cpu")
        first, second = _threads_beside_readers(cpu, 1), _threads_beside_readers(cpu, 1)
        first.__enter__()
        assert torch.get_num_threads() == 3
        second.__enter__()
        assert torch.get_num_threads() == 2
        first.__exit__(None, None, None)
        assert torch.get_num_threads() == 3
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(original)


def test_a_process_holding_an_unfinished_fold_with_readers_exits():
    # Closed at exit, the fold gave torch's count back through a thread of its own, which
    # Python 3.11 never starts then: Thread.start() waited for good.
    import subprocess

    code = (
        "import torch\n"
        "from ladle.checkpoint import open_checkpoint\n"
        "from ladle.engine import Kernel, fold\n"
        "models = [open_checkpoint({'w': torch.ones(4), 'v': torch.ones(4)}) for _ in range(2)]\n"
        "k = Kernel(lambda key, rows, base: 0, lambda t, i, x: t, lambda t: torch.zeros(1))\n"
        "passes = fold(models, k, device=torch.device('cpu'), prefetch=1)\n"
        "next(passes)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True)
    assert done.returncode == 0, done.stderr


def test_ladle_s_own_threads_leave_a_shared_thread_count_alone(monkeypatch):
    # With torch's native backend the count is the process's: a reading thread setting its
    # own to 1 would have set everyone's.
    import ladle.engine

    original = torch.get_num_threads()
    monkeypatch.setattr(ladle.engine, "_PER_THREAD", [False])
    torch.set_num_threads(2)
    try:
        ladle.engine.one_thread_here()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


@pytest.mark.parametrize("where", ["lowering", "restoring"])
def test_ctrl_c_as_a_merge_changes_torch_s_count_leaves_no_count_lowered(monkeypatch, where):
    # Ctrl-C just after the count was lowered left the merge's readers counted for good:
    # that merge, and every later one on the thread, ended on the lowered count.
    import ladle.engine

    real, calls = ladle.engine.set_own_threads, []

    here = threading.current_thread()

    def interrupted(count: int) -> None:
        if threading.current_thread() is not here:  # DARE's drawing threads set their own
            real(count)
            return
        calls.append(count)
        if where == "restoring" and len(calls) == 2:
            raise KeyboardInterrupt  # as a signal: at a call, before it sets the count
        real(count)
        if where == "lowering" and len(calls) == 1:
            raise KeyboardInterrupt  # at the return of the call that lowered it

    models, base = family(3, seed=1), family(1, seed=2)[0]
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(ladle.engine, "set_own_threads", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ladle.dare(models, base, device="cpu")
        monkeypatch.setattr(ladle.engine, "set_own_threads", real)
        if where == "lowering":
            assert torch.get_num_threads() == 2  # given back on the way out
        else:  # cut short while giving it back: the next merge gives it
            assert torch.get_num_threads() == 1
        ladle.dare(models, base, device="cpu")
        assert torch.get_num_threads() == 2
        ladle.dare(models, base, device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


@pytest.mark.skipif(
    "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="torch's thread count is each thread's own with its OpenMP backend alone",
)
def test_a_merge_on_a_thread_leaves_the_count_other_threads_start_with_alone():
    # torch.set_num_threads (OpenMP) also sets the count each thread takes when it first
    # runs torch work: threads started during a merge elsewhere kept its lowered count for
    # good, and a worker's merge ending undid the count the user had set meanwhile.
    import threading

    from ladle.engine import _threads_beside_readers

    def fresh() -> int:  # the count of a thread starting now
        found = []
        thread = threading.Thread(target=lambda: found.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return found[0]

    original = torch.get_num_threads()
    torch.set_num_threads(4)
    entered, done, seen = threading.Event(), threading.Event(), []

    def merging() -> None:
        with _threads_beside_readers(torch.device("cpu"), 1):
            seen.append(torch.get_num_threads())
            entered.set()
            assert done.wait(10)

    try:
        worker = threading.Thread(target=merging)
        worker.start()
        assert entered.wait(10)
        assert seen == [3] and fresh() == 4 and torch.get_num_threads() == 4
        torch.set_num_threads(6)  # the user's, while the worker merges
        done.set()
        worker.join()
        assert torch.get_num_threads() == 6 and fresh() == 6
    finally:
        done.set()
        torch.set_num_threads(original)


@pytest.mark.skipif(
    "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="torch's thread count is each thread's own with its OpenMP backend alone",
)
def test_a_merge_in_another_thread_leaves_this_threads_count_as_it_was():
    # With OpenMP (torch's own builds) set_num_threads sets the calling thread's count. The
    # count was kept as the process's: a training thread's merge that ended while another
    # thread's ran left the training thread one thread short for good.
    import threading

    from ladle.engine import _threads_beside_readers

    cpu = torch.device("cpu")
    original = torch.get_num_threads()
    torch.set_num_threads(4)
    entered, done = threading.Event(), threading.Event()
    seen = []

    def other() -> None:
        with _threads_beside_readers(cpu, 1):
            entered.set()
            assert done.wait(10)
        seen.append(torch.get_num_threads())

    try:
        with _threads_beside_readers(cpu, 1):
            assert torch.get_num_threads() == 3
            thread = threading.Thread(target=other)
            thread.start()
            assert entered.wait(10)
            assert torch.get_num_threads() == 3  # the other thread's took nothing off ours
        assert torch.get_num_threads() == 4
        done.set()
        thread.join()
        assert seen == [4]  # it began with the process's count, not this thread's lowered one
        assert torch.get_num_threads() == 4
    finally:
        done.set()
        torch.set_num_threads(original)


@pytest.mark.parametrize(
    ("chunk_bytes", "error", "found"),
    [
        ("4MB", TypeError, "found str"),
        (1.5, TypeError, "found float"),
        (True, TypeError, "bool"),
        (0, ValueError, "found 0"),
        (-64, ValueError, "found -64"),
    ],
)
@pytest.mark.parametrize(
    "method",
    ["uniform_soup", "task_arithmetic", "ties", "dare", "model_stock", "ratatouille", "slerp"],
)
def test_chunk_bytes_that_is_no_positive_int_is_refused_naming_it(
    method, chunk_bytes, error, found
):
    # Before: "4MB" failed deep in the chunk plan with an operand TypeError naming nothing,
    # and 0 or a negative size merged one row at a time.
    base = {"w": torch.zeros(3, 2)}
    models = [{"w": torch.ones(3, 2)}, {"w": torch.full((3, 2), 2.0)}]
    kwargs = {"chunk_bytes": chunk_bytes, "device": "cpu"}
    if method in ("task_arithmetic", "ties", "dare", "model_stock"):
        kwargs["base"] = base
    with pytest.raises(error, match=rf"chunk_bytes: expected .*{found}"):
        getattr(ladle, method)(models, **kwargs)


@pytest.mark.parametrize(
    ("chunk_bytes", "error"), [(0, ValueError), (None, TypeError), (torch.tensor(8.0), TypeError)]
)
def test_fold_refuses_a_chunk_bytes_that_is_no_positive_int(chunk_bytes, error):
    kernel = Kernel(lambda key, rows, base: None, lambda state, i, x: x, lambda state: state)
    models = [ladle.open_checkpoint({"w": torch.ones(2)})]
    with pytest.raises(error, match="chunk_bytes: expected a"):
        list(fold(models, kernel, device=torch.device("cpu"), chunk_bytes=chunk_bytes))


SEQUENCE_METHODS = {
    "uniform_soup": lambda models: ladle.uniform_soup(models, device="cpu"),
    "uniform_soup weighted": lambda models: ladle.uniform_soup(models, weights=[1, 1]),
    "greedy_soup": lambda models: ladle.greedy_soup(models, lambda sd: 0.0, device="cpu"),
    "ratatouille": lambda models: ladle.ratatouille(models, device="cpu"),
    "task_arithmetic": lambda models: ladle.task_arithmetic(models, BASE, device="cpu"),
    "task_arithmetic weighted": lambda models: ladle.task_arithmetic(models, BASE, weights=[1, 1]),
    "ties": lambda models: ladle.ties(models, BASE, device="cpu"),
    "dare": lambda models: ladle.dare(models, BASE, device="cpu"),
    "model_stock": lambda models: ladle.model_stock(models, BASE, device="cpu"),
    "slerp": lambda models: ladle.slerp(models, device="cpu"),
    "weighted_sum": lambda models: ladle.weighted_sum(models, [1, 1]),
}
BASE = {"w": torch.zeros(3), "b": torch.zeros(2)}


@pytest.mark.parametrize("method", SEQUENCE_METHODS.values(), ids=list(SEQUENCE_METHODS))
@pytest.mark.parametrize("single", ["module", "path", "mapping"])
def test_every_method_names_one_model_given_where_a_list_goes(tmp_path, method, single):
    # A module or Path reached len(models): "object of type 'Linear' has no len()"; a mapping
    # with weights counted its keys as models: "weights: expected 2 weights ..., found 2".
    module = torch.nn.Linear(3, 2)
    ladle.save(module.state_dict(), tmp_path / "model.safetensors")
    model = {"module": module, "path": tmp_path / "model.safetensors"}.get(single, BASE)
    with pytest.raises(TypeError, match=r"^models: expected a sequence of models, found a single"):
        method(model)


@pytest.mark.parametrize("method", SEQUENCE_METHODS.values(), ids=list(SEQUENCE_METHODS))
def test_every_method_refuses_a_generator_of_models_naming_it(method):
    # Was "object of type 'generator' has no len()".
    models = (dict(BASE) for _ in range(2))
    with pytest.raises(
        TypeError, match=r"^models: expected a sequence of models \(a list or tuple\), found gen"
    ):
        method(models)


@pytest.mark.parametrize("method", SEQUENCE_METHODS.values(), ids=list(SEQUENCE_METHODS))
def test_every_method_refuses_a_set_of_models_whose_order_is_not_stable(tmp_path, method):
    # A set of paths merged in an order PYTHONHASHSEED picks: weights, scores and a greedy
    # soup's selected indices could follow other models than the user listed.
    paths = {ladle.save(dict(BASE), tmp_path / f"m{i}.safetensors") for i in range(2)}
    for models in (paths, frozenset(paths), {str(p): 0 for p in paths}.keys()):
        with pytest.raises(
            TypeError, match=r"^models: expected a sequence of models \(a list or tuple\), found"
        ):
            method(models)


MODEL = {"w": torch.ones(2)}
NAMED_ARGUMENTS = {
    "uniform_soup": (lambda: ladle.uniform_soup([MODEL, 3]), "model 1", "int"),
    "greedy_soup": (
        lambda: ladle.greedy_soup([MODEL, None], lambda sd: 0.0),
        "model 1",
        "None",
    ),
    "task_arithmetic": (lambda: ladle.task_arithmetic([MODEL], [MODEL]), "base", "list"),
    "ties": (lambda: ladle.ties([MODEL, 1.5], MODEL), "model 1", "float"),
    "model_stock": (lambda: ladle.model_stock([MODEL, MODEL], [MODEL]), "base", "list"),
    "add": (lambda: ladle.add(MODEL, [1]), "b", "list"),
    "weighted_sum": (lambda: ladle.weighted_sum([MODEL, 2], [1, 1]), "model 1", "int"),
    "task_vector": (lambda: ladle.task_vector(MODEL, None), "base", "None"),
    "ratatouille_init": (lambda: ladle.ratatouille_init(MODEL, [MODEL]), "head", "list"),
    "diff": (lambda: ladle.diff(MODEL, MODEL, base=[MODEL]), "base", "list"),
    "assert_state_dicts_close": (
        lambda: ladle.testing.assert_state_dicts_close(MODEL, 3),
        "expected",
        "int",
    ),
    "load": (lambda: ladle.load(3), "source", "int"),
}


@pytest.mark.parametrize(
    ("call", "name", "found"), NAMED_ARGUMENTS.values(), ids=list(NAMED_ARGUMENTS)
)
def test_a_model_of_no_known_kind_is_a_type_error_naming_the_argument(call, name, found):
    # Was "expected a mapping, nn.Module, path or Checkpoint, found int": which of the inputs?
    with pytest.raises(
        TypeError,
        match=rf"^{name}: expected a mapping, nn.Module, path or Checkpoint, found {found}$",
    ):
        call()


class Wrapped(torch.nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.add_module(name, torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("prefix", "how"),
    [
        ("_orig_mod", r"torch\.compile's: pass model\._orig_mod, or strip it"),
        ("module", r"DistributedDataParallel's: pass model\.module, or strip it"),
        ("encoder", "strip it"),
    ],
)
def test_keys_that_differ_by_a_prefix_are_named_with_how_to_unwrap(prefix, how):
    # A torch.compile'd model (keys '_orig_mod.*') merged with a plain one listed the missing
    # and extra keys and left the user to see that they were the same keys.
    plain, wrapped = torch.nn.Linear(2, 2), Wrapped(prefix)
    hint = rf"; the keys differ by the prefix '{prefix}\.' \({how}\)$"
    with pytest.raises(ladle.IncompatibleError, match=r"^model 1 .*extra 2 .*" + hint):
        ladle.uniform_soup([plain, wrapped], device="cpu")
    with pytest.raises(ladle.IncompatibleError, match=r"^base .*missing 2 .*" + hint):
        ladle.task_arithmetic([wrapped, wrapped], plain, device="cpu")
    with pytest.raises(ladle.IncompatibleError, match=r"^b: keys differ from a: .*" + hint):
        ladle.sub(wrapped, plain)


def test_keys_that_differ_otherwise_get_no_prefix_hint():
    a = {"w": torch.ones(1), "b": torch.ones(1)}
    b = {"x.w": torch.ones(1), "b2": torch.ones(1)}  # one key prefixed, not all of them
    with pytest.raises(ladle.IncompatibleError, match=r"extra 2 \('x\.w', 'b2'\)$"):
        ladle.uniform_soup([a, b], device="cpu")


@pytest.mark.parametrize(
    ("merge", "which"),
    [
        (lambda ok, bad: ladle.uniform_soup([ok, ok, bad], device="cpu"), "model 2"),
        (lambda ok, bad: ladle.task_arithmetic([ok, ok], bad, device="cpu"), "base"),
        (lambda ok, bad: ladle.greedy_soup([ok, bad], lambda sd: 0.0, device="cpu"), "model 1"),
        (lambda ok, bad: ladle.ties([bad, ok], ok, device="cpu"), "model 0"),
    ],
)
def test_a_tensor_without_data_in_memory_names_the_model_holding_it(merge, which):
    # Was "<state dict>: tensor 'w' is on the meta device ...": which of the state dicts?
    ok, meta = {"w": torch.ones(2)}, {"w": torch.empty(2, device="meta")}
    problem = r"tensor 'w' is on the meta device \(no data\); ladle merges dense tensors"
    with pytest.raises(ladle.CheckpointError, match=rf"^{which} \(<state dict>\): {problem}"):
        merge(ok, meta)
    with pytest.raises(ladle.CheckpointError, match=rf"^{which} \(<Linear>\): tensor 'weight'"):
        merge(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_tensors_and_lazy_parameters_are_refused_naming_model_and_key():
    # Both passed the layout check: torch's "NestedTensorImpl doesn't support sizes. Please
    # file an issue", and "Attempted to use an uninitialized parameter", naming neither.
    nested = {"w": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.uniform_soup([{"w": torch.ones(2)}, nested], device="cpu")
    assert str(info.value) == (
        "model 1 (<state dict>): tensor 'w' is a nested tensor; ladle merges dense tensors "
        "with data"
    )
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.uniform_soup([torch.nn.LazyLinear(3), torch.nn.LazyLinear(3)], device="cpu")
    assert str(info.value).startswith(
        "model 0 (<LazyLinear>): tensor 'weight' is an uninitialized parameter of a lazy "
        "module: run it once first"
    )


@pytest.mark.parametrize("name", ["uint4", "int4", "uint1", "int7", "bits16", "bits8"])
def test_tensors_of_dtypes_without_kernels_are_refused_naming_model_and_key(name):
    # torch's own NotImplementedError ("copy_kernel" not implemented for 'UInt4'), naming
    # neither, from merges, the arithmetic and assert_state_dicts_close.
    from ladle.testing import assert_state_dicts_close

    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"torch {torch.__version__} has no {name}")
    odd = {"w": torch.ones(2), "q": torch.zeros(4, dtype=torch.uint8).view(dtype)}
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.uniform_soup([{"w": torch.ones(2), "q": torch.zeros(4)}, odd], device="cpu")
    assert str(info.value) == (
        f"model 1 (<state dict>): tensor 'q' is {dtype}, a dtype without torch kernels (no "
        "sums, mostly no copies): convert it first; ladle merges dense tensors with data"
    )
    with pytest.raises(ladle.LadleError, match=rf"^a: tensor 'q' is {dtype}, a dtype without"):
        ladle.add(odd, odd)
    with pytest.raises(ladle.LadleError, match=rf"^actual: tensor 'q' is {dtype}, a dtype"):
        assert_state_dicts_close(odd, odd)


# --- tied weights in memory ----------------------------------------------------------------


class TiedLM(torch.nn.Module):
    """A language model in miniature whose head is its embedding (``tie_word_embeddings``):
    its state dict names one tensor ``emb.weight`` and ``head.weight``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("steps", torch.tensor(seed))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=gen))


IN_MEMORY_METHODS = {
    "uniform_soup": lambda models, base: ladle.uniform_soup(models, device="cpu"),
    "ratatouille": lambda models, base: ladle.ratatouille(models, device="cpu"),
    "task_arithmetic": lambda models, base: ladle.task_arithmetic(models, base, device="cpu"),
    "ties": lambda models, base: ladle.ties(models, base, density=0.4, device="cpu"),
    "ties_tensor": lambda models, base: ladle.ties(models, base, trim="tensor", device="cpu"),
    "dare": lambda models, base: ladle.dare(models, base, density=0.5, device="cpu"),
    "model_stock": lambda models, base: ladle.model_stock(models, base, device="cpu"),
}


def _stored_once(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its tied head left out, as save_pretrained's safetensors store it."""
    return {key: value for key, value in state.items() if key != "head.weight"}


@pytest.mark.parametrize("method", list(IN_MEMORY_METHODS))
def test_a_merge_in_memory_returns_a_tensor_every_input_ties_once_under_both_names(method):
    # Each name came back as its own tensor: twice the memory of the embedding (2 GiB more
    # for a 128k x 4k fp32 one), computed twice. Now the result holds it as the inputs do.
    base, *models = TiedLM(0), TiedLM(1), TiedLM(2), TiedLM(3)
    merged = IN_MEMORY_METHODS[method](models, base)
    assert list(merged) == list(base.state_dict())
    assert merged["head.weight"] is merged["emb.weight"]
    # The values of the same models stored once, bit for bit; the head is the embedding.
    once = IN_MEMORY_METHODS[method](
        [_stored_once(m.state_dict()) for m in models], _stored_once(base.state_dict())
    )
    assert_bit_for_bit(_stored_once(merged), once)
    loaded = TiedLM(9)
    loaded.load_state_dict(merged, strict=True)
    assert loaded.head.weight is loaded.emb.weight
    assert torch.equal(loaded.emb.weight, merged["emb.weight"])


def test_a_tensor_every_input_ties_is_merged_once_in_memory_and_under_each_name_to_a_file(
    tmp_path,
):
    computed: list[str] = []

    def init(key, rows, base):
        computed.append(key)
        return None

    kernel = Kernel(init, lambda state, index, x: x.clone(), lambda state: state)
    models = [TiedLM(1), TiedLM(2)]
    merged = merge(models, kernel, method="first", parameters={}, device="cpu")
    assert computed == ["emb.weight", "body.weight", "body.bias"]
    assert merged["head.weight"] is merged["emb.weight"]
    computed.clear()  # a file holds each name's bytes: the head is merged as its own key
    out = merge(models, kernel, method="first", parameters={}, device="cpu", out=tmp_path / "o")
    assert sorted(computed) == ["body.bias", "body.weight", "emb.weight", "head.weight"]
    assert_bit_for_bit(ladle.load(out), {k: v.clone() for k, v in merged.items()})


def test_keys_tied_in_some_inputs_only_are_merged_each_on_its_own():
    untied = TiedLM(2).state_dict()
    untied["head.weight"] = untied["head.weight"] * 2  # a fine-tune that untied its head
    merged = ladle.uniform_soup([TiedLM(1), untied], device="cpu")
    assert merged["head.weight"].data_ptr() != merged["emb.weight"].data_ptr()
    emb, head = (untied[k] for k in ("emb.weight", "head.weight"))
    assert torch.equal(merged["emb.weight"], (TiedLM(1).emb.weight.detach() + emb) / 2)
    assert torch.equal(merged["head.weight"], (TiedLM(1).emb.weight.detach() + head) / 2)


def test_a_base_tying_what_the_models_store_once_gives_a_tied_result_in_memory(tmp_path):
    # A pre-trained module as the base of save_pretrained fine-tunes (the embedding once):
    # the models answer the head's name with their embedding, so the result ties them too.
    base, models = TiedLM(0), [TiedLM(1), TiedLM(2)]
    files = []
    for i, model in enumerate(models):
        save_file(_stored_once(model.state_dict()), tmp_path / f"ft{i}.safetensors")
        files.append(tmp_path / f"ft{i}.safetensors")
    merged = ladle.task_arithmetic(files, base, scale=0.5, device="cpu")
    assert list(merged) == list(base.state_dict())
    assert merged["head.weight"] is merged["emb.weight"]


def test_a_file_holding_a_tensor_without_data_is_named_by_its_path_alone(tmp_path):
    # The path names the model already: no 'model 1 (...)' before it, as for state dicts.
    torch.save({"w": torch.empty(2, device="meta")}, tmp_path / "meta.pt")
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.uniform_soup([{"w": torch.ones(2)}, tmp_path / "meta.pt"], device="cpu")
    assert str(info.value) == (
        f"{tmp_path / 'meta.pt'}: tensor 'w' is on the meta device (no data); ladle merges "
        "dense tensors with data"
    )


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")  # torch.load's
def test_quantized_torch_tensors_are_refused_not_copied_from_model_0(tmp_path):
    # A qint8 tensor is integer codes with a scale: it was copied from model 0 like an
    # integer buffer, so the "soup" of it was model 0's weights, without a word.
    files = []
    for i in range(2):
        w = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8)
        torch.save({"w": w, "b": torch.randn(4)}, tmp_path / f"q{i}.pt")
        files.append(tmp_path / f"q{i}.pt")
    with pytest.raises(ladle.CheckpointError) as info:
        ladle.uniform_soup(files, device="cpu")
    assert str(info.value) == (
        f"{files[0]}: tensor 'w' is quantized (torch.qint8): dequantize it first; ladle merges "
        "dense tensors with data"
    )
    with pytest.raises(ladle.CheckpointError, match="model 1 .*quantized"):
        ladle.uniform_soup([{"w": torch.ones(2)}, {"w": w}], device="cpu")


def test_a_merge_onto_an_existing_output_is_refused_before_any_pass_over_the_inputs(tmp_path):
    # TIES's preparation reads every input (the thresholds): the refusal comes first, not a
    # NonFiniteError (or minutes of reading) before it.
    out = ladle.save({"w": torch.zeros(2)}, tmp_path / "o.safetensors")
    model, base = {"w": torch.tensor([float("nan"), 1.0])}, {"w": torch.zeros(2)}
    with pytest.raises(ladle.LadleError) as info:
        ladle.ties([model], base, out=out, device="cpu")
    assert (
        str(info.value) == f"{out}: already exists; pass overwrite=True (--overwrite) to replace it"
    )


@pytest.mark.parametrize("value", [1j, complex(0.5, 0.0)])
def test_a_complex_number_is_no_number_for_a_method(value):
    with pytest.raises(TypeError) as info:
        ladle.task_arithmetic([{"w": torch.ones(2)}], {"w": torch.zeros(2)}, scale=value)
    assert str(info.value) == "scale: expected a number, found complex"


_HINT = (
    "(tied weights), which the other inputs store once: give every input in one form (all "
    "safetensors, or all modules, state dicts or torch files)"
)


def _check_named(*state_dicts, names):
    """check_compatible as the arithmetic called it before it read second names itself: the
    tied-weights hint is for code that checks checkpoints of mixed forms directly."""
    from ladle.checkpoint import TensorMapCheckpoint
    from ladle.engine import check_compatible

    checkpoints = [TensorMapCheckpoint(sd, name=n) for sd, n in zip(state_dicts, names)]
    check_compatible(checkpoints, named=True)


@pytest.mark.parametrize("count", [3, 4])
def test_missing_names_of_a_tensor_tied_several_times_are_hinted_three_at_most(count):
    # T5 names its shared embedding four times (shared, encoder's, decoder's, lm_head).
    shared = torch.ones(2)
    names = ["dec.embed", "enc.embed", "lm_head", "x.embed"][:count]
    tied = {"shared": shared, **dict.fromkeys(names, shared), "body": torch.zeros(3)}
    with pytest.raises(ladle.IncompatibleError) as info:
        _check_named(tied, {"shared": torch.zeros(2), "body": torch.zeros(3)}, names="ab")
    pairs = ", ".join(f"{name!r} names the tensor of 'shared'" for name in names[:3])
    more = ", ..." if count > 3 else ""
    missing = ", ".join(repr(name) for name in names[:3]) + more
    assert str(info.value) == (
        f"b: keys differ from a: missing {count} ({missing}); in a, {pairs}{more} {_HINT}"
    )


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"emb": torch.ones(2)}, "missing 2 ('head', 'body')"),  # not tied alone: no hint
        (
            {"emb": torch.ones(2), "body": torch.zeros(3), "x": torch.zeros(3)},
            "missing 1 ('head'); extra 1 ('x')",  # another model, not another form
        ),
    ],
    ids=["another key missing too", "a key of its own"],
)
def test_missing_tied_names_get_no_hint_where_the_keys_differ_otherwise_too(other, message):
    embedding = torch.ones(2)
    tied = {"emb": embedding, "head": embedding, "body": torch.zeros(3)}
    with pytest.raises(ladle.IncompatibleError) as info:
        _check_named(tied, other, names="ab")
    assert str(info.value) == f"b: keys differ from a: {message}"


def test_extra_names_of_a_tensor_the_reference_lacks_are_all_listed():
    # Only a second name of a tensor the reference holds is never read; these are extra.
    embedding = torch.ones(2)
    with pytest.raises(ladle.IncompatibleError) as info:
        ladle.add(
            {"body": torch.zeros(3)}, {"body": torch.zeros(3), "emb": embedding, "head": embedding}
        )
    assert str(info.value) == "b: keys differ from a: extra 2 ('emb', 'head')"


def test_a_tied_reference_beside_models_storing_it_once_is_blamed_with_the_hint():
    embedding, body = torch.ones(2), torch.zeros(3)
    tied = {"emb": embedding, "head": embedding, "body": body}
    once = {"emb": torch.ones(2), "body": torch.zeros(3)}
    with pytest.raises(ladle.IncompatibleError) as info:
        _check_named(tied, once, dict(once), names=["model 0", "model 1", "model 2"])
    assert str(info.value) == (
        "model 0: keys differ from those of every other model: extra 1 ('head'); in model 0, "
        f"'head' names the tensor of 'emb' {_HINT}"
    )


def test_a_merge_closes_the_files_it_opened_and_only_those(tmp_path):
    # Files of path inputs are closed once merged (a long-lived process merging in a loop ran
    # out of descriptors otherwise); a checkpoint the caller opened is the caller's to close.
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts this process's open files in /proc/self/fd (Linux)")
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    gc.collect()  # files an earlier test left to the collector: closed now, not meanwhile
    before = len(os.listdir("/proc/self/fd"))
    assert ladle.uniform_soup(paths, device="cpu")["w"].tolist() == [0.5, 0.5]
    assert len(os.listdir("/proc/self/fd")) == before
    with ladle.open_checkpoint(paths[0]) as opened:
        opened.get("w")  # its file open
        held = len(os.listdir("/proc/self/fd"))
        assert ladle.uniform_soup([opened, paths[1]], device="cpu")["w"].tolist() == [0.5, 0.5]
        assert len(os.listdir("/proc/self/fd")) == held
    assert len(os.listdir("/proc/self/fd")) == before


class HubLM(torch.nn.Module):
    """A tied language model named as transformers names one: ``model.embed_tokens.weight``
    first, ``lm_head.weight`` (the same tensor) last, which sorts first."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(12, 4)
        self.model.norm = torch.nn.LayerNorm(4)
        self.lm_head = torch.nn.Linear(4, 12, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=gen))


WITH_A_BASE = ["task_arithmetic", "ties", "ties_tensor", "dare", "model_stock"]


def _save_model(model: HubLM, path) -> dict[str, torch.Tensor]:
    """``model`` saved by safetensors' save_model, which keeps one name of a tied tensor,
    the first in sorted order (``lm_head.weight``); the state dict it holds."""
    from safetensors.torch import save_model

    save_model(model, path)
    return {k: v for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}


@pytest.mark.parametrize("method", WITH_A_BASE)
def test_models_storing_a_tied_tensor_under_its_later_name_merge_beside_a_tied_base(
    method, tmp_path
):
    # Only a model storing the base's first name of a tied tensor answered its other names:
    # fine-tunes saved by save_model (lm_head.weight kept) beside the tied module were
    # "base (<HubLM>): keys differ from those of every model: extra 1
    # ('model.embed_tokens.weight'); is it the model they were fine-tuned from?", where
    # save_pretrained's (the embedding kept) merged.
    base, models = HubLM(0), [HubLM(seed) for seed in (1, 2, 3)]
    files = [tmp_path / f"ft{i}.safetensors" for i in range(3)]
    for model, file in zip(models, files):
        _save_model(model, file)
    merged = IN_MEMORY_METHODS[method](files, base)
    assert list(merged) == list(base.state_dict())
    assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]
    assert_bit_for_bit(merged, IN_MEMORY_METHODS[method](models, base))  # as the modules


@pytest.mark.parametrize("method", WITH_A_BASE)
def test_a_base_storing_a_tied_tensor_under_its_later_name_merges_tied_models(method, tmp_path):
    # The models' other name of it, 'model.embed_tokens.weight', was "extra 1": only a
    # second name of a tensor the base holds (a later one in the model) was never read.
    base, models = HubLM(0), [HubLM(seed) for seed in (1, 2, 3)]
    once = _save_model(base, tmp_path / "base.safetensors")
    merged = IN_MEMORY_METHODS[method](models, tmp_path / "base.safetensors")
    assert sorted(merged) == ["lm_head.weight", "model.norm.bias", "model.norm.weight"]
    stored = [{k: v for k, v in m.state_dict().items() if k in once} for m in models]
    assert_bit_for_bit(merged, IN_MEMORY_METHODS[method](stored, once))


def test_soups_and_arithmetic_take_a_tied_tensor_stored_under_its_later_name(tmp_path):
    first, second = HubLM(1), HubLM(2)
    stored = _save_model(second, tmp_path / "ft.safetensors")
    expected = ladle.uniform_soup([first, second], device="cpu")
    soup = ladle.uniform_soup([first, tmp_path / "ft.safetensors"], device="cpu")
    assert soup["lm_head.weight"] is soup["model.embed_tokens.weight"]
    assert_bit_for_bit(soup, expected)
    assert_bit_for_bit(ladle.uniform_soup([stored, first], device="cpu"), _without_embed(expected))
    vector = ladle.task_vector(tmp_path / "ft.safetensors", first)
    assert vector["lm_head.weight"] is vector["model.embed_tokens.weight"]
    assert_bit_for_bit(vector, ladle.task_vector(second, first))
    assert_bit_for_bit(ladle.sub(stored, first), _without_embed(ladle.sub(second, first)))


def _without_embed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k != "model.embed_tokens.weight"}


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_torch_leaves_a_core_per_reading_thread_that_runs_not_per_thread_asked_for():
    # prefetch=1 runs one reading thread whatever ``readers`` says; torch kept 4 − 3 = 1.
    kernel, seen = _recording_thread_counts()
    with _torch_threads(4):
        model = ladle.open_checkpoint({"w": torch.ones(3)})
        list(fold([model], kernel, device=resolve_device("cpu"), prefetch=1, readers=3))
        assert seen == [3] and torch.get_num_threads() == 4


def test_a_negative_prefetch_reads_on_the_consumers_thread_as_none_does():
    seen = []

    def update(state, index, x):
        seen.append(torch.get_num_threads())
        return x.clone()

    kernel = Kernel(lambda key, rows, base: None, update, lambda state: state)
    model = ladle.open_checkpoint({"w": torch.tensor([1.0, 2.0])})
    before = torch.get_num_threads()
    found = list(fold([model], kernel, device=resolve_device("cpu"), prefetch=-1))
    assert [(key, rows, result.tolist()) for key, rows, result in found] == [
        ("w", slice(None), [1.0, 2.0])
    ]
    assert seen == [before] and torch.get_num_threads() == before


def test_an_output_folder_holding_an_input_is_refused_and_the_input_kept(tmp_path):
    model = {"w": torch.tensor([1.0, 2.0])}
    ladle.save(model, tmp_path / "runs" / "a.safetensors")
    with pytest.raises(ladle.LadleError, match=r"refusing to write over or inside input"):
        ladle.uniform_soup(
            [tmp_path / "runs" / "a.safetensors", model], out=tmp_path / "runs", overwrite=True
        )
    assert ladle.load(tmp_path / "runs" / "a.safetensors")["w"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("out", ["store", "store/ft1.safetensors"])
def test_an_output_over_the_file_an_input_folder_links_to_is_refused(tmp_path, out):
    # ft1/model.safetensors -> ../store/ft1.safetensors (a link farm, a --local-dir download):
    # only the folder was compared with the output, so --overwrite replaced the linked file.
    model = {"w": torch.tensor([1.0, 2.0])}
    ladle.save(model, tmp_path / "store" / "ft1.safetensors")
    (tmp_path / "ft1").mkdir()
    (tmp_path / "ft1" / "model.safetensors").symlink_to("../store/ft1.safetensors")
    with pytest.raises(ladle.LadleError) as info:
        ladle.uniform_soup([tmp_path / "ft1", model], out=tmp_path / out, overwrite=True)
    assert str(info.value) == (
        f"{tmp_path / out}: refusing to write over or inside input "
        f"{tmp_path / 'ft1' / 'model.safetensors'}; "
        "choose another output path"
    )
    assert ladle.load(tmp_path / "ft1")["w"].tolist() == [1.0, 2.0]


def test_an_output_naming_an_input_by_another_path_to_its_file_is_refused(tmp_path):
    # A hard link here; a bind mount of the input's folder the same: the paths differ, the
    # file (device and inode) is the input's, and a bind mount's rename replaced it.
    model = {"w": torch.tensor([1.0, 2.0])}
    ladle.save(model, tmp_path / "a.safetensors")
    os.link(tmp_path / "a.safetensors", tmp_path / "alias.safetensors")
    with pytest.raises(ladle.LadleError, match=r"alias\.safetensors: refusing to write over"):
        ladle.uniform_soup(
            [tmp_path / "a.safetensors", {"w": torch.zeros(2)}],
            out=tmp_path / "alias.safetensors",
            overwrite=True,
        )
    assert ladle.load(tmp_path / "a.safetensors")["w"].tolist() == [1.0, 2.0]


def test_an_output_through_a_link_then_dotdot_is_written_where_the_system_finds_it(
    tmp_path, monkeypatch
):
    # link -> elsewhere/sub, so link/.. is elsewhere; os.path.abspath made it the folder
    # holding the link, where the merge wrote (over an input there, with overwrite).
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "link").symlink_to(tmp_path / "elsewhere" / "sub")
    monkeypatch.chdir(tmp_path / "work")
    ladle.save({"w": torch.tensor([1.0, 2.0])}, "a.safetensors")
    ladle.save({"w": torch.tensor([3.0, 4.0])}, "b.safetensors")
    out = ladle.uniform_soup(
        ["a.safetensors", "b.safetensors"], out="link/../a.safetensors", overwrite=True
    )
    assert ladle.load(out)["w"].tolist() == [2.0, 3.0]
    assert ladle.load(tmp_path / "elsewhere" / "a.safetensors")["w"].tolist() == [2.0, 3.0]
    assert ladle.load("a.safetensors")["w"].tolist() == [1.0, 2.0]  # the input, untouched


@pytest.mark.parametrize("kind", ["file", "broken link"])
@pytest.mark.parametrize("out", ["x/../o.safetensors", "x/../o", "x/../sub/../o.safetensors"])
def test_an_output_through_a_file_then_dotdot_is_refused_as_the_system_refuses_it(
    tmp_path, monkeypatch, kind, out
):
    # os.path.realpath drops "x/.." as text when x is a file: the merge wrote o.safetensors
    # beside x, where `open("x/../o.safetensors")` fails (not a directory).
    monkeypatch.chdir(tmp_path)
    ladle.save({"w": torch.tensor([1.0, 2.0])}, "a.safetensors")
    if kind == "file":
        (tmp_path / "x").write_text("notes")
    else:
        os.symlink("gone", "x")
    what = "a file" if kind == "file" else "a broken symbolic link"
    with pytest.raises(ladle.OutputError) as info:
        ladle.uniform_soup(["a.safetensors", "a.safetensors"], out=out)
    assert str(info.value) == (
        f"{out}: {tmp_path / 'x'} is {what}, not a directory: the system cannot resolve the "
        "'..' after it"
    )
    assert isinstance(info.value, OSError)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "x"]
    assert main(["soup", "a.safetensors", "a.safetensors", "-o", out]) == 1


@pytest.mark.parametrize(
    "method",
    [
        lambda models, base: ladle.uniform_soup(models, device="cpu"),
        lambda models, base: ladle.task_arithmetic(models, base, device="cpu"),
        lambda models, base: ladle.ties(models, base, density=0.5, device="cpu"),
        lambda models, base: ladle.dare(models, base, density=0.5, device="cpu"),
        lambda models, base: ladle.model_stock(models, base, device="cpu"),
    ],
    ids=["soup", "task arithmetic", "ties", "dare", "stock"],
)
def test_a_lazy_conjugate_in_a_state_dict_merges_as_its_values(method):
    # torch.view_as_real refused x.conj(): a RuntimeError from every method.
    gen = torch.Generator().manual_seed(3)
    values = [torch.randn(2, 5, dtype=torch.complex64, generator=gen) for _ in range(3)]
    lazy = [{"z": v.conj()} for v in values[:2]]
    made = [{"z": v.conj().resolve_conj()} for v in values[:2]]
    base = {"z": values[2]}
    assert lazy[0]["z"].is_conj() and not made[0]["z"].is_conj()
    assert torch.equal(method(lazy, base)["z"], method(made, base)["z"])


def test_scratch_hands_out_the_same_buffer_for_the_same_size():
    scratch, cpu = Scratch(), torch.device("cpu")
    first = scratch.take((4,), torch.float32, cpu).data_ptr()
    assert scratch.take((2, 2), torch.float32, cpu).data_ptr() == first


def test_a_merged_files_header_records_the_base_beside_the_models(tmp_path):
    from safetensors import safe_open

    ladle.save({"w": torch.ones(2)}, tmp_path / "base.safetensors")
    ladle.save({"w": torch.full((2,), 3.0)}, tmp_path / "ft.safetensors")
    out = ladle.task_arithmetic(
        [tmp_path / "ft.safetensors"], tmp_path / "base.safetensors", out=tmp_path / "m.safetensors"
    )
    with safe_open(str(out), "pt") as merged:
        meta = merged.metadata()
        assert merged.get_tensor("w").tolist() == [3.0, 3.0]
    assert meta["ladle.base"] == "base.safetensors"
    assert meta["ladle.inputs"] == '["ft.safetensors"]'


@pytest.mark.parametrize("to_file", [False, True])
def test_a_short_integer_tensor_whose_row_fits_as_stored_is_copied_whole(tmp_path, to_file):
    # int16 rows of 100 (200 B) fit in chunk_bytes=300 as stored, not as float32 (400 B):
    # the rows were cut by the one budget and read as rows of the other, and 2 of the
    # 200 entries were copied (the rest left as torch.empty made them).
    ids = torch.arange(200, dtype=torch.int16).view(2, 100)
    models = [{"ids": ids, "w": torch.ones(2)}, {"ids": ids + 1, "w": torch.zeros(2)}]
    out = tmp_path / "m.safetensors" if to_file else None
    merged = ladle.uniform_soup(models, out=out, device="cpu", chunk_bytes=300)
    merged = ladle.load(merged) if to_file else merged
    assert torch.equal(merged["ids"], ids)
    assert merged["w"].tolist() == [0.5, 0.5]


# Complex tensors: merged as their real and imaginary parts (they were copied from the base or
# model 0 as integer buffers are: a soup of complex weights was model 0's weights).


def _complex_family(dtype, n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (40, 33)

    def noise(like):
        return 0.1 * torch.randn(like.shape, dtype=like.dtype, generator=generator)

    base = {
        "spectral": torch.randn(shape, dtype=dtype, generator=generator),
        "w": torch.randn(shape, generator=generator),
        "steps": torch.tensor(7),
    }
    models = [{k: v + noise(v) if k != "steps" else v for k, v in base.items()} for _ in range(n)]
    return base, models


def _as_real(state_dict):
    """Complex tensors as float ones with a last dimension of 2 (their parts), copied."""
    return {
        k: torch.view_as_real(v).clone() if v.is_complex() else v for k, v in state_dict.items()
    }


COMPLEX_METHODS = {
    "uniform_soup": lambda models, base, **kw: ladle.uniform_soup(
        models, weights=[1, 2, 3, 4][: len(models)], **kw
    ),
    "task_arithmetic": lambda models, base, **kw: ladle.task_arithmetic(
        models, base, scale=0.7, **kw
    ),
    "ties_global": lambda models, base, **kw: ladle.ties(models, base, density=0.3, **kw),
    "ties_tensor": lambda models, base, **kw: ladle.ties(
        models, base, density=0.3, trim="tensor", chunk_bytes=1024, **kw
    ),
    "dare": lambda models, base, **kw: ladle.dare(models, base, density=0.3, seed=5, **kw),
    "dare_ties": lambda models, base, **kw: ladle.dare(
        models, base, density=0.3, combine="ties", **kw
    ),
    "model_stock": lambda models, base, **kw: ladle.model_stock(models, base, **kw),
    "slerp": lambda models, base, **kw: ladle.slerp(models[:2], t=0.3, **kw),
}


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("method", sorted(COMPLEX_METHODS))
def test_every_method_merges_a_complex_tensor_as_its_real_and_imaginary_parts(
    method, dtype, tmp_path
):
    base, models = _complex_family(dtype)
    merge = COMPLEX_METHODS[method]
    merged = merge(models, base, device="cpu")
    # The same method over the parts stored as float tensors of a last dimension 2.
    expected = merge([_as_real(m) for m in models], _as_real(base), device="cpu")
    assert merged["spectral"].dtype == dtype
    assert_bit_for_bit(_as_real(merged), expected)
    assert not torch.equal(merged["spectral"], base["spectral"])  # not copied
    if method != "uniform_soup":
        assert not torch.equal(merged["spectral"], models[0]["spectral"])
    if dtype == torch.complex64:  # safetensors stores no complex128
        out = merge(models, base, device="cpu", out=tmp_path / "merged.safetensors")
        assert_bit_for_bit(ladle.load(out), merged)  # streamed to disk: the same numbers


@settings(max_examples=30, deadline=None)
@given(
    family=ladle.testing.model_families(
        n=st.integers(2, 4), dtypes=ladle.testing.COMPLEX_DTYPES, max_side=6
    )
)
def test_complex_merges_equal_merges_of_the_parts_for_random_families(family):
    base, models = family
    with warnings.catch_warnings():  # Model Stock's clamped ratio: the same warning twice
        warnings.simplefilter("ignore", ladle.ModelStockWarning)
        for method in COMPLEX_METHODS.values():
            merged = method(models, base, device="cpu")
            parts = method([_as_real(m) for m in models], _as_real(base), device="cpu")
            assert_bit_for_bit(_as_real(merged), parts)


def test_a_soup_of_complex_tensors_is_their_mean_by_hand():
    a = {"z": torch.tensor([1 + 2j, 3 - 1j])}
    b = {"z": torch.tensor([3 + 0j, 1 + 1j])}
    assert ladle.uniform_soup([a, b])["z"].tolist() == [2 + 1j, 2 + 0j]
    # τ = (2 − 2j, −2 + 2j): scale 0.5 of their sum is 0; one model: half its τ.
    base = {"z": torch.tensor([1 + 2j, 3 - 1j])}
    models = [{"z": base["z"] + torch.tensor([2 - 2j, 4 + 0j])}, {"z": base["z"]}]
    got = ladle.task_arithmetic(models, base, scale=0.5)["z"]
    assert got.tolist() == [2 + 1j, 5 - 1j]
    greedy = ladle.greedy_soup([a, b], lambda sd: 1.0).state_dict["z"]
    assert greedy.tolist() == [2 + 1j, 2 + 0j]


def test_complex_tensors_of_complex64_and_complex128_merge_in_complex128():
    a = {"z": torch.tensor([complex(1 + 2**-40, 3)], dtype=torch.complex128)}
    b = {"z": torch.tensor([1 - 1j], dtype=torch.complex64)}
    merged = ladle.uniform_soup([a, b], device="cpu")["z"]
    assert merged.dtype == torch.complex128  # model 0's dtype
    # 2⁻⁴⁰ beside 1 survives: summed in complex128 (complex64 would round it away).
    assert merged.item() == complex(1 + 2**-41, 1)


@pytest.mark.parametrize("entries", [30, 31, 32])
def test_complex64_and_complex128_merge_beside_a_float32_key_of_any_size(entries):
    # 30 float32 entries made pooled buffers of 120 bytes (rounded up to 8), which do not view
    # as complex128: torch's RuntimeError, while merging key 'c'.
    a = {"w": torch.ones(entries), "c": torch.tensor([1 + 2j, 3j], dtype=torch.complex128)}
    b = {"w": torch.ones(entries), "c": torch.tensor([3 + 0j, 1j], dtype=torch.complex64)}
    for models in ([a, b], [b, a]):
        merged = ladle.uniform_soup(models, device="cpu")
        assert merged["c"].dtype == models[0]["c"].dtype  # the reference's
        assert merged["c"].tolist() == [2 + 1j, 2j]
        assert merged["w"].tolist() == [1.0] * entries


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_ties_sign_ties_of_complex_entries_are_patched_as_those_of_real_ones(dtype, tmp_path):
    # Parts that cancel exactly (1 and −1) tie; the model-wide vote decides them, after the
    # merge pass, through the writer's amend on a file.
    base = {"z": torch.zeros(3, dtype=dtype), "w": torch.zeros(4)}
    taus = [
        {"z": torch.tensor([1 + 2j, -1 + 1j, 3 - 1j], dtype=dtype), "w": torch.tensor([1.0] * 4)},
        {"z": torch.tensor([-1 - 2j, 1 + 1j, 3 + 1j], dtype=dtype), "w": torch.tensor([2.0] * 4)},
    ]
    merged = ladle.ties(taus, base, density=1.0, device="cpu")
    expected = ladle.ties([_as_real(t) for t in taus], _as_real(base), density=1.0, device="cpu")
    assert_bit_for_bit(_as_real(merged), expected)
    # The vote is positive (more positive parts): ties take the positive mean.
    assert merged["z"].tolist() == [1 + 2j, 1 + 1j, 3 + 1j]
    if dtype == torch.complex128:  # safetensors stores no complex128
        return
    streamed = ladle.load(
        ladle.ties(taus, base, density=1.0, device="cpu", out=tmp_path / "t.safetensors")
    )
    assert_bit_for_bit(streamed, merged)


def test_a_complex_input_holding_nan_is_named():
    base, models = _complex_family(torch.complex64, n=2)
    models[1]["spectral"][3, 4] = complex(0.0, math.nan)
    with pytest.raises(ladle.NonFiniteError, match=r"^model 1 \(.*\): key 'spectral' holds NaN"):
        ladle.task_arithmetic(models, base, device="cpu")


def test_diff_compares_complex_tensors_as_their_parts_and_skips_integers_only():
    a = {"z": torch.tensor([1 + 1j, 0j]), "steps": torch.tensor(3)}
    b = {"z": torch.tensor([1 + 0j, 2j]), "steps": torch.tensor(4)}
    report = ladle.diff(a, b)
    assert report.skipped == ["steps"]
    (row,) = report.tensors
    # As vectors of parts: a = (1, 1, 0, 0), b = (1, 0, 0, 2): ⟨a, b⟩ = 1, ‖a‖² = 2, ‖b‖² = 5.
    assert row.key == "z" and row.cosine == pytest.approx(1 / math.sqrt(10), rel=1e-12)
    assert row.norm_diff == pytest.approx(math.sqrt(5), rel=1e-12)


# Quantized checkpoints: their tensors are codes (integers, copied) and scales (floats,
# averaged); merging them merged no weights, and wrote a model that loads and is wrong.


def _model_dir(path, config, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "layer.codes": torch.randint(0, 2**31 - 1, (4, 8), dtype=torch.int32, generator=generator),
        "layer.scales": torch.rand(1, 8, generator=generator).half(),
        "norm.weight": torch.rand(8, generator=generator),
    }
    folder = ladle.save(tensors, path)
    if config is not None:
        (folder / "config.json").write_text(
            config if isinstance(config, str) else json.dumps(config)
        )
    return folder


GPTQ = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}


@pytest.mark.parametrize(
    ("method", "which"),
    [
        *[(m, "model 1") for m in ("uniform_soup", "greedy_soup", "ties", "thresholds", "dare")],
        *[(m, "base") for m in ("ties", "thresholds", "dare")],
    ],
)
def test_a_merge_of_a_quantized_model_directory_is_refused_before_anything_is_written(
    tmp_path, method, which
):
    plain = {"model_type": "llama"}
    base = _model_dir(tmp_path / "base", GPTQ if which == "base" else plain, 0)
    models = [
        _model_dir(tmp_path / f"m{i}", GPTQ if i == 1 and which != "base" else plain, i + 1)
        for i in range(2)
    ]
    out = tmp_path / "out"
    calls = {
        "uniform_soup": lambda: ladle.uniform_soup(models, out=out),
        "greedy_soup": lambda: ladle.greedy_soup(models, lambda sd: 1.0),
        "ties": lambda: ladle.ties(models, base, out=out),
        "thresholds": lambda: magnitude_thresholds(models, base),
        "dare": lambda: ladle.dare(models, base, out=out),
    }
    quantized = models[1] if which == "model 1" else base
    named = f"{which} ({ladle.open_checkpoint(quantized).name})"
    with pytest.raises(ladle.CheckpointError) as caught:
        calls[method]()
    assert str(caught.value) == (
        f"{named}: its config.json declares its weights quantized (quant_method 'gptq'): "
        "merging their codes and scales would merge no weights; dequantize it to a floating "
        "dtype first"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "config",
    [
        None,
        {"model_type": "llama"},
        {"quantization_config": None},
        "{not json",
        "[1, 2]",
        {"quantization_config": {"quant_method": "compressed-tensors", "format": "dense"}},
    ],
)
def test_model_directories_declaring_no_quantized_weights_merge(tmp_path, config):
    models = [_model_dir(tmp_path / f"m{i}", config, i) for i in range(2)]
    merged = ladle.uniform_soup(models)
    loaded = [ladle.load(m) for m in models]
    assert torch.equal(merged["layer.codes"], loaded[0]["layer.codes"])  # copied, as ever
    assert torch.equal(
        merged["norm.weight"], (loaded[0]["norm.weight"] + loaded[1]["norm.weight"]) / 2
    )


@pytest.mark.parametrize(
    ("declared", "method"),
    [
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8"),
        ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "compressed-tensors"),
        ({"load_in_4bit": True}, "unnamed"),
    ],
)
def test_the_quantization_a_directory_declares_is_named(tmp_path, declared, method):
    folder = _model_dir(tmp_path / "m", {"quantization_config": declared}, 0)
    assert declared_quantization(ladle.open_checkpoint(folder)) == method
    # Its weights file, named as save_pretrained names it, is described by the same config;
    # a file under another name beside it is not.
    assert declared_quantization(ladle.open_checkpoint(folder / "model.safetensors")) == method
    (folder / "model.safetensors").rename(folder / "ft.safetensors")
    assert declared_quantization(ladle.open_checkpoint(folder / "ft.safetensors")) is None


def test_weights_files_of_a_quantized_model_or_an_adapter_named_on_their_own_are_refused(tmp_path):
    # Before: `ladle soup q/model.safetensors ...` merged what `ladle soup q ...` refused.
    models = [_model_dir(tmp_path / f"q{i}", GPTQ, i) / "model.safetensors" for i in range(2)]
    with pytest.raises(ladle.CheckpointError, match=r"^model 0 \(.*\): .*'gptq'"):
        ladle.uniform_soup(models)
    adapters = [_adapter_dir(tmp_path / f"a{i}", i) / "adapter_model.safetensors" for i in range(2)]
    with pytest.raises(ladle.CheckpointError, match=r"^model 0 \(.*\): a PEFT adapter"):
        ladle.uniform_soup(adapters)


def _fp8(*shape):
    return torch.rand(*shape).to(torch.float8_e4m3fn)


# What quantizers store, by layer: where no config declares it (a file under another name, a
# state dict or module in memory) the tensors themselves show it.
STORED_QUANTIZATIONS = {  # made per test: tensors kept here count in test_greedy_soup's census
    "gptq": (
        lambda: {
            "l.qweight": torch.ones(1, 8, dtype=torch.int32),
            "l.qzeros": torch.ones(1, 1, dtype=torch.int32),
            "l.scales": torch.ones(1, 8).half(),
            "l.g_idx": torch.zeros(8, dtype=torch.int32),
        },
        "GPTQ or AWQ: packed integer weights ('l.qweight')",
    ),
    "bitsandbytes-8bit": (
        lambda: {"l.weight": torch.ones(4, 8, dtype=torch.int8), "l.SCB": torch.ones(4)},
        "bitsandbytes 8-bit: int8 weights and their scales ('l.SCB')",
    ),
    "bitsandbytes-4bit": (
        lambda: {
            "l.weight": torch.ones(32, 1, dtype=torch.uint8),
            "l.weight.absmax": torch.ones(1),
            "l.weight.quant_map": torch.ones(16),
        },
        "bitsandbytes 4-bit: packed weights and their scales ('l.weight.absmax')",
    ),
    "mxfp4": (
        lambda: {
            "e.up_proj_blocks": torch.ones(2, 8, dtype=torch.uint8),
            "e.up_proj_scales": torch.ones(2, 1, dtype=torch.uint8),
        },
        "MXFP4: packed 4-bit weights and their scales ('e.up_proj_blocks')",
    ),
    "fp8-blocks": (
        lambda: {"l.weight": _fp8(4, 4), "l.weight_scale_inv": torch.ones(1, 1)},
        "float8 weights with block scales ('l.weight' beside 'l.weight_scale_inv')",
    ),
    "fp8-compressed-tensors": (
        lambda: {
            "l.weight": _fp8(4, 4),
            "l.weight_scale": torch.ones(4, 1),
            "l.input_scale": torch.ones(1),
        },
        "float8 weights with scales ('l.weight' beside 'l.weight_scale')",
    ),
    "int8-compressed-tensors": (
        lambda: {
            "l.weight": torch.ones(4, 4, dtype=torch.int8),
            "l.weight_scale": torch.ones(4, 1),
            "l.weight_zero_point": torch.zeros(4, 1, dtype=torch.int8),
        },
        "integer weights with scales ('l.weight' beside 'l.weight_scale')",
    ),
    "nvfp4": (  # two 4-bit codes a byte, float8 scales per block of 16
        lambda: {
            "l.weight": torch.ones(4, 8, dtype=torch.uint8),
            "l.weight_scale": _fp8(4, 1),
            "l.weight_scale_2": torch.ones(()),
        },
        "integer weights with scales ('l.weight' beside 'l.weight_scale')",
    ),
}


@pytest.mark.parametrize("kind", list(STORED_QUANTIZATIONS))
def test_quantized_tensors_no_config_declares_are_refused(tmp_path, kind):
    # Before: merged as given (codes copied from model 0, scales averaged apart): a model that
    # loads and is wrong.
    made, what = STORED_QUANTIZATIONS[kind]
    tensors = made()
    said = (
        f"holds quantized weights, {what}: merging their codes and scales would merge no "
        "weights; dequantize it to a floating dtype first"
    )
    with pytest.raises(ladle.CheckpointError) as caught:
        ladle.uniform_soup([tensors, tensors])
    assert str(caught.value) == f"model 0 (<state dict>): {said}"
    file = ladle.save(tensors, tmp_path / "ft.safetensors")  # no config beside it
    out = tmp_path / "out"
    with pytest.raises(ladle.CheckpointError) as caught:
        ladle.task_arithmetic([file], base=file, out=out)
    assert str(caught.value) == f"base ({file}): {said}"
    assert not out.exists()


def test_float8_weights_without_scales_and_scales_of_float_weights_merge():
    a = {
        "l.weight": _fp8(4, 4),
        "norm.layer_scale": torch.ones(4),
        "norm.layer": torch.ones(4),
        "mask": torch.ones(4, dtype=torch.bool),
        "mask_scale": torch.ones(4),
    }
    b = {k: v.float().mul(2).to(v.dtype) for k, v in a.items()}
    merged = ladle.uniform_soup([a, b])
    assert merged["l.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(merged["norm.layer_scale"], torch.full((4,), 1.5))


def test_the_cli_refuses_a_quantized_model_with_one_line(tmp_path, capsys):
    models = [_model_dir(tmp_path / f"m{i}", GPTQ, i) for i in range(2)]
    assert main(["soup", str(models[0]), str(models[1]), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quant_method 'gptq'" in err


def _adapter_dir(path, seed, config=True):
    generator = torch.Generator().manual_seed(seed)
    path.mkdir()
    lora = {
        "base_model.model.q_proj.lora_A.weight": torch.randn(2, 8, generator=generator),
        "base_model.model.q_proj.lora_B.weight": torch.randn(8, 2, generator=generator),
    }
    ladle.save(lora, path / "adapter_model.safetensors")
    if config:
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    return path


def test_a_merge_of_peft_adapters_is_refused_naming_the_adapter(tmp_path):
    # Before: lora_A and lora_B averaged apart (not the mean of the updates B·A), written as
    # model.safetensors without adapter_config.json: no adapter PEFT could load.
    adapters = [_adapter_dir(tmp_path / f"a{i}", i) for i in range(2)]
    out = tmp_path / "out"
    for merge_them, who in (
        (lambda: ladle.uniform_soup(adapters, out=out), "model 0"),
        (lambda: ladle.task_arithmetic(adapters[1:], adapters[0]), "base"),
        (lambda: ladle.greedy_soup(adapters, lambda sd: 1.0), "model 0"),
    ):
        with pytest.raises(ladle.CheckpointError) as caught:
            merge_them()
        # The base first, then the models: adapters[0] is named either way.
        assert str(caught.value).startswith(f"{who} ({ladle.open_checkpoint(adapters[0]).name}): ")
        assert "a PEFT adapter (adapter_config.json)" in str(caught.value)
        assert "merge_and_unload" in str(caught.value)
    assert not out.exists()


def test_adapter_weights_without_their_config_and_models_beside_an_adapter_config_merge(tmp_path):
    # Tensors of an adapter named without adapter_config.json are merged as given, and so
    # is a whole model (model.safetensors, read first) beside an adapter's files.
    bare = [_adapter_dir(tmp_path / f"b{i}", i, config=False) for i in range(2)]
    merged = ladle.uniform_soup(bare)
    key = "base_model.model.q_proj.lora_A.weight"
    assert torch.equal(merged[key], (ladle.load(bare[0])[key] + ladle.load(bare[1])[key]) / 2)
    both = [_model_dir(tmp_path / f"m{i}", {"model_type": "llama"}, i) for i in range(2)]
    for folder in both:
        (folder / "adapter_config.json").write_text("{}")
        ladle.save({"lora": torch.ones(1)}, folder / "adapter_model.safetensors")
    assert set(ladle.uniform_soup(both)) == set(ladle.load(both[0]))
    # An adapter whose folder also holds a config.json (the base model's) is still one.
    for folder in bare:
        (folder / "adapter_config.json").write_text("{}")
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ladle.CheckpointError, match="a PEFT adapter"):
        ladle.uniform_soup(bare)


def test_a_complex128_merge_to_a_file_is_refused_before_any_pass(tmp_path, monkeypatch):
    # safetensors has no complex128 code: the writer refused it, once TIES's threshold pass
    # (or every evaluation of a greedy soup) was done.
    base, models = _complex_family(torch.complex128, n=2)
    out = tmp_path / "merged.safetensors"
    expected = f"{out}: tensor 'spectral': safetensors cannot store dtype torch.complex128"

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over the inputs ran")

    monkeypatch.setattr(ladle.methods.ties, "fold", no_pass)
    monkeypatch.setattr(ladle.engine, "fold", no_pass)
    with pytest.raises(ladle.LadleError) as caught:
        ladle.ties(models, base, out=out)
    assert str(caught.value) == expected
    with pytest.raises(ladle.LadleError) as caught:
        ladle.greedy_soup(models, lambda sd: pytest.fail("evaluated"), out=out)
    assert str(caught.value) == expected + " (the soup takes the dtypes of model 0 (<state dict>))"
    assert not out.exists()


def test_complex128_values_past_complex64_s_range_are_an_overflow_of_the_output(tmp_path):
    # The output takes the base's complex64; 1e300 fits complex128, where it is computed.
    base = {"z": torch.zeros(2, dtype=torch.complex64)}
    models = [{"z": torch.tensor([1e300 + 0j, 1 + 1j], dtype=torch.complex128)}] * 2
    expected = (
        "1 of the 2 merged values of key 'z' overflow complex64 (largest finite value "
        "3.40282e+38) although every input is finite"
    )
    with pytest.raises(ladle.NonFiniteError, match=re.escape(expected)):
        ladle.task_arithmetic(models, base)
    merged = ladle.task_arithmetic(models, base, allow_nonfinite=True)["z"]
    assert merged.dtype == torch.complex64 and merged[1].item() == 2 + 2j


@pytest.mark.parametrize(
    "merge",
    [
        lambda models, base: ladle.ties(models, base, density=1.0, device="cpu"),
        lambda models, base: ladle.dare(models, base, density=1.0, combine="ties", device="cpu"),
    ],
    ids=["ties", "dare_ties"],
)
def test_sign_ties_of_a_complex_key_follow_the_model_wide_vote_not_the_key_s_own(merge):
    # Entry 0's parts cancel exactly (a tie). The key's own other parts vote negative (4),
    # the float key positive (8): the model-wide vote, +4, gives the tie the positive mean.
    base = {"z": torch.zeros(3, dtype=torch.complex64), "w": torch.zeros(8)}
    models = [
        {"z": torch.tensor([1 + 2j, -1 - 1j, -2 - 1j]), "w": torch.ones(8)},
        {"z": torch.tensor([-1 - 2j, -1 - 1j, -2 - 1j]), "w": torch.ones(8)},
    ]
    merged = merge(models, base)
    assert merged["z"].tolist() == [1 + 2j, -1 - 1j, -2 - 1j]


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_trim_thresholds_of_complex_tensors_are_those_of_their_parts(trim):
    base, models = _complex_family(torch.complex64, n=3, seed=4)
    found = magnitude_thresholds(models, base, density=0.3, trim=trim, device="cpu")
    parts = magnitude_thresholds(
        [_as_real(m) for m in models], _as_real(base), density=0.3, trim=trim, device="cpu"
    )
    assert found == parts and all("spectral" in limits for limits in found)


# --- float64 results rounded once into narrow dtypes ---------------------------------------

NARROW = {  # dtype: (bits of precision, smallest normal exponent), for a naive rounding
    torch.bfloat16: (8, -126),
    torch.float16: (11, -14),
    torch.float8_e5m2: (3, -14),
    torch.float8_e4m3fn: (4, -6),
}


def _rounded_once(x: float, precision: int, emin: int) -> float:
    """``x`` rounded to nearest, ties to even, with ``precision`` bits (exact: Fractions)."""
    from fractions import Fraction

    if x == 0 or not math.isfinite(x):
        return x
    exponent = max(math.frexp(abs(x))[1] - 1, emin)
    step = Fraction(2) ** (exponent - precision + 1)
    count, rest = divmod(Fraction(abs(x)), step)
    if rest > step / 2 or (rest == step / 2 and count % 2 == 1):
        count += 1
    return math.copysign(float(count * step), x)


def _hard_cases(dtype: torch.dtype, count: int, seed: int) -> torch.Tensor:
    """float64 values within ``dtype``'s range, many just off the midpoints between two of its
    numbers (where rounding twice goes wrong), some on them, some anywhere."""
    g = torch.Generator().manual_seed(seed)
    top = torch.finfo(dtype).max / 2
    near = torch.rand(count, generator=g, dtype=torch.float64) * top
    near *= torch.exp2(-torch.randint(0, 40, (count,), generator=g).double())
    bits = {1: torch.uint8, 2: torch.int16}[dtype.itemsize]
    low = near.to(dtype).double()
    high = (near.to(dtype).view(bits) + 1).view(dtype).double()  # the next one up (≥ 0)
    middle = (low + high) / 2  # exact in float64
    off = torch.randint(-3, 4, (count,), generator=g).double() * middle * 2.0**-40
    signs = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0).double()
    return torch.cat([(middle + off) * signs, middle * signs, near * signs])


@pytest.mark.parametrize("dtype", list(NARROW), ids=str)
def test_float64_values_are_rounded_once_into_narrow_dtypes(dtype):
    # torch rounds float64 to these dtypes through float32, twice: 1 + 2⁻¹¹ + 2⁻⁴⁰ became 1.0
    # in float16 (1 + 2⁻¹⁰ is nearest), about one entry in 10⁴ of a float64 merge saved as fp16.
    from ladle.engine import cast

    values = _hard_cases(dtype, 4000, seed=7)
    expected = [_rounded_once(v, *NARROW[dtype]) for v in values.tolist()]
    assert cast(values, dtype).double().tolist() == expected
    into = torch.empty(values.shape, dtype=dtype)
    assert cast(values, dtype, out=into) is into and into.double().tolist() == expected


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
def test_complex128_values_are_rounded_once_into_complex32():
    # torch casts through complex64: each part rounded twice, as float64 to float16.
    from ladle.engine import cast

    real, imaginary = _hard_cases(torch.float16, 2000, seed=17).chunk(2)
    values = torch.complex(real, imaginary)
    expected = [[_rounded_once(v, 11, -14) for v in p.tolist()] for p in (real, imaginary)]
    parts = torch.view_as_real(cast(values, torch.complex32)).double()
    assert [parts[:, 0].tolist(), parts[:, 1].tolist()] == expected
    into = torch.empty(values.shape, dtype=torch.complex32)
    assert cast(values, torch.complex32, out=into) is into
    assert torch.view_as_real(into).double()[:, 0].tolist() == expected[0]


def test_float64_merges_and_arithmetic_round_once_into_the_output_dtype(tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        hard = _hard_cases(dtype, 2000, seed=11)
        models = [{"w": hard}, {"w": hard.clone()}]
        exact = ladle.uniform_soup(models, device="cpu")["w"]  # float64, kept float64
        assert torch.equal(exact, hard)  # (a + a)/2
        expected = [_rounded_once(v, *NARROW[dtype]) for v in exact.tolist()]
        in_memory = ladle.uniform_soup(models, dtype=dtype, device="cpu")["w"]
        assert in_memory.double().tolist() == expected
        written = ladle.uniform_soup(models, dtype=dtype, out=tmp_path / f"{dtype}.safetensors")
        assert ladle.load(written)["w"].double().tolist() == expected
        greedy = ladle.greedy_soup(models, lambda sd: 1.0, dtype=dtype, device="cpu")
        assert greedy.state_dict["w"].double().tolist() == expected
    hard = _hard_cases(torch.float16, 2000, seed=13)
    narrow = {"w": torch.zeros(hard.shape, dtype=torch.float16)}  # the result takes its dtype
    total = ladle.add(narrow, {"w": hard})["w"]
    assert total.double().tolist() == [_rounded_once(v, 11, -14) for v in hard.tolist()]


@pytest.mark.parametrize("progress", [3, "yes"])
def test_a_progress_that_is_no_class_is_a_type_error_naming_it(progress):
    # "'int' object is not callable"
    for call in (
        lambda: ladle.uniform_soup([{"w": torch.ones(2)}] * 2, device="cpu", progress=progress),
        lambda: ladle.greedy_soup([{"w": torch.ones(2)}] * 2, lambda sd: 1.0, progress=progress),
    ):
        with pytest.raises(TypeError, match=r"^progress: expected True, False, None or a tqdm"):
            call()


@pytest.mark.parametrize(
    "method",
    [
        lambda models, **kw: ladle.uniform_soup(models, **kw),
        lambda models, **kw: ladle.greedy_soup(models, lambda sd: 0.0, **kw),
    ],
    ids=["merge", "greedy soup"],
)
def test_a_max_shard_size_that_is_no_size_is_refused_in_memory_too(method):
    # With out=None it went unchecked: a typo passed in memory, failed once written.
    models = [{"w": torch.ones(2)}, {"w": torch.zeros(2)}]
    with pytest.raises(TypeError, match=r"max_shard_size: expected bytes .* found float"):
        method(models, max_shard_size=1.5)
    with pytest.raises(ValueError, match=r"max_shard_size: expected at least 1 byte, found 0"):
        method(models, max_shard_size=0)


@pytest.mark.parametrize("name", ["o", "o.safetensors"])
def test_ctrl_c_between_making_the_writer_and_using_it_leaves_no_temporary(
    tmp_path, monkeypatch, name
):
    # The writer was made before the with statement that aborts it, a thread between them.
    import threading

    real = threading.Thread

    def thread(*args, name=None, **kwargs):
        if name == "ladle-close-inputs":
            raise KeyboardInterrupt
        return real(*args, name=name, **kwargs)

    monkeypatch.setattr("ladle.engine.threading.Thread", thread)
    with pytest.raises(KeyboardInterrupt):
        ladle.uniform_soup([{"w": torch.ones(2)}] * 2, out=tmp_path / name, device="cpu")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("key", "index", "values", "found"),
    [
        ("w", [-1], [9.0], r"amend\('w'\) index -1 is outside the tensor's 4 entries"),
        ("w", [4], [9.0], r"amend\('w'\) index 4 is outside the tensor's 4 entries"),
        ("w", [0, 1, 2], [9.0], r"amend\('w'\) expected \(3,\) values of torch\.float32"),
        ("v", [0], [9.0], r"amend\('v'\) of a tensor not planned"),
    ],
    ids=["negative", "past the end", "too few values", "unknown key"],
)
def test_a_kernels_amendments_are_checked_in_memory_as_when_written(
    tmp_path, key, index, values, found
):
    # In memory they were applied unchecked: -1 wrapped to the last entry, one value was
    # broadcast to three, an unknown key was a bare KeyError on both paths.
    def amend():
        yield key, torch.tensor(index), torch.tensor(values)

    kernel = Kernel(lambda k, rows, base: None, lambda state, i, x: x.clone(), lambda s: s)
    kernel = kernel._replace(amend=amend)
    for out in (None, tmp_path / "o.safetensors"):
        with pytest.raises(ladle.LadleError, match=found):
            merge([{"w": torch.zeros(4)}], kernel, method="m", parameters={}, out=out, device="cpu")


def test_a_kernels_integer_amendments_are_checked_against_a_saturating_dtype(tmp_path):
    # 1000 amended into float8_e4m3fn (largest 448) would saturate to 448 in the cast.
    def amend():
        yield "w", torch.tensor([0]), torch.tensor([1000])

    kernel = Kernel(lambda k, rows, base: None, lambda state, i, x: x.clone(), lambda s: s)
    kernel = kernel._replace(amend=amend)
    model = {"w": torch.tensor([1.0, 2.0], dtype=torch.float8_e4m3fn)}
    for out in (None, tmp_path / "o.safetensors"):
        with pytest.raises(ladle.NonFiniteError, match=r"overflow float8_e4m3fn"):
            merge([model], kernel, method="m", parameters={}, out=out, device="cpu")


def test_an_output_through_a_loop_of_links_is_an_output_error(tmp_path):
    # pathlib's resolve raised RuntimeError ("Symlink loop"): a traceback from the CLI.
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ladle.OutputError, match=r"loop/o\.safetensors: cannot resolve"):
        ladle.uniform_soup([{"w": torch.ones(2)}] * 2, out=tmp_path / "loop" / "o.safetensors")


def test_an_output_through_a_missing_folder_and_dotdot_is_refused_before_any_work(
    tmp_path, monkeypatch
):
    # missing/../taken.safetensors is taken.safetensors once missing/ is made, as the writer
    # makes it; "already exists" was found only after the merge ("appeared while merging").
    monkeypatch.chdir(tmp_path)
    ladle.save({"w": torch.ones(2)}, "taken.safetensors")
    calls = []

    def evaluate(sd):
        calls.append(1)
        return 1.0

    with pytest.raises(ladle.LadleError, match=r"missing/\.\./taken\.safetensors: already exists"):
        ladle.greedy_soup([{"w": torch.ones(2)}] * 2, evaluate, out="missing/../taken.safetensors")
    assert calls == []


def test_an_output_whose_own_name_is_a_loop_of_links_is_replaced_with_overwrite(tmp_path):
    # Only the output's folder must resolve: a link as its name is replaced, never followed,
    # a looping one too ("cannot resolve" refused it, where a dangling link was replaced).
    (tmp_path / "o.safetensors").symlink_to(tmp_path / "o.safetensors")
    out = ladle.uniform_soup(
        [{"w": torch.ones(2)}] * 2, out=tmp_path / "o.safetensors", overwrite=True
    )
    assert not out.is_symlink() and ladle.load(out)["w"].tolist() == [1.0, 1.0]


# --- pinned by mutation testing (round 4): each fails on the mutant named -------------------


class _FirstKey:
    """A partition that merges the reference's first key alone, in one process; the split
    output is ``split`` (a path), or none (``None``: no merge in the block is the split)."""

    def __init__(self, split: object = None) -> None:
        self.split = split

    def writes(self, out):
        return out is not None and self.split is not None and str(out) == str(self.split)

    def keys(self, reference):
        return list(reference.keys())[:1]

    def all_reduce(self, tensor):
        return tensor

    def writer(self, out, specs, *, keys, metadata, extra_files, max_shard_size):
        from ladle.writer import SafetensorsWriter

        return SafetensorsWriter(out, {k: specs[k] for k in keys}, metadata=metadata)


def test_leaving_a_nested_partitioned_block_restores_the_outer_partition():
    from ladle.engine import current_partition, partitioned

    outer, inner = _FirstKey(), _FirstKey()
    with partitioned(outer):
        with partitioned(inner):
            assert current_partition() is inner
        assert current_partition() is outer  # E01: None (set, not reset)
    assert current_partition() is None


def test_a_merge_in_a_partitioned_block_that_is_not_the_split_one_runs_whole():
    # TIES trim="global" ranks every key's magnitudes in its prepare pass: over the first
    # key alone (E02: the partition left in place for it) the threshold, and so the result,
    # differ.
    from ladle.engine import partitioned

    gen = torch.Generator().manual_seed(0)
    base = {"a": torch.zeros(50), "b": torch.zeros(50)}
    models = [
        {"a": torch.randn(50, generator=gen), "b": 10 * torch.randn(50, generator=gen)}
        for _ in range(2)
    ]
    whole = ladle.ties(models, base, density=0.3, trim="global")
    with partitioned(_FirstKey()):
        inside = ladle.ties(models, base, density=0.3, trim="global")
    assert_bit_for_bit(inside, whole)


def test_a_partition_s_progress_bar_counts_the_bytes_of_its_own_keys(tmp_path):
    from ladle.engine import partitioned

    seen = {"total": None, "done": 0}

    class Bar:
        def __init__(self, total=None, **kwargs):
            seen["total"] = total

        def update(self, n):
            seen["done"] += n

        def close(self):
            pass

    models = [{"a": torch.ones(100), "b": torch.ones(1000)}] * 2
    out = tmp_path / "m.safetensors"
    with partitioned(_FirstKey(split=out)):
        ladle.uniform_soup(models, out=out, progress=Bar)
    assert seen["total"] == seen["done"] == 2 * 100 * 4  # E04: the total counted "b" too


def test_no_models_is_a_value_error_naming_the_parameter():
    with pytest.raises(ValueError, match="^models: expected at least one model"):
        ladle.task_arithmetic([], {"w": torch.ones(2)})  # E10: an AttributeError
    with pytest.raises(ValueError, match="^models: expected at least one model"):
        ladle.uniform_soup([])


def test_a_tensor_given_as_the_models_is_no_sequence_of_models():
    with pytest.raises(TypeError, match="^models: expected a sequence of models"):
        ladle.uniform_soup(torch.ones(3, 2))  # E11: "model 0: expected a mapping..."


def test_errors_are_also_the_builtin_exceptions_callers_catch():
    # One hierarchy under LadleError; bad inputs are also ValueErrors (R05, R06: an
    # `except ValueError` stopped catching a shape mismatch or a NaN), output failures
    # OSErrors, unsafe files CheckpointErrors.
    shapes = [{"w": torch.ones(2)}, {"w": torch.ones(3)}]
    with pytest.raises(ValueError) as mismatch:
        ladle.uniform_soup(shapes)
    assert type(mismatch.value) is ladle.IncompatibleError
    with pytest.raises(ValueError) as nan:
        ladle.uniform_soup([{"w": torch.ones(2)}, {"w": torch.tensor([1.0, math.nan])}])
    assert type(nan.value) is ladle.NonFiniteError
    assert issubclass(ladle.OutputError, OSError)
    assert issubclass(ladle.UnsafeCheckpointError, ladle.CheckpointError)
    for error in (ladle.CheckpointError, ladle.IncompatibleError, ladle.NonFiniteError):
        assert issubclass(error, ladle.LadleError)


def test_check_flag_takes_numpy_bools_as_python_bools():
    import numpy as np

    from ladle.errors import check_flag

    for flag in (np.True_, np.False_):  # R03: refused; R04: returned as numpy's
        assert check_flag("overwrite", flag) is bool(flag)


def test_a_number_given_as_a_tensor_on_the_meta_device_is_a_type_error_naming_it():
    # It was torch's "RuntimeError: Tensor.item() cannot be called on meta tensors".
    a, b, base = {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.zeros(1)}
    meta = torch.tensor(0.5, device="meta")
    calls = {
        "scale": lambda: ladle.task_arithmetic([a, b], base, scale=meta),
        "density": lambda: ladle.ties([a, b], base, density=meta),
        "t": lambda: ladle.lerp(a, b, meta),
        "weights[1]": lambda: ladle.uniform_soup([a, b], weights=[1.0, meta]),
        "scores[0]": lambda: ladle.greedy_soup([a, b], lambda sd: 1.0, scores=[meta, meta]),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value) == f"{name}: expected a number, found a tensor on the meta device"
    with pytest.raises(ValueError, match=r"^evaluate: returned tensor\(\.\.\., device='meta'"):
        ladle.greedy_soup([a, b], lambda sd: meta)


class _InterruptedBar:
    """A progress bar whose second update is a Ctrl-C."""

    def __init__(self, total: int, unit: str, desc: str, **_: object) -> None:
        self.updates = 0

    def update(self, n: int) -> None:
        self.updates += 1
        if self.updates == 2:
            raise KeyboardInterrupt

    def close(self) -> None:
        pass


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")
@pytest.mark.parametrize(
    ("method", "error"),
    [("uniform_soup", ladle.NonFiniteError), ("ties", KeyboardInterrupt), ("diff", None)],
)
def test_an_error_kept_after_a_failed_merge_holds_no_input_open(tmp_path, method, error):
    # The chunks ladle's frames held when it failed are views of the inputs' memory maps:
    # as long as the exception lived (kept by a training loop, a notebook, pytest.raises),
    # every such input stayed mapped and its file open.
    import traceback

    paths = []
    for i in range(3):
        model = {f"k{j}": torch.randn(64, 256) for j in range(3)}
        if i == 2:
            model["k1"][5, 5] = math.nan
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    calls = {
        "uniform_soup": lambda: ladle.uniform_soup(paths, device="cpu"),
        "ties": lambda: ladle.ties(
            paths[:2], paths[0], device="cpu", progress=_InterruptedBar, chunk_bytes=2**14
        ),
        "diff": lambda: ladle.diff(paths[0], paths[2], device="cpu"),
    }
    with pytest.raises(error or ladle.NonFiniteError) as caught:
        calls[method]()
    opened = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own, closed since
            link = os.readlink(f"/proc/self/fd/{fd}")
            opened += [link] if str(tmp_path) in link else []
    with open("/proc/self/maps") as maps:
        mapped = [line.split()[-1] for line in maps if str(tmp_path) in line]
    assert (opened, mapped) == ([], [])
    shown = "".join(traceback.format_exception(caught.value))
    assert "engine.py" in shown  # the traceback still says where it failed


@pytest.mark.parametrize("method", ["uniform_soup", "ties", "dare"])
def test_bfloat16_torch_files_merge_as_their_safetensors_twins_chunk_by_chunk(tmp_path, method):
    # A torch file's chunks are views of its map, converted to float32 for the kernel: into
    # the fold's reused buffers now, not fresh tensors (which, freed between the ties TIES
    # keeps, grew the heap by hundreds of MiB). Same numbers, bit for bit, from either file.
    gen = torch.Generator().manual_seed(11)
    base = {"w": torch.randn(64, 48, generator=gen), "b": torch.randn(48, generator=gen)}
    stored = [{k: v.to(torch.bfloat16) for k, v in base.items()}]
    for _ in range(3):
        stored.append({k: (v + 0.01 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
                       for k, v in base.items()})  # fmt: skip
    pt, st = [], []
    for i, model in enumerate(stored):
        torch.save(model, tmp_path / f"m{i}.pt")
        save_file(model, tmp_path / f"m{i}.safetensors")
        pt.append(tmp_path / f"m{i}.pt")
        st.append(tmp_path / f"m{i}.safetensors")
    merges = {
        "uniform_soup": lambda files, out: ladle.uniform_soup(files, out=out, chunk_bytes=1024),
        "ties": lambda files, out: ladle.ties(files[1:], files[0], out=out, chunk_bytes=1024),
        "dare": lambda files, out: ladle.dare(
            files[1:], files[0], combine="ties", out=out, chunk_bytes=1024
        ),
    }
    from_pt = ladle.load(merges[method](pt, tmp_path / "pt.safetensors"))
    from_st = ladle.load(merges[method](st, tmp_path / "st.safetensors"))
    assert_bit_for_bit(from_pt, from_st)


# --- a method of the user's own (ladle.engine.merge with a Kernel) ---------------------------


def _max_kernel(finalize=lambda state: state) -> Kernel:
    """The elementwise maximum of the models, finished by ``finalize``."""
    return Kernel(
        lambda key, rows, base: None,
        lambda state, i, x: x.clone() if state is None else torch.maximum(state, x),
        finalize,
    )


@pytest.mark.parametrize(
    ("finalize", "chunk_bytes", "found"),
    [
        (lambda state: state.max(), 12, r"has shape \(\), expected 1 row of shape \(3,\)"),
        (lambda state: state.amax(1, keepdim=True), 12, r"has shape \(1, 1\), expected 1 row"),
        (lambda state: state.reshape(3, 8), 2**20, r"has shape \(3, 8\), expected \(8, 3\)"),
    ],
)
@pytest.mark.parametrize("out", [None, "o.safetensors"])
def test_a_kernel_result_of_the_wrong_shape_is_refused_in_memory_as_on_disk(
    tmp_path, finalize, chunk_bytes, found, out
):
    # In memory, a 0-d or one-column result of a chunk was spread over the tensor's
    # uninitialised memory (values like -4.4e+10 returned), and a whole tensor's result of
    # another shape was reshaped; the file output refused them (the 0-d one only at the end:
    # "closed before 'w' was written").
    models = [{"w": torch.arange(24.0).reshape(8, 3)}, {"w": torch.arange(24.0).reshape(8, 3) + 1}]
    target = None if out is None else tmp_path / out
    message = found if out is None else r"expected the next rows of 'w'"
    with pytest.raises(ladle.LadleError, match=message):
        merge(
            models,
            _max_kernel(finalize),
            method="max",
            parameters={},
            device="cpu",
            chunk_bytes=chunk_bytes,
            out=target,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", [None, "o.safetensors"])
def test_an_amendment_s_index_must_be_flat_in_memory_as_on_disk(tmp_path, out):
    # A 2-D index patched the right entries in memory; the writer failed with an IndexError,
    # a searchsorted RuntimeError or a ValueError, depending on the shape.
    def amend():
        yield "w", torch.tensor([[4, 2], [5, 1]]), torch.zeros(2, 2)

    kernel = _max_kernel()._replace(amend=amend)
    models = [{"w": torch.arange(6.0)}, {"w": torch.arange(6.0) + 1}]
    with pytest.raises(
        ladle.LadleError, match=r"amend\('w'\) expected a 1-D index .* shape \(2, 2\)"
    ):
        merge(
            models,
            kernel,
            method="max",
            parameters={},
            device="cpu",
            out=None if out is None else tmp_path / out,
        )
    assert list(tmp_path.iterdir()) == []


def test_a_user_checkpoint_whose_slice_misses_rows_is_named_not_broadcast():
    # get_slice gave 1 row where 4 were asked: the arithmetic broadcast it, and the soup
    # (and a user's kernel, to memory or to a file) returned row 0 four times.
    class Short(DictCheckpoint):
        def get_slice(self, key, rows):
            return self.tensors[key][:1]

    model = {"w": torch.arange(12.0).reshape(4, 3)}
    with pytest.raises(
        ladle.CheckpointError, match=r"^short: get_slice\('w', .*\(1, 3\), expected \(4, 3\)"
    ):
        ladle.uniform_soup([Short(model, "short"), model], device="cpu")
    with pytest.raises(ladle.CheckpointError, match=r"^short: get_slice\('w'"):
        ladle.load(Short(model, "short"))


@pytest.mark.parametrize("method", ["elementwise_max", "arithmetic", "__version__"])
def test_a_method_of_the_user_s_own_gets_a_card_saying_no_recipe_replays_it(tmp_path, method):
    # The card said `ladle run recipe.toml` reproduces the merge, of a recipe naming a
    # method `ladle run` refuses; a name of another ladle attribute (a module) made the
    # directory output raise TypeError.
    paths = [
        ladle.save({"w": torch.full((4, 3), float(i))}, tmp_path / f"m{i}.safetensors")
        for i in range(2)
    ]
    out = merge(
        paths,
        _max_kernel(),
        method=method,
        parameters={"how": "max"},
        device="cpu",
        out=tmp_path / "merged",
    )
    card = (out / "README.md").read_text()
    assert f"`{method}` is no method of ladle's" in card and "```toml" not in card
    assert torch.equal(ladle.load(out)["w"], torch.ones(4, 3))


def test_nan_a_kernel_makes_from_finite_inputs_is_called_nan_not_an_overflow():
    zero_by_zero = _max_kernel(lambda state: state * 0 / 0)
    models = [{"w": torch.ones(3)}, {"w": torch.ones(3)}]
    with pytest.raises(ladle.NonFiniteError, match=r"are not finite \(3 NaN\) although every"):
        merge(models, zero_by_zero, method="nan", parameters={}, device="cpu")


def test_nan_in_a_dtype_without_infinity_may_be_an_overflow_and_is_said_so():
    # torch 2.8 casts 1000 to float8_e4m3fn as NaN (later versions saturate to 448): the
    # message blamed 0/0 or ∞ − ∞ alone for what was an overflow of the cast.
    zero_by_zero = _max_kernel(lambda state: state * 0 / 0)
    models = [{"w": torch.ones(3)}, {"w": torch.ones(3)}]
    with pytest.raises(ladle.NonFiniteError) as info:
        merge(
            models, zero_by_zero, method="nan", parameters={}, device="cpu", dtype="float8_e4m3fn"
        )
    assert (
        "are not finite (3 NaN) although every input is finite: they overflow float8_e4m3fn "
        "(largest finite value 448), which holds no infinity, or the arithmetic made NaN (0/0)"
    ) in str(info.value)
    with pytest.raises(ladle.NonFiniteError) as info:  # float16 has an infinity
        merge(models, zero_by_zero, method="nan", parameters={}, device="cpu", dtype="float16")
    assert "the arithmetic made NaN (0/0, or an overflow of float16 followed by ∞ − ∞)" in str(
        info.value
    )


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes came with Python 3.11")
@pytest.mark.parametrize("where", ["init", "update", "finalize"])
def test_an_error_in_a_kernel_of_one_s_own_is_noted_with_its_key_and_rows(where):
    # It came out with the kernel's own message alone: which key it was at, nobody said.
    def fail(*args):
        raise ValueError("kernel bug")

    kernel = _max_kernel()._replace(**{where: fail})
    models = [{"w": torch.ones(8, 3)}, {"w": torch.ones(8, 3)}]
    with pytest.raises(ValueError) as info:  # chunks of 2 rows (24 bytes)
        merge(models, kernel, method="max", parameters={}, device="cpu", chunk_bytes=24)
    assert str(info.value) == "kernel bug"  # the message, and the CLI's one line, as they were
    assert info.value.__notes__ == ["ladle: while merging key 'w', rows 0–1"]
    with pytest.raises(ValueError) as info:  # a tensor in one chunk: no rows said
        merge([{"a": torch.ones(2)}] * 2, kernel, method="max", parameters={}, device="cpu")
    assert info.value.__notes__ == ["ladle: while merging key 'a'"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes came with Python 3.11")
@pytest.mark.parametrize("fails", ["at once", "after one"])
def test_an_error_in_a_kernel_s_own_amend_is_noted_as_the_amend_s(tmp_path, fails):
    # Its other calls' errors were noted with the key; amend's came out bare.
    def amend():
        if fails == "after one":
            yield "w", torch.tensor([0]), torch.tensor([5.0])
        raise ValueError("amend bug")

    kernel = _max_kernel()._replace(amend=amend)
    models = [{"w": torch.ones(4), "v": torch.ones(2)}] * 2
    after = "" if fails == "at once" else ", after key 'w'"
    for out in (None, tmp_path / "m.safetensors"):
        with pytest.raises(ValueError) as info:
            merge(models, kernel, method="max", parameters={}, device="cpu", out=out)
        assert str(info.value) == "amend bug"
        assert info.value.__notes__ == [
            f"ladle: in the kernel's amend(), once every chunk was merged{after}"
        ]
    assert not (tmp_path / "m.safetensors").exists()


def _greedy(models, out, **kwargs):
    result = ladle.greedy_soup(models, lambda sd: 0.0, out=out, **kwargs)
    return result.state_dict if out is None else out  # written there too


INFERENCE_METHODS = {
    "uniform_soup": lambda m, b, **kw: ladle.uniform_soup(m, **kw),
    "greedy_soup": lambda m, b, chunk_bytes, out=None, **kw: _greedy(m, out, **kw),
    "ratatouille": lambda m, b, **kw: ladle.ratatouille(m, **kw),
    "task_arithmetic": lambda m, b, **kw: ladle.task_arithmetic(m, b, **kw),
    "ties": lambda m, b, **kw: ladle.ties(m, b, **kw),
    "dare": lambda m, b, **kw: ladle.dare(m, b, density=0.5, **kw),
    "dare ties": lambda m, b, **kw: ladle.dare(m, b, density=0.5, combine="ties", **kw),
    "model_stock": lambda m, b, **kw: ladle.model_stock(m, b, **kw),
    "slerp": lambda m, b, **kw: ladle.slerp(m[:2], **kw),
}


@pytest.mark.filterwarnings("ignore::ladle.ModelStockWarning")  # t clamped: random vectors
@pytest.mark.parametrize("method", INFERENCE_METHODS.values(), ids=list(INFERENCE_METHODS))
def test_every_method_under_inference_mode_gives_the_same_bits(tmp_path, method):
    # DARE of three models or more raised "Inplace update to inference tensor outside
    # InferenceMode": its numbers, drawn on a thread of its own, went into buffers the
    # caller's thread had made under inference mode.
    base, *models = family(4, seed=8)
    kwargs = {"device": "cpu", "chunk_bytes": 64}
    expected = method(models, base, **kwargs)
    with torch.inference_mode():
        in_memory = method(models, base, **kwargs)
        written = method(models, base, out=tmp_path / "out.safetensors", **kwargs)
    assert_bit_for_bit(in_memory, expected)
    assert_bit_for_bit(ladle.load(written), expected)


@pytest.mark.filterwarnings("ignore::ladle.ModelStockWarning")
@pytest.mark.parametrize("chunk_bytes", [16, 100, 2**20])
def test_expanded_tensors_merge_as_their_copies_do(tmp_path, chunk_bytes):
    # torch's CPU add_ with alpha fuses a multiply-add in its vector loop only, for an
    # operand of stride 0: a soup of expand()-ed tensors (or a torch file of them) had
    # entries one rounding apart (from index 49 of 63), and its bits changed with chunk_bytes.
    values = [0.1234567, -0.7654321, 0.3333333]
    expanded = [{"e": torch.tensor([v]).expand(7, 9)} for v in values]
    copies = [{"e": t["e"].contiguous()} for t in expanded]
    paths = []
    for i, model in enumerate(expanded):
        torch.save(model, tmp_path / f"m{i}.pt")  # keeps the stride of 0
        paths.append(tmp_path / f"m{i}.pt")
    runs = {
        "soup": lambda m: ladle.uniform_soup(m, device="cpu", chunk_bytes=chunk_bytes),
        "stock": lambda m: ladle.model_stock(m[1:], m[0], device="cpu", chunk_bytes=chunk_bytes),
        "weighted_sum": lambda m: ladle.weighted_sum(m, [1 / 3] * 3),
        "add": lambda m: ladle.add(m[0], m[1], alpha=1 / 3),
    }
    for name, run in runs.items():
        expected = run(copies)["e"]
        assert expected.unique().numel() == 1, name
        for models in (expanded, paths):
            assert torch.equal(run(models)["e"], expected), name


def _mean_kernel(**extra) -> Kernel:
    """The mean of the models, as a method of one's own writes it."""

    def update(state, index, x):
        return x.clone() if state is None else state.add_(x)

    return Kernel(lambda key, rows, base: None, update, lambda s: s / 2, **extra)


@pytest.mark.parametrize("out", [None, "m.safetensors"])
def test_an_amendment_naming_an_entry_twice_is_refused(tmp_path, out):
    # Torch's index_put_ (in memory) and the writer's unstable sort (on disk) each kept
    # another of the repeated values: 17.0 in memory, 1.0 on disk.
    models = [{"w": torch.zeros(6)}, {"w": torch.ones(6)}]
    amend = lambda: iter([("w", torch.tensor([3, 1, 3]), torch.tensor([7.0, 8.0, 9.0]))])  # noqa: E731
    with pytest.raises(ladle.LadleError, match=r"amend\('w'\) names entry 3 more than once"):
        ladle.engine.merge(
            models,
            _mean_kernel(amend=amend),
            method="m",
            parameters={},
            device="cpu",
            out=None if out is None else tmp_path / out,
        )
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_one_s_own_needs_no_metadata_and_may_hand_out_tensors_needing_grad():
    # Without `metadata` (the docs ask for four methods), a model beside a tied one raised
    # AttributeError; tensors requiring grad (a subclass over a module's parameters) failed
    # every merge with torch's "out=... don't support automatic differentiation".
    weight = torch.randn(8, 4)
    tied = {"emb": weight, "head": weight}
    live = DictCheckpoint({"emb": torch.nn.Parameter(torch.randn(8, 4))})
    vars(live).pop("metadata")  # the four methods alone: no metadata set
    merged = ladle.uniform_soup([tied, live], device="cpu")
    expected = (weight + live.tensors["emb"].detach()) / 2
    assert torch.equal(merged["emb"], expected) and torch.equal(merged["head"], expected)
    assert not ladle.load(live)["emb"].requires_grad


def test_a_kernel_s_error_in_a_merged_view_names_flat_entries_and_bad_results_are_named():
    # The note said "rows 0–249" of a tensor of one row (read as a view of 250-entry rows);
    # a finalize that returned nothing failed with "'NoneType' object has no attribute".
    def failing(state, index, x):
        raise RuntimeError("boom")

    models = [{"w": torch.ones(1, 3000)}, {"w": torch.ones(1, 3000)}]
    kernel = Kernel(lambda key, rows, base: None, failing, lambda s: s)
    with pytest.raises(RuntimeError, match="boom") as info:
        ladle.engine.merge(
            models, kernel, method="m", parameters={}, device="cpu", chunk_bytes=1000
        )
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == ["ladle: while merging key 'w', (flat) entries 0–249"]
    nothing = Kernel(lambda key, rows, base: None, lambda s, i, x: None, lambda s: None)
    with pytest.raises(ladle.LadleError, match=r"^merge: the kernel's result of 'w' is None, "):
        ladle.engine.merge(models, nothing, method="m", parameters={}, device="cpu")
    meta = Kernel(
        lambda key, rows, base: None,
        lambda s, i, x: None,
        lambda s: torch.empty(1, 3000, device="meta"),
    )
    with pytest.raises(ladle.LadleError, match=r"result of 'w' is on meta, the merge runs on cpu"):
        ladle.engine.merge(models, meta, method="m", parameters={}, device="cpu")


def test_a_count_owed_by_a_fold_closed_elsewhere_goes_when_the_thread_sets_its_own():
    # Two folds on one thread, the first closed on another: the count it owed (1) stayed,
    # and the thread's next merges set it again, for good.
    import threading

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's thread count is the process's here: nothing is owed")
    ckpt = ladle.open_checkpoint({"w": torch.ones(8), "v": torch.ones(8)})
    kernel, _ = _recording_thread_counts()
    seen: dict = {}

    def owner():
        torch.set_num_threads(2)
        first = fold([ckpt], kernel, device=resolve_device("cpu"), prefetch=1)
        second = fold([ckpt], kernel, device=resolve_device("cpu"), prefetch=1)
        next(first), next(second)
        closer = threading.Thread(target=first.close)
        closer.start()
        closer.join(60)
        second.close()  # here: the count comes back, and nothing is owed any more
        seen["ended"] = torch.get_num_threads()
        list(fold([ckpt], kernel, device=resolve_device("cpu"), prefetch=1))
        ladle.uniform_soup([ckpt, ckpt], device="cpu")
        seen["later"] = torch.get_num_threads()

    thread = threading.Thread(target=owner, daemon=True)
    thread.start()
    thread.join(60)
    assert seen == {"ended": 2, "later": 2}


def test_an_in_memory_merge_past_the_memory_is_refused_before_any_pass(tmp_path):
    # Two torch files of a few KB holding expanded tensors of 64 GiB each: the in-memory soup
    # allocated its result as the first chunk came (torch's allocator error, a RuntimeError),
    # and a result made of many smaller tensors ran until the kernel's OOM killer.
    room = ladle.checkpoint.memory_available()
    if room is None or room >= 2**36:
        pytest.skip("this machine has 64 GiB of memory to spare, or says nothing of it")
    paths = []
    for value in (1.0, 2.0):
        paths.append(tmp_path / f"{value}.pt")
        torch.save({"w": torch.full((1,), value).expand(2**31, 8), "n": torch.ones(2)}, paths[-1])
    with pytest.raises(MemoryError) as info:
        ladle.uniform_soup(paths, device="cpu")
    message = str(info.value)
    assert message.startswith(
        f"the merged state dict needs {2**36 + 8:,} bytes (the largest tensor, 'w', "
        "[2147483648, 8] float32), more than the "
    )
    assert message.endswith(" bytes of memory available; pass out= to stream the merge to a file")


def test_the_room_check_counts_every_tensor_in_its_output_dtype(monkeypatch):
    models = [{"a": torch.ones(4, 2), "b": torch.ones(3, dtype=torch.float64)} for _ in range(2)]
    # 8 float32 entries and 3 float64: 56 bytes; in bfloat16, 16 + 6 = 22 (float64 → bf16 too)
    monkeypatch.setattr(ladle.checkpoint, "memory_available", lambda: 55)
    with pytest.raises(MemoryError, match=r"^the merged state dict needs 56 bytes \(the largest "):
        ladle.uniform_soup(models, device="cpu")
    merged = ladle.uniform_soup(models, device="cpu", dtype="bfloat16")  # 22 bytes fit
    assert merged["a"].dtype == torch.bfloat16
    monkeypatch.setattr(ladle.checkpoint, "memory_available", lambda: 56)
    assert torch.equal(ladle.uniform_soup(models, device="cpu")["a"], torch.ones(4, 2))
    monkeypatch.setattr(ladle.checkpoint, "memory_available", lambda: None)  # unknown: no check
    assert torch.equal(ladle.uniform_soup(models, device="cpu")["b"], models[0]["b"])


def test_a_merge_to_a_file_is_not_bound_by_the_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(ladle.checkpoint, "memory_available", lambda: 1)
    models = [{"w": torch.full((64,), float(i))} for i in range(3)]
    out = ladle.uniform_soup(models, out=tmp_path / "m.safetensors", device="cpu")
    monkeypatch.undo()  # load checks room for what it reads
    assert torch.equal(ladle.load(out)["w"], torch.full((64,), 1.0))


@pytest.mark.parametrize("selection", ["greedy_soup", "ratatouille"])
def test_the_greedy_rule_checks_room_for_its_two_soups_whatever_out_is(
    tmp_path, monkeypatch, selection
):
    # greedy soups do not go through merge(): they hold the running soup and a candidate in
    # memory (float32 for bfloat16 models), with or without out=, and were never checked
    models = [{"w": torch.ones(4, 8, dtype=torch.bfloat16), "n": torch.ones(2)} for _ in range(3)]
    needed = 2 * (4 * 8 * 4 + 2 * 4)  # two soups of float32 tensors: 2 × 136 bytes
    calls = []

    def greedy(out=None):
        def evaluate(state):
            calls.append(1)
            return 1.0

        if selection == "greedy_soup":
            return ladle.greedy_soup(models, evaluate, out=out, device="cpu")
        return ladle.ratatouille(
            models, selection="greedy", evaluate=evaluate, out=out, device="cpu"
        )

    monkeypatch.setattr(ladle.checkpoint, "memory_available", lambda: needed - 1)
    for out in (None, tmp_path / "g.safetensors"):
        with pytest.raises(MemoryError) as info:
            greedy(out)
        assert str(info.value) == (
            f"the greedy soup (the running soup and a candidate, held in memory) needs "
            f"{needed:,} bytes (the largest tensor, 'w', [4, 8] float32, 2 of each tensor), "
            f"more than the {needed - 1:,} bytes of memory available; the greedy rule holds "
            "them whatever out= is: fewer or smaller models, or a GPU"
        )
        assert not calls and not (tmp_path / "g.safetensors").exists()  # before evaluate
    monkeypatch.setattr(ladle.checkpoint, "memory_available", lambda: needed)
    assert greedy().selected == [0, 1, 2]
