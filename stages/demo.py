"""firststage demo: the whole pipeline on the embedded default, on a CPU, in a few minutes.

scikit-image's colour photographs -> prepare (shards + manifest) -> train the `tiny` preset (resumable run folder
with checkpoints, reconstruction grids and TensorBoard logs) -> evaluate it (eval.json / eval.md).
  bash launch/demo.sh                 # set up, then this
  python -m stages.demo --output demo --steps 200
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, atomic_write_text
from stages.common import stage_main

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "stereo_motorcycle", "colorwheel")


def write_demo_images(folder: Path) -> int:
    """The colour photographs that ship inside scikit-image (no download), as JPEGs with a caption each."""
    try:
        import skimage.data as skdata
    except ImportError:
        raise UserError("the demo needs scikit-image for its photos: pip install scikit-image") from None
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in PHOTOS:
        try:
            arr = getattr(skdata, name)()
        except Exception:  # a photo this scikit-image version does not ship offline
            continue
        for i, a in enumerate(arr if isinstance(arr, tuple) else (arr,)):
            a = np.asarray(a)
            if a.ndim != 3 or a.shape[2] < 3:
                continue
            stem = name if i == 0 else f"{name}_{i}"
            buf = io.BytesIO()
            Image.fromarray(a[..., :3].astype(np.uint8)).save(buf, format="JPEG", quality=95)
            atomic_write_bytes(folder / f"{stem}.jpg", buf.getvalue())
            atomic_write_text(folder / f"{stem}.txt", f"a photograph: {name.replace('_', ' ')}")
            n += 1
    if n == 0:
        raise UserError("scikit-image shipped no colour photographs to build the demo from")
    return n


@stage_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="firststage demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="demo", help="folder for everything the demo writes (default demo/)")
    p.add_argument("--steps", type=int, default=150, help="training steps of the tiny model (default 150)")
    args = p.parse_args(argv)
    out = Path(args.output)
    start = time.time()

    from pipeline.data.prepare import PrepareOptions, prepare

    n = write_demo_images(out / "images")
    manifest = prepare([str(out / "images")], out / "shards", PrepareOptions(size=128, shard_size=4, workers=2))
    print(f"demo: prepare: {n} photos -> {manifest['total']} samples in {len(manifest['shards'])} shards "
          f"({out / 'shards'}), skipped {manifest['skipped_count']}")
    from stages.train import run as train

    tr = train(["--config", "tiny", f"data.train={out / 'shards'}", f"output_dir={out / 'run'}",
                f"train.max_steps={args.steps}", "train.checkpoint_every=50", "train.image_every=50",
                "train.log_every=10", "--resume", "auto"])
    grids = sorted((out / "run" / "samples").glob("*.png"))
    print(f"demo: train: {tr.state.step} steps; checkpoints in {out / 'run' / 'checkpoints'}, "
          f"newest reconstruction grid {grids[-1] if grids else 'none'}")
    from stages.evaluate import main as evaluate

    # no LPIPS backbone weights ship with the demo: its LPIPS rows say so instead of a number
    evaluate(["--model", str(out / "run"), "--data", str(out / "shards"), "evaluate.num_samples=64"])
    print(f"demo: done in {time.time() - start:.1f}s; outputs in {out}/")


if __name__ == "__main__":
    main()
