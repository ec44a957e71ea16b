"""The demo graph's hot paths before and after [Speed], in one process, on the same inputs with the same student:
the three places the graph decodes (the cached decoder against the reference loop), and distill's step.

    val check   distill's and the phase's val WER (stages.distill.validate_wer: greedy, the Whisper fallback and
                loop checks of `decoding:`) over the run's val clips
    sampling    the phase's k samples per input (adversarial.k_samples, temperature, max_new_tokens) for batches
                of adversarial.batch_size pool inputs: before, one generate call per input (the reference loop);
                now, stages.adversarial.rows.sample_rows (every input in one batch, each from its own stream)
    evaluate    the evaluate stage's decoding (generation.generate_texts with its keyed streams) of the held-out
                clips' pieces at T = 0 (with the fallback) and at T = 1

    distill step  one step of stages/distill.py's loop on train batches (distill.batch_size), two copies of the
                student from the same weights: before, the cross-attention over every row's full 1500 frames
                (student.expanded_cross_attention), the whole embedding table learning with its text rows'
                gradient zeroed by a hook, and torch's default AdamW; now, the silence tail shared and only the
                rows' own frames projected (Student._shared_tail_attention), the table frozen and its marker rows
                a parameter of their own (Student.freeze_text_rows), the fused AdamW (stages.models.optim)
    phase loss  the phase's policy and reference log-probs and their exact KL, forward and backward, on the
                phase's own samples of pool batches: before, the output layer and the softmax at every position
                of the padded rows (losses.policy_logprobs); now, at the rows' tokens only
                (student.token_logprobs)

The reference is the decoding of the code before the cached decoder (generation.reference_decoding:
transformers' decoder step by step, every row of a group to the end of the longest, the silence tail's keys and
values projected at every call). The arms alternate, `--repeats` times; the figure is each arm's total seconds
and their ratio. Texts are compared one by one (the decoders differ by float noise; a greedy text that differs
would be a near-tie of two tokens).

    python benchmarks/demo_speed.py --run runs/demo [--stage distill] [--threads 1] [--repeats 1] [--json]

RUN: a run whose pseudo_label and distill stages are done (the demo's). Figures: docs/results.md [Speed].
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.distributed import DistInfo  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.registry import load_builtins  # noqa: E402


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def distill_steps(run: Path, stage: str, train: list, root, steps: int) -> dict:
    """distill's step as it was before [Speed] and as it is now, on the same batches from the same weights,
    alternating step by step; the losses and the weights after the last step must agree to float noise."""
    import numpy as np

    from stages.distill import _kd_positions, _param_groups, target_positions, token_losses
    from stages.models.labelled_data import collate
    from stages.models.optim import adamw
    from stages.models.student import expanded_cross_attention, load_student

    cfg = root.distill
    arms = {}
    for name in ("before", "now"):
        s = load_student(run / stage / "final", "cpu").train()
        if name == "now":
            s.freeze_text_rows()
            opt = adamw(_param_groups(s, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
            opt.register_step_post_hook(s.sync_marker_rows)
        else:  # the hook alone, as distill registered it before
            emb = s.lm.get_input_embeddings().weight
            keep = torch.zeros(emb.shape[0], 1)
            keep[s.spec.text_vocab:] = 1.0
            emb.register_hook(lambda g, keep=keep: g * keep)
            opt = torch.optim.AdamW(_param_groups(s, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
        arms[name] = (s, opt)
    rng = np.random.default_rng(0)
    secs = {"before": 0.0, "now": 0.0}
    losses = {"before": [], "now": []}
    for _ in range(steps):
        exs = [train[i] for i in rng.choice(len(train), cfg.batch_size, replace=False)]
        n_targets = sum(len(e.targets) for e in exs)
        n_kd = sum(_kd_positions(e) for e in exs)
        for name, (s, opt) in arms.items():
            torch.manual_seed(1)  # the same dropout masks in both arms
            ctx = expanded_cross_attention() if name == "before" else contextlib.nullcontext()
            t = time.perf_counter()
            batch = collate(exs, s.spec.bos_id, s.spec.eot_id, "cpu")
            with ctx:
                logits = s(batch.input_ids, batch.attention_mask, batch.modality, batch.features,
                           keep=target_positions(batch))
            st = token_losses(logits, batch, cfg.kd_temperature, True)
            loss = st["ce"] / n_targets + cfg.kd_weight * st["kd"] / max(1, n_kd)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(s.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            secs[name] += time.perf_counter() - t
            losses[name].append(float(loss.detach()))
    same = max(abs(x - y) for x, y in zip(losses["before"], losses["now"]))
    before, now = (arms[k][0].lm.state_dict() for k in ("before", "now"))
    weights = max(float((before[k] - now[k]).abs().max()) for k in before)
    print(f"distill step: before {secs['before'] / steps:.2f} s, now {secs['now'] / steps:.2f} s a step, "
          f"{secs['before'] / secs['now']:.2f}x; largest loss difference {same:.2e}, weight difference {weights:.2e}",
          file=sys.stderr)
    return {"before_s_per_step": secs["before"] / steps, "now_s_per_step": secs["now"] / steps,
            "speedup": secs["before"] / secs["now"], "max_loss_difference": same,
            "max_weight_difference": weights, "steps": steps}


def phase_loss(run: Path, stage: str, pool: list, root, batches: int) -> dict:
    """The phase's policy and reference log-probs and their exact KL, forward and backward, on the phase's samples
    of `batches` pool batches: every position of the padded rows (before) against the rows' tokens only (now).
    The losses and the student's gradients must agree to float noise."""
    from stages.adversarial.losses import exact_kl, policy_logprobs
    from stages.adversarial.rows import input_generator, sample_rows
    from stages.models.student import load_student, token_logprobs

    adv = root.adversarial
    student = load_student(run / stage / "final", "cpu").train()
    reference = load_student(run / stage / "final", "cpu").eval().requires_grad_(False)

    def before(fake):
        mask = fake.attention_mask[:, 1:].float()
        tokens = fake.input_ids[:, 1:].unsqueeze(-1)
        lp_all = policy_logprobs(student, fake)
        with torch.no_grad():
            ref_all = policy_logprobs(reference, fake)
        lp = lp_all.gather(-1, tokens).squeeze(-1)
        return ((lp + adv.kl_weight * exact_kl(lp_all, ref_all)) * mask).sum() / mask.sum()

    def now(fake):
        mask = fake.attention_mask[:, 1:].float()
        args = (fake.input_ids, fake.attention_mask, fake.modality, fake.features)
        lp_all = token_logprobs(student, *args)
        with torch.no_grad():
            ref_all = token_logprobs(reference, *args)
        lp = lp_all.gather(-1, fake.input_ids[:, 1:][mask.bool()].unsqueeze(-1)).squeeze(-1)
        return (lp + adv.kl_weight * exact_kl(lp_all, ref_all)).sum() / mask.sum()

    secs = {"before": 0.0, "now": 0.0}
    diffs, grads, fill = [], [], []
    for it in range(batches):
        exs = pool[it * adv.batch_size: (it + 1) * adv.batch_size]
        gens = [input_generator(root.seed, it, i, "cpu") for i in range(len(exs))]
        with torch.no_grad():
            fake, _ = sample_rows(student, exs, adv.k_samples, gens, adv.temperature, adv.max_new_tokens, "cpu")
        fill.append(float(fake.attention_mask[:, 1:].float().mean()))
        out = {}
        for name, fn in (("before", before), ("now", now)):
            torch.manual_seed(1)  # the same dropout masks in both arms
            student.zero_grad(set_to_none=True)
            t = time.perf_counter()
            loss = fn(fake)
            loss.backward()
            secs[name] += time.perf_counter() - t
            out[name] = (float(loss.detach()), [p.grad.clone() for p in student.parameters() if p.grad is not None])
        diffs.append(abs(out["before"][0] - out["now"][0]))
        grads.append(max(float((x - y).abs().max()) for x, y in zip(out["before"][1], out["now"][1])))
    print(f"phase loss: before {secs['before']:.1f} s, now {secs['now']:.1f} s, {secs['before'] / secs['now']:.2f}x "
          f"({batches} batches, tokens {sum(fill) / len(fill):.0%} of the padded positions); largest loss "
          f"difference {max(diffs):.2e}, gradient difference {max(grads):.2e}", file=sys.stderr)
    return {"before_s": secs["before"], "now_s": secs["now"], "speedup": secs["before"] / secs["now"],
            "token_share": sum(fill) / len(fill), "max_loss_difference": max(diffs),
            "max_gradient_difference": max(grads), "batches": batches}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--stage", default="distill", choices=["distill", "adversarial"], help="whose final/ student")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sample-batches", type=int, default=4, help="pool batches the sampling arm decodes")
    ap.add_argument("--eval-items", type=int, default=64, help="held-out pieces the evaluate arm decodes")
    ap.add_argument("--steps", type=int, default=6, help="distill steps per arm")
    ap.add_argument("--only", nargs="*", default=["val", "sampling", "evaluate", "distill", "phase_loss"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    load_builtins()

    from stages.adversarial.rows import _features, input_generator, sample_rows
    from stages.distill import val_decoding, validate_wer
    from stages.models.batch import decode_seed
    from stages.models.generation import generate, generate_texts, reference_decoding
    from stages.models.labelled_data import load_labelled, within_context
    from stages.models.student import load_student

    run = a.run
    if not (run / "config.yaml").is_file() or not (run / a.stage / "final" / "student.json").is_file():
        raise UserError(f"{run}: needs config.yaml and {a.stage}/final/ (a finished {a.stage} stage)")
    root = load_config([str(run / "config.yaml")]).root
    student = load_student(run / a.stage / "final", "cpu").eval()
    data = load_labelled(run / "pseudo_label", student.tokenizer, root.distill.max_text_tokens,
                         splits=("train", "val", "pool", "test"), modalities=list(student.spec.modalities))
    val = within_context(data.splits["val"], student.spec)[0]
    pool = within_context(data.splits["pool"], student.spec)[0]
    test = [e for e in data.splits["test"] if e.modality == "audio" and e.features is not None][: a.eval_items]
    adv, dec = root.adversarial, root.decoding
    dist = DistInfo()
    results: dict[str, dict] = {}

    def arm(name, old, new, compare):
        tot = {"reference": 0.0, "cached": 0.0}
        outs = {}
        for _ in range(a.repeats):
            with reference_decoding():
                dt, outs["reference"] = _timed(old)
            tot["reference"] += dt
            dt, outs["cached"] = _timed(new)
            tot["cached"] += dt
        same, n = compare(outs["reference"], outs["cached"])
        results[name] = {"reference_s": tot["reference"] / a.repeats, "cached_s": tot["cached"] / a.repeats,
                         "speedup": tot["reference"] / tot["cached"], "same_texts": same, "texts": n}
        r = results[name]
        print(f"{name}: reference {r['reference_s']:.1f} s, cached {r['cached_s']:.1f} s, {r['speedup']:.2f}x; "
              f"{same} of {n} texts the same", file=sys.stderr)
        return outs

    if "val" in a.only:
        def val_check():
            rows: list[dict] = []
            v = validate_wer(student, val, root.distill.batch_size, root.distill.max_text_tokens, dist, rows,
                             val_decoding(root))
            return v, rows

        def cmp_val(x, y):
            return sum(p["prediction"] == q["prediction"] for p, q in zip(x[1], y[1])), len(x[1])

        outs = arm("val check", val_check, val_check, cmp_val)
        results["val check"]["val_wer"] = {k: v[0]["val_wer"] for k, v in outs.items()}

    if "sampling" in a.only:
        batches = [pool[i: i + adv.batch_size] for i in range(0, len(pool), adv.batch_size)][: a.sample_batches]

        def old_sampling():
            texts = []
            for it, exs in enumerate(batches):
                for i, e in enumerate(exs):  # the code before: one call per input
                    f = _features(e, "cpu")
                    g = generate(student, [e.modality] * adv.k_samples, [f] * adv.k_samples,
                                 temperature=adv.temperature, max_new_tokens=adv.max_new_tokens,
                                 generator=input_generator(root.seed, it, i, "cpu"))
                    texts += g.texts
            return texts

        def new_sampling():
            texts = []
            for it, exs in enumerate(batches):
                gens = [input_generator(root.seed, it, i, "cpu") for i in range(len(exs))]
                texts += sample_rows(student, exs, adv.k_samples, gens, adv.temperature, adv.max_new_tokens, "cpu")[1]
            return texts

        arm("phase sampling", old_sampling, new_sampling,
            lambda x, y: (sum(p == q for p, q in zip(x, y)), len(x)))

    if "evaluate" in a.only:
        def eval_decode():
            out = []
            for t in (0.0, 1.0):
                for j in range(0, len(test), 16):
                    part = test[j: j + 16]
                    gen = torch.Generator().manual_seed(j)
                    out += generate_texts(student, "audio", [e.features.float() for e in part], chunks=None,
                                          fallback=dec.fallback_temperatures,
                                          max_compression_ratio=dec.max_compression_ratio,
                                          min_avg_logprob=dec.min_avg_logprob, best_of=dec.best_of,
                                          max_ngram_repeats=dec.max_ngram_repeats, temperature=t,
                                          max_new_tokens=dec.max_new_tokens, generator=gen,
                                          keys=[e.key for e in part], seed=decode_seed(root.seed, "audio", t))
            return out

        arm("evaluate", eval_decode, eval_decode, lambda x, y: (sum(p == q for p, q in zip(x, y)), len(x)))

    if "distill" in a.only:
        results["distill step"] = distill_steps(run, a.stage, data.splits["train"], root, a.steps)

    if "phase_loss" in a.only:
        results["phase loss"] = phase_loss(run, a.stage, pool, root, a.sample_batches)

    if a.json:
        print(json.dumps({"run": str(run), "stage": a.stage, "threads": a.threads, "repeats": a.repeats,
                          "val_clips": len(val), "pool_inputs": min(len(pool), a.sample_batches * adv.batch_size),
                          "eval_pieces": len(test), "arms": results}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
