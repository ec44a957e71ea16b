"""Checkpoints that describe themselves and survive kills.

RUN/<stage>/checkpoints/step-000123/
    model.<name>.safetensors    every model's weights, by name (student, reference, discriminator.audio, ...)
    optim.<name>.pt             every optimizer's state, by name (torch.save; loaded with weights_only=True)
    state.pt                    step, scheduler, RNG states (python, numpy, torch, cuda), data position, extra
    checkpoint.json             the step and the sha256 of every file above, written last

A checkpoint is written into `.tmp-step-000123/` (each file fsynced) and renamed into place only when
complete; the newest `keep` are kept. Loading verifies every sha256 and falls back to the previous complete
checkpoint, with a warning naming the bad one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from pipeline import faults
from pipeline.errors import UserError
from pipeline.files import fsync_dir, replace_dir, sha256_file

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
INDEX_FILE = "checkpoint.json"


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    np_state = {
        "bit_generator": np_state["bit_generator"],
        "key": np_state["state"]["key"].tolist(),
        "pos": int(np_state["state"]["pos"]),
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    }
    st = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    n = st["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def storage_error(e: BaseException, path: Path) -> OSError | None:
    """`e` as the OSError it stands for when it is a failed write (disk full, I/O error), else None. torch.save
    and safetensors report one as RuntimeError / SafetensorError without an errno."""
    if isinstance(e, OSError):
        return e
    msg = str(e)
    found = re.search(r"os error (\d+)", msg)  # safetensors: "I/O error: No space left on device (os error 28)"
    if found:
        code = int(found.group(1))
    elif isinstance(e, RuntimeError) and ("unexpected pos" in msg or "PytorchStreamWriter" in msg):
        # torch's zip writer: the write came up short; a full file system is the usual cause.
        try:
            st = os.statvfs(path.parent)
            code = errno.ENOSPC if st.f_bavail * st.f_frsize < (1 << 20) else errno.EIO
        except OSError:
            code = errno.EIO
    else:
        return None
    return OSError(code, os.strerror(code), str(path))


def _serialise(write, path: Path) -> None:
    """Run `write()`, which writes `path` through torch.save or safetensors. A failed write becomes OSError
    (storage_error), so the caller keeps the previous checkpoint and says why. Any other error (a bug) goes
    through unchanged."""
    try:
        write()
    except OSError:
        raise
    except Exception as e:
        err = storage_error(e, path)
        if err is None:
            raise
        raise err from e


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@dataclass
class Loaded:
    step: int
    path: Path
    state: dict = field(default_factory=dict)  # scheduler, data position, extra (rng already restored)


class CheckpointManager:
    def __init__(self, directory: Path, keep: int = 3):
        self.dir = Path(directory)
        self.keep = keep

    def step_dirs(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted((p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step-")), key=lambda p: p.name)

    def save(self, step: int, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             scheduler: Any = None, data_state: Any = None, extra: dict | None = None) -> Path:
        final = self.dir / f"step-{step:06d}"
        tmp = self.dir / f".tmp-step-{step:06d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            files = []
            for name, model in models.items():
                fn = tmp / f"model.{name}.safetensors"
                _serialise(lambda: save_model(_unwrap(model), str(fn)), fn)
                files.append(fn)
                faults.point("checkpoint")
            for name, opt in optimizers.items():
                fn = tmp / f"optim.{name}.pt"
                _serialise(lambda: torch.save(opt.state_dict(), fn), fn)
                files.append(fn)
            state = {
                "step": step,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state(),
                "data": data_state,
                "extra": extra or {},
            }
            fn = tmp / STATE_FILE
            _serialise(lambda: torch.save(state, fn), fn)
            files.append(fn)
            for fn in files:
                _fsync_file(fn)
            index = {"step": step, "models": sorted(models), "optimizers": sorted(optimizers),
                     "files": {fn.name: sha256_file(fn) for fn in files}}
            with open(tmp / INDEX_FILE, "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            prev = self.step_dirs()
            kept = f"; the previous checkpoint {prev[-1]} is intact" if prev else ""
            raise UserError(f"could not write checkpoint {final}: {e.strerror or e}{kept}") from None
        self._prune()
        return final

    def save_final(self, models: dict[str, torch.nn.Module]) -> Path:
        """Weights only, for use: RUN/<stage>/final/model.<name>.safetensors (same atomic protocol)."""
        final = self.dir.parent / "final"
        with replace_dir(final) as tmp:
            for name, model in models.items():
                save_model(_unwrap(model), str(tmp / f"model.{name}.safetensors"))
                _fsync_file(tmp / f"model.{name}.safetensors")
        return final

    def _prune(self) -> None:
        dirs = self.step_dirs()
        for p in dirs[: max(0, len(dirs) - self.keep)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def verify(self, path: Path) -> str | None:
        """None when the checkpoint is complete and every sha256 matches, else the reason."""
        idx = path / INDEX_FILE
        try:
            index = json.loads(idx.read_text())
        except (OSError, ValueError, RecursionError) as e:
            return f"unreadable {INDEX_FILE} ({e.__class__.__name__})"
        for name, digest in index.get("files", {}).items():
            fn = path / name
            if not fn.exists():
                return f"{name} is missing"
            if sha256_file(fn) != digest:
                return f"{name} does not match its sha256"
            if name.endswith(".safetensors"):
                # a file written whole with a bad header (a bug, a tool that rewrote it and its index) hashes
                # fine: its header is read here, before any model is touched
                try:
                    with safe_open(str(fn), framework="pt") as f:
                        f.keys()
                except Exception as e:
                    return f"{name} is not a readable safetensors file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        return None

    def load_latest(self, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    scheduler: Any = None, map_location: str = "cpu") -> Loaded | None:
        """Restore the newest verified checkpoint into the given objects (and the RNGs); None if there is none."""
        touched = None  # a checkpoint that failed while loading, after some of it may have been restored
        for path in reversed(self.step_dirs()):
            bad = self.verify(path)
            if not bad:
                try:
                    return self._load(path, models, optimizers, scheduler, map_location)
                except UserError:
                    raise
                except Exception as e:  # a state.pt or optimizer file that verifies but does not load
                    bad, touched = f"it does not load: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", path
            log.warning("checkpoint %s is corrupt (%s); falling back to the previous one", path, bad)
            print(f"warning: checkpoint {path} is corrupt ({bad}); falling back to the previous one")
        if touched is not None:
            # some weights may already hold the bad checkpoint's values: starting over from them would not be
            # the run that was asked for
            raise UserError(f"checkpoint {touched} could not be loaded and no earlier checkpoint loads; move "
                            f"{self.dir} aside to start the stage over")
        return None

    def _load(self, path, models, optimizers, scheduler, map_location) -> Loaded:
        try:
            return self._load_unchecked(path, models, optimizers, scheduler, map_location)
        except pickle.UnpicklingError as e:
            raise UserError(f"refusing to load checkpoint {path}: it holds objects that safe loading "
                            f"(torch.load weights_only=True) does not allow ({str(e).splitlines()[0][:200]})") from None

    def _load_unchecked(self, path, models, optimizers, scheduler, map_location) -> Loaded:
        for name, model in models.items():
            fn = path / f"model.{name}.safetensors"
            if not fn.exists():
                raise UserError(f"checkpoint {path} has no model {name!r}")
            load_model(_unwrap(model), str(fn), device=str(map_location))
        for name, opt in optimizers.items():
            opt.load_state_dict(torch.load(path / f"optim.{name}.pt", map_location=map_location, weights_only=True))
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return Loaded(step=int(state["step"]), path=path, state=state)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
