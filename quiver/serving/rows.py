"""Per-row routing: every row of a batch with its own expert, routing method or none.

A server receives requests that name different things (`base`, `arrow`, `uniform`,
`expert:NAME`) and must still run them in one forward pass per step (the S-LoRA / Punica
idea). Every LoRA expert of the library is attached once, as routed layers
(`quiver.routing.attach_experts`, with Arrow's prototypes as keys), and the routing context
those layers consult is replaced by a `RowRoutingContext`, which knows what each row of the
current batch asked for and turns it into mixing weights per token at every layer:

    expert e    one-hot on e (zero where the layer lacks e)      = reuse(..., experts=[e])
    arrow       Arrow's top-k softmax over |x . p_e| / T           = reuse(..., "arrow")
    uniform     1/E on each of the layer's E experts               = reuse(..., "uniform")
    base        no expert (weight 0)                               = the bare base model

Each token's weights are padded with zeros to the largest k in the batch, so the routed
layer's mixtures (dense, dense-a, sparse) compute each row exactly as that row alone would,
up to the floating-point order of the batched matrix products (tests/test_generate.py checks
this against the one-at-a-time references). The routed layer itself is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quiver.errors import QuiverError
from quiver.library import Library
from quiver.routing import ArrowRouter, RoutedLinear, RoutingContext, attach_experts
from quiver.transforms.arrow import stored_prototypes

# The kinds of route a row can take; their codes index the per-row tensors below.
BASE, EXPERT, ARROW, UNIFORM = 0, 1, 2, 3
METHODS = {"arrow": ARROW, "uniform": UNIFORM}


@dataclass(frozen=True)
class Route:
    """What one request runs on: `kind` (BASE, EXPERT, ARROW, UNIFORM) and, for EXPERT, the
    expert's index in the attached list."""

    kind: int
    expert: int = -1


class RowRoutingContext(RoutingContext):
    """A routing context whose routes are set per batch row before every forward pass.

    `set_rows(routes, tokens_per_row)` describes the next forward: row r's tokens are the
    flattened positions r*T .. r*T+T-1 (the routed layer flattens (B, T, in) to (B*T, in)).
    """

    def __init__(self, router: ArrowRouter, expert_names: list[str]) -> None:
        super().__init__(router=router, expert_names=expert_names)
        self._routes: list[Route] = []
        self._kinds: set[int] = set()
        self._tokens_per_row = 1
        self._fixed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer, per plan
        self._arrow_rows: torch.Tensor | None = None
        self._row_kinds = self._row_experts = torch.zeros(0, dtype=torch.long)
        self._arrow_tokens = torch.zeros(0, 1, dtype=torch.bool)  # (t, 1) Arrow rows' tokens

    def set_rows(self, routes: list[Route], tokens_per_row: int) -> None:
        """The routes of the rows of the next forward, each row `tokens_per_row` tokens long."""
        routes = list(routes)
        if routes == self._routes and tokens_per_row == self._tokens_per_row:
            return  # decoding the same batch again: keep the weights made for it
        self._routes = routes
        self._kinds = {route.kind for route in routes}
        self._tokens_per_row = tokens_per_row
        self._fixed = {}
        device = self.layers[0].a_stack.device if self.layers else None  # made once, there
        self._row_kinds = torch.tensor([route.kind for route in routes], device=device)  # (B,)
        self._row_experts = torch.tensor([max(route.expert, 0) for route in routes],
                                         device=device)  # (B,)
        arrow = [r for r, route in enumerate(routes) if route.kind == ARROW]
        self._arrow_rows = (self._token_rows(arrow).to(device)
                            if arrow and len(arrow) < len(routes) else None)
        self._arrow_tokens = (self._row_kinds == ARROW).repeat_interleave(tokens_per_row)[:, None]

    def top_k(self, n_experts: int) -> int:
        """The experts per token in this batch at a layer with `n_experts`: the largest k
        any row needs (the others are padded with zero weights)."""
        k = 1
        if ARROW in self._kinds:
            k = max(k, min(self.router.top_k, n_experts))
        if UNIFORM in self._kinds:
            k = max(k, n_experts)
        return k

    def route(self, layer: RoutedLinear, x: torch.Tensor, projections=None):
        """(weights (t, k), local expert indices (t, k)) for the t = B*T tokens of `x`."""
        if self._kinds == {ARROW}:  # every row routed by Arrow: the router as it is
            return self.router(x, layer.keys, projections)
        weights, indices = self._fixed_part(layer, x)
        if ARROW not in self._kinds:
            return weights, indices
        if weights.shape[1] == min(self.router.top_k, layer.a_stack.shape[0]):
            # Arrow's k is the batch's: route every token (x @ keys^T is there already), keep
            # Arrow's choice on the Arrow rows' tokens
            chosen, local = self.router(x, layer.keys, projections)  # (t, k), (t, k)
            take = self._arrow_tokens  # (t, 1)
            return (torch.where(take, chosen.to(weights.dtype), weights),
                    torch.where(take, local, indices))
        # a uniform row makes k larger: Arrow's k experts, then other experts at weight 0
        weights, indices = weights.clone(), indices.clone()
        rows = self._arrow_rows
        chosen, local = self.router(x[rows], layer.keys,
                                    None if projections is None else projections[rows])
        weights[rows, : chosen.shape[1]] = chosen.to(weights.dtype)  # (t_arrow, k)
        indices[rows] = _pad_distinct(local, indices.shape[1], layer.a_stack.shape[0])
        return weights, indices

    def _fixed_part(self, layer: RoutedLinear, x: torch.Tensor):
        """The weights of the rows whose routing does not depend on x (expert, uniform, base;
        zeros for Arrow rows), made once per layer and plan: decoding repeats the plan."""
        key = id(layer)
        if key not in self._fixed:
            self._fixed[key] = self._fixed_weights(layer, x.dtype, x.device)
        return self._fixed[key]

    def _fixed_weights(self, layer: RoutedLinear, dtype, device):
        n_experts = layer.a_stack.shape[0]
        k, per_row = self.top_k(n_experts), self._tokens_per_row
        kinds = self._row_kinds
        # Every row's k indices are distinct, as Arrow's are; unused slots carry weight 0.
        indices = torch.arange(k, device=device).repeat(len(kinds), 1)  # (B, k)
        weights = torch.zeros(len(kinds), k, dtype=dtype, device=device)  # (B, k)
        local = layer.local_index[self._row_experts]  # (B,) -1: the layer lacks it
        rows = ((kinds == EXPERT) & (local >= 0)).nonzero()[:, 0]  # others add nothing here
        slots = torch.where(local[rows] < k, local[rows], 0)  # keeps the row's indices distinct
        weights[rows, slots], indices[rows, slots] = 1.0, local[rows]
        weights[kinds == UNIFORM, :n_experts] = 1.0 / n_experts
        # (B*T, k): every token of a row takes its row's weights
        return weights.repeat_interleave(per_row, 0), indices.repeat_interleave(per_row, 0)

    def _token_rows(self, rows: list[int]) -> torch.Tensor:
        """The flattened token positions of `rows`."""
        per_row = self._tokens_per_row
        starts = torch.tensor(rows) * per_row
        return (starts[:, None] + torch.arange(per_row)).flatten()


