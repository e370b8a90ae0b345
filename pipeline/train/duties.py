"""The trainer's periodic duties, each deciding its own timing from narrow arguments:

  NonFiniteGuard   skip NaN/Inf steps, stop the run after train.max_bad_steps of them in a row
  Logbook          average the terms since the last log point; trackers, metrics.jsonl, the progress bar
  Checkpointer     the checkpoint schedule, the commit protocol across ranks, keep-latest-k
  GridWriter       reconstructions of a fixed held-out batch as a PNG (and in TensorBoard)
  Validator        the evaluate stage's metrics on held-out samples, split across ranks
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline.data.loader import batches
from pipeline.distributed import all_reduce, decided_by_main, on_every_rank, print0
from pipeline.errors import Diverged
from pipeline.metrics.evaluator import Evaluator
from pipeline.metrics.grid import save_grid
from pipeline.models.autoencoder import run_autoencoder
from pipeline.pixels import to_model_input, to_uint8
from pipeline.storage import as_path, atomic_write_text
from pipeline.storage import folder_lock
from pipeline.storage.base import check_writable, held_token


class NonFiniteGuard:
    """Counts skipped steps; stops the run after `max_bad_steps` non-finite steps in a row. Under fp16 (`scaler`), a
    gradient overflow with a finite loss is the loss scaler's business: retried without counting."""

    def __init__(self, max_bad_steps: int, scaler: bool):
        self.max_bad_steps, self.scaler = max_bad_steps, scaler

    def retry(self, st, stepped: bool, loss_bad: bool) -> bool:
        """After a step was taken or skipped: True when the step must simply be run again."""
        if stepped:
            return False
        st.skipped_steps += 1
        if self.scaler and not loss_bad:
            return True
        st.bad_steps += 1
        print0(f"train: step {st.step}: non-finite loss or gradient, step skipped "
               f"({st.bad_steps} in a row, {st.skipped_steps} in all)")
        if st.bad_steps >= self.max_bad_steps:
            raise Diverged(f"{st.bad_steps} non-finite steps in a row at step {st.step}; last good checkpoint: "
                           f"{st.last_checkpoint or 'none yet'} (resume with --resume auto after lowering train.lr "
                           f"or changing the loss)")
        return True


