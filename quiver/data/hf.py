"""Hugging Face datasets in the Flan layout: columns `source`, `target`, `task_name`.

`hf:PATH#TASK` is the rows of one task name; `hf:PATH` is every row. PATH is a folder written
by `Dataset.save_to_disk` or a dataset id that `datasets.load_dataset` can reach.
"""

from __future__ import annotations

from pathlib import Path

from quiver.data.task import Example, Task
from quiver.errors import QuiverError

PREFIX = "hf:"
_COLUMNS = ("source", "target", "task_name")


def load(name: str) -> Task:
    """Read `hf:PATH#TASK` (or `hf:PATH` for all rows).

    Raises:
        QuiverError: the dataset cannot be opened or lacks the Flan columns.
    """
    path, _, task_name = name.removeprefix(PREFIX).partition("#")
    dataset = _open(path)
    if task_name:
        dataset = dataset.filter(lambda row: row["task_name"] == task_name)
    examples = [
        Example(str(s), str(t), references=(str(t),))
        for s, t in zip(dataset["source"], dataset["target"], strict=True)
    ]
    return Task(name=name, examples=examples, kind="gen")


def task_names(path: str) -> list[str]:
    """The `hf:PATH#TASK` names of every task in a Flan-layout dataset."""
    dataset = _open(path.removeprefix(PREFIX))
    return [f"{PREFIX}{path.removeprefix(PREFIX)}#{t}" for t in sorted(set(dataset["task_name"]))]


def _open(path: str):
    import datasets  # slow to import; only this reader needs it

    try:
        if Path(path).exists():
            dataset = datasets.load_from_disk(path)
        else:
            dataset = datasets.load_dataset(path, split="train")
    except Exception as err:  # datasets raises many types for "not there"
        raise QuiverError(f"cannot open dataset {path!r}: {err}") from err
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"]
    missing = [c for c in _COLUMNS if c not in dataset.column_names]
    if missing:
        raise QuiverError(f"dataset {path!r} lacks the Flan columns {missing}")
    return dataset
