"""firststage train: the distributed first-stage trainer (one accelerate.Accelerator: CPU, 1 GPU, N nodes x 8 GPUs).

  firststage train --config kl-f8 data.train='shards/train-{000000..004095}.tar' output_dir=runs/klf8
  accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m stages.train --config kl-f8 ...
  firststage train --config kl-f8 ... --resume auto          # after a crash or a preemption

setup() builds everything and resumes; fit() runs the steps; train_step() is one optimizer step of the autoencoder
(and of the discriminator once it has started). Exit codes: 0 done, 2 user error, 3 diverged (too many NaN/Inf steps
in a row), 75 preempted (SIGTERM: a checkpoint was saved; run again with --resume auto).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import checkpoint as ckpt
from pipeline.config import Config, config_to_dict, load_config, save_config
from pipeline.data.loader import make_loader, plan_subset, resolve_shards, to_model_input, to_uint8
from pipeline.errors import UserError
from pipeline.losses import FirstStageObjective
from pipeline.metrics.evaluator import EvalOptions, Evaluator
from pipeline.models import build_autoencoder, is_vq, last_decoder_layer, run_autoencoder
from pipeline.train.ema import EMA
from pipeline.train.module import TrainableAutoencoder, save_grid
from pipeline.train.schedules import base_learning_rate, lr_factor
from stages.common import add_config_args, stage_main

EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", what SLURM requeue scripts look for


class Diverged(UserError):
    pass


def print0(acc, msg: str) -> None:
    """Once per job (global rank 0), not once per node."""
    if acc.is_main_process:
        tqdm.write(msg)  # above the progress bar, not through it
        sys.stdout.flush()


@dataclass
class State:
    step: int = 0
    bad_steps: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0  # all non-finite steps skipped so far
    samples: int = 0
    last_checkpoint: str = ""
    stop_requested: bool = False
    history: list = field(default_factory=list)  # (step, loss) at each log point, for the summary


# ----------------------------------------------------------------------------------------------------- setup
def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(cfg: Config, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    log_with = None if cfg.train.tracker == "none" else cfg.train.tracker
    if log_with == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("train.tracker=wandb but wandb is not installed (pip install wandb), or use tensorboard") from None
    return Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True)],
        cpu=not torch.cuda.is_available(),
    )


def make_optimizer(params, lr: float, cfg: Config):
    params = [p for p in params if p.requires_grad]
    fused = torch.cuda.is_available()  # one kernel per step instead of one per tensor
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                             fused=fused or None)


def make_scheduler(opt, cfg: Config, offset: int = 0):
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s + offset, t.warmup_steps, t.max_steps, t.lr_schedule)
    )


@dataclass
class Trainer:
    cfg: Config
    run_dir: Path
    accelerator: object
    model: object  # TrainableAutoencoder, prepared
    objective: FirstStageObjective
    discriminator: object  # prepared PatchDiscriminator or None
    opt: object
    opt_d: object
    sched: object
    sched_d: object
    ema: EMA | None
    loader: object
    state: State
    fixed_batch: torch.Tensor | None = None
    val_loader: object = None

    @property
    def unwrapped(self) -> TrainableAutoencoder:
        return self.accelerator.unwrap_model(self.model)


def setup(cfg: Config, resume: str | None) -> Trainer:
    """Build model, objective, optimisers, data; restore a checkpoint; prepare with accelerate (once)."""
    run_dir = Path(cfg.output_dir)
    # cheap checks first: a user mistake is reported before any model is built
    train_urls = resolve_shards(cfg.data.train)
    if cfg.data.val:
        resolve_shards(cfg.data.val)
    resume_path = None
    if resume == "auto":
        resume_path = ckpt.find_resume_path(run_dir)
    elif resume:
        resume_path = Path(resume)
        if not (resume_path / "trainer.json").is_file():
            raise UserError(f"--resume {resume}: not a complete checkpoint folder (no trainer.json)")

    accelerator = make_accelerator(cfg, run_dir)
    if cfg.train.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    vae = build_autoencoder(cfg.model, cfg.data.resolution)
    if cfg.train.init_from and resume_path is None:
        ckpt.load_weights_into(vae, cfg.train.init_from)
    if cfg.train.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    module = TrainableAutoencoder(vae, freeze_encoder=cfg.train.freeze_encoder)
    objective = FirstStageObjective(cfg.loss, cfg.model.kind, cfg.model.in_channels)
    ema = EMA(vae, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

    global_batch = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    lr = base_learning_rate(cfg.train.lr, cfg.train.lr_scale, global_batch)
    lr_d = base_learning_rate(cfg.train.disc_lr or cfg.train.lr, cfg.train.lr_scale, global_batch)
    opt = make_optimizer(list(module.parameters()) + objective.generator_parameters(), lr, cfg)
    disc = objective.discriminator
    opt_d = make_optimizer(disc.parameters(), lr_d, cfg) if disc is not None else None

    state = State()
    if resume_path is not None:
        restore(resume_path, module, objective, ema, opt, opt_d, state, accelerator)
    sched = make_scheduler(opt, cfg, offset=state.step)
    sched_d = make_scheduler(opt_d, cfg, offset=state.step) if opt_d is not None else None

    if torch.cuda.is_available() and cfg.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        module = torch.compile(module)
    objective.to(accelerator.device)
    # The discriminator stays outside DDP (it runs twice per backward: real and fake); its gradients are averaged
    # across ranks by average_across_ranks(), as are the learned log-variance's.
    if opt_d is not None:
        module, opt, opt_d = accelerator.prepare(module, opt, opt_d)
    else:
        module, opt = accelerator.prepare(module, opt)
    if ema is not None:
        ema.to(accelerator.device)

    loader = make_loader(
        train_urls, "train", cfg.train.batch_size, cfg.data.num_workers, resolution=cfg.data.resolution,
        crop=cfg.data.crop, flip=cfg.data.flip, scale=tuple(cfg.data.random_resized_scale),
        shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, epoch=state.step,  # a resumed run draws a fresh stream
        pin_memory=torch.cuda.is_available(),
    )
    val_loader = None
    if cfg.data.val:
        val_urls, val_limits, _ = plan_subset(cfg.data.val, cfg.train.val_samples)
        val_loader = lambda: make_loader(  # noqa: E731 (rebuilt for each validation: eval streams end)
            val_urls, "eval", cfg.evaluate.batch_size, cfg.data.num_workers, resolution=cfg.data.resolution,
            rank=accelerator.process_index, world_size=accelerator.num_processes, limits=val_limits,
        )
    tr = Trainer(cfg, run_dir, accelerator, module, objective, disc, opt, opt_d, sched, sched_d, ema, loader,
                 state, val_loader=val_loader)
    if val_loader is not None:  # the reconstruction grid shows held-out images when there are any
        tr.fixed_batch = next(iter(val_loader()))["image"][:8].clone()
    return tr


def restore(path: Path, module, objective, ema, opt, opt_d, state: State, accelerator) -> None:
    module.vae.load_state_dict(ckpt.load_tensors(path / "autoencoder.safetensors"), strict=True)
    obj_state = ckpt.load_tensors(path / "objective.safetensors") if (path / "objective.safetensors").is_file() else {}
    objective.load_state_dict(obj_state, strict=False)
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict(ckpt.load_tensors(path / "ema.safetensors"))
    opt.load_state_dict(ckpt.load_object(path / "optimizer.pt"))
    if opt_d is not None and (path / "optimizer_d.pt").is_file():
        opt_d.load_state_dict(ckpt.load_object(path / "optimizer_d.pt"))
    meta = ckpt.read_trainer_state(path)
    state.step, state.skipped_steps, state.samples = meta["step"], meta["skipped_steps"], meta["samples"]
    state.last_checkpoint = str(path)
    rng_file = path / f"rng-rank{accelerator.process_index}.pt"
    if rng_file.is_file():
        ckpt.set_rng_state(ckpt.load_object(rng_file))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(ckpt.load_object(path / "scaler.pt"))


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(tr: Trainer) -> Path:
    """Every rank writes its RNG state; the main process writes the rest; the folder is renamed when complete."""
    acc, step = tr.accelerator, tr.state.step
    staging, final = ckpt.staging_dir(tr.run_dir, step), ckpt.checkpoint_dir(tr.run_dir, step)
    if acc.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    acc.wait_for_everyone()
    ckpt.save_object(staging / f"rng-rank{acc.process_index}.pt", ckpt.rng_state())
    if acc.is_main_process:
        vae = tr.unwrapped.vae
        ckpt.save_tensors(staging / "autoencoder.safetensors", vae.state_dict())
        if tr.ema is not None:
            ckpt.save_tensors(staging / "ema.safetensors", tr.ema.state_dict())
        obj_state = {k: v for k, v in tr.objective.state_dict().items() if not k.startswith("perceptual.")}
        if obj_state:
            ckpt.save_tensors(staging / "objective.safetensors", obj_state)
        ckpt.save_object(staging / "optimizer.pt", tr.opt.state_dict())
        if tr.opt_d is not None:
            ckpt.save_object(staging / "optimizer_d.pt", tr.opt_d.state_dict())
        if acc.scaler is not None:
            ckpt.save_object(staging / "scaler.pt", acc.scaler.state_dict())
        save_config(tr.cfg, staging / "config.yaml")
        meta = {"step": step, "skipped_steps": tr.state.skipped_steps, "samples": tr.state.samples,
                "world_size": acc.num_processes, "time": time.time()}
        (staging / "trainer.json").write_text(json.dumps(meta, indent=1))
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.commit_checkpoint(staging, final)
        ckpt.prune_checkpoints(tr.run_dir, tr.cfg.train.keep_checkpoints)
    acc.wait_for_everyone()
    tr.state.last_checkpoint = str(final)
    return final


# ------------------------------------------------------------------------------------------------ the step
def train_step(tr: Trainer, images: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One micro-step (grad_accum of them make an optimizer step, via accelerate).
    Returns (terms, non-finite loss or gradient, non-finite loss)."""
    acc, cfg, step = tr.accelerator, tr.cfg, tr.state.step
    x = to_model_input(images, acc.device)
    if torch.cuda.is_available() and cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gan = tr.objective.gan_active(step)
    disc_params = list(tr.objective.discriminator.parameters()) if tr.discriminator is not None else []

    with acc.accumulate(tr.model):
        for p in disc_params:  # the generator step reads D without training it
            p.requires_grad_(False)
        with acc.autocast():
            out = tr.model(x)
            loss, terms = tr.objective.generator_loss(x, out, step, last_decoder_layer(tr.unwrapped.vae))
        acc.backward(loss)
        for p in disc_params:
            p.requires_grad_(True)
        if acc.sync_gradients:
            average_across_ranks([p.grad for p in tr.objective.generator_parameters()], acc)
        grad_norm = _grad_norm(tr.opt, cfg.train.grad_clip, acc)
        bad_loss = ~torch.isfinite(loss.detach())
        bad = ~torch.isfinite(grad_norm) | bad_loss
        terms["grad_norm"] = grad_norm

    if gan:
        with acc.autocast():
            d_loss, d_terms = tr.objective.discriminator_loss(x, out.reconstruction, step)
        acc.backward(d_loss)
        if acc.sync_gradients:
            d = tr.objective.discriminator
            average_across_ranks([p.grad for p in disc_params] + [b for b in d.buffers() if b.is_floating_point()], acc)
        d_norm = _grad_norm(tr.opt_d, cfg.train.grad_clip, acc)
        bad = bad | ~torch.isfinite(d_norm)
        terms.update(d_terms)
        terms["grad_norm_d"] = d_norm
    return terms, bad, bad_loss


