"""Resolve a task name to a `Task`, and list the tasks that are available.

Names: `bigbench:NAME[/SUB]`, `jsonl:PATH`, `hf:PATH[#TASK]`. A bare name is tried as a
BIG-bench task, so `arithmetic` means `bigbench:arithmetic`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from quiver.data import bigbench, hf, jsonl
from quiver.data.task import Task
from quiver.errors import QuiverError

_READERS = {bigbench.PREFIX: bigbench.load, jsonl.PREFIX: jsonl.load, hf.PREFIX: hf.load}


def load_task(name: str) -> Task:
    """Read a task by name.

    Raises:
        QuiverError: unknown task, or a task with no examples.
    """
    name = name.strip()
    if not any(name.startswith(prefix) for prefix in _READERS):
        name = bigbench.PREFIX + name
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
            task = bigbench.load(name)
            rows[name] = TaskInfo(name, task.kind, len(task.examples), task.description[:100])
        if progress:
            progress(done, len(names))
    rows = [rows[n] for n in names]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    staging = cache_file.with_suffix(f".tmp{os.getpid()}")
    staging.write_text(json.dumps([asdict(r) for r in rows]))
    staging.replace(cache_file)
    return rows
