"""Poly and MHR: a few skills (LoRAs) per layer, mixed per task by learned routing logits.

Poly: Ponti et al. 2023, "Combining parameter-efficient modules for task-level generalisation"
(EACL), https://arxiv.org/abs/2202.13914. MHR: Caccia et al. 2023, "Multi-head adapter routing
for cross-task generalization" (NeurIPS), https://arxiv.org/abs/2211.03831.

At an adapted linear layer W (out x in), S skills are rank-r LoRAs whose A is cut along its
input and B along its output into H heads (blocks), and each task t has routing logits
Z[t] (H, S), at every layer its own:

    A[h, s]  (in/H, r)      B[h, s]  (r, out/H)
    p[t, h] = sigmoid(Z[t, h])                      at evaluation
    p[t, h] ~ RelaxedBernoulli(Z[t, h], tau)        while training (differentiable samples)
    w[t, h] = p[t, h] / sum_s p[t, h, s]            normalised per head
    A_t[h] = sum_s w[t, h, s] A[h, s],   B_t[h] = sum_s w[t, h, s] B[h, s]
    y = W x + scaling * (x A_t) B_t,  with x A_t = sum_h x_h A_t[h] (x_h: the h-th block
                                      of x) and output block h of (x A_t) B_t = (x A_t) B_t[h]

Poly is MHR with H = 1. The routing logits learn with their own, larger learning rate (0.1 in
the MHR code); the skills with the training config's.

Stored in PEFT's Poly format (`peft_type` POLY; PeftModel.from_pretrained loads it, with
`task_ids` given to forward): per module `poly_lora_A` (H, S, in/H, r), `poly_lora_B`
(H, S, r, out/H) and `poly_router.module_logits` (tasks, H * S). PEFT scales the update by
1 / r and has no alpha, so the stored B is `scaling * r` times the trained one; quiver's
metadata names the task of each routing row (`ExpertInfo.tasks`, `lora["task_rows"]`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import RelaxedBernoulli

from quiver.adapters.config import POLY_KIND as KIND
from quiver.adapters.config import PolyMHRConfig
from quiver.adapters.task_rows import (
    TaskRouting,
    TaskRowAdapter,
    adapter_options,
    attach_task_layers,
    check_batch_rows,
)
from quiver.errors import QuiverError
from quiver.library.formats import peft_config_json
from quiver.models import layer_sizes, model_targets

_EPS = 1e-12  # the normalisation's guard against a head whose samples are all ~0


def routing_weights(logits: torch.Tensor, training: bool, temperature: float = 1.0
                    ) -> torch.Tensor:
    """Mixing weights over skills from routing logits (..., H, S): relaxed-Bernoulli samples
    while training, sigmoid at evaluation, each head's weights normalised to sum to 1."""
    if training:
        probs = RelaxedBernoulli(torch.tensor(temperature, device=logits.device),
                                 logits=logits).rsample()
    else:
        probs = torch.sigmoid(logits)
    return probs / (probs.sum(dim=-1, keepdim=True) + _EPS)


