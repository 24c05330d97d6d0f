"""Few-shot adaptation from a library, and multi-task adapters with matched parameters.

Two tables, both on the real SmolLM2-135M-Instruct and BIG-bench:

Multi-task. On the training tasks of the budget, four adapters trained jointly, each with
about the same number of trainable parameters (counted from the stored weights): one shared
LoRA of rank S x r, Poly (S skills of rank r, H = 1), MHR (S skills of rank r, H heads) and
MTL-LoRA (rank r_m, n up-projections, r_m chosen so that r_m (in + n out) is close to
S r (in + out)); scored on the test splits of those tasks (each with its own routing row).

Few-shot. On held-out BIG-bench multiple-choice tasks (none in any training list), for N
shots of each task's training split: every method of `quiver adapt` (private, mhr-z,
mhr-full, mhr-mu from the MHR entry above; polylib, polylib-full, lib-mu, lorahub from the
library of private LoRA experts of the training tasks), plus the base model and Arrow
zero-shot over the same library; accuracy on each task's test split, and each method's
paired bootstrap difference from `private` at the same N (same examples).

Every method gets the same training steps for a given N (the budget's `fewshot_steps`).
Each held-out task is one job, and so is each row of the multi-task table, run in processes
of their own (`workers` at once, one thread each); entries and reports are cached in the run
folder, so a stopped run resumes. With LoraHub's shots capped (`lorahub_examples`) and nested,
a larger N can search on exactly the shots of a smaller one: that search is run once and
reported at both N (marked `same_as` in the run folder).

Usage: .venv/bin/python -m benchmarks.adaptation --budget small [--set KEY=VALUE ...]
       [--report-only]
Writes benchmarks/results/adaptation_<budget>.{json,md,png}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import stats
from benchmarks.common import (
    RESULTS,
    add_budget_options,
    fast_cpu_dtype,
    provenance,
    provenance_line,
    with_settings,
    write_json,
    write_text,
)
from benchmarks.stats import interval
from benchmarks.zero_shot import TRAIN_TASKS

BASE = "smollm2-135m"
# Held out: the BIG-bench multiple-choice tasks in no training list with at least 400 examples
# and at most 5 options, by mean prompt length (SmolLM2 tokens, first 200 examples), shortest
# first: a budget takes the first `fewshot_tasks` (a few-shot job's time grows with the
# prompt: 8 min for strategyqa's 20 tokens, 28 for bbq_lite_json's 65, 35 for the 100 of
# formal_fallacies and logical_deduction, 2-core AMD EPYC). multiemo (75 tokens) is left out
# for its 1.4 million examples.
FEW_SHOT_TASKS = [
    "bigbench:strategyqa",  # 20 tokens, 2 options
    "bigbench:hyperbaton",  # 35, 2
    "bigbench:sports_understanding",  # 37, 2
    "bigbench:navigate",  # 49, 2
    "bigbench:ruin_names",  # 56, 4
    "bigbench:movie_recommendation",  # 58, 4
    "bigbench:winowhy",  # 59, 2
    "bigbench:bbq_lite_json",  # 65, 3
    "bigbench:social_support",  # 78, 3 (full only from here)
    "bigbench:logical_deduction",  # 100, 5
    "bigbench:formal_fallacies_syllogisms_negation",  # 102, 2
    "bigbench:movie_dialog_same_or_different",  # 105, 2
]
METHODS = ["private", "mhr-z", "mhr-full", "mhr-mu", "polylib", "polylib-full", "lib-mu",
           "lorahub"]
MULTI_TASK = ["shared LoRA", "Poly", "MHR", "MTL-LoRA"]


@dataclass(frozen=True)
class Budget:
    """How much of everything. The defaults are the `small` budget, the CPU one (2 cores, at
    most 90 minutes; timed at f410be6 on a 2-core Xeon: 86.4 min). Its few-shot trainings
    run without LoRA dropout (the masks cost 15-20% of a few-shot step on a CPU, profiled;
    the sources keep 0.05), and LoraHub searches on at most 16 of the shots, so once per
    task (the shots are nested)."""

    train_tasks: int = 6  # the first N of zero_shot.TRAIN_TASKS
    fewshot_tasks: int = 8  # the first N of FEW_SHOT_TASKS
    shots: tuple[int, ...] = (16, 64, 256)  # N
    fewshot_steps: tuple[int, ...] = (6, 10, 14)  # every method's steps at each N of `shots`
    rank: int = 4
    skills: int = 4  # Poly and MHR: S
    heads: int = 8  # MHR: H
    mtl_rank: int = 8  # MTL-LoRA's rank, matched to S x r in parameters
    private_steps: int = 24
    joint_steps: int = 48  # the multi-task entries
    batch: int = 8
    fewshot_batch: int = 4
    max_length: int = 256
    lr: float = 5e-4
    fewshot_lr: float = 1e-3
    fewshot_dropout: float = 0.0
    lorahub_budget: int = 12  # loss evaluations of LoraHub's search
    lorahub_examples: int = 16  # LoraHub searches on at most this many shots (0: all)
    limit: int = 32  # test examples per task
    dtype: str = "fast"  # "fast": bf16 where the CPU has bf16 units, else fp32
    fewshot_valid: int = 8  # validation examples of a few-shot training (reported, not used)
    workers: int = 2  # jobs at once, one thread each

    def __post_init__(self) -> None:
        if len(self.shots) != len(self.fewshot_steps):
            raise ValueError(f"shots {self.shots} and fewshot_steps {self.fewshot_steps} "
                             "must be as long")
        if not 0 < self.train_tasks <= len(TRAIN_TASKS):
            raise ValueError(f"train_tasks {self.train_tasks}: there are {len(TRAIN_TASKS)}")
        if not 0 < self.fewshot_tasks <= len(FEW_SHOT_TASKS):
            raise ValueError(f"fewshot_tasks {self.fewshot_tasks}: there are "
                             f"{len(FEW_SHOT_TASKS)}")

    def steps_at(self, shots: int) -> int:
        """Every method's training steps at N = `shots`."""
        return dict(zip(self.shots, self.fewshot_steps, strict=True))[shots]


