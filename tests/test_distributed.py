"""ladle.distributed: averaging across ranks and merges split across processes (gloo, CPU).

The spawned tests start one group of 3 processes that runs every check, each rank saving
what it found; the assertions run here, against single-process merges and hand-worked means.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_bit_for_bit, leftover
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

import ladle
from ladle import distributed
from ladle.distributed import (
    _buckets,
    _rank_weights,
    _scaled,
    _ShardWriter,
    _torchrun_group,
    average_,
    merge,
    split_by_bytes,
)
from ladle.methods.soup import normalized_weights
from ladle.writer import OLD_MARK, TEMP_MARK

WORLD = 3
CHUNK = 64  # bytes: tensors are read in several chunks of rows
SHARD = 160  # bytes: each rank writes several shards

SHAPES = {
    "embed.weight": ((12, 4), torch.float32),
    "layer.weight": ((6, 4), torch.float32),
    "layer.bias": ((6,), torch.bfloat16),
    "norm.weight": ((5,), torch.float64),
    "empty": ((0, 3), torch.float32),
    "scalar": ((), torch.float32),
    "head.weight": ((3, 6), torch.float16),
}

# name -> (method, keyword arguments besides models); "base" is filled in with the base path.
MERGES = {
    "ties-global": ("ties", {"base": True, "density": 0.3, "trim": "global"}),
    "ties-tensor": ("ties", {"base": True, "density": 0.4, "trim": "tensor", "scale": 0.5}),
    "stock": ("model_stock", {"base": True}),
    "soup": ("uniform_soup", {"weights": [1.0, 2.0, 3.0]}),
    "dare-ties": ("dare", {"base": True, "density": 0.5, "combine": "ties", "seed": 3}),
    "slerp": ("slerp", {"t": 0.3}),  # of the first two models
}


def _models(root: Path) -> tuple[str, list[str]]:
    """A base and three fine-tunings with keys of several dtypes and an integer buffer."""
    gen = torch.Generator().manual_seed(8)
    paths = []
    for i in range(4):
        model = {k: torch.randn(s, generator=gen).to(d) for k, (s, d) in SHAPES.items()}
        model["bn.num_batches_tracked"] = torch.tensor(10 + i)
        path = root / f"model{i}.safetensors"
        save_file(model, path)
        paths.append(str(path))
    return paths[0], paths[1:]


def _kwargs(extra: dict, base: str) -> dict:
    return {**extra, "base": base} if "base" in extra else dict(extra)


def _inputs(method: str, models: list[str]) -> list[str]:
    """The models a method of :data:`MERGES` merges: SLERP interpolates the first two."""
    return models[:2] if method == "slerp" else models


# --- without a process group ------------------------------------------------------------------


@given(st.lists(st.integers(0, 1000), max_size=30), st.integers(1, 5))
def test_split_by_bytes_is_contiguous_and_balanced_within_the_largest_key(sizes, parts):
    keys = {f"k{i}": size for i, size in enumerate(sizes)}
    split = split_by_bytes(keys, parts)
    assert len(split) == parts
    assert [key for part in split for key in part] == list(keys)
    total, largest = sum(sizes), max(sizes, default=0)
    if total:
        for part in split:
            assert abs(sum(keys[k] for k in part) - total / parts) <= largest


def test_split_by_bytes_puts_each_key_in_the_part_holding_its_midpoint():
    # Midpoints 5 and 15 of 20 bytes: halves 0 and 1 (the ends, 10 and 20, both fall in 1).
    assert split_by_bytes({"a": 10, "b": 10}, 2) == [["a"], ["b"]]
    # Midpoints 1, 6 and 15 of 20 bytes: thirds 0, 0 and 2; the middle third holds none.
    assert split_by_bytes({"a": 2, "b": 8, "c": 10}, 3) == [["a", "b"], [], ["c"]]


@pytest.mark.parametrize(
    ("sizes", "parts", "error", "message"),
    [
        ([100, 200], 2, TypeError, "sizes: expected a mapping of keys to bytes, found list"),
        ({"a": "100"}, 2, TypeError, "sizes['a']: expected bytes (an int), found str"),
        ({"a": True}, 2, TypeError, "sizes['a']: expected bytes (an int), found bool"),
        ({"a": -1}, 2, ValueError, "sizes['a']: expected at least 0 bytes, found -1"),
        ({"a": 1}, 2.0, TypeError, "parts: expected an int, found float"),
        ({"a": 1}, "2", TypeError, "parts: expected an int, found str"),
    ],
)
def test_split_by_bytes_names_what_is_wrong(sizes, parts, error, message):
    # An AttributeError ('list' object has no attribute 'values') or torch-free TypeErrors
    # naming neither argument.
    with pytest.raises(error) as info:
        split_by_bytes(sizes, parts)
    assert str(info.value) == message


def test_split_by_bytes_rejects_no_parts():
    with pytest.raises(ValueError, match="parts"):
        split_by_bytes({"a": 1}, 0)


def test_merge_without_a_process_group_is_the_plain_merge(tmp_path):
    base, models = _models(tmp_path)
    out = merge(ladle.ties, models, base=base, out=tmp_path / "out", density=0.3, device="cpu")
    expected = ladle.ties(models, base, density=0.3, device="cpu")
    merged = ladle.load(out)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_merge_rejects_unknown_names_and_greedy_selection(tmp_path):
    with pytest.raises(ValueError, match="method: expected one of .*'soup', 'stock'.*'souup'"):
        merge("souup", [], out=tmp_path / "out")
    with pytest.raises(ValueError, match="greedy_soup .* cannot be split"):
        merge(ladle.greedy_soup, [], out=tmp_path / "out")
    with pytest.raises(ValueError, match="greedy_soup .* cannot be split"):
        merge("greedy-soup", [], out=tmp_path / "out")
    # A partial's own selection="greedy" was not read: the greedy ratatouille ran, wrote
    # out, and merge then raised a bare TypeError on its GreedySoupResult.
    greedy = functools.partial(ladle.ratatouille, selection="greedy", evaluate=lambda sd: 0.0)
    for method in (greedy, functools.partial(greedy, strict=True)):
        with pytest.raises(ValueError, match="ratatouille .* cannot be split"):
            merge(method, [{"w": torch.ones(2)}] * 2, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    uniform = functools.partial(greedy, selection="uniform")  # the outer partial's choice
    with pytest.raises(ValueError, match="^evaluate: used only with selection='greedy'"):
        merge(uniform, [{"w": torch.ones(2)}] * 2, out=tmp_path / "out")  # ratatouille's own


@pytest.mark.parametrize(
    ("short", "name", "extra"),
    [
        ("soup", "uniform_soup", {}),
        ("stock", "model_stock", {"base": True}),
        ("task-arithmetic", "task_arithmetic", {"base": True, "scale": 0.5}),
        ("model-stock", "model_stock", {"base": True}),
        ("slerp", "slerp", {}),
    ],
)
def test_merge_accepts_the_names_recipes_and_the_cli_use(tmp_path, short, name, extra):
    base, models = _models(tmp_path)
    with warnings.catch_warnings():  # Model Stock's 0-dim key sits at t's clamp
        warnings.simplefilter("ignore", ladle.ModelStockWarning)
        models = _inputs(name, models)
        out = merge(short, models, out=tmp_path / "out", device="cpu", **_kwargs(extra, base))
        expected = getattr(ladle, name)(models, device="cpu", **_kwargs(extra, base))
    merged = ladle.load(out)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="ratatouille .* cannot be split"):
        merge("ratatouille", [], out=tmp_path / "out", selection="greedy")


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("committed", r"already committed \(its output is in place\)"),
        ("aborted", r"already aborted \(its temporary output is deleted\)"),
    ],
)
def test_a_rank_s_shard_writer_that_has_ended_refuses_a_write_saying_how(tmp_path, how, said):
    """After its shards were committed, a write failed an assert (AssertionError); after an
    abort, it began the next shard, whose temporary file was left behind."""
    specs = {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}  # a shard each
    options = {"metadata": {}, "max_shard_size": 8, "extra_files": None, "empty_shard": False}
    writer = _ShardWriter(tmp_path, "rank00000", specs, **options)
    with contextlib.suppress(RuntimeError), writer:
        writer.write("a", torch.ones(2))
        if how == "aborted":
            raise RuntimeError("the merge failed")
        writer.write("b", torch.ones(2))
    files = sorted(os.listdir(tmp_path))
    name = re.escape(f"{tmp_path / 'rank00000-'}*.safetensors")
    message = rf"writer for {name}: write\('b'\) on a writer {said}$"
    with pytest.raises(ladle.LadleError, match=message) as caught:
        writer.write("b", torch.ones(2))
    assert type(caught.value) is ladle.LadleError
    assert sorted(os.listdir(tmp_path)) == files
    assert files == (
        [] if how == "aborted" else ["rank00000-00000.safetensors", "rank00000-00001.safetensors"]
    )


def test_a_rank_s_shard_writer_refuses_to_amend_what_it_wrote(tmp_path):
    # Its shards are committed as the merge goes: an amendment would be lost without a word.
    specs = {"a": ((2,), torch.float32)}
    options = {"metadata": {}, "max_shard_size": 8, "extra_files": None, "empty_shard": False}
    with _ShardWriter(tmp_path, "rank00000", specs, **options) as writer:
        writer.write("a", torch.ones(2))
        with pytest.raises(ladle.LadleError) as caught:
            writer.amend("a", torch.tensor([0]), torch.tensor([2.0]))
    assert str(caught.value) == "'a': a merge split across processes cannot amend written tensors"
    assert torch.equal(ladle.load(tmp_path / "rank00000-00000.safetensors")["a"], torch.ones(2))


def test_average_without_a_process_group_names_group():
    with pytest.raises(ValueError, match="group: no process group"):
        average_({"w": torch.ones(2)})


@pytest.fixture
def one_rank(tmp_path):
    """A process group of this process alone (gloo), destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "weights, kind, message",
    [
        ("0.5", TypeError, "weights (rank 0): expected a number, found str"),
        (True, TypeError, "weights (rank 0): expected a number, found bool"),
        (2j, TypeError, "weights (rank 0): expected a number, found complex"),
        (["0.5"], TypeError, "weights[0]: expected a number, found str"),
        (["a"], TypeError, "weights[0]: expected a number, found str"),
        ([None], TypeError, "weights[0]: expected a number, found None"),
        ([True], TypeError, "weights[0]: expected a number, found bool"),  # was weight 1
        (
            np.timedelta64(2, "s"),
            TypeError,
            "weights (rank 0): expected a number, found timedelta64",
        ),
        ([np.timedelta64(2, "s")], TypeError, "weights[0]: expected a number, found timedelta64"),
        ([torch.ones(2)], TypeError, "weights[0]: expected a number, found list"),
        ([1, 2], ValueError, "weights: expected 1 per-rank weights (the group's size), found 2"),
        (  # was a bare OverflowError, on each rank apart
            10**400,
            ValueError,
            "weights (rank 0): expected a number within float's range, found one beyond it",
        ),
        (
            [10**400],
            ValueError,
            "weights[0]: expected a number within float's range, found one beyond it",
        ),
        (
            torch.ones(1, 1),
            TypeError,
            "weights (rank 0): expected a number, found a tensor of shape (1, 1)",
        ),
    ],
)
def test_average_names_a_weight_that_is_no_number_like_the_merge_methods(
    one_rank, weights, kind, message
):
    with pytest.raises(kind) as caught:
        average_({"w": torch.ones(2)}, weights=weights)
    assert str(caught.value) == message


