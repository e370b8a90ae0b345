"""Turn image folders, path lists or existing tar shards into resized webdataset shards plus manifest.json.

How it stays exactly-once without a coordinator:
  * the inputs are listed and sorted, then split into N deterministic parts (`part K/N` takes every N-th source);
  * a part's samples are cut into fixed chunks of `shard_size` inputs, chunk j -> shard j, whatever gets skipped;
  * shard j is one unit of the commit protocol (pipeline.storage.Unit): the tar, then its completion record
    (.progress/NAME.json). A rerun of the same command redoes exactly the chunks whose record is missing or whose
    tar is not the one the record describes (its SHA-256; its ETag on object storage), and never writes a sample
    twice;
  * shard names carry the part K, not N: a folder holds the parts of one N (check_split), and the stage's lock
    keeps a whole job and its parts, or parts of different N, from writing into one folder at once.
The caller (the prepare stage) holds the output folder's lock.

Inputs and output may be on object storage (s3://). An input folder is listed by prefix, a brace pattern of tars is
checked by listing each folder once. An input tar on object storage is streamed once to list its members, and each
shard then reads the byte span its samples occupy in that tar with one ranged GET. A shard whose inputs cannot be
read after the backend's retries is not written (nor its record): the run finishes the other shards and ends with
StorageUnavailable, and the same command again writes the missing ones.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing as mp
import os
import posixpath
import re
import shutil
import signal
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator


from pipeline.data.images import (
    CAPTION_EXTS,
    IMAGE_EXTS,
    BadImage,
    displayed_size,
    encode_image,
    is_plain_rgb,
    open_image,
    read_header,
    resize_for_storage,
    target_size,
)
from pipeline.config import PrepareConfig, validate_section
from pipeline.data.shards import ShardWriter, split_key
from pipeline.errors import StorageUnavailable, Unavailable, UserError
from pipeline.manifest import IMAGE_FORMAT, MANIFEST, part_name, shard_list
from pipeline.sources import Sources, resolve_sources
from pipeline.storage import Unit, as_path, atomic_write_json, remove_dead_temporaries, storage_for
from pipeline.storage.local import NotRegularFile
from pipeline.storage.paths import listing_of, same_place, without_scheme

PROGRESS_DIR = ".progress"


@dataclass
class PrepareOptions(PrepareConfig):
    """The `prepare:` config section plus which of N partitions this process writes."""

    part: int = 0
    num_parts: int = 1

    def check(self) -> None:
        validate_section(PrepareConfig(**{f.name: getattr(self, f.name) for f in fields(PrepareConfig)}), "prepare.")
        if not 0 <= self.part < self.num_parts:
            raise UserError(f"part must be K/N with 0 <= K < N, got {self.part}/{self.num_parts}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.prefix):
            raise UserError(f"prepare.prefix: may contain only letters, digits, '_', '-', '.', got {self.prefix!r}")


# --------------------------------------------------------------------------------------------------- listing
# An item is a picklable tuple:
#   ("file", key, image_path, {caption_ext: path})
#   ("tar",  key, tar_path,   {ext: (offset, size)})
#   ("parquet", key, parquet_path, {"row": i, ...})   -- pipeline.data.parquet
#   ("bad",  key, where,      reason)                 -- found broken while listing; recorded as skipped


def _sanitize_key(rel: str) -> str:
    """A relative path without extension, usable as a webdataset key (no dot in the basename)."""
    head, _, base = rel.replace(os.sep, "/").rpartition("/")
    base = base.replace(".", "_")
    return f"{head}/{base}" if head else base


def _ext(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def _image_item(path: str | Path, raw_key: str, exists=os.path.isfile):
    """("file", key, path, captions) of an image file or object: its captions are the files (objects) of its stem
    with a caption extension that `exists` finds."""
    path = str(path)
    key = safe_key(raw_key)
    captions = {"source_key": raw_key} if key != raw_key else {}
    stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    for ext in CAPTION_EXTS:
        if exists(f"{stem}.{ext}"):
            captions[ext] = f"{stem}.{ext}"
    return ("file", key, path, captions)


INPUT_FILES = tuple(f".{e}" for e in IMAGE_EXTS) + (".tar", ".parquet")  # a file named so is an input, not a list
_NO_INPUT = f"images ({', '.join(IMAGE_EXTS)}), no .tar shards and no .parquet files"


def list_sources(inputs: list[str]) -> tuple[str, Sources]:
    """Classify the inputs and list their sources: ('images', [file items]), ('tars', [tar paths]) or ('parquet',
    [files]). Each input is resolved by pipeline.sources (a folder at any depth, a brace pattern, a list file whose
    entries are relative to its folder, a manifest), local or remote; what its listings saw comes back in `.listed`
    (the inputs' identities, for the fingerprint)."""
    images, tars, listed = [], [], {}
    multi = len(inputs) > 1
    for i, spec in enumerate(inputs):
        prefix = f"in{i}/" if multi else ""
        try:
            found = resolve_sources(spec, suffixes=INPUT_FILES, deep=True, what=_NO_INPUT)
        except UserError as e:
            raise type(e)(f"--input {e}" if str(e).startswith(str(spec)) else f"--input {spec}: {e}") from None
        what = storage_for(found[0]).not_a_file(found[0]) if found.form == "file" else None
        if what:  # a FIFO or a device given as the input itself: never opened (a FIFO would block), one line
            raise UserError(f"--input {spec}: {what}, not a folder, list file, image, tar shard or Parquet file")
        listed.update(found.listed)
        if found.form == "manifest":  # a prepared folder: its shards' identities from one listing of it, not a
            listed.update(listing_of(list(found)))  # request per shard
        found_tars = [u for u in found if _ext(u) in ("tar", "parquet")]
        if found.form == "folder":  # its images (at any depth) or, without images, its tars and Parquet files
            found_images = [u for u in found if _ext(u) in IMAGE_EXTS]
            if not found_images and not found_tars:
                raise UserError(f"--input {spec}: folder holds no {_NO_INPUT}")
            found_tars = [] if found_images else found_tars
        else:  # a list file names images whatever their extension (a FIFO named like a shard: list_tar says so)
            found_images = [u for u in found if u not in found_tars]
        tars += found_tars
        exists = found.listed.__contains__ if found.form == "folder" else _object_exists
        images += [_image_item(u, prefix + _sanitize_key(_relative(u, found.root)), exists) for u in found_images]
    parquet = [t for t in tars if _ext(t) == "parquet"]
    if images and tars or parquet and len(parquet) != len(tars):
        raise UserError("mixing image files, tar shards and Parquet files in one prepare run is not supported; run "
                        "them separately")
    if parquet:
        return "parquet", Sources(dict.fromkeys(parquet), listed)
    return ("tars", Sources(dict.fromkeys(tars), listed)) if tars else ("images", Sources(unique_keys(images), listed))


def _object_exists(path: str) -> bool:
    return storage_for(path).object_exists(path)


def _relative(path: str, root: str | None) -> str:
    """An input's name under the folder it was found in or listed from (its key), without its extension; a path
    outside it: the whole path, without a URL's scheme."""
    under = (root or "").rstrip("/") + "/"
    rel = path[len(under):] if root and path.startswith(under) else without_scheme(path)
    rel = posixpath.normpath(rel.lstrip("/"))
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel


def unique_keys(items: list) -> list:
    """Image items with one sample per key: a file named twice (a list file's repeated line, a folder given twice)
    is one input; a second file under a key already taken (`anim.png` beside `anim.webp`, `a.b.jpg` beside
    `a_b.jpg`) becomes a 'bad' item in its place, listed with its reason."""
    out, paths, keys = [], set(), {}
    for item in items:
        kind, key, src, _ = item
        where = same_place(src)
        if where in paths:
            continue
        paths.add(where)
        if key in keys:
            out.append(("bad", key, src, f"duplicate key ({key}: also the key of {keys[key]}; the first is kept)"))
            continue
        keys[key] = src
        out.append(item)
    return out


def safe_key(raw: str) -> str:
    """A member key that cannot escape the folder it is extracted into and stays within filesystem limits: no `..`,
    `.` or empty components, no leading `/`, components of at most 200 bytes (255 is the usual filesystem limit,
    and the extension follows) and 1000 in all; longer keys keep a readable head and a hash of the whole, and the
    sample's `source_key.txt` member keeps the original."""
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    key = "/".join(parts) or "_"
    if len(key.encode()) > 1000 or any(len(p.encode()) > 200 for p in parts):
        digest = hashlib.sha1(raw.encode()).hexdigest()[:16]
        head = key.encode()[:100].decode("utf-8", errors="ignore").replace("/", "_")
        key = f"{head}_{digest}"
    return key


def list_tar(path: str, max_bytes: int | None = None) -> list:
    """Items of one input tar with member offsets. Broken members and a broken tail, links, folders and duplicate
    keys become 'bad' items with their reason (the first sample of a key is kept), and so does a sample with a
    member over `max_bytes` (prepare.max_file_bytes; its header's size) or a sparse member: never read. A local
    path that is not a regular file (a FIFO, a link to a device) is one 'bad' item, never opened."""
    samples: dict[str, dict] = {}
    raw_keys: dict[str, str] = {}
    unread: dict[str, str] = {}  # key -> why the sample is skipped without reading it
    bad = []
    store = storage_for(path)
    try:
        stream = store.open_read(path)  # where the storage cannot seek: read once, as it arrives
    except NotRegularFile as e:
        return [("bad", "", path, f"not a regular file ({e.kind}; not opened)")]
    size = stream.raw.size
    expected = 0
    last = None
    try:
        # ignore_zeros lets tarfile skip a corrupt header block and resynchronise on the next valid member
        with tarfile.open(fileobj=stream, mode="r:" if store.seekable else "r|", ignore_zeros=True) as tf:
            for m in tf:
                if m.offset > expected:
                    bad.append(("bad", f"@{expected}", path, f"broken tar member at byte {expected} ({m.offset - expected} bytes skipped)"))
                expected = m.offset_data + ((m.size + 511) // 512) * 512
                if not m.isreg():
                    what = "symlink" if m.issym() else "hardlink" if m.islnk() else "directory" if m.isdir() else "special"
                    bad.append(("bad", m.name, path, f"{what} member {m.name} (not followed or extracted)"))
                    continue
                ks = split_key(m.name)
                if ks is None or ks[0].startswith("__"):
                    continue
                key = safe_key(ks[0])
                too_large = max_bytes is not None and m.size > max_bytes
                if not too_large and m.sparse is None and m.offset_data + m.size > size:
                    bad.append(("bad", key, path, f"broken tar member {m.name} (truncated)"))
                    continue
                if key in samples and (key != last or ks[1] in samples[key]):
                    bad.append(("bad", key, path, f"duplicate key {key} (member {m.name}; the first sample is kept)"))
                    continue
                if too_large:
                    unread.setdefault(key, f"too large ({m.size} bytes in member {m.name}, over "
                                           f"prepare.max_file_bytes={max_bytes}; not read)")
                elif m.sparse is not None:  # its stored bytes are not its content: never read by offset
                    unread.setdefault(key, f"sparse tar member {m.name} ({m.size} bytes; not read)")
                samples.setdefault(key, {})[ks[1]] = (m.offset_data, m.size)
                raw_keys[key] = ks[0]
                last = key
    except (tarfile.TarError, OSError, EOFError) as e:
        if store.read_failed(e):
            raise StorageUnavailable(f"{path}: could not be read to list its members ({e}); run the same command "
                                     f"again") from None
        bad.append(("bad", f"@{expected}", path, f"broken tar after byte {expected} ({e})"))
    finally:
        stream.close()
    items = [("bad", key, path, unread[key]) if key in unread else
             ("tar", key, path, {**members, **({"source_key": raw_keys[key]} if raw_keys[key] != key else {})})
             for key, members in samples.items()]
    return items + bad


def _list_tar_safe(path: str, max_bytes: int | None = None) -> list:
    try:
        return list_tar(path, max_bytes)
    except (StorageUnavailable, UserError):
        raise  # object storage failing, or credentials: nothing is planned on a partial listing
    except Exception as e:  # unreadable file: one skipped entry, never a crash
        if storage_for(path).read_failed(e):
            raise StorageUnavailable(f"{path}: could not be read to list its members ({e}); run the same "
                                     f"command again") from None
        return [("bad", "", path, f"unreadable tar ({e})")]


def plan_part(kind: str, sources: list, opts: PrepareOptions, pool=None) -> list:
    """The ordered items of this part. A key that an earlier input tar or Parquet file of the part already has is a
    'bad' item (the first sample is kept): keys are unique within a run."""
    mine = sources[opts.part :: opts.num_parts]
    if kind == "images":
        return mine
    if kind == "parquet":  # the rows of this part's files (pipeline/data/parquet.py)
        from pipeline.data.parquet import list_parquet

        listed = [list_parquet(f, opts.image_column, _sanitize_key, safe_key) for f in mine]
    else:
        list_one = functools.partial(_list_tar_safe, max_bytes=opts.max_file_bytes)
        listed = pool.map(list_one, mine) if pool is not None else [list_one(t) for t in mine]
    out, first = [], {}
    for item in (item for items in listed for item in items):
        kind_, key, src, _ = item
        if kind_ in ("tar", "parquet") and first.setdefault(key, src) != src:
            item = ("bad", key, src, f"duplicate key ({key}: also in {first[key]}; the first sample is kept)")
        out.append(item)
    return out


def output_shard_name(opts: PrepareOptions, index: int) -> str:
    if opts.num_parts == 1:
        return f"{opts.prefix}-{index:06d}.tar"
    return f"{opts.prefix}-p{opts.part:05d}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------------- worker
def _read_bytes(item, spans: dict | None = None, max_bytes: int | None = None, rows=None) -> tuple[bytes, dict]:
    """(image bytes, other members to store: captions, and the original key when it had to be made safe).
    `spans`: the fetched byte spans of object-store tars (`fetch_spans`). `max_bytes`: files are read only up to
    it (BadImage beyond; tar members over it never get here, list_tar made them 'bad' items). `rows`: the shard's
    ParquetRows."""
    kind, key, src, extra = item
    if kind == "parquet":
        return rows.read(item)
    kept = {"source_key.txt": extra["source_key"].encode()} if "source_key" in extra else {}
    extra = {k: v for k, v in extra.items() if k != "source_key"}
    if kind == "file":
        data = _read_file(src, max_bytes)
        for ext, cpath in extra.items():
            kept[ext] = _read_file(cpath, max_bytes)
        return data, kept
    members = {}
    start, f = (spans or {}).get(src, (0, None))
    with storage_for(src).open_read(src) if f is None else contextlib.nullcontext(f) as f:
        for ext, (offset, size) in extra.items():
            f.seek(offset - start)
            members[ext] = f.read(size)
    image_exts = [e for e in members if e in IMAGE_EXTS]
    if not image_exts:
        raise BadImage(f"no image member (has {', '.join(sorted(members)) or 'nothing'})")
    kept.update({e: members[e] for e in CAPTION_EXTS if e in members})
    return members[image_exts[0]], kept


def _read_file(path: str, max_bytes: int | None = None) -> bytes:
    """A file's or object's bytes. A local path that is not a regular file (a FIFO would block the open, a link to
    /dev/zero would never end) is BadImage without being read, and so is anything over `max_bytes`: at most
    max_bytes + 1 bytes are read to tell."""
    store = storage_for(path)
    try:
        with store.open_read(path) as f:
            if max_bytes is not None and f.raw.size > max_bytes:  # refused from its size: not a byte read
                raise BadImage(f"too large ({f.raw.size} bytes, over prepare.max_file_bytes={max_bytes}; not read)")
            return _read_at_most(f, max_bytes)
    except NotRegularFile as e:
        raise BadImage(f"not a regular file ({e.kind}; not read)") from None
    except (FileNotFoundError, BadImage):
        raise
    except Exception as e:
        if store.read_failed(e):  # the backend's retries are spent: not the image's fault
            raise StorageUnavailable(f"{path}: {e}") from None
        raise


def _read_at_most(f, max_bytes: int | None) -> bytes:
    """The stream's bytes, or BadImage once there are more than `max_bytes` (a file that grew after its stat)."""
    data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise BadImage(f"too large (over prepare.max_file_bytes={max_bytes} bytes; not read past them)")
    return data


def fetch_spans(items: list) -> dict:
    """The members a chunk needs from each tar whose storage cannot seek (object storage), as one ranged GET per tar
    (the span from its first to its last member) into a local temporary file: {tar URL: (span start, file)}."""
    spans: dict[str, list[int]] = {}
    for kind, _, src, extra in items:
        if kind == "tar" and not storage_for(src).seekable:
            for v in extra.values():
                if isinstance(v, tuple):
                    lo, hi = spans.setdefault(src, [v[0], v[0] + v[1]])
                    spans[src] = [min(lo, v[0]), max(hi, v[0] + v[1])]
    out = {}
    try:
        for src, (lo, hi) in spans.items():
            f = tempfile.TemporaryFile()
            out[src] = (lo, f)
            with storage_for(src).open_range(src, lo, hi - lo) as r:
                shutil.copyfileobj(r, f, 2**20)
    except BaseException as e:
        for _, f in out.values():
            f.close()
        if isinstance(e, Exception) and not isinstance(e, FileNotFoundError):  # the endpoint gone, too
            raise StorageUnavailable(f"{src}: {e}") from None
        raise
    return out


_KEEP_FORMATS = {"jpg": ("JPEG",), "webp": ("WEBP",), "keep": ("JPEG", "PNG", "WEBP")}
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def convert_one(data: bytes, opts: PrepareOptions) -> tuple[bytes, str, tuple[int, int], tuple[int, int]]:
    """Validate, resize and encode one image -> (bytes, ext, input size, output size). Raises BadImage.
    Sizes are as displayed (EXIF orientation applied); the original bytes are kept only for an 8-bit RGB image
    without rotation or transparency that needs no resizing and is already in the target format."""
    header = read_header(data)
    w, h = displayed_size(header)
    if w * h > opts.max_pixels and header.format != "JPEG":  # before any decode: PNG cannot decode at reduced scale
        raise BadImage(f"too many pixels: {w} x {h} > {opts.max_pixels} (prepare.max_pixels)")
    if min(w, h) < opts.min_size:
        raise BadImage(f"too small ({w}x{h}, shorter side < --min-size {opts.min_size})")
    tw, th = target_size(w, h, opts.size, opts.resize)
    need_short = max(1, round(min(tw, th)))
    # its own parse, not `header`: the decode changes the image object that the keep-the-bytes check reads below
    img = open_image(data, min_shorter_side=need_short, max_pixels=opts.max_pixels)  # truncated files fail here
    if (tw, th) == (w, h) and header.format in _KEEP_FORMATS[opts.format] and is_plain_rgb(header):
        return data, _PIL_EXT[header.format], (w, h), (w, h)  # already right: keep the original bytes
    out = resize_for_storage(img, opts.size, opts.resize)
    fmt_out = opts.format if opts.format != "keep" else {"JPEG": "jpg", "WEBP": "webp"}.get(header.format, "png")
    encoded, ext = encode_image(out, fmt_out, opts.quality)
    return encoded, ext, (w, h), out.size


def shard_unit(out: Path, name: str) -> Unit:
    """Output shard NAME as a unit of the commit protocol: the tar, then .progress/NAME.json."""
    return Unit(out / PROGRESS_DIR / (name + ".json"), [out / name])


def write_shard(task) -> dict:
    """Process one chunk into one shard. Runs in a worker process. Returns the completion record, or
    Unavailable(name, why) when its inputs could not be read from the storage (nothing is written then)."""
    items, out, name, opts = task
    unit = shard_unit(as_path(out), name)
    try:
        spans = fetch_spans(items)
    except StorageUnavailable as e:
        return Unavailable(name, str(e))
    writer = ShardWriter(unit.staging(as_path(out) / name))
    skipped, sizes, shorter = [], Counter(), []
    rows = None
    if any(item[0] == "parquet" for item in items):
        from pipeline.data.parquet import ParquetRows

        rows = ParquetRows()
    try:
        for item in items:
            kind, key, src, extra = item
            where = src if kind == "file" else f"{src}:{extra['row']}" if kind == "parquet" else f"{src}:{key}"
            if kind == "bad":
                skipped.append({"input": src, "reason": extra})
                continue
            try:
                data, captions = _read_bytes(item, spans, opts.max_file_bytes, rows)
                encoded, ext, in_size, out_size = convert_one(data, opts)
            except BadImage as e:
                skipped.append({"input": where, "reason": str(e)})
                continue
            except OSError as e:
                skipped.append({"input": where, "reason": f"cannot read ({e.strerror or e})"})
                continue
            writer.write({"__key__": key, ext: encoded, **captions})
            sizes[f"{out_size[0]}x{out_size[1]}"] += 1
            shorter.append(min(in_size))
        writer.close()
    except StorageUnavailable as e:
        writer.abort()
        return Unavailable(name, str(e))
    except BaseException:
        writer.abort()
        raise
    finally:
        for _, f in spans.values():
            f.close()
    record = {
        "name": name,
        "samples": writer.count,
        "inputs": len(items),
        "skipped": skipped,
        "output_sizes": dict(sizes),
        "input_shorter_side": {"min": min(shorter), "max": max(shorter)} if shorter else None,
    }
    unit.put_staged()
    record["files"] = unit.files(etag=True)  # the tar's size and SHA-256 (and its ETag on object storage)
    unit.commit(record)
    return record


# ---------------------------------------------------------------------------------------------------- driver
def chunks(items: list, size: int) -> Iterator[tuple[int, list]]:
    for j in range(0, len(items), size):
        yield j // size, items[j : j + size]


def _die_with_parent() -> None:
    """Pool workers get SIGKILL when the main process dies (Linux), so a killed run leaves no writer behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def fingerprint(items: list, opts: PrepareOptions, listed: dict | None = None) -> dict:
    """What a run's output depends on: the options, and per shard a hash of its inputs (names, and each input's
    identity by its storage: size and mtime locally, size and ETag on object storage, from `listed`, the listings of
    list_sources, when they had it)."""
    stats: dict[str, tuple] = {}

    def stat(path: str) -> tuple:
        if path not in stats:
            try:
                found = storage_for(path).identity(path, (listed or {}).get(path))
            except UserError:
                found = None
            stats[path] = tuple(found.values()) if found else (-1, -1)
        return stats[path]

    chunk_hashes = []
    for _, chunk in chunks(items, opts.shard_size):
        h = hashlib.sha1()
        for kind, key, src, extra in chunk:
            paths = [src] + ([v for v in extra.values() if isinstance(v, str)] if kind == "file" else [])
            h.update(repr((kind, key, src, [stat(q) for q in paths] if kind != "bad" else extra)).encode())
        chunk_hashes.append(h.hexdigest()[:16])
    options = {k: v for k, v in asdict(opts).items() if k not in ("workers", "part", "num_parts")}
    return {"options": options, "inputs": len(items), "shards": chunk_hashes}


def check_fingerprint(out: Path, fp: dict, opts: PrepareOptions, overwrite: bool) -> None:
    """Same inputs and options: resume. Anything else is refused, naming what differs, unless --overwrite (which
    removes this part's shards, records and manifest first)."""
    path = out / PROGRESS_DIR / part_name("fingerprint", opts.part, opts.num_parts, ".json")
    if path.is_file():
        old = json.loads(path.read_text())
        # a key that a run of an older version did not record had its default then (prepare.max_file_bytes)
        then = {**asdict(PrepareConfig()), **old["options"]}
        diff = [f"{k} {then.get(k)!r} then, {v!r} now" for k, v in fp["options"].items() if then.get(k) != v]
        if not diff and old["shards"] != fp["shards"]:
            first = next((j for j, (a, b) in enumerate(zip(old["shards"], fp["shards"])) if a != b),
                         min(len(old["shards"]), len(fp["shards"])))
            diff = [f"the inputs ({old['inputs']} then, {fp['inputs']} now; {output_shard_name(opts, first)} is the first "
                    f"shard whose inputs differ)"]
        if diff and not overwrite:
            raise UserError(f"{out} holds shards of another prepare run ({'; '.join(diff)}); use another "
                            f"folder, the same inputs and options, or --overwrite")
        if diff:
            clear_part(out, opts)
    atomic_write_json(path, fp)


def clear_part(out: Path, opts: PrepareOptions) -> None:
    """Remove what this part wrote before (shards with a record, the records, its manifest); nothing else (not the
    shards of the job's other parts, which may be running)."""
    ours = re.compile(re.escape(output_shard_name(opts, 0)[: -len("000000.tar")]) + r"\d{6}\.tar")
    for rec in (out / PROGRESS_DIR).glob("*.tar.json"):
        name = rec.name[: -len(".json")]
        if ours.fullmatch(name):
            shard_unit(out, name).undo()
    (out / part_name("manifest", opts.part, opts.num_parts, ".json")).unlink(missing_ok=True)


_FINGERPRINT = re.compile(r"fingerprint(?:\.part-(\d+)-of-(\d+))?\.json")


def check_split(out: Path, opts: PrepareOptions, overwrite: bool) -> None:
    """One folder holds one split of a job (its number of parts N): shard names carry the part K, not N, so the
    parts of another N would take the shards of the same K for theirs. Another N's fingerprints are refused in one
    line, unless --overwrite, which removes what those parts wrote (no run of them is alive: the stage's lock
    excludes it) and the merged manifest."""
    found = {p.name: _FINGERPRINT.fullmatch(p.name) for p in (out / PROGRESS_DIR).glob("fingerprint*.json")}
    other = {name: (int(m.group(1) or 0), int(m.group(2) or 1)) for name, m in found.items()
             if m and int(m.group(2) or 1) != opts.num_parts}
    if not other:
        return
    n = next(iter(other.values()))[1]
    if not overwrite:
        then = "a whole-job prepare (no --part)" if n == 1 else f"a prepare split into {n} parts (--part K/{n})"
        now = "a whole job" if opts.num_parts == 1 else f"part {opts.part}/{opts.num_parts}"
        raise UserError(f"{out} holds the shards of {then} ({PROGRESS_DIR}/{next(iter(other))}), and this run is "
                        f"{now}; use {'no --part' if n == 1 else f'--part K/{n}'}, another folder, or --overwrite "
                        f"to replace them")
    for name, (k, n) in other.items():
        path = out / PROGRESS_DIR / name
        prefix = json.loads(path.read_text()).get("options", {}).get("prefix", opts.prefix)
        clear_part(out, PrepareOptions(prefix=prefix, part=k, num_parts=n))
        path.unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the merged manifest of those parts


def prepare(inputs: list[str], output: str | Path, opts: PrepareOptions, progress=None, overwrite: bool = False) -> dict:
    """Run (or finish) one part of a prepare job; returns its manifest. `progress(record)` is called per shard.
    The caller holds the output folder's lock; a rerun resumes only with the same inputs and options."""
    opts.check()
    out = as_path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    kind, sources = list_sources(inputs)

    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    pool = ctx.Pool(opts.workers, initializer=_die_with_parent) if opts.workers > 1 else None
    try:
        items = plan_part(kind, sources, opts, pool)
        # what a killed run of this part left: temporaries of this part's own files whose writer is dead (the parts
        # of one job share the folder, and another part's live writes are not ours to remove)
        names = [output_shard_name(opts, j) for j, _ in chunks(items, opts.shard_size)]
        remove_dead_temporaries(out, names + [part_name("manifest", opts.part, opts.num_parts, ".json")])
        remove_dead_temporaries(out / PROGRESS_DIR, [n + ".json" for n in names] +
                                [part_name("fingerprint", opts.part, opts.num_parts, ".json")])
        fp = fingerprint(items, opts, sources.listed)
        check_split(out, opts, overwrite)
        check_fingerprint(out, fp, opts, overwrite)
        records, todo, unavailable = {}, [], []
        listed = _listed_units(out)
        for j, chunk in chunks(items, opts.shard_size):
            name = output_shard_name(opts, j)
            unit = shard_unit(out, name)
            record = unit.read_record(listed=True) if str(out / name) in listed else None
            if record is not None and not unit.intact(record, listed):
                unit.undo()  # its tar is not the one its record describes (another run replaced it): written again
                record = None
            if record is not None:
                records[j] = record
                if progress:
                    progress(records[j])
                continue
            todo.append((j, (chunk, str(out), name, opts)))  # not done (a killed run's tar is overwritten)
        results = pool.imap(write_shard, [t for _, t in todo]) if pool else map(write_shard, [t for _, t in todo])
        for (j, _), record in zip(todo, results):
            if isinstance(record, Unavailable):  # not written: its inputs could not be read; a rerun writes it
                unavailable.append(record)
                continue
            records[j] = record
            if progress:
                progress(record)
    finally:
        if pool is not None:
            pool.terminate() if sys.exc_info()[0] else pool.close()
            pool.join()
    if unavailable:
        raise StorageUnavailable(f"{len(unavailable)} of {len(todo)} shards not written: their inputs could not be "
                                 f"read from object storage after every retry (first: {unavailable[0].shard}: "
                                 f"{unavailable[0].why}); the others are complete, run the same command "
                                 f"again to write these")

    ordered = [records[j] for j in sorted(records)]
    manifest = build_manifest(ordered, opts, kind, len(items))
    name = part_name("manifest", opts.part, opts.num_parts, ".json")
    atomic_write_json(out / name, manifest)
    return manifest


def _listed_units(out) -> dict[str, tuple]:
    """{tar path: (size, ETag)} of the shards whose tar and record both exist (two listings, instead of three
    requests per shard on object storage for the shards not done yet)."""
    records = {p.name[: -len(".json")] for p in (out / PROGRESS_DIR).glob("*.tar.json")}
    tars = storage_for(str(out)).entries(str(out))[0]
    return {url: entry for url, entry in tars.items() if url.rsplit("/", 1)[-1] in records}


def build_manifest(records: list[dict], opts: PrepareOptions, kind: str, num_items: int) -> dict:
    sizes = Counter()
    for r in records:
        sizes.update(r["output_sizes"])
    shorter = [r["input_shorter_side"] for r in records if r.get("input_shorter_side")]
    return {
        "format": IMAGE_FORMAT,
        "input_kind": kind,
        "part": opts.part,
        "num_parts": opts.num_parts,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("workers", "part", "num_parts")},
        **shard_list(records),
        "inputs": num_items,
        "output_sizes": dict(sizes.most_common()),
        "input_shorter_side": {"min": min(s["min"] for s in shorter), "max": max(s["max"] for s in shorter)} if shorter else None,
    }
