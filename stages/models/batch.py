"""A trained student on new inputs, in batches: the Python API (`pipeline.api.load_student`) and
`groundgan generate RUN --inputs FOLDER_OR_MANIFEST_OR_SHARDS --out preds.jsonl`.

Every input goes the way the evaluate stage's held-out data goes: its modality's adapter decodes it, the
modality's teacher (built once, from the run's config) makes its features as pseudo_label does (the Whisper
teacher's encoder alone: WhisperTeacher.features), and generate_texts decodes them with the run's decoding
settings (decoding.*: the fallback, its checks) and the fallback's random stream keyed by the sample key
(decode_seed), so a text is the evaluate stage's for the same key, whatever else shares its batch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from pipeline.errors import BadInput, UserError


def decode_seed(seed: int, modality: str, temperature: float) -> int:
    """The seed under every keyed random stream of one modality at one temperature (generation.piece_seed adds
    the sample key): the evaluate stage's and groundgan generate's, so both write the same texts."""
    import hashlib

    return int(hashlib.sha256(f"{seed}/decode/{modality}/{float(temperature):g}".encode()).hexdigest()[:15], 16)


def _from_plain(cls, data: dict, where: str):
    from omegaconf import OmegaConf

    from pipeline.config import _merge

    return OmegaConf.to_object(_merge(OmegaConf.structured(cls), data or {}, where))


@dataclass
class Item:
    """One input: its key, modality, and either the file's bytes (with extension) or what the adapter decodes
    to (an array of 16 kHz samples, an image array, a text)."""

    key: str
    modality: str
    data: Optional[bytes] = None
    ext: Optional[str] = None
    decoded: Any = None
    where: str = ""  # for messages: the file or shard it came from


@dataclass
class LoadedStudent:
    """A student with what it needs to read new inputs: its modalities' configs (teachers), the decoding
    settings and the seed of the keyed random streams. Made by load_student."""

    student: Any
    decoding: Any  # DecodingConfig
    modalities: dict  # modality -> its config object
    seed: int = 0
    source: str = ""
    device: str = "cpu"
    _adapters: dict = field(default_factory=dict, repr=False)
    _teachers: dict = field(default_factory=dict, repr=False)

    @property
    def reads(self) -> list[str]:
        return list(self.student.spec.modalities)

    def adapter(self, modality: str):
        from pipeline.registry import modality_registry

        if modality not in self.student.spec.marker_ids:
            raise UserError(f"this student does not read {modality}; it reads {', '.join(self.reads)}")
        if modality not in self._adapters:
            if modality not in modality_registry:
                raise UserError(f"modality {modality!r} is not registered (groundgan modalities lists them)")
            cls = modality_registry.get(modality)
            self._adapters[modality] = cls(self.modalities.get(modality) or cls.Config())
        return self._adapters[modality]

    def teacher(self, modality: str):
        if modality not in self._teachers:
            self._teachers[modality] = self.adapter(modality).build_teacher(self.device, top_k=0, store_features=True)
        return self._teachers[modality]

    def modality_of(self, ext: str) -> str | None:
        """The modality this student reads whose adapter takes files ending in `ext`."""
        from pipeline.registry import modality_registry

        ext = ext.lower().lstrip(".")
        for m in self.reads:
            if m in modality_registry and ext in modality_registry.get(m).extensions:
                return m
        return None

    # ------------------------------------------------------------------------------------------------ features
    def features(self, modality: str, decoded: list) -> list[dict]:
        """Per decoded input, the arrays its teacher stores (features, chunk_frames): WhisperTeacher.features
        where the teacher has it (its encoder alone), else the teacher's label()."""
        teacher = self.teacher(modality)
        if hasattr(teacher, "features"):
            return teacher.features(decoded)
        return [lab.arrays for lab in teacher.label(decoded)]

    # ------------------------------------------------------------------------------------------------ decoding
    def generate(self, inputs: Sequence[Any], modality: str | None = None, keys: Sequence[str] | None = None,
                 batch_size: int = 16, temperature: float = 0.0, progress: Any = None) -> list[dict]:
        """The student's text for every input, in order: dicts {key, modality, text, avg_logprob, fallback}
        (avg_logprob: the mean token log-prob of the kept text; fallback: whether the temperature fallback
        decoded a piece again), or {key, modality, error} for an input that cannot be read.

        inputs: file paths, Items, or decoded inputs (16 kHz float32 arrays for audio, what the adapter's decode
        returns for others; give `modality`). keys: one per input (default: the file's stem, else its index).
        The same decoding as the evaluate stage (decoding.*), batch_size inputs of a modality at a time."""
        items = [self._item(x, i, modality, keys[i] if keys is not None else None) for i, x in enumerate(inputs)]
        return list(self.iter_generate(items, batch_size, temperature, progress))

    transcribe = generate
    caption = generate

    def _item(self, x: Any, i: int, modality: str | None, key: str | None) -> Item:
        if isinstance(x, Item):
            return x
        if isinstance(x, (str, Path)) and (modality != "text" or Path(x).is_file()):
            p = Path(x)
            if not p.is_file():
                raise UserError(f"{p}: file not found")
            m = modality or self.modality_of(p.suffix)
            if m is None:
                raise UserError(f"{p}: no modality this student reads ({', '.join(self.reads)}) takes .{p.suffix.lstrip('.')} files")
            return Item(key or p.stem, m, data=p.read_bytes(), ext=p.suffix.lstrip(".").lower(), where=str(p))
        if modality is None:
            raise UserError("decoded inputs (arrays) need modality=...")
        return Item(key if key is not None else str(i), modality, decoded=x, where=f"input {i}")

    def iter_generate(self, items: Iterable[Item], batch_size: int = 16, temperature: float = 0.0,
                      progress: Any = None) -> Iterator[dict]:
        """generate over a stream of Items, batch_size of a modality at a time; results in input order within a
        batch, batches as they fill (a modality's partial batch at the end)."""
        pending: dict[str, list[Item]] = {}
        for it in items:
            self.adapter(it.modality)  # an unknown or untrained modality is the user's error, at once
            pending.setdefault(it.modality, []).append(it)
            if len(pending[it.modality]) >= batch_size:
                yield from self._batch(pending.pop(it.modality), temperature, progress)
        for m in list(pending):
            yield from self._batch(pending.pop(m), temperature, progress)

    def _batch(self, items: list[Item], temperature: float, progress: Any) -> Iterator[dict]:
        from stages.models.generation import generate_texts

        m = items[0].modality
        adapter = self.adapter(m)
        ok, out = [], {}
        decoded = []
        for j, it in enumerate(items):
            try:
                x = it.decoded if it.decoded is not None else adapter.decode(it.data, it.ext or "")
            except BadInput as e:
                out[j] = {"key": it.key, "modality": m, "error": f"{it.where}: {e.reason}"}
                continue
            ok.append(j)
            decoded.append(x)
        feats, chunks, prompts = None, None, None
        if ok and self.student.spec.feature_dims.get(m, 0) > 0:
            try:
                arrays = self.features(m, decoded)
            except BadInput:  # one bad input in the batch: each on its own, the bad one reported
                arrays = []
                for j, x in zip(list(ok), decoded):
                    try:
                        arrays.append(self.features(m, [x])[0])
                    except BadInput as e:
                        out[j] = {"key": items[j].key, "modality": m, "error": f"{items[j].where}: {e.reason}"}
                        arrays.append(None)
                keep = [k for k, a in enumerate(arrays) if a is not None]
                ok, arrays = [ok[k] for k in keep], [arrays[k] for k in keep]
            feats = [torch.from_numpy(np.asarray(a["features"], dtype=np.float32).reshape(-1, a["features"].shape[-1]))
                     for a in arrays]
            chunks = [None if a.get("chunk_frames") is None else [int(c) for c in np.asarray(a["chunk_frames"]).reshape(-1)]
                      for a in arrays]
        elif ok and isinstance(decoded[0], str):
            prompts = decoded
        if ok:
            dec = self.decoding
            dev = self.student.device
            seed = decode_seed(self.seed, m, temperature)
            kw = dict(fallback=dec.fallback_temperatures, max_compression_ratio=dec.max_compression_ratio,
                      min_avg_logprob=dec.min_avg_logprob, best_of=dec.best_of,
                      max_ngram_repeats=dec.max_ngram_repeats, temperature=temperature,
                      max_new_tokens=dec.max_new_tokens, generator=torch.Generator(device=dev).manual_seed(seed),
                      seed=seed)
            keys = [items[j].key for j in ok]
            if prompts is not None:  # text: each input is a prompt the student continues
                texts, details = [], []
                for k, p in zip(keys, prompts):
                    d: list = []
                    texts += generate_texts(self.student, m, None, n=1, keys=[k], details=d,
                                            prompt=self.student.tokenizer.encode(p), **kw)
                    details += d
            else:
                details = []
                texts = generate_texts(self.student, m, feats, n=None if feats is not None else len(ok),
                                       chunks=chunks, keys=keys, details=details, **kw)
            for j, t, d in zip(ok, texts, details):
                out[j] = {"key": items[j].key, "modality": m, "text": t, "avg_logprob": round(d["avg_logprob"], 6),
                          "fallback": d["fallback"]}
        for j in range(len(items)):
            if progress is not None:
                progress.update(1)
            yield out[j]


