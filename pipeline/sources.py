"""One resolver of sources: what a user names as input (--input, --data, data.train, data.val, a LatentDataset's
path) -> the list of files to read, the same way for prepare, the training loader, evaluate, encode and LatentDataset,
local or on object storage.

The forms, each local or remote (a URL of a storage backend):
  * a list or tuple of the forms below: their sources, in order;
  * a brace pattern, with shell wildcards in file and folder names (`shards/part-{0..3}/*.tar`): the paths, checked to
    exist by listing each folder once (one request per folder, never one per shard);
  * a folder: the shards its manifest.json (or its part manifests) lists, else its files (`suffixes` directly in it,
    not hidden ones; or with `deep` every file at any depth: prepare's folders of images);
  * a manifest.json: the shards it lists, relative to its folder;
  * a file named like a source (`suffixes`): itself;
  * any other file: a list file, one entry a line (blank lines and `#` comments skipped). An entry that is a URL or an
    absolute path is taken as it is; any other entry is relative to the list file's folder (always: never to the
    working directory). `pipe:COMMAND` entries (webdataset runs COMMAND in a shell) only with `allow_pipe`.

What listings saw on the way (size and ETag of each file) comes back with the sources (`Sources.listed`), so that a
caller that needs the inputs' identities (prepare's fingerprint) asks the store again only for what was not listed.
Torch-free: the stages' first checks call it.
"""

from __future__ import annotations

from pipeline.errors import UserError
from pipeline.manifest import MANIFEST, part_manifests, read_manifest
from pipeline.storage import as_path, storage_for
from pipeline.storage.paths import beside, expand_pattern, has_wildcards, listing_of, missing_objects

SHARDS = (".tar",)  # what the loaders read


class Sources(list):
    """The resolved paths / URLs (a list), and what was learned on the way:
    `listed`: {path: (size, ETag)} of the files a listing showed (a folder's);
    `samples`: {path: samples} of the shards a manifest listed;
    `root`: the folder relative names come from (a folder given, a list file's or manifest's folder, a file's
    folder), or None (a pattern, several specs);
    `form`: what was given: "folder", "manifest", "list", "file", "pattern", "pipe" or "several";
    `manifests`: {manifest path: manifest} of the manifests read."""

    def __init__(self, paths=(), listed=None, samples=None, root: str | None = None, form: str = "several"):
        super().__init__(paths)
        self.listed: dict[str, tuple[int, str]] = dict(listed or {})
        self.samples: dict[str, int] = dict(samples or {})
        self.root, self.form = root, form
        self.manifests: dict[str, dict] = {}

    def extend_with(self, other: "Sources") -> None:
        self.extend(other)
        self.listed.update(other.listed)
        self.samples.update(other.samples)
        self.manifests.update(other.manifests)


