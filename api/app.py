"""The HTTP app: OpenAI's endpoints, the chat page and the swarm monitor, for models the swarm serves.

Handlers run on uvicorn's event loop and only tokenize, validate and relay:
every generation runs in a thread of its own (api/generation.py) with its own
inference session, so concurrent requests share the swarm instead of queueing
behind one another. Whatever is wrong with a request is found before its
session opens and answered in OpenAI's error shape: unknown model 404, bad
parameters 400, no full chain of workers 503 (naming the missing blocks).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from corolla.api.generation import Generation, SamplingParams
from corolla.api.metrics import ApiMetrics
from corolla.api.openai_schema import (MAX_STOP_SEQUENCES, AssistantMessage, ChatChoice, ChatChunkChoice,
                                       ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage,
                                       Completion, CompletionChoice, CompletionRequest, Delta, ErrorBody,
                                       ErrorResponse, ModelCard, ModelList, Usage, new_id, now)
from corolla.api.swarm import SwarmState
from corolla.bus.errors import CorollaError, MissingBlocksError, RemoteError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_CHAT_MAX_TOKENS = 512  # OpenAI's chat default is "until the context is full"; that is minutes on CPU workers
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client still waits
SSE_DONE = "data: [DONE]\n\n"


@dataclass
class ServedModel:
    """A model the API offers: the client half (embeddings, LM head) and its tokenizer."""

    id: str
    model: Any
    tokenizer: Any
    num_blocks: int
    context_length: int
    eos_token_ids: frozenset[int]
    created: int

    @classmethod
    def load(cls, folder: str, **client_kwargs) -> "ServedModel":
        """Load the local half from `folder`; its name is the model id, as workers announce it by default."""
        from transformers import AutoTokenizer

        from corolla.client.model import AutoDistributedModelForCausalLM

        model = AutoDistributedModelForCausalLM.from_pretrained(folder, **client_kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        return cls(id=os.path.basename(os.path.normpath(folder)), model=model, tokenizer=tokenizer,
                   num_blocks=model.remote_layers.num_blocks, context_length=model.config.max_position_embeddings,
                   eos_token_ids=frozenset(eos_ids), created=int(time.time()))


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, ErrorBody(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.body).model_dump(), status_code=self.status)


def swarm_error(e: BaseException) -> ApiError:
    """What a failure of the swarm during generation means to an HTTP client."""
    if isinstance(e, MissingBlocksError):
        return ApiError(503, f"the swarm cannot serve {e.model} in full: {e}", "server_error", code="missing_blocks")
    if isinstance(e, RemoteError):
        return ApiError(503 if e.retryable else 502, str(e), "server_error", code=str(e.code).lower())
    if isinstance(e, CorollaError):
        return ApiError(502, str(e), "server_error", code="swarm_error")
    log.error("generation failed", exc_info=e)
    return ApiError(500, f"{type(e).__name__}: {e}", "server_error", code="internal_error")


def create_app(models: list[ServedModel], swarm: SwarmState, metrics: ApiMetrics | None = None) -> FastAPI:
    served = {m.id: m for m in models}
    metrics = metrics or ApiMetrics()
    # No Swagger/ReDoc pages: they load their scripts from a CDN, and everything here works offline.
    app = FastAPI(title="Corolla", summary="OpenAI-compatible API over a Corolla swarm", docs_url=None, redoc_url=None)
    app.add_middleware(_CountRequests, metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- errors in OpenAI's shape ---------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON").response()
        param = ".".join(str(x) for x in first["loc"] if x != "body") or None
        return ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    # ---- models ---------------------------------------------------------------------------------

    def lookup(name: str) -> ServedModel:
        model = served.get(name)
        if model is None:
            raise ApiError(404, f"the model {name!r} does not exist; this server offers {', '.join(served)}",
                           param="model", code="model_not_found")
        return model

    def require_chain(model: ServedModel) -> None:
        missing = swarm.missing(model.id, model.num_blocks)
        if missing:
            raise swarm_error(MissingBlocksError(model.id, missing))

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        """The offered models the swarm can serve in full right now."""
        return ModelList(data=[ModelCard(id=m.id, created=m.created) for m in served.values()
                               if not swarm.missing(m.id, m.num_blocks)])

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> ModelCard:
        model = lookup(name)
        return ModelCard(id=model.id, created=model.created)

    # ---- generation ---------------------------------------------------------------------------

    def sampling(body, model: ServedModel, prompt_tokens: int, max_tokens: int | None) -> SamplingParams:
        if prompt_tokens == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = model.context_length - prompt_tokens
        max_tokens = max_tokens or min(DEFAULT_CHAT_MAX_TOKENS, room)
        if max_tokens > room:
            raise ApiError(400, f"this model's context is {model.context_length} tokens; the prompt has "
                                f"{prompt_tokens} and max_tokens asks for {max_tokens} more",
                           param="max_tokens", code="context_length_exceeded")
        stops = body.stop_list()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
        return SamplingParams(max_tokens, body.temperature, body.top_p, tuple(stops), body.seed)

    def start(model: ServedModel, prompt_ids: list[int], params: SamplingParams) -> Generation:
        require_chain(model)
        metrics.sessions_open.labels(model.id).inc()

        def finished(g: Generation) -> None:
            ended = time.perf_counter()
            metrics.sessions_open.labels(model.id).dec()
            metrics.tokens.labels(model.id, "prompt").inc(g.prompt_tokens)
            metrics.tokens.labels(model.id, "completion").inc(g.completion_tokens)
            metrics.generations.labels(model.id, g.outcome).inc()
            if g.first_token_at is not None:
                metrics.first_token.labels(model.id).observe(g.first_token_at - g.started_at)
                if g.completion_tokens > 1:
                    metrics.token_seconds.labels(model.id).observe(
                        (ended - g.first_token_at) / (g.completion_tokens - 1))

        generation = Generation(model.model, model.tokenizer, prompt_ids, params, model.eos_token_ids, finished)
        generation.start()
        return generation

    async def collect(generation: Generation, request: Request) -> str:
        """The whole reply; a client that hangs up before it is complete stops the generation."""
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, generation))
        try:
            return "".join([delta async for delta in generation.text()])
        except Exception as e:
            raise swarm_error(e) from e
        finally:
            watcher.cancel()
            if generation.outcome is None:  # the request itself was cancelled (server shutting down)
                generation.cancel()

    async def stream(generation: Generation, chunk, final, usage) -> StreamingResponse:
        """Server-sent events: `chunk(text)` per delta, `final(reason)`, `usage()` if asked for, then [DONE].
        Waits for the first text first, so a chain that fails to open still gets an HTTP error status."""
        text = generation.text()
        try:
            first = await anext(text, None)
        except asyncio.CancelledError:
            generation.cancel()
            raise
        except Exception as e:
            raise swarm_error(e) from e

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                if first is not None:
                    yield _sse(chunk(first))
                async for delta in text:
                    yield _sse(chunk(delta))
                finished = True
                yield _sse(final(generation.finish_reason))
                if usage is not None:
                    yield _sse(usage())
                yield SSE_DONE
            except Exception as e:  # the swarm failed mid-reply: OpenAI's clients raise on an error event
                finished = True
                yield _sse(ErrorResponse(error=swarm_error(e).body))
            finally:
                if not finished:  # the client went away: stop generating, which closes the session
                    generation.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage_of(generation: Generation) -> Usage:
        return Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens,
                     total_tokens=generation.prompt_tokens + generation.completion_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model = lookup(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        ids = model.tokenizer(prompts[0]).input_ids
        generation = start(model, ids, sampling(body, model, len(ids), body.max_tokens))
        rid, created = new_id("cmpl"), now()

        def completion(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
            return Completion(id=rid, created=created, model=model.id, choices=choices, usage=usage)

        if not body.stream:
            text = await collect(generation, request)
            return completion([CompletionChoice(text=text, finish_reason=generation.finish_reason)],
                              usage_of(generation))
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await stream(generation, lambda text: completion([CompletionChoice(text=text)]),
                            lambda reason: completion([CompletionChoice(text="", finish_reason=reason)]),
                            (lambda: completion([], usage_of(generation))) if include_usage else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = lookup(body.model)
        ids = _chat_prompt(model, body.messages)
        generation = start(model, ids, sampling(body, model, len(ids), body.max_completion_tokens or body.max_tokens))
        rid, created = new_id("chatcmpl"), now()

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=model.id, choices=choices, usage=usage)

        if not body.stream:
            text = await collect(generation, request)
            return ChatCompletion(id=rid, created=created, model=model.id, usage=usage_of(generation), choices=[
                ChatChoice(message=AssistantMessage(content=text), finish_reason=generation.finish_reason)])
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        sent_role = False

        def delta(text: str) -> ChatCompletionChunk:
            nonlocal sent_role
            role, sent_role = (None if sent_role else "assistant"), True
            return chunk([ChatChunkChoice(delta=Delta(role=role, content=text))])

        return await stream(generation, delta, lambda reason: chunk([ChatChunkChoice(delta=Delta(),
                                                                                     finish_reason=reason)]),
                            (lambda: chunk([], usage_of(generation))) if include_usage else None)

    # ---- pages, swarm, metrics ------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> RedirectResponse:
        return RedirectResponse("/chat")

    @app.get("/chat", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC / "chat.html")

    @app.get("/monitor", include_in_schema=False)
    async def monitor_page() -> FileResponse:
        return FileResponse(STATIC / "monitor.html")

    @app.get("/api/swarm")
    async def swarm_snapshot() -> dict:
        """The swarm as the monitor draws it, and which offered models have a full chain."""
        snapshot = swarm.snapshot()
        snapshot["served"] = [{"id": m.id, "num_blocks": m.num_blocks,
                               "missing": [list(g) for g in swarm.missing(m.id, m.num_blocks)]}
                              for m in served.values()]
        return snapshot

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _chat_prompt(model: ServedModel, messages: list[ChatMessage]) -> list[int]:
    """The conversation through the tokenizer's chat template, ready for the assistant's turn."""
    tokenizer = model.tokenizer
    if not tokenizer.chat_template:
        raise ApiError(400, f"the model {model.id!r} has no chat template; use /v1/completions", param="messages")
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # templates raise on conversations they do not support (roles, order)
        raise ApiError(400, f"the chat template rejects these messages: {e}", param="messages") from e
    return tokenizer(text, add_special_tokens=False).input_ids


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    generation.cancel()


def _sse(event) -> str:
    return f"data: {event.model_dump_json(exclude_none=True)}\n\n"


class _CountRequests:
    """ASGI middleware counting requests by route and status (a plain ASGI layer: it leaves streaming and
    client-disconnect handling to the response)."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.request_seconds.labels(_route(scope)).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(_route(scope), str(status)).inc()


def _route(scope) -> str:
    """The matched route's template (bounded label values), not the raw path."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched") if route is not None else "unmatched"