# ---------------------------------------------------------------------------------------------------- loading
def load_student(path: str | Path, stage: str | None = None, device: str | None = None) -> LoadedStudent:
    """A student ready for new inputs, from a run directory (its config.yaml and <stage>/final: stage as given,
    else adversarial, else distill), a `groundgan export` folder (student.json, decoding.json,
    modalities.json) or a bare final/ folder (the recipe's decoding and modality defaults)."""
    from pipeline.config import load_config
    from pipeline.registry import modality_registry
    from stages.models.export import DECODING_FILE, MODALITIES_FILE, RUN_FILE, find_final
    from stages.models.generation import DecodingConfig
    from stages.models.student import load_student as load_weights

    path = Path(path)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (path / "config.yaml").is_file():
        cfg = load_config([str(path / "config.yaml")])
        _, final = find_final(path, stage)
        student = load_weights(final, dev)
        mods = {m: cfg.root.modalities.get(m) for m in student.spec.modalities if cfg.root.modalities.get(m)}
        return LoadedStudent(student, cfg.root.decoding, mods, int(cfg.root.seed), str(path), dev)
    if (path / "student.json").is_file():
        for need in ("projectors.safetensors", "lm/config.json"):
            if not (path / need).is_file():
                raise UserError(f"{path}: {need} is missing")
        student = load_weights(path, dev)
        dec_file, mod_file = path / DECODING_FILE, path / MODALITIES_FILE
        try:
            dec = (_from_plain(DecodingConfig, json.loads(dec_file.read_text()), str(dec_file)) if dec_file.is_file()
                   else DecodingConfig())
            plain = json.loads(mod_file.read_text()) if mod_file.is_file() else {}
        except ValueError as e:
            raise UserError(f"{path}: unreadable settings ({e})") from None
        mods = {m: _from_plain(modality_registry.get(m).Config, d, f"{mod_file}: {m}") for m, d in plain.items()
                if m in modality_registry}
        run_file = path / RUN_FILE
        try:
            seed = int(json.loads(run_file.read_text()).get("seed") or 0) if run_file.is_file() else 0
        except (ValueError, AttributeError, TypeError) as e:
            raise UserError(f"{run_file}: unreadable ({e})") from None
        return LoadedStudent(student, dec, mods, seed, str(path), dev)
    if path.exists():
        raise UserError(f"{path} is neither a run directory (config.yaml) nor a student folder (student.json)")
    raise UserError(f"{path}: not found")


