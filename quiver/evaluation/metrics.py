"""Metrics, following BIG-bench's definitions.

- `accuracy`: multiple_choice_grade with one correct option (argmax of the log-probability).
- `accuracy_norm`: the same with the log-probability divided by the option's token count.
- `exact_match`: BIG-bench's exact_str_match (the answer is one of the references), after
  stripping surrounding spaces from both.
- `rougeL`: ROUGE-L F-measure against the best reference (Google's rouge-score package, the
  one BIG-bench uses through t5), per example, averaged; on a 0-100 scale like BIG-bench.
"""

from __future__ import annotations

import functools


def exact_match(answer: str, references: tuple[str, ...]) -> float:
    return float(answer.strip() in {r.strip() for r in references})


def rouge_l(answer: str, references: tuple[str, ...]) -> float:
    scorer = _rouge_scorer()
    return 100.0 * max(scorer.score(r, answer)["rougeL"].fmeasure for r in references)


@functools.cache
def _rouge_scorer():
    """Built on first use: multiple-choice work never imports rouge-score (or nltk)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
