"""`dummy:NAME`: random weights of a real model's shape, for speed measurements.

Speed does not depend on the values, and real weights of these sizes cannot be
shipped to a benchmark machine. A pool of normal values is drawn on the CPU from a
fixed seed (in float32) and every tensor is an index pattern into it, expanded on the
target device: a few seconds for 8B parameters, the same model on every device and
at every dtype (a bfloat16 model is the float32 one rounded), so a GPU run can be
checked against the CPU reference.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sgl_compile.errors import SglcError
from sgl_compile.models import model_class
from sgl_compile.models.config import ModelConfig, RopeScaling
from sgl_compile.models.loading.checkpoint import Checkpoint
from sgl_compile.tokenizer import byte_tokenizer

_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

DUMMY_CONFIGS: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        "llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0, 131072, False,
        rope_scaling=RopeScaling("llama3", 8.0, **_LLAMA3_ROPE), bos_token_id=256, eos_token_ids=(257,),
    ),
    "llama-3.2-1b": ModelConfig(
        "llama", 128256, 2048, 8192, 16, 32, 8, 64, 1e-5, 500000.0, 131072, True,
        rope_scaling=RopeScaling("llama3", 32.0, **_LLAMA3_ROPE), bos_token_id=256, eos_token_ids=(257,),
    ),
    "qwen2.5-0.5b": ModelConfig(
        "qwen2", 151936, 896, 4864, 24, 14, 2, 64, 1e-6, 1000000.0, 32768, True,
        attention_bias=True, bos_token_id=256, eos_token_ids=(257,),
    ),
    "qwen3-0.6b": ModelConfig(
        "qwen3", 151936, 1024, 3072, 28, 16, 8, 128, 1e-6, 1000000.0, 40960, True,
        qk_norm=True, bos_token_id=256, eos_token_ids=(257,),
    ),
    "smollm2-135m": ModelConfig(
        "llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 100000.0, 8192, True, bos_token_id=256, eos_token_ids=(257,),
    ),
}  # fmt: skip


_POOL = 1_048_573  # a prime: a stride coprime to it walks the whole pool before repeating
_STRIDE = 7
_CHUNK = 1 << 26


def _expand(pool: Tensor, shape: torch.Size, offset: int, dtype: torch.dtype) -> Tensor:
    """Element k of the tensor is pool[(offset + 7 k) mod P], built in chunks to bound the index memory."""
    out = torch.empty(shape, dtype=dtype, device=pool.device)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        k = torch.arange(start, min(start + _CHUNK, flat.numel()), device=pool.device)
        flat[start : start + k.numel()] = pool[(offset + _STRIDE * k) % _POOL]
    return out


def open_dummy(name: str, seed: int = 0) -> Checkpoint:
    if name not in DUMMY_CONFIGS:
        raise SglcError(f"unknown dummy model {name!r} (known: {', '.join(DUMMY_CONFIGS)})")
    config = DUMMY_CONFIGS[name]
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in model_class(config)(config).named_parameters()}

    def tensors(device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
        pool = torch.empty(_POOL).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed)).to(device)
        for i, (n, shape) in enumerate(shapes.items()):
            if n.endswith("norm.weight"):
                yield n, torch.ones(shape, device=device, dtype=dtype)
            else:
                yield n, _expand(pool, shape, offset=7919 * i, dtype=dtype)

    return Checkpoint(f"dummy:{name}", config, byte_tokenizer(config.vocab_size), len(shapes), tensors)
