"""What the multi-task adapters (Poly/MHR, MTL-LoRA) share: layers that hold a row of
parameters per training task and pick, for every input row, its task's row.

- `TaskRouting`: the task of the inputs, shared by an adapter's layers (training runs each
  batch within `TaskRowAdapter.routed`, which sets its rows' `task_ids` for that batch only;
  evaluation sets one task for a whole task's examples with `set_task`);
- `attach_task_layers`: replace a model's target linear layers by such layers, all or none;
- `TaskRowAdapter`: the attached layers as the training loop, evaluation and storage use
  them (routed, set_task, train/eval, weights in and out under their stored key names, remove).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from quiver.errors import QuiverError
from quiver.library.expert import PEFT_PREFIX
from quiver.models import linear_layers, model_targets


class TaskRouting:
    """The task of the inputs, shared by the task-row layers of one model: an int (one row
    for the whole batch, as at evaluation) or a tensor (batch,) of rows (a mixed training
    batch, set for that batch only by `for_rows`)."""

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | int | None = None

    @contextmanager
    def for_rows(self, task_ids: torch.Tensor) -> Iterator[None]:
        """Within the block, input row i runs with task `task_ids[i]`'s parameters; the task
        set before is back afterwards. Spans forward and backward when training, since
        gradient checkpointing recomputes the forward within the backward."""
        before, self.task_ids = self.task_ids, task_ids
        try:
            yield
        finally:
            self.task_ids = before

    def rows(self, device: torch.device) -> torch.Tensor | int:
        """The task ids, on `device` when a tensor.

        Raises:
            QuiverError: no task set.
        """
        ids = self.task_ids
        if ids is None:
            raise QuiverError("a multi-task adapter layer needs the task of its inputs (no task "
                              "set: call set_task)")
        return ids.to(device) if isinstance(ids, torch.Tensor) else ids


def adapter_options(base: nn.Linear) -> dict:
    """Device and dtype for an adapter's weights on `base`: fp32 on a half-precision base
    (small weights that train in bf16 lose their updates to rounding)."""
    dtype = base.weight.dtype
    if dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32
    return {"device": base.weight.device, "dtype": dtype}


def check_batch_rows(rows: int, x: torch.Tensor) -> None:
    """Refuse task ids that are neither one for the batch nor one per batch row.

    Raises:
        QuiverError: `rows` fits neither.
    """
    if x.dim() > 2 and rows not in (1, x.shape[0]):
        raise QuiverError(f"{rows} task ids for a batch of {x.shape[0]} rows")


def attach_task_layers(model: nn.Module, task_names: list[str], target_modules: tuple[str, ...],
                       make_layer: Callable[[nn.Linear, TaskRouting], nn.Module]
                       ) -> tuple[dict[str, nn.Module], TaskRouting, dict[nn.Parameter, bool]]:
    """Replace `model`'s target linear layers by `make_layer(linear, routing)` and freeze the
    base weights. The layers share one `TaskRouting`: what tells them their inputs' task.

    Every layer is built (and so checked) before the model is changed: a failure leaves the
    model as found.

    Returns:
        The new layers by module name, their routing, and each parameter's `requires_grad`
        as found (for `TaskRowAdapter.remove`).

    Raises:
        QuiverError: the model already has task-row layers, no tasks, a target module the
            model lacks, or whatever `make_layer` raises.
    """
    if task_routing(model) is not None:
        raise QuiverError("this model already has a multi-task adapter attached")
    if not task_names:
        raise QuiverError("a multi-task adapter needs at least one task")
    targets = target_linear_layers(model, target_modules)
    routing = TaskRouting()
    frozen = {p: p.requires_grad for p in model.parameters()}
    layers = {name: make_layer(model.get_submodule(name), routing) for name in targets}
    for param in frozen:
        param.requires_grad_(False)  # only the adapter learns
    for name, layer in layers.items():
        replace_module(model, name, layer)
    return layers, routing, frozen


def task_routing(model: nn.Module) -> TaskRouting | None:
    """The routing of the task-row layers attached to `model`; None if it has none."""
    for module in model.modules():
        routing = getattr(module, "routing", None)
        if isinstance(routing, TaskRouting):
            return routing
    return None


class TaskRowAdapter:
    """Task-row layers attached to a model: what training, evaluation and storage need.

    Each layer names its tensors with `parts()` (`{stored suffix: parameter}`); the weights
    are stored as `base_model.model.<module>.<suffix>`. The model is changed in place;
    `remove()` puts the original layers back and unfreezes what it froze.
    """

    kind = ""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], task_names: list[str],
                 config, lora: dict, routing: TaskRouting,
                 frozen: dict[nn.Parameter, bool]) -> None:
        self.causal_lm, self.layers, self.task_names = model, layers, list(task_names)
        self.config, self.lora, self.routing = config, lora, routing
        self._frozen = frozen
        self._was_training = model.training  # `remove` puts the mode back too

    def set_task(self, task: str | int) -> None:
        """Run every input with one task's row (by name or row index).

        Raises:
            QuiverError: a task with no row.
        """
        if isinstance(task, str):
            if task not in self.task_names:
                raise QuiverError(f"no routing row for task {task!r}: this {self.kind} entry "
                                  f"was trained on {self.task_names}")
            task = self.task_names.index(task)
        self.routing.task_ids = task

    def routed(self, batch: dict[str, torch.Tensor]) -> AbstractContextManager:
        """Run `batch`'s rows, within the returned context, each with its task's row."""
        return self.routing.for_rows(batch["task_ids"])

    def train(self) -> None:
        self.causal_lm.train()

    def eval(self) -> None:
        self.causal_lm.eval()

    def weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of every layer's parameters, under their stored key names."""
        return {f"{PEFT_PREFIX}{module}.{suffix}": param.detach().cpu().clone()
                for module, layer in self.layers.items()
                for suffix, param in layer.parts().items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set every layer from `weights()`'s form.

        Raises:
            QuiverError: a layer's tensor missing from `weights`, or of another shape.
        """
        with torch.no_grad():
            for module, layer in self.layers.items():
                for suffix, param in layer.parts().items():
                    value = weights.get(f"{PEFT_PREFIX}{module}.{suffix}")
                    if value is None or value.shape != param.shape:
                        raise QuiverError(f"no {suffix} of shape {tuple(param.shape)} for "
                                          f"{module}")
                    param.copy_(value)

    def loaded(self, weights: dict[str, torch.Tensor]) -> TaskRowAdapter:
        """This adapter with a stored entry's `weights`, in evaluation mode.

        Raises:
            QuiverError: the weights do not fit (the adapter is removed first).
        """
        try:
            self.load_weights(weights)
        except QuiverError:
            self.remove()
            raise
        self.eval()
        return self

    def remove(self) -> None:
        """Put the original linear layers back and restore `requires_grad` and the
        train/eval mode as found."""
        for module, layer in self.layers.items():
            replace_module(self.causal_lm, module, layer.base)
        for param, flag in self._frozen.items():
            param.requires_grad_(flag)
        self.causal_lm.train(self._was_training)
        self.layers = {}


def target_linear_layers(model: nn.Module, target_modules: tuple[str, ...]) -> list[str]:
    """Names of `model`'s linear layers (nn.Linear and Conv1D) whose last name part is a
    target (`all-linear`: every linear layer but the output head).

    Raises:
        QuiverError: a target the model has no linear layer of.
    """
    targets = model_targets(model, target_modules)
    return [name for name in linear_layers(model) if name.rsplit(".", 1)[-1] in targets]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
