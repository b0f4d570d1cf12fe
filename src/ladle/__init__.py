"""ladle: merge neural-network weights, correctly and fast.

State-dict arithmetic, one function per merge method, and a streaming engine that merges
checkpoints tensor by tensor so they never sit in memory at once.

Example:
    >>> import torch, ladle
    >>> a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}
    >>> ladle.uniform_soup([a, b])
    {'w': tensor([2., 3.])}
"""

from ._version import __version__
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
from .errors import CheckpointError as CheckpointError
from .errors import IncompatibleError as IncompatibleError
from .errors import LadleError as LadleError
from .errors import UnsafeCheckpointError as UnsafeCheckpointError
from .methods.soup import uniform_soup as uniform_soup
from .writer import save as save

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "IncompatibleError",
    "LadleError",
    "StateDict",
    "StateDictLike",
    "UnsafeCheckpointError",
    "__version__",
    "add",
    "lerp",
    "load",
    "open_checkpoint",
    "save",
    "scale",
    "sub",
    "task_vector",
    "uniform_soup",
    "weighted_sum",
]
