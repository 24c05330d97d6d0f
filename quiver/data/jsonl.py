"""JSONL tasks: one example per line, `{"prompt": ..., "target": ...}`.

Multiple-choice lines add `"options": [...]` and `"answer": index` (the target may then be
omitted). The task is named `jsonl:PATH`.
"""

from __future__ import annotations

import json
from pathlib import Path

from quiver.data.task import Example, Task
from quiver.errors import QuiverError

PREFIX = "jsonl:"


def load(name: str) -> Task:
    """Read `jsonl:PATH`.

    Raises:
        QuiverError: missing file, a line that is not JSON, or a line without prompt/target.
    """
    path = Path(name.removeprefix(PREFIX))
    if not path.is_file():
        raise QuiverError(f"unknown task {name!r}: no such file {path}")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                examples.append(_example(line, f"{path}:{number}"))
    kinds = {"mc" if e.options else "gen" for e in examples}
    if len(kinds) > 1:
        raise QuiverError(f"{path} mixes multiple-choice and generative examples")
    return Task(name=name, examples=examples, kind=kinds.pop() if kinds else "gen")


def _example(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
        prompt = str(row["prompt"])
        if "options" in row:
            options = tuple(str(o) for o in row["options"])
            answer = int(row["answer"])
            if not 0 <= answer < len(options):
                raise ValueError(f"answer {answer} is not an index into {len(options)} options")
            return Example(prompt, options[answer], options=options, answer=answer)
        target = str(row["target"])
        return Example(prompt, target, references=(target,))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise QuiverError(
            f"{where}: not a valid example ({err.__class__.__name__}: {err})"
        ) from err
