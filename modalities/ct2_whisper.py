"""CTranslate2 (faster-whisper) Whisper model folder -> openai-whisper checkpoint.

A CTranslate2 folder holds `model.bin` (every weight under a CTranslate2 name), `config.json` and a
vocabulary. openai-whisper wants `{"dims": ModelDimensions, "model_state_dict": {...}}`. This module reads
model.bin (format below), renames and splits the fused tensors, and caches the result as safetensors plus a
JSON of the dims under `<cache>/<sha256(model.bin)[:16]>/`, so the next load is a plain file read.

model.bin, little-endian; a string is a uint16 length (counting a trailing NUL), the bytes and the NUL:
    uint32 version (6) | string spec name ("WhisperSpec") | uint32 revision | uint32 variable count
    per variable: string name | uint8 rank | uint32 per dimension | uint8 dtype | uint32 byte count | bytes
    uint32 alias count | per alias: string alias, string target
dtype: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.files import atomic_write, atomic_write_json, sha256_file

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_CACHE_FORMAT = 1  # bump when the converted layout changes, so old caches are not reused


def default_cache_dir() -> Path:
    return Path(os.environ.get("GROUNDGAN_CACHE", Path.home() / ".cache" / "groundgan")) / "whisper"


# ------------------------------------------------------------------------------------------------ reading
class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise UserError(f"{self.path}: truncated CTranslate2 model (ends at byte {len(self.data)})")
        value = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("H")
        raw = self.take_bytes(n)
        return raw.rstrip(b"\0").decode("utf-8")

    def take_bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise UserError(f"{self.path}: truncated CTranslate2 model (ends at byte {len(self.data)})")
        raw = self.data[self.pos: self.pos + n]
        self.pos += n
        return raw


def read_ct2_model(path: str | os.PathLike) -> tuple[str, int, dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 model.bin -> (spec name, revision, {name: array}, {alias: target})."""
    path = str(path)
    r = _Reader(Path(path).read_bytes(), path)
    version = r.take("I")
    if version != 6:
        raise UserError(f"{path}: CTranslate2 model format version {version} is not supported (expected 6)")
    spec, revision = r.string(), r.take("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.take("I")):
        name = r.string()
        rank = r.take("B")
        shape = tuple(r.take("I") for _ in range(rank))
        dtype_id, nbytes = r.take("B"), r.take("I")
        raw = r.take_bytes(nbytes)
        if dtype_id not in _DTYPES:
            raise UserError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        if _DTYPES[dtype_id] == "bfloat16":
            # numpy has no bfloat16: it is the top half of a float32.
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype_id]).newbyteorder("<"))
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise UserError(f"{path}: variable {name!r} holds {arr.size} values for shape {shape}")
        variables[name] = arr.reshape(shape)
    aliases = {}
    for _ in range(r.take("I")):
        alias = r.string()
        aliases[alias] = r.string()
    return spec, revision, variables, aliases


# --------------------------------------------------------------------------------------------- conversion
def _float(variables: dict[str, np.ndarray], name: str) -> torch.Tensor:
    """A float32 tensor; int8/int16 weights are dequantised with their `<name>_scale` (w / scale per row)."""
    if name not in variables:
        raise UserError(f"CTranslate2 Whisper model has no variable {name!r}")
    arr = variables[name]
    if arr.dtype.kind in "iu":
        scale = variables.get(name + "_scale")
        if scale is None:
            raise UserError(f"quantised variable {name!r} has no {name}_scale")
        scale = np.asarray(scale, dtype=np.float32)
        arr = arr.astype(np.float32) / (scale.reshape(-1, *([1] * (arr.ndim - 1))) if scale.ndim else scale)
    return torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))


def _scalar(variables: dict[str, np.ndarray], name: str) -> int:
    return int(np.asarray(variables[name]).reshape(-1)[0])


