"""Batched decoding with the student: greedy, temperature and top-p sampling, with the LM's KV cache.

`generate` is the one decoding function of the project (evaluate and adversarial use it too);
`generate_texts` runs it over whole inputs, windowing the ones longer than a cross_attention decoder's context.
`generate_cli` is `groundgan generate RUN_DIR --audio FILE | --image FILE | --prompt TEXT`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch

from pipeline.config import minimum
from pipeline.errors import BadInput, UserError
from pipeline.registry import register_section
from stages.models.student import Student, _group_rows

# ------------------------------------------------------------------------------------------------------ config
@dataclass
class DecodingConfig:
    """How a student's greedy text is decoded wherever it is scored: the evaluate stage, and the val checks by
    which distill and adversarial pick final/ (they decode at most distill.max_text_tokens). Part of the hash of
    every stage that reads it."""

    max_new_tokens: int = field(default=128, metadata=minimum(1))  # per piece (the evaluate stage)
    # Whisper's temperature fallback: a piece whose greedy text fails a check below is decoded again at these
    # temperatures in turn; [] = off
    fallback_temperatures: List[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0])
    # a text whose gzip compression ratio is above this is a repetition loop (Whisper: 2.4, for 30 s windows;
    # a chunk's text is shorter and compresses less)
    max_compression_ratio: float = field(default=1.6, metadata=minimum(1.0))
    min_avg_logprob: Optional[float] = None  # and where its mean token log-prob is below this (Whisper: -1.0)
    # samples per piece at each fallback temperature; the passing one with the highest mean log-prob is kept (Whisper: 5)
    best_of: int = field(default=1, metadata=minimum(1))
    # and where a word 4-gram occurs more than this many times in one piece (a loop too short for zlib; None: off)
    max_ngram_repeats: Optional[int] = field(default=2, metadata=minimum(1))


def _validate_decoding(root) -> list[str]:
    if any(float(t) <= 0 for t in root.decoding.fallback_temperatures):
        raise UserError("config: 'decoding.fallback_temperatures' must be > 0, got "
                        f"{list(root.decoding.fallback_temperatures)}")
    return []


register_section("decoding", DecodingConfig, _validate_decoding, order=45)



@dataclass
class Generated:
    """B rows, N = the longest generated row."""

    tokens: torch.Tensor  # [B, N] generated ids (end-of-text included where a row stopped), padded with eot
    mask: torch.Tensor  # [B, N] 1 on generated tokens (the eot that stops a row included)
    logprobs: torch.Tensor  # [B, N] log p(token) under the model's own (temperature 1) softmax, 0 on padding
    finished: torch.Tensor  # [B] bool: the row ended with end-of-text
    texts: list[str]  # decoded rows (without end-of-text)
    prompt_ids: list[int]  # the prompt every row started from (bos ...)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token per row from logits [b, V]: argmax at temperature 0, else a sample from the tempered
    distribution cut to its top-p nucleus (the most likely token always stays in). generator: one
    torch.Generator for the batch, or a list of b (row i draws from its own: what it samples does not depend
    on the other rows)."""
    if temperature <= 0:
        return logits.max(-1).indices  # argmax (the first of equal maxima), in a faster kernel on CPU
    if isinstance(generator, (list, tuple)):
        return torch.cat([_pick(logits[i: i + 1], temperature, top_p, g) for i, g in enumerate(generator)])
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each
        sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
        sorted_p[:, 0] = torch.where(sorted_p[:, 0] > 0, sorted_p[:, 0], torch.ones_like(sorted_p[:, 0]))
        choice = draw_categorical(sorted_p, generator)
        return order.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return draw_categorical(probs, generator)


