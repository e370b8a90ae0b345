"""The demo runs end to end on a reduced budget and resumes; every stage's help shows commands that parse."""

import json

import pytest

from harness import run_main


def test_demo_runs_end_to_end_then_on_your_photos_then_resumes(tmp_path, photos, monkeypatch):
    """The plain demo, then `--photos DIR` (into its own folder, holding photos out whole), then the plain demo again
    (it resumes); a photo set aimed at a folder that holds another is refused before anything is copied."""
    from diffusers import AutoencoderKL

    from stages.demo import main

    monkeypatch.chdir(tmp_path)
    r = run_main(main, "--steps", "3", "--subset", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    assert "held-out PSNR" in r.stdout and "mean-colour baseline" in r.stdout
    report = (out / "report.md").read_text()
    assert "on the training photos' tiles (gap" in r.stdout
    for linked in ("eval/eval_grid.png", "loss.png", "decoded_latent.png", "probe/samples.png", "probe/curve.png"):
        assert f"({linked})" in report and (out / linked).is_file()
    assert "| PSNR (dB) |" in report and "| validation loss, mean over t |" in report
    probed = json.loads((out / "probe" / "probe.json").read_text())  # the generation probe on the tiles' latents
    assert probed["step"] == 3 and probed["decoded_by"].startswith("ema.safetensors") and "generation probe" in r.stdout
    vae = AutoencoderKL.from_pretrained(out / "export" / "vae")
    assert vae.config.scaling_factor == json.loads((out / "latents" / "manifest.json").read_text())["statistics"]["scaling_factor"]
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert ev["samples"] == 12 and ev["weights"].startswith("ema.safetensors")  # 12 tiles of two held-out photos

    r = run_main(main, "--photos", photos, "--steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    # four photos in name order (astronaut, chelsea, coffee, rocket): the second is held out whole
    assert "tiles of chelsea (photos never trained on)" in r.stdout
    assert sorted(p.stem for p in (out / "photos-photos" / "images" / "train").glob("*.png")) == [
        "astronaut", "coffee", "rocket"]
    before = sorted(p.name for p in (out / "images").rglob("*"))
    r = run_main(main, "--output", out, "--photos", photos)
    assert r.returncode == 2 and "holds the demo of scikit-image's photos (--subset 2)" in r.stderr, r.stderr
    assert sorted(p.name for p in (out / "images").rglob("*")) == before  # nothing copied
    r = run_main(main, "--output", tmp_path / "demo2", "--photos", tmp_path / "nothing-here")
    assert r.returncode == 2 and "no such folder" in r.stderr

    again = run_main(main, "--steps", "3", "--subset", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "steps 3->3" in again.stdout and "(1 already complete)" in again.stdout  # resumed: nothing redone


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate", "encode", "export", "probe", "demo", "config"])
def test_every_stage_help_names_the_stage_and_its_examples_parse(stage):
    """`firststage STAGE --help` exits 0 with the stage's usage line, and every example command in it (the module
    docstring's `firststage STAGE ...` lines) is accepted by the stage's own argument parser."""
    import importlib
    import shlex

    from test_readme import stage_help

    module = importlib.import_module(f"stages.{stage}")
    text = stage_help(stage)
    assert text.startswith(f"usage: firststage {stage} ")
    examples = [ln.split("  #")[0].strip() for ln in (module.__doc__ or "").splitlines()
                if ln.strip().startswith(f"firststage {stage} ")]
    for line in examples:
        assert line in text
        argv = shlex.split(line)[2:]
        if hasattr(module, "build_parser"):
            module.build_parser().parse_intermixed_args(argv)  # SystemExit(2) on an unknown or malformed flag
