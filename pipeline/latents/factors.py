"""Where an export's latent factors come from: measured statistics, never a guess.

scaling_factor (and shift_factor, SD3 / FLUX style) from, in this order: an encode manifest of the same weights, a
measurement on image shards now, or the eval.json that evaluate wrote beside the model for the same weights; the
model's own configured factor only when asked for explicitly."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.checkpoint import CHECKPOINTS
from pipeline.errors import UserError
from pipeline.manifest import LATENT_FORMAT, read_manifest


class NoStatistics(UserError):
    """Nothing measured the latent statistics of these weights (the export stage says which flags would)."""


def eval_beside(given: str, weights) -> tuple[dict | None, str]:
    """The newest eval.json beside the model (where --model pointed, the checkpoint folder, then its run folder)
    that evaluated exactly these weights; (None, why not) otherwise. `weights`: the pinned Weights."""
    folder = Path(weights.path)
    places = [Path(given), folder] + ([folder.parent.parent] if folder.parent.name == CHECKPOINTS else [])
    found = sorted({p / "eval.json" for p in places if (p / "eval.json").is_file()}, key=lambda p: p.stat().st_mtime)
    described = weights.describe()
    for path in reversed(found):
        res = json.loads(path.read_text())
        if res.get("weights") == described and "latents" in res:
            return res, str(path)
    if found:
        return None, f"{found[-1]} evaluated other weights ({json.loads(found[-1].read_text()).get('weights')})"
    return None, "no eval.json beside the model"


def latent_factors(weights, model, cfg, stats: str | None = None, data: str | None = None, num_samples: int = 1000,
                   keep: bool = False, shift: bool = False) -> dict:
    """{'scaling_factor', 'shift_factor' (None unless `shift`), 'source'}; a UserError when nothing was measured
    and `keep` was not asked for."""
    pick = lambda st: {"scaling_factor": st["scaling_factor"], "shift_factor": st["shift_factor"] if shift else None}  # noqa: E731
    if stats:
        from pipeline.latents.format import model_sha256

        m = read_manifest(stats, LATENT_FORMAT)
        if m["model_sha256"] != model_sha256(model):
            raise UserError(f"{stats}: latents of another model (weights hash differs)")
        return {**pick(m["statistics"]), "source": f"encode manifest {stats}"}
    if data:
        from pipeline.data.loader import plan_subset
        from pipeline.latents.encoder import measure_statistics

        urls, limits, planned = plan_subset(data, num_samples)
        st = measure_statistics(model, urls, limits, cfg.data.resolution, cfg.encode.batch_size)
        if not st:
            raise UserError(f"{data}: no decodable image to measure the latent statistics on")
        return {**pick(st), "source": f"measured on {planned} samples of {data}"}
    res, why = eval_beside(weights.given, weights)
    if res is not None:
        return {**pick(res["latents"]), "source": f"{why} ({res['samples']} samples)"}
    if keep:
        return {"scaling_factor": cfg.model.scaling_factor, "shift_factor": cfg.model.shift_factor if shift else None,
                "source": "the model's own config (--keep-scaling-factor: not measured)"}
    raise NoStatistics(f"no measured latent statistics for {weights.given} ({why})")
