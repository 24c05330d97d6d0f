"""What the training loop needs of an adapter it trains (`TrainableAdapter`), and of a kind of
adapter to attach (`AdapterSpec`). Implemented by the LoRA adapter (`quiver.adapters.lora`)
and the multi-task adapters (`TaskRowAdapter`: Poly/MHR, MTL-LoRA)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

import torch
from transformers import PreTrainedModel

if TYPE_CHECKING:
    from quiver.training.config import TrainConfig


class TrainableAdapter(Protocol):
    """An adapter attached to a model for training."""

    kind: str
    causal_lm: PreTrainedModel  # the model whose forward includes the adapter

    def param_groups(self, config: TrainConfig) -> list[dict]:
        """AdamW groups, each with its own `peak_lr` (scaled by the schedule every step)."""

    def routed(self, batch: dict[str, torch.Tensor]) -> AbstractContextManager:
        """Within the returned context, the model runs `batch`'s rows as the adapter should
        (a multi-task adapter: each row with its task's parameters, from `task_ids`)."""

    def weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable weights (what runs save and `load_weights` takes)."""

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def stored(self, weights: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
        """(PEFT adapter config, PEFT state dict, `ExpertInfo.lora`) of `weights`."""

    def remove(self) -> None:
        """Take the adapter off, leaving the base model as it was."""


class AdapterSpec(Protocol):
    """A kind of adapter to train instead of a LoRA (`PolyMHRConfig`, `MTLLoRAConfig`): a
    config dataclass that attaches fresh weights for some tasks."""

    @property
    def kind(self) -> str: ...

    def attach(self, model: PreTrainedModel, task_names: list[str],
               config: TrainConfig) -> TrainableAdapter: ...
