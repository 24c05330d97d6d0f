"""quiver: train, keep and reuse a library of LoRA experts (modular language models)."""

from quiver.data import Example, SplitConfig, Task, load_task
from quiver.errors import QuiverError
from quiver.library import Expert, ExpertInfo, Library
from quiver.models import fingerprint, linear_module_shapes, load_base
from quiver.reuse import reuse
from quiver.training import TrainConfig, TrainResult, train_expert

__all__ = [
    "Example",
    "Expert",
    "ExpertInfo",
    "Library",
    "QuiverError",
    "SplitConfig",
    "Task",
    "TrainConfig",
    "TrainResult",
    "fingerprint",
    "linear_module_shapes",
    "load_base",
    "load_task",
    "reuse",
    "train_expert",
]
