"""Webdataset shard files and their manifest.

A shard is a plain POSIX (PAX) tar whose members are `{key}.{ext}`; members of one sample are adjacent. Shards are written
under a temporary name and renamed when closed, so a file named `*.tar` is always complete. `manifest.json` beside
the shards lists them with their sample counts and every input that was skipped, with the reason.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Iterable

from pipeline.errors import UserError
from pipeline.io import atomic_write_json, read_json, temporary_name

MANIFEST = "manifest.json"
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split (first dot of basename)


def split_key(name: str) -> tuple[str, str] | None:
    """A tar member name -> (sample key, extension), as webdataset groups members into samples."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


class ShardWriter:
    """Write samples (dicts of extension -> bytes, plus `__key__`) into one tar, atomically on close."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # no 100-character name limit
        self.count = 0
        self._mtime = time.time()

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} contains a dot: webdataset would split it")
        for ext, data in sample.items():
            if ext.startswith("__"):
                continue
            if isinstance(data, str):
                data = data.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = self._mtime
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def seal(self) -> None:
        """Finish the tar under its temporary name and fsync it (a record can then be written before commit)."""
        if not self._file.closed:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def commit(self) -> None:
        """Rename to the final name: from here on the shard counts as complete."""
        os.replace(self.tmp, self.path)

    def close(self) -> None:
        self.seal()
        self.commit()

    def abort(self) -> None:
        try:
            if not self._file.closed:
                self._tar.close()
                self._file.close()
        except OSError:  # closing flushes: on a full disk that fails too, and the temporary file must still go
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


# ---------------------------------------------------------------------------------------------------- manifests
def read_manifest(path: str | Path) -> dict:
    data = read_json(path, "manifest")
    if "shards" not in data:
        raise UserError(f"{path}: not a firststage manifest (no 'shards' list)")
    return data


def part_name(stem: str, part: int, num_parts: int, ext: str = "") -> str:
    """A per-job file's name: `STEM` + ext for a whole job, `STEM.part-KKKKK-of-NNNNN` + ext for one of N parts
    (manifests, prepare's fingerprints, the output folder's lock)."""
    return f"{stem}{ext}" if num_parts == 1 else f"{stem}.part-{part:05d}-of-{num_parts:05d}{ext}"


def merge_manifests(folder: str | Path, write: bool = True) -> dict:
    """Join the part manifests of a `--part K/N` run into one manifest.json; every part must be present."""
    folder = Path(folder)
    parts = sorted(folder.glob("manifest.part-*-of-*.json"))
    if not parts:
        raise UserError(f"no part manifests (manifest.part-K-of-N.json) in {folder}")
    manifests = [read_manifest(p) for p in parts]
    counts = {m.get("num_parts") for m in manifests}
    if len(counts) != 1:
        raise UserError(f"{folder}: part manifests disagree on the number of parts: {sorted(map(str, counts))}")
    (num_parts,) = counts
    have = {m.get("part") for m in manifests}
    missing = sorted(set(range(num_parts)) - have)
    if missing:
        raise UserError(f"{folder}: parts {missing} of {num_parts} have no manifest yet (not finished?)")
    merged = combine_manifests(manifests)
    merged["parts"] = num_parts
    if write:
        atomic_write_json(folder / MANIFEST, merged)
    return merged


def combine_manifests(manifests: Iterable[dict]) -> dict:
    manifests = list(manifests)
    out = {k: v for k, v in manifests[0].items() if k not in ("part", "num_parts")}
    out["shards"] = [s for m in manifests for s in m["shards"]]
    out["total"] = sum(s["samples"] for s in out["shards"])
    out["skipped"] = [s for m in manifests for s in m.get("skipped", [])]
    out["skipped_count"] = len(out["skipped"])
    out["inputs"] = sum(m.get("inputs", 0) for m in manifests)
    sizes: dict = {}
    for m in manifests:
        for k, v in m.get("output_sizes", {}).items():
            sizes[k] = sizes.get(k, 0) + v
    out["output_sizes"] = dict(sorted(sizes.items(), key=lambda kv: -kv[1]))
    shorter = [m["input_shorter_side"] for m in manifests if m.get("input_shorter_side")]
    if shorter:
        out["input_shorter_side"] = {
            "min": min(s["min"] for s in shorter),
            "max": max(s["max"] for s in shorter),
        }
    return out
