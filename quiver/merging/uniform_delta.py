"""Exact uniform merge of the updates: the average of the experts' dW = s B A.

    update = (1/E) sum_e s_e B_e A_e = [s_1 B_1 / E, ..., s_E B_E / E] [A_1; ...; A_E]

so it is exactly the LoRA of rank sum_e r_e whose factors are the concatenated ones (an
expert that does not adapt a module contributes zero there). A smaller `rank` truncates it.
"""

from __future__ import annotations

import torch


def merge(factors: list[dict], **_) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`factors`: per expert `{module: (A, B, scaling)}`. Returns `{module: (A, B)}`."""
    n = len(factors)
    modules = sorted({m for f in factors for m in f})
    merged = {}
    for module in modules:
        present = [f[module] for f in factors if module in f]
        a = torch.cat([a for a, _, _ in present], 0)  # (sum r, in)
        b = torch.cat([b * s / n for _, b, s in present], 1)  # (out, sum r)
        merged[module] = (a, b)
    return merged
