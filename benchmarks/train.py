"""Training-step throughput: the trainer's own step against a naive fp32 loop, same model, data and device.

  python benchmarks/train.py                                   # tiny at 64x64 on the CPU
  python benchmarks/train.py --preset kl-f8 --resolution 256 --batch 8 --out benchmarks/RESULTS.md   # on a GPU
  python benchmarks/train.py --preset kl-f8 --resolution 512 --batch 4 --no-naive \\
      --variant ckpt=train.gradient_checkpointing=true --memory-limit-gb 24   # does it fit a 24 GB card?
  python benchmarks/train.py --preset kl-f8 --resolution 512 --no-naive --max-batch-gb 80   # largest batch in 80 GB
  python benchmarks/train.py --no-naive --diffusable --out benchmarks/RESULTS.md   # EQ-VAE, scale eq., alignment
  python benchmarks/train.py --rae --out benchmarks/RESULTS.md     # an RAE's decoder step (tiny-rae, 32 px)

One step is the full GAN-phase step: autoencoder forward and backward, LPIPS, the PatchGAN generator term with the
adaptive weight, the discriminator's own step, both AdamW updates and the EMA. The GAN is switched on from step 0
and LPIPS uses a randomly initialised VGG (its speed does not depend on the weights; GPU nodes are often offline).

firststage: `pipeline.train.trainer.Trainer` from the preset, then exactly what fit() runs per step (`train_step`,
`apply_or_skip`, `advance`), minus the data loader (the same pre-decoded uint8 batches feed both paths; the loader
has its own benchmark). Naive: the LDM recipe as it is usually reimplemented: fp32 (torch's default TF32 flags), no
channels_last, LPIPS and the discriminator as plain modules, the adaptive weight from two autograd.grad calls and a
full backward, the discriminator's gradients left on during the generator step, a per-tensor EMA loop and
`loss.item()` every step; for an RAE (`--rae`) the same loop around the frozen encoder's features (no gradient),
RAE's additive latent noise and the ViT decoder. Variants (`--variant NAME=key=value,key=value`) are the firststage
path with config overrides. Repeats interleave the paths; each figure is the median over repeats after a warm-up.

FLOPs are counted once per path with torch.utils.flop_counter (matrix products and convolutions, forward and
backward): "TFLOP/s" is what each path executes. The peak is a large matrix product timed in the same run (bf16 on a
GPU, fp32 on a CPU). Model FLOP utilisation counts the same work for every path, the firststage step's FLOPs per
image (the naive step executes more: its LPIPS and discriminator backward run twice): MFU = those x img/s / peak.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stages  # noqa: E402,F401,I001  (the stages' thread policy: chosen before torch is imported)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.loader import make_shards, photo_jpeg  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.images import crop_to  # noqa: E402
from pipeline.models.discriminator import PatchDiscriminator  # noqa: E402
from stages import apply_thread_policy  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def set_tf32(on: bool) -> None:
    """firststage turns TF32 matmuls on (train.tf32); torch's default (what the naive loop gets) is off."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = on


# --------------------------------------------------------------------------------------------------- paths
class Ours:
    """The trainer's step: pipeline.train.trainer.Trainer from the preset plus overrides."""

    def __init__(self, name: str, overrides: list[str], base: list[str]):
        from pipeline.train.trainer import Trainer
        from stages.train import make_accelerator

        self.name = name
        self.cfg = load_config(base[0], base[1:] + overrides)
        self.batch = self.cfg.train.batch_size
        torch.manual_seed(0)
        self.tr = Trainer(self.cfg, make_accelerator(self.cfg))
        self.device = self.tr.accelerator.device

    def step(self, images: torch.Tensor) -> None:
        set_tf32(self.cfg.train.tf32)
        _, bad, bad_loss = self.tr.train_step(images)
        stepped, _, _ = self.tr.apply_or_skip(bad, bad_loss, False)
        if not stepped:
            raise RuntimeError(f"{self.name}: non-finite step in the benchmark")
        self.tr.advance()


