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
        if p.is_file() and not any(s in rel for s in ("manifest.json", "metrics.jsonl", "started.json", ".lock", "checkpoints/", ".parts/", "config.yaml")):
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
    r = cli("run", CFG, "--run-dir", tmp_path / "r", "extra.train.lr=0.05", check=True)
    assert "make: done" in r.stdout
    assert "train: running (config changed)" in r.stdout
    # concat's config did not change but its input (train) did: re-run with the reason.
    assert "concat: running (input train changed)" in r.stdout


def test_status_reports_stale_without_running(tmp_path):
    cli("run", CFG, "--run-dir", tmp_path / "r", check=True)
    cfg = (tmp_path / "r/config.yaml").read_text().replace("value: 1", "value: 5")
    (tmp_path / "r/config.yaml").write_text(cfg)
    st = json.loads(cli("status", tmp_path / "r", "--json", check=True).stdout)
    assert st["make"]["state"] == "stale" and st["make"]["detail"] == "config changed"
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
    assert "make: running (forced)" in r.stdout
    # Forced re-run writes the same products, so downstream stays valid.
    assert "train: done" in r.stdout and "concat: done" in r.stdout


def test_reuse_copies_matching_stages(tmp_path):
    cli("run", CFG, "--run-dir", tmp_path / "a", check=True)
    r = cli("run", CFG, "--run-dir", tmp_path / "b", "extra.train.lr=0.05", "--reuse", tmp_path / "a", check=True)
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


def test_the_readmes_run_commands_load(tmp_path):
    """Every `groundgan run configs/...` command in the README (code blocks and inline) names configs and
    overrides that pass the checks made at load: the unanchored ablation's command once failed them (it kept the
    demo's select_by: val_wer). The demo's data folders exist only after `make demo`: its sources are swapped for
    synthetic ones."""
    import re
    import shlex

    from pipeline.config import load_config

    text = (ROOT / "README.md").read_text()
    cmds = {" ".join(m.split()) for m in re.findall(r"`(groundgan run [^`]+)`", text)}
    cmds |= {line.strip() for line in text.splitlines() if line.startswith("groundgan run ")}
    cmds = sorted(c for c in cmds if "configs/" in c)
    assert len(cmds) >= 3, cmds
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