def draw_categorical(weights: torch.Tensor, generator=None) -> torch.Tensor:
    """One index per row of `weights` [b, V] (non-negative, not necessarily normalised), row i drawn with
    probability weights[i, j] / sum_j, by the exponential race torch.multinomial runs (the index of the largest
    weights[i, j] / E_ij, E_ij ~ Exp(1) independent): here E = -log(U) from b x V uniforms of `generator`, in
    row order, which this CPU draws several times faster than torch.multinomial's exponentials
    (benchmarks/decode_kernels.py). An index of zero weight is never drawn; like torch.multinomial's race, a
    draw does not turn on float noise in the weights (as an inverse-CDF draw would, at every boundary)."""
    u = torch.rand(weights.shape, generator=generator, device=weights.device)
    return (weights.float() / u.log_().neg_()).max(-1).indices


@torch.no_grad()
def generate(student: Student, modality: str | Sequence[str] = "text", features: Any = None,
             feature_mask: torch.Tensor | None = None, n: int | None = None, prompt: Sequence[int] | None = None,
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
             generator: torch.Generator | None = None) -> Generated:
    """Decode B rows.

    modality: one name or one per row; features: None (rows without features; give `n`), a tensor [B, T, D]
    with feature_mask [B, T], or a list of B tensors [T_i, D] | None; prompt: token ids after bos shared by
    every row (None: just bos); temperature 0 is greedy; top_p < 1 samples from the nucleus; generator: the
    torch.Generator sampling draws from (on the student's device), or a list of one per row: consecutive rows
    holding the same generator object draw together, as a call of their own would (the phase's k samples of
    one input), and their draws then depend on that generator alone, whatever else is in the batch. Rows stop
    at end-of-text or at their cap: max_new_tokens, or less where the student has a length cap for the row's
    modality (StudentSpec.length_cap: margin x (a + b x seconds) tokens, from the row's feature frames; a row
    stopped there has finished False). Rows are decoded in groups of one modality, in row order, so a row's tokens depend on the
    generator's state and its group, never on padding. A cross_attention student decodes with
    _decode_group_cached (reference_decoding(): the loop it replaced).
    """
    student = getattr(student, "module", student)
    dev = student.device
    if features is None:
        B = n if n is not None else (len(modality) if not isinstance(modality, str) else 1)
    else:
        B = len(features)
    prompt_ids = [student.spec.bos_id] + [int(t) for t in (prompt or [])]
    eot = student.spec.eot_id
    room = student.max_text_positions() - len(prompt_ids)
    max_new = max(0, min(max_new_tokens, room))
    tokens = torch.full((B, max(1, max_new)), eot, dtype=torch.long, device=dev)
    mask = torch.zeros_like(tokens)
    logprobs = torch.zeros(tokens.shape, dtype=torch.float32, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    limits = row_limits(student, modality, features, feature_mask, B, max_new)
    was_training = student.training
    student.eval()
    try:
        for m, rows in _group_rows(modality, B).items():
            idx = torch.tensor(rows, device=dev)
            f, fm = _group_features(features, feature_mask, rows, idx, dev)
            gen = [generator[i] for i in rows] if isinstance(generator, (list, tuple)) else generator
            lim = torch.tensor([limits[i] for i in rows], dtype=torch.long, device=dev)
            out = _decode_group(student, m, f, fm, len(rows), prompt_ids, temperature, top_p, max_new, gen, lim)
            tokens[idx, : out[0].shape[1]] = out[0]
            mask[idx, : out[0].shape[1]] = out[1]
            logprobs[idx, : out[0].shape[1]] = out[2]
            finished[idx] = out[3]
    finally:
        student.train(was_training)
    width = int(mask.sum(1).max()) if B else 0
    tokens, mask, logprobs = tokens[:, :width], mask[:, :width], logprobs[:, :width]
    tok = student.tokenizer
    texts = [tok.decode(row[: int(k)].tolist()) for row, k in zip(tokens, mask.sum(1))]
    return Generated(tokens, mask, logprobs, finished, texts, prompt_ids)


def row_limits(student: Student, modality, features, feature_mask, b: int, max_new: int) -> list[int]:
    """Tokens each of b rows may decode: max_new, or the student's length cap for the row (StudentSpec.decode_cap
    from its modality and feature frames) where lower. Rows without features have no cap but max_new."""
    spec = student.spec
    if not spec.length_cap or features is None:
        return [max_new] * b
    mods = [modality] * b if isinstance(modality, str) else list(modality)
    out = []
    for i in range(b):
        if isinstance(features, (list, tuple)):
            frames = None if features[i] is None else int(features[i].shape[0])
        else:
            frames = int(feature_mask[i].sum()) if feature_mask is not None else int(features.shape[1])
        cap = None if frames is None else spec.decode_cap(mods[i], frames)
        out.append(max_new if cap is None else min(max_new, cap))
    return out


def _group_features(features, feature_mask, rows, idx, dev):
    from stages.models.student import _pad_rows

    if features is None:
        return None, None
    if isinstance(features, (list, tuple)):
        sel = [features[i] for i in rows]
        if sel[0] is None:
            return None, None
        return _pad_rows([s.to(dev, torch.float32) for s in sel])
    f = features[idx].to(dev, torch.float32)
    return f, (feature_mask[idx].to(dev) if feature_mask is not None else None)


_REFERENCE = [False]


@contextmanager
def reference_decoding():
    """Within it, `generate` decodes every group the way it did before the cached decoder (_decode_group_reference:
    transformers' decoder step by step, every row to the end of the longest): for tests and benchmarks that
    compare the two."""
    _REFERENCE.append(True)
    try:
        yield
    finally:
        _REFERENCE.pop()


def _decode_group(student, modality, f, fm, b, prompt_ids, temperature, top_p, max_new, generator, limits):
    """One modality's rows: the cached decoder (_decode_group_cached) for a cross_attention student, else the
    reference loop. limits: tokens each row may decode ([b], each at most max_new: row_limits)."""
    if not _REFERENCE[-1] and student.spec.style == "cross_attention" and hasattr(getattr(student.lm, "model", None),
                                                                                 "decoder"):
        return _decode_group_cached(student, modality, f, fm, b, prompt_ids, temperature, top_p, max_new, generator,
                                    limits)
    return _decode_group_reference(student, modality, f, fm, b, prompt_ids, temperature, top_p, max_new, generator,
                                   limits)


def _generator_groups(generator, b: int) -> list[tuple[int, int, Any]]:
    """(start, end, generator) of the rows that draw together: consecutive rows holding the same generator
    object (one generator for all rows: one group)."""
    if not isinstance(generator, (list, tuple)):
        return [(0, b, generator)]
    out: list[tuple[int, int, Any]] = []
    for i, g in enumerate(generator):
        if out and out[-1][2] is g:
            out[-1] = (out[-1][0], i + 1, g)
        else:
            out.append((i, i + 1, g))
    return out


def _draw(full_logits: torch.Tensor, done: torch.Tensor, temperature: float, top_p: float, groups) -> torch.Tensor:
    """Sampled next tokens [b] from logits [b, V] (rows already done: any values): each group of rows
    (_generator_groups) that still has a live row draws for all its rows in one call from its generator, as a
    decode of that group alone would, so its stream is consumed the same way whatever else shares the batch."""
    out = torch.zeros(full_logits.shape[0], dtype=torch.long, device=full_logits.device)
    for s, e, g in groups:
        if bool(done[s:e].all()):
            continue
        out[s:e] = _pick(full_logits[s:e], temperature, top_p, g)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_tail: torch.Tensor | None,
            v_tail: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T + mask) v over the keys [k | k_tail]: q [b, h, l, d] (scaled), k, v [b, h, T, d] per row,
    k_tail, v_tail [h, N, d] shared by every row (never expanded to b rows). -> [b, h, l, d]."""
    s = q @ k.transpose(-1, -2)
    if mask is not None:
        s = s + mask
    if k_tail is None:
        return torch.softmax(s, dim=-1) @ v
    b, h, l, d = q.shape
    n = k_tail.shape[1]
    k_tail, v_tail = k_tail.to(q.dtype), v_tail.to(q.dtype)
    qh = q.transpose(0, 1).reshape(h, b * l, d)
    s2 = (qh @ k_tail.transpose(-1, -2)).view(h, b, l, n).transpose(0, 1)
    p = torch.softmax(torch.cat([s, s2], dim=-1), dim=-1)
    t = k.shape[2]
    out = p[..., :t] @ v
    p2 = p[..., t:].transpose(0, 1).reshape(h, b * l, n)
    return out + (p2 @ v_tail).view(h, b, l, d).transpose(0, 1)


def _layer(layer, x: torch.Tensor, pos: int, self_k: torch.Tensor, self_v: torch.Tensor, cross: tuple,
           causal: torch.Tensor | None) -> torch.Tensor:
    """One Whisper decoder layer (transformers' WhisperDecoderLayer in eval mode) on new positions x [b, l, D]
    starting at `pos`, its self-attention keys and values written into the caches [b, h, L, d] there."""
    b, l, D = x.shape
    sa, ca = layer.self_attn, layer.encoder_attn
    heads = lambda t, a: t.view(b, l, a.num_heads, a.head_dim).transpose(1, 2)  # noqa: E731
    h = layer.self_attn_layer_norm(x)
    self_k[:, :, pos: pos + l] = heads(sa.k_proj(h), sa)
    self_v[:, :, pos: pos + l] = heads(sa.v_proj(h), sa)
    a = _attend(heads(sa.q_proj(h) * sa.scaling, sa), self_k[:, :, : pos + l], self_v[:, :, : pos + l], None, None,
                causal)
    x = x + sa.out_proj(a.transpose(1, 2).reshape(b, l, D))
    h = layer.encoder_attn_layer_norm(x)
    a = _attend(heads(ca.q_proj(h) * ca.scaling, ca), *cross)
    x = x + ca.out_proj(a.transpose(1, 2).reshape(b, l, D))
    h = layer.final_layer_norm(x)
    return x + layer.fc2(layer.activation_fn(layer.fc1(h)))


def _decode_group_cached(student, modality, f, fm, b, prompt_ids, temperature, top_p, max_new, generator, limits):
    """_decode_group_reference's rows, tokens and log-probs (to float noise) from a decoder loop of its own over
    the Whisper decoder's weights: the cross-attention keys and values computed once per call (the silence
    tail's once per weights version, shared by every row: Student.cross_kv), the self-attention's in a
    preallocated cache, and rows that have ended dropped from the batch. Sampling draws, per generator group,
    from the same logits shape as the reference loop does, so every random stream is consumed as there."""
    dev, eot = student.device, student.spec.eot_id
    toks, mask, lps, done = _outputs(b, max_new, eot, dev)
    if max_new == 0:
        return toks[:, :0], mask[:, :0], lps[:, :0], done
    dec = student.lm.model.decoder
    cross = student.cross_kv(modality, f, fm, b)
    ids = torch.tensor([[student.marker_id(modality)] + list(prompt_ids)] * b, dtype=torch.long, device=dev)
    p0 = ids.shape[1]
    total = p0 + max_new
    first = dec.layers[0].self_attn
    self_k = [torch.zeros(b, first.num_heads, total, first.head_dim, device=dev) for _ in dec.layers]
    self_v = [torch.zeros_like(k) for k in self_k]
    pos_emb = dec.embed_positions.weight
    x = dec.embed_tokens(ids) + pos_emb[:p0].unsqueeze(0)
    causal = torch.full((p0, p0), float("-inf"), device=dev).triu(1)
    for i, layer in enumerate(dec.layers):
        x = _layer(layer, x, 0, self_k[i], self_v[i], cross[i], causal)
    logits = student.head(dec.layer_norm(x[:, -1]))
    live = torch.arange(b, device=dev)  # the rows in the compute batch, by their index in the group
    stopped = done.clone()  # rows out of the batch: ended, or at their cap (those stay done = False)
    groups = _generator_groups(generator, b) if temperature > 0 else None
    V = logits.shape[-1]
    for t in range(max_new):
        if temperature > 0:
            full = logits.new_zeros(b, V) if live.numel() < b else logits
            if live.numel() < b:
                full[live] = logits
            nxt = _draw(full, stopped, temperature, top_p, groups)[live]
        else:
            nxt = logits.max(-1).indices  # argmax (the first of equal maxima), in a faster kernel on CPU
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        toks[live, t] = nxt
        mask[live, t] = 1
        lps[live, t] = lp
        ended = nxt == eot
        done[live] = ended
        out = ended | (limits[live] <= t + 1)
        stopped[live] = out
        if bool(stopped.all()) or t == max_new - 1:
            break
        if bool(out.any()):  # drop the rows that ended or reached their cap from every cache
            keep = (~out).nonzero().squeeze(1)
            live, nxt = live[keep], nxt[keep]
            self_k = [k.index_select(0, keep) for k in self_k]
            self_v = [v.index_select(0, keep) for v in self_v]
            cross = [(c[0].index_select(0, keep), c[1].index_select(0, keep), c[2], c[3]) for c in cross]
        x = dec.embed_tokens(nxt.unsqueeze(1)) + pos_emb[p0 + t].view(1, 1, -1)
        for i, layer in enumerate(dec.layers):
            x = _layer(layer, x, p0 + t, self_k[i], self_v[i], cross[i], None)
        logits = student.head(dec.layer_norm(x[:, -1]))
    return toks, mask, lps, done


def _outputs(b: int, max_new: int, eot: int, dev) -> tuple:
    """A decode's outputs before its first step: tokens (end-of-text), mask, log-probs [b, max(1, max_new)] and
    which rows are done."""
    toks = torch.full((b, max(1, max_new)), eot, dtype=torch.long, device=dev)
    return (toks, torch.zeros_like(toks), torch.zeros(toks.shape, dtype=torch.float32, device=dev),
            torch.zeros(b, dtype=torch.bool, device=dev))


def _decode_group_reference(student, modality, f, fm, b, prompt_ids, temperature, top_p, max_new, generator, limits):
    """One modality's rows: prefill the conditioning and the prompt, then one token per step with the cache."""
    dev, eot = student.device, student.spec.eot_id
    toks, mask, lps, done = _outputs(b, max_new, eot, dev)
    if max_new == 0:
        return toks[:, :0], mask[:, :0], lps[:, :0], done
    prompt = torch.tensor([prompt_ids] * b, dtype=torch.long, device=dev)
    logits, cache = student.prefill(prompt, modality, f, fm)
    groups = _generator_groups(generator, b) if temperature > 0 else None
    stopped = done.clone()  # ended, or at the row's cap
    for t in range(max_new):
        nxt = _draw(logits, stopped, temperature, top_p, groups) if temperature > 0 else logits.max(-1).indices
        nxt = torch.where(stopped, torch.full_like(nxt, eot), nxt)
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        live = ~stopped
        toks[:, t] = nxt
        mask[:, t] = live.long()
        lps[:, t] = torch.where(live, lp, torch.zeros_like(lp))
        done = done | (live & (nxt == eot))
        stopped = stopped | (nxt == eot) | (limits <= t + 1)
        if bool(stopped.all()) or t == max_new - 1:
            break
        logits, cache = student.decode_step(nxt, cache)
    return toks, mask, lps, done


# ------------------------------------------------------------------------------------------------------ CLI
def feature_windows(student: Student, features: torch.Tensor | None,
                    chunks: Sequence[int] | None = None) -> list[torch.Tensor | None]:
    """One input's features [T, D] as the pieces a student reads, in order. chunks: the frame counts of the
    pieces the teacher labelled one by one (a long clip's chunks, each encoded from its own start; they sum
    to T): those pieces, as the student was trained on them. Without chunks, a cross_attention student (its
    decoder sees at most source_frames frames) reads a longer input in consecutive windows of source_frames;
    any other student reads the input whole."""
    student = getattr(student, "module", student)
    if features is None or features.dim() != 2:
        return [features]
    if chunks is not None and len(chunks) > 1 and int(sum(chunks)) == features.shape[0]:
        pieces = list(torch.split(features, [int(c) for c in chunks]))
    else:
        pieces = [features]
    n = student.spec.source_frames
    if student.spec.style != "cross_attention":
        return pieces
    return [p[s: s + n] for p in pieces for s in range(0, max(1, p.shape[0]), n)]


def ngram_repeats(text: str, n: int = 4) -> int:
    """How often the most frequent word n-gram of `text` occurs (lower-cased words; 0 for fewer than n
    words). A repetition loop ("the voice over ip capabilities of the voice over ip capabilities of ...")
    repeats one n-gram; fluent speech of one 10 s chunk hardly does."""
    import re
    from collections import Counter

    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
    return max(grams.values(), default=0)


def generate_texts(student: Student, modality: str, features: list[torch.Tensor] | None, n: int | None = None,
                   chunks: list | None = None, fallback: Sequence[float] = (), max_compression_ratio: float = 2.4,
                   min_avg_logprob: float | None = None, best_of: int = 1, max_ngram_repeats: int | None = None,
                   first_pass: list[str] | None = None, keys: Sequence[str] | None = None, seed: int = 0,
                   details: list[dict] | None = None, **kw) -> list[str]:
    """The text of every input: `generate` over its pieces (feature_windows), the pieces' texts joined by a
    space. features: a list of [T_i, D] tensors, or None (give n); chunks: beside them, each input's chunk
    frame counts or None. fallback: Whisper's temperature fallback, for greedy decoding: a piece that stopped
    at its cap (the student's length cap, or max_new_tokens) without end-of-text, or whose text's
    compression ratio (whisper.utils.compression_ratio: utf-8 bytes over zlib-compressed bytes; a loop
    compresses well) exceeds max_compression_ratio, or whose mean token log-prob is
    below min_avg_logprob, or in which a word 4-gram occurs more than max_ngram_repeats times (None: those
    two not checked; zlib needs long text to see a loop, and a 10 s chunk's loop of three repeats
    compresses no better than plain speech), is decoded again at each of these temperatures in turn
    (sampling from kw's generator) until an attempt passes every check; where none does, the least repetitive
    attempt is kept. best_of: samples drawn per piece at each fallback temperature (Whisper's `best_of`, 5 in
    its transcribe command); of those that pass, the one with the highest mean token log-prob is kept (one
    sample is one draw of the model's noise; the most likely of five is less so). first_pass, when given, gets
    every input's text before any fallback (what plain decoding at kw's temperature writes). keys: each input's
    sample key; then every sampled piece (at kw's temperature > 0, or in the fallback) draws from a generator of
    its own seeded by (seed, key, piece, attempt) (piece_seed) instead of kw's generator, so that an input's
    text does not depend on what shares its batch. details, when given, gets per input {"avg_logprob": mean
    token log-prob of the kept pieces, "fallback": whether any piece was decoded again}. kw: as `generate`."""
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}")
    if keys is not None:
        n_in = len(features) if features is not None else n
        if len(keys) != n_in:
            raise ValueError(f"{len(keys)} keys for {n_in} inputs")
    if features is None:
        g = generate(student, modality, None, n=n, **_keyed(kw, student, keys, seed, range(n), [0] * n, "first"))
        if first_pass is not None:
            first_pass.extend(g.texts)
        if details is not None:
            details.extend(_details(g.logprobs.sum(1).tolist(), g.mask.sum(1).tolist(), list(range(n)), n,
                                    [False] * n))
        return g.texts
    pieces, owner, index = [], [], []
    for i, f in enumerate(features):
        for k, w in enumerate(feature_windows(student, f, chunks[i] if chunks is not None else None)):
            pieces.append(w)
            owner.append(i)
            index.append(k)
    first = generate(student, modality, pieces, **_keyed(kw, student, keys, seed, owner, index, "first"))
    out = list(first.texts)
    lp_sum, n_tok = first.logprobs.sum(1).tolist(), first.mask.sum(1).tolist()
    fired = [False] * len(pieces)
    if fallback and kw.get("temperature", 0.0) <= 0:
        from whisper.utils import compression_ratio

        def check(g: Generated) -> list[tuple[bool, tuple, float]]:
            """(passes, how repetitive, mean token log-prob) per row; repetitiveness orders attempts that all
            fail: the 4-gram repeat count first where that is checked (a short loop can compress no better
            than speech), then the compression ratio."""
            lp = (g.logprobs.sum(1) / g.mask.sum(1).clamp(min=1)).tolist()
            rows = []
            for t, a, fin in zip(g.texts, lp, g.finished.tolist()):
                c, r = compression_ratio(t), (ngram_repeats(t) if max_ngram_repeats is not None else 0)
                ok = (fin and c <= max_compression_ratio and (min_avg_logprob is None or a >= min_avg_logprob)
                      and (max_ngram_repeats is None or r <= max_ngram_repeats))
                rows.append((ok, (r, c), a))
            return rows

        state = check(first)
        for temp in fallback:
            redo = [j for j, st in enumerate(state) if not st[0]]
            if not redo:
                break
            rows = [j for j in redo for _ in range(best_of)]
            attempt = [f"T{float(temp)}/{c}" for _ in redo for c in range(best_of)]
            again = generate(student, modality, [pieces[j] for j in rows],
                             **_keyed({**kw, "temperature": float(temp)}, student, keys, seed,
                                      [owner[j] for j in rows], [index[j] for j in rows], attempt))
            checked = check(again)
            a_sum, a_tok = again.logprobs.sum(1).tolist(), again.mask.sum(1).tolist()
            for r, j in enumerate(redo):
                fired[j] = True
                cand = range(r * best_of, (r + 1) * best_of)
                passing = [c for c in cand if checked[c][0]]
                pick = (max(passing, key=lambda c: checked[c][2]) if passing
                        else min(cand, key=lambda c: checked[c][1]))
                if checked[pick][0] or checked[pick][1] < state[j][1]:
                    out[j], state[j] = again.texts[pick], checked[pick]
                    lp_sum[j], n_tok[j] = a_sum[pick], a_tok[pick]
    if first_pass is not None:
        first_pass.extend(_join(first.texts, owner, len(features)))
    if details is not None:
        details.extend(_details(lp_sum, n_tok, owner, len(features), fired))
    return _join(out, owner, len(features))


