"""Writing files so that a file under its final name is always complete: temporary name, fsync, rename.

Every file firststage writes (shards, manifests, configs, eval.json, grids, exports) goes through these helpers, so
a run killed at any moment leaves either the previous complete file or none, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def temporary_name(path: str | Path) -> Path:
    """`.NAME.tmp` in the same folder (same filesystem, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename: readers never see a half file."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete `.NAME.tmp` leftovers of a killed run in `folder`; returns how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def read_json(path: str | Path, what: str = "file") -> dict:
    """A JSON object from `path`, or a UserError of one line (missing, not JSON, not an object)."""
    from pipeline.errors import UserError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a firststage {what} (not a JSON object)")
    return data


@contextlib.contextmanager
def staged_output(path: str | Path, overwrite: bool = False, what: str = "--output"):
    """Write a file or folder under `.NAME.tmp` beside `path` and rename it when the block succeeds: the final name
    only ever holds a complete result. An existing `path` is refused unless `overwrite` (then replaced)."""
    from pipeline.errors import UserError

    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{what} {path} exists; choose another name or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    _remove(tmp)
    try:
        yield tmp
        if path.exists():
            _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
