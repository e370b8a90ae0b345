"""Models named by a Hugging Face Hub id (org/name[@revision]), read from a Hugging Face cache built on disk here, with
HF_HUB_OFFLINE=1 (no network): a pipeline-shaped repository whose autoencoder is in vae/."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import ENV, ROOT, run_main
from helpers import TINY, make_shards

REPO, COMMIT = "firststage-tests/tiny-pipeline", "0123456789abcdef0123456789abcdef01234567"


def cache_repo(home, repo_id: str, files: dict) -> None:
    """`files` (name -> bytes) as the Hub's cache holds them at COMMIT: blobs/, snapshots/COMMIT/ linking into them,
    refs/main naming COMMIT."""
    import hashlib

    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME holding REPO at COMMIT as the Hub's cache lays it out: refs/main, blobs/, snapshots/COMMIT/ with
    links into blobs, a model_index.json and a unet/ beside vae/ (a pipeline: only vae/ is an autoencoder)."""
    import torch

    from pipeline.config import load_config
    from pipeline.models import build_autoencoder
    from pipeline.weights.diffusers import save as save_diffusers

    home = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    built = home / "built"
    save_diffusers(build_autoencoder(load_config("tiny").model, 32), built)
    files = {f"vae/{p.name}": p.read_bytes() for p in built.iterdir()}
    files["model_index.json"] = json.dumps({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers",
                                                                                              "AutoencoderKL"]}).encode()
    files["unet/config.json"] = b"{}"
    cache_repo(home, REPO, files)
    return home


@pytest.fixture
def offline_cache(hf_home, monkeypatch):
    """This process's huggingface_hub reading that cache offline (it read HF_HOME when it was imported: the
    subprocess test below shows the variables themselves are honoured)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    make_shards(d, num_shards=1, per_shard=8, size=(40, 40))
    return d


def test_hf_home_and_offline_are_honoured_and_an_uncached_id_is_one_line(hf_home):
    """In a fresh interpreter, as a user runs it: HF_HOME and HF_HUB_OFFLINE=1 in the environment; the cached id
    means its snapshot's vae/ at the commit refs/main names; an id the cache lacks is one line naming it and the
    command that fetches it."""
    env = {**ENV, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = ("import sys; from pipeline.errors import UserError; from pipeline.weights import resolve_weights\n"
            "for spec in sys.argv[1:]:\n"
            "    try: w = resolve_weights(spec); print(w.describe(), w.path)\n"
            "    except UserError as e: print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, REPO, "someone/not-cached@v2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    found, missing = r.stdout.strip().splitlines()
    snapshot = hf_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert found == f"diffusers weights (AutoencoderKL) of {REPO}@{COMMIT}/vae {snapshot / 'vae'}"
    assert missing.startswith(f"someone/not-cached@v2: no such file or folder, and someone/not-cached@v2 is not in "
                              f"the Hugging Face cache {hf_home / 'hub'} (HF_HUB_OFFLINE=1); fetch it where there "
                              f"is a network: hf download someone/not-cached --revision v2 --include 'config.json'")


def test_evaluate_names_the_commit_in_its_summary_and_eval_json(offline_cache, shards, tmp_path):
    from stages.evaluate import main as evaluate

    r = run_main(evaluate, "--model", REPO, "--output", tmp_path / "e", "--data", shards, "--lpips-backbone",
                 "random", "data.resolution=32", "data.num_workers=0", "evaluate.likelihood_samples=0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["weights"] == \
        f"diffusers weights (AutoencoderKL) of {REPO}@{COMMIT}/vae"
    assert f"{REPO}@{COMMIT}" in r.stdout.splitlines()[-1]  # the summary line
    r = run_main(evaluate, "--model", "someone/not-cached", "--data", shards)
    assert r.returncode == 2 and r.stderr.startswith("firststage evaluate: error: --model someone/not-cached: no such "
                                                     "file or folder, and someone/not-cached is not in"), r.stderr


def test_encode_export_and_init_from_take_a_hub_id_and_record_its_commit(offline_cache, shards, tmp_path):
    from stages.encode import main as encode
    from stages.export import main as export
    from stages.train import run as train

    pinned = f"{REPO}@{COMMIT}"
    r = run_main(encode, "--model", REPO, "--data", shards, "--output", tmp_path / "lat", "data.resolution=32",
                 "data.num_workers=0")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    assert manifest["model"]["weights"] == f"diffusers weights (AutoencoderKL) of {pinned}/vae"
    r = run_main(export, "--model", f"{REPO}@main", "--output", tmp_path / "x", "--stats", tmp_path / "lat" /
                 "manifest.json", "data.resolution=32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert pinned in (tmp_path / "x" / "README.md").read_text() and pinned in r.stdout
    tr = train(*[TINY + [f"data.train={shards}", f"output_dir={tmp_path / 'run'}", f"train.init_from={REPO}",
                         "train.max_steps=1", "train.tracker=none"]])
    assert tr.state.step == 1


def test_only_the_autoencoder_of_a_pipeline_repository_is_asked_for():
    """The patterns handed to snapshot_download, as it filters a repository's files with them."""
    from huggingface_hub.utils import filter_repo_objects

    from pipeline.weights.hub import PATTERNS

    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
             "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.safetensors", "README.md"]
    assert list(filter_repo_objects(files, allow_patterns=PATTERNS)) == [
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    single = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "README.md"]
    assert list(filter_repo_objects(single, allow_patterns=PATTERNS)) == single[:2]


def test_a_local_path_wins_over_a_hub_id_that_spells_the_same(offline_cache, tmp_path, monkeypatch):
    from pipeline.errors import UserError
    from pipeline.weights import resolve_weights

    monkeypatch.chdir(tmp_path)
    (tmp_path / REPO).mkdir(parents=True)
    with pytest.raises(UserError, match=f"^{REPO}: not an autoencoder"):  # the empty local folder, not the Hub's
        resolve_weights(REPO)


def test_a_revision_that_is_a_path_is_one_line(offline_cache, tmp_path, monkeypatch):
    """`org/name@..` (and `@../../models--x--y/refs/main`) would read outside the repository's refs/: refused in one
    line before the cache is asked (before: an IsADirectoryError traceback)."""
    from pipeline.errors import UserError
    from pipeline.weights import resolve_weights

    monkeypatch.chdir(tmp_path)
    for rev in ("..", "../../models--x--y/refs/main", "a//b"):
        with pytest.raises(UserError, match="is not a branch, tag or commit name"):
            resolve_weights(f"{REPO}@{rev}")


def test_the_alignment_foundation_model_takes_a_hub_id(offline_cache, tmp_path):
    import torch

    from pipeline.models.foundation import foundation_source, load_dinov2, random_dinov2

    random_dinov2().save_pretrained(tmp_path / "dino")
    cache_repo(offline_cache, "someone/dinov2-tiny", {p.name: p.read_bytes() for p in (tmp_path / "dino").iterdir()})
    kind, where = foundation_source("someone/dinov2-tiny")
    assert kind == "transformers" and where.name == COMMIT
    loaded = load_dinov2("someone/dinov2-tiny")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), random_dinov2().state_dict().values()))
