"""The storage interface on object storage (s3://, against a real S3-compatible server on the loopback interface:
SeaweedFS, see s3server.py) and, where the contract is the same, on the local filesystem: whole writes, create-only
and compare-and-swap (also between real processes), the commit protocol, folder locks with a lease, multipart uploads
that leave nothing when killed or interrupted, one-line errors, and retries through a proxy that drops connections."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import signal
import socket
import sys
import tarfile
import time
import uuid

import pytest

from s3server import FaultProxy, conflicts, operation

from pipeline.errors import LockLost, UserError
from pipeline.manifest import abort_orphan_uploads
from pipeline.storage import FolderLock, Unit, storage_for
from pipeline.storage.lease import LeasedLock

MiB = 2**20


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(storage, root folder) on each backend: a fresh folder (an unused key prefix on S3)."""
    if request.param == "local":
        root = str(tmp_path / "out")
        storage_for(root).ensure_folder(root)
    else:
        server = request.getfixturevalue("s3_env")
        root = f"s3://{server.bucket}/{uuid.uuid4().hex[:12]}"
        storage_for(root).check(root)  # the client made here: forked children find botocore's models loaded
    return storage_for(root), root


@pytest.fixture
def s3root(s3_env):
    return f"s3://{s3_env.bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fast_backoff(monkeypatch):
    """botocore's backoff between retries (up to 2**attempt seconds, random) made short: the retries themselves are
    what is tested."""
    import botocore.retries.standard

    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0.01)


def small_multipart_storage(**kw):
    """An S3Storage that uploads anything from 5 MiB on in parts of 5 MiB (S3's smallest part)."""
    from pipeline.storage.s3 import S3Storage

    return S3Storage(multipart_threshold=5 * MiB, part_size=5 * MiB, **kw)


