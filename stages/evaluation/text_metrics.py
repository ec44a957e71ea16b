"""Text metrics of generated outputs: pure functions of strings (and embeddings), no model.

Error rates (wer, ier, rep_5gram) follow Distil-Whisper's evaluation (huggingface/distil-whisper,
`compute_metrics` in training/flax/run_long_form_transcription.py): both sides go through Whisper's EnglishTextNormalizer,
pairs whose reference normalises to "" are left out, and rates are corpus-level (total edits over total
reference words, via jiwer's alignment), not means of per-sample rates.

Diversity metrics (distinct_n, self_bleu_4, mean_length) are word level on `text.lower().split()`, with no
normaliser: they describe what the model wrote, punctuation included.

An undefined value (no usable pair, no text) is None, never NaN, so report.json stays valid JSON.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np



def transcribes(modality: str) -> bool:
    """Whether the modality's labels are transcripts (its adapter's `transcribes`): scored by WER, IER and 5-gram
    duplicates. False for a modality no adapter here registers."""
    from pipeline.registry import modality_registry

    return modality in modality_registry and bool(modality_registry.get(modality).transcribes)

SMOOTHING_EPSILON = 0.1  # Chen & Cherry (2014) method 1, as nltk's SmoothingFunction().method1


@lru_cache(maxsize=1)
def _normalizer():
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str | None) -> str:
    """Whisper's EnglishTextNormalizer ("Mr. Smith, 3.5!" -> "mister smith 3.5"); None -> ""."""
    return _normalizer()(text or "").strip()


def words(text: str | None) -> list[str]:
    """The word tokens the diversity metrics count: lower-cased, split on whitespace."""
    return (text or "").lower().split()


