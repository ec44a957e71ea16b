"""Text metrics against values worked out by hand on tiny cases."""

import math

import numpy as np
import pytest

from stages.evaluation import text_metrics as tm


# ------------------------------------------------------------------------------------------------ WER / IER
def test_wer_one_substitution_one_insertion():
    # ref a b c, hyp a x c d: b->x substituted, d inserted: 2 errors over 3 reference words
    w, n = tm.wer(["a x c d"], ["a b c"])
    assert n == 1
    assert w == pytest.approx(2 / 3)
    assert tm.ier(["a x c d"], ["a b c"]) == pytest.approx(1 / 3)


def test_wer_is_corpus_level_not_mean_of_rates():
    # sample 1: 1 error / 1 word, sample 2: 0 / 4 -> 1/5 (the mean of rates would be 0.5)
    w, n = tm.wer(["a", "a b c d"], ["b", "a b c d"])
    assert (w, n) == (pytest.approx(0.2), 2)


def test_wer_normalises_both_sides():
    w, _ = tm.wer(["Hello, World!"], ["hello world"])
    assert w == 0.0
    # Whisper's normaliser spells out titles: "Mr." and "mister" are the same word
    assert tm.wer(["mister smith"], ["Mr. Smith"])[0] == 0.0


def test_wer_empty_hypothesis_is_all_deletions():
    assert tm.wer([""], ["a b"]) == (1.0, 1)
    assert tm.wer([None], ["a b"]) == (1.0, 1)
    assert tm.ier([""], ["a b"]) == 0.0


def test_wer_leaves_out_empty_references():
    # "" and None references (and one that normalises to "", like "uh um") are left out
    w, n = tm.wer(["a b c", "x", "y", "z"], ["a b c", "", None, "uh um"])
    assert (w, n) == (0.0, 1)
    a = tm.align(["a b c", "x", "q r"], ["a b c", "", "q"])
    assert a.kept == [0, 2]
    assert a.pairs == [(0, 3), (1, 1)]


def test_wer_all_references_empty():
    assert tm.wer(["a", "b"], ["", None]) == (None, 0)
    assert tm.ier(["a"], [""]) is None
    assert tm.wer([], []) == (None, 0)


def test_wer_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        tm.wer(["a"], ["a", "b"])


# ------------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_constant_rate_has_zero_width():
    assert tm.bootstrap_ci([(1, 2), (2, 4), (3, 6)], n=200, seed=0) == [pytest.approx(0.5), pytest.approx(0.5)]


def test_bootstrap_brackets_the_corpus_rate_and_is_seeded():
    rng = np.random.default_rng(1)
    pairs = [(int(e), int(r)) for e, r in zip(rng.integers(0, 5, 200), rng.integers(5, 15, 200))]
    point = sum(e for e, _ in pairs) / sum(r for _, r in pairs)
    lo, hi = tm.bootstrap_ci(pairs, n=500, seed=3)
    assert lo < point < hi
    assert hi - lo < 0.15
    assert tm.bootstrap_ci(pairs, n=500, seed=3) == [lo, hi]
    assert tm.bootstrap_ci(pairs, n=500, seed=4) != [lo, hi]


def test_bootstrap_two_samples_by_hand():
    # pairs (0,1) and (1,1): a resample is 0/2, 1/2 or 2/2 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5th percentile is 0 and the 97.5th is 1
    assert tm.bootstrap_ci([(0, 1), (1, 1)], n=2000, seed=0) == [0.0, 1.0]


def test_bootstrap_empty():
    assert tm.bootstrap_ci([]) is None


# ------------------------------------------------------------------------------------------------ 5-gram dup
def test_rep_5gram_counts_duplicates_within_a_sample():
    # 6 five-grams, 5 distinct (a b c d e twice)
    assert tm.rep_5gram(["a b c d e a b c d e"]) == 1
    # the same text in two samples is not a repetition
    assert tm.rep_5gram(["a b c d e", "a b c d e"]) == 0
    # normalised first: case and punctuation do not hide a loop; summed over samples
    assert tm.rep_5gram(["A B C D E. a, b, c, d, e", "x x x x x x x"]) == 1 + 2
    assert tm.rep_5gram(["a b c d", "", None]) == 0


