"""Every stage on object storage (s3://, a real SeaweedFS server on the loopback interface, see s3server.py): the
user's commands give what they give on a local folder; SIGKILL during uploads, then the same command again, leaves
every key exactly once; one run per output (the lease); retries through a proxy that drops connections; one-line
errors before any work.

The commands run in this process (run_main) or forked from it (ForkedStage, for the kills), against a module-wide
chain of outputs made once on a local folder and once on the server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import torch

from harness import ForkedStage, run_main
from helpers import TINY, flat, make_shards, read_tar_samples
from s3server import FaultProxy, conflicts, free_port

from pipeline.storage import base, reset_storage, set_storage_options, storage_for


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def aws(s3_module_env):
    """The server's credentials and endpoint in the standard AWS variables for the whole module, a cache folder of
    our own (model copies, run logs), and a fresh backend."""
    return s3_module_env


@pytest.fixture
def fresh(monkeypatch):
    """What this test changes of the environment (every test's backends are made anew: conftest's fresh_storage)."""
    return monkeypatch


def stage(name: str):
    import importlib

    module = importlib.import_module(f"stages.{name}")
    return module.main


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def the_commands(root: str, raw: str) -> dict:
    """The user's commands of the issue, with every path under `root` (a folder or an s3:// prefix)."""
    out = {"prepare": ok(run_main(stage("prepare"), "--input", f"{raw}/raw-{{000000..000002}}.tar", "--output",
                                  f"{root}/data/shards", "--shard-size", "8", "--size", "32"))}
    out["train"] = ok(run_main(stage("train"), *TINY, f"data.train={root}/data/shards/shards-{{000000..000002}}.tar",
                               f"output_dir={root}/runs/klf8", "train.max_steps=4",
                               "train.checkpoint_every=2", "train.log_every=2"))
    out["evaluate"] = ok(run_main(stage("evaluate"), "--model", f"{root}/runs/klf8", "--data", f"{root}/data/shards",
                                  "--lpips-backbone", "random", "evaluate.likelihood_samples=0"))
    out["encode"] = ok(run_main(stage("encode"), "--model", f"{root}/runs/klf8", "--data", f"{root}/data/shards",
                                "--output", f"{root}/latents/klf8"))
    out["export"] = ok(run_main(stage("export"), "--model", f"{root}/runs/klf8", "--output",
                                f"{root}/exports/klf8-vae"))
    return out


@pytest.fixture(scope="module")
def chain(aws, tmp_path_factory):
    """Raw img2dataset-like tars (3 x 8 images) in a folder and on the server, then the commands on each."""
    root = tmp_path_factory.mktemp("object-storage")
    s3 = f"s3://{aws.bucket}/{uuid.uuid4().hex[:10]}"
    store = storage_for(s3)
    for p in make_shards(root / "raw", 3, 8, size=(48, 40), prefix="raw"):
        store.write_bytes(f"{s3}/raw/{Path(p).name}", Path(p).read_bytes())
    cwd = os.getcwd()
    os.chdir(root)  # a URL taken for a folder name would show up here as s3:/...
    try:
        local = the_commands(str(root / "local"), str(root / "raw"))
        remote = the_commands(s3, f"{s3}/raw")
    finally:
        os.chdir(cwd)
    return {"root": root, "local": str(root / "local"), "s3": s3, "store": store, "out": {"local": local,
                                                                                          "s3": remote}}


def read(path: str) -> bytes:
    return storage_for(path).read_bytes(path)


def read_json(path: str) -> dict:
    return json.loads(read(path))


def listing(folder: str) -> list[str]:
    """Every file under a folder or prefix, relative to it, sorted."""
    if folder.startswith("s3://"):
        return sorted(u[len(folder) + 1:] for u in storage_for(folder).walk(folder))
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


