"""The teachers' own scores of the student's samples: for a modality whose teacher can score a text it did not write
(Teacher.caption_scores: the CLIP-style image teacher's zero-shot log-probability of a caption for its image), that
score joins the sample's reward, the way the Whisper teacher's log-likelihood of a transcript joins the audio
samples' through the audio judge's body. A frozen function of (text, input): nothing here learns."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from modalities.base import Teacher
from stages.adversarial.rows import Rows


class TeacherScores:
    """weight * teacher.caption_scores(text, features) for the rows of each modality in `teachers`."""

    def __init__(self, teachers: dict[str, Any], weight: float):
        self.teachers, self.weight = dict(teachers), float(weight)

    @staticmethod
    def build(modalities: Sequence[str], adapter_of, device, weight: float, skip: Sequence[str] = ()) -> "TeacherScores":
        """The teachers of `modalities` (less `skip`: the Whisper-labelled one, scored by its judge's body) that
        can score a text; `adapter_of(m)` gives a modality's adapter. weight 0: none is built."""
        teachers = {}
        if weight > 0:
            for m in modalities:
                if m in skip:
                    continue
                t = adapter_of(m).build_teacher(device, top_k=0, store_features=False)
                if type(t).caption_scores is not Teacher.caption_scores:  # the base scores nothing
                    teachers[m] = t
        return TeacherScores(teachers, weight)

    @property
    def modalities(self) -> list[str]:
        return sorted(self.teachers)

    @torch.no_grad()
    def __call__(self, rows: Rows, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [N], scored [N] 0/1) of the rows, whose decoded texts are `texts`: weight * the teacher's score
        where the row's modality has a scoring teacher and features, else 0 (and scored 0)."""
        device = rows.input_ids.device
        scores = torch.zeros(len(rows), device=device)
        scored = torch.zeros(len(rows), device=device)
        for m, t in self.teachers.items():
            idx = [i for i, mm in enumerate(rows.modality) if mm == m and rows.features[i] is not None]
            if not idx:
                continue
            feats = torch.stack([rows.features[i].float() for i in idx])
            s = t.caption_scores([texts[i] for i in idx], feats)
            at = torch.tensor(idx, device=device)
            scores[at] = self.weight * s.to(device=device, dtype=scores.dtype)
            scored[at] = 1.0
        return scores, scored
