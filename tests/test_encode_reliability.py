"""Encode and the latent reader against hostile and careless input (the reliability issue's encode items): shards
that hold nothing, special files, the input folder as the output, member names, members that collide with ours,
stale latents of other data, a full disk, SIGTERM during start-up and while a read hangs, `pipe:` sources, and
latent shards or manifests that were damaged after encoding. Each test failed on the code before its fix."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from harness import ENV, ROOT, ForkedStage, run_main
from helpers import image_bytes, random_image, read_tar_samples, write_tar
from helpers import make_shards as _make_shards
from pipeline.errors import DataError, UserError
from pipeline.latents import LatentDataset
from pipeline.manifest import read_manifest
from test_reliability import catches_sigterm, loaded, one_line

SMALL = ["data.resolution=32", "data.num_workers=0", "encode.batch_size=4"]


def make_shards(folder: Path, num_shards: int, per_shard: int, size) -> list[str]:
    return _make_shards(folder, num_shards, per_shard, size=size, prefix="shards")  # shards-000000.tar, ...


def encode(vae: Path, data, out: Path, *extra):
    from stages.encode import main

    return run_main(main, "--model", vae, "--data", data, "--output", out, *SMALL, *extra)


def members(folder: Path) -> list[str]:
    names = []
    for t in sorted(folder.glob("*.tar")):
        with tarfile.open(t) as tf:
            names += tf.getnames()
    return names


# ------------------------------------------------------------------------------ 1. a shard with no decodable image
@pytest.mark.parametrize("bad", ["empty", "captions-only", "symlink-loop", "first-truncated"])
def test_a_shard_without_a_decodable_image_is_a_complete_shard_of_0_samples(vae, tmp_path, bad):
    data = tmp_path / "data"
    make_shards(data, 3, 4, size=(40, 40))
    good = 12
    if bad == "empty":
        (data / "shards-000003.tar").write_bytes(b"")
    elif bad == "captions-only":
        write_tar(data / "shards-000003.tar", [{"__key__": f"c{i}", "txt": b"a caption"} for i in range(3)])
    elif bad == "symlink-loop":
        os.symlink("shards-000003.tar", data / "shards-000003.tar")
    else:
        (data / "shards-000000.tar").write_bytes(b"")
        good = 8
    out = tmp_path / "lat"
    r = encode(vae, data, out)
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_manifest(out)
    assert m["total"] == good and m["statistics"]["scaling_factor"] > 0 and "no statistics" not in r.stdout
    empty = [s for s in m["shards"] if s["samples"] == 0]
    assert len(empty) == 1 and empty[0]["skipped"] >= 1  # complete, with its reason listed
    again = encode(vae, data, out)
    assert again.returncode == 0 and f"({len(m['shards'])} already complete)" in again.stdout, again.stderr[-2000:]
    from stages.encode import main

    (out / "manifest.json").unlink()
    rebuilt = run_main(main, "--output", out, "--rebuild-manifest")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert read_manifest(out)["statistics"] == m["statistics"]
    assert sum(1 for _ in LatentDataset(out, mode="eval")) == good


# ------------------------------------------------------------------------------ 2. the input folder as the output
def test_encoding_into_the_folder_of_its_inputs_is_refused(vae, tmp_path):
    data = tmp_path / "data"
    make_shards(data, 2, 3, size=(40, 40))
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    (tmp_path / "alias").symlink_to(data)
    for out, spec in ((data, data), (tmp_path / "alias", f"{data}/*.tar")):
        r = encode(vae, spec, out)
        assert r.returncode == 2 and one_line(r), r.stderr[-2000:]
        assert f"--output {out} holds the input shard shards-000000.tar" in r.stderr
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # nothing written there, nothing replaced
    assert encode(vae, data, data / "latents").returncode == 0  # a folder inside the inputs' folder overwrites none


# ------------------------------------------------------------------------------ 3, 4. member names and collisions
def test_a_member_name_that_is_not_utf8_is_skipped_and_listed(vae, tmp_path):
    data = tmp_path / "data"
    make_shards(data, 1, 3, size=(40, 40))
    jpg = image_bytes(random_image(40, 40))
    with tarfile.open(data / "shards-000001.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for name in ("bad\udcffname.jpg", "good.jpg", "cap.\udcfe"):  # raw bytes b"bad\xffname.jpg" in the header
            info = tarfile.TarInfo(name)
            info.size = len(jpg)
            tf.addfile(info, io.BytesIO(jpg))
    out = tmp_path / "lat"
    for _ in range(2):  # and its rerun
        r = encode(vae, data, out)
        assert r.returncode == 0, r.stderr[-2000:]
    assert "(2 already complete)" in r.stdout
    m = read_manifest(out)
    assert {(s["key"], s["reason"]) for s in m["skipped"]} == {("bad\\xffname", "member name is not UTF-8"),
                                                                 ("cap", "member name is not UTF-8")}
    assert m["total"] == 4 and not list(out.rglob("*.tmp"))


def test_input_members_never_replace_ours_and_unsafe_names_are_not_copied(vae, tmp_path):
    jpg = image_bytes(random_image(40, 40))
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "shards-000000.tar", [
        {"__key__": "a", "jpg": jpg, "latents.safetensors": b"the input's own", "json": b'{"input": 1}',
         "source.json": b'{"src": 2}', "txt": b"caption a"},
        {"__key__": "../../escape", "jpg": jpg},
        {"__key__": "/abs/root", "jpg": jpg},
        {"__key__": "dup", "jpg": jpg, "txt": b"first"},
        {"__key__": "b", "jpg": jpg},
        {"__key__": "dup", "jpg": jpg, "txt": b"second"},
    ])
    out = tmp_path / "lat"
    r = encode(vae, tmp_path / "data", out)
    assert r.returncode == 0, r.stderr[-2000:]
    names = members(out)
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)
    samples = read_tar_samples(out)  # fails on a member name twice
    assert sorted(samples) == ["a", "b", "dup"] and samples["dup"]["txt"] == b"first"
    a = samples["a"]
    assert set(load_safetensors(a["latents.safetensors"])) == {"mean", "logvar"}  # ours
    assert json.loads(a["json"])["original_size"] == [40, 40]  # ours
    assert a["source.json"] == b'{"input": 1}' and a["source.source.json"] == b'{"src": 2}'
    assert a["source.latents.safetensors"] == b"the input's own" and a["txt"] == b"caption a"
    assert "; 2 input members renamed (ours have their names)" in r.stdout
    m = read_manifest(out)
    assert sorted((x["member"], x["as"]) for x in m["renamed"]) == [
        ("latents.safetensors", "source.latents.safetensors"), ("source.json", "source.source.json")]
    reasons = {s["key"]: s["reason"] for s in m["skipped"]}
    assert reasons["../../escape"] == "member name with a '..' component"
    assert reasons["/abs/root"] == "absolute member name" and reasons["dup"].startswith("duplicate key")
    with tarfile.open(out / "shards-000000.tar") as tf:
        tf.extractall(tmp_path / "x", filter="data")  # raises if a member would land outside


# ------------------------------------------------------------------------------ 5. the reader
def safetensors_bytes(header, payload: bytes = b"\0" * 1024) -> bytes:
    h = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(h)) + h + payload


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a latent shard in place, sample by sample (`change(index, sample)` edits a dict of members)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    out = list(samples.values())
    for i, s in enumerate(out):
        change(i, s)
    write_tar(path, out)


@pytest.fixture(scope="module")
def latents(vae, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latents")
    make_shards(root / "data", 2, 8, size=(40, 40))
    assert encode(vae, root / "data", root / "lat").returncode == 0
    return root / "lat"


def test_the_reader_skips_and_counts_bad_latents_and_nan(latents, tmp_path):
    folder = tmp_path / "lat"
    shutil.copytree(latents, folder)
    f32 = {"dtype": "F32", "shape": [4, 8, 8], "data_offsets": [0, 1024]}
    hostile = [
        struct.pack("<Q", 2**62) + b"{}",  # a huge header length
        safetensors_bytes({"mean": {**f32, "dtype": "F99"}, "logvar": f32}),  # a bogus dtype
        safetensors_bytes({"mean": {**f32, "data_offsets": [0, 10**9]}, "logvar": f32}),  # out of range
        safetensors_bytes('{"mean": %s, "mean": %s, "logvar": %s}' % ((json.dumps(f32),) * 3)),  # a name twice
    ]

    def damage(i, s):
        if i < len(hostile):
            s["latents.safetensors"] = hostile[i]
        elif i == 4:
            del s["latents.safetensors"]
        elif i == 5:
            del s["json"]

    rewrite_shard(folder / "shards-000000.tar", damage)
    nan = save_safetensors({"mean": torch.full((4, 8, 8), float("nan")), "logvar": torch.zeros(4, 8, 8)})
    rewrite_shard(folder / "shards-000001.tar", lambda i, s: s.update({"latents.safetensors": nan}) if i == 0 else None)
    ds = LatentDataset(folder, mode="eval")
    with pytest.warns(UserWarning) as warned:
        keys = [s["__key__"] for s in ds]
    assert "skipped 1 undecodable sample(s)" in str(warned[0].message)
    assert "s001_0000: non-finite latent (NaN/Inf)" in ds.skipped.latest  # the 7th: warnings come at 1, 2, 4
    assert len(keys) == 16 - 7 and ds.skipped.count == 7
    assert "s000_0006" in keys and "s001_0000" not in keys
    train = iter(LatentDataset(folder, batch_size=4, shuffle_buffer=4))
    with pytest.warns(UserWarning):
        batches = [next(train) for _ in range(12)]  # several passes over both shards, never stopped
    assert all(torch.isfinite(b["latents"]).all() for b in batches)


def test_a_run_of_bad_latents_stops_the_reader_at_its_limit(latents, tmp_path):
    folder = tmp_path / "lat"
    shutil.copytree(latents, folder)
    rewrite_shard(folder / "shards-000000.tar", lambda i, s: s.update({"latents.safetensors": b"junk"}))
    for mode in ("eval", "train"):
        with pytest.warns(UserWarning), pytest.raises(DataError, match="3 unreadable latent samples in a row") as e:
            list(zip(range(100), LatentDataset(folder, mode=mode, max_bad_samples=3, shuffle_buffer=0)))
        assert "max_bad_samples" in str(e.value) and "shards-000000.tar" in str(e.value)


def test_the_reader_checks_the_manifest_against_the_shards(latents, tmp_path):
    folder = tmp_path / "lat"
    shutil.copytree(latents, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["shards"][0]["samples"] = 0
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"shards-000000.tar: holds 8 samples, .*manifest.json says 0") as e:
        list(LatentDataset(folder, mode="eval"))
    assert "--rebuild-manifest" in str(e.value)
    (folder / "shards-000001.tar").unlink()
    with pytest.raises(DataError, match=r"lists 1 shard\(s\) that are not in the folder \(first: shards-000001.tar\)"):
        LatentDataset(folder, mode="eval")


# ------------------------------------------------------------------------------ 6. hangs
def test_a_named_pipe_among_the_shards_is_refused_at_once(vae, tmp_path):
    data = tmp_path / "data"
    make_shards(data, 2, 2, size=(40, 40))
    os.mkfifo(data / "shards-000009.tar")  # opening it blocks until a writer comes: forever
    proc = ForkedStage("stages.encode", "--model", vae, "--data", data, "--output", tmp_path / "lat", *SMALL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-2000:]
    assert f"--data {data / 'shards-000009.tar'} is a named pipe (FIFO), not a shard file (reading it would block " \
        f"forever)" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ 9. stale latents of other data
def test_other_data_under_the_same_shard_names_is_encoded_again(vae, tmp_path):
    make_shards(tmp_path / "small", 2, 3, size=(40, 40))
    make_shards(tmp_path / "other", 2, 3, size=(64, 48))  # the same shard names and keys, other images
    out = tmp_path / "lat"
    assert encode(vae, tmp_path / "small", out).returncode == 0
    r = encode(vae, tmp_path / "other", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(0 already complete, 2 encoded again: their input changed)" in r.stdout
    assert encode(vae, tmp_path / "other", tmp_path / "fresh").returncode == 0
    assert read_tar_samples(out) == read_tar_samples(tmp_path / "fresh")
    assert "(2 already complete)" in encode(vae, tmp_path / "other", out).stdout
    assert json.loads(read_tar_samples(out)["s000_0000"]["json"])["original_size"] == [64, 48]


# ------------------------------------------------------------------------- 11, 6. SIGTERM: at start-up, in a hung read
def test_sigterm_during_encode_start_up_exits_75(vae, tmp_path):
    """The signal comes while torch is being imported (or as soon as the handler is in place, if that is first):
    encode exits 75, which launch/slurm/encode.sbatch requeues, and has written nothing."""
    make_shards(tmp_path / "data", 1, 2, size=(40, 40))
    proc = subprocess.Popen([sys.executable, "-m", "stages.encode", "--model", str(vae), "--data",
                             str(tmp_path / "data"), "--output", str(tmp_path / "lat"), *SMALL], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (catches_sigterm(proc.pid) or loaded(proc.pid, "libtorch")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by SIGTERM" in out and not list((tmp_path / "lat").glob("*.tar"))


def _group_has(pgid: int, word: bytes, but: int | None = None) -> bool:
    """Whether a process of the group `pgid` (other than `but`) has `word` in its command line."""
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int(p.name) != but and os.getpgid(int(p.name)) == pgid and \
                    word in (p / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_sigterm_stops_encode_within_its_grace_while_a_read_hangs(vae, tmp_path):
    """data.allow_pipe=true lets a pipe: source through; one that never delivers holds the reader in read(2), and
    SIGTERM still ends the run with 75 after encode.sigterm_grace."""
    proc = ForkedStage("stages.encode", "--model", vae, "--data", "pipe:sleep 40", "--output", tmp_path / "lat",
                       *SMALL, "data.allow_pipe=true", "encode.sigterm_grace=2")
    try:
        deadline = time.time() + 60
        while not _group_has(proc.pid, b"sleep"):  # the reader waits on the pipe
            assert proc.poll() is None, proc.output()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 75 and time.time() - t0 < 20, err[-2000:]
        assert "did not stop within 2s (encode.sigterm_grace)" in err
        assert not (tmp_path / "lat" / ".lock").exists()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the sleep
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------ sources that are not files
def test_pipe_and_unknown_url_sources_are_refused_in_one_line(vae, tmp_path):
    from pipeline.sources import resolve_sources

    with pytest.raises(UserError, match=r"pipe:touch x: a pipe: source runs a shell command .*data.allow_pipe=true"):
        resolve_sources("pipe:touch x")
    (tmp_path / "list.txt").write_text("shards-000000.tar\npipe:curl -s http://example.com/{0..3}.tar\n")
    with pytest.raises(UserError, match="a pipe: source"):
        resolve_sources(tmp_path / "list.txt")
    assert resolve_sources("pipe:cat a.tar", allow_pipe=True) == ["pipe:cat a.tar"]
    with pytest.raises(UserError, match=r"unsupported URL scheme gs://"):
        resolve_sources("gs://bucket/shards-{000000..000009}.tar")
    r = encode(vae, f"pipe:touch {tmp_path / 'ran'}", tmp_path / "lat")
    assert r.returncode == 2 and one_line(r) and "--data pipe:touch" in r.stderr
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------------------ 13. a full disk
def test_a_full_disk_names_the_output_folder_and_leaves_no_temporary(vae, tmp_path, monkeypatch):
    from pipeline.data.shards import ShardWriter

    def full(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device")  # as tarfile raises it: no file name

    make_shards(tmp_path / "data", 2, 3, size=(40, 40))
    monkeypatch.setattr(ShardWriter, "write", full)
    out = tmp_path / "lat"
    r = encode(vae, tmp_path / "data", out)
    assert r.returncode == 74 and one_line(r), r.stderr[-2000:]
    assert f"no space left on the device of {out} (" in r.stderr and f"while writing {out}/shards-00000" in r.stderr
    assert not list(out.rglob("*.tmp")) and not list(out.glob("*.tar"))


def test_a_full_disk_while_writing_a_small_file_names_that_file(vae, tmp_path, monkeypatch):
    import pipeline.storage.local as local

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    make_shards(tmp_path / "data", 1, 2, size=(40, 40))
    monkeypatch.setattr(local.os, "fsync", full)
    out = tmp_path / "lat"
    r = encode(vae, tmp_path / "data", out)
    assert r.returncode == 74 and one_line(r), r.stderr[-2000:]
    assert f"no space left on the device of {out} (" in r.stderr
    assert f"while writing {out}/.lock;" in r.stderr  # its first write


def test_sigterm_stops_the_demos_encode_within_its_grace_while_a_read_hangs(vae, tmp_path):
    """The demo runs the encode job itself (stages.demo.encode): a SIGTERM while a read hangs ends it with 75 after
    encode.sigterm_grace, as it ends the stage, instead of waiting for the read."""
    code = ("import sys; from pathlib import Path; from stages.demo import encode; "
            "from pipeline.weights import resolve_weights; "
            "encode(resolve_weights(sys.argv[1]), 'pipe:sleep 1000', Path(sys.argv[2]), sys.argv[3:])")
    with open(tmp_path / "err", "w") as err:  # a file, not a pipe: the sleep holds what it inherits
        proc = subprocess.Popen([sys.executable, "-c", code, str(vae), str(tmp_path / "lat"), *SMALL,
                                 "data.allow_pipe=true", "encode.sigterm_grace=2"], cwd=ROOT, env=ENV,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 120
        while not _group_has(proc.pid, b"sleep", but=proc.pid):  # the reader waits on the pipe
            assert proc.poll() is None, (tmp_path / "err").read_text()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)  # the pipe never delivers: without the grace, no end
        assert proc.returncode == 75, (tmp_path / "err").read_text()[-2000:]
        assert "did not stop within 2s (encode.sigterm_grace)" in (tmp_path / "err").read_text()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the sleep
        except ProcessLookupError:
            pass
