"""Format: a legacy .ckpt / .pt / .pth / .bin (an LDM or SD checkpoint, a bare VAE state dict), read with
torch.load(weights_only=True) only: a pickle that needs code to load is refused with one line and never executed.
Names and shape are then handled as for a single file.

Before torch.load allocates anything, what the file declares is checked against what it can hold (`check_sizes`):
a torch zip stores its tensors uncompressed, so its members together are about the size of the file (torch itself
checks each storage against its record); an old-style (non-zip) torch file must hold every storage its pickle
declares, which is read opcode by opcode with pickletools: nothing in it runs, nothing is built."""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path


from pipeline.errors import UserError
from pipeline.storage import regular_file
from pipeline.weights import single_file
from pipeline.weights.single_file import describe  # noqa: F401 (this format's describe, as for any single file)

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

NAME = "legacy"
SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of an old-style torch file
ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
            "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "QInt32": 4, "QInt8": 1, "QUInt8": 1}


def detect(p: Path) -> Path | None:
    return single_file.detect(p, SUFFIXES)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    import torch

    check_sizes(regular_file(path, "weights file"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: refused: it is not plain tensors (loading it would need to run code from the "
                        f"file, which firststage never does; {type(e).__name__}). Convert it to .safetensors "
                        f"where you trust it") from None
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds no state dict (a {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


def state_dict(path: Path, ema: bool) -> dict:
    return single_file.to_diffusers_names(read(path)[0])


def load(path: Path, ema: bool, overrides: list[str] | None):
    return single_file.load_from(path, *read(path), overrides)


# ------------------------------------------------------------------------------- sizes, before torch.load
def check_sizes(path: Path) -> None:
    """Refuse, in one line and before anything is allocated, a file that declares more than it holds: zip members
    larger than the file (a zip bomb), storages beyond an old-style file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.load's own test
    try:
        _check_zip(path, size) if is_zip else _check_old_style(path, size)
    except UserError:
        raise
    except Exception as e:  # a pickle or zip too damaged to read: torch.load would fail on it too
        raise UserError(f"{path}: not a readable torch file ({type(e).__name__}: {str(e)[:120]})") from None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _check_zip(path: Path, size: int) -> None:
    """torch.load allocates each record at the size the zip declares (and checks every storage against its record)."""
    with zipfile.ZipFile(path) as zf:
        declared = sum(i.file_size for i in zf.infolist())
    if declared > 2 * size + 2**20:
        raise UserError(f"{path}: its zip members declare {_size(declared)} and the file holds {_size(size)} "
                        f"(a zip bomb?); refused before reading it")


def _check_old_style(path: Path, size: int) -> None:
    with open(path, "rb") as raw:
        f = _Bounded(raw, size)
        magic = _last_value(f)
        if magic != MAGIC:
            raise UserError(f"{path}: not a torch file (neither a torch zip nor an old-style torch pickle)")
        _last_value(f)  # protocol version
        _last_value(f)  # system info
        declared = sum(declared_storages(f).values())
    if declared > size:
        raise UserError(f"{path}: its pickle declares {_size(declared)} of storages and the file holds "
                        f"{_size(size)}; refused before reading it")


class _Bounded:
    """A file whose read(n) refuses to ask for more than the file holds (a pickle's declared length is never
    allocated before it is checked)."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        if n > self.size - self.f.tell():
            raise ValueError(f"the pickle declares {n} bytes beyond the end of the file")
        return self.f.read(n)

    def readline(self) -> bytes:
        return self.f.readline(1 << 16)

    def tell(self) -> int:
        return self.f.tell()


class _Global(str):
    """A class the pickle names (module.name), never imported."""


def _last_value(f) -> object:
    """Read one pickle; the value of its last constant (what a one-constant pickle, like torch's magic, holds)."""
    value = None
    for op, arg, _ in pickletools.genops(f):
        if arg is not None and not op.stack_before:
            value = arg
    return value


def declared_storages(f) -> dict[str, int]:
    """Storage key -> bytes, for every storage a torch pickle declares in its persistent ids (`('storage', type,
    key, location, numel, ...)`), read by following the pickle's stack with pickletools: values are constants or
    unknown (None), nothing is called, nothing is built."""
    stack: list = []
    marks: list[int] = []
    memo: dict = {}
    found: dict[str, int] = {}
    for op, arg, _ in pickletools.genops(f):
        name = op.name
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        elif name == "GLOBAL":
            stack.append(_Global(arg.replace(" ", ".")))
        elif name == "STACK_GLOBAL":
            attr, module = stack.pop(), stack.pop()
            stack.append(_Global(f"{module}.{attr}"))
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            size = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(name, 0)
            start = marks.pop() if name == "TUPLE" else len(stack) - size
            if start < 0:
                raise ValueError("stack underflow")
            items = tuple(stack[start:])
            del stack[start:]
            stack.append(items)
        elif name == "BINPERSID":
            pid = stack.pop()
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
                found[str(pid[2])] = _nbytes(pid[1], pid[4])
            stack.append(None)
        else:  # any other opcode: its effect on the stack; what it pushes is a constant (its argument) or unknown
            before = op.stack_before
            if pickletools.markobject in before:
                del stack[marks.pop():]
                n = before.index(pickletools.markobject)
            else:
                n = len(before)
            if n > len(stack):
                raise ValueError("stack underflow")
            del stack[len(stack) - n:]
            stack.extend((arg if op.arg is not None and not before else None) for _ in op.stack_after)
    return found


def _nbytes(kind, numel) -> int:
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise ValueError(f"a storage of {numel!r} elements")
    name = str(kind).rsplit(".", 1)[-1].removesuffix("Storage")
    return numel * ITEMSIZE.get(name, 1)
