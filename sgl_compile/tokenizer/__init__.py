"""Tokenizers: text <-> ids, chat templates, incremental detokenization."""

from sgl_compile.tokenizer.base import Tokenizer
from sgl_compile.tokenizer.chat import ChatTemplate
from sgl_compile.tokenizer.detokenize import IncrementalDetokenizer
from sgl_compile.tokenizer.load import byte_tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir

__all__ = [
    "ChatTemplate",
    "IncrementalDetokenizer",
    "Tokenizer",
    "byte_tokenizer",
    "tokenizer_from_gguf",
    "tokenizer_from_hf_dir",
]
