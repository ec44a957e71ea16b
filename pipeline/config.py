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
import math
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
    # memory per input, whatever it claims: a file or shard member over max_member_mb is refused from its size
    # (a tar header's, before a byte is read), and a shard stops reading past max_shard_mb of members
    max_member_mb: float = field(default=512.0, metadata=_min(0.001))
    max_shard_mb: float = field(default=2048.0, metadata=_min(0.001))


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
    top_k: int = field(default=0, metadata=_min(0))  # store the teacher's top-k log-probs per token (0: off)
    store_features: bool = True  # store the teacher's features (fp16) for the student and discriminators
    # Perturbed copies of each train input (modalities whose adapter can perturb: audio and image, see their augment_*),
    # labelled by the teacher like any input and filtered like train, kept as split `augmented`: inputs the
    # student has not memorised, for `distill.inputs` / `adversarial.inputs` to take. 0: none.
    augment_copies: int = field(default=0, metadata=_min(0))


# ---------------------------------------------------------------------------------------------------- distill
@dataclass
class StudentConfig:
    style: str = "prefix"  # prefix (projector + causal LM) | cross_attention (Whisper decoder)
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
    freeze_embeddings: bool = False
    dropout: float = field(default=0.0, metadata=_min(0.0))


@dataclass
class DistillConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    steps: int = field(default=200, metadata=_min(0))  # optimiser steps
    batch_size: int = field(default=16, metadata=_min(1))  # global batch, whatever the world size
    grad_accum: int = field(default=1, metadata=_min(1))
    lr: float = field(default=1e-3, metadata=_min(0.0))
    weight_decay: float = field(default=0.01, metadata=_min(0.0))
    warmup_steps: int = field(default=20, metadata=_min(0))
    grad_clip: float = field(default=1.0, metadata=_min(0.0))
    kd_weight: float = field(default=0.0, metadata=_min(0.0))  # weight of KL to the teacher's top-k log-probs
    kd_temperature: float = field(default=2.0, metadata=_min(0.01))
    max_text_tokens: int = field(default=96, metadata=_min(4))
    modality_weights: Dict[str, float] = field(default_factory=dict)  # sampling weight per modality (default 1)
    inputs: List[str] = field(default_factory=lambda: ["train"])  # pseudo_label splits trained on: train, augmented, pool
    val_every: int = field(default=50, metadata=_min(1))
    # which validation figure picks final/: val_loss (teacher-forced cross-entropy on the val labels) or
    # val_wer (the val clips decoded as the evaluate stage decodes: greedy, its fallback and loop checks; WER
    # against their labels; ties go to the lower val_loss)
    select_by: str = "val_loss"
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
    enabled: bool = True  # false: the stage copies the distilled student through
    objective: str = "pg"  # pg (policy gradient on discriminator rewards) | spin (self-play, DPO loss)
    anchored: bool = True  # false: the discriminators' real side is the student's own earlier samples
    ce_weight: float = field(default=0.5, metadata=_min(0.0))  # cross-entropy on pseudo-labels (0 when unanchored)
    kl_weight: float = field(default=0.1, metadata=_min(0.0))  # KL to the frozen distilled reference
    pg_weight: float = field(default=1.0, metadata=_min(0.0))
    use_references: bool = False  # let references join the real side where the manifest gives them
    steps: int = field(default=100, metadata=_min(0))
    batch_size: int = field(default=8, metadata=_min(1))
    k_samples: int = field(default=2, metadata=_min(1))  # samples per input (leave-one-out baseline needs 2+)
    baseline: str = "loo"  # loo | ema
    ema_decay: float = field(default=0.9, metadata=_min(0.0))
    temperature: float = field(default=1.0, metadata=_min(0.01))  # sampling temperature for the student
    max_new_tokens: int = field(default=48, metadata=_min(1))
    lr: float = field(default=1e-5, metadata=_min(0.0))
    disc_lr: float = field(default=1e-4, metadata=_min(0.0))
    disc_steps: int = field(default=1, metadata=_min(1))  # discriminator steps per student step
    disc_warmup_steps: int = field(default=20, metadata=_min(0))  # discriminator-only steps before the student moves
    disc_pretrain_epochs: int = field(default=0, metadata=_min(0))  # passes over every phase input (its real rows vs a sample of the distilled model) before step 0
    # transformer (small, from scratch: disc_d_model ...) | student (a copy of the distilled student with a linear
    # head) | teacher (the Whisper teacher's whole decoder with a linear head, for the modality it labelled; the
    # others a copy of the student; anchored runs only: the teacher's judgement is a label by another name); no
    # grad_penalty but with transformer
    disc_backbone: str = "transformer"
    # student / teacher backbones: add the body's own log-prob of each judged token (scaled, learned) to the
    # logit; with the teacher's decoder that is the teacher-likelihood half of the optimal discriminator
    disc_lm_score: bool = False
    # student / teacher backbones: false keeps the body as built and trains only the head (and the lm_score
    # scale), so that with disc_backbone: teacher and disc_lm_score the body's term stays the teacher's own
    # likelihood (a body trained at disc_lr drifts from it)
    disc_train_body: bool = True
    disc_d_model: int = field(default=128, metadata=_min(8))
    disc_layers: int = field(default=2, metadata=_min(1))
    disc_heads: int = field(default=4, metadata=_min(1))
    disc_dropout: float = field(default=0.1, metadata=_min(0.0))
    label_smoothing: float = field(default=0.1, metadata=_min(0.0))
    # judge a sample's tokens as fake only from where it leaves every real row of its input (the shared start
    # is the real row's own text; calling it fake contradicts the real side's targets token for token)
    disc_from_divergence: bool = False
    grad_penalty: float = field(default=0.0, metadata=_min(0.0))  # R1-style penalty on input embeddings
    weight_decay: float = field(default=0.01, metadata=_min(0.0))
    spin_beta: float = field(default=0.1, metadata=_min(0.0))
    reward_weights: Dict[str, float] = field(default_factory=dict)  # per modality discriminator weight (default 1)
    guards: GuardConfig = field(default_factory=GuardConfig)
    discount: float = field(default=1.0, metadata=_min(0.0))  # gamma of the per-token returns G_t = sum_s>=t gamma^(s-t) r_s
    # subtract the batch's mean token reward before the returns: raw logits are mostly negative on samples,
    # and then a sample that stops early earns more (fewer negative terms); centred, stopping gains nothing on average
    center_rewards: bool = False
    # token: each token's reward is its own logit (dense, ScratchGAN), returns summed over the tokens after it
    # (discount), baselined position by position. sequence: one reward per sample, the discriminators' logit
    # at its last token (which has read the whole text, its end included), and RLOO's advantage (the reward
    # minus the mean of the input's other k-1 samples) on every token of the sample (Ahmadian et al. 2024): no
    # pull toward shorter or longer samples, and a sample compared only with samples about the same input.
    # With disc_lm_score the sequence's lm term is the body's log-likelihood of the whole sample, not of the
    # last token alone. The discriminators train token by token either way (the per-token targets teach the last token's logit
    # faster than its own alone: demo audio, ranking 0.71 against 0.63 after pre-training). Needs baseline:
    # loo and k_samples >= 2.
    reward_level: str = "token"
    # reward_level sequence: subtract the student's own log-likelihood of each sample from its reward. With the
    # teacher's likelihood in the discriminators (disc_backbone: teacher, disc_lm_score) the reward is then the
    # Bayes-optimal discriminator's log p_teacher - log p_student (plus what the head learns), and the policy
    # gradient descends KL(student || teacher) on the student's own samples (on-policy distillation: MiniLLM,
    # GKD), with no pull toward short samples.
    reward_minus_policy_logprob: bool = False
    # one of each input's k samples is the policy's greedy decode (temperature 0), the text the val check and
    # the evaluate stage read: where greedy decoding loops (the distilled student's main failure), that loop
    # is judged and its reward's advantage lands on it, where samples at temperature 1 rarely loop. Needs
    # k_samples >= 2 (the others are sampled).
    greedy_sample: bool = False
    kl_estimator: str = "exact"  # exact (KL over the vocabulary at each sampled position, a loss term) | sampled (log pi - log ref at the sampled token, folded into the reward)
    spin_iterate_steps: int = field(default=25, metadata=_min(1))  # spin: student steps per iterate; the previous iterate (sampler and reference) is then refreshed
    modality_weights: Dict[str, float] = field(default_factory=dict)  # sampling weight per modality (default 1)
    # the pseudo_label splits the phase's inputs come from: train, augmented (perturbed copies of train inputs,
    # pseudo_label.augment_copies), pool (ingest.split.pool: real inputs distill did not train on, unless
    # distill.inputs names pool). A student that has memorised its train inputs samples their labels back,
    # which leaves the discriminators nothing to tell apart; copies it has not seen do not.
    inputs: List[str] = field(default_factory=lambda: ["train"])
    disc_feature_frames: int = field(default=32, metadata=_min(1))  # features average-pooled to at most this many frames for the discriminators
    text_reward_all: bool = False  # the plain-text discriminator (modality text) also rewards every other modality's samples (weight reward_weights.text)
    log_every: int = field(default=10, metadata=_min(1))
    checkpoint_every: int = field(default=25, metadata=_min(1))
    grad_clip: float = field(default=1.0, metadata=_min(0.0))
    # which student final/ holds: last (the last step) or val_wer (the lowest WER against the teacher's labels
    # of the val clips, decoded as the evaluate stage decodes (greedy, its fallback and loop checks), checked
    # before the first student step and every val_every student steps; the distilled student itself when no
    # step beats it). val_wer reads teacher labels: anchored runs only.
    select_by: str = "last"
    val_every: int = field(default=10, metadata=_min(1))


