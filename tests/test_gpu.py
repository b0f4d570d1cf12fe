"""The CUDA pipeline: side-stream copies, events, pinned results. Skipped without CUDA.

Every method runs on ``device="cuda"`` from files (pinned reads, copies on a side stream,
results back through pinned buffers) and from memory, and must agree with the CPU: bit for
bit where the arithmetic is the same (thresholds, masks, integer buffers), within float32
rounding elsewhere (a GPU sums in another order).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import assert_bit_for_bit, save_all

import ladle
from ladle.engine import Transfers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def llama_like(n: int, *, dtype: torch.dtype, seed: int = 0) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    # "row": one row of 80 kB, read in pieces (engine.chunk_shape) at 64 KiB chunks
    shapes = {
        "embed": (3000, 256),
        "q": (256, 256),
        "mlp": (700, 256),
        "norm": (256,),
        "row": (1, 20000),
    }
    base = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    base["steps"] = torch.tensor(7)
    models = []
    for _ in range(n):
        model = {
            k: v + 0.01 * torch.randn(v.shape, generator=gen).to(dtype)
            for k, v in base.items()
            if v.is_floating_point()
        }
        model["steps"] = torch.tensor(7)
        models.append(model)
    return base, models


METHODS = {
    "soup": lambda models, base, **kw: ladle.uniform_soup(models, **kw),
    "task_arithmetic": lambda models, base, **kw: ladle.task_arithmetic(models, base, **kw),
    "ties global": lambda models, base, **kw: ladle.ties(models, base, **kw),
    "ties tensor": lambda models, base, **kw: ladle.ties(models, base, trim="tensor", **kw),
    "dare": lambda models, base, **kw: ladle.dare(models, base, density=0.3, **kw),
    "model_stock": lambda models, base, **kw: ladle.model_stock(models, base, **kw),
    "slerp": lambda models, base, **kw: ladle.slerp(models[:2], t=0.3, **kw),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_from_files_agrees_with_the_cpu(tmp_path, method, dtype):
    base, models = llama_like(4, dtype=dtype)
    paths = save_all([base, *models], tmp_path)
    merge = METHODS[method]
    on_cpu = merge(paths[1:], paths[0], device="cpu")
    on_gpu = merge(paths[1:], paths[0], device="cuda", chunk_bytes=2**16)  # many chunks
    streamed = ladle.load(merge(paths[1:], paths[0], device="cuda", out=tmp_path / "out"))
    assert_bit_for_bit(streamed, merge(paths[1:], paths[0], device="cuda"))
    assert list(on_gpu) == list(on_cpu)
    for key, expected in on_cpu.items():
        assert on_gpu[key].device.type == "cpu" and on_gpu[key].dtype == expected.dtype
        if expected.is_floating_point():
            rtol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(on_gpu[key].float(), expected.float(), rtol=rtol, atol=1e-5)
        else:
            assert torch.equal(on_gpu[key], expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_merges_complex_tensors_as_the_cpu_does(tmp_path, method):
    gen = torch.Generator().manual_seed(5)
    base = {
        "z": torch.randn(300, 40, dtype=torch.complex64, generator=gen),
        "steps": torch.tensor(3),
    }
    models = [
        {
            "z": base["z"] + 0.01 * torch.randn(300, 40, dtype=torch.complex64, generator=gen),
            "steps": torch.tensor(3),
        }
        for _ in range(3)
    ]
    paths = save_all([base, *models], tmp_path)
    merge = METHODS[method]
    on_cpu = merge(paths[1:], paths[0], device="cpu")
    on_gpu = merge(paths[1:], paths[0], device="cuda", chunk_bytes=2**14)  # many chunks
    assert on_gpu["z"].dtype == torch.complex64 and on_gpu["z"].device.type == "cpu"
    torch.testing.assert_close(on_gpu["z"], on_cpu["z"], rtol=1e-5, atol=1e-5)
    streamed = ladle.load(merge(paths[1:], paths[0], device="cuda", out=tmp_path / "out"))
    assert_bit_for_bit(streamed, merge(paths[1:], paths[0], device="cuda"))


def test_ties_thresholds_on_cuda_equal_the_cpu_exactly(tmp_path):
    from ladle.methods.ties import magnitude_thresholds

    base, models = llama_like(3, dtype=torch.float32, seed=1)
    paths = save_all([base, *models], tmp_path)
    for trim in ("global", "tensor"):
        cpu = magnitude_thresholds(paths[1:], paths[0], trim=trim, device="cpu")
        gpu = magnitude_thresholds(paths[1:], paths[0], trim=trim, device="cuda", chunk_bytes=2**16)
        assert gpu == cpu


def test_ties_merging_pass_keeps_the_larger_chunks_on_cuda(monkeypatch):
    # The 1 MiB chunks of TIES's merging pass suit the CPU's caches; on a GPU each chunk's
    # copies and kernels cost a fixed few microseconds, so every pass keeps 4 MiB.
    from ladle.engine import FOLD_CHUNK_BYTES
    from ladle.methods import ties as ties_module

    sizes = []
    merge = ties_module.merge
    monkeypatch.setattr(
        ties_module, "merge", lambda *a, **k: sizes.append(k["chunk_bytes"]) or merge(*a, **k)
    )
    base, models = llama_like(2, dtype=torch.float32, seed=2)
    ladle.ties(models, base, device="cuda")
    ladle.ties(models, base, device="cpu")
    assert sizes == [FOLD_CHUNK_BYTES, ties_module.MERGE_CHUNK_BYTES]


def test_prefetch_depth_does_not_change_a_bit(tmp_path):
    from contextlib import ExitStack

    from ladle.engine import fold, open_models
    from ladle.methods.soup import weighted_mean_kernel

    _, models = llama_like(5, dtype=torch.bfloat16, seed=2)
    paths = save_all(models, tmp_path)
    results = []
    for prefetch in (0, 1, 3):
        with ExitStack() as stack:
            opened, _ = open_models(paths, None, stack)
            kernel = weighted_mean_kernel([1 / len(paths)] * len(paths))
            results.append(
                [
                    r.cpu().clone()
                    for _, _, r in fold(
                        opened,
                        kernel,
                        device=torch.device("cuda"),
                        chunk_bytes=2**15,
                        prefetch=prefetch,
                    )
                ]
            )
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_results_come_back_through_alternating_pinned_buffers():
    transfers = Transfers(torch.device("cuda"))
    n = 2**22  # large, and each result made after a sleep: a missing sync would show

    def results():
        for i in range(5):
            torch.cuda._sleep(10**6)  # the device is busy when the copy is queued
            yield f"k{i}", slice(None), torch.full((n,), float(i), device="cuda")

    seen, buffers = [], set()
    for key, _, host in transfers.to_host(results(), lambda key: torch.bfloat16):
        assert host.device.type == "cpu" and host.is_pinned() and host.dtype == torch.bfloat16
        # Complete when handed on, though the device was busy when its copy was queued (it
        # is valid until the next result is taken: the next copy goes to the other buffer).
        assert torch.equal(host, torch.full((n,), float(key[1:]), dtype=torch.bfloat16))
        buffers.add(host.data_ptr())
        seen.append(key)
    assert seen == [f"k{i}" for i in range(5)]
    assert len(buffers) == 2  # two pinned buffers, in turn


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_without_an_index_merges_on_the_current_device_alone(tmp_path):
    # Reading threads start on device 0; after set_device(1), "cuda" is device 1 for the
    # merge's own thread, and every copy, kernel and result must be there.
    base, models = llama_like(3, dtype=torch.bfloat16, seed=3)
    paths = save_all([base, *models], tmp_path)
    expected = ladle.task_arithmetic(paths[1:], paths[0], device="cuda:1", chunk_bytes=2**16)
    previous = torch.cuda.current_device()
    torch.cuda.set_device(1)
    try:
        torch.cuda.synchronize(0)
        before = torch.cuda.memory_allocated(0)
        torch.cuda.reset_peak_memory_stats(0)
        merged = ladle.task_arithmetic(paths[1:], paths[0], device="cuda", chunk_bytes=2**16)
        assert torch.cuda.max_memory_allocated(0) == before  # nothing went to device 0
    finally:
        torch.cuda.set_device(previous)
    assert_bit_for_bit(merged, expected)


NO_CONTEXT_ON_DEVICE_0 = """
import sys, torch, ladle
paths = sys.argv[1:]
assert not torch._C._cuda_hasPrimaryContext(0), "a context on device 0 before the merge"
{setup}
ladle.task_arithmetic(paths[1:], paths[0], device={device!r}, chunk_bytes=2**16)
assert torch._C._cuda_hasPrimaryContext(1)
assert not torch._C._cuda_hasPrimaryContext(0), "the merge made a CUDA context on device 0"
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize(
    ("setup", "device"),
    [("", "cuda:1"), ("torch.cuda.set_device(1)", "cuda")],  # the second: a torchrun rank's
)
def test_a_merge_on_device_1_makes_no_cuda_context_on_device_0(tmp_path, setup, device):
    # In a new process (this one has contexts everywhere by now). Reading threads start on
    # device 0; leaving torch.cuda.stream(copy) alone switched them back with
    # cudaSetDevice(0), which made a context there (hundreds of MiB per process, and an
    # error on GPUs in exclusive-process mode).
    base, models = llama_like(3, dtype=torch.bfloat16, seed=3)
    paths = [str(p) for p in save_all([base, *models], tmp_path)]
    script = NO_CONTEXT_ON_DEVICE_0.format(setup=setup, device=device)
    subprocess.run([sys.executable, "-c", script, *paths], check=True, timeout=600)


