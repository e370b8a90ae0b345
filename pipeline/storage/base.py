"""The storage interface: what the commit protocol, manifests and locks need of a place that holds files.

Every method takes a full path (a local path, or a URL of the backend's scheme). The guarantees each backend gives:
  * write_bytes / put_file: the object appears under its name whole or not at all (local: temporary name, fsync,
    rename; object store: one upload, multipart aborted on failure).
  * create: create-only; False, and nothing written, when the name exists (local: a hard link of a complete
    temporary file, which fails on an existing name; object store: If-None-Match: *).
  * read_versioned / replace_if: compare-and-swap of a small object (a lock's lease): the replacement is written only
    if the object is still the version that was read.
"""

from __future__ import annotations

import importlib
import inspect
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import UserError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class Storage(ABC):
    """Files by full path. Implementations: LocalStorage (pipeline.storage.local); object stores by URL scheme."""

    @abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The whole object; FileNotFoundError when absent."""

    @abstractmethod
    def open_read(self, path: str) -> BinaryIO:
        """A buffered binary stream of the object (shards are read this way, member by member); its `raw.size` is
        the object's size when it was opened. Locally a path that is not a regular file is refused
        (local.NotRegularFile) before a byte is read."""

    @abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write (or replace) the object whole: readers see the old one or the new one, never part of either."""

    @abstractmethod
    def put_file(self, path: str, local: Path) -> dict:
        """Make the finished local file `local` the object `path`, whole; `local` is consumed (moved or deleted).
        Returns the {size, sha256} of what was written (a commit record holds it). A local folder becomes the
        objects under `path` (an export: locally it moves whole, in one rename)."""

    @abstractmethod
    def create(self, path: str, data: bytes) -> bool:
        """Create-only write: True if this call created the object; False (nothing written) if it existed."""

    @abstractmethod
    def read_versioned(self, path: str) -> tuple[bytes, object] | None:
        """(content, version) of a small object, or None when absent; the version is what replace_if compares."""

    @abstractmethod
    def replace_if(self, path: str, data: bytes, version: object) -> bool:
        """Replace the object only if it is still `version`; True if replaced."""

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether an object (or a folder: objects under `path/`) of this name exists."""

    @abstractmethod
    def list(self, folder: str, suffix: str = "", prefix: str = "") -> list[str]:
        """Full paths of the objects directly in `folder` whose names start with `prefix` and end with `suffix`,
        sorted (a prefix narrows the listing itself: what else the folder holds is not read)."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove the object (or a folder and everything in it); no error when it is absent."""

    @abstractmethod
    def staging_file(self, path: str) -> Path:
        """A local file, unique to this call, into which the payload of `path` is written before put_file."""

    @abstractmethod
    def ensure_folder(self, folder: str) -> None:
        """Make `folder` exist where folders exist (locally); nothing on an object store."""

    @abstractmethod
    def join(self, folder: str, *names: str) -> str:
        """`folder`/`name`/... in this backend's syntax."""

    # -------------------------------------------------------------------------------- looking at what is stored
    # A listing maps full paths to (size, ETag): the ETag changes when the object is written again (an object
    # store's ETag; locally the inode and mtime). It is what a commit record keeps of a payload (Unit.intact).

    @abstractmethod
    def info(self, path: str) -> dict:
        """{'size', 'etag'} of an object (and 'sha256' where the backend stored it); FileNotFoundError when absent."""

    @abstractmethod
    def entries(self, folder: str, start: str = "") -> tuple[dict[str, tuple[int, str]], list[str]]:
        """What lies directly in `folder` (of it, the names that start with `start`): ({path: (size, ETag)} of the
        objects, [paths of the sub-folders]); empty when `folder` is absent. One listing (an object store: one request
        per 1000 entries; locally one scandir)."""

    @abstractmethod
    def walk(self, folder: str) -> dict[str, tuple[int, str]]:
        """Every object under `folder` at any depth: {path: (size, ETag)}, in path order; empty when absent."""

    @abstractmethod
    def object_exists(self, path: str) -> bool:
        """Whether an object (a file, not a folder) of this name exists (one request on an object store)."""

    @abstractmethod
    def folder_exists(self, path: str) -> bool:
        """Whether `path` is a folder (on an object store: any object lies under `path/`)."""

    @abstractmethod
    def open_range(self, path: str, start: int, length: int) -> BinaryIO:
        """A binary stream of `length` bytes of the object from byte `start` (locally a seek; an object store: one
        ranged GET)."""

    def identity(self, path: str, entry: tuple[int, str] | None = None) -> dict | None:
        """What says that an input is the one a run recorded (prepare's fingerprint, encode's records): a dict of
        this backend's choosing, compared whole; None when the input cannot be looked at (the path decides then).
        `entry`: the path's (size, ETag) from a listing of its folder, which saves a request where one costs."""
        try:
            size, etag = entry if entry is not None else (lambda i: (i["size"], i["etag"]))(self.info(path))
        except (OSError, UserError):
            return None
        return {"size": size, "etag": etag}

    # -------------------------------------------------------------------------------- capabilities
    seekable: bool = True
    """Whether a stream of open_read can seek cheaply (a local file); an object store streams (a seek would be a new
    request), so readers that can read either way read it as a stream."""

    def not_a_file(self, path: str) -> str | None:
        """What `path` is when it exists but is not a regular file, which a reader would block on or never finish
        ("a FIFO", "a folder", "a character device", ...); None for a regular file or nothing there. No request by
        default: an object store holds only objects."""
        return None

    def canonical(self, path: str) -> str:
        """Where `path` leads, spelled one way, to compare two paths of this backend: locally the real path (`~`
        expanded, links resolved, file:// dropped), the URL without a trailing slash by default. No request."""
        return str(path).rstrip("/")

    opens_in_place: bool = True
    """Whether libraries (safetensors, torch.load, diffusers, a log appended to) open this backend's paths in place,
    as files of this machine; False: they work on a local copy (`local_file`), and what they write is uploaded whole
    (pipeline.storage.cache.LogMirror). Weights on such a backend are pinned first (pipeline.weights.remote)."""

    def read_failed(self, err: Exception) -> bool:
        """Whether `err`, raised while reading one of this backend's objects, is the store's failure (its retries
        spent: throttling, dropped connections, an endpoint away) rather than the content's (broken tar data, a
        missing object). A reader skips and counts such an object instead of taking it for broken data. False by
        default: a local read fails for what the file holds, and says so."""
        return False

    @abstractmethod
    def local_file(self, path: str) -> Path:
        """A local file (or folder) holding `path`'s content, for libraries that open files themselves (safetensors,
        torch.load, pyarrow, diffusers): the path itself locally, a checked copy in the cache on an object store."""

    def check(self, path: str) -> None:
        """Before any work: one line (UserError) for what would make every request under `path` fail (credentials,
        bucket, endpoint). Nothing to check by default (a local path)."""

    def check_conditional_writes(self, folder: str) -> None:
        """Before any work: one line (UserError) when `create` under `folder` would not be create-only (a server that
        ignores If-None-Match). Nothing to check by default (a local filesystem's hard link is create-only)."""

    def uploads(self, folder: str) -> list[tuple[str, str, float]]:
        """Unfinished uploads under `folder` at any depth (what a killed run left, stored but invisible):
        (path, upload id, Unix time it started). None by default (a backend that writes whole files locally)."""
        return []

    def abort_upload(self, path: str, upload_id: str) -> None:
        """Abort one unfinished upload listed by `uploads` (its parts are deleted; nothing appears)."""


