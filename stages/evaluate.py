"""evaluate: score the teacher's labels and every trained student on held-out data; write the report.

Sets: the run's `test` split (from pseudo_label) and each `evaluate.sources` entry, labelled here by its
modality's teacher (cached in RUN/evaluate/sets/<name>/). Checkpoints: `teacher` (its labels as they are),
`distill` (RUN/distill/final) and `adversarial` (RUN/adversarial/final, when that stage is done). Each
student decodes every sample greedily (the headline metrics) and at each of `evaluate.temperatures` (the
quality-diversity sweep). Generation is split over ranks in fixed blocks, each block seeded by its index,
so the samples do not depend on the number of processes.

Products (see stages.evaluation.report for their schema): report.json, report.md, predictions.jsonl, the PNG plots,
details.json (non-numeric extras of modality metrics, e.g. the image label -> category map) and
generations/<set>/<modality>/<checkpoint>/T<temperature>.json (every decoded text, reused on resume).

The graph edges are pseudo_label and distill, plus adversarial when the run's graph has it
(optional_after): re-running adversarial makes evaluate stale, and a graph without it has no such row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch

from pipeline import distributed
from pipeline.config import minimum
from pipeline.errors import BadInput, UserError
from pipeline.files import atomic_write_json
from pipeline.graph import StageContext, register_stage
from pipeline.registry import modality_adapter
from pipeline.shards import expand_urls, write_shard
from stages.evaluation import report as report_mod
from stages.evaluation import text_metrics as tm
from stages.ingest import SourceConfig, check_sources, list_folder, list_synthetic, read_shard_items, source_name
from stages.pseudo_label import npy_bytes, read_labelled

# ------------------------------------------------------------------------------------------------------ config
@dataclass
class EvaluateConfig:
    splits: List[str] = field(default_factory=lambda: ["test"])  # the run's splits to evaluate (test; train and val too if asked)
    sources: List[SourceConfig] = field(default_factory=list)  # extra held-out sets, each with a `name`
    temperatures: List[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])  # the sweep; 0 is greedy (decoded as `decoding:` says)
    max_samples: Optional[int] = field(default=None, metadata=minimum(1))  # per set and modality
    bootstrap: int = field(default=1000, metadata=minimum(10))  # resamples for confidence intervals
    batch_size: int = field(default=16, metadata=minimum(1))


# evaluate's decoding settings became the `decoding:` section, which distill and adversarial read too
MOVED = {k: f"moved to 'decoding.{k}' (docs/history.md)" for k in ("max_new_tokens", "fallback_temperatures",
                                                                      "max_compression_ratio", "min_avg_logprob",
                                                                      "best_of", "max_ngram_repeats")}


def validate_config(root) -> list[str]:
    check_sources(root.evaluate.sources, "evaluate.sources", need_name=True)
    return []


log = logging.getLogger("groundgan")

WHISPER_WINDOW_FRAMES = 1500  # encoder frames of one 30 s Whisper window (50 per second)
STUDENT_STAGES = ("distill", "adversarial")  # checkpoints read from RUN/<stage>/final
BASELINE = "distill"  # the checkpoint every later one's WER change is measured against (paired bootstrap)
# The sweep's quality axis per modality: how close the samples stay to the teacher. Others: teacher_nll.
SWEEP_QUALITY = {"audio": "wer_vs_teacher", "image": "label_agreement"}
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class EvalItem:
    """One held-out sample: the teacher's label, the reference and the teacher's features."""

    key: str
    modality: str
    teacher_text: str  # what the teacher said
    label: str  # the training label (the teacher's, or the reference where the source says so)
    reference: str | None
    info: dict = field(default_factory=dict)
    features: np.ndarray | None = None  # [T, D] float16, None for modalities without features
    chunks: list[int] | None = None  # a long clip the teacher labelled chunk by chunk: each chunk's frames
    chunk_texts: list[str] | None = None  # and its text


# ----------------------------------------------------------------------------------------------- the sets
def _items(records) -> dict[str, list[EvalItem]]:
    by_mod: dict[str, list[EvalItem]] = {}
    for modality, rec, _, _, arrays in records:
        f, cf = arrays.get("features"), arrays.get("chunk_frames")
        ct = (rec.get("info") or {}).get("chunk_texts")
        by_mod.setdefault(modality, []).append(EvalItem(
            key=str(rec.get("key", "")), modality=modality, teacher_text=str(rec.get("teacher_text", rec.get("text")) or ""),
            label=str(rec.get("text") or ""), reference=rec.get("reference"), info=rec.get("info") or {},
            features=None if f is None or not f.size else np.asarray(f).reshape(-1, f.shape[-1]),
            chunks=None if cf is None else [int(c) for c in np.asarray(cf).reshape(-1)],
            chunk_texts=None if not ct else [str(t) for t in ct]))
    for items in by_mod.values():
        items.sort(key=lambda it: it.key)  # shard order may change; this order does not
    return dict(sorted(by_mod.items()))


def _source_items(src, name: str, seed: int, rejects: list[dict]):
    """An evaluate source's items, as ingest lists them (folder / text / synthetic / shards)."""
    if src.type in ("folder", "text"):
        items, rej = list_folder(src, name, seed)
        rejects.extend(rej)
    elif src.type == "synthetic":
        items = list_synthetic(src, name, seed)
    else:
        items = []
        for url in expand_urls(src.urls):
            items.extend(read_shard_items(url, src, name, rejects))
        items.sort(key=lambda it: it.key)
    return items[: src.limit] if src.limit else items


