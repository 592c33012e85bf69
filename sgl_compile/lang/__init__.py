"""The frontend language: programs that interleave prompts, generation, choice, forks and joins.

from sgl_compile.lang import function, gen, select, user, assistant, EngineBackend

@function
def qa(s, question):
    s += user(question)
    s += assistant(gen("answer", max_tokens=64))

state = qa.run(question="What is 2+2?", backend=EngineBackend(Engine()))
print(state["answer"])
"""

from sgl_compile.lang.backend import Backend, EngineBackend
from sgl_compile.lang.endpoint import RuntimeEndpoint
from sgl_compile.lang.ir import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from sgl_compile.lang.program import SglFunction, function, get_default_backend, set_default_backend
from sgl_compile.lang.state import ProgramState, ProgramStateGroup

__all__ = [
    "Backend",
    "EngineBackend",
    "ProgramState",
    "ProgramStateGroup",
    "RuntimeEndpoint",
    "SglFunction",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "function",
    "gen",
    "get_default_backend",
    "select",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "user",
    "user_begin",
    "user_end",
]
