import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds

from harness import ROOT, run_main
from helpers import image_bytes, keys_in_tars, make_shards, random_image, write_images, write_tar
from pipeline.data.prepare import PrepareOptions, list_sources, output_shard_name, plan_part, prepare, write_shard
from pipeline.errors import UserError


def run_cli(*args, check=True):
    from stages.prepare import main

    r = run_main(main, *args)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_folder_input_with_captions_readable_by_tarfile_and_webdataset(tmp_path):
    keys = write_images(tmp_path / "in", 7, size=(120, 90), captions=True)
    write_images(tmp_path / "in" / "nested", 2, size=(64, 64), prefix="n")
    out = tmp_path / "out"
    r = run_cli("--input", tmp_path / "in", "--output", out, "--size", "64", "--shard-size", "4", "--workers", "2")
    assert "wrote 9 samples" in r.stdout and "skipped 0" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["total"] == 9 and [s["samples"] for s in m["shards"]] == [4, 4, 1]
    assert sorted(keys_in_tars(out)) == sorted(keys + ["nested/n0000", "nested/n0001"])
    # plain webdataset reads them, captions carried under the same key
    samples = list(wds.WebDataset(str(out / "shards-{000000..000002}.tar"), shardshuffle=False))
    assert len(samples) == 9
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["img0003"]["txt"] == b"caption 3"
    img = wds.autodecode.imagehandler("pil")("jpg", by_key["img0003"]["jpg"])
    assert min(img.size) == 64  # shorter side resized to --size
    assert m["output_sizes"] and m["input_shorter_side"]["max"] == 90


def test_real_photos_center_crop_webp(photos, tmp_path):
    out = tmp_path / "out"
    prepare([str(photos)], out, PrepareOptions(size=96, resize="center-crop", format="webp", quality=80))
    m = json.loads((out / "manifest.json").read_text())
    assert m["total"] == 4 and m["output_sizes"] == {"96x96": 4}
    with tarfile.open(out / "shards-000000.tar") as tf:
        assert sorted(n.name for n in tf.getmembers()) == [f"{k}.webp" for k in ("astronaut", "chelsea", "coffee", "rocket")]


def test_list_input_relative_and_missing(tmp_path):
    write_images(tmp_path / "imgs", 3)
    (tmp_path / "list.txt").write_text("# my list\nimgs/img0000.jpg\n\nimgs/img0002.jpg\nimgs/nope.jpg\n")
    m = prepare([str(tmp_path / "list.txt")], tmp_path / "out", PrepareOptions(size=32))
    assert m["total"] == 2
    assert sorted(keys_in_tars(tmp_path / "out")) == ["imgs/img0000", "imgs/img0002"]
    assert m["skipped_count"] == 1 and "nope.jpg" in m["skipped"][0]["input"]
    assert m["skipped"][0]["reason"].startswith("cannot read")


def test_tar_input_reshards_and_carries_captions(tmp_path):
    make_shards(tmp_path / "src", num_shards=3, per_shard=5)
    # an img2dataset-style json member travels too
    write_tar(tmp_path / "src" / "extra.tar", [{"__key__": "x1", "jpg": image_bytes(random_image(50, 50)),
                                                  "json": b'{"caption": "hi"}', "txt": b"hi"}])
    out = tmp_path / "out"
    m = prepare([str(tmp_path / "src" / "shard-{000000..000002}.tar"), str(tmp_path / "src" / "extra.tar")], out,
                PrepareOptions(size=40, shard_size=6))
    assert m["total"] == 16 and m["input_kind"] == "tars"
    samples = {s["__key__"]: s for s in wds.WebDataset(str(out / "shards-{000000..000002}.tar"), shardshuffle=False)}
    assert len(samples) == 16
    assert samples["x1"]["json"] == b'{"caption": "hi"}' and samples["x1"]["txt"] == b"hi"
    assert samples["s001_0003"]["txt"] == b"caption 1 3"


