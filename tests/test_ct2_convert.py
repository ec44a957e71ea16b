"""CTranslate2 -> openai-whisper conversion: a tiny random Whisper is written in the CTranslate2 format by
this test's own writer (independent of the reader under test), converted back, and must give the same
weights and the same logits."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from modalities.ct2_whisper import convert_ct2_dir, read_ct2_model
from pipeline.errors import UserError

torch.set_num_threads(1)

DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
             np.dtype(np.float16): 4}


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path, variables: dict[str, np.ndarray], aliases: dict[str, str], spec="WhisperSpec", revision=3):
    out = [struct.pack("<I", 6), _string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, arr in variables.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        out += [_string(name), struct.pack("<B", arr.ndim), *(struct.pack("<I", d) for d in arr.shape),
                struct.pack("<B", DTYPE_IDS[arr.dtype]), struct.pack("<I", len(raw)), raw]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))


def whisper_to_ct2(model, dtype=np.float32) -> tuple[dict, dict]:
    """The inverse mapping, written from the CTranslate2 WhisperSpec layout."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.dims
    v: dict[str, np.ndarray] = {}

    def put(name, arr):
        v[name] = np.asarray(arr).astype(dtype)

    def lin(dst, src, bias=True):
        put(f"{dst}/weight", sd[f"{src}.weight"])
        if bias:
            put(f"{dst}/bias", sd[f"{src}.bias"])

    def ln(dst, src):
        put(f"{dst}/gamma", sd[f"{src}.weight"])
        put(f"{dst}/beta", sd[f"{src}.bias"])

    def qkv(dst, src):
        put(f"{dst}/weight", np.concatenate([sd[f"{src}.query.weight"], sd[f"{src}.key.weight"], sd[f"{src}.value.weight"]]))
        put(f"{dst}/bias", np.concatenate([sd[f"{src}.query.bias"], np.zeros(d.n_audio_state if "encoder" in src else d.n_text_state),
                                           sd[f"{src}.value.bias"]]))

    def block(side, i, cross):
        src, dst = f"{side}.blocks.{i}", f"{side}/layer_{i}"
        ln(f"{dst}/self_attention/layer_norm", f"{src}.attn_ln")
        qkv(f"{dst}/self_attention/linear_0", f"{src}.attn")
        lin(f"{dst}/self_attention/linear_1", f"{src}.attn.out")
        if cross:
            ln(f"{dst}/attention/layer_norm", f"{src}.cross_attn_ln")
            lin(f"{dst}/attention/linear_0", f"{src}.cross_attn.query")
            put(f"{dst}/attention/linear_1/weight", np.concatenate([sd[f"{src}.cross_attn.key.weight"], sd[f"{src}.cross_attn.value.weight"]]))
            put(f"{dst}/attention/linear_1/bias", np.concatenate([np.zeros(d.n_text_state), sd[f"{src}.cross_attn.value.bias"]]))
            lin(f"{dst}/attention/linear_2", f"{src}.cross_attn.out")
        ln(f"{dst}/ffn/layer_norm", f"{src}.mlp_ln")
        lin(f"{dst}/ffn/linear_0", f"{src}.mlp.0")
        lin(f"{dst}/ffn/linear_1", f"{src}.mlp.2")

    v["decoder/activation"] = np.array(3, np.int8)
    v["decoder/num_heads"] = np.array(d.n_text_head, np.int16)
    v["decoder/pre_norm"] = np.array(1, np.int8)
    lin("encoder/conv1", "encoder.conv1")
    lin("encoder/conv2", "encoder.conv2")
    for i in range(d.n_audio_layer):
        block("encoder", i, cross=False)
    ln("encoder/layer_norm", "encoder.ln_post")
    v["encoder/num_heads"] = np.array(d.n_audio_head, np.int16)
    put("encoder/position_encodings/encodings", sd["encoder.positional_embedding"])
    put("decoder/embeddings/weight", sd["decoder.token_embedding.weight"])
    for i in range(d.n_text_layer):
        block("decoder", i, cross=True)
    ln("decoder/layer_norm", "decoder.ln")
    put("decoder/position_encodings/encodings", sd["decoder.positional_embedding"])
    return v, {"decoder/projection/weight": "decoder/embeddings/weight"}


