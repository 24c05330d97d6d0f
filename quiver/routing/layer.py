"""The multi-expert LoRA layer: a frozen linear layer plus a routed mixture of LoRA experts.

For a token x (length `in`) routed to experts i_1..i_k with weights w_1..w_k:

    y = W x + sum_j w_j * s_j * B_j (A_j x)

Experts are stacked once when the layer is built: A as (E, R, in) and s*B as rows
(E*R, out), where R is the largest rank among the experts (smaller ranks are zero-padded,
which changes nothing). Three ways to compute the mixture give the same numbers at different
costs (t tokens, k experts per token):

- `dense`:   every expert on every token, coefficients zero outside the top-k.
             Cost t*E*R*(in+out) in two GEMMs; best when E*R is small.
- `dense-a`: the A side as one GEMM (t*E*R*in), the B side only for the chosen experts,
             as one fused `embedding_bag` (t*k*R*out, nothing copied).
- `sparse`:  only the chosen pairs on both sides, t*k*R*(in+out), reading the stacked
             factors in place: independent of E, best from a few dozen experts on.

`MixtureStrategy` picks one per call from the token count, using timings measured once per
layer shape (see `MixtureStrategy.choose`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quiver.models import layer_sizes
from quiver.routing.spectr import update_grams

# ----------------------------------------------------------------------------- mixtures
# Every mixture takes x (t, in), weights and indices (t, k), a_stack (E, R, in), b_rows
# (E*R, out), where row e*R + j of b_rows is column j of expert e's s*B, and optionally
# h = x @ A^T (t, E*R) when the caller already has it; it returns the mixture (t, out).


def _h_all(x, a_stack, h):
    n_experts, rank, fan_in = a_stack.shape
    return h if h is not None else x @ a_stack.reshape(n_experts * rank, fan_in).T  # (t, E*R)


def mixture_dense(x, weights, indices, a_stack, b_rows, h=None, index=None) -> torch.Tensor:
    """Every expert on every token; coefficients are zero outside each token's top-k."""
    n_experts, rank, _ = a_stack.shape
    t = x.shape[0]
    # add, not set: an expert named twice in a token's list counts twice, as in the others
    coef = x.new_zeros(t, n_experts).scatter_add(1, indices, weights)  # (t, E)
    h = (_h_all(x, a_stack, h).view(t, n_experts, rank) * coef[:, :, None])  # (t, E, R)
    return h.view(t, n_experts * rank) @ b_rows


def mixture_dense_a(x, weights, indices, a_stack, b_rows, h=None, index=None) -> torch.Tensor:
    """A side dense (one GEMM), B side only for the chosen experts (a fused embedding_bag)."""
    n_experts, rank, _ = a_stack.shape
    t, k = indices.shape
    h = _h_all(x, a_stack, h).view(t, n_experts, rank)  # (t, E, R)
    h = h.gather(1, indices[..., None].expand(t, k, rank)) * weights[..., None]  # (t, k, R)
    return _b_side(h, _rows(indices, rank), b_rows)


def mixture_sparse(x, weights, indices, a_stack, b_rows, h=None, index=None) -> torch.Tensor:
    """Only the chosen (token, expert) pairs, reading A and B in place (no copies).

    The A side, h[t, k, j] = A[indices[t, k], j] . x[t], is a gathered dot product: exactly
    what the backward pass of `embedding_bag` computes for its per-sample weights, so that
    kernel does it without materialising the t x k x R x in gathered rows (5 to 30 times
    faster than gathering them and an einsum, measured on this CPU).
    """
    t, k = indices.shape
    n_experts, rank, fan_in = a_stack.shape
    index = index or sparse_index(t, k, rank, x.device)
    rows = _rows(indices, rank, index.rank_offsets)  # (t, k, R): rows of A and of b_rows
    if torch.is_grad_enabled() and (x.requires_grad or a_stack.requires_grad):
        # that kernel has no derivative: gather the rows when training through the mixture
        h = torch.einsum("ti,tkri->tkr", x, a_stack[indices]) * weights[..., None]
        return _b_side(h, rows, b_rows)
    h = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x.contiguous(), a_stack.view(n_experts * rank, fan_in), rows.reshape(-1), index.offsets,
        index.bags, 0, -1)
    h = h.view(t, k, rank) * weights[..., None]  # (t, k, R)
    return _b_side(h, rows, b_rows)


