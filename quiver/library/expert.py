"""An expert: one LoRA adapter in PEFT's format plus quiver's metadata about it.

On disk (see `quiver.library.store`) an expert is a folder:

    adapter_config.json          PEFT's LoraConfig, as PEFT writes it
    adapter_model.safetensors    PEFT's state dict: `<module>.lora_A.weight` (r, in) and
                                 `<module>.lora_B.weight` (out, r) for every adapted module
    quiver.json                  `ExpertInfo` below; written last, it is the commit point
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from quiver.errors import QuiverError

FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."  # the prefix PEFT gives module names in its state dicts
ADAPTER_CONFIG = "adapter_config.json"  # the three files of an expert folder (see above)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "quiver.json"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


@dataclass
class ExpertInfo:
    """Everything quiver knows about an expert besides its weights (`quiver.json`)."""

    name: str
    tasks: list[str]
    base_model: str
    base_fingerprint: str | None
    lora: dict
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: str = ""
    content_hash: str = ""
    source: str = "trained"
    format_version: int = FORMAT_VERSION
    kind: str = "lora"  # "lora", or a multi-task adapter of quiver.adapters (poly, mtl-lora)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> ExpertInfo:
        """Raises QuiverError when the metadata is not valid JSON of the expected shape."""
        try:
            raw = json.loads(data)
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
            raise QuiverError(f"corrupt expert metadata {where}: {err}") from err


class Expert:
    """Metadata, PEFT adapter config, and weights that are read only when first used."""

    def __init__(
        self,
        info: ExpertInfo,
        adapter_config: dict,
        weights: dict[str, torch.Tensor] | None = None,
        load_weights: Callable[[], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        if weights is None and load_weights is None:
            raise ValueError("an Expert needs weights or a way to load them")
        self.info = info
        self.adapter_config = adapter_config
        self._weights = weights
        self._load_weights = load_weights

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """PEFT-format state dict (loaded from storage on first access)."""
        if self._weights is None:
            self._weights = self._load_weights()
        return self._weights

    def drop_weights(self) -> None:
        """Free the loaded weights (they are read again on next use, if they came from storage)."""
        if self._load_weights is not None:
            self._weights = None

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`{module name: (A (r, in), B (out, r))}`, module names as in the base model.

        Raises:
            QuiverError: the expert is not a LoRA (a multi-task entry has no single A, B).
        """
        require_lora([self], "this")
        return lora_factors(self.weights)

    @property
    def scaling(self) -> float:
        """The factor s of the update s * B A: alpha / r (alpha / sqrt(r) with rsLoRA)."""
        rank = self.adapter_config["r"]
        if self.adapter_config.get("use_rslora"):
            return self.adapter_config["lora_alpha"] / rank**0.5
        return self.adapter_config["lora_alpha"] / rank

    def __repr__(self) -> str:
        return f"Expert({self.name!r}, tasks={self.info.tasks}, rank={self.adapter_config['r']})"


def require_lora(experts: list[Expert], what: str) -> None:
    """Refuse experts of another kind than a plain LoRA for `what` (a routing, a merge, ...).

    Raises:
        QuiverError: the first expert that is not a LoRA, in one line.
    """
    for expert in experts:
        if expert.info.kind != "lora":
            export = (f", or export a task of it as a LoRA with `quiver library export-task "
                      f"LIBRARY {expert.name} TASK --name NEW`"
                      if expert.info.kind == "mtl-lora" else "")
            raise QuiverError(
                f"expert {expert.name!r} is a {expert.info.kind} adapter (a row per training "
                f"task), not a LoRA: {what} needs LoRA experts; evaluate it on its own tasks "
                f"with --method expert:{expert.name}{export}")


def lora_factors(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group a PEFT LoRA state dict into `{module: (A, B)}`.

    Raises:
        QuiverError: a key that is not a LoRA A/B weight, or an A without its B.
    """
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise QuiverError(f"not a LoRA weight: {key!r} (only lora_A / lora_B are supported)")
        module = match["module"].removeprefix(PEFT_PREFIX)
        sides.setdefault(module, {})[match["side"]] = tensor
    missing = [m for m, pair in sides.items() if set(pair) != {"A", "B"}]
    if missing:
        raise QuiverError(f"incomplete LoRA pair (A without B or B without A) for {missing[:3]}")
    return {m: (pair["A"], pair["B"]) for m, pair in sorted(sides.items())}


def encode_weights(weights: dict[str, torch.Tensor]) -> bytes:
    """Safetensors bytes of a state dict (contiguous CPU copies)."""
    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in weights.items()})


def decode_weights(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; a corrupt file is a QuiverError, never a crash."""
    try:
        return load_safetensors(data)
    except Exception as err:  # safetensors raises its own error types for corruption
        raise QuiverError(f"corrupt safetensors file {where}: {err}") from err


def content_hash(adapter_config: dict, weights_bytes: bytes) -> str:
    """sha256 of the adapter config (canonical JSON) and the safetensors bytes."""
    digest = hashlib.sha256(json.dumps(adapter_config, sort_keys=True).encode())
    digest.update(weights_bytes)
    return digest.hexdigest()
