"""The generation probe (firststage probe): on exactly Gaussian latents its validation loss reaches the analytic
minimum of the rectified-flow loss at every t of the grid; it resumes after SIGKILL to the state it saved; a folder
without a manifest, a model that did not encode the latents and codes are refused in one line. Its run on 2 gloo
processes is part of test_distributed's world; the demo's report shows its samples (test_docs' demo test)."""

import json
import signal
import time

import pytest
import torch

from harness import ForkedStage, run_main
from pipeline.probe.gaussian import write_gaussian_latents

# a 1-block DiT on 4x4x4 latents, uniform t (every t of the grid trained alike), no time shift
TINY_PROBE = ["--config", "probe-tiny", "probe.depth=1", "probe.hidden=32", "probe.heads=2", "probe.patch=1",
              "probe.t_sampling=uniform", "probe.time_shift=1", "probe.sample_steps=4", "probe.num_samples=4",
              "train.batch_size=64", "train.lr=3e-3", "train.warmup_steps=0", "evaluate.batch_size=128"]


@pytest.fixture
def gaussian(tmp_path):
    write_gaussian_latents(tmp_path / "train", 128)
    write_gaussian_latents(tmp_path / "val", 256)
    return tmp_path


def test_validation_loss_reaches_the_gaussian_minimum_at_every_t(gaussian, tmp_path):
    from pipeline.probe.flow import VAL_GRID, gaussian_minimum
    from stages.probe import main

    out = tmp_path / "probe"
    r = run_main(main, *TINY_PROBE, "--latents", gaussian / "train", "--val", gaussian / "val", "--output", out,
                 "train.max_steps=150", "probe.val_every=75", "probe.val_samples=256", "train.checkpoint_every=150")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "probe.json").read_text())
    assert res["t_grid"] == list(VAL_GRID) and res["step"] == 150
    for t in VAL_GRID:  # within 5% of the floor (256 x 64 draws per t: the estimate itself varies by about 1%)
        assert res["val_loss"][str(t)] == pytest.approx(gaussian_minimum(t), rel=0.05), (t, res["val_loss"])
    assert [c["step"] for c in res["curve"]] == [75, 150]
    assert res["fid"].startswith("not computed: no first stage decodes the samples")
    table = (out / "probe.md").read_text()
    assert "| validation loss at t = 0.5 |" in table and "DiTTransformer2DModel" in table
    assert "validation loss" in r.stdout and "probe.json" in r.stdout


