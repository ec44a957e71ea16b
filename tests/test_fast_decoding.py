"""The cached decoder (generation._decode_group_cached) against the reference loop (transformers' decoder step by
step, every row to the end): the same texts, tokens and log-probs (to float noise), the same random streams; the
silence tail's keys and values computed once per weights version; the phase's batched sampling against one call
per input; the frozen output layer's gradient."""

import dataclasses

import pytest
import torch

from stages.models.generation import generate, generate_texts, reference_decoding
from stages.models.student import StudentConfig, build_student

torch.set_num_threads(1)

D = 32
TINY = dict(style="cross_attention", d_model=D, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)
FRAMES = 24  # the decoder's context: pieces shorter than this are read with the silence tail after them


def _student(seed: int = 0, direct: bool = True):
    """A tiny cross_attention student whose audio feeds the decoder directly, padded with a 'silence' encoding
    (source_pad) to FRAMES frames, as a student built from a Whisper teacher is."""
    torch.manual_seed(seed)
    s = build_student(StudentConfig(**TINY), {"audio": D, "text": 0}, max_text_tokens=40)
    with torch.no_grad():  # a larger spread than the init, so greedy paths are not flat ties
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        # a vocabulary of a dozen words and end-of-text (the other rows zero), so that rows end, at different steps
        emb = s.lm.get_input_embeddings().weight
        words = torch.zeros(emb.shape[0], dtype=torch.bool)
        words[torch.arange(100, 112)] = True
        words[s.spec.eot_id] = True
        words[s.spec.text_vocab:] = True  # the modality markers
        emb[~words] = 0.0
        emb[s.spec.eot_id] *= 1.5
    s.spec = dataclasses.replace(s.spec, source_frames=FRAMES, direct=["audio"] if direct else [])
    if direct:
        del s.projectors["audio"]
        s.source_pad = torch.randn(FRAMES, D, generator=torch.Generator().manual_seed(seed + 7))
    return s.eval()


def _features(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3 + (5 * i) % 17, D, generator=g) for i in range(n)]


def _both(fn):
    fast = fn()
    with reference_decoding():
        ref = fn()
    return fast, ref


def _same(a, b, atol=1e-4):
    assert a.texts == b.texts
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.finished, b.finished)
    assert torch.allclose(a.logprobs, b.logprobs, atol=atol)


@pytest.mark.parametrize("direct", [True, False])
def test_greedy_equals_the_reference_loop(direct):
    s = _student(direct=direct)
    feats = _features(7)
    fast, ref = _both(lambda: generate(s, "audio", feats, max_new_tokens=30))
    _same(fast, ref)
    assert fast.mask.sum(1).min() < fast.mask.sum(1).max()  # rows end at different steps: the batch shrinks
    fast, ref = _both(lambda: generate(s, ["audio", "text", "audio"], [feats[0], None, feats[1]], max_new_tokens=12))
    _same(fast, ref)


def test_sampling_draws_the_same_streams():
    s = _student()
    feats = _features(5)
    for gen in (lambda: torch.Generator().manual_seed(3),  # one stream for the batch
                lambda: [torch.Generator().manual_seed(10 + i) for i in range(5)]):  # one per row
        fast, ref = _both(lambda: generate(s, "audio", feats, temperature=1.0, max_new_tokens=20, generator=gen()))
        _same(fast, ref)
    fast, ref = _both(lambda: generate(s, "audio", feats, temperature=0.8, top_p=0.9, max_new_tokens=20,
                                       generator=torch.Generator().manual_seed(5)))
    _same(fast, ref)


def test_generate_texts_with_fallback_and_keys_equal_the_reference():
    s = _student()
    feats = _features(6)
    kw = dict(fallback=[0.5, 1.0], max_compression_ratio=1.2, max_ngram_repeats=1, min_avg_logprob=-0.01,
              max_new_tokens=30)
    for keys in (None, [f"k{i}" for i in range(6)]):
        out = []
        for ref in (False, True):
            first, details = [], []
            ctx = reference_decoding() if ref else torch.no_grad()
            with ctx:
                texts = generate_texts(s, "audio", feats, generator=torch.Generator().manual_seed(1), keys=keys,
                                       first_pass=first, details=details, **kw)
            out.append((texts, first, details))
        assert out[0][0] == out[1][0] and out[0][1] == out[1][1]
        assert [d["fallback"] for d in out[0][2]] == [d["fallback"] for d in out[1][2]]
        assert any(d["fallback"] for d in out[0][2])  # the fallback ran
        for a, b in zip(out[0][2], out[1][2]):
            assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=1e-4)


