"""Object storage (s3://bucket/key) as storage: one upload per object, create-only and compare-and-swap by
conditional requests, streaming reads that resume after a dropped connection.

Client library: botocore (the library under boto3), called directly, for every operation. Why not s3fs (fsspec), the
natural first choice, for some of them:
  * the commit protocol needs conditional writes with full control: If-None-Match: * on PutObject *and* on
    CompleteMultipartUpload, If-Match on PutObject for the lock's compare-and-swap (s3fs has no If-Match write),
    the HTTP status of a refusal whatever error class it is mapped to, and an abort of the multipart upload on *any*
    exit, KeyboardInterrupt included (s3fs aborts on Exception only, and a file opened 'wb' commits on close);
  * one retry layer (botocore's standard/adaptive mode), counted through its own event hooks; s3fs retries again
    around botocore's retries, which makes the count and the delays hard to reason about;
  * reads: botocore's streaming GetObject used about half the client CPU of s3fs's buffered file for a 64 MiB shard
    here (44 ms against 87-109 ms, see the storage report), about what obstore used (41 ms), without an event-loop
    thread per process (loader workers are forked);
  * installation: s3fs pins aiobotocore, which pins botocore to a window of three patch releases; botocore alone
    installs beside any boto3 / s3fs / aiobotocore the user has.

Credentials, region and endpoint come from the backend's storage options where a path has them (S3Storage,
pipeline.storage.set_storage_options: one process can read one endpoint and write another), else from botocore's
standard chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and
~/.aws/{credentials,config}, AWS_REGION, AWS_ENDPOINT_URL(_S3) or `endpoint_url` in the profile (an S3-compatible
server), instance roles. Retries: AWS_RETRY_MODE / AWS_MAX_ATTEMPTS (or the profile's
retry_mode / max_attempts), else standard mode with 10 attempts: throttling (503 SlowDown, 429) and dropped
connections are retried with backoff; every retry is counted (`S3Storage.retries`) and logged.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.session

from pipeline.errors import StorageUnavailable, UserError
from pipeline.storage.base import BACKENDS, Storage, check_writable
from pipeline.storage.local import pid_alive

log = logging.getLogger("firststage.storage")

MiB = 2**20
_ACCESS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden", "InvalidToken",
           "ExpiredToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidClientTokenId"}
# what a dropped connection looks like while a response body is being read (botocore retries only whole requests)
_STREAM_ERRORS = (botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError,
                  botocore.exceptions.HTTPClientError, botocore.exceptions.ReadTimeoutError, ConnectionError,
                  TimeoutError)
try:
    import urllib3.exceptions

    _STREAM_ERRORS += (urllib3.exceptions.HTTPError,)
except ImportError:  # pragma: no cover (botocore depends on urllib3)
    pass


def split_url(path: str) -> tuple[str, str]:
    """('bucket', 'key') of s3://bucket/key."""
    p = str(path)
    if not p.lower().startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {p}")
    bucket, _, key = p[5:].partition("/")
    if not bucket:
        raise UserError(f"{p}: no bucket in the URL (s3://BUCKET/KEY)")
    return bucket, key


def _status(e: botocore.exceptions.ClientError) -> int | None:
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _retried(e: botocore.exceptions.ClientError) -> bool:
    """Whether botocore sent the request more than once: a conditional write refused after a retry may have been
    refused because the first attempt succeeded and only its response was lost."""
    return bool(e.response.get("ResponseMetadata", {}).get("RetryAttempts"))


def precondition_failed(e: Exception) -> bool:
    """412: a create-only write found the object, or a compare-and-swap found another version (whatever error class
    botocore maps it to)."""
    return isinstance(e, botocore.exceptions.ClientError) and (
        _status(e) == 412 or _code(e) in ("PreconditionFailed", "412"))


