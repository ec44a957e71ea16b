"""The adversarial stage: losses against values worked out by hand, a toy where a fixed discriminator's
rewards move the student, the unanchored ablation that never shows a teacher label to a discriminator,
and the stage end to end through the CLI, killed after its second student step and resumed to the same
final weights."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT, cli, offline_demo_config
from stages import adversarial as adv
from stages.discriminator import Discriminator, DiscriminatorSpec, sequence_logits
from stages.generation import generate


# ------------------------------------------------------------------------------------------- pinned losses
def test_pg_loss_with_leave_one_out_baseline_by_hand():
    # 2 inputs x k=2 samples, 2 positions; row 1 stopped after its first token.
    rewards = torch.tensor([[1.0, 2.0], [0.5, 0.0], [-1.0, 1.0], [0.0, 3.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -9.0], [-1.5, -0.5], [-0.2, -1.0]], requires_grad=True)
    # returns with discount 0.5: G_t = r_t + 0.5 G_{t+1}
    G = adv.returns_to_go(rewards, mask, 0.5)
    assert G.tolist() == [[2.0, 2.0], [0.5, 0.0], [-0.5, 1.0], [1.5, 3.0]]
    # k = 2: each row's baseline is its sibling's return, position by position
    b = adv.loo_baseline(G, 2)
    assert b.tolist() == [[0.5, 0.0], [2.0, 2.0], [1.5, 3.0], [-0.5, 1.0]]
    A = (G - b) * mask
    assert A.tolist() == [[1.5, 2.0], [-1.5, 0.0], [-2.0, -2.0], [2.0, 2.0]]
    # -(1.5*-1 + 2*-2  - 1.5*-0.5  - 2*-1.5 - 2*-0.5  + 2*-0.2 + 2*-1) / 7 tokens = 3.15 / 7
    loss = adv.pg_loss(logp, A, mask)
    assert loss.item() == pytest.approx(0.45, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, -A / 7)  # advantages are constants; masked tokens get no gradient
    # k = 3 leave-one-out: the mean of the other two
    assert adv.loo_baseline(torch.tensor([[3.0], [6.0], [9.0]]), 3).flatten().tolist() == [7.5, 6.0, 4.5]


def test_dpo_spin_loss_by_hand():
    # pair 1: margin (-3 - -4) - (-2 - -1.5) = 1.5, beta 0.5 -> log(1 + e^-0.75) = 0.386871
    # pair 2: margin 0 -> log 2
    pi_w, ref_w = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -1.0])
    pi_l, ref_l = torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -1.0])
    loss = adv.dpo_loss(pi_w, ref_w, pi_l, ref_l, beta=0.5)
    assert loss.item() == pytest.approx((0.38687100611 + 0.69314718056) / 2, abs=1e-6)


def test_discriminator_bce_with_one_sided_label_smoothing_by_hand():
    real = torch.tensor([[0.0, 2.0]])
    fake = torch.tensor([[0.0, -1.0, 5.0]])
    # real targets 0.9: (log 2 + log(1+e^2) - 1.8) / 2 = 0.510038; fake targets 0 over two tokens (the 5.0 is
    # padding): (log 2 + log(1+e^-1)) / 2 = 0.503204
    loss = adv.disc_bce(real, torch.tensor([[1, 1]]), fake, torch.tensor([[1, 1, 0]]), smoothing=0.1)
    assert loss.item() == pytest.approx(0.510037596 + 0.503204434, abs=1e-6)


def test_exact_kl_and_ema_baseline_by_hand():
    p = torch.log(torch.tensor([[[0.5, 0.5]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75]]]))
    # 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75)
    assert adv.exact_kl(p, q).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    ema = adv.EMABaseline(3, decay=0.5)
    G, m = torch.tensor([[2.0, 1.0], [4.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    assert ema(G, m).tolist() == [[0.0, 0.0], [0.0, 0.0]]  # nothing seen yet
    assert ema.value.tolist() == [3.0, 1.0, 0.0]  # the first batch's means (row 2 ended before position 1)
    ema(torch.tensor([[1.0, 3.0]]), torch.tensor([[1, 1]]))
    assert ema.value.tolist() == [2.0, 2.0, 0.0]


class LastLogitJudge(nn.Module):
    """A discriminator with fixed logits [N, L-1]; entries past a row's last token are never read."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, features=None, token_embeds=None):
        return self.logits[:, : input_ids.shape[1] - 1]


