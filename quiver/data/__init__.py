"""Tasks: examples, splits, readers (reasoning-gym, BIG-bench, JSONL, Hugging Face datasets)
and batching."""

from quiver.data.registry import TaskInfo, list_bigbench, list_gym, load_task
from quiver.data.task import Example, SplitConfig, Task

__all__ = [
    "Example", "SplitConfig", "Task", "TaskInfo", "list_bigbench", "list_gym", "load_task",
]
