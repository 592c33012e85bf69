"""What every loader produces: a config, a tokenizer and a stream of HF-named tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from sgl_compile.models.config import ModelConfig
from sgl_compile.tokenizer import Tokenizer

# (device, dtype) -> tensors; loaders may ignore the hints (the caller casts and copies),
# but a random-weight loader uses them to create weights in place.
TensorStream = Callable[[torch.device, torch.dtype], Iterator[tuple[str, Tensor]]]


@dataclass
class Checkpoint:
    source: str  # what was opened, for logs and errors
    config: ModelConfig
    tokenizer: Tokenizer
    num_tensors: int
    tensors: TensorStream
