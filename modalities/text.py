"""The text modality: plain text whose teacher is the identity (the text is its own label). It keeps the
student a plain language model and gives the adversarial stage a real-text discriminator."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from modalities.base import Label, Modality, ModalityConfig, Teacher, TeacherConfig, register_modality
from pipeline.errors import BadInput, UserError

_WORDS = ("the a one every some small large red blue green quiet loud cat dog bird car tree house river "
          "sees finds likes follows near under over beside with and").split()


@dataclass
class TextConfig(ModalityConfig):
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(kind="identity"))
    max_chars: int = field(default=2000, metadata={"min": 1})  # longer texts are refused


class IdentityTeacher(Teacher):
    name = "identity"
    sha256 = ""
    feature_dim = 0

    def label(self, batch):
        return [Label(text=t, info={"confidence": 1.0}) for t in batch]


@register_modality("text")
class Text(Modality):
    description = "plain text; teacher: identity (the text is its own label); no features"
    extensions = ("txt",)
    manifest_field = "file"
    reference_field = "text"
    Config = TextConfig

    @classmethod
    def validate_config(cls, cfg, where):
        if cfg.teacher.kind != "identity":
            raise UserError(f"config: '{where}.teacher.kind' must be identity for text, got {cfg.teacher.kind!r}")

    def decode(self, data: bytes, ext: str) -> str:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput("text is not UTF-8") from None
        text = " ".join(text.split())
        if not text:
            raise BadInput("empty text")
        if len(text) > self.cfg.max_chars:
            raise BadInput(f"text longer than max_chars={self.cfg.max_chars}")
        return text

    def synthesize(self, index, rng):
        n = int(rng.integers(4, 10))
        words = [_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), size=n)]
        text = " ".join(words).capitalize() + "."
        return text.encode(), "txt", text

    def build_teacher(self, device, top_k=0, store_features=True):
        return IdentityTeacher()
