"""Local stand-ins for object-store paths, where a library needs a local file.

  local_copy(url)     a model's files (a checkpoint folder, a diffusers folder, a single file) copied into the cache
                      and loaded there: safetensors, torch.load and diffusers read local files. A copy is checked
                      against the store's listing (size and ETag of every object: one request) on every call and
                      downloaded again where it differs, so a cached copy never stands for other weights.
  LogMirror(folder)   the logs a run appends to (metrics.jsonl, TensorBoard's logs/, samples/*.png) are written into
                      a local folder and uploaded by sync() (at every checkpoint and at the end of the run): an
                      object store has no append, and uploading a log on every line would cost a request per line.

The cache is $FIRSTSTAGE_CACHE, else ~/.cache/firststage (objects/SCHEME/BUCKET/KEY, runs/SCHEME/BUCKET/KEY). A
local path passes through both unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import UserError
from pipeline.storage.base import is_remote, storage_for
from pipeline.storage.local import pid_alive
from pipeline.storage.paths import ObjectPath

INDEX = ".firststage-copy.json"  # in a copied folder: {relative name: [size, ETag]} of what was copied


def cache_root() -> Path:
    return Path(os.environ.get("FIRSTSTAGE_CACHE") or Path.home() / ".cache" / "firststage").expanduser()


def _under(kind: str, url: str) -> Path:
    scheme, _, rest = str(ObjectPath(url)).partition("://")
    return cache_root() / kind / scheme / rest


def local_copy(path, max_objects: int = 1000) -> Path:
    """A local path as it is; an object URL's file or folder (everything under it) as a checked local copy. A folder
    of more than `max_objects` objects is refused (a model is a few files; this is not for data)."""
    if not is_remote(path):
        return Path(path)
    url = str(ObjectPath(path))
    store = storage_for(url)
    dest = _under("objects", url)
    listing = store.walk(url)
    if not listing:
        try:
            info = store.info(url)
        except FileNotFoundError:
            raise UserError(f"{url}: no such file or folder") from None
        listing = {url: (info["size"], info["etag"])}
        files = {dest.name: url}
        index_file, root = dest.parent / f".{dest.name}{INDEX}", dest.parent
    else:
        if len(listing) > max_objects:
            raise UserError(f"{url}: {len(listing)} objects under it; a model folder holds a few files (is this "
                            f"a data folder?)")
        files = {str(ObjectPath(u).relative_to(url)): u for u in listing}
        index_file, root = dest / INDEX, dest
    root.mkdir(parents=True, exist_ok=True)
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    for rel, u in sorted(files.items()):
        want = list(listing[u])
        local = root / rel
        if index.get(rel) == want and local.is_file() and local.stat().st_size == want[0]:
            continue
        _download(store, u, local)
        index[rel] = want
    if root == dest:  # what the store no longer holds goes from the copy too
        for p in sorted(dest.rglob("*"), reverse=True):
            rel = p.relative_to(dest).as_posix()
            if p.is_file() and p.name != INDEX and rel not in files:
                p.unlink()
                index.pop(rel, None)
    tmp = index_file.with_name(f"{index_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_file)
    return dest


def source_url(path) -> str:
    """The object-store URL a path in the cache is a copy of (any other path as it is): for messages and records."""
    try:
        rel = Path(path).resolve().relative_to((cache_root() / "objects").resolve())
    except ValueError:
        return str(path)
    scheme, _, rest = rel.as_posix().partition("/")
    return f"{scheme}://{rest}"


def _download(store, url: str, local: Path) -> None:
    """One object into `local`, whole (a temporary name in the same folder, then a rename)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, store.open_read(url) as src:
            shutil.copyfileobj(src, out, 8 * 2**20)
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LogMirror:
    """The folder a run's appended logs go to: the run folder itself when it is local (sync does nothing), else a
    local folder whose files sync() uploads under the run folder (each whole; only files that changed). The local
    folder is the process's own (`runs/SCHEME/BUCKET/KEY/pid-N`): a run that lost its lease to another run of the same
    URL on this host never appends to the other's logs; those of processes that are gone are removed."""

    def __init__(self, folder):
        self.remote = str(ObjectPath(folder)) if is_remote(folder) else None
        self.local = _under("runs", self.remote) / f"pid-{os.getpid()}" if self.remote else Path(folder)
        self._sent: dict[str, tuple[int, int]] = {}
        if self.remote and self.local.parent.is_dir():
            for other in self.local.parent.glob("pid-*"):
                if other.name[4:].isdigit() and not pid_alive(int(other.name[4:])):
                    shutil.rmtree(other, ignore_errors=True)

    def pull(self, *names: str) -> None:
        """Start from the run folder's copy of these files (a resumed run appends to its metrics.jsonl); when it has
        none of them (a new run), from an empty local folder (not the leftovers of an earlier run of that URL)."""
        if self.remote is None:
            return
        store = storage_for(self.remote)
        present = {name for name in names if store.object_exists(store.join(self.remote, name))}
        if not present:
            shutil.rmtree(self.local, ignore_errors=True)
            return
        for name in names:
            local = self.local / name
            if name in present:
                _download(store, store.join(self.remote, name), local)
                st = local.stat()
                self._sent[name] = (st.st_size, st.st_mtime_ns)
            else:
                local.unlink(missing_ok=True)

    def sync(self) -> int:
        """Upload the files that changed since the last sync; returns how many."""
        if self.remote is None or not self.local.is_dir():
            return 0
        store, n = storage_for(self.remote), 0
        for p in sorted(q for q in self.local.rglob("*") if q.is_file() and not q.name.endswith(".tmp")):
            rel = p.relative_to(self.local).as_posix()
            st = p.stat()
            if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            staged = store.staging_file(store.join(self.remote, rel))
            shutil.copyfile(p, staged)  # a copy: the log file stays, and goes on growing
            store.put_file(store.join(self.remote, rel), staged)
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
            n += 1
        return n
