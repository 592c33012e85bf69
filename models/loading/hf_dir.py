"""HF checkpoint directories: config.json, *.safetensors (single or sharded), tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from sgl_compile.errors import SglcError
from sgl_compile.models.config import ModelConfig
from sgl_compile.models.loading.checkpoint import Checkpoint
from sgl_compile.tokenizer import tokenizer_from_hf_dir


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SglcError(f"{path}: cannot read JSON ({e})") from None


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
        shards = [directory / f for f in files]
    else:
        shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise SglcError(f"{directory}: no *.safetensors weights")
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise SglcError(f"{directory}: missing weight shards {missing}")
    return shards


def _eos_ids(directory: Path, config: ModelConfig) -> tuple[int, ...]:
    gen = directory / "generation_config.json"
    eos = _read_json(gen).get("eos_token_id") if gen.exists() else None
    extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return tuple(dict.fromkeys([*config.eos_token_ids, *extra]))


def open_hf_dir(directory: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    if not (directory / "config.json").exists():
        raise SglcError(f"{directory}: no config.json (not a HF checkpoint directory)")
    config = ModelConfig.from_hf(_read_json(directory / "config.json"))
    shards = _shards(directory)
    try:
        count = 0
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                count += len(f.keys())
    except (SafetensorError, OSError) as e:
        raise SglcError(f"{directory}: corrupt safetensors file ({e})") from None

    def tensors(device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)

    tokenizer = tokenizer_from_hf_dir(directory, _eos_ids(directory, config))
    return Checkpoint(str(directory), config, tokenizer, count, tensors)