def tiny_whisper(seed=0):
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=24, n_audio_state=32, n_audio_head=4, n_audio_layer=2,
                           n_vocab=300, n_text_ctx=16, n_text_state=32, n_text_head=2, n_text_layer=3)
    model = Whisper(dims).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _folder(tmp_path, model, dtype=np.float32):
    folder = tmp_path / "ct2"
    folder.mkdir()
    variables, aliases = whisper_to_ct2(model, dtype)
    write_ct2(folder / "model.bin", variables, aliases)
    (folder / "config.json").write_text(json.dumps({"suppress_ids": []}))
    (folder / "vocabulary.txt").write_text("\n".join(f"t{i}" for i in range(model.dims.n_vocab)))
    return folder


def test_round_trip_gives_identical_weights_and_logits(tmp_path):
    from whisper.model import ModelDimensions, Whisper

    model = tiny_whisper()
    folder = _folder(tmp_path, model)
    spec, _, variables, aliases = read_ct2_model(folder / "model.bin")
    assert spec == "WhisperSpec" and aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}

    ck, sha = convert_ct2_dir(folder, tmp_path / "cache")
    assert ck["dims"] == model.dims.__dict__
    back = Whisper(ModelDimensions(**ck["dims"])).eval()
    back.load_state_dict(ck["model_state_dict"])  # strict: every key present, none extra
    for name, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name

    mel = torch.randn(2, 80, 48)
    tokens = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(mel, tokens), back(mel, tokens))

    # The second call reads the cache (written atomically: no temporary files are left) and agrees.
    cache = tmp_path / "cache" / sha[:16]
    assert sorted(p.name for p in cache.iterdir()) == ["dims.json", "model.safetensors"]
    again, sha2 = convert_ct2_dir(folder, tmp_path / "cache")
    assert sha2 == sha and again["dims"] == ck["dims"]
    for name, t in ck["model_state_dict"].items():
        assert torch.equal(t, again["model_state_dict"][name])


def test_float16_weights_convert_exactly(tmp_path):
    model = tiny_whisper(seed=1)
    folder = _folder(tmp_path, model, np.float16)
    ck, _ = convert_ct2_dir(folder, tmp_path / "cache")
    for name, t in model.state_dict().items():
        assert torch.equal(t.half().float(), ck["model_state_dict"][name]), name


def test_int8_weights_are_dequantised_with_their_scale(tmp_path):
    model = tiny_whisper(seed=2)
    variables, aliases = whisper_to_ct2(model)
    for name in [n for n, a in variables.items() if n.endswith("linear_0/weight") and a.ndim == 2]:
        w = variables[name]
        scale = (127.0 / np.abs(w).max(axis=1)).astype(np.float32)  # CTranslate2: int8 = round(w * scale)
        variables[name] = np.round(w * scale[:, None]).astype(np.int8)
        variables[name + "_scale"] = scale
    folder = tmp_path / "ct2"
    folder.mkdir()
    write_ct2(folder / "model.bin", variables, aliases)
    ck, _ = convert_ct2_dir(folder, tmp_path / "cache")
    q = ck["model_state_dict"]["decoder.blocks.0.mlp.0.weight"]
    ref = model.state_dict()["decoder.blocks.0.mlp.0.weight"]
    step = ref.abs().amax(dim=1, keepdim=True) / 127
    assert not torch.equal(q, ref) and bool(((q - ref).abs() <= step / 2 + 1e-6).all())


def test_truncated_or_foreign_files_are_user_errors(tmp_path):
    model = tiny_whisper()
    folder = _folder(tmp_path, model)
    data = (folder / "model.bin").read_bytes()
    (folder / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        convert_ct2_dir(folder, tmp_path / "cache")
    write_ct2(folder / "model.bin", {"x": np.zeros(3, np.float32)}, {}, spec="TransformerSpec")
    with pytest.raises(UserError, match="not a WhisperSpec"):
        convert_ct2_dir(folder, tmp_path / "cache")
    with pytest.raises(UserError, match="no model.bin"):
        convert_ct2_dir(tmp_path, tmp_path / "cache")
