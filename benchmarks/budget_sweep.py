"""Which CPU training budget makes experts help? A small sweep that chooses the `medium`
budget of `zero_shot.py` without looking at its held-out tasks.

For each setting (steps per expert, learning rate, sequence length), a private library of
the first N training tasks of `zero_shot.py` is built, then the base model, the uniform merge
and Arrow (top-4) are scored on *sweep* tasks: BIG-bench Hard multiple-choice tasks, which
are neither training tasks nor the BIG-bench Lite tasks the zero-shot table is measured on.
Reported per setting: accuracy, the paired bootstrap difference to the base model, how far
the experts moved apart (cosine range of their B matrices), and the build time.

Usage: .venv/bin/python -m benchmarks.budget_sweep [--tasks 4] [--limit 60]
       [--settings STEPS,LR,TOKENS ...]
Writes benchmarks/results/budget_sweep.{json,md}; every build and evaluation is cached in
runs/budget-sweep/, so a stopped sweep resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import stats
from benchmarks.common import (
    RESULTS,
    fast_cpu_dtype,
    machine_name,
    parse_value,
    provenance,
    provenance_line,
    write_json,
    write_text,
)
from benchmarks.zero_shot import TRAIN_TASKS

SWEEP_TASKS = [  # BIG-bench Hard multiple choice: not trained on, not the zero-shot table's
    "bigbench:date_understanding",
    "bigbench:disambiguation_qa",
    "bigbench:hyperbaton",
    "bigbench:movie_recommendation",
    "bigbench:navigate",
    "bigbench:snarks",
    "bigbench:sports_understanding",
    "bigbench:ruin_names",
]


@dataclass(frozen=True)
class Setting:
    """One row of the sweep: the training budget of each private expert."""

    steps: int
    lr: float
    max_length: int  # tokens

    @classmethod
    def parse(cls, text: str) -> Setting:
        """`STEPS,LR,TOKENS` (as `--settings` takes it), each parsed by its field's type."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = text.split(",")
        if len(values) != len(names):
            raise argparse.ArgumentTypeError(f"{text!r} is not STEPS,LR,TOKENS")
        hints = typing.get_type_hints(cls)
        try:
            return cls(*(parse_value(hints[name], value) for name, value in
                         zip(names, values, strict=True)))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

    def key(self) -> tuple[int, float, int]:
        return self.steps, self.lr, self.max_length


SETTINGS = [Setting(30, 1e-3, 256), Setting(60, 5e-4, 256), Setting(120, 5e-4, 256)]


def run_setting(run: Path, setting: Setting, args, model_and_tokenizer) -> dict:
    """Build the setting's private library, merge it, score the merge and Arrow (cached in
    the run folder)."""
    from quiver.build import BuildConfig, build_library
    from quiver.evaluation import EvalConfig
    from quiver.library import Library
    from quiver.merging import merge_experts
    from quiver.recipes import evaluate_method
    from quiver.training import TrainConfig

    steps, lr, max_length = setting.key()
    folder = run / f"steps{steps}-lr{lr:g}-len{max_length}-{args.dtype}"
    cache = folder / "result.json"
    if cache.exists():
        return json.loads(cache.read_text())
    tasks = TRAIN_TASKS[: args.tasks]
    config = TrainConfig(steps=steps, lr=lr, batch_size=8, max_length=max_length,
                         eval_every=steps, eval_examples=32)
    started = time.perf_counter()
    report = build_library(tasks, str(folder / "private"), "smollm2-135m", config,
                           BuildConfig(strategy="private"), dtype=args.dtype)
    built = time.perf_counter() - started
    library = Library(str(folder / "private"))
    names = [o.name for o in report.outcomes]
    if "uniform-merge" not in library:
        merged, _ = merge_experts(library.experts(names), "uniform", "uniform-merge")
        library.add(merged)
    evaluation = EvalConfig(split="all", limit=args.limit)
    reports = {}
    for label, method, experts in (("uniform merge", "expert:uniform-merge", None),
                                   ("Arrow", "arrow", names)):
        reports[label] = evaluate_method(method, SWEEP_TASKS, str(folder / "private"),
                                         "smollm2-135m", evaluation, experts=experts,
                                         model_and_tokenizer=model_and_tokenizer)
    result = {"steps": steps, "lr": lr, "max_length": max_length, "build_s": built,
              "experts": names, "similarity_B": _b_cosine_range(library, names),
              "valid_loss": {o.name: o.best_valid_loss for o in report.outcomes},
              "reports": {k: _slim(v) for k, v in reports.items()}}
    write_json(cache, result)
    return result


def _b_cosine_range(library, names: list[str]) -> tuple[float, float]:
    vectors = []
    for expert in library.experts(names):
        factors = expert.lora_factors()
        vectors.append(torch.cat([factors[m][1].flatten().float() for m in sorted(factors)]))
        expert.drop_weights()
    unit = torch.nn.functional.normalize(torch.stack(vectors), dim=1)
    off = (unit @ unit.T)[~torch.eye(len(vectors), dtype=torch.bool)]
    return float(off.min()), float(off.max())


