"""Model configuration: one frozen dataclass, read from HF `config.json` or GGUF metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sgl_compile.errors import SglcError

# HF `model_type` / GGUF `general.architecture` -> our architecture name.
ARCHITECTURE_ALIASES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling. `kind` is "llama3" (Llama 3.1+) or "linear"."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before rope
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise SglcError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """From a HF `config.json` dict (transformers 4.x and 5.x spellings)."""
        try:
            return cls._from_hf(hf)
        except KeyError as e:
            raise SglcError(f"config.json lacks required key {e}") from None

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
        """From GGUF metadata (llama.cpp key names) and the set of tensor names in the file."""
        try:
            return cls._from_gguf(meta, tensor_names)
        except KeyError as e:
            raise SglcError(f"GGUF metadata lacks required key {e}") from None

    @classmethod
    def _from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        arch = _architecture(hf.get("model_type", ""))
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            rope_scaling=_rope_scaling(rope),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )

    @classmethod
    def _from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
        arch = _architecture(meta.get("general.architecture", ""))
        p = f"{meta['general.architecture']}."
        hidden = meta[p + "embedding_length"]
        heads = meta[p + "attention.head_count"]
        scaling = meta.get(p + "rope.scaling.type")
        if "rope_freqs.weight" in tensor_names:
            raise SglcError(
                "GGUF files with a rope_freqs tensor (Llama 3.1 rope scaling) are not supported yet"
            )
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=meta.get(p + "vocab_size") or len(meta["tokenizer.ggml.tokens"]),
            hidden_size=hidden,
            intermediate_size=meta[p + "feed_forward_length"],
            num_layers=meta[p + "block_count"],
            num_heads=heads,
            num_kv_heads=meta.get(p + "attention.head_count_kv") or heads,
            head_dim=meta.get(p + "attention.key_length") or hidden // heads,
            rms_norm_eps=float(meta[p + "attention.layer_norm_rms_epsilon"]),
            rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
            max_position_embeddings=meta.get(p + "context_length", 8192),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            rope_scaling=_rope_scaling(
                {"rope_type": scaling, "factor": meta.get(p + "rope.scaling.factor", 1.0)}
                if scaling and scaling != "none"
                else {}
            ),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )


def _architecture(model_type: str) -> str:
    if model_type not in ARCHITECTURE_ALIASES:
        known = ", ".join(sorted(ARCHITECTURE_ALIASES))
        raise SglcError(f"unsupported model architecture {model_type!r} (supported: {known})")
    return ARCHITECTURE_ALIASES[model_type]


def _rope_scaling(rope: Mapping[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rope["factor"]))
    raise SglcError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")
