"""Host time of one decode step of the scheduler, with the model replaced by a free stand-in.

    python benchmarks/host_overhead.py [--batch 256] [--prompt-len 500] [--steps 50] [--profile]
        [--groups 16 --shared-len 2048 --cascade]   # prompts sharing system prompts, cascade grouping
        [--no-decode-inputs]   # leave out the CPU reference of the decode-inputs kernel (CUDA: one launch)

What the GPU waits for between graph replays when scheduling is not overlapped: batch
building, table writes, sampling bookkeeping, detokenization. Runs on any machine.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

import torch

from sgl_compile.driver import compile_model
from sgl_compile.runtime import model_runner
from sgl_compile.runtime.launch import freeze_gc
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.runtime.scheduler import Scheduler, SchedulerConfig


class ConstantLogits(torch.nn.Module):
    """Stands in for the program: logits for the requested rows, computed once. They are 64 wide (valid
    token ids all the same), so the host's argmax over them costs next to nothing, as on a GPU."""

    def __init__(self, vocab: int = 64) -> None:
        super().__init__()
        self.vocab, self.cached = vocab, torch.zeros(0, vocab)

    def forward(self, logits_indices: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        n = logits_indices.shape[0]
        if self.cached.shape[0] < n:
            self.cached = torch.randn(n, self.vocab)
        return self.cached[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=500)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--groups", type=int, default=0, help="prompts share one of this many system prompts")
    ap.add_argument("--shared-len", type=int, default=0, help="system prompt tokens (of --prompt-len)")
    ap.add_argument("--cascade", action="store_true", help="group the decode batch for cascade attention")
    ap.add_argument(
        "--no-decode-inputs", action="store_true",
        help="skip the CPU reference that fills the decode inputs (on CUDA one kernel launch does it)",
    )  # fmt: skip
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sort", default="cumtime", help="cProfile order: cumtime | tottime")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    if args.no_decode_inputs:  # the stand-in program reads none of them
        model_runner.decode_inputs_reference = lambda *_: None
    compiled = compile_model(model="dummy:smollm2-135m")
    vocab = compiled.config.vocab_size
    compiled.program = ConstantLogits()
    # Shared system prompts are held once (the cache), the rest of each request's KV on its own.
    slots = args.batch * (args.prompt_len - args.shared_len + args.steps + 8) + args.groups * args.shared_len
    cfg = SchedulerConfig(
        max_total_tokens=slots, context_length=4096,
        max_running_requests=args.batch, chunked_prefill_size=1 << 30, enable_cascade_attention=args.cascade,
    )  # fmt: skip
    sched = Scheduler(compiled, cfg)
    freeze_gc()  # as the engine does once it serves
    rng = random.Random(0)
    params = SamplingParams(max_new_tokens=args.steps + 4, temperature=0, ignore_eos=True)
    systems = [[rng.randrange(vocab) for _ in range(args.shared_len)] for _ in range(args.groups)]
    for i in range(args.batch):
        head = systems[i % args.groups] if systems else []
        ids = head + [rng.randrange(vocab) for _ in range(args.prompt_len - len(head))]
        sched.add(Req(str(i), ids, params, compiled.tokenizer))
    while any(r.kv_len < len(r.prompt_ids) for r in sched.running) or sched.waiting:
        sched.step()  # the prefill (the first of each group alone, then the rest on its cached prompt)
    start = time.perf_counter()
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [sched.step() for _ in range(args.steps)])
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)
    else:
        for _ in range(args.steps):
            sched.step()
    ms = (time.perf_counter() - start) / args.steps * 1e3
    print(f"host time per decode step at batch {args.batch}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
