"""Putting weights into a model built from config: the shape check and the load, shared by every format.

The configured model is first built on the meta device (no memory) and checked against the weights' shapes and
names; only a model that fits is built for real. So a config (a file's metadata, a config.json, a checkpoint's
config.yaml) that declares layers far larger than the weights is one line, never gigabytes allocated first."""

from __future__ import annotations

import contextlib
from pathlib import Path


from pipeline.errors import UserError
from pipeline.storage import read_json, regular_file

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

MAX_CONFIG_BYTES = 2**20  # a model's JSON config is a few KiB


def read_json_config(path: Path, what: str = "config file") -> dict:
    """A model's JSON config (config.json, encoder_config.json): a regular file of at most 1 MiB holding a JSON
    object, or one line naming the file and what is wrong with it."""
    size = regular_file(path, what).stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: {size} bytes, too large for a {what} (at most {MAX_CONFIG_BYTES} bytes)")
    return read_json(path, what)


def safetensors_shapes(path: Path) -> dict[str, tuple]:
    """Tensor name -> shape, from a safetensors file's header alone (no tensor is read)."""
    from safetensors import safe_open

    regular_file(path, "weights file")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a truncated or hostile header: one line naming the file
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None


@contextlib.contextmanager
def named(path):
    """An error about what a file holds (a config key, a tensor) names the file."""
    try:
        yield
    except UserError as e:
        raise type(e)(f"{path}: {e}") from None


def quantizer_statistics(model) -> set[str]:
    """A VQ quantizer's training statistics: absent from diffusers and LDM files, they start fresh."""
    quantize = getattr(model, "quantize", None)
    return {f"quantize.{n}" for n, _ in quantize.named_buffers()} if quantize is not None else set()


def check_shapes(model, state: dict, source: str, what: str = "the weights",
                 advice: str = "set model.* to match the weights (or leave them out)") -> None:
    """The first tensor whose shape differs between the weights and the configured model, as one line. `state`
    maps names to tensors or to shapes; `model` may live on the meta device."""
    own = model.state_dict()
    for k, mine in own.items():  # in the model's order: encoder first
        v = state.get(k)
        shape = tuple(v.shape) if hasattr(v, "shape") else v
        if v is not None and tuple(mine.shape) != tuple(shape):
            raise UserError(f"{source}: {k} has shape {tuple(shape)} in {what} but {tuple(mine.shape)} in "
                            f"the config's model; {advice}")


def check_fit(model, state: dict, source: str) -> None:
    """The weights (names -> tensors or shapes) fit the model exactly: shapes, then no tensor missing or left over."""
    check_shapes(model, state, source)
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in quantizer_statistics(model)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise UserError(f"{source}: weights do not fit the config's model ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected tensors, e.g. {bad})")


def load_state(model, state: dict[str, torch.Tensor], source: str, checked: bool = False) -> None:
    """Load weights into a model built from config, naming the first mismatch (`checked`: build_checked has already
    compared them with this config's model)."""
    if not checked:
        check_fit(model, state, source)
    model.load_state_dict(state, strict=False)
    quantize = getattr(model, "quantize", None)
    if quantize is not None and hasattr(quantize, "embed_sum") and "quantize.embed_sum" not in state:
        quantize.embed_sum.copy_(quantize.embedding.weight.detach())


def build_checked(cfg, state: dict, source: str, encoder_only: bool = False):
    """The model of `cfg`, on the meta device, checked against `state` (names -> tensors or shapes): a model
    that does not fit is refused before any of its memory exists. `encoder_only`: without the decoder side."""
    import torch

    from pipeline.models.autoencoder import build_autoencoder

    try:
        with torch.device("meta"):
            model = build_autoencoder(cfg.model, cfg.data.resolution)
    except (ValueError, TypeError, RuntimeError) as e:  # a config the model classes reject (negative widths, ...)
        raise UserError(f"{source}: the model config cannot be built ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from None
    if encoder_only:
        model.decoder = None
        if hasattr(model, "post_quant_conv"):
            model.post_quant_conv = None
    check_fit(model, state, source)
    return model


def build_and_load(cfg, state: dict[str, torch.Tensor], source: str):
    """The model of `cfg` with `state` loaded; checked on the meta device before it is built."""
    from pipeline.models.autoencoder import build_autoencoder

    build_checked(cfg, state, source)
    model = build_autoencoder(cfg.model, cfg.data.resolution)
    load_state(model, state, source, checked=True)
    return model
