"""The README cannot go stale: every stage, flag and config key it names exists, and every `firststage ...` /
`-m stages....` command in its code blocks runs, on tiny data with the tiny preset.

Each command is taken as written and only made small: its paths are moved into a temporary folder, kl-f8 becomes
tiny (finetune-decoder keeps its recipe on a tiny-shaped model), sizes become 32 px, training takes 2 steps, LPIPS
uses a random backbone (no download), and `accelerate launch -m stages.X` runs stage X in this one process (the
2-process world of test_distributed.py covers the launch). Commands run in README order; one that needs what a
later command makes (an exported model, a fine-tuning run) waits for it. Alternatives that write the same folder as
an earlier command (the README shows several ways to prepare or encode) get a folder of their own. The launchers
`bash launch/demo.sh` / `launch/test.sh` are the demo test and this suite; `sbatch` lines are checked for their
script only. Commands on `s3://` paths (the Object storage section) are checked for their flags here and run against a
real S3 server by tests/test_object_storage.py.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

from harness import ROOT, run_main
from helpers import make_shards, write_images

README = (ROOT / "README.md").read_text()
SECTIONS = ("prepare", "data", "model", "loss", "train", "evaluate", "encode", "probe")

TINY_MODEL = ["model.block_out_channels=[16,16,32]", "model.layers_per_block=1", "model.norm_num_groups=8",
              "model.mid_block_attention=false", "model.latent_channels=4"]
DC_TINY = ["model.dc.block_types=[ResBlock,EfficientViTBlock]", "model.dc.block_out_channels=[16,32]",
           "model.dc.encoder_layers_per_block=[1,1]", "model.dc.decoder_layers_per_block=[1,1]",
           "model.dc.qkv_multiscales=[[],[5]]", "model.dc.attention_head_dim=8",
           "model.dc.decoder_norm_types=[rms_norm,rms_norm]", "model.dc.decoder_act_fns=[silu,silu]"]
FOREIGN = {"path/to/FLUX.2-dev/vae": "flux2", "path/to/Qwen-Image/vae": "qwenimage"}  # tiny random models of these
SMALL_TRAIN = ["data.resolution=32", "data.num_workers=0", "data.shuffle_buffer=4", "train.batch_size=4",
               "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1", "train.tracker=none",
               "loss.perceptual.backbone=random"]
SMALL_PROBE = ["probe.depth=1", "probe.hidden=32", "probe.val_samples=8", "probe.sample_steps=2", "probe.num_samples=2",
               "train.max_steps=2", "train.batch_size=4", "train.checkpoint_every=2"]



def readme_commands() -> list[tuple[str, str]]:
    """(stage, the rest of the line) for each `firststage STAGE ...` / `-m stages.STAGE ...` command in the README's
    bash code blocks, continuations joined, comments dropped; `sbatch ...` lines as ("sbatch", line)."""
    out, lang, current = [], None, None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang in ("", "bash", "sh"):
                    for cmd in "\n".join(current).replace("\\\n", " ").splitlines():
                        cmd = cmd.split("  #")[0].strip()
                        m = re.search(r"(?:^firststage|-m stages\.)\s*([a-z]+)(?![a-z:])(.*)", cmd)
                        if m and not cmd.startswith(("from ", "import ")):
                            out.append((m.group(1), m.group(2).strip()))
                        elif cmd.startswith("sbatch "):
                            out.append(("sbatch", cmd))
                current = None
        elif current is not None:
            current.append(line)
    return out


def stage_help(stage: str) -> str:
    import importlib

    r = run_main(importlib.import_module(f"stages.{stage}").main, "--help")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_readme_names_only_stages_and_flags_that_exist():
    from stages.cli import STAGES

    cmds = [(stage, rest.split()) for stage, rest in readme_commands() if stage != "sbatch"]
    assert len(cmds) >= 20  # the README's commands were found
    helps = {}
    for stage, args in cmds:
        if stage == "cli":
            continue
        assert stage in STAGES, f"README names a stage that does not exist: {stage}"
        helps.setdefault(stage, stage_help(stage))
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", helps[stage]), f"firststage {stage} has no flag {flag}"


def test_readme_names_only_config_keys_that_exist():
    from pipeline.config import describe_fields

    keys = {k for k, _, _ in describe_fields()}
    named = set(re.findall(rf"(?<![./\w])((?:{'|'.join(SECTIONS)})\.[a-z0-9_]+(?:\.[a-z0-9_]+)*)", README))
    named = {k for k in named if not re.search(r"\.(py|json|md|yaml|tar|sbatch)$", k)}
    named.discard("train.max_stesp")  # the README's example of a misspelt key and its one-line error
    assert len(named) >= 30
    unknown = sorted(k for k in named if k not in keys and not any(f.startswith(k + ".") for f in keys))
    assert unknown == [], f"README names config keys that do not exist: {unknown}"


def small(stage: str, rest: str, root: Path) -> list[str]:
    """The command made small: paths under root, tiny sizes (see the module docstring)."""
    r = rest
    r = r.replace("'raw/{00000..00999}.tar'", f"'{root}/raw/{{00000..00001}}.tar'")
    r = re.sub(r"'shards/train-\{000000\.\.\d+\}\.tar'", f"'{root}/shards/train-{{000000..000001}}.tar'", r)
    r = r.replace("'val-{000000..000009}.tar'", f"'{root}/shards/train-{{000000..000001}}.tar'")
    r = r.replace("~/photos", str(root / "photos")).replace("paths.txt", str(root / "paths.txt"))
    for vae in ("path/to/sd-vae", "path/to/diffusers_vae_folder", "path/to/any/diffusers/vae"):
        r = r.replace(vae, str(root / "exports" / "klf8-vae"))
    for path, name in FOREIGN.items():
        r = r.replace(path, str(root / "models" / name))
    r = r.replace(" val/", f" {root}/shards")
    r = r.replace("vae-ft-mse-840000-ema-pruned.safetensors", str(root / "exports" / "klf8.safetensors"))
    r = re.sub(r"(?<![\w/.'])(data/val|shards/val)\b", str(root / "data" / "shards"), r)
    r = re.sub(r"(?<![\w/.'])(data/|shards/|runs/|exports/|latents/|probes/)", lambda m: f"{root}/{m.group(1)}", r)
    r = r.replace("data.train=... ", f"data.train={root}/shards ").replace("--data ...", f"--data {root}/shards")
    r = r.replace("--config kl-f8 ... ", f"--config kl-f8 data.train={root}/shards output_dir={root}/runs/klf8 ")
    r = re.sub(r"--size \d+", "--size 32", r).replace("prepare.size=512", "prepare.size=32")
    r = re.sub(r"--workers \d+", "--workers 1", r)
    argv = shlex.split(r, comments=True)
    if stage == "train":
        preset = argv[argv.index("--config") + 1]
        argv = [a if a != "kl-f8" else "tiny" for a in argv] + SMALL_TRAIN
        foreign = any(str(root / "models") in a for a in argv)  # init_from a FLUX.2 / Qwen-Image VAE: its shape
        if preset in ("finetune-decoder", "fsq-f16") and not foreign:
            argv += TINY_MODEL
        if preset == "fsq-f16":
            argv += ["model.fsq.levels=[8,5,5,5]"]
        if preset.startswith("dc-ae-") and "train.init_from" not in rest:
            argv += ["model.latent_channels=8", *DC_TINY]
    elif stage == "evaluate":
        argv += ["evaluate.lpips_backbone=random", "evaluate.likelihood_samples=0", "data.resolution=32"]
    elif stage == "encode" and "--rebuild-manifest" not in argv:
        argv += ["data.resolution=32", "data.num_workers=0"]
    elif stage == "probe":  # probe-b1 becomes a 1-block probe-tiny; a held-out folder, the training latents
        argv = [a.replace(f"{root}/latents/val", f"{root}/latents/train") if a != "probe-b1" else "probe-tiny"
                for a in argv] + SMALL_PROBE
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
    for flag in ("--model", "--stats", "train.init_from", "--data", "data.train", "--input", "--latents"):
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
    from test_families import tiny_model

    root = tmp_path
    for name in FOREIGN.values():
        tiny_model(name).save_pretrained(root / "models" / name)
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
            if "s3://" in rest:  # run on a real server by test_object_storage.py
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


def readme_python_blocks() -> list[str]:
    blocks, current = [], None
    for line in README.splitlines():
        if line.startswith("```"):
            if current is None and line[3:].strip() == "python":
                current = []
            elif current is not None:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_every_readme_python_snippet_runs_as_written_and_ends(tmp_path, monkeypatch):
    """Each python block of the README runs as written (in a folder holding what it reads: image shards under shards/,
    a tiny model in exports/klf8-vae and its latent shards under latents/train) and ends within a minute."""
    from pipeline.config import load_config
    from pipeline.models import build_autoencoder
    from pipeline.weights.diffusers import save as save_diffusers
    from stages.encode import main as encode

    make_shards(tmp_path / "shards", 2, 5, size=(40, 40))
    vae = tmp_path / "exports" / "klf8-vae"
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), vae)
    assert run_main(encode, "--model", vae, "--data", tmp_path / "shards", "--output",
                    tmp_path / "latents" / "train", "data.resolution=32", "data.num_workers=0").returncode == 0
    monkeypatch.chdir(tmp_path)
    blocks = readme_python_blocks()
    assert blocks
    import signal

    def too_long(*_):
        raise AssertionError("a README snippet did not end within 60 s")

    previous = signal.signal(signal.SIGALRM, too_long)
    try:
        for code in blocks:
            scope: dict = {}
            signal.alarm(60)
            exec(compile(code, "README.md", "exec"), scope)
            signal.alarm(0)
            if "batch" in scope:
                assert scope["z"].shape[1:] == (4, 8, 8) and len(scope["captions"]) == len(scope["z"])
            if "report" in scope:  # the encode job: every sample, a manifest, its lock taken and given back
                flipped = tmp_path / "latents" / "flipped"
                assert scope["report"].samples == 10 and scope["report"].manifest["total"] == 10
                assert (flipped / "manifest.json").is_file() and not (flipped / ".lock").exists()
    finally:
        signal.signal(signal.SIGALRM, previous)
