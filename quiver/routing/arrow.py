"""Arrow routing (Ostapenko et al., ICML 2024): zero-shot, per token, per layer.

At each adapted layer, for a token x and the experts' prototypes p_e (their top right
singular vectors, `quiver.transforms.arrow`):

    logit_e = |x . p_e| / T,   keep the top k,   w = softmax over those k

The absolute value is there because a singular vector's sign is arbitrary. Defaults T = 1,
k = 4, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ArrowRouter:
    top_k: int = 4
    temperature: float = 1.0
    takes_projections = True

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, projections=None):
        projections = x @ keys.T if projections is None else projections  # (t, E)
        logits = projections.abs()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        top = logits.topk(min(self.top_k, keys.shape[0]), dim=-1)  # (t, k)
        return torch.softmax(top.values, dim=-1), top.indices