def test_inputs_held_on_cuda_merge_on_the_cpu_and_beside_inputs_on_the_cpu():
    # State dicts of modules on a GPU next to a base on the CPU: each input goes to the
    # merge device, whichever device holds it. On the CPU the models' chunks stayed on
    # CUDA (torch.sub of a CUDA x and a CPU base: RuntimeError); TIES's threshold sample
    # subtracted a CPU base from CUDA rows, on any merge device.
    base, models = llama_like(3, dtype=torch.float32, seed=4)
    held = [{k: v.cuda() for k, v in m.items()} for m in models]
    for method in ("task_arithmetic", "ties global", "ties tensor"):
        merge = METHODS[method]
        for device in ("cpu", "cuda"):
            expected = merge(models, base, device=device, chunk_bytes=2**16)
            assert_bit_for_bit(merge(held, base, device=device, chunk_bytes=2**16), expected)
    soup = ladle.uniform_soup([held[0], models[1]], device="cpu")
    assert_bit_for_bit(soup, ladle.uniform_soup(models[:2], device="cpu"))


def test_arithmetic_of_a_state_dict_on_cuda_and_one_on_the_cpu_runs_on_the_first_ones(
    tmp_path,
):
    # torch.sub of a CUDA tensor and a CPU one: "Expected all tensors to be on the same
    # device", from task_vector(model.state_dict(), "base.safetensors") with the model on a GPU.
    base, models = llama_like(2, dtype=torch.float32, seed=6)
    ladle.save(base, tmp_path / "base.safetensors")
    held = {k: v.cuda() for k, v in models[0].items()}
    vector = ladle.task_vector(held, tmp_path / "base.safetensors")  # on the base's device
    assert_bit_for_bit(vector, ladle.task_vector(models[0], base))
    total = ladle.add(held, base)  # on the first argument's device
    assert all(t.is_cuda for t in total.values())
    assert_bit_for_bit({k: t.cpu() for k, t in total.items()}, ladle.add(models[0], base))


