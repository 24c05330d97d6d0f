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

Usage: .venv/bin/python benchmarks/zero_shot.py --budget smoke|small|medium|full
Writes benchmarks/results/zero_shot_<budget>.{json,md,png}; evaluations are cached in the run
folder (runs/zero-shot-<budget>/), so a re-run only evaluates what is missing. `medium` is the
CPU budget (1 h 53 min on the 2-core EPYC); `full` is for a GPU, where trainings and evaluations
run several at once in processes of their own (`workers`, `eval_workers`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import stats  # noqa: E402
from stats import BOOTSTRAP, interval  # noqa: E402
from train_throughput import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
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
              "gpu": LARGE_TRAIN_TASKS + GPU_EXTRA_TASKS}
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
BUDGETS = {  # steps are per expert; cluster and shared experts see more tasks, so more steps
    "smoke": {"tasks": 8, "private_steps": 16, "cluster_steps": 32, "shared_steps": 64,
              "clusters": 3, "held_out": 4, "limit": 20, "gate_steps": 10, "batch": 4,
              "max_length": 160, "dtype": "bf16", "lr": 1e-3, "split": "test"},
    "small": {"tasks": 32, "private_steps": 12, "cluster_steps": 24, "shared_steps": 64,
              "clusters": 6, "held_out": 8, "limit": 40, "gate_steps": 10, "batch": 8,
              "max_length": 192, "dtype": "bf16", "lr": 1e-3, "split": "test"},
    # medium: the CPU budget (2 cores, under 2 hours): 6 training tasks, lr 5e-4 and 256
    # tokens (the 4-expert trial, +4.4 over base at 60 steps, and the sweep of
    # benchmarks/budget_sweep.py, which never sees these held-out tasks); two trainings and
    # two evaluations at once at one thread each (1.55-1.8x faster than one with two threads,
    # results/train_throughput_parallel*.md); 12 held-out tasks x up to 200 of all their
    # examples (2,152 in all: issue 9 asks 2,000+; 150 gave 1,703). Timed at 814d4b9 on the
    # 2-core EPYC in one go: 1:52:36 (builds 47 min, evaluations 66; benchmarks/README).
    "medium": {"tasks": 6, "private_steps": 60, "cluster_steps": 60, "shared_steps": 120,
               "clusters": 3, "held_out": 12, "limit": 200, "gate_steps": 10, "batch": 8,
               "max_length": 256, "dtype": "fast", "lr": 5e-4, "split": "all",
               "workers": 2, "cpus_per_job": 1, "eval_workers": 2},
    # large: a library with something to route (issue 20): 24 private experts on short
    # tasks related in kind to the held-out ones, 128 tokens, MBC with K = 6 (about four
    # experts a cluster) on the flattened parameters (the paper's) and on the updates s B A;
    # held-out tasks scored on up to 100 examples each after a disjoint selection sample of
    # 30, on which the transfer matrix picks the oracle expert per task.
    "large": {"task_list": "large", "tasks": 24, "private_steps": 60, "cluster_steps": 80,
              "shared_steps": 160, "clusters": 6, "held_out": 12, "limit": 100, "select": 30,
              "gate_steps": 10, "batch": 8, "max_length": 128, "dtype": "fast", "lr": 5e-4,
              "split": "all", "workers": 2, "cpus_per_job": 1, "eval_workers": 2,
              "spaces": ["params", "update"], "random": False, "calibrate": True,
              "methods": ["base", "shared", "uniform merge", "Arrow private", "Arrow MBC",
                          "Arrow MBC update", "uniform MBC", "uniform MBC update"]},
    # gpu: what one lent H100/H200 does in benchmarks/gpu.sh's few minutes: 32 private
    # experts (the large list and 8 more), MBC with K = 8 on the updates, the six methods the
    # headroom question needs; trainings 6 at once, evaluations 4 at once on the one GPU.
    "gpu": {"task_list": "gpu", "tasks": 32, "private_steps": 150, "cluster_steps": 300,
            "shared_steps": 600, "clusters": 8, "held_out": 12, "limit": 200, "select": 40,
            "gate_steps": 10, "batch": 16, "max_length": 256, "dtype": "auto", "lr": 5e-4,
            "split": "all", "workers": 6, "cpus_per_job": 2, "eval_workers": 4,
            "spaces": ["update"], "random": False, "calibrate": True,
            "methods": ["base", "shared", "uniform merge", "Arrow private", "Arrow MBC update"]},
    "full": {"tasks": 32, "private_steps": 200, "cluster_steps": 600, "shared_steps": 1600,
             "clusters": 8, "held_out": 18, "limit": 250, "gate_steps": 100, "batch": 16,
             "max_length": 512, "dtype": "auto", "lr": 5e-4, "split": "all",
             "workers": 4, "cpus_per_job": 3, "eval_workers": 4},
}


