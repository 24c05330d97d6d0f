"""`quiver adapt`: adapt to a new task from N examples and add the result to a library.

    check (method, task, shots, name, source) ──► base model ──► check bases
        ──► start (fresh LoRA | averaged LoRA | Poly row over skills | LoraHub weights)
        ──► train with the training loop (LoraHub: search instead) ──► Library.add

Everything that can be checked is checked before the base model loads, the rest before any
training; the library is written once, atomically, at the end, so a refusal or a failure
adds nothing. Trainings resume like `quiver train` (the run state is keyed by the options,
the shots and the starting weights' content hashes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from quiver.adaptation.config import METHODS, AdaptConfig
from quiver.adaptation.lib_mu import lib_mu_factors
from quiver.adaptation.lorahub import lorahub_search
from quiver.adaptation.mhr import check_poly_entry, mhr_mu_factors, mhr_row_start
from quiver.adaptation.polylib import check_same_shapes, polylib_start
from quiver.adaptation.starts import LoraStart, peft_lora_weights
from quiver.adapters.lora import LoraAdapter
from quiver.config import stable_hash, to_dict
from quiver.data import load_task
from quiver.data.task import Example, SplitConfig, Task
from quiver.errors import QuiverError
from quiver.library import Expert, ExpertInfo, Library
from quiver.library.store import check_name
from quiver.models import fingerprint, linear_module_shapes, load_base
from quiver.training import TrainConfig, train_expert
from quiver.training.loop import tokenized_splits, validation_loss


@dataclass
class FewShotTask(Task):
    """A task whose training split is `shots` (its validation and test splits unchanged)."""

    shots: list[Example] = field(default_factory=list)

    def split(self, part: str, config: SplitConfig = SplitConfig()) -> list[Example]:
        return list(self.shots) if part == "train" else super().split(part, config)


def few_shot_task(task: Task, shots: int, seed: int, max_valid: int = 1_000) -> FewShotTask:
    """`task` with a training split of `shots` examples: a seeded sample of its training
    split (for one seed, the first n of a larger sample: 16 shots are among the 64).

    Raises:
        QuiverError: fewer training examples than `shots`.
    """
    pool = task.split("train", SplitConfig(max_train=len(task.examples), max_valid=max_valid))
    if shots > len(pool):
        raise QuiverError(f"task {task.name!r} has {len(pool)} training examples, fewer than "
                          f"the {shots} shots asked for")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return FewShotTask(task.name, task.examples, task.kind, task.description, task.metadata,
                       shots=[pool[i] for i in order[:shots]])


def adapt_task(
    task_name: str,
    library_url: str,
    name: str,
    config: AdaptConfig,
    train_config: TrainConfig = TrainConfig(),
    base: str = "smollm2-135m",
    dtype: str = "auto",
    show_progress: bool = True,
    model_and_tokenizer=None,
) -> Expert:
    """Adapt to task `task_name` from `config.shots` of its training examples (validation
    from its validation split) with `config.method`, and add the result to the library at
    `library_url` as `name`, with its provenance in `info.training["adaptation"]` (method,
    source, shots, seed, task) and `info.source` `adapt:METHOD`. Returns the stored expert.

    The source (`config.source`) is a Poly/MHR entry of this library (mhr-z, mhr-full,
    mhr-mu) or a library of LoRA experts, none trained on the task (polylib, polylib-full,
    lib-mu, lorahub). mhr-mu and lib-mu train a LoRA of the source's rank and layers (the
    training config's rank and target modules are set from it).

    Raises:
        QuiverError: an unknown task or method; more shots than the task has; a taken name;
            a source missing, of the wrong kind, trained on the task, or for another base
            model. Nothing is added to the library then.
    """
    task = load_task(task_name)
    check_name(name)
    library = _open(library_url)
    if library is not None and name in library:
        raise QuiverError(f"an expert named {name!r} already exists in {library_url}")
    sample = few_shot_task(task, config.shots, train_config.seed, train_config.max_valid)
    train_config = replace(train_config, max_train=config.shots)
    source = _source(config, task.name, library)
    model, tokenizer = model_and_tokenizer or load_base(base, dtype=dtype)
    _check_bases(model, library, source)
    library = library or Library(library_url, create=True)
    library.ensure_base(base, fingerprint(model), linear_module_shapes(model))
    provenance = {"method": config.method, "source": config.source, "shots": config.shots,
                  "seed": train_config.seed, "task": task.name, "config": to_dict(config)}
    if config.method == "lorahub":
        expert = _lorahub(model, tokenizer, sample, source, name, config, train_config)
    else:
        start, train_config, extra = _start(config, source, train_config)
        run_state = library.run_state(name)
        expert, _ = train_expert(model, tokenizer, [sample], name, train_config,
                                 run_state=run_state, show_progress=show_progress,
                                 adapter=start)
        provenance.update(extra)
    expert.info.source = f"adapt:{config.method}"
    expert.info.training["adaptation"] = provenance
    added = library.add(expert)
    if config.method != "lorahub":
        library.run_state(name).clear()  # only now: a failed add can be retried
    return added


# ----------------------------------------------------------------------------- sources
def _open(url: str) -> Library | None:
    try:
        return Library(url)
    except QuiverError:
        return None  # created once the base model has loaded and the inputs are checked


def _source(config: AdaptConfig, task: str, library: Library | None):
    """The method's source: None (private), a Poly/MHR entry, or a list of LoRA experts.

    Raises:
        QuiverError: a source given to private or missing for the others; an entry that is
            not Poly/MHR or was trained on `task`; a library with other kinds of entries or
            experts trained on `task`.
    """
    wanted = METHODS[config.method]
    if wanted is None:
        if config.source:
            raise QuiverError("private trains a new LoRA from scratch: it takes no --from")
        return None
    if not config.source:
        raise QuiverError(f"{config.method} adapts from a source: pass --from")
    if wanted == "poly":
        if library is None or config.source not in library:
            raise QuiverError(f"{config.method}: no entry {config.source!r} in the library "
                              "(--from names a Poly/MHR entry of --library)")
        entry = library.get(config.source)
        check_poly_entry(entry, config.method)
        if task in entry.info.tasks:
            raise QuiverError(f"entry {config.source!r} was trained on {task!r} (it has a "
                              "routing row for it): adapt to a task it holds out")
        return entry
    experts = Library(config.source).experts()
    for expert in experts:  # the kinds first: an entry of another kind is the bigger mistake
        if expert.info.kind != "lora":
            raise QuiverError(f"{config.method} uses a library of LoRA experts; "
                              f"{expert.name!r} in {config.source} is a {expert.info.kind} "
                              "adapter (for a Poly/MHR entry use mhr-z, mhr-full or mhr-mu)")
    for expert in experts:
        if task in expert.info.tasks:
            raise QuiverError(f"expert {expert.name!r} of {config.source} was trained on "
                              f"{task!r}: adapt from a library that holds the task out")
    check_same_shapes(experts, config.method)
    return experts


def _check_bases(model, library: Library | None, source) -> None:
    """Raises QuiverError: the library or the source is for another base model."""
    model_print = fingerprint(model)
    if library is not None and library.base and library.base["fingerprint"] != model_print:
        raise QuiverError(f"library {library.url} is for base model {library.base['name']!r}, "
                          f"not this one (fingerprint {model_print})")
    entries = [] if source is None else [source] if isinstance(source, Expert) else source
    for entry in entries:
        if entry.info.base_fingerprint not in (None, model_print):
            raise QuiverError(f"source expert {entry.name!r} was made for base model "
                              f"{entry.info.base_model!r}, not this one (fingerprint "
                              f"{model_print})")


# ---------------------------------------------------------------------------- starts
def _start(config: AdaptConfig, source, train_config: TrainConfig):
    """The adapter the training loop starts from, the training config it needs, and what to
    add to the provenance."""
    method = config.method
    if method == "private":
        return None, train_config, {}
    if method in ("mhr-z", "mhr-full"):
        return mhr_row_start(source, method, config.routing_lr), train_config, {
            "source_hash": source.info.content_hash}
    if method in ("polylib", "polylib-full"):
        start = polylib_start(source, method, config.routing_lr, config.source)
        return start, train_config, {"experts": [e.name for e in source],
                                     "source_hash": start.source_hash}
    if method == "mhr-mu":
        factors, what = mhr_mu_factors(source), source.info.content_hash
    else:  # lib-mu
        factors, what = lib_mu_factors(source), stable_hash([e.info.content_hash for e in source])
    rank = next(iter(factors.values()))[0].shape[0]
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in factors}))
    train_config = replace(train_config, rank=rank, target_modules=targets)
    start = LoraStart(method, config.source, what).with_weights(factors)
    extra = {"source_hash": what}
    if method == "lib-mu":
        extra["experts"] = [e.name for e in source]
    return start, train_config, extra


def _lorahub(model, tokenizer, sample: FewShotTask, experts, name: str, config: AdaptConfig,
             train_config: TrainConfig) -> Expert:
    """LoraHub's search on the shots; the combined LoRA as an expert (scaling 1)."""
    factors, record = lorahub_search(model, tokenizer, experts, sample.shots, config,
                                     train_config)
    rank = experts[0].adapter_config["r"]
    targets = sorted({m.rsplit(".", 1)[-1] for m in factors})
    plain = TrainConfig(rank=rank, alpha=float(rank), dropout=0.0, target_modules=tuple(targets))
    adapter = LoraAdapter(model, plain)  # PEFT's adapter config, and the validation loss
    try:
        adapter_config, weights, lora = adapter.stored(peft_lora_weights(factors))
        adapter.load_weights(weights)
        # the validation loss the training methods report, on the same examples
        _, valid_set = tokenized_splits(tokenizer, [sample], train_config)
        valid_loss = validation_loss(adapter, valid_set, tokenizer, train_config,
                               next(model.parameters()).device)
    finally:
        adapter.remove()
    info = ExpertInfo(name=name, tasks=[sample.name], base_model=model.config._name_or_path,
                      base_fingerprint=fingerprint(model), lora=lora,
                      training={"lorahub": record, "experts": [e.name for e in experts]},
                      metrics={"best_valid_loss": valid_loss, "lorahub_loss": record["loss"],
                               "lorahub_objective": record["objective"]},
                      created=datetime.now(UTC).isoformat(timespec="seconds"))
    return Expert(info, adapter_config, weights=weights)
