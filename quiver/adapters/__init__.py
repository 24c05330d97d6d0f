"""Trainable multi-task adapters: trained jointly on many tasks, stored as one library entry
of their own kind (not a plain LoRA). Poly and MHR: `poly_mhr`."""

from __future__ import annotations

from quiver.adapters.poly_mhr import (
    PolyAdapter,
    PolyLinear,
    PolyMHRConfig,
    attach_poly,
    load_poly,
    routing_weights,
)
from quiver.config import from_dict, to_dict

ADAPTERS = {"poly": PolyMHRConfig}  # kind -> its config dataclass (what a build job ships)


def adapter_to_dict(spec: PolyMHRConfig) -> dict:
    """A JSON-ready `{"kind", **fields}` of an adapter config (a build job ships this)."""
    return {"kind": spec.kind, **to_dict(spec)}


def adapter_from_dict(data: dict) -> PolyMHRConfig:
    """The adapter config `adapter_to_dict` wrote.

    Raises:
        QuiverError: an unknown kind or field.
    """
    from quiver.errors import QuiverError

    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind not in ADAPTERS:
        raise QuiverError(f"unknown adapter kind {kind!r}: use one of {sorted(ADAPTERS)}")
    return from_dict(ADAPTERS[kind], fields)


__all__ = ["ADAPTERS", "PolyAdapter", "PolyLinear", "PolyMHRConfig", "adapter_from_dict",
           "adapter_to_dict", "attach_poly", "load_poly", "routing_weights"]
