"""GenKnowSub: subtract general knowledge from task experts, in update space.

Following "Forgetting-via-negation" / GenKnowSub (as used with Arrow in PEFT): each task
expert's update has the mean update of a set of *general* experts subtracted,

    dW'_e = s_e B_e A_e - (1/G) sum_g s_g B_g A_g

PEFT instead subtracts the mean A and the mean B separately, which is not the same update.
dW'_e is exactly a LoRA of rank r_e + sum_g r_g with concatenated factors
A' = [A_e; A_1; ...; A_G] and B' = [s_e B_e, -s_1 B_1 / G, ..., -s_G B_G / G] (scaling 1);
Arrow's prototypes are then computed from those factors.
"""

from __future__ import annotations

import torch

from quiver.library import Expert, ExpertInfo

_PREFIX = "base_model.model."


def subtract_general(experts: list[Expert], general: list[Expert]) -> list[Expert]:
    """New in-memory experts whose updates are the task updates minus the general mean."""
    n_general = len(general)
    general_factors = [(g.scaling, g.lora_factors()) for g in general]
    result = []
    for expert in experts:
        own = expert.lora_factors()
        modules = sorted(set(own).union(*(f for _, f in general_factors)))
        pieces = {}
        for module in modules:
            a_parts, b_parts = [], []
            if module in own:
                a, b = own[module]
                a_parts.append(a)
                b_parts.append(b * expert.scaling)
            for scaling, factors in general_factors:
                if module in factors:
                    a, b = factors[module]
                    a_parts.append(a)
                    b_parts.append(-b * scaling / n_general)
            pieces[module] = (torch.cat(a_parts, 0), torch.cat(b_parts, 1))
        rank = max(a.shape[0] for a, _ in pieces.values())
        weights = {}
        for module, (a, b) in pieces.items():
            pad = rank - a.shape[0]
            weights[f"{_PREFIX}{module}.lora_A.weight"] = torch.cat(
                [a, a.new_zeros(pad, a.shape[1])]) if pad else a
            weights[f"{_PREFIX}{module}.lora_B.weight"] = torch.cat(
                [b, b.new_zeros(b.shape[0], pad)], 1) if pad else b
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
        config = {**expert.adapter_config, "r": rank, "lora_alpha": rank,
                  "target_modules": targets}
        config.pop("layers_to_transform", None)
        info = ExpertInfo(**{**expert.info.__dict__,
                             "source": f"genknowsub:{expert.info.source}"})
        result.append(Expert(info, config, weights=weights))
    return result
