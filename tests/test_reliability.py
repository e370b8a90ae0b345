"""Hostile input, reruns and shared folders: nothing hangs, nothing doubles, nothing is written where it should not
be, and every mistake is one line (issue 11's reproductions, each failing on the code before the fix)."""

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness import ENV, ForkedStage, ROOT, run_main
from helpers import TINY, image_bytes, keys_in_tars, make_shards, random_image, write_images, write_tar


def prepare(*args):
    from stages.prepare import main

    return run_main(main, *args)


def train(*args):
    from stages.train import main

    return run_main(main, *TINY, *args)


def one_line(r) -> bool:
    """The error is one line (warnings printed before it are not part of it) and no traceback."""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("firststage ")]
    return len(errors) == 1 and "Traceback" not in r.stderr and r.stderr.rstrip().endswith(errors[0])


def decoded(folder: Path) -> dict[str, Image.Image]:
    out = {}
    for t in sorted(folder.glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if ext in ("jpg", "png", "webp"):
                    out[key] = Image.open(io.BytesIO(tf.extractfile(m).read()))
    return out


# ------------------------------------------------------------------------------------------ 1. data with no image
def test_training_on_shards_without_images_stops_with_one_line(tmp_path):
    write_tar(tmp_path / "text-000000.tar", [{"__key__": f"k{i}", "txt": b"caption"} for i in range(5)])
    t0 = time.time()
    r = train(f"data.train={tmp_path / 'text-000000.tar'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=5")
    assert r.returncode == 2 and "no image (jpg, jpeg, png, webp or bmp member) in the training data" in r.stderr
    assert "text-000000.tar" in r.stderr and one_line(r)
    assert time.time() - t0 < 60


def test_a_long_run_of_undecodable_samples_stops_the_run_from_a_loader_worker(tmp_path):
    write_tar(tmp_path / "bad-000000.tar", [{"__key__": f"k{i}", "jpg": b"not a jpeg at all"} for i in range(30)])
    before = children()
    r = train(f"data.train={tmp_path / 'bad-000000.tar'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=5",
              "data.num_workers=1", "data.max_bad_samples=25")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "25 undecodable training samples in a row" in r.stderr and "data.max_bad_samples" in r.stderr
    assert one_line(r)
    assert not children() - before  # the loader worker has ended with the run, not at a later garbage collection


def children() -> set[int]:
    """The pids of this process's children, exited ones not yet waited for included."""
    return {int(pid) for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()}


def wait_until(predicate, proc, timeout=60):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_sigterm_works_while_the_loader_is_stuck(tmp_path):
    # a source that never delivers: a command that writes nothing (a FIFO named like a shard no longer blocks the
    # loader: the storage refuses it before reading)
    started = tmp_path / "started"
    proc = ForkedStage("stages.train", *TINY, f"data.train=pipe:echo $$ > {started}; exec sleep 600",
                       "data.allow_pipe=true", f"output_dir={tmp_path / 'run'}", "train.sigterm_grace=2")
    try:
        wait_until(lambda: started.is_file() and started.read_text().strip(), proc)  # the loader reads the pipe
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 75 and "no step boundary within 2s" in err
    finally:
        if started.is_file():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(started.read_text()), signal.SIGKILL)


def test_a_fifo_named_like_a_shard_is_refused_not_waited_for(tmp_path):
    os.mkfifo(tmp_path / "stuck-000000.tar")  # opening it for reading would block until a writer comes: forever
    proc = ForkedStage("stages.train", *TINY, f"data.train={tmp_path / 'stuck-000000.tar'}",
                       f"output_dir={tmp_path / 'run'}", "train.max_steps=1")
    _, err = proc.communicate(timeout=60)  # killed and failed if it waits for a writer
    assert proc.returncode == 2 and "1 shard(s) (stuck-000000.tar) hold none" in err, err


