"""A trained student outside groundgan: `groundgan export RUN_DIR [--stage S] --out DIR`.

DIR holds, side by side:
    student.json, projectors.safetensors, lm/   the student as load_student reads it (every style and modality);
                                                lm/ is a save_pretrained causal LM with tokenizer files, so that
                                                AutoModelForCausalLM / AutoTokenizer load it
    decoding.json                               the run's decoding settings (fallback, loop checks, lengths)
    run.json                                    the run's seed (the decoding's random streams), its path, the stage
    modalities.json                             each modality's config (its teacher: what makes its features)
    README.md                                   the model card, with the run's figures
and, for a cross_attention student that reads a Whisper teacher's encoder states directly (the audio student):
    config.json, model.safetensors,             a standard WhisperForConditionalGeneration: the teacher's encoder
    generation_config.json, tokenizer and       and the student's decoder layers, with WhisperProcessor files, so
    preprocessor files                          that transformers.pipeline("automatic-speech-recognition", DIR)
                                                transcribes with no groundgan import
    openai-whisper.pt                           the same model as an openai-whisper checkpoint
                                                (whisper.load_model(DIR + "/openai-whisper.pt"))

The student reads [marker | bos y_1 ..]; a Whisper decoder reads [<|startoftranscript|> <|notimestamps|> y_1 ..]
at the same positions, and the student's bos is <|notimestamps|>. So the exported model's embedding row of
<|startoftranscript|> is the student's audio marker row (the output layer is tied to the embeddings, so the
logit of <|startoftranscript|> changes: the generation config suppresses it, as openai-whisper's decoding does).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.files import atomic_write_text

DECODING_FILE = "decoding.json"
MODALITIES_FILE = "modalities.json"
RUN_FILE = "run.json"  # {"seed", "run", "stage"}: the seed under the keyed decoding streams (batch.decode_seed)
OPENAI_FILE = "openai-whisper.pt"

_DECODER_NAMES = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
                  "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm",
                  "cross_attn.query": "encoder_attn.q_proj", "cross_attn.key": "encoder_attn.k_proj",
                  "cross_attn.value": "encoder_attn.v_proj", "cross_attn.out": "encoder_attn.out_proj",
                  "cross_attn_ln": "encoder_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2",
                  "mlp_ln": "final_layer_norm"}
_ENCODER_NAMES = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
                  "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1",
                  "mlp.2": "fc2", "mlp_ln": "final_layer_norm"}


# ------------------------------------------------------------------------------------------------- tokenizer
def whisper_hf_tokenizer(multilingual: bool = False):
    """openai-whisper's BPE (its tiktoken file, shipped with the `whisper` package) as a transformers
    WhisperTokenizer with the same ids: byte-level BPE merges recovered from the ranks, then every special token
    (<|endoftext|> .. <|notimestamps|>) and the timestamps in id order. No hub needed."""
    import whisper.tokenizer as wt
    from transformers import AddedToken, WhisperTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = wt.get_tokenizer(multilingual=multilingual)
    enc = tok.encoding
    path = Path(wt.__file__).parent / "assets" / f"{enc.name}"
    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(str(path))
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    named = [s for s, _ in specials if not s[2:-2].replace(".", "").isdigit()]
    stamps = [s for s, _ in specials if s[2:-2].replace(".", "").isdigit()]
    hf = WhisperTokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                          eos_token="<|endoftext|>", pad_token="<|endoftext|>", add_prefix_space=False)
    hf.add_special_tokens({"additional_special_tokens": [s for s in named if s != "<|endoftext|>"]})
    hf.add_tokens([AddedToken(s, lstrip=False, rstrip=False, normalized=False, special=False) for s in stamps])
    ids = hf.convert_tokens_to_ids([s for s, _ in specials])
    if ids != [i for _, i in specials] or len(hf) != enc.n_vocab:
        raise RuntimeError(f"the Whisper tokenizer's special ids do not line up ({len(hf)} vs {enc.n_vocab} ids)")
    hf.model_max_length = 448
    return hf


# ---------------------------------------------------------------------------------------------- the student
def student_folder_files(student, folder: Path, decoding: dict, modalities: dict) -> None:
    """The load_student files of `student` into `folder`, with tokenizer files in lm/ and the run's decoding and
    modality settings beside them."""
    from stages.models.student import write_student

    write_student(student, folder)
    if student.spec.tokenizer.get("kind") == "whisper":
        whisper_hf_tokenizer(bool(student.spec.tokenizer.get("multilingual", False))).save_pretrained(str(folder / "lm"))
    atomic_write_text(folder / DECODING_FILE, json.dumps(decoding, indent=2, sort_keys=True) + "\n")
    atomic_write_text(folder / MODALITIES_FILE, json.dumps(modalities, indent=2, sort_keys=True) + "\n")


def whisper_modality(student) -> str | None:
    """The modality whose Whisper encoder states the student's decoder reads as they are (None: none)."""
    spec = student.spec
    if spec.style != "cross_attention" or not spec.direct:
        return None
    return spec.direct[0]


