"""Parquet input to prepare: Hugging Face `datasets`' layout (an image struct {bytes, path}, a text column) gives the
samples and captions that the same images in a folder give; URL-only files and a missing pyarrow are one line."""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import read_tar_samples, write_images
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.errors import UserError


def hf_parquet(folder, out, row_group_size: int) -> None:
    """The images and captions of `folder` as `datasets` writes them: image {bytes, path}, text."""
    images = sorted(folder.glob("*.jpg"))
    table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in images],
                      "text": [p.with_suffix(".txt").read_text() for p in images]})
    pq.write_table(table, out, row_group_size=row_group_size)


def test_parquet_in_the_datasets_layout_gives_the_samples_and_captions_of_the_folder(tmp_path):
    write_images(tmp_path / "images", 11, size=(72, 56), captions=True)
    (tmp_path / "pq").mkdir()
    hf_parquet(tmp_path / "images", tmp_path / "pq" / "train-00000-of-00001.parquet", row_group_size=3)
    opts = dict(size=32, shard_size=4)
    prepare([str(tmp_path / "images")], tmp_path / "from-folder", PrepareOptions(**opts))
    expected = read_tar_samples(tmp_path / "from-folder")
    assert len(expected) == 11 and all(set(s) == {"jpg", "txt"} for s in expected.values())
    for spec in (tmp_path / "pq", tmp_path / "pq" / "*.parquet", tmp_path / "pq" / "train-00000-of-00001.parquet"):
        out = tmp_path / f"from-{len(str(spec))}"
        m = prepare([str(spec)], out, PrepareOptions(**opts))
        assert m["input_kind"] == "parquet" and m["total"] == 11
        assert read_tar_samples(out) == expected  # the same keys, image bytes and captions


def test_keys_are_unique_across_parquet_files_and_a_dotted_folder_keeps_its_name(tmp_path):
    """Two `datasets` shard files whose image paths repeat (`0.jpg` in each): the second file's rows are skipped and
    listed as duplicate keys, never written twice; a path `set.v2/img_1.jpg` is key `set.v2/img_1` (before: both
    files' rows were written, and `set.v2/img_1`, `set.v2/img_2` were both key `set`)."""
    write_images(tmp_path / "images", 3, size=(40, 40))
    images = sorted((tmp_path / "images").glob("*.jpg"))
    (tmp_path / "pq").mkdir()
    for k in range(2):
        pq.write_table(pa.table({"image": [{"bytes": p.read_bytes(), "path": f"{i}.jpg"} for i, p in enumerate(images)]}),
                       tmp_path / "pq" / f"train-{k:05d}-of-00002.parquet")
    m = prepare([str(tmp_path / "pq")], tmp_path / "out", PrepareOptions(size=32))
    assert m["total"] == 3 and sorted(read_tar_samples(tmp_path / "out")) == ["0", "1", "2"]
    assert sum("duplicate key" in s["reason"] for s in m["skipped"]) == 3, m["skipped"]
    pq.write_table(pa.table({"image": [{"bytes": p.read_bytes(), "path": f"set.v2/img_{i}.jpg"}
                                       for i, p in enumerate(images)]}), tmp_path / "dotted.parquet")
    m = prepare([str(tmp_path / "dotted.parquet")], tmp_path / "dotted", PrepareOptions(size=32))
    assert m["total"] == 3 and not m["skipped"], m["skipped"]


def test_a_parquet_file_of_urls_is_refused_pointing_to_img2dataset(tmp_path):
    pq.write_table(pa.table({"url": ["https://example.com/a.jpg"], "caption": ["a"]}), tmp_path / "urls.parquet")
    with pytest.raises(UserError, match=r"urls.parquet: a Parquet file of image URLs \(column url\), not of "
                                        r"images; download them first: img2dataset --url_list"):
        prepare([str(tmp_path / "urls.parquet")], tmp_path / "out", PrepareOptions(size=32))


def test_without_pyarrow_parquet_input_is_one_line(tmp_path, monkeypatch):
    pq.write_table(pa.table({"jpg": [b"x"]}), tmp_path / "a.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as an environment without it: the import fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"^Parquet input needs pyarrow: pip install 'firststage\[parquet\]'$"):
        prepare([str(tmp_path / "a.parquet")], tmp_path / "out", PrepareOptions(size=32))
