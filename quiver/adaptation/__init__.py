"""Few-shot adaptation of a new task from a library (`quiver adapt`): private (a LoRA from
scratch), mhr-z / mhr-full / mhr-mu over a Poly/MHR entry, polylib / polylib-full / lib-mu /
lorahub over a library of LoRA experts. One method (or family) per module, each with its
paper and formula; `recipe.adapt_task` runs them on the training loop and stores the result."""

from quiver.adaptation.config import METHODS, AdaptConfig
from quiver.adaptation.lib_mu import lib_mu_factors
from quiver.adaptation.lorahub import combine, lorahub_search, stack_experts
from quiver.adaptation.mhr import mhr_mu_factors, mhr_row_start, skill_loras
from quiver.adaptation.polylib import polylib_start
from quiver.adaptation.recipe import FewShotTask, adapt_task, few_shot_task
from quiver.adaptation.starts import LoraStart, PolyStart

__all__ = ["METHODS", "AdaptConfig", "FewShotTask", "LoraStart", "PolyStart", "adapt_task",
           "combine", "few_shot_task", "lib_mu_factors", "lorahub_search", "mhr_mu_factors",
           "mhr_row_start", "polylib_start", "skill_loras", "stack_experts"]
