"""distill: train the student on the teachers' pseudo-labels.

Loss per target token: cross-entropy on the pseudo-label, plus (kd_weight > 0, where the student reads the
teacher's own tokenizer) the KL from the teacher's stored top-k distribution to the student's, both at
kd_temperature (Hinton's T^2 scaling). Both are means over the tokens of the global batch, so a run on N
processes computes the same loss and gradient as a run on one.

RUN/distill/
    checkpoints/step-XXXXXX/    student weights (and their moving average, ema_decay > 0), AdamW, scheduler,
                                RNGs, sampler state, best-so-far
    best/                       the best student by validation so far (save_student layout): the lowest
                                val loss, or with select_by: val_wer the lowest WER on the val clips (decoded
                                as the evaluate stage decodes)
    final/                      the student to use: best/ (or the last step without a val split) + README.md
    metrics.jsonl, tensorboard/ train loss / lr / tokens per second; val loss, token accuracy, val WER, a sample
    val_predictions/step_XXXXXX.jsonl   with select_by: val_wer, each val clip's label, text and errors
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import distributed, faults
from pipeline.checkpoint import CheckpointManager
from pipeline.config import check_choice, minimum
from pipeline.errors import UserError
from pipeline.files import atomic_write_text
from pipeline.graph import StageContext, register_stage
from pipeline.registry import modality_registry
from stages.ingest import holds_pool
from stages.models.generation import generate
from stages.models.labelled_data import Batch, Example, MixtureSampler, collate, load_labelled, within_context
from stages.models.optim import adamw
from stages.models.selection import ConfirmedSelection
from stages.models.student import (Student, StudentConfig, build_student, build_tokenizer, count_parameters,
                                   save_student, student_folder, whisper_silence, write_student)

# ------------------------------------------------------------------------------------------------------ config
# A default of None is the recipe's choice for this run, made when the config loads (validate): the measured
# setting wherever it applies, else the nearest valid one; `groundgan config` says which it took.
@dataclass
class DistillConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    steps: int = field(default=600, metadata=minimum(0))  # optimiser steps
    batch_size: int = field(default=16, metadata=minimum(1))  # global batch, whatever the world size
    grad_accum: int = field(default=1, metadata=minimum(1))
    lr: float = field(default=1e-4, metadata=minimum(0.0))  # peak; linear warm-up, then cosine down to 10%
    weight_decay: float = field(default=0.01, metadata=minimum(0.0))
    warmup_steps: int = field(default=20, metadata=minimum(0))
    grad_clip: float = field(default=1.0, metadata=minimum(0.0))
    kd_weight: float = field(default=0.8, metadata=minimum(0.0))  # weight of KL to the teacher's top-k log-probs (pseudo_label.top_k)
    kd_temperature: float = field(default=2.0, metadata=minimum(0.01))
    max_text_tokens: int = field(default=96, metadata=minimum(4))
    modality_weights: Dict[str, float] = field(default_factory=dict)  # sampling weight per modality (default 1)
    inputs: List[str] = field(default_factory=lambda: ["train"])  # pseudo_label splits trained on: train, augmented, pool
    val_every: int = field(default=50, metadata=minimum(1))
    # which validation figure picks final/: val_wer (the val clips decoded as `decoding:` says, WER against
    # their labels; ties go to the lower val_loss), confirmed_val_wer (the same, a check's student scored by the
    # worse of its WER and the next check's: stages/models/selection.py) or val_loss (teacher-forced
    # cross-entropy on the val labels). None: val_wer where a modality transcribes (audio), else val_loss
    select_by: Optional[str] = None
    # > 0: keep an exponential moving average of the student's weights (decay per step, warmed up as
    # min(decay, (1 + t) / (10 + t))); validation, best/ and final/ use the average, training the raw weights
    ema_decay: float = field(default=0.0, metadata=minimum(0.0))
    # cross_attention on a Whisper teacher: the share of training steps whose clips are followed by the teacher's
    # encoding of zero log-mel frames in place of silence (openai-whisper's transcribe pads a clip's log-mel with
    # zeros; the exported checkpoint then reads both paddings). Drawn per step from the run's seed.
    # None: 0.25 for a cross_attention student on a Whisper teacher, else 0
    zero_pad_share: Optional[float] = field(default=None, metadata=minimum(0.0))
    checkpoint_every: int = field(default=50, metadata=minimum(1))


def whisper_modalities(root) -> list[str]:
    """The run's modalities labelled by a Whisper teacher (whose decoder a cross_attention student starts from)."""
    return [m for m, c in sorted(root.modalities.items())
            if getattr(getattr(c, "teacher", None), "kind", None) == "whisper"]


