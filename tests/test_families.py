"""Every model family: a tiny random model of each diffusers class, saved with save_pretrained, is evaluated, encoded
(the latents read back with LatentDataset equal what that family's diffusers pipeline feeds its transformer) and
fine-tuned through train.init_from; DC-AE and FSQ train from presets, resume exactly, export, and their phases train
only the parameters they name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    AutoencoderTiny,
)
from PIL import Image

from harness import run_main, sigkill_after_first_checkpoint
from helpers import load_model, make_shards

RES = 32
# the smallest shapes of each class that run 32 px images (one or two levels)
SD_BLOCKS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                 norm_num_groups=8, sample_size=RES)
VIDEO = dict(base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True], dropout=0.0)
CLASSES = {
    # SD3 / FLUX.1 style: 16 channels, no quant convs, a shift
    "kl": (AutoencoderKL, dict(**SD_BLOCKS, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                               use_quant_conv=False, use_post_quant_conv=False)),
    "flux2": (AutoencoderKLFlux2, dict(**SD_BLOCKS, latent_channels=8, batch_norm_eps=1e-4, patch_size=(2, 2))),
    "qwenimage": (AutoencoderKLQwenImage, dict(**VIDEO, latents_mean=[0.1 * i for i in range(8)],
                                               latents_std=[1.0 + 0.1 * i for i in range(8)])),
    "wan": (AutoencoderKLWan, dict(**VIDEO, latents_mean=[-0.05 * i for i in range(8)],
                                   latents_std=[0.5 + 0.2 * i for i in range(8)], scale_factor_spatial=4,
                                   scale_factor_temporal=2)),
    "dc": (AutoencoderDC, dict(in_channels=3, latent_channels=8, attention_head_dim=8,
                               encoder_block_types=("ResBlock", "EfficientViTBlock"),
                               decoder_block_types=("ResBlock", "EfficientViTBlock"),
                               encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 32),
                               encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                               encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                               downsample_block_type="conv", upsample_block_type="interpolate",
                               decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)),
    "tiny": (AutoencoderTiny, dict(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8),
                                   decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                                   num_decoder_blocks=(1, 1), latent_channels=4, scaling_factor=1.5305,
                                   shift_factor=0.0609)),
}
POSTERIOR = {"kl", "flux2", "qwenimage", "wan"}
TINY_RUN = ["--config", "tiny", f"data.resolution={RES}", "data.num_workers=0", "data.shuffle_buffer=4",
            "train.batch_size=4", "train.tracker=none", "train.log_every=1"]


def tiny_model(name: str, seed: int = 0):
    cls, kwargs = CLASSES[name]
    torch.manual_seed(seed)
    model = cls(**kwargs).eval()
    if name == "flux2":  # non-trivial BatchNorm statistics: the pipeline normalises with them
        with torch.no_grad():
            model.bn.running_mean.copy_(torch.randn(model.bn.num_features) * 0.3)
            model.bn.running_var.copy_(torch.rand(model.bn.num_features) + 0.5)
    return model


def patchify2(z):  # FLUX.2's Flux2Pipeline._patchify_latents, written out: [B, C, h, w] -> [B, 4C, h/2, w/2]
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


@torch.no_grad()
def pipeline_latent(name: str, vae, x: torch.Tensor) -> torch.Tensor:
    """What each family's diffusers pipeline computes from images x [B, 3, H, W] in [-1, 1] before its transformer
    (mode of the posterior), written from the pipelines' code: FLUX.2 _encode_vae_image, Qwen-Image Edit
    _encode_vae_image, Wan prepare_latents, SANA's control image, SD3 / FLUX.1 (z - shift) * scale. 4-D."""
    c = vae.config
    if name == "flux2":
        z = vae.encode(x).latent_dist.mode()
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + c.batch_norm_eps)
        return (patchify2(z) - mean) / std
    if name in ("qwenimage", "wan"):
        z = vae.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        return (z - torch.tensor(c.latents_mean).view(1, -1, 1, 1)) / torch.tensor(c.latents_std).view(1, -1, 1, 1)
    if name == "dc":
        return vae.encode(x).latent * c.scaling_factor
    z = vae.encode(x).latent_dist.mode() if name == "kl" else vae.encode(x).latents
    return (z - c.shift_factor) * c.scaling_factor


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """2 shards x 3 images of exactly 32 x 32 (the encoder's crop is the whole image) with captions."""
    root = tmp_path_factory.mktemp("families")
    make_shards(root / "shards", 2, 3, size=(RES, RES))
    return root / "shards"