# ------------------------------------------------------------------------------------------------ the commands
def test_every_command_on_s3_gives_what_a_folder_gives(chain):
    local, s3 = chain["local"], chain["s3"]
    assert not (chain["root"] / "s3:").exists()  # the bug: a URL taken for a folder name
    for name in ("prepare", "train", "evaluate", "encode", "export"):
        assert s3 in chain["out"]["s3"][name].stdout or name == "evaluate", chain["out"]["s3"][name].stdout
    # prepare: the same manifest, the same samples byte for byte
    assert read_json(f"{s3}/data/shards/manifest.json") == read_json(f"{local}/data/shards/manifest.json")
    images = read_tar_samples(f"{s3}/data/shards")
    assert len(images) == 24 and images == read_tar_samples(f"{local}/data/shards")
    # train: the same checkpoints, the same weights (the run is deterministic), logs uploaded
    assert listing(f"{s3}/runs/klf8/checkpoints") == listing(f"{local}/runs/klf8/checkpoints")
    for step in (2, 4):
        a, b = (read_json(f"{r}/runs/klf8/checkpoints/step-{step:08d}/trainer.json") for r in (s3, local))
        assert without(a, "time", "files") == without(b, "time", "files")
        for name in ("autoencoder.safetensors", "ema.safetensors"):
            assert a["files"][name] == b["files"][name]  # size and SHA-256 of what was written
            data = read(f"{s3}/runs/klf8/checkpoints/step-{step:08d}/{name}")
            assert hashlib.sha256(data).hexdigest() == a["files"][name]["sha256"]
    rows = [[json.loads(ln) for ln in read(f"{r}/runs/klf8/metrics.jsonl").splitlines()] for r in (s3, local)]
    assert [(r["step"], r["train/loss"]) for r in rows[0]] == [(r["step"], r["train/loss"]) for r in rows[1]]
    assert {"config.yaml", "metrics.jsonl"} <= set(listing(f"{s3}/runs/klf8"))
    assert any(n.startswith("logs/") and "tfevents" in n for n in listing(f"{s3}/runs/klf8"))  # TensorBoard
    # evaluate: eval.json beside the model
    a, b = (read_json(f"{r}/runs/klf8/eval.json") for r in (s3, local))
    assert a["psnr"] == pytest.approx(b["psnr"]) and a["weights"] == b["weights"]
    # encode: the same keys, statistics and scaling factor
    a, b = (read_json(f"{r}/latents/klf8/manifest.json") for r in (s3, local))
    assert a["total"] == b["total"] == 24 and a["skipped_count"] == b["skipped_count"] == 0
    assert [without(s, "source") for s in a["shards"]] == [without(s, "source") for s in b["shards"]]
    assert dict(flat(a["statistics"])) == pytest.approx(dict(flat(b["statistics"])))  # (pytest 9.2: flat dicts only)
    assert a["normalisation"] == b["normalisation"]
    assert a["model"]["path"] == f"{s3}/runs/klf8/checkpoints/step-00000004"  # where the weights are, not a copy
    assert listing(f"{s3}/latents/klf8") == listing(f"{local}/latents/klf8")
    # export: the same files, the same config (scaling factor measured by evaluate, found beside the model on S3)
    assert listing(f"{s3}/exports/klf8-vae") == listing(f"{local}/exports/klf8-vae")
    a, b = (read_json(f"{r}/exports/klf8-vae/config.json") for r in (s3, local))
    assert a == b and a["scaling_factor"] == pytest.approx(1 / read_json(f"{local}/runs/klf8/eval.json")["latents"]["std"])
    # LatentDataset in the diffusion trainer
    from pipeline.latents import LatentDataset

    got = [{s["__key__"]: s["latents"] for s in LatentDataset(f"{r}/latents/klf8", mode="eval")} for r in (s3, local)]
    assert len(got[0]) == 24 and got[0].keys() == got[1].keys()
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])
    # locks released, no upload left open
    assert not any(n.endswith(".lock") for n in listing(s3))
    assert open_uploads(s3) == []


def test_prepare_from_an_s3_folder_of_images_and_a_list_file(chain, tmp_path):
    """--input a prefix of images with captions (listed), and a list file of names relative to it."""
    from helpers import write_images

    s3, store = chain["s3"], chain["store"]
    write_images(tmp_path / "photos" / "a", 4, captions=True)
    for f in sorted((tmp_path / "photos").rglob("*.*")):
        store.write_bytes(f"{s3}/photos/{f.relative_to(tmp_path / 'photos').as_posix()}", f.read_bytes())
    store.write_bytes(f"{s3}/photos/list.txt", b"a/img0001.jpg\na/img0003.jpg\n")
    for inp, out in ((f"{s3}/photos", f"{s3}/from-photos"), (str(tmp_path / "photos"), str(tmp_path / "ref")),
                     (f"{s3}/photos/list.txt", f"{s3}/from-list")):
        ok(run_main(stage("prepare"), "--input", inp, "--output", out, "--size", "32"))
    got = read_tar_samples(f"{s3}/from-photos")
    assert got == read_tar_samples(str(tmp_path / "ref")) and sorted(got) == [f"a/img{i:04d}" for i in range(4)]
    assert got["a/img0002"]["txt"] == b"caption 2"
    assert sorted(read_tar_samples(f"{s3}/from-list")) == ["a/img0001", "a/img0003"]


def test_models_on_s3_for_init_from_and_a_single_file(chain, tmp_path):
    """train.init_from and --model of a single file on S3: pinned there, read from a local copy."""
    s3 = chain["s3"]
    r = ok(run_main(stage("export"), "--model", f"{s3}/runs/klf8", "--output", f"{s3}/exports/klf8.safetensors",
                    "--format", "single-file"))
    assert f"{s3}/exports/klf8.md" in r.stdout and storage_for(s3).object_exists(f"{s3}/exports/klf8.safetensors")
    r = ok(run_main(stage("train"), *TINY, f"data.train={s3}/data/shards", f"train.init_from={s3}/exports/klf8-vae",
                    f"output_dir={tmp_path / 'finetune'}", "train.max_steps=1"))
    assert "steps 0->1" in r.stdout
    from pipeline.weights import resolve_weights

    w = resolve_weights(f"{s3}/exports/klf8.safetensors")
    assert w.format == "single-file" and w.where == f"{s3}/exports/klf8.safetensors" and Path(w.path).is_file()
    # pinned weights are copied once, when they are pinned: describing and loading them asks the store nothing more
    from pipeline.storage.s3 import S3Storage

    w, asked, real = resolve_weights(f"{s3}/runs/klf8"), [], S3Storage._call
    with pytest.MonkeyPatch.context() as m:
        m.setattr(S3Storage, "_call", lambda self, op, *a, **k: asked.append(op) or real(self, op, *a, **k))
        first = w.describe()
        w.load()
        assert w.describe() == first and w.light_config() is not None
    assert asked == [], asked  # a run's checkpoint: its pinned copy, which the run pruning it cannot take away


