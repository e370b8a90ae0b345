"""Weights, configs and export outputs as a hostile or careless user gives them: nothing hangs, nothing is allocated
that the file cannot back, nothing outside a previous export is destroyed, and every refusal is one line naming the
file and what is wrong with it (the reliability issue's items 2, 6, 7, 10, 12, 13 and 14, on the weights side)."""

import errno
import json
import os
import resource
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import ForkedStage, run_main
from helpers import TINY
from pipeline.config import config_to_dict, load_config
from pipeline.models import build_autoencoder
from pipeline.weights.diffusers import save as save_diffusers
from test_reliability import one_line


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
    assert proc.returncode == 2 and f"{weights}: a FIFO, not a regular file" in err and "Traceback" not in err, err
    proc = ForkedStage("stages.evaluate", "--model", folder, "--data", tiny_run / "val")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"{weights}: a FIFO, not a regular file" in err, err
    config = folder / "config.json"
    config.unlink()
    os.mkfifo(config)
    proc = ForkedStage("stages.export", "--model", folder, "--output", tmp_path / "out", "--keep-scaling-factor")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"{config}: a FIFO, not a regular file" in err, err
    os.mkfifo(tmp_path / "vae.ckpt")
    r = evaluate("--model", tmp_path / "vae.ckpt", "--data", tiny_run / "val")
    assert r.returncode == 2 and "vae.ckpt: a FIFO, not a regular file" in r.stderr and one_line(r), r.stderr
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
    save_single_file(tiny_model(), tmp_path / "wide.safetensors", section, 32, 1.0)
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


def test_bad_single_file_metadata_and_encoder_configs_are_one_line(tiny_run, tmp_path):
    from pipeline.weights.single_file import save as save_single_file

    save_single_file(tiny_model(), tmp_path / "good.safetensors", config_to_dict(load_config("tiny"))["model"], 32, 1.0)
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
    assert export("--model", tiny_run / "run", "--output", tmp_path / "enc", "--format", "encoder-only").returncode == 0
    config = json.loads((tmp_path / "enc" / "encoder_config.json").read_text())
    for name, text, words in (("notjson", "{", "not valid JSON"),
                              ("nomodel", json.dumps({**config, "model": None}), "not a firststage encoder-only config"),
                              ("escape", json.dumps({**config, "weights": "../enc/encoder.safetensors"}),
                               "weights '../enc/encoder.safetensors' is not a file name in")):
        shutil.copytree(tmp_path / "enc", tmp_path / name)
        (tmp_path / name / "encoder_config.json").write_text(text)
        r = export("--model", tmp_path / name, "--output", tmp_path / f"{name}-out", "--keep-scaling-factor")
        assert r.returncode == 2 and f"{tmp_path / name / 'encoder_config.json'}: {words}" in r.stderr, r.stderr[-1500:]
        assert one_line(r)