def _slim(report: dict) -> dict:
    return {"average": report["average"], "tasks": {
        t: {"accuracy": r["accuracy"], "examples": r["examples"], "per_example": r["per_example"]}
        for t, r in report["tasks"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4, help="training tasks (private experts)")
    parser.add_argument("--limit", type=int, default=60, help="examples per sweep task")
    parser.add_argument("--run", default="runs/budget-sweep")
    parser.add_argument("--settings", nargs="*", metavar="STEPS,LR,TOKENS", type=Setting.parse,
                        help="run only these settings (default: all); the other rows of the "
                             "committed results are kept, each with its own machine")
    args = parser.parse_args()
    settings = args.settings or SETTINGS
    run = Path(args.run).absolute()

    from quiver.evaluation import EvalConfig
    from quiver.models import load_base
    from quiver.recipes import evaluate_method

    args.dtype = fast_cpu_dtype()
    model_and_tokenizer = load_base("smollm2-135m", dtype=args.dtype)
    base_cache = run / f"base-{args.limit}-{args.dtype}.json"
    if not base_cache.exists():
        base = evaluate_method("base", SWEEP_TASKS, None, "smollm2-135m",
                               EvalConfig(split="all", limit=args.limit),
                               model_and_tokenizer=model_and_tokenizer)
        write_json(base_cache, _slim(base))
    base = json.loads(base_cache.read_text())
    rows = _earlier_rows(settings, args.dtype)
    for setting in settings:  # the table grows as settings finish
        rows.append(_row(run_setting(run, setting, args, model_and_tokenizer), base, args))
        write(args, rows)


def _row(result: dict, base: dict, args) -> dict:
    """A setting's figures as committed: accuracies, paired differences to the base model
    (bootstrap 95% interval), and where they were measured."""
    vs_base = {}
    for label, report in result["reports"].items():
        low, high = stats.paired(stats.per_example(report), stats.per_example(base),
                                 scale=100)["ci"]
        vs_base[label] = [report["average"]["accuracy"] - base["average"]["accuracy"], low, high]
    record = provenance()
    return {k: v for k, v in result.items() if k != "reports"} | {
        "accuracy": {k: v["average"]["accuracy"] for k, v in result["reports"].items()},
        "vs_base": vs_base, "base_accuracy": base["average"]["accuracy"],
        "examples": sum(r["examples"] for r in base["tasks"].values()),
        "dtype": args.dtype, "machine": record["machine"], "commit": record["commit"]}


def _earlier_rows(settings: list[Setting], dtype: str) -> list[dict]:
    """The committed rows of settings not run now, or run on another machine or dtype (a
    sweep spread over sessions and machines)."""
    path = RESULTS / "budget_sweep.json"
    if not path.exists():
        return []
    rows = json.loads(path.read_text())["settings"]
    cpu = machine_name().split(",")[0]  # the processor, whatever the threads
    keys = [s.key() for s in settings]
    return [r for r in rows if (r["steps"], r["lr"], r["max_length"]) not in keys
            or (r["machine"].split(",")[0], r["dtype"]) != (cpu, dtype)]


def write(args, rows: list[dict]) -> None:
    """results/budget_sweep.{md,json}: the last run's provenance, each row with its own."""
    record = provenance()
    rows = sorted(rows, key=lambda r: (r["steps"], -r["lr"], r["max_length"]))
    lines = [
        "# Training-budget sweep for the CPU `medium` zero-shot budget", "",
        f"Last run: {provenance_line(record)} Each row says where it was measured.", "",
        f"Private experts on the first {args.tasks} training tasks of `zero_shot.py` "
        "(SmolLM2-135M-Instruct, LoRA r=4 on all linear layers, batch 8); "
        f"scored on {len(SWEEP_TASKS)} BIG-bench Hard multiple-choice tasks (at most "
        f"{args.limit} examples each, a seeded sample of all their examples), which are not "
        "the zero-shot table's held-out tasks. Differences to the base model (scored in the "
        "same dtype on the same machine): paired bootstrap, 95% interval.", "",
        "| steps | lr | tokens | dtype, machine | build (min) | B cosine range | base | "
        "uniform merge | vs base | Arrow top-4 | vs base |",
        "|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = []
        for label in ("uniform merge", "Arrow"):
            diff, low, high = r["vs_base"][label]
            cells += [f"{r['accuracy'][label]:.1f}", f"{diff:+.1f} ({low:+.1f} to {high:+.1f})"]
        low, high = r["similarity_B"]
        lines.append(f"| {r['steps']} | {r['lr']:g} | {r['max_length']} | {r['dtype']}, "
                     f"{r['machine']} | {r['build_s'] / 60:.1f} | {low:.2f} to {high:.2f} | "
                     f"{r['base_accuracy']:.1f} | " + " | ".join(cells) + " |")
    write_text(RESULTS / "budget_sweep.md", "\n".join(lines) + "\n")
    write_json(RESULTS / "budget_sweep.json",
               {**record, "sweep_tasks": SWEEP_TASKS, "settings": rows}, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
