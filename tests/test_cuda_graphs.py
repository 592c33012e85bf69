"""Decode CUDA graphs on the GPU: replayed steps give the eager steps' greedy tokens while batches move
across buckets (and, with cascade attention, between the plain and the grouped graphs), every graph
writing its logits into one shared buffer."""

from __future__ import annotations

import random

import pytest
import torch

from sgl_compile.runtime.engine import Engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA"),
]
MODEL = "dummy:smollm2-135m"


def _run(prompts: list[list[int]], lengths: list[int], **options) -> tuple[list[list[int]], dict]:
    """Greedy outputs, the scheduler's stats and the rows of the graphs' logits buffer (0: no graphs)."""
    params = [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for n in lengths]
    with Engine(model=MODEL, dtype="float32", device="cuda", max_total_tokens=32768, context_length=2048,
                **options) as e:  # fmt: skip
        outs = e.generate(input_ids=prompts, sampling_params=params)
        graphs = e.scheduler.runner.graphs
        stats = e.get_stats() | {"logits_rows": graphs.logits.shape[0] if graphs is not None else 0}
        return [o["output_ids"] for o in outs], stats


@pytest.mark.parametrize("cascade", [False, True])
def test_replays_across_buckets_equal_eager(cascade: bool) -> None:
    rng = random.Random(1)
    shared = [rng.randrange(49152) for _ in range(300)] if cascade else []
    prompts = [shared + [rng.randrange(49152) for _ in range(rng.randint(4, 90))] for _ in range(40)]
    lengths = [1 + 2 * i for i in range(40)]  # requests finish one by one: 40, 39, ... running
    options = {"cascade_attention": "on" if cascade else "off", "cuda_graph_max_bs": 64}
    graphed, stats = _run(prompts, lengths, **options)
    eager, eager_stats = _run(prompts, lengths, disable_cuda_graph=True, **options)
    assert graphed == eager
    assert stats["logits_rows"] == 64 and eager_stats["logits_rows"] == 0
    assert (stats["cascade_steps"] > 0) == cascade
