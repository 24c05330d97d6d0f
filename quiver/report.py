"""Tables (and, in later steps, plots) that show results to a person."""

from __future__ import annotations

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
