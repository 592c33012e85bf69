"""`@function` programs: run one on a backend, a batch of them on threads, or stream one's text."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm

from sgl_compile.errors import SglcError
from sgl_compile.lang.backend import Backend
from sgl_compile.lang.interpreter import Executor
from sgl_compile.lang.state import ProgramState

_default_backend: list[Backend] = []  # what `set_default_backend` set; programs use it when given none


def set_default_backend(backend: Backend | None) -> None:
    _default_backend[:] = [] if backend is None else [backend]


def get_default_backend() -> Backend | None:
    return _default_backend[0] if _default_backend else None


class SglFunction:
    """A program: a Python function whose first argument is the state `s`."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __call__(self, s: ProgramState, *args: Any, **kwargs: Any) -> Any:
        """Call it inside another program: it appends to that program's state."""
        return self.func(s, *args, **kwargs)

    def run(
        self,
        *args: Any,
        backend: Backend | None = None,
        stream: bool = False,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program on `backend` (or the default) and return its state. The sampling arguments are
        defaults for its `gen` calls, except those the program takes as parameters itself: those go to it.
        With `stream=True` it runs on a thread and this returns at once: follow it with `state.text_iter()`."""
        sampling = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            seed=seed,
        )
        own = inspect.signature(self.func).parameters
        defaults = {}
        for name, value in sampling.items():
            if value is not None:
                (kwargs if name in own else defaults)[name] = value
        return self._start(args, kwargs, backend, stream, defaults)

    def _start(
        self, args: tuple, kwargs: dict, backend: Backend | None, stream: bool, defaults: dict
    ) -> ProgramState:
        backend = backend or get_default_backend()
        if backend is None:
            raise SglcError("no backend: pass backend= or call set_default_backend(...)")
        state = ProgramState(Executor(backend, defaults, stream))
        inspect.signature(self.func).bind(state, *args, **kwargs)  # a TypeError now, not on a thread
        if stream:
            threading.Thread(target=self._execute, args=(state, args, kwargs, False), daemon=True).start()
        else:
            self._execute(state, args, kwargs, True)
        return state

    def _execute(self, state: ProgramState, args: tuple, kwargs: dict, reraise: bool) -> None:
        """Run the function, wait for its queue, close the state (a streamed run reports its error
        through `text_iter`)."""
        error = None
        try:
            self.func(state, *args, **kwargs)
            state.sync()
        except BaseException as e:
            error = e
            if reraise:
                raise
        finally:
            state._executor.close(error)

    def run_batch(
        self,
        batch_kwargs: list[dict[str, Any]],
        *,
        backend: Backend | None = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        **sampling: Any,
    ) -> list[ProgramState]:
        """Run the program once per dict of arguments, `num_threads` at a time (their calls batch in the
        engine); the states come back in input order. `sampling` as for `run`."""
        if not batch_kwargs:
            return []
        threads = min(len(batch_kwargs), 64) if num_threads == "auto" else int(num_threads)
        backend = backend or get_default_backend()
        with ThreadPoolExecutor(max(threads, 1)) as pool:
            futures = [pool.submit(self.run, backend=backend, **sampling, **kw) for kw in batch_kwargs]
            for _ in tqdm(
                as_completed(futures), total=len(futures), disable=not progress_bar, unit="program"
            ):
                pass
            return [f.result() for f in futures]


def function(func: Callable[..., Any] | None = None) -> Any:
    """Decorate a program: `@function` or `@function()`."""
    if func is None:
        return function
    return SglFunction(func)
