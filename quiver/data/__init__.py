"""Tasks: examples, splits, readers (reasoning-gym, BIG-bench, JSONL, Hugging Face datasets)
and batching. Names are imported on first use (`quiver.lazy`)."""

from quiver.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["TaskInfo", "list_bigbench", "list_gym", "load_task"],
                    "quiver.data.registry"),
    **dict.fromkeys(["Example", "SplitConfig", "Task"], "quiver.data.task"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
