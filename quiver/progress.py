"""Progress bars for long work (rich), with throughput and an ETA; silent when disabled."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, task_id) -> None:
        self._progress, self._task = progress, task_id

    def advance(self, n: int) -> None:
        if self._progress:
            self._progress.update(self._task, advance=n)

    def update(self, loss: float, tokens_per_second: float) -> None:
        if self._progress:
            stats = f"loss {loss:.3f}  {tokens_per_second:,.0f} tok/s"
            self._progress.update(self._task, advance=1, stats=stats)

    def note(self, message: str) -> None:
        if self._progress:
            self._progress.update(self._task, note=message)


@contextmanager
def training_progress(total_steps: int, enabled: bool = True) -> Iterator[_Bar]:
    """A bar over optimizer steps showing loss, tokens/s, validation notes and the ETA."""
    if not enabled:
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TextColumn("[dim]{task.fields[note]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with progress:
        task_id = progress.add_task("train", total=total_steps, stats="", note="")
        yield _Bar(progress, task_id)


@contextmanager
def counting_progress(description: str, enabled: bool = True) -> Iterator:
    """A plain bar; yields a function `update(done, total)`."""
    if not enabled:
        yield lambda done, total: None
        return
    progress = Progress(
        TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
    )
    with progress:
        task_id = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task_id, completed=done, total=total)


@contextmanager
def jobs_progress(total: int, description: str, enabled: bool = True) -> Iterator:
    """A bar over jobs (trainings) with the ETA; yields `advance(note)`, called as each ends."""
    if not enabled:
        yield lambda note: None
        return
    progress = Progress(
        TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("[dim]{task.fields[note]}"), TimeElapsedColumn(), TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with progress:
        task_id = progress.add_task(description, total=total, note="")
        yield lambda note: progress.update(task_id, advance=1, note=note)
