"""The stages' jobs called from Python (pipeline.latents.job, pipeline.metrics.job, pipeline.weights.job): the same
results as the stages, and the same protection without a stage around them (the output's lock, taken by the job
when its caller holds none; an export never over the model's own folder)."""

import io
import json
import os
import socket
import tarfile
from pathlib import Path

import pytest
import torch

from harness import run_main
from helpers import make_shards
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.models import build_autoencoder
from pipeline.weights import resolve_weights
from pipeline.weights.diffusers import save as save_diffusers

SMALL = ["data.num_workers=0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    make_shards(root / "shards", 2, 3, size=(40, 40))
    torch.manual_seed(0)
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), root / "vae")
    return root


def held_by_another_run(lock: Path) -> None:
    """A live run's lock (this test's parent process, on this host), as another process's acquire writes it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": "now",
                                "command": "another run", "token": "0123456789abcdef"}))


def test_the_encode_job_writes_what_the_stage_writes_and_gives_its_lock_back(tiny):
    from pipeline.latents.job import EncodeJob, EncodeOptions
    from stages.encode import main as encode

    report = EncodeJob(resolve_weights(tiny / "vae"), str(tiny / "shards"), tiny / "by-job",
                       options=EncodeOptions(SMALL)).run()
    assert (report.shards, report.samples, report.done_before, report.stopped) == (2, 6, 0, False)
    assert report.manifest["total"] == 6 and report.whole and not (tiny / "by-job" / ".lock").exists()
    r = run_main(encode, "--model", tiny / "vae", "--data", tiny / "shards", "--output", tiny / "by-stage", *SMALL)
    assert r.returncode == 0, r.stderr
    job_m, stage_m = (json.loads((tiny / f / "manifest.json").read_text()) for f in ("by-job", "by-stage"))
    assert job_m["statistics"] == stage_m["statistics"] and job_m["total"] == stage_m["total"]
    again = EncodeJob(resolve_weights(tiny / "vae"), str(tiny / "shards"), tiny / "by-job",
                      options=EncodeOptions(SMALL)).run()
    assert (again.shards, again.done_before) == (0, 2)  # resumed: the complete shards are skipped
    assert "(2 already complete)" in again.summary()


def test_an_encode_job_called_without_a_lock_takes_it_and_is_refused_while_another_run_holds_it(tiny):
    from pipeline.latents.job import EncodeJob, EncodeOptions

    out = tiny / "held"
    held_by_another_run(out / ".lock")
    with pytest.raises(UserError, match="is in use by pid"):
        EncodeJob(resolve_weights(tiny / "vae"), str(tiny / "shards"), out, options=EncodeOptions(SMALL)).run()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, the other run's lock untouched


def test_an_encode_job_on_data_that_holds_nothing_names_the_data(tiny):
    from pipeline.errors import EmptyData
    from pipeline.latents.job import EncodeJob, EncodeOptions

    (tiny / "captions").mkdir()
    with tarfile.open(tiny / "captions" / "c-000000.tar", "w") as tar:  # an image that does not decode
        data = b"not a jpeg"
        info = tarfile.TarInfo("k0.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(EmptyData, match=rf"^{tiny / 'captions'}: no sample could be encoded"):
        EncodeJob(resolve_weights(tiny / "vae"), str(tiny / "captions"), tiny / "nothing",
                  options=EncodeOptions(SMALL)).run()


def test_a_job_launched_as_several_processes_without_their_process_group_is_refused_in_one_line(tiny, monkeypatch):
    """Launched as two processes (WORLD_SIZE=2) with no process group joining them, each process took itself for
    the whole job: the second encoded every shard without the main process's settings.json ("not a firststage
    latent folder") while the first encoded them all too; evaluate computed everything twice and wrote nothing on
    the second. Now both jobs say in one line what is missing, before any work."""
    from pipeline.latents.job import EncodeJob, EncodeOptions
    from pipeline.metrics.job import EvaluateJob, EvaluateOptions

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match=r"2 processes \(WORLD_SIZE\) but no process group"):
        EncodeJob(resolve_weights(tiny / "vae"), str(tiny / "shards"), tiny / "no-group",
                  options=EncodeOptions(SMALL)).run()
    assert not (tiny / "no-group").exists()
    opts = EvaluateOptions(["evaluate.lpips_backbone=random", "evaluate.likelihood_samples=0", *SMALL])
    with pytest.raises(UserError, match=r"2 processes \(WORLD_SIZE\) but no process group"):
        EvaluateJob(resolve_weights(tiny / "vae"), str(tiny / "shards"), tiny / "eval-no-group", opts).run()


def test_the_evaluate_job_writes_its_results_beside_the_model_or_where_asked(tiny):
    from pipeline.metrics.job import EvaluateJob, EvaluateOptions

    opts = EvaluateOptions(["evaluate.lpips_backbone=random", "evaluate.likelihood_samples=0", *SMALL])
    report = EvaluateJob(resolve_weights(tiny / "vae"), str(tiny / "shards"), tiny / "eval", opts).run()
    written = json.loads((tiny / "eval" / "eval.json").read_text())
    assert report.results["samples"] == written["samples"] == 6 and report.results["psnr"] == written["psnr"]
    assert "| PSNR (dB) |" in report.table and (tiny / "eval" / "eval_grid.png").is_file()
    assert report.summary().startswith(f"evaluate: 6 samples from {tiny / 'shards'} with ")


def test_an_export_job_takes_the_lock_beside_its_output_and_never_writes_over_the_model(tiny):
    from pipeline.weights.job import ExportJob, ExportOptions

    weights = resolve_weights(tiny / "vae")
    held_by_another_run(tiny / "exports" / ".vae-out.lock")
    job = ExportJob(weights, tiny / "exports" / "vae-out", "diffusers", ExportOptions(keep_scaling_factor=True))
    with pytest.raises(UserError, match="is in use by pid"):
        job.run()
    assert not (tiny / "exports" / "vae-out").exists()
    (tiny / "exports" / ".vae-out.lock").unlink()
    report = job.run()
    card = tiny / "exports" / "vae-out" / "README.md"
    assert card.is_file() and report.card == card and report.format == "diffusers"
    assert not (tiny / "exports" / ".vae-out.lock").exists()
    with pytest.raises(UserError):  # the model's own folder is never an export's output
        ExportJob(weights, tiny / "vae", "diffusers", ExportOptions(keep_scaling_factor=True, overwrite=True)).run()
    assert (tiny / "vae" / "config.json").is_file() and not (tiny / "vae" / "README.md").exists()
