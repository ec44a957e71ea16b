"""The stage graph and the runner: skip what is done, resume what is partial, re-run what is stale.

A stage is a function of its context (config, input manifests, its own directory) that writes its products
into its directory and returns its counts. The runner owns everything else: the lock, started.json, the
manifest, skip / resume / invalidation decisions and the summary line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline import distributed, kept
from pipeline.checkpoint import CheckpointManager
from pipeline.config import Config
from pipeline.console import console_log
from pipeline.plain import hashed, stable_hash
from pipeline.errors import UserError
from pipeline.files import append_jsonl, atomic_write_text
from pipeline.registry import modality_registry, register_section, stage_registry
from pipeline.rundir import RunDir, fingerprint, move_aside, verify_outputs

log = logging.getLogger("groundgan")


@dataclass
class StageSpec:
    name: str
    run: Callable[["StageContext"], dict]
    after: tuple[str, ...] = ()  # upstream stages whose manifests are this stage's inputs
    optional_after: tuple[str, ...] = ()  # inputs too when they are in the run's graph (evaluate: adversarial)
    uses_modalities: str = "all"  # which part of modalities.<name> the hash covers: all | decode | none
    config_class: Any = None  # the dataclass of its section (the top-level key of its name)
    progress: Callable[[Path, "Config"], str | None] | None = None  # "step k of n" for `groundgan status`
    description: str = ""
    # dotted paths of the config outside its own section that the stage reads (e.g. "decoding",
    # "distill.max_text_tokens"): part of its hash, so changing one re-runs it
    reads: tuple[str, ...] = ()
    product: str | None = None  # the file of its directory a user reads (evaluate: report.md), named when a run ends
    # its step count (e.g. "steps"): raised alone, the stage trains longer from its newest checkpoint
    extends: str | None = None
    # raised when the stage's code changes what it writes for the same config (ingest 2: splits by content), so
    # that runs made before re-run it; part of the hash from 2 on
    version: int = 1

    def hash_sections(self, cfg: Config) -> dict:
        sec = {"seed": cfg.root.seed, self.name: hashed(cfg.section(self.name))}
        if self.version != 1:
            sec["version"] = self.version
        if self.reads:
            sec["reads"] = {path: hashed(_at(cfg.root, path)) for path in self.reads}
        if self.uses_modalities != "none":
            mods = {}
            for name, mcfg in sorted(cfg.root.modalities.items()):
                adapter = modality_registry.get(name)
                mods[name] = adapter.decode_config(mcfg) if self.uses_modalities == "decode" else hashed(mcfg)
            sec["modalities"] = mods
        return sec

    def config_hash(self, cfg: Config) -> str:
        return stable_hash(self.hash_sections(cfg))


def _at(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict) and d:
        out: dict = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    return {key[len("reads."):] if key.startswith("reads.") else key: d}


def diff_keys(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """dotted key -> (old, new) for every setting that differs between two hash_sections dicts."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k, "(unset)"), b.get(k, "(unset)")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def changed_keys(old: dict | None, new: dict, limit: int = 6) -> str:
    """'a.b 1 -> 2, c.d x -> y' between two hash_sections dicts (flattened to dotted keys); '' when `old` is
    unknown (a manifest written before the sections were stored)."""
    if not old:
        return ""
    diffs = [f"{k} {a} -> {b}" for k, (a, b) in diff_keys(old, new).items()]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


