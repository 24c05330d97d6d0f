"""quiver's multiple-choice tasks as lm-evaluation-harness task configs, for offline runs.

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
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

from quiver.data import load_task
from quiver.data.batching import split_trailing_space
from quiver.data.task import Task
from quiver.errors import QuiverError

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
) -> list[WrittenTask]:
    """Write lm-eval task configs (YAML) and their documents (JSONL) for quiver tasks.

    Args:
        folder: where to write (created); pass it to lm-eval's `--include_path`.
        task_names: quiver task names of multiple-choice tasks (`gym:...?mc=true`,
            `bigbench:...`, `jsonl:...`, `hf:...`); default: `GYM_MC_TASKS`.
        limit: examples per task, at most (0: all), the first of quiver's seeded order.
        group: the name of the group config that runs every written task.

    Raises:
        QuiverError: an unknown task, a generative task, or a repeated name.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    names = list(task_names) if task_names else GYM_MC_TASKS
    if len(set(names)) != len(names):
        raise QuiverError(f"a task is named twice: {names}")
    if limit < 0:
        raise QuiverError("limit must be >= 0")
    tasks = [load_task(n) for n in names]  # every error before anything is written
    generative = [t.name for t in tasks if t.kind != "mc"]
    if generative:
        raise QuiverError(f"only multiple-choice tasks can be written for lm-eval; "
                          f"{generative} are generative (score them with quiver eval)")
    written = [_write_task(folder, task, limit) for task in tasks]
    _write_yaml(folder / f"{group}.yaml", {
        "group": group,
        "task": [w.name for w in written],
        # quiver's `average`: the plain mean over tasks, not weighted by their sizes
        "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": False}
                                  for m in ("acc", "acc_norm")],
        "metadata": {"version": CONFIG_VERSION},
    })
    return written


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


def _write_yaml(path: Path, data: dict) -> None:
    """YAML without a YAML writer: block mappings and lists, every scalar in JSON's syntax
    (a JSON string, number or boolean is a YAML one too)."""
    path.write_text("\n".join(_yaml_lines(data, 0)) + "\n", encoding="utf-8")


def _yaml_lines(value, indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:")
                lines.extend(_yaml_lines(item, indent + 2))
            else:
                lines.append(f"{pad}{key}: {json.dumps(item, ensure_ascii=False)}")
    else:
        for item in value:
            if isinstance(item, dict):
                nested = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {json.dumps(item, ensure_ascii=False)}")
    return lines
