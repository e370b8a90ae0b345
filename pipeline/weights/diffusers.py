"""Format: a diffusers folder (config.json + safetensors), also a pipeline folder's `vae/`, of any class a model
family knows (AutoencoderKL, VQModel, AutoencoderDC, AutoencoderKLFlux2, AutoencoderKLQwenImage, AutoencoderKLWan,
AutoencoderTiny). Loaded and saved by diffusers itself (safetensors only), so an export works as the `vae` of that
family's diffusers pipelines."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import config_from_dict, merge_dicts, parse_overrides
from pipeline.errors import UserError
from pipeline.models.families import family_of, family_of_class
from pipeline.models.quantizer import VectorQuantizer

NAME = "diffusers"


def _class_name(p: Path) -> str | None:
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("_class_name") if isinstance(config, dict) else None


def detect(p: Path) -> Path | None:
    for folder in (p, p / "vae"):
        if folder.is_dir() and family_of_class(_class_name(folder)) is not None:
            return folder
    return None


def describe(folder: Path, ema: bool) -> str:
    return "diffusers weights"


def state_dict(folder: Path, ema: bool) -> dict:
    from pipeline.checkpoint import load_tensors

    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))  # diffusers' names (one file, or shards)
    if not files:
        raise UserError(f"{folder}: no diffusion_pytorch_model*.safetensors weights")
    state = {}
    for f in files:
        state.update(load_tensors(f))
    return state


def load(folder: Path, ema: bool, overrides: list[str] | None):
    name = _class_name(folder)
    cls = next(c for c in family_of_class(name).classes if c.__name__ == name)
    try:
        model = cls.from_pretrained(folder, use_safetensors=True)
    except (OSError, EnvironmentError) as e:
        raise UserError(f"{folder}: cannot load diffusers weights ({str(e).splitlines()[0]})") from None
    return model, model_config(model, overrides)


def model_config(model, overrides: list[str] | None = None):
    """A Config whose model section describes a loaded model (for evaluate / encode / export / init_from)."""
    fam = family_of(model)
    f = fam.downsampling_factor(model)
    size = int(model.config.get("sample_size") or 256)
    data = {"resolution": size if size % f == 0 else max(f, 256 - 256 % f)}
    return config_from_dict(merge_dicts({"model": fam.model_section(model), "data": data},
                                        parse_overrides(overrides or [])))


# ------------------------------------------------------------------------------------------------------ save
def refuse_cosine_codebook(model, fmt: str) -> None:
    if isinstance(getattr(model, "quantize", None), VectorQuantizer) and model.quantize.cosine:
        raise UserError(f"format {fmt}: this VQ model has a cosine (l2-normalised) codebook, which diffusers' "
                        f"VQModel and LDM's quantizer cannot reproduce (they look codes up by Euclidean distance); "
                        f"export it as encoder-only, or train with model.codebook.cosine=false")


def to_plain_diffusers(model):
    """The model as a class diffusers ships, with identical weights (a copy for VQ with our quantizer, the model
    itself otherwise)."""
    from diffusers import VQModel

    if not isinstance(getattr(model, "quantize", None), VectorQuantizer):
        return model  # diffusers' own class already
    refuse_cosine_codebook(model, "diffusers")
    q = model.quantize
    plain = VQModel.from_config(model.config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("quantize.")}
    state["quantize.embedding.weight"] = q.codebook().detach().clone()
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).dtype)


def save(model, folder: Path, section: dict | None = None, resolution: int | None = None,
         normalisation: dict | None = None, **_) -> Path:
    """diffusers' own save_pretrained (safetensors), with the latent normalisation written where the family's
    pipelines read it (config factors, latents_mean / latents_std, BatchNorm statistics)."""
    plain = to_plain_diffusers(model)
    if normalisation is not None:
        family_of(plain).set_normalisation(plain, normalisation)
    plain.save_pretrained(folder, safe_serialization=True)
    return folder
