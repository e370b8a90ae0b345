"""Fixtures. Plain helpers (images, shards, launchers, the tiny-run arguments) live in helpers.py, the S3 server in
s3server.py; the checkout and tests/ are on the import path through pyproject.toml's `pythonpath`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from s3server import aws_environment, start_weed

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


@pytest.fixture(autouse=True)
def fresh_storage():
    """Every test starts and ends with no storage options set and no storage backend made: a backend's client reads
    the environment (the AWS variables a test sets) when it is made."""
    from pipeline.storage import reset_storage

    reset_storage()
    yield
    reset_storage()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS server (tests/s3server.py) for this pytest process (each xdist worker starts its own, about a
    second): its endpoint, bucket and credentials."""
    server = start_weed(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server's credentials and endpoint in the standard AWS variables for one test (subprocesses inherit them);
    gives the server."""
    aws_environment(monkeypatch, s3_server)
    return s3_server


@pytest.fixture(scope="module")
def s3_module_env(s3_server, tmp_path_factory):
    """s3_env for a whole module, with a cache folder of its own (model copies, run logs)."""
    with pytest.MonkeyPatch.context() as mp:
        aws_environment(mp, s3_server)
        mp.setenv("FIRSTSTAGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield s3_server


@pytest.fixture
def photos(tmp_path) -> Path:
    """A few real colour photographs from scikit-image's package data, as JPEG files."""
    skdata = pytest.importorskip("skimage.data")
    out = tmp_path / "photos"
    out.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skdata, name)()).save(out / f"{name}.jpg", quality=92)
    return out


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's folder, made by `build(folder)` in whichever test process asks first, the other
    pytest-xdist workers waiting for it (an flock) and then reading the same folder."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: popen-gwN/.. is the session's
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / f"{name}.done").exists():
            if folder.exists():  # a worker that failed half-way: build again
                import shutil

                shutil.rmtree(folder)
            build(folder)
            (shared / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny trained KL run that evaluate, encode, export and reliability tests share (trained once per test
    session, by the first worker that needs it): root/train (4 shards x 16 images), root/val (5 x 4 other images),
    root/run (40 steps of the tiny preset at 32 px, mid-block attention on so that its 1x1-conv names are exercised;
    widths 16/32/64, lr 1e-3 and crops of 1/4 to all of the image: three distinct widths for the shape inference
    tests, and a model whose GroupNorm count can be told from its reconstructions) and root/run/eval.json (its
    evaluation on the training shards: the measured latent factors an export takes). Tests write their own outputs
    elsewhere and leave these alone."""

    def build(root: Path) -> None:
        from harness import run_main
        from helpers import TINY, make_train_val
        from stages.evaluate import main as evaluate
        from stages.train import run

        make_train_val(root)
        run([*TINY, f"data.train={root / 'train'}", f"output_dir={root / 'run'}", "train.max_steps=40",
             "train.log_every=10", "train.checkpoint_every=40", "model.mid_block_attention=true",
             "model.block_out_channels=[16,32,64]", "train.lr=1e-3", "data.random_resized_scale=[0.25,1.0]"])
        r = run_main(evaluate, "--model", root / "run", "--data", root / "train", "--lpips-backbone", "random",
                     "evaluate.likelihood_samples=0")
        assert r.returncode == 0, r.stderr

    return built_once(tmp_path_factory, "tiny-run", build)


@pytest.fixture(scope="session")
def encoder_only(tiny_run, tmp_path_factory) -> Path:
    """tiny_run's run exported by `firststage export --format encoder-only` (once per test session: tracing its
    program takes seconds); tests read it and write elsewhere."""

    def build(out: Path) -> None:
        from harness import run_main
        from stages.export import main as export

        r = run_main(export, "--model", tiny_run / "run", "--output", out, "--format", "encoder-only")
        assert r.returncode == 0, r.stderr

    return built_once(tmp_path_factory, "encoder-only", build)


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    """A tiny random AutoencoderKL saved as a diffusers folder (the tiny preset at 32 px), for the tests that need a
    model but not a trained one."""
    import torch

    from pipeline.config import load_config
    from pipeline.models import build_autoencoder
    from pipeline.weights.diffusers import save as save_diffusers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), path)
    return path
