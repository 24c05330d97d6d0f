"""BIG-bench JSON tasks, read straight from BIG-bench's task files (no TensorFlow).

Optional: the registry no longer serves a `bigbench` with task files, so they come from
BIG-bench's GitHub repository (see `tasks_root`); nothing else in quiver needs them.

A task is `bigbench:NAME`; a subtask is `bigbench:PARENT/SUB`; a parent with subtasks is the
union of its subtasks. Prompts are formatted as BIG-bench's own `default_format_fn` does:

    task_prefix + input_prefix + input [+ choice_prefix + choice ...] + output_prefix

with its defaults ("\\nQ: ", "\\nA: ", "\\n  choice: ") and its choice order (a permutation of
the sorted choices drawn from `numpy.random.RandomState(42)`, as BIG-bench's JsonTask does).
Duplicate examples are dropped, as BIG-bench does.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import cache
from pathlib import Path

import numpy as np

from quiver.data.task import Example, Task
from quiver.errors import QuiverError

PREFIX = "bigbench:"
_BIGBENCH_SEED = 42  # JsonTask's default random_seed


ENV_DIR = "QUIVER_BIGBENCH_DIR"
HOW_TO_GET = (
    "BIG-bench's task files are not here (the registry's bigbench 0.0.1 has none): install "
    "them with `pip install --no-deps 'bigbench @ git+https://github.com/google/BIG-bench.git'`"
    f" or point {ENV_DIR} (or `quiver --bigbench-dir`) at a checkout's bigbench/ folder"
)


def tasks_root() -> Path:
    """The folder holding BIG-bench's task folders (`benchmark_tasks`).

    Looked for, in order: the folder named by $QUIVER_BIGBENCH_DIR (BIG-bench's `bigbench/`
    folder, or its `benchmark_tasks` itself), then an installed `bigbench` package that
    carries its task files.

    Raises:
        QuiverError: neither holds task files; the message says how to get them.
    """
    candidates = []
    if os.environ.get(ENV_DIR):
        folder = Path(os.environ[ENV_DIR]).expanduser()
        candidates += [folder / "benchmark_tasks", folder]
    spec = importlib.util.find_spec("bigbench")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "benchmark_tasks")
    for folder in candidates:
        if next(folder.glob("*/task.json"), None) is not None:
            return folder
    raise QuiverError(HOW_TO_GET)


def task_names() -> list[str]:
    """Every JSON task and subtask, as `bigbench:...` names, sorted."""
    root = tasks_root()
    names = []
    for path in sorted(root.glob("**/task.json")):
        relative = path.parent.relative_to(root).as_posix()
        names.append(PREFIX + relative)
    return names


def subtask_names(name: str) -> list[str]:
    """The subtasks of a parent task (empty for a task with its own examples)."""
    folder = tasks_root() / name.removeprefix(PREFIX)
    if "examples" in _read_json(folder / "task.json"):
        return []
    return [PREFIX + p.parent.relative_to(tasks_root()).as_posix()
            for p in sorted(folder.glob("*/task.json"))]


def load_description(name: str) -> str:
    """The first 100 characters of a task's description."""
    data = _read_json(tasks_root() / name.removeprefix(PREFIX) / "task.json")
    return str(data.get("description", ""))[:100]


def load(name: str) -> Task:
    """Read `bigbench:NAME` or `bigbench:PARENT/SUB`.

    Raises:
        QuiverError: no such task, or a task with neither examples nor subtasks.
    """
    relative = name.removeprefix(PREFIX)
    folder = tasks_root() / relative
    if not relative or ".." in relative.split("/") or not (folder / "task.json").is_file():
        raise QuiverError(f"unknown BIG-bench task {name!r} (see `quiver tasks ls`)")
    data = _read_json(folder / "task.json")
    if "examples" in data:
        examples, kind = _examples(data)
    else:
        subfolders = sorted(p.parent for p in folder.glob("*/task.json"))
        if not subfolders:
            raise QuiverError(f"BIG-bench task {name!r} has neither examples nor subtasks")
        examples, kinds = [], set()
        for sub in subfolders:
            sub_examples, sub_kind = _examples(_read_json(sub / "task.json"))
            examples.extend(sub_examples)
            kinds.add(sub_kind)
        kind = "mc" if kinds == {"mc"} else "gen"
        if kind == "gen":  # a mixed parent: generate on every example
            examples = [
                Example(e.prompt, e.target, references=e.references or (e.target,))
                for e in examples
            ]
    return Task(
        name=PREFIX + relative,
        examples=examples,
        kind=kind,
        description=str(data.get("description", "")),
        metadata={
            "keywords": data.get("keywords", []),
            "metrics": data.get("metrics", []),
            "stop_string": data.get("stop_string"),
            # BIG-bench's default when a task sets neither (json_task._DEFAULT_REGEX)
            "output_regex": data.get("output_regex",
                                     None if "stop_string" in data else r"[^\.\?\!\;\n]+"),
        },
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise QuiverError(f"cannot read BIG-bench file {path}: {err}") from err


def _examples(data: dict) -> tuple[list[Example], str]:
    """Format a task.json's examples; the kind is "mc" when every example has target_scores."""
    raw = _distinct(data.get("examples", []))
    is_mc = bool(raw) and all("target_scores" in x for x in raw)
    task_prefix = str(data.get("task_prefix", ""))
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    append_choices = data.get("append_choices_to_input", True)
    examples = []
    for x in raw:
        text = str(x["input"])
        if is_mc:
            scores = x["target_scores"]
            options = tuple(str(k) for k in scores)
            best = max(scores.values())
            if len(scores) < 2 or best <= min(scores.values()):
                continue  # BIG-bench rejects these: no option is better than another
            if append_choices:
                ordered = sorted(options)
                shuffled = [ordered[i] for i in _choice_order(len(ordered))]
                text = text + choice_prefix + choice_prefix.join(shuffled)
            answer = next(i for i, k in enumerate(scores) if scores[k] == best)
            prompt = task_prefix + input_prefix + text + output_prefix
            examples.append(Example(prompt, options[answer], options=options, answer=answer))
        elif "target" in x:
            targets = x["target"] if isinstance(x["target"], list) else [x["target"]]
            targets = tuple(str(t) for t in targets)
            if not targets:
                continue
            prompt = task_prefix + input_prefix + text + output_prefix
            examples.append(Example(prompt, targets[0], references=targets))
    return examples, ("mc" if is_mc else "gen")


@cache
def _choice_order(n: int) -> tuple[int, ...]:
    # BIG-bench re-seeds a RandomState(42) for every example, so the order depends only on n.
    return tuple(np.random.RandomState(_BIGBENCH_SEED).permutation(n).tolist())


def _distinct(raw: list[dict]) -> list[dict]:
    seen, distinct = set(), []
    for x in raw:
        key = json.dumps(x, sort_keys=False)
        if key not in seen:
            seen.add(key)
            distinct.append(x)
    return distinct
