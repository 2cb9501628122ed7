"""The OpenAI-compatible HTTP API (FastAPI) over one `Engine`.

  POST /v1/chat/completions   chat completions, `stream: true` as server-sent events ending with [DONE]
  GET  /v1/models             the one served model
  GET  /health                {"status": "ok" | "draining", "active": n, "waiting": n, "finished": {reason: n}}

Every refused request is an OpenAI error body with a 4xx status (`protocol.APIError`); when an API key is
configured, /v1/* needs `Authorization: Bearer KEY` (401 otherwise). A streaming client that disconnects has
its request cancelled, which frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_jax.serve.engine import Engine, EngineError, FinishEvent, ShuttingDownError, TokenEvent
from llava_jax.serve.protocol import APIError, ChatRequest, ImageSource, parse_chat_request

log = logging.getLogger("llava_jax.serve")


class Service:
    """What the routes and the web page share: the engine, the loaded model, its served name, the image
    source and a lock that keeps tokenizer calls of request parsing one at a time."""

    def __init__(self, engine: Engine, model_name: str, images_from: ImageSource):
        self.engine, self.loaded = engine, engine.loaded
        self.model_name, self.images_from = model_name, images_from
        self.lock = threading.Lock()

    def parse(self, body: Any) -> ChatRequest:
        with self.lock:
            return parse_chat_request(body, self.loaded, self.model_name, self.images_from, self.engine.max_len)

    async def events(self, chat: ChatRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Submits a checked request and yields its events; leaving early (a disconnected client) cancels it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            req = self.engine.submit(chat.prompt_ids, chat.pixels, chat.params,
                                     sink=lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        except ShuttingDownError as e:
            raise APIError(str(e), 503, "service_unavailable", e.code) from e
        except EngineError as e:
            raise APIError(str(e), 400, code=e.code) from e
        try:
            while True:
                ev = await q.get()
                yield ev
                if isinstance(ev, FinishEvent):
                    return
        finally:
            if not req.done.is_set():
                req.cancel()


def _usage(fin: FinishEvent) -> dict[str, int]:
    n = len(fin.token_ids)
    return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": n, "total_tokens": fin.prompt_tokens + n}


def _server_error(fin: FinishEvent) -> APIError:
    return APIError(f"generation failed: {fin.error}", 500, "server_error")


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    """The FastAPI app. The engine is stopped (after its requests finish) when the app shuts down."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await run_in_threadpool(service.engine.stop, 600)

    app = FastAPI(title="llava_jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(exc.detail), exc.status_code, kind).body(), status_code=exc.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError("a valid API key is required (Authorization: Bearer ...)", 401,
                           "authentication_error", "invalid_api_key")

    @app.get("/health")
    async def health():
        e = service.engine
        status = "draining" if e._draining.is_set() else "ok"
        return {"status": status, "active": e.active(), "waiting": e.waiting(), "model": service.model_name,
                "finished": dict(e.finished)}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "llava_jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(f"the request body is not valid JSON ({e})", 400) from e
        chat = await run_in_threadpool(service.parse, body)
        rid = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        events = service.events(chat)
        if chat.stream:
            first = await anext(events)  # submit now: a refused request is still an error status, not a stream
            return StreamingResponse(_sse(events, first, chat, rid, created, service.model_name),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        fin = None
        async for ev in events:
            fin = ev
        if fin.reason == "error":
            raise _server_error(fin)
        choice = {"index": 0, "message": {"role": "assistant", "content": fin.text}, "finish_reason": fin.reason,
                  "logprobs": None}
        if chat.return_token_ids:
            choice["token_ids"] = fin.token_ids
        return {"id": rid, "object": "chat.completion", "created": created, "model": service.model_name,
                "choices": [choice], "usage": _usage(fin)}

    return app


async def _sse(events: AsyncIterator, first, chat: ChatRequest, rid: str, created: int, model: str):
    """Server-sent events: a role chunk, content chunks, a finish chunk (+ a usage chunk when asked), [DONE]."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for text in _sse_body(events, first, chat, rid, created, model, chunk):
            yield text
    finally:
        await events.aclose()  # a disconnected client: cancels the request, which frees its slot


async def _sse_body(events, first, chat, rid, created, model, chunk):
    ev = first
    while True:
        if isinstance(ev, TokenEvent):
            if ev.text:
                yield chunk({"content": ev.text})
        else:
            if ev.reason == "error":
                yield f"data: {json.dumps(_server_error(ev).body())}\n\n"
                break
            if ev.text_delta:
                yield chunk({"content": ev.text_delta})
            extra = {"token_ids": ev.token_ids} if chat.return_token_ids else {}
            yield chunk({}, ev.reason, **extra)
            if chat.include_usage:
                yield f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'choices': [], 'usage': _usage(ev)})}\n\n"
            break
        ev = await anext(events)
    yield "data: [DONE]\n\n"
