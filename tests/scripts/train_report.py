"""Run the train stage in this process, then write what the tests check: world size and a digest of the weights.

  accelerate launch ... tests/scripts/train_report.py REPORT_DIR --config tiny ...
"""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.train import run  # noqa: E402


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    report_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    tr = run(argv)
    acc = tr.accelerator
    report = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "step": tr.state.step,
        "autoencoder": digest(tr.unwrapped.vae.state_dict()),
        "ema": digest(tr.ema.state_dict()) if tr.ema is not None else None,
        "objective": digest({k: v for k, v in tr.objective.state_dict().items() if not k.startswith("perceptual.")}),
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{acc.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
