"""A toy modality that lives in a test file only: vibration time series (.vib: little-endian float32 samples)
with a trivial teacher that calls a signal "steady" or "shaking" by its variance. Registered as a plugin:
no edit to pipeline/ or stages/."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from modalities.base import Label, Modality, ModalityConfig, Teacher, TeacherConfig, register_modality
from pipeline.errors import BadInput


@dataclass
class VibrationConfig(ModalityConfig):
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(kind="variance"))
    threshold: float = 0.5  # variance above which the signal is "shaking"


class VarianceTeacher(Teacher):
    name = "variance"
    feature_dim = 2

    def __init__(self, threshold):
        self.threshold = threshold

    def label(self, batch):
        out = []
        for x in batch:
            v = float(x.var())
            word = "shaking" if v > self.threshold else "steady"
            feats = np.array([[x.mean(), v]], dtype=np.float16)
            out.append(Label(text=f"the machine is {word}", info={"variance": v}, arrays={"features": feats}))
        return out


@register_modality("vibration")
class Vibration(Modality):
    description = "toy vibration series (tests only)"
    extensions = ("vib",)
    manifest_field = "file"
    reference_field = "state"
    Config = VibrationConfig

    def decode(self, data, ext):
        if len(data) == 0 or len(data) % 4:
            raise BadInput("not a float32 series")
        x = np.frombuffer(data, dtype="<f4")
        if not np.isfinite(x).all():
            raise BadInput("NaN or infinite samples")
        return x

    def synthesize(self, index, rng):
        scale = 0.1 if index % 2 else 2.0
        return (rng.normal(0, scale, size=64).astype("<f4").tobytes(), "vib", "shaking" if scale > 1 else "steady")

    def build_teacher(self, device, top_k=0, store_features=True):
        return VarianceTeacher(self.cfg.threshold)
