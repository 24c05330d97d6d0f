"""Where an adaptation's training starts: the two adapter kinds the training loop trains
(`train_expert(..., adapter=...)`), attached with given weights instead of fresh ones.

- `LoraStart`: a plain LoRA whose factors start at given ones (mhr-mu, lib-mu);
- `PolyStart`: Poly/MHR layers with one routing row (the new task, near-uniform as a Poly
  build starts it) over given skills, the skills frozen or trained (mhr-z, mhr-full,
  polylib, polylib-full).

Both are dataclasses of JSON values only (the run key of a resumable run is made of them:
the source's content hash names the starting weights); the weights ride along outside the
fields (`with_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quiver.adapters import PolyMHRConfig, attach_poly
from quiver.adapters.lora import LoraAdapter
from quiver.errors import QuiverError
from quiver.library.expert import PEFT_PREFIX, lora_factors
from quiver.training import TrainConfig

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # {module: (A (r, in), B (out, r))}


@dataclass
class LoraStart:
    """A LoRA of the training config's rank, alpha and target modules (which must be the
    start's) whose update starts at `B A` of the given factors (scaling folded into B)."""

    method: str
    source: str
    source_hash: str  # the starting weights' identity, for the run key

    @property
    def kind(self) -> str:
        return "lora"

    def with_weights(self, factors: Factors) -> LoraStart:
        self._factors = factors
        return self

    def attach(self, model, task_names: list[str], config: TrainConfig) -> LoraAdapter:
        adapter = LoraAdapter(model, config)
        scaling = config.alpha / config.rank  # the trained LoRA's: B = B_start / scaling
        start = peft_lora_weights({m: (a.clone(), b / scaling)
                                   for m, (a, b) in self._factors.items()})
        if set(start) != set(adapter.weights()):  # PEFT would keep a missing layer's init
            adapter.remove()
            raise QuiverError(f"{self.method}: the starting LoRA adapts other layers than "
                              f"{list(config.target_modules)} of this model")
        adapter.load_weights(start)
        return adapter


@dataclass
class PolyStart:
    """Poly/MHR layers (PEFT's form: scaling 1 / r, B stored as PEFT holds it) with one
    routing row, the new task's, over the given skills; `train_skills` False freezes them."""

    method: str
    source: str
    source_hash: str
    skills: int
    heads: int
    rank: int
    target_modules: tuple[str, ...]
    train_skills: bool
    routing_lr: float
    routing_temperature: float = 1.0

    @property
    def kind(self) -> str:
        return "poly"

    def with_weights(self, skills: dict[str, torch.Tensor]) -> PolyStart:
        """`skills`: `{PEFT key: tensor}` of every layer's poly_lora_A and poly_lora_B."""
        self._skills = skills
        return self

    def attach(self, model, task_names: list[str], config: TrainConfig) -> _TrainableOnly:
        poly = PolyMHRConfig(self.skills, self.heads, self.routing_lr, self.routing_temperature)
        # alpha 1: the layers' scaling is PEFT's 1 / r, so the stored skills load as they are
        adapter = attach_poly(model, task_names, poly, self.rank, 1.0, config.dropout,
                              self.target_modules)
        try:
            adapter.load_weights({**adapter.weights(), **self._skills})  # fresh logits kept
        except Exception:
            adapter.remove()
            raise
        for layer in adapter.layers.values():
            layer.lora_a.requires_grad_(self.train_skills)
            layer.lora_b.requires_grad_(self.train_skills)
        return _TrainableOnly(adapter)


class _TrainableOnly:
    """An attached adapter whose optimizer groups hold only the parameters that require
    gradients (frozen skills get no optimizer state, so no update of any kind)."""

    def __init__(self, adapter) -> None:
        self._adapter = adapter

    def __getattr__(self, name: str):
        return getattr(self._adapter, name)

    def param_groups(self, config: TrainConfig) -> list[dict]:
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]}
                  for g in self._adapter.param_groups(config)]
        return [g for g in groups if g["params"]]


def scaled_factors(expert) -> Factors:
    """A LoRA expert's `{module: (A, s B)}`: its update with the scaling folded into B."""
    return {m: (a, b * expert.scaling) for m, (a, b) in expert.lora_factors().items()}


def peft_lora_weights(factors: Factors) -> dict[str, torch.Tensor]:
    """PEFT state dict of `{module: (A, B)}` factors."""
    return {key: value.contiguous() for module, (a, b) in factors.items()
            for key, value in ((f"{PEFT_PREFIX}{module}.lora_A.weight", a),
                               (f"{PEFT_PREFIX}{module}.lora_B.weight", b))}


__all__ = ["LoraStart", "PolyStart", "lora_factors", "peft_lora_weights", "scaled_factors"]
