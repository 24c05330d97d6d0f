"""Routed layers that read the same input share one pass over it.

In a transformer block q_proj, k_proj and v_proj are called on the same hidden states, and so
are gate_proj and up_proj. Each routed layer needs x @ keys^T for its router (and, for the
dense mixtures, x @ A^T). `SharedInput` keeps the keys and A matrices of such sibling layers
in one matrix, keys first,

    buffer = [keys_1; keys_2; ...; A_1; A_2; ...]      (sum E_i + sum E_i * R_i, in)

so the first sibling to see an input computes every sibling's projections in one GEMM
(x @ buffer[:sum E_i]^T, or x @ buffer^T when a dense mixture wants x @ A^T as well) and the
others take their columns. A layer with no siblings is a group of one: its keys and A still
share one GEMM. The numbers are the same as computing each layer alone.
"""

from __future__ import annotations

import torch

# Layers of one parent module that transformers models call on the same input.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
            ("query", "key", "value"), ("w1", "w3"))


def sibling_groups(modules: list[str]) -> list[list[str]]:
    """`modules` (dotted names, model order) grouped by shared input; others alone."""
    groups: dict[tuple, list[str]] = {}
    for name in modules:
        parent, _, child = name.rpartition(".")
        family = next((i for i, names in enumerate(SIBLINGS) if child in names), None)
        key = (parent, family) if family is not None else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


class SharedInput:
    """The keys and A matrices of sibling layers in one buffer, and the last projections.

    Args:
        buffer: (sum E_i + sum E_i * R_i, in), keys of every member first, then their A's.
        sizes: (E_i, R_i) of each member, in member order.
    """

    def __init__(self, buffer: torch.Tensor, sizes: list[tuple[int, int]]) -> None:
        self.buffer = buffer
        self.n_keys = sum(e for e, _ in sizes)
        self.key_rows, self.a_rows = [], []
        key_start, a_start = 0, self.n_keys
        for n_experts, rank in sizes:
            self.key_rows.append(slice(key_start, key_start + n_experts))
            self.a_rows.append(slice(a_start, a_start + n_experts * rank))
            key_start, a_start = key_start + n_experts, a_start + n_experts * rank
        self._input = None  # the input the cached projections belong to (held, so its id
        self._projections = None  # cannot be reused by another tensor meanwhile)
        self._with_a = False
        self._waiting: set[int] = set()
        self.passes = 0  # GEMMs over an input so far (one per input when siblings share)

    def keys(self, member: int) -> torch.Tensor:
        """(E, in) the member's keys, a view into the buffer."""
        return self.buffer[self.key_rows[member]]

    def a_stack(self, member: int, rank: int) -> torch.Tensor:
        """(E, R, in) the member's A matrices, a view into the buffer."""
        rows = self.buffer[self.a_rows[member]]
        return rows.view(-1, rank, rows.shape[-1])

    def project(self, member: int, x: torch.Tensor, flat: torch.Tensor, with_a: bool):
        """(x @ keys^T (t, E), x @ A^T (t, E*R) or None) for one member, computed for every
        member at the first call with this input `x` (its flattened view is `flat`)."""
        if self._input is not x or (with_a and not self._with_a):
            if self._input is not x:
                self._waiting = set(range(len(self.key_rows)))
            rows = self.buffer if with_a else self.buffer[: self.n_keys]
            self._projections = flat @ rows.T  # (t, sum E [+ sum E*R])
            self.passes += 1
            self._input, self._with_a = x, with_a
        projections = self._projections
        self._waiting.discard(member)
        if not self._waiting:  # every sibling served: hold nothing between forwards
            self._input = self._projections = None
        return (projections[:, self.key_rows[member]],
                projections[:, self.a_rows[member]] if with_a else None)
