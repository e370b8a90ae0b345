"""Weights on object storage (--model s3://..., train.init_from=s3://...): pinned there, loaded from a local copy.

What a URL means is decided on the store, before anything is copied: a run folder means its newest complete
checkpoint (listed there, so a checkpoint written later cannot change what a running job loads), a diffusers pipeline
folder its vae/, anything else the object or folder itself. Only that is copied into the local cache
(pipeline.storage.cache.local_copy: checked against the store's sizes and ETags, downloaded once), with the run
folder's eval.json / eval.md beside it (an export's measured factors), and the formats read the copy.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import CHECKPOINTS, find_resume_path
from pipeline.errors import UserError
from pipeline.storage import as_path, local_copy

BESIDE = ("eval.json", "eval.md")  # a run folder's files that describe its weights


def pin(url: str) -> tuple[str, Path]:
    """(the URL of what `url` means now, its local copy)."""
    p = as_path(url)
    if p.is_file():
        return str(p), local_copy(str(p))
    if (p / CHECKPOINTS).is_dir():
        latest = find_resume_path(p)
        if latest is None:
            raise UserError(f"{url}: run folder has no complete checkpoint yet")
        local = local_copy(str(latest))
        for name in BESIDE:
            if (p / name).is_file():
                local_copy(str(p / name))
            else:  # an earlier copy's: it described other weights
                (local.parent.parent / name).unlink(missing_ok=True)
        return str(latest), local
    if (p / "vae" / "config.json").is_file() and not (p / "config.json").is_file():
        return str(p / "vae"), local_copy(str(p / "vae"))  # a pipeline folder: only the autoencoder is copied
    if not p.is_dir():
        raise UserError(f"{url}: no such file or folder")
    return str(p), local_copy(str(p))
