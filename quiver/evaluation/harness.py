"""Evaluate a model on tasks: per-example scores, per-task metrics, and the average."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from quiver.data.task import SPLITS, SplitConfig, Task
from quiver.errors import QuiverError
from quiver.evaluation.metrics import exact_match, mean, rouge_l
from quiver.evaluation.scoring import generate_answers, score_choices_batch
from quiver.progress import counting_progress


@dataclass
class EvalConfig:
    """Which examples to score and how."""

    split: str = field(default="test", metadata={
        "help": "train, valid, test, or all (every example: only for tasks no evaluated "
                "expert trained on, unless --allow-seen)"})
    limit: int = field(default=0, metadata={
        "help": "examples per task, at most (0: all); a seeded sample, the same every run"})
    batch_size: int = field(default=8, metadata={"help": "prompts per batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "generation length, at most"})

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}")


def evaluate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[Task],
    config: EvalConfig = EvalConfig(),
    before_task: Callable[[Task], None] | None = None,
    show_progress: bool = True,
) -> dict:
    """Score `model` on each task; returns `{"tasks": {name: metrics}, "average": metrics}`.

    `before_task` is called before each task (the oracle uses it to pick the task's expert).

    Raises:
        QuiverError: a task has no examples in the chosen split.
    """
    selected = {t.name: _examples(t, config) for t in tasks}
    total = sum(len(v) for v in selected.values())
    results = {}
    model.eval()
    with counting_progress("evaluating", enabled=show_progress) as progress:
        done = 0
        for task in tasks:
            if before_task is not None:
                before_task(task)
            examples = selected[task.name]
            if task.kind == "mc":
                results[task.name] = _multiple_choice(model, tokenizer, examples, config)
            else:
                results[task.name] = _generative(model, tokenizer, task, examples, config)
            done += len(examples)
            progress(done, total)
    return {"tasks": results, "average": _average(results)}


def _examples(task: Task, config: EvalConfig) -> list:
    examples = task.split(config.split, SplitConfig())
    if config.limit:
        examples = examples[: config.limit]
    if not examples:
        raise QuiverError(f"task {task.name!r} has no examples in its {config.split} split")
    return examples


def _multiple_choice(model, tokenizer, examples, config: EvalConfig) -> dict:
    hits, hits_norm = [0.0] * len(examples), [0.0] * len(examples)
    for batch in _choice_batches(examples, config.batch_size):
        scores = score_choices_batch(model, tokenizer, [examples[i] for i in batch])
        for i, score in zip(batch, scores, strict=True):
            hits[i] = float(score.prediction(normalise=False) == examples[i].answer)
            hits_norm[i] = float(score.prediction(normalise=True) == examples[i].answer)
    return {"accuracy": 100 * mean(hits), "accuracy_norm": 100 * mean(hits_norm),
            "examples": len(examples), "per_example": {"accuracy": hits}}


def _choice_batches(examples, batch_size: int, max_rows: int = 32) -> list[list[int]]:
    """Indices of examples in batches of similar prompt length (little padding), at most
    `batch_size` examples and `max_rows` options per batch (bounds the logits' memory)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    batches, current, rows = [], [], 0
    for i in order:
        n = len(examples[i].options)
        if current and (len(current) == batch_size or rows + n > max_rows):
            batches.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    return batches + [current] if current else batches


def _generative(model, tokenizer, task, examples, config: EvalConfig) -> dict:
    em, rouge, answers = [], [], []
    stop = task.metadata.get("stop_string")
    regex = task.metadata.get("output_regex")
    for start in range(0, len(examples), config.batch_size):
        batch = examples[start : start + config.batch_size]
        longest = max(len(tokenizer(r)["input_ids"])
                      for e in batch for r in (e.references or (e.target,)))
        new_tokens = min(config.max_new_tokens, longest + 8)
        for example, answer in zip(batch, generate_answers(model, tokenizer, batch, new_tokens,
                                                           stop, regex), strict=True):
            references = example.references or (example.target,)
            em.append(exact_match(answer, references))
            rouge.append(rouge_l(answer, references))
            answers.append(answer)
    return {"exact_match": 100 * mean(em), "rougeL": mean(rouge), "examples": len(examples),
            "per_example": {"exact_match": em, "rougeL": rouge}, "answers": answers}


def _average(results: dict) -> dict:
    metrics = ("accuracy", "accuracy_norm", "exact_match", "rougeL")
    average = {}
    for metric in metrics:
        values = [r[metric] for r in results.values() if metric in r]
        if values:
            average[metric] = mean(values)
    return average