def test_greedy_soup_hands_evaluate_every_tensor_on_the_device(tmp_path):
    # As documented: evaluate receives tensors on ``device``, integer buffers included
    # (they were copied from the inputs and stayed on the CPU).
    _, models = llama_like(3, dtype=torch.bfloat16, seed=5)
    paths = save_all(models, tmp_path)
    seen: list[set[str]] = []

    def evaluate(state_dict):
        seen.append({str(t.device) for t in state_dict.values()})
        return float(state_dict["norm"].float().sum())

    for sources in (paths, models):
        seen.clear()
        result = ladle.greedy_soup(sources, evaluate, device="cuda")
        here = {f"cuda:{torch.cuda.current_device()}"}
        assert seen and all(devices == here for devices in seen), seen
        assert {t.device.type for t in result.state_dict.values()} == {"cpu"}
        assert torch.equal(result.state_dict["steps"], torch.tensor(7))


def test_integer_buffers_held_on_cuda_arrive_whole_when_the_merge_runs_on_a_side_stream():
    # The merge's stream is the caller's current one; integer tensors are copied by reading
    # threads. Their copy ran on the reading thread's own (default) stream, which the
    # merge's copy to the host did not wait for: with that stream busy, the result was
    # handed on before the copy was made.
    _, models = llama_like(2, dtype=torch.float32, seed=6)
    steps = torch.arange(2**24, dtype=torch.int64)

    def held(buffer: torch.Tensor) -> list[dict]:
        return [{**{k: v.cuda() for k, v in m.items()}, "steps": buffer.cuda()} for m in models]

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # first with zeros: the memory it frees holds no steps
        expected = ladle.uniform_soup(held(torch.zeros_like(steps)), device="cuda")
    inputs = held(steps)
    torch.cuda.synchronize()
    torch.cuda._sleep(2 * 10**9)  # the default stream busy for about a second
    with torch.cuda.stream(side):
        merged = ladle.uniform_soup(inputs, device="cuda")
    assert torch.equal(merged.pop("steps"), steps)
    expected.pop("steps")
    assert_bit_for_bit(merged, expected)


