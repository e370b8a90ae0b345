"""The original LDM / Stable Diffusion key names of a first-stage autoencoder, both ways.

diffusers' `convert_ldm_vae_checkpoint` (loaders/single_file_utils.py) maps LDM names to diffusers names;
`diffusers_to_ldm` here is its exact inverse and `ldm_to_diffusers` does the same mapping forwards, so
diffusers -> single file -> diffusers gives back every tensor bit for bit. The differences:

  diffusers                                          LDM (CompVis / SD, taming for VQ)
  encoder.down_blocks.{i}.resnets.{j}.*             encoder.down.{i}.block.{j}.*           (conv_shortcut -> nin_shortcut)
  encoder.down_blocks.{i}.downsamplers.0.conv.*     encoder.down.{i}.downsample.conv.*
  decoder.up_blocks.{i}.resnets.{j}.*               decoder.up.{n-1-i}.block.{j}.*         (the decoder's levels are reversed)
  decoder.up_blocks.{i}.upsamplers.0.conv.*         decoder.up.{n-1-i}.upsample.conv.*
  {en,de}coder.mid_block.resnets.{k}.*              {en,de}coder.mid.block_{k+1}.*
  {en,de}coder.mid_block.attentions.0.to_q/to_k/to_v/to_out.0/group_norm
                                                    {en,de}coder.mid.attn_1.q/k/v/proj_out/norm  (1x1 conv weights: [C, C, 1, 1])
  {en,de}coder.conv_norm_out.*                      {en,de}coder.norm_out.*
  quant_conv, post_quant_conv, quantize.embedding.weight: the same.

It also reads the model's shape back from LDM-named weights (`infer_model_section`) for files that carry no config.
"""

from __future__ import annotations

import re


from pipeline.errors import UserError

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

PREFIXES = ("first_stage_model.", "vae.")  # full SD / LDM checkpoints keep the autoencoder under one of these
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _num_levels(names, side: str, ldm: bool) -> int:
    pat = re.compile(rf"^{side}\.{'down' if side == 'encoder' else 'up'}{'' if ldm else '_blocks'}\.(\d+)\.")
    levels = {int(m.group(1)) for k in names if (m := pat.match(k))}
    return max(levels) + 1 if levels else 0


# (diffusers prefix, LDM prefix, how the level index maps diffusers -> LDM, and back)
_SAME = (lambda i, n: i, lambda i, n: i)
_REVERSED = (lambda i, n: n - 1 - i, lambda i, n: n - 1 - i)  # the decoder's levels run the other way in LDM
_FROM_ONE = (lambda i, n: i + 1, lambda i, n: i - 1)  # mid.block_1, mid.block_2
_RULES = [
    ("encoder.down_blocks.{i}.resnets.", "encoder.down.{i}.block.", _SAME),
    ("encoder.down_blocks.{i}.downsamplers.0.", "encoder.down.{i}.downsample.", _SAME),
    ("decoder.up_blocks.{i}.resnets.", "decoder.up.{i}.block.", _REVERSED),
    ("decoder.up_blocks.{i}.upsamplers.0.", "decoder.up.{i}.upsample.", _REVERSED),
    *[(f"{side}.mid_block.resnets.{{i}}.", f"{side}.mid.block_{{i}}.", _FROM_ONE) for side in ("encoder", "decoder")],
    *[(f"{side}.mid_block.attentions.0.{d}.", f"{side}.mid.attn_1.{l}.", _SAME)
      for side in ("encoder", "decoder") for d, l in _ATTN.items()],
    *[(f"{side}.conv_norm_out.", f"{side}.norm_out.", _SAME) for side in ("encoder", "decoder")],
]


def _rename(key: str, levels: int, to_ldm: bool) -> str:
    for d, l, maps in _RULES:
        src, dst = (d, l) if to_ldm else (l, d)
        m = re.match(re.escape(src).replace(r"\{i\}", r"(\d+)"), key)
        if m:
            i = maps[0 if to_ldm else 1](int(m.group(1)), levels) if m.groups() else 0
            key = dst.format(i=i) + key[m.end():]
            break
    shortcut = (".conv_shortcut.", ".nin_shortcut.") if to_ldm else (".nin_shortcut.", ".conv_shortcut.")
    return key.replace(*shortcut)


def diffusers_key_to_ldm(key: str, levels: int) -> str:
    return _rename(key, levels, to_ldm=True)


def _is_attention_matrix(ldm_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def diffusers_to_ldm(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL / VQModel state dict under LDM names (attention matrices as 1x1 convs)."""
    levels = _num_levels(state, "decoder", ldm=False)
    out = {}
    for key, t in state.items():
        ldm = diffusers_key_to_ldm(key, levels)
        if _is_attention_matrix(ldm) and t.dim() == 2:
            t = t[:, :, None, None]
        out[prefix + ldm] = t.contiguous()
    return out


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors of a full SD / LDM checkpoint (or a bare VAE file), without the prefix."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def is_ldm_named(state) -> bool:
    return any(k.startswith("encoder.down.") or k.startswith("decoder.up.") for k in state)


def ldm_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM names (prefix already stripped) -> diffusers names: the inverse of diffusers_to_ldm."""
    levels = _num_levels(state, "decoder", ldm=True)
    # build the inverse from the forward map over every name the diffusers side can have
    out = {}
    for key, t in state.items():
        dk = ldm_key_to_diffusers(key, levels)
        if dk is None:
            continue  # LDM training-only tensors (loss.*, discriminator) are not part of the autoencoder
        if re.search(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", dk) and t.dim() > 2:
            t = t.reshape(t.shape[0], t.shape[1])
        out[dk] = t
    return out


def ldm_key_to_diffusers(key: str, levels: int) -> str | None:
    if not key.startswith(("encoder.", "decoder.", "quant_conv.", "quantize.", "post_quant_conv.")):
        return None
    return _rename(key, levels, to_ldm=False)


def infer_model_section(state: dict[str, torch.Tensor]) -> dict:
    """The `model:` config section (diffusers names) that these diffusers-named weights fit: levels and their
    channels, layers per block, latent channels, attention, KL or VQ (and the codebook). GroupNorm's group count
    is not in the shapes: here the largest power of two <= 32 that divides every width, which builds a model of
    the right shapes; pipeline.weights.single_file.settle_norm_groups then settles the count itself."""
    def shape(k):
        if k not in state:
            raise UserError(f"weights have no {k}: not a first-stage autoencoder (AutoencoderKL / VQModel)")
        return tuple(state[k].shape)

    levels = _num_levels(state, "encoder", ldm=False)
    if levels == 0:
        raise UserError("weights have no encoder.down_blocks: not a first-stage autoencoder (AutoencoderKL / VQModel)")
    widths = [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)]
    layers = len({m.group(1) for k in state if (m := re.match(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    groups = 32
    while groups > 1 and any(w % groups for w in widths):
        groups //= 2
    section = {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "mid_block_attention": "encoder.mid_block.attentions.0.to_q.weight" in state,
        "norm_num_groups": groups,
    }
    if "quantize.embedding.weight" in state:
        size, dim = shape("quantize.embedding.weight")
        section.update(kind="vq", latent_channels=shape("encoder.conv_out.weight")[0],
                       codebook={"size": size, "dim": dim})
    else:
        section.update(kind="kl", latent_channels=shape("encoder.conv_out.weight")[0] // 2)
    return section
