"""The runner's contract, driven through the real CLI on the tests' own small stages (tests/runner_stages.py)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli, offline_demo_config

CFG = ROOT / "tests" / "runner.yaml"


def _files(d: Path) -> dict:
    """Product files of a run (not logs, locks, timing) -> bytes."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_file() and not any(s in rel for s in ("manifest.json", "metrics.jsonl", "started.json", ".lock", "checkpoints/",
                                                      ".parts/", "config.yaml", "run.log", ".previous/")):
            out[rel] = p.read_bytes()
    return out


def test_run_then_skip_on_match(tmp_path):
    r = cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    assert "make: finished" in r.stdout and "concat: finished" in r.stdout
    m1 = (tmp_path / "r/make/manifest.json").read_text()
    r = cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    assert r.stdout.count("skipped") == 3, r.stdout
    assert (tmp_path / "r/make/manifest.json").read_text() == m1
    st = json.loads(cli("status", tmp_path / "r", "--json", check=True).stdout)
    assert {k: v["state"] for k, v in st.items()} == {"make": "done", "train": "done", "concat": "done"}


def test_the_run_log_status_json_and_a_run_that_never_started(tmp_path):
    """RUN/run.log holds what the console showed, attempt after attempt; `status --json` gives a done stage's
    counts as numbers; a run refused before it starts leaves no run directory behind."""
    r = cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    log = (tmp_path / "r/run.log").read_text()
    assert log.count("=== ") == 2 and "make: finished" in log and "concat: done, config and inputs unchanged" in log
    assert all(line in log for line in r.stdout.splitlines())
    st = json.loads(cli("status", tmp_path / "r", "--json", check=True).stdout)
    assert st["train"]["counts"] == {"steps": 6} and st["train"]["detail"] == "steps 6"
    r = cli("run", CFG, "--run-dir", tmp_path / "never", "--from", "concat")
    assert r.returncode == 2 and "upstream stage make is pending" in r.stderr
    assert not (tmp_path / "never").exists()


def test_manifest_contents(tmp_path):
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    m = json.loads((tmp_path / "r/train/manifest.json").read_text())
    assert m["stage"] == "train" and len(m["config_hash"]) == 64 and "make" in m["inputs"]
    paths = {o["path"] for o in m["outputs"]}
    assert "final/model.model.safetensors" in paths
    for o in m["outputs"]:
        assert (tmp_path / "r/train" / o["path"]).stat().st_size == o["size"]
    assert m["counts"] == {"steps": 6}
    assert {"python", "torch", "whisper", "open_clip", "transformers"} <= set(m["versions"])
    assert (tmp_path / "r/config.yaml").exists()


def test_changed_config_reruns_stage_and_downstream(tmp_path):
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    r = cli("run", CFG, "--run-dir", tmp_path / "r", "train.lr=0.05", check=True)
    assert "make: done" in r.stdout
    assert "train: running (config changed: train.lr 0.1 -> 0.05;" in r.stdout  # the key that changed, both values
    # concat's config did not change but its input (train) did: re-run with the reason.
    assert "concat: running (input train changed;" in r.stdout


def test_status_reports_stale_without_running(tmp_path):
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    cfg = (tmp_path / "r/config.yaml").read_text().replace("value: 1", "value: 5")
    (tmp_path / "r/config.yaml").write_text(cfg)
    st = json.loads(cli("status", tmp_path / "r", "--json", check=True).stdout)
    assert st["make"]["state"] == "stale" and st["make"]["detail"] == "config changed: make.value 1 -> 5"
    assert st["train"]["state"] == "stale"


