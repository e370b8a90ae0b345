"""The generation probe against the evaluate proxies: the tiny preset's latents, a plain fine-tune of it (the control:
the same extra steps) and its EQ-VAE fine-tune (eq-vae-ft's equivariance overrides on the tiny model), each probed
with probe-tiny over several seeds on the demo's photos. A one-off measurement (docs/diffusable-latents.md has the
table), not a speed benchmark.

  bash launch/demo.sh                                                   # demo/: shards/ and run/ (the tiny preset)
  python benchmarks/probe_eqvae.py --demo demo --work /tmp/eqprobe --steps 500 --seeds 0,1,2

Each model encodes the training photos' 64x64 tiles (with flips) and the held-out tiles; evaluate measures the
held-out PSNR and the diffusability proxies (equivariance PSNR, the latent's high-frequency share); the probe trains
on the training tiles' latents and is validated on the held-out tiles' (normalised as the training latents are).
The GAN of eq-vae-ft stays off: the tiny preset trains without one (and its smallest transformed image, 8 px, is
below what its PatchGAN takes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stages  # noqa: E402,F401  (the stages' thread policy: chosen before torch is imported)

from stages.encode import main as encode  # noqa: E402
from stages.evaluate import main as evaluate  # noqa: E402
from stages.probe import run as probe  # noqa: E402
from stages.train import run as train  # noqa: E402

EQ_VAE = ["loss.equivariance.enabled=true", "loss.equivariance.mode=eq-vae", "loss.equivariance.p=0.5",
          "loss.equivariance.scale_range=[8,31]", "loss.equivariance.scale_denominator=32",
          "loss.equivariance.rotations=[1,2,3]", "loss.equivariance.prior_low_res=0.25",
          "loss.equivariance.antialias=false"]  # configs/eq-vae-ft.yaml's loss.equivariance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="demo", help="a finished demo folder (shards/, run/)")
    ap.add_argument("--work", default="/tmp/eqprobe", help="folder for the fine-tunes, latents, evaluations, probes")
    ap.add_argument("--steps", type=int, default=500, help="fine-tune steps (the control and EQ-VAE alike)")
    ap.add_argument("--seeds", default="0,1,2", help="probe seeds")
    ap.add_argument("--out", help="append the table to this file")
    args = ap.parse_args()
    demo, work, seeds = Path(args.demo), Path(args.work), [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    models = {"tiny (the demo's run)": demo / "run"}
    for name, extra in ((f"+ {args.steps} plain steps (control)", []), (f"+ {args.steps} EQ-VAE steps", EQ_VAE)):
        run = work / ("eq" if extra else "plain")
        train(["--config", "tiny", f"data.train={demo / 'shards' / 'train'}", f"output_dir={run}",
               f"train.init_from={demo / 'run'}", f"train.max_steps={args.steps}", "train.tracker=none",
               "--resume", "auto", *extra])
        models[name] = run
    rows = []
    for i, (name, run) in enumerate(models.items()):
        lat = work / f"latents-{i}"
        at = ["data.resolution=64"]
        encode(["--model", str(run), "--data", str(demo / "shards" / "traintiles"), "--output", str(lat / "tiles"),
                "encode.flip=true", *at])
        encode(["--model", str(run), "--data", str(demo / "shards" / "heldout"), "--output", str(lat / "heldout"), *at])
        evaluate(["--model", str(run), "--data", str(demo / "shards" / "heldout"), "--output", str(lat / "eval"), *at])
        ev = json.loads((lat / "eval" / "eval.json").read_text())
        losses = []
        for seed in seeds:
            _, res = probe(["--config", "probe-tiny", "--latents", str(lat / "tiles"), "--val", str(lat / "heldout"),
                            "--output", str(lat / f"probe-{seed}"), f"seed={seed}", "--resume", "auto"])
            losses.append(res["val_loss"])
        d = ev["diffusability"]
        mean = [v["mean"] for v in losses]
        rows.append((name, ev["psnr"], d["equivariance_psnr"]["scale_1/2"], d["equivariance_psnr_rotations"],
                     d["high_frequency_share"], statistics.mean(mean), statistics.stdev(mean) if len(mean) > 1 else 0.0,
                     statistics.mean(v["0.5"] for v in losses), ", ".join(f"{v:.4f}" for v in mean)))
    table = ("| first stage | held-out PSNR (dB) | equivariance PSNR, 2x down (dB) | equivariance PSNR, rotations (dB) "
             "| latent high-frequency share | probe validation loss, mean over t (mean ± std, "
             f"{len(seeds)} seeds) | at t = 0.5 | per seed |\n|---|---|---|---|---|---|---|---|\n")
    table += "\n".join(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.4f} | {r[5]:.4f} ± {r[6]:.4f} | "
                       f"{r[7]:.4f} | {r[8]} |" for r in rows)
    print(table)
    print(f"probe_eqvae: {len(models)} first stages x {len(seeds)} probe seeds in {time.time() - t0:.0f}s")
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n{table}\n")


if __name__ == "__main__":
    main()
