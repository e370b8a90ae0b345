import pickle
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import image_bytes, make_shards, random_image, write_tar
from pipeline.data.images import crop_to, displayed_size, read_header
from pipeline.data.loader import ImageStream, make_loader
from pipeline.pixels import to_model_input, to_uint8
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.errors import UserError
from pipeline.sources import resolve_sources


def eval_keys(spec, world_size, num_workers, batch_size=3):
    """Keys seen by each simulated rank, each rank a DataLoader with its own worker processes."""
    per_rank = []
    for rank in range(world_size):
        loader = make_loader(spec, "eval", batch_size, num_workers, resolution=32, rank=rank, world_size=world_size)
        keys = []
        for batch in loader:
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 32, 32)
            keys += batch["__key__"]
        per_rank.append(keys)
    return per_rank


@pytest.mark.parametrize("num_shards", [7, 2])  # more shards than slots, and fewer (sample-level split)
def test_eval_mode_exactly_once_across_2_ranks_x_2_workers(tmp_path, num_shards):
    make_shards(tmp_path, num_shards=num_shards, per_shard=5)
    per_rank = eval_keys(str(tmp_path), world_size=2, num_workers=2)
    allkeys = [k for keys in per_rank for k in keys]
    expected = {f"s{s:03d}_{i:04d}" for s in range(num_shards) for i in range(5)}
    assert Counter(allkeys) == Counter(expected)  # each exactly once
    assert all(per_rank)  # both ranks got work
    assert eval_keys(str(tmp_path), 2, 2) == per_rank  # deterministic order


def test_eval_mode_keeps_captions(tmp_path):
    make_shards(tmp_path, 1, 3)
    batch = next(iter(make_loader(str(tmp_path), "eval", 3, 0, resolution=32)))
    assert batch["txt"] == ["caption 0 0", "caption 0 1", "caption 0 2"]


def take_keys(ds, n):
    """First n training samples of one rank, identified by image content."""
    out = []
    for i, s in enumerate(ds):
        out.append(hash(s["image"].numpy().tobytes()))
        if len(out) == n:
            return out


def test_train_mode_orders_differ_between_ranks_and_repeat_per_seed(tmp_path):
    urls = resolve_sources(make_shards(tmp_path, num_shards=6, per_shard=4))
    common = dict(mode="train", resolution=32, crop="random", shuffle_buffer=8, seed=3, world_size=2)
    r0 = take_keys(ImageStream(urls, rank=0, **common), 40)
    r1 = take_keys(ImageStream(urls, rank=1, **common), 40)
    assert r0 != r1
    assert take_keys(ImageStream(urls, rank=0, **common), 40) == r0  # reproducible
    assert take_keys(ImageStream(urls, rank=0, epoch=1, **common), 40) != r0  # resumed runs do not replay


def test_train_mode_is_endless_and_batches_are_uint8_channels_last(tmp_path):
    make_shards(tmp_path, 1, 2)
    loader = make_loader(str(tmp_path), "train", 4, 2, resolution=32, crop="random-resized", shuffle_buffer=2)
    it = iter(loader)
    batches = [next(it) for _ in range(5)]  # 20 samples out of 2: resampled, never runs dry
    x = batches[0]["image"]
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    f = to_model_input(x)
    assert f.dtype == torch.float32 and f.min() >= -1 and f.max() <= 1
    assert torch.equal(to_uint8(f), x)


def test_corrupt_sample_is_skipped_with_warning(tmp_path):
    good = image_bytes(random_image(48, 48))
    write_tar(tmp_path / "a.tar", [{"__key__": "ok1", "jpg": good}, {"__key__": "bad", "jpg": b"garbage"},
                                   {"__key__": "ok2", "png": image_bytes(random_image(40, 40), "PNG")},
                                   {"__key__": "capless", "txt": b"no image"}])
    ds = ImageStream([str(tmp_path / "a.tar")], mode="eval", resolution=32, crop="center")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        keys = [s["__key__"] for s in ds]
    assert keys == ["ok1", "ok2"]
    assert ds.skipped.count == 2
    assert any("skipped 2 undecodable" in str(x.message) for x in w)


class _Boom:
    def __reduce__(self):
        return (open, ("PWNED_BY_PICKLE", "w"))


def test_pickled_members_are_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tar(tmp_path / "evil.tar", [{"__key__": "k", "jpg": image_bytes(random_image(40, 40)),
                                       "pyd": pickle.dumps(_Boom()), "pickle": pickle.dumps(_Boom())}])
    samples = list(ImageStream([str(tmp_path / "evil.tar")], mode="eval", resolution=32))
    assert [s["__key__"] for s in samples] == ["k"]
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_resolve_sources_forms(tmp_path):
    paths = make_shards(tmp_path / "d", 3, 1)
    assert resolve_sources(str(tmp_path / "d" / "shard-{000000..000002}.tar")) == paths
    assert resolve_sources(str(tmp_path / "d")) == paths
    (tmp_path / "list.txt").write_text("d/shard-000001.tar\n")
    assert resolve_sources(str(tmp_path / "list.txt")) == [str(tmp_path / "d" / "shard-000001.tar")]
    with pytest.raises(UserError, match="not found"):
        resolve_sources(str(tmp_path / "d" / "shard-{000000..000005}.tar"))
    with pytest.raises(UserError, match="no .tar"):
        (tmp_path / "e").mkdir()
        resolve_sources(str(tmp_path / "e"))


def test_reads_prepared_folder_through_manifest(tmp_path, photos):
    prepare([str(photos)], tmp_path / "out", PrepareOptions(size=96, shard_size=3))
    keys = [k for r in eval_keys(str(tmp_path / "out" / "manifest.json"), 1, 0) for k in r]
    assert sorted(keys) == ["astronaut", "chelsea", "coffee", "rocket"]


def test_crop_to_with_a_header_read_first_matches_the_plain_decode():
    """The encode stream reads the header once (bucket choice) and hands it to crop_to: same pixels, size and box as
    parsing the bytes again, for a rotated JPEG, a draft-decoded large JPEG, CMYK, 16-bit grey and palette+alpha."""
    exif = Image.Exif()
    exif[0x0112] = 6
    inputs = [
        image_bytes(random_image(90, 60), exif=exif.tobytes()),
        image_bytes(random_image(400, 300)),
        image_bytes(Image.new("CMYK", (40, 30), (10, 200, 0, 5))),
        image_bytes(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"),
        image_bytes(Image.new("RGBA", (40, 30), (9, 90, 9, 0)).convert("P"), "PNG"),
    ]
    for data in inputs:
        header = read_header(data)
        size = displayed_size(header)
        arr, own, box = crop_to(data, 32, 24, header=header)
        ref, ref_own, ref_box = crop_to(data, 32, 24)
        assert own == ref_own == size and box == ref_box and arr.shape == (24, 32, 3)
        assert np.array_equal(arr, ref)
    assert displayed_size(read_header(inputs[0])) == (60, 90)  # EXIF orientation 6 swaps the sides