def test_killed_training_stage_resumes_to_identical_weights(tmp_path):
    cli("run", CFG, "--run-dir", tmp_path / "whole", check=True)
    r = cli("run", CFG, "--run-dir", tmp_path / "cut", env={"GROUNDGAN_FAULT": "step:4"})
    assert r.returncode == -9, r.stderr  # SIGKILL in the middle of the stage
    st = json.loads(cli("status", tmp_path / "cut", "--json", check=True).stdout)
    assert st["train"] == {"state": "partial", "detail": "step 3 of 6"}
    r = cli("run", CFG, "--run-dir", tmp_path / "cut", check=True)
    assert "taking over a stale lock" in r.stderr
    assert "make: done" in r.stdout and "train: running (resuming partial work)" in r.stdout
    a, b = _files(tmp_path / "whole"), _files(tmp_path / "cut")
    assert a.keys() == b.keys() and "train/final/model.model.safetensors" in a
    for k in a:
        assert a[k] == b[k], f"{k} differs after resume"


def test_kill_before_manifest_leaves_stage_partial(tmp_path):
    r = cli("run", CFG, "--run-dir", tmp_path / "r", env={"GROUNDGAN_FAULT": "manifest:2"})
    assert r.returncode == -9
    assert (tmp_path / "r/make/manifest.json").exists()
    assert not (tmp_path / "r/train/manifest.json").exists()
    st = json.loads(cli("status", tmp_path / "r", "--json", check=True).stdout)
    assert st["train"]["state"] == "partial"
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    assert (tmp_path / "r/train/manifest.json").exists()


def test_kill_inside_atomic_write_keeps_old_file(tmp_path):
    from pipeline import faults
    from pipeline.files import atomic_write_text

    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    code = ("import sys; sys.path.insert(0, %r); from pipeline.files import atomic_write_text; "
            "atomic_write_text(%r, 'new' * 1000)") % (str(ROOT), str(p))
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GROUNDGAN_FAULT": "atomic_write:1"})
    assert r.returncode == -9
    assert p.read_text() == "old"
    faults.reset()


