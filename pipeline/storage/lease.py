"""A folder lock with a lease: what an object store (or a folder shared by several hosts) needs, where the holder's
pid cannot be checked.

The lock object is FolderLock's (host, pid, started, command, token) plus three fields:
  lease_s   how long the lock stays valid without a renewal (seconds)
  renewed   when the holder last wrote it (Unix time, holder's clock)
  expires   renewed + lease_s
The holder rewrites it every `renew_every_s` (lease_s / 4 by default) by a compare-and-swap of the version it read
(`replace_if`: a PUT with If-Match on the ETag on S3). Another run is refused, naming the holder, while
`expires + skew_s` is in the future (or, on the holder's own host, while its pid lives); after that the lock is
taken over by the same compare-and-swap FolderLock uses for a dead pid, so of two runs that find one expired lease
exactly one wins. A holder whose renewal finds another token (or fails until its lease ran out) has lost the lock:
`lost` says why.

Before a final name under the folder is written or removed (pipeline.storage.base.check_writable), `prove()` shows
that the lease is still this run's, on the store: a compare-and-swap renewal that succeeded less than half a lease
ago (no other run may take the lock before that renewal's lease has run out, plus `skew_s`), else a renewal now, a
conditional write. A process that was stopped (SIGSTOP, a frozen VM) past its lease therefore finds out at its next
write, before it writes, and raises LockLost (exit 75); a process forked from the holder (prepare's workers), which
has no renewal of its own, reads the lock object and needs its token and at least half a lease left in it.

Clocks: expiry compares the holder's clock (in the object) with the taker's; `skew_s` absorbs the difference
between hosts (NTP keeps it far below the default 10 s).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.storage.base import is_remote
from pipeline.storage.lock import FolderLock

log = logging.getLogger("firststage.storage")


class LeasedLock(FolderLock):
    def __init__(self, folder: str | Path, name: str = ".lock", what: str = "output folder", lease_s: float = 120.0,
                 renew_every_s: float | None = None, skew_s: float = 10.0, label: str | None = None):
        super().__init__(folder, name, what, label)
        if renew_every_s is None:
            renew_every_s = lease_s / 4
        if not 0 < renew_every_s < lease_s:
            raise ValueError(f"renew_every_s ({renew_every_s}) must be between 0 and lease_s ({lease_s})")
        self.lease_s, self.renew_every_s, self.skew_s = lease_s, renew_every_s, skew_s
        self.renewals = 0
        self._confirmed = 0.0  # time.monotonic() of the last write on the store that showed the lease is ours
        self._seen = (0, 0.0)  # (pid, time.monotonic()) of a process's last read that showed the lease is ours
        self._renewing = threading.Lock()  # the renewal thread and prove() renew one at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stamp()

    def _stamp(self) -> None:
        now = time.time()
        self.me.update(lease_s=self.lease_s, renewed=round(now, 3), expires=round(now + self.lease_s, 3))

    # ------------------------------------------------------------------------------------------------ taking it
    def acquire(self) -> "LeasedLock":
        self._stamp()  # a fresh lease from the moment of taking
        self.lost = None
        return super().acquire()

    def _stale(self, holder: dict) -> bool:
        if super()._stale(holder):  # a dead pid on this host: no need to wait for the lease
            return True
        try:
            return time.time() > float(holder["expires"]) + self.skew_s
        except (KeyError, TypeError, ValueError):
            return False  # a lock without a lease (FolderLock's): only its pid check applies

    def follow(self, token: str) -> "LeasedLock":
        self.pid = None  # no renewals here: prove() reads the holder's lease
        return super().follow(token)

    def _held(self) -> "LeasedLock":
        super()._held()
        self.pid = os.getpid()
        self._confirmed = time.monotonic()  # the create (or takeover) just written
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {self.path}", daemon=True)
        self._thread.start()
        return self

    # ------------------------------------------------------------------------------------------------ keeping it
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                if not self.renew():
                    return
            except Exception as e:  # noqa: BLE001 (storage unreachable for a moment: try again, until the lease ends)
                if time.time() > float(self.me["expires"]):
                    self._lose(f"could not renew it before its lease ran out ({type(e).__name__}: {e})")
                    return
                log.warning("could not renew the lock %s (will retry): %s", self.path, e)

    def renew(self) -> bool:
        """Extend the lease now; False (and `lost` set) if the lock is no longer ours."""
        with self._renewing:
            return self.lost is None and self._renew()

    def _renew(self) -> bool:
        started = time.monotonic()
        found = self._holder()
        if found is None:
            self._lose("its object was removed")
            return False
        holder, version = found
        if not self._ours(holder):
            self._lose(f"it was taken over by {self._who(holder, 'an unreadable object')}")
            return False
        previous = dict(self.me)
        self._stamp()
        self.me["renewals"] = self.renewals + 1
        if self.store.replace_if(self.path, json.dumps(self.me).encode(), version):
            self.renewals += 1
            self._confirmed = started  # the lease runs from no earlier than the read that preceded the swap
            return True
        self.me = previous  # changed between our read and our write: somebody else's now
        self._lose("it was taken over while being renewed")
        return False

    def _lose(self, why: str) -> None:
        super()._lose(why)
        self._stop.set()
        log.error("%s", self.lost)

    def prove(self) -> None:
        """Raise LockLost unless the lease is shown, on the store, to be this run's (see the module's docstring)."""
        if self.lost is None and self.pid == os.getpid():
            if time.monotonic() - self._confirmed >= self.lease_s / 2:
                self.renew()  # the renewal thread fell behind (a stopped process, a slow store): ask the store now
        elif self.lost is None and not (self._seen[0] == os.getpid() and
                                        time.monotonic() - self._seen[1] < self.lease_s / 4):
            # forked from the holder, or following it (another rank): the renewals are the holder's. A read by this
            # process that found our token with half a lease left proves it for a quarter lease: nobody may take
            # the lock before that lease has run out
            looked, holder = time.monotonic(), self._holder_now()
            if not self._ours(holder):
                self._lose(f"it is held by {self._who(holder, 'nobody (its object was removed)')}")
            elif float(holder.get("expires", 0)) - time.time() < self.lease_s / 2:
                self._lose(f"its lease runs out at {holder.get('expires')} and the holder has not renewed it")
            else:
                self._seen = (os.getpid(), looked)
        self._refuse_if_lost()

    # ------------------------------------------------------------------------------------------------ letting go
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        super().release()


LEASE_S = 120.0  # the default lease of a stage's lock on object storage (FIRSTSTAGE_LOCK_LEASE_S)
SKEW_S = 10.0  # the clock difference between hosts that a takeover allows for (FIRSTSTAGE_LOCK_SKEW_S)


def _seconds(variable: str, default: float, least: float) -> float:
    try:
        value = float(os.environ.get(variable) or default)
    except ValueError:
        value = float("nan")
    if not value >= least:
        raise UserError(f"{variable}={os.environ[variable]!r} is not a number of seconds >= {least:g}")
    return value


def folder_lock(folder, name: str = ".lock", what: str = "output folder", label: str | None = None) -> FolderLock:
    """The lock a stage takes on its output folder: a FolderLock on a local folder (a dead holder is seen by its
    pid); a LeasedLock on object storage, renewed while the stage runs (a holder on another host is seen by its
    lease, FIRSTSTAGE_LOCK_LEASE_S seconds, default 120)."""
    if is_remote(folder):
        lease, skew = _seconds("FIRSTSTAGE_LOCK_LEASE_S", LEASE_S, 1e-3), _seconds("FIRSTSTAGE_LOCK_SKEW_S", SKEW_S, 0)
        return LeasedLock(str(folder), name, what, lease_s=lease, skew_s=skew, label=label)
    return FolderLock(folder, name, what, label)
