"""Faults on the real graph (configs/tiny.yaml, deterministic CPU settings), through the real CLI.

- SIGKILL anywhere (GROUNDGAN_FAULT=<point>:<n>, pipeline/faults.py), then the same command again: the run
  ends with the same bytes as one that was never interrupted (shards, checkpoints, final weights, report).
- A corrupt or truncated distill checkpoint: resume falls back to the previous one, naming the bad one.
- A full disk or a read-only checkpoints folder: exit 2, one message, the previous checkpoint intact.
- Bad configs: one message, exit 2, no traceback.
- Untrusted files: pickles in shards or teacher checkpoints never run, no shell, shard keys cannot leave
  the run directory, pipe: URLs only when allowed.

The kill matrix is marked slow; a three-case subset is not. A stage is killed on a run directory that already
holds the baseline's finished upstream stages (copied), so each case pays only for its stage and those after.
"""

import ast
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from conftest import ROOT, cli

TINY = ROOT / "configs" / "tiny.yaml"
STAGES = ["ingest", "pseudo_label", "distill", "adversarial", "evaluate"]
POINTS = {"shard", "shard_done", "step", "checkpoint", "atomic_write", "manifest"}
_TIMING = {"wall_s", "finished_at"}

# (stage killed, GROUNDGAN_FAULT, where that lands in tiny.yaml). Counts start in the killed stage, since its
# upstream stages are copied in done. atomic_write 1 and 2 are the run's config.yaml and the stage's
# started.json, so a stage's own atomic writes start at 3.
KILLS = [
    ("ingest", "shard:13", "inside the 2nd shard's tar (5th of its 8 samples)"),
    ("ingest", "shard_done:3", "between shards, 3 of 7 done"),
    ("ingest", "atomic_write:5", "the 2nd shard's done-marker: temporary written, not renamed"),
    ("ingest", "atomic_write:12", "ingest's manifest.json: temporary written, not renamed"),
    ("pseudo_label", "shard:20", "inside the 3rd shard's tar"),
    ("pseudo_label", "shard_done:5", "between shards, 5 of 7 done"),
    ("pseudo_label", "atomic_write:11", "the merged rejects.jsonl: temporary written, not renamed"),
    ("pseudo_label", "manifest:1", "every shard done, manifest not written"),
    ("distill", "step:1", "after the first optimiser step, no checkpoint yet"),
    ("distill", "step:6", "between checkpoints 4 and 8"),
    ("distill", "atomic_write:4", "best/ at step 8 half written, before checkpoint 8"),
    ("distill", "checkpoint:2", "inside checkpoint 8: weights written, optimizer and state not"),
    ("distill", "checkpoint:3", "inside the last checkpoint (12)"),
    ("distill", "atomic_write:6", "final/README.md: the last write before the manifest"),
    ("distill", "manifest:1", "final/ written, manifest not"),
    ("adversarial", "step:1", "after the first student step (discriminator warm-up done)"),
    ("adversarial", "checkpoint:6", "inside checkpoint 4: 2 of 4 models written"),
    ("adversarial", "checkpoint:12", "inside the last checkpoint"),
    ("adversarial", "atomic_write:5", "final/discriminators: the 2nd discriminator's spec"),
    ("adversarial", "manifest:1", "final/ written, manifest not"),
    ("evaluate", "atomic_write:10", "in the middle of the generation caches"),
    ("evaluate", "atomic_write:16", "report.json: temporary written, not renamed"),
    ("evaluate", "manifest:1", "report written, manifest not"),
]
FAST = {("pseudo_label", "shard:20"), ("distill", "checkpoint:2"), ("evaluate", "atomic_write:16")}
# One run from scratch killed again and again on the same directory, each resume killed somewhere later.
CHAIN = ["shard:60", "step:5", "step:3", "checkpoint:5", "atomic_write:12"]

TRIED: list[str] = []  # kill points exercised in this session, printed at the end of the module


