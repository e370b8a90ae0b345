"""Format: one .safetensors file with the original LDM / Stable Diffusion key names (or diffusers names), what
single-file front ends (ComfyUI, A1111, diffusers' `from_single_file`) load as a VAE; of a full SD checkpoint only
the autoencoder is read. A firststage export stores the latent factors and its model section in the metadata; any
other file's model shape is read from its tensors (pipeline.weights.ldm.infer_model_section)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path


from pipeline.config import config_from_dict, merge_dicts, parse_overrides
from pipeline.errors import UserError
from pipeline.storage import regular_file
from pipeline.weights.diffusers import refuse_cosine_codebook, to_plain_diffusers
from pipeline.weights.ldm import PREFIXES, diffusers_to_ldm, infer_model_section, is_ldm_named, ldm_to_diffusers, strip_prefix
from pipeline.weights.loading import build_and_load, named

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

NAME = "single-file"
SUFFIXES = (".safetensors",)
MAX_RESOLUTION = 16384  # what a file's metadata may claim (data.resolution=N overrides it)


def detect(p: Path, suffixes: tuple[str, ...] = SUFFIXES) -> Path | None:
    return p if p.is_file() and p.suffix.lower() in suffixes else None


def describe(path: Path, ema: bool) -> str:
    """Every single file (safetensors or legacy) is described by its name."""
    return f"single file {path.name}"


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the autoencoder's tensors as stored, the file's metadata). safetensors checks that the header's offsets lie
    in the file, so what is read is never more than the file holds."""
    from safetensors import safe_open

    regular_file(path, "weights file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in keys)), "")
            state = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
    return state, meta


def to_diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = strip_prefix(state)
    return ldm_to_diffusers(state) if is_ldm_named(state) else state


def state_dict(path: Path, ema: bool) -> dict:
    return to_diffusers_names(read(path)[0])


_KINDS = {dict: "a JSON object", int: f"an integer from 8 to {MAX_RESOLUTION}", float: "a finite number"}


def _metadata(meta: dict, key: str, kind, path: Path):
    """A metadata value (metadata are strings) as `kind`, or one line naming the file, the key and the value."""
    try:
        value = json.loads(meta[key]) if kind is dict else kind(meta[key])
    except (ValueError, TypeError):
        value = None
    if (not isinstance(value, kind) or (kind is float and not math.isfinite(value))
            or (kind is int and not 8 <= value <= MAX_RESOLUTION)):
        raise UserError(f"{path}: metadata {key} is {meta[key][:80]!r}, not {_KINDS[kind]}")
    return value


def file_config(path: Path, state: dict, meta: dict, overrides: list[str] | None = None):
    """The Config of a single file: the model section a firststage export stores in its metadata, else the one
    inferred from the shapes; then the user's overrides."""
    if "firststage_model" in meta:
        section = _metadata(meta, "firststage_model", dict, path)
    else:
        with named(path):
            section = infer_model_section(state)
        if "scaling_factor" in meta:
            section["scaling_factor"] = _metadata(meta, "scaling_factor", float, path)
    resolution = _metadata(meta, "resolution", int, path) if "resolution" in meta else 256
    levels = section.get("block_out_channels")
    f = 2 ** (len(levels) - 1) if isinstance(levels, list) and levels else 1
    data = {"resolution": max(f, resolution - resolution % f)}
    with named(path):
        return config_from_dict(merge_dicts({"model": section, "data": data}, parse_overrides(overrides or [])))


def load_from(path: Path, state: dict, meta: dict, overrides: list[str] | None):
    """(model, Config) of a file's tensors (any names) and metadata: the shared half of single-file and legacy. A
    file without firststage's metadata does not say its GroupNorm group count nor its resolution: the count is
    settled (`settle_norm_groups`) unless given as an override, and one line on stderr says what was assumed."""
    from pipeline.distributed import print0

    state = to_diffusers_names(state)
    cfg = file_config(path, state, meta, overrides)
    model = build_and_load(cfg, state, str(path))
    if "firststage_model" in meta:
        return model, cfg
    given = parse_overrides(overrides or [])
    assumed = []
    if "norm_num_groups" not in given.get("model", {}):
        groups, why = settle_norm_groups(model, list(cfg.model.block_out_channels))
        cfg = replace(cfg, model=replace(cfg.model, norm_num_groups=groups))
        assumed.append(f"model.norm_num_groups={groups} ({why})")
    if "resolution" not in meta and "resolution" not in given.get("data", {}):
        assumed.append(f"data.resolution={cfg.data.resolution} (a guess: the weights do not say)")
    if assumed:
        print0(f"note: {path.name} carries no model config: assumed {' and '.join(assumed)}; if that is wrong, "
               f"pass the right value as key=value", file=sys.stderr)
    return model, cfg


SD_WIDTHS = [128, 256, 512, 512]  # the Stable Diffusion / LDM autoencoder: 32 groups in every published one


def settle_norm_groups(model, widths: list[int]) -> tuple[int, str]:
    """The GroupNorm group count of a model whose file does not say it (the shapes do not): 32 for the SD / LDM
    shape; otherwise, of the powers of two up to 32 that divide every width, the one under which the model
    reconstructs photo-like test images best (a wrong count scrambles every normalisation, and a trained
    autoencoder's output with it). Sets it on `model` (its modules and its config); returns it and why."""
    import torch

    if widths == SD_WIDTHS:
        return 32, "as every published SD / LDM autoencoder of this shape"
    from pipeline.models.autoencoder import family_of

    candidates = [g for g in (1, 2, 4, 8, 16, 32) if all(w % g == 0 for w in widths)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    fam = family_of(model.eval())
    x = test_images(2 ** (len(widths) - 1))
    scores = {}
    with torch.no_grad():
        for g in candidates:
            for m in norms:
                m.num_groups = g
            y = fam.decode(model, fam.encode(model, x).mean).clamp(-1, 1)
            scores[g] = 10 * math.log10(4 / max(float(((y - x) ** 2).mean()), 1e-12))
    ranked = sorted(scores, key=scores.get, reverse=True)
    best = ranked[0]
    for m in norms:
        m.num_groups = best
    model.register_to_config(norm_num_groups=best)
    runner_up = f", {ranked[1]} gives {scores[ranked[1]]:.1f} dB" if len(ranked) > 1 else ""
    return best, (f"the one of {'/'.join(map(str, candidates))} that reconstructs test images best: "
                  f"{scores[best]:.1f} dB{runner_up}")


def test_images(factor: int, n: int = 4) -> torch.Tensor:
    """n photo-like images in [-1, 1], the same every time: 1/f^2 noise (the power spectrum of natural images),
    mostly shared by the three channels (photos are mostly luminance); at least 64 px, a multiple of `factor`."""
    import torch

    size = max(64, 4 * factor)
    gen = torch.Generator().manual_seed(0)
    f = torch.fft.fftfreq(size)
    amplitude = (f[:, None] ** 2 + f[None, :] ** 2).sqrt().clamp(min=1 / size) ** -2.0

    def field(channels: int) -> torch.Tensor:
        phase = torch.rand(n, channels, size, size, generator=gen) * 2 * math.pi
        z = torch.fft.ifft2(amplitude * torch.exp(1j * phase)).real
        return (z - z.mean(dim=(-2, -1), keepdim=True)) / z.std(dim=(-2, -1), keepdim=True)

    offset = (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.6
    return (0.35 * field(1) + 0.1 * field(3) + offset).clamp(-1, 1)


def load(path: Path, ema: bool, overrides: list[str] | None):
    return load_from(path, *read(path), overrides)


def save(model, path: Path, section: dict, resolution: int, normalisation: dict, prefix: str = "", **_) -> Path:
    """LDM names (attention matrices as 1x1 convs), the latent factors and our model section in the metadata."""
    from safetensors.torch import save_file

    refuse_cosine_codebook(model, "single-file")
    state = {k: v.detach().cpu() for k, v in to_plain_diffusers(model).state_dict().items()}
    scale, shift = normalisation["scaling_factor"], normalisation.get("shift_factor")
    section = {**section, "scaling_factor": scale, "shift_factor": shift}
    metadata = {"format": "pt", "scaling_factor": repr(float(scale)), "resolution": str(resolution),
                "firststage_model": json.dumps(section)}
    if shift is not None:
        metadata["shift_factor"] = repr(float(shift))
    save_file(diffusers_to_ldm(state, prefix), str(path), metadata=metadata)
    return Path(path)
