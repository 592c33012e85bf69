"""Rotary-embedding tables: inverse frequencies (with rope scaling) and the cos/sin cache."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sgl_compile.models.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    ramp = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - ramp) * inv_freq / s.factor + ramp * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin_cache(config: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """[max_positions, head_dim] fp32: cos of each (position, frequency) then sin, the `sglc::rope` layout."""
    inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    positions = torch.arange(config.max_position_embeddings, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)
