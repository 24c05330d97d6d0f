"""The files under one library URL (a local folder or any fsspec URL), written atomically.

A reader never sees half a write:

- one file: on a local disk it is written next to its place and renamed over it; on an
  object store a single put is atomic already;
- a folder (an expert): on a local disk it is written into `tmp/` and renamed into place in
  one step; object stores have no rename, so `quiver.json` is written last and is the commit
  point: a folder without it is not an expert (see `quiver.library.store`).

Names given by users become folder and file names here, so `check_name` lets through only
names that are one safe path component.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from quiver.errors import QuiverError
from quiver.library.expert import MANIFEST

# one path component: no '/', no leading '.', so never '..' or a hidden file
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Storage:
    """Paths, reads and atomic writes under one library URL.

    Args:
        url: a local folder or any fsspec URL (`s3://bucket/lib`, `memory://lib`, ...).
        storage_options: passed to fsspec (credentials, `client_kwargs`, ...).
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)  # local disks can rename atomically

    def path(self, *parts: str) -> str:
        """The full path of `parts` under the library's root."""
        return "/".join([self.root, *parts])

    def read(self, folder: str, file: str) -> bytes:
        """The bytes of `file` in an expert folder.

        Raises:
            QuiverError: the file is missing.
        """
        try:
            return self.fs.cat_file(f"{folder}/{file}")
        except FileNotFoundError as err:
            raise QuiverError(f"expert folder {folder} is missing {file}") from err

    def read_json(self, folder: str, file: str) -> dict:
        """`file` of an expert folder, parsed as JSON.

        Raises:
            QuiverError: the file is missing or is not JSON.
        """
        try:
            return json.loads(self.read(folder, file))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise QuiverError(f"corrupt {file} in {folder}: {err}") from err

    def atomic_write(self, path: str, data: bytes) -> None:
        """Write one file, replacing any file there, so that readers see the old or the new."""
        if self.local:
            staging = f"{path}.tmp-{uuid.uuid4().hex}"
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _write_synced(staging, data)
            os.replace(staging, path)
        else:
            self.fs.pipe_file(path, data)  # a single object put is atomic

    def commit_folder(self, final: str, files: dict[str, bytes]) -> None:
        """Write `files` into folder `final`, all or nothing; `quiver.json` is the last write.

        Raises:
            QuiverError: `final` already exists.
        """
        if self.local:
            staging = self.path("tmp", uuid.uuid4().hex)
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

    def remove_folder(self, folder: str) -> None:
        """Delete a committed folder so that it is never seen half deleted: on a local disk it
        is renamed out of the way first, on an object store its `quiver.json` goes first."""
        if self.local:
            trash = self.path("tmp", f"trash-{uuid.uuid4().hex}")
            self.fs.makedirs(self.path("tmp"), exist_ok=True)
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.fs.rm_file(f"{folder}/{MANIFEST}")
            self.fs.rm(folder, recursive=True)


def check_name(name: str, what: str = "expert") -> None:
    """Refuse a name that is not one safe path component (`what` says what it names).

    Raises:
        QuiverError: a bad name, in one line that says which names are good.
    """
    if not NAME.match(name or ""):
        raise QuiverError(
            f"bad {what} name {name!r}: use letters, digits, '.', '_' and '-' (at most 128)"
        )


def _write_synced(path: str, data: bytes) -> None:
    # every local write goes through here (tests replace it to simulate a full disk)
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the rename that publishes it
