"""Building a library from tasks: the strategies (private, shared, MBC, random clusters, and
the multi-task adapters Poly, MHR and MTL-LoRA) and the executors that run the trainings (one after
another here, or as Ray tasks on a cluster).

    tasks ──► check ──► jobs (expert name + its tasks) ──► executor ──► library
                         │
                         ├ mbc / random: private experts ──► clusters ──► one job per cluster
                         └ poly / mhr / mtl-lora: one job, an entry of its kind with a row per task

A job is one expert to train. Every job trains straight into the library through
`train_into_library`, so a build is resumable for free: an expert already in
the library is skipped, a half-trained one resumes from its saved run state, and an add is
atomic (a failed job never leaves half an expert). A failed job is retried, then reported; it
never stops the others.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial

from quiver.adapters import (
    AdapterConfig,
    PolyMHRConfig,
    adapter_for_strategy,
    adapter_from_dict,
    adapter_to_dict,
)
from quiver.build_config import (
    ADAPTER_STRATEGIES,
    CLUSTER_RECORDS,
    BuildConfig,
)
from quiver.config import from_dict, to_dict
from quiver.data import Example, load_task
from quiver.errors import QuiverError
from quiver.library import Expert, ExpertInfo, Library
from quiver.library.store import check_name
from quiver.models import (
    fingerprint,
    is_all_linear,
    linear_module_shapes,
    load_base,
    resolve_targets,
)
from quiver.training import TrainConfig, TrainResult, train_expert


@dataclass(frozen=True)
class Job:
    """One expert to train: its name and the tasks whose pooled data it learns; `adapter`:
    what to train instead of a LoRA (`adapter_to_dict` of its config, plain JSON)."""

    name: str
    tasks: tuple[str, ...]
    adapter: dict | None = field(default=None, compare=False, hash=False)


@dataclass
class JobOutcome:
    """What became of one job: `trained`, `skipped` (already in the library) or `failed`."""

    name: str
    tasks: list[str]
    status: str
    attempts: int = 0
    steps: int | None = None
    best_valid_loss: float | None = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class BuildReport:
    """The outcome of a build. For mbc and random, `private` holds the private experts' jobs
    (trained into the private library first, or found there)."""

    library: str
    strategy: str
    outcomes: list[JobOutcome]
    private: list[JobOutcome] = field(default_factory=list)
    clusters: dict[str, list[str]] | None = None

    @property
    def failed(self) -> list[JobOutcome]:
        return [o for o in self.private + self.outcomes if o.status == "failed"]


# ------------------------------------------------------------------------------ the recipe
def build_library(
    task_names: list[str],
    library_url: str,
    base: str,
    train_config: TrainConfig,
    config: BuildConfig,
    private_url: str | None = None,
    dtype: str = "auto",
    show_progress: bool = True,
    adapter: AdapterConfig | None = None,
) -> BuildReport:
    """Build a library of experts from tasks with one of the strategies of `BuildConfig`.

    poly, mhr and mtl-lora train one entry (named as the strategy) on all the tasks jointly,
    with `adapter`, the strategy's config (default: its defaults; MHR's H resolved by the
    strategy): `PolyMHRConfig` for poly and mhr, `MTLLoRAConfig` for mtl-lora.

    Everything that can be checked is checked before any training: the tasks (known, not
    empty, none twice), K, the names the experts will take, the base model of existing
    libraries. mbc and random cluster the private experts of the tasks found
    in `private_url`, training the missing ones into it first; the clusters are recorded in
    the built library (`Library.get_clusters("mbc" | "random")`).

    Trainings that fail (after `config.retries` more tries) are in the report, not raised.

    Raises:
        QuiverError: bad input, found before anything is written.
    """
    task_chars = check_tasks(task_names)  # read once: checked and measured
    tasks = list(task_chars)
    _check_library(library_url, base)
    if not is_all_linear(train_config.target_modules):  # named layers: check them on the model
        resolve_targets(_base_shapes(library_url, base), train_config.target_modules, base)
    run = partial(run_jobs, library_url=library_url, base=base, train_config=train_config,
                  config=config, dtype=dtype, show_progress=show_progress,
                  example_chars=task_chars)
    if config.strategy in ADAPTER_STRATEGIES:
        spec = adapter_for_strategy(config.strategy, [adapter] if adapter else [])
        if isinstance(spec, PolyMHRConfig):
            check_heads(_base_shapes(library_url, base), spec.heads, train_config.target_modules)
        jobs = [Job(config.strategy, tuple(tasks), adapter_to_dict(spec))]
        check_jobs(jobs, library_url)
        return BuildReport(library_url, config.strategy, run(jobs))
    if config.strategy in ("private", "shared"):
        jobs = private_jobs(tasks) if config.strategy == "private" else [
            Job(config.shared_name, tuple(tasks))]
        check_jobs(jobs, library_url)
        return BuildReport(library_url, config.strategy, run(jobs))

    if private_url is None:
        raise QuiverError(f"strategy {config.strategy} needs a private library (--private)")
    if len(tasks) < 2:
        raise QuiverError(f"strategy {config.strategy} clusters experts: give at least 2 tasks")
    if config.clusters > len(tasks):
        raise QuiverError(f"cannot make {config.clusters} clusters of {len(tasks)} tasks")
    _check_library(private_url, base)
    found = find_private_experts(private_url, tasks)
    missing = private_jobs([t for t in tasks if t not in found])
    check_jobs(missing, private_url)

    private = run(missing, library_url=private_url)
    report = BuildReport(library_url, config.strategy, [], private=private)
    if report.failed:
        return report  # clustering needs every private expert
    report.private = [_found(private_url, found[t]) for t in tasks if t in found] + private
    names = {**found, **{job.tasks[0]: job.name for job in missing}}
    experts = Library(private_url).experts([names[t] for t in tasks])
    clusters, meta = mbc_clusters(experts, config.clusters, config.cluster_seed,
                                  config.cluster_space)
    if config.strategy == "random":
        meta = {"sizes_from": clusters}  # the MBC clusters whose sizes it copies
        sizes = [len(members) for members in clusters.values()]
        clusters = random_clusters(sorted(names.values()), sizes, config.cluster_seed)
    jobs = cluster_jobs(clusters, experts)
    check_jobs(jobs, library_url)
    meta.update(build=to_dict(config), private_library=private_url,
                tasks={job.name: list(job.tasks) for job in jobs})
    _record_clusters(library_url, CLUSTER_RECORDS[config.strategy], clusters, meta)
    report.clusters = clusters
    report.outcomes = run(jobs)
    return report


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
    adapter: AdapterConfig | None = None,
) -> tuple[Expert, TrainResult]:
    """Train an expert on `task_names` and add it to the library at `library_url` (with
    `adapter`, an entry of that kind instead of a LoRA; see `train_expert`).

    Everything that can be checked is checked before training starts: the tasks exist and
    have examples, the name is free, the library is for this base model. An interrupted run
    resumes from its saved state when the same command is run again.

    Raises:
        QuiverError: unknown or empty task, a taken name, target modules the model lacks,
            or a library for another base.
    """
    tasks = [load_task(t) for t in task_names]
    try:
        existing = Library(library_url)
    except QuiverError:
        existing = None  # created below, once the base model has loaded
    if existing is not None and name in existing and not overwrite:
        raise QuiverError(f"an expert named {name!r} already exists in {library_url}")
    model, tokenizer = model_and_tokenizer or load_base(base, dtype=dtype)
    shapes = linear_module_shapes(model)
    resolve_targets(shapes, config.target_modules, base)  # before anything is written
    library = existing or Library(library_url, create=True)
    library.ensure_base(base, fingerprint(model), shapes)
    run_state = library.run_state(name)
    expert, result = train_expert(model, tokenizer, tasks, name, config, run_state=run_state,
                                  show_progress=show_progress, adapter=adapter)
    added = library.add(expert, overwrite=overwrite)
    run_state.clear()  # only now: a failed add can be retried from the finished run
    return added, result


# ----------------------------------------------------------------------------- checking
def check_tasks(task_names: list[str]) -> dict[str, float]:
    """The tasks' canonical names (`bigbench:...`), in the order given, once each is known to
    exist and have examples, each with the mean length of its examples (`example_chars`,
    taken here so that ordering parallel jobs by it does not read the tasks again).

    Raises:
        QuiverError: no tasks, an unknown or empty task, or a task listed twice (under any
            spelling).
    """
    if not task_names:
        raise QuiverError("no tasks to build from")
    first_spelling: dict[str, str] = {}
    chars: dict[str, float] = {}
    for given in task_names:
        task = load_task(given)  # raises for unknown and empty tasks
        if task.name in first_spelling:
            raise QuiverError(f"task {task.name!r} is listed twice "
                              f"(as {first_spelling[task.name]!r} and {given!r})")
        first_spelling[task.name] = given
        chars[task.name] = example_chars(task.examples)
    return chars


def check_jobs(jobs: list[Job], library_url: str) -> None:
    """Refuse jobs whose expert names are taken in the library by experts of other tasks.

    Raises:
        QuiverError: a bad name, two jobs with one name, or a name held by an expert of
            other tasks.
    """
    names = [job.name for job in jobs]
    for name in names:
        check_name(name)  # before training, not at the add after it
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise QuiverError(f"several experts would be named {twice}")
    library = _open(library_url)
    for job in jobs if library is not None else []:
        if job.name not in library:
            continue
        info = library.get(job.name).info
        if set(info.tasks) != set(job.tasks):
            raise QuiverError(
                f"expert {job.name!r} in {library_url} was trained on "
                f"{info.tasks}, not {list(job.tasks)}: remove it or build into another library"
            )
        if _made_as(info) != _made_as(job):
            raise QuiverError(f"expert {job.name!r} in {library_url} is a {info.kind} adapter "
                              f"made otherwise ({_made_as(info)}): remove it or build into "
                              "another library")


_SHAPE_FIELDS = ("skills", "heads", "up_projections")  # of the multi-task adapters' configs


def _made_as(what: ExpertInfo | Job) -> tuple:
    """The kind and the shape of a multi-task adapter (Poly/MHR's skills and heads,
    MTL-LoRA's up-projections): what a build must not silently mix up."""
    if isinstance(what, Job):
        spec = what.adapter or {}
        return spec.get("kind", "lora"), *(spec.get(f) for f in _SHAPE_FIELDS)
    return what.kind, *(what.lora.get(f) for f in _SHAPE_FIELDS)


def check_heads(shapes: dict[str, list[int]], heads: int, target_modules) -> None:
    """Refuse MHR heads that do not divide the input and output of every adapted layer.

    Raises:
        QuiverError: the first layer they do not divide.
    """
    targets = resolve_targets(shapes, target_modules)
    for module, (fan_in, fan_out) in shapes.items():
        if module.rsplit(".", 1)[-1] in targets and (fan_in % heads or fan_out % heads):
            raise QuiverError(f"{heads} heads do not divide {module} ({fan_in} -> {fan_out}): "
                              "choose --heads dividing every adapted layer's sizes")


def _base_shapes(library_url: str, base: str) -> dict[str, list[int]]:
    """The base model's linear layers: the library's record, or else the model's own."""
    library = _open(library_url)
    if library is not None and library.base is not None:
        return library.base["modules"]
    model, _ = load_base(base, device="cpu")
    return linear_module_shapes(model)


def _check_library(url: str, base: str) -> None:
    library = _open(url)
    pinned = library.base if library is not None else None
    if pinned is not None and pinned["name"] != base:
        raise QuiverError(f"library {url} is for base model {pinned['name']!r}, not {base!r}")


def _open(url: str) -> Library | None:
    try:
        return Library(url)
    except QuiverError:
        return None  # not created yet: the first training creates it


# --------------------------------------------------------------------------- strategies
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def expert_name(task: str) -> str:
    """The private expert's name for a task, valid in a library.

    `bigbench:arithmetic/1_digit_addition` -> `arithmetic.1_digit_addition`,
    `jsonl:/data/my task.jsonl` -> `my_task`, `hf:/data/flan#cot_gsm8k` -> `cot_gsm8k`,
    `gym:chain_sum?max_terms=3` -> `chain_sum.max_terms-3`.
    """
    if task.startswith("jsonl:"):
        stem = os.path.basename(task.removeprefix("jsonl:"))
        name = stem.removesuffix(".jsonl")
    elif task.startswith("hf:"):
        path, _, subtask = task.removeprefix("hf:").partition("#")
        name = subtask or os.path.basename(path.rstrip("/"))
    elif task.startswith("gym:"):  # its knobs after a dot: chain_sum.max_terms-3
        name = task.removeprefix("gym:").replace("?", ".").replace("&", ".").replace("=", "-")
    else:
        name = task.removeprefix("bigbench:").replace("/", ".")
    name = _UNSAFE.sub("_", name).lstrip("._-")[:128]
    return name or "task"


def private_jobs(tasks: list[str]) -> list[Job]:
    """One job per task, named by `expert_name`.

    Raises:
        QuiverError: two tasks that would give their experts the same name.
    """
    jobs, owner = [], {}
    for task in tasks:
        name = expert_name(task)
        if name in owner:
            raise QuiverError(f"tasks {owner[name]!r} and {task!r} would both make an expert "
                              f"named {name!r}: rename one of them")
        owner[name] = task
        jobs.append(Job(name, (task,)))
    return jobs


def find_private_experts(private_url: str, tasks: list[str]) -> dict[str, str]:
    """`{task: name}` of the single-task experts of `tasks` already in the private library
    (any name; the `expert_name` one first, when there are several)."""
    library = _open(private_url)
    found: dict[str, str] = {}
    for name in library.names() if library is not None else []:
        info = library.get(name).info
        trained_on = info.tasks
        if info.kind == "lora" and len(trained_on) == 1 and trained_on[0] in tasks:
            task = trained_on[0]
            if task not in found or name == expert_name(task):
                found[task] = name
    return found


def mbc_clusters(experts: list[Expert], k: int, seed: int, space: str = "params"
                 ) -> tuple[dict[str, list[str]], dict]:
    """MBC: `{cluster0: [private expert names], ...}` from the experts' LoRA parameters (or
    their updates, `space="update"`), and how they were computed (`Clustering.meta()`)."""
    from quiver.transforms.mbc import MBCConfig, cluster_experts  # scikit-learn: only here

    clustering = cluster_experts(experts, MBCConfig(k=k, seed=seed, space=space))
    clusters = {name: list(members) for name, members in clustering.clusters.items()}
    return clusters, clustering.meta()


def random_clusters(members: list[str], sizes: list[int], seed: int) -> dict[str, list[str]]:
    """The random-clusters baseline: `members` shuffled (seeded) and cut into `sizes`.

    Raises:
        QuiverError: the sizes do not add up to the number of members.
    """
    if sum(sizes) != len(members) or min(sizes, default=1) < 1:
        raise QuiverError(f"cluster sizes {sizes} do not split {len(members)} experts")
    order = sorted(members)  # independent of the order they were given in
    random.Random(seed).shuffle(order)
    clusters, start = {}, 0
    for index, size in enumerate(sizes):
        clusters[f"random{index}"] = order[start:start + size]
        start += size
    return clusters


def cluster_jobs(clusters: dict[str, list[str]], experts: list[Expert]) -> list[Job]:
    """One job per cluster, on the pooled tasks of its private experts."""
    tasks_of = {expert.name: expert.info.tasks for expert in experts}
    jobs = []
    for name, members in clusters.items():
        tasks = [t for member in members for t in tasks_of[member]]
        jobs.append(Job(name, tuple(dict.fromkeys(tasks))))
    return jobs


def _record_clusters(library_url: str, record: str, clusters: dict[str, list[str]],
                     meta: dict) -> None:
    """Save the clusters in the library (before training: they are the build's plan).

    Raises:
        QuiverError: the library already records other clusters under this name.
    """
    library = Library(library_url, create=True)
    stored = library.get_clusters(record)
    if stored is not None and stored[0] != clusters:
        raise QuiverError(f"library {library_url} already holds other {record!r} clusters: "
                          "build into another library")
    if stored is None:
        library.put_clusters(record, clusters, meta)


def _found(library_url: str, name: str) -> JobOutcome:
    return _skipped(Library(library_url).get(name).info)


# ---------------------------------------------------------------------------- executors
def run_jobs(
    jobs: list[Job],
    library_url: str,
    base: str,
    train_config: TrainConfig,
    config: BuildConfig,
    dtype: str = "auto",
    show_progress: bool = True,
    example_chars: dict[str, float] | None = None,
) -> list[JobOutcome]:
    """Train the jobs' experts into the library, skipping those already there.

    `config.executor` chooses where: `local` trains one after another in this process (the
    base model loaded once), or with `config.workers` > 1 that many at once, each job in a
    process of its own with `config.cpus_per_job` threads (on a GPU, the processes share
    it); `ray` makes each job a Ray task that loads the base model itself
    (`config.cpus_per_job`, `config.gpus_per_job`) on a local Ray or `config.address`. A job
    that fails is tried again `config.retries` times, then reported as failed. Several at
    once start longest first (`longest_first`, with the tasks' `example_chars` where
    `check_tasks` measured them).
    """
    from quiver.progress import jobs_progress

    library = _open(library_url)
    done = {job.name: library.get(job.name).info
            for job in jobs if library is not None and job.name in library}
    outcomes = {name: _skipped(info) for name, info in done.items()}
    pending = [job for job in jobs if job.name not in done]
    if pending:
        if config.executor == "local":
            workers, threads = local_workers(config, len(pending), dtype)
            config = replace(config, workers=workers, cpus_per_job=threads)
        if config.executor == "ray" or config.workers > 1:
            pending = longest_first(pending, example_chars)
        run = _run_on_ray if config.executor == "ray" else (
            _run_in_processes if config.workers > 1 else _run_locally)
        with jobs_progress(len(pending), f"{config.executor} build", show_progress) as advance:
            for outcome in run(pending, library_url, base, train_config, config, dtype):
                outcomes[outcome.name] = outcome
                advance(f"{outcome.name} {outcome.status}")
    return [outcomes[job.name] for job in jobs]


def longest_first(jobs: list[Job], example_chars: dict[str, float] | None = None) -> list[Job]:
    """`jobs` by the mean length of their tasks' examples, longest first (`example_chars`
    where given, else each task is read to measure it).

    With several trainings at once, a long job started last runs alone while the other
    workers idle; starting the longest first (LPT scheduling) keeps them busy to the end. The
    jobs of one build take the same steps, so a job's time grows with its examples' length.
    """
    lengths = dict(example_chars or {})
    for task in {task for job in jobs for task in job.tasks} - lengths.keys():
        lengths[task] = mean_example_chars(task)
    return sorted(jobs, key=lambda job: sum(lengths[t] for t in job.tasks) / len(job.tasks),
                  reverse=True)


def mean_example_chars(task_name: str) -> float:
    """`example_chars` of the task's examples; 0 for a task that cannot be read now (its job
    will say why)."""
    try:
        return example_chars(load_task(task_name).examples)
    except QuiverError:
        return 0.0


def example_chars(examples: list[Example], sample: int = 200) -> float:
    """Mean characters (prompt and target) of the first `sample` examples: a training step's
    time grows with them."""
    examples = examples[:sample]
    return sum(len(e.prompt) + len(e.target) for e in examples) / len(examples)


def train_job(
    name: str,
    tasks: list[str],
    library_url: str,
    base: str,
    train_config: dict,
    dtype: str = "auto",
    model_and_tokenizer=None,
    adapter: dict | None = None,
) -> dict:
    """Train one expert into the library (what every executor runs for a job).

    `train_config` is `to_dict(TrainConfig)` and `adapter` `adapter_to_dict` of a multi-task
    adapter's config (None: a LoRA): plain JSON, whatever the executor ships. An
    expert already stored under `name` (a retry after a failure that came after the add, or
    another builder) is described instead of trained again.

    Returns:
        `{"status", "steps", "best_valid_loss", "seconds"}`.
    """
    library = _open(library_url)
    if library is not None and name in library:
        return _summary(library.get(name).info, "exists")
    started = time.perf_counter()
    spec = adapter_from_dict(adapter) if adapter is not None else None
    _, result = train_into_library(tasks, library_url, name, base,
                                   from_dict(TrainConfig, train_config), show_progress=False,
                                   model_and_tokenizer=model_and_tokenizer, dtype=dtype,
                                   adapter=spec)
    return {"status": "trained", "steps": result.steps, "best_valid_loss": result.best_valid_loss,
            "seconds": time.perf_counter() - started}


# Peak RSS of one SmolLM2-135M training with quiver's memory plan, batch 16 x 512, plus room
# (results/train_throughput_memory.md): what `workers=0` sets aside for each training.
TRAINING_BYTES = 3 * 2**30


def local_workers(config: BuildConfig, jobs: int, dtype: str = "auto") -> tuple[int, float]:
    """Trainings at once and CPU threads for each, for the local executor.

    `config.workers` > 0 is taken as given. 0 chooses: on a GPU one training (several share
    it well only when the batches are small); on a CPU one per core with one thread each,
    which trains 1.55x faster than one training with both threads of a 2-core machine
    (results/train_throughput_parallel.md), as many as `jobs` and the free memory allow.
    """
    from quiver.models import pick_device_and_dtype
    from quiver.training import available_memory

    if config.workers > 0:
        return config.workers, config.cpus_per_job
    device, _ = pick_device_and_dtype(None, dtype)
    cores = len(os.sched_getaffinity(0))
    if device.type != "cpu" or jobs < 2 or cores < 2:
        return 1, config.cpus_per_job
    workers = max(1, min(jobs, cores, int(available_memory("cpu") // TRAINING_BYTES)))
    return workers, float(max(1, cores // workers))


def _run_locally(pending, library_url, base, train_config, config, dtype) -> Iterator[JobOutcome]:
    model_and_tokenizer = load_base(base, dtype=dtype)  # once for every job
    for job in pending:
        errors = []
        while len(errors) <= config.retries:
            try:
                result = train_job(job.name, list(job.tasks), library_url, base,
                                   to_dict(train_config), dtype, model_and_tokenizer, job.adapter)
            except Exception as err:  # one failed training must not stop the build
                errors.append(_describe(err))
                continue
            yield _outcome(job, result, attempts=len(errors) + 1)
            break
        else:
            yield _failed(job, errors)


def _run_in_processes(pending, library_url, base, train_config, config,
                      dtype) -> Iterator[JobOutcome]:
    """`config.workers` jobs at once, each in a fresh spawned process (CUDA cannot fork) that
    loads the base model itself and stops with this one. A worker that dies takes its pool
    with it: the jobs that were running count one failed try each and go to a new pool."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    from quiver.workers import spawn_pool

    errors: dict[str, list[str]] = {job.name: [] for job in pending}
    queue = list(pending)
    while queue:
        # workers x threads should match the cores
        with spawn_pool(config.workers, threads=config.cpus_per_job) as pool:

            def submit(job: Job):
                return pool.submit(train_job, job.name, list(job.tasks), library_url, base,
                                   to_dict(train_config), dtype, adapter=job.adapter)

            running = {submit(job): job for job in queue}
            queue = []
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool as err:
                        errors[job.name].append(_describe(err))
                        if len(errors[job.name]) <= config.retries:
                            queue.append(job)  # after this pool has drained
                        else:
                            yield _failed(job, errors[job.name])
                        continue
                    except Exception as err:  # the job's own failure: retry in this pool
                        errors[job.name].append(_describe(err))
                        if len(errors[job.name]) <= config.retries:
                            running[submit(job)] = job
                        else:
                            yield _failed(job, errors[job.name])
                        continue
                    yield _outcome(job, result, attempts=len(errors[job.name]) + 1)


def _run_on_ray(pending, library_url, base, train_config, config, dtype) -> Iterator[JobOutcome]:
    import ray

    if "://" not in library_url:  # workers may start in another folder than the driver
        library_url = os.path.abspath(library_url)
    owned = not ray.is_initialized()  # a Ray the caller started stays up for the caller
    if owned:
        ray.init(address=config.address or None, runtime_env=_runtime_env(),
                 log_to_driver=False, logging_level=logging.WARNING)
    try:
        # Retries happen here, not in Ray: every failure (an exception or a lost worker)
        # counts the same, and the report says how many tries each job took.
        remote = ray.remote(num_cpus=config.cpus_per_job, num_gpus=config.gpus_per_job,
                            max_retries=0)(_ray_train_job)

        def submit(job: Job):
            return remote.remote(job.name, list(job.tasks), library_url, base,
                                 to_dict(train_config), dtype, config.cpus_per_job, job.adapter)

        running = {submit(job): (job, []) for job in pending}
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            job, errors = running.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # the job's own exception, or Ray's word for a crash
                errors.append(_describe(err))
                if len(errors) <= config.retries:
                    running[submit(job)] = (job, errors)
                else:
                    yield _failed(job, errors)
                continue
            yield _outcome(job, result, attempts=len(errors) + 1)
    finally:
        if owned:
            ray.shutdown()


def _ray_train_job(name, tasks, library_url, base, train_config, dtype, cpus,
                   adapter=None) -> dict:
    import torch

    torch.set_num_threads(max(1, int(cpus)))  # stay within the CPUs Ray reserved for the job
    return train_job(name, tasks, library_url, base, train_config, dtype, adapter=adapter)


def _runtime_env() -> dict:
    """Ray workers import the driver's quiver first (a source checkout, or the installed one
    on nodes where that folder does not exist)."""
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {"env_vars": {"PYTHONPATH": f"{source}{os.pathsep}${{PYTHONPATH}}"}}


# ------------------------------------------------------------------------------ outcomes
def _summary(info: ExpertInfo, status: str) -> dict:
    return {"status": status, "steps": info.training.get("steps_run"),
            "best_valid_loss": info.metrics.get("best_valid_loss"), "seconds": 0.0}


def _skipped(info: ExpertInfo) -> JobOutcome:
    summary = _summary(info, "skipped")
    return JobOutcome(info.name, list(info.tasks), "skipped", 0, summary["steps"],
                      summary["best_valid_loss"])


def _outcome(job: Job, result: dict, attempts: int) -> JobOutcome:
    status = "trained" if result["status"] == "trained" else "skipped"
    return JobOutcome(job.name, list(job.tasks), status, attempts, result["steps"],
                      result["best_valid_loss"], result["seconds"])


def _failed(job: Job, errors: list[str]) -> JobOutcome:
    return JobOutcome(job.name, list(job.tasks), "failed", len(errors), error=errors[-1])


def _describe(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err  # Ray wraps a task's exception; show the job's
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"
