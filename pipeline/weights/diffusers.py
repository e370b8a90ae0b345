"""Format: a diffusers folder (config.json + safetensors), also a pipeline folder's `vae/`, of any class a model
family knows (AutoencoderKL, VQModel, AutoencoderDC, AutoencoderKLFlux2, AutoencoderKLQwenImage, AutoencoderKLWan,
AutoencoderTiny, AutoencoderRAE, and every other image autoencoder of diffusers.models.autoencoders: the generic
families); an audio, video or other autoencoder of diffusers is refused as such in one line. Loaded and saved by
diffusers itself (safetensors only), so an export works as the `vae` of that family's diffusers pipelines."""

from __future__ import annotations

from pathlib import Path


from pipeline.config import config_from_dict, merge_dicts, parse_overrides
from pipeline.errors import UserError
from pipeline.models.families import family
from pipeline.models.registry import family_of_class_name
from pipeline.storage import regular_file
from pipeline.weights.loading import check_fit, read_json_config, safetensors_shapes

NAME = "diffusers"


def read_config(folder: Path) -> dict:
    """The folder's config.json (a regular file holding a JSON object), or one line saying what is wrong with it."""
    return read_json_config(folder / "config.json", "diffusers config")


def model_class(config: dict) -> type:
    name = config.get("_class_name")
    return next(c for c in family(family_of_class_name(name)).classes if c.__name__ == name)


def detect(p: Path) -> Path | None:
    for folder in (p, p / "vae"):
        if not (folder.is_dir() and (folder / "config.json").exists()):
            continue
        if family_of_class_name(read_config(folder).get("_class_name")) is not None:
            return folder
    return None


def weight_files(folder: Path) -> list[Path]:
    """diffusers' weight files (one, or shards): not a discriminator or anything else beside them."""
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no diffusion_pytorch_model*.safetensors weights")
    return [regular_file(f, "weights file") for f in files]


def describe(folder: Path, ema: bool) -> str:
    return f"diffusers weights ({read_config(folder).get('_class_name')})"


def state_dict(folder: Path, ema: bool) -> dict:
    from pipeline.checkpoint import load_tensors

    state = {}
    for f in weight_files(folder):
        state.update(load_tensors(f))
    return state


def load(folder: Path, ema: bool, overrides: list[str] | None):
    """diffusers' own from_pretrained, once config.json has been built on the meta device and checked against the
    weights' shapes (read from the headers): a config that does not fit is one line, before any memory is taken."""
    import torch

    config = read_config(folder)
    cls = model_class(config)
    shapes = {k: v for f in weight_files(folder) for k, v in safetensors_shapes(f).items()}
    try:
        with torch.device("meta"):
            skeleton = cls.from_config(config)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        raise UserError(f"{folder / 'config.json'}: does not describe a {cls.__name__} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from None
    check_fit(skeleton, shapes, str(folder / "config.json"))
    try:
        model = cls.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise UserError(f"{folder}: cannot load diffusers weights ({str(e).splitlines()[0][:160]})") from None
    return model, model_config(model, overrides)


def model_config(model, overrides: list[str] | None = None):
    """A Config whose model section describes a loaded model (for evaluate / encode / export / init_from)."""
    from pipeline.models.families import family_of

    fam = family_of(model)
    data = {"resolution": fam.default_resolution(model.config)}
    return config_from_dict(merge_dicts({"model": fam.model_section(model), "data": data},
                                        parse_overrides(overrides or [])))


def light_config(folder: Path, overrides: list[str] | None = None):
    """The Config from config.json alone (no model, no torch): the family and its diffusers config, the resolution;
    what encode compares with an output folder's settings before loading anything."""
    config = read_config(folder)
    fam = family(family_of_class_name(config.get("_class_name")))
    data = {"resolution": fam.default_resolution(config)}
    return config_from_dict(merge_dicts({"model": fam.light_section(config), "data": data},
                                        parse_overrides(overrides or [])))


# ------------------------------------------------------------------------------------------------------ save
def refuse_cosine_codebook(model, fmt: str) -> None:
    from pipeline.models.quantizer import VectorQuantizer

    if isinstance(getattr(model, "quantize", None), VectorQuantizer) and model.quantize.cosine:
        raise UserError(f"format {fmt}: this VQ model has a cosine (l2-normalised) codebook, which diffusers' "
                        f"VQModel and LDM's quantizer cannot reproduce (they look codes up by Euclidean distance); "
                        f"export it as encoder-only, or train with model.codebook.cosine=false")


def to_plain_diffusers(model):
    """The model as a class diffusers ships, with identical weights (a copy for VQ with our quantizer, the model
    itself otherwise)."""
    from pipeline.models.quantizer import VectorQuantizer

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
    from pipeline.models.families import family_of

    plain = to_plain_diffusers(model)
    if normalisation is not None:
        family_of(plain).set_normalisation(plain, normalisation)
    plain.save_pretrained(folder, safe_serialization=True)
    return folder
