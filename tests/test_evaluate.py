"""The evaluation report and `groundgan compare`, from fake run directories made here (no model needed)."""

import json
import math
import re
from pathlib import Path

import pytest

from conftest import cli
from stages.evaluation import report as rp
from stages.evaluation import text_metrics as tm


def _fake_run(root: Path, wer_distill: float = 0.25, with_adversarial: bool = True) -> tuple[dict, list[dict]]:
    """A run directory with training logs, and the report data evaluate would have computed for it."""
    (root / "distill").mkdir(parents=True)
    lines = []
    for step in range(0, 100, 10):
        lines.append({"step": step, "loss": 3 * math.exp(-step / 40) + 0.5, "lr": 1e-3})
        if step % 50 == 0:
            lines.append({"step": step, "val_loss": 3 * math.exp(-step / 50) + 0.7})
    (root / "distill" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9')  # torn line
    if with_adversarial:
        (root / "adversarial").mkdir()
        (root / "adversarial" / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 1 - s / 100, "disc_acc/audio": 0.5 + s / 200}) + "\n" for s in range(0, 50, 5)))
    cps = {"teacher": {"n_samples": 4, "wer_vs_reference": 0.1, "wer_vs_reference_ci": [0.05, 0.2], "distinct_2": 0.9},
           "distill": {"n_samples": 4, "wer_vs_reference": wer_distill, "wer_vs_reference_ci": [0.2, 0.3],
                       "wer_vs_teacher": 0.2, "wer_vs_teacher_ci": [0.1, 0.3], "distinct_2": 0.7, "self_bleu_4": 0.2,
                       "disc_accuracy": None}}
    sweep = {"distill": [{"temperature": t, "quality_metric": "wer_vs_teacher", "quality": 0.2 + t / 4,
                          "distinct_2": 0.7 + t / 10, "self_bleu_4": 0.2 - t / 10, "n_samples": 4} for t in (0.0, 0.7, 1.0)]}
    if with_adversarial:
        cps["adversarial"] = {"n_samples": 4, "wer_vs_reference": 0.22, "disc_accuracy": 0.6}
    report = {"test": {"audio": cps}, "sweep": {"test": {"audio": sweep}}}
    preds = [{"set": "test", "modality": "audio", "key": f"k{i}", "reference": f"ref | {i}", "teacher": f"teacher {i}",
              "outputs": {"distill": f"distill {i}", **({"adversarial": f"adv {i}"} if with_adversarial else {})}}
             for i in range(10)]
    return report, preds


def test_write_report_files_and_schema(tmp_path):
    run = tmp_path / "run"
    report, preds = _fake_run(run)
    written = rp.write_report(run, run / "evaluate", report, preds)
    names = {p.name for p in written}
    assert {"report.json", "report.md", "predictions.jsonl", "training_curves.png", "quality_diversity.png",
            "disc_accuracy.png"} <= names
    for p in written:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = json.loads((run / "evaluate" / "report.json").read_text())
    assert back == report
    assert set(back) == {"test", "sweep"}
    assert back["test"]["audio"]["distill"]["wer_vs_reference_ci"] == [0.2, 0.3]
    assert len((run / "evaluate" / "predictions.jsonl").read_text().splitlines()) == 10


