"""The commit protocol: one way to write a unit of output exactly once.

A unit (an image shard, a latent shard, a checkpoint, an export) is one or more payload files and a completion
record (a small JSON object). Writing it:
  1. stage: each payload is written into a local staging file (`Unit.staging`), or put whole (`Unit.put`);
  2. commit: each staged payload is moved (uploaded) whole under its final name, then the record is created.
A unit counts as done only when its record exists (and its payloads do): a run killed before the record leaves a
unit that is not done, whose payloads a rerun overwrites; a run killed after it leaves a done unit, which a rerun
skips. So running the same command again after a kill at any moment finishes the job with every unit exactly once.

The record is created create-only: when two runs race on one unit (a whole-job run beside a `--part` run), the
second finds it done and its commit returns False. Replacing a done unit (a checkpoint saved again at the same
step, `--overwrite`) first undoes it: the record goes first, so the unit stops counting as done before any payload
is removed.

What was written can be recorded: after put_staged(), `files()` gives the size and SHA-256 of every staged payload
(every backend's put_file returns them: the object store hashes the bytes it sends, as a multipart ETag is no content
hash; locally the staging file is hashed before its rename), which the writers put into their records (`files`).

Under a folder whose lock this process holds, every payload, record and undo is written only after the lock proved,
on the store, that it is still held (pipeline.storage.base.check_writable, called by every backend before a final
name appears or goes): a process that lost its lock writes nothing more and raises LockLost (exit 75).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.storage.base import storage_for
from pipeline.storage.local import json_bytes, stream_digest


class Unit:
    """`record`: the completion record's path; `payloads`: the paths of the unit's files (all on one backend)."""

    def __init__(self, record: str | Path, payloads=()):
        self.record = str(record)
        self.payloads = [str(p) for p in payloads]
        self.store = storage_for(self.record)
        self._staged: dict[str, Path] = {}
        self.written: dict[str, dict] = {}  # payload -> {size, sha256} of what put_staged wrote

    def done(self) -> bool:
        return self.recorded() and all(self.store.exists(p) for p in self.payloads)

    def recorded(self) -> bool:
        """Whether the record exists: one request on object storage (a HEAD; the record is an object, never a
        folder, so no listing follows a 404)."""
        return self.store.object_exists(self.record)

    def read_record(self, listed: bool = False) -> dict | None:
        """The record of a done unit, or None (not done, or a record that is not JSON: not done either). `listed`:
        the caller saw the record and the payloads in a listing, so they are not asked about again."""
        if not listed and not self.done():
            return None
        try:
            record = json.loads(self.store.read_bytes(self.record))
        except (FileNotFoundError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _info(self, payload: str) -> tuple[int, str] | None:
        try:
            info = self.store.info(payload)
        except FileNotFoundError:
            return None
        return info["size"], info["etag"]

    def staging(self, payload: str | Path) -> Path:
        """A local path (not yet created) to write `payload` into, a file or a folder; commit() moves it under its
        final name."""
        payload = str(payload)
        if payload not in self.payloads:
            self.payloads.append(payload)
        self._staged[payload] = self.store.staging_file(payload)
        return self._staged[payload]

    def put(self, payload: str | Path, data: bytes) -> None:
        """Write one payload whole, now (its record still decides whether the unit is done)."""
        payload = str(payload)
        if payload not in self.payloads:
            self.payloads.append(payload)
        self.store.write_bytes(payload, data)

    def put_staged(self) -> None:
        """Move every staged payload under its final name (each whole); the unit is not done before commit()."""
        for payload, local in list(self._staged.items()):
            written = self.store.put_file(payload, local)
            if isinstance(written.get("sha256"), str):  # a file's digest (a folder's is one per file name)
                self.written[payload] = {k: written[k] for k in ("size", "sha256", "etag") if written.get(k)}
            del self._staged[payload]

    def commit(self, record: dict | bytes) -> bool:
        """Move every staged payload under its final name, then create the record (a dict as JSON, or bytes as they
        are). False when the record already existed (another run committed this unit first; its payloads are the
        ones that count)."""
        self.put_staged()
        return self.store.create(self.record, record if isinstance(record, bytes) else json_bytes(record))

    def files(self, etag: bool = False) -> dict[str, dict]:
        """{file name: {size, sha256}} of the payloads put so far, for the record (call put_staged() first); `etag`:
        with the object store's ETag of each (what `intact` compares with a listing, without reading the object)."""
        return {name: {k: v for k, v in d.items() if etag or k != "etag"} for name, d in files_of(self.written).items()}

    def intact(self, record: dict, listed: dict | None = None) -> bool:
        """Whether every payload is still the file its record describes (`files`): a payload that another run
        replaced after the record was created is not. Compared by the ETag where the record has one (object
        storage: from `listed`, {URL: (size, ETag)} of a listing, else a HEAD; a local file: its inode and mtime, one
        stat); another ETag (a new write, or the same bytes copied: a copied or moved folder, a server-side copy) and a
        record without one are settled by the size and SHA-256 of the bytes (one read). A record without `files` (an older
        run's) is taken as it is."""
        files = record.get("files")
        for payload in self.payloads if isinstance(files, dict) else []:
            want = files.get(payload.rstrip("/").rsplit("/", 1)[-1])
            if not isinstance(want, dict) or "sha256" not in want:
                continue  # a folder payload (an export: a digest per file) or one the record does not name
            if want.get("etag"):
                found = (listed or {}).get(payload) or self._info(payload)
                if found is not None and found[1] == want["etag"]:
                    continue
                if found is None:
                    return False  # else another ETag: a new write, or the same bytes copied (settled by reading)
            if object_digest(self.store, payload) != {"size": want.get("size"), "sha256": want["sha256"]}:
                return False
        return True

    def discard(self) -> None:
        """Drop the staging files of an unfinished unit (a failed or interrupted write)."""
        for local in self._staged.values():
            shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
        self._staged.clear()

    def undo(self) -> None:
        """Un-commit: delete the record first (the unit stops counting as done), then the payloads."""
        self.store.delete(self.record)
        for p in self.payloads:
            self.store.delete(p)


def object_digest(store, path: str) -> dict | None:
    """{size, sha256} of the object `path` read once (None when it is gone)."""
    try:
        with store.open_read(path) as f:
            return stream_digest(f)
    except FileNotFoundError:
        return None


def files_of(written: dict[str, dict]) -> dict[str, dict]:
    """{file name: {size, sha256}} for a record, from Unit.written (payload paths or URLs)."""
    return {str(p).rstrip("/").rsplit("/", 1)[-1]: d for p, d in written.items()}