def images_by_key(shards) -> dict[str, torch.Tensor]:
    """The shards' images as the model sees them (decoded JPEGs, [-1, 1]), by sample key."""
    import tarfile

    out = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    img = Image.open(tf.extractfile(m)).convert("RGB")
                    out[m.name[:-4]] = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 127.5 - 1
    return out


def latents_read_back(folder) -> dict[str, torch.Tensor]:
    from pipeline.latents import LatentDataset

    return {s["__key__"]: s["latents"] for s in LatentDataset(folder, mode="eval", sample=False)}


@pytest.mark.parametrize("name", list(CLASSES))
def test_a_diffusers_autoencoder_evaluates_encodes_and_fine_tunes(name, shards, tmp_path):
    from stages.encode import main as encode
    from stages.evaluate import main as evaluate
    from stages.train import run

    vae = tiny_model(name)
    vae.save_pretrained(tmp_path / "vae")
    fam_args = ["data.num_workers=0", f"data.resolution={RES}"]
    r = run_main(evaluate, "--model", tmp_path / "vae", "--data", shards, "--output", tmp_path / "eval",
                 "--lpips-backbone", "random", "evaluate.likelihood_samples=2", "evaluate.iwae_k=2", *fam_args)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert res["samples"] == 6 and res["psnr"] > 0
    assert ("kl_per_sample" in res) == (name in POSTERIOR) and ("likelihood" in res) == (name in POSTERIOR)
    assert len(res["diffusability"]["equivariance_psnr"]) == 4  # the probe, on a diffusers folder of any family

    r = run_main(encode, "--model", tmp_path / "vae", "--data", shards, "--output", tmp_path / "lat", *fam_args)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    assert manifest["kind"] == name and manifest["store"] == ("moments" if name in POSTERIOR else "latent")
    assert manifest["normalisation"]["source"].startswith("the model's")
    got, images = latents_read_back(tmp_path / "lat"), images_by_key(shards)
    assert sorted(got) == sorted(images)
    for key, x in images.items():
        want = pipeline_latent(name, vae, x[None])[0]
        torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-4)

    tr = run([*TINY_RUN, f"data.train={shards}", f"output_dir={tmp_path / 'ft'}", "train.max_steps=2",
              f"train.init_from={tmp_path / 'vae'}"])
    assert tr.cfg.model.kind == name and type(tr.unwrapped.vae) is type(vae)
    after, before = tr.unwrapped.vae.state_dict(), vae.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if k.startswith("decoder."))
    reloaded, cfg = load_model(tmp_path / "ft")  # the run folder rebuilds the same class from its config alone
    assert type(reloaded) is type(vae) and cfg.model.kind == name


