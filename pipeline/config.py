"""The typed config: one dataclass per stage (all five defined here) and per modality adapter (in its own
file under modalities/). YAML files merge left to right, then `key=value` overrides with dotted paths.

A field's `metadata={"min": x}` is checked after the merge; a stage section's hash covers what the stage
declares (see pipeline.graph.Stage.hash_sections), never the run-time knobs under `run:`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from pipeline.errors import UserError


def _min(x):
    return {"min": x}


# ----------------------------------------------------------------------------------------------------- ingest
@dataclass
class SourceConfig:
    type: Optional[str] = None  # folder | shards | text | synthetic; folder when `dir` is given
    modality: Optional[str] = None  # a registered modality (audio, image, text, ...); shards may mix them
    name: Optional[str] = None  # a name for the source (required for evaluate.sources)
    dir: Optional[str] = None  # folder source: the media folder (relative paths resolve from the config file's cwd)
    manifest: Optional[str] = None  # folder source: JSONL in `dir` naming each file and its reference
    urls: Optional[str] = None  # shards source: path or URL with brace expansion, e.g. data-{000..099}.tar
    allow_pipe: bool = False  # shards source: allow webdataset `pipe:` URLs (they run a shell command)
    limit: Optional[int] = field(default=None, metadata=_min(1))  # take at most this many items (sorted order)
    count: int = field(default=32, metadata=_min(1))  # synthetic source: number of samples
    references_are_labels: bool = False  # use the manifest's text as the training label instead of the teacher's


@dataclass
class SplitConfig:
    train: float = field(default=0.8, metadata=_min(0.0))  # fraction of keys, by a hash of the key
    val: float = field(default=0.1, metadata=_min(0.0))
    test: float = field(default=0.1, metadata=_min(0.0))
    # real inputs held back from distill: the teacher labels them (filtered as train), distill trains on them
    # only if distill.inputs names pool, and adversarial.inputs can: inputs the distilled student has never
    # seen, where its free-running failures (repetition loops) happen. Taken from the top of train's range.
    pool: float = field(default=0.0, metadata=_min(0.0))


@dataclass
class IngestConfig:
    sources: List[SourceConfig] = field(default_factory=list)  # where the real data comes from
    split: SplitConfig = field(default_factory=SplitConfig)  # deterministic train/val/test split by key hash
    samples_per_shard: int = field(default=64, metadata=_min(1))  # samples per output webdataset shard
    max_reject_fraction: float = field(default=0.2, metadata=_min(0.0))  # fail (exit 2) past this fraction of bad inputs


# ----------------------------------------------------------------------------------------------- pseudo_label
@dataclass
class FilterConfig:
    min_avg_logprob: Optional[float] = -1.0  # drop labels the teacher was unsure of (None: off)
    max_compression_ratio: Optional[float] = 2.4  # drop repetition loops (gzip ratio of the text)
    max_no_speech_prob: Optional[float] = 0.6  # drop windows the teacher thinks hold no speech
    max_wer: Optional[float] = 0.5  # drop labels too far from a reference, train and val splits only
    min_confidence: Optional[float] = None  # image teachers: drop labels below this top-1 probability
    splits: List[str] = field(default_factory=lambda: ["train", "val"])  # splits the filters apply to


@dataclass
class PseudoLabelConfig:
    batch_size: int = field(default=16, metadata=_min(1))  # samples per teacher call; batches never cross a shard
    filters: FilterConfig = field(default_factory=FilterConfig)
    max_reject_fraction: float = field(default=0.2, metadata=_min(0.0))  # fail past this fraction of bad inputs
    top_k: int = field(default=8, metadata=_min(0))  # store the teacher's top-k log-probs per token, for distill's KD (0: off)
    store_features: bool = True  # store the teacher's features (fp16) for the student and discriminators
    # Perturbed copies of each train input (modalities whose adapter can perturb: audio and image, see their augment_*),
    # labelled by the teacher like any input and filtered like train, kept as split `augmented`: inputs the
    # student has not memorised, for `distill.inputs` / `adversarial.inputs` to take. 0: none.
    augment_copies: int = field(default=0, metadata=_min(0))


# ---------------------------------------------------------------------------------------------------- distill
# A default of None is the recipe's choice for this run, made when the config loads (resolve_recipe): the
# measured setting wherever it applies, else the nearest valid one; `groundgan config` says which it took.
@dataclass
class StudentConfig:
    # cross_attention (Whisper decoder layers of the teacher, reading its encoder states) | prefix (projector +
    # causal LM). None: cross_attention where a modality is labelled by a Whisper teacher, else prefix
    style: Optional[str] = None
    init_from: Optional[str] = None  # a local model folder or .gguf file to start from (None: random init)
    tokenizer: str = "whisper"  # whisper (the teacher's BPE) | init_from (the tokenizer of init_from)
    d_model: int = field(default=256, metadata=_min(8))  # width of a randomly initialised student
    n_layers: int = field(default=4, metadata=_min(1))
    n_heads: int = field(default=4, metadata=_min(1))
    d_ff: int = field(default=1024, metadata=_min(8))
    prefix_len: int = field(default=8, metadata=_min(1))  # prefix embeddings per input (prefix style)
    projector: str = "mlp"  # mlp | transformer: maps features [B,T,D_m] to the prefix [B,P,d_model]
    feature_frames: int = field(default=150, metadata=_min(1))  # prefix style: features average-pooled to at most this many frames
    keep_decoder_layers: List[int] = field(default_factory=lambda: [0, -1])  # cross_attention: teacher layers copied
    # the token embeddings stay as initialised (the marker rows still learn). None: true for cross_attention
    # (the teacher's embeddings, most of its weights), false for prefix (a random or foreign init must learn)
    freeze_embeddings: Optional[bool] = None
    dropout: float = field(default=0.1, metadata=_min(0.0))


@dataclass
class DistillConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    steps: int = field(default=600, metadata=_min(0))  # optimiser steps
    batch_size: int = field(default=16, metadata=_min(1))  # global batch, whatever the world size
    grad_accum: int = field(default=1, metadata=_min(1))
    lr: float = field(default=1e-4, metadata=_min(0.0))  # peak; linear warm-up, then cosine down to 10%
    weight_decay: float = field(default=0.01, metadata=_min(0.0))
    warmup_steps: int = field(default=20, metadata=_min(0))
    grad_clip: float = field(default=1.0, metadata=_min(0.0))
    kd_weight: float = field(default=0.8, metadata=_min(0.0))  # weight of KL to the teacher's top-k log-probs (pseudo_label.top_k)
    kd_temperature: float = field(default=2.0, metadata=_min(0.01))
    max_text_tokens: int = field(default=96, metadata=_min(4))
    modality_weights: Dict[str, float] = field(default_factory=dict)  # sampling weight per modality (default 1)
    inputs: List[str] = field(default_factory=lambda: ["train"])  # pseudo_label splits trained on: train, augmented, pool
    val_every: int = field(default=50, metadata=_min(1))
    # which validation figure picks final/: val_wer (the val clips decoded as `decoding:` says, WER against
    # their labels; ties go to the lower val_loss) or val_loss (teacher-forced cross-entropy on the val labels).
    # None: val_wer where a modality transcribes (audio), else val_loss
    select_by: Optional[str] = None
    # > 0: keep an exponential moving average of the student's weights (decay per step, warmed up as
    # min(decay, (1 + t) / (10 + t))); validation, best/ and final/ use the average, training the raw weights
    ema_decay: float = field(default=0.0, metadata=_min(0.0))
    checkpoint_every: int = field(default=50, metadata=_min(1))


# ------------------------------------------------------------------------------------------------ adversarial
@dataclass
class GuardConfig:
    min_distinct_2: Optional[float] = None  # stop when samples' distinct-2 falls below this
    max_self_bleu_4: Optional[float] = None  # stop when samples' self-BLEU-4 rises above this
    max_kl: Optional[float] = None  # stop when KL(student || reference) per token rises above this
    # stop when the samples' mean length over the real side's (the teacher's labels of the same inputs) falls below
    # this: a reward that pays for leaving words out ("nobody is available ..." -> "no") shortens the samples first
    min_length_ratio: Optional[float] = None


@dataclass
class AdversarialConfig:
    """The phase (stages/adversarial.py's docstring has the objective): k samples per real input, judged by a
    discriminator per modality against the teacher's labels of the same inputs; one reward per sample, its
    judge's score less the student's own log-likelihood, with a leave-one-out baseline over the input's k."""

    enabled: bool = True  # false: the stage copies the distilled student through
    anchored: bool = True  # false (the ablation): the real side is the frozen distilled model's samples, no label enters
    # the pseudo_label splits the phase's inputs come from: train, augmented (perturbed copies of train inputs,
    # pseudo_label.augment_copies), pool (ingest.split.pool: real inputs distill did not train on). None: pool
    # where ingest.split.pool > 0, else train
    inputs: Optional[List[str]] = None
    steps: int = field(default=60, metadata=_min(0))  # student steps (after disc_warmup_steps)
    batch_size: int = field(default=8, metadata=_min(1))  # inputs per step
    k_samples: int = field(default=4, metadata=_min(2))  # samples per input (the leave-one-out baseline needs 2+)
    temperature: float = field(default=1.0, metadata=_min(0.01))  # the student's sampling temperature
    max_new_tokens: int = field(default=96, metadata=_min(1))  # per sample
    lr: float = field(default=3e-5, metadata=_min(0.0))  # the student's
    pg_weight: float = field(default=1.0, metadata=_min(0.0))  # the reward's term (0: the no-reward arm, CE + KL alone)
    ce_weight: float = field(default=0.5, metadata=_min(0.0))  # cross-entropy on the pseudo-labels (0 when unanchored)
    kl_weight: float = field(default=0.1, metadata=_min(0.0))  # exact KL to the frozen distilled reference
    grad_clip: float = field(default=1.0, metadata=_min(0.0))
    # the audio judge: teacher (the Whisper teacher's whole decoder, frozen, its log-likelihood in the logit and a
    # learned head) | student (a frozen copy of the distilled student with a learned head). A modality the
    # Whisper teacher did not label is judged by a copy of the student either way. None: teacher where it can
    # (an anchored run, a cross_attention student, a Whisper teacher), else student
    disc_backbone: Optional[str] = None
    disc_lr: float = field(default=3e-4, metadata=_min(0.0))
    disc_warmup_steps: int = field(default=20, metadata=_min(0))  # discriminator-only steps before the student moves
    disc_pretrain_epochs: int = field(default=2, metadata=_min(0))  # passes over every phase input (its real rows vs a sample of the distilled model) before step 0
    modality_weights: Dict[str, float] = field(default_factory=dict)  # sampling weight per modality (default 1)
    text_reward_all: bool = False  # the plain-text discriminator (modality text) also rewards every other modality's samples
    guards: GuardConfig = field(default_factory=GuardConfig)
    # which student final/ holds: val_wer (the lowest WER against the teacher's labels of the val clips, decoded
    # as `decoding:` says, checked before the first student step and every val_every student steps; the
    # distilled student itself when no step beats it) | last. None: val_wer in an anchored run where a
    # modality transcribes, else last
    select_by: Optional[str] = None
    val_every: int = field(default=10, metadata=_min(1))
    log_every: int = field(default=5, metadata=_min(1))
    checkpoint_every: int = field(default=20, metadata=_min(1))


# ---------------------------------------------------------------------------------------------------- decoding
@dataclass
class DecodingConfig:
    """How a student's greedy text is decoded wherever it is scored: the evaluate stage, and the val checks by
    which distill and adversarial pick final/ (they decode at most distill.max_text_tokens). Part of the hash of
    every stage that reads it."""

    max_new_tokens: int = field(default=128, metadata=_min(1))  # per piece (the evaluate stage)
    # Whisper's temperature fallback: a piece whose greedy text fails a check below is decoded again at these
    # temperatures in turn; [] = off
    fallback_temperatures: List[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0])
    # a text whose gzip compression ratio is above this is a repetition loop (Whisper: 2.4, for 30 s windows;
    # a chunk's text is shorter and compresses less)
    max_compression_ratio: float = field(default=1.6, metadata=_min(1.0))
    min_avg_logprob: Optional[float] = None  # and where its mean token log-prob is below this (Whisper: -1.0)
    # samples per piece at each fallback temperature; the passing one with the highest mean log-prob is kept (Whisper: 5)
    best_of: int = field(default=1, metadata=_min(1))
    # and where a word 4-gram occurs more than this many times in one piece (a loop too short for zlib; None: off)
    max_ngram_repeats: Optional[int] = field(default=2, metadata=_min(1))


