"""Model definitions and their weight loaders (installed as `sgl_compile.models`)."""

from __future__ import annotations

from torch import nn

from sgl_compile.errors import SglcError
from sgl_compile.models.config import ModelConfig
from sgl_compile.models.llama import LlamaForCausalLM
from sgl_compile.models.qwen3 import Qwen3ForCausalLM

# Qwen2 is the Llama decoder with qkv bias, which the config's `attention_bias` carries.
MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[config.architecture]
    except KeyError:
        raise SglcError(f"no model class for architecture {config.architecture!r}") from None


__all__ = ["MODEL_CLASSES", "ModelConfig", "model_class"]
