"""Plugins as a user meets them: the example package (examples/groundgan-vibration) installed with pip and run
through every stage, its own metric in the report and in `compare`; a plugin that fails to import names itself
in one line and leaves every command that does not need it working."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cli

EXAMPLE = ROOT / "examples" / "groundgan-vibration"


def _env(path) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(path), str(ROOT)])}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example package pip-installed into a folder of its own (its entry point in its .dist-info)."""
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(EXAMPLE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return target


def test_the_example_plugin_runs_through_every_stage_and_its_metric_reaches_the_report(installed, tmp_path):
    r = cli("modalities", env=_env(installed), check=True)
    assert "vibration" in r.stdout
    run = tmp_path / "run"
    r = cli("run", EXAMPLE / "example.yaml", "--run-dir", run, env=_env(installed), check=True)
    assert "evaluate: finished" in r.stdout and f"evaluate: {run / 'evaluate' / 'report.md'}" in r.stdout
    report = json.loads((run / "evaluate" / "report.json").read_text())
    rows = report["test"]["vibration"]
    assert set(rows) == {"teacher", "distill", "adversarial"}
    # the teacher's labels name the state the series was made with: its agreement is 1 where the threshold holds
    assert rows["teacher"]["state_agreement"] == 1.0
    assert all(0.0 <= rows[cp]["state_agreement"] <= 1.0 for cp in rows)
    assert "state_agreement" in (run / "evaluate" / "report.md").read_text()
    r = cli("compare", run, run, env=_env(installed), check=True)
    assert "state_agreement" in r.stdout


def test_a_plugin_that_fails_to_import_names_itself_and_the_rest_works(tmp_path):
    site = tmp_path / "site"
    (site / "broken_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "broken_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (site / "broken_plugin-0.1.dist-info" / "entry_points.txt").write_text("[groundgan.modalities]\nbroken = broken_plugin\n")
    (site / "broken_plugin.py").write_text("raise RuntimeError('boom: a dependency is missing')\n")
    want = "entry point groundgan.modalities:broken = broken_plugin failed to import (RuntimeError: boom"
    for cmd in (["stages"], ["modalities"], ["config", ROOT / "configs" / "tiny.yaml"]):
        r = cli(*cmd, env=_env(site))
        assert r.returncode == 0 and want in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert r.stderr.count("\n") == 1  # said once, in one line
    r = cli("modalities", env=_env(site))
    assert "audio" in r.stdout and "broken" not in r.stdout
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest: {sources: [{type: synthetic, modality: broken, name: b}]}\n")
    r = cli("config", cfg, env=_env(site))
    assert r.returncode == 2 and "modality 'broken' is unavailable: " + want in r.stderr and "Traceback" not in r.stderr


def test_an_unknown_modality_says_how_to_add_one(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest: {sources: [{type: synthetic, modality: lidar, name: b}]}\n")
    r = cli("config", cfg)
    assert r.returncode == 2 and "unknown modality 'lidar'" in r.stderr
    assert "plugins:" in r.stderr and "groundgan.modalities" in r.stderr
