"""Role blocks rendered through the model's own chat template.

A role block's prefix and suffix are read off the template: render the conversation so far, then the
conversation plus one message whose content is a sentinel, and split the difference at the sentinel.
So `s += user(q)` produces exactly what `apply_chat_template` would, default system prompt included.
"""

from __future__ import annotations

from typing import Any

from sgl_compile.errors import SglcError
from sgl_compile.tokenizer import Tokenizer

_SENTINEL = "\ue000sglc-content\ue000"  # a private-use character: never in a template or a message


def _render(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=False) if messages else ""


def role_affixes(tokenizer: Tokenizer, messages: list[dict[str, Any]], role: str) -> tuple[str, str]:
    """(prefix, suffix) of a `role` message that follows `messages` in this tokenizer's chat template."""
    before = _render(tokenizer, messages)
    after = _render(tokenizer, [*messages, {"role": role, "content": _SENTINEL}])
    if not after.startswith(before) or after.count(_SENTINEL) != 1:
        raise SglcError(
            f"the chat template does not render a {role!r} message after the conversation so far as an "
            "append-only suffix; build this prompt as plain text instead"
        )
    prefix, suffix = after[len(before) :].split(_SENTINEL)
    return prefix, suffix