class Naive:
    """The LDM recipe written the plain way (see the module docstring)."""

    name = "naive"

    def __init__(self, ours: Ours):
        import lpips

        cfg = ours.cfg
        self.cfg, self.batch, self.device = cfg, ours.batch, ours.device
        self.vae = copy.deepcopy(ours.tr.unwrapped.vae).to(self.device, memory_format=torch.contiguous_format).train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` inside lpips
            self.lpips = lpips.LPIPS(net=cfg.loss.perceptual.net, pretrained=True, pnet_rand=True, verbose=False)
        self.lpips = self.lpips.to(self.device).eval().requires_grad_(False)
        a = cfg.loss.adversarial
        self.disc = PatchDiscriminator(cfg.model.in_channels, a.disc_channels, a.disc_layers).to(self.device)
        lr, betas = 1e-5, tuple(cfg.train.betas)
        self.opt = torch.optim.AdamW(self.vae.parameters(), lr=lr, betas=betas, weight_decay=0.0)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=lr, betas=betas, weight_decay=0.0)
        self.ema = {k: v.detach().clone() for k, v in self.vae.state_dict().items()}

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reconstruction, the KL term and the decoder's last weight."""
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl().sum() / x.shape[0], \
            self.vae.decoder.conv_out.weight

    def step(self, images: torch.Tensor) -> None:
        set_tf32(False)
        cfg, d = self.cfg, 0.999
        x = images.to(self.device).float() / 127.5 - 1
        rec, kl, last = self.reconstruct(x)
        pixel = (x - rec).abs() if cfg.loss.reconstruction.type == "l1" else (x - rec) ** 2  # as the preset says
        per_pixel = pixel + cfg.loss.perceptual.weight * self.lpips(x, rec)
        nll = per_pixel.sum() / x.shape[0]
        g = -self.disc(rec).mean()
        g_rec = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g, last, retain_graph=True)[0]
        w = (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()
        loss = nll + cfg.loss.kl.weight * kl + cfg.loss.adversarial.weight * w * g
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        d_loss = 0.5 * (F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(rec.detach())).mean())
        self.opt_d.zero_grad()
        d_loss.backward()
        self.opt_d.step()
        with torch.no_grad():
            for k, v in self.vae.state_dict().items():
                if v.is_floating_point():
                    self.ema[k].mul_(d).add_(v, alpha=1 - d)
        loss.item()


class NaiveRAE(Naive):
    """An RAE's decoder trained the plain way: AutoencoderRAE's own encode path (the frozen encoder under no_grad),
    RAE's additive noise (sigma ~ U(0, 0.8) per sample), the decoder, then the same loss and updates as Naive, with
    a copy of the run's discriminator (RAE's DINO one)."""

    def __init__(self, ours: Ours):
        super().__init__(ours)
        self.disc = copy.deepcopy(ours.tr.objective.discriminator).to(self.device).train()
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=1e-5, betas=tuple(self.cfg.train.betas))

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vae = self.vae
        with torch.no_grad():
            tokens = vae._encoder_forward_fn(vae.encoder, vae._resize_and_normalize((x + 1) / 2))
        tokens = tokens + 0.8 * torch.rand(tokens.shape[0], 1, 1, device=x.device) * torch.randn_like(tokens)
        rec = vae._denormalize_image(vae.decoder.unpatchify(vae.decoder(tokens).logits)) * 2 - 1
        return rec, torch.zeros((), device=x.device), vae.decoder.decoder_pred.weight


# ------------------------------------------------------------------------------------------------ measures
@dataclass
class Result:
    name: str
    batch: int
    rates: list = field(default_factory=list)  # images per second, one per repeat
    peak_bytes: int = 0
    flops: float = 0.0  # per step


def batches_for(resolution: int, batch: int, n: int = 4) -> list[torch.Tensor]:
    """n distinct uint8 batches of photo-like crops (so no cache holds a single input)."""
    side = max(resolution + resolution // 4, 80)
    out = []
    for b in range(n):
        crops = [torch.from_numpy(crop_to(photo_jpeg(side, b * batch + i), resolution, resolution)[0])
                 for i in range(batch)]
        t = torch.stack(crops).permute(0, 3, 1, 2).contiguous()
        out.append(t.pin_memory() if torch.cuda.is_available() else t)
    return out


def time_steps(path, batches: list[torch.Tensor], steps: int) -> float:
    """Images per second over `steps` steps (device synchronised at both ends)."""
    sync(path.device)
    t = time.perf_counter()
    for i in range(steps):
        path.step(batches[i % len(batches)])
    sync(path.device)
    return steps * path.batch / (time.perf_counter() - t)


def count_flops(path, batch: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        path.step(batch)
    return float(counter.get_total_flops())


def peak_flops(device) -> tuple[float, str]:
    """A large matrix product: bf16 8192^3 on a GPU, fp32 2048^3 on a CPU (what the tiny preset runs in)."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 2048, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        sync(device)
        t = time.perf_counter()
        (a @ b).sum()
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times), f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} {n}^3 matmul"


def profile_steps(path, batches, out: Path, steps: int = 5) -> None:
    """Top kernels (or CPU ops) by time over a few steps of a path, as a text table."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if path.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            path.step(batches[i % len(batches)])
        sync(path.device)
    key = "self_cuda_time_total" if path.device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=30)
    except Exception:  # newer torch names the device column self_device_time_total
        table = prof.key_averages().table(sort_by=key.replace("cuda", "device"), row_limit=30)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {path.name}: {steps} steps, top 30 by self time on the "
                   f"{'GPU' if path.device.type == 'cuda' else 'CPU'}\n\n{table}\n")
    print(f"profile of {path.name} written to {out}")


def foundation_rates(paths, batches_of, steps: int, repeats: int) -> dict[str, list]:
    """Images per second of the foundation model's own forward (loss.alignment) in each path that has one: what an
    aligned step spends beyond the autoencoder, timed alone on the same batches."""
    from pipeline.pixels import to_model_input

    out = {}
    for p in paths:
        alignment = getattr(getattr(getattr(p, "tr", None), "objective", None), "alignment", None)
        if alignment is None:
            continue
        step = lambda images: alignment.foundation(to_model_input(images, p.device))  # noqa: E731
        timed = type("Foundation", (), {"device": p.device, "batch": p.batch, "step": staticmethod(step)})
        time_steps(timed, batches_of[p.batch], 2)
        out[p.name] = [time_steps(timed, batches_of[p.batch], steps) for _ in range(repeats)]
    return out


def cost_table(paths, results: dict, foundation: dict, plain: str) -> list[str]:
    """Seconds per step of each path against the plain firststage step, and for aligned paths the cost beyond the
    foundation model's own forward, as a share of the plain step."""
    base = statistics.median(results[plain].batch / r for r in results[plain].rates)
    lines = ["", f"Cost per step against the plain step (`{plain}`); the foundation model's forward timed alone on "
             "the same batches:\n", "| path | s/step | vs plain | foundation forward (s) | extra beyond the foundation "
             "forward, share of a plain step |", "|---|---:|---:|---:|---:|"]
    for p in paths:
        if p.name == "naive":
            continue
        per_step = statistics.median(p.batch / r for r in results[p.name].rates)
        f = statistics.median(p.batch / r for r in foundation[p.name]) if p.name in foundation else None
        extra = f"{(per_step - f - base) / base:+.1%}" if f is not None else ""
        lines.append(f"| {p.name} | {per_step:.3f} | {per_step / base:.2f}x | {f'{f:.3f}' if f else ''} | {extra} |")
    return lines


def measure(paths, batches_of, steps: int, repeats: int) -> dict[str, Result]:
    results = {p.name: Result(p.name, p.batch) for p in paths}
    for p in paths:  # warm-up: allocator, cuDNN autotuning, compilation
        time_steps(p, batches_of[p.batch], 2)
    for _ in range(repeats):
        for p in paths:
            if p.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            results[p.name].rates.append(time_steps(p, batches_of[p.batch], steps))
            if p.device.type == "cuda":
                results[p.name].peak_bytes = max(results[p.name].peak_bytes, torch.cuda.max_memory_allocated())
    return results


def max_batch(base: list[str], overrides: list[str], resolution: int, limit_gb: float) -> tuple[int, list]:
    """The largest batch whose step fits in limit_gb: peak memory measured at two batches, a line through them,
    then verified by running the predicted batch (stepping down by 10% while it runs out of memory)."""
    peaks = []
    for b in (2, 4):
        torch.cuda.empty_cache()
        p = Ours(f"b{b}", overrides + [f"train.batch_size={b}"], base)
        torch.cuda.reset_peak_memory_stats()
        time_steps(p, batches_for(resolution, b, 1), 2)
        peaks.append((b, torch.cuda.max_memory_allocated()))
        del p
    (b1, m1), (b2, m2) = peaks
    per_image = (m2 - m1) / (b2 - b1)
    fixed = m1 - per_image * b1
    b = int((limit_gb * 1e9 * 0.97 - fixed) // per_image)
    tried = []
    while b >= 1:
        torch.cuda.empty_cache()
        try:
            p = Ours(f"b{b}", overrides + [f"train.batch_size={b}"], base)
            torch.cuda.reset_peak_memory_stats()
            time_steps(p, batches_for(resolution, b, 1), 2)
            tried.append((b, torch.cuda.max_memory_allocated(), "fits"))
            del p
            return b, peaks + tried
        except torch.OutOfMemoryError:
            tried.append((b, None, "out of memory"))
            p = None
            b = int(b * 0.9)
    return 0, peaks + tried


# ----------------------------------------------------------------------------------------------------- main
def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, over = text.partition("=")
    return name, [o for o in over.split(",") if o]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="")
    ap.add_argument("--resolution", type=int, default=0)
    ap.add_argument("--rae", action="store_true", help="an RAE's decoder step (default preset tiny-rae, 32 px) "
                    "against a plain loop of the same decoder")
    ap.add_argument("--dino", default="", help="with --rae: DINO ViT-S/8 weights for the discriminator (default: a "
                    "tiny random ViT, much cheaper than the real one)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=key=value,key=value: the firststage path with these overrides (repeatable)")
    ap.add_argument("--diffusable", action="store_true",
                    help="the variants of docs/diffusable-latents.md against the plain step: plain, eq (EQ-VAE), "
                         "scale (scale equivariance), align (VA-VAE alignment; a tiny random DINOv2 unless --dinov2)")
    ap.add_argument("--dinov2", default="", help="with --diffusable: DINOv2 weights for the align variant")
    ap.add_argument("--no-naive", action="store_true", help="time the firststage path(s) only")
    ap.add_argument("--profile", default="", help="write a profiler summary of the first firststage path here")
    ap.add_argument("--memory-limit-gb", type=float, default=0, help="cap this process's GPU memory (a smaller card)")
    ap.add_argument("--max-batch-gb", type=float, default=0, help="find the largest batch that fits this many GB")
    ap.add_argument("--out", default="", help="append a results section to this markdown file")
    args = ap.parse_args()
    args.preset = args.preset or ("tiny-rae" if args.rae else "tiny")
    args.resolution = args.resolution or (32 if args.rae else 64)
    if args.diffusable:
        dino = f"loss.alignment.model={args.dinov2}" if args.dinov2 else "loss.alignment.backbone=random"
        align = [f"align=loss.alignment.enabled=true,{dino}"]
        try:
            import transformers  # noqa: F401  (DINOv2 runs on it)
        except ImportError:
            print("train.py: no transformers here (pip install 'firststage[align]'): the align variant is left out")
            align = []
        args.variant = ["plain=", "eq=loss.equivariance.enabled=true",
                        "scale=loss.equivariance.enabled=true,loss.equivariance.mode=scale"] + align + args.variant
    threads = apply_thread_policy()
    cuda = torch.cuda.is_available()
    if (args.memory_limit_gb or args.max_batch_gb) and not cuda:
        sys.exit("--memory-limit-gb / --max-batch-gb need a GPU")
    cap = args.memory_limit_gb or args.max_batch_gb
    if cap:  # a smaller card: this process may hold at most `cap` GB of the GPU's memory
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 1e9 / total))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        urls = make_shards(tmp / "shards", 96, 4, per_shard=4)  # build() checks that data.train exists
        base = [args.preset, f"data.train={urls[0]}", f"data.resolution={args.resolution}",
                f"train.batch_size={args.batch}", f"output_dir={tmp / 'run'}", "train.tracker=none",
                "loss.perceptual.weight=1.0", "loss.perceptual.backbone=random", "loss.adversarial.enabled=true",
                "loss.adversarial.start_step=0", "loss.adversarial.adaptive_weight=true", "data.num_workers=0"]
        if args.rae:  # the encoder's speed does not depend on its weights (as LPIPS's above)
            base += ["model.rae.encoder.backbone=random", "loss.adversarial.generator_start_step=0"]
            base += [f"loss.adversarial.dino_model={args.dino}", "loss.adversarial.dino_backbone=pretrained"] \
                if args.dino else ["loss.adversarial.dino_backbone=random"]
        if args.max_batch_gb:
            over = parse_variant(args.variant[0])[1] if args.variant else []
            b, tried = max_batch(base, over, args.resolution, args.max_batch_gb)
            rows = ", ".join(f"batch {t[0]}: {t[1] / 2**30:.1f} GiB" if t[1] else f"batch {t[0]}: {t[2]}"
                             for t in tried)
            line = (f"largest {args.preset} {args.resolution}px batch within {args.max_batch_gb:g} GB "
                    f"({' '.join(over) or 'defaults'}): {b} ({rows})")
            print(line)
            write_section(args, [f"`{command_line()}`\n", line], threads)
            sys.exit(0 if b > 0 else 1)

        warnings.filterwarnings("ignore", message=".*randomly initialised backbone.*")
        variants = [parse_variant(v) for v in args.variant] or [("firststage", [])]
        ours = [Ours(name, over, base) for name, over in variants]
        paths = ([] if args.no_naive else [(NaiveRAE if args.rae else Naive)(ours[0])]) + ours
        batches_of = {p.batch: batches_for(args.resolution, p.batch) for p in paths}
        results = measure(paths, batches_of, args.steps, args.repeats)
        foundation = foundation_rates(paths, batches_of, args.steps, args.repeats)
        for p in paths:  # a compiled path does the same work as the eager one (and the counter would recompile it)
            compiled = isinstance(p, Ours) and p.cfg.train.compile
            results[p.name].flops = (results[ours[0].name].flops * p.batch / ours[0].batch if compiled
                                     else count_flops(p, batches_of[p.batch][0]))
        peak, peak_what = peak_flops(paths[0].device)
        if args.profile:
            profile_steps(ours[0], batches_of[ours[0].batch], Path(args.profile))

    device = paths[0].device
    where = torch.cuda.get_device_name() if cuda else f"CPU, {threads} threads"
    header = "| path | batch | img/s (median) | vs naive | GFLOP/step | TFLOP/s | MFU | peak GiB/image |"
    lines = [f"`{command_line()}`: {args.repeats} interleaved repeats of {args.steps} steps after a warm-up; "
             f"peak {peak / 1e12:.1f} TFLOP/s ({peak_what}, measured in the same run).\n", header,
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    naive = results.get("naive")
    model_flops = results[ours[0].name].flops / ours[0].batch  # per image
    for p in paths:
        r = results[p.name]
        rate = statistics.median(r.rates)
        ratio = (f"{statistics.median(a / b for a, b in zip(r.rates, naive.rates)):.2f}x" if naive else "")
        flop_rate = r.flops * rate / r.batch
        mem = f"{r.peak_bytes / r.batch / 2**30:.2f}" if device.type == "cuda" else "n/a"
        lines.append(f"| {p.name} | {r.batch} | {rate:.1f} | {ratio} | {r.flops / 1e9:.1f} | "
                     f"{flop_rate / 1e12:.2f} | {model_flops * rate / peak:.1%} | {mem} |")
    if len(ours) > 1:
        lines += cost_table(paths, results, foundation, ours[0].name)
    print(f"train {args.preset} {args.resolution}px on {where}")
    print("\n".join(lines[1:]))
    write_section(args, lines, threads)


def command_line() -> str:
    return "python benchmarks/train.py " + " ".join(sys.argv[1:])


def write_section(args, lines: list[str], threads: int) -> None:
    if not args.out:
        return
    if torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()}"
    else:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        where = f"CPU, {cpu}, {os.cpu_count()} cores, {threads} threads"
    commit = os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip() or "?"
    head = f"\n## Train step throughput ({date.today().isoformat()}, {where}, torch {torch.__version__}, commit {commit})\n"
    with open(args.out, "a") as f:
        f.write("\n".join([head] + lines) + "\n")


if __name__ == "__main__":
    main()
