"""lm-evaluation-harness through quiver's bridge against `quiver eval`, on SmolLM2: the same
examples, the same accuracy? And how fast is the bridge on the same work?

For `base` and Arrow over a small private library (built first if missing: the --train
tasks, --steps each), on held-out reasoning-gym tasks scored as multiple choice over their
closed answer sets (at most --limit examples
of each, `--split all`: the first of quiver's seeded order), in one process on one loaded
model:
- `quiver eval` (`recipes.evaluate_method`), recording the options' log-probabilities;
- lm-eval's `simple_evaluate` on `QuiverLM`, over the task configs `quiver lm-eval-tasks`
  writes (lm-eval's `--limit` takes the same examples), with every sample logged;
- lm-eval's own Hugging Face model (`HFLM`) on the same routed model: an independent scorer.
It compares accuracy with lm-eval's `acc` example by example, `accuracy_char_norm` with
`acc_norm` (and each with the other's rule applied to the same log-likelihoods), and the
options' log-likelihoods; and times `quiver eval` and the bridge side by side (--rounds
rounds, alternating, the fastest of each; the model loaded, lm-eval's task index built).

Usage: .venv/bin/python -m benchmarks.lm_eval_agreement [--limit 50] [--rounds 2]
Writes benchmarks/results/lm_eval_agreement_gym.{json,md} (lm_eval_agreement.{json,md} were
measured on BIG-bench tasks, when the registry still served them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, provenance, provenance_line, write_json, write_text

TRAIN = ["gym:basic_arithmetic?max_digits=2&max_terms=2", "gym:spell_backward?max_word_len=6",
         "gym:letter_counting?max_words=5"]
HELD_OUT = ["gym:syllogism?mc=true", "gym:ransom_note?mc=true", "gym:course_schedule?mc=true"]
BASE = "smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default="runs/lmeval-gym-lib")
    parser.add_argument("--train", nargs="+", default=TRAIN)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tasks", nargs="+", default=HELD_OUT)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/lmeval-agreement", help="task configs go here")
    parser.add_argument("--out", default=str(RESULTS / "lm_eval_agreement_gym"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()[0]

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import quiver.evaluation.harness as harness
    from quiver.evaluation import EvalConfig
    from quiver.evaluation.lm_eval_tasks import lm_eval_name, write_task_configs
    from quiver.lm_eval_bridge import QuiverLM
    from quiver.models import load_base
    from quiver.recipes import evaluate_method

    library = _library(args)
    written = write_task_configs(args.work, args.tasks)
    clock = time.perf_counter()
    manager = TaskManager(include_path=str(Path(args.work).resolve()), include_defaults=False)
    index_seconds = time.perf_counter() - clock
    model, tokenizer = load_base(BASE, device="cpu")
    names = [w.name for w in written]
    config = EvalConfig(split="all", limit=args.limit, batch_size=args.batch_size)
    recorded: dict = {}
    scoring = harness.score_choices_batch

    def recording(model, tokenizer, examples):  # quiver eval's own log-probabilities
        scores = scoring(model, tokenizer, examples)
        for example, score in zip(examples, scores, strict=True):
            recorded[(example.prompt, example.options)] = score.log_probs
        return scores

    def quiver_eval(method):
        return evaluate_method(method, args.tasks, None if method == "base" else library, BASE,
                               config, model_and_tokenizer=(model, tokenizer),
                               show_progress=False)

    def bridge(method):
        lm = QuiverLM(library=None if method == "base" else library, method=method,
                      model=model, tokenizer=tokenizer, batch_size=args.batch_size)
        try:
            return lm_eval.simple_evaluate(model=lm, tasks=names, limit=args.limit,
                                           task_manager=manager, log_samples=True,
                                           bootstrap_iters=0)
        finally:
            lm.close()

    methods, timings = {}, {"quiver eval": {}, "lm-eval bridge": {}, "lm-eval HFLM": {}}
    for method in ("base", "arrow"):
        runs = {"quiver eval": [], "lm-eval bridge": []}
        for _ in range(args.rounds):
            for label, run in (("quiver eval", quiver_eval), ("lm-eval bridge", bridge)):
                harness.score_choices_batch = recording
                clock = time.perf_counter()
                try:
                    result = run(method)
                finally:
                    harness.score_choices_batch = scoring
                runs[label].append((time.perf_counter() - clock, result))
        lm = QuiverLM(library=None if method == "base" else library, method=method,
                      model=model, tokenizer=tokenizer, batch_size=args.batch_size)
        try:
            clock = time.perf_counter()
            independent = lm_eval.simple_evaluate(
                model=HFLM(pretrained=lm.model, tokenizer=tokenizer,
                           batch_size=args.batch_size),
                tasks=names, limit=args.limit, task_manager=manager, log_samples=True,
                bootstrap_iters=0)
            timings["lm-eval HFLM"][method] = time.perf_counter() - clock
        finally:
            lm.close()
        for label, rows in runs.items():
            timings[label][method] = min(seconds for seconds, _ in rows)
        report, results = runs["quiver eval"][0][1], runs["lm-eval bridge"][0][1]
        methods[method] = {
            "experts": report["experts"],
            "tasks": {task: _compare(task, lm_eval_name(task), report, results, independent,
                                     recorded, args.limit) for task in args.tasks}}
        print(json.dumps({method: methods[method]}, indent=1), flush=True)

    # the load average says whether other jobs shared the machine (they slow both sides)
    data = {**provenance(device="cpu"), "load_average_at_start": round(load, 1),
            "lm_eval": lm_eval.__version__, "model": BASE,
            "library": library, "train_tasks": args.train, "steps": args.steps,
            "limit": args.limit, "batch_size": args.batch_size, "rounds": args.rounds,
            "task_index_seconds": round(index_seconds, 2), "methods": methods,
            "seconds": {label: {m: round(s, 2) for m, s in per.items()}
                        for label, per in timings.items()},
            "total_seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), data, indent=1)
    write_text(out.with_suffix(".md"), _markdown(data))
    print(_markdown(data))


def _library(args) -> str:
    """The small private library: built (args.train, args.steps) unless it is there."""
    from quiver.build import BuildConfig, build_library, expert_name
    from quiver.library import Library
    from quiver.training import TrainConfig

    url = args.library
    try:
        if set(Library(url).names()) >= {expert_name(t) for t in args.train}:
            return url
    except Exception:  # noqa: BLE001 - no library yet
        pass
    print(f"building {url}: {args.train}, {args.steps} steps each", flush=True)
    build_library(args.train, url, BASE,
                  TrainConfig(steps=args.steps, eval_examples=32, max_length=256),
                  BuildConfig(strategy="private", workers=1), show_progress=False)
    return url


def _compare(task: str, name: str, report: dict, results: dict, independent: dict,
             recorded: dict, limit: int) -> dict:
    """One task: quiver eval's metrics, lm-eval's through the bridge and through HFLM, and
    where they differ example by example."""
    from quiver.data import load_task

    ours = report["tasks"][task]
    examples = load_task(task).split("all")[:limit]
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    hf_samples = sorted(independent["samples"][name], key=lambda s: s["doc_id"])
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    hf_lls = [[float(r[0][0]) for r in s["resps"]] for s in hf_samples]
    quiver_lls = [recorded[(e.prompt, e.options)] for e in examples]
    options = [e.options for e in examples]
    answers = [e.answer for e in examples]

    def rule(values, leading: str) -> list[float]:  # argmax of log-likelihood per character
        return [float(np.argmax(np.array(v) / [len(leading + o) for o in opts]) == a)
                for v, opts, a in zip(values, options, answers, strict=True)]

    acc = [s["acc"] for s in samples]
    acc_norm = [s["acc_norm"] for s in samples]
    return {
        "examples": ours["examples"],
        "quiver_accuracy": ours["accuracy"],
        "lm_eval_acc": 100 * results["results"][name]["acc,none"],
        "hflm_acc": 100 * independent["results"][name]["acc,none"],
        "acc_examples_differing": sum(a != b for a, b in
                                      zip(acc, ours["per_example"]["accuracy"], strict=True)),
        "hflm_acc_examples_differing": sum(a != s["acc"] for a, s in
                                           zip(acc, hf_samples, strict=True)),
        "quiver_accuracy_char_norm": ours["accuracy_char_norm"],
        "lm_eval_acc_norm": 100 * results["results"][name]["acc_norm,none"],
        "acc_norm_examples_differing": sum(
            a != b for a, b in zip(acc_norm, ours["per_example"]["accuracy_char_norm"],
                                   strict=True)),
        # the difference is the option's leading space: each rule on the other's numbers
        "lm_eval_rule_on_quiver_log_probs_equals_acc_norm": rule(quiver_lls, "") == acc_norm,
        "quiver_rule_on_lm_eval_log_probs_equals_char_norm":
            rule(lls, " ") == ours["per_example"]["accuracy_char_norm"],
        "max_abs_log_prob_difference_bridge_vs_quiver": _max_diff(lls, quiver_lls),
        "max_abs_log_prob_difference_hflm_vs_quiver": _max_diff(hf_lls, quiver_lls),
    }


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return float(np.max(np.abs(np.concatenate(a) - np.concatenate(b))))


def _markdown(data: dict) -> str:
    lines = [
        "# lm-evaluation-harness through quiver's bridge vs `quiver eval` (SmolLM2)", "",
        provenance_line(data),
        f"lm-eval {data['lm_eval']}; load average {data['load_average_at_start']} at the "
        f"start; total {data['total_seconds'] / 60:.1f} min.",
        f"SmolLM2-135M-Instruct fp32; library `{data['library']}`: private experts on "
        f"{', '.join(t.removeprefix('gym:') for t in data['train_tasks'])} "
        f"({data['steps']} steps each); at most {data['limit']} examples per task, "
        "`--split all` (quiver's seeded order; lm-eval's `--limit` over the written configs "
        f"takes the same), batch {data['batch_size']}.", "",
        "Accuracy (%): `quiver eval`'s `accuracy` / lm-eval's `acc` through the bridge / "
        "lm-eval's `acc` with its own HF model (HFLM) on the same routed model; examples "
        "where the bridge's `acc` differs from quiver's; per character: `accuracy_char_norm` "
        "/ `acc_norm` and the examples where they differ (explained when each rule on the "
        "other's log-likelihoods gives the other's result); the largest difference of an "
        "option's log-likelihood from quiver's, bridge and HFLM.", "",
        "| method | task | n | accuracy / acc / HFLM acc | acc differs | char_norm / acc_norm "
        "| differs (explained) | max log p difference: bridge, HFLM |",
        "|---|---|---:|---|---:|---|---|---|",
    ]
    for method, per in data["methods"].items():
        for task, r in per["tasks"].items():
            explained = (r["lm_eval_rule_on_quiver_log_probs_equals_acc_norm"]
                         and r["quiver_rule_on_lm_eval_log_probs_equals_char_norm"])
            lines.append(
                f"| {method} | {task.removeprefix('gym:')} | {r['examples']} | "
                f"{r['quiver_accuracy']:.1f} / {r['lm_eval_acc']:.1f} / {r['hflm_acc']:.1f} | "
                f"{r['acc_examples_differing']} | {r['quiver_accuracy_char_norm']:.1f} / "
                f"{r['lm_eval_acc_norm']:.1f} | {r['acc_norm_examples_differing']} "
                f"({'yes' if explained else 'NO'}) | "
                f"{r['max_abs_log_prob_difference_bridge_vs_quiver']:.1e}, "
                f"{r['max_abs_log_prob_difference_hflm_vs_quiver']:.1e} |")
    rows = [r for per in data["methods"].values() for r in per["tasks"].values()]
    explained = all(r["lm_eval_rule_on_quiver_log_probs_equals_acc_norm"]
                    and r["quiver_rule_on_lm_eval_log_probs_equals_char_norm"] for r in rows)
    worst = max(max(r["max_abs_log_prob_difference_bridge_vs_quiver"],
                    r["max_abs_log_prob_difference_hflm_vs_quiver"]) for r in rows)
    lines += ["", f"Over all {sum(r['examples'] for r in rows)} scored examples: lm-eval's "
              f"`acc` differs from quiver's `accuracy` on "
              f"{sum(r['acc_examples_differing'] for r in rows)} (through the bridge) and "
              f"{sum(r['hflm_acc_examples_differing'] for r in rows)} (HFLM against the "
              f"bridge); `acc_norm` from `accuracy_char_norm` on "
              f"{sum(r['acc_norm_examples_differing'] for r in rows)}, "
              + ("every one explained by the option's leading space: lm-eval divides by "
                 "`len(option)`, quiver by `len(' ' + option)`, and each rule applied to the "
                 "other's log-likelihoods gives the other's predictions exactly"
                 if explained else "NOT all explained by the leading space")
              + f". Every option's log-likelihood is within {worst:.1e} of quiver's, both "
              "through the bridge and with lm-eval's HFLM, which scores each option in a "
              "right-padded full forward pass (no shared KV cache): an independent "
              "implementation."]
    seconds = data["seconds"]
    lines += ["", "Time on the same work (seconds, the fastest of "
              f"{data['rounds']} alternating rounds; model loaded, experts attached inside "
              "the timing; lm-eval's time includes building its documents and requests from "
              "the JSONL and its metrics):", "",
              "| method | quiver eval | lm-eval bridge | bridge / quiver eval | lm-eval HFLM "
              "(once) |", "|---|---:|---:|---:|---:|"]
    for method in data["methods"]:
        q, b = seconds["quiver eval"][method], seconds["lm-eval bridge"][method]
        lines.append(f"| {method} | {q:.1f} | {b:.1f} | {b / q:.2f}x | "
                     f"{seconds['lm-eval HFLM'][method]:.1f} |")
    lines += ["", f"lm-eval's task index over the written configs alone: "
              f"{data['task_index_seconds']:.1f} s (its command line also indexes its own "
              "thousands of tasks, about 14 s here, once per run)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
