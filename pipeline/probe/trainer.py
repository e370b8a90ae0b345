"""ProbeTrainer: the generation probe's diffusion transformer, trained with the train stage's conventions.

  tr = ProbeTrainer(cfg, accelerator, resume="auto")   # cfg.probe: the latents and the transformer; cfg.train: the
  state = tr.fit(stop)                                 # schedule, optimizer, EMA, checkpoints, precision

It reads the latent shards with LatentDataset (what a user's diffusion trainer sees: the manifest's normalisation,
fresh posterior noise per read), and reuses the first-stage trainer's parts: the optimizer and schedule
(make_optimizer, make_scheduler), the EMA, the Checkpointer (commit protocol across ranks, keep-latest-k), the
Logbook (metrics.jsonl, progress), the NonFiniteGuard, find_resume (a second run into a run folder is refused) and
the one host sync per step that decides, on every rank alike, whether to apply a step and whether to stop.
Validation (the loss at the fixed grid of t on held-out latents, split across ranks) runs every probe.val_every
steps and at the last one, from the EMA weights when there are some; its rows go to metrics.jsonl as val/loss_t=T.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch
from torch.utils.data import DataLoader

from pipeline import checkpoint as ckpt
from pipeline.data.loader import batches
from pipeline.distributed import all_reduce, print0
from pipeline.errors import UserError
from pipeline.manifest import LATENT_FORMAT, read_manifest
from pipeline.models.posterior import key_noise
from pipeline.probe.flow import VAL_GRID, build_transformer, default_shift, noised, sample_t, velocity
from pipeline.progress import Progress
from pipeline.storage import LogMirror, as_path
from pipeline.train.duties import Checkpointer, Logbook, NonFiniteGuard
from pipeline.train.ema import EMA
from pipeline.train.schedules import base_learning_rate
from pipeline.train.trainer import State, Trainer, _grad_norm, find_resume, make_optimizer, make_scheduler, \
    worker_deaths_deferred


def latent_shape(manifest: dict, folder) -> tuple[int, int, int]:
    """The one [C, H, W] the probe trains on: continuous latents of one square shape (one-line errors otherwise)."""
    from pipeline.latents.format import KINDS

    if getattr(KINDS.get(manifest.get("store")), "integer", False):
        raise UserError(f"{folder} holds integer codes (a {manifest.get('kind')} model); the probe diffuses "
                        f"continuous latents")
    shapes = {tuple(v) for v in (manifest.get("latent_shapes") or {}).values()}
    if len(shapes) != 1:
        raise UserError(f"{folder}: the probe trains on latents of one shape; the manifest lists "
                        f"{sorted(shapes) or 'none'} (encode without buckets, or one bucket per folder)")
    (shape,) = shapes
    if len(shape) != 3 or shape[1] != shape[2]:
        raise UserError(f"{folder}: latents of shape {list(shape)}; the probe's transformer takes square [C, H, W]")
    return shape


def class_labels(batch: dict, num_classes: int, device) -> torch.Tensor | None:
    """The shards' `cls` members as class indices (class-conditional probes), or None (unconditional)."""
    if num_classes == 0:
        return None
    raw = batch.get("cls")
    if raw is None or any(c is None for c in raw):
        raise UserError(f"probe.num_classes={num_classes} but a latent sample has no `cls` member (the class of "
                        f"its image); set probe.num_classes=0 for an unconditional probe")
    labels = []
    for c in raw:
        try:
            labels.append(int(c.decode() if isinstance(c, bytes) else c))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"probe.num_classes={num_classes}: a latent sample's `cls` is not a class index "
                            f"({c!r})") from None
    outside = [c for c in labels if not 0 <= c < num_classes]
    if outside:
        raise UserError(f"a latent sample's class {outside[0]} is outside 0..{num_classes - 1} (probe.num_classes)")
    return torch.tensor(labels, device=device)


def held_out(folder, n: int, normalisation: dict | None) -> tuple[torch.Tensor, list[str], list]:
    """The first `n` latents of a folder in shard order (eval mode: noise seeded by key), with their keys and
    classes, on the CPU of every rank (so the validation numbers do not depend on the number of processes).
    `normalisation`: the training latents' (a held-out folder's own measured factors would shift its latents)."""
    from pipeline.latents import LatentDataset

    ds = LatentDataset(folder, mode="eval", rank=0, world_size=1)
    ds.normalisation = normalisation
    zs, keys, cls = [], [], []
    for s in ds:
        zs.append(s["latents"])
        keys.append(s["__key__"])
        cls.append(s.get("cls"))
        if len(zs) == n:
            break
    if not zs:
        raise UserError(f"{folder}: no latent to validate on")
    return torch.stack(zs), keys, cls