def test_report_md_tables_then_plots_then_samples(tmp_path):
    run = tmp_path / "run"
    report, preds = _fake_run(run)
    rp.write_report(run, run / "evaluate", report, preds)
    md = (run / "evaluate" / "report.md").read_text()
    i_table, i_plots, i_samples = md.index("## test / audio"), md.index("## Plots"), md.index("## Sample outputs")
    assert i_table < i_plots < i_samples
    table = md[i_table:i_plots].splitlines()
    header = next(l for l in table if l.startswith("| checkpoint"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:4] == ["checkpoint", "n_samples", "wer_vs_reference", "wer_vs_teacher"]
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip("|").split("|")] for l in table
            if l.startswith("| ") and not l.startswith("| checkpoint")}
    assert list(rows) == ["teacher", "distill", "adversarial"]  # fixed order, not the JSON's
    assert rows["distill"][cols.index("wer_vs_reference")] == "0.250 [0.200, 0.300]"
    assert rows["teacher"][cols.index("wer_vs_teacher")] == "–"
    assert rows["distill"][cols.index("disc_accuracy")] == "–"  # null
    assert rows["adversarial"][cols.index("disc_accuracy")] == "0.600"
    assert "![Training curves](training_curves.png)" in md
    samples = md[i_samples:]
    assert len(re.findall(r"^\| k\d", samples, flags=re.M)) == rp.SAMPLES_PER_TABLE  # 10 predictions, 8 shown
    assert "ref \\| 0" in samples  # a pipe in a text does not break the table


def test_report_without_adversarial_or_logs(tmp_path):
    run = tmp_path / "run"
    report, preds = _fake_run(run, with_adversarial=False)
    (run / "distill" / "metrics.jsonl").unlink()
    written = {p.name for p in rp.write_report(run, run / "evaluate", report, preds)}
    assert "training_curves.png" not in written and "disc_accuracy.png" not in written
    assert "quality_diversity.png" in written
    md = (run / "evaluate" / "report.md").read_text()
    assert "adversarial" not in md and "Training curves" not in md


