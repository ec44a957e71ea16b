"""The adversarial stage: losses against values worked out by hand, a toy where a fixed discriminator's
rewards move the student, the unanchored ablation that never shows a teacher label to a discriminator,
and the stage end to end through the CLI, killed after its second student step and resumed to the same
final weights."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT, cli, offline_demo_config
from stages import adversarial as adv
from stages.models.discriminator import Discriminator, DiscriminatorSpec, sequence_logits
from stages.models.generation import generate


# ------------------------------------------------------------------------------------------- pinned losses
def test_pg_loss_with_leave_one_out_baseline_by_hand():
    # 2 inputs x k=2 samples, 2 positions; row 1 stopped after its first token.
    values = torch.tensor([[2.0, 2.0], [0.5, 0.0], [-0.5, 1.0], [1.5, 3.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -9.0], [-1.5, -0.5], [-0.2, -1.0]], requires_grad=True)
    # k = 2: each row's baseline is its sibling's value, position by position
    b = adv.loo_baseline(values, 2)
    assert b.tolist() == [[0.5, 0.0], [2.0, 2.0], [1.5, 3.0], [-0.5, 1.0]]
    A = (values - b) * mask
    assert A.tolist() == [[1.5, 2.0], [-1.5, 0.0], [-2.0, -2.0], [2.0, 2.0]]
    # -(1.5*-1 + 2*-2  - 1.5*-0.5  - 2*-1.5 - 2*-0.5  + 2*-0.2 + 2*-1) / 7 tokens = 3.15 / 7
    loss = adv.pg_loss(logp, A, mask)
    assert loss.item() == pytest.approx(0.45, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, -A / 7)  # advantages are constants; masked tokens get no gradient
    # k = 3 leave-one-out: the mean of the other two; one value per row ([N]) as the sequence rewards are
    assert adv.loo_baseline(torch.tensor([3.0, 6.0, 9.0]), 3).tolist() == [7.5, 6.0, 4.5]


def test_discriminator_bce_with_one_sided_label_smoothing_by_hand():
    real = torch.tensor([[0.0, 2.0]])
    fake = torch.tensor([[0.0, -1.0, 5.0]])
    # real targets 0.9: (log 2 + log(1+e^2) - 1.8) / 2 = 0.510038; fake targets 0 over two tokens (the 5.0 is
    # padding): (log 2 + log(1+e^-1)) / 2 = 0.503204
    loss = adv.disc_bce(real, torch.tensor([[1, 1]]), fake, torch.tensor([[1, 1, 0]]), smoothing=0.1)
    assert loss.item() == pytest.approx(0.510037596 + 0.503204434, abs=1e-6)


def test_exact_kl_by_hand():
    p = torch.log(torch.tensor([[[0.5, 0.5]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75]]]))
    # 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75)
    assert adv.exact_kl(p, q).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)


class Judge(nn.Module):
    """A test discriminator: subclasses give forward's token logits [N, L-1]; judge reads the sequence score as
    Discriminator.judge does without lm_score (the logit at each row's last token)."""

    def judge(self, input_ids, attention_mask, features=None):
        logits = self(input_ids, attention_mask, features)
        return logits, sequence_logits(logits, attention_mask)


class LastLogitJudge(Judge):
    """A discriminator with fixed logits [N, L-1]; entries past a row's last token are never read."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, features=None):
        return self.logits[:, : input_ids.shape[1] - 1]


class UniformPolicy(nn.Module):
    """A policy whose every next-token distribution is uniform over 4 tokens (log-prob -log 4), learnable."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, input_ids, attention_mask, modality, features, feature_mask=None, keep=None):
        out = self.bias.expand(*input_ids.shape, 4)
        return out if keep is None else out[keep]


def test_sequence_level_reward_and_leave_one_out_advantage_by_hand():
    # 2 inputs x k=2 samples with 2, 1, 2 and 2 tokens; bos 3, pad 0
    fake = adv.rows_from_tokens([[1, 2], [2], [1, 1], [2, 2]], ["text"] * 4, [None] * 4, [0, 0, 1, 1], bos=3, pad=0,
                                device="cpu")
    # the reward is the logit at each row's last token (1, 3, 0, 4); the 100s are earlier tokens, never read
    judge = LastLogitJudge(torch.tensor([[100.0, 1.0], [3.0, 100.0], [100.0, 0.0], [100.0, 4.0]]))
    pi, ref = UniformPolicy(), UniformPolicy().requires_grad_(False)
    # R = the judge's score less each sample's own log-likelihood under the policy (2, 1, 2, 2 tokens at -log 4):
    # rewards 1 + 2L, 3 + L, 2L, 4 + 2L with L = log 4; advantages -2 + L, 2 - L, -4, 4 on every token of their
    # row; log pi = -log 4 everywhere: loss = L * (2(-2 + L) + (2 - L) - 8 + 8) / 7 tokens
    L = math.log(4)
    loss, st = adv.pg_objective(pi, ref, {"text": judge}, fake, 2, kl_weight=0.0)
    assert loss.item() == pytest.approx(L * (L - 2) / 7, abs=1e-6)
    assert st["reward"] == pytest.approx((1 + 3 + 0 + 4) / 4 + 7 * L / 4)  # the mean R
    # a judge that adds the same constant to every score changes no advantage (leave-one-out)
    shifted = LastLogitJudge(judge.logits + 5.0)
    assert adv.pg_objective(pi, ref, {"text": shifted}, fake, 2, kl_weight=0.0)[0].item() == pytest.approx(loss.item(), abs=1e-6)
    # pg_weight 0 (the no-reward arm): only the KL and CE terms are left
    assert adv.pg_objective(pi, ref, {"text": judge}, fake, 2, kl_weight=0.0, pg_weight=0.0)[0].item() == 0.0
    with pytest.raises(ValueError, match="leave-one-out"):
        adv.pg_objective(pi, ref, {"text": judge}, fake, 1, kl_weight=0.0)


# --------------------------------------------------------------------------------------------- discriminator
def test_student_backbone_discriminator_starts_undecided_and_is_causal_and_conditioned():
    from stages.models.student import StudentConfig
    from stages.models.student import build_student

    torch.manual_seed(0)
    body = build_student(StudentConfig(style="cross_attention", d_model=16, n_layers=1, n_heads=2, d_ff=32),
                         {"audio": 16}, max_text_tokens=8).eval()
    d = Discriminator(DiscriminatorSpec("audio", vocab_size=body.spec.text_vocab, feature_dim=16, lm_score=False),
                      body).eval()
    ids = torch.tensor([[body.spec.bos_id, 5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    f = [torch.randn(7, 16)]
    assert torch.equal(d(ids, mask, f), torch.zeros(1, 5))  # head starts at zero: D = 0.5 everywhere
    with torch.no_grad():
        torch.nn.init.normal_(d.head.weight)
    base = d(ids, mask, f)
    later = ids.clone()
    later[0, 4] = 30
    out = d(later, mask, f)
    assert torch.equal(out[:, :3], base[:, :3]) and not torch.allclose(out[:, 3:], base[:, 3:])
    assert not torch.allclose(d(ids, mask, [torch.randn(7, 16)]), base)  # it reads the input


def test_lm_score_discriminator_starts_at_its_bodys_log_likelihood_and_round_trips(tmp_path):
    from stages.models.student import StudentConfig
    from stages.models.discriminator import load_discriminators, save_discriminators
    from stages.models.student import build_student

    torch.manual_seed(0)
    body = build_student(StudentConfig(style="cross_attention", d_model=16, n_layers=1, n_heads=2, d_ff=32),
                         {"audio": 16}, max_text_tokens=8).eval()
    d = Discriminator(DiscriminatorSpec("audio", vocab_size=body.spec.text_vocab, feature_dim=16), body).eval()
    ids = torch.tensor([[body.spec.bos_id, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    f = [torch.randn(7, 16)]
    lp = body.score(ids, mask, "audio", f)  # log p(token t + 1 | bos .. t, input), [1, 4]
    assert torch.allclose(d(ids, mask, f), lp, atol=1e-5)  # head at zero, scale 1: the body's log-likelihood
    with torch.no_grad():
        d.lm_scale.fill_(0.5)
        torch.nn.init.normal_(d.head.weight)
    want = d(ids, mask, f)
    # the sequence score: the head at the last token + the scale times the body's log-likelihood of the row
    head = d.head(d.body.hidden(ids, mask, "audio", f)).squeeze(-1)[:, 1:]
    assert torch.allclose(d.sequence_scores(ids, mask, f), head[:, -1] + 0.5 * lp.sum(1), atol=1e-5)
    two = torch.tensor([[body.spec.bos_id, 5, 6, 7, 8], [body.spec.bos_id, 5, 6, 0, 0]])
    two_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = d.sequence_scores(two, two_mask, f * 2)
    assert torch.allclose(got[1], head[0, 1] + 0.5 * lp[0, :2].sum(), atol=1e-5)  # its own two tokens, padding out
    assert torch.allclose(got[0], head[0, -1] + 0.5 * lp[0].sum(), atol=1e-5)
    # the head's part alone, each row at its own last token
    assert torch.allclose(d.head_scores(two, two_mask, f * 2), torch.stack([head[0, -1], head[0, 1]]), atol=1e-5)
    # judge: forward's logits and these scores from one pass of the body
    calls = []
    d.head.register_forward_hook(lambda *a: calls.append(1))
    logits, scores = d.judge(two, two_mask, f * 2)
    assert len(calls) == 1
    assert torch.allclose(logits, d(two, two_mask, f * 2)) and torch.allclose(scores, got)
    saved = save_discriminators({"audio": d}, tmp_path / "d")
    back = load_discriminators(saved)["audio"]
    assert back.spec.lm_score and back.lm_scale.item() == 0.5 and torch.allclose(back(ids, mask, f), want, atol=1e-6)
    # a discriminator of the retired small-transformer kind is refused with the tag that has it
    (saved / "audio.json").write_text(json.dumps({"modality": "audio", "vocab_size": 10, "feature_dim": 16,
                                                  "backbone": "transformer", "d_model": 16}))
    with pytest.raises(ValueError, match="arms-2026-12"):
        load_discriminators(saved)


def test_a_sample_equal_to_the_real_row_of_its_input_is_not_fake():
    real = adv.rows_from_tokens([[5, 6, 0], [7, 0]], ["audio", "audio"], [None, None], [0, 1], bos=1, pad=0, device="cpu")
    fake = adv.rows_from_tokens([[5, 6, 0], [5, 6], [7, 0], [5, 6, 0], [9, 0]], ["audio"] * 4 + ["image"],
                                [None] * 5, [0, 0, 0, 1, 1], bos=1, pad=0, device="cpu")
    b = adv.discriminator_batch("audio", real, fake, text_reward_all=False)
    # row 0 repeats input 0's label: left out; row 1 is that label unfinished (no eot) and row 2 another
    # input's label: both fake; row 3 is input 0's label written about input 1: fake; row 4 is an image
    assert b.fake.source == [0, 0, 1] and len(b.real) == 2
    assert b.fake.input_ids[:, 1:3].tolist() == [[5, 6], [7, 0], [5, 6]]


def test_a_sample_is_judged_fake_from_where_it_leaves_the_real_rows():
    real = adv.rows_from_tokens([[5, 6, 7, 0], [5, 8, 0]], ["audio"] * 2, [None] * 2, [0, 1], bos=1, pad=0, device="cpu")
    fake = adv.rows_from_tokens([[5, 6, 9, 0], [8, 6, 7, 0], [5, 6], [5, 6, 7, 0]], ["audio"] * 4, [None] * 4,
                                [0, 0, 0, 1], bos=1, pad=0, device="cpu")
    b = adv.discriminator_batch("audio", real, fake, text_reward_all=False)
    # input 0's label is 5 6 7 eot: row 0 leaves it at its third token, row 1 at its first, row 2 never (an
    # unfinished copy); row 3 is about input 1, whose label (5 8 eot) it shares one token with
    want = [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]]
    assert b.fake.judged_mask().tolist() == want
    assert float(adv.DiscCounts.of(b).fake_tokens) == sum(map(sum, want))
    # the BCE's fake side averages over the judged tokens only: a logit on an unjudged token changes nothing
    logits = torch.zeros(4, 4)
    base = adv._bce_side(logits, b.fake.judged_mask(), 0.0, None)
    logits[0, 0] = 9.0
    assert adv._bce_side(logits, b.fake.judged_mask(), 0.0, None) == base
    logits[0, 2] = 9.0  # a judged one does
    assert adv._bce_side(logits, b.fake.judged_mask(), 0.0, None) > base


def test_a_text_judge_head_never_reads_the_input_and_no_head_is_the_bodys_likelihood():
    """adversarial.judge: text: the head's logits are the same whatever the input (its body pass sees blanked
    features) while the body's log-likelihood term still reads it; none: the logit is the body's log-likelihood
    alone (on-policy reverse-KL distillation's reward, with the student's own log-likelihood taken off later)."""
    from stages.models.student import StudentConfig, build_student

    torch.manual_seed(0)
    body = build_student(StudentConfig(style="cross_attention", d_model=16, n_layers=1, n_heads=2, d_ff=32),
                         {"audio": 16}, max_text_tokens=8).eval()
    ids = torch.tensor([[body.spec.bos_id, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    f1, f2 = [torch.randn(7, 16)], [torch.randn(7, 16)]
    judges = {}
    for reads in ("input", "text", "none"):
        judges[reads] = Discriminator(DiscriminatorSpec("audio", vocab_size=body.spec.text_vocab, feature_dim=16,
                                                        head_reads=reads), body).eval()
        with torch.no_grad():
            torch.manual_seed(1)
            torch.nn.init.normal_(judges[reads].head.weight)
    lp1, lp2 = body.score(ids, mask, "audio", f1), body.score(ids, mask, "audio", f2)
    text = judges["text"]
    head1, head2 = text(ids, mask, f1) - lp1, text(ids, mask, f2) - lp2
    assert torch.allclose(head1, head2, atol=1e-5) and head1.abs().max() > 1e-3  # a head that reads the text only
    assert not torch.allclose(judges["input"](ids, mask, f1) - lp1, judges["input"](ids, mask, f2) - lp2, atol=1e-3)
    assert torch.allclose(judges["none"](ids, mask, f1), lp1, atol=1e-6)
    assert torch.allclose(judges["none"].sequence_scores(ids, mask, f1), lp1.sum(1), atol=1e-5)


def test_rows_no_judge_rewards_take_no_policy_gradient():
    """judge: none leaves drawings without a judge: their rows get cross-entropy and KL only, not a reward of
    minus their own log-likelihood (which would be an entropy bonus)."""
    pi = _tiny_student()
    ref = _tiny_student().eval().requires_grad_(False)
    tok = pi.tokenizer
    A, B = tok.encode("yes")[0], tok.encode("no")[0]
    fake = adv.rows_from_tokens([[A, tok.eot], [B, tok.eot]], ["text", "text"], [None, None], [0, 0], tok.bos, tok.eot, "cpu")
    loss, st = adv.pg_objective(pi, ref, {}, fake, 2, kl_weight=0.0)
    assert loss.item() == 0.0 and st["pg_loss"] == 0.0


def test_teacher_scores_join_the_reward_of_the_rows_they_score():
    """pg_objective with teacher_scores: a row without a judge but with a teacher score takes the policy gradient
    of R = score - log pi(row) with the leave-one-out baseline (pinned by hand: k = 2, so each row's advantage is
    its R less the other's); rows without a score stay out of it."""
    pi = _tiny_student().eval()
    ref = _tiny_student().eval().requires_grad_(False)
    tok = pi.tokenizer
    A, B = tok.encode("yes")[0], tok.encode("no")[0]
    fake = adv.rows_from_tokens([[A, tok.eot], [B, tok.eot]], ["text", "text"], [None, None], [0, 0], tok.bos,
                                tok.eot, "cpu")
    scores = (torch.tensor([1.5, -0.5]), torch.tensor([1.0, 1.0]))
    loss, st = adv.pg_objective(pi, ref, {}, fake, 2, kl_weight=0.0, teacher_scores=scores)
    with torch.no_grad():
        lp = adv.policy_logprobs(pi, fake)
    tok_lp = torch.stack([lp[0, 0, A], lp[0, 1, tok.eot], lp[1, 0, B], lp[1, 1, tok.eot]]).view(2, 2)
    r = scores[0] - tok_lp.sum(1)
    adv_ = torch.stack([r[0] - r[1], r[1] - r[0]])
    want = -(adv_.unsqueeze(1) * tok_lp).sum() / 4
    assert loss.item() == pytest.approx(want.item(), rel=1e-5) and loss.item() != 0.0
    assert st["teacher_score"] == pytest.approx(0.5)
    unscored = (torch.tensor([1.5, -0.5]), torch.tensor([0.0, 0.0]))
    assert adv.pg_objective(pi, ref, {}, fake, 2, kl_weight=0.0, teacher_scores=unscored)[0].item() == 0.0


def test_teacher_scores_keep_only_the_teachers_that_score_and_the_rows_with_features():
    """TeacherScores.build keeps a modality's teacher only where it overrides caption_scores (the base Teacher scores
    nothing), skips the Whisper-labelled modality and builds nothing at weight 0; a call scores the rows of those
    modalities that have features, times the weight, and marks the rest unscored."""
    from types import SimpleNamespace

    from modalities.base import Teacher
    from stages.adversarial.teacher_scores import TeacherScores

    class Plain(Teacher):
        def label(self, batch):
            return []

    class Scoring(Plain):
        def caption_scores(self, texts, features):
            return -features.reshape(len(texts), -1).sum(1) - torch.tensor([float(len(t)) for t in texts])

    built = []

    def adapter_of(m):
        built.append(m)
        return SimpleNamespace(build_teacher=lambda device, top_k=0, store_features=False:
                               Scoring() if m == "image" else Plain())

    ts = TeacherScores.build(["audio", "image", "text"], adapter_of, "cpu", 2.0, skip=["audio"])
    assert ts.modalities == ["image"] and built == ["image", "text"]
    assert TeacherScores.build(["image"], adapter_of, "cpu", 0.0).teachers == {}
    f = torch.ones(1, 3)
    rows = adv.rows_from_tokens([[1], [2], [3]], ["image", "image", "text"], [f, None, None], [0, 1, 2], 0, 0, "cpu")
    scores, scored = ts(rows, ["ab", "c", "d"])
    assert scores.tolist() == [2.0 * (-3.0 - 2.0), 0.0, 0.0] and scored.tolist() == [1.0, 0.0, 0.0]


def test_teacher_scores_pull_the_student_toward_the_text_the_teacher_scores_higher():
    """A few policy-gradient steps on the teacher's score alone (no judge) move a student that says "yes" or "no"
    about equally toward the one its teacher scores higher; with the scores swapped, toward the other."""
    for good in ("yes", "no"):
        student, ref, A, B, tok = _a_or_b_student()
        want = A if good == "yes" else B
        before = _p_first(student, want)
        opt = torch.optim.Adam(student.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(15):
            gen = generate(student, ["text"] * 8, [None] * 8, temperature=1.0, max_new_tokens=3, generator=g)
            fake = adv.rows_from_generated(gen, ["text"] * 8, [None] * 8, [i // 4 for i in range(8)], tok.bos)
            s = torch.tensor([1.0 if t.strip() == good else -1.0 for t in gen.texts])
            loss, _ = adv.pg_objective(student, ref, {}, fake, 4, kl_weight=0.0, teacher_scores=(s, torch.ones(len(s))))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert _p_first(student, want) > before + 0.2


# ------------------------------------------------------------------------------------------------- the toy
def _tiny_student():
    from stages.models.student import StudentConfig
    from stages.models.student import build_student

    torch.manual_seed(0)
    return build_student(StudentConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, prefix_len=1), {"text": 0})


def _p_first(student, token: int) -> float:
    with torch.no_grad():
        lp = adv.policy_logprobs(student, adv.rows_from_tokens([[token]], ["text"], [None], [0], student.spec.bos_id,
                                                               student.spec.eot_id, "cpu"))
    return lp[0, 0, token].exp().item()


def _a_or_b_student():
    """A tiny student that says "yes" (A) or "no" (B) about equally, then stops (the "distilled" model), a frozen
    copy of it (the reference), A, B and its tokenizer."""
    torch.set_num_threads(1)
    student = _tiny_student().eval()
    tok = student.tokenizer
    A, B, eot = tok.encode("yes")[0], tok.encode("no")[0], tok.eot
    opt = torch.optim.Adam(student.parameters(), lr=3e-2)
    data = adv.rows_from_tokens([[A, eot], [B, eot]], ["text"] * 2, [None] * 2, [0, 1], tok.bos, eot, "cpu")
    for _ in range(60):
        loss = -student.score(data.input_ids, data.attention_mask, data.modality, data.features).sum() / 4
        opt.zero_grad()
        loss.backward()
        opt.step()
    reference = _tiny_student().eval().requires_grad_(False)
    reference.load_state_dict(student.state_dict())
    return student, reference, A, B, tok


class CountJudge(Judge):
    """A causal discriminator: its logit at t counts `good` minus `bad` in y_1 .. y_t, so the last token's
    (the sequence's) judges the whole text. With a body (as the recipe's judge has the teacher's decoder), the
    sequence score adds the body's log-likelihood of the text: the reward is then count + log p_body -
    log p_student, a pull toward `good` held near the body's distribution."""

    def __init__(self, good: int, bad: int, body=None):
        super().__init__()
        self.good, self.bad, self.body = good, bad, body

    def forward(self, input_ids, attention_mask, features=None):
        y = input_ids[:, 1:]
        return ((y == self.good).float() - (y == self.bad).float()).cumsum(1)

    def judge(self, input_ids, attention_mask, features=None):
        logits, score = super().judge(input_ids, attention_mask, features)
        if self.body is not None:
            lp = self.body.score(input_ids, attention_mask, ["text"] * len(input_ids), features)
            score = score + (lp * attention_mask[:, 1:]).sum(1)
        return logits, score


def _pg_steps(student, reference, judge, tok, steps: int = 15) -> dict:
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        gen = generate(student, ["text"] * 8, [None] * 8, temperature=1.0, max_new_tokens=3, generator=g)
        fake = adv.rows_from_generated(gen, ["text"] * 8, [None] * 8, [i // 4 for i in range(8)], tok.bos)
        loss, st = adv.pg_objective(student, reference, {"text": judge}, fake, 4, kl_weight=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return st


@pytest.mark.parametrize("prefer", ["A", "B"])
def test_sequence_rewards_move_the_student_toward_what_the_discriminator_prefers(prefer):
    # First a student that says A or B about equally (the "distilled" model)...
    student, reference, A, B, tok = _a_or_b_student()
    pa0, pb0 = _p_first(student, A), _p_first(student, B)
    assert pa0 + pb0 > 0.9 and abs(pa0 - pb0) < 0.2, (pa0, pb0)
    # ...then policy-gradient steps on its own samples, rewarded by a discriminator that prefers one of them.
    judge = CountJudge(A, B, reference) if prefer == "A" else CountJudge(B, A, reference)
    st = _pg_steps(student, reference, judge, tok)
    pa1, pb1 = _p_first(student, A), _p_first(student, B)
    if prefer == "A":
        assert pa1 > 0.85 and pa1 > pa0 + 0.3, (pa0, pa1)
    else:
        assert pb1 > 0.85 and pa1 < pa0 - 0.3, (pa0, pa1, pb1)
    assert st["kl"] > 0  # it moved away from the reference, and the KL says so


class ConstantJudge(Judge):
    """A discriminator that finds every token equally fake: logit -1 everywhere."""

    def __init__(self, value: float = -1.0):
        super().__init__()
        self.value = value

    def forward(self, input_ids, attention_mask, features=None):
        return torch.full(input_ids[:, 1:].shape, self.value)


def test_a_judge_that_scores_every_sample_alike_adds_no_pull_of_its_own():
    """One reward per sample against the other samples of its input: a judge whose score is the same for every
    sample (however long) gives the student the gradient a judge scoring 0 gives. Per-token rewards summed over
    a sample's tokens did not: negative everywhere, they taught the student to stop early (git tag arms-2026-12)."""
    torch.set_num_threads(1)
    student, reference, A, B, tok = _a_or_b_student()
    eot = tok.eot
    # 2 inputs x 4 samples of 1 to 3 words
    fake = adv.rows_from_tokens([[A, eot], [A, B, eot], [B, eot], [A, B, A, eot], [B, eot], [B, eot], [A, eot],
                                 [A, A, eot]], ["text"] * 8, [None] * 8, [i // 4 for i in range(8)], tok.bos, eot, "cpu")
    grads = []
    for value in (-1.0, 0.0):
        student.zero_grad()
        adv.pg_objective(student, reference, {"text": ConstantJudge(value)}, fake, 4, kl_weight=0.01)[0].backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert grads[0] and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[0])  # the student's own log-likelihood still moves it


# ---------------------------------------------------------------------------------------- through the stage
TINY = {
    "plugins": ["toy_vibration"],
    "stages": ["ingest", "pseudo_label", "distill", "adversarial"],
    "run": {"progress": False, "num_threads": 1, "device": "cpu", "keep_checkpoints": 2},
    "ingest": {"sources": [{"type": "synthetic", "modality": "vibration", "count": 16, "name": "vib"},
                           {"type": "synthetic", "modality": "text", "count": 16, "name": "words"}],
               "samples_per_shard": 8},
    "distill": {"student": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "prefix_len": 2},
                "steps": 3, "batch_size": 8, "lr": 0.01, "warmup_steps": 1, "val_every": 3, "checkpoint_every": 3},
    "adversarial": {"steps": 3, "disc_warmup_steps": 1, "batch_size": 4, "k_samples": 2, "max_new_tokens": 10,
                    "log_every": 1, "checkpoint_every": 1, "lr": 0.001},
}


from test_image import tiny_clip  # noqa: E402,F401  (the fixture)


def _run_in_process(cfg_path: Path, run_dir: Path, overrides=(), reuse: Path | None = None, until=None):
    from pipeline.config import load_config
    from pipeline.graph import Runner

    cfg = load_config([str(cfg_path)], list(overrides))
    Runner(cfg, run_dir, echo=lambda s: None).run_graph(until=until, reuse=str(reuse) if reuse else None)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny run up to distill (3 steps: a weak reference whose samples are not the labels)."""
    root = tmp_path_factory.mktemp("adv")
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    _run_in_process(cfg, root / "base", until="distill")
    return cfg, root / "base"


def _label_sequences(run: Path) -> set[tuple[int, ...]]:
    from stages.models.labelled_data import load_labelled
    from stages.models.student import load_student

    tok = load_student(run / "distill" / "final").tokenizer
    data = load_labelled(run / "pseudo_label", tok, 96, splits=("train",))
    return {tuple(t for t in e.targets if t != tok.eot) for e in data.splits["train"]}


def _contains(row: list[int], seq: tuple[int, ...]) -> bool:
    return any(tuple(row[i: i + len(seq)]) == seq for i in range(len(row) - len(seq) + 1))


@pytest.mark.parametrize("anchored", [True, False])
def test_unanchored_discriminators_never_see_a_teacher_label(distilled, tmp_path, monkeypatch, anchored):
    cfg, base = distilled
    real_rows = []
    orig = adv.discriminator_batch

    def spy(modality, real, fake, text_reward_all):
        b = orig(modality, real, fake, text_reward_all)
        for ids, m in zip(b.real.input_ids.tolist(), b.real.attention_mask.tolist()):
            real_rows.append(ids[1: sum(m)])  # without bos and padding
        return b

    from stages.adversarial import judges, stage

    monkeypatch.setattr(stage, "discriminator_batch", spy)  # the steps
    monkeypatch.setattr(judges, "discriminator_batch", spy)  # the pre-training
    run = tmp_path / "run"
    _run_in_process(cfg, run, [f"adversarial.anchored={str(anchored).lower()}"], reuse=base)
    labels = _label_sequences(base)
    assert real_rows and all(len(s) >= 3 for s in labels)
    hits = sum(any(_contains(r, s) for s in labels) for r in real_rows)
    recs = [json.loads(l) for l in (run / "adversarial" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "adversarial" / "final" / "adversarial.json").read_text())
    if anchored:  # the control: the same spy sees the labels when they are the real side
        assert hits == len(real_rows)
        assert any("ce" in r for r in recs)
    else:
        assert hits == 0, "a teacher label reached a discriminator's real side"
        assert not any("ce" in r for r in recs) and all(r.get("label") is None for r in recs if "step" in r)
        assert summary["anchored"] is False and "no teacher label" in summary["real_side"]
        assert any(r.get("kl", 0) > 0 for r in recs)  # the KL penalty stays


# The first figures of the phase on TINY (text and the toy vibration modality, frozen copies of the student as judges):
# the judges' pre-training BCE per pass, the warm-up step's BCE and mean judge score, then the student's total loss
# and cross-entropy per step. They change only when the numerics of the stack or of the phase change.
# Re-pinned when splits became a hash of each sample's bytes (TINY's train split changed), and when samples
# stopped at the length cap fitted on the train labels ([Grounding proof]; the warm-up's reward -108.35 -> -102.98:
# the random student's samples had run to the 96-token limit), and when tokens were drawn from uniforms in place
# of torch.multinomial's exponentials (the same distribution, other draws).
PINNED_PHASE = {"pretrain_disc_bce/text": [8.966752, 8.933916],
                "warmup": {"disc_loss/text": 8.649400, "disc_loss/vibration": 8.331996, "reward": -102.833878},
                "loss": [4.674461, 4.764987, 4.811873], "ce": [9.349138, 9.528108, 9.621337]}


def test_pinned_first_phase_losses(distilled, tmp_path):
    cfg, base = distilled
    _run_in_process(cfg, tmp_path / "run", reuse=base)
    recs = [json.loads(l) for l in (tmp_path / "run/adversarial/metrics.jsonl").read_text().splitlines()]
    pre = [r["pretrain_disc_bce/text"] for r in recs if r.get("phase") == "disc_pretrain"]
    warm = next(r for r in recs if r.get("phase") == "disc_warmup")
    moved = [r for r in recs if r.get("phase") == "adversarial"]
    got = {"pretrain_disc_bce/text": pre, "warmup": {k: warm[k] for k in PINNED_PHASE["warmup"]},
           "loss": [r["loss"] for r in moved], "ce": [r["ce"] for r in moved]}
    assert got["pretrain_disc_bce/text"] == pytest.approx(PINNED_PHASE["pretrain_disc_bce/text"], abs=1e-4), got
    assert got["warmup"] == pytest.approx(PINNED_PHASE["warmup"], abs=1e-3), got
    assert got["loss"] == pytest.approx(PINNED_PHASE["loss"], abs=1e-4), got
    assert got["ce"] == pytest.approx(PINNED_PHASE["ce"], abs=1e-4), got


def test_length_ratio_and_its_guard_by_hand():
    from stages.adversarial.config import GuardConfig

    real = adv.rows_from_tokens([[5, 6, 7, 0], [5, 0]], ["audio"] * 2, [None] * 2, [0, 1], bos=1, pad=0, device="cpu")
    fake = adv.rows_from_tokens([[5, 0], [5, 6, 0], [9, 0], [8, 0]], ["audio"] * 4, [None] * 4, [0, 0, 1, 1], bos=1,
                                pad=0, device="cpu")
    sums = adv.length_sums(real, fake)
    # real: 4 + 2 tokens after bos over 2 rows (3 each); fake: 2 + 3 + 2 + 2 over 4 (2.25): 0.75
    assert sums == {"real_tokens": 6.0, "real_rows": 2.0, "fake_tokens": 9.0, "fake_rows": 4.0}
    assert adv.length_ratio(sums) == pytest.approx(0.75)
    assert adv.length_ratio({**sums, "fake_rows": 0.0}) is None
    g = GuardConfig(min_length_ratio=0.8)
    assert "length_ratio 0.7500 < guards.min_length_ratio 0.8 at step 3" == adv.guard_trip(g, {"step": 3, "length_ratio": 0.75})
    assert adv.guard_trip(g, {"step": 3, "length_ratio": 0.85}) is None and adv.guard_trip(g, {"step": 3}) is None


def test_guards_and_disabled_copy_and_retired_arms(distilled, tmp_path):
    from pipeline.errors import UserError

    cfg, base = distilled
    # a retired arm is one line naming the tag that still has it
    with pytest.raises(UserError, match="'adversarial.objective' is retired .*arms-2026-12.*docs/history.md"):
        _run_in_process(cfg, tmp_path / "spin", ["adversarial.objective=spin"], reuse=base)
    _run_in_process(cfg, tmp_path / "guard", ["adversarial.guards.max_self_bleu_4=-1"], reuse=base)
    m = json.loads((tmp_path / "guard/adversarial/manifest.json").read_text())
    assert m["counts"]["early_stopped"] == 1 and m["counts"]["steps"] == 1 and m["counts"]["early_stop_step"] == 2
    assert "self_bleu_4" in m["counts"]["early_stop_reason"]
    last = json.loads((tmp_path / "guard/adversarial/metrics.jsonl").read_text().splitlines()[-1])
    assert "max_self_bleu_4" in last["early_stop"]
    # the length guard: every logged record carries the samples' length over the labels'; a bar above it trips
    _run_in_process(cfg, tmp_path / "short", ["adversarial.guards.min_length_ratio=100"], reuse=base)
    last = json.loads((tmp_path / "short/adversarial/metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["length_ratio"] < 100 and "length_ratio" in last["early_stop"] and "min_length_ratio" in last["early_stop"]

    # one reward per sample needs a leave-one-out baseline: k_samples >= 2
    with pytest.raises(UserError, match="k_samples"):
        _run_in_process(cfg, tmp_path / "k1", ["adversarial.k_samples=1"], reuse=base)
    _run_in_process(cfg, tmp_path / "off", ["adversarial.enabled=false"], reuse=base)
    for f in ("student.json", "projectors.safetensors", "lm/model.safetensors"):
        assert (tmp_path / "off/adversarial/final" / f).read_bytes() == (base / "distill/final" / f).read_bytes()


def test_a_frozen_body_keeps_the_distilled_weights_while_the_head_learns(distilled, tmp_path):
    from safetensors.torch import load_file

    cfg, base = distilled
    _run_in_process(cfg, tmp_path / "frozen", reuse=base)
    discs = tmp_path / "frozen/adversarial/final/discriminators"
    for m in ("vibration", "text"):
        body = load_file(discs / f"{m}.student" / "lm" / "model.safetensors")
        want = load_file(base / "distill/final/lm/model.safetensors")
        assert body.keys() == want.keys() and all(torch.equal(body[k], want[k]) for k in want), m
        head = load_file(discs / f"{m}.safetensors")
        assert any(v.abs().sum() > 0 for k, v in head.items() if k.startswith("head.")), m  # the head moved
    with pytest.raises(Exception, match="'adversarial.disc_train_body' is retired"):
        _run_in_process(cfg, tmp_path / "bad", ["adversarial.disc_train_body=false"], reuse=base)


def test_ema_keeps_the_moving_average_of_the_students_steps_and_final_is_it(distilled, tmp_path):
    from safetensors.torch import load_file

    from stages.models.student import load_student

    cfg, base = distilled
    run = tmp_path / "ema"
    _run_in_process(cfg, run, ["adversarial.ema=0.5", "adversarial.select_by=last", "run.keep_checkpoints=10"],
                    reuse=base)
    dirs = sorted((run / "adversarial/checkpoints").iterdir())
    assert [d.name for d in dirs] == ["step-000001", "step-000002", "step-000003", "step-000004"]
    student = [load_file(d / "model.student.safetensors") for d in dirs]
    avg = [load_file(d / "model.student_ema.safetensors") for d in dirs]
    # the warm-up moved only the judges: the average starts at the distilled weights
    assert all(torch.equal(avg[0][k], student[0][k]) for k in avg[0])
    for i in range(1, len(dirs)):  # each student step: avg <- 0.5 avg + 0.5 weights
        for k in avg[i]:
            torch.testing.assert_close(avg[i][k], 0.5 * avg[i - 1][k] + 0.5 * student[i][k], rtol=0, atol=1e-6)
    moved = [k for k in avg[-1] if not torch.equal(student[-1][k], student[0][k])]
    assert moved and all(not torch.equal(avg[-1][k], student[-1][k]) for k in moved)
    final = load_student(run / "adversarial/final", "cpu").state_dict()
    assert all(torch.equal(final[k], avg[-1][k]) for k in avg[-1])
    # killed after its second student step and resumed: the average comes back from the checkpoint
    again, args = tmp_path / "again", ["adversarial.ema=0.5", "adversarial.select_by=last"]
    cli("run", cfg, *args, "--run-dir", again, "--until", "distill", "--reuse", base, check=True)
    assert cli("run", cfg, *args, "--run-dir", again, env={"GROUNDGAN_FAULT": "step:2"}).returncode == -9
    cli("run", cfg, *args, "--run-dir", again, check=True)
    want = run / "adversarial/final/lm/model.safetensors"
    assert (again / "adversarial/final/lm/model.safetensors").read_bytes() == want.read_bytes()
    with pytest.raises(Exception, match=r"adversarial.ema' is the moving average's decay"):
        _run_in_process(cfg, tmp_path / "bad", ["adversarial.ema=1.0"], reuse=base)


def test_cli_end_to_end_text_audio_image_resumes_to_identical_weights(tmp_path):
    cfg = {
        **TINY,
        "plugins": ["modalities.audio", "modalities.image"],
        "modalities": {"audio": {"teacher": {"checkpoint": "random", "max_new_tokens": 8}},
                       "image": {"teacher": {"checkpoint": "random"}}},
        "ingest": {"sources": [{"type": "synthetic", "modality": "text", "count": 12, "name": "words"},
                               {"type": "synthetic", "modality": "audio", "count": 6, "name": "tones"},
                               {"type": "synthetic", "modality": "image", "count": 6, "name": "shapes"}],
                   "samples_per_shard": 6, "split": {"train": 0.6, "val": 0.2, "test": 0.2}},  # val clips for val_wer
        "pseudo_label": {"filters": {"min_avg_logprob": None, "max_compression_ratio": None,
                                     "max_no_speech_prob": None, "max_wer": None}},
        "adversarial": {**TINY["adversarial"], "steps": 4, "max_new_tokens": 8},
    }
    cfg["distill"] = {**TINY["distill"], "student": {**TINY["distill"]["student"], "feature_frames": 16},
                      "max_text_tokens": 16}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    a, b = tmp_path / "a", tmp_path / "b"
    r = cli("run", p, "--run-dir", a, check=True)
    assert "adversarial: finished" in r.stdout
    final = a / "adversarial" / "final"
    parts = ["json", "safetensors", "student"]
    assert sorted(x.name for x in (final / "discriminators").iterdir()) == [
        f"{m}.{p}" for m in ("audio", "image", "text") for p in parts]
    m = json.loads((a / "adversarial" / "manifest.json").read_text())
    assert m["counts"]["steps"] == 4 and m["counts"]["discriminators"] == 3
    recs = [json.loads(l) for l in (a / "adversarial" / "metrics.jsonl").read_text().splitlines()]
    assert any("disc_acc/audio" in r for r in recs) and any("distinct_2" in r for r in recs)
    pre = [r for r in recs if r.get("phase") == "disc_pretrain"]
    assert [r["epoch"] for r in pre] == [1, 2]
    # both training stages' figures in TensorBoard: the student's terms and the judges', by name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {s: set(EventAccumulator(str(a / s / "tensorboard")).Reload().Tags()["scalars"])
            for s in ("distill", "adversarial")}
    assert {"train/loss", "train/ce", "train/kd", "val/loss"} <= tags["distill"], tags
    assert {"train/pg_loss", "train/ce", "train/kl", "train/reward", "disc_acc/audio", "disc_rank/image",
            "train/distinct_2"} <= tags["adversarial"], tags
    # rebuilt from final/ alone, as evaluate does
    discs = adv.load_discriminators(final)
    from stages.models.student import load_student

    tok = load_student(final).tokenizer
    probs = adv.discriminator_probs(discs, "image", ["a picture of a dog", "x"], [torch.randn(3, discs["image"].spec.feature_dim)] * 2, tok)
    assert len(probs) == 2 and all(0 < q < 1 for q in probs)

    # the same run, killed right after its second student step, then resumed
    cli("run", p, "--run-dir", b, "--until", "distill", "--reuse", a, check=True)
    r = cli("run", p, "--run-dir", b, env={"GROUNDGAN_FAULT": "step:2"})
    assert r.returncode == -9, r.stderr
    assert not (b / "adversarial" / "manifest.json").exists()
    r = cli("run", p, "--run-dir", b, check=True)
    assert "adversarial: running (resuming partial work)" in r.stdout
    files = sorted(q.relative_to(final) for q in final.rglob("*") if q.is_file())
    assert len(files) >= 9
    for rel in files:
        assert (b / "adversarial" / "final" / rel).read_bytes() == (final / rel).read_bytes(), rel
    assert (b / "adversarial" / "metrics.jsonl").read_text() == (a / "adversarial" / "metrics.jsonl").read_text()


class RowJudge(Judge):
    """A discriminator whose logit at every position is a fixed score of the row's first token."""

    def __init__(self, score: dict[int, float]):
        super().__init__()
        self.score = score
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, features=None):
        s = torch.tensor([self.score[int(t)] for t in input_ids[:, 1]]) + self.w
        return s[:, None].expand(-1, input_ids.shape[1] - 1)


def test_discriminator_ranking_is_free_of_the_logits_offset():
    real = adv.rows_from_tokens([[5, 0], [6, 0]], ["audio"] * 2, [None] * 2, [0, 1], bos=1, pad=0, device="cpu")
    fake = adv.rows_from_tokens([[7, 0], [8, 0], [9, 0], [5, 0]], ["audio"] * 4, [None] * 4, [0, 0, 1, 1], bos=1,
                                pad=0, device="cpu")
    b = adv.DiscBatch(real, fake)
    # every logit negative: the thresholded accuracy is the 0.5 of "all fake", the ranking is what it is
    judge = RowJudge({5: -1.0, 6: -3.0, 7: -2.0, 8: -1.0, 9: -4.0})
    _, st = adv.discriminator_loss(judge, b, smoothing=0.0)
    assert st["acc"] == pytest.approx(0.5)
    # input 0: -1 vs -2 (above), -1 vs -1 (tie, half); input 1: -3 vs -4 (above), -3 vs -1 (below)
    assert st["rank"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)

    class Scored(RowJudge):  # a sequence score that is not the last token's logit (as with lm_score)
        def judge(self, input_ids, attention_mask, features=None):
            logits = self(input_ids, attention_mask)
            return logits, -logits[:, 0]

    # the ranking reads the rewards' score: input 0: 1 vs 2 (below), 1 vs 1 (half); input 1: 3 vs 4, 3 vs 1
    _, st = adv.discriminator_loss(Scored({5: -1.0, 6: -3.0, 7: -2.0, 8: -1.0, 9: -4.0}), b, smoothing=0.0)
    assert st["rank"] == pytest.approx((0 + 0.5 + 0 + 1) / 4) and st["acc"] == pytest.approx(0.5)


AUDIO = {
    "stages": ["ingest", "pseudo_label", "distill", "adversarial"],
    "seed": 0,
    "plugins": ["modalities.audio"],
    "run": {"num_threads": 1, "progress": False, "device": "cpu"},
    "ingest": {"sources": [{"type": "synthetic", "modality": "audio", "count": 12, "name": "tones"}],
               "samples_per_shard": 12, "split": {"train": 0.6, "val": 0.4, "test": 0.0}},
    "modalities": {"audio": {"teacher": {"kind": "whisper", "checkpoint": "random"}}},
    "pseudo_label": {"filters": {"min_avg_logprob": None, "max_compression_ratio": None,
                                 "max_no_speech_prob": None, "max_wer": None}},
    "distill": {"student": {"style": "prefix", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "prefix_len": 2,
                            "feature_frames": 8},
                "steps": 2, "batch_size": 6, "lr": 3e-3, "warmup_steps": 1, "max_text_tokens": 12,
                "select_by": "val_loss"},
    "adversarial": {"steps": 4, "disc_warmup_steps": 0, "batch_size": 4, "k_samples": 2, "max_new_tokens": 12,
                    "lr": 0.05, "select_by": "val_wer", "val_every": 2, "log_every": 1},
    # val WER decodes as evaluate does: a fallback every greedy text fails (mean log-prob below 0)
    "decoding": {"fallback_temperatures": [1.0], "min_avg_logprob": 0.0},
}


def test_select_by_confirmed_val_wer_in_the_phase(tmp_path):
    from test_selection import expected

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(AUDIO))
    _run_in_process(cfg, tmp_path / "run", ["adversarial.select_by=confirmed_val_wer", "adversarial.steps=6"])
    adv_dir = tmp_path / "run" / "adversarial"
    vals = [r for r in map(json.loads, (adv_dir / "metrics.jsonl").read_text().splitlines()) if "val_wer" in r]
    assert [r["student_steps"] for r in vals] == [0, 2, 4, 6]
    want = vals[expected([r["val_wer"] for r in vals])]
    summary = json.loads((adv_dir / "final" / "adversarial.json").read_text())
    assert (summary["selected_student_step"], summary["selected_val_wer"]) == (want["student_steps"], want["val_wer"])
    picked = "candidate" if want["student_steps"] == 6 else "best"
    assert (adv_dir / "final/lm/model.safetensors").read_bytes() == (adv_dir / picked / "lm/model.safetensors").read_bytes()


def test_select_by_val_wer_keeps_the_best_student_step_the_distilled_one_included(tmp_path):
    from safetensors.torch import load_file

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(AUDIO))
    _run_in_process(cfg, tmp_path / "run")
    adv_dir = tmp_path / "run" / "adversarial"
    vals = [r for r in map(json.loads, (adv_dir / "metrics.jsonl").read_text().splitlines()) if "val_wer" in r]
    assert [r["student_steps"] for r in vals] == [0, 2, 4]  # before the first step, then every val_every
    for r in vals:  # each check's texts, per clip: their errors sum to the val WER it logged
        rows = [json.loads(x) for x in (adv_dir / f"val_predictions/step_{r['student_steps']:06d}.jsonl")
                .read_text().splitlines()]
        scored = [x for x in rows if x["errors"] is not None]
        assert rows and {x["modality"] for x in rows} == {"audio"}
        assert r["val_wer_greedy"] is not None and all("greedy" in x for x in rows)
        assert sum(x["errors"] for x in scored) / sum(x["words"] for x in scored) == pytest.approx(r["val_wer"])
    want = min(vals, key=lambda r: (r["val_wer"], r["student_steps"]))  # a tie keeps the earlier student
    summary = json.loads((adv_dir / "final" / "adversarial.json").read_text())
    assert summary["selected_student_step"] == want["student_steps"] and summary["selected_val_wer"] == want["val_wer"]
    final = load_file(str(adv_dir / "final/lm/model.safetensors"))
    distilled = load_file(str(tmp_path / "run/distill/final/lm/model.safetensors"))
    same = all(torch.equal(final[k], distilled[k]) for k in final)
    assert same == (want["student_steps"] == 0)  # lr 0.05 moves the student: only step 0 is the distilled one

    r = cli("run", cfg, "--run-dir", tmp_path / "run", "adversarial.anchored=false")
    assert r.returncode == 2 and "anchored: false" in r.stderr and "select_by" in r.stderr


def test_teacher_backbone_discriminator_holds_every_teacher_layer_and_the_students_projectors(tmp_path, tiny_clip):
    """disc_backbone: teacher: the discriminator of the modality the Whisper teacher labelled reads text with the
    teacher's whole decoder (the student keeps one of its three layers here), its modality projectors and
    markers copied from the student; the image one (a classifier's labels) is a copy of the student."""
    from safetensors.torch import load_file

    from stages.models.student import load_student

    cfg = {
        **TINY,
        "plugins": ["modalities.audio", "modalities.image"],
        "modalities": {"audio": {"teacher": {"checkpoint": "random", "max_new_tokens": 8, "random_n_layer": 3}},
                       # a CLIP-style image teacher: it scores the student's captions (teacher_score_weight)
                       "image": {"teacher": {"kind": "clip", "checkpoint": "random", "clip_model": tiny_clip,
                                             "vocabulary": ["circle", "square", "triangle"]}}},
        "ingest": {"sources": [{"type": "synthetic", "modality": "audio", "count": 6, "name": "tones"},
                               {"type": "synthetic", "modality": "image", "count": 6, "name": "shapes"}],
                   "samples_per_shard": 6, "split": {"train": 0.6, "val": 0.2, "test": 0.2}},  # val clips for val_wer
        "pseudo_label": {"filters": {"min_avg_logprob": None, "max_compression_ratio": None,
                                     "max_no_speech_prob": None, "max_wer": None}},
        "distill": {**TINY["distill"], "student": {"style": "cross_attention", "keep_decoder_layers": [0]},
                    "max_text_tokens": 16},
        "adversarial": {**TINY["adversarial"], "steps": 2, "max_new_tokens": 8, "disc_backbone": "teacher",
                        "teacher_score_weight": 1.0},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    _run_in_process(p, tmp_path / "run")
    # the [Grounding proof] arms on the same distilled student: the text-only head, and no head at all
    for judge in ("text", "none"):
        armed = {**cfg, "adversarial": {**cfg["adversarial"], "judge": judge}}
        (tmp_path / f"{judge}.yaml").write_text(yaml.safe_dump(armed))
        shutil.copytree(tmp_path / "run", tmp_path / judge, ignore=shutil.ignore_patterns("adversarial", "evaluate"))
        _run_in_process(tmp_path / f"{judge}.yaml", tmp_path / judge)
        got = adv.load_discriminators(tmp_path / judge / "adversarial/final")
        recs = [json.loads(l) for l in (tmp_path / judge / "adversarial/metrics.jsonl").read_text().splitlines()]
        # every student step's drawings take the CLIP teacher's score of their captions, under every judge
        scored = [r["teacher_score"] for r in recs if r.get("phase") == "adversarial" and "teacher_score" in r]
        assert scored and all(x <= 0 for x in scored)
        if judge == "none":  # only the teacher's decoder judges; no pre-training, warm-up or judge step
            assert sorted(got) == ["audio"] and got["audio"].spec.head_reads == "none"
            assert not any("phase" in r and r["phase"] != "adversarial" for r in recs)
            assert not any(k.startswith("disc_loss") for r in recs for k in r)
            assert torch.count_nonzero(got["audio"].head.weight) == 0
        else:
            assert sorted(got) == ["audio", "image"] and got["image"].spec.head_reads == "text"
            assert any(k.startswith("disc_loss") for r in recs for k in r)
    final = tmp_path / "run/adversarial/final"
    student = load_student(tmp_path / "run/distill/final")
    assert len(student.lm.model.decoder.layers) == 1
    discs = adv.load_discriminators(final)
    assert sorted(discs) == ["audio", "image"]
    assert len(discs["audio"].body.lm.model.decoder.layers) == 3
    assert len(discs["image"].body.lm.model.decoder.layers) == 1
    for m, d in discs.items():
        assert d.body.spec.marker_ids == student.spec.marker_ids
    # Where a body starts: the student's projectors and marker rows, the teacher's three layers.
    import types

    from pipeline.config import load_config

    build, mod = adv._teacher_body_builder(types.SimpleNamespace(cfg=load_config([str(p)])), student,
                                           ["audio", "image"], "cpu")
    assert mod == "audio"
    body = build()
    want, got = student.projectors.state_dict(), body.projectors.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    rows = slice(student.spec.text_vocab, None)
    assert torch.equal(body.lm.get_input_embeddings().weight[rows], student.lm.get_input_embeddings().weight[rows])
    assert len(body.lm.model.decoder.layers) == 3
    trained = load_file(str(final / "discriminators/image.student/projectors.safetensors"))
    assert {f"projectors.{k}" for k in want} <= trained.keys()
    with pytest.raises(Exception, match="cross_attention"):
        bad = {**cfg, "distill": {**cfg["distill"], "student": {"style": "prefix"}}}
        p.write_text(yaml.safe_dump(bad))
        _run_in_process(p, tmp_path / "bad")


def test_the_demo_is_the_recipe_and_its_overlay_loads(tmp_path):
    """configs/demo.yaml names data, teachers and sizes; every training setting is the recipe's default, so a config
    that names only the demo's data and teachers trains the same way. configs/augmented.yaml is an overlay on it:
    merged onto the demo, it must name fields that exist and pass the checks made at load. The demo's data
    folders exist only after `make demo`: synthetic sources stand in for them here."""
    from pipeline.config import load_config

    demo = offline_demo_config(tmp_path)
    loaded = load_config([str(demo)])
    c = loaded.root
    a = c.adversarial
    assert loaded.notes == []  # every recipe choice applies to the demo
    assert (a.disc_backbone, a.inputs, a.k_samples, a.select_by) == ("teacher", ["pool"], 4, "confirmed_val_wer")
    assert (c.distill.student.style, c.distill.student.freeze_embeddings, c.distill.select_by) == \
        ("cross_attention", True, "confirmed_val_wer")
    # only data and teachers: the same training sections, but for the demo's batch mix
    raw = yaml.safe_load(demo.read_text())
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({k: raw[k] for k in ("ingest", "modalities")}))
    b = load_config([str(bare)]).root
    assert b.distill == c.distill and b.decoding == c.decoding and b.pseudo_label == c.pseudo_label
    assert dataclasses.replace(b.adversarial, modality_weights=a.modality_weights) == a
    aug = load_config([str(demo), str(ROOT / "configs" / "augmented.yaml")]).root
    assert aug.adversarial.inputs == ["augmented"] and aug.pseudo_label.augment_copies == 2
    assert aug.distill == c.distill and dataclasses.replace(aug.adversarial, inputs=a.inputs) == a  # the rest is the demo's


def test_the_unanchored_ablation_lets_no_teacher_judge_into_the_phase(tmp_path):
    """`anchored: false` on the demo's phase: the recipe's val_wer selection reads the teacher's labels and its
    teacher-backbone discriminator scores text by the teacher's likelihood, so both fall back (and say so), every
    other setting staying the anchored run's; set explicitly, they are refused in one message."""
    from pipeline.config import load_config
    from pipeline.errors import UserError

    files = [str(offline_demo_config(tmp_path))]
    anchored = load_config(files).root.adversarial
    loaded = load_config(files, ["adversarial.anchored=false"])
    a = loaded.root.adversarial
    fallbacks = ("anchored", "select_by", "disc_backbone")
    assert (a.anchored, a.select_by, a.disc_backbone, a.teacher_score_weight) == (False, "last", "student", None)
    assert sorted(loaded.notes) == ["adversarial.disc_backbone (the run is unanchored): student",
                                    "adversarial.select_by (the run is unanchored): last"]
    assert {k: v for k, v in vars(a).items() if k not in fallbacks} == \
        {k: v for k, v in vars(anchored).items() if k not in fallbacks}
    with pytest.raises(UserError) as e:
        load_config(files, ["adversarial.anchored=false", "adversarial.select_by=val_wer",
                            "adversarial.disc_backbone=teacher", "adversarial.teacher_score_weight=1",
                            "adversarial.length_repeats=4"])
    assert "anchored: false" in str(e.value) and "select_by: last" in str(e.value) and "disc_backbone: student" in str(e.value)
    assert "teacher_score_weight: 0" in str(e.value) and "length_repeats: 1" in str(e.value)


def test_the_judge_arms_load_as_overlays_and_judge_none_needs_the_teachers_decoder(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import UserError

    demo = offline_demo_config(tmp_path)
    none = load_config([str(demo), str(ROOT / "configs/arms/onpolicy_kd.yaml")])
    a = none.root.adversarial
    assert (a.judge, a.disc_warmup_steps, a.disc_pretrain_epochs) == ("none", 0, 0)
    assert "adversarial.disc_warmup_steps 0 (judge: none has no head to train)" in none.notes
    assert load_config([str(demo), str(ROOT / "configs/arms/text_judge.yaml")]).root.adversarial.judge == "text"
    nr = load_config([str(demo), str(ROOT / "configs/arms/no_reward.yaml")]).root.adversarial
    assert dataclasses.replace(nr, pg_weight=1.0) == a  # onpolicy_kd less its reward, nothing else
    assert nr.pg_weight == 0.0 and nr.select_by == "confirmed_val_wer"
    mp = load_config([str(demo), str(ROOT / "configs/arms/mle_pool.yaml")]).root
    assert mp.distill.inputs == ["train", "pool"] and mp.adversarial.enabled is False
    assert dataclasses.replace(mp.distill, inputs=["train"]) == load_config([str(demo)]).root.distill
    with pytest.raises(UserError, match="disc_backbone: teacher"):
        load_config([str(demo), str(ROOT / "configs/arms/onpolicy_kd.yaml")], ["adversarial.disc_backbone=student"])


def test_length_repeats_draws_each_input_by_its_labels_length_over_the_median():
    """adversarial.length_repeats: round(tokens / the modality's median), between 1 and the cap; every pass of the
    sampler draws each input that many times, and the sampler's state still restores exactly."""
    from collections import Counter

    from stages.adversarial.stage import length_repeats
    from stages.models.labelled_data import Example, MixtureSampler

    lengths = {"audio": [4, 4, 5, 6, 13, 30, 200], "image": [3, 3, 9]}
    ex = [Example(key=f"{m}{i}", modality=m, split="pool", text="", targets=[1] * n, teacher="")
          for m, ns in lengths.items() for i, n in enumerate(ns)]
    r = length_repeats(ex, 8)
    # audio median 6: 4/6 -> 1, 5/6 -> 1, 13/6 -> 2, 30/6 -> 5, 200/6 -> 8 (the cap); image median 3: 9/3 -> 3
    assert r == [1, 1, 1, 1, 2, 5, 8, 1, 1, 3]
    assert length_repeats(ex, 1) == [1] * len(ex)
    s = MixtureSampler(ex, 5, {"image": 0.0}, seed=3, repeats=r)
    drawn = Counter(i for _ in range(19) for i in s.next_batch())  # 95 draws: exactly five passes of 19
    assert {ex[i].key: drawn[i] for i in drawn} == {e.key: 5 * k for e, k in zip(ex, r) if e.modality == "audio"}
    state = json.loads(json.dumps(s.state_dict()))
    rest = [s.next_batch() for _ in range(4)]
    t = MixtureSampler(ex, 5, {"image": 0.0}, seed=3, repeats=r)
    t.load_state_dict(state)
    assert [t.next_batch() for _ in range(4)] == rest
    with pytest.raises(ValueError, match="repeats"):
        MixtureSampler(ex, 5, {}, seed=3, repeats=[0] * len(ex))


def test_length_repeats_reaches_the_phases_sampler(distilled, tmp_path, monkeypatch):
    """The setting is wired: the phase's sampler gets length_repeats(its inputs, N), and without it no repeats
    (each input once a pass, the sampler as before)."""
    import stages.adversarial.stage as stage
    from stages.adversarial.stage import length_repeats

    seen = []

    class Recording(stage.MixtureSampler):
        def __init__(self, examples, batch_size, weights, seed, repeats=None):
            seen.append((list(examples), repeats))
            super().__init__(examples, batch_size, weights, seed, repeats)

    calls = []

    def recorded_repeats(examples, most):
        calls.append(most)
        return length_repeats(examples, most)

    monkeypatch.setattr(stage, "MixtureSampler", Recording)
    monkeypatch.setattr(stage, "length_repeats", recorded_repeats)
    cfg, base = distilled
    _run_in_process(cfg, tmp_path / "long", ["adversarial.length_repeats=3", "adversarial.steps=1"], reuse=base)
    (examples, repeats), = seen
    assert calls == [3] and repeats == length_repeats(examples, 3) and len(repeats) == len(examples)
    _run_in_process(cfg, tmp_path / "once", ["adversarial.steps=1"], reuse=base)
    assert calls == [3] and seen[1][1] is None and [e.key for e in seen[1][0]] == [e.key for e in examples]


def test_the_long_inputs_arm_loads_as_an_overlay(tmp_path):
    from pipeline.config import load_config

    demo = offline_demo_config(tmp_path)
    a = load_config([str(demo), str(ROOT / "configs/arms/long_inputs.yaml")]).root
    b = load_config([str(demo)]).root
    assert a.adversarial.length_repeats == 8 and b.adversarial.length_repeats is None
    assert dataclasses.replace(a.adversarial, length_repeats=None) == b.adversarial


def test_length_neutral_rewards_take_out_the_cost_per_token():
    """length_neutral_rewards: per modality, b = the batch's rewards summed / their tokens summed, each reward less
    b x its tokens. Rewards that are a pure cost per token come out all zero (length alone earns nothing), a
    token's own ratio still moves its row, modalities never mix, and the recipe's sum is what is left unset."""
    import torch

    from stages.adversarial.losses import length_neutral_rewards

    tokens = torch.tensor([2.0, 4.0, 10.0, 4.0])
    got = length_neutral_rewards(-0.5 * tokens, tokens, ["audio"] * 4)
    assert torch.allclose(got, torch.zeros(4), atol=1e-6)
    r = torch.tensor([-1.0, -2.0, -5.0, -1.0, 3.0, 1.0])  # the fourth clip: one better token; two drawings
    n = torch.tensor([2.0, 4.0, 10.0, 4.0, 4.0, 4.0])
    got = length_neutral_rewards(r, n, ["audio"] * 4 + ["image"] * 2)
    b = (-1 - 2 - 5 - 1) / 20.0
    assert torch.allclose(got[:4], r[:4] - b * n[:4])
    assert torch.allclose(got[4:], torch.tensor([1.0, -1.0]))  # b = 0.5 from the drawings alone
    assert got[3] > got[1]  # same length, the better tokens


def test_length_neutral_reaches_the_policy_gradient(distilled, tmp_path, monkeypatch):
    """adversarial.length_neutral is wired: the phase's pg_objective is called with it (the recipe's default), and
    with false without it."""
    import stages.adversarial.stage as stage

    flags = []
    real = stage.pg_objective

    def recorded(*args, **kwargs):
        flags.append(kwargs.get("length_neutral"))
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "pg_objective", recorded)
    cfg, base = distilled
    _run_in_process(cfg, tmp_path / "neutral", ["adversarial.steps=1"], reuse=base)
    assert flags and set(flags) == {True}
    flags.clear()
    _run_in_process(cfg, tmp_path / "summed", ["adversarial.length_neutral=false", "adversarial.steps=1"], reuse=base)
    assert flags and set(flags) == {False}


def test_the_demo_is_length_neutral_and_the_summed_reward_is_an_overlay(tmp_path):
    from pipeline.config import load_config

    demo = offline_demo_config(tmp_path)
    a = load_config([str(demo), str(ROOT / "configs/arms/summed_reward.yaml")]).root
    b = load_config([str(demo)]).root
    assert b.adversarial.length_neutral is True and a.adversarial.length_neutral is False
    assert dataclasses.replace(a.adversarial, length_neutral=True) == b.adversarial


def test_the_length_neutral_default_is_hashed_and_null_is_the_old_hash():
    """The default (true) is part of the phase's config hash, so a run made when it was unset (the summed reward) is
    not taken for one made with it; a run that set true keeps its hash; null hashes as those old runs did."""
    from pipeline.plain import hashed, stable_hash
    from stages.adversarial.config import AdversarialConfig

    new, old = AdversarialConfig(), AdversarialConfig(length_neutral=None)
    assert hashed(new)["length_neutral"] is True and "length_neutral" not in hashed(old)
    assert stable_hash(hashed(new)) == stable_hash(hashed(AdversarialConfig(length_neutral=True)))
    assert len({stable_hash(hashed(c)) for c in (new, old, AdversarialConfig(length_neutral=False))}) == 3


def test_length_neutral_reduces_once_whatever_a_slice_holds(monkeypatch):
    """Under torchrun every process must make the same collectives: length_neutral_rewards sums over processes in
    one reduction over the whole batch's modalities (`names`), so a slice that holds no drawing makes the same call
    as one that does, and its own rows come out as a single process would make them."""
    import torch

    import stages.adversarial.losses as losses

    calls = []
    real = losses.global_count
    monkeypatch.setattr(losses, "global_count", lambda x: calls.append(tuple(x.shape)) or real(x))
    r, n = torch.tensor([-1.0, -2.0, -5.0]), torch.tensor([2.0, 4.0, 10.0])
    audio_only = losses.length_neutral_rewards(r, n, ["audio"] * 3, names=["audio", "image"])
    mixed = losses.length_neutral_rewards(torch.cat([r, torch.tensor([3.0])]), torch.cat([n, torch.tensor([4.0])]),
                                          ["audio"] * 3 + ["image"], names=["audio", "image"])
    assert calls == [(2, 2), (2, 2)]
    assert torch.allclose(audio_only, losses.length_neutral_rewards(r, n, ["audio"] * 3))
    assert torch.allclose(mixed[:3], audio_only) and torch.allclose(mixed[3:], torch.tensor([0.0]))
