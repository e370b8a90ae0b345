"""A run that lost its lock writes nothing more (issue 29: items 2, 3, 8, 13 and encode's exit code).

The lease tests run a stage against the real SeaweedFS with a short lease (FIRSTSTAGE_LOCK_LEASE_S): run A stops
itself (SIGSTOP of its whole process group) right after it committed a first unit, its lease runs out, run B takes
the folder over and completes the same command, then A is continued (SIGCONT). A must find out on the store before
its next write, write nothing, and exit 75; every record's digest must still match its object, and no key appear
twice."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid

import pytest

from harness import ForkedStage, run_main
from helpers import TINY, make_shards, write_images
from test_object_storage import aws, fresh, listing, read, read_json, stage  # noqa: F401 (fixtures)

from pipeline.storage import reset_storage, storage_for

LEASE_S = 3.0


@pytest.fixture
def short_lease(aws, monkeypatch):  # noqa: F811 (the fixture imported above)
    monkeypatch.setenv("FIRSTSTAGE_LOCK_LEASE_S", str(LEASE_S))
    monkeypatch.setenv("FIRSTSTAGE_LOCK_SKEW_S", "0.2")
    return f"s3://{aws.bucket}/{uuid.uuid4().hex[:10]}"


def stopped_after_commit(module: str, is_unit, *args) -> ForkedStage:
    """`module` forked, armed to stop (SIGSTOP to its process group) right after it committed the unit whose record
    `is_unit(record)` names; returns once it has stopped."""
    from pipeline.storage import commit

    real, test_pid = commit.Unit.commit, os.getpid()

    def commit_then_stop(self, record):
        done = real(self, record)
        if os.getpid() != test_pid and is_unit(self.record):
            os.killpg(os.getpgid(0), signal.SIGSTOP)
        return done

    with pytest.MonkeyPatch.context() as m:
        m.setattr(commit.Unit, "commit", commit_then_stop)
        proc = ForkedStage(module, *args)
    deadline = time.time() + 120
    while not _stopped(proc.pid):
        assert proc.poll() is None and time.time() < deadline, proc.output()[1][-3000:]
        time.sleep(0.02)
    return proc


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def overtaken(proc: ForkedStage, module: str, *args) -> tuple:
    """Wait for the stopped run's lease to run out, run B (the same command) to its end, continue A; (B's result,
    A's exit code, A's stderr)."""
    time.sleep(LEASE_S + 0.5)
    b = run_main(stage(module), *args)
    assert b.returncode == 0, b.stderr[-3000:]
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    return b, proc.returncode, err


def digests_match(folder: str, records: list[str]) -> None:
    """Every file a record names has the size and SHA-256 the record says (nothing replaced after the commit)."""
    for rec in records:
        base = rec.rsplit("/", 1)[0] if rec.endswith("trainer.json") else folder
        for name, d in read_json(rec)["files"].items():
            data = read(f"{base}/{name}")
            assert (len(data), hashlib.sha256(data).hexdigest()) == (d["size"], d["sha256"]), f"{base}/{name}"


def one_line_lost(code: int, err: str) -> None:
    assert code == 75, err[-3000:]
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "lost the lock" in lines[0] and "writes nothing more" in lines[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_a_train_that_lost_its_lease_leaves_the_new_holders_checkpoint_and_logs_alone(short_lease, tmp_path):
    """Item 2: A commits step 2 and stops; B resumes from it and commits step 4; A, continued, reaches step 4 too.
    Before, A un-committed B's step 4 (Checkpointer.save undid the folder without asking the lock) and both appended
    to one cached metrics.jsonl."""
    make_shards(tmp_path / "shards", 2, 8, size=(40, 40))
    run = f"{short_lease}/run"
    args = [*TINY, f"data.train={tmp_path / 'shards'}", f"output_dir={run}", "train.max_steps=4",
            "train.checkpoint_every=2", "train.log_every=1", "train.keep_checkpoints=3", "--resume", "auto"]
    a = stopped_after_commit("stages.train", lambda r: r.endswith("step-00000002/trainer.json"), *args)
    b, code, err = overtaken(a, "train", *args)
    assert "from step 2 to 4" in b.stdout, b.stdout
    step4 = f"{run}/checkpoints/step-00000004/trainer.json"
    digests_match(run, [f"{run}/checkpoints/step-00000002/trainer.json", step4])
    assert read_json(step4)["step"] == 4
    steps = [json.loads(ln)["step"] for ln in read(f"{run}/metrics.jsonl").splitlines()]
    assert steps == [3, 4], steps  # B's rows, each once (A stopped before its first upload of the logs)
    assert not any(n.endswith(".lock") for n in listing(run))
    one_line_lost(code, err)


def test_a_prepare_that_lost_its_lease_overwrites_no_shard(short_lease, tmp_path):
    """Item 3: A commits its first shard and stops; B completes the same command; A, continued, must not put its
    next tar over B's committed one (before, Unit.commit uploaded the payload, then asked a flag only the renewal
    thread set)."""
    write_images(tmp_path / "in", 12, size=(40, 40))
    out = f"{short_lease}/shards"
    args = ["--input", tmp_path / "in", "--output", out, "--shard-size", "4", "--size", "32", "--workers", "1"]
    a = stopped_after_commit("stages.prepare", lambda r: r.endswith(".progress/shards-000000.tar.json"), *args)
    _, code, err = overtaken(a, "prepare", *args)
    names = listing(out)
    records = [f"{out}/{n}" for n in names if n.startswith(".progress/shards-")]
    assert len(records) == 3 and len(set(names)) == len(names), names
    digests_match(out, records)
    assert read_json(f"{out}/manifest.json")["total"] == 12
    one_line_lost(code, err)


def test_an_encode_that_lost_its_lease_exits_75(short_lease, tiny_run, tmp_path):
    """Encode: A commits its first latent shard and stops; B completes; A, continued, writes nothing and exits 75
    (before, it said it had lost the lock and exited 0)."""
    out = f"{short_lease}/latents"
    args = ["--model", tiny_run / "run", "--data", tiny_run / "train", "--output", out]
    a = stopped_after_commit("stages.encode", lambda r: "/records/" in r, *args)
    b, code, err = overtaken(a, "encode", *args)
    one_line_lost(code, err)
    names = listing(out)
    records = [f"{out}/{n}" for n in names if n.startswith("records/")]
    assert len(records) == 4 and len(set(names)) == len(names)
    digests_match(out, records)


def test_an_object_store_that_stops_answering_during_training_is_transient(aws, fresh, tmp_path):  # noqa: F811
    """Item 13: the store answered at the start, then goes away (its endpoint refuses connections) while the run
    trains: exit 75 and one line (before: exit 2, 'cannot reach the object store', a user error SLURM does not
    requeue). A store that never answered stays a user error."""
    import botocore.retries.standard

    from s3server import FaultProxy
    from pipeline.storage import base

    proxy = FaultProxy(("127.0.0.1", int(aws.endpoint.rsplit(":", 1)[1])), p_reset=0, p_slowdown=0, mean_bytes=1e12)
    fresh.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    fresh.setenv("AWS_MAX_ATTEMPTS", "2")
    fresh.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0.01)
    make_shards(tmp_path / "shards", 1, 8, size=(40, 40))
    from pipeline.train import duties

    real = duties.Checkpointer.save

    def save_then_unplug(self, step, state):
        folder = real(self, step, state)
        proxy.close()  # the store goes away after the first checkpoint
        return folder

    fresh.setattr(duties.Checkpointer, "save", save_then_unplug)
    run = f"s3://{aws.bucket}/{uuid.uuid4().hex[:10]}/run"
    r = run_main(stage("train"), *TINY, f"data.train={tmp_path / 'shards'}", f"output_dir={run}",
                 "train.max_steps=4", "train.checkpoint_every=2")
    assert r.returncode == 75, r.stderr[-3000:]
    assert "stopped answering" in r.stderr and "run the same command again" in r.stderr, r.stderr[-3000:]
    assert len([ln for ln in r.stderr.splitlines() if "error:" in ln]) == 1, r.stderr[-3000:]
    reset_storage()  # as in a new process: this store never answered
    r = run_main(stage("train"), *TINY, f"data.train={tmp_path / 'shards'}", f"output_dir={run}-2",
                 "train.max_steps=2")
    assert r.returncode == 2 and "cannot reach the object store" in r.stderr, r.stderr[-3000:]


def _save_rank(rank: int, init_file: str, folder: str, results, fault: str) -> None:
    """One rank of a two-process gloo world saving a checkpoint; `fault`: rank 1's disk is full ("disk"), or the main
    process finds at its commit that it lost the lock ("lock")."""
    import errno

    import torch
    import torch.distributed as dist

    from pipeline import checkpoint as ckpt
    from pipeline.train.duties import Checkpointer
    from stages.common import stage_main

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    class Ranks:  # what Checkpointer asks of the Accelerator, on this gloo world
        is_main_process, process_index, device = rank == 0, rank, torch.device("cpu")

        @staticmethod
        def wait_for_everyone():
            dist.barrier()

    if rank == 1 and fault == "disk":
        def full(path, obj):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        ckpt.save_object = full
    if rank == 0 and fault == "lock":
        from pipeline.errors import LockLost

        def lost(*a, **k):
            raise LockLost("output folder run: lost the lock run/.lock: it is held by pid 7 on node-b")

        ckpt.commit_checkpoint = lost

    @stage_main
    def main(argv=None):
        Checkpointer(folder, Ranks, 2, 2, 3).save(2, {"rng": ckpt.rng_state(), "autoencoder": {"w": torch.ones(2)},
                                                     "trainer": {"step": 2}})

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main([])
            code = 0
        except SystemExit as e:
            code = e.code
    results.put((rank, code, err.getvalue()))
    dist.destroy_process_group()


@pytest.mark.parametrize("fault", ["disk", "lock"])
def test_a_checkpoint_that_one_rank_could_not_write_is_dropped_by_every_rank(tmp_path, fault):
    """Item 8: rank 1 cannot write its RNG file (a full disk). Before, its cleanup removed the folder rank 0 was
    writing into and the job ended in a traceback (exit 1). Now every rank writes, the ranks agree, and every rank
    drops the checkpoint: 74 on the rank whose disk was full, 75 on the other, one line each, no folder left. The
    same when the main process finds at its commit that it lost the lock: before, the other rank was left waiting
    in a barrier and ended in a gloo traceback."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    run = tmp_path / "run"
    procs = [ctx.Process(target=_save_rank, args=(r, str(tmp_path / "init"), str(run), results, fault))
             for r in range(2)]
    for p in procs:
        p.start()
    got = {rank: (code, err) for rank, code, err in (results.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(30)
    failing, other = (1, 0) if fault == "disk" else (0, 1)
    assert got[failing][0] == (74 if fault == "disk" else 75), got
    assert ("no space left" if fault == "disk" else "lost the lock") in got[failing][1], got
    assert got[other][0] == 75 and "another process of the job could not write its part" in got[other][1], got
    assert all(len(err.strip().splitlines()) == 1 and "Traceback" not in err for _, err in got.values()), got
    if fault == "disk":
        assert not (run / "checkpoints" / "step-00000002").exists()


def test_a_local_run_whose_lock_was_taken_writes_nothing_under_a_final_name(tmp_path):
    """The same rule on a local (or shared NFS / Lustre) folder: the lock file, read then and there, must hold this
    run's token before a payload, a record or an undo; once it does not, nothing more is written or removed."""
    from pipeline.errors import LockLost
    from pipeline.storage import FolderLock, Unit

    out = tmp_path / "out"
    lock = FolderLock(out).acquire()
    try:
        Unit(out / ".progress" / "a.json", [out / "a.tar"]).put(out / "a.tar", b"mine")
        (out / ".lock").write_text(json.dumps({"host": "node-b", "pid": 7, "token": "theirs"}))  # from another host
        unit = Unit(out / ".progress" / "b.json")
        with open(unit.staging(out / "b.tar"), "wb") as f:
            f.write(b"late")
        with pytest.raises(LockLost, match="lost the lock .* held by pid 7 on node-b"):
            unit.commit({"n": 1})
        with pytest.raises(LockLost):
            Unit(out / ".progress" / "a.json", [out / "a.tar"]).undo()
        unit.discard()
        assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [".lock", "a.tar"]
    finally:
        lock.release()
    assert (out / ".lock").exists()  # not ours: left to its holder


def test_the_other_ranks_of_a_job_follow_the_main_process_lock(aws, tmp_path):  # noqa: F811
    """A multi-process encode: only the main process takes the lock, and every other rank writes shards too. A rank
    follows the main process's lock (its token): its writes prove the lease as the holder's do, by reading the lock
    object (once per quarter lease), and write nothing once another run holds it. Before, only the main process
    checked, so the other ranks went on writing into a folder another run had taken over."""
    from pipeline.errors import LockLost
    from pipeline.storage import FolderLock, LeasedLock, Unit, base

    folder = f"s3://{aws.bucket}/{uuid.uuid4().hex[:10]}/latents"
    for holder, follower, where in ((LeasedLock(folder, lease_s=4, skew_s=0), LeasedLock(folder, lease_s=4),
                                     folder), (FolderLock(tmp_path / "out"), FolderLock(tmp_path / "out"),
                                               str(tmp_path / "out"))):
        holder.acquire()
        base.unguard_writes(holder)  # the holder is another process: only the follower guards this one's writes
        try:
            follower.follow(holder.me["token"])
            storage_for(where).ensure_folder(f"{where}/records")
            Unit(f"{where}/records/a.json").commit({"n": 1})  # the lease is the main process's: written
            storage_for(where).write_bytes(holder.path, json.dumps({"host": "node-b", "pid": 7,
                                                                     "token": "theirs"}).encode())
            time.sleep(1.05)  # a quarter lease: this process's last read proves nothing any more
            with pytest.raises(LockLost, match="held by pid 7 on node-b"):
                Unit(f"{where}/records/b.json").commit({"n": 2})
            assert sorted(n for n in listing(where) if not n.startswith(".")) == ["records/a.json"]
        finally:
            follower.release()
            holder.release()


def test_the_guard_covers_a_folder_however_its_path_is_spelled(tmp_path, monkeypatch):
    """`--output file:///abs/out`, `out` from its parent, `/abs/out/`: the writes, spelled as the library spells them,
    are guarded (before, a lock taken on `file://...` covered no plain path: a run that lost it went on writing)."""
    from pipeline.storage import FolderLock
    from pipeline.train.trainer import find_resume

    monkeypatch.chdir(tmp_path)
    for spelling in (f"file://{tmp_path}/out", "out", f"{tmp_path}/out/"):
        lock = FolderLock(spelling)
        assert lock.covers(f"{tmp_path}/out/a.tar") and lock.covers("out/.progress/a.json"), spelling
        assert not lock.covers(f"{tmp_path}/out/.lock") and not lock.covers(f"{tmp_path}/other/a.tar"), spelling
    # a checkpoint of the run folder itself, spelled relative while output_dir is absolute: resumed, not refused
    ck = tmp_path / "run" / "checkpoints" / "step-00000010"
    ck.mkdir(parents=True)
    (ck / "trainer.json").write_text('{"step": 10}')
    assert find_resume(str(tmp_path / "run"), "run/checkpoints/step-00000010") is not None
