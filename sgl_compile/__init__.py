"""sgl-compile: an LLM serving engine built as a compiler."""

__version__ = "0.1.0"
