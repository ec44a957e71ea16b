"""Shard-level work for the data stages (ingest, pseudo_label): a stage splits its input into units, each
unit becomes one or more output shards, and a unit is done exactly when its marker exists.

    RUN/<stage>/.parts/units.json        the unit names, in order (for `groundgan status`)
    RUN/<stage>/.parts/<unit>.json       written after the unit's shards: its rejects, logs and counts

Resume skips units whose marker exists and redoes the rest (a half-written shard only ever exists under a
temporary name). Under torchrun, unit i belongs to rank i % world; the merged logs and counts are made by
rank 0 in unit order, so they are the same whatever the number of processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import distributed, faults
from pipeline.errors import UserError
from pipeline.files import atomic_write_json, atomic_write_text
from pipeline.shards import write_shard

PARTS = ".parts"


@dataclass
class Unit:
    name: str  # unique, file-name safe; the marker's name
    payload: Any  # what `process` needs


@dataclass
class UnitResult:
    outputs: dict[str, list[dict]] = field(default_factory=dict)  # shard path (relative to the stage dir) -> samples
    rejects: list[dict] = field(default_factory=list)  # {"key", "reason", ...}
    logs: dict[str, list[dict]] = field(default_factory=dict)  # log name (e.g. "filtered") -> records
    counts: dict[str, int] = field(default_factory=dict)


def units_progress(stage_dir: Path) -> str | None:
    parts = stage_dir / PARTS
    try:
        names = json.loads((parts / "units.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    done = sum((parts / f"{n}.json").exists() for n in names)
    return f"shards {done} of {len(names)}"


def run_units(ctx, units: list[Unit], process: Callable[[Unit], UnitResult], kept_keys: tuple[str, ...] = ("out",),
              max_reject_fraction: float | None = None, pre_rejects: list[dict] | None = None) -> dict[str, int]:
    """Process every unit (skipping done ones), then merge rejects.jsonl, <log>.jsonl and the counts.

    `pre_rejects` are refusals found before the units (bad manifest lines), counted with the rest.
    Every input ends up either rejected or counted under one of `kept_keys` (written, filtered, ...).
    Raises UserError (exit 2) when rejected / (rejected + kept) passes max_reject_fraction.
    """
    parts = ctx.dir / PARTS
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError("unit names must be unique")
    if ctx.dist.is_main:
        atomic_write_text(parts / "units.json", json.dumps(names))
    mine = [u for i, u in enumerate(units) if i % ctx.dist.world == ctx.dist.rank]
    todo = [u for u in mine if not (parts / f"{u.name}.json").exists()]
    if ctx.resumed and len(todo) < len(mine) and ctx.dist.is_main:
        print(f"{ctx.name}: {len(mine) - len(todo)} of {len(mine)} shards already done; continuing")
    for u in ctx.progress_bar(todo, unit="shard"):
        res = process(u)
        for rel, samples in res.outputs.items():
            if samples:
                write_shard(ctx.dir / rel, samples)
        atomic_write_json(parts / f"{u.name}.json", {"outputs": sorted(k for k, v in res.outputs.items() if v),
                                                     "rejects": res.rejects, "logs": res.logs, "counts": res.counts})
        faults.point("shard_done")
    distributed.barrier()

    counts: dict[str, int] = {}
    rejects = list(pre_rejects or [])
    logs: dict[str, list[dict]] = {}
    for n in names:
        rec = json.loads((parts / f"{n}.json").read_text())
        rejects.extend(rec["rejects"])
        for k, v in rec["logs"].items():
            logs.setdefault(k, []).extend(v)
        for k, v in rec["counts"].items():
            counts[k] = counts.get(k, 0) + v
    counts["rejected"] = rejected_count(rejects)
    if ctx.dist.is_main:
        _write_jsonl(ctx.dir / "rejects.jsonl", rejects)
        for k, v in logs.items():
            _write_jsonl(ctx.dir / f"{k}.jsonl", v)
    total = sum(counts.get(k, 0) for k in kept_keys) + counts["rejected"]
    if max_reject_fraction is not None and total and counts["rejected"] / total > max_reject_fraction:
        reasons = {}
        for r in rejects:
            reasons[r["reason"].split(":")[0]] = reasons.get(r["reason"].split(":")[0], 0) + 1
        top = ", ".join(f"{k} ({v})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        raise UserError(f"{ctx.name}: {counts['rejected']} of {total} inputs rejected, more than max_reject_fraction="
                        f"{max_reject_fraction}; most common: {top}; see {ctx.dir / 'rejects.jsonl'}")
    return counts


def rejected_count(rejects: list[dict]) -> int:
    """Inputs lost to these refusals: one each, but a broken shard counts the samples it lost past the break
    (its record's `lost`, where it could be counted; at least one)."""
    n = 0
    for r in rejects:
        lost = r.get("lost", 1)
        n += max(1, lost) if isinstance(lost, int) else 1
    return n


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))
