"""Held-out evaluation: multiple choice by log-likelihood, generation by EM and Rouge-L.
Names are imported on first use (`quiver.lazy`); `config` imports no torch."""

from quiver.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["EvalConfig", "TransferConfig"], "quiver.evaluation.config"),
    "evaluate": "quiver.evaluation.harness",
    **dict.fromkeys(["generate_answers", "score_choices"], "quiver.evaluation.scoring"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