def _b_side(h, rows, b_rows) -> torch.Tensor:
    """sum over (k, R) of h[t, k, j] * b_rows[rows[t, k, j]], without copying B."""
    t = h.shape[0]
    return nn.functional.embedding_bag(rows.reshape(t, -1), b_rows, mode="sum",
                                       per_sample_weights=h.reshape(t, -1))  # (t, out)


class SparseIndex(NamedTuple):
    """Index tensors `sparse` needs for t tokens with k experts of rank R (cacheable)."""

    rank_offsets: torch.Tensor  # (R,) 0..R-1
    bags: torch.Tensor  # (t*k*R,) the token of each gathered row
    offsets: torch.Tensor  # (t,) where each token's rows start


def sparse_index(t: int, k: int, rank: int, device) -> SparseIndex:
    per_token = k * rank
    return SparseIndex(torch.arange(rank, device=device),
                       torch.arange(t * per_token, device=device) // per_token,
                       torch.arange(0, t * per_token, per_token, device=device))


def _rows(indices, rank, rank_offsets=None) -> torch.Tensor:
    """(t, k, R): row e*R + j of a stacked (E*R, .) matrix for each chosen expert e
    (`rank_offsets`, 0..R-1, when the caller has them already)."""
    if rank_offsets is None:
        rank_offsets = torch.arange(rank, device=indices.device)
    return indices[..., None] * rank + rank_offsets


DENSE_A = ("dense", "dense-a")  # the strategies that compute x @ A^T for every expert
MIXTURES: dict[str, Callable] = {
    "dense": mixture_dense,
    "dense-a": mixture_dense_a,
    "sparse": mixture_sparse,
}


class MixtureStrategy:
    """Chooses the fastest mixture per (layer shape, token-count bucket), by measuring once.

    Owned by one routed model and shared by its layers; layers with the same shape reuse the
    same measurement, and all layers the same `sparse` index tensors (they depend only on the
    token count, k and the rank). `fixed` forces one strategy (used by tests and benchmarks).
    """

    def __init__(self, fixed: str | None = None, repeats: int = 5) -> None:
        if fixed is not None and fixed not in MIXTURES:
            raise ValueError(f"unknown mixture strategy {fixed!r}: {sorted(MIXTURES)}")
        self.fixed = fixed
        self.repeats = repeats
        self.choices: dict[tuple, str] = {}
        self._indices: dict[tuple, SparseIndex] = {}

    def sparse_index(self, t: int, k: int, rank: int, device) -> SparseIndex:
        """The `sparse` index tensors for t tokens, made once (decoding repeats t each step)."""
        key = (t, k, rank, device)  # the device too: the model may move
        if key not in self._indices:
            if len(self._indices) >= 16:  # prefill lengths vary: keep the cache small
                self._indices.clear()
            self._indices[key] = sparse_index(t, k, rank, device)
        return self._indices[key]

    def known(self, tokens: int, a_stack, out_features: int, k: int | None, dtype) -> str | None:
        """The strategy already chosen for this case, or None before its first measurement."""
        if self.fixed is not None:
            return self.fixed
        if k is None:
            return None
        return self.choices.get(self._key(tokens, a_stack, out_features, k, dtype))

    @staticmethod
    def _key(tokens, a_stack, out_features, k, dtype) -> tuple:
        bucket = 1 << max(0, (tokens - 1).bit_length())  # next power of two
        return (tuple(a_stack.shape), out_features, k, bucket, dtype)

    def choose(self, tokens: int, a_stack, out_features: int, k: int, dtype,
               sample: Callable[[], tuple] | None = None) -> str:
        """The strategy for `tokens` tokens on a layer of this shape (measured on first use).

        `sample` returns (x, weights, indices, a_stack, b_rows) to time the strategies on.
        """
        if self.fixed is not None:
            return self.fixed
        key = self._key(tokens, a_stack, out_features, k, dtype)
        if key not in self.choices:
            self.choices[key] = self._measure(*sample())
        return self.choices[key]

    def _measure(self, x, weights, indices, a_stack, b_rows) -> str:
        """Time each strategy; the minimum over repeats resists a busy machine's noise."""
        best = {}
        for name, mixture in MIXTURES.items():
            mixture(x, weights, indices, a_stack, b_rows)  # warm up
            times = []
            for _ in range(self.repeats):
                _wait_for(x.device)
                started = time.perf_counter()
                mixture(x, weights, indices, a_stack, b_rows)
                _wait_for(x.device)  # a GPU runs kernels asynchronously: time them, not launches
                times.append(time.perf_counter() - started)
            best[name] = min(times)
        return min(best, key=best.get)