def test_average_refuses_a_lazy_conjugate_whose_mean_would_go_to_a_copy(one_rank):
    z = torch.tensor([1 + 2j], dtype=torch.complex64)
    with pytest.raises(ValueError) as caught:
        average_({"z": z.conj()})
    assert str(caught.value) == (
        "'z': a lazy conjugate (x.conj()) cannot be averaged in place; resolve it first "
        "(x.resolve_conj())"
    )
    negative = {"r": z.conj().imag}  # a negative view is written through: averaged as it is
    assert average_(negative)["r"].tolist() == [-2.0] and negative["r"].is_neg()


def _inference_tensor() -> torch.Tensor:
    with torch.inference_mode():
        return torch.ones(2)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        # BatchNorm's running_var reassigned in a validation pass under inference_mode: the
        # write failed after the collective, leaving the tensors after it unaveraged (and a
        # rank alone failing left the others waiting until the group's timeout)
        (
            _inference_tensor(),
            "'w': an inference tensor (made under torch.inference_mode()) cannot be written "
            "outside it; replace it with a clone made outside it",
        ),
        (torch.eye(2).to_sparse(), "'w': a tensor torch.sparse_coo cannot be averaged in place"),
        (  # was "an expanded tensor ... (.clone())": sparse strides are 0
            torch.empty(2, device="meta"),
            "'w': a tensor on the meta device (no data) cannot be averaged in place",
        ),
    ],
    ids=["inference", "sparse", "meta"],
)
def test_average_refuses_what_it_cannot_write_before_any_data_moves(one_rank, tensor, message):
    state = {"a": torch.ones(2), "w": tensor}
    with pytest.raises(ValueError) as caught:
        average_(state)
    assert str(caught.value) == message


def test_every_rank_s_same_list_of_weights_holding_nan_is_refused_as_not_finite():
    # Gathered lists are copies: [1.0, nan] != [1.0, nan], so the ranks were told that they
    # passed different lists.
    from ladle.distributed import _rank_weights

    with pytest.raises(ValueError, match=r"^weights: expected finite weights"):
        _rank_weights([[1.0, float("nan")], [1.0, float("nan")]], 2)  # two NaN objects


@pytest.mark.parametrize(
    "weights", [2, 0.5, np.float32(2), torch.tensor(2.0), [3], (np.int64(1),), torch.tensor([2.0])]
)
def test_average_takes_numbers_numpy_scalars_and_tensors_as_weights(one_rank, weights):
    state = {"w": torch.tensor([1.0, -2.5])}
    assert torch.equal(average_(state, weights=weights)["w"], torch.tensor([1.0, -2.5]))


@pytest.mark.parametrize("placement", ["shard", "replicate"])
def test_a_dtensor_state_dict_given_to_a_merge_is_refused_saying_how_to_gather_it(
    one_rank, tmp_path, placement
):
    # FSDP2's model.state_dict(): DTensors, whose data pointer is an error. A merge raised
    # torch's "Attempted to access the data pointer on an invalid python storage", save
    # ".numpy() is not supported for tensor subclasses", and load returned the DTensors.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    where = Shard(0) if placement == "shard" else Replicate()
    a = {"w": distribute_tensor(torch.tensor([1.0, 2.0]), mesh, [where]), "b": torch.ones(1)}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.ones(1)}
    gather = r"tensor 'w' is a DTensor \(.*\): gather it first, with \.full_tensor\(\)"
    with pytest.raises(ladle.CheckpointError, match=r"^model 1 \(<state dict>\): " + gather):
        ladle.uniform_soup([b, a])
    with pytest.raises(ladle.CheckpointError, match=r"^b: " + gather):
        ladle.add(b, a)
    with pytest.raises(ladle.CheckpointError, match=r"^<state dict>: " + gather):
        ladle.load(a)
    with pytest.raises(ValueError, match=r"^state_dict: " + gather):
        ladle.save(a, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    # torch.save of such a state dict: "not a readable torch file (Attempted to access ...)".
    torch.save(a, tmp_path / "fsdp.pt")
    with pytest.raises(
        ladle.CheckpointError, match=re.escape(f"{tmp_path / 'fsdp.pt'}: ") + gather
    ):
        ladle.uniform_soup([b, tmp_path / "fsdp.pt"])


def test_a_group_that_is_no_process_group_is_a_type_error(tmp_path):
    a = {"w": torch.ones(2)}
    for group in (3, "world", -100.0):  # D03: any int (the outside marker is one) passed
        with pytest.raises(TypeError, match="^group: expected a torch.distributed ProcessGroup"):
            merge("uniform_soup", [a, a], out=tmp_path / "m", group=group)


def test_average_writes_an_inference_tensor_inside_inference_mode(one_rank):
    # Refused outside inference_mode only (D10: refused inside it too, where it is writable).
    with torch.inference_mode():
        state = {"w": torch.full((2,), 3.0)}
        assert average_(state)["w"].tolist() == [3.0, 3.0]


def test_average_takes_a_dimension_of_one_with_stride_0_which_is_no_expansion(one_rank):
    state = {"w": torch.tensor([1.0, 2.0, 3.0]).as_strided((1, 3), (0, 1))}
    assert average_(state)["w"].tolist() == [[1.0, 2.0, 3.0]]  # D11: "an expanded tensor"


def test_ranks_passing_lists_of_weights_of_different_lengths_are_refused():
    # [1, 2] and [1, 2, 3] agree where both have weights; they are no same list (D18).
    with pytest.raises(ValueError, match="^weights: every rank must pass its own weight"):
        _rank_weights([[1.0, 2.0], [1.0, 2.0, 3.0]], 2)


def test_a_rank_s_early_failure_without_a_message_still_stops_the_merge(one_rank, tmp_path):
    # An exception with no message (one_line gives "") was taken for no failure: the others
    # went on to the merge, and waited for this rank in its first reduction.
    out = tmp_path / "out"
    assert distributed._shared_temporary(out, dist.group.WORLD, "", {}) == "rank 0: "
    assert not [p for p in os.listdir(tmp_path) if p.lstrip(".").startswith("out")]


def test_a_split_merge_s_share_is_its_output_alone(one_rank, tmp_path):
    # A method's own intermediate merge to another file runs whole (D66: it was split too,
    # each rank writing part of it).
    share = distributed._Share(dist.group.WORLD, tmp_path / "tmp", tmp_path / "out")
    assert share.writes(tmp_path / "out") and share.writes(str(tmp_path / "out"))
    assert not share.writes(tmp_path / "step.safetensors")
    assert not share.writes(None)


# --- spawned: 3 gloo processes ----------------------------------------------------------------


def _catch(function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except Exception as err:
        return type(err).__name__, str(err)
    return None


def _averages(rank: int) -> dict:
    found: dict = {}
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    gen = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
    module[1].num_batches_tracked.fill_(100 + rank)
    found["before"] = {k: v.clone() for k, v in module.state_dict().items()}
    found["module"] = average_(module).state_dict()
    state = {
        "exact": torch.full((4,), rank + 1.0),
        "half": torch.full((3,), 2.0 * rank, dtype=torch.bfloat16),
        "wide": torch.full((2,), rank + 0.25, dtype=torch.float64),
        "complex": torch.full((2,), complex(rank, -rank), dtype=torch.complex64),
        "mask": torch.tensor([rank == 0, rank == 1]),
    }
    found["own_weight"] = average_({k: v.clone() for k, v in state.items()}, weights=rank + 1.0)
    found["rank_weights"] = average_({k: v.clone() for k, v in state.items()}, weights=[1, 2, 3])
    # Weights far from 1 (finite, their sum non-zero): float32 must neither underflow nor
    # overflow on them. Powers of two times 1, 2, 3 give the means of 1, 2, 3 exactly.
    for field, factor in (("tiny_weights", 2.0**-160), ("huge_weights", 2.0**130)):
        found[field] = average_({"exact": state["exact"].clone()}, weights=(rank + 1) * factor)
    found["small_weights"] = average_({"exact": state["exact"].clone()}, weights=1e-46)
    # A metric's value as a weight: a 0-d tensor, a numpy scalar; per-rank weights as a tensor.
    for field, weights in (
        ("tensor_weight", torch.tensor(rank + 1.0)),
        ("numpy_weight", np.float32(rank + 1)),
        ("tensor_weights", torch.tensor([1.0, 2.0, 3.0])),
    ):
        found[field] = average_({"exact": state["exact"].clone()}, weights=weights)
    odd = {"exact": torch.ones(4)} if rank != 2 else {"exact": torch.ones(5)}
    found["shape_error"] = _catch(average_, odd)
    # One rank alone fails before any collective (not a module or a state dict): every rank
    # must raise, where the others waited for it until the group's timeout.
    found["one_rank_error"] = _catch(average_, [1.0] if rank == 2 else {"exact": torch.ones(4)})
    # Integer dtypes gloo cannot broadcast as they are; values past int64's range for uint64.
    ints = {
        "i16": torch.tensor([-3 - rank, 7], dtype=torch.int16),
        "u16": torch.tensor([65535 - rank], dtype=torch.uint16),
        "u32": torch.tensor([2**32 - 1 - rank], dtype=torch.uint32),
        "u64": torch.tensor([2**64 - 1 - rank, rank], dtype=torch.uint64),
        "w": torch.full((2,), float(rank)),
    }
    found["integers"] = average_(ints)
    # A module on one rank, its state dict (other order: buffers after each layer's weights)
    # on another: matched by name.
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float(rank))
    average_(net if rank == 0 else net.state_dict())  # the state dict shares net's storage
    found["mixed"] = {k: v.clone() for k, v in net.state_dict().items()}
    found["weights_error"] = _catch(average_, {"w": torch.ones(1)}, weights=[1.0, -1.0, 0.0])
    # An expanded tensor (rank 1's alone) cannot take its mean: refused before any data moves.
    # Its write failed after the collective: 'a' averaged, 'c' not, a RuntimeError from torch.
    b = torch.tensor([float(rank)])
    overlapping = {
        "a": torch.full((2,), float(rank)),
        "b": b.expand(3) if rank == 1 else b.repeat(3),
        "c": torch.full((2,), float(rank)),
    }
    found["overlap_error"] = _catch(average_, overlapping)
    found["overlap_kept"] = {k: v.clone() for k, v in overlapping.items()}
    # A NaN on a rank of weight 0 reaches every rank (0·NaN is NaN); zeroed first, the rank
    # adds exact zeros and takes the others' mean (docs/distributed.md).
    held = torch.tensor([rank + 1.0, float("nan") if rank == 2 else 4.0])
    found["nan_weight_0"] = average_({"w": held.clone()}, weights=0.0 if rank == 2 else 1.0)
    zeroed = {"w": held.clone().zero_() if rank == 2 else held.clone()}
    found["zeroed_weight_0"] = average_(zeroed, weights=0.0 if rank == 2 else 1.0)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    flat = init_device_mesh("cpu", (WORLD,))
    value = torch.arange(6.0) * (rank + 1)  # each rank's own (local) replica
    replicated = distribute_tensor(torch.zeros(6), flat, [Replicate()])
    replicated.to_local().copy_(value)
    found["dtensor_replicate"] = average_({"w": replicated})["w"].to_local().clone()
    sharded = distribute_tensor(torch.zeros(6), flat, [Shard(0)])
    found["dtensor_shard_error"] = _catch(average_, {"w": sharded})
    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    hsdp = distribute_tensor(torch.zeros(6), mesh, [Replicate(), Shard(0)])
    hsdp.to_local().copy_(value)
    average_({"w": hsdp}, group=mesh.get_group("replicate"))
    found["dtensor_hsdp"] = hsdp.to_local().clone()
    # Sharded over a named mesh dimension; and over the whole world averaged in a pair of it.
    over = distribute_tensor(torch.zeros(6), mesh, [Shard(0), Replicate()])
    found["dtensor_named_error"] = _catch(average_, {"w": over})
    # A group without rank 2: its members average, rank 2 is told it is not a member.
    pair = dist.new_group([0, 1])
    found["non_member"] = _catch(average_, {"w": torch.full((2,), float(rank))}, group=pair)
    if rank != 2:
        found["dtensor_pair_error"] = _catch(average_, {"w": sharded}, group=pair)
    if rank == 2:
        found["non_member_merge"] = _catch(merge, "uniform_soup", [], out="unused", group=pair)
    # float64 beside float32 (by name, the float32 last): each in a bucket of its own dtype.
    two = {
        "a64": torch.tensor([1.0 + (rank + 1) * 2.0**-40], dtype=torch.float64),
        "b32": torch.full((2,), float(rank)),
    }
    found["mixed_dtypes"] = average_(two)
    # Keys only one rank holds, and a dtype only one rank holds: named on every rank.
    keys = ["w", "a", "b", "c", "d"] if rank == 2 else ["w"]
    found["keys_error"] = _catch(average_, {k: torch.ones(1) for k in keys})
    dtype = torch.float64 if rank == 2 else torch.float32
    found["dtype_error"] = _catch(average_, {"w": torch.ones(1, dtype=dtype)})
    # Weights of both signs, far apart: scaled by the largest magnitude, 2¹³⁰, not by the
    # largest weight, 2⁻¹⁵⁹, which takes −2¹³⁰ past float32's range.
    signed = (2.0**-160, 2.0**-159, -(2.0**130))[rank]
    found["signed_weights"] = average_({"exact": torch.full((4,), rank + 1.0)}, weights=signed)
    # A group without global rank 0: integers come from its own first rank, global rank 1.
    others = dist.new_group([1, 2])
    if rank != 0:
        ints = {"n": torch.tensor([10 + rank]), "w": torch.tensor([float(rank)])}
        found["without_rank_0"] = average_(ints, group=others)
    return found


_SHARED_TEMPORARY = distributed._shared_temporary


def _elsewhere_on_rank_2(out: Path | None, *args: object) -> Path | str:
    """The shared temporary directory, as rank 2 would name it on a filesystem of its own."""
    directory = _SHARED_TEMPORARY(out, *args)
    if isinstance(directory, str) or dist.get_rank() != 2:
        return directory
    return directory.with_name(directory.name + "-elsewhere")


def normalized(models: list, out: Path | None = None, **kwargs: object) -> object:
    """A method of a user's own: a statistic over every key from a merge in memory (the
    soup's norm), then the merge it writes."""
    soup = ladle.uniform_soup(models, device="cpu")
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in soup.values()))
    return ladle.task_arithmetic(models[1:], models[0], scale=1 / norm, out=out, **kwargs)


