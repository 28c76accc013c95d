"""The FastAPI app: OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``, plus
``/health`` and ``/metrics``. Requests are checked on the event loop (a bad one is answered 400 at
once, without taking a queue slot), then queued for the :class:`~qwen_export.serve.worker.Worker`,
which takes them in arrival order: one at a time, or up to ``max_batch`` decoded together."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_export.errors import OptionError
from qwen_export.runtime.openai_shapes import generation_options
from qwen_export.serve import protocol
from qwen_export.serve.errors import APIError, ErrorType
from qwen_export.serve.images import ImagePolicy
from qwen_export.serve.metrics import Metrics
from qwen_export.serve.streaming import DONE, ChatChunks, CompletionChunks, sse
from qwen_export.serve.worker import Event, EventKind, Job, QueueFull, Worker

__all__ = ["DEFAULT_MAX_QUEUE", "MAX_BODY_BYTES", "ServerState", "create_app"]

DEFAULT_MAX_QUEUE = 64
#: rows decoded together when ``max_batch`` is None (auto) and the engine can batch
AUTO_MAX_BATCH = 8
MAX_BODY_BYTES = 8 << 20
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
_UNAUTHORIZED = "missing or wrong API key (Authorization: Bearer KEY)"
#: how often a request waiting for its turn checks that its client is still there (seconds)
DISCONNECT_POLL_S = 0.25


class ServerState:
    """The model (loaded at startup when given as a path), its worker and the metrics."""

    def __init__(
        self,
        source: Any,
        model_name: str | None,
        max_queue: int,
        load_options: Mapping[str, Any],
        max_batch: int | None = 1,
        image_root: str | Path | None = None,
    ) -> None:
        #: what a vision-language model's requests may read images from (data URLs; files under image_root)
        self.images = ImagePolicy(None if image_root is None else Path(image_root))
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise OptionError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
            raise OptionError(f"max_batch must be an integer >= 1 or None (auto), got {max_batch!r}")
        self.max_batch = max_batch
        self.path = Path(source) if isinstance(source, str | Path) else None
        if self.path is None and not callable(getattr(source, "chat_stream", None)):
            raise OptionError(f"serve an LLM (qwen_export.load) or an artifact path, got {type(source).__name__}")
        self.llm = None if self.path is not None else source
        where = self.path if self.path is not None else getattr(getattr(source, "artifact", None), "path", None)
        self.model = model_name or (Path(where).name if where is not None else "qwen-export")
        self.max_queue, self.load_options = max_queue, dict(load_options)
        self.metrics = Metrics()
        self.worker: Worker | None = None
        self.load_error: str | None = None

    def start(self) -> None:
        if self.llm is not None:
            self._ready(self.llm)
        else:
            threading.Thread(target=self._load, name="qwen-export-serve-load", daemon=True).start()

    def _load(self) -> None:
        from qwen_export.runtime.llm import load

        try:
            self._ready(load(self.path, **self.load_options))
        except Exception as exc:  # noqa: BLE001 - reported by /health and every request
            self.load_error = " ".join(f"loading {self.path} failed: {exc}".split())

    def _ready(self, llm: Any) -> None:
        try:
            worker = Worker(llm, self.metrics, self.max_queue, self._batch_size(llm))
        except Exception as exc:  # noqa: BLE001 - an engine that cannot batch: reported like a load error
            self.load_error = " ".join(f"cannot serve {self.model}: {exc}".split())
            return
        worker.start()
        self.llm, self.worker = llm, worker

    def _batch_size(self, llm: Any) -> int:
        """``max_batch``, or for None (auto) AUTO_MAX_BATCH where the engine batches and 1 where it does not."""
        if self.max_batch is not None:
            return self.max_batch
        opener = getattr(getattr(llm, "engine", None), "open_rows", None)
        if opener is None or not callable(getattr(llm, "batched", None)):
            return 1
        try:
            llm.batched(AUTO_MAX_BATCH)
        except OptionError as exc:
            _log(f"serving one request at a time: {exc}")
            return 1
        return AUTO_MAX_BATCH

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def ready_worker(self) -> Worker:
        if self.load_error is not None:
            raise APIError(503, self.load_error, ErrorType.UNAVAILABLE)
        if self.worker is None:
            raise APIError(503, "the model is loading; retry shortly", ErrorType.UNAVAILABLE, code="model_loading")
        return self.worker


def create_app(
    llm_or_artifact: Any,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    model_name: str | None = None,
    load_options: Mapping[str, Any] | None = None,
    max_batch: int | None = 1,
    image_root: str | Path | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over an ``LLM`` or an artifact directory (loaded in the background at
    startup with ``qwen_export.load(path, **load_options)``; 503 until then). ``api_key``: required
    as ``Authorization: Bearer KEY`` on ``/v1/*``. ``max_queue``: requests that may wait while one
    generates (429 beyond). ``model_name``: the served id (default: the artifact directory's name).
    ``max_batch``: requests decoded together (``LLM.batched``; 1: one at a time, None: auto).
    ``image_root``: a VL model's requests may name image files under it (:mod:`.images`)."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise OptionError("api_key must be a non-empty string or None")
    state = ServerState(llm_or_artifact, model_name, max_queue, load_options or {}, max_batch, image_root)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="qwen-export", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _error_handlers(app)
    app.add_middleware(CountRequests, metrics=state.metrics)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, _UNAUTHORIZED, ErrorType.AUTHENTICATION, code="invalid_api_key")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request) -> Response:
        worker = state.ready_worker()
        images = state.images if getattr(worker.llm, "multimodal", None) is not None else None
        call = protocol.parse_chat(await _json_body(request), state.model, worker.llm.max_context, images)
        _check_options(worker.llm, call.options)
        chunks = ChatChunks(state.model, call.streaming.include_usage, call.parses_tool_calls)
        return await _respond(request, worker, call, chunks, protocol.chat_response, state.model)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request) -> Response:
        worker = state.ready_worker()
        call = protocol.parse_completion(await _json_body(request), state.model)
        _check_options(worker.llm, call.options)
        chunks = CompletionChunks(state.model, call.streaming.include_usage)
        return await _respond(request, worker, call, chunks, protocol.completion_response, state.model)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        entry: dict[str, Any] = {"id": state.model, "object": "model", "created": 0, "owned_by": "qwen-export"}
        if state.llm is not None:
            entry["max_model_len"] = state.llm.max_context
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> Response:
        if state.worker is not None:
            return JSONResponse({"status": "ok", "model": state.model, "queue": state.worker.waiting})
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "model": state.model, "error": state.load_error}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _log(message: str) -> None:
    import sys

    print(f"qwen-export serve: {message}", file=sys.stderr, flush=True)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:  # a bug: still OpenAI's shape, 500
        error = APIError.from_exception(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = ErrorType.INVALID_REQUEST if exc.status_code < 500 else ErrorType.SERVER
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)


class CountRequests:
    """ASGI middleware: counts every HTTP response by endpoint and status (streaming-safe)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            path = scope.get("path", "")
            self.metrics.request(path if path in ENDPOINTS else "other", status)