def _pad_distinct(indices: torch.Tensor, k: int, n_experts: int) -> torch.Tensor:
    """(t, k): each row of `indices` (t, k0 <= k) followed by k - k0 other experts."""
    if indices.shape[1] == k:
        return indices
    taken = torch.zeros(indices.shape[0], n_experts, dtype=torch.int8, device=indices.device)
    taken.scatter_(1, indices, 1)
    others = taken.sort(dim=1, stable=True).indices[:, : k - indices.shape[1]]  # untaken first
    return torch.cat([indices, others], 1)


@dataclass
class ServedModel:
    """A base model with every LoRA expert of a library attached for per-row routing.

    `routes` is the fixed table of what a request may name: `base`, `arrow`, `uniform`
    (with at least one expert) and `expert:NAME` per LoRA expert. Nothing else is looked up.
    """

    model: nn.Module
    tokenizer: object
    context: RowRoutingContext | None
    routes: dict[str, Route]

    def route(self, name: str) -> Route:
        """The route of a model name.

        Raises:
            QuiverError: a name that is not in the table.
        """
        if name not in self.routes:
            raise QuiverError(f"unknown model {name!r}: use one of {', '.join(self.routes)}")
        return self.routes[name]


def serve_library(model: nn.Module, tokenizer, library: Library | None, top_k: int = 4,
                  temperature: float = 1.0) -> ServedModel:
    """Attach every LoRA expert of `library` (none without one) to `model` for serving.

    Multi-task entries (Poly/MHR, MTL-LoRA) have no single LoRA and are not served; merged
    experts are LoRAs like the others, served as `expert:NAME` and routed among by Arrow and
    uniform, as `quiver.reuse` would. Experts are stacked at the largest rank of a layer, so a
    merge of high rank (an exact `uniform-delta` of many experts) makes every row's mixture
    at that layer as costly as its rank.

    Raises:
        QuiverError: a library made for another base model.
    """
    routes = {"base": Route(BASE)}
    if library is None or not library.names():
        return ServedModel(model, tokenizer, None, routes)
    from quiver.zero_shot import check_same_base

    names = [n for n in library.names() if library.get(n).info.kind == "lora"]
    if not names:
        return ServedModel(model, tokenizer, None, routes)
    check_same_base(model, library, names)
    router = ArrowRouter(top_k, temperature)
    attached = attach_experts(model, library.experts(names), router,
                              lambda name: stored_prototypes(library, name))
    context = RowRoutingContext(router, attached.expert_names)
    for layer in attached.layers:
        layer.context = context
    context.layers = attached.layers
    model.quiver_routing = context
    routes.update({method: Route(kind) for method, kind in METHODS.items()})
    routes.update({f"expert:{name}": Route(EXPERT, i) for i, name in enumerate(names)})
    return ServedModel(model, tokenizer, context, routes)