def transcribing_modalities(root) -> list[str]:
    """The run's modalities whose labels are transcripts (scored by WER)."""
    return [m for m in sorted(root.modalities) if modality_registry.get(m).transcribes]


def take(section, name: str, value, why: str | None, notes: list[str], graph: list[str]) -> None:
    """Fill a setting left at None with the recipe's choice `value`; where `why` (a fallback), say so in `notes`,
    if the stage that owns the setting is in the graph."""
    if getattr(section, name) is None:
        setattr(section, name, value)
        if why and why.split(".")[0] in graph:
            notes.append(f"{why}: {value}")


def check_inputs(root, section: str) -> None:
    """`<section>.inputs`: pseudo_label splits that exist in this run."""
    names = getattr(root, section).inputs
    if not names or any(n not in ("train", "augmented", "pool") for n in names) or len(set(names)) != len(names):
        raise UserError(f"config: '{section}.inputs' must list train, augmented and/or pool, each once, got {names!r}")
    if "pool" in names and not holds_pool(root):
        raise UserError(f"config: '{section}.inputs' names pool, but ingest.split.pool is 0 and no source has "
                        "split: pool: no input is held back")
    if "augmented" in names and root.pseudo_label.augment_copies == 0:
        raise UserError(f"config: '{section}.inputs' names augmented, but pseudo_label.augment_copies is 0: "
                        "the pseudo_label stage makes no augmented copies")


def validate_config(root) -> list[str]:
    """The recipe's choices for the student's style, its frozen embeddings and the selection; the checks."""
    d, st, notes = root.distill, root.distill.student, []
    whisper, transcribes = whisper_modalities(root), transcribing_modalities(root)
    take(st, "style", "cross_attention" if whisper else "prefix",
         None if whisper else "distill.student.style (no modality has a Whisper teacher whose decoder it could be)",
         notes, root.stages)
    take(st, "freeze_embeddings", st.style == "cross_attention", None, notes, root.stages)
    take(d, "zero_pad_share", 0.25 if st.style == "cross_attention" and whisper else 0.0, None, notes, root.stages)
    take(d, "select_by", "confirmed_val_wer" if transcribes else "val_loss",
         None if transcribes else "distill.select_by (no modality transcribes)", notes, root.stages)
    check_choice(st.style, ("prefix", "cross_attention"), "distill.student.style")
    check_choice(st.tokenizer, ("whisper", "init_from"), "distill.student.tokenizer")
    check_choice(st.projector, ("mlp", "transformer"), "distill.student.projector")
    check_choice(d.select_by, ("val_loss", "val_wer", "confirmed_val_wer"), "distill.select_by")
    if d.select_by != "val_loss" and not transcribes:
        raise UserError(f"config: distill.select_by={d.select_by} needs a modality that transcribes (audio)")
    if not d.ema_decay < 1.0:
        raise UserError(f"config: 'distill.ema_decay' must be in [0, 1) (0: off), got {d.ema_decay!r}")
    if not d.zero_pad_share <= 1.0:
        raise UserError(f"config: 'distill.zero_pad_share' is a share of steps in [0, 1], got {d.zero_pad_share!r}")
    if d.zero_pad_share > 0 and (st.style != "cross_attention" or not whisper):
        raise UserError("config: 'distill.zero_pad_share' pads a Whisper teacher's encoding; it needs "
                        "distill.student.style=cross_attention and a modality with a Whisper teacher")
    check_inputs(root, "distill")
    return notes


MODEL = "student"  # the name of the student's weights and optimiser in checkpoints
EMA_MODEL = "student_ema"  # the moving average of its weights (distill.ema_decay > 0)


def progress(stage_dir: Path, cfg) -> str | None:
    """`groundgan status`: "step k of n" from the newest checkpoint."""
    dirs = CheckpointManager(Path(stage_dir) / "checkpoints").step_dirs()
    k = int(dirs[-1].name.split("-")[1]) if dirs else 0
    return f"step {k} of {cfg.root.distill.steps}"


