"""Does the exported Whisper model transcribe as groundgan's own decoding does?

groundgan's student reads the teacher's encoding of each clip (a clip over teacher.chunk_seconds: of each chunk)
followed by the encoding of 30 s of silence; a standard Whisper model encodes the clip padded to a 30 s window.
This script decodes the held-out (test) clips of a run's short-form set (<= 30 s, with a reference) every way:

    report          the texts of the run's evaluate stage (RUN/evaluate/generations/test/audio/<stage>/T0.json)
    gg_chunks       groundgan decoding of the pseudo-label features (chunked, silence tail): what evaluate does
    gg_whole        groundgan decoding of the whole clip's trimmed encoding (no chunks), silence tail
    gg_window       groundgan decoding of the full 30 s window's encoding, silent samples past the clip (what the
                    transformers pipeline reads)
    gg_zeropad      the same with zero log-mel frames past the clip (what openai-whisper's transcribe reads)
    gg_window_greedy, gg_zeropad_greedy   the same two without the temperature fallback
    hf              the exported folder through transformers.pipeline("automatic-speech-recognition"), config only
    hf_fallback     the same with generate_kwargs temperature = the exported fallback schedule
    openai          whisper.load_model(openai-whisper.pt).transcribe(temperature=0, without_timestamps=True)
    hf_long         pipeline(chunk_length_s=30) on every clip with a reference (long clips included)

and prints the WER of each (Whisper-normalised, pooled over clips, as the report computes it).

    python benchmarks/export_fidelity.py --run runs/demo --stage distill [--config configs/demo.yaml] [--out f.json]

--config names the teacher and decoding settings where the run's own config.yaml no longer loads (a run made by
an older revision); the run's config is used otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
    ap.add_argument("--config", default=None)
    ap.add_argument("--export", default=None, help="an existing export of the run (default: export into a temp dir)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--split", default="test", help="the clips decoded: test (held out), or val (to choose a recipe "
                                                    "without reading the test clips; `report` then has no texts)")
    ap.add_argument("--ways", default="report,gg_chunks,gg_whole,gg_window,hf,hf_fallback,openai,hf_long")
    a = ap.parse_args()
    torch.set_num_threads(1)

    from modalities.audio import Audio
    from modalities.whisper_teacher import encode, load_whisper, log_mel
    from pipeline.config import load_config, to_plain
    from stages.evaluation.text_metrics import align
    from stages.models.export import export_student
    from stages.models.generation import generate_texts
    from stages.models.student import load_student
    from stages.pseudo_label import read_labelled

    run = Path(a.run)
    cfg = load_config([a.config or str(run / "config.yaml")])
    acfg = cfg.root.modalities["audio"]
    dec = cfg.root.decoding
    ways = a.ways.split(",")
    if a.split != "test":  # the report and the long-form comparison read the evaluate stage's test texts
        ways = [w for w in ways if w not in ("report", "hf_long")]

    items = []
    for m, rec, ext, data, arrays in read_labelled(run / "pseudo_label", modalities=["audio"], splits=(a.split,)):
        f = arrays.get("features")
        cf = arrays.get("chunk_frames")
        items.append({"key": rec["key"], "ref": rec.get("reference"), "ext": ext, "data": data,
                      "features": np.asarray(f, np.float32).reshape(-1, f.shape[-1]),
                      "chunks": None if cf is None else [int(c) for c in np.asarray(cf).reshape(-1)]})
    items.sort(key=lambda it: it["key"])
    adapter = Audio(acfg)
    for it in items:
        it["audio"] = adapter.decode(it["data"], it["ext"])
    short = [it for it in items if it["features"].shape[0] <= 1500]
    if a.limit:
        short = short[: a.limit]
    print(f"{len(items)} {a.split} clips, {len(short)} short-form (<= 30 s)", flush=True)

    final = run / a.stage / "final"
    student = load_student(final, "cpu")
    # a fresh export of this run's student unless --export names one (a fixed temp path was reused across runs)
    export = Path(a.export) if a.export else Path(tempfile.mkdtemp(prefix=f"export_fidelity_{a.stage}_")) / "export"
    if not (export / "config.json").is_file():
        teacher_cfg = acfg.teacher
        export_student(final, export, to_plain(dec), {"audio": to_plain(acfg)},
                       {"audio": lambda: load_whisper(teacher_cfg)[0].float().eval()}, run=run, stage=a.stage)
    texts: dict[str, list[str]] = {}
    secs: dict[str, float] = {}
    kw = dict(fallback=dec.fallback_temperatures, max_compression_ratio=dec.max_compression_ratio,
              min_avg_logprob=dec.min_avg_logprob, best_of=dec.best_of, max_ngram_repeats=dec.max_ngram_repeats,
              temperature=0.0, max_new_tokens=dec.max_new_tokens)

    def gg(feats, chunks, greedy=False):
        out = []
        for i in range(0, len(feats), 16):
            gen = torch.Generator().manual_seed(i)
            out += generate_texts(student, "audio", feats[i: i + 16], chunks=chunks[i: i + 16], generator=gen,
                                  **(dict(kw, fallback=()) if greedy else kw))
        return out

    t0 = time.time()
    if "report" in ways:
        rep = json.loads((run / "evaluate" / "generations" / "test" / "audio" / a.stage / "T0.json").read_text())
        by_key = dict(zip(rep["keys"], rep["texts"]))
        texts["report"] = [by_key[it["key"]] for it in short]
    if "gg_chunks" in ways:
        t = time.time()
        texts["gg_chunks"] = gg([torch.from_numpy(it["features"]) for it in short], [it["chunks"] for it in short])
        secs["gg_chunks"] = time.time() - t
    teacher = load_whisper(acfg.teacher)[0].float().eval()
    if "gg_whole" in ways:
        import dataclasses

        from modalities.whisper_teacher import WhisperTeacher

        t = time.time()
        wt = WhisperTeacher(dataclasses.replace(acfg.teacher, chunk_seconds=30.0), "cpu", store_features=True)
        feats = []
        for it in short:
            feats.append(torch.from_numpy(wt.label([it["audio"]])[0].arrays["features"].astype(np.float32)))
        texts["gg_whole"] = gg(feats, [None] * len(short))
        secs["gg_whole"] = time.time() - t
    for pad in ("window", "zeropad"):  # past the clip: silent samples (the HF pipeline) or zero log-mel (transcribe)
        wanted = [w for w in (f"gg_{pad}", f"gg_{pad}_greedy") if w in ways]
        if not wanted:
            continue
        t = time.time()
        feats = []
        with torch.no_grad():
            for it in short:
                mel = log_mel([it["audio"]], 3000, teacher.dims.n_mels, torch.device("cpu"), pad_zeros=pad == "zeropad")
                feats.append(encode(teacher, mel)[0].clone())
        t_enc = time.time() - t
        for w in wanted:
            t = time.time()
            texts[w] = gg(feats, [None] * len(short), greedy=w.endswith("_greedy"))
            secs[w] = t_enc + time.time() - t
    if any(w.startswith("hf") for w in ways):
        from transformers import pipeline

        asr = pipeline("automatic-speech-recognition", model=str(export), device="cpu")
        def inputs():  # the pipeline pops "raw" from each dict: fresh ones per call
            return [{"raw": it["audio"], "sampling_rate": 16000} for it in short]
        if "hf" in ways:
            t = time.time()
            texts["hf"] = [o["text"] for o in asr(inputs(), batch_size=8)]
            secs["hf"] = time.time() - t
        temps = getattr(asr.model.generation_config, "temperature_fallback", None)
        if "hf_fallback" in ways and temps:
            t = time.time()
            torch.manual_seed(0)
            texts["hf_fallback"] = [o["text"] for o in asr(inputs(), batch_size=8,
                                                            generate_kwargs={"temperature": tuple(temps)})]
            secs["hf_fallback"] = time.time() - t
    if "openai" in ways:
        import whisper

        t = time.time()
        wm = whisper.load_model(str(export / "openai-whisper.pt"), device="cpu")
        texts["openai"] = [wm.transcribe(it["audio"], temperature=0, without_timestamps=True, fp16=False)["text"]
                           for it in short]
        secs["openai"] = time.time() - t
    refs = [it["ref"] for it in short]
    rows = {}
    for w, hyp in texts.items():
        al = align(hyp, refs)
        rows[w] = {"wer": al.wer, "n": al.n, "seconds": round(secs.get(w, 0.0), 1)}
    if "hf_long" in ways:
        withref = [it for it in items if it["ref"]]
        t = time.time()
        long_t = [o["text"] for o in asr([{"raw": it["audio"], "sampling_rate": 16000} for it in withref],
                                         batch_size=8, chunk_length_s=30)]
        al = align(long_t, [it["ref"] for it in withref])
        rows["hf_long"] = {"wer": al.wer, "n": al.n, "seconds": round(time.time() - t, 1)}
        texts["hf_long"] = long_t
        base = json.loads((run / "evaluate" / "generations" / "test" / "audio" / a.stage / "T0.json").read_text())
        by_key = dict(zip(base["keys"], base["texts"]))
        al = align([by_key[it["key"]] for it in withref], [it["ref"] for it in withref])
        rows["report_all"] = {"wer": al.wer, "n": al.n, "seconds": 0.0}
    print(f"{a.stage} of {run}: WER on the {a.split} clips (total {time.time() - t0:.0f} s)")
    for w, r in rows.items():
        print(f"  {w:12s} {100 * r['wer']:.1f}%  n={r['n']}  {r['seconds']} s")
    diff = {w: sum(x != y for x, y in zip(texts[w], texts.get("gg_chunks", texts.get("report", []))))
            for w in texts if w not in ("hf_long",)}
    print("  texts differing from gg_chunks:", diff)
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows, "keys": [it["key"] for it in short], "texts": texts,
                                           "refs": refs}, indent=1))


if __name__ == "__main__":
    main()
