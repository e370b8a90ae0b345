"""Checkpoints: one folder per step that holds everything needed to resume and describes itself.

  run/checkpoints/step-00005000/
      autoencoder.safetensors   ema.safetensors   objective.safetensors   (tensors: safetensors, never pickle)
      optimizer.pt  optimizer_d.pt  schedulers.pt  scaler.pt  rng-rank{r}.pt   (torch.load(weights_only=True))
      trainer.json  config.yaml

This module is the only place these names are spelled: `save_training_checkpoint` writes them and
`load_training_checkpoint` reads them; the trainer only collects state dicts. A checkpoint is written under
`.step-XXXXXXXX.tmp/` and renamed when every rank has written its part, so a folder named `step-*` is always
complete: a run killed during a save resumes from the previous one. Weights load from a run folder (newest
checkpoint, EMA by default), one checkpoint folder, or a diffusers folder; nothing is unpickled.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import Config, config_from_dict, downsampling_factor, load_config, merge_dicts, parse_overrides, save_config
from pipeline.errors import UserError
from pipeline.io import atomic_write_json, disk_full_as_oserror, respect_umask

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")
# the files of a checkpoint, by the state they hold
TENSOR_FILES = {"autoencoder": "autoencoder.safetensors", "ema": "ema.safetensors", "objective": "objective.safetensors"}
OBJECT_FILES = {"optimizer": "optimizer.pt", "optimizer_d": "optimizer_d.pt", "schedulers": "schedulers.pt",
                "scaler": "scaler.pt"}
TRAINER_FILE = "trainer.json"  # written last: its presence marks a complete folder
CONFIG_FILE = "config.yaml"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def save_training_checkpoint(folder: str | Path, state: dict, rank: int = 0, main: bool = True) -> None:
    """Write this process's part of a training checkpoint into `folder` (the staging folder).

    `state`: autoencoder / ema / objective (tensor dicts -> safetensors), optimizer / optimizer_d / schedulers / scaler
    (plain containers of tensors and numbers -> torch.save), rng (this rank's RNG state, written by every rank),
    config (a Config -> config.yaml) and trainer (a dict -> trainer.json). A missing or None entry is not written.
    Every rank writes rng-rank{rank}.pt; the main process writes the rest."""
    folder = Path(folder)
    if state.get("rng") is not None:
        save_object(folder / rng_file(rank), state["rng"])
    if not main:
        return
    for key, name in TENSOR_FILES.items():
        if state.get(key):
            save_tensors(folder / name, state[key])
    for key, name in OBJECT_FILES.items():
        if state.get(key) is not None:
            save_object(folder / name, state[key])
    if state.get("config") is not None:
        save_config(state["config"], folder / CONFIG_FILE)
    atomic_write_json(folder / TRAINER_FILE, state.get("trainer", {}))


def load_training_checkpoint(folder: str | Path, rank: int = 0) -> dict:
    """What save_training_checkpoint wrote, under the same keys (None where a file is absent); `rng` is this rank's.
    Tensors load from safetensors and everything else with torch.load(weights_only=True): no pickled code runs."""
    folder = Path(folder)
    out: dict = {"trainer": read_trainer_state(folder)}
    for key, name in TENSOR_FILES.items():
        out[key] = load_tensors(folder / name) if (folder / name).is_file() else None
    for key, name in OBJECT_FILES.items():
        out[key] = load_object(folder / name) if (folder / name).is_file() else None
    out["rng"] = load_object(folder / rng_file(rank)) if (folder / rng_file(rank)).is_file() else None
    return out


def is_checkpoint(folder: str | Path) -> bool:
    """A complete firststage checkpoint folder (its trainer.json, written last, exists)."""
    return (Path(folder) / TRAINER_FILE).is_file()


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f".step-{step:08d}.tmp"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and is_checkpoint(p)]
    return sorted(found, key=lambda p: p.name)


def find_resume_path(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def commit_checkpoint(staging: Path, final: Path) -> None:
    if final.exists():  # the same step saved again (a rerun that got no further): replace it
        shutil.rmtree(final)
    staging.rename(final)


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and stale staging folders of killed saves."""
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    for p in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in root.glob(".step-*.tmp") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    with disk_full_as_oserror(path):
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    respect_umask(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # a truncated or hostile file: one line naming it, never a traceback
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def save_object(path: Path, obj) -> None:
    with disk_full_as_oserror(path):
        torch.save(obj, path)


def load_object(path: Path):
    """Optimizer / scheduler / RNG state: plain containers of tensors and numbers; never executes pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # torch's own message would advise weights_only=False: never print that
        raise UserError(f"{path}: refused: not plain tensors and numbers, or damaged ({type(e).__name__}); "
                        f"it was not executed") from None


def rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(mt),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / TRAINER_FILE).read_text())


# ------------------------------------------------------------------------------------------ loading models
WEIGHT_FILES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # single files: SD / LDM, or legacy torch pickles
ENCODER_ONLY_CONFIG = "encoder_config.json"  # the encoder-only export's folder marker (pipeline.export.encoder_only)


def _is_diffusers_folder(p: Path) -> bool:
    if not (p / "config.json").is_file():
        return False
    try:
        return json.loads((p / "config.json").read_text()).get("_class_name") in ("AutoencoderKL", "VQModel")
    except json.JSONDecodeError:
        return False


def resolve_model_path(path: str | Path) -> tuple[str, Path]:
    """(kind, path) with kind 'checkpoint' (a run folder's newest or a checkpoint folder), 'diffusers' (a folder,
    also a pipeline folder's `vae/`), 'file' (a single .safetensors / .ckpt / .pt / .bin) or 'encoder-only'."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--model {path}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() in WEIGHT_FILES:
            return "file", p
        raise UserError(f"--model {path}: not a weights file (expected {', '.join(WEIGHT_FILES)})")
    if (p / TENSOR_FILES["autoencoder"]).is_file() and (p / CONFIG_FILE).is_file():
        return "checkpoint", p
    if (p / CHECKPOINTS).is_dir():
        latest = find_resume_path(p)
        if latest is None:
            raise UserError(f"--model {path}: run folder has no complete checkpoint yet")
        return "checkpoint", latest
    if (p / ENCODER_ONLY_CONFIG).is_file():
        return "encoder-only", p
    if _is_diffusers_folder(p):
        return "diffusers", p
    if _is_diffusers_folder(p / "vae"):
        return "diffusers", p / "vae"
    raise UserError(
        f"--model {path}: not an autoencoder (expected a firststage run or checkpoint folder, a diffusers "
        f"AutoencoderKL/VQModel folder with config.json, or a single .safetensors/.ckpt file)"
    )


def pin_model_path(path: str | Path) -> str:
    """`--model` as the weights it means now: a run folder becomes its newest complete checkpoint folder (so a
    checkpoint the trainer writes later cannot change what a running job loads or how it labels it); any other
    path stays as given."""
    kind, p = resolve_model_path(path)
    return str(p) if kind == "checkpoint" else str(path)


def checkpoint_weights(folder: Path, ema: bool = True) -> Path:
    """The EMA weights of a checkpoint when asked for and present, else its raw weights."""
    ema_file = folder / TENSOR_FILES["ema"]
    return ema_file if ema and ema_file.is_file() else folder / TENSOR_FILES["autoencoder"]


def describe_weights(path: str | Path, ema: bool = True) -> str:
    """Which weights `--model path` means, for summaries and records: a checkpoint's EMA or raw file, a diffusers
    folder, a single file, or an encoder-only export."""
    kind, p = resolve_model_path(path)
    if kind == "checkpoint":
        return f"{checkpoint_weights(p, ema).name} ({p.name})"
    return {"diffusers": "diffusers weights", "file": f"single file {p.name}", "encoder-only": "encoder-only export"}[kind]


def read_weight_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A single weights file -> (the autoencoder's tensors under diffusers names, the file's metadata).

    .safetensors: LDM / SD names (with or without `first_stage_model.` / `vae.`; of a full SD checkpoint only the
    autoencoder's tensors are read) or diffusers names. .ckpt / .pt / .pth / .bin: torch.load(weights_only=True)
    only; a pickle that needs code to load is refused with one line and never executed."""
    from pipeline.export.ldm import PREFIXES, is_ldm_named, ldm_to_diffusers, strip_prefix

    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                keys = list(f.keys())
                prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in keys)), "")
                state = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path}: refused: it is not plain tensors (loading it would need to run code from the "
                            f"file, which firststage never does; {type(e).__name__}). Convert it to .safetensors "
                            f"where you trust it") from None
        obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict):
            raise UserError(f"{path}: holds no state dict (a {type(obj).__name__})")
        state, meta = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    state = strip_prefix(state)
    if is_ldm_named(state):
        state = ldm_to_diffusers(state)
    return state, meta


def file_model_config(path: Path, state: dict, meta: dict, overrides: list[str] | None = None) -> Config:
    """The Config of a single file: the model section a firststage export stores in its metadata, else the one
    inferred from the shapes (pipeline.export.ldm.infer_model_section); then the user's overrides."""
    from pipeline.export.ldm import infer_model_section

    if "firststage_model" in meta:
        section = json.loads(meta["firststage_model"])
    else:
        section = infer_model_section(state)
        if "scaling_factor" in meta:
            section["scaling_factor"] = float(meta["scaling_factor"])
    data = {"resolution": int(meta.get("resolution", 256))}
    f = downsampling_factor(section["block_out_channels"])
    data["resolution"] -= data["resolution"] % f
    return config_from_dict(merge_dicts({"model": section, "data": data}, parse_overrides(overrides or [])))


def check_shapes(model, state: dict[str, torch.Tensor], source: str) -> None:
    """The first tensor whose shape differs between the weights and the configured model, as one line."""
    own = model.state_dict()
    for k, mine in own.items():  # in the model's order: encoder first
        v = state.get(k)
        if v is not None and mine.shape != v.shape:
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)} in the weights but {tuple(mine.shape)} in "
                            f"the config's model; set model.* to match the weights (or leave them out)")


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


def load_autoencoder(path: str | Path, ema: bool = True, overrides: list[str] | None = None):
    """-> (model, Config) from any supported format. A checkpoint rebuilds the model from its own config.yaml; a
    diffusers folder loads with diffusers (safetensors only); a single file is built from its stored or inferred
    config; an encoder-only export builds no decoder."""
    from diffusers import AutoencoderKL, VQModel

    from pipeline.models.autoencoder import build_autoencoder

    kind, folder = resolve_model_path(path)
    if kind == "checkpoint":
        cfg = load_config(folder / CONFIG_FILE, overrides)
        model = build_autoencoder(cfg.model, cfg.data.resolution)
        load_state(model, load_tensors(checkpoint_weights(folder, ema)), str(folder))
    elif kind == "encoder-only":
        from pipeline.export.encoder_only import load_encoder_only

        model, cfg = load_encoder_only(folder, overrides)
    elif kind == "file":
        state, meta = read_weight_file(folder)
        cfg = file_model_config(folder, state, meta, overrides)
        model = build_autoencoder(cfg.model, cfg.data.resolution)
        load_state(model, state, str(folder))
    else:
        cls = VQModel if json.loads((folder / "config.json").read_text())["_class_name"] == "VQModel" else AutoencoderKL
        try:
            model = cls.from_pretrained(folder, use_safetensors=True)
        except (OSError, EnvironmentError) as e:
            raise UserError(f"--model {path}: cannot load diffusers weights ({str(e).splitlines()[0]})") from None
        cfg = config_for_diffusers(model, overrides)
    return model.eval(), cfg


def config_for_diffusers(model, overrides: list[str] | None = None) -> Config:
    """A Config whose model section describes a diffusers autoencoder (for evaluate / encode / init)."""
    c = model.config
    model_section = {
        "kind": "vq" if c.get("_class_name") == "VQModel" or hasattr(model, "quantize") else "kl",
        "in_channels": c["in_channels"],
        "block_out_channels": list(c["block_out_channels"]),
        "layers_per_block": c["layers_per_block"],
        "latent_channels": c["latent_channels"],
        "norm_num_groups": c["norm_num_groups"],
        "scaling_factor": float(c.get("scaling_factor") or 1.0),
        "mid_block_attention": bool(c.get("mid_block_add_attention", True)),
    }
    if c.get("shift_factor") is not None:
        model_section["shift_factor"] = float(c["shift_factor"])
    if model_section["kind"] == "vq":
        model_section["codebook"] = {"size": int(c["num_vq_embeddings"]), "dim": int(c["vq_embed_dim"] or c["latent_channels"])}
    f = downsampling_factor(model_section["block_out_channels"])
    size = int(c.get("sample_size") or 256)
    data = {"resolution": size if size % f == 0 else 256}
    return config_from_dict(merge_dicts({"model": model_section, "data": data}, parse_overrides(overrides or [])))


def load_weights_into(model, path: str | Path, ema: bool = True) -> str:
    """Initialise `model` (built from the run's config) from any supported format (fine-tuning). The first tensor
    whose shape differs is named with both shapes."""
    kind, folder = resolve_model_path(path)
    source = f"train.init_from {path}"
    if kind == "checkpoint":
        state = load_tensors(checkpoint_weights(folder, ema))
    elif kind == "file":
        state = read_weight_file(folder)[0]
    elif kind == "encoder-only":
        raise UserError(f"{source}: an encoder-only export has no decoder to train; use the full model")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{source}: no .safetensors weights in {folder}")
        state = {}
        for f in files:
            state.update(load_tensors(f))
    load_state(model, state, source)
    return str(folder)