class ProbeTrainer:
    def __init__(self, cfg, accelerator, resume: str | None = None):
        from pipeline.latents import LatentDataset

        self.cfg, self.accelerator, acc, p = cfg, accelerator, accelerator, cfg.probe
        self.run_dir = as_path(cfg.output_dir)
        self.logs = LogMirror(cfg.output_dir)
        if acc.is_main_process:
            self.logs.pull("metrics.jsonl")
        self.manifest = read_manifest(p.latents, LATENT_FORMAT)
        self.shape = latent_shape(self.manifest, p.latents)
        if p.val:
            val_shape = latent_shape(read_manifest(p.val, LATENT_FORMAT), p.val)
            if val_shape != self.shape:
                raise UserError(f"probe.val {p.val}: latents of shape {list(val_shape)}, probe.latents "
                                f"{list(self.shape)}")
        if self.shape[1] % p.patch:
            raise UserError(f"probe.patch {p.patch} does not divide the latent side {self.shape[1]}")
        self.shift = p.time_shift if p.time_shift is not None else default_shift(self.shape)
        resume_path = find_resume(cfg.output_dir, resume)
        if cfg.train.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_transformer(p, self.shape[0], self.shape[1])
        self.ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        lr = base_learning_rate(cfg.train.lr, cfg.train.lr_scale, self.global_batch)
        opt = make_optimizer(model.parameters(), lr, cfg)
        self.sched = make_scheduler(opt, cfg)
        self.model, self.opt = acc.prepare(model, opt)
        if acc.process_index > 0:  # the weights are the same everywhere; each rank draws its own t and noise
            torch.manual_seed(cfg.seed + acc.process_index)
        if self.ema is not None:
            self.ema.to(acc.device)
        self.state = State()
        if resume_path is not None:
            self.load_state_dict(ckpt.load_training_checkpoint(resume_path, acc.process_index), str(resume_path))
        data = LatentDataset(p.latents, "train", cfg.train.batch_size, seed=cfg.seed, rank=acc.process_index,
                             world_size=acc.num_processes, epoch=self.state.step,  # a resumed run: a fresh stream
                             shuffle_buffer=cfg.data.shuffle_buffer)
        self.loader = DataLoader(data, batch_size=None, num_workers=0 if cfg.data.num_workers is None
                                 else cfg.data.num_workers)
        self.val = held_out(p.val or p.latents, p.val_samples, data.normalisation)
        self.curve: list[dict] = []  # validations of this run: {step, loss per t, mean}

    # the first-stage trainer's: they read only self.accelerator, self.model and self.cfg.train
    unwrapped, global_batch, agree = Trainer.unwrapped, Trainer.global_batch, Trainer.agree

    def state_dict(self) -> dict:
        acc = self.accelerator
        return {
            "transformer": self.unwrapped.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "schedulers": {"sched": self.sched.state_dict()},
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "rng": ckpt.rng_state(),
            "config": self.cfg,
            "trainer": {"step": self.state.step, "skipped_steps": self.state.skipped_steps,
                        "samples": self.state.samples, "world_size": acc.num_processes, "kind": "probe",
                        "ema_step": self.ema.step if self.ema is not None else None, "time": time.time()},
        }

    def load_state_dict(self, saved: dict, source: str = "checkpoint") -> None:
        from pipeline.weights.loading import check_shapes

        if saved.get("transformer") is None:
            raise UserError(f"{source}: not a checkpoint of the generation probe (no "
                            f"{ckpt.TENSOR_FILES['transformer']})")
        check_shapes(self.unwrapped, saved["transformer"], source, "the checkpoint", "resume with the run's own config")
        self.unwrapped.load_state_dict(saved["transformer"], strict=True)
        meta = saved["trainer"]
        if self.ema is not None and saved["ema"] is not None:
            self.ema.load_state_dict(saved["ema"])
            self.ema.step = meta["ema_step"]
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["schedulers"]["sched"])
        if self.accelerator.scaler is not None and saved["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        ckpt.set_rng_state(saved["rng"])
        self.state.step, self.state.skipped_steps, self.state.samples = meta["step"], meta["skipped_steps"], meta["samples"]
        self.state.last_checkpoint = source

    @contextlib.contextmanager
    def generator(self):
        """The transformer to validate and sample with, in eval mode for the block: the EMA weights (the raw ones
        without EMA); then its own weights and mode again."""
        net = self.unwrapped
        was_training = net.training
        net.eval()
        try:
            with self.ema.applied(net) if self.ema is not None else contextlib.nullcontext(net):
                yield net
        finally:
            net.train(was_training)

    # -------------------------------------------------------------------------------------------- a step
    def train_step(self, batch: dict) -> tuple[dict, torch.Tensor]:
        acc, p = self.accelerator, self.cfg.probe
        x0 = batch["latents"].to(acc.device)
        labels = class_labels(batch, p.num_classes, acc.device)
        t = sample_t(len(x0), p.t_sampling, p.logit_mean, p.logit_std, self.shift, acc.device)
        xt, target = noised(x0, torch.randn_like(x0), t)
        with acc.accumulate(self.model):
            with acc.autocast():
                v = velocity(self.model, xt, t, labels)
            loss = torch.nn.functional.mse_loss(v.float(), target)
            acc.backward(loss)
            grad_norm = _grad_norm(self.opt, self.cfg.train.grad_clip, acc)
        bad = ~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)
        return {"loss": loss.detach(), "grad_norm": grad_norm}, bad

    def accumulate(self, data) -> tuple[dict, torch.Tensor]:
        """train.grad_accum micro-steps: (the last one's terms, any non-finite loss or gradient)."""
        bad = torch.zeros((), dtype=torch.bool, device=self.accelerator.device)
        for _ in range(self.cfg.train.grad_accum):
            terms, micro_bad = self.train_step(next(data))
            bad = bad | micro_bad
        return terms, bad

    def apply_or_skip(self, bad: torch.Tensor, stop: bool) -> tuple[bool, bool]:
        """The one host sync per step: every rank applies the update only if all were finite, and stops if any was
        told to. Returns (stepped, stop)."""
        bad_any, stop_any = self.agree(bad, stop)
        if not bad_any:
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return not bad_any, stop_any

    def fit(self, stop: threading.Event) -> State:
        st, t, acc = self.state, self.cfg.train, self.accelerator
        bar = Progress("probe", t.max_steps, "step", initial=st.step, enabled=acc.is_main_process)
        if acc.is_main_process:
            self.logs.local.mkdir(parents=True, exist_ok=True)
        log = Logbook(self.logs.local, acc, t.log_every, self.global_batch, st.step)
        guard = NonFiniteGuard(t.max_bad_steps, acc.scaler is not None)
        saver = Checkpointer(self.run_dir, acc, t.checkpoint_every, t.max_steps, t.keep_checkpoints, self.logs.sync)
        st.stop_requested = self.agree(stop.is_set())[0]
        self.model.train()
        try:
            with batches(self.loader) as data:
                while st.step < t.max_steps and not st.stop_requested:
                    terms, bad = self.accumulate(data)
                    with worker_deaths_deferred():  # the update, its bookkeeping and a save are never cut in half
                        stepped, st.stop_requested = self.apply_or_skip(bad, stop.is_set())
                        if guard.retry(st, stepped, not stepped):
                            continue
                        self.advance(terms, log, saver, bar)
        except RuntimeError:
            if not stop.is_set():  # SLURM signals every process: loader workers may die before the step ends;
                raise  # the step in flight is dropped and the last completed one is saved
            st.stop_requested = True
        finally:
            bar.close()
        if st.stop_requested and st.step > 0 and st.last_checkpoint != str(ckpt.checkpoint_dir(self.run_dir, st.step)):
            st.last_checkpoint = str(saver.save(st.step, self.state_dict()))
        return st

    def advance(self, terms: dict, log: Logbook, saver: Checkpointer, bar) -> None:
        """A step that was taken: count it, the EMA, the log, validation and the checkpoint on their schedules."""
        st, t = self.state, self.cfg.train
        st.bad_steps, st.step, st.samples = 0, st.step + 1, st.samples + self.global_batch
        if self.ema is not None and st.step % t.ema_every == 0:
            self.ema.update(self.unwrapped)
        log.add(terms)
        bar.update(1)
        loss = log.maybe_log(st.step, {"lr": self.opt.param_groups[0]["lr"], "skipped_steps": st.skipped_steps}, bar)
        if loss is not None:
            st.history.append((st.step, loss))
        if st.step % self.cfg.probe.val_every == 0 or st.step == t.max_steps:
            row = self.validate()
            log.record(st.step, {f"val/loss_t={k}": v for k, v in row.items()})
            self.curve.append({"step": st.step, **row})
            print0(f"probe: step {st.step}, validation loss {row['mean']:.4f} (mean over t = "
                   f"{', '.join(map(str, VAL_GRID))})")
        if saver.due(st.step):
            st.last_checkpoint = str(saver.save(st.step, self.state_dict()))

    @torch.no_grad()
    def validate(self) -> dict:
        """The flow-matching loss per latent dimension at each t of VAL_GRID on the held-out latents, noise seeded by
        key and t; each rank takes every world-th latent, the sums are reduced. {t: loss, 'mean': mean over t}."""
        acc, p = self.accelerator, self.cfg.probe
        z, keys, cls = self.val
        mine = list(range(acc.process_index, len(keys), acc.num_processes))
        sums = torch.zeros(len(VAL_GRID), dtype=torch.float64, device=acc.device)
        bs = self.cfg.evaluate.batch_size
        with self.generator() as net:
            for i in range(0, len(mine), bs):
                idx = mine[i:i + bs]
                x0 = z[idx].to(acc.device)
                labels = class_labels({"cls": [cls[j] for j in idx]}, p.num_classes, acc.device)
                for k, tv in enumerate(VAL_GRID):
                    eps = key_noise([f"{keys[j]}#t={tv}" for j in idx], x0.shape[1:]).to(acc.device)
                    t = torch.full((len(idx),), tv, device=acc.device)
                    xt, target = noised(x0, eps, t)
                    with acc.autocast():
                        v = velocity(net, xt, t, labels)
                    sums[k] += ((v.float() - target) ** 2).mean(dim=(1, 2, 3)).double().sum()
        total = all_reduce([sums], "sum", acc.device)[0] / len(keys)
        row = {str(tv): float(v) for tv, v in zip(VAL_GRID, total.tolist())}
        row["mean"] = sum(row.values()) / len(VAL_GRID)
        return row
