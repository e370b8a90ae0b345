"""Manifests, partitions and skip summaries: what image shards (prepare) and latent shards (encode) share; and the
runs that share an output folder (the live locks of other splits, `exclude_other_splits`; the unfinished uploads no
live run owns, `abort_orphan_uploads`).

A manifest is `manifest.json` beside the shards: the shards with their sample counts, the total, and every input
that was skipped with its reason. Image manifests (`firststage-image-shards/1`) are written by prepare, one per part
when a job is split into `--part K/N` partitions and merged afterwards; latent manifests
(`firststage-latent-shards/1`) by encode, with the latent statistics. Both are read here, by `read_manifest`.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Iterable

from pipeline.errors import UserError
from pipeline.storage import as_path, atomic_write_json, read_json

MANIFEST = "manifest.json"
IMAGE_FORMAT = "firststage-image-shards/1"
LATENT_FORMAT = "firststage-latent-shards/1"


def read_manifest(path: str | Path, format: str | None = None) -> dict:
    """A manifest from its file, or from the folder that holds it. `format`: the one expected (latent manifests
    must say theirs; image manifests of older runs may not)."""
    p = as_path(path)
    p = p / MANIFEST if p.is_dir() else p
    what = "latent manifest" if format == LATENT_FORMAT else "manifest"
    data = read_json(p, what)
    found = data.get("format")
    if format is not None and found != format and not (format == IMAGE_FORMAT and found is None):  # older runs
        raise UserError(f"{p}: not a firststage {what} (format {data.get('format')!r}, expected {format})")
    if not isinstance(data.get("shards"), list):
        raise UserError(f"{p}: not a firststage manifest (no 'shards' list)")
    return data


def shard_list(records: list[dict], *fields: str) -> dict:
    """The part every manifest shares, from per-shard records: the shards (name, samples and `fields`), the total,
    and the skipped inputs with their count."""
    skipped = [s for r in records for s in r["skipped"]]
    return {"shards": [{"name": r["name"], "samples": r["samples"], **{f: r[f] for f in fields}} for r in records],
            "total": sum(r["samples"] for r in records),
            "skipped_count": len(skipped),
            "skipped": skipped}


def summarize_skips(skipped: list[dict], top: int | None = None) -> str:
    """'3 not an image, 1 too small': the reasons without their details, most common first."""
    reasons = Counter(s["reason"].split(" (")[0] for s in skipped)
    return ", ".join(f"{n} {r}" for r, n in reasons.most_common(top))


# ------------------------------------------------------------------------------------------------ partitions
MAX_PARTS = 99_999  # part names carry K and N in five digits; more parts than that is a typo, not a job


def parse_part(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N <= MAX_PARTS."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"must be K/N with 0 <= K < N (e.g. 3/16), got {text!r}")
    if int(m.group(2)) > MAX_PARTS:  # encode deals shards to N slots: 10**20 of them never fit in memory
        raise UserError(f"must be K/N with N at most {MAX_PARTS}, got {text.strip()!r}")
    return int(m.group(1)), int(m.group(2))


def part_name(stem: str, part: int, num_parts: int, ext: str = "") -> str:
    """A per-job file's name: `STEM` + ext for a whole job, `STEM.part-KKKKK-of-NNNNN` + ext for one of N parts
    (manifests, prepare's fingerprints, the output folder's lock)."""
    return f"{stem}{ext}" if num_parts == 1 else f"{stem}.part-{part:05d}-of-{num_parts:05d}{ext}"


def deal(items: list[str], counts: dict[str, int] | None, slots: int) -> list[list[str]]:
    """Deal shards to `slots` workers deterministically: balanced by sample count when the counts are known (largest
    first to the least loaded slot, the lowest slot among equals; a heap of the slots' loads: O(N log slots)), else
    round-robin. Each list keeps the input order."""
    import heapq

    if not counts:
        return [items[i::slots] for i in range(slots)]
    heap = [(0, k) for k in range(slots)]  # (load, slot): already a heap
    dealt: list[list[int]] = [[] for _ in range(slots)]
    order = sorted(range(len(items)), key=lambda i: (-counts.get(items[i], 0), i))
    for i in order:
        load, j = heap[0]
        dealt[j].append(i)
        heapq.heapreplace(heap, (load + max(1, counts.get(items[i], 0)), j))
    return [[items[i] for i in sorted(d)] for d in dealt]


def share(items: list[str], counts: dict[str, int] | None, part: int, num_parts: int, rank: int,
          ranks: int) -> tuple[list[str], list[str]]:
    """(the shards of part K of N, this rank's share of them): the parts are dealt first, then each part among its
    ranks, so that which shards a part holds does not depend on how many processes run it (its part manifest covers
    the same shards whatever the launcher)."""
    mine = deal(items, counts, num_parts)[part]
    return mine, deal(mine, counts, ranks)[rank]


# ------------------------------------------------------------------------------------- runs sharing a folder
_LOCK = re.compile(r"\.lock(?:\.part-(\d+)-of-(\d+))?")


def lock_split(name: str) -> int | None:
    """The N of a stage's lock object: 1 for a whole job's `.lock`, N for `.lock.part-K-of-N`; None for another
    name."""
    m = _LOCK.fullmatch(name)
    return None if m is None else int(m.group(2) or 1)


def live_locks(folder, skip: str | None = None) -> dict[str, dict]:
    """{lock name: holder} of the locks in `folder` (all but `skip`) whose runs may still be alive: the stages'
    (`.lock`, `.lock.part-K-of-N`) and exports' (`.NAME.lock`, beside their output)."""
    from pipeline.storage import folder_lock, storage_for

    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in storage_for(str(folder)).list(str(folder), prefix=".")]
    holders = {n: folder_lock(folder, n).live_holder() for n in names
               if n != skip and (n.startswith(".") and n.endswith(".lock") or lock_split(n) is not None)}
    return {n: h for n, h in holders.items() if h is not None}


def exclude_other_splits(lock) -> dict[str, dict]:
    """Release `lock` (a stage's, just taken) and refuse in one line while a run of another split of the job holds
    a lock on the same folder: a whole job (`.lock`) and its `--part` runs, or parts of different N, deal the shards
    differently and would write one shard at once (the parts of one N write disjoint shards, and share the folder).
    Two such runs that take their locks in the same moment may both be refused, never both let in: run one again.
    Returns the other live locks of the folder."""
    name = lock.path.rstrip("/").rsplit("/", 1)[-1]
    live = live_locks(lock.folder, skip=name)
    clash = next((n for n in live if lock_split(n) not in (None, lock_split(name))), None)
    if clash is None:
        return live
    lock.release()
    holder, split = live[clash], "the whole job" if lock_split(clash) == 1 else f"--part K/{lock_split(clash)}"
    raise UserError(f"{lock.what} {lock.label} is being written by {split} (pid {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('started')}; {lock.store.join(lock.folder, clash)}), "
                    f"which writes the same shards as {'the whole job' if lock_split(name) == 1 else 'this part'}: "
                    f"wait for it to end, or remove that file if the run is gone")


CLOCK_SKEW_S = 10.0  # what abort_orphan_uploads allows between the store's clock and a lock holder's


def abort_orphan_uploads(folder, live: dict[str, dict]) -> int:
    """Abort, at once, the multipart uploads under an object-store folder that no live run can own: what runs
    killed mid-upload left (invisible, but stored and billed). For the holder of the folder's lock, with the other
    live locks there (`live`: exclude_other_splits). The rule: a run starts its uploads after it took its lock
    (`since`), so an upload started before every live lock that covers its key was taken (less CLOCK_SKEW_S for the
    clocks, the store's and the holders') is nobody's; the locks that cover a key are those in `folder` and in each
    folder between it and the key (another output folder inside this one). With no live lock around it an upload is
    aborted whatever its age; one started over an hour ago is aborted in any case (the rule before, and all there is
    for a live lock without `since`, an older firststage's). Returns how many were aborted; 0 locally."""
    from pipeline.storage import storage_for

    store, root = storage_for(str(folder)), str(folder).rstrip("/")
    uploads = store.uploads(root)
    if not uploads:
        return 0
    covering = {root: live}

    def cutoff(url: str) -> float:
        starts, sub = [], root
        for name in [""] + url[len(root) + 1:].split("/")[:-1]:
            sub = f"{sub}/{name}" if name else sub
            if sub not in covering:
                covering[sub] = live_locks(sub)
            starts += [h.get("since") for h in covering[sub].values()]
        if any(not isinstance(s, (int, float)) for s in starts):
            return time.time() - 3600
        return max(min(starts) - CLOCK_SKEW_S, time.time() - 3600) if starts else math.inf

    orphans = [(url, upload_id) for url, upload_id, started in uploads if started < cutoff(url)]
    for url, upload_id in orphans:
        store.abort_upload(url, upload_id)
    return len(orphans)


# ------------------------------------------------------------------------------- image manifests of parts
def part_manifests(folder: str | Path) -> list[Path]:
    return sorted(as_path(folder).glob("manifest.part-*-of-*.json"))


def merge_manifests(folder: str | Path, write: bool = True) -> dict:
    """Join the part manifests of a `--part K/N` prepare job into one manifest.json; every part must be present."""
    folder = as_path(folder)
    parts = part_manifests(folder)
    if not parts:
        raise UserError(f"no part manifests (manifest.part-K-of-N.json) in {folder}")
    manifests = [read_manifest(p) for p in parts]
    counts = {m.get("num_parts") for m in manifests}
    if len(counts) != 1:
        raise UserError(f"{folder}: part manifests disagree on the number of parts: {sorted(map(str, counts))}")
    (num_parts,) = counts
    have = {m.get("part") for m in manifests}
    missing = sorted(set(range(num_parts)) - have)
    if missing:
        raise UserError(f"{folder}: parts {missing} of {num_parts} have no manifest yet (not finished?)")
    merged = combine_manifests(manifests)
    merged["parts"] = num_parts
    if write:
        atomic_write_json(folder / MANIFEST, merged)
    return merged


def combine_manifests(manifests: Iterable[dict]) -> dict:
    manifests = list(manifests)
    out = {k: v for k, v in manifests[0].items() if k not in ("part", "num_parts")}
    out["shards"] = [s for m in manifests for s in m["shards"]]
    out["total"] = sum(s["samples"] for s in out["shards"])
    out["skipped"] = [s for m in manifests for s in m.get("skipped", [])]
    out["skipped_count"] = len(out["skipped"])
    out["inputs"] = sum(m.get("inputs", 0) for m in manifests)
    sizes: Counter = Counter()
    for m in manifests:
        sizes.update(m.get("output_sizes", {}))
    out["output_sizes"] = dict(sizes.most_common())
    shorter = [m["input_shorter_side"] for m in manifests if m.get("input_shorter_side")]
    if shorter:
        out["input_shorter_side"] = {"min": min(s["min"] for s in shorter), "max": max(s["max"] for s in shorter)}
    return out
