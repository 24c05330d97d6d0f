"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

    update = lambda * sum_e s_e B_e A_e

Exact as concatenated factors (rank sum_e r_e), like `uniform_delta` with weight lambda.
"""

from __future__ import annotations

import torch


def merge(factors: list[dict], scale: float = 1.0, **_) -> dict:
    """`factors`: per expert `{module: (A, B, scaling)}`. Returns `{module: (A, B)}`."""
    modules = sorted({m for f in factors for m in f})
    merged = {}
    for module in modules:
        present = [f[module] for f in factors if module in f]
        a = torch.cat([a for a, _, _ in present], 0)  # (sum r, in)
        b = torch.cat([b * s * scale for _, b, s in present], 1)  # (out, sum r)
        merged[module] = (a, b)
    return merged
