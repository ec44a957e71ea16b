"""adversarial: the distilled student keeps learning from discriminators that compare what it writes about a
real input with what the teacher said about the same input.

Every step, for a batch of real train inputs (their features):
  1. fake side: the student samples k texts per input (the previous iterate samples them under `spin`);
  2. real side: the teacher's pseudo-labels of those inputs (plus their references where use_references);
     `anchored: false` replaces it by samples of the frozen distilled model for the same inputs - "the
     student's own earlier samples" - and no teacher label, reference or cross-entropy enters the stage
     (the labels are dropped as the data is loaded);
  3. disc_steps updates of every discriminator D_m on that one batch: per-token BCE with one-sided label
     smoothing (real target 1 - label_smoothing), dropout, weight decay, an R1-style gradient penalty on the
     real side's token embeddings;
  4. after disc_warmup_steps discriminator-only steps, one student step:
       pg    REINFORCE with dense rewards r_t = sum_d w_d * logit_d(y_<=t | x) (= log D - log(1 - D)),
             returns G_t = sum_{s>=t} discount^(s-t) r_s, a baseline (leave-one-out over the k samples of an
             input, per position; or an EMA per position), plus kl_weight * KL(student || reference) and
             ce_weight * cross-entropy on the pseudo-labels. KL (kl_estimator): `exact` is the full-vocabulary
             KL at every sampled position, a differentiable loss term; `sampled` is log pi - log ref at the
             sampled token, subtracted from the reward (the usual RLHF form, whose gradient is unbiased).
       spin  self-play (SPIN): DPO's logistic loss with beta spin_beta preferring each real row over the
             previous iterate's samples of the same input, the previous iterate as the reference; it is
             refreshed to the student every spin_iterate_steps steps. The KL (exact) and CE terms as pg.
  5. guards every log_every steps: distinct-2 and self-BLEU-4 of the samples, per-modality discriminator
     accuracy (on the fresh batch, before the discriminator learns from it), KL to the reference, mean
     reward; a guard of adversarial.guards that trips ends the stage early, with its reason.

The student samples and is scored in eval mode (no dropout), so the log-probs of the policy gradient are
those of the distribution that drew the samples (at temperature 1).

RUN/adversarial/
    checkpoints/step-XXXXXX/   student, discriminator.<m>, (previous), their AdamW states, sampler + RNGs
    final/                     the student (save_student layout), discriminators/<m>.{safetensors,json},
                               adversarial.json (steps, stop reason, settings)
    metrics.jsonl              one record every log_every steps
    best/, val_predictions/    with select_by: val_wer, the student of the lowest val WER so far, and each
                               check's val texts and errors (step_<student step>.jsonl)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import distributed, faults
from pipeline.checkpoint import CheckpointManager
from pipeline.errors import UserError
from pipeline.files import atomic_write_text
from pipeline.graph import StageContext, register_stage
from stages.discriminator import (Discriminator, DiscriminatorSpec, build_discriminator, save_discriminators,
                                  sequence_logits)
from stages.discriminator import load_discriminators as _load_discriminators_dir
from stages.distill import _truncate_metrics, val_decoding, validate_wer, write_val_predictions
from stages.generation import generate, ngram_repeats
from stages.labelled_data import Example, MixtureSampler, collate, load_labelled, within_context
from stages.student import Student, load_student, save_student
from stages.text_metrics import TRANSCRIPT_MODALITIES, distinct_n, self_bleu_4

STUDENT = "student"
PREVIOUS = "previous"  # spin: the previous iterate
DISCRIMINATORS_DIR = "discriminators"


def disc_name(modality: str) -> str:
    return f"discriminator.{modality}"


# ------------------------------------------------------------------------------------------------ losses
def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """G_t = sum_{s>=t} discount^(s-t) r_s over a row's own tokens: [N, L], [N, L] -> [N, L] (0 past the end)."""
    r = rewards * mask
    out = torch.zeros_like(r)
    run = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        run = r[:, t] + discount * run
        out[:, t] = run
    return out * mask


