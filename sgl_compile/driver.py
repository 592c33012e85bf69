"""The compile driver: load a model, capture it, run the passes; hand the runtime a program.

The runtime asks this module for a `CompiledModel` and never sees a model class.
`sgl_compile.artifact` saves one to disk and loads it back without recompiling.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from sgl_compile.errors import SglcError
from sgl_compile.ir.capture import capture
from sgl_compile.models.config import ModelConfig
from sgl_compile.models.loading import DEFAULT_MODEL, load_model, resolve_dtype
from sgl_compile.passes import PassReport, check_method, pipeline, run_passes
from sgl_compile.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Which implementation of the paged attention op runs: the torch reference (any device, the CPU path),
# the Triton kernels (CUDA), or flashinfer's (CUDA, fp16 / bf16; planned once per step).
ATTENTION_BACKENDS = ("torch", "triton", "flashinfer")


@dataclass(frozen=True)
class CompileOptions:
    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str | None = None  # see passes.QUANTIZATION_METHODS
    attention_backend: str | None = None  # both phases' (None: by device, see validate)
    prefill_attention_backend: str | None = None  # extend steps' (None: attention_backend's choice)
    decode_attention_backend: str | None = None  # decode steps' (None: attention_backend's choice)


@dataclass
class CompiledModel:
    """program(input_ids, positions, k_cache, v_cache, slot_mapping, qo_indptr, kv_indptr, kv_indices,
    cascade_indptr, shared_len, logits_indices) -> logits [len(logits_indices), vocab]; k/v caches are
    [layers, slots, kv_heads, head_dim] (see `sglc::paged_attention` for the batch metadata)."""

    program: fx.GraphModule
    config: ModelConfig
    tokenizer: Tokenizer
    dtype: torch.dtype
    device: torch.device
    source: str
    reports: list[PassReport]
    options: CompileOptions
    _runnable: fx.GraphModule | None = dataclasses.field(default=None, repr=False)
    _attention: object | None = dataclasses.field(default=None, repr=False)

    @property
    def attention(self):
        """The attention backend's per-step planner (flashinfer's), or None when its kernels need no plan."""
        phases = {
            "prefill": self.options.prefill_attention_backend,
            "decode": self.options.decode_attention_backend,
        }
        if self._attention is None and "flashinfer" in phases.values():
            from sgl_compile.codegen.flashinfer_attention import FlashinferAttention

            c = self.config
            self._attention = FlashinferAttention(
                c.num_heads, c.num_kv_heads, c.head_dim, self.dtype, self.device,
                **{phase: name == "flashinfer" for phase, name in phases.items()},
            )  # fmt: skip
        return self._attention

    @property
    def runnable(self) -> fx.GraphModule:
        """The program as the runtime executes it: on CUDA with each op node bound to its kernel. A
        planning backend's program runs only after `attention.plan` for its batch (or use `run`)."""
        if self._runnable is None:
            if self.device.type == "cuda":
                from sgl_compile.codegen import bind_cuda_kernels

                overrides = {}
                if self.attention is not None:
                    overrides[torch.ops.sglc.paged_attention.default] = self.attention.paged_attention
                self._runnable = bind_cuda_kernels(self.program, overrides)
            else:
                self._runnable = self.program
        return self._runnable

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        """One forward of the program on `inputs` (its placeholders by name), planned first where the
        backend plans. Reads the batch layout back to the host: the runtime's steps plan from theirs."""
        if self.attention is not None:
            self.attention.plan(
                inputs["qo_indptr"].tolist(), inputs["kv_indptr"].tolist(), inputs["kv_indices"]
            )
        return self.runnable(**inputs)


def resolve_attention_backend(name: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """None: torch on CPU, triton on CUDA. On the H200 triton measured at least as fast as flashinfer
    end to end (qwen3 offline 22.3-23.2k vs 21.5-22.3k tok/s; its decode kernel faster in isolation)
    once its extend kernel stopped compiling per batch size (docs/benchmarks.md, 2026-12-03)."""
    if name is None:
        return "triton" if device.type == "cuda" else "torch"
    if name not in ATTENTION_BACKENDS:
        raise SglcError(f"unknown attention backend {name!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
    if name in ("triton", "flashinfer") and device.type != "cuda":
        raise SglcError(f"the {name} attention backend runs on CUDA; on CPU use --attention-backend torch")
    if name == "torch" and device.type == "cuda":
        raise SglcError("the torch attention backend is the CPU reference; on CUDA use triton or flashinfer")
    if name == "flashinfer":
        from sgl_compile.codegen import flashinfer_attention

        if dtype not in flashinfer_attention.DTYPES:
            raise SglcError(f"flashinfer attention runs in float16 / bfloat16, not {dtype}; use triton")
        if not flashinfer_attention.available():
            raise SglcError("--attention-backend flashinfer needs flashinfer: pip install flashinfer-python")
    return name


def prepare_device(device: torch.device) -> None:
    """On CUDA, the `sglc::` ops run as Triton kernels: register them (once) as the ops' CUDA kernels."""
    if device.type == "cuda":
        from sgl_compile.codegen import register_cuda_kernels

        register_cuda_kernels()


def validate(options: CompileOptions) -> CompileOptions:
    """Refuse bad option values before any loading; fill in the backend."""
    check_method(options.quantization)
    dtype, device = resolve_dtype(options.dtype), torch.device(options.device)
    base = options.attention_backend
    return dataclasses.replace(
        options,
        attention_backend=resolve_attention_backend(base, device, dtype),
        prefill_attention_backend=resolve_attention_backend(
            options.prefill_attention_backend or base, device, dtype
        ),
        decode_attention_backend=resolve_attention_backend(
            options.decode_attention_backend or base, device, dtype
        ),
    )


def compile_model(
    options: CompileOptions | None = None,
    observe: Callable[[str, fx.GraphModule], None] | None = None,
    **kwargs: object,
) -> CompiledModel:
    """Compile `options` (or CompileOptions(**kwargs)). `observe(label, gm)` sees the program as captured
    and after every pass (`sglc compile --print-ir`)."""
    options = validate(options or CompileOptions(**kwargs))
    device = torch.device(options.device)
    prepare_device(device)
    loaded = load_model(options.model, resolve_dtype(options.dtype), options.device)
    start = time.perf_counter()
    gm = capture(loaded.model, max_tokens=loaded.config.max_position_embeddings)
    reports = run_passes(gm, pipeline(options.quantization, loaded.tokenizer), observe)
    config, tokenizer, source = loaded.config, loaded.tokenizer, loaded.source
    # The weights the passes replaced (q/k/v and gate/up before merging, originals of quantized ones) are
    # held by reference cycles of the captured graph until a collection: free them now, before the
    # runtime sizes the KV pool from the free memory (8.6 of llama-3.1-8b's 24 GiB on the GPU).
    del loaded
    gc.collect()
    log.info("compiled %s in %.1fs: %s", source, time.perf_counter() - start, "; ".join(map(str, reports)))
    return CompiledModel(
        gm, config, tokenizer, resolve_dtype(options.dtype), device, source, reports, options
    )