class EMA:
    """An exponential moving average of a model's weights (Polyak averaging; timm's ModelEmaV2, lingua's and
    nanoGPT-style trainers keep one to smooth out the last steps' noise). The decay is warmed up as
    min(decay, (1 + t) / (10 + t)) so the first steps do not pin the average to the initial weights.
    Floating-point parameters and buffers are averaged; frozen ones and integer buffers are copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def rate(self, step: int) -> float:
        """The decay applied at optimiser step `step` (1-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.rate(step)
        mine = dict(self.model.named_parameters())
        avg, new = [], []
        for name, p in model.named_parameters():
            if p.requires_grad and p.is_floating_point():
                avg.append(mine[name])
                new.append(p.detach())
            elif not p.requires_grad:
                mine[name].copy_(p)
        if avg:
            torch._foreach_lerp_(avg, new, 1.0 - d)
        if hasattr(self.model, "sync_marker_rows"):  # the table copied above holds the live model's marker rows
            self.model.sync_marker_rows()
        bufs = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            if b.is_floating_point():
                bufs[name].lerp_(b, 1.0 - d)
            else:
                bufs[name].copy_(b)


def lr_multiplier(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up from 1/warmup to 1 over `warmup` steps, then cosine down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))


def target_positions(batch: Batch) -> torch.Tensor:
    """bool [B, L]: the positions whose next token is a target (logits there predict input_ids[:, t + 1])."""
    m = batch.attention_mask[:, 1:].bool()
    return torch.cat([m, m.new_zeros(m.shape[0], 1)], dim=1)


def token_losses(logits: torch.Tensor, batch: Batch, kd_temperature: float, with_kd: bool) -> dict[str, torch.Tensor]:
    """Sums over the batch's target tokens: ce, kd (KL(teacher top-k || student) * T^2), correct (argmax hits).

    logits: Student.forward(..., keep=target_positions(batch)), [N, V] for the N target tokens in row-major
    order (or the whole [B, L, V], from which those rows are taken).
    """
    m = batch.attention_mask[:, 1:].bool()
    if logits.dim() == 3:
        logits = logits[target_positions(batch)]
    lg = logits.float()
    tgt = batch.input_ids[:, 1:][m]
    ce = F.cross_entropy(lg, tgt, reduction="sum")
    out = {"ce": ce, "correct": (lg.detach().max(-1).indices == tgt).sum().to(lg.dtype)}  # max().indices: argmax
    if with_kd and batch.topk_ids is not None:
        tau = kd_temperature
        student_lp = torch.log_softmax(lg / tau, dim=-1).gather(-1, batch.topk_ids[m])  # [N, k]
        teacher_lp = torch.log_softmax(batch.topk_logprobs[m] / tau, dim=-1)  # renormalised over its top-k
        kl = (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1) * tau * tau
        out["kd"] = (kl * batch.kd_mask[m].to(kl.dtype)).sum()
    else:
        out["kd"] = lg.new_zeros(())
    return out


def _kd_positions(e: Example) -> int:
    return 0 if e.topk_ids is None else min(len(e.topk_ids), len(e.targets))


def student_length_cap(pl_dir: Path, tokenizer, train: list[Example], spec) -> dict:
    """The decoding cap the student keeps in its spec (StudentSpec.length_cap): pseudo_label's fit on the train
    labels (length_cap.json), refitted the same way on the train examples where the student counts tokens with
    another tokenizer than the one the fit counted them in; a constant at the longest train input for a student
    whose frames are not the teacher's (prefix style pools them). {}: pseudo_label fitted none."""
    from stages.models.length_cap import constant_cap, fit_examples
    from stages.pseudo_label import read_length_cap

    got = read_length_cap(pl_dir)
    if not got or not got.get("modalities"):
        return {}
    fits = dict(got["modalities"])
    if tokenizer.spec.get("kind") != got["tokenizer"].get("kind"):
        fits = fit_examples(train, got.get("min_margin", 1.5))
    if spec.style != "cross_attention":
        fits = {m: constant_cap(c) for m, c in fits.items()}
    return fits


