"""pseudo_label: every ingested sample is labelled by its modality's frozen teacher, in batches that never
cross a shard (so labels do not depend on how shards are spread over processes).

RUN/pseudo_label/shards/<modality>/<name>.tar, one per ingest shard, each sample:
    <key>.json              {key, modality, split, text (the pseudo-label), reference, teacher {name, sha256},
                             info (confidence figures), source, file, meta, filter_reason}
    <key>.<ext>             the media bytes
    <key>.<array>.npy       tokens, topk_ids, topk_logprobs, features (whatever the teacher gives)
  and with augment_copies > 0, per train input and copy j (1..n) where the adapter can perturb it
  (Modality.perturb; the copy is decoded, perturbed and labelled here, its media is not stored):
    <key>__aug<j>.json      split `augmented`, augmented_from <key>, augment {the perturbation}
    <key>__aug<j>.<array>.npy
RUN/pseudo_label/filtered.jsonl   labels the filters dropped (filters.splits: train/val), and runaway labels
                                  (Teacher.unusable_reason: a decode that looped to its cap) of every split,
                                  each with its reason
RUN/pseudo_label/rejects.jsonl    inputs that could not be decoded or labelled
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from pipeline import distributed
from pipeline.config import minimum
from pipeline.files import atomic_write_text
from pipeline.errors import BadInput
from pipeline.graph import StageContext, register_stage
from pipeline.registry import modality_adapter
from pipeline.sharded import Unit, UnitResult, run_units, units_progress
from pipeline.shards import iter_shard, list_shards, reject_record

# ------------------------------------------------------------------------------------------------------ config
@dataclass
class FilterConfig:
    min_avg_logprob: Optional[float] = -1.0  # drop labels the teacher was unsure of (None: off)
    max_compression_ratio: Optional[float] = 2.4  # drop repetition loops (gzip ratio of the text)
    max_no_speech_prob: Optional[float] = 0.6  # drop windows the teacher thinks hold no speech
    max_wer: Optional[float] = 0.5  # drop labels too far from a reference, train and val splits only
    min_confidence: Optional[float] = None  # image teachers: drop labels below this top-1 probability
    splits: List[str] = field(default_factory=lambda: ["train", "val"])  # splits the filters apply to


@dataclass
class PseudoLabelConfig:
    batch_size: int = field(default=16, metadata=minimum(1))  # samples per teacher call; batches never cross a shard
    filters: FilterConfig = field(default_factory=FilterConfig)
    max_reject_fraction: float = field(default=0.2, metadata=minimum(0.0))  # fail past this fraction of bad inputs
    top_k: int = field(default=8, metadata=minimum(0))  # store the teacher's top-k log-probs per token, for distill's KD (0: off)
    store_features: bool = True  # store the teacher's features (fp16) for the student and discriminators
    # Perturbed copies of each train input (modalities whose adapter can perturb: audio and image, see their augment_*),
    # labelled by the teacher like any input and filtered like train, kept as split `augmented`: inputs the
    # student has not memorised, for `distill.inputs` / `adversarial.inputs` to take. 0: none.
    augment_copies: int = field(default=0, metadata=minimum(0))
    # The students' decoding cap, margin x (a + b x seconds) tokens per input, fitted on the train labels
    # (stages.models.length_cap; written to length_cap.json): the margin is at least this (0: no cap)
    length_cap_min_margin: float = field(default=1.5, metadata=minimum(0.0))



AUGMENTED = "augmented"  # the split of perturbed copies of train inputs


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


@register_stage("pseudo_label", after=("ingest",), progress=lambda d, cfg: units_progress(d),
                config_class=PseudoLabelConfig, order=20,
                description="label real inputs with frozen teachers (Whisper, CLIP-style, identity), filter, shard")
def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    ingest_dir = ctx.input_dir("ingest") / "shards"
    units = []
    for mdir in sorted(p for p in ingest_dir.iterdir() if p.is_dir()) if ingest_dir.exists() else []:
        for shard in list_shards(mdir):
            units.append(Unit(f"{mdir.name}-{shard.stem}", (mdir.name, shard)))
    adapters, teachers = {}, {}

    def teacher_for(modality: str):
        if modality not in teachers:
            adapters[modality] = modality_adapter(ctx.cfg.root, modality)
            teachers[modality] = adapters[modality].build_teacher(ctx.device, top_k=cfg.top_k,
                                                                  store_features=cfg.store_features)
        return adapters[modality], teachers[modality]

    def process(unit: Unit) -> UnitResult:
        modality, shard = unit.payload
        adapter, teacher = teacher_for(modality)
        res = UnitResult(logs={"filtered": []})
        decoded = []  # (key, meta, ext, media bytes, decoded input)
        on_error = lambda k, r, lost=1: res.rejects.append(reject_record(k, r, lost))  # noqa: E731
        for key, members in iter_shard(str(shard), on_error=on_error):
            try:
                meta = json.loads(members["json"])
                if not isinstance(meta, dict):
                    raise ValueError("its json is not an object")
                ext = next(e for e in members if e != "json")
                decoded.append((key, meta, ext, members[ext], adapter.decode(members[ext], ext)))
            except BadInput as e:
                res.rejects.append({"key": key, "reason": e.reason})
                continue
            except (KeyError, StopIteration, ValueError) as e:
                res.rejects.append({"key": key, "reason": f"malformed ingest sample: {e}"})
                continue
            except RecursionError:
                res.rejects.append({"key": key, "reason": "malformed ingest sample: its json is nested too deeply"})
                continue
            except Exception as e:  # one sample's failure (a decoder's bug, MemoryError) never stops the stage
                res.rejects.append({"key": key, "reason": f"decode failed: {e.__class__.__name__}: {e}"})
                continue
            if meta.get("split") == "train":
                x = decoded[-1][4]
                for j in range(1, cfg.augment_copies + 1):
                    copy = f"{key}__aug{j}"
                    try:
                        got = adapter.perturb(x, np.random.default_rng(_copy_seed(ctx.cfg.root.seed, key, j)), j - 1)
                    except BadInput as e:
                        res.rejects.append({"key": copy, "reason": f"perturbed copy: {e.reason}"})
                        continue
                    if got is not None:
                        decoded.append((copy, {**meta, "key": copy, "split": AUGMENTED, "augmented_from": key,
                                               "augment": got[1]}, None, None, got[0]))
        x = members = None  # the loop's last input: its references go with decoded's below
        samples = []
        for i in range(0, len(decoded), cfg.batch_size):
            batch = decoded[i: i + cfg.batch_size]
            try:
                labels = teacher.label([d[4] for d in batch])
            except Exception:  # BadInput, or any failure of one input (MemoryError included)
                labels = None
            if labels is None or len(labels) != len(batch):
                # One bad input must not cost its batch: label them one by one to find it.
                labels = []
                for d in batch:
                    try:
                        labels.append(teacher.label([d[4]])[0])
                    except BadInput as e:
                        labels.append(e)
                    except Exception as e:
                        labels.append(BadInput(f"labelling failed: {e.__class__.__name__}: {e}"))
            # the decoded inputs are not needed past their labels: a long clip's float32 samples go now
            for j in range(i, i + len(batch)):
                decoded[j] = decoded[j][:4] + (None,)
            batch = None
            for (key, meta, ext, media, _), label in zip(decoded[i: i + len(labels)], labels):
                if isinstance(label, Exception):
                    res.rejects.append({"key": key, "reason": label.reason})
                    continue
                reference = meta.get("reference")
                reason = None
                unusable = getattr(teacher, "unusable_reason", lambda _: None)(label)
                if unusable:
                    # not the teacher's answer (a runaway decode): dropped from every split, held-out ones too,
                    # where it would be scored as the teacher's label
                    res.logs["filtered"].append({"key": key, "split": meta["split"],
                                                 "reason": teacher.filter_reason(label, reference, cfg.filters),
                                                 "text": label.text})
                    res.counts["filtered"] = res.counts.get("filtered", 0) + 1
                    continue
                # a perturbed copy of a train input, and an input held back in the pool, is filtered as train
                if ("train" if meta["split"] in (AUGMENTED, "pool") else meta["split"]) in cfg.filters.splits:
                    reason = teacher.filter_reason(label, reference, cfg.filters)
                    if reason:
                        res.logs["filtered"].append({"key": key, "split": meta["split"], "reason": reason, "text": label.text})
                        res.counts["filtered"] = res.counts.get("filtered", 0) + 1
                        continue
                else:
                    # Held-out samples are kept whatever the filters say (dropping them would bias every
                    # held-out figure); the reason is recorded for the evaluation to report.
                    reason = teacher.filter_reason(label, reference, cfg.filters)
                text = reference if meta.get("reference_is_label") and reference else label.text
                record = {**meta, "text": text, "teacher_text": label.text, "teacher": {"name": teacher.name, "sha256": teacher.sha256},
                          "info": label.info, "filter_reason": reason}
                sample = {"__key__": key, "json": json.dumps(record, sort_keys=True, default=float).encode()}
                if ext is not None:
                    sample[ext] = media
                for name, arr in sorted(label.arrays.items()):
                    sample[f"{name}.npy"] = npy_bytes(arr)
                samples.append(sample)
                res.counts["out"] = res.counts.get("out", 0) + 1
                res.counts[meta["split"]] = res.counts.get(meta["split"], 0) + 1
        res.outputs[f"shards/{modality}/{shard.name}"] = samples
        return res

    counts = run_units(ctx, units, process, kept_keys=("out", "filtered"), max_reject_fraction=cfg.max_reject_fraction)
    if ctx.dist.is_main:
        write_length_cap(ctx.dir, cfg.length_cap_min_margin)
    distributed.barrier()
    return {"out": counts.get("out", 0), "filtered": counts.get("filtered", 0), "rejected": counts["rejected"],
            **{s: counts.get(s, 0) for s in ("train", "val", "test", AUGMENTED)},
            **({"pool": counts["pool"]} if counts.get("pool") else {})}


LENGTH_CAP_FILE = "length_cap.json"


def write_length_cap(stage_dir: Path, min_margin: float) -> dict:
    """Fit the decoding cap of each modality on the train labels just written (stages.models.length_cap) and
    write length_cap.json: {"tokenizer": the tokenizer the tokens were counted in, "modalities": {name: fit}}
    ({} with min_margin 0: no cap). A chunked clip's chunks are labels of their own, as the students read them."""
    from stages.models.labelled_data import load_labelled
    from stages.models.length_cap import fit_examples
    from stages.models.student import TextTokenizer

    spec = {"kind": "whisper", "multilingual": False}
    fits = (fit_examples(load_labelled(stage_dir, TextTokenizer(spec), 10**9, splits=("train",)).splits["train"],
                         min_margin) if min_margin > 0 else {})
    out = {"tokenizer": spec, "min_margin": min_margin, "modalities": fits}
    atomic_write_text(stage_dir / LENGTH_CAP_FILE, json.dumps(out, indent=2, sort_keys=True) + "\n")
    return out


