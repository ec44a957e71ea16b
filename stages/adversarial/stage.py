"""The adversarial stage's loop: setup -> step -> finish over one Phase object that knows how to save itself."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed, faults
from pipeline.checkpoint import CheckpointManager
from pipeline.errors import UserError
from pipeline.files import atomic_write_text
from pipeline.graph import StageContext, register_stage
from pipeline.registry import modality_adapter
from stages.adversarial.config import RETIRED, AdversarialConfig, validate_config
from stages.adversarial.judges import (DISCRIMINATORS_DIR, DiscCounts, _teacher_body_builder, batch_reward,
                                       discriminator_batch, discriminator_step, pretrain_discriminators)
from stages.adversarial.losses import ce_loss, pg_objective
from stages.adversarial.rows import Rows, input_generator, real_rows, sample_rows, stream_seed, strip_labels
from stages.adversarial.teacher_scores import TeacherScores
from stages.distill import _truncate_metrics, val_decoding, validate_wer, write_val_predictions
from stages.models.discriminator import Discriminator, DiscriminatorSpec, build_discriminator, save_discriminators
from stages.models.labelled_data import Example, MixtureSampler, load_labelled, within_context
from stages.models.optim import adamw
from stages.models.selection import ConfirmedSelection
from stages.models.student import Student, load_student, save_student, student_folder, write_student
from stages.evaluation.text_metrics import distinct_n, self_bleu_4, transcribes

STUDENT = "student"
AVERAGED = "student_ema"
DISC_WEIGHT_DECAY = 0.01


def disc_name(modality: str) -> str:
    return f"discriminator.{modality}"


# ------------------------------------------------------------------------------------------------- stage
def progress(stage_dir: Path, cfg) -> str | None:
    """`groundgan status`: "step k of n" (discriminator warm-up steps included) from the newest checkpoint."""
    dirs = CheckpointManager(Path(stage_dir) / "checkpoints").step_dirs()
    k = int(dirs[-1].name.split("-")[1]) if dirs else 0
    a = cfg.root.adversarial
    return f"step {k} of {a.disc_warmup_steps + a.steps}"


def _copy_through(ctx: StageContext, src: Path) -> dict:
    """`enabled: false`: final/ is the distilled student, so evaluate finds the same files."""
    if ctx.dist.is_main:
        with student_folder(ctx.dir / "final") as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            atomic_write_text(tmp / "adversarial.json",
                              json.dumps({"enabled": False, "copied_from": str(src)}, indent=2) + "\n")
    return {"enabled": 0, "steps": 0}


def length_sums(real: Rows, fake: Rows) -> dict[str, float]:
    """Token and row counts of both sides of a batch (this process's slice; summed over processes before
    length_ratio): tokens after bos, the end token included on both sides alike."""
    return {"real_tokens": float(real.attention_mask[:, 1:].sum()), "real_rows": float(len(real)),
            "fake_tokens": float(fake.attention_mask[:, 1:].sum()), "fake_rows": float(len(fake))}


def length_ratio(sums: dict[str, float]) -> float | None:
    """The samples' mean length over the real side's (the same inputs): 1 writes as long as the labels, below 1
    shorter. None when either side is empty."""
    if not sums["real_rows"] or not sums["fake_rows"] or not sums["real_tokens"]:
        return None
    return (sums["fake_tokens"] / sums["fake_rows"]) / (sums["real_tokens"] / sums["real_rows"])


def guard_trip(guards, record: dict) -> str | None:
    """The reason the first tripped guard gives for `record` (None: all clear). A guard whose figure is
    missing from the record (None) does not trip."""
    checks = [("distinct_2", guards.min_distinct_2, lambda v, g: v < g, "<", "min_distinct_2"),
              ("self_bleu_4", guards.max_self_bleu_4, lambda v, g: v > g, ">", "max_self_bleu_4"),
              ("kl", guards.max_kl, lambda v, g: v > g, ">", "max_kl"),
              ("length_ratio", guards.min_length_ratio, lambda v, g: v < g, "<", "min_length_ratio")]
    for key, limit, trips, op, name in checks:
        v = record.get(key)
        if limit is not None and v is not None and trips(v, limit):
            return f"{key} {v:.4f} {op} guards.{name} {limit} at step {record['step']}"
    return None


@dataclass
class Phase:
    """What the stage's loop reads and updates: the models, their optimisers, the data and the counters that a
    checkpoint holds (state_dict)."""

    student: Student
    reference: Student
    discs: dict[str, Discriminator]
    s_opt: torch.optim.Optimizer
    d_opts: dict[str, torch.optim.Optimizer]
    sampler: MixtureSampler
    train: list[Example]
    val: list[Example]
    student_steps: int = 0
    stop_reason: str | None = None  # a guard tripped: the run is over
    best: dict = dataclasses.field(default_factory=lambda: {"step": None, "val_wer": None})
    checked_at: int | None = None  # the student step last validated
    selection: ConfirmedSelection | None = None  # select_by confirmed_val_wer
    scores: TeacherScores | None = None  # the teachers' own scores of the samples (teacher_score_weight)
    averaged: Student | None = None  # adversarial.ema: the moving average of the student's weights

    @property
    def kept(self) -> Student:
        """The student the val checks score and final/ may take: the moving average where there is one."""
        return self.averaged if self.averaged is not None else self.student

    def average(self, decay: float) -> None:
        """After a student step: avg <- decay avg + (1 - decay) weights, for every parameter the student trains."""
        if self.averaged is None:
            return
        with torch.no_grad():
            for a, p in zip(self.averaged.parameters(), self.student.parameters()):
                if p.requires_grad:
                    a.lerp_(p.detach(), 1.0 - decay)

    def models(self) -> dict:
        return {STUDENT: self.student, **({AVERAGED: self.averaged} if self.averaged is not None else {}),
                **{disc_name(m): d for m, d in self.discs.items()}}

    def optimizers(self) -> dict:
        return {STUDENT: self.s_opt, **{disc_name(m): o for m, o in self.d_opts.items()}}

    def state_dict(self) -> dict:
        return {"student_steps": self.student_steps, "early_stop": self.stop_reason, "best": dict(self.best),
                **({"selection": self.selection.state()} if self.selection is not None else {})}

    def load_state_dict(self, st: dict) -> None:
        self.student_steps = int(st["student_steps"])
        self.stop_reason = st.get("early_stop")
        self.best = dict(st.get("best", self.best))
        if self.selection is not None:
            self.selection.load_state(st.get("selection"))


def length_repeats(examples: list[Example], most: int) -> list[int]:
    """adversarial.length_repeats: per example, round(its label's tokens / the median of its modality's), between 1
    and most."""
    med: dict[str, float] = {}
    for m in {e.modality for e in examples}:
        med[m] = max(1.0, float(np.median([len(e.targets) for e in examples if e.modality == m])))
    return [int(min(most, max(1, round(len(e.targets) / med[e.modality])))) for e in examples]


def _setup(ctx: StageContext, src: Path) -> Phase:
    """The models (student, frozen reference, one discriminator per modality), their optimisers and the data."""
    cfg, device, dist = ctx.section, ctx.device, ctx.dist
    if cfg.batch_size < dist.world:
        raise UserError(f"adversarial.batch_size={cfg.batch_size} is smaller than the number of processes "
                        f"({dist.world}): some process would get no inputs")
    student = load_student(src, device).eval()
    reference = load_student(src, device).eval().requires_grad_(False)
    max_text_tokens = ctx.cfg.root.distill.max_text_tokens
    select = cfg.select_by != "last"
    data = load_labelled(ctx.input_dir("pseudo_label"), student.tokenizer, max_text_tokens,
                         splits=tuple(dict.fromkeys([*cfg.inputs, *(["val"] if select else [])])),
                         max_frames=student.spec.feature_frames if student.spec.style == "prefix" else None,
                         modalities=list(student.spec.modalities))
    train, _ = within_context([e for s in cfg.inputs for e in data.splits[s]], student.spec)
    val = within_context(data.splits["val"], student.spec)[0] if select else []
    if select and not any(transcribes(e.modality) and e.features is not None for e in val):
        raise UserError(f"adversarial.select_by: {cfg.select_by} needs val clips of a transcribing modality (audio) in the "
                        "pseudo_label stage's val split; there are none")
    if not train:
        raise UserError(f"adversarial: the pseudo_label stage left no examples in {', '.join(cfg.inputs)}")
    if not cfg.anchored:
        train = [strip_labels(e) for e in train]
    mods = sorted({e.modality for e in train})
    # disc_backbone teacher: the teacher's decoder judges the modality it labelled; another modality (images,
    # labelled by a classifier) gets a copy of the student: the Whisper decoder reading image features through
    # the student's projectors writes no caption it would know (docs/history.md)
    teacher_body, teacher_mod = (_teacher_body_builder(ctx, student, mods, device) if cfg.disc_backbone == "teacher"
                                 else (None, None))
    discs: dict[str, Discriminator] = {}
    # judge none: only the teacher's decoder judges (its log-likelihood is the reward); the other modalities'
    # samples get no reward, their rows cross-entropy and KL only
    for m in (mods if cfg.judge != "none" else [m for m in mods if m == teacher_mod]):
        spec = DiscriminatorSpec(modality=m, vocab_size=student.spec.text_vocab,
                                 feature_dim=int(student.spec.feature_dims.get(m, 0)),
                                 max_text_len=2 + max(cfg.max_new_tokens, max_text_tokens), head_reads=cfg.judge)
        body = teacher_body() if m == teacher_mod else load_student(src, device)
        discs[m] = build_discriminator(spec, body, device).train()
        body.requires_grad_(False)  # only the head and lm_scale learn
    # Adam with beta1 0.5 for the discriminators, the GAN habit (Radford et al. 2016): a target that moves.
    d_opts = {m: adamw(d.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999), weight_decay=DISC_WEIGHT_DECAY)
              for m, d in discs.items()}
    # No weight decay on the student: it would pull away from the distilled weights the KL keeps it near.
    s_opt = adamw([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    repeats = length_repeats(train, cfg.length_repeats) if (cfg.length_repeats or 1) > 1 else None
    if repeats is not None and dist.is_main:
        print(f"adversarial: length_repeats {cfg.length_repeats}: {sum(r > 1 for r in repeats)} of {len(repeats)} "
              f"inputs drawn more than once a pass (at most {max(repeats)} times); a pass is {sum(repeats)} draws")
    sampler = MixtureSampler(train, cfg.batch_size, cfg.modality_weights, ctx.cfg.root.seed, repeats)
    ph = Phase(student, reference, discs, s_opt, d_opts, sampler, train, val)
    if cfg.ema:
        ph.averaged = load_student(src, device).eval().requires_grad_(False)
    if cfg.select_by == "confirmed_val_wer":
        ph.selection = ConfirmedSelection(ctx.dir)
    if cfg.teacher_score_weight and cfg.anchored:
        scores = TeacherScores.build(mods, lambda m: modality_adapter(ctx.cfg.root, m), device,
                                     cfg.teacher_score_weight, skip=[teacher_mod] if teacher_mod else ())
        ph.scores = scores if scores.teachers else None  # no modality's teacher scores a text
    return ph


def _validate(ctx: StageContext, ph: Phase, step: int) -> None:
    """select_by val_wer: greedy WER of the student on the val clips, decoded as `decoding:` says; best/ keeps the
    lowest (the earlier student on a tie: the one nearer the distilled model). Once per student step."""
    if ctx.section.select_by == "last" or ph.checked_at == ph.student_steps:
        return
    ph.checked_at = ph.student_steps
    rows: list[dict] = []
    v = validate_wer(ph.kept, ph.val, ctx.section.batch_size, ctx.cfg.root.distill.max_text_tokens, ctx.dist, rows,
                     val_decoding(ctx.cfg.root))
    if ctx.dist.is_main:
        ctx.metric({"step": step, "student_steps": ph.student_steps, **v})
        ctx.scalars({f"val/{k[4:]}": x for k, x in v.items() if k.startswith("val_")}, step)
        write_val_predictions(ctx.dir, ph.student_steps, rows)
        if ph.selection is not None:
            ph.selection.check(ph.student_steps, v["val_wer"], None, lambda d: save_student(ph.kept, d))
            ph.best.update(step=ph.selection.best["step"], val_wer=ph.selection.best["val_wer"])
        elif v["val_wer"] is not None and (ph.best["val_wer"] is None or v["val_wer"] < ph.best["val_wer"]):
            save_student(ph.kept, ctx.dir / "best")
            ph.best.update(step=ph.student_steps, val_wer=v["val_wer"])
    ph.best.update(distributed.broadcast_object(dict(ph.best)))
    if ph.selection is not None:
        ph.selection.load_state(distributed.broadcast_object(ph.selection.state()))


def _step(ctx: StageContext, ph: Phase, it: int, autocast) -> dict:
    """Iteration `it`: sample, update every discriminator once, then (past the warm-up) the student once.
    Returns the iteration's metrics record (and the batch's texts and length sums under private keys)."""
    cfg, device, dist, seed = ctx.section, ctx.device, ctx.dist, ctx.cfg.root.seed
    k = cfg.k_samples
    # Every process draws the same global batch and takes its contiguous slice of whole inputs.
    examples = [ph.train[i] for i in ph.sampler.next_batch()]
    mine = [int(i) for i in np.array_split(np.arange(len(examples)), dist.world)[dist.rank]]
    local = [examples[i] for i in mine]
    # Dropout draws from a stream of this iteration and process: resume-exact, and not the same masks on every
    # process.
    torch.manual_seed(stream_seed("dropout", seed, it, dist.rank))
    gens = [input_generator(seed, it, i, device) for i in mine]
    moves = it >= cfg.disc_warmup_steps
    with autocast():
        fake, fake_texts = sample_rows(ph.student, local, k, gens, cfg.temperature, cfg.max_new_tokens, device)
        real = real_rows(local, cfg.anchored, ph.reference, cfg.temperature, cfg.max_new_tokens, device,
                         generators=gens)
    rec: dict = {"step": it + 1, "phase": "adversarial" if moves else "disc_warmup"}
    # accuracy and ranking are read before the discriminator learns from the batch
    for m, d in ph.discs.items() if cfg.judge != "none" else ():  # judge none: nothing to learn
        batch = discriminator_batch(m, real, fake, cfg.text_reward_all)
        counts = DiscCounts.of(batch, over_processes=True)
        if not counts.real_rows or not counts.fake_rows:
            continue
        st = distributed.sum_floats(discriminator_step(d, ph.d_opts[m], batch, cfg.grad_clip, autocast, counts,
                                                       over_processes=True), device)
        rec.update({f"disc_acc/{m}": st["acc"], f"disc_rank/{m}": st["rank"], f"disc_loss/{m}": st["bce"]})
    if moves:
        ce_weight = cfg.ce_weight if cfg.anchored else 0.0
        n_targets = sum(len(e.targets) for e in examples)  # the whole batch's, for the CE's mean
        ce = (lambda: ce_loss(ph.student, local, device, n_targets)) if ce_weight > 0 else None
        scores = ph.scores(fake, fake_texts) if ph.scores is not None else None
        with autocast():
            loss, st = pg_objective(ph.student, ph.reference, ph.discs, fake, k, kl_weight=cfg.kl_weight,
                                    pg_weight=cfg.pg_weight, text_reward_all=cfg.text_reward_all, ce=ce,
                                    ce_weight=ce_weight, teacher_scores=scores,
                                    length_neutral=bool(cfg.length_neutral),
                                    batch_modalities=sorted({e.modality for e in examples}))
        ph.s_opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sum_gradients(ph.student.parameters())
        st = distributed.sum_floats(st, device)
        st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
            ph.student.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        ph.s_opt.step()
        ph.average(cfg.ema)
        ph.student_steps += 1
        faults.point("step")
        rec.update(st)
    else:
        rec["reward"] = distributed.sum_floats({"reward": batch_reward(ph.discs, fake, cfg.text_reward_all)},
                                               device)["reward"]
    lengths = length_sums(real, fake)
    # samples stopped by the length cap (or max_new_tokens) without end-of-text: judged as they are, counted here
    last = fake.input_ids.gather(1, fake.attention_mask.sum(1, keepdim=True) - 1).squeeze(1)
    lengths["fake_unfinished"] = float((last != ph.student.spec.eot_id).sum())
    rec["_texts"], rec["_lengths"], rec["_label"] = fake_texts, lengths, examples[0].text
    return rec


def _log(ctx: StageContext, ph: Phase, rec: dict, moves: bool) -> None:
    """The batch's diversity, length and guard figures into `rec`, which goes to metrics.jsonl; a tripped guard
    sets ph.stop_reason."""
    texts = [t for part in distributed.all_gather_objects(rec["_texts"]) for t in part]  # in batch order
    rec["distinct_2"] = distinct_n(texts, 2)
    rec["self_bleu_4"] = self_bleu_4(texts)
    sums = distributed.sum_floats(rec["_lengths"], ctx.device)
    rec["length_ratio"] = length_ratio(sums)
    rec["unfinished"] = sums["fake_unfinished"] / sums["fake_rows"] if sums["fake_rows"] else None
    rec["sample"] = texts[0]
    rec["label"] = rec["_label"] if ctx.section.anchored else None
    ph.stop_reason = guard_trip(ctx.section.guards, rec) if moves else None
    if ph.stop_reason:
        rec["early_stop"] = ph.stop_reason
    ctx.metric({k: v for k, v in rec.items() if not k.startswith("_")})
    # the same figures to TensorBoard: the student's under train/, the judges' by name (disc_acc/audio, ...)
    ctx.scalars({k if "/" in k else f"train/{k}": v for k, v in rec.items()
                 if not k.startswith("_") and k not in ("step", "student_steps")}, rec["step"])


def _finish(ctx: StageContext, ph: Phase, done: int) -> dict:
    """final/: the selected student, the discriminators, what happened; the stage's counts."""
    cfg = ctx.section
    select = cfg.select_by != "last"
    best_dir, best = ctx.dir / "best", dict(ph.best)
    if ph.selection is not None:
        best_dir, pick = ph.selection.final_choice()
        best = {"step": pick.get("step"), "val_wer": pick.get("val_wer"), "score": pick.get("score")}
    summary = {"enabled": True, "anchored": cfg.anchored, "iterations": done, "student_steps": ph.student_steps,
               "early_stop": ph.stop_reason,
               "real_side": "teacher pseudo-labels" if cfg.anchored
               else "samples of the frozen distilled model (no teacher label)",
               "select_by": cfg.select_by, "selected_student_step": best["step"] if select else ph.student_steps,
               "selected_val_wer": best["val_wer"] if select else None,
               **({"selected_score": best.get("score")} if ph.selection is not None else {})}
    if ctx.dist.is_main:
        with student_folder(ctx.dir / "final") as tmp:
            if select and best["step"] is not None and best_dir is not None and best_dir.is_dir():
                shutil.copytree(best_dir, tmp, dirs_exist_ok=True)
            else:
                write_student(ph.kept, tmp)
            save_discriminators(ph.discs, tmp / DISCRIMINATORS_DIR)
            atomic_write_text(tmp / "adversarial.json", json.dumps(summary, indent=2) + "\n")
    counts = {"steps": ph.student_steps, "disc_warmup_steps": min(done, cfg.disc_warmup_steps), "train": len(ph.train),
              "discriminators": len(ph.discs), "early_stopped": int(ph.stop_reason is not None),
              "selected_student_step": summary["selected_student_step"]}
    if ph.stop_reason:
        counts["early_stop_step"] = done
        counts["early_stop_reason"] = ph.stop_reason
    return counts


