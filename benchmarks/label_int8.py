"""The labeller with int8 linear layers (`modalities.audio.teacher.quantize: int8`, dynamic quantisation) against
the same labeller in float32, on the same clips, in one process: speed ratio and WER of each.

    .venv/bin/python benchmarks/label_int8.py [--data DIR] [--n N] [--batch-size 16] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from label_throughput import DEFAULT_DATA, corpus_wer, label_batches, load_clips, normalized  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import torch

    from modalities.audio import Audio, AudioConfig
    from modalities.whisper_teacher import WhisperTeacherConfig

    torch.set_num_threads(args.threads)
    names, clips, refs = load_clips(args.data, args.n)
    teachers = {q: Audio(AudioConfig(teacher=WhisperTeacherConfig(quantize=q))).build_teacher("cpu", 0, True)
                for q in ("none", "int8")}
    for t in teachers.values():
        label_batches(t, clips[:1], args.batch_size)  # warm-up
    out = {}
    for q, t in teachers.items():
        start = time.perf_counter()
        texts = [lab.text for lab in label_batches(t, clips, args.batch_size)]
        out[q] = (texts, time.perf_counter() - start)
    (f_texts, f_s), (q_texts, q_s) = out["none"], out["int8"]
    result = {"n_clips": len(clips), "threads": args.threads, "float32_s": round(f_s, 1), "int8_s": round(q_s, 1),
              "speedup": round(f_s / q_s, 2), "float32_wer": round(corpus_wer(refs, f_texts), 4),
              "int8_wer": round(corpus_wer(refs, q_texts), 4),
              "clips_differing": sum(normalized(a) != normalized(b) for a, b in zip(f_texts, q_texts))}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
