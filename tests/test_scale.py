"""Issue 31: what bookkeeping costs per shard. The requests of encoding a small folder on a real S3 server
(SeaweedFS, tests/s3server.py) and of its no-op rerun, counted by operation, against what docs/scaling.md states;
the paths that only run on a GPU (bf16 autocast, torch.compile), run on the CPU."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import torch

from harness import ROOT, run_main
from helpers import image_bytes, random_image, write_tar
from s3server import count_requests

from pipeline.storage import storage_for

KINDS = {"HEAD": ("HeadObject",), "GET": ("GetObject",), "PUT": ("PutObject", "CreateMultipartUpload", "UploadPart",
                                                                 "CompleteMultipartUpload"),
         "LIST": ("ListObjectsV2",), "DELETE": ("DeleteObject",)}


def documented() -> dict[str, dict[str, int]]:
    """The rows of docs/scaling.md's table of requests per shard: {row: {HEAD: n, GET: n, PUT: n, LIST: n}}."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    head = re.search(r"^\| requests per shard \| (.+) \|$", text, re.M)
    assert head, "docs/scaling.md has no table of requests per shard"
    kinds = [k.strip() for k in head.group(1).split("|")]
    rows = {}
    for m in re.finditer(r"^\| (new shard|no-op rerun|per run, at most) \| (.+) \|$", text, re.M):
        rows[m.group(1)] = dict(zip(kinds, (int(v) for v in m.group(2).split("|"))))
    assert set(rows) == {"new shard", "no-op rerun", "per run, at most"}, rows
    return rows


def by_kind(counts) -> dict[str, int]:
    return {k: sum(counts[op] for op in ops) for k, ops in KINDS.items()}


@pytest.fixture(scope="module")
def bucket(s3_module_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    from pipeline.config import load_config
    from pipeline.models import build_autoencoder
    from pipeline.weights.diffusers import save as save_diffusers

    torch.manual_seed(0)
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), root / "vae")
    s3 = f"s3://{s3_module_env.bucket}/{uuid.uuid4().hex[:10]}"
    for s in range(6):
        write_tar(root / f"in-{s:06d}.tar", [{"__key__": f"k{s}", "jpg": image_bytes(random_image(40, 36, seed=s))}])
        storage_for(s3).write_bytes(f"{s3}/in/in-{s:06d}.tar", (root / f"in-{s:06d}.tar").read_bytes())
    return root, s3


def encode_counted(root: Path, s3: str, shards: int, out: str) -> dict[str, int]:
    from stages.encode import main

    data = f"{s3}/in/in-{{000000..{shards - 1:06d}}}.tar"
    with count_requests(storage_for(s3)) as counts:
        r = run_main(main, "--model", root / "vae", "--data", data, "--output", out, "data.resolution=32",
                     "data.num_workers=0")
    assert r.returncode == 0, r.stderr[-2000:]
    return by_kind(counts)


