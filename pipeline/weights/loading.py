"""Putting weights into a model built from config: the shape check and the load, shared by every format."""

from __future__ import annotations

import torch

from pipeline.errors import UserError


def check_shapes(model, state: dict[str, torch.Tensor], source: str, what: str = "the weights",
                 advice: str = "set model.* to match the weights (or leave them out)") -> None:
    """The first tensor whose shape differs between the weights and the configured model, as one line."""
    own = model.state_dict()
    for k, mine in own.items():  # in the model's order: encoder first
        v = state.get(k)
        if v is not None and mine.shape != v.shape:
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)} in {what} but {tuple(mine.shape)} in "
                            f"the config's model; {advice}")


def load_state(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights into a model built from config, naming the first mismatch; a VQ quantizer's training statistics
    (absent from diffusers and LDM files) start fresh."""
    check_shapes(model, state, source)
    missing, unexpected = model.load_state_dict(state, strict=False)
    quantize = getattr(model, "quantize", None)
    quantizer_stats = {f"quantize.{n}" for n, _ in quantize.named_buffers()} if quantize is not None else set()
    missing = [k for k in missing if k not in quantizer_stats]
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise UserError(f"{source}: weights do not fit the config's model ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected tensors, e.g. {bad})")
    if quantize is not None and hasattr(quantize, "embed_sum") and "quantize.embed_sum" not in state:
        quantize.embed_sum.copy_(quantize.embedding.weight.detach())


def build_and_load(cfg, state: dict[str, torch.Tensor], source: str):
    """The model of `cfg` with `state` loaded."""
    from pipeline.models.autoencoder import build_autoencoder

    model = build_autoencoder(cfg.model, cfg.data.resolution)
    load_state(model, state, source)
    return model
