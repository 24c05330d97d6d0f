"""The transfer matrix: how well each expert does on each task, the base model for reference.

Ostapenko et al. (2024) use it to see which tasks help each other: an expert trained on task
i that lowers the loss on task j (compared with the base model) transfers to it, and MBC
clusters should group such tasks. Each cell is one of:

- `loss`: the mean cross-entropy per target token on the task's examples (the training
  loop's own validation loss, `quiver.training.mean_target_loss`); lower is better;
- `accuracy`: the evaluation harness's score, as `quiver eval --method expert:NAME` gives it:
  multiple-choice accuracy, or exact match for generative tasks; higher is better.

An expert is applied alone (the `uniform` router over one expert: W x + s B A x).
"""

from __future__ import annotations

from quiver.data.batching import tokenize_example
from quiver.data.task import SplitConfig, Task
from quiver.errors import QuiverError
from quiver.evaluation.config import TransferConfig
from quiver.library import Library
from quiver.library.expert import require_lora
from quiver.progress import counting_progress

BASE_ROW = "base"


def transfer_matrix(
    model,
    tokenizer,
    library: Library,
    tasks: list[Task],
    experts: list[str] | None = None,
    config: TransferConfig = TransferConfig(),
    show_progress: bool = True,
) -> dict:
    """Score the base model and each expert (all by default) on every task.

    Returns a JSON-ready report: `values` maps each row (`base`, then the experts) to
    `{task: value}`; `tasks`, `metric`, `split`, `examples` (per task) and `expert_tasks`
    (each expert's training tasks) describe it. The model is left as it was.

    Raises:
        QuiverError: no tasks, an unknown expert, a task without examples in the split, or
            a library for another base model.
    """
    from quiver.routing import detach_experts
    from quiver.zero_shot import check_same_base, reuse

    if not tasks:
        raise QuiverError("no tasks to compute a transfer matrix on")
    names = library.names() if experts is None else list(experts)
    check_same_base(model, library, names)  # before any work: a wrong base fails at once
    require_lora(library.experts(names), "the transfer matrix")
    score = _loss_scorer(tokenizer, tasks, config) if config.metric == "loss" else \
        _accuracy_scorer(tokenizer, tasks, config)
    values, rows = {}, [BASE_ROW, *names]
    model.eval()
    with counting_progress("transfer matrix", enabled=show_progress) as progress:
        for done, row in enumerate(rows):
            if row != BASE_ROW:
                reuse(model, library, method="uniform", experts=[row])
            try:
                values[row] = score(model)
            finally:
                if row != BASE_ROW:
                    detach_experts(model)
            progress(done + 1, len(rows))
    return {
        "metric": config.metric,
        "split": config.split,
        "limit": config.limit,
        "skip": config.skip,
        "tasks": [t.name for t in tasks],
        "examples": {t.name: len(_examples(t, config)) for t in tasks},
        "values": values,
        "expert_tasks": {n: library.get(n).info.tasks for n in names},
    }


def _examples(task: Task, config: TransferConfig) -> list:
    examples = task.split(config.split, SplitConfig())[config.skip :]
    examples = examples[: config.limit] if config.limit else examples
    if not examples:
        raise QuiverError(f"task {task.name!r} has no examples in its {config.split} split")
    return examples


def _loss_scorer(tokenizer, tasks: list[Task], config: TransferConfig):
    from quiver.training import mean_target_loss

    tokenized = {t.name: [tokenize_example(tokenizer, e, config.max_length)
                          for e in _examples(t, config)] for t in tasks}  # once, for every row

    def score(model) -> dict[str, float]:
        return {name: mean_target_loss(model, examples, tokenizer.pad_token_id,
                                       config.batch_size)
                for name, examples in tokenized.items()}

    return score


def _accuracy_scorer(tokenizer, tasks: list[Task], config: TransferConfig):
    from quiver.evaluation.harness import EvalConfig, evaluate

    for task in tasks:
        _examples(task, config)  # a task without examples fails before any scoring
    eval_config = EvalConfig(split=config.split, limit=config.limit, skip=config.skip,
                             batch_size=config.batch_size)

    def score(model) -> dict[str, float]:
        report = evaluate(model, tokenizer, tasks, eval_config, show_progress=False)
        return {name: result["accuracy"] if "accuracy" in result else result["exact_match"]
                for name, result in report["tasks"].items()}

    return score
