"""Fixtures. Plain helpers (images, shards, launchers, the tiny-run arguments) live in helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, for the test modules
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, before any installed copy

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's thread policy: one intra-op thread for everything the tests run, in this process and in the stages they
# start (FIRSTSTAGE_THREADS, read by stages/__init__.py): two pytest workers, loader workers and subprocesses share
# two cores, and torch's spinning threads made the tiny training test ~8x slower under that load.
os.environ["FIRSTSTAGE_THREADS"] = "1"


def pytest_configure(config):
    """One intra-op thread in every process that runs tests. The pytest-xdist controller runs none and skips torch's
    2-second import, which would otherwise delay the workers' start."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def photos(tmp_path) -> Path:
    """A few real colour photographs from scikit-image's package data, as JPEG files."""
    skdata = pytest.importorskip("skimage.data")
    out = tmp_path / "photos"
    out.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skdata, name)()).save(out / f"{name}.jpg", quality=92)
    return out
