"""Paths of every backend, for the code that lists, reads and names files: `as_path(p)` is a plain pathlib.Path for a
local path (so local behaviour is exactly pathlib's) and an ObjectPath for an object-store URL (s3://bucket/key).

ObjectPath offers the part of pathlib the pipeline uses (`/`, name, stem, suffix, parent, with_suffix, exists,
is_file, is_dir, iterdir, glob, read_bytes / read_text, write_bytes / write_text, unlink, mkdir) and does every
I/O through `storage_for(url)`. It is deliberately not os.PathLike: handing one to open(), os.* or a library that
wants a local file fails at once instead of writing a local folder named `s3:` (pathlib turns s3://a/b into
s3:/a/b). Whatever needs a local file takes a copy (pipeline.storage.cache) or writes a staging file
(Unit.staging) that the backend uploads whole.
"""

from __future__ import annotations

import fnmatch
import os
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO, Iterator

import braceexpand

from pipeline.storage.base import is_url, storage_for


def as_path(path):
    """pathlib.Path for a local path (file:// stripped), ObjectPath for an object-store URL; an unknown scheme or a
    backend whose extra is missing is one line (storage_for)."""
    if isinstance(path, ObjectPath):
        return path
    s = str(path)
    if not is_url(s):
        return Path(path)
    storage_for(s)
    return Path(s[len("file://"):]) if s.lower().startswith("file://") else ObjectPath(s)


