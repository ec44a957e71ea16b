"""The judges: which rows each discriminator learns from, its loss and update, its sequence score as the reward,
the pre-training before step 0, and the teacher's decoder as a judge's body."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline import distributed
from pipeline.errors import UserError
from pipeline.graph import StageContext
from stages.adversarial.losses import _bce_side, global_count, sequence_rewards
from stages.adversarial.rows import Rows, real_rows, rows_from_tokens, sample_rows, stream_seed
from stages.models.discriminator import Discriminator, sequence_logits
from stages.models.discriminator import load_discriminators as _load_discriminators_dir
from stages.models.labelled_data import Example
from stages.models.student import Student

DISCRIMINATORS_DIR = "discriminators"
LABEL_SMOOTHING = 0.1  # one-sided (Salimans et al. 2016): the real side's target is 0.9


@dataclass
class DiscBatch:
    """What one discriminator learns from in one step."""

    real: Rows
    fake: Rows


def _row_texts(rows: Rows) -> list[tuple[int, tuple[int, ...]]]:
    """(source, token ids) of every row, padding left out."""
    ids, mask = rows.input_ids.tolist(), rows.attention_mask.tolist()
    return [(src, tuple(t for t, m in zip(r, mr) if m)) for src, r, mr in zip(rows.source, ids, mask)]


def discriminator_batch(modality: str, real: Rows, fake: Rows, text_reward_all: bool) -> DiscBatch:
    """The rows of `modality` from each side. The plain-text discriminator (text_reward_all) also takes every
    fake row, whatever its modality: it then rewards fluency everywhere.

    A sample that is word for word a real row of the same input is not fake, whoever wrote it: it leaves the
    fake side (no discriminator can tell the two apart, and calling it fake only fights the real row's target).
    The same holds token by token: the tokens a sample shares with the start of a real row of its input are not
    judged fake (the same context and the same next token are the real row's too); the sample is judged from
    the first token where it leaves every real row of its input."""
    r = [i for i, m in enumerate(real.modality) if m == modality]
    texts = _row_texts(real)
    real_texts = {texts[i] for i in r}
    fake_texts = _row_texts(fake)
    f = [i for i, m in enumerate(fake.modality)
         if (m == modality or (text_reward_all and modality == "text")) and fake_texts[i] not in real_texts]
    fake_rows = fake.select(f)
    if f:
        judged = fake_rows.judged_mask().clone()
        for j, i in enumerate(f):
            src, toks = fake_texts[i]
            shared = max((_common_prefix(toks[1:], rt[1:]) for s_, rt in real_texts if s_ == src), default=0)
            judged[j, :shared] = 0
        fake_rows.judged = judged
    return DiscBatch(real.select(r), fake_rows)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class DiscCounts:
    """The sizes of a discriminator's batch that its losses and stats divide by (float tensors)."""

    real_rows: torch.Tensor
    fake_rows: torch.Tensor
    real_tokens: torch.Tensor  # judged positions: attention_mask[:, 1:]
    fake_tokens: torch.Tensor

    @staticmethod
    def of(batch: DiscBatch, over_processes: bool = False) -> "DiscCounts":
        """This batch's counts; over_processes: summed over every process (each holding a slice)."""
        r, f = batch.real, batch.fake
        c = torch.stack([torch.tensor(float(len(r))), torch.tensor(float(len(f))),
                         r.attention_mask[:, 1:].sum().float().cpu(), f.judged_mask().sum().float().cpu()])
        c = c.to(r.input_ids.device)
        if over_processes:
            distributed.all_reduce_sum(c)
        return DiscCounts(*c.unbind())


def ranking(real_scores: dict[int, float], fake: Sequence[tuple[int, float]]) -> float:
    """Hits of real-above-fake over the fake rows: each fake row (source, score) scores 1 where the real row of its
    input scores above it, 1/2 on a tie, 0 below (rows without a real row of their input are left out of the
    hits). Free of the logits' offset, which the sides' imbalance and the label smoothing shift (accuracy then
    sits at 0.5 while the order is right)."""
    return sum(1.0 if real_scores[src] > x else 0.5 if real_scores[src] == x else 0.0
               for src, x in fake if src in real_scores)


def discriminator_loss(d: Discriminator, batch: DiscBatch, counts: DiscCounts | None = None,
                       smoothing: float = LABEL_SMOOTHING) -> tuple[torch.Tensor, dict]:
    """BCE of one discriminator on one batch (token logits), and its accuracy and ranking on that batch read
    from the rows' sequence scores, as the rewards read them (Discriminator.judge, one pass).

    counts: the whole batch's sizes when `batch` is one process's slice of it (DiscCounts.of(batch, True)):
    the loss and the stats are then this slice's shares, and either side of the slice may be empty.
    """
    r, f = batch.real, batch.fake
    c = counts if counts is not None else DiscCounts.of(batch)
    loss = torch.zeros((), device=r.input_ids.device)
    stats = {"bce": 0.0, "acc": 0.0, "rank": 0.0}
    if len(r):
        real_logits, real_seq = d.judge(r.input_ids, r.attention_mask, r.features)
        real_seq = real_seq.detach().float()
        loss = loss + _bce_side(real_logits.float(), r.attention_mask[:, 1:], 1.0 - smoothing, c.real_tokens)
        # balanced over the two sides, which differ in size (k samples per input)
        stats["acc"] += 0.5 * float((real_seq > 0).float().sum() / c.real_rows.clamp_min(1.0))
    if len(f):
        fake_logits, fake_seq = d.judge(f.input_ids, f.attention_mask, f.features)
        fake_seq = fake_seq.detach().float()
        loss = loss + _bce_side(fake_logits.float(), f.judged_mask(), 0.0, c.fake_tokens)
        stats["acc"] += 0.5 * float((fake_seq <= 0).float().sum() / c.fake_rows.clamp_min(1.0))
    stats["bce"] = float(loss.detach())
    if len(r) and len(f):  # real and fake rows of an input are on the same process
        stats["rank"] = ranking(dict(zip(r.source, real_seq.tolist())),
                                list(zip(f.source, fake_seq.tolist()))) / float(c.fake_rows.clamp_min(1.0))
    return loss, stats


def discriminator_step(d: Discriminator, opt, batch: DiscBatch, grad_clip: float, autocast,
                       counts: DiscCounts | None = None, over_processes: bool = False) -> dict:
    """One update of `d` on `batch` (discriminator_loss, then clipping and the optimiser step); returns the
    loss's stats, taken before the update. over_processes: `batch` is this process's slice (counts are the
    whole batch's) and the gradients are summed over processes before the step."""
    d.train()
    with autocast():
        loss, st = discriminator_loss(d, batch, counts)
    opt.zero_grad(set_to_none=True)
    if loss.requires_grad:  # else this process holds none of the batch's rows
        loss.backward()
    if over_processes:
        distributed.sum_gradients(d.parameters())
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(d.parameters(), grad_clip)
    opt.step()
    return st


def pretrain_discriminators(discs: dict, d_opts: dict, train: list[Example], reference: Student, cfg,
                            seed: int, device, autocast, metric: Callable[[dict], None]) -> None:
    """disc_pretrain_epochs passes over a pool built once: every phase input's real row against one sample
    of the frozen distilled model about it (unanchored: two of its samples), so that a discriminator starts
    the adversarial steps having judged every input, not a few batches of them (a few hundred rows in
    40 steps only fit, and stay at chance on fresh inputs). Every process runs the same passes from the same
    seeds (no gradient exchange needed: the updates are identical). One metrics record per pass."""
    gens = [torch.Generator(device=device).manual_seed(stream_seed("pretrain", seed, i)) for i in range(len(train))]
    pool: list[tuple[Rows, Rows]] = []
    n = cfg.batch_size
    for b in range(0, len(train), n):
        exs = [train[i] for i in range(b, min(b + n, len(train)))]
        g = gens[b: b + len(exs)]
        with torch.no_grad(), autocast():
            fake, _ = sample_rows(reference, exs, 1, g, cfg.temperature, cfg.max_new_tokens, device)
            real = real_rows(exs, cfg.anchored, reference, cfg.temperature, cfg.max_new_tokens, device, generators=g)
        pool.append((real, fake))
    order = np.random.default_rng(stream_seed("pretrain-order", seed)).permutation
    for epoch in range(cfg.disc_pretrain_epochs):
        sums: dict[str, list[float]] = {}
        for j, bi in enumerate(order(len(pool)).tolist()):
            real, fake = pool[bi]
            torch.manual_seed(stream_seed("pretrain-dropout", seed, epoch, j))
            for m, d in discs.items():
                batch = discriminator_batch(m, real, fake, cfg.text_reward_all)
                if not len(batch.real) or not len(batch.fake):
                    continue
                st = discriminator_step(d, d_opts[m], batch, cfg.grad_clip, autocast)
                for key in ("bce", "acc", "rank"):
                    sums.setdefault(f"pretrain_disc_{key}/{m}", []).append(st[key])
        metric({"phase": "disc_pretrain", "epoch": epoch + 1, **{k: float(np.mean(v)) for k, v in sums.items()}})


def batch_reward(discs: dict[str, Discriminator], fake: Rows, text_reward_all: bool) -> float:
    """This process's share of the batch's mean discriminator score (before the student's log-likelihood)."""
    seq = sequence_rewards(discs, fake, text_reward_all)
    return float(seq.sum() / global_count(torch.tensor(float(len(seq)), device=seq.device)))


# ---------------------------------------------------------------------------------------- evaluate's view
def load_discriminators(final_dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Discriminator]:
    """The discriminators saved in an adversarial final/ folder, by modality (FileNotFoundError: none)."""
    return _load_discriminators_dir(Path(final_dir) / DISCRIMINATORS_DIR, device)


@torch.no_grad()
def discriminator_probs(discs: dict[str, Discriminator], modality: str, texts: Sequence[str],
                        features: Sequence[torch.Tensor | None], tokenizer, batch_size: int = 32) -> list[float]:
    """P(real) of each (text, features) pair by the modality's discriminator: its sequence logit (at the
    last token) through a sigmoid. Texts are tokenised as labels are (bos + tokens + eot)."""
    d = discs[modality]
    d.eval()
    cap = d.spec.max_text_len - 2
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        seqs = []
        for t in texts[i: i + batch_size]:
            toks = tokenizer.encode(t or "")
            seqs.append(toks[:cap] if len(toks) > cap else toks + [tokenizer.eot])
        chunk = list(features[i: i + batch_size])
        rows = rows_from_tokens(seqs, [modality] * len(seqs), chunk, list(range(len(seqs))), tokenizer.bos,
                                tokenizer.eot, d.device)
        lg = d(rows.input_ids, rows.attention_mask, rows.features).float()
        out += torch.sigmoid(sequence_logits(lg, rows.attention_mask)).tolist()
    return out


def _teacher_body_builder(ctx: StageContext, student, mods: list[str], device):
    """disc_backbone: teacher. (build, modality): the modality the Whisper teacher labelled, and a function
    that builds a discriminator body for it: a student with every decoder layer
    of the Whisper teacher (the distilled student keeps some of them), reading the same encoder states, with
    the distilled student's projectors and modality-marker embeddings for the modalities the teacher does not
    read. It starts out knowing what the teacher would write for each input, which a copy of the student does
    not: on the train inputs the student's samples and the teacher's labels mostly agree, and where they do
    not, the student cannot tell which of the two is wrong."""
    import dataclasses

    from stages.distill import _whisper_teacher
    from stages.models.student import build_student

    ck, teacher_mod = _whisper_teacher(ctx, mods)
    if ck is None:
        raise UserError("adversarial.disc_backbone: teacher needs a modality labelled by a Whisper teacher; "
                        f"none of {', '.join(mods)} is")
    scfg = dataclasses.replace(ctx.cfg.root.distill.student,
                               keep_decoder_layers=list(range(int(ck["dims"]["n_text_layer"]))),
                               projector_norm=student.spec.projector_norm)
    feature_dims = dict(student.spec.feature_dims)
    max_text_tokens = ctx.cfg.root.distill.max_text_tokens

    def build():
        body = build_student(scfg, feature_dims, device, ck, teacher_mod, max_text_tokens)
        if body.spec.marker_ids != student.spec.marker_ids or set(body.projectors) != set(student.projectors):
            raise UserError("adversarial.disc_backbone: teacher: the teacher's decoder and the distilled student "
                            "disagree on modalities or marker tokens")
        with torch.no_grad():
            body.projectors.load_state_dict(student.projectors.state_dict())
            mine, theirs = body.lm.get_input_embeddings().weight, student.lm.get_input_embeddings().weight
            mine[student.spec.text_vocab:] = theirs[student.spec.text_vocab:]
        return body

    return build, teacher_mod


