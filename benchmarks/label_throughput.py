"""Pseudo-labelling throughput: our batched WhisperTeacher against openai-whisper's own sequential
`transcribe()`, on the same clips, the same weights, the same threads, in one process.

    .venv/bin/python benchmarks/label_throughput.py [--n 433] [--batch-size 16] [--json]

(a) baseline: model.transcribe(audio_16k, temperature=0.0, condition_on_previous_text=False, fp16=False), one
    clip at a time; (a') the same with transcribe's default temperature fallback (0, 0.2, ..., 1.0; `ratio_fallback`
    and `baseline_fallback_*`); (b) ours: WhisperTeacher.label in consecutive batches, as the pseudo_label stage
    calls it (with its own fallback, on the clips that need it).
All get the same soundfile-decoded 16 kHz arrays; decoding is not timed. WER uses whisper's English
normaliser and jiwer over the clips whose reference normalises to words. Peak memory of (b) alone is
measured in child processes at two clip counts (each decoding its clips batch by batch, as the stage decodes a
shard's), to show that it does not grow with the number of clips.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "speech" / "asterisk-en"


def speech_records(data: Path, n: int | None) -> list[dict]:
    """The first n manifest records whose reference is speech."""
    from modalities.whisper_teacher import normalize_text

    manifest = data / "transcripts.jsonl"
    if not manifest.is_file():
        sys.exit(f"no speech data at {data.resolve()} (see ../shared/data/README.md); pass --data")
    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [r for r in records if normalize_text(r["text"]).strip()][: n or None]


def decode_clips(data: Path, records: list[dict]) -> list:
    from modalities.audio import Audio, AudioConfig

    audio = Audio(AudioConfig())
    return [audio.decode((data / r["audio"]).read_bytes(), Path(r["audio"]).suffix.lstrip(".")) for r in records]


def load_clips(data: Path, n: int | None):
    """The first n clips whose reference is speech -> (names, 16 kHz float32 arrays, references)."""
    records = speech_records(data, n)
    return [r["audio"] for r in records], decode_clips(data, records), [r["text"] for r in records]


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    import jiwer

    from modalities.whisper_teacher import normalize_text

    return float(jiwer.wer([normalize_text(r) for r in references], [normalize_text(h) for h in hypotheses]))


def build_teacher():
    from modalities.audio import Audio, AudioConfig

    # The stage's defaults: top-k off, features stored.
    return Audio(AudioConfig()).build_teacher("cpu", top_k=0, store_features=True)


def baseline_model():
    """The same weights as the teacher's, as a plain openai-whisper model in float32."""
    from modalities.whisper_teacher import WhisperTeacherConfig, load_whisper

    model, _, _ = load_whisper(WhisperTeacherConfig())
    return model.eval()


def normalized(text: str) -> str:
    from modalities.whisper_teacher import normalize_text

    return normalize_text(text).strip()


def label_batches(teacher, clips, batch_size: int) -> list:
    """The labeller as the benchmark times it: consecutive batches of batch_size clips -> one Label per clip."""
    return [lab for i in range(0, len(clips), batch_size) for lab in teacher.label(clips[i: i + batch_size])]


def run_ours(teacher, clips, batch_size: int) -> tuple[list[str], float]:
    start = time.perf_counter()
    labels = label_batches(teacher, clips, batch_size)
    run_ours.labels = labels
    return [lab.text for lab in labels], time.perf_counter() - start


def run_baseline(model, clips, fallback: bool = False) -> tuple[list[str], float]:
    """transcribe, one clip at a time: at temperature 0 only, or (fallback) with its default temperatures."""
    kw = {} if fallback else {"temperature": 0.0}
    start = time.perf_counter()
    texts = [model.transcribe(c, condition_on_previous_text=False, fp16=False, **kw)["text"] for c in clips]
    return texts, time.perf_counter() - start


