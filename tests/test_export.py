"""Export (diffusers folder, single file with LDM names, encoder only) and import (every format as --model and as
train.init_from), against diffusers' own loaders and conversion."""

import json
import os
from pathlib import Path

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import run_main
from helpers import TINY
from pipeline.config import load_config
from pipeline.weights.diffusers import save as save_diffusers
from pipeline.models import build_autoencoder


def export(*args):
    from stages.export import main

    return run_main(main, *args)


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


def test_diffusers_folder_loads_in_plain_diffusers_with_the_measured_scaling_factor(tiny_run, tmp_path):
    from diffusers import AutoencoderKL

    from helpers import load_model

    r = export("--model", tiny_run / "run", "--output", tmp_path / "vae")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tiny_run / "run" / "eval.json").read_text())
    assert f"from {tiny_run / 'run' / 'eval.json'}" in r.stdout
    plain = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert plain.config.scaling_factor == ev["latents"]["scaling_factor"]  # the measured one, not the preset's 1.0
    assert plain.config.shift_factor == ev["latents"]["shift_factor"]  # LatentDataset subtracts it too
    ours, _ = load_model(tiny_run / "run")
    x = images()
    for a, b in zip(outputs(ours, x), outputs(plain, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    card = (tmp_path / "vae" / "README.md").read_text()
    assert "step 40" in card and "| PSNR (dB) |" in card and "from_pretrained" in card
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


def test_single_file_loads_in_diffusers_from_single_file_and_in_firststage(tiny_run, tmp_path):
    from diffusers import AutoencoderKL

    from helpers import load_model

    assert export("--model", tiny_run / "run", "--output", tmp_path / "vae").returncode == 0
    r = export("--model", tiny_run / "run", "--output", tmp_path / "vae.safetensors", "--format", "single-file")
    assert r.returncode == 0, r.stderr
    state = load_file(tmp_path / "vae.safetensors")
    assert "encoder.down.0.block.0.norm1.weight" in state and state["encoder.mid.attn_1.q.weight"].dim() == 4
    assert "quant_conv.weight" in state and "post_quant_conv.weight" in state
    single = AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(tmp_path / "vae")).eval()
    ours, _ = load_model(tiny_run / "run")
    again, cfg = load_model(tmp_path / "vae.safetensors")
    x = images()
    for a, b, c in zip(outputs(ours, x), outputs(single, x), outputs(again, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    ev = json.loads((tiny_run / "run" / "eval.json").read_text())
    assert cfg.model.scaling_factor == ev["latents"]["scaling_factor"] and cfg.model.norm_num_groups == 8
    assert (tmp_path / "vae.md").is_file()


def test_single_file_is_the_exact_inverse_of_diffusers_conversion(tmp_path):
    """diffusers -> our single file -> diffusers' own LDM-to-diffusers conversion gives every tensor back."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from pipeline.weights.single_file import save as save_single_file

    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.layers_per_block=2"])
    model = build_autoencoder(cfg.model, 32)
    save_single_file(model, tmp_path / "sd.safetensors", {}, 32, {"kind": "scale_shift", "scaling_factor": 0.5},
                     prefix="first_stage_model.")
    ldm = load_file(tmp_path / "sd.safetensors")
    assert all(k.startswith("first_stage_model.") for k in ldm)
    back = convert_ldm_vae_checkpoint(ldm, dict(model.config))
    own = model.state_dict()
    assert sorted(back) == sorted(own)
    assert all(torch.equal(back[k], own[k]) for k in own)


def test_encoder_only_export_and_its_program_reproduce_the_latents(tiny_run, encoder_only, tmp_path):
    from helpers import load_model

    enc, _ = load_model(encoder_only)
    full, _ = load_model(tiny_run / "run")
    assert enc.decoder is None
    assert sum(p.numel() for p in enc.parameters()) < 0.6 * sum(p.numel() for p in full.parameters())
    x = images(4, size=48)  # another batch size and resolution than the example it was exported with
    with torch.no_grad():
        ref = full.encode(x).latent_dist
        got = enc.encode(x).latent_dist
        mean, logvar = torch.export.load(str(encoder_only / "encoder.pt2")).module()(x)
    assert torch.equal(got.mean, ref.mean)
    torch.testing.assert_close(mean, ref.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, ref.logvar, rtol=1e-5, atol=1e-5)
    # and the encode stage runs on it
    from stages.encode import main as encode

    r = run_main(encode, "--model", encoder_only, "--data", tiny_run / "train", "--output", tmp_path / "lat",
                 "data.num_workers=0")
    assert r.returncode == 0 and "encode: 64 samples" in r.stdout, r.stderr


@pytest.mark.parametrize("quantizer", ["vq", "vq-cosine", "fsq"])
def test_the_encoder_program_of_a_quantized_model_gives_the_codes_its_encoder_gives(quantizer):
    """What an encoder-only export of a VQ or FSQ model traces: the code of each position, as the model's own
    encode finds it (the cosine codebook compares unit-length rows)."""
    from pipeline.models.autoencoder import family_of
    from pipeline.models.encoder_program import EncoderProgram

    keys = {"vq": ["model.kind=vq"], "vq-cosine": ["model.kind=vq", "model.codebook.cosine=true"], "fsq": []}[quantizer]
    torch.manual_seed(0)
    model = build_autoencoder(load_config("tiny-fsq" if quantizer == "fsq" else "tiny", keys).model, 32).eval()
    x = images(3, size=32)
    with torch.no_grad():
        want = family_of(model).encode(model, x).codes
        (got,) = EncoderProgram(model).eval()(x)
    assert got.shape == want.shape == (3, 8, 8) and torch.equal(got, want)
    assert len(got.unique()) > 1  # positions do get different codes


def test_exported_vae_runs_as_the_vae_of_a_dit_pipeline(tiny_run, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    assert export("--model", tiny_run / "run", "--output", tmp_path / "vae").returncode == 0
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


FORMS = {"run": "checkpoint", "checkpoint": "checkpoint", "diffusers": "diffusers", "pipeline-vae": "diffusers",
         "single-file": "single-file", "full-sd-checkpoint": "single-file", "legacy-ckpt": "legacy"}


def import_form(form: str, start, tiny_run, tmp_path):
    """The tiny run's weights in the import format `form`."""
    from pipeline.checkpoint import find_resume_path

    if form == "run":
        return tiny_run / "run"
    if form == "checkpoint":
        return find_resume_path(tiny_run / "run")
    if form in ("diffusers", "pipeline-vae"):
        src = tmp_path / "pipe" if form == "pipeline-vae" else tmp_path / "vae"
        save_diffusers(start, src / "vae" if form == "pipeline-vae" else src)
        return src
    if form == "single-file":
        return ldm_file(tmp_path, start, "vae.safetensors")
    if form == "full-sd-checkpoint":  # the VAE under first_stage_model., beside a U-Net's tensors
        return ldm_file(tmp_path, start, "sd.safetensors", "first_stage_model.",
                        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)})
    return ldm_file(tmp_path, start, "vae.ckpt", "first_stage_model.", fmt="ckpt")


def test_every_import_format_gives_back_every_tensor(tiny_run, tmp_path):
    """Each import format is recognised as what it is and gives every tensor of the model back, as `--model`
    (load) and as `train.init_from` (state_dict, which the trainer loads into a model built from its config)."""
    from helpers import load_model
    from pipeline.weights import resolve_weights

    start, _ = load_model(tiny_run / "run")
    want = start.state_dict()
    for form, fmt in FORMS.items():
        (tmp_path / form).mkdir()
        weights = resolve_weights(import_form(form, start, tiny_run, tmp_path / form))
        assert weights.format == fmt, form
        state = weights.state_dict()
        assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want), form
        model, _ = weights.load()
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items()), form