def _pickled(path: Path) -> bytes:
    """A checkpoint's .pt file (optimizer state, step, RNG states, data position) as a canonical string. Its
    bytes depend on object identity, not only on values: a dict key that was an interned literal before the
    kill is a fresh string after the resume, and pickle memoizes the one and not the other."""
    import torch

    def canon(x):
        if isinstance(x, torch.Tensor):
            raw = x.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            return ["tensor", str(x.dtype), list(x.shape), hashlib.sha256(raw).hexdigest()]
        if isinstance(x, dict):
            return {repr(k): canon(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [canon(v) for v in x]
        return repr(x)

    return json.dumps(canon(torch.load(path, map_location="cpu", weights_only=True)), sort_keys=True).encode()


def _manifest(path: Path) -> bytes:
    m = {k: v for k, v in json.loads(path.read_text()).items() if k not in _TIMING}
    return json.dumps(m, sort_keys=True).encode()


def products(run: Path) -> dict[str, bytes]:
    """Every file a run leaves, for comparison with another run of the same command: bytes, except that
    manifests lose their timing fields, checkpoint .pt files are compared by value and checkpoint.json
    without their sha256; tensorboard event files (wall-clock stamped) and run.log (the console, attempt by
    attempt) are left out. Temporary files left by a kill and a lock left behind show up as extra files."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        if not p.is_file() or "/tensorboard/" in rel or rel == "run.log":
            continue
        if p.name == "manifest.json":
            out[rel] = _manifest(p)
        elif p.name == "metrics.jsonl":
            out[rel] = p.read_bytes()
        elif "/checkpoints/" in rel and p.suffix == ".pt":
            out[rel] = _pickled(p)
        elif "/checkpoints/" in rel and p.name == "checkpoint.json":
            idx = json.loads(p.read_text())
            idx["files"] = {k: v for k, v in idx["files"].items() if not k.endswith(".pt")}
            out[rel] = json.dumps(idx, sort_keys=True).encode()
        else:
            out[rel] = p.read_bytes()
    return out


def assert_same_files(a: Path, b: Path, rels: list[str]) -> None:
    for rel in rels:
        if rel.endswith(".pt"):
            same = _pickled(b / rel) == _pickled(a / rel)
        elif rel.endswith("metrics.jsonl"):
            same = (b / rel).read_bytes() == (a / rel).read_bytes()
        else:
            same = (b / rel).read_bytes() == (a / rel).read_bytes()
        assert same, f"{rel} differs"


_BASELINE_PRODUCTS: dict[Path, dict[str, bytes]] = {}


def assert_same_run(a: Path, b: Path) -> None:
    """`a` is the baseline (read once per session), `b` the run that was killed and resumed."""
    if a not in _BASELINE_PRODUCTS:
        _BASELINE_PRODUCTS[a] = products(a)
    pa, pb = _BASELINE_PRODUCTS[a], products(b)
    assert sorted(pb.keys() - pa.keys()) == [], "files that only the interrupted run has"
    assert sorted(pa.keys() - pb.keys()) == [], "files that the interrupted run lacks"
    differ = [k for k in pa if pa[k] != pb[k]]
    assert differ == [], f"differ after kill and resume: {differ}"
    # The products the issue names, spelled out so that a change to products() cannot drop them.
    for must in ["adversarial/final/lm/model.safetensors", "distill/final/lm/model.safetensors",
                 "adversarial/final/discriminators/audio.safetensors", "evaluate/report.json"]:
        assert must in pa, must
    assert any(k.startswith("pseudo_label/shards/audio/") and k.endswith(".tar") for k in pa)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted run. Named `run` like every case's directory: report.md carries the run's name."""
    run = tmp_path_factory.mktemp("baseline") / "run"
    t0 = time.time()
    cli("run", TINY, "--run-dir", run, check=True)
    print(f"\nbaseline run of configs/tiny.yaml: {time.time() - t0:.1f}s")
    yield run
    if TRIED:
        print(f"\nkill points tried in this session: {len(TRIED)} ({', '.join(TRIED)})")


def seeded(base: Path, where: Path, upto: str) -> Path:
    """A run directory holding the baseline's finished stages before `upto` (what --reuse would copy)."""
    run = where / "run"
    run.mkdir(parents=True)
    for up in STAGES[: STAGES.index(upto)]:
        shutil.copytree(base / up, run / up)
    return run


def kill_and_resume(base: Path, tmp_path: Path, stage: str, fault: str) -> None:
    run = seeded(base, tmp_path, stage)
    r = cli("run", TINY, "--run-dir", run, env={"GROUNDGAN_FAULT": fault})
    assert r.returncode == -9, f"{fault} was never reached in {stage} (exit {r.returncode})\n{r.stdout}\n{r.stderr[-3000:]}"
    for up in STAGES[: STAGES.index(stage)]:
        assert f"{up}: done, config and inputs unchanged; skipped" in r.stdout, r.stdout
    assert f"{stage}: running (not run yet)" in r.stdout and f"{stage}: finished" not in r.stdout, r.stdout
    assert not (run / stage / "manifest.json").exists()
    r = cli("run", TINY, "--run-dir", run)  # the same command again
    assert r.returncode == 0, r.stdout + r.stderr
    assert "taking over a stale lock" in r.stderr
    assert f"{stage}: running (resuming partial work)" in r.stdout, r.stdout
    assert_same_run(base, run)
    TRIED.append(f"{stage}@{fault}")
    shutil.rmtree(run)  # a tiny run is still ~300 MB


def test_kill_matrix_kills_every_stage_at_every_kind_of_point():
    assert {s for s, _, _ in KILLS} == set(STAGES)
    assert {f.split(":")[0] for _, f, _ in KILLS} == POINTS
    for stage in STAGES:  # each stage is killed in the middle of its work and again just before its manifest
        assert len([1 for s, _, _ in KILLS if s == stage]) >= 3, stage
    assert len(KILLS) + len(CHAIN) == 28
    print(f"\nkill matrix: {len(KILLS)} single kills + a chain of {len(CHAIN)} = {len(KILLS) + len(CHAIN)} kill points")


@pytest.mark.parametrize("stage,fault", [pytest.param(s, f, id=f"{s}-{f}", marks=() if (s, f) in FAST else pytest.mark.slow)
                                         for s, f, _ in KILLS])
def test_kill_anywhere_then_resume_gives_the_same_run(baseline, tmp_path, stage, fault):
    kill_and_resume(baseline, tmp_path, stage, fault)


@pytest.mark.slow
def test_killed_again_and_again_from_scratch_gives_the_same_run(baseline, tmp_path):
    run = tmp_path / "run"
    seen = []
    for fault in CHAIN:
        r = cli("run", TINY, "--run-dir", run, env={"GROUNDGAN_FAULT": fault})
        assert r.returncode == -9, f"{fault} never reached\n{r.stdout}\n{r.stderr[-2000:]}"
        seen.append(r.stdout.strip().splitlines()[-1])  # the stage that was running
        TRIED.append(f"chain@{fault}")
    r = cli("run", TINY, "--run-dir", run, check=True)
    assert "resuming partial work" in r.stdout, (seen, r.stdout)
    # The kills landed in different stages, from pseudo_label to evaluate.
    assert seen[0].startswith("pseudo_label: running") and seen[-1].startswith(("adversarial", "evaluate")), seen
    assert_same_run(baseline, run)


@pytest.mark.slow
def test_resume_without_a_checkpoint_writes_start_event_once(baseline, tmp_path):
    run = seeded(baseline, tmp_path, "distill")
    assert cli("run", TINY, "--run-dir", run, "--until", "distill", env={"GROUNDGAN_FAULT": "step:1"}).returncode == -9
    cli("run", TINY, "--run-dir", run, "--until", "distill", check=True)
    text = (run / "distill/metrics.jsonl").read_text()
    assert text.count('"event": "start"') == 1
    assert text == (baseline / "distill/metrics.jsonl").read_text()


@pytest.mark.slow
def test_evaluate_counts_survive_a_resume(baseline, tmp_path):
    run = seeded(baseline, tmp_path, "evaluate")
    assert cli("run", TINY, "--run-dir", run, env={"GROUNDGAN_FAULT": "manifest:1"}).returncode == -9
    cli("run", TINY, "--run-dir", run, check=True)
    counts = json.loads((run / "evaluate/manifest.json").read_text())["counts"]
    assert counts == json.loads((baseline / "evaluate/manifest.json").read_text())["counts"]


# ------------------------------------------------------------------------------ corrupt distill checkpoint
def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        f = path / "model.student.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif how == "flip":
        f = path / "optim.student.pt"
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))
    elif how == "no_index":
        (path / "checkpoint.json").unlink()
    elif how == "empty_state":
        (path / "state.pt").write_bytes(b"")


