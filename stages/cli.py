"""`firststage <stage> [options] [key=value ...]`: dispatch to stages/<stage>.py.

Each stage also runs as `python -m stages.<stage>`, which is what `accelerate launch -m stages.train` uses.
"""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "prepare": "images, lists or tar shards -> resized webdataset shards + manifest.json",
    "train": "train a KL or VQ autoencoder (accelerate: CPU, one GPU, many nodes); resumable",
    "evaluate": "PSNR, SSIM, LPIPS, rFID, KL, active units, ELBO/IWAE, codebook use, latent scaling of a model",
    "encode": "image shards -> latent shards + manifest.json (scaling factor), exactly once, resumable",
    "probe": "train a small diffusion transformer on latent shards: how well they diffuse (loss, samples, FID)",
    "export": "a model -> diffusers folder | single-file .safetensors (LDM names) | encoder only + torch.export",
    "demo": "the whole pipeline on scikit-image's photos with the tiny preset (CPU, minutes)",
    "config": "print the resolved config of a preset/file with overrides, or every key (--keys)",
}


def usage() -> str:
    rows = "\n".join(f"  {name:<10} {desc}" for name, desc in STAGES.items())
    return (
        "usage: firststage <stage> [options] [key=value ...]\n\n"
        f"stages:\n{rows}\n\n"
        "`firststage <stage> --help` lists the options of a stage."
    )


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(stage, list(STAGES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"firststage: error: unknown stage {stage!r}{hint} (stages: {', '.join(STAGES)})", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(f"stages.{stage}")
    module.main(rest)


if __name__ == "__main__":
    main()
