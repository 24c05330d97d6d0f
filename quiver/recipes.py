"""Recipes: workflows that read top to bottom and call the building blocks (listing tasks,
evaluating a method, clustering a library, the transfer matrix).

The CLI calls these; they know nothing about the command line. Training into a library is
`quiver.build.train_into_library`: building libraries is its own level, below this one.
"""

from __future__ import annotations

import hashlib

from quiver.data import TaskInfo, list_bigbench, list_gym, load_task
from quiver.data import hf as hf_reader
from quiver.errors import QuiverError
from quiver.library import Library
from quiver.library.expert import require_lora
from quiver.models import cache_dir, load_base


def available_tasks(
    source: str = "gym",
    kind: str | None = None,
    min_examples: int = 0,
    contains: str | None = None,
) -> list[TaskInfo]:
    """Tasks of a source (`gym`, `bigbench` or `hf:PATH`), filtered.

    Raises:
        QuiverError: an unknown source or kind.
    """
    if kind not in (None, "mc", "gen"):
        raise QuiverError(f"unknown kind {kind!r}: use mc or gen")
    if source == "gym":
        rows = list_gym()
    elif source == "bigbench":
        from quiver.data.bigbench import tasks_root
        from quiver.progress import counting_progress

        root = tasks_root()  # an index per copy of BIG-bench: another copy holds other tasks
        copy = f"{root.resolve()}:{root.stat().st_mtime_ns}"
        index = cache_dir() / f"bigbench-index-v2-{_short_hash(copy)}.json"
        with counting_progress("indexing BIG-bench (once)", enabled=not index.exists()) as bar:
            rows = list_bigbench(index, progress=bar)
    elif source.startswith(hf_reader.PREFIX):
        rows = []
        for name in hf_reader.task_names(source):
            task = load_task(name)
            rows.append(TaskInfo(name, task.kind, len(task.examples), ""))
    else:
        raise QuiverError(f"unknown task source {source!r}: use gym, bigbench or hf:PATH")
    return [
        r for r in rows
        if (kind is None or r.kind == kind)
        and r.examples >= min_examples
        and (contains is None or contains in r.name or contains == r.family)
    ]


def describe_task(name: str) -> dict:
    """What `quiver tasks show` prints: name, family, kind, description, knobs (gym), the
    size of each split and the first training example."""
    from quiver.data.task import SplitConfig

    task = load_task(name)
    splits = {part: len(task.split(part, SplitConfig())) for part in ("train", "valid", "test")}
    first = task.split("train")[0] if splits["train"] else task.examples[0]
    info = {"name": task.name, "family": task.metadata.get("family", ""), "kind": task.kind,
            "description": task.description[:200], "examples": len(task.examples),
            "splits": splits, "scorer": "the source's own" if task.score_answer else
            ("accuracy" if task.kind == "mc" else "exact match, Rouge-L"),
            "first_example": {"prompt": first.prompt, "target": first.target}}
    if "config" in task.metadata:
        info["knobs"] = task.metadata["config"]
    if first.options:
        info["first_example"]["options"] = list(first.options)
    return info


EVAL_METHODS = ("base", "arrow", "spectr", "uniform", "centroid", "phatgoose", "oracle",
                "expert:NAME")


