"""Hostile inputs, round 3 (issue 29, items 6, 9, 10, 11, 12 and 16): keys that collide in prepare, special files and
huge or sparse members that must never be read, safetensors headers naming tens of thousands of tensors, latents of
the wrong shape or dtype, and inputs that used to end in a traceback (a manifest nested 200,000 deep, an absurd
--part, an encode out of memory). Each test failed on the code before its fix, for the reason its name gives."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from harness import ENV, ROOT, run_main
from helpers import image_bytes, keys_in_tars, make_shards, random_image, write_images, write_tar
from pipeline.manifest import IMAGE_FORMAT, read_manifest

GiB = 2**30
SMALL = ["data.resolution=32", "data.num_workers=0", "encode.batch_size=4"]


def prepare(*args):
    from stages.prepare import main

    return run_main(main, *args)


def encode(vae: Path, data, out: Path, *extra):
    from stages.encode import main

    return run_main(main, "--model", vae, "--data", data, "--output", out, *SMALL, *extra)


def one_line(r) -> bool:
    """The error is one line (warnings printed before it are not part of it) and no traceback."""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("firststage ")]
    return len(errors) == 1 and "Traceback" not in r.stderr and r.stderr.rstrip().endswith(errors[0])


# ------------------------------------------------------------------------------------------ tars, written by hand
def _header(info: tarfile.TarInfo) -> bytearray:
    return bytearray(info.tobuf(format=tarfile.GNU_FORMAT))


def regular_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return bytes(_header(info)) + data + b"\0" * (-len(data) % 512)


def sparse_member(name: str, size: int) -> bytes:
    """A GNU sparse member (what `tar --sparse` writes for a file that is mostly a hole) whose header says `size`
    bytes and whose stored data is one byte in one block: reading it whole makes `size` bytes of zeros."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = 1, 0o644, tarfile.GNUTYPE_SPARSE
    buf = _header(info)
    octal = lambda n: tarfile.itn(n, 12, tarfile.GNU_FORMAT)  # noqa: E731
    buf[386:398], buf[398:410] = octal(size - 1), octal(1)  # the one data byte at the very end
    buf[482] = 0  # no extended sparse headers
    buf[483:495] = octal(size)  # the real size
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf) + b"x" + b"\0" * 511


def write_raw_tar(path: Path, members: list[bytes]) -> None:
    path.write_bytes(b"".join(members) + b"\0" * 1024)


def jpeg(seed: int, size=(40, 40)) -> bytes:
    return image_bytes(random_image(*size, seed=seed), quality=90)


def shard_with_a_sparse_member(path: Path, good: int = 3, size: int = GiB) -> None:
    """`good` image samples and, between them, `big` whose jpg is a sparse member of `size` bytes (the file: ~10 KB)."""
    members = []
    for i in range(good):
        members += [regular_member(f"s{i:03d}.jpg", jpeg(i)), regular_member(f"s{i:03d}.txt", b"caption")]
        if i == 0:
            members += [sparse_member("big.jpg", size), regular_member("big.txt", b"caption")]
    write_raw_tar(path, members)


# ------------------------------------------------------------------------------- 6. duplicate keys from prepare
def test_a_list_naming_one_image_many_times_gives_one_sample(tmp_path):
    write_images(tmp_path / "in", 2, size=(40, 40))
    lines = ["in/img0000.jpg"] * 2000 + ["./in/img0000.jpg", "in/img0001.jpg", "in/../in/img0001.jpg"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    r = prepare("--input", tmp_path / "list.txt", "--output", tmp_path / "out", "--size", "32")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "out")
    assert (m["inputs"], m["total"], m["skipped_count"]) == (2, 2, 0)  # not 2003 samples under two keys
    assert "read 2 inputs, wrote 2 samples" in r.stdout
    assert sorted(keys_in_tars(tmp_path / "out")) == ["in/img0000", "in/img0001"]


