"""The Whisper labeller's projection onto the vocabulary at one greedy step: float32 (`teacher.vocab_search: exact`)
against the int8 search (`VocabSearch`, the default), on the labeller's own final hidden states, in one process.

    .venv/bin/python benchmarks/vocab_search.py [--n 48] [--rows 16 64] [--threads 2] [--json]

The states are captured from WhisperTeacher.label on the first n shared clips (the decoder's final LayerNorm's
outputs that its greedy steps after the first give the search). For each batch size: milliseconds per call of each (median of --repeats
calls on the same rows, the greedy token asked for), their ratio; over all states, 16 rows a call: whether each
row's top 1 and top 8 are float32's and how many rows the guard sends whole to float32 for each, the largest
error of the int8 logits and that error over the guard's deviation (VocabSearch.guard / SIGMAS), and how far a
log-softmax normaliser taken from the int8 logits would be off (why the labeller scores its tokens in float32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def states(n: int):
    """(teacher, [rows, D] final hidden states) that the labeller's greedy steps give the search, on the first n
    shared clips."""
    import torch

    from label_throughput import DEFAULT_DATA, build_teacher, load_clips

    teacher = build_teacher()
    _, clips, _ = load_clips(DEFAULT_DATA, n)
    seen, search = [], teacher.vocab.logits
    teacher.vocab.logits = lambda x, *a: seen.append(x) or search(x, *a)
    teacher.label(clips)
    del teacher.vocab.logits
    return teacher, torch.cat(seen)


def per_call_ms(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=48, help="shared clips whose decoding gives the states")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64], help="rows per call (the labeller's batch)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    teacher, x = states(args.n)
    search, W, suppress = teacher.vocab, teacher.model.decoder.token_embedding.weight, teacher.suppress
    if search is None:
        sys.exit("the int8 vocabulary search is not available in this torch (no quantized CPU kernels)")
    result = {"states": len(x), "threads": args.threads, "candidates": search.candidates}
    for rows in args.rows:
        xb = x[:rows].contiguous()
        exact_ms = per_call_ms(lambda: xb @ W.T, args.repeats)
        search_ms = per_call_ms(lambda: search.logits(xb, suppress, 1), args.repeats)  # as a greedy step asks
        result[f"rows_{rows}"] = {"float32_ms": round(exact_ms, 2), "search_ms": round(search_ms, 2),
                                  "ratio": round(exact_ms / search_ms, 2)}
    exact = x @ W.T
    exact[:, suppress] = -float("inf")
    xs = x / search.smooth
    error = torch.cat([(torch.ops.quantized.linear_dynamic(xs[i: i + 16], search.packed, search.REDUCE_RANGE)
                        - exact[i: i + 16]).abs().masked_fill(~torch.isfinite(exact[i: i + 16]), 0).amax(1)
                       for i in range(0, len(x), 16)])
    deviation = torch.cat([search.guard(xs[i: i + 16]) / search.SIGMAS for i in range(0, len(x), 16)])
    for k in (1, 8):  # the greedy token; the stored top-k (which the labeller scores in float32 after the loop)
        search.rows = search.rows_exact = 0
        got = torch.cat([search.logits(x[i: i + 16], suppress, k) for i in range(0, len(x), 16)])
        result[f"top{k}"] = {"same_as_float32": bool(torch.equal(got.topk(k, -1).indices, exact.topk(k, -1).indices)),
                             "rows_sent_to_float32": search.rows_exact}
    result.update({
        "int8_logit_max_error": round(float(error.max()), 4),
        "max_error_in_deviations": round(float((error / deviation).max()), 2),
        "guard_in_deviations": search.SIGMAS,
        "normaliser_from_int8_max_error": round(float((torch.logsumexp(got, -1) - torch.logsumexp(exact, -1)).abs().max()), 5),
    })
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['states']} states of the labeller on {args.n} shared clips, {args.threads} threads, "
          f"{result['candidates']} candidates")
    for rows in args.rows:
        r = result[f"rows_{rows}"]
        print(f"{rows:3d} rows: float32 {r['float32_ms']:6.2f} ms, search {r['search_ms']:6.2f} ms: {r['ratio']:.2f}x")
    for k in (1, 8):
        r = result[f"top{k}"]
        print(f"top-{k} as float32's: {r['same_as_float32']}; rows the guard sent to float32: {r['rows_sent_to_float32']} "
              f"of {result['states']}")
    print(f"int8 logits off by {result['int8_logit_max_error']} at most: {result['max_error_in_deviations']} of the "
          f"guard's deviations (the guard: {result['guard_in_deviations']}); a normaliser taken from them (top 64 "
          f"exact) off by {result['normaliser_from_int8_max_error']} nats at most")

if __name__ == "__main__":
    main()