def _wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------- layer


class RoutedLinear(nn.Module):
    """A frozen `nn.Linear` (or transformers' `Conv1D`) plus a routed mixture of the LoRA
    experts that adapt it.

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
        shared: (`SharedInput`, this layer's position in it) when the layer has keys: the
            buffer its keys and A are views of, shared with the layers that read the same
            input, so routing (and the dense A side) of all of them is one GEMM.
    """

    def __init__(self, base: nn.Module, a_stack, b_rows, keys, expert_ids, context,
                 mixture: MixtureStrategy, name: str, shared=None) -> None:
        super().__init__()
        self.base = base
        self._sizes = layer_sizes(base)  # (in, out); Conv1D's weight is stored (in, out)
        self.register_buffer("a_stack", a_stack, persistent=False)
        self.register_buffer("b_rows", b_rows, persistent=False)
        self.register_buffer("keys", keys, persistent=False)
        self.register_buffer("expert_ids", expert_ids, persistent=False)
        self.context = context
        self.mixture = mixture
        self.name = name
        self._shared = shared

    @property
    def in_features(self) -> int:
        return self._sizes[0]

    @property
    def out_features(self) -> int:
        return self._sizes[1]

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (t, in)
        n_experts = self.a_stack.shape[0]
        strategy = self.mixture.known(flat.shape[0], self.a_stack, self.out_features,
                                      self.context.top_k(n_experts), flat.dtype)
        h = None
        if self._can_share():  # one GEMM with the siblings (and x @ A^T for dense mixtures)
            group, member = self._shared
            projections, h = group.project(member, x, flat, with_a=strategy in DENSE_A)
            weights, indices = self.context.route(self, flat, projections)
        else:
            weights, indices = self.context.route(self, flat)  # (t, k), (t, k)
        weights = weights.to(flat.dtype)
        if strategy is None:
            strategy = self.mixture.choose(
                flat.shape[0], self.a_stack, self.out_features, indices.shape[1], flat.dtype,
                lambda: (flat, weights, indices, self.a_stack, self.b_rows))
        index = (self.mixture.sparse_index(*indices.shape, self.a_stack.shape[1], indices.device)
                 if strategy == "sparse" else None)
        mixture = MIXTURES[strategy](flat, weights, indices, self.a_stack, self.b_rows, h, index)
        return self._add_base(flat, mixture).view(*x.shape[:-1], self.out_features)

    def update_grams(self) -> torch.Tensor:
        """(E, R, R) Gram matrices of the experts' s*B at this layer (SpectR's router), made
        on first use and again only if the stacked factors change."""
        version = (self.b_rows.data_ptr(), self.b_rows._version, self.b_rows.device)
        if getattr(self, "_grams_version", None) != version:
            self._grams = update_grams(self.b_rows, self.a_stack.shape[0])
            self._grams_version = version
        return self._grams

    def _add_base(self, flat: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
        """W x (+ bias) + mixture; for a plain nn.Linear or Conv1D in one GEMM that accumulates
        onto the mixture (saves a pass over the output)."""
        if type(self.base) not in (nn.Linear, Conv1D):  # a subclass (quantised, ...)
            return self.base(flat) + mixture
        if self.base.bias is not None:
            mixture += self.base.bias
        weight = self.base.weight  # Conv1D stores it (in, out): x @ W as it is
        return torch.addmm(mixture, flat, weight if type(self.base) is Conv1D else weight.T)

    def _can_share(self) -> bool:
        """True while `keys` is still the view into the shared buffer (PHATGOOSE training
        replaces them) and the router scores tokens from x @ keys^T."""
        if self._shared is None or self.context.forced is not None:
            return False
        group, member = self._shared
        return (self.keys.data_ptr() == group.keys(member).data_ptr()
                and getattr(self.context.router, "takes_projections", False))

    def extra_repr(self) -> str:
        n_experts, rank, _ = self.a_stack.shape
        return f"in={self.in_features}, out={self.out_features}, experts={n_experts}, rank={rank}"
