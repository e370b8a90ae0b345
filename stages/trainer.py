"""The first-stage trainer in named parts (one accelerate.Accelerator: CPU, 1 GPU, N nodes x 8 GPUs).

build() makes everything and resumes; fit() runs the steps; train_step() is one micro-step of the autoencoder (and of
the discriminator once it has started); apply_or_skip() is the one host sync per step. Each periodic duty owns its
timing: Logbook (averaged terms, trackers, metrics.jsonl), NonFiniteGuard (skip NaN/Inf steps, stop on divergence),
Checkpointer (the checkpoint schedule, the staging folder, keep-latest-k), and the grid / validation writers.
The command line, signals and exit codes are stages/train.py's.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import checkpoint as ckpt
from pipeline.config import Config
from pipeline.data.loader import make_loader, plan_subset, resolve_shards, to_model_input, to_uint8
from pipeline.errors import Diverged, UserError
from pipeline.io import atomic_write_text
from pipeline.losses import FirstStageObjective
from pipeline.metrics.evaluator import Evaluator
from pipeline.models import build_autoencoder, compile_blocks, is_vq, last_decoder_layer, run_autoencoder
from pipeline.train.ema import EMA
from pipeline.train.module import TrainableAutoencoder, save_grid
from pipeline.train.schedules import base_learning_rate, lr_factor
from stages.common import all_reduce, print0, resolve_mixed_precision


@dataclass
class State:
    step: int = 0
    bad_steps: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0  # all non-finite steps skipped so far
    samples: int = 0
    last_checkpoint: str = ""
    stop_requested: bool = False
    history: list = field(default_factory=list)  # (step, loss) at each log point, for the summary

    def trainer_json(self, world_size: int, ema_step: int | None = None) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "samples": self.samples,
                "world_size": world_size, "ema_step": ema_step, "time": time.time()}


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

    def training_state(self) -> dict:
        """Everything a checkpoint holds, as state dicts (pipeline.checkpoint names the files)."""
        acc = self.accelerator
        objective = {k: v for k, v in self.objective.state_dict().items() if not k.startswith("perceptual.")}
        return {
            "autoencoder": self.unwrapped.vae.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "objective": objective,
            "optimizer": self.opt.state_dict(),
            "optimizer_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "schedulers": {"sched": self.sched.state_dict(),
                           "sched_d": self.sched_d.state_dict() if self.sched_d is not None else None},
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "rng": ckpt.rng_state(),
            "config": self.cfg,
            "trainer": self.state.trainer_json(acc.num_processes, self.ema.step if self.ema is not None else None),
        }


# ----------------------------------------------------------------------------------------------------- build
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
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True)],
        cpu=not torch.cuda.is_available(),
    )


def make_optimizer(params, lr: float, cfg: Config):
    params = [p for p in params if p.requires_grad]
    fused = torch.cuda.is_available()  # one kernel per step instead of one per tensor
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                             fused=fused or None)


def make_scheduler(opt, cfg: Config):
    """Warm-up, then constant or cosine. Its position is saved in the checkpoint (a resumed run continues it)."""
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.lr_schedule))


def find_resume(cfg: Config, resume: str | None) -> Path | None:
    if resume == "auto":
        return ckpt.find_resume_path(cfg.output_dir)
    if resume and not ckpt.is_checkpoint(resume):
        raise UserError(f"--resume {resume}: not a complete checkpoint folder")
    return Path(resume) if resume else None


def build(cfg: Config, resume: str | None) -> Trainer:
    """Build model, objective, optimisers, data; restore a checkpoint; prepare with accelerate (once)."""
    run_dir = Path(cfg.output_dir)
    train_urls = resolve_shards(cfg.data.train)  # cheap checks first: a user mistake before any model is built
    if cfg.data.val:
        resolve_shards(cfg.data.val)
    resume_path = find_resume(cfg, resume)

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
    sched = make_scheduler(opt, cfg)
    sched_d = make_scheduler(opt_d, cfg) if opt_d is not None else None  # counts from the step the GAN starts

    if torch.cuda.is_available() and cfg.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        compile_blocks(vae)
    objective.to(accelerator.device)
    if torch.cuda.is_available() and cfg.train.channels_last:  # LPIPS and D see channels_last images: match them
        objective.to(memory_format=torch.channels_last)
    # The discriminator stays outside DDP (it runs twice per backward: real and fake); its gradients are averaged
    # across ranks by average_across_ranks(), as are the learned log-variance's.
    if opt_d is not None:
        module, opt, opt_d = accelerator.prepare(module, opt, opt_d)
    else:
        module, opt = accelerator.prepare(module, opt)
    if ema is not None:
        ema.to(accelerator.device)

    tr = Trainer(cfg, run_dir, accelerator, module, objective, disc, opt, opt_d, sched, sched_d, ema, None, State())
    if resume_path is not None:
        restore(tr, resume_path)
    tr.loader = make_loader(
        train_urls, "train", cfg.train.batch_size, cfg.data.num_workers, resolution=cfg.data.resolution,
        crop=cfg.data.crop, flip=cfg.data.flip, scale=tuple(cfg.data.random_resized_scale),
        shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, epoch=tr.state.step,  # a resumed run draws a fresh stream
        pin_memory=torch.cuda.is_available(), max_bad_samples=cfg.data.max_bad_samples,
    )
    if cfg.data.val:
        val_urls, val_limits, _ = plan_subset(cfg.data.val, cfg.train.val_samples)
        tr.val_loader = lambda: make_loader(  # noqa: E731 (rebuilt for each validation: eval streams end)
            val_urls, "eval", cfg.evaluate.batch_size, cfg.data.num_workers, resolution=cfg.data.resolution,
            rank=accelerator.process_index, world_size=accelerator.num_processes, limits=val_limits,
        )
        tr.fixed_batch = next(iter(tr.val_loader()))["image"][:8].clone()  # the grid shows held-out images
    return tr


def restore(tr: Trainer, path: Path) -> None:
    acc = tr.accelerator
    saved = ckpt.load_training_checkpoint(path, acc.process_index)
    own = tr.unwrapped.vae.state_dict()
    for k, v in saved["autoencoder"].items():
        if k in own and own[k].shape != v.shape:
            raise UserError(f"--resume {path}: {k} has shape {tuple(v.shape)} in the checkpoint but "
                            f"{tuple(own[k].shape)} in the config's model; resume with the run's own config")
    tr.unwrapped.vae.load_state_dict(saved["autoencoder"], strict=True)
    tr.objective.load_state_dict(saved["objective"] or {}, strict=False)
    if tr.ema is not None and saved["ema"] is not None:
        tr.ema.load_state_dict(saved["ema"])
        # checkpoints from before the warm-up have no ema_step: their EMA is past it
        tr.ema.step = saved["trainer"].get("ema_step") or saved["trainer"]["step"] // tr.cfg.train.ema_every
    tr.opt.load_state_dict(saved["optimizer"])
    if tr.opt_d is not None and saved["optimizer_d"] is not None:
        tr.opt_d.load_state_dict(saved["optimizer_d"])
    schedulers = saved["schedulers"] or {}
    if schedulers.get("sched") is not None:
        tr.sched.load_state_dict(schedulers["sched"])
    if tr.sched_d is not None and schedulers.get("sched_d") is not None:
        tr.sched_d.load_state_dict(schedulers["sched_d"])
    if acc.scaler is not None and saved["scaler"] is not None:
        acc.scaler.load_state_dict(saved["scaler"])
    if saved["rng"] is not None:
        ckpt.set_rng_state(saved["rng"])
    meta = saved["trainer"]
    tr.state.step, tr.state.skipped_steps, tr.state.samples = meta["step"], meta["skipped_steps"], meta["samples"]
    tr.state.last_checkpoint = str(path)


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
            average_across_ranks([p.grad for p in tr.objective.generator_parameters()])
        grad_norm = _grad_norm(tr.opt, cfg.train.grad_clip, acc)
        bad_loss = ~torch.isfinite(loss.detach()) | ~torch.isfinite(terms["loss"])
        bad = ~torch.isfinite(grad_norm) | bad_loss
        terms["grad_norm"] = grad_norm

    if gan:
        with acc.autocast():
            d_loss, d_terms = tr.objective.discriminator_loss(x, out.reconstruction, step)
        acc.backward(d_loss)
        if acc.sync_gradients:
            d = tr.objective.discriminator
            average_across_ranks([p.grad for p in disc_params] + [b for b in d.buffers() if b.is_floating_point()])
        d_norm = _grad_norm(tr.opt_d, cfg.train.grad_clip, acc)
        bad = bad | ~torch.isfinite(d_norm)
        terms.update(d_terms)
        terms["grad_norm_d"] = d_norm
    return terms, bad, bad_loss


def average_across_ranks(tensors: list) -> None:
    """Average tensors that live outside DDP (gradients of the discriminator and learned log-variance, BatchNorm
    running statistics) across ranks in place, in one flat all-reduce, so every rank stays identical."""
    tensors = [t for t in tensors if t is not None]
    for t, mean in zip(tensors, all_reduce(tensors, "mean")):
        t.copy_(mean)


def _grad_norm(opt, clip: float, acc) -> torch.Tensor:
    """Global grad norm (unscaled under fp16), clipped to `clip` when > 0, once gradients are complete."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not params or not acc.sync_gradients:
        return torch.zeros((), device=acc.device)
    if acc.scaler is not None:  # fp16: unscale this optimizer only (accelerate's clip unscales all of them)
        acc.unscale_gradients(optimizer=opt)
    return torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))


