"""The generation probe's training step against a plain loop of the same transformer, same latents and device.

  python benchmarks/probe.py --out benchmarks/RESULTS.md                           # probe-tiny on the CPU
  python benchmarks/probe.py --preset probe-b1 --shape 32,16,16 --batch 128 --out benchmarks/RESULTS.md   # a GPU

firststage: pipeline.probe.trainer.ProbeTrainer from the preset, then exactly what fit() runs per step (accumulate,
apply_or_skip: the one host sync and the update, the EMA), minus the loader (both paths take the same pre-drawn
batches; LatentDataset has its own tests). Plain: the loop people write first: the same DiTTransformer2DModel in
fp32 (torch's default TF32 flags), AdamW with default options, the gradient clipped, a per-tensor EMA loop and
`loss.item()` every step. Both draw t and noise the same way. Repeats interleave the paths; each figure is the
median over repeats after a warm-up; "vs plain" is the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stages  # noqa: E402,F401,I001  (the stages' thread policy: chosen before torch is imported)

import torch  # noqa: E402

from benchmarks.train import measure, sync  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.probe.flow import build_transformer, noised, sample_t, velocity  # noqa: E402
from stages import apply_thread_policy  # noqa: E402


class Ours:
    def __init__(self, preset: str, overrides: list[str], latents: Path, out: Path):
        from pipeline.probe.trainer import ProbeTrainer
        from stages.train import make_accelerator

        self.name = "firststage"
        self.cfg = load_config(preset, [f"probe.latents={latents}", f"output_dir={out}", "train.tracker=none",
                                        *overrides])
        self.batch = self.cfg.train.batch_size
        self.tr = ProbeTrainer(self.cfg, make_accelerator(self.cfg))
        self.device = self.tr.accelerator.device
        self.tr.model.train()

    def step(self, z: torch.Tensor) -> None:
        tr = self.tr
        terms, bad = tr.accumulate(iter([{"latents": z}] * self.cfg.train.grad_accum))
        if tr.apply_or_skip(bad, False)[0] and tr.ema is not None:
            tr.ema.update(tr.unwrapped)


class Plain:
    def __init__(self, ours: Ours):
        cfg, self.p = ours.cfg, ours.cfg.probe
        self.name, self.batch, self.device, self.shift = "plain loop", ours.batch, ours.device, ours.tr.shift
        self.model = build_transformer(self.p, *ours.tr.shape[:2]).to(self.device).train()
        self.model.load_state_dict(ours.tr.unwrapped.state_dict())
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                     weight_decay=cfg.train.weight_decay)
        self.decay, self.clip = cfg.train.ema_decay, cfg.train.grad_clip

    def step(self, z: torch.Tensor) -> None:
        x0 = z.to(self.device)
        t = sample_t(len(x0), self.p.t_sampling, self.p.logit_mean, self.p.logit_std, self.shift, self.device)
        xt, target = noised(x0, torch.randn_like(x0), t)
        loss = torch.nn.functional.mse_loss(velocity(self.model, xt, t, None), target)
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        with torch.no_grad():
            for e, q in zip(self.ema.parameters(), self.model.parameters()):
                e.mul_(self.decay).add_(q, alpha=1 - self.decay)
        loss.item()


def main() -> None:
    from pipeline.probe.gaussian import write_gaussian_latents

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="probe-tiny")
    ap.add_argument("--shape", default="4,16,16", help="latent C,H,W (the demo's: 4,16,16)")
    ap.add_argument("--batch", type=int, help="per device (default: the preset's train.batch_size)")
    ap.add_argument("--steps", type=int, default=10, help="steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="append the table to this file (benchmarks/RESULTS.md)")
    ap.add_argument("overrides", nargs="*", help="config key=value for the firststage path")
    args = ap.parse_args()
    threads = apply_thread_policy()
    shape = tuple(int(v) for v in args.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="probe-bench-"))
    write_gaussian_latents(work / "latents", 64, shape)
    overrides = args.overrides + ([f"train.batch_size={args.batch}"] if args.batch else [])
    ours = Ours(args.preset, overrides, work / "latents", work / "run")
    paths = [ours, Plain(ours)]
    gen = torch.Generator().manual_seed(0)
    data = {ours.batch: [torch.randn((ours.batch, *shape), generator=gen).to(ours.device) for _ in range(4)]}
    sync(ours.device)
    res = measure(paths, data, args.steps, args.repeats)
    a, b = res[ours.name].rates, res["plain loop"].rates
    p = ours.cfg.probe
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {os.cpu_count()} cores, {threads} thread(s)"
    lines = [f"\n## Probe step ({date.today().isoformat()}, {where}, torch {torch.__version__}, commit "
             f"{os.popen('git rev-parse --short HEAD 2>/dev/null').read().strip() or '?'})\n",
             f"`python benchmarks/probe.py {' '.join(sys.argv[1:])}`: {args.preset} (depth {p.depth}, hidden "
             f"{p.hidden}, patch {p.patch}) on {list(shape)} latents, batch {ours.batch}, mixed precision "
             f"{ours.tr.accelerator.mixed_precision}; {args.repeats} repeats of {args.steps} steps\n",
             "| path | latents/s (median) | ms/step | vs plain |", "|---|---|---|---|"]
    for name, rates in ((ours.name, a), ("plain loop", b)):
        ratio = statistics.median(x / y for x, y in zip(rates, b))
        med = statistics.median(rates)
        lines.append(f"| {name} | {med:.1f} | {1000 * ours.batch / med:.1f} | {ratio:.2f}x |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