def evaluate_method(
    method: str,
    task_names: list[str],
    library_url: str | None = None,
    base: str = "smollm2-135m",
    config=None,
    allow_seen: bool = False,
    top_k: int | None = None,
    temperature: float = 1.0,
    experts: list[str] | None = None,
    show_progress: bool = True,
    model_and_tokenizer=None,
    routing_plot=None,
    gate_steps: int = 100,
    general: list[str] | None = None,
    dtype: str = "auto",
) -> dict:
    """Evaluate a base model, one expert, or a routed library on tasks; returns the report.

    `expert:NAME` of a multi-task entry (Poly/MHR, MTL-LoRA) scores each task with that
    task's own row (Poly/MHR's routing logits; MTL-LoRA's L_t and mix of up-projections):
    only its training tasks can be scored (on their held-out test split; `all`, which holds
    their training examples, only with `allow_seen`).

    With `routing_plot` (a path), routed methods also record how often each expert was
    chosen at each layer, save that as a heatmap, and add the counts to the report.

    Zero-shot by default: a task any used expert was trained on is refused unless
    `allow_seen` (the oracle, which routes each task to its own expert, implies it).

    Raises:
        QuiverError: unknown method, task or expert; a seen task; a library for another base.
    """
    from quiver.evaluation import EvalConfig, evaluate
    from quiver.zero_shot import reuse, routing_context

    config = config or EvalConfig()
    tasks = [load_task(t) for t in task_names]
    if method != "base" and library_url is None:
        raise QuiverError(f"method {method!r} needs a library (--library)")
    library = Library(library_url) if library_url else None
    names = _experts_for(method, library, experts)
    if general and experts is None:  # the general experts are subtracted, not routed
        names = [n for n in names if n not in set(general)]
    multitask = _multitask_entry(method, library)
    if multitask is not None:
        _check_routing_rows(multitask, [t.name for t in tasks], config.split, allow_seen,
                            routing_plot)
    elif method != "oracle" and not allow_seen:
        _check_zero_shot(library, names + list(general or []), [t.name for t in tasks])
    model, tokenizer = model_and_tokenizer or load_base(base, dtype=dtype)
    before_task, adapter = None, None
    if multitask is not None:
        from quiver.adapters import load_adapter
        from quiver.zero_shot import check_same_base

        check_same_base(model, library, names)
        adapter = load_adapter(model, multitask)
        before_task = lambda task: adapter.set_task(task.name)  # noqa: E731
    elif method.startswith("expert:"):
        reuse(model, library, method="uniform", experts=names)
    elif method != "base":
        reuse(model, library, method=method, experts=names, top_k=top_k,
              temperature=temperature, tokenizer=tokenizer, gate_steps=gate_steps,
              general=general)
    if method == "oracle":
        context = routing_context(model)
        before_task = lambda task: _route_to_own_expert(context, library, task)  # noqa: E731
    try:
        if routing_plot and method != "base":
            from quiver.report import routing_heatmap
            from quiver.zero_shot import recording_routing

            with recording_routing(model) as counts:
                report = evaluate(model, tokenizer, tasks, config, before_task, show_progress)
            routing_heatmap(counts, names, routing_plot, f"{method} routing choices per layer")
            report["routing"] = {layer: c.tolist() for layer, c in counts.items()}
        else:
            report = evaluate(model, tokenizer, tasks, config, before_task, show_progress)
    finally:
        if adapter is not None:
            adapter.remove()
        elif method != "base":
            from quiver.routing import detach_experts

            detach_experts(model)
    report.update(
        method=method,
        settings={"top_k": top_k, "temperature": temperature, "split": config.split,
                  "gate_steps": gate_steps if method == "phatgoose" else None,
                  "general_experts": list(general or []),
                  "limit": config.limit, "allow_seen": allow_seen},
        experts=names,
        model=base,
        library=library_url,
    )
    return report


def _experts_for(method: str, library: Library | None, experts: list[str] | None) -> list[str]:
    if method == "base":
        return []
    if method.startswith("expert:"):
        name = method.split(":", 1)[1]
        library.get(name)  # a clear error if it is not there
        return [name]
    if method not in EVAL_METHODS:
        raise QuiverError(f"unknown method {method!r}: use one of {', '.join(EVAL_METHODS)}")
    return library.names() if experts is None else list(experts)


def _multitask_entry(method: str, library: Library | None):
    """The expert of `expert:NAME` when it is a multi-task adapter (Poly/MHR, MTL-LoRA),
    else None."""
    if not method.startswith("expert:"):
        return None
    expert = library.get(method.split(":", 1)[1])
    return expert if expert.info.kind != "lora" else None


def _check_routing_rows(expert, task_names: list[str], split: str, allow_seen: bool,
                        routing_plot) -> None:
    """A multi-task entry scores only the tasks it has a routing row for, on held-out
    examples unless `allow_seen`."""
    missing = [t for t in task_names if t not in expert.info.tasks]
    if missing:
        raise QuiverError(f"{expert.info.kind} entry {expert.name!r} has no routing row for "
                          f"{missing}: it scores only its training tasks {expert.info.tasks}")
    if split in ("all", "train") and not allow_seen:
        raise QuiverError(f"split {split!r} holds examples {expert.name!r} was trained on "
                          "(use test or valid, or pass --allow-seen)")
    if routing_plot:
        raise QuiverError(f"a routing plot shows routed experts; {expert.name!r} routes by task")