class UniformPolicy(nn.Module):
    """A policy whose every next-token distribution is uniform over 4 tokens (log-prob -log 4), learnable."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, input_ids, attention_mask, modality, features):
        return self.bias.expand(*input_ids.shape, 4)


def test_sequence_level_reward_and_leave_one_out_advantage_by_hand():
    # 2 inputs x k=2 samples with 2, 1, 2 and 2 tokens; bos 3, pad 0
    fake = adv.rows_from_tokens([[1, 2], [2], [1, 1], [2, 2]], ["text"] * 4, [None] * 4, [0, 0, 1, 1], bos=3, pad=0,
                                device="cpu")
    # the reward is the logit at each row's last token (1, 3, 0, 4); the 100s are earlier tokens, never read
    judge = LastLogitJudge(torch.tensor([[100.0, 1.0], [3.0, 100.0], [100.0, 0.0], [100.0, 4.0]]))
    pi, ref = UniformPolicy(), UniformPolicy().requires_grad_(False)
    loss, st = adv.pg_objective(pi, ref, {"text": judge}, fake, 2, {}, discount=1.0, baseline="loo", kl_weight=0.0,
                                kl_estimator="exact", reward_level="sequence")
    # advantages -2, +2, -4, +4 on every token of their row; log pi = -log 4 everywhere:
    # -(-2*2 + 2*1 - 4*2 + 4*2) * -log 4 / 7 tokens = -2 log 4 / 7
    assert loss.item() == pytest.approx(-2 * math.log(4) / 7, abs=1e-6)
    assert st["reward"] == pytest.approx(2.0)  # the mean sequence reward
    # token level reads the 100s: a different loss
    tok_loss, _ = adv.pg_objective(pi, ref, {"text": judge}, fake, 2, {}, discount=1.0, baseline="loo", kl_weight=0.0,
                                   kl_estimator="exact")
    assert tok_loss.item() != pytest.approx(loss.item(), abs=0.1)
    # less each sample's own log-likelihood under the policy (2, 1, 2, 2 tokens at -log 4): rewards 1 + 2L, 3 + L,
    # 2L, 4 + 2L with L = log 4, advantages -2 + L, 2 - L, -4, 4: loss L * (2(-2 + L) + (2 - L) - 8 + 8) / 7
    L = math.log(4)
    loss, _ = adv.pg_objective(pi, ref, {"text": judge}, fake, 2, {}, discount=1.0, baseline="loo", kl_weight=0.0,
                               kl_estimator="exact", reward_level="sequence", minus_policy_logprob=True)
    assert loss.item() == pytest.approx(L * (L - 2) / 7, abs=1e-6)
    with pytest.raises(ValueError, match="leave-one-out"):
        adv.pg_objective(pi, ref, {"text": judge}, fake, 2, {}, discount=1.0, baseline=adv.EMABaseline(4, 0.9),
                         kl_weight=0.0, kl_estimator="exact", reward_level="sequence")


# --------------------------------------------------------------------------------------------- discriminator
def test_discriminator_token_logits_are_causal_and_conditioned():
    torch.manual_seed(0)
    d = Discriminator(DiscriminatorSpec("audio", vocab_size=50, feature_dim=3, d_model=16, layers=2, heads=2,
                                       dropout=0.0, max_text_len=10, feature_frames=4)).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    f = [torch.randn(7, 3)]
    base = d(ids, mask, f)
    assert base.shape == (1, 5)
    later = ids.clone()
    later[0, 4] = 30  # token 4 is judged from entry 3 on
    out = d(later, mask, f)
    assert torch.equal(out[:, :3], base[:, :3]) and not torch.allclose(out[:, 3:], base[:, 3:])
    assert not torch.allclose(d(ids, mask, [torch.randn(7, 3)]), base)  # the input matters
    # padding after a row's end changes nothing before it; the sequence logit is the last token's
    short = torch.tensor([[1, 5, 6, 7, 0, 0]])
    smask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    s = d(short, smask, f)
    assert torch.allclose(s[:, :3], base[:, :3], atol=1e-6)
    assert sequence_logits(s, smask).item() == s[0, 2].item()


def test_student_backbone_discriminator_starts_undecided_and_is_causal_and_conditioned():
    from pipeline.config import StudentConfig
    from stages.student import build_student

    torch.manual_seed(0)
    body = build_student(StudentConfig(style="cross_attention", d_model=16, n_layers=1, n_heads=2, d_ff=32),
                         {"audio": 16}, max_text_tokens=8).eval()
    d = Discriminator(DiscriminatorSpec("audio", vocab_size=body.spec.text_vocab, feature_dim=16, backbone="student"),
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
    from pipeline.config import StudentConfig
    from stages.discriminator import load_discriminators, save_discriminators
    from stages.student import build_student

    torch.manual_seed(0)
    body = build_student(StudentConfig(style="cross_attention", d_model=16, n_layers=1, n_heads=2, d_ff=32),
                         {"audio": 16}, max_text_tokens=8).eval()
    d = Discriminator(DiscriminatorSpec("audio", vocab_size=body.spec.text_vocab, feature_dim=16, backbone="student",
                                        lm_score=True), body).eval()
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
    # judge: forward's logits and these scores from one pass of the body
    calls = []
    d.head.register_forward_hook(lambda *a: calls.append(1))
    logits, scores = d.judge(two, two_mask, f * 2)
    assert len(calls) == 1
    assert torch.allclose(logits, d(two, two_mask, f * 2)) and torch.allclose(scores, got)
    back = load_discriminators(save_discriminators({"audio": d}, tmp_path / "d"))["audio"]
    assert back.spec.lm_score and back.lm_scale.item() == 0.5 and torch.allclose(back(ids, mask, f), want, atol=1e-6)
    with pytest.raises(Exception, match="disc_lm_score"):
        Discriminator(DiscriminatorSpec("audio", vocab_size=10, feature_dim=16, lm_score=True))


def test_a_sample_equal_to_the_real_row_of_its_input_is_not_fake():
    real = adv.rows_from_tokens([[5, 6, 0], [7, 0]], ["audio", "audio"], [None, None], [0, 1], bos=1, pad=0, device="cpu")
    fake = adv.rows_from_tokens([[5, 6, 0], [5, 6], [7, 0], [5, 6, 0], [9, 0]], ["audio"] * 4 + ["image"],
                                [None] * 5, [0, 0, 0, 1, 1], bos=1, pad=0, device="cpu")
    b = adv.discriminator_batch("audio", real, fake, text_reward_all=False)
    # row 0 repeats input 0's label: left out; row 1 is that label unfinished (no eot) and row 2 another
    # input's label: both fake; row 3 is input 0's label written about input 1: fake; row 4 is an image
    assert b.fake.source == [0, 0, 1] and len(b.real) == 2
    assert b.fake.input_ids[:, 1:3].tolist() == [[5, 6], [7, 0], [5, 6]]


@pytest.mark.parametrize("from_divergence", [False, True])
def test_a_sample_is_judged_fake_from_where_it_leaves_the_real_rows(from_divergence):
    real = adv.rows_from_tokens([[5, 6, 7, 0], [5, 8, 0]], ["audio"] * 2, [None] * 2, [0, 1], bos=1, pad=0, device="cpu")
    fake = adv.rows_from_tokens([[5, 6, 9, 0], [8, 6, 7, 0], [5, 6], [5, 6, 7, 0]], ["audio"] * 4, [None] * 4,
                                [0, 0, 0, 1], bos=1, pad=0, device="cpu")
    b = adv.discriminator_batch("audio", real, fake, text_reward_all=False, from_divergence=from_divergence)
    every = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]
    # input 0's label is 5 6 7 eot: row 0 leaves it at its third token, row 1 at its first, row 2 never (an
    # unfinished copy); row 3 is about input 1, whose label (5 8 eot) it shares one token with
    want = [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]] if from_divergence else every
    assert b.fake.judged_mask().tolist() == want
    assert float(adv.DiscCounts.of(b).fake_tokens) == sum(map(sum, want))
    # the BCE's fake side averages over the judged tokens only: a logit on an unjudged token changes nothing
    logits = torch.zeros(4, 4)
    base = adv._bce_side(logits, b.fake.judged_mask(), 0.0, None)
    logits[0, 0] = 9.0
    assert (adv._bce_side(logits, b.fake.judged_mask(), 0.0, None) == base) == from_divergence


# ------------------------------------------------------------------------------------------------- the toy
def _tiny_student():
    from pipeline.config import StudentConfig
    from stages.student import build_student

    torch.manual_seed(0)
    return build_student(StudentConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, prefix_len=1), {"text": 0})


class FixedJudge(nn.Module):
    """A discriminator that never learns: logit +1 on token `good`, -1 on `bad`, 0 elsewhere."""

    def __init__(self, good: int, bad: int):
        super().__init__()
        self.good, self.bad = good, bad

    def forward(self, input_ids, attention_mask, features=None, token_embeds=None):
        y = input_ids[:, 1:]
        return (y == self.good).float() - (y == self.bad).float()


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


@pytest.mark.parametrize("prefer", ["A", "B"])
def test_fixed_discriminator_rewards_move_the_student_toward_what_it_prefers(prefer):
    # First a student that says A or B about equally (the "distilled" model)...
    student, reference, A, B, tok = _a_or_b_student()
    pa0, pb0 = _p_first(student, A), _p_first(student, B)
    assert pa0 + pb0 > 0.9 and abs(pa0 - pb0) < 0.2, (pa0, pb0)
    # ...then policy-gradient steps on its own samples, rewarded by a discriminator that prefers one of them.
    judge = FixedJudge(A, B) if prefer == "A" else FixedJudge(B, A)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    k = 4
    for _ in range(15):
        gen = generate(student, ["text"] * 8, [None] * 8, temperature=1.0, max_new_tokens=3)
        fake = adv.rows_from_generated(gen, ["text"] * 8, [None] * 8, [i // k for i in range(8)], tok.bos)
        loss, st = adv.pg_objective(student, reference, {"text": judge}, fake, k, {}, discount=1.0, baseline="loo",
                                    kl_weight=0.01, kl_estimator="exact")
        opt.zero_grad()
        loss.backward()
        opt.step()
    pa1, pb1 = _p_first(student, A), _p_first(student, B)
    if prefer == "A":
        assert pa1 > 0.85 and pa1 > pa0 + 0.3, (pa0, pa1)
    else:
        assert pb1 > 0.85 and pa1 < pa0 - 0.3, (pa0, pa1, pb1)
    assert st["kl"] > 0  # it moved away from the reference, and the KL says so


class CountJudge(nn.Module):
    """A causal discriminator: its logit at t counts `good` minus `bad` in y_1 .. y_t, so the last token's
    (the sequence's) judges the whole text."""

    def __init__(self, good: int, bad: int):
        super().__init__()
        self.good, self.bad = good, bad

    def forward(self, input_ids, attention_mask, features=None, token_embeds=None):
        y = input_ids[:, 1:]
        return ((y == self.good).float() - (y == self.bad).float()).cumsum(1)


def test_sequence_rewards_move_the_student_toward_what_the_discriminator_prefers():
    student, reference, A, B, tok = _a_or_b_student()
    pa0 = _p_first(student, A)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        gen = generate(student, ["text"] * 8, [None] * 8, temperature=1.0, max_new_tokens=3, generator=g)
        fake = adv.rows_from_generated(gen, ["text"] * 8, [None] * 8, [i // 4 for i in range(8)], tok.bos)
        loss, _ = adv.pg_objective(student, reference, {"text": CountJudge(B, A)}, fake, 4, {}, discount=1.0,
                                   baseline="loo", kl_weight=0.01, kl_estimator="exact", reward_level="sequence")
        opt.zero_grad()
        loss.backward()
        opt.step()
    pb1 = _p_first(student, B)
    assert pb1 > 0.85 and _p_first(student, A) < pa0 - 0.3, (pa0, pb1)


class ConstantJudge(nn.Module):
    """A discriminator that finds every token equally fake: logit -1 everywhere."""

    def forward(self, input_ids, attention_mask, features=None, token_embeds=None):
        return -torch.ones(input_ids[:, 1:].shape)


@pytest.mark.parametrize("center,kl,level", [(False, "exact", "token"), (True, "exact", "token"),
                                             (True, "sampled", "token"), (False, "exact", "sequence")])
def test_centred_rewards_do_not_teach_a_student_to_stop_early(center, kl, level):
    """With rewards that are negative everywhere, a shorter sample collects fewer of them: raw returns teach
    the student to stop early whatever it says; centred on the batch's mean reward they carry no such pull,
    and neither does one reward per sample (every sample's is -1, so no advantage)."""
    torch.set_num_threads(1)
    student = _tiny_student().eval()
    tok = student.tokenizer
    A, B, eot = tok.encode("yes")[0], tok.encode("no")[0], tok.eot
    opt = torch.optim.Adam(student.parameters(), lr=3e-2)
    data = adv.rows_from_tokens([[A, eot], [A, B, eot]], ["text"] * 2, [None] * 2, [0, 1], tok.bos, eot, "cpu")
    for _ in range(60):  # "A" then, as often, "B" or the end
        loss = -student.score(data.input_ids, data.attention_mask, data.modality, data.features).sum() / 5
        opt.zero_grad()
        loss.backward()
        opt.step()

    def p_stop() -> float:
        with torch.no_grad():
            lp = adv.policy_logprobs(student, adv.rows_from_tokens([[A, eot]], ["text"], [None], [0], tok.bos, eot, "cpu"))
        return lp[0, 1, eot].exp().item()

    p0 = p_stop()
    assert 0.3 < p0 < 0.7, p0
    reference = _tiny_student().eval().requires_grad_(False)
    reference.load_state_dict(student.state_dict())
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        gen = generate(student, ["text"] * 8, [None] * 8, temperature=1.0, max_new_tokens=3, generator=g)
        fake = adv.rows_from_generated(gen, ["text"] * 8, [None] * 8, [i // 4 for i in range(8)], tok.bos)
        loss, _ = adv.pg_objective(student, reference, {"text": ConstantJudge()}, fake, 4, {}, discount=1.0,
                                   baseline="loo", kl_weight=0.01, kl_estimator=kl, center_rewards=center,
                                   reward_level=level)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p1 = p_stop()
    if center or level == "sequence":
        assert abs(p1 - p0) < 0.05, (p0, p1)
    else:
        assert p1 > p0 + 0.2, (p0, p1)


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
                    "disc_d_model": 16, "disc_layers": 1, "disc_heads": 2, "log_every": 1, "checkpoint_every": 1,
                    "grad_penalty": 0.5, "lr": 0.001},
}


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
    from stages.labelled_data import load_labelled
    from stages.student import load_student

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

    def spy(modality, real, fake, text_reward_all, from_divergence=False):
        b = orig(modality, real, fake, text_reward_all, from_divergence)
        for ids, m in zip(b.real.input_ids.tolist(), b.real.attention_mask.tolist()):
            real_rows.append(ids[1: sum(m)])  # without bos and padding
        return b

    monkeypatch.setattr(adv, "discriminator_batch", spy)
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


def test_length_ratio_and_its_guard_by_hand():
    from pipeline.config import GuardConfig

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


def test_spin_and_guards_and_disabled_copy(distilled, tmp_path):
    cfg, base = distilled
    _run_in_process(cfg, tmp_path / "spin", ["adversarial.objective=spin", "adversarial.spin_iterate_steps=1"], reuse=base)
    recs = [json.loads(l) for l in (tmp_path / "spin/adversarial/metrics.jsonl").read_text().splitlines()]
    moved = [r for r in recs if r.get("phase") == "adversarial"]
    assert len(moved) == 3 and all(r["pairs"] == 8 and math.isfinite(r["spin_loss"]) for r in moved)
    # the first SPIN step compares the student with itself: margin 0, loss log 2
    assert moved[0]["spin_loss"] == pytest.approx(math.log(2), abs=1e-5)

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

    # one reward per sample: through the stage, and refused where no leave-one-out baseline is possible
    _run_in_process(cfg, tmp_path / "seq", ["adversarial.reward_level=sequence", "adversarial.disc_from_divergence=true"],
                    reuse=base)
    moved = [json.loads(l) for l in (tmp_path / "seq/adversarial/metrics.jsonl").read_text().splitlines()]
    moved = [r for r in moved if r.get("phase") == "adversarial"]
    assert len(moved) == 3 and all(math.isfinite(r["pg_loss"]) and math.isfinite(r["reward"]) for r in moved)
    from pipeline.errors import UserError
    with pytest.raises(UserError, match="reward_level: sequence"):
        _run_in_process(cfg, tmp_path / "seq1", ["adversarial.reward_level=sequence", "adversarial.k_samples=1"],
                        reuse=base)
    with pytest.raises(UserError, match="reward_minus_policy_logprob"):
        _run_in_process(cfg, tmp_path / "seq2", ["adversarial.reward_minus_policy_logprob=true"], reuse=base)
    # one of each input's samples the greedy decode: through the stage, its loop rate logged; refused for k = 1
    _run_in_process(cfg, tmp_path / "greedy", ["adversarial.greedy_sample=true"], reuse=base)
    logged = [json.loads(l) for l in (tmp_path / "greedy/adversarial/metrics.jsonl").read_text().splitlines()]
    rates = [r["greedy_loop_rate"] for r in logged if "greedy_loop_rate" in r]
    assert rates and all(0.0 <= x <= 1.0 for x in rates)
    with pytest.raises(UserError, match="greedy_sample"):
        _run_in_process(cfg, tmp_path / "greedy1", ["adversarial.greedy_sample=true", "adversarial.k_samples=1",
                                                    "adversarial.baseline=ema"], reuse=base)

    _run_in_process(cfg, tmp_path / "off", ["adversarial.enabled=false"], reuse=base)
    for f in ("student.json", "projectors.safetensors", "lm/model.safetensors"):
        assert (tmp_path / "off/adversarial/final" / f).read_bytes() == (base / "distill/final" / f).read_bytes()


def test_a_frozen_body_keeps_the_distilled_weights_while_the_head_learns(distilled, tmp_path):
    from safetensors.torch import load_file

    cfg, base = distilled
    _run_in_process(cfg, tmp_path / "frozen", ["adversarial.disc_backbone=student", "adversarial.grad_penalty=0",
                                               "adversarial.disc_train_body=false",
                                               "adversarial.disc_lm_score=true", "adversarial.reward_level=sequence"],
                    reuse=base)
    discs = tmp_path / "frozen/adversarial/final/discriminators"
    for m in ("vibration", "text"):
        body = load_file(discs / f"{m}.student" / "lm" / "model.safetensors")
        want = load_file(base / "distill/final/lm/model.safetensors")
        assert body.keys() == want.keys() and all(torch.equal(body[k], want[k]) for k in want), m
        head = load_file(discs / f"{m}.safetensors")
        assert any(v.abs().sum() > 0 for k, v in head.items() if k.startswith("head.")), m  # the head moved
    with pytest.raises(Exception, match="disc_train_body"):
        _run_in_process(cfg, tmp_path / "bad", ["adversarial.disc_train_body=false"], reuse=base)


@pytest.mark.parametrize("backbone", ["transformer", "student"])
def test_cli_end_to_end_text_audio_image_resumes_to_identical_weights(tmp_path, backbone):
    cfg = {
        **TINY,
        "plugins": ["modalities.audio", "modalities.image"],
        "modalities": {"audio": {"teacher": {"checkpoint": "random", "max_new_tokens": 8}},
                       "image": {"teacher": {"checkpoint": "random"}}},
        "ingest": {"sources": [{"type": "synthetic", "modality": "text", "count": 12, "name": "words"},
                               {"type": "synthetic", "modality": "audio", "count": 6, "name": "tones"},
                               {"type": "synthetic", "modality": "image", "count": 6, "name": "shapes"}],
                   "samples_per_shard": 6},
        "pseudo_label": {"filters": {"min_avg_logprob": None, "max_compression_ratio": None,
                                     "max_no_speech_prob": None, "max_wer": None}},
        "adversarial": {**TINY["adversarial"], "steps": 4, "disc_feature_frames": 4, "max_new_tokens": 8,
                        "disc_backbone": backbone,
                        **({"grad_penalty": 0.0, "disc_pretrain_epochs": 2} if backbone == "student" else {})},
    }
    cfg["distill"] = {**TINY["distill"], "student": {**TINY["distill"]["student"], "feature_frames": 16},
                      "max_text_tokens": 16}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    a, b = tmp_path / "a", tmp_path / "b"
    r = cli("run", p, "--run-dir", a, check=True)
    assert "adversarial: finished" in r.stdout
    final = a / "adversarial" / "final"
    parts = ["json", "safetensors"] + (["student"] if backbone == "student" else [])
    assert sorted(x.name for x in (final / "discriminators").iterdir()) == [
        f"{m}.{p}" for m in ("audio", "image", "text") for p in parts]
    m = json.loads((a / "adversarial" / "manifest.json").read_text())
    assert m["counts"]["steps"] == 4 and m["counts"]["discriminators"] == 3
    recs = [json.loads(l) for l in (a / "adversarial" / "metrics.jsonl").read_text().splitlines()]
    assert any("disc_acc/audio" in r for r in recs) and any("distinct_2" in r for r in recs)
    pre = [r for r in recs if r.get("phase") == "disc_pretrain"]
    assert [r["epoch"] for r in pre] == ([1, 2] if backbone == "student" else [])
    # rebuilt from final/ alone, as evaluate does
    discs = adv.load_discriminators(final)
    from stages.student import load_student

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


class RowJudge(nn.Module):
    """A discriminator whose logit at every position is a fixed score of the row's first token."""

    def __init__(self, score: dict[int, float]):
        super().__init__()
        self.score = score
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, features=None, token_embeds=None):
        s = torch.tensor([self.score[int(t)] for t in input_ids[:, 1]]) + self.w
        return s[:, None].expand(-1, input_ids.shape[1] - 1)


def test_discriminator_ranking_is_free_of_the_logits_offset():
    real = adv.rows_from_tokens([[5, 0], [6, 0]], ["audio"] * 2, [None] * 2, [0, 1], bos=1, pad=0, device="cpu")
    fake = adv.rows_from_tokens([[7, 0], [8, 0], [9, 0], [5, 0]], ["audio"] * 4, [None] * 4, [0, 0, 1, 1], bos=1,
                                pad=0, device="cpu")
    b = adv.DiscBatch(real, fake)
    # every logit negative: the thresholded accuracy is the 0.5 of "all fake", the ranking is what it is
    judge = RowJudge({5: -1.0, 6: -3.0, 7: -2.0, 8: -1.0, 9: -4.0})
    _, st = adv.discriminator_loss(judge, b, 0.0, 0.0)
    assert st["acc"] == pytest.approx(0.5)
    # input 0: -1 vs -2 (above), -1 vs -1 (tie, half); input 1: -3 vs -4 (above), -3 vs -1 (below)
    assert st["rank"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)

    class Scored(RowJudge):  # a sequence score that is not the last token's logit (as with lm_score)
        def judge(self, input_ids, attention_mask, features=None, token_embeds=None):
            logits = self(input_ids, attention_mask)
            return logits, -logits[:, 0]

    judge = Scored({5: -1.0, 6: -3.0, 7: -2.0, 8: -1.0, 9: -4.0})
    assert adv.discriminator_loss(judge, b, 0.0, 0.0)[1]["rank"] == pytest.approx(0.625)  # token level: the logits
    # sequence level reads the rewards' score: input 0: 1 vs 2 (below), 1 vs 1 (half); input 1: 3 vs 4, 3 vs 1
    _, st = adv.discriminator_loss(judge, b, 0.0, 0.0, reward_level="sequence")
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
    "distill": {"student": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "prefix_len": 2,
                            "feature_frames": 8},
                "steps": 2, "batch_size": 6, "lr": 3e-3, "warmup_steps": 1, "max_text_tokens": 12},
    "adversarial": {"steps": 4, "disc_warmup_steps": 0, "batch_size": 4, "k_samples": 2, "max_new_tokens": 12,
                    "disc_d_model": 16, "disc_layers": 1, "disc_heads": 2, "lr": 0.05, "select_by": "val_wer",
                    "val_every": 2, "log_every": 1},
    # val WER decodes as evaluate does: a fallback every greedy text fails (mean log-prob below 0)
    "evaluate": {"fallback_temperatures": [1.0], "min_avg_logprob": 0.0},
}


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