def in_processes(n: int, fn, *args, timeout: float = 60) -> list:
    """fn(barrier, i, *args) in `n` forked processes at once; their results (or their exceptions' one-line text)."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(n), ctx.Queue()

    def child(i):
        try:
            results.put((i, fn(barrier, i, *args)))
        except BaseException as e:  # noqa: BLE001
            results.put((i, f"{type(e).__name__}: {e}"))

    procs = [ctx.Process(target=child, args=(i,)) for i in range(n)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout)
    return [out[i] for i in range(n)]


# ------------------------------------------------------------------------------------------------ the contract
def test_write_read_exists_delete(where):
    store, root = where
    path = store.join(root, "a.json")
    assert not store.exists(path)
    with pytest.raises(FileNotFoundError):
        store.read_bytes(path)
    assert store.read_versioned(path) is None
    store.write_bytes(path, b"one")
    assert store.exists(path) and store.read_bytes(path) == b"one"
    store.write_bytes(path, b"two")  # replaced whole
    with store.open_read(path) as f:
        assert f.read() == b"two"
    store.delete(path)
    store.delete(path)  # absent: no error
    assert not store.exists(path)


@pytest.mark.parametrize("size", [1000, 11 * MiB + 7])
def test_put_file_whole_and_consumed(where, size, request):
    store, root = where
    if root.startswith("s3://"):
        store = small_multipart_storage()  # 11 MiB: three parts
    path = store.join(root, "shard-000000.tar")
    payload = random.Random(size).randbytes(size)
    local = store.staging_file(path)
    local.write_bytes(payload)
    written = store.put_file(path, local)
    assert not local.exists()
    assert store.read_bytes(path) == payload
    if root.startswith("s3://"):
        import hashlib

        assert written["size"] == size and written["sha256"] == hashlib.sha256(payload).hexdigest()
        bucket, key = path[5:].split("/", 1)
        assert not store._client().list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads")


def test_create_only(where):
    store, root = where
    path = store.join(root, "record.json")
    assert store.create(path, b'{"n": 1}') is True
    assert store.create(path, b'{"n": 2}') is False
    assert store.read_bytes(path) == b'{"n": 1}'


def test_compare_and_swap(where):
    store, root = where
    path = store.join(root, ".lock")
    assert store.replace_if(path, b"x", "no-such-version") is False and not store.exists(path)
    store.create(path, b"v1")
    content, version = store.read_versioned(path)
    assert content == b"v1"
    assert store.replace_if(path, b"v2", version) is True
    assert store.replace_if(path, b"v3", version) is False  # stale version: refused
    assert store.read_bytes(path) == b"v2"


def test_list_with_suffix(where):
    store, root = where
    assert store.list(root) == []
    for name in ("b.json", "a.json", "c.tar"):
        store.write_bytes(store.join(root, name), b"1")
    store.write_bytes(store.join(root, "sub", "d.json"), b"1") if root.startswith("s3://") else None
    assert store.list(root, ".json") == [store.join(root, "a.json"), store.join(root, "b.json")]
    assert store.list(root + "/") == [store.join(root, n) for n in ("a.json", "b.json", "c.tar")]


def test_both_backends_answer_the_one_interface_alike(where):
    """Listings with sizes, info, ranged reads, existence, identity (from a listing or asked), the checks and the
    local file: the same calls, the same answers (names relative to the folder), locally and on S3."""
    store, root = where
    store.ensure_folder(store.join(root, "sub", "deeper"))  # (locally; nothing on S3)
    for name, data in (("a.tar", b"0123456789"), ("sub/b.json", b"{}"), ("sub/deeper/c.txt", b"abc")):
        store.write_bytes(store.join(root, name), data)
    rel = lambda paths: sorted(p[len(root) + 1:] for p in paths)  # noqa: E731
    files, folders = store.entries(root)
    assert rel(files) == ["a.tar"] and rel(folders) == ["sub"] and files[store.join(root, "a.tar")][0] == 10
    assert rel(store.entries(store.join(root, "sub"), start="b")[0]) == ["sub/b.json"]
    assert {k[len(root) + 1:]: v[0] for k, v in store.walk(root).items()} == {
        "a.tar": 10, "sub/b.json": 2, "sub/deeper/c.txt": 3}
    assert store.entries(store.join(root, "none")) == ({}, []) and store.walk(store.join(root, "none")) == {}
    a = store.join(root, "a.tar")
    assert store.info(a)["size"] == 10 and store.info(a)["etag"] == files[a][1]
    with store.open_range(a, 3, 4) as f:
        assert f.read() == b"3456"
    with store.open_read(a) as f:
        assert f.raw.size == 10 and f.read() == b"0123456789"
    assert store.object_exists(a) and not store.folder_exists(a)
    assert store.folder_exists(store.join(root, "sub")) and not store.object_exists(store.join(root, "sub"))
    before = store.identity(a)
    assert before is not None and store.identity(a, files[a]) == before  # a listing's entry says the same
    store.write_bytes(a, b"98765432100")
    assert store.identity(a) not in (None, before)  # written again: another input
    assert store.identity(store.join(root, "none")) is None
    store.check(root)
    store.check_conditional_writes(root)
    assert store.uploads(root) == []
    assert store.local_file(a).read_bytes() == b"98765432100"


def test_listing_walk_and_delete_read_every_page(s3root):
    """Listings of more entries than one page holds (pages of 2 here; S3's are 1000): every page is read."""
    from pipeline.storage.s3 import S3Storage

    store = S3Storage(page_size=2)
    names = [f"{i}.json" for i in range(5)]
    for name in names:
        store.write_bytes(store.join(s3root, "f", name), b"1")
    for sub in ("a", "b", "c"):
        store.write_bytes(store.join(s3root, "f", sub, "x.json"), b"1")
    files, folders = store.entries(store.join(s3root, "f"))
    assert sorted(files) == [store.join(s3root, "f", n) for n in names]
    assert folders == [store.join(s3root, "f", sub) for sub in ("a", "b", "c")]
    assert len(store.walk(s3root)) == 8
    store.delete(store.join(s3root, "f"))
    assert store.walk(s3root) == {}


def _create_racer(barrier, i, path):
    store = storage_for(path)
    barrier.wait()
    return store.create(path, json.dumps({"writer": i}).encode())


def test_create_race_between_processes(where):
    store, root = where
    path = store.join(root, "record.json")
    won = in_processes(6, _create_racer, path)
    assert won.count(True) == 1, won
    assert json.loads(store.read_bytes(path)) == {"writer": won.index(True)}


def test_unit_commit(where):
    store, root = where
    record, payload = store.join(root, "000001.json"), store.join(root, "000001.tar")
    unit = Unit(record, [payload])
    assert not unit.done()
    unit.staging(payload).write_bytes(b"tar bytes")
    assert not store.exists(payload)  # nothing under a final name before the commit
    assert unit.commit({"samples": 3}) is True
    assert unit.done() and unit.read_record() == {"samples": 3}
    again = Unit(record, [payload])  # a second run of the same unit: the record exists, its commit says so
    again.staging(payload).write_bytes(b"tar bytes")
    assert again.commit({"samples": 4}) is False
    assert Unit(record, [payload]).read_record() == {"samples": 3}
    unit.undo()
    assert not unit.done() and not store.exists(payload)


def test_folder_lock_refuses_second_run(where):
    store, root = where
    with FolderLock(root) as lock:
        assert store.exists(lock.path)
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
            FolderLock(root).acquire()
    assert not store.exists(lock.path)


# ------------------------------------------------------------------------------------------------ leases
def _expired_holder(store, path, now):
    holder = {"host": "another-host", "pid": 4242, "started": "earlier", "command": "firststage train",
              "token": "dead", "lease_s": 5, "renewed": now - 60, "expires": now - 55}
    store.write_bytes(path, json.dumps(holder).encode())


def _lease_taker(barrier, i, folder):
    lock = LeasedLock(folder, lease_s=30)
    barrier.wait()
    try:
        lock.acquire()
        result = "won"
    except UserError as e:
        result = str(e)
    barrier.wait()  # everyone alive until all have tried (a winner's dead pid would be a stale lock)
    return result


def test_expired_lease_is_taken_over_by_exactly_one(where):
    store, root = where
    lock_path = store.join(root, ".lock")
    _expired_holder(store, lock_path, time.time())
    results = in_processes(5, _lease_taker, root)
    assert results.count("won") == 1, results
    holder = json.loads(store.read_bytes(lock_path))
    assert holder["host"] == socket.gethostname() and holder["expires"] > time.time()
    for r in results:
        assert r == "won" or f"in use by pid {holder['pid']}" in r, r


def test_lease_renewed_refused_then_taken_after_expiry(where):
    store, root = where
    lock = LeasedLock(root, lease_s=0.8, renew_every_s=0.15, skew_s=0).acquire()
    try:
        first = json.loads(store.read_bytes(lock.path))
        time.sleep(1.0)  # longer than the lease: renewals keep it
        now = json.loads(store.read_bytes(lock.path))
        assert lock.renewals >= 2 and now["expires"] > first["expires"] and now["token"] == first["token"]
        lock.prove()
        # the same lease held "from another host": refused while valid, naming the holder
        other = LeasedLock(root, lease_s=0.8, skew_s=0)
        other._stale = lambda holder: other.__class__._stale(other, {**holder, "host": "elsewhere"})
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
            other.acquire()
        # the holder stops renewing (a hung or partitioned host): after the lease, the other run takes over
        lock._stop.set()
        lock._thread.join()
        time.sleep(0.9)
        other.acquire()
        assert json.loads(store.read_bytes(lock.path))["token"] == other.me["token"]
        assert lock.renew() is False and "taken over" in lock.lost
        with pytest.raises(LockLost, match="lost the lock"):
            lock.prove()
        lock.release()  # the lost lock is not ours any more: release leaves it alone
        assert json.loads(store.read_bytes(lock.path))["token"] == other.me["token"]
        other.release()
        assert not store.exists(lock.path)
    finally:
        lock.release()


def test_lease_loss_noticed_by_renewal(where):
    store, root = where
    lock = LeasedLock(root, lease_s=2, renew_every_s=0.1).acquire()
    store.write_bytes(lock.path, json.dumps({"host": "h", "pid": 1, "token": "someone else"}).encode())
    deadline = time.time() + 5
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.lost and "taken over by pid 1 on h" in lock.lost
    lock.release()
    assert store.exists(lock.path)


# ------------------------------------------------------------------------------------------------ S3: uploads
def _raw(path):
    bucket, key = path[5:].split("/", 1)
    return bucket, key


def open_uploads(store, path) -> list:
    bucket, key = _raw(path)
    return store._client().list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])


