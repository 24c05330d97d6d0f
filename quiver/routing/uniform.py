"""Uniform routing: every expert with weight 1/E, i.e. the average of the experts' outputs.

This equals adding the exact average update (1/E) sum_e s_e B_e A_e to each layer, the
`uniform-delta` merge, computed without folding it into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UniformRouter:

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, projections=None):
        t, n_experts = x.shape[0], keys.shape[0]  # keys: (E, 0), only their count matters
        weights = x.new_full((t, n_experts), 1.0 / n_experts)  # (t, E)
        indices = torch.arange(n_experts, device=x.device).expand(t, n_experts)  # (t, E)
        return weights, indices