class Logbook:
    """Averages the terms of the steps since the last log point and sends them, every `every` steps, to the trackers
    and metrics.jsonl (one host sync per log interval). On resume, rows of steps after the checkpoint (which will be
    redone) are dropped from metrics.jsonl."""

    def __init__(self, run_dir: Path, accelerator, every: int, images_per_step: int, start_step: int):
        self.acc, self.every, self.images_per_step = accelerator, every, images_per_step
        self.pending: list[dict] = []
        self.path = Path(run_dir) / "metrics.jsonl"
        self.t0, self.step0 = time.time(), start_step
        if accelerator.is_main_process and self.path.is_file():
            rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in rows if json.loads(ln).get("step", 0) <= start_step]
            if len(kept) != len(rows):
                atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def add(self, terms: dict) -> None:
        self.pending.append(terms)

    def record(self, step: int, scalars: dict) -> None:
        """One row of metrics.jsonl (the main process's): the averaged training terms, or a validation's metrics."""
        if self.acc.is_main_process:
            check_writable(self.path)  # a local run folder whose lock was taken over: no more rows
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def images_per_second(self, step: int) -> float:
        return (step - self.step0) * self.images_per_step / max(time.time() - self.t0, 1e-9)

    def maybe_log(self, step: int, extras: dict, bar) -> float | None:
        """Log the averaged terms (and `extras`, scalars of this moment) when a log point is due, and show them on
        the progress bar (pipeline.progress); returns the loss."""
        if step % self.every or not self.pending:
            return None
        pending, self.pending = self.pending, []
        keys = [k for k in pending[-1] if pending[-1][k].numel() == 1]
        means = torch.stack([torch.stack([t[k].float().reshape(()).to(self.acc.device) for k in keys])
                             for t in pending if all(k in t for k in keys)]).mean(0).tolist()
        scalars = {f"train/{k}": v for k, v in zip(keys, means)}
        if "kl_per_channel" in pending[-1]:
            for c, v in enumerate(pending[-1]["kl_per_channel"].tolist()):
                scalars[f"kl_per_channel/{c}"] = v
        scalars.update({f"train/{k}": float(v) for k, v in extras.items()})
        scalars["train/images_per_second"] = self.images_per_second(step)
        if torch.cuda.is_available():
            scalars["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.acc.log(scalars, step=step)
        self.record(step, scalars)
        bar.update(0, loss=scalars["train/loss"], img_s=f"{scalars['train/images_per_second']:.1f}",
                   lr=f"{scalars['train/lr']:.2e}")
        return scalars["train/loss"]


class Checkpointer:
    """Saves every `every` steps and at the last step. The main process first shows, on the store, that the run
    folder's lock is still this run's (a run that lost it writes nothing: LockLost, exit 75) and un-commits a
    checkpoint of the same step (a rerun that got no further); then every rank writes its part, and the ranks agree
    (on_every_rank): the main process commits the record (with the size and SHA-256 of its files), prunes to `keep`
    and calls `after_save` (the logs' upload to an object-store run folder), or, if any rank failed, every rank
    drops the checkpoint and the job ends (74 on the rank whose disk was full, 75 elsewhere)."""

    def __init__(self, run_dir: Path, accelerator, every: int, max_steps: int, keep: int, after_save=None):
        self.run_dir, self.acc = as_path(run_dir), accelerator
        self.every, self.max_steps, self.keep = every, max_steps, keep
        self.after_save = after_save
        self.followed = False

    def _follow_the_lock(self) -> None:
        """Once: the other ranks follow the main process's lock of the run folder (taken before the process group
        existed), so that their part of a checkpoint proves it too (pipeline.storage.lock.FolderLock.follow)."""
        if not self.followed:
            self.followed = True
            token = decided_by_main(lambda: held_token(self.run_dir / ckpt.TRAINER_FILE))
            if token and not self.acc.is_main_process:
                folder_lock(self.run_dir, what="output_dir").follow(token)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def save(self, step: int, state: dict) -> Path:
        """`state`: the Trainer's state_dict() (its `trainer` entry is the record)."""
        acc, folder = self.acc, ckpt.checkpoint_dir(self.run_dir, step)
        main, what = acc.is_main_process, f"checkpoint {folder}"

        def begin() -> None:
            if main:
                check_writable(folder / ckpt.TRAINER_FILE)  # the lock, proved on the store before any rank writes
                if folder.exists():
                    ckpt.uncommit_checkpoint(folder)

        def commit() -> None:
            if main:
                ckpt.commit_checkpoint(folder, state["trainer"], files)
                ckpt.prune_checkpoints(self.run_dir, self.keep)
                if self.after_save is not None:
                    self.after_save()

        self._follow_the_lock()
        on_every_rank(begin, what, device=acc.device)
        files = on_every_rank(lambda: ckpt.write_checkpoint_files(folder, state, acc.process_index, main), what,
                              undo=lambda: main and ckpt.uncommit_checkpoint(folder),  # a failed save leaves nothing
                              device=acc.device)
        on_every_rank(commit, what, device=acc.device)  # a failure there (a lost lock) ends every rank in one line
        return folder


class GridWriter:
    """Every `every` steps: reconstructions of a fixed batch (held-out images when there are some), on the main
    process, as samples/step-N.png and in TensorBoard."""

    def __init__(self, run_dir: Path, accelerator, every: int):
        self.run_dir, self.acc, self.every = Path(run_dir), accelerator, every
        self.batch: torch.Tensor | None = None

    def keep(self, images: torch.Tensor) -> None:
        if self.batch is None:
            self.batch = images[:8].clone()

    @torch.no_grad()
    def maybe_write(self, step: int, module) -> None:
        if step % self.every or self.batch is None or not self.acc.is_main_process:
            return
        was_training = module.training
        module.eval()
        x = to_model_input(self.batch, self.acc.device)
        with self.acc.autocast():
            rec = run_autoencoder(module.vae, x, sample_posterior=False).reconstruction
        module.train(was_training)  # through the wrapper: a frozen encoder side stays in eval mode
        grid = save_grid(self.batch, to_uint8(rec), self.run_dir / "samples" / f"step-{step:08d}.png")
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("reconstructions", grid, step, dataformats="HWC")


class Validator:
    """Every `every` steps: the evaluate stage's metrics (PSNR, SSIM, LPIPS when the objective has it, KL, active
    units, codebook use; no likelihood bounds, no diffusability probe) on `samples` held-out samples, split across
    ranks; with an EMA, PSNR and SSIM of the EMA weights too."""

    def __init__(self, accelerator, every: int, samples: int, loader_factory, evaluate_opts, resolution: int,
                 perceptual: dict):
        self.acc, self.every, self.samples, self.loader_factory = accelerator, every, samples, loader_factory
        self.opts = replace(evaluate_opts, likelihood_samples=0, num_samples=samples, diffusability=False)
        self.resolution, self.perceptual = resolution, perceptual

    def _evaluate(self, vae) -> dict:
        ev = Evaluator(vae, self.opts, self.perceptual, self.resolution, self.acc.device)
        with batches(self.loader_factory()) as stream:
            for batch in stream:
                ev.add(batch["image"], batch["__key__"])
        return ev.finalize(lambda tensors: all_reduce(tensors, "sum", self.acc.device))

    @torch.no_grad()
    def maybe_validate(self, step: int, module, ema=None) -> dict | None:
        """val/* of the weights being trained and, with an EMA, val_ema/psnr and val_ema/ssim of the EMA weights
        (what evaluate, encode and export use by default), loaded into the model for the pass and then put back
        bit for bit."""
        if step % self.every:
            return None
        was_training = module.training
        module.eval()
        res = self._evaluate(module.vae)
        if ema is not None:
            with ema.applied(module.vae) as vae:
                res_ema = self._evaluate(vae)
        module.train(was_training)  # through the wrapper: a frozen encoder side stays in eval mode
        metrics = {"val/psnr": res["psnr"], "val/ssim": res["ssim"]}
        metrics.update({f"val/lpips_{k}": res[f"lpips_{k}"] for k in self.perceptual})
        if "kl_per_sample" in res:
            metrics["val/kl"] = res["kl_per_sample"]
            metrics["val/active_units"] = res["active_units"]["active_units"]
        if "codebook" in res:
            metrics["val/codebook_usage"] = res["codebook"]["usage"]
        if ema is not None:
            metrics.update({"val_ema/psnr": res_ema["psnr"], "val_ema/ssim": res_ema["ssim"]})
        self.acc.log(metrics, step=step)
        print0(f"validate: step {step}, {res['samples']} samples: "
               + ", ".join(f"{k[4:] if k.startswith('val/') else k} {v:.4g}" for k, v in metrics.items()))
        return metrics
