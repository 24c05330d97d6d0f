"""TIES merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023), on the experts' updates dW_e = s_e B_e A_e, per layer:

1. trim: keep each dW_e's top `density` fraction of entries by magnitude, zero the rest;
2. elect: per entry, the sign of the sum of the trimmed updates;
3. disjoint mean: average, per entry, only the trimmed values that agree with that sign;
4. scale by lambda.

The result is a dense update; it is stored as a truncated-SVD LoRA (see `merge_experts`).
"""

from __future__ import annotations

import torch


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude."""
    keep = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[delta.abs().flatten().topk(keep).indices] = True
    return delta * mask.view_as(delta)


def merge(factors: list[dict], density: float = 0.2, scale: float = 1.0, **_) -> dict:
    """`factors`: per expert `{module: (A, B, scaling)}`. Returns `{module: dense update}`."""
    modules = sorted({m for f in factors for m in f})
    merged = {}
    for module in modules:
        deltas = torch.stack([trim(s * b @ a, density)
                              for f in factors if module in f
                              for a, b, s in [f[module]]])  # (E, out, in)
        sign = torch.sign(deltas.sum(0))  # (out, in)
        agree = (torch.sign(deltas) == sign) & (deltas != 0)  # (E, out, in)
        total = (deltas * agree).sum(0)
        count = agree.sum(0).clamp(min=1)
        merged[module] = scale * total / count
    return merged
