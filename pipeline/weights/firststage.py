"""Format: a firststage run folder (its newest complete checkpoint) or one checkpoint folder (pipeline.checkpoint).
The model is rebuilt from the checkpoint's own config.yaml; the EMA weights are used unless asked otherwise.

A checkpoint of a run folder is pinned (`pin`): what is read of it (record, config, tensors) is hard-linked into a
private folder of the cache, $FIRSTSTAGE_CACHE/pins/HOST-PID-*/step-N/ (copied where no link can be made: the cache
on another file system than the run), and checked against the record, so a run still training that prunes the
checkpoint (train.keep_checkpoints) takes nothing away from an evaluate or export that reads it, and nothing is
written into the run's folder. The process removes its pins when its stage ends or it exits; a pin left by a killed
process of this host goes when the next one pins beside it."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

from pipeline.checkpoint import (CHECKPOINTS, CONFIG_FILE, TENSOR_FILES, TRAINER_FILE, find_resume_path, is_checkpoint,
                                 load_tensors, read_trainer_state)
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


PINS = "pins"  # in the cache (FIRSTSTAGE_CACHE): the private copies of the checkpoints that readers pinned; a pin's
# folder name, HOST-PID-*, says which process owns it: that name, not a table in memory, is what release_pins reads


def pin(given: Path, found: Path, tries: int = 5) -> tuple[Path, Path | None]:
    """(the checkpoint `given` means, its private copy); a checkpoint outside a run's checkpoints/ folder (an export)
    is read where it is: (found, None). A copy that does not match its record (the checkpoint was pruned or saved
    again meanwhile) is made again, of the newest checkpoint then; one that does not match it twice is damaged and
    kept as it is, for the loader to say what is wrong with it."""
    seen = set()
    for _ in range(tries):
        if found.parent.name != CHECKPOINTS:
            return found, None
        copy = _pinned_copy(found)
        if _matches_record(copy) or found in seen:
            return found, copy
        drop(copy.parent)
        seen.add(found)
        again = detect(given)
        if again is None:
            break
        found = again
    raise UserError(f"{given}: its checkpoint {found.name} was removed (pruned by its run) while being pinned; "
                    f"run the command again")


def _pinned_copy(folder: Path) -> Path:
    """The record, config and tensors of a checkpoint in a new private folder (hard links, else copies), record
    first, so that the files can be checked against the record they came with."""
    from pipeline.storage.cache import cache_root

    root = cache_root() / PINS
    root.mkdir(parents=True, exist_ok=True)  # never in the run's folder: a reader writes nothing outside its output
    _sweep(root)
    private = Path(tempfile.mkdtemp(prefix=_mine(), dir=root))
    dest = private / folder.name
    dest.mkdir()
    for name in (TRAINER_FILE, CONFIG_FILE, *TENSOR_FILES.values()):
        try:
            os.link(folder / name, dest / name)
        except FileNotFoundError:
            continue  # an optional file, or the checkpoint went: the record says which
        except OSError:  # no hard links here (another file system, a read-only folder): a copy
            if (folder / name).is_file():  # never a FIFO: the loader refuses what is not a regular file
                shutil.copyfile(folder / name, dest / name)
    return dest


def _matches_record(copy: Path) -> bool:
    """The record and the config are there, and every tensor file the record lists, of its size and SHA-256."""
    try:
        files = read_trainer_state(copy).get("files") or {} if (copy / CONFIG_FILE).exists() else None
    except (OSError, ValueError, AttributeError):  # no record, or not one
        return False
    if not isinstance(files, dict):
        return False
    for name, want in files.items():
        f, want = copy / name, want if isinstance(want, dict) else {}
        if name in TENSOR_FILES.values() and (not f.is_file() or f.stat().st_size != want.get("size")
                                              or _sha256(f) != want.get("sha256")):
            return False
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            h.update(block)
    return h.hexdigest()


def _sweep(root: Path) -> None:
    """Pins that killed processes of this host left behind."""
    host = socket.gethostname()
    for p in root.iterdir():
        h, pid = _owner(p.name)
        if h == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _mine() -> str:
    """The name prefix of this process's pins."""
    return f"{socket.gethostname()}-{os.getpid()}-"


def _owner(name: str) -> tuple[str, str]:
    """(host, pid) of a pin's folder HOST-PID-XXXXXXXX: split from the right, as mkdtemp's suffix has no '-' and a
    host name may (host `h-1`'s pins begin like those of host `h` with pid 1)."""
    host, _, pid = name.rpartition("-")[0].rpartition("-")
    return host, pid


def drop(private: Path) -> None:
    """Remove one of this process's pins, and the pins' folder when it was the last one there."""
    shutil.rmtree(private, ignore_errors=True)
    if private.parent.name == PINS:
        try:
            private.parent.rmdir()
        except OSError:
            pass


def release_pins() -> None:
    """Remove this process's pins (the stage is done with its weights): those of the cache's pins folder named for it."""
    from pipeline.storage.cache import cache_root

    root, me = cache_root() / PINS, (socket.gethostname(), str(os.getpid()))
    for private in sorted(p for p in root.iterdir() if _owner(p.name) == me) if root.is_dir() else ():
        drop(private)


atexit.register(release_pins)


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
