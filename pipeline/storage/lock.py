"""Folder locks: one run per output folder (or per `--part` of one).

The lock is a small object created create-only, holding host, pid, start time and command, so a second run is
refused with one line naming the holder. A lock left by a dead process on the same host is taken over by a
compare-and-swap of exactly the stale content, so two processes that find the same stale lock cannot both take it.
From another host a holder's liveness cannot be checked: the message names the file to remove once that run is
known to be gone. Only stages take locks; the library's writers assume the stage holds one.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.storage.base import storage_for
from pipeline.storage.local import pid_alive


class FolderLock:
    """`folder`'s lock file `name`; `what` and `label` (default: the folder) name what is locked in messages."""

    def __init__(self, folder: str | Path, name: str = ".lock", what: str = "output folder", label: str | None = None):
        self.store = storage_for(folder)
        self.path = self.store.join(str(folder), name)
        self.folder, self.what, self.held = str(folder), what, False
        self.label = str(label or folder)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)[:500], "token": os.urandom(8).hex()}

    def acquire(self) -> "FolderLock":
        self.store.ensure_folder(self.folder)
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
        atexit.register(self.release)
        return self

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

    def release(self) -> None:
        if self.held and self._ours(self._holder_now()):  # a lock taken over meanwhile is not ours to remove
            self.store.delete(self.path)
        self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *_) -> None:
        self.release()
