"""firststage demo: the whole pipeline on real photographs, on a CPU, in about three and a half minutes.

scikit-image's photographs (shipped inside the package, no download): 14 for training, and two held out whole
(rocket, coffee), cut into 64x64 tiles that the model never sees in training. With --photos DIR, your own photos:
every 5th (in name order) is held out whole, the rest train, and everything goes to demo/photos-NAME/ (NAME: the
folder's name) unless --output says where: each photo set keeps its own folder, so the plain demo still resumes.
  prepare (image shards) -> train the `tiny` preset -> evaluate on the held-out photos (against the mean-colour
  baseline) and on the training photos' tiles (the generalisation gap) -> encode the training shards to latent
  shards -> export a diffusers folder -> reload it with plain diffusers and decode a latent read back from the latent
  shards -> the generation probe (probe-tiny) on the latents of the training photos' tiles, validated on the
  held-out tiles' -> demo/report.md (grid, training curves, table, the probe's decoded samples and loss)

  bash launch/demo.sh                       # set up, then this
  bash launch/demo.sh --photos ~/Pictures   # the same on your photos
  python -m stages.demo --output demo       # again: everything resumes, it takes seconds
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from pathlib import Path

from pipeline.storage import atomic_write_bytes, atomic_write_text
from stages.common import EXIT_PREEMPTED, sigterm_sets, stage_main


def decode_one_latent(export: Path, latents: Path, out: Path) -> str:
    """Plain diffusers only: the exported folder decodes a latent read back from the latent shards."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from pipeline.latents import LatentDataset
    from pipeline.pixels import to_uint8

    vae = AutoencoderKL.from_pretrained(export).eval()
    sample = next(iter(LatentDataset(latents, mode="eval", scale=False, sample=False)))
    with torch.no_grad():
        image = to_uint8(vae.decode(sample["latents"][None]).sample)[0].permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.Resampling.NEAREST).save(buf, "PNG")
    atomic_write_bytes(out, buf.getvalue())
    return sample["__key__"]


def encode(weights, data: Path, output: Path, overrides: list[str]) -> None:
    """The encode job (pipeline.latents.job), its summary printed; a SIGTERM ends it as it ends the stage (75, also
    when a read hangs: encode.sigterm_grace seconds later)."""
    from pipeline.latents.job import EncodeJob, EncodeOptions
    from stages.encode import _exit_preempted

    stop = threading.Event()
    job = EncodeJob(weights, str(data), output, options=EncodeOptions(overrides))
    grace = lambda: job.cfg.encode.sigterm_grace if job.cfg is not None else 0.0  # noqa: E731 (loaded: its config's)
    with sigterm_sets(stop, grace, lambda seconds: _exit_preempted(seconds, [])):  # a dead run's lock is taken over
        report = job.run(stop)
    print(report.summary())
    if report.stopped:
        raise SystemExit(EXIT_PREEMPTED)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", help="folder for everything the demo writes (default demo/; with --photos DIR, "
                                    "demo/photos-NAME/ with NAME the folder's name)")
    p.add_argument("--photos", metavar="DIR", help="a folder of your photos instead of scikit-image's")
    p.add_argument("--steps", type=int, help="training steps (default: the tiny preset's train.max_steps)")
    p.add_argument("--seed", type=int, default=0, help="the training run's seed (default 0)")
    p.add_argument("--subset", type=int, help="use only the first N training and N held-out photos (tests)")
    return p