async def _json_body(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise APIError.bad_request(f"the request body is not valid JSON: {' '.join(str(exc).split())}") from None


def _check_options(llm: Any, options: Mapping[str, Any]) -> None:
    """The sampling options as the runtime will take them: a bad one is a 400 before queueing."""
    try:
        llm.artifact.generation_config(**generation_options(options))
    except Exception as exc:  # noqa: BLE001 - OptionError: 400; anything else: 500
        raise APIError.from_exception(exc) from exc


class _Watch:
    """The events of one job for a handler that is not streaming: a client that went away meanwhile
    (checked every DISCONNECT_POLL_S, whether events come or not) cancels the job."""

    def __init__(self, request: Request, job: Job, events: asyncio.Queue[Event]) -> None:
        self.request, self.job, self.events = request, job, events
        self.checked = time.monotonic()

    async def next(self) -> Event:
        while True:
            if time.monotonic() - self.checked >= DISCONNECT_POLL_S:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.job.cancel()
                    raise APIError(499, "the client closed the request")
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue


async def _respond(request: Request, worker: Worker, call: Any, chunks: Any, build: Any, model: str) -> Response:
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job = Job(call.start, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    try:
        worker.submit(job)
    except QueueFull as exc:
        raise APIError(
            429, f"the server is busy: {exc}; retry later", ErrorType.RATE_LIMIT, code="queue_full"
        ) from None
    watch = _Watch(request, job, events)
    try:
        first = await watch.next()  # STARTED, or the runtime refused the request
        if first.kind is EventKind.ERROR:
            raise APIError.from_exception(first.value, call.prompt_param)
        if call.streaming.on:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
            return StreamingResponse(_sse(job, events, chunks), media_type="text/event-stream", headers=headers)
        while (event := await watch.next()).kind is EventKind.PIECE:
            pass
    except BaseException:
        job.cancel()
        raise
    if event.kind is EventKind.ERROR:
        raise APIError.from_exception(event.value)
    return JSONResponse(build(event.value, model))


async def _sse(job: Job, events: asyncio.Queue[Event], chunks: Any) -> AsyncIterator[str]:
    """The SSE body; when the client goes away Starlette cancels this generator: the job is cancelled."""
    try:
        for text in chunks.first():
            yield text
        while True:
            event = await events.get()
            if event.kind is EventKind.PIECE:
                for text in chunks.piece(event.value, event.logprobs):
                    yield text
                continue
            if event.kind is EventKind.ERROR:
                yield sse(APIError.from_exception(event.value).body())
            elif event.value is not None:  # DONE with a result (None: cancelled)
                for text in chunks.finish(event.value):
                    yield text
            break
        yield DONE
    finally:
        job.cancel()  # a no-op once the generation has ended