def accumulate(tr: Trainer, data) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """grad_accum micro-steps: (last terms, any non-finite loss or gradient, any non-finite loss)."""
    bad = torch.zeros((), dtype=torch.bool, device=tr.accelerator.device)
    bad_loss = bad.clone()
    for _ in range(tr.cfg.train.grad_accum):
        batch = next(data)
        if tr.fixed_batch is None:
            tr.fixed_batch = batch["image"][:8].clone()
        terms, micro_bad, micro_bad_loss = train_step(tr, batch["image"])
        bad, bad_loss = bad | micro_bad, bad_loss | micro_bad_loss
    return terms, bad, bad_loss


def agree(tr: Trainer, *flags: torch.Tensor | bool) -> list[bool]:
    """The one host sync per step: every rank gets the max of each flag over all ranks."""
    dev = tr.accelerator.device
    t = torch.stack([torch.as_tensor(f, device=dev).float().reshape(()) for f in flags])
    return [bool(v) for v in all_reduce([t], "max")[0].tolist()]


def apply_or_skip(tr: Trainer, bad: torch.Tensor, bad_loss: torch.Tensor, stop: bool) -> tuple[bool, bool, bool]:
    """All ranks agree whether to step (finite loss and grads), whether the loss itself was non-finite, and
    whether to stop (SIGTERM). Returns (stepped, loss non-finite, stop)."""
    bad_any, loss_bad, stop_any = agree(tr, bad, bad_loss, stop)
    gan = tr.objective.gan_active(tr.state.step)
    if bad_any:
        if tr.accelerator.scaler is not None:  # fp16: let the scaler see the overflow, skip, lower the loss scale
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