def test_loader_workers_read_s3_shards_with_their_own_clients(chain):
    """Two loader workers (forked) read the shards from S3, every sample once; webdataset's gopen opens s3:// too."""
    from torch.utils.data import DataLoader
    from webdataset.gopen import gopen

    from pipeline.data.loader import ImageStream, collate
    from pipeline.sources import resolve_sources

    urls = resolve_sources(f"{chain['s3']}/data/shards")
    loader = DataLoader(ImageStream(urls, mode="eval", resolution=32), batch_size=4, num_workers=2, collate_fn=collate)
    keys = [k for batch in loader for k in batch["__key__"]]
    assert sorted(keys) == sorted(read_tar_samples(f"{chain['local']}/data/shards"))
    with gopen(urls[0]) as f:
        assert f.read() == read(urls[0])
    from pipeline.latents.encoder import EncodeStream, ShardEnd  # encode's stream, as on a GPU machine: in workers

    items = list(DataLoader(EncodeStream(urls, 32, None, 4), batch_size=None, num_workers=2))
    ends = [i for i in items if isinstance(i, ShardEnd)]
    assert sorted(i.shard for i in ends) == urls and all(not i.skipped for i in ends)
    assert sum(len(i["keys"]) for i in items if isinstance(i, dict)) == 24 and len(items) == len(ends) + 6


def test_the_encoders_checks_of_shards_on_s3_send_no_request(chain):
    """check_input_shards and check_output_folder ask the storage interface (not_a_file, seekable, canonical),
    which answers for object storage without a request; the folder of the inputs is refused there too."""
    from s3server import count_requests

    from pipeline.sources import resolve_sources
    from pipeline.errors import UserError
    from pipeline.latents.encoder import check_input_shards, check_output_folder

    urls = resolve_sources(f"{chain['s3']}/data/shards")
    with count_requests(storage_for(chain["s3"])) as counts:
        check_input_shards(urls)
        check_output_folder(f"{chain['s3']}/latents-elsewhere", urls)
        with pytest.raises(UserError, match="holds the input shard shards-000000.tar"):
            check_output_folder(f"{chain['s3']}/data/shards/", urls)
    assert sum(counts.values()) == 0, counts


def test_one_process_reads_one_endpoint_and_writes_another(chain, aws, fresh, tmp_path):
    """Issue 30, item 7: storage options per URL prefix (FIRSTSTAGE_STORAGE_OPTIONS, read as a stage starts). The raw
    tars and the run lie on the module's server; a second server (another endpoint, bucket and credential variables)
    receives prepare's shards and encode's latents, encode reading its model from the first and its data from the
    second; the environment's endpoint is neither server, so every request went where its path's options said."""
    import botocore.session
    import yaml

    from s3server import ACCESS_KEY, SECRET_KEY, start_weed

    s3, bucket = chain["s3"], "firststage-second"
    second = start_weed(tmp_path / "second", bucket=bucket)
    try:
        options = tmp_path / "storage.yaml"
        options.write_text(yaml.safe_dump({
            f"s3://{aws.bucket}": {"endpoint_url": aws.endpoint},
            f"s3://{bucket}/": {"endpoint_url": second.endpoint, "region": "eu-west-1", "key_env": "SECOND_KEY",
                                "secret_env": "SECOND_SECRET"}}))
        fresh.setenv("FIRSTSTAGE_STORAGE_OPTIONS", str(options))
        fresh.setenv("SECOND_KEY", ACCESS_KEY)
        fresh.setenv("SECOND_SECRET", SECRET_KEY)
        fresh.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing answers there
        fresh.setenv("AWS_MAX_ATTEMPTS", "2")
        out = f"s3://{bucket}/copy"
        ok(run_main(stage("prepare"), "--input", f"{s3}/raw/raw-{{000000..000002}}.tar", "--output",
                    f"{out}/shards", "--shard-size", "8", "--size", "32"))
        r = ok(run_main(stage("encode"), "--model", f"{s3}/runs/klf8", "--data", f"{out}/shards", "--output",
                        f"{out}/latents"))
        assert "skipped 0" in r.stdout
        assert storage_for(f"{out}/x").endpoint() == second.endpoint and storage_for(s3).endpoint() == aws.endpoint
        assert read_json(f"{out}/shards/manifest.json") == read_json(f"{s3}/data/shards/manifest.json")
        assert [without(m, "source") for m in read_json(f"{out}/latents/manifest.json")["shards"]] == \
            [without(m, "source") for m in read_json(f"{s3}/latents/klf8/manifest.json")["shards"]]
        # on the second server itself, asked without our code: the outputs are there
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=second.endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="copy/").get("Contents", [])]
        assert "copy/shards/manifest.json" in keys and "copy/latents/manifest.json" in keys
        # the same paths without their options: the environment's endpoint, where nothing answers
        reset_storage()
        r = run_main(stage("prepare"), "--input", f"{s3}/raw/raw-000000.tar", "--output", f"{out}/again")
        assert r.returncode == 0, r.stderr  # the file is read again as the stage starts
        fresh.delenv("FIRSTSTAGE_STORAGE_OPTIONS")
        reset_storage()
        r = run_main(stage("prepare"), "--input", f"{s3}/raw/raw-000000.tar", "--output", f"{out}/never")
        assert r.returncode == 2 and "cannot reach the object store" in r.stderr, r.stderr
    finally:
        second.stop()


