"""The latent format's one description (pipeline.latents.format): each stored kind round-trips a batch of the
encoder's Latent through its safetensors member to what the reader yields, and a shard record reads back what is on
disk unchanged."""

import json

import pytest
import torch
from safetensors.torch import save as save_safetensors

from pipeline.latents import format as lf
from pipeline.models.families.base import Latent
from pipeline.models.posterior import key_generator, key_noise, reparameterize

KEYS = ["a/0", "a/1"]


def a_latent(codebook: int = 16) -> Latent:
    g = torch.Generator().manual_seed(0)
    return Latent(mean=torch.randn(2, 4, 3, 5, generator=g), logvar=torch.randn(2, 4, 3, 5, generator=g) - 2,
                  codes=torch.randint(0, codebook, (2, 3, 5), generator=g))


def through_a_member(kind: lf.StoredKind, lat: Latent, dtype: str = "float32", codebook: int = 16) -> list[dict]:
    """Each sample's tensors as the encoder stores them and the reader reads them back (safetensors bytes)."""
    stored = {k: v.to(kind.dtype(dtype, codebook)) for k, v in kind.to_stored(lat, KEYS).items()}
    assert list(stored) == list(kind.tensors)
    return [lf.read_latent(save_safetensors({k: v[i].contiguous() for k, v in stored.items()})) for i in range(2)]


@pytest.mark.parametrize("name", ["moments", "mean", "sample", "codes", "latent"])
def test_each_kind_round_trips_what_the_encoder_gives_to_what_the_reader_yields(name):
    kind, lat = lf.KINDS[name], a_latent()
    samples = through_a_member(kind, lat)
    for i, tensors in enumerate(samples):
        kind.check(tensors, "float32")  # what the reader holds each sample against
        got = kind.from_stored(tensors, sample=kind.draws, generator=key_generator(KEYS[i]))
        want = {"moments": reparameterize(lat.mean[i], lat.logvar[i], generator=key_generator(KEYS[i])),
                "mean": lat.mean[i], "latent": lat.mean[i], "codes": lat.codes[i],
                "sample": reparameterize(lat.mean[i], lat.logvar[i], key_noise([KEYS[i]], lat.mean.shape[1:])[0])}
        assert got.dtype == (torch.int64 if kind.integer else torch.float32)
        assert torch.allclose(got.double(), want[name].double(), atol=1e-6), name
    if name == "moments":  # without a draw: the mean
        assert torch.equal(kind.from_stored(samples[0], sample=False), lat.mean[0])


def test_the_statistics_are_of_what_the_reader_yields():
    lat = a_latent()
    for kind in lf.KINDS.values():
        stored = kind.to_stored(lat, KEYS)
        m, second = kind.moments(lat, stored)
        variance = lat.logvar.double().exp() if kind.draws else 0  # E[z^2] of z ~ N(mean, exp(logvar))
        first = stored["sample"] if kind.name == "sample" else lat.mean  # codes: of the quantised latent
        assert torch.allclose(m, first.double()) and torch.allclose(second, first.double() ** 2 + variance), kind.name


def test_tensor_names_dtypes_and_which_kind_a_family_stores():
    assert lf.MOMENTS.names(flip=True) == ["mean", "logvar", "mean_flip", "logvar_flip"]
    assert [k.names(False) for k in lf.KINDS.values()] == [["mean", "logvar"], ["mean"], ["sample"], ["codes"],
                                                           ["latent"]]
    assert lf.CODES.dtype("bfloat16", 2**15) == torch.int16 and lf.CODES.dtype("float32", 2**15 + 1) == torch.int32
    assert lf.MEAN.dtype("bfloat16") == torch.bfloat16 and lf.MEAN.dtype("float64") is None
    assert [lf.stored_kind(family, "mean").name for family in ("kl", "vq", "fsq", "rae", "dc", "flux2")] == \
        ["mean", "codes", "codes", "latent", "latent", "mean"]
    with pytest.raises(lf.UserError, match="latents stored as 'moment'"):
        lf.kind_named("moment")


def test_a_sample_without_its_kinds_tensors_or_of_another_dtype_is_a_bad_latent():
    tensors = through_a_member(lf.MOMENTS, a_latent())[0]
    with pytest.raises(lf.BadLatent, match="no tensor logvar"):
        lf.MOMENTS.check({"mean": tensors["mean"]}, "float32")
    with pytest.raises(lf.BadLatent, match="tensor logvar of dtype float32, the manifest says float16"):
        lf.MOMENTS.check(tensors, "float16")
    with pytest.raises(lf.BadLatent, match="not integer codes"):
        lf.CODES.check({"codes": torch.zeros(3, 5)}, "float32")
    lf.CODES.check({"codes": torch.zeros(3, 5, dtype=torch.int16)}, "float32")


