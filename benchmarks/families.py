"""What a library buys on tasks with relatives: the paper's comparison on reasoning-gym
families (issue 30), the gym counterpart of benchmarks/zero_shot.py.

1. Libraries from the training tasks of benchmarks/gym_lists.py (24 gym tasks in 7 of
   reasoning-gym's categories), built with benchmarks.zero_shot's build_libraries
   (resumable): private (an
   expert per task), MBC on the flattened parameters and on the updates s B A, shared (one
   expert on every task), and the uniform merge of the private experts.
2. Own-task gains: each private expert against the base model on its own task's test
   examples (the package's score and the answer log-likelihood); experts that learned
   nothing are listed.
3. Held-out tasks (relatives by setting, relatives by family, strangers; gym_lists.py, fixed
   before any evaluation): each method on the examples after a selection sample of each
   task's `all` order. The oracle is, per task, the private expert with the lowest answer
   loss on the selection sample (teacher-forced, no generation), scored on the test examples.
4. Per task and averaged over each group and over all: score (the package's), exact match and
   answer log-likelihood, with paired 95% bootstrap intervals against the uniform merge, and
   the headroom (oracle minus uniform merge).
5. MBC against the families: adjusted Rand index of each space's clusters with the
   categories, against random clusterings of the same sizes; heatmaps ordered by category.
6. Routing against the families: for each held-out relative, the share of Arrow's (and
   SpectR's) routing weight on experts of its family, per layer and overall, against the
   family's share of the library.

Usage: .venv/bin/python -m benchmarks.families --budget smoke|cpu|gpu [--build-only]
       [--set KEY=VALUE ...] [--report-only]
Writes benchmarks/results/families_<budget>.{json,md} and plots; every evaluation is cached in
the run folder (runs/families-<budget>/), so a stopped run resumes where it was, and a rerun
over a finished run folder only rewrites the results. `--report-only` rewrites the Markdown
and the bar plot from the results JSON alone (no model, no run folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import gym_lists, report_families, stats, zero_shot
from benchmarks.common import (
    RESULTS,
    add_budget_options,
    provenance,
    record_time,
    with_settings,
    write_json,
    write_text,
)

METRICS = ("score", "exact_match", "answer_loglik")


@dataclass(frozen=True)
class Budget:
    """How much of everything: the libraries' training and the evaluation's sample sizes."""

    train: int = 24  # the first N training tasks of gym_lists.TRAIN
    held_out: int = 4  # the first N tasks of each held-out group
    # 60 steps at lr 1e-3: results/gym_sweep.md, 8 training tasks of 6 families, where every
    # expert learned its task and most of the validation loss fell by step 60 (at batch 8).
    # Batch 4 and these sample sizes are to fit the whole budget in two hours on 2 cores
    # (batch 8 with 120- and 240-step cluster and shared experts: about 4 hours at the pace of
    # the first experts); the own-task table says whether the experts still learned.
    private_steps: int = 60
    cluster_steps: int = 60
    shared_steps: int = 120
    clusters: int = 6
    lr: float = 1e-3
    batch: int = 4
    max_length: int = 192
    dtype: str = "fp32"
    select: int = 16  # selection examples per held-out task (the oracle's choice)
    limit: int = 40  # test examples per held-out task, after the selection sample
    own_limit: int = 30  # test examples of each training task (own-task gains)
    gate_steps: int = 10  # PHATGOOSE's gate training per expert
    workers: int = 2  # trainings at once
    cpus_per_job: int = 1


BUDGETS = {
    "smoke": Budget(train=6, held_out=1, private_steps=4, cluster_steps=4, shared_steps=4,
                    clusters=2, select=4, limit=6, own_limit=4, gate_steps=2),
    "cpu": Budget(),
    "gpu": Budget(private_steps=300, cluster_steps=600, shared_steps=1200, batch=16,
                  dtype="auto", select=40, limit=200, own_limit=100, gate_steps=100,
                  workers=6, cpus_per_job=2),
}
METHODS = [  # label, quiver method, library, whose experts
    ("base", "base", None, None),
    ("shared", "expert:shared", "shared", None),
    ("uniform merge", "expert:uniform-merge", "merges", None),
    ("Arrow private", "arrow", "private", "private"),
    ("SpectR private", "spectr", "private", "private"),
    ("Arrow MBC", "arrow", "mbc", "mbc"),
    ("Arrow MBC update", "arrow", "mbc-update", "mbc-update"),
    ("uniform MBC", "uniform", "mbc", "mbc"),
    ("PHATGOOSE private", "phatgoose", "private", "private"),
]
ROUTED = ("arrow", "spectr")  # whose routing weight is recorded per task


def held_out(budget: Budget) -> list[str]:
    n = budget.held_out
    return (gym_lists.RELATIVES_BY_SETTING[:n] + gym_lists.RELATIVES_BY_FAMILY[:n]
            + gym_lists.STRANGERS[:n])


def build_plan(budget: Budget) -> zero_shot.Budget:
    """What zero_shot.build_libraries builds for this budget: the gym training list, MBC on
    both spaces, no random clusters, the uniform merge only."""
    return zero_shot.Budget(
        task_list="gym", tasks=budget.train, private_steps=budget.private_steps,
        cluster_steps=budget.cluster_steps, shared_steps=budget.shared_steps,
        clusters=budget.clusters, batch=budget.batch, lr=budget.lr,
        max_length=budget.max_length, dtype=budget.dtype, workers=budget.workers,
        cpus_per_job=budget.cpus_per_job, spaces=("params", "update"), random=False,
        methods=("uniform merge",))  # the merges to make: the uniform one only


def build(run: Path, budget: Budget, model_and_tokenizer) -> dict[str, list[str]]:
    """The libraries (zero_shot.build_libraries on the gym training list); each one's
    experts. Building resumes: what is there is kept."""
    started = time.perf_counter()
    names, made = zero_shot.build_libraries(run, build_plan(budget), model_and_tokenizer)
    if made:
        record_time(run / "build_time.json", time.perf_counter() - started,
                    {"made": len(made)})
    return names


# ------------------------------------------------------------------------- evaluation
def evaluate_method_spec(run: Path, budget: Budget, spec: dict, tasks: list,
                         model_and_tokenizer) -> dict:
    """One method on the held-out tasks' test examples (cached in the run folder). Routed
    methods are evaluated task by task, recording each expert's routing weight per layer."""
    from quiver.evaluation import EvalConfig, evaluate
    from quiver.library import Library
    from quiver.routing import detach_experts
    from quiver.zero_shot import recording_routing, reuse

    cache = run / "eval" / f"limit{budget.limit}-select{budget.select}" / (
        spec["label"].replace(" ", "-") + ".json")
    if cache.exists():
        return json.loads(cache.read_text())
    print(f"== evaluating {spec['label']}", flush=True)
    model, tokenizer = model_and_tokenizer
    config = EvalConfig(split="all", skip=budget.select, limit=budget.limit)
    library = Library(str(run / spec["library"])) if spec["library"] else None
    started = time.perf_counter()
    report: dict = {"tasks": {}, "routing_weight": {}}
    try:
        if spec["method"] == "per-task":  # the oracle: each task with its chosen expert
            for task in tasks:
                reuse(model, library, method="uniform", experts=[spec["per_task"][task.name]])
                try:
                    part = evaluate(model, tokenizer, [task], config, show_progress=False)
                finally:
                    detach_experts(model)
                report["tasks"].update(part["tasks"])
        elif spec["method"] == "base":
            report["tasks"] = evaluate(model, tokenizer, tasks, config)["tasks"]
        elif spec["method"].startswith("expert:"):
            reuse(model, library, method="uniform", experts=[spec["method"].split(":", 1)[1]])
            report["tasks"] = evaluate(model, tokenizer, tasks, config)["tasks"]
        else:
            reuse(model, library, method=spec["method"], experts=spec["experts"],
                  tokenizer=tokenizer, gate_steps=budget.gate_steps)
            for task in tasks:
                if spec["method"] in ROUTED:
                    with recording_routing(model, weighted=True) as weights:
                        part = evaluate(model, tokenizer, [task], config, show_progress=False)
                    report["routing_weight"][task.name] = {
                        layer: w.tolist() for layer, w in weights.items()}
                else:
                    part = evaluate(model, tokenizer, [task], config, show_progress=False)
                report["tasks"].update(part["tasks"])
    finally:
        if spec["method"] != "base":
            detach_experts(model)
    report.update(label=spec["label"], method=spec["method"], experts=spec.get("experts"),
                  seconds=round(time.perf_counter() - started, 1))
    write_json(cache, report)
    return report


