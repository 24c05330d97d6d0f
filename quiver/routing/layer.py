"""The multi-expert LoRA layer: a frozen linear layer plus a routed mixture of LoRA experts.

For a token x (length `in`) routed to experts i_1..i_k with weights w_1..w_k:

    y = W x + sum_j w_j * s_j * B_j (A_j x)

Experts are stacked once when the layer is built: A as (E, R, in) and s*B as (E, out, R),
where R is the largest rank among the experts (smaller ranks are zero-padded, which changes
nothing). Three ways to compute the mixture give the same numbers at different costs:

- `dense`:   every expert on every token, coefficients zero outside the top-k.
             Cost t*E*R*(in+out); two big matmuls, best when E*R is small.
- `grouped`: tokens sorted by expert, one small matmul pair per active expert.
             Cost t*k*R*(in+out) plus a Python step per active expert; best for long inputs.
- `gather`:  each token's k experts gathered and applied with batched products.
             Cost t*k*R*(in+out) with copies; best for a handful of tokens (decoding).

`MixtureStrategy` picks one per call from the token count, using timings measured once per
layer shape (see `choose_strategy`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

# ----------------------------------------------------------------------------- mixtures


def mixture_dense(x, weights, indices, a_stack, b_stack) -> torch.Tensor:
    """x (t, in), weights/indices (t, k), a_stack (E, R, in), b_stack (E, out, R) -> (t, out)."""
    n_experts, rank, fan_in = a_stack.shape
    t = x.shape[0]
    h = x @ a_stack.reshape(n_experts * rank, fan_in).T  # (t, E*R)
    coef = x.new_zeros(t, n_experts).scatter_(1, indices, weights)  # (t, E)
    h = (h.view(t, n_experts, rank) * coef[:, :, None]).view(t, n_experts * rank)
    b_flat = b_stack.permute(1, 0, 2).reshape(b_stack.shape[1], n_experts * rank)  # (out, E*R)
    return h @ b_flat.T  # (t, out)


def mixture_grouped(x, weights, indices, a_stack, b_stack) -> torch.Tensor:
    """Same result as `mixture_dense`, computing only the chosen (token, expert) pairs."""
    t, k = indices.shape
    flat = indices.reshape(-1)  # (t*k,)
    order = torch.argsort(flat, stable=True)  # pairs sorted by expert
    tokens = order // k  # (t*k,) token of each sorted pair
    pair_weights = weights.reshape(-1)[order]  # (t*k,)
    counts = torch.bincount(flat, minlength=a_stack.shape[0]).tolist()
    out = x.new_zeros(t, b_stack.shape[1])  # (t, out)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]  # (c,)
        h = x[rows] @ a_stack[expert].T  # (c, R)
        h = h * pair_weights[start : start + count, None]
        out.index_add_(0, rows, h @ b_stack[expert].T)  # (c, out)
        start += count
    return out


def mixture_gather(x, weights, indices, a_stack, b_stack) -> torch.Tensor:
    """Same result as `mixture_dense`, gathering each token's k experts."""
    a = a_stack[indices]  # (t, k, R, in)
    h = torch.einsum("ti,tkri->tkr", x, a) * weights[..., None]  # (t, k, R)
    b = b_stack[indices]  # (t, k, out, R)
    return torch.einsum("tkr,tkor->to", h, b)  # (t, out)


MIXTURES: dict[str, Callable] = {
    "dense": mixture_dense,
    "grouped": mixture_grouped,
    "gather": mixture_gather,
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

    def __call__(self, x, weights, indices, a_stack, b_stack) -> torch.Tensor:
        if self.fixed is not None:
            return MIXTURES[self.fixed](x, weights, indices, a_stack, b_stack)
        bucket = 1 << max(0, (x.shape[0] - 1).bit_length())  # next power of two
        key = (tuple(a_stack.shape), b_stack.shape[1], indices.shape[1], bucket, x.dtype)
        if key not in self.choices:
            self.choices[key] = self._measure(x, weights, indices, a_stack, b_stack)
        return MIXTURES[self.choices[key]](x, weights, indices, a_stack, b_stack)

    def _measure(self, x, weights, indices, a_stack, b_stack) -> str:
        timings = {}
        for name, mixture in MIXTURES.items():
            mixture(x, weights, indices, a_stack, b_stack)  # warm up
            started = time.perf_counter()
            for _ in range(self.repeats):
                mixture(x, weights, indices, a_stack, b_stack)
            timings[name] = time.perf_counter() - started
        return min(timings, key=timings.get)


# -------------------------------------------------------------------------------- layer


class RoutedLinear(nn.Module):
    """A frozen `nn.Linear` plus a routed mixture of the LoRA experts that adapt it.

    Args:
        base: the original linear layer (kept frozen, shared with the base model).
        a_stack: (E, R, in) the experts' A matrices, zero-padded to rank R.
        b_stack: (E, out, R) the experts' s * B matrices.
        keys: (E, in) the router's per-expert vectors at this layer (prototypes, centroids,
            gates), or None for routers that need none.
        expert_ids: (E,) index of each local expert in the routed model's expert list.
        context: the routed model's shared state: its router, which maps (x (t, in), keys)
            to (weights (t, k), local indices (t, k)), forced routes and routing counts.
        mixture: a `MixtureStrategy`.
    """

    def __init__(self, base: nn.Linear, a_stack, b_stack, keys, expert_ids, context,
                 mixture: MixtureStrategy, name: str) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("a_stack", a_stack, persistent=False)
        self.register_buffer("b_stack", b_stack, persistent=False)
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
        delta = self.mixture(flat, weights.to(flat.dtype), indices, self.a_stack, self.b_stack)
        return y + delta.view(y.shape)

    def extra_repr(self) -> str:
        n_experts, rank, _ = self.a_stack.shape
        return f"in={self.in_features}, out={self.out_features}, experts={n_experts}, rank={rank}"
