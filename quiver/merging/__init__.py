"""Merging experts into one: one method per file, registered here by name.

Each method is a pure function from the experts' factors `{module: (A, B, scaling)}` to
either low-rank factors `{module: (A, B)}` (exact) or dense updates `{module: dW}`.
`merge_experts` turns the result into a new expert, truncating with an SVD where the exact
result has a higher rank than asked for, and reports the relative error of that truncation.
"""

from __future__ import annotations

from datetime import UTC, datetime

import torch

from quiver.errors import QuiverError
from quiver.library import Expert, ExpertInfo
from quiver.library.expert import PEFT_PREFIX, require_lora
from quiver.merging import task_arithmetic, ties, uniform, uniform_delta
from quiver.merging.lowrank import lowrank_factorise, svd_factorise

METHODS = {
    "uniform": uniform.merge,
    "uniform-delta": uniform_delta.merge,
    "ties": ties.merge,
    "task-arithmetic": task_arithmetic.merge,
}


def merge_experts(
    experts: list[Expert],
    method: str,
    name: str,
    rank: int | None = None,
    scale: float = 1.0,
    density: float = 0.2,
) -> tuple[Expert, dict]:
    """Merge `experts` with `method` into a new expert called `name`.

    Args:
        rank: rank of the stored result; None keeps the exact rank of factor merges and uses
            the sum of the experts' ranks for dense ones (TIES).
        scale: lambda of TIES and task arithmetic.
        density: fraction of entries TIES keeps per update.

    Returns:
        The merged expert and a report `{"relative_error": {module: error}, "rank": rank}`.

    Raises:
        QuiverError: unknown method, no experts, or experts the method cannot combine.
    """
    if method not in METHODS:
        raise QuiverError(f"unknown merge method {method!r}: use one of {sorted(METHODS)}")
    if not experts:
        raise QuiverError("nothing to merge")
    require_lora(experts, "merging")
    factors = [{m: (a, b, e.scaling) for m, (a, b) in e.lora_factors().items()}
               for e in experts]
    merged = METHODS[method](factors, scale=scale, density=density)
    target_rank = rank or sum(max(a.shape[0] for a, _, _ in f.values()) for f in factors)
    weights, errors, stored_rank = {}, {}, 0
    for module, value in merged.items():
        if isinstance(value, tuple):
            a, b, errors[module] = lowrank_factorise(*value, target_rank) if rank else (*value, 0.0)
        else:
            a, b, errors[module] = svd_factorise(value, target_rank)
        stored_rank = max(stored_rank, a.shape[0])
        weights[module] = (a, b)
    state = _pad_to_rank(weights, stored_rank)
    return _as_expert(experts, method, name, state, stored_rank, scale, density), {
        "relative_error": errors,
        "max_relative_error": max(errors.values()),
        "rank": stored_rank,
    }


def _pad_to_rank(weights: dict, rank: int) -> dict[str, torch.Tensor]:
    """PEFT needs one rank per adapter: zero-pad smaller factors (this changes nothing)."""
    state = {}
    for module, (a, b) in weights.items():
        pad = rank - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1) if pad else b
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    return state


def _as_expert(experts, method, name, state, rank, scale, density) -> Expert:
    first = experts[0]
    targets = sorted({m.rsplit(".", 1)[-1] for e in experts
                      for m in e.lora_factors()})
    adapter_config = {**first.adapter_config, "r": rank, "lora_alpha": rank,  # scaling 1
                      "target_modules": targets, "lora_dropout": 0.0}
    for option in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        adapter_config.pop(option, None)
    info = ExpertInfo(
        name=name,
        tasks=sorted({t for e in experts for t in e.info.tasks}),
        base_model=first.info.base_model,
        base_fingerprint=first.info.base_fingerprint,
        lora={"r": rank, "lora_alpha": rank, "target_modules": targets},
        training={"merge": {"method": method, "experts": [e.name for e in experts],
                            "scale": scale, "density": density}},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        source=f"merge:{method}",
    )
    return Expert(info, adapter_config, weights=state)
