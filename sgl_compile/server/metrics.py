"""Prometheus metrics, fed by request snapshots as they arrive and by the scheduler's stats."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sglc_requests", "Finished requests", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("sglc_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("sglc_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter(
            "sglc_cached_tokens", "Prompt tokens served from the radix cache", registry=r
        )
        self.ttft = Histogram("sglc_time_to_first_token_seconds", "TTFT", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("sglc_inter_token_latency_seconds", "ITL", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(
            "sglc_e2e_request_latency_seconds", "End to end", buckets=LATENCY_BUCKETS, registry=r
        )
        self.gauges = {
            name: Gauge(f"sglc_{name}", help_text, registry=r)
            for name, help_text in (
                ("num_running_reqs", "Requests holding KV"),
                ("num_queued_reqs", "Requests waiting"),
                ("kv_usage", "Fraction of KV slots in use (incl. cached prefixes)"),
                ("cache_hit_rate", "Cached prompt tokens / prompt tokens"),
            )
        }
        self._stats = stats
        self._started: dict[str, float] = {}
        self._last: dict[str, tuple[float, int]] = {}  # rid -> (time, tokens) of the last update

    def start(self, rid: str) -> None:
        self._started[rid] = time.perf_counter()

    def update(self, out: dict, now: float) -> None:
        meta = out["meta_info"]
        rid, tokens = meta["id"], meta["completion_tokens"]
        started = self._started.get(rid)
        if started is None:
            return
        last_time, last_tokens = self._last.get(rid, (started, 0))
        if tokens > last_tokens:
            if last_tokens == 0:
                self.ttft.observe(now - started)
            else:
                self.itl.observe((now - last_time) / (tokens - last_tokens))
            self.generation_tokens.inc(tokens - last_tokens)
            self._last[rid] = (now, tokens)
        finish = meta["finish_reason"]
        if finish is not None:
            self.requests.labels(finish["type"]).inc()
            self.prompt_tokens.inc(meta["prompt_tokens"])
            self.cached_tokens.inc(meta["cached_tokens"])
            self.e2e.observe(now - started)
            self._started.pop(rid, None)
            self._last.pop(rid, None)

    def render(self) -> bytes:
        stats = self._stats()
        for name, gauge in self.gauges.items():
            gauge.set(stats.get(name, 0.0))
        return generate_latest(self.registry)
