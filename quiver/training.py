"""Train one LoRA expert on one or more tasks: a plain PyTorch loop, read top to bottom. The
same loop trains the multi-task adapters of `quiver.adapters` (Poly/MHR, MTL-LoRA:
`adapter=`), whose layers use each batch row's task.

What makes it fast on a CPU, compared with a textbook PEFT + transformers loop:
- the loss is computed on the target tokens only: the decoder runs on the whole sequence,
  but the output projection (vocabulary 49k) and the cross-entropy only on target positions;
- batches are grouped by length (`quiver.data.batching`), so almost nothing is padding.

What makes it fit in memory: a batch whose activations would not fit runs in parts of at most
`micro_batch_tokens` padded tokens with gradient accumulation (the same update as the whole
batch), and with `gradient_checkpointing` the decoder layers recompute their activations in
the backward pass. Both are chosen from the free memory unless set (`plan_memory`).

It is reproducible (seeded data order, dropout seeded per step), keeps the LoRA weights of the
best validation loss, and resumes after an interruption from the state it saves at every
evaluation: the resumed run produces the same weights as one that was never interrupted.
"""

from __future__ import annotations

import ctypes
import logging
import math
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quiver.config import stable_hash, to_dict
from quiver.data.batching import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    length_grouped_batches,
    micro_batches,
    tokenize_example,
)
from quiver.data.task import SplitConfig, Task
from quiver.errors import QuiverError
from quiver.library.expert import Expert, ExpertInfo
from quiver.library.formats import peft_config_json
from quiver.library.store import RunState
from quiver.models import ALL_LINEAR, fingerprint, model_targets, unadapted_weights

log = logging.getLogger("quiver")

CHECKPOINTING = ("auto", "on", "off")
# How a step is run, not what it computes: left out of the key that matches a saved run to its
# config, so a run stopped for lack of memory can resume with a smaller budget.
MEMORY_FIELDS = ("micro_batch_tokens", "gradient_checkpointing")


@dataclass
class TrainConfig:
    """How to train an expert. Defaults follow the paper (design.md: training defaults)."""

    steps: int = field(default=500, metadata={"help": "optimizer steps (ignored with epochs)"})
    epochs: float = field(default=0.0, metadata={"help": "passes over the data; 0: use steps"})
    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup: float = field(default=0.06, metadata={"help": "fraction of steps of linear warmup"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (prompt cut)"})
    target_modules: tuple[str, ...] = field(
        default=(ALL_LINEAR,), metadata={
            "help": "linear layers to adapt, by name (q_proj, c_attn, ...), or all-linear: "
                    "every linear layer of the model but its output head"})
    eval_every: int = field(default=50, metadata={"help": "steps between validations"})
    eval_examples: int = field(default=256, metadata={"help": "validation examples used"})
    seed: int = field(default=0, metadata={"help": "seed for data order, init and dropout"})
    max_train: int = field(default=10_000, metadata={"help": "train examples per task, at most"})
    max_valid: int = field(default=1_000, metadata={"help": "valid examples per task, at most"})
    micro_batch_tokens: int = field(default=0, metadata={
        "help": "padded tokens per forward/backward, at most: a bigger batch runs in parts "
                "(gradient accumulation, the same update); 0: pick from the free memory"})
    gradient_checkpointing: str = field(default="auto", metadata={
        "help": "recompute activations in the backward pass (less memory, slower): on, off, "
                "or auto (on when one example would not fit otherwise)"})

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank < 1 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError("rank, batch_size must be positive and max_length at least 8")
        if self.micro_batch_tokens < 0:
            raise ValueError("micro_batch_tokens must be 0 (automatic) or positive")
        if self.gradient_checkpointing not in CHECKPOINTING:
            raise ValueError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)}")
        if self.steps < 1 and self.epochs <= 0:
            raise ValueError("train for at least one step (steps > 0 or epochs > 0)")
        if not self.target_modules:
            raise ValueError("target_modules is empty")

    def split_config(self) -> SplitConfig:
        return SplitConfig(seed=0, max_train=self.max_train, max_valid=self.max_valid)


