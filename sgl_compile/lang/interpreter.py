"""The executor behind a program state: runs its expressions in order on a worker thread.

`s += expr` only queues, so the program thread runs on: `for f in forks: f += gen(...)` starts every
fork's call at once and they batch in the engine. Reading the state (`s["x"]`, `s.text()`) waits for
what is queued. Text only ever grows; `text_iter` follows it as it does.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sgl_compile.errors import SglcError
from sgl_compile.lang.backend import Backend
from sgl_compile.lang.chat import role_affixes
from sgl_compile.lang.choices import score_choices
from sgl_compile.lang.ir import Expr, Gen, RoleBegin, RoleEnd, Select, Text, flatten


@dataclass(frozen=True)
class SetVar(Expr):
    name: str
    value: Any


@dataclass(frozen=True)
class Join(Expr):
    """Gather the forks' new variables into lists, or append their new text."""

    forks: tuple[Executor, ...]
    mode: str


@dataclass
class _OpenRole:
    role: str
    start: int  # where its content starts in the text
    suffix: str


class Executor:
    def __init__(self, backend: Backend, defaults: dict[str, Any], stream: bool) -> None:
        self.backend, self.defaults, self.stream = backend, defaults, stream
        self.text = ""
        self.messages: list[dict[str, str]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.new_vars: list[str] = []  # set since this state began (what a join gathers)
        self.fork_point = 0  # length of the text it was forked with
        self.children: list[Executor] = []
        self._role: _OpenRole | None = None
        self._streaming: set[str] = set()  # variables still being generated
        self._cond = threading.Condition()
        self._pending: deque[Expr] = deque()
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False

    # -- the queue --------------------------------------------------------------------
    def submit(self, expr: Any) -> None:
        exprs = flatten(expr)
        with self._cond:
            if self._error is not None:
                return  # sync() reports the first error
            self._pending.extend(exprs)
            if not self._busy:
                self._busy = True
                threading.Thread(target=self._drain, name="sglc-lang", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._busy = False
                    self._cond.notify_all()
                    return
                expr = self._pending.popleft()
            try:
                self._execute(expr)
            except BaseException as e:  # kept for sync(); what was queued after it is dropped
                with self._cond:
                    self._error = e
                    self._pending.clear()
                    self._streaming.clear()

    def sync(self) -> None:
        """Wait until everything queued has run; raise the first error it hit."""
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)
            if self._error is not None:
                raise self._error

    def close(self, error: BaseException | None = None) -> None:
        """The program is over (this state and its forks): `text_iter` ends once the queue drains."""
        with self._cond:
            self._closed = True
            self._error = self._error or error
            self._cond.notify_all()
        for child in self.children:
            child.close()

    # -- text as it grows -----------------------------------------------------------------
    def _append(self, text: str, var: str | None = None) -> None:
        with self._cond:
            self.text += text
            if var is not None:
                self.variables[var] += text
            self._cond.notify_all()

    def _view(self, var: str | None) -> tuple[str, bool]:
        """(the text or variable so far, whether it is final)."""
        done = self._closed and not self._busy
        if var is None:
            return self.text, done
        value = self.variables.get(var)
        final = done or (value is not None and var not in self._streaming)
        return (value if isinstance(value, str) else ""), final

    def text_iter(self, var: str | None = None) -> Iterator[str]:
        sent = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda n=sent: len(self._view(var)[0]) > n or self._view(var)[1])
                current, final = self._view(var)
            if len(current) > sent:
                yield current[sent:]
                sent = len(current)
            elif final:
                break
        if self._error is not None:
            raise self._error

    # -- forks --------------------------------------------------------------------------
    def fork(self, n: int) -> list[Executor]:
        self.sync()
        if n > 1 and self.text:  # prefill the shared prefix once: the forks find it in the radix cache
            self.backend.generate([self.backend.encode(self.text)], {"max_new_tokens": 0})
        forks = []
        for _ in range(n):
            f = Executor(self.backend, self.defaults, self.stream)
            f.text, f.fork_point = self.text, len(self.text)
            f.messages = [dict(m) for m in self.messages]
            f.variables, f.meta_info = dict(self.variables), dict(self.meta_info)
            f._role = None if self._role is None else _OpenRole(**vars(self._role))
            forks.append(f)
        with self._cond:
            self.children += forks
        return forks

    # -- running one expression ----------------------------------------------------------
    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, Text):
            self._append(expr.value)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        elif isinstance(expr, RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, SetVar):
            self._set(expr.name, expr.value)
        elif isinstance(expr, Join):
            self._join(expr)
        else:
            raise SglcError(f"unknown expression {expr!r}")

    def _set(self, name: str | None, value: Any, meta: Any = None) -> None:
        if name is None:
            return
        with self._cond:
            self.variables[name] = value
            if meta is not None:
                self.meta_info[name] = meta
            if name not in self.new_vars:
                self.new_vars.append(name)
            self._cond.notify_all()

    def _role_begin(self, role: str) -> None:
        if self._role is not None:
            raise SglcError(f"a {role!r} block began inside the open {self._role.role!r} block")
        prefix, suffix = role_affixes(self.backend.tokenizer, self.messages, role)
        self._append(prefix)
        self._role = _OpenRole(role, len(self.text), suffix)

    def _role_end(self, role: str) -> None:
        if self._role is None or self._role.role != role:
            raise SglcError(f"a {role!r} block ended but {self._role and self._role.role!r} is open")
        self.messages.append({"role": role, "content": self.text[self._role.start :]})
        suffix, self._role = self._role.suffix, None
        self._append(suffix)

    def _gen(self, expr: Gen) -> None:
        params = {**self.defaults, **expr.params}
        ids = self.backend.encode(self.text)
        if not self.stream:
            out = self.backend.generate([ids], params)[0]
            self._append(out["text"])
            self._set(expr.name, out["text"], out["meta_info"])
            return
        name, received, out = expr.name, "", None
        if name is not None:
            with self._cond:
                self._streaming.add(name)
            self._set(name, "")
        for out in self.backend.stream(ids, params):
            delta = out["text"][len(received) :]
            received += delta
            self._append(delta, name)
        with self._cond:
            self._streaming.discard(name)
        if out is None:
            raise SglcError("the backend's stream ended without an output")
        self._set(name, out["text"], out["meta_info"])

    def _select(self, expr: Select) -> None:
        best, meta = score_choices(self.backend, self.text, expr.choices)
        self._append(expr.choices[best])
        self._set(expr.name, expr.choices[best], meta)

    def _join(self, expr: Join) -> None:
        for f in expr.forks:
            f.sync()
        if expr.mode == "gather_variable":
            names = list(dict.fromkeys(n for f in expr.forks for n in f.new_vars))
            for name in names:
                values = [f.variables.get(name) for f in expr.forks]
                self._set(name, values, [f.meta_info.get(name) for f in expr.forks])
        elif expr.mode == "concate_and_append":
            for f in expr.forks:
                self._append(f.text[f.fork_point :])
        else:
            raise SglcError(f"unknown join mode {expr.mode!r} (gather_variable | concate_and_append)")
