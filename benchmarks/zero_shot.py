"""The paper's main table, small and offline: does a library help on tasks it never saw?

1. Libraries, all from the same explicit list of BIG-bench training tasks (none of them in
   BIG-bench Lite or BIG-bench Hard), on the embedded SmolLM2-135M-Instruct:
   private (an expert per task), MBC (an expert per cluster of the private experts), random
   clusters (MBC's sizes, random members) and shared (one expert on every task). Each is
   built with `quiver.build.build_library`, so a stopped run resumes where it was.
2. Merges of the private library: uniform (A and B averaged) and TIES.
3. Every method on held-out multiple-choice tasks of BIG-bench Lite (no expert saw them, and
   nothing here is tuned on their test split): base, shared, uniform merge, TIES, Arrow over
   private / MBC / random, uniform routing over MBC, Arrow over MBC with GenKnowSub (the
   shared expert as the general one), PHATGOOSE and centroid routing over private. With
   `split: all` a held-out task is scored on a seeded sample of all its examples.
4. Accuracy per task and on average with bootstrap 95% intervals (examples resampled within
   each task), paired intervals for every method against base and for MBC + Arrow against
   base, uniform merge, shared and Arrow private, how far the experts moved apart (cosine
   similarities of their parameters), a Markdown table and a bar plot.

Usage: .venv/bin/python -m benchmarks.zero_shot --budget smoke|small|medium|large|gpu|full
       [--set KEY=VALUE ...]
Writes benchmarks/results/zero_shot_<budget>.{json,md,png} (and, with a selection sample,
zero_shot_analysis.py's files); evaluations are cached in the run folder
(runs/zero-shot-<budget>/), so a re-run only evaluates what is missing. `medium` is the CPU
budget (1 h 53 min on the 2-core EPYC); `full` is for a GPU, where trainings and evaluations
run several at once in processes of their own (`workers`, `eval_workers`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import gym_lists, stats
from benchmarks.common import (
    RESULTS,
    add_budget_options,
    fast_cpu_dtype,
    provenance,
    provenance_line,
    record_time,
    recorded_time,
    with_settings,
    write_json,
    write_text,
)
from benchmarks.stats import interval
from benchmarks.zero_shot_analysis import write_analysis

TRAIN_TASKS = [  # BIG-bench, none in BIG-bench Lite or BIG-bench Hard; MC then generative
    "bigbench:anachronisms",
    "bigbench:analogical_similarity",
    "bigbench:arithmetic",
    "bigbench:cause_and_effect",
    "bigbench:color",
    "bigbench:discourse_marker_prediction",
    "bigbench:elementary_math_qa",
    "bigbench:epistemic_reasoning",
    "bigbench:fact_checker",
    "bigbench:goal_step_wikihow",
    "bigbench:implicatures",
    "bigbench:intent_recognition",
    "bigbench:logical_fallacy_detection",
    "bigbench:metaphor_boolean",
    "bigbench:moral_permissibility",
    "bigbench:physics",
    "bigbench:presuppositions_as_nli",
    "bigbench:question_selection",
    "bigbench:social_iqa",
    "bigbench:timedial",
    "bigbench:auto_categorization",
    "bigbench:bridging_anaphora_resolution_barqa",
    "bigbench:disfl_qa",
    "bigbench:language_games",
    "bigbench:linguistic_mappings",
    "bigbench:list_functions",
    "bigbench:modified_arithmetic",
    "bigbench:periodic_elements",
    "bigbench:qa_wikidata",
    "bigbench:tense",
    "bigbench:unit_conversion",
    "bigbench:word_unscrambling",
]
LARGE_TRAIN_TASKS = [  # 24 tasks outside Lite and Hard, short (median prompt under ~600
    # characters), each chosen for a kind of the held-out tasks: fact checking and NLI
    # (vitaminc, strategyqa), logic (formal_fallacies, logical_deduction), commonsense and
    # causes (winowhy), social and moral reasoning (strange_stories, bbq_lite), dialogue
    # (play_dialog), emoji (emoji_movie), figurative language (conceptual_combinations),
    # knowledge (hindu_knowledge), other languages (language_identification)
    "bigbench:fact_checker",
    "bigbench:presuppositions_as_nli",
    "bigbench:entailed_polarity",
    "bigbench:misconceptions",
    "bigbench:anachronisms",
    "bigbench:logical_fallacy_detection",
    "bigbench:epistemic_reasoning",
    "bigbench:cause_and_effect",
    "bigbench:fantasy_reasoning",
    "bigbench:goal_step_wikihow",
    "bigbench:social_iqa",
    "bigbench:social_support",
    "bigbench:moral_permissibility",
    "bigbench:implicatures",
    "bigbench:intent_recognition",
    "bigbench:movie_dialog_same_or_different",
    "bigbench:emojis_emotion_prediction",
    "bigbench:metaphor_boolean",
    "bigbench:physics",
    "bigbench:parsinlu_qa",
    "bigbench:hinglish_toxicity",
    "bigbench:qa_wikidata",
    "bigbench:auto_categorization",
    "bigbench:periodic_elements",
]
GPU_EXTRA_TASKS = [  # the GPU budget's 8 more (32 in all), short as well
    "bigbench:kannada",
    "bigbench:cs_algorithms",
    "bigbench:entailed_polarity_hindi",
    "bigbench:cryobiology_spanish",
    "bigbench:swahili_english_proverbs",
    "bigbench:metaphor_understanding",
    "bigbench:understanding_fables",
    "bigbench:timedial",
]
TASK_LISTS = {"default": TRAIN_TASKS, "large": LARGE_TRAIN_TASKS,
              "gpu": LARGE_TRAIN_TASKS + GPU_EXTRA_TASKS,
              "gym": gym_lists.TRAIN}  # benchmarks/families.py's libraries
HELD_OUT = [  # the multiple-choice tasks of BIG-bench Lite (bigbench_lite_v1)
    "bigbench:emoji_movie",
    "bigbench:strategyqa",
    "bigbench:vitaminc_fact_verification",
    "bigbench:winowhy",
    "bigbench:formal_fallacies_syllogisms_negation",
    "bigbench:hindu_knowledge",
    "bigbench:conceptual_combinations",
    "bigbench:bbq_lite_json",
    "bigbench:play_dialog_same_or_different",
    "bigbench:strange_stories",
    "bigbench:language_identification",
    "bigbench:logical_deduction",
    "bigbench:code_line_description",
    "bigbench:known_unknowns",
    "bigbench:misconceptions_russian",
    "bigbench:novel_concepts",
    "bigbench:logic_grid_puzzle",
    "bigbench:symbol_interpretation",
]
SPACES = ("params", "update")  # MBC's similarity spaces (quiver.transforms.mbc)


@dataclass(frozen=True)
class Budget:
    """How much of everything. Steps are per expert; cluster and shared experts see more
    tasks, so they get more steps. The defaults are the `medium` budget, the CPU one."""

    task_list: str = "default"  # a key of TASK_LISTS
    tasks: int = 6  # the first N tasks of the list
    private_steps: int = 60
    cluster_steps: int = 60
    shared_steps: int = 120
    clusters: int = 3
    held_out: int = 12  # the first N tasks of HELD_OUT
    limit: int = 200  # test examples per held-out task (0: all of them)
    select: int = 0  # selection examples per held-out task before the test ones (the oracle's)
    gate_steps: int = 10  # PHATGOOSE's gate training per expert
    batch: int = 8
    max_length: int = 256
    dtype: str = "fast"  # "fast": bf16 where the CPU has bf16 units, else fp32
    lr: float = 5e-4
    split: str = "all"  # the held-out tasks' split ("all": a seeded sample of every example)
    workers: int = 2  # trainings at once, each in a process of its own
    cpus_per_job: int = 1
    eval_workers: int = 2  # evaluations at once
    spaces: tuple[str, ...] = ("params",)  # an MBC library for each space
    random: bool = True  # a random-cluster library (MBC's sizes, random members)
    calibrate: bool = False  # content-free calibrated scoring as well
    methods: tuple[str, ...] | None = None  # the methods' labels (None: every one built)
    libraries: tuple[str, ...] | None = None  # the libraries to build (None: all)

    def __post_init__(self) -> None:
        if self.task_list not in TASK_LISTS:
            raise ValueError(f"task_list {self.task_list!r} is none of {sorted(TASK_LISTS)}")
        if not 0 < self.tasks <= len(TASK_LISTS[self.task_list]):
            raise ValueError(f"tasks {self.tasks}: the {self.task_list!r} list has "
                             f"{len(TASK_LISTS[self.task_list])}")
        if not 0 < self.held_out <= len(HELD_OUT):
            raise ValueError(f"held_out {self.held_out}: there are {len(HELD_OUT)}")
        if set(self.spaces) - set(SPACES):
            raise ValueError(f"spaces {self.spaces}: each one of {SPACES}")


BUDGETS = {
    "smoke": Budget(tasks=8, private_steps=16, cluster_steps=32, shared_steps=64, held_out=4,
                    limit=20, batch=4, max_length=160, dtype="bf16", lr=1e-3, split="test",
                    workers=1, eval_workers=1),
    "small": Budget(tasks=32, private_steps=12, cluster_steps=24, shared_steps=64, clusters=6,
                    held_out=8, limit=40, max_length=192, dtype="bf16", lr=1e-3, split="test",
                    workers=1, eval_workers=1),
    # medium: the CPU budget (2 cores, under 2 hours): 6 training tasks, lr 5e-4 and 256
    # tokens (the 4-expert trial, +4.4 over base at 60 steps, and the sweep of
    # benchmarks/budget_sweep.py, which never sees these held-out tasks); two trainings and
    # two evaluations at once at one thread each (1.55-1.8x faster than one with two threads,
    # results/train_throughput_parallel*.md); 12 held-out tasks x up to 200 of all their
    # examples (2,152 in all: issue 9 asks 2,000+; 150 gave 1,703). Timed at 814d4b9 on the
    # 2-core EPYC in one go: 1:52:36 (builds 47 min, evaluations 66).
    "medium": Budget(),
    # large: a library with something to route (issue 20): 24 private experts on short
    # tasks related in kind to the held-out ones, 128 tokens, MBC with K = 6 (about four
    # experts a cluster) on the flattened parameters (the paper's) and on the updates s B A;
    # held-out tasks scored on up to 100 examples each after a disjoint selection sample of
    # 30, on which the transfer matrix picks the oracle expert per task.
    "large": Budget(task_list="large", tasks=24, private_steps=60, cluster_steps=80,
                    shared_steps=160, clusters=6, limit=100, select=30, max_length=128,
                    spaces=SPACES, random=False, calibrate=True,
                    methods=("base", "shared", "uniform merge", "Arrow private", "Arrow MBC",
                             "Arrow MBC update", "uniform MBC", "uniform MBC update")),
    # gpu: what one lent H100/H200 does in a few minutes: 32 private experts (the large list
    # and 8 more), MBC with K = 8 on the updates, the six methods the headroom question
    # needs; trainings 6 at once, evaluations 4 at once on the one GPU.
    "gpu": Budget(task_list="gpu", tasks=32, private_steps=150, cluster_steps=300,
                  shared_steps=600, clusters=8, select=40, batch=16, dtype="auto",
                  workers=6, cpus_per_job=2, eval_workers=4, spaces=("update",), random=False,
                  calibrate=True, methods=("base", "shared", "uniform merge", "Arrow private",
                                           "Arrow MBC update")),
    "full": Budget(tasks=32, private_steps=200, cluster_steps=600, shared_steps=1600,
                   clusters=8, held_out=18, limit=250, gate_steps=100, batch=16, max_length=512,
                   dtype="auto", workers=4, cpus_per_job=3, eval_workers=4),
}


def methods(names: dict[str, list[str]], budget: Budget) -> list[dict]:
    """Each evaluated method: its label, quiver method, library and experts (the budget's
    `methods`, or every one whose library was built)."""
    private = names["private"]
    specs = [
        {"label": "base", "method": "base", "library": None, "experts": None},
        {"label": "shared", "method": "expert:shared", "library": "shared", "experts": None},
        {"label": "uniform merge", "method": "expert:uniform-merge", "library": "merges",
         "experts": None},
        {"label": "TIES", "method": "expert:ties-merge", "library": "merges", "experts": None},
        {"label": "Arrow private", "method": "arrow", "library": "private", "experts": private},
        {"label": "Arrow MBC", "method": "arrow", "library": "mbc", "experts": names.get("mbc")},
        {"label": "Arrow random", "method": "arrow", "library": "random",
         "experts": names.get("random")},
        {"label": "uniform MBC", "method": "uniform", "library": "mbc",
         "experts": names.get("mbc")},
        {"label": "Arrow MBC GenKnowSub", "method": "arrow", "library": "mbc",
         "experts": names.get("mbc"), "general": ["shared"]},
        {"label": "PHATGOOSE private", "method": "phatgoose", "library": "private",
         "experts": private},
        {"label": "centroid private", "method": "centroid", "library": "private",
         "experts": private},
        {"label": "Arrow MBC update", "method": "arrow", "library": "mbc-update",
         "experts": names.get("mbc-update")},
        {"label": "uniform MBC update", "method": "uniform", "library": "mbc-update",
         "experts": names.get("mbc-update")},
    ]
    chosen = budget.methods
    built = set(names) | {None, "merges"}
    return [spec for spec in specs if (spec["label"] in chosen if chosen else True)
            and spec["library"] in built and (spec["experts"] is not None or spec["library"]
                                              in (None, "merges", "shared"))]


def probes(names: dict[str, list[str]]) -> list[dict]:
    """Arrow's settings varied, to see why it wins or loses: fewer or all experts per token,
    a flatter softmax over the chosen ones."""
    specs = []
    for library in ("private", "mbc"):
        every = len(names[library])
        for top_k, temperature in ((1, 1.0), (2, 1.0), (every, 1.0), (4, 10.0)):
            specs.append({"label": f"Arrow {library} k={top_k} T={temperature:g}",
                          "method": "arrow", "library": library, "experts": names[library],
                          "top_k": top_k, "temperature": temperature})
    return specs


def train_tasks(budget: Budget) -> list[str]:
    return TASK_LISTS[budget.task_list][: budget.tasks]


def mbc_label(space: str) -> str:
    """The MBC library of a similarity space: `mbc` for the paper's (params), else
    `mbc-<space>`."""
    return "mbc" if space == "params" else f"mbc-{space}"


def cluster_labels(budget: Budget) -> dict[str, str | None]:
    """The clustered libraries the budget builds, each with its MBC similarity space: MBC on
    each space, then random clusters (None), less those `libraries` leaves out."""
    labels = {mbc_label(space): space for space in budget.spaces}
    if budget.random:
        labels["random"] = None
    wanted = budget.libraries
    return {label: space for label, space in labels.items() if wanted is None or label in wanted}


def clustered_libraries(budget: Budget) -> str:
    """The clustered libraries' names for the results text ("MBC and MBC-update")."""
    names = {"random": "random-cluster", "mbc": "MBC"}
    labels = [names.get(label, label.replace("mbc-", "MBC-")) for label in cluster_labels(budget)]
    return " and ".join(labels) or "no clustered"


