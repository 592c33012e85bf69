"""Model runner: turns a scheduled batch into the compiled program's inputs and runs it.

A batch is a list of (request, number of new tokens): an extend chunk of a
prompt, or one token of decode; both are the same shape to the program (ragged
queries over each request's slots in the request-to-token table).

On CUDA, decode batches replay a CUDA graph captured per batch-size bucket
(`cuda_graphs.py`); everything else runs eagerly.

With cascade attention on, a decode batch names its groups of requests that
share a cached prefix (consecutive in the batch; the scheduler forms them), so
that attention reads each group's shared KV once; otherwise those inputs are
empty.

Tokens sampled by a step that is still running are not known on the host when
the next step is built: the request holds a placeholder (-1 - i) and the input
is read on the device from row i of the future-token buffer, which the sampler
of the earlier step fills.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from sgl_compile.driver import CompiledModel
from sgl_compile.errors import SglcError
from sgl_compile.runtime.kv_pool import KVPool, ReqToTokenPool, to_device
from sgl_compile.runtime.request import Req


@dataclass
class ForwardBatch:
    """The program's per-step inputs (see CompiledModel)."""

    input_ids: Tensor
    positions: Tensor
    slot_mapping: Tensor
    qo_indptr: Tensor
    kv_indptr: Tensor
    kv_indices: Tensor
    cascade_indptr: Tensor  # [B + 1] group boundaries (trailing groups empty), or empty: no groups
    shared_len: Tensor  # [B] KV slots each request shares with its group, or empty
    logits_indices: Tensor
    # qo_indptr / kv_indptr as the host built them: what a planning attention backend reads (no sync)
    host_qo_indptr: list[int] = field(default_factory=list)
    host_kv_indptr: list[int] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        """One query per request (every scheduled request computes at least one token)."""
        return self.input_ids.shape[0] == self.qo_indptr.shape[0] - 1

    def as_inputs(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("host_")}


@dataclass
class ScheduledReq:
    req: Req
    start: int  # first position computed this step (== req.kv_len before the step)
    length: int  # positions computed this step
    new_slots: list[int]
    logit_positions: list[int]  # positions whose logits are returned (last one may be the sampling row)
    # decode with cascade attention: (a key equal for the group's members, the KV slots they share)
    shared: tuple[object, int] | None = None

    @property
    def samples(self) -> bool:
        return self.start + self.length == self.req.seq_len


class ModelRunner:
    def __init__(
        self,
        compiled: CompiledModel,
        kv: KVPool,
        table: ReqToTokenPool,
        cuda_graph_max_bs: int = 256,
        disable_cuda_graph: bool = False,
        cascade: bool = False,
    ) -> None:
        self.compiled, self.kv, self.table = compiled, kv, table
        self.device = compiled.device
        self.cascade = cascade
        self.attention = compiled.attention  # a backend that plans each step (flashinfer), or None
        decode_backend = compiled.options.decode_attention_backend
        if cascade and decode_backend not in ("triton", "torch"):
            raise SglcError(f"--enable-cascade-attention needs triton decode attention, not {decode_backend}")
        self._empty = torch.empty(0, dtype=torch.int64, device=self.device)
        # Room for three steps of draws: one being built, one running, one being read back.
        self.future = torch.zeros(3 * table.table.shape[0] + 1, dtype=torch.int64, device=self.device)
        self._next_future = 0
        self.graphs = None
        if self.device.type == "cuda" and not disable_cuda_graph and cuda_graph_max_bs > 0:
            from sgl_compile.runtime.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, cuda_graph_max_bs)

    def alloc_future(self, n: int) -> list[int]:
        """Rows of the future-token buffer for n draws (a ring: rows are reused three steps later)."""
        size = self.future.shape[0]
        rows = [(self._next_future + i) % size for i in range(n)]
        self._next_future = (self._next_future + n) % size
        return rows

    def store_future(self, rows: list[int], tokens: Tensor) -> None:
        self.future.index_copy_(0, to_device(rows, self.device), tokens)

    def build(self, batch: list[ScheduledReq]) -> ForwardBatch:
        ids, pos, slots, logit_rows = [], [], [], []
        qo, kvp = [0], [0]
        for s in batch:
            req, end = s.req, s.start + s.length
            ids.extend(req.ids_between(s.start, end))
            pos.extend(range(s.start, end))
            slots.extend(s.new_slots)
            logit_rows.extend(qo[-1] + p - s.start for p in s.logit_positions)
            qo.append(qo[-1] + s.length)
            kvp.append(kvp[-1] + end)
        dev = self.device
        input_ids = to_device(ids, dev)
        if any(i < 0 for i in ids):  # draws of the running step: read them where its sampler put them
            input_ids = torch.where(input_ids < 0, self.future[(-1 - input_ids).clamp(min=0)], input_ids)
        rows = [s.req.row for s in batch]
        self.table.write_many(rows, [s.start for s in batch], [s.new_slots for s in batch])
        kv_indices = self.table.gather(rows, [s.start + s.length for s in batch])
        groups, shared = self._empty, self._empty
        if self.cascade and len(ids) == len(batch):
            groups, shared = self._groups(batch)
        return ForwardBatch(
            input_ids, to_device(pos, dev), to_device(slots, dev), to_device(qo, dev), to_device(kvp, dev),
            kv_indices, groups, shared, to_device(logit_rows, dev), qo, kvp,
        )  # fmt: skip

    def _groups(self, batch: list[ScheduledReq]) -> tuple[Tensor, Tensor]:
        """cascade_indptr / shared_len of a decode batch: runs of equal keys are groups, the rest alone."""
        keys = [s.shared[0] if s.shared is not None else s for s in batch]  # unshared: a key of its own
        indptr = [0] + [i for i in range(1, len(batch)) if keys[i] is not keys[i - 1]]
        shared = [s.shared[1] if s.shared is not None else 0 for s in batch]
        indptr += [len(batch)] * (len(batch) + 1 - len(indptr))
        return to_device(indptr, self.device), to_device(shared, self.device)

    @torch.no_grad()
    def forward(self, fb: ForwardBatch) -> Tensor:
        """Logits [len(logits_indices), vocab] as float32."""
        if self.graphs is not None and fb.is_decode and self.graphs.fits(fb):
            return self.graphs.replay(fb).float()
        if self.attention is not None:
            self.attention.plan(fb.host_qo_indptr, fb.host_kv_indptr, fb.kv_indices)
        return self.run_program(fb.as_inputs()).float()

    def run_program(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.compiled.runnable(k_cache=self.kv.k, v_cache=self.kv.v, **inputs)
