"""The evaluate stage and its metrics."""

import json

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from harness import run_main
from helpers import TINY, make_shards, write_tar
from pipeline.metrics import psnr, ssim
from pipeline.metrics.latent import MomentSums, active_units, latent_statistics



def test_psnr_ssim_agree_with_scikit_image():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 3, 37, 45), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    ours_p, ours_s = psnr(torch.from_numpy(a), torch.from_numpy(b)), ssim(torch.from_numpy(a), torch.from_numpy(b))
    for i in range(3):
        ref_p = peak_signal_noise_ratio(a[i], b[i], data_range=255)
        ref_s = structural_similarity(a[i].transpose(1, 2, 0), b[i].transpose(1, 2, 0), gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=2)
        assert ours_p[i].item() == pytest.approx(ref_p, abs=1e-9)
        assert ours_s[i].item() == pytest.approx(ref_s, abs=1e-9)


def test_active_units_count_a_collapsed_channel_as_inactive():
    torch.manual_seed(0)
    means = torch.randn(200, 3, 2, 2)
    means[:, 1] = 0.7  # collapsed: the posterior mean ignores x
    means[:, 2] *= 0.05  # variance 0.0025 < 0.01: inactive too
    sums = MomentSums((3, 2, 2))
    for chunk in means.split(32):
        sums.add(chunk)
    au = active_units(sums.var(), 0.01)
    assert au["active_units"] == 4 and au["latent_dims"] == 12
    assert au["active_fraction_per_channel"] == [1.0, 0.0, 0.0]


def test_scaling_factor_from_latents_of_known_std():
    torch.manual_seed(0)
    z = torch.randn(20000, 4) * 2.5 + 0.3
    ch, al = MomentSums((4,)), MomentSums(())
    for chunk in z.split(1000):
        ch.add(chunk)
        al.add(chunk.reshape(-1))
    stats = latent_statistics(ch, al)
    assert stats["scaling_factor"] == pytest.approx(1 / 2.5, rel=0.01)
    assert stats["shift_factor"] == pytest.approx(0.3, abs=0.03)
    assert stats["channel_std"] == pytest.approx([2.5] * 4, rel=0.02)


def evaluate(*args, check=True):
    from stages.evaluate import main

    r = run_main(main, "--lpips-backbone", "random", *args)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_iwae_bound_is_at_least_elbo_and_tightens_with_k(tiny_run):
    out = tiny_run / "e1"
    r = evaluate("--model", tiny_run / "run", "--data", tiny_run / "val", "--output", out,
                 "evaluate.iwae_k=16", "evaluate.likelihood_samples=20")
    res = json.loads((out / "eval.json").read_text())
    nats = res["likelihood"]["nats_per_image"]
    assert res["likelihood"]["samples"] == 20
    assert nats["iwae_16"] >= nats["elbo"]
    assert nats["iwae_16"] > nats["iwae_4"] > nats["iwae_1"]
    bpd = res["likelihood"]["bits_per_dim"]
    assert bpd["iwae_16"] < bpd["elbo"]  # tighter bound, fewer bits
    assert res["active_units"]["latent_dims"] == 4 * 8 * 8
    assert res["lpips_vgg"] >= 0 and isinstance(res["rfid"], str) and res["rfid"].startswith("not computed")
    assert (out / "eval.md").read_text().count("|") > 20 and (out / "eval_grid.png").is_file()
    assert "| PSNR (dB) |" in r.stdout


def test_plain_diffusers_folder_evaluates(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), norm_num_groups=8, latent_channels=4, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    make_shards(tmp_path / "data", 2, 3, size=(40, 40))
    evaluate("--model", tmp_path / "vae", "--data", tmp_path / "data", "data.resolution=32", "data.num_workers=0")
    res = json.loads((tmp_path / "vae" / "eval.json").read_text())
    assert res["samples"] == 6 and res["active_units"]["latent_dims"] == 4 * 16 * 16
    assert res["latents"]["scaling_factor"] > 0


def test_vq_model_reports_codebook(tiny_run, tmp_path):
    from stages.train import run

    run([*TINY, f"data.train={tiny_run / 'train'}", f"output_dir={tmp_path / 'vq'}", "model.kind=vq",
         "train.max_steps=4", "train.checkpoint_every=4"])
    evaluate("--model", tmp_path / "vq", "--data", tiny_run / "val")
    cb = json.loads((tmp_path / "vq" / "eval.json").read_text())["codebook"]
    # the same numbers counted here, independently: codes of every evaluated image, their use and entropy
    from helpers import load_model
    from pipeline.data.loader import make_loader
    from pipeline.pixels import to_model_input

    model, cfg = load_model(tmp_path / "vq")
    counts = torch.zeros(256)
    with torch.no_grad():
        for batch in make_loader(str(tiny_run / "val"), "eval", 4, resolution=32):
            h = model.quant_conv(model.encoder(to_model_input(batch["image"])))
            counts += torch.bincount(model.quantize.assign(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])), minlength=256)
    p = counts[counts > 0] / counts.sum()
    assert cb["size"] == 256 and cb["used"] == int((counts > 0).sum()) and cb["dead_codes"] == int((counts == 0).sum())
    assert cb["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)


def test_bad_inputs(tiny_run, tmp_path):
    (tmp_path / "notamodel").mkdir()
    r = evaluate("--model", tmp_path / "notamodel", "--data", tiny_run / "val", check=False)
    assert r.returncode == 2 and "not an autoencoder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = evaluate("--model", tiny_run / "run", "--data", tmp_path / "empty", "--output", tmp_path / "o", check=False)
    assert r.returncode == 2 and f"error: --data {tmp_path / 'empty'}: folder holds no .tar shards" in r.stderr
    write_tar(tmp_path / "noimg.tar", [{"__key__": "a", "txt": b"caption only"}])
    r = evaluate("--model", tiny_run / "run", "--data", tmp_path / "noimg.tar", "--output", tmp_path / "o", check=False)
    assert r.returncode == 2 and "no decodable images" in r.stderr
    r = evaluate("--model", tiny_run / "run", "--data", tiny_run / "val", "--num-samples", "1000", "--output",
                 tmp_path / "o2")
    assert "asked for 1000 samples, the data holds 20; evaluating 20" in r.stderr
    assert json.loads((tmp_path / "o2" / "eval.json").read_text())["samples"] == 20