# ------------------------------------------------------------------------------------------------ diversity
def test_distinct_n_by_hand():
    assert tm.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert tm.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert tm.distinct_n(["a b", "A b"], 2) == pytest.approx(1 / 2)  # lower-cased; pooled over texts
    assert tm.distinct_n(["a b", "c d"], 3) is None  # no trigram anywhere
    assert tm.distinct_n([], 1) is None
    # n-grams do not cross texts: "b c" is not a bigram of ["a b", "c d"]
    assert tm.distinct_n(["a b", "c d"], 2) == 1.0


def test_self_bleu_4_by_hand_equal_lengths():
    # hyp a b c d vs ref a b c e: p1 = 3/4, p2 = 2/3 (ab, bc), p3 = 1/2 (abc), p4 = 0 -> 0.1/1; BP = 1
    expected = (0.75 * (2 / 3) * 0.5 * 0.1) ** 0.25
    assert tm.self_bleu_4(["a b c d", "a b c e"]) == pytest.approx(expected)


def test_self_bleu_4_by_hand_brevity_and_short_texts():
    # "a b" vs ref "a b c": p1 = 1, p2 = 1, p3 and p4 have no n-gram -> 0.1/1 each; BP = exp(1 - 3/2)
    s0 = math.exp(1 - 3 / 2) * (1 * 1 * 0.1 * 0.1) ** 0.25
    # "a b c" vs ref "a b": p1 = 2/3, p2 = 1/2, p3 = 0.1/1, p4 = 0.1/1 (no 4-gram); BP = 1 (3 > 2)
    s1 = ((2 / 3) * 0.5 * 0.1 * 0.1) ** 0.25
    assert tm.self_bleu_4(["a b", "a b c"]) == pytest.approx((s0 + s1) / 2)


def test_self_bleu_4_clips_and_takes_max_over_references():
    # hyp "the the the" vs refs "the" and "the the": unigram count clipped to 2 (the largest in one
    # reference): p1 = 2/3; p2: "the the" x2, max ref count 1 -> 1/2; p3 0 -> 0.1/1; p4 none -> 0.1/1;
    # closest reference length to 3 is 2: BP = 1 since 3 > 2
    s_hyp = ((2 / 3) * 0.5 * 0.1 * 0.1) ** 0.25
    s = tm.self_bleu_4(["the the the", "the", "the the"])
    # the other two: "the" vs refs (3, 2 words): p1 = 1, p2..p4 = 0.1, closest ref length 2 -> BP exp(1-2)
    s_the = math.exp(1 - 2) * (1 * 0.1 * 0.1 * 0.1) ** 0.25
    # "the the" vs refs (3, 1 words): p1 = 1, p2 = 1 (clip 1/1), p3, p4 = 0.1; closest: |3-2| = |1-2|, tie -> 1
    # BP = 1 (2 > 1)
    s_2 = (1 * 1 * 0.1 * 0.1) ** 0.25
    assert s == pytest.approx((s_hyp + s_the + s_2) / 3)


def test_self_bleu_4_identical_texts_is_one_and_edge_cases():
    assert tm.self_bleu_4(["a b c d e"] * 3) == pytest.approx(1.0)
    assert tm.self_bleu_4(["x y z w", "a b c d"]) == 0.0  # no unigram match
    assert tm.self_bleu_4(["", "a b c d"]) == 0.0  # empty text scores 0; "a b c d" has no match either
    assert tm.self_bleu_4(["a b c d"]) is None
    assert tm.self_bleu_4([]) is None


def test_self_bleu_matches_pairwise_definition_on_random_texts():
    # the top-2 shortcut must equal the direct definition: max count over each other text
    rng = np.random.default_rng(0)
    vocab = list("abcde")
    texts = [" ".join(rng.choice(vocab, size=int(rng.integers(0, 9)))) for _ in range(12)]
    toks = [t.split() for t in texts]
    direct = []
    for i, h in enumerate(toks):
        refs = [r for j, r in enumerate(toks) if j != i]
        hc = [tm.Counter(tm.ngrams(h, k + 1)) for k in range(4)]
        mref = []
        for k in range(4):
            m = {}
            for g in hc[k]:
                m[g] = max(tm.Counter(tm.ngrams(r, k + 1))[g] for r in refs)
            mref.append(m)
        rl = min((len(r) for r in refs), key=lambda x: (abs(x - len(h)), x))
        direct.append(tm._bleu(hc, len(h), mref, rl))
    assert tm.self_bleu_4(texts) == pytest.approx(float(np.mean(direct)))


def test_mean_length():
    assert tm.mean_length(["a b", "c d e f", ""]) == 2.0
    assert tm.mean_length([]) is None