BUDGETS = {
    "smoke": Budget(train_tasks=2, fewshot_tasks=2, shots=(16,), fewshot_steps=(3,), skills=2,
                    heads=4, mtl_rank=4, private_steps=4, joint_steps=6, batch=4,
                    max_length=128, lr=1e-3, lorahub_budget=5, lorahub_examples=0, limit=10,
                    fewshot_valid=16),
    "small": Budget(),
    "full": Budget(train_tasks=20, fewshot_tasks=12, fewshot_steps=(100, 200, 400), skills=8,
                   heads=64, mtl_rank=16, private_steps=200, joint_steps=2000, batch=16,
                   fewshot_batch=8, max_length=512, fewshot_dropout=0.05, lorahub_budget=40,
                   lorahub_examples=0, limit=250, dtype="auto", fewshot_valid=16, workers=1),
}


# ----------------------------------------------------------------------------- libraries
def train_config(budget: Budget, steps: int, rank: int | None = None, few_shot: bool = False):
    """The training options of one training; alpha = 4 r at every rank (quiver's default
    scaling of 4), so that ranks matched for parameters learn at the same pace."""
    from quiver.training import TrainConfig

    rank = rank or budget.rank
    return TrainConfig(steps=steps, rank=rank, alpha=4.0 * rank, max_length=budget.max_length,
                       batch_size=budget.fewshot_batch if few_shot else budget.batch,
                       lr=budget.fewshot_lr if few_shot else budget.lr, eval_every=steps,
                       eval_examples=budget.fewshot_valid if few_shot else 32,
                       dropout=budget.fewshot_dropout if few_shot else 0.05)


