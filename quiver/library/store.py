"""The expert library: experts stored through fsspec, in a local folder or any fsspec URL.

Layout under the library's root:

    library.json                   the base model every expert belongs to (name, fingerprint,
                                   shapes of its linear layers); written by the first add
    experts/<name>/                one PEFT adapter folder per expert (see `expert.py`)
    experts/<name>/derived/        per-expert derived data, `<kind>-<key>.safetensors|.json`
    clusters/<name>.json           library-level records: named clusterings of the experts
    runs/<name>/                   resumable training state of an expert being trained
    tmp/                           staging area for atomic writes on local disks

Writes are atomic. On a local disk an expert is written into `tmp/` and renamed into place
in one step. On object stores, which have no rename, `quiver.json` is written last and is
the commit point: a folder without it is not an expert and is never listed. Nothing is ever
pickled: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from quiver.config import stable_hash
from quiver.errors import QuiverError
from quiver.library.expert import Expert, ExpertInfo, content_hash, decode_weights, encode_weights
from quiver.library.formats import check_adapter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "quiver.json"
# expert kind -> the (PEFT) format it is stored in; MTL_LORA is quiver's own, PEFT lacks it
_PEFT_TYPES = {"lora": "LORA", "poly": "POLY", "mtl-lora": "MTL_LORA"}
_PEFT_LOADS = ("lora", "poly")  # the kinds whose folders PeftModel.from_pretrained loads
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Library:
    """A collection of LoRA experts for one base model.

    Args:
        url: a local folder or any fsspec URL (`s3://bucket/lib`, `memory://lib`, ...).
        create: create an empty library if none exists at `url` (otherwise that is an error).
        storage_options: passed to fsspec (credentials, `client_kwargs`, ...).

    Raises:
        QuiverError: `create` is false and there is no library at `url`.
    """

    def __init__(self, url: str, create: bool = False, storage_options: dict | None = None):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        exists = self.fs.exists(self._path("library.json")) or self.fs.isdir(self._path("experts"))
        if not exists:
            if not create:
                raise QuiverError(
                    f"no library at {self.url} (train or import an expert to make one)"
                )
            self.fs.makedirs(self._path("experts"), exist_ok=True)

    # ----------------------------------------------------------------- reading
    def names(self) -> list[str]:
        """Names of every expert, sorted. Reads one listing, no weights or metadata."""
        manifests = self.fs.glob(self._path("experts", "*", MANIFEST))
        return sorted(p.rstrip("/").split("/")[-2] for p in manifests)

    def __contains__(self, name: str) -> bool:
        return self.fs.exists(self._path("experts", name, MANIFEST))

    def __len__(self) -> int:
        return len(self.names())

    def get(self, name: str) -> Expert:
        """An expert by name; its weights are read (and their hash checked) on first use.

        Raises:
            QuiverError: no such expert, or its metadata is corrupt.
        """
        folder = self._expert_folder(name)
        info = ExpertInfo.from_json(self._read(folder, MANIFEST), f"{self.url}/experts/{name}")
        adapter_config = self._read_json(folder, ADAPTER_CONFIG)

        def load_weights() -> dict[str, torch.Tensor]:
            data = self._read(folder, ADAPTER_WEIGHTS)
            if content_hash(adapter_config, data) != info.content_hash:
                raise QuiverError(
                    f"expert {name!r} is corrupt: its files do not match the content hash "
                    f"recorded when it was written"
                )
            return decode_weights(data, f"{self.url}/experts/{name}/{ADAPTER_WEIGHTS}")

        return Expert(info, adapter_config, load_weights=load_weights)

    def experts(self, names: list[str] | None = None) -> list[Expert]:
        """Several experts (all of them by default), weights still lazy."""
        return [self.get(n) for n in (self.names() if names is None else names)]

    @property
    def base(self) -> dict | None:
        """The base model this library is for: `{name, fingerprint, modules}`, or None if empty."""
        path = self._path("library.json")
        if not self.fs.exists(path):
            return None
        try:
            return json.loads(self.fs.cat_file(path))
        except json.JSONDecodeError as err:
            raise QuiverError(f"corrupt library metadata {self.url}/library.json: {err}") from err

    # ----------------------------------------------------------------- writing
    def ensure_base(self, model_name: str, fingerprint: str, modules: dict[str, list[int]]) -> None:
        """Pin the library to a base model, or check that it is the one already pinned.

        Raises:
            QuiverError: the library holds experts for a different base model.
        """
        base = self.base
        if base is None:
            record = {"name": model_name, "fingerprint": fingerprint, "modules": modules}
            self._atomic_write(self._path("library.json"), json.dumps(record, indent=1).encode())
        elif base["fingerprint"] != fingerprint:
            raise QuiverError(
                f"library {self.url} holds experts for base model {base['name']!r} "
                f"(fingerprint {base['fingerprint']}), not {model_name!r} ({fingerprint})"
            )

    def add(self, expert: Expert, overwrite: bool = False) -> Expert:
        """Write an expert, atomically. Returns it as stored (with its content hash).

        Raises:
            QuiverError: bad name, existing name (unless `overwrite`), an adapter that does
                not fit the library's base model, or an expert for another base model.
        """
        check_name(expert.name)
        base = self.base
        if base is None:
            raise QuiverError("the library has no base model yet: call ensure_base first")
        if expert.info.base_fingerprint not in (None, base["fingerprint"]):
            raise QuiverError(
                f"expert {expert.name!r} was trained on base model {expert.info.base_model!r} "
                f"({expert.info.base_fingerprint}); library {self.url} is for {base['name']!r} "
                f"({base['fingerprint']})"
            )
        peft_type = _PEFT_TYPES.get(expert.info.kind)
        if peft_type is None or expert.adapter_config.get("peft_type") != peft_type:
            raise QuiverError(f"expert {expert.name!r} of kind {expert.info.kind!r} has a "
                              f"{expert.adapter_config.get('peft_type')} adapter config")
        check_adapter(expert.adapter_config, expert.weights, base["modules"])
        weights_bytes = encode_weights(expert.weights)
        info = ExpertInfo(**{**expert.info.__dict__})
        info.content_hash = content_hash(expert.adapter_config, weights_bytes)
        info.created = info.created or datetime.now(UTC).isoformat(timespec="seconds")
        files = {
            ADAPTER_CONFIG: json.dumps(expert.adapter_config, indent=2).encode(),
            ADAPTER_WEIGHTS: weights_bytes,
            MANIFEST: info.to_json(),
        }
        if overwrite and expert.name in self:
            self.remove(expert.name)
        self._commit_folder(self._path("experts", expert.name), files)
        return Expert(info, expert.adapter_config, weights=expert.weights)

    def remove(self, name: str) -> None:
        """Delete an expert (its manifest first, so a failure never leaves half an expert).

        Raises:
            QuiverError: no such expert.
        """
        folder = self._expert_folder(name)
        if self._local:
            trash = self._path("tmp", f"trash-{uuid.uuid4().hex}")
            self.fs.makedirs(self._path("tmp"), exist_ok=True)
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.fs.rm_file(f"{folder}/{MANIFEST}")
            self.fs.rm(folder, recursive=True)

    def rename(self, old: str, new: str) -> None:
        """Give an expert a new name (its metadata says the new name too).

        Raises:
            QuiverError: no expert `old`, a bad new name, or an expert `new` already exists.
        """
        check_name(new)
        folder = self._expert_folder(old)
        if new in self:
            raise QuiverError(f"an expert named {new!r} already exists in {self.url}")
        info = ExpertInfo.from_json(self._read(folder, MANIFEST), f"{self.url}/experts/{old}")
        info.name = new
        files = {p[len(folder) + 1 :]: self.fs.cat_file(p) for p in self.fs.find(folder)}
        files[MANIFEST] = info.to_json()
        self._commit_folder(self._path("experts", new), files)
        self.remove(old)

    # ------------------------------------------------------------- PEFT folders
    def import_peft(
        self, path: str, name: str, tasks: list[str] | None = None, base_model: str | None = None
    ) -> Expert:
        """Add a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

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
        if self.base is None:
            self._pin_from_model(base_model or adapter_config.get("base_model_name_or_path"))
        lora = {k: adapter_config.get(k) for k in ("r", "lora_alpha", "lora_dropout")}
        lora["target_modules"] = adapter_config.get("target_modules")
        info = ExpertInfo(
            name=name,
            tasks=list(tasks or []),
            base_model=self.base["name"],
            base_fingerprint=None,  # a PEFT folder carries none; shapes are checked instead
            lora=lora,
            source=f"peft:{adapter_config.get('base_model_name_or_path')}",
        )
        return self.add(Expert(info, adapter_config, weights=weights))

    def export_peft(self, name: str, path: str) -> None:
        """Write an expert as a PEFT folder that `PeftModel.from_pretrained` loads.

        Raises:
            QuiverError: no such expert, a kind PEFT cannot load (MTL-LoRA: export one of its
                tasks as a LoRA), or `path` exists and is not empty.
        """
        expert = self.get(name)
        if expert.info.kind not in _PEFT_LOADS:
            raise QuiverError(f"expert {name!r} is a {expert.info.kind} adapter, which PEFT "
                              "cannot load: export one of its tasks as a LoRA (--task TASK)")
        write_peft_folder(expert, path)

    def _pin_from_model(self, base_model: str | None) -> None:
        from quiver.models import fingerprint, linear_module_shapes, load_base

        if not base_model:
            raise QuiverError("the library is empty and the adapter names no base model: pass one")
        model, _ = load_base(base_model, device="cpu")
        self.ensure_base(base_model, fingerprint(model), linear_module_shapes(model))

    # ------------------------------------------------------------ derived data
    def put_derived(
        self, name: str, kind: str, config: dict, tensors: dict[str, torch.Tensor], meta: dict
    ) -> None:
        """Store data derived from one expert (prototypes, gates, ...) keyed by a config."""
        stem = self._derived_stem(name, kind, config)
        self._atomic_write(stem + ".safetensors", encode_weights(tensors))
        record = {"kind": kind, "config": config, "meta": meta}
        self._atomic_write(stem + ".json", json.dumps(record, indent=1).encode())  # commit point

    def get_derived(
        self, name: str, kind: str, config: dict
    ) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Derived data stored with the same kind and config, or None."""
        stem = self._derived_stem(name, kind, config)
        if not self.fs.exists(stem + ".json"):
            return None
        record = json.loads(self.fs.cat_file(stem + ".json"))
        tensors = decode_weights(self.fs.cat_file(stem + ".safetensors"), stem + ".safetensors")
        return tensors, record["meta"]

    def derived(self, name: str, kind: str, config: dict,
                compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Derived tensors of an expert: read if stored with this config, else computed by
        `compute()`, stored, and returned (so each expert's are computed once)."""
        stored = self.get_derived(name, kind, config)
        if stored is not None:
            return stored[0]
        tensors = compute()
        self.put_derived(name, kind, config, tensors, meta={})
        return tensors

    # ------------------------------------------------------------- clusterings
    def put_clusters(self, name: str, clusters: dict[str, list[str]], meta: dict) -> None:
        """Store a named clustering (`{cluster: [member, ...]}` plus JSON-able `meta`, e.g.
        how it was computed), atomically; a clustering of the same name is replaced.

        Raises:
            QuiverError: a bad name, or `clusters` that is not a dict of name lists.
        """
        check_name(name, "clustering")
        if not isinstance(clusters, dict) or not all(
            isinstance(c, str) and c and isinstance(m, list | tuple)
            and all(isinstance(x, str) for x in m)
            for c, m in clusters.items()
        ):
            raise QuiverError("clusters must map cluster names to lists of expert names")
        record = {
            "name": name,
            "clusters": {c: list(m) for c, m in clusters.items()},
            "meta": meta,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._atomic_write(self._path("clusters", f"{name}.json"),
                           json.dumps(record, indent=1).encode())

    def get_clusters(self, name: str) -> tuple[dict[str, list[str]], dict] | None:
        """A stored clustering as `(clusters, meta)`, or None if there is none of that name.

        Raises:
            QuiverError: a bad name, or a corrupt record.
        """
        check_name(name, "clustering")
        path = self._path("clusters", f"{name}.json")
        if not self.fs.exists(path):
            return None
        try:
            record = json.loads(self.fs.cat_file(path))
            return record["clusters"], record["meta"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise QuiverError(f"corrupt clustering record {self.url}/clusters/{name}.json: "
                              f"{err}") from err

    def cluster_names(self) -> list[str]:
        """Names of the stored clusterings, sorted."""
        paths = self.fs.glob(self._path("clusters", "*.json"))
        return sorted(p.rstrip("/").split("/")[-1].removesuffix(".json") for p in paths)

    # ------------------------------------------------------------- run state
    def run_state(self, name: str) -> RunState:
        """Where a training run of expert `name` keeps its resumable state."""
        check_name(name)
        return RunState(self, self._path("runs", name))

    # ---------------------------------------------------------------- helpers
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _expert_folder(self, name: str) -> str:
        if not _NAME.match(name or "") or name not in self:
            raise QuiverError(f"no expert named {name!r} in {self.url}")
        return self._path("experts", name)

    def _derived_stem(self, name: str, kind: str, config: dict) -> str:
        info = self.get(name).info
        key = stable_hash({"config": config, "expert": info.content_hash})
        return self._path("experts", name, "derived", f"{kind}-{key}")

    def _read(self, folder: str, file: str) -> bytes:
        try:
            return self.fs.cat_file(f"{folder}/{file}")
        except FileNotFoundError as err:
            raise QuiverError(f"expert folder {folder} is missing {file}") from err

    def _read_json(self, folder: str, file: str) -> dict:
        try:
            return json.loads(self._read(folder, file))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise QuiverError(f"corrupt {file} in {folder}: {err}") from err

    def _atomic_write(self, path: str, data: bytes) -> None:
        if self._local:
            staging = f"{path}.tmp-{uuid.uuid4().hex}"
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _write_synced(staging, data)
            os.replace(staging, path)
        else:
            self.fs.pipe_file(path, data)  # a single object put is atomic

    def _commit_folder(self, final: str, files: dict[str, bytes]) -> None:
        """Write `files` into folder `final`, all or nothing; `quiver.json` is the last write."""
        if self._local:
            staging = self._path("tmp", uuid.uuid4().hex)
            try:
                for file, data in files.items():
                    Path(staging, file).parent.mkdir(parents=True, exist_ok=True)
                    _write_synced(f"{staging}/{file}", data)
                Path(final).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(staging, final)  # atomic; refuses a non-empty target
                except OSError as err:
                    raise QuiverError(f"{final} already exists") from err
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return
        if self.fs.exists(f"{final}/{MANIFEST}"):
            raise QuiverError(f"{final} already exists")
        for file, data in files.items():
            if file != MANIFEST:
                self.fs.pipe_file(f"{final}/{file}", data)
        self.fs.pipe_file(f"{final}/{MANIFEST}", files[MANIFEST])


class RunState:
    """The resumable state of one training run: a safetensors file and a JSON file."""

    def __init__(self, library: Library, folder: str) -> None:
        self._library = library
        self._folder = folder

    def read(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        fs = self._library.fs
        if not fs.exists(f"{self._folder}/state.json"):
            return None
        meta = json.loads(fs.cat_file(f"{self._folder}/state.json"))
        if meta.get("tensors_id"):
            where = f"{self._folder}/state-{meta['tensors_id']}.safetensors"
            tensors = decode_weights(fs.cat_file(where), where)
        else:
            tensors = {}
        return tensors, meta

    def write(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write a new state; the JSON names its tensor file and is written last."""
        fs = self._library.fs
        tensors_id = uuid.uuid4().hex[:12]
        self._library._atomic_write(
            f"{self._folder}/state-{tensors_id}.safetensors", encode_weights(tensors)
        )
        self._library._atomic_write(
            f"{self._folder}/state.json", json.dumps({**meta, "tensors_id": tensors_id}).encode()
        )
        for old in fs.glob(f"{self._folder}/state-*.safetensors"):
            if tensors_id not in old:
                fs.rm_file(old)

    def clear(self) -> None:
        fs = self._library.fs
        if fs.exists(self._folder):
            fs.rm(self._folder, recursive=True)


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
        _write_synced(str(staging / ADAPTER_CONFIG), json.dumps(expert.adapter_config).encode())
        _write_synced(str(staging / ADAPTER_WEIGHTS), weights)
        _write_synced(str(staging / MANIFEST), expert.info.to_json())
        if target.exists():
            target.rmdir()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_name(name: str, what: str = "expert") -> None:
    if not _NAME.match(name or ""):
        raise QuiverError(
            f"bad {what} name {name!r}: use letters, digits, '.', '_' and '-' (at most 128)"
        )


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
