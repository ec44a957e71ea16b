"""The pseudo-labelled data as the student sees it: tokenised examples, and a batch sampler that mixes
modalities by weight with a saveable state (lingua style: a resumed run draws exactly the batches the
uninterrupted run would have drawn, without replaying any).

Row layout (see stages.models.student): input_ids = bos y_1 .. y_n eot; the targets are y_1 .. y_n eot. A label
longer than max_text_tokens is cut to max_text_tokens and gets no eot (the student must not learn to stop
mid-sentence); `truncated` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modalities.base import features_of
from stages.pseudo_label import read_labelled
from stages.models.student import TextTokenizer, pool_frames


@dataclass
class Example:
    key: str
    modality: str
    split: str  # train | val | test | augmented | pool
    text: str  # the pseudo-label
    targets: list[int]  # y_1 .. y_n (+ eot unless truncated)
    teacher: str  # the teacher's name, from the record
    features: torch.Tensor | None = None  # [T, D] float16 (cast to float32 per batch, to keep memory low)
    topk_ids: torch.Tensor | None = None  # [n_kd, k] int64: the teacher's top-k at targets[:n_kd]
    topk_logprobs: torch.Tensor | None = None  # [n_kd, k] float32
    reference: str | None = None


@dataclass
class LabelledData:
    splits: dict[str, list[Example]]  # train / val / test
    feature_dims: dict[str, int]  # modality -> D (0: no features)
    teachers: dict[str, list[str]]  # modality -> teacher names seen
    counts: dict[str, int] = field(default_factory=dict)  # examples, kd_examples, truncated, ...

    def modalities(self) -> list[str]:
        return sorted(self.feature_dims)


def load_labelled(stage_dir: Path, tokenizer: TextTokenizer, max_text_tokens: int,
                  splits: tuple[str, ...] = ("train", "val", "test"), max_frames: int | None = None,
                  modalities: list[str] | None = None) -> LabelledData:
    """Every labelled sample of the pseudo_label stage directory, tokenised.

    max_frames: features longer than this are average-pooled over time to it (the prefix style pools them
    anyway; None keeps them whole). Top-k arrays are kept only where they are aligned with our tokens: the
    tokenizer is the teacher's (Whisper) and the teacher's own tokens decode to the label.
    """
    out = LabelledData({s: [] for s in splits}, {}, {})
    counts = {"examples": 0, "kd_examples": 0, "truncated": 0, "empty": 0, "chunked": 0}
    whisper_tok = tokenizer.spec["kind"] == "whisper"
    for modality, rec, _, _, arrays in read_labelled(stage_dir, modalities, tuple(splits)):
        text = str(rec.get("text") or "")
        teacher = (rec.get("teacher") or {}).get("name", "")
        feats = features_of(arrays)
        dim = int(feats.shape[-1]) if feats is not None and feats.size else 0
        out.feature_dims[modality] = max(out.feature_dims.get(modality, 0), dim)
        names = out.teachers.setdefault(modality, [])
        if teacher and teacher not in names:
            names.append(teacher)

        teacher_tokens, topk_ids, topk_lp = None, None, None
        tt = arrays.get("tokens")
        if whisper_tok and teacher.startswith("whisper") and tt is not None and len(tt):
            toks = [int(t) for t in tt]
            # The teacher's tokens are used only when they are the label (not a reference put in its place)
            # and only text ids: then its top-k rows line up with our targets one for one.
            if all(t < tokenizer.eot for t in toks) and tokenizer.decode(toks) == text.strip():
                teacher_tokens = toks
                if "topk_ids" in arrays and len(arrays["topk_ids"]) == len(toks):
                    topk_ids = torch.from_numpy(arrays["topk_ids"].astype(np.int64))
                    topk_lp = torch.from_numpy(arrays["topk_logprobs"].astype(np.float32))
        f = None
        if feats is not None and feats.size:
            f = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float16)).reshape(-1, feats.shape[-1])
        key = str(rec.get("key", ""))
        pieces = _chunks(rec, arrays, text, teacher_tokens, f)
        counts["chunked"] += len(pieces) > 1
        for j, (ptext, (ta, tb), (fa, fb)) in enumerate(pieces):
            targets = teacher_tokens[ta:tb] if teacher_tokens is not None else tokenizer.encode(ptext)
            p_ids = topk_ids[ta:tb] if topk_ids is not None else None
            p_lp = topk_lp[ta:tb] if topk_lp is not None else None
            if not targets:
                counts["empty"] += 1  # nothing to learn but "stop": kept, it teaches the eot after a marker
            if len(targets) > max_text_tokens:
                targets = targets[:max_text_tokens]
                counts["truncated"] += 1
                if p_ids is not None:
                    p_ids, p_lp = p_ids[:max_text_tokens], p_lp[:max_text_tokens]
            else:
                targets = targets + [tokenizer.eot]
            pf = None if f is None else f[fa:fb]
            if pf is not None and max_frames is not None and pf.shape[0] > max_frames:
                pf = pool_frames(pf.float(), max_frames).half()
            ex = Example(key=key if len(pieces) == 1 else f"{key}#{j}", modality=modality, split=rec["split"],
                         text=ptext, targets=targets, teacher=teacher, features=pf, topk_ids=p_ids,
                         topk_logprobs=p_lp, reference=rec.get("reference") if len(pieces) == 1 else None)
            out.splits[rec["split"]].append(ex)
            counts["examples"] += 1
            counts["kd_examples"] += p_ids is not None
    for s in splits:
        out.splits[s].sort(key=lambda e: (e.modality, e.key))  # shard order may change; this order does not
    out.counts = counts
    return out


def _chunks(rec: dict, arrays: dict, text: str, tokens: list[int] | None,
            features: torch.Tensor | None) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """The pieces one labelled sample trains as: (text, token range, feature-frame range) each. A long clip
    the teacher labelled chunk by chunk (info.chunk_texts, arrays chunk_tokens and chunk_frames) gives one
    piece per chunk, when its label is the teacher's own (the chunks' texts join to it) and the arrays agree;
    anything else is one piece, whole. Token ranges index the teacher's tokens (None: the piece's text is
    tokenised instead)."""
    whole = [(text, (0, len(tokens) if tokens is not None else 0), (0, 0 if features is None else features.shape[0]))]
    texts = (rec.get("info") or {}).get("chunk_texts")
    n_tok, n_frames = arrays.get("chunk_tokens"), arrays.get("chunk_frames")
    if not texts or n_tok is None or len(texts) < 2 or len(n_tok) != len(texts):
        return whole
    if " ".join(t for t in texts if t) != text.strip():
        return whole  # the label is not the teacher's (a reference took its place)
    if tokens is not None and int(np.sum(n_tok)) != len(tokens):
        return whole
    if features is not None and (n_frames is None or len(n_frames) != len(texts)
                                 or int(np.sum(n_frames)) != features.shape[0]):
        return whole
    tb = np.concatenate([[0], np.cumsum(n_tok)]).astype(int)
    fb = np.concatenate([[0], np.cumsum(n_frames)]).astype(int) if features is not None else np.zeros(len(texts) + 1, int)
    return [(str(texts[j]), (int(tb[j]), int(tb[j + 1])), (int(fb[j]), int(fb[j + 1]))) for j in range(len(texts))]


def within_context(examples: list[Example], spec) -> tuple[list[Example], int]:
    """The examples a student with StudentSpec `spec` can learn from whole, and how many it cannot: a
    cross_attention decoder reads at most spec.source_frames frames, and a clip longer than that that was not
    split into the teacher's chunks (see _chunks) has a label that does not belong to its first window alone
    (Distil-Whisper also trains on <= 30 s segments). Generation windows such clips instead
    (stages.models.generation.feature_windows)."""
    if spec.style != "cross_attention":
        return list(examples), 0
    kept = [e for e in examples if e.features is None or e.features.shape[0] <= spec.source_frames]
    return kept, len(examples) - len(kept)


# -------------------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """A collated batch. B rows, L = longest row, T = longest feature sequence of the batch."""

    input_ids: torch.Tensor  # [B, L] bos y.. eot, right-padded with eot
    attention_mask: torch.Tensor  # [B, L] 1 on tokens
    modality: list[str]  # [B]
    features: list[torch.Tensor | None]  # B rows of [T_i, D_m] float32, or None
    topk_ids: torch.Tensor | None  # [B, L-1, k] aligned with input_ids[:, 1:] (0 where kd_mask is 0)
    topk_logprobs: torch.Tensor | None  # [B, L-1, k]
    kd_mask: torch.Tensor | None  # [B, L-1] 1 where the teacher's top-k is known

    @property
    def n_targets(self) -> int:
        return int(self.attention_mask[:, 1:].sum())


def collate(examples: list[Example], bos: int, pad: int, device: str | torch.device = "cpu") -> Batch:
    """Examples -> Batch on `device` (features cast to float32)."""
    L = 1 + max(len(e.targets) for e in examples)
    ids = torch.full((len(examples), L), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, 0] = bos
        ids[i, 1: 1 + len(e.targets)] = torch.tensor(e.targets, dtype=torch.long)
        mask[i, : 1 + len(e.targets)] = 1
    topk_ids = topk_lp = kd_mask = None
    k = next((e.topk_ids.shape[1] for e in examples if e.topk_ids is not None), 0)
    if k:
        topk_ids = torch.zeros((len(examples), L - 1, k), dtype=torch.long)
        topk_lp = torch.zeros((len(examples), L - 1, k), dtype=torch.float32)
        kd_mask = torch.zeros((len(examples), L - 1), dtype=torch.float32)
        for i, e in enumerate(examples):
            if e.topk_ids is not None and e.topk_ids.shape[1] == k:
                n = e.topk_ids.shape[0]
                topk_ids[i, :n], topk_lp[i, :n], kd_mask[i, :n] = e.topk_ids, e.topk_logprobs, 1.0
        topk_ids, topk_lp, kd_mask = topk_ids.to(device), topk_lp.to(device), kd_mask.to(device)
    feats = [e.features.to(device=device, dtype=torch.float32) if e.features is not None else None for e in examples]
    return Batch(ids.to(device), mask.to(device), [e.modality for e in examples], feats, topk_ids, topk_lp, kd_mask)


class MixtureSampler:
    """Global batches of train examples: each row's modality is drawn by weight, then the next example of
    that modality's shuffled order (a fresh permutation, keyed by seed, modality and epoch, when one runs
    out). The state (RNG, and per modality epoch and position) is small and restores exactly.
    repeats: how many times each example enters every epoch of its modality's order (None: once each)."""

    def __init__(self, examples: list[Example], batch_size: int, weights: dict[str, float], seed: int,
                 repeats: list[int] | None = None):
        self.batch_size, self.seed = batch_size, seed
        if repeats is not None and (len(repeats) != len(examples) or min(repeats, default=1) < 1):
            raise ValueError("repeats needs one count of 1 or more per example")
        by_mod: dict[str, list[int]] = {}
        for i, e in enumerate(examples):
            by_mod.setdefault(e.modality, []).extend([i] * (1 if repeats is None else int(repeats[i])))
        self.modalities = [m for m in sorted(by_mod) if float(weights.get(m, 1.0)) > 0]
        if not self.modalities:
            raise ValueError("no train examples in any modality with a positive weight")
        self.indices = {m: by_mod[m] for m in self.modalities}
        w = np.array([float(weights.get(m, 1.0)) for m in self.modalities])
        self.probs = w / w.sum()
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.pos = {m: {"epoch": 0, "position": 0} for m in self.modalities}
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}

    def _perm(self, m: str, epoch: int) -> np.ndarray:
        key = (m, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != m}
            salt = self.modalities.index(m)
            self._perm_cache[key] = np.random.default_rng([self.seed, salt, epoch]).permutation(len(self.indices[m]))
        return self._perm_cache[key]

    def next_batch(self) -> list[int]:
        """Indices (into the examples given at construction) of the next global batch."""
        choice = self.rng.choice(len(self.modalities), size=self.batch_size, p=self.probs)
        out = []
        for c in choice:
            m = self.modalities[int(c)]
            p = self.pos[m]
            if p["position"] >= len(self.indices[m]):
                p["epoch"], p["position"] = p["epoch"] + 1, 0
            out.append(self.indices[m][int(self._perm(m, p["epoch"])[p["position"]])])
            p["position"] += 1
        return out

    def state_dict(self) -> dict:
        st = self.rng.bit_generator.state
        # 128-bit integers as strings: the checkpoint's state.pt is read with weights_only=True.
        rng = {"bit_generator": st["bit_generator"], "state": str(st["state"]["state"]), "inc": str(st["state"]["inc"]),
               "has_uint32": int(st["has_uint32"]), "uinteger": int(st["uinteger"])}
        return {"rng": rng, "modalities": {m: dict(p) for m, p in self.pos.items()}}

    def load_state_dict(self, state: dict) -> None:
        r = state["rng"]
        self.rng.bit_generator.state = {"bit_generator": r["bit_generator"],
                                        "state": {"state": int(r["state"]), "inc": int(r["inc"])},
                                        "has_uint32": r["has_uint32"], "uinteger": r["uinteger"]}
        for m, p in state["modalities"].items():
            if m in self.pos:
                self.pos[m] = {"epoch": int(p["epoch"]), "position": int(p["position"])}

    @property
    def epoch(self) -> float:
        """Epochs done, averaged over modalities (for logs)."""
        return float(np.mean([p["epoch"] + p["position"] / len(self.indices[m]) for m, p in self.pos.items()]))
