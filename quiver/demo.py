"""`quiver demo`: the main job on the embedded default, end to end, in a few minutes on a CPU.

For now (the foundation): train one small expert on each of a few BIG-bench tasks with the
real SmolLM2-135M-Instruct into a local library, then print the library as a table. Experts
already in the library are kept, so running it twice is quick (use `fresh` to retrain).
"""

from __future__ import annotations

import time

from rich.console import Console

from quiver.library import Library
from quiver.models import DEFAULT_MODEL, load_base
from quiver.recipes import train_into_library
from quiver.report import library_table
from quiver.training import TrainConfig

DEMO_TASKS = {
    "sports": "bigbench:sports_understanding",
    "dates": "bigbench:date_understanding",
    "counting": "bigbench:object_counting",
}


def run_demo(library_url: str, steps: int, fresh: bool, console: Console) -> Library:
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
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return library
