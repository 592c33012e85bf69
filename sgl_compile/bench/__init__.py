"""Benchmarks: `sglc bench serve` (any OpenAI-compatible server), `offline` (in-process), `latency`."""