def loo_baseline(values: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out baseline: rows come in groups of k (the k samples of one input); each row's baseline is
    the mean of the other k-1 rows of its group, position by position (a finished row counts 0: it earns
    nothing more). [N, L] -> [N, L]. k = 1: zeros."""
    if k < 2:
        return torch.zeros_like(values)
    g = values.view(-1, k, *values.shape[1:])
    return ((g.sum(1, keepdim=True) - g) / (k - 1)).reshape(values.shape)


def pg_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
            n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE: -sum(A_t * log pi(y_t)) / number of tokens; the advantages are constants. [N, L] each.
    n_tokens: the denominator when these rows are one process's slice of a larger batch (default mask.sum())."""
    m = mask.to(logprobs.dtype)
    n = m.sum() if n_tokens is None else n_tokens
    return -(advantages.detach() * logprobs * m).sum() / n.clamp_min(1.0)


def dpo_loss(pi_win: torch.Tensor, ref_win: torch.Tensor, pi_lose: torch.Tensor, ref_lose: torch.Tensor,
             beta: float, n_pairs: torch.Tensor | None = None) -> torch.Tensor:
    """DPO / SPIN logistic loss, mean over pairs of -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)));
    every argument [P] holds sequence log-probs (sums over tokens). n_pairs: the denominator when these
    pairs are one process's slice of a larger batch (default P)."""
    losses = -F.logsigmoid(beta * ((pi_win - ref_win) - (pi_lose - ref_lose)))
    return losses.mean() if n_pairs is None else losses.sum() / n_pairs.clamp_min(1.0)


def disc_bce(real_logits: torch.Tensor, real_mask: torch.Tensor, fake_logits: torch.Tensor,
             fake_mask: torch.Tensor, smoothing: float, n_real: torch.Tensor | None = None,
             n_fake: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token BCE with one-sided label smoothing (Salimans et al. 2016): the mean over real tokens of
    BCE(logit, 1 - smoothing) plus the mean over fake tokens of BCE(logit, 0). Logits and masks [N, L].
    n_real, n_fake: the token counts to divide by when these rows are one process's slice of a larger batch."""
    return _bce_side(real_logits, real_mask, 1.0 - smoothing, n_real) + _bce_side(fake_logits, fake_mask, 0.0, n_fake)


def _bce_side(logits: torch.Tensor, mask: torch.Tensor, target: float, n: torch.Tensor | None) -> torch.Tensor:
    m = mask.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    return (bce * m).sum() / (m.sum() if n is None else n).clamp_min(1.0)


def exact_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) at every position over the vocabulary: log-probs [N, L, V] -> [N, L]."""
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of x where mask is 1; n: the count to divide by instead of mask.sum() (a slice's share of a
    larger batch's mean)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / (m.sum() if n is None else n).clamp_min(1.0)


def global_count(x: torch.Tensor) -> torch.Tensor:
    """A count over the whole batch: `x` (this process's count, a tensor) summed over every process.

    Under torchrun each process holds a slice of the batch; a loss that is a sum over its rows divided by
    the whole batch's count has gradients that, summed over the processes (distributed.sum_gradients), are
    the single-process gradients. Stats made the same way are each process's share (distributed.sum_floats).
    """
    return distributed.all_reduce_sum(x.detach().float().clone())


# -------------------------------------------------------------------------------------------------- rows
@dataclass
class Rows:
    """Texts about real inputs, as the student and the discriminators read them. N rows, L positions."""

    input_ids: torch.Tensor  # [N, L] bos y_1 .. (eot), right-padded with eot
    attention_mask: torch.Tensor  # [N, L] 1 on bos and tokens
    modality: list[str]  # [N]
    features: list[torch.Tensor | None]  # N rows [T_i, D] float32 (None: no features)
    source: list[int]  # [N] the batch input each row is about
    judged: torch.Tensor | None = None  # [N, L-1] the positions a discriminator's loss counts (None: every token)

    def __len__(self) -> int:
        return len(self.modality)

    def judged_mask(self) -> torch.Tensor:
        """[N, L-1]: 1 where a discriminator's loss counts the token y_t (default: every token)."""
        return self.attention_mask[:, 1:] if self.judged is None else self.judged

    def select(self, keep: Sequence[int]) -> "Rows":
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.input_ids.device)
        width = max(1, int(self.attention_mask[idx].sum(1).max())) if len(keep) else 1
        return Rows(self.input_ids[idx, :width], self.attention_mask[idx, :width], [self.modality[i] for i in keep],
                    [self.features[i] for i in keep], [self.source[i] for i in keep],
                    None if self.judged is None else self.judged[idx, : width - 1])


def rows_from_tokens(seqs: Sequence[Sequence[int]], modality: Sequence[str], features: Sequence, source: Sequence[int],
                     bos: int, pad: int, device) -> Rows:
    """Token lists (y_1 .. y_n, eot included where the text ends) -> Rows with bos in front."""
    L = 1 + max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, 0] = bos
        ids[i, 1: 1 + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : 1 + len(s)] = 1
    return Rows(ids.to(device), mask.to(device), list(modality),
                [None if f is None else f.to(device) for f in features], list(source))


def rows_from_generated(gen, modality, features, source, bos: int) -> Rows:
    """Rows of what `generate` returned: bos + generated tokens (the stopping eot included)."""
    n = gen.tokens.shape[0]
    ids = torch.cat([gen.tokens.new_full((n, 1), bos), gen.tokens], dim=1)
    mask = torch.cat([gen.mask.new_ones(n, 1), gen.mask], dim=1)
    return Rows(ids, mask, list(modality), list(features), list(source))


def _features(e: Example, device) -> torch.Tensor | None:
    return e.features.to(device=device, dtype=torch.float32) if e.features is not None else None


def strip_labels(e: Example) -> Example:
    """`anchored: false`: the example without its teacher label or reference (its input stays)."""
    return replace(e, text="", targets=[], topk_ids=None, topk_logprobs=None, reference=None)


def stream_seed(*parts) -> int:
    """A 63-bit seed that is a function of `parts` alone (their sha256), for one independent random stream."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def input_generator(seed: int, iteration: int, index: int, device) -> torch.Generator:
    """The random stream input `index` of the batch of `iteration` samples from: a function of those three
    numbers alone, so a sample does not depend on the number of processes or on which one holds the input,
    and a resumed run draws what the uninterrupted one drew."""
    return torch.Generator(device=device).manual_seed(stream_seed("adversarial", seed, iteration, index))


def sample_rows(model: Student, examples: list[Example], per_input: int, generators: Sequence[torch.Generator | None],
                temperature: float, max_new_tokens: int, device, greedy: bool = False) -> tuple[Rows, list[str]]:
    """`per_input` samples of `model` about each example, and their texts. Each example is decoded in a call
    of its own from its own generator, so its rows never depend on which other inputs share the process.
    Rows come in consecutive groups of per_input; a row's source is its example's index in `examples`.
    greedy: each group's first row is the greedy decode (temperature 0), the others sampled."""
    seqs, texts, mods, feats, src = [], [], [], [], []
    for i, (e, g) in enumerate(zip(examples, generators)):
        f = _features(e, device)
        gens = [generate(model, [e.modality], [f], temperature=0.0, max_new_tokens=max_new_tokens)] if greedy else []
        n_sampled = per_input - len(gens)
        if n_sampled > 0:
            gens.append(generate(model, [e.modality] * n_sampled, [f] * n_sampled, temperature=temperature,
                                 max_new_tokens=max_new_tokens, generator=g))
        for gen in gens:
            seqs += [row[:n] for row, n in zip(gen.tokens.tolist(), gen.mask.sum(1).tolist())]
            texts += gen.texts
        mods += [e.modality] * per_input
        feats += [f] * per_input
        src += [i] * per_input
    return rows_from_tokens(seqs, mods, feats, src, model.spec.bos_id, model.spec.eot_id, device), texts


