"""The first-stage trainer: one object that builds everything, saves and restores all of it, and fits.

  tr = Trainer(cfg, accelerator, resume="auto")      # the Accelerator is the train stage's (CPU .. N nodes x 8 GPUs)
  state = tr.fit(stop)                               # stop: a threading.Event a SIGTERM handler sets

`state_dict()` and `load_state_dict()` sit side by side: a checkpoint (pipeline.checkpoint) holds exactly what
state_dict() returns and restores through load_state_dict(). One optimizer step is `step()`: grad_accum micro-steps
of the autoencoder (and of the discriminator once it has started), then one host sync in which every rank agrees
whether to apply it (finite loss and gradients) and whether to stop (SIGTERM). The periodic duties are
pipeline.train.duties.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline.config import Config, config_from_dict, config_to_dict, merge_dicts, parse_overrides
from pipeline.data.loader import batches, make_loader, plan_subset
from pipeline.distributed import all_reduce
from pipeline.errors import UserError
from pipeline.storage import LogMirror, as_path
from pipeline.storage.paths import same_place
from pipeline.losses import FirstStageObjective
from pipeline.losses.equivariance import draw_plan
from pipeline.models.autoencoder import build_autoencoder, family_of
from pipeline.models.foundation import dino_source, foundation_source
from pipeline.pixels import to_model_input
from pipeline.progress import Progress
from pipeline.sources import resolve_sources
from pipeline.train.duties import Checkpointer, GridWriter, Logbook, NonFiniteGuard, Validator
from pipeline.train.ema import EMA
from pipeline.train.module import TrainableAutoencoder
from pipeline.train.schedules import base_learning_rate, lr_factor
from pipeline.weights import Weights, resolve_weights
from pipeline.weights.discriminator import read as read_objective_part
from pipeline.weights.loading import check_shapes, load_state


@dataclass
class State:
    step: int = 0
    bad_steps: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0  # all non-finite steps skipped so far
    samples: int = 0
    last_checkpoint: str = ""
    stop_requested: bool = False
    history: list = field(default_factory=list)  # (step, loss) at each log point, for the summary


def find_resume(output_dir: str, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint of the run folder (None: a fresh start); a path: that checkpoint.
    A run folder that holds another run (a complete checkpoint, or the logs of a run that saved none) is never
    started over: without `auto` (or a checkpoint of that folder) the run is refused in one line, before anything
    is written, since a fresh start would replace its metrics.jsonl and config.yaml and prune its checkpoints."""
    if resume == "auto":
        return ckpt.find_resume_path(output_dir)
    if resume and not ckpt.is_checkpoint(resume):
        raise UserError(f"{resume}: not a complete checkpoint folder")
    path = as_path(resume) if resume else None
    held = ckpt.find_resume_path(output_dir)
    inside = path is not None and same_place(path).startswith(same_place(as_path(output_dir) / ckpt.CHECKPOINTS) + "/")
    if held is not None and not inside:
        step = ckpt.read_trainer_state(held).get("step")
        raise UserError(f"output_dir {output_dir} holds a run at step {step} ({held.name}): --resume auto continues "
                        f"it; choose another output_dir")
    if held is None and path is None and (as_path(output_dir) / "metrics.jsonl").exists():
        raise UserError(f"output_dir {output_dir} holds the logs (metrics.jsonl) of a run that saved no checkpoint: "
                        f"--resume auto starts it again there; choose another output_dir")
    return path


def resolve_init(cfg: Config):
    """train.init_from's weights, resolved once (a run folder's newest checkpoint is pinned), or None."""
    if not cfg.train.init_from:
        return None
    init = resolve_weights(cfg.train.init_from)
    if init.format == "encoder-only":
        raise UserError(f"train.init_from {cfg.train.init_from}: an encoder-only export has no decoder to train; "
                        f"use the full model")
    return init


