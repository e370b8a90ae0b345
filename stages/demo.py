"""firststage demo: the whole pipeline on real photographs, on a CPU, in about two and a half minutes.

scikit-image's photographs (shipped inside the package, no download): 14 for training, and two held out whole
(rocket, coffee), cut into 64x64 tiles that the model never sees in training.
  prepare (image shards) -> train the `tiny` preset -> evaluate on the held-out photos (against the mean-colour
  baseline) -> encode the training shards to latent shards -> export a diffusers folder -> reload it with plain
  diffusers and decode a latent read back from the latent shards -> demo/report.md (grid, loss curve, table)

  bash launch/demo.sh                     # set up, then this
  python -m stages.demo --output demo     # again: everything resumes, it takes seconds
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import UserError
from pipeline.storage import atomic_write_bytes, atomic_write_text
from stages.common import stage_main

# real photographs in scikit-image's package data (grey ones as RGB): 14 to train on, 2 held out whole
TRAIN = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
         "camera", "coins", "moon", "grass", "gravel", "brick", "clock", "cell")
HELD_OUT = ("rocket", "coffee")
TILE = 64  # held-out photos: shorter side 128, cut into TILE x TILE tiles (the model's resolution)


def _photo(name: str) -> np.ndarray:
    import skimage.data as skdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = getattr(skdata, name)()
    a = np.asarray(a[0] if isinstance(a, tuple) else a)
    return np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3].astype(np.uint8)


def _write_png(path: Path, img: Image.Image) -> None:
    if path.is_file():  # written by an earlier run: unchanged inputs let prepare resume
        return
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_demo_images(folder: Path, train=TRAIN, held_out=HELD_OUT) -> tuple[int, int]:
    """folder/train: the training photos; folder/heldout: the held-out photos' tiles. Returns the two counts."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        raise UserError("the demo needs scikit-image for its photos: pip install scikit-image") from None
    (folder / "train").mkdir(parents=True, exist_ok=True)
    (folder / "heldout").mkdir(parents=True, exist_ok=True)
    for name in train:
        _write_png(folder / "train" / f"{name}.png", Image.fromarray(_photo(name)))
        caption = folder / "train" / f"{name}.txt"
        if not caption.is_file():
            atomic_write_text(caption, f"a photograph: {name.replace('_', ' ')}")
    tiles = 0
    for name in held_out:
        img = Image.fromarray(_photo(name))
        s = 2 * TILE / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
        for top in range(0, img.height - TILE + 1, TILE):
            for left in range(0, img.width - TILE + 1, TILE):
                _write_png(folder / "heldout" / f"{name}_{top // TILE}_{left // TILE}.png",
                           img.crop((left, top, left + TILE, top + TILE)))
                tiles += 1
    return len(train), tiles