def test_requests_of_encoding_on_s3_and_of_its_no_op_rerun_are_what_the_docs_state(bucket):
    """Two folders of 2 and 6 input shards (inputs and outputs on the server): the difference per shard is what a
    shard costs, the rest what a run costs; each no more than docs/scaling.md says. Before issue 31 a new shard cost
    2 LIST + 3 HEAD + 2 GET + 2 PUT, and a no-op rerun GET every record twice."""
    root, s3 = bucket
    storage_for(s3).check_conditional_writes(s3)  # once per backend, before any count (the stages ask for it)
    docs = documented()
    for row in ("new shard", "no-op rerun"):  # the same commands twice: the second finds every shard complete
        small, large = (encode_counted(root, s3, n, f"{s3}/out-{n}") for n in (2, 6))
        per_shard = {k: (large[k] - small[k]) / 4 for k in KINDS}
        per_run = {k: small[k] - 2 * per_shard[k] for k in KINDS}
        for k, n in docs[row].items():
            assert per_shard[k] <= n, (row, k, per_shard, small, large)
        for k, n in docs["per run, at most"].items():
            assert per_run[k] <= n, (row, k, per_run, small, large)
    assert per_shard["PUT"] == per_shard["LIST"] == 0 and per_shard["GET"] == 1  # the rerun reads each record once


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A tiny VAE and 5 image shards of one image each, in a local folder."""
    from pipeline.config import load_config
    from pipeline.models import build_autoencoder
    from pipeline.weights.diffusers import save as save_diffusers

    root = tmp_path_factory.mktemp("scale-local")
    torch.manual_seed(0)
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), root / "vae")
    (root / "in").mkdir()
    for s in range(5):
        write_tar(root / "in" / f"in-{s:06d}.tar", [{"__key__": f"k{s}", "jpg": image_bytes(random_image(40, 36, s))}])
    return root


def test_a_local_encode_lists_its_folder_a_fixed_number_of_times_and_removes_only_dead_temporaries_of_its_shards(
        local, monkeypatch):
    """Issue 31: the dead temporaries of the run's shards were looked for by one glob of the output folder per
    shard (O(N^2) over a job in a folder of N shards). Now the folder is listed a fixed number of times per run,
    whatever the number of shards; a dead writer's temporary of a shard of this run goes, a live writer's and one
    of a shard this run does not write (another host's run may own it) stay."""
    import os

    from stages.encode import main

    listed = []
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def counting(path=".", _real=real):
            listed.append(os.path.abspath(os.fspath(path)))
            return _real(path)

        monkeypatch.setattr(os, name, counting)
    counts = []
    for shards in (2, 5):
        out = local / f"out-{shards}"
        out.mkdir()
        dead, alive = (out / f".in-000000.tar.{pid}-abc123.tmp" for pid in (2**22 + 1, os.getpid()))
        other = out / f".in-999999.tar.{2**22 + 1}-abc123.tmp"
        for p in (dead, alive, other):
            p.write_bytes(b"half a shard")
        listed.clear()
        r = run_main(main, "--model", local / "vae", "--data", local / "in" / f"in-{{000000..{shards - 1:06d}}}.tar",
                     "--output", out, "data.resolution=32", "data.num_workers=0")
        assert r.returncode == 0, r.stderr[-2000:]
        counts.append(listed.count(str(out)))
        assert not dead.exists() and alive.exists() and other.exists()
    assert counts[0] == counts[1] <= 3, counts


def test_dealing_by_a_heap_gives_the_least_loaded_slot_and_a_part_holds_the_same_shards_whatever_its_processes():
    """deal() takes the least loaded slot (the lowest among equals) from a heap, O(N log slots), instead of a min over
    every slot per shard: the same assignment as that min. share() deals the parts first, then each part among its
    ranks, so the shards of part K of N, whose part manifest covers them, do not depend on the launcher."""
    import random

    from pipeline.manifest import deal, share

    rnd = random.Random(0)
    items = [f"s-{i:04d}.tar" for i in range(300)]
    counts = {x: rnd.choice([0, 5, 7, 100, 101]) for x in items}
    for slots in (1, 3, 8):
        loads, want = [0] * slots, [[] for _ in range(slots)]
        for i in sorted(range(len(items)), key=lambda i: (-counts[items[i]], i)):
            j = min(range(slots), key=lambda k: (loads[k], k))
            want[j].append(items[i])
            loads[j] += max(1, counts[items[i]])
        assert deal(items, counts, slots) == [sorted(w) for w in want]
    for c in (counts, None):
        for part in range(3):
            whole = share(items, c, part, 3, 0, 1)[0]
            for ranks in (2, 5):
                mine = [share(items, c, part, 3, r, ranks) for r in range(ranks)]
                assert all(m[0] == whole for m in mine)
                assert sorted(x for m in mine for x in m[1]) == sorted(whole)


def test_prepare_from_a_prepared_folder_on_s3_asks_nothing_per_shard(tmp_path, s3_env):
    """prepare --input s3://.../shards (a folder with a manifest: re-preparing at another size): its shards'
    identities for the fingerprint come from one listing of the folder, as they did when prepare walked a remote
    folder, not one HEAD per shard (the resolver's manifest form lists nothing)."""
    from helpers import make_shards
    from pipeline.data.prepare import PrepareOptions, fingerprint, list_sources, prepare

    make_shards(tmp_path / "raw", 4, 1, size=(40, 40))
    prepare([str(tmp_path / "raw")], tmp_path / "shards", PrepareOptions(shard_size=1, size=32))
    s3 = f"s3://{s3_env.bucket}/{uuid.uuid4().hex[:10]}/shards"
    store = storage_for(s3)
    for p in sorted((tmp_path / "shards").iterdir()):
        if p.is_file():
            store.write_bytes(f"{s3}/{p.name}", p.read_bytes())
    store.write_bytes(f"{s3}/.progress/fingerprint.json", b"{}")  # what else a prepared folder holds
    with count_requests(store) as counts:
        kind, sources = list_sources([s3])
        items = [("tar", f"k{i}", u, {}) for i, u in enumerate(sources)]
        fp = fingerprint(items, PrepareOptions(shard_size=1), sources.listed)
    assert kind == "tars" and len(sources) == 4
    assert counts["HeadObject"] <= 1 and counts["ListObjectsV2"] <= 4, counts  # not one HEAD per shard
    # the same identities as a pattern's listing gives (a rerun of an earlier version's run resumes)
    kind, by_pattern = list_sources([f"{s3}/*.tar"])
    assert fingerprint(items, PrepareOptions(shard_size=1), by_pattern.listed) == fp


def test_a_no_op_prepare_rerun_on_s3_asks_nothing_per_shard(tmp_path, s3_env):
    """A rerun of a finished prepare into object storage: its two listings (the records, the shards) say which
    shards are done; each record is read (a GET), and neither it nor its tar is asked about again (a HEAD each)."""
    from helpers import make_shards
    from pipeline.data.prepare import PrepareOptions, prepare

    make_shards(tmp_path / "raw", 6, 1, size=(40, 40))
    out = f"s3://{s3_env.bucket}/{uuid.uuid4().hex[:10]}/shards"
    first = prepare([str(tmp_path / "raw")], out, PrepareOptions(shard_size=1, size=32))
    with count_requests(storage_for(out)) as counts:
        again = prepare([str(tmp_path / "raw")], out, PrepareOptions(shard_size=1, size=32))
    assert again["shards"] == first["shards"] and len(first["shards"]) == 6
    assert counts["GetObject"] >= 6 and counts["HeadObject"] < 6, counts  # not one HEAD (or two) per done shard


def test_what_was_resolved_is_not_resolved_again(tmp_path, s3_env):
    """The trainer resolves data.val once and plans its subset from that (Sources): planning asks the store nothing,
    where it resolved the spec again (a listing and the manifest, per rank and per start)."""
    from helpers import make_shards
    from pipeline.data.loader import plan_subset
    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.sources import resolve_sources

    make_shards(tmp_path / "raw", 3, 2, size=(40, 40))
    out = f"s3://{s3_env.bucket}/{uuid.uuid4().hex[:10]}/shards"
    prepare([str(tmp_path / "raw")], out, PrepareOptions(shard_size=2, size=32))
    sources = resolve_sources(out)
    assert resolve_sources(sources) is sources
    with count_requests(storage_for(out)) as counts:
        urls, limits, planned = plan_subset(sources, 5)
    assert planned == 5 and urls == list(sources) and sum(counts.values()) == 0, counts
