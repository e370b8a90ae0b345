"""Weights, configs and export outputs as a hostile or careless user gives them: nothing hangs, nothing is allocated
that the file cannot back, nothing outside a previous export is destroyed, and every refusal is one line naming the
file and what is wrong with it (the reliability issue's items 2, 6, 7, 10, 12, 13 and 14, on the weights side)."""

import errno
import json
import os
import resource
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import ForkedStage, run_main
from helpers import TINY
from pipeline.config import config_to_dict, load_config
from pipeline.models import build_autoencoder
from pipeline.weights.diffusers import save as save_diffusers
from test_reliability import one_line


SCALE_1 = {"kind": "scale_shift", "scaling_factor": 1.0, "shift_factor": None, "source": "the test"}

def export(*args):
    from stages.export import main

    return run_main(main, *args)


def evaluate(*args):
    from stages.evaluate import main

    return run_main(main, *args, "--lpips-backbone", "random", "evaluate.likelihood_samples=0")


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    return build_autoencoder(load_config("tiny", [f"model.{k}={v}" for k, v in over.items()]).model, 32).eval()


def files_of(folder):
    """Every file below `folder` with its size and mtime: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def capped(fn, headroom=2**30):
    """fn() in a forked child whose address space may grow by `headroom` bytes at most (RLIMIT_AS): returns what it
    raised as 'Type: message' (or 'ok'), and how far the child's resident memory grew (bytes)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            vm = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmSize"))) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, resource.RLIM_INFINITY))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                fn()
                outcome = "ok"
            except BaseException as e:  # noqa: BLE001 (what was raised is the answer)
                outcome = f"{type(e).__name__}: {e}"
            grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
            os.write(write, json.dumps([outcome, grew]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return json.loads(answer)


# ------------------------------------------------------------------------------ 2. export over its own model
def test_export_never_writes_over_or_into_the_models_own_folders(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "A"
    shutil.copytree(tiny_run / "run", run)
    before = files_of(run)
    cases = {
        (run,): "is the model's folder",
        (run / "checkpoints",): "lies inside the model's folder",
        (run / "vae",): "lies inside the model's folder",
        (tmp_path / "runs",): "contains the model's folder",
        (run / "checkpoints" / "step-00000040" / "ema.safetensors", "--format", "single-file"): "lies inside",
    }
    for (out, *more), words in cases.items():
        r = export("--model", run, "--output", out, "--overwrite", *more)
        assert r.returncode == 2 and words in r.stderr and f"--output {out}" in r.stderr, r.stderr
        assert one_line(r)
    ck = run / "checkpoints" / "step-00000040"
    r = export("--model", ck, "--output", run / "x.safetensors", "--format", "single-file")  # the checkpoint's run
    assert r.returncode == 2 and f"lies inside the model's folder {run.resolve()}" in r.stderr, r.stderr
    assert files_of(run) == before  # nothing written, nothing deleted
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for flags in ([], ["--overwrite"]):
        r = export("--model", run, "--output", ".", *flags)
        assert r.returncode == 2 and "is the working folder" in r.stderr and one_line(r), r.stderr
    assert list(work.iterdir()) == []


def test_overwrite_replaces_a_previous_export_only(tiny_run, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    r = export("--model", tiny_run / "run", "--output", notes, "--overwrite")
    assert r.returncode == 2 and "holds todo.txt, which no export writes" in r.stderr and one_line(r), r.stderr
    assert (notes / "todo.txt").read_text() == "mine"
    # a single file: a NAME.md that is not our card is never replaced, with or without --overwrite
    (tmp_path / "vae.md").write_text("my notes")
    out = tmp_path / "vae.safetensors"
    r = export("--model", tiny_run / "run", "--output", out, "--format", "single-file")
    assert r.returncode == 2 and f"--output {tmp_path / 'vae.md'} exists" in r.stderr and one_line(r), r.stderr
    r = export("--model", tiny_run / "run", "--output", out, "--format", "single-file", "--overwrite")
    assert r.returncode == 2 and "vae.md is not a model card firststage export wrote" in r.stderr and one_line(r)
    assert (tmp_path / "vae.md").read_text() == "my notes" and not out.exists()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))  # someone else's weights
    r = export("--model", tiny_run / "run", "--output", tmp_path / "other.safetensors", "--format", "single-file",
               "--overwrite")
    assert r.returncode == 2 and "no firststage metadata" in r.stderr and one_line(r), r.stderr
    # a previous export is replaced (and so is one killed before its card was written)
    for fmt, name in (("diffusers", "vae"), ("single-file", "vae2.safetensors")):
        out = tmp_path / name
        assert export("--model", tiny_run / "run", "--output", out, "--format", fmt).returncode == 0
        r = export("--model", tiny_run / "run", "--output", out, "--format", fmt, "--overwrite")
        assert r.returncode == 0, r.stderr
    (tmp_path / "vae" / "README.md").unlink()
    assert export("--model", tiny_run / "run", "--output", tmp_path / "vae", "--overwrite").returncode == 0
    assert not list(tmp_path.glob(".*.lock")) and not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------ 6. FIFOs and devices
def test_a_fifo_as_weights_or_config_is_one_line_and_never_opened(tiny_run, tmp_path):
    folder = tmp_path / "vae"
    save_diffusers(tiny_model(), folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)  # opening it for reading would block until a writer comes: forever
    proc = ForkedStage("stages.train", *TINY, f"data.train={tiny_run / 'train'}", f"output_dir={tmp_path / 'run'}",
                       "train.max_steps=1", f"train.init_from={folder}")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"{weights}: a named pipe (FIFO), not a regular file" in err and "Traceback" not in err, err
    proc = ForkedStage("stages.evaluate", "--model", folder, "--data", tiny_run / "val")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"{weights}: a named pipe (FIFO), not a regular file" in err, err
    config = folder / "config.json"
    config.unlink()
    os.mkfifo(config)
    proc = ForkedStage("stages.export", "--model", folder, "--output", tmp_path / "out", "--keep-scaling-factor")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"{config}: a named pipe (FIFO), not a regular file" in err, err
    os.mkfifo(tmp_path / "vae.ckpt")
    r = evaluate("--model", tmp_path / "vae.ckpt", "--data", tiny_run / "val")
    assert r.returncode == 2 and "vae.ckpt: a named pipe (FIFO), not a regular file" in r.stderr and one_line(r), r.stderr
    r = evaluate("--model", "/dev/zero", "--data", tiny_run / "val")
    assert r.returncode == 2 and "/dev/zero: a character device, not a regular file" in r.stderr, r.stderr


# ------------------------------------------------------------------------------ 7. small files, big memory
def zip_bomb(path, declared: int) -> None:
    """A torch .ckpt of one tiny tensor whose record data/0 inflates to `declared` bytes of zeros, as a deflated zip
    member of about declared/1000 bytes (16 MiB blocks, each restartable, repeated)."""
    import io
    import zipfile
    import zlib

    buf = io.BytesIO()
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(4)}}, buf)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(bytes(1 << 24)) + co.flush(zlib.Z_FULL_FLUSH)
    n = declared >> 24
    payload = block * n + b"\x03\x00"  # the blocks, then an empty final block
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                out.writestr(info, src.read(info))
                continue
            bomb = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            bomb.compress_type, bomb.file_size, bomb.compress_size, bomb.CRC = zipfile.ZIP_DEFLATED, n << 24, len(payload), 0
            bomb.header_offset = out.fp.tell()
            out.fp.write(bomb.FileHeader(zip64=False))
            out.fp.write(payload)
            out.start_dir = out.fp.tell()
            out.filelist.append(bomb)
            out.NameToInfo[bomb.filename] = bomb