# ------------------------------------------------------------------------------------------------ the write guard
# The locks this process holds (FolderLock, LeasedLock): before a final name under a locked folder is written or
# removed, by any backend, the lock proves on the store that it is still this process's (pipeline.storage.lock).
_GUARDS: list = []


def guard_writes(lock) -> None:
    """From now on, writes under `lock`'s folder first ask `lock.prove()` (raises LockLost once it is lost)."""
    if lock not in _GUARDS:
        _GUARDS.append(lock)


def unguard_writes(lock) -> None:
    if lock in _GUARDS:
        _GUARDS.remove(lock)


def held_token(path) -> str | None:
    """The token of this process's lock that covers `path` (for the other ranks of its job to follow), or None."""
    return next((lock.me["token"] for lock in _GUARDS if lock.covers(str(path))), None)


def check_writable(path) -> None:
    """Before writing or removing `path` under a final name: every lock of this process that covers it proves that
    it is still held (LockLost, and nothing written, when it is not). The lock's own object is not covered."""
    for lock in list(_GUARDS):
        if lock.covers(str(path)):
            lock.prove()


BACKENDS: dict[str, type] = {}  # URL scheme -> Storage class; the local filesystem serves paths without a scheme
_INSTANCES: dict[tuple[str, str], Storage] = {}  # (scheme, options prefix or "") -> the backend serving those paths
# URL prefix (ending in "/") -> the keyword arguments of the backend that serves the paths under it (storage_options)
_OPTIONS: dict[str, dict] = {}
# backends imported on first use of their scheme (module, extra that installs what it needs)
_LAZY = {"s3": ("pipeline.storage.s3", "s3")}


def is_url(path) -> bool:
    return bool(_SCHEME.match(str(path)))


def is_remote(path) -> bool:
    """A URL of an object store (not a local path, not file://)."""
    return is_url(path) and not str(path).lower().startswith("file://")


def _scheme(path) -> str:
    m = _SCHEME.match(str(path))
    return m.group(1).lower() if m else "file"