def register_stage(name: str, after: tuple[str, ...] = (), uses_modalities: str = "all", config_class: Any = None,
                   progress: Callable | None = None, description: str = "", optional_after: tuple[str, ...] = (),
                   reads: tuple[str, ...] = (), validate: Callable | None = None, order: int = 100,
                   retired: dict[str, str] | None = None, product: str | None = None, extends: str | None = None,
                   version: int = 1):
    """Decorator: register `fn(ctx) -> counts` as a stage of the graph, and its config section (`config_class`,
    checked by `validate(root) -> notes` in `order`; `retired`: keys it no longer takes -> where they went), the
    way built-in and plugin stages alike register. `extends`: the stage's step count, which raised alone makes
    the runner continue the stage from its newest checkpoint (the stage resumes as it would after a kill).
    `version`: raised when the stage's code writes something else for the same config (earlier runs re-run it)."""

    def deco(fn):
        doc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        stage_registry.add(name, StageSpec(name, fn, tuple(after), tuple(optional_after), uses_modalities,
                                           config_class, progress, doc, tuple(reads), product, extends, version))
        if config_class is not None:
            register_section(name, config_class, validate, order, retired)
        return fn

    return deco


@dataclass
class StageContext:
    """What a stage sees. A stage never opens the run directory by hand."""

    name: str
    cfg: Config
    run: RunDir
    dir: Path  # this stage's directory
    inputs: dict[str, dict]  # upstream stage name -> its manifest
    dist: distributed.DistInfo
    device: str
    resumed: bool  # partial work from an earlier attempt with the same config is present
    counts: dict[str, int] = field(default_factory=dict)
    _loggers: list | None = None

    @property
    def section(self) -> Any:
        return self.cfg.section(self.name)

    def input_dir(self, stage: str) -> Path:
        return self.run.stage_dir(stage)

    def checkpoints(self) -> CheckpointManager:
        return CheckpointManager(self.dir / "checkpoints", keep=self.cfg.root.run.keep_checkpoints)

    def reject(self, key: str, reason: str, **info) -> None:
        """Record one refused input in rejects.jsonl and count it; the stage goes on."""
        self.counts["rejected"] = self.counts.get("rejected", 0) + 1
        append_jsonl(self.dir / (f"rejects.rank{self.dist.rank}.jsonl" if self.dist.world > 1 else "rejects.jsonl"),
                     {"key": key, "reason": reason, **info})

    def metric(self, record: dict) -> None:
        """Log one record to metrics.jsonl. A training step's loss (or gradient norm) that is NaN or infinite
        stops the stage here, before the step's checkpoint is written: the newest checkpoint is the last good
        one, and the stage resumes from it once the cause is fixed."""
        bad = _diverged(record)
        if self.dist.is_main:
            append_jsonl(self.dir / "metrics.jsonl", record)
        if bad:
            newest = self.checkpoints().step_dirs()
            kept = f"the last good checkpoint, {newest[-1]}, is kept" if newest else "no checkpoint was written yet"
            raise UserError(f"{self.name}: {bad[0]} is {bad[1]} at step {record.get('step')}: training diverged; "
                            f"{kept}; lower the learning rate or check the inputs, then run again")

    def scalars(self, values: dict, step: int) -> None:
        """Figures of one step to every logger of `run.loggers` (TensorBoard by default), main process only; each
        value a number (None and non-numbers are left out)."""
        if not self.dist.is_main:
            return
        values = {k: float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        if not values:
            return
        if self._loggers is None:
            from pipeline.scalar_log import logger_registry

            self._loggers = [logger_registry.get(n)(self.dir, self.name, step) for n in self.cfg.root.run.loggers]
        for lg in self._loggers:
            lg.log(values, step)

    def close(self) -> None:
        """The stage is over: its loggers flush and close."""
        for lg in self._loggers or []:
            lg.close()
        self._loggers = None

    def progress_bar(self, iterable=None, **kw):
        from tqdm import tqdm

        disable = not (self.cfg.root.run.progress and self.dist.is_main)
        return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=False, file=sys.stderr, desc=self.name, **kw)


