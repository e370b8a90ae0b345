"""Encode and the latent reader against hostile and careless input (the reliability issue's encode items): shards
that hold nothing, special files, the input folder as the output, member names, members that collide with ours,
stale latents of other data, a full disk, SIGTERM during start-up and while a read hangs, `pipe:` sources, and
latent shards or manifests that were damaged after encoding. Each test failed on the code before its fix."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from harness import ENV, ROOT, ForkedStage, run_main
from helpers import image_bytes, random_image, read_tar_samples, write_tar
from helpers import make_shards as _make_shards
from pipeline.errors import DataError, UserError
from pipeline.latents import LatentDataset
from pipeline.manifest import read_manifest
from test_reliability import catches_sigterm, one_line

SMALL = ["data.resolution=32", "data.num_workers=0", "encode.batch_size=4"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    from pipeline.config import load_config
    from pipeline.models import build_autoencoder
    from pipeline.weights.diffusers import save as save_diffusers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), path)
    return path


def make_shards(folder: Path, num_shards: int, per_shard: int, size) -> list[str]:
    return _make_shards(folder, num_shards, per_shard, size=size, prefix="shards")  # shards-000000.tar, ...


def encode(vae: Path, data, out: Path, *extra):
    from stages.encode import main

    return run_main(main, "--model", vae, "--data", data, "--output", out, *SMALL, *extra)


def members(folder: Path) -> list[str]:
    names = []
    for t in sorted(folder.glob("*.tar")):
        with tarfile.open(t) as tf:
            names += tf.getnames()
    return names


# ------------------------------------------------------------------------------ 5. the reader
def safetensors_bytes(header, payload: bytes = b"\0" * 1024) -> bytes:
    h = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(h)) + h + payload


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a latent shard in place, sample by sample (`change(index, sample)` edits a dict of members)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    out = list(samples.values())
    for i, s in enumerate(out):
        change(i, s)
    write_tar(path, out)


@pytest.fixture(scope="module")
def latents(vae, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latents")
    make_shards(root / "data", 2, 8, size=(40, 40))
    assert encode(vae, root / "data", root / "lat").returncode == 0
    return root / "lat"


def test_the_reader_skips_and_counts_bad_latents_and_nan(latents, tmp_path):
    folder = tmp_path / "lat"
    shutil.copytree(latents, folder)
    f32 = {"dtype": "F32", "shape": [4, 8, 8], "data_offsets": [0, 1024]}
    hostile = [
        struct.pack("<Q", 2**62) + b"{}",  # a huge header length
        safetensors_bytes({"mean": {**f32, "dtype": "F99"}, "logvar": f32}),  # a bogus dtype
        safetensors_bytes({"mean": {**f32, "data_offsets": [0, 10**9]}, "logvar": f32}),  # out of range
        safetensors_bytes('{"mean": %s, "mean": %s, "logvar": %s}' % ((json.dumps(f32),) * 3)),  # a name twice
    ]

    def damage(i, s):
        if i < len(hostile):
            s["latents.safetensors"] = hostile[i]
        elif i == 4:
            del s["latents.safetensors"]
        elif i == 5:
            del s["json"]

    rewrite_shard(folder / "shards-000000.tar", damage)
    nan = save_safetensors({"mean": torch.full((4, 8, 8), float("nan")), "logvar": torch.zeros(4, 8, 8)})
    rewrite_shard(folder / "shards-000001.tar", lambda i, s: s.update({"latents.safetensors": nan}) if i == 0 else None)
    ds = LatentDataset(folder, mode="eval")
    with pytest.warns(UserWarning) as warned:
        keys = [s["__key__"] for s in ds]
    assert "skipped 1 undecodable sample(s)" in str(warned[0].message)
    assert "s001_0000: non-finite latent (NaN/Inf)" in ds.skipped.latest  # the 7th: warnings come at 1, 2, 4
    assert len(keys) == 16 - 7 and ds.skipped.count == 7
    assert "s000_0006" in keys and "s001_0000" not in keys
    train = iter(LatentDataset(folder, batch_size=4, shuffle_buffer=4))
    with pytest.warns(UserWarning):
        batches = [next(train) for _ in range(12)]  # several passes over both shards, never stopped
    assert all(torch.isfinite(b["latents"]).all() for b in batches)


def test_a_run_of_bad_latents_stops_the_reader_at_its_limit(latents, tmp_path):
    folder = tmp_path / "lat"
    shutil.copytree(latents, folder)
    rewrite_shard(folder / "shards-000000.tar", lambda i, s: s.update({"latents.safetensors": b"junk"}))
    for mode in ("eval", "train"):
        with pytest.warns(UserWarning), pytest.raises(DataError, match="3 unreadable latent samples in a row") as e:
            list(zip(range(100), LatentDataset(folder, mode=mode, max_bad_samples=3, shuffle_buffer=0)))
        assert "max_bad_samples" in str(e.value) and "shards-000000.tar" in str(e.value)


def test_the_reader_checks_the_manifest_against_the_shards(latents, tmp_path):
    folder = tmp_path / "lat"
    shutil.copytree(latents, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["shards"][0]["samples"] = 0
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"shards-000000.tar: holds 8 samples, .*manifest.json says 0") as e:
        list(LatentDataset(folder, mode="eval"))
    assert "--rebuild-manifest" in str(e.value)
    (folder / "shards-000001.tar").unlink()
    with pytest.raises(DataError, match=r"lists 1 shard\(s\) that are not in the folder \(first: shards-000001.tar\)"):
        LatentDataset(folder, mode="eval")


# ------------------------------------------------------------------------------ sources that are not files
def test_pipe_and_unknown_url_sources_are_refused_in_one_line(vae, tmp_path):
    from pipeline.data.loader import resolve_shards

    with pytest.raises(UserError, match=r"pipe:touch x: a pipe: source runs a shell command .*data.allow_pipe=true"):
        resolve_shards("pipe:touch x")
    (tmp_path / "list.txt").write_text("shards-000000.tar\npipe:curl -s http://example.com/{0..3}.tar\n")
    with pytest.raises(UserError, match="a pipe: source"):
        resolve_shards(tmp_path / "list.txt")
    assert resolve_shards("pipe:cat a.tar", allow_pipe=True) == ["pipe:cat a.tar"]
    with pytest.raises(UserError, match=r"unsupported URL scheme s3://"):
        resolve_shards("s3://bucket/shards-{000000..000009}.tar")
    r = encode(vae, f"pipe:touch {tmp_path / 'ran'}", tmp_path / "lat")
    assert r.returncode == 2 and one_line(r) and "--data pipe:touch" in r.stderr
    assert not (tmp_path / "ran").exists()
