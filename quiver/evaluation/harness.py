"""Evaluate a model on tasks: per-example scores, per-task metrics, and the average."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from quiver.data.task import Example, SplitConfig, Task
from quiver.errors import QuiverError
from quiver.evaluation.config import EvalConfig
from quiver.evaluation.metrics import exact_match, mean, rouge_l
from quiver.evaluation.scoring import generate_answers, score_choices_batch
from quiver.progress import counting_progress


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
    examples = task.split(config.split, SplitConfig())[config.skip :]
    if config.limit:
        examples = examples[: config.limit]
    if not examples:
        skipped = f" after skipping {config.skip}" if config.skip else ""
        raise QuiverError(f"task {task.name!r} has no examples in its {config.split} "
                          f"split{skipped}")
    return examples


def _multiple_choice(model, tokenizer, examples, config: EvalConfig) -> dict:
    scores = [None] * len(examples)
    for batch in _choice_batches(examples, config.batch_size):
        for i, score in zip(batch, score_choices_batch(model, tokenizer,
                                                       [examples[i] for i in batch]),
                            strict=True):
            scores[i] = score
    answers = [e.answer for e in examples]
    predictions = {
        "accuracy": [s.prediction(normalise=False) for s in scores],
        "accuracy_norm": [s.prediction(normalise=True) for s in scores],
        "accuracy_char_norm": [s.prediction_per_char(e.options)
                               for s, e in zip(scores, examples, strict=True)],
    }
    if config.calibrate:
        content_free = content_free_scores(model, tokenizer, examples, config.batch_size)
        predictions["accuracy_calibrated"] = [
            s.prediction_calibrated(free) for s, free in zip(scores, content_free, strict=True)]
    per_example = {metric: [float(p == a) for p, a in zip(chosen, answers, strict=True)]
                   for metric, chosen in predictions.items()}
    result = {metric: 100 * mean(hits) for metric, hits in per_example.items()}
    result.update(examples=len(examples), per_example=per_example,
                  prediction_share=option_shares(examples, predictions["accuracy"]),
                  answer_share=option_shares(examples, answers))
    per_example.update(prediction=predictions["accuracy"], answer=answers,
                       chance=[1 / len(e.options) for e in examples])
    return result


def option_shares(examples: list, chosen: list[int], max_labels: int = 10) -> dict[str, float]:
    """Share (%) of `chosen` options by label: the option's text where the task has at most
    `max_labels` distinct options (True / False / Neither), else its position ("#0", "#1",
    ...). Shows a prior over answers that a method adds or removes."""
    texts = {o for e in examples for o in e.options}
    counts = Counter(e.options[c] if len(texts) <= max_labels else f"#{c}"
                     for e, c in zip(examples, chosen, strict=True))
    return {label: 100 * n / len(chosen) for label, n in sorted(counts.items())}


def content_free_scores(model, tokenizer, examples: list, batch_size: int) -> list[list[float]]:
    """Each example's options scored after a content-free prompt: "N/A" and the prompt's last
    line (the answer cue, e.g. "A: "), as Zhao et al. (2021, "Calibrate Before Use") replace
    the input by "N/A". Examples with the same cue and options share one scoring."""
    keys = [(content_free_prompt(e.prompt), e.options) for e in examples]
    distinct = list(dict.fromkeys(keys))
    probes = [Example(prompt, options[0], options=options, answer=0)
              for prompt, options in distinct]
    found: dict = {}
    for batch in _choice_batches(probes, batch_size):
        for i, score in zip(batch, score_choices_batch(model, tokenizer,
                                                       [probes[i] for i in batch]),
                            strict=True):
            found[distinct[i]] = score.log_probs
    return [found[key] for key in keys]


def content_free_prompt(prompt: str) -> str:
    """"N/A" followed by the prompt's last line: for BIG-bench's "...\nA: " that is "N/A\nA: "."""
    cue = prompt[prompt.rfind("\n") :] if "\n" in prompt else ""
    return "N/A" + cue


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
    """Greedy answers scored by exact match, Rouge-L and the task's own scorer where it has
    one (`score`, 0-100), and each target's log-likelihood given the prompt (`answer_loglik`:
    nats per target token, teacher-forced), which separates methods where answers are rarely
    exactly right."""
    em, rouge, answers = [], [], []
    stop = task.metadata.get("stop_string")
    regex = task.metadata.get("output_regex")
    new_tokens = generation_budget(tokenizer, examples, config.max_new_tokens)
    for start in range(0, len(examples), config.batch_size):
        batch = examples[start : start + config.batch_size]
        for example, answer in zip(batch, generate_answers(model, tokenizer, batch, new_tokens,
                                                           stop, regex), strict=True):
            references = example.references or (example.target,)
            em.append(exact_match(answer, references))
            rouge.append(rouge_l(answer, references))
            answers.append(answer)
    per_example = {"exact_match": em, "rougeL": rouge,
                   "answer_loglik": answer_log_likelihoods(model, tokenizer, examples,
                                                           config.batch_size)}
    if task.score_answer is not None:
        per_example["score"] = [task.score_answer(a, e)
                                for a, e in zip(answers, examples, strict=True)]
    result = {"exact_match": 100 * mean(em), "rougeL": mean(rouge),
              "answer_loglik": mean(per_example["answer_loglik"])}
    if "score" in per_example:
        result["score"] = 100 * mean(per_example["score"])
    return {**result, "examples": len(examples), "per_example": per_example,
            "answers": answers}


def generation_budget(tokenizer, examples, max_new_tokens: int) -> int:
    """New tokens to generate for these examples: their longest reference and 8 more, at most
    `max_new_tokens` (one budget for the task, so batching never changes an answer)."""
    longest = max(len(tokenizer(r)["input_ids"])
                  for e in examples for r in (e.references or (e.target,)))
    return min(max_new_tokens, longest + 8)


def answer_log_likelihoods(model, tokenizer, examples, batch_size: int) -> list[float]:
    """Per example, the mean log-probability per token of its target given its prompt."""
    probes = [Example(e.prompt, e.target, options=(e.target,), answer=0) for e in examples]
    values = []
    for start in range(0, len(probes), batch_size):
        for score in score_choices_batch(model, tokenizer, probes[start : start + batch_size]):
            values.append(score.log_probs[0] / max(1, score.n_tokens[0]))
    return values


def _average(results: dict) -> dict:
    metrics = ("accuracy", "accuracy_norm", "accuracy_char_norm", "accuracy_calibrated",
               "score", "exact_match", "rougeL", "answer_loglik")
    average = {}
    for metric in metrics:
        values = [r[metric] for r in results.values() if metric in r]
        if values:
            average[metric] = mean(values)
    return average
