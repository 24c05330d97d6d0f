"""Turning a transformers model into a routed multi-expert model, and back.

`attach_experts` replaces every linear layer that at least one expert adapts by a
`RoutedLinear` holding those experts' factors, stacked once. The model stays the same
transformers object, so `model(input_ids=...)`, `generate` (with its KV cache), `.eval()` and
`.to()` keep working. `detach_experts` puts the original layers back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quiver.errors import QuiverError
from quiver.library import Expert
from quiver.models import layer_sizes, linear_layers
from quiver.routing.layer import MixtureStrategy, RoutedLinear
from quiver.routing.shared import SharedInput, sibling_groups
from quiver.routing.uniform import UniformRouter


@dataclass
class RoutingContext:
    """State shared by the routed layers of one model (never global).

    `forced`: the index (in `expert_names`) of the one expert every token uses (the oracle,
    set per task), or None to let the router decide. `counts`: when not None, how often each
    expert was chosen at each layer (integer counts), or the routing weight it got, summed
    over tokens (float counts).
    """

    router: object
    expert_names: list[str]
    forced: int | None = None
    counts: dict[str, torch.Tensor] | None = None
    layers: list[RoutedLinear] = field(default_factory=list)

    def route(self, layer: RoutedLinear, x: torch.Tensor, projections=None):
        """(weights (t, k), local expert indices (t, k)) for the t tokens of `x` (t, in).

        `projections` is x @ keys^T when the layer has already computed it."""
        if self.forced is not None:
            weights, indices = self._forced_route(layer, x.shape[0])
        elif getattr(self.router, "reads_factors", False):
            weights, indices = self.router(x, layer.a_stack, layer.update_grams())
        elif projections is not None:
            weights, indices = self.router(x, layer.keys, projections)
        else:
            weights, indices = self.router(x, layer.keys)
        if self.counts is not None:  # choices, or routing weight with float counts
            chosen = layer.expert_ids[indices].flatten().cpu()
            counts = self.counts[layer.name]
            mass = weights.detach().flatten().double().cpu() if counts.is_floating_point() \
                else None
            counts += torch.bincount(chosen, weights=mass,
                                     minlength=len(self.expert_names)).to(counts.dtype)
        return weights, indices

    def top_k(self, n_experts: int) -> int | None:
        """How many experts each token gets at a layer with `n_experts` (None: not fixed)."""
        if self.forced is not None:
            return 1
        k = getattr(self.router, "top_k", None)
        if isinstance(self.router, UniformRouter) or k is None:
            return n_experts if isinstance(self.router, UniformRouter) else None
        return min(k, n_experts)

    def _forced_route(self, layer: RoutedLinear, tokens: int):
        local = layer.local_index[self.forced]  # -1 where this layer lacks the expert
        weights = layer.a_stack.new_full((tokens, 1), 1.0 if local >= 0 else 0.0)  # (t, 1)
        return weights, local.clamp(min=0).expand(tokens, 1)


def attach_experts(
    model: nn.Module,
    experts: list[Expert],
    router,
    keys: dict[str, dict[str, torch.Tensor]] | Callable[[str], dict] | None = None,
    mixture: MixtureStrategy | None = None,
) -> RoutingContext:
    """Replace the adapted linear layers of `model` by routed layers over `experts`.

    Args:
        keys: `{expert name: {module: vector (in,)}}`, the router's per-layer vectors
            (prototypes, centroids, gates), or a function from an expert's name to its
            `{module: vector}` (read one expert at a time); None for routers that need none.
            A dict is consumed: each expert's entry is removed once stacked, so the vectors
            are never held twice.

    Raises:
        QuiverError: the model is already routed, or an expert adapts a module it lacks.
    """
    if any(isinstance(m, RoutedLinear) for m in model.modules()):
        raise QuiverError("this model already has experts attached (detach_experts first)")
    if not experts:
        raise QuiverError("no experts to route between")
    mixture = mixture or MixtureStrategy()
    context = RoutingContext(router=router, expert_names=[e.name for e in experts])
    plan = _modules_per_expert(model, experts)
    ranks = {module: max(_rank(experts[i], module) for i in members)
             for module, members in plan.items()}
    shared = _shared_inputs(model, plan, ranks) if keys is not None else {}
    stacks = {module: _Stack(model.get_submodule(module), len(members), ranks[module],
                             shared.get(module))
              for module, members in plan.items()}
    for index, expert in enumerate(experts):  # one expert's weights in memory at a time
        factors = expert.lora_factors()
        expert_keys = None
        if callable(keys):
            expert_keys = keys(expert.name)
        elif keys is not None:
            expert_keys = keys.pop(expert.name)
        for module, members in plan.items():
            if index in members:
                slot = members.index(index)
                stacks[module].fill(slot, factors, module, expert)
                if expert_keys is not None:
                    stacks[module].keys[slot] = expert_keys[module].to(stacks[module].keys.dtype)
        expert.drop_weights()
    for module, members in plan.items():
        base = model.get_submodule(module)
        stack = stacks.pop(module)
        b_rows = stack.b.reshape(-1, layer_sizes(base)[1])  # (E*R, out), a view
        layer_keys = stack.keys
        if layer_keys is None:  # routers without keys only need the expert count
            layer_keys = stack.a.new_zeros(len(members), 0)
        layer = RoutedLinear(base, stack.a, b_rows, layer_keys,
                             torch.tensor(members, device=base.weight.device), context,
                             mixture, module, shared.get(module))
        local_index = torch.full((len(experts),), -1, dtype=torch.long)
        local_index[members] = torch.arange(len(members))
        layer.register_buffer("local_index", local_index.to(base.weight.device), persistent=False)
        _replace(model, module, layer)
        context.layers.append(layer)
    return context


def detach_experts(model: nn.Module) -> None:
    """Put the original linear layers back (the experts' stacks are freed)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutedLinear):
            _replace(model, name, module.base)


# ------------------------------------------------------------------------------- helpers
def _modules_per_expert(model: nn.Module, experts: list[Expert]) -> dict[str, list[int]]:
    """`{module: [indices of the experts adapting it]}`, from adapter configs (no weights)."""
    linear = list(linear_layers(model))  # nn.Linear and Conv1D, the output head left out
    plan: dict[str, list[int]] = {}
    for index, expert in enumerate(experts):
        targets = expert.adapter_config.get("target_modules") or []
        targets = {targets} if isinstance(targets, str) else set(targets)
        layers = expert.adapter_config.get("layers_to_transform")
        layers = {layers} if isinstance(layers, int) else set(layers or [])
        for name in linear:  # model order, so reports list layers top to bottom
            if name.rsplit(".", 1)[-1] not in targets and name not in targets:
                continue
            if layers and not any(f".{i}." in f".{name}." for i in layers):
                continue
            plan.setdefault(name, []).append(index)
    if not plan:
        raise QuiverError("the experts adapt no linear layer of this model")
    position = {name: i for i, name in enumerate(linear)}
    return dict(sorted(plan.items(), key=lambda item: position[item[0]]))


def _rank(expert: Expert, module: str) -> int:
    """The rank an expert's adapter config declares for a module (no weights read)."""
    config = expert.adapter_config
    pattern = config.get("rank_pattern") or {}
    # PEFT's rule: a pattern key matches a module name or its dotted suffix (a regex)
    matches = [r for key, r in pattern.items() if re.fullmatch(rf"(.*\.)?(?:{key})", module)]
    return max(matches) if matches else int(config.get("r") or 1)


def _shared_inputs(model: nn.Module, plan: dict[str, list[int]],
                   ranks: dict[str, int]) -> dict[str, tuple[SharedInput, int]]:
    """`{module: (its SharedInput, its position in it)}`: sibling layers that read the
    same input share one buffer of keys and A matrices (`quiver.routing.shared`)."""
    result = {}
    for group in sibling_groups(list(plan)):
        fan_in = {layer_sizes(model.get_submodule(m))[0] for m in group}
        members = [[m] for m in group] if len(fan_in) > 1 else [group]  # same input size
        for names in members:
            sizes = [(len(plan[m]), ranks[m]) for m in names]
            base = model.get_submodule(names[0])
            buffer = base.weight.new_zeros(sum(e * (1 + r) for e, r in sizes),
                                           layer_sizes(base)[0])
            shared = SharedInput(buffer, sizes)
            result.update({m: (shared, i) for i, m in enumerate(names)})
    return result


class _Stack:
    """The stacked factors of one layer.

    With router keys, keys and A are views into the layer's `SharedInput` buffer (allocated
    up front, ranks coming from the adapter configs, so nothing is copied twice).
    """

    def __init__(self, base: nn.Module, count: int, rank: int,
                 shared: tuple[SharedInput, int] | None) -> None:
        like, (fan_in, fan_out) = base.weight, layer_sizes(base)
        if shared is not None:
            group, member = shared
            self.keys = group.keys(member)  # (E, in)
            self.a = group.a_stack(member, rank)  # (E, R, in)
        else:
            self.keys, self.a = None, like.new_zeros(count, rank, fan_in)
        self.b = like.new_zeros(count, rank, fan_out)  # (E, R, out): s * B^T

    def fill(self, slot: int, factors, module: str, expert: Expert) -> None:
        if module not in factors:
            raise QuiverError(f"expert {expert.name!r} declares {module} but has no weights "
                              "for it")
        a, b = factors[module]
        rank = a.shape[0]
        if rank > self.a.shape[1]:
            raise QuiverError(f"expert {expert.name!r} has rank {rank} at {module}, more "
                              f"than its adapter config declares")
        self.a[slot, :rank] = a.to(self.a.dtype)  # smaller ranks stay zero-padded
        self.b[slot, :rank] = (b * expert.scaling).T.to(self.b.dtype)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