def written_twice(models: list, out: Path, **kwargs: object) -> object:
    """A method of a user's own that writes its output twice."""
    ladle.uniform_soup(models, out=out, **kwargs)
    return ladle.uniform_soup(models, out=out, overwrite=True, **kwargs)


def _merges(rank: int, root: Path, base: str, models: list[str]) -> dict:
    found: dict = {}
    # The in-memory soup ran on this rank's keys alone: each rank scaled by another norm.
    merge(normalized, models, out=root / "custom", device="cpu", chunk_bytes=CHUNK)
    # Its second merge wrote shards under the first's names: "already exists" (overwrite=True)
    found["written_twice_error"] = _catch(
        merge, written_twice, models, out=root / "written_twice", device="cpu"
    )
    for name, (method, extra) in MERGES.items():
        out = merge(
            method,
            _inputs(method, models),
            out=root / name,
            device="cpu",
            chunk_bytes=CHUNK,
            max_shard_size=SHARD,
            **_kwargs(extra, base),
        )
        found[name] = str(out)
    # An existing output is refused on every rank; with overwrite it is replaced.
    merge(ladle.uniform_soup, models, out=root / "again", device="cpu")
    found["exists_error"] = _catch(merge, ladle.uniform_soup, models, out=root / "again")
    merge(ladle.uniform_soup, models[:2], out=root / "again", overwrite=True, device="cpu")
    # Torch files of a tied model (head = embedding, one tensor): the ranks holding the head
    # neither rank it nor vote with it, as the rank holding the embedding does.
    tied = [str(root / f"tied{i}.pt") for i in range(3)]
    for name, method, extra in (
        ("tied_ties", ladle.ties, {"density": 0.5}),
        ("tied_dare", ladle.dare, {"density": 1.0, "combine": "ties"}),
    ):
        merge(method, tied[1:], base=tied[0], out=root / name, device="cpu", **extra)
    # DARE's sign ties with combine="ties": one key a rank, the tie's rank outvoted (VOTE).
    vote = [str(root / f"vote{i}.safetensors") for i in range(3)]
    merge(ladle.dare, vote[1:], base=vote[0], out=root / "vote_dare", device="cpu", **VOTED)
    # One floating key: two of three ranks hold no floating key, yet join TIES's reductions.
    tiny = [str(root / f"tiny{i}.safetensors") for i in range(4)]
    merge(ladle.ties, tiny[1:], base=tiny[0], out=root / "tiny", density=0.5, device="cpu")
    # A failure on one rank (NaN in the last key, merged by the last rank) fails them all.
    found["nan_error"] = _catch(merge, "uniform_soup", [root / "nan.safetensors"], out=root / "nan")
    found["device_error"] = _catch(merge, "uniform_soup", models, out=root / "dev", device="tpu")
    # Folders made above an output that is never written go with it, as in one process: a
    # failed merge's, and those of an output refused inside an input's folder.
    nan_deep = root / "made" / "deep" / "nan"
    found["made_nan_error"] = _catch(
        merge, "uniform_soup", [root / "nan.safetensors"], out=nan_deep
    )
    inside = root / "input_dir" / "made" / "merged"
    found["inside_error"] = _catch(merge, "uniform_soup", [root / "input_dir", *models], out=inside)
    # Beside an output with leftovers of another host and of a process gone from this one.
    merge("uniform_soup", models, out=root / "hosts" / "soup", device="cpu")
    # Also where the others wait in a reduction (TIES's threshold pass, DARE's vote pass)
    # when it fails: they stop there, not at the process group's timeout.
    nan, nan_base = [root / "nan.safetensors"], root / "nan_base.safetensors"
    for name, method, extra in (
        ("ties_nan_error", "ties", {"density": 0.5}),
        ("dare_nan_error", "dare", {"density": 0.5, "combine": "ties"}),
    ):
        found[name] = _catch(merge, method, nan, base=nan_base, out=root / name, **extra)
    # Allowed, the NaN is merged (the vote pass of a split DARE-TIES is told so too).
    merge(
        "dare",
        nan,
        base=nan_base,
        out=root / "dare_nonfinite_allowed",
        device="cpu",
        density=0.5,
        combine="ties",
        allow_nonfinite=True,
    )
    # Only rank 0 shows a progress bar; one key makes one shard, named as a single file;
    # a single-file output is refused on every rank.
    bars: list[int] = []

    class Bar:
        def __init__(self, **kwargs: object) -> None:
            bars.append(rank)

        def update(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

    merge("uniform_soup", models, out=root / "bars", device="cpu", progress=Bar)
    found["bars"] = len(bars)
    one_key = [root / "one_key.safetensors"] * 2
    merge("uniform_soup", one_key, out=root / "one_key", device="cpu")
    merge("uniform_soup", [root / "no_keys.safetensors"] * 2, out=root / "no_keys", device="cpu")

    # Rank 0's renaming fails (another process put a folder at the output meanwhile): rank 0
    # raises its own error, the others hear of it.
    def taken(models: list, *, out: Path, **params: object) -> object:
        merged = ladle.uniform_soup(models, out=out, **params)
        # Every rank past its own check that the output is free: without this, a rank that
        # came to it after rank 0 made the folder raised "already exists" (1 run in 6).
        dist.barrier()
        if rank == 0:
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
        return merged

    found["taken_error"] = _catch(merge, taken, models, out=root / "taken", device="cpu")

    def unwritten(models: list, *, out: Path, **params: object) -> Path:
        return out  # writes nothing through ladle.engine.merge

    found["unwritten_error"] = _catch(merge, unwritten, models, out=root / "unwritten")
    # Keys "x", "y", "z" go to ranks 0, 1, 2: "y" and "z" hold NaN; the first is named.
    twice = [root / "nan_twice.safetensors"]
    found["twice_error"] = _catch(merge, "uniform_soup", twice, out=root / "twice", device="cpu")
    # Rank 0's temporary directory, not on rank 2's filesystem: refused on every rank.
    with mock.patch.object(distributed, "_shared_temporary", _elsewhere_on_rank_2):
        found["unseen_error"] = _catch(
            merge, "uniform_soup", models, out=root / "unseen", device="cpu"
        )
    # Rank 0 cannot make the temporary directory (beside a file, not in a folder): every
    # rank hears of it, none waits for it.
    found["parent_error"] = _catch(
        merge, "uniform_soup", models, out=root / "nan.safetensors" / "out", device="cpu"
    )
    # On a group without global rank 0, into folders not made yet: the group's rank 0 (global
    # rank 1) makes them, and names the shards.
    later = dist.new_group([1, 2])
    if rank != 0:
        found["merge_without_rank_0"] = _catch(
            merge,
            "uniform_soup",
            models,
            out=root / "new" / "dir" / "soup",
            group=later,
            device="cpu",
        )
    found["file_out_error"] = _catch(
        merge, "uniform_soup", models, out=root / "m.safetensors", device="cpu"
    )
    (aside,) = (root / "kept").glob(".remerged.ladle-old-*")  # an earlier output left
    found["leftover_input_error"] = _catch(  # by a stopped write, merged back
        merge, "uniform_soup", [str(aside), models[0]], out=root / "kept" / "remerged", device="cpu"
    )
    # hf:// sources, offline, each rank with a Hub cache of its own: rank 2's main is another
    # commit than the others' (refused on every rank before anything is merged); a named
    # commit, which every cache holds, is merged.
    cache = root / ("hub-b" if rank == 2 else "hub-a")
    with mock.patch.dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache)):
        found["commits_error"] = _catch(
            merge, "uniform_soup", ["hf://org/m", models[0]], out=root / "commits", device="cpu"
        )
        at = f"hf://org/m@{HUB_COMMITS[0]}"
        merge("ties", [at, models[0]], base=base, out=root / "commit", device="cpu", density=0.5)
    return found


