import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pipeline.config import KLConfig, load_config
from pipeline.errors import UserError
from pipeline.losses import FirstStageObjective
from pipeline.losses import perceptual as perceptual_mod
from pipeline.losses.adversarial import balanced_gan_gradient, discriminator_loss, generator_loss
from pipeline.losses.kl import kl_loss, kl_per_channel, kl_weight
from pipeline.models import build_autoencoder, last_decoder_layer, run_autoencoder


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    ref = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    assert torch.allclose(kl_loss(mean, logvar), ref, rtol=1e-5)
    per_channel = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).mean((0, 2, 3))
    assert torch.allclose(kl_per_channel(mean, logvar), per_channel, rtol=1e-5)


@pytest.mark.parametrize("cfg, step, expected", [
    (KLConfig(weight=1e-3, schedule="constant"), 0, 1e-3),
    (KLConfig(weight=1e-3, schedule="linear", warmup_steps=100), 0, 0.0),
    (KLConfig(weight=1e-3, schedule="linear", warmup_steps=100), 25, 2.5e-4),
    (KLConfig(weight=1e-3, schedule="linear", warmup_steps=100), 100, 1e-3),
    (KLConfig(weight=1e-3, schedule="linear", warmup_steps=100), 5000, 1e-3),
    (KLConfig(weight=1.0, schedule="cyclical", cycle_steps=100, cycle_ramp=0.5), 0, 0.0),
    (KLConfig(weight=1.0, schedule="cyclical", cycle_steps=100, cycle_ramp=0.5), 25, 0.5),
    (KLConfig(weight=1.0, schedule="cyclical", cycle_steps=100, cycle_ramp=0.5), 60, 1.0),
    (KLConfig(weight=1.0, schedule="cyclical", cycle_steps=100, cycle_ramp=0.5), 110, 0.2),
    (KLConfig(weight=1.0, schedule="cyclical", cycle_steps=100, cycle_ramp=0.5), 199, 1.0),
])
def test_kl_schedules(cfg, step, expected):
    assert kl_weight(step, cfg) == pytest.approx(expected)


def test_free_bits_zeroes_gradient_of_channels_under_floor():
    mean = torch.zeros(2, 3, 4, 4)
    mean[:, 0] = 3.0  # channel 0: KL 4.5 nats per element, far above the floor
    mean[:, 1] = 0.1  # channel 1: KL 0.005, under the floor
    mean.requires_grad_(True)
    logvar = torch.zeros(2, 3, 4, 4, requires_grad=True)
    kl_loss(mean, logvar, free_bits=0.5).backward()
    assert mean.grad[:, 0].abs().sum() > 0
    assert mean.grad[:, 1].abs().sum() == 0 and mean.grad[:, 2].abs().sum() == 0
    assert logvar.grad[:, 1:].abs().sum() == 0
    # with no floor every channel gets a gradient
    mean.grad = None
    kl_loss(mean, logvar, free_bits=0.0).backward()
    assert mean.grad[:, 1].abs().sum() > 0


