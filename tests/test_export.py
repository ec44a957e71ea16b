"""`groundgan export`: the student in folders that transformers and openai-whisper load with no groundgan import.

The round trips run the loading side in a subprocess that imports no module of the project, and compare what it
computes with the student's own decoding in this process."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, cli

torch.set_num_threads(1)

OUTSIDE = r'''
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
out = {}
d, what = sys.argv[1], sys.argv[2]
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(d + "/lm")
out["tokenizer"] = type(tok).__name__
out["ids"] = tok.encode(" Please enter your password.", add_special_tokens=False)
if what == "whisper":
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline
    import whisper
    t = np.arange(24000) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t)).astype(np.float32)
    asr = pipeline("automatic-speech-recognition", model=d)
    out["pipeline_text"] = asr({"raw": audio.copy(), "sampling_rate": 16000})["text"]
    model = WhisperForConditionalGeneration.from_pretrained(d).eval()
    proc = WhisperProcessor.from_pretrained(d)
    mel = proc(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        enc = model.model.encoder(mel).last_hidden_state
        out["generate"] = model.generate(mel, max_new_tokens=8).tolist()[0]
        prompt = [model.generation_config.decoder_start_token_id, model.generation_config.no_timestamps_token_id]
        ids = torch.tensor([prompt + out["ids"]])
        logits = model(encoder_outputs=(enc,), decoder_input_ids=ids).logits
        wm = whisper.load_model(d + "/openai-whisper.pt", device="cpu")
        ow = wm.logits(ids, wm.encoder(mel))
    np.save(d + "/../enc.npy", enc[0].numpy())
    np.save(d + "/../hf_logits.npy", logits[0].numpy())
    np.save(d + "/../ow_logits.npy", ow[0].numpy())
    out["suppressed"] = model.generation_config.suppress_tokens
else:
    lm = AutoModelForCausalLM.from_pretrained(d + "/lm").eval()
    spec = json.load(open(d + "/student.json"))
    ids = torch.tensor([[spec["marker_ids"]["text"], spec["bos_id"]] + out["ids"]])
    with torch.no_grad():
        np.save(d + "/../lm_logits.npy", lm(input_ids=ids).logits[0, 1:].numpy())
    out["lm"] = type(lm).__name__
out["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "stages", "modalities"))
print(json.dumps(out))
'''


def _outside(folder: Path, what: str) -> dict:
    """Run OUTSIDE in a fresh interpreter whose path holds nothing of the project (cwd: a temp folder)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-c", OUTSIDE, str(folder), what], capture_output=True, text=True,
                       cwd=folder.parent, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _run(tmp: Path, *overrides) -> Path:
    cli("run", ROOT / "configs" / "tiny.yaml", *overrides, "--run-dir", tmp / "run", "--until", "distill", check=True)
    return tmp / "run"


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("cross"), "distill.student.style=cross_attention")


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("prefix"))


def test_whisper_folder_transcribes_outside_groundgan_as_the_student_does(cross_run, tmp_path):
    from stages.models.generation import generate
    from stages.models.student import load_student

    out = tmp_path / "export"
    r = cli("export", cross_run, "--out", out, check=True)
    assert "WhisperForConditionalGeneration" in r.stdout and "openai-whisper" in r.stdout
    got = _outside(out, "whisper")
    assert got["project_modules"] == []
    student = load_student(out)
    assert got["tokenizer"] == "WhisperTokenizer"
    assert got["ids"] == student.tokenizer.encode("Please enter your password.")
    # the same encoder states (transformers' encoder on its own mel) read by the student: the same tokens
    enc = torch.from_numpy(np.load(tmp_path / "enc.npy"))
    assert enc.shape == (1500, student.lm.config.d_model)
    g = generate(student, "audio", [enc], max_new_tokens=8)
    ours = g.tokens[0, : int(g.mask[0].sum())].tolist()
    theirs = got["generate"]
    assert theirs[: len(ours)] == ours[: len(theirs)] and len(theirs) >= min(len(ours), 8)
    # the pipeline decodes up to max_length: the student without its length cap, which generation_config keeps
    # for a caller to pass as max_new_tokens (transformers does not read it)
    cap = json.loads((out / "generation_config.json").read_text())["length_cap"]
    assert cap == {k: student.spec.length_cap["audio"][k] for k in ("a", "b", "margin", "frame_seconds")}
    student.spec = dataclasses.replace(student.spec, length_cap={})
    whole = generate(student, "audio", [enc], max_new_tokens=448)
    assert got["pipeline_text"].strip() == whole.texts[0]
    # logits of a fixed text: the student's, transformers' and openai-whisper's (all but the suppressed
    # <|startoftranscript|>, whose row is the marker's)
    ids = torch.tensor([[student.spec.bos_id] + got["ids"]])
    with torch.no_grad():
        mine = student(ids, None, "audio", [enc])[0].numpy()
    hf = np.load(tmp_path / "hf_logits.npy")[1:]
    ow = np.load(tmp_path / "ow_logits.npy")[1:]
    keep = np.ones(mine.shape[-1], bool)
    keep[got["suppressed"]] = False
    np.testing.assert_allclose(hf[:, keep], mine[:, keep], atol=1e-4)
    np.testing.assert_allclose(ow[:, keep], mine[:, keep], atol=2e-3)


