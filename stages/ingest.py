"""ingest: real media (folders with optional JSONL manifests, webdataset shards, text, synthetic) ->
webdataset shards with stable keys and a deterministic train/val/test split (and pool, ingest.split.pool).

RUN/ingest/shards/<modality>/<source>-<nnnnnn>.tar, each sample: `<key>.<ext>` (the media bytes as found)
and `<key>.json` ({key, modality, split, reference, source, file, meta}).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np

from pipeline.config import added_later, minimum, path_field
from pipeline.errors import BadInput, UserError
from pipeline.graph import StageContext, register_stage
from pipeline.registry import modality_adapter, modality_registry
from pipeline.sharded import Unit, UnitResult, run_units, units_progress
from pipeline.shards import command_scheme, expand_urls, iter_shard, reject_record

# ------------------------------------------------------------------------------------------------------ config
@dataclass
class SourceConfig:
    type: Optional[str] = None  # folder | shards | text | synthetic; folder when `dir` is given
    modality: Optional[str] = None  # a registered modality (audio, image, text, ...); shards may mix them
    name: Optional[str] = None  # a name for the source (required for evaluate.sources)
    dir: Optional[str] = field(default=None, metadata=path_field())  # folder source: the media folder (relative: from the config file's folder)
    manifest: Optional[str] = None  # folder source: JSONL in `dir` naming each file and its reference
    urls: Optional[str] = field(default=None, metadata=path_field("location"))  # shards source: path or URL with brace expansion, e.g. data-{000..099}.tar
    allow_pipe: bool = False  # shards source: allow webdataset `pipe:` URLs (they run a shell command)
    limit: Optional[int] = field(default=None, metadata=minimum(1))  # take at most this many items (sorted order)
    count: int = field(default=32, metadata=minimum(1))  # synthetic source: number of samples
    references_are_labels: bool = False  # use the manifest's text as the training label instead of the teacher's
    # the manifest (or shard json) field whose value decides a sample's split instead of its bytes, e.g. speaker:
    # every clip of one speaker lands in one split. Unset: the split follows a hash of the sample's bytes.
    split_key: Optional[str] = None
    # every input of this source lands in this split (train | pool | val | test) in place of the hash's: e.g. more
    # real inputs held back for the adversarial phase alone (pool), or a source kept for evaluation (test)
    split: Optional[str] = field(default=None, metadata=added_later())


SPLITS = ("train", "pool", "val", "test")


def holds_pool(root) -> bool:
    """Whether ingest puts any input in the pool: a fraction of every source, or a source of its own."""
    return root.ingest.split.pool > 0 or any(s.split == "pool" for s in root.ingest.sources)


@dataclass
class SplitConfig:
    train: float = field(default=0.8, metadata=minimum(0.0))  # fraction of samples, by a hash of their bytes
    val: float = field(default=0.1, metadata=minimum(0.0))
    test: float = field(default=0.1, metadata=minimum(0.0))
    # real inputs held back from distill: the teacher labels them (filtered as train), distill trains on them
    # only if distill.inputs names pool, and adversarial.inputs can: inputs the distilled student has never
    # seen, where its free-running failures (repetition loops) happen. Taken from the top of train's range.
    pool: float = field(default=0.0, metadata=minimum(0.0))


@dataclass
class IngestConfig:
    sources: List[SourceConfig] = field(default_factory=list)  # where the real data comes from
    split: SplitConfig = field(default_factory=SplitConfig)  # deterministic train/val/test split by content hash
    samples_per_shard: int = field(default=64, metadata=minimum(1))  # samples per output webdataset shard
    max_reject_fraction: float = field(default=0.2, metadata=minimum(0.0))  # fail (exit 2) past this fraction of bad inputs
    # memory per input, whatever it claims: a file or shard member over max_member_mb is refused from its size
    # (a tar header's, before a byte is read), and a shard stops reading past max_shard_mb of members
    max_member_mb: float = field(default=512.0, metadata=minimum(0.001))
    max_shard_mb: float = field(default=2048.0, metadata=minimum(0.001))


def check_sources(sources: List[SourceConfig], where: str, need_name: bool) -> None:
    """Each source's type, folder, manifest, URLs and modality; `need_name`: each must have a name (evaluate's)."""
    for i, s in enumerate(sources):
        p = f"{where}[{i}]"
        if s.type is None:
            s.type = "folder" if s.dir else ("shards" if s.urls else None)
        if s.type not in ("folder", "shards", "text", "synthetic"):
            raise UserError(f"config: '{p}.type' must be folder, shards, text or synthetic (got {s.type!r})")
        if s.type in ("folder", "text") and not s.dir:
            raise UserError(f"config: '{p}' is a {s.type} source without 'dir'")
        if s.type in ("folder", "text") and not Path(s.dir).exists():
            raise UserError(f"config: '{p}.dir': data folder not found: {s.dir}")
        if s.manifest and s.dir and not (Path(s.dir) / s.manifest).is_file():
            raise UserError(f"config: '{p}.manifest': file not found: {Path(s.dir) / s.manifest}")
        if s.type == "shards" and not s.urls:
            raise UserError(f"config: '{p}' is a shards source without 'urls'")
        if s.type == "shards" and not s.allow_pipe:
            scheme = command_scheme(s.urls)
            if scheme == "pipe":
                raise UserError(f"config: '{p}.urls' is a pipe: URL, which runs a shell command; set allow_pipe: true to allow it")
            if scheme:
                raise UserError(f"config: '{p}.urls' is a {scheme}: URL, which webdataset reads by starting a program "
                                "(curl, gsutil, ...); set allow_pipe: true to allow it")
        if s.type == "text" and s.modality is None:
            s.modality = "text"
        if s.type != "shards" and not s.modality:
            raise UserError(f"config: '{p}' needs 'modality' (one of {', '.join(modality_registry.names())})")
        if s.modality:
            modality_registry.get(s.modality)
        if need_name and not s.name:
            raise UserError(f"config: '{p}' needs a 'name' (it names the set in the report)")


def validate_config(root) -> list[str]:
    """The split, every source; each source's modality gets its adapter's default section if the config has none."""
    sp = root.ingest.split
    for name in ("train", "pool", "val", "test"):
        if not 0.0 <= getattr(sp, name) <= 1.0:
            raise UserError(f"config: 'ingest.split.{name}' must be in [0, 1], got {getattr(sp, name)}")
    if abs(sp.train + sp.pool + sp.val + sp.test - 1.0) > 1e-6:
        raise UserError("config: 'ingest.split' fractions must add up to 1")
    check_sources(root.ingest.sources, "ingest.sources", need_name=False)
    for i, s in enumerate(root.ingest.sources):
        if s.split is not None and s.split not in SPLITS:
            raise UserError(f"config: 'ingest.sources[{i}].split' must be one of {', '.join(SPLITS)}, got {s.split!r}")
        if s.split is not None and s.split_key:
            raise UserError(f"config: 'ingest.sources[{i}]' has both 'split' (every input in one split) and "
                            "'split_key' (the split by a field); give one")
        if s.modality and s.modality not in root.modalities:
            root.modalities[s.modality] = modality_registry.get(s.modality).Config()
    return []



_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class Item:
    """One input before decoding."""

    key: str
    modality: str
    source: str
    file: str | None = None  # where it came from (a path, or url:key)
    data: bytes | None = None  # media bytes, when already in memory (shards, synthetic)
    ext: str | None = None
    reference: str | None = None
    meta: dict = field(default_factory=dict)
    reference_is_label: bool = False  # the source says its references are training labels
    alias: str | None = None  # how the source named the file where that is not its own path (a link, `x/../`)
    split_key: str | None = None  # its source's split_key
    split: str | None = None  # its source's split (every input of the source in it)


def split_of(basis: str, fractions) -> str:
    """train / pool / val / test from a hash of `basis` (a sample's content digest, or the value of the field
    its source names in `split_key`): stable across runs, machines, process counts, source names and keys. The
    pool is the top of train's range, so moving a fraction from train to pool leaves val and test as they were."""
    u = int(hashlib.sha256(basis.encode()).hexdigest()[:12], 16) / float(16**12)
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.pool:
        return "pool"
    if u < fractions.train + fractions.pool + fractions.val:
        return "val"
    return "test"


