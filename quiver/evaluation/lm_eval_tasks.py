"""quiver's tasks as lm-evaluation-harness task configs, for offline runs.

lm-eval's own BIG-bench tasks download their data from the Hugging Face hub. This writes, for
each task, a JSONL file of its examples (formatted by quiver's reader: the same prompt and
choice order as `quiver eval`) and a YAML config that reads it as lm-eval's local `json`
dataset, plus a group config over them all; `lm_eval --include_path FOLDER --tasks NAME` then
runs them with no network.

The examples are written in the order of `Task.split("all")` (the task's seeded shuffle), so
lm-eval's `--limit N` scores exactly the examples of `quiver eval --split all --limit N`.

Each document is `{"context", "choices", "answer"}`: the prompt without its trailing
whitespace, the options, the index of the right one; the trailing whitespace (BIG-bench's
"A: " leaves one space) is the config's `target_delimiter`, which lm-eval puts before each
option, as its own tasks do. The log-likelihood of each option is then that of `quiver eval`;
lm-eval's `acc` is quiver's `accuracy`. Its `acc_norm` divides by the option's length in
characters without that delimiter, as quiver's `accuracy_char_norm` does
(`quiver.evaluation.scoring.ChoiceScores.prediction_per_char`).

A generative task with a scorer of its own (reasoning-gym's `score_answer`) is written as a
`generate_until` task: documents `{"context", "target", "quiver_task", "index"}`, greedy
generation to EOS within `quiver eval`'s budget, and `process_results` (a small module written
beside the configs) that cuts the answer as `quiver eval` does and scores it with the task's
scorer (`score`) and exact match: lm-eval's `score` is then `quiver eval`'s `score` / 100.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from quiver.data import load_task
from quiver.data.batching import split_trailing_space
from quiver.data.task import Task
from quiver.errors import QuiverError
from quiver.evaluation.harness import generation_budget
from quiver.evaluation.metrics import exact_match
from quiver.evaluation.scoring import postprocess

GROUP = "quiver_tasks"
TASK_PREFIX = "quiver_"
CONFIG_VERSION = 1


@dataclass(frozen=True)
class WrittenTask:
    """One task written for lm-eval: its lm-eval name, its quiver name, where, how many."""

    name: str
    quiver_name: str
    config: Path
    data: Path
    examples: int
    metrics: tuple[str, ...] = ("acc", "acc_norm")


def lm_eval_name(task_name: str) -> str:
    """The lm-eval task name of a quiver task: `bigbench:emoji_movie` ->
    `quiver_bigbench_emoji_movie`, a subtask's `/` -> `.`."""
    name = task_name.replace(":", "_", 1).replace("/", ".")
    return TASK_PREFIX + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# reasoning-gym generators whose answers are a closed set, scored as multiple choice
# (`mc=true`): the default tasks, which need nothing beyond the registry.
GYM_MC_TASKS = ["gym:syllogism?mc=true", "gym:ransom_note?mc=true",
                "gym:course_schedule?mc=true", "gym:isomorphic_strings?mc=true",
                "gym:circuit_logic?mc=true", "gym:mahjong_puzzle?mc=true"]


def bigbench_lite_mc_tasks() -> list[str]:
    """The multiple-choice tasks of BIG-bench Lite (bigbench_lite_v1, as BIG-bench's
    `bbseqio/bigbench_lite.py` lists it), as quiver task names; needs BIG-bench's files."""
    from quiver.data.bigbench import tasks_root

    source = (tasks_root().parent / "bbseqio" / "bigbench_lite.py").read_text()
    tree = ast.parse(source)
    names = next(ast.literal_eval(node.value)["bigbench_lite_v1"] for node in tree.body
                 if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", "") == "BIGBENCH_LITE_TASK_NAMES")
    return [f"bigbench:{n}" for n in names if load_task(f"bigbench:{n}").kind == "mc"]


def write_task_configs(
    folder: str | Path,
    task_names: list[str] | None = None,
    limit: int = 0,
    group: str = GROUP,
    tokenizer=None,
    max_new_tokens: int = 32,
) -> list[WrittenTask]:
    """Write lm-eval task configs (YAML) and their documents (JSONL) for quiver tasks.

    Args:
        folder: where to write (created); pass it to lm-eval's `--include_path`.
        task_names: quiver task names: multiple-choice tasks (`gym:...?mc=true`,
            `bigbench:...`, `jsonl:...`, `hf:...`) and generative tasks with a scorer of
            their own (`gym:...`); default: `GYM_MC_TASKS`.
        limit: examples per task, at most (0: all), the first of quiver's seeded order.
        group: the name of the group config that runs every written task.
        tokenizer, max_new_tokens: for generative tasks, the generation budget of `quiver
            eval` (`harness.generation_budget`) over the written examples.

    Raises:
        QuiverError: an unknown task, a generative task without a scorer (or without a
            tokenizer), or a repeated name.
    """
    folder = Path(folder).resolve()
    names = list(task_names) if task_names else GYM_MC_TASKS
    if len(set(names)) != len(names):
        raise QuiverError(f"a task is named twice: {names}")
    if limit < 0:
        raise QuiverError("limit must be >= 0")
    tasks = [load_task(n) for n in names]  # every error before anything is written
    unscored = [t.name for t in tasks if t.kind != "mc" and t.score_answer is None]
    if unscored:
        raise QuiverError(f"only multiple-choice tasks and generative tasks with their own "
                          f"scorer (gym:) can be written for lm-eval; {unscored} are generative "
                          "without one (score them with quiver eval)")
    if tokenizer is None and any(t.kind != "mc" for t in tasks):
        raise QuiverError("generative tasks need the model's tokenizer for their generation "
                          "budget")
    folder.mkdir(parents=True, exist_ok=True)
    if any(t.kind != "mc" for t in tasks):  # the process_results the generative configs name
        (folder / f"{SCORER_MODULE}.py").write_text(SCORER_SOURCE, encoding="utf-8")
    written = [_write_task(folder, task, limit) if task.kind == "mc" else
               _write_generative_task(folder, task, limit, tokenizer, max_new_tokens)
               for task in tasks]
    metrics = [m for m in ("acc", "acc_norm", "score", "exact_match")
               if all(m in w.metrics for w in written)]
    _write_yaml(folder / f"{group}.yaml", {
        "group": group,
        "task": [w.name for w in written],
        # quiver's `average`: the plain mean over tasks, not weighted by their sizes
        "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": False}
                                  for m in metrics],
        "metadata": {"version": CONFIG_VERSION},
    })
    return written