# ------------------------------------------------------------------------------------------------ kills
def open_uploads(prefix: str) -> list:
    store = storage_for(prefix)
    bucket, key = prefix[5:].split("/", 1)
    return store._client().list_multipart_uploads(Bucket=bucket, Prefix=key + "/").get("Uploads", [])


def killed_before(monkeypatch, when):
    """SIGKILL the (forked) process just before the request `when(operation, key)` names; a backend that uploads
    anything from 8 KB as a multipart upload (S3 lets the only part be smaller than 5 MiB), so that shards, latent
    tars and checkpoint files are uploaded in parts, and records and locks in one PUT."""
    from pipeline.storage.s3 import S3Storage

    real = S3Storage._call

    def call(self, op, bucket, key=None, **kw):
        if when(op, key or ""):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, op, bucket, key, **kw)

    monkeypatch.setattr(S3Storage, "_call", call)
    set_storage_options({"s3://": {"multipart_threshold": 8192, "part_size": 5 * 2**20}})


def run_killed(module: str, when, *args) -> tuple[int, str]:
    """The stage forked with the kill armed; (exit code, output)."""
    with pytest.MonkeyPatch.context() as m:
        killed_before(m, when)
        proc = ForkedStage(module, *args)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out + err


def test_prepare_killed_during_uploads_then_again(chain):
    s3, root = chain["s3"], chain["root"]
    out = f"{s3}/killed/shards"
    args = ["--input", f"{s3}/raw/raw-{{000000..000002}}.tar", "--output", out, "--shard-size", "4", "--size", "32"]
    moments = [
        lambda op, key: op == "complete_multipart_upload" and key.endswith("/shards-000001.tar"),  # parts up
        lambda op, key: op == "put_object" and key.endswith("/.progress/shards-000003.tar.json"),  # tar, no record
        lambda op, key: op == "put_object" and key.endswith("/manifest.json"),  # every record, no manifest
    ]
    for i, when in enumerate(moments):
        code, text = run_killed("stages.prepare", when, *args)
        assert code == -signal.SIGKILL, text
        assert not storage_for(out).object_exists(f"{out}/manifest.json")
        for name in listing(out):  # nothing half-written under a final name: every tar is a whole tar
            if name.endswith(".tar"):
                assert tarfile.open(fileobj=io.BytesIO(read(f"{out}/{name}"))).getmembers()
        if i == 0:
            assert open_uploads(out), "the kill mid-upload left its parts (invisible: no object)"
    ok(run_main(stage("prepare"), *args))
    assert open_uploads(out) == [], "the next holder of the lock aborted them at once (issue 29, item 15)"
    ok(run_main(stage("prepare"), *[a.replace(f"{s3}/raw", str(root / "raw")).replace(out, str(root / "ref"))
                                   for a in args]))
    assert read_json(f"{out}/manifest.json") == read_json(str(root / "ref" / "manifest.json"))
    assert read_tar_samples(out) == read_tar_samples(str(root / "ref"))  # every key exactly once, the same bytes
    assert listing(out) == listing(str(root / "ref"))  # nothing else: no lock, no temporary
    digests_match(out)


def digests_match(folder: str) -> None:
    """Every shard record's SHA-256 is its object's, and its ETag the listing's."""
    records = [n for n in listing(folder) if n.startswith(".progress/") and n.endswith(".tar.json")]
    tars = storage_for(folder).entries(folder)[0]
    assert records
    for rec in records:
        for name, d in read_json(f"{folder}/{rec}")["files"].items():
            assert hashlib.sha256(read(f"{folder}/{name}")).hexdigest() == d["sha256"], name
            assert tars[f"{folder}/{name}"][1] == d["etag"], name


def start_upload(url: str) -> str:
    """A multipart upload with one part, left open: what a run SIGKILLed mid-upload leaves."""
    store = storage_for(url)
    bucket, key = url[5:].split("/", 1)
    upload = store._client().create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    store._client().upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    return upload


