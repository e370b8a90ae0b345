"""Races between real processes on one name: folder locks (fresh, and over a dead run's stale lock), two writers of
one JSON file beside a reader, and two exports to one output. Each race is run by several OS processes that start
at one shared instant, repeated, because a race that is lost once in thirty tries is still a race."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from harness import ENV, ROOT

WORKER = ROOT / "tests" / "scripts" / "race_worker.py"


class Workers:
    """n race_worker.py processes, each answering one line per command line."""

    def __init__(self, n: int):
        self.procs = [subprocess.Popen([sys.executable, str(WORKER)], cwd=ROOT, env=ENV, text=True, bufsize=1,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(n)]

    def ask(self, commands: list[str]) -> list[str]:
        for p, c in zip(self.procs, commands):
            p.stdin.write(c + "\n")
            p.stdin.flush()
        return [p.stdout.readline().strip() for p in self.procs[:len(commands)]]

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait(timeout=30)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])  # a pid that was a process a moment ago
    p.wait()
    return p.pid


def lock_race(tmp_path, trials: int, stale: bool) -> list[list[str]]:
    """`trials` times, six processes take one folder's lock at the same instant (over a dead run's lock if `stale`);
    the answers of each trial."""
    workers = Workers(6)
    try:
        results = []
        for t in range(trials):
            folder = tmp_path / f"trial-{t}"
            if stale:
                folder.mkdir()
                (folder / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                                          "started": "yesterday"}))
            t0 = time.time() + 0.1
            results.append(workers.ask([f"lock {folder} {t0}"] * 6))
            assert workers.ask(["release"] * 6) == ["released"] * 6
            assert not (folder / ".lock").exists()  # the holder's release removed its own lock
        return results
    finally:
        workers.close()


def test_six_processes_taking_one_fresh_lock_leave_exactly_one_holder(tmp_path):
    for answers in lock_race(tmp_path, 30, stale=False):
        assert answers.count("held") == 1, answers
        assert all(a == "held" or (a.startswith("refused") and "is in use by pid" in a) for a in answers), answers


def test_six_processes_taking_over_one_stale_lock_leave_exactly_one_holder(tmp_path):
    for answers in lock_race(tmp_path, 30, stale=True):
        assert answers.count("held") == 1, answers
        assert all(a == "held" or (a.startswith("refused") and "is in use by pid" in a) for a in answers), answers


def test_two_writers_of_one_json_file_and_a_reader_see_no_error_and_never_invalid_json(tmp_path):
    path, stop = tmp_path / "state.json", tmp_path / "stop"
    path.write_text("{}")
    workers = Workers(4)
    try:
        for trial in range(3):
            stop.unlink(missing_ok=True)
            t0 = time.time() + 0.3
            for p, c in zip(workers.procs, [f"write {path} {w} 200 {t0}" for w in "abc"] + [f"read {path} {stop} {t0}"]):
                p.stdin.write(c + "\n")
                p.stdin.flush()
            wrote = [p.stdout.readline().strip() for p in workers.procs[:3]]
            stop.touch()
            read = workers.procs[3].stdout.readline().strip()
            assert wrote == ["wrote 200"] * 3, wrote
            assert read.startswith("read ") and int(read.split()[1]) > 0, read
            assert json.loads(path.read_text())["i"] == 199
            assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind
    finally:
        workers.close()


def test_two_exports_to_one_output_end_with_one_export_and_one_one_line_refusal(tiny_run, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    import pipeline.weights.diffusers as fmt
    from harness import ForkedStage

    save = fmt.save

    def slow_save(*args, **kwargs):  # both exports are inside their save at the same time (inherited by the forks)
        time.sleep(1.5)
        return save(*args, **kwargs)

    monkeypatch.setattr(fmt, "save", slow_save)
    for flags in ([], ["--overwrite"]):
        out = tmp_path / f"vae{len(flags)}"
        procs = [ForkedStage("stages.export", "--model", tiny_run / "run", "--output", out, *flags) for _ in range(2)]
        done = sorted(((p.wait(120), *p.output()) for p in procs), key=lambda r: r[0])
        (code0, out0, err0), (code1, _, err1) = done
        assert (code0, code1) == (0, 2), (err0[-2000:], err1[-2000:])
        assert "export: diffusers" in out0 and f"--output {out} is in use by pid" in err1, err1
        assert "Traceback" not in err1 and len(err1.strip().splitlines()) == 1, err1
        AutoencoderKL.from_pretrained(out)  # the one export is whole
        assert (out / "README.md").is_file()
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder, no lock left


def digests_match(folder) -> None:
    """Every record's SHA-256 is its tar's."""
    import hashlib

    records = sorted((folder / "records").glob("*.json"))
    assert records
    for rec in records:
        for name, d in json.loads(rec.read_text())["files"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == d["sha256"], name


def test_a_whole_run_encode_beside_a_part_encode_never_both_write(tiny_run, tmp_path, monkeypatch):
    """Issue 29, item 4: `encode` of the whole job beside `encode --part 0/2` into one folder both wrote the same
    shards (2 of 800 records' SHA-256 did not match their tars). Started at the same instant, never both run: the
    other is refused in one line naming the lock of the other split (in the same moment both may be); the same
    command again finishes the folder with every key once and every record's digest matching its tar."""
    import pipeline.latents.encoder as encoder
    from harness import ForkedStage, run_main
    from helpers import read_tar_samples
    from stages.encode import main as encode

    def args(out):
        return ["--model", tiny_run / "run", "--data", tiny_run / "train", "--output", out, "data.num_workers=0",
                "encode.batch_size=4"]

    write = encoder.LatentShard.write_batch

    def slow_write(self, *args, **kwargs):  # a run that got in is still writing when the other looks
        time.sleep(0.1)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(encoder.LatentShard, "write_batch", slow_write)
    for trial in range(2):
        out = tmp_path / f"latents{trial}"
        procs = [ForkedStage("stages.encode", *args(out), *part) for part in ([], ["--part", "0/2"])]
        results = [(p.wait(180), *p.output()) for p in procs]
        assert sorted(r[0] for r in results) in ([0, 2], [2, 2]), [r[2][-2000:] for r in results]
        for code, _, err in results:
            if code == 2:
                assert "is being written by" in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not list(out.rglob("*.tmp*")), sorted(p.name for p in out.rglob("*.tmp*"))
        assert run_main(encode, *args(out)).returncode == 0
        samples = read_tar_samples(out)  # a key twice fails here
        assert len(samples) == 64 and all("latents.safetensors" in s and "json" in s for s in samples.values())
        assert json.loads((out / "manifest.json").read_text())["total"] == 64
        digests_match(out)


def live_lock(path) -> None:
    """A lock held by a live process on this host (this test's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "earlier",
                                "token": "theirs", "since": time.time()}))


def test_a_whole_job_and_its_parts_exclude_each_other_and_parts_of_one_n_share_the_folder(tiny_run, tmp_path):
    """Issue 29, item 4 (and 5): the whole job is refused while a part runs, a part while the whole job or a part
    of another N runs, in one line naming that lock, and nothing is written; a part beside another part of its N
    runs."""
    from harness import run_main
    from stages.encode import main as encode

    out = tmp_path / "latents"
    args = ["--model", tiny_run / "run", "--data", tiny_run / "train", "--output", out, "data.num_workers=0"]
    for theirs, part, split in ((".lock.part-00001-of-00002", "0/1", "--part K/2"), (".lock", "0/2", "the whole job"),
                                (".lock.part-00001-of-00002", "1/4", "--part K/2")):
        live_lock(out / theirs)
        r = run_main(encode, *args, "--part", part)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"--output {out} is being written by {split} (pid " in r.stderr and str(out / theirs) in r.stderr
        assert not list(out.glob("*.tar")) and not (out / "records").exists()
        (out / theirs).unlink()
    live_lock(out / ".lock.part-00001-of-00002")
    r = run_main(encode, *args, "--part", "0/2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 shards left to other parts or a rerun" in r.stdout, r.stdout
    digests_match(out)


def replaced_tar(tiny_run, tmp_path) -> tuple:
    """What the race left: one latent folder whose second shard's tar was replaced, after its record was created,
    by another run's tar of the same shard (the same latents: only the tar's mtimes differ). (folder, shard name,
    the encode arguments of the folder)."""
    from harness import run_main
    from stages.encode import main as encode

    def args(folder):
        return ["--model", tiny_run / "run", "--data", tiny_run / "train", "--output", folder, "data.num_workers=0"]

    out, other = tmp_path / "latents", tmp_path / "other"
    for folder in (out, other):
        assert run_main(encode, *args(folder)).returncode == 0
    name = sorted(p.name for p in out.glob("*.tar"))[1]
    assert (other / name).read_bytes() != (out / name).read_bytes()
    os.replace(other / name, out / name)
    return out, name, args(out)


def test_a_rerun_encodes_again_a_shard_whose_tar_is_not_the_one_its_record_describes(tiny_run, tmp_path):
    """Issue 29, item 4: a tar replaced after its record was created was trusted by the rerun. The rerun checks
    every complete shard's digest against its record and encodes that one again."""
    from harness import run_main
    from stages.encode import main as encode

    out, name, args = replaced_tar(tiny_run, tmp_path)
    r = run_main(encode, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "encode: 16 samples from 1 shards (3 already complete)" in r.stdout, r.stdout
    digests_match(out)


def test_the_reader_verifies_the_shards_against_their_records_on_request(tiny_run, tmp_path):
    """Issue 29, item 4: LatentDataset(verify=True) refuses, in one line naming it, a folder with a shard that is
    not the tar its record describes (without `verify` nothing more is read)."""
    from harness import run_main
    from pipeline.errors import DataError
    from pipeline.latents import LatentDataset
    from stages.encode import main as encode

    out, name, args = replaced_tar(tiny_run, tmp_path)
    LatentDataset(out)
    with pytest.raises(DataError, match=f"1 shard.s. are not the tars their records describe .first: {name}"):
        LatentDataset(out, verify=True)
    assert run_main(encode, *args).returncode == 0
    LatentDataset(out, verify=True)


def test_the_part_that_ends_last_merges_every_part_manifest(tiny_run, tmp_path, monkeypatch):
    """Issue 29, item 4, and issue 31: each part writes its own part manifest from what it knows (no part re-reads
    every record); the part that finds all N part manifests merges them into manifest.json. Here part 1 ends (its
    shards, records and part manifest land) after part 0 wrote its part manifest and before it looked for the
    others: part 0 finds them and its manifest lists every record, without reading any record again."""
    import shutil

    import pipeline.latents.format as lf
    from harness import run_main
    from pipeline.storage.commit import Unit
    from stages.encode import main as encode

    out, other = tmp_path / "latents", tmp_path / "other"
    base = ["--model", tiny_run / "run", "--data", tiny_run / "train", "data.num_workers=0"]
    assert run_main(encode, *base, "--output", other, "--part", "1/2").returncode == 0
    assert not (other / "manifest.json").exists()  # part 0 has not ended: no folder manifest yet
    look = lf._other_parts

    def part_1_ends_meanwhile(folder, *args):
        for p in (*other.glob("*.tar"), *other.glob("records/*.json"), *other.glob("manifest.part-*.json")):
            shutil.copy2(p, out / p.relative_to(other))
        monkeypatch.setattr(Unit, "read_record", lambda *a, **k: pytest.fail("a record read again for the manifest"))
        return look(folder, *args)

    monkeypatch.setattr(lf, "_other_parts", part_1_ends_meanwhile)
    r = run_main(encode, *base, "--output", out, "--part", "0/2")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["total"] == 64 and len(m["shards"]) == 4 and m["missing"] == [] and "folder total 64" in r.stdout


@pytest.mark.parametrize("planned", ["todo", "changed"])
def test_a_shard_another_run_completed_after_this_run_planned_it_is_kept_not_redone(planned, tiny_run, tmp_path,
                                                                                    monkeypatch):
    """The cause of the whole-run-beside-part race, made deterministic: a run whose plan says every shard is still
    to do, or to do again as its input changed (another run completed them after it looked), finds each one complete
    when it comes to write it, and keeps that run's tar and record instead of removing and rewriting them."""
    import pipeline.latents.format as lf
    from harness import run_main
    from helpers import read_tar_samples
    from stages.encode import main as encode

    out = tmp_path / "latents"
    args = ["--model", tiny_run / "run", "--data", tiny_run / "train", "--output", out, "data.num_workers=0"]
    assert run_main(encode, *args).returncode == 0
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (*out.glob("*.tar"), *out.glob("records/*"))}
    samples = read_tar_samples(out)
    monkeypatch.setattr(lf, "plan_shards", lambda folder, urls, settings: lf.Plan(  # a stale plan
        {u: planned for u in urls}, {}, {os.path.basename(u) for u in urls} if planned == "changed" else set()))
    r = run_main(encode, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (*out.glob("*.tar"), *out.glob("records/*"))}
    assert after == before and len(before) == 8  # 4 tars and their records: not one removed or rewritten
    assert read_tar_samples(out) == samples and json.loads((out / "manifest.json").read_text())["total"] == 64
    assert "encode: 0 samples from 0 shards (4 already complete) ->" in r.stdout, r.stdout  # none "encoded again"