def test_silence_keys_are_computed_once_per_weights_version():
    s = _student()
    first = s._silence_kv()
    assert s._silence_kv() is first  # the same tensors: not recomputed
    layer = s.lm.model.decoder.layers[0].encoder_attn
    opt = torch.optim.AdamW(s.parameters(), lr=0.1)
    s.train()
    f, = _features(1)
    s(torch.tensor([[s.spec.bos_id, 5, 6]]), None, "audio", [f]).sum().backward()
    opt.step()
    s.eval()
    again = s._silence_kv()
    assert again is not first  # the optimiser moved k_proj / v_proj: recomputed
    want = layer.k_proj(s.source_pad).view(FRAMES, layer.num_heads, layer.head_dim).transpose(0, 1)
    assert torch.allclose(again[0][0], want, atol=1e-6)
    with torch.no_grad():
        s.source_pad.mul_(2.0)
    assert s._silence_kv() is not again
    fast, ref = _both(lambda: generate(s, "audio", _features(4), max_new_tokens=15))
    _same(fast, ref)


def test_the_phase_samples_every_input_in_one_batch_as_one_call_each():
    from stages.adversarial.rows import input_generator, sample_rows
    from stages.models.labelled_data import Example

    s = _student()
    feats = _features(5)
    examples = [Example(key=f"k{i}", modality="audio" if i != 2 else "text", split="pool", text="", targets=[],
                        teacher="t", features=None if i == 2 else f) for i, f in enumerate(feats)]
    rows, texts = sample_rows(s, examples, 3, [input_generator(0, 1, i, "cpu") for i in range(5)], 1.0, 16, "cpu")
    # the reference: one generate call per input from its own generator, as the phase did before
    want_texts, want_tokens = [], []
    with reference_decoding():
        for i, e in enumerate(examples):
            g = generate(s, [e.modality] * 3, [e.features] * 3, temperature=1.0, max_new_tokens=16,
                         generator=input_generator(0, 1, i, "cpu"))
            want_texts += g.texts
            want_tokens += [r[: int(n)] for r, n in zip(g.tokens.tolist(), g.mask.sum(1).tolist())]
    assert texts == want_texts
    got = [r[1: int(n)].tolist() for r, n in zip(rows.input_ids, rows.attention_mask.sum(1))]
    assert got == want_tokens
    assert rows.source == [i for i in range(5) for _ in range(3)]


