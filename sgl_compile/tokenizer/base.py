"""The tokenizer the engine uses: one interface over HF `tokenizers`, sentencepiece and a byte fallback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sgl_compile.errors import SglcError
from sgl_compile.tokenizer.chat import ChatTemplate


class Backend(Protocol):
    """Text <-> ids. `encode` adds BOS/EOS only when asked and the tokenizer's own rules say so."""

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...
    def vocab_size(self) -> int: ...


class HFBackend:
    """A `tokenizers.Tokenizer` (from tokenizer.json, or built from GGUF metadata)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class SentencePieceBackend:
    """A sentencepiece `tokenizer.model`; BOS/EOS added per the tokenizer config."""

    def __init__(self, path: str, add_bos: bool = True, add_eos: bool = False) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.add_bos, self.add_eos = add_bos, add_eos

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.sp.encode(text)
        if add_special_tokens and self.add_bos and self.sp.bos_id() >= 0:
            ids = [self.sp.bos_id(), *ids]
        if add_special_tokens and self.add_eos and self.sp.eos_id() >= 0:
            ids = [*ids, self.sp.eos_id()]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if not self.sp.is_control(i)]
        return self.sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()


class ByteBackend:
    """For random-weight models: ids 0..255 are UTF-8 bytes, then BOS and EOS; the rest decode to nothing."""

    SPECIAL = ("<s>", "</s>")

    def __init__(self, size: int) -> None:
        self.size = size

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        data = bytes(i for i in ids if i < 256)
        specials = "" if skip_special_tokens else "".join(self.id_to_token(i) or "" for i in ids if i >= 256)
        return data.decode("utf-8", errors="replace") + specials

    def token_to_id(self, token: str) -> int | None:
        return 256 + self.SPECIAL.index(token) if token in self.SPECIAL else None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id < 256:
            return chr(token_id)
        return self.SPECIAL[token_id - 256] if token_id - 256 < len(self.SPECIAL) else f"<|{token_id}|>"

    def vocab_size(self) -> int:
        return self.size


@dataclass
class Tokenizer:
    backend: Backend
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: ChatTemplate | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise SglcError("this model has no chat template")
        return self.chat_template.render(messages, add_generation_prompt)