# ------------------------------------------------------------------------------------------------ records
ON_DISK = {  # records/NAME.json as encode writes it (docs/latent-format.md), keys in its order
    "name": "shards-000000.tar", "source": "/data/shards-000000.tar", "input": {"size": 10240, "mtime_ns": 1},
    "inputs": 3, "samples": 2, "keys_sha256": "ab" * 32,
    "skipped": [{"shard": "shards-000000.tar", "key": "k2", "reason": "not an image"}],
    "renamed": [{"shard": "shards-000000.tar", "key": "k0", "member": "json", "as": "source.json"}],
    "non_finite": 0, "buckets": {"32x32": 2}, "latent_shapes": {"32x32": [4, 8, 8]},
    "stats": {"count": [128.0], "sum": [1.5], "sumsq": [130.0]},
    "settings": {"model_sha256": "cd" * 32, "kind": "kl", "store": "moments", "dtype": "float32", "resolution": 32,
                 "buckets": None, "flip": False},
    "files": {"shards-000000.tar": {"size": 20480, "sha256": "ef" * 32}}}


def test_a_record_reads_back_and_writes_exactly_what_is_on_disk():
    record = lf.ShardRecord.from_json(json.loads(json.dumps(ON_DISK)))
    assert record.samples == 2 and record.input == ON_DISK["input"] and record.settings["store"] == "moments"
    assert json.dumps(record.to_json()) == json.dumps(ON_DISK)  # the same keys, in the same order
    assert lf.same_latents(record, ON_DISK["settings"])
    assert not lf.same_latents(record, {**ON_DISK["settings"], "store": "mean"})
    summary = record.summary()  # what a part manifest keeps of it, and reads back
    assert set(summary) == set(lf.ShardRecord.SUMMARY) and lf.ShardRecord.from_json(summary).stats == record.stats


def test_an_older_record_reads_with_defaults_and_a_broken_one_is_no_record(tmp_path):
    older = {k: v for k, v in ON_DISK.items() if k not in ("input", "inputs", "renamed", "non_finite", "files")}
    record = lf.ShardRecord.from_json(older)
    assert record.input is None and record.renamed == [] and record.files is None and "files" not in record.to_json()
    assert lf.record_state(record, ON_DISK["settings"], ON_DISK["source"]) == "complete"  # its source decides
    assert lf.record_state(record, ON_DISK["settings"], "/elsewhere/shards-000000.tar") == "changed"
    for broken in ([], {"name": "x.tar"}, {**ON_DISK, "samples": "2"}):
        with pytest.raises(ValueError):
            lf.ShardRecord.from_json(broken)
    unit = lf.shard_unit(tmp_path, "shards-000000.tar")
    (tmp_path / "shards-000000.tar").write_bytes(b"")
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "shards-000000.json").write_text(json.dumps({"name": "shards-000000.tar"}))
    assert lf.read_record(unit) is None  # not a record: the shard is not done (a rerun encodes it again)
    (tmp_path / "records" / "shards-000000.json").write_text(json.dumps(ON_DISK))
    assert lf.read_record(unit) == lf.ShardRecord.from_json(ON_DISK)


# ------------------------------------------------------------------------------------------------ the encoder's checks
def test_the_encoders_input_and_output_checks_lead_through_links_and_name_what_is_not_a_file(tmp_path):
    """Through the storage interface (not_a_file, canonical): an output folder that is the inputs' folder by
    another name, or whose NAME.tar is a link to the input, is refused; a FIFO or a folder among the inputs is named."""
    import os

    from helpers import image_bytes, random_image, write_tar
    from pipeline.errors import UserError
    from pipeline.latents.encoder import check_input_shards, check_output_folder

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write_tar(data / "shards-000000.tar", [{"__key__": "k", "jpg": image_bytes(random_image(40, 36, 0))}])
    urls = [str(data / "shards-000000.tar")]
    (tmp_path / "alias").symlink_to(data)
    out.mkdir()
    (out / "shards-000000.tar").symlink_to(urls[0])
    for folder in (data, tmp_path / "alias", out):
        with pytest.raises(UserError, match=f"^{folder} holds the input shard shards-000000.tar"):
            check_output_folder(folder, urls)
    check_output_folder(tmp_path / "elsewhere", urls)
    check_output_folder(data / "latents", urls)  # a folder inside the inputs' folder overwrites none
    check_input_shards(urls)
    os.mkfifo(data / "shards-000001.tar")
    (data / "shards-000002.tar").mkdir()
    with pytest.raises(UserError, match=r"shards-000001.tar is a named pipe \(FIFO\), not a shard file \(reading it would block"):
        check_input_shards(urls + [str(data / "shards-000001.tar")])
    with pytest.raises(UserError, match=r"shards-000002.tar is a folder, not a shard file; remove it"):
        check_input_shards(urls + [str(data / "shards-000002.tar")])
    write_tar(data / "texts.tar", [{"__key__": "k", "txt": b"no image"}])
    with pytest.raises(UserError, match="texts.tar holds no images"):
        check_input_shards([str(data / "texts.tar")])
