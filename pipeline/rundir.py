"""The run directory: its lock, the stage directories and their manifests.

RUN/config.yaml                the resolved config
RUN/.lock                      held while a run is active (pid, host, start time)
RUN/<stage>/started.json       the config hash and input fingerprints the partial work was made with
RUN/<stage>/manifest.json      written last and atomically: the stage is done exactly when it exists and matches
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline import faults
from pipeline.errors import UserError
from pipeline.files import atomic_write_json, sha256_file, sha256_bytes

MANIFEST = "manifest.json"
STARTED = "started.json"
# Written by the run itself, not products of the stage: left out of the manifest's file list.
_NOT_OUTPUTS = {MANIFEST, STARTED}
_NOT_OUTPUT_DIRS = {"checkpoints", "tensorboard"}
# Logs whose content depends on timing: listed in the manifest but left out of the fingerprint.
_LOG_FILES = {"metrics.jsonl", "rejects.jsonl", "stage.log"}


class RunLock:
    """An exclusive lock on a run directory. A lock left by a dead process on this host is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner and owner.get("host") == socket.gethostname() and not _alive(owner.get("pid", -1)):
                    print(f"taking over a stale lock on {self.path.parent} left by dead process {owner.get('pid')}", file=sys.stderr)
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                who = f"process {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
                raise UserError(f"run directory {self.path.parent} is in use by {who} (lock file {self.path}); "
                                "wait for it to finish, or delete the lock if that process is gone")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}")

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped) is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def list_outputs(stage_dir: Path) -> list[dict]:
    """Every product file of a stage, sorted, with size and sha256."""
    out = []
    for p in sorted(stage_dir.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(stage_dir)
        if rel.parts[0] in _NOT_OUTPUT_DIRS or rel.name in _NOT_OUTPUTS or any(part.startswith(".") for part in rel.parts):
            continue
        out.append({"path": rel.as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def fingerprint(manifest: dict) -> str:
    """What downstream stages depend on: the stage, its config hash, its inputs and its product files.
    Timing fields and logs are left out, so an identical re-run or a reused stage has the same fingerprint."""
    core = {
        "stage": manifest["stage"],
        "config_hash": manifest["config_hash"],
        "inputs": manifest.get("inputs", {}),
        "outputs": [(o["path"], o["sha256"]) for o in manifest.get("outputs", []) if Path(o["path"]).name not in _LOG_FILES],
    }
    return sha256_bytes(json.dumps(core, sort_keys=True).encode())


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    v = {"python": platform.python_version()}
    for mod in ("torch", "whisper", "open_clip", "transformers", "numpy"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", None)
        except Exception:
            v[mod] = None
    v["groundgan_commit"] = _git_commit()
    return v


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = RunLock(self.path)

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def manifest_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / MANIFEST

    def read_manifest(self, stage: str) -> dict | None:
        p = self.manifest_path(stage)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def read_started(self, stage: str) -> dict | None:
        p = self.stage_dir(stage) / STARTED
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def write_started(self, stage: str, config_hash: str, inputs: dict, config: dict | None = None) -> None:
        """config: the settings the hash covers (StageSpec.hash_sections), so a later run can name what changed."""
        atomic_write_json(self.stage_dir(stage) / STARTED, {"config_hash": config_hash, "inputs": inputs,
                                                            **({"config": config} if config is not None else {})})

    def write_manifest(self, stage: str, config_hash: str, inputs: dict, counts: dict, wall_s: float, extra: dict | None = None) -> dict:
        d = self.stage_dir(stage)
        manifest = {
            "stage": stage,
            "config_hash": config_hash,
            "inputs": inputs,
            "outputs": list_outputs(d),
            "counts": counts,
            "wall_s": round(wall_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
        }
        if extra:
            manifest.update(extra)
        faults.point("manifest")
        atomic_write_json(self.manifest_path(stage), manifest)
        return manifest