def build_libraries(run: Path, budget: Budget, model_and_tokenizer
                    ) -> tuple[dict[str, list[str]], list[str]]:
    """Train (or find) the four libraries and the two merges; returns each one's experts, and
    the experts and merges this call made (none: everything was already there).

    The private library comes first (MBC and random clusters are computed from it); with
    `workers` in the budget, trainings run that many at once in processes of their own
    (on a GPU: SmolLM2-135M at batch 16 x 512 takes 6-15 GB per training, and eight of
    them overflowed an 80 GB H100)."""
    from concurrent.futures import ThreadPoolExecutor

    from quiver.build import BuildConfig, build_library
    from quiver.library import Library
    from quiver.merging import merge_experts
    from quiver.models import fingerprint, linear_module_shapes
    from quiver.training import TrainConfig

    tasks = train_tasks(budget)
    workers = budget.workers
    parallel = {"workers": workers, "cpus_per_job": budget.cpus_per_job}
    made = []  # appended from the shared expert's thread too: list.extend is atomic

    def build(label: str, config: BuildConfig, steps: int) -> list[str]:
        print(f"== building the {label} library", flush=True)
        train_config = TrainConfig(steps=steps, batch_size=budget.batch, lr=budget.lr,
                                   max_length=budget.max_length, eval_every=steps,
                                   eval_examples=32)
        report = build_library(tasks, str(run / label), "smollm2-135m", train_config,
                               config, private_url=private_url, dtype=budget.dtype,
                               show_progress=workers == 1)
        if report.failed:
            raise SystemExit(f"{label}: trainings failed: "
                             f"{[(o.name, o.error) for o in report.failed]}")
        made.extend(o.name for o in report.private + report.outcomes if o.status == "trained")
        print(f"== built the {label} library", flush=True)
        return [o.name for o in report.outcomes]

    private_url = str(run / "private")
    names = {"private": build("private", BuildConfig(strategy="private", **parallel),
                              budget.private_steps)}
    wanted = budget.libraries  # None: every library of the budget

    def asked(label: str) -> bool:
        return wanted is None or label in wanted

    clustered = {}
    for label, space in cluster_labels(budget).items():  # MBC on each space asked, random
        config = (BuildConfig(strategy="random", clusters=budget.clusters, **parallel)
                  if space is None else
                  BuildConfig(strategy="mbc", clusters=budget.clusters,
                              cluster_space=space, **parallel))
        clustered[label] = (config, budget.cluster_steps)
    shared = (BuildConfig(strategy="shared", **parallel), budget.shared_steps)
    # The shared expert is one long training: with workers, it runs beside the cluster
    # experts (workers + 1 trainings at once), which are built one library after the other.
    with ThreadPoolExecutor(1) as beside:
        parallel_shared = workers > 1 and asked("shared")
        shared_future = beside.submit(build, "shared", *shared) if parallel_shared else None
        for label, plan in clustered.items():
            names[label] = build(label, *plan)
        if shared_future:
            names["shared"] = shared_future.result()
        elif asked("shared"):
            names["shared"] = build("shared", *shared)

    mbc = Library(str(run / "mbc")) if "mbc" in names and "shared" in names else None
    if mbc is not None and "shared" not in mbc:  # GenKnowSub's general expert, beside MBC's
        mbc.add(Library(str(run / "shared")).get("shared"))
    merges = Library(str(run / "merges"), create=True)
    model = model_and_tokenizer[0]
    merges.ensure_base("smollm2-135m", fingerprint(model), linear_module_shapes(model))
    private = Library(private_url)
    chosen = budget.methods
    for method, name, label in (("uniform", "uniform-merge", "uniform merge"),
                                ("ties", "ties-merge", "TIES")):
        if name not in merges and (chosen is None or label in chosen):  # TIES takes minutes
            merged, _ = merge_experts(private.experts(names["private"]), method, name)
            merges.add(merged)
            made.append(name)
    return names, made


