"""Tables (and, in later steps, plots) that show results to a person."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from quiver.library import Library

if TYPE_CHECKING:
    from quiver.build import JobOutcome


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


def build_table(outcomes: list[JobOutcome], title: str) -> Table:
    """One row per job of a build (`quiver.build.JobOutcome`): what it trained, or why not."""
    table = Table("expert", "tasks", "status", "steps", "valid loss", "seconds", "tries",
                  "error", title=title)
    for o in outcomes:
        tasks = ", ".join(t.removeprefix("bigbench:") for t in o.tasks) or "-"
        status = {"failed": "[red]failed[/]", "trained": "[green]trained[/]"}.get(o.status,
                                                                                 o.status)
        table.add_row(
            o.name,
            tasks if len(tasks) < 60 else tasks[:57] + "...",
            status,
            "-" if o.steps is None else str(o.steps),
            f"{o.best_valid_loss:.3f}" if isinstance(o.best_valid_loss, float) else "-",
            f"{o.seconds:.1f}" if o.status == "trained" else "-",
            str(o.attempts or "-"),
            o.error,
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


def comparison_table(reports: list[dict], metric: str) -> Table:
    """One row per task, one column per method: `metric` of each (and the average)."""
    table = Table("task", *[r["method"] for r in reports], title=f"{metric} (%)")
    for task in reports[0]["tasks"]:
        table.add_row(task.removeprefix("bigbench:"),
                      *[f"{r['tasks'][task].get(metric, float('nan')):.1f}" for r in reports])
    table.add_section()
    table.add_row("average", *[f"{r['average'].get(metric, float('nan')):.1f}" for r in reports])
    return table


def routing_heatmap(counts: dict, expert_names: list[str], path: Path, title: str) -> None:
    """Save a heatmap: rows are layers, columns experts, colour the share of tokens routed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(counts)
    shares = np.stack([counts[name].double().numpy() for name in layers])
    shares = shares / np.maximum(shares.sum(1, keepdims=True), 1)
    height = min(40, 2 + 0.12 * len(layers))
    figure, axis = plt.subplots(figsize=(2 + 0.35 * len(expert_names), height))
    image = axis.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_xticks(range(len(expert_names)), expert_names, rotation=90, fontsize=7)
    axis.set_yticks(range(len(layers)), [n.removeprefix("model.") for n in layers], fontsize=5)
    axis.set_xlabel("expert")
    axis.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axis, label="share of routing choices")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
