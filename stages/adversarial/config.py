"""The adversarial stage's section: its settings (each default the measured recipe), the recipe's choices for the
settings left at None, the checks, and the keys it retired (docs/history.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from pipeline.config import added_later, check_choice, minimum
from pipeline.errors import UserError
from stages.distill import check_inputs, take, transcribing_modalities, whisper_modalities
from stages.ingest import holds_pool

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
    # pseudo_label.augment_copies), pool (ingest.split.pool, or a source with split: pool: real inputs distill did
    # not train on). None: pool where ingest holds one, else train
    inputs: Optional[List[str]] = None
    steps: int = field(default=60, metadata=minimum(0))  # student steps (after disc_warmup_steps)
    batch_size: int = field(default=8, metadata=minimum(1))  # inputs per step
    k_samples: int = field(default=4, metadata=minimum(2))  # samples per input (the leave-one-out baseline needs 2+)
    temperature: float = field(default=1.0, metadata=minimum(0.01))  # the student's sampling temperature
    max_new_tokens: int = field(default=96, metadata=minimum(1))  # per sample
    lr: float = field(default=3e-5, metadata=minimum(0.0))  # the student's
    pg_weight: float = field(default=1.0, metadata=minimum(0.0))  # the reward's term (0: the no-reward arm, CE + KL alone)
    ce_weight: float = field(default=0.5, metadata=minimum(0.0))  # cross-entropy on the pseudo-labels (0 when unanchored)
    kl_weight: float = field(default=0.1, metadata=minimum(0.0))  # exact KL to the frozen distilled reference
    grad_clip: float = field(default=1.0, metadata=minimum(0.0))
    # the student the val checks, the selection and final/ read: None (or 0) the trained weights themselves; d in
    # (0, 1) an exponential moving average of them over the student's steps (Polyak averaging, each step
    # avg <- d avg + (1 - d) weights), started at the distilled weights, while the trained weights go on by the
    # gradient alone. It smooths a noisy policy gradient's steps and leans the early checks toward the distilled
    # student (an interpolation toward the start, as WARP's; docs/results.md measures it)
    ema: Optional[float] = field(default=None, metadata={**minimum(0.0), **added_later()})
    # how often a long input is drawn: each input enters every pass over the phase's inputs round(n / median n)
    # times, at most this many, n its label's tokens and the median its modality's (a clip three times the median
    # label's length comes three times a pass). None (or 1): each once. For a student whose held-out errors sit in
    # the few long clips (docs/results.md measures it); refused where the run is unanchored (the lengths are
    # the teacher's)
    length_repeats: Optional[int] = field(default=None, metadata={**minimum(1), **added_later()})
    # the reward's average cost per token taken out of each sample's reward (per modality, over the step's batch):
    # a sum of per-token log-ratios pays a longer sample less and teaches early stops (MiniLLM's length bias).
    # false (or None, runs made before it was the recipe's): the summed reward
    length_neutral: Optional[bool] = field(default=True, metadata=added_later())
    # the audio judge: teacher (the Whisper teacher's whole decoder, frozen, its log-likelihood in the logit and a
    # learned head) | student (a frozen copy of the distilled student with a learned head). A modality the
    # Whisper teacher did not label is judged by a copy of the student either way. None: teacher where it can
    # (an anchored run, a cross_attention student, a Whisper teacher), else student
    disc_backbone: Optional[str] = None
    # what a judge's learned head reads: input (the recipe: the real input and the text) | text (the text alone,
    # the input blanked, GAD's text-only discriminator; the body's log-likelihood still reads the input, so the
    # reward differs from the recipe's in the head alone) | none (no head: the reward is the teacher decoder's
    # log-likelihood less the student's, on-policy reverse-KL distillation; a modality without the teacher's
    # decoder as its judge gets its teacher's own score (teacher_score_weight) where the teacher has one, else
    # cross-entropy and KL only; no pre-training or warm-up)
    judge: str = "input"
    # the weight of a teacher's own score of a sample in its reward, for the modalities whose teacher scores a text
    # it did not write (Teacher.caption_scores: the CLIP-style teacher's zero-shot log-probability of the caption
    # for the image), the analogue of the Whisper teacher's log-likelihood that the audio judge's body adds. Also
    # under judge: none (on drawings that arm is then on-policy reverse-KL toward the teacher's zero-shot
    # distribution). Unset (None): 0, no teacher score: measured on four seeds of the demo it moved neither the
    # drawings nor the clips (docs/results.md); refused where the run is unanchored
    teacher_score_weight: Optional[float] = field(default=None, metadata={**minimum(0.0), **added_later()})
    disc_lr: float = field(default=3e-4, metadata=minimum(0.0))
    disc_warmup_steps: int = field(default=20, metadata=minimum(0))  # discriminator-only steps before the student moves
    disc_pretrain_epochs: int = field(default=2, metadata=minimum(0))  # passes over every phase input (its real rows vs a sample of the distilled model) before step 0
    modality_weights: Dict[str, float] = field(default_factory=dict)  # sampling weight per modality (default 1)
    text_reward_all: bool = False  # the plain-text discriminator (modality text) also rewards every other modality's samples
    guards: GuardConfig = field(default_factory=GuardConfig)
    # which student final/ holds: val_wer (the lowest WER against the teacher's labels of the val clips, decoded
    # as `decoding:` says, checked before the first student step and every val_every student steps; the
    # distilled student itself when no step beats it) | last. None: val_wer in an anchored run where a
    # modality transcribes, else last
    select_by: Optional[str] = None
    val_every: int = field(default=10, metadata=minimum(1))
    log_every: int = field(default=5, metadata=minimum(1))
    checkpoint_every: int = field(default=20, metadata=minimum(1))


RETIRED_TAG = "arms-2026-12"  # the git tag whose code still runs every retired arm (docs/history.md)
# Settings the recipe fixed ([Recipe]): each value is what the code does in its place.
_FIXED = {
    "objective": "the phase is policy gradient (SPIN is retired)",
    "use_references": "the real side is the teacher's labels",
    "baseline": "the leave-one-out baseline over k_samples",
    "ema_decay": "the leave-one-out baseline (no EMA baseline)",
    "disc_steps": "one discriminator step per batch",
    "reward_weights": "every judge has weight 1",
    "discount": "sequence rewards (no per-token returns)",
    "center_rewards": "sequence rewards (no per-token returns)",
    "reward_level": "sequence rewards",
    "reward_minus_policy_logprob": "the reward always subtracts the student's log-likelihood",
    "greedy_sample": "every sample is drawn at adversarial.temperature",
    "kl_estimator": "the exact KL, a loss term",
    "spin_beta": "SPIN is retired",
    "spin_iterate_steps": "SPIN is retired",
    "disc_lm_score": "a judge's score always adds its body's log-likelihood",
    "disc_train_body": "a judge's body stays frozen; its head learns",
    "disc_from_divergence": "a sample is judged from where it leaves the real rows of its input",
    "label_smoothing": "one-sided label smoothing of 0.1",
    "weight_decay": "the discriminators' weight decay is 0.01",
    "grad_penalty": "the small transformer judge is retired",
    "disc_d_model": "the small transformer judge is retired",
    "disc_layers": "the small transformer judge is retired",
    "disc_heads": "the small transformer judge is retired",
    "disc_dropout": "the small transformer judge is retired",
    "disc_feature_frames": "the small transformer judge is retired",
}
RETIRED = {k: f"is retired ({why}); git tag {RETIRED_TAG} has it (docs/history.md)"
           for k, why in _FIXED.items()}


def validate_config(root) -> list[str]:
    """The recipe's choices for the phase's inputs, its audio judge and its selection; the checks, with every
    setting that conflicts with `anchored: false` named in one message."""
    a, d, notes = root.adversarial, root.distill, []
    pool = holds_pool(root)
    take(a, "inputs", ["pool"] if pool else ["train"],
         None if pool else "adversarial.inputs (ingest.split.pool is 0: no input is held back)", notes, root.stages)
    why = ("the run is unanchored" if not a.anchored else
           "the student is not cross_attention" if d.student.style != "cross_attention" else
           "no modality has a Whisper teacher" if not whisper_modalities(root) else None)
    take(a, "disc_backbone", "student" if why else "teacher", f"adversarial.disc_backbone ({why})" if why else None,
         notes, root.stages)
    why = ("the run is unanchored" if not a.anchored else
           "no modality transcribes" if not transcribing_modalities(root) else None)
    take(a, "select_by", "last" if why else "confirmed_val_wer", f"adversarial.select_by ({why})" if why else None,
         notes, root.stages)
    check_choice(a.disc_backbone, ("student", "teacher"), "adversarial.disc_backbone")
    check_choice(a.judge, ("input", "text", "none"), "adversarial.judge")
    if a.judge == "none":
        if a.disc_backbone != "teacher":
            raise UserError("config: 'adversarial.judge: none' rewards with the teacher decoder's log-likelihood; it "
                            f"needs 'adversarial.disc_backbone: teacher' (it is {a.disc_backbone!r})")
        for key in ("disc_warmup_steps", "disc_pretrain_epochs"):
            if getattr(a, key):
                setattr(a, key, 0)
                if "adversarial" in root.stages:
                    notes.append(f"adversarial.{key} 0 (judge: none has no head to train)")
    check_choice(a.select_by, ("last", "val_wer", "confirmed_val_wer"), "adversarial.select_by")
    if a.ema is not None and not 0.0 <= a.ema < 1.0:
        raise UserError(f"config: 'adversarial.ema' is the moving average's decay, in [0, 1); got {a.ema}")
    if a.disc_backbone == "teacher" and d.student.style != "cross_attention":
        raise UserError("config: 'adversarial.disc_backbone: teacher' needs a cross_attention student (a Whisper "
                        f"decoder); 'distill.student.style' is {d.student.style!r}")
    if not a.anchored:
        # the ablation of anchoring: nothing the teacher says about an input enters the stage, so each setting that
        # would let it in is named at once (an ablation command should need one round, not one per conflict)
        need = [msg for bad, msg in (
            (a.select_by != "last",
             f"select_by: last ('{a.select_by}' scores the student against the teacher's labels of the val clips)"),
            (a.disc_backbone == "teacher",
             "disc_backbone: student ('teacher' makes the teacher's decoder the judge, and its likelihood of a text "
             "is its label by another name)"),
            ((a.teacher_score_weight or 0) > 0,
             f"teacher_score_weight: 0 ({a.teacher_score_weight} adds the teacher's own score of each sample to "
             "its reward)"),
            ((a.length_repeats or 1) > 1,
             f"length_repeats: 1 ({a.length_repeats} draws inputs by the length of the teacher's labels)")) if bad]
        if need:
            raise UserError("config: 'adversarial.anchored: false' lets nothing of the teacher into the stage; set "
                            + " and ".join(need))
    check_inputs(root, "adversarial")
    return notes