def evaluate_all(run: Path, budget: Budget, specs: list[dict], model_and_tokenizer) -> list[dict]:
    """Every method's report (cached in the run folder as it finishes). With `eval_workers`
    in the budget, methods are evaluated that many at once, each in a process of its own."""
    from quiver.workers import spawn_pool

    missing = slowest_first([spec for spec in specs if not _cache(run, budget, spec).exists()])
    workers = budget.eval_workers
    if workers > 1 and len(missing) > 1:
        threads = max(1, int(budget.cpus_per_job))  # workers x threads = cores
        with spawn_pool(workers, threads) as pool:
            for label in pool.map(evaluate_one, [run] * len(missing), [budget] * len(missing),
                                  missing):
                print(f"== evaluated {label}", flush=True)
    else:
        for spec in missing:
            evaluate_one(run, budget, spec, model_and_tokenizer)
    return [json.loads(_cache(run, budget, spec).read_text()) for spec in specs]


def slowest_first(specs: list[dict]) -> list[dict]:
    """The evaluations that take longest first, so that with several at once no long one
    runs alone at the end: PHATGOOSE trains its gates, then the routed methods (GenKnowSub
    routes one more expert), then a single adapter or the base model (medium, one thread:
    PHATGOOSE 1.5-2.5x, routed 1.15-1.4x a single adapter's time)."""
    def cost(spec: dict) -> float:
        routed = {"phatgoose": 3, "transfer": 4, "arrow": 1, "centroid": 1, "uniform": 1}
        return routed.get(spec["method"], 0) + 0.5 * bool(spec.get("general"))

    return sorted(specs, key=cost, reverse=True)  # stable: the table's order within a cost


