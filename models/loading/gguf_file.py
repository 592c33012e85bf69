"""GGUF files: metadata -> config and tokenizer; tensors dequantized with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K of Llama-architecture models
(it pairs rotary dims as interleaved (2i, 2i+1) instead of HF's halves (i, i+D/2)).
We undo that so the weights match the HF layout our `sglc::rope` expects.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sgl_compile.errors import SglcError
from sgl_compile.models.config import ModelConfig
from sgl_compile.models.loading.checkpoint import Checkpoint
from sgl_compile.tokenizer import tokenizer_from_gguf

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None if the model has no use for it."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation: (heads, D/2, 2) row order -> (heads, 2, D/2)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` over a complete, parseable file, or a one-line SglcError."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
        if end > path.stat().st_size:
            raise ValueError(f"truncated: tensor data ends at byte {end}, file has {path.stat().st_size}")
        return reader
    except Exception as e:  # the reader raises ValueError/IndexError/... on damaged files
        raise SglcError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _metadata(reader: Any) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items()}


def open_gguf(path: Path) -> Checkpoint:
    import gguf

    if not path.is_file():
        raise SglcError(f"GGUF file not found: {path}")
    reader = read_gguf(path)
    meta = _metadata(reader)
    config = ModelConfig.from_gguf(meta, {t.name for t in reader.tensors})
    permute = meta["general.architecture"] == "llama"
    heads = {"self_attn.q_proj.weight": config.num_heads, "self_attn.k_proj.weight": config.num_kv_heads}
    wanted = [(t, name) for t in reader.tensors if (name := hf_name(t.name))]

    def tensors(device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
        for t, name in wanted:
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise SglcError(
                    f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}"
                ) from None
            w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
            if permute and (n := heads.get(name.split(".", 3)[-1])):
                w = unpermute_rotary(w, n)
            # F32 tensors are read-only views of the memory-mapped file: copy those.
            w = np.ascontiguousarray(w, dtype=np.float32)
            yield name, torch.from_numpy(w if w.flags.writeable else w.copy())

    return Checkpoint(str(path), config, tokenizer_from_gguf(meta), len(wanted), tensors)
