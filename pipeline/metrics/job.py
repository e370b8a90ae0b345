"""EvaluateJob: reconstruction quality, likelihood bounds and latent health of a model; what `firststage evaluate`
runs.

  from pipeline.metrics.job import EvaluateJob, EvaluateOptions
  from pipeline.weights import resolve_weights

  job = EvaluateJob(resolve_weights("runs/klf8"), "val/", options=EvaluateOptions(["evaluate.num_samples=1000"]))
  report = job.run()          # an EvaluateReport: the results (eval.json's dict), the table, where they went

It writes eval.json, eval.md and eval_grid.png into `output` (default: beside the model, Weights.beside), each
atomically, on the main process. Run by several processes (accelerate launch: a process group exists), each reads
its share of the samples and the sums are reduced: the numbers are those of one process.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace

from pipeline.errors import EmptyData, UserError
from pipeline.jobs import check_process_group
from pipeline.storage import ObjectPath, as_path


@dataclass
class EvaluateOptions:
    overrides: list[str] = field(default_factory=list)  # key=value on the model's config: evaluate.iwae_k=64, ...
    asked: bool = False  # evaluate.num_samples was asked for: say so when the data holds fewer


@dataclass
class EvaluateReport:
    results: dict  # eval.json's content
    table: str  # the table of eval.md
    output: object  # the folder written (on the main process)
    processes: int
    seconds: float

    def summary(self, seconds: float | None = None) -> str:
        """The line the stage prints below the table; `seconds`: the time to state (default: the job's own)."""
        r = self.results
        return (f"evaluate: {r['samples']} samples from {r['data']} with {r['weights']} on {self.processes} "
                f"process(es) in {self.seconds if seconds is None else seconds:.1f}s; wrote "
                f"{self.output / 'eval.json'}, eval.md, eval_grid.png")


class EvaluateJob:
    """Evaluate `weights` (pipeline.weights.resolve_weights) on the image shards `data`; `output`: the folder for
    eval.json, eval.md and the grid (default: beside the model). `device`: the process's (default: its GPU, else
    the CPU)."""

    def __init__(self, weights, data: str, output=None, options: EvaluateOptions | None = None, device=None):
        self.weights, self.data, self.options, self.device = weights, str(data), options or EvaluateOptions(), device
        self.output = as_path(output) if output else weights.beside  # beside the model: on object storage too
        self.model = self.cfg = self._plan = None
        self.placed = False  # check_output done (a stage runs it first, with its flag)

    def check_output(self) -> None:
        """Before evaluating: a result is never computed and then lost to an output that cannot be a folder."""
        if self.placed:
            return
        out = self.output
        there = out if isinstance(out, ObjectPath) else next(p for p in (out, *out.parents) if p.exists())
        if there.is_file():
            raise UserError(f"{out}: {there} is a file, not a folder")
        self.placed = True

    def load(self):
        """The model and its Config (the options' overrides applied); returns the Config."""
        if self.cfg is None:
            self.model, self.cfg = self.weights.load(self.options.overrides)
        return self.cfg

    def plan(self) -> tuple:
        """(shards, samples to read of each, samples planned) of the data for evaluate.num_samples: the data's
        one-line refusals (no such folder, no shards, nothing in them) come from here, before the model runs."""
        if self._plan is None:
            from pipeline.data.loader import plan_subset

            cfg = self.load()
            self._plan = plan_subset(self.data, cfg.evaluate.num_samples, cfg.data.allow_pipe)
            if self._plan[2] == 0:
                raise EmptyData(f"{self.data}: the shards hold no samples")
        return self._plan

    def run(self) -> EvaluateReport:
        import torch

        from pipeline.data.loader import batches, make_loader
        from pipeline.distributed import all_reduce, is_main_process, print0, rank_and_world, wait_for_everyone
        from pipeline.metrics.evaluator import Evaluator
        from pipeline.metrics.plots import reconstruction_grid
        from pipeline.metrics.report import format_table, load_fid, load_perceptual
        from pipeline.models.families import family_of
        from pipeline.progress import Progress
        from pipeline.storage import atomic_write_json, atomic_write_text

        start = time.time()
        check_process_group()
        self.check_output()
        cfg = self.load()
        rank, world = rank_and_world()
        n = cfg.evaluate.num_samples
        urls, limits, planned = self.plan()
        if planned < n and self.options.asked:
            print0(f"evaluate: warning: asked for {n} samples, the data holds {planned}; evaluating {planned}",
                   file=sys.stderr)
        family_of(self.model).normalisation(self.model)  # a class whose latent normalisation cannot be determined
        device = self.device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = self.model.to(device).eval()
        fid, fid_reason = load_fid(device)
        loader = make_loader(urls, "eval", cfg.evaluate.batch_size, cfg.data.num_workers,
                             resolution=cfg.data.resolution, rank=rank, world_size=world, limits=limits,
                             max_member_bytes=cfg.data.max_member_bytes)
        with Progress("evaluate", planned, "sample", enabled=rank == 0) as bar:
            bar.phase("reconstruction", planned, "sample")  # then the likelihood bounds (Evaluator.finalize)
            ev = Evaluator(model, replace(cfg.evaluate, num_samples=planned),
                           load_perceptual(cfg.evaluate.lpips_backbone, device), cfg.data.resolution, device, fid, bar)
            with batches(loader) as stream:
                for batch in stream:
                    ev.add(batch["image"], batch["__key__"])
                    bar.update(len(batch["__key__"]) * world)  # the main process's count, scaled
            res = ev.finalize(lambda tensors: all_reduce(tensors, "sum", device))
        if res["samples"] == 0:
            raise EmptyData(f"{self.data}: no decodable images among the {planned} samples read")
        res["rfid"] = float(fid.compute()) if fid is not None else fid_reason
        res["model"], res["data"] = self.weights.given, self.data
        res["weights"] = self.weights.describe()
        table, out = format_table(res), self.output
        if is_main_process():
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "eval.json", res)
            atomic_write_text(out / "eval.md", f"# Evaluation of {self.weights.given}\n\nData: {self.data}\n\n{table}\n")
            if ev.grid:
                keys, images, recs, tile_psnr = zip(*ev.grid)
                reconstruction_grid(torch.stack(images).permute(0, 2, 3, 1).numpy(),
                                    torch.stack(recs).permute(0, 2, 3, 1).numpy(), list(tile_psnr), list(keys),
                                    out / "eval_grid.png", f"{as_path(self.weights.given).name}: inputs and their "
                                    f"reconstructions ({len(keys)} of {res['samples']}; mean PSNR {res['psnr']:.2f} dB)")
        wait_for_everyone()
        return EvaluateReport(res, table, out, world, time.time() - start)
