"""Training experts: a plain PyTorch loop (`loop.train_expert`) and its building blocks, one
concept per module, as torchtune splits its training utilities:

- `config`: `TrainConfig`, how to train (dataclass, round-trips through JSON; no torch);
- `loss`: the target-only cross-entropy, gradient accumulation in parts, the mean loss;
- `memory`: how each step's batch runs so that it fits (parts, gradient checkpointing);
- `checkpointing`: saving a run's progress and resuming it to the same weights;
- `loop`: the loop itself, which trains a LoRA (`quiver.adapters.lora`) or a multi-task
  adapter (`quiver.adapters`: Poly/MHR, MTL-LoRA).

Names are imported on first use (`quiver.lazy`), so `TrainConfig` loads without torch.
"""

from quiver.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "quiver.training.config",
    **dict.fromkeys(["TrainResult", "train_expert", "validation_loss"], "quiver.training.loop"),
    **dict.fromkeys(["accumulate_gradients", "mean_target_loss", "target_only_loss"],
                    "quiver.training.loss"),
    **dict.fromkeys(["MemoryPlan", "activation_bytes_per_token", "available_memory",
                     "gradient_checkpointing", "plan_memory"], "quiver.training.memory"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
