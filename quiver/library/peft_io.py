"""Experts in and out of PEFT adapter folders: import a LoRA folder that PEFT saved into a
library, and write an expert as a folder that `PeftModel.from_pretrained` loads.

A PEFT folder is `adapter_config.json` plus `adapter_model.safetensors`; quiver adds its
`quiver.json` on export. A pickled `adapter_model.bin` is refused, never read.

`Library.import_peft` and `Library.export_peft` call the functions here.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec

from quiver.errors import QuiverError
from quiver.library import storage
from quiver.library.expert import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    Expert,
    ExpertInfo,
    decode_weights,
    encode_weights,
)

if TYPE_CHECKING:
    from quiver.library.store import Library

PEFT_LOADS = ("lora", "poly")  # the kinds whose folders PeftModel.from_pretrained loads


def import_peft(library: Library, path: str, name: str, tasks: list[str] | None = None,
                base_model: str | None = None) -> Expert:
    """Add the PEFT LoRA folder at `path` (any fsspec URL) to `library` as expert `name`.

    If the library is still empty it is pinned to `base_model`, or else to the adapter's
    own `base_model_name_or_path`, which is loaded to read its shapes and fingerprint.

    Raises:
        QuiverError: missing or pickled weights, corrupt files, not a plain LoRA, or an
            adapter whose shapes do not fit the library's base model.
    """
    fs, folder = fsspec.core.url_to_fs(str(path))
    if not fs.exists(f"{folder}/{ADAPTER_CONFIG}"):
        raise QuiverError(f"{path} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    if not fs.exists(f"{folder}/{ADAPTER_WEIGHTS}"):
        pickled = fs.exists(f"{folder}/adapter_model.bin")
        raise QuiverError(
            f"{path} has no {ADAPTER_WEIGHTS}"
            + (" (adapter_model.bin is a pickle; quiver never unpickles)" if pickled else "")
        )
    try:
        adapter_config = json.loads(fs.cat_file(f"{folder}/{ADAPTER_CONFIG}"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QuiverError(f"corrupt {ADAPTER_CONFIG} in {path}: {err}") from err
    if adapter_config.get("peft_type") != "LORA":  # a Poly one lacks its rows' tasks
        raise QuiverError(f"{path} is a {adapter_config.get('peft_type')} adapter: only "
                          "LoRA adapters can be imported")
    weights = decode_weights(fs.cat_file(f"{folder}/{ADAPTER_WEIGHTS}"), str(path))
    if library.base is None:
        _pin_from_model(library, base_model or adapter_config.get("base_model_name_or_path"))
    lora = {k: adapter_config.get(k) for k in ("r", "lora_alpha", "lora_dropout")}
    lora["target_modules"] = adapter_config.get("target_modules")
    info = ExpertInfo(
        name=name,
        tasks=list(tasks or []),
        base_model=library.base["name"],
        base_fingerprint=None,  # a PEFT folder carries none; shapes are checked instead
        lora=lora,
        source=f"peft:{adapter_config.get('base_model_name_or_path')}",
    )
    return library.add(Expert(info, adapter_config, weights=weights))


def export_peft(library: Library, name: str, path: str) -> None:
    """Write expert `name` of `library` as a PEFT folder at local `path`.

    Raises:
        QuiverError: no such expert, a kind PEFT cannot load (MTL-LoRA: export one of its
            tasks as a LoRA), or `path` exists and is not empty.
    """
    expert = library.get(name)
    if expert.info.kind not in PEFT_LOADS:
        raise QuiverError(f"expert {name!r} is a {expert.info.kind} adapter, which PEFT "
                          "cannot load: export one of its tasks as a LoRA (--task TASK)")
    write_peft_folder(expert, path)


def write_peft_folder(expert: Expert, path: str) -> None:
    """Write `expert` (stored or not) as an adapter folder at local `path`, all or nothing:
    adapter_config.json, adapter_model.safetensors and quiver's metadata.

    Raises:
        QuiverError: `path` exists and is not empty, or the expert's weights are corrupt.
    """
    weights = encode_weights(expert.weights)  # a stored expert's: also checks the content hash
    target = Path(path)
    if target.exists() and any(target.iterdir()):
        raise QuiverError(f"{path} exists and is not empty")
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        # storage's one durable local write, which tests replace to simulate a full disk
        storage._write_synced(str(staging / ADAPTER_CONFIG),
                              json.dumps(expert.adapter_config).encode())
        storage._write_synced(str(staging / ADAPTER_WEIGHTS), weights)
        storage._write_synced(str(staging / MANIFEST), expert.info.to_json())
        if target.exists():
            target.rmdir()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pin_from_model(library: Library, base_model: str | None) -> None:
    # imported here: quiver.models brings in transformers, which only this needs
    from quiver.models import fingerprint, linear_module_shapes, load_base

    if not base_model:
        raise QuiverError("the library is empty and the adapter names no base model: pass one")
    model, _ = load_base(base_model, device="cpu")
    library.ensure_base(base_model, fingerprint(model), linear_module_shapes(model))
