"""argmax against max().indices on logits of the student's vocabulary (51,864): the same indices (the first of equal
maxima), measured in one process on the same tensors. Greedy decoding takes one per step ([rows, V]) and distill's
token accuracy one per step ([target tokens, V]).

    .venv/bin/python benchmarks/argmax_kernel.py [--threads 2] [--rows 1 16 87] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, n: int) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 87])
    ap.add_argument("--vocab", type=int, default=51864)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = []
    for b in a.rows:
        x = torch.randn(b, a.vocab, generator=torch.Generator().manual_seed(b))
        x[:, 7] = x.max() + 1  # a tie at the maximum: both must return the first
        x[:, 9] = x[:, 7]
        assert torch.equal(x.argmax(-1), x.max(-1).indices)
        base = min(timed(lambda: x.argmax(-1), a.n) for _ in range(3))
        ours = min(timed(lambda: x.max(-1).indices, a.n) for _ in range(3))
        out.append({"rows": b, "argmax_ms": round(base * 1e3, 4), "max_indices_ms": round(ours * 1e3, 4),
                    "ratio": round(base / ours, 2)})
    if a.json:
        print(json.dumps(out))
    else:
        for r in out:
            print(f"{r['rows']:4d} rows: argmax {r['argmax_ms']:.3f} ms, max().indices {r['max_indices_ms']:.3f} ms, "
                  f"{r['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
