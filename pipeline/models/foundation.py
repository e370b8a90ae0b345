"""Frozen vision foundation models: DINOv2's patch features for latent alignment (VA-VAE), and the encoder of a
representation autoencoder (RAE: DINOv2 with registers, SigLIP-2, MAE), each read once by the one user the Trainer builds
(its objective keeps the alignment and discriminator models; the RAE family copies its encoder into the model).

VA-VAE (hustvl/LightningDiT, vavae/ldm/models/foundation_models.py) loads timm's vit_large_patch14_dinov2.lvd142m
with dynamic_img_size and takes forward_features(x)[:, 1:]: the image in [-1, 1] (no ImageNet normalisation)
resized bilinearly to 224, patch tokens after the final LayerNorm, CLS dropped. We run the same network through
transformers' Dinov2Model (no timm dependency) with timm's position-embedding resampling (bicubic with antialiasing,
37x37 -> 16x16), which transformers' own interpolate_pos_encoding does not use (no antialiasing): with it the
features equal timm's on the same weights (docs/diffusable-latents.md: how this was checked). Weights load from a
transformers folder (facebook/dinov2-large) or from timm's model.safetensors (converted here, by name), either one
also named by its Hub id (pipeline/weights/hub.py: from the Hugging Face cache).

The model is frozen and runs without gradients, in bf16 on GPUs. `random_dinov2()` is a tiny randomly initialised
DINOv2 of the same kind, for tests, as LPIPS has its random backbone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
import pipeline.weights.hub as hub  # the module alone (pipeline.weights reads configs: an import cycle)

DOWNLOAD = ("name a Hub id (loss.alignment.model=facebook/dinov2-large), or download facebook/dinov2-large (`huggingface-cli download facebook/dinov2-large --local-dir {path}`) "
            "or timm's vit_large_patch14_dinov2.lvd142m (`huggingface-cli download "
            "timm/vit_large_patch14_dinov2.lvd142m --local-dir {path}`), or set loss.alignment.model to where it is")


FOUNDATION_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]


def _dinov2_classes():
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError:
        raise UserError("loss.alignment needs transformers for DINOv2 (pip install 'firststage[align]')") from None
    return Dinov2Config, Dinov2Model


def foundation_source(path: str) -> tuple[str, Path]:
    """What `path` holds: ("transformers", folder) or ("timm", safetensors file). One line naming what to download
    and where to put it when there is nothing usable; cheap (no weights read), so the trainer asks first."""
    if not path:
        raise UserError("loss.alignment.model is not set: give the DINOv2 weights (loss.alignment.model=FOLDER); "
                        + DOWNLOAD.format(path="FOLDER"))
    p = Path(path)
    parsed = hub.parse(path)  # facebook/dinov2-large: from the Hugging Face cache (fetched into it when online)
    if parsed is not None:
        p = Path(hub.snapshot(f"loss.alignment.model {path}", *parsed, patterns=FOUNDATION_FILES).folder)
    if p.is_file() and p.suffix == ".safetensors":
        return "timm", p
    if p.is_dir():
        config = p / "config.json"
        kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        if kind == "dinov2" and any(p.glob("*.safetensors")):
            return "transformers", p
        if (p / "model.safetensors").is_file() and kind is None:  # timm's hub folder: config.json has no model_type
            return "timm", p / "model.safetensors"
    raise UserError(f"loss.alignment.model {path}: no DINOv2 weights there; {DOWNLOAD.format(path=path)}")


def timm_to_transformers(state: dict, names: set[str]) -> dict:
    """timm's ViT names (blocks.N.attn.qkv, ls1.gamma, norm) -> Dinov2Model's (`names`: its state_dict keys, so
    both transformers' current q_proj / o_proj names and the older attention.attention.query ones are served)."""
    new = "encoder.layer.0.attention.q_proj.weight" in names
    qkv = ("attention.q_proj", "attention.k_proj", "attention.v_proj") if new else \
        ("attention.attention.query", "attention.attention.key", "attention.attention.value")
    out_proj = "attention.o_proj" if new else "attention.output.dense"
    fixed = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "mask_token": "embeddings.mask_token", "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
             "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    block = {"norm1": "norm1", "norm2": "norm2", "attn.proj": out_proj, "ls1.gamma": "layer_scale1.lambda1",
             "ls2.gamma": "layer_scale2.lambda1", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out = {}
    for k, v in state.items():
        if k in fixed:
            out[fixed[k]] = v.reshape(1, -1) if k == "mask_token" else v
            continue
        if not k.startswith("blocks."):
            raise UserError(f"{k}: not a timm DINOv2 ViT tensor (registers and SwiGLU variants are not supported)")
        _, i, rest = k.split(".", 2)
        prefix = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            for name, part in zip(qkv, v.chunk(3, dim=0)):
                out[prefix + name + rest[len("attn.qkv"):]] = part
            continue
        stem, _, leaf = rest.rpartition(".")
        mapped = block.get(stem) if stem in block else block.get(rest)
        if mapped is None:
            raise UserError(f"{k}: not a timm DINOv2 ViT tensor (registers and SwiGLU variants are not supported)")
        out[prefix + (mapped if rest in block else f"{mapped}.{leaf}")] = v
    return out


def _from_timm_file(file: Path):
    from safetensors.torch import load_file

    Dinov2Config, Dinov2Model = _dinov2_classes()
    state = load_file(str(file))
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise UserError(f"loss.alignment.model {file}: not timm DINOv2 weights (no pos_embed / patch_embed)")
    width, patch = state["pos_embed"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    config = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 64,  # DINOv2: 64 per head
                          patch_size=patch, image_size=grid * patch, layer_norm_eps=1e-6, qkv_bias=True,
                          mlp_ratio=hidden // width if hidden % width == 0 else hidden / width)
    model = Dinov2Model(config)
    converted = timm_to_transformers(state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise UserError(f"loss.alignment.model {file}: does not fit a DINOv2 ViT (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    return model


def load_dinov2(path: str):
    """Dinov2Model from a transformers folder or timm's safetensors (foundation_source)."""
    kind, where = foundation_source(path)
    if kind == "timm":
        return _from_timm_file(where)
    _, Dinov2Model = _dinov2_classes()
    try:
        return Dinov2Model.from_pretrained(str(where), local_files_only=True)
    except Exception as e:
        raise UserError(f"loss.alignment.model {path}: could not load DINOv2 ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); {DOWNLOAD.format(path=path)}") from None


def random_dinov2(width: int = 128, depth: int = 2):
    """A tiny DINOv2 (patch 14, 37x37 positions as the real ones, 64-wide heads) with seeded random weights: tests
    only, as LPIPS's random backbone; the same in every process."""
    Dinov2Config, Dinov2Model = _dinov2_classes()
    config = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=max(1, width // 64),
                          patch_size=14, image_size=518, layerscale_value=1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Dinov2Model(config)


def timm_position_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """timm's resample_abs_pos_embed for a square grid of positions plus one class token: bicubic, antialiased,
    in float32 (what vit_*_dinov2 with dynamic_img_size adds at 224 px)."""
    n = pos.shape[1] - 1
    old = math.isqrt(n)
    if old * old == n and (old, old) == tuple(grid):
        return pos
    patches = pos[:, 1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)
    return torch.cat([pos[:, :1], patches], dim=1)


class DINOv2Features(nn.Module):
    """Frozen DINOv2 patch features of images in [-1, 1]: [B, width, g, g], g = resolution // patch (VA-VAE's
    forward_dinov2, through transformers' modules with timm's position embedding)."""

    def __init__(self, model, resolution: int = 224):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.resolution = resolution
        self.width = model.config.hidden_size
        patch = model.config.patch_size
        self.patch = patch if isinstance(patch, int) else patch[0]

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, b = self.resolution, x.shape[0]
        x = F.interpolate(x.float(), size=(r, r), mode="bilinear", align_corners=False)
        grid = (r // self.patch, r // self.patch)
        bf16 = x.is_cuda and torch.cuda.is_bf16_supported()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16), torch.autocast("cpu", enabled=False):
            emb = self.model.embeddings
            tokens = emb.patch_embeddings(x)
            tokens = torch.cat([emb.cls_token.expand(b, -1, -1), tokens], dim=1)
            tokens = tokens + timm_position_embedding(emb.position_embeddings, grid)
            hidden = self.model.layernorm(self.model.encoder(tokens).last_hidden_state)
        return hidden[:, 1:].float().transpose(1, 2).reshape(b, self.width, *grid)


def foundation_model(model_path: str, backbone: str, resolution: int) -> DINOv2Features:
    """The frozen feature extractor loss.alignment names: DINOv2 from `model_path`, or the tiny random one."""
    if backbone == "random":
        import warnings

        warnings.warn("loss.alignment with a tiny random DINOv2 (loss.alignment.backbone=random): meant for tests "
                      "only, it is not a foundation model")
        return DINOv2Features(random_dinov2(), resolution)
    return DINOv2Features(load_dinov2(model_path), resolution)


# ------------------------------------------------------------------------------------- the frozen foundation models
# Each is read by the one object that uses it (the objective's alignment term or discriminator, the RAE family's
# initialise), which the Trainer builds once and keeps: no process-wide table hands a model to a second user.
# an RAE's encoder type -> (model_types of its config.json, the transformers class diffusers' AutoencoderRAE holds,
# where to download one)
RAE_ENCODERS = {"dinov2": (("dinov2_with_registers",), "Dinov2WithRegistersModel",
                           "facebook/dinov2-with-registers-base"),
                "siglip2": (("siglip", "siglip_vision_model"), "SiglipVisionModel", "google/siglip2-base-patch16-256"),
                "mae": (("vit_mae",), "ViTMAEModel", "facebook/vit-mae-base")}


def rae_encoder_source(encoder) -> Path:
    """The transformers folder model.rae.encoder names, or one line naming what to download and where to put it;
    cheap (config.json only), so the trainer asks before building anything."""
    model_types, _, repo = RAE_ENCODERS[encoder.type]
    where = encoder.weights or "FOLDER"
    fix = (f"download {repo} (`huggingface-cli download {repo} --local-dir {where}`) and set "
           f"model.rae.encoder.weights={where}")
    if not encoder.weights:
        raise UserError(f"model.rae.encoder.weights is not set: the frozen {encoder.type} encoder's weights; {fix}")
    p = Path(encoder.weights)
    config = p / "config.json"
    if not config.is_file() or not any(p.glob("*.safetensors")):
        raise UserError(f"model.rae.encoder.weights {p}: no {config.name} and *.safetensors of {encoder.type} there; "
                        f"{fix}")
    found = json.loads(config.read_text()).get("model_type")
    if found not in model_types:
        raise UserError(f"model.rae.encoder.weights {config}: model_type {found!r}, not {model_types[0]!r} "
                        f"(model.rae.encoder.type {encoder.type}); {fix}")
    return p


def load_rae_encoder(encoder) -> nn.Module:
    """The pretrained encoder model.rae.encoder names (transformers, local files only)."""
    import transformers

    folder = rae_encoder_source(encoder)
    cls = getattr(transformers, RAE_ENCODERS[encoder.type][1])
    try:
        return cls.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)
    except Exception as e:
        raise UserError(f"model.rae.encoder.weights {folder}: could not load {cls.__name__} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None


def dino_source(path: str) -> Path:
    """The transformers folder of DINO ViT-S/8 (RAE's discriminator backbone), or one line naming what to download
    and where to put it; cheap, so the trainer asks first."""
    fix = (f"download facebook/dino-vits8 (`huggingface-cli download facebook/dino-vits8 --local-dir "
           f"{path or 'FOLDER'}`) and set loss.adversarial.dino_model to it")
    p = Path(path) if path else None
    if p is None or not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        raise UserError(f"loss.adversarial.dino_model {path or '(not set)'}: no config.json and *.safetensors of "
                        f"DINO ViT-S/8 there; {fix}")
    return p


def dino_backbone(path: str, backbone: str) -> nn.Module:
    """The frozen ViT of RAE's discriminator: DINO ViT-S/8 from a transformers folder, or a tiny
    seeded random one (tests only)."""
    from transformers import ViTConfig, ViTModel

    if backbone == "random":
        config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                           patch_size=8, image_size=224)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ViTModel(config, add_pooling_layer=False)
    folder = dino_source(path)
    try:
        return ViTModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True)
    except Exception as e:
        raise UserError(f"loss.adversarial.dino_model {folder}: could not load a ViT ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
