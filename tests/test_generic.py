"""Every other image autoencoder diffusers ships (the generic family): a tiny random model of each class of
diffusers.models.autoencoders that the registry calls an image autoencoder is evaluated, encoded (the latents read
back equal its pipeline's normalised latents) and fine-tuned through train.init_from; a class that cannot be is
refused in one line, and so are audio, video and other autoencoders. A plain diffusers VQModel (its own quantizer)
is tested here too; the other families' classes in tests/test_families.py, AutoencoderRAE in tests/test_rae.py."""

from __future__ import annotations

import json

import pytest
import torch
import diffusers
from diffusers.models import autoencoders

from harness import run_main
from helpers import make_shards

RES = 32
SD2 = dict(down_block_types=("DownEncoderBlock2D",) * 2)
GENERIC = {
    "AsymmetricAutoencoderKL": dict(**SD2, down_block_out_channels=(8, 16), up_block_types=("UpDecoderBlock2D",) * 2,
                                    up_block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                                    sample_size=RES, scaling_factor=0.5),
    "AutoencoderKLHunyuanImage": dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(32, 32),
                                      layers_per_block=1, spatial_compression_ratio=2, sample_size=RES,
                                      scaling_factor=0.75),
    "AutoencoderKLHunyuanImageRefiner": dict(latent_channels=8, block_out_channels=(8, 16), layers_per_block=1,
                                             spatial_compression_ratio=2, temporal_compression_ratio=1,
                                             scaling_factor=1.25),
    "AutoencoderKLKVAE": dict(channels=32, num_enc_blocks=1, num_dec_blocks=1, z_channels=4, ch_mult=(1, 2),
                              sample_size=RES),
    "AutoencoderKLQwenImage21": dict(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True], latents_mean=[0.1 * i for i in range(8)],
                                     latents_std=[1.0 + 0.1 * i for i in range(8)], in_channels=3, out_channels=3,
                                     is_residual=False, scale_factor_spatial=4, scale_factor_temporal=2),
    "AutoencoderKLCosmos": dict(latent_channels=4, encoder_block_out_channels=(8, 16),
                                decode_block_out_channels=(8, 16), attention_resolutions=(), resolution=RES,
                                num_layers=1, patch_size=2, spatial_compression_ratio=2, temporal_compression_ratio=2,
                                latents_mean=[0.05 * i for i in range(8)], latents_std=[1 + 0.1 * i for i in range(8)]),
    "AutoencoderKLMiniMaxH3": dict(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                   spatial_downsample_factors=(2, 1), temporal_downsample_factors=(1, 1),
                                   norm_num_groups=4, decoder_num_layers=1, decoder_num_attention_heads=2,
                                   decoder_attention_head_dim=8, decoder_num_register_tokens=1, clip_length=1,
                                   token_drop=0, latents_mean=[-0.1, 0.0, 0.1, 0.2], latents_std=[0.5, 1.0, 1.5, 2.0]),
    "AutoencoderKLTemporalDecoder": dict(**SD2, block_out_channels=(32, 32), latent_channels=4, sample_size=RES),
    "ConsistencyDecoderVAE": dict(latent_channels=4, encoder_block_out_channels=(8, 16),
                                  encoder_down_block_types=SD2["down_block_types"], encoder_layers_per_block=1,
                                  encoder_norm_num_groups=4, decoder_block_out_channels=(8, 16),
                                  decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2,
                                  decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2, decoder_layers_per_block=1,
                                  decoder_norm_num_groups=4),
}
NO_NORMALISATION = {"AutoencoderKLKVAE"}  # no latents_mean / latents_std, no scaling_factor, no pipeline
UNTRAINABLE = {"ConsistencyDecoderVAE"}  # a sampled consistency-model decoder


