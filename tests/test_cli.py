from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import family
from safetensors.torch import save_file
from test_hub import local_hub  # noqa: F401  (a fixture)

import ladle
from ladle.cli import main
from ladle.recipe import DTYPES


@pytest.fixture
def inputs(tmp_path):
    paths = []
    for i, model in enumerate(family(3, seed=7)):
        save_file(model, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    return paths


def test_soup_writes_the_weighted_mean(tmp_path, inputs, capsys):
    out = tmp_path / "soup"
    assert (
        main(
            [
                "soup",
                *inputs,
                "-o",
                str(out),
                "--weights",
                "1",
                "1",
                "2",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    expected = ladle.uniform_soup(inputs, weights=[1, 1, 2], device="cpu")
    merged = ladle.load(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert capsys.readouterr().out.strip() == str(out)


def test_soup_dtype_and_shard_options(tmp_path, inputs):
    out = tmp_path / "soup"
    assert (
        main(
            [
                "soup",
                *inputs,
                "-o",
                str(out),
                "--dtype",
                "bf16",
                "--max-shard-size",
                "40B",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (out / "model.safetensors.index.json").exists()
    assert ladle.load(out)["layer.weight"].dtype == torch.bfloat16


def test_merge_error_is_one_line_on_stderr_with_exit_1(tmp_path, inputs, capsys):
    bad = tmp_path / "bad.safetensors"
    save_file({"other": torch.zeros(1)}, bad)
    assert main(["soup", inputs[0], str(bad), "-o", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ladle: error: model 1")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ladle.IncompatibleError, match="^model 1"):  # --debug: the traceback
        main(["--debug", "soup", inputs[0], str(bad), "-o", str(tmp_path / "x.safetensors")])


def test_out_of_memory_is_one_line_on_stderr_with_exit_1(tmp_path, inputs, capsys, monkeypatch):
    from ladle.writer import SafetensorsWriter

    def no_memory(self, key, chunk):
        raise MemoryError  # as Python raises it: no message

    monkeypatch.setattr(SafetensorsWriter, "write", no_memory)
    assert main(["soup", *inputs, "-o", str(tmp_path / "x.safetensors"), "--no-progress"]) == 1
    assert capsys.readouterr().err == "ladle: error: out of memory\n"
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(MemoryError):  # --debug: the traceback
        main(["--debug", "soup", *inputs, "-o", str(tmp_path / "x.safetensors")])


def test_ctrl_c_exits_130_with_one_line_and_leaves_no_output(tmp_path, inputs, capsys, monkeypatch):
    from ladle.writer import SafetensorsWriter

    def interrupted(self, key, chunk):
        raise KeyboardInterrupt

    monkeypatch.setattr(SafetensorsWriter, "write", interrupted)
    out = tmp_path / "out"
    assert main(["soup", *inputs, "-o", str(out), "--no-progress"]) == 130
    assert capsys.readouterr().err == "ladle: interrupted\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    with pytest.raises(KeyboardInterrupt):  # --debug: the traceback, as for other errors
        main(["--debug", "soup", *inputs, "-o", str(out), "--no-progress"])


def test_existing_output_exits_1_unless_overwrite(tmp_path, inputs, capsys):
    out = tmp_path / "o.safetensors"
    assert main(["soup", *inputs, "-o", str(out)]) == 0
    assert main(["soup", *inputs, "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["soup", *inputs, "-o", str(out), "--overwrite"]) == 0


def test_overwrite_refuses_a_folder_of_other_files_in_one_line(tmp_path, inputs, capsys):
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text("print('mine')")
    assert main(["soup", *inputs, "-o", str(code), "--overwrite", "--no-progress"]) == 1
    assert capsys.readouterr().err == (
        f"ladle: error: {code}: is a folder without safetensors weights (main.py): overwrite "
        "replaces only an earlier output; move it away or choose another output\n"
    )
    assert os.listdir(code) == ["main.py"]


@pytest.mark.parametrize(
    "argv", [[], ["soup"], ["soup", "a"], ["soup", "a", "-o", "x", "--dtype", "int8"]]
)
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def _sub_commands() -> dict[str, argparse.ArgumentParser]:
    from ladle.cli import build_parser

    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


@pytest.mark.parametrize("name", sorted(_sub_commands()))
def test_help_shows_every_default_the_dtypes_and_the_sources_a_model_can_be(name):
    # `ladle demo --help` showed no default; --dtype named no dtype; the model arguments
    # said "files or directories", though hf:// URLs work too.
    for action in _sub_commands()[name]._actions:
        shown = action.help or ""
        defaulted = action.default not in (None, argparse.SUPPRESS) and action.nargs != 0
        if action.option_strings and defaulted:  # (store_true flags take no value)
            assert f"(default: {action.default})" in shown, (name, action.dest)
        if action.dest in ("models", "checkpoint", "a"):
            assert "hf://OWNER/REPO[@REVISION]" in shown, (name, action.dest)
        if action.dest == "dtype":
            assert all(f"{dtype}" in shown for dtype in DTYPES), name
        if not action.option_strings:  # a positional argument says what it is
            assert shown and action.metavar, (name, action.dest)


def test_inspect_lists_keys_and_totals(inputs, capsys):
    assert main(["inspect", inputs[0]]) == 0
    out = capsys.readouterr().out
    assert "layer.weight" in out and "float32" in out and "4x3" in out
    params = sum(t.numel() for t in family(1, seed=7)[0].values())
    assert f"5 tensors, {params:,} parameters" in out


def test_inspect_keeps_its_columns_aligned_for_long_dtypes_and_shapes(tmp_path, capsys):
    path = ladle.save(
        {
            "a": torch.zeros(2, dtype=torch.float8_e4m3fn),
            "bb": torch.zeros(2, 3, 4, 5, 6, 7, 1),  # "2x3x4x5x6x7x1": 13 characters
            "c": torch.zeros(40000, 2, 3, 2, 2, dtype=torch.bfloat16),  # 17
        },
        tmp_path / "m.safetensors",
    )
    assert main(["inspect", str(path)]) == 0
    rows = capsys.readouterr().out.splitlines()[:3]
    assert [row.split()[:3] for row in rows] == [
        ["a", "float8_e4m3fn", "2"],
        ["bb", "float32", "2x3x4x5x6x7x1"],
        ["c", "bfloat16", "40000x2x3x2x2"],
    ]
    starts = [re.match(r"(\S+ +)(\S+ +)(\S+ +)", row) for row in rows]
    for column in (1, 2, 3):  # dtype, shape and size each start where the others' do
        assert len({m.end(column) for m in starts if m}) == 1, rows


def test_inspect_and_diff_count_one_tensor_or_parameter_in_the_singular(tmp_path, capsys):
    # They printed "1 tensors", "1 parameters", "shard ...: 1 tensors".
    save_file({"s": torch.tensor(2.0)}, tmp_path / "one.safetensors")  # no metadata lines
    assert main(["inspect", str(tmp_path / "one.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"1 tensor, 1 parameter, 4 B ({tmp_path / 'one.safetensors'})"
    ladle.save({"a": torch.tensor(1.0), "b": torch.ones(2)}, tmp_path / "two", max_shard_size=4)
    assert main(["inspect", str(tmp_path / "two")]) == 0
    assert capsys.readouterr().out.splitlines()[-4:] == [
        f"2 tensors, 3 parameters, 12 B ({tmp_path / 'two'})",
        "shard model-00001-of-00002.safetensors: 1 tensor, 4 B",
        "shard model-00002-of-00002.safetensors: 1 tensor, 8 B",
        "metadata format: pt",
    ]
    one = str(tmp_path / "one.safetensors")
    assert main(["diff", one, one]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "1 tensor: |A| 2, |B| 2, |A-B| 0, cosine of the models 1; 1 identical"
    )


def test_inspect_json(inputs, capsys):
    assert main(["inspect", inputs[0], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    shapes = {t["key"]: t["shape"] for t in report["tensors"]}
    assert shapes["layer.weight"] == [4, 3] and shapes["scalar"] == []
    assert report["bytes"] == sum(t.nbytes for t in family(1, seed=7)[0].values())
    assert (report["source"], report["path"], report["metadata"]) == (inputs[0], inputs[0], {})
    assert report["parameters"] == sum(t.numel() for t in family(1, seed=7)[0].values())
    assert (report["quantization"], report["stored_quantization"], report["adapter"]) == (
        None,
        None,
        False,
    )


def test_inspect_json_lists_metadata_in_one_order_run_after_run(tmp_path, capsys):
    # safetensors returns the header's metadata in an order that changes from process to
    # process: two runs of `ladle inspect --json` on one file printed different text.
    metadata = {f"k{i:02d}": str(i) for i in range(12)}
    path = ladle.save({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata=metadata)
    assert main(["inspect", str(path), "--json"]) == 0
    listed = list(json.loads(capsys.readouterr().out)["metadata"])
    assert listed == sorted([*metadata, "format"])


@pytest.mark.parametrize("kind", ["quantized", "adapter"])
def test_inspect_says_that_merges_refuse_a_quantized_model_or_an_adapter(tmp_path, capsys, kind):
    folder = tmp_path / "m"
    folder.mkdir()
    if kind == "quantized":
        ladle.save({"w": torch.ones(2)}, folder / "model.safetensors")
        config = {"quantization_config": {"quant_method": "gptq"}}
        (folder / "config.json").write_text(json.dumps(config))
    else:
        ladle.save({"w": torch.ones(2)}, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert main(["inspect", str(folder)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (
        "quantized ('gptq'): merges refuse it; dequantize it first"
        if kind == "quantized"
        else "a PEFT adapter: merges refuse it; merge it into its base model first"
    )
    assert main(["inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = ("gptq", False) if kind == "quantized" else (None, True)
    assert (report["quantization"], report["adapter"]) == expected


def test_inspect_says_that_merges_refuse_quantized_tensors_no_config_declares(tmp_path, capsys):
    tensors = {"l.qweight": torch.ones(1, 8, dtype=torch.int32), "l.scales": torch.ones(8)}
    path = str(ladle.save(tensors, tmp_path / "ft.safetensors"))
    what = "GPTQ or AWQ: packed integer weights ('l.qweight')"
    assert main(["inspect", path]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"quantized: {what}: merges refuse it; dequantize it first"
    assert main(["inspect", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["quantization"], report["stored_quantization"]) == (None, what)


def test_inspect_json_names_the_torch_file_holding_each_tensor(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "b": torch.zeros(3)}, tmp_path / "m.pt")
    assert main(["inspect", str(tmp_path / "m.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [t["file"] for t in report["tensors"]] == ["m.pt", "m.pt"]
    assert report["shards"] == [{"file": "m.pt", "tensors": 2, "bytes": 20}]
    with ladle.open_checkpoint({"w": torch.ones(2)}) as in_memory:
        assert in_memory.files() == {}


def test_inspect_counts_tied_weights_once_and_says_which_name_they_share(tmp_path, capsys):
    # A torch file of a model with a tied head counted the embedding under each name: more
    # parameters and bytes than the file holds.
    embedding = torch.ones(4, 3)
    torch.save({"emb": embedding, "head": embedding, "b": torch.zeros(2)}, tmp_path / "m.pt")
    assert main(["inspect", str(tmp_path / "m.pt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "emb   float32   4x3              48 B",
        "head  float32   4x3              48 B  (tied to emb)",
        "b     float32   2                8 B",
    ]
    assert lines[3] == f"3 tensors (1 tied to another), 14 parameters, 56 B ({tmp_path / 'm.pt'})"
    assert main(["inspect", str(tmp_path / "m.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [t["tied_to"] for t in report["tensors"]] == [None, "emb", None]
    assert (report["parameters"], report["bytes"]) == (14, 56)
    assert report["shards"] == [{"file": "m.pt", "tensors": 2, "bytes": 56}]


def test_inspect_escapes_tied_names_and_counts_every_second_name(tmp_path, capsys):
    # Keys from a torch file may hold line breaks: the row and its '(tied to ...)' escape them.
    embedding = torch.ones(2)
    tensors = {"emb\n": embedding, "head\t": embedding, "b": torch.zeros(1), "out": embedding}
    torch.save(tensors, tmp_path / "m.pt")
    assert main(["inspect", str(tmp_path / "m.pt")]) == 0
    assert capsys.readouterr().out.splitlines()[:5] == [
        "'emb\\n'   float32   2                8 B",
        "'head\\t'  float32   2                8 B  (tied to 'emb\\n')",
        "b         float32   1                4 B",
        "out       float32   2                8 B  (tied to 'emb\\n')",
        f"4 tensors (2 tied to another), 3 parameters, 12 B ({tmp_path / 'm.pt'})",
    ]


def test_inspect_of_a_one_file_model_folder_shows_its_file_and_no_path_line(
    tmp_path, monkeypatch, capsys
):
    from test_hub import COMMIT_A, weights, write_cached_repo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "folder" / "model.safetensors")
    assert main(["inspect", "folder"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [  # the folder and its file in one line, as a single file shows it
        f"1 tensor, 2 parameters, 8 B ({Path('folder', 'model.safetensors')})"
    ]
    # A Hub source still shows where its snapshot is: its name does not say it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = write_cached_repo(
        tmp_path / "cache", "org/m", COMMIT_A, {"model.safetensors": weights({"w": torch.ones(2)})}
    )
    assert main(["inspect", f"hf://org/m@{COMMIT_A}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == [
        f"1 tensor, 2 parameters, 8 B (hf://org/m@{COMMIT_A})",
        f"path {snapshot}",
    ]
    assert main(["inspect", f"hf://org/m@{COMMIT_A}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(snapshot)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["ladle.cli", "ladle"])
def test_console_entry_point_runs_as_a_module(tmp_path, inputs, module):
    result = subprocess.run(
        [sys.executable, "-m", module, "soup", *inputs, "-o", str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    written, expected = ladle.load(tmp_path / "o.safetensors"), ladle.uniform_soup(inputs)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    missing = subprocess.run(
        [sys.executable, "-m", module, "inspect", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "no such file" in missing.stderr
    assert "Traceback" not in missing.stderr


def _ladle(args: list[str], stdout: object, unbuffered: bool) -> subprocess.CompletedProcess:
    """``python -m ladle ARGS`` writing to ``stdout``, its stderr captured as text, with
    ``PYTHONUNBUFFERED`` set or not (a test environment may set it, which hides what a
    buffered standard output does)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "ladle", *args]
    return subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)


def _to_a_closed_pipe(args: list[str], unbuffered: bool) -> subprocess.CompletedProcess:
    """:func:`_ladle` writing to a pipe whose reader is gone before the first write."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return _ladle(args, writer, unbuffered)
    finally:
        os.close(writer)


@pytest.mark.slow
@pytest.mark.parametrize("unbuffered", [False, True])
def test_output_read_by_a_pipe_that_closes_early_ends_quietly_with_141(
    tmp_path, inputs, unbuffered
):
    # `ladle inspect X | head`: the reader is gone (here before the first write). Without
    # PYTHONUNBUFFERED the failure came at exit ("Exception ignored ... BrokenPipeError",
    # status 120), with it as "ladle: error: [Errno 32] Broken pipe" (status 1). `ladle
    # --help | head -1` too.
    out = tmp_path / "o.safetensors"
    for args in (["inspect", inputs[0]], ["soup", *inputs, "-o", str(out)], ["--help"]):
        result = _to_a_closed_pipe(args, unbuffered)
        assert (result.returncode, result.stderr) == (141, ""), args
    assert out.is_file()  # the merge was complete when its path could not be printed


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="Linux /dev/full")
@pytest.mark.parametrize("unbuffered", [False, True])
def test_every_command_says_when_standard_output_is_full(tmp_path, inputs, unbuffered):
    # inspect, diff and greedy-soup said "[Errno 28] No space left on device" alone (read as
    # the merge's failure); --help and --version printed nothing with status 0 (argparse
    # ignores the failure); and without PYTHONUNBUFFERED what stayed buffered failed again
    # at exit: status 120 and "Exception ignored ... OSError".
    (tmp_path / "evals.py").write_text("def score(state_dict):\n    return 1.0\n")
    commands = [
        ["soup", *inputs, "-o", str(tmp_path / "s.safetensors")],
        [
            "greedy-soup",
            *inputs,
            "--evaluate",
            f"{tmp_path / 'evals.py'}:score",
            "-o",
            str(tmp_path / "g.safetensors"),
        ],
        ["inspect", inputs[0]],
        ["diff", inputs[0], inputs[1]],
        ["--version"],
        ["soup", "--help"],
    ]
    for args in commands:
        with open("/dev/full", "w") as full:
            result = _ladle(args, full, unbuffered)
        assert (result.returncode, result.stderr) == (
            1,
            "ladle: error: [Errno 28] writing to standard output: No space left on device\n",
        ), args
    assert (tmp_path / "s.safetensors").is_file() and (tmp_path / "g.safetensors").is_file()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="Linux /dev/full")
def test_the_demo_says_when_standard_output_is_full(tmp_path, monkeypatch, capsys):
    full = open("/dev/full", "w")  # noqa: SIM115
    monkeypatch.setattr(sys, "stdout", full)
    assert main(["demo", "--size", "small", "--workdir", str(tmp_path / "d")]) == 1
    full.close()
    assert capsys.readouterr().err.endswith(
        "ladle: error: [Errno 28] writing to standard output: No space left on device\n"
    )
    assert (tmp_path / "d" / "merged").is_dir()  # the table was all that was left to do


@pytest.mark.parametrize("device", ["tpu", "cuda:99"])
def test_a_device_torch_does_not_know_or_this_machine_lacks_is_one_line(
    tmp_path, inputs, capsys, device
):
    out = tmp_path / "o.safetensors"
    assert main(["soup", *inputs, "-o", str(out), "--device", device]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ladle: ") and err.count("\n") == 1 and "device: " in err
    assert not out.exists()
    assert main(["diff", inputs[0], inputs[1], "--device", device]) == 1


def test_diff_of_models_holding_nan_needs_allow_nonfinite(tmp_path, inputs, capsys):
    model = ladle.load(inputs[0])
    model["layer.weight"][0, 0] = float("nan")
    save_file(model, tmp_path / "nan.safetensors")
    argv = ["diff", str(tmp_path / "nan.safetensors"), inputs[1]]
    assert main(argv) == 1
    assert "--allow-nonfinite" in capsys.readouterr().err
    assert main([*argv, "--allow-nonfinite", "--json"]) == 0
    rows = {row["key"]: row for row in json.loads(capsys.readouterr().out)["tensors"]}
    assert rows["layer.weight"]["norm_a"] is None  # NaN, as JSON null
    assert rows["layer.bias"]["norm_a"] == pytest.approx(float(model["layer.bias"].norm()))


@pytest.mark.parametrize(
    ("out", "repo", "message"),
    [
        ("o.safetensors/", "me/repo", "needs a directory output"),
        ("o", "bad id//", "error: argument --push-to-hub: "),
        ("o", "", "error: argument --push-to-hub: "),
    ],
)
def test_push_to_hub_arguments_are_refused_before_merging(
    tmp_path, inputs, capsys, out, repo, message
):
    with pytest.raises(SystemExit) as exc:
        main(["soup", *inputs, "-o", str(tmp_path / out), "--push-to-hub", repo])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / out.rstrip("/")).exists()


def test_a_push_that_cannot_reach_the_hub_is_one_line(tmp_path, inputs, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    out = tmp_path / "o"
    assert main(["soup", *inputs, "-o", str(out), "--push-to-hub", "me/repo"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ladle: error: push_to_hub: uploading {out} to me/repo failed: ")
    assert err.count("\n") == 1
    assert out.is_dir()  # the merge itself is kept


def test_inspect_prints_one_line_per_metadata_entry(tmp_path, capsys):
    # names too: "evil\nmetadata injected: yes" printed a line of its own (and \x1b a colour)
    metadata = {"note": "a\nmetadata x: y", "evil\nmetadata injected: yes": "v", "c\x1b[31m": "r"}
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata=metadata)
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("metadata")]
    assert lines == [
        "metadata 'c\\x1b[31m': r",
        "metadata 'evil\\nmetadata injected: yes': v",
        'metadata note: "a\\nmetadata x: y"',
    ]
    assert main(["inspect", str(tmp_path / "m.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"] == metadata


def test_inspect_escapes_every_line_break_and_control_in_a_metadata_value(tmp_path, capsys):
    # JSON escapes only what lies below U+0020: NEL and U+2028 (line breaks to
    # str.splitlines and many terminals) and C1's CSI went out raw.
    value = "line1\x85line2\u2028line3\x9b31m é"
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata={"n": value})
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert 'metadata n: "line1\\u0085line2\\u2028line3\\u009b31m é"\n' in out
    assert out.splitlines() == out.split("\n")[:-1]  # no line breaks but "\n"
    assert json.loads(out.splitlines()[-1].removeprefix("metadata n: ")) == value


def test_inspect_escapes_keys_that_would_break_a_line_or_the_encoding(tmp_path):
    # A torch file's keys may hold line breaks and lone surrogates; stdout is strict UTF-8 as
    # on most terminals (C.UTF-8 would write the surrogate as a raw byte instead).
    torch.save(
        {"a\nb": torch.ones(2), "c\udce9": torch.ones(2), "é.w": torch.ones(3)}, tmp_path / "k.pt"
    )
    result = _ladle_with_utf8_output("inspect", str(tmp_path / "k.pt"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == [
        "'a\\nb'     float32   2                8 B",
        "'c\\udce9'  float32   2                8 B",
        "é.w        float32   3                12 B",
    ]


def _ladle_with_utf8_output(*args: str) -> subprocess.CompletedProcess:
    """``python -m ladle ARGS`` with strict UTF-8 output, where a lone surrogate cannot be
    written (this machine's C.UTF-8 locale would write it as a raw byte)."""
    return subprocess.run(
        [sys.executable, "-m", "ladle", *args],
        capture_output=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def test_diff_escapes_keys_that_would_break_a_line_or_the_encoding(tmp_path):
    # as inspect does: the table printed "a", a line break and "b"; the lone surrogate
    # failed the whole command ("'utf-8' codec can't encode character")
    for name, value in (("x.pt", 1.0), ("y.pt", 0.0)):
        torch.save({"a\nb": torch.full((2,), value), "c\udce9": torch.ones(2)}, tmp_path / name)
    result = _ladle_with_utf8_output("diff", str(tmp_path / "x.pt"), str(tmp_path / "y.pt"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == [
        "key                 |A|           |B|         |A-B|     cosine",
        "'a\\nb'          1.41421             0       1.41421        nan",
        "'c\\udce9'       1.41421       1.41421             0          1",
    ]


def test_diff_json_writes_null_for_infinite_norms(tmp_path, capsys):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "b.safetensors")
    argv = ["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert main([*argv, "--allow-nonfinite", "--json"]) == 0
    text = capsys.readouterr().out
    assert "Infinity" not in text and "NaN" not in text
    row = json.loads(text)["tensors"][0]
    assert row["norm_b"] is None and row["norm_a"] == pytest.approx(2**0.5)


@pytest.mark.parametrize("seed", ["9223372036854775808", "18446744073709551615", "-1", "x"])
def test_demo_seed_out_of_range_is_a_usage_error(capsys, seed):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--seed", seed])
    assert exc.value.code == 2 and "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["dare", "demo"])
@pytest.mark.parametrize("seed", ["1.5", "x", "1e3"])
def test_a_seed_that_is_no_integer_is_one_message_in_every_command(
    tmp_path, inputs, capsys, command, seed
):
    # Before: `ladle dare --seed 1.5` said argparse's "invalid int value: '1.5'", where
    # `ladle demo` said "expected an integer, found '1.5'" and dare(seed=1.5) "seed: expected
    # an integer, found 1.5".
    models = [*inputs[1:], "--base", inputs[0], "-o", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main([command, "--seed", seed, *(models if command == "dare" else [])])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"ladle {command}: error: argument --seed: expected an integer, found '{seed}'" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sign", ["", "-"])
def test_a_seed_past_pythons_limit_on_digits_says_so_without_echoing_them(
    tmp_path, inputs, capsys, sign
):
    # It said "expected an integer, found '999...'" with every digit, though an integer it
    # is; dare(seed=...) says the limit, as the command now does.
    limit = sys.get_int_max_str_digits()
    seed = sign + "9" * (limit + 1)
    with pytest.raises(SystemExit) as exc:
        main(["dare", inputs[1], "--base", inputs[0], "--seed", seed, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.endswith(
        f"ladle dare: error: argument --seed: expected an integer of at most {limit} digits, "
        f"found {limit + 1}\n"
    )
    with pytest.raises(ValueError, match=f"seed: expected an integer of at most {limit} digits"):
        ladle.dare(inputs[1:], inputs[0], seed=int("9" * limit) * 10 + 9)


def test_a_long_argument_that_is_no_number_is_shown_in_part(tmp_path, inputs, capsys):
    with pytest.raises(SystemExit):
        main(["ties", inputs[1], "--base", inputs[0], "--density", "x" * 5000, "-o", "o"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (
        f"ladle ties: error: argument --density: expected a number, found {'x' * 40!r}... "
        "(5000 characters)"
    )


def test_a_negative_dare_seed_merges_alike_from_the_cli_the_api_and_a_recipe(tmp_path, inputs):
    # DARE hashes its seed (docs/methods/dare.md), so every integer is a seed of its own;
    # the demo, whose seed goes to torch's generators, takes [0, 2**63) in both ways.
    out = tmp_path / "cli.safetensors"
    assert main(["dare", *inputs[1:], "--base", inputs[0], "--seed", "-1", "-o", str(out)]) == 0
    expected = ladle.dare(inputs[1:], inputs[0], seed=-1)
    assert not all(
        torch.equal(v, ladle.dare(inputs[1:], inputs[0], seed=0)[k]) for k, v in expected.items()
    )
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'method = "dare"\nmodels = {json.dumps(inputs[1:])}\nbase = {json.dumps(inputs[0])}\n'
        'output = "recipe.safetensors"\n[parameters]\nseed = -1\n'
    )
    assert main(["run", str(recipe)]) == 0
    for path in (out, tmp_path / "recipe.safetensors"):
        merged = ladle.load(path)
        assert all(torch.equal(merged[k], v) for k, v in expected.items()), path


def test_sigterm_exits_143_and_leaves_no_output(tmp_path, inputs, capsys, monkeypatch):
    import os
    import signal
    import time

    from ladle.writer import SafetensorsWriter

    def terminated(self, key, chunk):  # as `kill`, `timeout` or a scheduler would
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in here, long before this ends

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(SafetensorsWriter, "write", terminated)
    out = tmp_path / "out"
    assert main(["soup", *inputs, "-o", str(out), "--no-progress"]) == 143
    assert capsys.readouterr().err == "ladle: terminated\n"
    # The temporary output, whose disk space was reserved, is gone with the rest.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handling again


@pytest.mark.filterwarnings("default")  # as a plain `ladle` process shows them
def test_warnings_are_one_line_like_errors(tmp_path, capsys):
    base = {"w": torch.tensor([1.0, 1.0])}
    models = [{"w": torch.tensor([2.0, 3.0])}, {"w": torch.tensor([-1.0, -3.0])}]  # cos = -1
    for name, model in [("base", base), ("a", models[0]), ("b", models[1])]:
        save_file(model, tmp_path / f"{name}.safetensors")
    argv = ["stock", "--base", str(tmp_path / "base.safetensors")]
    argv += [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert main([*argv, "-o", str(tmp_path / "o.safetensors"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("ladle: warning: model_stock: key 'w'") and err.count("\n") == 1
    with warnings.catch_warnings():  # `python -W error -m ladle ...`: a traceback was printed
        warnings.simplefilter("error")
        assert main([*argv, "-o", str(tmp_path / "e.safetensors"), "--no-progress"]) == 1
    assert capsys.readouterr().err == err.replace("warning", "error", 1)
    assert not (tmp_path / "e.safetensors").exists()


def test_push_to_hub_while_offline_is_refused_before_merging(tmp_path, inputs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as caught:
        main(["soup", *inputs, "-o", str(out), "--push-to-hub", "me/merged"])
    assert caught.value.code == 2 and not out.exists()


def test_max_shard_size_with_a_single_file_output_is_a_usage_error(tmp_path, inputs, capsys):
    out = tmp_path / "o.safetensors"
    with pytest.raises(SystemExit) as caught:
        main(["soup", *inputs, "-o", str(out), "--max-shard-size", "1KB"])
    assert caught.value.code == 2 and not out.exists()
    assert "--max-shard-size applies to a directory output" in capsys.readouterr().err
    assert main(["soup", *inputs, "-o", str(tmp_path / "d"), "--max-shard-size", "64"]) == 0
    assert len(list((tmp_path / "d").glob("model-*-of-*.safetensors"))) > 1


@pytest.mark.parametrize(
    ("options", "offline", "message"),
    [
        (["-o", "o.safetensors", "--max-shard-size", "1KB"], "0", "--max-shard-size applies"),
        (["-o", "o.safetensors", "--push-to-hub", "me/m"], "0", "--push-to-hub needs a dir"),
        (["-o", "o", "--push-to-hub", "me/m"], "1", "--push-to-hub needs the Hub"),
        (["-o", "-"], "0", "-o -: ladle writes files, not standard output"),  # was a dir '-'
        (["-o", ""], "0", "-o '': expected a path to write, found an empty one"),  # "out: ..."
    ],
)
def test_usage_errors_found_after_parsing_show_the_sub_commands_usage(
    tmp_path, inputs, capsys, monkeypatch, options, offline, message
):
    # As argparse's own errors do (`ladle soup: error: ...`); they showed `ladle`'s usage
    # line (`ladle [-h] [--version] [--debug] COMMAND ...`) and `ladle: error: ...`.
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(SystemExit) as caught:
        main(["ties", "--base", inputs[0], *inputs[1:], *options])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.startswith("usage: ladle ties [-h] -o OUT")
    assert err.splitlines()[-1].startswith(f"ladle ties: error: {message}")
    assert list((tmp_path / "work").iterdir()) == []


def test_sigterm_left_alone_where_it_is_ignored_handled_or_under_torchrun(
    tmp_path, inputs, monkeypatch
):
    import os
    import signal

    from ladle.cli import _terminate_like_interrupt
    from ladle.writer import SafetensorsWriter

    original = SafetensorsWriter.write

    def terminated(self, key, chunk):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, key, chunk)

    monkeypatch.setattr(SafetensorsWriter, "write", terminated)
    seen = []
    dispositions = (signal.SIG_IGN, lambda signum, frame: seen.append(signum))
    for number, disposition in enumerate(dispositions):
        before = signal.signal(signal.SIGTERM, disposition)
        try:
            out = tmp_path / f"out{number}"
            assert main(["soup", *inputs, "-o", str(out), "--no-progress"]) == 0
            assert out.is_dir()
        finally:
            signal.signal(signal.SIGTERM, before)
    assert seen and set(seen) == {signal.SIGTERM}  # the program's own handler ran
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun rank: torchrun's SIGTERM must kill
    with _terminate_like_interrupt():
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_file_output_under_torchrun_is_a_usage_error_on_every_rank(
    tmp_path, inputs, monkeypatch, capsys, rank
):
    # Refused at parsing, before any process group: found in the merge, one rank's error
    # could end the other before it printed why.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exit_info:
        main(["ties", inputs[1], "--base", inputs[0], "-o", str(tmp_path / "m.safetensors")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: ladle ties" in err
    assert "split across processes (torchrun) writes a directory of shards" in err
    assert not list(tmp_path.glob("*m.safetensors*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ties", "--density", "0"], "argument --density: expected a number in (0, 1], found 0.0"),
        (
            ["ties", "--density", "nan"],
            "argument --density: expected a number in (0, 1], found nan",
        ),
        (["ties", "--density", "x"], "argument --density: expected a number, found 'x'"),
        (["dare", "--density", "1e-9"], "argument --density: expected at least 2**-24"),
        (
            ["dare", "--density", "1.5"],
            "argument --density: expected a number in (0, 1], found 1.5",
        ),
        (["task-arithmetic", "--scale", "inf"], "argument --scale: expected a finite number"),
        (["ties", "--scale", "nan"], "argument --scale: expected a finite number, found nan"),
    ],
)
def test_a_bad_density_or_scale_is_a_usage_error_before_any_merging(
    tmp_path, inputs, capsys, args, message
):
    # The methods' own checks, run by the parser: exit status 2 with the command's usage,
    # as README says of usage errors (they were merge errors, status 1).
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *inputs[1:], "--base", inputs[0], "-o", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: ladle {args[0]}" in err
    assert f"ladle {args[0]}: error: {message}" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["soup", "M0", "M1", "--weights", "1"], "--weights: expected 2 weights (one per model)"),
        (["soup", "M0", "M1", "--weights", "1", "-1"], "--weights: expected finite weights with"),
        (
            ["task-arithmetic", "--base", "M0", "M1", "M2", "--weights", "1", "2", "3"],
            "--weights: expected 2 weights (one per model), found 3",
        ),
        (["stock", "--base", "M0", "M1"], "Model Stock needs at least 2 models, found 1"),
        (["slerp", "M0", "M1", "M2"], "slerp interpolates exactly 2 models, found 3"),
        (["slerp", "M0"], "slerp interpolates exactly 2 models, found 1"),
        (
            ["greedy-soup", "M0", "M1", "--evaluate", "os:getcwd", "--scores", "1"],
            "--scores: expected 2 scores (one per model), found 1",
        ),
        (
            ["greedy-soup", "M0", "M1", "--evaluate", "os:getcwd", "--scores", "nan", "1"],
            "--scores: expected numbers, found NaN",
        ),
    ],
)
def test_counts_the_command_line_shows_alone_are_usage_errors(
    tmp_path, inputs, capsys, argv, message
):
    # They were merge errors (status 1, after opening every input): a wrong number of
    # --weights or --scores, or of models for stock and slerp, is seen in the arguments.
    out = tmp_path / "out"
    argv = [inputs[int(a[1])] if re.fullmatch(r"M\d", a) else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "-o", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: ladle {argv[0]}" in err and f"ladle {argv[0]}: error: {message}" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("signal_name", "code", "said"),
    [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")],
)
def test_interrupted_while_evaluate_s_module_imports_is_no_traceback(
    tmp_path, inputs, capsys, signal_name, code, said
):
    # --evaluate imports the user's module while the arguments are parsed (a module that
    # imports datasets takes seconds): Ctrl-C there printed KeyboardInterrupt's traceback,
    # and SIGTERM killed the process without a word.
    (tmp_path / "slow_eval.py").write_text(
        "import os, signal\n"
        f"os.kill(os.getpid(), signal.{signal_name})\n"
        "def score(state_dict):\n    return 0.0\n"
    )
    before = signal.getsignal(signal.SIGTERM)
    if before is not signal.SIG_DFL:  # ladle leaves a handler of the caller's own alone
        pytest.skip("SIGTERM is handled by the test runner here")
    evaluate = f"{tmp_path / 'slow_eval.py'}:score"
    out = tmp_path / "out"
    assert main(["greedy-soup", *inputs, "--evaluate", evaluate, "-o", str(out)]) == code
    assert capsys.readouterr().err == f"ladle: {said}\n"
    assert signal.getsignal(signal.SIGTERM) == before and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signal_name", "code", "said"),
    [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")],
)
def test_a_signal_while_torch_imports_stops_the_command(tmp_path, inputs, signal_name, code, said):
    # torch is imported once the arguments are parsed. Ctrl-C while torch imported numpy was
    # swallowed by torch's C code: the merge ran to its end, status 0; SIGTERM between
    # parsing and the merge killed the process without a word. The signal comes here the
    # moment numpy's import starts (in a fresh process, where torch's import asks first).
    hook = (
        "import importlib.abc, os, signal, sys\n"
        "class Hook(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'numpy':\n"
        "            sys.meta_path.remove(self)\n"
        f"            os.kill(os.getpid(), signal.{signal_name})\n"
        "sys.meta_path.insert(0, Hook())\n"
        "import ladle.cli\n"
        "sys.exit(ladle.cli.main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", hook, "soup", *inputs, "-o", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (done.returncode, done.stderr) == (code, f"ladle: {said}\n")
    assert not out.exists()


def test_a_torch_that_fails_to_import_is_one_line_and_debug_shows_its_traceback(tmp_path, inputs):
    # A broken torch install raises an OSError (a missing shared library) where the command
    # imports torch: --debug printed one line, not the traceback that it promises.
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise OSError('libtorch_cpu.so: cannot open shared object file')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), *sys.path])}
    out = tmp_path / "out.safetensors"
    for debug in ([], ["--debug"]):
        done = subprocess.run(
            [sys.executable, "-m", "ladle", *debug, "soup", *inputs, "-o", str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 1
        if debug:
            assert done.stderr.startswith("Traceback (most recent call last):")
            assert done.stderr.endswith(
                "OSError: libtorch_cpu.so: cannot open shared object file\n"
            )
        else:
            assert done.stderr == "ladle: error: libtorch_cpu.so: cannot open shared object file\n"
    assert not out.exists()


def test_a_warning_while_a_progress_bar_is_drawn_is_on_a_line_of_its_own(monkeypatch):
    # Model Stock warns in its "preparing" pass: the warning was printed at the end of the
    # bar's line, and a stale bar left above the one redrawn after it
    import io

    from tqdm import tqdm

    from ladle.cli import _show_warning

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with tqdm(total=10, file=stream, desc="preparing", ascii=True) as bar:
        bar.update(1)
        _show_warning("model_stock: key 'w': t clamped", UserWarning, "x.py", 1)
    before, warning, after = stream.getvalue().partition("ladle: warning: model_stock: ")
    assert warning and after.startswith("key 'w': t clamped\n")
    assert before.startswith("\rpreparing:") and before.endswith("\r")  # the bar cleared first


# Gaps found by mutation testing: each test below fails on a small change to the code.


def test_inspect_shows_sizes_at_the_unit_boundary_and_0d_tensors_as_scalar(tmp_path, capsys):
    tensors = {
        "s": torch.tensor(1.0),
        "u": torch.zeros(1023, dtype=torch.uint8),
        "w": torch.zeros(256),  # exactly 1024 bytes: 1.0 KiB, not 1024 B
    }
    save_file(tensors, tmp_path / "m.safetensors")
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "s  float32   scalar           4 B",
        "u  uint8     1023             1023 B",
        "w  float32   256              1.0 KiB",
        f"3 tensors, 1,280 parameters, 2.0 KiB ({tmp_path / 'm.safetensors'})",
    ]


def test_byte_counts_beyond_the_largest_unit_stay_in_tib():
    from ladle.cli import _format_bytes

    assert _format_bytes(1023) == "1023 B"
    assert _format_bytes(1024) == "1.0 KiB"
    assert _format_bytes(3 * 2**40) == "3.0 TiB"
    assert _format_bytes(2**50) == "1024.0 TiB"


def test_inspect_of_an_empty_checkpoint_says_0_tensors_and_sorts_its_metadata(tmp_path, capsys):
    # safetensors returns the metadata in no fixed order: twelve entries are sorted by ladle.
    names = list("qwertyuiopzx")
    save_file({}, tmp_path / "e.safetensors", metadata={n: n.upper() for n in names})
    assert main(["inspect", str(tmp_path / "e.safetensors")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"0 tensors, 0 parameters, 0 B ({tmp_path / 'e.safetensors'})",
        *[f"metadata {n}: {n.upper()}" for n in sorted(names)],
    ]


def test_diff_table_columns_line_up_under_the_header_for_a_short_key(tmp_path, capsys):
    save_file({"w": torch.tensor([1.0, 0.0])}, tmp_path / "a.safetensors")
    save_file({"w": torch.tensor([0.0, 2.0])}, tmp_path / "b.safetensors")
    assert main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "key           |A|           |B|         |A-B|     cosine",
        "w               1             2       2.23607          0",
    ]


@pytest.mark.parametrize("size", ["auto", "²"])
def test_a_world_size_that_is_not_a_number_means_one_process(tmp_path, inputs, monkeypatch, size):
    # Only torchrun's WORLD_SIZE (digits) splits a merge; anything else runs it here, so a
    # single-file output is fine. "²" is a digit to str.isdigit(), not to int(): a
    # ValueError traceback, even from `ladle --version`.
    monkeypatch.setenv("WORLD_SIZE", size)
    out = tmp_path / "o.safetensors"
    assert main(["soup", *inputs, "-o", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert out.is_file()


@pytest.mark.parametrize(
    ("command", "method", "options", "parameters"),
    [
        ("soup", "uniform_soup", ["--weights", "1", "3", "2"], {"weights": [1, 3, 2]}),
        (
            "task-arithmetic",
            "task_arithmetic",
            ["--scale", "0.5", "--weights", "1", "-2"],
            {"scale": 0.5, "weights": [1, -2]},
        ),
        (
            "ties",
            "ties",
            ["--density", "0.5", "--scale", "0.7", "--trim", "tensor"],
            {"density": 0.5, "scale": 0.7, "trim": "tensor"},
        ),
        (
            "dare",
            "dare",
            ["--density", "0.5", "--scale", "0.7", "--seed", "3", "--combine", "ties"],
            {"density": 0.5, "scale": 0.7, "seed": 3, "combine": "ties"},
        ),
        ("stock", "model_stock", [], {}),
    ],
)
def test_each_merge_command_writes_what_its_method_returns_by_default_and_with_options(
    tmp_path, inputs, command, method, options, parameters
):
    # Every option reaches its parameter, and a default left out is the method's own.
    from ladle.cli import build_parser

    function = getattr(ladle, method)
    models, base = (inputs, {}) if command == "soup" else (inputs[1:], {"base": inputs[0]})
    argv = [command, *models, *(["--base", base["base"]] if base else [])]
    parsed = build_parser().parse_args([*argv, "-o", "o"])
    signature = inspect.signature(function).parameters
    assert {p: getattr(parsed, p) for p in parsed.params if p != "base"} == {
        p: signature[p].default for p in parsed.params if p != "base"
    }
    for given, kwargs in [([], {}), (options, parameters)][: 2 if options else 1]:
        out = tmp_path / f"{command}{len(given)}.safetensors"
        assert main([*argv, *given, "-o", str(out), "--device", "cpu", "--no-progress"]) == 0
        expected = function(models, **base, **kwargs, device="cpu")
        merged = ladle.load(out)
        assert merged.keys() == expected.keys()
        assert all(torch.equal(merged[k], expected[k]) for k in expected), given
        if given:  # the options make a difference the test can see
            default = ladle.load(tmp_path / f"{command}0.safetensors")
            assert not all(torch.equal(merged[k], default[k]) for k in merged), command


def test_help_names_the_writers_default_shard_size(capsys):
    from ladle.writer import DEFAULT_MAX_SHARD_SIZE

    with pytest.raises(SystemExit):
        main(["soup", "--help"])
    assert f"(default: {DEFAULT_MAX_SHARD_SIZE})" in " ".join(capsys.readouterr().out.split())


def test_the_shared_options_reach_the_merge_and_progress_shows_only_on_a_terminal(
    monkeypatch,
):
    from ladle.cli import build_parser, merge_kwargs
    from ladle.writer import DEFAULT_MAX_SHARD_SIZE

    def kwargs(*options: str, terminal: bool) -> dict:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
        return merge_kwargs(build_parser().parse_args(["soup", "a", "-o", "d", *options]))

    defaults = {
        "out": "d",
        "device": None,
        "dtype": None,
        "max_shard_size": DEFAULT_MAX_SHARD_SIZE,
        "overwrite": False,
        "progress": True,
        "allow_nonfinite": False,
    }
    assert kwargs(terminal=True) == defaults
    assert kwargs(terminal=False) == {**defaults, "progress": False}
    assert kwargs("--no-progress", terminal=True) == {**defaults, "progress": False}
    given = ["--device", "cpu", "--dtype", "FP16", "--max-shard-size", "1KB"]
    assert kwargs(*given, "--overwrite", "--allow-nonfinite", terminal=True) == {
        **defaults,
        "device": "cpu",
        "dtype": torch.float16,
        "max_shard_size": 1000,
        "overwrite": True,
        "allow_nonfinite": True,
    }


def test_run_passes_device_overwrite_and_progress_on_a_terminal_to_run_recipe(monkeypatch):
    import ladle.recipe

    calls = []

    def run_recipe(recipe, *, on_output, **kw):
        calls.append(kw)
        on_output("step", Path("out"))  # printed as it comes
        return {}

    monkeypatch.setattr(ladle.recipe, "run_recipe", run_recipe)
    for terminal, options in [(True, []), (False, []), (True, ["--no-progress"])]:
        monkeypatch.setattr(sys.stderr, "isatty", lambda terminal=terminal: terminal)
        assert main(["run", "r.toml", *options]) == 0
    assert main(["run", "r.toml", "--device", "cpu", "--overwrite"]) == 0
    assert calls == [
        {"device": None, "overwrite": False, "progress": True},
        {"device": None, "overwrite": False, "progress": False},
        {"device": None, "overwrite": False, "progress": False},
        {"device": "cpu", "overwrite": True, "progress": True},
    ]


def test_demo_passes_its_options_and_runs_on_the_cpu_by_default(monkeypatch):
    import ladle.demo

    calls = []
    monkeypatch.setattr(ladle.demo, "run_demo", lambda **kwargs: calls.append(kwargs))
    assert main(["demo"]) == 0
    assert main(["demo", "--seed", "5", "--size", "small", "--workdir", "w", "--device", "x"]) == 0
    streams = [call.pop("stream") for call in calls]  # standard output, failures named
    assert calls == [
        {"seed": 0, "size": "default", "workdir": None, "device": "cpu"},
        {"seed": 5, "size": "small", "workdir": "w", "device": "x"},
    ]
    assert all(stream is ladle.cli._STDOUT for stream in streams)


def test_under_torchrun_a_command_that_does_not_split_runs_on_rank_0_alone(
    inputs, monkeypatch, capsys
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert main(["inspect", inputs[0]]) == 0
        printed = capsys.readouterr().out
        assert (printed == "") == (rank == "1"), rank
    assert "5 tensors" in printed


def test_an_os_error_in_a_merge_is_one_line_with_exit_1(tmp_path, inputs, monkeypatch, capsys):
    import ladle

    def unreadable(models, **kwargs):
        raise PermissionError(13, "Permission denied", models[1])

    monkeypatch.setattr(ladle, "uniform_soup", unreadable)
    assert main(["soup", *inputs, "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err == f"ladle: error: [Errno 13] Permission denied: '{inputs[1]}'\n"


def test_a_bad_max_shard_size_is_a_usage_error_saying_what_a_size_looks_like(
    tmp_path, inputs, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        main(["soup", *inputs, "-o", str(tmp_path / "o"), "--max-shard-size", "banana"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "ladle soup: error: argument --max-shard-size: " in err
    assert "expected e.g. '5GB' or '500MiB', found 'banana'" in err
    assert "max_shard_size" not in err  # the option is named once, as the command line spells it
    assert not (tmp_path / "o").exists()


def test_a_negative_max_shard_size_is_read_as_a_size_not_an_option(tmp_path, inputs, capsys):
    # argparse took "-5GB" for an option: "expected one argument".
    with pytest.raises(SystemExit) as exit_info:
        main(["soup", *inputs, "-o", str(tmp_path / "o"), "--max-shard-size", "-5GB"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.splitlines()[-1] == (
        "ladle soup: error: argument --max-shard-size: expected at least 1 byte, found '-5GB'"
    )
    assert not (tmp_path / "o").exists()


def test_main_called_from_a_thread_runs_without_touching_signals(inputs, capsys):
    # Signal handlers belong to the main thread: from another, SIGTERM is left as it is.
    import threading

    statuses = []
    thread = threading.Thread(target=lambda: statuses.append(main(["inspect", inputs[0]])))
    thread.start()
    thread.join()
    assert statuses == [0]
    assert "5 tensors" in capsys.readouterr().out


def _ladle_shell(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m ladle`` run by a shell (for its redirections)."""
    return subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m ladle {command}'],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
    )


@pytest.mark.slow
def test_a_closed_standard_output_is_no_traceback(tmp_path, inputs):
    # Closed (>&-): sys.stdout is None, and "'NoneType' object has no attribute 'flush'"
    # came with a traceback and status 1 after a merge that had succeeded.
    closed = _ladle_shell(f"soup {inputs[0]} {inputs[1]} -o {tmp_path / 'o'} >&-", tmp_path)
    assert (closed.returncode, closed.stderr) == (0, "")
    assert (tmp_path / "o" / "model.safetensors").is_file()


@pytest.mark.slow
def test_keys_an_ascii_standard_output_cannot_encode_are_escaped(tmp_path):
    # "'ascii' codec can't encode characters in position 0-4", status 1, after one row
    save_file({"вес": torch.ones(2), "w": torch.ones(1)}, tmp_path / "u.safetensors")
    result = _ladle_shell("inspect u.safetensors", tmp_path, PYTHONIOENCODING="ascii")
    assert result.returncode == 0, result.stderr
    assert "\\u0432\\u0435\\u0441  float32" in result.stdout


@pytest.mark.slow
def test_help_on_an_ascii_standard_output_escapes_its_greek(tmp_path):
    # "'ascii' codec can't encode character '\\u03bb'" and a traceback: --help printed
    # before the output's errors were set to backslashreplace.
    result = _ladle_shell("task-arithmetic --help", tmp_path, PYTHONIOENCODING="ascii")
    assert (result.returncode, result.stderr) == (0, "")
    assert "\\u03bb (default: 1.0)" in result.stdout


def test_negative_numbers_in_scientific_notation_are_numbers(tmp_path, inputs):
    # "unrecognized arguments: -1e-3" (argparse before 3.13 took it for an option)
    base, *models = inputs
    out = tmp_path / "ta.safetensors"
    argv = ["task-arithmetic", "--base", base, *models, "--weights", "1", "-1e-3"]
    assert main([*argv, "--scale", "-2E0", "-o", str(out)]) == 0
    expected = ladle.task_arithmetic(models, base, weights=[1, -1e-3], scale=-2.0)
    merged = ladle.load(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_an_empty_device_or_workdir_or_a_rank_that_is_no_number_is_refused(
    tmp_path, inputs, capsys, monkeypatch
):
    # diff took --device "" for the CPU; demo --workdir "" wrote into (and over files in)
    # the working directory; RANK=x was a ValueError traceback
    assert main(["diff", inputs[0], inputs[1], "--device", ""]) == 1
    assert capsys.readouterr().err.startswith("ladle: error: device: expected cpu, cuda, ")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--size", "small", "--workdir", ""]) == 1
    assert capsys.readouterr().err == "ladle: error: workdir: expected a path, found an empty one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m0.safetensors",
        "m1.safetensors",
        "m2.safetensors",
    ]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("x", "²"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exited:
            main(["inspect", inputs[0]])
        assert exited.value.code == 2
        assert f"RANK={rank!r}: expected the process's rank (0, 1, ...)" in capsys.readouterr().err


def test_ladle_run_names_each_output_as_it_is_written_before_a_later_step_fails(
    tmp_path, inputs, capsys
):
    # Nothing was printed when a later step failed, though step "one" had been written; the
    # error told to pass --allow-nonfinite, which ladle run does not take.
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[steps.one]\nmethod = "soup"\nmodels = ["{inputs[1]}", "{inputs[2]}"]\n'
        'output = "one.safetensors"\n'
        f'[steps.two]\nmethod = "task_arithmetic"\nmodels = ["one"]\nbase = "{inputs[0]}"\n'
        'output = "two.safetensors"\n[steps.two.parameters]\nscale = 1e300\n'
    )
    assert main(["run", str(recipe), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"one: {tmp_path / 'one.safetensors'}\n"
    assert captured.err.startswith("ladle: error: steps.two: ")
    assert captured.err.endswith(
        "; allow_nonfinite = true (in the step's parameters) keeps them as they are\n"
    )
    assert not (tmp_path / "two.safetensors").exists()


def test_a_closed_standard_error_neither_fails_a_merge_nor_sends_errors_to_stdout(
    tmp_path, inputs, monkeypatch, capsys
):
    # 2>&-: sys.stderr is None; "progress" asked it isatty(), an AttributeError that main
    # did not catch: status 1, no output, and no word (the traceback went nowhere).
    monkeypatch.setattr(sys, "stderr", None)
    assert main(["soup", *inputs[:2], "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert capsys.readouterr().out == f"{tmp_path / 'o'}\n"
    assert main(["soup", *inputs[:2], "-o", str(tmp_path / "o")]) == 1  # exists: refused
    assert capsys.readouterr().out == ""  # print(file=None) wrote the error line here
    # A usage error: argparse printed its usage to standard output where stderr was None.
    for argv in (
        ["inspect", inputs[0], "--bogus"],
        ["soup", *inputs[:2], "-o", "x", "--weights", "1"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().out == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="Linux /dev/full")
@pytest.mark.parametrize("command", ["soup", "run"])
def test_a_full_standard_output_is_named_as_such_after_the_merge_is_written(
    tmp_path, inputs, monkeypatch, capsys, command
):
    recipe = tmp_path / "r.toml"
    models = json.dumps([str(path) for path in inputs[:2]])  # a TOML array of strings too
    recipe.write_text(f'method = "soup"\nmodels = {models}\noutput = "o.safetensors"\n')
    argv = (
        ["run", str(recipe)]
        if command == "run"
        else ["soup", *inputs[:2], "-o", str(tmp_path / "o.safetensors")]
    )
    full = open("/dev/full", "w")  # noqa: SIM115
    monkeypatch.setattr(sys, "stdout", full)
    assert main(argv) == 1
    full.buffer.raw.close()  # what is buffered can never be written
    assert capsys.readouterr().err == (
        "ladle: error: [Errno 28] writing to standard output: No space left on device\n"
    )
    assert (tmp_path / "o.safetensors").is_file()


# --- pinned by mutation testing (round 4): each fails on the mutant named -------------------


def test_a_command_that_does_not_split_writes_its_file_output_on_rank_0_under_torchrun(
    tmp_path, inputs, monkeypatch
):
    # Only the split commands refuse a file output under torchrun (C04): greedy-soup runs on
    # rank 0 alone, so its file output is fine there.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "evals.py").write_text("def score(sd):\n    return 1.0\n")
    out = tmp_path / "g.safetensors"
    evaluate = f"{tmp_path / 'evals.py'}:score"
    assert main(["greedy-soup", *inputs, "--evaluate", evaluate, "-o", str(out)]) == 0
    assert out.is_file()


def test_rank_without_world_size_is_no_torchrun_and_runs_the_command(inputs, monkeypatch, capsys):
    # A RANK left in the environment without torchrun's WORLD_SIZE: one process (C05: rank 1
    # printed nothing, its work skipped).
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert main(["inspect", inputs[0]]) == 0
    assert "5 tensors" in capsys.readouterr().out


@pytest.fixture
def rank_1(monkeypatch):
    """This process as rank 1 of 2 under torchrun, with no real group: the split merge is
    stood in for by the function given to ``split``."""
    import contextlib

    import ladle.distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(ladle.distributed, "_torchrun_group", contextlib.nullcontext)

    def split(merge):
        monkeypatch.setattr(ladle.distributed, "merge", merge)

    return split


def test_under_torchrun_only_rank_0_pushes_the_output(tmp_path, monkeypatch, rank_1):
    from huggingface_hub import constants

    import ladle.hub

    rank_1(lambda method, models, **kwargs: kwargs["out"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # As huggingface_hub read it when first imported (by a test that set it, when this file
    # runs alone, or in the caller's environment).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    pushed = []
    monkeypatch.setattr(ladle.hub, "push_to_hub", lambda *args: pushed.append(args) or "url")
    assert main(["soup", "a", "b", "-o", str(tmp_path / "o"), "--push-to-hub", "me/m"]) == 0
    assert pushed == []  # C10: every rank pushed


def test_under_torchrun_only_rank_0_prints_a_split_merge_s_error(tmp_path, rank_1, capsys):
    def failing(method, models, **kwargs):
        raise ladle.LadleError("the same error on every rank")

    rank_1(failing)
    assert main(["soup", "a", "b", "-o", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == ""  # C11: each rank printed it


def test_inspect_json_names_dtypes_without_torchs_prefix(tmp_path, capsys):
    path = ladle.save({"w": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "m.safetensors")
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"][0]["dtype"] == "bfloat16"  # C22


@pytest.mark.parametrize("text", ["-inf", "-Infinity", "-1e-3", "-.5"])
def test_negative_numbers_of_every_spelling_are_read_as_numbers(text):
    from ladle.cli import build_parser

    args = build_parser().parse_args(["soup", "a", "b", "-o", "x", "--weights", "1", text])
    assert args.weights == [1.0, float(text)]  # C27: "-inf" was taken for an option


def test_numbers_print_minus_zero_as_zero():
    from ladle.cli import _number

    assert (_number(-0.0), _number(0.0), _number(-1.5)) == ("0", "0", "-1.5")  # C36


@pytest.mark.slow
def test_no_bars_from_huggingface_hub_where_ladle_shows_none(local_hub, tmp_path):  # noqa: F811
    # `--no-progress` (or standard error no terminal) printed huggingface_hub's "Fetching N
    # files" bars of every download into the log all the same.
    hub, model = local_hub
    out = tmp_path / "soup.safetensors"
    for quiet in (["--no-progress"], []):  # standard error is a pipe: no terminal either way
        done = _ladle(["soup", "hf://org/m", "-o", str(out), "--overwrite", *quiet], None, True)
        assert (done.returncode, done.stderr) == (0, "")
        assert torch.equal(ladle.load(out)["layer.weight"], model["layer.weight"])
    assert hub.downloaded() == {"config.json", "model.safetensors", "README.md", "LICENSE"}


def test_huggingface_hub_bars_are_as_they_were_after_a_quiet_command(local_hub, tmp_path):  # noqa: F811
    from huggingface_hub.utils import are_progress_bars_disabled

    assert not are_progress_bars_disabled()
    out = tmp_path / "soup.safetensors"
    assert main(["soup", "hf://org/m", "-o", str(out), "--no-progress"]) == 0
    assert not are_progress_bars_disabled()


def test_inspect_and_diff_take_no_progress_for_their_download_bars(monkeypatch, tmp_path):
    # Only the merges took --no-progress: a script passing it to every command stopped at
    # inspect and diff, whose hf:// sources show huggingface_hub's bars on a terminal.
    from huggingface_hub.utils import are_progress_bars_disabled

    import ladle.checkpoint
    import ladle.compare

    path = ladle.save({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    seen = []
    opened, diffed = ladle.checkpoint.open_checkpoint, ladle.compare.diff

    def watched(run):
        def call(*args, **kwargs):
            seen.append(are_progress_bars_disabled())
            return run(*args, **kwargs)

        return call

    monkeypatch.setattr(ladle.checkpoint, "open_checkpoint", watched(opened))
    monkeypatch.setattr(ladle.compare, "diff", watched(diffed))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    for quiet in ([], ["--no-progress"]):
        assert main(["inspect", str(path), *quiet]) == 0
        assert main(["diff", str(path), str(path), *quiet]) == 0
    assert seen == [False, False, True, True]
    assert not are_progress_bars_disabled()  # as they were