# ------------------------------------------------------------------------------------- the Whisper model
def _encoder_state(teacher_sd: dict) -> dict:
    """openai-whisper encoder weights under transformers' WhisperForConditionalGeneration names."""
    out = {"model.encoder.conv1.weight": teacher_sd["encoder.conv1.weight"],
           "model.encoder.conv1.bias": teacher_sd["encoder.conv1.bias"],
           "model.encoder.conv2.weight": teacher_sd["encoder.conv2.weight"],
           "model.encoder.conv2.bias": teacher_sd["encoder.conv2.bias"],
           "model.encoder.embed_positions.weight": teacher_sd["encoder.positional_embedding"],
           "model.encoder.layer_norm.weight": teacher_sd["encoder.ln_post.weight"],
           "model.encoder.layer_norm.bias": teacher_sd["encoder.ln_post.bias"]}
    for k, v in teacher_sd.items():
        if not k.startswith("encoder.blocks."):
            continue
        i, rest = k[len("encoder.blocks."):].split(".", 1)
        name, p = rest.rsplit(".", 1)
        out[f"model.encoder.layers.{i}.{_ENCODER_NAMES[name]}.{p}"] = v
    return {k: v.float() for k, v in out.items()}


def no_speech_windows(run: Path, modality: str, limit: int = 512) -> tuple[list, list]:
    """The run's train windows of `modality` that the teacher labelled in one piece and kept: (their stored
    features [T, D] as tensors, the teacher's no-speech probability of each), at most `limit`, in shard order."""
    import io

    import numpy as np

    from pipeline.shards import iter_shard, list_shards

    feats, probs = [], []
    for shard in list_shards(run / "pseudo_label" / "shards" / modality):
        for _key, sample in iter_shard(str(shard)):
            if "json" not in sample or "features.npy" not in sample:
                continue
            meta = json.loads(sample["json"])
            info = meta.get("info") or {}
            if (meta.get("split") != "train" or meta.get("filter_reason") or info.get("n_windows", 1) != 1
                    or "no_speech_prob" not in info):
                continue
            feats.append(torch.from_numpy(np.load(io.BytesIO(sample["features.npy"])).astype(np.float32)))
            probs.append(float(info["no_speech_prob"]))
            if len(feats) >= limit:
                return feats, probs
    return feats, probs


@torch.no_grad()
def marker_hidden(student, modality: str, feats: list, batch_size: int = 64) -> torch.Tensor:
    """The student's last hidden state at its marker's position (where Whisper reads its no-speech
    probability: the <|startoftranscript|> position), for each window's features as the student reads them
    (followed by the encoding of silence) -> [N, d]."""
    from stages.models.student import _pad_rows

    dec, out = student._decoder(), []
    for i in range(0, len(feats), batch_size):
        f, fm = _pad_rows(feats[i: i + batch_size])
        b = f.shape[0]
        states, tail, _ = student._encoder_states(modality, f, fm, b)
        ids = torch.full((b, 1), student.marker_id(modality), dtype=torch.long)
        if tail is None:
            o = dec(input_ids=ids, encoder_hidden_states=states, use_cache=False)
        else:
            o = dec(input_ids=ids, encoder_hidden_states=states, past_key_values=student._cross_cache(states, tail),
                    use_cache=True)
        out.append(o.last_hidden_state[:, 0].float())
    return torch.cat(out)