def test_resumes_after_sigkill_to_the_state_it_saved(gaussian, tmp_path):
    from pipeline.checkpoint import find_resume_path, load_training_checkpoint
    from pipeline.config import load_config
    from pipeline.probe.trainer import ProbeTrainer
    from stages.probe import main
    from stages.train import make_accelerator

    out = tmp_path / "probe"
    args = [*TINY_PROBE, "--latents", gaussian / "train", "--output", out, "train.max_steps=400",
            "train.checkpoint_every=3", "train.keep_checkpoints=3", "probe.val_every=1000", "probe.val_samples=16"]
    proc = ForkedStage("stages.probe", *args)
    deadline = time.time() + 120
    while find_resume_path(out) is None:
        assert proc.poll() is None and time.time() < deadline, proc.output()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_training_checkpoint(find_resume_path(out))
    cfg = load_config(out / "config.yaml")
    state = ProbeTrainer(cfg, make_accelerator(cfg), "auto").state_dict()  # what --resume auto starts from
    for part in ("transformer", "ema"):
        assert set(state[part]) == set(saved[part]) and len(saved[part]) > 10
        assert all(torch.equal(state[part][k].cpu(), saved[part][k]) for k in saved[part]), part
    opt = state["optimizer"]["state"]
    assert len(opt) == len(saved["optimizer"]["state"]) > 0
    assert all(torch.equal(opt[i][k], saved["optimizer"]["state"][i][k]) for i in opt for k in ("exp_avg", "exp_avg_sq"))
    assert torch.equal(state["rng"]["torch"], saved["rng"]["torch"])  # the next t and noise draws are the same
    assert state["trainer"]["step"] == saved["trainer"]["step"] and state["trainer"]["ema_step"] == saved["trainer"]["ema_step"]
    step = saved["trainer"]["step"]
    r = run_main(main, *args, "train.max_steps=" + str(step + 3), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"from step {step} to {step + 3}" in r.stdout and json.loads((out / "probe.json").read_text())["step"] == step + 3
    again = run_main(main, *args)  # without --resume: the run is never started over
    assert again.returncode == 2 and "--resume auto continues it" in again.stderr


def test_refusals_are_one_line(gaussian, tmp_path):
    from stages.probe import main

    def refused(*args) -> str:
        r = run_main(main, *TINY_PROBE, "--output", tmp_path / "out", *args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        return lines[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"--latents {empty}: no manifest.json; not a latent folder" in refused("--latents", empty)
    write_gaussian_latents(tmp_path / "none", 0)  # a latent folder with nothing in it (before: "no shards to read")
    assert f"--val {tmp_path / 'none'}: its manifest.json lists no latent" in refused(
        "--latents", gaussian / "train", "--val", tmp_path / "none")
    write_gaussian_latents(tmp_path / "codes", 8, store="codes")
    assert "holds integer codes" in refused("--latents", tmp_path / "codes")
    assert "probe.heads: 3 does not divide probe.hidden (32)" in refused("--latents", gaussian / "train",
                                                                          "probe.heads=3")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_model_that_did_not_encode_the_latents_is_refused(tiny_run, tmp_path):
    """--model must be the first stage of the manifest: the same weights (sha256), else one line naming both."""
    from stages.probe import main

    folder = tmp_path / "lat"
    write_gaussian_latents(folder, 8)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model_sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    r = run_main(main, *TINY_PROBE, "--latents", folder, "--output", tmp_path / "out", "--model", tiny_run / "run")
    assert r.returncode == 2, r.stderr
    assert f"--model {tiny_run / 'run'} is not the model that encoded {folder}" in r.stderr
    assert "000000000000 in its manifest" in r.stderr and not (tmp_path / "out" / "checkpoints").exists()


def test_sigterm_saves_and_exits_75(gaussian, tmp_path):
    from pipeline.checkpoint import find_resume_path, read_trainer_state

    out = tmp_path / "probe"
    proc = ForkedStage("stages.probe", *TINY_PROBE, "--latents", gaussian / "train", "--output", out,
                       "train.max_steps=100000", "train.checkpoint_every=5", "probe.val_every=100000",
                       "probe.val_samples=16")
    deadline = time.time() + 120
    while find_resume_path(out) is None:
        assert proc.poll() is None and time.time() < deadline, proc.output()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 75, proc.output()
    stdout, _ = proc.output()
    step = read_trainer_state(find_resume_path(out))["step"]
    assert f"probe: preempted at step {step}; saved" in stdout and "rerun with --resume auto" in stdout


def test_class_labels_and_the_time_shift():
    """Class-conditional probes read the shards' `cls` member; RAE's shift is sqrt(dim / 4096), 1 at 4x32x32."""
    from pipeline.errors import UserError
    from pipeline.probe.flow import default_shift, shift_t
    from pipeline.probe.trainer import class_labels

    assert class_labels({"cls": [b"1", b"0", "2"]}, 3, "cpu").tolist() == [1, 0, 2]
    assert class_labels({"cls": [b"1"]}, 0, "cpu") is None  # unconditional: the member is ignored
    with pytest.raises(UserError, match="has no `cls` member"):
        class_labels({"cls": [b"1", None]}, 3, "cpu")
    with pytest.raises(UserError, match="class 3 is outside 0..2"):
        class_labels({"cls": [b"3"]}, 3, "cpu")
    with pytest.raises(UserError, match="class -1 is outside 0..2"):  # the label that is out, not the largest
        class_labels({"cls": [b"2", b"-1"]}, 3, "cpu")
    with pytest.raises(UserError, match=r"`cls` is not a class index \(b'dog'\)"):  # before: a ValueError traceback
        class_labels({"cls": [b"1", b"dog"]}, 3, "cpu")
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="probe.time_shift: must be > 0"):  # 0 maps every t to 0: clean latents only
        load_config("probe-tiny", ["probe.time_shift=0"])
    assert default_shift((4, 32, 32)) == 1.0 and default_shift((32, 16, 16)) == pytest.approx(2 ** 0.5)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_t(t, 2.0), torch.tensor([0.0, 0.4, 2 / 3, 1.0]))  # noisier t, same ends
