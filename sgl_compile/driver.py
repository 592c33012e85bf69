"""The compile driver: load a model, capture it, run the passes; hand the runtime a program.

The runtime asks this module for a `CompiledModel` and never sees a model class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from sgl_compile.ir.capture import capture
from sgl_compile.models.config import ModelConfig
from sgl_compile.models.loading import DEFAULT_MODEL, load_model, resolve_dtype
from sgl_compile.passes import DEFAULT_PASSES, PassReport, run_passes
from sgl_compile.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class CompiledModel:
    """program(input_ids, positions, k_cache, v_cache, slot_mapping, qo_indptr, kv_indptr, kv_indices,
    logits_indices) -> logits [len(logits_indices), vocab]; k/v caches are [layers, slots, kv_heads, head_dim]."""

    program: fx.GraphModule
    config: ModelConfig
    tokenizer: Tokenizer
    dtype: torch.dtype
    device: torch.device
    source: str
    reports: list[PassReport]


def compile_model(
    model: str = DEFAULT_MODEL,
    dtype: str = "float32",
    device: str = "cpu",
    observe: Callable[[str, fx.GraphModule], None] | None = None,
) -> CompiledModel:
    """`observe(label, gm)` sees the program as captured and after every pass (`sglc compile --print-ir`)."""
    loaded = load_model(model, resolve_dtype(dtype), device)
    start = time.perf_counter()
    gm = capture(loaded.model, max_tokens=loaded.config.max_position_embeddings)
    reports = run_passes(gm, DEFAULT_PASSES, observe)
    log.info(
        "compiled %s in %.1fs: %s", loaded.source, time.perf_counter() - start, "; ".join(map(str, reports))
    )
    return CompiledModel(
        gm,
        loaded.config,
        loaded.tokenizer,
        resolve_dtype(dtype),
        torch.device(device),
        loaded.source,
        reports,
    )