def methods(names: dict[str, list[str]], budget: dict) -> list[dict]:
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
    chosen = budget.get("methods")
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


def train_tasks(budget: dict) -> list[str]:
    return TASK_LISTS[budget.get("task_list", "default")][: budget["tasks"]]


def mbc_label(space: str) -> str:
    """The MBC library of a similarity space: `mbc` for the paper's (params), else
    `mbc-<space>`."""
    return "mbc" if space == "params" else f"mbc-{space}"


def cluster_labels(budget: dict) -> dict[str, str | None]:
    """The clustered libraries the budget builds, each with its MBC similarity space: MBC on
    each space, then random clusters (None), less those `libraries` leaves out."""
    labels = {mbc_label(space): space for space in budget.get("spaces", ["params"])}
    if budget.get("random", True):
        labels["random"] = None
    wanted = budget.get("libraries")
    return {label: space for label, space in labels.items() if wanted is None or label in wanted}


def clustered_libraries(budget: dict) -> str:
    """The clustered libraries' names for the results text ("MBC and MBC-update")."""
    names = {"random": "random-cluster", "mbc": "MBC"}
    labels = [names.get(label, label.replace("mbc-", "MBC-")) for label in cluster_labels(budget)]
    return " and ".join(labels) or "no clustered"


def build_libraries(run: Path, budget: dict, model_and_tokenizer
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
    workers = budget.get("workers", 1)
    parallel = {"workers": workers, "cpus_per_job": budget.get("cpus_per_job", 1)}
    made = []  # appended from the shared expert's thread too: list.extend is atomic

    def build(label: str, config: BuildConfig, steps: int) -> list[str]:
        print(f"== building the {label} library", flush=True)
        train_config = TrainConfig(steps=steps, batch_size=budget["batch"], lr=budget["lr"],
                                   max_length=budget["max_length"], eval_every=steps,
                                   eval_examples=32)
        report = build_library(tasks, str(run / label), "smollm2-135m", train_config,
                               config, private_url=private_url, dtype=budget["dtype"],
                               show_progress=workers == 1)
        if report.failed:
            raise SystemExit(f"{label}: trainings failed: "
                             f"{[(o.name, o.error) for o in report.failed]}")
        made.extend(o.name for o in report.private + report.outcomes if o.status == "trained")
        print(f"== built the {label} library", flush=True)
        return [o.name for o in report.outcomes]

    private_url = str(run / "private")
    names = {"private": build("private", BuildConfig(strategy="private", **parallel),
                              budget["private_steps"])}
    wanted = budget.get("libraries")  # None: every library of the budget

    def asked(label: str) -> bool:
        return wanted is None or label in wanted

    clustered = {}
    for label, space in cluster_labels(budget).items():  # MBC on each space asked, random
        config = (BuildConfig(strategy="random", clusters=budget["clusters"], **parallel)
                  if space is None else
                  BuildConfig(strategy="mbc", clusters=budget["clusters"],
                              cluster_space=space, **parallel))
        clustered[label] = (config, budget["cluster_steps"])
    shared = (BuildConfig(strategy="shared", **parallel), budget["shared_steps"])
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
    chosen = budget.get("methods")
    for method, name, label in (("uniform", "uniform-merge", "uniform merge"),
                                ("ties", "ties-merge", "TIES")):
        if name not in merges and (chosen is None or label in chosen):  # TIES takes minutes
            merged, _ = merge_experts(private.experts(names["private"]), method, name)
            merges.add(merged)
            made.append(name)
    return names, made


def evaluate_all(run: Path, budget: dict, specs: list[dict], model_and_tokenizer) -> list[dict]:
    """Every method's report (cached in the run folder as it finishes). With `eval_workers`
    in the budget, methods are evaluated that many at once, each in a process of its own."""
    from quiver.workers import spawn_pool

    missing = slowest_first([spec for spec in specs if not _cache(run, budget, spec).exists()])
    workers = budget.get("eval_workers", 1)
    if workers > 1 and len(missing) > 1:
        threads = max(1, int(budget.get("cpus_per_job", 1)))  # workers x threads = cores
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


def _eval_folder(run: Path, budget: dict) -> Path:
    """Where the reports are cached: one folder per test sample (limit) and selection sample
    (select), so that a rerun with other sizes never reads reports of the old ones."""
    return run / "eval" / f"limit{budget['limit'] or 'all'}-select{budget.get('select', 0)}"


def _cache(run: Path, budget: dict, spec: dict) -> Path:
    return _eval_folder(run, budget) / (spec["label"].replace(" ", "-") + ".json")


def write_json(path: Path, record: dict, indent: int | None = None) -> None:
    """Write `record` to `path` atomically: a run stopped midway never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(record, indent=indent))
    staging.replace(path)


def recorded_time(record_path: Path) -> float:
    """The total of a `record_time` record (0 when there is none yet)."""
    return json.loads(record_path.read_text())["total_seconds"] if record_path.exists() else 0.0


def record_time(record_path: Path, seconds: float, detail: dict) -> float:
    """Add one invocation's wall time to a JSON record and return the total over all of them.

    Library builds resume across runs (and `--build-only` splits the build from the
    evaluation), and cached evaluations are not redone, so the time a folder took is the sum
    over every invocation that worked on it, not the last one's."""
    record = json.loads(record_path.read_text()) if record_path.exists() else {"runs": []}
    record["runs"].append({"seconds": round(seconds, 1), **detail,
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    record["total_seconds"] = round(sum(r["seconds"] for r in record["runs"]), 1)
    write_json(record_path, record, indent=1)
    return record["total_seconds"]


def evaluate_one(run: Path, budget: dict, spec: dict, model_and_tokenizer=None) -> str:
    """Evaluate one method on the held-out tasks and cache its report; returns its label."""
    from quiver.evaluation import EvalConfig
    from quiver.recipes import evaluate_method

    held_out = HELD_OUT[: budget["held_out"]]
    print(f"== evaluating {spec['label']}", flush=True)
    started = time.perf_counter()
    library = str(run / spec["library"]) if spec["library"] else None
    cache = _cache(run, budget, spec)
    plot = cache.with_name(cache.stem + "-routing.png")
    routed = spec["method"] in ("arrow", "phatgoose", "centroid")
    cache.parent.mkdir(parents=True, exist_ok=True)
    config = EvalConfig(split=budget["split"], limit=budget["limit"],
                        skip=budget.get("select", 0), calibrate=budget.get("calibrate", False))
    common = {"model_and_tokenizer": model_and_tokenizer, "dtype": budget["dtype"],
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
                                 gate_steps=budget["gate_steps"], general=spec.get("general"),
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


def selection_transfer(run: Path, budget: dict, spec: dict, model_and_tokenizer=None) -> dict:
    """Each private expert alone, and the base model, on the first `select` examples of every
    held-out task's `all` order: the selection sample. The methods are scored on the
    examples after it, so the oracle's choice never sees its test examples."""
    from quiver.data import load_task
    from quiver.evaluation.transfer import TransferConfig, transfer_matrix
    from quiver.library import Library
    from quiver.models import load_base

    model, tokenizer = model_and_tokenizer or load_base("smollm2-135m", dtype=budget["dtype"])
    tasks = [load_task(t) for t in HELD_OUT[: budget["held_out"]]]
    skip, limit = ((budget["select"], spec["test"]) if spec.get("test") else
                   (0, budget["select"]))
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
def hits(report: dict) -> dict[str, np.ndarray]:
    return {task: np.asarray(r["per_example"]["accuracy"]) for task, r in
            report["tasks"].items()}


def bootstrap_average(per_task: list[dict[str, np.ndarray]], seed: int = 0) -> np.ndarray:
    """(B, len(per_task)) bootstrap averages over tasks of the mean hit rate (in %), with the
    same resampled examples for every method (so differences are paired): stats.py's."""
    return 100 * stats.bootstrap_average(per_task, seed=seed, draws=BOOTSTRAP)


def summarise(reports: list[dict]) -> dict:
    per_task = [hits(r) for r in reports]
    samples = bootstrap_average(per_task)
    labels = [r["label"] for r in reports]
    summary = {"methods": {}, "paired": {}}
    for m, label in enumerate(labels):
        task_ci = {}
        for task, values in per_task[m].items():
            one = bootstrap_average([{task: values}], seed=m)[:, 0]
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


def fast_cpu_dtype() -> str:
    """bf16 where the CPU has bf16 units (AVX-512 BF16 or AMX: about 2.7x faster training
    here), else fp32: without them a bf16 matmul runs about 8x slower than fp32 (measured on
    an AVX2-only EPYC). On a GPU, "auto" (bf16)."""
    if torch.cuda.is_available():
        return "auto"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def machine_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA), {cpu_name()}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------- output
def write(args, budget, reports, summary, clusters, timings, extra=(), similarity=None) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    machine = machine_name()
    command = "python benchmarks/zero_shot.py " + " ".join(sys.argv[1:])
    stem = args.results / f"zero_shot_{args.budget}"
    args.results.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k not in ("routing",)} for r in reports]
    stem.with_suffix(".json").write_text(json.dumps(
        {"command": command, "commit": commit, "machine": machine, "budget": budget,
         "train_tasks": train_tasks(budget),
         "held_out": HELD_OUT[: budget["held_out"]], "clusters": clusters,
         "timings_s": timings, "similarity": similarity, "summary": summary,
         "reports": slim}, indent=1))
    _plot(summary, stem.with_suffix(".png"), args.budget)

    labels = list(summary["methods"])
    tasks = list(reports[0]["tasks"])
    n = {t: reports[0]["tasks"][t]["examples"] for t in tasks}
    lines = [
        f"# Zero-shot reuse on held-out BIG-bench Lite tasks, budget `{args.budget}`", "",
        f"`{command}` at commit `{commit}`, {machine}, torch {torch.__version__}; "
        f"{timings['build'] / 60:.0f} min to build the libraries (summed over the runs that "
        f"built them), {timings['evaluate'] / 60:.0f} min to evaluate (summed likewise).", "",
        f"SmolLM2-135M-Instruct ({budget['dtype']}), LoRA r=4 on all linear layers. "
        f"{budget['tasks']} training tasks; private experts {budget['private_steps']} steps, "
        f"{clustered_libraries(budget)} experts ({budget['clusters']} clusters) "
        f"{budget['cluster_steps']} steps, the shared expert {budget['shared_steps']} steps "
        f"(batch {budget['batch']}, lr {budget['lr']:g}, at most {budget['max_length']} "
        f"tokens). Held out: {len(tasks)} BIG-bench Lite multiple-choice tasks, "
        f"{sum(n.values())} examples: at most {budget['limit'] or 'all'} per task from its "
        f"`{budget['split']}` split (a seeded sample); accuracy (%) by log-likelihood. "
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
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
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
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override budget entries, e.g. --set private_steps=100 workers=4")
    args = parser.parse_args()
    budget = dict(BUDGETS[args.budget])
    if budget["dtype"] == "fast":  # bf16 only where the CPU computes it fast
        budget["dtype"] = fast_cpu_dtype()
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in budget and key not in ("workers", "cpus_per_job", "eval_workers"):
            raise SystemExit(f"unknown budget entry {key!r}: {sorted(budget)}")
        budget[key] = type(budget.get(key, 1))(value)
    run = Path(args.run or f"runs/zero-shot-{args.budget}").absolute()
    if args.libraries:
        budget["libraries"] = args.libraries.split(",")

    from quiver.library import Library
    from quiver.models import load_base

    model_and_tokenizer = load_base("smollm2-135m", dtype=budget["dtype"])
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
    if budget.get("select"):  # the transfer matrix first: it picks the oracle's experts
        parts = evaluate_all(run, budget, selection_specs(names, budget.get("eval_workers", 1)),
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
            run, budget, selection_specs(names, budget.get("eval_workers", 1),
                                         args.test_transfer), model_and_tokenizer))
    first_mbc = next((label for label in names if label.startswith("mbc")), None)
    clusters = (Library(str(run / first_mbc)).get_clusters("mbc") or ({}, {}))[0] \
        if first_mbc else {}
    similarity = expert_similarity(run, names["private"])
    write(args, budget, reports, summarise(reports), clusters, timings, extra, similarity)
    if selection is not None:
        from zero_shot_analysis import write_analysis

        write_analysis(args.results / f"zero_shot_{args.budget}", run, budget, names, reports,
                       selection, test_transfer)


if __name__ == "__main__":
    main()
