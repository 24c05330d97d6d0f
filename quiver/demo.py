"""`quiver demo`: the main job on the embedded default, end to end, in a few minutes on a CPU.

1. Train one small expert on each of a few BIG-bench tasks with the real
   SmolLM2-135M-Instruct into a local library and print the library. Experts already in the
   library are kept, so running it twice is quick (use `fresh` to retrain).
2. Compare the base model, the uniform average of the experts and Arrow routing on a few
   held-out BIG-bench tasks that no expert saw, and print the table.
"""

from __future__ import annotations

import time

from rich.console import Console

from quiver.evaluation import EvalConfig
from quiver.library import Library
from quiver.models import DEFAULT_MODEL, load_base
from quiver.recipes import evaluate_method, train_into_library
from quiver.report import comparison_table, library_table
from quiver.training import TrainConfig

# Training tasks outside BIG-bench Lite and Hard; held-out tasks from BIG-bench Lite.
DEMO_TASKS = {
    "social": "bigbench:social_iqa",
    "timedial": "bigbench:timedial",
    "wikidata": "bigbench:qa_wikidata",
}
HELD_OUT = ["bigbench:emoji_movie", "bigbench:strategyqa",
            "bigbench:vitaminc_fact_verification"]
METHODS = ["base", "uniform", "arrow"]


def run_demo(library_url: str, steps: int, fresh: bool, console: Console,
             eval_limit: int = 30) -> Library:
    """Train the demo experts (skipping finished ones unless `fresh`) and print the library."""
    started = time.perf_counter()
    console.print(f"[bold]quiver demo[/]: {len(DEMO_TASKS)} experts on {DEFAULT_MODEL}, "
                  f"{steps} steps each, into {library_url}")
    model_and_tokenizer = load_base(DEFAULT_MODEL)
    library = Library(library_url, create=True)
    config = TrainConfig(steps=steps, batch_size=8, max_length=256, eval_every=max(1, steps // 3),
                         eval_examples=64, lr=1e-3)
    for name, task in DEMO_TASKS.items():
        if name in library and not fresh:
            console.print(f"  {name}: already in the library, kept")
            continue
        console.print(f"  {name}: training on {task}")
        _, result = train_into_library([task], library_url, name, DEFAULT_MODEL, config,
                                       overwrite=fresh, model_and_tokenizer=model_and_tokenizer)
        console.print(f"  {name}: {result.tokens_per_second:,.0f} tokens/s, valid loss "
                      f"{result.history[0]['valid_loss']:.3f} -> {result.best_valid_loss:.3f}")
    console.print(library_table(library))
    console.print(f"zero-shot on {len(HELD_OUT)} held-out tasks ({eval_limit} test examples "
                  "each): base vs uniform merge vs Arrow routing")
    reports = [evaluate_method(method, HELD_OUT, library_url, DEFAULT_MODEL,
                               EvalConfig(limit=eval_limit), top_k=2,
                               model_and_tokenizer=model_and_tokenizer)
               for method in METHODS]
    console.print(comparison_table(reports, "accuracy"))
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return library
