"""Compare the runs that benchmarks/gpu_check.sh made (configs/tiny.yaml on cpu, cuda, torchrun+NCCL, and a
cuda run killed inside distill then resumed). Prints one table; exits 1 where a run failed or a check is off.

    python benchmarks/gpu_compare.py WORKDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def _train(run: Path, stage: str) -> list[dict]:
    p = run / stage / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    return [r for r in rows if "loss" in r and "step" in r]


def _val(run: Path) -> float | None:
    p = run / "distill" / "metrics.jsonl"
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    return vals[-1] if vals else None


def _weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / stage / "final").rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(run)}:{k}"] = v.float()
    return out


def _max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys() or not a:
        return float("inf")
    return max(float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a)


def main(work: Path) -> int:
    bad = 0
    runs = sorted(p for p in work.iterdir() if p.is_dir())
    print(f"{'run':<12} {'done':>5} {'distill loss@1..3':>28} {'val':>9} {'adv loss@1':>11}")
    for r in runs:
        done = (r / "evaluate" / "manifest.json").is_file()
        bad += not done
        d = _train(r, "distill")
        a = _train(r, "adversarial")
        v = _val(r)
        first = " ".join(f"{x['loss']:.5f}" for x in d[:3])
        print(f"{r.name:<12} {str(done):>5} {first:>28} "
              f"{v if v is None else round(v, 5)!s:>9} {a[0]['loss'] if a else float('nan'):>11.5f}")

    def pair(x: str, y: str, what: str, tol: float | None) -> None:
        nonlocal bad
        if not (work / x).is_dir() or not (work / y).is_dir():
            print(f"{what}: missing run")
            bad += 1
            return
        lx = [r["loss"] for r in _train(work / x, "distill")]
        ly = [r["loss"] for r in _train(work / y, "distill")]
        n = min(len(lx), len(ly))
        rel = max((abs(p - q) / max(abs(q), 1e-12) for p, q in zip(lx[:n], ly[:n])), default=float("inf"))
        wd = _max_diff(_weights(work / x, "distill"), _weights(work / y, "distill"))
        ok = tol is None or rel <= tol
        bad += not ok
        print(f"{what}: distill losses max rel diff {rel:.2e} over {n} steps; final weights max abs diff {wd:.2e}"
              + ("" if tol is None else f" (tolerance {tol:g}: {'ok' if ok else 'OFF'})"))

    pair("cuda", "cpu", "prefix, cuda bf16 autocast vs cpu fp32", 0.05)
    pair("cuda_ca", "cpu_ca", "cross_attention, cuda vs cpu", 0.05)
    pair("nccl", "cuda", "torchrun, 1 process (no process group) vs plain 1 process, cuda", 1e-3)
    pair("resume", "cuda", "cuda killed at distill step 6 and resumed vs uninterrupted", 1e-3)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