@pytest.mark.parametrize("tar_first", [False, True])
def test_a_shard_another_run_commits_while_this_run_encodes_it_is_kept(tar_first, tiny_run, tmp_path, monkeypatch):
    """The other windows: another run commits a shard while this run is encoding the same shard (`tar_first`: its
    tar had already landed, without its record, when this run began the shard). This run sees the record before it
    puts its own tar, keeps that run's tar and record, and leaves no staging file."""
    import shutil

    from harness import run_main
    from helpers import read_tar_samples
    from pipeline.data.shards import ShardWriter
    from stages.encode import main as encode

    def args(out):
        return ["--model", tiny_run / "run", "--data", tiny_run / "train", "--output", out, "data.num_workers=0"]

    other, out = tmp_path / "other", tmp_path / "latents"
    assert run_main(encode, *args(other)).returncode == 0  # what the other run commits
    if tar_first:
        out.mkdir()
        for tar in other.glob("*.tar"):
            shutil.copy2(tar, out / tar.name)
    close = ShardWriter.close

    def close_then_the_other_run_commits(self):
        close(self)
        name = self.path.name.split(".tar")[0].lstrip(".")  # the staging file's shard
        (out / "records").mkdir(parents=True, exist_ok=True)
        for member in [f"records/{name}.json"] + [f"{name}.tar"] * (not tar_first):
            shutil.copy2(other / member, out / member)

    monkeypatch.setattr(ShardWriter, "close", close_then_the_other_run_commits)
    r = run_main(encode, *args(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "encode: 0 samples from 0 shards (4 already complete" in r.stdout, r.stdout
    for tar in other.glob("*.tar"):  # byte for byte the other run's tars and records, not this run's
        assert (out / tar.name).read_bytes() == tar.read_bytes()
        record = f"records/{tar.stem}.json"
        assert (out / record).read_bytes() == (other / record).read_bytes()
    assert not [p.name for p in out.rglob("*") if p.name.startswith(".")]  # no staging file left
    assert len(read_tar_samples(out)) == 64
