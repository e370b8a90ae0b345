import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    CONFIG_DIR,
    config_from_dict,
    config_to_dict,
    describe_fields,
    load_config,
    parse_overrides,
    save_config,
)
from pipeline.errors import ConfigError

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_presets_exist():
    for name in ("kl-f8", "kl-f8-c16", "kl-f16-c16", "vq-f8", "vq-f16", "tiny", "finetune-decoder"):
        assert name in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_parses_and_round_trips(name):
    """Every YAML in configs/ loads against the schema, and its resolved form loads back to the same config."""
    cfg = load_config(name)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert cfg.data.resolution % cfg.model.downsampling_factor == 0


def test_base_chain_and_values():
    cfg = load_config("vq-f16")
    assert cfg.model.kind == "vq"  # from vq-f8
    assert cfg.model.codebook.dim == 8 and cfg.model.codebook.size == 16384
    assert cfg.model.downsampling_factor == 16
    assert cfg.loss.perceptual.net == "vgg"  # from kl-f8 through vq-f8


def test_overrides_apply_and_parse_scalars():
    cfg = load_config("tiny", ["train.max_steps=7", "loss.kl.weight=1e-6", "data.flip=false",
                               "model.block_out_channels=[16,32]", "model.shift_factor=null"])
    assert cfg.train.max_steps == 7
    assert cfg.loss.kl.weight == pytest.approx(1e-6)
    assert cfg.data.flip is False
    assert cfg.model.block_out_channels == [16, 32]
    assert cfg.model.shift_factor is None


def test_misspelt_key_in_yaml(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("base: tiny\nloss:\n  perceptul: {weight: 1.0}\n")
    with pytest.raises(ConfigError, match=r"loss\.perceptul.*loss\.perceptual"):
        load_config(f)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.max_steps=abc", ["train.max_steps", "int", "'abc'"]),
        ("data.flip=3", ["data.flip", "bool"]),
        ("model.block_out_channels=64", ["model.block_out_channels", "list"]),
        ("model.kind=kll", ["model.kind", "'kl'"]),
        ("train.lr=-1", ["train.lr", ">= 0"]),
        ("model.codebook.ema_decay=1.5", ["model.codebook.ema_decay", "<= 1"]),
        ("data.resolution=65", ["data.resolution", "downsampling factor"]),
        ("train", ["key=value"]),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="kl-f8"):
        load_config("kl-f9")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("kl-f8-c16", ["train.max_steps=5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["latent_channels"] == 16


def test_describe_fields_covers_leaves():
    keys = [k for k, _, _ in describe_fields()]
    for k in ("data.train", "train.max_steps", "loss.perceptual.backbone", "model.codebook.beta", "output_dir"):
        assert k in keys


def test_cli_error_is_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-m", "stages.cli", "config", "--config", "tiny", "train.max_stesp=3"],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "did you mean train.max_steps" in lines[0]


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
