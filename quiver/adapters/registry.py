"""The kinds of multi-task adapter, by name: their configs in and out of JSON (a build job
ships them), the config a build strategy trains with, and attaching a stored entry. Imports
no torch until an entry is attached."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from quiver.adapters.config import MTL_LORA_KIND, POLY_KIND, MTLLoRAConfig, PolyMHRConfig
from quiver.config import from_dict, to_dict
from quiver.errors import QuiverError

if TYPE_CHECKING:
    from quiver.adapters.task_rows import TaskRowAdapter

AdapterConfig = PolyMHRConfig | MTLLoRAConfig
ADAPTERS = {POLY_KIND: PolyMHRConfig, MTL_LORA_KIND: MTLLoRAConfig}  # kind -> its config dataclass
STRATEGIES = {"poly": PolyMHRConfig, "mhr": PolyMHRConfig, "mtl-lora": MTLLoRAConfig}


def adapter_to_dict(spec: AdapterConfig) -> dict:
    """A JSON-ready `{"kind", **fields}` of an adapter config (a build job ships this)."""
    return {"kind": spec.kind, **to_dict(spec)}


def adapter_from_dict(data: dict) -> AdapterConfig:
    """The adapter config `adapter_to_dict` wrote.

    Raises:
        QuiverError: an unknown kind or field.
    """
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind not in ADAPTERS:
        raise QuiverError(f"unknown adapter kind {kind!r}: use one of {sorted(ADAPTERS)}")
    return from_dict(ADAPTERS[kind], fields)


def adapter_for_strategy(strategy: str, configs: list[AdapterConfig]) -> AdapterConfig | None:
    """The adapter config build `strategy` trains with, from those given (a default one when
    none fits); None for the LoRA strategies. The CLI passes every adapter's config, so
    options of another adapter than the strategy's are refused rather than ignored; a single
    config given (the Python API) must be the strategy's.

    Raises:
        QuiverError: a config that differs from its defaults but is not the strategy's, or a
            single config of another adapter.
    """
    wanted = STRATEGIES.get(strategy)
    if len(configs) == 1 and wanted is not None and type(configs[0]) is not wanted:
        raise QuiverError(f"--strategy {strategy} trains with a {wanted.__name__}, not a "
                          f"{type(configs[0]).__name__}")  # one config given: it must fit
    for config in configs:
        if type(config) is not wanted and config != type(config)():
            changed = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(config)
                       if getattr(config, f.name) != f.default]
            raise QuiverError(f"{', '.join(changed)}: options of {config.kind} adapters, not "
                              f"of --strategy {strategy}")
    if wanted is None:
        return None
    chosen = next((c for c in configs if type(c) is wanted), wanted())
    return chosen.for_strategy(strategy)


def load_adapter(model, expert) -> TaskRowAdapter:
    """Attach a stored multi-task entry to `model` for evaluation (by its kind); call
    `set_task` before running the model and `remove()` after.

    Raises:
        QuiverError: a LoRA or unknown kind, or an entry that does not fit the model.
    """
    from quiver.adapters.mtl_lora import load_mtl_lora
    from quiver.adapters.poly_mhr import load_poly

    loader = {POLY_KIND: load_poly, MTL_LORA_KIND: load_mtl_lora}.get(expert.info.kind)
    if loader is None:
        raise QuiverError(f"expert {expert.name!r} is a {expert.info.kind} adapter, not a "
                          f"multi-task one ({MTL_LORA_KIND}, {POLY_KIND})")
    return loader(model, expert)