def split_basis(item: Item, data: bytes, split_key: str | None) -> str | None:
    """What a sample's split is a hash of: its bytes' sha256, or `split_key`'s value in its manifest line / shard
    json (None when that field is missing or not a string or number: the sample is refused)."""
    if not split_key:
        return "sha256:" + hashlib.sha256(data).hexdigest()
    v = item.meta.get(split_key)
    if isinstance(v, bool) or not isinstance(v, (str, int, float)) or v == "":
        return None
    return f"{split_key}={v}"


def duplicates(units: list, read: Callable[[Any], Any]) -> dict[str, str]:
    """key -> the key it duplicates, over every input of every unit: identical bytes of one modality are one
    sample, kept under the first key in sorted order (the rest are refused), so one recording never sits in two
    splits. `read(unit)` yields (key, modality, bytes or None) for a unit's inputs (None: unreadable, left to the
    unit's own pass; empty inputs too, each refused for what it is)."""
    first: dict[tuple[str, str], str] = {}
    digests: list[tuple[str, tuple[str, str]]] = []
    for u in units:
        for key, modality, data in read(u):
            if data:
                digests.append((key, (modality, hashlib.sha256(data).hexdigest())))
    out = {}
    for key, d in sorted(digests):
        if d in first:
            out[key] = first[d]
        else:
            first[d] = key
    return out


