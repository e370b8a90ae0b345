"""Every model format, one module each, and the one object that says which weights a path means.

  firststage    a run folder (its newest complete checkpoint) or a checkpoint folder   pipeline.weights.firststage
  encoder-only  the encoder and a torch.export program                                 pipeline.weights.encoder_only
  diffusers     a diffusers folder, or a pipeline folder's vae/                         pipeline.weights.diffusers
  single-file   one .safetensors with LDM / SD names (or diffusers names)               pipeline.weights.single_file
  legacy        a .ckpt / .pt / .pth / .bin read with torch.load(weights_only=True)     pipeline.weights.legacy

Each format module has NAME, detect(path) -> the concrete path or None, describe, load (model, Config),
state_dict (diffusers names, for fine-tuning); those that can be written have save(). FORMATS is the dispatch table,
in detection order. `resolve_weights(path)` pins a path once (a run folder becomes the checkpoint folder it means
now, so a checkpoint written later cannot change what a running job loads or how it labels it; its files are
linked into a private copy, so pruning cannot take them away either) and returns a `Weights`, which describes and
loads exactly that. Adding a format is one module and one row here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import UserError
from pipeline.storage import regular_file, storage_for
from pipeline.weights import diffusers, encoder_only, firststage, legacy, single_file

FORMATS = (firststage, encoder_only, diffusers, single_file, legacy)
BY_NAME = {f.NAME: f for f in FORMATS}
EXPORT_FORMATS = {"diffusers": diffusers, "single-file": single_file, "encoder-only": encoder_only,
                  "firststage": firststage}
FILE_SUFFIXES = single_file.SUFFIXES + legacy.SUFFIXES


@dataclass(frozen=True)
class Weights:
    """The weights a path means, pinned: `format` (a FORMATS name), `path` (the concrete file or folder), `given`
    (as the user wrote it), `ema` (a firststage checkpoint's EMA weights rather than its raw ones)."""

    given: str
    format: str
    path: str
    ema: bool = True
    url: str = ""  # weights on object storage: the URL `path` is a local copy of (each process takes its own copy)
    pinned: str = ""  # a run's checkpoint: its private copy, which pruning cannot take away (firststage.pin)
    hub: str = ""  # a Hugging Face Hub id: org/name@commit, the commit it meant when pinned (pipeline.weights.hub)

    @property
    def _module(self):
        return BY_NAME[self.format]

    @functools.cached_property
    def local(self) -> Path:
        """The weights on this machine, which describe, load and the rest read: a checkpoint's pinned copy, the path,
        or this process's copy of the object URL (made on first use, then the same copy for describe, load and the
        rest: one listing, not one per question; the pinned copy where the pinning process's machine is this one)."""
        if self.pinned and Path(self.pinned).is_dir():
            return Path(self.pinned)
        if self.url:
            from pipeline.storage import local_copy

            return local_copy(self.url)
        if self.hub:
            from pipeline.weights.hub import here

            return here(self.hub, self.path)
        return Path(self.path)

    def __getstate__(self) -> dict:  # handed to other ranks (decided_by_main): each makes its own copy, on its node
        return {k: v for k, v in self.__dict__.items() if k != "local"}

    @property
    def where(self) -> str:
        """Where the weights are, for records: the URL on object storage, else the path."""
        return self.url or self.path

    def describe(self) -> str:
        """For summaries and records: a checkpoint's EMA or raw file, a diffusers folder, a single file, ...; of a
        Hub id, with the commit it meant."""
        what = self._module.describe(self.local, self.ema)
        return f"{what} of {self.hub}" + ("/vae" if Path(self.path).name == "vae" else "") if self.hub else what

    def load(self, overrides: list[str] | None = None):
        """(model in eval mode, Config)."""
        model, cfg = self._module.load(self.local, self.ema, overrides)
        return model.eval(), cfg

    def light_config(self, overrides: list[str] | None = None):
        """The Config these weights carry, from their config file alone (no model is built, torch is not imported):
        a firststage checkpoint's config.yaml, a diffusers folder's config.json; None for a format whose config
        needs the tensors (single files, legacy files, encoder-only exports)."""
        light = getattr(self._module, "light_config", None)
        return light(self.local, overrides) if light is not None else None

    def state_dict(self) -> dict:
        """The tensors under diffusers names (to initialise a model built from another config)."""
        return self._module.state_dict(self.local, self.ema)

    def require_decoder(self, why: str) -> None:
        """One line when these weights have no decoder (an encoder-only export) and `why` needs one."""
        if self.format == encoder_only.NAME:
            raise UserError(f"{self.given}: an encoder-only export has no decoder; {why}")

    @property
    def beside(self):
        """The folder that results about these weights go into by default: the folder given, or a file's folder; for
        a Hub id (whose cache is not written to), ORG--NAME/ in the working folder."""
        from pipeline.storage import as_path

        if self.hub:
            return Path(self.hub.split("@")[0].replace("/", "--"))
        given = as_path(self.given).expanduser()
        return given if given.is_dir() else given.parent

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint folder, for a firststage checkpoint (its trainer.json and config describe the run)."""
        return Path(self.path) if self.format == firststage.NAME else None


def resolve_weights(path: str | Path, ema: bool = True) -> Weights:
    """Which weights `path` means now, or one line saying why it means none. On object storage: pinned there, read
    from a local copy (pipeline.weights.remote)."""
    if not storage_for(str(path)).opens_in_place:
        from pipeline.weights.remote import pin

        url, local = pin(str(path))
        return replace(resolve_weights(local, ema), given=str(path), url=url)
    p = Path(path).expanduser()
    if not p.exists():
        from pipeline.weights.hub import resolve

        found = resolve(str(path))  # org/name[@revision] on the Hugging Face Hub, in its cache; None: not an id
        if found is None:
            raise UserError(f"{path}: no such file or folder")
        hub, folder = found
        return replace(resolve_weights(folder, ema), given=str(path), hub=str(hub))
    if not p.is_dir():
        regular_file(p, "weights file")  # a FIFO or a device: one line, never opened
    for fmt in FORMATS:
        found = fmt.detect(p)
        if found is not None and fmt is firststage:  # a checkpoint a running training could prune: a private copy
            found, copy = firststage.pin(p, found)
            return Weights(str(path), fmt.NAME, str(found), ema, pinned=str(copy or ""))
        if found is not None:
            return Weights(str(path), fmt.NAME, str(found), ema)
    if p.is_file():
        raise UserError(f"{path}: not a weights file (expected {', '.join(FILE_SUFFIXES)})")
    raise UserError(f"{path}: not an autoencoder (expected a firststage run or checkpoint folder, a diffusers "
                    f"autoencoder folder with config.json, or a single {'/'.join(FILE_SUFFIXES[:2])} file)")