def build_sources(run: Path, budget: Budget) -> None:
    """The library of private experts and the four multi-task entries, `workers` trainings at
    once (the joint ones in processes of their own, one thread each)."""
    from quiver.build import BuildConfig, build_library

    tasks = TRAIN_TASKS[: budget.train_tasks]  # built longest first by quiver build
    print("== private experts of the training tasks", flush=True)
    report = build_library(tasks, str(run / "experts"), BASE,
                           train_config(budget, budget.private_steps),
                           BuildConfig(workers=budget.workers), dtype=budget.dtype,
                           show_progress=False)
    if report.failed:
        raise SystemExit(f"trainings failed: {[(o.name, o.error) for o in report.failed]}")
    jobs = [label for label in MULTI_TASK if not _built(run / _folder(label))]
    print(f"== multi-task entries: {', '.join(jobs) or 'all built'}", flush=True)
    _in_processes(_build_multi_task, [(run, budget, label) for label in jobs],
                  budget.workers)


def _folder(label: str) -> str:
    return label.lower().replace(" ", "-")


def _built(path: Path) -> bool:
    from quiver.library import Library

    try:
        return len(Library(str(path)).names()) > 0
    except Exception:  # noqa: BLE001 - not a library yet
        return False


def _build_multi_task(run: Path, budget: Budget, label: str) -> str:
    """Train one multi-task entry on all the training tasks (in this process)."""
    from quiver.adapters import MTLLoRAConfig, PolyMHRConfig
    from quiver.build import BuildConfig, build_library

    tasks = TRAIN_TASKS[: budget.train_tasks]
    skills, rank = budget.skills, budget.rank
    strategy, adapter, config_rank = {
        "shared LoRA": ("shared", None, skills * rank),
        "Poly": ("poly", PolyMHRConfig(skills=skills, heads=1), rank),
        "MHR": ("mhr", PolyMHRConfig(skills=skills, heads=budget.heads), rank),
        "MTL-LoRA": ("mtl-lora", MTLLoRAConfig(), budget.mtl_rank),
    }[label]
    started = time.perf_counter()
    report = build_library(tasks, str(run / _folder(label)), BASE,
                           train_config(budget, budget.joint_steps, config_rank),
                           BuildConfig(strategy=strategy, workers=1), dtype=budget.dtype,
                           show_progress=False, adapter=adapter)
    if report.failed:
        raise SystemExit(f"{label} failed: {report.failed[0].error}")
    print(f"== built {label} in {time.perf_counter() - started:.0f} s", flush=True)
    return label


def _in_processes(function, calls: list[tuple], workers: int) -> list:
    """`function(*call)` for each call, `workers` at once in spawned one-thread processes
    (in this process when workers is 1) that stop with this one."""
    from quiver.workers import spawn_pool

    if workers <= 1 or len(calls) <= 1:
        return [function(*call) for call in calls]
    with spawn_pool(workers, threads=1) as pool:
        return list(pool.map(function, *zip(*calls, strict=True)))


# ---------------------------------------------------------------------------- multi-task
def multi_task_job(run: Path, budget: Budget, label: str) -> str:
    """Score one row of the multi-task table on the test splits of the training tasks: the
    base model (`base`) or a multi-task entry, with its parameter count (in this process)."""
    from quiver.evaluation import EvalConfig
    from quiver.library import Library
    from quiver.models import load_base
    from quiver.recipes import evaluate_method

    cache = _multi_task_cache(run, label)
    if cache.exists():
        return label
    tasks = TRAIN_TASKS[: budget.train_tasks]
    evaluation = EvalConfig(split="test", limit=budget.limit)
    model_and_tokenizer = load_base(BASE, dtype=budget.dtype)
    if label == "base":
        report = evaluate_method("base", tasks, None, BASE, evaluation,
                                 model_and_tokenizer=model_and_tokenizer, show_progress=False)
        report.update(label="base", kind="-", parameters=0)
    else:
        library = Library(str(run / _folder(label)))
        entry = library.get(library.names()[0])
        report = evaluate_method(f"expert:{entry.info.name}", tasks, library.url, BASE,
                                 evaluation, allow_seen=label == "shared LoRA",  # test split
                                 model_and_tokenizer=model_and_tokenizer, show_progress=False)
        report.update(label=label, kind=entry.info.kind,
                      parameters=sum(t.numel() for t in entry.weights.values()))
    write_json(cache, report)
    return label


