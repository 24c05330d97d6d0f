"""Train one expert on one or more tasks: a plain PyTorch loop, read top to bottom. A LoRA by
default (`quiver.adapters.lora`); with `adapter=`, a multi-task adapter of `quiver.adapters`
(Poly/MHR, MTL-LoRA), whose layers use each batch row's task.

It is fast on a CPU because the loss is computed on target tokens only (`loss`) and batches
are grouped by length (`quiver.data.batching`), so almost nothing is padding. It fits in
memory by running big batches in parts and checkpointing activations (`memory`). It is
reproducible (seeded data order, dropout seeded per step), keeps the weights of the best
validation loss, and resumes after an interruption from the state it saves at every
validation (`checkpointing`): the resumed run produces the same weights as one that was
never interrupted.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quiver.adapters.lora import LoraAdapter
from quiver.adapters.protocol import AdapterSpec, TrainableAdapter
from quiver.config import stable_hash, to_dict
from quiver.data.batching import TokenizedExample, length_grouped_batches, tokenize_example
from quiver.data.task import Task
from quiver.errors import QuiverError
from quiver.library.expert import Expert, ExpertInfo
from quiver.library.store import RunState
from quiver.models import fingerprint
from quiver.training.checkpointing import Progress, resume_progress, save_progress
from quiver.training.config import MEMORY_FIELDS, TrainConfig
from quiver.training.loss import accumulate_gradients, mean_target_loss
from quiver.training.memory import (
    MemoryPlan,
    gradient_checkpointing,
    plan_memory,
    return_freed_memory,
)


@dataclass
class TrainResult:
    """What a training run measured, besides the expert itself."""

    steps: int
    tokens: int
    seconds: float
    best_step: int
    best_valid_loss: float
    history: list[dict]
    memory: MemoryPlan | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def train_expert(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[Task],
    name: str,
    config: TrainConfig = TrainConfig(),
    run_state: RunState | None = None,
    show_progress: bool = True,
    adapter: AdapterSpec | None = None,
) -> tuple[Expert, TrainResult]:
    """Train a LoRA expert on the pooled training data of `tasks`, or with `adapter`, an
    adapter of that kind (Poly/MHR, MTL-LoRA: one row per task, in the order of `tasks`).

    The base model is left as it was (the adapter's layers are removed afterwards).

    Args:
        run_state: where to save resumable state (`Library.run_state(name)`); a run found
            there with the same config and tasks resumes, one with another config is an error.
            The caller clears it once the expert is safely stored.
        adapter: what to train instead of a LoRA; None trains a LoRA.

    Raises:
        QuiverError: a task with no training examples, target modules the model lacks, or a
            saved run that does not match this one.
    """
    if not tasks:
        raise QuiverError("no tasks to train on")
    train_set, valid_set = tokenized_splits(tokenizer, tasks, config)
    device = next(model.parameters()).device
    what = {k: v for k, v in to_dict(config).items() if k not in MEMORY_FIELDS}
    key = {"config": what, "tasks": [t.name for t in tasks]}
    if adapter is not None:  # only then: the keys of LoRA runs saved before stay the same
        key["adapter"] = {"kind": adapter.kind, **to_dict(adapter)}
    run_key = stable_hash(key)
    steps = config.steps
    if config.epochs > 0:
        steps = max(1, math.ceil(config.epochs * len(train_set) / config.batch_size))

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(config.seed)
        trainer = (adapter.attach(model, [t.name for t in tasks], config) if adapter is not None
                   else LoraAdapter(model, config))
        try:
            optimizer = torch.optim.AdamW(trainer.param_groups(config), lr=config.lr,
                                          weight_decay=config.weight_decay)
            state = Progress()
            if run_state is not None:
                resume_progress(run_state, run_key, trainer, optimizer, state)
            plan = plan_memory(model, train_set, config, previous=state.memory)
            state.memory = asdict(plan)
            if plan.lean_allocator:
                return_freed_memory()
            batches = _batch_plan(train_set, config, steps)
            with gradient_checkpointing(model, plan.gradient_checkpointing):
                _loop(trainer, tokenizer, optimizer, batches, valid_set, config, steps, state,
                      run_state, run_key, device, show_progress, plan)
            adapter_config, weights, lora = trainer.stored(state.best_weights
                                                           or trainer.weights())
        finally:
            trainer.remove()  # restore the plain base model for the caller

    info = ExpertInfo(
        name=name,
        tasks=[t.name for t in tasks],
        base_model=model.config._name_or_path,
        base_fingerprint=fingerprint(model),
        lora=lora,
        training={**to_dict(config), "steps_run": steps, "train_examples": len(train_set),
                  "memory": state.memory,
                  # provenance: each task's family (reasoning-gym's category), where it has one
                  "task_families": {t.name: t.metadata.get("family", "") for t in tasks}},
        metrics={"best_valid_loss": state.best_loss, "best_step": state.best_step},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        kind=trainer.kind,
    )
    result = TrainResult(
        steps, state.tokens, state.seconds, state.best_step, state.best_loss, state.history, plan
    )
    return Expert(info, adapter_config, weights=weights), result


def _loop(
    trainer: TrainableAdapter,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    batches: _LazyBatches,
    valid_set: list[TokenizedExample],
    config: TrainConfig,
    steps: int,
    state: Progress,
    run_state: RunState | None,
    run_key: str,
    device: torch.device,
    show_progress: bool,
    plan: MemoryPlan,
) -> None:
    """Run optimizer steps from `state.step` to `steps`, validating every `eval_every`."""
    from quiver.progress import training_progress

    warmup = max(1, int(config.warmup * steps))
    with training_progress(steps, show_progress) as bar:
        bar.advance(state.step)
        bar.note(plan.describe())  # until the first validation replaces it
        while state.step < steps:
            trainer.train()
            torch.manual_seed(config.seed * 1_000_003 + state.step)  # dropout: resumable
            started = time.perf_counter()
            factor = _lr_factor(state.step, steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            loss, tokens = accumulate_gradients(trainer.causal_lm, batches[state.step],
                                                tokenizer.pad_token_id, plan.micro_batch_tokens,
                                                device, route=trainer.routed)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += tokens
            state.seconds += time.perf_counter() - started
            bar.update(loss=loss, tokens_per_second=state.tokens / state.seconds)
            if state.step % config.eval_every == 0 or state.step == steps:
                valid_loss = validation_loss(trainer, valid_set, tokenizer, config, device)
                state.history.append(
                    {"step": state.step, "train_loss": loss, "valid_loss": valid_loss}
                )
                if valid_loss < state.best_loss:
                    state.best_loss, state.best_step = valid_loss, state.step
                    state.best_weights = trainer.weights()
                bar.note(f"valid loss {valid_loss:.3f} (best {state.best_loss:.3f})")
                if run_state is not None and state.step < steps:
                    save_progress(run_state, run_key, trainer, optimizer, state)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup to 1, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def validation_loss(trainer: TrainableAdapter, valid_set: list[TokenizedExample],
                    tokenizer: PreTrainedTokenizerBase, config: TrainConfig,
                    device: torch.device) -> float:
    """Token-weighted mean target loss over the validation examples (no dropout)."""
    trainer.eval()
    return mean_target_loss(trainer.causal_lm, valid_set, tokenizer.pad_token_id,
                            config.batch_size * 2, device, route=trainer.routed)


def tokenized_splits(tokenizer: PreTrainedTokenizerBase, tasks: list[Task],
                     config: TrainConfig) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """The training and validation examples of `tasks`, tokenized, each marked with its
    task's index (its row in a multi-task adapter); at most `eval_examples` validation
    examples, an even sample across tasks.

    Raises:
        QuiverError: a task with no training examples.
    """
    split = config.split_config()
    train, valid = [], []
    for index, task in enumerate(tasks):
        task_train = task.split("train", split)
        if not task_train:
            raise QuiverError(f"task {task.name!r} has no training examples")
        train += [tokenize_example(tokenizer, e, config.max_length, index) for e in task_train]
        valid += [tokenize_example(tokenizer, e, config.max_length, index)
                  for e in task.split("valid", split)]
    if len(valid) > config.eval_examples:
        step = len(valid) / config.eval_examples
        valid = [valid[int(i * step)] for i in range(config.eval_examples)]
    return train, valid


def _batch_plan(train_set: list[TokenizedExample], config: TrainConfig,
                steps: int) -> _LazyBatches:
    """The batches of every step, epoch after epoch, each epoch in its own seeded order."""
    lengths = [len(e) for e in train_set]
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < steps:
        plan += length_grouped_batches(lengths, config.batch_size, seed=config.seed + epoch)
        epoch += 1
    return _LazyBatches(train_set, plan[:steps])


class _LazyBatches:
    """A step's examples when asked for (a plan of 10,000 steps holds only indices)."""

    def __init__(self, examples: list[TokenizedExample], plan: list[list[int]]) -> None:
        self._examples, self._plan = examples, plan

    def __getitem__(self, step: int) -> list[TokenizedExample]:
        return [self._examples[i] for i in self._plan[step]]

    def __len__(self) -> int:
        return len(self._plan)
