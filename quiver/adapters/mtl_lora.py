"""MTL-LoRA: one LoRA whose down-projection is shared by every task, with a task-specific
r x r transformation and a per-task mix of a few shared up-projections.

Yang et al. 2024, "MTL-LoRA: Low-Rank Adaptation for Multi-Task Learning",
https://arxiv.org/abs/2410.09437 (AAAI 2025).

At an adapted linear layer W (out x in), with scaling s = alpha / r:

    A     (r, in)        shared down-projection, kaiming-uniform (as nn.Linear(in, r))
    L[t]  (r, r)         task t's transformation of the low-rank space, identity at start
    B[i]  (out, r)       n shared up-projections, zero at start
    w[t]  (n,)           task t's mixing logits, U(+-1/sqrt(n)) at start (random: with equal
                         logits and equal (zero) B_i, every B_i would get the same gradient
                         and the mix could never move)
    B_t = sum_i softmax(w[t] / tau)_i B[i]
    y   = W x + s * B_t L[t] A x

Defaults n = 3 and tau = 0.1, as in the authors' code. For one task the update s B_t L[t] A
is an ordinary rank-r LoRA with A and B = B_t L[t]: `task_lora` exports it as a plain PEFT
LoRA expert, which every LoRA-only part of quiver (merges, routing, serving) can use.

Stored as a library entry of kind `mtl-lora`; PEFT has no such adapter type, so the folder
is quiver's own: `adapter_config.json` with `peft_type` "MTL_LORA", and per module
`<module>.mtl_lora_A` (r, in), `.mtl_lora_L` (tasks, r, r), `.mtl_lora_B` (n, out, r) and
`.mtl_lora_mix` (tasks, n), B as trained (unscaled); quiver's metadata names the task of
each row (`ExpertInfo.tasks`, `lora["task_rows"]`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from quiver.adapters.config import MTL_LORA_KIND as KIND
from quiver.adapters.config import MTLLoRAConfig
from quiver.adapters.task_rows import (
    TaskRouting,
    TaskRowAdapter,
    adapter_options,
    attach_task_layers,
    check_batch_rows,
)
from quiver.errors import QuiverError
from quiver.library.formats import MTL_LORA_KEY, MTL_LORA_PARTS, peft_config_json
from quiver.models import layer_sizes, model_targets

PEFT_TYPE = "MTL_LORA"  # quiver's own: PEFT cannot load it (export a task with `task_lora`)


class MTLLoRALinear(nn.Module):
    """A linear layer plus MTL-LoRA (the formula above), each input row with its task's row."""

    def __init__(self, base: nn.Linear, n_tasks: int, up_projections: int, rank: int,
                 scaling: float, dropout: float, routing: TaskRouting,
                 temperature: float = 0.1) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        self.rank, self.scaling, self.temperature = rank, scaling, temperature
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        like = adapter_options(base)
        n, (d_in, d_out) = up_projections, layer_sizes(base)  # nn.Linear or Conv1D
        self.lora_a = nn.Parameter(torch.empty(rank, d_in, **like))
        self.lora_l = nn.Parameter(torch.eye(rank, **like).repeat(n_tasks, 1, 1))
        self.lora_b = nn.Parameter(torch.zeros(n, d_out, rank, **like))
        self.mix = nn.Parameter(torch.empty(n_tasks, n, **like))
        with torch.no_grad():  # U(+-1/sqrt(fan_in)): nn.Linear's kaiming-uniform (a = sqrt(5))
            self.lora_a.uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in))
            self.mix.uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n))

    def parts(self) -> dict[str, nn.Parameter]:
        """The layer's tensors under their stored key suffixes."""
        return dict(zip(MTL_LORA_PARTS, (self.lora_a, self.lora_l, self.lora_b, self.mix),
                        strict=True))

    def task_up(self, ids: torch.Tensor | int) -> torch.Tensor:
        """B_t (rows, out, r) of task rows `ids` (an int: one row)."""
        mix = torch.softmax(self.mix[ids] / self.temperature, dim=-1)  # (rows, n) or (n,)
        return torch.einsum("...n,nor->...or", mix, self.lora_b).reshape(
            -1, *self.lora_b.shape[1:])  # (rows, out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, time, in)
        out = self.base(x)  # (batch, time, out)
        ids = self.routing.rows(self.mix.device)
        lam = self.lora_l[ids].reshape(-1, self.rank, self.rank)  # (rows, r, r)
        up = self.task_up(ids)  # (rows, out, r); rows = batch or 1
        check_batch_rows(lam.shape[0], x)
        if x.dim() == 2:  # (tokens, in): one task for all of them
            lam, up = lam[0], up[0]
        h = self.dropout(x).to(self.lora_a.dtype) @ self.lora_a.T  # (batch, time, r): A x
        h = h @ lam.transpose(-1, -2)  # (batch, time, r): L_t A x
        h = h @ up.transpose(-1, -2)  # (batch, time, out): B_t L_t A x
        return out + (self.scaling * h).to(out.dtype)  # (batch, time, out)


