"""Zero-shot reuse of a private library on held-out BIG-bench tasks (small, offline).

1. Train a private library: one expert per training task (none of them in BIG-bench Lite or
   BIG-bench Hard), the embedded SmolLM2-135M-Instruct, a short budget. Resumable.
2. Merge it (uniform A/B average, TIES) into two more experts.
3. Evaluate on held-out multiple-choice tasks of BIG-bench Lite, none seen by any expert:
   base model, uniform merge, TIES merge, Arrow, PHATGOOSE and centroid routing.

Usage: .venv/bin/python benchmarks/zero_shot.py --budget smoke
Writes benchmarks/results/zero_shot_<budget>.json and .md (per-task accuracy and average).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TRAIN_TASKS = [  # none is in BIG-bench Lite or BIG-bench Hard
    "bigbench:social_iqa",
    "bigbench:timedial",
    "bigbench:epistemic_reasoning",
    "bigbench:implicatures",
    "bigbench:question_selection",
    "bigbench:fact_checker",
    "bigbench:metaphor_boolean",
    "bigbench:intent_recognition",
]
HELD_OUT = [  # multiple-choice tasks of BIG-bench Lite
    "bigbench:emoji_movie",
    "bigbench:strategyqa",
    "bigbench:vitaminc_fact_verification",
    "bigbench:winowhy",
    "bigbench:play_dialog_same_or_different",
    "bigbench:formal_fallacies_syllogisms_negation",
]
BUDGETS = {
    "smoke": {"experts": 6, "steps": 40, "held_out": 4, "limit": 40, "gate_steps": 30},
    "small": {"experts": 8, "steps": 200, "held_out": 6, "limit": 200, "gate_steps": 100},
}
METHODS = ["base", "expert:uniform-merge", "expert:ties-merge", "arrow", "phatgoose",
           "centroid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    parser.add_argument("--library", default="runs/zero-shot-library")
    args = parser.parse_args()
    budget = BUDGETS[args.budget]

    from quiver.evaluation import EvalConfig
    from quiver.library import Library
    from quiver.merging import merge_experts
    from quiver.models import load_base
    from quiver.recipes import evaluate_method, train_into_library
    from quiver.training import TrainConfig

    started = time.perf_counter()
    model_and_tokenizer = load_base("smollm2-135m")
    config = TrainConfig(steps=budget["steps"], batch_size=8, max_length=256, lr=1e-3,
                         eval_every=max(1, budget["steps"] // 4), eval_examples=64)
    library = Library(args.library, create=True)
    tasks = TRAIN_TASKS[: budget["experts"]]
    for task in tasks:
        name = task.removeprefix("bigbench:")
        if name not in library:
            train_into_library([task], args.library, name, "smollm2-135m", config,
                               model_and_tokenizer=model_and_tokenizer)
    private = [t.removeprefix("bigbench:") for t in tasks]
    for method, name in (("uniform", "uniform-merge"), ("ties", "ties-merge")):
        if name not in library:
            merged, _ = merge_experts(library.experts(private), method, name)
            library.add(merged)
    train_seconds = time.perf_counter() - started

    held_out = HELD_OUT[: budget["held_out"]]
    reports = []
    for method in METHODS:
        routed = method in ("arrow", "phatgoose", "centroid")
        report = evaluate_method(method, held_out, args.library, "smollm2-135m",
                                 EvalConfig(limit=budget["limit"]),
                                 experts=private if routed else None,
                                 model_and_tokenizer=model_and_tokenizer,
                                 gate_steps=budget["gate_steps"])
        reports.append(report)
        print(method, report["average"], flush=True)
    _write(args, budget, reports, train_seconds, time.perf_counter() - started)


def _write(args, budget, reports, train_seconds, total_seconds) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads"
    command = "python benchmarks/zero_shot.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "routing"} for r in reports]
    (RESULTS / f"zero_shot_{args.budget}.json").write_text(json.dumps(
        {"command": command, "commit": commit, "machine": machine, "budget": budget,
         "train_tasks": TRAIN_TASKS[: budget["experts"]], "reports": slim}, indent=1))
    tasks = list(reports[0]["tasks"])
    lines = [
        f"# Zero-shot reuse, budget `{args.budget}`", "",
        f"`{command}` at commit `{commit}`, {machine}; {train_seconds / 60:.0f} min to build "
        f"the library, {total_seconds / 60:.0f} min in all.",
        f"Library: {budget['experts']} private experts (SmolLM2-135M-Instruct, LoRA r=4, "
        f"{budget['steps']} steps each), plus their uniform and TIES merges. Held-out tasks: "
        f"BIG-bench Lite multiple choice, at most {budget['limit']} test examples each. "
        "Accuracy (%), log-likelihood scoring.", "",
        "| task | n | " + " | ".join(r["method"] for r in reports) + " |",
        "|---|---:|" + "---:|" * len(reports),
    ]
    for task in tasks:
        cells = [f"{r['tasks'][task]['accuracy']:.1f}" for r in reports]
        n = reports[0]["tasks"][task]["examples"]
        lines.append(f"| {task.removeprefix('bigbench:')} | {n} | " + " | ".join(cells) + " |")
    lines.append("| **average** | | " + " | ".join(
        f"**{r['average']['accuracy']:.1f}**" for r in reports) + " |")
    (RESULTS / f"zero_shot_{args.budget}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