# ------------------------------------------------------------------------------------------ 2. reruns of prepare
def test_a_loader_worker_dying_while_the_loop_joins_it_after_sigterm_is_a_stop(tmp_path, monkeypatch):
    """SLURM signals every process: a worker can die while the trainer joins it at the end of the loop. That is the
    preemption it was told of (save, exit 75), not a crash."""
    import contextlib

    import pipeline.train.trainer as trainer

    real_batches, real_advance = trainer.batches, trainer.Trainer.advance

    @contextlib.contextmanager
    def dying(loader):
        with real_batches(loader) as it:
            yield it
        raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Terminated.")

    def advance(self):
        real_advance(self)
        if self.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the run's handler sets its stop flag

    monkeypatch.setattr(trainer, "batches", dying)
    monkeypatch.setattr(trainer.Trainer, "advance", advance)
    make_shards(tmp_path / "shards", 1, 16, size=(40, 40))
    r = train(f"data.train={tmp_path / 'shards'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=50",
              "train.checkpoint_every=50")
    assert r.returncode == 75, r.stderr[-2000:]
    assert "preempted at step" in r.stdout and (tmp_path / "run" / "checkpoints").is_dir()


def test_prepare_rerun_with_other_inputs_or_options_is_refused_naming_what_differs(tmp_path):
    write_images(tmp_path / "in", 30, size=(43, 32))
    out = tmp_path / "out"
    base = ["--input", tmp_path / "in", "--output", out, "--shard-size", "10"]
    assert prepare(*base).returncode == 0
    write_images(tmp_path / "in", 10, size=(43, 32), prefix="new")  # inputs added
    r = prepare(*base)
    assert r.returncode == 2 and "(30 then, 40 now" in r.stderr and "--overwrite" in r.stderr
    r = prepare("--input", tmp_path / "in", "--output", out, "--shard-size", "10", "--size", "64", "--format", "webp")
    assert r.returncode == 2 and "format 'jpg' then, 'webp' now" in r.stderr and "size 256 then, 64 now" in r.stderr
    assert sorted(keys_in_tars(out)) == sorted(f"img{i:04d}" for i in range(30))  # untouched
    r = prepare(*base, "--overwrite", "--size", "16", "--format", "webp")
    assert r.returncode == 0, r.stderr
    keys = keys_in_tars(out)
    assert len(keys) == len(set(keys)) == 40
    assert {im.format for im in decoded(out).values()} == {"WEBP"} and max(decoded(out)["new0003"].size) <= 22
    assert json.loads((out / "manifest.json").read_text())["options"]["format"] == "webp"
    r = prepare(*base, "--size", "16", "--format", "webp")  # the same command: resumes, writes nothing new
    assert r.returncode == 0 and "wrote 40 samples" in r.stdout


