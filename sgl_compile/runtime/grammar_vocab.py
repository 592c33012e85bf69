"""A tokenizer's vocabulary as xgrammar sees it: one entry per logits column, spelled the way the
tokenizer stores it (byte-level "Ġ", sentencepiece "▁" and "<0x0A>", raw bytes), with the tokenizer's
special tokens blanked so that no grammar text can contain them (decoding would drop them)."""

from __future__ import annotations

from typing import Any

import xgrammar as xgr

from sgl_compile.errors import SglcError
from sgl_compile.tokenizer import Tokenizer
from sgl_compile.tokenizer.base import ByteBackend, HFBackend, SentencePieceBackend


def _component(obj: Any) -> str:
    """A `tokenizers` normalizer / pre-tokenizer / decoder as its JSON text ("" when absent)."""
    return obj.__getstate__().decode() if obj is not None else ""


def _hf_vocab(backend: HFBackend, size: int) -> tuple[list[str], xgr.VocabType, bool]:
    tok, vocab = backend.tok, [""] * size
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i < size:
            vocab[i] = token
    for i, added in tok.get_added_tokens_decoder().items():
        if added.special and i < size:
            vocab[i] = ""  # never inside grammar text: decoding skips special tokens
    decoder = _component(tok.decoder)
    if '"ByteLevel"' in decoder:
        kind = xgr.VocabType.BYTE_LEVEL
    elif any(k in decoder for k in ('"ByteFallback"', '"Metaspace"', '"String":"\u2581"')):
        kind = xgr.VocabType.BYTE_FALLBACK  # "▁" is a space, "<0x0A>" a byte
    else:
        kind = xgr.VocabType.RAW
    pre, norm = _component(tok.pre_tokenizer), _component(tok.normalizer)
    prefix_space = (
        '"Prepend"' in norm
        or '"add_prefix_space":true' in pre
        or any(f'"prepend_scheme":"{s}"' in pre for s in ("first", "always"))
    )
    return vocab, kind, prefix_space


def _sentencepiece_vocab(backend: SentencePieceBackend, size: int) -> tuple[list[str], xgr.VocabType, bool]:
    sp, vocab = backend.sp, [""] * size
    for i in range(min(size, sp.get_piece_size())):
        if not (sp.is_control(i) or sp.is_unknown(i)):
            vocab[i] = sp.id_to_piece(i)
    # sentencepiece spells a space "▁" (and bytes "<0x0A>" with byte fallback): xgrammar's BYTE_FALLBACK
    return vocab, xgr.VocabType.BYTE_FALLBACK, True


def _byte_vocab(backend: ByteBackend, size: int) -> tuple[list[bytes], xgr.VocabType, bool]:
    return [bytes([i]) if i < 256 else b"" for i in range(size)], xgr.VocabType.RAW, False


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """xgrammar's view of `tokenizer`, with one entry per logits column (`vocab_size` may exceed the
    tokenizer's vocabulary: the extra ids are padding and never allowed)."""
    backend = tokenizer.backend
    if isinstance(backend, HFBackend):
        vocab, kind, prefix_space = _hf_vocab(backend, vocab_size)
    elif isinstance(backend, SentencePieceBackend):
        vocab, kind, prefix_space = _sentencepiece_vocab(backend, vocab_size)
    elif isinstance(backend, ByteBackend):
        vocab, kind, prefix_space = _byte_vocab(backend, vocab_size)
    else:
        raise SglcError(f"structured outputs do not support the {type(backend).__name__} tokenizer")
    stops = [i for i in tokenizer.eos_token_ids if i < vocab_size]
    if not stops:
        raise SglcError("structured outputs need an end-of-sequence token; this tokenizer has none")
    return xgr.TokenizerInfo(
        vocab, kind, vocab_size=vocab_size, stop_token_ids=stops, add_prefix_space=prefix_space
    )