def multi_task_reports(run: Path) -> dict:
    """`{label: report}` of the multi-task rows scored so far, the base model first."""
    reports = {}
    for label in ["base", *MULTI_TASK]:
        cache = _multi_task_cache(run, label)
        if cache.exists():
            reports[label] = json.loads(cache.read_text())
            print(f"{label}: {reports[label]['average']['accuracy']:.1f}", flush=True)
    return reports


def _multi_task_cache(run: Path, label: str) -> Path:
    name = "base-on-training-tasks" if label == "base" else f"multi-task-{_folder(label)}"
    return run / "eval" / f"{name}.json"


# ------------------------------------------------------------------------------ few-shot
def job(run: Path, budget: Budget, kind: str, what: str) -> str:
    """One job of a worker: a held-out task's adaptations or one multi-task row."""
    return (few_shot_job if kind == "few-shot" else multi_task_job)(run, budget, what)


def few_shot_job(run: Path, budget: Budget, task: str) -> str:
    """Adapt to `task` with every method and N, and score each result, the base model and
    Arrow zero-shot on the task's test split (in this process, the model loaded once)."""
    from quiver.adaptation import AdaptConfig, adapt_task
    from quiver.evaluation import EvalConfig
    from quiver.library import Library
    from quiver.models import fingerprint, linear_module_shapes, load_base
    from quiver.recipes import evaluate_method

    short = task.removeprefix("bigbench:")
    folder = run / "few-shot" / short
    library = Library(str(folder), create=True)
    model_and_tokenizer = load_base(BASE, dtype=budget.dtype)
    model = model_and_tokenizer[0]
    library.ensure_base(BASE, fingerprint(model), linear_module_shapes(model))
    if "mhr" not in library:  # mhr-* adapt from an entry of the library they write to
        library.add(Library(str(run / "mhr")).get("mhr"))
    experts_url = str(run / "experts")
    evaluation = EvalConfig(split="test", limit=budget.limit)

    def score(label: str, method: str, url: str | None, allow_seen: bool) -> None:
        cache = folder / "eval" / f"{label}.json"
        if cache.exists():
            return
        report = evaluate_method(method, [task], url, BASE, evaluation, allow_seen=allow_seen,
                                 model_and_tokenizer=model_and_tokenizer, show_progress=False)
        write_json(cache, {"label": label, "tasks": report["tasks"],
                            "average": report["average"]})

    score("base", "base", None, False)
    score("arrow", "arrow", experts_url, False)
    searched: dict[int, str] = {}  # LoraHub: the shots a search ran on -> its entry
    for shots in budget.shots:
        steps = budget.steps_at(shots)
        for method in METHODS:
            name = f"{method}-{shots}"
            if method == "lorahub":
                used = min(shots, budget.lorahub_examples or shots)
                if used in searched:  # nested shots, the same cap: exactly the same search
                    _same_as(folder, searched[used], name)
                    continue
                searched[used] = name
            if name not in Library(str(folder)):
                source = "" if method == "private" else "mhr" if method.startswith(
                    "mhr") else experts_url
                started = time.perf_counter()
                adapt_task(task, str(folder), name,
                           AdaptConfig(method=method, shots=shots, source=source,
                                       lorahub_budget=budget.lorahub_budget,
                                       lorahub_examples=budget.lorahub_examples),
                           train_config(budget, steps, few_shot=True), BASE,
                           show_progress=False, model_and_tokenizer=model_and_tokenizer)
                print(f"{short} {name}: adapted in {time.perf_counter() - started:.0f} s",
                      flush=True)
            score(name, f"expert:{name}", str(folder), True)  # test split: not among the shots
    return task


