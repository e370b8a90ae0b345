"""The train stage: loss falls, distributed runs agree, kill/preempt/resume, NaN steps, early config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import shutil

import pytest
import torch

from harness import ENV, ForkedStage, ROOT, run_main
from helpers import TINY, make_shards
from pipeline.checkpoint import find_resume_path, list_checkpoints, read_trainer_state
from pipeline.losses.objective import FirstStageObjective



@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    make_shards(d, num_shards=4, per_shard=16, size=(48, 40))
    return str(d)


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]  # (validation rows hold val/*)


def train_inprocess(*args):
    from stages.train import run

    return run([*TINY, *args])


def test_tiny_model_trains_and_loss_falls(shards, tmp_path):
    run = tmp_path / "run"
    tr = train_inprocess(f"data.train={shards}", f"output_dir={run}", "train.max_steps=40", "train.log_every=5",
                         "train.image_every=20", "train.checkpoint_every=20")
    hist = losses(run)
    assert tr.state.step == 40 and [s for s, _ in hist] == list(range(5, 45, 5))
    first, last = sum(l for _, l in hist[:2]) / 2, sum(l for _, l in hist[-2:]) / 2
    assert last < 0.95 * first, hist
    # the run folder holds what a user and a resume need
    assert (run / "config.yaml").is_file()
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-00000020.png", "step-00000040.png"]
    assert [p.name for p in list_checkpoints(run)] == ["step-00000020", "step-00000040"]
    ck = find_resume_path(run)
    assert {"autoencoder.safetensors", "ema.safetensors", "optimizer.pt", "config.yaml", "trainer.json",
            "rng-rank0.pt"} <= {p.name for p in ck.iterdir()}


def test_vq_with_gan_r1_lecam_and_learned_logvar_runs(shards, tmp_path):
    tr = train_inprocess(f"data.train={shards}", f"output_dir={tmp_path / 'run'}", "model.kind=vq",
                         "train.max_steps=4", "train.log_every=2", "loss.adversarial.enabled=true",
                         "loss.adversarial.start_step=2", "loss.adversarial.r1_weight=0.1",
                         "loss.adversarial.lecam_weight=0.1", "loss.reconstruction.learned_logvar=true",
                         "train.grad_accum=2")
    assert tr.state.step == 4 and tr.state.skipped_steps == 0
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "train/g" not in rows[0] and "train/d_loss" in rows[1] and "train/codebook_usage" in rows[1]
    assert tr.objective.logvar.item() != 0.0


def test_nan_step_is_skipped_and_counted(shards, tmp_path, monkeypatch):
    real = FirstStageObjective.autoencoder_terms
    calls = {"n": 0}

    def poisoned(self, x, out, step, last_layer=None, **kw):
        total, terms = real(self, x, out, step, last_layer, **kw)
        calls["n"] += 1
        return (total * float("nan"), terms) if calls["n"] == 3 else (total, terms)

    monkeypatch.setattr(FirstStageObjective, "autoencoder_terms", poisoned)
    tr = train_inprocess(f"data.train={shards}", f"output_dir={tmp_path / 'run'}", "train.max_steps=6",
                         "train.log_every=3")
    assert tr.state.step == 6 and tr.state.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in tr.unwrapped.parameters())
    assert read_trainer_state(find_resume_path(tmp_path / "run"))["skipped_steps"] == 1


def test_too_many_bad_steps_stop_with_last_checkpoint(shards, tmp_path, monkeypatch):
    real = FirstStageObjective.autoencoder_terms

    def poisoned(self, x, out, step, last_layer=None, **kw):
        total, terms = real(self, x, out, step, last_layer, **kw)
        return (total * float("inf"), terms) if step >= 2 else (total, terms)

    monkeypatch.setattr(FirstStageObjective, "autoencoder_terms", poisoned)
    from pipeline.errors import Diverged

    with pytest.raises(Diverged, match=r"3 non-finite steps in a row.*step-00000002"):
        train_inprocess(f"data.train={shards}", f"output_dir={tmp_path / 'run'}", "train.max_steps=10",
                        "train.checkpoint_every=2", "train.max_bad_steps=3")


def start_train(shards, run, *args) -> ForkedStage:
    return ForkedStage("stages.train", *TINY, f"data.train={shards}", f"output_dir={run}", *args)


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.output()[1][-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_sigkill_then_resume_auto_continues_steps_and_loss(shards, tmp_path):
    from stages.train import main

    run = tmp_path / "run"
    args = ["train.max_steps=40", "train.checkpoint_every=5", "train.log_every=5", "train.keep_checkpoints=5"]
    proc = start_train(shards, run, *args)
    wait_for(lambda: len(list_checkpoints(run)) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_trainer_state(find_resume_path(run))["step"]
    assert 15 <= killed_at < 40
    before = [(s, l) for s, l in losses(run) if s <= killed_at]
    r = run_main(main, *TINY, f"data.train={shards}", f"output_dir={run}", *args, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"steps {killed_at}->40" in r.stdout
    rows = losses(run)
    assert [s for s, _ in rows] == list(range(5, 45, 5))  # steps redone after the kill are logged once
    after = [(s, l) for s, l in rows if s > killed_at]
    initial = before[0][1]
    progress = initial - min(l for _, l in before)
    assert after[0][1] < initial - 0.5 * progress, (before, after)  # no jump back to the initial loss


def test_sigterm_saves_and_exits_with_preempted_code(shards, tmp_path):
    """As SLURM preempts: SIGTERM to every process of the job, loader workers included."""
    run = tmp_path / "run"
    proc = start_train(shards, run, "train.max_steps=100000", "train.log_every=2", "train.checkpoint_every=100000",
                       "data.num_workers=2")
    wait_for(lambda: (run / "metrics.jsonl").is_file(), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    ck = find_resume_path(run)
    assert ck is not None and read_trainer_state(ck)["step"] >= 2
    assert "preempted" in out and "--resume auto" in out


def test_wrong_config_key_fails_before_any_work(shards, tmp_path):
    from stages.train import main

    run = tmp_path / "run"
    r = run_main(main, *TINY, f"data.train={shards}", f"output_dir={run}", "train.max_stesp=3")
    assert r.returncode == 2 and "did you mean train.max_steps" in r.stderr and "Traceback" not in r.stderr
    assert not run.exists()
    t0 = time.time()  # and before the heavy imports: a typo is reported at once
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "stages.cli", "train", *TINY, "train.max_stesp=3"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean train.max_steps" in r.stderr
    assert "diffusers" not in r.stderr and "accelerate" not in r.stderr, time.time() - t0  # nothing heavy was imported


def test_finetune_from_diffusers_folder_with_frozen_encoder(shards, tmp_path):
    from pipeline.config import load_config
    from pipeline.weights.diffusers import save as save_diffusers
    from pipeline.models import build_autoencoder

    cfg = load_config("tiny")
    torch.manual_seed(123)
    start = build_autoencoder(cfg.model, 32)
    save_diffusers(start, tmp_path / "sd-vae")
    tr = train_inprocess(f"data.train={shards}", f"output_dir={tmp_path / 'run'}", "train.max_steps=3",
                         f"train.init_from={tmp_path / 'sd-vae'}", "train.freeze_encoder=true")
    after = tr.unwrapped.vae.state_dict()
    before = start.state_dict()
    enc = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in before if k.startswith("decoder.") and k.endswith("weight")]
    assert all(torch.equal(before[k], after[k].cpu()) for k in enc)  # the latent space is untouched
    assert any(not torch.equal(before[k], after[k].cpu()) for k in dec)  # the decoder trained


def test_init_from_brings_its_shape_and_an_explicit_other_shape_is_a_clear_error(shards, tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import UserError
    from pipeline.weights.diffusers import save as save_diffusers
    from pipeline.models import build_autoencoder

    save_diffusers(build_autoencoder(load_config("tiny", ["model.latent_channels=8"]).model, 32), tmp_path / "other")
    tr = train_inprocess(f"data.train={shards}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                         f"train.init_from={tmp_path / 'other'}")  # the preset says 4 channels, the weights 8
    assert tr.cfg.model.latent_channels == 8 and tr.unwrapped.vae.config.latent_channels == 8
    assert "latent_channels: 8" in (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(UserError, match=r"has shape .* in the weights but .* in the config.s model"):
        train_inprocess(f"data.train={shards}", f"output_dir={tmp_path / 'run2'}", "train.max_steps=1",
                        f"train.init_from={tmp_path / 'other'}", "model.latent_channels=4")  # asked for explicitly


@pytest.mark.parametrize("extra", [[], ["model.scaling_factor=0.5"]], ids=["its-own-model", "another-section"])
def test_init_from_reads_its_weights_once(shards, tmp_path, monkeypatch, extra):
    """train.init_from's weights file is read once (load_init): the shape comes from that read, and the model it was
    read into is the one trained (its own model section) or hands its tensors to the run's model (another one)."""
    from pipeline.config import config_to_dict, load_config
    from pipeline.models import build_autoencoder
    from pipeline.weights import firststage

    cfg = load_config("tiny")
    torch.manual_seed(7)
    start = build_autoencoder(cfg.model, 32)
    firststage.save(start, tmp_path / "init", config_to_dict(cfg)["model"], 32)
    reads, read = [], firststage.load_tensors
    monkeypatch.setattr(firststage, "load_tensors", lambda path, *a: reads.append(Path(path).name) or read(path, *a))
    tr = train_inprocess(f"data.train={shards}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                         f"train.init_from={tmp_path / 'init'}", "train.freeze_encoder=true", *extra)
    assert reads == ["autoencoder.safetensors"]
    after = tr.unwrapped.vae.state_dict()
    assert all(torch.equal(v, after[k].cpu()) for k, v in start.state_dict().items() if k.startswith("encoder."))
    assert tr.unwrapped.vae.config.scaling_factor == (0.5 if extra else 1.0)


def test_sigterm_handler_is_restored_after_an_in_process_run(shards, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    train_inprocess(f"data.train={shards}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1")
    assert signal.getsignal(signal.SIGTERM) is before  # a process that called run() still dies on SIGTERM


def test_frozen_vq_codebook_does_not_drift_through_grids_and_validation(shards, tmp_path):
    """Writing the grid and validating used to put the inner model back in train mode: the frozen quantizer then
    updated its EMA statistics and codes on every later step."""
    from pipeline.config import load_config
    from pipeline.weights.diffusers import save as save_diffusers
    from pipeline.models import build_autoencoder

    torch.manual_seed(0)
    start = build_autoencoder(load_config("tiny", ["model.kind=vq"]).model, 32)
    save_diffusers(start, tmp_path / "vq")
    tr = train_inprocess(f"data.train={shards}", f"data.val={shards}", f"output_dir={tmp_path / 'run'}",
                         "model.kind=vq", f"train.init_from={tmp_path / 'vq'}", "train.freeze_encoder=true",
                         "train.max_steps=4", "train.image_every=1", "train.val_every=2", "train.val_samples=8")
    q = tr.unwrapped.vae.quantize
    assert not q.training
    assert torch.equal(q.embedding.weight.cpu(), start.quantize.codebook().detach())
    assert int(q.steps) == 0  # no statistics were updated


def test_a_diffusers_vq_folder_fine_tuned_with_its_own_codebook_keys_trains_our_quantizer(shards, tmp_path):
    """A diffusers VQModel folder (a VQ run exported) loads with diffusers' own quantizer, which neither updates its
    codebook by EMA nor restarts dead codes. Fine-tuned with codebook keys that describe it (the vq-f8 preset's are
    the defaults), the run trains firststage's quantizer initialised from the folder's codebook, as with other keys."""
    from pipeline.config import load_config
    from pipeline.models import build_autoencoder
    from pipeline.models.quantizer import VectorQuantizer
    from pipeline.weights.diffusers import save as save_diffusers

    vq = ["model.kind=vq", "model.codebook.update=ema", "model.codebook.dead_after=100",
          "model.codebook.usage_window=100"]  # the codebook keys' defaults, as vq-f8 has them
    torch.manual_seed(0)
    start = build_autoencoder(load_config("tiny", vq).model, 32)
    save_diffusers(start, tmp_path / "vq")
    tr = train_inprocess(f"data.train={shards}", f"output_dir={tmp_path / 'run'}", *vq,
                         f"train.init_from={tmp_path / 'vq'}", "train.max_steps=1")
    q = tr.unwrapped.vae.quantize
    assert isinstance(q, VectorQuantizer) and q.update == "ema"
    assert not torch.equal(q.embedding.weight.cpu(), start.quantize.codebook().detach())  # EMA moved the codes


def test_validation_logs_the_ema_weights_too_and_puts_the_raw_weights_back(shards, tmp_path):
    """val_ema/psnr is the PSNR of the EMA weights (what evaluate reports by default), val/psnr that of the raw
    weights, which are back in the model after the pass; the loss plot labels both curves."""
    import copy

    from pipeline.metrics.plots import training_curves

    run = tmp_path / "run"
    tr = train_inprocess(f"data.train={shards}", f"data.val={shards}", f"output_dir={run}", "train.max_steps=4",
                         "train.val_every=2", "train.val_samples=8", "train.ema_decay=0.9", "train.log_every=2")
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in rows if "val_ema/psnr" in r}
    assert sorted(val) == [2, 4]
    ema_vae = copy.deepcopy(tr.unwrapped.vae)
    ema_vae.load_state_dict(tr.ema.state_dict())
    assert tr.validator._evaluate(ema_vae.eval())["psnr"] == pytest.approx(val[4]["val_ema/psnr"], abs=1e-9)
    assert tr.validator._evaluate(tr.unwrapped.vae.eval())["psnr"] == pytest.approx(val[4]["val/psnr"], abs=1e-9)
    assert abs(val[4]["val/psnr"] - val[4]["val_ema/psnr"]) > 1e-6  # two different sets of weights
    labels = training_curves(run / "metrics.jsonl", tmp_path / "loss.png")
    assert labels == ["training loss", "held-out PSNR (dB), EMA weights (evaluate's default)",
                      "held-out PSNR (dB), raw weights"]


def test_discriminator_schedule_continues_across_resume(shards, tmp_path):
    """The discriminator's warm-up counts from the GAN start; a resumed run used to count it from step 0."""
    args = [f"data.train={shards}", "loss.adversarial.enabled=true", "loss.adversarial.start_step=2",
            "train.warmup_steps=10", "train.lr_scale=absolute", "train.checkpoint_every=3"]
    whole = train_inprocess(*args, f"output_dir={tmp_path / 'a'}", "train.max_steps=6")
    train_inprocess(*args, f"output_dir={tmp_path / 'b'}", "train.max_steps=3")
    resumed = train_inprocess(*args, f"output_dir={tmp_path / 'b'}", "train.max_steps=6", "--resume", "auto")
    assert resumed.state.step == whole.state.step == 6
    assert resumed.opt_d.param_groups[0]["lr"] == pytest.approx(whole.opt_d.param_groups[0]["lr"])
    assert resumed.opt.param_groups[0]["lr"] == pytest.approx(whole.opt.param_groups[0]["lr"])


def _tree(folder: Path) -> dict:
    """Every file under `folder` with its bytes (what a refused run must leave as it was)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_train_into_a_run_folder_is_refused_and_changes_nothing(tiny_run, shards, tmp_path):
    """A new user's second `firststage train` into the same output_dir, without --resume: one line naming the run's
    step and --resume auto, exit 2, and every file of the first run byte for byte as it was (before, it rewrote
    metrics.jsonl and config.yaml and pruned the first run's checkpoints). Also with --resume naming a checkpoint of
    another folder, and for a folder whose run saved no checkpoint (its logs)."""
    from stages.train import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    before = _tree(run)
    r = run_main(main, *TINY, f"data.train={shards}", f"output_dir={run}", "train.max_steps=60")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"output_dir {run} holds a run at step 40 (step-00000040): --resume auto continues it; choose another " \
           f"output_dir" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    other = tmp_path / "other"
    shutil.copytree(tiny_run / "run", other)
    r = run_main(main, *TINY, f"data.train={shards}", f"output_dir={run}", "train.max_steps=60",
                 "--resume", find_resume_path(other))
    assert r.returncode == 2 and "holds a run at step 40" in r.stderr, r.stderr[-2000:]
    assert _tree(run) == before
    logs_only = tmp_path / "logs-only"
    logs_only.mkdir()
    (logs_only / "metrics.jsonl").write_text('{"step": 5, "train/loss": 1.0}\n')
    r = run_main(main, *TINY, f"data.train={shards}", f"output_dir={logs_only}", "train.max_steps=2")
    assert r.returncode == 2 and "saved no checkpoint: --resume auto starts it again there" in r.stderr, r.stderr
    assert (logs_only / "metrics.jsonl").read_text() == '{"step": 5, "train/loss": 1.0}\n'
