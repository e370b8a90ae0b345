"""Representation autoencoders (model.kind rae): tiny-rae trains on CPU with its encoder frozen bit for bit, resumes
after SIGKILL to the same state, evaluates and encodes without noise augmentation (latent statistics per [C, H, W]),
and exports to a folder AutoencoderRAE.from_pretrained loads with firststage's encode and decode outputs; a missing
foundation model stops before training in one line, a present one is the encoder it starts from."""

from __future__ import annotations

import json

import pytest
import torch

from harness import run_main, sigkill_after_first_checkpoint
from helpers import load_model, make_shards

RES = 32
RUN = ["--config", "tiny-rae", "data.num_workers=0", "data.shuffle_buffer=2", "train.batch_size=2",
       "train.tracker=none"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("rae")
    make_shards(root / "shards", 1, 3, size=(RES, RES))
    return root / "shards"


def test_tiny_rae_trains_resumes_evaluates_encodes_and_exports(shards, tmp_path):
    from diffusers import AutoencoderRAE

    from pipeline.config import load_config
    from pipeline.latents import LatentDataset
    from pipeline.models import build_autoencoder, family_of
    from pipeline.models.normalisation import denormalise
    from stages.encode import main as encode
    from stages.evaluate import main as evaluate
    from stages.export import main as export
    from test_families import images_by_key, resumes_exactly

    run = tmp_path / "run"
    sigkill_after_first_checkpoint(run, *RUN, f"data.train={shards}", f"output_dir={run}", "train.max_steps=400",
                                   "train.checkpoint_every=2", "train.keep_checkpoints=3")
    saved = resumes_exactly(run)  # a resumed run holds exactly the newest checkpoint's state

    cfg = load_config(run / "config.yaml")
    torch.manual_seed(cfg.seed)  # the model the run started from (the trainer seeds, then builds)
    start = build_autoencoder(cfg.model, RES).state_dict()
    trained = saved["autoencoder"]
    assert any(k.startswith("encoder.") for k in trained)
    assert all(torch.equal(trained[k], start[k]) for k in trained if k.startswith("encoder."))  # frozen, bit for bit
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k.startswith("decoder."))
    heads = [k for k in saved["objective"] if k.startswith("discriminator.")]  # RAE's discriminator: heads only
    assert heads and all(k.startswith("discriminator.heads.") for k in heads)

    small = ["data.num_workers=0"]
    for out in ("eval", "eval2"):  # no noise augmentation: the same numbers twice
        r = run_main(evaluate, "--model", run, "--data", shards, "--output", tmp_path / out, "--lpips-backbone",
                     "random", *small)
        assert r.returncode == 0, r.stderr[-3000:]
    first, second = (json.loads((tmp_path / o / "eval.json").read_text()) for o in ("eval", "eval2"))
    assert first["samples"] == 3 and first["psnr"] == second["psnr"] and "kl_per_sample" not in first
    # the diffusability probe leaves out the 2x downscale: the ViT decoder's grid is fixed (before: a traceback)
    assert set(first["diffusability"]["equivariance_psnr"]) == {"rot90", "rot180", "rot270"}, first["diffusability"]

    r = run_main(encode, "--model", run, "--data", shards, "--output", tmp_path / "lat", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    norm = manifest["normalisation"]
    assert manifest["kind"] == "rae" and manifest["store"] == "latent"
    assert norm["per_position"] and len(norm["mean"]) == len(norm["std"]) == 64 * 4 * 4  # per [C, H, W]
    assert len(manifest["statistics"]["channel_mean"]) == 64 * 4 * 4
    got = {s["__key__"]: s["latents"] for s in LatentDataset(tmp_path / "lat", mode="eval", sample=False)}
    model, _ = load_model(run)
    fam = family_of(model)
    images = images_by_key(shards)
    with torch.no_grad():
        for key, x in images.items():  # what the reader yields is the noiseless latent, normalised
            z = fam.encode(model.eval(), x[None]).mean[0]
            torch.testing.assert_close(denormalise(got[key], norm), z, rtol=1e-4, atol=1e-4)
            assert got[key].shape == (64, 4, 4)

    r = run_main(export, "--model", run, "--output", tmp_path / "vae", "--stats", tmp_path / "lat" / "manifest.json")
    assert r.returncode == 0, r.stderr[-3000:]
    plain = AutoencoderRAE.from_pretrained(tmp_path / "vae").eval()
    assert sum(p.numel() for n, p in plain.named_parameters() if n.startswith("encoder.")) > 0  # encoder included
    x = torch.stack(list(images.values()))
    zn = torch.stack([got[k] for k in images])
    with torch.no_grad():
        torch.testing.assert_close(plain.encode((x + 1) / 2).latent, zn, rtol=1e-4, atol=1e-4)
        theirs = plain.decode(zn).sample * 2 - 1
        ours = fam.decode(model, denormalise(zn, norm))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    r = run_main(export, "--model", run, "--output", tmp_path / "rae.safetensors", "--format", "single-file",
                 "--stats", tmp_path / "lat" / "manifest.json")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "single-file" in r.stderr, r.stderr[-2000:]

    # the export as a published AutoencoderRAE: evaluated, encoded with its own normalisation, fine-tuned
    r = run_main(evaluate, "--model", tmp_path / "vae", "--data", shards, "--output", tmp_path / "eval3",
                 "--lpips-backbone", "random", "evaluate.diffusability=false", *small)
    assert r.returncode == 0 and "diffusers weights (AutoencoderRAE)" in r.stdout, r.stderr[-3000:]
    r = run_main(encode, "--model", tmp_path / "vae", "--data", shards, "--output", tmp_path / "lat2", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    again = {s["__key__"]: s["latents"] for s in LatentDataset(tmp_path / "lat2", mode="eval", sample=False)}
    for key in images:
        torch.testing.assert_close(again[key], got[key], rtol=1e-4, atol=1e-4)
    from stages.train import run as train

    tr = train([*RUN, f"data.train={shards}", f"output_dir={tmp_path / 'ft'}", "train.max_steps=1",
                f"train.init_from={tmp_path / 'vae'}", "model.rae.encoder.backbone=pretrained"])
    after = tr.unwrapped.vae.state_dict()
    assert tr.cfg.model.kind == "rae" and type(tr.unwrapped.vae) is AutoencoderRAE
    assert all(torch.equal(after[k].cpu(), v) for k, v in plain.state_dict().items() if k.startswith("encoder."))
    assert any(not torch.equal(after[k].cpu(), v) for k, v in plain.state_dict().items() if k.startswith("decoder."))


def test_a_missing_foundation_model_stops_before_training(shards, tmp_path):
    from stages.train import main as train

    r = run_main(train, *RUN, f"data.train={shards}", f"output_dir={tmp_path / 'run'}",
                 "model.rae.encoder.backbone=pretrained", f"model.rae.encoder.weights={tmp_path / 'dinov2'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert f"model.rae.encoder.weights {tmp_path / 'dinov2'}" in r.stderr
    assert "huggingface-cli download facebook/dinov2-with-registers-base" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    r = run_main(train, *RUN, f"data.train={shards}", f"output_dir={tmp_path / 'run'}",
                 "loss.adversarial.dino_backbone=pretrained", f"loss.adversarial.dino_model={tmp_path / 'dino'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert f"loss.adversarial.dino_model {tmp_path / 'dino'}" in r.stderr and "facebook/dino-vits8" in r.stderr


def test_a_pretrained_encoder_is_the_one_training_starts_from(shards, tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from stages.train import run

    torch.manual_seed(1)
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=1,
                                                              num_attention_heads=1, patch_size=14, image_size=518))
    dino.save_pretrained(tmp_path / "dinov2")
    tr = run([*RUN, f"data.train={shards}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
              "model.rae.encoder.backbone=pretrained", f"model.rae.encoder.weights={tmp_path / 'dinov2'}"])
    encoder = tr.unwrapped.vae.encoder.state_dict()
    want = {k: v for k, v in dino.state_dict().items() if not k.startswith("layernorm.")}
    assert set(want) <= set(encoder) and all(torch.equal(encoder[k].cpu(), v) for k, v in want.items())


def test_equivariance_and_alignment_are_refused_for_an_rae():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    for key in ("loss.equivariance.enabled=true", "loss.alignment.enabled=true"):
        with pytest.raises(ConfigError, match="an RAE's latent is a frozen encoder's fixed grid"):
            load_config("tiny-rae", [key])


def test_the_rae_recipe_starts_d_before_g_with_its_own_losses_and_a_cosine_to_a_floor():
    """D from start_step, the generator's term from generator_start_step, hinge D with a non-saturating G; the
    cosine learning rate ends at final_lr_ratio of lr (RAE: 2e-4 to 2e-5)."""
    import torch.nn.functional as F

    from pipeline.config import load_config
    from pipeline.losses import FirstStageObjective
    from pipeline.models.autoencoder import AutoencoderOutput
    from pipeline.train.schedules import lr_factor

    cfg = load_config("rae-dinov2-b", ["model.rae.encoder.backbone=random"])
    assert lr_factor(cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.max_steps, "cosine",
                     cfg.train.final_lr_ratio) == pytest.approx(0.1)
    a = cfg.loss.adversarial
    assert (a.start_step, a.generator_start_step, a.loss, a.generator_loss) == (15000, 20000, "hinge", "non-saturating")
    loss = load_config("tiny-rae", ["loss.adversarial.enabled=true", "loss.adversarial.start_step=1",
                                    "loss.adversarial.generator_start_step=3", "loss.adversarial.adaptive_weight=false",
                                    "loss.adversarial.generator_loss=non-saturating",
                                    "loss.adversarial.diffaug_p=0"]).loss
    obj = FirstStageObjective(loss, False, 3, 64).eval()  # (no DiffAug, no spectral-norm power step: repeatable)
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    rec = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    out = AutoencoderOutput(rec, torch.zeros(2, 64, 4, 4))
    assert [obj.gan_active(s) for s in (0, 1, 3)] == [False, True, True]
    assert [obj.generator_active(s) for s in (0, 1, 3)] == [False, False, True]
    _, early = obj.autoencoder_terms(x, out, 1)
    _, late = obj.autoencoder_terms(x, out, 3)
    assert "g" not in early and "g" in late
    with torch.no_grad():
        torch.testing.assert_close(late["g"], F.softplus(-obj.discriminator(rec)).mean())


def test_the_dino_discriminator_trains_its_heads_on_a_frozen_vit_through_diffaug():
    """RAE's discriminator: DiffAug changes the images it reads (p 1) or not (p 0); its gradient reaches the images
    through the frozen ViT, whose weights get none and are no part of its state (checkpoints, exports)."""
    from pipeline.models.dino_discriminator import DinoDiscriminator, diff_augment
    from pipeline.models.foundation import dino_backbone

    x = torch.rand(4, 3, RES, RES) * 2 - 1
    torch.manual_seed(0)
    augmented = diff_augment(x)
    assert augmented.shape == x.shape and not torch.equal(augmented, x)
    assert ((augmented == 0).all(1).flatten(1).sum(1) >= 8 * 8).all()  # a 16 x 16 cutout in each (cut at edges)
    backbone = dino_backbone("", "random")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    d = DinoDiscriminator(backbone, kernel=9, p=1.0)
    assert set(d.state_dict()) and not any("backbone" in k or k.startswith("embeddings") for k in d.state_dict())
    assert all(id(p) not in {id(q) for q in backbone.parameters()} for p in d.parameters())
    rec = x.clone().requires_grad_(True)
    logits = d(rec)
    assert logits.shape == (4, len(d.hooks) * (1 + (224 // 8) ** 2))
    (-logits.mean()).backward()
    assert rec.grad.abs().sum() > 0 and all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None for p in d.parameters())
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    with torch.no_grad():
        d.p = 0.0
        assert torch.equal(d.eval()(x), d(x))  # without DiffAug (and in eval mode) the same logits twice