# --------------------------------------------------------------------------------------------------- evaluate
@dataclass
class EvaluateConfig:
    splits: List[str] = field(default_factory=lambda: ["test"])  # the run's splits to evaluate (test; train and val too if asked)
    sources: List[SourceConfig] = field(default_factory=list)  # extra held-out sets, each with a `name`
    temperatures: List[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])  # the sweep; 0 is greedy (decoded as `decoding:` says)
    max_samples: Optional[int] = field(default=None, metadata=_min(1))  # per set and modality
    bootstrap: int = field(default=1000, metadata=_min(10))  # resamples for confidence intervals
    batch_size: int = field(default=16, metadata=_min(1))


# ------------------------------------------------------------------------------------------------------- run
@dataclass
class RunConfig:
    """Run-time knobs: not part of any stage's config hash."""

    keep_checkpoints: int = field(default=3, metadata=_min(1))  # newest K step checkpoints kept
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = field(default=0, metadata=_min(0))  # torch threads (0: torch's default)
    # torch.use_deterministic_algorithms (warn_only): the same run repeats to the bit at any thread count. Without
    # it, the backward of an indexed lookup (Whisper's positional embedding) sums in thread order on CPU, and two
    # 2-thread runs of the demo's adversarial phase parted after 10 student steps. false: torch's faster defaults.
    deterministic: bool = True
    progress: bool = True  # tqdm bars
    distributed_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo


