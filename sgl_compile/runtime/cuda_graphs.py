"""CUDA graphs for decode: one graph per batch-size bucket, captured at start-up, replayed per step.

A decode step of a small model is a few hundred kernel launches of a few
microseconds each; launched from Python they cost more than they compute.
Replaying a captured graph launches them all at once. Inputs live in static
buffers, which the runner fills on the device before each replay; a batch is
padded up to its bucket with rows that write no KV (slot -1), attend to one
dummy key, and whose logits are dropped. Every graph writes its logits into the
first rows of one buffer (a replay's logits are valid until the next replay, which
the scheduler's order guarantees: a step's sampler is queued before the next
forward), so graphs cost their intermediates in one shared pool and no logits each.

With cascade attention each bucket has two graphs: plain decode, and decode
over the batch's cascade groups. The runner picks per step (the scheduler names
groups only where they pay), so a batch without groups runs exactly the kernels
it would without cascade.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from sgl_compile.codegen import LOGITS_OUT

if TYPE_CHECKING:
    from sgl_compile.runtime.model_runner import ModelRunner

log = logging.getLogger(__name__)


def batch_size_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 256, of 64 above (and max_bs itself). Above 256 a decode step
    is mostly GEMMs over many rows and KV reads, so padding up to 63 rows costs little: 12 graphs from
    320 to 1024 instead of 96 (each one's capture and pool)."""
    small = [b for b in (1, 2, 4, 8) if b <= max_bs] + list(range(16, min(max_bs, 256) + 1, 8))
    return sorted(set(small + list(range(320, max_bs + 1, 64)) + [max_bs]))


def graph_keys(max_bs: int, cascade: bool) -> list[tuple[int, bool]]:
    """(bucket, with cascade groups) of every graph captured, largest first; a batch of one has no group,
    so no cascade graph."""
    modes = (False, True) if cascade else (False,)
    return [(bs, c) for bs in reversed(batch_size_buckets(max_bs)) for c in modes if bs > 1 or not c]


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        # No reference to the runner, which holds this: the cycle would keep its KV pool until a collection.
        self.empty = runner._empty
        self.buckets = batch_size_buckets(min(max_bs, runner.table.table.shape[0]))
        self.max_bs = self.buckets[-1]
        device = runner.device
        # Every bucket's graph reads prefixes of these buffers; kv_indices holds the whole batch's keys.
        self.max_kv = self.max_bs * runner.table.table.shape[1]
        i64 = {"dtype": torch.int64, "device": device}
        self.input_ids = torch.zeros(self.max_bs, **i64)
        self.positions = torch.zeros(self.max_bs, **i64)
        self.slot_mapping = torch.full((self.max_bs,), -1, **i64)
        self.qo_indptr = torch.arange(self.max_bs + 1, **i64)
        self.kv_indptr = torch.arange(self.max_bs + 1, **i64)  # one key per padding row
        self.kv_indices = torch.zeros(self.max_kv, **i64)  # padding rows read slot 0: harmless
        self.logits_indices = torch.arange(self.max_bs, **i64)
        self.modes = (False, True) if runner.cascade else (False,)  # graphs without / with groups
        self.one_to_max = torch.arange(1, self.max_bs + 1, **i64)  # padding rows' cascade groups
        # Cascade: every row its own group unless the batch says otherwise (padding rows stay alone).
        self.cascade_indptr = torch.arange(self.max_bs + 1, **i64)
        self.shared_len = torch.zeros(self.max_bs, **i64)
        attention = runner.attention  # plans each replay where flashinfer runs decode
        self.attention = attention if attention is not None and attention.decode_enabled else None
        if self.attention is not None:
            self.attention.reserve_graphs(self.max_bs, self.max_kv)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # by (bucket, with groups)
        c = runner.compiled
        self.logits = torch.empty((self.max_bs, c.config.vocab_size), dtype=c.dtype, device=device)
        self.pool = None
        self._capture(runner)

    def _inputs(self, bs: int, cascade: bool) -> dict[str, Tensor]:
        empty = self.empty
        return {
            "input_ids": self.input_ids[:bs],
            "positions": self.positions[:bs],
            "slot_mapping": self.slot_mapping[:bs],
            "qo_indptr": self.qo_indptr[: bs + 1],
            "kv_indptr": self.kv_indptr[: bs + 1],
            "kv_indices": self.kv_indices,
            "cascade_indptr": self.cascade_indptr[: bs + 1] if cascade else empty,
            "shared_len": self.shared_len[:bs] if cascade else empty,
            "logits_indices": self.logits_indices[:bs],
        }

    def _capture(self, runner: ModelRunner) -> None:
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            keys = graph_keys(self.max_bs, len(self.modes) > 1)
            for bs, cascade in tqdm(keys, desc="capturing CUDA graphs", unit="graph"):
                inputs = self._inputs(bs, cascade)
                if self.attention is not None:  # capture with every row on one key; replays re-plan
                    self.attention.plan_graph(bs, list(range(bs + 1)), self.kv_indices)
                inputs[LOGITS_OUT] = self.logits[:bs]
                for _ in range(2):  # compile kernels and settle allocations outside the capture
                    runner.run_program(inputs)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    logits = runner.run_program(inputs)
                if logits.data_ptr() != self.logits.data_ptr():  # (its shape the launchers checked)
                    raise RuntimeError(f"decode graph {bs}: the program's logits are not the shared buffer")
                self.pool = graph.pool()
                self.graphs[bs, cascade] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info(
            "captured %d CUDA graphs (batch sizes %d..%d%s) in %.1fs",
            len(self.graphs), self.buckets[0], self.max_bs, ", plain and cascade" if len(self.modes) > 1 else "",
            time.perf_counter() - start,
        )  # fmt: skip

    def bucket(self, n: int, n_kv: int) -> int | None:
        """The bucket a decode batch of n requests and n_kv keys replays, or None (run eagerly)."""
        if n > self.max_bs or n_kv + self.max_bs > self.max_kv:
            return None
        return next(x for x in self.buckets if x >= n)

    def inputs(self, bs: int, cascade: bool) -> dict[str, Tensor]:
        """The static buffers bucket bs reads (with or without groups); the runner fills them (padding
        rows included) before `replay`."""
        return self._inputs(bs, cascade)

    def set_groups(self, bs: int, cascade_indptr: Tensor, shared_len: Tensor) -> None:
        b = shared_len.shape[0]
        self.cascade_indptr[: b + 1].copy_(cascade_indptr)
        self.cascade_indptr[b + 1 : bs + 1].copy_(self.one_to_max[b:bs])  # padding rows: alone
        self.shared_len[:b].copy_(shared_len)
        self.shared_len[b:bs].zero_()

    def replay(self, bs: int, n: int, cascade: bool, host_kv_indptr: list[int] | None = None) -> Tensor:
        """Logits of the batch's n rows (the shared buffer's: valid until the next replay); host_kv_indptr
        (the real rows') where flashinfer plans."""
        if self.attention is not None:
            kvp = host_kv_indptr
            self.attention.plan_graph(
                bs, kvp + list(range(kvp[-1] + 1, kvp[-1] + 1 + bs - n)), self.kv_indices
            )
        self.graphs[bs, cascade].replay()
        return self.logits[:n]