def test_every_autoencoder_of_diffusers_is_classified():
    from pipeline.models.families import FAMILIES
    from pipeline.models.registry import AUDIO, GENERIC as TAKEN, OTHER, VIDEO

    shipped = {n for n, c in vars(autoencoders).items() if isinstance(c, type) and hasattr(c, "config_name")}
    known = [*AUDIO, *VIDEO, *OTHER, *(c for f in FAMILIES.values() for c in f.class_names)]
    assert sorted(known) == sorted(shipped) and set(GENERIC) == set(TAKEN)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("generic")
    make_shards(root / "shards", 1, 2, size=(RES, RES))
    return root / "shards"


@torch.no_grad()
def pipeline_latent(name: str, vae, x: torch.Tensor) -> torch.Tensor:
    """The normalised latent of images x [B, 3, H, W] (the posterior's mode), written from each class's pipeline:
    Qwen-Image 2.1's _encode_vae_image (called), Cosmos video2world's prepare_latents (frame 0 of its per-frame
    latents_mean / latents_std, before its scheduler's sigma_data), HunyuanImage's refiner and SD inpainting's
    _encode_vae_image (scaling_factor), HunyuanImage 2.1 and SVD (decode divides by scaling_factor); MiniMax H3 per
    its docstring (latents_mean / latents_std)."""
    c = vae.config
    if name == "AutoencoderKLQwenImage21":
        from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline

        pipe = QwenImage21Pipeline.__new__(QwenImage21Pipeline)
        object.__setattr__(pipe, "vae", vae)
        object.__setattr__(pipe, "latent_channels", c.z_dim)
        return pipe._encode_vae_image(x.unsqueeze(2), torch.Generator())[:, :, 0]
    frame = name in ("AutoencoderKLCosmos", "AutoencoderKLMiniMaxH3", "AutoencoderKLHunyuanImageRefiner")
    z = vae.encode(x.unsqueeze(2) if frame else x).latent_dist.mode()
    if c.get("latents_mean") is not None:
        ch = z.shape[1]
        mean = torch.tensor(c.latents_mean).view(1, ch, -1, 1, 1)[:, :, :1]
        std = torch.tensor(c.latents_std).view(1, ch, -1, 1, 1)[:, :, :1]
        return ((z - mean) / std)[:, :, 0]
    return (z[:, :, 0] if frame else z) * c.scaling_factor


@pytest.mark.parametrize("name", list(GENERIC))
def test_a_generic_diffusers_autoencoder_evaluates_encodes_and_fine_tunes(name, shards, tmp_path):
    from pipeline.latents import LatentDataset
    from stages.encode import main as encode
    from stages.evaluate import main as evaluate
    from stages.train import run

    torch.manual_seed(0)
    vae = getattr(diffusers, name)(**GENERIC[name]).eval()
    vae.save_pretrained(tmp_path / "vae")
    small = ["data.num_workers=0", f"data.resolution={RES}"]
    r = run_main(evaluate, "--model", tmp_path / "vae", "--data", shards, "--output", tmp_path / "eval",
                 "--lpips-backbone", "random", "evaluate.likelihood_samples=1", "evaluate.iwae_k=1",
                 "evaluate.diffusability=false", *small)
    if name in NO_NORMALISATION:
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
        assert f"{name}: its config has neither latents_mean / latents_std nor scaling_factor" in r.stderr
        r = run_main(encode, "--model", tmp_path / "vae", "--data", shards, "--output", tmp_path / "lat", *small)
        assert r.returncode == 2 and "normalisation cannot be determined" in r.stderr, r.stderr[-2000:]
    else:
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads((tmp_path / "eval" / "eval.json").read_text())
        assert res["samples"] == 2 and res["psnr"] > 0 and ("kl_per_sample" in res) == (name != "AutoencoderKLCosmos")
        assert f"diffusers weights ({name})" in r.stdout  # the summary line names the class
        r = run_main(encode, "--model", tmp_path / "vae", "--data", shards, "--output", tmp_path / "lat", *small)
        assert r.returncode == 0, r.stderr[-3000:]
        manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
        assert manifest["kind"].startswith("generic") and manifest["model"]["class"] == name
        assert "from the model's" in r.stdout and f"({name})" in r.stdout  # and so does encode's
        got = {s["__key__"]: s["latents"] for s in LatentDataset(tmp_path / "lat", mode="eval", sample=False)}
        from test_families import images_by_key

        images = images_by_key(shards)
        assert sorted(got) == sorted(images)
        for key, x in images.items():
            torch.testing.assert_close(got[key], pipeline_latent(name, vae, x[None])[0], rtol=1e-4, atol=1e-4)

    args = ["--config", "tiny", f"data.resolution={RES}", "data.num_workers=0", "data.shuffle_buffer=2",
            "train.batch_size=2", "train.tracker=none", f"data.train={shards}", f"output_dir={tmp_path / 'ft'}",
            "train.max_steps=1", f"train.init_from={tmp_path / 'vae'}", "loss.perceptual.backbone=random"]
    if name in UNTRAINABLE:
        from stages.train import main as train

        r = run_main(train, *args)
        assert r.returncode == 2 and f"{name} cannot be trained by firststage" in r.stderr, r.stderr[-2000:]
        return
    tr = run(args)
    assert tr.cfg.model.kind.startswith("generic") and type(tr.unwrapped.vae) is type(vae)
    after, before = tr.unwrapped.vae.state_dict(), vae.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if k.startswith("decoder."))


