"""Parquet input for prepare: files whose image column holds the encoded bytes (Hugging Face `datasets` writes a
struct {"bytes", "path"}; img2dataset a binary column), local or on object storage (read from a local copy).

  the image column   found by type: a binary column, or a struct with a binary `bytes` field (a name such as
                     image / jpg / png chooses between several); or named with prepare.image_column
  the key            the struct's `path` without its extension (the image's file name, as in a folder of the same
                     images), else FILE-STEM/ROW; a key twice in a file: the first row is kept
  the caption        the text column (caption / text / txt / prompt, or the only one) becomes the sample's `txt`;
                     the other plain columns (text, numbers, booleans), when there are any, its `json`
  reading            listing reads the footer and the key column only; a shard streams its rows in batches of 16
                     through the row groups in order, pages read through a 64 KiB buffer on one thread: memory
                     follows the row group's size, not the file's (with pyarrow's defaults, which read ahead, it
                     grew with the file; benchmarks/parquet.py measures it)

A file of URLs only is refused in one line: download the images with img2dataset first. Needs pyarrow (the parquet
extra), one line when it is missing.
"""

from __future__ import annotations

import json
import os

from pipeline.errors import UserError

TEXT_NAMES = ("caption", "text", "txt", "prompt", "captions", "alt", "description")
IMAGE_NAMES = ("image", "jpg", "jpeg", "png", "webp", "img")
URL_NAMES = ("url", "image_url", "img_url", "URL", "link")
BATCH_ROWS = 16


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet input needs pyarrow: pip install 'firststage[parquet]'") from None
    return pa, pq


def _local(path: str) -> str:
    """A local file of `path` for pyarrow (the path itself, or a checked copy of an object)."""
    from pipeline.storage import storage_for

    return str(storage_for(path).local_file(path))


def _is_binary(pa, t) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_text(pa, t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def columns(schema, path: str, image_column: str = "") -> tuple[str, bool, str | None, list[str]]:
    """(image column, whether it is a {bytes, path} struct, caption column or None, other plain columns)."""
    pa, _ = _pyarrow()
    fields = {f.name: f.type for f in schema}

    def image_like(t) -> bool:
        return _is_binary(pa, t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
                                     and _is_binary(pa, t.field("bytes").type))

    if image_column:
        if image_column not in fields:
            raise UserError(f"{path}: no column {image_column} (prepare.image_column); it has {', '.join(fields)}")
        if not image_like(fields[image_column]):
            raise UserError(f"{path}: column {image_column} (prepare.image_column) is {fields[image_column]}, not "
                            f"encoded image bytes (binary, or a struct with bytes)")
        image = image_column
    else:
        found = [n for n, t in fields.items() if image_like(t)]
        named = [n for n in found if n.lower() in IMAGE_NAMES]
        if not found:
            urls = [n for n, t in fields.items() if _is_text(pa, t) and n in URL_NAMES]
            if urls:
                raise UserError(f"{path}: a Parquet file of image URLs (column {urls[0]}), not of images; download "
                                f"them first: img2dataset --url_list {path} --input_format parquet --url_col {urls[0]} "
                                f"--output_format webdataset, then prepare its tars")
            raise UserError(f"{path}: no column of encoded images (binary, or a struct with bytes) among "
                            f"{', '.join(f'{n} ({t})' for n, t in fields.items())}")
        if len(found) > 1 and len(named) != 1:
            raise UserError(f"{path}: several columns could hold the images ({', '.join(found)}); name one with "
                            f"prepare.image_column")
        image = named[0] if len(found) > 1 else found[0]
    struct = pa.types.is_struct(fields[image])
    texts = [n for n, t in fields.items() if n != image and _is_text(pa, t)]
    caption = next((n for n in texts if n.lower() in TEXT_NAMES), texts[0] if len(texts) == 1 else None)
    plain = [n for n, t in fields.items() if n not in (image, caption) and (
        _is_text(pa, t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t))]
    return image, struct, caption, plain


def list_parquet(path: str, image_column: str, sanitize, safe_key, prefix: str = "") -> list:
    """The items of one Parquet file: ("parquet", key, path, {"row": i, ...}), and ("bad", ...) for a file that
    cannot be read or a key seen before in it; `sanitize` and `safe_key` make keys as prepare makes a folder's."""
    _, pq = _pyarrow()
    try:
        pf = pq.ParquetFile(_local(path))
    except UserError:
        raise
    except Exception as e:  # not Parquet, truncated: one skipped entry
        return [("bad", "", path, f"unreadable Parquet file ({type(e).__name__}: {str(e)[:200]})")]
    image, struct, caption, plain = columns(pf.schema_arrow, path, image_column)
    names = pf.read(columns=[f"{image}.path"]).column(0).to_pylist() if struct and \
        pf.schema_arrow.field(image).type.get_field_index("path") >= 0 else [None] * pf.metadata.num_rows
    stem = os.path.basename(path).rsplit(".", 1)[0]
    how = {"image": image, "struct": struct, "caption": caption, "plain": plain}
    items, seen = [], set()
    for row, name in enumerate(names):
        name = name.get("path") if isinstance(name, dict) else name
        raw = prefix + (sanitize(os.path.splitext(name)[0]) if name
                        else f"{sanitize(stem)}/{row:09d}")
        key = safe_key(raw)
        if key in seen:
            items.append(("bad", key, f"{path}:{row}", f"duplicate key {key} (row {row}; the first row is kept)"))
            continue
        seen.add(key)
        items.append(("parquet", key, path, {"row": row, **how, **({"source_key": raw} if raw != key else {})}))
    return items


class ParquetRows:
    """A shard's rows, read in order: each file's batches are streamed once from the first row asked for, and only
    the current batch is held."""

    def __init__(self):
        self.open: dict[str, list] = {}  # path -> [batch iterator, first row of the batch, batch as Python rows]

    def read(self, item) -> tuple[bytes, dict]:
        from pipeline.data.images import BadImage

        _, key, path, how = item
        row = how["row"]
        state = self.open.get(path)
        if state is None or row < state[1]:
            state = self.open[path] = self._start(path, how, row)
        it, first, rows = state
        while row >= first + len(rows):
            first += len(rows)
            batch = next(it, None)
            if batch is None:
                raise BadImage(f"row {row} is not in {path}")
            rows = batch.to_pylist()
            state[1:] = [first, rows]
        values = rows[row - first]
        data = values[how["image"]]
        if isinstance(data, dict):
            data = data.get("bytes")
        if not data:
            raise BadImage(f"row {row} of {path} has no image bytes")
        kept = {"source_key.txt": how["source_key"].encode()} if "source_key" in how else {}
        if how["caption"] and values.get(how["caption"]) is not None:
            kept["txt"] = str(values[how["caption"]]).encode()
        extra = {n: values[n] for n in how["plain"] if values.get(n) is not None}
        if extra:
            kept["json"] = json.dumps(extra, sort_keys=True).encode()
        return bytes(data), kept

    def _start(self, path: str, how: dict, row: int) -> list:
        _, pq = _pyarrow()
        pf = pq.ParquetFile(_local(path), buffer_size=1 << 16, pre_buffer=False)
        first, group = 0, 0
        while group < pf.metadata.num_row_groups and first + pf.metadata.row_group(group).num_rows <= row:
            first += pf.metadata.row_group(group).num_rows
            group += 1
        cols = [how["image"]] + ([how["caption"]] if how["caption"] else []) + how["plain"]
        it = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=list(range(group, pf.metadata.num_row_groups)),
                             columns=cols, use_threads=False)
        return [it, first, []]