def _check_zero_shot(library: Library | None, names: list[str], task_names: list[str]) -> None:
    for name in names:
        seen = set(library.get(name).info.tasks) & set(task_names)
        if seen:
            raise QuiverError(
                f"expert {name!r} was trained on {sorted(seen)}: not zero-shot "
                "(pass --allow-seen to evaluate anyway)"
            )


def _route_to_own_expert(context, library: Library, task) -> None:
    for index, name in enumerate(context.expert_names):
        if task.name in library.get(name).info.tasks:
            context.forced = index
            return
    raise QuiverError(f"oracle: no expert of the library was trained on {task.name!r}")


def read_tasks_file(path) -> list[str]:
    """Task names, one per line; blank lines and `#` comments are skipped.

    Raises:
        QuiverError: the file cannot be read or names no task.
    """
    from pathlib import Path

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise QuiverError(f"cannot read tasks file {path}: {err}") from err
    names = [line.split("#", 1)[0].strip() for line in lines]
    names = [n for n in names if n]
    if not names:
        raise QuiverError(f"tasks file {path} names no task")
    return names


def cluster_library(
    library_url: str,
    config,
    experts: list[str] | None = None,
    save_as: str | None = None,
):
    """MBC-cluster a library's experts (all by default); optionally store the clustering in
    the library under `save_as`. Returns the `Clustering` and each expert's tasks.

    Raises:
        QuiverError: a missing library or expert, too few experts for `config.k`, experts
            that cannot be compared, or a bad `save_as` name.
    """
    from quiver.transforms.mbc import cluster_experts

    library = Library(library_url)
    chosen = library.experts(experts or None)
    clustering = cluster_experts(chosen, config)
    tasks = {e.name: list(e.info.tasks) for e in chosen}
    if save_as:
        library.put_clusters(save_as, clustering.clusters,
                             {**clustering.meta(), "tasks": tasks, "library": library_url})
    return clustering, tasks


def transfer_report(
    library_url: str,
    task_names: list[str],
    base: str = "smollm2-135m",
    config=None,
    experts: list[str] | None = None,
    show_progress: bool = True,
    model_and_tokenizer=None,
) -> dict:
    """The transfer matrix of a library's experts (and the base model) on named tasks.

    Raises:
        QuiverError: unknown task, library or expert; a library for another base model.
    """
    from quiver.evaluation.transfer import TransferConfig, transfer_matrix

    tasks = [load_task(t) for t in task_names]
    library = Library(library_url)
    # a clear error for an unknown name or kind, before loading the model
    require_lora(library.experts(experts or None), "the transfer matrix")
    model, tokenizer = model_and_tokenizer or load_base(base)
    report = transfer_matrix(model, tokenizer, library, tasks, experts or None,
                             config or TransferConfig(), show_progress)
    report.update(model=base, library=library_url)
    return report


def export_task(
    library_url: str,
    entry: str,
    task: str,
    name: str | None = None,
    out: str | None = None,
):
    """One task of a multi-task entry (MTL-LoRA) as a plain LoRA expert: added to the library
    as `name`, or written as a PEFT LoRA folder at `out` (the library left as it is). Returns
    the LoRA `Expert`.

    Raises:
        QuiverError: not exactly one of `name` and `out`; no such library, entry or task row;
            an entry that is not MTL-LoRA; `name` taken or `out` not empty.
    """
    from quiver.adapters import task_lora
    from quiver.library.store import check_name, write_peft_folder

    if (name is None) == (out is None):
        raise QuiverError("export a task either into the library (a name) or to a folder")
    library = Library(library_url)
    if name is not None:
        check_name(name)
        if name in library:
            raise QuiverError(f"an expert named {name!r} already exists in {library_url}")
    expert = task_lora(library.get(entry), task, name or entry)
    if out is not None:
        write_peft_folder(expert, out)
        return expert
    return library.add(expert)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
