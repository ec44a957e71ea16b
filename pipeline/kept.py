"""Finished work that a changed config would replace: kept under its stage, never deleted by a run.

    RUN/<stage>/.previous/<hash>/            the stage as it was (manifest, products, checkpoints, logs), named by
                                             the first 12 hex digits of the config hash it was made with
    RUN/<stage>/.previous/.incoming-<hash>/  a move that a kill interrupted: the next run finishes it
    RUN/<stage>/.previous/.restoring         the name of a kept version being moved back (likewise)

A run moves a stage's directory here instead of deleting it; a run whose config and inputs match a kept version
moves that version back instead of re-running the stage; `groundgan discard` is the only thing that deletes
one. Each move is a series of renames inside one file system, so a kill at any point loses nothing: the next
run finishes the move before it looks at the stage.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline import faults

PREVIOUS = ".previous"
_WORTHLESS = {"started.json"}  # a stage directory holding only this has no work in it


def _entries(stage_dir: Path) -> list[Path]:
    """What a keep moves: everything but the kept versions, the manifest first (so that an interrupted move
    never leaves a stage that looks done with its products gone)."""
    return sorted((p for p in stage_dir.iterdir() if p.name != PREVIOUS), key=lambda p: (p.name != "manifest.json", p.name))


def has_work(stage_dir: Path) -> bool:
    return stage_dir.is_dir() and any(p.name not in _WORTHLESS for p in _entries(stage_dir))


def keep(stage_dir: Path, config_hash: str | None) -> Path | None:
    """Move the stage's work into .previous/<hash>[-n]/ and return that folder; None when there was no work."""
    if not has_work(stage_dir):
        return None
    prev = stage_dir / PREVIOUS
    prev.mkdir(exist_ok=True)
    label = (config_hash or "unknown")[:12]
    incoming = prev / f".incoming-{label}"
    incoming.mkdir(exist_ok=True)
    return _finish_keep(stage_dir, incoming)


def _finish_keep(stage_dir: Path, incoming: Path) -> Path:
    for p in _entries(stage_dir):
        os.replace(p, incoming / p.name)
        faults.point("keep")
    label = incoming.name[len(".incoming-"):]
    dest, n = incoming.parent / label, 2
    while dest.exists():
        dest, n = incoming.parent / f"{label}-{n}", n + 1
    os.replace(incoming, dest)
    return dest


def copy_products(stage_dir: Path, config_hash: str, files: list[str]) -> Path:
    """A copy of the stage's product files (and its manifest and logs) in .previous/<hash>/: the stage goes on
    in place (it trains longer) and the finished version stays readable as it was."""
    prev = stage_dir / PREVIOUS
    incoming = prev / f".incoming-{config_hash[:12]}"
    shutil.rmtree(incoming, ignore_errors=True)
    for rel in [*files, "manifest.json", "started.json", "metrics.jsonl"]:
        src = stage_dir / rel
        if src.is_file():
            (incoming / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, incoming / rel)
    incoming.mkdir(parents=True, exist_ok=True)
    label, dest, n = config_hash[:12], prev / config_hash[:12], 2
    while dest.exists():
        dest, n = prev / f"{label}-{n}", n + 1
    os.replace(incoming, dest)
    return dest


def restore(stage_dir: Path, kept_dir: Path) -> None:
    """Move a kept version back into the stage directory (whose own work the caller has kept first)."""
    marker = stage_dir / PREVIOUS / ".restoring"
    marker.write_text(kept_dir.name)
    _finish_restore(stage_dir, kept_dir)


def _finish_restore(stage_dir: Path, kept_dir: Path) -> None:
    # the manifest last: until it is back the stage is not done, and a kill leaves a move to finish, not a mix
    for p in sorted(kept_dir.iterdir(), key=lambda p: (p.name == "manifest.json", p.name)):
        os.replace(p, stage_dir / p.name)
        faults.point("restore")
    kept_dir.rmdir()
    (stage_dir / PREVIOUS / ".restoring").unlink()


def recover(stage_dir: Path) -> None:
    """Finish a keep or a restore that a kill interrupted (the caller holds the run's lock)."""
    prev = stage_dir / PREVIOUS
    if not prev.is_dir():
        return
    marker = prev / ".restoring"
    if marker.is_file():
        kept = prev / marker.read_text().strip()
        if kept.is_dir():
            _finish_restore(stage_dir, kept)
        else:
            marker.unlink()
    for incoming in sorted(prev.glob(".incoming-*")):
        if incoming.is_dir():
            _finish_keep(stage_dir, incoming)


def versions(stage_dir: Path) -> list[tuple[Path, dict | None]]:
    """The kept versions of a stage, oldest first, each with its manifest (None for partial work)."""
    prev = stage_dir / PREVIOUS
    if not prev.is_dir():
        return []
    out = []
    for d in sorted((p for p in prev.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime):
        try:
            m = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError, RecursionError):
            m = None
        out.append((d, m if isinstance(m, dict) else None))
    return out


def started(kept_dir: Path) -> dict | None:
    """The started.json of a kept version (partial work has no manifest)."""
    try:
        rec = json.loads((kept_dir / "started.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