def check_source(url: str, allow_pipe: bool = False) -> None:
    """A source that is not a plain path: `pipe:COMMAND` only with `allow_pipe` (data.allow_pipe=true); a URL only of
    a scheme a storage backend serves (one line otherwise)."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise UserError(f"{url}: a pipe: source runs a shell command and is refused; name shard files, or set "
                            f"data.allow_pipe=true if you mean it")
    else:
        storage_for(url)  # an unknown scheme is refused here, naming it


def resolve_sources(spec, allow_pipe: bool = False, suffixes: tuple[str, ...] = SHARDS, deep: bool = False,
                    empty: bool = False, what: str = ".tar shards", format: str | None = None) -> Sources:
    """The sources `spec` names (see the module's docstring). `suffixes`: the kinds of file the caller reads (a file
    named so is a source, not a list file; a folder without a manifest gives those in it); `deep`: a folder's files
    at any depth, every kind (the caller sorts them: prepare); `empty`: also the shards a manifest says are empty;
    `what`: the sources in words, for messages; `format`: the manifests' (pipeline.manifest.read_manifest). A
    Sources is already resolved: it is returned as it is (a caller hands on what it resolved, nothing is asked twice)."""
    if isinstance(spec, Sources):
        return spec
    if isinstance(spec, (list, tuple)):
        out = Sources()
        for s in spec:
            out.extend_with(resolve_sources(s, allow_pipe, suffixes, deep, empty, what, format))
        return out
    spec = str(spec)
    if not spec:
        raise UserError("no shards given (data.train / data.val / --data is empty)")
    if spec.startswith("pipe:"):
        check_source(spec, allow_pipe)
        return Sources(expand_pattern(spec), form="pipe")
    check_source(spec)
    if has_wildcards(spec):  # a pattern: no folder or list file to look for
        return _existing(expand_pattern(spec), spec)
    p = as_path(spec).expanduser()
    spec = str(p)
    store = storage_for(spec)
    if store.folder_exists(spec):
        return _folder(spec, suffixes, deep, empty, what, format)
    if not store.object_exists(spec):  # one request on object storage
        if store.exists(spec):  # a FIFO, a device: the caller says what it is, nothing opens it here
            return Sources([spec], root=str(p.parent), form="file")
        raise UserError(f"{spec}: no such file or folder")
    name = p.name.lower()
    if name.endswith(".json"):
        return _manifest(spec, empty, format)
    if name.endswith(suffixes):
        return Sources([spec], root=str(p.parent), form="file")
    from pipeline.data.images import IMAGE_EXTS  # (no torch)

    if name.rsplit(".", 1)[-1] in IMAGE_EXTS:
        raise UserError(f"{spec} is an image, not shards: turn images into shards with firststage prepare --input "
                        f"FOLDER --output SHARDS, then point at SHARDS")
    return _list_file(spec, allow_pipe, what)


def _existing(paths: list[str], spec: str) -> Sources:
    """Paths that all exist (one listing per folder), or one line naming the first that does not."""
    listed = listing_of(paths)
    missing = missing_objects(paths, listed)
    if not paths or missing:
        raise UserError(f"shard not found: {missing[0] if missing else spec}")
    return Sources(paths, listed=listed, form="pattern")


def _folder(folder: str, suffixes: tuple[str, ...], deep: bool, empty: bool, what: str, format: str | None) -> Sources:
    p = as_path(folder)
    if (p / MANIFEST).is_file():
        return _manifest(str(p / MANIFEST), empty, format)
    parts = part_manifests(p)
    if parts:
        out = Sources(root=folder, form="manifest")
        for m in parts:
            out.extend_with(_manifest(str(m), empty, format))
        return out
    store = storage_for(folder)
    try:
        listed = store.walk(folder) if deep else store.entries(folder)[0]
    except PermissionError as e:  # a folder this user may not read
        raise UserError(f"{folder}: cannot list it ({e.strerror or e})") from None
    # directly in it: its files named like a source, not its hidden ones (glob's *.tar: macOS's ._NAME.tar beside
    # each copied shard, a partial .NAME.tar)
    found = list(listed) if deep else [u for u in listed if u.lower().endswith(suffixes)
                                       and not u.rsplit("/", 1)[-1].startswith(".")]
    if not found:
        raise UserError(f"{folder}: folder holds no {what} and no manifest.json")
    return Sources(found, listed=listed, root=folder, form="folder")


def _manifest(path: str, empty: bool, format: str | None) -> Sources:
    """The shards a manifest lists (those with samples, unless `empty`), relative to its folder."""
    folder = as_path(path).parent
    manifest = read_manifest(path, format)
    samples = {str(folder / s["name"]): int(s.get("samples", 1)) for s in manifest["shards"]}
    out = Sources([u for u, n in samples.items() if empty or n > 0], samples=samples, root=str(folder),
                  form="manifest")
    out.manifests[str(path)] = manifest
    return out


def _list_file(path: str, allow_pipe: bool, what: str) -> Sources:
    """The entries of a list file: URLs and absolute paths as they are, the others relative to its folder."""
    try:
        text = storage_for(path).read_bytes(path).decode("utf-8-sig")  # a byte-order mark (Notepad) is no name
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file listing {what} (and not a .tar, folder or manifest.json)") from None
    folder = str(as_path(path).parent)
    out = Sources(root=folder, form="list")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("pipe:"):
            check_source(line, allow_pipe)
            out.append(line)
            continue
        entry = beside(folder, line)
        check_source(entry)
        out.append(entry)
    if not out:  # nothing to read is a mistake, not an empty dataset
        raise UserError(f"{path}: lists no {what}")
    return out
