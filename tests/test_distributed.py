"""One real two-process gloo world runs train, evaluate, encode and the generation probe one after the other (tests/scripts/world.py); each
stage's results are checked against one process. The world is two one-process "nodes" (launch/local_multinode.sh:
two accelerate launchers on the loopback address), so the multi-node launch is exercised by the same run and
start-up is paid once for all of it."""

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from harness import ENV, ROOT, run_main, two_node_launch
from helpers import TINY, flat, make_train_val, read_tar_samples


@pytest.fixture
def world(tmp_path):
    root = tmp_path
    make_train_val(root)
    r = two_node_launch("tests/scripts/world.py", root / "rep", root, "train,evaluate,encode,probe", *TINY,
                        "train.max_steps=4", "train.log_every=2", "train.checkpoint_every=4",
                        "loss.adversarial.enabled=true", "loss.adversarial.start_step=0", port=29611)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((root / "rep" / f"rank{i}.json").read_text()) for i in range(2)]
    assert [rep["world_size"] for rep in reports] == [2, 2]
    return root, reports, r.stdout


def check_train_ranks_end_with_identical_weights(world):
    _, (a, b), _ = world
    assert a["step"] == b["step"] == 4
    assert a["autoencoder"] == b["autoencoder"] and a["ema"] == b["ema"] and a["objective"] == b["objective"]
    assert a["draw"] != b["draw"]  # each rank drew its own noise (posterior samples, latent noise, augmentations)


def check_evaluate_gives_the_same_numbers_on_one_and_two_processes(world):
    from stages.evaluate import main

    root, _, stdout = world
    assert "17 samples" in stdout and "on 2 process(es)" in stdout
    r = run_main(main, "--lpips-backbone", "random", "--model", root / "run", "--data", root / "val", "--output",
                 root / "eval-1", "--num-samples", "17", "evaluate.iwae_k=4", "evaluate.likelihood_samples=8")
    assert r.returncode == 0, r.stderr
    one = dict(flat(json.loads((root / "eval-1" / "eval.json").read_text())))
    two = dict(flat(json.loads((root / "eval-2" / "eval.json").read_text())))
    assert one["samples"] == two["samples"] == 17 and one.keys() == two.keys()
    for k in one:
        if isinstance(one[k], float):
            assert one[k] == pytest.approx(two[k], rel=1e-6, abs=1e-9), k
        elif k not in ("data", "model"):
            assert one[k] == two[k], k


def check_encode_gives_the_same_keys_and_latents_on_one_and_two_processes(world):
    from stages.encode import main

    root, _, _ = world
    two = json.loads((root / "latents-2" / "manifest.json").read_text())
    assert two["processes"] == 2 and two["total"] == 20  # a real two-rank world did the work
    r = run_main(main, "--model", root / "run", "--data", root / "val", "--output", root / "latents-1",
                 "data.num_workers=0", "encode.batch_size=3")
    assert r.returncode == 0, r.stderr
    a, b = read_tar_samples(root / "latents-1"), read_tar_samples(root / "latents-2")
    assert sorted(a) == sorted(b) and len(a) == 20
    for key in a:
        x, y = load_safetensors(a[key]["latents.safetensors"]), load_safetensors(b[key]["latents.safetensors"])
        assert all(torch.equal(x[k], y[k]) for k in x), key
        assert a[key]["txt"] == b[key]["txt"] and a[key]["json"] == b[key]["json"]
    one = json.loads((root / "latents-1" / "manifest.json").read_text())
    assert one["statistics"]["scaling_factor"] == pytest.approx(two["statistics"]["scaling_factor"], rel=1e-9)


def check_probe_ranks_end_with_identical_transformers_and_decoded_samples(world):
    root, (a, b), stdout = world
    assert a["probe"]["step"] == b["probe"]["step"] == 4
    assert a["probe"] == b["probe"]  # the transformer and its EMA, bit for bit on both ranks
    assert "probe: DiT depth 1" in stdout and "2 process(es)" in stdout
    res = json.loads((root / "probe-2" / "probe.json").read_text())
    assert res["step"] == 4 and res["samples_seen"] == 4 * 4 * 2 and res["samples_png"] == "samples.png"
    assert res["decoded_by"].startswith("ema.safetensors") and (root / "probe-2" / "samples.png").is_file()


def test_one_and_two_processes_agree_on_train_evaluate_and_encode(world):
    """One test, not three sharing a module fixture: pytest-xdist could give them to both workers, which would each
    launch a world (twice the start-up, two launches competing for one rendezvous port)."""
    check_train_ranks_end_with_identical_weights(world)
    check_evaluate_gives_the_same_numbers_on_one_and_two_processes(world)
    check_encode_gives_the_same_keys_and_latents_on_one_and_two_processes(world)
    check_probe_ranks_end_with_identical_transformers_and_decoded_samples(world)


def test_a_node_that_fails_ends_the_job_instead_of_leaving_its_peer_waiting(tmp_path):
    """launch/local_multinode.sh with launchers that behave like a node whose rank died before joining (exit 3) and
    one whose rank waits for it (for ever): the script stops the waiting one and fails. Before, it waited for each
    launcher in turn and never returned (seen by hand with real launchers: still waiting after 40 s)."""
    pids = tmp_path / "pids"
    env = {**ENV, "PYTHON": str(ROOT / "tests" / "scripts" / "fake_launcher"), "FAKE_PIDS": str(pids)}
    t0 = time.time()
    r = subprocess.run(["bash", str(ROOT / "launch" / "local_multinode.sh"), "train.py"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and time.time() - t0 < 30, r.stderr
    launched = [int(p) for p in pids.read_text().split()]
    assert len(launched) == 2 and not any(Path(f"/proc/{p}").exists() for p in launched)  # none left behind


def _agree(rank: int, init_file: str, fail_on_rank0: bool, results) -> None:
    """One rank of a two-process gloo world: each rank's own look at --model sees a different newest checkpoint."""
    import torch.distributed as dist

    import pipeline.weights as weights
    from pipeline.errors import UserError
    from stages.common import pinned_weights

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    def pin(path, ema=True):
        if fail_on_rank0 and rank == 0:
            raise UserError(f"{path}: no such file or folder")
        # rank 1 looked after a new checkpoint landed
        return weights.Weights(path, "checkpoint", f"{path}/checkpoints/step-{100 * (rank + 1):08d}", ema)

    weights.resolve_weights = pin
    try:
        results.put((rank, pinned_weights("runs/vae").path))
    except UserError as e:
        results.put((rank, f"error: {e}"))
    dist.destroy_process_group()


@pytest.mark.parametrize("fail_on_rank0", [False, True])
def test_every_rank_loads_the_checkpoint_rank0_pinned(tmp_path, fail_on_rank0):
    """encode and evaluate on a run folder that is still training: every rank uses rank 0's resolution of --model
    (a checkpoint written between the ranks' start-ups would otherwise mix two models' latents in one folder), and
    rank 0's error reaches every rank instead of leaving the others waiting."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(r, str(tmp_path / "init"), fail_on_rank0, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    want = ("error: --model runs/vae: no such file or folder" if fail_on_rank0
            else "runs/vae/checkpoints/step-00000100")
    assert got == {0: want, 1: want}
