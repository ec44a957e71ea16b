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


def _reindex(path: Path) -> None:
    """Rewrite a checkpoint's index so that every sha256 matches what is on disk now (a damaged file that
    verifies by its hash)."""
    from pipeline.files import sha256_file

    idx = json.loads((path / "checkpoint.json").read_text())
    idx["files"] = {name: sha256_file(path / name) for name in idx["files"]}
    (path / "checkpoint.json").write_text(json.dumps(idx))


@pytest.mark.parametrize("damage", ["safetensors_header", "state_pt"])
def test_a_checkpoint_whose_hashes_match_but_that_does_not_load_falls_back(tmp_path, damage, capsys):
    m, opt = _objs()
    ck = CheckpointManager(tmp_path / "ck", keep=3)
    ck.save(4, {"student": m}, {"student": opt})
    expect = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    newest = ck.save(8, {"student": m}, {"student": opt})
    if damage == "safetensors_header":
        f = newest / "model.student.safetensors"
        raw = f.read_bytes()
        f.write_bytes(raw[:8] + b"{not json" + raw[17:])
    else:
        (newest / "state.pt").write_bytes(b"PK\x03\x04 not a zip")
    _reindex(newest)
    m2, opt2 = _objs(seed=5)
    loaded = ck.load_latest({"student": m2}, {"student": opt2})
    assert loaded.step == 4
    assert f"checkpoint {newest} is corrupt" in capsys.readouterr().out
    for k, v in m2.state_dict().items():
        assert torch.equal(v, expect[k])


def test_no_loadable_checkpoint_after_a_partial_load_is_a_user_error(tmp_path):
    m, opt = _objs()
    ck = CheckpointManager(tmp_path / "ck")
    only = ck.save(4, {"student": m}, {"student": opt})
    (only / "state.pt").write_bytes(b"PK\x03\x04 not a zip")
    _reindex(only)
    with pytest.raises(UserError, match="could not be loaded and no earlier checkpoint loads"):
        ck.load_latest({"student": _objs(seed=5)[0]}, {"student": _objs(seed=5)[1]})


def test_a_failed_write_of_the_student_is_one_line_and_keeps_the_previous_one(tmp_path):
    """best/ and final/ go through save_student: a full disk there stops the stage with a UserError (exit 2,
    one line), the previous best/ as it was and no temporary folder left."""
    from types import SimpleNamespace

    from safetensors import SafetensorError

    from stages.models.student import save_student

    def full_disk(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    best = tmp_path / "best"
    best.mkdir()
    (best / "student.json").write_text("previous")
    student = SimpleNamespace(lm=SimpleNamespace(save_pretrained=full_disk))
    with pytest.raises(UserError) as e:
        save_student(student, best)
    assert str(e.value) == f"could not write the student to {best}: No space left on device; the previous {best} is intact"
    assert (best / "student.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
