"""`groundgan generate`'s path (pipeline.api: the teacher's encoder alone, then the student's batched decoding)
against what the pipeline does for the same clips (pseudo_label's teacher.label, which also decodes the
teacher's text, in batches of pseudo_label.batch_size; then evaluate's generate_texts in blocks of
evaluate.batch_size), on the same decoded clips, the same student and decoding settings, in one process.

    python benchmarks/generate_throughput.py --run runs/demo [--stage distill] [--config CONFIG] [--limit N]

Inputs: the run's held-out (test) audio clips from its pseudo_label shards, decoded once before timing.
Prints clips per second of each and the ratio, and whether the texts agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--stage", default="distill")
    ap.add_argument("--config", default=None, help="teacher and decoding settings (default: the run's config.yaml)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from modalities.audio import Audio
    from pipeline.config import load_config
    from stages.models.batch import LoadedStudent, decode_seed
    from stages.models.generation import generate_texts
    from stages.models.student import load_student
    from stages.pseudo_label import read_labelled

    run = Path(a.run)
    cfg = load_config([a.config or str(run / "config.yaml")])
    acfg, dec = cfg.root.modalities["audio"], cfg.root.decoding
    items = sorted(((rec["key"], ext, data) for _, rec, ext, data, _ in
                    read_labelled(run / "pseudo_label", modalities=["audio"], splits=("test",), arrays=False)))
    items = items[: a.limit] if a.limit else items
    adapter = Audio(acfg)
    audio = [adapter.decode(d, e) for _, e, d in items]
    keys = [k for k, _, _ in items]
    seconds = sum(x.size for x in audio) / 16000
    student = load_student(run / a.stage / "final", "cpu")
    loaded = LoadedStudent(student, dec, {"audio": acfg}, int(cfg.root.seed), str(run), "cpu")
    teacher = loaded.teacher("audio")  # built once, shared: both sides time labelling/encoding, not loading
    label_batch = cfg.root.pseudo_label.batch_size
    eval_batch = cfg.root.evaluate.batch_size
    seed = decode_seed(int(cfg.root.seed), "audio", 0.0)
    print(f"{len(items)} test clips ({seconds:.0f} s of audio) of {run}, {a.stage} student, {a.threads} thread(s)",
          flush=True)

    # baseline: pseudo_label's labelling (features stored), then evaluate's decoding
    t0 = time.perf_counter()
    feats, chunks = [], []
    for i in range(0, len(audio), label_batch):
        for lab in teacher.label(audio[i: i + label_batch]):
            f = lab.arrays["features"]
            feats.append(torch.from_numpy(np.asarray(f, np.float32).reshape(-1, f.shape[-1])))
            cf = lab.arrays.get("chunk_frames")
            chunks.append(None if cf is None else [int(c) for c in cf])
    t_label = time.perf_counter() - t0
    base = []
    for i in range(0, len(feats), eval_batch):
        gen = torch.Generator().manual_seed(seed)
        base += generate_texts(student, "audio", feats[i: i + eval_batch], chunks=chunks[i: i + eval_batch],
                               fallback=dec.fallback_temperatures, max_compression_ratio=dec.max_compression_ratio,
                               min_avg_logprob=dec.min_avg_logprob, best_of=dec.best_of,
                               max_ngram_repeats=dec.max_ngram_repeats, temperature=0.0,
                               max_new_tokens=dec.max_new_tokens, generator=gen, keys=keys[i: i + eval_batch],
                               seed=seed)
    t_base = time.perf_counter() - t0

    # ours: groundgan generate's path
    t0 = time.perf_counter()
    ours = loaded.generate(audio, modality="audio", keys=keys, batch_size=eval_batch)
    t_ours = time.perf_counter() - t0
    same = sum(o["text"] == b for o, b in zip(ours, base))
    print(f"baseline (label + evaluate decoding): {t_base:.1f} s ({t_label:.1f} s labelling), "
          f"{len(items) / t_base:.2f} clips/s")
    print(f"ours (encoder + batched decoding):    {t_ours:.1f} s, {len(items) / t_ours:.2f} clips/s")
    print(f"speed-up {t_base / t_ours:.2f}x; texts equal on {same}/{len(items)} clips")


if __name__ == "__main__":
    main()