def read_length_cap(stage_dir: Path) -> dict | None:
    """length_cap.json of a pseudo_label directory (None: written before the cap existed)."""
    p = Path(stage_dir) / LENGTH_CAP_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def _copy_seed(seed: int, key: str, copy: int) -> int:
    """The perturbation stream of one copy: fixed by (seed, key, copy), whatever the shard layout or process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}:{copy}".encode()).digest()[:8], "little")


def read_labelled(stage_dir: Path, modalities: list[str] | None = None, splits: tuple[str, ...] | None = None,
                  arrays: bool = True):
    """Yield (modality, record, media_ext, media_bytes, arrays) from a pseudo_label directory, in shard order."""
    root = Path(stage_dir) / "shards"
    for mdir in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        if modalities is not None and mdir.name not in modalities:
            continue
        for shard in list_shards(mdir):
            for key, members in iter_shard(str(shard)):
                rec = json.loads(members["json"])
                if splits is not None and rec["split"] not in splits:
                    continue
                arrs = {k[:-4]: npy_load(v) for k, v in members.items() if k.endswith(".npy")} if arrays else {}
                media = [(k, v) for k, v in members.items() if k != "json" and not k.endswith(".npy")]
                ext, data = media[0] if media else (None, None)
                yield mdir.name, rec, ext, data, arrs
