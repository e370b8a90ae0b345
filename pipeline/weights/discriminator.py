"""The PatchGAN discriminator beside exported weights (`export --with-discriminator`), so that a decoder fine-tune
with the GAN continues from where training stopped instead of a random discriminator (REPA-E #25):
discriminator.safetensors (the objective's `discriminator.*` tensors) in the export folder; `train.init_from` of a
checkpoint or of such an export loads it when the run trains a discriminator."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


FILE = "discriminator.safetensors"
PREFIX = "discriminator."


def read(weights, prefix: str = PREFIX) -> dict[str, torch.Tensor] | None:
    """The discriminator's tensors that come with these weights (a checkpoint's objective, or an export's file);
    with another `prefix`, that part of a checkpoint's objective (the alignment projection: `alignment.projection.`)."""
    from pipeline.checkpoint import TENSOR_FILES, load_tensors

    folder = Path(weights.local)  # a checkpoint's pinned copy
    if weights.checkpoint is not None and (folder / TENSOR_FILES["objective"]).is_file():
        part = load_tensors(folder / TENSOR_FILES["objective"], prefix)  # that part alone is read
        state = {k[len(prefix):]: v for k, v in part.items()}
        return state or None
    return load_tensors(folder / FILE) if prefix == PREFIX and (folder / FILE).is_file() else None


def write(folder: Path, state: dict[str, torch.Tensor]) -> None:
    from pipeline.checkpoint import save_tensors

    save_tensors(Path(folder) / FILE, state)