def _eval_folder(run: Path, budget: Budget) -> Path:
    """Where the reports are cached: one folder per test sample (limit) and selection sample
    (select), so that a rerun with other sizes never reads reports of the old ones."""
    return run / "eval" / f"limit{budget.limit or 'all'}-select{budget.select}"


def _cache(run: Path, budget: Budget, spec: dict) -> Path:
    return _eval_folder(run, budget) / (spec["label"].replace(" ", "-") + ".json")


def evaluate_one(run: Path, budget: Budget, spec: dict, model_and_tokenizer=None) -> str:
    """Evaluate one method on the held-out tasks and cache its report; returns its label."""
    from quiver.evaluation import EvalConfig
    from quiver.recipes import evaluate_method

    held_out = HELD_OUT[: budget.held_out]
    print(f"== evaluating {spec['label']}", flush=True)
    started = time.perf_counter()
    library = str(run / spec["library"]) if spec["library"] else None
    cache = _cache(run, budget, spec)
    plot = cache.with_name(cache.stem + "-routing.png")
    routed = spec["method"] in ("arrow", "phatgoose", "centroid")
    cache.parent.mkdir(parents=True, exist_ok=True)
    config = EvalConfig(split=budget.split, limit=budget.limit,
                        skip=budget.select, calibrate=budget.calibrate)
    common = {"model_and_tokenizer": model_and_tokenizer, "dtype": budget.dtype,
              "show_progress": model_and_tokenizer is not None}
    if spec["method"] == "transfer":
        report = selection_transfer(run, budget, spec, model_and_tokenizer)
    elif spec["method"] == "per-task":  # the oracle: each task with the expert picked for it
        parts = {task: evaluate_method(f"expert:{name}", [task], library, "smollm2-135m",
                                       config, **common)
                 for task, name in spec["per_task"].items()}
        report = {"tasks": {t: part["tasks"][t] for t, part in parts.items()},
                  "average": {m: float(np.mean([part["average"][m] for part in parts.values()]))
                              for m in next(iter(parts.values()))["average"]},
                  "per_task": spec["per_task"]}
    else:
        report = evaluate_method(spec["method"], held_out, library, "smollm2-135m", config,
                                 experts=spec["experts"], top_k=spec.get("top_k"),
                                 temperature=spec.get("temperature", 1.0),
                                 gate_steps=budget.gate_steps, general=spec.get("general"),
                                 routing_plot=plot if routed else None, **common)
    report.update(label=spec["label"], seconds=round(time.perf_counter() - started, 1))
    write_json(cache, report)
    print(f"{spec['label']}: {report['average'].get('accuracy', 0):.1f}", flush=True)
    return spec["label"]