def _same_as(folder: Path, done: str, label: str) -> None:
    """Report `label` with the scores of `done`, the entry of the very same computation."""
    report = json.loads((folder / "eval" / f"{done}.json").read_text())
    write_json(folder / "eval" / f"{label}.json", {**report, "label": label, "same_as": done})


# ----------------------------------------------------------------------------- summaries
def few_shot_reports(run: Path, budget: Budget) -> dict[str, dict]:
    """`{label: report over all few-shot tasks}`, label as `METHOD-N`, `base`, `arrow`."""
    merged: dict[str, dict] = {}
    for task in FEW_SHOT_TASKS[: budget.fewshot_tasks]:
        folder = run / "few-shot" / task.removeprefix("bigbench:") / "eval"
        for path in sorted(folder.glob("*.json")):
            report = json.loads(path.read_text())
            merged.setdefault(report["label"], {"label": report["label"], "tasks": {}})
            merged[report["label"]]["tasks"].update(report["tasks"])
    return merged


def completed_tasks(reports: dict[str, dict], budget: Budget) -> list[str]:
    """The few-shot tasks every method and N has been scored on (all of them once a run has
    finished; fewer when `--report-only` reads a run that was stopped)."""
    labels = ["base", "arrow"] + [f"{m}-{n}" for n in budget.shots for m in METHODS]
    return [t for t in FEW_SHOT_TASKS[: budget.fewshot_tasks]
            if all(t in reports.get(label, {}).get("tasks", {}) for label in labels)]


def run_timings(run: Path) -> dict:
    """Wall time of the two phases, from the run folder's files (so that a resumed or stopped
    run reports them too): sources from the first expert to the last multi-task entry stored,
    then adapting and scoring to the last report."""
    def times(pattern: str) -> list[float]:
        return [p.stat().st_mtime for p in run.glob(pattern)]

    start = min(times("experts/**/*"))
    sources = max(t for label in MULTI_TASK for t in times(f"{_folder(label)}/**/*"))
    scored = max(times("few-shot/*/eval/*.json") + times("eval/*.json") or [sources])
    return {"sources": sources - start, "few_shot": scored - sources}


def summarise(reports: dict[str, dict], budget: Budget, tasks: list[str]) -> dict:
    """Average accuracy (with its interval) over `tasks` per method and N, and the paired
    difference from private at the same N."""
    summary: dict = {}
    for shots in budget.shots:
        labels = ["base", "arrow"] + [f"{m}-{shots}" for m in METHODS]
        per_task = [{t: stats.per_example(reports[label])[t] for t in tasks}
                    for label in labels]
        samples = stats.bootstrap_average(per_task, scale=100)  # accuracy in %
        private = samples[:, labels.index(f"private-{shots}")]
        rows = {}
        for m, label in enumerate(labels):
            difference = samples[:, m] - private
            rows[label.removesuffix(f"-{shots}")] = {
                "average": float(np.mean([reports[label]["tasks"][t]["accuracy"]
                                          for t in tasks])),
                "ci": interval(samples[:, m]),
                "vs_private": float(difference.mean()), "vs_private_ci": interval(difference),
                "tasks": {t: reports[label]["tasks"][t]["accuracy"] for t in tasks}}
        summary[str(shots)] = rows
    return summary


