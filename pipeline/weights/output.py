"""What an export may replace and what it may write: the guards of `firststage export`.

  * where: never the model itself, nor a folder that contains it or lies inside it (a run folder with its
    checkpoints and logs, a checkpoint, a diffusers or pipeline folder, a single file's folder), nor the working
    folder; `--overwrite` replaces a previous export and nothing else (a folder holding only the files an export
    writes, a .safetensors file carrying firststage's metadata, a model card firststage wrote).
  * what: finite weights (a run that diverged exports nothing) and finite latent factors, with a scaling_factor > 0.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path


from pipeline.checkpoint import CHECKPOINTS
from pipeline.errors import UserError
from pipeline.weights.card import is_model_card

EXPORT_FILES = {"README.md", "config.json", "diffusion_pytorch_model.safetensors", "encoder_config.json",
                "encoder.safetensors", "encoder.pt2"}  # every file a diffusers or encoder-only export writes


def model_places(weights) -> list[str]:
    """The model's files and folders, each spelled as its storage's `canonical` spells it (links resolved): the path
    given, the path it means (on object storage: its URL and its local copy), and a checkpoint's run folder."""
    paths = [weights.given, weights.path, weights.where]
    if weights.checkpoint is not None and weights.checkpoint.parent.name == CHECKPOINTS:
        paths.append(weights.checkpoint.parent.parent)
    return list(dict.fromkeys(_canonical(p) for p in paths))


def _canonical(path) -> str:
    from pipeline.storage import storage_for

    return storage_for(str(path)).canonical(str(path))


def check_output_path(out, weights) -> None:
    """`out` is neither the model nor around or inside its folders, nor the working folder (or one containing it),
    wherever either lies (a place on object storage is compared with the model's URL)."""
    from pipeline.storage import storage_for
    from pipeline.storage.paths import place_relation

    target = _canonical(out)
    for p in model_places(weights):
        how = place_relation(target, p)
        if how:
            kind = "folder" if storage_for(p).folder_exists(p) else "file"
            raise UserError(f"{out} {how} the model's {kind} {p}; an export never writes over or into its own model: "
                            f"choose a path outside it")
    how = place_relation(target, _canonical(Path.cwd()))
    if how in ("is", "contains"):
        raise UserError(f"{out} is the working folder{'' if how == 'is' else ' or contains it'}; name a new folder "
                        f"or file for the export")


def check_replaceable(out: Path, card: Path, overwrite: bool) -> None:
    """Nothing is at `out` or its card, or (with `overwrite`) only a previous export is."""
    taken = [p for p in (out, card) if p.exists() or p.is_symlink()]
    if not taken:
        return
    if not overwrite:
        raise UserError(f"{taken[0]} exists; choose another name or pass --overwrite")
    why = _not_an_export(out, card)
    if why:
        raise UserError(f"{out}: {why}; --overwrite replaces a previous export only: choose another name")


def _not_an_export(out: Path, card: Path) -> str | None:
    """Why what lies at `out` (and its card) is not a previous export, or None when it is one."""
    if (card.exists() or card.is_symlink()) and not is_model_card(card):
        return f"{card} is not a model card firststage export wrote"
    if out.is_symlink() or (out.exists() and not out.is_dir() and not out.is_file()):
        return "is a link or a special file, not an export"
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
        more = ", ..." if len(others) > 3 else ""
        return f"holds {', '.join(others[:3])}{more}, which no export writes" if others else None
    if out.is_file():
        return None if _exported_file(out) else "is not a single file firststage export wrote (no firststage metadata)"
    return None


def _exported_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return "firststage_model" in (f.metadata() or {})
    except Exception:
        return False


def check_finite_weights(model, source: str) -> None:
    """Every floating tensor of the model is finite, or one line naming the first that is not."""
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{source}: {name} holds {bad} non-finite value(s) (NaN or Inf) of {t.numel()}: the "
                            f"training diverged; export a checkpoint from before it")


def check_factors(spec: dict) -> None:
    """A latent normalisation (pipeline.models.normalisation) of finite numbers: scaling_factor (or every std) > 0,
    shift_factor (or every mean) finite or absent; or one line naming where it came from."""
    ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    again = "measure the statistics again (--data SHARDS) or run firststage evaluate again"
    if spec["kind"] == "scale_shift":
        scale, shift = [spec["scaling_factor"]], [] if spec.get("shift_factor") is None else [spec["shift_factor"]]
        names = ("scaling_factor", "shift_factor")
    else:
        scale, shift, names = spec["std"], spec["mean"], ("a channel's std", "a channel's mean")
    bad = [v for v in scale if not ok(v) or v <= 0] or ([None] if not scale else [])
    if bad:
        raise UserError(f"{spec['source']}: {names[0]} {bad[0]!r} is not a finite number > 0; {again}")
    bad = [v for v in shift if not ok(v)]
    if bad:
        raise UserError(f"{spec['source']}: {names[1]} {bad[0]!r} is not a finite number; {again}")


@contextlib.contextmanager
def statistics_from(source):
    """Latent statistics without a value the factors need (an empty statistics section), or an eval.json that is
    not JSON, are one line naming their file: `source`, or a callable that finds it (called only then)."""
    try:
        yield
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        try:
            where = source() if callable(source) else source
        except (KeyError, TypeError, ValueError):  # the finder trips over the same file
            where = "an eval.json beside the model"
        what = (f"its latent statistics have no {e.args[0]}" if isinstance(e, KeyError) else
                f"its latent statistics are malformed ({e})" if isinstance(e, TypeError) else f"not valid JSON ({e})")
        raise UserError(f"{where}: {what}") from None