HUB_COMMITS = ("a" * 40, "b" * 40)
HUB_MODELS = [
    {
        **{k: torch.full(s, float(i + 1), dtype=d) for k, (s, d) in SHAPES.items()},
        "bn.num_batches_tracked": torch.tensor(20 + i),
    }
    for i in range(2)
]


def _worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(  # a short timeout: a hang fails the test within a minute
        "gloo",
        init_method=f"file://{root}/rendezvous",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        base, models = (
            str(Path(root) / "model0.safetensors"),
            [str(Path(root) / f"model{i}.safetensors") for i in range(1, 4)],
        )
        found = {**_merges(rank, Path(root), base, models), **_averages(rank)}
        torch.save(found, Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    base, models = _models(root)
    nan = {"a": torch.ones(64), "z": torch.tensor([1.0, float("nan")])}
    save_file(nan, root / "nan.safetensors")
    save_file({"a": torch.zeros(64), "z": torch.zeros(2)}, root / "nan_base.safetensors")
    for i in range(4):
        tiny = {
            "w": torch.randn(8, generator=torch.Generator().manual_seed(i)),
            "n": torch.tensor(i),
        }
        save_file(tiny, root / f"tiny{i}.safetensors")
    save_file({"w": torch.arange(4.0)}, root / "one_key.safetensors")
    (root / "input_dir").mkdir()
    shutil.copy(models[0], root / "input_dir" / "model.safetensors")
    save_file({}, root / "no_keys.safetensors")
    nan_twice = {
        k: torch.tensor([1.0, v]) for k, v in (("x", 2.0), ("y", math.nan), ("z", math.nan))
    }
    save_file(nan_twice, root / "nan_twice.safetensors")
    for i, (a, b) in enumerate(VOTE):
        save_file({"a": torch.tensor(a), "b": torch.tensor(b)}, root / f"vote{i}.safetensors")
    for i, (emb, body) in enumerate(TIED):  # as test_ties's hand-worked vote, one key a rank
        embedding = torch.tensor(emb)
        torch.save(
            {"emb": embedding, "body": torch.tensor(body), "head": embedding}, root / f"tied{i}.pt"
        )
    # org/m in two Hub caches: main is commit a in one, b in the other, which holds a too.
    from test_hub import write_cached_repo

    for commit, model in zip(HUB_COMMITS, HUB_MODELS):
        files = {"model.safetensors": safetensors_bytes(model)}
        write_cached_repo(root / "hub-a", "org/m", commit, files, refs={"main": HUB_COMMITS[0]})
        write_cached_repo(root / "hub-b", "org/m", commit, files, refs={"main": commit})
    (root / "hosts").mkdir()
    theirs = leftover(root / "hosts" / "soup", host="node-b.example")
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"being written on node-b")
    leftover(root / "hosts" / "soup").mkdir()
    aside = leftover(root / "kept" / "remerged", mark=OLD_MARK)
    aside.mkdir(parents=True)
    shutil.copy(models[0], aside / "model.safetensors")
    mp.spawn(_worker, args=(str(root),), nprocs=WORLD)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return root, base, models, ranks


@pytest.mark.slow
def test_a_split_merge_that_writes_nothing_removes_the_folders_it_made(spawned):
    # Rank 0 made the folders above out, and left them: new/deep/ after a failed merge, and
    # made/ inside an input's folder (refused as inside an input, but made there first).
    root, *_, ranks = spawned
    for found in ranks:
        assert "holds NaN or Inf" in found["made_nan_error"][1], found["made_nan_error"]
        assert "inside input" in found["inside_error"][1], found["inside_error"]
    assert not (root / "made").exists()
    assert os.listdir(root / "input_dir") == ["model.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MERGES))
def test_split_merge_equals_single_process_merge_bit_for_bit(spawned, name):
    root, base, models, ranks = spawned
    method, extra = MERGES[name]
    with warnings.catch_warnings():  # Model Stock's 0-dim key sits at t's clamp
        warnings.simplefilter("ignore", ladle.ModelStockWarning)
        expected = getattr(ladle, method)(
            _inputs(method, models), device="cpu", chunk_bytes=CHUNK, **_kwargs(extra, base)
        )
    assert all(found[name] == str(root / name) for found in ranks)
    merged = ladle.load(root / name)
    assert list(merged) == list(expected)
    for key in expected:
        assert merged[key].dtype == expected[key].dtype, key
        assert torch.equal(merged[key], expected[key]), key


@pytest.mark.slow
def test_a_method_s_own_steps_run_whole_in_a_split_merge_and_it_writes_once(spawned, tmp_path):
    root, _, _, ranks = spawned
    models = [str(root / f"model{i}.safetensors") for i in range(1, 4)]
    expected = ladle.load(normalized(models, out=tmp_path / "custom", chunk_bytes=CHUNK))
    merged = ladle.load(root / "custom")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    for found in ranks:
        assert found["written_twice_error"] == (
            "LadleError",
            f"{root / 'written_twice'}: a split merge writes its output once; the method "
            "merged into it twice",
        )
    assert not (root / "written_twice").exists()


TIED = [  # base, two models: the embedding elects + on 6 entries, the body − on 8 and ties on 1
    ([0.0] * 6, [0.0] * 9),
    ([1.0] * 6, [-1.0] * 8 + [1.0]),
    ([1.0] * 6, [-1.0] * 9),
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tied_ties", "tied_dare"])
def test_split_merge_counts_a_tied_tensor_once_wherever_its_names_are(spawned, name):
    # Counted once, 6 − 8 votes: the body's tie takes the negative mean, −1 (twice: +1).
    root, *_ = spawned
    merged = ladle.load(root / name)
    assert merged["body"].tolist() == [-1.0] * 9
    assert merged["emb"].tolist() == merged["head"].tolist() == [1.0] * 6
    tied = [root / f"tied{i}.pt" for i in range(3)]
    method, extra = (
        (ladle.ties, {"density": 0.5})
        if name == "tied_ties"
        else (ladle.dare, {"density": 1.0, "combine": "ties"})
    )
    assert_bit_for_bit(merged, method(tied[1:], tied[0], device="cpu", **extra))


@pytest.mark.slow
def test_split_merge_with_ranks_holding_no_keys_equals_single_process(spawned):
    root, *_ = spawned
    tiny = [str(root / f"tiny{i}.safetensors") for i in range(4)]
    expected = ladle.ties(tiny[1:], tiny[0], density=0.5, device="cpu")
    merged = ladle.load(root / "tiny")
    # "n" (8 bytes) goes to rank 0, "w" (32 bytes) to rank 1, nothing to rank 2.
    assert sorted(os.listdir(root / "tiny")) == [
        "README.md",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_split_merge_writes_hf_shards_index_and_card_and_no_leftovers(spawned):
    root, *_ = spawned
    names = sorted(os.listdir(root / "ties-global"))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > WORLD  # several shards per rank at 160 bytes
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert {"README.md", "model.safetensors.index.json"} <= set(names)
    with ladle.open_checkpoint(root / "ties-global") as checkpoint:
        assert checkpoint.metadata["ladle.method"] == "ties"
    assert not [p for p in os.listdir(root) if "ladle-tmp" in p or "ladle-old" in p]


@pytest.mark.slow
def test_rank_0_removes_the_leftovers_of_its_own_host_only(spawned):
    # On a filesystem several nodes mount, rank 0 deleted another node's temporary output
    # (a merge still running there) whenever no process of its own node had its writer's id.
    root, *_ = spawned
    kept = [name for name in os.listdir(root / "hosts") if TEMP_MARK in name]
    assert len(kept) == 1  # the one of this host whose process is gone was removed
    assert (
        root / "hosts" / kept[0] / "model.safetensors"
    ).read_bytes() == b"being written on node-b"
    assert sorted(os.listdir(root / "hosts")) == sorted(["soup", kept[0]])


@pytest.mark.slow
def test_split_merge_errors_reach_every_rank_and_leave_no_output(spawned):
    root, _, models, ranks = spawned
    for found in ranks:
        kind, message = found["exists_error"]
        assert kind == "LadleError" and "already exists" in message
    assert torch.equal(
        ladle.load(root / "again")["embed.weight"], ladle.uniform_soup(models[:2])["embed.weight"]
    )
    for name in ("nan_error", "ties_nan_error", "dare_nan_error"):
        kinds = [found[name][0] for found in ranks]
        assert kinds.count("NonFiniteError") == 1, name  # the rank that merged key "z"
        assert all("'z'" in found[name][1] for found in ranks), name
        assert ranks[0][name][1].startswith(f"rank {WORLD - 1}: "), name
    assert not [p for p in os.listdir(root) if "nan" in p and "safetensors" not in p]


@pytest.mark.slow
def test_split_dare_ties_allowed_nonfinite_merges_a_nan_as_one_process_does(spawned):
    root, *_ = spawned
    expected = ladle.dare(
        [root / "nan.safetensors"],
        root / "nan_base.safetensors",
        density=0.5,
        combine="ties",
        allow_nonfinite=True,
        device="cpu",
    )
    merged = ladle.load(root / "dare_nonfinite_allowed")
    assert list(merged) == list(expected) == ["a", "z"]
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=0, equal_nan=True)
    assert merged["z"][1].isnan()


@pytest.mark.slow
def test_average_module_is_the_mean_on_every_rank_and_broadcasts_integers(spawned):
    *_, ranks = spawned
    for key in ranks[0]["before"]:
        if key.endswith("num_batches_tracked"):
            assert all(found["module"][key] == 100 for found in ranks)
            continue
        mean = sum(found["before"][key].double() for found in ranks) / WORLD
        for found in ranks:
            assert torch.equal(found["module"][key], ranks[0]["module"][key])
            torch.testing.assert_close(found["module"][key].double(), mean, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_average_weights_per_rank_and_own_weight_agree_with_hand_worked_means(spawned):
    *_, ranks = spawned
    # ranks hold 1, 2, 3 (exact), 0, 2, 4 (bf16), 0.25, 1.25, 2.25 (f64); weights 1, 2, 3
    for field in ("own_weight", "rank_weights"):
        for found in ranks:
            state = found[field]
            assert torch.equal(state["exact"], torch.full((4,), 14.0 / 6.0))
            assert state["half"].dtype == torch.bfloat16
            assert torch.equal(state["half"], torch.full((3,), 16.0 / 6.0).to(torch.bfloat16))
            assert torch.equal(state["wide"], torch.full((2,), 9.5 / 6.0, dtype=torch.float64))
            assert torch.equal(state["complex"], torch.full((2,), complex(8 / 6, -8 / 6)))
            assert state["mask"].tolist() == [True, False]  # rank 0's


@pytest.mark.slow
def test_a_rank_outside_the_group_is_told_so(spawned):
    *_, ranks = spawned
    assert ranks[0]["non_member"] is None and ranks[1]["non_member"] is None
    # Before: "Invalid process group specified" from average_, and from merge a TypeError,
    # "cannot unpack non-iterable NoneType object" (torch skips collectives on non-members).
    for field in ("non_member", "non_member_merge"):
        kind, message = ranks[2][field]
        assert kind == "ValueError", field
        assert message.startswith("group: this process (global rank 2) is not a member"), field


@pytest.mark.slow
def test_average_weights_far_from_one_neither_underflow_nor_overflow(spawned):
    *_, ranks = spawned
    # Before: the weights were multiplied in float32: 2⁻¹⁶⁰ and 1e-46 became 0 (0/0: NaN),
    # 2¹³⁰ became Inf (Inf/Inf: NaN).
    for found in ranks:
        assert torch.equal(found["tiny_weights"]["exact"], torch.full((4,), 14.0 / 6.0))
        assert torch.equal(found["huge_weights"]["exact"], torch.full((4,), 14.0 / 6.0))
        assert torch.equal(found["small_weights"]["exact"], torch.full((4,), 2.0))


@pytest.mark.slow
def test_average_takes_numpy_and_tensor_weights_as_numbers(spawned):
    *_, ranks = spawned
    # Before: "weights: every rank must pass its own weight (a float), ..." for each.
    for found in ranks:
        for field in ("tensor_weight", "numpy_weight", "tensor_weights"):
            assert torch.equal(found[field]["exact"], torch.full((4,), 14.0 / 6.0)), field


@pytest.mark.slow
def test_an_error_on_one_rank_alone_is_raised_on_every_rank(spawned):
    *_, ranks = spawned
    kind, message = ranks[2]["one_rank_error"]
    assert kind == "TypeError" and "expected an nn.Module or a state dict" in message
    for found in ranks[:2]:
        kind, message = found["one_rank_error"]
        assert kind == "LadleError", message
        assert message.startswith("rank 2 of the group could not average: TypeError: ")


@pytest.mark.slow
def test_average_refuses_mismatched_shapes_and_bad_weights_on_every_rank(spawned):
    *_, ranks = spawned
    for found in ranks:
        kind, message = found["shape_error"]
        assert kind == "IncompatibleError" and "'exact'" in message and "(5,)" in message
        kind, message = found["weights_error"]
        assert kind == "ValueError" and message.startswith("weights:")
        problem = (
            "'b': several of its elements are one in memory (an expanded tensor); average a "
            "tensor of its own (.clone())"
        )
        rank = int(found["overlap_kept"]["c"][0])
        assert found["overlap_error"] == (
            ("ValueError", problem)
            if rank == 1
            else ("LadleError", f"rank 1 of the group could not average: ValueError: {problem}")
        )
        assert found["overlap_kept"]["a"].tolist() == [rank, rank]  # nothing averaged


@pytest.mark.slow
def test_average_weight_0_is_a_weight_and_a_zeroed_rank_takes_the_others_mean(spawned):
    *_, ranks = spawned
    for found in ranks:
        # ranks hold [1, 4], [2, 4], [3, NaN]; weights 1, 1, 0
        nan_mean = found["nan_weight_0"]["w"]
        assert nan_mean[0] == 1.5 and nan_mean[1].isnan()
        assert torch.equal(found["zeroed_weight_0"]["w"], torch.tensor([1.5, 4.0]))


@pytest.mark.slow
def test_average_dtensor_replicated_and_hsdp_shards_average_sharded_group_refused(spawned):
    *_, ranks = spawned
    expected = torch.arange(6.0) * 2  # mean of 1, 2, 3 times arange
    for found in ranks:
        assert torch.equal(found["dtensor_replicate"], expected)
        assert torch.equal(found["dtensor_hsdp"], expected)
        kind, message = found["dtensor_shard_error"]
        assert kind == "ValueError" and "sharded over mesh dimension 0" in message


# --- torchrun and the CLI ---------------------------------------------------------------------

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists() and not shutil.which("torchrun"), reason="no torchrun")
def test_torchrun_cli_ties_equals_single_process_and_prints_once(tmp_path):
    base, models = _models(tmp_path)
    out = tmp_path / "merged"
    command = [str(TORCHRUN) if TORCHRUN.exists() else "torchrun", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "ladle.cli", "ties", *models, "--base", base]
    command += ["--density", "0.3", "-o", str(out), "--device", "cpu", "--max-shard-size", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    # torch 2.8's Gloo prints "[Gloo] Rank 0 is connected to 1 peer ranks..." to stdout itself
    ours = [line for line in done.stdout.splitlines() if not line.startswith("[Gloo]")]
    assert " ".join(ours).split() == [str(out)]
    expected = ladle.ties(models, base, density=0.3, device="cpu")
    merged = ladle.load(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 2


@pytest.mark.slow
def test_average_broadcasts_every_integer_dtype_and_matches_tensors_by_name(spawned):
    *_, ranks = spawned
    for found in ranks:
        ints = found["integers"]
        assert ints["i16"].tolist() == [-3, 7] and ints["i16"].dtype == torch.int16
        assert ints["u16"].tolist() == [65535] and ints["u32"].tolist() == [2**32 - 1]
        assert ints["u64"].tolist() == [2**64 - 1, 0] and ints["u64"].dtype == torch.uint64
        assert torch.equal(ints["w"], torch.full((2,), 1.0))  # (0 + 1 + 2) / 3
        for key, value in found["mixed"].items():
            if value.is_floating_point():
                assert torch.equal(value, torch.full_like(value, 1.0)), key


@pytest.mark.slow
def test_a_bad_device_is_a_value_error_on_every_rank(spawned):
    root, *_, ranks = spawned
    for found in ranks:
        kind, message = found["device_error"]
        assert kind == "ValueError" and message.startswith("device: expected cpu, cuda")
    assert not (root / "dev").exists()


def _leaving_worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root}/rendezvous",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=20),
    )
    try:
        if rank == 0:  # rank 1 never joins: it failed before the merge, and left
            models = [str(Path(root) / f"model{i}.safetensors") for i in range(1, 3)]
            found = _catch(merge, "uniform_soup", models, out=Path(root) / "out", device="cpu")
            torch.save(found, Path(root) / "left.pt")
    finally:
        dist.destroy_process_group()


def _join_or_fail(context, seconds: float = 60) -> None:
    """Wait for spawned ranks; kill them and fail the test should they hang."""
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the spawned ranks hung")


@pytest.mark.slow
def test_a_merge_whose_peer_is_gone_leaves_no_temporary_directory(tmp_path):
    # Rank 0 makes the temporary output directory, then tells the others its name: when that
    # fails (a rank gone, as here, or the group's timeout), the directory stayed behind.
    _models(tmp_path)
    context = mp.start_processes(_leaving_worker, args=(str(tmp_path),), nprocs=2, join=False)
    _join_or_fail(context)
    kind, _ = torch.load(tmp_path / "left.pt", weights_only=False)
    assert kind == "RuntimeError"  # gloo's: the peer closed the connection
    assert [p for p in os.listdir(tmp_path) if "out" in p] == []


def _alone_worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2
    )
    # The merges run on a group with a short timeout: a rank left waiting fails within seconds.
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=5))
    found: dict = {}
    try:
        base = str(Path(root) / "model0.safetensors")
        models = [str(Path(root) / f"model{i}.safetensors") for i in range(1, 4)]
        # A device only rank 1 lacks: refused on rank 1 before any collective.
        device = "cpu" if rank == 0 else "meta"
        found["device"] = _catch(
            merge, "uniform_soup", models, out=Path(root) / "device", group=group, device=device
        )
        # Another model on rank 1: refused on every rank before any merging (a file on one
        # node alone, named alike on every node, fails as it opens, on that rank).
        mine = models if rank == 0 else [*models[:2], str(Path(root) / "elsewhere.safetensors")]
        extra = {"base": base, "density": 0.3, "trim": "global", "device": "cpu"}
        found["missing"] = _catch(merge, "ties", mine, out=Path(root) / "missing", **extra)
        # Still in step: the next merge on the same group succeeds on both ranks.
        found["after"] = _catch(
            merge, "uniform_soup", models, out=Path(root) / "after", group=group, device="cpu"
        )
    finally:
        torch.save(found, Path(root) / f"alone{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_split_merge_failing_on_one_rank_before_any_collective_fails_on_every_rank(tmp_path):
    # Before: rank 1 raised at once, rank 0 waited for it in its first collective until the
    # group's timeout, and the ranks' later collectives were paired with the wrong ones.
    _, models = _models(tmp_path)
    context = mp.start_processes(_alone_worker, args=(str(tmp_path),), nprocs=2, join=False)
    _join_or_fail(context)
    found = [torch.load(tmp_path / f"alone{r}.pt", weights_only=False) for r in range(2)]
    expected = "device: 'meta' holds no data; use cpu, cuda or another device"
    assert found[1]["device"] == ("ValueError", expected)
    assert found[0]["device"] == ("LadleError", f"rank 1: {expected}")
    other = (
        f"rank 1: its arguments differ from rank 0's: models[2] is "
        f"{tmp_path / 'elsewhere.safetensors'}, rank 0's {tmp_path / 'model3.safetensors'}; "
        "every rank calls ladle.distributed.merge with the same arguments"
    )
    assert found[0]["missing"] == found[1]["missing"] == ("LadleError", other)
    assert found[0]["after"] is None and found[1]["after"] is None
    merged, single = ladle.load(tmp_path / "after"), ladle.uniform_soup(models, device="cpu")
    assert all(torch.equal(merged[k], single[k]) for k in single)
    left = [p for p in os.listdir(tmp_path) if "device" in p or "missing" in p or "ladle" in p]
    assert left == []


# --- the process group is freed when a merge fails (else: SIGABRT at exit) --------------------


def _fail_holding_the_group() -> None:
    """Fail as a method could: this frame holds the group and, through the error, itself."""
    group = dist.group.WORLD
    try:
        raise ladle.LadleError(f"failed on one of {dist.get_world_size(group)} ranks")
    except ladle.LadleError as err:
        error = err
    raise error


def _freeing_worker(rank: int, root: str, ports: tuple[int, int]) -> None:
    torch.set_num_threads(1)
    os.environ.update(  # as torchrun sets them: _torchrun_group makes the group from these
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), WORLD_SIZE="2"
    )
    models = [str(Path(root) / f"model{i}.safetensors") for i in range(1, 3)]
    found: dict = {}
    gc.disable()  # a cycle holding the group must not be freed by chance
    try:
        with _torchrun_group():
            group = weakref.ref(dist.group.WORLD)
            found["merge_error"] = _catch(merge, "uniform_soup", models, out=Path(root) / "exists")
            # Also a failure before the first collective (a device this rank lacks).
            device = "cpu" if rank == 0 else "meta"
            found["early_error"] = _catch(
                merge, "uniform_soup", models, out=Path(root) / "new", device=device
            )
            found["average_error"] = _catch(average_, [1.0] if rank else {"w": torch.ones(2)})
        found["merge_freed"] = group() is None
        # A second group on a port of its own: on the first one's port, a rank quicker to get
        # there could reach the first group's store, still open on the other rank, and hang.
        os.environ["MASTER_PORT"] = str(ports[1])
        try:
            with _torchrun_group():
                group = weakref.ref(dist.group.WORLD)
                _fail_holding_the_group()
        except ladle.LadleError as err:
            found["cli_error"] = str(err)
        found["cli_freed"] = group() is None
    finally:
        gc.enable()
    torch.save(found, Path(root) / f"freed{rank}.pt")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_a_failed_merge_leaves_nothing_holding_the_process_group(tmp_path):
    # gloo's worker threads stop only when the group is freed; one still running when Python
    # shuts down aborts the process (SIGABRT) as it drops a collective's tensors. A failed
    # merge's frame held its error, and so the group, in a cycle (so did average_'s, on the
    # rank that failed before its first collective); _torchrun_group (the CLI's group) clears
    # the frames of any error leaving it before destroying the group.
    _models(tmp_path)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "model.safetensors").touch()  # an output there: not empty
    context = mp.start_processes(
        _freeing_worker, args=(str(tmp_path), (_free_port(), _free_port())), nprocs=2, join=False
    )
    _join_or_fail(context)
    for rank in range(2):
        found = torch.load(tmp_path / f"freed{rank}.pt", weights_only=False)
        kind, message = found["merge_error"]
        assert kind == "LadleError" and "already exists" in message
        assert found["early_error"][0] == ("LadleError", "ValueError")[rank]
        assert found["average_error"][0] == ("LadleError", "TypeError")[rank]
        assert found["merge_freed"], rank
        assert found["cli_error"] == "failed on one of 2 ranks"
        assert found["cli_freed"], rank


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists() and not shutil.which("torchrun"), reason="no torchrun")
def test_torchrun_cli_errors_exit_1_with_one_line_and_no_abort(tmp_path):
    # Before the fix, about half of these runs ended in "terminate called without an active
    # exception" and SIGABRT (exit -6) on one rank or both.
    _, models = _models(tmp_path)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "model.safetensors").touch()  # an output there: not empty
    command = [str(TORCHRUN) if TORCHRUN.exists() else "torchrun", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "ladle.cli", "soup", *models[:2]]
    command += ["-o", str(tmp_path / "exists"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(3):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1, done.stderr
        assert "terminate called" not in done.stderr and "SIGABRT" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("ladle: error:")]
        assert errors == [
            f"ladle: error: {tmp_path / 'exists'}: already exists; pass "
            "overwrite=True (--overwrite) to replace it"
        ], done.stderr
    assert os.listdir(tmp_path / "exists") == ["model.safetensors"]


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_split_by_bytes_puts_trailing_empty_keys_in_the_last_part():
    # "b" (0 bytes) sits at the end of the byte range: the last part, not one past it.
    assert split_by_bytes({"a": 5, "b": 0}, 2) == [[], ["a", "b"]]
    assert split_by_bytes({"a": 0, "b": 0, "c": 0}, 2) == [["a"], ["b", "c"]]  # by count


@pytest.mark.slow
def test_split_merge_of_one_key_writes_one_file_named_as_a_single_file(spawned):
    root, *_ = spawned
    # The one key goes to rank 1; ranks 0 and 2 write no shard.
    assert sorted(os.listdir(root / "one_key")) == ["README.md", "model.safetensors"]
    assert torch.equal(ladle.load(root / "one_key")["w"], torch.arange(4.0))


@pytest.mark.slow
def test_split_merge_index_total_size_is_the_bytes_of_the_tensors(spawned):
    root, *_ = spawned
    for name in MERGES:
        index = json.loads((root / name / "model.safetensors.index.json").read_text())
        merged = ladle.load(root / name)
        total = sum(t.numel() * t.element_size() for t in merged.values())
        assert index["metadata"] == {"total_size": total}, name


@pytest.mark.slow
def test_an_earlier_output_set_aside_is_refused_as_an_input_and_kept(spawned):
    # Rank 0 deleted it, as a dead process's leftover, before any rank opened its inputs.
    root, *_, ranks = spawned
    (aside,) = (root / "kept").glob(".remerged.ladle-old-*")
    for found in ranks:
        kind, message = found["leftover_input_error"]
        assert kind == "LadleError" and f"is or lies in {aside.name}, an earlier output" in message
    assert (aside / "model.safetensors").is_file() and not (root / "kept" / "remerged").exists()


def test_a_single_file_output_of_a_split_merge_is_refused_on_every_rank(spawned):
    root, *_, ranks = spawned
    for found in ranks:
        kind, message = found["file_out_error"]
        assert kind == "ValueError"
        assert message == (
            "out: a merge split across processes writes a directory of shards, found "
            f"{root / 'm.safetensors'}"
        )
    assert not (root / "m.safetensors").exists()


@pytest.mark.slow
def test_only_rank_0_shows_a_progress_bar(spawned):
    *_, ranks = spawned
    assert ranks[0]["bars"] >= 1
    assert [found["bars"] for found in ranks[1:]] == [0, 0]


@pytest.mark.slow
def test_average_reduces_each_dtype_in_its_own_bucket(spawned):
    *_, ranks = spawned
    for found in ranks:  # 1 + 2⁻⁴⁰·(1, 2, 3): float32 would round each to 1
        state = found["mixed_dtypes"]
        assert torch.equal(state["a64"], torch.tensor([1.0 + 2.0**-39], dtype=torch.float64))
        assert torch.equal(state["b32"], torch.full((2,), 1.0))


@pytest.mark.slow
def test_average_in_a_group_without_global_rank_0_broadcasts_from_its_first_rank(spawned):
    *_, ranks = spawned
    assert "without_rank_0" not in ranks[0]
    for found in ranks[1:]:
        assert torch.equal(found["without_rank_0"]["n"], torch.tensor([11]))
        assert torch.equal(found["without_rank_0"]["w"], torch.tensor([1.5]))


# Gaps found by mutation testing: each test below fails on a small change to the code.

VOTE = [  # base, two models: "a" (rank 0) elects + on 6 entries, "b" (rank 2) − on 4, ties on 1
    ([0.0] * 6, [0.0] * 5),
    ([1.0] * 6, [-1.0] * 4 + [1.0]),
    ([1.0] * 6, [-1.0] * 5),
]
VOTED = {"density": 1.0, "combine": "ties"}


@pytest.mark.slow
def test_split_dare_ties_breaks_sign_ties_by_the_vote_of_every_rank(spawned):
    # The model-wide vote is 6 − 4 = +2: "b"'s tie takes the positive mean, 1. The rank
    # holding "b" alone, which votes −4, would take −1.
    root, *_ = spawned
    merged = ladle.load(root / "vote_dare")
    assert merged["a"].tolist() == [1.0] * 6
    assert merged["b"].tolist() == [-1.0] * 4 + [1.0]
    vote = [root / f"vote{i}.safetensors" for i in range(3)]
    assert_bit_for_bit(merged, ladle.dare(vote[1:], vote[0], device="cpu", **VOTED))


# Gaps found by mutation testing (one rank, or no process group): each test below fails on a
# small change to the code.


@pytest.mark.parametrize(
    "given",
    [[math.inf, -math.inf], [[math.inf, 1.0], [math.inf, 1.0]], [math.nan, 1.0], [0.0, -0.0]],
)
def test_rank_weights_of_no_finite_sum_are_a_value_error_naming_weights(given):
    # Before: math.fsum's own "-inf + inf in fsum" (ValueError), naming no weights.
    found = given[0] if isinstance(given[0], list) else given
    with pytest.raises(ValueError) as caught:
        _rank_weights(given, 2)
    assert str(caught.value) == (
        f"weights: expected finite weights with a non-zero sum, found {found}"
    )


UNIT = math.ldexp(1e308, -1024)  # 1e308 scaled by the power of two that brings it below 1


@pytest.mark.parametrize(
    ("given", "size", "scaled"),
    [([1e308, 1e308, -1e308], 3, (UNIT, UNIT)), ([[1e308, 1e308]] * 2, 2, (UNIT, 2 * UNIT))],
)
def test_rank_weights_whose_sum_passes_float_s_range_are_scaled_as_the_soup_s(given, size, scaled):
    # Before: refused ("expected finite weights with a non-zero sum") though uniform_soup
    # takes them: their sum, not they, passes float's range. Scaled by 2⁻¹⁰²⁴, it does not.
    found = _rank_weights(given, size)
    assert found == [1e308, 1e308, -1e308][:size]
    assert _scaled(found, 0) == scaled  # rank 0's weight and the sum


def test_rank_weights_whose_sum_is_nearly_zero_beside_them_are_refused_as_the_soup_s():
    # Before: accepted, then divided by their sum scaled to 0.0: a mean of Inf and NaN.
    given = [1e308, -1e308, 1e-300]
    with pytest.raises(ValueError) as caught:
        _rank_weights(given, 3)
    assert str(caught.value) == (
        "weights: [1e+308, -1e+308, 1e-300] divided by their sum (1e-300) pass float's "
        "range; expected weights whose sum is not nearly zero beside them"
    )
    with pytest.raises(ValueError) as soup:
        normalized_weights(given, 3)
    assert str(soup.value) == str(caught.value)


@pytest.mark.parametrize(
    "given", [[None, 1.0], [1.0, None], [[1.0, 2.0], [2.0, 1.0]], [[1.0, 2.0], 1.0]]
)
def test_rank_weights_that_ranks_pass_differently_are_refused(given):
    with pytest.raises(ValueError) as caught:
        _rank_weights(given, 2)
    assert str(caught.value) == (
        "weights: every rank must pass its own weight (a float), or every rank the same list "
        f"of per-rank weights, or every rank None; found {given}"
    )


def test_rank_weights_name_the_rank_whose_own_weight_is_no_number():
    assert _rank_weights([1, 2.5], 2) == [1.0, 2.5]
    assert _rank_weights([None, None], 2) is None
    with pytest.raises(TypeError, match=r"^weights \(rank 1\): expected a number, found str$"):
        _rank_weights([1.0, "2"], 2)


def test_buckets_are_runs_of_one_key_within_bucket_bytes_counted_in_the_key_s_dtype(
    monkeypatch,
):
    monkeypatch.setattr(distributed, "BUCKET_BYTES", 16)
    f32, f64 = torch.float32, torch.float64
    numels = [(2, f32), (2, f32), (1, f64), (1, f32), (1, f32), (1, f32), (5, f32), (1, f32)]
    tensors = [torch.zeros(n, dtype=d) for n, d in numels]
    # 8 + 8 bytes fill a bucket; a float64 key starts its own; 4 + 4 + 4 then 20 (alone, too
    # big for any bucket), then 4: each bucket at most 16 bytes but for one tensor alone.
    buckets = list(_buckets(tensors, lambda t: (t.dtype,)))
    assert [(key, [t.numel() for t in run]) for key, run in buckets] == [
        ((f32,), [2, 2]),
        ((f64,), [1]),
        ((f32,), [1, 1, 1]),
        ((f32,), [5]),
        ((f32,), [1]),
    ]
    assert all(a is b for a, b in zip(tensors, [t for _, run in buckets for t in run]))


def test_average_leaves_the_values_of_a_state_dict_that_are_no_tensors(one_rank):
    state = {"w": torch.tensor([1.0, -2.5]), "step": 3, "note": "epoch 2"}
    assert average_(state) == {"w": state["w"], "step": 3, "note": "epoch 2"}
    assert torch.equal(state["w"], torch.tensor([1.0, -2.5]))


def test_gloo_reduces_on_the_cpu_whatever_device_a_tensor_is_on(one_rank):
    held = torch.empty(2, device="meta")  # a CUDA tensor would go the same way
    assert distributed._comm_device(dist.group.WORLD, held) == torch.device("cpu")


def test_merge_with_one_rank_is_the_plain_merge_and_may_write_one_file(one_rank, tmp_path):
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    out = merge("soup", [a, b], out=tmp_path / "m.safetensors")
    assert out == tmp_path / "m.safetensors" and out.is_file()
    assert torch.equal(ladle.load(out)["w"], torch.tensor([2.0, 4.0]))


def test_merge_refuses_a_method_that_is_no_function_and_no_output():
    with pytest.raises(ValueError) as caught:
        merge(42, [], out="unused")
    assert str(caught.value) == "method: expected a merge function or its name, found 42"
    with pytest.raises(ValueError) as caught:  # in one process, the message fits too
        merge("soup", [{"w": torch.ones(1)}], out=None)
    assert str(caught.value) == (
        "out: ladle.distributed.merge writes its result to disk (a directory of shards when "
        "split across processes); pass out=PATH"
    )


def _fail_holding(held: list, message: str, cause: BaseException | None = None) -> None:
    raise ValueError(message) from cause


def test_release_frames_clears_the_frames_of_an_error_its_cause_and_context():
    def failed(message: str, cause: BaseException | None = None) -> BaseException:
        try:
            _fail_holding([message], message, cause)
        except ValueError as err:
            return err
        raise AssertionError("no error")

    cause, context = failed("cause"), failed("context")
    error = failed("error", cause)
    error.__context__ = context
    cause.__cause__ = error  # a cycle: each error is visited once
    frames = [e.__traceback__.tb_next.tb_frame for e in (error, cause, context)]
    assert all("held" in frame.f_locals for frame in frames)
    done = threading.Thread(target=distributed._release_frames, args=(error,), daemon=True)
    done.start()
    done.join(timeout=10)
    assert not done.is_alive()
    assert [frame.f_locals for frame in frames] == [{}, {}, {}]


@pytest.mark.slow
def test_average_names_a_mesh_dimension_by_name_and_the_group_s_ranks_holding_its_shards(
    spawned,
):
    *_, ranks = spawned
    for rank, found in enumerate(ranks):
        kind, message = found["dtensor_named_error"]
        assert kind == "ValueError"
        assert message.startswith(
            "group: 'w' is sharded over mesh dimension 0 ('replicate'), which this group spans "
            "(ranks [0, 1, 2] hold different shards)"
        )
        if rank != 2:  # the pair [0, 1] of the world's three shard holders
            kind, message = found["dtensor_pair_error"]
            assert kind == "ValueError" and "(ranks [0, 1] hold different shards)" in message
    assert "dtensor_pair_error" not in ranks[2]


@pytest.mark.slow
def test_average_names_the_keys_and_dtypes_that_differ_between_ranks(spawned):
    *_, ranks = spawned
    # Ranks 0 and 1 hold "w"; rank 2 also "a" to "d": each rank names the first rank unlike it.
    assert [found["keys_error"] for found in ranks] == [
        (
            "IncompatibleError",
            "average_: rank 2's tensors differ from rank 0's: "
            "0 missing [], 4 extra ['a', 'b', 'c']",
        ),
        (
            "IncompatibleError",
            "average_: rank 2's tensors differ from rank 1's: "
            "0 missing [], 4 extra ['a', 'b', 'c']",
        ),
        (
            "IncompatibleError",
            "average_: rank 0's tensors differ from rank 2's: "
            "4 missing ['a', 'b', 'c'], 0 extra []",
        ),
    ]
    assert ranks[0]["dtype_error"] == (
        "IncompatibleError",
        "average_: key 'w' has shape (1,), torch.float32 (cpu) on rank 0, but (1,), "
        "torch.float64 (cpu) on rank 2",
    )
    assert ranks[2]["dtype_error"] == (
        "IncompatibleError",
        "average_: key 'w' has shape (1,), torch.float64 (cpu) on rank 2, but (1,), "
        "torch.float32 (cpu) on rank 0",
    )


@pytest.mark.slow
def test_average_scales_weights_of_both_signs_by_the_largest_magnitude(spawned):
    *_, ranks = spawned
    # Σ wᵣ·(r + 1) / Σ wᵣ: the −2¹³⁰ of rank 2 outweighs the others by 2²⁹⁰: its 3, exactly.
    for found in ranks:
        assert torch.equal(found["signed_weights"]["exact"], torch.full((4,), 3.0))


@pytest.mark.slow
def test_split_merge_of_a_model_without_keys_writes_one_empty_file(spawned):
    root, *_ = spawned
    # Rank 0 writes the one empty shard; the others, holding no keys either, write none.
    assert sorted(os.listdir(root / "no_keys")) == ["README.md", "model.safetensors"]
    assert ladle.load(root / "no_keys") == {}


@pytest.mark.slow
def test_split_merge_on_a_group_without_global_rank_0_into_new_folders(spawned):
    root, _, models, ranks = spawned
    assert "merge_without_rank_0" not in ranks[0]
    assert ranks[1]["merge_without_rank_0"] is None and ranks[2]["merge_without_rank_0"] is None
    assert_bit_for_bit(ladle.load(root / "new" / "dir" / "soup"), ladle.uniform_soup(models))
    assert os.listdir(root / "new" / "dir") == ["soup"]


@pytest.mark.slow
def test_a_temporary_directory_rank_0_cannot_make_is_an_error_on_every_rank(spawned):
    root, *_, ranks = spawned
    out = root / "nan.safetensors" / "out"
    for found in ranks:
        kind, message = found["parent_error"]
        assert kind == "LadleError"
        assert message.startswith(f"rank 0: {out}: cannot make the temporary directory beside it (")


@pytest.mark.slow
def test_rank_0_failing_to_rename_the_output_raises_its_error_and_tells_the_others(spawned):
    root, *_, ranks = spawned
    said = f"{root / 'taken'}: appeared while merging; the result is left unwritten"
    assert ranks[0]["taken_error"] == ("LadleError", said)
    assert [found["taken_error"] for found in ranks[1:]] == [("LadleError", f"rank 0: {said}")] * 2
    assert os.listdir(root / "taken") == ["theirs.txt"]
    assert [p for p in os.listdir(root) if p.lstrip(".").startswith("taken")] == ["taken"]


@pytest.mark.slow
def test_a_split_merge_by_a_function_that_writes_nothing_is_refused_on_every_rank(spawned):
    root, *_, ranks = spawned
    said = (
        "method: unwritten did not write through ladle.engine.merge, so it cannot be split "
        "across processes"
    )
    assert [found["unwritten_error"] for found in ranks] == [("LadleError", said)] * WORLD
    assert not [p for p in os.listdir(root) if p.lstrip(".").startswith("unwritten")]


@pytest.mark.slow
def test_a_split_merge_failing_on_two_ranks_names_the_first_on_the_others(spawned):
    root, *_, ranks = spawned
    kinds = [found["twice_error"][0] for found in ranks]
    assert kinds == ["LadleError", "NonFiniteError", "NonFiniteError"]
    assert "'y'" in ranks[1]["twice_error"][1] and "'z'" in ranks[2]["twice_error"][1]
    assert ranks[0]["twice_error"][1] == f"rank 1: {ranks[1]['twice_error'][1]}"
    assert not [p for p in os.listdir(root) if p.lstrip(".").startswith("twice")]


@pytest.mark.slow
def test_a_temporary_directory_a_rank_cannot_see_is_refused_on_every_rank(spawned):
    root, *_, ranks = spawned
    kind, message = ranks[2]["unseen_error"]
    assert kind == "LadleError"
    assert re.fullmatch(
        rf"{re.escape(str(root / 'unseen'))}: rank 0's temporary directory .*-elsewhere is "
        "not visible on rank 2; the output must be on a filesystem every rank sees",
        message,
    )
    assert ranks[0]["unseen_error"] == ("LadleError", f"rank 2: {message}")
    assert not [p for p in os.listdir(root) if p.lstrip(".").startswith("unseen")]


@pytest.mark.slow
def test_ranks_that_found_other_commits_of_an_hf_source_are_refused_on_every_rank(spawned):
    # Rank 2's main was another commit: a split merge would have mixed the two in one output.
    root, *_, ranks = spawned
    a, b = (f"hf://org/m@{commit}" for commit in HUB_COMMITS)
    said = (
        f"rank 2: hf://org/m is {b}, where rank 0 found {a} (the branch moved between their "
        f"fetches, or their Hugging Face caches differ); name the commit to read: {a}"
    )
    assert [found["commits_error"] for found in ranks] == [("LadleError", said)] * WORLD
    assert not [p for p in os.listdir(root) if p.lstrip(".").startswith("commits")]


@pytest.mark.slow
def test_a_split_merge_of_a_named_commit_reads_it_on_every_rank(spawned):
    root, base, models, _ = spawned
    a = f"hf://org/m@{HUB_COMMITS[0]}"
    with ladle.open_checkpoint(root / "commit") as merged:
        assert json.loads(merged.metadata["ladle.inputs"]) == [a, Path(models[0]).name]
    expected = ladle.ties([HUB_MODELS[0], models[0]], base, density=0.5, device="cpu")
    assert_bit_for_bit(ladle.load(root / "commit"), expected)


def test_torchrun_group_uses_an_existing_group_as_is_and_leaves_it(one_rank):
    world = dist.group.WORLD
    with _torchrun_group() as rank:
        assert rank == 0 and dist.group.WORLD is world
    assert dist.is_initialized() and dist.group.WORLD is world


@pytest.mark.parametrize(("local_rank", "gpus", "chosen"), [("1", 1, 0), ("3", 2, 1), ("1", 4, 1)])
def test_torchrun_group_makes_current_the_gpu_a_rank_merges_on(
    monkeypatch, local_rank, gpus, chosen
):
    # torchrun with one GPU visible to each process (CUDA_VISIBLE_DEVICES): LOCAL_RANK 1 made
    # device 1 current, "invalid device ordinal", before _take_device (which wraps the rank
    # around the visible GPUs) ran. CUDA's own calls stand in for a machine with GPUs here.
    made_current = []

    class Stop(Exception):
        pass

    def init_process_group(backend: str, timeout: object) -> None:
        # NCCL's default of 10 minutes killed merges whose ranks finish far apart
        assert timeout == ladle.distributed.GROUP_TIMEOUT == datetime.timedelta(hours=4)
        raise Stop(backend)

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(Stop, match="nccl"), _torchrun_group():
        pass
    assert made_current == [chosen]


@pytest.mark.slow
def test_split_merge_shards_hold_the_keys_in_order_as_a_single_process_writes_them(spawned):
    root, *_ = spawned
    for name in MERGES:
        index = json.loads((root / name / "model.safetensors.index.json").read_text())
        shards = list(index["weight_map"].values())  # in the reference's key order
        assert shards == sorted(shards), name  # rank 0's keys in the first shards
        assert shards[0] == f"model-00001-of-{len(set(shards)):05d}.safetensors", name


@pytest.mark.parametrize("group", ["x", []])
def test_a_group_that_is_no_process_group_is_a_type_error_naming_it(tmp_path, group):
    # "'str' object has no attribute 'size'", "unhashable type"; without a process group it
    # was ignored
    model = {"w": torch.ones(2)}
    for call in (
        lambda: merge("soup", [model, model], out=tmp_path / "o", group=group),
        lambda: average_(model, group=group),
    ):
        with pytest.raises(TypeError, match=r"^group: expected a torch\.distributed ProcessGroup"):
            call()
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("weights", "found"), [((w for w in [1.0]), "generator"), ({0: 1.0}, "dict")]
)
def test_average_weights_of_no_order_are_a_type_error_naming_them(one_rank, weights, found):
    # A generator failed inside pickling ("cannot pickle 'generator' object")
    with pytest.raises(TypeError) as caught:
        average_({"w": torch.ones(2)}, weights=weights)
    assert str(caught.value) == (
        f"weights: expected a number or a sequence of numbers, found {found}"
    )


