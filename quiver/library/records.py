"""Records a library keeps beside its experts: data derived from an expert, named clusterings
of the experts, and the resumable state of a training run.

Where each lives under the library's root (see `quiver.library.store` for the whole layout):

    experts/<name>/derived/<kind>-<key>.safetensors|.json   derived data; the JSON is written
                                                            last, so it is the commit point
    clusters/<name>.json                                    one clustering
    runs/<name>/state.json, state-<id>.safetensors          one training run's state

`Library` has a method for each function here; call those.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import torch

from quiver.config import stable_hash
from quiver.errors import QuiverError
from quiver.library.expert import decode_weights, encode_weights
from quiver.library.storage import Storage, check_name

if TYPE_CHECKING:
    from quiver.library.store import Library


# ------------------------------------------------------------------------------ derived data
def put_derived(library: Library, name: str, kind: str, config: dict,
                tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Store data derived from one expert (prototypes, gates, ...) keyed by a config."""
    stem = _derived_stem(library, name, kind, config)
    library.storage.atomic_write(stem + ".safetensors", encode_weights(tensors))
    record = {"kind": kind, "config": config, "meta": meta}
    library.storage.atomic_write(stem + ".json",  # the commit point
                                 json.dumps(record, indent=1).encode())


def get_derived(library: Library, name: str, kind: str, config: dict
                ) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Derived data stored with the same kind and config, or None."""
    stem = _derived_stem(library, name, kind, config)
    if not library.fs.exists(stem + ".json"):
        return None
    record = json.loads(library.fs.cat_file(stem + ".json"))
    tensors = decode_weights(library.fs.cat_file(stem + ".safetensors"), stem + ".safetensors")
    return tensors, record["meta"]


def derived(library: Library, name: str, kind: str, config: dict,
            compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Derived tensors of an expert: read if stored with this config, else computed by
    `compute()`, stored, and returned (so each expert's are computed once)."""
    stored = get_derived(library, name, kind, config)
    if stored is not None:
        return stored[0]
    tensors = compute()
    put_derived(library, name, kind, config, tensors, meta={})
    return tensors


def _derived_stem(library: Library, name: str, kind: str, config: dict) -> str:
    # keyed by the expert's content too: data derived from a replaced expert is never reused
    info = library.get(name).info
    key = stable_hash({"config": config, "expert": info.content_hash})
    return library.storage.path("experts", name, "derived", f"{kind}-{key}")


# ------------------------------------------------------------------------------- clusterings
def put_clusters(library: Library, name: str, clusters: dict[str, list[str]], meta: dict
                 ) -> None:
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
    library.storage.atomic_write(library.storage.path("clusters", f"{name}.json"),
                                 json.dumps(record, indent=1).encode())


def get_clusters(library: Library, name: str) -> tuple[dict[str, list[str]], dict] | None:
    """A stored clustering as `(clusters, meta)`, or None if there is none of that name.

    Raises:
        QuiverError: a bad name, or a corrupt record.
    """
    check_name(name, "clustering")
    path = library.storage.path("clusters", f"{name}.json")
    if not library.fs.exists(path):
        return None
    try:
        record = json.loads(library.fs.cat_file(path))
        return record["clusters"], record["meta"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise QuiverError(f"corrupt clustering record {library.url}/clusters/{name}.json: "
                          f"{err}") from err


def cluster_names(library: Library) -> list[str]:
    """Names of the stored clusterings, sorted."""
    paths = library.fs.glob(library.storage.path("clusters", "*.json"))
    return sorted(p.rstrip("/").split("/")[-1].removesuffix(".json") for p in paths)


# --------------------------------------------------------------------------------- run state
def run_state(library: Library, name: str) -> RunState:
    """Where a training run of expert `name` keeps its resumable state."""
    check_name(name)
    return RunState(library.storage, library.storage.path("runs", name))


class RunState:
    """The resumable state of one training run: a safetensors file and a JSON file."""

    def __init__(self, storage: Storage, folder: str) -> None:
        self._storage = storage
        self._folder = folder

    def read(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The last state written, as `(tensors, meta)`, or None if there is none."""
        fs = self._storage.fs
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
        tensors_id = uuid.uuid4().hex[:12]
        self._storage.atomic_write(
            f"{self._folder}/state-{tensors_id}.safetensors", encode_weights(tensors)
        )
        self._storage.atomic_write(
            f"{self._folder}/state.json", json.dumps({**meta, "tensors_id": tensors_id}).encode()
        )
        for old in self._storage.fs.glob(f"{self._folder}/state-*.safetensors"):
            if tensors_id not in old:
                self._storage.fs.rm_file(old)

    def clear(self) -> None:
        """Delete the state (the run is over and its expert stored)."""
        fs = self._storage.fs
        if fs.exists(self._folder):
            fs.rm(self._folder, recursive=True)
