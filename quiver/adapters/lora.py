"""LoRA through PEFT, as the training loop trains it (a `TrainableAdapter`).

PEFT wraps the model's target linear layers (`LoraConfig`, `get_peft_model`); the weights the
loop saves and stores are PEFT's own state dict, so a stored expert is a PEFT adapter folder.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from quiver.library.formats import peft_config_json
from quiver.models import model_targets, unadapted_weights

if TYPE_CHECKING:
    from quiver.training.config import TrainConfig

log = logging.getLogger("quiver")


class LoraAdapter:
    """A fresh LoRA on `model`'s target layers; `remove()` gives the model back as found."""

    kind = "lora"

    def __init__(self, model: PreTrainedModel, config: TrainConfig) -> None:
        self._model, self._config = model, config
        # PEFT freezes the base model's parameters; `remove` puts them and the mode back
        self._was_training = model.training
        self._requires_grad = {p: p.requires_grad for p in model.parameters()}
        self.targets = model_targets(model, config.target_modules)  # before PEFT changes it
        left_out = unadapted_weights(model)
        if left_out:  # MoE experts as 3-D tensors: never left out silently
            log.warning("LoRA adapts the linear layers %s; left out: %s", ", ".join(self.targets),
                        ", ".join(left_out))
        self.peft_model = wrap_with_lora(model, config, self.targets)
        self.causal_lm = self.peft_model.get_base_model()

    def param_groups(self, config: TrainConfig) -> list[dict]:
        trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        return [{"params": trainable, "peak_lr": config.lr}]

    def routed(self, batch: dict[str, torch.Tensor]) -> AbstractContextManager:
        return nullcontext()  # one LoRA for every row

    def weights(self) -> dict[str, torch.Tensor]:
        return lora_weights(self.peft_model)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.peft_model, weights)

    def train(self) -> None:
        self.peft_model.train()

    def eval(self) -> None:
        self.peft_model.eval()

    def stored(self, weights: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
        lora = {"r": self._config.rank, "lora_alpha": self._config.alpha,
                "lora_dropout": self._config.dropout,
                "target_modules": list(self.targets)}
        return (peft_config_json(self.peft_model.peft_config["default"],
                                 self._model.config._name_or_path), weights, lora)

    def remove(self) -> None:
        self.peft_model.unload()
        for param, flag in self._requires_grad.items():
            param.requires_grad_(flag)
        self._model.train(self._was_training)


def wrap_with_lora(model: PreTrainedModel, config: TrainConfig, targets: tuple[str, ...]):
    """`model` wrapped by PEFT with a fresh LoRA of `config`'s rank, alpha and dropout on
    `targets` (layer names, resolved: `quiver.models.model_targets`)."""
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def lora_weights(peft_model) -> dict[str, torch.Tensor]:
    """CPU copies of a PEFT model's LoRA weights, under PEFT's state-dict names."""
    return {
        k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(peft_model).items()
    }
