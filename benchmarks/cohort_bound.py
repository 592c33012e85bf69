"""The best a schedule of cohorts can do on a workload of equal requests, at the ceilings (no GPU).

    python -m benchmarks.cohort_bound [--model llama-3.1-8b] [--num-prompts 512] [--input-len 1000]
        [--output-len 1000] [--pool-tokens 432029] [--cohorts 3] [--grain 50]

`benchmarks/floors.py` bounds bar 3 with every request staggered at its average length, which 512
requests of one length never reach: they start in cohorts and each cohort's KV grows until it ends.
Here a schedule is k cohorts (n_i requests whose decode starts at step s_i), never retracting: at
each step the pool holds every running request's prompt and the tokens it has generated. The search
tries cohort sizes and starts on a grid and reports the schedule with the least time at the
ceilings (each decode step the larger of the weights at the copy ceiling and its FLOPs at the matmul
ceiling, plus every key read once per generated token), twice: with the prefill after one another
(its FLOPs at the matmul ceiling) and hidden entirely (a second stream that costs decode nothing).
The engine's own lockstep waves are the k = ceil(n / fits) cohorts back to back.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import numpy as np

from benchmarks.floors import DEVICES, Shape, Workload, floor


@dataclass(frozen=True)
class Schedule:
    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    decode_steps: int
    gemm_s: float  # the decode steps' GEMMs at the ceilings


def evaluate(
    sizes: tuple[int, ...], starts: tuple[int, ...], input_len: int, output_len: int, pool: int, shape: Shape
) -> Schedule | None:
    """The schedule's decode GEMM time on the H100's ceilings, or None where the pool overflows."""
    dev = DEVICES["h100"]
    end = max(starts) + output_len
    used, running = np.zeros(end), np.zeros(end)
    j = np.arange(output_len)
    for n, s in zip(sizes, starts, strict=True):
        used[s + j] += n * (input_len + 1 + j)  # the prompt and the tokens so far, the new one's slot too
        running[s + j] += n
    if used.max() > pool:
        return None
    busy = running[running > 0]
    per_step = np.maximum(
        shape.weight_bytes / dev.bandwidth, 2 * (shape.body + shape.head) * busy / dev.matmul
    )
    return Schedule(sizes, starts, int(busy.size), float(per_step.sum()))


def best(
    num: int, input_len: int, output_len: int, pool: int, shape: Shape, cohorts: int, grain: int
) -> Schedule:
    """The least GEMM time over `cohorts` cohorts (sizes on a grain of grain / 10 requests, starts on
    a grain of `grain` steps); the first starts at step 0."""
    fits = pool // (input_len + output_len)
    size_grid = range(max(1, grain // 10), fits + 1, max(1, grain // 10))
    start_grid = range(0, cohorts * output_len + 1, grain)
    found: Schedule | None = None
    for sizes in itertools.product(size_grid, repeat=cohorts - 1):
        last = num - sum(sizes)
        if not 0 < last <= fits:
            continue
        for rest in itertools.combinations_with_replacement(start_grid, cohorts - 1):
            s = evaluate((*sizes, last), (0, *rest), input_len, output_len, pool, shape)
            if s is not None and (found is None or s.gemm_s < found.gemm_s):
                found = s
    if found is None:
        raise ValueError(f"no schedule of {cohorts} cohorts fits {num} requests in {pool} tokens")
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=1000)
    ap.add_argument("--pool-tokens", type=int, default=432_029, help="the KV pool (the H100 run's)")
    ap.add_argument("--cohorts", type=int, default=3)
    ap.add_argument("--grain", type=int, default=50, help="steps between the starts tried")
    args = ap.parse_args()
    shape = Shape.of(args.model)
    n, i, o, pool = args.num_prompts, args.input_len, args.output_len, args.pool_tokens
    w = Workload(args.model, n, (i, i), (o, o))
    f = floor(w, DEVICES["h100"])
    kv_s, prefill_s = f["decode_kv_s"], f["prefill_s"]
    fits = pool // (i + o)
    waves = -(-n // fits)
    lockstep = evaluate(
        tuple([fits] * (waves - 1) + [n - fits * (waves - 1)]),
        tuple(k * o for k in range(waves)),
        i,
        o,
        pool,
        shape,
    )
    print(
        f"KV reads {kv_s:.1f} s, prefill {prefill_s:.1f} s at the ceilings; {fits} requests fit at full length"
    )
    print(
        "| schedule | sizes | decode starts | decode steps | GEMM s | tok/s, prefill serial | tok/s, prefill hidden |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = [
        ("lockstep waves", lockstep),
        (f"best of {args.cohorts} cohorts", best(n, i, o, pool, shape, args.cohorts, args.grain)),
    ]
    for name, s in rows:
        total = s.gemm_s + kv_s
        print(f"| {name} | {s.sizes} | {s.starts} | {s.decode_steps} | {s.gemm_s:.1f} | "
              f"{n * o / (total + prefill_s):,.0f} | {n * o / total:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
