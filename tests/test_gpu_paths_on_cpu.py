"""Paths that run only on a GPU in production, run on the CPU where torch allows it, so that the first GPU run does
not find their bugs (issue 31): the train step and encode under bf16 autocast, and `train.compile=true`.

torch.compile here uses the aot_eager backend: dynamo traces the family's compiled regions and AOT autograd builds
their backward exactly as with inductor, without inductor's C++ code generation, which took 80 s of CPU (5.7 min
on this shared 2-core machine) for one step of the tiny model; what it would catch are torch's bugs, not ours."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import TINY, make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    make_shards(d, num_shards=1, per_shard=8, size=(48, 40))
    return d


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one mixed-precision setting per process: a run with another one needs a fresh state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def train(shards, out, *overrides):
    from stages.train import run

    return run([*TINY, f"data.train={shards}", f"output_dir={out}", "train.max_steps=2", "train.log_every=1",
                *overrides])


def test_encode_under_bf16_autocast_on_the_cpu_stores_what_fp32_gives(shards):
    """encode_batch with the settings a GPU run gets (bf16 autocast, bf16 storage): finite latents, and means within
    bf16's precision of the full-precision encoder's."""
    from pipeline.config import load_config
    from pipeline.latents.encoder import EncodeSettings, encode_batch
    from pipeline.models import build_autoencoder

    torch.manual_seed(0)
    model = build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    keys = [f"k{i}" for i in range(4)]
    fast = encode_batch(model, images, keys, EncodeSettings("moments", "bfloat16", flip=True,
                                                            autocast=torch.bfloat16), "cpu")
    full = encode_batch(model, images, keys, EncodeSettings("moments", "float32", flip=True), "cpu")
    assert fast["mean"].dtype == torch.bfloat16 and bool(fast["_finite"].all())
    assert fast["mean_flip"].shape == full["mean_flip"].shape
    scale = full["mean"].abs().max()
    assert (fast["mean"].float() - full["mean"]).abs().max() < 0.05 * scale


def test_train_compile_true_with_bf16_autocast_trains_on_the_cpu(shards, tmp_path, fresh_accelerate, monkeypatch):
    """What a GPU run does by default (train.compile=true, bf16 autocast), two steps of the tiny preset on the CPU:
    the family's regions are compiled and run, the convolutions run in bf16, the loss is finite."""
    import json

    compile_module, compiled, seen = torch.nn.Module.compile, [], set()

    def aot_eager(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return compile_module(self, *args, **{**kwargs, "backend": "aot_eager"})

    def note(module, args, output):
        if isinstance(module, torch.nn.Conv2d) and isinstance(output, torch.Tensor):
            seen.add(output.dtype)

    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager)
    handle = torch.nn.modules.module.register_module_forward_hook(note)
    try:
        tr = train(shards, tmp_path / "run", "train.compile=true", "train.mixed_precision=bf16")
    finally:
        handle.remove()
    assert tr.state.step == 2 and tr.accelerator.mixed_precision == "bf16"
    assert "Encoder" in compiled, compiled
    vae = next(m for m in tr.model.modules() if hasattr(m, "encoder") and hasattr(m, "decoder"))
    assert vae.encoder._compiled_call_impl is not None  # the encoder ran compiled
    assert torch.bfloat16 in seen, seen  # the convolutions outside the compiled regions ran under autocast
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
