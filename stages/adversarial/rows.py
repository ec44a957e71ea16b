"""Rows: texts about real inputs as the student and the discriminators read them, and how the phase samples them:
one random stream per input, a function of (seed, iteration, input) alone."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from stages.models.generation import generate
from stages.models.labelled_data import Example
from stages.models.student import Student


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
    """`per_input` samples of `model` about each example, and their texts. Every example's rows are decoded in
    one batch, each example's per_input rows drawing together from its own generator (generate's generator
    groups: what a call of their own would draw), so its rows never depend on which other inputs share the
    process. An example without a generator (None: the global RNG) is decoded in a call of its own. Rows come
    in consecutive groups of per_input; a row's source is its example's index in `examples`."""
    feats = [_features(e, device) for e in examples]
    out: dict[int, tuple[list, list]] = {}
    keyed = [i for i, g in enumerate(generators) if g is not None]
    calls = ([keyed] if keyed else []) + [[i] for i, g in enumerate(generators) if g is None]
    for part in calls:
        rows = [i for i in part for _ in range(per_input)]
        gens = [generators[i] for i in rows] if generators[part[0]] is not None else None
        gen = generate(model, [examples[i].modality for i in rows], [feats[i] for i in rows],
                       temperature=temperature, max_new_tokens=max_new_tokens, generator=gens)
        toks = [row[:n] for row, n in zip(gen.tokens.tolist(), gen.mask.sum(1).tolist())]
        for j, i in enumerate(part):
            sl = slice(j * per_input, (j + 1) * per_input)
            out[i] = (toks[sl], gen.texts[sl])
    seqs, texts, mods, fs, src = [], [], [], [], []
    for i, e in enumerate(examples):
        seqs += out[i][0]
        texts += out[i][1]
        mods += [e.modality] * per_input
        fs += [feats[i]] * per_input
        src += [i] * per_input
    return rows_from_tokens(seqs, mods, fs, src, model.spec.bos_id, model.spec.eot_id, device), texts


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


