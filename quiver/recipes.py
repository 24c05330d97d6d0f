"""Recipes: workflows that read top to bottom and call the building blocks.

The CLI calls these; they know nothing about the command line.
"""

from __future__ import annotations

from quiver.data import TaskInfo, list_bigbench, load_task
from quiver.data import hf as hf_reader
from quiver.errors import QuiverError
from quiver.library import Expert, Library
from quiver.models import cache_dir, fingerprint, linear_module_shapes, load_base
from quiver.training import TrainConfig, TrainResult, train_expert


def train_into_library(
    task_names: list[str],
    library_url: str,
    name: str,
    base: str,
    config: TrainConfig,
    overwrite: bool = False,
    show_progress: bool = True,
    model_and_tokenizer=None,
    dtype: str = "auto",
) -> tuple[Expert, TrainResult]:
    """Train an expert on `task_names` and add it to the library at `library_url`.

    Everything that can be checked is checked before training starts: the tasks exist and
    have examples, the name is free, the library is for this base model. An interrupted run
    resumes from its saved state when the same command is run again.

    Raises:
        QuiverError: unknown or empty task, a taken name, or a library for another base.
    """
    tasks = [load_task(t) for t in task_names]
    try:
        existing = Library(library_url)
    except QuiverError:
        existing = None  # created below, once the base model has loaded
    if existing is not None and name in existing and not overwrite:
        raise QuiverError(f"an expert named {name!r} already exists in {library_url}")
    model, tokenizer = model_and_tokenizer or load_base(base, dtype=dtype)
    library = existing or Library(library_url, create=True)
    library.ensure_base(base, fingerprint(model), linear_module_shapes(model))
    expert, result = train_expert(model, tokenizer, tasks, name, config,
                                  run_state=library.run_state(name), show_progress=show_progress)
    return library.add(expert, overwrite=overwrite), result


def available_tasks(
    source: str = "bigbench",
    kind: str | None = None,
    min_examples: int = 0,
    contains: str | None = None,
) -> list[TaskInfo]:
    """Tasks of a source (`bigbench` or `hf:PATH`), filtered.

    Raises:
        QuiverError: an unknown source or kind.
    """
    if kind not in (None, "mc", "gen"):
        raise QuiverError(f"unknown kind {kind!r}: use mc or gen")
    if source == "bigbench":
        from quiver.progress import counting_progress

        index = cache_dir() / "bigbench-index-v1.json"
        with counting_progress("indexing BIG-bench (once)", enabled=not index.exists()) as bar:
            rows = list_bigbench(index, progress=bar)
    elif source.startswith(hf_reader.PREFIX):
        rows = []
        for name in hf_reader.task_names(source):
            task = load_task(name)
            rows.append(TaskInfo(name, task.kind, len(task.examples), ""))
    else:
        raise QuiverError(f"unknown task source {source!r}: use bigbench or hf:PATH")
    return [
        r for r in rows
        if (kind is None or r.kind == kind)
        and r.examples >= min_examples
        and (contains is None or contains in r.name)
    ]
