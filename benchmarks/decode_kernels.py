"""The decoder's per-token kernels on logits of the student's vocabulary (51,864), measured in one process on the
same tensors: argmax against max().indices (the same indices, the first of equal maxima; greedy decoding takes one
per step, distill's token accuracy one per step), and a draw from softmax(logits) by torch.multinomial against
generation.draw_categorical (the same exponential race from uniforms; the same distribution, other draws: checked
here by a chi-square test on 20,000 draws from one row of 50 tokens).

    .venv/bin/python benchmarks/decode_kernels.py [--threads 2] [--rows 1 16 87] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stages.models.generation import draw_categorical  # noqa: E402


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
        p = torch.softmax(x * 3, -1)
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        mult = min(timed(lambda: torch.multinomial(p, 1, generator=g1), a.n // 4) for _ in range(3))
        inv = min(timed(lambda: draw_categorical(p, g2), a.n // 4) for _ in range(3))
        out.append({"rows": b, "argmax_ms": round(base * 1e3, 4), "max_indices_ms": round(ours * 1e3, 4),
                    "ratio": round(base / ours, 2), "multinomial_ms": round(mult * 1e3, 4),
                    "draw_categorical_ms": round(inv * 1e3, 4), "draw_ratio": round(mult / inv, 2)})
    # the same distribution: 20,000 draws of one row of 50 tokens, a chi-square test against the probabilities
    w = torch.softmax(torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 2, -1)
    g = torch.Generator().manual_seed(2)
    counts = torch.bincount(torch.cat([draw_categorical(w.expand(1000, -1), g) for _ in range(20)]), minlength=50)
    expect = w[0] * 20000
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    out.append({"chi_square_50_tokens_20000_draws": round(chi2, 1), "df": 49, "p99_critical": 74.9})
    if a.json:
        print(json.dumps(out))
    else:
        for r in out[:-1]:
            print(f"{r['rows']:4d} rows: argmax {r['argmax_ms']:.3f} ms, max().indices {r['max_indices_ms']:.3f} ms, "
                  f"{r['ratio']:.2f}x; multinomial {r['multinomial_ms']:.3f} ms, draw_categorical "
                  f"{r['draw_categorical_ms']:.3f} ms, {r['draw_ratio']:.2f}x")
        print(f"chi-square of draw_categorical, 50 tokens, 20,000 draws: {out[-1]['chi_square_50_tokens_20000_draws']} "
              f"(49 degrees of freedom; 74.9 at p = 0.01)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