@pytest.mark.parametrize("name", ["AutoencoderOobleck", "AutoencoderSAME", "AutoencoderKLCogVideoX",
                                  "RFD4ProteinaAutoencoder"])
def test_audio_video_and_other_autoencoders_are_refused_as_such(name, tmp_path):
    from stages.evaluate import main as evaluate

    from pipeline.models.registry import refused_class

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": name}))
    r = run_main(evaluate, "--model", tmp_path / "vae", "--data", tmp_path, "--output", tmp_path / "eval")
    assert r.returncode == 2 and r.stderr.strip().endswith(refused_class(name)), r.stderr[-2000:]
    assert r.stderr.count("\n") == 1


def test_a_plain_diffusers_vqmodel_evaluates_encodes_codes_and_fine_tunes(shards, tmp_path):
    """VQModel as diffusers saves it (its own quantizer, not firststage's), the one image class of diffusers the
    family tests do not build: codes are encoded and read back as the model's own code indices."""
    from pipeline.latents import LatentDataset
    from stages.encode import main as encode
    from stages.evaluate import main as evaluate
    from stages.train import run
    from test_families import images_by_key

    torch.manual_seed(0)
    vae = diffusers.VQModel(**SD2, up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                            latent_channels=4, norm_num_groups=4, num_vq_embeddings=16, sample_size=RES).eval()
    vae.save_pretrained(tmp_path / "vae")
    small = ["data.num_workers=0", f"data.resolution={RES}"]
    r = run_main(evaluate, "--model", tmp_path / "vae", "--data", shards, "--output", tmp_path / "eval",
                 "--lpips-backbone", "random", "evaluate.diffusability=false", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["codebook"]["size"] == 16
    r = run_main(encode, "--model", tmp_path / "vae", "--data", shards, "--output", tmp_path / "lat", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {s["__key__"]: s["latents"] for s in LatentDataset(tmp_path / "lat", mode="eval", sample=False)}
    with torch.no_grad():
        for key, x in images_by_key(shards).items():
            h = vae.quant_conv(vae.encoder(x[None]))
            codes = vae.quantize(h)[2][2].reshape(h.shape[2], h.shape[3])
            assert torch.equal(got[key], codes)
    tr = run(["--config", "tiny", f"data.resolution={RES}", "data.num_workers=0", "data.shuffle_buffer=2",
              "train.batch_size=2", "train.tracker=none", f"data.train={shards}", f"output_dir={tmp_path / 'ft'}",
              "train.max_steps=1", f"train.init_from={tmp_path / 'vae'}"])
    assert tr.cfg.model.kind == "vq" and type(tr.unwrapped.vae) is diffusers.VQModel