@pytest.mark.parametrize("how,which", [
    ("truncate", "newest"),
    pytest.param("flip", "newest", marks=pytest.mark.slow),
    pytest.param("no_index", "newest", marks=pytest.mark.slow),
    pytest.param("empty_state", "all", marks=pytest.mark.slow),
])
def test_corrupt_distill_checkpoint_falls_back_to_the_previous_one(baseline, tmp_path, how, which):
    run = seeded(baseline, tmp_path, "distill")
    r = cli("run", TINY, "--run-dir", run, "--until", "distill", env={"GROUNDGAN_FAULT": "step:10"})
    assert r.returncode == -9
    ckpts = sorted((run / "distill/checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-000004", "step-000008"]
    bad = ckpts if which == "all" else ckpts[-1:]
    for p in bad:
        _damage(p, how)
    r = cli("run", TINY, "--run-dir", run, "--until", "distill")
    assert r.returncode == 0, r.stdout + r.stderr
    for p in bad:
        assert f"checkpoint {p} is corrupt" in r.stdout and "falling back to the previous one" in r.stdout, r.stdout
    if which != "all":
        assert "step-000004 is corrupt" not in r.stdout
    # The fallback resumed from step 4 (or from scratch) and ended where the uninterrupted run did.
    assert_same_files(baseline, run, ["distill/final/lm/model.safetensors", "distill/final/projectors.safetensors",
                                      "distill/checkpoints/step-000008/model.student.safetensors",
                                      "distill/checkpoints/step-000012/optim.student.pt",
                                      "distill/checkpoints/step-000012/state.pt", "distill/metrics.jsonl"])


# ------------------------------------------------------------------------------ disk full, read-only
def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _mount(args: list[str]) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here (needs root): {r.stderr.strip()}")


def _assert_clean_stop(r, run: Path, why: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert why in r.stderr and "could not write checkpoint" in r.stderr and "step-000008" in r.stderr, r.stderr
    assert f"the previous checkpoint {run}/distill/checkpoints/step-000004 is intact" in r.stderr, r.stderr
    from pipeline.checkpoint import CheckpointManager

    ck = CheckpointManager(run / "distill/checkpoints")
    assert [p.name for p in ck.step_dirs()] == ["step-000004"]
    assert ck.verify(ck.step_dirs()[0]) is None
    assert not list((run / "distill/checkpoints").glob(".tmp-*"))
    assert not (run / ".lock").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(baseline, tmp_path):
    """A tmpfs just big enough for the upstream stages, best/ twice, checkpoint 4 and half of checkpoint 8."""
    upstream = sum(_du(baseline / s) for s in ("ingest", "pseudo_label"))
    best, ckpt = _du(baseline / "distill/best"), _du(baseline / "distill/checkpoints/step-000004")
    size = upstream + 2 * best + ckpt + ckpt // 2 + (1 << 20)
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    _mount(["-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs", str(mnt)])
    try:
        run = seeded(baseline, mnt, "distill")
        r = cli("run", TINY, "--run-dir", run, subprocess_=True)  # its own process: nothing of it holds the mount
        _assert_clean_stop(r, run, "No space left on device")
        shutil.copytree(run, tmp_path / "bigger" / "run")  # more space: the same command resumes
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    run = tmp_path / "bigger" / "run"
    r = cli("run", TINY, "--run-dir", run, "--until", "distill", check=True)
    assert "distill: running (resuming partial work)" in r.stdout
    assert_same_files(baseline, run, ["distill/final/lm/model.safetensors", "distill/checkpoints/step-000012/state.pt"])


def test_read_only_checkpoints_folder_stops_cleanly(baseline, tmp_path):
    run = seeded(baseline, tmp_path, "distill")
    r = cli("run", TINY, "--run-dir", run, "--until", "distill", env={"GROUNDGAN_FAULT": "step:6"})
    assert r.returncode == -9
    ck = run / "distill/checkpoints"
    _mount(["--bind", str(ck), str(ck)])
    try:
        _mount(["-o", "remount,bind,ro", str(ck)])
        r = cli("run", TINY, "--run-dir", run, "--until", "distill")
        _assert_clean_stop(r, run, "Read-only file system")
    finally:
        subprocess.run(["umount", str(ck)], check=True)


ENOSPC_PLUGIN = '''
"""Test plugin: the second checkpoint file written through safetensors fails the way a full disk makes it fail."""
import pipeline.checkpoint as checkpoint
from safetensors import SafetensorError

_real, _calls = checkpoint.save_model, [0]


def save_model(model, filename, *a, **k):
    _calls[0] += 1
    if _calls[0] == 2:
        open(filename, "wb").write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return _real(model, filename, *a, **k)


checkpoint.save_model = save_model
'''


def test_disk_full_injected_through_a_plugin(baseline, tmp_path):
    """The same contract without root: a plugin makes safetensors fail as it does on a full disk."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "enospc_plugin.py").write_text(ENOSPC_PLUGIN)
    run = seeded(baseline, tmp_path, "distill")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), str(ROOT / "tests"), str(ROOT)])}
    r = cli("run", TINY, "--run-dir", run, "--until", "distill", "plugins=[enospc_plugin]", env=env)
    _assert_clean_stop(r, run, "No space left on device")


# ------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("override,needle", [
    ("modalities.audio.teacher.checkpoint=/no/such/whisper.pt", "'modalities.audio.teacher.checkpoint': file or folder not found: /no/such/whisper.pt"),
    ("modalities.image.teacher.checkpoint=/no/such/model.pth", "'modalities.image.teacher.checkpoint': file not found: /no/such/model.pth"),
    ("ingest.samples_per_shard=0", "'ingest.samples_per_shard' must be >= 1"),
    ("modalities.audio.teacher.max_seconds=-1", "'modalities.audio.teacher.max_seconds' must be >= 0.1"),
    ("ingest.split.train=abc", "wrong type at 'ingest.split.train'"),
    ("ingest.split={train: 0.5, val: 0.1, test: 0.1}", "'ingest.split' fractions must add up to 1"),
    ("modalities.smell={}", "unknown modality 'smell'; registered: audio, image, text"),
    ("stages=[ingest, nosuch]", "unknown stage 'nosuch'"),
    ("ingest.sources=[{type: shards, modality: audio}]", "is a shards source without 'urls'"),
    ("ingest.sources=[{dir: /no/such/audio, modality: audio}]", "data folder not found: /no/such/audio"),
    ("adversarial.disc_backbone=teacher", "'adversarial.disc_backbone: teacher' needs a cross_attention student"),
    ("adversarial.disc_backbone=linear", "'adversarial.disc_backbone' must be student or teacher, got 'linear'"),
    ("run.device=tpu", "'run.device' must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("distill.student.projector=linear", "'distill.student.projector' must be mlp or transformer, got 'linear'"),
    ("run.loggers=[wandb]", "unknown scalar logger 'wandb'"),
])
def test_bad_config_is_one_message_and_exit_2(override, needle):
    r = cli("config", TINY, override)
    assert r.returncode == 2, r.stdout
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("checkpoint,needle", [
    ("offline:huge.en", "the only offline model is offline:tiny.en"),
    ("nosuchmodel", "is not a file, a folder or a whisper model name"),
])
def test_teacher_checkpoint_that_does_not_exist_stops_before_labelling(tmp_path, checkpoint, needle):
    r = cli("run", TINY, "--run-dir", tmp_path / "r", "--until", "pseudo_label",
            f"modalities.audio.teacher.checkpoint={checkpoint}")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r/pseudo_label/manifest.json").exists()


def test_bad_yaml_files_are_one_message(tmp_path):
    (tmp_path / "broken.yaml").write_text("seed: [1,\n  ingest: {")
    (tmp_path / "list.yaml").write_text("- just\n- a list\n")
    for f in ("broken.yaml", "list.yaml"):
        r = cli("config", tmp_path / f)
        assert r.returncode == 2 and "Traceback" not in r.stderr and f in r.stderr, r.stderr


# ------------------------------------------------------------------------------ untrusted files
class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _wav(seconds=0.3) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(np.arange(int(16000 * seconds)) / 5)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


def _shards_cfg(tmp_path: Path, urls: str, **src) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["ingest"]["sources"] = [{"type": "shards", "urls": urls, "modality": "audio", "name": "ext", **src}]
    cfg["ingest"]["max_reject_fraction"] = 0.9
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_pickles_in_a_shard_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    _tar(tmp_path / "evil.tar", [("a.pickle", payload), ("a.json", b'{"text": "a"}'),
                                 ("b.wav", _wav()), ("b.pyd", payload), ("b.pth", payload), ("b.json", b'{"text": "b"}'),
                                 ("c.pkl", payload), ("c.npy", payload)])
    cfg = _shards_cfg(tmp_path, str(tmp_path / "evil.tar"))
    r = cli("run", cfg, "--run-dir", tmp_path / "run", "--until", "pseudo_label")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not marker.exists()
    rejects = {j["key"].rsplit(":", 1)[-1]: j["reason"] for j in map(json.loads, (tmp_path / "run/ingest/rejects.jsonl").read_text().splitlines())}
    assert rejects.keys() == {"a", "c"} and all(v.startswith("no media member") for v in rejects.values()), rejects
    names = [m for shard in (tmp_path / "run").rglob("*.tar") for m in tarfile.open(shard).getnames()]
    assert "ext-b.wav" in names and not [n for n in names if n.rsplit(".", 1)[-1] in ("pickle", "pyd", "pth", "pkl")]


def test_shard_keys_cannot_leave_the_run_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _tar(tmp_path / "keys.tar", [("../../outside/escape.wav", _wav()), ("/abs/x.wav", _wav()),
                                 ("dir/../../up.wav", _wav()), ("ok.wav", _wav()), ("ok.json", b'{"text": "fine"}')])
    cfg = _shards_cfg(tmp_path, str(tmp_path / "keys.tar"))
    r = cli("run", cfg, "--run-dir", tmp_path / "run", "--until", "pseudo_label")
    assert r.returncode == 0, r.stdout + r.stderr
    reasons = [j["reason"] for j in map(json.loads, (tmp_path / "run/ingest/rejects.jsonl").read_text().splitlines())]
    assert sorted(reasons) == sorted(["unsafe sample key '../../outside/escape'", "unsafe sample key '/abs/x'",
                                      "unsafe sample key 'dir/../../up'"]), reasons
    assert list(outside.iterdir()) == []
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(w.startswith("run/") or w in ("cfg.yaml", "keys.tar") for w in written), written
    m = json.loads((tmp_path / "run/pseudo_label/manifest.json").read_text())
    assert m["counts"]["out"] == 1


def test_pipe_urls_run_only_with_allow_pipe(tmp_path):
    marker = tmp_path / "ran"
    _tar(tmp_path / "ok.tar", [("s.wav", _wav()), ("s.json", b'{"text": "s"}')])
    url = f"pipe:touch {marker}; cat {tmp_path / 'ok.tar'}"
    r = cli("run", _shards_cfg(tmp_path, url), "--run-dir", tmp_path / "no", "--until", "ingest")
    assert r.returncode == 2 and "allow_pipe" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()
    r = cli("run", _shards_cfg(tmp_path, url, allow_pipe=True), "--run-dir", tmp_path / "yes", "--until", "ingest")
    assert r.returncode == 0, r.stderr
    assert marker.exists() and json.loads((tmp_path / "yes/ingest/manifest.json").read_text())["counts"]["out"] == 1


def test_planted_pickle_as_teacher_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "teacher.pt").write_bytes(pickle.dumps({"dims": {}, "model_state_dict": _Evil(marker)}))
    import torch

    torch.save({"dims": {}, "model_state_dict": _Evil(marker)}, tmp_path / "teacher2.pt")
    for name in ("teacher.pt", "teacher2.pt"):
        r = cli("run", TINY, "--run-dir", tmp_path / f"run-{name}", "--until", "pseudo_label",
                f"modalities.audio.teacher.checkpoint={tmp_path / name}")
        assert r.returncode == 2 and "not a readable openai-whisper checkpoint" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not marker.exists()


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            # `owner` is the module for module.function(...), "" for a bare call, "?" for any other receiver
            owner = ("" if isinstance(f, ast.Name) else
                     f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else "?")
            kw = {k.arg: k.value for k in node.keywords}
            yield node, owner, name, kw


def _is_true(v) -> bool:
    return isinstance(v, ast.Constant) and v.value is True


def test_no_shell_no_pickle_no_eval_in_the_source():
    """Over every module of the project: no shell=True, os.system/popen, eval/exec, pickle or yaml.load, and
    every torch.load / np.load states weights_only=True / leaves allow_pickle off."""
    bad = []
    files = [p for d in ("pipeline", "stages", "modalities", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node, owner, name, kw in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if _is_true(kw.get("shell")):
                bad.append(f"{where} shell=True")
            if (owner, name) in {("os", "system"), ("os", "popen"), ("pickle", "load"), ("pickle", "loads"),
                                 ("yaml", "load"), ("yaml", "unsafe_load")} or (owner == "" and name in ("eval", "exec")):
                bad.append(f"{where} {owner + '.' if owner else ''}{name}")
            if owner == "torch" and name == "load" and not _is_true(kw.get("weights_only")):
                bad.append(f"{where} torch.load without weights_only=True")
            if owner == "np" and name == "load" and _is_true(kw.get("allow_pickle")):
                bad.append(f"{where} np.load(allow_pickle=True)")
    assert bad == []
