"""The multi-task adapters' configs (PEFT keeps each method's config in its own `config.py`):
`PolyMHRConfig` (Poly and MHR, `poly_mhr`) and `MTLLoRAConfig` (`mtl_lora`). They import no
torch: the command line reads their fields for its options and help."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from quiver.errors import QuiverError

if TYPE_CHECKING:
    from torch import nn

    from quiver.adapters.mtl_lora import MTLLoRAAdapter
    from quiver.adapters.poly_mhr import PolyAdapter

POLY_KIND = "poly"  # the library kind of a Poly or MHR entry
MTL_LORA_KIND = "mtl-lora"
STRATEGY_HEADS = {"poly": 1, "mhr": 64}  # H when not given: Poly has one head; MHR's code 64


@dataclass
class PolyMHRConfig:
    """Poly / MHR skills and routing (the LoRA rank, alpha and dropout of each skill come from
    the training config)."""

    skills: int = field(default=8, metadata={"help": "poly, mhr: skills (LoRAs) per layer S"})
    heads: int = field(default=0, metadata={
        "help": "mhr: routing heads H (A's input and B's output cut into H blocks, each "
                "routed on its own); 0: 1 for poly, 64 for mhr"})
    routing_lr: float = field(default=0.1, metadata={
        "help": "poly, mhr: peak learning rate of the routing logits (skills use --lr)"})
    routing_temperature: float = field(default=1.0, metadata={
        "help": "poly, mhr: temperature of the relaxed Bernoulli routing while training"})

    def __post_init__(self) -> None:
        if self.skills < 1 or self.heads < 0:
            raise ValueError("skills must be at least 1 and heads at least 0")
        if self.routing_lr <= 0 or self.routing_temperature <= 0:
            raise ValueError("routing_lr and routing_temperature must be positive")

    @property
    def kind(self) -> str:
        return POLY_KIND

    def for_strategy(self, strategy: str) -> PolyMHRConfig:
        """This config with H resolved for `strategy` (poly or mhr).

        Raises:
            QuiverError: poly with more than one head.
        """
        heads = self.heads or STRATEGY_HEADS[strategy]
        if strategy == "poly" and heads != 1:
            raise QuiverError(f"poly has one routing head, not {heads}: use --strategy mhr")
        return PolyMHRConfig(self.skills, heads, self.routing_lr, self.routing_temperature)

    def attach(self, model: nn.Module, task_names: list[str], train_config) -> PolyAdapter:
        """Fresh skills and routing on `model` for training (see `attach_poly`)."""
        from quiver.adapters.poly_mhr import attach_poly

        return attach_poly(model, task_names, self, train_config.rank, train_config.alpha,
                           train_config.dropout, tuple(train_config.target_modules))


@dataclass
class MTLLoRAConfig:
    """MTL-LoRA's task-specific parts (the rank, alpha and dropout come from the training
    config)."""

    up_projections: int = field(default=3, metadata={
        "help": "mtl-lora: shared up-projections B_i per layer n, mixed per task"})
    mix_temperature: float = field(default=0.1, metadata={
        "help": "mtl-lora: temperature tau of each task's softmax over the up-projections"})

    def __post_init__(self) -> None:
        if self.up_projections < 1:
            raise ValueError("up_projections must be at least 1")
        if self.mix_temperature <= 0:
            raise ValueError("mix_temperature must be positive")

    @property
    def kind(self) -> str:
        return MTL_LORA_KIND

    def for_strategy(self, strategy: str) -> MTLLoRAConfig:
        """This config, for build strategy `mtl-lora` (nothing to resolve)."""
        return replace(self)

    def attach(self, model: nn.Module, task_names: list[str], train_config) -> MTLLoRAAdapter:
        """Fresh MTL-LoRA layers on `model` for training (see `attach_mtl_lora`)."""
        from quiver.adapters.mtl_lora import attach_mtl_lora

        return attach_mtl_lora(model, task_names, self, train_config.rank, train_config.alpha,
                               train_config.dropout, tuple(train_config.target_modules))
