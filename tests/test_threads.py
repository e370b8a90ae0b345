"""The stages' thread policy (stages/__init__.py): free cores measured at start, shared by the node's processes."""

from __future__ import annotations

import subprocess
import sys

from harness import ENV, ROOT

from stages import choose_threads


def test_all_cores_free_keeps_spinning_threads_on_every_core():
    assert choose_threads(cores=2, free=2.0, local_processes=1) == (2, True)
    assert choose_threads(cores=16, free=15.6, local_processes=8) == (2, True)


def test_busy_cores_give_fewer_sleeping_threads():
    assert choose_threads(cores=2, free=1.0, local_processes=1) == (1, False)  # one competing process
    assert choose_threads(cores=8, free=5.2, local_processes=1) == (5, False)
    assert choose_threads(cores=2, free=0.0, local_processes=1) == (1, False)  # never zero


def test_processes_of_one_job_share_the_cores():
    assert choose_threads(cores=2, free=2.0, local_processes=2) == (1, True)
    assert choose_threads(cores=4, free=4.0, local_processes=8) == (1, False)


def probe(env_extra: dict) -> str:
    env = {k: v for k, v in ENV.items() if k not in ("FIRSTSTAGE_THREADS", "OMP_WAIT_POLICY")}
    code = ("import os, stages; from stages import apply_thread_policy; import torch; "
            "print(apply_thread_policy(), torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **env_extra}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 or "FIRSTSTAGE_THREADS" in r.stderr, r.stderr
    return (r.stdout + r.stderr).strip()


def test_fixed_count_is_applied_to_torch_and_a_bad_value_is_one_line():
    assert probe({"FIRSTSTAGE_THREADS": "3"}) == "3 3 PASSIVE"
    assert probe({"FIRSTSTAGE_THREADS": "many"}) == "firststage: error: FIRSTSTAGE_THREADS='many' is not a whole number"
