"""How many steps does a small expert need to learn a reasoning-gym task? A short sweep.

For each candidate task (a few families, short prompts) and each learning rate: the base
model's own-task test scores, then one private expert trained for `--steps` steps with a
validation every `--eval-every` (its validation loss at each: the learning curve), and the
best checkpoint's test scores. Scores are the package's `score_answer` (%), exact match (%)
and the answer's log-likelihood (nats per target token, teacher-forced); the gain is the
expert's minus the base model's, on the same test examples. The families benchmark picks its
steps and learning rate from this table, on training tasks only (no held-out task is scored).

Usage: .venv/bin/python -m benchmarks.gym_sweep [--steps 120] [--eval-every 20] [--lr 1e-3]
       [--limit 40] [--tasks gym:... ...]
Writes benchmarks/results/gym_sweep.{json,md}; each task's result is cached in the run folder
(runs/gym-sweep/), so a stopped sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import RESULTS, provenance, provenance_line, write_json, write_text

CANDIDATES = [  # training candidates of the families benchmark, one or two per family
    "gym:chain_sum?max_digits=2&max_terms=2",
    "gym:gcd?max_value=100",
    "gym:spell_backward?max_word_len=6",
    "gym:letter_counting?max_words=5",
    "gym:simple_equations?max_terms=2",
    "gym:syllogism",
    "gym:number_sequence",
    "gym:family_relationships",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=CANDIDATES)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--limit", type=int, default=40, help="test examples per task")
    parser.add_argument("--run", default="runs/gym-sweep")
    parser.add_argument("--out", default=str(RESULTS / "gym_sweep"))
    args = parser.parse_args()
    started = time.perf_counter()

    from quiver.data import load_task
    from quiver.evaluation import EvalConfig, evaluate
    from quiver.models import load_base
    from quiver.routing import attach_experts, detach_experts
    from quiver.routing.uniform import UniformRouter
    from quiver.training import TrainConfig, train_expert

    model, tokenizer = load_base("smollm2-135m", device="cpu")
    config = EvalConfig(limit=args.limit, batch_size=8)
    rows = []
    for name in args.tasks:
        task = load_task(name)
        for lr in args.lr:
            cache = Path(args.run) / f"{task.name.replace('/', '_')}-lr{lr:g}.json"
            if cache.exists():
                rows.append(json.loads(cache.read_text()))
                continue
            print(f"== {task.name} lr {lr:g}", flush=True)
            base = evaluate(model, tokenizer, [task], config, show_progress=False)
            train = TrainConfig(steps=args.steps, eval_every=args.eval_every, lr=lr,
                                batch_size=args.batch, max_length=args.max_length,
                                eval_examples=32)
            expert, result = train_expert(model, tokenizer, [task], "sweep", train,
                                          show_progress=False)
            attach_experts(model, [expert], UniformRouter())  # the expert alone
            try:
                tuned = evaluate(model, tokenizer, [task], config, show_progress=False)
            finally:
                detach_experts(model)
            row = {"task": task.name, "family": task.metadata.get("family", ""), "lr": lr,
                   "curve": [(h["step"], round(h["valid_loss"], 4)) for h in result.history],
                   "best_step": result.best_step, "seconds": round(result.seconds, 1),
                   "examples": base["tasks"][task.name]["examples"]}
            for metric in ("score", "exact_match", "answer_loglik"):
                row[f"base_{metric}"] = base["tasks"][task.name][metric]
                row[f"expert_{metric}"] = tuned["tasks"][task.name][metric]
            write_json(cache, row, indent=1)
            rows.append(row)
            print(row, flush=True)
    write(args, rows, time.perf_counter() - started)


def write(args, rows: list[dict], seconds: float) -> None:
    record = {**provenance(device="cpu"), "seconds": round(seconds), "rows": rows}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), record, indent=1)
    steps = [step for step, _ in rows[0]["curve"]] if rows else []
    lines = [
        "# How many steps does a small expert need on a reasoning-gym task?", "",
        provenance_line(record),
        f"{seconds / 60:.0f} min this run (cached tasks are read, not retrained).", "",
        f"SmolLM2-135M-Instruct fp32, LoRA r=4 on all linear layers, batch {args.batch}, "
        f"at most {args.max_length} tokens, AdamW with 6% warmup and linear decay over "
        f"{args.steps} steps. Validation loss (nats per target token, EOS included) on 32 "
        f"validation examples every {args.eval_every} steps; test scores on at most "
        f"{args.limit} test examples, base model vs the expert's best checkpoint.", "",
        "| task | family | lr | " + " | ".join(f"loss @{s}" for s in steps)
        + " | score base / expert | exact match base / expert | answer log-lik base / "
          "expert (gain) |",
        "|---|---|---:|" + "---:|" * len(steps) + "---:|---:|---:|",
    ]
    for r in rows:
        gain = r["expert_answer_loglik"] - r["base_answer_loglik"]
        lines.append(
            f"| {r['task'].removeprefix('gym:')} | {r['family']} | {r['lr']:g} | "
            + " | ".join(f"{loss:.3f}" for _, loss in r["curve"])
            + f" | {r['base_score']:.1f} / {r['expert_score']:.1f} | "
              f"{r['base_exact_match']:.1f} / {r['expert_exact_match']:.1f} | "
              f"{r['base_answer_loglik']:.3f} / {r['expert_answer_loglik']:.3f} "
              f"({gain:+.3f}) |")
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