# --------------------------------------------------------------------------------------------------- evaluate
@dataclass
class EvaluateConfig:
    splits: List[str] = field(default_factory=lambda: ["test"])  # the run's splits to evaluate (test; train and val too if asked)
    sources: List[SourceConfig] = field(default_factory=list)  # extra held-out sets, each with a `name`
    temperatures: List[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])  # 0 is greedy
    max_new_tokens: int = field(default=64, metadata=_min(1))
    # Whisper's temperature fallback for greedy decoding (T = 0): a piece whose text's compression ratio is
    # above max_compression_ratio (a repetition loop) is decoded again at these temperatures in turn; [] = off
    fallback_temperatures: List[float] = field(default_factory=list)
    max_compression_ratio: float = field(default=2.4, metadata=_min(1.0))
    min_avg_logprob: Optional[float] = None  # and where its mean token log-prob is below this (Whisper: -1.0)
    # samples per piece at each fallback temperature; the passing one with the highest mean log-prob is kept (Whisper: 5)
    best_of: int = field(default=1, metadata=_min(1))
    # and where a word 4-gram occurs more than this many times in one piece (a loop too short for zlib; None: off)
    max_ngram_repeats: Optional[int] = field(default=None, metadata=_min(1))
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


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load without anchors and aliases: a few hundred bytes of nested aliases ("billion laughs")
    expand to billions of nodes when the config is merged. A config never needs them (YAML files merge)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in a config; "
                                              "write the value out, or put it in an overlay file", event.start_mark)
        return super().compose_node(parent, index)


