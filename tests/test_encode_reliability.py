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