def own_peak_rss_mb() -> float:
    """This process's own peak resident size in MB: VmHWM, which starts afresh at exec. Not getrusage's ru_maxrss:
    Linux carries into it the resident size of the process that spawned this one (measured here: a child of a
    1.5 GB parent reads 1513 MB there and 13.5 MB in VmHWM), so a child of the benchmark, which holds both models
    and the decoded clips, reported the benchmark's own size. ru_maxrss only where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_of_ours(args, n: int) -> float:
    """Peak RSS (MB) of a child process that loads the teacher and labels n clips, and does nothing else."""
    cmd = [sys.executable, __file__, "--only-ours", "--n", str(n), "--data", str(args.data),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="clips to use (default: all with speech references)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with transcripts.jsonl and the WAVs")
    p.add_argument("--batch-size", type=int, default=16, help="clips per teacher call (pseudo_label's default)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, the same for both")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--only-ours", action="store_true", help=argparse.SUPPRESS)  # child for the memory figure
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.only_ours:
        clips = None
    else:
        names, clips, refs = load_clips(args.data, args.n)

    if args.only_ours:
        teacher = build_teacher()
        records = speech_records(args.data, args.n)
        for i in range(0, len(records), args.batch_size):  # decoded batch by batch, as the stage decodes a shard's
            teacher.label(decode_clips(args.data, records[i: i + args.batch_size]))
        print(json.dumps({"peak_rss_mb": own_peak_rss_mb()}))
        return

    teacher = build_teacher()
    model = baseline_model()
    seconds = sum(c.size for c in clips) / 16000
    # One warm-up clip each, so neither pays first-call costs (allocator, kernel selection) inside the timing.
    run_baseline(model, clips[:1])
    run_ours(teacher, clips[:1], args.batch_size)
    if teacher.vocab is not None:
        teacher.vocab.rows = teacher.vocab.rows_exact = 0

    base_texts, base_s = run_baseline(model, clips)
    fall_texts, fall_s = run_baseline(model, clips, fallback=True)
    our_texts, our_s = run_ours(teacher, clips, args.batch_size)
    labels = run_ours.labels
    sizes = sorted({max(1, len(clips) // 8), len(clips)})
    result = {
        "n_clips": len(clips),
        "audio_s": round(seconds, 1),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "baseline_x_realtime": round(seconds / base_s, 2),
        "ours_x_realtime": round(seconds / our_s, 2),
        "ratio": round(base_s / our_s, 2),
        "baseline_wer": round(corpus_wer(refs, base_texts), 4),
        "ours_wer": round(corpus_wer(refs, our_texts), 4),
        "clips_differing": sum(normalized(a) != normalized(b) for a, b in zip(base_texts, our_texts)),
        "peak_rss_mb": {n: round(peak_rss_of_ours(args, n), 1) for n in sizes},
        "baseline_fallback_x_realtime": round(seconds / fall_s, 2),
        "ratio_fallback": round(fall_s / our_s, 2),
        "baseline_fallback_wer": round(corpus_wer(refs, fall_texts), 4),
        "clips_differing_fallback": sum(normalized(a) != normalized(b) for a, b in zip(fall_texts, our_texts)),
        # ours: clips with a window decoded again on the exact context / at a temperature > 0; runaway labels
        "ours_redecoded": sum(bool(lab.info.get("windows_redecoded")) for lab in labels),
        "ours_sampled": sum(lab.info.get("temperature", 0.0) > 0 for lab in labels),
        "ours_runaway": sum(bool(lab.info.get("runaway")) for lab in labels),
        # greedy steps' rows through the int8 vocabulary search (teacher.vocab_search), and those its guard sent
        # whole to float32 (0 where the search is off)
        "ours_vocab_rows": getattr(teacher.vocab, "rows", 0),
        "ours_vocab_rows_float32": getattr(teacher.vocab, "rows_exact", 0),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"clips: {result['n_clips']} ({result['audio_s']} s of audio), torch threads: {args.threads}, batch size: {args.batch_size}")
    print(f"baseline  openai-whisper transcribe, sequential: {result['baseline_x_realtime']:7.2f}x real time  WER {100 * result['baseline_wer']:.2f}%")
    print(f"ours      WhisperTeacher.label, batched:         {result['ours_x_realtime']:7.2f}x real time  WER {100 * result['ours_wer']:.2f}%")
    print(f"baseline' transcribe with its temperature fallback:    {result['baseline_fallback_x_realtime']:7.2f}x real time  WER {100 * result['baseline_fallback_wer']:.2f}%")
    print(f"speed-up: {result['ratio']:.2f}x; WER difference: {100 * (result['ours_wer'] - result['baseline_wer']):+.2f} points; "
          f"clips whose normalised text differs: {result['clips_differing']}")
    print(f"against transcribe with fallback: {result['ratio_fallback']:.2f}x, WER difference "
          f"{100 * (result['ours_wer'] - result['baseline_fallback_wer']):+.2f} points, {result['clips_differing_fallback']} clips differ")
    print(f"ours: {result['ours_redecoded']} clips decoded again on the exact context, {result['ours_sampled']} at a "
          f"temperature > 0, {result['ours_runaway']} runaway labels; vocabulary search: "
          f"{result['ours_vocab_rows_float32']} of {result['ours_vocab_rows']} greedy rows sent whole to float32")
    print("peak RSS of ours alone: " + ", ".join(f"{n} clips {mb:.0f} MB" for n, mb in result["peak_rss_mb"].items()))


if __name__ == "__main__":
    main()