def _n_layers(variables: dict[str, np.ndarray], side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def ct2_to_whisper(variables: dict[str, np.ndarray], aliases: dict[str, str]) -> dict:
    """CTranslate2 WhisperSpec variables -> {"dims": ModelDimensions as a dict, "model_state_dict": {...}}."""
    from whisper.model import ModelDimensions

    for name, want in (("decoder/pre_norm", 1), ("decoder/alibi", 0), ("decoder/scale_embeddings", 0)):
        if name in variables and _scalar(variables, name) != want:
            raise UserError(f"CTranslate2 model: {name}={_scalar(variables, name)} is not a Whisper layout (want {want})")
    projection = aliases.get("decoder/projection/weight")
    if projection is None and "decoder/projection/weight" in variables:
        if not np.array_equal(variables["decoder/projection/weight"], variables["decoder/embeddings/weight"]):
            raise UserError("CTranslate2 model: decoder projection differs from the embeddings; Whisper ties them")
    elif projection is not None and projection != "decoder/embeddings/weight":
        raise UserError(f"CTranslate2 model: decoder/projection aliases {projection!r}, not the embeddings")

    sd: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str, bias: bool = True):
        sd[f"{dst}.weight"] = _float(variables, f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = _float(variables, f"{src}/bias")

    def norm(dst: str, src: str):
        sd[f"{dst}.weight"] = _float(variables, f"{src}/gamma")
        sd[f"{dst}.bias"] = _float(variables, f"{src}/beta")

    def fused_qkv(dst: str, src: str):
        w, b = _float(variables, f"{src}/weight"), _float(variables, f"{src}/bias")
        for part, w_i, b_i in zip(("query", "key", "value"), w.chunk(3, 0), b.chunk(3, 0)):
            sd[f"{dst}.{part}.weight"] = w_i.contiguous()
            if part != "key":  # Whisper's key projection has no bias (CTranslate2 stores zeros)
                sd[f"{dst}.{part}.bias"] = b_i.contiguous()

    def self_attention(dst: str, src: str):
        norm(f"{dst}.attn_ln", f"{src}/layer_norm")
        fused_qkv(f"{dst}.attn", f"{src}/linear_0")
        linear(f"{dst}.attn.out", f"{src}/linear_1")

    def ffn(dst: str, src: str):
        norm(f"{dst}.mlp_ln", f"{src}/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/linear_1")

    sd["encoder.conv1.weight"] = _float(variables, "encoder/conv1/weight")
    sd["encoder.conv1.bias"] = _float(variables, "encoder/conv1/bias")
    sd["encoder.conv2.weight"] = _float(variables, "encoder/conv2/weight")
    sd["encoder.conv2.bias"] = _float(variables, "encoder/conv2/bias")
    sd["encoder.positional_embedding"] = _float(variables, "encoder/position_encodings/encodings")
    n_audio_layer = _n_layers(variables, "encoder")
    for i in range(n_audio_layer):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        self_attention(dst, f"{src}/self_attention")
        ffn(dst, f"{src}/ffn")
    norm("encoder.ln_post", "encoder/layer_norm")

    sd["decoder.token_embedding.weight"] = _float(variables, "decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = _float(variables, "decoder/position_encodings/encodings")
    n_text_layer = _n_layers(variables, "decoder")
    for i in range(n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        self_attention(dst, f"{src}/self_attention")
        norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
        kv_w, kv_b = _float(variables, f"{src}/attention/linear_1/weight"), _float(variables, f"{src}/attention/linear_1/bias")
        k_w, v_w = kv_w.chunk(2, 0)
        sd[f"{dst}.cross_attn.key.weight"] = k_w.contiguous()
        sd[f"{dst}.cross_attn.value.weight"] = v_w.contiguous()
        sd[f"{dst}.cross_attn.value.bias"] = kv_b.chunk(2, 0)[1].contiguous()
        linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        ffn(dst, f"{src}/ffn")
    norm("decoder.ln", "decoder/layer_norm")

    if not n_audio_layer or not n_text_layer:
        raise UserError("CTranslate2 model has no encoder or decoder layers: not a Whisper model")
    dims = ModelDimensions(
        n_mels=sd["encoder.conv1.weight"].shape[1],
        n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=sd["encoder.positional_embedding"].shape[1],
        n_audio_head=_scalar(variables, "encoder/num_heads"),
        n_audio_layer=n_audio_layer,
        n_vocab=sd["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=sd["decoder.positional_embedding"].shape[0],
        n_text_state=sd["decoder.positional_embedding"].shape[1],
        n_text_head=_scalar(variables, "decoder/num_heads"),
        n_text_layer=n_text_layer,
    )
    return {"dims": dataclasses.asdict(dims), "model_state_dict": sd}


def convert_ct2_dir(model_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> tuple[dict, str]:
    """A CTranslate2 Whisper folder -> (openai-whisper checkpoint dict, sha256 of model.bin).

    The conversion is cached under `cache_dir/<sha256[:16]>/` (default ~/.cache/groundgan/whisper); both
    cache files are written to a temporary name and os.replace'd, so concurrent processes never read a part.
    """
    from safetensors.torch import load_file, save

    model_dir = Path(model_dir)
    model_bin = model_dir / "model.bin"
    if not model_bin.is_file():
        raise UserError(f"{model_dir} is not a CTranslate2 model folder (no model.bin)")
    sha = sha256_file(model_bin)
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = out / sha[:16]
    weights, dims_json = out / "model.safetensors", out / "dims.json"
    if weights.is_file() and dims_json.is_file():
        meta = json.loads(dims_json.read_text())
        if meta.get("format") == _CACHE_FORMAT and meta.get("sha256") == sha:
            return {"dims": meta["dims"], "model_state_dict": load_file(str(weights))}, sha

    spec, _, variables, aliases = read_ct2_model(model_bin)
    if spec != "WhisperSpec":
        raise UserError(f"{model_bin}: a CTranslate2 {spec}, not a WhisperSpec model")
    checkpoint = ct2_to_whisper(variables, aliases)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in checkpoint["model_state_dict"].items()}
    atomic_write(weights, lambda f: f.write(save(tensors)))
    atomic_write_json(dims_json, {"format": _CACHE_FORMAT, "sha256": sha, "source": str(model_dir.resolve()),
                                  "dims": checkpoint["dims"]})
    return checkpoint, sha

