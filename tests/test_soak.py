"""The short soak of `quiver serve` (benchmarks/soak.py): tens of seconds on the tiny model.

Fails on any lost valid request, any bad input answered otherwise than 4xx in OpenAI's
shape, any 5xx outside the poisoned requests (whose rows the server breaks on purpose),
any poisoned request that did not fail alone, or a traceback in the server's log.
"""

from __future__ import annotations

from benchmarks import soak


def test_short_soak_loses_nothing_and_poison_fails_alone(served_library, tmp_path):
    summary = soak.soak(served_library.url, minutes=0.4, clients=8, max_requests=3000,
                        window=8, log_path=tmp_path / "server.log", max_batch=8, threads=1)
    examples = summary["examples"]
    assert summary["valid"] > 100
    assert summary["lost_valid"] == 0, examples["lost"]
    assert summary["bad_not_4xx_openai"] == 0, examples["bad"]
    assert summary["5xx_outside_poisoned"] == 0
    assert summary["bad_kinds"] >= 10
    assert summary["poisoned"] > 0
    assert summary["poisoned_failed_alone"] == summary["poisoned"], examples["poisoned"]
    assert summary["log_tracebacks"] == 0, (tmp_path / "server.log").read_text()[-3000:]
    assert summary["log_errors"] >= summary["poisoned"]  # each failed row said in one line
    assert summary["exit_code"] == 0 and summary["left_running"]["accepted"] == 0