# ------------------------------------------------------------------------------------------------ error rates
@dataclass
class Alignment:
    """The word alignment of normalised (hyp, ref) pairs, references that normalise to "" left out.

    kept: indices (into the inputs) of the pairs that were scored.
    errors / ref_words / insertions: per kept pair, substitutions + deletions + insertions, the number of
    reference words, and the insertions alone.
    """

    kept: list[int] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    ref_words: list[int] = field(default_factory=list)
    insertions: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.kept)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Per kept sample (errors, ref_words): the input of bootstrap_ci."""
        return list(zip(self.errors, self.ref_words))

    @property
    def wer(self) -> float | None:
        total = sum(self.ref_words)
        return sum(self.errors) / total if total else None

    @property
    def ier(self) -> float | None:
        total = sum(self.ref_words)
        return sum(self.insertions) / total if total else None


def align(hyps: Sequence[str | None], refs: Sequence[str | None]) -> Alignment:
    """Normalise both sides with Whisper's EnglishTextNormalizer and align them word by word with jiwer.

    A None hypothesis counts as "" (every reference word deleted); a pair whose reference is None or
    normalises to "" is left out, as in Distil-Whisper.
    """
    import jiwer

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    kept, norm_h, norm_r = [], [], []
    for i, (h, r) in enumerate(zip(hyps, refs)):
        nr = normalize(r)
        if not nr:
            continue
        kept.append(i)
        norm_r.append(nr)
        norm_h.append(normalize(h))
    out = Alignment(kept=kept)
    if not kept:
        return out
    # jiwer's default transform splits on whitespace; the normaliser has already done the rest.
    res = jiwer.process_words(norm_r, norm_h)
    for chunks, ref in zip(res.alignments, res.references):
        ins = err = 0
        for c in chunks:
            if c.type == "insert":
                ins += c.hyp_end_idx - c.hyp_start_idx
            elif c.type in ("substitute", "delete"):
                err += c.ref_end_idx - c.ref_start_idx
        out.errors.append(err + ins)
        out.insertions.append(ins)
        out.ref_words.append(len(ref))
    return out


def wer(hyps: Sequence[str | None], refs: Sequence[str | None]) -> tuple[float | None, int]:
    """Corpus word error rate and the number of pairs it covers.

    WER = (substitutions + deletions + insertions) summed over pairs / reference words summed over pairs,
    after Whisper's EnglishTextNormalizer on both sides; pairs whose reference normalises to "" are left
    out. Returns (None, 0) when no pair is left. Example: hyp "a x c d" vs ref "a b c" is 1 substitution
    + 1 insertion over 3 words = 2/3.
    """
    a = align(hyps, refs)
    return a.wer, a.n


def ier(hyps: Sequence[str | None], refs: Sequence[str | None]) -> float | None:
    """Insertion error rate: inserted words / reference words over the corpus (same normalising and
    leaving out as `wer`). None when no pair is left."""
    return align(hyps, refs).ier


def bootstrap_ci(pairs: Sequence[tuple[int, int]], n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap confidence interval of a corpus error rate.

    pairs: per sample (errors, ref_words). Each of `n` resamples draws len(pairs) samples with replacement
    (numpy default_rng(seed)) and computes sum(errors) / sum(ref_words); the result is [lo, hi], the
    (1-level)/2 and (1+level)/2 percentiles of the n resampled rates. None for no pairs. A resample
    whose reference words sum to 0 (possible only if some pairs have ref_words 0) is dropped.
    """
    if not pairs:
        return None
    arr = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arr), size=(n, len(arr)))
    err = arr[idx, 0].sum(axis=1)
    ref = arr[idx, 1].sum(axis=1)
    ok = ref > 0
    if not ok.any():
        return None
    rates = err[ok] / ref[ok]
    lo, hi = np.percentile(rates, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


def paired_change(base: Sequence[tuple[int, int]], new: Sequence[tuple[int, int]], n: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict | None:
    """Paired bootstrap of the relative change of a corpus error rate between two systems on the same samples
    (Bisani & Ney 2004): much tighter than comparing two independent intervals, since both systems find the
    same samples hard.

    base, new: per sample (errors, ref_words), sample i of both about the same input (as `align` gives them
    for the same references). The change is (E_new - E_base) / E_base (the words are the same), -0.1 being 10%
    fewer errors. Each of `n` resamples draws the samples with replacement (numpy default_rng(seed)), the same
    draw for both systems; resamples where the base has no error are dropped. Returns {change, ci [lo, hi],
    p_lower (the fraction of resamples where the new system has fewer errors)}, or None with no sample or no
    base error. ValueError if the two do not cover the same samples."""
    b = np.asarray(base, dtype=np.float64).reshape(-1, 2)
    w = np.asarray(new, dtype=np.float64).reshape(-1, 2)
    if b.shape != w.shape or not np.array_equal(b[:, 1], w[:, 1]):
        raise ValueError("paired_change: the two systems must be scored on the same samples, in the same order")
    if not len(b) or b[:, 0].sum() == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(b), size=(n, len(b)))
    eb, ew = b[idx, 0].sum(axis=1), w[idx, 0].sum(axis=1)
    ok = eb > 0
    rel = (ew[ok] - eb[ok]) / eb[ok]
    lo, hi = np.percentile(rel, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"change": float((w[:, 0].sum() - b[:, 0].sum()) / b[:, 0].sum()), "ci": [float(lo), float(hi)],
            "p_lower": float(np.mean(ew[ok] < eb[ok]))}


def paired_wer_change(base_hyps: Sequence[str | None], new_hyps: Sequence[str | None], refs: Sequence[str | None],
                      n: int = 1000, seed: int = 0):
    """Two systems' transcripts of the same inputs against the same references: (base alignment, new alignment,
    paired_change of their errors or None)."""
    a, b = align(base_hyps, refs), align(new_hyps, refs)
    return a, b, paired_change(a.pairs, b.pairs, n=n, seed=seed)


def pair_order_accuracy(groups: Sequence[tuple[Sequence[float], Sequence[int | None]]]) -> tuple[float | None, int]:
    """How often a scorer orders samples by their errors: over every pair of samples of one group (one input)
    whose error counts differ, the fraction where the one with fewer errors scores higher (a tie in score
    counts half), and the number of such pairs. groups: (scores, errors) per input; an error count of None
    (no reference) leaves that sample out. Returns (None, 0) when no pair differs.
    Example: scores [3, 1, 2] with errors [0, 2, 1]: all three pairs in order, 1.0 over 3 pairs."""
    hits, n = 0.0, 0
    for scores, errors in groups:
        if len(scores) != len(errors):
            raise ValueError(f"{len(scores)} scores but {len(errors)} error counts in one group")
        for a in range(len(scores)):
            for b in range(a + 1, len(scores)):
                ea, eb = errors[a], errors[b]
                if ea is None or eb is None or ea == eb:
                    continue
                good, bad = (a, b) if ea < eb else (b, a)
                n += 1
                hits += 1.0 if scores[good] > scores[bad] else 0.5 if scores[good] == scores[bad] else 0.0
    return (hits / n if n else None), n


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]


