"""Shared fixtures. Real models are fetched once (cached on disk) and loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# transformers' GGUF loader logs progress bars; keep test output readable.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.manual_seed(0)

from sgl_compile.models.loading import LoadedModel, fetch, load_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fetch("smollm2-135m")


@pytest.fixture(scope="session")
def qwen05_gguf() -> Path:
    return fetch("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> LoadedModel:
    return load_model(str(smollm2_gguf), "float32")


@pytest.fixture(scope="session")
def qwen05(qwen05_gguf: Path) -> LoadedModel:
    return load_model(str(qwen05_gguf), "float32")


def _hf_model(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf: Path):
    return _hf_model(smollm2_gguf, torch.float32)


@pytest.fixture(scope="session")
def hf_qwen05(qwen05_gguf: Path):
    return _hf_model(qwen05_gguf, torch.float32)


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf: Path):
    return _hf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_qwen05_tokenizer(qwen05_gguf: Path):
    return _hf_tokenizer(qwen05_gguf)