# ------------------------------------------------------------------------------------------ 3, 4. names
def test_long_names_and_escaping_members_are_made_safe(tmp_path):
    write_images(tmp_path / "in", 1, size=(40, 30), prefix="x" * 118)
    r = prepare("--input", tmp_path / "in", "--output", tmp_path / "a")
    assert r.returncode == 0 and keys_in_tars(tmp_path / "a") == ["x" * 118 + "0000"], r.stderr
    jpg = image_bytes(random_image(40, 30))
    src = tmp_path / "hostile.tar"
    with tarfile.open(src, "w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, data=None, kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(data) if data is not None else 0
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
        add("../../evil.jpg", jpg)
        add("/abs/root.jpg", jpg)
        add("d" * 300 + ".jpg", jpg)
        add("link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("hard.jpg", kind=tarfile.LNKTYPE, link="evil.jpg")
        add("folder", kind=tarfile.DIRTYPE)
        add("dup.jpg", jpg)
        add("other.jpg", jpg)
        add("dup.jpg", jpg)
    r = prepare("--input", src, "--output", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    keys = keys_in_tars(tmp_path / "b")
    assert "evil" in keys and "abs/root" in keys and "dup" in keys and "other" in keys and len(keys) == 5
    long_key = next(k for k in keys if k.startswith("ddd"))
    assert len(long_key.encode()) <= 200
    with tarfile.open(next((tmp_path / "b").glob("*.tar"))) as tf:
        names = tf.getnames()
        assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)
        assert tf.extractfile(f"{long_key}.source_key.txt").read().decode() == "d" * 300
    reasons = [s["reason"] for s in json.loads((tmp_path / "b" / "manifest.json").read_text())["skipped"]]
    assert sum("symlink member" in x for x in reasons) == 1 and sum("hardlink member" in x for x in reasons) == 1
    assert sum("directory member" in x for x in reasons) == 1 and sum("duplicate key dup" in x for x in reasons) == 1


# ------------------------------------------------------------------------------------------ 5. locks
def test_two_runs_on_one_output_folder_refuse_each_other(tmp_path):
    from pipeline.storage import FolderLock

    make_shards(tmp_path / "shards", 1, 8, size=(40, 40))
    with FolderLock(tmp_path / "run", what="output_dir"):  # another run holds the folder
        r = train(f"data.train={tmp_path / 'shards'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1")
        assert r.returncode == 2 and f"is in use by pid {os.getpid()}" in r.stderr
        write_images(tmp_path / "in", 2)
        with FolderLock(tmp_path / "out"):
            r = prepare("--input", tmp_path / "in", "--output", tmp_path / "out")
            assert r.returncode == 2 and "is in use by pid" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a lock left by a dead process on this host is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "out" / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
    assert prepare("--input", tmp_path / "in", "--output", tmp_path / "out").returncode == 0
    assert not (tmp_path / "out" / ".lock").exists()


def test_killed_prepare_leaves_no_worker_writing(tmp_path):
    write_images(tmp_path / "in", 24, size=(1600, 1200))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "stages.prepare", "--input", str(tmp_path / "in"), "--output",
                             str(out), "--workers", "2", "--shard-size", "12", "--format", "webp", "--size", "1000"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(list(out.glob(".*.tar.*.tmp"))) >= 2, proc)  # both workers are writing a shard (seconds each)
    proc.kill()
    proc.wait()
    time.sleep(0.3)
    alive = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(out).encode() in _cmdline(p)]
    assert alive == []  # the pool's workers died with their parent


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


# ------------------------------------------------------------------------------------------ 6, 7. decoding
def png(img: Image.Image, **kw) -> bytes:
    return image_bytes(img, "PNG", **kw)


def test_images_are_decoded_upright_in_8_bit_rgb(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    grey16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    (src / "grey16.png").write_bytes(png(Image.fromarray(grey16)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 400x300, displayed 300x400
    (src / "rotated.jpg").write_bytes(image_bytes(random_image(400, 300), exif=exif.tobytes()))
    (src / "cmyk.jpg").write_bytes(image_bytes(Image.new("CMYK", (40, 30), (0, 255, 255, 0))))  # red
    rgba = Image.new("RGBA", (40, 30), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 30))
    (src / "palette.png").write_bytes(png(rgba.convert("P", palette=Image.Palette.ADAPTIVE)))
    (src / "la.png").write_bytes(png(Image.new("LA", (40, 30), (0, 0))))
    r = prepare("--input", src, "--output", tmp_path / "out", "--size", "200", "--format", "keep")
    assert r.returncode == 0 and "skipped 0" in r.stdout, r.stdout + r.stderr
    got = {k: np.asarray(v.convert("RGB")).astype(float) for k, v in decoded(tmp_path / "out").items()}
    assert {v.mode for v in decoded(tmp_path / "out").values()} == {"RGB"}
    assert got["grey16"].mean() == pytest.approx(grey16.mean() / 257, abs=1.0)  # scaled, not saturated
    assert got["rotated"].shape == (round(200 * 400 / 300), 200, 3)  # upright: taller than wide
    assert tuple(got["cmyk"][15, 20].round()) == pytest.approx((255, 0, 0), abs=3)
    assert got["la"].mean() == pytest.approx(255, abs=1)  # fully transparent: the white background
    assert got["palette"][:, 25:].mean() == pytest.approx(255, abs=2)  # transparent half: white, not black


def test_too_many_pixels_has_its_own_reason_and_jpegs_decode_smaller(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "huge.png").write_bytes(png(Image.new("L", (400, 300))))  # not big.png: one key, one file
    (src / "big.jpg").write_bytes(image_bytes(random_image(800, 600)))
    r = prepare("--input", src, "--output", tmp_path / "out", "prepare.max_pixels=100000", "--size", "64")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["reason"] for s in m["skipped"]] == ["too many pixels: 400 x 300 > 100000 (prepare.max_pixels)"]
    assert keys_in_tars(tmp_path / "out") == ["big"] and decoded(tmp_path / "out")["big"].size == (85, 64)


# ------------------------------------------------------------------------------------------ 8. SIGTERM at start-up
def test_sigterm_during_start_up_exits_75_for_requeue(tmp_path):
    make_shards(tmp_path / "shards", 1, 8, size=(40, 40))
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", *TINY, f"data.train={tmp_path / 'shards'}",
                             f"output_dir={tmp_path / 'run'}"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until(lambda: loaded(proc.pid, "libtorch"), proc)  # while torch and diffusers are being imported
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "preempted during start-up" in out and "--resume auto" in out
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / ".lock").exists()