class MTLLoRAAdapter(TaskRowAdapter):
    """MTL-LoRA layers attached to a model (`TaskRowAdapter`)."""

    kind = KIND

    def param_groups(self, train_config) -> list[dict]:
        """Every part at the training lr; weight decay only on A and the B_i (decay would pull
        L_t towards zero rather than the identity, and the mixing logits towards uniform)."""
        layers = list(self.layers.values())
        decayed = [p for layer in layers for p in (layer.lora_a, layer.lora_b)]
        task_rows = [p for layer in layers for p in (layer.lora_l, layer.mix)]
        return [{"params": decayed, "peak_lr": train_config.lr},
                {"params": task_rows, "peak_lr": train_config.lr, "weight_decay": 0.0}]

    def stored(self, weights: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
        """(adapter config, state dict, quiver's `lora` metadata) of `weights`."""
        return self.adapter_config(), weights, dict(self.lora)

    def adapter_config(self) -> dict:
        """`adapter_config.json` of this adapter: LoRA's fields plus MTL-LoRA's."""
        return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "r": self.lora["r"],
                "lora_alpha": self.lora["lora_alpha"], "lora_dropout": self.lora["lora_dropout"],
                "target_modules": sorted(self.lora["target_modules"]),
                "n_tasks": len(self.task_names), "up_projections": self.config.up_projections,
                "mix_temperature": self.config.mix_temperature,
                "base_model_name_or_path": self.causal_lm.config._name_or_path}


def attach_mtl_lora(model: nn.Module, task_names: list[str], config: MTLLoRAConfig, rank: int,
                    alpha: float, dropout: float, target_modules: tuple[str, ...]
                    ) -> MTLLoRAAdapter:
    """Replace `model`'s target linear layers by `MTLLoRALinear` with fresh weights (seeded by
    torch's RNG) and a row per task; freeze the base weights.

    Raises:
        QuiverError: the model already has a multi-task adapter, or lacks a target module.
    """
    target_modules = model_targets(model, target_modules)  # all-linear: the model's names
    layers, routing, frozen = attach_task_layers(
        model, task_names, target_modules,
        lambda base, routing: MTLLoRALinear(base, len(task_names), config.up_projections, rank,
                                            alpha / rank, dropout, routing,
                                            config.mix_temperature))
    lora = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "scaling": alpha / rank,
            "target_modules": list(target_modules), "up_projections": config.up_projections,
            "mix_temperature": config.mix_temperature, "task_rows": list(task_names)}
    return MTLLoRAAdapter(model, layers, task_names, replace(config), lora, routing, frozen)


def load_mtl_lora(model: nn.Module, expert) -> MTLLoRAAdapter:
    """Attach a stored MTL-LoRA entry (`Library.get(name)`) to `model` for evaluation. Call
    `set_task` before running the model, `remove()` after.

    Raises:
        QuiverError: the entry is not MTL-LoRA, or does not fit the model.
    """
    info, config = expert.info, expert.adapter_config
    if info.kind != KIND:
        raise QuiverError(f"expert {expert.name!r} is a {info.kind} adapter, not MTL-LoRA")
    spec = MTLLoRAConfig(config["up_projections"], config["mix_temperature"])
    adapter = attach_mtl_lora(model, list(info.tasks), spec, config["r"], config["lora_alpha"],
                              0.0, tuple(config["target_modules"]))
    return adapter.loaded(expert.weights)


def task_lora(expert, task: str, name: str):
    """One task of an MTL-LoRA entry as a plain LoRA expert named `name`: A and B_t L_t per
    layer, with the entry's rank, alpha and target modules, so PEFT (and quiver's merges and
    routers) compute the same outputs as the entry does for that task.

    The new expert's metadata names `task` as its task and the entry it came from (`source`
    `mtl-lora:ENTRY`, `training["exported_from"]`); the entry's joint validation loss is not
    copied, as it is not this task's.

    Raises:
        QuiverError: the expert is not MTL-LoRA, or has no row for `task`.
    """
    from quiver.library.expert import Expert, ExpertInfo

    info, config = expert.info, expert.adapter_config
    if info.kind != KIND:
        raise QuiverError(f"expert {expert.name!r} is a {info.kind} adapter: only mtl-lora "
                          "entries export a task as a LoRA")
    for prefix in ("gym:", "bigbench:"):  # their tasks may be named without the prefix
        if task not in info.tasks and f"{prefix}{task}" in info.tasks:
            task = f"{prefix}{task}"
    if task not in info.tasks:
        raise QuiverError(f"mtl-lora entry {expert.name!r} has no row for task {task!r}: it was "
                          f"trained on {info.tasks}")
    row, tau = info.tasks.index(task), config["mix_temperature"]
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in expert.weights.items():
        match = MTL_LORA_KEY.match(key)
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    weights = {}
    for module, found in sorted(parts.items()):
        mix = torch.softmax(found["mtl_lora_mix"][row].double() / tau, dim=-1)  # (n,)
        up = torch.einsum("n,nor->or", mix, found["mtl_lora_B"].double())  # (out, r): B_t
        b = up @ found["mtl_lora_L"][row].double()  # (out, r): B_t L_t
        weights[f"{module}.lora_A.weight"] = found["mtl_lora_A"].clone()
        weights[f"{module}.lora_B.weight"] = b.to(found["mtl_lora_B"].dtype).contiguous()
    lora = {"r": config["r"], "lora_alpha": config["lora_alpha"],
            "lora_dropout": config["lora_dropout"], "target_modules": config["target_modules"]}
    exported_from = {"entry": expert.name, "kind": KIND, "task_row": row,
                     "content_hash": info.content_hash}
    new = ExpertInfo(name=name, tasks=[task], base_model=info.base_model,
                     base_fingerprint=info.base_fingerprint, lora=lora,
                     training={**info.training, "exported_from": exported_from},
                     source=f"{KIND}:{expert.name}")
    return Expert(new, _lora_config(config), weights=weights)


def _lora_config(config: dict) -> dict:
    """PEFT's LoraConfig with the entry's rank, alpha, dropout and target modules."""
    from peft import LoraConfig

    lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                      lora_dropout=config["lora_dropout"],
                      target_modules=list(config["target_modules"]), bias="none",
                      task_type="CAUSAL_LM", inference_mode=True)
    return peft_config_json(lora, config.get("base_model_name_or_path"))