def loss_curve(metrics: Path, out: Path, size=(640, 320)) -> None:
    """train/loss against step from metrics.jsonl, drawn with PIL (no plotting dependency)."""
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.is_file() else []
    rows = rows or [{"step": 0, "train/loss": 1.0}]  # nothing logged yet: an empty chart
    steps = [r["step"] for r in rows]
    loss = [float(np.log10(max(r["train/loss"], 1e-9))) for r in rows]
    w, h, pad = size[0], size[1], 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, 10, w - 10, h - pad], outline="black")
    lo, hi = min(loss), max(loss)
    span = max(hi - lo, 1e-6)
    pts = [(pad + (w - pad - 10) * (s - steps[0]) / max(steps[-1] - steps[0], 1),
            10 + (h - pad - 10) * (hi - v) / span) for s, v in zip(steps, loss)]
    if len(pts) > 1:
        d.line(pts, fill=(200, 30, 30), width=2)
    d.text((pad, h - pad + 8), f"step {steps[0]}", fill="black")
    d.text((w - 90, h - pad + 8), f"step {steps[-1]}", fill="black")
    d.text((pad + 6, 14), f"train loss (log10) {10**hi:.4g}", fill="black")
    d.text((pad + 6, h - pad - 16), f"{10**lo:.4g}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())


def decode_one_latent(export: Path, latents: Path, out: Path) -> str:
    """Plain diffusers only: the exported folder decodes a latent read back from the latent shards."""
    import torch
    from diffusers import AutoencoderKL

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


@stage_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="firststage demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="demo", help="folder for everything the demo writes (default demo/)")
    p.add_argument("--steps", type=int, help="training steps (default: the tiny preset's train.max_steps)")
    p.add_argument("--photos", type=int, help="use only the first N training photos and N held-out photos (tests)")
    args = p.parse_args(argv)
    out = Path(args.output)
    start = time.time()
    from pipeline.data.prepare import PrepareOptions
    from stages.encode import main as encode
    from stages.evaluate import main as evaluate
    from stages.export import main as export
    from stages.prepare import locked_prepare
    from stages.train import run as train

    held_out = HELD_OUT[:args.photos]  # [:None] is all of them
    n_train, n_tiles = write_demo_images(out / "images", TRAIN[:args.photos], held_out)
    for part, size in (("train", 128), ("heldout", TILE)):
        m = locked_prepare([str(out / "images" / part)], str(out / "shards" / part), PrepareOptions(size=size, shard_size=4))
        print(f"demo: prepare {part}: {m['total']} samples in {len(m['shards'])} shards ({out / 'shards' / part})")
    steps = [f"train.max_steps={args.steps}", f"train.log_every={max(1, min(10, args.steps))}"] if args.steps else []
    tr = train(["--config", "tiny", f"data.train={out / 'shards' / 'train'}", f"data.val={out / 'shards' / 'heldout'}",
                f"output_dir={out / 'run'}", "train.tracker=tensorboard", "--resume", "auto", *steps])
    run = out / "run"
    evaluate(["--model", str(run), "--data", str(out / "shards" / "heldout"), "--output", str(out / "eval")])
    encode(["--model", str(run), "--data", str(out / "shards" / "train"), "--output", str(out / "latents")])
    export(["--model", str(run), "--output", str(out / "export" / "vae"), "--stats",
            str(out / "latents" / "manifest.json"), "--overwrite"])
    key = decode_one_latent(out / "export" / "vae", out / "latents", out / "decoded_latent.png")
    loss_curve(run / "metrics.jsonl", out / "loss.png")
    res = json.loads((out / "eval" / "eval.json").read_text())
    gain = res["psnr"] - res["psnr_mean_colour"]
    verdict = (f"held-out PSNR {res['psnr']:.2f} dB vs {res['psnr_mean_colour']:.2f} dB for the mean-colour baseline "
               f"({gain:+.2f} dB) on {res['samples']} tiles of {', '.join(held_out)} "
               f"(photos never trained on)")
    table = (out / "eval" / "eval.md").read_text().split("\n\n", 2)[-1]
    atomic_write_text(out / "report.md", f"""# firststage demo

{n_train} photographs trained the `tiny` preset for {tr.state.step} steps on the CPU; {verdict}.

## Held-out photos (top) and their reconstructions (bottom)

![held-out reconstructions](eval/eval_grid.png)

## Training loss

![loss curve](loss.png)

## A latent read back from the latent shards, decoded by the exported diffusers folder

`{key}`: ![decoded latent](decoded_latent.png)

## Evaluation on the held-out tiles

{table}
## Where everything went

| what | where |
|---|---|
| photos | {out / 'images'} (train/, heldout/) |
| image shards | {out / 'shards'} (train/, heldout/; manifest.json each) |
| run folder | {run} (config.yaml, checkpoints/, samples/, logs/ for TensorBoard, metrics.jsonl) |
| evaluation | {out / 'eval'} (eval.json, eval.md, eval_grid.png) |
| latent shards | {out / 'latents'} (manifest.json with the scaling factor) |
| diffusers folder | {out / 'export' / 'vae'} (AutoencoderKL.from_pretrained) |
""")
    print(f"demo: outputs in {out}/: shards/, run/, eval/, latents/, export/vae/, report.md (grid, loss curve, "
          f"decoded latent)")
    print(f"demo: {verdict}")
    print(f"demo: done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