def _slow_after_first_part(signal_file):
    from pipeline.storage.s3 import S3Storage

    class SlowStore(S3Storage):
        def _upload_part(self, bucket, key, upload_id, number, data, crc):
            if number > 1:
                open(signal_file, "w").close()
                time.sleep(60)  # killed here
            return super()._upload_part(bucket, key, upload_id, number, data, crc)

    return SlowStore(multipart_threshold=5 * MiB, part_size=5 * MiB, concurrency=1)


def test_kill_mid_multipart_upload_leaves_no_object(s3root, tmp_path):
    store = storage_for(s3root)
    path = store.join(s3root, "shard-000000.tar")
    local, signal_file = tmp_path / "payload", tmp_path / "one-part-up"
    local.write_bytes(os.urandom(11 * MiB))
    pid = os.fork()
    if pid == 0:  # the child: an upload killed after its first part
        try:
            _slow_after_first_part(signal_file).put_file(path, local)
        finally:
            os._exit(1)
    try:
        deadline = time.time() + 30
        while not signal_file.exists() and time.time() < deadline:
            time.sleep(0.02)
        assert signal_file.exists(), "the child's upload did not start"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not store.exists(path) and store.list(s3root) == []
    assert len(open_uploads(store, path)) == 1  # invisible, but stored until aborted
    assert abort_orphan_uploads(s3root, {}) == 1  # no live lock there: nobody's, aborted whatever its age
    assert open_uploads(store, path) == [] and not store.exists(path)