class PolyLinear(nn.Module):
    """A linear layer plus S skills mixed per task over H heads (the formula above)."""

    def __init__(self, base: nn.Linear, n_tasks: int, skills: int, heads: int, rank: int,
                 scaling: float, dropout: float, routing: TaskRouting,
                 temperature: float = 1.0) -> None:
        super().__init__()
        fan_in, fan_out = layer_sizes(base)  # nn.Linear or Conv1D
        if fan_in % heads or fan_out % heads:
            raise QuiverError(f"{heads} heads do not divide a {fan_in} -> {fan_out} layer: "
                              "choose H dividing both")
        self.base, self.routing = base, routing
        self.heads, self.skills, self.rank = heads, skills, rank
        self.scaling, self.temperature = scaling, temperature
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        like = adapter_options(base)
        d_in, d_out = fan_in // heads, fan_out // heads
        self.lora_a = nn.Parameter(torch.empty(heads, skills, d_in, rank, **like))
        self.lora_b = nn.Parameter(torch.zeros(heads, skills, rank, d_out, **like))
        self.logits = nn.Parameter(torch.empty(n_tasks, heads * skills, **like))
        with torch.no_grad():
            # each skill-head block as nn.Linear(in/H, r) would start: U(+-1/sqrt(in/H)); B = 0
            self.lora_a.uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in))
            self.logits.uniform_(-1e-3, 1e-3)  # near-uniform routing at the start

    def parts(self) -> dict[str, nn.Parameter]:
        """The layer's tensors under PEFT's Poly key suffixes."""
        return {"poly_lora_A": self.lora_a, "poly_lora_B": self.lora_b,
                "poly_router.module_logits": self.logits}

    def task_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t (rows, in, r), B_t (rows, r, out)) of the current task(s)."""
        ids = self.routing.rows(self.logits.device)
        logits = self.logits[ids].view(-1, self.heads, self.skills)  # (rows, H, S)
        w = routing_weights(logits, self.training, self.temperature)  # (rows, H, S)
        a = torch.einsum("nhs,hsdr->nhdr", w, self.lora_a)  # (rows, H, in/H, r)
        b = torch.einsum("nhs,hsrd->nhrd", w, self.lora_b)  # (rows, H, r, out/H)
        rows = w.shape[0]
        a = a.reshape(rows, -1, self.rank)  # (rows, in, r): head h reads input block h
        b = b.transpose(1, 2).reshape(rows, self.rank, -1)  # (rows, r, out): writes block h
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, time, in)
        out = self.base(x)  # (batch, time, out)
        a, b = self.task_factors()  # (rows, in, r), (rows, r, out); rows = batch or 1
        check_batch_rows(a.shape[0], x)
        if x.dim() == 2:  # (tokens, in): one task for all of them
            a, b = a[0], b[0]
        h = self.dropout(x).to(a.dtype) @ a  # (batch, time, r)
        return out + (self.scaling * (h @ b)).to(out.dtype)  # (batch, time, out)


class PolyAdapter(TaskRowAdapter):
    """Poly layers attached to a model (`TaskRowAdapter`): what training, evaluation and
    storage need of them. Weights are keyed as PEFT's Poly keys them, B as trained (not yet
    scaled for PEFT: see `stored`)."""

    kind = KIND

    # ------------------------------------------------------------- training
    def param_groups(self, train_config) -> list[dict]:
        """Skills at the training lr; routing logits at their own lr, without weight decay."""
        skills = [p for layer in self.layers.values() for p in (layer.lora_a, layer.lora_b)]
        logits = [layer.logits for layer in self.layers.values()]
        return [{"params": skills, "peak_lr": train_config.lr},
                {"params": logits, "peak_lr": self.config.routing_lr, "weight_decay": 0.0}]

    def stored(self, weights: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
        """(PEFT adapter config, PEFT state dict, quiver's `lora` metadata) of `weights`."""
        scale = self.lora["scaling"] * self.lora["r"]  # PEFT computes x A B / r
        peft_weights = {k: v * scale if k.endswith("poly_lora_B") else v
                        for k, v in weights.items()}
        return self.adapter_config(), peft_weights, dict(self.lora)

    def adapter_config(self) -> dict:
        """PEFT's PolyConfig of this adapter, as `adapter_config.json` holds it."""
        from peft import PolyConfig

        config = PolyConfig(r=self.lora["r"], n_tasks=len(self.task_names),
                            n_skills=self.config.skills, n_splits=self.config.heads,
                            target_modules=list(self.lora["target_modules"]),
                            task_type="CAUSAL_LM", inference_mode=True)
        return peft_config_json(config, self.causal_lm.config._name_or_path)


def attach_poly(model: nn.Module, task_names: list[str], config: PolyMHRConfig, rank: int,
                alpha: float, dropout: float, target_modules: tuple[str, ...]) -> PolyAdapter:
    """Replace `model`'s target linear layers by `PolyLinear` with fresh skills (seeded by
    torch's RNG) and a routing row per task; freeze the base weights.

    Raises:
        QuiverError: the model already has Poly layers, lacks a target module, or has a layer
            whose dimensions the heads do not divide.
    """
    heads = config.heads or 1
    target_modules = model_targets(model, target_modules)  # all-linear: the model's names
    layers, routing, frozen = attach_task_layers(
        model, task_names, target_modules,
        lambda base, routing: PolyLinear(base, len(task_names), config.skills, heads, rank,
                                         alpha / rank, dropout, routing,
                                         config.routing_temperature))
    lora = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "scaling": alpha / rank,
            "target_modules": list(target_modules), "skills": config.skills, "heads": heads,
            "routing_lr": config.routing_lr, "routing_temperature": config.routing_temperature,
            "task_rows": list(task_names)}
    return PolyAdapter(model, layers, task_names, PolyMHRConfig(config.skills, heads,
                       config.routing_lr, config.routing_temperature), lora, routing, frozen)


def load_poly(model: nn.Module, expert) -> PolyAdapter:
    """Attach a stored Poly/MHR entry (`Library.get(name)`) to `model` for evaluation.

    The layers take the stored (PEFT) form as it is, with PEFT's scaling 1 / r, so they give
    exactly what PEFT gives. Call `set_task` before running the model, `remove()` after.

    Raises:
        QuiverError: the entry is not Poly/MHR, or does not fit the model.
    """
    info, config = expert.info, expert.adapter_config
    if info.kind != KIND:
        raise QuiverError(f"expert {expert.name!r} is a {info.kind} adapter, not Poly/MHR")
    poly = PolyMHRConfig(config["n_skills"], config["n_splits"],
                         info.lora.get("routing_lr", 0.1),
                         info.lora.get("routing_temperature", 1.0))
    targets = tuple(config["target_modules"])
    adapter = attach_poly(model, list(info.tasks), poly, config["r"], 1.0, 0.0, targets)
    return adapter.loaded(expert.weights)
