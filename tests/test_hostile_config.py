"""Issue #25's hostile configs, run directories and working directories: each one line and exit 2, or refused
before it can do harm (alias bombs, non-finite numbers, environment secrets, shadowing modules, a lock that
is torn or raced)."""

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cli

TINY = ROOT / "configs" / "tiny.yaml"
RUNNER = ROOT / "tests" / "runner.yaml"


def _one_line_error(r, needle):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_alias_bomb_is_refused_at_once(tmp_path):
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        levels.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(levels) + "\nextra: [*i]\n")
    assert (tmp_path / "bomb.yaml").stat().st_size < 700
    t0 = time.time()
    r = cli("config", tmp_path / "bomb.yaml", timeout=60)
    _one_line_error(r, "aliases (*a) are not allowed in a config")
    assert time.time() - t0 < 30


def test_unknown_top_level_key_is_named_before_anything_is_merged(tmp_path):
    (tmp_path / "c.yaml").write_text("sed: 1\ningest: {}\n")
    _one_line_error(cli("config", tmp_path / "c.yaml"), "unknown key 'sed'; did you mean seed?")


@pytest.mark.parametrize("override,needle", [
    ("distill.lr=nan", "'distill.lr' must be a finite number, got nan"),
    ("distill.lr=inf", "'distill.lr' must be a finite number, got inf"),
    ("ingest.split.train=nan", "'ingest.split.train' must be a finite number, got nan"),
    ("ingest.split.test=-0.5", "'ingest.split.test' must be >= 0.0"),
    ("evaluate.temperatures=[0.0,nan]", "'evaluate.temperatures[1]' must be a finite number"),
    ("plugins=[123]", "'plugins' must be a list of module names (strings), got [123]"),
    ("seed=${oc.env:HOME}", "environment interpolation is refused"),
])
def test_bad_numbers_plugins_and_env_are_one_line(override, needle):
    _one_line_error(cli("config", TINY, override), needle)


def test_env_interpolation_in_a_file_is_refused_and_never_written(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["ingest"]["sources"][0]["name"] = "${oc.env:GROUNDGAN_TEST_SECRET}"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("run", tmp_path / "c.yaml", "--run-dir", tmp_path / "run", env={"GROUNDGAN_TEST_SECRET": "hunter2"})
    _one_line_error(r, "'ingest.sources[0].name' reads the environment")
    assert "hunter2" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_plugins_and_stray_files_in_the_working_directory(tmp_path):
    """`python -m pipeline` puts the working directory first on sys.path: a stray yaml.py or stages.py there must
    not be imported; a plugin named in the config is still found there."""
    marker = tmp_path / "ran"
    for name in ("yaml", "stages", "torch", "numpy"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name} ')\n")
    (tmp_path / "my_plugin.py").write_text("LOADED = True\n")
    cfg = yaml.safe_load(TINY.read_text())
    cfg["plugins"] = ["my_plugin"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("config", tmp_path / "c.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), marker.read_text()
    assert "my_plugin" in r.stdout
    # nothing unnamed: a plugin that is not there is an error, not a search
    cfg["plugins"] = ["not_here"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    _one_line_error(cli("config", tmp_path / "c.yaml", cwd=tmp_path), "plugin 'not_here' could not be imported")


def test_run_directory_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("not a folder")
    _one_line_error(cli("run", RUNNER, "--run-dir", tmp_path / "f"), "is a file, not a directory")
    _one_line_error(cli("status", tmp_path / "f"), "not a run directory")


# ------------------------------------------------------------------------------------------ the lock
def test_a_torn_lock_file_is_taken_over(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / ".lock").write_text('{"pid": 12')  # a write cut short
    r = cli("run", RUNNER, "--run-dir", run, check=True)
    assert "taking over a stale lock" in r.stderr and "a torn lock file" in r.stderr
    assert not (run / ".lock").exists()


def _hold(run: str, barrier, q):
    sys.path.insert(0, str(ROOT))
    from pipeline.errors import UserError
    from pipeline.rundir import RunLock

    lock = RunLock(Path(run))
    barrier.wait()
    try:
        lock.acquire()
    except UserError:
        q.put("refused")
        return
    q.put("held")
    time.sleep(1.0)
    lock.release()


def test_only_one_of_many_racing_processes_holds_a_stale_lock(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 999999, "host": os.uname().nodename, "started": 0}))
    ctx = multiprocessing.get_context("spawn")
    n = 6
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(str(run), barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = sorted(q.get(timeout=5) for _ in range(n))
    assert got == ["held"] + ["refused"] * (n - 1), got


def test_plugin_stage_sections_are_checked_too():
    _one_line_error(cli("config", RUNNER, "train.lr=nan"), "'train.lr' must be a finite number, got nan")


@pytest.mark.parametrize("record,what", [({"step": 7, "loss": float("nan"), "lr": 0.1}, "loss is nan"),
                                         ({"step": 7, "loss": 1.0, "grad_norm": float("inf")}, "grad_norm is inf"),
                                         ({"step": 7, "disc_loss/audio": float("-inf")}, "disc_loss/audio is -inf")])
def test_a_non_finite_loss_stops_the_stage_before_its_checkpoint(tmp_path, record, what):
    from types import SimpleNamespace

    import torch

    from pipeline.checkpoint import CheckpointManager
    from pipeline.errors import UserError
    from pipeline.graph import StageContext

    cfg = SimpleNamespace(root=SimpleNamespace(run=SimpleNamespace(keep_checkpoints=3)))
    ctx = StageContext("distill", cfg, None, tmp_path, {}, SimpleNamespace(is_main=True, rank=0, world=1), "cpu", False)
    ctx.metric({"step": 3, "loss": 2.5, "val_loss": float("nan")})  # a finite step, and a validation NaN: no stop
    m = torch.nn.Linear(2, 2)
    good = CheckpointManager(tmp_path / "checkpoints").save(4, {"m": m}, {})
    with pytest.raises(UserError) as e:
        ctx.metric(record)
    assert str(e.value).startswith(f"distill: {what} at step 7: training diverged; the last good checkpoint, {good}, is kept")
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 7  # logged, for a look