def advance(tr: Trainer) -> None:
    """Bookkeeping of a step that was taken: count it, update the EMA on its schedule."""
    st, cfg = tr.state, tr.cfg
    st.bad_steps = 0
    st.step += 1
    st.samples += cfg.train.batch_size * cfg.train.grad_accum * tr.accelerator.num_processes
    if tr.ema is not None and st.step % cfg.train.ema_every == 0:
        tr.ema.update(tr.unwrapped.vae)


# ------------------------------------------------------------------------------------------------ duties
class NonFiniteGuard:
    """Counts skipped steps; stops the run after train.max_bad_steps non-finite steps in a row (fp16 gradient
    overflow, which the loss scaler handles, is retried without counting)."""

    def __init__(self, tr: Trainer):
        self.tr = tr

    def retry(self, stepped: bool, loss_bad: bool) -> bool:
        """After apply_or_skip: True when the step must simply be run again."""
        st, tr = self.tr.state, self.tr
        if stepped:
            return False
        st.skipped_steps += 1
        if tr.accelerator.scaler is not None and not loss_bad:
            return True
        st.bad_steps += 1
        print0(f"train: step {st.step}: non-finite loss or gradient, step skipped "
               f"({st.bad_steps} in a row, {st.skipped_steps} in all)")
        if st.bad_steps >= tr.cfg.train.max_bad_steps:
            raise Diverged(f"{st.bad_steps} non-finite steps in a row at step {st.step}; last good checkpoint: "
                           f"{st.last_checkpoint or 'none yet'} (resume with --resume auto after lowering train.lr "
                           f"or changing the loss)")
        return True


