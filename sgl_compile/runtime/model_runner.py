"""Model runner: turns a scheduled batch into the compiled program's inputs and runs it.

A batch is a list of (request, number of new tokens): an extend chunk of a
prompt, or one token of decode; both are the same shape to the program (ragged
queries over each request's slots in the request-to-token table).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from sgl_compile.driver import CompiledModel
from sgl_compile.runtime.kv_pool import KVPool, ReqToTokenPool
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
    logits_indices: Tensor


@dataclass
class ScheduledReq:
    req: Req
    start: int  # first position computed this step (== req.kv_len before the step)
    length: int  # positions computed this step
    new_slots: list[int]
    logit_positions: list[int]  # positions whose logits are returned (last one may be the sampling row)

    @property
    def samples(self) -> bool:
        return self.start + self.length == self.req.seq_len


class ModelRunner:
    def __init__(self, compiled: CompiledModel, kv: KVPool, table: ReqToTokenPool) -> None:
        self.compiled, self.kv, self.table = compiled, kv, table
        self.device = compiled.device

    def build(self, batch: list[ScheduledReq]) -> ForwardBatch:
        ids, pos, slots, kv_indices, logit_rows = [], [], [], [], []
        qo, kvp = [0], [0]
        for s in batch:
            req, end = s.req, s.start + s.length
            self.table.write(req.row, s.start, s.new_slots)
            ids.extend(req.all_ids[s.start : end])
            pos.extend(range(s.start, end))
            slots.extend(s.new_slots)
            kv_indices.append(self.table.slots(req.row, end))
            logit_rows.extend(qo[-1] + p - s.start for p in s.logit_positions)
            qo.append(qo[-1] + s.length)
            kvp.append(kvp[-1] + end)

        def t(x: list[int]) -> Tensor:
            return torch.tensor(x, dtype=torch.int64, device=self.device)

        return ForwardBatch(t(ids), t(pos), t(slots), t(qo), t(kvp), torch.cat(kv_indices), t(logit_rows))

    @torch.no_grad()
    def forward(self, fb: ForwardBatch) -> Tensor:
        """Logits [len(logits_indices), vocab] as float32."""
        inputs = {f.name: getattr(fb, f.name) for f in fields(fb)}
        return self.compiled.program(k_cache=self.kv.k, v_cache=self.kv.v, **inputs).float()