@dataclass
class RootConfig:
    seed: int = 0  # seeds python, numpy and torch in every stage
    stages: List[str] = field(
        default_factory=lambda: ["ingest", "pseudo_label", "distill", "adversarial", "evaluate"]
    )  # the graph to run, in order
    plugins: List[str] = field(default_factory=list)  # modules imported first, to register stages and modalities
    run: RunConfig = field(default_factory=RunConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    modalities: Dict[str, Any] = field(default_factory=dict)  # per modality adapter, validated by its own dataclass
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    extra: Dict[str, Any] = field(default_factory=dict)  # sections of plugin stages (validated by their dataclass)


# ------------------------------------------------------------------------------------------------- loading
def _close(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _keys_at(schema: DictConfig, full_key: str) -> list[str]:
    node: Any = schema
    parts = [p for p in full_key.split(".")[:-1] if p]
    for p in parts:
        try:
            if isinstance(node, ListConfig):
                node = node[int(p.strip("[]"))] if len(node) else None
            else:
                node = node[p]
        except Exception:
            return []
        if node is None:
            return []
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _merge(schema: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, other)
    except oc_errors.ConfigKeyError as e:
        key = str(getattr(e, "key", "") or "")
        full = str(getattr(e, "full_key", "") or key)
        options = _keys_at(schema, full) or [f.name for f in dataclasses.fields(RootConfig)]
        raise UserError(f"{where}: unknown key '{full}'{_close(key.split('.')[-1], options)}") from None
    except oc_errors.ValidationError as e:
        full = getattr(e, "full_key", "") or "?"
        msg = str(e).splitlines()[0]
        raise UserError(f"{where}: wrong type at '{full}': {msg}") from None
    except oc_errors.OmegaConfBaseException as e:
        raise UserError(f"{where}: {str(e).splitlines()[0]}") from None


def _load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    return data


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            raise UserError(f"override {o!r} is not key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise UserError(f"bad override: {e}") from None


def _check_mins(obj: Any, path: str = "") -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        p = f"{path}.{f.name}" if path else f.name
        lo = f.metadata.get("min")
        if lo is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and v < lo:
            raise UserError(f"config: '{p}' must be >= {lo}, got {v}")
        if dataclasses.is_dataclass(v):
            _check_mins(v, p)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                _check_mins(item, f"{p}[{i}]")


def _check_sources(sources: List[SourceConfig], where: str, need_name: bool) -> None:
    from pipeline.registry import modality_registry

    for i, s in enumerate(sources):
        p = f"{where}[{i}]"
        if s.type is None:
            s.type = "folder" if s.dir else ("shards" if s.urls else None)
        if s.type not in ("folder", "shards", "text", "synthetic"):
            raise UserError(f"config: '{p}.type' must be folder, shards, text or synthetic (got {s.type!r})")
        if s.type in ("folder", "text") and not s.dir:
            raise UserError(f"config: '{p}' is a {s.type} source without 'dir'")
        if s.type in ("folder", "text") and not Path(s.dir).exists():
            raise UserError(f"config: '{p}.dir': data folder not found: {s.dir}")
        if s.manifest and s.dir and not (Path(s.dir) / s.manifest).is_file():
            raise UserError(f"config: '{p}.manifest': file not found: {Path(s.dir) / s.manifest}")
        if s.type == "shards" and not s.urls:
            raise UserError(f"config: '{p}' is a shards source without 'urls'")
        if s.type == "shards" and s.urls.startswith("pipe:") and not s.allow_pipe:
            raise UserError(f"config: '{p}.urls' is a pipe: URL, which runs a shell command; set allow_pipe: true to allow it")
        if s.type == "text" and s.modality is None:
            s.modality = "text"
        if s.type != "shards" and not s.modality:
            raise UserError(f"config: '{p}' needs 'modality' (one of {', '.join(modality_registry.names())})")
        if s.modality:
            modality_registry.get(s.modality)
        if need_name and not s.name:
            raise UserError(f"config: '{p}' needs a 'name' (it names the set in the report)")


def load_config(files: list[str], overrides: list[str] | None = None) -> "Config":
    """Merge YAML files left to right, then the overrides; import plugins; validate everything.

    Returns a Config whose `.root` is a RootConfig instance and `.modalities` maps name -> adapter config.
    Raises UserError with one clear message on any mistake.
    """
    from pipeline.registry import modality_registry, stage_registry
    from pipeline.registry import import_plugins

    raw_layers = [(_load_yaml(f), f) for f in files]
    for layer, name in raw_layers:
        _refuse_retired(_dotted_keys(layer), name)
    _refuse_retired([o.split("=", 1)[0].strip() for o in overrides or []], "override")
    over = _parse_overrides(overrides or [])
    # Plugins register stages and modalities, so they are imported before anything is validated.
    plugins: list[str] = []
    for layer, _ in raw_layers:
        plugins = list(layer.get("plugins", plugins) or [])
    if "plugins" in over:
        plugins = list(over.plugins)
    import_plugins(plugins)
    import stages  # noqa: F401  (registers the built-in stages)
    import modalities  # noqa: F401  (registers the built-in modalities)

    schema = OmegaConf.structured(RootConfig)
    merged = schema
    for layer, name in raw_layers:
        merged = _merge(merged, layer, name)
    merged = _merge(merged, over, "override")

    # Modality sections: each validated against its adapter's dataclass.
    mod_cfgs: dict[str, Any] = {}
    raw_mods = OmegaConf.to_container(merged.modalities, resolve=True) or {}
    for name, section in raw_mods.items():
        adapter = modality_registry.get(name)
        m_schema = OmegaConf.structured(adapter.Config)
        m = _merge(m_schema, section or {}, f"modalities.{name}")
        mod_cfgs[name] = OmegaConf.to_object(m)
        _check_mins(mod_cfgs[name], f"modalities.{name}")

    extra_cfgs: dict[str, Any] = {}
    raw_extra = OmegaConf.to_container(merged.extra, resolve=True) or {}
    for stage_name in merged.stages:
        stage = stage_registry.get(stage_name)
        if getattr(stage, "config_class", None) is not None and stage_name not in {f.name for f in dataclasses.fields(RootConfig)}:
            s = _merge(OmegaConf.structured(stage.config_class), raw_extra.pop(stage_name, {}) or {}, f"extra.{stage_name}")
            extra_cfgs[stage_name] = OmegaConf.to_object(s)
    if raw_extra:
        k = next(iter(raw_extra))
        raise UserError(f"config: 'extra.{k}' names no stage in this run's graph ({', '.join(merged.stages)})")

    try:
        root: RootConfig = OmegaConf.to_object(merged)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"config: {str(e).splitlines()[0]}") from None
    root.modalities = mod_cfgs
    root.extra = extra_cfgs
    _check_mins(root)
    sp = root.ingest.split
    if abs(sp.train + sp.pool + sp.val + sp.test - 1.0) > 1e-6:
        raise UserError("config: 'ingest.split' fractions must add up to 1")
    _check_sources(root.ingest.sources, "ingest.sources", need_name=False)
    _check_sources(root.evaluate.sources, "evaluate.sources", need_name=True)
    for s in root.ingest.sources:
        if s.modality and s.modality not in root.modalities:
            root.modalities[s.modality] = modality_registry.get(s.modality).Config()
    for name, mcfg in root.modalities.items():
        modality_registry.get(name).validate_config(mcfg, f"modalities.{name}")
    notes = resolve_recipe(root)
    _check_training(root)
    for s in root.stages:
        stage_registry.get(s)
    return Config(root, notes)


@dataclass
class Config:
    root: RootConfig
    notes: List[str] = field(default_factory=list)  # the recipe's choices for settings left at None (resolve_recipe)

    def section(self, name: str) -> Any:
        if name in self.root.extra:
            return self.root.extra[name]
        return getattr(self.root, name, None)

    def to_plain(self) -> dict:
        return to_plain(self.root)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_plain(), sort_keys=False)


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def stable_hash(obj: Any) -> str:
    """sha256 of a canonical JSON form; the hash of a config section."""
    return hashlib.sha256(json.dumps(to_plain(obj), sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------- retired and moved keys
RETIRED_TAG = "arms-2026-12"  # the git tag whose code still runs every retired arm (docs/history.md)
# Settings the recipe fixed ([Recipe]): each value is what the code now does in its place.
RETIRED = {
    "adversarial.objective": "the phase is policy gradient (SPIN is retired)",
    "adversarial.use_references": "the real side is the teacher's labels",
    "adversarial.baseline": "the leave-one-out baseline over k_samples",
    "adversarial.ema_decay": "the leave-one-out baseline (no EMA baseline)",
    "adversarial.disc_steps": "one discriminator step per batch",
    "adversarial.reward_weights": "every judge has weight 1",
    "adversarial.discount": "sequence rewards (no per-token returns)",
    "adversarial.center_rewards": "sequence rewards (no per-token returns)",
    "adversarial.reward_level": "sequence rewards",
    "adversarial.reward_minus_policy_logprob": "the reward always subtracts the student's log-likelihood",
    "adversarial.greedy_sample": "every sample is drawn at adversarial.temperature",
    "adversarial.kl_estimator": "the exact KL, a loss term",
    "adversarial.spin_beta": "SPIN is retired",
    "adversarial.spin_iterate_steps": "SPIN is retired",
    "adversarial.disc_lm_score": "a judge's score always adds its body's log-likelihood",
    "adversarial.disc_train_body": "a judge's body stays frozen; its head learns",
    "adversarial.disc_from_divergence": "a sample is judged from where it leaves the real rows of its input",
    "adversarial.label_smoothing": "one-sided label smoothing of 0.1",
    "adversarial.weight_decay": "the discriminators' weight decay is 0.01",
    "adversarial.grad_penalty": "the small transformer judge is retired",
    "adversarial.disc_d_model": "the small transformer judge is retired",
    "adversarial.disc_layers": "the small transformer judge is retired",
    "adversarial.disc_heads": "the small transformer judge is retired",
    "adversarial.disc_dropout": "the small transformer judge is retired",
    "adversarial.disc_feature_frames": "the small transformer judge is retired",
}
MOVED = {f"evaluate.{k}": f"decoding.{k}" for k in ("max_new_tokens", "fallback_temperatures", "max_compression_ratio",
                                                     "min_avg_logprob", "best_of", "max_ngram_repeats")}


def _dotted_keys(layer: dict, prefix: str = "", depth: int = 2) -> list[str]:
    """The dotted keys of a YAML layer, two levels down (section.key)."""
    out = []
    for k, v in layer.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict) and depth > 1:
            out += _dotted_keys(v, key + ".", depth - 1)
    return out


def _refuse_retired(keys: list[str], where: str) -> None:
    for k in keys:
        if k in MOVED:
            raise UserError(f"{where}: '{k}' moved to '{MOVED[k]}' (docs/history.md)")
        if k in RETIRED:
            raise UserError(f"{where}: '{k}' is retired ({RETIRED[k]}); git tag {RETIRED_TAG} has it "
                            "(docs/history.md)")


# ------------------------------------------------------------------------------------------------ the recipe
def _teacher_kind(root: RootConfig, modality: str) -> str | None:
    return getattr(getattr(root.modalities.get(modality), "teacher", None), "kind", None)


def resolve_recipe(root: RootConfig) -> list[str]:
    """Fill every training setting left at None with the recipe's choice for this run, in place; returns one
    note per setting where the recipe's own choice cannot apply and a fallback was taken."""
    from stages.evaluation.text_metrics import TRANSCRIPT_MODALITIES

    mods = sorted(set(root.modalities) | {s.modality for s in root.ingest.sources if s.modality})
    whisper = [m for m in mods if _teacher_kind(root, m) == "whisper"]
    transcribes = [m for m in mods if m in TRANSCRIPT_MODALITIES]
    d, a, st = root.distill, root.adversarial, root.distill.student
    notes: list[str] = []

    def take(section, name: str, value, why: str | None = None):
        if getattr(section, name) is None:
            setattr(section, name, value)
            if why and why.split(".")[0] in root.stages:  # said only where the stage runs
                notes.append(f"{why}: {value}")

    take(st, "style", "cross_attention" if whisper else "prefix",
         None if whisper else "distill.student.style (no modality has a Whisper teacher whose decoder it could be)")
    take(st, "freeze_embeddings", st.style == "cross_attention")
    take(d, "select_by", "val_wer" if transcribes else "val_loss",
         None if transcribes else f"distill.select_by (no modality transcribes: {', '.join(TRANSCRIPT_MODALITIES)})")
    take(a, "inputs", ["pool"] if root.ingest.split.pool > 0 else ["train"],
         None if root.ingest.split.pool > 0 else "adversarial.inputs (ingest.split.pool is 0: no input is held back)")
    if a.disc_backbone is None:
        why = ("the run is unanchored" if not a.anchored else
               "the student is not cross_attention" if st.style != "cross_attention" else
               "no modality has a Whisper teacher" if not whisper else None)
        take(a, "disc_backbone", "student" if why else "teacher", f"adversarial.disc_backbone ({why})" if why else None)
    if a.select_by is None:
        why = ("the run is unanchored" if not a.anchored else
               "no modality transcribes" if not transcribes else None)
        take(a, "select_by", "last" if why else "val_wer", f"adversarial.select_by ({why})" if why else None)
    return notes


def _one_of(value, options: tuple, key: str) -> None:
    if value not in options:
        raise UserError(f"config: '{key}' must be {', '.join(options[:-1])} or {options[-1]}, got {value!r}")


def _check_training(root: RootConfig) -> None:
    """The training sections' choices and the conflicts between them, after resolve_recipe."""
    d, a = root.distill, root.adversarial
    _one_of(d.student.style, ("prefix", "cross_attention"), "distill.student.style")
    _one_of(d.select_by, ("val_loss", "val_wer"), "distill.select_by")
    _one_of(a.disc_backbone, ("student", "teacher"), "adversarial.disc_backbone")
    _one_of(a.select_by, ("last", "val_wer"), "adversarial.select_by")
    if not d.ema_decay < 1.0:
        raise UserError(f"config: 'distill.ema_decay' must be in [0, 1) (0: off), got {d.ema_decay!r}")
    if a.disc_backbone == "teacher" and d.student.style != "cross_attention":
        raise UserError("config: 'adversarial.disc_backbone: teacher' needs a cross_attention student (a Whisper "
                        f"decoder); 'distill.student.style' is {d.student.style!r}")
    if not a.anchored:
        # the ablation of anchoring: nothing the teacher says about an input enters the stage, so each setting that
        # would let it in is named at once (an ablation command should need one round, not one per conflict)
        need = [why for bad, why in (
            (a.select_by == "val_wer",
             "select_by: last ('val_wer' scores the student against the teacher's labels of the val clips)"),
            (a.disc_backbone == "teacher",
             "disc_backbone: student ('teacher' makes the teacher's decoder the judge, and its likelihood of a text "
             "is its label by another name)")) if bad]
        if need:
            raise UserError("config: 'adversarial.anchored: false' lets nothing of the teacher into the stage; set "
                            + " and ".join(need))
    sp = root.ingest.split
    for sec in ("distill", "adversarial"):
        names = getattr(root, sec).inputs
        if not names or any(n not in ("train", "augmented", "pool") for n in names) or len(set(names)) != len(names):
            raise UserError(f"config: '{sec}.inputs' must list train, augmented and/or pool, each once, got {names!r}")
        if "pool" in names and sp.pool == 0:
            raise UserError(f"config: '{sec}.inputs' names pool, but ingest.split.pool is 0: no input is held back")
        if "augmented" in names and root.pseudo_label.augment_copies == 0:
            raise UserError(f"config: '{sec}.inputs' names augmented, but pseudo_label.augment_copies is 0: "
                            "the pseudo_label stage makes no augmented copies")
    if any(float(t) <= 0 for t in root.decoding.fallback_temperatures):
        raise UserError(f"config: 'decoding.fallback_temperatures' must be > 0, got {list(root.decoding.fallback_temperatures)}")