def _whisper_teacher(ctx: StageContext, modalities: list[str]) -> tuple[dict | None, str | None]:
    """The openai-whisper checkpoint {"dims", "model_state_dict"} of the first modality labelled by a Whisper
    teacher, and that modality; (None, None) when there is none."""
    for m in modalities:
        mcfg = ctx.cfg.root.modalities.get(m)
        teacher = getattr(mcfg, "teacher", None)
        if teacher is not None and getattr(teacher, "kind", None) == "whisper":
            import dataclasses

            from modalities.whisper_teacher import load_whisper

            model, _, _ = load_whisper(teacher)
            return {"dims": dataclasses.asdict(model.dims), "model_state_dict": model.state_dict()}, m
    return None, None


def _param_groups(student: Student, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on embeddings (tied to the output; the marker rows of a frozen table
    included), norms, biases or the queries."""
    emb = student.lm.get_input_embeddings().weight
    decay, no_decay, seen = [], [], set()
    for p in student.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and p is not emb and p is not student.marker_rows else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def validate(student: Student, examples: list[Example], batch_size: int, device: str, dist: distributed.DistInfo,
             autocast) -> dict[str, float]:
    """Mean target-token cross-entropy and argmax accuracy over `examples` (each rank takes every world-th)."""
    was = student.training
    student.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)  # ce, correct, tokens
    mine = examples[dist.rank:: dist.world]
    for i in range(0, len(mine), batch_size):
        batch = collate(mine[i: i + batch_size], student.spec.bos_id, student.spec.eot_id, device)
        with autocast():
            logits = student(batch.input_ids, batch.attention_mask, batch.modality, batch.features,
                             keep=target_positions(batch))
        s = token_losses(logits, batch, 1.0, with_kd=False)
        tot += torch.stack([s["ce"].double(), s["correct"].double(), torch.tensor(float(batch.n_targets), device=device, dtype=torch.float64)])
    if dist.world > 1:
        torch.distributed.all_reduce(tot)
    student.train(was)
    n = max(1.0, float(tot[2]))
    return {"val_loss": float(tot[0]) / n, "val_token_acc": float(tot[1]) / n, "val_tokens": int(tot[2])}


def val_decoding(root) -> dict:
    """How validate_wer decodes: as the evaluate stage does (`decoding:`: its Whisper temperature fallback and
    loop checks), so that the step a stage keeps by val WER is the best under the decoding its held-out WER is
    scored with (plain greedy counts loops that the fallback re-decodes; docs/results.md)."""
    d = root.decoding
    return {"fallback": list(d.fallback_temperatures), "max_compression_ratio": d.max_compression_ratio,
            "min_avg_logprob": d.min_avg_logprob, "best_of": d.best_of, "max_ngram_repeats": d.max_ngram_repeats,
            "seed": root.seed}


@torch.no_grad()
def validate_wer(student: Student, examples: list[Example], batch_size: int, max_new_tokens: int,
                 dist: distributed.DistInfo, predictions: list[dict] | None = None,
                 decoding: dict | None = None) -> dict[str, float | None]:
    """Greedy decoding of the val examples of transcript modalities (each rank takes every world-th batch) and
    the corpus WER against their labels (text_metrics: Whisper's normaliser, labels that normalise to "" left
    out): {"val_wer": pooled, "val_wer_<modality>": each}. Free-running, unlike val_loss: it sees the
    repetition loops and early stops that teacher forcing hides. A long clip's chunks are examples of their
    own here (load_labelled), so this is short-form WER.

    decoding (val_decoding: fallback temperatures, loop checks, best_of, seed): a piece whose greedy text
    fails the checks is decoded again by sampling (generation.generate_texts), batch j from a generator seeded
    by (seed, j): the same stream at every check, so two checks of equal weights write equal texts. With a
    fallback, "val_wer_greedy" is plain greedy's figure beside it. `predictions`, when given, gets one row per
    decoded example ({key, modality, label, prediction, errors, words}, and with a fallback the greedy text):
    which clips a WER comes from."""
    from stages.evaluation import text_metrics as tm
    from stages.models.generation import generate_texts

    decoding = dict(decoding or {})
    seed = decoding.pop("seed", 0)
    was = student.training
    student.eval()
    rows = [i for i, e in enumerate(examples) if tm.transcribes(e.modality) and e.features is not None]
    mine: dict[int, str] = {}
    greedy: dict[int, str] = {}
    for j in range(0, len(rows), batch_size):
        if (j // batch_size) % dist.world != dist.rank:
            continue
        part = rows[j: j + batch_size]
        by_mod: dict[str, list[int]] = {}
        for i in part:
            by_mod.setdefault(examples[i].modality, []).append(i)
        for m, idx in by_mod.items():
            feats = [examples[i].features.float() for i in idx]
            gen = torch.Generator(device=student.device).manual_seed(
                int(hashlib.sha256(f"val/{seed}/{j}/{m}".encode()).hexdigest()[:15], 16))
            first: list[str] = []
            mine.update(zip(idx, generate_texts(student, m, feats, temperature=0.0, max_new_tokens=max_new_tokens,
                                                generator=gen, first_pass=first, **decoding)))
            greedy.update(zip(idx, first))
    student.train(was)
    merged: dict[int, str] = {}
    for d in distributed.all_gather_objects(mine):
        merged.update(d)
    a = tm.align([merged[i] for i in rows], [examples[i].text for i in rows])
    out: dict[str, float | None] = {"val_wer": a.wer}
    plain: dict[int, str] = {}
    if decoding.get("fallback"):
        for d in distributed.all_gather_objects(greedy):
            plain.update(d)
        out["val_wer_greedy"] = tm.wer([plain[i] for i in rows], [examples[i].text for i in rows])[0]
    if predictions is not None:
        scored = dict(zip(a.kept, zip(a.errors, a.ref_words)))  # a label that normalises to "" is not scored
        for j, i in enumerate(rows):
            errors, words = scored.get(j, (None, 0))
            predictions.append({"key": examples[i].key, "modality": examples[i].modality, "label": examples[i].text,
                                "prediction": merged[i], "errors": errors, "words": words,
                                **({"greedy": plain[i]} if plain else {})})
    for m in sorted({examples[i].modality for i in rows}):  # from the same alignment, modality by modality
        sel = [n for n, j in enumerate(a.kept) if examples[rows[j]].modality == m]
        words = sum(a.ref_words[n] for n in sel)
        out[f"val_wer_{m}"] = sum(a.errors[n] for n in sel) / words if words else None
    return out


def write_val_predictions(stage_dir: Path, step: int, rows: list[dict]) -> None:
    """validate_wer's rows at one validation, as <stage>/val_predictions/step_<step>.jsonl (written whole, then
    renamed): which val clips a swing of val WER comes from (a loop, a dropped clause)."""
    atomic_write_text(stage_dir / "val_predictions" / f"step_{step:06d}.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def better(new: dict, best: dict, select_by: str) -> bool:
    """Whether validation figures `new` beat `best` under select_by (val_loss, or val_wer with val_loss
    breaking ties); anything beats an empty best, and a missing val_wer (no transcript clips) never wins."""
    if best.get("step") is None:
        return True
    if select_by == "val_wer":
        if new.get("val_wer") is None:
            return False
        if best.get("val_wer") is None:
            return True
        return (new["val_wer"], new["val_loss"]) < (best["val_wer"], best["val_loss"])
    return new["val_loss"] < best["val_loss"]


@register_stage("distill", after=("pseudo_label",), progress=progress, reads=("decoding",), extends="steps",
                config_class=DistillConfig, validate=validate_config, order=30,
                description="train the student LM on pseudo-labels: cross-entropy + top-k KD, exact resume")
def run(ctx: StageContext) -> dict:
    cfg, scfg, dist, device = ctx.section, ctx.section.student, ctx.dist, ctx.device
    if cfg.batch_size < dist.world * cfg.grad_accum:
        raise UserError(f"distill.batch_size={cfg.batch_size} is smaller than processes x grad_accum "
                        f"({dist.world} x {cfg.grad_accum}): some process would get no rows")

    # ---- data and model
    tokenizer = build_tokenizer(scfg)
    data = load_labelled(ctx.input_dir("pseudo_label"), tokenizer, cfg.max_text_tokens,
                         splits=tuple(dict.fromkeys([*cfg.inputs, "val"])),
                         max_frames=scfg.feature_frames if scfg.style == "prefix" else None)
    train, val = [e for s in cfg.inputs for e in data.splits[s]], data.splits["val"]
    if not train:
        raise UserError("distill: the pseudo_label stage left no train examples (all filtered or rejected?)")
    teacher_ck, teacher_mod = _whisper_teacher(ctx, data.modalities()) if scfg.style == "cross_attention" else (None, None)
    student = build_student(scfg, data.feature_dims, device, teacher_ck, teacher_mod, cfg.max_text_tokens)
    zero_pad = (whisper_silence(teacher_ck, zero_mel=True).to(device)
                if cfg.zero_pad_share > 0 and student.source_pad is not None else None)
    del teacher_ck
    student.spec = dataclasses.replace(student.spec, length_cap=student_length_cap(
        ctx.input_dir("pseudo_label"), tokenizer, train, student.spec))
    train, long_train = within_context(train, student.spec)
    val, long_val = within_context(val, student.spec)
    data.splits["train"], data.splits["val"] = train, val
    data.counts["longer_than_context"] = long_train + long_val
    student.train()
    if scfg.freeze_embeddings:
        # The text rows stay as they were; the marker rows (new) still learn.
        student.freeze_text_rows()
    with_kd = cfg.kd_weight > 0 and tokenizer.spec["kind"] == "whisper" and data.counts["kd_examples"] > 0
    model = student
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # find_unused_parameters: a process whose rows hold no audio leaves the audio projector unused.
        model = DDP(student, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
                    find_unused_parameters=True)
    ema = EMA(student, cfg.ema_decay) if cfg.ema_decay > 0 else None
    scored = ema.model if ema is not None else student  # the weights validation scores and final/ keeps
    opt = adamw(_param_groups(student, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    opt.register_step_post_hook(student.sync_marker_rows)  # a frozen table's marker rows follow their parameter
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg.warmup_steps, cfg.steps))
    sampler = MixtureSampler(train, cfg.batch_size, cfg.modality_weights, ctx.cfg.root.seed)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.startswith("cuda")
                else contextlib.nullcontext)

    # ---- resume
    ckpts = ctx.checkpoints()
    start, best = 0, {"step": None, "val_loss": None, "val_wer": None}
    confirmed = cfg.select_by == "confirmed_val_wer"
    selection = ConfirmedSelection(ctx.dir)
    models = {MODEL: student, **({EMA_MODEL: ema.model} if ema is not None else {})}
    loaded = ckpts.load_latest(models, {MODEL: opt}, sched, map_location=device)
    if loaded is not None:
        start = loaded.step
        sampler.load_state_dict(loaded.state["data"])
        best = dict(loaded.state["extra"].get("best", best))
        selection = ConfirmedSelection(ctx.dir, loaded.state["extra"].get("selection"))
        # the schedule of this run's total: after a kill the same value; when the stage trains longer (a larger
        # `steps`), the rate a run configured with the new total has at this step, not the old run's last one
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * lr_multiplier(start, cfg.warmup_steps, cfg.steps)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    if dist.is_main:
        _truncate_metrics(ctx.dir / "metrics.jsonl", start)
    if start == 0 and dist.is_main:
        ctx.metric({"event": "start", "params": count_parameters(student), "train": len(train), "val": len(val),
                    "modalities": data.feature_dims, "kd": with_kd, "init": student.spec.init, **data.counts,
                    "length_cap": student.spec.length_cap})

    def validate_and_keep_best(step: int) -> None:
        if not val:
            return
        v = validate(scored, val, cfg.batch_size, device, dist, autocast)
        rows: list[dict] = []
        if cfg.select_by != "val_loss":
            v.update(validate_wer(scored, val, cfg.batch_size, cfg.max_text_tokens, dist, rows,
                                  val_decoding(ctx.cfg.root)))
        sample = _val_sample(scored, val[0])
        if dist.is_main:
            ctx.metric({"step": step, **v, "sample": sample, "label": val[0].text})
            if rows:
                write_val_predictions(ctx.dir, step, rows)
            ctx.scalars({f"val/{k[4:]}": x for k, x in v.items() if k != "val_tokens"}, step)
            if confirmed:
                selection.check(step, v.get("val_wer"), v["val_loss"], lambda d: save_student(scored, d))
                best.update({k: selection.best[k] for k in best})
            elif better(v, best, cfg.select_by):
                save_student(scored, ctx.dir / "best")
                best.update(step=step, val_loss=v["val_loss"], val_wer=v.get("val_wer"))
        best.update(distributed.broadcast_object(dict(best)))
        if confirmed:
            selection.load_state(distributed.broadcast_object(selection.state()))

    # ---- train
    bar = ctx.progress_bar(total=cfg.steps, initial=start)
    t_last, tok_since = time.time(), 0
    for step in range(start, cfg.steps):
        rows = sampler.next_batch()
        batch_examples = [train[i] for i in rows]
        n_targets = sum(len(e.targets) for e in batch_examples)
        n_kd = sum(_kd_positions(e) for e in batch_examples) if with_kd else 0
        mine = np.array_split(np.arange(len(rows)), dist.world)[dist.rank]
        micro = np.array_split(mine, cfg.grad_accum)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # ce, kd, correct
        tail = zero_pad if zero_pad is not None and _zero_pad_step(ctx.cfg.root.seed, step, cfg.zero_pad_share) else None
        for j, part in enumerate(micro):
            batch = collate([batch_examples[i] for i in part], student.spec.bos_id, student.spec.eot_id, device)
            sync = (model.no_sync if dist.world > 1 and j < len(micro) - 1 else contextlib.nullcontext)
            with sync():
                with autocast(), student.tail(tail):
                    logits = model(batch.input_ids, batch.attention_mask, batch.modality, batch.features,
                                   keep=target_positions(batch))
                s = token_losses(logits, batch, cfg.kd_temperature, with_kd)
                loss = s["ce"] / n_targets + (cfg.kd_weight * s["kd"] / max(1, n_kd) if with_kd else 0.0)
                # DDP averages gradients over processes; each holds a slice of the global batch, so its
                # share of the global mean is multiplied back by the world size.
                (loss * dist.world).backward()
            sums += torch.stack([s["ce"].detach().double(), s["kd"].detach().double(), s["correct"].double()])
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if ema is not None:
            ema.update(student, done)
        faults.point("step")
        if dist.world > 1:
            torch.distributed.all_reduce(sums)
        ce, kd = float(sums[0]) / n_targets, float(sums[1]) / max(1, n_kd)
        rec = {"step": done, "loss": ce + (cfg.kd_weight * kd if with_kd else 0.0), "ce": ce, "lr": lr,
               "grad_norm": float(grad_norm), "token_acc": float(sums[2]) / n_targets, "epoch": round(sampler.epoch, 4)}
        if with_kd and n_kd:  # a batch without KD targets (drawings only) has no KD term, not a KD of 0
            rec["kd"] = kd
        tok_since += n_targets
        if dist.is_main:
            ctx.metric(rec)
            figures = {f"train/{k}": rec[k] for k in ("loss", "ce", "kd", "lr", "grad_norm") if k in rec}
            now = time.time()
            if now - t_last > 1.0 or done == cfg.steps:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tok_since / (now - t_last):.0f}")
                figures["train/tokens_per_s"] = tok_since / (now - t_last)
                t_last, tok_since = now, 0
            ctx.scalars(figures, done)
            bar.update(1)
        if done % cfg.val_every == 0 or done == cfg.steps:
            validate_and_keep_best(done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if dist.is_main:
                ckpts.save(done, models, {MODEL: opt}, sched, data_state=sampler.state_dict(),
                           extra={"best": dict(best), **({"selection": selection.state()} if confirmed else {})})
                if confirmed:
                    selection.checkpointed()
            distributed.barrier()
    bar.close()
    if cfg.steps == 0:
        validate_and_keep_best(0)

    # ---- final/: the best student by validation loss (the last one without a val split), with a card
    if dist.is_main:
        chosen = best["step"]
        best_dir = ctx.dir / "best"
        if confirmed:
            best_dir, pick = selection.final_choice()
            chosen = pick.get("step")
            best = dict(best, **{k: pick[k] for k in ("step", "val_loss", "val_wer", "score") if k in pick})
        with student_folder(ctx.dir / "final") as tmp:
            if chosen is not None and best_dir is not None and best_dir.is_dir():
                shutil.copytree(best_dir, tmp, dirs_exist_ok=True)
            else:
                chosen = cfg.steps
                write_student(scored, tmp)
            atomic_write_text(tmp / "README.md", _model_card(ctx, scored, data, chosen, best))
    distributed.barrier()
    return {"steps": cfg.steps, "train": len(train), "val": len(val), "best_step": int(best["step"] or cfg.steps),
            "best_val_wer": best.get("val_wer"),
            "kd_examples": data.counts["kd_examples"] if with_kd else 0}


def _zero_pad_step(seed: int, step: int, share: float) -> bool:
    """Whether step `step` (0-based) reads the zero log-mel tail: a draw from (seed, step) alone, so a resumed
    run and every process draw the same."""
    return share > 0 and random.Random(seed * 1_000_003 + step).random() < share


def _val_sample(student: Student, e: Example) -> str:
    """A greedy decode of one val example: a cheap look at what the student writes."""
    f = [e.features.float()] if e.features is not None else None
    return generate(student, e.modality, f, n=1, max_new_tokens=min(48, len(e.targets) + 8)).texts[0]


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run is the same run: drop metric records past the checkpoint it resumes from."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        # From step 0 the stage writes every record again (its start event, the adversarial phase's pre-training
        # and its check of the distilled student at step 0): none is kept. Past a checkpoint, the records up to it
        # are, the step-less ones (written at the start) included.
        if step > 0 and ("step" not in rec or rec["step"] <= step):
            keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _model_card(ctx: StageContext, student: Student, data, step: int, best: dict) -> str:
    spec = student.spec
    counts = {s: len(v) for s, v in data.splits.items()}
    per_mod = {}
    for s, exs in data.splits.items():
        for e in exs:
            per_mod.setdefault(e.modality, {}).setdefault(s, 0)
            per_mod[e.modality][s] += 1
    teachers = "; ".join(f"{m}: {', '.join(t) or 'none'}" for m, t in sorted(data.teachers.items()))
    cfg = ctx.section
    lines = [
        "# groundgan student (distill)", "",
        f"- style: {spec.style}; LM: {type(student.lm).__name__}, {count_parameters(student):,} parameters, "
        f"initialised from {spec.init}",
        f"- tokenizer: {spec.tokenizer.get('kind')}; modalities and feature sizes: "
        + ", ".join(f"{m} (D={spec.feature_dims[m]}, marker id {spec.marker_ids[m]})" for m in spec.modalities),
        f"- teachers: {teachers}",
        f"- data: {counts.get('train', 0)} train, {counts.get('val', 0)} val examples; per modality "
        + ", ".join(f"{m} {v}" for m, v in sorted(per_mod.items()))
        + f"; {data.counts.get('truncated', 0)} labels truncated to {cfg.max_text_tokens} tokens"
        + (f"; {data.counts['chunked']} long clips trained chunk by chunk (as the teacher labelled them)"
           if data.counts.get("chunked") else "")
        + (f"; {data.counts['longer_than_context']} clips longer than the decoder's context left out"
           if data.counts.get("longer_than_context") else ""),
        f"- training: {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, kd_weight {cfg.kd_weight} "
        f"(top-k rows on {data.counts.get('kd_examples', 0)} examples)"
        + (f"; these are the moving average of its weights (ema_decay {cfg.ema_decay})" if cfg.ema_decay > 0 else ""),
        f"- this checkpoint: step {step}" + (
            " (the last; no val split)" if best["val_loss"] is None else
            f", the lowest greedy WER on the val clips ({best['val_wer']:.2%}; validation loss "
            f"{best['val_loss']:.4f} nats/token)" if cfg.select_by == "val_wer" and best.get("val_wer") is not None else
            f", the lowest val WER confirmed by the next check ({best['val_wer']:.2%} here, {best['score']:.2%} the "
            f"worse of the two; validation loss {best['val_loss']:.4f} nats/token)"
            if cfg.select_by == "confirmed_val_wer" and best.get("score") is not None else
            f", the lowest validation loss ({best['val_loss']:.4f} nats/token)"),
        "", "Load: `stages.models.student.load_student(this_dir)`; the LM alone: "
        "`AutoModelForCausalLM.from_pretrained(this_dir + '/lm')` (rows start with a modality marker id).", "",
    ]
    return "\n".join(lines)
