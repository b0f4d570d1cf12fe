"""ladle: merge neural-network weights, correctly and fast.

State-dict arithmetic, one function per merge method, and a streaming engine that merges
checkpoints tensor by tensor so they never sit in memory at once.

Example:
    >>> import torch, ladle
    >>> a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}
    >>> ladle.uniform_soup([a, b])
    {'w': tensor([2., 3.])}
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # what type checkers and editors see; at run time, __getattr__ below
    # The submodules, reached as ``ladle.methods.ties...`` after ``import ladle`` alone
    from . import arithmetic as arithmetic
    from . import checkpoint as checkpoint
    from . import cli as cli
    from . import compare as compare
    from . import demo as demo
    from . import distributed as distributed
    from . import engine as engine
    from . import errors as errors
    from . import hub as hub
    from . import methods as methods
    from . import modelcard as modelcard
    from . import recipe as recipe
    from . import testing as testing
    from . import writer as writer
    from .arithmetic import add as add
    from .arithmetic import lerp as lerp
    from .arithmetic import scale as scale
    from .arithmetic import sub as sub
    from .arithmetic import task_vector as task_vector
    from .arithmetic import weighted_sum as weighted_sum
    from .checkpoint import Checkpoint as Checkpoint
    from .checkpoint import StateDict as StateDict
    from .checkpoint import StateDictLike as StateDictLike
    from .checkpoint import load as load
    from .checkpoint import open_checkpoint as open_checkpoint
    from .compare import DiffReport as DiffReport
    from .compare import TensorDiff as TensorDiff
    from .compare import diff as diff
    from .engine import IntegerLike as IntegerLike
    from .engine import NumberLike as NumberLike
    from .engine import NumbersLike as NumbersLike
    from .errors import CheckpointError as CheckpointError
    from .errors import IncompatibleError as IncompatibleError
    from .errors import LadleError as LadleError
    from .errors import NonFiniteError as NonFiniteError
    from .errors import OutputError as OutputError
    from .errors import UnsafeCheckpointError as UnsafeCheckpointError
    from .methods.dare import dare as dare
    from .methods.ratatouille import ratatouille as ratatouille
    from .methods.ratatouille import ratatouille_init as ratatouille_init
    from .methods.slerp import slerp as slerp
    from .methods.soup import GreedySoupResult as GreedySoupResult
    from .methods.soup import GreedySoupStep as GreedySoupStep
    from .methods.soup import greedy_soup as greedy_soup
    from .methods.soup import uniform_soup as uniform_soup
    from .methods.stock import ModelStockWarning as ModelStockWarning
    from .methods.stock import model_stock as model_stock
    from .methods.task_arithmetic import task_arithmetic as task_arithmetic
    from .methods.ties import ties as ties
    from .recipe import load_recipe as load_recipe
    from .recipe import run_recipe as run_recipe
    from .writer import save as save

_PUBLIC = {
    "add": "arithmetic",
    "lerp": "arithmetic",
    "scale": "arithmetic",
    "sub": "arithmetic",
    "task_vector": "arithmetic",
    "weighted_sum": "arithmetic",
    "Checkpoint": "checkpoint",
    "StateDict": "checkpoint",
    "StateDictLike": "checkpoint",
    "load": "checkpoint",
    "open_checkpoint": "checkpoint",
    "DiffReport": "compare",
    "TensorDiff": "compare",
    "diff": "compare",
    "IntegerLike": "engine",
    "NumberLike": "engine",
    "NumbersLike": "engine",
    "CheckpointError": "errors",
    "IncompatibleError": "errors",
    "LadleError": "errors",
    "NonFiniteError": "errors",
    "OutputError": "errors",
    "UnsafeCheckpointError": "errors",
    "dare": "methods.dare",
    "ratatouille": "methods.ratatouille",
    "ratatouille_init": "methods.ratatouille",
    "slerp": "methods.slerp",
    "GreedySoupResult": "methods.soup",
    "GreedySoupStep": "methods.soup",
    "greedy_soup": "methods.soup",
    "uniform_soup": "methods.soup",
    "ModelStockWarning": "methods.stock",
    "model_stock": "methods.stock",
    "task_arithmetic": "methods.task_arithmetic",
    "ties": "methods.ties",
    "load_recipe": "recipe",
    "run_recipe": "recipe",
    "save": "writer",
}
"""Where each public name but the submodule ``distributed`` lives: its module under ``ladle``."""


if not TYPE_CHECKING:  # a module __getattr__ makes every name a type checker does not know
    # (a typo: ``ladle.unifrom_soup``) Any to it: it sees the imports above instead

    def __getattr__(name: str) -> Any:
        """A public name, or a submodule (``ladle.engine``), imported when first used:
        ``import ladle`` alone loads no torch, so that the ``ladle`` command parses its
        arguments (``--help``, a usage error) at once."""
        if name in _PUBLIC:
            value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
            globals()[name] = value  # found directly from now on
            return value
        if (
            name.isidentifier()  # "a.b" names no submodule of ours
            and not name.startswith("__")
            and importlib.util.find_spec(f"{__name__}.{name}") is not None
        ):
            return importlib.import_module(f".{name}", __name__)  # which sets it here
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DiffReport",
    "GreedySoupResult",
    "GreedySoupStep",
    "IncompatibleError",
    "IntegerLike",
    "LadleError",
    "ModelStockWarning",
    "NonFiniteError",
    "NumberLike",
    "NumbersLike",
    "OutputError",
    "StateDict",
    "StateDictLike",
    "TensorDiff",
    "UnsafeCheckpointError",
    "__version__",
    "add",
    "dare",
    "diff",
    "distributed",
    "greedy_soup",
    "lerp",
    "load",
    "load_recipe",
    "model_stock",
    "open_checkpoint",
    "ratatouille",
    "ratatouille_init",
    "run_recipe",
    "save",
    "scale",
    "slerp",
    "sub",
    "task_arithmetic",
    "task_vector",
    "ties",
    "uniform_soup",
    "weighted_sum",
]
