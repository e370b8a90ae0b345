"""firststage train: the distributed first-stage trainer (one accelerate.Accelerator: CPU, 1 GPU, N nodes x 8 GPUs).

  firststage train --config kl-f8 data.train='shards/train-{000000..004095}.tar' output_dir=runs/klf8
  accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m stages.train --config kl-f8 ...
  firststage train --config kl-f8 ... --resume auto          # after a crash or a preemption

This module is the command line: arguments, the Accelerator, the SIGTERM handler, the folder lock, the summary line
and the exit codes. The trainer itself is pipeline.train.trainer. Exit codes: 0 done, 2 user error, 3 diverged (too
many NaN/Inf steps in a row), 75 preempted (SIGTERM, also during start-up: whatever was complete is saved; run again
with --resume auto).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading

from pipeline.config import config_to_dict, load_config, save_config
from pipeline.distributed import is_main_process, print0
from pipeline.errors import UserError
from pipeline.machine import resolve_mixed_precision
from pipeline.storage import LogMirror
from stages.common import (EXIT_PREEMPTED, add_config_args, check_paths, flag_named, sigterm_sets, stage_main, start_up,
                           take_output_lock)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=True)
    p.add_argument("--resume", metavar="auto|PATH",
                   help="auto: newest complete checkpoint in output_dir (a fresh start if none); PATH: that checkpoint")
    return p


def make_accelerator(cfg):
    """The one Accelerator of a run: mixed precision, gradient accumulation, trackers, DDP."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    log_with = None if cfg.train.tracker == "none" else cfg.train.tracker
    logs = str(LogMirror(cfg.output_dir).local)  # a local folder (uploaded at checkpoints) for an s3:// run folder
    if log_with == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("train.tracker=wandb but wandb is not installed (pip install wandb), or use tensorboard") from None
    return Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=logs, logging_dir=logs),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True)],
        cpu=not torch.cuda.is_available(),
    )


def run(argv=None):
    """Train as the command line says; returns the Trainer."""
    args = build_parser().parse_intermixed_args(argv)  # key=value may follow --resume
    return train(args.config, args.overrides, args.resume)


def train(config: str, overrides=(), resume: str | None = None):
    """Train the preset or YAML file `config` with dotted `overrides` (what the command line's words say, as values:
    the demo calls this); returns the Trainer. The SIGTERM handler is installed first and the previous one restored
    on the way out; the output folder is locked for the run (on the main process)."""
    stop, grace = threading.Event(), [100.0]
    with sigterm_sets(stop, lambda: grace[0], _exit_preempted):  # finish the step, save, exit 75
        cfg = load_config(config, list(overrides))  # validated before the heavy imports: a typo costs < 1 s
        grace[0] = cfg.train.sigterm_grace
        inputs = {"data.train": cfg.data.train, "data.val": cfg.data.val, "train.init_from": cfg.train.init_from}
        check_paths(inputs.items())
        return locked_on_main(cfg.output_dir, "output_dir", lambda: _run(list(overrides), resume, cfg, stop))


def locked_on_main(folder: str, what: str, fn):
    """fn() on every rank, the main process holding the run folder's lock meanwhile (train, probe)."""
    if not is_main_process():
        return fn()
    lock = take_output_lock(folder, what=what)
    try:
        return fn()
    finally:
        lock.release()


def _exit_preempted(grace: float) -> None:
    print(f"train: SIGTERM, and no step boundary within {grace:g}s (train.sigterm_grace): exiting {EXIT_PREEMPTED} "
          f"without saving; rerun with --resume auto", file=sys.stderr, flush=True)
    os._exit(EXIT_PREEMPTED)


def _run(overrides: list, resume: str | None, cfg, stop: threading.Event):
    with start_up(stop, "train: preempted during start-up, before any step; rerun with --resume auto"):
        from pipeline.train.trainer import Trainer, load_init, shape_from_init

    init = load_init(cfg)  # read once: the shape and the weights come from the same checkpoint, the same read
    shaped = shape_from_init(cfg, overrides, init)  # train.init_from brings its shape (also when resuming)
    if shaped.model != cfg.model:
        print0(f"train: the model's shape comes from train.init_from {cfg.train.init_from} "
               f"(model.kind {shaped.model.kind}{', a diffusers config' if shaped.model.diffusers else ''})")
    cfg = shaped
    acc = make_accelerator(cfg)
    with flag_named("--resume") if resume not in (None, "auto") else contextlib.nullcontext():
        tr = Trainer(cfg, acc, resume, init)
    del init  # its model is the trainer's now, or gave the trainer's its tensors: not held for the whole run
    if acc.is_main_process:
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, tr.run_dir / "config.yaml")
    acc.init_trackers("logs", config=_flat(config_to_dict(cfg)))
    start_step = tr.state.step
    params = sum(p.numel() for p in tr.unwrapped.parameters()) / 1e6
    print0(f"train: {cfg.model.kind.upper()} autoencoder, {params:.1f}M parameters, {acc.num_processes} process(es) "
           f"on {acc.device}, mixed precision {acc.mixed_precision}, from step {start_step} to {cfg.train.max_steps}")
    try:
        st = tr.fit(stop)
    finally:
        for tracker in acc.trackers:  # not end_training(): the process group stays for stages run after this one
            tracker.finish()
    if acc.is_main_process:
        tr.logs.sync()  # the logs of an s3:// run folder as they are at the end (else as at the last checkpoint)
    if st.stop_requested:
        saved = st.last_checkpoint or "nothing (no step completed)"
        print0(f"train: preempted at step {st.step}; saved {saved}; rerun with --resume auto")
        raise SystemExit(EXIT_PREEMPTED)
    hist = st.history
    loss = f"loss {hist[0][1]:.4g} -> {hist[-1][1]:.4g}" if hist else "loss not logged (train.log_every > steps run)"
    print0(f"train: steps {start_step}->{st.step}, {st.samples} samples seen, {loss}, {st.skipped_steps} non-finite "
           f"steps skipped; wrote {st.last_checkpoint or 'no checkpoint'} (run folder {tr.run_dir})")
    return tr


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


@stage_main
def main(argv=None) -> None:
    tr = run(argv)
    tr.accelerator.state.destroy_process_group()


if __name__ == "__main__":
    main()
