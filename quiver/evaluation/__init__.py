"""Held-out evaluation: multiple choice by log-likelihood, generation by EM and Rouge-L."""

from quiver.evaluation.harness import EvalConfig, evaluate
from quiver.evaluation.scoring import generate_answers, score_choices

__all__ = ["EvalConfig", "evaluate", "generate_answers", "score_choices"]