def selection(run: Path, budget: Budget, names: list[str], tasks: list,
              model_and_tokenizer) -> dict:
    """Every private expert's mean answer loss on the selection sample of each held-out
    task (the first `select` examples of its `all` order), cached."""
    from quiver.evaluation.transfer import TransferConfig, transfer_matrix
    from quiver.library import Library

    cache = run / "eval" / f"selection{budget.select}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    print("== the selection sample's transfer matrix", flush=True)
    model, tokenizer = model_and_tokenizer
    config = TransferConfig(metric="loss", split="all", limit=budget.select, batch_size=8)
    report = transfer_matrix(model, tokenizer, Library(str(run / "private")), tasks, names,
                             config)
    write_json(cache, report)
    return report


def own_task_gains(run: Path, budget: Budget, names: list[str], model_and_tokenizer) -> dict:
    """Each private expert and the base model on the expert's own task's test examples."""
    from quiver.data import load_task
    from quiver.evaluation import EvalConfig, evaluate
    from quiver.library import Library
    from quiver.routing import detach_experts
    from quiver.zero_shot import reuse

    cache = run / "eval" / f"own{budget.own_limit}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    print("== own-task gains", flush=True)
    model, tokenizer = model_and_tokenizer
    library = Library(str(run / "private"))
    config = EvalConfig(split="test", limit=budget.own_limit)
    tasks = {name: load_task(library.get(name).info.tasks[0]) for name in names}
    base = evaluate(model, tokenizer, list(tasks.values()), config)["tasks"]
    gains = {}
    for name, task in tasks.items():
        reuse(model, library, method="uniform", experts=[name])
        try:
            tuned = evaluate(model, tokenizer, [task], config, show_progress=False)["tasks"]
        finally:
            detach_experts(model)
        gains[name] = {"task": task.name, "family": task.metadata["family"],
                       "examples": base[task.name]["examples"],
                       **{f"base_{m}": base[task.name][m] for m in METRICS},
                       **{f"expert_{m}": tuned[task.name][m] for m in METRICS},
                       "loglik_gain": _paired(tuned[task.name], base[task.name],
                                              "answer_loglik"),
                       "score_gain": _paired(tuned[task.name], base[task.name], "score")}
    write_json(cache, gains)
    return gains


