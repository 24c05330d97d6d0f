"""Uniform merge of the factors: average the A's and, separately, the (scaled) B's.

    A = mean_e A_e,   B = mean_e s_e B_e,   update = B A

This is what mttl's uniform merge and PEFT's `linear` combination do. It is *not* the average
of the updates: mean(B) mean(A) != mean(B A). Requires experts of one rank on one module set.
"""

from __future__ import annotations

import torch

from quiver.errors import QuiverError


def merge(factors: list[dict], **_) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`factors`: per expert `{module: (A, B, scaling)}`. Returns `{module: (A, B)}`."""
    modules = set(factors[0])
    ranks = {a.shape[0] for f in factors for a, _, _ in f.values()}
    if any(set(f) != modules for f in factors) or len(ranks) != 1:
        raise QuiverError("uniform averages A's and B's, so the experts need one rank and one "
                          "module set; use uniform-delta for mixed experts")
    merged = {}
    for module in sorted(modules):
        a = torch.stack([f[module][0] for f in factors]).mean(0)  # (r, in)
        b = torch.stack([f[module][1] * f[module][2] for f in factors]).mean(0)  # (out, r)
        merged[module] = (a, b)
    return merged
