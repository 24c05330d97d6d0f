"""Adapting a Poly/MHR entry to a new task: MHR-z, full, MHR-µ.

Caccia et al. 2023, "Multi-Head Adapter Routing for Cross-Task Generalization" (NeurIPS),
https://arxiv.org/abs/2211.03831 (Poly: Ponti et al. 2023, https://arxiv.org/abs/2202.13914).
An entry holds, per adapted layer, skills A[h, s] (in/H, r), B[h, s] (r, out/H) and a row of
routing logits per training task (`quiver.adapters.poly_mhr`). For a new task t:

- mhr-z: a new row Z[t] (H, S), started near-uniform as a Poly build starts every row, is
  trained on the task's examples; the skills are frozen (bit-identical afterwards).
- mhr-full: the new row and the skills are trained (the row at its own learning rate).
- mhr-mu: the skills are averaged into one LoRA and fine-tuned as a plain LoRA:
      A_mu[h] = mean_s A[h, s],   B_mu[h] = mean_s B[h, s]
  the LoRA the entry computes when every routing weight is 1/S (all logits equal). Each
  skill s is itself a rank-r LoRA (A_s = [A[1, s]; ...; A[H, s]] along the input, B_s along
  the output), and averaging is linear, so this is `quiver.merging.uniform` of the S skills.

Stored form: mhr-z and mhr-full are a new Poly entry (kind poly, PEFT's Poly format) with the
entry's skills (as they were, or as trained) and one routing row, the new task's, so
`quiver eval --method expert:NAME --task T` scores it like any Poly/MHR entry and PEFT loads
it. Collapsing the row into a plain rank-r LoRA would be exact at evaluation too, but the
skills and routing are the result a Poly/MHR user inspects and adapts further, and mhr-full
changes the skills anyway. mhr-mu's result is a plain LoRA (usable by merges and routers).
"""

from __future__ import annotations

import torch

from quiver.adaptation.starts import Factors, PolyStart
from quiver.errors import QuiverError
from quiver.library.expert import PEFT_PREFIX
from quiver.merging import uniform

_SKILL_PARTS = ("poly_lora_A", "poly_lora_B")


def check_poly_entry(expert, method: str) -> None:
    """Raises QuiverError: `expert` is not a Poly/MHR entry."""
    if expert.info.kind != "poly":
        raise QuiverError(f"{method} adapts a Poly/MHR entry; {expert.name!r} is a "
                          f"{expert.info.kind} adapter (for a library of LoRAs use polylib, "
                          "lib-mu or lorahub)")


def mhr_row_start(expert, method: str, routing_lr: float) -> PolyStart:
    """mhr-z (skills frozen) or mhr-full (skills trained): the entry's skills and one new
    routing row.

    Raises:
        QuiverError: the expert is not a Poly/MHR entry.
    """
    check_poly_entry(expert, method)
    config = expert.adapter_config
    skills = {k: v for k, v in expert.weights.items() if k.endswith(_SKILL_PARTS)}
    return PolyStart(method, expert.name, expert.info.content_hash, config["n_skills"],
                     config["n_splits"], config["r"], tuple(config["target_modules"]),
                     train_skills=method == "mhr-full", routing_lr=routing_lr,
                     routing_temperature=expert.info.lora.get("routing_temperature", 1.0)
                     ).with_weights(skills)


def skill_loras(expert) -> list[Factors]:
    """Each skill of a Poly/MHR entry as a LoRA `{module: (A (r, in), s B (out, r))}` with
    its scaling (PEFT's 1 / r) folded into B.

    Raises:
        QuiverError: the expert is not a Poly/MHR entry.
    """
    check_poly_entry(expert, "this")
    rank = expert.adapter_config["r"]
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in expert.weights.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".")
        if part in _SKILL_PARTS:
            parts.setdefault(module, {})[part] = tensor
    loras: list[Factors] = [{} for _ in range(expert.adapter_config["n_skills"])]
    for module, found in sorted(parts.items()):
        a, b = found["poly_lora_A"], found["poly_lora_B"]  # (H, S, in/H, r), (H, S, r, out/H)
        for s, lora in enumerate(loras):
            a_s = torch.cat(list(a[:, s]), dim=0)  # (in, r): head h reads input block h
            b_s = torch.cat(list(b[:, s]), dim=1)  # (r, out): head h writes output block h
            lora[module] = (a_s.T.contiguous(), (b_s.T / rank).contiguous())
    return loras


def mhr_mu_factors(expert) -> Factors:
    """MHR-µ's starting LoRA: the average of the entry's skills, `{module: (A, s B)}`.

    Raises:
        QuiverError: the expert is not a Poly/MHR entry.
    """
    loras = skill_loras(expert)
    return uniform.merge([{m: (a, b, 1.0) for m, (a, b) in lora.items()} for lora in loras])