def test_read_curves_steps_and_torn_line(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    c = rp.read_curves(run, "distill")
    assert [x for x, _ in c["loss"]] == list(range(0, 100, 10))
    assert [x for x, _ in c["val_loss"]] == [0.0, 50.0]
    assert "step" not in c
    assert rp.read_curves(run, "nothing") == {}


def test_check_report_refuses_bad_values():
    with pytest.raises(ValueError):
        rp.check_report({"test": {"audio": {"distill": {"wer": "high"}}}})
    with pytest.raises(ValueError):
        rp.check_report({"sweep": {"test": {"audio": {"distill": [{"temperature": 0.0}]}}}})
    rp.check_report({"test": {"audio": {"distill": {"wer": None, "wer_ci": [0.1, 0.2], "n": 3}}}, "sweep": {}})


def test_compare_runs_side_by_side(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for run, w in ((a, 0.25), (b, 0.4)):
        report, preds = _fake_run(run, wer_distill=w)
        rp.write_report(run, run / "evaluate", report, preds)
    out = tmp_path / "cmp"
    assert rp.compare_runs([a, b], out) == 0
    printed = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    assert printed == md
    header = next(l for l in md.splitlines() if l.startswith("| checkpoint"))
    assert "wer_vs_reference<br>a | wer_vs_reference<br>b" in header
    distill = next(l for l in md.splitlines() if l.startswith("| distill"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in distill.strip("|").split("|")]
    assert cells[cols.index("wer_vs_reference<br>a")].startswith("0.250")
    assert cells[cols.index("wer_vs_reference<br>b")].startswith("0.400")
    for png in ("compare_training_curves.png", "compare_quality_diversity.png", "compare_disc_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_compare_names_each_run_apart_however_deep_their_folders_agree(tmp_path):
    from stages.evaluation.report import _run_names

    a, b = tmp_path / "clone1" / "runs" / "demo", tmp_path / "clone2" / "runs" / "demo"
    assert _run_names([a, b]) == ["clone1/runs/demo", "clone2/runs/demo"]  # two clones' runs/demo
    assert _run_names([tmp_path / "x" / "r1", tmp_path / "y" / "r2"]) == ["r1", "r2"]
    assert _run_names([a, a]) == ["demo#1", "demo#2"]


def test_compare_cli_run_without_report(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    report, preds = _fake_run(a)
    rp.write_report(a, a / "evaluate", report, preds)
    _fake_run(b)  # logs only, no evaluate/report.json
    r = cli("compare", a, b, check=True)
    assert "(no evaluate/report.json)" in r.stdout and "## test / audio" in r.stdout
    r = cli("compare", a, tmp_path / "missing")
    assert r.returncode != 0 and "run directory not found" in r.stderr


# ------------------------------------------------------------------------------------------ end to end
TINY = """
stages: [ingest, pseudo_label, distill, adversarial, evaluate]
seed: 0
plugins: [modalities.audio, modalities.image]
run: {num_threads: 1, progress: false}
ingest:
  sources:
    - {type: synthetic, modality: text, count: 12, name: words}
    - {type: synthetic, modality: audio, count: 10, name: tones}
    - {type: synthetic, modality: image, count: 10, name: shapes}
  samples_per_shard: 8
  split: {train: 0.5, val: 0.2, test: 0.3}
modalities:
  audio: {teacher: {kind: whisper, checkpoint: random}}
  image: {teacher: {kind: classifier, checkpoint: random}}
pseudo_label:
  top_k: 0
  filters: {min_avg_logprob: null, max_compression_ratio: null, max_no_speech_prob: null, max_wer: null}
distill:
  student: {style: prefix, d_model: 32, n_layers: 1, n_heads: 4, d_ff: 64, prefix_len: 2, feature_frames: 8,
            dropout: 0.0}
  select_by: val_loss
  kd_weight: 0.0
  lr: 1.0e-3
  steps: 6
  batch_size: 8
  warmup_steps: 2
  max_text_tokens: 16
  val_every: 3
  checkpoint_every: 3
adversarial: {steps: 2, disc_warmup_steps: 1, batch_size: 4, max_new_tokens: 8, log_every: 1, checkpoint_every: 2}
decoding: {max_new_tokens: 8, fallback_temperatures: [], max_compression_ratio: 2.4, max_ngram_repeats: null}
evaluate:
  sources:
    - {type: synthetic, modality: audio, count: 3, name: extra_tones}
  temperatures: [0.0, 1.0]
  bootstrap: 50
  batch_size: 4
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "tiny.yaml").write_text(TINY)
    r = cli("run", d / "tiny.yaml", "--run-dir", d / "run", check=True)
    assert "evaluate: finished" in r.stdout
    return d


def test_evaluate_end_to_end(tiny_run):
    ev = tiny_run / "run" / "evaluate"
    report = json.loads((ev / "report.json").read_text())
    rp.check_report(report)
    assert set(report) == {"test", "extra_tones", "sweep"}
    assert set(report["extra_tones"]) == {"audio"}
    for m, cps in report["test"].items():
        assert set(cps) == {"teacher", "distill", "adversarial"}, m
        assert cps["distill"]["n_samples"] == cps["teacher"]["n_samples"] > 0
        # the stage's discriminator for the modality, where it trained one (a modality absent from its
        # train split has none)
        if (tiny_run / "run/adversarial/final/discriminators" / f"{m}.json").is_file():
            assert 0.0 <= cps["adversarial"]["disc_accuracy"] <= 1.0
            r = cps["adversarial"]["disc_ranking"]
            assert r is None or 0.0 <= r <= 1.0
        else:
            assert cps["adversarial"]["disc_accuracy"] is None and cps["adversarial"]["disc_ranking"] is None
        assert cps["distill"]["teacher_nll"] > 0
    audio = report["test"]["audio"]["distill"]
    assert {"wer_vs_teacher", "wer_vs_teacher_ci", "wer_vs_reference", "ier", "rep_5gram", "distinct_2",
            "self_bleu_4", "mean_length"} <= set(audio)
    assert "label_agreement" in report["test"]["image"]["distill"]
    # the tiny students write nothing (no bigram): no distinct-2 change; the WER change is there for audio
    for m in report["test"]:
        assert "distinct_2_change_vs_distill" not in report["test"][m]["adversarial"], m
    for m, q in (("audio", "wer_vs_teacher"), ("image", "label_agreement"), ("text", "teacher_nll")):
        pts = report["sweep"]["test"][m]["distill"]
        assert [p["temperature"] for p in pts] == [0.0, 1.0]
        assert {p["quality_metric"] for p in pts} == {q}
    # the text sweep's quality at T = 1 is the headline teacher NLL; greedy has no density
    text_pts = report["sweep"]["test"]["text"]["distill"]
    assert text_pts[0]["quality"] is None
    assert text_pts[1]["quality"] == pytest.approx(report["test"]["text"]["distill"]["teacher_nll"])
    # greedy outputs in predictions.jsonl are the cached T=0 generations, row for row
    preds = [json.loads(l) for l in (ev / "predictions.jsonl").read_text().splitlines()]
    audio_preds = [p for p in preds if p["set"] == "test" and p["modality"] == "audio"]
    cached = json.loads((ev / "generations/test/audio/distill/T0.json").read_text())
    assert [p["key"] for p in audio_preds] == cached["keys"]
    assert [p["outputs"]["distill"] for p in audio_preds] == cached["texts"]
    assert len(preds) == sum(c["teacher"]["n_samples"] for s, mods in report.items() if s != "sweep" for c in mods.values())
    for f in ("report.md", "training_curves.png", "quality_diversity.png", "disc_accuracy.png",
              "sets/extra_tones/done.json"):
        assert (ev / f).is_file(), f
    md = (ev / "report.md").read_text()
    assert "## extra_tones / audio" in md and "## Sample outputs (greedy)" in md


def test_vs_distill_pairs_the_two_students_outputs():
    from stages.evaluate import vs_distill

    refs = ["please enter your pin", "the line is busy", "goodbye now"]
    base = ["please enter your pin", "the line is busy the line is busy", "goodbye"]  # a loop: 4 + 1 errors
    hyps = ["please enter your pin", "the line is busy", "goodbye"]  # 1 error
    got = vs_distill("audio", base, hyps, refs, bootstrap=500, seed=0)
    assert got["wer_change_vs_distill"] == pytest.approx(-0.8)
    assert got["wer_change_vs_distill_ci"][1] <= 0 and 0 < got["p_fewer_errors_than_distill"] <= 1
    want = tm.distinct_n(hyps, 2) - tm.distinct_n(base, 2)
    assert want > 0 and got["distinct_2_change_vs_distill"] == pytest.approx(want)
    assert got["distinct_2_change_vs_distill_ci"] == tm.paired_distinct_change(base, hyps, 2, n=500, seed=0)["ci"]
    # a captioning modality: no word errors against references, the distinct-2 change all the same
    img = vs_distill("image", base, hyps, [None] * 3, bootstrap=500, seed=0)
    assert set(img) == {"distinct_2_change_vs_distill", "distinct_2_change_vs_distill_ci"}


def test_evaluate_without_adversarial_stage(tiny_run):
    d = tiny_run
    cfg = TINY.replace("stages: [ingest, pseudo_label, distill, adversarial, evaluate]",
                       "stages: [ingest, pseudo_label, distill, evaluate]").replace(
        "evaluate:\n", "evaluate:\n  splits: [test, train]\n")
    (d / "noadv.yaml").write_text(cfg)
    # adversarial is an input of evaluate only where the graph has it: the first run's evaluate has other
    # inputs, so --reuse copies distill but re-runs evaluate
    r = cli("run", d / "noadv.yaml", "--run-dir", d / "noadv", "--reuse", d / "run", check=True)
    assert "distill: reused" in r.stdout and "evaluate: finished" in r.stdout
    report = json.loads((d / "noadv/evaluate/report.json").read_text())
    assert all(set(cps) == {"teacher", "distill"} for s, mods in report.items() if s != "sweep" for cps in mods.values())
    # evaluate.splits: the train split too
    assert set(report) == {"test", "train", "extra_tones", "sweep"}
    assert sum(c["teacher"]["n_samples"] for c in report["train"].values()) > 0
    assert not (d / "noadv/evaluate/disc_accuracy.png").exists()
    # the same data, student and seed: the distilled student's row matches the first run's
    first = json.loads((d / "run/evaluate/report.json").read_text())
    for s in ("test", "extra_tones"):
        for m in report[s]:
            assert report[s][m]["distill"] == first[s][m]["distill"]


def test_short_form_wer_leaves_out_clips_longer_than_one_window():
    import numpy as np

    from stages.evaluate import EvalItem, score

    class NoExtra:
        def metrics(self, *a):
            return {}

    items = [EvalItem("a", "audio", "press one", "press one", "press one", features=np.zeros((100, 4), np.float16)),
             EvalItem("b", "audio", "hello there", "hello there", "hello there", features=np.zeros((1501, 4), np.float16)),
             EvalItem("c", "audio", "good bye", "good bye", "good bye", features=np.zeros((1500, 4), np.float16))]
    m, _ = score("audio", NoExtra(), ["press one", "hello hello hello", "good"], items, bootstrap=20, seed=0)
    assert m["wer_vs_reference"] == pytest.approx(3 / 6)  # 2 insertions/substitutions on b, 1 deletion on c
    assert m["n_short_form"] == 2 and m["wer_short_form"] == pytest.approx(1 / 4)  # a and c (1,500 frames fit)
    m, _ = score("audio", NoExtra(), ["press one", "good bye"], [items[0], items[2]], bootstrap=20, seed=0)
    assert "wer_short_form" not in m  # every clip is short-form: nothing to split


def test_a_long_clip_is_scored_for_likelihood_chunk_by_chunk():
    import numpy as np

    from stages.evaluate import EvalItem, chunk_items

    f = np.arange(20 * 3, dtype=np.float16).reshape(20, 3)
    long = EvalItem("a", "audio", "One. Two.", "One. Two.", "one two", features=f, chunks=[12, 8],
                    chunk_texts=["One.", "Two."])
    short = EvalItem("b", "audio", "Three.", "Three.", "three", features=f[:5])
    odd = EvalItem("c", "audio", "x", "x", None, features=f, chunks=[12, 7], chunk_texts=["x", ""])  # don't add up
    out = chunk_items([long, short, odd])
    assert [(it.key, it.teacher_text, len(it.features)) for it in out] == [
        ("a#0", "One.", 12), ("a#1", "Two.", 8), ("b", "Three.", 5), ("c", "x", 20)]
    assert np.array_equal(out[1].features, f[12:]) and out[0].reference is None


def test_equal_weights_write_equal_samples_whatever_the_checkpoint(tiny_run):
    # adversarial.lr=0: the phase runs and leaves the distilled weights as they were. The two checkpoints
    # share one random stream per set, modality and temperature, so even their sampled (T = 1) texts agree
    d = tiny_run
    r = cli("run", d / "tiny.yaml", "adversarial.lr=0", "evaluate.temperatures=[1.0]", "evaluate.sources=[]",
            "--run-dir", d / "off", "--reuse", d / "run", check=True)
    assert "distill: reused" in r.stdout and "adversarial: finished" in r.stdout
    gen = d / "off/evaluate/generations/test"
    for m in ("audio", "image", "text"):
        a, b = (json.loads((gen / m / cp / "T1.json").read_text())["texts"] for cp in ("distill", "adversarial"))
        assert a == b and len(set(a)) > 1, m
    report = json.loads((d / "off/evaluate/report.json").read_text())
    for m, cps in report["test"].items():
        assert {k: v for k, v in cps["adversarial"].items() if not k.startswith("disc_")} == \
            {k: v for k, v in cps["distill"].items() if not k.startswith("disc_")}, m


def test_compare_pairs_the_runs_clips_for_the_wer_change(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    refs = ["press one for sales", "please hold the line", "goodbye", "enter your password now"]
    outs = {a: ["press one for sales", "please hold a line", "good bye", "enter your password now"],   # 1 + 2 errors
            b: ["press one for sales", "please hold the line", "good bye", "enter your password"]}      # 2 + 1 errors
    for run, hyps in outs.items():
        report, _ = _fake_run(run)
        preds = [{"set": "test", "modality": "audio", "key": f"k{i}", "reference": r, "teacher": r,
                  "outputs": {"distill": r, "adversarial": h}} for i, (r, h) in enumerate(zip(refs, hyps))]
        preds.append({"set": "test", "modality": "audio", "key": f"only-{run.name}", "reference": "x y", "teacher": "x y",
                      "outputs": {"distill": "x y", "adversarial": "z"}})  # scored by one run only: left out
        rp.write_report(run, run / "evaluate", report, preds)
    lines = rp.paired_changes({"a": a, "b": b}, n=500)
    row = next(l for l in lines if "b adversarial" in l)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["0.231", "0.231"]  # 3 errors in 13 words each
    assert cells[4].startswith("+0.000") and cells[6] == "4"
    # the distilled checkpoints are word for word the references: no base error, no row
    assert not any("b distill" in l for l in lines)
    # one run, or a second without predictions: nothing to pair
    assert rp.paired_changes({"a": a}) == [] and rp.paired_changes({"a": a, "none": tmp_path / "none"}) == []


def test_a_shard_set_with_txt_references_is_scored(tiny_run):
    """An evaluate source of webdataset shards whose transcripts are .txt members beside the clips (the layout a
    user brings): every clip's reference reaches the report, which scores WER against them."""
    import io
    import tarfile

    import numpy as np

    from modalities.audio import Audio, AudioConfig

    d = tiny_run
    rng = np.random.default_rng(1)
    with tarfile.open(d / "calls-000.tar", "w") as tar:
        for i, text in enumerate(["please hold", "the line is busy", "goodbye now"]):
            for name, data in ((f"call{i}.wav", Audio(AudioConfig()).synthesize(i, rng)[0]),
                               (f"call{i}.txt", text.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = TINY.replace("    - {type: synthetic, modality: audio, count: 3, name: extra_tones}",
                       f"    - {{type: shards, urls: '{d / 'calls-000.tar'}', name: calls}}")
    (d / "shards.yaml").write_text(cfg)
    r = cli("run", d / "shards.yaml", "--run-dir", d / "shards", "--reuse", d / "run", check=True)
    assert "adversarial: reused" in r.stdout and "evaluate: finished" in r.stdout
    calls = json.loads((d / "shards/evaluate/report.json").read_text())["calls"]["audio"]
    assert calls["teacher"]["n_with_reference"] == 3 and calls["distill"]["wer_vs_reference"] is not None
    preds = [json.loads(x) for x in (d / "shards/evaluate/predictions.jsonl").read_text().splitlines()]
    assert sorted(p["reference"] for p in preds if p["set"] == "calls") == ["goodbye now", "please hold",
                                                                            "the line is busy"]


def test_an_evaluate_source_never_holds_an_input_the_students_trained_on(tiny_run, tmp_path):
    """A held-out set with the bytes of a train input refuses it (named in rejects.jsonl); a test input's pass."""
    import shutil

    from stages.pseudo_label import read_labelled

    media = {}
    for modality, rec, ext, data, _ in read_labelled(tiny_run / "run" / "pseudo_label", ["audio"], arrays=False):
        media.setdefault(rec["split"], (rec["key"], ext, data))
    held = tmp_path / "held"
    held.mkdir()
    for split in ("train", "test"):
        key, ext, data = media[split]
        (held / f"copy_of_{split}.{ext}").write_bytes(data)
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    cli("run", tiny_run / "tiny.yaml", "--run-dir", run,
        f"evaluate.sources=[{{modality: audio, dir: {held}, name: held}}]", check=True)
    done = json.loads((run / "evaluate/sets/held/done.json").read_text())
    assert done["labelled"] == {"audio": 1} and done["rejected"] == 1
    rejects = [json.loads(line) for line in (run / "evaluate/rejects.jsonl").read_text().splitlines()]
    mine = [r for r in rejects if r.get("set") == "held"]
    assert len(mine) == 1 and f"the same bytes as {media['train'][0]}, which the students trained on" in mine[0]["reason"]