def test_prefix_student_lm_loads_with_auto_classes(prefix_run, tmp_path):
    from stages.models.student import load_student

    out = tmp_path / "export"
    r = cli("export", prefix_run, "--out", out, check=True)
    assert "WhisperForConditionalGeneration" not in r.stdout
    assert not (out / "config.json").exists()
    got = _outside(out, "lm")
    assert got["project_modules"] == [] and got["lm"] == "LlamaForCausalLM"
    student = load_student(out)
    assert got["ids"] == student.tokenizer.encode("Please enter your password.")
    ids = torch.tensor([[student.spec.bos_id] + got["ids"]])
    with torch.no_grad():
        mine = student(ids, None, "text")[0].numpy()
    theirs = np.load(tmp_path / "lm_logits.npy")[:, : student.spec.text_vocab]
    np.testing.assert_allclose(theirs, mine, atol=1e-4)
    dec = json.loads((out / "decoding.json").read_text())
    assert dec["max_new_tokens"] == 8 and dec["fallback_temperatures"] == []
    assert set(json.loads((out / "modalities.json").read_text())) == {"audio", "image", "text"}
    assert "groundgan student (distill)" in (out / "README.md").read_text()


def test_export_bad_inputs_are_one_line_exit_2(prefix_run, tmp_path):
    def one_line(r, *words):
        assert r.returncode == 2, r.stderr
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert all(w in lines[0] for w in words), lines[0]

    one_line(cli("export", tmp_path / "nowhere", "--out", tmp_path / "o"), "not a run directory")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(prefix_run / "config.yaml", bare / "config.yaml")
    one_line(cli("export", bare, "--out", tmp_path / "o"), "no trained student", "distill/final")
    one_line(cli("export", prefix_run, "--stage", "adversarial", "--out", tmp_path / "o"), "adversarial/final")
    one_line(cli("export", prefix_run, "--stage", "ingest", "--out", tmp_path / "o"), "--stage ingest")
    broken = tmp_path / "broken"
    shutil.copytree(prefix_run, broken, ignore=shutil.ignore_patterns("ingest", "pseudo_label", "checkpoints"))
    (broken / "distill" / "final" / "lm" / "config.json").unlink()
    one_line(cli("export", broken, "--out", tmp_path / "o"), "lm/config.json is missing")
    one_line(cli("export", prefix_run, "--out", prefix_run / "distill" / "final" / "x"), "must not be")
    assert not (tmp_path / "o").exists()


def test_no_speech_row_is_fitted_to_the_teachers_probabilities():
    """The fitted <|nospeech|> row reproduces probabilities made by a known row; nothing else moves."""
    from stages.models.export import fit_no_speech_row

    g = torch.Generator().manual_seed(0)
    hidden, emb = torch.randn(200, 16, generator=g), torch.randn(50, 16, generator=g)
    true_row = 1.5 * torch.randn(16, generator=g)
    full = emb.clone()
    full[7] = true_row
    target = torch.softmax(hidden @ full.T, -1)[:, 7]
    row, stats = fit_no_speech_row(hidden, emb, 7, target, steps=600)
    assert stats["windows"] == 200 and stats["log_loss_after"] < stats["log_loss_before"]
    assert abs(stats["mean_after"] - stats["teacher_mean"]) < 0.01 < abs(stats["mean_before"] - stats["teacher_mean"])
    full[7] = row
    np.testing.assert_allclose(torch.softmax(hidden @ full.T, -1)[:, 7], target, atol=0.03)
    assert torch.equal(emb[:7], full[:7]) and torch.equal(emb[8:], full[8:])


def test_export_fits_the_no_speech_row_on_the_runs_train_clips(cross_run, tmp_path):
    """The export reads the run's kept train clips labelled in one window, and says so in the card."""
    import re

    from pipeline.shards import iter_shard, list_shards

    kept = 0
    for shard in list_shards(cross_run / "pseudo_label" / "shards" / "audio"):
        for _key, sample in iter_shard(str(shard)):
            meta = json.loads(sample["json"])
            kept += (meta["split"] == "train" and not meta.get("filter_reason")
                     and meta["info"].get("n_windows", 1) == 1)
    out = tmp_path / "export"
    cli("export", cross_run, "--out", out, check=True)
    card = (out / "README.md").read_text()
    m = re.search(r"fitted to the teacher's no-speech probabilities of (\d+) train clips: log loss "
                  r"([0-9]+(?:\.[0-9]+)?) -> ([0-9]+(?:\.[0-9]+)?)", card)
    assert m, card
    assert int(m.group(1)) == kept > 0 and float(m.group(3)) <= float(m.group(2))