def real_rows(examples: list[Example], anchored: bool, use_references: bool, reference: Student, tokenizer,
              max_text_tokens: int, temperature: float, max_new_tokens: int, device,
              generators: Sequence[torch.Generator | None] | None = None) -> Rows:
    """The real side of one batch. Anchored: each input's pseudo-label (and its reference, where
    use_references and the source has one). Unanchored: one sample of the frozen distilled model per input,
    drawn from that input's generator (None: the global RNG)."""
    bos, eot = reference.spec.bos_id, reference.spec.eot_id
    if not anchored:
        return sample_rows(reference, examples, 1, generators or [None] * len(examples), temperature,
                           max_new_tokens, device)[0]
    feats = [_features(e, device) for e in examples]
    seqs, mods, fs, src = [], [], [], []
    for i, e in enumerate(examples):
        seqs.append(e.targets)
        mods.append(e.modality), fs.append(feats[i]), src.append(i)
        if use_references and e.reference and e.reference.strip() != e.text.strip():
            toks = tokenizer.encode(e.reference)
            seqs.append(toks[:max_text_tokens] if len(toks) > max_text_tokens else toks + [eot])
            mods.append(e.modality), fs.append(feats[i]), src.append(i)
    return rows_from_tokens(seqs, mods, fs, src, bos, eot, device)


@dataclass
class DiscBatch:
    """What one discriminator learns from in one step."""

    real: Rows
    fake: Rows


def _row_texts(rows: Rows) -> list[tuple[int, tuple[int, ...]]]:
    """(source, token ids) of every row, padding left out."""
    ids, mask = rows.input_ids.tolist(), rows.attention_mask.tolist()
    return [(src, tuple(t for t, m in zip(r, mr) if m)) for src, r, mr in zip(rows.source, ids, mask)]


def discriminator_batch(modality: str, real: Rows, fake: Rows, text_reward_all: bool,
                        from_divergence: bool = False) -> DiscBatch:
    """The rows of `modality` from each side. The plain-text discriminator (text_reward_all) also takes every
    fake row, whatever its modality: it then rewards fluency everywhere.

    A sample that is word for word a real row of the same input is not fake, whoever wrote it: it leaves the
    fake side (no discriminator can tell the two apart, and calling it fake only fights the real row's target).
    With a good student these collisions are most of its samples; what is left is where it differs.

    from_divergence: the same reasoning token by token. The tokens a sample shares with the start of a real
    row of its input are not judged fake (the same context and the same next token are the real row's too, and
    calling them fake teaches a dense discriminator the opposite of its real target there); the sample is
    judged from the first token where it leaves every real row of its input."""
    r = [i for i, m in enumerate(real.modality) if m == modality]
    texts = _row_texts(real)
    real_texts = {texts[i] for i in r}
    fake_texts = _row_texts(fake)
    f = [i for i, m in enumerate(fake.modality)
         if (m == modality or (text_reward_all and modality == "text")) and fake_texts[i] not in real_texts]
    fake_rows = fake.select(f)
    if from_divergence and f:
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


def judges_of(modality: str, discs: dict, weights: dict[str, float], text_reward_all: bool) -> list[tuple[str, float]]:
    """(discriminator name, weight) of every discriminator that rewards a sample of `modality`."""
    out = [(modality, float(weights.get(modality, 1.0)))] if modality in discs else []
    if text_reward_all and modality != "text" and "text" in discs:
        out.append(("text", float(weights.get("text", 1.0))))
    return out


def _judgements(discs: dict[str, Discriminator], rows: Rows, weights: dict[str, float], text_reward_all: bool,
                judge: Callable[[Discriminator, Rows], torch.Tensor]):
    """(row indices, weight, judge(d, rows of them)) for every discriminator d judging some of `rows`, each
    called in eval mode (its mode is restored after)."""
    for m in sorted(set(rows.modality)):
        idx = [i for i, mm in enumerate(rows.modality) if mm == m]
        sub = rows.select(idx)
        for name, w in judges_of(m, discs, weights, text_reward_all):
            d = discs[name]
            was = d.training
            d.eval()
            try:
                out = judge(d, sub).float()
            finally:
                d.train(was)
            yield torch.tensor(idx, device=rows.input_ids.device), w, out


@torch.no_grad()
def token_rewards(discs: dict[str, Discriminator], rows: Rows, weights: dict[str, float],
                  text_reward_all: bool) -> torch.Tensor:
    """r_t = sum over the discriminators judging the row of w_d * logit_d at t: [N, L-1] (eval mode)."""
    out = torch.zeros(rows.input_ids.shape[0], rows.input_ids.shape[1] - 1, device=rows.input_ids.device)
    for idx, w, lg in _judgements(discs, rows, weights, text_reward_all,
                                  lambda d, sub: d(sub.input_ids, sub.attention_mask, sub.features)):
        out[idx, : lg.shape[1]] += w * lg
    return out * rows.attention_mask[:, 1:].to(out.dtype)


