"""The decoding cap ([Grounding proof]): fitted on the teacher's train labels in pseudo_label, stored in
length_cap.json and in the distilled student, so every decode of the student is bounded by its input."""

import json

import pytest
import torch

from stages.models.length_cap import cap_tokens, constant_cap, fit_length_cap


def test_fit_pinned_values_and_every_train_label_under_its_cap():
    # tokens = 3 + 2 x seconds, plus one label far above the line: the margin lifts the cap over it
    pts = [(50 * s, 3 + 2 * s) for s in range(1, 11)] + [(50 * 2, 14)]
    fit = fit_length_cap(pts, 0.02, min_margin=1.2)
    assert fit["labels"] == 11 and fit["longest_label"] == 23 and fit["longest_seconds"] == 10.0
    # least squares by hand: b = cov(x, y) / var(x), a = mean(y) - b mean(x)
    assert fit["b"] == pytest.approx(1.762136, abs=1e-6) and fit["a"] == pytest.approx(4.868932, abs=1e-6)
    assert fit["max_ratio"] == pytest.approx(14 / (4.868932 + 1.762136 * 2), abs=1e-4)
    assert fit["margin"] == 1.67  # the largest ratio (1.668), rounded up to two decimals
    assert all(n <= cap_tokens(fit, f) for f, n in pts)
    assert cap_tokens(fit, 50 * 4) == 20  # ceil(1.67 x (4.868932 + 1.762136 x 4))


def test_fit_without_time_or_with_a_falling_line_is_a_constant():
    fit = fit_length_cap([(1, 5), (1, 6), (1, 4)], 0.0, min_margin=1.5)  # an image embedding: one frame
    assert fit["b"] == 0.0 and fit["a"] == 5.0 and fit["margin"] == 1.5
    assert cap_tokens(fit, 1) == 8 == cap_tokens(fit, 100)
    falling = fit_length_cap([(50, 20), (100, 10), (150, 5)], 0.02, min_margin=1.0)
    assert falling["b"] == 0.0 and cap_tokens(falling, 50) >= 20
    assert fit_length_cap([], 0.02) is None
    const = constant_cap(fit_length_cap([(50, 4), (500, 22)], 0.02, 1.0))
    assert const["b"] == 0.0 and cap_tokens(const, 1) >= 22


def test_pseudo_label_fits_the_cap_on_train_labels_and_the_student_keeps_it(tmp_path):
    """The runner's graph on synthetic audio with the random Whisper teacher: length_cap.json beside the shards
    (in the manifest's outputs, so in every downstream stage's hash), the distilled student's spec, and the val
    checks' decodes bounded by it."""
    import yaml

    from pipeline.config import load_config
    from pipeline.graph import Runner
    from stages.models.labelled_data import load_labelled
    from stages.models.student import TextTokenizer, load_student

    cfg = {
        "stages": ["ingest", "pseudo_label", "distill"], "seed": 0, "plugins": ["modalities.audio"],
        "run": {"num_threads": 1, "progress": False},
        "ingest": {"sources": [{"type": "synthetic", "modality": "audio", "count": 12, "name": "tones"}],
                   "samples_per_shard": 12, "split": {"train": 0.7, "val": 0.3, "test": 0.0}},
        "modalities": {"audio": {"teacher": {"kind": "whisper", "checkpoint": "random"}}},
        "pseudo_label": {"top_k": 0, "filters": {"min_avg_logprob": None, "max_compression_ratio": None,
                                                 "max_no_speech_prob": None, "max_wer": None}},
        "distill": {"student": {"style": "cross_attention", "d_model": 32, "n_layers": 1, "n_heads": 4,
                                "d_ff": 64, "dropout": 0.0},
                    "steps": 2, "batch_size": 4, "val_every": 2, "checkpoint_every": 2, "max_text_tokens": 16},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    Runner(load_config([str(tmp_path / "c.yaml")]), tmp_path / "run", echo=lambda s: None).run_graph()
    pl = tmp_path / "run" / "pseudo_label"
    got = json.loads((pl / "length_cap.json").read_text())
    fit = got["modalities"]["audio"]
    assert got["tokenizer"]["kind"] == "whisper" and fit["frame_seconds"] == 0.02 and fit["margin"] >= 1.5
    manifest = json.loads((pl / "manifest.json").read_text())
    assert "length_cap.json" in [o["path"] for o in manifest["outputs"]]
    data = load_labelled(pl, TextTokenizer({"kind": "whisper", "multilingual": False}), 10**9, splits=("train",))
    assert fit["labels"] == len(data.splits["train"])
    assert all(len(e.targets) <= cap_tokens(fit, e.features.shape[0]) for e in data.splits["train"])
    student = load_student(tmp_path / "run" / "distill" / "final")
    assert student.spec.length_cap == {"audio": fit}
    rows = [json.loads(x) for x in (tmp_path / "run" / "distill" / "val_predictions").glob("*.jsonl").__next__()
            .read_text().splitlines()]
    assert rows  # the val check decoded, under the cap (the decoder's bound is tested in test_fast_decoding)
    f = torch.zeros(75, 1)
    assert student.spec.decode_cap("audio", 75) == cap_tokens(fit, f.shape[0])