def selection_specs(names: dict[str, list[str]], workers: int, test: int = 0) -> list[dict]:
    """The transfer matrix on the selection sample, its rows cut into `workers` parts that
    run at once (each part also scores the base model: its row is cheap and checks that the
    parts agree). With `test`, the same matrix on the first `test` test examples instead
    (after the selection sample), to see whether the selection sample's ranking of the
    experts holds on other examples."""
    experts = names["private"]
    parts = max(1, workers)
    label = f"test transfer {test}" if test else "selection"
    return [{"label": f"{label} {i}", "method": "transfer", "library": "private",
             "experts": experts[i::parts], "test": test} for i in range(parts)]


def selection_transfer(run: Path, budget: Budget, spec: dict, model_and_tokenizer=None) -> dict:
    """Each private expert alone, and the base model, on the first `select` examples of every
    held-out task's `all` order: the selection sample. The methods are scored on the
    examples after it, so the oracle's choice never sees its test examples."""
    from quiver.data import load_task
    from quiver.evaluation.transfer import TransferConfig, transfer_matrix
    from quiver.library import Library
    from quiver.models import load_base

    model, tokenizer = model_and_tokenizer or load_base("smollm2-135m", dtype=budget.dtype)
    tasks = [load_task(t) for t in HELD_OUT[: budget.held_out]]
    skip, limit = ((budget.select, spec["test"]) if spec.get("test") else
                   (0, budget.select))
    config = TransferConfig(metric="accuracy", split="all", skip=skip, limit=limit,
                            batch_size=8)
    report = transfer_matrix(model, tokenizer, Library(str(run / "private")), tasks,
                             spec["experts"], config, show_progress=False)
    report["chance"] = {t.name: float(np.mean([1 / len(e.options)
                                               for e in t.split("all")[skip: skip + limit]]))
                        for t in tasks}
    report["average"] = {}
    return report


