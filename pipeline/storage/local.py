"""The local filesystem as storage (also NFS, Lustre, GPFS): temporary name, fsync, rename.

A file under its final name is always complete: every write goes to a temporary name in the same folder (so the
rename is atomic), unique to the writer (two writers of one file never share one), and is renamed when complete.
The module-level helpers (atomic_write_json, read_json, ...) take any path and go through `storage_for`, so they
serve every backend.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import UserError
from pipeline.storage.base import BACKENDS, Storage, check_writable, is_remote, storage_for


def _local(path) -> Path:
    p = str(path)
    return Path(p[len("file://"):] if p.startswith("file://") else p)


def temporary_name(path: str | Path, unique: bool = True) -> Path:
    """`.NAME.<tag>.tmp` in the same folder (same filesystem, so the rename is atomic); the tag (pid and random)
    keeps two writers of one file apart. `unique=False`: `.NAME.tmp`."""
    path = _local(path)
    tag = f".{os.getpid()}-{secrets.token_hex(3)}" if unique else ""
    return path.with_name(f".{path.name}{tag}.tmp")


def _identity(st: os.stat_result) -> str:
    """A local file's ETag: its inode and mtime (a file renamed over it, or written again, gets another)."""
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}"


class NotRegularFile(OSError):
    """A local path that is not a regular file (a FIFO, a device, a folder), refused before any byte is read."""

    def __init__(self, path: str, mode: int):
        self.kind = kind_of(mode)
        super().__init__(f"{path}: {self.kind}, not a regular file")

    def __str__(self) -> str:
        return self.args[0]


class _SizedFile(io.FileIO):
    size: int  # as S3ReadStream's: what the object held when it was opened


class _Range(io.RawIOBase):
    """The next `length` bytes of an open file, then its end (what a ranged GET returns)."""

    def __init__(self, f, length: int):
        super().__init__()
        self.f, self.left = f, max(length, 0)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(memoryview(b)[: self.left]) if self.left else 0
        self.left -= n or 0
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _temporary(name: str) -> bool:
    """A writer's temporary (temporary_name): not a file yet."""
    return name.startswith(".") and name.endswith(".tmp")