def trained_inputs(ctx: StageContext) -> dict[tuple[str, str], str]:
    """(modality, sha256 of the bytes) -> key, for every input of the run outside its val and test splits (what
    distill and the phase may train on: train, pool, augmented copies)."""
    out: dict[tuple[str, str], str] = {}
    for modality, rec, _ext, data, _ in read_labelled(ctx.input_dir("pseudo_label"), arrays=False):
        if data and rec["split"] not in ("val", "test"):
            out.setdefault((modality, hashlib.sha256(data).hexdigest()), rec["key"])
    return out


def label_source(ctx: StageContext, src, index: int, adapters: dict, teachers: dict,
                 trained: dict | None = None) -> Path:
    """Label one evaluate source with its modality's teacher, once: RUN/evaluate/sets/<name>/ holds
    shards/<modality>/labelled.tar in pseudo_label's format (no media) and done.json. Rank 0 only.
    trained: trained_inputs(ctx); an input with the bytes of one of them is refused (it is not held out)."""
    name = source_name(src, index)
    out = ctx.dir / "sets" / _SAFE.sub("_", name)
    if (out / "done.json").is_file():
        return out
    rejects: list[dict] = []
    by_mod: dict[str, list[dict]] = {}
    batch_size = ctx.section.batch_size
    decoded: dict[str, list] = {}
    for it in _source_items(src, name, ctx.cfg.root.seed, rejects):
        adapter, _ = _teacher(ctx, it.modality, adapters, teachers)
        try:
            data = it.data if it.data is not None else Path(it.file).read_bytes()
            seen = (trained or {}).get((it.modality, hashlib.sha256(data).hexdigest()))
            if seen is not None:
                rejects.append({"key": it.key, "reason": f"the same bytes as {seen}, which the students trained on "
                                                          "(not held out)"})
                continue
            decoded.setdefault(it.modality, []).append((it, adapter.decode(data, it.ext)))
        except BadInput as e:
            rejects.append({"key": it.key, "reason": e.reason})
        except OSError as e:
            rejects.append({"key": it.key, "reason": f"unreadable: {e.strerror or e}"})
    for modality, rows in decoded.items():
        _, teacher = _teacher(ctx, modality, adapters, teachers)
        for i in range(0, len(rows), batch_size):
            batch = rows[i: i + batch_size]
            try:
                labels = teacher.label([d for _, d in batch])
            except BadInput:
                labels = []
                for _, d in batch:  # one bad input must not cost its batch
                    try:
                        labels.append(teacher.label([d])[0])
                    except BadInput as e:
                        labels.append(e)
            for (it, _), label in zip(batch, labels):
                if isinstance(label, Exception):
                    rejects.append({"key": it.key, "reason": label.reason})
                    continue
                text = it.reference if (src.references_are_labels and it.reference) else label.text
                rec = {"key": it.key, "modality": modality, "split": name, "text": text, "teacher_text": label.text,
                       "reference": it.reference, "info": label.info, "source": name, "file": it.file, "meta": it.meta,
                       "teacher": {"name": teacher.name, "sha256": teacher.sha256}}
                sample = {"__key__": it.key, "json": json.dumps(rec, sort_keys=True, default=float).encode()}
                for arr_name, arr in sorted(label.arrays.items()):
                    sample[f"{arr_name}.npy"] = npy_bytes(arr)
                by_mod.setdefault(modality, []).append(sample)
    for modality, samples in by_mod.items():
        write_shard(out / "shards" / modality / "labelled.tar", samples)
    for r in rejects:
        ctx.reject(r["key"], r["reason"], set=name)
    atomic_write_json(out / "done.json", {"name": name, "labelled": {m: len(s) for m, s in by_mod.items()},
                                          "rejected": len(rejects)})
    return out