def _my_save(models, *, out, device=None):
    """A method of one's own that writes ``out`` itself, not through ladle.engine.merge."""
    return ladle.save(ladle.uniform_soup(models, device=device), out)


def _my_soup(models, *, out, device=None):
    """A method of one's own without a ``progress`` parameter."""
    return ladle.uniform_soup(models, out=out, device=device)


def _arguments_worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2
    )
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=20))
    found: dict = {}
    try:
        base = str(Path(root) / "model0.safetensors")
        models = [str(Path(root) / f"model{i}.safetensors") for i in range(1, 4)]
        out = Path(root) / "out"
        kw = {"group": group, "device": "cpu"}
        found["save"] = _catch(merge, _my_save, models, out=out / "save", **kw)
        greedy = functools.partial(ladle.greedy_soup, evaluate=lambda sd: 0.0)
        found["greedy"] = _catch(merge, greedy, models, out=out / "greedy", **kw)
        found["progress"] = _catch(merge, _my_soup, models, out=out / "progress", **kw)
        density = 0.2 if rank == 0 else 0.9
        found["density"] = _catch(
            merge, "ties", models, base=base, density=density, out=out / "density", **kw
        )
        order = models if rank == 0 else models[::-1]
        found["order"] = _catch(merge, "soup", order, out=out / "order", **kw)
        found["out"] = _catch(merge, "soup", models, out=out / f"rank{rank}", **kw)
        # Numpy scalars, opened checkpoints and a partial's keywords were compared by type.
        t = np.float32(0.25 if rank == 0 else 0.75)
        found["numpy"] = _catch(merge, "slerp", models[:2], t=t, out=out / "numpy", **kw)
        opened = [ladle.open_checkpoint(m) for m in order]
        found["opened"] = _catch(merge, "soup", opened, out=out / "opened", **kw)
        slerp = functools.partial(ladle.slerp, t=float(t))
        found["partial"] = _catch(merge, slerp, models[:2], out=out / "partial", **kw)
        # Each in a folder of its own, the same arguments: strings that are no paths (the
        # method's name, trim) were resolved as paths and refused as different.
        own = Path(root) / f"cwd{rank}"
        own.mkdir()
        os.chdir(own)
        found["cwd"] = _catch(
            merge, "ties", models, base=base, trim="tensor", out=out / "cwd", **kw
        )
        # NaN is NaN on every rank: the method's own error, not "arguments differ".
        found["nan"] = _catch(merge, "soup", models, weights=[math.nan, 1, 1], out=out / "n", **kw)
    finally:
        torch.save(found, Path(root) / f"arguments{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_split_merge_refuses_what_its_ranks_cannot_share(tmp_path):
    # A method writing `out` itself had every rank write it (a full output left while every
    # rank raised; a partial of greedy_soup was not recognised); a method without `progress`
    # got one on rank 1; ranks given other arguments each merged their share of another
    # merge into one output (another density, models in another order, another out).
    base, models = _models(tmp_path)
    context = mp.start_processes(_arguments_worker, args=(str(tmp_path),), nprocs=2, join=False)
    _join_or_fail(context, 120)
    found = [torch.load(tmp_path / f"arguments{r}.pt", weights_only=False) for r in range(2)]
    out = tmp_path / "out"
    written = (
        f"{out / 'save'}: written whole by the method, not through ladle.engine.merge, while "
        "the merge is split across processes: run it in one process"
    )
    assert found[0]["save"] == found[1]["save"] == ("LadleError", written)
    greedy = (
        "ValueError",
        "method: greedy_soup with greedy selection evaluates whole soups "
        "and cannot be split across processes; run it in one process",
    )
    assert found[0]["greedy"] == found[1]["greedy"] == greedy
    assert found[0]["progress"] is None and found[1]["progress"] is None
    single = ladle.uniform_soup(models, device="cpu")
    assert_bit_for_bit(ladle.load(out / "progress"), single)
    same = "; every rank calls ladle.distributed.merge with the same arguments"
    differ = "rank 1: its arguments differ from rank 0's: "
    assert (
        found[0]["density"]
        == found[1]["density"]
        == ("LadleError", f"{differ}'density' is 0.9, rank 0's 0.2{same}")
    )
    assert (
        found[0]["order"]
        == found[1]["order"]
        == ("LadleError", f"{differ}models[0] is {models[2]}, rank 0's {models[0]}{same}")
    )
    assert (
        found[0]["out"]
        == found[1]["out"]
        == ("LadleError", f"{differ}out is {out / 'rank1'}, rank 0's {out / 'rank0'}{same}")
    )
    assert (
        found[0]["numpy"]
        == found[1]["numpy"]
        == ("LadleError", f"{differ}'t' is 0.75, rank 0's 0.25{same}")
    )
    opened = f"models[0] is ('checkpoint', '{models[2]}'), rank 0's ('checkpoint', '{models[0]}')"
    assert found[0]["opened"] == found[1]["opened"] == ("LadleError", f"{differ}{opened}{same}")
    slerp = "('partial', 'ladle.methods.slerp.slerp', (), (('t', {}),))"
    partial = f"method is {slerp.format(0.75)}, rank 0's {slerp.format(0.25)}"
    assert found[0]["partial"] == found[1]["partial"] == ("LadleError", f"{differ}{partial}{same}")
    assert found[0]["cwd"] is None and found[1]["cwd"] is None
    assert_bit_for_bit(
        ladle.load(out / "cwd"), ladle.ties(models, base, trim="tensor", device="cpu")
    )
    nan = (
        "ValueError",
        "weights: expected finite weights with a non-zero sum, found [nan, 1.0, 1.0]",
    )
    assert found[0]["nan"] == found[1]["nan"] == nan
    assert sorted(os.listdir(out)) == ["cwd", "progress"]
