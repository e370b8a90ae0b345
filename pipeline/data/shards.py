"""Webdataset shard files: how a sample's members are named, and the tar writer.

A shard is a plain POSIX (PAX) tar whose members are `{key}.{ext}`; members of one sample are adjacent. The writer
fills a local staging file; the commit protocol (pipeline.storage.Unit) puts it under its final name whole, so a
file named `*.tar` is always complete.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from pathlib import Path

_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split (first dot of basename)


def split_key(name: str) -> tuple[str, str] | None:
    """A tar member name -> (sample key, extension), as webdataset groups members into samples."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def shard_name(url: str) -> str:
    """The file name of a shard path or URL (an encoded shard keeps its input's name)."""
    return Path(str(url)).name


class ShardWriter:
    """Write samples (dicts of extension -> bytes, plus `__key__`) into one tar at `path` (a staging file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
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

    def close(self) -> None:
        """Finish the tar and fsync it: complete on disk before it is committed."""
        if not self._file.closed:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def abort(self) -> None:
        """Close without finishing and delete the staging file (an interrupted or failed shard)."""
        try:
            if not self._file.closed:
                self._tar.close()
                self._file.close()
        except OSError:  # closing flushes: on a full disk that fails too, and the staging file must still go
            self._file.close()
        finally:
            self.path.unlink(missing_ok=True)
