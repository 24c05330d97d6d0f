"""CPU training throughput: quiver's training loop against a plain PEFT + transformers loop.

Both train the same rank-4 LoRA (all 7 linear modules, paper defaults) on the real
SmolLM2-135M-Instruct, on exactly the same examples (one epoch over the same training
examples of a few reasoning-gym tasks), batch size 8, in the same run. Each variant runs in its
own subprocess so that its peak memory (max RSS) is its own.

Variants:
  peft-baseline        textbook loop: random batches padded to the longest example,
                       `model(**batch).loss` with the prompt masked (-100), full logits
  grouped-only         the baseline loop with quiver's length-grouped batches (ablation)
  quiver               `quiver.train_expert`: length-grouped batches + target-only loss
  quiver-bf16          the same with the base model in bf16
  quiver-compile       the same with the decoder wrapped in torch.compile (dynamic shapes)

Usage:  .venv/bin/python -m benchmarks.train_throughput [--per-task 48] [--variants ...]
Writes benchmarks/results/train_throughput.json and .md

--memory: batch 16 x 512 tokens (long gym:rotten_oranges examples, fp32), whole and
in parts (`micro_batch_tokens`), with and without gradient checkpointing, and quiver's `auto`
choice, and parts / checkpointing with the lean allocator (glibc's mmap threshold fixed, as
the memory plan does when memory is tight); each run in its own process, the variants in
rounds, alternating order, so that a shared CPU's drift falls on all of them. Writes
results/train_throughput_memory.json and .md

--parallel: two trainings at once in two processes with 1 thread each, against the same two
one after the other with 2 threads (what `quiver build --workers 2` does against
`--workers 1`), rounds in alternating order. Writes results/train_throughput_parallel.*
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from multiprocessing.pool import ThreadPool

import torch

from benchmarks.common import (
    RESULTS,
    ROOT,
    provenance,
    provenance_line,
    python_module,
    write_json,
    write_text,
)

TASKS = [  # reasoning-gym tasks of 44 to 123 tokens (the committed results were measured on
    # BIG-bench's sports_understanding, social_iqa, epistemic_reasoning and word_sorting)
    "gym:syllogism",
    "gym:family_relationships",
    "gym:word_sorting",
    "gym:knights_knaves",
]
VARIANTS = ["peft-baseline", "grouped-only", "quiver", "quiver-bf16", "quiver-compile"]
# 239 of its first 300 examples reach 512 tokens (the committed memory results were measured
# on BIG-bench's logic_grid_puzzle)
LONG_TASK, LONG_BATCH, LONG_LENGTH = "gym:rotten_oranges", 16, 512
WHOLE = LONG_BATCH * LONG_LENGTH  # a part this big is the whole batch
MEMORY_VARIANTS = {  # TrainConfig settings of each --memory variant
    "whole": {"micro_batch_tokens": WHOLE, "gradient_checkpointing": "off"},
    "parts-2048": {"micro_batch_tokens": 2048, "gradient_checkpointing": "off"},
    "parts-512": {"micro_batch_tokens": 512, "gradient_checkpointing": "off"},
    "checkpointing": {"micro_batch_tokens": WHOLE, "gradient_checkpointing": "on"},
    "auto": {"micro_batch_tokens": 0, "gradient_checkpointing": "auto"},
}
# Variants run with glibc's mmap threshold fixed (`quiver.training.memory.return_freed_memory`,
# which the memory plan uses only when memory is tight): less peak RSS, more page faults per
# step.
LEAN_VARIANTS = {
    "parts-512-lean": MEMORY_VARIANTS["parts-512"],
    "checkpointing-lean": MEMORY_VARIANTS["checkpointing"],
}


def _task(per_task: int):
    """One pooled task holding `per_task` training examples of each benchmark task."""
    from quiver.data import SplitConfig, Task, load_task

    examples = []
    for name in TASKS:
        examples += load_task(name).split("train", SplitConfig())[:per_task]
    return Task("benchmark-pool", examples, kind="gen")


def _config(args, **overrides):
    from quiver.training import TrainConfig

    fields = dict(epochs=1.0, batch_size=8, max_length=256, eval_every=10_000, eval_examples=8,
                  seed=0)
    return TrainConfig(**{**fields, **overrides})


def run_variant(variant: str, args) -> dict:
    """Train one epoch with one variant; returns tokens/s (step time only) and peak memory."""
    from quiver.models import load_base

    dtype = torch.bfloat16 if variant == "quiver-bf16" else torch.float32
    model, tokenizer = load_base("smollm2-135m", device="cpu", dtype=dtype)
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    task = _task(args.per_task)
    config = _config(args)
    if variant.startswith("quiver"):
        from quiver.training import train_expert

        if variant == "quiver-compile":
            decoder = model.model
            decoder.forward = torch.compile(decoder.forward, dynamic=True)
        # the validation set is pooled with the train split; zero valid examples would skip it
        _, result = train_expert(model, tokenizer, [task], "bench", config, show_progress=False)
        tokens, seconds, steps = result.tokens, result.seconds, result.steps
    else:
        tokens, seconds, steps = _plain_loop(model, tokenizer, task, config,
                                             grouped=variant == "grouped-only")
    return {
        "variant": variant,
        "steps": steps,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_after_load_mib": round(rss_after_load),
    }


def _plain_loop(model, tokenizer, task, config, grouped: bool) -> tuple[int, float, int]:
    """The textbook PEFT loop a user would write, on the same examples and hyperparameters."""
    from peft import LoraConfig, get_peft_model

    from quiver.data.batching import collate, length_grouped_batches, tokenize_example

    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                  lr=config.lr)
    examples = [tokenize_example(tokenizer, e, config.max_length)
                for e in task.split("train", config.split_config())]
    if grouped:
        batches = length_grouped_batches([len(e) for e in examples], config.batch_size, seed=0)
    else:
        order = list(range(len(examples)))
        random.Random(0).shuffle(order)
        batches = [order[i : i + config.batch_size]
                   for i in range(0, len(order), config.batch_size)]
    peft_model.train()
    tokens, seconds = 0, 0.0
    for indices in batches:
        batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
        started = time.perf_counter()
        loss = peft_model(**batch).loss  # full logits; prompt and padding labelled -100
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
        tokens += int(batch["attention_mask"].sum())
    return tokens, seconds, len(batches)


# ------------------------------------------------------------------ --memory: 16 x 512
def run_memory_variant(variant: str, args) -> dict:
    """Train `args.steps` steps of 16 x 512 tokens with one variant's memory settings."""
    from quiver.data import SplitConfig, Task, load_task
    from quiver.data.batching import tokenize_example
    from quiver.models import load_base
    from quiver.training import (
        TrainConfig,
        activation_bytes_per_token,
        available_memory,
        train_expert,
    )
    from quiver.training.memory import return_freed_memory

    settings = {**MEMORY_VARIANTS, **LEAN_VARIANTS}[variant]
    if variant in LEAN_VARIANTS:
        return_freed_memory()
    model, tokenizer = load_base("smollm2-135m", device="cpu", dtype=torch.float32)
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = TrainConfig(epochs=1.0, batch_size=LONG_BATCH, max_length=LONG_LENGTH,
                         eval_every=10_000, eval_examples=1, max_train=LONG_BATCH * args.steps,
                         seed=0, **settings)
    task = load_task(LONG_TASK)  # only examples of at least 512 tokens: every batch is 16 x 512
    long = [e for e in task.split("train", SplitConfig())
            if len(tokenize_example(tokenizer, e, 10_000)) >= LONG_LENGTH]
    part = min(config.micro_batch_tokens or WHOLE, WHOLE)
    needs = part * activation_bytes_per_token(model, config.gradient_checkpointing == "on", 0.05)
    if needs > 0.8 * available_memory("cpu"):  # would swap or be killed, taking others along
        return {"variant": variant, "error": f"skipped: needs ~{needs / 2**30:.0f} GiB, "
                                             f"{available_memory('cpu') / 2**30:.0f} GiB free"}
    _, result = train_expert(model, tokenizer, [Task("long", long, kind="gen")], "bench",
                             config, show_progress=False)
    return {
        "variant": variant,
        "plan": result.memory.describe().split(" (")[0]
        + (", lean allocator" if variant in LEAN_VARIANTS or result.memory.lean_allocator else ""),
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 2),
        "tokens_per_second": round(result.tokens / result.seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_after_load_mib": round(rss_after_load),
    }