def collect_sets(ctx: StageContext, adapters: dict, teachers: dict) -> dict[str, dict[str, list[EvalItem]]]:
    """{set: {modality: [EvalItem]}}: the run's splits in evaluate.splits (the held-out test split by default;
    train shows how far the student fits what it learnt from), then each evaluate source, max_samples each."""
    cfg = ctx.section
    names = [source_name(s, i) for i, s in enumerate(cfg.sources)]
    for sp in cfg.splits:
        if sp not in ("train", "val", "test"):
            raise UserError(f"evaluate.splits: {sp!r} is not a split of the run (train, val, test)")
    for n in names:
        if n in ("train", "val", "test", report_mod.SWEEP):
            raise UserError(f"evaluate.sources: the name {n!r} is taken (the run's splits / the sweep); rename it")
    if len(set(names)) != len(names):
        raise UserError(f"evaluate.sources: names must differ, got {', '.join(names)}")
    if ctx.dist.is_main and cfg.sources:
        trained = trained_inputs(ctx)
        for i, src in enumerate(cfg.sources):
            label_source(ctx, src, i, adapters, teachers, trained)
    distributed.barrier()
    sets = {sp: _items(read_labelled(ctx.input_dir("pseudo_label"), splits=(sp,))) for sp in cfg.splits}
    for i, src in enumerate(cfg.sources):
        sets[names[i]] = _items(read_labelled(ctx.dir / "sets" / _SAFE.sub("_", names[i])))
    if cfg.max_samples:
        sets = {s: {m: items[: cfg.max_samples] for m, items in mods.items()} for s, mods in sets.items()}
    return sets


def _teacher(ctx: StageContext, modality: str, adapters: dict, teachers: dict):
    """The modality's adapter and (built on first use) its teacher."""
    adapter = _adapter(ctx, modality, adapters)
    if modality not in teachers:
        teachers[modality] = adapter.build_teacher(ctx.device, top_k=0, store_features=True)
    return adapter, teachers[modality]


def _adapter(ctx: StageContext, modality: str, adapters: dict):
    if modality not in adapters:
        adapters[modality] = modality_adapter(ctx.cfg.root, modality)
    return adapters[modality]


# ----------------------------------------------------------------------------------------------- students
def student_checkpoints(ctx: StageContext) -> dict[str, Path]:
    """checkpoint name -> final/ folder, for the student stages that are done."""
    out = {}
    for stage in STUDENT_STAGES:
        final = ctx.input_dir(stage) / "final"
        if stage not in ctx.inputs:
            continue
        if not (final / "student.json").is_file():
            log.warning("evaluate: %s is done but %s holds no student; left out", stage, final)
            continue
        card = final / "adversarial.json"
        if stage == "adversarial" and card.is_file() and json.loads(card.read_text()).get("enabled") is False:
            continue  # a copy of the distilled student: its row would repeat distill's
        out[stage] = final
    return out