def piece_seed(seed: int, key: str, piece: int, attempt: str) -> int:
    """The seed of one piece's random stream: fixed by (seed, sample key, piece of the sample, attempt), so
    that a sample's sampled text does not depend on the batch it is decoded in."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/{piece}/{attempt}".encode()).digest()[:8], "little") >> 1


def _keyed(kw: dict, student, keys, seed: int, owner: Sequence[int], index: Sequence[int], attempt) -> dict:
    """kw with one generator per row, seeded by the row's sample key (piece_seed), where keys are given and the
    rows sample; kw as it is otherwise."""
    if keys is None or kw.get("temperature", 0.0) <= 0:
        return kw
    attempts = [attempt] * len(owner) if isinstance(attempt, str) else list(attempt)
    dev = getattr(student, "module", student).device
    gens = [torch.Generator(device=dev).manual_seed(piece_seed(seed, keys[o], k, a))
            for o, k, a in zip(owner, index, attempts)]
    return {**kw, "generator": gens}


def _details(lp_sum: Sequence[float], n_tok: Sequence[int], owner: Sequence[int], n: int,
             fired: Sequence[bool]) -> list[dict]:
    """Per input: the mean log-prob of the tokens of its kept pieces (end-of-text included) and whether the
    fallback re-decoded any of its pieces."""
    s, t, f = [0.0] * n, [0] * n, [False] * n
    for i, a, b, c in zip(owner, lp_sum, n_tok, fired):
        s[i] += float(a)
        t[i] += int(b)
        f[i] = f[i] or bool(c)
    return [{"avg_logprob": s[i] / t[i] if t[i] else 0.0, "fallback": f[i]} for i in range(n)]


def _join(piece_texts: Sequence[str], owner: Sequence[int], n: int) -> list[str]:
    """Each of n inputs' text: its pieces' non-empty texts joined by a space."""
    texts: list[list[str]] = [[] for _ in range(n)]
    for i, t in zip(owner, piece_texts):
        if t:
            texts[i].append(t)
    return [" ".join(t) for t in texts]


def generate_cli(a) -> int:
    """`groundgan generate RUN_DIR (--audio F | --image F | --prompt TEXT) [--stage S] [--temperature T]
    [--top-p P] [--max-new-tokens N]`: print what the run's student writes."""
    from pipeline.config import load_config
    from pipeline.distributed import DistInfo, pick_device
    from pipeline.registry import modality_adapter
    from pipeline.rundir import RunDir
    from stages.models.student import load_student

    run = Path(a.run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config([str(run / "config.yaml")])
    rd = RunDir(run)
    if a.stage not in (None, "distill", "adversarial"):
        raise UserError(f"--stage {a.stage}: a student comes from the distill or the adversarial stage")
    stages = [a.stage] if a.stage else ["adversarial", "distill"]
    stage = next((s for s in stages if (rd.stage_dir(s) / "final" / "student.json").is_file()), None)
    if stage is None:
        raise UserError(f"{run}: no trained student in {' or '.join(s + '/final' for s in stages)}; run the "
                        "distill stage first")
    if a.stage is None and rd.read_manifest(stage) is None:
        print(f"note: {stage} is not finished; using its final/ from an earlier attempt", file=sys.stderr)
    device = pick_device(cfg.root.run.device, DistInfo())
    student = load_student(rd.stage_dir(stage) / "final", device)
    if a.temperature < 0 or not 0 < a.top_p <= 1 or a.max_new_tokens < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    gen = torch.Generator(device=device).manual_seed(cfg.root.seed)
    kw = dict(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens, generator=gen)
    if a.prompt is not None:
        if "text" not in student.spec.marker_ids:
            raise UserError(f"this student reads {', '.join(student.spec.modalities)}, not text; give --audio or --image")
        out = generate(student, "text", n=1, prompt=student.tokenizer.encode(a.prompt), **kw)
        print((a.prompt + " " + out.texts[0]).strip() if out.texts[0] else a.prompt)
        return 0
    modality, path = ("audio", a.audio) if a.audio is not None else ("image", a.image)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--{modality}: file not found: {path}")
    if modality not in student.spec.marker_ids:
        raise UserError(f"this student does not read {modality}; it reads {', '.join(student.spec.modalities)}")
    adapter = modality_adapter(cfg.root, modality)
    try:
        decoded = adapter.decode(path.read_bytes(), path.suffix.lstrip(".").lower())
        label = adapter.build_teacher(device, store_features=True).label([decoded])[0]
    except BadInput as e:
        raise UserError(f"--{modality} {path}: {e.reason}") from None
    feats = label.arrays.get("features")
    if feats is None or student.spec.feature_dims.get(modality, 0) <= 0:
        raise UserError(f"the {modality} teacher gave no features for {path}")
    f = torch.from_numpy(feats.astype("float32")).reshape(-1, feats.shape[-1])
    ev = cfg.root.decoding
    print(generate_texts(student, modality, [f], chunks=[label.arrays.get("chunk_frames")],
                         fallback=ev.fallback_temperatures, max_compression_ratio=ev.max_compression_ratio,
                         min_avg_logprob=ev.min_avg_logprob, best_of=ev.best_of,
                         max_ngram_repeats=ev.max_ngram_repeats, **kw)[0])
    return 0