def test_adaptive_weight_matches_hand_computation_and_surrogate_has_the_loss_gradient():
    torch.manual_seed(0)
    upstream = torch.nn.Conv2d(2, 2, 1)  # stands for the rest of the decoder
    layer = torch.nn.Conv2d(2, 3, 3, padding=1)  # the decoder's last layer
    logvar = torch.nn.Parameter(torch.tensor(0.3))
    x0 = torch.randn(2, 2, 5, 5)

    def losses():
        h = upstream(x0)
        y = layer(h)
        rec = (y - 1).abs().sum() / torch.exp(logvar) + logvar
        gan = -(y * 0.3).mean() + (y ** 2).mean()
        return h, y, rec, gan

    h, y, rec, gan = losses()
    w, surrogate, _ = balanced_gan_gradient(rec, gan, y, layer.weight, 0.5, [logvar])
    # by hand: dL/dW as explicit convolution gradients of the output gradients
    g_rec = torch.nn.grad.conv2d_weight(h, layer.weight.shape, torch.sign(y - 1).detach() / torch.exp(logvar).detach(),
                                        padding=1)
    g_gan = torch.nn.grad.conv2d_weight(h, layer.weight.shape, (-0.3 + 2 * y.detach()) / y.numel(), padding=1)
    assert torch.allclose(w, g_rec.norm() / (g_gan.norm() + 1e-4), rtol=1e-5)
    assert not w.requires_grad
    params = [*upstream.parameters(), *layer.parameters(), logvar]
    got = torch.autograd.grad(surrogate, params)
    _, _, rec, gan = losses()  # the textbook form: backward of the full loss with the same weight
    want = torch.autograd.grad(rec + 0.5 * w * gan, params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_adaptive_weight_clamped():
    p = torch.nn.Parameter(torch.ones(3))
    y = p * 1.0
    w, _, _ = balanced_gan_gradient((y * 1e9).sum(), (y * 0).sum(), y, p, 1.0)
    assert w.item() == 1e4


def test_gan_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert generator_loss(fake, "hinge").item() == pytest.approx(0.75)
    # -log sigmoid(real) and -log(1 - sigmoid(fake)), written out: softplus(-2), softplus(-0.5), softplus(0.5)
    assert discriminator_loss(real, fake, "non-saturating").item() == pytest.approx(0.4255024976)
    assert generator_loss(fake, "non-saturating").item() == pytest.approx(1.3005024976)


def objective(kind="kl", *over):
    cfg = load_config("tiny", [f"model.kind={kind}", "loss.perceptual.weight=0.5", *over])
    torch.manual_seed(0)
    model = build_autoencoder(cfg.model, 32)
    with pytest.warns(UserWarning, match="random"):
        obj = FirstStageObjective(cfg.loss, cfg.model.kind == "kl")
    return model, obj, cfg


def test_objective_kl_terms_sum_to_total():
    model, obj, cfg = objective("kl", "loss.kl.weight=0.01", "loss.reconstruction.type=l1")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = run_autoencoder(model, x)
    total, t = obj.autoencoder_terms(x, out, step=10, last_layer=last_decoder_layer(model))
    assert torch.allclose(total, t["nll"] + 0.01 * t["kl"])
    # LDM convention: per-pixel (|x - x_rec| + 0.5 LPIPS) summed over pixels, averaged over the batch
    per_pixel = (x - out.reconstruction).abs().mean() + 0.5 * t["lpips"]
    assert torch.allclose(t["nll"], per_pixel * 3 * 32 * 32, rtol=1e-4)
    assert t["kl_per_channel"].shape == (cfg.model.latent_channels,)
    total.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # LPIPS and pixel terms reach the encoder


def test_objective_learned_logvar():
    model, obj, _ = objective("kl", "loss.reconstruction.learned_logvar=true", "loss.reconstruction.logvar_init=1.0")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = run_autoencoder(model, x)
    total, t = obj.autoencoder_terms(x, out, step=0)
    total.backward()
    assert obj.logvar.grad is not None and obj.generator_parameters() == [obj.logvar]


def test_objective_gan_starts_at_start_step_and_vq_terms():
    model, obj, _ = objective("vq", "loss.adversarial.enabled=true", "loss.adversarial.start_step=5",
                              "loss.adversarial.r1_weight=1.0", "loss.adversarial.lecam_weight=0.1")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = run_autoencoder(model, x)
    _, before = obj.autoencoder_terms(x, out, step=4, last_layer=last_decoder_layer(model))
    assert "g" not in before and "vq" in before and "perplexity" in before
    _, after = obj.autoencoder_terms(x, out, step=5, last_layer=last_decoder_layer(model))
    assert "g" in after and after["gan_weight"] > 0
    assert torch.allclose(after["loss"], after["nll"] + after["vq"] + after["gan_weight"] * after["g"], rtol=1e-5)
    d, dt = obj.discriminator_terms(x, out.reconstruction)
    d.backward()
    assert torch.isfinite(d) and {"r1", "lecam", "logits_real"} <= set(dt)
    assert all(p.grad is not None for p in obj.discriminator.parameters() if p.requires_grad)


def test_objective_with_adaptive_gan_weight_backpropagates_the_objective_gradient():
    model, obj, _ = objective("kl", "loss.adversarial.enabled=true", "loss.adversarial.start_step=0",
                              "loss.reconstruction.learned_logvar=true", "loss.kl.weight=0.01")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    params = [*model.parameters(), obj.logvar]

    def gradient():
        torch.manual_seed(1)  # the same posterior sample both times
        out = run_autoencoder(model, x)
        loss, terms = obj.autoencoder_terms(x, out, step=0, last_layer=last_decoder_layer(model))
        return torch.autograd.grad(loss, params), terms

    got, terms = gradient()
    obj.cfg.adversarial.adaptive_weight = False  # the same weight, applied as a constant: the plain total
    obj.cfg.adversarial.weight = terms["gan_weight"].item()
    want, plain = gradient()
    assert torch.allclose(terms["loss"], plain["loss"], rtol=1e-5)
    for a, b in zip(got, want):  # float32 sums in another order: compare relative to the gradient's size
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-8


def test_missing_lpips_weights_give_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, dst, **kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(perceptual_mod.torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError) as e:
        perceptual_mod.Perceptual("vgg", "pretrained")
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path) in msg and "loss.perceptual.backbone=random" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_backbone_loads_from_torch_cache_without_pickle(tmp_path, monkeypatch, net):
    """A torchvision-format file in TORCH_HOME is loaded (weights_only) into lpips' slices, tensor for tensor (for
    VGG, into the features-only build)."""
    import torchvision
    from torchvision.models.vgg import cfgs, make_layers

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    if net == "alex":
        features = {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}
    else:  # the features of torchvision's vgg16, without building its classifier
        features = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    path = perceptual_mod.backbone_path(net)
    path.parent.mkdir(parents=True)
    torch.save(features, path)
    p = perceptual_mod.Perceptual(net, "pretrained")
    got = dict(p.lpips.net.named_parameters())
    assert len(got) == len(features)
    assert torch.equal(got["slice1.0.weight"], features["features.0.weight"])
    last = "slice5.10.bias" if net == "alex" else "slice5.28.bias"
    assert torch.equal(got[last], features["features." + last.split(".", 1)[1]])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert p(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_each_perceptual_net_is_its_users_own_and_the_same_in_every_build():
    """No process-wide cache hands one LPIPS to two users: each builds its own (the objective and the evaluator keep
    theirs), seeded, so two builds are equal and changing one leaves the other as built."""
    from pipeline.losses.perceptual import Perceptual

    with pytest.warns(UserWarning, match="random"):
        a, b = Perceptual("alex", "random"), Perceptual("alex", "random")
    pa, pb = list(a.parameters()), list(b.parameters())
    assert all(torch.equal(x, y) and x.data_ptr() != y.data_ptr() for x, y in zip(pa, pb))
    with torch.no_grad():
        pa[0].add_(1.0)
    assert not torch.equal(pa[0], pb[0])  # moving or changing one leaves the other as built