def test_two_files_under_one_key_keep_the_first_and_list_the_second(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = random_image(40, 40, seed=1)
    img.save(src / "anim.png")
    img.save(src / "anim.webp")
    img.save(src / "a.b.jpg")  # a dot in the name becomes '_': the key a_b
    img.save(src / "a_b.jpg")
    img.save(src / "solo.jpg")
    r = prepare("--input", src, "--output", tmp_path / "out", "--size", "32")
    assert r.returncode == 0, r.stderr
    keys = keys_in_tars(tmp_path / "out")
    assert sorted(keys) == ["a_b", "anim", "solo"]  # each key once: encode would skip a second as broken
    m = read_manifest(tmp_path / "out")
    assert (m["inputs"], m["total"], m["skipped_count"]) == (5, 3, 2)
    why = {Path(s["input"]).name: s["reason"] for s in m["skipped"]}
    assert why.keys() == {"anim.webp", "a_b.jpg"}  # in name order, the first of a pair is kept
    assert why["anim.webp"] == f"duplicate key (anim: also the key of {src / 'anim.png'}; the first is kept)"
    assert "skipped 2 (2 duplicate key; listed in the manifest)" in r.stdout


def test_a_key_in_two_input_tars_is_written_once(tmp_path):
    write_tar(tmp_path / "a.tar", [{"__key__": f"k{i}", "jpg": jpeg(i)} for i in range(3)])
    write_tar(tmp_path / "b.tar", [{"__key__": f"k{i}", "jpg": jpeg(10 + i)} for i in range(2, 5)])
    r = prepare("--input", tmp_path / "{a,b}.tar", "--output", tmp_path / "out", "--size", "32")
    assert r.returncode == 0, r.stderr
    assert sorted(keys_in_tars(tmp_path / "out")) == ["k0", "k1", "k2", "k3", "k4"]
    m = read_manifest(tmp_path / "out")
    (dup,) = m["skipped"]
    assert dup["input"].endswith("b.tar") and dup["reason"].startswith("duplicate key (k2: also in ")
    assert dup["reason"].endswith("a.tar; the first sample is kept)")


# --------------------------------------------------------------------- 9. devices and FIFOs among prepare's inputs
def run_prepare_bounded(*args, memory: int = 3 * GiB, timeout: float = 60) -> subprocess.CompletedProcess:
    """`firststage prepare ARGS` in a process that may not grow past `memory` bytes nor take `timeout` seconds:
    before the fix, a link to /dev/zero grew prepare until the kernel killed it and a FIFO blocked it forever."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    try:
        return subprocess.run([sys.executable, "-m", "stages.prepare", *map(str, args)], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"prepare did not end within {timeout}s (blocked on an input)") from None


@pytest.mark.parametrize("special", ["device", "fifo"])
def test_a_device_or_fifo_among_the_images_is_listed_never_read(tmp_path, special):
    src = tmp_path / "in"
    write_images(src, 3, size=(40, 40))
    if special == "device":
        (src / "x.jpg").symlink_to("/dev/zero")  # read whole: 23 GB before the kernel killed prepare
    else:
        os.mkfifo(src / "p.jpg")  # opened for reading: blocks until a writer comes, forever
    t0 = time.time()
    r = run_prepare_bounded("--input", src, "--output", tmp_path / "out", "--size", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert time.time() - t0 < 30
    m = read_manifest(tmp_path / "out")
    assert m["total"] == 3 and m["skipped_count"] == 1
    kind = "a character device" if special == "device" else "a named pipe (FIFO)"
    assert m["skipped"][0]["reason"] == f"not a regular file ({kind}; not read)"
    assert "1 not a regular file" in r.stdout


def test_a_fifo_among_the_input_tars_is_listed_never_opened(tmp_path):
    make_shards(tmp_path / "in", 1, 3, size=(40, 40))
    os.mkfifo(tmp_path / "in" / "shard-000001.tar")
    r = run_prepare_bounded("--input", tmp_path / "in", "--output", tmp_path / "out", "--size", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_manifest(tmp_path / "out")
    assert m["total"] == 3 and [s["reason"] for s in m["skipped"]] == [
        "not a regular file (a named pipe (FIFO); not opened)"]


def test_an_image_over_the_size_cap_is_listed_before_it_is_read(tmp_path, monkeypatch):
    import pipeline.data.prepare as prep

    src = tmp_path / "in"
    write_images(src, 2, size=(40, 40))
    random_image(400, 400, seed=5).save(src / "huge.png")  # a PNG of ~100 KB
    size = (src / "huge.png").stat().st_size
    reads = []
    real = prep._read_at_most
    monkeypatch.setattr(prep, "_read_at_most", lambda f, cap: reads.append(f.raw.size) or real(f, cap))
    r = prepare("--input", src, "--output", tmp_path / "out", "--size", "32", f"prepare.max_file_bytes={size - 1}")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "out")
    assert m["total"] == 2 and [s["reason"] for s in m["skipped"]] == [
        f"too large ({size} bytes, over prepare.max_file_bytes={size - 1}; not read)"]
    assert size not in reads  # refused from its stat: not a byte of it was read
    from pipeline.config import describe_fields

    assert {"prepare.max_file_bytes", "data.max_member_bytes"} <= {k for k, _, _ in describe_fields()}


# ---------------------------------------------------------------------------- 10. sparse (or huge) tar members
def peak_python_bytes(fn):
    """(fn(), the peak of Python's allocations while it ran): a member read whole is one bytes object that size."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_loader_skips_a_sparse_member_without_reading_it(tmp_path):
    from pipeline.data.loader import ImageStream

    shard_with_a_sparse_member(tmp_path / "sparse-000000.tar")
    assert (tmp_path / "sparse-000000.tar").stat().st_size < 20_000
    ds = ImageStream([str(tmp_path / "sparse-000000.tar")], mode="eval", resolution=32)
    with pytest.warns(UserWarning, match="skipped 1 undecodable sample"):
        keys, peak = peak_python_bytes(lambda: [s["__key__"] for s in ds])
    assert peak < 64 * 2**20  # reading it whole took 1 GiB (2.6 GB RSS for a 2 GiB member)
    assert keys == ["s000", "s001", "s002"]
    assert ds.skipped.count == 1 and "too large (1073741824 bytes in member big.jpg, over data.max_member_bytes=" \
        in ds.skipped.latest


def test_encode_lists_a_sparse_member_in_the_manifest_without_reading_it(vae, tmp_path):
    (tmp_path / "data").mkdir()
    shard_with_a_sparse_member(tmp_path / "data" / "shards-000000.tar")
    r, peak = peak_python_bytes(lambda: encode(vae, tmp_path / "data", tmp_path / "lat"))
    assert r.returncode == 0, r.stderr
    assert peak < 256 * 2**20  # 2.9 GB RSS for a 2 GiB member before
    m = read_manifest(tmp_path / "lat")
    assert m["total"] == 3 and m["skipped_count"] == 1
    (skip,) = m["skipped"]
    assert skip["key"] == "big" and skip["reason"].startswith("too large (1073741824 bytes in member big.jpg, over "
                                                              "data.max_member_bytes=")
    # the cap is a config key: a lower one skips ordinary members too, each listed
    r = encode(vae, tmp_path / "data", tmp_path / "lat2", "data.max_member_bytes=100")
    assert r.returncode == 2 and "no sample could be encoded (4 too large" in r.stderr


def test_prepare_lists_a_sparse_member_of_an_input_tar(tmp_path):
    shard_with_a_sparse_member(tmp_path / "in.tar")
    r = prepare("--input", tmp_path / "in.tar", "--output", tmp_path / "out", "--size", "32")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "out")
    assert m["total"] == 3 and [s["reason"] for s in m["skipped"]] == [
        "too large (1073741824 bytes in member big.jpg, over prepare.max_file_bytes=536870912; not read)"]


# ------------------------------------------------------------------------------------------ the latent reader
@pytest.fixture(scope="module")
def latents(vae, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latents")
    make_shards(root / "data", 2, 4, size=(40, 40), prefix="shards")
    assert encode(vae, root / "data", root / "lat").returncode == 0
    return root / "lat"


def rewrite_shard(path: Path, change, raw: dict | None = None) -> None:
    """Rewrite a latent shard in place: `change(index, sample)` edits each sample's members; `raw` puts a member of
    hand-written tar bytes in place of {member name: bytes} (a sparse one)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    out = []
    for i, (key, members) in enumerate(samples.items()):
        change(i, members)
        for ext, data in members.items():
            name = f"{key}.{ext}"
            out.append((raw or {}).get(name) or regular_member(name, data))
    write_raw_tar(path, out)


def copy_of(latents: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "lat"
    shutil.copytree(latents, folder)
    return folder


def test_the_latent_reader_skips_a_sparse_member_without_reading_it(latents, tmp_path):
    from pipeline.latents import LatentDataset

    folder = copy_of(latents, tmp_path)
    rewrite_shard(folder / "shards-000000.tar", lambda i, s: None,
                  raw={"s000_0001.latents.safetensors": sparse_member("s000_0001.latents.safetensors", GiB)})
    ds = LatentDataset(folder, mode="eval")
    with pytest.warns(UserWarning, match="skipped 1 undecodable sample"):
        keys, peak = peak_python_bytes(lambda: [s["__key__"] for s in ds])
    assert peak < 64 * 2**20
    assert len(keys) == 7 and "s000_0001" not in keys  # the shard still counts 4 samples, as the manifest says
    assert "too large (1073741824 bytes in member s000_0001.latents.safetensors" in ds.skipped.latest


# ------------------------------------------------------------------- 11. a safetensors header with many tensors
def test_a_header_naming_40000_tensors_costs_no_more_than_a_bad_sample(latents, tmp_path):
    from pipeline.latents import LatentDataset

    folder = copy_of(latents, tmp_path)
    names = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(40_000)}
    header = (json.dumps(names)[:-1] + ', "t0": ' + json.dumps(names["t0"]) + "}").encode()  # and one name twice
    many = struct.pack("<Q", len(header)) + header + b"\0" * 160_000
    rewrite_shard(folder / "shards-000000.tar", lambda i, s: s.update({"latents.safetensors": many}) if i == 0 else None)
    t0 = time.time()
    ds = LatentDataset(folder, mode="eval")
    with pytest.warns(UserWarning):
        keys = [s["__key__"] for s in ds]
    assert time.time() - t0 < 10  # 28 s before (names.count(k) per name), 200,000 names over 200 s
    assert len(keys) == 7 and ds.skipped.count == 1 and "safetensors header of" in ds.skipped.latest


def test_read_latent_still_refuses_a_tensor_name_twice():
    from pipeline.latents.format import BadLatent, read_latent

    f32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    header = ('{"a": %s, "b": %s, "a": %s}' % ((json.dumps(f32),) * 3)).encode()
    with pytest.raises(BadLatent, match="tensor a twice"):
        read_latent(struct.pack("<Q", len(header)) + header + b"\0" * 4)


# --------------------------------------------------------------- 12. latents of other shapes and dtypes than said
def test_the_latent_reader_skips_mismatched_shapes_and_dtypes(latents, tmp_path):
    from pipeline.latents import LatentDataset

    folder = copy_of(latents, tmp_path)
    m = json.loads((folder / "manifest.json").read_text())
    assert m["dtype"] == "float32" and m["tensors"] == ["mean", "logvar"]
    (shape,) = [tuple(v) for v in m.pop("latent_shapes").values()]  # an older manifest: no shapes to hold against
    (folder / "manifest.json").write_text(json.dumps(m))
    c, h, w = shape
    hostile = [
        {"mean": torch.zeros(shape), "logvar": torch.zeros(c, h // 2, w // 2)},  # raised from the iterator before
        {"mean": torch.zeros(shape, dtype=torch.int8), "logvar": torch.zeros(shape, dtype=torch.int8)},  # accepted
        {"mean": torch.zeros(shape, dtype=torch.float16), "logvar": torch.zeros(shape, dtype=torch.float16)},
        {"mean": torch.zeros(16), "logvar": torch.zeros(16)},  # not [C, h, w]
    ]
    rewrite_shard(folder / "shards-000000.tar",
                  lambda i, s: s.update({"latents.safetensors": save_safetensors(hostile[i])}) if i < 4 else None)
    for mode in ("eval", "train"):  # train: endless, several passes over the bad ones
        ds = LatentDataset(folder, mode=mode, shuffle_buffer=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = [s for _, s in zip(range(24 if mode == "train" else 100), ds)]
        assert all(s["latents"].shape == shape and s["latents"].dtype == torch.float32 for s in got)
        assert ds.skipped.count >= 4 and (mode == "train" or len(got) == 4)
    reasons = []
    ds = LatentDataset(folder, mode="eval")
    ds.skipped = lambda where, e: reasons.append(str(e))
    list(ds)
    assert reasons == [f"tensors of different shapes (logvar {[c, h // 2, w // 2]}, mean {list(shape)})",
                       "tensor logvar of dtype int8, the manifest says float32",
                       "tensor logvar of dtype float16, the manifest says float32",
                       "tensors of shape [16], not [channels, height, width]"]


def test_a_meta_member_nested_too_deep_is_a_bad_sample(latents, tmp_path):
    from pipeline.latents import LatentDataset

    folder = copy_of(latents, tmp_path)
    deep = b"[" * 200_000 + b"]" * 200_000
    rewrite_shard(folder / "shards-000001.tar", lambda i, s: s.update({"json": deep}) if i == 0 else None)
    ds = LatentDataset(folder, mode="eval")
    with pytest.warns(UserWarning):
        assert len(list(ds)) == 7
    assert "KEY.json is not JSON" in ds.skipped.latest


# ------------------------------------------------------------------------- 16. one line instead of a traceback
def deep_manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text('{"format": "%s", "shards": %s%s}' % (IMAGE_FORMAT, "[" * 200_000,
                                                                                 "]" * 200_000))
    return folder / "manifest.json"


def test_a_manifest_nested_200000_deep_is_one_line_in_train_and_encode(vae, tmp_path):
    from stages.train import main as train

    manifest = deep_manifest(tmp_path / "data")
    r = run_main(train, "--config", "tiny", "data.resolution=32", f"data.train={manifest}",
                 f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and one_line(r), r.stderr[-2000:]
    assert "manifest.json: not a firststage manifest (JSON nested too deeply to read)" in r.stderr
    r = encode(vae, tmp_path / "data", tmp_path / "lat")
    assert r.returncode == 2 and one_line(r), r.stderr[-2000:]
    assert "--data " in r.stderr and "(JSON nested too deeply to read)" in r.stderr


def test_an_absurd_part_count_is_one_line(vae, tmp_path):
    make_shards(tmp_path / "data", 2, 2, size=(40, 40), prefix="shards")
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"format": IMAGE_FORMAT, "shards": [
        {"name": f"shards-{i:06d}.tar", "samples": 2} for i in range(2)]}))
    r = encode(vae, tmp_path / "data", tmp_path / "lat", "--part", "0/99999999999999999999")
    assert r.returncode == 2 and one_line(r), r.stderr[-2000:]  # OverflowError before (a folder: memory, then killed)
    assert "--part must be K/N with N at most 99999, got '0/99999999999999999999'" in r.stderr
    r = prepare("--input", tmp_path / "data", "--output", tmp_path / "out", "--part", "3/100000")
    assert r.returncode == 2 and one_line(r) and "--part must be K/N with N at most 99999" in r.stderr


def test_encode_out_of_memory_is_one_line_naming_the_batch_size_and_keeps_finished_shards(vae, tmp_path,
                                                                                           monkeypatch):
    from pipeline.latents.encoder import out_of_memory
    from pipeline.latents.format import RECORDS

    # the CPU allocator's failure is a plain RuntimeError; the device's is torch.OutOfMemoryError
    assert out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"))
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    from pipeline.models.families import FAMILIES

    make_shards(tmp_path / "data", 3, 4, size=(40, 40), prefix="shards")  # one batch of 4 per shard
    fam = FAMILIES["kl"]
    real, calls = fam.encode, []

    def encode_until_the_third_batch(model, x):
        calls.append(len(x))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(model, x)

    monkeypatch.setattr(fam, "encode", encode_until_the_third_batch)
    r = encode(vae, tmp_path / "data", tmp_path / "lat")
    assert r.returncode == 2 and one_line(r), r.stderr[-3000:]
    assert "out of memory" in r.stderr and "encode.batch_size=2" in r.stderr and "lower encode.batch_size" in r.stderr
    assert "the shards finished are kept (2 by this run)" in r.stderr
    done = sorted(p.stem for p in (tmp_path / "lat" / RECORDS).glob("*.json"))
    assert done == ["shards-000000", "shards-000001"]
    assert sorted(p.name for p in (tmp_path / "lat").glob("*.tar")) == ["shards-000000.tar", "shards-000001.tar"]
    assert not list((tmp_path / "lat").glob(".*.tmp"))  # no staging file of the shard in flight
    monkeypatch.setattr(fam, "encode", real)
    r = encode(vae, tmp_path / "data", tmp_path / "lat", "encode.batch_size=2")
    assert r.returncode == 0, r.stderr
    assert "(2 already complete)" in r.stdout and read_manifest(tmp_path / "lat")["total"] == 12
