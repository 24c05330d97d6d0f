"""The multi-expert LoRA layer: a frozen linear layer plus a routed mixture of LoRA experts.

For a token x (length `in`) routed to experts i_1..i_k with weights w_1..w_k:

    y = W x + sum_j w_j * s_j * B_j (A_j x)

Experts are stacked once when the layer is built: A as (E, R, in) and s*B as rows
(E*R, out), where R is the largest rank among the experts (smaller ranks are zero-padded,
which changes nothing). Four ways to compute the mixture give the same numbers at different
costs (t tokens, k experts per token):

- `dense`:   every expert on every token, coefficients zero outside the top-k.
             Cost t*E*R*(in+out) in two GEMMs; best when E*R is small.
- `dense-a`: the A side as one GEMM (t*E*R*in), the B side only for the chosen experts,
             as one fused `embedding_bag` (t*k*R*out, nothing copied); best for middle E.
- `bag`:     only the chosen pairs: A rows gathered (t*k*R*in copied), B by `embedding_bag`.
             Cost independent of E; best for large E.
- `grouped`: tokens sorted by expert, one small matmul pair per active expert; exact cost
             t*k*R*(in+out) plus a Python step per active expert.

`MixtureStrategy` picks one per call from the token count, using timings measured once per
layer shape (see `choose_strategy`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

# ----------------------------------------------------------------------------- mixtures
# Every mixture takes x (t, in), weights and indices (t, k), a_stack (E, R, in) and b_rows
# (E*R, out), where row e*R + j of b_rows is column j of expert e's s*B, and returns (t, out).


def mixture_dense(x, weights, indices, a_stack, b_rows) -> torch.Tensor:
    """Every expert on every token; coefficients are zero outside each token's top-k."""
    n_experts, rank, fan_in = a_stack.shape
    t = x.shape[0]
    h = x @ a_stack.reshape(n_experts * rank, fan_in).T  # (t, E*R)
    coef = x.new_zeros(t, n_experts).scatter_(1, indices, weights)  # (t, E)
    h = (h.view(t, n_experts, rank) * coef[:, :, None]).view(t, n_experts * rank)
    return h @ b_rows  # (t, out)


def mixture_dense_a(x, weights, indices, a_stack, b_rows) -> torch.Tensor:
    """A side dense (one GEMM), B side only for the chosen experts (a fused embedding_bag)."""
    n_experts, rank, fan_in = a_stack.shape
    t, k = indices.shape
    h = (x @ a_stack.reshape(n_experts * rank, fan_in).T).view(t, n_experts, rank)  # (t, E, R)
    h = h.gather(1, indices[..., None].expand(t, k, rank)) * weights[..., None]  # (t, k, R)
    return _b_side(h, indices, b_rows, rank)


def mixture_bag(x, weights, indices, a_stack, b_rows) -> torch.Tensor:
    """Only the chosen (token, expert) pairs: gathered A rows, then a fused embedding_bag."""
    rank = a_stack.shape[1]
    a = a_stack[indices]  # (t, k, R, in)
    h = torch.einsum("ti,tkri->tkr", x, a) * weights[..., None]  # (t, k, R)
    return _b_side(h, indices, b_rows, rank)


def _b_side(h, indices, b_rows, rank) -> torch.Tensor:
    """sum over (k, R) of h[t, k, j] * b_rows[indices[t, k] * R + j], without copying B."""
    t, k = indices.shape
    rows = (indices[..., None] * rank + torch.arange(rank, device=indices.device))  # (t, k, R)
    return nn.functional.embedding_bag(rows.reshape(t, k * rank), b_rows, mode="sum",
                                       per_sample_weights=h.reshape(t, k * rank))  # (t, out)


