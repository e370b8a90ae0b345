"""LPIPS perceptual loss (Zhang et al. 2018) from the `lpips` package.

The linear heads ship inside the package. The backbone's ImageNet weights are torchvision's files
(vgg16-397923af.pth, alexnet-owt-7be5be79.pth) in torch hub's cache ($TORCH_HOME/hub/checkpoints). We load them
ourselves with `torch.load(weights_only=True)` (no pickle code runs); when the file is missing we try to download it
once, and if that fails we stop with one message naming the file, where to put it, and the test-only option
`loss.perceptual.backbone: random`.
"""

from __future__ import annotations

import contextlib
import os
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError

BACKBONE_URLS = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}


def backbone_path(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(BACKBONE_URLS[net])


def _fetch_backbone(net: str) -> Path:
    path = backbone_path(net)
    if path.is_file():
        return path
    url = BACKBONE_URLS[net]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as e:
        raise UserError(
            f"LPIPS needs the ImageNet {net} backbone weights {path.name}, which are not in {path.parent} and could "
            f"not be downloaded ({type(e).__name__}); copy {url} to {path} (or set TORCH_HOME), or run with "
            f"loss.perceptual.backbone=random (tests only) or loss.perceptual.weight=0"
        ) from None
    return path


def _load_backbone(lp: nn.Module, net: str, path: Path) -> None:
    """Copy torchvision's `features.{i}.*` tensors (the file `path`) into lpips' `slice{k}.{i}.*` modules."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    target = {}
    for name, _ in lp.net.named_parameters():
        _, index_param = name.split(".", 1)  # slice3.12.weight -> 12.weight
        if index_param not in features:
            raise UserError(f"{backbone_path(net)} does not look like torchvision's {net} weights (no {index_param})")
        target[name] = features[index_param]
    lp.net.load_state_dict(target, strict=True)


@contextlib.contextmanager
def _vgg16_features_only():
    """lpips builds torchvision's whole VGG16 to keep its `features`: build only those, initialised as torchvision
    initialises them (the 120M-parameter classifier that lpips drops took about 1.2 s of every build)."""
    import torchvision.models as tvm

    try:
        from torchvision.models.vgg import cfgs, make_layers
    except ImportError:  # another torchvision layout: build it whole
        yield
        return

    def features_only(*args, **kwargs):
        features = make_layers(cfgs["D"], batch_norm=False)
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
        return types.SimpleNamespace(features=features)

    original = tvm.vgg16
    tvm.vgg16 = features_only
    try:
        yield
    finally:
        tvm.vgg16 = original


def _build_lpips(net: str, backbone: str) -> nn.Module:
    """lpips.LPIPS with its backbone, frozen: its user (the objective, the evaluator) builds it once and keeps it."""
    import lpips

    path = _fetch_backbone(net) if backbone == "pretrained" else None  # a missing file is refused before the build
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]), _vgg16_features_only():
        warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` argument inside lpips
        torch.manual_seed(0)  # the random backbone is the same in every process and every run
        built = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        _load_backbone(built, net, path)
    return built.eval().requires_grad_(False)


class Perceptual(nn.Module):
    """LPIPS distance per sample [B] between images in [-1, 1]; frozen, gradients flow to the inputs."""

    def __init__(self, net: str = "vgg", backbone: str = "pretrained"):
        super().__init__()
        self.lpips = _build_lpips(net, backbone)
        if backbone != "pretrained":
            warnings.warn(
                "LPIPS with a randomly initialised backbone (loss.perceptual.backbone=random): meant for tests only, "
                "it is not a perceptual loss"
            )
        self.lpips.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # dropout / batch statistics stay frozen

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y, normalize=False).flatten()
