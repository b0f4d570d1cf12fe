"""What the benchmarks share: building inputs, timing a child process, sampling its memory."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

MIB = 2**20


def load_ladle() -> None:
    """Import every module of ladle now, and what ``--no-progress`` imports of
    huggingface_hub: ``import ladle`` alone loads none of its modules (nor torch) until a name
    is used, so a run timed after it alone counted the imports' 1.5–2 s (from ec23802, which
    made ``import ladle`` lazy, until this was found on 2026-12-02). For benchmarks that time
    ladle in their own process, and in child processes through :data:`LADLE_SETUP`."""
    import ladle
    import ladle.hub

    for name in ladle.__all__:
        getattr(ladle, name)
    with ladle.hub.progress_bars_off():
        pass


LADLE_SETUP = (
    f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
    "from common import load_ladle\nload_ladle()\nimport ladle\nfrom ladle.cli import main"
)
"""The setup of a timed ladle run in a child process: every import of the run
(:func:`load_ladle`), then ``ladle`` and the CLI's ``main`` for the timed work to call."""


SETTLED = ("ladle", "torch", "safetensors", "numpy", "huggingface_hub")
"""Packages :func:`python_timed` refuses to see first imported while timed, for ladle runs."""


@dataclass(frozen=True)
class Run:
    seconds: float  # net of start-up for python_timed commands, else wall time
    peak_anon: int  # bytes of RssAnon at its highest


LADLE_MAIN = "_status = main(sys.argv[1:])\nif _status:\n    raise SystemExit(_status)"
"""Timed work: the ``ladle`` command line on ``sys.argv[1:]``; a failed merge (status 1, its
error on stderr) fails the benchmark instead of being timed as a run."""


def python_timed(setup: str, work: str, *args: str, settled: tuple[str, ...] = ()) -> list[str]:
    """A python command that times ``work`` alone, after ``setup`` (imports) has run.

    The command fails, naming them, where ``work`` imported modules of ``settled`` packages:
    start-up the setup was meant to take out of the figure.
    """
    code = (
        f"{setup}\nimport os as _os, sys as _sys, time as _time\n_loaded = set(_sys.modules)\n"
        f"_t0 = _time.perf_counter()\n{work}\n_t1 = _time.perf_counter()\n"
        f"_late = sorted(m for m in set(_sys.modules) - _loaded\n"
        f"               if m.split('.')[0] in {settled!r})\n"
        "if _late:\n    raise SystemExit(f'imported while timed, add to the setup: {_late}')\n"
        "open(_os.environ['BENCH_SECONDS'], 'w').write(str(_t1 - _t0))\n"
    )
    return [sys.executable, "-c", code, *args]


def fresh(setup: str, out: str | Path) -> str:
    """``setup`` that also deletes ``out`` (a file or a directory) before the clock starts, so
    that a timed run writes a new output instead of freeing the last run's in its rename."""
    return (
        f"{setup}\nimport os as _os, shutil as _shutil\n_out = {str(out)!r}\n"
        "if _os.path.isdir(_out):\n    _shutil.rmtree(_out)\n"
        "elif _os.path.exists(_out):\n    _os.remove(_out)\n"
    )


def run(argv: list[str]) -> Run:
    """Seconds and peak RssAnon of a child process (memory sampled every millisecond).

    RssAnon leaves out file pages mapped from the page cache (VmRSS counts them), so it is the
    memory a merge really takes from the machine. A ``python_timed`` child reports its own
    net seconds, which keeps interpreter and import start-up out of the figure.
    """
    with tempfile.TemporaryDirectory() as scratch:
        seconds_file = Path(scratch) / "seconds"
        env = {**os.environ, "BENCH_SECONDS": str(seconds_file)}
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        status = Path(f"/proc/{child.pid}/status")
        peak = 0
        while child.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.001)
        seconds = time.perf_counter() - start
        _, err = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"benchmark step failed: {' '.join(argv)}\n{err.decode()[-2000:]}")
        if seconds_file.exists():
            seconds = float(seconds_file.read_text())
    return Run(seconds, peak)


def best_of(repeat: int, argv: list[str]) -> Run:
    """The fastest of ``repeat`` runs, with the highest memory peak seen."""
    runs = [run(argv) for _ in range(repeat)]
    return Run(min(r.seconds for r in runs), max(r.peak_anon for r in runs))


def read_floor(repeat: int, paths: list[Path]) -> Run:
    """The best time of ``cat`` reading ``paths``, net of a process's start-up (the best of
    ``true``, timed the same way: fork, exec and the memory sampler's wait, about 1.5 ms),
    as every other figure is net of its interpreter's."""
    started = best_of(repeat, ["true"]).seconds
    cat = best_of(repeat, ["cat", *map(str, paths)])
    return Run(max(cat.seconds - started, 1e-6), cat.peak_anon)


def warm(paths: list[Path]) -> None:
    """Read every input once so that timings see a warm page cache."""
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


def llama_family(
    workdir: Path,
    count: int,
    *,
    hidden: int = 1024,
    intermediate: int = 2816,
    layers: int = 4,
    vocab: int = 8192,
    dtype: torch.dtype = torch.float32,
    spread: float = 0.01,
) -> tuple[Path, list[Path]]:
    """A base and ``count`` fine-tunes, each a tiny LLaMA directory (config.json + safetensors).

    Fine-tunes are the base plus small random task vectors, as real fine-tunes are, so that
    TIES and Model Stock see realistic magnitudes. Other tools (mergekit) read the same files.
    """
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "hidden_act": "silu",
    }
    base = {key: torch.randn(shape, generator=gen) * 0.02 for key, shape in shapes.items()}

    def write(name: str, tensors: dict[str, torch.Tensor]) -> Path:
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.to(dtype).contiguous() for k, v in tensors.items()},
            directory / "model.safetensors",
            metadata={"format": "pt"},
        )
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        return directory

    base_dir = write("base", base)
    fine_tunes = []
    for i in range(count):
        tuned = {k: v + spread * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        fine_tunes.append(write(f"ft{i:02d}", tuned))
    return base_dir, fine_tunes


def weights_file(directory: Path) -> Path:
    return directory / "model.safetensors"


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int of at least ``low`` (``--repeat 0`` ended in a traceback of
    ``min()`` of nothing once the inputs were built; ``run.py --models 1`` in Model Stock's
    error half a minute in)."""

    def parse(text: str) -> int:
        value = int(text)  # a ValueError is argparse's "invalid parse value"
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, found {value}")
        return value

    return parse
