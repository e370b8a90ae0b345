"""The model card every export writes (README.md in the folder, or NAME.md beside a single file)."""

from __future__ import annotations

import json

import yaml

from pipeline.config import config_to_dict

LOAD = {
    "diffusers": """```python
from diffusers import {cls}
vae = {cls}.from_pretrained("{path}")          # or as the `vae` of a diffusers pipeline
```""",
    "firststage": """```
firststage evaluate --model {path} --data SHARDS    # any stage's --model, and train.init_from
```""",
    "single-file": """```python
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_single_file("{path}", config="<a diffusers VAE folder of the same shape>")
# ComfyUI / A1111: copy the file into models/vae/. firststage: --model {path}
```""",
    "encoder-only": """```python
import torch
program = torch.export.load("{path}/encoder.pt2").module()   # no Python model code needed
mean, logvar = program(images)                               # images: float [B, 3, H, W] in [-1, 1]
```""",
}


MARK = "exported by firststage"  # in the first line of every model card


def is_model_card(path) -> bool:
    """Whether `path` is a model card an export wrote (its first line says so)."""
    from pathlib import Path

    if not Path(path).is_file():  # a FIFO would block the read
        return False
    try:
        with open(Path(path), "rb") as f:
            first = f.readline(400).decode("utf-8", "replace")
    except OSError:
        return False
    return first.startswith("# ") and MARK in first


def model_card(fmt: str, cls: str, path: str, source: str, cfg, normalisation: dict, trainer: dict | None,
               data_summary: str | None, eval_table: str | None, note: str = "") -> str:
    from pipeline.models.normalisation import describe

    lines = [f"# {cls} {MARK} ({fmt})", "",
             f"Source: `{source}`" + (f", step {trainer['step']}, {trainer['samples']} images seen"
                                      if trainer and "step" in trainer else ""),
             "", "## Latent normalisation", "", f"- {describe(normalisation)}", *reading(normalisation), "",
             "## Load it", "",
             LOAD[fmt].format(cls=cls, path=path), ""] + ([note, ""] if note else [])
    if data_summary:
        lines += ["## Training data", "", data_summary, ""]
    if eval_table:
        lines += ["## Evaluation", "", eval_table.strip(), ""]
    lines += ["## Training config", "", "```yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def reading(spec: dict) -> list[str]:
    """How a diffusion model's latents meet this normalisation: what its pipeline undoes before decoding, and the
    LatentDataset that yields latents normalised exactly so (pipeline.latents.reader)."""
    own = ("- `LatentDataset(folder)` applies the normalisation in its encode manifest (of a firststage run: measured on "
           "those latents; `firststage export --stats folder/manifest.json` writes exactly that one)")
    if spec["kind"] != "scale_shift":
        return [own]
    scale, shift = spec["scaling_factor"], spec.get("shift_factor")
    undo = f"latents / {scale!r}" + (f" + {shift!r}" if shift is not None else "")
    return [f"- decoding: `vae.decode({undo})`, i.e. `latents / scaling_factor"
            + (" + shift_factor` as FLUX / SD3 pipelines do" if shift is not None else "` as SD 1.x pipelines do"),
            own + f"; `LatentDataset(folder, scaling_factor={scale!r}, shift_factor={shift or 0.0!r})` applies this one"]


def data_summary(manifest: dict) -> str:
    sizes = ", ".join(f"{k}: {v}" for k, v in list(manifest.get("output_sizes", {}).items())[:5])
    return (f"{manifest.get('total', '?')} samples in {len(manifest.get('shards', []))} shards "
            f"({manifest.get('skipped_count', 0)} inputs skipped); sizes {sizes or 'n/a'}; "
            f"options {json.dumps(manifest.get('options', {}))}")


def card_inputs(weights, cfg) -> tuple[dict | None, str | None, str | None]:
    """(trainer.json, data manifest summary, eval table) for the model card, where they exist."""
    from pipeline.checkpoint import read_trainer_state
    from pipeline.storage import as_path

    trainer = read_trainer_state(weights.local) if weights.checkpoint is not None else None  # the pinned record
    data = as_path(cfg.data.train) if cfg.data.train else None  # a local path or an object-store URL
    manifest = data / "manifest.json" if data and data.is_dir() else data
    summary = data_summary(json.loads(manifest.read_text())) if manifest and manifest.suffix == ".json" and manifest.is_file() else None
    evals = [p / "eval.md" for p in (as_path(weights.given), as_path(weights.path)) if (p / "eval.md").is_file()]
    return trainer, summary, evals[0].read_text() if evals else None
