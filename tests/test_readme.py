"""Every `firststage ...` / `-m stages....` command in the README's code blocks runs, on tiny data with the tiny
preset, so the guide cannot go stale.

Each command is taken as written and only made small: its paths are moved into a temporary folder, kl-f8 becomes
tiny (finetune-decoder keeps its recipe on a tiny-shaped model), sizes become 32 px, training takes 2 steps, LPIPS
uses a random backbone (no download), and `accelerate launch -m stages.X` runs stage X in this one process (the
2-process world of test_distributed.py covers the launch). Commands run in README order; one that needs what a
later command makes (an exported model, a fine-tuning run) waits for it. Alternatives that write the same folder as
an earlier command (the README shows several ways to prepare or encode) get a folder of their own. The launchers
`bash launch/demo.sh` / `launch/test.sh` are the demo test and this suite; `sbatch` lines are checked for their
script only.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

from helpers import make_shards, readme_commands, run_main, write_images

TINY_MODEL = ["model.block_out_channels=[16,32,64]", "model.layers_per_block=1", "model.norm_num_groups=8",
              "model.mid_block_attention=false", "model.latent_channels=4"]
SMALL_TRAIN = ["data.resolution=32", "data.num_workers=0", "data.shuffle_buffer=4", "train.batch_size=4",
               "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1", "train.tracker=none",
               "loss.perceptual.backbone=random"]


def small(stage: str, rest: str, root: Path) -> list[str]:
    """The command made small: paths under root, tiny sizes (see the module docstring)."""
    r = rest
    r = r.replace("'raw/{00000..00999}.tar'", f"'{root}/raw/{{00000..00001}}.tar'")
    r = re.sub(r"'shards/train-\{000000\.\.\d+\}\.tar'", f"'{root}/shards/train-{{000000..000001}}.tar'", r)
    r = r.replace("'val-{000000..000009}.tar'", f"'{root}/shards/train-{{000000..000001}}.tar'")
    r = r.replace("~/photos", str(root / "photos")).replace("paths.txt", str(root / "paths.txt"))
    for vae in ("path/to/sd-vae", "path/to/diffusers_vae_folder", "path/to/any/diffusers/vae"):
        r = r.replace(vae, str(root / "exports" / "klf8-vae"))
    r = r.replace("vae-ft-mse-840000-ema-pruned.safetensors", str(root / "exports" / "klf8.safetensors"))
    r = re.sub(r"(?<![\w/.'])(data/val|shards/val)\b", str(root / "data" / "shards"), r)
    r = re.sub(r"(?<![\w/.'])(data/|shards/|runs/|exports/|latents/)", lambda m: f"{root}/{m.group(1)}", r)
    r = r.replace("data.train=... ", f"data.train={root}/shards ").replace("--data ...", f"--data {root}/shards")
    r = r.replace("--config kl-f8 ... ", f"--config kl-f8 data.train={root}/shards output_dir={root}/runs/klf8 ")
    r = re.sub(r"--size \d+", "--size 32", r).replace("prepare.size=512", "prepare.size=32")
    r = re.sub(r"--workers \d+", "--workers 1", r)
    argv = shlex.split(r, comments=True)
    if stage == "train":
        preset = argv[argv.index("--config") + 1]
        argv = [a if a != "kl-f8" else "tiny" for a in argv] + SMALL_TRAIN
        if preset == "finetune-decoder":
            argv += TINY_MODEL
    elif stage == "evaluate":
        argv += ["evaluate.lpips_backbone=random", "evaluate.likelihood_samples=0", "data.resolution=32"]
    elif stage == "encode" and "--rebuild-manifest" not in argv:
        argv += ["data.resolution=32", "data.num_workers=0"]
    assert "..." not in " ".join(argv), f"a placeholder this test does not know: {rest}"
    return argv


def value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def inputs_missing(argv: list[str]) -> bool:
    """True while something the command reads is not there yet (made by a later command)."""
    for flag in ("--model", "--stats", "train.init_from", "--data", "data.train", "--input"):
        v = value(argv, flag)
        if v and not (Path(v.split("{")[0]).parent.exists() if "{" in v else Path(v).exists()):
            return True
    return False


def own_output(stage: str, argv: list[str], written: set, n: int) -> list[str]:
    """An alternative that would write where an earlier command wrote gets a folder of its own."""
    key = "output_dir" if stage == "train" else "--output"
    out = value(argv, key)
    if out is None or "--resume" in argv or "--rebuild-manifest" in argv:
        return argv
    if out in written:
        new = f"{out.rstrip('/')}-alt{n}"
        argv = [a.replace(out, new) if (a == out or a == f"{key}={out}") else a for a in argv]
        out = new
    written.add(out)
    return argv


def test_every_readme_command_runs_on_tiny_data(tmp_path):
    root = tmp_path
    photos = write_images(root / "photos", 6, captions=True)
    (root / "paths.txt").write_text("".join(f"{root / 'photos' / k}.jpg\n" for k in photos))
    for p in make_shards(root / "raw", 2, 3):
        Path(p).rename(root / "raw" / f"{Path(p).stem.split('-')[1][1:]}.tar")  # shard-000000 -> 00000.tar
    make_shards(root / "shards", 2, 8, size=(48, 40), prefix="train")

    commands = readme_commands()
    assert len(commands) >= 25 and {s for s, _ in commands} >= {"config", "prepare", "train", "evaluate", "encode",
                                                                   "export"}
    pending, written, ran = list(enumerate(commands)), set(), 0
    while pending:
        waiting = []
        for n, (stage, rest) in pending:
            if stage == "sbatch":
                assert (Path(__file__).parents[1] / shlex.split(rest)[2]).is_file(), rest
                continue
            argv = small(stage, rest, root)
            if inputs_missing(argv):
                waiting.append((n, (stage, rest)))
                continue
            argv = own_output(stage, argv, written, n)
            r = run_main(importlib.import_module(f"stages.{stage}").main, *argv)
            assert r.returncode == 0, f"README: firststage {stage} {rest}\nran as: {argv}\n{r.stderr[-2000:]}"
            ran += 1
        assert len(waiting) < len(pending), f"README commands whose inputs no command makes: {waiting}"
        pending = waiting
    assert ran >= 25