def _backend(scheme: str, path) -> type:
    """The Storage class of `scheme` (its module imported on first use), else one line naming the scheme."""
    if scheme not in BACKENDS and scheme in _LAZY:
        module, extra = _LAZY[scheme]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"{path}: {scheme}:// needs the {extra} extra ({e.name or e} is not installed): "
                            f"pip install 'firststage[{extra}]'") from None
    if scheme not in BACKENDS:
        known = ", ".join(f"{s}://" for s in sorted(set(BACKENDS) | set(_LAZY)) if s != "file")
        raise UserError(f"{path}: unsupported URL scheme {scheme}:// (firststage reads and writes local paths"
                        f"{' and ' + known if known else ''})")
    return BACKENDS[scheme]


def _normal_prefix(prefix: str) -> str:
    scheme, sep, rest = str(prefix).partition("://")
    return f"{scheme.lower()}{sep}{rest.rstrip('/')}/" if rest.strip("/") else f"{scheme.lower()}{sep}"


def _options_prefix(path, scheme: str) -> str:
    """The longest options prefix `path` lies under ("" when none): s3://a/ covers s3://a and s3://a/x, not s3://ab."""
    if scheme == "file":
        return ""
    p = _normal_prefix(str(path))
    return max((prefix for prefix in _OPTIONS if p.startswith(prefix)), key=len, default="")


def set_storage_options(options: dict, source: str = "storage options") -> None:
    """Object-storage settings per path, as fsspec's `storage_options`: {URL prefix: {option: value}}, e.g.
    {"s3://raw/": {"endpoint_url": "https://minio.lab:9000", "profile": "lab"}, "s3://results/": {"region":
    "eu-central-1", "key_env": "RESULTS_KEY", "secret_env": "RESULTS_SECRET"}}. A path takes the options of the
    longest prefix it lies under (a prefix ends at a "/": s3://a covers s3://a/x, not s3://ab/x); paths under none
    take the environment's settings. The options are the keyword arguments of the scheme's backend (S3Storage:
    endpoint_url, region, profile, key_env / secret_env / token_env, the names of the environment variables that
    hold the credentials, and its upload sizes); an unknown one is one line naming `source`. Replaces what was set
    before (None or {}: none), and the backends made so far are made again on next use."""
    checked = {}
    for prefix, opts in (options or {}).items():
        scheme = _scheme(prefix)
        if scheme == "file" or not isinstance(opts, dict):
            raise UserError(f"{source}: {prefix!r}: expected an object-storage URL prefix (s3://BUCKET/...) mapped to "
                            f"its options ({{endpoint_url: ..., region: ...}})")
        cls = _backend(scheme, prefix)
        known = [n for n in inspect.signature(cls).parameters]
        unknown = sorted(set(opts) - set(known))
        if unknown:
            raise UserError(f"{source}: {prefix}: unknown option {unknown[0]!r} (options of {scheme}://: "
                            f"{', '.join(known)})")
        try:  # a value of the wrong form is refused now, not at the first request mid-run (the backend checks it)
            cls(**opts)
        except UserError as e:
            raise UserError(f"{source}: {prefix}: {e}") from None
        checked[_normal_prefix(prefix)] = dict(opts)
    reset_storage()
    _OPTIONS.update(checked)


def load_storage_options(file) -> None:
    """set_storage_options from a YAML (or JSON) file of {URL prefix: {option: value}}; None or "": nothing set. The
    stages call it as they start, with $FIRSTSTAGE_STORAGE_OPTIONS."""
    if not file:
        return
    import yaml

    try:
        options = yaml.safe_load(Path(file).expanduser().read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"FIRSTSTAGE_STORAGE_OPTIONS {file}: cannot read it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else e})") from None
    if not isinstance(options, dict):
        raise UserError(f"FIRSTSTAGE_STORAGE_OPTIONS {file}: expected a mapping of URL prefixes to options")
    set_storage_options(options, f"FIRSTSTAGE_STORAGE_OPTIONS {file}")


def reset_storage() -> None:
    """Forget the storage options and the backends made so far (their clients read the environment again on next use):
    the tests call it around every test that changes the environment."""
    _OPTIONS.clear()
    _INSTANCES.clear()


def storage_for(path) -> Storage:
    """The backend that holds `path`: the local filesystem for a path without a scheme (or file://), the registered
    backend of a URL's scheme, made with the storage options of the longest prefix `path` lies under
    (set_storage_options), else one line naming the scheme (a URL is never taken for a local folder name)."""
    scheme = _scheme(path)
    key = (scheme, _options_prefix(path, scheme))
    if key not in _INSTANCES:
        _INSTANCES[key] = _backend(scheme, path)(**_OPTIONS.get(key[1], {}))
    return _INSTANCES[key]
