"""Centroid ("average activation") routing.

Each expert has, per layer, the mean input of that layer over a few examples of its own
tasks, L2-normalised: c_e. A token routes by

    logit_e = x . c_e / sqrt(d),   w = softmax (over the top k, or over all experts)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class CentroidRouter:
    top_k: int | None = None
    temperature: float = 1.0
    takes_projections = True

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, projections=None):
        projections = x @ keys.T if projections is None else projections  # (t, E)
        logits = projections / (math.sqrt(x.shape[-1]) * self.temperature)
        k = keys.shape[0] if self.top_k is None else min(self.top_k, keys.shape[0])
        top = logits.topk(k, dim=-1)  # (t, k)
        return torch.softmax(top.values, dim=-1), top.indices
