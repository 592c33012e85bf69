"""Model runner: turns a scheduled batch into the compiled program's inputs and runs it.

A batch is a list of (request, number of new tokens): an extend chunk of a
prompt, or one token of decode; both are the same shape to the program (ragged
queries over each request's slots in the request-to-token table).

A decode batch's inputs are built on the device by one kernel from one packed
copy of the host's per-request state (`codegen/decode_inputs.py`); on CUDA it
then replays a CUDA graph captured per batch-size bucket (`cuda_graphs.py`).
Everything else is built op by op and runs eagerly.

With cascade attention on, a decode batch may name groups of requests that
share a cached prefix (consecutive in the batch; the scheduler forms them where
they pay), so that attention reads each group's shared KV once; a batch that
names none runs plain decode, its inputs empty.

Tokens sampled by a step that is still running are not known on the host when
the next step is built: the request holds a placeholder (-1 - i) and the input
is read on the device from row i of the future-token buffer, which the sampler
of the earlier step fills.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from sgl_compile.codegen.decode_inputs import decode_inputs, decode_inputs_reference
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

    def as_inputs(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("host_")}


@dataclass(slots=True)  # (built for every running request every step)
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
            raise SglcError(f"--cascade-attention on needs triton decode attention, not {decode_backend}")
        self._empty = torch.empty(0, dtype=torch.int64, device=self.device)
        # Room for three steps of draws: one being built, one running, one being read back.
        self.future = torch.zeros(3 * table.table.shape[0] + 1, dtype=torch.int64, device=self.device)
        self._next_future = 0
        # cascade groups of the last decode batch (host lists, their tensors); the bucket whose static
        # buffers hold them
        self._last_groups: tuple[list[int], list[int], Tensor, Tensor] | None = None
        self._graph_groups: tuple[int, Tensor] | None = None
        self.graphs = None
        if self.device.type == "cuda" and not disable_cuda_graph and cuda_graph_max_bs > 0:
            from sgl_compile.runtime.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, cuda_graph_max_bs)

    def alloc_future(self, n: int) -> list[int]:
        """Rows of the future-token buffer for n draws (a ring: rows are reused three steps later);
        consecutive but for the wrap, so built from two ranges."""
        size, first = self.future.shape[0], self._next_future
        self._next_future = (first + n) % size
        return [*range(first, min(first + n, size)), *range(first + n - size)]

    def store_future(self, rows: list[int], tokens: Tensor) -> None:
        """tokens into the rows alloc_future gave: consecutive but for the ring's wrap, so slices
        (device copies, no index list to send)."""
        wrap = min(len(rows), self.future.shape[0] - rows[0]) if rows else 0
        if wrap:
            self.future[rows[0] : rows[0] + wrap].copy_(tokens[:wrap])
        if wrap < len(rows):
            self.future[: len(rows) - wrap].copy_(tokens[wrap:])

    def run(self, batch: list[ScheduledReq]) -> Tensor:
        """Queue one step's forward; its logits [rows, vocab] in the program's dtype (nothing is read
        back). Decode steps (one token and one logits row per request) build their inputs on the
        device and replay a CUDA graph where one fits; other steps run eagerly."""
        if all(s.length == 1 and s.logit_positions == [s.start] for s in batch):
            return self._decode(batch)
        return self.forward(self.build(batch))

    def _decode(self, batch: list[ScheduledReq]) -> Tensor:
        n = len(batch)
        tokens, kv_lens, slots, rows = [], [], [], []
        host_rows = self.table.host
        # (per request per step at up to 1024 requests: inlined, ReqToTokenPool.note's host write included)
        for s in batch:
            req, start, slot = s.req, s.start, s.new_slots[0]
            prompt = req.prompt_ids  # the row's input: all_ids[start]
            tokens.append(prompt[start] if start < len(prompt) else req.output_ids[start - len(prompt)])
            kv_lens.append(start + 1)
            slots.append(slot)
            rows.append(req.row)
            host = host_rows[req.row]
            if start < len(host):
                host[start] = slot
            else:
                host.append(slot)
        meta = to_device(tokens + kv_lens + slots + rows, self.device).view(4, n)
        n_kv = sum(kv_lens)
        grouped = self.cascade and any(s.shared is not None for s in batch)
        bs = self.graphs.bucket(n, n_kv) if self.graphs is not None else None
        if bs is not None:
            inputs = self.graphs.inputs(bs, grouped)
        else:
            i64 = {"dtype": torch.int64, "device": self.device}
            inputs = {
                "input_ids": torch.empty(n, **i64), "positions": torch.empty(n, **i64),
                "slot_mapping": torch.empty(n, **i64), "qo_indptr": torch.arange(n + 1, **i64),
                "kv_indptr": torch.empty(n + 1, **i64), "kv_indices": torch.empty(n_kv, **i64),
                "cascade_indptr": self._empty, "shared_len": self._empty,
                "logits_indices": torch.arange(n, **i64),
            }  # fmt: skip
        fill = decode_inputs if self.device.type == "cuda" else decode_inputs_reference
        fill(
            meta, self.table.table, self.future, inputs["input_ids"], inputs["positions"],
            inputs["slot_mapping"], inputs["kv_indptr"], inputs["kv_indices"],
        )  # fmt: skip
        if grouped:
            groups, shared = self._groups(batch)
            if bs is None:
                inputs["cascade_indptr"], inputs["shared_len"] = groups, shared
            elif (
                self._graph_groups is None
                or self._graph_groups[0] != bs
                or self._graph_groups[1] is not groups
            ):
                self.graphs.set_groups(bs, groups, shared)
                self._graph_groups = (bs, groups)  # (else the static buffers hold them still)
        host_kvp = None
        if self.attention is not None:  # a planning backend reads the batch's layout from the host
            host_kvp = [0, *itertools.accumulate(kv_lens)]
        if bs is not None:
            return self.graphs.replay(bs, n, grouped, host_kvp)
        if self.attention is not None:
            self.attention.plan(list(range(n + 1)), host_kvp, inputs["kv_indices"])
        return self.run_program(inputs)

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
        # (no cascade groups: a decode batch goes through _decode, a mixed one is formed without them)
        return ForwardBatch(
            input_ids, to_device(pos, dev), to_device(slots, dev), to_device(qo, dev), to_device(kvp, dev),
            kv_indices, self._empty, self._empty, to_device(logit_rows, dev), qo, kvp,
        )  # fmt: skip

    def _groups(self, batch: list[ScheduledReq]) -> tuple[Tensor, Tensor]:
        """cascade_indptr / shared_len of a decode batch: runs of equal keys are groups, the rest alone.
        The tensors of the previous batch when its groups were the same (most steps)."""
        keys = [s.shared[0] if s.shared is not None else s.req for s in batch]  # unshared: a key of its own
        indptr = [0] + [i for i in range(1, len(batch)) if keys[i] is not keys[i - 1]]
        shared = [s.shared[1] if s.shared is not None else 0 for s in batch]
        indptr += [len(batch)] * (len(batch) + 1 - len(indptr))
        last = self._last_groups
        if last is not None and last[0] == indptr and last[1] == shared:
            return last[2], last[3]
        groups = (to_device(indptr, self.device), to_device(shared, self.device))
        self._last_groups = (indptr, shared, *groups)
        return groups

    def forward(self, fb: ForwardBatch) -> Tensor:
        """Run a built batch eagerly: logits [len(logits_indices), vocab]."""
        if self.attention is not None:
            self.attention.plan(fb.host_qo_indptr, fb.host_kv_indptr, fb.kv_indices)
        return self.run_program(fb.as_inputs())

    @torch.no_grad()
    def run_program(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.compiled.runnable(k_cache=self.kv.k, v_cache=self.kv.v, **inputs)