class ObjectPath:
    """An object-store URL with pathlib's manners. Keys are `/`-separated; a "folder" is a key prefix, which exists
    as long as an object lies under it."""

    __slots__ = ("url", "_kind")

    def __init__(self, url: str, _kind: str | None = None):
        scheme, _, rest = str(url).partition("://")
        self.url = f"{scheme.lower()}://{'/'.join(p for p in rest.split('/') if p)}"
        self._kind = _kind  # "file" / "dir" when known from a listing (saves a request)

    # ------------------------------------------------------------------------------------------------ names
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name) -> "ObjectPath":
        return ObjectPath(f"{self.url}/{name}")

    def joinpath(self, *names) -> "ObjectPath":
        out = self
        for n in names:
            out = out / n
        return out

    @property
    def _key(self) -> str:
        return self.url.split("://", 1)[1].partition("/")[2]

    @property
    def name(self) -> str:
        return self._key.rsplit("/", 1)[-1] if self._key else ""

    @property
    def suffix(self) -> str:
        name = self.name
        i = name.rfind(".")
        return name[i:] if 0 < i < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        return self.name[: len(self.name) - len(self.suffix)] if self.suffix else self.name

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.url.rsplit("/", 1)[0]) if self._key else self

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def with_suffix(self, suffix: str) -> "ObjectPath":
        return self.parent / (self.stem + suffix)

    def expanduser(self) -> "ObjectPath":
        return self

    def resolve(self) -> "ObjectPath":
        return self

    def relative_to(self, other) -> Path:
        prefix = str(other).rstrip("/") + "/"
        if not self.url.startswith(prefix):
            raise ValueError(f"{self.url} is not under {other}")
        return Path(self.url[len(prefix):])

    # ------------------------------------------------------------------------------------------------ I/O
    @property
    def store(self):
        return storage_for(self.url)

    def is_file(self) -> bool:
        return self._kind == "file" if self._kind else self.store.object_exists(self.url)

    def is_dir(self) -> bool:
        return self._kind == "dir" if self._kind else self.store.folder_exists(self.url)

    def is_symlink(self) -> bool:
        return False  # an object store has no links

    def exists(self) -> bool:
        return self._kind is not None or self.store.exists(self.url)

    def iterdir(self) -> Iterator["ObjectPath"]:
        files, folders = self.store.entries(self.url)
        children = [ObjectPath(u, "file") for u in files] + [ObjectPath(u, "dir") for u in folders]
        return iter(sorted(children))

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        """Entries directly in this folder whose names match `pattern` (no `/` or `**` in it)."""
        if "/" in pattern:
            raise ValueError(f"ObjectPath.glob takes a name pattern, got {pattern!r}")
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def open(self, mode: str = "rb") -> BinaryIO:
        if mode != "rb":
            raise ValueError(f"{self.url}: objects are written whole (write_bytes, or a staging file), not opened "
                             f"with {mode!r}")
        return self.store.open_read(self.url)

    def read_bytes(self) -> bytes:
        return self.store.read_bytes(self.url)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def write_bytes(self, data: bytes) -> None:
        self.store.write_bytes(self.url, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and not self.store.object_exists(self.url):
            raise FileNotFoundError(self.url)
        self.store.delete(self.url)

    def mkdir(self, parents: bool = False, exist_ok: bool = False, mode: int = 0o777) -> None:
        return None  # a prefix exists as soon as an object has it


# ------------------------------------------------------------------------------------------------ helpers
def same_place(path) -> str:
    """A path spelled one way, to compare where two paths lead: absolute for a local path (file:// dropped, `~`
    expanded; its links as they are: the storage's `canonical` resolves them), the URL for an object."""
    path = str(path)
    path = path[len("file://"):] if path.startswith("file://") else path
    if is_url(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def without_scheme(path) -> str:
    """`path` without its URL scheme (s3://bucket/key -> bucket/key); a local path as it is."""
    path = str(path)
    return path.split("://", 1)[1] if is_url(path) else path


def place_relation(path, other) -> str | None:
    """How `path` lies to `other` (both as same_place spells them): "is", "contains", "lies inside", or None."""
    if path == other:
        return "is"
    if other.startswith(path.rstrip("/") + "/"):
        return "contains"
    return "lies inside" if path.startswith(other.rstrip("/") + "/") else None


def remove_tree(path) -> None:
    """A folder and everything in it (or one file); no error when absent."""
    storage_for(str(path)).delete(str(path))


def check_access(path, writes: bool = False) -> None:
    """Before any work: one line for missing or wrong credentials, a missing bucket or an unreachable endpoint of
    an object-store path (one listing request); with `writes`, also for a server that does not refuse a create-only
    write of an existing object (a probe written twice). Nothing for a local path (its backend has nothing to check)."""
    store = storage_for(str(path))
    store.check(str(path))
    if writes:
        store.check_conditional_writes(str(path))


def beside(folder, entry: str) -> str:
    """An entry of a list file that lies in `folder`: a URL or an absolute path as it is (`~` expanded), else
    relative to `folder` (never to the working directory), `..` taken away locally."""
    if is_url(entry):
        return entry
    entry = os.path.expanduser(entry)
    if os.path.isabs(entry):
        return entry
    joined = as_path(folder) / entry
    return str(joined) if isinstance(joined, ObjectPath) else os.path.normpath(joined)  # locally `a/../b` is `b`


def has_wildcards(spec: str) -> bool:
    return any(c in str(spec) for c in "{*?[")


def expand_pattern(spec: str) -> list[str]:
    """A brace pattern with shell wildcards (in file and folder names) -> the paths or URLs, sorted per brace
    alternative; wildcards are matched against a listing of their folder (one per folder, whatever the backend). A
    local pattern's `~` is the home folder (a shell leaves a quoted one unexpanded)."""
    spec = str(spec) if is_url(spec) else os.path.expanduser(str(spec))
    out = []
    for s in braceexpand.braceexpand(spec):
        out += sorted(_matches(s)) if any(c in s for c in "*?[") else [s]
    return out


def _matches(pattern: str, folders: bool = False) -> list[str]:
    """The files (or, with `folders`, the sub-folders) whose paths match `pattern`, wildcards in any name; as glob's,
    a hidden name (`.x`, macOS's `._x.tar`) only by a name pattern that starts with '.'."""
    folder, _, name = pattern.rpartition("/")
    if any(c in folder for c in "*?["):
        parents = _matches(folder, folders=True)
    else:
        parents = [folder] if folder or pattern.startswith("/") else ["."]
    found = []
    for parent in parents:
        files, subfolders = storage_for(parent or "/").entries(parent or "/")
        for path in (subfolders if folders else files):
            base = path.rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(base, name) and (name.startswith(".") or not base.startswith(".")):
                found.append(f"./{path}" if parent == "." and folder else path)  # `./x*.tar` gives ./x-0.tar
    return found


def listing_of(paths: list[str]) -> dict[str, tuple[int, str]]:
    """{path: (size, ETag)} of the objects among `paths`, found by listing each folder once (10,000 shards in one
    folder: 10 requests, not 10,000)."""
    by_folder: dict[str, set[str]] = defaultdict(set)
    for p in paths:
        by_folder[p.rsplit("/", 1)[0] if "/" in p else "."].add(p)
    found = {}
    for folder, names in by_folder.items():
        for path, entry in storage_for(folder).entries(folder)[0].items():
            for spelled in (path, f"./{path}") if folder == "." else (path,):  # the working folder's, either way
                if spelled in names:
                    found[spelled] = entry
    return found


def missing_objects(paths: list[str], listed: dict | None = None) -> list[str]:
    """The paths or URLs among `paths` that name no object: those a listing of their folders (`listed`, else
    listing_of) does not show, each asked about once more (a local FIFO is no listed file, but it exists)."""
    listed = listing_of(paths) if listed is None else listed
    return [p for p in paths if p not in listed and not storage_for(p).exists(p)]