def test_flux2_qwenimage_wan_and_flux1_latents_equal_their_pipelines(shards, tmp_path):
    """The latents read back from latent shards against the numbers the families' own diffusers pipelines compute
    on the same images (their helper methods, on pipeline objects holding only the VAE)."""
    from diffusers.configuration_utils import FrozenDict
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    from diffusers.pipelines.flux.pipeline_flux_kontext import FluxKontextPipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline
    from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline

    from stages.encode import main as encode

    def bare(cls, **attrs):  # a pipeline object without a transformer or text encoder
        p = cls.__new__(cls)
        for k, v in attrs.items():
            object.__setattr__(p, k, v)
        return p

    images = images_by_key(shards)
    keys = sorted(images)
    x = torch.stack([images[k] for k in keys])
    for name in ("flux2", "qwenimage", "wan", "kl"):
        vae = tiny_model(name)
        vae.save_pretrained(tmp_path / name)
        r = run_main(encode, "--model", tmp_path / name, "--data", shards, "--output", tmp_path / f"lat-{name}",
                     "data.num_workers=0", f"data.resolution={RES}")
        assert r.returncode == 0, r.stderr[-3000:]
        got = latents_read_back(tmp_path / f"lat-{name}")
        ours = torch.stack([got[k] for k in keys])
        with torch.no_grad():
            if name == "flux2":
                theirs = bare(Flux2Pipeline, vae=vae)._encode_vae_image(x, torch.Generator())
            elif name == "qwenimage":
                pipe = bare(QwenImageEditPipeline, vae=vae, latent_channels=vae.config.z_dim)
                theirs = pipe._encode_vae_image(x.unsqueeze(2), torch.Generator())[:, :, 0]
            elif name == "wan":
                pipe = bare(WanImageToVideoPipeline, vae=vae, vae_scale_factor_temporal=2, vae_scale_factor_spatial=4,
                            _internal_dict=FrozenDict(expand_timesteps=True))
                theirs = torch.cat([pipe.prepare_latents(x[i:i + 1], 1, vae.config.z_dim, RES, RES, 1, torch.float32,
                                                         torch.device("cpu"), torch.Generator())[1][:, :, 0]
                                    for i in range(len(keys))])
            else:
                theirs = bare(FluxKontextPipeline, vae=vae)._encode_vae_image(x, torch.Generator())
        assert ours.shape == theirs.shape, name
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ DC-AE and FSQ
def trainer_state(run) -> dict:
    """The state a resumed Trainer holds right after loading its newest checkpoint (model, EMA, optimizer)."""
    from pipeline.config import load_config
    from pipeline.train.trainer import Trainer
    from stages.train import make_accelerator

    cfg = load_config(run / "config.yaml", ["train.tracker=none"])
    tr = Trainer(cfg, make_accelerator(cfg), "auto")
    return tr.state_dict()


def resumes_exactly(run) -> dict:
    """Asserts that a resumed Trainer holds exactly the newest checkpoint's model, EMA and optimizer state, and
    returns that checkpoint."""
    from pipeline.checkpoint import find_resume_path, load_training_checkpoint

    saved = load_training_checkpoint(find_resume_path(run))
    state = trainer_state(run)  # what --resume auto starts from
    for part in ("autoencoder", "ema"):
        assert set(state[part]) == set(saved[part])
        assert all(torch.equal(state[part][k].cpu(), saved[part][k]) for k in saved[part]), part
    opt = state["optimizer"]["state"]
    assert opt and all(torch.equal(opt[i]["exp_avg"].cpu(), saved["optimizer"]["state"][i]["exp_avg"]) for i in opt)
    return saved


