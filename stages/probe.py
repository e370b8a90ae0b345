"""firststage probe: train a small diffusion transformer on latent shards and say how well they diffuse.

  firststage probe --latents latents/train --val latents/val --output probes/klf8 --config probe-b1
  accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m stages.probe --latents ... --config probe-b1
  firststage probe --latents demo/latents --output demo/probe --config probe-tiny        # CPU, minutes
  firststage probe --latents latents/train --output probes/klf8 --config probe-b1 --resume auto   # after preemption

diffusers' DiTTransformer2DModel trained with the rectified-flow objective of SiT / LightningDiT (velocity, logit-
normal t, RAE's time shift) on what LatentDataset yields; writes probe.json and probe.md (the validation loss at a
fixed grid of t, its curve over training, FID of decoded samples when Inception weights are present) and samples.png
(samples decoded by --model, or the first stage the latent manifest names) into --output, a run folder with
checkpoints as train's. The library is pipeline.probe. Exit codes as train's: 0 done, 2 user error, 3 diverged, 75
preempted (SIGTERM: saved; rerun with --resume auto).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

from pipeline.config import load_config, save_config
from pipeline.distributed import decided_by_main, print0
from pipeline.errors import UserError
from pipeline.manifest import MANIFEST
from pipeline.storage import as_path, read_json
from stages.common import (EXIT_PREEMPTED, add_alias_flags, add_config_args, alias_errors, alias_overrides,
                           check_paths, flag_named, sigterm_sets, stage_main, start_up)

ALIASES = {"--latents": ("probe.latents", str, "latent folder to train on (firststage encode's output)"),
           "--val": ("probe.val", str, "held-out latent folder for the validation loss"),
           "--output": ("output_dir", str, "the probe's run folder: checkpoints, probe.json, probe.md, samples.png"),
           "--model": ("probe.model", str, "first stage that decodes the samples (default: the manifest's)"),
           "--images": ("probe.images", str, "held-out image shards for FID")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=True)
    add_alias_flags(p, ALIASES)
    p.add_argument("--resume", metavar="auto|PATH",
                   help="auto: newest complete checkpoint in --output (a fresh start if none); PATH: that checkpoint")
    return p


def run(argv=None):
    """Probe as the command line says; returns (ProbeTrainer, probe.json's dict)."""
    args = build_parser().parse_intermixed_args(argv)
    with alias_errors(ALIASES):
        return probe(args.config, args.overrides + alias_overrides(args, ALIASES), args.resume)


def probe(config: str, overrides=(), resume: str | None = None):
    """Probe the preset or YAML file `config` with dotted `overrides` (probe.latents=..., as values: the demo calls
    this); returns (ProbeTrainer, probe.json's dict)."""
    from stages.train import _exit_preempted, locked_on_main

    stop, grace = threading.Event(), [100.0]
    with sigterm_sets(stop, lambda: grace[0], _exit_preempted):
        cfg = load_config(config, list(overrides))
        grace[0] = cfg.train.sigterm_grace
        p = cfg.probe
        if not p.latents:
            raise UserError("--latents is required: a latent folder written by firststage encode")
        check_paths([("--latents", p.latents), ("--val", p.val), ("--model", p.model), ("--images", p.images)])
        for flag, folder in (("--latents", p.latents), ("--val", p.val)):
            if folder and not (as_path(folder) / MANIFEST).is_file():
                raise UserError(f"{flag} {folder}: no {MANIFEST}; not a latent folder written by firststage encode "
                                f"(or its encode has not finished: run it again)")
            if folder and not any(s.get("samples") for s in read_json(as_path(folder) / MANIFEST).get("shards", [])):
                raise UserError(f"{flag} {folder}: its {MANIFEST} lists no latent (nothing was encoded there)")
        return locked_on_main(cfg.output_dir, "--output", lambda: _run(resume, cfg, stop))


def _run(resume: str | None, cfg, stop: threading.Event):
    with start_up(stop, "probe: preempted during start-up, before any step; rerun with --resume auto"):
        from pipeline.manifest import LATENT_FORMAT, read_manifest
        from pipeline.probe.report import first_stage, load_first_stage, write_report
        from pipeline.probe.trainer import ProbeTrainer
        from stages.train import make_accelerator

    start, p = time.time(), cfg.probe
    manifest = read_manifest(p.latents, LATENT_FORMAT)
    with flag_named("--model" if p.model else None):
        weights = decided_by_main(lambda: first_stage(p.model, manifest, p.latents))  # one checkpoint on every rank
        vae = load_first_stage(weights, manifest, p.latents, "--model") if weights is not None else None
    acc = make_accelerator(cfg)
    with flag_named("--resume") if resume not in (None, "auto") else contextlib.nullcontext():
        tr = ProbeTrainer(cfg, acc, resume)
    if acc.is_main_process:
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, tr.run_dir / "config.yaml")
    start_step = tr.state.step
    params = sum(q.numel() for q in tr.unwrapped.parameters()) / 1e6
    print0(f"probe: DiT depth {p.depth}, hidden {p.hidden}, patch {p.patch} ({params:.2f}M parameters) on latents "
           f"{list(tr.shape)} of {p.latents}, time shift {tr.shift:.3f}, {acc.num_processes} process(es) on "
           f"{acc.device}, mixed precision {acc.mixed_precision}, from step {start_step} to {cfg.train.max_steps}")
    st = tr.fit(stop)
    if st.stop_requested:
        print0(f"probe: preempted at step {st.step}; saved {st.last_checkpoint or 'nothing (no step completed)'}; "
               f"rerun with --resume auto")
        raise SystemExit(EXIT_PREEMPTED)
    final = tr.curve[-1] if tr.curve and tr.curve[-1]["step"] == st.step else {"step": st.step, **tr.validate()}
    final = {k: v for k, v in final.items() if k != "step"}
    res = write_report(tr, vae, weights, final) if acc.is_main_process else None
    fid = res and (f"FID {res['fid']:.2f}" if isinstance(res["fid"], float) else f"FID {res['fid']}")
    print0(f"probe: steps {start_step}->{st.step}, {st.samples} latents seen, validation loss {final['mean']:.4f} "
           f"(mean over t; {final['0.1']:.4f} at t=0.1, {final['0.5']:.4f} at 0.5, {final['0.9']:.4f} at 0.9), "
           f"{fid}; wrote {tr.run_dir}/probe.json, probe.md{', samples.png' if res and res['samples_png'] else ''} "
           f"in {time.time() - start:.1f}s")
    acc.wait_for_everyone()
    return tr, res


@stage_main
def main(argv=None) -> None:
    tr, _ = run(argv)
    tr.accelerator.state.destroy_process_group()


if __name__ == "__main__":
    main()