@register_stage("adversarial", after=("pseudo_label", "distill"), progress=progress,
                reads=("decoding", "distill.max_text_tokens", "distill.student"),
                config_class=AdversarialConfig, validate=validate_config, order=40, retired=RETIRED, extends="steps",
                description="discriminators anchored to real inputs; the student by policy gradient on their rewards")
def run(ctx: StageContext) -> dict:
    cfg, dist = ctx.section, ctx.dist
    src = ctx.input_dir("distill") / "final"
    if not (src / "student.json").is_file():
        raise UserError(f"adversarial: no distilled student in {src}; run the distill stage first")
    if not cfg.enabled:
        return _copy_through(ctx, src)
    # Data parallel under torchrun: every process builds the same models and draws the same global batch,
    # takes its slice of whole inputs, and divides its losses by the whole batch's counts; gradients are
    # summed over processes (distributed.sum_gradients). Only the main process writes.
    ph = _setup(ctx, src)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if str(ctx.device).startswith("cuda")
                else contextlib.nullcontext)
    ckpts = ctx.checkpoints()
    loaded = ckpts.load_latest(ph.models(), ph.optimizers(), map_location=ctx.device)
    start = 0
    if loaded is not None:
        start = loaded.step
        ph.sampler.load_state_dict(loaded.state["data"])
        ph.load_state_dict(loaded.state["extra"])
    if dist.is_main:
        _truncate_metrics(ctx.dir / "metrics.jsonl", start)
    if start == 0:
        ctx.metric({"event": "start", "train": len(ph.train), "modalities": sorted(ph.discs), "anchored": cfg.anchored,
                    "ce_weight": cfg.ce_weight if cfg.anchored else 0.0})
        if cfg.disc_pretrain_epochs > 0:
            pretrain_discriminators(ph.discs, ph.d_opts, ph.train, ph.reference, cfg, ctx.cfg.root.seed, ctx.device,
                                    autocast, ctx.metric)
        _validate(ctx, ph, 0)  # the distilled student: the phase must beat it to be kept

    def save_checkpoint(done: int) -> None:
        if dist.is_main:
            ckpts.save(done, ph.models(), ph.optimizers(), data_state=ph.sampler.state_dict(), extra=ph.state_dict())
            if ph.selection is not None:
                ph.selection.checkpointed()

    total = cfg.disc_warmup_steps + cfg.steps
    bar = ctx.progress_bar(total=total, initial=start)
    done = start
    for it in range(start, total if ph.stop_reason is None else start):
        moves = it >= cfg.disc_warmup_steps
        rec = _step(ctx, ph, it, autocast)
        if moves and ph.student_steps % cfg.val_every == 0:
            _validate(ctx, ph, it + 1)
        done = it + 1
        if done % cfg.log_every == 0 or done == total:
            _log(ctx, ph, rec, moves)
        bar.update(1)
        if ph.stop_reason:
            if dist.is_main:
                print(f"adversarial: early stop: {ph.stop_reason}")
            save_checkpoint(done)
            break
        if done % cfg.checkpoint_every == 0 or done == total:
            if done == total:
                _validate(ctx, ph, done)
            save_checkpoint(done)
    bar.close()
    if ph.stop_reason:
        _validate(ctx, ph, done)
    return _finish(ctx, ph, done)