def make_key(source: str, rel: str) -> str:
    stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
    return f"{_UNSAFE.sub('_', source)}-{_UNSAFE.sub('_', stem).strip('_')}"


def source_name(src, i: int) -> str:
    if src.name:
        return src.name
    if src.dir:
        return Path(src.dir).name or f"source{i}"
    return f"{src.type}{i}"


def _inside(base: Path, rel: str) -> Path | None:
    """The file `rel` under `base`, or None if the path would leave it (../, absolute paths, links out)."""
    p = (base / rel).resolve()
    try:
        p.relative_to(base.resolve())
    except ValueError:
        return None
    return p


def list_folder(src, name: str, seed: int) -> tuple[list[Item], list[dict]]:
    """Items of a folder (or text) source and the refusals found while reading its manifest."""
    adapter = modality_registry.get(src.modality)
    base = Path(src.dir)
    root = base.resolve()
    items, rejects = [], []
    if src.manifest:
        mpath = base / src.manifest
        for lineno, raw in enumerate(mpath.read_bytes().splitlines(), 1):
            where = f"{mpath}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                rejects.append({"key": where, "reason": "manifest line is not UTF-8"})
                continue
            if not line.strip():
                rejects.append({"key": where, "reason": "manifest line is empty"})
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rejects.append({"key": where, "reason": f"manifest line is not JSON: {e.msg}"})
                continue
            except RecursionError:  # a line of "[[[[..." nests deeper than the parser's recursion limit
                rejects.append({"key": where, "reason": "manifest line is not JSON: nested too deeply"})
                continue
            if not isinstance(rec, dict):
                rejects.append({"key": where, "reason": "manifest line is not a JSON object"})
                continue
            ref = rec.get(adapter.reference_field)
            if ref is not None and not isinstance(ref, str):
                rejects.append({"key": where, "reason": f"manifest line's '{adapter.reference_field}' is not a string "
                                                        f"({type(ref).__name__})"})
                continue
            if src.modality == "text" and adapter.manifest_field not in rec:
                # A JSONL of texts: the text is the sample itself.
                if not isinstance(ref, str):
                    rejects.append({"key": where, "reason": "text manifest line has no 'text' string"})
                    continue
                items.append(Item(make_key(name, f"line{lineno:07d}"), "text", name, where, ref.encode(), "txt", ref))
                continue
            rel = rec.get(adapter.manifest_field)
            if not isinstance(rel, str) or not rel:
                rejects.append({"key": where, "reason": f"manifest line has no '{adapter.manifest_field}' file name"})
                continue
            path = _inside(base, rel)
            if path is None:
                rejects.append({"key": where, "reason": f"file {rel!r} is outside {base}"})
                continue
            if not path.is_file():
                rejects.append({"key": where, "reason": f"missing file: {rel}"})
                continue
            meta = {k: v for k, v in rec.items() if k not in (adapter.manifest_field, adapter.reference_field)}
            # the key comes from where the file is, not how the line spells it: `x/../a.wav` and `a.wav` are one
            real_rel = path.relative_to(root).as_posix()
            items.append(Item(make_key(name, real_rel), src.modality, name, str(path), None,
                              path.suffix.lstrip(".").lower(), ref, meta, alias=None if real_rel == rel else f"{where}: {rel}"))
    else:
        exts = set(adapter.extensions)
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.suffix.lstrip(".").lower() in exts:
                rel = path.relative_to(base).as_posix()
                real = _inside(base, rel)
                if real is None:  # a link that leaves the folder: refused, as a manifest line naming it is
                    rejects.append({"key": f"{base}/{rel}", "file": str(path),
                                    "reason": f"file {rel!r} is a link to outside {base}"})
                    continue
                meta = {"folder": path.parent.relative_to(base).as_posix()} if path.parent != base else {}
                real_rel = real.relative_to(root).as_posix()
                items.append(Item(make_key(name, real_rel), src.modality, name, str(path), None,
                                  path.suffix.lstrip(".").lower(), None, meta, alias=None if real_rel == rel else rel))
    # One key per file: where two names reach one file (a link inside the folder, `x/../a.wav`), the file's own
    # name keeps the key and the other is refused; between two files, the first in listing order keeps it.
    items.sort(key=lambda it: (it.key, it.alias is not None))
    seen, unique = set(), []
    for it in items:
        if it.key in seen:
            named = f" named as {it.alias}" if it.alias else ""
            rejects.append({"key": it.key, "file": it.file, "reason": f"duplicate key (file {it.file}{named}): another "
                                                                      "file, or another name of the same file, has it"})
            continue
        seen.add(it.key)
        unique.append(it)
    return unique, rejects


