"""Few-shot adaptation of a new task from a library (`quiver adapt`): private (a LoRA from
scratch), mhr-z / mhr-full / mhr-mu over a Poly/MHR entry, polylib / polylib-full / lib-mu /
lorahub over a library of LoRA experts. One method (or family) per module, each with its
paper and formula; `recipe.adapt_task` runs them on the training loop and stores the result.
Names are imported on first use (`quiver.lazy`); `config` imports no torch."""

from quiver.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["METHODS", "AdaptConfig"], "quiver.adaptation.config"),
    "lib_mu_factors": "quiver.adaptation.lib_mu",
    **dict.fromkeys(["combine", "lorahub_search", "stack_experts"], "quiver.adaptation.lorahub"),
    **dict.fromkeys(["mhr_mu_factors", "mhr_row_start", "skill_loras"], "quiver.adaptation.mhr"),
    "polylib_start": "quiver.adaptation.polylib",
    **dict.fromkeys(["FewShotTask", "adapt_task", "few_shot_task"], "quiver.adaptation.recipe"),
    **dict.fromkeys(["LoraStart", "PolyStart"], "quiver.adaptation.starts"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
