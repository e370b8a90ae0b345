"""Writing files so that a file under its final name is always complete: temporary name, fsync, rename.

Every file firststage writes (shards, manifests, configs, eval.json, grids, exports) goes through these helpers, so
a run killed at any moment leaves either the previous complete file or none, never half of one.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
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
        for f in ([tmp] if tmp.is_file() else [q for q in tmp.rglob("*") if q.is_file()]):
            respect_umask(f)
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


class FolderLock:
    """An exclusive lock on an output folder: a lock file created atomically (O_CREAT | O_EXCL, which NFSv3+ and
    Lustre/GPFS honour) holding host, pid and start time. A second run on the folder is refused with one line naming
    the holder; a lock left by a dead process on the same host is taken over; from another host it cannot be checked,
    so the message says which file to remove once that run is known to be gone. Released on exit."""

    def __init__(self, folder: str | Path, name: str = ".lock", what: str = "--output"):
        self.path = Path(folder) / name
        self.what, self.held = what, False
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)[:500]}

    def acquire(self) -> "FolderLock":
        from pipeline.errors import UserError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._stale(holder):
                    self.path.unlink(missing_ok=True)  # a killed run's lock (or a half-written one): take over
                    continue
                raise UserError(f"{self.what} {self.path.parent} is in use by pid {holder.get('pid')} on "
                                f"{holder.get('host')} since {holder.get('started')} ({self.path}); wait for it to end, "
                                f"or remove that file if the run is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise UserError(f"{self.what} {self.path.parent}: could not take the lock {self.path}")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != self.me["host"]:
            return False
        try:
            os.kill(int(holder.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def release(self) -> None:
        if self.held and self._holder() == self.me:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *_) -> None:
        self.release()


def no_space_message(path: str | Path, err: OSError) -> str | None:
    """One line for a full disk or quota (ENOSPC, EDQUOT), naming the folder and the space left; None otherwise."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 2**20
    return (f"no space left on the device of {folder} ({free:.0f} MiB free) while writing {err.filename or path}; "
            f"free space or choose another output folder, then run the same command again (nothing is lost)")


@contextlib.contextmanager
def disk_full_as_oserror(path: str | Path, min_free: int = 64 * 2**20):
    """torch.save and safetensors report a full disk in their own words (`unexpected pos 3166080 vs 3165968`): when
    a write fails and the device is (nearly) full, raise it as the ENOSPC it is."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        folder = Path(path).parent
        if folder.exists() and shutil.disk_usage(folder).free < min_free:
            raise OSError(errno.ENOSPC, f"no space left ({type(e).__name__})", str(path)) from None
        raise


def respect_umask(path: str | Path) -> None:
    """Give a file the permissions the umask allows (safetensors writes 0600; a shared cluster folder needs 0644)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