def test_lock_refuses_second_run(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    # a process that holds the run's lock as a run does (RunLock: flock on RUN/.lock), then sleeps
    code = ("import sys, time; sys.path.insert(0, %r); from pathlib import Path; from pipeline.rundir import RunLock; "
            "RunLock(Path(%r)).acquire(); print('held', flush=True); time.sleep(60)") % (str(ROOT), str(run))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cli("run", CFG, "--run-dir", run)
        assert r.returncode == 2
        assert f"in use by process {holder.pid}" in r.stderr and "Traceback" not in r.stderr
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: the kernel dropped its lock; its record is left, and named as it is taken over
    r = cli("run", CFG, "--run-dir", run, check=True)
    assert f"taking over a stale lock on {run} left by process {holder.pid}" in r.stderr
    assert not (run / ".lock").exists()


def test_from_until_force(tmp_path):
    r = cli("run", CFG, "--run-dir", tmp_path / "r", "--until", "make", check=True)
    assert "make: finished" in r.stdout and "train" not in r.stdout
    r = cli("run", CFG, "--run-dir", tmp_path / "r", "--from", "concat")
    assert r.returncode == 2 and "upstream stage train is pending" in r.stderr
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    r = cli("run", CFG, "--run-dir", tmp_path / "r", "--force", "make", check=True)
    assert "make: running (forced; the earlier work is kept in" in r.stdout
    # Forced re-run writes the same products, so downstream stays valid.
    assert "train: done" in r.stdout and "concat: done" in r.stdout


def test_reuse_copies_matching_stages(tmp_path):
    cli("run", CFG, "--run-dir", tmp_path / "a", check=True)
    r = cli("run", CFG, "--run-dir", tmp_path / "b", "train.lr=0.05", "--reuse", tmp_path / "a", check=True)
    assert "make: reused from" in r.stdout
    assert "train: running" in r.stdout
    assert (tmp_path / "b/make/out0.json").read_bytes() == (tmp_path / "a/make/out0.json").read_bytes()


@pytest.mark.parametrize("override,needle", [
    ("bogus.key=1", "bogus"),
    ("distill.steps=abc", "distill.steps"),
    ("distill.batch_size=-2", "distill.batch_size"),
    ("distill.stepz=3", "did you mean steps"),
    ("ingest.sources=[{dir: /no/such/folder, modality: text}]", "data folder not found: /no/such/folder"),
])
def test_config_user_errors_exit_2_without_traceback(override, needle):
    r = cli("config", CFG, override)
    assert r.returncode == 2, r.stdout
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("override,needle", [
    ("adversarial.center_rewards=true", "'adversarial.center_rewards' is retired (sequence rewards (no per-token "
                                        "returns)); git tag arms-2026-12 has it (docs/history.md)"),
    ("adversarial.disc_d_model=64", "'adversarial.disc_d_model' is retired"),
    ("evaluate.max_new_tokens=64", "'evaluate.max_new_tokens' moved to 'decoding.max_new_tokens' (docs/history.md)"),
])
def test_a_retired_or_moved_key_is_one_line_naming_where_it_went(tmp_path, override, needle):
    r = cli("config", ROOT / "configs" / "tiny.yaml", override)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    key, value = override.split("=")
    section, name = key.split(".")
    (tmp_path / "old.yaml").write_text(f"{section}:\n  {name}: {value}\n")  # the same key in a file
    r = cli("config", ROOT / "configs" / "tiny.yaml", tmp_path / "old.yaml")
    assert r.returncode == 2 and f"old.yaml: '{key}'" in r.stderr, r.stderr


def test_what_a_stage_reads_from_other_sections_is_in_its_hash(tmp_path):
    """The decoding that picks final/ by val WER and scores the held-out sets is a section of its own, in the hash
    of distill, adversarial and evaluate (adversarial also reads distill.max_text_tokens and distill.student):
    changing it makes those three stale, naming the key, and leaves the data stages done."""
    from pipeline.config import load_config
    from pipeline.graph import Runner

    tiny = [str(ROOT / "configs" / "tiny.yaml")]
    Runner(load_config(tiny), tmp_path / "r", echo=lambda s: None).run_graph()
    states = {s.name: s for s in Runner(load_config(tiny, ["decoding.max_ngram_repeats=3"]), tmp_path / "r").status()}
    assert states["ingest"].state == states["pseudo_label"].state == "done"
    for name in ("distill", "adversarial", "evaluate"):
        assert states[name].state == "stale"
        assert states[name].detail == "config changed: decoding.max_ngram_repeats 2 -> 3", (name, states[name].detail)
    # a cross-section read: the adversarial stage's own hash covers distill.max_text_tokens
    spec = {s.name: s for s in Runner(load_config(tiny), tmp_path / "r").specs}["adversarial"]
    a = spec.config_hash(load_config(tiny))
    assert spec.config_hash(load_config(tiny, ["distill.max_text_tokens=20"])) != a
    assert spec.config_hash(load_config(tiny, ["distill.lr=0.5"])) == a  # what it does not read stays out


def test_missing_config_file_and_unknown_stage(tmp_path):
    r = cli("run", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "config file not found" in r.stderr
    r = cli("run", CFG, "--run-dir", tmp_path / "r", "--from", "trian")
    assert r.returncode == 2 and "did you mean" in r.stderr and "Traceback" not in r.stderr


def test_stages_and_modalities_listing():
    r = cli("stages", check=True)
    assert "ingest" in r.stdout and "pseudo_label" in r.stdout
    r = cli("modalities", check=True)
    assert "text" in r.stdout


def test_the_docs_run_commands_load(tmp_path):
    """Every `groundgan run configs/...` command in the README and docs/ (code blocks and inline) names configs and
    overrides that pass the checks made at load: the unanchored ablation's command once failed them (it kept the
    demo's select_by: val_wer). The demo's data folders exist only after `make demo`: its sources are swapped for
    synthetic ones."""
    import re
    import shlex

    from pipeline.config import load_config

    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    cmds = {" ".join(m.split()) for m in re.findall(r"`(groundgan run [^`]+)`", text)}
    cmds |= {line.strip() for line in text.splitlines() if line.startswith("groundgan run ")}
    cmds = sorted(c for c in cmds if "configs/" in c)
    assert len(cmds) >= 4, cmds
    demo = offline_demo_config(tmp_path)
    for cmd in cmds:
        words = shlex.split(cmd)[2:]
        files, overrides, skip = [], [], False
        for w in words:
            if skip:
                skip = False
            elif w in ("--run-dir", "--reuse", "--from", "--until", "--force"):
                skip = True
            elif w.endswith(".yaml"):
                files.append(str(demo) if w == "configs/demo.yaml" else str(ROOT / w))
            else:
                assert "=" in w, (cmd, w)
                overrides.append(w)
        load_config(files, overrides)  # raises UserError on a failed check


def test_the_config_reference_names_every_training_setting():
    """docs/config.md's tables list every field of distill (and its student), adversarial (and its guards) and
    decoding, and no key that is not one."""
    import dataclasses
    import re

    from stages.adversarial.config import AdversarialConfig, GuardConfig
    from stages.distill import DistillConfig
    from stages.models.generation import DecodingConfig
    from stages.models.student import StudentConfig

    text = (ROOT / "docs" / "config.md").read_text()
    sections = {"distill": DistillConfig, "distill.student": StudentConfig, "adversarial": AdversarialConfig,
                "adversarial.guards": GuardConfig, "decoding": DecodingConfig}
    parts = re.split(r"^#+ ", text, flags=re.M)
    for title, cls in sections.items():
        body = next(p for p in parts if p.split("\n", 1)[0].strip() == title)
        documented = re.findall(r"^\| `(\w+)` \|", body, flags=re.M)
        assert documented == [f.name for f in dataclasses.fields(cls)], title


# ---------------------------------------------------------------- products checked against their manifest
def test_an_edited_output_makes_its_stage_stale_and_it_reruns(tmp_path):
    run = tmp_path / "r"
    cli("run", CFG, "--run-dir", run, check=True)
    good = (run / "make/out1.json").read_bytes()
    (run / "make/out1.json").write_bytes(good.replace(b'"value": 1', b'"value": 6'))  # same size, another hash
    r = cli("status", run, check=True)
    assert "make           stale    output out1.json does not match its sha256" in r.stdout, r.stdout
    assert "concat         stale    upstream make is stale" in r.stdout
    r = cli("run", CFG, "--run-dir", run, check=True)
    assert "make: running (output out1.json does not match its sha256; moved aside to " in r.stdout, r.stdout
    assert (run / "make/out1.json").read_bytes() == good
    aside = list((run / ".aside").glob("make-*/out1.json"))
    assert len(aside) == 1 and b'"value": 6' in aside[0].read_bytes()  # kept for a look, never deleted
    assert "train: done" in r.stdout and "concat: done" in r.stdout  # the same products: downstream still valid


def test_a_planted_or_size_changed_output_is_caught(tmp_path):
    run = tmp_path / "r"
    cli("run", CFG, "--run-dir", run, check=True)
    (run / "make/out9.json").write_text("{}")
    assert "make           stale    output out9.json is not in the manifest" in cli("status", run).stdout
    (run / "make/out9.json").unlink()
    (run / "make/out0.json").write_text("{}")
    assert "output out0.json is 2 bytes, the manifest says" in cli("status", run).stdout


def test_a_deleted_final_of_a_training_stage_resumes_from_its_checkpoint(tmp_path):
    run = tmp_path / "r"
    cli("run", CFG, "--run-dir", run, check=True)
    final = run / "train/final/model.model.safetensors"
    good, metrics = final.read_bytes(), (run / "train/metrics.jsonl").read_text()
    final.unlink()
    assert "train          stale    output final/model.model.safetensors is missing" in cli("status", run).stdout
    r = cli("run", CFG, "--run-dir", run, check=True)
    assert "train: running (output final/model.model.safetensors is missing; moved aside to " in r.stdout, r.stdout
    assert "resuming from the newest checkpoint)" in r.stdout
    assert final.read_bytes() == good
    assert (run / "train/metrics.jsonl").read_text() == metrics  # no step was trained again
    assert "concat: done" in r.stdout


def test_reuse_checks_the_other_run_and_never_follows_its_links(tmp_path):
    cli("run", CFG, "--run-dir", tmp_path / "a", check=True)
    p = tmp_path / "a/make/out0.json"
    p.write_bytes(p.read_bytes().replace(b'"value": 1', b'"value": 7'))
    r = cli("run", CFG, "--run-dir", tmp_path / "b", "--reuse", tmp_path / "a", check=True)
    assert "make: not reused from" in r.stdout and "out0.json does not match its sha256" in r.stdout, r.stdout
    assert "make: running (not run yet)" in r.stdout
    assert json.loads((tmp_path / "b/make/out0.json").read_text())["value"] == 1
    # a link in the other run's stage directory (a stage writes none): not reused, and nothing read through it
    cli("run", CFG, "--run-dir", tmp_path / "c", check=True)
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "d" / "secret.json").write_text("secret")
    os.symlink(outside / "d", tmp_path / "c/make/linked")
    r = cli("run", CFG, "--run-dir", tmp_path / "e", "--reuse", tmp_path / "c", check=True)
    assert f"make: not reused from {tmp_path / 'c'}: {tmp_path / 'c/make/linked'} is a link" in r.stdout, r.stdout
    assert not list((tmp_path / "e").rglob("secret.json"))
    assert "train: reused from" not in r.stdout or (tmp_path / "e/train").exists()


# ------------------------------------------------------------------------------- finished work is never lost
def test_a_changed_config_keeps_the_finished_work_and_changing_it_back_restores_it(tmp_path):
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    before = _files(tmp_path / "r")
    first = json.loads((tmp_path / "r/train/manifest.json").read_text())["config_hash"][:12]
    r = cli("run", CFG, "--run-dir", tmp_path / "r", "train.lr=0.05", check=True)
    kept = tmp_path / "r/train/.previous" / first
    assert f"train: running (config changed: train.lr 0.1 -> 0.05; the earlier work is kept in {kept})" in r.stdout
    assert "concat: running (input train changed; the earlier work is kept in" in r.stdout
    # the old final/ is there, byte for byte, with its manifest and checkpoints
    assert (kept / "final/model.model.safetensors").read_bytes() == before["train/final/model.model.safetensors"]
    assert (kept / "manifest.json").is_file() and (kept / "checkpoints").is_dir()
    st = json.loads(cli("status", tmp_path / "r", "--json", check=True).stdout)
    assert [k["path"] for k in st["train"]["kept"]] == [str(kept)]
    assert st["train"]["kept"][0]["differs"] == "train.lr 0.1 -> 0.05" and st["train"]["kept"][0]["done"]
    assert "kept" in cli("status", tmp_path / "r", check=True).stdout
    # the typo undone: the kept versions come back (checked against their manifests), nothing is re-run
    r = cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    assert f"train: restored the version kept in {kept}" in r.stdout and "concat: restored" in r.stdout
    assert "finished in" not in r.stdout and _files(tmp_path / "r") == before
    assert len(json.loads(cli("status", tmp_path / "r", "--json", check=True).stdout)["train"]["kept"]) == 1  # lr 0.05
    # --force keeps too; only `discard` deletes
    cli("run", CFG, "--run-dir", tmp_path / "r", "--force", "concat", check=True)
    r = cli("discard", tmp_path / "r", check=True)
    assert "freed" in r.stdout and not list((tmp_path / "r").glob("*/.previous"))
    assert _files(tmp_path / "r") == before


@pytest.mark.parametrize("fault", ["keep:2", "restore:2"])
def test_a_kill_while_work_is_moved_loses_nothing(tmp_path, fault):
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    before = _files(tmp_path / "r")
    if fault.startswith("restore"):
        cli("run", CFG, "--run-dir", tmp_path / "r", "train.lr=0.05", check=True)
        r = cli("run", CFG, "--run-dir", tmp_path / "r", env={"GROUNDGAN_FAULT": fault})
    else:
        r = cli("run", CFG, "--run-dir", tmp_path / "r", "train.lr=0.05", env={"GROUNDGAN_FAULT": fault})
    assert r.returncode == -9, r.stdout + r.stderr
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)  # the next run finishes the move first
    assert _files(tmp_path / "r") == before
    assert not list((tmp_path / "r").rglob(".incoming-*")) and not list((tmp_path / "r").rglob(".restoring"))


