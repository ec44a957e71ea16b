"""The modality contract. A modality adapter is one file in modalities/ (or in another package, found
through the `groundgan.modalities` entry-point group) that subclasses Modality and registers itself:

    @register_modality("vibration")
    class Vibration(Modality): ...

Adding one needs no edit to pipeline/ or stages/.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np

from pipeline.config import path_field, to_plain
from pipeline.errors import BadInput, UserError  # noqa: F401  (adapters raise BadInput from decode)
from pipeline.registry import modality_registry


@dataclass
class TeacherConfig:
    kind: str = "identity"  # which teacher labels this modality (each adapter lists its kinds)
    checkpoint: Optional[str] = field(default=None, metadata=path_field("weights"))  # weights: a path, a model name, or a route the adapter documents


@dataclass
class ModalityConfig:
    """Base for adapters' config dataclasses: `modalities.<name>` in the YAML."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class Label:
    """What a teacher says about one input. Arrays become `.npy` members of the pseudo-label shard."""

    text: str  # the pseudo-label
    info: dict = field(default_factory=dict)  # confidence figures and the like (JSON-able)
    arrays: dict = field(default_factory=dict)  # name -> np.ndarray: tokens, topk_ids, topk_logprobs, features


class Teacher(ABC):
    """A frozen model that labels decoded inputs of one modality, in batches."""

    name: str = "teacher"  # e.g. whisper:tiny.en
    sha256: str = ""  # of the weights, recorded in every label
    feature_dim: int = 0  # D of the features it stores (0: none)

    @abstractmethod
    def label(self, batch: list[Any]) -> list[Label]:
        """Label a batch of decoded inputs (what Modality.decode returned), one Label per input, in order."""

    def filter_reason(self, label: Label, reference: str | None, filters: Any) -> str | None:
        """Why this label should be dropped from training (None: keep). Default: never."""
        return None

    def caption_scores(self, texts: list[str], features) -> Any:
        """The teacher's own score of each text as a label of the input whose stored features are `features`
        (a float tensor [N, T, D], what its labels stored), as a log-probability: a tensor [N], higher is better.
        The adversarial phase adds it to the reward of the samples of a modality whose teacher has it (the
        analogue of the Whisper teacher's log-likelihood of a transcript). None (the default): this teacher cannot
        score a text it did not write."""
        return None

    def unusable_reason(self, label: Label) -> str | None:
        """Why this label is not the teacher's answer at all (a decode that ran away): pseudo_label drops it from
        every split, held-out ones included, with filter_reason's reason. Default: never."""
        return None


class Modality(ABC):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    extensions: ClassVar[tuple[str, ...]] = ()  # shard member extensions that hold this modality's media
    manifest_field: ClassVar[str] = ""  # key naming the file in a folder source's JSONL ("audio", "image")
    reference_field: ClassVar[str] = "text"  # key holding the reference in that JSONL
    Config: ClassVar[type] = ModalityConfig
    # its labels are transcripts: the report scores them by WER (and its insertion rate and 5-gram repeats), and
    # distill and adversarial can keep final/ by val WER
    transcribes: ClassVar[bool] = False
    # seconds of input per frame of the features its teacher stores (0: frames are not time, e.g. an image
    # embedding): the decoding cap a + b x seconds follows an input's frames (stages.models.length_cap)
    frame_seconds: ClassVar[float] = 0.0

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # ---------------------------------------------------------------------------------------- config hooks
    @classmethod
    def validate_config(cls, cfg: Any, where: str) -> None:
        """Raise UserError for what the schema cannot see (a teacher checkpoint that does not exist)."""

    @classmethod
    def decode_config(cls, cfg: Any) -> dict:
        """The part of the config that ingest's output depends on (by default all but the teacher)."""
        plain = to_plain(cfg)
        plain.pop("teacher", None)
        return plain

    # ------------------------------------------------------------------------------------------------ data
    @abstractmethod
    def decode(self, data: bytes, ext: str) -> Any:
        """Bytes of one media file -> what the teacher takes (raise BadInput with the reason)."""

    def perturb(self, x: Any, rng: np.random.Generator, copy: int) -> tuple[Any, dict] | None:
        """A perturbed copy of a decoded train input, for `pseudo_label.augment_copies`: (what the teacher
        takes, a JSON-able record of the perturbation), or None for no copy. The copy is labelled by the
        teacher like any input, so it stays tied to the real recording it came from. Default: no copies."""
        return None

    def synthesize(self, index: int, rng: np.random.Generator) -> tuple[bytes, str, str | None]:
        """For `synthetic` sources (tests): (media bytes, extension, reference or None)."""
        raise UserError(f"modality {self.name!r} has no synthetic source")

    # --------------------------------------------------------------------------------------------- teacher
    @abstractmethod
    def build_teacher(self, device: str, top_k: int = 0, store_features: bool = True) -> Teacher:
        """The frozen teacher named by cfg.teacher. top_k > 0: labels carry the teacher's top-k log-probs per
        token (arrays topk_ids [L,k] int32, topk_logprobs [L,k] float16) where the teacher has them;
        store_features: labels carry the conditioning features (array `features` [T,D] float16)."""

    # ------------------------------------------------------------------------------------------ evaluation
    def metrics(self, hyps: list[str], labels: list[str], references: list[str | None], infos: list[dict]) -> dict:
        """Modality-specific metrics of the hypotheses (see stages.evaluate for the shared text metrics)."""
        return {}


def register_modality(name: str):
    def deco(cls):
        cls.name = name
        modality_registry.add(name, cls)
        return cls

    return deco


def features_of(arrays: dict) -> np.ndarray | None:
    """The conditioning features [T, D] stored with a label, or None (text: no features)."""
    f = arrays.get("features")
    return None if f is None else np.asarray(f)


def dataclass_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
