"""quiver: train, keep and reuse a library of LoRA experts (modular language models).

The names below are imported on first use (`quiver.lazy`): `import quiver` itself is quick.
"""

from quiver.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["Example", "SplitConfig", "Task", "load_task"], "quiver.data"),
    "QuiverError": "quiver.errors",
    **dict.fromkeys(["Expert", "ExpertInfo", "Library"], "quiver.library"),
    **dict.fromkeys(["fingerprint", "linear_module_shapes", "load_base"], "quiver.models"),
    "reuse": "quiver.zero_shot",
    **dict.fromkeys(["TrainConfig", "TrainResult", "train_expert"], "quiver.training"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