def _blocks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def _seed(*parts) -> int:
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def chunk_items(items: list[EvalItem]) -> list[EvalItem]:
    """Each item as the pieces the student was trained on: a long clip the teacher labelled chunk by chunk
    becomes one item per chunk (its features and the teacher's text of it; no reference); others stay."""
    out = []
    for it in items:
        ok = (it.chunks and it.chunk_texts and len(it.chunks) == len(it.chunk_texts) > 1 and it.features is not None
              and sum(it.chunks) == len(it.features))
        if not ok:
            out.append(it)
            continue
        parts = np.split(it.features, np.cumsum(it.chunks)[:-1])
        out += [EvalItem(key=f"{it.key}#{j}", modality=it.modality, teacher_text=t, label=t, reference=None,
                         info=it.info, features=f) for j, (f, t) in enumerate(zip(parts, it.chunk_texts))]
    return out


def _features(items: list[EvalItem], rows: list[int]) -> list[torch.Tensor] | None:
    if any(items[i].features is None for i in rows):
        return None
    return [torch.from_numpy(np.asarray(items[i].features, dtype=np.float32)) for i in rows]


def _gather_rows(mine: dict[int, Any], n: int) -> list[Any]:
    """Merge every rank's {row: value} into one list of n values, on every rank."""
    merged: dict[int, Any] = {}
    for part in distributed.all_gather_objects(mine):
        merged.update(part)
    return [merged[i] for i in range(n)]


def generate_texts(ctx: StageContext, student, modality: str, items: list[EvalItem], temperature: float,
                   seed: int) -> list[str]:
    """The student's text for every item, at `temperature` (0: greedy). Blocks of batch_size rows are dealt
    round-robin to ranks; block j samples from a generator seeded by (seed, j)."""
    from stages.models.batch import decode_seed
    from stages.models.generation import generate_texts as generate_rows

    cfg, dec = ctx.section, ctx.cfg.root.decoding
    mine: dict[int, str] = {}
    for j, rows in enumerate(_blocks(len(items), cfg.batch_size)):
        if j % ctx.dist.world != ctx.dist.rank:
            continue
        gen = torch.Generator(device=student.device).manual_seed(_seed(seed, j) % (2**63))
        feats = _features(items, rows)
        texts = generate_rows(student, modality, feats, n=None if feats is not None else len(rows),
                              chunks=[items[i].chunks for i in rows], fallback=dec.fallback_temperatures,
                              max_compression_ratio=dec.max_compression_ratio, min_avg_logprob=dec.min_avg_logprob,
                              best_of=dec.best_of, max_ngram_repeats=dec.max_ngram_repeats,
                              temperature=temperature, max_new_tokens=dec.max_new_tokens, generator=gen,
                              keys=[items[i].key for i in rows],
                              seed=decode_seed(ctx.cfg.root.seed, modality, temperature))
        mine.update(zip(rows, texts))
    return _gather_rows(mine, len(items))


