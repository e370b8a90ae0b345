"""Adding a model family is one module and one row in pipeline.models.families.FAMILIES: a toy family, written to a
temporary module and added to the table, is configured by its own `model:` keys (a bad value refused in one line
naming the key), gives its downsampling factor, builds, encodes and trains a step through the train stage. And the
config reaches the families only through that table."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from helpers import TINY, make_shards

TOY = '''
"""A toy family: a strided convolutional encoder and its transpose, a deterministic latent."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.models.families.base import Family, Latent
from pipeline.schema import key


@dataclass
class ToySection:
    levels: int = key(2, "2x downsamplings", min=1)
    width: int = key(8, "channels inside; even", min=2)


@dataclass
class ToyKeys:
    toy: ToySection = key(ToySection(), "the toy autoencoder (kind: toy only)")


class ToyConfig(dict):
    """Its config, read as diffusers' configs are: config["levels"] or config.levels."""

    __getattr__ = dict.__getitem__


@functools.cache
def toy_class():
    from torch import nn

    class ToyAutoencoder(nn.Module):
        def __init__(self, in_channels, latent_channels, width, levels):
            super().__init__()
            self.config = ToyConfig(in_channels=in_channels, latent_channels=latent_channels, levels=levels)
            down = [nn.Conv2d(width, width, 4, 2, 1) for _ in range(levels)]
            up = [nn.ConvTranspose2d(width, width, 4, 2, 1) for _ in range(levels)]
            self.encoder = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), *down,
                                         nn.Conv2d(width, latent_channels, 1))
            self.decoder = nn.Sequential(nn.Conv2d(latent_channels, width, 1), *up,
                                         nn.Conv2d(width, in_channels, 3, padding=1))

    return ToyAutoencoder


class ToyFamily(Family):
    name = "toy"
    latent = "latent"
    keys = ToyKeys

    @property
    def classes(self):
        return (toy_class(),)

    def validate(self, cfg) -> None:
        if cfg.model.toy.width % 2:
            raise ConfigError(f"model.toy.width: must be even, got {cfg.model.toy.width}")

    def factor_of_section(self, m) -> int:
        return 2 ** m.toy.levels

    def factor_of_config(self, config) -> int:
        return 2 ** config["levels"]

    def build(self, cfg, sample_size: int):
        return toy_class()(cfg.in_channels, cfg.latent_channels, cfg.toy.width, cfg.toy.levels)

    def encode(self, model, x) -> Latent:
        return Latent(model.encoder(x))

    def decode(self, model, z):
        return model.decoder(z)

    def last_decoder_layer(self, model):
        return model.decoder[-1].weight

    def last_encoder_layer(self, model):
        return model.encoder[-1].weight
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy family's module, imported from tmp_path, and its row in FAMILIES (both gone after the test)."""
    from pipeline.models.families import FAMILIES

    (tmp_path / "toy_family.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("toy_family")
    monkeypatch.setitem(FAMILIES, "toy", module.ToyFamily())
    yield module
    sys.modules.pop("toy_family", None)


def test_a_toy_family_in_a_module_of_its_own_configures_builds_encodes_and_trains(toy, tmp_path):
    import torch

    from pipeline.config import describe_fields, load_config
    from pipeline.errors import ConfigError
    from pipeline.models import build_autoencoder, encode_latent, family_of
    from stages.train import run

    cfg = load_config("tiny", ["model.kind=toy", "model.toy.levels=3", "model.latent_channels=3"])
    assert cfg.model.toy.levels == 3 and cfg.model.toy.width == 8 and cfg.model.downsampling_factor == 8
    assert "model.toy.width" in {k for k, _, _ in describe_fields()}
    for override, words in [("model.toy.width=7", "model.toy.width: must be even, got 7"),  # the family's validate
                            ("model.toy.levels=0", "model.toy.levels: must be >= 1, got 0"),  # its key's range
                            ("model.toy.widht=8", "unknown config key model.toy.widht; did you mean model.toy.width?"),
                            ("data.resolution=36", "not a multiple of the downsampling factor 8")]:
        with pytest.raises(ConfigError) as e:
            load_config("tiny", ["model.kind=toy", "model.toy.levels=3", override])
        assert words in str(e.value) and "\n" not in str(e.value)

    model = build_autoencoder(cfg.model, cfg.data.resolution)
    assert family_of(model).name == "toy"
    assert encode_latent(model, torch.zeros(2, 3, 32, 32)).mean.shape == (2, 3, 4, 4)

    make_shards(tmp_path / "shards", num_shards=1, per_shard=8, size=(48, 40))
    tr = run([*TINY, "model.kind=toy", "model.toy.levels=3", "model.latent_channels=3",
              f"data.train={tmp_path / 'shards'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1"])
    assert tr.state.step == 1 and type(tr.unwrapped.vae) is toy.toy_class()
    assert "kind: toy" in (tmp_path / "run" / "config.yaml").read_text()
    assert tr.state.last_checkpoint


def test_the_config_names_no_family():
    """pipeline/config.py reaches the families through their table only: no family's name, class or keys in it."""
    from pipeline.models.families import FAMILIES

    source = (Path(__file__).resolve().parent.parent / "pipeline" / "config.py").read_text()
    names = [rf'"{re.escape(name)}"' for name in FAMILIES]  # a kind spelt out
    names += [rf"\b{c}\b" for f in FAMILIES.values() for c in f.class_names] + [r"\btemperal_downsample\b"]
    names += [rf"(\.{f.name}\b|^\s*{f.name}:)" for fam in FAMILIES.values() for f in fam.own_fields()]  # a key read
    assert [n for n in names if re.search(n, source, re.MULTILINE)] == []
