"""One source resolver (pipeline.sources.resolve_sources) for prepare, the training loader, evaluate, encode and
LatentDataset: the same list file means the same sources to each, its relative entries relative to its folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_shards
from pipeline.errors import UserError
from pipeline.sources import resolve_sources


def picked(folder: Path, names: list[str], absolute: Path) -> Path:
    """A list file in `folder`: a comment, a blank line, `names` (relative) and one absolute entry."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# the shards of this run", "", *names, str(absolute)]
    (folder / "picked.txt").write_text("\n".join(lines) + "\n")
    return folder / "picked.txt"


def test_one_list_file_means_the_same_sources_to_all_five_callers(tmp_path, vae, monkeypatch):
    from pipeline.data.loader import make_loader, plan_subset
    from pipeline.data.prepare import list_sources
    from pipeline.latents import LatentDataset
    from pipeline.manifest import read_manifest
    from stages.encode import main as encode

    make_shards(tmp_path / "data", 3, 2, size=(40, 40))
    listed = picked(tmp_path / "lists", ["../data/shard-000001.tar", "../data/shard-000000.tar"],
                    tmp_path / "data" / "shard-000002.tar")
    want = [str(tmp_path / "data" / f"shard-00000{i}.tar") for i in (1, 0, 2)]
    # the working folder has names of its own that a resolver relative to it would take
    (tmp_path / "work" / "lists").mkdir(parents=True)
    make_shards(tmp_path / "work" / "data", 3, 1, size=(40, 40))
    monkeypatch.chdir(tmp_path / "work" / "lists")

    assert resolve_sources(listed) == want
    assert list_sources([str(listed)]) == ("tars", want)  # prepare
    assert make_loader(str(listed), "train", 2, 0, resolution=32).dataset.urls == want  # the training loader
    assert plan_subset(str(listed), 100) == (want, dict.fromkeys(want, 2), 6)  # evaluate
    encode(["--model", str(vae), "--data", str(listed), "--output", str(tmp_path / "latents"), "data.resolution=32",
            "data.num_workers=0", "encode.batch_size=2"])
    m = read_manifest(tmp_path / "latents")
    assert sorted(s["source"] for s in m["shards"]) == sorted(want)  # encode (its manifest in name order)
    # LatentDataset: a list file of latent shards, the same way (relative entries, an absolute one)
    names = [s["name"] for s in m["shards"]]
    latent_list = picked(tmp_path / "latent-lists", [f"../latents/{n}" for n in names[:2]],
                         tmp_path / "latents" / names[2])
    ds = LatentDataset(latent_list, mode="eval")
    assert ds.urls == [str(tmp_path / "latents" / n) for n in names]
    assert ds.folder == tmp_path / "latents" and list(ds.expected.values()) == [2, 2, 2]
    assert sum(1 for _ in ds) == 6
    assert LatentDataset(tmp_path / "latents", mode="eval").urls == [str(tmp_path / "latents" / n) for n in names]


def test_a_list_entry_is_relative_to_the_list_folder_never_the_working_folder(tmp_path, monkeypatch):
    """prepare used to take an entry missing beside its list file from the working folder; every caller now reads
    it beside the list file (and says it is missing there, where it is read)."""
    from pipeline.data.prepare import list_sources

    make_shards(tmp_path / "work", 1, 1, size=(40, 40))  # work/shard-000000.tar
    listed = picked(tmp_path / "lists", ["shard-000000.tar"], tmp_path / "work" / "shard-000000.tar")
    monkeypatch.chdir(tmp_path / "work")
    want = [str(tmp_path / "lists" / "shard-000000.tar"), str(tmp_path / "work" / "shard-000000.tar")]
    assert resolve_sources(listed) == want
    assert list_sources([str(listed)])[1] == want