@torch.no_grad()
def teacher_nll(ctx: StageContext, student, modality: str, items: list[EvalItem],
                temperatures: list[float]) -> dict[float, float | None]:
    """Per-token negative log-likelihood of the teacher's labels (bos y.. eot, cut to the student's text
    positions) under the student's distribution softmax(logits / T), pooled over every token of every
    item (a long clip: of every chunk the teacher labelled), for each T > 0 in `temperatures` (T = 0 has no
    density: None)."""
    cfg = ctx.section
    items = chunk_items(items)
    temps = [t for t in temperatures if t > 0]
    tok, spec = student.tokenizer, student.spec
    limit = student.max_text_positions()
    mine: dict[int, tuple[list[float], int]] = {}
    for j, rows in enumerate(_blocks(len(items), cfg.batch_size)):
        if j % ctx.dist.world != ctx.dist.rank:
            continue
        seqs = [([spec.bos_id] + tok.encode(items[i].teacher_text) + [spec.eot_id])[:limit] for i in rows]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(rows), L), spec.eot_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        ids, mask = ids.to(student.device), mask.to(student.device)
        feats = _features(items, rows)
        logits = student(ids, mask, modality, feats).float()[:, :-1]  # [b, L-1, V] predicting ids[:, 1:]
        target, tmask = ids[:, 1:], mask[:, 1:].float()
        per_t = [(-(torch.log_softmax(logits / t, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1) * tmask)).sum(1)
                 for t in temps]  # each [b]: summed NLL per row
        for r, i in enumerate(rows):
            mine[i] = ([float(x[r]) for x in per_t], int(tmask[r].sum()))
    rows_all = _gather_rows(mine, len(items))
    n_tok = sum(n for _, n in rows_all)
    out: dict[float, float | None] = {t: None for t in temperatures}
    for k, t in enumerate(temps):
        out[t] = sum(r[0][k] for r in rows_all) / n_tok if n_tok else None
    return out


# -------------------------------------------------------------------------------------------- discriminators
def load_discriminators(adv_final: Path, device: str) -> dict | None:
    """The adversarial stage's per-modality discriminators, or None when that stage saved none (or its
    module is not there)."""
    try:
        from stages import adversarial
    except ImportError:
        return None
    loader = getattr(adversarial, "load_discriminators", None)
    if loader is None:
        return None
    try:
        return loader(adv_final, device)
    except (FileNotFoundError, UserError) as e:
        log.warning("evaluate: no discriminators in %s (%s)", adv_final, e)
        return None


@torch.no_grad()
def disc_accuracy(discs: dict, student_tok, modality: str, items: list[EvalItem], hyps: list[str]) -> float | None:
    """Accuracy of the modality's discriminator at telling the teacher's labels (real, p > 0.5) from the
    student's greedy outputs (generated, p <= 0.5), over both halves: (right on real + right on
    generated) / (2 n). None when there is no discriminator for the modality."""
    from stages.adversarial import discriminator_probs

    if discs is None or modality not in discs or not items:
        return None
    feats = [None if it.features is None else torch.from_numpy(np.asarray(it.features, dtype=np.float32)) for it in items]
    p_real = discriminator_probs(discs, modality, [it.teacher_text for it in items], feats, student_tok)
    p_fake = discriminator_probs(discs, modality, list(hyps), feats, student_tok)
    right = int((torch.as_tensor(p_real) > 0.5).sum()) + int((torch.as_tensor(p_fake) <= 0.5).sum())
    return right / (2 * len(items))


@torch.no_grad()
def disc_ranking(discs: dict, student_tok, modality: str, items: list[EvalItem], hyps: list[str]) -> float | None:
    """Over the items whose greedy output differs from the teacher's label: the fraction where the modality's
    discriminator scores the label above the output (ties count half). Free of the offset of its logits,
    unlike disc_accuracy. None without a discriminator or without such items."""
    from stages.adversarial import discriminator_probs, ranking

    diff = [i for i, (it, h) in enumerate(zip(items, hyps)) if (h or "") != (it.teacher_text or "")]
    if discs is None or modality not in discs or not diff:
        return None
    feats = [None if items[i].features is None else torch.from_numpy(np.asarray(items[i].features, dtype=np.float32))
             for i in diff]
    p_real = discriminator_probs(discs, modality, [items[i].teacher_text for i in diff], feats, student_tok)
    p_fake = discriminator_probs(discs, modality, [hyps[i] for i in diff], feats, student_tok)
    return ranking(dict(enumerate(p_real)), list(enumerate(p_fake))) / len(diff)


