"""Folder locks: one run per output folder (or per `--part` of one).

The lock is a small object created create-only, holding host, pid, start time and command, so a second run is
refused with one line naming the holder. A lock left by a dead process on the same host is taken over by a
compare-and-swap of exactly the stale content, so two processes that find the same stale lock cannot both take it.
From another host a holder's liveness cannot be checked: the message names the file to remove once that run is
known to be gone. A stage takes its output's lock first; a job called without one takes it for its run
(pipeline.jobs.under_lock); the library's other writers (prepare, the Trainer) assume their caller holds one.

While a lock is held, every backend asks it before a final name under its folder is written or removed
(pipeline.storage.base.check_writable -> `prove`): the lock object must still hold this run's token, read from the
store then and there. A run whose lock was removed or taken over writes nothing more and raises LockLost (exit 75).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import LockLost, UserError
from pipeline.storage.base import guard_writes, storage_for, unguard_writes
from pipeline.storage.local import pid_alive
from pipeline.storage.paths import same_place


class FolderLock:
    """`folder`'s lock file `name`; `what` and `label` (default: the folder) name what is locked in messages."""

    def __init__(self, folder: str | Path, name: str = ".lock", what: str = "output folder", label: str | None = None):
        self.store = storage_for(folder)
        self.path = self.store.join(str(folder), name)
        self.folder, self.what, self.held = str(folder), what, False
        self.lost: str | None = None  # why this run no longer holds the lock it took
        self.following = False  # follow(): another process of the job holds it
        self.label = str(label or folder)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)[:500], "token": os.urandom(8).hex()}

    def acquire(self) -> "FolderLock":
        self.store.ensure_folder(self.folder)
        self.lost = None
        self.me["since"] = round(time.time(), 3)  # when this run took it: its uploads started after (Unix time)
        mine = json.dumps(self.me).encode()
        for _ in range(5):
            if self.store.create(self.path, mine):
                return self._held()
            found = self._holder()
            if found is None:  # released meanwhile: try again
                continue
            holder, version = found
            if holder is not None and not self._stale(holder):
                raise UserError(f"{self.what} {self.label} is in use by {self._who(holder, '')} since "
                                f"{holder.get('started')} ({self.path}); wait for it to end, or remove that file if "
                                f"the run is gone")
            if self.store.replace_if(self.path, mine, version):  # a dead run's (or unreadable) lock: take it over
                return self._held()
            time.sleep(0.01)  # another process took it over first: look again
        raise UserError(f"{self.what} {self.label}: could not take the lock {self.path}")

    def _held(self) -> "FolderLock":
        self.held = True
        guard_writes(self)
        atexit.register(self.release)
        return self

    def covers(self, path: str) -> bool:
        """Whether writing `path` needs this lock: a path under the folder, other than the lock's own object and the
        guard file of its compare-and-swap."""
        folder, path, own = same_place(self.folder), same_place(path), same_place(self.path)
        return path.startswith(folder + "/") and path not in (own, self._swap_guard(own))

    @staticmethod
    def _swap_guard(path: str) -> str:
        folder, _, name = path.rpartition("/")
        return f"{folder}/.{name}.swap"

    def prove(self) -> None:
        """Raise LockLost unless the lock object, read from the store now, still holds this run's token. Once lost,
        always lost: every later write under the folder raises too."""
        if self.lost is None:
            holder = self._holder_now()
            if not self._ours(holder):
                self._lose(f"it is held by {self._who(holder, 'nobody (its object was removed)')}")
        self._refuse_if_lost()

    def _refuse_if_lost(self) -> None:
        if self.lost is not None:
            raise LockLost(f"{self.lost}; this run writes nothing more (what it committed stays)")

    def _lose(self, why: str) -> None:
        self.lost = f"{self.what} {self.label}: lost the lock {self.path}: {why}"
        self.held = False

    def _holder(self) -> tuple[dict | None, object] | None:
        """The lock object now: (its holder, None where it is not JSON; its version), or None where it is gone."""
        found = self.store.read_versioned(self.path)
        return None if found is None else (self._parse(found[0]), found[1])

    def _holder_now(self) -> dict | None:
        """Who holds the lock object now (None: nobody, or not JSON)."""
        found = self._holder()
        return found[0] if found is not None else None

    def live_holder(self) -> dict | None:
        """Who holds this lock now, where that run may still be alive (None: nobody, not JSON, or a stale lock)."""
        holder = self._holder_now()
        return holder if holder is not None and not self._stale(holder) else None

    def _ours(self, holder: dict | None) -> bool:
        return holder is not None and holder.get("token") == self.me["token"]

    @staticmethod
    def _who(holder: dict | None, otherwise: str) -> str:
        return f"pid {holder.get('pid')} on {holder.get('host')}" if holder else otherwise

    @staticmethod
    def _parse(content: bytes) -> dict | None:
        try:
            holder = json.loads(content)
        except ValueError:
            return None
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: dict) -> bool:
        return holder.get("host") == self.me["host"] and not pid_alive(holder.get("pid", 0))

    def follow(self, token: str) -> "FolderLock":
        """The lock another process of the job holds (`token`: its holder's), followed by this one: writes here under
        the folder prove, as the holder's do, that the lock is still that run's (the other ranks of a multi-process
        encode). A follower never takes, renews or removes the lock."""
        self.me["token"], self.following, self.held, self.lost = token, True, True, None
        guard_writes(self)
        return self

    def release(self) -> None:
        unguard_writes(self)
        if self.following:
            self.held = False
            return
        if self.held and self._ours(self._holder_now()):  # a lock taken over meanwhile is not ours to remove
            self.store.delete(self.path)
        self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *_) -> None:
        self.release()