def conflict(e: Exception) -> bool:
    """409 ConditionalRequestConflict: two conditional writes of one key raced; the refused one is to be retried."""
    return isinstance(e, botocore.exceptions.ClientError) and (
        _status(e) == 409 and _code(e) not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou", "BucketNotEmpty"))


def _not_found(e: Exception) -> bool:
    return isinstance(e, botocore.exceptions.ClientError) and (
        _code(e) in ("NoSuchKey", "404", "NotFound")
        or (_status(e) == 404 and _code(e) not in ("NoSuchBucket", "NoSuchUpload")))


# the server cannot be reached: a user error at the start (a wrong AWS_ENDPOINT_URL), a transient fault (exit 75) once
# it has answered in this process (a store down for minutes during training)
_UNREACHABLE = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)
# the storage options that name an environment variable -> the client argument its value is
_CREDENTIAL_ARGS = {"key_env": "aws_access_key_id", "secret_env": "aws_secret_access_key",
                    "token_env": "aws_session_token"}


class S3Storage(Storage):
    """s3://bucket/key. One botocore client per process (made on first use, again after a fork).

    `multipart_threshold`: objects of at least this many bytes go up as a multipart upload of `part_size` parts,
    `concurrency` in flight (the part size grows when a file would need more than 10,000 parts); S3 refuses parts
    under 5 MiB except the last. `conflict_attempts`: tries of a conditional write refused with 409. `page_size`:
    entries per listing request (S3's most, 1000).

    Where the store is and who signs (its storage options; pipeline.storage.set_storage_options gives them per URL
    prefix): `endpoint_url` (an S3-compatible server), `region`, `profile` (of ~/.aws/config), and `key_env` /
    `secret_env` / `token_env`, the names of the environment variables that hold the access key, secret key and
    session token (names, so that no secret is written into a config file or a run's records). What is not given
    comes from botocore's standard chain (the environment, the profile, instance roles)."""

    def __init__(self, multipart_threshold: int = 64 * MiB, part_size: int = 16 * MiB, concurrency: int = 4,
                 conflict_attempts: int = 8, page_size: int = 1000, endpoint_url: str | None = None,
                 region: str | None = None, profile: str | None = None, key_env: str | None = None,
                 secret_env: str | None = None, token_env: str | None = None):
        for name, value in (("multipart_threshold", multipart_threshold), ("part_size", part_size),
                            ("concurrency", concurrency), ("conflict_attempts", conflict_attempts),
                            ("page_size", page_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"storage option {name}: expected a whole number of at least 1, got {value!r}")
        for name, value in (("endpoint_url", endpoint_url), ("region", region), ("profile", profile),
                            ("key_env", key_env), ("secret_env", secret_env), ("token_env", token_env)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"storage option {name}: expected a string, got {value!r}")
        if endpoint_url is not None and not endpoint_url.lower().startswith(("http://", "https://")):
            raise UserError(f"storage option endpoint_url: {endpoint_url!r} is not an http:// or https:// URL")
        self.endpoint_url, self.region, self.profile = endpoint_url, region, profile
        self.credential_vars = {"key_env": key_env, "secret_env": secret_env, "token_env": token_env}
        self._conditional_ok: set[tuple[int, str]] = set()  # (pid, bucket) that refused a second create-only write
        self.multipart_threshold, self.part_size = multipart_threshold, part_size
        self.concurrency, self.conflict_attempts, self.page_size = concurrency, conflict_attempts, page_size
        self.retries = 0  # requests sent again (botocore's retries, reads resumed, conflicts retried), this process
        self.retry_reasons: dict[str, int] = {}
        self._client_obj, self._pid, self._lock, self._count_lock = None, None, threading.Lock(), threading.Lock()
        self._cleaned_staging = False
        self._answered: set[str] = set()  # buckets whose server answered this process: unreachable later is transient

    # ------------------------------------------------------------------------------------------------ the client
    def _client(self):
        if self._pid != os.getpid():  # first use, or a forked child: a client (and its connections) per process
            self._lock, self._count_lock, self._client_obj = threading.Lock(), threading.Lock(), None
            self._pid = os.getpid()
            self.retries, self.retry_reasons = 0, {}
        if self._client_obj is None:
            with self._lock:
                if self._client_obj is None:
                    self._client_obj = self._make_client()
        return self._client_obj

    def _make_client(self):
        session = botocore.session.get_session()
        session.register_component("data_loader", _shared_loader())
        if self.profile:
            session.set_config_variable("profile", self.profile)
        try:
            scoped = session.get_scoped_config()
        except botocore.exceptions.ProfileNotFound as e:
            raise UserError(f"AWS profile not found: {e}") from None
        mode = os.environ.get("AWS_RETRY_MODE") or scoped.get("retry_mode") or "standard"
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or scoped.get("max_attempts") or 10)
        config = botocore.config.Config(retries={"mode": mode, "total_max_attempts": attempts},
                                        connect_timeout=10, read_timeout=60,
                                        max_pool_connections=max(10, 2 * self.concurrency))
        client = session.create_client("s3", config=config, endpoint_url=self.endpoint_url, region_name=self.region,
                                       **self._credentials())
        client.meta.events.register("needs-retry.s3", self._note_failure)
        client.meta.events.register("request-created.s3", self._note_attempt)
        return client

    def _credentials(self) -> dict[str, str]:
        """The credentials the *_env options name, read from the environment now; one line for a variable not set."""
        out = {}
        for option, var in self.credential_vars.items():
            if var and not os.environ.get(var):
                raise UserError(f"storage option {option}: the environment variable {var} is not set")
            if var:
                out[_CREDENTIAL_ARGS[option]] = os.environ[var]
        return out

    @staticmethod
    def _note_failure(request_dict=None, response=None, caught_exception=None, **_):
        """What went wrong with an attempt, kept in the call's context for the retry that may follow."""
        if request_dict is None:
            return None
        if caught_exception is not None:
            reason = type(caught_exception).__name__
        elif response is not None:
            meta = response[1].get("ResponseMetadata", {})
            reason = f"{meta.get('HTTPStatusCode')} {response[1].get('Error', {}).get('Code', '')}".strip()
        else:
            return None
        request_dict["context"]["firststage_failure"] = reason
        return None  # the retry handler decides

    def _note_attempt(self, request=None, operation_name=None, **_):
        context = getattr(request, "context", None) or {}
        attempt = context.get("retries", {}).get("attempt", 1)
        if attempt > 1:
            self._count_retry(f"{operation_name}: {context.get('firststage_failure', 'error')}")

    def _count_retry(self, reason: str) -> None:
        kind = reason.split(": ", 1)[-1]
        with self._count_lock:  # upload threads retry too
            self.retries += 1
            self.retry_reasons[kind] = self.retry_reasons.get(kind, 0) + 1
            n = self.retries
        if n & (n - 1) == 0 or n % 1000 == 0:  # 1, 2, 4, 8, ... then every 1000: logs stay readable
            log.warning("object storage: %d request(s) retried in this process so far; latest: %s", n, reason)

    def endpoint(self) -> str:
        return self._client().meta.endpoint_url

    # ------------------------------------------------------------------------------------------------ errors
    def _user_error(self, e: Exception, bucket: str) -> UserError | None:
        """One line for what the user must fix (credentials, bucket, endpoint), or None."""
        if isinstance(e, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
            return UserError(f"s3://{bucket}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                             f", or AWS_PROFILE with ~/.aws/credentials)")
        if isinstance(e, botocore.exceptions.ProfileNotFound):
            return UserError(f"s3://{bucket}: AWS profile not found: {e}")
        if isinstance(e, _UNREACHABLE):
            where = "its endpoint_url option" if self.endpoint_url else "AWS_ENDPOINT_URL"
            return UserError(f"s3://{bucket}: cannot reach the object store at {self.endpoint()} "
                             f"({self.retries} retries): is {where} right and the server up?")
        if isinstance(e, botocore.exceptions.ClientError):
            code = _code(e)
            if code == "NoSuchBucket":
                return UserError(f"s3://{bucket}: no such bucket at {self.endpoint()}")
            if code in _ACCESS or _status(e) == 403:
                return UserError(f"s3://{bucket}: access refused by {self.endpoint()} ({code}): check the AWS "
                                 f"credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's permissions")
        return None

    def _call(self, op: str, bucket: str, key: str | None = None, **kw):
        """client.<op>(Bucket=bucket, Key=key, **kw); credential, bucket and endpoint errors as one UserError line,
        a missing key as FileNotFoundError."""
        args = {"Bucket": bucket, **({"Key": key} if key is not None else {}), **kw}
        try:
            answer = getattr(self._client(), op)(**args)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            if bucket in self._answered and isinstance(e, _UNREACHABLE):  # it answered earlier: a transient fault
                raise StorageUnavailable(f"s3://{bucket}: the object store at {self.endpoint()} stopped answering "
                                         f"({self.retries} retries; it answered earlier in this run): run the same "
                                         f"command again once it is back") from None
            err = self._user_error(e, bucket)
            if err is not None:
                raise err from None
            if key is not None and op in ("get_object", "head_object") and _not_found(e):
                raise FileNotFoundError(f"s3://{bucket}/{key}") from None
            raise
        self._answered.add(bucket)
        return answer

    def check(self, path: str) -> None:
        """Fail early, in one line, on missing or wrong credentials, a missing bucket or an unreachable endpoint:
        one listing request under `path` (the backend needs the list permission anyway)."""
        bucket, key = split_url(path)
        self._call("list_objects_v2", bucket, Prefix=key, MaxKeys=1)

    def check_conditional_writes(self, folder: str) -> None:
        """A create-only write of a probe object, twice, then its deletion: a server that ignores If-None-Match: *
        would let two runs take one lock or commit one unit twice, silently; it is refused in one line instead.
        Once per bucket, backend and process (the stages call it on their output folder before taking its lock)."""
        bucket, _ = split_url(folder)
        if (os.getpid(), bucket) in self._conditional_ok:
            return
        probe = self.join(str(folder), f".firststage-probe-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            refused = self.create(probe, b"1") and not self.create(probe, b"2")
        finally:
            self.delete(probe)
        if not refused:
            raise UserError(f"s3://{bucket}: the object store at {self.endpoint()} replaced an existing object on a "
                            f"create-only write (If-None-Match: *); firststage needs conditional writes for its "
                            f"records and locks (AWS S3, MinIO and SeaweedFS have them)")
        self._conditional_ok.add((os.getpid(), bucket))

    # ------------------------------------------------------------------------------------------------ reads
    def open_read(self, path) -> BinaryIO:
        """A buffered binary stream of the object: one GET, read as it arrives (shards member by member); a
        connection dropped mid-way is resumed from the same byte of the same version (Range + If-Match)."""
        return io.BufferedReader(S3ReadStream(self, str(path)), buffer_size=MiB)

    def open_range(self, path, start: int, length: int) -> BinaryIO:
        """A buffered stream of `length` bytes of the object from byte `start`: one ranged GET, resumed the same way."""
        return io.BufferedReader(S3ReadStream(self, str(path), start=start, length=length), buffer_size=MiB)

    def read_bytes(self, path) -> bytes:
        with self.open_read(path) as f:
            return f.read()

    def read_versioned(self, path):
        try:
            with S3ReadStream(self, str(path)) as f:
                return f.readall(), f.etag
        except FileNotFoundError:
            return None

    def exists(self, path) -> bool:
        """An object of this name, or a "folder": any object under `path/`."""
        return self.object_exists(path) or self.folder_exists(path)

    def object_exists(self, path) -> bool:
        bucket, key = split_url(path)
        if not key:
            return False
        try:
            self._call("head_object", bucket, key)
            return True
        except FileNotFoundError:
            return False

    def folder_exists(self, path) -> bool:
        """Whether any object lies under `path/` (one listing request)."""
        bucket, key = split_url(path)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        return bool(self._call("list_objects_v2", bucket, Prefix=prefix, MaxKeys=1).get("KeyCount"))

    seekable = False  # a stream is one GET, read as it arrives
    opens_in_place = False

    def read_failed(self, err: Exception) -> bool:
        import tarfile

        return not isinstance(err, (tarfile.TarError, EOFError, ValueError, KeyError, FileNotFoundError))

    def local_file(self, path) -> Path:
        from pipeline.storage.cache import local_copy

        return local_copy(path)

    def info(self, path) -> dict:
        """size, ETag and the SHA-256 this backend stored with the object (None for an object written otherwise)."""
        bucket, key = split_url(path)
        r = self._call("head_object", bucket, key)
        return {"size": r["ContentLength"], "etag": r["ETag"], "sha256": r.get("Metadata", {}).get("sha256")}

    def list(self, folder, suffix: str = "", prefix: str = "") -> list[str]:
        return sorted(u for u in self.entries(folder, prefix)[0] if u.endswith(suffix))

    def entries(self, folder, start: str = "") -> tuple[dict[str, tuple[int, str]], list[str]]:
        """What lies directly in `folder` (of it, the names that start with `start`): ({object URL: (size, ETag)},
        [sub-folder URLs]), by listing (one request per 1000 entries)."""
        bucket, prefix = split_url(folder)
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        files, folders = {}, []
        for r in self._listing(bucket, prefix + start, Delimiter="/"):
            files.update({f"s3://{bucket}/{o['Key']}": (o["Size"], o.get("ETag", "")) for o in r.get("Contents", [])
                          if o["Key"] != prefix})
            folders += [f"s3://{bucket}/{c['Prefix'].rstrip('/')}" for c in r.get("CommonPrefixes", [])]
        return files, sorted(folders)

    def walk(self, folder) -> dict[str, tuple[int, str]]:
        """Every object under `folder`, at any depth: {URL: (size, ETag)}, in key order."""
        bucket, prefix = split_url(folder)
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        return {f"s3://{bucket}/{o['Key']}": (o["Size"], o.get("ETag", ""))
                for r in self._listing(bucket, prefix) for o in r.get("Contents", []) if not o["Key"].endswith("/")}

    def _listing(self, bucket: str, prefix: str, **kw):
        """The pages of list_objects_v2 under `prefix` (`page_size` entries each), one request each, as read."""
        token = None
        while True:
            page = {"ContinuationToken": token} if token else {}
            r = self._call("list_objects_v2", bucket, Prefix=prefix, MaxKeys=self.page_size, **kw, **page)
            yield r
            token = r.get("NextContinuationToken")
            if not r.get("IsTruncated") or not token:
                return

    # ------------------------------------------------------------------------------------------------ writes
    def write_bytes(self, path, data: bytes) -> dict:
        bucket, key = split_url(path)
        return self._upload(bucket, key, io.BytesIO(data), len(data), {})

    def put_file(self, path, local: Path) -> dict:
        """Upload the finished file whole (one PUT, or a multipart upload that is aborted on any failure or
        interrupt), then delete it. Returns {'size', 'sha256', 'etag'} of what was written. A local folder becomes
        the objects under `path` (each whole; an export's files), then is deleted; returns {relative name: that}."""
        bucket, key = split_url(path)
        local = Path(local)
        if local.is_dir():
            written = {}
            for f in sorted(q for q in local.rglob("*") if q.is_file()):
                name = f.relative_to(local).as_posix()
                written[name] = self.put_file(self.join(path, name), f)
            shutil.rmtree(local, ignore_errors=True)
            return written
        with open(local, "rb") as f:
            written = self._upload(bucket, key, f, os.fstat(f.fileno()).st_size, {})
        local.unlink(missing_ok=True)
        return written

    def create(self, path, data: bytes) -> bool:
        return self._conditional(path, data, {"IfNoneMatch": "*"})

    def replace_if(self, path, data: bytes, version) -> bool:
        return self._conditional(path, data, {"IfMatch": str(version)})

    def _conditional(self, path, data: bytes, condition: dict) -> bool:
        """A write under `condition`: True if written; False on 412 (the object exists / is another version) or,
        for If-Match, 404; 409 (a racing conditional write) is retried after a random backoff."""
        bucket, key = split_url(path)
        delay = 0.05
        for attempt in range(self.conflict_attempts):
            try:
                self._upload(bucket, key, io.BytesIO(data), len(data), condition)
                return True
            except botocore.exceptions.ClientError as e:
                if precondition_failed(e) or ("IfMatch" in condition and _not_found(e)):
                    # refused after botocore sent it twice: the first attempt may have written it and lost only its
                    # answer; then the object holds exactly our bytes (a record, a lease with a fresh token)
                    if _retried(e):
                        current = self.read_versioned(path)
                        return current is not None and current[0] == data
                    return False
                if not conflict(e) or attempt == self.conflict_attempts - 1:
                    raise
                self._count_retry(f"{'create' if 'IfNoneMatch' in condition else 'replace'}: 409 {_code(e)}")
                time.sleep(delay * (0.5 + random.random()))
                delay = min(2 * delay, 2.0)
        raise AssertionError("unreachable")

    def _upload(self, bucket: str, key: str, source: BinaryIO, size: int, condition: dict) -> dict:
        """The object from `source` (`size` bytes), appearing whole or not at all: one PutObject, or a multipart
        upload whose completion carries `condition` and which is aborted on any exception or interrupt."""
        if size < max(self.multipart_threshold, 1):
            data = source.read()
            sha = hashlib.sha256(data).hexdigest()
            check_writable(f"s3://{bucket}/{key}")
            r = self._call("put_object", bucket, key, Body=data, Metadata={"sha256": sha}, **condition)
            return {"size": len(data), "sha256": sha, "etag": r.get("ETag")}
        part_size = max(self.part_size, -(-size // 10000))
        # as boto3's transfer manager does: with botocore's default checksums (request_checksum_calculation
        # when_supported) the upload is created with CRC32 and each part's CRC32 goes into the completion
        crc = ({"ChecksumAlgorithm": "CRC32"}
               if self._client().meta.config.request_checksum_calculation == "when_supported" else {})
        token = os.urandom(8).hex()  # names this upload in the object's metadata: see _completed_anyway
        upload_id = self._call("create_multipart_upload", bucket, key, Metadata={"firststage-upload": token},
                               **crc)["UploadId"]
        try:
            sha = hashlib.sha256()
            parts, pending, number, done = [], set(), 0, 0
            with ThreadPoolExecutor(max(1, self.concurrency), thread_name_prefix="s3-upload") as pool:
                try:
                    while chunk := source.read(part_size):
                        sha.update(chunk)
                        number += 1
                        done += len(chunk)
                        pending.add(pool.submit(self._upload_part, bucket, key, upload_id, number, chunk, crc))
                        if len(pending) >= self.concurrency:
                            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                            parts += [f.result() for f in finished]
                    parts += [f.result() for f in pending]
                except BaseException:
                    for f in pending:  # parts not started are dropped; running ones end before the abort
                        f.cancel()
                    raise
            if done != size:
                raise OSError(f"s3://{bucket}/{key}: the source changed size during the upload ({done} of {size} "
                              f"bytes)")
            # A multipart upload's metadata is fixed at its start, before the hash is known: the hash is returned
            # (for the unit's record) and info() reports None for the sha256 of a multipart object.
            check_writable(f"s3://{bucket}/{key}")  # the parts took a while: the object appears only if still ours
            try:
                r = self._call("complete_multipart_upload", bucket, key, UploadId=upload_id,
                               MultipartUpload={"Parts": sorted(parts, key=lambda p: p["PartNumber"])}, **condition)
            except botocore.exceptions.ClientError as e:
                r = self._completed_anyway(e, bucket, key, token)
                if r is None:
                    raise
        except BaseException:
            self._abort(bucket, key, upload_id)
            raise
        return {"size": done, "sha256": sha.hexdigest(), "etag": r.get("ETag")}

    def _completed_anyway(self, e, bucket: str, key: str, token: str) -> dict | None:
        """A completion refused after botocore sent it twice (NoSuchUpload, or 412 for a conditional one) may have
        succeeded the first time, its answer lost on the way: then the object is this upload (its metadata holds
        our token). Its HeadObject answer, or None."""
        if not _retried(e) or not (_code(e) == "NoSuchUpload" or precondition_failed(e)):
            return None
        try:
            head = self._call("head_object", bucket, key)
        except FileNotFoundError:
            return None
        return head if head.get("Metadata", {}).get("firststage-upload") == token else None

    def _upload_part(self, bucket: str, key: str, upload_id: str, number: int, data: bytes, crc: dict) -> dict:
        r = self._call("upload_part", bucket, key, UploadId=upload_id, PartNumber=number, Body=data, **crc)
        return {"PartNumber": number, "ETag": r["ETag"], **({"ChecksumCRC32": r["ChecksumCRC32"]}
                                                            if crc and "ChecksumCRC32" in r else {})}

    def _abort(self, bucket: str, key: str, upload_id: str) -> None:
        """Abort a multipart upload (its parts are deleted; nothing appears under the key). An upload that is already
        gone (completed, or removed after a 409) is not an error; any other failure is logged, never raised over
        the error that made us abort."""
        try:
            self._client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except botocore.exceptions.ClientError as e:
            if _code(e) != "NoSuchUpload":
                log.warning("could not abort the multipart upload %s of s3://%s/%s: %s", upload_id, bucket, key, e)
        except Exception as e:  # noqa: BLE001 (the original error matters more)
            log.warning("could not abort the multipart upload %s of s3://%s/%s: %s", upload_id, bucket, key, e)

    def uploads(self, folder: str) -> list[tuple[str, str, float]]:
        """The unfinished multipart uploads under `folder` (at any depth): (object URL, upload id, when it was
        started, Unix time of the store's clock)."""
        bucket, prefix = split_url(folder)
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        found, kw = [], {}
        while True:
            r = self._call("list_multipart_uploads", bucket, Prefix=prefix, **kw)
            for u in r.get("Uploads", []):
                initiated = u["Initiated"]
                if isinstance(initiated, datetime):
                    found.append((f"s3://{bucket}/{u['Key']}", u["UploadId"],
                                  initiated.astimezone(timezone.utc).timestamp()))
            if not r.get("IsTruncated"):
                return found
            kw = {"KeyMarker": r.get("NextKeyMarker"), "UploadIdMarker": r.get("NextUploadIdMarker")}

    def abort_upload(self, url: str, upload_id: str) -> None:
        self._abort(*split_url(url), upload_id)

    def delete(self, path) -> None:
        """The object, and every object under `path/` (a folder: an export, a checkpoint); absent: no error. One
        listing finds both (nothing to delete: one request)."""
        bucket, key = split_url(path)
        key = key.rstrip("/")
        if not key:
            raise UserError(f"{path}: refusing to delete a whole bucket")
        check_writable(path)
        found = [o["Key"] for r in self._listing(bucket, key) for o in r.get("Contents", [])
                 if o["Key"] == key or o["Key"].startswith(key + "/")]
        for k in found:
            try:
                self._call("delete_object", bucket, k)
            except botocore.exceptions.ClientError as e:
                if not _not_found(e):
                    raise

    # ------------------------------------------------------------------------------------------------ local side
    def staging_file(self, path) -> Path:
        """A new name (not yet created: a file or a folder is written there) in $TMPDIR/firststage-staging-UID, named
        after the process and the object; put_file deletes it. Staging files of processes that are gone (killed runs)
        are removed on the first call of a process."""
        folder = Path(tempfile.gettempdir()) / f"firststage-staging-{os.getuid()}"  # one per user: /tmp is shared
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self._cleaned_staging:
            self._cleaned_staging = True
            _remove_dead_staging(folder)
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        return folder / f"{os.getpid()}-{os.urandom(6).hex()}-{name}"

    def ensure_folder(self, folder) -> None:
        return None  # an object store has no folders: a key's prefix exists as soon as one object has it

    def join(self, folder, *names: str) -> str:
        return "/".join([str(folder).rstrip("/"), *(n.strip("/") for n in names)])


_LOADER = None


def _shared_loader():
    """One botocore data loader per process tree: the S3 service model (a large JSON file) is parsed once, and a
    forked loader worker or child that makes its own client finds it parsed (about 0.2 s of CPU less each)."""
    global _LOADER
    if _LOADER is None:
        _LOADER = botocore.loaders.create_loader()
    return _LOADER


def _remove_dead_staging(folder: Path) -> None:
    for p in folder.iterdir():
        pid = p.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(pid):
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            except OSError:
                pass


class ObjectReadError(OSError):
    """Reading an object failed after every retry and resumption (a storage failure, not bad content)."""


class S3ReadStream(io.RawIOBase):
    """The object's bytes as they arrive from one GET (or the `length` bytes from `start`: one ranged GET). A
    connection dropped or reset mid-body (which botocore does not retry: it retries whole requests) is resumed with a
    ranged GET from the next byte, under If-Match on the ETag of the first response, so a replaced object fails the
    read instead of splicing two versions. Each resumption counts as a retry of the storage (`S3Storage.retries`);
    after MAX_RESUMES in one read (backing off up to MAX_DELAY seconds) the read fails with ObjectReadError."""

    MAX_RESUMES = 10
    MAX_DELAY = 5.0

    def __init__(self, storage: S3Storage, path: str, max_resumes: int | None = None, start: int = 0,
                 length: int | None = None):
        super().__init__()
        self.storage, self.path = storage, path
        self.bucket, self.key = split_url(path)
        # pos: the next byte's offset in the object; size: where this read ends (the object's size for a whole read)
        self.pos, self.etag, self.size, self._body = start, None, None, None
        self._range = None if start == 0 and length is None else \
            f"bytes={start}-{'' if length is None else start + max(length, 1) - 1}"
        self.max_resumes = max_resumes if max_resumes is not None else self.MAX_RESUMES
        self._open()

    def _open(self) -> None:
        kw = {"Range": self._range} if self._range else {}
        if self.etag is not None:
            kw = {"IfMatch": self.etag, "Range": f"bytes={self.pos}-{self.size - 1}"}
        try:
            r = self.storage._call("get_object", self.bucket, self.key, **kw)
        except botocore.exceptions.ClientError as e:
            if precondition_failed(e):
                raise OSError(f"{self.path} was replaced while it was being read") from None
            if _code(e) == "InvalidRange":  # a range that starts at the end: nothing to read
                self.etag, self.size, self._body = "", self.pos, io.BytesIO(b"")
                return
            raise
        if self.etag is None:
            self.etag, self.size = r.get("ETag"), self.pos + r["ContentLength"]
        self._body = r["Body"]

    def readable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        resumes, delay = 0, 0.0  # the first resumption at once (a reset connection), then backing off
        while True:
            try:
                data = self._body.read(min(n, MiB))  # what a dropped connection loses: at most one read's worth
                if data or self.pos >= self.size:
                    self.pos += len(data)
                    return data
                err: Exception = EOFError(f"connection closed at byte {self.pos} of {self.size}")
            except _STREAM_ERRORS as e:
                err = e
            resumes += 1
            if resumes > self.max_resumes:
                raise ObjectReadError(f"{self.path}: reading failed at byte {self.pos} of {self.size} after "
                                      f"{resumes - 1} resumed connections: {err}") from err
            self.storage._count_retry(f"GetObject body: {type(err).__name__}")
            self._close_body()
            time.sleep(delay * (0.5 + random.random()))
            delay = min(max(2 * delay, 0.1), self.MAX_DELAY)
            try:
                self._open()
            except (FileNotFoundError, UserError):
                raise
            except (botocore.exceptions.BotoCoreError, *_STREAM_ERRORS) as e:  # gone again: counts as a failure
                self._body = io.BytesIO(b"")
                err = e

    def readinto(self, b) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        data = self._read(len(b))
        b[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        chunks = []
        while self.pos < self.size:
            data = self._read(min(self.size - self.pos, 8 * MiB))
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        self._close_body()
        super().close()


def gopen_s3(url, mode: str = "rb", bufsize: int = 8192, **_):
    """A webdataset `gopen` handler for s3:// URLs (reading only): `register_gopen()` installs it."""
    if mode != "rb":
        raise ValueError(f"{url}: s3:// shards are written through the storage interface, not gopen ({mode})")
    from pipeline.storage.base import storage_for

    return storage_for(url).open_read(url)


def register_gopen() -> None:
    """Let webdataset.gopen open s3:// URLs with this backend, in this process and in loader workers forked from it
    (a worker started by spawn / forkserver calls it in its worker_init_fn)."""
    gopen_module = importlib.import_module("webdataset.gopen")  # (the package's `gopen` attribute is the function)
    gopen_module.gopen_schemes["s3"] = gopen_s3


BACKENDS["s3"] = S3Storage