# ------------------------------------------------------------------------------------------------ metrics
def score(modality: str, adapter, hyps: list[str], items: list[EvalItem], bootstrap: int, seed: int,
          is_teacher: bool = False, clip_model=None) -> tuple[dict, dict]:
    """Metrics of one checkpoint's texts on one set and modality: (numbers for report.json, extras)."""
    refs = [it.reference for it in items]
    teacher = [it.teacher_text for it in items]
    m: dict[str, Any] = {"n_samples": len(hyps)}
    extras: dict[str, Any] = {}
    if tm.transcribes(modality):
        a = tm.align(hyps, refs)
        m["wer_vs_reference"] = a.wer
        m["wer_vs_reference_ci"] = tm.bootstrap_ci(a.pairs, n=bootstrap, seed=seed)
        m["n_with_reference"] = a.n
        m["ier"] = a.ier
        if not is_teacher:  # the teacher against itself is 0 by construction
            b = tm.align(hyps, teacher)
            m["wer_vs_teacher"] = b.wer
            m["wer_vs_teacher_ci"] = tm.bootstrap_ci(b.pairs, n=bootstrap, seed=seed)
        m["rep_5gram"] = tm.rep_5gram(hyps)
        # Short-form WER (Distil-Whisper's split): clips that fit one 30 s window (<= 1,500 encoder frames),
        # apart from the long-form ones that are decoded window by window, where a few long clips can
        # dominate a small set's WER. Only where the set has both.
        frames = [None if it.features is None else int(np.asarray(it.features).reshape(-1, it.features.shape[-1]).shape[0])
                  for it in items]
        short = [i for i, f in enumerate(frames) if f is not None and f <= WHISPER_WINDOW_FRAMES]
        if 0 < len(short) < len(items):
            s_ = tm.align([hyps[i] for i in short], [refs[i] for i in short])
            m["wer_short_form"] = s_.wer
            m["wer_short_form_ci"] = tm.bootstrap_ci(s_.pairs, n=bootstrap, seed=seed)
            m["n_short_form"] = s_.n
    for k, v in (adapter.metrics(hyps, teacher, refs, [it.info for it in items]) or {}).items():
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            m[k] = v
        else:
            extras[k] = v
    if clip_model is not None and items and all(it.features is not None for it in items):
        # the CLIP teacher's features are its image embedding [1, D]; scored by the teacher itself, the figure
        # measures imitation of the teacher, not truth
        image_emb = np.stack([np.asarray(it.features, np.float32).reshape(-1, it.features.shape[-1]).mean(0) for it in items])
        m["clip_score_teacher"] = tm.clip_score(image_emb, clip_model(hyps))
    m["distinct_1"] = tm.distinct_n(hyps, 1)
    m["distinct_2"] = tm.distinct_n(hyps, 2)
    m["self_bleu_4"] = tm.self_bleu_4(hyps)
    m["mean_length"] = tm.mean_length(hyps)
    return m, extras


def vs_distill(modality: str, base: list[str | None], hyps: list[str | None], refs: list[str | None],
               bootstrap: int, seed: int) -> dict:
    """A checkpoint's outputs against the distilled student's for the same inputs, each as a paired bootstrap:
    the relative change in word errors (transcript modalities: the question the adversarial phase has to
    answer) and the change in distinct-2 (every modality: the issue's "distinct-2 no lower")."""
    out: dict = {}
    if tm.transcribes(modality):
        _, _, ch = tm.paired_wer_change(base, hyps, refs, n=bootstrap, seed=seed)
        if ch is not None:
            out["wer_change_vs_distill"] = ch["change"]
            out["wer_change_vs_distill_ci"] = ch["ci"]
            out["p_fewer_errors_than_distill"] = ch["p_lower"]
    dc = tm.paired_distinct_change(base, hyps, 2, n=bootstrap, seed=seed)
    if dc is not None:
        out["distinct_2_change_vs_distill"] = dc["change"]
        out["distinct_2_change_vs_distill_ci"] = dc["ci"]
    return out


