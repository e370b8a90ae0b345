"""Format: a firststage run folder (its newest complete checkpoint) or one checkpoint folder (pipeline.checkpoint).
The model is rebuilt from the checkpoint's own config.yaml; the EMA weights are used unless asked otherwise."""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import CHECKPOINTS, CONFIG_FILE, TENSOR_FILES, find_resume_path, is_checkpoint, load_tensors
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.storage import regular_file
from pipeline.weights.loading import build_and_load

NAME = "checkpoint"


def detect(p: Path) -> Path | None:
    if not p.is_dir():
        return None
    if (p / CHECKPOINTS).is_dir():
        latest = find_resume_path(p)
        if latest is None:
            raise UserError(f"{p}: run folder has no complete checkpoint yet")
        return latest
    if (p / TENSOR_FILES["autoencoder"]).is_file() and (p / CONFIG_FILE).is_file():
        if not is_checkpoint(p):
            raise UserError(f"{p}: incomplete checkpoint (its save did not finish: no trainer.json)")
        return p
    return None


def weights_file(folder: Path, ema: bool) -> Path:
    """The EMA weights of a checkpoint when asked for and present, else its raw weights."""
    ema_file = folder / TENSOR_FILES["ema"]
    return ema_file if ema and ema_file.is_file() else folder / TENSOR_FILES["autoencoder"]


def describe(folder: Path, ema: bool) -> str:
    return f"{weights_file(folder, ema).name} ({folder.name})"


def state_dict(folder: Path, ema: bool) -> dict:
    return load_tensors(weights_file(folder, ema))


def light_config(folder: Path, overrides: list[str] | None = None):
    """The checkpoint's own config.yaml (no model, no torch)."""
    return load_config(regular_file(folder / CONFIG_FILE, "config"), overrides)


def load(folder: Path, ema: bool, overrides: list[str] | None):
    cfg = load_config(regular_file(folder / CONFIG_FILE, "config file"), overrides)
    return build_and_load(cfg, state_dict(folder, ema), str(folder)), cfg



def save(model, folder: Path, section: dict, resolution: int, normalisation: dict | None = None, **_) -> Path:
    """A checkpoint folder holding only the model (firststage's own format: any family, FSQ included, which no
    diffusers class holds): autoencoder.safetensors, config.yaml and the record trainer.json."""
    import json

    from pipeline.checkpoint import TRAINER_FILE, save_tensors
    from pipeline.config import config_from_dict, save_config
    from pipeline.models.families import family_of

    fam = family_of(model)
    if normalisation is not None:
        fam.set_normalisation(model, normalisation)
        section = fam.model_section(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / TENSOR_FILES["autoencoder"], model.state_dict())
    save_config(config_from_dict({"model": section, "data": {"resolution": resolution}}), folder / CONFIG_FILE)
    (folder / TRAINER_FILE).write_text(json.dumps({"exported": True, "normalisation": normalisation}) + "\n")
    return folder