def rep_5gram(texts: Iterable[str | None], n: int = 5) -> int:
    """Repeated 5-gram word duplicates ("5-Dup." of Distil-Whisper), summed over samples.

    Per sample: the text normalised by Whisper's EnglishTextNormalizer, split on whitespace, and
    (number of 5-grams) - (number of distinct 5-grams). "a b c d e a b c d e" has 6 5-grams, 5 distinct: 1.
    Distil-Whisper joins all normalised predictions into one string first; counting within each sample
    instead keeps two samples that say the same thing (short utterances) from counting as a hallucination.
    """
    total = 0
    for t in texts:
        grams = ngrams(normalize(t).split(), n)
        total += len(grams) - len(set(grams))
    return total


# --------------------------------------------------------------------------------------------- diversity
def distinct_n(texts: Sequence[str | None], n: int) -> float | None:
    """Distinct-n (Li et al. 2016): distinct word n-grams / total word n-grams, pooled over all texts.

    n-grams never cross texts; words are `words(text)`. None when the texts hold no n-gram at all.
    Example: ["a b a b"] has bigrams ab, ba, ab: distinct-2 = 2/3.
    """
    return _pooled_distinct([ngrams(words(t), n) for t in texts])


def _pooled_distinct(gram_lists: Iterable[Sequence[tuple[str, ...]]]) -> float | None:
    """Distinct n-grams over all n-grams, pooled over the lists; None when they hold none."""
    seen: set = set()
    total = 0
    for grams in gram_lists:
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def paired_distinct_change(base: Sequence[str | None], new: Sequence[str | None], n_gram: int = 2, n: int = 1000,
                           seed: int = 0, level: float = 0.95) -> dict | None:
    """Paired bootstrap of the change in pooled distinct-n between two systems' outputs for the same inputs:
    is a drop in diversity more than which inputs happened to be held out?

    Returns {change: distinct_n(new) - distinct_n(base) (absolute; negative is less diverse), ci [lo, hi]},
    None when either side holds no n-gram. Each of `n` resamples draws the inputs with replacement (numpy
    default_rng(seed)), the same draw for both systems, and pools each system's n-grams over the draw; an input
    drawn twice counts its n-grams twice (they then repeat), which lowers both sides' resampled distinct-n
    alike, so the interval is of the difference, not of either value. ValueError for different lengths."""
    if len(base) != len(new):
        raise ValueError(f"paired_distinct_change: {len(base)} base outputs but {len(new)} new ones")
    d_base, d_new = distinct_n(base, n_gram), distinct_n(new, n_gram)
    if d_base is None or d_new is None:
        return None
    grams = [[ngrams(words(t), n_gram) for t in side] for side in (base, new)]
    idx = np.random.default_rng(seed).integers(0, len(base), size=(n, len(base)))
    diffs = []
    for draw in idx:
        vals = [_pooled_distinct(g[i] for i in draw) for g in grams]
        if None not in vals:
            diffs.append(vals[1] - vals[0])
    lo, hi = np.percentile(diffs, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"change": d_new - d_base, "ci": [float(lo), float(hi)]}