def _memory_benchmark(args) -> None:
    """Each variant once per round, in its own process; reversed order every other round."""
    variants = (args.variants if args.variants != VARIANTS
                else list(MEMORY_VARIANTS) + list(LEAN_VARIANTS))
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            runs[variant].append(_in_subprocess(["--memory", "--one", variant, "--steps",
                                                 str(args.steps)], args.timeout))
    rows = [_pool(variant, done) for variant, done in runs.items()]
    _write_memory(rows, args)


def _pool(variant: str, runs: list[dict]) -> dict:
    """One row per variant: tokens/s over all its rounds, the highest peak RSS."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"variant": variant, "error": runs[0]["error"]}
    tokens, seconds = sum(r["tokens"] for r in ok), sum(r["seconds"] for r in ok)
    return {"variant": variant, "plan": ok[0]["plan"], "rounds": len(ok),
            "steps": sum(r["steps"] for r in ok), "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_second": round(tokens / seconds, 2),
            "per_round_tokens_per_second": [r["tokens_per_second"] for r in ok],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
            "rss_after_load_mib": ok[0]["rss_after_load_mib"]}


def _write_memory(rows: list[dict], args) -> None:
    reference = next((r for r in rows if r["variant"] == "whole" and "error" not in r),
                     next((r for r in rows if r["variant"] == "parts-2048"), None))
    record = {**_provenance(), "task": LONG_TASK, "batch": f"{LONG_BATCH} x {LONG_LENGTH}",
              "steps_per_round": args.steps, "rounds": args.rounds,
              "reference": reference and reference["variant"], "rows": rows}
    table = ["| variant | runs as | tokens/s | per round | vs reference | peak RSS (MiB) |",
             "|---|---|---:|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['variant']} | {r['error']} | | | | |")
            continue
        ratio = r["tokens_per_second"] / reference["tokens_per_second"] if reference else math.nan
        rounds = ", ".join(f"{x:.1f}" for x in r["per_round_tokens_per_second"])
        table.append(f"| {r['variant']} | {r['plan']} | {r['tokens_per_second']:.1f} | {rounds} "
                     f"| {ratio:.2f}x | {r['peak_rss_mib']} |")
    _save("train_throughput_memory", record, "Training memory: batch 16 x 512 (CPU)",
          f"SmolLM2-135M-Instruct in fp32, LoRA r=4 on 7 modules, {args.steps} step(s) of 16 "
          f"examples x 512 tokens of {LONG_TASK} per round, {args.rounds} rounds in alternating "
          f"order, each run in its own process. Ratios against `{record['reference']}`.", table)


# ---------------------------------------------------------- --parallel: two trainings at once
def run_job(seed: int, threads: int, args) -> dict:
    """One training of the pooled benchmark task with `threads` CPU threads."""
    torch.set_num_threads(threads)
    from quiver.models import load_base
    from quiver.training import train_expert

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, tokenizer = load_base("smollm2-135m", device="cpu", dtype=dtype)
    _, result = train_expert(model, tokenizer, [_task(args.per_task)], "bench",
                             _config(args, seed=seed), show_progress=False)
    return {"seed": seed, "threads": threads, "tokens": result.tokens,
            "seconds": round(result.seconds, 2)}


def _parallel_benchmark(args) -> None:
    """The same two trainings one after the other (2 threads) and at once (1 thread each)."""
    ways = {"one after the other, 2 threads": False, "two at once, 1 thread each": True}
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for round_ in range(args.rounds):
        for way in list(ways) if round_ % 2 == 0 else list(ways)[::-1]:
            runs[way].append(_two_jobs(ways[way], args))
            print(way, runs[way][-1], flush=True)
    rows = []
    for way, done in runs.items():
        tokens = sum(r["tokens"] for r in done)
        rows.append({"way": way, "rounds": len(done), "tokens": tokens,
                     "wall_seconds": round(sum(r["wall"] for r in done), 1),
                     "tokens_per_second": round(tokens / sum(r["wall"] for r in done), 1),
                     "loop_tokens_per_second": round(tokens / sum(r["loop"] for r in done), 1),
                     "per_round_tokens_per_second": [round(r["tokens"] / r["wall"], 1)
                                                     for r in done]})
    _write_parallel(rows, args)


def _two_jobs(at_once: bool, args) -> dict:
    """Wall time and tokens of the two trainings (seeds 0 and 1), model loading included."""
    threads = 1 if at_once else 2
    started = time.perf_counter()
    if at_once:
        with ThreadPool(2) as pool:
            jobs = pool.map(lambda seed: _job_process(seed, threads, args), [0, 1])
    else:
        jobs = [_job_process(seed, threads, args) for seed in (0, 1)]
    wall = time.perf_counter() - started
    seconds = [j["seconds"] for j in jobs]
    return {"tokens": sum(j["tokens"] for j in jobs), "wall": wall,
            "loop": max(seconds) if at_once else sum(seconds)}


def _job_process(seed: int, threads: int, args) -> dict:
    extra = ["--job", str(seed), "--threads", str(threads), "--per-task", str(args.per_task),
             "--dtype", args.dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = _in_subprocess(extra, args.timeout, env)
    if "error" in result:
        raise RuntimeError(f"job {seed} failed: {result['error']}")
    return result


def _write_parallel(rows: list[dict], args) -> None:
    record = {**_provenance(), "tasks": TASKS, "per_task": args.per_task, "rounds": args.rounds,
              "rows": rows}
    first = rows[0]["tokens_per_second"]
    table = ["| way | tokens/s | in loop | per round | vs one after the other |",
             "|---|---:|---:|---|---:|"]
    for r in rows:
        rounds = ", ".join(f"{x:.0f}" for x in r["per_round_tokens_per_second"])
        table.append(f"| {r['way']} | {r['tokens_per_second']:.0f} | "
                     f"{r['loop_tokens_per_second']:.0f} | {rounds} | "
                     f"{r['tokens_per_second'] / first:.2f}x |")
    suffix = "" if args.dtype == "fp32" else f"_{args.dtype}"
    _save(f"train_throughput_parallel{suffix}", record, "Two trainings at once (CPU)",
          f"Two trainings (seeds 0 and 1) of SmolLM2-135M-Instruct, {args.dtype}, LoRA r=4, batch "
          f"8, max length 256, one epoch over {args.per_task} examples of each of "
          f"{', '.join(TASKS)}; {args.rounds} rounds in alternating order. Aggregate tokens/s "
          "over the wall time of both, model loading included; `in loop` counts step time only.",
          table)


# ---------------------------------------------------------------------------- running
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", type=int, default=48)
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per variant")
    parser.add_argument("--memory", action="store_true", help="16 x 512: parts, checkpointing")
    parser.add_argument("--parallel", action="store_true", help="two trainings at once or not")
    parser.add_argument("--steps", type=int, default=1, help="--memory: steps per run")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="--parallel")
    parser.add_argument("--rounds", type=int, default=2, help="--memory, --parallel: rounds")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--job", type=int, help=argparse.SUPPRESS)  # internal: --parallel job
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one or args.job is not None:
        if args.job is not None:
            row = run_job(args.job, args.threads, args)
        else:
            row = run_memory_variant(args.one, args) if args.memory else run_variant(args.one, args)
        print("RESULT " + json.dumps(row), flush=True)
        return
    if args.memory:
        return _memory_benchmark(args)
    if args.parallel:
        return _parallel_benchmark(args)
    rows = [_in_subprocess(["--one", variant, "--per-task", str(args.per_task)], args.timeout)
            for variant in args.variants]
    _write(rows, args)


def _in_subprocess(extra: list[str], timeout: int, env: dict | None = None) -> dict:
    """Run this benchmark with `extra` arguments in a fresh process; its RESULT row or an
    error."""
    name = extra[extra.index("--one") + 1] if "--one" in extra else f"job {extra}"
    try:
        done = subprocess.run(python_module("benchmarks.train_throughput", *extra),
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        row = {"variant": name, "error": f"not finished in {timeout} s"}
        print(row, flush=True)
        return row
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return {"variant": name, "error": " ".join(done.stderr.strip().splitlines()[-1:])}
    row = json.loads(line[7:])
    print(row, flush=True)
    return row


def _provenance() -> dict:
    """Command, commit and machine, and how busy the machine was (other jobs slow the
    variants that ran beside them)."""
    return {**provenance(device="cpu"),
            "load_average_at_end": [round(x, 1) for x in os.getloadavg()]}


def _write(rows: list[dict], args) -> None:
    baseline = next((r for r in rows if r["variant"] == "peft-baseline" and "error" not in r), None)
    record = {**_provenance(), "tasks": TASKS, "per_task": args.per_task, "rows": rows}
    table = ["| variant | steps | tokens | tokens/s | speed-up vs PEFT loop | peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['variant']} | {r['error']} | | | | |")
            continue
        ratio = r["tokens_per_second"] / baseline["tokens_per_second"] if baseline else math.nan
        table.append(f"| {r['variant']} | {r['steps']} | {r['tokens']} | "
                     f"{r['tokens_per_second']:.0f} | {ratio:.2f}x | {r['peak_rss_mib']} |")
    _save("train_throughput", record, "Training throughput (CPU)",
          f"SmolLM2-135M-Instruct, LoRA r=4 on 7 modules, batch 8, max length 256, one epoch "
          f"over {args.per_task} training examples of each of {', '.join(TASKS)}.", table)


def _save(name: str, record: dict, title: str, setup: str, table: list[str]) -> None:
    """results/NAME.json (the record) and results/NAME.md (provenance, setup, table)."""
    write_json(RESULTS / f"{name}.json", record, indent=2)
    lines = [f"# {title}", "", provenance_line(record), setup, "", *table]
    write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