def test_bad_inputs_are_skipped_and_listed(tmp_path):
    d = tmp_path / "in"
    write_images(d, 3, size=(100, 100))
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("I am not a JPEG")
    good = image_bytes(random_image(120, 120, seed=5), quality=90)
    (d / "trunc.jpg").write_bytes(good[: len(good) // 2])
    random_image(20, 20).save(d / "small.png")
    r = run_cli("--input", d, "--output", tmp_path / "out", "--size", "64", "--min-size", "32")
    assert "wrote 3 samples" in r.stdout and "skipped 4" in r.stdout
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {Path(s["input"]).name: s["reason"] for s in m["skipped"]}
    assert reasons["zero.jpg"] == "empty file"
    assert reasons["text.jpg"].startswith("not an image")
    assert reasons["trunc.jpg"].startswith("unreadable image")
    assert reasons["small.png"].startswith("too small")
    assert m["skipped_count"] == 4


def test_broken_tar_member_is_skipped_and_rest_recovered(tmp_path):
    src = tmp_path / "src.tar"
    samples = [{"__key__": f"k{i}", "jpg": image_bytes(random_image(60, 60, seed=i))} for i in range(5)]
    write_tar(src, samples)
    raw = bytearray(src.read_bytes())
    with tarfile.open(src) as tf:
        third = tf.getmembers()[2]
    raw[third.offset : third.offset + 100] = b"\xff" * 100  # destroy one member's header
    src.write_bytes(bytes(raw))
    m = prepare([str(src)], tmp_path / "out", PrepareOptions(size=32))
    assert sorted(keys_in_tars(tmp_path / "out")) == ["k0", "k1", "k3", "k4"]
    assert m["skipped_count"] == 1 and "broken tar member" in m["skipped"][0]["reason"]


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    """A worker killed mid-shard leaves a temporary file and a shard without its record: the rerun redoes
    exactly those chunks, so each sample ends up in exactly one complete shard."""
    keys = write_images(tmp_path / "in", 10, size=(64, 64))
    out = tmp_path / "out"
    opts = PrepareOptions(size=32, shard_size=3)
    out.mkdir()
    (out / ".progress").mkdir()
    kind, sources = list_sources([str(tmp_path / "in")])
    items = plan_part(kind, sources, opts)
    # shard 0 finished completely before the "kill"
    write_shard((items[0:3], str(out), output_shard_name(opts, 0), opts))
    # shard 1 half-written under its temporary name, by a writer that is gone
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (out / f".{output_shard_name(opts, 1)}.{dead}-0a1b2c.tmp").write_bytes(b"partial tar bytes")
    # shard 2 renamed by an older run but its record never written: must be redone, not trusted
    write_tar(out / output_shard_name(opts, 2), [{"__key__": "stale", "jpg": b"x"}])
    m = prepare([str(tmp_path / "in")], out, opts)
    got = keys_in_tars(out)
    assert sorted(got) == sorted(keys) and len(got) == len(set(got)) == 10
    assert m["total"] == 10 and not list(out.glob(".*.tmp"))


def test_killed_process_rerun_gives_each_sample_once(tmp_path):
    keys = write_images(tmp_path / "in", 40, size=(400, 300))
    # the last input (in sorted order) takes a while: a 6000 x 4000 PNG (a FIFO, which kept the run from ending
    # before the kill, is now skipped unopened); the kill comes after the third shard, about 20 shards earlier
    random_image(6000, 4000, seed=99).save(tmp_path / "in" / "zzz_last.png", compress_level=1)
    keys.append("zzz_last")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "stages.cli", "prepare", "--input", str(tmp_path / "in"), "--output", str(out),
            "--size", "200", "--shard-size", "2", "--format", "webp", "--quality", "90"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / ".progress").glob("*.json"))) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    run_cli(*args[4:])  # the same command again, in this process
    got = keys_in_tars(out)
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))
    assert json.loads((out / "manifest.json").read_text())["total"] == 41