def process_generated(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's `process_results` for a generative gym task written here: the answer
    post-processed as `quiver eval` does, scored by the task's own scorer (`score`, 0-1)
    and by exact match against its references."""
    task, examples = _task_examples(doc["quiver_task"])
    example = examples[doc["index"]]
    answer = postprocess(results[0], task.metadata.get("stop_string"),
                         task.metadata.get("output_regex"))
    return {"score": float(task.score_answer(answer, example)),
            "exact_match": exact_match(answer, example.references or (example.target,))}


@cache
def _task_examples(name: str) -> tuple[Task, list]:
    task = load_task(name)
    return task, task.split("all")


def _write_task(folder: Path, task: Task, limit: int) -> WrittenTask:
    examples = task.split("all")
    if limit:
        examples = examples[:limit]
    name = lm_eval_name(task.name)
    docs, delimiters = [], set()
    for example in examples:
        context, _ = split_trailing_space(example.prompt, "")
        delimiters.add(example.prompt[len(context) :])
        docs.append({"context": context, "choices": list(example.options),
                     "answer": example.answer})
    if len(delimiters) == 1:
        delimiter = delimiters.pop()
    else:  # prompts end differently: keep each prompt whole (lm-eval moves its trailing space)
        delimiter = ""
        for doc, example in zip(docs, examples, strict=True):
            doc["context"] = example.prompt
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                    encoding="utf-8")
    config = folder / f"{name}.yaml"
    _write_yaml(config, {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": delimiter,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("acc", "acc_norm")],
        "metadata": {"version": CONFIG_VERSION, "quiver_task": task.name,
                     "examples": len(docs),
                     "order": "quiver Task.split('all'): the task's seeded shuffle"},
    })
    return WrittenTask(name, task.name, config, data, len(docs))


def _write_generative_task(folder: Path, task: Task, limit: int, tokenizer,
                           max_new_tokens: int) -> WrittenTask:
    examples = task.split("all")
    if limit:
        examples = examples[:limit]
    name = lm_eval_name(task.name)
    docs = [{"context": split_trailing_space(e.prompt, "")[0], "target": e.target.strip(),
             "quiver_task": task.name, "index": i} for i, e in enumerate(examples)]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                    encoding="utf-8")
    config = folder / f"{name}.yaml"
    budget = generation_budget(tokenizer, examples, max_new_tokens)
    _write_yaml(config, {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "context",
        "doc_to_target": "target",
        "target_delimiter": "",
        # no stop string: generation ends at EOS or the budget, then `process_generated`
        # cuts the answer as quiver eval does (its stop string and regex)
        "generation_kwargs": {"until": [], "max_gen_toks": budget, "do_sample": False},
        "process_results": _Tagged(f"!function {SCORER_MODULE}.process_results"),
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("score", "exact_match")],
        "metadata": {"version": CONFIG_VERSION, "quiver_task": task.name,
                     "examples": len(docs), "family": task.metadata.get("family", ""),
                     "order": "quiver Task.split('all'): the task's seeded shuffle"},
    })
    return WrittenTask(name, task.name, config, data, len(docs), ("score", "exact_match"))


SCORER_MODULE = "quiver_scorer"
SCORER_SOURCE = '''"""Written by `quiver lm-eval-tasks`: lm-eval's process_results for quiver's
generative tasks, which scores each answer with the task's own scorer (reasoning-gym's)."""

from quiver.evaluation.lm_eval_tasks import process_generated as process_results  # noqa: F401
'''


class _Tagged(str):
    """A YAML value written as is, unquoted (a tag such as `!function module.name`)."""


def _write_yaml(path: Path, data: dict) -> None:
    """YAML without a YAML writer: block mappings and lists, every scalar in JSON's syntax
    (a JSON string, number or boolean is a YAML one too), tags as they are."""
    path.write_text("\n".join(_yaml_lines(data, 0)) + "\n", encoding="utf-8")


def _scalar(value) -> str:
    return str(value) if isinstance(value, _Tagged) else json.dumps(value, ensure_ascii=False)


def _yaml_lines(value, indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:")
                lines.extend(_yaml_lines(item, indent + 2))
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    else:
        for item in value:
            if isinstance(item, dict):
                nested = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    return lines