@dataclass(frozen=True)
class MemoryPlan:
    """How each step's batch runs: in parts of at most `micro_batch_tokens` padded tokens
    (0: whole), with or without gradient checkpointing; and the figures it was chosen from."""

    micro_batch_tokens: int
    gradient_checkpointing: bool
    estimated_bytes: int = 0  # activation memory of the largest part, as estimated
    available_bytes: int = 0  # memory free when planned (0: not measured)
    lean_allocator: bool = False  # glibc told to hand freed activations back (see plan_memory)

    def describe(self) -> str:
        parts = (f"parts of <= {self.micro_batch_tokens} tokens" if self.micro_batch_tokens
                 else "whole batches")
        checkpointing = "on" if self.gradient_checkpointing else "off"
        gib = 2**30
        return (f"{parts}, checkpointing {checkpointing} (activations ~"
                f"{self.estimated_bytes / gib:.1f} GiB, {self.available_bytes / gib:.1f} GiB free)")


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


def target_only_loss(causal_lm: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over target tokens, projecting only those positions to the vocabulary.

    Equal to `causal_lm(**batch).loss` (the full-logits loss) for models whose logits are just
    `lm_head(hidden)`, at a fraction of the cost when prompts are longer than targets.
    """
    _route_by_task(causal_lm, batch)
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (batch, time, hidden)
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = labels != IGNORE_INDEX  # (batch, time - 1)
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])  # (targets, vocab)
    return F.cross_entropy(logits.float(), labels[keep])


def _route_by_task(causal_lm: PreTrainedModel, batch: dict[str, torch.Tensor]) -> None:
    """Tell a multi-task adapter (`quiver.adapters`) the task of each row of the batch."""
    routing = getattr(causal_lm, "quiver_task_routing", None)
    if routing is not None and "task_ids" in batch:
        routing.task_ids = batch["task_ids"]


def accumulate_gradients(
    causal_lm: PreTrainedModel,
    examples: list[TokenizedExample],
    pad_id: int,
    max_tokens: int = 0,
    device: torch.device | str | None = None,
) -> tuple[float, int]:
    """Backpropagate the mean target loss of `examples` as one batch, in parts of at most
    `max_tokens` padded tokens (0: in one go).

    Each part's mean loss is weighted by its share of the batch's target tokens, so the
    accumulated gradient is that of the whole batch's mean loss (up to float rounding) while
    only one part's activations are alive at a time. Dropout draws its masks part by part, so
    with dropout the masks (not their distribution) differ from a run in one go.

    Returns:
        The batch's mean target loss and its number of real (unpadded) tokens.
    """
    device = device or next(causal_lm.parameters()).device
    parts = [collate(part, pad_id) for part in micro_batches(examples, max_tokens)]
    targets = [int((part["labels"][:, 1:] != IGNORE_INDEX).sum()) for part in parts]
    loss_sum, tokens = 0.0, 0
    for part, n in zip(parts, targets, strict=True):
        part = {k: v.to(device) for k, v in part.items()}
        loss = target_only_loss(causal_lm, part) * (n / sum(targets))  # x 1.0 for one part
        loss.backward()
        loss_sum += loss.item()
        tokens += int(part["attention_mask"].sum())
    return loss_sum, tokens


class TrainableAdapter(Protocol):
    """An adapter attached to a model for training: what the loop needs of it. A LoRA through
    PEFT (`_LoraAdapter`) or a multi-task adapter of `quiver.adapters`."""

    kind: str
    causal_lm: PreTrainedModel  # the model whose forward includes the adapter

    def param_groups(self, config: TrainConfig) -> list[dict]:
        """AdamW groups, each with its own `peak_lr` (scaled by the schedule every step)."""

    def weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable weights (what runs save and `load_weights` takes)."""

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def stored(self, weights: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
        """(PEFT adapter config, PEFT state dict, `ExpertInfo.lora`) of `weights`."""

    def remove(self) -> None:
        """Take the adapter off, leaving the base model as it was."""


class AdapterSpec(Protocol):
    """A kind of adapter to train instead of a LoRA (`quiver.adapters.PolyMHRConfig`,
    `MTLLoRAConfig`): a config dataclass that attaches fresh weights for some tasks."""

    @property
    def kind(self) -> str: ...

    def attach(self, model: PreTrainedModel, task_names: list[str],
               config: TrainConfig) -> TrainableAdapter: ...


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
    train_set, valid_set = _tokenized_splits(tokenizer, tasks, config)
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
                   else _LoraAdapter(model, config))
        try:
            optimizer = torch.optim.AdamW(trainer.param_groups(config), lr=config.lr,
                                          weight_decay=config.weight_decay)
            state = _Progress()
            if run_state is not None:
                _resume(run_state, run_key, trainer, optimizer, state)
            plan = plan_memory(model, train_set, config, previous=state.memory)
            state.memory = asdict(plan)
            if plan.lean_allocator:
                _return_freed_memory()
            batches = _batch_plan(train_set, config, steps)
            with gradient_checkpointing(model, plan.gradient_checkpointing):
                _loop(
                    trainer,
                    tokenizer,
                    optimizer,
                    batches,
                    valid_set,
                    config,
                    steps,
                    state,
                    run_state,
                    run_key,
                    device,
                    show_progress,
                    plan,
                )
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


# ---------------------------------------------------------------------------- the loop
@dataclass
class _Progress:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_loss: float = math.inf
    best_step: int = 0
    best_weights: dict | None = None
    history: list = field(default_factory=list)
    memory: dict | None = None  # the MemoryPlan the run started with (reused on resume)


def _loop(
    trainer: TrainableAdapter,
    tokenizer,
    optimizer,
    batches,
    valid_set,
    config,
    steps,
    state,
    run_state,
    run_key,
    device,
    show_progress,
    plan,
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
                                                device)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += tokens
            state.seconds += time.perf_counter() - started
            bar.update(loss=loss, tokens_per_second=state.tokens / state.seconds)
            if state.step % config.eval_every == 0 or state.step == steps:
                valid_loss = _validate(trainer, valid_set, tokenizer, config, device)
                state.history.append(
                    {"step": state.step, "train_loss": loss, "valid_loss": valid_loss}
                )
                if valid_loss < state.best_loss:
                    state.best_loss, state.best_step = valid_loss, state.step
                    state.best_weights = trainer.weights()
                bar.note(f"valid loss {valid_loss:.3f} (best {state.best_loss:.3f})")
                if run_state is not None and state.step < steps:
                    _save(run_state, run_key, trainer, optimizer, state)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup to 1, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def _validate(trainer, valid_set, tokenizer, config, device) -> float:
    """Token-weighted mean target loss over the validation examples (no dropout)."""
    trainer.eval()
    return mean_target_loss(trainer.causal_lm, valid_set, tokenizer.pad_token_id,
                            config.batch_size * 2, device)


@torch.no_grad()
def mean_target_loss(
    causal_lm: PreTrainedModel,
    examples: list[TokenizedExample],
    pad_id: int,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> float:
    """Mean cross-entropy per target token over `examples` (NaN if there are none).

    Every target token weighs the same, whichever example it is in; batches are grouped by
    length (seed 0) so almost nothing is padding. The model is used as it is (call `.eval()`
    first to switch dropout off).
    """
    if not examples:
        return math.nan
    device = device or next(causal_lm.parameters()).device
    total, count = 0.0, 0
    lengths = [len(e) for e in examples]
    for indices in length_grouped_batches(lengths, batch_size, seed=0):
        batch = collate([examples[i] for i in indices], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += target_only_loss(causal_lm, batch).item() * n
        count += n
    return total / count


# ---------------------------------------------------------------------------- memory
MEMORY_FRACTION = 0.5  # of the free memory, for activations: the rest for others and error
# glibc's own mmap threshold keeps freed activations in the heap: peak RSS per token 3.0 MiB
# instead of 2.0 with `_return_freed_memory`, which in turn costs page faults on every step
# (1.4x the step time, measured: benchmarks/README.md). So it is used only when memory is tight.
GLIBC_OWN_THRESHOLD_FACTOR = 1.5
CPU_PART_TOKENS = 512  # on a CPU, bigger parts are no faster (benchmarks/README.md), only bigger
# Activation memory per token and decoder layer, in values of the model's dtype: what autograd
# saves (summed with torch.autograd.graph.saved_tensors_hooks on SmolLM2-135M, fp32, LoRA r=4 on
# the 7 linear modules, dropout 0.05: 66 KiB = 15 x hidden 576 + 5 x intermediate 1536 values:
# residual stream, norms, q and attention output, each LoRA module's dropped-out input; gate,
# up, activation, product). The peak RSS of a forward + backward grows by PEAK_FACTOR times
# that: 2.0 MiB per token over 30 layers, from the difference in peak RSS between 1 and 2 rows
# of 512 tokens, each in a fresh process (with `_return_freed_memory`; 3.0 MiB without it).
HIDDEN_VALUES, INTERMEDIATE_VALUES, PEAK_FACTOR = 15, 5, 1.1
# With checkpointing a layer keeps 2 x hidden values per token (4.4 KiB measured on 8 layers)
# and one layer at a time holds the above: 0.15 MiB per token measured, 0.2 estimated.
CHECKPOINT_HIDDEN_VALUES = 2


def plan_memory(
    model: PreTrainedModel,
    examples: list[TokenizedExample],
    config: TrainConfig,
    previous: dict | None = None,
) -> MemoryPlan:
    """Resolve the memory settings of `config` left on auto, for training `model` on `examples`.

    Checkpointing costs about one more forward per step, so auto turns it on only when one of
    the longest examples would not fit without it. Parts cost almost nothing, so auto splits a
    batch whose estimated activations exceed `MEMORY_FRACTION` of the free memory (the
    optimizer, other processes and the estimate's error need the rest); on a CPU it also keeps
    parts to `CPU_PART_TOKENS` (or one row), as bigger ones are no faster. A resumed run passes
    `previous`, the plan it started with, and keeps its auto choices, so it takes the same steps
    as a run never interrupted, whatever memory is free now. On a CPU, where glibc's heap
    would hold the activations of one step beside the next (`GLIBC_OWN_THRESHOLD_FACTOR`) past
    the budget, the plan asks for the lean allocator (`_return_freed_memory`).
    """
    device = next(model.parameters()).device
    widest = max(len(e) for e in examples)
    batch_tokens = widest * min(config.batch_size, len(examples))
    target_share = sum(len(e) - e.n_prompt for e in examples) / sum(len(e) for e in examples)
    available = available_memory(device)
    budget = MEMORY_FRACTION * available

    def cost(checkpointing: bool) -> float:
        return activation_bytes_per_token(model, checkpointing, target_share)

    checkpointing = config.gradient_checkpointing == "on"
    if config.gradient_checkpointing == "auto":
        checkpointing = (previous["gradient_checkpointing"] if previous
                         else widest * cost(False) > budget)
    tokens = config.micro_batch_tokens
    if tokens == 0 and previous:
        tokens = previous["micro_batch_tokens"]
    elif tokens == 0:
        tokens = int(budget // cost(checkpointing))
        if device.type == "cpu":
            tokens = min(tokens, CPU_PART_TOKENS)
        tokens = max(tokens, widest)
        tokens = 0 if tokens >= batch_tokens else tokens  # whole batches fit
    part = min(max(tokens, widest), batch_tokens) if tokens else batch_tokens
    estimate = int(part * cost(checkpointing))
    lean = device.type == "cpu" and estimate * GLIBC_OWN_THRESHOLD_FACTOR > budget
    return MemoryPlan(tokens, checkpointing, estimate, int(available), lean)


def activation_bytes_per_token(
    model: PreTrainedModel, checkpointing: bool, target_share: float = 1.0
) -> float:
    """Estimated peak memory a training forward + backward adds per padded token.

    From the model's config (calibrated on SmolLM2, see the constants above); `target_share`
    of the tokens also hold fp32 logits over the vocabulary, their log-softmax and gradient.
    """
    config = model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    value = next(model.parameters()).element_size()
    layer = PEAK_FACTOR * (HIDDEN_VALUES * hidden + INTERMEDIATE_VALUES * intermediate) * value
    if checkpointing:
        decoder = layers * CHECKPOINT_HIDDEN_VALUES * hidden * value + layer
    else:
        decoder = layers * layer
    return decoder + target_share * config.vocab_size * 4 * 3


def available_memory(device: torch.device | str) -> int:
    """Bytes this process can still allocate on `device`.

    CUDA: the free memory plus what PyTorch's cache holds unused. Otherwise the system's
    available memory, or less where a container's memory limit (cgroup v2) leaves less.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil  # a dependency of peft

    available = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


@contextmanager
def gradient_checkpointing(model: PreTrainedModel, enabled: bool = True) -> Iterator[None]:
    """Within the block, `model`'s decoder layers keep only their inputs when training and
    recompute the rest in the backward pass: about one more forward, a fraction of the memory.

    Non-reentrant checkpointing: the LoRA weights get their gradients although no layer input
    requires grad, and the recompute replays the same dropout masks (it restores the RNG
    state), so the gradients are those of a run without it. The model is left as found (one
    already checkpointing is left alone).
    """
    if not enabled or any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        yield
        return
    had_input_hooks = bool(getattr(model, "_require_grads_hooks", None))
    # `activation_checkpointing_*` in recent transformers 5, `gradient_checkpointing_*` before
    enable = getattr(model, "activation_checkpointing_enable", None)
    disable = getattr(model, "activation_checkpointing_disable", None)
    (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    if not had_input_hooks:  # added for reentrant checkpointing; would backprop to embeddings
        model.disable_input_require_grads()
    try:
        yield
    finally:
        (disable or model.gradient_checkpointing_disable)()


def _return_freed_memory() -> None:
    """Make glibc give freed activation memory back to the system (Linux; process-wide).

    glibc raises its mmap threshold each time a big block is freed; blocks below it then come
    from the heap, which only shrinks from its top, so one step's freed activations stay in
    the process and the next step's land beside them. Fixing the threshold at its default,
    128 KiB, keeps big blocks mapped and returned when freed. Measured on SmolLM2, 512 tokens:
    peak RSS per token 2.0 MiB instead of 3.0, with checkpointing 0.15 instead of 1.07. It is
    not free: every step maps and zeroes its activations afresh, and on a 2-core Xeon a step
    of 8 x 256 tokens took 1.4x as long (40 s of 166 in the kernel, page faults), so the memory
    plan calls it only when memory is tight. It stays in effect for the process.
    """
    if platform.system() != "Linux":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library of this process
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


# ------------------------------------------------------------------------ setup helpers
def _tokenized_splits(tokenizer, tasks, config) -> tuple[list, list]:
    split = config.split_config()
    train, valid = [], []
    for index, task in enumerate(tasks):  # the index: the task's row (multi-task adapters)
        task_train = task.split("train", split)
        if not task_train:
            raise QuiverError(f"task {task.name!r} has no training examples")
        train += [tokenize_example(tokenizer, e, config.max_length, index) for e in task_train]
        valid += [tokenize_example(tokenizer, e, config.max_length, index)
                  for e in task.split("valid", split)]
    if len(valid) > config.eval_examples:  # an even, seeded sample across tasks
        step = len(valid) / config.eval_examples
        valid = [valid[int(i * step)] for i in range(config.eval_examples)]
    return train, valid


def _batch_plan(train_set: list[TokenizedExample], config, steps) -> _LazyBatches:
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

    def __init__(self, examples, plan) -> None:
        self._examples, self._plan = examples, plan

    def __getitem__(self, step: int) -> list[TokenizedExample]:
        return [self._examples[i] for i in self._plan[step]]

    def __len__(self) -> int:
        return len(self._plan)


class _LoraAdapter:
    """A LoRA through PEFT, as the loop trains it (`TrainableAdapter`)."""

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
        self.peft_model = _wrap_with_lora(model, config, self.targets)
        self.causal_lm = self.peft_model.get_base_model()

    def param_groups(self, config: TrainConfig) -> list[dict]:
        trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        return [{"params": trainable, "peak_lr": config.lr}]

    def weights(self) -> dict[str, torch.Tensor]:
        return _lora_weights(self.peft_model)

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


def _wrap_with_lora(model, config: TrainConfig, targets: tuple[str, ...]):
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _lora_weights(peft_model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(peft_model).items()
    }


# --------------------------------------------------------------------- resume / save
def _save(run_state: RunState, run_key, trainer, optimizer, state: _Progress) -> None:
    tensors = {f"lora.{k}": v for k, v in trainer.weights().items()}  # any kind: "lora." kept
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


def _resume(run_state: RunState, run_key, trainer, optimizer, state: _Progress) -> None:
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
