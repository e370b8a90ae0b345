"""Training checkpoints: one folder per step that holds everything needed to resume and describes itself.

  run/checkpoints/step-00005000/
      autoencoder.safetensors   ema.safetensors   objective.safetensors   (tensors: safetensors, never pickle;
      a generation probe's run: transformer.safetensors and its ema.safetensors)
      optimizer.pt  optimizer_d.pt  schedulers.pt  scaler.pt  rng-rank{r}.pt   (torch.load(weights_only=True))
      config.yaml
      trainer.json              the completion record (step, samples, world size), written last

This module is the only place these names are spelled. A checkpoint is a unit of the commit protocol
(pipeline.storage.Unit): every file is written whole under its final name, each rank its own RNG file, and the main
process creates trainer.json when all are written. A folder without trainer.json is not a checkpoint, so a run
killed during a save resumes from the previous one. Reading model weights out of a checkpoint for evaluate, encode,
export and fine-tuning is pipeline.weights' job.

A run folder may be on object storage (output_dir=s3://...): every file is then one upload from a local staging file
(config.yaml a whole write), the record a create-only write, and loading a checkpoint reads a local copy of its
folder (pipeline.storage.local_copy), taken by each process that loads it.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np

from pipeline.config import save_config
from pipeline.errors import UserError
from pipeline.storage import (Unit, as_path, disk_full_as_oserror, local_copy, regular_file, remove_tree,
                              respect_umask)

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")
# the files of a checkpoint, by the state they hold
TENSOR_FILES = {"autoencoder": "autoencoder.safetensors", "ema": "ema.safetensors", "objective": "objective.safetensors",
                "transformer": "transformer.safetensors"}  # transformer: the generation probe's (pipeline.probe)
OBJECT_FILES = {"optimizer": "optimizer.pt", "optimizer_d": "optimizer_d.pt", "schedulers": "schedulers.pt",
                "scaler": "scaler.pt"}
TRAINER_FILE = "trainer.json"  # the completion record: its presence marks a complete checkpoint
CONFIG_FILE = "config.yaml"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def checkpoint_unit(folder: str | Path) -> Unit:
    return Unit(as_path(folder) / TRAINER_FILE)


def write_checkpoint_files(folder: str | Path, state: dict, rank: int = 0, main: bool = True) -> dict:
    """Write this process's part of a training checkpoint into `folder`, each file whole (the record comes later,
    from `commit_checkpoint`, once every rank has written its part).

    `state`: autoencoder / ema / objective (tensor dicts -> safetensors), optimizer / optimizer_d / schedulers / scaler
    (plain containers of tensors and numbers -> torch.save), rng (this rank's RNG state, written by every rank) and
    config (a Config -> config.yaml). A missing or None entry is not written. Every rank writes rng-rank{rank}.pt; the
    main process writes the rest. Returns {file name: {size, sha256}} of what this process wrote (for the record)."""
    folder = as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unit = checkpoint_unit(folder)
    if state.get("rng") is not None:
        save_object(unit.staging(folder / rng_file(rank)), state["rng"])
    if main:
        for key, name in TENSOR_FILES.items():
            if state.get(key):
                save_tensors(unit.staging(folder / name), state[key])
        for key, name in OBJECT_FILES.items():
            if state.get(key) is not None:
                save_object(unit.staging(folder / name), state[key])
        if state.get("config") is not None:
            save_config(state["config"], folder / CONFIG_FILE)
    try:
        unit.put_staged()
    finally:
        unit.discard()
    return unit.files()


def commit_checkpoint(folder: str | Path, trainer: dict, files: dict | None = None) -> None:
    """Create the record: from here on the folder is a checkpoint (main process, after every rank's files).
    `files`: {name: {size, sha256}} of the main process's files, recorded as `files`."""
    checkpoint_unit(folder).commit({**trainer, "files": files} if files else trainer)


def uncommit_checkpoint(folder: str | Path) -> None:
    """Before the same step is saved again (a rerun that got no further): the record goes first, then the folder."""
    checkpoint_unit(folder).undo()
    remove_tree(folder)


def load_training_checkpoint(folder: str | Path, rank: int = 0) -> dict:
    """What a checkpoint holds, under the keys of `write_checkpoint_files` (None where a file is absent) plus
    `trainer` (the record); `rng` is this rank's. Tensors load from safetensors and everything else with
    torch.load(weights_only=True): no pickled code runs. A folder on object storage is read from a local copy."""
    folder = local_copy(folder)
    out: dict = {"trainer": read_trainer_state(folder)}
    for key, name in TENSOR_FILES.items():
        out[key] = load_tensors(folder / name) if (folder / name).is_file() else None
    for key, name in OBJECT_FILES.items():
        out[key] = load_object(folder / name) if (folder / name).is_file() else None
    out["rng"] = load_object(folder / rng_file(rank)) if (folder / rng_file(rank)).is_file() else None
    return out


def is_checkpoint(folder: str | Path) -> bool:
    """A complete firststage checkpoint folder (its record exists)."""
    return checkpoint_unit(folder).done()


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return as_path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = as_path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and is_checkpoint(p)]
    return sorted(found, key=lambda p: p.name)


def find_resume_path(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (record first), and the unfinished folders of killed
    saves. Called by the only writer of the run folder, after a save has committed."""
    root = as_path(run_dir) / CHECKPOINTS
    folders = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)] if root.is_dir() else []
    done = {p: is_checkpoint(p) for p in folders}
    removed = sorted((p for p in folders if done[p]), key=lambda p: p.name)[:-keep]
    for p in removed:
        uncommit_checkpoint(p)
    for p in folders:
        if not done[p]:
            remove_tree(p)
    return removed


def save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with disk_full_as_oserror(path):
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    respect_umask(path)


def load_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; with `prefix`, only those whose names start with it (read alone)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    regular_file(path, "weights file")  # a FIFO would block the open forever
    try:
        if not prefix:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # a truncated or hostile file: one line naming it, never a traceback
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def save_object(path: Path, obj) -> None:
    import torch

    with disk_full_as_oserror(path):
        torch.save(obj, path)


def load_object(path: Path):
    """Optimizer / scheduler / RNG state: plain containers of tensors and numbers; never executes pickled code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # torch's own message would advise weights_only=False: never print that
        raise UserError(f"{path}: refused: not plain tensors and numbers, or damaged ({type(e).__name__}); "
                        f"it was not executed") from None


def seed_rngs(seed: int) -> None:
    """Seed every RNG a training step draws from (torch's, on every device; Python's; NumPy's)."""
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers (loadable with weights_only=True)."""
    import torch

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
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_trainer_state(folder: str | Path) -> dict:
    return json.loads((as_path(folder) / TRAINER_FILE).read_text())
