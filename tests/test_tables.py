"""Result tables printed where no terminal is (a log file, CI) keep their names whole."""

from __future__ import annotations

import io

from rich.console import Console

from quiver.build import JobOutcome
from quiver.cli import PIPED_WIDTH, fit_console
from quiver.report import build_table

NAMES = ["arithmetic.1_digit_addition", "formal_fallacies_syllogisms_negation",
         "vitaminc_fact_verification"]


def _outcomes() -> list[JobOutcome]:
    return [JobOutcome(name, [f"bigbench:{name.replace('.', '/')}"], "trained", 1, 10, 1.234,
                       51.3) for name in NAMES] + [
        JobOutcome("play_dialog_same_or_different", ["bigbench:play_dialog_same_or_different"],
                   "failed", 2, error="RuntimeError: out of memory while training this expert")]


def test_the_build_table_keeps_expert_and_task_names_whole_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    plain = Console(file=io.StringIO())  # what rich does alone: 80 columns, names cut
    plain.print(build_table(_outcomes(), "private library ./lib"))
    assert NAMES[1] not in plain.file.getvalue()

    out = fit_console(Console(file=io.StringIO()))
    assert not out.is_terminal and out.width == PIPED_WIDTH
    out.print(build_table(_outcomes(), "private library ./lib"))
    text = out.file.getvalue()
    for name in [*NAMES, "play_dialog_same_or_different"]:
        assert name in text
    assert "arithmetic/1_digit_addition" in text and "out of memory while training" in text


def test_a_terminal_or_columns_keeps_its_own_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert fit_console(Console(file=io.StringIO())).width == 120
    monkeypatch.delenv("COLUMNS")
    terminal = Console(file=io.StringIO(), force_terminal=True, width=90)
    assert fit_console(terminal).width == 90