def test_frozen_text_rows_take_the_same_steps_as_the_zeroed_gradient():
    """freeze_text_rows (the table frozen, the marker rows their own parameter, fused AdamW) against what it
    replaced (the whole table learning, its text rows' gradient zeroed by a hook, the default AdamW): the same
    gradients, the same weights after three steps, the marker rows written back into the table (which the
    decoders and save_student read), and an EMA copy reading its own marker rows."""
    from stages.distill import EMA, _param_groups
    from stages.models.optim import adamw

    weights, grads = [], []
    for freeze in (False, True):
        torch.manual_seed(0)
        s = _student()
        s.train()
        emb = s.lm.get_input_embeddings().weight
        v = s.spec.text_vocab
        if freeze:
            s.freeze_text_rows()
            assert s.text_rows_frozen and not emb.requires_grad
            opt = adamw(_param_groups(s, 0.01), lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
            opt.register_step_post_hook(s.sync_marker_rows)
        else:
            keep = torch.zeros(emb.shape[0], 1)
            keep[v:] = 1.0
            emb.register_hook(lambda g, keep=keep: g * keep)
            opt = torch.optim.AdamW(_param_groups(s, 0.01), lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
        ids = torch.tensor([[s.spec.bos_id, 5, 6, 7], [s.spec.bos_id, 9, 3, s.spec.eot_id]])
        for step in range(3):
            s(ids, None, ["audio", "text"], [_features(1)[0], None]).logsumexp(-1).sum().backward()
            if step == 0:
                g = {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}
                g["markers"] = g.pop("marker_rows") if freeze else g["lm.model.decoder.embed_tokens.weight"][v:]
                if not freeze:
                    assert g.pop("lm.model.decoder.embed_tokens.weight")[:v].abs().max() == 0
                grads.append(g)
            opt.step()
            opt.zero_grad(set_to_none=True)
        weights.append({n: t.clone() for n, t in s.lm.state_dict().items()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n
    assert weights[0].keys() == weights[1].keys()
    for n in weights[0]:
        assert torch.allclose(weights[0][n], weights[1][n], atol=1e-5), n
    table = weights[1]["model.decoder.embed_tokens.weight"]
    assert not torch.equal(table[v:], _student().lm.get_input_embeddings().weight[v:])  # the markers moved
    ema = EMA(s, 0.5)
    with torch.no_grad():
        s.marker_rows.add_(1.0)  # the live model moves; its copy must not read the live rows
    assert ema.model.lm.get_input_embeddings()._forward_hooks  # the hook came with the copy
    ema.model.train(False)
    out = ema.model(ids, None, ["audio", "text"], [_features(1)[0], None])
    s.eval()
    with torch.no_grad():
        s.marker_rows.sub_(1.0)
    assert torch.allclose(out, s(ids, None, ["audio", "text"], [_features(1)[0], None]), atol=1e-5)


@pytest.mark.parametrize("direct", [True, False])
def test_the_shared_tail_forward_equals_the_full_cross_attention(direct):
    """Student.hidden reads the tail's keys and values shared (_shared_tail_attention); the expanded cache it
    replaced (_cross_cache, still the reference decoder's) gives the same states and the same gradients."""
    from stages.models.student import _pad_rows

    s = _student(direct=direct).train()  # dropout 0: train mode with gradients, as distill's step
    f, fm = _pad_rows(_features(4))
    ids = torch.randint(100, 112, (4, 6))
    ids[:, 0] = s.spec.bos_id
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    out = []
    for use_cache in (False, True):  # False: the shared tail; True: the cache of the full sequence (the old path)
        s.zero_grad()
        h, _ = s._run(ids, mask, "audio", f, fm, cache=None, use_cache=use_cache)
        (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()
        out.append((h.detach(), {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    assert out[0][1].keys() == out[1][1].keys()
    for n in out[0][1]:
        assert torch.allclose(out[0][1][n], out[1][1][n], atol=1e-4), n
    with torch.no_grad():  # no gradient: the silence tail's keys and values come from the cache
        a = s.eval()._run(ids, mask, "audio", f, fm, cache=None, use_cache=False)[0]
    assert torch.allclose(a, out[1][0], atol=1e-5)
    assert not hasattr(s.lm.model.decoder.layers[0].encoder_attn, "forward") or \
        "forward" not in vars(s.lm.model.decoder.layers[0].encoder_attn)  # the patch is gone


def test_expanded_cross_attention_is_the_old_forward():
    from stages.models.student import expanded_cross_attention

    s = _student()
    feats = _features(3)
    ids = torch.randint(100, 112, (3, 5))
    ids[:, 0] = s.spec.bos_id
    with torch.no_grad():
        now = s(ids, None, "audio", feats)
        with expanded_cross_attention():
            before = s(ids, None, "audio", feats)
    assert torch.allclose(now, before, atol=1e-4)


def test_score_and_token_logprobs_read_the_tokens_only():
    """Student.score and token_logprobs run the output layer at the rows' tokens only: the same log-probs and
    gradients as the softmax over every position of the padded rows, zeros on padding."""
    from stages.models.student import token_logprobs

    s = _student().train()
    feats = _features(3)
    ids = torch.randint(100, 112, (3, 7))
    ids[:, 0] = s.spec.bos_id
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    got, want = [], []
    for fast in (True, False):
        s.zero_grad()
        torch.manual_seed(3)  # the same dropout masks
        if fast:
            lp = s.score(ids, mask, "audio", feats)
        else:
            full = torch.log_softmax(s(ids, mask, "audio", feats)[:, :-1].float(), dim=-1)
            lp = full.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask[:, 1:]
        lp.sum().backward()
        (got if fast else want).append((lp.detach(), {n: p.grad.clone() for n, p in s.named_parameters()
                                                      if p.grad is not None}))
    assert torch.allclose(got[0][0], want[0][0], atol=1e-5)
    assert (got[0][0][~mask[:, 1:].bool()] == 0).all()
    for n, g in want[0][1].items():
        assert torch.allclose(got[0][1][n], g, atol=1e-5), n
    s.eval()
    flat = token_logprobs(s, ids, mask, "audio", feats)
    assert flat.shape == (int(mask[:, 1:].sum()), s.spec.text_vocab)
    full = torch.log_softmax(s(ids, mask, "audio", feats)[:, :-1].float(), dim=-1)
    assert torch.allclose(flat, full[mask[:, 1:].bool()], atol=1e-5)


def _capped(s, a: float = 1.0, b: float = 0.0, margin: float = 1.0, frame_seconds: float = 1.0):
    """The student with a length cap on audio: ceil(margin x (a + b x frames x frame_seconds)) tokens."""
    s.spec = dataclasses.replace(s.spec, length_cap={"audio": {"a": a, "b": b, "margin": margin,
                                                               "frame_seconds": frame_seconds}})
    return s


def test_each_row_stops_at_its_length_cap_as_it_would_alone():
    s = _student(5)  # rows that end after 3 to 16 tokens, and rows that loop to the 30
    feats = _features(7, seed=2)
    free = generate(s, "audio", feats, max_new_tokens=30)
    natural = free.mask.sum(1)
    _capped(s, a=1.0, b=0.5)  # cap = ceil(1 + frames / 2): 3 frames -> 3 tokens, 18 frames -> 10
    caps = torch.tensor([s.spec.decode_cap("audio", f.shape[0]) for f in feats])
    assert caps.tolist() == [int(-(-(2 + f.shape[0]) // 2)) for f in feats]
    fast, ref = _both(lambda: generate(s, "audio", feats, max_new_tokens=30))
    _same(fast, ref)
    got = fast.mask.sum(1)
    assert torch.equal(got, torch.minimum(natural, caps))  # a row stops at its cap or where it ended before
    # stopped by the cap: not finished (unless it wrote end-of-text exactly there)
    capped = natural > caps
    assert capped.any() and (~capped).any() and not fast.finished[capped].any()
    assert torch.equal(fast.finished[~capped], free.finished[~capped])
    for i, f in enumerate(feats):  # each row's tokens are those of the first caps[i] tokens of its free decode
        n = int(got[i])
        assert torch.equal(fast.tokens[i, :n], free.tokens[i, :n])
        alone = generate(s, "audio", [f], max_new_tokens=30)
        assert torch.equal(alone.tokens[0, :n], fast.tokens[i, :n]) and int(alone.mask.sum()) == n
    # max_new_tokens still bounds a row whose cap is higher; rows without features have no cap
    short = generate(s, "audio", feats, max_new_tokens=2)
    assert int(short.mask.sum(1).max()) <= 2
    assert generate(s, "text", None, n=2, max_new_tokens=9).mask.sum(1).tolist() == generate(
        _capped(_student(5), a=1.0), "text", None, n=2, max_new_tokens=9).mask.sum(1).tolist()


def test_sampled_rows_stop_at_their_caps_with_the_same_streams():
    s = _capped(_student(5), a=2.0, b=0.25)
    feats = _features(5)
    k = 3  # the phase's samples: k rows of one input draw together from its generator, and share its cap
    rows = [f for f in feats for _ in range(k)]
    gens = lambda: [g for i in range(5) for g in [torch.Generator().manual_seed(40 + i)] * k]  # noqa: E731
    fast, ref = _both(lambda: generate(s, "audio", rows, temperature=1.0, max_new_tokens=20, generator=gens()))
    _same(fast, ref)
    caps = [s.spec.decode_cap("audio", f.shape[0]) for f in rows]
    assert all(int(n) <= c for n, c in zip(fast.mask.sum(1), caps))
    for i in range(5):  # each input's k rows as a call of their own
        own = generate(s, "audio", rows[i * k:(i + 1) * k], temperature=1.0, max_new_tokens=20,
                       generator=[torch.Generator().manual_seed(40 + i)] * k)
        assert torch.equal(own.tokens, fast.tokens[i * k:(i + 1) * k, : own.tokens.shape[1]])


def test_a_decode_stopped_at_its_cap_is_a_failed_attempt_of_the_fallback():
    s = _student(5)
    feats = _features(6, seed=2)
    free = generate(s, "audio", feats, max_new_tokens=30)
    _capped(s, a=4.0)  # every row may write 4 tokens
    kw = dict(fallback=[0.5, 1.0], max_compression_ratio=1e9, max_new_tokens=30)
    details: list = []
    texts = generate_texts(s, "audio", feats, generator=torch.Generator().manual_seed(1), details=details, **kw)
    longer = (free.mask.sum(1) > 4).tolist()
    assert any(longer) and not all(longer)
    # a row that ends within its 4 tokens passes; one that reaches the cap is decoded again at the temperatures
    assert [d["fallback"] for d in details] == longer
    with reference_decoding():
        again: list = []
        assert generate_texts(s, "audio", feats, generator=torch.Generator().manual_seed(1), details=again,
                              **kw) == texts
