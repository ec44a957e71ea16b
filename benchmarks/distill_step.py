"""Distil-Whisper's per-batch distillation work against groundgan's distill step, in one process, on the same
batches of the same clips and labels, with the same student.

Distil-Whisper-style step (its training script, per batch): the 30 s log-mel window of every clip, the frozen
teacher's encoder on it, the teacher's decoder teacher-forced on the label for full-vocabulary logits, the
student's decoder on the teacher's encoder states, and 0.8 x cross-entropy + KL(teacher || student) over the
whole vocabulary at temperature 2 (x T^2); backward; AdamW step.

groundgan's step (stages/distill.py): the student reads the teacher's encoder states that pseudo_label stored
(the clip's frames, then the teacher's encoding of silence shared by every row) and learns from cross-entropy and
the stored top-k log-probs (KD on k ids); backward; AdamW step. Its encoding is paid once per clip, in
pseudo_label: "amortised" adds that cost spread over `distill.steps` (timed here as the teacher's encoder on each
train clip's 30 s window, what the other step pays per batch; pseudo_label encodes trimmed windows, so this is an
upper bound of what it pays).

The two arms alternate batch by batch, so load on the machine falls on both alike; each starts from the same
student weights and trains it the same way (the whole embedding table learning, torch's default AdamW). A third
arm, timed in the same alternation, is groundgan's step as distill runs it: the table frozen but for its marker
rows (distill.student.freeze_embeddings, the cross_attention default) and the fused AdamW ("as_distill").
Tokens per second count the label tokens trained on (the same for every arm).

    python benchmarks/distill_step.py --run runs/demo [--batches 20] [--batch-size 16] [--threads 2] [--json]

RUN is a run whose pseudo_label stage is done with a Whisper teacher and a cross_attention student config (the
demo's). Figures: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.registry import load_builtins, modality_registry  # noqa: E402
from pipeline.shards import iter_shard  # noqa: E402

DISTIL_WHISPER_KL_TEMPERATURE = 2.0  # distil-whisper's run_distillation.py defaults
DISTIL_WHISPER_CE_WEIGHT, DISTIL_WHISPER_KL_WEIGHT = 0.8, 1.0


def clip_audio(run: Path, keys: set[str], adapter) -> dict[str, np.ndarray]:
    """key -> 16 kHz float32 audio of the ingest samples named in keys."""
    out = {}
    for shard in sorted((run / "ingest/shards/audio").glob("*.tar")):
        for key, members in iter_shard(str(shard)):
            if key in keys:
                ext = next(e for e in members if e not in ("json",))
                out[key] = adapter.decode(members[ext], ext)
    return out


def distil_whisper_step(student, teacher, opt, batch, mels, marker: int) -> float:
    """One Distil-Whisper-style step; returns its loss."""
    from stages.distill import target_positions

    keep = target_positions(batch)
    with torch.no_grad():
        enc = teacher.encoder(mels)  # [b, 1500, d]: the frozen encoder, every batch
        ids = torch.cat([batch.input_ids.new_full((len(mels), 1), marker), batch.input_ids], dim=1)
        t_logits = teacher.decoder(ids, enc)[:, 1:][keep]  # full vocabulary, teacher-forced
    s_logits = student(batch.input_ids, batch.attention_mask, "audio", enc, keep=keep)
    v = s_logits.shape[-1]
    t_logits = t_logits[:, :v].float()
    targets = batch.input_ids[:, 1:][batch.attention_mask[:, 1:].bool()]  # the token each kept position predicts
    ce = F.cross_entropy(s_logits.float(), targets)
    T = DISTIL_WHISPER_KL_TEMPERATURE
    kl = F.kl_div(F.log_softmax(s_logits.float() / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                  reduction="batchmean") * T * T
    loss = DISTIL_WHISPER_CE_WEIGHT * ce + DISTIL_WHISPER_KL_WEIGHT * kl
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def groundgan_step(student, opt, batch, kd_weight: float, kd_temperature: float, n_kd: int) -> float:
    """One step of stages/distill.py's loop (one process, no accumulation)."""
    from stages.distill import target_positions, token_losses

    logits = student(batch.input_ids, batch.attention_mask, batch.modality, batch.features, keep=target_positions(batch))
    s = token_losses(logits, batch, kd_temperature, True)
    loss = s["ce"] / batch.n_targets + kd_weight * s["kd"] / max(1, n_kd)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run directory whose pseudo_label stage is done (the demo's)")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per arm")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the run's distill.batch_size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    import whisper

    from modalities.whisper_teacher import load_whisper
    from stages.distill import _kd_positions, _param_groups
    from stages.models.optim import adamw
    from stages.models.labelled_data import collate, load_labelled
    from stages.models.student import build_student, build_tokenizer

    run = Path(a.run)
    if not (run / "pseudo_label/manifest.json").is_file():
        raise UserError(f"{run}: its pseudo_label stage is not done")
    load_builtins()
    cfg = load_config([str(run / "config.yaml")])
    dcfg, scfg = cfg.root.distill, cfg.root.distill.student
    if scfg.style != "cross_attention":
        raise UserError(f"{run}: its student is {scfg.style}; the comparison needs the cross_attention student")
    bs = a.batch_size or dcfg.batch_size
    tok = build_tokenizer(scfg)
    data = load_labelled(run / "pseudo_label", tok, dcfg.max_text_tokens, splits=("train",))
    adapter = modality_registry.get("audio")(cfg.root.modalities["audio"])
    train = [e for e in data.splits["train"] if e.modality == "audio" and e.topk_ids is not None]
    audio = clip_audio(run, {e.key for e in train}, adapter)
    whole = [e for e in train if e.key in audio]  # chunks of longer clips have no file of their own: left out
    if len(whole) < bs:
        raise UserError(f"{run}: {len(whole)} whole train clips, fewer than a batch of {bs}")
    teacher, name, _ = load_whisper(cfg.root.modalities["audio"].teacher)
    teacher.eval().requires_grad_(False)
    ck = {"dims": __import__("dataclasses").asdict(teacher.dims), "model_state_dict": teacher.state_dict()}
    ours = build_student(scfg, data.feature_dims, "cpu", ck, "audio", dcfg.max_text_tokens)
    theirs = build_student(scfg, data.feature_dims, "cpu", ck, "audio", dcfg.max_text_tokens)
    theirs.load_state_dict(ours.state_dict())
    ours.train(), theirs.train()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=dcfg.lr)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=dcfg.lr)
    run_as = build_student(scfg, data.feature_dims, "cpu", ck, "audio", dcfg.max_text_tokens)
    run_as.load_state_dict(ours.state_dict())
    run_as.train()
    run_as.freeze_text_rows()
    opt_as = adamw(_param_groups(run_as, dcfg.weight_decay), lr=dcfg.lr, betas=(0.9, 0.98), eps=1e-8)
    opt_as.register_step_post_hook(run_as.sync_marker_rows)
    # the teacher reads <|startoftranscript|> where the student reads its audio marker (a row of its own)
    marker = whisper.tokenizer.get_tokenizer(teacher.is_multilingual, num_languages=teacher.num_languages).sot

    rng = np.random.default_rng(a.seed)
    plan = [rng.choice(len(whole), bs, replace=False) for _ in range(a.batches + 2)]
    t = {"ours": 0.0, "theirs": 0.0, "as_distill": 0.0}
    tokens = 0
    for i, rows in enumerate(plan):
        ex = [whole[j] for j in rows]
        batch = collate(ex, ours.spec.bos_id, ours.spec.eot_id, "cpu")
        n_kd = sum(_kd_positions(e) for e in ex)
        t0 = time.perf_counter()
        mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio[e.key])),
                                                         teacher.dims.n_mels) for e in ex])
        distil_whisper_step(theirs, teacher, opt_theirs, batch, mels, marker)
        t1 = time.perf_counter()
        groundgan_step(ours, opt_ours, batch, dcfg.kd_weight, dcfg.kd_temperature, n_kd)
        t2 = time.perf_counter()
        groundgan_step(run_as, opt_as, batch, dcfg.kd_weight, dcfg.kd_temperature, n_kd)
        t3 = time.perf_counter()
        if i >= 2:  # two warm-up batches untimed
            t["theirs"] += t1 - t0
            t["ours"] += t2 - t1
            t["as_distill"] += t3 - t2
            tokens += batch.n_targets

    # pseudo_label's encoding, paid once per train clip, spread over distill.steps
    n_train_clips = sum(1 for e in data.splits["train"] if e.modality == "audio")
    sample = [whole[j] for j in rng.choice(len(whole), min(bs, len(whole)), replace=False)]
    t0 = time.perf_counter()
    with torch.no_grad():
        mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio[e.key])),
                                                         teacher.dims.n_mels) for e in sample])
        teacher.encoder(mels)
    enc_per_clip = (time.perf_counter() - t0) / len(sample)
    amortised_s = enc_per_clip * n_train_clips / max(1, dcfg.steps)  # per distill step
    per_step = {k: v / a.batches for k, v in t.items()}
    tok_per_step = tokens / a.batches
    out = {
        "run": str(run), "teacher": name, "batches": a.batches, "batch_size": bs, "threads": a.threads,
        "tokens_per_batch": round(tok_per_step, 1), "train_clips": n_train_clips, "distill_steps": dcfg.steps,
        "distil_whisper_tok_s": round(tok_per_step / per_step["theirs"], 1),
        "groundgan_tok_s": round(tok_per_step / per_step["ours"], 1),
        "ratio": round(per_step["theirs"] / per_step["ours"], 2),
        "encode_s_per_clip": round(enc_per_clip, 4),
        "groundgan_amortised_tok_s": round(tok_per_step / (per_step["ours"] + amortised_s), 1),
        "ratio_amortised": round(per_step["theirs"] / (per_step["ours"] + amortised_s), 2),
        "groundgan_as_distill_tok_s": round(tok_per_step / per_step["as_distill"], 1),
        "ratio_as_distill": round(per_step["theirs"] / per_step["as_distill"], 2),
        "ratio_as_distill_amortised": round(per_step["theirs"] / (per_step["as_distill"] + amortised_s), 2),
    }
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
