"""The discriminators of the adversarial stage: one small transformer per modality that reads the features of
a real input and a text, and says, token by token, whether the text is the teacher's (real) or the
student's (generated).

Layout of one row:  [f_1 .. f_F | bos y_1 .. y_n]
    f_i     the input's features [T, D] average-pooled to at most F frames, projected to d_model (the same
            features the student is conditioned on); none for modalities without features (text)
    text    the student's token ids, with learned positions

Attention: feature positions see the features only; text position t sees every feature and the text up to
t (causal), so the logit at t judges y_1 .. y_t and nothing after it. That per-token logit is the dense
reward of the policy gradient (ScratchGAN); the logit at the last token, which has seen the whole text, is
the sequence's. A checkpoint is self-describing: <name>.safetensors beside <name>.json (DiscriminatorSpec).

backbone `student` (the reward-model habit of RLHF: start the judge from the policy's own network): the body is
a copy of the distilled student, which already reads the real input through its own conditioning (for the
cross_attention student, every frame of the Whisper encoder states) and knows the text; a linear head on its
last hidden states, started at zero (D = 0.5 everywhere), gives the per-token logits. Its body is saved as a
student folder <name>.student/ beside <name>.safetensors (the head).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import UserError
from pipeline.files import atomic_write_text
from stages.student import pool_frames


@dataclass
class DiscriminatorSpec:
    """Everything needed to rebuild a Discriminator around its saved weights."""

    modality: str  # the modality whose inputs it reads
    vocab_size: int  # token ids it reads (the student's text vocabulary)
    feature_dim: int  # D of the features (0: unconditional, e.g. plain text)
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    max_text_len: int = 128  # text positions (bos included)
    feature_frames: int = 32  # features are average-pooled to at most this many frames
    backbone: str = "transformer"  # transformer (small, from scratch) | student (a copy of the distilled student)
    # backbone student: add lm_scale * log p_body(token | its prefix, input), the body's own language-model
    # score of each judged token, to the head's logit (lm_scale learned, from 1). With the teacher's decoder as
    # the body that term is the teacher's log-likelihood: log p_data of the Bayes-optimal discriminator's
    # log p_data - log p_student, with p_data the teacher's distribution, which the head corrects.
    lm_score: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


class Discriminator(nn.Module):
    """D_m(features, text) -> a logit per text token. Shapes: B rows, L text positions (bos first)."""

    def __init__(self, spec: DiscriminatorSpec, body: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        if spec.backbone == "student":
            if body is None:
                raise ValueError("a student-backbone discriminator needs the student it starts from")
            self.body = body
            self.head = nn.Linear(body.d_model, 1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            if spec.lm_score:
                self.lm_scale = nn.Parameter(torch.ones(()))
            return
        if spec.lm_score:
            raise UserError("adversarial.disc_lm_score needs a discriminator built on a language model "
                            "(disc_backbone: student or teacher)")
        if spec.backbone != "transformer":
            raise UserError(f"adversarial.disc_backbone must be transformer or student, got {spec.backbone!r}")
        self.body = None
        if spec.d_model % spec.heads:
            raise UserError(f"adversarial.disc_d_model={spec.d_model} is not a multiple of disc_heads={spec.heads}")
        d = spec.d_model
        self.tok_emb = nn.Embedding(spec.vocab_size, d)
        self.pos_emb = nn.Embedding(spec.max_text_len, d)
        if spec.feature_dim > 0:
            self.feat_proj = nn.Sequential(nn.LayerNorm(spec.feature_dim), nn.Linear(spec.feature_dim, d))
            self.feat_pos = nn.Embedding(spec.feature_frames, d)
        self.drop = nn.Dropout(spec.dropout)
        layer = nn.TransformerEncoderLayer(d, spec.heads, 4 * d, spec.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, d_model] (what the gradient penalty differentiates against)."""
        return self.tok_emb(input_ids)

    def _features(self, features: Sequence[torch.Tensor | None], b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [T_i, D] -> (projected [B, F, d], valid mask [B, F]). A row without features gets one zero
        frame, so that no position is left with nothing to attend to."""
        rows = []
        for f in features if features is not None else [None] * b:
            if f is None:
                f = torch.zeros(1, self.spec.feature_dim, device=self.device)
            rows.append(pool_frames(f.to(self.device, torch.float32).reshape(-1, self.spec.feature_dim),
                                    self.spec.feature_frames))
        t = max(r.shape[0] for r in rows)
        x = rows[0].new_zeros(b, t, self.spec.feature_dim)
        mask = torch.zeros(b, t, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            x[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        pos = self.feat_pos(torch.arange(t, device=self.device))
        return self.feat_proj(x) + pos, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                features: Sequence[torch.Tensor | None] | None = None,
                token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] (bos y_1 .. y_n, right-padded), attention_mask [B, L] (1 on tokens), features: B
        rows [T_i, D] or None (ignored by an unconditional discriminator), token_embeds: [B, L, d_model] to
        use instead of embed(input_ids). Returns logits [B, L-1]: entry t judges input_ids[:, 1: t+2] (the
        text up to token t+1), aligned with Student.score's log-probs."""
        b, L = input_ids.shape
        if self.body is not None:
            if token_embeds is not None:
                raise ValueError("a student-backbone discriminator takes no token_embeds (no gradient penalty)")
            out, lp = self._body_parts(input_ids, attention_mask, features)
            return out if lp is None else out + self.lm_scale * lp.to(out.dtype)
        if L > self.spec.max_text_len:
            raise ValueError(f"{L} text positions; this discriminator holds {self.spec.max_text_len}")
        tok = token_embeds if token_embeds is not None else self.embed(input_ids)
        x = tok + self.pos_emb(torch.arange(L, device=tok.device))
        pad = attention_mask == 0
        n_feat = 0
        if self.spec.feature_dim > 0:
            fx, fmask = self._features(features, b)
            n_feat = fx.shape[1]
            x = torch.cat([fx.to(x.dtype), x], dim=1)
            pad = torch.cat([~fmask, pad], dim=1)
        S = n_feat + L
        # True = may not attend. Features see features; text sees features and text up to itself.
        block = torch.ones(S, S, dtype=torch.bool, device=x.device)
        block[:, :n_feat] = False
        block[n_feat:, n_feat:] = torch.triu(torch.ones(L, L, dtype=torch.bool, device=x.device), diagonal=1)
        h = self.encoder(self.drop(x), mask=block, src_key_padding_mask=pad)
        logits = self.head(self.norm(h[:, n_feat:])).squeeze(-1)  # [B, L]
        return logits[:, 1:]


    def _body_parts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    features: Sequence[torch.Tensor | None] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A body backbone's head logits [B, L-1] and (lm_score) the body's log-prob of each judged token."""
        feats = None if self.spec.feature_dim <= 0 or features is None else [
            f.to(self.device, torch.float32).reshape(-1, self.spec.feature_dim) for f in features]
        h = self.body.hidden(input_ids, attention_mask, self.spec.modality, feats)
        out = self.head(h).squeeze(-1)[:, 1:]
        if not self.spec.lm_score:
            return out, None
        # entry t judges token t + 1; the body's prediction of it is read at position t
        lp = torch.log_softmax(self.body.head(h[:, :-1]).float(), dim=-1)
        return out, lp.gather(-1, input_ids[:, 1:].clamp(max=lp.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)

    def sequence_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        features: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """One logit per row [B]: the logit at its last token (which has read the whole text), except that with
        lm_score the body's term is its log-likelihood of the whole row rather than of the last token alone:
        head(last) + lm_scale * sum_t log p_body(y_t). (Not the mean per token: a sample that leaves out its
        least likely words raises its mean, and a student rewarded by the teacher's mean log-prob learned
        deletions: seed 1's val WER 12.4% -> 32.8% in 10 steps.)"""
        return self.judge(input_ids, attention_mask, features)[1]

    def judge(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              features: Sequence[torch.Tensor | None] | None = None,
              token_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's token logits [B, L-1] and sequence_scores' row scores [B] from one pass of the body (the
        discriminator's loss trains on the first and logs its accuracy and ranking on the second)."""
        if self.body is None or not self.spec.lm_score:
            logits = self(input_ids, attention_mask, features, token_embeds)
            return logits, sequence_logits(logits, attention_mask)
        if token_embeds is not None:
            raise ValueError("a student-backbone discriminator takes no token_embeds (no gradient penalty)")
        head, lp = self._body_parts(input_ids, attention_mask, features)
        total = (lp * attention_mask[:, 1:].to(lp.dtype)).sum(1)
        return (head + self.lm_scale * lp.to(head.dtype),
                sequence_logits(head, attention_mask) + self.lm_scale * total.to(head.dtype))


def sequence_logits(token_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The logit at each row's last token (it has seen the whole text): [B, L-1], [B, L] -> [B]."""
    last = (attention_mask[:, 1:].sum(1) - 1).clamp_min(0)
    return token_logits.gather(1, last.unsqueeze(1)).squeeze(1)


def build_discriminator(spec: DiscriminatorSpec, device: str | torch.device = "cpu",
                        student: nn.Module | None = None) -> Discriminator:
    """A new discriminator; backbone student: `student` (a copy of the distilled student) becomes its body."""
    return Discriminator(spec, student).to(device)


def save_discriminators(discs: dict[str, Discriminator], directory: str | os.PathLike) -> Path:
    """<directory>/<name>.safetensors + <name>.json for every discriminator (name: its modality)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, d in discs.items():
        d = getattr(d, "module", d)
        tmp = directory / f".tmp-{name}.safetensors"
        state = d.state_dict()
        if d.body is not None:
            from stages.student import save_student

            save_student(d.body, directory / f"{name}.student")
            state = {k: v for k, v in state.items() if not k.startswith("body.")}
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        os.replace(tmp, directory / f"{name}.safetensors")
        atomic_write_text(directory / f"{name}.json", d.spec.to_json() + "\n")
    return directory


def load_discriminators(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Discriminator]:
    """Every discriminator saved by save_discriminators in `directory`, by name, in eval mode."""
    directory = Path(directory)
    specs = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not specs:
        raise FileNotFoundError(f"no discriminator in {directory}")
    out = {}
    for js in specs:
        spec = DiscriminatorSpec(**json.loads(js.read_text()))
        if spec.backbone == "student":
            from stages.student import load_student

            d = Discriminator(spec, load_student(directory / f"{js.stem}.student", device))
            missing, unexpected = d.load_state_dict(load_file(str(js.with_suffix(".safetensors"))), strict=False)
            if unexpected or any(not k.startswith("body.") for k in missing):
                raise ValueError(f"{js.with_suffix('.safetensors')}: does not match {js.name} "
                                 f"(unexpected {unexpected}, missing {[k for k in missing if not k.startswith('body.')]})")
        else:
            d = Discriminator(spec)
            d.load_state_dict(load_file(str(js.with_suffix(".safetensors"))))
        out[js.stem] = d.to(device).eval()
    return out
