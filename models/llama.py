"""Llama-family decoder: Llama 2/3 (incl. SmolLM2), Qwen2 (qkv bias), and the base of Qwen3.

Plain math on `sglc::` ops and `aten.linear`; no serving logic. Tokens are packed:
`input_ids` and `positions` are [T] for one sequence, and per-run batch state
will reach attention through the runtime's forward context once lowered.
Parameter names follow HF checkpoints so safetensors load without renaming.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sgl_compile import ir
from sgl_compile.models.config import ModelConfig
from sgl_compile.models.rope import cos_sin_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return ir.rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def project_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Hook for per-head transforms of q and k before rope (Qwen3's q/k norm)."""
        return q, k

    def forward(self, x: Tensor, positions: Tensor, cos_sin: Tensor) -> Tensor:
        t, c = x.shape[0], self.cfg
        q = self.q_proj(x).view(t, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(t, c.num_kv_heads, c.head_dim)
        q, k = self.project_qk(q, k)
        q, k = ir.rope(q, k, positions, cos_sin)
        o = ir.attention(q, k, v, self.scale)
        return self.o_proj(o.view(t, c.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # gate and up stay separate linears here; the fusion pass merges them into one GEMM.
        return self.down_proj(ir.silu_and_mul(torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_cls: type[LlamaAttention]) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention_cls(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: Tensor, positions: Tensor, cos_sin: Tensor) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), positions, cos_sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_cls: type[LlamaAttention]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, attention_cls) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor, cos_sin: Tensor) -> Tensor:
        h = ir.embedding(input_ids, self.embed_tokens.weight)
        for layer in self.layers:
            h = layer(h, positions, cos_sin)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, self.attention_cls)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Derived from the config, not loaded: kept out of the state dict, fp32 always.
        self.register_buffer("cos_sin_cache", cos_sin_cache(cfg), persistent=False)

    def lm_head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute non-persistent buffers (after materialising a meta-device model)."""
        self.cos_sin_cache = cos_sin_cache(self.config, device)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Logits [T, vocab] for every position of the packed tokens."""
        h = self.model(input_ids, positions, self.cos_sin_cache)
        return torch.nn.functional.linear(h, self.lm_head_weight())