# ------------------------------------------------------------------------------------------ 9. one line, not a traceback
def test_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from pipeline.data.shards import ShardWriter

    def full(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(ShardWriter, "write", full)
    write_images(tmp_path / "in", 3)
    r = prepare("--input", tmp_path / "in", "--output", tmp_path / "out")
    assert r.returncode == 74 and "no space left on the device of" in r.stderr and "MiB free" in r.stderr
    assert one_line(r) and not list((tmp_path / "out").rglob("*.tmp"))


def test_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    import shutil as sh

    make_shards(tmp_path / "shards", 1, 8, size=(40, 40))

    def torn(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3166080 vs 3165968")

    monkeypatch.setattr(torch, "save", torn)
    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage._replace(free=1024))
    r = train(f"data.train={tmp_path / 'shards'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
              "train.checkpoint_every=2")
    assert r.returncode == 74 and "no space left" in r.stderr and "unexpected pos" not in r.stderr
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # the unfinished checkpoint folder is gone too


def test_hostile_and_mistaken_files_are_one_line(tmp_path):
    from stages.evaluate import main as evaluate

    make_shards(tmp_path / "shards", 1, 8, size=(40, 40))
    assert train(f"data.train={tmp_path / 'shards'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
                 "train.checkpoint_every=2").returncode == 0
    ck = tmp_path / "run" / "checkpoints" / "step-00000002"
    checks = []
    (ck / "optimizer.pt").write_bytes(b"PK\x03\x04 not a torch file")
    checks.append(train(f"data.train={tmp_path / 'shards'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=3",
                        "--resume", "auto"))
    (ck / "autoencoder.safetensors").write_bytes(b"\xff" * 64)
    checks.append(run_main(evaluate, "--model", ck, "--data", tmp_path / "shards", "--no-ema"))
    random_image(40, 40).save(tmp_path / "photo.jpg")
    checks.append(train(f"data.train={tmp_path / 'photo.jpg'}", f"output_dir={tmp_path / 'r2'}"))
    checks.append(prepare("--input", tmp_path / "shards", "--output", tmp_path / "photo.jpg"))
    for r in checks:
        assert r.returncode == 2 and one_line(r), r.stderr[-2000:]
        assert "weights_only=False" not in r.stderr
    assert "optimizer.pt: refused" in checks[0].stderr
    assert "autoencoder.safetensors: not a readable safetensors file" in checks[1].stderr
    assert "is an image, not shards" in checks[2].stderr and "is a file, not a folder" in checks[3].stderr


def test_resume_with_another_model_shape_is_one_line(tmp_path):
    make_shards(tmp_path / "shards", 1, 8, size=(40, 40))
    args = [f"data.train={tmp_path / 'shards'}", f"output_dir={tmp_path / 'run'}", "train.checkpoint_every=1"]
    assert train(*args, "train.max_steps=1").returncode == 0
    r = train(*args, "train.max_steps=2", "model.latent_channels=8", "--resume", "auto")
    assert r.returncode == 2 and "in the checkpoint but" in r.stderr and "resume with the run's own config" in r.stderr


# ------------------------------------------------------------------------------------------ 10. smaller ones
def test_smaller_ones(tiny_run, tmp_path):
    from stages.evaluate import main as evaluate

    run = tiny_run / "run"
    weights = run / "checkpoints" / "step-00000040" / "autoencoder.safetensors"
    assert oct(weights.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # readable by the group like the rest
    assert list((run / "logs").glob("events.out.tfevents.*"))  # logs/, not logs/logs/
    r = run_main(evaluate, "--model", run, "--data", tiny_run / "val", "--num-samples", "0", "--output", tmp_path / "e")
    assert r.returncode == 2 and "evaluate.num_samples (--num-samples): must be >= 1" in r.stderr
    assert not (tmp_path / "e").exists()
    r = run_main(evaluate, "--model", run, "--data", tiny_run / "val", "--lpips-backbone", "random",
                 "evaluate.likelihood_samples=0", "--output", tmp_path / "e")
    assert r.returncode == 0 and "warning" not in r.stderr  # 64 by default, the data holds 20: nobody asked


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ the fuzz test
def test_hostile_folder_and_tar_through_prepare_and_the_loader(tmp_path):
    from pipeline.data.loader import make_loader

    src = tmp_path / "in"
    src.mkdir()
    (tmp_path / "outside.jpg").write_bytes(image_bytes(random_image(50, 40)))
    files = {
        "zero.jpg": b"",
        "truncated.jpg": image_bytes(random_image(200, 150))[:600],
        "png_named.jpg": png(random_image(50, 40)),
        "text.jpg": b"hello, not an image",
        "bomb.png": png(Image.new("L", (3000, 3000))),
        "grey16.png": png(Image.fromarray(np.full((30, 40), 40000, np.uint16))),
        "cmyk.jpg": image_bytes(Image.new("CMYK", (40, 30), (0, 0, 0, 0))),
        "palette_alpha.png": png(Image.new("RGBA", (40, 30), (9, 9, 9, 0)).convert("P")),
        "one.png": png(Image.new("RGB", (1, 1), (5, 6, 7))),
        "n" * 150 + ".jpg": image_bytes(random_image(40, 30)),
    }
    exif = Image.Exif()
    exif[0x0112] = 8
    files["rotated.jpg"] = image_bytes(random_image(60, 40), exif=exif.tobytes())
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    (src / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    before = {p for p in tmp_path.rglob("*")}
    r = prepare("--input", src, "--output", tmp_path / "out", "prepare.max_pixels=1000000")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    written = set(keys_in_tars(tmp_path / "out"))
    skipped = {Path(s["input"]).stem for s in m["skipped"]}
    stems = {Path(n).stem for n in files} | {"link", "dangling"}
    assert written | skipped == stems and not written & skipped
    assert {"zero", "truncated", "text", "bomb", "dangling"} == skipped
    # the same hostile content as a tar, with escaping names
    samples = [{"__key__": Path(n).stem, Path(n).suffix[1:]: d} for n, d in files.items()]
    samples.append({"__key__": "../../escape", "jpg": files["png_named.jpg"]})
    samples.append({"__key__": "one", "png": files["one.png"]})  # a duplicate key
    write_tar(tmp_path / "hostile.tar", samples)
    r = prepare("--input", tmp_path / "hostile.tar", "--output", tmp_path / "out2", "prepare.max_pixels=1000000")
    assert r.returncode == 0, r.stderr
    m2 = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert m2["total"] + m2["skipped_count"] == len(samples)
    for t in (tmp_path / "out2").glob("*.tar"):
        with tarfile.open(t) as tf:
            tf.extractall(tmp_path / "extracted", filter="data")  # raises if anything would land outside
    # nothing was written outside the output folders (and what we extracted ourselves)
    after = {p for p in tmp_path.rglob("*")}
    allowed = (tmp_path / "out", tmp_path / "out2", tmp_path / "extracted", tmp_path / "hostile.tar")
    assert all(any(p == a or a in p.parents for a in allowed) for p in after - before)
    # the loader reads the written shards completely, and the hostile tar without stopping
    n = sum(len(b["__key__"]) for b in make_loader(str(tmp_path / "out"), "eval", 4, resolution=16))
    assert n == m["total"]
    n_raw = sum(len(b["__key__"]) for b in make_loader(str(tmp_path / "hostile.tar"), "eval", 4, resolution=16))
    assert 0 < n_raw < len(samples)
    assert torch.is_tensor(next(iter(make_loader(str(tmp_path / "hostile.tar"), "eval", 4, resolution=16)))["image"])