def _diverged(record: dict) -> tuple[str, float] | None:
    """(name, value) of the first non-finite loss or gradient norm of a training step's record, else None.
    Validation figures are left alone (a stage may log NaN where a set is empty)."""
    if "step" not in record or "event" in record:
        return None
    for k, v in record.items():
        name = k.split("/")[0]
        watched = name in ("loss", "ce", "kd", "grad_norm") or (name.endswith("loss") and not name.startswith("val"))
        if watched and isinstance(v, float) and not math.isfinite(v):
            return k, v
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class StageState:
    name: str
    state: str  # done | partial | pending | stale
    detail: str = ""  # why, or a done stage's counts as text
    mismatched: tuple = ()  # stale because these product files do not match the manifest
    counts: dict | None = None  # a done stage's counts
    kept: tuple = ()  # its kept versions (pipeline/kept.py): {"path", "bytes", "done", "differs"} each


class Runner:
    def __init__(self, cfg: Config, run_dir: str | os.PathLike, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.specs = [stage_registry.get(n) for n in cfg.root.stages]
        names = [s.name for s in self.specs]
        self.upstream = {s.name: tuple(s.after) + tuple(u for u in s.optional_after if u in names) for s in self.specs}
        for s in self.specs:
            for up in self.upstream[s.name]:
                if up not in names or names.index(up) > names.index(s.name):
                    raise UserError(f"stage {s.name!r} needs {up!r} before it in 'stages' ({', '.join(names)})")
        self.echo = echo

    # ------------------------------------------------------------------------------------------- decisions
    def _inputs(self, spec: StageSpec) -> dict[str, str] | None:
        out = {}
        for up in self.upstream[spec.name]:
            m = self.run.read_manifest(up)
            if m is None:
                return None
            out[up] = fingerprint(m)
        return out

    def check(self, spec: StageSpec) -> StageState:
        """done / stale / partial / pending, with the reason, without running anything."""
        m = self.run.read_manifest(spec.name)
        chash = spec.config_hash(self.cfg)
        inputs = self._inputs(spec)
        if m is not None:
            if m.get("config_hash") != chash:
                what = changed_keys(m.get("config"), spec.hash_sections(self.cfg))
                longer = " (it will train longer from its newest checkpoint)" if self._longer(spec, None, inputs) else ""
                return StageState(spec.name, "stale", "config changed" + (f": {what}" if what else "") + longer)
            if inputs is None:
                return StageState(spec.name, "stale", "an input stage is not done")
            for up, fp in inputs.items():
                if m.get("inputs", {}).get(up) != fp:
                    return StageState(spec.name, "stale", f"input {up} changed")
            bad = verify_outputs(self.run.stage_dir(spec.name), m)
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                return StageState(spec.name, "stale", f"output {bad[0][0]} {bad[0][1]}{more}",
                                  tuple(rel for rel, _ in bad))
            counts = m.get("counts", {})
            return StageState(spec.name, "done", ", ".join(f"{k} {v}" for k, v in counts.items()), counts=counts)
        started = self.run.read_started(spec.name)
        if started is not None:
            if started.get("config_hash") != chash:
                what = changed_keys(started.get("config"), spec.hash_sections(self.cfg))
                return StageState(spec.name, "stale", "partial work with another config" + (f": {what}" if what else ""))
            detail = spec.progress(self.run.stage_dir(spec.name), self.cfg) if spec.progress else None
            return StageState(spec.name, "partial", detail or "started")
        return StageState(spec.name, "pending", "")

    # ---------------------------------------------------------------------------------------------- running
    def run_graph(self, start: str | None = None, until: str | None = None, force: list[str] | None = None,
                  reuse: str | None = None) -> None:
        names = [s.name for s in self.specs]
        for n in [start, until, *(force or [])]:
            if n is not None and n not in names:
                stage_registry.get(n)  # unknown name: lists the registered ones
                raise UserError(f"stage {n!r} is not in this run's graph ({', '.join(names)})")
        lo = names.index(start) if start else 0
        hi = names.index(until) if until else len(names) - 1
        force = set(force or [])

        if self.cfg.root.run.deterministic:
            # cuBLAS needs this set before its first handle for deterministic matmuls (torch raises otherwise)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        info = distributed.init(self.cfg.root.run.distributed_backend, self.cfg.root.run.device)
        device = distributed.pick_device(self.cfg.root.run.device, info)
        if self.cfg.root.run.num_threads:
            torch.set_num_threads(self.cfg.root.run.num_threads)
        # what can be refused before anything is written: no run directory is left by a run that never started
        for spec in self.specs[:lo]:
            st = self.check(spec)
            if st.state != "done":
                raise UserError(f"--from {start}: upstream stage {spec.name} is {st.state}"
                                f"{' (' + st.detail + ')' if st.detail else ''}; run it first")
        if info.is_main:
            self.run.lock.acquire()
        try:
            with console_log(self.run.path / "run.log") if info.is_main else contextlib.nullcontext():
                if info.is_main:
                    atomic_write_text(self.run.path / "config.yaml", self.cfg.to_yaml())
                    for note in self.cfg.notes:
                        self.echo(f"recipe: {note}")
                distributed.barrier()
                for spec in self.specs[lo: hi + 1]:
                    self._run_stage(spec, spec.name in force, reuse, info, device)
                # Every rank is done with the process group; it is torn down here rather than left to interpreter
                # exit, where gloo's threads could still be joinable when their destructors ran (a rank aborted
                # with "terminate called without an active exception" after a finished run, under load). A rank
                # that fails leaves it as it is: the others learn of the failure when that process's connections
                # close.
                distributed.barrier()
                distributed.shutdown()
                if info.is_main:
                    self._point_at_products(self.specs[lo: hi + 1])
        finally:
            self.run.lock.release()

    def _point_at_products(self, specs: list[StageSpec]) -> None:
        """The last stage run that has a product to read (evaluate: its report) says where it is."""
        for spec in reversed(specs):
            if spec.product and (self.run.stage_dir(spec.name) / spec.product).is_file():
                self.echo(f"{spec.name}: {self.run.stage_dir(spec.name) / spec.product}")
                return

    def _try_reuse(self, spec: StageSpec, other: Path, chash: str, inputs: dict, mismatched: tuple = ()) -> bool:
        """Copy (hard-link) the stage from another run whose manifest has this config and inputs, after checking
        every product there against that manifest. Links in the other run's stage directory are never
        followed: a stage writes none, so one there makes the stage not reusable."""
        src = RunDir(other)
        m = src.read_manifest(spec.name)
        if m is None or m.get("config_hash") != chash or m.get("inputs", {}) != inputs:
            return False
        sdir = src.stage_dir(spec.name)
        if sdir.is_symlink():
            self.echo(f"{spec.name}: not reused from {other}: {sdir} is a link")
            return False
        files = []
        for root, dirs, names in os.walk(sdir, followlinks=False):
            for n in dirs + names:
                p = Path(root) / n
                if p.is_symlink():
                    self.echo(f"{spec.name}: not reused from {other}: {p} is a link (a stage writes none)")
                    return False
            files.extend(Path(root) / n for n in names)
        bad = verify_outputs(sdir, m)
        if bad:
            self.echo(f"{spec.name}: not reused from {other}: its output {bad[0][0]} {bad[0][1]}")
            return False
        dst = self.run.stage_dir(spec.name)
        if mismatched and dst.exists():
            move_aside(self.run.path, dst)
        tmp = dst.with_name(f".{spec.name}.reuse")
        shutil.rmtree(tmp, ignore_errors=True)
        for f in files:
            target = tmp / f.relative_to(sdir)
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(f, target)
        tmp.mkdir(parents=True, exist_ok=True)
        if dst.exists():  # the stage's own earlier work is kept, and so are the versions kept before it
            kept.recover(dst)
            self._keep(spec)
            if (dst / kept.PREVIOUS).exists():
                os.replace(dst / kept.PREVIOUS, tmp / kept.PREVIOUS)
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        return True

    def _keep(self, spec: StageSpec) -> Path | None:
        """Move the stage's work (finished or partial) under .previous/, named by the hash it was made with."""
        earlier = self.run.read_manifest(spec.name) or self.run.read_started(spec.name) or {}
        return kept.keep(self.run.stage_dir(spec.name), earlier.get("config_hash"))

    def _try_restore(self, spec: StageSpec, chash: str, inputs: dict) -> str | None:
        """Move back a kept version finished with this config and inputs (its products checked against its
        manifest), keeping what is in the stage now; the kept folder's path, or None."""
        d = self.run.stage_dir(spec.name)
        for vdir, m in reversed(kept.versions(d)):
            if m is None or m.get("config_hash") != chash or m.get("inputs", {}) != inputs or verify_outputs(vdir, m):
                continue
            self._keep(spec)
            for p in d.iterdir():  # a lone started.json: no work to keep
                if p.name != kept.PREVIOUS:
                    p.unlink()
            kept.restore(d, vdir)
            return str(vdir)
        return None

    def _longer(self, spec: StageSpec, st: StageState | None, inputs: dict | None) -> tuple[str, int, int] | None:
        """(key, old, new) where the only change since the stage's work (finished or partial) is its step count,
        raised, with the same inputs and a checkpoint to continue from; else None."""
        if spec.extends is None or inputs is None or (st is not None and st.state not in ("stale", "partial")):
            return None
        rec = self.run.read_manifest(spec.name) or self.run.read_started(spec.name)
        if not rec or rec.get("inputs") != inputs or not rec.get("config"):
            return None
        key = f"{spec.name}.{spec.extends}"
        diffs = diff_keys(rec["config"], spec.hash_sections(self.cfg))
        if set(diffs) != {key}:
            return None
        was, now = diffs[key]
        if not (isinstance(was, int) and isinstance(now, int) and now > was):
            return None
        if not CheckpointManager(self.run.stage_dir(spec.name) / "checkpoints").step_dirs():
            return None
        return key, was, now

    def _run_stage(self, spec: StageSpec, forced: bool, reuse: str | None, info, device: str) -> None:
        chash = spec.config_hash(self.cfg)
        inputs = self._inputs(spec)
        if inputs is None:
            missing = [up for up in self.upstream[spec.name] if self.run.read_manifest(up) is None]
            raise UserError(f"stage {spec.name}: input stage(s) {', '.join(missing)} not done")
        # Rank 0 decides and every rank follows: a rank that looked at the directory itself could see what
        # rank 0 has just written there (a reused manifest, a new started.json) and take another branch.
        st = distributed.broadcast_object(self.check(spec) if info.is_main else None)
        say = self.echo if info.is_main else (lambda *_: None)
        if st.state == "done" and not forced:
            say(f"{spec.name}: done, config and inputs unchanged; skipped")
            return
        if reuse and not forced:
            # Rank 0 decides and copies; every rank learns the answer, so all take the same branch.
            reused = self._try_reuse(spec, Path(reuse), chash, inputs, st.mismatched) if info.is_main else False
            if distributed.broadcast_object(reused):
                say(f"{spec.name}: reused from {reuse} (same config and inputs)")
                return
        d = self.run.stage_dir(spec.name)
        if info.is_main:
            kept.recover(d)
        if not forced:
            back = self._try_restore(spec, chash, inputs) if info.is_main else None
            if distributed.broadcast_object(back):
                say(f"{spec.name}: restored the version kept in {back} (finished earlier with this config and "
                    "inputs); skipped")
                return
        longer = distributed.broadcast_object(self._longer(spec, st, inputs) if info.is_main and not forced else None)
        resumed = False
        aside = None  # products that do not match the manifest: moved aside, never deleted
        if st.mismatched and info.is_main:
            ckpts = d / "checkpoints"
            training = ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir())
            if training and not forced and not any(rel.split("/")[0] in ("best", "candidate") for rel in st.mismatched):
                # a training stage resumes from its newest verified checkpoint and writes its products again
                # (best/ and candidate/ cannot be rebuilt from a checkpoint: a mismatch there re-runs the stage)
                aside, resumed = move_aside(self.run.path, d, list(st.mismatched)), True
            else:
                aside = move_aside(self.run.path, d)
        if forced:
            reason = "forced" + (f"; outputs that did not match the manifest moved aside to {aside}" if aside else "")
        elif longer is not None:
            key, was, now = longer
            resumed = True
            reason = f"training longer: {key} {was} -> {now}; continuing from its newest checkpoint"
            m = self.run.read_manifest(spec.name)
            if m is not None and info.is_main:
                where = kept.copy_products(d, m["config_hash"], [o["path"] for o in m.get("outputs", [])])
                reason += f"; the {was}-step version is kept in {where}"
        elif st.state == "stale":
            reason = st.detail
            if aside is not None:
                reason += f"; moved aside to {aside}" + ("; resuming from the newest checkpoint" if resumed else "")
        elif st.state == "partial":
            started = self.run.read_started(spec.name)
            resumed = started is not None and started.get("inputs") == inputs
            reason = "resuming partial work" if resumed else "inputs changed since the partial work"
        else:
            reason = "not run yet"
        resumed = distributed.broadcast_object(resumed)
        if info.is_main:
            if not resumed and d.exists():
                # finished (or partial) work is never deleted by a run: it is kept under the stage
                where = self._keep(spec)
                if where is not None:
                    reason += f"; the earlier work is kept in {where}"
                for p in d.iterdir():
                    if p.name != kept.PREVIOUS:
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            else:
                mp = self.run.manifest_path(spec.name)
                if mp.exists():
                    mp.unlink()
                # A kill between writing a temporary file and renaming it leaves the temporary behind
                # (atomic_write's `.<name>.<random>.tmp`, write_shard's `.<name>.tmp`); we hold the lock.
                for tmp in d.rglob(".*.tmp"):
                    if tmp.is_file():
                        tmp.unlink()
            d.mkdir(parents=True, exist_ok=True)
            self.run.write_started(spec.name, chash, inputs, spec.hash_sections(self.cfg))
        distributed.barrier()
        say(f"{spec.name}: running ({reason})")
        ctx = StageContext(spec.name, self.cfg, self.run, d, {up: self.run.read_manifest(up) for up in self.upstream[spec.name]},
                           info, device, resumed)
        seed_everything(self.cfg.root.seed)
        t0 = time.time()
        try:
            counts = spec.run(ctx) or {}
        finally:
            ctx.close()
        counts = {**ctx.counts, **counts}
        distributed.barrier()
        if info.is_main:
            m = self.run.write_manifest(spec.name, chash, inputs, counts, time.time() - t0,
                                        {"config": spec.hash_sections(self.cfg)})
            summary = ", ".join(f"{k} {v}" for k, v in counts.items()) or "no counts"
            say(f"{spec.name}: finished in {m['wall_s']:.1f}s ({summary}); output in {d}")
        distributed.barrier()

    def _kept(self, spec: StageSpec) -> list[dict]:
        now = spec.hash_sections(self.cfg)
        out = []
        for vdir, m in kept.versions(self.run.stage_dir(spec.name)):
            rec = m or kept.started(vdir)
            differs = changed_keys(rec.get("config"), now) if rec else ""
            if rec and not differs and rec.get("config_hash") == spec.config_hash(self.cfg):
                differs = "same config, other inputs" if m is not None else "same config"
            out.append({"path": str(vdir), "bytes": kept.size_bytes(vdir), "done": m is not None,
                        "differs": differs or "config unknown"})
        return out

    def status(self) -> list[StageState]:
        """Every stage's state; a done stage below one that is not done is stale (it will be re-run)."""
        out: dict[str, StageState] = {}
        for s in self.specs:
            st = self.check(s)
            up = next((u for u in self.upstream[s.name] if out[u].state != "done"), None)
            if st.state == "done" and up is not None:
                st = StageState(s.name, "stale", f"upstream {up} is {out[up].state}")
            st.kept = tuple(self._kept(s))
            out[s.name] = st
        return list(out.values())


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