def _judge(d, rows: Rows, token_embeds: torch.Tensor | None = None,
           sequence: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A discriminator's token logits [N, L-1] and score of each row [N] from one pass: Discriminator.judge, or
    (a bare module, or sequence=False) its forward and the last token's logit as the row's score."""
    judge = getattr(d, "judge", None) if sequence else None
    if judge is not None:
        return judge(rows.input_ids, rows.attention_mask, rows.features, token_embeds=token_embeds)
    extra = {} if token_embeds is None else {"token_embeds": token_embeds}
    logits = d(rows.input_ids, rows.attention_mask, rows.features, **extra)
    return logits, sequence_logits(logits, rows.attention_mask)


@torch.no_grad()
def sequence_rewards(discs: dict[str, Discriminator], rows: Rows, weights: dict[str, float],
                     text_reward_all: bool) -> torch.Tensor:
    """R = sum over the discriminators judging the row of w_d * its sequence score (eval mode): [N]."""
    out = torch.zeros(rows.input_ids.shape[0], device=rows.input_ids.device)
    for idx, w, sc in _judgements(discs, rows, weights, text_reward_all, lambda d, sub: _judge(d, sub)[1]):
        out[idx] += w * sc
    return out


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


def discriminator_loss(d: Discriminator, batch: DiscBatch, smoothing: float, grad_penalty: float,
                       counts: DiscCounts | None = None, reward_level: str = "token") -> tuple[torch.Tensor, dict]:
    """BCE (+ gradient penalty) of one discriminator on one batch, and its sequence accuracy on that batch.
    The accuracy and ranking read each row's sequence score as the rewards do: the last token's logit, or with
    reward_level "sequence" the score of Discriminator.judge, taken from the same pass as the logits the loss
    trains on (with lm_score it differs from the last token's logit).

    counts: the whole batch's sizes when `batch` is one process's slice of it (DiscCounts.of(batch, True)):
    the loss and the stats are then this slice's shares, and either side of the slice may be empty.
    """
    r, f = batch.real, batch.fake
    c = counts if counts is not None else DiscCounts.of(batch)
    loss = torch.zeros((), device=r.input_ids.device)
    stats = {"bce": 0.0, "acc": 0.0, "rank": 0.0, **({"gp": 0.0} if grad_penalty > 0 else {})}
    sequence = reward_level == "sequence"
    real_logits = fake_logits = None
    if len(r):
        emb = d.embed(r.input_ids) if grad_penalty > 0 else None
        real_logits, real_seq = _judge(d, r, emb, sequence)
        real_logits, real_seq = real_logits.float(), real_seq.detach().float()
    if len(f):
        fake_logits, fake_seq = _judge(d, f, sequence=sequence)
        fake_logits, fake_seq = fake_logits.float(), fake_seq.detach().float()
    if real_logits is not None:
        rm = r.attention_mask[:, 1:]
        loss = loss + _bce_side(real_logits, rm, 1.0 - smoothing, c.real_tokens)
    if fake_logits is not None:
        loss = loss + _bce_side(fake_logits, f.judged_mask(), 0.0, c.fake_tokens)
    stats["bce"] = float(loss.detach())
    if grad_penalty > 0 and real_logits is not None:
        # R1 on the real side (Mescheder et al. 2018), with the token embeddings as the input.
        g, = torch.autograd.grad((real_logits * rm).sum(), emb, create_graph=True)
        gp = (g.pow(2).sum(-1) * r.attention_mask).sum() / c.real_rows.clamp_min(1.0)
        loss = loss + grad_penalty * gp
        stats["gp"] = float(gp.detach())
    # balanced over the two sides, which differ in size (k samples per input)
    if real_logits is not None:
        stats["acc"] += 0.5 * float((real_seq > 0).float().sum() / c.real_rows.clamp_min(1.0))
    if fake_logits is not None:
        stats["acc"] += 0.5 * float((fake_seq <= 0).float().sum() / c.fake_rows.clamp_min(1.0))
    if real_logits is not None and fake_logits is not None:
        # ranking: does the real row of an input score above each of that input's samples? Free of the
        # logits' offset, which the sides' imbalance and the label smoothing shift (accuracy then sits
        # at 0.5 while the order is right). Real and fake rows of an input are on the same process.
        by_source = dict(zip(r.source, real_seq.tolist()))
        hits = sum(1.0 if by_source[src] > x else 0.5 if by_source[src] == x else 0.0
                   for src, x in zip(f.source, fake_seq.tolist()) if src in by_source)
        stats["rank"] = hits / float(c.fake_rows.clamp_min(1.0))
    return loss, stats


def discriminator_step(d: Discriminator, opt, batch: DiscBatch, cfg, autocast, counts: DiscCounts | None = None,
                       over_processes: bool = False) -> dict:
    """One update of `d` on `batch` (discriminator_loss, then clipping and the optimiser step); returns the
    loss's stats, taken before the update. over_processes: `batch` is this process's slice (counts are the
    whole batch's) and the gradients are summed over processes before the step."""
    d.train()
    with autocast():
        loss, st = discriminator_loss(d, batch, cfg.label_smoothing, cfg.grad_penalty, counts, cfg.reward_level)
    opt.zero_grad(set_to_none=True)
    if loss.requires_grad:  # else this process holds none of the batch's rows
        loss.backward()
    if over_processes:
        distributed.sum_gradients(d.parameters())
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(d.parameters(), cfg.grad_clip)
    opt.step()
    return st


def pretrain_discriminators(discs: dict, d_opts: dict, train: list[Example], reference: Student, cfg, tokenizer,
                            max_text_tokens: int, seed: int, device, autocast, metric: Callable[[dict], None]) -> None:
    """disc_pretrain_epochs passes over a pool built once: every train input's real row(s) against one sample
    of the frozen distilled model about it (unanchored: two of its samples), so that a discriminator starts
    the adversarial steps having judged the whole train split, not a few batches of it (a few hundred rows in
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
            real = real_rows(exs, cfg.anchored, cfg.use_references, reference, tokenizer, max_text_tokens,
                             cfg.temperature, cfg.max_new_tokens, device, generators=g)
        pool.append((real, fake))
    order = np.random.default_rng(stream_seed("pretrain-order", seed)).permutation
    for epoch in range(cfg.disc_pretrain_epochs):
        sums: dict[str, list[float]] = {}
        for j, bi in enumerate(order(len(pool)).tolist()):
            real, fake = pool[bi]
            torch.manual_seed(stream_seed("pretrain-dropout", seed, epoch, j))
            for m, d in discs.items():
                batch = discriminator_batch(m, real, fake, cfg.text_reward_all, cfg.disc_from_divergence)
                if not len(batch.real) or not len(batch.fake):
                    continue
                st = discriminator_step(d, d_opts[m], batch, cfg, autocast)
                for key in ("bce", "acc", "rank"):
                    sums.setdefault(f"pretrain_disc_{key}/{m}", []).append(st[key])
        metric({"phase": "disc_pretrain", "epoch": epoch + 1, **{k: float(np.mean(v)) for k, v in sums.items()}})


# --------------------------------------------------------------------------------------------- the student
def policy_logprobs(model: Student, rows: Rows) -> torch.Tensor:
    """log pi(. | y_<t, x) at every generated position: [N, L-1, V] float32."""
    logits = model(rows.input_ids, rows.attention_mask, rows.modality, rows.features)
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def ce_loss(student: Student, examples: list[Example], device, n_targets: int | None = None) -> torch.Tensor:
    """Mean cross-entropy per target token of the pseudo-labels of `examples`; n_targets: the denominator
    when `examples` are one process's slice of a larger batch (default: their own target tokens)."""
    b = collate(examples, student.spec.bos_id, student.spec.eot_id, device)
    lp = student.score(b.input_ids, b.attention_mask, b.modality, b.features)
    return -lp.sum() / max(1, b.n_targets if n_targets is None else n_targets)


class EMABaseline:
    """A baseline per position: an exponential moving average of the batch-mean return there."""

    def __init__(self, length: int, decay: float):
        self.decay = decay
        self.value = torch.zeros(length)
        self.seen = torch.zeros(length, dtype=torch.bool)

    def __call__(self, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The baseline for `returns` [N, L] (before this batch), then the update with this batch. Under
        torchrun the batch mean is over every process's rows, so the baseline stays the same everywhere."""
        L = returns.shape[1]
        base = self.value[:L].clone().to(returns.device).unsqueeze(0).expand_as(returns)
        m = mask.to(returns.dtype)
        sums = returns.new_zeros(2, len(self.value))  # return sums, live rows; every position (slices differ in L)
        sums[0, :L] = (returns * m).sum(0).detach()
        sums[1, :L] = m.sum(0)
        distributed.all_reduce_sum(sums)
        alive = sums[1].cpu()
        mean = (sums[0] / sums[1].clamp_min(1.0)).cpu()
        upd = alive > 0
        v, s = self.value, self.seen
        v[upd] = torch.where(s[upd], self.decay * v[upd] + (1 - self.decay) * mean[upd], mean[upd])
        s[upd] = True
        return base

    def state_dict(self) -> dict:
        return {"value": self.value.tolist(), "seen": self.seen.tolist()}

    def load_state_dict(self, st: dict) -> None:
        self.value = torch.tensor(st["value"], dtype=torch.float32)
        self.seen = torch.tensor(st["seen"], dtype=torch.bool)


def pg_objective(student: Student, reference: Student, discs: dict[str, Discriminator], fake: Rows, k: int,
                 weights: dict[str, float], *, discount: float, baseline: str | EMABaseline, kl_weight: float,
                 kl_estimator: str, pg_weight: float = 1.0, text_reward_all: bool = False,
                 ce: Callable[[], torch.Tensor] | None = None, ce_weight: float = 0.0,
                 center_rewards: bool = False, reward_level: str = "token",
                 minus_policy_logprob: bool = False) -> tuple[torch.Tensor, dict]:
    """The pg loss of the student on its own samples `fake` (k consecutive rows per input), and its stats.

    Rows are scored by `student` (differentiable) and `reference` (frozen); rewards come from `discs`.
    baseline: "loo" or an EMABaseline. ce: a callable giving the pseudo-label cross-entropy (None: none).
    reward_level "sequence": each row's reward is the discriminators' sequence score (sequence_rewards: the
    last token's logit, or with lm_score the head there plus the body's log-likelihood of the row) (minus
    kl_weight times its summed sampled KL with kl_estimator "sampled"), its advantage that reward minus the
    mean of its input's other k-1 rows (loo only), on every one of its tokens; discount and center_rewards
    do not apply. The logged "reward" is then the mean of those sequence rewards. minus_policy_logprob
    (sequence only): each reward less the student's own log-likelihood of the sample (detached).
    Under torchrun `fake` is this process's slice (whole inputs) and the means are over every process's
    tokens (global_count): the loss and the stats are this slice's shares of the whole batch's.
    """
    mask = fake.attention_mask[:, 1:].float()
    n = global_count(mask.sum())
    tokens = fake.input_ids[:, 1:]
    logp_all = policy_logprobs(student, fake)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        ref_all = policy_logprobs(reference, fake)
        ref_tok = ref_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    kl_exact = exact_kl(logp_all, ref_all)
    if reward_level == "sequence":
        if baseline != "loo" or k < 2:
            raise ValueError("reward_level 'sequence' needs the leave-one-out baseline over k >= 2 samples")
        seq = sequence_rewards(discs, fake, weights, text_reward_all)
        if minus_policy_logprob:
            seq = seq - (logp.detach() * mask).sum(1)
        if kl_estimator == "sampled":
            seq = seq - kl_weight * ((logp.detach() - ref_tok) * mask).sum(1)
        adv = (seq - loo_baseline(seq, k)).unsqueeze(1) * mask
        mean_reward = seq.sum() / global_count(torch.tensor(float(len(seq)), device=seq.device))
    else:
        rewards = token_rewards(discs, fake, weights, text_reward_all)
        adv = _token_advantages(rewards, logp, ref_tok, mask, n, k, discount=discount, baseline=baseline,
                                kl_weight=kl_weight, kl_estimator=kl_estimator, center_rewards=center_rewards)
        mean_reward = masked_mean(rewards, mask, n)
    pg = pg_loss(logp, adv, mask, n)
    loss = pg_weight * pg
    if kl_estimator == "exact" and kl_weight > 0:
        loss = loss + kl_weight * masked_mean(kl_exact, mask, n)
    stats = {"pg_loss": float(pg.detach()), "reward": float(mean_reward),
             "kl": float(masked_mean(kl_exact.detach(), mask, n)),
             "kl_sampled": float(masked_mean(logp.detach() - ref_tok, mask, n)),
             "sample_logprob": float(masked_mean(logp.detach(), mask, n))}
    return _with_ce(loss, stats, ce, ce_weight)


def _token_advantages(rewards: torch.Tensor, logp: torch.Tensor, ref_tok: torch.Tensor, mask: torch.Tensor,
                      n: torch.Tensor, k: int, *, discount: float, baseline: str | EMABaseline, kl_weight: float,
                      kl_estimator: str, center_rewards: bool) -> torch.Tensor:
    """reward_level "token": per-token rewards (centred, sampled KL folded in) -> returns -> minus the baseline."""
    shaped = rewards
    if center_rewards:  # minus the mean over every process's tokens: the same shift everywhere
        shaped = (rewards - global_count((rewards * mask).sum()) / n) * mask
    if kl_estimator == "sampled":
        shaped = shaped - kl_weight * (logp.detach() - ref_tok)
    G = returns_to_go(shaped, mask, discount)
    b = loo_baseline(G, k) if baseline == "loo" else baseline(G, mask)
    return (G - b) * mask



def batch_reward(discs: dict[str, Discriminator], fake: Rows, cfg) -> float:
    """This process's share of the batch's mean reward from the discriminators: per token (reward_level
    token) or per sample, its sequence score (sequence)."""
    if cfg.reward_level == "sequence":
        seq = sequence_rewards(discs, fake, cfg.reward_weights, cfg.text_reward_all)
        return float(seq.sum() / global_count(torch.tensor(float(len(seq)), device=seq.device)))
    r = token_rewards(discs, fake, cfg.reward_weights, cfg.text_reward_all)
    mask = fake.attention_mask[:, 1:]
    return float(masked_mean(r, mask, global_count(mask.sum())))


def _with_ce(loss: torch.Tensor, stats: dict, ce: Callable[[], torch.Tensor] | None,
             ce_weight: float) -> tuple[torch.Tensor, dict]:
    """Both objectives end the same way: + ce_weight * ce() on the pseudo-labels (anchored runs), and the total."""
    if ce is not None and ce_weight > 0:
        c = ce()
        loss = loss + ce_weight * c
        stats["ce"] = float(c.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats

def spin_objective(student: Student, previous: Student, reference: Student, real: Rows, fake: Rows, beta: float,
                   *, kl_weight: float, ce: Callable[[], torch.Tensor] | None = None,
                   ce_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """SPIN: every real row (winner) against every fake row (the previous iterate's sample, loser) of the
    same input, DPO's loss with `previous` as the reference; plus kl_weight * exact KL to `reference` on the
    fake rows' positions and ce_weight * ce(). Under torchrun the rows are this process's slice (whole
    inputs) and the loss and stats are its shares of the whole batch's, as in pg_objective."""
    pairs = [(i, j) for i in range(len(real)) for j in range(len(fake)) if real.source[i] == fake.source[j]]
    wi = torch.tensor([p[0] for p in pairs], device=real.input_ids.device)
    lj = torch.tensor([p[1] for p in pairs], device=fake.input_ids.device)
    pi_w = student.score(real.input_ids, real.attention_mask, real.modality, real.features).sum(1)
    lose_all = policy_logprobs(student, fake)
    mask = fake.attention_mask[:, 1:].float()
    n_tok, n_pairs = global_count(mask.sum()), global_count(torch.tensor(float(len(pairs)), device=mask.device))
    pi_l = (lose_all.gather(-1, fake.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask).sum(1)
    with torch.no_grad():
        ref_w = previous.score(real.input_ids, real.attention_mask, real.modality, real.features).sum(1)
        ref_l = previous.score(fake.input_ids, fake.attention_mask, fake.modality, fake.features).sum(1)
        ref_all = policy_logprobs(reference, fake)
    spin = dpo_loss(pi_w[wi], ref_w[wi], pi_l[lj], ref_l[lj], beta, n_pairs)
    kl = masked_mean(exact_kl(lose_all, ref_all), mask, n_tok)
    loss = spin + kl_weight * kl
    with torch.no_grad():
        margin = ((pi_w[wi] - ref_w[wi]) - (pi_l[lj] - ref_l[lj])).sum() / n_pairs.clamp_min(1.0)
    stats = {"spin_loss": float(spin.detach()), "spin_margin": float(margin), "kl": float(kl.detach()), "pairs": len(pairs)}
    return _with_ce(loss, stats, ce, ce_weight)


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


# ------------------------------------------------------------------------------------------------- stage
def progress(stage_dir: Path, cfg) -> str | None:
    """`groundgan status`: "step k of n" (discriminator warm-up steps included) from the newest checkpoint."""
    dirs = CheckpointManager(Path(stage_dir) / "checkpoints").step_dirs()
    k = int(dirs[-1].name.split("-")[1]) if dirs else 0
    a = cfg.root.adversarial
    return f"step {k} of {a.disc_warmup_steps + a.steps}"


def _check(cfg) -> None:
    if cfg.kl_estimator not in ("exact", "sampled"):
        raise UserError(f"config: 'adversarial.kl_estimator' must be exact or sampled, got {cfg.kl_estimator!r}")
    if cfg.objective == "pg" and cfg.baseline == "loo" and cfg.k_samples < 2:
        raise UserError("config: 'adversarial.baseline: loo' needs k_samples >= 2 (the others' mean is the baseline); "
                        "use baseline: ema for k_samples: 1")


def _copy_through(ctx: StageContext, src: Path) -> dict:
    """`enabled: false`: final/ is the distilled student, so evaluate finds the same files."""
    if ctx.dist.is_main:
        tmp = ctx.dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        atomic_write_text(tmp / "adversarial.json", json.dumps({"enabled": False, "copied_from": str(src)}, indent=2) + "\n")
        final = ctx.dir / "final"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
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
    from stages.student import build_student

    ck, teacher_mod = _whisper_teacher(ctx, mods)
    if ck is None:
        raise UserError("adversarial.disc_backbone: teacher needs a modality labelled by a Whisper teacher; "
                        f"none of {', '.join(mods)} is")
    scfg = dataclasses.replace(ctx.cfg.root.distill.student,
                               keep_decoder_layers=list(range(int(ck["dims"]["n_text_layer"]))))
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


@register_stage("adversarial", after=("pseudo_label", "distill"), progress=progress,
                description="discriminators anchored to real inputs; student by policy gradient (or SPIN)")
def run(ctx: StageContext) -> dict:
    cfg, device, dist = ctx.section, ctx.device, ctx.dist
    _check(cfg)
    src = ctx.input_dir("distill") / "final"
    if not (src / "student.json").is_file():
        raise UserError(f"adversarial: no distilled student in {src}; run the distill stage first")
    if not cfg.enabled:
        return _copy_through(ctx, src)
    if cfg.batch_size < dist.world:
        raise UserError(f"adversarial.batch_size={cfg.batch_size} is smaller than the number of processes "
                        f"({dist.world}): some process would get no inputs")
    # Data parallel under torchrun: every process builds the same models and draws the same global batch,
    # takes its slice of whole inputs, and divides its losses by the whole batch's counts; gradients are
    # summed over processes (distributed.sum_gradients: the R1 penalty's double backward and a process
    # whose slice lacks a modality rule out DDP's hooks). Only the main process writes.

    # ---- models and data
    student = load_student(src, device).eval()
    reference = load_student(src, device).eval().requires_grad_(False)
    previous = load_student(src, device).eval().requires_grad_(False) if cfg.objective == "spin" else None
    tok = student.tokenizer
    max_text_tokens = ctx.cfg.root.distill.max_text_tokens
    select = cfg.select_by == "val_wer"
    data = load_labelled(ctx.input_dir("pseudo_label"), tok, max_text_tokens,
                         splits=tuple(dict.fromkeys([*cfg.inputs, *(["val"] if select else [])])),
                         max_frames=student.spec.feature_frames if student.spec.style == "prefix" else None,
                         modalities=list(student.spec.modalities))
    train, _ = within_context([e for s in cfg.inputs for e in data.splits[s]], student.spec)
    val = within_context(data.splits["val"], student.spec)[0] if select else []
    if select and not any(e.modality in TRANSCRIPT_MODALITIES and e.features is not None for e in val):
        raise UserError("adversarial.select_by: val_wer needs val clips of a transcript modality "
                        f"({', '.join(TRANSCRIPT_MODALITIES)}) in the pseudo_label stage's val split; there are none")
    if not train:
        raise UserError("adversarial: the pseudo_label stage left no train examples")
    if not cfg.anchored:
        train = [strip_labels(e) for e in train]
    ce_weight = cfg.ce_weight if cfg.anchored else 0.0
    mods = sorted({e.modality for e in train})
    # disc_backbone, grad_penalty and disc_lm_score are checked together when the config loads (pipeline/config.py)
    # disc_backbone teacher: the teacher's decoder judges the modality it labelled; another modality (images,
    # labelled by a classifier) gets a copy of the student, as with disc_backbone student: the Whisper decoder
    # reading image features through the student's projectors writes no caption it would know, and its
    # likelihood as a reward took image label agreement from 0.155 / 0.103 to 0.069 / 0.000 (demo, seeds 0 / 1)
    teacher_body, teacher_mod = (_teacher_body_builder(ctx, student, mods, device) if cfg.disc_backbone == "teacher"
                                 else (None, None))
    discs: dict[str, Discriminator] = {}
    for m in mods:
        spec = DiscriminatorSpec(modality=m, vocab_size=student.spec.text_vocab,
                                 feature_dim=int(student.spec.feature_dims.get(m, 0)), d_model=cfg.disc_d_model,
                                 layers=cfg.disc_layers, heads=cfg.disc_heads, dropout=cfg.disc_dropout,
                                 max_text_len=2 + max(cfg.max_new_tokens, max_text_tokens),
                                 feature_frames=cfg.disc_feature_frames,
                                 backbone="transformer" if cfg.disc_backbone == "transformer" else "student",
                                 lm_score=cfg.disc_lm_score)
        body = (load_student(src, device) if cfg.disc_backbone == "student" else
                (teacher_body() if m == teacher_mod else load_student(src, device)) if cfg.disc_backbone == "teacher"
                else None)
        discs[m] = build_discriminator(spec, device, body).train()
        if body is not None and not cfg.disc_train_body:
            body.requires_grad_(False)  # only the head (and lm_scale) learn
    # Adam with beta1 0.5 for the discriminators, the GAN habit (Radford et al. 2016): a target that moves.
    d_opts = {m: torch.optim.AdamW(d.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999), weight_decay=cfg.weight_decay)
              for m, d in discs.items()}
    # No weight decay on the student: it would pull away from the distilled weights the KL keeps it near.
    s_opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    sampler = MixtureSampler(train, cfg.batch_size, cfg.modality_weights, ctx.cfg.root.seed)
    ema = EMABaseline(cfg.max_new_tokens + 1, cfg.ema_decay)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if str(device).startswith("cuda")
                else contextlib.nullcontext)

    models = {STUDENT: student, **{disc_name(m): d for m, d in discs.items()}}
    if previous is not None:
        models[PREVIOUS] = previous
    opts = {STUDENT: s_opt, **{disc_name(m): o for m, o in d_opts.items()}}

    # ---- resume
    ckpts = ctx.checkpoints()
    start, student_steps, stop_reason = 0, 0, None
    best = {"step": None, "val_wer": None}  # select_by val_wer: the student step final/ takes (0: the distilled one)
    loaded = ckpts.load_latest(models, opts, map_location=device)
    if loaded is not None:
        start = loaded.step
        sampler.load_state_dict(loaded.state["data"])
        extra = loaded.state["extra"]
        ema.load_state_dict(extra["ema"])
        student_steps = int(extra["student_steps"])
        stop_reason = extra.get("early_stop")  # a guard had tripped: the run was over
        best = dict(extra.get("best", best))
    if dist.is_main:
        _truncate_metrics(ctx.dir / "metrics.jsonl", start)
    if start == 0:
        ctx.metric({"event": "start", "train": len(train), "modalities": mods, "anchored": cfg.anchored,
                    "objective": cfg.objective, "kl_estimator": cfg.kl_estimator, "ce_weight": ce_weight})

    if start == 0 and cfg.disc_pretrain_epochs > 0:
        pretrain_discriminators(discs, d_opts, train, reference, cfg, tok, max_text_tokens, ctx.cfg.root.seed, device,
                                autocast, ctx.metric)

    def save_checkpoint(done: int) -> None:
        if dist.is_main:
            ckpts.save(done, models, opts, data_state=sampler.state_dict(),
                       extra={"ema": ema.state_dict(), "student_steps": student_steps, "early_stop": stop_reason,
                              "best": dict(best)})

    checked = {"student_steps": None}

    def validate_and_keep_best(step: int) -> None:
        """select_by val_wer: greedy WER of the student on the val clips; best/ keeps the lowest (the earlier
        student on a tie: the one nearer the distilled model)."""
        if not select or checked["student_steps"] == student_steps:
            return
        checked["student_steps"] = student_steps
        rows: list[dict] = []
        v = validate_wer(student, val, cfg.batch_size, max_text_tokens, dist, rows, val_decoding(ctx.cfg.root))
        if dist.is_main:
            ctx.metric({"step": step, "student_steps": student_steps, **v})
            write_val_predictions(ctx.dir, student_steps, rows)
            if v["val_wer"] is not None and (best["val_wer"] is None or v["val_wer"] < best["val_wer"]):
                save_student(student, ctx.dir / "best")
                best.update(step=student_steps, val_wer=v["val_wer"])
        best.update(distributed.broadcast_object(dict(best)))

    done = start
    if start == 0:
        validate_and_keep_best(0)  # the distilled student: the phase must beat it to be kept

    # ---- train
    total = cfg.disc_warmup_steps + cfg.steps
    bar = ctx.progress_bar(total=total, initial=start)
    k = cfg.k_samples
    policy = previous if previous is not None else student  # spin samples from the previous iterate
    for it in range(start, total if stop_reason is None else start):
        # Every process draws the same global batch and takes its contiguous slice of whole inputs.
        examples = [train[i] for i in sampler.next_batch()]
        mine = [int(i) for i in np.array_split(np.arange(len(examples)), dist.world)[dist.rank]]
        local = [examples[i] for i in mine]
        # Dropout (discriminators) draws from a stream of this iteration and process: resume-exact, and
        # not the same masks on every process.
        torch.manual_seed(stream_seed("dropout", ctx.cfg.root.seed, it, dist.rank))
        gens = [input_generator(ctx.cfg.root.seed, it, i, device) for i in mine]
        moves = it >= cfg.disc_warmup_steps
        with autocast():
            fake, fake_texts = sample_rows(policy, local, k, gens, cfg.temperature, cfg.max_new_tokens, device,
                                           greedy=cfg.greedy_sample)
            real = real_rows(local, cfg.anchored, cfg.use_references, reference, tok, max_text_tokens,
                             cfg.temperature, cfg.max_new_tokens, device, generators=gens)
        rec: dict = {"step": it + 1, "phase": "adversarial" if moves else "disc_warmup"}

        # discriminators: disc_steps updates on this batch; accuracy from the first (before it learns)
        for m, d in discs.items():
            batch = discriminator_batch(m, real, fake, cfg.text_reward_all, cfg.disc_from_divergence)
            counts = DiscCounts.of(batch, over_processes=True)
            if not counts.real_rows or not counts.fake_rows:
                continue
            for j in range(cfg.disc_steps):
                st = discriminator_step(d, d_opts[m], batch, cfg, autocast, counts, over_processes=True)
                st = distributed.sum_floats(st, device)
                if j == 0:
                    rec[f"disc_acc/{m}"] = st["acc"]
                    rec[f"disc_rank/{m}"] = st["rank"]
                rec[f"disc_loss/{m}"] = st["bce"]
                if "gp" in st:
                    rec[f"disc_gp/{m}"] = st["gp"]

        # the student
        if moves:
            n_targets = sum(len(e.targets) for e in examples)  # the whole batch's, for the CE's mean
            ce = (lambda: ce_loss(student, local, device, n_targets)) if ce_weight > 0 else None
            with autocast():
                if cfg.objective == "pg":
                    loss, st = pg_objective(student, reference, discs, fake, k, cfg.reward_weights,
                                            discount=cfg.discount, baseline="loo" if cfg.baseline == "loo" else ema,
                                            kl_weight=cfg.kl_weight, kl_estimator=cfg.kl_estimator,
                                            pg_weight=cfg.pg_weight, text_reward_all=cfg.text_reward_all,
                                            ce=ce, ce_weight=ce_weight, center_rewards=cfg.center_rewards,
                                            reward_level=cfg.reward_level,
                                            minus_policy_logprob=cfg.reward_minus_policy_logprob)
                else:
                    loss, st = spin_objective(student, previous, reference, real, fake, cfg.spin_beta,
                                              kl_weight=cfg.kl_weight, ce=ce, ce_weight=ce_weight)
                    st["reward"] = batch_reward(discs, fake, cfg)
            s_opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.sum_gradients(student.parameters())
            st = distributed.sum_floats(st, device)
            st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                student.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            s_opt.step()
            student_steps += 1
            if previous is not None and student_steps % cfg.spin_iterate_steps == 0:
                previous.load_state_dict(student.state_dict())
            faults.point("step")
            rec.update(st)
            if student_steps % cfg.val_every == 0:
                validate_and_keep_best(it + 1)
        else:
            rec["reward"] = distributed.sum_floats({"reward": batch_reward(discs, fake, cfg)}, device)["reward"]

        done = it + 1
        if done % cfg.log_every == 0 or done == total:
            texts = [t for part in distributed.all_gather_objects(fake_texts) for t in part]  # in batch order
            rec["distinct_2"] = distinct_n(texts, 2)
            rec["self_bleu_4"] = self_bleu_4(texts)
            rec["length_ratio"] = length_ratio(distributed.sum_floats(length_sums(real, fake), device))
            if cfg.greedy_sample:  # each input's first row: how many greedy decodes repeat a word 4-gram 3+ times
                rec["greedy_loop_rate"] = float(np.mean([ngram_repeats(t) > 2 for t in texts[::k]]))
            rec["sample"] = texts[0]
            rec["label"] = examples[0].text if cfg.anchored else None
            stop_reason = guard_trip(cfg.guards, rec) if moves else None
            if stop_reason:
                rec["early_stop"] = stop_reason
            ctx.metric(rec)
        bar.update(1)
        if stop_reason:
            if dist.is_main:
                print(f"adversarial: early stop: {stop_reason}")
            save_checkpoint(done)
            break
        if done % cfg.checkpoint_every == 0 or done == total:
            if done == total:
                validate_and_keep_best(done)
            save_checkpoint(done)
    bar.close()
    if stop_reason:
        validate_and_keep_best(done)

    # ---- final/: the student, the discriminators, what happened
    summary = {"enabled": True, "objective": cfg.objective, "anchored": cfg.anchored, "kl_estimator": cfg.kl_estimator,
               "iterations": done, "student_steps": student_steps, "early_stop": stop_reason,
               "real_side": "teacher pseudo-labels" + (" + references" if cfg.use_references else "") if cfg.anchored
               else "samples of the frozen distilled model (no teacher label)",
               "select_by": cfg.select_by, "selected_student_step": best["step"] if select else student_steps,
               "selected_val_wer": best["val_wer"] if select else None}
    if dist.is_main:
        tmp = ctx.dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        if select and best["step"] is not None and (ctx.dir / "best").is_dir():
            shutil.copytree(ctx.dir / "best", tmp)
        else:
            save_student(student, tmp)
        save_discriminators(discs, tmp / DISCRIMINATORS_DIR)
        atomic_write_text(tmp / "adversarial.json", json.dumps(summary, indent=2) + "\n")
        final = ctx.dir / "final"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    counts = {"steps": student_steps, "disc_warmup_steps": min(done, cfg.disc_warmup_steps), "train": len(train),
              "discriminators": len(discs), "early_stopped": int(stop_reason is not None),
              "selected_student_step": summary["selected_student_step"]}
    if stop_reason:
        counts["early_stop_step"] = done
        counts["early_stop_reason"] = stop_reason
    return counts