def test_interrupted_multipart_upload_is_aborted(s3root, tmp_path):
    from pipeline.storage.s3 import S3Storage

    class Interrupted(S3Storage):
        def _upload_part(self, bucket, key, upload_id, number, data, crc):
            if number == 2:
                raise KeyboardInterrupt
            return super()._upload_part(bucket, key, upload_id, number, data, crc)

    store = Interrupted(multipart_threshold=5 * MiB, part_size=5 * MiB, concurrency=2)
    path = store.join(s3root, "model.safetensors")
    local = tmp_path / "payload"
    local.write_bytes(os.urandom(11 * MiB))
    with pytest.raises(KeyboardInterrupt):
        store.put_file(path, local)
    assert not store.exists(path) and open_uploads(store, path) == []
    assert local.exists()  # not consumed: the caller discards it (Unit.discard)


def test_refused_multipart_create_is_aborted(s3root):
    store = small_multipart_storage()
    path = store.join(s3root, "big-record")
    assert store.create(path, b"a" * (6 * MiB)) is True
    assert store.create(path, b"b" * (6 * MiB)) is False
    assert store.read_bytes(path)[:3] == b"aaa" and open_uploads(store, path) == []


def test_409_conflict_is_retried(s3root):
    """409 ConditionalRequestConflict (two create-only writes racing on AWS; SeaweedFS answers 412 to the loser
    instead): the write is tried again; for a multipart upload with a new upload, the refused one aborted."""
    store = small_multipart_storage()
    injected = {"PutObject": 1, "CompleteMultipartUpload": 1}
    with conflicts(store._client(), injected, "if-none-match"):
        retries = store.retries
        assert store.create(store.join(s3root, "small"), b"x") is True
        assert store.create(store.join(s3root, "big"), b"y" * (6 * MiB)) is True
        assert injected == {"PutObject": 0, "CompleteMultipartUpload": 0}
        assert store.retries == retries + 2
        assert store.read_bytes(store.join(s3root, "big")) == b"y" * (6 * MiB)
        assert open_uploads(store, store.join(s3root, "big")) == []


def test_lost_answers_of_writes_are_recognised(s3root, fast_backoff):
    """The server does a write but its answer is lost (a connection reset): botocore sends it again, and the second
    answer is a refusal (412 for a create-only or compare-and-swap write, NoSuchUpload for a completed multipart
    upload). The write is ours and counts as done, not as somebody else's."""
    from botocore.exceptions import ConnectionClosedError

    store = small_multipart_storage()
    client = store._client()
    lose = {}

    def send_then_lose(request, **_):
        op = operation(request)
        if lose.get(op):
            lose[op] -= 1
            client._endpoint.http_session.send(request).content  # the server does it...
            raise ConnectionClosedError(endpoint_url=request.url)  # ...and its answer never arrives

    client.meta.events.register("before-send.s3", send_then_lose)
    try:
        small, big, plain = (store.join(s3root, n) for n in ("record.json", "big-record", "model.safetensors"))
        data = os.urandom(6 * MiB)
        lose["PutObject"] = 1
        assert store.create(small, b"mine") is True
        lose["CompleteMultipartUpload"] = 1
        assert store.create(big, data) is True and store.read_bytes(big) == data
        assert store.create(small, b"again") is False  # a real refusal stays one
        content, version = store.read_versioned(small)
        lose["PutObject"] = 1
        assert store.replace_if(small, b"swapped", version) is True and store.read_bytes(small) == b"swapped"
        lose["CompleteMultipartUpload"] = 1
        assert store.write_bytes(plain, data[::-1])["size"] == len(data)
        assert store.read_bytes(plain) == data[::-1]
        assert lose == {"PutObject": 0, "CompleteMultipartUpload": 0} and store.retries >= 4
        assert open_uploads(store, s3root + "/") == []
    finally:
        client.meta.events.unregister("before-send.s3", send_then_lose)