def test_clip_score_by_hand():
    # cos 1 -> 2.5; cos -1 -> clipped to 0
    assert tm.clip_score([[1, 0], [0, 1]], [[2, 0], [0, -1]]) == pytest.approx(1.25)
    assert tm.clip_score([[1, 1]], [[1, 0]]) == pytest.approx(2.5 / math.sqrt(2))
    assert tm.clip_score(np.zeros((0, 4)), np.zeros((0, 4))) is None
    with pytest.raises(ValueError):
        tm.clip_score([[1, 0]], [[1, 0, 0]])


# ------------------------------------------------------------------------ paired bootstrap of a WER change
def test_paired_change_pinned():
    base = [(2, 10), (0, 5), (4, 10)]
    new = [(1, 10), (0, 5), (2, 10)]
    ch = tm.paired_change(base, new, n=2000, seed=0)
    assert ch["change"] == pytest.approx(-0.5)  # 3 errors instead of 6
    # every resample holding sample 1 or 3 halves its errors: the interval is -0.5 itself
    assert ch["ci"] == [pytest.approx(-0.5), pytest.approx(-0.5)]
    # only a resample of sample 2 alone has no base error (dropped): the new one is lower in all the rest
    assert ch["p_lower"] == 1.0


def test_paired_change_is_tighter_than_two_independent_intervals():
    rng = np.random.default_rng(0)
    words = rng.integers(5, 40, size=60)
    base_err = rng.binomial(words, 0.15)
    new_err = np.maximum(base_err - rng.binomial(1, 0.4, size=60), 0)  # one error fewer on ~40% of the clips
    base, new = list(zip(base_err, words)), list(zip(new_err, words))
    ch = tm.paired_change(base, new, n=1000, seed=1)
    assert ch["ci"][1] < 0 and ch["p_lower"] > 0.99  # the paired test sees the improvement...
    lo_b, hi_b = tm.bootstrap_ci(base, n=1000, seed=1)
    lo_n, hi_n = tm.bootstrap_ci(new, n=1000, seed=1)
    assert lo_b < hi_n  # ...that two unpaired intervals cannot tell apart (they overlap)
    assert tm.paired_change(base, base)["ci"] == [0.0, 0.0] and tm.paired_change(base, base)["p_lower"] == 0.0


def test_paired_change_refuses_unpaired_inputs_and_has_nothing_without_base_errors():
    with pytest.raises(ValueError, match="same samples"):
        tm.paired_change([(1, 5), (0, 3)], [(1, 5)])
    with pytest.raises(ValueError, match="same samples"):
        tm.paired_change([(1, 5)], [(1, 6)])
    assert tm.paired_change([(0, 5)], [(2, 5)]) is None and tm.paired_change([], []) is None


def test_paired_distinct_change_by_hand():
    base, new = ["a b c", "d e"], ["a b a b", "d e"]
    dc = tm.paired_distinct_change(base, new, 2, n=2000, seed=0)
    assert dc["change"] == pytest.approx(0.75 - 1.0)  # new: ab ba ab de, 3 of 4 distinct; base: 3 of 3
    # a resample of the second input alone changes nothing (a quarter of them); every other one is lower
    assert dc["ci"][1] == 0.0 and dc["ci"][0] < -0.2
    assert tm.paired_distinct_change(base, base, 2) == {"change": 0.0, "ci": [0.0, 0.0]}
    assert tm.paired_distinct_change(["a"], ["b"], 2) is None  # no bigram on either side
    with pytest.raises(ValueError, match="2 base outputs but 1"):
        tm.paired_distinct_change(base, new[:1], 2)


def test_pair_order_accuracy_by_hand():
    # group 1: errors 0, 2, 1 scored 3, 1, 2: three pairs, all in order
    assert tm.pair_order_accuracy([([3.0, 1.0, 2.0], [0, 2, 1])]) == (1.0, 3)
    # group 2: equal errors make no pair; a tie in score counts half; a reversed pair counts 0; None is left out
    acc, n = tm.pair_order_accuracy([([3.0, 1.0, 2.0], [0, 2, 1]), ([1.0, 1.0, 5.0, 9.0], [1, 2, 1, None])])
    # group 2's pairs: (0,1) tie in score -> 0.5; (1,2): sample 2 has fewer errors and scores higher -> 1
    assert n == 5 and acc == pytest.approx((3 + 0.5 + 1) / 5)
    assert tm.pair_order_accuracy([([1.0, 2.0], [1, 1])]) == (None, 0)
    with pytest.raises(ValueError):
        tm.pair_order_accuracy([([1.0], [1, 2])])