def oracle_spec(selection: dict) -> dict:
    """The oracle: for each held-out task, the private expert with the best selection-sample
    accuracy (ties: the first in name order)."""
    values = {row: v for row, v in selection["values"].items() if row != "base"}
    per_task = {task: max(sorted(values), key=lambda row: values[row][task])
                for task in selection["tasks"]}
    return {"label": "oracle", "method": "per-task", "library": "private", "experts": None,
            "per_task": per_task}


def merge_selection(parts: list[dict]) -> dict:
    """The parts of the selection transfer matrix as one (rows in the parts' order)."""
    merged = dict(parts[0])
    merged["values"] = {row: v for part in parts for row, v in part["values"].items()}
    return merged


def expert_similarity(run: Path, names: list[str]) -> dict:
    """How far the private experts moved apart: the range of cosine similarities between
    their parameter vectors (all A and B, and B alone: every A starts from the same seeded
    init, B from zero, so B shows what training put in)."""
    from quiver.library import Library

    library = Library(str(run / "private"))
    every, b_only = [], []
    for expert in library.experts(names):
        factors = expert.lora_factors()
        modules = sorted(factors)
        every.append(torch.cat([t.flatten().float() for m in modules for t in factors[m]]))
        b_only.append(torch.cat([factors[m][1].flatten().float() for m in modules]))
        expert.drop_weights()
    result = {}
    for label, vectors in (("all", every), ("B", b_only)):
        unit = torch.nn.functional.normalize(torch.stack(vectors), dim=1)
        cosine = unit @ unit.T
        off = cosine[~torch.eye(len(vectors), dtype=torch.bool)]
        result[label] = {"min": float(off.min()), "median": float(off.median()),
                         "max": float(off.max())}
    return result


# ----------------------------------------------------------------------------- statistics
def summarise(reports: list[dict]) -> dict:
    """Each method's average and per-task accuracy with bootstrap intervals, the target
    (Arrow over MBC, or the best routed library there is) against the baselines, and every
    method against the base model, paired."""
    per_task = [stats.per_example(r) for r in reports]
    samples = stats.bootstrap_average(per_task, scale=100)  # hit rates in %
    labels = [r["label"] for r in reports]
    summary = {"methods": {}, "paired": {}}
    for m, label in enumerate(labels):
        task_ci = {}
        for task, values in per_task[m].items():
            one = stats.bootstrap_average([{task: values}], seed=m, scale=100)[:, 0]
            task_ci[task] = interval(one)
        summary["methods"][label] = {
            "average": reports[m]["average"]["accuracy"],
            "ci": interval(samples[:, m]),
            "tasks": {t: reports[m]["tasks"][t]["accuracy"] for t in per_task[m]},
            "task_ci": task_ci,
            "seconds": reports[m].get("seconds"),
        }
    target = next(labels.index(x) for x in ("Arrow MBC", "Arrow MBC update", "Arrow private")
                  if x in labels)
    target_label = labels[target]
    summary["target"] = target_label
    for other in [x for x in ("base", "uniform merge", "shared", "Arrow private")
                  if x in labels and x != target_label]:
        diff = samples[:, target] - samples[:, labels.index(other)]
        summary["paired"][other] = {"difference": float(diff.mean()), "ci": interval(diff)}
    summary["versus_base"] = {}
    for m, label in enumerate(labels):
        diff = samples[:, m] - samples[:, labels.index("base")]
        summary["versus_base"][label] = {"difference": float(diff.mean()), "ci": interval(diff)}
    return summary