# ------------------------------------------------------------------------------------------------ S3: errors
def _one_line_error(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_wrong_credentials_missing_bucket_no_credentials_one_line(s3_env, monkeypatch):
    from pipeline.storage.s3 import S3Storage

    ok = f"s3://{s3_env.bucket}/x"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    msg = _one_line_error(lambda: S3Storage().check(ok))
    assert "access refused" in msg and "SignatureDoesNotMatch" in msg and s3_env.endpoint in msg
    assert "access refused" in _one_line_error(lambda: S3Storage().exists(ok + "/y"))  # HEAD: 403 without a body
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    assert "InvalidAccessKeyId" in _one_line_error(lambda: S3Storage().check(ok))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    assert "no AWS credentials found" in _one_line_error(lambda: S3Storage().check(ok))
    for var, value in s3_env.env().items():
        monkeypatch.setenv(var, value)
    msg = _one_line_error(lambda: S3Storage().check("s3://no-such-bucket-here/run"))
    assert msg == f"s3://no-such-bucket-here: no such bucket at {s3_env.endpoint}"
    _one_line_error(lambda: S3Storage().read_bytes("s3://no-such-bucket-here/run/x"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s.getsockname()[1]}")  # nothing listens
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        assert "cannot reach the object store" in _one_line_error(lambda: S3Storage().check(ok))


def test_storage_options_go_by_the_longest_prefix_and_a_mistake_is_one_line(s3_env, monkeypatch, tmp_path):
    """set_storage_options: a path takes the options of the longest prefix it lies under (a prefix ends at a "/"),
    others the environment's; their backend signs with the credentials the *_env options name. An unknown option, a
    local prefix, a variable not set and a file that is no mapping are each one line."""
    from pipeline.storage import load_storage_options, set_storage_options

    b = s3_env.bucket
    set_storage_options({f"s3://{b}": {"endpoint_url": s3_env.endpoint, "key_env": "K", "secret_env": "S"},
                         f"s3://{b}/deep/": {"endpoint_url": "http://127.0.0.1:9", "page_size": 7}})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")  # the environment's credentials are not the ones used
    monkeypatch.setenv("K", s3_env.env()["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("S", s3_env.env()["AWS_SECRET_ACCESS_KEY"])
    top, deep = storage_for(f"s3://{b}/x"), storage_for(f"s3://{b}/deep/x")
    assert storage_for(f"s3://{b}") is top and storage_for(f"s3://{b}/deeper/x") is top and deep is not top
    assert (deep.page_size, top.page_size) == (7, 1000) and storage_for(f"s3://{b}x/y") not in (top, deep)
    top.write_bytes(f"s3://{b}/x", b"signed with K and S")
    assert storage_for(f"s3://{b}/x").read_bytes(f"s3://{b}/x") == b"signed with K and S"
    assert "access refused" in _one_line_error(lambda: storage_for(f"s3://{b}x/y").check(f"s3://{b}/x"))
    monkeypatch.delenv("S")
    set_storage_options({f"s3://{b}": {"key_env": "K", "secret_env": "S"}})  # the backends are made again
    assert _one_line_error(lambda: storage_for(f"s3://{b}/x").check(f"s3://{b}/x")) == \
        "storage option secret_env: the environment variable S is not set"
    assert _one_line_error(lambda: set_storage_options({f"s3://{b}": {"endpoint": "x"}})).startswith(
        f"storage options: s3://{b}: unknown option 'endpoint' (options of s3://: ")
    assert "expected an object-storage URL prefix" in _one_line_error(lambda: set_storage_options({"/data": {}}))
    (tmp_path / "list.yaml").write_text("- s3://a\n")
    assert _one_line_error(lambda: load_storage_options(tmp_path / "list.yaml")) == \
        f"FIRSTSTAGE_STORAGE_OPTIONS {tmp_path / 'list.yaml'}: expected a mapping of URL prefixes to options"


def test_a_storage_option_of_the_wrong_form_is_one_line_when_it_is_set(tmp_path):
    """An endpoint_url without http(s):// (`minio.lab:9000`), a size written as a string: botocore's ValueError or a
    TypeError came out as a traceback at the first request, mid-run; they are refused when the options are set,
    naming the file and the prefix, as an unknown option is."""
    from pipeline.storage import load_storage_options, set_storage_options

    assert _one_line_error(lambda: set_storage_options({"s3://raw/": {"endpoint_url": "minio.lab:9000"}})) == (
        "storage options: s3://raw/: storage option endpoint_url: 'minio.lab:9000' is not an http:// or https:// URL")
    (tmp_path / "opts.yaml").write_text("s3://raw/:\n  page_size: '1000'\n")
    assert _one_line_error(lambda: load_storage_options(tmp_path / "opts.yaml")) == (
        f"FIRSTSTAGE_STORAGE_OPTIONS {tmp_path / 'opts.yaml'}: s3://raw/: storage option page_size: expected a whole "
        f"number of at least 1, got '1000'")
    assert "storage option region: expected a string, got 5" in _one_line_error(
        lambda: set_storage_options({"s3://raw/": {"region": 5}}))
    set_storage_options({"s3://raw/": {"endpoint_url": "https://minio.lab:9000", "page_size": 10}})  # well formed
    assert storage_for("s3://raw/x").page_size == 10


def test_missing_extra_one_line(monkeypatch):
    from pipeline.storage import base

    monkeypatch.setitem(sys.modules, "botocore", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "pipeline.storage.s3", raising=False)
    monkeypatch.delitem(base.BACKENDS, "s3", raising=False)
    msg = _one_line_error(lambda: storage_for("s3://bucket/run"))
    assert msg == ("s3://bucket/run: s3:// needs the s3 extra (botocore is not installed): "
                   "pip install 'firststage[s3]'")


# ------------------------------------------------------------------------------------------------ S3: faults
def test_reads_and_writes_survive_dropped_connections_and_throttling(s3_env, monkeypatch, caplog, fast_backoff):
    proxy = FaultProxy(("127.0.0.1", int(s3_env.endpoint.rsplit(":", 1)[1])), seed=3, mean_bytes=3 * MiB)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")
    try:
        store = small_multipart_storage()
        root = f"s3://{s3_env.bucket}/{uuid.uuid4().hex[:12]}"
        rng = random.Random(0)
        objects = {store.join(root, f"{i:03d}.bin"): rng.randbytes(rng.choice([300_000, 2 * MiB])) for i in range(6)}
        objects[store.join(root, "big.tar")] = rng.randbytes(11 * MiB)  # a multipart upload through the faults
        with caplog.at_level("WARNING", logger="firststage.storage"):
            for path, data in objects.items():
                store.write_bytes(path, data)
            assert store.create(store.join(root, "record.json"), b"{}") is True
            assert store.list(root, ".bin") == sorted(p for p in objects if p.endswith(".bin"))
            for path, data in objects.items():
                assert store.read_bytes(path) == data
                with store.open_read(path) as f:  # streamed, as a loader reads a shard
                    assert b"".join(iter(lambda: f.read(64 * 1024), b"")) == data
        assert sum(proxy.faults.values()) > 0 and store.retries > 0, (proxy.faults, store.retries)
        assert store.retries >= proxy.faults["slowdown"]
        assert "request(s) retried" in caplog.text
        print(f"faults injected {proxy.faults}; retries counted {store.retries}: {store.retry_reasons}")
    finally:
        proxy.close()


# ------------------------------------------------------------------------------------------------ S3: loaders
def test_webdataset_gopen_reads_shards_from_s3(s3root):
    from pipeline.storage.s3 import register_gopen

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            data = f"sample {i}".encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    url = storage_for(s3root).join(s3root, "shard-000000.tar")
    storage_for(url).write_bytes(url, buf.getvalue())
    register_gopen()
    from webdataset.gopen import gopen

    with gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        assert [tar.extractfile(m).read() for m in tar] == [b"sample 0", b"sample 1", b"sample 2"]