def fit_no_speech_row(hidden: torch.Tensor, emb: torch.Tensor, no_speech: int, target: torch.Tensor,
                      steps: int = 300) -> tuple[torch.Tensor, dict]:
    """The output row of <|nospeech|> that makes the student's no-speech probability at the marker's position
    match the teacher's on the same windows (binary cross-entropy; every other row fixed).

    The student never trains that row's output at that position (its loss starts after the prompt), yet
    openai-whisper's transcribe reads it: it drops a segment whose no-speech probability is over 0.6 while its
    mean log-prob is under -1. Left as trained, the row says "no speech" on clips the teacher transcribed.
    The row is never an input and is suppressed in decoding, so nothing else changes.
    hidden [N, d], emb [V, d], target [N] in [0, 1] -> (row [d], {"windows", the teacher's mean probability,
    the student's before and after, the log loss against the teacher's before and after})."""
    hidden, emb, target = hidden.float(), emb.float(), target.float()
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[no_speech] = False
    log_z = torch.logsumexp(hidden @ emb[others].T, dim=-1)  # [N], fixed

    def prob(r):
        return torch.sigmoid(hidden @ r - log_z)

    row0 = emb[no_speech].clone()
    row = row0.clone().requires_grad_(True)
    opt = torch.optim.Adam([row], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(hidden @ row - log_z, target)  # no clamp: a tiny p still learns
        loss.backward()
        opt.step()
    row = row.detach()
    with torch.no_grad():
        def log_loss(r):
            return round(float(F.binary_cross_entropy_with_logits(hidden @ r - log_z, target)), 4)

        stats = {"windows": int(hidden.shape[0]), "teacher_mean": round(float(target.mean()), 4),
                 "mean_before": round(float(prob(row0).mean()), 4), "mean_after": round(float(prob(row).mean()), 4),
                 "log_loss_before": log_loss(row0), "log_loss_after": log_loss(row)}
    return row, stats


def whisper_model(student, teacher, modality: str, no_speech: tuple | None = None):
    """(WhisperForConditionalGeneration, openai-whisper checkpoint dict, no-speech fit stats | None) of the
    teacher's encoder and the student's decoder, whose <|startoftranscript|> row is the student's `modality`
    marker. no_speech: (marker_hidden [N, d], the teacher's no-speech probabilities [N]) of train windows: the
    <|nospeech|> row is fitted to them (fit_no_speech_row); None: left as trained.
    teacher: a whisper.model.Whisper (its dims and weights)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    dims = teacher.dims
    dec = student.lm.model.decoder
    sc = student.lm.config
    vocab = student.spec.text_vocab
    if dims.n_vocab != vocab or sc.d_model != dims.n_audio_state:
        raise UserError(f"the student's decoder (vocabulary {vocab}, width {sc.d_model}) does not fit the teacher "
                        f"(vocabulary {dims.n_vocab}, width {dims.n_audio_state}); no Whisper model to export")
    import whisper.tokenizer as wt

    tok = wt.get_tokenizer(multilingual=dims.n_vocab >= 51865)
    sot = tok.sot
    cfg = WhisperConfig(vocab_size=vocab, num_mel_bins=dims.n_mels, d_model=dims.n_audio_state,
                        encoder_layers=dims.n_audio_layer, encoder_attention_heads=dims.n_audio_head,
                        encoder_ffn_dim=4 * dims.n_audio_state, decoder_layers=sc.decoder_layers,
                        decoder_attention_heads=sc.decoder_attention_heads, decoder_ffn_dim=sc.decoder_ffn_dim,
                        max_source_positions=dims.n_audio_ctx, max_target_positions=sc.max_target_positions,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
                        scale_embedding=False, tie_word_embeddings=True, pad_token_id=tok.eot,
                        bos_token_id=tok.eot, eos_token_id=tok.eot, decoder_start_token_id=sot,
                        begin_suppress_tokens=None, suppress_tokens=None)
    model = WhisperForConditionalGeneration(cfg)
    sd = _encoder_state(teacher.state_dict())
    for k, v in dec.state_dict().items():
        sd[f"model.decoder.{k}"] = v.detach().float().clone()
    emb = sd["model.decoder.embed_tokens.weight"][:vocab].clone()
    emb[sot] = dec.embed_tokens.weight[student.spec.marker_ids[modality]].detach().float()
    fit = None
    if no_speech is not None and tok.no_speech is not None and len(no_speech[1]):
        row, fit = fit_no_speech_row(no_speech[0], emb, tok.no_speech, torch.as_tensor(no_speech[1]))
        emb[tok.no_speech] = row
    sd["model.decoder.embed_tokens.weight"] = emb
    sd["proj_out.weight"] = emb
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"Whisper export: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.tie_weights()
    model.eval()
    # openai-whisper: the teacher's dims with the student's decoder depth; decoder names mapped back
    od = {k: v.detach().float().clone() for k, v in teacher.state_dict().items() if k.startswith("encoder.")}
    od["decoder.token_embedding.weight"] = emb.clone()
    od["decoder.positional_embedding"] = dec.embed_positions.weight.detach().float().clone()
    od["decoder.ln.weight"] = dec.layer_norm.weight.detach().float().clone()
    od["decoder.ln.bias"] = dec.layer_norm.bias.detach().float().clone()
    for j, layer in enumerate(dec.layers):
        mine = layer.state_dict()
        for theirs, ours in _DECODER_NAMES.items():
            for p in ("weight", "bias"):
                if f"{ours}.{p}" in mine:
                    od[f"decoder.blocks.{j}.{theirs}.{p}"] = mine[f"{ours}.{p}"].detach().float().clone()
    odims = dict(dataclasses.asdict(dims), n_text_layer=sc.decoder_layers, n_text_ctx=sc.max_target_positions)
    return model, {"dims": odims, "model_state_dict": od}, fit


def generation_config(tok, decoding: dict, max_length: int, length_cap: dict | None = None):
    """Whisper's generate settings for the exported student: the prompt <|startoftranscript|> <|notimestamps|>
    (its marker and bos), greedy, the special tokens openai-whisper suppresses, and the run's fallback
    (temperatures, compression-ratio and log-prob thresholds) as Whisper's generate reads them. length_cap (the
    student's, stages.models.length_cap) is kept as `length_cap`: Whisper's generate does not read it; a caller
    passes max_new_tokens = ceil(margin x (a + b x seconds)) per clip (docs/export.md)."""
    from transformers import GenerationConfig

    suppress = sorted({tok.sot, tok.sot_prev, tok.sot_lm, tok.transcribe, tok.translate, tok.no_timestamps}
                      | ({tok.no_speech} if tok.no_speech is not None else set()))
    temps = [0.0] + [float(t) for t in decoding.get("fallback_temperatures") or []]
    ratio = decoding.get("max_compression_ratio")
    gc = GenerationConfig(decoder_start_token_id=tok.sot, eos_token_id=tok.eot, pad_token_id=tok.eot,
                          bos_token_id=tok.eot, max_length=max_length, do_sample=False, num_beams=1,
                          suppress_tokens=suppress, begin_suppress_tokens=None,
                          no_timestamps_token_id=tok.no_timestamps, is_multilingual=False, return_timestamps=False,
                          max_initial_timestamp_index=50)
    if length_cap:
        gc.length_cap = {k: length_cap[k] for k in ("a", "b", "margin", "frame_seconds")}
    # no lang_to_id / task_to_id: their presence makes Whisper's generate detect a language and put a token
    # between <|startoftranscript|> and <|notimestamps|>
    if len(temps) > 1:
        # transformers' Whisper generate takes the schedule as generate(temperature=...); it reads these two
        # thresholds from the config. Its compression ratio is of the token ids' bytes (2 per token), where
        # openai-whisper's and groundgan's is of the text's: 1.35 there is Whisper's 2.4 here.
        gc.temperature_fallback = temps
        gc.compression_ratio_threshold = round(1.35 * float(ratio) / 2.4, 3) if ratio else None
        gc.logprob_threshold = decoding.get("min_avg_logprob")
    return gc


def feature_extractor(dims):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=dims.n_mels, sampling_rate=16000, hop_length=160, chunk_length=30,
                                   n_fft=400, padding_value=0.0)


# ------------------------------------------------------------------------------------------------ the card
def model_card(run: Path | None, stage: str, student, exported_whisper: bool, figures: dict | None,
               no_speech_fit: dict | None = None) -> str:
    spec = student.spec
    lines = (["---", "library_name: transformers", "pipeline_tag: automatic-speech-recognition", "language: en",
              "tags: [whisper, groundgan, distillation]", "---", ""] if exported_whisper else [])
    lines += [f"# groundgan student ({stage})", ""]
    if run is not None:
        lines += [f"Exported from run `{run}` ({stage}/final).", ""]
    lines += [f"- style: {spec.style}; initialised from {spec.init}",
              f"- reads: {', '.join(f'{m} (marker id {spec.marker_ids[m]})' for m in spec.modalities)}"]
    if figures:
        lines += ["", "## Held-out figures (the run's evaluate report, greedy decoding with the run's fallback)", "",
                  "| set / modality | metric | value |", "| --- | --- | --- |"]
        for (s, m, k), v in sorted(figures.items()):
            lines.append(f"| {s} / {m} | {k} | {v:.3f} |")
    if exported_whisper:
        lines += ["", "## Use with transformers (no groundgan needed)", "", "```python",
                  "from transformers import pipeline",
                  "asr = pipeline('automatic-speech-recognition', model='THIS_DIR')",
                  "asr('clip.wav')['text']",
                  "# the run's temperature fallback (Whisper's): thresholds are in generation_config.json",
                  "asr('clip.wav', generate_kwargs={'temperature': tuple(asr.model.generation_config.temperature_fallback)})",
                  "```", "",
                  "openai-whisper: `whisper.load_model('THIS_DIR/openai-whisper.pt').transcribe('clip.wav', "
                  "temperature=0, without_timestamps=True)`.", "",
                  ("The `<|nospeech|>` output row (which transcribe reads to drop silent segments; the student "
                   "never trains it) was fitted to the teacher's no-speech probabilities of "
                   f"{no_speech_fit['windows']} train clips: log loss {no_speech_fit['log_loss_before']} -> "
                   f"{no_speech_fit['log_loss_after']}; mean probability {no_speech_fit['mean_before']} -> "
                   f"{no_speech_fit['mean_after']} (the teacher's {no_speech_fit['teacher_mean']})." if no_speech_fit else
                   "The `<|nospeech|>` output row is as trained (no train clips to fit it on): with openai-whisper, "
                   "pass `no_speech_threshold=None`."), "",
                  "The student was trained on the teacher's encoding of each clip (chunk) followed by the encoding "
                  "of silence; this model encodes the padded 30 s window, as Whisper does. docs/export.md in "
                  "groundgan has the measured difference."]
    lines += ["", "## With groundgan", "", "```python", "from pipeline.api import load_student",
              "s = load_student('THIS_DIR')", "s.generate(['clip.wav', 'picture.jpg'])  # key, modality, text, ...",
              "```", "",
              "The language model alone: `AutoModelForCausalLM.from_pretrained('THIS_DIR/lm')` and "
              "`AutoTokenizer.from_pretrained('THIS_DIR/lm')`; a row starts with a modality's marker id.", ""]
    return "\n".join(lines)


def report_figures(run: Path, stage: str) -> dict:
    """(set, modality, metric) -> value of `stage`'s row in RUN/evaluate/report.json ({} where absent)."""
    path = run / "evaluate" / "report.json"
    if not path.is_file():
        return {}
    try:
        rep = json.loads(path.read_text())
    except ValueError:
        return {}
    out = {}
    for s, mods in rep.items():
        if s == "sweep" or not isinstance(mods, dict):
            continue
        for m, rows in mods.items():
            row = (rows or {}).get(stage) or {}
            for k in ("wer_vs_reference", "wer_short_form", "label_agreement", "category_agreement"):
                if isinstance(row.get(k), (int, float)):
                    out[(s, m, k)] = float(row[k])
    return out


# ------------------------------------------------------------------------------------------------- export
def export_student(final: Path, out: Path, decoding: dict, modalities: dict, teacher_builders: dict,
                   run: Path | None = None, stage: str = "distill", seed: int = 0) -> dict:
    """Write the export folder `out` (replaced whole) for the student in `final`. decoding: the run's
    DecodingConfig as a dict; modalities: modality -> its config as a dict; teacher_builders: modality -> a
    function returning that modality's whisper.model.Whisper (only called for the Whisper export).
    Returns {"whisper": bool, "openai": bool, "folder": out}."""
    from stages.models.student import load_student, student_folder

    student = load_student(final, "cpu")
    wm = whisper_modality(student)
    figures = report_figures(run, stage) if run is not None else {}
    fit = None
    with student_folder(out) as tmp:
        student_folder_files(student, tmp, decoding, modalities)
        atomic_write_text(tmp / RUN_FILE, json.dumps({"seed": int(seed), "run": str(run) if run else None,
                                                      "stage": stage}, indent=2) + "\n")
        if wm is not None and wm in teacher_builders:
            teacher = teacher_builders[wm]()
            ns = None
            if run is not None:
                feats, probs = no_speech_windows(run, wm)
                if feats:
                    ns = (marker_hidden(student, wm, feats), probs)
            model, ckpt, fit = whisper_model(student, teacher, wm, ns)
            from transformers import WhisperProcessor

            tok = whisper_hf_tokenizer(False)
            import whisper.tokenizer as wt

            model.generation_config = generation_config(wt.get_tokenizer(multilingual=False), decoding,
                                                        student.lm.config.max_target_positions,
                                                        student.spec.length_cap.get(wm))
            model.save_pretrained(str(tmp))
            WhisperProcessor(feature_extractor=feature_extractor(teacher.dims), tokenizer=tok).save_pretrained(str(tmp))
            torch.save(ckpt, str(tmp / (OPENAI_FILE + ".tmp")))
            os.replace(tmp / (OPENAI_FILE + ".tmp"), tmp / OPENAI_FILE)
        atomic_write_text(tmp / "README.md", model_card(run, stage, student, wm is not None and wm in teacher_builders,
                                                        figures, fit))
    return {"whisper": wm is not None and wm in teacher_builders, "folder": out}


def export_cli(a) -> int:
    """`groundgan export RUN_DIR [--stage distill|adversarial] --out DIR`."""
    from pipeline.config import load_config, to_plain
    from pipeline.registry import modality_registry

    run = Path(a.run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config([str(run / "config.yaml")])
    stage, final = find_final(run, a.stage)
    out = Path(a.out)
    if out.resolve() == final.resolve() or final.resolve() in out.resolve().parents:
        raise UserError(f"--out {out}: must not be the run's {stage}/final or inside it")
    spec = json.loads((final / "student.json").read_text())
    mods = {m: to_plain(cfg.root.modalities.get(m) or modality_registry.get(m).Config())
            for m in spec["modalities"] if m in modality_registry}
    builders = {}
    for m in spec.get("direct") or []:
        mcfg = cfg.root.modalities.get(m)
        teacher_cfg = getattr(mcfg, "teacher", None)
        if teacher_cfg is not None and getattr(teacher_cfg, "kind", None) == "whisper":
            def build(tc=teacher_cfg):
                from modalities.whisper_teacher import load_whisper

                return load_whisper(tc)[0].float().eval()
            builders[m] = build
    res = export_student(final, out, to_plain(cfg.root.decoding), mods, builders, run=run, stage=stage,
                         seed=int(cfg.root.seed))
    what = ["load_student folder (lm/ loads with AutoModelForCausalLM and AutoTokenizer)"]
    if res["whisper"]:
        what += ["WhisperForConditionalGeneration (transformers.pipeline('automatic-speech-recognition'))",
                 f"openai-whisper checkpoint {OPENAI_FILE}"]
    print(f"exported the {stage} student of {run} to {out}: " + "; ".join(what))
    return 0


def find_final(run: Path, stage: str | None) -> tuple[str, Path]:
    """(stage, RUN/<stage>/final) of the student to use: `stage`, or the newest of adversarial and distill."""
    if stage not in (None, "distill", "adversarial"):
        raise UserError(f"--stage {stage}: a student comes from the distill or the adversarial stage")
    stages = [stage] if stage else ["adversarial", "distill"]
    for s in stages:
        final = run / s / "final"
        if (final / "student.json").is_file():
            for need in ("projectors.safetensors", "lm/config.json"):
                if not (final / need).is_file():
                    raise UserError(f"{final}: {need} is missing; run the {s} stage again")
            return s, final
    raise UserError(f"{run}: no trained student in {' or '.join(s + '/final' for s in stages)}; run the distill "
                    "stage first")
