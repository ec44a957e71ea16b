"""How many tokens a student may decode for one input: a cap of margin x (a + b x seconds) tokens, fitted on the
teacher's train labels ([Grounding proof]: no runaway on any input).

A free-running decoder that loops writes until its token limit; a limit that follows the input (a 2 s clip
holds a few words, a 30 s one a few dozen) bounds a loop to what the input could hold. The cap is fitted by the
pseudo_label stage on the train split alone (before any held-out decode), stored in its `length_cap.json`
(a product file, so in the hash of every stage downstream), copied into the distilled student's student.json
(and so into every student the phase keeps and every export), and applied by `generate` to every row that has
features: val checks, the phase's samples, evaluate, `groundgan generate`.

Per modality, from the train labels' (seconds, tokens) pairs, where tokens counts the end-of-text token too and
seconds = the feature frames the student reads x frame_seconds (0 where frames are not time, e.g. an image
embedding: the cap is then a constant):
    a, b     least squares of tokens on seconds (b >= 0; b = 0 and a = the mean where seconds do not vary)
    margin   the largest tokens / (a + b x seconds) over the train labels (every train label fits under its cap),
             at least min_margin
    cap      ceil(margin x (a + b x seconds)), at most the call's max_new_tokens
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np

# Whisper's encoder: one output frame per 20 ms of audio (50 a second)
WHISPER_FRAME_SECONDS = 0.02


def fit_length_cap(points: Iterable[tuple[float, int]], frame_seconds: float, min_margin: float = 1.5) -> Optional[dict]:
    """The cap of one modality from its train labels' (frames, tokens) pairs; None without any pair."""
    pts = [(float(f), int(n)) for f, n in points]
    if not pts:
        return None
    x = np.array([f * frame_seconds for f, _ in pts], dtype=np.float64)
    y = np.array([n for _, n in pts], dtype=np.float64)
    a, b = float(y.mean()), 0.0
    if len(pts) >= 2 and float(x.std()) > 1e-9:
        b, a = (float(v) for v in np.polyfit(x, y, 1))
        if b < 0:
            a, b = float(y.mean()), 0.0
    a = max(a, 1.0)
    base = a + b * x
    ratio = float((y / base).max())
    margin = max(float(min_margin), ratio)
    margin = math.ceil(margin * 100 - 1e-9) / 100  # two decimals, rounded up: every train label still fits
    return {"a": round(a, 6), "b": round(b, 6), "margin": margin, "frame_seconds": float(frame_seconds),
            "labels": len(pts), "max_ratio": round(ratio, 4), "longest_label": int(y.max()),
            "longest_seconds": round(float(x.max()), 3)}


def fit_examples(examples, min_margin: float) -> dict:
    """{modality: fit} from labelled examples (stages.models.labelled_data.Example: frames of its features, its
    targets with end-of-text as the tokens), each modality's frames timed by its adapter's frame_seconds."""
    from pipeline.registry import modality_registry

    fits = {}
    for m in sorted({e.modality for e in examples}):
        frame_s = modality_registry.get(m).frame_seconds if m in modality_registry else 0.0
        fit = fit_length_cap([(0 if e.features is None else e.features.shape[0], len(e.targets))
                              for e in examples if e.modality == m], frame_s, min_margin)
        if fit is not None:
            fits[m] = fit
    return fits


def cap_tokens(cap: dict, frames: int) -> int:
    """The cap (tokens, end-of-text included) of an input of `frames` feature frames."""
    seconds = frames * float(cap.get("frame_seconds", 0.0))
    return max(1, math.ceil(float(cap["margin"]) * (float(cap["a"]) + float(cap["b"]) * seconds) - 1e-9))


def constant_cap(cap: dict) -> dict:
    """The same cap as a constant at the longest train input (for a student whose frames are not the teacher's,
    e.g. a prefix student's pooled features)."""
    a = float(cap["a"]) + float(cap["b"]) * float(cap.get("longest_seconds", 0.0))
    return {**cap, "a": round(a, 6), "b": 0.0, "frame_seconds": 0.0}