@dataclass
class Initial:
    """train.init_from's weights read once in this process: `weights` as resolve_init gave them, the `model` they
    were loaded into (eval mode) and the Config that came with it. The shape of the run and its initial model both
    come from it; nothing reads the weights file again."""

    weights: Weights
    model: torch.nn.Module
    config: Config


def load_init(cfg: Config, init: Weights | None = None) -> Initial | None:
    """train.init_from's weights (resolved here unless given), built and read once; None without train.init_from."""
    init = init or resolve_init(cfg)
    if init is None:
        return None
    model, own = init.load()
    return Initial(init, model, own)


def shape_from_init(cfg: Config, explicit: list[str] = (), initial: Initial | None = None) -> Config:
    """train.init_from brings the model's shape: the run's model section becomes the preset's with the weights' own
    shape on top (their family, widths, latent channels, normalisation; model.diffusers for a class the model.*
    keys cannot describe), and the model.* keys given explicitly (`explicit`: the command line's key=value) on top
    of that, so a shape the user asked for that the weights do not have is named by the load, tensor and shapes.
    `initial`: the weights as load_init read them (read here when not given)."""
    initial = initial or load_init(cfg)
    if initial is None:
        return cfg
    model = initial.model
    section = family_of(model).model_section(model)
    mine = config_to_dict(cfg)["model"]
    if section.get("diffusers") or section["kind"] != mine["kind"]:
        mine = {k: v for k, v in mine.items() if k in ("codebook", "init_logvar")}  # training knobs only
    shaped = merge_dicts(merge_dicts(mine, section), parse_overrides(list(explicit)).get("model", {}))
    return config_from_dict(merge_dicts(config_to_dict(cfg), {"model": shaped}))


def _same_modules(model, cfg: Config) -> bool:
    """Whether `model` is made of the modules the run's model section builds (their classes, and the diffusers config,
    sample size included), compared with that model built on the meta device: a diffusers VQModel folder loads with
    diffusers' own quantizer, where the run trains firststage's (EMA codebook, restarts)."""
    from pipeline.models.families import plain_config

    try:
        with torch.device("meta"):
            built = build_autoencoder(cfg.model, cfg.data.resolution)
    except Exception:  # a class that cannot be built on the meta device (a .item() in its __init__): built for real
        return False
    classes = [type(m) for m in model.modules()], [type(m) for m in built.modules()]
    return classes[0] == classes[1] and plain_config(model.config) == plain_config(built.config)


def make_optimizer(params, lr: float, cfg: Config):
    params = [p for p in params if p.requires_grad]
    fused = torch.cuda.is_available()  # one kernel per step instead of one per tensor
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                             fused=fused or None)


def make_scheduler(opt, cfg: Config):
    """Warm-up, then constant or cosine. Its position is saved in the checkpoint (a resumed run continues it)."""
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.lr_schedule,
                                                                   t.final_lr_ratio))