def list_synthetic(src, name: str, seed: int) -> list[Item]:
    adapter = modality_registry.get(src.modality)
    m = adapter(None)
    rng = np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])
    out = []
    for i in range(src.count):
        data, ext, ref = m.synthesize(i, rng)
        out.append(Item(make_key(name, f"{i:06d}"), src.modality, name, f"synthetic:{i}", data, ext, ref))
    return out


def _claiming(ext: str) -> str | None:
    for name, adapter in modality_registry.items():
        if ext in adapter.extensions:
            return name
    return None


# Shard members that hold a sample's reference beside its media (webdataset's habit): a transcript, a class.
REFERENCE_MEMBERS = ("txt", "cls")


def read_shard_items(url: str, src, name: str, rejects: list[dict], caps: dict | None = None,
                     ignored: dict[str, int] | None = None) -> list[Item]:
    """The samples of one shard: each key's media member (the first of a registered modality's types; a `.txt`
    beside media of another modality is that sample's reference, as is a `.cls`), its reference (the `.json`
    member's `reference`, `text` or `category`, else the `.txt` / `.cls` member) and meta. `ignored` counts, by
    extension, the members no modality reads and that hold no reference (they are reported, never copied on).
    caps: iter_shard's size limits (default: ingest's)."""
    if caps is None:
        d = IngestConfig()
        caps = {"max_member_bytes": int(d.max_member_mb * (1 << 20)), "max_shard_bytes": int(d.max_shard_mb * (1 << 20))}
    items = []
    first: dict[str, str] = {}  # key -> the shard sample that took it
    members_of = iter_shard(url, src.allow_pipe, on_error=lambda k, r, lost=1: rejects.append(reject_record(k, r, lost)),
                            **caps)
    for key, members in members_of:
        where = f"{url}:{key}"
        meta = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    meta = {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                rejects.append({"key": where, "reason": "sample json is not valid UTF-8 JSON"})
                continue
            except RecursionError:
                rejects.append({"key": where, "reason": "sample json is nested too deeply"})
                continue
        modality = src.modality or meta.get("modality")
        media = None
        # media of a modality first: a .txt beside a .wav is the clip's transcript, not a text sample
        exts = sorted((e for e in members if e != "json"), key=lambda e: e.lower() in REFERENCE_MEMBERS)
        for ext in exts:
            claimed = _claiming(ext.lower())
            if claimed and (modality is None or claimed == modality):
                media, modality = (ext.lower(), members[ext]), claimed
                break
        if media is None:
            rejects.append({"key": where, "reason": f"no media member of a known modality ({', '.join(members)})"})
            continue
        ref = meta.get("reference", meta.get("text", meta.get("category")))
        used = {"json", media[0]}
        for ext in REFERENCE_MEMBERS:
            if ext in members and ext != media[0]:
                used.add(ext)
                if ref is None:
                    try:
                        ref = members[ext].decode("utf-8").strip()
                    except UnicodeDecodeError:
                        ref = False  # refused below
        if ref is False:
            rejects.append({"key": where, "reason": "the reference member (.txt / .cls) is not UTF-8"})
            continue
        for ext in members:
            if ext not in used and ignored is not None:
                ignored[ext.lower()] = ignored.get(ext.lower(), 0) + 1
        if ref is not None and not isinstance(ref, str):
            rejects.append({"key": where, "reason": f"sample json's reference is not a string ({type(ref).__name__})"})
            continue
        base_key = key.rsplit("/", 1)[-1]
        item_key = make_key(name, base_key)
        if item_key in first:  # `a/x` and `b/x` in one shard: the key is the last path part
            rejects.append({"key": where, "reason": f"duplicate key {item_key}: sample {first[item_key]!r} of the "
                                                    "same shard has it"})
            continue
        first[item_key] = key
        items.append(Item(item_key, modality, name, where, media[1], media[0], ref,
                          {k: v for k, v in meta.items() if k not in ("reference", "text", "category")}))
    return items


def _read_capped(it: Item, max_bytes: int) -> bytes | None:
    """An input's bytes, or None where the unit's own pass will refuse it (unreadable, over the size cap)."""
    if it.data is not None:
        return it.data
    try:
        return None if Path(it.file).stat().st_size > max_bytes else Path(it.file).read_bytes()
    except OSError:
        return None


# version 2: splits by content (a run made before re-runs ingest, its earlier work kept)
@register_stage("ingest", uses_modalities="decode", progress=lambda d, cfg: units_progress(d), version=2,
                config_class=IngestConfig, validate=validate_config, order=10,
                description="real media (folders + manifests, webdataset shards, text, synthetic) -> split shards")
def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    seed = ctx.cfg.root.seed
    if not cfg.sources:
        raise UserError("ingest.sources is empty: name at least one data folder, shards URL or text source")
    adapters = {}

    def adapter(m):
        if m not in adapters:
            adapters[m] = modality_adapter(ctx.cfg.root, m)
        return adapters[m]

    caps = {"max_member_bytes": int(cfg.max_member_mb * (1 << 20)), "max_shard_bytes": int(cfg.max_shard_mb * (1 << 20))}
    units: list[Unit] = []
    pre_rejects: list[dict] = []
    n = cfg.samples_per_shard
    for i, src in enumerate(cfg.sources):
        name = source_name(src, i)
        if src.type == "shards":
            for j, url in enumerate(expand_urls(src.urls)):
                units.append(Unit(f"{_UNSAFE.sub('_', name)}-{j:06d}", ("shard", url, src, name)))
            continue
        if src.type in ("folder", "text"):
            items, rej = list_folder(src, name, seed)
            pre_rejects.extend(rej)
        else:
            items = list_synthetic(src, name, seed)
        if src.limit:
            items = items[: src.limit]
        for it in items:
            it.reference_is_label = bool(src.references_are_labels and it.reference)
            it.split_key, it.split = src.split_key, src.split
        for j in range(0, len(items), n):
            units.append(Unit(f"{_UNSAFE.sub('_', name)}-{j // n:06d}", ("items", items[j: j + n], None, name)))

    def unit_items(unit: Unit, rejects: list[dict], ignored: dict[str, int] | None = None) -> list[Item]:
        kind, payload, src, name = unit.payload
        return read_shard_items(payload, src, name, rejects, caps, ignored) if kind == "shard" else payload

    def contents(unit: Unit):
        for it in unit_items(unit, []):
            yield it.key, it.modality, _read_capped(it, caps["max_member_bytes"])

    if ctx.dist.is_main:
        print(f"ingest: hashing the inputs of {len(units)} shard(s) for their splits and duplicates")
    dup_of = duplicates(units, contents)

    def process(unit: Unit) -> UnitResult:
        kind, payload, src, name = unit.payload
        res = UnitResult()
        if kind == "shard":
            ignored: dict[str, int] = {}
            items = unit_items(unit, res.rejects, ignored)
            for it in items:
                it.split_key, it.split = src.split_key, src.split
            items.sort(key=lambda it: it.key)
            if ignored:
                res.logs["ignored_members"] = [{"shard": payload, "extension": e, "members": n} for e, n in sorted(ignored.items())]
                res.counts["ignored_members"] = sum(ignored.values())
        else:
            items = payload
        by_mod: dict[str, list[dict]] = {}
        for it in items:
            if it.key in dup_of:
                res.rejects.append({"key": it.key, "file": it.file, "reason": f"duplicate of {dup_of[it.key]} (the same "
                                    "bytes: kept once, under the first key in sorted order)"})
                continue
            try:
                if it.data is None and Path(it.file).stat().st_size > caps["max_member_bytes"]:
                    res.rejects.append({"key": it.key, "file": it.file, "reason": f"file is {Path(it.file).stat().st_size} "
                                        f"bytes, more than ingest.max_member_mb={cfg.max_member_mb:g} MB (unread)"})
                    continue
                data = it.data if it.data is not None else Path(it.file).read_bytes()
            except (OSError, MemoryError) as e:
                why = e.strerror or e if isinstance(e, OSError) else "out of memory"
                res.rejects.append({"key": it.key, "file": it.file, "reason": f"unreadable: {why}"})
                continue
            try:
                adapter(it.modality).decode(data, it.ext)
            except BadInput as e:
                res.rejects.append({"key": it.key, "file": it.file, "reason": e.reason})
                continue
            except Exception as e:  # a decoder bug on one file must not stop a long stage
                res.rejects.append({"key": it.key, "file": it.file, "reason": f"decode failed: {e.__class__.__name__}: {e}"})
                continue
            basis = split_basis(it, data, it.split_key)
            if basis is None:
                res.rejects.append({"key": it.key, "file": it.file, "reason": f"no {it.split_key!r} field "
                                    "(the source's split_key) with a string or number"})
                continue
            split = it.split or split_of(basis, cfg.split)
            meta = {"key": it.key, "modality": it.modality, "split": split, "reference": it.reference,
                    "reference_is_label": it.reference_is_label, "source": it.source, "file": it.file, "meta": it.meta}
            by_mod.setdefault(it.modality, []).append({"__key__": it.key, it.ext: data,
                                                       "json": json.dumps(meta, sort_keys=True).encode()})
            res.counts[f"{split}"] = res.counts.get(split, 0) + 1
            res.counts["out"] = res.counts.get("out", 0) + 1
        for m, samples in by_mod.items():
            samples.sort(key=lambda s: s["__key__"])
            res.outputs[f"shards/{m}/{unit.name}.tar"] = samples
        return res

    counts = run_units(ctx, units, process, kept_keys=("out",), max_reject_fraction=cfg.max_reject_fraction,
                       pre_rejects=pre_rejects)
    if counts.get("ignored_members"):
        print(f"ingest: {counts['ignored_members']} shard members no modality reads (and holding no reference) were "
              f"not taken: {ctx.dir / 'ignored_members.jsonl'}")
    if not counts.get("out"):
        raise UserError(f"ingest: no usable input ({counts['rejected']} rejected); the sources name no file, shard "
                        f"or sample that could be read; see {ctx.dir / 'rejects.jsonl'}")
    return {"in": counts.get("out", 0) + counts["rejected"], "out": counts.get("out", 0), "rejected": counts["rejected"],
            **{s: counts.get(s, 0) for s in ("train", "val", "test")}, **({"pool": counts["pool"]} if counts.get("pool") else {}),
            **({"ignored_members": counts["ignored_members"]} if counts.get("ignored_members") else {})}
