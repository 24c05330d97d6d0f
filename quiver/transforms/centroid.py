"""Centroids for average-activation routing: per expert and layer, the mean input.

For each expert, run its model (base + that expert) over a few training examples of its own
tasks and record, at every adapted layer, the mean of that layer's input over all tokens;
L2-normalise it. Stored in the library per expert, keyed by the settings below.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quiver.data import SplitConfig, Task, load_task
from quiver.data.batching import collate, tokenize_example
from quiver.library import Library
from quiver.routing import UniformRouter, attach_experts, detach_experts

KIND = "centroid"


def expert_centroids(model, tokenizer, expert, tasks: list[Task], n_examples: int = 10,
                     max_length: int = 256) -> dict[str, torch.Tensor]:
    """`{module: unit vector (in,)}`: mean layer input over `n_examples` per task."""
    examples = [e for t in tasks for e in t.split("train", SplitConfig())[:n_examples]]
    context = attach_experts(model, [expert], UniformRouter())
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    mask_holder = {}

    def record(layer, inputs):
        x = inputs[0]  # (b, s, in)
        mask = mask_holder["mask"][..., None].to(x.dtype)  # (b, s, 1)
        sums[layer.name] = sums.get(layer.name, 0) + (x * mask).sum((0, 1)).double()

    try:
        for layer in context.layers:
            hooks.append(layer.register_forward_pre_hook(record))
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(examples), 8):
                batch = collate([tokenize_example(tokenizer, e, max_length)
                                 for e in examples[start : start + 8]], tokenizer.pad_token_id)
                mask_holder["mask"] = batch["attention_mask"].to(device)
                model(input_ids=batch["input_ids"].to(device),
                      attention_mask=batch["attention_mask"].to(device))
    finally:
        for hook in hooks:
            hook.remove()
        detach_experts(model)
    return {m: torch.nn.functional.normalize(v, dim=0).float() for m, v in sums.items()}


def library_centroids(model, tokenizer, library: Library, names: list[str],
                      n_examples: int = 10,
                      task_loader: Callable[[str], Task] = load_task) -> dict[str, dict]:
    """Centroids of each named expert, computed once (with `model`) and stored in the library."""
    config = {"examples": n_examples, "split": "train"}

    def compute(name: str) -> dict:
        expert = library.get(name)
        tasks = [task_loader(t) for t in expert.info.tasks]
        return expert_centroids(model, tokenizer, expert, tasks, n_examples)

    return {name: library.derived(name, KIND, config, lambda n=name: compute(n))
            for name in names}
