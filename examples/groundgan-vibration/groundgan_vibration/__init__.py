"""An example modality plugin: vibration time series (.vib, little-endian float32 samples) with a trivial teacher
that calls a signal "steady" or "shaking" by its variance, and a task metric of its own.

Installed (`pip install examples/groundgan-vibration`), it registers through the `groundgan.modalities` entry
point; no edit to groundgan. docs/adding-a-modality.md walks through each part."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from modalities.base import Label, Modality, ModalityConfig, Teacher, TeacherConfig, register_modality
from pipeline.errors import BadInput

STATES = ("steady", "shaking")


@dataclass
class VibrationConfig(ModalityConfig):
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(kind="variance"))
    threshold: float = 0.5  # variance above which the signal is "shaking"


class VarianceTeacher(Teacher):
    """Labels a batch of decoded series: "the machine is steady|shaking", with the series' mean and variance as
    the student's conditioning features [1, 2]."""

    name = "variance"
    feature_dim = 2

    def __init__(self, threshold: float):
        self.threshold = threshold

    def label(self, batch):
        out = []
        for x in batch:
            v = float(x.var())
            word = STATES[1] if v > self.threshold else STATES[0]
            feats = np.array([[x.mean(), v]], dtype=np.float16)
            out.append(Label(text=f"the machine is {word}", info={"variance": v}, arrays={"features": feats}))
        return out


def _state(text: str | None) -> str | None:
    """The state a text names: the last of steady / shaking it mentions."""
    words = [w.strip(".,!?").lower() for w in (text or "").split()]
    found = [w for w in words if w in STATES]
    return found[-1] if found else None


@register_modality("vibration")
class Vibration(Modality):
    description = "vibration series (.vib float32); teacher: variance threshold; features: mean and variance"
    extensions = ("vib",)
    manifest_field = "file"  # manifest lines {"file": "a.vib", "state": "steady"}
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

    def metrics(self, hyps, labels, references, infos):
        """state_agreement: the fraction of samples with a reference whose text names the reference's state (the
        task's own figure, in the report beside the shared text metrics)."""
        pairs = [(_state(h), r) for h, r in zip(hyps, references) if r in STATES]
        return {"state_agreement": sum(h == r for h, r in pairs) / len(pairs) if pairs else None}