def test_parts_then_merge(tmp_path):
    keys = write_images(tmp_path / "in", 9)
    out = tmp_path / "out"
    for k in range(3):
        if k == 2:
            r = run_cli("--merge-manifests", out, check=False)
            assert r.returncode == 2 and "parts [2] of 3" in r.stderr
        run_cli("--input", tmp_path / "in", "--output", out, "--size", "32", "--part", f"{k}/3")
    r = run_cli("--merge-manifests", out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["total"] == 9 and m["parts"] == 3
    got = keys_in_tars(out)
    assert sorted(got) == sorted(keys) and len(got) == 9
    assert sorted(s["name"] for s in m["shards"]) == [f"shards-p{k:05d}-000000.tar" for k in range(3)]


def test_a_part_starting_leaves_another_parts_writes_alone(tmp_path):
    """The parts of one job share the folder: part 0 starting removes what a killed run of part 0 left (a temporary
    whose writer is dead), never the temporary part 1 is writing into now (before, every `.*.tmp` in the folder went
    and part 1 died in a traceback at its rename)."""
    write_images(tmp_path / "in", 4)
    out = tmp_path / "out"
    (out / ".progress").mkdir(parents=True)
    dead = os.fork()  # a pid that is gone once reaped
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    live = out / f".shards-p00001-000000.tar.{os.getpid()}-abc123.tmp"  # part 1, writing now
    left = out / f".shards-p00000-000000.tar.{dead}-def456.tmp"  # part 0's killed run
    live_record = out / ".progress" / f".shards-p00001-000000.tar.json.{os.getpid()}-abc124.tmp"
    for p in (live, left, live_record):
        p.write_bytes(b"partial")
    run_cli("--input", tmp_path / "in", "--output", out, "--size", "32", "--part", "0/2")
    assert live.exists() and live_record.exists() and not left.exists()


@pytest.mark.parametrize("args, words", [
    (["--input", "/nonexistent/x", "--output", "o"], "no such file or folder"),
    (["--input", "{in}", "--output", "o", "--part", "3/2"], "--part"),
    (["--input", "{in}", "--output", "o", "--quality", "0"], "--quality"),
])
def test_user_mistakes_are_one_line(tmp_path, args, words):
    write_images(tmp_path / "in", 1)
    args = [a.replace("{in}", str(tmp_path / "in")).replace("o", str(tmp_path / "o")) if a in ("{in}", "o") else a for a in args]
    r = run_cli(*args, check=False)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        prepare([str(tmp_path / "empty")], tmp_path / "out", PrepareOptions())


def test_a_folder_of_one_number_of_parts_refuses_another_in_one_line(tmp_path):
    """Issue 29, item 5: shard names carry the part K but not N, so `--part 0/4` into a folder of `--part K/2` took
    part 0/2's shards for its own (800 samples listed, 600 distinct). Another N is refused in one line; --overwrite
    replaces the other split's shards; then every key is there once, and the merged manifest lists each once."""
    keys = write_images(tmp_path / "in", 16)
    out = tmp_path / "out"
    for k in range(2):
        run_cli("--input", tmp_path / "in", "--output", out, "--size", "32", "--part", f"{k}/2")
    for part in ("0/4", "0/1"):
        r = run_cli("--input", tmp_path / "in", "--output", out, "--size", "32", *(["--part", part] * (part != "0/1")),
                    check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "holds the shards of a prepare split into 2 parts (--part K/2)" in r.stderr, r.stderr
    assert sorted(keys_in_tars(out)) == sorted(keys)  # nothing of the /2 parts was touched
    run_cli("--input", tmp_path / "in", "--output", out, "--size", "32", "--part", "0/4", "--overwrite")
    for k in range(1, 4):
        run_cli("--input", tmp_path / "in", "--output", out, "--size", "32", "--part", f"{k}/4")
    m = json.loads(run_cli("--merge-manifests", out) and (out / "manifest.json").read_text())
    got = keys_in_tars(out)
    assert sorted(got) == sorted(keys) and m["total"] == 16 and m["parts"] == 4
    assert sorted(s["name"] for s in m["shards"]) == [f"shards-p{k:05d}-000000.tar" for k in range(4)]


def test_overwrite_of_one_part_leaves_the_other_parts_shards(tmp_path):
    """--overwrite of part 0/2 with other options removes what part 0 wrote, not part 1's shards (which another
    process may be writing at the same moment)."""
    write_images(tmp_path / "in", 8)
    out = tmp_path / "out"
    for k in range(2):
        run_cli("--input", tmp_path / "in", "--output", out, "--size", "32", "--part", f"{k}/2")
    theirs = (out / "shards-p00001-000000.tar").read_bytes()
    run_cli("--input", tmp_path / "in", "--output", out, "--size", "24", "--part", "0/2", "--overwrite")
    assert (out / "shards-p00001-000000.tar").read_bytes() == theirs
    assert (out / ".progress" / "shards-p00001-000000.tar.json").is_file()
    assert run_cli("--merge-manifests", out, check=False).returncode == 0


def test_a_rerun_writes_again_a_shard_whose_tar_is_not_the_one_its_record_describes(tmp_path):
    """Issue 29, item 4: a tar replaced after its record was created (two runs writing one shard at once) was
    trusted by the rerun. The rerun checks each complete shard's SHA-256 against its record and writes it again."""
    import hashlib

    write_images(tmp_path / "in", 12)
    out, other = tmp_path / "out", tmp_path / "other"
    args = ["--input", tmp_path / "in", "--size", "32", "--shard-size", "4"]
    run_cli(*args, "--output", out)
    run_cli(*args, "--output", other)
    samples = keys_in_tars(out)
    os.replace(other / "shards-000000.tar", out / "shards-000001.tar")  # another shard's tar under this name
    r = run_cli(*args, "--output", out)
    assert "wrote 12 samples" in r.stdout, r.stdout
    assert sorted(keys_in_tars(out)) == sorted(samples)  # every key once again
    for rec in (out / ".progress").glob("*.tar.json"):
        files = json.loads(rec.read_text())["files"]
        for name, d in files.items():
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == d["sha256"], name
