"""Models named by a Hugging Face Hub id (--model org/name, org/name@revision; train.init_from; loss.alignment's
foundation model), resolved with huggingface_hub into its standard cache (HF_HOME, HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE honoured, as diffusers' from_pretrained does).

Only the autoencoder is fetched: a diffusers autoencoder's config.json and weights at the top of the repository, or a
pipeline repository's vae/ (found as a local pipeline folder's vae/ is), never the UNet or text encoders. An existing
local path always wins over an id that spells the same. The commit the revision meant is pinned (`Hub.commit`):
other processes fetch that commit, so a branch that moves meanwhile cannot change what a job loads. The processes
of a node fetch one at a time (a lock in the cache): the first downloads, the others wait and find it there.
Without network (HF_HUB_OFFLINE=1) an id that is not in the cache is one line naming it and the command that
fetches it.

Read without torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")
# what an autoencoder needs: its config and its safetensors weights (one file or shards), at the top or in vae/
AUTOENCODER_FILES = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                     "diffusion_pytorch_model-*-of-*.safetensors"]
PATTERNS = AUTOENCODER_FILES + [f"vae/{f}" for f in AUTOENCODER_FILES]


@dataclass(frozen=True)
class Hub:
    repo: str
    commit: str
    folder: str  # the snapshot folder in this machine's cache

    def __str__(self) -> str:
        return f"{self.repo}@{self.commit}"


def parse(spec: str) -> tuple[str, str | None] | None:
    """(repository, revision or None) when `spec` is spelled as a Hub id and no such local path exists, else None."""
    m = ID.match(str(spec))
    if m is not None and m.group("rev") and any(part in ("", ".", "..") for part in m.group("rev").split("/")):
        raise UserError(f"{spec}: the revision {m.group('rev')!r} is not a branch, tag or commit name (no empty, '.' "
                        f"or '..' part)")
    if m is None or os.path.lexists(os.path.expanduser(str(spec))):
        return None
    return m["repo"], m["rev"]


def fetch_command(repo: str, revision: str | None, patterns=PATTERNS) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo}{rev} --include " + " ".join(f"'{p}'" for p in patterns)


def _node_lock(repo: str):
    """A lock in the cache that the processes of a node (or of every node, on a shared HF_HOME) take in turn."""
    from filelock import FileLock
    from huggingface_hub import constants

    locks = Path(constants.HF_HUB_CACHE) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"firststage--{repo.replace('/', '--')}.lock"))


def snapshot(spec: str, repo: str, revision: str | None, patterns=PATTERNS) -> Hub:
    """The cached snapshot of `repo` at `revision` (the default branch when None) holding `patterns`, downloaded
    first when the cache lacks it and the network is allowed; one line naming `spec` when it cannot be had."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"the Hugging Face cache {constants.HF_HUB_CACHE}"
    try:
        with _node_lock(repo):
            folder = snapshot_download(repo, revision=revision, allow_patterns=patterns)
    except GatedRepoError:
        raise UserError(f"{spec}: a gated model on the Hugging Face Hub: accept its terms on its page and set "
                        f"HF_TOKEN (or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{spec}: no such file or folder, and no model {repo} on the Hugging Face Hub (a private one "
                        f"needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{spec}: {repo} has no revision {revision} on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        offline = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise UserError(f"{spec}: no such file or folder, and {repo}{'@' + revision if revision else ''} is not in "
                        f"{where} ({offline}); fetch it where there is a network: "
                        f"{fetch_command(repo, revision, patterns)}") from None
    except HfHubHTTPError as e:
        raise UserError(f"{spec}: the Hugging Face Hub answered {e.__class__.__name__}: {str(e).splitlines()[0]}") \
            from None
    except OSError as e:  # a damaged cache (a ref that is a folder, a snapshot without its files): one line
        raise UserError(f"{spec}: {where} could not be read for {repo} ({type(e).__name__}: {e})") from None
    return Hub(repo, Path(folder).name, folder)


def resolve(spec: str) -> tuple[Hub, Path] | None:
    """(the pinned snapshot, the autoencoder's folder in it) for a Hub id, or None when `spec` is not one."""
    parsed = parse(spec)
    if parsed is None:
        return None
    hub = snapshot(spec, *parsed)
    root = Path(hub.folder)
    for folder in (root, root / "vae"):
        if (folder / "config.json").is_file():
            return hub, folder
    raise UserError(f"{spec}: {hub} holds no autoencoder (no config.json at its top or in vae/ in {root}); "
                    f"if the download was cut short: {fetch_command(hub.repo, hub.commit)}")


def here(hub_id: str, folder: str) -> Path:
    """`folder` (the autoencoder's folder in the pinning process's cache: a snapshot, or its vae/) on this machine:
    fetched at the pinned commit when this machine's cache lacks it (another node)."""
    if Path(folder).is_dir():
        return Path(folder)
    repo, commit = hub_id.rsplit("@", 1)
    snap = Path(snapshot(hub_id, repo, commit).folder)
    return snap / "vae" if Path(folder).name == "vae" else snap
