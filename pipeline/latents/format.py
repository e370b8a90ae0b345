"""The latent shard format: names, per-sample members, what each kind of latent stores (`StoredKind`, the table
`KINDS`), per-shard records (`ShardRecord`), the rerun's plan of which shards are done (`plan_shards`), settings, and
the manifest with its part manifests.

  latents/
    shards-000000.tar          one per input shard, same base name; members per sample (key = the input's __key__):
                                 KEY.latents.safetensors   mean + logvar | mean | sample | codes | latent (+ *_flip)
                                 KEY.json                  original size, crop box, bucket, source shard
                                 KEY.txt, KEY.source.json, ...  the input's other members, byte for byte
    records/shards-000000.json per-shard record: samples, keys checksum, statistics sums, skipped samples
    settings.json              what every shard in the folder was encoded with (model hash, store, dtype, ...)
    manifest.json              all of it summed up, with scaling_factor / shift_factor

docs/latent-format.md is the specification for readers that do not import firststage.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


from pipeline.errors import UserError
from pipeline.manifest import LATENT_FORMAT, MANIFEST, part_name, shard_list
from pipeline.storage import Unit, as_path, atomic_write_json, storage_for

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

LATENT_EXT = "latents.safetensors"
META_EXT = "json"
RECORDS = "records"
SETTINGS = "settings.json"
# the settings that decide what a latent is: a folder never mixes latents that differ in any of them
IDENTITY_KEYS = ("model_sha256", "kind", "store", "dtype", "resolution", "buckets", "flip")


def carried_name(ext: str) -> str:
    """The extension under which an input sample's member is carried into the latent shard. Ours (latents, json)
    always win: an input member of either name, or already named source.*, gets `source.` in front (KEY.json becomes
    KEY.source.json, KEY.source.json KEY.source.source.json), so no two members ever share a name."""
    return f"source.{ext}" if ext in (LATENT_EXT, META_EXT) or ext.startswith("source.") else ext


def shard_unit(folder: str | Path, name: str) -> Unit:
    """Latent shard NAME as a unit of the commit protocol: the tar, then records/STEM.json."""
    return Unit(as_path(folder) / RECORDS / (Path(name).stem + ".json"), [as_path(folder) / name])


def model_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes in name order): the same weights give the same
    hash whether they came from a run folder, a diffusers folder or a single file."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# A latent's safetensors header names at most four tensors (mean, logvar and their flips) in a few hundred bytes; a
# longer one is refused before it is parsed (a header naming 200,000 tensors took seconds to read per sample).
MAX_HEADER_BYTES = 2**16


class BadLatent(ValueError):
    """A latent sample that cannot be read back (its reason goes to the reader's skip count)."""


def read_latent(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a KEY.latents.safetensors member, or BadLatent naming what is wrong: a header longer than the
    member or than MAX_HEADER_BYTES, a tensor name twice (safetensors would keep one silently), a bogus dtype or
    out-of-range offsets."""
    from safetensors.torch import load as load_safetensors

    if len(data) < 8:
        raise BadLatent(f"not a safetensors member ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise BadLatent(f"safetensors header of {size} bytes in a member of {len(data)}")
    if size > MAX_HEADER_BYTES:
        raise BadLatent(f"safetensors header of {size} bytes, over the {MAX_HEADER_BYTES} a latent's few tensors need")

    def unique(pairs):
        out = dict(pairs)
        if len(out) < len(pairs):  # one pass, not a count per name: a header may name 200,000 tensors
            seen = set()
            twice = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
            raise BadLatent(f"tensor {twice[0]} twice in the safetensors header")
        return out

    try:
        json.loads(data[8:8 + size], object_pairs_hook=unique)
        return load_safetensors(data)
    except BadLatent:
        raise
    except Exception as e:  # safetensors' own error (dtype, offsets, shapes), a header that is not JSON
        raise BadLatent(f"unreadable safetensors ({str(e)[:160]})") from None


def keys_checksum(keys: list[str]) -> str:
    """Order-independent checksum of a shard's sample keys (SHA-256 of the sorted keys, newline-joined)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- stored kinds
FLOATS = ("float32", "float16", "bfloat16")  # encode.dtype's


@dataclass(frozen=True)
class StoredKind:
    """What one kind of latent stores per sample (`store` in settings.json and the manifest): its tensor names in
    KEY.latents.safetensors, `of` what the encoder gives (the family's `latent`: posterior, codes or a
    deterministic latent), how a batch of the encoder's Latent becomes the stored tensors (`to_stored`), what
    statistics they give (`moments`, of the latent a reader yields) and how a reader gets its latent back
    (`from_stored`). docs/latent-format.md lists the same table for readers without firststage."""

    name: str
    of: str
    tensors: tuple[str, ...]
    statistics_of: str
    integer: bool = False  # integer codes (VQ, FSQ): never normalised, never checked for NaN
    draws: bool = False  # the reader draws the latent (from_stored's `generator`): moments

    def names(self, flip: bool) -> list[str]:
        """The tensor names of one sample: these, then their `_flip` twins."""
        return [*self.tensors, *(f"{n}_flip" for n in self.tensors)] if flip else list(self.tensors)

    def dtype(self, dtype: str | None, num_codes: int = 0) -> torch.dtype | None:
        """The dtype this kind's tensors are stored in: `dtype` (encode.dtype: FLOATS) for floats, None for another
        name; codes in int16, int32 for a codebook of more than 2**15 codes."""
        import torch

        if self.integer:
            return torch.int16 if num_codes <= 2**15 else torch.int32
        return getattr(torch, dtype) if dtype in FLOATS else None

    def to_stored(self, lat, keys: list[str]) -> dict[str, torch.Tensor]:
        """{tensor name: [B, ...]} of a batch's Latent (float32, or the codes as the quantizer gave them); `keys`
        seed the noise of a drawn sample (one per row)."""
        return {self.tensors[0]: lat.mean.float()}

    def moments(self, lat, stored: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[z], E[z^2]) per position, float64, of the latent a reader yields from the stored (cast) tensors."""
        m = stored[self.tensors[0]].double()
        return m, m * m

    def from_stored(self, tensors: dict, suffix: str = "", sample: bool = True,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """The latent a reader yields from one sample's tensors (`suffix` "_flip": the mirrored image's)."""
        return tensors[self.tensors[0] + suffix].float()

    def check(self, tensors: dict, dtype: str | None) -> None:
        """BadLatent unless a sample's tensors hold this kind's, all of one shape ([C, h, w]; codes [h, w] too),
        each with its `_flip` twin when any has one, floats of `dtype` (a manifest's; any floats when it names none
        of FLOATS) or integer codes."""
        import torch

        absent = [n for n in self.tensors if n not in tensors]
        if absent:
            raise BadLatent(f"no tensor {absent[0]} (a {self.name} latent holds {', '.join(self.tensors)}; it holds "
                            f"{', '.join(sorted(tensors)[:4]) or 'none'})")
        flips = [n for n in tensors if n.endswith("_flip")]
        unpaired = [n for n in tensors if not n.endswith("_flip") and n + "_flip" not in tensors]
        if flips and unpaired:
            raise BadLatent(f"tensor {unpaired[0]} without {unpaired[0]}_flip beside {flips[0]}")
        shapes = {tuple(t.shape) for t in tensors.values()}
        if len(shapes) > 1:
            listed = ", ".join(f"{n} {list(t.shape)}" for n, t in sorted(tensors.items()))
            raise BadLatent(f"tensors of different shapes ({listed})")
        (shape,) = shapes
        if len(shape) not in ((2, 3) if self.integer else (3,)) or 0 in shape:
            raise BadLatent(f"tensors of shape {list(shape)}, not [{'' if self.integer else 'channels, '}height, "
                            f"width]")
        want = self.dtype(dtype)
        for n, t in sorted(tensors.items()):
            if self.integer:
                if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                    raise BadLatent(f"tensor {n} of dtype {str(t.dtype).split('.')[-1]}, not integer codes")
            elif not t.is_floating_point() or want is not None and t.dtype != want:
                raise BadLatent(f"tensor {n} of dtype {str(t.dtype).split('.')[-1]}, the manifest says "
                                f"{dtype or 'a floating-point type'}")


@dataclass(frozen=True)
class _Moments(StoredKind):
    def to_stored(self, lat, keys):
        return {"mean": lat.mean.float(), "logvar": lat.logvar.float()}

    def moments(self, lat, stored):
        m = stored["mean"].double()
        return m, m * m + stored["logvar"].double().exp()  # z ~ N(mean, exp(logvar))

    def from_stored(self, tensors, suffix="", sample=True, generator=None):
        from pipeline.models.posterior import reparameterize

        mean = tensors["mean" + suffix].float()
        return reparameterize(mean, tensors["logvar" + suffix].float(), generator=generator) if sample else mean


@dataclass(frozen=True)
class _Sample(StoredKind):
    def to_stored(self, lat, keys):
        from pipeline.models.posterior import key_noise, reparameterize

        mean = lat.mean.float()
        return {"sample": reparameterize(mean, lat.logvar.float(), key_noise(keys, mean.shape[1:]))}


@dataclass(frozen=True)
class _Codes(StoredKind):
    def to_stored(self, lat, keys):
        return {"codes": lat.codes}

    def moments(self, lat, stored):
        m = lat.mean.float().double()  # the reader yields codes; the statistics are of the quantised latent z_q
        return m, m * m

    def from_stored(self, tensors, suffix="", sample=True, generator=None):
        return tensors["codes" + suffix].long()


MOMENTS = _Moments("moments", "posterior", ("mean", "logvar"),
                   "the latent the reader yields: samples of N(mean, exp(logvar)) (E[z^2] = mean^2 + exp(logvar))",
                   draws=True)
MEAN = StoredKind("mean", "posterior", ("mean",), "the stored mean")
SAMPLE = _Sample("sample", "posterior", ("sample",), "the stored sample")
CODES = _Codes("codes", "codes", ("codes",), "the quantised latent z_q", integer=True)
LATENT = StoredKind("latent", "latent", ("latent",), "the stored latent")
KINDS = {k.name: k for k in (MOMENTS, MEAN, SAMPLE, CODES, LATENT)}


def kind_named(store) -> StoredKind:
    """The StoredKind of a `store` value (settings.json, a manifest); UserError for one firststage never wrote."""
    if store not in KINDS:
        raise UserError(f"latents stored as {store!r}: not a kind firststage writes ({', '.join(KINDS)})")
    return KINDS[store]


def stored_kind(family: str, requested: str) -> StoredKind:
    """What encode stores for a model family (model.kind): its encoder's only kind (codes: VQ, FSQ; the
    deterministic latent: DC-AE, Tiny, RAE), or for a posterior the one encode.store asks (moments, mean, sample)."""
    from pipeline.models.families import family as family_named

    fitting = [k for k in KINDS.values() if k.of == family_named(family).latent]
    return fitting[0] if len(fitting) == 1 else kind_named(requested)


# ---------------------------------------------------------------------------------------------------- settings
def folder_settings(model, cfg, weights, dtype: str, buckets, store: str, tensors: list[str]) -> dict:
    """What every shard of a folder is encoded with: the identity (IDENTITY_KEYS), a description of the model, and
    how the reader normalises (`normalisation`: the model's own, and whether the measured one replaces it).
    `weights`: the pinned pipeline.weights.Weights the model came from."""
    from pipeline.models.families import family_of, plain_config

    fam = family_of(model)
    own = fam.normalisation(model)
    e = cfg.encode
    choice = e.normalisation if e.normalisation != "auto" else "measured" if weights.format == "checkpoint" else "model"
    layout = "" if own.get("patch", 1) == 1 else ", patchified as its normalisation is"
    return {
        "model_sha256": model_sha256(model),
        "kind": fam.name,
        "store": store,
        "tensors": tensors,
        "dtype": dtype,
        "resolution": cfg.data.resolution,
        "buckets": [list(b) for b in buckets] if buckets else None,
        "flip": e.flip,
        "statistics_of": kind_named(store).statistics_of + layout,
        "normalisation": {"use": choice, "model": own, "shift": fam.shift},
        "model": {"class": type(model).__name__, "path": weights.where, "weights": weights.describe(),
                  "config": plain_config(model.config),
                  "scaling_factor": cfg.model.scaling_factor, "shift_factor": cfg.model.shift_factor},
    }


def quick_settings(cfg) -> dict:
    """The identity settings a config decides without the model (kind, store, resolution, buckets, flip, an explicit
    dtype): what check_settings can compare before anything heavy is imported."""
    from pipeline.latents.buckets import resolve_buckets

    e = cfg.encode
    buckets = resolve_buckets(e.buckets, cfg.data.resolution, cfg.model.downsampling_factor)
    quick = {"kind": cfg.model.kind, "store": stored_kind(cfg.model.kind, e.store).name,
             "resolution": cfg.data.resolution,
             "buckets": [list(b) for b in buckets] if buckets else None, "flip": e.flip}
    return {**quick, "dtype": e.dtype} if e.dtype != "auto" else quick


def check_settings(folder: Path, settings: dict, overwrite: bool) -> None:
    """Refuse an output folder that holds latents encoded differently (another model, store, dtype, resolution,
    buckets or flip), naming what differs; --overwrite clears our files from it first. A partial `settings`
    (quick_settings) compares only the keys it has."""
    path = as_path(folder) / SETTINGS
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply to parse
        old = {}
    diff = [k for k in IDENTITY_KEYS if k in settings and old.get(k) != settings.get(k)]
    if not diff:
        return
    if not overwrite:
        what = "; ".join(f"{k} {_short(old.get(k))} there, {_short(settings.get(k))} now" for k in diff)
        raise UserError(f"{folder} holds latents encoded differently ({what}); use another folder or "
                        f"--overwrite to replace them")
    clear_folder(folder)


def _short(v) -> str:
    return v[:12] if isinstance(v, str) and len(v) == 64 else json.dumps(v)


def clear_folder(folder: Path) -> None:
    """Remove what an encode run wrote (shards that have a record, records, settings, manifest); nothing else."""
    folder = as_path(folder)
    for rec in (folder / RECORDS).glob("*.json") if (folder / RECORDS).is_dir() else []:
        shard_unit(folder, rec.stem + ".tar").undo()
    for name in (SETTINGS, MANIFEST):
        (folder / name).unlink(missing_ok=True)
    for p in folder.glob("manifest.part-*-of-*.json"):
        p.unlink(missing_ok=True)


def write_settings(folder: Path, settings: dict, part: int = 0, num_parts: int = 1) -> None:
    """settings.json; a part of N also drops its part manifest of an earlier run (whose shards this run may encode
    again): until this run ends, the other parts see this one as unfinished and merge nothing of it."""
    folder = as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / SETTINGS, settings)
    if num_parts > 1:
        (folder / part_manifest(part, num_parts)).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- records
@dataclass
class ShardRecord:
    """records/NAME.json of a complete latent shard (docs/latent-format.md), and what a part manifest keeps of one
    (`summary`: the fields build_manifest reads). `to_json` writes the keys in the order encode has
    always written them; `from_json` reads a record of any firststage version (a key an older run did not write
    takes its default) and raises ValueError for one that is not a record."""

    name: str
    source: str | None
    samples: int
    keys_sha256: str
    skipped: list = field(default_factory=list)  # {shard, key, reason} of each input sample not written
    renamed: list = field(default_factory=list)  # {shard, key, member, as} of each member carried under another name
    buckets: dict = field(default_factory=dict)  # {"WxH": samples}
    latent_shapes: dict = field(default_factory=dict)  # {"WxH": [C, h, w]}
    stats: dict = field(default_factory=dict)  # {count, sum, sumsq}: per-channel sums of the yielded latent
    input: dict | None = None  # the input shard's size and mtime (or ETag): another input of this name is redone
    inputs: int | None = None  # input samples read
    non_finite: int = 0
    settings: dict = field(default_factory=dict)  # the identity settings (IDENTITY_KEYS) it was encoded with
    files: dict | None = None  # {tar name: {size, sha256[, etag]}} (Unit.files): what Unit.intact compares

    ORDER = ("name", "source", "input", "inputs", "samples", "keys_sha256", "skipped", "renamed", "non_finite",
             "buckets", "latent_shapes", "stats", "settings", "files")
    # what build_manifest reads of a record: a part manifest keeps these of each of its shards' records
    SUMMARY = ("name", "source", "samples", "keys_sha256", "skipped", "renamed", "buckets", "latent_shapes", "stats")

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.ORDER if k != "files" or self.files is not None}

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in self.SUMMARY}

    @classmethod
    def from_json(cls, data) -> ShardRecord:
        if not isinstance(data, dict):
            raise ValueError("a shard record is a JSON object")
        known = {k: data[k] for k in cls.ORDER if k in data}
        absent = [k for k in ("name", "samples", "keys_sha256") if k not in known]
        if absent:
            raise ValueError(f"a shard record without {absent[0]}")
        record = cls(**{"source": None, **known})
        if not isinstance(record.samples, int) or not isinstance(record.skipped, list) or \
                not isinstance(record.stats, dict) or not isinstance(record.settings, dict):
            raise ValueError("a shard record with fields of the wrong type")
        return record



def read_record(unit: Unit, listed: bool = False) -> ShardRecord | None:
    """The record of a done shard unit (Unit.read_record), or None: not done, or a record that is not one."""
    data = unit.read_record(listed=listed)
    try:
        return None if data is None else ShardRecord.from_json(data)
    except ValueError:
        return None


def input_identity(url: str) -> dict | None:
    """What says that an input shard is the one a record was encoded from: its storage's identity of it (locally size
    and modification time, a stat; on object storage size and ETag, one request). None for a `pipe:` source, an
    unknown scheme or a file that cannot be looked at (the shard's path decides then)."""
    if url.startswith("pipe:"):
        return None
    try:
        return storage_for(url).identity(url)
    except UserError:
        return None


def shard_state(folder, name: str, settings: dict, url: str | None,
                listed: dict[str, tuple]) -> tuple[str, ShardRecord | None]:
    """(state, the record read for it: one read, which the run's manifest uses too). The state: 'complete' when the
    shard's unit is done (tar and record), with these settings, from the input shard `url` as it is now, and its tar
    is the one its record describes (Unit.intact: its SHA-256, or its ETag on object storage, from `listed`);
    'changed' when it is done with these settings but from another input (other data under the same shard name, or
    the input was rewritten): a rerun encodes it again; 'undone' when its tar was replaced after its record was
    created (two runs writing it at once): undone here, so that it is written again; else 'todo'. `listed`: the
    folder's listing of complete units (the plan's), so the record is read without asking about it again."""
    unit = shard_unit(folder, name)
    record = read_record(unit, listed=True)
    state = record_state(record, settings, url)
    if state == "complete" and not unit.intact(record.to_json(), listed):
        unit.undo()
        return "undone", None
    return state, record


def shard_intact(folder, name: str) -> bool:
    """Whether shard NAME is done and its tar is the one its record describes (LatentDataset's `verify`)."""
    unit = shard_unit(folder, name)
    record = read_record(unit)
    return record is not None and unit.intact(record.to_json())


def record_state(record: ShardRecord | None, settings: dict, url: str | None) -> str:
    """shard_state of a record already read (None: no done shard), without looking at its tar."""
    if record is None or not same_latents(record, settings):
        return "todo"
    if url is None:
        return "complete"
    had, now = record.input, input_identity(url)
    same = had == now if had is not None and now is not None else record.source == url
    return "complete" if same else "changed"


@dataclass
class Plan:
    """What a run learns of its shards before encoding: `states` {input URL: complete | changed | todo}, `records`
    {input URL: the record of a complete shard} (read once: the run's manifest is built from them, not read again)
    and `had_record`, the output shards that have a record (the encoder undoes those that are not complete; the
    others cost it no request to look at)."""

    states: dict[str, str]
    records: dict[str, ShardRecord]
    had_record: set[str]


def plan_shards(folder, urls: list[str], settings: dict) -> Plan:
    """shard_state of the output shard of every input shard in `urls`, 16 at a time. One listing of records/ and
    one of the folder first (the ETags of the listing stand for the tars: an object store's, locally inode and
    mtime; not when records/ is empty): a shard without a record and a tar is 'todo' without a further look; each
    one with both is read once and its tar checked against it by the listing's ETag (see Unit.intact)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.shards import shard_name

    folder = as_path(folder)
    recorded = _record_stems(folder)
    listed = _listed_tars(folder, recorded) if recorded else {}  # no record: no shard is done, nothing to list
    have = [u for u in urls if Path(shard_name(u)).stem in recorded]
    look = [u for u in have if str(folder / shard_name(u)) in listed]
    with ThreadPoolExecutor(16) as pool:
        found = dict(zip(look, pool.map(lambda u: shard_state(folder, shard_name(u), settings, u, listed), look)))
    states = {u: found.get(u, ("todo", None))[0] for u in urls}
    had = {shard_name(u) for u in have if states[u] != "undone"}
    return Plan({u: "todo" if st == "undone" else st for u, st in states.items()},
                {u: r for u, (st, r) in found.items() if st == "complete"}, had)


def _names(folder) -> list[str]:
    """The names of the files directly in `folder` (a writer's temporaries never among them): one listing."""
    return [path.rsplit("/", 1)[-1] for path in storage_for(str(folder)).entries(str(folder))[0]]


def _record_stems(folder) -> set[str]:
    """The names (without .json) of the records in records/: one listing."""
    return {n[:-5] for n in _names(folder / RECORDS) if n.endswith(".json") and not n.startswith(".")}


def _listed_tars(folder, recorded: set[str] | None = None) -> dict[str, tuple]:
    """{tar path: (size, ETag)} of the shards whose tar and record both exist (two listings; one when the records'
    are given)."""
    records = _record_stems(folder) if recorded is None else recorded
    tars = storage_for(str(folder)).entries(str(folder))[0]
    return {path: entry for path, entry in tars.items() if path.endswith(".tar") and Path(path).stem in records}


def same_latents(record: ShardRecord, settings: dict) -> bool:
    """Whether a shard record was written with the identity settings of `settings` (same model, store, ...)."""
    return all(record.settings.get(k) == settings.get(k) for k in IDENTITY_KEYS)


def read_records(folder: Path, settings: dict) -> list[ShardRecord]:
    """Records of the shards that are complete (tar present) and encoded with `settings`, in name order: a shard
    written with anything else (another model's weights) never enters the manifest; a rerun encodes it again. Two
    listings, then one read per record (a GET on object storage), 16 at a time."""
    folder = as_path(folder)
    return _read_named(folder, [as_path(path).name for path in sorted(_listed_tars(folder))], settings)


# ---------------------------------------------------------------------------------------------------- manifest
def channel_statistics(n: list[float], s: list[float], ss: list[float]) -> dict:
    """Per-channel and overall mean / std from per-channel sums, and the diffusers-convention factors:
    (z - shift_factor) * scaling_factor has zero mean and unit variance."""
    n_all, s_all, ss_all = sum(n), sum(s), sum(ss)
    if n_all == 0:
        return {}
    mean = [si / max(ni, 1) for ni, si in zip(n, s)]
    std = [math.sqrt(max(ssi / max(ni, 1) - m * m, 0.0)) for ni, ssi, m in zip(n, ss, mean)]
    m_all = s_all / n_all
    std_all = math.sqrt(max(ss_all / n_all - m_all * m_all, 0.0))
    return {
        "channel_mean": [round(v, 6) for v in mean],
        "channel_std": [round(v, 6) for v in std],
        "mean": m_all,
        "std": std_all,
        "scaling_factor": 1.0 / std_all if std_all > 0 else None,
        "shift_factor": m_all,
    }


def build_manifest(settings: dict, records: list[ShardRecord], expected: list[str] | None = None,
                   processes: int | None = None) -> dict:
    """Sum the per-shard records up. `expected`: the output shard names the current command asked for (the ones
    without a record are listed as missing)."""
    names = {r.name for r in records}
    # statistics from the records that have them: a shard with no encodable sample has none (no channels)
    measured = [r for r in records if r.stats.get("sum")]
    channels = len(measured[0].stats["sum"]) if measured else 0
    sums = {k: [sum(r.stats[k][c] for r in measured) for c in range(channels)] for k in ("count", "sum", "sumsq")}
    buckets: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for r in records:
        for b, count in r.buckets.items():
            buckets[b] = buckets.get(b, 0) + count
        shapes.update(r.latent_shapes)
    listed = shard_list([r.summary() for r in records], "source", "keys_sha256")
    for shard, r in zip(listed["shards"], records):
        shard["skipped"] = len(r.skipped)
    statistics = channel_statistics(sums["count"], sums["sum"], sums["sumsq"])
    manifest = {
        "format": LATENT_FORMAT,
        "model": settings["model"],
        "model_sha256": settings["model_sha256"],
        "kind": settings["kind"],
        "store": settings["store"],
        "tensors": settings["tensors"],
        "dtype": settings["dtype"],
        "resolution": settings["resolution"],
        "buckets": buckets if settings["buckets"] else None,
        "flip": settings["flip"],
        "latent_shapes": shapes,
        **listed,
        "renamed": [m for r in records for m in r.renamed],
        "statistics": {**statistics, "of": settings["statistics_of"]},
        "normalisation": reader_normalisation(settings, statistics),
        "model_scaling_factor": settings["model"]["scaling_factor"],
        "model_shift_factor": settings["model"]["shift_factor"],
    }
    if expected is not None:
        manifest["missing"] = sorted(set(expected) - names)
    if processes is not None:
        manifest["processes"] = processes
    return manifest


def reader_normalisation(settings: dict, statistics: dict) -> dict | None:
    """The normalisation LatentDataset applies: the model's own, or the one these latents' statistics give (a
    firststage run's: its export writes the same); none for codes."""
    from pipeline.models.normalisation import measured

    norm = settings.get("normalisation")
    if kind_named(settings["store"]).integer or norm is None:
        return None
    if norm["use"] == "measured":
        if not statistics:
            return None
        return measured(norm["model"], statistics, "the statistics of these latents", norm["shift"])
    return norm["model"]


def write_manifest(folder: Path, expected: list[str] | None = None, processes: int | None = None) -> dict:
    """manifest.json from settings.json and every record in the folder, each read once (`--rebuild-manifest`)."""
    folder = as_path(folder)
    settings = _folder_settings(folder)
    manifest = build_manifest(settings, read_records(folder, settings), expected, processes)
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def _folder_settings(folder) -> dict:
    if not (folder / SETTINGS).is_file():
        raise UserError(f"{folder}: no {SETTINGS}; not a firststage latent folder (run firststage encode first)")
    return json.loads((folder / SETTINGS).read_text())


PART_FORMAT = "firststage-latent-part/1"


def part_manifest(part: int, num_parts: int) -> str:
    return part_name("manifest", part, num_parts, ".json")


def finish_manifest(folder, records: list[ShardRecord], expected: list[str], part: int = 0, num_parts: int = 1,
                    processes: int | None = None) -> tuple[dict, bool]:
    """The manifest at the end of a run, from what the run knows (`records`: those its plan read and those it wrote,
    of every process) plus one listing of the folder, never by reading every record again. A whole job (N = 1)
    writes manifest.json. A part of N writes its part manifest (manifest.part-K-of-N.json: its shards' records, as
    build_manifest reads them); the part that finds the part manifests of all N parts merges them into manifest.json
    (two parts that end together both merge the same files). In the merge, a record the listing shows that no part
    knows (another run's, a shard encoded before with other --data) is read, once; a shard no longer complete is
    left out. Returns (the manifest, whether it is the folder's manifest.json): a part that is not the last gets its
    own shards' manifest and leaves manifest.json as it was."""
    folder = as_path(folder)
    settings = _folder_settings(folder)
    identity = {k: settings.get(k) for k in IDENTITY_KEYS}
    known = {r.name: r for r in records}
    if num_parts > 1:
        atomic_write_json(folder / part_manifest(part, num_parts),
                          {"format": PART_FORMAT, "part": part, "num_parts": num_parts, "settings": identity,
                           "records": [known[n].summary() for n in sorted(known)]})
        others = _other_parts(folder, part, num_parts, identity)
        if others is None:
            return build_manifest(settings, [known[n] for n in sorted(known)], expected, processes), False
        known = {**{r.name: r for r in others}, **known}
    complete, stale = _complete_names(folder, num_parts)
    unknown = sorted(complete - known.keys())
    for r in _read_named(folder, unknown, settings):
        known[r.name] = r
    manifest = build_manifest(settings, [known[n] for n in sorted(known) if n in complete], expected,
                              processes)
    atomic_write_json(folder / MANIFEST, manifest)
    for p in stale:  # part manifests of another split (N) of the job, which no live run can be writing: superseded
        p.unlink(missing_ok=True)
    return manifest, True


def _other_parts(folder, part: int, num_parts: int, identity: dict) -> list[ShardRecord] | None:
    """The records of the other parts' manifests, or None while one is missing (that part has not ended): one
    look at each before any is read. A part manifest of other settings counts as missing."""
    paths = [folder / part_manifest(k, num_parts) for k in range(num_parts) if k != part]
    store = storage_for(str(folder))
    if not all(store.object_exists(str(p)) for p in paths):
        return None
    records = []
    for p in paths:
        try:
            data = json.loads(p.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("settings") != identity:
            return None
        try:
            records += [ShardRecord.from_json(r) for r in data.get("records", [])]
        except ValueError:  # not one of ours: that part counts as missing
            return None
    return records


def _complete_names(folder, num_parts: int) -> tuple[set[str], list]:
    """(names of the shards whose tar and record are both there, the part manifests of splits other than N): one
    listing of the folder and one of records/."""
    recorded = _record_stems(folder)
    names = _names(folder)
    complete = {n for n in names if n.endswith(".tar") and n[:-4] in recorded}
    keep = f"-of-{num_parts:05d}.json" if num_parts > 1 else None
    stale = [folder / n for n in names
             if n.startswith("manifest.part-") and n.endswith(".json") and (keep is None or not n.endswith(keep))]
    return complete, stale


def _read_named(folder, names: list[str], settings: dict) -> list[ShardRecord]:
    """The records of shards `names` with these settings, each read once (16 at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    units = [shard_unit(folder, n) for n in names]
    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(lambda unit: read_record(unit, listed=True), units))
    return [r for r in found if r is not None and same_latents(r, settings)]
