"""The stages' thread policy (stages/__init__.py): free cores measured at start, shared by the node's processes."""

from __future__ import annotations

import subprocess
import types
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


def test_the_count_follows_down_at_once_and_up_by_whole_free_cores():
    from pipeline.threads import follow_rule

    assert follow_rule(2, cores=2, free=1.4, local_processes=1) == 1  # other work came: down at once
    assert follow_rule(1, cores=2, free=1.6, local_processes=1) == 1  # not a whole core more: no swing up
    assert follow_rule(1, cores=2, free=1.8, local_processes=1) == 2  # it went: up
    assert follow_rule(4, cores=8, free=8.0, local_processes=2) == 4  # shared by the job's processes


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


def test_the_count_follows_other_work_that_starts_during_the_run():
    """Other work (processes outside this job) that fills the cores after the start: the Follower chooses one thread
    and the loop's thread applies it; this job's own children count as its own work, not as other work."""
    import os
    import signal
    import time

    import torch

    from pipeline import threads

    kid = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a loader worker, say: this job's
    try:
        before = threads.job_ticks([os.getpid()])
        time.sleep(0.5)
        assert threads.job_ticks([os.getpid()])[kid.pid] > before.get(kid.pid, 0)  # the child's time is the job's
        last = (*threads.core_times(sorted(os.sched_getaffinity(0))), threads.job_ticks([os.getpid()]))
    finally:
        kid.kill()
        kid.wait()
    # the child ended within the window: its earlier time is not taken away from the job's (which made other work
    # look bigger than the machine, and the count fall to one thread whenever a loader worker ended)
    time.sleep(0.3)
    window = threads.Follower.window(types.SimpleNamespace(cores=sorted(os.sched_getaffinity(0)),
                                                           roots=[os.getpid()]), last)[0]
    assert window is None or window >= 0, window
    cores = sorted(os.sched_getaffinity(0))
    follower = threads.Follower(cores, len(cores), 1, len(cores), every=0.3)
    spawn = " ".join(f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!;" for _ in cores)
    others = subprocess.run(["sh", "-c", spawn], capture_output=True, text=True).stdout.split()  # not our children
    try:
        deadline = time.time() + 15
        while follower.wanted != 1 and time.time() < deadline:
            time.sleep(0.1)
        assert follower.wanted == 1
    finally:
        for pid in others:
            os.kill(int(pid), signal.SIGKILL)
        follower.stop()
    was = torch.get_num_threads()
    torch.set_num_threads(len(cores))
    try:
        threads.FOLLOWER = follower
        threads.follow()
        assert torch.get_num_threads() == 1 and follower.changes[-1][1] == 1
    finally:
        threads.FOLLOWER = None
        torch.set_num_threads(was)