class Logbook:
    """Averages the terms of the steps since the last log point and sends them, every train.log_every steps, to the
    trackers and metrics.jsonl (one host sync per log interval). On resume, rows of steps after the checkpoint
    (which will be redone) are dropped from metrics.jsonl."""

    def __init__(self, tr: Trainer):
        self.tr, self.pending = tr, []
        self.path = tr.run_dir / "metrics.jsonl"
        self.t0, self.step0 = time.time(), tr.state.step
        if tr.accelerator.is_main_process and self.path.is_file():
            rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in rows if json.loads(ln).get("step", 0) <= tr.state.step]
            if len(kept) != len(rows):
                atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def add(self, terms: dict) -> None:
        self.pending.append(terms)

    def images_per_second(self) -> float:
        t = self.tr
        return (t.state.step - self.step0) * t.cfg.train.batch_size * t.cfg.train.grad_accum * \
            t.accelerator.num_processes / max(time.time() - self.t0, 1e-9)

    def maybe_log(self, bar) -> None:
        tr = self.tr
        if tr.state.step % tr.cfg.train.log_every or not self.pending:
            return
        pending, self.pending = self.pending, []
        keys = [k for k in pending[-1] if pending[-1][k].numel() == 1]
        means = torch.stack([torch.stack([t[k].float().reshape(()).to(tr.accelerator.device) for k in keys])
                             for t in pending if all(k in t for k in keys)]).mean(0).tolist()
        scalars = {f"train/{k}": v for k, v in zip(keys, means)}
        if "kl_per_channel" in pending[-1]:
            for c, v in enumerate(pending[-1]["kl_per_channel"].tolist()):
                scalars[f"kl_per_channel/{c}"] = v
        scalars["train/lr"] = tr.opt.param_groups[0]["lr"]
        scalars["train/images_per_second"] = self.images_per_second()
        scalars["train/skipped_steps"] = tr.state.skipped_steps
        if is_vq(tr.unwrapped.vae):
            scalars["train/codebook_usage"] = tr.unwrapped.vae.quantize.usage().item()
        if torch.cuda.is_available():
            scalars["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        tr.accelerator.log(scalars, step=tr.state.step)
        tr.state.history.append((tr.state.step, scalars["train/loss"]))
        if tr.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": tr.state.step, **scalars}) + "\n")
        bar.set_postfix(loss=f"{scalars['train/loss']:.4g}", img_s=f"{scalars['train/images_per_second']:.1f}",
                        lr=f"{scalars['train/lr']:.2e}")


class Checkpointer:
    """Saves every train.checkpoint_every steps and at the last step: each rank writes its part into a staging
    folder, which the main process renames when all are done, then prunes to train.keep_checkpoints."""

    def __init__(self, tr: Trainer):
        self.tr = tr

    def maybe_save(self) -> None:
        st, t = self.tr.state, self.tr.cfg.train
        if st.step % t.checkpoint_every == 0 or st.step == t.max_steps:
            self.save()

    def save(self) -> Path:
        tr, acc = self.tr, self.tr.accelerator
        staging, final = ckpt.staging_dir(tr.run_dir, tr.state.step), ckpt.checkpoint_dir(tr.run_dir, tr.state.step)
        if acc.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            ckpt.save_training_checkpoint(staging, tr.training_state(), acc.process_index, acc.is_main_process)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a failed save (a full disk) leaves nothing behind
            raise
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.commit_checkpoint(staging, final)
            ckpt.prune_checkpoints(tr.run_dir, tr.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        tr.state.last_checkpoint = str(final)
        return final


@torch.no_grad()
def write_grid(tr: Trainer) -> None:
    """Reconstructions of a fixed held-out batch (data.val when given, else the first training batch)."""
    if tr.fixed_batch is None or not tr.accelerator.is_main_process:
        return
    module = tr.unwrapped
    was_training = module.training
    module.eval()
    x = to_model_input(tr.fixed_batch, tr.accelerator.device)
    with tr.accelerator.autocast():
        rec = run_autoencoder(module.vae, x, sample_posterior=False).reconstruction
    module.train(was_training)  # through the wrapper: a frozen encoder side stays in eval mode
    grid = save_grid(tr.fixed_batch, to_uint8(rec), tr.run_dir / "samples" / f"step-{tr.state.step:08d}.png")
    for tracker in tr.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("reconstructions", grid, tr.state.step, dataformats="HWC")


@torch.no_grad()
def validate(tr: Trainer) -> dict:
    """The evaluate stage's metrics (PSNR, SSIM, LPIPS when the objective has it, KL, active units, codebook use;
    no likelihood bounds) on the first train.val_samples held-out samples, split across ranks."""
    acc, module, cfg = tr.accelerator, tr.unwrapped, tr.cfg
    perceptual = {cfg.loss.perceptual.net: tr.objective.perceptual} if tr.objective.perceptual is not None else {}
    opts = replace(cfg.evaluate, likelihood_samples=0, num_samples=cfg.train.val_samples)
    ev = Evaluator(module.vae, opts, perceptual, cfg.data.resolution, acc.device)
    was_training = module.training
    module.eval()
    for batch in tr.val_loader():
        ev.add(batch["image"], batch["__key__"])
    module.train(was_training)  # through the wrapper: a frozen encoder side stays in eval mode
    res = ev.finalize(lambda tensors: all_reduce(tensors, "sum", acc.device))
    metrics = {"val/psnr": res["psnr"], "val/ssim": res["ssim"]}
    metrics.update({f"val/lpips_{k}": res[f"lpips_{k}"] for k in perceptual})
    if "kl_per_sample" in res:
        metrics["val/kl"] = res["kl_per_sample"]
        metrics["val/active_units"] = res["active_units"]["active_units"]
    if "codebook" in res:
        metrics["val/codebook_usage"] = res["codebook"]["usage"]
    acc.log(metrics, step=tr.state.step)
    print0(f"validate: step {tr.state.step}, {res['samples']} samples: "
           + ", ".join(f"{k[4:]} {v:.4g}" for k, v in metrics.items()))
    return metrics


def periodic(tr: Trainer, log: Logbook, saver: Checkpointer, bar) -> None:
    """The duties due after a step that was taken, each on its own schedule."""
    t = tr.cfg.train
    log.maybe_log(bar)
    if tr.state.step % t.image_every == 0:
        write_grid(tr)
    if tr.val_loader is not None and tr.state.step % t.val_every == 0:
        validate(tr)
    saver.maybe_save()


# ------------------------------------------------------------------------------------------------ fit
def fit(tr: Trainer, stop: threading.Event) -> State:
    """Steps until train.max_steps, or until a SIGTERM (`stop`) that every rank agrees on: then save and return."""
    bar = tqdm(total=tr.cfg.train.max_steps, initial=tr.state.step, unit="step", dynamic_ncols=True, desc="train",
               disable=True if not tr.accelerator.is_main_process else None)  # None: off when not a terminal
    try:
        return _steps(tr, stop, bar)
    finally:
        bar.close()


@contextlib.contextmanager
def worker_deaths_deferred():
    """torch's SIGCHLD handler raises 'DataLoader worker ... is killed' wherever the main process happens to be
    (inside optimizer.step, say). Hold it back to the end of the block, where a stop can be handled cleanly."""
    pending: list = []
    previous = signal.signal(signal.SIGCHLD, lambda *a: pending.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)
        if pending and callable(previous):
            previous(*pending[0])


def _steps(tr: Trainer, stop: threading.Event, bar) -> State:
    st = tr.state
    log, guard, saver = Logbook(tr), NonFiniteGuard(tr), Checkpointer(tr)
    st.stop_requested = agree(tr, stop.is_set())[0]  # a SIGTERM during start-up: requeue before any step
    data = iter(tr.loader)
    tr.model.train()
    while st.step < tr.cfg.train.max_steps and not st.stop_requested:
        try:
            terms, bad, bad_loss = accumulate(tr, data)
            with worker_deaths_deferred():  # the update, its bookkeeping and a save are never cut in half
                stepped, loss_bad, st.stop_requested = apply_or_skip(tr, bad, bad_loss, stop.is_set())
                if guard.retry(stepped, loss_bad):
                    continue
                advance(tr)
                log.add(terms)
                bar.update(1)
                periodic(tr, log, saver, bar)
        except RuntimeError:
            if not stop.is_set():  # SLURM signals every process: loader workers may die before the step ends;
                raise  # the step in flight is dropped and the last completed one is saved
            st.stop_requested = True
            break
    if st.stop_requested and st.step > 0 and st.last_checkpoint != str(ckpt.checkpoint_dir(tr.run_dir, st.step)):
        saver.save()
    return st
