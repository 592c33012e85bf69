"""Tokenizers built from GGUF metadata against transformers' tokenizer for the same file."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_compile.models.loading import LoadedModel
from sgl_compile.tokenizer import IncrementalDetokenizer
from tests import prompts

MODELS = ["smollm2", "qwen05"]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a haiku about autumn."},
    {
        "role": "assistant",
        "content": "Crisp leaves drift and fall,\nGolden light on quiet paths,\nThe year exhales slow.",
    },
    {"role": "user", "content": "Now one about 春 (spring) 🌸."},
]


def _pair(name: str, request: pytest.FixtureRequest) -> tuple[LoadedModel, object]:
    return request.getfixturevalue(name), request.getfixturevalue(f"hf_{name}_tokenizer")


@pytest.mark.parametrize("name", MODELS)
def test_round_trip(name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name).tokenizer
    for text in prompts.CORPUS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("name", MODELS)
def test_agrees_with_transformers(name: str, request: pytest.FixtureRequest) -> None:
    ours, hf = _pair(name, request)
    for text in prompts.CORPUS:
        ids = ours.tokenizer.encode(text)
        assert ids == hf.encode(text), text
        assert ours.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


@pytest.mark.parametrize("name", MODELS)
def test_chat_template_matches_transformers(name: str, request: pytest.FixtureRequest) -> None:
    ours, hf = _pair(name, request)
    for gen_prompt in (True, False):
        expected = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen_prompt)
        assert ours.tokenizer.apply_chat_template(CONVERSATION, gen_prompt) == expected


@pytest.mark.parametrize("name", MODELS)
def test_special_ids(name: str, request: pytest.FixtureRequest) -> None:
    ours, hf = _pair(name, request)
    assert hf.convert_tokens_to_ids(hf.eos_token) in ours.tokenizer.eos_token_ids
    assert ours.tokenizer.encode("<|im_end|>") == [hf.convert_tokens_to_ids("<|im_end|>")]


def _stream(tok, prompt_ids: list[int], output: list[int]) -> str:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    return "".join(detok.push(t) for t in output) + detok.flush()


@pytest.mark.parametrize("name", MODELS)
def test_incremental_detokenization_equals_full_decode(name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name).tokenizer
    for text in prompts.CORPUS[:4] + prompts.CORPUS[7:9]:
        ids = tok.encode(text)
        for split in (0, 1, len(ids) // 2):
            # Text after the prompt: the full decode of everything minus the decode of the prompt.
            full, head = tok.decode(ids), tok.decode(ids[:split])
            assert _stream(tok, ids[:split], ids[split:]) == full[len(head) :], (text, split)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_incremental_never_emits_broken_characters(seed: int, smollm2: LoadedModel) -> None:
    """Random emoji/CJK text splits multi-byte characters across byte-level tokens."""
    rng = random.Random(seed)
    text = "".join(
        rng.choice(["🎉", "你", "好", "é", " ", "a", "👍🏽", "\n", "ß"]) for _ in range(rng.randint(1, 30))
    )
    tok = smollm2.tokenizer
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text


def test_sentencepiece_model(tmp_path) -> None:
    """tokenizer.model checkpoints: a small sentencepiece model trained here, through our backend."""
    import sentencepiece as spm

    from sgl_compile.tokenizer.base import SentencePieceBackend

    lines = prompts.LONG.split(". ") * 4 + prompts.CORPUS
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=500, hard_vocab_limit=False,
        byte_fallback=True, character_coverage=1.0, minloglevel=2, normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )  # fmt: skip
    backend = SentencePieceBackend(str(tmp_path / "sp.model"), add_bos=True)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    for text in ["Hello world.", "Compilers 🎉 and 日本語", prompts.CODE]:
        ids = backend.encode(text, add_special_tokens=True)
        assert ids == [sp.bos_id(), *sp.encode(text)]
        assert backend.decode(ids, skip_special_tokens=True) == text
