"""Request bodies of the OpenAI and native APIs, validated by pydantic (a failure is a 400 naming the field)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sgl_compile.runtime.sampling_params import MAX_N, MAX_TOP_LOGPROBS

Temperature = Field(default=1.0, ge=0.0, le=100.0)
TopP = Field(default=1.0, gt=0.0, le=1.0)
Penalty = Field(default=0.0, ge=-2.0, le=2.0)


class ResponseFormat(BaseModel):
    """OpenAI's structured outputs: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Sglang(BaseModel):
    """SGLang's extras accepted in OpenAI bodies."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    response_format: ResponseFormat | None = None  # SGLang takes it in /v1/completions too
    rid: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(_Sglang):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float = Temperature
    top_p: float = TopP
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float = Penalty
    frequency_penalty: float = Penalty
    seed: int | None = None
    suffix: str | None = None
    user: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sglang):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Temperature
    top_p: float = TopP
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stop: str | list[str] | None = None
    presence_penalty: float = Penalty
    frequency_penalty: float = Penalty
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class GenerateRequest(BaseModel):
    """SGLang's native /generate."""

    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    rid: str | list[str] | None = None


class AbortRequest(BaseModel):
    rid: str
