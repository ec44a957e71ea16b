"""adversarial: the distilled student keeps learning from discriminators that compare what it writes about a
real input with what the teacher said about the same input.

Before step 0 the discriminators judge every phase input's real row(s) against a sample of the distilled student
(disc_pretrain_epochs passes). Then, every step, for a batch of real inputs (adversarial.inputs; the pool split
by default: inputs distill never trained on):
  1. fake side: the student samples k texts per input (temperature, each input from its own random stream);
  2. real side: the teacher's pseudo-labels of those inputs. `anchored: false` replaces them by samples of the
     frozen distilled model for the same inputs - "the student's own earlier samples" - and no teacher label or
     cross-entropy enters the stage (the labels are dropped as the data is loaded);
  3. one update of every discriminator D_m on that batch: per-token BCE with one-sided label smoothing (real
     target 0.9); a sample's tokens count as fake only from where it leaves every real row of its input;
  4. after disc_warmup_steps discriminator-only steps, one student step: REINFORCE with one reward per sample,
       R = score_D(y | x) - log pi(y | x)
     (score_D: the head's logit at the last token plus lm_scale * log p_body(y | x); with the teacher's decoder
     as the body, R is log p_teacher - log p_student plus what the head learns: on-policy distillation toward
     the teacher with a learned correction), its advantage R minus the mean of the input's other k-1 samples
     (RLOO) on every token of the sample, plus kl_weight * KL(student || reference) over the vocabulary at
     every sampled position and ce_weight * cross-entropy on the pseudo-labels;
  5. every log_every steps: distinct-2 and self-BLEU-4 of the samples, per-modality discriminator accuracy and
     ranking (on the fresh batch, before the discriminator learns from it), KL to the reference, the length
     ratio, mean reward; a guard of adversarial.guards that trips ends the stage early, with its reason.
With select_by: val_wer the val clips are decoded (as `decoding:` says) before the first student step and every
val_every student steps; final/ is the student of the lowest val WER, the distilled one included.

The student samples and is scored in eval mode (no dropout), so the log-probs of the policy gradient are
those of the distribution that drew the samples (at temperature 1). Retired arms (token rewards, EMA
baselines, SPIN, the small transformer judge): git tag arms-2026-12, docs/history.md.

RUN/adversarial/
    checkpoints/step-XXXXXX/   student, discriminator.<m>, their AdamW states, sampler + RNGs
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
import dataclasses
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
from stages.generation import generate
from stages.labelled_data import Example, MixtureSampler, collate, load_labelled, within_context
from stages.student import Student, load_student, save_student
from stages.text_metrics import TRANSCRIPT_MODALITIES, distinct_n, self_bleu_4

STUDENT = "student"
DISCRIMINATORS_DIR = "discriminators"
LABEL_SMOOTHING = 0.1  # one-sided (Salimans et al. 2016): the real side's target is 0.9
DISC_WEIGHT_DECAY = 0.01


def disc_name(modality: str) -> str:
    return f"discriminator.{modality}"


# ------------------------------------------------------------------------------------------------ losses
def loo_baseline(values: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out baseline: rows come in groups of k (the k samples of one input); each row's baseline is
    the mean of the other k-1 rows of its group (position by position for [N, L]). [N, ...] -> [N, ...].
    k = 1: zeros."""
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
                temperature: float, max_new_tokens: int, device) -> tuple[Rows, list[str]]:
    """`per_input` samples of `model` about each example, and their texts. Each example is decoded in a call
    of its own from its own generator, so its rows never depend on which other inputs share the process.
    Rows come in consecutive groups of per_input; a row's source is its example's index in `examples`."""
    seqs, texts, mods, feats, src = [], [], [], [], []
    for i, (e, g) in enumerate(zip(examples, generators)):
        f = _features(e, device)
        gen = generate(model, [e.modality] * per_input, [f] * per_input, temperature=temperature,
                       max_new_tokens=max_new_tokens, generator=g)
        seqs += [row[:n] for row, n in zip(gen.tokens.tolist(), gen.mask.sum(1).tolist())]
        texts += gen.texts
        mods += [e.modality] * per_input
        feats += [f] * per_input
        src += [i] * per_input
    return rows_from_tokens(seqs, mods, feats, src, model.spec.bos_id, model.spec.eot_id, device), texts


