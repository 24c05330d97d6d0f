"""Evaluation harness speed: multiple-choice scoring one example at a time vs batched.

Scores the first `--tasks` of the reasoning-gym tasks with closed answer sets, as multiple
choice (`quiver lm-eval-tasks`' default list, at most `--limit` test examples each) with the real
SmolLM2-135M-Instruct, routed with `--method` over `--library` (or the bare model), twice in
the same process: `batch_size=1` (every example alone: the prompt once, its options batched)
and `batch_size=8` (several examples' prompts in one left-padded batch, all their options in
one batch). Both must give the same accuracy; the ratio of their times is the speed-up.

Usage: .venv/bin/python -m benchmarks.eval_speed [--library demo-library/private]
       [--method arrow] [--tasks 10] [--limit 200]
Writes benchmarks/results/eval_speed_gym_<method>_<limit>.{json,md} (the files without `gym_`
were measured on BIG-bench Lite, when the registry still served it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import RESULTS, provenance, provenance_line, write_json, write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=None)
    parser.add_argument("--method", default="base")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for the tables (default benchmarks/results)")
    args = parser.parse_args()

    from quiver.evaluation import EvalConfig
    from quiver.evaluation.lm_eval_tasks import GYM_MC_TASKS
    from quiver.models import load_base
    from quiver.recipes import evaluate_method

    model_and_tokenizer = load_base("smollm2-135m", device="cpu")
    tasks = GYM_MC_TASKS[: args.tasks]
    rows = []
    for batch_size in args.batch_sizes:
        started = time.perf_counter()
        report = evaluate_method(args.method, tasks, args.library, "smollm2-135m",
                                 EvalConfig(limit=args.limit, batch_size=batch_size),
                                 model_and_tokenizer=model_and_tokenizer)
        seconds = time.perf_counter() - started
        examples = sum(r["examples"] for r in report["tasks"].values())
        rows.append({"batch_size": batch_size, "seconds": round(seconds, 1),
                     "examples": examples, "accuracy": round(report["average"]["accuracy"], 2),
                     "experts": len(report["experts"])})
        print(rows[-1], flush=True)
    record = {**provenance(device="cpu"), "tasks": tasks, "method": args.method, "rows": rows}
    stem = args.results / f"eval_speed_gym_{args.method.replace(':', '-')}_{args.limit}"
    write_json(stem.with_suffix(".json"), record, indent=1)
    lines = [
        "# Evaluation harness speed (CPU)", "",
        provenance_line(record),
        f"SmolLM2-135M-Instruct fp32, method `{args.method}` ({rows[0]['experts']} experts), "
        f"{len(tasks)} reasoning-gym tasks scored as multiple choice over their closed answer "
        f"sets ({', '.join(tasks)}), at most {args.limit} test examples each.", "",
        "| examples per batch | examples | minutes | seconds per example | accuracy |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['examples']} | {r['seconds'] / 60:.1f} | "
                     f"{r['seconds'] / r['examples']:.3f} | {r['accuracy']} |")
    if len(rows) > 1:
        lines.append(f"\nSpeed-up from batching examples: "
                     f"{rows[0]['seconds'] / rows[-1]['seconds']:.2f}x.")
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
