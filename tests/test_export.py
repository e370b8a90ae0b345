"""Export (diffusers folder, single file with LDM names, encoder only) and import (every format as --model and as
train.init_from), against diffusers' own loaders and conversion."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TINY, make_shards, run_main
from pipeline.config import load_config
from pipeline.weights.diffusers import save as save_diffusers
from pipeline.models import build_autoencoder


def export(*args):
    from stages.export import main

    return run_main(main, *args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny KL run (a few steps), its shards, and its evaluation (which holds the measured latent factors)."""
    from stages.evaluate import main as evaluate
    from stages.train import run

    root = tmp_path_factory.mktemp("export")
    make_shards(root / "shards", 2, 8, size=(48, 40))
    run([*TINY, f"data.train={root / 'shards'}", f"output_dir={root / 'run'}", "train.max_steps=4",
         "train.checkpoint_every=4", "model.mid_block_attention=true"])  # attention: its 1x1-conv names are tested
    r = run_main(evaluate, "--model", root / "run", "--data", root / "shards", "--lpips-backbone", "random",
                 "evaluate.likelihood_samples=0")
    assert r.returncode == 0, r.stderr
    return root


def images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def outputs(model, x):
    """(posterior mean or pre-quantisation latent, reconstruction from it) of any KL / VQ model."""
    with torch.no_grad():
        if hasattr(model, "quantize"):
            h = model.quant_conv(model.encoder(x))
            return h, model.decode(h).sample
        mean = model.encode(x).latent_dist.mean
        return mean, model.decode(mean).sample


