"""The expert library: the experts for one base model, in a local folder or any fsspec URL.

Layout under the library's root:

    library.json                   the base model every expert belongs to (name, fingerprint,
                                   shapes of its linear layers); written by the first add
    experts/<name>/                one PEFT adapter folder per expert (see `expert.py`)
    experts/<name>/derived/        per-expert derived data, `<kind>-<key>.safetensors|.json`
    clusters/<name>.json           library-level records: named clusterings of the experts
    runs/<name>/                   resumable training state of an expert being trained
    tmp/                           staging area for atomic writes on local disks

`Library` here reads, adds, removes and renames experts. The rooms around it:

    storage.py    paths and atomic writes under the library's URL (an expert's `quiver.json`
                  is written last: a folder without it is not an expert and is never listed)
    peft_io.py    import and export of PEFT adapter folders
    records.py    derived data, clusterings and training-run state

Nothing is ever pickled: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import torch

from quiver.errors import QuiverError
from quiver.library import peft_io, records
from quiver.library.expert import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    Expert,
    ExpertInfo,
    content_hash,
    decode_weights,
    encode_weights,
)
from quiver.library.formats import check_adapter
from quiver.library.peft_io import write_peft_folder
from quiver.library.records import RunState
from quiver.library.storage import NAME, Storage, check_name

# the names callers import from here, some of them now defined in the rooms above
__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "MANIFEST", "Library", "RunState",
           "check_adapter", "check_name", "write_peft_folder"]

# expert kind -> the (PEFT) format it is stored in; MTL_LORA is quiver's own, PEFT lacks it
_PEFT_TYPES = {"lora": "LORA", "poly": "POLY", "mtl-lora": "MTL_LORA"}


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
        self.storage = Storage(url, storage_options)
        self.url, self.fs, self.root = self.storage.url, self.storage.fs, self.storage.root
        path = self.storage.path
        if not (self.fs.exists(path("library.json")) or self.fs.isdir(path("experts"))):
            if not create:
                raise QuiverError(
                    f"no library at {self.url} (train or import an expert to make one)"
                )
            self.fs.makedirs(path("experts"), exist_ok=True)

    # ----------------------------------------------------------------- reading
    def names(self) -> list[str]:
        """Names of every expert, sorted. Reads one listing, no weights or metadata."""
        manifests = self.fs.glob(self.storage.path("experts", "*", MANIFEST))
        return sorted(p.rstrip("/").split("/")[-2] for p in manifests)

    def __contains__(self, name: str) -> bool:
        return self.fs.exists(self.storage.path("experts", name, MANIFEST))

    def __len__(self) -> int:
        return len(self.names())

    def get(self, name: str) -> Expert:
        """An expert by name; its weights are read (and their hash checked) on first use.

        Raises:
            QuiverError: no such expert, or its metadata is corrupt.
        """
        folder = self._expert_folder(name)
        info = ExpertInfo.from_json(self.storage.read(folder, MANIFEST),
                                    f"{self.url}/experts/{name}")
        adapter_config = self.storage.read_json(folder, ADAPTER_CONFIG)

        def load_weights() -> dict[str, torch.Tensor]:
            data = self.storage.read(folder, ADAPTER_WEIGHTS)
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
        path = self.storage.path("library.json")
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
            self.storage.atomic_write(self.storage.path("library.json"),
                                      json.dumps(record, indent=1).encode())
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
        self.storage.commit_folder(self.storage.path("experts", expert.name), files)
        return Expert(info, expert.adapter_config, weights=expert.weights)

    def remove(self, name: str) -> None:
        """Delete an expert (its manifest first, so a failure never leaves half an expert).

        Raises:
            QuiverError: no such expert.
        """
        self.storage.remove_folder(self._expert_folder(name))

    def rename(self, old: str, new: str) -> None:
        """Give an expert a new name (its metadata says the new name too).

        Raises:
            QuiverError: no expert `old`, a bad new name, or an expert `new` already exists.
        """
        check_name(new)
        folder = self._expert_folder(old)
        if new in self:
            raise QuiverError(f"an expert named {new!r} already exists in {self.url}")
        info = ExpertInfo.from_json(self.storage.read(folder, MANIFEST),
                                    f"{self.url}/experts/{old}")
        info.name = new
        files = {p[len(folder) + 1 :]: self.fs.cat_file(p) for p in self.fs.find(folder)}
        files[MANIFEST] = info.to_json()
        self.storage.commit_folder(self.storage.path("experts", new), files)
        self.remove(old)

    def _expert_folder(self, name: str) -> str:
        if not NAME.match(name or "") or name not in self:
            raise QuiverError(f"no expert named {name!r} in {self.url}")
        return self.storage.path("experts", name)

    # ------------------------------------------------- PEFT folders (peft_io.py)
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
        return peft_io.import_peft(self, path, name, tasks, base_model)

    def export_peft(self, name: str, path: str) -> None:
        """Write an expert as a PEFT folder that `PeftModel.from_pretrained` loads.

        Raises:
            QuiverError: no such expert, a kind PEFT cannot load (MTL-LoRA: export one of its
                tasks as a LoRA), or `path` exists and is not empty.
        """
        peft_io.export_peft(self, name, path)

    # ----------------------------------------------------- records (records.py)
    def put_derived(
        self, name: str, kind: str, config: dict, tensors: dict[str, torch.Tensor], meta: dict
    ) -> None:
        """Store data derived from one expert (prototypes, gates, ...) keyed by a config."""
        records.put_derived(self, name, kind, config, tensors, meta)

    def get_derived(
        self, name: str, kind: str, config: dict
    ) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Derived data stored with the same kind and config, or None."""
        return records.get_derived(self, name, kind, config)

    def derived(self, name: str, kind: str, config: dict,
                compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Derived tensors of an expert: read if stored with this config, else computed by
        `compute()`, stored, and returned (so each expert's are computed once)."""
        return records.derived(self, name, kind, config, compute)

    def put_clusters(self, name: str, clusters: dict[str, list[str]], meta: dict) -> None:
        """Store a named clustering (`{cluster: [member, ...]}` plus JSON-able `meta`, e.g.
        how it was computed), atomically; a clustering of the same name is replaced.

        Raises:
            QuiverError: a bad name, or `clusters` that is not a dict of name lists.
        """
        records.put_clusters(self, name, clusters, meta)

    def get_clusters(self, name: str) -> tuple[dict[str, list[str]], dict] | None:
        """A stored clustering as `(clusters, meta)`, or None if there is none of that name.

        Raises:
            QuiverError: a bad name, or a corrupt record.
        """
        return records.get_clusters(self, name)

    def cluster_names(self) -> list[str]:
        """Names of the stored clusterings, sorted."""
        return records.cluster_names(self)

    def run_state(self, name: str) -> RunState:
        """Where a training run of expert `name` keeps its resumable state."""
        return records.run_state(self, name)
