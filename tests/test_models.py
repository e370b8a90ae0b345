import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.weights.diffusers import save as save_diffusers
from pipeline.models import build_autoencoder, encode_latent, reparameterize, run_autoencoder, VectorQuantizer
from pipeline.models.autoencoder import decode_latents

# presets -> parameters of the autoencoder (kl-f8's is the published SD VAE's: 83,653,863)
PARAMETERS = {"kl-f8": 83_653_863, "kl-f8-c16": 83_821_011, "kl-f16-c16": 112_148_947, "finetune-decoder": 83_653_863}


@pytest.mark.parametrize("name", ["kl-f8", "kl-f8-c16", "kl-f16-c16", "vq-f8", "vq-f16", "finetune-decoder"])
def test_sd_scale_presets_have_their_shapes_on_the_meta_device(name):
    """Built on the meta device (no memory, no compute) at the preset's own resolution: the latent and the
    reconstruction have the shapes the preset promises, and the KL presets the published parameter counts."""
    cfg = load_config(name)
    r, f = cfg.data.resolution, cfg.model.downsampling_factor
    with torch.device("meta"):
        model = build_autoencoder(cfg.model, r).eval()
        x = torch.empty(2, 3, r, r)
        if cfg.model.kind == "kl":
            out = run_autoencoder(model, x)
            latent, rec = out.mean, out.reconstruction
        else:  # the quantizer's bincount has no meta kernel: encoder side and decoder separately
            latent = model.quant_conv(model.encoder(x))
            rec = decode_latents(model, torch.empty(2, cfg.model.codebook.dim or cfg.model.latent_channels, r // f, r // f))
    channels = cfg.model.codebook.dim or cfg.model.latent_channels if cfg.model.kind == "vq" else cfg.model.latent_channels
    assert tuple(latent.shape) == (2, channels, r // f, r // f) and tuple(rec.shape) == (2, 3, r, r)
    assert isinstance(model, VQModel if cfg.model.kind == "vq" else AutoencoderKL)
    if name in PARAMETERS:
        assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


def test_the_tiny_preset_encodes_and_decodes_for_real():
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = build_autoencoder(cfg.model, sample_size=64).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = run_autoencoder(model, x)
    f = cfg.model.downsampling_factor
    assert out.reconstruction.shape == x.shape and torch.isfinite(out.reconstruction).all()
    assert out.mean.shape == out.logvar.shape == out.latents.shape == (1, cfg.model.latent_channels, 64 // f, 64 // f)


def tiny(kind="kl", **over):
    cfg = load_config("tiny", [f"model.kind={kind}"] + [f"{k}={v}" for k, v in over.items()])
    torch.manual_seed(0)
    return build_autoencoder(cfg.model, sample_size=32), cfg


def test_gradients_reach_encoder_through_sampled_latent():
    model, _ = tiny()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    lat = encode_latent(model, x)
    mean, logvar = lat.mean, lat.logvar
    mean.retain_grad()
    logvar.retain_grad()
    z = reparameterize(mean, logvar)
    decode_latents(model, z).pow(2).mean().backward()
    assert mean.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0  # through mu and sigma
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_reparameterize_is_mu_plus_sigma_eps():
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    eps = torch.randn(mean.shape, generator=g2)
    assert torch.allclose(reparameterize(mean, logvar, generator=g1), mean + torch.exp(0.5 * logvar) * eps)


@pytest.mark.parametrize("shape, words", [
    ((1, 3, 30, 32), "multiple of the downsampling factor 4"),
    ((1, 1, 32, 32), "3-channel"),
    ((3, 32, 32), "[batch, 3, height, width]"),
])
def test_bad_shapes_are_clear_errors(shape, words):
    model, _ = tiny()
    with pytest.raises(UserError) as e:
        run_autoencoder(model, torch.zeros(shape))
    assert words in str(e.value)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_saved_model_reloads_in_plain_diffusers_with_identical_outputs(tmp_path, kind):
    model, _ = tiny(kind)
    model.train()
    if kind == "vq":  # move the codebook off its initialisation so the check means something
        for _ in range(3):
            run_autoencoder(model, torch.rand(2, 3, 32, 32) * 2 - 1)
    model.eval()
    save_diffusers(model, tmp_path / "vae")
    cls = VQModel if kind == "vq" else AutoencoderKL
    plain = cls.from_pretrained(tmp_path / "vae").eval()
    assert type(plain) is cls
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        if kind == "kl":
            ours = decode_latents(model, encode_latent(model, x).mean)
            theirs = plain.decode(plain.encode(x).latent_dist.mode()).sample
        else:
            ours = run_autoencoder(model, x).reconstruction
            theirs = plain(x).sample
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not any(p.name.endswith(".bin") or p.name.endswith(".pkl") for p in (tmp_path / "vae").iterdir())


# ------------------------------------------------------------------------------------------------ quantizer
def test_ema_codebook_moves_toward_assigned_encodings():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, update="ema", ema_decay=0.9, restart_dead=False).train()
    target = torch.tensor([3.0, -2.0])
    z = target.view(1, 2, 1, 1).expand(8, 2, 4, 4).contiguous()
    idx0 = q(z)[2][2].flatten()[0].item()
    before = (q.embedding.weight[idx0] - target).norm().item()
    for _ in range(30):
        _, _, (_, _, idx) = q(z)
    after = (q.embedding.weight[idx0] - target).norm().item()
    assert (idx == idx0).all()
    assert after < 0.1 * before
    other = [i for i in range(4) if i != idx0]
    assert q.embedding.weight[other].abs().max() < 1.0  # unused codes stay put, no blow-up


def test_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, update="ema", restart_dead=True, dead_after=3).train()
    z = torch.randn(4, 2, 4, 4) * 0.01 + 5.0  # far from every code: one code takes all
    for _ in range(3):
        q(z)
    assert q.restarts.item() >= 7
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    # every restarted code now sits on one of this step's encodings
    d = torch.cdist(q.embedding.weight, flat).min(1).values
    assert (d < 0.5).sum() >= 7
    q(z)
    assert q.usage() > 1 / 8


def test_straight_through_and_commitment():
    q = VectorQuantizer(16, 3, beta=0.25, update="loss", restart_dead=False).train()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, loss, (perplexity, _, idx) = q(z)
    (z_q.sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert q.embedding.weight.grad.abs().sum() > 0  # codebook learned by loss in this mode
    assert 1.0 <= perplexity.item() <= 16
    assert idx.shape == (2, 4, 4)
