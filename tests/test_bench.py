"""`sglc bench offline`: every request generates exactly its output length, and the warm-up's requests
leave nothing in the cache for the timed run to hit."""

from __future__ import annotations

from sgl_compile.bench.datasets import shared_prefix_dataset
from sgl_compile.bench.offline import offline_throughput
from sgl_compile.runtime.engine import Engine


def test_offline_throughput_counts_and_starts_from_an_empty_cache() -> None:
    with Engine(model="dummy:smollm2-135m", max_total_tokens=4096) as engine:
        data = shared_prefix_dataset(engine.tokenizer, 2, 3, 48, 8, 5)
        summary = offline_throughput(engine, data)
        assert summary["num_requests"] == 6 and summary["total_output_tokens"] == 30
        assert summary["total_input_tokens"] == 6 * 56 and summary["output_throughput"] > 0
        assert summary["forward_steps"] >= 5 and summary["num_retractions"] == 0
        # The warm-up ran all six twice (the second pass hit each prompt but its last token), then flushed:
        # the timed run, its six admitted together into an empty cache, hit nothing (not 6 x 55 again).
        assert engine.scheduler.cached_prompt_tokens == 6 * 55
