"""ExportJob: hand the autoencoder on as a diffusers folder, a single file, an encoder-only export or a firststage
folder; what `firststage export` runs.

  from pipeline.weights import resolve_weights
  from pipeline.weights.job import ExportJob, ExportOptions

  job = ExportJob(resolve_weights("runs/klf8"), "exports/klf8-vae", "diffusers",
                  ExportOptions(stats="latents/train/manifest.json"))
  report = job.run()          # an ExportReport: what was written, with which latent normalisation

The export is one unit of the commit protocol (the files, then the model card) written under a lock beside the
output (`.NAME.lock` in its parent folder): the caller's when it holds one (the stage takes it first), else taken by
the job for the run. An existing output is replaced only with `overwrite`, and only if an export wrote it; never the
model's own run, checkpoint or folder. Weights or a latent normalisation that are not finite are refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.jobs import under_lock
from pipeline.storage import as_path, folder_lock
from pipeline.weights.output import check_output_path, check_replaceable


class FormatRefused(UserError):
    """The format cannot hold this model; the message starts with the format."""


class NoDiscriminator(UserError):
    """A discriminator was asked for and the weights hold none; the message starts with the model as given."""


@dataclass
class ExportOptions:
    overrides: list[str] = field(default_factory=list)  # key=value on the model's config (data.resolution=512)
    stats: str | None = None  # an encode manifest.json of this model: its latent statistics
    data: str | None = None  # image shards: measure the latent statistics now
    num_samples: int = 1000  # samples measured with `data`
    keep_scaling_factor: bool = False  # no measured statistics: keep the model's own normalisation
    shift: bool = True  # the shift_factor LatentDataset subtracts (False: SD 1.x's, scaling_factor = 1/RMS)
    prefix: str = ""  # single-file key prefix (first_stage_model. for full-checkpoint tools)
    with_discriminator: bool = False  # also write the PatchGAN (folder exports)
    overwrite: bool = False  # replace an existing output (a previous export only)


@dataclass
class ExportReport:
    output: object
    format: str
    model_class: str
    parameters: int
    weights: str  # what was exported (Weights.describe)
    discriminator: bool
    normalisation: dict  # the latent normalisation written into the export
    card: object  # the model card: the export's completion record
    seconds: float = 0.0

    def summary(self, seconds: float | None = None) -> str:
        """The line the stage prints; `seconds`: the time to state (default: the job's own)."""
        from pipeline.models.normalisation import describe

        return (f"export: {self.format} {self.output} ({self.model_class}, {self.parameters / 1e6:.1f}M parameters, "
                f"{self.weights}{', with its discriminator' if self.discriminator else ''}); latent normalisation "
                f"{describe(self.normalisation)}; model card {self.card}; "
                f"{self.seconds if seconds is None else seconds:.1f}s")


def card_path(out: Path) -> Path:
    """The model card: README.md in a folder, NAME.md beside a single file. It is the export's completion record."""
    return out.with_suffix(".md") if out.suffix == ".safetensors" else out / "README.md"


class ExportJob:
    """Export `weights` (pipeline.weights.resolve_weights) to `output` in `format` (pipeline.weights.EXPORT_FORMATS).
    `evaluated`: pipeline.latents.factors.eval_beside's answer, when the caller looked for it already."""

    def __init__(self, weights, output, format: str = "diffusers", options: ExportOptions | None = None,
                 evaluated: tuple | None = None):
        self.weights, self.output, self.format = weights, as_path(output), format
        self.options, self.evaluated = options or ExportOptions(), evaluated
        self.model = self.cfg = self.discriminator = self.spec = None
        self.checked = self.placed = self.replaceable = False  # the steps done (a stage runs them with its flags)

    def lock(self, what: str = "output"):
        """The lock of this output (not yet taken): `.NAME.lock` beside it, so two exports to it cannot interleave."""
        return folder_lock(self.output.parent, f".{self.output.resolve().name}.lock", what=what, label=str(self.output))

    def check_output(self) -> None:
        """The output is neither the model nor around or inside its folders, nor the working folder; its folder is
        made."""
        if not self.placed:
            check_output_path(self.output, self.weights)
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.placed = True

    def check_replaceable(self) -> None:
        """Under the output's lock (one export of it at a time): what is there may be replaced (overwrite)."""
        if not self.replaceable:
            check_replaceable(self.output, card_path(self.output), self.options.overwrite)
            self.replaceable = True

    def load(self):
        """The model and its Config (the options' overrides applied); returns the Config."""
        if self.cfg is None:
            model, self.cfg = self.weights.load(self.options.overrides)
            self.model = model.eval().requires_grad_(False)
        return self.cfg

    def check_model(self) -> None:
        """Finite weights, a format that can hold the model's family, its discriminator when one is asked for."""
        from pipeline.models.families import family_of
        from pipeline.weights import discriminator as disc
        from pipeline.weights.output import check_finite_weights

        self.load()
        check_finite_weights(self.model, self.weights.given)
        fam = family_of(self.model)
        if self.format not in fam.exports:
            why = " (diffusers has no FSQ model)" if fam.name == "fsq" else ""
            raise FormatRefused(f"{self.format}: a {fam.name} model cannot be exported so{why}; formats for it: "
                                f"{', '.join(fam.exports)}")
        self.discriminator = disc.read(self.weights) if self.options.with_discriminator else None
        if self.options.with_discriminator and self.discriminator is None:
            raise NoDiscriminator(f"{self.weights.given} holds no discriminator (its run trained none)")
        self.checked = True

    def normalisation(self) -> dict:
        """The latent normalisation the export writes: from `stats`, `data` (measured now), or the eval.json beside
        the model; the model's own only with `keep_scaling_factor`."""
        from pipeline.latents.factors import eval_beside, export_normalisation
        from pipeline.weights.output import statistics_from

        if self.spec is None:
            o, given = self.options, self.weights.given
            if not (o.stats or o.data) and self.evaluated is None:
                with statistics_from(lambda: eval_beside(given, self.weights)[1]):
                    self.evaluated = eval_beside(given, self.weights)
            with statistics_from(o.stats or o.data or self.evaluated[1]):
                self.spec = export_normalisation(self.weights, self.model, self.cfg, o.stats, o.data, o.num_samples,
                                                 o.keep_scaling_factor, o.shift, self.evaluated)
        return self.spec

    def run(self) -> ExportReport:
        start = time.time()
        self.check_output()
        with under_lock(self.output, lambda: self.lock().acquire()):
            self.check_replaceable()
            report = self._write()
        report.seconds = time.time() - start
        return report

    def _write(self) -> ExportReport:
        import torch

        from pipeline.config import config_to_dict
        from pipeline.models.families import family_of
        from pipeline.storage import Unit, disk_full_as_oserror, respect_umask
        from pipeline.weights import EXPORT_FORMATS
        from pipeline.weights import discriminator as disc
        from pipeline.weights.card import card_inputs, model_card
        from pipeline.weights.output import check_factors

        if not self.checked:
            self.check_model()
        normalisation, out, cfg, model, o = self.normalisation(), self.output, self.cfg, self.model, self.options
        check_factors(normalisation)
        cls, described = type(model).__name__, self.weights.describe()
        note = "diffusers has no FSQ model: this folder loads with firststage (--model, train.init_from)." \
            if family_of(model).name == "fsq" else ""
        card = model_card(self.format, cls, str(out), f"{self.weights.given}: {described}", cfg, normalisation,
                          *card_inputs(self.weights, cfg), note=note)
        unit = Unit(card_path(out), [out])
        staged = unit.staging(out)
        try:
            with torch.no_grad(), disk_full_as_oserror(staged):
                EXPORT_FORMATS[self.format].save(model, staged, config_to_dict(cfg)["model"], cfg.data.resolution,
                                                 normalisation, prefix=o.prefix)
                if self.discriminator is not None:
                    disc.write(staged, self.discriminator)
            for f in [staged] if staged.is_file() else [q for q in staged.rglob("*") if q.is_file()]:
                respect_umask(f)
            if o.overwrite:
                Unit(card_path(out), [out]).undo()  # the old export stops counting (card first), then goes
            unit.commit(card.encode())
        finally:
            unit.discard()
        return ExportReport(out, self.format, cls, sum(p.numel() for p in model.parameters()), described,
                            self.discriminator is not None, normalisation, card_path(out))