@pytest.mark.parametrize("preset", ["tiny-dc", "tiny-fsq"])
def test_dc_and_fsq_presets_train_resume_exactly_evaluate_and_encode(preset, shards, tmp_path):
    from stages.encode import main as encode
    from stages.evaluate import main as evaluate

    run = tmp_path / "run"
    args = ["--config", preset, f"data.resolution={RES}", "data.num_workers=0", "data.shuffle_buffer=4",
            "train.batch_size=4", "train.tracker=none", f"data.train={shards}", f"output_dir={run}",
            "train.max_steps=400", "train.checkpoint_every=2", "train.keep_checkpoints=3"]
    sigkill_after_first_checkpoint(run, *args)
    resumes_exactly(run)

    r = run_main(evaluate, "--model", run, "--data", shards, "--output", tmp_path / "eval", "--lpips-backbone",
                 "random", "data.num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert "kl_per_sample" not in res and ("codebook" in res) == (preset == "tiny-fsq")
    if preset == "tiny-fsq":
        assert res["codebook"]["size"] == 1000  # the implicit codebook: 8 x 5 x 5 x 5
    r = run_main(encode, "--model", run, "--data", shards, "--output", tmp_path / "lat", "data.num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "lat" / "manifest.json").read_text())["store"] == \
        ("codes" if preset == "tiny-fsq" else "latent")


def test_fsq_codes_round_trip_exactly_through_encode_and_decode(shards, tmp_path):
    """Codes written to latent shards and read back decode to exactly the model's own reconstruction."""
    from pipeline.config import load_config
    from pipeline.models import build_autoencoder, family_of
    from stages.encode import main as encode
    from stages.export import main as export

    torch.manual_seed(0)
    model = build_autoencoder(load_config("tiny-fsq", [f"data.resolution={RES}"]).model, RES).eval()
    from pipeline.weights import firststage

    firststage.save(model, tmp_path / "fsq", {**{"kind": "fsq"}, **family_of(model).model_section(model)}, RES)
    r = run_main(encode, "--model", tmp_path / "fsq", "--data", shards, "--output", tmp_path / "lat",
                 "data.num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    codes, images = latents_read_back(tmp_path / "lat"), images_by_key(shards)
    fam = family_of(model)
    with torch.no_grad():
        for key, x in images.items():
            out = fam.forward(model, x[None])
            assert codes[key].dtype == torch.int64 and torch.equal(codes[key], out.codes[0])
            assert torch.equal(fam.decode_codes(model, codes[key][None]), out.reconstruction)
    r = run_main(export, "--model", tmp_path / "fsq", "--output", tmp_path / "exp", "--keep-scaling-factor")
    assert r.returncode == 2 and "diffusers has no FSQ model" in r.stderr and "firststage" in r.stderr
    r = run_main(export, "--model", tmp_path / "fsq", "--output", tmp_path / "exp", "--format", "firststage",
                 "--stats", tmp_path / "lat" / "manifest.json")
    assert r.returncode == 0, r.stderr
    again, _ = load_model(tmp_path / "exp")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_dc_ae_exports_to_a_diffusers_folder_with_equal_outputs(shards, tmp_path):
    from stages.export import main as export
    from stages.train import run

    run([*TINY_RUN, "--config", "tiny-dc", f"data.train={shards}", f"output_dir={tmp_path / 'run'}",
         "train.max_steps=2", "train.checkpoint_every=2"])
    r = run_main(export, "--model", tmp_path / "run", "--output", tmp_path / "vae", "--data", shards,
                 f"data.resolution={RES}", "data.num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    ours, _ = load_model(tmp_path / "run")
    plain = AutoencoderDC.from_pretrained(tmp_path / "vae").eval()
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    with torch.no_grad():
        assert torch.equal(plain(x).sample, ours.eval()(x).sample)
    measured = json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"]
    assert measured != ours.config.scaling_factor  # written from the measured statistics (1 / RMS: no shift in SANA)


def test_dc_ae_phases_train_only_what_they_name(shards, tmp_path):
    """Phase 1 trains everything; phase 2 only encoder.conv_out and decoder.conv_in; phase 3 only the decoder's
    head (norm_out, conv_out), with the GAN. Everything else stays bit for bit."""
    from stages.train import run

    shape = ["model.latent_channels=8", "model.dc.block_types=[ResBlock,EfficientViTBlock]",
             "model.dc.block_out_channels=[16,32]", "model.dc.encoder_layers_per_block=[1,1]",
             "model.dc.decoder_layers_per_block=[1,1]", "model.dc.qkv_multiscales=[[],[5]]",
             "model.dc.attention_head_dim=8", "model.dc.decoder_norm_types=[rms_norm,rms_norm]",
             "model.dc.decoder_act_fns=[silu,silu]"]
    small = [f"data.resolution={RES}", "data.num_workers=0", "data.shuffle_buffer=4", "train.batch_size=4",
             "train.tracker=none", f"data.train={shards}", "train.max_steps=2", "train.checkpoint_every=2",
             "train.ema_decay=0", "loss.perceptual.backbone=random"]
    p1 = run(["--config", "dc-ae-f32c32", *shape, *small, f"output_dir={tmp_path / 'p1'}"])
    before = {k: v.clone() for k, v in p1.unwrapped.vae.state_dict().items()}
    for phase, trained in (("dc-ae-f32c32-phase2", ("encoder.conv_out.", "decoder.conv_in.")),
                           ("dc-ae-f32c32-phase3", ("decoder.norm_out.", "decoder.conv_out."))):
        prev = tmp_path / ("p1" if phase.endswith("2") else "p2")
        tr = run(["--config", phase, *small, f"train.init_from={prev}", f"output_dir={tmp_path / ('p' + phase[-1])}"])
        after = tr.unwrapped.vae.state_dict()
        moved = {k for k in before if not torch.equal(before[k], after[k].cpu())}
        assert moved and all(k.startswith(trained) for k in moved), (phase, sorted(moved))
        assert all(any(k.startswith(t) for k in moved) for t in trained), (phase, sorted(moved))
        before = {k: v.clone() for k, v in after.items()}
        if phase.endswith("3"):
            assert tr.objective.discriminator is not None and tr.objective.gan_active(0)


def test_dc_ae_1_5_channel_masking_zeroes_the_latent_tail_in_training_only():
    from pipeline.config import load_config
    from pipeline.models import build_autoencoder, family_of

    cfg = load_config("tiny-dc", [f"data.resolution={RES}", "model.dc.channel_mask_step=2"])
    torch.manual_seed(0)
    model = build_autoencoder(cfg.model, RES)
    fam, x = family_of(model), torch.rand(2, 3, RES, RES) * 2 - 1
    kept = set()
    for _ in range(30):
        z = fam.forward(model.train(), x).latents
        nonzero = [c for c in range(z.shape[1]) if z[:, c].abs().sum() > 0]
        assert nonzero == list(range(len(nonzero))) and len(nonzero) % 2 == 0  # the first c' channels, c' even
        kept.add(len(nonzero))
    assert kept == {2, 4, 6, 8}  # every multiple of the step is drawn
    assert all(fam.forward(model.eval(), x).latents[:, c].abs().sum() > 0 for c in range(8))  # evaluation: all
    assert family_of(model).model_section(model)["dc"]["channel_mask_step"] == 2


def test_an_export_keeps_its_discriminator_and_a_fine_tune_continues_from_it(shards, tmp_path):
    from stages.export import main as export
    from stages.train import run

    gan = ["loss.adversarial.enabled=true", "loss.adversarial.start_step=0", "train.max_steps=2",
           "train.checkpoint_every=2", f"data.train={shards}"]
    first = run([*TINY_RUN, *gan, f"output_dir={tmp_path / 'run'}"])
    trained = {k: v.clone() for k, v in first.objective.discriminator.state_dict().items()}
    r = run_main(export, "--model", tmp_path / "run", "--output", tmp_path / "vae", "--with-discriminator",
                 "--keep-scaling-factor")
    assert r.returncode == 0 and "with its discriminator" in r.stdout, r.stderr
    assert (tmp_path / "vae" / "discriminator.safetensors").is_file()
    r = run_main(export, "--model", tmp_path / "vae", "--output", tmp_path / "v2.safetensors", "--format",
                 "single-file", "--with-discriminator", "--keep-scaling-factor")
    assert r.returncode == 2 and "--with-discriminator" in r.stderr
    second = run([*TINY_RUN, *gan, "train.max_steps=1", f"train.init_from={tmp_path / 'vae'}",
                  f"output_dir={tmp_path / 'ft'}", "train.lr=0", "train.disc_lr=1e-30"])
    # (learning rates of ~0 leave the weights as loaded: the fine-tune's discriminator is the exported one; its
    # BatchNorm statistics move with the step's batch, its parameters do not)
    got = dict(second.objective.discriminator.named_parameters())
    assert got and all(torch.allclose(p.float(), trained[k].float()) for k, p in got.items())
    fresh = run([*TINY_RUN, *gan, "train.max_steps=1", f"output_dir={tmp_path / 'fresh'}", "train.lr=0",
                 "train.disc_lr=1e-30"])  # without the export's discriminator: another one
    assert not all(torch.allclose(p.float(), trained[k].float())
                   for k, p in fresh.objective.discriminator.named_parameters())
