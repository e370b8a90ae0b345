"""Where an export's latent normalisation comes from: measured statistics, never a guess.

From, in this order: an encode manifest of the same weights, a measurement on image shards now, or the eval.json
that evaluate wrote beside the model for the same weights; the model's own normalisation only when asked for
explicitly. The measured statistics are of the latent in the family's layout, and give a normalisation of the
family's kind (pipeline.models.normalisation): a scaling / shift factor, or per-channel mean and std."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.checkpoint import CHECKPOINTS
from pipeline.errors import UserError
from pipeline.manifest import LATENT_FORMAT, read_manifest
from pipeline.storage import as_path, storage_for
from pipeline.storage.cache import source_url


class NoStatistics(UserError):
    """Nothing measured the latent statistics of these weights (the export stage says which flags would)."""


def eval_beside(given: str, weights) -> tuple[dict | None, str]:
    """The newest eval.json beside the model (where --model pointed, the checkpoint folder, then its run folder)
    that evaluated exactly these weights; (None, why not) otherwise. `weights`: the pinned Weights."""
    folder = Path(weights.path)  # on this machine (weights on object storage: their copy, eval.json beside it)
    places = [weights.beside if weights.hub else as_path(given)] + [folder] + \
        ([folder.parent.parent] if folder.parent.name == CHECKPOINTS else [])
    # each as a file on this machine (one on object storage: its copy in the cache, the one pinning made)
    found = sorted({_here(p / "eval.json") for p in places if (p / "eval.json").is_file()},
                   key=lambda p: p.stat().st_mtime)
    described = weights.describe()
    for path in reversed(found):
        res = json.loads(path.read_text())
        if res.get("weights") == described and "latents" in res:
            return res, source_url(path)  # weights on object storage: the eval.json there, not its local copy
    if found:
        return None, f"{found[-1]} evaluated other weights ({json.loads(found[-1].read_text()).get('weights')})"
    return None, "no eval.json beside the model"


def _here(path) -> Path:
    return storage_for(str(path)).local_file(str(path))


def export_normalisation(weights, model, cfg, stats: str | None = None, data: str | None = None,
                         num_samples: int = 1000, keep: bool = False, shift: bool = True,
                         evaluated: tuple[dict | None, str] | None = None) -> dict:
    """The normalisation spec an export writes into the model, from `stats` (an encode manifest), `data` (measured
    now) or else the eval.json beside the model (`evaluated`: what eval_beside found, if the caller has looked
    already); a NoStatistics error when nothing was measured and `keep` was not asked for. A scaling / shift spec
    has the shift that LatentDataset subtracts from the same statistics (`(z - shift_factor) * scaling_factor`, the
    SD3 / FLUX convention), so latents read back decode as exported; without `shift` (SD 1.x pipelines, which never
    add one back) it has none, and the scale is 1 / RMS (`measured`)."""
    from pipeline.models.families import family_of
    from pipeline.models.normalisation import measured

    fam = family_of(model)
    own, shift = fam.normalisation(model), shift and fam.shift
    if stats:
        from pipeline.latents.format import model_sha256

        m = read_manifest(stats, LATENT_FORMAT)
        if m["model_sha256"] != model_sha256(model):
            raise UserError(f"{stats}: latents of another model (weights hash differs)")
        if not m["statistics"].get("channel_std"):
            raise UserError(f"{stats}: the manifest holds no latent statistics (no latent was encoded)")
        spec = measured(own, m["statistics"], f"encode manifest {stats}", shift)
    elif data:
        from pipeline.data.loader import plan_subset
        from pipeline.latents.encoder import measure_statistics

        urls, limits, planned = plan_subset(data, num_samples)
        st = measure_statistics(model, urls, limits, cfg.data.resolution, cfg.encode.batch_size)
        if not st:
            raise UserError(f"{data}: no decodable image to measure the latent statistics on")
        spec = measured(own, st, f"measured on {planned} samples of {data}", shift)
    else:
        res, why = evaluated or eval_beside(weights.given, weights)
        if res is not None:
            spec = measured(own, res["latents"], f"{why} ({res['samples']} samples)", shift)
        elif keep:
            spec = {**own, "source": "the model's own config (--keep-scaling-factor: not measured)"}
        else:
            raise NoStatistics(f"no measured latent statistics for {weights.given} ({why})")
    if spec["kind"] == "scale_shift" and not shift:  # the model's own, kept without its shift
        spec["shift_factor"] = None
    return spec