def average_across_ranks(tensors: list, acc) -> None:
    """Average tensors that live outside DDP (gradients of the discriminator and learned log-variance, BatchNorm
    running statistics) across ranks in place, in one flat all-reduce, so every rank stays identical."""
    tensors = [t for t in tensors if t is not None]
    if acc.num_processes == 1 or not tensors:
        return
    flat = acc.reduce(torch.cat([t.reshape(-1) for t in tensors]), "mean")
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _grad_norm(opt, clip: float, acc) -> torch.Tensor:
    """Global grad norm (unscaled under fp16), clipped to `clip` when > 0, once gradients are complete."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not params or not acc.sync_gradients:
        return torch.zeros((), device=acc.device)
    if acc.scaler is not None:  # fp16: unscale this optimizer only (accelerate's clip unscales all of them)
        acc.unscale_gradients(optimizer=opt)
    return torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))


def apply_or_skip(tr: Trainer, bad: torch.Tensor, bad_loss: torch.Tensor, stop: bool) -> tuple[bool, bool, bool]:
    """One host sync per step: all ranks agree whether to step (finite loss and grads), whether the loss itself
    was non-finite, and whether to stop (SIGTERM). Returns (stepped, loss non-finite, stop)."""
    acc = tr.accelerator
    flags = torch.stack([bad.float().reshape(()), bad_loss.float().reshape(()),
                         torch.tensor(float(stop), device=bad.device)])
    if acc.num_processes > 1:
        flags = acc.reduce(flags, "max")
    bad_any, loss_bad, stop_any = (bool(v) for v in flags.tolist())
    gan = tr.objective.gan_active(tr.state.step)
    if bad_any:
        if acc.scaler is not None:  # fp16: let the scaler see the overflow, skip, and lower the loss scale
            tr.opt.step()
        tr.opt.zero_grad(set_to_none=True)
        if tr.opt_d is not None:
            tr.opt_d.zero_grad(set_to_none=True)
        return False, loss_bad, stop_any
    tr.opt.step()
    tr.sched.step()
    tr.opt.zero_grad(set_to_none=True)
    if gan:  # the discriminator's schedule runs from the step it starts training
        tr.opt_d.step()
        tr.opt_d.zero_grad(set_to_none=True)
        tr.sched_d.step()
    return True, False, stop_any


# ------------------------------------------------------------------------------------------------ fit
def fit(tr: Trainer) -> State:
    acc, cfg, st = tr.accelerator, tr.cfg, tr.state
    global_batch = cfg.train.batch_size * acc.num_processes
    bar = tqdm(total=cfg.train.max_steps, initial=st.step, disable=not acc.is_main_process, unit="step",
               dynamic_ncols=True, desc="train")
    pending: list[dict] = []
    t0, steps0 = time.time(), st.step
    data = iter(tr.loader)
    tr.model.train()
    while st.step < cfg.train.max_steps:
        bad = torch.zeros((), dtype=torch.bool, device=acc.device)
        bad_loss = bad.clone()
        try:
            for _ in range(cfg.train.grad_accum):
                batch = next(data)
                if tr.fixed_batch is None:
                    tr.fixed_batch = batch["image"][:8].clone()
                terms, micro_bad, micro_bad_loss = train_step(tr, batch["image"])
                bad, bad_loss = bad | micro_bad, bad_loss | micro_bad_loss
        except RuntimeError:
            # SLURM sends SIGTERM to every process: loader workers may die before the main process reaches the
            # step boundary. The step in flight is dropped; the last completed one is saved.
            if not st.stop_requested:
                raise
            save_checkpoint(tr)
            bar.close()
            return st
        stepped, loss_bad, stop = apply_or_skip(tr, bad, bad_loss, st.stop_requested)
        if not stepped:
            st.skipped_steps += 1
            if acc.scaler is not None and not loss_bad:
                continue  # fp16 gradient overflow: the loss scaler lowers its scale and the step is retried
            st.bad_steps += 1
            print0(acc, f"train: step {st.step}: non-finite loss or gradient, step skipped "
                      f"({st.bad_steps} in a row, {st.skipped_steps} in all)")
            if st.bad_steps >= cfg.train.max_bad_steps:
                last = st.last_checkpoint or "none yet"
                raise Diverged(f"{st.bad_steps} non-finite steps in a row at step {st.step}; last good checkpoint: "
                               f"{last} (resume with --resume auto after lowering train.lr or changing the loss)")
        else:
            st.bad_steps = 0
            st.step += 1
            st.samples += global_batch * cfg.train.grad_accum
            if tr.ema is not None and st.step % cfg.train.ema_every == 0:
                tr.ema.update(tr.unwrapped.vae)
            pending.append(terms)
        bar.update(1 if stepped else 0)

        if st.step % cfg.train.log_every == 0 and pending and stepped:
            elapsed = time.time() - t0
            ips = (st.step - steps0) * global_batch * cfg.train.grad_accum / max(elapsed, 1e-9)
            scalars = log_scalars(tr, pending, ips)
            pending = []
            bar.set_postfix(loss=f"{scalars['train/loss']:.4g}", img_s=f"{ips:.1f}", lr=f"{scalars['train/lr']:.2e}")
        if stepped and st.step % cfg.train.image_every == 0:
            write_grid(tr)
        if stepped and cfg.data.val and st.step % cfg.train.val_every == 0:
            validate(tr)
        if stop:
            save_checkpoint(tr)
            bar.close()
            return st
        if stepped and (st.step % cfg.train.checkpoint_every == 0 or st.step == cfg.train.max_steps):
            save_checkpoint(tr)
    bar.close()
    return st


def log_scalars(tr: Trainer, pending: list[dict], images_per_second: float) -> dict:
    """Average the pending terms (tensors) and send them to the trackers: one host sync per log interval."""
    keys = [k for k in pending[-1] if pending[-1][k].numel() == 1]
    stacked = torch.stack([torch.stack([t[k].float().reshape(()).to(tr.accelerator.device) for k in keys])
                           for t in pending if all(k in t for k in keys)]).mean(0).tolist()
    scalars = {f"train/{k}": v for k, v in zip(keys, stacked)}
    last = pending[-1]
    if "kl_per_channel" in last:
        for c, v in enumerate(last["kl_per_channel"].tolist()):
            scalars[f"kl_per_channel/{c}"] = v
    scalars["train/lr"] = tr.opt.param_groups[0]["lr"]
    scalars["train/images_per_second"] = images_per_second
    scalars["train/skipped_steps"] = tr.state.skipped_steps
    if is_vq(tr.unwrapped.vae):
        scalars["train/codebook_usage"] = tr.unwrapped.vae.quantize.usage().item()
    if torch.cuda.is_available():
        scalars["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    tr.accelerator.log(scalars, step=tr.state.step)
    tr.state.history.append((tr.state.step, scalars["train/loss"]))
    if tr.accelerator.is_main_process:
        with open(tr.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": tr.state.step, **scalars}) + "\n")
    return scalars


@torch.no_grad()
def write_grid(tr: Trainer) -> None:
    """Reconstructions of a fixed held-out batch (data.val when given, else the first training batch)."""
    if tr.fixed_batch is None or not tr.accelerator.is_main_process:
        return
    vae = tr.unwrapped.vae
    was_training = vae.training
    vae.eval()
    x = to_model_input(tr.fixed_batch, tr.accelerator.device)
    with tr.accelerator.autocast():
        rec = run_autoencoder(vae, x, sample_posterior=False).reconstruction
    vae.train(was_training)
    grid = save_grid(tr.fixed_batch, to_uint8(rec), tr.run_dir / "samples" / f"step-{tr.state.step:08d}.png")
    for tracker in tr.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("reconstructions", grid, tr.state.step, dataformats="HWC")


@torch.no_grad()
def validate(tr: Trainer) -> dict:
    """The evaluate stage's metrics (PSNR, SSIM, LPIPS when the objective has it, KL, active units, codebook use;
    no likelihood bounds) on the first train.val_samples held-out samples, split across ranks."""
    acc, vae, cfg = tr.accelerator, tr.unwrapped.vae, tr.cfg
    perceptual = {cfg.loss.perceptual.net: tr.objective.perceptual} if tr.objective.perceptual is not None else {}
    opts = EvalOptions(likelihood_samples=0, num_samples=cfg.train.val_samples,
                       active_threshold=cfg.evaluate.active_unit_threshold)
    ev = Evaluator(vae, opts, perceptual, cfg.data.resolution, acc.device)
    vae.eval()
    for batch in tr.val_loader():
        ev.add(batch["image"], batch["__key__"])
    vae.train()

    def reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        average_across_ranks(tensors, acc)  # a mean over ranks; times the world size it is the sum
        return [t * acc.num_processes for t in tensors]

    res = ev.finalize(reduce)
    metrics = {"val/psnr": res["psnr"], "val/ssim": res["ssim"]}
    metrics.update({f"val/lpips_{k}": res[f"lpips_{k}"] for k in perceptual})
    if "kl_per_sample" in res:
        metrics["val/kl"] = res["kl_per_sample"]
        metrics["val/active_units"] = res["active_units"]["active_units"]
    if "codebook" in res:
        metrics["val/codebook_usage"] = res["codebook"]["usage"]
    acc.log(metrics, step=tr.state.step)
    print0(acc, f"validate: step {tr.state.step}, {res['samples']} samples: "
           + ", ".join(f"{k[4:]} {v:.4g}" for k, v in metrics.items()))
    return metrics


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=True)
    p.add_argument("--resume", metavar="auto|PATH",
                   help="auto: newest complete checkpoint in output_dir (a fresh start if none); PATH: that checkpoint")
    return p


def run(argv=None) -> Trainer:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    tr = setup(cfg, args.resume)
    acc = tr.accelerator
    if acc.is_main_process:
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, tr.run_dir / "config.yaml")
    acc.init_trackers("logs", config=_flat(config_to_dict(cfg)))
    start_step = tr.state.step

    def on_sigterm(signum, frame):  # preemption: finish the current step, save, exit EXIT_PREEMPTED
        tr.state.stop_requested = True

    signal.signal(signal.SIGTERM, on_sigterm)
    print0(acc, f"train: {cfg.model.kind.upper()} autoencoder, {sum(p.numel() for p in tr.unwrapped.parameters()) / 1e6:.1f}M "
              f"parameters, {acc.num_processes} process(es) on {acc.device}, mixed precision "
              f"{acc.mixed_precision}, from step {start_step} to {cfg.train.max_steps}")
    try:
        st = fit(tr)
    finally:
        acc.end_training()
    hist = tr.state.history
    loss = f"loss {hist[0][1]:.4g} -> {hist[-1][1]:.4g}" if hist else "loss not logged (train.log_every > steps run)"
    if st.stop_requested:
        print0(acc, f"train: preempted at step {st.step}; saved {st.last_checkpoint}; rerun with --resume auto")
        raise SystemExit(EXIT_PREEMPTED)
    print0(acc, f"train: steps {start_step}->{st.step}, {st.samples} samples seen, {loss}, "
              f"{st.skipped_steps} non-finite steps skipped; wrote {st.last_checkpoint or 'no checkpoint'} "
              f"(run folder {tr.run_dir})")
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
    try:
        run(argv)
    except Diverged as e:
        print(f"firststage train: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_DIVERGED) from None


if __name__ == "__main__":
    main()
