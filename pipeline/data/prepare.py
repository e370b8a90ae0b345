"""Turn image folders, path lists or existing tar shards into resized webdataset shards plus manifest.json.

How it stays exactly-once without a coordinator:
  * the inputs are listed and sorted, then split into N deterministic parts (`part K/N` takes every N-th source);
  * a part's samples are cut into fixed chunks of `shard_size` inputs, chunk j -> shard j, whatever gets skipped;
  * a worker writes shard j to a temporary name, then its completion record (.progress/NAME.json), then renames
    the shard. A shard counts as done only when both exist, so a rerun of the same command redoes exactly the
    chunks that were not finished, and never writes a sample twice.
"""

from __future__ import annotations

import glob
import io
import json
import multiprocessing as mp
import os
import re
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import braceexpand
from PIL import Image

from pipeline.data.images import (
    CAPTION_EXTS,
    IMAGE_EXTS,
    BadImage,
    encode_image,
    open_image,
    resize_for_storage,
    target_size,
)
from pipeline.data.shards import (
    MANIFEST,
    ShardWriter,
    atomic_write_json,
    part_manifest_name,
    split_key,
)
from pipeline.io import remove_stale_temporaries
from pipeline.config import PrepareConfig, validate_section
from pipeline.errors import UserError

PROGRESS_DIR = ".progress"


@dataclass
class PrepareOptions(PrepareConfig):
    """The `prepare:` config section plus which of N partitions this process writes."""

    part: int = 0
    num_parts: int = 1

    def check(self) -> None:
        validate_section(PrepareConfig(**{f.name: getattr(self, f.name) for f in fields(PrepareConfig)}), "prepare.")
        if not 0 <= self.part < self.num_parts:
            raise UserError(f"--part must be K/N with 0 <= K < N, got {self.part}/{self.num_parts}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.prefix):
            raise UserError(f"--prefix may contain only letters, digits, '_', '-', '.', got {self.prefix!r}")


def parse_part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"--part must be K/N with 0 <= K < N (e.g. 3/16), got {text!r}")
    return int(m.group(1)), int(m.group(2))


# --------------------------------------------------------------------------------------------------- listing
# An item is a picklable tuple:
#   ("file", key, image_path, {caption_ext: path})
#   ("tar",  key, tar_path,   {ext: (offset, size)})
#   ("bad",  key, where,      reason)                 -- found broken while listing; recorded as skipped


def _sanitize_key(rel: str) -> str:
    """A relative path without extension, usable as a webdataset key (no dot in the basename)."""
    head, _, base = rel.replace(os.sep, "/").rpartition("/")
    base = base.replace(".", "_")
    return f"{head}/{base}" if head else base