def test_the_forms_and_their_one_line_refusals(tmp_path):
    paths = make_shards(tmp_path / "d", 3, 1)
    assert resolve_sources(str(tmp_path / "d" / "shard-{000000..000001}.tar")) == paths[:2]
    assert resolve_sources(str(tmp_path / "*" / "shard-00000[12].tar")) == paths[1:]  # wildcards in folder names
    assert resolve_sources([str(tmp_path / "d" / "shard-000002.tar"), str(tmp_path / "d")]) == paths[2:] + paths
    with pytest.raises(UserError, match=r"^shard not found: .*shard-000003.tar$"):
        resolve_sources(str(tmp_path / "d" / "shard-{000003..000004}.tar"))
    with pytest.raises(UserError, match=r"^/nonexistent: no such file or folder$"):
        resolve_sources("/nonexistent")
    (tmp_path / "img.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UserError, match="is an image, not shards"):
        resolve_sources(str(tmp_path / "img.jpg"))
    (tmp_path / "bin.lst").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not a text file listing .tar shards"):
        resolve_sources(str(tmp_path / "bin.lst"))
    (tmp_path / "pipes.txt").write_text("pipe:cat a.tar\n")
    with pytest.raises(UserError, match="a pipe: source runs a shell command"):
        resolve_sources(str(tmp_path / "pipes.txt"))
    assert resolve_sources(str(tmp_path / "pipes.txt"), allow_pipe=True) == ["pipe:cat a.tar"]


def test_a_folder_walk_does_not_follow_links_to_folders(tmp_path):
    """prepare walked an input folder with os.walk, which does not descend into a link to a folder; the one walk of
    the storage interface descended, and a link back up (`sub/up -> ..`) listed every image forty times over (until
    the kernel's link limit), each under another key."""
    from PIL import Image

    from pipeline.data.prepare import list_sources
    from pipeline.storage import storage_for

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("imgs/a.png", "imgs/sub/b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "imgs" / "sub" / "up").symlink_to("..")
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "c.png")
    (tmp_path / "imgs" / "there").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "imgs" / "d.png").symlink_to(tmp_path / "elsewhere" / "c.png")  # a link to a file is a file
    want = [str(tmp_path / n) for n in ("imgs/a.png", "imgs/d.png", "imgs/sub/b.png")]
    assert list(storage_for(str(tmp_path / "imgs")).walk(str(tmp_path / "imgs"))) == want
    kind, items = list_sources([str(tmp_path / "imgs")])
    assert kind == "images" and [(key, src) for _, key, src, _ in items] == [("a", want[0]), ("d", want[1]),
                                                                             ("sub/b", want[2])]


def test_a_pattern_under_the_home_folder(tmp_path, monkeypatch):
    """A quoted `~/...` pattern reaches us unexpanded: prepare expanded it before the one resolver, and a `~` path
    without wildcards still is; a pattern was looked for in a folder named `~` ('shard not found')."""
    from pipeline.data.prepare import list_sources

    paths = make_shards(tmp_path / "d", 3, 1)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_sources("~/d/shard-00000[12].tar") == paths[1:]
    assert resolve_sources("~/d/shard-{000000..000001}.tar") == paths[:2]
    assert list_sources(["~/d/*.tar"]) == ("tars", paths)
    assert resolve_sources("~/d/shard-000000.tar") == paths[:1]


def test_a_folder_of_shards_leaves_its_hidden_files_out(tmp_path):
    """The loader took a folder's shards as glob('*.tar') did, without its hidden files (macOS's `._NAME.tar`
    AppleDouble files beside each copied shard, a tool's `.NAME.tar` partial download); the one resolver listed them
    too, and the loader, evaluate and encode read each as a broken shard."""
    from pipeline.data.loader import make_loader

    paths = make_shards(tmp_path / "d", 2, 1)
    (tmp_path / "d" / "._shard-000000.tar").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 4092)
    (tmp_path / "d" / ".shard-000002.tar").write_bytes(b"partial")
    assert resolve_sources(str(tmp_path / "d")) == paths
    assert make_loader(str(tmp_path / "d"), "train", 1, 0, resolution=32).dataset.urls == paths


def test_a_list_file_written_on_windows(tmp_path):
    """Notepad's UTF-8 starts the file with a byte-order mark and ends lines with CRLF: the first entry was read
    with the mark in its name (a shard that is never found), every caller alike."""
    paths = make_shards(tmp_path / "d", 2, 1)
    (tmp_path / "d" / "picked.txt").write_bytes("\ufeffshard-000000.tar\r\n# a comment\r\n\r\nshard-000001.tar\r\n"
                                                .encode("utf-8"))
    assert resolve_sources(str(tmp_path / "d" / "picked.txt")) == paths


def test_an_empty_list_file_is_refused_in_one_line(tmp_path):
    """A list file with no entry (only comments, or a script that wrote nothing into it): prepare wrote an empty
    dataset from it and said it was done; every caller now refuses it, naming the file."""
    from pipeline.data.prepare import list_sources

    (tmp_path / "picked.txt").write_text("# nothing picked yet\n\n")
    with pytest.raises(UserError, match=r"^.*picked.txt: lists no .tar shards$"):
        resolve_sources(str(tmp_path / "picked.txt"))
    with pytest.raises(UserError, match=r"^--input .*picked.txt: lists no images"):
        list_sources([str(tmp_path / "picked.txt")])