def _bleu(hyp_counts: list[Counter], hyp_len: int, max_ref_counts: list[dict], ref_len: int) -> float:
    """Sentence BLEU-4 with uniform weights and Chen & Cherry method-1 smoothing, as nltk's
    sentence_bleu(..., smoothing_function=SmoothingFunction().method1)."""
    if hyp_len == 0:
        return 0.0
    logs = []
    for k in range(4):
        denom = max(1, sum(hyp_counts[k].values()))
        num = sum(min(c, max_ref_counts[k].get(g, 0)) for g, c in hyp_counts[k].items())
        if k == 0 and num == 0:
            return 0.0
        p = num / denom if num else SMOOTHING_EPSILON / denom
        logs.append(math.log(p))
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(sum(logs) / 4)


def self_bleu_4(texts: Sequence[str | None]) -> float | None:
    """Self-BLEU-4 (Zhu et al. 2018, Texygen): the mean over texts of the sentence BLEU-4 of each text
    against all the other texts as its references. Higher means less diverse.

    Word level on `words(text)`. BLEU-4: uniform weights over 1..4-gram modified precisions (each n-gram's
    count clipped to its largest count in any one reference); the brevity penalty uses the reference
    length closest to the hypothesis length (ties: the shorter), exp(1 - r/c) when c <= r; a text with
    no word scores 0, and so does one with no 1-gram match. Smoothing: Chen & Cherry (2014) method 1 -
    an order whose clipped match count is 0 gets precision epsilon / (its n-gram count, at least 1),
    epsilon = 0.1 (so a 3-word text's 4-gram precision is 0.1). Matches nltk's sentence_bleu with
    SmoothingFunction().method1. None for fewer than two texts.
    """
    toks = [words(t) for t in texts]
    if len(toks) < 2:
        return None
    counts = [[Counter(ngrams(w, k + 1)) for k in range(4)] for w in toks]
    lens = np.array([len(w) for w in toks])
    # For each n-gram, the two largest counts and who holds the largest: the largest count among the
    # *other* texts is then one lookup, and self-BLEU stays O(total n-grams) rather than O(texts^2).
    top: list[dict] = [{} for _ in range(4)]
    for i, cs in enumerate(counts):
        for k in range(4):
            tk = top[k]
            for g, c in cs[k].items():
                best, owner, second = tk.get(g, (0, -1, 0))
                if c > best:
                    tk[g] = (c, i, best)
                elif c > second:
                    tk[g] = (best, owner, c)
    scores = []
    for i, w in enumerate(toks):
        max_ref = []
        for k in range(4):
            m = {}
            for g in counts[i][k]:
                best, owner, second = top[k][g]
                m[g] = second if owner == i else best
            max_ref.append(m)
        others = np.delete(lens, i)
        # closest reference length, ties to the shorter one
        ref_len = int(min(others, key=lambda r: (abs(int(r) - len(w)), int(r))))
        scores.append(_bleu(counts[i], len(w), max_ref, ref_len))
    return float(np.mean(scores))


def mean_length(texts: Sequence[str | None]) -> float | None:
    """Mean number of words (`words(text)`) per text; None for no text."""
    return float(np.mean([len(words(t)) for t in texts])) if len(texts) else None


def clip_score(image_emb, text_emb) -> float | None:
    """CLIPScore (Hessel et al. 2021): mean over pairs of 2.5 * max(cos(image_i, text_i), 0).

    image_emb, text_emb: [N, D] arrays (any float dtype), row i of each a pair. None for N = 0.
    """
    a = np.asarray(image_emb, dtype=np.float64)
    b = np.asarray(text_emb, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"clip_score needs two [N, D] arrays of one shape, got {a.shape} and {b.shape}")
    if len(a) == 0:
        return None
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(np.mean(2.5 * np.maximum(cos, 0.0)))