@stage_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    photos_dir = Path(args.photos).expanduser() if args.photos else None
    out = Path(args.output or (f"demo/photos-{photos_dir.resolve().name or 'root'}" if photos_dir else "demo"))
    start = time.time()
    import stages
    from pipeline.data.photos import TILE, write_demo_photos
    from pipeline.machine import matmul_peak
    from pipeline.data.prepare import PrepareOptions
    from pipeline.metrics.plots import training_curves
    from pipeline.metrics.job import EvaluateJob, EvaluateOptions
    from pipeline.weights import resolve_weights
    from pipeline.weights.job import ExportJob, ExportOptions
    from stages.probe import probe
    from stages.prepare import locked_prepare
    from stages.train import train

    photos = write_demo_photos(out / "images", photos_dir, args.subset)  # refuses another photo set before copying
    peak, what = matmul_peak(n=1024, repeats=5)  # what this machine gives now, so the time below can be compared
    for part, size in (("train", 2 * TILE), ("heldout", TILE), ("traintiles", TILE)):
        m = locked_prepare([str(out / "images" / part)], str(out / "shards" / part), PrepareOptions(size=size, shard_size=4))
        print(f"demo: prepare {part}: {m['total']} samples in {len(m['shards'])} shards ({out / 'shards' / part})")
    steps = [f"train.max_steps={args.steps}", f"train.log_every={max(1, min(10, args.steps))}"] if args.steps else []
    tr = train("tiny", [f"data.train={out / 'shards' / 'train'}", f"data.val={out / 'shards' / 'heldout'}",
                        f"output_dir={out / 'run'}", "train.tracker=tensorboard", f"seed={args.seed}", *steps], "auto")
    run = out / "run"
    weights = resolve_weights(run)  # the run's newest checkpoint (EMA weights), the same one for every job below
    at_tile = [f"data.resolution={TILE}"]  # the preset trains on smaller crops; it is fully convolutional
    for part, folder in (("heldout", "eval"), ("traintiles", "eval-train")):
        evaluated = EvaluateJob(weights, str(out / "shards" / part), out / folder, EvaluateOptions(at_tile)).run()
        print(f"{evaluated.table}\n{evaluated.summary()}")
    encode(weights, out / "shards" / "train", out / "latents", at_tile)
    print(ExportJob(weights, out / "export" / "vae", "diffusers", ExportOptions(
        at_tile, stats=str(out / "latents" / "manifest.json"), overwrite=True)).run().summary())
    key = decode_one_latent(out / "export" / "vae", out / "latents", out / "decoded_latent.png")
    for part, name, extra in (("traintiles", "latents-tiles", ["encode.flip=true"]), ("heldout", "latents-heldout", [])):
        encode(weights, out / "shards" / part, out / name, at_tile + extra)
    _, probed = probe("probe-tiny", [f"probe.latents={out / 'latents-tiles'}", f"probe.val={out / 'latents-heldout'}",
                                     f"probe.images={out / 'shards' / 'heldout'}", f"output_dir={out / 'probe'}",
                                     f"seed={args.seed}", *([f"train.max_steps={args.steps}",
                                                             f"probe.val_every={args.steps}"] if args.steps else [])],
                      "auto")
    training_curves(run / "metrics.jsonl", out / "loss.png", f"the tiny preset, {tr.state.step} steps")
    res = json.loads((out / "eval" / "eval.json").read_text())
    seen = json.loads((out / "eval-train" / "eval.json").read_text())
    gain = res["psnr"] - res["psnr_mean_colour"]
    names = ", ".join(photos["held_out_names"])
    verdict = (f"held-out PSNR {res['psnr']:.2f} dB vs {res['psnr_mean_colour']:.2f} dB for the mean-colour baseline "
               f"({gain:+.2f} dB) on {res['samples']} tiles of {names} (photos never trained on); "
               f"{seen['psnr']:.2f} dB on the training photos' tiles (gap {seen['psnr'] - res['psnr']:+.2f} dB)")
    probe_line = (f"validation loss {probed['val_loss']['mean']:.4f} (mean over t) on the held-out tiles' latents "
                  f"after {probed['step']} steps; FID {probed['fid']}")
    write_report(out, tr.state.step, photos, verdict, key, args.photos, probe_line)
    print(f"demo: outputs in {out}/: shards/, run/, eval/, latents/, export/vae/, probe/, report.md (grid, training "
          f"curves, decoded latent, the probe's samples)")
    print(f"demo: {verdict}")
    print(f"demo: generation probe: {probe_line}")
    print(f"demo: done in {time.time() - start:.1f}s on this machine ({stages.THREADS_WHY}; {what} measured at the "
          f"start: {peak / 1e12:.2f} TFLOP/s)")


def write_report(out: Path, steps: int, photos: dict, verdict: str, key: str, source: str | None,
                 probe_line: str) -> None:
    table = (out / "eval" / "eval.md").read_text().split("\n\n", 2)[-1]
    probe_table = (out / "probe" / "probe.md").read_text().split("\n\n")[1]
    run = out / "run"
    atomic_write_text(out / "report.md", f"""# firststage demo

{photos['train']} photographs ({source or "scikit-image's"}) trained the `tiny` preset for {steps} steps on the CPU;
{verdict}.

## Held-out photos: every tile (input) and its reconstruction, with its PSNR

![held-out reconstructions](eval/eval_grid.png)

## Training loss and held-out PSNR

![training curves](loss.png)

## A latent read back from the latent shards, decoded by the exported diffusers folder

`{key}`: ![decoded latent](decoded_latent.png)

## Evaluation on the held-out tiles

{table}
## The generation probe: how well these latents diffuse

A small diffusion transformer (`probe-tiny`) trained on the latents of the training photos' tiles:
{probe_line}.
Its samples, decoded by the model above:

![probe samples](probe/samples.png)

![probe training loss and validation loss](probe/curve.png)

{probe_table}

## Where everything went

| what | where |
|---|---|
| photos | {out / 'images'} (train/, heldout/ and traintiles/: 64x64 tiles of the held-out and training photos) |
| image shards | {out / 'shards'} (train/, heldout/, traintiles/; manifest.json each) |
| run folder | {run} (config.yaml, checkpoints/, samples/, logs/ for TensorBoard, metrics.jsonl) |
| evaluation | {out / 'eval'} (held out) and {out / 'eval-train'} (training tiles): eval.json, eval.md, eval_grid.png |
| latent shards | {out / 'latents'} (manifest.json with the scaling factor) |
| diffusers folder | {out / 'export' / 'vae'} (AutoencoderKL.from_pretrained) |
| generation probe | {out / 'probe'} (probe.json, probe.md, samples.png, curve.png; latents-tiles/ and latents-heldout/ beside) |
""")


if __name__ == "__main__":
    main()