def test_the_next_holder_aborts_at_once_the_uploads_no_live_run_owns(chain, monkeypatch):
    """Issue 29, item 15: killed runs' multipart uploads held their parts for an hour. The next holder of a lock
    aborts at once the uploads under its output that started before every live lock there was taken (here a part
    killed before part 1, which still runs, took its lock), and keeps those a live run may own (part 1's)."""
    import pipeline.manifest

    s3, store = chain["s3"], chain["store"]
    out = f"{s3}/orphans/shards"
    # the store's clock is this host's; its times are whole seconds
    monkeypatch.setattr(pipeline.manifest, "CLOCK_SKEW_S", 1.0, raising=False)
    dead = start_upload(f"{out}/shards-p00000-000000.tar")
    time.sleep(1.5)  # part 1 takes its lock after the dead run began its upload
    now = time.time()
    for lock in (".lock.part-00001-of-00002", "vae/.export.lock"):  # part 1; an export into a folder in ours
        store.write_bytes(f"{out}/{lock}", json.dumps({
            "host": "node-b", "pid": 7, "started": "now", "token": "theirs", "since": now, "lease_s": 120,
            "renewed": now, "expires": now + 120}).encode())
    part_1, export = start_upload(f"{out}/shards-p00001-000000.tar"), start_upload(f"{out}/vae/export/model.bin")
    args = ["--input", f"{s3}/raw/raw-{{000000..000002}}.tar", "--output", out, "--size", "32"]
    ok(run_main(stage("prepare"), *args, "--part", "0/2"))
    assert {u["UploadId"] for u in open_uploads(out)} == {part_1, export}  # the dead run's is gone
    store.delete(f"{out}/.lock.part-00001-of-00002")  # part 1 was killed: its upload is nobody's now
    ok(run_main(stage("prepare"), *args, "--part", "0/2"))
    assert [u["UploadId"] for u in open_uploads(out)] == [export]  # covered by the export's own lock
    store.delete(f"{out}/vae/.export.lock")
    ok(run_main(stage("prepare"), *args, "--part", "0/2"))
    assert open_uploads(out) == [] and dead not in (part_1, export)


def test_a_whole_job_and_its_parts_exclude_each_other_by_their_leases(chain):
    """Issue 29, item 4 on object storage: a part is refused while the whole job's lease runs (and the whole job
    while a part's does), in one line naming it; once that lease ran out the part runs, and after its partner part
    every key is there once and every record's digest (and ETag) is its object's."""
    s3, store = chain["s3"], chain["store"]
    out = f"{s3}/split/shards"
    args = ["--input", f"{s3}/raw/raw-{{000000..000002}}.tar", "--output", out, "--size", "32"]
    for theirs, part in ((".lock", ["--part", "0/2"]), (".lock.part-00001-of-00002", [])):
        holder(store, f"{out}/{theirs}", expires_in=60)
        r = run_main(stage("prepare"), *args, *part)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"--output {out} is being written by" in r.stderr and f"{out}/{theirs}" in r.stderr, r.stderr
        assert listing(out) == [theirs]  # nothing written, our lock released
        store.delete(f"{out}/{theirs}")
    holder(store, f"{out}/.lock", expires_in=-30)  # the whole job's host died: its lease ran out
    for k in range(2):
        ok(run_main(stage("prepare"), *args, "--part", f"{k}/2"))
    m = ok(run_main(stage("prepare"), "--merge-manifests", out)) and read_json(f"{out}/manifest.json")
    assert m["total"] == len(read_tar_samples(out)) == 24  # every key once
    digests_match(out)


def test_a_rerun_writes_again_a_shard_replaced_after_its_record(chain):
    """Issue 29, item 4 on object storage: a tar replaced after its record was created is found by its ETag (from
    the listing, no object read) and written again; then every key is there once."""
    s3 = chain["s3"]
    out = f"{s3}/replaced/shards"
    args = ["--input", f"{s3}/raw/raw-{{000000..000002}}.tar", "--output", out, "--size", "32", "--shard-size", "4"]
    with pytest.MonkeyPatch.context() as m:  # the tars go up in parts: their ETags are no MD5 of the bytes
        set_storage_options({"s3://": {"multipart_threshold": 8192, "part_size": 5 * 2**20}})
        ok(run_main(stage("prepare"), *args))
        store = storage_for(out)
        store.write_bytes(f"{out}/shards-000001.tar", read(f"{out}/shards-000000.tar"))  # another shard's tar
        before = store.entries(out)[0]
        ok(run_main(stage("prepare"), *args))
    after = storage_for(out).entries(out)[0]
    assert len(read_tar_samples(out)) == 24  # a key twice fails here
    assert all("-" in etag for u, (_, etag) in after.items() if u.endswith(".tar"))  # multipart ETags
    changed = sorted(u.rsplit("/", 1)[-1] for u in after if u.endswith(".tar") and after[u] != before[u])
    assert changed == ["shards-000001.tar"]  # the others were checked by their ETags and kept
    digests_match(out)


def test_encode_killed_during_uploads_then_again(chain):
    s3 = chain["s3"]
    out = f"{s3}/killed/latents"
    args = ["--model", f"{s3}/runs/klf8", "--data", f"{s3}/data/shards", "--output", out]
    for when in (lambda op, key: op == "complete_multipart_upload" and key.endswith("/shards-000001.tar"),
                 lambda op, key: op == "put_object" and key.endswith("/records/shards-000002.json")):
        code, text = run_killed("stages.encode", when, *args)
        assert code == -signal.SIGKILL, text
    r = ok(run_main(stage("encode"), *args))
    assert "1 already complete" in r.stdout or "2 already complete" in r.stdout, r.stdout
    a, b = read_json(f"{out}/manifest.json"), read_json(f"{s3}/latents/klf8/manifest.json")
    assert a["shards"] == b["shards"] and a["statistics"] == b["statistics"]
    assert read_tar_samples(out).keys() == read_tar_samples(f"{s3}/latents/klf8").keys()
    assert listing(out) == listing(f"{s3}/latents/klf8")


