"""Saving and resuming a training run: at every validation the loop saves its progress (the
adapter's weights, the best weights so far, AdamW's moments, the counters) in the library's
run state; a run started again with the same config and tasks resumes from it and produces
the same weights as one that was never interrupted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from quiver.adapters.protocol import TrainableAdapter
from quiver.errors import QuiverError
from quiver.library.store import RunState


@dataclass
class Progress:
    """Where a training run stands: what the loop updates every step and saves."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_loss: float = math.inf
    best_step: int = 0
    best_weights: dict | None = None
    history: list = field(default_factory=list)
    memory: dict | None = None  # the MemoryPlan the run started with (reused on resume)


def save_progress(run_state: RunState, run_key: str, trainer: TrainableAdapter,
                  optimizer: torch.optim.Optimizer, state: Progress) -> None:
    """Write the run's state: tensors `lora.*` (current weights, whatever the adapter's kind),
    `best.*` and `adam.<index>.<slot>`, and the counters with `run_key` as metadata."""
    tensors = {f"lora.{k}": v for k, v in trainer.weights().items()}
    if state.best_weights is not None:
        tensors.update({f"best.{k}": v for k, v in state.best_weights.items()})
    for index, slots in optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            tensors[f"adam.{index}.{slot}"] = torch.as_tensor(value).detach().cpu()
    meta = {
        "run_key": run_key,
        "step": state.step,
        "tokens": state.tokens,
        "seconds": state.seconds,
        "best_loss": state.best_loss,
        "best_step": state.best_step,
        "history": state.history,
        "memory": state.memory,
    }
    run_state.write(tensors, meta)


def resume_progress(run_state: RunState, run_key: str, trainer: TrainableAdapter,
                    optimizer: torch.optim.Optimizer, state: Progress) -> None:
    """Load a saved run into `trainer`, `optimizer` and `state` (nothing saved: nothing to do).

    Raises:
        QuiverError: the saved run was started with another config or other tasks.
    """
    saved = run_state.read()
    if saved is None:
        return
    tensors, meta = saved
    if meta.get("run_key") != run_key:
        raise QuiverError(
            "a saved run for this expert was started with another config or other tasks; "
            "remove it (or train under another name) to start over"
        )
    trainer.load_weights({k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    adam: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, slot = key.split(".", 2)
            adam.setdefault(int(index), {})[slot] = value
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = adam
    optimizer.load_state_dict(optimizer_state)
    state.step, state.tokens, state.seconds = meta["step"], meta["tokens"], meta["seconds"]
    state.best_loss, state.best_step = meta["best_loss"], meta["best_step"]
    state.best_weights, state.history = (best or None), meta["history"]
    state.memory = meta.get("memory")  # absent in runs saved before memory plans