def test_init_from_an_imported_checkpoint_fine_tunes_the_decoder_only(tiny_run, tmp_path):
    """One fine-tune from the hardest import (a legacy .ckpt of a full SD checkpoint, LDM names): the frozen encoder
    side stays bit for bit, the decoder moves."""
    from helpers import load_model
    from stages.train import run

    start, _ = load_model(tiny_run / "run")
    src = import_form("legacy-ckpt", start, tiny_run, tmp_path)
    tr = run([*TINY, f"data.train={tiny_run / 'train'}", f"output_dir={tmp_path / 'ft'}", "train.max_steps=2",
              f"train.init_from={src}", "train.freeze_encoder=true", "model.mid_block_attention=true"])
    after = tr.unwrapped.vae.state_dict()
    before = start.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if k.startswith("decoder."))


def test_shape_mismatch_names_the_tensor(tiny_run, tmp_path):
    from helpers import load_model
    from pipeline.errors import UserError

    start, _ = load_model(tiny_run / "run")
    src = ldm_file(tmp_path, start, "vae.safetensors")
    with pytest.raises(UserError, match=r"encoder.conv_out.weight has shape \(8, 64, 3, 3\) in the weights but "
                                        r"\(16, 64, 3, 3\) in the config's model"):
        load_model(src, overrides=["model.latent_channels=8"])
    from stages.train import run

    with pytest.raises(UserError, match=r"train.init_from .*: encoder.conv_out.weight has shape"):
        run([*TINY, f"data.train={tiny_run / 'train'}", f"output_dir={tmp_path / 'x'}", "train.max_steps=1",
             f"train.init_from={src}", "model.latent_channels=8", "model.mid_block_attention=true"])


