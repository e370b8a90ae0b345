"""Run stages one after the other in one process of a (multi-process) world, then write what the tests check.

  bash launch/local_multinode.sh tests/scripts/world.py REPORT_DIR ROOT train,evaluate,encode,probe [train key=value ...]

ROOT holds train/ and val/ shards; the run folder is ROOT/run, evaluate writes ROOT/eval-N, encode ROOT/latents-N
and the probe (on those latents) ROOT/probe-N (N: the number of processes). One launch serves every 1-vs-N-process test: start-up (torch, diffusers, the process
group) is paid once.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from stages.train import run


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    report_dir, root, stages, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]
    tr = run([*argv, f"data.train={root / 'train'}", f"output_dir={root / 'run'}"])
    acc = tr.accelerator
    n = acc.num_processes
    report = {
        "rank": acc.process_index,
        "world_size": n,
        "step": tr.state.step,
        "autoencoder": digest(tr.unwrapped.vae.state_dict()),
        "ema": digest(tr.ema.state_dict()) if tr.ema is not None else None,
        "objective": digest({k: v for k, v in tr.objective.state_dict().items() if not k.startswith("perceptual.")}),
        "draw": torch.rand(4).tolist(),  # where this rank's random stream stands after training
    }
    if "evaluate" in stages:
        from stages.evaluate import main as evaluate

        evaluate(["--lpips-backbone", "random", "--model", str(root / "run"), "--data", str(root / "val"),
                  "--output", str(root / f"eval-{n}"), "--num-samples", "17", "evaluate.iwae_k=4",
                  "evaluate.likelihood_samples=8"])
    if "encode" in stages:
        from stages.encode import main as encode

        encode(["--model", str(root / "run"), "--data", str(root / "val"), "--output", str(root / f"latents-{n}"),
                "data.num_workers=0", "encode.batch_size=3"])
    if "probe" in stages:  # the generation probe on the latents encode just wrote, decoded by the run's model
        from stages.probe import run as probe

        acc.wait_for_everyone()  # encode's manifest, which the main process writes last, is there for every rank
        ptr, _ = probe(["--config", "probe-tiny", "--latents", str(root / f"latents-{n}"), "--output",
                        str(root / f"probe-{n}"), "probe.depth=1", "probe.hidden=32", "probe.val_samples=8",
                        "probe.val_every=2", "probe.sample_steps=2", "probe.num_samples=2", "train.max_steps=4",
                        "train.batch_size=4", "train.checkpoint_every=4", "data.shuffle_buffer=8"])
        report["probe"] = {"step": ptr.state.step, "transformer": digest(ptr.unwrapped.state_dict()),
                           "ema": digest(ptr.ema.state_dict())}
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{acc.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