# --------------------------------------------------------------------------------- output
def write(args, budget: Budget, summary: dict, multi: dict, timings: dict,
          few_tasks: list[str]) -> None:
    stem = args.results / f"adaptation_{args.budget}"
    train_tasks = TRAIN_TASKS[: budget.train_tasks]
    planned = budget.fewshot_tasks
    lorahub_examples = (f", on at most {budget.lorahub_examples} of the shots (so at larger N "
                        "it searches on the same shots: they are nested)"
                        if budget.lorahub_examples else "")
    record = {**provenance(), "budget": dataclasses.asdict(budget), "train_tasks": train_tasks,
              "few_shot_tasks": few_tasks, "timings_s": timings,
              "few_shot": summary,
              "multi_task": {k: {"average": v["average"]["accuracy"], "kind": v["kind"],
                                 "parameters": v["parameters"],
                                 "tasks": {t: r["accuracy"] for t, r in v["tasks"].items()},
                                 "vs_base": _paired(v, multi["base"])}
                             for k, v in multi.items()}}
    write_json(stem.with_suffix(".json"), record, indent=1)
    _plot(summary, stem.with_suffix(".png"), args.budget)
    short = [t.removeprefix("bigbench:") for t in train_tasks]
    lines = [
        f"# Few-shot adaptation and multi-task adapters, budget `{args.budget}`", "",
        provenance_line(record), "",
        f"{timings['sources'] / 60:.0f} min to train the sources, "
        f"{timings['few_shot'] / 60:.0f} min to adapt and score, "
        f"{(timings['sources'] + timings['few_shot']) / 60:.0f} min in all (wall time from the "
        "run folder's file times: the pauses of a run resumed in another session count too). "
        f"Plot: [`{stem.name}.png`]({stem.name}.png).",
        "",
        f"SmolLM2-135M-Instruct ({budget.dtype}). Training tasks ({len(train_tasks)}): "
        f"{', '.join(short)}.", "",
        "## Multi-task: jointly trained adapters, matched parameters", "",
        f"Trained on all {len(train_tasks)} tasks together, {budget.joint_steps} steps of "
        f"batch {budget.batch}, lr {budget.lr:g}, at most {budget.max_length} tokens; "
        f"scored on each task's test split (at most {budget.limit} examples, its own "
        f"routing row). Matched: shared LoRA rank {budget.skills * budget.rank} = "
        f"S x r; Poly and MHR S = {budget.skills} skills of rank {budget.rank} (MHR "
        f"H = {budget.heads}); MTL-LoRA rank {budget.mtl_rank} with n = 3 "
        "up-projections. Parameters: every stored tensor, routing included.", "",
        "| adapter | trainable parameters | average | minus base (95%) | "
        + " | ".join(short) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(short),
    ]
    for label, r in record["multi_task"].items():
        diff, (low, high) = r["vs_base"]
        lines.append(f"| {label} | {r['parameters']:,} | **{r['average']:.1f}** | {diff:+.1f} "
                     f"({low:+.1f} to {high:+.1f}) | " + " | ".join(
                         f"{r['tasks'][t]:.1f}" for t in train_tasks) + " |")
    steps = ", ".join(f"{budget.steps_at(n)} for N={n}" for n in budget.shots)
    lines += [
        "", "## Few-shot: adapting to held-out tasks from N examples", "",
        *([f"**Partial: the run was stopped after {len(few_tasks)} of its {planned} held-out "
           "tasks; the figures below are over those only.**", ""]
          if len(few_tasks) < planned else []),
        f"Held-out tasks ({len(few_tasks)}, in no training list): "
        f"{', '.join(t.removeprefix('bigbench:') for t in few_tasks)}. N examples of each "
        f"task's training split (seed 0); training steps {steps} (batch "
        f"{budget.fewshot_batch}, lr {budget.fewshot_lr:g}, routing lr 0.1, LoRA dropout "
        f"{budget.fewshot_dropout:g}) for every "
        f"method; LoraHub: {budget.lorahub_budget} loss evaluations, L1 0.05"
        f"{lorahub_examples}. Sources: "
        f"the MHR entry above (mhr-*) and the library of {len(train_tasks)} private LoRA "
        f"experts ({budget.private_steps} steps each; polylib*, lib-mu, lorahub, Arrow). "
        f"Accuracy (%) on each task's test split (at most {budget.limit} examples, the "
        "same for every method); difference from `private` at the same N: paired bootstrap, "
        "95% interval.", ""]
    for shots, rows in summary.items():
        lines += [f"### N = {shots}", "",
                  "| method | average | 95% interval | minus private | 95% interval | "
                  + " | ".join(t.removeprefix("bigbench:") for t in few_tasks) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(few_tasks)]
        for label, r in rows.items():
            lines.append(
                f"| {label} | **{r['average']:.1f}** | {r['ci'][0]:.1f} to {r['ci'][1]:.1f} | "
                f"{r['vs_private']:+.1f} | {r['vs_private_ci'][0]:+.1f} to "
                f"{r['vs_private_ci'][1]:+.1f} | "
                + " | ".join(f"{r['tasks'][t]:.1f}" for t in few_tasks) + " |")
        lines.append("")
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def _paired(report: dict, reference: dict) -> tuple[float, tuple[float, float]]:
    """`report` minus `reference` in average accuracy: paired bootstrap mean and 95% interval."""
    difference = stats.paired(stats.per_example(report), stats.per_example(reference),
                              scale=100)
    return difference["difference"], difference["ci"]


