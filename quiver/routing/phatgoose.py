"""PHATGOOSE routing (Muqeeth et al., 2024): learned per-expert gates, used zero-shot.

Each frozen expert gets, per layer, a gate vector v (trained on its own data, see
`quiver.transforms.phatgoose`). To route, both the token and the gates are standardised
(zero mean, unit variance over the hidden dimension):

    logit_e = std(x) . std(v_e) / sqrt(d),   keep the top k (2),   w = softmax over those k
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def standardise(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + eps)


@dataclass
class PhatgooseRouter:
    top_k: int = 2

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, projections=None):
        logits = standardise(x) @ standardise(keys).T / math.sqrt(x.shape[-1])  # (t, E)
        top = logits.topk(min(self.top_k, keys.shape[0]), dim=-1)  # (t, k)
        return torch.softmax(top.values, dim=-1), top.indices
