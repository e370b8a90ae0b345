"""Running stages as the command line would: in this process (run_main), forked from it (ForkedStage, for the tests
that kill or signal a running stage), or as a two-node world on the loopback address (two_node_launch).

  from harness import ROOT, ENV, run_main, ForkedStage, two_node_launch
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def sigkill_after_first_checkpoint(run: Path, *args, timeout: float = 120) -> None:
    """`firststage train ARGS` (output_dir `run`) forked, SIGKILLed as soon as its first checkpoint is complete."""
    from pipeline.checkpoint import find_resume_path

    proc = ForkedStage("stages.train", *args)
    deadline = time.time() + timeout
    while find_resume_path(run) is None:
        assert proc.poll() is None and time.time() < deadline, proc.output()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def two_node_launch(script: str, *args, port: int = 29611, timeout: int = 300) -> subprocess.CompletedProcess:
    """A real 2-process gloo world on the CPU as two one-process "nodes" (launch/local_multinode.sh: two accelerate
    launchers, machine ranks 0 and 1, on the loopback address), output captured."""
    env = {**ENV, "MASTER_PORT": str(port), "PYTHON": sys.executable}  # the launchers run in this test's Python
    return subprocess.run(["bash", str(ROOT / "launch" / "local_multinode.sh"), script, *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
