"""CPU training throughput: quiver's training loop against a plain PEFT + transformers loop.

Both train the same rank-4 LoRA (all 7 linear modules, paper defaults) on the real
SmolLM2-135M-Instruct, on exactly the same examples (one epoch over the same training
examples of a few BIG-bench tasks), batch size 8, in the same run. Each variant runs in its
own subprocess so that its peak memory (max RSS) is its own.

Variants:
  peft-baseline        textbook loop: random batches padded to the longest example,
                       `model(**batch).loss` with the prompt masked (-100), full logits
  grouped-only         the baseline loop with quiver's length-grouped batches (ablation)
  quiver               `quiver.train_expert`: length-grouped batches + target-only loss
  quiver-bf16          the same with the base model in bf16
  quiver-compile       the same with the decoder wrapped in torch.compile (dynamic shapes)

Usage:  .venv/bin/python benchmarks/train_throughput.py [--per-task 48] [--variants ...]
Writes benchmarks/results/train_throughput.json and .md
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

TASKS = [
    "bigbench:sports_understanding",
    "bigbench:social_iqa",
    "bigbench:epistemic_reasoning",
    "bigbench:word_sorting",
]
VARIANTS = ["peft-baseline", "grouped-only", "quiver", "quiver-bf16", "quiver-compile"]
RESULTS = Path(__file__).parent / "results"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", type=int, default=48)
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per variant")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args)), flush=True)
        return
    rows = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--one", variant, "--per-task", str(args.per_task)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rows.append({"variant": variant, "error": f"not finished in {args.timeout} s"})
            print(rows[-1], flush=True)
            continue
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{variant} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            rows.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(line[7:]))
        print(rows[-1], flush=True)
    _write(rows, args)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the architecture where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _write(rows: list[dict], args) -> None:
    baseline = next((r for r in rows if r["variant"] == "peft-baseline" and "error" not in r), None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads"
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
    record = {"command": command, "commit": commit, "machine": machine,
              "torch": torch.__version__, "tasks": TASKS, "per_task": args.per_task,
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Training throughput (CPU)", "",
        f"`{command}` at commit `{commit}`, {machine}, torch {torch.__version__}.",
        f"SmolLM2-135M-Instruct, LoRA r=4 on 7 modules, batch 8, max length 256, one epoch over "
        f"{args.per_task} training examples of each of {', '.join(TASKS)}.", "",
        "| variant | steps | tokens | tokens/s | speed-up vs PEFT loop | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | | | |")
            continue
        ratio = r["tokens_per_second"] / baseline["tokens_per_second"] if baseline else float("nan")
        lines.append(f"| {r['variant']} | {r['steps']} | {r['tokens']} | "
                     f"{r['tokens_per_second']:.0f} | {ratio:.2f}x | {r['peak_rss_mib']} |")
    (RESULTS / "train_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