def test_rows_a_source_gathers_on_cuda_are_ready_before_a_side_stream_reads_them():
    # A strided tensor whose rows exceed a chunk is read by gathering rows (checkpoint
    # ._merged_rows), on the reading thread's own stream; the copy stream waited for the
    # merge's stream alone, so a merge inside torch.cuda.stream(...) read the rows before
    # they were gathered.
    gen = torch.Generator().manual_seed(7)
    models = [{"experts": torch.randn(2, 600, 64, generator=gen).transpose(1, 2)} for _ in "abc"]
    expected = ladle.uniform_soup(
        [{"experts": m["experts"].contiguous()} for m in models], device="cuda", chunk_bytes=2**16
    )
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # first with zeros: the memory it frees holds no rows
        zeros = [{"experts": torch.zeros_like(m["experts"]).cuda()} for m in models]
        ladle.uniform_soup(zeros, device="cuda", chunk_bytes=2**16)
    held = [{"experts": m["experts"].cuda()} for m in models]
    assert not held[0]["experts"].is_contiguous()
    torch.cuda.synchronize()
    torch.cuda._sleep(2 * 10**9)  # the default stream busy for about a second
    with torch.cuda.stream(side):
        merged = ladle.uniform_soup(held, device="cuda", chunk_bytes=2**16)
    assert_bit_for_bit(merged, expected)


