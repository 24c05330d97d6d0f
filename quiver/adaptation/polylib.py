"""Poly routing over a library of LoRA experts: polylib (router only) and polylib-full
(router and experts).

Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"
(ICML), https://arxiv.org/abs/2405.11157, supervised adaptation with Poly routing (Ponti et
al. 2023) over the library. The E experts become the skills of a Poly layer (H = 1): at every
adapted layer the new task has routing logits z (E,), and with w = sigmoid(z) / sum sigmoid(z)
(relaxed-Bernoulli samples while training, `quiver.adapters.poly_mhr`)

    A_t = sum_e w_e A_e,   B_t = sum_e w_e s_e B_e,   y = W x + B_t A_t x

(the factors are mixed, as Poly mixes its skills, not the updates B_e A_e). The router starts
near-uniform, that is at lib-mu's factor average. polylib trains the logits only (each
expert bit-identical afterwards); polylib-full also the experts' factors, at --lr.

Stored form: a Poly entry (kind poly, PEFT's Poly format, one routing row: the new task),
whose skills are the experts' LoRAs (the scaling s_e folded in) and whose metadata names the
expert of each skill, so `quiver eval --method expert:NAME` scores it and the learnt weights
over the named experts can be read back. The experts need one rank and one set of layers.
"""

from __future__ import annotations

import torch

from quiver.adaptation.starts import PolyStart, scaled_factors
from quiver.config import stable_hash
from quiver.errors import QuiverError
from quiver.library.expert import PEFT_PREFIX


def check_same_shapes(experts, method: str) -> None:
    """Raises QuiverError: no experts, or experts of different ranks or layer sets."""
    if not experts:
        raise QuiverError(f"{method} needs at least one LoRA expert in the source library")
    first = experts[0]
    modules, rank = set(first.lora_factors()), first.adapter_config["r"]
    for expert in experts[1:]:
        if expert.adapter_config["r"] != rank or set(expert.lora_factors()) != modules:
            raise QuiverError(f"{method} mixes the experts' factors, so they need one rank and "
                              f"one set of layers: {expert.name!r} differs from {first.name!r}")


def polylib_start(experts, method: str, routing_lr: float, source: str) -> PolyStart:
    """The experts as the skills of a one-head Poly layer, with one new routing row.

    Raises:
        QuiverError: experts of different ranks or layer sets.
    """
    check_same_shapes(experts, method)
    rank = experts[0].adapter_config["r"]
    loras = [scaled_factors(e) for e in experts]
    skills = {}
    for module in loras[0]:
        a = torch.stack([lora[module][0].T for lora in loras])  # (E, in, r)
        b = torch.stack([lora[module][1].T * rank for lora in loras])  # (E, r, out): PEFT's / r
        skills[f"{PEFT_PREFIX}{module}.poly_lora_A"] = a.unsqueeze(0).contiguous()  # H = 1
        skills[f"{PEFT_PREFIX}{module}.poly_lora_B"] = b.unsqueeze(0).contiguous()
    targets = sorted({m.rsplit(".", 1)[-1] for m in loras[0]})
    return PolyStart(method, source, _hash(experts), len(experts), 1, rank, tuple(targets),
                     train_skills=method == "polylib-full", routing_lr=routing_lr
                     ).with_weights(skills)


def _hash(experts) -> str:
    return stable_hash([e.info.content_hash for e in experts])
