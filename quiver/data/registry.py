"""Resolve a task name to a `Task`, and list the tasks that are available.

Names: `gym:NAME[?KNOBS]` (reasoning-gym, the embedded suite), `bigbench:NAME[/SUB]` (where
BIG-bench's files are), `jsonl:PATH`, `hf:PATH[#TASK]`. A bare name is a reasoning-gym task
when it names a generator (`chain_sum` is `gym:chain_sum`), else a BIG-bench task
(`arithmetic/1_digit_addition` is `bigbench:arithmetic/1_digit_addition`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from quiver.data import bigbench, gym, hf, jsonl
from quiver.data.task import Task
from quiver.errors import QuiverError

_READERS = {gym.PREFIX: gym.load, bigbench.PREFIX: bigbench.load, jsonl.PREFIX: jsonl.load,
            hf.PREFIX: hf.load}


def load_task(name: str) -> Task:
    """Read a task by name.

    Raises:
        QuiverError: unknown task, or a task with no examples.
    """
    name = name.strip()
    if not any(name.startswith(prefix) for prefix in _READERS):
        is_gym = name.partition("?")[0] in gym.generator_names()
        name = (gym.PREFIX if is_gym else bigbench.PREFIX) + name
    prefix = next(p for p in _READERS if name.startswith(p))
    task = _READERS[prefix](name)
    if not task.examples:
        raise QuiverError(f"task {name!r} has no usable examples")
    return task


@dataclass
class TaskInfo:
    """One row of `quiver tasks ls`."""

    name: str
    kind: str
    examples: int
    description: str
    family: str = ""


def list_gym() -> list[TaskInfo]:
    """Every reasoning-gym generator at its default knobs, with its family (category).
    `examples` is the number generated (repeated questions, dropped on loading, count)."""
    return [TaskInfo(gym.PREFIX + name, "gen", gym.DEFAULT_SIZE, gym.description(name),
                     gym.family(name)) for name in gym.generator_names()]


def list_bigbench(cache_file: Path, progress=None) -> list[TaskInfo]:
    """Every BIG-bench task with its kind and size, from an index built once and cached.

    `progress`, if given, is called with (done, total) while the index is built.
    """
    if cache_file.exists():
        return [TaskInfo(**row) for row in json.loads(cache_file.read_text())]
    rows: dict[str, TaskInfo] = {}
    names = bigbench.task_names()
    # subtasks sort after their parent: read the leaves first, then sum them up for parents
    for done, name in enumerate(sorted(names, key=lambda n: -n.count("/")), start=1):
        subtasks = bigbench.subtask_names(name)
        if subtasks:
            parts = [rows[s] for s in subtasks]
            kind = "mc" if all(p.kind == "mc" for p in parts) else "gen"
            description = bigbench.load_description(name)
            rows[name] = TaskInfo(name, kind, sum(p.examples for p in parts), description)
        else:
            try:
                task = bigbench.load(name)
            except QuiverError:  # a folder with neither examples nor subtasks: nothing to list
                continue
            rows[name] = TaskInfo(name, task.kind, len(task.examples), task.description[:100])
        if progress:
            progress(done, len(names))
    rows = [rows[n] for n in names if n in rows]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    staging = cache_file.with_suffix(f".tmp{os.getpid()}")
    staging.write_text(json.dumps([asdict(r) for r in rows]))
    staging.replace(cache_file)
    return rows
