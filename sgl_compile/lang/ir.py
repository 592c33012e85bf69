"""The expressions a program appends to its state: text, role blocks, `gen` and `select`.

`s += expr` queues an expression on the state; the state's executor runs them in order. Expressions
compose with `+` (`"Q: " + question + gen("a")`) and nest in role blocks (`assistant(gen("a"))`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sgl_compile.errors import SglcError

ROLES = ("system", "user", "assistant")


class Expr:
    """Something a program appends to its state."""

    def __add__(self, other: Any) -> Seq:
        return Seq((*flatten(self), *flatten(other)))

    def __radd__(self, other: Any) -> Seq:
        return Seq((*flatten(other), *flatten(self)))


@dataclass(frozen=True)
class Text(Expr):
    value: str


@dataclass(frozen=True)
class Seq(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class RoleBegin(Expr):
    role: str


@dataclass(frozen=True)
class RoleEnd(Expr):
    role: str


@dataclass(frozen=True)
class Gen(Expr):
    """Generate from the text so far; `params` are SGLang sampling params (only those given)."""

    name: str | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Select(Expr):
    """Append the choice the model finds most likely (mean log-probability over its tokens)."""

    name: str | None
    choices: tuple[str, ...]


def flatten(expr: Any) -> tuple[Expr, ...]:
    """A str, an Expr, or a list/tuple of them -> a flat tuple of expressions."""
    if isinstance(expr, str):
        return (Text(expr),)
    if isinstance(expr, Seq):
        return expr.items
    if isinstance(expr, Expr):
        return (expr,)
    if isinstance(expr, list | tuple):
        return tuple(e for item in expr for e in flatten(item))
    raise SglcError(f"cannot append {type(expr).__name__} to a program state (use str, gen, select, ...)")


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    seed: int | None = None,
    regex: str | None = None,
    json_schema: str | dict[str, Any] | None = None,
    choices: list[str] | None = None,
) -> Expr:
    """Generate text and store it under `name`. Unset parameters fall back to the program's defaults
    (from `run(...)`), then the engine's. `choices=` makes it a `select`."""
    if choices is not None:
        return select(name, choices)
    if isinstance(json_schema, dict):
        json_schema = json.dumps(json_schema)
    given = dict(
        max_new_tokens=max_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
        seed=seed,
        regex=regex,
        json_schema=json_schema,
    )
    return Gen(name, {k: v for k, v in given.items() if v is not None})


def select(name: str | None, choices: list[str] | tuple[str, ...]) -> Select:
    choices = tuple(choices)
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise SglcError("select needs a non-empty list of non-empty strings")
    return Select(name, choices)


def _role(role: str, content: Any) -> Seq:
    inner = () if content is None else flatten(content)
    return Seq((RoleBegin(role), *inner, RoleEnd(role)))


def system(content: Any = None) -> Seq:
    return _role("system", content)


def user(content: Any = None) -> Seq:
    return _role("user", content)


def assistant(content: Any = None) -> Seq:
    return _role("assistant", content)


def system_begin() -> RoleBegin:
    return RoleBegin("system")


def system_end() -> RoleEnd:
    return RoleEnd("system")


def user_begin() -> RoleBegin:
    return RoleBegin("user")


def user_end() -> RoleEnd:
    return RoleEnd("user")


def assistant_begin() -> RoleBegin:
    return RoleBegin("assistant")


def assistant_end() -> RoleEnd:
    return RoleEnd("assistant")