def real_rows(examples: list[Example], anchored: bool, reference: Student, temperature: float, max_new_tokens: int,
              device, generators: Sequence[torch.Generator | None] | None = None) -> Rows:
    """The real side of one batch. Anchored: each input's pseudo-label. Unanchored: one sample of the frozen
    distilled model per input, drawn from that input's generator (None: the global RNG)."""
    if not anchored:
        return sample_rows(reference, examples, 1, generators or [None] * len(examples), temperature,
                           max_new_tokens, device)[0]
    return rows_from_tokens([e.targets for e in examples], [e.modality for e in examples],
                            [_features(e, device) for e in examples], list(range(len(examples))),
                            reference.spec.bos_id, reference.spec.eot_id, device)


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


def judges_of(modality: str, discs: dict, text_reward_all: bool) -> list[str]:
    """The discriminators that reward a sample of `modality`."""
    out = [modality] if modality in discs else []
    if text_reward_all and modality != "text" and "text" in discs:
        out.append("text")
    return out


@torch.no_grad()
def sequence_rewards(discs: dict[str, Discriminator], rows: Rows, text_reward_all: bool) -> torch.Tensor:
    """R = the sum of the sequence scores of the discriminators judging each row, in eval mode: [N]."""
    out = torch.zeros(rows.input_ids.shape[0], device=rows.input_ids.device)
    for m in sorted(set(rows.modality)):
        idx = [i for i, mm in enumerate(rows.modality) if mm == m]
        sub = rows.select(idx)
        for name in judges_of(m, discs, text_reward_all):
            d = discs[name]
            was = d.training
            d.eval()
            try:
                out[torch.tensor(idx, device=out.device)] += d.judge(sub.input_ids, sub.attention_mask,
                                                                     sub.features)[1].float()
            finally:
                d.train(was)
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