def mixture_grouped(x, weights, indices, a_stack, b_rows) -> torch.Tensor:
    """Tokens sorted by expert, one small matmul pair per active expert."""
    t, k = indices.shape
    rank = a_stack.shape[1]
    flat = indices.reshape(-1)  # (t*k,)
    order = torch.argsort(flat, stable=True)  # pairs sorted by expert
    tokens = order // k  # (t*k,) token of each sorted pair
    pair_weights = weights.reshape(-1)[order]  # (t*k,)
    counts = torch.bincount(flat, minlength=a_stack.shape[0]).tolist()
    out = x.new_zeros(t, b_rows.shape[1])  # (t, out)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]  # (c,)
        h = x[rows] @ a_stack[expert].T * pair_weights[start : start + count, None]  # (c, R)
        out.index_add_(0, rows, h @ b_rows[expert * rank : (expert + 1) * rank])  # (c, out)
        start += count
    return out


MIXTURES: dict[str, Callable] = {
    "dense": mixture_dense,
    "dense-a": mixture_dense_a,
    "bag": mixture_bag,
    "grouped": mixture_grouped,
}


class MixtureStrategy:
    """Chooses the fastest mixture per (layer shape, token-count bucket), by measuring once.

    Owned by one routed model and shared by its layers; layers with the same shape reuse the
    same measurement. `fixed` forces one strategy (used by tests and benchmarks).
    """

    def __init__(self, fixed: str | None = None, repeats: int = 3) -> None:
        if fixed is not None and fixed not in MIXTURES:
            raise ValueError(f"unknown mixture strategy {fixed!r}: {sorted(MIXTURES)}")
        self.fixed = fixed
        self.repeats = repeats
        self.choices: dict[tuple, str] = {}

    def __call__(self, x, weights, indices, a_stack, b_rows) -> torch.Tensor:
        if self.fixed is not None:
            return MIXTURES[self.fixed](x, weights, indices, a_stack, b_rows)
        bucket = 1 << max(0, (x.shape[0] - 1).bit_length())  # next power of two
        key = (tuple(a_stack.shape), b_rows.shape[1], indices.shape[1], bucket, x.dtype)
        if key not in self.choices:
            self.choices[key] = self._measure(x, weights, indices, a_stack, b_rows)
        return MIXTURES[self.choices[key]](x, weights, indices, a_stack, b_rows)

    def _measure(self, x, weights, indices, a_stack, b_rows) -> str:
        timings = {}
        for name, mixture in MIXTURES.items():
            mixture(x, weights, indices, a_stack, b_rows)  # warm up
            started = time.perf_counter()
            for _ in range(self.repeats):
                mixture(x, weights, indices, a_stack, b_rows)
            timings[name] = time.perf_counter() - started
        return min(timings, key=timings.get)


# -------------------------------------------------------------------------------- layer


class RoutedLinear(nn.Module):
    """A frozen `nn.Linear` plus a routed mixture of the LoRA experts that adapt it.

    Args:
        base: the original linear layer (kept frozen, shared with the base model).
        a_stack: (E, R, in) the experts' A matrices, zero-padded to rank R.
        b_rows: (E*R, out) the experts' s * B matrices, transposed and stacked.
        keys: (E, in) the router's per-expert vectors at this layer (prototypes, centroids,
            gates), or None for routers that need none.
        expert_ids: (E,) index of each local expert in the routed model's expert list.
        context: the routed model's shared state: its router, which maps (x (t, in), keys)
            to (weights (t, k), local indices (t, k)), forced routes and routing counts.
        mixture: a `MixtureStrategy`.
    """

    def __init__(self, base: nn.Linear, a_stack, b_rows, keys, expert_ids, context,
                 mixture: MixtureStrategy, name: str) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("a_stack", a_stack, persistent=False)
        self.register_buffer("b_rows", b_rows, persistent=False)
        self.register_buffer("keys", keys, persistent=False)
        self.register_buffer("expert_ids", expert_ids, persistent=False)
        self.context = context
        self.mixture = mixture
        self.name = name

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        flat = x.reshape(-1, x.shape[-1])  # (t, in)
        weights, indices = self.context.route(self, flat)  # (t, k), (t, k)
        delta = self.mixture(flat, weights.to(flat.dtype), indices, self.a_stack, self.b_rows)
        return y + delta.view(y.shape)

    def extra_repr(self) -> str:
        n_experts, rank, _ = self.a_stack.shape
        return f"in={self.in_features}, out={self.out_features}, experts={n_experts}, rank={rank}"