def _paired(first: dict, second: dict, metric: str) -> dict:
    """first minus second on one task's examples (paired bootstrap)."""
    result = stats.paired({"t": np.asarray(first["per_example"][metric], dtype=float)},
                          {"t": np.asarray(second["per_example"][metric], dtype=float)})
    scale = _scale(metric)
    return {"difference": scale * result["difference"],
            "ci": [scale * v for v in result["ci"]], "excludes_zero": result["excludes_zero"]}


# -------------------------------------------------------------------------- analysis
def _scale(metric: str) -> float:
    """Rates in %, log-likelihoods as they are."""
    return 100 if metric in ("score", "exact_match") else 1


def compare(reports: list[dict], groups: dict[str, list[str]]) -> dict:
    """Per metric and group of tasks: each method's average with its 95% interval, and its
    paired difference from the uniform merge; the headroom is the oracle's."""
    labels = [r["label"] for r in reports]
    reference = labels.index("uniform merge")
    result = {}
    for metric in METRICS:
        result[metric] = {}
        for group, tasks in groups.items():
            per_task = [{t: stats.per_example(r, metric, _scale(metric))[t] for t in tasks}
                        for r in reports]
            samples = stats.bootstrap_average(per_task)
            result[metric][group] = {
                label: {"average": float(np.mean([per_task[m][t].mean() for t in tasks])),
                        "ci": stats.interval(samples[:, m]),
                        "vs_uniform": stats.paired_difference(samples, m, reference)}
                for m, label in enumerate(labels)}
    return result


def mbc_agreement(run: Path, names: dict[str, list[str]], results: Path) -> dict:
    """Each MBC space's clusters against the private experts' families: adjusted Rand index,
    and the same for random clusterings of the same sizes."""
    from quiver.data import load_task
    from quiver.library import Library
    from quiver.report import cluster_heatmap
    from quiver.transforms.mbc import MBCConfig, cluster_experts

    private = Library(str(run / "private"))
    experts = private.experts(names["private"])
    families = {e.name: load_task(e.info.tasks[0]).metadata["family"] for e in experts}
    result = {}
    for label in ("mbc", "mbc-update"):
        if label not in names:
            continue
        clusters, meta = Library(str(run / label)).get_clusters("mbc")
        clustering = cluster_experts(experts, MBCConfig(**meta["config"]))
        if clustering.clusters != clusters:  # the same config on the same experts
            raise SystemExit(f"{label}: reclustering gave {clustering.clusters}, the library "
                             f"holds {clusters}")
        space = meta["config"]["space"]
        truth = [families[n] for n in clustering.names]
        sizes = [len(m) for m in clustering.clusters.values()]
        plot = results / f"families_{run.name.removeprefix('families-')}_{label}_heatmap.png"
        cluster_heatmap(clustering, {e.name: list(e.info.tasks) for e in experts}, plot,
                        families=families)
        result[label] = {"space": space, "agreement": clustering.agreement(families),
                         "chance": stats.chance_agreement(truth, sizes),
                         "sizes": sizes, "clusters": clustering.clusters,
                         "heatmap": plot.name}
    return result