# ----------------------------------------------------------------------------------------------------- inputs
def read_inputs(sources: Sequence[str], loaded: LoadedStudent, split: str | None = None) -> Iterator[Item]:
    """Items from each source: a file, a folder (its files of a modality the student reads, sorted, recursively),
    a JSONL manifest (lines {"<manifest field>": file, "key": ...}: a modality's manifest_field names it;
    relative files resolve from the manifest's folder), or webdataset shards (.tar files, a brace pattern, or a
    folder that holds shards and no file of a modality: <key>.<ext> members, split filtered by their .json's
    "split" where `split` is given)."""
    from pipeline.registry import modality_registry
    from pipeline.shards import expand_urls, iter_shard

    def no_split(p: Path) -> UserError:
        return UserError(f"{p}: --split {split} keeps the samples of webdataset shards whose .json names that split; "
                         "files, folders of files and manifests carry no split (ingest assigns it)")

    for src in sources:
        p = Path(src)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and loaded.modality_of(f.suffix))
            # a folder of webdataset shards and no file of a modality (a run's pseudo_label/shards/audio)
            shards = [] if files else sorted(f for f in p.rglob("*.tar") if f.is_file())
            if shards:
                yield from read_inputs([str(f) for f in shards], loaded, split)
                continue
            if split is not None:
                raise no_split(p)
            if not files:
                raise UserError(f"{p}: no file of a modality this student reads ({', '.join(loaded.reads)}), "
                                "and no webdataset shard (.tar)")
            for f in files:
                yield Item(str(f.relative_to(p).with_suffix("")).replace("/", "-"), loaded.modality_of(f.suffix),
                           data=f.read_bytes(), ext=f.suffix.lstrip(".").lower(), where=str(f))
        elif p.suffix in (".jsonl", ".json") and p.is_file():
            if split is not None:
                raise no_split(p)
            for n, line in enumerate(p.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{p}:{n}: not JSON ({e})") from None
                m = next((m for m in loaded.reads if m in modality_registry
                          and modality_registry.get(m).manifest_field in rec), None)
                if m is None:
                    raise UserError(f"{p}:{n}: names no file of a modality this student reads "
                                    f"(fields: {', '.join(modality_registry.get(m).manifest_field for m in loaded.reads if m in modality_registry)})")
                f = Path(rec[modality_registry.get(m).manifest_field])
                f = f if f.is_absolute() else p.parent / f
                if not f.is_file():
                    raise UserError(f"{p}:{n}: file not found: {f}")
                yield Item(str(rec.get("key") or f.stem), m, data=f.read_bytes(), ext=f.suffix.lstrip(".").lower(),
                           where=str(f))
        elif p.suffix == ".tar" or "{" in src or "::" in src:
            urls = expand_urls(src)
            for url in urls:
                if "://" not in url and not Path(url).is_file():
                    raise UserError(f"{url}: shard not found")
                for key, members in iter_shard(url):
                    meta = {}
                    if "json" in members:
                        try:
                            meta = json.loads(members["json"])
                        except ValueError:
                            meta = {}
                    if split is not None and meta.get("split") != split:
                        continue
                    media = [(e, b) for e, b in members.items() if e != "json" and not e.endswith(".npy")]
                    found = [(loaded.modality_of(e.rsplit(".", 1)[-1]), e, b) for e, b in media]
                    found = [x for x in found if x[0] is not None]
                    if not found:
                        continue
                    m, e, b = found[0]
                    yield Item(key, m, data=b, ext=e.rsplit(".", 1)[-1].lower(), where=f"{url}:{key}")
        elif p.is_file():
            if split is not None:
                raise no_split(p)
            m = loaded.modality_of(p.suffix)
            if m is None:
                raise UserError(f"{p}: no modality this student reads ({', '.join(loaded.reads)}) takes "
                                f".{p.suffix.lstrip('.')} files")
            yield Item(p.stem, m, data=p.read_bytes(), ext=p.suffix.lstrip(".").lower(), where=str(p))
        else:
            raise UserError(f"--inputs {src}: not found")


def generate_many_cli(a) -> int:
    """`groundgan generate RUN --inputs SRC [SRC ...] --out preds.jsonl [--stage S] [--batch-size N]
    [--split S] [--temperature T]`."""
    from tqdm import tqdm

    from pipeline.files import atomic_write

    if a.temperature < 0:
        raise UserError("--temperature must be >= 0")
    if a.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    loaded = load_student(a.run_dir, a.stage)
    items = list(read_inputs(a.inputs, loaded, a.split))
    if not items:
        raise UserError(f"--inputs {' '.join(a.inputs)}: no input" + (f" in split {a.split}" if a.split else ""))
    for it in items:
        loaded.adapter(it.modality)
    seen: set = set()
    for it in items:
        if it.key in seen:
            raise UserError(f"--inputs: the key {it.key!r} occurs twice ({it.where})")
        seen.add(it.key)
    bar = tqdm(total=len(items), unit="input", desc="generate", file=sys.stderr, leave=False,
               disable=a.no_progress or not sys.stderr.isatty())
    rows = list(loaded.iter_generate(items, a.batch_size, a.temperature, bar))
    bar.close()
    out = Path(a.out)

    def write(f):
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write, mode="w")
    bad = sum("error" in r for r in rows)
    print(f"{len(rows) - bad} texts written to {out}" + (f"; {bad} inputs could not be read (their error is in "
                                                          "the file)" if bad else ""), file=sys.stderr)
    return 0