class RunsCode:
    """Unpickling this calls os.system: what a hostile .ckpt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_ckpt_whose_pickle_would_run_code_is_refused_and_nothing_runs(tiny_run, tmp_path):
    from stages.evaluate import main as evaluate

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "payload": RunsCode(marker)},
               tmp_path / "evil.ckpt")
    r = run_main(evaluate, "--model", tmp_path / "evil.ckpt", "--data", tiny_run / "train")
    assert r.returncode == 2 and "refused" in r.stderr and "never does" in r.stderr
    assert "weights_only=False" not in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_scaling_factor_sources_and_refusals(tiny_run, tmp_path):
    from stages.encode import main as encode

    vae = tmp_path / "plain"
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), vae)
    r = export("--model", vae, "--output", tmp_path / "a")
    assert r.returncode == 2 and "no measured latent statistics" in r.stderr and "--keep-scaling-factor" in r.stderr
    assert not (tmp_path / "a").exists()
    assert run_main(encode, "--model", vae, "--data", tiny_run / "train", "--output", tmp_path / "lat",
                    "data.resolution=32", "data.num_workers=0").returncode == 0
    st = json.loads((tmp_path / "lat" / "manifest.json").read_text())["statistics"]
    r = export("--model", vae, "--output", tmp_path / "b", "--stats", tmp_path / "lat" / "manifest.json")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["scaling_factor"] == st["scaling_factor"] and cfg["shift_factor"] == st["shift_factor"]
    r = export("--model", vae, "--output", tmp_path / "s", "--stats", tmp_path / "lat" / "manifest.json", "--no-shift")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())  # SD 1.x: z * scale has unit second moment
    assert cfg["shift_factor"] is None and cfg["scaling_factor"] == pytest.approx((st["std"] ** 2 + st["mean"] ** 2) ** -0.5)
    assert "latents / scaling_factor` as SD 1.x" in (tmp_path / "s" / "README.md").read_text()
    r = export("--model", vae, "--output", tmp_path / "c", "--data", tiny_run / "train", "--num-samples", "100",
               "data.resolution=32")
    assert r.returncode == 0 and "measured on 64 samples" in r.stdout, r.stderr
    measured = json.loads((tmp_path / "c" / "config.json").read_text())["scaling_factor"]
    assert measured == pytest.approx(st["scaling_factor"], rel=1e-9)  # the same 64 images, the same statistic
    r = export("--model", vae, "--output", tmp_path / "c", "--keep-scaling-factor")
    assert r.returncode == 2 and "exists" in r.stderr and "--overwrite" in r.stderr
    other = tmp_path / "other"
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), other)
    r = export("--model", other, "--output", tmp_path / "d", "--stats", tmp_path / "lat" / "manifest.json")
    assert r.returncode == 2 and "latents of another model" in r.stderr


def test_latents_read_back_decode_through_the_exported_config_as_a_flux_pipeline_undoes_it(tiny_run, tmp_path):
    """encode -> export -> LatentDataset -> `latents / scaling_factor + shift_factor` (config.json) -> the exported
    AutoencoderKL: the decode of the true latent; the card and the manifest name the same factors."""
    from diffusers import AutoencoderKL

    from pipeline.latents import LatentDataset
    from pipeline.metrics.image import psnr
    from pipeline.pixels import to_uint8
    from stages.encode import main as encode

    lat = tmp_path / "lat"
    assert run_main(encode, "--model", tiny_run / "run", "--data", tiny_run / "train", "--output", lat,
                    "data.num_workers=0").returncode == 0
    norm = json.loads((lat / "manifest.json").read_text())["normalisation"]
    raw = {s["__key__"]: s["latents"] for s in LatentDataset(lat, "eval", scale=False, sample=False)}
    read = {s["__key__"]: s["latents"] for s in LatentDataset(lat, "eval", sample=False)}
    keys = sorted(raw)[:8]
    for name, flags, tight in (("stats", ["--stats", lat / "manifest.json"], True), ("eval", [], False)):
        r = export("--model", tiny_run / "run", "--output", tmp_path / name, *flags)
        assert r.returncode == 0, r.stderr
        config = json.loads((tmp_path / name / "config.json").read_text())
        vae = AutoencoderKL.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            true = vae.decode(torch.stack([raw[k] for k in keys])).sample
            undone = torch.stack([read[k] for k in keys]) / config["scaling_factor"] + (config["shift_factor"] or 0.0)
            back = vae.decode(undone).sample
        assert psnr(to_uint8(back), to_uint8(true)).min() > 40  # eval.json: measured on other crops, nearly the same
        if tight:  # the very normalisation the reader applied (base: no shift_factor in config.json)
            assert (config["scaling_factor"], config["shift_factor"]) == (norm["scaling_factor"], norm["shift_factor"])
            torch.testing.assert_close(back, true, rtol=1e-4, atol=1e-4)
        card = (tmp_path / name / "README.md").read_text()
        assert f"latents / {config['scaling_factor']!r} + {config['shift_factor']!r}" in card


def test_a_checkpoint_pruned_by_its_running_training_after_pinning_is_read_and_described_as_pinned(
        tiny_run, tmp_path, monkeypatch):
    """keep_checkpoints=1 and a run still training: the checkpoint evaluate / export pinned is pruned when the next
    one lands. They read and describe the pinned copy: the same step, the EMA weights they loaded."""
    import shutil

    import pipeline.weights as weights
    from pipeline.checkpoint import load_tensors, prune_checkpoints
    from pipeline.weights.card import card_inputs
    from stages.evaluate import main as evaluate

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run, ignore=shutil.ignore_patterns("eval.*"))
    monkeypatch.setenv("FIRSTSTAGE_CACHE", str(tmp_path / "cache"))
    ema = load_tensors(run / "checkpoints" / "step-00000040" / "ema.safetensors")

    def next_checkpoint_lands():  # the training saves step 41 and prunes step 40 (keep_checkpoints=1)
        shutil.copytree(run / "checkpoints" / "step-00000040", run / "checkpoints" / "step-00000041")
        prune_checkpoints(run, 1)

    def back_to_step_40():
        shutil.rmtree(run / "checkpoints" / "step-00000041")
        shutil.copytree(tiny_run / "run" / "checkpoints" / "step-00000040", run / "checkpoints" / "step-00000040")

    w = weights.resolve_weights(run)
    next_checkpoint_lands()
    assert not (run / "checkpoints" / "step-00000040").exists()
    assert w.describe() == "ema.safetensors (step-00000040)"  # base: autoencoder.safetensors, the EMA file gone
    model, cfg = w.load()  # base: config.yaml: no such file
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    assert card_inputs(w, cfg)[0]["step"] == 40

    back_to_step_40()
    resolve = weights.resolve_weights

    def pinned_then_pruned(path, ema=True):
        w = resolve(path, ema)
        next_checkpoint_lands()
        return w

    monkeypatch.setattr(weights, "resolve_weights", pinned_then_pruned)
    r = run_main(evaluate, "--model", run, "--data", tiny_run / "val", "--lpips-backbone", "random",
                 "evaluate.likelihood_samples=0", "evaluate.diffusability=false")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "eval.json").read_text())["weights"] == "ema.safetensors (step-00000040)"
    back_to_step_40()
    r = export("--model", run, "--output", tmp_path / "vae")  # with the eval.json of the same (pinned) weights
    assert r.returncode == 0, r.stderr  # base: config.yaml: no such file
    assert "ema.safetensors (step-00000040)" in r.stdout and "step 40" in (tmp_path / "vae" / "README.md").read_text()
    assert not list((tmp_path / "cache" / "pins").glob("*"))  # the stages' pins went with them
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000041"]  # nothing written there


def test_a_pin_is_checked_against_the_record_and_copies_where_no_link_can_be_made(tiny_run, tmp_path, monkeypatch):
    """The checkpoint pruned while it is being linked: the copy misses a file its record lists, and the newest
    checkpoint is pinned instead; where links fail (another file system, a folder not ours) the files are copied."""
    import shutil

    import pipeline.weights.firststage as firststage
    from pipeline.checkpoint import prune_checkpoints
    from pipeline.weights import resolve_weights

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run" / "checkpoints", run / "checkpoints")
    monkeypatch.setenv("FIRSTSTAGE_CACHE", str(tmp_path / "cache"))
    link = os.link

    def pruned_midway(src, dst):
        if src.name == "ema.safetensors" and src.parent.name == "step-00000040":
            shutil.copytree(src.parent, run / "checkpoints" / "step-00000041", ignore=shutil.ignore_patterns(".*"))
            prune_checkpoints(run, 1)
        link(src, dst)

    monkeypatch.setattr(firststage.os, "link", pruned_midway)
    w = resolve_weights(run)
    assert w.describe() == "ema.safetensors (step-00000041)" and w.path.endswith("step-00000041")
    assert sorted(p.name for p in (tmp_path / "cache" / "pins").iterdir()) == [Path(w.pinned).parent.name]

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted", str(src))

    monkeypatch.setattr(firststage.os, "link", no_links)
    w = resolve_weights(run)
    shutil.rmtree(run / "checkpoints" / "step-00000041")
    assert w.describe() == "ema.safetensors (step-00000041)" and w.load()[0] is not None
    firststage.release_pins()
    assert not Path(w.pinned).exists() and not list((tmp_path / "cache" / "pins").glob("*"))


def test_release_pins_leaves_the_pins_of_a_host_whose_name_starts_with_ours(tmp_path, monkeypatch):
    """A pin's folder is HOST-PID-XXXXXXXX in a cache that nodes may share: the pins of host `h-1` (pid 7) begin
    like those of host `h` with pid 1, and one process releasing its pins must not take the other's away."""
    import socket

    import pipeline.weights.firststage as firststage

    monkeypatch.setenv("FIRSTSTAGE_CACHE", str(tmp_path / "cache"))
    host, pid = socket.gethostname(), os.getpid()
    pins = tmp_path / "cache" / firststage.PINS
    mine, theirs = pins / f"{host}-{pid}-ab12cd34", pins / f"{host}-{pid}-7-ef56gh78"  # host "{host}-{pid}", pid 7
    for pin in (mine, theirs):
        (pin / "step-00000040").mkdir(parents=True)
        (pin / "step-00000040" / "ema.safetensors").write_bytes(b"weights")
    firststage.release_pins()
    assert not mine.exists()
    assert (theirs / "step-00000040" / "ema.safetensors").read_bytes() == b"weights"
