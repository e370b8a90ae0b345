"""Latents that diffuse well: EQ-VAE and scale equivariance, VA-VAE's DINOv2 alignment, latent noise, and the
diffusability probe of evaluate (docs/diffusable-latents.md). Each term's value by hand on a small example; a few
steps with it on move the model the right way against the same steps with it off; a run with alignment resumes
after SIGKILL to the same state; missing DINOv2 weights stop in one line before training; every family trains with
the transforms; the presets say what their papers did."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import run_main, sigkill_after_first_checkpoint
from helpers import TINY, make_shards, random_image

pytestmark = pytest.mark.filterwarnings("ignore:.*random.*:UserWarning")
RANDOM_DINO = ["loss.alignment.enabled=true", "loss.alignment.backbone=random"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusable")
    make_shards(d, num_shards=2, per_shard=8, size=(48, 40))
    return str(d)


def images(n: int, seed: int, side: int = 32) -> torch.Tensor:
    """n smooth random uint8 images [n, 3, side, side]."""
    return torch.stack([torch.from_numpy(np.array(random_image(side, side, seed=seed + i))).permute(2, 0, 1)
                        for i in range(n)])


# ---------------------------------------------------------------------------------------------- the transforms
def test_rotation_is_eqvaes_and_the_same_for_latent_and_image():
    from pipeline.losses.equivariance import StepPlan, rotate

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert rotate(x, 1).flatten().tolist() == [3.0, 1.0, 4.0, 2.0]  # rot90(dims=[-1, -2]): a quarter turn clockwise
    assert rotate(x, 2).flatten().tolist() == [4.0, 3.0, 2.0, 1.0]
    assert rotate(x, 3).flatten().tolist() == [2.0, 4.0, 1.0, 3.0]
    assert rotate(x, 0) is x
    # a decoder that commutes with rotations exactly (nearest upsampling by the factor): decode(T(z)) == T(decode(z))
    decode = lambda z: F.interpolate(z, scale_factor=4, mode="nearest")  # noqa: E731
    z = torch.randn(2, 3, 4, 6)
    for k in (1, 2, 3):
        plan = StepPlan(4, rotation=k)
        assert torch.equal(decode(plan.latent(z)), plan.target(decode(z)))


def test_rescale_sizes_and_values_by_hand():
    from pipeline.losses.equivariance import StepPlan, resize, scaled_side

    assert (scaled_side(32, 9, 32), scaled_side(8, 9, 32), scaled_side(8, 3, 32)) == (9, 2, 1)  # floor, at least 1
    ramp = torch.arange(16.0).view(1, 1, 4, 4)
    assert resize(ramp, (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # 2x down: the 2x2 block means
    assert resize(ramp, (4, 4)) is ramp
    x, z = torch.randn(1, 3, 256, 256), torch.randn(1, 4, 32, 32)
    plan = StepPlan(8, latent_size=(9, 9), rotation=2)
    assert plan.latent(z).shape[-2:] == (9, 9) and plan.target(x).shape[-2:] == (72, 72)  # 256 px * 9/32
    # zelaki/eqvae at 256 px: F.interpolate(scale_factor=s, bilinear, align_corners=False), then the same rot90
    ref = torch.rot90(F.interpolate(x, scale_factor=9 / 32, mode="bilinear", align_corners=False), 2, dims=[-1, -2])
    assert torch.allclose(plan.target(x), ref, atol=1e-5)
    # scale equivariance: decode(downsample(z)) against downsample(x) by the same factor
    plan = StepPlan(8, extra_factor=4)
    assert plan.extra_latent(z).shape[-2:] == (8, 8) and plan.extra_target(x).shape[-2:] == (64, 64)


def test_eqvae_draws_its_branches_and_its_transform_grid():
    from pipeline.config import load_config
    from pipeline.losses.equivariance import draw_plan

    loss = load_config("kl-f8", ["loss.equivariance.enabled=true"]).loss
    random.seed(0)
    plans = [draw_plan(loss, (8, 3, 256, 256), 8) for _ in range(4000)]
    eq = [p for p in plans if p.equivariant]
    low = [p for p in plans if p.encode_size]
    assert abs(len(eq) / 4000 - 0.5) < 0.03 and abs(len(low) / 4000 - 0.125) < 0.02  # p 0.5, then 25% of the rest
    assert {p.latent_size for p in eq} == {(s, s) for s in range(8, 32)}  # s in {8..31}/32, one for both axes
    assert {p.rotation for p in eq} == {1, 2, 3}  # always with a rotation
    assert {p.encode_size for p in low} == {(8 * s, 8 * s) for s in range(8, 32)}
    aniso = load_config("kl-f8", ["loss.equivariance.enabled=true", "loss.equivariance.anisotropic=true",
                                  "loss.equivariance.p=1.0"]).loss
    assert any(p.latent_size[0] != p.latent_size[1] for p in (draw_plan(aniso, (1, 3, 256, 256), 8) for _ in range(50)))
    scale = load_config("kl-f8", ["loss.equivariance.enabled=true", "loss.equivariance.mode=scale"]).loss
    drawn = [draw_plan(scale, (1, 3, 256, 256), 8) for _ in range(200)]
    assert {p.extra_factor for p in drawn} == {2, 4} and not any(p.equivariant for p in drawn)  # p 1.0 in this mode


def test_latent_noise_by_hand():
    from pipeline.losses.equivariance import noisy_latent

    z = torch.full((3, 2, 4, 4), 2.0)
    torch.manual_seed(0)
    t, eps = torch.rand(3, 1, 1, 1), torch.randn(3, 2, 4, 4)
    torch.manual_seed(0)
    assert torch.allclose(noisy_latent(z, "interpolate", 3.0), (1 - t) * z + t * 3.0 * eps)  # l-DeTok
    torch.manual_seed(0)
    assert torch.allclose(noisy_latent(z, "additive", 0.8), z + t * 0.8 * eps)  # RAE, sigma-VAE


def test_a_transformed_image_too_small_for_lpips_is_refused_at_load():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"loss.equivariance: its smallest transformed image is 8 px.*16 px"):
        load_config("tiny", ["data.resolution=32", "loss.equivariance.enabled=true", "loss.perceptual.weight=1"])
    load_config("tiny", ["data.resolution=32", "loss.equivariance.enabled=true"])  # no LPIPS, no GAN: any size


# ---------------------------------------------------------------------------------------------- alignment
def test_vf_loss_margins_by_hand():
    from pipeline.losses.alignment import vf_loss

    # two tokens: z = (1, 0), (0, 1); f = (1, 0), (1, 1) -> cosines 1 and 1/sqrt(2); similarity matrices I and
    # [[1, c], [c, 1]] with c = 1/sqrt(2)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    f = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    c = 1 / math.sqrt(2)
    loss, parts = vf_loss(z, f, cos_margin=0.0, distmat_margin=0.0)
    assert parts["vf_cos_term"].item() == pytest.approx((0 + (1 - c)) / 2)
    assert parts["vf_distmat"].item() == pytest.approx(2 * c / 4)  # |I - S_f| off the diagonal, mean over 4 pairs
    assert loss.item() == pytest.approx((1 - c) / 2 + c / 2) and parts["vf_cos"].item() == pytest.approx((1 + c) / 2)
    loss, parts = vf_loss(z, f, cos_margin=0.5, distmat_margin=0.25)  # VA-VAE's margins
    assert parts["vf_cos_term"].item() == 0.0  # 1 - 0.5 - cos < 0 for both tokens
    assert parts["vf_distmat"].item() == pytest.approx(2 * (c - 0.25) / 4)
    loss, _ = vf_loss(z, f, 0.0, 0.0, cos_weight=2.0, distmat_weight=0.5)
    assert loss.item() == pytest.approx(2 * (1 - c) / 2 + 0.5 * c / 2)


def test_adaptive_alignment_weight_is_the_gradient_ratio_at_the_encoders_last_layer():
    """w_vf = 0.1 ||grad nll|| / (||grad vf|| + 1e-4) at encoder.conv_out.weight, each taken the textbook way (its own
    autograd.grad of its own loss), and what is backpropagated has the gradient of the whole objective."""
    from pipeline.config import load_config
    from pipeline.losses import FirstStageObjective
    from pipeline.models.autoencoder import build_autoencoder, last_decoder_layer, run_autoencoder

    cfg = load_config("tiny", ["data.resolution=32", *RANDOM_DINO, "loss.kl.weight=0.01", "loss.perceptual.weight=0.5",
                               "loss.adversarial.enabled=true", "loss.adversarial.start_step=0"])
    torch.manual_seed(0)
    model = build_autoencoder(cfg.model, 32)
    obj = FirstStageObjective(cfg.loss, True, 3, cfg.model.latent_channels)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    enc = model.encoder.conv_out.weight

    def forward():
        torch.manual_seed(1)  # the same posterior sample every time
        return run_autoencoder(model, x)

    out = forward()
    loss, terms = obj.autoencoder_terms(x, out, 0, last_decoder_layer(model), encoder_layer=enc)
    params = [*model.parameters(), *obj.alignment.projection.parameters()]
    got = torch.autograd.grad(loss, params)

    out = forward()
    nll = obj._nll(x, out.reconstruction, {})
    vf, _ = obj.alignment(out.latents, x)
    (g_nll,) = torch.autograd.grad(nll, enc, retain_graph=True)
    (g_vf,) = torch.autograd.grad(vf, enc, retain_graph=True)
    assert torch.allclose(terms["vf_weight"], 0.1 * g_nll.norm() / (g_vf.norm() + 1e-4), rtol=1e-4)
    assert terms["vf_weight"] > 0 and terms["vf"] > 0 and "vf_cos" in terms

    from pipeline.losses.adversarial import generator_loss
    from pipeline.losses.kl import kl_loss

    g = generator_loss(obj.discriminator(out.reconstruction), "hinge")
    whole = nll + 0.01 * kl_loss(out.mean, out.logvar) + terms["gan_weight"] * g + terms["vf_weight"] * vf
    want = torch.autograd.grad(whole, params)
    for a, b in zip(got, want):  # float32 sums in another order: equal to 1e-5 of each gradient's size
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-7
    assert torch.allclose(terms["loss"], whole.detach(), rtol=1e-5)


def test_dinov2_loads_from_a_transformers_folder_and_from_timms_names(tmp_path):
    from safetensors.torch import save_file

    from pipeline.models.foundation import DINOv2Features, load_dinov2, random_dinov2

    model = random_dinov2()
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    want = DINOv2Features(model)(x)
    assert want.shape == (2, 128, 16, 16)  # 224 px / patch 14, CLS dropped
    model.save_pretrained(tmp_path / "dinov2")
    assert torch.equal(DINOv2Features(load_dinov2(str(tmp_path / "dinov2")))(x), want)
    # timm's names (hub folder timm/vit_large_patch14_dinov2.lvd142m): written from the transformers model
    names = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    state, timm = model.state_dict(), {}
    for k, v in state.items():
        if k in names:
            timm[names[k]] = v
        elif k.startswith("encoder.layer.") and ".q_proj." in k:
            i, leaf = k.split(".")[2], k.rsplit(".", 1)[1]
            parts = [state[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            timm[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts)
        elif k.startswith("encoder.layer.") and not any(p in k for p in ("k_proj", "v_proj")):
            i, rest = k.split(".")[2], k.split(".", 3)[3]
            for a, b in (("attention.o_proj", "attn.proj"), ("layer_scale1.lambda1", "ls1.gamma"),
                         ("layer_scale2.lambda1", "ls2.gamma")):
                rest = rest.replace(a, b)
            timm[f"blocks.{i}.{rest}"] = v
    (tmp_path / "timm").mkdir()
    save_file({k: v.contiguous() for k, v in timm.items()}, str(tmp_path / "timm" / "model.safetensors"))
    (tmp_path / "timm" / "config.json").write_text(json.dumps({"architecture": "vit_large_patch14_dinov2"}))
    for where in (tmp_path / "timm", tmp_path / "timm" / "model.safetensors"):
        assert torch.equal(DINOv2Features(load_dinov2(str(where)))(x), want)


def test_dinov2_features_equal_timms_on_the_same_weights():
    """What VA-VAE computes (timm's vit_*_dinov2 with dynamic_img_size, forward_features[:, 1:]), on random weights;
    transformers' own forward differs (its position embedding is resampled without antialiasing)."""
    import timm  # the test extra
    from pipeline.models.foundation import DINOv2Features, _dinov2_classes, timm_to_transformers

    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=518, patch_size=14, embed_dim=128, depth=2,
                                                           num_heads=2, init_values=1.0, dynamic_img_size=True,
                                                           num_classes=0).eval()
    config, model_cls = _dinov2_classes()
    ours = model_cls(config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=518,
                            layer_norm_eps=1e-6))
    ours.load_state_dict(timm_to_transformers(ref.state_dict(), set(ours.state_dict())), strict=False)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        want = ref.forward_features(F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False))[:, 1:]
    assert torch.equal(DINOv2Features(ours)(x), want.transpose(1, 2).reshape(2, 128, 16, 16))