def test_train_killed_during_checkpoint_uploads_resumes_from_the_newest_complete(chain):
    s3 = chain["s3"]
    run = f"{s3}/killed/run"
    args = [*TINY, f"data.train={s3}/data/shards", f"output_dir={run}", "train.max_steps=4",
            "train.checkpoint_every=2", "train.keep_checkpoints=1", "train.log_every=2", "--resume", "auto"]
    code, text = run_killed("stages.train", lambda op, key: op == "put_object" and
                            key.endswith("/step-00000002/trainer.json"), *args)  # every file of step 2, no record
    assert code == -signal.SIGKILL and "from step 0" in text, text
    code, text = run_killed("stages.train", lambda op, key: op == "complete_multipart_upload" and
                            key.endswith("/step-00000004/ema.safetensors"), *args)  # step 4 half uploaded
    assert code == -signal.SIGKILL and "from step 0 to 4" in text, text  # step 2 was not complete
    r = ok(run_main(stage("train"), *args))
    assert "from step 2 to 4" in r.stdout, r.stdout  # the newest complete checkpoint
    assert read_json(f"{run}/checkpoints/step-00000004/trainer.json")["step"] == 4
    # pruned to the newest one (train.keep_checkpoints=1): nothing else under checkpoints/, not even parts
    assert {n.split("/")[0] for n in listing(f"{run}/checkpoints")} == {"step-00000004"}
    # the logs: uploaded at each checkpoint, continued (not repeated) by the resumed run
    assert [json.loads(ln)["step"] for ln in read(f"{run}/metrics.jsonl").splitlines()] == [2, 4]


# ------------------------------------------------------------------------------------------------ locks
def holder(store, path: str, expires_in: float) -> None:
    now = time.time()
    store.write_bytes(path, json.dumps({"host": "node-a", "pid": 4242, "started": "earlier", "command": "firststage",
                                        "token": "theirs", "lease_s": 120, "renewed": now - 120 + expires_in,
                                        "expires": now + expires_in}).encode())