def _ext(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def _image_item(path: Path, key: str):
    captions = {}
    for ext in CAPTION_EXTS:
        c = path.with_suffix("." + ext)
        if c.is_file():
            captions[ext] = str(c)
    return ("file", key, str(path), captions)


def expand_tar_spec(spec: str) -> list[str]:
    """A brace pattern or glob of tar paths -> sorted list of existing files."""
    out = []
    for s in braceexpand.braceexpand(spec):
        out += sorted(glob.glob(s)) if any(ch in s for ch in "*?[") else [s]
    return out


def list_sources(inputs: list[str]) -> tuple[str, list]:
    """Classify the inputs and list their sources: ('images', [file items]) or ('tars', [tar paths])."""
    images, tars = [], []
    multi = len(inputs) > 1
    for i, spec in enumerate(inputs):
        prefix = f"in{i}/" if multi else ""
        p = Path(spec).expanduser()
        if p.is_dir():
            found_images, found_tars = [], []
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    ext = _ext(name)
                    if ext in IMAGE_EXTS:
                        found_images.append(Path(root) / name)
                    elif ext == "tar":
                        found_tars.append(str(Path(root) / name))
            if found_images:
                images += [_image_item(f, prefix + _sanitize_key(str(f.relative_to(p).with_suffix("")))) for f in found_images]
            else:
                tars += found_tars
            if not found_images and not found_tars:
                raise UserError(f"--input {spec}: folder holds no images ({', '.join(IMAGE_EXTS)}) and no .tar shards")
        elif ".tar" in spec and not p.is_file() or p.suffix == ".tar":
            found = expand_tar_spec(str(p))
            missing = [f for f in found if not os.path.isfile(f)]
            if not found or missing:
                raise UserError(f"--input {spec}: no such tar shard {missing[0] if missing else spec}")
            tars += found
        elif p.is_file():
            base = p.parent
            for ln, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                f = Path(line).expanduser()
                if not f.is_absolute():  # relative to the list's folder, else to the working directory
                    f = base / f if (base / f).exists() or not f.exists() else f.resolve()
                if _ext(line) == "tar":
                    tars.append(str(f))
                    continue
                try:
                    rel = str(f.resolve().relative_to(base.resolve()).with_suffix(""))
                except ValueError:
                    rel = str(f.with_suffix("")).lstrip("/")
                images.append(_image_item(f, prefix + _sanitize_key(rel)))
        else:
            raise UserError(f"--input {spec}: no such file or folder")
    if images and tars:
        raise UserError("mixing image files and tar shards in one prepare run is not supported; run them separately")
    return ("tars", tars) if tars else ("images", images)


def list_tar(path: str) -> list:
    """Items of one input tar with member offsets; broken members and a broken tail become 'bad' items."""
    samples: dict[str, dict] = {}
    bad = []
    size = os.path.getsize(path)
    expected = 0
    try:
        # ignore_zeros lets tarfile skip a corrupt header block and resynchronise on the next valid member
        with tarfile.open(path, "r:", ignore_zeros=True) as tf:
            for m in tf:
                if m.offset > expected:
                    bad.append(("bad", f"@{expected}", path, f"broken tar member at byte {expected} ({m.offset - expected} bytes skipped)"))
                expected = m.offset_data + ((m.size + 511) // 512) * 512
                if not m.isreg():
                    continue
                ks = split_key(m.name)
                if ks is None or ks[0].startswith("__"):
                    continue
                if m.offset_data + m.size > size:
                    bad.append(("bad", ks[0], path, f"broken tar member {m.name} (truncated)"))
                    continue
                samples.setdefault(ks[0], {})[ks[1]] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        bad.append(("bad", f"@{expected}", path, f"broken tar after byte {expected} ({e})"))
    items = [("tar", key, path, members) for key, members in samples.items()]
    return items + bad


def _list_tar_safe(path: str) -> list:
    try:
        return list_tar(path)
    except Exception as e:  # unreadable file: one skipped entry, never a crash
        return [("bad", "", path, f"unreadable tar ({e})")]


def plan_part(kind: str, sources: list, opts: PrepareOptions, pool=None) -> list:
    """The ordered items of this part."""
    mine = sources[opts.part :: opts.num_parts]
    if kind == "images":
        return mine
    listed = pool.map(_list_tar_safe, mine) if pool is not None else [_list_tar_safe(t) for t in mine]
    return [item for items in listed for item in items]


def shard_name(opts: PrepareOptions, index: int) -> str:
    if opts.num_parts == 1:
        return f"{opts.prefix}-{index:06d}.tar"
    return f"{opts.prefix}-p{opts.part:05d}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------------- worker
def _read_bytes(item) -> tuple[bytes, dict]:
    kind, key, src, extra = item
    if kind == "file":
        with open(src, "rb") as f:
            data = f.read()
        captions = {}
        for ext, cpath in extra.items():
            with open(cpath, "rb") as f:
                captions[ext] = f.read()
        return data, captions
    members = {}
    with open(src, "rb") as f:
        for ext, (offset, size) in extra.items():
            f.seek(offset)
            members[ext] = f.read(size)
    image_exts = [e for e in members if e in IMAGE_EXTS]
    if not image_exts:
        raise BadImage(f"no image member (has {', '.join(sorted(members)) or 'nothing'})")
    captions = {e: members[e] for e in CAPTION_EXTS if e in members}
    return members[image_exts[0]], captions


_KEEP_FORMATS = {"jpg": ("JPEG",), "webp": ("WEBP",), "keep": ("JPEG", "PNG", "WEBP")}
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def convert_one(data: bytes, opts: PrepareOptions) -> tuple[bytes, str, tuple[int, int], tuple[int, int]]:
    """Validate, resize and encode one image -> (bytes, ext, input size, output size). Raises BadImage."""
    if not data:
        raise BadImage("empty file")
    try:
        header = Image.open(io.BytesIO(data))
        w, h, fmt = header.width, header.height, header.format
    except Exception:
        raise BadImage("not an image (unrecognised format)") from None
    if min(w, h) < opts.min_size:
        raise BadImage(f"too small ({w}x{h}, shorter side < --min-size {opts.min_size})")
    tw, th = target_size(w, h, opts.size, opts.resize)
    need_short = max(1, round(min(tw, th)))
    img = open_image(data, min_shorter_side=need_short)  # full decode: truncated files are caught here
    if (tw, th) == (w, h) and fmt in _KEEP_FORMATS[opts.format]:
        return data, _PIL_EXT[fmt], (w, h), (w, h)  # already small enough: keep the original bytes
    out = resize_for_storage(img, opts.size, opts.resize)
    fmt_out = opts.format if opts.format != "keep" else {"JPEG": "jpg", "WEBP": "webp"}.get(fmt, "png")
    encoded, ext = encode_image(out, fmt_out, opts.quality)
    return encoded, ext, (w, h), out.size


def write_shard(task) -> dict:
    """Process one chunk into one shard. Runs in a worker process. Returns the completion record."""
    items, shard_path, record_path, opts = task
    skipped, sizes, shorter = [], Counter(), []
    with ShardWriter(shard_path) as writer:
        for item in items:
            kind, key, src, extra = item
            where = src if kind == "file" else f"{src}:{key}"
            if kind == "bad":
                skipped.append({"input": src, "reason": extra})
                continue
            try:
                data, captions = _read_bytes(item)
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
        record = {
            "name": os.path.basename(shard_path),
            "samples": writer.count,
            "inputs": len(items),
            "skipped": skipped,
            "output_sizes": dict(sizes),
            "input_shorter_side": {"min": min(shorter), "max": max(shorter)} if shorter else None,
        }
        atomic_write_json(record_path, record)  # record first, then the rename in close(): see module doc
    return record


# ---------------------------------------------------------------------------------------------------- driver
def chunks(items: list, size: int) -> Iterator[tuple[int, list]]:
    for j in range(0, len(items), size):
        yield j // size, items[j : j + size]


def prepare(inputs: list[str], output: str | Path, opts: PrepareOptions, progress=None) -> dict:
    """Run (or finish) one part of a prepare job; returns its manifest. `progress(record)` is called per shard."""
    opts.check()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    remove_stale_temporaries(out)
    remove_stale_temporaries(out / PROGRESS_DIR)
    kind, sources = list_sources(inputs)

    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    pool = ctx.Pool(opts.workers) if opts.workers > 1 else None
    try:
        items = plan_part(kind, sources, opts, pool)
        records, todo = {}, []
        for j, chunk in chunks(items, opts.shard_size):
            name = shard_name(opts, j)
            shard, record = out / name, out / PROGRESS_DIR / (name + ".json")
            if shard.is_file() and record.is_file():
                records[j] = json.loads(record.read_text())
                if progress:
                    progress(records[j])
                continue
            shard.unlink(missing_ok=True)  # a shard without its record is from an older, different run
            todo.append((j, (chunk, str(shard), str(record), opts)))
        results = pool.imap(write_shard, [t for _, t in todo]) if pool else map(write_shard, [t for _, t in todo])
        for (j, _), record in zip(todo, results):
            records[j] = record
            if progress:
                progress(record)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    ordered = [records[j] for j in sorted(records)]
    manifest = build_manifest(ordered, opts, kind, len(items))
    name = MANIFEST if opts.num_parts == 1 else part_manifest_name(opts.part, opts.num_parts)
    atomic_write_json(out / name, manifest)
    return manifest


def build_manifest(records: list[dict], opts: PrepareOptions, kind: str, num_items: int) -> dict:
    sizes = Counter()
    for r in records:
        sizes.update(r["output_sizes"])
    shorter = [r["input_shorter_side"] for r in records if r.get("input_shorter_side")]
    skipped = [s for r in records for s in r["skipped"]]
    return {
        "format": "firststage-image-shards/1",
        "input_kind": kind,
        "part": opts.part,
        "num_parts": opts.num_parts,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("workers", "part", "num_parts")},
        "shards": [{"name": r["name"], "samples": r["samples"]} for r in records],
        "total": sum(r["samples"] for r in records),
        "inputs": num_items,
        "output_sizes": dict(sizes.most_common()),
        "input_shorter_side": {"min": min(s["min"] for s in shorter), "max": max(s["max"] for s in shorter)} if shorter else None,
        "skipped_count": len(skipped),
        "skipped": skipped,
    }


def summarize_skips(skipped: list[dict]) -> str:
    reasons = Counter(s["reason"].split(" (")[0] for s in skipped)
    return ", ".join(f"{n} {r}" for r, n in reasons.most_common())