def test_raising_steps_alone_trains_longer_from_the_newest_checkpoint(tmp_path):
    # the toy stage's schedule does not depend on its total, so six steps then three more must be, bit for bit,
    # a run of nine: the weights, the optimiser's moments, the scheduler and the RNG (its data) all carry over
    cli("run", CFG, "--run-dir", tmp_path / "nine", "train.steps=9", check=True)
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    six = _files(tmp_path / "r")
    st = json.loads(cli("status", tmp_path / "r", "--json", check=True).stdout)
    assert st["train"]["state"] == "done"
    r = cli("run", CFG, "--run-dir", tmp_path / "r", "train.steps=9", check=True)
    line = next(l for l in r.stdout.splitlines() if l.startswith("train: running"))
    assert line.startswith("train: running (training longer: train.steps 6 -> 9; continuing from its newest checkpoint; "
                           "the 6-step version is kept in"), line
    steps = [json.loads(l)["step"] for l in (tmp_path / "r/train/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # steps 7..9 appended to 1..6, none repeated
    nine, longer = _files(tmp_path / "nine"), _files(tmp_path / "r")
    assert longer == nine
    kept = next((tmp_path / "r/train/.previous").iterdir())
    assert (kept / "final/model.model.safetensors").read_bytes() == six["train/final/model.model.safetensors"]
    # lowering it, or changing another key with it, is a changed config: a fresh run, the longer one kept
    r = cli("run", CFG, "--run-dir", tmp_path / "r", "train.steps=7", "--until", "train", check=True)
    assert "train: running (config changed: train.steps 9 -> 7; the earlier work is kept in" in r.stdout


def test_relative_paths_in_a_config_file_are_read_from_its_folder(tmp_path, monkeypatch):
    (tmp_path / "project/configs").mkdir(parents=True)
    data = tmp_path / "project/data/texts"
    data.mkdir(parents=True)
    (data / "a.txt").write_text("one sentence\n")
    cfg = tmp_path / "project/configs/c.yaml"
    cfg.write_text("stages: [ingest]\ningest:\n  sources:\n    - {type: text, dir: ../data/texts, name: t}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = cli("config", cfg, cwd=elsewhere, check=True)
    assert f"dir: {data}" in r.stdout  # from the config's folder, whatever the working directory
    # written from the working directory's point of view: one line naming both places
    cfg.write_text("stages: [ingest]\ningest:\n  sources:\n    - {type: text, dir: data/texts, name: t}\n")
    r = cli("config", cfg, cwd=tmp_path / "project")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(tmp_path / "project/configs/data/texts") in r.stderr and str(data) in r.stderr
    # an override on the command line is the shell's: relative to the working directory
    cfg.write_text("stages: [ingest]\ningest:\n  sources:\n    - {type: text, dir: ../data/texts, name: t}\n")
    r = cli("config", cfg, "ingest.sources=[{type: text, dir: data/texts, name: t}]", cwd=tmp_path / "project", check=True)
    assert "dir: data/texts" in r.stdout


def test_a_stage_version_is_in_its_hash_from_2_on():
    from pipeline.config import load_config
    from pipeline.graph import StageSpec

    cfg = load_config([str(CFG)])
    one, two = StageSpec("make", lambda ctx: {}, uses_modalities="none"), StageSpec("make", lambda ctx: {}, uses_modalities="none", version=2)
    assert "version" not in one.hash_sections(cfg)  # hashes of stages that never raised it stay as they were
    assert one.config_hash(cfg) != two.config_hash(cfg) and two.hash_sections(cfg)["version"] == 2