def test_small_files_that_declare_gigabytes_are_refused_before_allocating(tmp_path):
    from helpers import load_model
    from pipeline.weights.single_file import save as save_single_file

    zip_bomb(tmp_path / "bomb.ckpt", 3_900_000_000)
    assert (tmp_path / "bomb.ckpt").stat().st_size < 5e6
    outcome, grew = capped(lambda: load_model(tmp_path / "bomb.ckpt"))
    assert outcome.startswith("UserError") and "zip members declare 3.63 GiB and the file holds 3.6 MiB" in outcome, outcome
    assert grew < 2**28
    # an old-style (non-zip) torch file whose pickle declares a storage of 10**9 floats, in 5 KB
    import io

    buf = io.BytesIO()
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1000)}}, buf, _use_new_zipfile_serialization=False)
    numel = b"M" + (1000).to_bytes(2, "little")  # BININT2 1000: the storage's declared size, first in the pickle
    (tmp_path / "old.pt").write_bytes(buf.getvalue().replace(numel, b"J" + (10**9).to_bytes(4, "little"), 1))
    outcome, grew = capped(lambda: load_model(tmp_path / "old.pt"))
    assert outcome.startswith("UserError") and "old.pt: its pickle declares 3.73 GiB of storages and the file holds" in outcome, outcome
    assert grew < 2**28
    # a single file whose metadata declares 16384-wide layers (9.7 GB) for weights 64 wide
    section = {**config_to_dict(load_config("tiny"))["model"], "block_out_channels": [16384] * 3}
    save_single_file(tiny_model(), tmp_path / "wide.safetensors", section, 32, SCALE_1)
    outcome, grew = capped(lambda: load_model(tmp_path / "wide.safetensors"))
    assert outcome.startswith("UserError") and "wide.safetensors: encoder.conv_in.weight has shape (16, 3, 3, 3) " \
        "in the weights but (16384, 3, 3, 3) in the config's model" in outcome, outcome
    assert grew < 2**28
    # a diffusers folder whose config.json declares them
    save_diffusers(tiny_model(), tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "block_out_channels": [16384] * 3}))
    outcome, grew = capped(lambda: load_model(tmp_path / "vae"))
    assert outcome.startswith("UserError") and "config.json: encoder.conv_in.weight has shape (16, 3, 3, 3) in the " \
        "weights but (16384, 3, 3, 3)" in outcome, outcome
    assert grew < 2**28


