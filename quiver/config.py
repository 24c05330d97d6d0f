"""Helpers that make config dataclasses round-trip through JSON."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, TypeVar

from quiver.errors import QuiverError

C = TypeVar("C")


def to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[C], data: dict) -> C:
    """Rebuild a config dataclass from `to_dict`'s output; unknown keys are an error.

    Raises:
        QuiverError: a key the dataclass does not have, or a value its validation refuses.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise QuiverError(f"{cls.__name__} has no field(s) {unknown}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise QuiverError(f"invalid {cls.__name__}: {err}") from err


def help_of(cls: type, name: str) -> str:
    """The help text of a dataclass field (its `metadata["help"]`)."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("help", "")


def stable_hash(value: Any) -> str:
    """A short hash of a JSON-able value, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