def test_the_working_folder_given_as_dot_spells_its_files_as_before(tmp_path, monkeypatch):
    """`prepare --input .` and `--data .`: the files were spelled `a.png`, `sub/b.png` (os.walk and Path.glob of
    Path('.')); the one listing spelled those directly in it `./a.png` (and those below `sub/b.png`), so prepare's
    fingerprint of a run started before changed and its rerun was refused ('holds shards of another prepare run')."""
    from PIL import Image

    from pipeline.data.prepare import list_sources

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("imgs/a.png", "imgs/sub/b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path / "imgs")
    assert [(key, src) for _, key, src, _ in list_sources(["."])[1]] == [("a", "a.png"), ("sub/b", "sub/b.png")]
    make_shards(tmp_path / "d", 2, 1)
    monkeypatch.chdir(tmp_path / "d")
    assert resolve_sources(".") == ["shard-000000.tar", "shard-000001.tar"]
    assert resolve_sources("*.tar") == ["shard-000000.tar", "shard-000001.tar"]
    assert resolve_sources("shard-{000000..000001}.tar").listed.keys() == {"shard-000000.tar", "shard-000001.tar"}


def test_a_wildcard_does_not_match_a_hidden_name(tmp_path):
    """glob.glob (the loader's and prepare's patterns before the one resolver) leaves names that start with '.' to a
    pattern that starts with '.': `d/*.tar` took macOS's `._shard-000000.tar` and a partial `.shard-000002.tar`
    too, read as broken shards."""
    paths = make_shards(tmp_path / "d", 2, 1)
    (tmp_path / "d" / "._shard-000000.tar").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 4092)
    (tmp_path / "d" / ".shard-000002.tar").write_bytes(b"partial")
    (tmp_path / ".hidden").mkdir()
    make_shards(tmp_path / ".hidden", 1, 1)
    assert resolve_sources(str(tmp_path / "d" / "*.tar")) == paths
    assert resolve_sources(str(tmp_path / "*" / "shard-00000?.tar")) == paths
    assert resolve_sources(str(tmp_path / "d" / "._*.tar")) == [str(tmp_path / "d" / "._shard-000000.tar")]


@pytest.mark.parametrize("name", ["inputs.txt", "shard-000000.tar"])
def test_prepare_refuses_an_input_that_is_a_fifo_in_one_line(tmp_path, name):
    """prepare --input NAMED_PIPE: refused in one line before the one resolver ('a named pipe (FIFO), not a ...');
    since, the pipe was taken for an image (or a tar) that is skipped, and prepare wrote an empty dataset, exit 0.
    Nothing opens it (it would block until a writer came)."""
    import os

    from pipeline.data.prepare import list_sources

    os.mkfifo(tmp_path / name)
    with pytest.raises(UserError, match=rf"^--input {tmp_path / name}: a named pipe \(FIFO\), not a folder, list "
                                        rf"file, image, tar shard or Parquet file$"):
        list_sources([str(tmp_path / name)])


def test_a_folder_this_user_may_not_read(tmp_path, monkeypatch):
    """A data disk's lost+found (root's, mode 700) below prepare's input: os.walk passed over it, the one walk raised
    PermissionError (a traceback); an input folder that cannot be listed at all is one line. The tests run as root,
    whom no mode stops, so the refusal is the kernel's answer injected at os.scandir for those two folders."""
    import errno
    import os

    from PIL import Image

    import pipeline.storage.local as local
    from pipeline.data.prepare import list_sources

    (tmp_path / "disk" / "lost+found").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "disk" / "a.png")
    (tmp_path / "locked").mkdir()
    refused = {str(tmp_path / "disk" / "lost+found"), str(tmp_path / "locked")}
    real = os.scandir

    def scandir(path="."):
        if str(path).rstrip("/") in refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(local.os, "scandir", scandir)
    assert [src for _, _, src, _ in list_sources([str(tmp_path / "disk")])[1]] == [str(tmp_path / "disk" / "a.png")]
    with pytest.raises(UserError, match=rf"^{tmp_path / 'locked'}: cannot list it \(Permission denied\)$"):
        resolve_sources(str(tmp_path / "locked"))