def _load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        loader = _NoAliasLoader(p.read_text(encoding="utf-8"))
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML: {what}{at}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(RootConfig)]
    for k in data:
        if k not in known:
            raise UserError(f"{path}: unknown key '{k}'{_close(str(k), known)}")
    _refuse_env(data, path)
    return data


def _refuse_env(node: Any, where: str, at: str = "") -> None:
    """Environment interpolations (${oc.env:...}) are refused: the resolved config is written in clear to
    RUN/config.yaml and hashed into manifests, so a secret read from the environment would land on disk."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_env(v, where, f"{at}.{k}" if at else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_env(v, where, f"{at}[{i}]")
    elif isinstance(node, str) and "${" in node and "oc.env" in node.replace(" ", ""):
        raise UserError(f"{where}: '{at}' reads the environment ({node}); environment interpolation is refused, "
                        "since the resolved config is written in clear to RUN/config.yaml: give the value itself")


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            raise UserError(f"override {o!r} is not key=value")
    for o in overrides:
        _refuse_env(o.split("=", 1)[1], "override", o.split("=", 1)[0])
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
        _check_finite(v, p)
        lo = f.metadata.get("min")
        if lo is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and v < lo:
            raise UserError(f"config: '{p}' must be >= {lo}, got {v}")
        if dataclasses.is_dataclass(v):
            _check_mins(v, p)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                _check_mins(item, f"{p}[{i}]")
        elif isinstance(v, dict):  # extra.<plugin stage>: its dataclass
            for k, item in v.items():
                _check_mins(item, f"{p}.{k}")


def _check_finite(v: Any, path: str) -> None:
    """NaN and infinities are refused everywhere: `lr=nan` would fail inside torch after the data stages, and
    `split.train=nan` compares false with everything (every key would land in test)."""
    if isinstance(v, float) and not math.isfinite(v):
        raise UserError(f"config: '{path}' must be a finite number, got {v}")
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            if not dataclasses.is_dataclass(x):
                _check_finite(x, f"{path}[{i}]")
    elif isinstance(v, dict):
        for k, x in v.items():
            if not dataclasses.is_dataclass(x):
                _check_finite(x, f"{path}.{k}")


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
        if s.type == "shards" and not s.allow_pipe:
            from pipeline.shards import command_scheme

            scheme = command_scheme(s.urls)
            if scheme == "pipe":
                raise UserError(f"config: '{p}.urls' is a pipe: URL, which runs a shell command; set allow_pipe: true to allow it")
            if scheme:
                raise UserError(f"config: '{p}.urls' is a {scheme}: URL, which webdataset reads by starting a program "
                                "(curl, gsutil, ...); set allow_pipe: true to allow it")
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
    over = _parse_overrides(overrides or [])
    # Plugins register stages and modalities, so they are imported before anything is validated.
    plugins: list = []
    where = "config"
    for layer, name in raw_layers:
        if "plugins" in layer:
            plugins, where = layer["plugins"] or [], name
    if "plugins" in over:
        plugins, where = over.plugins, "override"
        plugins = list(plugins) if isinstance(plugins, ListConfig) else plugins
    if not isinstance(plugins, list) or not all(isinstance(m, str) and m for m in plugins):
        raise UserError(f"{where}: 'plugins' must be a list of module names (strings), got {plugins!r}")
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
    for name in ("train", "pool", "val", "test"):
        if not 0.0 <= getattr(sp, name) <= 1.0:
            raise UserError(f"config: 'ingest.split.{name}' must be in [0, 1], got {getattr(sp, name)}")
    if abs(sp.train + sp.pool + sp.val + sp.test - 1.0) > 1e-6:
        raise UserError("config: 'ingest.split' fractions must add up to 1")
    _check_sources(root.ingest.sources, "ingest.sources", need_name=False)
    _check_sources(root.evaluate.sources, "evaluate.sources", need_name=True)
    for s in root.ingest.sources:
        if s.modality and s.modality not in root.modalities:
            root.modalities[s.modality] = modality_registry.get(s.modality).Config()
    for name, mcfg in root.modalities.items():
        modality_registry.get(name).validate_config(mcfg, f"modalities.{name}")
    if root.distill.student.style not in ("prefix", "cross_attention"):
        raise UserError(f"config: 'distill.student.style' must be prefix or cross_attention, got {root.distill.student.style!r}")
    if root.distill.select_by not in ("val_loss", "val_wer"):
        raise UserError(f"config: 'distill.select_by' must be val_loss or val_wer, got {root.distill.select_by!r}")
    if root.adversarial.objective not in ("pg", "spin"):
        raise UserError(f"config: 'adversarial.objective' must be pg or spin, got {root.adversarial.objective!r}")
    if not root.distill.ema_decay < 1.0:
        raise UserError(f"config: 'distill.ema_decay' must be in [0, 1) (0: off), got {root.distill.ema_decay!r}")
    if root.adversarial.disc_backbone not in ("transformer", "student", "teacher"):
        raise UserError("config: 'adversarial.disc_backbone' must be transformer, student or teacher, "
                        f"got {root.adversarial.disc_backbone!r}")
    if root.adversarial.disc_backbone != "transformer" and root.adversarial.grad_penalty > 0:
        raise UserError("config: 'adversarial.grad_penalty' needs disc_backbone: transformer (its penalty is on the "
                        "discriminator's own token embeddings)")
    if root.adversarial.disc_backbone == "teacher" and root.distill.student.style != "cross_attention":
        raise UserError("config: 'adversarial.disc_backbone: teacher' needs a cross_attention student (a Whisper "
                        f"decoder); 'distill.student.style' is {root.distill.student.style!r}")
    if root.adversarial.disc_lm_score and root.adversarial.disc_backbone == "transformer":
        raise UserError("config: 'adversarial.disc_lm_score' adds a language model's score of each token; "
                        "'disc_backbone: transformer' has none (use student or teacher)")
    if root.adversarial.reward_minus_policy_logprob and root.adversarial.reward_level != "sequence":
        raise UserError("config: 'adversarial.reward_minus_policy_logprob' is a sequence reward's term; it needs "
                        "'adversarial.reward_level: sequence'")
    if not root.adversarial.disc_train_body and root.adversarial.disc_backbone == "transformer":
        raise UserError("config: 'adversarial.disc_train_body: false' keeps a body (disc_backbone student or "
                        "teacher) frozen; 'disc_backbone: transformer' has none")
    if root.adversarial.select_by not in ("last", "val_wer"):
        raise UserError(f"config: 'adversarial.select_by' must be last or val_wer, got {root.adversarial.select_by!r}")
    if not root.adversarial.anchored:
        # the ablation of anchoring: nothing the teacher says about an input enters the stage, so each setting that
        # would let it in is named at once (an ablation command should need one round, not one per conflict)
        need = [why for bad, why in (
            (root.adversarial.select_by == "val_wer",
             "select_by: last ('val_wer' scores the student against the teacher's labels of the val clips)"),
            (root.adversarial.disc_backbone == "teacher",
             "disc_backbone: student ('teacher' makes the teacher's decoder the judge, and its likelihood of a text "
             "is its label by another name)")) if bad]
        if need:
            raise UserError("config: 'adversarial.anchored: false' lets nothing of the teacher into the stage; set "
                            + " and ".join(need))
    for sec in ("distill", "adversarial"):
        names = getattr(root, sec).inputs
        if not names or any(n not in ("train", "augmented", "pool") for n in names) or len(set(names)) != len(names):
            raise UserError(f"config: '{sec}.inputs' must list train, augmented and/or pool, each once, got {names!r}")
        if "pool" in names and sp.pool == 0:
            raise UserError(f"config: '{sec}.inputs' names pool, but ingest.split.pool is 0: no input is held back")
        if "augmented" in names and root.pseudo_label.augment_copies == 0:
            raise UserError(f"config: '{sec}.inputs' names augmented, but pseudo_label.augment_copies is 0: "
                            "the pseudo_label stage makes no augmented copies")
    if root.adversarial.reward_level not in ("token", "sequence"):
        raise UserError("config: 'adversarial.reward_level' must be token or sequence, "
                        f"got {root.adversarial.reward_level!r}")
    if root.adversarial.reward_level == "sequence" and (root.adversarial.baseline != "loo"
                                                         or root.adversarial.k_samples < 2):
        raise UserError("config: 'adversarial.reward_level: sequence' compares a sample with the other samples of "
                        "its input: it needs 'adversarial.baseline: loo' and 'adversarial.k_samples' >= 2, got "
                        f"{root.adversarial.baseline!r} and {root.adversarial.k_samples}")
    if root.adversarial.greedy_sample and root.adversarial.k_samples < 2:
        raise UserError("config: 'adversarial.greedy_sample' makes one of each input's k samples the greedy decode; "
                        f"it needs 'adversarial.k_samples' >= 2 (the others sampled), got {root.adversarial.k_samples}")
    if root.adversarial.baseline not in ("loo", "ema"):
        raise UserError(f"config: 'adversarial.baseline' must be loo or ema, got {root.adversarial.baseline!r}")
    for s in root.stages:
        stage_registry.get(s)
    return Config(root)


@dataclass
class Config:
    root: RootConfig

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
