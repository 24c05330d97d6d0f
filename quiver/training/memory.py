"""Memory planning for training: how each step's batch runs so that its activations fit.

A batch whose activations would not fit runs in parts of at most `micro_batch_tokens` padded
tokens with gradient accumulation (the same update as the whole batch), and with gradient
checkpointing the decoder layers recompute their activations in the backward pass. Both are
chosen from the free memory unless set (`plan_memory`). On a CPU where memory is tight, glibc
is told to hand freed activations back to the system (`return_freed_memory`).
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from quiver.data.batching import TokenizedExample
from quiver.training.config import TrainConfig


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


MEMORY_FRACTION = 0.5  # of the free memory, for activations: the rest for others and error
# glibc's own mmap threshold keeps freed activations in the heap: peak RSS per token 3.0 MiB
# instead of 2.0 with `return_freed_memory`, which in turn costs page faults on every step
# (1.4x the step time, measured: benchmarks/README.md). So it is used only when memory is tight.
GLIBC_OWN_THRESHOLD_FACTOR = 1.5
CPU_PART_TOKENS = 512  # on a CPU, bigger parts are no faster (benchmarks/README.md), only bigger
# Activation memory per token and decoder layer, in values of the model's dtype: what autograd
# saves (summed with torch.autograd.graph.saved_tensors_hooks on SmolLM2-135M, fp32, LoRA r=4 on
# the 7 linear modules, dropout 0.05: 66 KiB = 15 x hidden 576 + 5 x intermediate 1536 values:
# residual stream, norms, q and attention output, each LoRA module's dropped-out input; gate,
# up, activation, product). The peak RSS of a forward + backward grows by PEAK_FACTOR times
# that: 2.0 MiB per token over 30 layers, from the difference in peak RSS between 1 and 2 rows
# of 512 tokens, each in a fresh process (with `return_freed_memory`; 3.0 MiB without it).
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
    the budget, the plan asks for the lean allocator (`return_freed_memory`).
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


def return_freed_memory() -> None:
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
