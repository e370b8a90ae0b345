"""firststage evaluate: reconstruction quality, likelihood bounds and latent health of a first-stage model.

  firststage evaluate --model runs/klf8 --data 'val-{000000..000009}.tar' --num-samples 5000
  firststage evaluate --model path/to/diffusers_vae_folder --data ...     # any diffusers autoencoder folder
  firststage evaluate --model stabilityai/sd-vae-ft-mse --data ...        # a Hub id: its autoencoder, cached
  accelerate launch -m stages.evaluate --model ... --data ...            # split across processes, same numbers

Prints a table and writes eval.json, eval.md and a reconstruction grid PNG next to the model (or to --output).
"""

from __future__ import annotations

import argparse
import time

from pipeline.distributed import print0
from pipeline.errors import EmptyData
from stages.common import add_alias_flags, alias_errors, alias_overrides, flag_named, ranks_and_weights, stage_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, checkpoint folder, diffusers folder, a single file, or "
                                                  "a Hugging Face Hub id (org/name[@revision])")
    p.add_argument("--data", required=True, help="shards: brace pattern, folder, list file or manifest.json")
    p.add_argument("--output", help="folder for eval.json, eval.md and the grid (default: the model folder, the "
                                    "folder of a single file, or ORG--NAME/ for a Hub id)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights of a firststage checkpoint, not EMA")
    add_alias_flags(p, ALIASES)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. evaluate.iwae_k=64 evaluate.batch_size=32 data.resolution=512")
    return p


# flags that are aliases of config keys (one schema: the config validates them)
ALIASES = {"--num-samples": ("evaluate.num_samples", int, "samples to evaluate"),
           "--lpips-backbone": ("evaluate.lpips_backbone", str, "pretrained, or random (tests only)")}


@stage_main
def main(argv=None) -> None:
    from pipeline.metrics.job import EvaluateJob, EvaluateOptions

    args = build_parser().parse_intermixed_args(argv)
    start = time.time()
    state, weights = ranks_and_weights(args.model, not args.no_ema)  # a run folder: one checkpoint on every rank
    with flag_named("--model"):
        weights.require_decoder("evaluate reconstructs images: give the full model (its run, a diffusers folder or a "
                                "single file)")
    asked = args.num_samples is not None or any(o.startswith("evaluate.num_samples=") for o in args.overrides)
    job = EvaluateJob(weights, args.data, args.output, EvaluateOptions(args.overrides + alias_overrides(args, ALIASES),
                                                                        asked), state.device)
    with flag_named("--output"):
        job.check_output()  # before evaluating: a result is never computed and then lost
    with alias_errors(ALIASES):
        job.load()
    with flag_named("--data"):
        job.plan()
    with flag_named("--data", only=EmptyData):
        r = job.run()
    print0(r.table)
    print0(r.summary(time.time() - start))


if __name__ == "__main__":
    main()