# ------------------------------------------------------------------------------ 10. NaN
def test_export_refuses_non_finite_weights_and_latent_factors(tiny_run, tmp_path):
    nan = tiny_model()
    with torch.no_grad():
        nan.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    save_diffusers(nan, tmp_path / "nan")
    r = export("--model", tmp_path / "nan", "--output", tmp_path / "out", "--keep-scaling-factor")
    assert r.returncode == 2 and "decoder.conv_out.weight holds 1 non-finite value(s)" in r.stderr and one_line(r)
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    ev = json.loads((run / "eval.json").read_text())
    ev["latents"]["std"] = float("nan")  # the measured std the scaling factor comes from
    (run / "eval.json").write_text(json.dumps(ev))  # json writes NaN, and reads it back
    r = export("--model", run, "--output", tmp_path / "out")
    assert r.returncode == 2 and f"{run / 'eval.json'} (64 samples): scaling_factor nan is not a finite number > 0" \
        in r.stderr and one_line(r), r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ------------------------------------------------------------------------------ 12. a file without a config
def test_a_config_less_file_gets_its_group_count_right_and_says_what_it_assumed(tiny_run, tmp_path):
    """The tiny run (GroupNorm 8, widths 16/32/64) saved as a plain LDM .ckpt: its shapes fit 1, 2, 4, 8 and 16 groups;
    it loads with 8, evaluates exactly as the run itself, and says so; an override is taken as it is."""
    from helpers import load_model
    from pipeline.weights.ldm import diffusers_to_ldm

    model, _ = load_model(tiny_run / "run")
    torch.save({"state_dict": diffusers_to_ldm(model.state_dict())}, tmp_path / "plain.ckpt")
    r = evaluate("--model", tmp_path / "plain.ckpt", "--data", tiny_run / "val", "--output", tmp_path / "e1",
                 "data.resolution=32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: plain.ckpt carries no model config: assumed model.norm_num_groups=8 (the one of 1/2/4/8/16 that " \
        "reconstructs test images best" in r.stderr and "data.resolution" not in r.stderr.split("note:")[1], r.stderr
    assert evaluate("--model", tiny_run / "run", "--data", tiny_run / "val", "--output", tmp_path / "e0").returncode == 0
    psnr = [json.loads((tmp_path / e / "eval.json").read_text())["psnr"] for e in ("e0", "e1")]
    assert psnr[0] == pytest.approx(psnr[1], abs=1e-6)
    loaded, cfg = load_model(tmp_path / "plain.ckpt")
    assert cfg.model.norm_num_groups == loaded.config.norm_num_groups == 8 and cfg.data.resolution == 256
    loaded, cfg = load_model(tmp_path / "plain.ckpt", overrides=["model.norm_num_groups=16"])
    assert cfg.model.norm_num_groups == 16 and {m.num_groups for m in loaded.modules()
                                                 if isinstance(m, torch.nn.GroupNorm)} == {16}
    from pipeline.weights.single_file import SD_WIDTHS, settle_norm_groups

    assert settle_norm_groups(None, SD_WIDTHS)[0] == 32  # an SD-shaped file loads as before, without a probe


# ------------------------------------------------------------------------------ 13. one line, not a traceback
def test_bad_diffusers_configs_are_one_line_naming_the_file(tiny_run, tmp_path):
    save_diffusers(tiny_model(), tmp_path / "good")
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    bad = {"list": json.dumps([config]).encode(), "binary": bytes(range(256)) * 4,
           "field": json.dumps({**config, "layers_per_block": "two"}).encode(),
           "negative": json.dumps({**config, "block_out_channels": [16, -32, 64]}).encode(),
           "huge": b"{" + b" " * (2**20) + b"}"}
    words = {"list": "not a firststage diffusers config (not a JSON object)", "binary": "not valid JSON",
             "field": "does not describe a AutoencoderKL (TypeError", "negative": "does not describe a AutoencoderKL",
             "huge": "too large for a diffusers config"}
    for name, data in bad.items():
        shutil.copytree(tmp_path / "good", tmp_path / name)
        (tmp_path / name / "config.json").write_bytes(data)
        r = evaluate("--model", tmp_path / name, "--data", tiny_run / "val")
        assert r.returncode == 2 and f"{tmp_path / name / 'config.json'}: " in r.stderr and words[name] in r.stderr, \
            (name, r.stderr[-1500:])
        assert one_line(r), r.stderr[-1500:]


def test_bad_single_file_metadata_and_encoder_configs_are_one_line(tiny_run, encoder_only, tmp_path):
    from pipeline.weights.single_file import save as save_single_file

    save_single_file(tiny_model(), tmp_path / "good.safetensors", config_to_dict(load_config("tiny"))["model"], 32,
                     SCALE_1)
    state = load_file(tmp_path / "good.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "good.safetensors"), "pt") as f:
        meta = f.metadata()
    bad = {"firststage_model": ("not json", "metadata firststage_model is 'not json', not a JSON object"),
           "resolution": ("abc", "metadata resolution is 'abc', not an integer from 8 to 16384"),
           "scaling_factor": ("nan", None)}
    for key, (value, words) in bad.items():
        path = tmp_path / f"bad-{key}.safetensors"
        save_file(state, str(path), metadata={**meta, key: value} if key != "scaling_factor"
                  else {k: v for k, v in {**meta, key: value}.items() if k != "firststage_model"})
        r = evaluate("--model", path, "--data", tiny_run / "val", "--output", tmp_path / "e")
        words = words or "metadata scaling_factor is 'nan', not a finite number"
        assert r.returncode == 2 and f"{path}: {words}" in r.stderr and one_line(r), r.stderr[-1500:]
    save_file(state, str(tmp_path / "bad-model.safetensors"),
              metadata={**meta, "firststage_model": json.dumps({"layers_per_block": "two"})})
    r = evaluate("--model", tmp_path / "bad-model.safetensors", "--data", tiny_run / "val", "--output", tmp_path / "e")
    assert r.returncode == 2 and "bad-model.safetensors: model.layers_per_block" in r.stderr and one_line(r), r.stderr
    # encoder-only: a config that is not JSON, that lacks its model, that names a file outside its folder
    config = json.loads((encoder_only / "encoder_config.json").read_text())
    shutil.copytree(encoder_only, tmp_path / "enc")  # a real weights file outside each folder below, for "escape"
    for name, text, words in (("notjson", "{", "not valid JSON"),
                              ("nomodel", json.dumps({**config, "model": None}), "not a firststage encoder-only config"),
                              ("escape", json.dumps({**config, "weights": "../enc/encoder.safetensors"}),
                               "weights '../enc/encoder.safetensors' is not a file name in")):
        shutil.copytree(encoder_only, tmp_path / name)
        (tmp_path / name / "encoder_config.json").write_text(text)
        r = export("--model", tmp_path / name, "--output", tmp_path / f"{name}-out", "--keep-scaling-factor",
                   "--format", "encoder-only")
        assert r.returncode == 2 and f"{tmp_path / name / 'encoder_config.json'}: {words}" in r.stderr, r.stderr[-1500:]
        assert one_line(r)


def test_evaluate_writes_beside_a_single_file_and_refuses_an_encoder_only_export(tiny_run, encoder_only, tmp_path):
    r = export("--model", tiny_run / "run", "--output", tmp_path / "vae.safetensors", "--format", "single-file")
    assert r.returncode == 0, r.stderr
    r = evaluate("--model", tmp_path / "vae.safetensors", "--data", tiny_run / "val")
    assert r.returncode == 0 and (tmp_path / "eval.json").is_file(), r.stderr[-2000:]  # the file's folder
    assert json.loads((tmp_path / "eval.json").read_text())["weights"] == "single file vae.safetensors"
    (tmp_path / "taken").write_text("a file")
    r = evaluate("--model", tmp_path / "vae.safetensors", "--data", tiny_run / "val", "--output", tmp_path / "taken")
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and one_line(r)
    r = evaluate("--model", encoder_only, "--data", tiny_run / "val")
    assert r.returncode == 2 and "an encoder-only export has no decoder" in r.stderr and one_line(r), r.stderr[-1500:]
    for fmt, name in (("diffusers", "vae"), ("single-file", "vae2.safetensors")):  # nor re-exported with a random one
        r = export("--model", encoder_only, "--output", tmp_path / name, "--format", fmt, "--keep-scaling-factor")
        assert r.returncode == 2 and "has no decoder; a" in r.stderr and one_line(r), r.stderr[-1500:]
        assert not (tmp_path / name).exists()


def test_a_full_disk_during_export_is_exit_74_in_one_line(tiny_run, tmp_path, monkeypatch):
    import shutil as sh

    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)  # what diffusers' save_pretrained and ours call
    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage._replace(free=1024))
    for fmt, name in (("diffusers", "vae"), ("single-file", "vae.safetensors")):
        r = export("--model", tiny_run / "run", "--output", tmp_path / name, "--format", fmt)
        assert r.returncode == 74 and "no space left on the device of" in r.stderr and one_line(r), r.stderr[-1500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half export, no staging file, no lock


def test_a_full_disk_while_evaluate_writes_its_results_is_exit_74_in_one_line(tiny_run, tmp_path, monkeypatch):
    """The device fills up when eval.json is flushed: one line, exit 74, and nothing half-written is left."""
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # what every atomic write calls before its rename
    r = evaluate("--model", tiny_run / "run", "--data", tiny_run / "val", "--output", tmp_path / "ev")
    assert r.returncode == 74 and "no space left on the device of" in r.stderr and one_line(r), r.stderr[-1500:]
    assert "eval.json" in r.stderr and sorted(p.name for p in (tmp_path / "ev").iterdir()) == [], r.stderr[-1500:]


def test_stats_with_an_empty_statistics_section_is_one_line(tiny_run, tmp_path):
    from helpers import load_model
    from pipeline.latents.format import model_sha256
    from pipeline.manifest import LATENT_FORMAT

    model, _ = load_model(tiny_run / "run")
    manifest = {"format": LATENT_FORMAT, "shards": [], "model_sha256": model_sha256(model), "statistics": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    r = export("--model", tiny_run / "run", "--output", tmp_path / "out", "--stats", tmp_path / "manifest.json")
    assert r.returncode == 2 and f"--stats {tmp_path / 'manifest.json'}: the manifest holds no latent statistics" \
        in r.stderr and one_line(r), r.stderr[-1500:]
