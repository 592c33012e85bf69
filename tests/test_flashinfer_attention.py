"""flashinfer paged attention (codegen/flashinfer_attention.py) against the reference `sglc::paged_attention`.

GPU only (flashinfer has no CPU path): ragged decode and extend batches in bf16 / fp16 over randomly
permuted slots, eager and through a CUDA graph re-planned between replays; and the engine with
`--attention-backend flashinfer` against the triton backend on the same random weights.
"""

from __future__ import annotations

import pytest
import torch

from sgl_compile.ir import ops
from tests.test_attention_kernels import TOL, _batch

flashinfer = pytest.importorskip("flashinfer", reason="flashinfer is not installed")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="flashinfer needs CUDA"),
]

from sgl_compile.codegen.flashinfer_attention import FlashinferAttention  # noqa: E402


def _backend(batch: dict, tensor_cores: bool | None = None) -> FlashinferAttention:
    q, k = batch["q"], batch["k"]
    return FlashinferAttention(q.shape[1], k.shape[1], q.shape[2], q.dtype, q.device, tensor_cores)


def _reference(batch: dict, caches: list | None = None) -> torch.Tensor:
    """The reference on CPU copies of `batch`; `caches` gets its k/v caches after it stored the new k/v."""
    args = {n: x.cpu().clone() if isinstance(x, torch.Tensor) else x for n, x in batch.items()}
    out = ops.paged_attention(**args)
    if caches is not None:
        caches += [args["k_cache"], args["v_cache"]]
    return out