def test_second_run_refused_naming_the_first_and_an_expired_lease_taken_over(chain, tmp_path):
    s3, store = chain["s3"], chain["store"]
    out = f"{s3}/locked/shards"
    args = ["--input", f"{s3}/raw/raw-000000.tar", "--output", out, "--size", "32"]
    holder(store, f"{out}/.lock", expires_in=60)  # a run on another host, renewing its lease
    r = run_main(stage("prepare"), *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--output {out} is in use by pid 4242 on node-a" in r.stderr
    assert not store.exists(f"{out}/manifest.json")
    holder(store, f"{out}/.lock", expires_in=-30)  # its host died: the lease ran out 30 s ago
    ok(run_main(stage("prepare"), *args))
    assert store.exists(f"{out}/manifest.json") and not store.exists(f"{out}/.lock")


def test_two_runs_taking_one_expired_lease_at_once_one_wins(chain, tmp_path):
    s3, store = chain["s3"], chain["store"]
    out = f"{s3}/raced/shards"
    holder(store, f"{out}/.lock", expires_in=-30)
    import stages.prepare

    real = stages.prepare.prepare

    def slow_prepare(*a, **kw):  # the winner still holds the lock when the other looks
        time.sleep(2)
        return real(*a, **kw)

    args = ["--input", f"{s3}/raw/raw-000000.tar", "--output", out, "--size", "32"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stages.prepare, "prepare", slow_prepare)
        procs = [ForkedStage("stages.prepare", *args) for _ in range(2)]
    results = [(p.wait(120), *p.output()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    winner = next(p for p, (code, _, _) in zip(procs, results) if code == 0)
    loser = next(err for code, _, err in results if code == 2)
    assert f"is in use by pid {winner.pid} on {socket.gethostname()}" in loser, loser


def test_taking_over_a_lease_through_a_409_conflict(chain, fresh):
    """AWS answers 409 ConditionalRequestConflict to a conditional write racing another (SeaweedFS never does):
    the takeover is tried again and wins once."""
    from pipeline.storage.lease import LeasedLock

    store = storage_for(chain["s3"])
    folder = f"{chain['s3']}/conflict"
    holder(store, f"{folder}/.lock", expires_in=-30)
    injected = {"PutObject": 1}
    with conflicts(store._client(), injected, "if-match"):
        retries = store.retries
        lock = LeasedLock(folder, lease_s=30).acquire()
        assert injected == {"PutObject": 0} and store.retries == retries + 1
        assert json.loads(store.read_bytes(lock.path))["token"] == lock.me["token"]
        lock.release()


def test_a_run_that_lost_its_lease_commits_nothing_more(chain):
    """Another run took the lock over (this one's host was cut off past its lease): no unit under the folder is
    committed any more, by the holder (its renewal found out) or by a process forked from it (prepare's workers)."""
    from pipeline.errors import LockLost
    from pipeline.storage import Unit
    from pipeline.storage.lease import LeasedLock

    store, folder = chain["store"], f"{chain['s3']}/lost"
    lock = LeasedLock(folder, lease_s=30).acquire()
    try:
        store.write_bytes(lock.path, json.dumps({"host": "node-b", "pid": 7, "token": "theirs"}).encode())
        pid = os.fork()
        if pid == 0:  # a forked worker: asks the store
            try:
                Unit(f"{folder}/.progress/a.json").commit({"n": 1})
                os._exit(0)
            except LockLost as e:
                os._exit(3 if "lost the lock" in str(e) and "pid 7 on node-b" in str(e) else 1)
            except BaseException:
                os._exit(1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
        assert lock.renew() is False
        with pytest.raises(LockLost, match="lost the lock"):
            Unit(f"{folder}/.progress/b.json").commit({"n": 2})
        assert listing(folder) == [".lock"]
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------------ faults
@pytest.fixture
def through_proxy(aws, fresh):
    """The stages talk to the server through a FaultProxy; botocore's backoff and a read's between resumptions made
    short (the retries are what is tested)."""
    import botocore.retries.standard

    from pipeline.storage.s3 import S3ReadStream

    fresh.setattr(S3ReadStream, "MAX_DELAY", 0.01)

    def make(**kw):
        proxy = FaultProxy(("127.0.0.1", int(aws.endpoint.rsplit(":", 1)[1])), **kw)
        fresh.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        fresh.setenv("AWS_MAX_ATTEMPTS", "10")
        fresh.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0.01)
        reset_storage()
        proxies.append(proxy)
        return proxy

    proxies: list = []
    yield make
    for p in proxies:
        p.close()


def test_throttling_and_dropped_connections_are_retried_and_the_run_finishes(chain, through_proxy, caplog):
    s3, root = chain["s3"], chain["root"]
    proxy = through_proxy(seed=5, p_reset=0.1, p_slowdown=0.2, mean_bytes=40_000)
    out = f"{s3}/faulty/shards"
    t0 = time.time()
    with caplog.at_level("WARNING", logger="firststage.storage"):
        ok(run_main(stage("prepare"), "--input", f"{s3}/raw/raw-{{000000..000002}}.tar", "--output", out,
                    "--shard-size", "8", "--size", "32"))
        print("TIMING prepare", time.time() - t0, proxy.faults)
        r = ok(run_main(stage("encode"), "--model", f"{s3}/runs/klf8", "--data", out, "--output",
                        f"{s3}/faulty/latents"))
        print("TIMING encode", time.time() - t0, proxy.faults)
    store = storage_for(s3)
    assert sum(proxy.faults.values()) > 0 and store.retries > 0, (proxy.faults, store.retries)
    assert "request(s) retried" in caplog.text
    assert "skipped 0" in r.stdout
    reset_storage()
    assert read_json(f"{out}/manifest.json") == read_json(f"{root}/local/data/shards/manifest.json")
    assert [without(s, "source") for s in read_json(f"{s3}/faulty/latents/manifest.json")["shards"]] == \
        [without(s, "source") for s in read_json(f"{s3}/latents/klf8/manifest.json")["shards"]]
    print(f"faults {proxy.faults}, retries {store.retries}: {store.retry_reasons}")


def test_a_shard_that_cannot_be_read_is_skipped_and_counted(chain, through_proxy, fresh, aws):
    """A shard whose every read is cut: the loader skips it and counts it (training goes on); encode writes the
    others and exits 75 (try again), and the same command finishes once the shard can be read."""
    from pipeline.storage.s3 import S3ReadStream

    s3 = chain["s3"]
    fresh.setattr(S3ReadStream, "MAX_RESUMES", 2)
    proxy = through_proxy(p_reset=0, p_slowdown=0, mean_bytes=1e12, broken=("shards-000001.tar",))
    from pipeline.data.loader import ImageStream

    ds = ImageStream([f"{s3}/data/shards/shards-{i:06d}.tar" for i in range(3)], mode="eval", resolution=32)
    with pytest.warns(UserWarning, match="skipped 1 unreadable shard"):
        keys = [s["__key__"] for s in ds]
    assert len(keys) == 16 and ds.unreadable.count == 1 and proxy.faults["broken"] > 0
    out = f"{s3}/unreadable/latents"
    r = run_main(stage("encode"), "--model", f"{s3}/runs/klf8", "--data", f"{s3}/data/shards", "--output", out)
    assert r.returncode == 75 and "1 input shards could not be read" in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("encode: shard ")]  # the loop's last line
    assert "shards-000001.tar" in r.stderr and len(errors) == 1, r.stderr
    assert "shards-000001.tar" not in listing(out) and read_json(f"{out}/manifest.json")["missing"] == \
        ["shards-000001.tar"]
    fresh.setenv("AWS_ENDPOINT_URL", aws.endpoint)  # the shard can be read again
    reset_storage()
    r = ok(run_main(stage("encode"), "--model", f"{s3}/runs/klf8", "--data", f"{s3}/data/shards", "--output", out))
    assert "2 already complete" in r.stdout and read_json(f"{out}/manifest.json")["total"] == 24


def test_prepare_writes_the_shards_it_can_read_and_exits_75_for_the_others(chain, through_proxy, fresh, aws):
    """An input tar that can be listed but whose byte ranges are cut every time: prepare writes the shards of the
    other inputs, names the first shard it could not write (its worker's typed Unavailable) and exits 75; the same
    command finishes once the tar can be read."""
    from pipeline.storage.s3 import S3ReadStream

    s3 = chain["s3"]
    fresh.setattr(S3ReadStream, "MAX_RESUMES", 2)
    proxy = through_proxy(p_reset=0, p_slowdown=0, mean_bytes=1e12, broken=("raw-000001.tar",),
                          ranged_only=True)
    out = f"{s3}/unreadable/shards"
    args = ["--input", f"{s3}/raw/raw-{{000000..000002}}.tar", "--output", out, "--shard-size", "8", "--size", "32"]
    r = run_main(stage("prepare"), *args)
    assert r.returncode == 75 and proxy.faults["broken"] > 0, r.stderr
    assert "shards not written: their inputs could not be read" in r.stderr and "(first: shards-" in r.stderr
    written = [n for n in listing(out) if n.endswith(".tar")]
    assert 0 < len(written) < 3 and not any(n == "manifest.json" for n in listing(out)), listing(out)
    fresh.setenv("AWS_ENDPOINT_URL", aws.endpoint)  # the tar can be read again
    reset_storage()
    ok(run_main(stage("prepare"), *args))
    assert read_json(f"{out}/manifest.json") == read_json(f"{s3}/data/shards/manifest.json")


# ------------------------------------------------------------------------------------------------ errors
def test_wrong_credentials_missing_bucket_and_missing_extra_one_line_before_any_work(chain, fresh, tmp_path, aws):
    import sys

    s3 = chain["s3"]
    commands = {
        "prepare": ["--input", f"{s3}/raw/raw-000000.tar", "--output", f"{s3}/never/shards"],
        "train": [*TINY, f"data.train={s3}/data/shards", f"output_dir={s3}/never/run"],
        "encode": ["--model", f"{s3}/runs/klf8", "--data", f"{s3}/data/shards", "--output", f"{s3}/never/latents"],
        "export": ["--model", f"{s3}/runs/klf8", "--output", f"{s3}/never/export"],
    }
    fresh.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    for name, args in commands.items():
        r = run_main(stage(name), *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "access refused" in r.stderr, (name, r.stderr)
        assert "check the AWS credentials" in r.stderr
    fresh.setenv("AWS_SECRET_ACCESS_KEY", aws.env()["AWS_SECRET_ACCESS_KEY"])
    reset_storage()
    r = run_main(stage("prepare"), "--input", f"{s3}/raw/raw-000000.tar", "--output", "s3://no-such-bucket-x/shards")
    assert r.returncode == 2 and r.stderr.strip().endswith(
        f"--output s3://no-such-bucket-x: no such bucket at {aws.endpoint}"), r.stderr
    r = run_main(stage("encode"), "--model", "s3://no-such-bucket-x/run", "--data", f"{s3}/data/shards",
                 "--output", str(tmp_path / "latents"))
    assert r.returncode == 2 and "--model s3://no-such-bucket-x: no such bucket" in r.stderr, r.stderr
    assert listing(f"{s3}/never") == [] and not (tmp_path / "latents").exists()
    # a server that does not refuse a create-only write of an existing object: refused before any work
    reset_storage()  # a backend that has not yet seen this bucket refuse a second create-only write
    store = storage_for(s3)
    strip = lambda params, **_: params.pop("IfNoneMatch", None)  # noqa: E731 (the header never sent)
    store._client().meta.events.register("before-parameter-build.s3.PutObject", strip)
    r = run_main(stage("prepare"), "--input", f"{s3}/raw/raw-000000.tar", "--output", f"{s3}/never/shards")
    store._client().meta.events.unregister("before-parameter-build.s3.PutObject", strip)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs conditional writes" in r.stderr, r.stderr
    assert listing(f"{s3}/never") == []
    # without the extra: one line naming it
    fresh.setitem(sys.modules, "botocore", None)
    fresh.delitem(sys.modules, "pipeline.storage.s3", raising=False)
    fresh.delitem(base.BACKENDS, "s3", raising=False)
    reset_storage()
    r = run_main(stage("prepare"), "--input", str(chain["root"] / "raw"), "--output", f"{s3}/never/shards")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"firststage prepare: error: --output {s3}/never/shards: s3:// needs the s3 extra (botocore is not "
        f"installed): pip install 'firststage[s3]'"), r.stderr


def test_the_readmes_command_makes_a_bucket_that_prepare_then_writes_into(aws, fresh, tmp_path):
    """README, Object storage: a bucket made with botocore alone (the s3 extra), from the same AWS variables."""
    import subprocess
    import sys

    from helpers import write_images

    bucket = f"made-{uuid.uuid4().hex[:8]}"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    make = re.search(r'`python -c "(import botocore.session;[^"]+)"`', readme).group(1).replace("'data'", f"'{bucket}'")
    r = subprocess.run([sys.executable, "-c", make], env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-1000:]
    write_images(tmp_path / "images", 2, size=(40, 40))
    r = run_main(stage("prepare"), "--input", tmp_path / "images", "--output", f"s3://{bucket}/shards", "--size", "32")
    assert r.returncode == 0, r.stderr
    assert storage_for(f"s3://{bucket}/shards").object_exists(f"s3://{bucket}/shards/manifest.json")