def pg_objective(student: Student, reference: Student, discs: dict[str, Discriminator], fake: Rows, k: int, *,
                 kl_weight: float, pg_weight: float = 1.0, text_reward_all: bool = False,
                 ce: Callable[[], torch.Tensor] | None = None, ce_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The student's loss on its own samples `fake` (k consecutive rows per input, k >= 2), and its stats.

    Each row's reward is R = sequence_rewards(discs) - log pi(row) (the student's own log-likelihood of it,
    detached); its advantage R minus the mean of its input's other k-1 rows' rewards (leave-one-out), on every
    one of its tokens. loss = pg_weight * REINFORCE + kl_weight * exact KL(student || reference) per token +
    ce_weight * ce() (the pseudo-labels' cross-entropy; None: none). Rows are scored by `student`
    (differentiable) and `reference` (frozen). The logged "reward" is the mean R.
    Under torchrun `fake` is this process's slice (whole inputs) and the means are over every process's
    tokens (global_count): the loss and the stats are this slice's shares of the whole batch's.
    """
    if k < 2:
        raise ValueError("the leave-one-out baseline needs k >= 2 samples per input")
    mask = fake.attention_mask[:, 1:].float()
    n = global_count(mask.sum())
    tokens = fake.input_ids[:, 1:]
    logp_all = policy_logprobs(student, fake)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        ref_all = policy_logprobs(reference, fake)
        ref_tok = ref_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    kl_exact = exact_kl(logp_all, ref_all)
    seq = sequence_rewards(discs, fake, text_reward_all)
    seq = seq - (logp.detach() * mask).sum(1)
    adv = (seq - loo_baseline(seq, k)).unsqueeze(1) * mask
    mean_reward = seq.sum() / global_count(torch.tensor(float(len(seq)), device=seq.device))
    pg = pg_loss(logp, adv, mask, n)
    loss = pg_weight * pg
    if kl_weight > 0:
        loss = loss + kl_weight * masked_mean(kl_exact, mask, n)
    stats = {"pg_loss": float(pg.detach()), "reward": float(mean_reward),
             "kl": float(masked_mean(kl_exact.detach(), mask, n)),
             "kl_sampled": float(masked_mean(logp.detach() - ref_tok, mask, n)),
             "sample_logprob": float(masked_mean(logp.detach(), mask, n))}
    if ce is not None and ce_weight > 0:
        c = ce()
        loss = loss + ce_weight * c
        stats["ce"] = float(c.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats


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

    def models(self) -> dict:
        return {STUDENT: self.student, **{disc_name(m): d for m, d in self.discs.items()}}

    def optimizers(self) -> dict:
        return {STUDENT: self.s_opt, **{disc_name(m): o for m, o in self.d_opts.items()}}

    def state_dict(self) -> dict:
        return {"student_steps": self.student_steps, "early_stop": self.stop_reason, "best": dict(self.best)}

    def load_state_dict(self, st: dict) -> None:
        self.student_steps = int(st["student_steps"])
        self.stop_reason = st.get("early_stop")
        self.best = dict(st.get("best", self.best))


def _setup(ctx: StageContext, src: Path) -> Phase:
    """The models (student, frozen reference, one discriminator per modality), their optimisers and the data."""
    cfg, device, dist = ctx.section, ctx.device, ctx.dist
    if cfg.batch_size < dist.world:
        raise UserError(f"adversarial.batch_size={cfg.batch_size} is smaller than the number of processes "
                        f"({dist.world}): some process would get no inputs")
    student = load_student(src, device).eval()
    reference = load_student(src, device).eval().requires_grad_(False)
    max_text_tokens = ctx.cfg.root.distill.max_text_tokens
    select = cfg.select_by == "val_wer"
    data = load_labelled(ctx.input_dir("pseudo_label"), student.tokenizer, max_text_tokens,
                         splits=tuple(dict.fromkeys([*cfg.inputs, *(["val"] if select else [])])),
                         max_frames=student.spec.feature_frames if student.spec.style == "prefix" else None,
                         modalities=list(student.spec.modalities))
    train, _ = within_context([e for s in cfg.inputs for e in data.splits[s]], student.spec)
    val = within_context(data.splits["val"], student.spec)[0] if select else []
    if select and not any(e.modality in TRANSCRIPT_MODALITIES and e.features is not None for e in val):
        raise UserError("adversarial.select_by: val_wer needs val clips of a transcript modality "
                        f"({', '.join(TRANSCRIPT_MODALITIES)}) in the pseudo_label stage's val split; there are none")
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
    for m in mods:
        spec = DiscriminatorSpec(modality=m, vocab_size=student.spec.text_vocab,
                                 feature_dim=int(student.spec.feature_dims.get(m, 0)),
                                 max_text_len=2 + max(cfg.max_new_tokens, max_text_tokens))
        body = teacher_body() if m == teacher_mod else load_student(src, device)
        discs[m] = build_discriminator(spec, body, device).train()
        body.requires_grad_(False)  # only the head and lm_scale learn
    # Adam with beta1 0.5 for the discriminators, the GAN habit (Radford et al. 2016): a target that moves.
    d_opts = {m: torch.optim.AdamW(d.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999), weight_decay=DISC_WEIGHT_DECAY)
              for m, d in discs.items()}
    # No weight decay on the student: it would pull away from the distilled weights the KL keeps it near.
    s_opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    sampler = MixtureSampler(train, cfg.batch_size, cfg.modality_weights, ctx.cfg.root.seed)
    return Phase(student, reference, discs, s_opt, d_opts, sampler, train, val)


def _validate(ctx: StageContext, ph: Phase, step: int) -> None:
    """select_by val_wer: greedy WER of the student on the val clips, decoded as `decoding:` says; best/ keeps the
    lowest (the earlier student on a tie: the one nearer the distilled model). Once per student step."""
    if ctx.section.select_by != "val_wer" or ph.checked_at == ph.student_steps:
        return
    ph.checked_at = ph.student_steps
    rows: list[dict] = []
    v = validate_wer(ph.student, ph.val, ctx.section.batch_size, ctx.cfg.root.distill.max_text_tokens, ctx.dist, rows,
                     val_decoding(ctx.cfg.root))
    if ctx.dist.is_main:
        ctx.metric({"step": step, "student_steps": ph.student_steps, **v})
        write_val_predictions(ctx.dir, ph.student_steps, rows)
        if v["val_wer"] is not None and (ph.best["val_wer"] is None or v["val_wer"] < ph.best["val_wer"]):
            save_student(ph.student, ctx.dir / "best")
            ph.best.update(step=ph.student_steps, val_wer=v["val_wer"])
    ph.best.update(distributed.broadcast_object(dict(ph.best)))


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
    for m, d in ph.discs.items():
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
        with autocast():
            loss, st = pg_objective(ph.student, ph.reference, ph.discs, fake, k, kl_weight=cfg.kl_weight,
                                    pg_weight=cfg.pg_weight, text_reward_all=cfg.text_reward_all, ce=ce,
                                    ce_weight=ce_weight)
        ph.s_opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sum_gradients(ph.student.parameters())
        st = distributed.sum_floats(st, device)
        st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
            ph.student.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        ph.s_opt.step()
        ph.student_steps += 1
        faults.point("step")
        rec.update(st)
    else:
        rec["reward"] = distributed.sum_floats({"reward": batch_reward(ph.discs, fake, cfg.text_reward_all)},
                                               device)["reward"]
    rec["_texts"], rec["_lengths"], rec["_label"] = fake_texts, length_sums(real, fake), examples[0].text
    return rec


def _log(ctx: StageContext, ph: Phase, rec: dict, moves: bool) -> None:
    """The batch's diversity, length and guard figures into `rec`, which goes to metrics.jsonl; a tripped guard
    sets ph.stop_reason."""
    texts = [t for part in distributed.all_gather_objects(rec["_texts"]) for t in part]  # in batch order
    rec["distinct_2"] = distinct_n(texts, 2)
    rec["self_bleu_4"] = self_bleu_4(texts)
    rec["length_ratio"] = length_ratio(distributed.sum_floats(rec["_lengths"], ctx.device))
    rec["sample"] = texts[0]
    rec["label"] = rec["_label"] if ctx.section.anchored else None
    ph.stop_reason = guard_trip(ctx.section.guards, rec) if moves else None
    if ph.stop_reason:
        rec["early_stop"] = ph.stop_reason
    ctx.metric({k: v for k, v in rec.items() if not k.startswith("_")})


def _finish(ctx: StageContext, ph: Phase, done: int) -> dict:
    """final/: the selected student, the discriminators, what happened; the stage's counts."""
    cfg = ctx.section
    select = cfg.select_by == "val_wer"
    summary = {"enabled": True, "anchored": cfg.anchored, "iterations": done, "student_steps": ph.student_steps,
               "early_stop": ph.stop_reason,
               "real_side": "teacher pseudo-labels" if cfg.anchored
               else "samples of the frozen distilled model (no teacher label)",
               "select_by": cfg.select_by, "selected_student_step": ph.best["step"] if select else ph.student_steps,
               "selected_val_wer": ph.best["val_wer"] if select else None}
    if ctx.dist.is_main:
        tmp = ctx.dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        if select and ph.best["step"] is not None and (ctx.dir / "best").is_dir():
            shutil.copytree(ctx.dir / "best", tmp)
        else:
            save_student(ph.student, tmp)
        save_discriminators(ph.discs, tmp / DISCRIMINATORS_DIR)
        atomic_write_text(tmp / "adversarial.json", json.dumps(summary, indent=2) + "\n")
        final = ctx.dir / "final"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    counts = {"steps": ph.student_steps, "disc_warmup_steps": min(done, cfg.disc_warmup_steps), "train": len(ph.train),
              "discriminators": len(ph.discs), "early_stopped": int(ph.stop_reason is not None),
              "selected_student_step": summary["selected_student_step"]}
    if ph.stop_reason:
        counts["early_stop_step"] = done
        counts["early_stop_reason"] = ph.stop_reason
    return counts


@register_stage("adversarial", after=("pseudo_label", "distill"), progress=progress,
                reads=("decoding", "distill.max_text_tokens", "distill.student"),
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