# ---------------------------------------------------------------------------------------------- the probe
def test_probe_spectrum_and_equivariance_by_hand():
    from pipeline.metrics.diffusability import DiffusabilityProbe, dct2, dct_matrix, spectrum_energy

    c = dct_matrix(8)
    assert torch.allclose(c @ c.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    import scipy.fft as scipy_fft  # scikit-image's dependency (the test extra)
    z = torch.randn(2, 3, 8, 6)
    assert torch.allclose(dct2(z), torch.from_numpy(scipy_fft.dctn(z.double().numpy(), axes=(-2, -1), norm="ortho")))
    # DCT basis images: (6, 6) lies above half the Nyquist frequency (radius 1.06), (1, 2) below (0.28)
    basis = lambda k, m: torch.outer(c[k], c[m]).float()  # noqa: E731
    z = torch.stack([basis(6, 6) + 2 * basis(1, 2) + 5.0, torch.full((8, 8), 3.0)])[None]
    high, total = spectrum_energy(z)
    assert high.tolist() == pytest.approx([1.0, 0.0], abs=1e-5) and total.tolist() == pytest.approx([5.0, 0.0], abs=1e-5)
    # an identity autoencoder commutes with every transform: 100 dB (the clamp) everywhere
    probe = DiffusabilityProbe(3, 8)
    x = images(2, 0, 8).float() / 127.5 - 1
    probe.add(lambda zt: zt, x, x, 1)
    res = probe.results(probe.sums, 2)
    assert res["equivariance_psnr"] == {"scale_1/2": 100.0, "rot90": 100.0, "rot180": 100.0, "rot270": 100.0}
    # one that transposes its latent commutes with 180 degrees only
    probe = DiffusabilityProbe(3, 8)
    probe.add(lambda zt: zt.transpose(-1, -2), x, x, 1)
    eq = probe.results(probe.sums, 2)["equivariance_psnr"]
    assert eq["rot180"] < 100 and eq["rot90"] < 100 and eq["scale_1/2"] < 100


def test_evaluate_reports_the_probe_in_eval_json_and_the_table(tiny_run):
    res = json.loads((tiny_run / "run" / "eval.json").read_text())
    probe = res["diffusability"]
    assert set(probe["equivariance_psnr"]) == {"scale_1/2", "rot90", "rot180", "rot270"}
    assert all(0 < v <= 100 for v in probe["equivariance_psnr"].values())
    assert 0 <= probe["high_frequency_share"] <= 1 and len(probe["high_frequency_share_per_channel"]) == 4
    table = (tiny_run / "run" / "eval.md").read_text()
    assert "| equivariance PSNR, scale 1/2 (dB) |" in table and "| equivariance PSNR, rotation 270 (dB) |" in table
    assert "| latent high-frequency share (DCT energy above Nyquist/2) |" in table


# ---------------------------------------------------------------------------------------------- a few steps
def trainer(shards, run, *over):
    from pipeline.config import load_config
    from pipeline.train.trainer import Trainer
    from stages.train import make_accelerator

    cfg = load_config("tiny", ["data.resolution=32", f"data.train={shards}", f"output_dir={run}", "train.tracker=none",
                               "data.num_workers=0", "train.batch_size=8", "train.ema_decay=0", *over])
    return Trainer(cfg, make_accelerator(cfg))


def steps(tr, batches: torch.Tensor, n: int) -> None:
    """n optimizer steps on fixed batches (what fit() runs per step, without the loader)."""
    for i in range(n):
        _, bad, bad_loss = tr.train_step(batches[i % len(batches)])
        assert tr.apply_or_skip(bad, bad_loss, False)[0]
        tr.advance()


def test_equivariance_steps_lower_the_equivariance_error(shards, tmp_path):
    """The same 20 steps from the same start, with the EQ-VAE term (p = 1) and without: the gap between the plain
    PSNR and the PSNR of decode(T(z)) against T(x) on held-out images shrinks."""
    from pipeline.metrics.evaluator import Evaluator

    train, held_out = images(16, 100).view(2, 8, 3, 32, 32), images(8, 500)
    gaps = {}
    for name, over in (("off", []), ("on", ["loss.equivariance.enabled=true", "loss.equivariance.p=1.0"])):
        tr = trainer(shards, tmp_path / name, *over)
        steps(tr, train, 20)
        ev = Evaluator(tr.unwrapped.vae.eval(), tr.cfg.evaluate, {}, 32)
        ev.add(held_out, [f"k{i}" for i in range(8)])
        res = ev.finalize()
        gaps[name] = res["psnr"] - np.mean(list(res["diffusability"]["equivariance_psnr"].values()))
    assert gaps["on"] < gaps["off"] - 0.2, gaps


def test_alignment_steps_raise_the_cosine_to_the_foundation_features(shards, tmp_path):
    """The same 30 steps from the same start (the same projection), with the VF loss at VA-VAE's weight and at 0:
    the latent's cosine to the DINOv2 features on held-out images rises, the distance-matrix term falls."""
    from pipeline.pixels import to_model_input

    train, held_out = images(16, 100).view(4, 4, 3, 32, 32), to_model_input(images(8, 500))
    parts = {}
    for name, weight in (("off", "0.0"), ("on", "0.1")):
        tr = trainer(shards, tmp_path / name, *RANDOM_DINO, f"loss.alignment.weight={weight}", "train.batch_size=4")
        steps(tr, train, 30)
        with torch.no_grad():
            z = tr.unwrapped.vae.encode(held_out).latent_dist.mean
            parts[name] = tr.objective.alignment(z, held_out)[1]
    assert parts["on"]["vf_cos"] > parts["off"]["vf_cos"] + 0.01, parts
    assert parts["on"]["vf_distmat"] < parts["off"]["vf_distmat"], parts


# ---------------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("name", ["kl", "vq", "fsq", "dc", "flux2", "qwenimage", "wan", "tiny"])
def test_every_family_trains_with_rescaled_rotated_noisy_latents_and_alignment(name):
    from pipeline.config import load_config
    from pipeline.losses import FirstStageObjective
    from pipeline.losses.equivariance import StepPlan
    from pipeline.models.autoencoder import build_autoencoder, family_of
    from pipeline.train.module import TrainableAutoencoder

    if name in ("vq", "fsq"):
        vae = build_autoencoder(load_config("tiny-fsq" if name == "fsq" else "tiny", [f"model.kind={name}"]).model, 32)
    else:
        from test_families import tiny_model

        vae = tiny_model(name)
    fam = family_of(vae)
    module = TrainableAutoencoder(vae).train()
    cfg = load_config("tiny", RANDOM_DINO).loss
    obj = FirstStageObjective(cfg, fam.has_posterior, 3, fam.latent_channels(vae))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = 32 // fam.downsampling_factor(vae)
    for plan in (StepPlan(fam.downsampling_factor(vae), latent_size=(max(1, h // 2), h), rotation=1,
                          noise=("interpolate", 3.0)),
                 StepPlan(fam.downsampling_factor(vae), encode_size=(16, 16) if h >= 2 else None, extra_factor=2)):
        out = module(x, plan)
        assert out.reconstruction.shape[-2:] == plan.target(plan.input(x)).shape[-2:]
        loss, terms = obj.autoencoder_terms(x, out, 0, fam.last_decoder_layer(vae), plan=plan,
                                            encoder_layer=fam.last_encoder_layer(vae))
        vae.zero_grad()
        loss.backward()
        assert torch.isfinite(terms["loss"]) and terms["vf_weight"] > 0
        assert fam.last_encoder_layer(vae).grad.abs().sum() > 0 and obj.alignment.projection.weight.grad is not None


# ---------------------------------------------------------------------------------------------- runs
def test_alignment_run_resumes_after_sigkill_with_its_projection_exactly(shards, tmp_path):
    from pipeline.checkpoint import find_resume_path, load_training_checkpoint
    from test_families import trainer_state

    run = tmp_path / "run"
    sigkill_after_first_checkpoint(run, *TINY, "train.tracker=none", f"data.train={shards}", f"output_dir={run}",
                                   "train.max_steps=400", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                                   *RANDOM_DINO, "loss.equivariance.enabled=true", "loss.latent_noise.kind=additive")
    saved = load_training_checkpoint(find_resume_path(run))
    assert set(saved["objective"]) == {"alignment.projection.weight"}  # the frozen DINOv2 is not training state
    state = trainer_state(run)  # what --resume auto starts from
    for part in ("autoencoder", "ema", "objective"):
        assert set(state[part]) == set(saved[part])
        assert all(torch.equal(state[part][k].cpu(), saved[part][k]) for k in saved[part]), part
    opt = state["optimizer"]["state"]
    assert len(opt) == len(saved["optimizer"]["state"])  # the projection's moments included
    assert all(torch.equal(opt[i][k].cpu(), saved["optimizer"]["state"][i][k]) for i in opt for k in ("exp_avg", "exp_avg_sq"))
    assert state["rng"]["python"] == saved["rng"]["python"]  # the next draw of transforms is the same


def test_missing_dinov2_weights_stop_in_one_line_before_training(shards, tmp_path):
    from stages.train import main

    missing = tmp_path / "dinov2-large"
    r = run_main(main, "--config", "va-vae-f16c32", f"loss.alignment.model={missing}", f"data.train={shards}",
                 f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert f"loss.alignment.model {missing}: no DINOv2 weights there" in lines[0]
    assert "huggingface-cli download facebook/dinov2-large" in lines[0] and f"--local-dir {missing}" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_stage_continues_the_previous_stages_projection(shards, tmp_path):
    """VA-VAE's stages 2 and 3 start from the previous stage's whole state (vavae/main.py init_weight): with
    train.init_from a run, the alignment projection (and the discriminator) continue."""
    from pipeline.checkpoint import find_resume_path, load_training_checkpoint
    from stages.train import run

    run([*TINY, "train.tracker=none", f"data.train={shards}", f"output_dir={tmp_path / 'stage1'}",
         "train.max_steps=2", "train.checkpoint_every=2", *RANDOM_DINO, "loss.alignment.weight=0.5"])
    first = load_training_checkpoint(find_resume_path(tmp_path / "stage1"))["objective"]
    tr = trainer(shards, tmp_path / "stage2", *RANDOM_DINO, f"train.init_from={tmp_path / 'stage1'}")
    assert torch.equal(tr.objective.alignment.projection.weight, first["alignment.projection.weight"])


def test_presets_are_the_papers_recipes():
    from pipeline.config import load_config

    eq = load_config("eq-vae-ft")
    e = eq.loss.equivariance
    assert e.enabled and e.mode == "eq-vae" and e.p == 0.5 and e.scale_range == [8, 31] and e.scale_denominator == 32
    assert e.rotations == [1, 2, 3] and e.prior_low_res == 0.25 and not e.anisotropic and e.antialias is False
    assert eq.loss.adversarial.start_step == 0 and eq.train.lr_scale == "per_sample"
    assert eq.train.lr * eq.train.batch_size * eq.train.grad_accum * 8 == pytest.approx(7.2e-4)  # 8 GPUs
    stages = [load_config(n) for n in ("va-vae-f16c32", "va-vae-f16c32-stage2", "va-vae-f16c32-stage3")]
    assert [(s.loss.alignment.weight, s.loss.alignment.cos_margin, s.loss.alignment.distmat_margin)
            for s in stages] == [(0.5, 0.0, 0.0), (0.1, 0.0, 0.0), (0.1, 0.5, 0.25)]
    assert [s.loss.adversarial.start_step for s in stages] == [5001, 1, 1]
    assert [s.train.max_steps for s in stages] == [500500, 75000, 75000]  # 100, 15, 15 ImageNet epochs at 256
    va = stages[0]
    assert va.model.downsampling_factor == 16 and va.model.diffusers["latent_channels"] == 32
    assert va.train.lr == 1e-4 and va.train.lr_scale == "absolute" and va.loss.alignment.adaptive_weight
    se = load_config("scale-eq-ft").loss.equivariance
    assert se.mode == "scale" and se.scale_factors == [2, 4] and se.scale_weight == 0.25 and se.p == 1.0


def test_the_docs_name_only_keys_and_presets_that_exist():
    import re

    from harness import ROOT
    from pipeline.config import CONFIG_DIR, describe_fields

    text = (ROOT / "docs" / "diffusable-latents.md").read_text()
    keys = {k for k, _, _ in describe_fields()}
    named = set(re.findall(r"(?<![./\w])((?:data|model|loss|train|evaluate)\.[a-z0-9_]+(?:\.[a-z0-9_]+)*)", text))
    named = {k for k in named if not re.search(r"\.(py|md|yaml|json|safetensors)$", k)}
    assert len(named) >= 10
    assert sorted(k for k in named if k not in keys and not any(f.startswith(k + ".") for f in keys)) == []
    presets = set(re.findall(r"--config ([\w-]+)", text)) | set(re.findall(r"`([\w-]+)` preset", text))
    assert presets >= {"eq-vae-ft", "va-vae-f16c32", "scale-eq-ft"}
    assert all((CONFIG_DIR / f"{p}.yaml").is_file() for p in presets), presets