def test_inputs_the_callers_stream_is_still_writing_are_read_once_written():
    # The caller queued the writes of its inputs on its stream, then merged in that stream's
    # context (a training step on a side stream, then a soup of its state dicts). Reading
    # threads gathered the rows of a strided tensor and copied the integer buffer to the host
    # on their own (default) streams, which do not wait for the caller's: they read what the
    # memory held before the writes (found by a static review of the CUDA path).
    gen = torch.Generator().manual_seed(9)
    models = [
        {
            "experts": torch.randn(2, 600, 64, generator=gen).transpose(1, 2),
            "steps": torch.arange(2**20, dtype=torch.int64) + i,
        }
        for i in range(3)
    ]
    expected = ladle.uniform_soup(
        [{k: v.contiguous() for k, v in m.items()} for m in models],
        device="cuda",
        chunk_bytes=2**16,
    )
    sources = [{k: v.cuda() for k, v in m.items()} for m in models]  # strides kept
    held = [{k: torch.zeros_like(v) for k, v in m.items()} for m in sources]
    assert not held[0]["experts"].is_contiguous()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2 * 10**9)  # the writes below wait about a second on this stream
        for source, target in zip(sources, held):
            for key, tensor in source.items():
                target[key].copy_(tensor)
        merged = ladle.uniform_soup(held, device="cuda", chunk_bytes=2**16)
    assert torch.equal(merged["steps"], models[0]["steps"])
    assert_bit_for_bit(merged, expected)


def test_rows_a_source_gathers_on_cuda_are_not_reused_while_the_copy_stream_converts_them():
    # Rows of a strided bfloat16 tensor are gathered on the reading thread's stream and
    # converted to float32 on the copy stream, held back here by the merge's busy stream.
    # The gathered rows were dropped when read: the reader's next gather took their memory
    # and wrote other rows before the conversion read them. Without the finiteness check
    # (allow_nonfinite, or TIES's and Model Stock's merging pass) nothing waited for it.
    gen = torch.Generator().manual_seed(8)
    models = [
        {"experts": torch.randn(2, 600, 64, generator=gen).to(torch.bfloat16).transpose(1, 2)}
        for _ in "abc"
    ]
    expected = ladle.uniform_soup(
        [{"experts": m["experts"].contiguous()} for m in models], device="cuda", chunk_bytes=2**16
    )
    held = [{"experts": m["experts"].cuda()} for m in models]
    assert not held[0]["experts"].is_contiguous()
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2 * 10**9)  # the merge's stream, which every copy waits for, busy
        merged = ladle.uniform_soup(held, device="cuda", chunk_bytes=2**16, allow_nonfinite=True)
    assert_bit_for_bit(merged, expected)


def test_diff_on_cuda_agrees_with_the_cpu(tmp_path):
    # Chunks read on CUDA come in pooled buffers the next read reuses: diff's kernel copies
    # each before it keeps it. float64 sums in another order: equal to 1e-12.
    base, models = llama_like(2, dtype=torch.float64, seed=3)
    paths = save_all([base, *models], tmp_path)
    for kwargs in ({}, {"base": paths[0]}):
        cpu = ladle.diff(paths[1], paths[2], device="cpu", chunk_bytes=64 * 1024, **kwargs)
        gpu = ladle.diff(paths[1], paths[2], device="cuda", chunk_bytes=64 * 1024, **kwargs)
        assert [t.key for t in gpu.tensors] == [t.key for t in cpu.tensors]
        assert gpu.skipped == cpu.skipped == ["steps"]
        for found, expected in zip([*gpu.tensors, gpu.total], [*cpu.tensors, cpu.total]):
            for field in ("norm_a", "norm_b", "norm_diff", "cosine"):
                assert getattr(found, field) == pytest.approx(getattr(expected, field), rel=1e-12)


def test_ratatouille_init_of_tensors_on_cuda_returns_them_on_the_cpu():
    gen = torch.Generator().manual_seed(5)
    aux = {"body.weight": torch.randn(3, 4, generator=gen), "aux_head.weight": torch.ones(2, 4)}
    head = {"head.weight": torch.randn(5, 4, generator=gen)}
    init = ladle.ratatouille_init(
        {k: v.cuda() for k, v in aux.items()},
        {k: v.cuda() for k, v in head.items()},
        drop=["aux_head.*"],
    )
    assert list(init) == ["body.weight", "head.weight"]
    assert all(tensor.device.type == "cpu" for tensor in init.values())
    assert torch.equal(init["body.weight"], aux["body.weight"])
    assert torch.equal(init["head.weight"], head["head.weight"])
