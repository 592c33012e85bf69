"""What a program sees as `s`: append with `+=`, read with `s[name]`, fork and join, stream the text."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sgl_compile.lang.interpreter import Executor, Join, SetVar
from sgl_compile.lang.ir import RoleBegin, RoleEnd


class ProgramState:
    """A program's text, chat messages and named results. Appending queues; reading waits for the queue."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    def __iadd__(self, expr: Any) -> ProgramState:
        self._executor.submit(expr)
        return self

    # -- reading ----------------------------------------------------------------------
    def sync(self) -> ProgramState:
        self._executor.sync()
        return self

    def text(self) -> str:
        self.sync()
        return self._executor.text

    def messages(self) -> list[dict[str, str]]:
        """The chat messages of the role blocks so far (`{"role": ..., "content": ...}`)."""
        self.sync()
        return [dict(m) for m in self._executor.messages]

    def __getitem__(self, name: str) -> Any:
        self.sync()
        return self._executor.variables[name]

    def get_var(self, name: str, default: Any = None) -> Any:
        self.sync()
        return self._executor.variables.get(name, default)

    def __contains__(self, name: str) -> bool:
        self.sync()
        return name in self._executor.variables

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def set_var(self, name: str, value: Any) -> None:
        self._executor.submit(SetVar(name, value))

    def variables(self) -> dict[str, Any]:
        self.sync()
        return dict(self._executor.variables)

    def get_meta_info(self, name: str) -> Any:
        """The engine's `meta_info` of the call that produced `name` (`cached_tokens`, `prompt_tokens`,
        `completion_tokens`, `finish_reason`, ...); for a select, each choice's scores; after a join,
        a list with one per fork."""
        self.sync()
        return self._executor.meta_info.get(name)

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text (or one variable) as it grows, in pieces; ends when the program (or the variable) is
        done. With `run(stream=True)` the pieces come as the engine generates them."""
        return self._executor.text_iter(var_name)

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"

    # -- forks ------------------------------------------------------------------------
    def fork(self, size: int = 1) -> ProgramStateGroup:
        """`size` copies of this state (text, messages, variables) that run on concurrently."""
        if size < 1:
            raise ValueError("fork size must be >= 1")
        return ProgramStateGroup([ProgramState(e) for e in self._executor.fork(size)], self)

    def join(self, forks: ProgramStateGroup | list[ProgramState], mode: str = "gather_variable") -> None:
        """After the forks finish: `gather_variable` sets each variable they created to the list of their
        values (in fork order); `concate_and_append` appends each fork's new text to this state."""
        states = forks.states if isinstance(forks, ProgramStateGroup) else list(forks)
        self._executor.submit(Join(tuple(f._executor for f in states), mode))

    # -- role blocks as context managers: `with s.user(): s += ...` ------------------------
    @contextmanager
    def role(self, name: str) -> Iterator[ProgramState]:
        self._executor.submit(RoleBegin(name))
        yield self
        self._executor.submit(RoleEnd(name))

    def system(self) -> Any:
        return self.role("system")

    def user(self) -> Any:
        return self.role("user")

    def assistant(self) -> Any:
        return self.role("assistant")


class ProgramStateGroup:
    """The states `fork` returns: index or iterate them; `forks += expr` appends to each."""

    def __init__(self, states: list[ProgramState], source: ProgramState) -> None:
        self.states, self.source = states, source

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)

    def __iadd__(self, expr: Any) -> ProgramStateGroup:
        for state in self.states:
            state += expr
        return self

    def join(self, mode: str = "gather_variable") -> None:
        self.source.join(self, mode)
