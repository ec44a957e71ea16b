"""Checkpoints: exact round trip, corruption detected with fallback, disk full leaves the previous one
intact, planted pickles never run."""

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, cli
from pipeline.checkpoint import CheckpointManager
from pipeline.errors import UserError


def _objs(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    return m, opt


def test_round_trip_restores_weights_optimizer_and_rngs(tmp_path):
    m, opt = _objs()
    ck = CheckpointManager(tmp_path / "ck", keep=2)
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    ck.save(7, {"student": m}, {"student": opt}, data_state={"epoch": 1, "pos": 5})
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    m2, opt2 = _objs(seed=99)
    loaded = ck.load_latest({"student": m2}, {"student": opt2})
    assert loaded.step == 7 and loaded.state["data"] == {"epoch": 1, "pos": 5}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])


def test_keeps_newest_k(tmp_path):
    m, opt = _objs()
    ck = CheckpointManager(tmp_path / "ck", keep=2)
    for s in (1, 2, 3):
        ck.save(s, {"m": m}, {"m": opt})
    assert [p.name for p in ck.step_dirs()] == ["step-000002", "step-000003"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_index"])
def test_corrupt_checkpoint_falls_back_with_warning(tmp_path, capsys, damage):
    m, opt = _objs()
    ck = CheckpointManager(tmp_path / "ck", keep=3)
    ck.save(1, {"m": m}, {"m": opt})
    with torch.no_grad():
        m[0].weight.add_(1.0)
    ck.save(2, {"m": m}, {"m": opt})
    f = tmp_path / "ck/step-000002/model.m.safetensors"
    if damage == "flip":
        b = bytearray(f.read_bytes()); b[-5] ^= 0xFF; f.write_bytes(bytes(b))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    else:
        (tmp_path / "ck/step-000002/checkpoint.json").unlink()
    m2, opt2 = _objs(seed=5)
    loaded = ck.load_latest({"m": m2}, {"m": opt2})
    assert loaded.step == 1
    assert "step-000002 is corrupt" in capsys.readouterr().out
    assert not torch.equal(m2[0].weight, m[0].weight)  # step 1's weights, not step 2's


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m, opt = _objs()
    ck = CheckpointManager(tmp_path / "ck", keep=3)
    ck.save(1, {"m": m}, {"m": opt})

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipeline.checkpoint.save_model", full)
    with pytest.raises(UserError, match="No space left on device.*step-000001 is intact"):
        ck.save(2, {"m": m}, {"m": opt})
    assert [p.name for p in ck.step_dirs()] == ["step-000001"]
    assert not list((tmp_path / "ck").glob(".tmp-*"))
    assert ck.verify(ck.step_dirs()[0]) is None


def test_planted_pickle_never_runs(tmp_path):
    m, opt = _objs()
    ck = CheckpointManager(tmp_path / "ck", keep=3)
    ck.save(1, {"m": m}, {"m": opt})
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "ck/step-000001"
    with open(d / "state.pt", "wb") as f:
        pickle.dump({"step": 1, "x": Evil()}, f)
    # Make the planted file pass the sha256 check, as an attacker who rewrote checkpoint.json would.
    from pipeline.files import sha256_file
    idx = json.loads((d / "checkpoint.json").read_text())
    idx["files"]["state.pt"] = sha256_file(d / "state.pt")
    (d / "checkpoint.json").write_text(json.dumps(idx))
    with pytest.raises(UserError, match="refusing to load checkpoint"):
        ck.load_latest({"m": m}, {"m": opt})
    assert not marker.exists()


def test_resume_after_kill_skips_corrupt_newest_checkpoint(tmp_path):
    cfg = ROOT / "tests/runner.yaml"
    cli("run", cfg, "--run-dir", tmp_path / "whole", check=True)
    r = cli("run", cfg, "--run-dir", tmp_path / "cut", env={"GROUNDGAN_FAULT": "step:5"})
    assert r.returncode == -9
    newest = sorted((tmp_path / "cut/train/checkpoints").glob("step-*"))[-1]
    assert newest.name == "step-000004"
    f = newest / "model.model.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    r = cli("run", cfg, "--run-dir", tmp_path / "cut", check=True)
    assert "step-000004 is corrupt" in r.stdout
    a = (tmp_path / "whole/train/final/model.model.safetensors").read_bytes()
    assert (tmp_path / "cut/train/final/model.model.safetensors").read_bytes() == a
