"""The discriminators of the adversarial stage: one per modality, reading the features of a real input and a
text, and saying, token by token, whether the text is the teacher's (real) or the student's (generated).

The body is a language model that already reads the input (the reward-model habit of RLHF: start the judge from
a network that knows the task): the Whisper teacher's whole decoder for the modality it labelled (built by the
adversarial stage), else a copy of the distilled student. It stays frozen; a linear head on its last hidden
states, started at zero, learns. Each token's logit is the head's plus lm_scale (learned, from 1) times the
body's own log-probability of that token given its prefix and the input: with the teacher's decoder as the
body, that is the teacher-likelihood half of the Bayes-optimal discriminator's log p_teacher - log p_student.

Logits are causal: entry t judges y_1 .. y_t and nothing after it. A checkpoint is self-describing:
<name>.safetensors (the head and lm_scale) beside <name>.json (DiscriminatorSpec) and the body as a student
folder <name>.student/. The small from-scratch transformer judge is retired (git tag arms-2026-12).
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

from pipeline.files import atomic_write_text


@dataclass
class DiscriminatorSpec:
    """Everything needed to rebuild a Discriminator around its saved weights."""

    modality: str  # the modality whose inputs it reads
    vocab_size: int  # token ids it reads (the student's text vocabulary)
    feature_dim: int  # D of the features (0: unconditional, e.g. plain text)
    max_text_len: int = 128  # text positions (bos included) it is asked to judge at most
    backbone: str = "student"  # the body is a student-layout model (a copy of the student, or the teacher's decoder)
    lm_score: bool = True  # add lm_scale * log p_body(token | its prefix, input) to the head's logit
    # what the head reads: input (the body's states given the input and the text) | text (given the text alone:
    # the body is run a second time on blanked features) | none (no head: its logit is 0)
    head_reads: str = "input"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(path: Path) -> "DiscriminatorSpec":
        raw = json.loads(path.read_text())
        if raw.get("backbone", "transformer") != "student":
            raise ValueError(f"{path}: a {raw.get('backbone', 'transformer')!r} discriminator; this version judges "
                             "with a language-model body only (the small transformer judge is at git tag arms-2026-12)")
        names = {f.name for f in dataclasses.fields(DiscriminatorSpec)}
        return DiscriminatorSpec(**{k: v for k, v in raw.items() if k in names})


class Discriminator(nn.Module):
    """D_m(features, text) -> a logit per text token. Shapes: B rows, L text positions (bos first)."""

    def __init__(self, spec: DiscriminatorSpec, body: nn.Module):
        super().__init__()
        if body is None:
            raise ValueError("a discriminator needs the body it judges with (a student-layout model)")
        self.spec = spec
        self.body = body
        self.head = nn.Linear(body.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if spec.lm_score:
            self.lm_scale = nn.Parameter(torch.ones(()))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                features: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """input_ids [B, L] (bos y_1 .. y_n, right-padded), attention_mask [B, L] (1 on tokens), features: B
        rows [T_i, D] or None (ignored by an unconditional discriminator). Returns logits [B, L-1]: entry t
        judges input_ids[:, 1: t+2] (the text up to token t+1), aligned with Student.score's log-probs."""
        out, lp = self._body_parts(input_ids, attention_mask, features)
        return out if lp is None else out + self.lm_scale * lp.to(out.dtype)

    def _body_parts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    features: Sequence[torch.Tensor | None] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's logits [B, L-1] and (lm_score) the body's log-prob of each judged token."""
        feats = None if self.spec.feature_dim <= 0 or features is None else [
            f.to(self.device, torch.float32).reshape(-1, self.spec.feature_dim) for f in features]
        h = self.body.hidden(input_ids, attention_mask, self.spec.modality, feats)
        if self.spec.head_reads == "none":
            out = h.new_zeros(h.shape[:2])[:, 1:]
        elif self.spec.head_reads == "text" and feats is not None:
            blank = [torch.zeros_like(f) for f in feats]  # the same shapes, no input in them
            out = self.head(self.body.hidden(input_ids, attention_mask, self.spec.modality, blank)).squeeze(-1)[:, 1:]
        else:
            out = self.head(h).squeeze(-1)[:, 1:]
        if not self.spec.lm_score:
            return out, None
        # entry t judges token t + 1; the body's prediction of it is read at position t, at the text's tokens
        # only (the output layer is vocabulary-wide; a padding position's entry is 0 and never read)
        keep = attention_mask[:, 1:].bool()
        lp = torch.zeros(keep.shape, dtype=torch.float32, device=h.device)
        logp = torch.log_softmax(self.body.head(h[:, :-1][keep]).float(), dim=-1)
        lp[keep] = logp.gather(-1, input_ids[:, 1:][keep].clamp(max=logp.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        return out, lp

    def sequence_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        features: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """One logit per row [B]: the head's logit at its last token (which has read the whole text) plus, with
        lm_score, lm_scale * sum_t log p_body(y_t), the body's log-likelihood of the whole row. (Not the mean
        per token: a sample that leaves out its least likely words raises its mean, and a student rewarded by
        the mean learns deletions; docs/history.md.)"""
        return self.judge(input_ids, attention_mask, features)[1]

    def head_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    features: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """The learned head's part of sequence_scores alone [B]: its logit at each row's last token, without the
        body's likelihood (what the judge has learned, apart from what its body already knew)."""
        return sequence_logits(self._body_parts(input_ids, attention_mask, features)[0], attention_mask)

    def judge(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              features: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's token logits [B, L-1] and sequence_scores' row scores [B] from one pass of the body (the
        discriminator's loss trains on the first and logs its accuracy and ranking on the second)."""
        head, lp = self._body_parts(input_ids, attention_mask, features)
        if lp is None:
            return head, sequence_logits(head, attention_mask)
        total = (lp * attention_mask[:, 1:].to(lp.dtype)).sum(1)
        return (head + self.lm_scale * lp.to(head.dtype),
                sequence_logits(head, attention_mask) + self.lm_scale * total.to(head.dtype))


def sequence_logits(token_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The logit at each row's last token (it has seen the whole text): [B, L-1], [B, L] -> [B]."""
    last = (attention_mask[:, 1:].sum(1) - 1).clamp_min(0)
    return token_logits.gather(1, last.unsqueeze(1)).squeeze(1)


def build_discriminator(spec: DiscriminatorSpec, body: nn.Module, device: str | torch.device = "cpu") -> Discriminator:
    """A new discriminator judging with `body` (a copy of the distilled student, or the teacher's decoder)."""
    return Discriminator(spec, body).to(device)


def save_discriminators(discs: dict[str, Discriminator], directory: str | os.PathLike) -> Path:
    """<directory>/<name>.safetensors + <name>.json for every discriminator (name: its modality)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, d in discs.items():
        d = getattr(d, "module", d)
        tmp = directory / f".tmp-{name}.safetensors"
        from stages.models.student import save_student

        save_student(d.body, directory / f"{name}.student")
        state = {k: v for k, v in d.state_dict().items() if not k.startswith("body.")}
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
    from stages.models.student import load_student

    for js in specs:
        spec = DiscriminatorSpec.from_json(js)
        d = Discriminator(spec, load_student(directory / f"{js.stem}.student", device))
        missing, unexpected = d.load_state_dict(load_file(str(js.with_suffix(".safetensors"))), strict=False)
        if unexpected or any(not k.startswith("body.") for k in missing):
            raise ValueError(f"{js.with_suffix('.safetensors')}: does not match {js.name} "
                             f"(unexpected {unexpected}, missing {[k for k in missing if not k.startswith('body.')]})")
        out[js.stem] = d.to(device).eval()
    return out