# ---------------------------------------------------------------------------------- output
def write(args, budget: Budget, reports: list[dict], summary: dict, clusters: dict,
          timings: dict, record: dict, extra=(), similarity=None) -> None:
    """results/zero_shot_<budget>.{json,md,png}; `record` is the run's provenance."""
    stem = args.results / f"zero_shot_{args.budget}"
    slim = [{k: v for k, v in r.items() if k not in ("routing",)} for r in reports]
    write_json(stem.with_suffix(".json"), {
        **record, "budget": dataclasses.asdict(budget), "train_tasks": train_tasks(budget),
        "held_out": HELD_OUT[: budget.held_out], "clusters": clusters, "timings_s": timings,
        "similarity": similarity, "summary": summary, "reports": slim}, indent=1)
    _plot(summary, stem.with_suffix(".png"), args.budget)

    labels = list(summary["methods"])
    tasks = list(reports[0]["tasks"])
    n = {t: reports[0]["tasks"][t]["examples"] for t in tasks}
    lines = [
        f"# Zero-shot reuse on held-out BIG-bench Lite tasks, budget `{args.budget}`", "",
        provenance_line(record),
        f"{timings['build'] / 60:.0f} min to build the libraries (summed over the runs that "
        f"built them), {timings['evaluate'] / 60:.0f} min to evaluate (summed likewise). "
        f"Plot: [`{stem.name}.png`]({stem.name}.png).", "",
        f"SmolLM2-135M-Instruct ({budget.dtype}), LoRA r=4 on all linear layers. "
        f"{budget.tasks} training tasks; private experts {budget.private_steps} steps, "
        f"{clustered_libraries(budget)} experts ({budget.clusters} clusters) "
        f"{budget.cluster_steps} steps, the shared expert {budget.shared_steps} steps "
        f"(batch {budget.batch}, lr {budget.lr:g}, at most {budget.max_length} "
        f"tokens). Held out: {len(tasks)} BIG-bench Lite multiple-choice tasks, "
        f"{sum(n.values())} examples: at most {budget.limit or 'all'} per task from its "
        f"`{budget.split}` split (a seeded sample); accuracy (%) by log-likelihood. "
        "Intervals: 95% bootstrap, examples resampled within tasks.", "",
        "| method | average | 95% interval | " + " | ".join(
            t.removeprefix("bigbench:") + f" (n={n[t]})" for t in tasks) + " |",
        "|---|---:|---:|" + "---:|" * len(tasks),
    ]
    for label in labels:
        m = summary["methods"][label]
        cells = [f"{m['tasks'][t]:.1f}" for t in tasks]
        lines.append(f"| {label} | **{m['average']:.1f}** | {m['ci'][0]:.1f} to "
                     f"{m['ci'][1]:.1f} | " + " | ".join(cells) + " |")
    lines += ["", f"{summary.get('target', 'Arrow MBC')} minus each baseline (paired bootstrap, "
              "same examples):", "",
              "| against | difference | 95% interval |", "|---|---:|---:|"]
    for other, d in summary["paired"].items():
        lines.append(f"| {other} | {d['difference']:+.1f} | {d['ci'][0]:+.1f} to "
                     f"{d['ci'][1]:+.1f} |")
    lines += ["", "Each method minus the base model (paired bootstrap):", "",
              "| method | difference | 95% interval |", "|---|---:|---:|"]
    for label, d in summary["versus_base"].items():
        if label != "base":
            lines.append(f"| {label} | {d['difference']:+.1f} | {d['ci'][0]:+.1f} to "
                         f"{d['ci'][1]:+.1f} |")
    if similarity:
        lines += ["", "How far the private experts moved apart (cosine similarity between "
                  "experts' parameter vectors, off the diagonal):", "",
                  "| parameters | min | median | max |", "|---|---:|---:|---:|"]
        lines += [f"| {label} | {v['min']:.3f} | {v['median']:.3f} | {v['max']:.3f} |"
                  for label, v in similarity.items()]
    if extra:
        lines += ["", "Arrow probes (the same held-out examples; k experts per token, softmax "
                  "temperature T):", "", "| setting | average | " + " | ".join(
                      t.removeprefix("bigbench:") for t in tasks) + " |",
                  "|---|---:|" + "---:|" * len(tasks)]
        for r in extra:
            lines.append(f"| {r['label']} | {r['average']['accuracy']:.1f} | " + " | ".join(
                f"{r['tasks'][t]['accuracy']:.1f}" for t in tasks) + " |")
    routing = routing_concentration(reports)
    if routing:
        lines += ["", "How concentrated Arrow's choices are (share of all choices that went "
                  "to each layer's most chosen expert, averaged over layers; 1/E if "
                  "uniform):", "", "| method | experts | top expert's share | 1/E |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {label} | {n} | {share:.2f} | {1 / n:.2f} |"
                  for label, (n, share) in routing.items()]
    lines += ["", "MBC clusters:", ""]
    lines += [f"- {name}: {', '.join(members)}" for name, members in clusters.items()]
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def routing_concentration(reports: list[dict]) -> dict[str, tuple[int, float]]:
    """Per routed method: (experts, mean over layers of the top expert's share of choices)."""
    result = {}
    for r in reports:
        layers = [counts for counts in r.get("routing", {}).values() if sum(counts)]
        if layers:
            shares = [max(counts) / sum(counts) for counts in layers]
            result[r["label"]] = (len(r["experts"]), sum(shares) / len(shares))
    return result


