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

import json
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributions import RelaxedBernoulli

from quiver.errors import QuiverError

KIND = "poly"
STRATEGY_HEADS = {"poly": 1, "mhr": 64}  # H when not given: Poly has one head; MHR's code 64
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>poly_lora_A|poly_lora_B|poly_router\.module_logits)$")
_EPS = 1e-12  # the normalisation's guard against a head whose samples are all ~0


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
        return KIND

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
        return attach_poly(model, task_names, self, train_config.rank, train_config.alpha,
                           train_config.dropout, tuple(train_config.target_modules))


class TaskRouting:
    """The task of the inputs, shared by the Poly layers of one model: an int (one routing row
    for the whole batch, as at evaluation) or a tensor (batch,) of rows (a mixed training
    batch; the training loop sets it from each batch's `task_ids`)."""

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | int | None = None


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
        if base.in_features % heads or base.out_features % heads:
            raise QuiverError(f"{heads} heads do not divide a {base.in_features} -> "
                              f"{base.out_features} layer: choose H dividing both")
        self.base, self.routing = base, routing
        self.heads, self.skills, self.rank = heads, skills, rank
        self.scaling, self.temperature = scaling, temperature
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = base.weight.dtype
        if dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32  # adapter weights train in fp32 on a half-precision base
        like = {"device": base.weight.device, "dtype": dtype}
        d_in, d_out = base.in_features // heads, base.out_features // heads
        self.lora_a = nn.Parameter(torch.empty(heads, skills, d_in, rank, **like))
        self.lora_b = nn.Parameter(torch.zeros(heads, skills, rank, d_out, **like))
        self.logits = nn.Parameter(torch.empty(n_tasks, heads * skills, **like))
        with torch.no_grad():
            # each skill-head block as nn.Linear(in/H, r) would start: U(+-1/sqrt(in/H)); B = 0
            self.lora_a.uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in))
            self.logits.uniform_(-1e-3, 1e-3)  # near-uniform routing at the start

    def task_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t (rows, in, r), B_t (rows, r, out)) of the current task(s)."""
        ids = self.routing.task_ids
        if ids is None:
            raise QuiverError("a Poly/MHR layer needs the task of its inputs (no task set)")
        if isinstance(ids, torch.Tensor):
            ids = ids.to(self.logits.device)
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
        if x.dim() == 2:  # (tokens, in): one task for all of them
            a, b = a[0], b[0]
        elif a.shape[0] not in (1, x.shape[0]):
            raise QuiverError(f"{a.shape[0]} task ids for a batch of {x.shape[0]} rows")
        h = self.dropout(x).to(a.dtype) @ a  # (batch, time, r)
        return out + (self.scaling * (h @ b)).to(out.dtype)  # (batch, time, out)


class PolyAdapter:
    """Poly layers attached to a model: what training, evaluation and storage need of them.

    The model is changed in place (its target linear layers become `PolyLinear`);
    `remove()` puts the original layers back and unfreezes what it froze.
    """

    kind = KIND

    def __init__(self, model: nn.Module, layers: dict[str, PolyLinear], task_names: list[str],
                 config: PolyMHRConfig, lora: dict, routing: TaskRouting,
                 frozen: dict[nn.Parameter, bool]) -> None:
        self.causal_lm, self.layers, self.task_names = model, layers, list(task_names)
        self.config, self.lora, self.routing = config, lora, routing
        self._frozen = frozen

    # -------------------------------------------------------------- routing
    def set_task(self, task: str | int) -> None:
        """Route every input by one task's row (by name or row index).

        Raises:
            QuiverError: a task with no routing row.
        """
        if isinstance(task, str):
            if task not in self.task_names:
                raise QuiverError(f"no routing row for task {task!r}: this {self.kind} entry "
                                  f"was trained on {self.task_names}")
            task = self.task_names.index(task)
        self.routing.task_ids = task

    # ------------------------------------------------------------- training
    def param_groups(self, train_config) -> list[dict]:
        """Skills at the training lr; routing logits at their own lr, without weight decay."""
        skills = [p for layer in self.layers.values() for p in (layer.lora_a, layer.lora_b)]
        logits = [layer.logits for layer in self.layers.values()]
        return [{"params": skills, "peak_lr": train_config.lr},
                {"params": logits, "peak_lr": self.config.routing_lr, "weight_decay": 0.0}]

    def train(self) -> None:
        self.causal_lm.train()

    def eval(self) -> None:
        self.causal_lm.eval()

    def weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of every layer's skills and logits, under PEFT's key names (B as
        trained, not yet scaled for PEFT: see `stored`)."""
        tensors = {}
        for module, layer in self.layers.items():
            key = _PEFT_PREFIX + module
            tensors[f"{key}.poly_lora_A"] = layer.lora_a.detach().cpu().clone()
            tensors[f"{key}.poly_lora_B"] = layer.lora_b.detach().cpu().clone()
            tensors[f"{key}.poly_router.module_logits"] = layer.logits.detach().cpu().clone()
        return tensors

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set every layer from `weights()`'s form.

        Raises:
            QuiverError: a layer missing from `weights`, or a shape that differs.
        """
        with torch.no_grad():
            for module, layer in self.layers.items():
                key = _PEFT_PREFIX + module
                for name, param in (("poly_lora_A", layer.lora_a), ("poly_lora_B", layer.lora_b),
                                    ("poly_router.module_logits", layer.logits)):
                    value = weights.get(f"{key}.{name}")
                    if value is None or value.shape != param.shape:
                        raise QuiverError(f"no {name} of shape {tuple(param.shape)} for {module}")
                    param.copy_(value)

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
                            task_type="CAUSAL_LM", inference_mode=True).to_dict()
        config["base_model_name_or_path"] = self.causal_lm.config._name_or_path
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()
                  if k != "peft_version"}
        return json.loads(json.dumps(config, default=str))  # plain JSON values (no enums)

    def remove(self) -> None:
        """Put the original linear layers back and restore `requires_grad` as found."""
        for module, layer in self.layers.items():
            _replace(self.causal_lm, module, layer.base)
        for param, flag in self._frozen.items():
            param.requires_grad_(flag)
        if getattr(self.causal_lm, "quiver_task_routing", None) is self.routing:
            del self.causal_lm.quiver_task_routing
        self.layers = {}


def attach_poly(model: nn.Module, task_names: list[str], config: PolyMHRConfig, rank: int,
                alpha: float, dropout: float, target_modules: tuple[str, ...]) -> PolyAdapter:
    """Replace `model`'s target linear layers by `PolyLinear` with fresh skills (seeded by
    torch's RNG) and a routing row per task; freeze the base weights.

    Raises:
        QuiverError: the model already has Poly layers, lacks a target module, or has a layer
            whose dimensions the heads do not divide.
    """
    if getattr(model, "quiver_task_routing", None) is not None:
        raise QuiverError("this model already has Poly/MHR layers attached")
    if not task_names:
        raise QuiverError("a Poly/MHR adapter needs at least one task")
    heads = config.heads or 1
    targets = _targets(model, target_modules)
    routing = TaskRouting()
    frozen = {p: p.requires_grad for p in model.parameters()}
    layers = {name: PolyLinear(model.get_submodule(name), len(task_names), config.skills, heads,
                               rank, alpha / rank, dropout, routing, config.routing_temperature)
              for name in targets}  # built (and checked) before the model is changed
    for param in frozen:
        param.requires_grad_(False)  # only the skills and routing learn
    for name, layer in layers.items():
        _replace(model, name, layer)
    model.quiver_task_routing = routing
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
    try:
        adapter.load_weights(expert.weights)
    except QuiverError:
        adapter.remove()
        raise
    adapter.eval()
    return adapter


def check_poly_adapter(adapter_config: dict, weights: dict[str, torch.Tensor],
                       modules: dict[str, list[int]] | None) -> None:
    """Check that a PEFT Poly adapter is complete and fits a base model's linear layers.

    Raises:
        QuiverError: a key that is not a Poly weight, a missing part, or a shape that does not
            match the config or the base model.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise QuiverError(f"not a Poly weight: {key!r}")
        parts.setdefault(match["module"].removeprefix(_PEFT_PREFIX), {})[match["part"]] = tensor
    if not parts:
        raise QuiverError("the adapter has no Poly weights")
    heads, skills = adapter_config.get("n_splits"), adapter_config.get("n_skills")
    rank, tasks = adapter_config.get("r"), adapter_config.get("n_tasks")
    for module, found in parts.items():
        if len(found) != 3:
            raise QuiverError(f"incomplete Poly weights for {module}: only {sorted(found)}")
        fan_in, fan_out = (modules or {}).get(module, (None, None))
        if modules is not None and fan_in is None:
            raise QuiverError(f"the base model has no linear layer named {module}")
        a, b = found["poly_lora_A"], found["poly_lora_B"]
        logits = found["poly_router.module_logits"]
        if (a.shape[:2] != (heads, skills) or a.shape[3] != rank or b.shape[:3] !=
                (heads, skills, rank) or tuple(logits.shape) != (tasks, heads * skills)):
            raise QuiverError(f"Poly shapes at {module} do not match the config (r={rank}, "
                              f"tasks={tasks}, skills={skills}, splits={heads})")
        if fan_in is not None and (a.shape[2] * heads != fan_in or b.shape[3] * heads != fan_out):
            raise QuiverError(f"shape mismatch at {module}: base layer is {fan_in}->{fan_out}")


def _targets(model: nn.Module, target_modules: tuple[str, ...]) -> list[str]:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in target_modules if m not in present]
    if missing:
        raise QuiverError(f"target-module mismatch: the base model has no module named {missing}")
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
