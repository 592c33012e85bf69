"""`sglc bench serve`: an online benchmark client for any OpenAI-compatible server.

Streams `/v1/completions` (with `ignore_eos`, so each request produces exactly
its output length on servers that honour it), arrivals Poisson at a rate or all
at once, optionally capped in concurrency, and reports throughput and latency
percentiles.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from sgl_compile.bench.datasets import BenchRequest


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def _one(
    http: httpx.AsyncClient, url: str, model: str, req: BenchRequest, headers: dict
) -> RequestResult:
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    result = RequestResult(False, len(req.input_ids))
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.ok = True
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(int(q / 100 * len(s)), len(s) - 1)]


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    e2e = [r.latency for r in ok]
    ms = 1000.0

    def stat(name: str, xs: list[float], pcts: tuple[int, ...]) -> dict[str, float]:
        d = {f"mean_{name}_ms": statistics.fmean(xs) * ms if xs else 0.0}
        d[f"median_{name}_ms"] = statistics.median(xs) * ms if xs else 0.0
        d.update({f"p{p}_{name}_ms": _pct(xs, p) * ms for p in pcts})
        return d

    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_len for r in ok),
        "total_output_tokens": sum(r.output_len for r in ok),
        "request_throughput": len(ok) / duration,
        "input_throughput": sum(r.prompt_len for r in ok) / duration,
        "output_throughput": sum(r.output_len for r in ok) / duration,
        **stat("ttft", ttft, (99,)),
        **stat("itl", itl, (95, 99)),
        **stat("tpot", tpot, (99,)),
        **stat("e2e_latency", e2e, (99,)),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


async def run(
    url: str,
    model: str,
    requests: list[BenchRequest],
    request_rate: float = float("inf"),
    max_concurrency: int | None = None,
    warmup: int = 1,
    api_key: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or 1000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as http:
        for req in requests[:warmup]:
            warm = await _one(
                http, url, model, BenchRequest(req.prompt, req.input_ids, min(req.output_len, 4)), headers
            )
            if not warm.ok:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        sem = asyncio.Semaphore(max_concurrency or len(requests) or 1)
        rng = random.Random(seed)
        bar = tqdm(total=len(requests), desc="requests", unit="req")

        async def limited(req: BenchRequest) -> RequestResult:
            async with sem:
                r = await _one(http, url, model, req, headers)
            bar.update(1)
            return r

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        bar.close()
        duration = time.perf_counter() - start
    summary = summarize(results, duration)
    summary.update(request_rate=request_rate, max_concurrency=max_concurrency, num_prompts=len(requests))
    return summary


def print_table(summary: dict[str, Any]) -> None:
    keys = [k for k, v in summary.items() if isinstance(v, (int, float)) and v is not None]
    width = max(len(k) for k in keys)
    for k in keys:
        v = summary[k]
        print(f"{k:<{width}}  {v:>12.2f}" if isinstance(v, float) else f"{k:<{width}}  {v:>12}")
