"""Building a `Tokenizer` from what a checkpoint ships: GGUF metadata or a HF directory."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from sgl_compile.errors import SglcError
from sgl_compile.tokenizer.base import ByteBackend, HFBackend, SentencePieceBackend, Tokenizer
from sgl_compile.tokenizer.chat import ChatTemplate

# Pre-tokenizer split patterns, by llama.cpp's `tokenizer.ggml.pre` name.
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_GPT2_FAMILY = {
    "gpt-2",
    "default",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva",
}
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _pre_tokenizer(pre: str) -> Any:
    if pre in _GPT2_FAMILY:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGIT_SPLIT:
            return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        return byte_level
    split = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT}.get(pre)
    if split is None:
        raise SglcError(f"unsupported GGUF pre-tokenizer {pre!r}")
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _token(meta: Mapping[str, Any], key: str) -> tuple[str, int] | None:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    return None if token_id is None else (meta["tokenizer.ggml.tokens"][token_id], int(token_id))


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> Tokenizer:
    """Byte-level BPE from `tokenizer.ggml.*` (vocab, merges, token types, special ids, pre-tokenizer)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise SglcError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2 byte-level BPE)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == _USER_DEFINED
        ]
    )
    bos, eos = _token(meta, "bos_token_id"), _token(meta, "eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        specials = [s for s, on in ((bos, add_bos), (eos, add_eos)) if on]
        single = " ".join([*([bos[0]] if add_bos else []), "$A", *([eos[0]] if add_eos else [])])
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(
        backend=HFBackend(tok),
        bos_token_id=bos[1] if bos else None,
        eos_token_ids=(eos[1],) if eos else (),
        chat_template=ChatTemplate(template, bos[0] if bos else "", eos[0] if eos else "")
        if template
        else None,
    )


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _chat_template_source(directory: Path, cfg: Mapping[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def tokenizer_from_hf_dir(directory: Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """tokenizer.json (or tokenizer.model) plus tokenizer_config.json of a HF checkpoint directory."""
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    bos_text, eos_text = _content(cfg.get("bos_token")), _content(cfg.get("eos_token"))
    if (directory / "tokenizer.json").exists():
        backend: Any = HFBackend(HFTokenizer.from_file(str(directory / "tokenizer.json")))
    elif (directory / "tokenizer.model").exists():
        backend = SentencePieceBackend(
            str(directory / "tokenizer.model"),
            cfg.get("add_bos_token", True),
            cfg.get("add_eos_token", False),
        )
    else:
        raise SglcError(f"{directory}: no tokenizer.json or tokenizer.model")
    bos = backend.token_to_id(bos_text) if bos_text else None
    eos = backend.token_to_id(eos_text) if eos_text else None
    eos_ids = tuple(dict.fromkeys([*eos_token_ids, *([eos] if eos is not None else [])]))
    template = _chat_template_source(directory, cfg)
    return Tokenizer(
        backend=backend,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        chat_template=ChatTemplate(template, bos_text or "", eos_text or "") if template else None,
    )


_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """Tokenizer for random-weight models: UTF-8 bytes, `<s>`=256, `</s>`=257, a ChatML template."""
    return Tokenizer(ByteBackend(vocab_size), 256, (257,), ChatTemplate(_CHATML, "<s>", "</s>"))
