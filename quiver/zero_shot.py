"""Zero-shot reuse of a library (`quiver.reuse`): its experts routed inside a base model.

    model = quiver.reuse(model, library, method="arrow", top_k=4)
    model.generate(...)                      # still the transformers model, now routed

The model is changed in place (its adapted linear layers become `RoutedLinear`) and returned;
`quiver.routing.detach_experts(model)` restores it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from quiver.errors import QuiverError
from quiver.library import Library
from quiver.library.expert import require_lora
from quiver.models import fingerprint
from quiver.routing import (
    ArrowRouter,
    CentroidRouter,
    MixtureStrategy,
    PhatgooseRouter,
    RoutingContext,
    SpectrRouter,
    UniformRouter,
    attach_experts,
)
from quiver.transforms.arrow import expert_prototypes, stored_prototypes
from quiver.transforms.genknowsub import subtract_general

METHODS = ("arrow", "spectr", "uniform", "centroid", "phatgoose", "oracle")


def reuse(
    model: nn.Module,
    library: Library,
    method: str = "arrow",
    experts: list[str] | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    mixture: str | None = None,
    tokenizer=None,
    gate_steps: int = 100,
    general: list[str] | None = None,
) -> nn.Module:
    """Attach the library's experts (all by default) to `model`, routed by `method`.

    `top_k` defaults to each method's own: 4 for Arrow (the paper) and SpectR, 2 for
    PHATGOOSE, every
    expert for centroid routing. `centroid` and `phatgoose` need the tokenizer: missing
    centroids or gates are computed with `model` (over the experts' own training tasks) and
    stored in the library first (PHATGOOSE gates train for `gate_steps` steps per expert).
    `general` (Arrow only) names general experts whose mean update is subtracted from every
    routed expert first (GenKnowSub, in update space; see `quiver.transforms.genknowsub`).

    Raises:
        QuiverError: unknown method or expert, or a library made for another base model.
    """
    names = library.names() if experts is None else list(experts)
    if experts is None and general:  # the general experts are subtracted, not routed
        names = [n for n in names if n not in set(general)]
    check_same_base(model, library, names)
    experts_to_attach = library.experts(names)
    require_lora(experts_to_attach + library.experts(list(general or [])), f"{method} routing")
    if general and method != "arrow":
        raise QuiverError("general-knowledge subtraction is supported with Arrow routing only")
    if method == "arrow" and general:
        check_same_base(model, library, list(general))
        experts_to_attach = subtract_general(experts_to_attach, library.experts(general))
        router = ArrowRouter(top_k or 4, temperature)
        keys = {e.name: expert_prototypes(e.lora_factors()) for e in experts_to_attach}
    elif method == "arrow":
        router = ArrowRouter(top_k or 4, temperature)
        keys = functools.partial(stored_prototypes, library)  # read one expert at a time
    elif method == "spectr":  # reads the stacked factors themselves: no stored keys
        router, keys = SpectrRouter(top_k or 4, temperature), None
    elif method == "uniform":
        router, keys = UniformRouter(), None
    elif method in ("centroid", "phatgoose"):
        router, keys = _learned_keys(method, model, tokenizer, library, names, top_k,
                                     temperature, gate_steps)
    elif method == "oracle":  # the caller sets routing_context(model).forced per task
        router, keys = _unset_oracle, None
    else:
        raise QuiverError(f"unknown routing method {method!r}: use one of {METHODS}")
    context = attach_experts(model, experts_to_attach, router, keys,
                             MixtureStrategy(fixed=mixture))
    model.quiver_routing = context
    return model


def _learned_keys(method, model, tokenizer, library, names, top_k, temperature, gate_steps):
    if tokenizer is None:
        raise QuiverError(f"{method} routing needs the tokenizer to compute its keys")
    if method == "centroid":
        from quiver.transforms.centroid import library_centroids

        keys = library_centroids(model, tokenizer, library, names)
        return CentroidRouter(top_k, temperature), keys
    from quiver.transforms.phatgoose import library_gates

    return PhatgooseRouter(top_k or 2), library_gates(model, tokenizer, library, names,
                                                      steps=gate_steps)


def _unset_oracle(x, keys):
    raise QuiverError("oracle routing needs an expert chosen per task (routing_context.forced)")


def routing_context(model: nn.Module) -> RoutingContext:
    """The routing state of a model returned by `reuse`."""
    context = getattr(model, "quiver_routing", None)
    if context is None:
        raise QuiverError("this model has no experts attached (use quiver.reuse)")
    return context


def check_same_base(model: nn.Module, library: Library, names: list[str]) -> None:
    """Refuse experts trained on another base model than `model`.

    Raises:
        QuiverError: an unknown expert, or a base-model fingerprint that does not match.
    """
    base = library.base
    if base is None:
        raise QuiverError(f"library {library.url} has no experts")
    model_print = fingerprint(model)
    if base["fingerprint"] != model_print:
        raise QuiverError(
            f"library {library.url} holds experts for base model {base['name']!r} "
            f"(fingerprint {base['fingerprint']}); this model's fingerprint is {model_print}"
        )
    for name in names:
        info = library.get(name).info
        if info.base_fingerprint not in (None, model_print):
            raise QuiverError(f"expert {name!r} was trained on another base model "
                              f"({info.base_model}, {info.base_fingerprint})")


@contextmanager
def recording_routing(model: nn.Module, weighted: bool = False
                      ) -> Iterator[dict[str, torch.Tensor]]:
    """Count, per layer, how often each expert is chosen while the block runs (`weighted`:
    the routing weight each expert got, summed over tokens, instead).

    Yields `{layer name: counts (E,)}` indexed like `routing_context(model).expert_names`.
    """
    context = routing_context(model)
    dtype = torch.float64 if weighted else torch.long
    context.counts = {layer.name: torch.zeros(len(context.expert_names), dtype=dtype)
                      for layer in context.layers}
    try:
        yield context.counts
    finally:
        context.counts = None
