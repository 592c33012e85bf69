"""Random-weight HF checkpoints (Qwen3, Llama 3 rope scaling), saved by transformers, loaded by us."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sgl_compile.models.loading import load_model
from tests.test_model_parity import assert_fp32_parity, hf_logits, ours_logits

VOCAB = 49152  # SmolLM2's tokenizer is saved beside the weights


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are far from uniform (argmax is not a near-tie)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.08 * noise)


def _save(model, directory: Path, hf_smollm2_tokenizer, shard: str | None = None) -> Path:
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, **kwargs)
    hf_smollm2_tokenizer.save_pretrained(directory)
    return directory


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory, hf_smollm2_tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rope_theta=1e6, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen3ForCausalLM(cfg).eval()
    _randomize(model, 0)
    return model, _save(model, tmp_path_factory.mktemp("qwen3"), hf_smollm2_tokenizer)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, hf_smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }  # fmt: skip
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=1024, rope_parameters=rope, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    _randomize(model, 1)
    # Small shards so the loader goes through model.safetensors.index.json.
    return model, _save(model, tmp_path_factory.mktemp("llama3"), hf_smollm2_tokenizer, shard="5MB")


def test_qwen3_matches_transformers(qwen3_dir) -> None:
    hf, directory = qwen3_dir
    ours = load_model(str(directory), "float32")
    assert ours.config.architecture == "qwen3" and ours.config.qk_norm and ours.config.head_dim == 64
    for seed in range(3):
        ids = _ids(40 + 30 * seed, seed)
        assert_fp32_parity(ours_logits(ours, ids), hf_logits(hf, ids))


def test_llama3_rope_scaling_sharded_matches_transformers(llama3_dir) -> None:
    hf, directory = llama3_dir
    assert (directory / "model.safetensors.index.json").exists()
    ours = load_model(str(directory), "float32")
    assert ours.config.rope_scaling is not None and ours.config.rope_scaling.kind == "llama3"
    assert not ours.config.tie_word_embeddings
    for seed in range(3):
        ids = _ids(300, seed)  # positions past original_max_position_embeddings
        assert_fp32_parity(ours_logits(ours, ids), hf_logits(hf, ids))


def test_hf_dir_tokenizer_and_template(qwen3_dir, hf_smollm2_tokenizer) -> None:
    _, directory = qwen3_dir
    tok = load_model(str(directory), "float32").tokenizer
    text = "Hello wörld 12345 🎉"
    assert tok.encode(text) == hf_smollm2_tokenizer.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    expected = hf_smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    assert hf_smollm2_tokenizer.convert_tokens_to_ids(hf_smollm2_tokenizer.eos_token) in tok.eos_token_ids
