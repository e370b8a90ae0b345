"""Checks that need no model come before torch and diffusers are imported: export without statistics and encode
into a folder of other settings refuse within 2 s (a fresh interpreter; torch alone takes longer to import)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from harness import ENV, ROOT


@pytest.fixture
def poisoned(tmp_path):
    """A `torch` and a `diffusers` that fail when imported: a refusal that comes before them is unaffected."""
    for name in ("torch", "diffusers"):
        (tmp_path / "poison" / name).mkdir(parents=True)
        (tmp_path / "poison" / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
    return tmp_path / "poison"


def refusal(args: list[str], poison) -> tuple[subprocess.CompletedProcess, float]:
    env = {**ENV, "PYTHONPATH": f"{poison}:{ROOT}"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    return r, time.perf_counter() - start


def diffusers_folder(path) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [16, 32, 64],
                                                  "sample_size": 32}))
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # never read: the refusal comes first


def test_export_without_statistics_refuses_before_torch_is_imported(tmp_path, poisoned):
    diffusers_folder(tmp_path / "vae")
    r, seconds = refusal(["export", "--model", tmp_path / "vae", "--output", tmp_path / "out"], poisoned)
    assert r.returncode == 2 and "no measured latent statistics" in r.stderr, r.stderr[-2000:]
    assert "was imported" not in r.stderr and seconds < 2.0, seconds
    assert not (tmp_path / "out").exists()


def test_encode_into_a_folder_of_other_settings_refuses_before_torch_is_imported(tmp_path, poisoned):
    diffusers_folder(tmp_path / "vae")
    (tmp_path / "lat").mkdir()
    settings = {"model_sha256": "0" * 64, "kind": "kl", "store": "mean", "dtype": "float32", "resolution": 32,
                "buckets": None, "flip": False}
    (tmp_path / "lat" / "settings.json").write_text(json.dumps(settings))
    r, seconds = refusal(["encode", "--model", tmp_path / "vae", "--data", tmp_path, "--output", tmp_path / "lat"],
                         poisoned)
    assert r.returncode == 2 and 'holds latents encoded differently (store "mean" there, "moments" now)' in r.stderr, \
        r.stderr[-2000:]
    assert "was imported" not in r.stderr and seconds < 2.0, seconds