class LocalStorage(Storage):
    """Local paths (and file:// URLs). The listings are os.scandir's (a DirEntry knows a file from a folder without a
    stat), ranged reads a seek; a writer's temporaries are never listed."""

    seekable = True

    def info(self, path) -> dict:
        """size and ETag (inode and mtime) of a file; FileNotFoundError when absent."""
        st = os.stat(_local(path))
        return {"size": st.st_size, "etag": _identity(st)}

    def identity(self, path, entry=None) -> dict | None:
        """Size and modification time (one stat, cheap for thousands of inputs; a copy or a rewrite changes them, a
        move keeps them); `entry` is not needed."""
        try:
            st = os.stat(_local(path))
        except (OSError, ValueError):
            return None
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def entries(self, folder, start: str = "") -> tuple[dict[str, tuple[int, str]], list[str]]:
        files, folders = {}, []
        where = str(_local(folder))
        root = "" if where == "." else os.path.join(where, "")  # `a.tar` as pathlib spells it, not `./a.tar`
        try:
            listing = os.scandir(root or ".")
        except (FileNotFoundError, NotADirectoryError):
            return {}, []
        with listing:
            for e in listing:
                if not e.name.startswith(start) or _temporary(e.name):
                    continue
                try:  # a FIFO, a device, a dangling link or a loop too: it lies there (open_read says what it is)
                    if e.is_dir():
                        folders.append(root + e.name)
                        continue
                    st = e.stat() if e.is_file() else e.stat(follow_symlinks=False)
                except FileNotFoundError:  # gone since the listing
                    continue
                except OSError:  # a link that leads round in a loop
                    st = e.stat(follow_symlinks=False)
                files[root + e.name] = (st.st_size, _identity(st))
        return dict(sorted(files.items())), sorted(folders)

    def walk(self, folder) -> dict[str, tuple[int, str]]:
        """As os.walk: a link to a folder is not descended into (a link back up would list the tree over and over
        until the kernel's link limit), nor a folder this user may not read (a disk's lost+found); a link to a file
        is a file."""
        files, folders = self.entries(folder)
        for sub in folders:
            if not os.path.islink(sub):
                with contextlib.suppress(PermissionError):
                    files.update(self.walk(sub))
        return dict(sorted(files.items()))

    def object_exists(self, path) -> bool:
        return _local(path).is_file()

    def folder_exists(self, path) -> bool:
        return _local(path).is_dir()

    def open_range(self, path, start: int, length: int) -> BinaryIO:
        f = open(_local(path), "rb", buffering=0)
        f.seek(start)
        return io.BufferedReader(_Range(f, length))

    def local_file(self, path) -> Path:
        return _local(path)

    def not_a_file(self, path) -> str | None:
        try:
            mode = os.stat(_local(path)).st_mode
        except (OSError, ValueError):
            return None
        return None if stat.S_ISREG(mode) else kind_of(mode)

    def canonical(self, path) -> str:
        return os.path.realpath(os.path.expanduser(_local(path)))

    def read_bytes(self, path) -> bytes:
        return _local(path).read_bytes()

    def open_read(self, path) -> BinaryIO:
        """The file, opened without blocking (a FIFO would wait for a writer) and refused unless it is a regular
        file (NotRegularFile: a FIFO, a device, a folder is never read); `.raw.size` is its size when opened."""
        fd = os.open(_local(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFile(str(path), st.st_mode)
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
            raw = _SizedFile(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        raw.size = st.st_size
        return io.BufferedReader(raw)

    def _write_temporary(self, path: Path, data: bytes) -> Path:
        tmp = temporary_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.filename is None:  # a full disk names the file, not the working folder
                e.filename = str(path)
            raise
        return tmp

    def _placed(self, path, data: bytes, place):
        """Write `data` to a complete temporary file beside `path`, then (the write guard asked) `place(tmp, path)`
        puts it under its name; the temporary never outlives the call."""
        path = _local(path)
        tmp = self._write_temporary(path, data)
        try:
            check_writable(path)
            return place(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, path, data: bytes) -> None:
        self._placed(path, data, os.replace)

    def put_file(self, path, local: Path) -> dict:
        digest = file_digest(local) if Path(local).is_file() else {}
        if digest:  # taken before the rename, which keeps inode and mtime: never another writer's file
            digest["etag"] = _identity(os.stat(local))
        check_writable(path)
        os.replace(local, _local(path))  # staging_file lies beside `path` (same filesystem); a folder moves whole
        return digest

    def create(self, path, data: bytes) -> bool:
        def link(tmp: Path, path: Path) -> bool:
            try:
                os.link(tmp, path)  # fails on an existing name; the content is complete before the name appears
                return True
            except FileExistsError:
                return False
            except OSError as e:  # a filesystem without hard links: exclusive create, then write
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return True

        return self._placed(path, data, link)

    def read_versioned(self, path):
        try:
            data = _local(path).read_bytes()
        except FileNotFoundError:
            return None
        return data, data

    def replace_if(self, path, data: bytes, version) -> bool:
        """Compare-and-swap under a short exclusive guard file (`.NAME.swap`): only one process at a time compares and
        replaces, so two processes that read the same version cannot both win."""
        path = _local(path)
        guard = path.with_name(f".{path.name}.swap")
        if not self.create(guard, str(os.getpid()).encode()):
            return False  # someone else is swapping this very moment: they win
        try:
            current = self.read_versioned(path)
            if current is None or current[1] != version:
                return False
            self.write_bytes(path, data)
            return True
        finally:
            guard.unlink(missing_ok=True)

    def exists(self, path) -> bool:
        return _local(path).exists()

    def list(self, folder, suffix: str = "", prefix: str = "") -> list[str]:
        """The files in `folder` whose names start with `prefix` and end with `suffix`: one scandir, names filtered
        before any stat (a DirEntry knows a regular file without one): a folder of 100,000 files in milliseconds."""
        root = _local(folder)
        try:
            entries = os.scandir(root)
        except (FileNotFoundError, NotADirectoryError):
            return []
        path = os.path.join(root, "")
        with entries:
            return sorted(path + e.name for e in entries if e.name.startswith(prefix) and e.name.endswith(suffix)
                          and not _temporary(e.name) and e.is_file())

    def delete(self, path) -> None:
        check_writable(path)
        _remove(_local(path))

    def staging_file(self, path) -> Path:
        path = _local(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return temporary_name(path)

    def ensure_folder(self, folder) -> None:
        _local(folder).mkdir(parents=True, exist_ok=True)

    def join(self, folder, *names: str) -> str:
        return str(_local(folder).joinpath(*names))


BACKENDS["file"] = LocalStorage


# ------------------------------------------------------------------------------- helpers that take any path
def file_digest(path: str | Path) -> dict:
    """{size, sha256} of a local file."""
    with open(path, "rb") as f:
        return stream_digest(f)


def stream_digest(f) -> dict:
    """{size, sha256} of what a binary stream holds, read to its end in 8 MiB chunks."""
    h, size = hashlib.sha256(), 0
    while chunk := f.read(8 * 2**20):
        h.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """The object under `path`, whole: readers never see a half file."""
    storage_for(path).write_bytes(str(path), data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def read_json(path: str | Path, what: str = "file") -> dict:
    """A JSON object from `path`, or a UserError of one line (missing, not JSON, not an object)."""
    try:
        data = json.loads(storage_for(path).read_bytes(str(path)))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # json's C parser recurses per level: 200,000 nested brackets exhaust the stack
        raise UserError(f"{path}: not a firststage {what} (JSON nested too deeply to read)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a firststage {what} (not a JSON object)")
    return data


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is, in words (from its st_mode)."""
    return next((k for test, k in _KINDS if test(mode)), "not a plain file")


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it is a regular file (or a link to one), checked before anything opens it: opening a FIFO blocks
    until a writer comes (no SIGTERM handler runs meanwhile), a device streams without end. Else one line naming it."""
    p = _local(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = kind_of(mode)
        raise UserError(f"{path}: {kind}, not a regular file; a {what} must be a regular file")
    return p


_TEMPORARY = re.compile(r"\.(.+)\.(\d+)-[0-9a-f]+\.tmp")


def remove_dead_temporaries(folder: str | Path, names) -> int:
    """Delete in `folder` the temporaries of the files `names` (`.NAME.<pid>-<tag>.tmp`, see temporary_name) whose
    writer is no longer running on this host: what a killed run left of the files it was writing, which their rerun
    would otherwise leave beside the finished files. One listing of the folder for all the names, whatever else it
    holds (a run calls it once, not once per file); a temporary whose pid is alive here is kept, and so is every
    temporary of a name not in `names` (another host's run may be writing it). Returns how many went."""
    if is_remote(folder):
        return 0
    names, n = set(names), 0
    try:
        entries = list(os.scandir(_local(folder)))
    except FileNotFoundError:
        return 0
    for entry in entries:
        m = _TEMPORARY.fullmatch(entry.name) if entry.name.endswith(".tmp") else None
        if m is not None and m.group(1) in names and not pid_alive(m.group(2)):
            Path(entry.path).unlink(missing_ok=True)
            n += 1
    return n


def pid_alive(pid) -> bool:
    """Whether process `pid` exists on this machine; one that cannot be asked about (EPERM: another user's; a pid
    that is not a number) counts as alive, so that nothing of a live run is ever taken for a dead one's."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError, OverflowError):
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def no_space_message(path: str | Path, err: OSError) -> str | None:
    """One line for a full disk or quota (ENOSPC, EDQUOT), naming the folder and the space left; None otherwise."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    folder = _local(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 2**20
    return (f"no space left on the device of {folder} ({free:.0f} MiB free) while writing {err.filename or path}; "
            f"free space or choose another output folder, then run the same command again (nothing is lost)")


@contextlib.contextmanager
def disk_full_as_oserror(path: str | Path, min_free: int = 64 * 2**20):
    """torch.save and safetensors report a full disk in their own words (`unexpected pos 3166080 vs 3165968`): when
    a write fails and the device is (nearly) full, raise it as the ENOSPC it is."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        folder = _local(path).parent
        if folder.exists() and shutil.disk_usage(folder).free < min_free:
            raise OSError(errno.ENOSPC, f"no space left ({type(e).__name__})", str(path)) from None
        raise


def respect_umask(path: str | Path) -> None:
    """Give a file the permissions the umask allows (safetensors writes 0600; a shared cluster folder needs 0644)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
