"""PHATGOOSE gates (Muqeeth et al., "Learning to Route Among Specialized Experts for
Zero-Shot Generalization", ICML 2024).

For each frozen expert, every adapted layer gets a gate vector v (initialised to 0) that
scales the expert's output by sigmoid(x . v):

    y = W x + sigmoid(x . v) * s * B A x

Only the gates are trained, on the expert's own training data (100 steps, lr 1e-3, the
target-only loss). The trained gates are stored in the library and later used as routing
keys (`quiver.routing.phatgoose`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quiver.data import SplitConfig, Task, load_task
from quiver.data.batching import collate, length_grouped_batches, tokenize_example
from quiver.library import Library
from quiver.routing import attach_experts, detach_experts

KIND = "phatgoose"


@dataclass
class SigmoidGate:
    """Routes every token to the single attached expert with weight sigmoid(x . v)."""


    def __call__(self, x: torch.Tensor, keys: torch.Tensor, projections=None):
        weights = torch.sigmoid(x @ keys.T)  # (t, 1)
        return weights, torch.zeros_like(weights, dtype=torch.long)


def train_gates(model, tokenizer, expert, tasks: list[Task], steps: int = 100, lr: float = 1e-3,
                batch_size: int = 8, max_length: int = 256, seed: int = 0) -> dict:
    """`{module: gate vector (in,)}` trained with the expert frozen."""
    from quiver.training import target_only_loss

    pool = [e for t in tasks for e in t.split("train", SplitConfig())]
    if len(pool) > steps * batch_size:  # tokenize only what the steps can use (tasks reach 10k)
        pool = random.Random(seed).sample(pool, steps * batch_size)
    examples = [tokenize_example(tokenizer, e, max_length) for e in pool]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for parameter in frozen:
        parameter.requires_grad_(False)  # only the gates learn
    context = attach_experts(model, [expert], SigmoidGate())
    try:
        gates = []
        for layer in context.layers:
            layer.keys = layer.a_stack.new_zeros(1, layer.in_features).requires_grad_(True)
            gates.append(layer.keys)
        optimizer = torch.optim.AdamW(gates, lr=lr, weight_decay=0.0)
        plan, epoch = [], 0
        while len(plan) < steps:
            plan += length_grouped_batches([len(e) for e in examples], batch_size, seed + epoch)
            epoch += 1
        device = next(model.parameters()).device
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for indices in plan[:steps]:
                batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
                loss = target_only_loss(model, {k: v.to(device) for k, v in batch.items()})
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return {layer.name: layer.keys.detach()[0].clone() for layer in context.layers}
    finally:
        model.eval()
        detach_experts(model)
        for parameter, flag in frozen.items():
            parameter.requires_grad_(flag)


def gate_config(steps: int = 100, lr: float = 1e-3) -> dict:
    """The settings under which trained gates are stored in (and found again in) a library."""
    return {"steps": steps, "lr": lr, "batch_size": 8, "seed": 0, "sample": "steps*batch"}


def library_gates(model, tokenizer, library: Library, names: list[str], steps: int = 100,
                  lr: float = 1e-3, task_loader: Callable[[str], Task] = load_task) -> dict:
    """Gates of each named expert, trained once (with `model`) and stored in the library."""
    config = gate_config(steps, lr)

    def compute(name: str) -> dict:
        expert = library.get(name)
        tasks = [task_loader(t) for t in expert.info.tasks]
        return train_gates(model, tokenizer, expert, tasks, steps, lr)

    return {name: library.derived(name, KIND, config, lambda n=name: compute(n))
            for name in names}