def _plot(summary: dict, path: Path, budget: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary["methods"])
    means = [summary["methods"][m]["average"] for m in labels]
    low = [mean - summary["methods"][m]["ci"][0] for m, mean in zip(labels, means, strict=True)]
    high = [summary["methods"][m]["ci"][1] - mean for m, mean in zip(labels, means, strict=True)]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    colours = ["#888888" if m in ("base",) else "#1f77b4" if "Arrow" in m else "#ff7f0e"
               for m in labels]
    axes.bar(range(len(labels)), means, yerr=[low, high], capsize=4, color=colours)
    axes.axhline(means[labels.index("base")], color="#444444", linestyle="--", linewidth=1)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_ylabel("average accuracy on held-out tasks (%)")
    axes.set_title(f"Zero-shot reuse, budget {budget} (95% bootstrap intervals)")
    axes.set_ylim(max(0, min(means) - 15), min(100, max(means) + 15))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget_options(parser, BUDGETS, "smoke",
                       "private_steps=100 calibrate=false spaces=params,update")
    parser.add_argument("--run", help="run folder (default runs/zero-shot-<budget>)")
    parser.add_argument("--test-transfer", type=int, default=0, metavar="N",
                        help="with a selection sample: also score every private expert on the "
                             "first N test examples, and report how well the selection "
                             "sample's ranking of the experts predicts theirs")
    parser.add_argument("--probes", action="store_true",
                        help="also evaluate Arrow with other top-k and temperatures")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for the tables and plots (default benchmarks/results)")
    parser.add_argument("--libraries", help="comma-separated libraries to build and use "
                        "(private and the merges always; default: all of the budget's)")
    parser.add_argument("--build-only", action="store_true",
                        help="build (or finish) the libraries and stop")
    return parser


def budget_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Budget:
    """The chosen budget with its `--set` and `--libraries` overrides; dtype "fast" resolved
    on this machine."""
    settings = list(args.set)
    if args.libraries:
        settings.append(("libraries", tuple(args.libraries.split(","))))
    budget = with_settings(parser, BUDGETS[args.budget], settings)
    if budget.dtype == "fast":  # bf16 only where the CPU computes it fast
        budget = dataclasses.replace(budget, dtype=fast_cpu_dtype())
    return budget


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    budget = budget_of(parser, args)
    run = Path(args.run or f"runs/zero-shot-{args.budget}").absolute()

    from quiver.library import Library
    from quiver.models import load_base

    model_and_tokenizer = load_base("smollm2-135m", dtype=budget.dtype)
    started = time.perf_counter()
    names, made = build_libraries(run, budget, model_and_tokenizer)
    built = time.perf_counter()
    build_record = run / "build_time.json"  # a run that only found its libraries adds nothing
    build_total = (record_time(build_record, built - started, {"libraries": sorted(names),
                                                               "made": len(made)})
                   if made else recorded_time(build_record))
    print(f"== libraries built in {(built - started) / 60:.1f} min "
          f"({build_total / 60:.1f} min in all runs into {run})", flush=True)
    if args.build_only:
        return
    specs = methods(names, budget)
    selection = None
    if budget.select:  # the transfer matrix first: it picks the oracle's experts
        parts = evaluate_all(run, budget, selection_specs(names, budget.eval_workers),
                             model_and_tokenizer)
        selection = merge_selection(parts)
        specs.append(oracle_spec(selection))
    reports = evaluate_all(run, budget, specs, model_and_tokenizer)
    evaluated = time.perf_counter() - built
    timings = {"build": build_total, "build_this_run": built - started,
               "evaluate": record_time(_eval_folder(run, budget) / "evaluate_time.json",
                                       evaluated, {"methods": [spec["label"] for spec in specs]}),
               "evaluate_this_run": evaluated}
    extra = evaluate_all(run, budget, probes(names), model_and_tokenizer) if args.probes else []
    test_transfer = None
    if selection is not None and args.test_transfer:  # does the selection's ranking hold?
        test_transfer = merge_selection(evaluate_all(
            run, budget, selection_specs(names, budget.eval_workers,
                                         args.test_transfer), model_and_tokenizer))
    first_mbc = next((label for label in names if label.startswith("mbc")), None)
    clusters = (Library(str(run / first_mbc)).get_clusters("mbc") or ({}, {}))[0] \
        if first_mbc else {}
    similarity = expert_similarity(run, names["private"])
    record = provenance()
    write(args, budget, reports, summarise(reports), clusters, timings, record, extra,
          similarity)
    if selection is not None:
        write_analysis(args.results / f"zero_shot_{args.budget}", run, budget, names, reports,
                       selection, record, test_transfer)


if __name__ == "__main__":
    main()
