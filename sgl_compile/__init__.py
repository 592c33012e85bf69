"""sgl-compile: an LLM serving engine built as a compiler."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `sgl_compile.Engine` without importing torch and the runtime on `import sgl_compile`.
    if name == "Engine":
        from sgl_compile.runtime.engine import Engine

        return Engine
    raise AttributeError(name)
