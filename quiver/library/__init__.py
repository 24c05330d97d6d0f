"""The expert library: experts in PEFT format with metadata, stored through fsspec."""

from quiver.library.expert import Expert, ExpertInfo, lora_factors
from quiver.library.store import Library, RunState

__all__ = ["Expert", "ExpertInfo", "Library", "RunState", "lora_factors"]
