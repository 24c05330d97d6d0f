"""Tables (and, in later steps, plots) that show results to a person."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.table import Table

from quiver.library import Library


def library_table(library: Library) -> Table:
    """One row per expert: tasks, rank, training steps, best validation loss, creation time."""
    names = library.names()
    base = library.base
    title = f"{library.url}: {len(names)} experts" + (f" for {base['name']}" if base else "")
    table = Table("expert", "tasks", "rank", "steps", "valid loss", "source", "created",
                  title=title)
    for name in names:
        info = library.get(name).info
        tasks = ", ".join(t.removeprefix("bigbench:") for t in info.tasks) or "-"
        loss = info.metrics.get("best_valid_loss")
        table.add_row(
            name,
            tasks if len(tasks) < 60 else tasks[:57] + "...",
            str(info.lora.get("r")),
            str(info.training.get("steps_run", "-")),
            f"{loss:.3f}" if isinstance(loss, float) else "-",
            info.source,
            info.created,
        )
    return table


def eval_table(report: dict) -> Table:
    """Per-task metrics and the average of an evaluation report."""
    metrics = [m for m in ("accuracy", "accuracy_norm", "exact_match", "rougeL")
               if m in report["average"]]
    table = Table("task", "n", *metrics,
                  title=f"{report['method']} on {report['model']} ({report['settings']['split']})")
    for name, result in report["tasks"].items():
        cells = [f"{result[m]:.1f}" if m in result else "" for m in metrics]
        table.add_row(name.removeprefix("bigbench:"), str(result["examples"]), *cells)
    table.add_section()
    table.add_row("average", "", *[f"{report['average'][m]:.1f}" for m in metrics])
    return table


def write_report(report: dict, path: Path) -> None:
    """Write a JSON report atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staging.write_text(json.dumps(report, indent=1))
    staging.replace(path)
