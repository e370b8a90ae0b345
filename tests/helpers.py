"""What the tests share: tiny images and shards made on the fly, the tiny-run arguments, and subprocess launchers.

  from helpers import ROOT, TINY, ENV, make_shards, two_node_launch
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# the tiny preset at 32 px, in the test process: no loader workers, a small shuffle buffer
TINY = ["--config", "tiny", "data.resolution=32", "data.num_workers=0", "data.shuffle_buffer=16", "train.batch_size=8"]
# subprocesses: one intra-op thread each (they share two cores with the test process), the checkout on the path
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FIRSTSTAGE_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def run_main(main, *args) -> subprocess.CompletedProcess:
    """A stage's main() in this process, as the command line would see it: exit code, stdout and stderr captured
    (5 s cheaper per call than a subprocess, which imports torch and diffusers again)."""
    import contextlib

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(["main", *map(str, args)], code, out.getvalue(), err.getvalue())


class ForkedStage:
    """`python -m MODULE ARGS` as seen from outside (its own pid and session, signals, exit code, stdout and stderr),
    run as MODULE.main(ARGS) in a child forked from this test process: it starts with torch and diffusers already
    imported instead of spending ~5 s importing them again. For the tests that kill or signal a running stage; the
    stage's start-up itself is tested with a real interpreter (test_reliability's SIGTERM during start-up)."""

    def __init__(self, module: str, *args):
        import importlib
        import tempfile

        main = importlib.import_module(module).main
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.returncode = None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.setsid()  # its own process group, as start_new_session=True: killpg reaches its loader workers
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                os.dup2(self._out.fileno(), 1)
                os.dup2(self._err.fileno(), 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                try:
                    main([str(a) for a in args])
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:
                    import traceback

                    traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self.pid = pid

    def poll(self) -> int | None:
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float = 120) -> int:
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
                raise AssertionError(f"{self.pid} did not end within {timeout}s: {self.output()[1][-2000:]}")
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def output(self) -> tuple[str, str]:
        text = []
        for f in (self._out, self._err):
            f.seek(0)
            text.append(f.read().decode(errors="replace"))
        return text[0], text[1]

    def communicate(self, timeout: float = 120) -> tuple[str, str]:
        self.wait(timeout)
        return self.output()


def two_node_launch(script: str, *args, port: int = 29611, timeout: int = 300) -> subprocess.CompletedProcess:
    """A real 2-process gloo world on the CPU as two one-process "nodes" (launch/local_multinode.sh: two accelerate
    launchers, machine ranks 0 and 1, on the loopback address), output captured."""
    return subprocess.run(["bash", str(ROOT / "launch" / "local_multinode.sh"), script, *map(str, args)], cwd=ROOT,
                          env={**ENV, "MASTER_PORT": str(port)}, capture_output=True, text=True, timeout=timeout)


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random colour image (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def image_bytes(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_images(folder: Path, n: int, size=(96, 80), prefix: str = "img", captions: bool = False) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n):
        key = f"{prefix}{i:04d}"
        random_image(*size, seed=i).save(folder / f"{key}.jpg", quality=90)
        if captions:
            (folder / f"{key}.txt").write_text(f"caption {i}")
        keys.append(key)
    return keys


def read_tar_samples(folder: Path) -> dict:
    """Every sample of every shard in `folder` with tarfile alone: key -> {extension: bytes}; a member twice fails."""
    out: dict = {}
    for tar in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext not in out.setdefault(key, {}), f"{m.name} twice"
                out[key][ext] = tf.extractfile(m).read()
    return out


def keys_in_tars(folder: Path) -> list[str]:
    """Every sample key in every complete shard, read with plain tarfile (duplicates kept)."""
    keys = []
    for p in sorted(folder.glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.rsplit(".", 1)[-1] in ("jpg", "webp", "png"):
                    keys.append(m.name.rsplit(".", 1)[0])
    return keys


def write_tar(path: Path, samples: list[dict]) -> None:
    """samples: dicts of ext -> bytes plus __key__."""
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def make_shards(folder: Path, num_shards: int, per_shard: int, size=(80, 72), prefix="shard") -> list[str]:
    """Image shards with unique keys s{shard}_{i} and a txt caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            img = random_image(*size, seed=s * 1000 + i)
            samples.append({"__key__": f"s{s:03d}_{i:04d}", "jpg": image_bytes(img, quality=90),
                            "txt": f"caption {s} {i}".encode()})
        p = folder / f"{prefix}-{s:06d}.tar"
        write_tar(p, samples)
        paths.append(str(p))
    return paths


def make_train_val(root: Path) -> None:
    """root/train (4 shards x 16) and root/val (5 shards x 4, other images): a tiny training set and a held-out set."""
    make_shards(root / "train", 4, 16, size=(48, 40))
    make_shards(root / "val", 5, 4, size=(40, 40), prefix="val")


def readme_commands() -> list[tuple[str, str]]:
    """(stage, the rest of the line) for each `firststage STAGE ...` / `-m stages.STAGE ...` command in the README's
    bash code blocks, continuations joined, comments dropped; `sbatch ...` lines as ("sbatch", line)."""
    out, lang, current = [], None, None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang in ("", "bash", "sh"):
                    for cmd in "\n".join(current).replace("\\\n", " ").splitlines():
                        cmd = cmd.split("  #")[0].strip()
                        m = re.search(r"(?:^firststage|-m stages\.)\s*([a-z]+)(?![a-z:])(.*)", cmd)
                        if m and not cmd.startswith(("from ", "import ")):
                            out.append((m.group(1), m.group(2).strip()))
                        elif cmd.startswith("sbatch "):
                            out.append(("sbatch", cmd))
                current = None
        elif current is not None:
            current.append(line)
    return out


def load_model(path, ema: bool = True, overrides: list[str] | None = None):
    """(model, Config) of any weights format, as evaluate / encode / export load them."""
    from pipeline.weights import resolve_weights

    return resolve_weights(path, ema).load(overrides)