def routing_shares(reports: list[dict], expert_families: dict[str, str],
                   task_families: dict[str, str]) -> dict:
    """For each method routing over private experts and each held-out relative: the share
    of routing weight on experts of the task's family, overall and per layer, against
    chance. (A cluster expert has several families: MBC's routing is left out.)"""
    result = {}
    for report in reports:
        experts = report.get("experts") or []
        if not report.get("routing_weight") or not all(e in expert_families for e in experts):
            continue
        families = [expert_families[e] for e in experts]
        for task, weights in report["routing_weight"].items():
            if task_families[task] not in families:
                continue  # a stranger: no expert of its family
            share = stats.family_share({k: np.asarray(v) for k, v in weights.items()},
                                       families, task_families[task])
            result.setdefault(report["label"], {})[task] = share
    return result


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget_options(parser, BUDGETS, "smoke", "private_steps=100 limit=20")
    parser.add_argument("--run", help="run folder (default runs/families-<budget>)")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results/families_<budget>.md and its bar plot from "
                             "results/families_<budget>.json; nothing else runs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    return parser


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    stem = args.results / f"families_{args.budget}"
    if args.report_only:
        return write_report(json.loads(stem.with_suffix(".json").read_text()), stem)
    budget = with_settings(parser, BUDGETS[args.budget], args.set)
    run = Path(args.run or f"runs/families-{args.budget}").absolute()

    from quiver.data import load_task
    from quiver.models import load_base

    started = time.perf_counter()
    model_and_tokenizer = load_base("smollm2-135m", dtype=budget.dtype)
    names = build(run, budget, model_and_tokenizer)
    if args.build_only:
        return
    built = time.perf_counter()
    tasks = [load_task(t) for t in held_out(budget)]
    gains = own_task_gains(run, budget, names["private"], model_and_tokenizer)
    chosen = selection(run, budget, names["private"], tasks, model_and_tokenizer)
    values = {row: v for row, v in chosen["values"].items() if row != "base"}
    per_task = stats.oracle_choice(values, higher_is_better=False)
    specs = [{"label": label, "method": method, "library": library,
              "experts": names.get(whose) if whose else None}
             for label, method, library, whose in METHODS if library is None or
             library in names or library == "merges"]
    specs.append({"label": "oracle", "method": "per-task", "library": "private",
                  "per_task": per_task})
    reports = [evaluate_method_spec(run, budget, spec, tasks, model_and_tokenizer)
               for spec in specs]
    evaluated = time.perf_counter() - built
    canonical = [t.name for t in tasks]  # as the reports name them (knobs sorted)
    n = budget.held_out
    groups = {"relatives (setting)": canonical[:n], "relatives (family)": canonical[n:2 * n],
              "strangers": canonical[2 * n:]}
    groups["relatives"] = groups["relatives (setting)"] + groups["relatives (family)"]
    groups["all"] = canonical
    comparison = compare(reports, groups)
    agreement = mbc_agreement(run, names, args.results)
    from quiver.library import Library

    private = Library(str(run / "private"))
    expert_families = {n: load_task(private.get(n).info.tasks[0]).metadata["family"]
                       for n in names["private"]}
    task_families = {t.name: t.metadata["family"] for t in tasks}
    shares = routing_shares(reports, expert_families, task_families)
    # The methods' evaluation times live in their cached reports, so a rerun over a
    # finished run folder still says how long they took.
    timings = {"build": json.loads((run / "build_time.json").read_text())["total_seconds"]
               if (run / "build_time.json").exists() else None,
               "evaluate_methods": round(sum(r.get("seconds") or 0 for r in reports)),
               "evaluate_this_run": round(evaluated), "total_this_run":
               round(time.perf_counter() - started)}
    record = {**provenance(), "budget": dataclasses.asdict(budget), "train": names["private"],
              "held_out": {t.name: gym_lists.group_of(t.name) for t in tasks},
              "held_out_families": {t.name: t.metadata["family"] for t in tasks},
              "groups": groups, "own_task": gains, "oracle": per_task,
              "comparison": comparison, "mbc": agreement, "routing_shares": shares,
              "timings_s": timings,
              "methods": {r["label"]: {t: {m: r["tasks"][t][m] for m in METRICS}
                                       for t in r["tasks"]} for r in reports}}
    write_json(stem.with_suffix(".json"), record, indent=1)
    write_report(record, stem)


def write_report(record: dict, stem: Path) -> None:
    """`stem`.md and `stem`_bars.png from the benchmark's JSON record."""
    plot = stem.with_name(stem.name + "_bars.png")
    report_families.bar_plot(record, plot)
    text = report_families.markdown(record, plot.name)
    write_text(stem.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
