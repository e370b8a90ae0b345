"""The guide cannot go stale: every stage, flag and config key the README names exists; the demo runs end to end on
a reduced budget and resumes."""

import json
import re

import pytest

from helpers import ROOT, readme_commands, run_main

README = (ROOT / "README.md").read_text()
SECTIONS = ("prepare", "data", "model", "loss", "train", "evaluate", "encode")


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


def test_demo_runs_end_to_end_on_a_reduced_budget_and_resumes(tmp_path):
    from diffusers import AutoencoderKL

    from stages.demo import main

    r = run_main(main, "--output", tmp_path / "demo", "--steps", "3", "--photos", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    assert "held-out PSNR" in r.stdout and "mean-colour baseline" in r.stdout
    report = (out / "report.md").read_text()
    for linked in ("eval/eval_grid.png", "loss.png", "decoded_latent.png"):
        assert f"({linked})" in report and (out / linked).is_file()
    assert "| PSNR (dB) |" in report
    vae = AutoencoderKL.from_pretrained(out / "export" / "vae")
    assert vae.config.scaling_factor == json.loads((out / "latents" / "manifest.json").read_text())["statistics"]["scaling_factor"]
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert ev["samples"] == 12 and ev["weights"].startswith("ema.safetensors")  # 12 tiles of two held-out photos
    again = run_main(main, "--output", out, "--steps", "3", "--photos", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "steps 3->3" in again.stdout and "(1 already complete)" in again.stdout  # resumed: nothing redone


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate", "encode", "export", "demo", "config"])
def test_every_stage_has_help(stage):
    assert "usage: firststage" in stage_help(stage)