def _plot(summary: dict, path: Path, budget: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(next(iter(summary.values())))
    figure, axes = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(summary)
    for i, (shots, rows) in enumerate(summary.items()):
        means = [rows[m]["average"] for m in labels]
        errors = [[mean - rows[m]["ci"][0] for m, mean in zip(labels, means, strict=True)],
                  [rows[m]["ci"][1] - mean for m, mean in zip(labels, means, strict=True)]]
        axes.bar(np.arange(len(labels)) + (i - (len(summary) - 1) / 2) * width, means, width,
                 yerr=errors, capsize=2, label=f"N = {shots}")
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_ylabel("average accuracy on held-out tasks (%)")
    axes.set_title(f"Few-shot adaptation, budget {budget} (95% bootstrap intervals)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget_options(parser, BUDGETS, "smoke", "limit=16 shots=16,64 fewshot_steps=6,10")
    parser.add_argument("--run", help="run folder (default runs/adaptation-<budget>)")
    parser.add_argument("--report-only", action="store_true",
                        help="train and score nothing: write the tables from what the run "
                             "folder holds (the tasks finished so far, said so if not all)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for the tables and the plot (default benchmarks/results)")
    return parser


def main() -> None:
    from quiver.build import mean_example_chars

    parser = make_parser()
    args = parser.parse_args()
    budget = with_settings(parser, BUDGETS[args.budget], args.set)
    if budget.dtype == "fast":  # bf16 only where the CPU computes it fast
        budget = dataclasses.replace(budget, dtype=fast_cpu_dtype())
    run = Path(args.run or f"runs/adaptation-{args.budget}").absolute()

    tasks = FEW_SHOT_TASKS[: budget.fewshot_tasks]
    if not args.report_only:
        build_sources(run, budget)
        # the held-out tasks, longest examples first (a long job started last would run
        # alone, as in `quiver build`), then the multi-task rows (short jobs that fill the tail)
        longest_first = sorted(tasks, key=mean_example_chars, reverse=True)
        jobs = [("few-shot", t) for t in longest_first] + [("multi-task", label)
                                                           for label in ["base", *MULTI_TASK]]
        for done in _in_processes(job, [(run, budget, kind, what) for kind, what in jobs],
                                  budget.workers):
            print(f"== done {done}", flush=True)
    multi = multi_task_reports(run)
    if len(multi) < 1 + len(MULTI_TASK):
        raise SystemExit(f"the multi-task rows are not all scored yet in {run}")
    reports = few_shot_reports(run, budget)
    done = completed_tasks(reports, budget)
    if not done:
        raise SystemExit(f"no held-out task has been scored by every method yet in {run}")
    write(args, budget, summarise(reports, budget, done), multi, run_timings(run), done)


if __name__ == "__main__":
    main()
