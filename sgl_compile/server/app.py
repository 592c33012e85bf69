"""The HTTP server: FastAPI app (OpenAI + SGLang native API), its lifecycle, and `serve`.

This process tokenizes, validates and streams; the model runs in the scheduler
process, so no handler ever waits on a forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from sgl_compile.errors import SglcError
from sgl_compile.models.loading import open_checkpoint
from sgl_compile.runtime.launch import EngineArgs
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.server.client import EngineClient, SchedulerDied
from sgl_compile.server.metrics import Metrics
from sgl_compile.server.openai_api import OpenAIServing
from sgl_compile.server.protocol import (
    AbortRequest,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
)
from sgl_compile.server.state import RequestError, ServerState

log = logging.getLogger("sgl_compile.server")


@dataclass(frozen=True)
class ServerArgs:
    engine: EngineArgs
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queued_requests: int = 4096


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(f"malformed JSON body: {first.get('ctx', {}).get('error', '')}"), 400)
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return JSONResponse(error_body(message, param), status_code=400)


def create_app(
    args: ServerArgs, exit_state: dict[str, Any] | None = None, engine_client: EngineClient | None = None
) -> FastAPI:
    """The app; its start-up waits for the scheduler process (`engine_client`'s, if already spawned)."""
    model = args.engine.model
    if args.engine.compiled:  # the artifact names its model and carries its tokenizer
        from sgl_compile.artifact import artifact_tokenizer

        model, artifact_tok = artifact_tokenizer(args.engine.compiled)
    served = args.served_model_name or model
    holder: dict[str, ServerState] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("loading tokenizer for %s", model)
        tokenizer = artifact_tok if args.engine.compiled else open_checkpoint(model).tokenizer
        metrics = Metrics(lambda: holder["state"].client.stats)
        client = engine_client or EngineClient(args.engine)
        client.on_update = metrics.update

        def on_death() -> None:
            if exit_state is not None:
                exit_state["code"] = 1
                exit_state["server"].should_exit = True

        e = args.engine
        log.info("waiting for the scheduler process (%s)",
                 f"artifact {e.compiled}" if e.compiled else f"model {model}, {e.dtype}, {e.device}")  # fmt: skip
        ready = await client.start(on_death)
        holder["state"] = ServerState(client, tokenizer, metrics, model, served, args.max_queued_requests)
        app.state.openai = OpenAIServing(holder["state"])
        log.info("KV pool %d tokens; ready at http://%s:%d", ready.max_total_tokens, args.host, args.port)
        try:
            yield
        finally:
            log.info("shutting down")
            await client.shutdown()

    app = FastAPI(title="sgl-compile", lifespan=lifespan)

    def state() -> ServerState:
        return holder["state"]

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, exc: RequestError) -> JSONResponse:
        kind = "invalid_request_error" if exc.status < 500 else "server_overloaded"
        return JSONResponse(error_body(str(exc), exc.param, kind), status_code=exc.status)

    @app.exception_handler(SchedulerDied)
    async def _dead(request: Request, exc: SchedulerDied) -> JSONResponse:
        return JSONResponse(error_body(str(exc), None, "server_error"), status_code=503)

    @app.exception_handler(SglcError)
    async def _user_error(request: Request, exc: SglcError) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        if args.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            if not secrets.compare_digest(header, f"Bearer {args.api_key}"):
                return JSONResponse(
                    error_body("invalid or missing API key", None, "authentication_error"), 401
                )
        return await call_next(request)

    # -- health and info ----------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if "state" not in holder or state().client.dead:
            return PlainTextResponse("unhealthy", status_code=503)
        return PlainTextResponse("ok")

    @app.get("/health_generate")
    async def health_generate() -> Response:
        params = {"max_new_tokens": 1, "temperature": 0}
        out = await state().run_all(
            f"health-{uuid.uuid4().hex}", [state().encode("ping", "text")], [params], 1
        )
        return PlainTextResponse("ok" if out[0]["meta_info"]["completion_tokens"] == 1 else "unhealthy")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": served, "object": "model", "created": 0, "owned_by": "sgl-compile"}
        return {"object": "list", "data": [{**card, "max_model_len": state().context_length}]}

    @app.get("/get_model_info")
    async def model_info() -> dict:
        ready = state().client.ready
        return {
            "model_path": model,
            "served_model_name": served,
            "is_generation": True,
            "context_length": ready.context_length,
            "vocab_size": ready.vocab_size,
        }

    @app.get("/get_server_info")
    async def server_info() -> dict:
        info = dataclasses.asdict(args.engine) | {
            "host": args.host,
            "port": args.port,
            "served_model_name": served,
        }
        stats = await state().client.query("stats")  # fresh, not the last step's
        return info | {"max_total_tokens": state().client.ready.max_total_tokens, "stats": stats}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state().metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        if await state().client.query("flush"):
            return PlainTextResponse("Cache flushed.")
        return JSONResponse(error_body("requests are in flight; the cache was not flushed"), status_code=400)

    @app.post("/abort_request")
    async def abort_request(body: AbortRequest) -> dict:
        await state().client.abort(body.rid)
        return {"rid": body.rid}

    # -- native generate ----------------------------------------------------------
    @app.post("/generate")
    async def generate(body: GenerateRequest) -> Response:
        s = state()
        if (body.text is None) == (body.input_ids is None):
            raise RequestError("give exactly one of text and input_ids", "text")
        batch = isinstance(body.text, list) or (bool(body.input_ids) and isinstance(body.input_ids[0], list))
        if isinstance(body.text, str):
            prompts = [s.encode(body.text, "text")]
        elif body.text is not None:
            prompts = [s.encode(t, "text") for t in body.text]
        else:
            prompts = [s.check_ids(x, "input_ids") for x in (body.input_ids if batch else [body.input_ids])]
        if not prompts:
            raise RequestError("the batch is empty", "text")
        raw = dict(body.sampling_params or {})
        raw.update(return_logprob=body.return_logprob, logprob_start_len=body.logprob_start_len)
        raw["top_logprobs_num"] = body.top_logprobs_num
        try:
            sampling = SamplingParams.from_dict(raw)
        except SglcError as e:
            raise RequestError(str(e), "sampling_params") from None
        n, constraint = sampling.n, sampling.constraint
        await s.check_constraint(constraint, f"sampling_params.{constraint[0]}" if constraint else "")
        raw.pop("n", None)
        params = [
            dict(raw, max_new_tokens=s.check_budget(p, raw.get("max_new_tokens", 128), "max_new_tokens"))
            for p in prompts
        ]
        rid = body.rid if isinstance(body.rid, str) else uuid.uuid4().hex
        if body.stream:
            return StreamingResponse(
                _native_stream(s, rid, prompts, params, n), media_type="text/event-stream"
            )
        outs = await s.run_all(rid, prompts, params, n)
        return JSONResponse(outs if batch or n > 1 else outs[0])

    # -- OpenAI -------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return await app.state.openai.completions(body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        return await app.state.openai.chat(body)

    return app


async def _native_stream(s: ServerState, rid: str, prompts: list, params: list, n: int) -> AsyncIterator[str]:
    try:
        async for index, delta, out in s.stream_all(rid, prompts, params, n):
            if delta is not None:
                yield f"data: {json.dumps({**out, 'index': index}, ensure_ascii=False)}\n\n"
    except RequestError as e:
        yield f"data: {json.dumps(error_body(str(e), e.param))}\n\n"
    yield "data: [DONE]\n\n"


def serve(args: ServerArgs, engine_client: EngineClient | None = None) -> int:
    """Run until SIGINT/SIGTERM (exit 0) or until the scheduler process dies (exit 1)."""
    exit_state: dict[str, Any] = {"code": 0}
    app = create_app(args, exit_state, engine_client)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    exit_state["server"] = server
    started = time.perf_counter()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal under the handler that
    # was installed before it; make that a no-op so a requested shutdown ends with exit code 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started and exit_state["code"] == 0:
        return 1  # start-up failed (logged by uvicorn)
    log.info("server ran %.0fs", time.perf_counter() - started)
    return exit_state["code"]