def _run(fa: FlashinferAttention, batch: dict) -> torch.Tensor:
    args = {n: batch[n] for n in ("q", "k", "v", "k_cache", "v_cache", "layer", "slot_mapping", "qo_indptr",
                                  "kv_indptr", "kv_indices", "scale")}  # fmt: skip
    return fa.paged_attention(**args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads,head_dim", [((8, 4), 128), ((3, 3), 64), ((8, 2), 128), ((1, 8), 64)])
@pytest.mark.parametrize("tensor_cores", [None, False, True])
def test_matches_reference(dtype, heads, head_dim, tensor_cores):
    """Decode (long and short contexts) and extend (chunks over cached prefixes, a mixed batch with a
    one-token request); the new k/v land in the cache exactly as the reference stores them."""
    for seed, (prefix_lens, new_lens) in enumerate([
        ([4000, 17, 900, 0], [1, 1, 1, 1]),
        ([1000, 0, 37], [300, 129, 1]),
        ([0], [2100]),
        ([5, 300], [1, 64]),
    ]):  # fmt: skip
        batch = _batch(seed, prefix_lens, new_lens, *heads, head_dim, dtype, device="cuda")
        caches = []
        expected, fa = _reference(batch, caches), _backend(batch, tensor_cores)
        fa.plan(batch["qo_indptr"].tolist(), batch["kv_indptr"].tolist(), batch["kv_indices"])
        out = _run(fa, batch)
        assert out.shape == batch["q"].shape and out.dtype == dtype
        torch.testing.assert_close(out.cpu(), expected, **TOL[dtype])
        assert torch.equal(batch["k_cache"].cpu(), caches[0]) and torch.equal(
            batch["v_cache"].cpu(), caches[1]
        )


def test_layers_share_one_plan():
    """One plan per step serves every layer: layer 0 and layer 1 of the same batch each match."""
    batch = _batch(3, [200, 50], [1, 1], 2, 4, 128, torch.bfloat16, device="cuda")
    fa = _backend(batch)
    fa.plan(batch["qo_indptr"].tolist(), batch["kv_indptr"].tolist(), batch["kv_indices"])
    for layer in (0, 1):
        batch["layer"] = layer
        torch.testing.assert_close(_run(fa, batch).cpu(), _reference(batch), **TOL[torch.bfloat16])


@pytest.mark.parametrize("tensor_cores", [False, True])
def test_cuda_graph_replanned_between_replays(tensor_cores):
    """A decode graph captured on one batch of a bucket, replayed after planning others of the same
    size with different lengths (as DecodeGraphs does), gives each batch's reference output."""
    shapes = [[100, 50, 7, 0], [3000, 1, 20, 511], [1, 1, 1, 1]]
    batches = [_batch(s, p, [1] * 4, 2, 4, 128, torch.bfloat16, device="cuda") for s, p in enumerate(shapes)]
    slots = max(b["k_cache"].shape[1] for b in batches)
    fa = _backend(batches[0], tensor_cores)
    fa.reserve_graphs(max_bs=8, max_kv_indices=4000)
    # static inputs, sized for every batch
    static = {n: x.clone() if isinstance(x, torch.Tensor) else x for n, x in batches[0].items()}
    for name in ("k_cache", "v_cache"):
        static[name] = torch.zeros(2, slots, 2, 128, dtype=torch.bfloat16, device="cuda")
    static["kv_indices"] = torch.zeros(4000, dtype=torch.int64, device="cuda")

    def load(batch: dict) -> None:
        for name in ("q", "k", "v", "slot_mapping"):
            static[name].copy_(batch[name])
        for name in ("k_cache", "v_cache"):
            static[name].zero_()
            static[name][:, : batch[name].shape[1]].copy_(batch[name])
        n = batch["kv_indices"].numel()
        static["kv_indices"][:n].copy_(batch["kv_indices"])
        fa.plan_graph(4, batch["kv_indptr"].tolist(), static["kv_indices"])

    load(batches[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _run(fa, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _run(fa, static)
    for batch in batches[1:] + batches[:1]:
        load(batch)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.cpu(), _reference(batch), **TOL[torch.bfloat16])


def test_a_phase_left_to_triton():
    """prefill on flashinfer, decode on the triton kernels (`--prefill-attention-backend flashinfer`): a decode batch needs no
    plan and matches the reference; an extend batch is planned and matches too."""
    decode = _batch(4, [300, 7], [1, 1], 2, 4, 128, torch.bfloat16, device="cuda")
    extend = _batch(5, [300, 0], [40, 9], 2, 4, 128, torch.bfloat16, device="cuda")
    fa = FlashinferAttention(8, 2, 128, torch.bfloat16, decode["q"].device, decode=False)
    fa.plan(decode["qo_indptr"].tolist(), decode["kv_indptr"].tolist(), decode["kv_indices"])
    assert fa._active is None
    torch.testing.assert_close(_run(fa, decode).cpu(), _reference(decode), **TOL[torch.bfloat16])
    fa.plan(extend["qo_indptr"].tolist(), extend["kv_indptr"].tolist(), extend["kv_indices"])
    torch.testing.assert_close(_run(fa, extend).cpu(), _reference(extend), **TOL[torch.bfloat16])


def test_run_before_plan_is_an_error():
    batch = _batch(0, [10], [1], 1, 2, 64, torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="planned"):
        _run(_backend(batch), batch)


def test_engine_matches_triton_backend():
    """SmolLM2 shape, bf16, graphs and overlap on: flashinfer's greedy tokens are triton's up to the
    first position where the two backends' logits (each rounded through bf16) could reorder the top 2."""
    from sgl_compile.runtime.engine import Engine

    prompts = [[(7 * i + 13 * j) % 49152 for j in range(8 + 9 * i)] for i in range(16)]
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True, "return_logprob": True}
    outs = {}
    backends = {
        "triton": {},
        "flashinfer": {"attention_backend": "flashinfer"},
        "hybrid": {"prefill_attention_backend": "flashinfer"},
    }
    for name, flags in backends.items():
        with Engine(model="dummy:smollm2-135m", dtype="bfloat16", device="cuda", max_total_tokens=16384,
                    context_length=1024, **flags) as e:  # fmt: skip
            opts = e.compiled.options
            phases = {"triton": ("triton", "triton"), "flashinfer": ("flashinfer", "flashinfer"),
                      "hybrid": ("flashinfer", "triton")}  # fmt: skip
            assert (opts.prefill_attention_backend, opts.decode_attention_backend) == phases[name]
            outs[name] = e.generate(input_ids=prompts, sampling_params=params)
    for other in ("flashinfer", "hybrid"):
        _agree_up_to_near_ties(outs["triton"], outs[other], len(prompts))


def _agree_up_to_near_ties(a: list[dict], b: list[dict], n: int) -> None:
    agree = 0
    for t, f in zip(a, b, strict=True):
        same = next(
            (i for i, (a, b) in enumerate(zip(t["output_ids"], f["output_ids"], strict=True)) if a != b), None
        )
        agree += same is None
        if same is not None:  # only a near tie may split them: their logprobs there must be close
            lt, lf = (
                t["meta_info"]["output_token_logprobs"][same],
                f["meta_info"]["output_token_logprobs"][same],
            )
            assert abs(lt[0] - lf[0]) < 0.1, (same, lt, lf)
    assert agree >= n - 2