def test_diffusers_folder_loads_in_plain_diffusers_with_the_measured_scaling_factor(trained, tmp_path):
    from diffusers import AutoencoderKL

    from helpers import load_model

    r = export("--model", trained / "run", "--output", tmp_path / "vae")
    assert r.returncode == 0, r.stderr
    ev = json.loads((trained / "run" / "eval.json").read_text())
    assert f"from {trained / 'run' / 'eval.json'}" in r.stdout
    plain = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert plain.config.scaling_factor == ev["latents"]["scaling_factor"]  # the measured one, not the preset's 1.0
    assert plain.config.shift_factor is None  # only with --shift
    ours, _ = load_model(trained / "run")
    x = images()
    for a, b in zip(outputs(ours, x), outputs(plain, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    card = (tmp_path / "vae" / "README.md").read_text()
    assert "step 4" in card and "| PSNR (dB) |" in card and "from_pretrained" in card
    assert not list(tmp_path.glob(".*.tmp"))


def test_vq_export_matches_and_a_cosine_codebook_is_refused(tmp_path):
    from diffusers import VQModel

    torch.manual_seed(0)
    vq = build_autoencoder(load_config("tiny", ["model.kind=vq"]).model, 32).eval()
    save_diffusers(vq, tmp_path / "ours")  # a firststage-built VQ model, with our quantizer
    r = export("--model", tmp_path / "ours", "--output", tmp_path / "vq", "--keep-scaling-factor")
    assert r.returncode == 0, r.stderr
    plain = VQModel.from_pretrained(tmp_path / "vq").eval()
    x = images()
    for a, b in zip(outputs(vq, x), outputs(plain, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    cosine = build_autoencoder(load_config("tiny", ["model.kind=vq", "model.codebook.cosine=true"]).model, 32)
    torch.save(cosine.state_dict(), tmp_path / "unused.pt")  # (the refusal does not depend on the file)
    from pipeline.errors import UserError
    from pipeline.weights.diffusers import to_plain_diffusers

    with pytest.raises(UserError, match="cosine .* codebook"):
        to_plain_diffusers(cosine)


def test_single_file_loads_in_diffusers_from_single_file_and_in_firststage(trained, tmp_path):
    from diffusers import AutoencoderKL

    from helpers import load_model

    assert export("--model", trained / "run", "--output", tmp_path / "vae").returncode == 0
    r = export("--model", trained / "run", "--output", tmp_path / "vae.safetensors", "--format", "single-file")
    assert r.returncode == 0, r.stderr
    state = load_file(tmp_path / "vae.safetensors")
    assert "encoder.down.0.block.0.norm1.weight" in state and state["encoder.mid.attn_1.q.weight"].dim() == 4
    assert "quant_conv.weight" in state and "post_quant_conv.weight" in state
    single = AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(tmp_path / "vae")).eval()
    ours, _ = load_model(trained / "run")
    again, cfg = load_model(tmp_path / "vae.safetensors")
    x = images()
    for a, b, c in zip(outputs(ours, x), outputs(single, x), outputs(again, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    ev = json.loads((trained / "run" / "eval.json").read_text())
    assert cfg.model.scaling_factor == ev["latents"]["scaling_factor"] and cfg.model.norm_num_groups == 8
    assert (tmp_path / "vae.md").is_file()


def test_single_file_is_the_exact_inverse_of_diffusers_conversion(tmp_path):
    """diffusers -> our single file -> diffusers' own LDM-to-diffusers conversion gives every tensor back."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from pipeline.weights.single_file import save as save_single_file

    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.layers_per_block=2"])
    model = build_autoencoder(cfg.model, 32)
    save_single_file(model, tmp_path / "sd.safetensors", {}, 32, 0.5, prefix="first_stage_model.")
    ldm = load_file(tmp_path / "sd.safetensors")
    assert all(k.startswith("first_stage_model.") for k in ldm)
    back = convert_ldm_vae_checkpoint(ldm, dict(model.config))
    own = model.state_dict()
    assert sorted(back) == sorted(own)
    assert all(torch.equal(back[k], own[k]) for k in own)


def test_encoder_only_export_and_its_program_reproduce_the_latents(trained, tmp_path):
    from helpers import load_model

    r = export("--model", trained / "run", "--output", tmp_path / "enc", "--format", "encoder-only")
    assert r.returncode == 0, r.stderr
    enc, _ = load_model(tmp_path / "enc")
    full, _ = load_model(trained / "run")
    assert enc.decoder is None
    assert sum(p.numel() for p in enc.parameters()) < 0.6 * sum(p.numel() for p in full.parameters())
    x = images(4, size=48)  # another batch size and resolution than the example it was exported with
    with torch.no_grad():
        ref = full.encode(x).latent_dist
        got = enc.encode(x).latent_dist
        mean, logvar = torch.export.load(str(tmp_path / "enc" / "encoder.pt2")).module()(x)
    assert torch.equal(got.mean, ref.mean)
    torch.testing.assert_close(mean, ref.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, ref.logvar, rtol=1e-5, atol=1e-5)
    # and the encode stage runs on it
    from stages.encode import main as encode

    r = run_main(encode, "--model", tmp_path / "enc", "--data", trained / "shards", "--output", tmp_path / "lat",
                 "data.num_workers=0")
    assert r.returncode == 0 and "16 samples" in r.stdout, r.stderr


def test_exported_vae_runs_as_the_vae_of_a_dit_pipeline(trained, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    assert export("--model", trained / "run", "--output", tmp_path / "vae").returncode == 0
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                        norm_num_groups=4)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(), id2label={0: "cat"})
    out = pipe(class_labels=[0, 1], num_inference_steps=2, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 32, 32, 3) and float(out.images.min()) >= 0 and float(out.images.max()) <= 1


def ldm_file(tmp_path, model, name, prefix="", extra=None, fmt="safetensors"):
    from pipeline.weights.ldm import diffusers_to_ldm

    state = diffusers_to_ldm({k: v.detach() for k, v in model.state_dict().items()}, prefix)
    state.update(extra or {})
    path = tmp_path / name
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 7}, path)  # an LDM .ckpt: plain tensors and numbers
    return path


@pytest.mark.parametrize("form", ["run", "checkpoint", "diffusers", "pipeline-vae", "single-file",
                                  "full-sd-checkpoint", "legacy-ckpt"])
def test_every_import_format_trains_via_init_from(trained, tmp_path, form):
    from pipeline.checkpoint import find_resume_path
    from helpers import load_model
    from stages.train import run

    start, _ = load_model(trained / "run")
    if form == "run":
        src = trained / "run"
    elif form == "checkpoint":
        src = find_resume_path(trained / "run")
    elif form in ("diffusers", "pipeline-vae"):
        src = tmp_path / "pipe" if form == "pipeline-vae" else tmp_path / "vae"
        save_diffusers(start, tmp_path / "pipe" / "vae" if form == "pipeline-vae" else src)
    elif form == "single-file":
        src = ldm_file(tmp_path, start, "vae.safetensors")
    elif form == "full-sd-checkpoint":  # the VAE under first_stage_model., beside a U-Net's tensors
        src = ldm_file(tmp_path, start, "sd.safetensors", "first_stage_model.",
                       {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)})
    else:
        src = ldm_file(tmp_path, start, "vae.ckpt", "first_stage_model.", fmt="ckpt")
    tr = run([*TINY, f"data.train={trained / 'shards'}", f"output_dir={tmp_path / 'ft'}", "train.max_steps=2",
              f"train.init_from={src}", "train.freeze_encoder=true", "model.mid_block_attention=true"])
    after = tr.unwrapped.vae.state_dict()
    before = start.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if k.startswith("decoder."))


def test_shape_mismatch_names_the_tensor(trained, tmp_path):
    from helpers import load_model
    from pipeline.errors import UserError

    start, _ = load_model(trained / "run")
    src = ldm_file(tmp_path, start, "vae.safetensors")
    with pytest.raises(UserError, match=r"encoder.conv_out.weight has shape \(8, 64, 3, 3\) in the weights but "
                                        r"\(16, 64, 3, 3\) in the config's model"):
        load_model(src, overrides=["model.latent_channels=8"])
    from stages.train import run

    with pytest.raises(UserError, match=r"train.init_from .*: encoder.conv_out.weight has shape"):
        run([*TINY, f"data.train={trained / 'shards'}", f"output_dir={tmp_path / 'x'}", "train.max_steps=1",
             f"train.init_from={src}", "model.latent_channels=8", "model.mid_block_attention=true"])


class RunsCode:
    """Unpickling this calls os.system: what a hostile .ckpt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_ckpt_whose_pickle_would_run_code_is_refused_and_nothing_runs(trained, tmp_path):
    from stages.evaluate import main as evaluate

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "payload": RunsCode(marker)},
               tmp_path / "evil.ckpt")
    r = run_main(evaluate, "--model", tmp_path / "evil.ckpt", "--data", trained / "shards")
    assert r.returncode == 2 and "refused" in r.stderr and "never does" in r.stderr
    assert "weights_only=False" not in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_scaling_factor_sources_and_refusals(trained, tmp_path):
    from stages.encode import main as encode

    vae = tmp_path / "plain"
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), vae)
    r = export("--model", vae, "--output", tmp_path / "a")
    assert r.returncode == 2 and "no measured latent statistics" in r.stderr and "--keep-scaling-factor" in r.stderr
    assert not (tmp_path / "a").exists()
    assert run_main(encode, "--model", vae, "--data", trained / "shards", "--output", tmp_path / "lat",
                    "data.resolution=32", "data.num_workers=0").returncode == 0
    st = json.loads((tmp_path / "lat" / "manifest.json").read_text())["statistics"]
    r = export("--model", vae, "--output", tmp_path / "b", "--stats", tmp_path / "lat" / "manifest.json", "--shift")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["scaling_factor"] == st["scaling_factor"] and cfg["shift_factor"] == st["shift_factor"]
    r = export("--model", vae, "--output", tmp_path / "c", "--data", trained / "shards", "--num-samples", "100",
               "data.resolution=32")
    assert r.returncode == 0 and "measured on 16 samples" in r.stdout, r.stderr
    measured = json.loads((tmp_path / "c" / "config.json").read_text())["scaling_factor"]
    assert measured == pytest.approx(st["scaling_factor"], rel=1e-9)  # the same 16 images, the same statistic
    r = export("--model", vae, "--output", tmp_path / "c", "--keep-scaling-factor")
    assert r.returncode == 2 and "exists" in r.stderr and "--overwrite" in r.stderr
    other = tmp_path / "other"
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), other)
    r = export("--model", other, "--output", tmp_path / "d", "--stats", tmp_path / "lat" / "manifest.json")
    assert r.returncode == 2 and "latents of another model" in r.stderr