def _clip_text_embedder(ctx: StageContext, modality: str, adapters: dict, teachers: dict):
    """texts -> [N, D] CLIP text embeddings, when the modality's teacher is CLIP; else None."""
    mcfg = ctx.cfg.root.modalities.get(modality)
    if mcfg is None or getattr(getattr(mcfg, "teacher", None), "kind", None) != "clip":
        return None
    import open_clip

    _, teacher = _teacher(ctx, modality, adapters, teachers)
    tokenizer = getattr(teacher, "tokenizer", None) or open_clip.get_tokenizer(mcfg.teacher.clip_model)

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 256):
            e = teacher.model.encode_text(tokenizer(texts[i: i + 256]).to(teacher.device)).float()
            out.append(e.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    return embed


def _sweep_point(modality: str, adapter, hyps: list[str], items: list[EvalItem], temperature: float,
                 nll: float | None) -> dict:
    q = SWEEP_QUALITY.get(modality, "teacher_nll")
    if q == "wer_vs_teacher":
        quality = tm.wer(hyps, [it.teacher_text for it in items])[0]
    elif q == "teacher_nll":
        quality = nll
    else:
        quality = (adapter.metrics(hyps, [it.teacher_text for it in items], [it.reference for it in items],
                                   [it.info for it in items]) or {}).get(q)
    return {"temperature": temperature, "quality_metric": q, "quality": quality,
            "distinct_2": tm.distinct_n(hyps, 2), "self_bleu_4": tm.self_bleu_4(hyps), "n_samples": len(hyps)}


# ---------------------------------------------------------------------------------------------------- stage
def _temperatures(cfg) -> list[float]:
    temps = [float(t) for t in cfg.temperatures]
    if any(t < 0 for t in temps):
        raise UserError(f"evaluate.temperatures must be >= 0 (0 is greedy), got {temps}")
    return sorted(set(temps) | {0.0})


@register_stage("evaluate", after=("pseudo_label", "distill"), optional_after=("adversarial",), reads=("decoding",),
                config_class=EvaluateConfig, validate=validate_config, order=50, retired=MOVED, product="report.md",
                description="teacher vs distilled vs adversarial students on held-out sets: metrics, sweep, report")
def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    seed = ctx.cfg.root.seed
    temps = _temperatures(cfg)
    adapters: dict = {}
    teachers: dict = {}
    sets = collect_sets(ctx, adapters, teachers)
    checkpoints = student_checkpoints(ctx)
    if "distill" not in checkpoints:
        raise UserError(f"evaluate: no distilled student in {ctx.input_dir('distill') / 'final'}")

    # 1. Decode: every student, set, modality and temperature (cached per combination for resume).
    texts: dict[tuple, list[str]] = {}  # (checkpoint, set, modality, T) -> texts
    nlls: dict[tuple, dict] = {}  # (checkpoint, set, modality) -> {T: nll}
    disc: dict[tuple, float | None] = {}
    from stages.models.student import load_student

    n_generated = 0
    # one step per (checkpoint, set, modality, temperature) decoded, in samples
    bar = ctx.progress_bar(total=len(checkpoints) * len(temps) * sum(len(i) for mods in sets.values()
                                                                     for i in mods.values()), unit="sample")
    for cp, final in checkpoints.items():
        student = load_student(final, ctx.device)
        discs = load_discriminators(final, ctx.device) if cp == "adversarial" else None
        for s, mods in sets.items():
            for m, items in mods.items():
                if not items:
                    continue
                if m not in student.spec.modalities:
                    log.warning("evaluate: the %s student does not read %s; %s/%s left out", cp, m, s, m)
                    bar.total -= len(items) * len(temps)  # so that the bar ends at 100%
                    bar.refresh()
                    continue
                for t in temps:
                    bar.set_postfix_str(f"{cp} {s}/{m} T={t:g}")
                    cache = ctx.dir / "generations" / _SAFE.sub("_", s) / m / cp / f"T{t:g}.json"
                    if distributed.broadcast_object(cache.is_file() if ctx.dist.is_main else None):
                        # Reused from an interrupted attempt: still part of what this stage generated.
                        texts[(cp, s, m, t)] = json.loads(cache.read_text())["texts"] if ctx.dist.is_main else []
                        n_generated += len(items)
                        bar.update(len(items))
                        continue
                    # One random stream per (set, modality, temperature), the same for every checkpoint (common
                    # random numbers): equal weights write equal texts, and the checkpoints' differences are
                    # theirs, not the sampler's (the fallback samples: seeded by checkpoint, one student scored
                    # as two checkpoints would get two WERs).
                    out = generate_texts(ctx, student, m, items, t, _seed(seed, "evaluate", s, m, t))
                    n_generated += len(out)
                    texts[(cp, s, m, t)] = out
                    if ctx.dist.is_main:
                        atomic_write_json(cache, {"keys": [it.key for it in items], "texts": out})
                    bar.update(len(items))
                nlls[(cp, s, m)] = teacher_nll(ctx, student, m, items, sorted(set(temps) | {1.0}))
                if ctx.dist.is_main and cp == "adversarial":
                    # judged where a discriminator was trained: inputs the teacher labelled in one piece
                    one = [i for i, it in enumerate(items) if not it.chunks or len(it.chunks) < 2]
                    hyps = [texts[(cp, s, m, 0.0)][i] for i in one]
                    sub = [items[i] for i in one]
                    disc[(cp, s, m)] = (disc_accuracy(discs, student.tokenizer, m, sub, hyps),
                                        disc_ranking(discs, student.tokenizer, m, sub, hyps))
        del student, discs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    bar.close()
    if not ctx.dist.is_main:
        return {}

    # 2. Score and write.
    report: dict = {}
    sweep: dict = {}
    details: dict = {}
    predictions: list[dict] = []
    for s, mods in sets.items():
        for m, items in mods.items():
            if not items:
                continue
            adapter = _adapter(ctx, m, adapters)
            clip = _clip_text_embedder(ctx, m, adapters, teachers)
            row_seed = _seed(seed, "bootstrap", s, m) % (2**32)
            rows: dict[str, dict] = {}
            metrics, extras = score(m, adapter, [it.teacher_text for it in items], items, cfg.bootstrap, row_seed,
                                    is_teacher=True, clip_model=clip)
            rows["teacher"] = metrics
            details.setdefault(s, {}).setdefault(m, {})["teacher"] = extras
            for cp in checkpoints:
                if (cp, s, m, 0.0) not in texts:
                    continue
                metrics, extras = score(m, adapter, texts[(cp, s, m, 0.0)], items, cfg.bootstrap, row_seed,
                                        clip_model=clip)
                metrics["teacher_nll"] = nlls[(cp, s, m)].get(1.0)
                base = texts.get((BASELINE, s, m, 0.0))
                if cp != BASELINE and base is not None:
                    metrics.update(vs_distill(m, base, texts[(cp, s, m, 0.0)], [it.reference for it in items],
                                              cfg.bootstrap, row_seed))
                if cp == "adversarial":
                    metrics["disc_accuracy"], metrics["disc_ranking"] = disc.get((cp, s, m), (None, None))
                rows[cp] = metrics
                details[s][m][cp] = extras
                sweep.setdefault(s, {}).setdefault(m, {})[cp] = [
                    _sweep_point(m, adapter, texts[(cp, s, m, t)], items, t, nlls[(cp, s, m)].get(t)) for t in temps]
            report.setdefault(s, {})[m] = rows
            for i, it in enumerate(items):
                predictions.append({"set": s, "modality": m, "key": it.key, "reference": it.reference,
                                    "teacher": it.teacher_text,
                                    "outputs": {cp: texts[(cp, s, m, 0.0)][i] for cp in checkpoints if (cp, s, m, 0.0) in texts}})
    report[report_mod.SWEEP] = sweep
    atomic_write_json(ctx.dir / "details.json", details)
    report_mod.write_report(ctx.run.path, ctx.dir, report, predictions)
    return {"sets": len(sets), "samples": sum(len(i) for mods in sets.values() for i in mods.values()),
            "checkpoints": len(checkpoints) + 1, "generated": n_generated}


def compare_runs(runs: list[Path], out: Path | None = None) -> int:
    """`groundgan compare`: see stages.evaluation.report.compare_runs."""
    return report_mod.compare_runs(runs, out)
