"""Deterministic fault injection for tests: GROUNDGAN_FAULT=<point>:<n> kills the process with SIGKILL
the n-th time it passes `faults.point(<point>)`. Several points may be given, comma-separated.

Points used by the pipeline: shard (inside a shard, between samples), shard_done (after a shard is
complete, before the next), step (after an optimiser step), checkpoint (inside a checkpoint write, after
some files are written), atomic_write (after the temporary file is written, before os.replace),
manifest (before a stage manifest is written), keep / restore (between the renames that move a stage's work
into RUN/<stage>/.previous/ and back). Unset, a call costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}
_targets: dict[str, int] | None = None


def _parse() -> dict[str, int]:
    spec = os.environ.get("GROUNDGAN_FAULT", "")
    targets = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, n = part.partition(":")
        targets[name] = int(n or 1)
    return targets


def point(name: str) -> None:
    global _targets
    if _targets is None:
        _targets = _parse()
    if not _targets or name not in _targets:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _targets[name]:
        os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Re-read GROUNDGAN_FAULT (tests that set it in-process)."""
    global _targets
    _targets = None
    _counts.clear()
