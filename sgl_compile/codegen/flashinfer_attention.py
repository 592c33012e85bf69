"""flashinfer paged attention: the `--attention-backend flashinfer` implementation of `sglc::paged_attention`.

flashinfer splits attention into a plan (on the host, once per step: how the batch's work is spread
over the GPU, written to a workspace) and a run per layer. The model runner plans each step before
it runs the program; the op's launcher here stores the new k/v and runs the planned wrapper on its
layer's cache. The KV pool [L, S, Hkv, D] is flashinfer's NHD layout at page size 1: layer l is
`cache[l]` seen as [S, 1, Hkv, D], a request's page list is its slot list, every last page holds one.

- decode (one query per request): `BatchDecodeWithPagedKVCacheWrapper`; under CUDA graphs one
  wrapper per batch-size bucket in flashinfer's graph mode (fixed buffers the plan rewrites in place,
  and a launch shape that does not depend on the batch's lengths), planned before each replay.
- extend (prefill over a cached prefix, mixed batches): `BatchPrefillWithPagedKVCacheWrapper`,
  causal with the mask aligned to each request's last key, as `sglc::paged_attention` defines it.

Either phase may be left to the triton kernels (`--decode-attention-backend triton`): its batches
are neither planned nor run here.

flashinfer computes in fp16 / bf16 only. Its kernels are JIT-built on first use for each (dtype,
head_dim) and cached under ~/.cache/flashinfer (FLASHINFER_WORKSPACE_BASE moves it).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from sgl_compile.codegen import attention as triton_attention
from sgl_compile.codegen.rope import store_new_kv

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 256 * 2**20  # split-KV partial outputs; flashinfer suggests 128 MiB, large batches use more
DTYPES = (torch.float16, torch.bfloat16)
PREFILL_BACKEND = "fa2"  # fa3 (Hopper) not tried yet: its JIT build is far heavier than fa2's ~10-15 s


def available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


def _host_int32(values: list[int]) -> Tensor:
    # Pinned: flashinfer copies these to the device without blocking; the host allocator keeps a
    # pinned block until the copy that read it has run.
    return torch.tensor(
        values, dtype=torch.int32, pin_memory=True
    )  # (.pin_memory() would first ask the driver)


class FlashinferAttention:
    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tensor_cores: bool | None = None,
        prefill: bool = True,
        decode: bool = True,
    ) -> None:
        import flashinfer

        if dtype not in DTYPES:
            raise ValueError(f"flashinfer attention runs in float16 / bfloat16, not {dtype}")
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.prefill_enabled, self.decode_enabled = prefill, decode  # the other phase runs the triton kernels
        self._flashinfer = flashinfer
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # GQA groups of >= 4 query heads per KV head decode faster on tensor cores (flashinfer's prefill
        # kernels); for groups of 2 neither won everywhere (CUDA cores up to batch 8; docs/benchmarks.md).
        self.tensor_cores = num_q_heads // num_kv_heads >= 4 if tensor_cores is None else tensor_cores
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.tensor_cores
        )
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=PREFILL_BACKEND
        )
        # Graph-mode decode wrappers share the page list (the plan copies a step's indices into it)
        # and the all-ones last-page lengths; each bucket has its own indptr. Sized by reserve_graphs.
        self._graph_indices = torch.zeros(0, dtype=torch.int32, device=device)
        self._ones = self._graph_indices
        self._graph_decode: dict[int, object] = {}
        self._host_ones = _host_int32([1] * 256)  # every request's last-page length, sliced per plan
        self._active = None
        self._planned: torch.cuda.Event | None = None
        self._default_scale = 1.0 / math.sqrt(head_dim)
        phases = [name for name, on in (("prefill", prefill), ("decode", decode)) if on]
        log.info(
            "flashinfer %s attention: %s head_dim %d kernels are JIT-built on first use (then cached under "
            "~/.cache/flashinfer)", " and ".join(phases), str(dtype).removeprefix("torch."), head_dim,
        )  # fmt: skip

    def _runs(self, decode: bool) -> bool:
        """Whether this phase is flashinfer's (else the triton kernels run it, unplanned)."""
        return self.decode_enabled if decode else self.prefill_enabled

    def _last_page_lens(self, batch: int) -> Tensor:
        # Page size 1: every last page holds one key. Never written after creation, so one pinned
        # tensor serves every plan (no pinned allocation per step).
        if self._host_ones.shape[0] < batch:
            self._host_ones = _host_int32([1] * (2 * batch))
        return self._host_ones[:batch]

    def _kwargs(self) -> dict:
        return {"q_data_type": self.dtype, "kv_data_type": self.dtype}

    def _wait_previous_plan(self) -> None:
        # Each wrapper stages its plan in one pinned buffer and copies it to the device asynchronously:
        # the next plan may only overwrite it once that copy ran. With overlap the step it belongs to is
        # already on the GPU, so this wait is ~free; without it a plan two steps ahead could race.
        if self._planned is not None:
            self._planned.synchronize()

    def _done_planning(self, wrapper: object) -> None:
        self._active = wrapper
        self._planned = torch.cuda.Event()
        self._planned.record()

    def plan(self, qo_indptr: list[int], kv_indptr: list[int], kv_indices: Tensor) -> None:
        """Plan an eager step: decode when every request has one query, else a causal extend."""
        batch = len(qo_indptr) - 1
        decode = qo_indptr[-1] == batch
        if not self._runs(decode):
            return
        self._wait_previous_plan()
        indices = kv_indices.to(torch.int32)
        last = self._last_page_lens(batch)
        if decode:
            self.decode.plan(
                _host_int32(kv_indptr), indices, last, self.num_q_heads, self.num_kv_heads, self.head_dim,
                1, **self._kwargs(),
            )  # fmt: skip
            self._done_planning(self.decode)
            return
        self.prefill.plan(
            _host_int32(qo_indptr), _host_int32(kv_indptr), indices, last, self.num_q_heads,
            self.num_kv_heads, self.head_dim, 1, causal=True, **self._kwargs(),
        )  # fmt: skip
        self._done_planning(self.prefill)

    def reserve_graphs(self, max_bs: int, max_kv_indices: int) -> None:
        """Room for the decode graphs' batches: up to max_bs requests holding max_kv_indices keys."""
        if not self._runs(decode=True):
            return
        self._graph_indices = torch.zeros(max_kv_indices, dtype=torch.int32, device=self.device)
        self._ones = torch.ones(max_bs, dtype=torch.int32, device=self.device)
        self._graph_decode.clear()

    def plan_graph(self, bs: int, kv_indptr: list[int], kv_indices: Tensor) -> None:
        """Plan the decode of bucket `bs` (kv_indptr over its padded rows) for its graph's capture or
        replay: the wrapper's buffers and workspace layout are the ones the graph captured."""
        if not self._runs(decode=True):
            return
        self._wait_previous_plan()
        wrapper = self._graph_decode.get(bs)
        if wrapper is None:
            wrapper = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=self.device),
                paged_kv_indices_buffer=self._graph_indices,
                paged_kv_last_page_len_buffer=self._ones[:bs],
            )  # fmt: skip
            self._graph_decode[bs] = wrapper
        n = kv_indptr[-1]
        wrapper.plan(
            _host_int32(kv_indptr), kv_indices[:n], self._last_page_lens(bs), self.num_q_heads,
            self.num_kv_heads, self.head_dim, 1, **self._kwargs(),
        )  # fmt: skip
        self._done_planning(wrapper)

    def paged_attention(
        self,
        q: Tensor,
        k: Tensor | None,
        v: Tensor | None,
        k_cache: Tensor,
        v_cache: Tensor,
        layer: int,
        slot_mapping: Tensor,
        qo_indptr: Tensor,
        kv_indptr: Tensor,
        kv_indices: Tensor,
        scale: float,
        cascade_indptr: Tensor | None = None,
        shared_len: Tensor | None = None,
        positions: Tensor | None = None,
        cos_sin_cache: Tensor | None = None,
    ) -> Tensor:
        """`sglc::paged_attention` through the step's plan (the batch metadata tensors are the plan's).
        Groups of a shared prefix are ignored: they name no different result. Unrotated q and k (with
        `positions`) are rotated and stored by `rope_store_kv` first."""
        if not self._runs(decode=q.shape[0] == qo_indptr.shape[0] - 1):
            return triton_attention.paged_attention(
                q, k, v, k_cache, v_cache, layer, slot_mapping, qo_indptr, kv_indptr, kv_indices, scale,
                cascade_indptr, shared_len, positions, cos_sin_cache,
            )  # fmt: skip
        if self._active is None:
            raise RuntimeError("flashinfer attention ran before the step was planned")
        q = store_new_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, layer, slot_mapping)
        kv = (k_cache[layer].unsqueeze(1), v_cache[layer].unsqueeze(1))
        # The plan's softmax scale is 1/sqrt(head_dim); q_scale multiplies it into the program's.
        return self._active.run(q, kv, q_scale=scale / self._default_scale)
