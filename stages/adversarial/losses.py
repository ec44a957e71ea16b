"""The adversarial phase's losses: pure functions of tensors (shapes in each docstring), tested against values worked
out by hand. Under torchrun each process holds a slice of the batch and divides by the whole batch's counts."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline import distributed
from stages.adversarial.rows import Rows
from stages.models.discriminator import Discriminator
from stages.models.labelled_data import Example, collate
from stages.models.student import Student, token_logprobs


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
    """KL(pi || ref) at every position over the vocabulary: log-probs [..., V] -> [...]."""
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


# -------------------------------------------------------------------------------------------------- rewards
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


def length_neutral_rewards(rewards: torch.Tensor, tokens: torch.Tensor, modality: list[str],
                           names: Sequence[str] | None = None) -> torch.Tensor:
    """Each row's reward less b x its tokens, b = its modality's rewards summed over the whole batch (every
    process's) / their tokens summed: the reward's average cost per token taken out, so that length alone earns
    nothing. A summed reward of per-token log-ratios (log p_teacher - log p_student, -KL per token in expectation)
    pays a longer sample less and teaches early stops (MiniLLM's length bias); unlike a per-token mean, a sample's
    reward still moves by each token's own ratio against the batch's. `names`: the whole batch's modalities, the
    same on every process (one process's slice may lack one; the sums cross processes in one reduction over them);
    None: those of `modality`. [N], [N], N names -> [N] (detached)."""
    names = sorted(set(modality)) if names is None else list(names)
    rows = torch.tensor([[mm == m for mm in modality] for m in names], device=rewards.device).float()  # [M, N]
    sums = global_count(torch.stack([rows @ rewards.detach().float(), rows @ tokens.float()], 1))  # [M, 2]
    b = sums[:, 0] / sums[:, 1].clamp_min(1.0)
    return (rewards.detach() - (b @ rows).to(rewards.dtype) * tokens.to(rewards.dtype))


def pg_objective(student: Student, reference: Student, discs: dict[str, Discriminator], fake: Rows, k: int, *,
                 kl_weight: float, pg_weight: float = 1.0, text_reward_all: bool = False,
                 ce: Callable[[], torch.Tensor] | None = None, ce_weight: float = 0.0,
                 teacher_scores: tuple[torch.Tensor, torch.Tensor] | None = None,
                 length_neutral: bool = False,
                 batch_modalities: Sequence[str] | None = None) -> tuple[torch.Tensor, dict]:
    """The student's loss on its own samples `fake` (k consecutive rows per input, k >= 2), and its stats.

    Each row's reward is R = sequence_rewards(discs) - log pi(row) (the student's own log-likelihood of it,
    detached), plus the row's teacher score where `teacher_scores` = (scores [N], scored [N] 0/1) has one
    (TeacherScores: a teacher's own score of the text for the input); its advantage R minus the mean of its input's other k-1 rows' rewards (leave-one-out), on every
    one of its tokens. loss = pg_weight * REINFORCE + kl_weight * exact KL(student || reference) per token +
    ce_weight * ce() (the pseudo-labels' cross-entropy; None: none). length_neutral: each row's R less b x its
    tokens, b its modality's rewards summed over the batch per token summed (length_neutral_rewards; under torchrun
    `batch_modalities` names the whole batch's modalities, the same on every process). Rows are scored by `student`
    (differentiable) and `reference` (frozen). The logged "reward" is the mean R.
    Under torchrun `fake` is this process's slice (whole inputs) and the means are over every process's
    tokens (global_count): the loss and the stats are this slice's shares of the whole batch's.
    """
    if k < 2:
        raise ValueError("the leave-one-out baseline needs k >= 2 samples per input")
    mask = fake.attention_mask[:, 1:].float()
    n = global_count(mask.sum())
    # log-probs over the vocabulary at the generated tokens' positions only ([n, V]), spread back to [N, L-1]
    # (zeros at padding)
    m = mask.bool()
    tokens = fake.input_ids[:, 1:][m].unsqueeze(-1)
    logp_all = token_logprobs(student, fake.input_ids, fake.attention_mask, fake.modality, fake.features)
    logp = mask.masked_scatter(m, logp_all.gather(-1, tokens).squeeze(-1))
    with torch.no_grad():
        ref_all = token_logprobs(reference, fake.input_ids, fake.attention_mask, fake.modality, fake.features)
        ref_tok = mask.masked_scatter(m, ref_all.gather(-1, tokens).squeeze(-1))
    kl_exact = mask.masked_scatter(m, exact_kl(logp_all, ref_all))
    seq = sequence_rewards(discs, fake, text_reward_all)
    seq = seq - (logp.detach() * mask).sum(1)
    # a row that no judge and no teacher score rewards (adversarial.judge none, a teacher that scores no text)
    # takes no policy gradient: its input's k rows share the modality, so its whole group drops out of the
    # REINFORCE term
    judged = torch.tensor([bool(judges_of(m, discs, text_reward_all)) for m in fake.modality],
                          dtype=mask.dtype, device=mask.device)
    if teacher_scores is not None:
        seq = seq + teacher_scores[0].to(seq.dtype)
        judged = torch.maximum(judged, teacher_scores[1].to(judged.dtype))
    r = length_neutral_rewards(seq, mask.sum(1), fake.modality, batch_modalities) if length_neutral else seq
    adv = (r - loo_baseline(r, k)).unsqueeze(1) * mask * judged.unsqueeze(1)
    mean_reward = seq.sum() / global_count(torch.tensor(float(len(seq)), device=seq.device))
    pg = pg_loss(logp, adv, mask, n)
    loss = pg_weight * pg
    if kl_weight > 0:
        loss = loss + kl_weight * masked_mean(kl_exact, mask, n)
    stats = {"pg_loss": float(pg.detach()), "reward": float(mean_reward),
             "kl": float(masked_mean(kl_exact.detach(), mask, n)),
             "kl_sampled": float(masked_mean(logp.detach() - ref_tok, mask, n)),
             "sample_logprob": float(masked_mean(logp.detach(), mask, n))}
    if teacher_scores is not None:
        n_scored = global_count(teacher_scores[1].sum())
        if float(n_scored) > 0:
            stats["teacher_score"] = float(teacher_scores[0].sum() / n_scored)
    if ce is not None and ce_weight > 0:
        c = ce()
        loss = loss + ce_weight * c
        stats["ce"] = float(c.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats


