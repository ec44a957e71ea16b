"""`groundgan generate RUN --inputs ... --out preds.jsonl` and the Python API (pipeline.api.load_student):
the evaluate stage's texts for the same samples, whatever the batch; bad inputs are one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, cli

torch.set_num_threads(1)

# the fallback fires on most pieces (a random teacher's labels compress well below 1.2 only by chance), so the
# keyed random stream is exercised
FALLBACK = ["decoding.fallback_temperatures=[0.7,1.0]", "decoding.max_compression_ratio=1.05",
            "decoding.max_new_tokens=12", "evaluate.temperatures=[0.0,1.0]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gen")
    cli("run", ROOT / "configs" / "tiny.yaml", "distill.student.style=cross_attention", "evaluate.batch_size=3",
        *FALLBACK, "--run-dir", d / "run", check=True)
    return d / "run"


def _evaluate_texts(run: Path, modality: str, stage: str, t: str = "T0") -> dict:
    g = json.loads((run / "evaluate" / "generations" / "test" / modality / stage / f"{t}.json").read_text())
    return dict(zip(g["keys"], g["texts"]))


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("batch", [1, 5])
def test_generate_over_shards_writes_evaluates_texts_whatever_the_batch(run, tmp_path, batch):
    out = tmp_path / "preds.jsonl"
    # the shards one by one, or (batch 5) the folder that holds them
    shards = sorted(str(p) for p in (run / "ingest" / "shards").rglob("*.tar")) if batch == 1 else \
        [str(run / "ingest" / "shards")]
    cli("generate", run, "--stage", "distill", "--inputs", *shards, "--split", "test", "--out", out,
        "--batch-size", batch, check=True)
    rows = _read(out)
    by_mod = {}
    for r in rows:
        assert set(r) == {"key", "modality", "text", "avg_logprob", "fallback"}
        assert r["avg_logprob"] <= 0
        by_mod.setdefault(r["modality"], {})[r["key"]] = r
    assert set(by_mod) >= {"audio", "image"}
    for m in ("audio", "image"):
        want = _evaluate_texts(run, m, "distill")
        assert {k: r["text"] for k, r in by_mod[m].items()} == want
    assert any(r["fallback"] for r in by_mod["audio"].values())


def test_api_reads_arrays_and_files_as_the_cli_does(run, tmp_path):
    import pipeline
    from modalities.audio import Audio
    from pipeline.shards import iter_shard

    s = pipeline.load_student(run, stage="distill", device="cpu")
    items = []
    for tar in sorted((run / "ingest" / "shards" / "audio").glob("*.tar")):
        for key, members in iter_shard(str(tar)):
            if json.loads(members["json"]).get("split") == "test":
                items.append((key, members["wav"]))
    want = _evaluate_texts(run, "audio", "distill")
    adapter = Audio(s.modalities["audio"])
    arrays = [adapter.decode(b, "wav") for _, b in items]
    got = s.transcribe(arrays, modality="audio", keys=[k for k, _ in items], batch_size=2)
    assert {r["key"]: r["text"] for r in got} == want
    for (k, b) in items[:2]:
        (tmp_path / f"{k}.wav").write_bytes(b)
    files = s.generate(sorted(tmp_path.glob("*.wav")))
    assert [r["text"] for r in files] == [want[k] for k, _ in sorted(items[:2])]
    # an export folder carries the decoding settings and the seed: the same texts
    cli("export", run, "--stage", "distill", "--out", tmp_path / "export", check=True)
    e = pipeline.load_student(tmp_path / "export", device="cpu")
    got = e.transcribe(arrays, modality="audio", keys=[k for k, _ in items], batch_size=3)
    assert {r["key"]: r["text"] for r in got} == want
    # sampling (T > 0) is keyed by sample too: the evaluate stage's T=1 texts
    hot = s.generate(arrays, modality="audio", keys=[k for k, _ in items], batch_size=4, temperature=1.0)
    assert {r["key"]: r["text"] for r in hot} == _evaluate_texts(run, "audio", "distill", "T1")


def test_generate_folder_and_manifest(run, tmp_path):
    from pipeline.shards import iter_shard

    folder = tmp_path / "clips"
    folder.mkdir()
    lines = []
    for tar in sorted((run / "ingest" / "shards" / "audio").glob("*.tar"))[:1]:
        for key, members in list(iter_shard(str(tar)))[:3]:
            (folder / f"{key}.wav").write_bytes(members["wav"])
            lines.append(json.dumps({"audio": f"clips/{key}.wav", "key": f"m-{key}"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    cli("generate", run, "--inputs", folder, "--out", a, check=True)
    cli("generate", run, "--inputs", tmp_path / "manifest.jsonl", "--out", b, check=True)
    ra, rb = _read(a), _read(b)
    assert len(ra) == len(rb) == 3
    assert [r["key"] for r in rb] == ["m-" + r["key"] for r in ra]
    assert all(r["modality"] == "audio" and isinstance(r["text"], str) for r in ra)


def test_generate_bad_inputs(run, tmp_path):
    def one_line(r, *words):
        assert r.returncode == 2, r.stderr
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert all(w in lines[0] for w in words), lines[0]

    out = tmp_path / "o.jsonl"
    one_line(cli("generate", run, "--inputs", tmp_path / "missing.wav", "--out", out), "missing.wav", "not found")
    (tmp_path / "notes.xyz").write_text("x")
    one_line(cli("generate", run, "--inputs", tmp_path / "notes.xyz", "--out", out), "notes.xyz", ".xyz")
    (tmp_path / "m.jsonl").write_text(json.dumps({"vibration": "v.npy"}) + "\n")
    one_line(cli("generate", run, "--inputs", tmp_path / "m.jsonl", "--out", out), "m.jsonl:1")
    one_line(cli("generate", run, "--inputs", tmp_path / "m.jsonl"), "--out")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((run / "config.yaml").read_text())
    one_line(cli("generate", bare, "--inputs", tmp_path / "m.jsonl", "--out", out), "no trained student")
    # a broken audio file is a row with its error; the others are written
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    import soundfile as sf

    t = np.arange(8000) / 16000
    sf.write(tmp_path / "clips" / "good.wav", (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    # --split filters shards by their .json; a folder of files has no split to filter by
    one_line(cli("generate", run, "--inputs", tmp_path / "clips", "--split", "test", "--out", out), "clips",
             "--split test", "no split")
    r = cli("generate", run, "--inputs", tmp_path / "clips", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = {x["key"]: x for x in _read(out)}
    assert "error" in rows["bad"] and "bad.wav" in rows["bad"]["error"] and "text" in rows["good"]
    assert not out.with_suffix(".tmp").exists()