def test_teacher_backbone_discriminator_holds_every_teacher_layer_and_the_students_projectors(tmp_path):
    """disc_backbone: teacher: the discriminator of the modality the Whisper teacher labelled reads text with the
    teacher's whole decoder (the student keeps one of its three layers here), its modality projectors and
    markers copied from the student; the image one (a classifier's labels) is a copy of the student."""
    from safetensors.torch import load_file

    from stages.student import load_student

    cfg = {
        **TINY,
        "plugins": ["modalities.audio", "modalities.image"],
        "modalities": {"audio": {"teacher": {"checkpoint": "random", "max_new_tokens": 8, "random_n_layer": 3}},
                       "image": {"teacher": {"checkpoint": "random"}}},
        "ingest": {"sources": [{"type": "synthetic", "modality": "audio", "count": 6, "name": "tones"},
                               {"type": "synthetic", "modality": "image", "count": 6, "name": "shapes"}],
                   "samples_per_shard": 6},
        "pseudo_label": {"filters": {"min_avg_logprob": None, "max_compression_ratio": None,
                                     "max_no_speech_prob": None, "max_wer": None}},
        "distill": {**TINY["distill"], "student": {"style": "cross_attention", "keep_decoder_layers": [0]},
                    "max_text_tokens": 16},
        "adversarial": {**TINY["adversarial"], "steps": 2, "max_new_tokens": 8, "disc_backbone": "teacher",
                        "grad_penalty": 0.0},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    _run_in_process(p, tmp_path / "run")
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


def test_the_demo_phase_and_its_overlays_load(tmp_path):
    """The demo's phase is the teacher-judged one on the held-back pool; configs/augmented.yaml and
    configs/student_judge.yaml are overlays on it: merged onto the demo, they must name fields that exist and pass
    the checks made at load (sequence rewards with k >= 2, a frozen body with a backbone, copies for its inputs).
    The demo's data folders exist only after `make demo`: synthetic sources stand in for them here."""
    from pipeline.config import load_config

    root = ROOT / "configs"
    demo = offline_demo_config(tmp_path)
    c = load_config([str(demo)]).root
    a, sp = c.adversarial, c.ingest.split
    assert (a.reward_level, a.reward_minus_policy_logprob, a.disc_backbone, a.disc_lm_score, a.disc_train_body) == \
        ("sequence", True, "teacher", True, False)
    assert a.inputs == ["pool"] and c.distill.inputs == ["train"] and a.k_samples == 4 and a.select_by == "val_wer"
    assert (sp.train, sp.pool, sp.val, sp.test) == (0.6, 0.1, 0.1, 0.2) and c.pseudo_label.augment_copies == 0
    c = load_config([str(demo), str(root / "augmented.yaml")]).root
    assert c.adversarial.inputs == ["augmented"] and c.pseudo_label.augment_copies == 2
    assert c.modalities["audio"].augment_snr_db == [15.0, 30.0]
    assert c.distill.steps == 600 and c.adversarial.disc_backbone == "teacher"  # the rest is the demo's
    a = load_config([str(demo), str(root / "student_judge.yaml")]).root.adversarial
    assert (a.inputs, a.disc_backbone, a.reward_level, a.k_samples, a.steps) == (["train"], "student", "token", 2, 40)
    assert not a.disc_lm_score and not a.reward_minus_policy_logprob and a.disc_train_body


def test_the_unanchored_ablation_lets_no_teacher_judge_into_the_phase(tmp_path):
    """`anchored: false` on the demo's phase: its val_wer selection reads the teacher's labels and its
    teacher-backbone discriminator scores text by the teacher's likelihood; the load names both settings in one
    message, and with them set the ablation loads, keeping every other setting of the anchored run."""
    from pipeline.config import load_config
    from pipeline.errors import UserError

    files = [str(offline_demo_config(tmp_path))]
    with pytest.raises(UserError) as e:
        load_config(files, ["adversarial.anchored=false"])
    assert "anchored: false" in str(e.value) and "select_by: last" in str(e.value) and "disc_backbone: student" in str(e.value)
    with pytest.raises(UserError, match="disc_backbone: student") as e:
        load_config(files, ["adversarial.anchored=false", "adversarial.select_by=last"])
    assert "select_by" not in str(e.value)
    anchored = load_config(files).root.adversarial
    a = load_config(files, ["adversarial.anchored=false", "adversarial.select_by=last",
                            "adversarial.disc_backbone=student"]).root.adversarial
    assert (a.anchored, a.select_by, a.disc_backbone) == (False, "last", "student")
    assert {k: v for k, v in vars(a).items() if k not in ("anchored", "select_by", "disc_backbone")} == \
        {k: v for k, v in vars(anchored).items() if k not in ("anchored", "select_by", "disc_backbone")}