class Trainer:
    def __init__(self, cfg: Config, accelerator, resume: str | None = None, init: Initial | None = None):
        """Everything a run needs, built and (with `resume`) restored; prepared with accelerate once. `init`:
        train.init_from as load_init read it (read here when not given)."""
        self.cfg, self.accelerator, acc = cfg, accelerator, accelerator
        self.run_dir = as_path(cfg.output_dir)
        # metrics.jsonl, samples/ and TensorBoard's logs/ are appended locally, uploaded at checkpoints when the
        # run folder is on object storage (LogMirror); a resumed run continues the run folder's metrics.jsonl
        self.logs = LogMirror(cfg.output_dir)
        if acc.is_main_process:
            self.logs.pull("metrics.jsonl")
        pipes = cfg.data.allow_pipe
        train_urls = resolve_sources(cfg.data.train, pipes)  # cheap checks first: a user mistake before any model is built
        val_sources = resolve_sources(cfg.data.val, pipes) if cfg.data.val else None
        if cfg.loss.alignment.enabled and cfg.loss.alignment.backbone == "pretrained":
            foundation_source(cfg.loss.alignment.model)  # missing DINOv2 weights: one line, before anything is built
        if not cfg.train.init_from:
            cfg.model.family.check_initialise(cfg)  # and what a new model's pretrained parts are read from
        a = cfg.loss.adversarial
        if a.enabled and a.discriminator == "dino" and a.dino_backbone == "pretrained":
            dino_source(a.dino_model)  # and the DINO discriminator's backbone
        resume_path = find_resume(cfg.output_dir, resume)
        if cfg.train.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        ckpt.seed_rngs(cfg.seed)  # identical initial weights on every rank

        vae, init = self._initial_model(resume_path is not None, init)
        family_of(vae).check_trainable(vae)
        if cfg.train.gradient_checkpointing:
            family_of(vae).enable_gradient_checkpointing(vae)
        module = TrainableAutoencoder(vae, cfg.train.trainable, cfg.train.freeze_encoder)
        fam = family_of(vae)
        self.objective = FirstStageObjective(cfg.loss, fam.has_posterior, cfg.model.in_channels, fam.latent_channels(vae))
        self.encoder_layer = None  # where the adaptive alignment weight compares gradients
        if self.objective.alignment is not None and cfg.loss.alignment.adaptive_weight:
            self.encoder_layer = fam.last_encoder_layer(vae)
            if not self.encoder_layer.requires_grad:
                raise UserError("loss.alignment.adaptive_weight: the encoder's last layer does not train (train."
                                "trainable / train.freeze_encoder); train it, or set loss.alignment.adaptive_weight=false")
        for part, module_ in (("discriminator", self.objective.discriminator),
                              ("alignment.projection", getattr(self.objective.alignment, "projection", None))):
            if init is not None and module_ is not None and (state := read_objective_part(init.weights, part + ".")):
                load_state(module_, state, f"train.init_from {cfg.train.init_from} ({part})")  # continues, as VA-VAE's stages
        self.ema = EMA(vae, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        lr = base_learning_rate(cfg.train.lr, cfg.train.lr_scale, self.global_batch)
        lr_d = base_learning_rate(cfg.train.disc_lr or cfg.train.lr, cfg.train.lr_scale, self.global_batch)
        opt = make_optimizer(list(module.parameters()) + self.objective.generator_parameters(), lr, cfg)
        self.discriminator = self.objective.discriminator
        opt_d = make_optimizer(self.discriminator.parameters(), lr_d, cfg) if self.discriminator is not None else None
        self.sched = make_scheduler(opt, cfg)
        self.sched_d = make_scheduler(opt_d, cfg) if opt_d is not None else None  # counts from the GAN's start

        cuda_channels_last = torch.cuda.is_available() and cfg.train.channels_last
        if cuda_channels_last:
            module = module.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            family_of(vae).compile(vae)
        self.objective.to(acc.device)
        if cuda_channels_last:  # LPIPS and D see channels_last images: match them
            self.objective.to(memory_format=torch.channels_last)
        # The discriminator stays outside DDP (it runs twice per backward: real and fake); its gradients are averaged
        # across ranks by average_across_ranks(), as are the learned log-variance's.
        if opt_d is not None:
            self.model, self.opt, self.opt_d = acc.prepare(module, opt, opt_d)
        else:
            (self.model, self.opt), self.opt_d = acc.prepare(module, opt), None
        if self.ema is not None:
            self.ema.to(acc.device)
        if acc.process_index > 0:  # the weights are the same everywhere; each rank draws its own noise (posterior
            ckpt.seed_rngs(cfg.seed + acc.process_index)  # samples, latent noise, augmentations), resumed per rank

        self.state = State()
        if resume_path is not None:
            self.load_state_dict(ckpt.load_training_checkpoint(resume_path, acc.process_index), str(resume_path))
        self.loader = make_loader(
            train_urls, "train", cfg.train.batch_size, cfg.data.num_workers, resolution=cfg.data.resolution,
            crop=cfg.data.crop, flip=cfg.data.flip, scale=tuple(cfg.data.random_resized_scale),
            shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, rank=acc.process_index,
            world_size=acc.num_processes, epoch=self.state.step,  # a resumed run draws a fresh stream
            pin_memory=torch.cuda.is_available(), max_bad_samples=cfg.data.max_bad_samples, allow_pipe=pipes,
            max_member_bytes=cfg.data.max_member_bytes,
        )
        self.grid = GridWriter(self.logs.local, acc, cfg.train.image_every)
        self.validator = None
        if cfg.data.val:
            val_urls, val_limits, _ = plan_subset(val_sources, cfg.train.val_samples, pipes)
            val_loader = lambda: make_loader(  # noqa: E731 (rebuilt for each validation: eval streams end)
                val_urls, "eval", cfg.evaluate.batch_size, cfg.data.num_workers, resolution=cfg.data.resolution,
                rank=acc.process_index, world_size=acc.num_processes, limits=val_limits,
                max_member_bytes=cfg.data.max_member_bytes,
            )
            perceptual = {cfg.loss.perceptual.net: self.objective.perceptual} if self.objective.perceptual else {}
            self.validator = Validator(acc, cfg.train.val_every, cfg.train.val_samples, val_loader, cfg.evaluate,
                                       cfg.data.resolution, perceptual)
            self.grid.keep(next(iter(val_loader()))["image"])  # the grid shows held-out images

    def _initial_model(self, resuming: bool, init: Initial | None = None):
        """The autoencoder to train (from the config: see shape_from_init), with train.init_from's weights unless
        resuming (then the checkpoint's come), and those weights (their discriminator and alignment projection, when
        they have them, initialise the objective's), or None. The model train.init_from's weights were loaded into
        is the one trained when the run's model section builds the same model; otherwise the run's model is built
        and takes that model's tensors (a shape it lacks is named, tensor and shapes). The file is read once."""
        cfg = self.cfg
        if cfg.train.init_from and init is None and not resuming:
            init = load_init(cfg)
        if init is not None and init.config.model.same_model(cfg.model) and _same_modules(init.model, cfg):
            vae = init.model.float()  # as a model built from the config is, whatever the weights' dtype
        else:
            vae = build_autoencoder(cfg.model, cfg.data.resolution)
            if init is not None and not resuming:
                load_state(vae, init.model.state_dict(), f"train.init_from {cfg.train.init_from}")
        if not cfg.train.init_from and not resuming:
            family_of(vae).initialise(vae, cfg)
        return vae, None if resuming else init

    @property
    def unwrapped(self) -> TrainableAutoencoder:
        return self.accelerator.unwrap_model(self.model)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks."""
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.accelerator.num_processes

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything a checkpoint holds (pipeline.checkpoint names the files; `trainer` is its record)."""
        acc = self.accelerator
        objective = self.objective.training_state()
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
            "trainer": {"step": self.state.step, "skipped_steps": self.state.skipped_steps,
                        "samples": self.state.samples, "world_size": acc.num_processes,
                        "ema_step": self.ema.step if self.ema is not None else None, "time": time.time()},
        }

    def load_state_dict(self, saved: dict, source: str = "checkpoint") -> None:
        """The inverse of state_dict(): every part restored exactly (this rank's RNG included)."""
        check_shapes(self.unwrapped.vae, saved["autoencoder"], source, "the checkpoint",
                     "resume with the run's own config")
        self.unwrapped.vae.load_state_dict(saved["autoencoder"], strict=True)
        self.objective.load_state_dict(saved["objective"] or {}, strict=False)
        meta = saved["trainer"]
        if self.ema is not None and saved["ema"] is not None:
            self.ema.load_state_dict(saved["ema"])
            # checkpoints from before the warm-up have no ema_step: their EMA is past it
            self.ema.step = meta.get("ema_step") or meta["step"] // self.cfg.train.ema_every
        self.opt.load_state_dict(saved["optimizer"])
        if self.opt_d is not None and saved["optimizer_d"] is not None:
            self.opt_d.load_state_dict(saved["optimizer_d"])
        schedulers = saved["schedulers"] or {}
        if schedulers.get("sched") is not None:
            self.sched.load_state_dict(schedulers["sched"])
        if self.sched_d is not None and schedulers.get("sched_d") is not None:
            self.sched_d.load_state_dict(schedulers["sched_d"])
        if self.accelerator.scaler is not None and saved["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        if saved["rng"] is not None:
            ckpt.set_rng_state(saved["rng"])
        self.state.step, self.state.skipped_steps, self.state.samples = meta["step"], meta["skipped_steps"], meta["samples"]
        self.state.last_checkpoint = source

    # -------------------------------------------------------------------------------------------- a step
    def train_step(self, images: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """One micro-step (grad_accum of them make an optimizer step, via accelerate).
        Returns (terms, non-finite loss or gradient, non-finite loss)."""
        acc, cfg, step = self.accelerator, self.cfg, self.state.step
        x = to_model_input(images, acc.device)
        if torch.cuda.is_available() and cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        gan = self.objective.gan_active(step)
        disc_params = list(self.discriminator.parameters()) if self.discriminator is not None else []
        vae = self.unwrapped.vae
        fam = family_of(vae)
        plan = draw_plan(cfg.loss, x.shape, fam.downsampling_factor(vae))  # equivariance, latent noise, or None

        with acc.accumulate(self.model):
            for p in disc_params:  # the generator step reads D without training it
                p.requires_grad_(False)
            with acc.autocast():
                out = self.model(x, plan)
                loss, terms = self.objective.autoencoder_terms(x, out, step, fam.last_decoder_layer(vae), plan=plan,
                                                               encoder_layer=self.encoder_layer)
            acc.backward(loss)
            for p in disc_params:
                p.requires_grad_(True)
            if acc.sync_gradients:
                average_across_ranks([p.grad for p in self.objective.generator_parameters()])
            grad_norm = _grad_norm(self.opt, cfg.train.grad_clip, acc)
            bad_loss = ~torch.isfinite(loss.detach()) | ~torch.isfinite(terms["loss"])
            bad = ~torch.isfinite(grad_norm) | bad_loss
            terms["grad_norm"] = grad_norm

        if gan:
            real = plan.target(plan.input(x)) if plan is not None else x  # what the reconstruction was compared with
            with acc.autocast():
                d_loss, d_terms = self.objective.discriminator_terms(real, out.reconstruction)
            acc.backward(d_loss)
            if acc.sync_gradients:
                d = self.discriminator
                average_across_ranks([p.grad for p in disc_params] + [b for b in d.buffers() if b.is_floating_point()])
            d_norm = _grad_norm(self.opt_d, cfg.train.grad_clip, acc)
            bad = bad | ~torch.isfinite(d_norm)
            terms.update(d_terms)
            terms["grad_norm_d"] = d_norm
        return terms, bad, bad_loss

    def accumulate(self, data) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """grad_accum micro-steps: (last terms, any non-finite loss or gradient, any non-finite loss)."""
        bad = torch.zeros((), dtype=torch.bool, device=self.accelerator.device)
        bad_loss = bad.clone()
        for _ in range(self.cfg.train.grad_accum):
            batch = next(data)
            self.grid.keep(batch["image"])  # without held-out data, the grid shows the first training batch
            terms, micro_bad, micro_bad_loss = self.train_step(batch["image"])
            bad, bad_loss = bad | micro_bad, bad_loss | micro_bad_loss
        return terms, bad, bad_loss

    def agree(self, *flags: torch.Tensor | bool) -> list[bool]:
        """The one host sync per step: every rank gets the max of each flag over all ranks."""
        dev = self.accelerator.device
        t = torch.stack([torch.as_tensor(f, device=dev).float().reshape(()) for f in flags])
        return [bool(v) for v in all_reduce([t], "max")[0].tolist()]

    def apply_or_skip(self, bad: torch.Tensor, bad_loss: torch.Tensor, stop: bool) -> tuple[bool, bool, bool]:
        """All ranks agree whether to step (finite loss and grads), whether the loss itself was non-finite, and
        whether to stop (SIGTERM). Returns (stepped, loss non-finite, stop)."""
        bad_any, loss_bad, stop_any = self.agree(bad, bad_loss, stop)
        gan = self.objective.gan_active(self.state.step)
        if bad_any:
            if self.accelerator.scaler is not None:  # fp16: let the scaler see the overflow, skip, lower the scale
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.opt_d is not None:
                self.opt_d.zero_grad(set_to_none=True)
            return False, loss_bad, stop_any
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if gan:  # the discriminator's schedule runs from the step it starts training
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
            self.sched_d.step()
        return True, False, stop_any

    def advance(self) -> None:
        """Bookkeeping of a step that was taken: count it, update the EMA on its schedule."""
        st = self.state
        st.bad_steps = 0
        st.step += 1
        st.samples += self.global_batch
        if self.ema is not None and st.step % self.cfg.train.ema_every == 0:
            self.ema.update(self.unwrapped.vae)

    # -------------------------------------------------------------------------------------------- fit
    def fit(self, stop: threading.Event) -> State:
        """Steps until train.max_steps, or until a SIGTERM (`stop`) that every rank agrees on: then save and return."""
        bar = Progress("train", self.cfg.train.max_steps, "step", initial=self.state.step,
                       enabled=self.accelerator.is_main_process)
        try:
            return self._steps(stop, bar)
        finally:
            bar.close()

    def _steps(self, stop: threading.Event, bar) -> State:
        st, t, acc = self.state, self.cfg.train, self.accelerator
        log = Logbook(self.logs.local, acc, t.log_every, self.global_batch, st.step)
        guard = NonFiniteGuard(t.max_bad_steps, acc.scaler is not None)
        saver = Checkpointer(self.run_dir, acc, t.checkpoint_every, t.max_steps, t.keep_checkpoints, self.logs.sync)
        st.stop_requested = self.agree(stop.is_set())[0]  # a SIGTERM during start-up: requeue before any step
        self.model.train()
        try:
            with batches(self.loader) as data:  # its workers are joined when the loop ends: they may die then too
                while st.step < t.max_steps and not st.stop_requested:
                    terms, bad, bad_loss = self.accumulate(data)
                    with worker_deaths_deferred():  # the update, its bookkeeping and a save are never cut in half
                        stepped, loss_bad, st.stop_requested = self.apply_or_skip(bad, bad_loss, stop.is_set())
                        if guard.retry(st, stepped, loss_bad):
                            continue
                        self.advance()
                        log.add(terms)
                        bar.update(1)
                        self._duties(log, saver, bar)
        except RuntimeError:
            if not stop.is_set():  # SLURM signals every process: loader workers may die before the step ends;
                raise  # the step in flight is dropped and the last completed one is saved
            st.stop_requested = True
        if st.stop_requested and st.step > 0 and st.last_checkpoint != str(ckpt.checkpoint_dir(self.run_dir, st.step)):
            self._save(saver)
        return st

    def _duties(self, log: Logbook, saver: Checkpointer, bar) -> None:
        """The duties due after a step that was taken, each on its own schedule."""
        st, vae = self.state, self.unwrapped.vae
        extras = {"lr": self.opt.param_groups[0]["lr"], "skipped_steps": st.skipped_steps,
                  **family_of(vae).train_metrics(vae)}
        loss = log.maybe_log(st.step, extras, bar)
        if loss is not None:
            st.history.append((st.step, loss))
        self.grid.maybe_write(st.step, self.unwrapped)
        if self.validator is not None:
            metrics = self.validator.maybe_validate(st.step, self.unwrapped, self.ema)
            if metrics is not None:
                log.record(st.step, metrics)
        if saver.due(st.step):
            self._save(saver)

    def _save(self, saver: Checkpointer) -> None:
        self.state.last_checkpoint = str(saver.save(self.state.step, self.state_dict()))


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
