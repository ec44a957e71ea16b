"""adversarial: the distilled student keeps learning from discriminators that compare what it writes about a
real input with what the teacher said about the same input.

Before step 0 the discriminators judge every phase input's real row(s) against a sample of the distilled student
(disc_pretrain_epochs passes). Then, every step, for a batch of real inputs (adversarial.inputs; the pool split
by default: inputs distill never trained on):
  1. fake side: the student samples k texts per input (temperature, each input from its own random stream);
  2. real side: the teacher's pseudo-labels of those inputs. `anchored: false` replaces them by samples of the
     frozen distilled model for the same inputs - "the student's own earlier samples" - and no teacher label or
     cross-entropy enters the stage (the labels are dropped as the data is loaded);
  3. one update of every discriminator D_m on that batch: per-token BCE with one-sided label smoothing (real
     target 0.9); a sample's tokens count as fake only from where it leaves every real row of its input;
  4. after disc_warmup_steps discriminator-only steps, one student step: REINFORCE with one reward per sample,
       R = score_D(y | x) - log pi(y | x)
     (score_D: the head's logit at the last token plus lm_scale * log p_body(y | x); with the teacher's decoder
     as the body, R is log p_teacher - log p_student plus what the head learns: on-policy distillation toward
     the teacher with a learned correction; a modality whose teacher scores a text it did not write, the
     drawings' CLIP-style teacher, adds teacher_score_weight * that score: its zero-shot log-probability of the
     caption for the image), its advantage R minus the mean of the input's other k-1 samples
     (RLOO) on every token of the sample, plus kl_weight * KL(student || reference) over the vocabulary at
     every sampled position and ce_weight * cross-entropy on the pseudo-labels;
  5. every log_every steps: distinct-2 and self-BLEU-4 of the samples, per-modality discriminator accuracy and
     ranking (on the fresh batch, before the discriminator learns from it), KL to the reference, the length
     ratio, mean reward; a guard of adversarial.guards that trips ends the stage early, with its reason.
With select_by: val_wer the val clips are decoded (as `decoding:` says) before the first student step and every
val_every student steps; final/ is the student of the lowest val WER, the distilled one included.

The student samples and is scored in eval mode (no dropout), so the log-probs of the policy gradient are
those of the distribution that drew the samples (at temperature 1). Retired arms (token rewards, EMA
baselines, SPIN, the small transformer judge): git tag arms-2026-12, docs/history.md.

The package: losses.py (pure losses), rows.py (rows and sampling), judges.py (the discriminators: batches,
loss, rewards, pre-training), stage.py (the loop). Importing it registers the stage.

RUN/adversarial/
    checkpoints/step-XXXXXX/   student, discriminator.<m>, their AdamW states, sampler + RNGs
    final/                     the student (save_student layout), discriminators/<m>.{safetensors,json},
                               adversarial.json (steps, stop reason, settings)
    metrics.jsonl              one record every log_every steps
    best/, val_predictions/    with select_by: val_wer, the student of the lowest val WER so far, and each
                               check's val texts and errors (step_<student step>.jsonl)
"""

from stages.adversarial.judges import (DISCRIMINATORS_DIR, LABEL_SMOOTHING, DiscBatch, DiscCounts,
                                       _teacher_body_builder, batch_reward, discriminator_batch, discriminator_loss,
                                       discriminator_probs, discriminator_step, load_discriminators,
                                       pretrain_discriminators, ranking)
from stages.adversarial.losses import (_bce_side, ce_loss, disc_bce, exact_kl, global_count, judges_of, loo_baseline,
                                       masked_mean, pg_loss, pg_objective, policy_logprobs, sequence_rewards)
from stages.adversarial.rows import (Rows, input_generator, real_rows, rows_from_generated, rows_from_tokens,
                                     sample_rows, stream_seed, strip_labels)
from stages.adversarial.stage import Phase, disc_name, guard_trip, length_ratio, length_sums, progress, run

__all__ = ['DISCRIMINATORS_DIR', 'LABEL_SMOOTHING', 'DiscBatch', 'DiscCounts', '_teacher_body_builder',
           'batch_reward', 'discriminator_batch', 'discriminator_loss', 'discriminator_probs', 'discriminator_step',
           'load_discriminators', 'pretrain_discriminators', 'ranking', '_bce_side', 'ce_loss', 'disc_bce',
           'exact_kl', 'global_count', 'judges_of', 'loo_baseline', 'masked_mean', 'pg_loss', 'pg_objective',
           'policy_logprobs', 'sequence_rewards', 'Rows', 'input_generator', 'real_rows', 'rows_from_generated',
           'rows_from_tokens', 'sample_rows', 'stream_seed', 'strip_labels', 'Phase', 'disc_name', 'guard_trip',
           'length_ratio', 'length_sums', 'progress', 'run']
