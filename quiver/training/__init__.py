"""Training experts: a plain PyTorch loop (`loop.train_expert`) and its building blocks, one
concept per module, as torchtune splits its training utilities:

- `config`: `TrainConfig`, how to train (dataclass, round-trips through JSON);
- `loss`: the target-only cross-entropy, gradient accumulation in parts, the mean loss;
- `memory`: how each step's batch runs so that it fits (parts, gradient checkpointing);
- `checkpointing`: saving a run's progress and resuming it to the same weights;
- `loop`: the loop itself, which trains a LoRA (`quiver.adapters.lora`) or a multi-task
  adapter (`quiver.adapters`: Poly/MHR, MTL-LoRA).
"""

from quiver.training.config import TrainConfig
from quiver.training.loop import TrainResult, train_expert, validation_loss
from quiver.training.loss import accumulate_gradients, mean_target_loss, target_only_loss
from quiver.training.memory import (
    MemoryPlan,
    activation_bytes_per_token,
    available_memory,
    gradient_checkpointing,
    plan_memory,
)

__all__ = [
    "MemoryPlan",
    "TrainConfig",
    "TrainResult",
    "accumulate_gradients",
    "activation_bytes_per_token",
    "available_memory",
    "gradient_checkpointing",
    "mean_target_loss",
    "plan_memory",
    "target_only_loss",
    "train_expert",
    "validation_loss",
]
