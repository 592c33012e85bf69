"""Write a tokenizer into a directory and read it back (for ahead-of-time artifacts).

Layout: `tokenizer.json` (HF tokenizers) or `tokenizer.model` (sentencepiece) or
nothing (byte tokenizer), plus `tokenizer_meta.json` with the special ids, the
backend kind and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from sgl_compile.errors import SglcError
from sgl_compile.tokenizer.base import ByteBackend, HFBackend, SentencePieceBackend, Tokenizer
from sgl_compile.tokenizer.chat import ChatTemplate

META = "tokenizer_meta.json"


def save_tokenizer(tok: Tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    backend = tok.backend
    meta: dict = {"bos_token_id": tok.bos_token_id, "eos_token_ids": list(tok.eos_token_ids)}
    if isinstance(backend, HFBackend):
        meta["backend"] = "hf"
        (directory / "tokenizer.json").write_text(backend.tok.to_str())
    elif isinstance(backend, SentencePieceBackend):
        meta.update(backend="sentencepiece", add_bos=backend.add_bos, add_eos=backend.add_eos)
        (directory / "tokenizer.model").write_bytes(backend.sp.serialized_model_proto())
    elif isinstance(backend, ByteBackend):
        meta.update(backend="byte", vocab_size=backend.size)
    else:
        raise SglcError(f"cannot save a tokenizer with backend {type(backend).__name__}")
    if tok.chat_template is not None:
        t = tok.chat_template
        meta["chat_template"] = {"source": t.source, "bos_token": t.bos_token, "eos_token": t.eos_token}
    (directory / META).write_text(json.dumps(meta, indent=1))


def load_tokenizer(directory: Path) -> Tokenizer:
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError) as e:
        raise SglcError(f"{directory}: no readable {META} ({e})") from None
    kind = meta.get("backend")
    if kind == "hf":
        backend = HFBackend(HFTokenizer.from_file(str(directory / "tokenizer.json")))
    elif kind == "sentencepiece":
        backend = SentencePieceBackend(str(directory / "tokenizer.model"), meta["add_bos"], meta["add_eos"])
    elif kind == "byte":
        backend = ByteBackend(meta["vocab_size"])
    else:
        raise SglcError(f"{directory}: unknown tokenizer backend {kind!r}")
    template = meta.get("chat_template")
    return Tokenizer(
        backend,
        meta["bos_token_id"],
        tuple(meta["eos_token_ids"]),
        ChatTemplate(**template) if template else None,
    )
