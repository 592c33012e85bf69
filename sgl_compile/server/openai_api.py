"""OpenAI-compatible /v1/completions and /v1/chat/completions on top of the engine client."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from sgl_compile.errors import SglcError
from sgl_compile.runtime.grammar import constraint_spec, sampling_fields
from sgl_compile.server.protocol import ChatCompletionRequest, CompletionRequest
from sgl_compile.server.state import RequestError, ServerState

FINISH = {"stop": "stop", "length": "length", "abort": "abort", "error": "error"}


def _finish(meta: dict) -> str | None:
    f = meta["finish_reason"]
    return None if f is None else FINISH.get(f["type"], f["type"])


def _usage(outs: list[dict], prompt_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI usage. `prompt_tokens` is the sum over a batch of prompts; by default, the one prompt's."""
    prompt = outs[0]["meta_info"]["prompt_tokens"] if prompt_tokens is None else prompt_tokens
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": outs[0]["meta_info"]["cached_tokens"]},
    }


def _reject_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.logit_bias:
        raise RequestError("logit_bias is not supported", "logit_bias")
    if isinstance(req, ChatCompletionRequest):
        if req.tools:
            raise RequestError("tools are not supported", "tools")
    else:
        if req.suffix is not None:
            raise RequestError("suffix is not supported", "suffix")
        if req.best_of not in (None, 1):
            raise RequestError("best_of is not supported", "best_of")


def _constraint(req: CompletionRequest | ChatCompletionRequest) -> tuple[tuple[str, str] | None, str]:
    """The structured-output constraint of a request (response_format or SGLang's regex / json_schema /
    ebnf) and the field that gave it."""
    fmt = req.response_format.model_dump() if req.response_format is not None else None
    given = [k for k in ("json_schema", "regex", "ebnf") if getattr(req, k) is not None]
    param = "response_format" if fmt is not None and fmt["type"] != "text" else (given or ["regex"])[0]
    try:
        spec = constraint_spec(
            json_schema=req.json_schema, regex=req.regex, ebnf=req.ebnf, response_format=fmt
        )
    except SglcError as e:
        raise RequestError(str(e), param) from None
    return spec, param


def _params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return {
        "max_new_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
        "repetition_penalty": req.repetition_penalty,
        "stop": stop,
        "stop_token_ids": req.stop_token_ids or [],
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "seed": req.seed,
    }


async def _check_constraint(
    state: ServerState, req: CompletionRequest | ChatCompletionRequest
) -> dict[str, str]:
    """Validate the request's constraint (a 400 naming the field if it does not compile); its sampling params."""
    spec, param = _constraint(req)
    await state.check_constraint(spec, param)
    return sampling_fields(spec)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class _Job:
    """One prompt of a request: its token ids and the sampling parameters it runs with."""

    input_ids: list[int]
    params: dict[str, Any]


class OpenAIServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    # -- /v1/completions --------------------------------------------------------
    def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [self.state.encode(p, "prompt")]
        if not p:
            raise RequestError("prompt must not be empty", "prompt")
        if all(isinstance(x, str) for x in p):
            return [self.state.encode(x, "prompt") for x in p]
        if all(isinstance(x, int) for x in p):
            return [self.state.check_ids(list(p), "prompt")]
        return [self.state.check_ids(list(x), "prompt") for x in p]

    async def completions(self, req: CompletionRequest) -> Any:
        self.state.check_model(req.model)
        _reject_unsupported(req)
        constraint = await _check_constraint(self.state, req)
        prompts = self._completion_prompts(req)
        jobs = []
        for ids in prompts:
            max_tokens = self.state.check_budget(ids, req.max_tokens, "max_tokens")
            params = _params(req, max_tokens) | constraint
            if req.logprobs is not None:
                params.update(return_logprob=True, top_logprobs_num=req.logprobs)
                if req.echo:
                    params["logprob_start_len"] = 0
            jobs.append(_Job(ids, params))
        rid = req.rid or f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._stream(self._completion_chunks(req, rid, jobs))
        outs = await self.state.run_all(rid, [j.input_ids for j in jobs], [j.params for j in jobs], req.n)
        choices = [
            self._completion_choice(i, out, jobs[i // req.n].input_ids, req) for i, out in enumerate(outs)
        ]
        usage = _usage(outs, sum(len(j.input_ids) for j in jobs))
        body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model}
        return JSONResponse({**body, "choices": choices, "usage": usage})

    def _completion_choice(
        self, index: int, out: dict, prompt_ids: list[int], req: CompletionRequest
    ) -> dict:
        text = out["text"]
        if req.echo:
            text = self.state.tokenizer.decode(prompt_ids) + text
        logprobs = None
        if req.logprobs is not None:
            meta = out["meta_info"]
            pairs = (meta.get("input_token_logprobs", []) if req.echo else []) + meta["output_token_logprobs"]
            tops = (meta.get("input_top_logprobs", []) if req.echo else []) + meta.get(
                "output_top_logprobs", []
            )
            logprobs = self._legacy_logprobs(pairs, tops, req.logprobs)
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": _finish(out["meta_info"]),
        }

    def _legacy_logprobs(self, pairs: list, tops: list, k: int) -> dict:
        tok = self.state.tokenizer
        tokens = [tok.decode([t], skip_special_tokens=False) for _, t in pairs]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        top = [
            {tok.decode([t], skip_special_tokens=False): lp for t, lp in (row or [])[:k]} if k else None
            for row in (tops or [[]] * len(pairs))
        ]
        return {
            "tokens": tokens,
            "token_logprobs": [lp for lp, _ in pairs],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    async def _completion_chunks(
        self, req: CompletionRequest, rid: str, jobs: list[_Job]
    ) -> AsyncIterator[str]:
        created = int(time.time())
        finals: list[dict] = []
        async for index, delta, out in self.state.stream_all(
            rid, [j.input_ids for j in jobs], [j.params for j in jobs], req.n
        ):
            if delta is None:
                finals.append(out)
                continue
            text, finish = delta, _finish(out["meta_info"])
            chunk = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            yield _sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": req.model,
                    "choices": [chunk],
                }
            )
        if req.stream_options and req.stream_options.include_usage:
            usage = _usage(finals, sum(len(j.input_ids) for j in jobs))
            body = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
            yield _sse({**body, "choices": [], "usage": usage})
        yield _sse("[DONE]")

    # -- /v1/chat/completions ---------------------------------------------------
    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.get("type") != "text" for part in content):
                    raise RequestError("only text content parts are supported", f"messages.{i}.content")
                content = "".join(str(part.get("text", "")) for part in content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content or ""})
        text = self.state.render_chat(messages)
        return self.state.encode(text, "messages", add_special_tokens=False)

    async def chat(self, req: ChatCompletionRequest) -> Any:
        self.state.check_model(req.model)
        _reject_unsupported(req)
        constraint = await _check_constraint(self.state, req)
        ids = self._chat_prompt(req)
        max_tokens = self.state.check_budget(ids, req.max_completion_tokens or req.max_tokens, "max_tokens")
        params = _params(req, max_tokens) | constraint
        if req.logprobs:
            params.update(return_logprob=True, top_logprobs_num=req.top_logprobs or 0)
        rid = req.rid or f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._stream(self._chat_chunks(req, rid, ids, params))
        outs = await self.state.run_all(rid, [ids], [params], req.n)
        choices = []
        for i, out in enumerate(outs):
            choice = {
                "index": i,
                "message": {"role": "assistant", "content": out["text"]},
                "logprobs": self._chat_logprobs(out["meta_info"], req) if req.logprobs else None,
                "finish_reason": _finish(out["meta_info"]),
            }
            choices.append(choice)
        body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model}
        return JSONResponse({**body, "choices": choices, "usage": _usage(outs)})

    def _chat_logprobs(self, meta: dict, req: ChatCompletionRequest, start: int = 0) -> dict:
        tok = self.state.tokenizer
        tops = meta.get("output_top_logprobs") or [[]] * len(meta["output_token_logprobs"])
        content = []
        for (lp, t), top in list(zip(meta["output_token_logprobs"], tops, strict=False))[start:]:
            text = tok.decode([t], skip_special_tokens=False)
            content.append(
                {
                    "token": text,
                    "logprob": lp,
                    "bytes": list(text.encode("utf-8")),
                    "top_logprobs": [
                        {
                            "token": (s := tok.decode([i], skip_special_tokens=False)),
                            "logprob": v,
                            "bytes": list(s.encode()),
                        }
                        for i, v in (top or [])[: req.top_logprobs or 0]
                    ],
                }
            )
        return {"content": content}

    async def _chat_chunks(
        self, req: ChatCompletionRequest, rid: str, ids: list[int], params: dict
    ) -> AsyncIterator[str]:
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
        for i in range(req.n):
            yield _sse(
                {
                    **head,
                    "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ],
                }
            )
        finals: list[dict] = []
        sent_logprobs = [0] * req.n
        async for index, delta, out in self.state.stream_all(rid, [ids], [params], req.n):
            if delta is None:
                finals.append(out)
                continue
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": delta},
                "finish_reason": _finish(out["meta_info"]),
            }
            if req.logprobs:
                choice["logprobs"] = self._chat_logprobs(out["meta_info"], req, sent_logprobs[index])
                sent_logprobs[index] = len(out["meta_info"]["output_token_logprobs"])
            yield _sse({**head, "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(finals)})
        yield _sse("[DONE]")

    @staticmethod
    def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            except RequestError as e:  # a client that goes away cancels this; the generators' finally aborts
                yield _sse({"error": {"message": str(e), "type": "invalid_request_error", "param": e.param}})

        return StreamingResponse(guarded(), media_type="text/event-stream")
