"""The run directory: its lock, the stage directories and their manifests.

RUN/config.yaml                the resolved config
RUN/.lock                      flock-ed while a run is active (pid, host, start time inside, for messages)
RUN/<stage>/started.json       the config hash and input fingerprints the partial work was made with
RUN/<stage>/manifest.json      written last and atomically: the stage is done exactly when it exists and matches
"""

from __future__ import annotations

import fcntl
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
    """An exclusive lock on a run directory, held by the kernel (fcntl.flock on RUN/.lock): it is released when
    its process exits however it exits, so a kill never leaves a lock to take over by hand, a torn lock file
    jams nothing, and two processes can never both hold it. The file records who holds it, for the message a
    second run prints."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = self._read()
                who = f"process {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
                raise UserError(f"run directory {self.path.parent} is in use by {who} (lock file {self.path}); "
                                "wait for it to finish") from None
            except BaseException:
                os.close(fd)
                raise
            # A holder that released between our open and our flock has unlinked the file: we would hold a lock
            # on a name nobody else opens. Take the file that is there now instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        before = self._read()
        if before is not None or os.fstat(fd).st_size:
            pid = before.get("pid") if before else "unknown (a torn lock file)"
            print(f"taking over a stale lock on {self.path.parent} left by process {pid}, which is gone", file=sys.stderr)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        self.fd = fd

    def _read(self) -> dict | None:
        try:
            rec = json.loads(self.path.read_text())
            return rec if isinstance(rec, dict) else None
        except (OSError, ValueError, RecursionError):
            return None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a process that opened the old file sees it and retries
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


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


def verify_outputs(stage_dir: Path, manifest: dict) -> list[tuple[str, str]]:
    """(path, why) for every product file the manifest lists that is not on disk as it was written: missing,
    a link, another size, another sha256; and for every product file on disk that the manifest does not list.
    Sizes first (cheap), then hashes. [] when the stage's products are exactly its manifest's."""
    bad = []
    listed = set()
    root = stage_dir.resolve()
    for o in manifest.get("outputs", []):
        rel = str(o.get("path", ""))
        listed.add(rel)
        p = stage_dir / rel
        try:
            p.resolve().relative_to(root)
        except ValueError:
            bad.append((rel, "is outside the stage directory"))
            continue
        if p.is_symlink():
            bad.append((rel, "is a link"))
        elif not p.is_file():
            bad.append((rel, "is missing"))
        elif p.stat().st_size != o.get("size"):
            bad.append((rel, f"is {p.stat().st_size} bytes, the manifest says {o.get('size')}"))
    for o in manifest.get("outputs", []):
        rel = str(o.get("path", ""))
        if any(b[0] == rel for b in bad):
            continue
        if sha256_file(stage_dir / rel) != o.get("sha256"):
            bad.append((rel, "does not match its sha256"))
    for o in list_files(stage_dir):
        if o not in listed:
            bad.append((o, "is not in the manifest"))
    return bad


def list_files(stage_dir: Path) -> list[str]:
    """The product files list_outputs would list, without hashing them."""
    out = []
    for p in sorted(stage_dir.rglob("*")):
        rel = p.relative_to(stage_dir)
        if not (p.is_file() or p.is_symlink()) or rel.parts[0] in _NOT_OUTPUT_DIRS or rel.name in _NOT_OUTPUTS \
                or any(part.startswith(".") for part in rel.parts):
            continue
        out.append(rel.as_posix())
    return out


def move_aside(run_dir: Path, stage_dir: Path, rels: list[str] | None = None) -> Path:
    """Move a stage's mismatching files (rels), or its whole directory (None), to RUN/.aside/<stage>-<time>/:
    outputs that do not match their manifest are kept for a look, never deleted."""
    dest = run_dir / ".aside" / f"{stage_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if rels is None:  # all of it but the versions kept under the stage (pipeline/kept.py), which stay where they are
        dest.mkdir()
        for p in stage_dir.iterdir():
            if p.name != ".previous":
                os.replace(p, dest / p.name)
        return dest
    for rel in rels:
        src = stage_dir / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest / rel)
    return dest


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
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run directory {self.path} is a file, not a directory; name another --run-dir")
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
        except (OSError, ValueError, RecursionError):
            return None

    def read_started(self, stage: str) -> dict | None:
        p = self.stage_dir(stage) / STARTED
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError, RecursionError):
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
