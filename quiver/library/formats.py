"""The on-disk formats a library stores and how each is checked: a plain LoRA (PEFT's
`LORA`), PEFT's Poly (`POLY`, the Poly/MHR entries of `quiver.adapters.poly_mhr`) and
quiver's own `MTL_LORA` (`quiver.adapters.mtl_lora`).

`check_adapter` checks a stored adapter by its `peft_type`. The checks, key names and config
JSON live here, with the library: the adapter modules import them, and the library never
imports an adapter module.
"""

from __future__ import annotations

import json
import re

import torch

from quiver.errors import QuiverError
from quiver.library.expert import PEFT_PREFIX, lora_factors

POLY_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>poly_lora_A|poly_lora_B|poly_router\.module_logits)$")
MTL_LORA_PARTS = ("mtl_lora_A", "mtl_lora_L", "mtl_lora_B", "mtl_lora_mix")
MTL_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>" + "|".join(MTL_LORA_PARTS) + r")$")


def check_adapter(
    adapter_config: dict, weights: dict[str, torch.Tensor], modules: dict[str, list[int]] | None
) -> None:
    """Check that a PEFT adapter is a plain LoRA (or a Poly/MHR or MTL-LoRA adapter) that fits
    a base model's linear layers.

    Args:
        modules: `{module name: [in, out]}` of the base model, or None to skip shape checks.

    Raises:
        QuiverError: not LoRA, unsupported LoRA options, rank or target-module mismatch,
            NaN or infinite weights.
    """
    for key, tensor in weights.items():  # one broken expert would break every mixture with it
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise QuiverError(f"the adapter's weight {key} has NaN or infinite values")
    if adapter_config.get("peft_type") == "POLY":
        check_poly_adapter(adapter_config, weights, modules)
        return
    if adapter_config.get("peft_type") == "MTL_LORA":
        check_mtl_lora_adapter(adapter_config, weights, modules)
        return
    if adapter_config.get("peft_type") != "LORA":
        raise QuiverError(f"not a LoRA adapter (peft_type={adapter_config.get('peft_type')!r})")
    for option in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if adapter_config.get(option):
            raise QuiverError(f"LoRA option {option}={adapter_config[option]!r} is not supported")
    if adapter_config.get("bias", "none") != "none":
        raise QuiverError("LoRA adapters with trained biases are not supported")
    rank = adapter_config.get("r")
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    factors = lora_factors(weights)
    if not factors:
        raise QuiverError("the adapter has no LoRA weights")
    for module, (a, b) in factors.items():
        if a.shape[0] != rank or b.shape[1] != rank:
            raise QuiverError(
                f"rank mismatch at {module}: config says r={rank}, weights have "
                f"A {tuple(a.shape)} and B {tuple(b.shape)}"
            )
        if targets and module.rsplit(".", 1)[-1] not in targets and module not in targets:
            raise QuiverError(
                f"target-module mismatch: {module} is adapted but not in target_modules {targets}"
            )
        check_fits_base_layer(module, a.shape[1], b.shape[0], modules)


def check_fits_base_layer(module: str, fan_in: int, fan_out: int,
                          modules: dict[str, list[int]] | None) -> None:
    """Raise unless the base model has a linear layer `module` of `fan_in` -> `fan_out`.

    Args:
        modules: `{module name: [in, out]}` of the base model, or None to skip the check.
    """
    if modules is None:
        return
    if module not in modules:
        raise QuiverError(f"the base model has no linear layer named {module}")
    base_in, base_out = modules[module]
    if (fan_in, fan_out) != (base_in, base_out):
        raise QuiverError(f"shape mismatch at {module}: base layer is {base_in}->{base_out}, the "
                          f"adapter's {fan_in}->{fan_out} (an expert for another base model?)")


def peft_config_json(config, base_model: str | None) -> dict:
    """A PEFT config (`LoraConfig`, `PolyConfig`, ...) as `adapter_config.json` holds it:
    plain JSON values (sets sorted, enums as their values) and the base model's name."""
    raw = config.to_dict()
    raw["base_model_name_or_path"] = base_model
    raw = {k: sorted(v) if isinstance(v, set) else v for k, v in raw.items()}
    return json.loads(json.dumps(raw, default=str))


def check_poly_adapter(adapter_config: dict, weights: dict[str, torch.Tensor],
                       modules: dict[str, list[int]] | None) -> None:
    """Check that a PEFT Poly adapter is complete and fits a base model's linear layers.

    Raises:
        QuiverError: a key that is not a Poly weight, a missing part, or a shape that does not
            match the config or the base model.
    """
    parts = weights_by_module(weights, POLY_KEY, "Poly")
    heads, skills = adapter_config.get("n_splits"), adapter_config.get("n_skills")
    rank, tasks = adapter_config.get("r"), adapter_config.get("n_tasks")
    for module, found in parts.items():
        if len(found) != 3:
            raise QuiverError(f"incomplete Poly weights for {module}: only {sorted(found)}")
        a, b = found["poly_lora_A"], found["poly_lora_B"]
        logits = found["poly_router.module_logits"]
        if (a.shape[:2] != (heads, skills) or a.shape[3] != rank or b.shape[:3] !=
                (heads, skills, rank) or tuple(logits.shape) != (tasks, heads * skills)):
            raise QuiverError(f"Poly shapes at {module} do not match the config (r={rank}, "
                              f"tasks={tasks}, skills={skills}, splits={heads})")
        check_fits_base_layer(module, a.shape[2] * heads, b.shape[3] * heads, modules)


def check_mtl_lora_adapter(adapter_config: dict, weights: dict[str, torch.Tensor],
                           modules: dict[str, list[int]] | None) -> None:
    """Check that a stored MTL-LoRA adapter is complete and fits a base model's linear layers.

    Raises:
        QuiverError: a key that is not an MTL-LoRA weight, a missing part, or a shape that
            does not match the config or the base model.
    """
    parts = weights_by_module(weights, MTL_LORA_KEY, "MTL-LoRA")
    rank, tasks = adapter_config.get("r"), adapter_config.get("n_tasks")
    n = adapter_config.get("up_projections")
    for module, found in parts.items():
        if len(found) != len(MTL_LORA_PARTS):
            raise QuiverError(f"incomplete MTL-LoRA weights for {module}: only {sorted(found)}")
        a, lam, b, mix = (found[p] for p in MTL_LORA_PARTS)
        if (a.shape[0] != rank or tuple(lam.shape) != (tasks, rank, rank)
                or b.shape[0] != n or b.shape[2] != rank or tuple(mix.shape) != (tasks, n)):
            raise QuiverError(f"MTL-LoRA shapes at {module} do not match the config (r={rank}, "
                              f"tasks={tasks}, up_projections={n})")
        check_fits_base_layer(module, a.shape[1], b.shape[1], modules)


def weights_by_module(weights: dict[str, torch.Tensor], key: re.Pattern, kind: str
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """A stored adapter's tensors grouped by module (PEFT's prefix removed), then by part;
    `key` matches a tensor name with groups `module` and `part`.

    Raises:
        QuiverError: a name `key` does not match, or no tensors at all.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        match = key.match(name)
        if match is None:
            raise QuiverError(f"not {article(kind)} {kind} weight: {name!r}")
        parts.setdefault(match["module"].removeprefix(PEFT_PREFIX), {})[match["part"]] = tensor
    if not parts:
        raise QuiverError(f"the adapter has no {kind} weights")
    return parts


def article(word: str) -> str:
    """'an' before a word read with a vowel sound at its start (MTL-LoRA: em-tee-el), else 'a'."""
    return "an" if word[0] in "AEFHILMNORSX" else "a"
