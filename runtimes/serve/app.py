"""`sparsec serve`: an HTTP inference server (FastAPI + uvicorn) for one compiled artifact.

Routes: POST /v1/embeddings (encoders), POST /v1/completions and /v1/chat/completions (causal LMs, SSE
streaming; chat through the tokenizer's chat template),
POST /v1/infer (raw tensors, any artifact), GET /v1/models, /healthz, /readyz, /metrics.

Life cycle: the CLI verifies the artifact (sha256 manifest, backend, graph, tokenizer) before binding
the port; the runner is then built and warmed up in the background, and /readyz turns 200 when it is
done (the /v1 routes answer 503 until then). Requests go through a bounded dynamic-batching queue
(runtimes.serve.batching). SIGTERM: uvicorn stops accepting, in-flight requests finish, the batcher
drains, the process exits 0.

Status codes: 400 values the model cannot take (too many tokens...), 401 bad or missing API key,
404 unknown route or model, 413 body too large, 422 malformed JSON or wrong types, 503 queue full
(with Retry-After) / loading / shutting down, 500 only for backend failures, with an error id that
is also in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import signal
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable

from compiler.errors import SparsecError
from runtimes.decode.loop import GenRequest, GenResult, SamplingParams
from runtimes.serve.batching import Done, DynamicBatcher, QueueFull, ShuttingDown, TooLarge
from runtimes.serve.chat import ChatChunks, ChatCompletionRequest, chat_body, chat_id, render_prompt
from runtimes.serve.metrics import ServerMetrics
from runtimes.serve.model import TASK_COMPLETIONS, TASK_EMBEDDINGS, TASK_RAW, ServedModel, ServeTarget, raw_feeds
from runtimes.serve.openai_schema import (
    MAX_INPUTS,
    APIError,
    ChoiceState,
    CompletionChunks,
    CompletionRequest,
    EmbeddingsRequest,
    InferRequest,
    bad_request,
    check_lengths,
    completion_body,
    completion_id,
    embeddings_body,
    tokenize_inputs,
)

LOG = logging.getLogger("sparsec.server")
CONFIG_ENV = "SPARSEC_SERVE_CONFIG"  # JSON ServeConfig handed to `--workers` processes
API_KEY_ENV = "SPARSEC_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    artifact: str
    backend: str = "onnxruntime"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int = 0  # intra-op threads per worker; 0 = CPU cores / workers
    max_batch_size: int = 32
    seqlen: int = 128  # sequence length for backends that compile static shapes (DeepSparse)
    max_wait_ms: float = 2.0
    max_queue: int = 2048  # queued items (texts / prompts) before 503
    max_inputs: int | None = None  # items per request; None = min(OpenAI's 2048, max_queue)
    max_body_bytes: int = 2 * 1024 * 1024
    api_key: str | None = None
    model_name: str | None = None
    plugins: tuple[str, ...] = ()
    graceful_timeout_s: float = 30.0
    access_log: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        for key in ("port", "workers", "max_batch_size", "seqlen", "max_queue", "max_body_bytes"):
            if getattr(self, key) <= 0:
                raise SparsecError(f"--{key.replace('_', '-')} must be > 0, got {getattr(self, key)}")
        if self.threads < 0 or self.max_wait_ms < 0 or self.graceful_timeout_s < 0:
            raise SparsecError("--threads, --max-wait-ms and the graceful timeout must be >= 0")
        if self.max_queue < self.max_batch_size:
            raise SparsecError(f"--max-queue ({self.max_queue}) must be >= --max-batch-size ({self.max_batch_size})")
        if self.max_inputs is not None and not 0 < self.max_inputs <= self.max_queue:
            raise SparsecError(f"--max-inputs ({self.max_inputs}) must be in [1, --max-queue ({self.max_queue})]: "
                               "a request larger than the queue could never be served")

    @property
    def request_cap(self) -> int:
        """Most items (texts, prompts) in one request: never more than the queue holds."""
        return self.max_inputs if self.max_inputs is not None else min(MAX_INPUTS, self.max_queue)

    @property
    def intra_op_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, value: str) -> "ServeConfig":
        data = json.loads(value)
        data["plugins"] = tuple(data.get("plugins") or ())
        return cls(**data)


class ServerState:
    """Per-process state of one app: target, metrics, batcher, and the model once loaded."""

    def __init__(self, config: ServeConfig, target: ServeTarget):
        self.config = config
        self.target = target
        self.model_id = config.model_name or target.model_id
        self.metrics = ServerMetrics()
        self.model: ServedModel | None = None
        self.load_error: str | None = None
        self.batcher: DynamicBatcher | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        self.draining = False  # after SIGTERM: every new request gets 503 + Connection: close
        self.in_flight = 0  # requests being handled (not counting those refused while draining)

    @property
    def ready(self) -> bool:
        return self.model is not None

    async def load(self) -> None:
        try:
            self.model = await asyncio.to_thread(ServedModel.load, self.target, self.config.intra_op_threads,
                                                 self.config.max_batch_size, self.config.seqlen)
        except Exception as exc:  # noqa: BLE001 - any load failure makes this worker unhealthy
            error_id = uuid.uuid4().hex[:12]
            self.load_error = f"{type(exc).__name__}: {exc} (error id {error_id})"
            LOG.exception("error id %s: loading the model on backend '%s' failed", error_id, self.target.backend_name)
            self.on_fatal()
            return
        self.metrics.ready.labels(self.metrics.worker).set(1)
        LOG.info("model '%s' (%s, %s) loaded and warmed up: ready", self.model_id, self.target.task,
                 self.target.backend_name)

    def run_batch(self, key: str, payloads: list[Any]) -> list[Any]:
        assert self.model is not None
        return self.model.run_batch(key, payloads)

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_id:
            raise APIError(404, f"model '{requested}' not found; this server serves '{self.model_id}'",
                           code="model_not_found")

    def require(self, task: str, route: str) -> None:
        if not self.ready:
            raise APIError(503, "model is loading; retry shortly" if self.load_error is None
                           else f"model failed to load: {self.load_error}", type_="server_error",
                           headers={"Retry-After": "1"})
        if task != TASK_RAW and self.target.task != task:
            raise bad_request(f"{route} is not available for this artifact (task '{self.target.task}'); "
                              f"use {_route_for(self.target.task)}")

    def enqueue(self, key: str, payloads: list[Any]) -> list[asyncio.Future]:
        assert self.batcher is not None
        try:
            futures = self.batcher.enqueue(key, payloads)
        except QueueFull as exc:
            self.metrics.rejected.labels(self.metrics.worker, "queue_full").inc()
            raise APIError(503, str(exc), type_="server_error", code="overloaded",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except TooLarge as exc:
            self.metrics.rejected.labels(self.metrics.worker, "too_many_inputs").inc()
            raise bad_request(str(exc), code="too_many_inputs") from None
        except ShuttingDown:
            raise APIError(503, "server is shutting down", type_="server_error",
                           headers={"Retry-After": "1", "Connection": "close"}) from None
        self.metrics.queue_depth.labels(self.metrics.worker).set(self.batcher.queue_depth)
        return futures

    async def run(self, key: str, payloads: list[Any]) -> tuple[list[Any], dict[str, str]]:
        """Results in order, and a Server-Timing header: the longest queue wait and batch run (ms)."""
        futures = self.enqueue(key, payloads)
        try:
            done: list[Done] = list(await asyncio.gather(*futures))
        except Exception as exc:  # noqa: BLE001 - a failing backend call; user input was validated
            raise backend_failure(exc) from None
        timing = (f"queue;dur={1e3 * max(d.queued_s for d in done):.3f}, "
                  f"inference;dur={1e3 * max(d.run_s for d in done):.3f}")
        return [d.result for d in done], {"Server-Timing": timing}


def backend_failure(exc: BaseException) -> APIError:
    error_id = uuid.uuid4().hex[:12]
    LOG.error("error id %s: backend failure: %s: %s", error_id, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, f"internal error in the inference backend (error id {error_id})", type_="server_error",
                    error_id=error_id)


def _route_for(task: str) -> str:
    return {TASK_EMBEDDINGS: "/v1/embeddings", TASK_COMPLETIONS: "/v1/completions"}.get(task, "/v1/infer")


def create_app(config: ServeConfig, target: ServeTarget) -> Any:
    """The FastAPI application serving `target`; `app.state.sparsec` is its ServerState."""
    from fastapi import FastAPI

    state = ServerState(config, target)

    @asynccontextmanager
    async def lifespan(app):
        state.batcher = DynamicBatcher(state.run_batch, max_batch_size=config.max_batch_size,
                                       max_wait_ms=config.max_wait_ms, max_queue=config.max_queue,
                                       on_batch=state.metrics.observe_batch)
        state.batcher.start()
        loader = asyncio.create_task(state.load())
        try:
            yield
        finally:
            await state.batcher.close()
            await loader
            if state.model is not None:
                state.model.close()
            LOG.info("stopped: queue drained")

    app = FastAPI(title="sparsec", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.sparsec = state
    _install_error_handlers(app)
    _install_routes(app, state)
    app.add_middleware(_GuardMiddleware, state=state, routes=app.router.routes)
    return app


def _version() -> str:
    from compiler import __version__

    return __version__


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None):
    from starlette.responses import Response

    return Response(json.dumps(body, separators=(",", ":")), status_code=status, headers=headers,
                    media_type="application/json")


def _install_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _json(exc.body(), exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg')}")
        return _json(APIError(422, "invalid request: " + "; ".join(problems), code="invalid_request").body(), 422)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        messages = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not allowed "
                    f"on {request.url.path}", 413: str(exc.detail)}
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        message = messages.get(exc.status_code, str(exc.detail))
        err = APIError(exc.status_code, message, code=codes.get(exc.status_code))
        return _json(err.body(), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        err = backend_failure(exc)
        return _json(err.body(), 500)


def _install_routes(app, state: ServerState) -> None:
    from starlette.responses import Response

    @app.get("/healthz")
    async def healthz():
        if state.load_error is not None:
            return _json({"status": "failed", "error": state.load_error}, 503)
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz():
        if state.ready:
            return _json({"status": "ready", "model": state.model_id})
        status = "failed" if state.load_error else "loading"
        return _json({"status": status, "error": state.load_error}, 503, {"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics():
        if state.batcher is not None:
            state.metrics.queue_depth.labels(state.metrics.worker).set(state.batcher.queue_depth)
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return _json({"object": "list", "data": [model_card(state)]})

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingsRequest):
        state.require(TASK_EMBEDDINGS, "/v1/embeddings")
        state.check_model(req.model)
        text = state.target.text
        seqs = await _tokenize(req.input, text, "input", state.config.request_cap)
        check_lengths(seqs, state.model.token_limit)
        width = next(o for o in state.target.signature.outputs if o.name == state.model.hidden_output).shape[-1]
        if req.dimensions is not None and req.dimensions != width:
            raise bad_request(f"'dimensions' must be {width} for this model (it cannot shorten embeddings)")
        vectors, timing = await state.run(TASK_EMBEDDINGS, seqs)
        tokens = sum(len(s) for s in seqs)
        state.metrics.tokens.labels(state.metrics.worker, "prompt").inc(tokens)
        return _json(embeddings_body(vectors, state.model_id, tokens, req.encoding_format), headers=timing)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        state.require(TASK_COMPLETIONS, "/v1/completions")
        state.check_model(req.model)
        req.check_supported()
        prompts = await _tokenize(req.prompt, state.target.text, "prompt", state.config.request_cap)
        if any(not p for p in prompts):
            raise bad_request("a prompt tokenizes to zero tokens; give some text")
        _check_generation(state, prompts, req.max_tokens)
        params = SamplingParams(req.max_tokens, float(req.temperature), float(req.top_p), req.seed)
        stops = req.stops()
        cid = completion_id()
        if req.stream:
            return _sse_response(_stream(state, prompts, params, stops, CompletionChunks(cid, state.model_id)))
        choices, timing = await _generate(state, prompts, params, stops)
        return _json(completion_body(cid, state.model_id, choices, sum(len(p) for p in prompts)), headers=timing)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        """The messages through the tokenizer's chat template, then the completions path. Greedy unless
        `temperature` > 0, like /v1/completions here; no token budget = what the model leaves."""
        state.require(TASK_COMPLETIONS, "/v1/chat/completions")
        state.check_model(req.model)
        req.check_supported()
        stops = req.stops()
        budget = req.token_budget()
        chars = sum(len(m.text()) for m in req.messages)
        if chars <= INLINE_TOKENIZE_CHARS:
            prompt = render_prompt(state.target.text, req.messages, state.model_id)
        else:
            prompt = await asyncio.to_thread(render_prompt, state.target.text, req.messages, state.model_id)
        max_tokens = budget if budget is not None else state.model.max_new_tokens(len(prompt))
        _check_generation(state, [prompt], max_tokens)
        params = SamplingParams(max_tokens, float(req.temperature), float(req.top_p), req.seed)
        cid = chat_id()
        if req.stream:
            chunks = ChatChunks(cid, state.model_id, req.include_usage)
            return _sse_response(_stream(state, [prompt], params, stops, chunks))
        choices, timing = await _generate(state, [prompt], params, stops)
        return _json(chat_body(cid, state.model_id, choices, len(prompt)), headers=timing)

    @app.post("/v1/infer")
    async def infer(req: InferRequest):
        state.require(TASK_RAW, "/v1/infer")
        sig = state.model.sig
        try:
            feeds = raw_feeds(sig, req.inputs, state.target.text.vocab_size if state.target.text else None)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        wanted = req.outputs or list(sig.output_names)
        unknown = [n for n in wanted if n not in sig.output_names]
        if unknown:
            raise bad_request(f"unknown outputs {unknown} (the model gives {list(sig.output_names)})")
        (outputs,), timing = await state.run(TASK_RAW, [feeds])
        body = {"model": state.model_id, "outputs": {n: outputs[n].tolist() for n in wanted},
                "shapes": {n: list(outputs[n].shape) for n in wanted}, "dtypes": {n: str(outputs[n].dtype) for n in wanted}}
        return _json(body, headers=timing)


INLINE_TOKENIZE_CHARS = 8192  # larger inputs are tokenized in a thread, keeping the event loop responsive


async def _tokenize(value: Any, text, what: str, max_inputs: int) -> list[list[int]]:
    chars = len(value) if isinstance(value, str) else sum(len(v) for v in value if isinstance(v, str))
    if chars <= INLINE_TOKENIZE_CHARS:
        return tokenize_inputs(value, text, what, max_inputs)
    return await asyncio.to_thread(tokenize_inputs, value, text, what, max_inputs)


def _check_generation(state: ServerState, prompts: list[list[int]], max_tokens: int) -> None:
    """400 when a prompt plus `max_tokens` exceeds the model's positions or the decoder's fixed shapes."""
    check_lengths(prompts, state.model.token_limit, extra=max_tokens, what="prompt")
    problem = state.model.check_request(max(len(p) for p in prompts), max_tokens)
    if problem:
        raise bad_request(f"{problem} (the '{state.target.backend_name}' decoder's fixed shapes; see --seqlen)",
                          code="context_length_exceeded")


async def _generate(state: ServerState, prompts: list[list[int]], params: SamplingParams,
                    stops: tuple[str, ...]) -> tuple[list[ChoiceState], dict[str, str]]:
    """One finished choice per prompt (the batch queue, then the one generation loop) and the timing header."""
    text = state.target.text
    state.metrics.tokens.labels(state.metrics.worker, "prompt").inc(sum(len(p) for p in prompts))
    choices = [ChoiceState(i, text, stops) for i in range(len(prompts))]
    results, timing = await state.run(TASK_COMPLETIONS, [GenRequest(p, params, c.on_token) for p, c in zip(prompts, choices)])
    for choice, result in zip(choices, results):
        choice.finish(result.finish_reason)
    state.metrics.tokens.labels(state.metrics.worker, "completion").inc(sum(c.generated for c in choices))
    return choices, timing


def _sse_response(body: Any) -> Any:
    from starlette.responses import StreamingResponse

    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _stream(state: ServerState, prompts: list[list[int]], params: SamplingParams, stops: tuple[str, ...], chunks: Any):
    """Enqueue now (so a full queue is a 503, not a broken stream), then yield SSE events shaped by
    `chunks` (openai_schema.CompletionChunks or chat.ChatChunks: start / delta / finish / end)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(index: int, delta: str) -> None:  # batch thread -> event loop
        loop.call_soon_threadsafe(events.put_nowait, (index, delta))

    text = state.target.text
    prompt_tokens = sum(len(p) for p in prompts)
    choices = [ChoiceState(i, text, stops, emit) for i in range(len(prompts))]
    futures = state.enqueue(TASK_COMPLETIONS, [GenRequest(p, params, c.on_token) for p, c in zip(prompts, choices)])
    state.metrics.tokens.labels(state.metrics.worker, "prompt").inc(prompt_tokens)
    for i, fut in enumerate(futures):
        fut.add_done_callback(lambda f, i=i: loop.call_soon(events.put_nowait, (i, f)))

    async def body():
        done = 0
        try:
            for i in range(len(choices)):
                for chunk in chunks.start(i):
                    yield _sse(chunk)
            while done < len(choices):
                index, item = await events.get()
                if isinstance(item, str):
                    for chunk in chunks.delta(index, item):
                        yield _sse(chunk)
                    continue
                done += 1
                if item.cancelled() or item.exception() is not None:
                    err = backend_failure(item.exception() or RuntimeError("generation cancelled"))
                    yield _sse(err.body())
                    break
                result: GenResult = item.result().result
                rest = choices[index].finish(result.finish_reason)
                for chunk in chunks.finish(index, rest, result.finish_reason):
                    yield _sse(chunk)
            generated = sum(c.generated for c in choices)
            state.metrics.tokens.labels(state.metrics.worker, "completion").inc(generated)
            for chunk in chunks.end(prompt_tokens, generated):
                yield _sse(chunk)
            yield "data: [DONE]\n\n"
        finally:
            for c in choices:  # client gone: stop generating for it
                c.cancelled = c.finish_reason is None

    return body()


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def model_card(state: ServerState) -> dict[str, Any]:
    """OpenAI model object plus a summary of the artifact's manifest."""
    m = state.target.artifact.manifest
    plan = m.get("plan") or {}
    params = sum(p.get("params", 0) for p in plan.values())
    zeros = sum(p.get("params", 0) * (p.get("measured_sparsity") or 0) for p in plan.values())
    created = int(os.path.getmtime(state.target.artifact.path("manifest.json")))
    text = state.target.text
    return {
        "id": state.model_id, "object": "model", "created": created, "owned_by": "sparsec",
        "task": state.target.task, "backend": state.target.backend_name, "ready": state.ready,
        "max_input_tokens": (state.model.token_limit[0] if state.model else text.max_positions) if text else None,
        "inputs": [dataclasses.asdict(t) for t in (state.model.sig if state.model else state.target.signature).inputs],
        "outputs": [dataclasses.asdict(t) for t in state.target.signature.outputs],
        "artifact": {
            "schema_version": m.get("schema_version"), "tool": m.get("tool"),
            "source": {k: m.get("source", {}).get(k) for k in ("model", "model_type", "architectures", "sha256")},
            "pipeline": m.get("pipeline"), "seed": m.get("seed"),
            "sparsity": {"prunable_params": params, "overall_measured": zeros / params if params else 0.0},
            "files": len(m.get("files") or {}),
        },
    }


class _GuardMiddleware:
    """Pure ASGI: API key on /v1 routes, body size limit (413), in-progress gauge, per-route metrics."""

    def __init__(self, app, state: ServerState, routes: list[Any] | None = None):
        self.app = app
        self.state = state
        self.routes = routes or []
        key = state.config.api_key
        self.key = key.encode() if key else None

    def _route_path(self, scope) -> str:
        """The route template a request is for, also when it was refused before routing (401, 413,
        503 while draining), so /metrics labels it by route; "unmatched" only for unknown paths."""
        from starlette.routing import Match

        route = scope.get("route")
        if route is not None:
            return getattr(route, "path", "unmatched")
        for candidate in self.routes:
            match, _ = candidate.matches(scope)
            if match != Match.NONE:
                return getattr(candidate, "path", "unmatched")
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics = self.state.metrics
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        gauge = metrics.in_progress.labels(metrics.worker)
        gauge.inc()
        counted = False
        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                await refusal(scope, receive, send_wrapper)
            else:
                self.state.in_flight += 1
                counted = True
                await self.app(scope, self._limited(receive), send_wrapper)
        finally:
            gauge.dec()
            if counted:
                self.state.in_flight -= 1
            metrics.observe_request(self._route_path(scope), status["code"], time.perf_counter() - start)

    def _refuse(self, scope):
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.state.draining:  # a request on a keep-alive connection opened before SIGTERM
            self.state.metrics.rejected.labels(self.state.metrics.worker, "shutting_down").inc()
            return _asgi_error(APIError(503, "server is shutting down; retry on another replica", type_="server_error",
                                        code="shutting_down", headers={"Retry-After": "1", "Connection": "close"}))
        if self.key is not None and path.startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            token = given[7:].strip() if given[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(token, self.key):
                self.state.metrics.rejected.labels(self.state.metrics.worker, "unauthorized").inc()
                return _asgi_error(APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.state.config.max_body_bytes):
            self.state.metrics.rejected.labels(self.state.metrics.worker, "too_large").inc()
            return _asgi_error(self._too_large())
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"request body exceeds {self.state.config.max_body_bytes} bytes", code="body_too_large",
                        headers={"Connection": "close"})

    def _limited(self, receive):
        """Counts streamed (chunked) bodies too; raising HTTPException makes FastAPI answer 413."""
        from starlette.exceptions import HTTPException

        seen = {"bytes": 0}
        limit = self.state.config.max_body_bytes

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit:
                    raise HTTPException(413, self._too_large().message)
            return message

        return wrapped


def _asgi_error(err: APIError):
    return _json(err.body(), err.status, err.headers)


# -- running -------------------------------------------------------------------------------------------
def app_from_env() -> Any:
    """uvicorn factory for `--workers N`: each worker process verifies and loads the artifact itself."""
    from runtimes.serve.model import open_artifact

    config = ServeConfig.from_env(os.environ[CONFIG_ENV])
    return create_app(config, open_artifact(config.artifact, config.backend, config.plugins))


def wait_until_ready(url: str, timeout_s: float, process: Any = None) -> str:
    """Poll `url`/readyz: "ready" on 200, "exited" when `process` (a Popen) ends first, else "timeout".
    For scripts, tests and benchmarks that start `sparsec serve` in a subprocess."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return "exited"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return "ready"
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return "timeout"


def check_bindable(host: str, port: int) -> None:
    """Fail before loading anything when the address is taken or invalid (uvicorn binds after startup)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SparsecError(f"cannot resolve --host {host}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise SparsecError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def log_config(level: str) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    cfg = json.loads(json.dumps(LOGGING_CONFIG))
    cfg["loggers"]["sparsec"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return cfg


def serve(config: ServeConfig, target: ServeTarget) -> None:
    """Run the server until SIGTERM/SIGINT; returns after a graceful shutdown. Raises SparsecError when
    the model could not be loaded."""
    import uvicorn

    common = dict(host=config.host, port=config.port, log_level=config.log_level, access_log=config.access_log,
                  log_config=log_config(config.log_level), timeout_graceful_shutdown=config.graceful_timeout_s,
                  lifespan="on", server_header=False)
    check_bindable(config.host, config.port)
    # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler makes a
    # graceful SIGTERM/SIGINT end in exit status 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    if config.workers > 1:
        os.environ[CONFIG_ENV] = config.to_env()
        uvicorn.run("runtimes.serve.app:app_from_env", factory=True, workers=config.workers, **common)
        return
    app = create_app(config, target)
    server = _draining_server(uvicorn.Config(app, **common), app.state.sparsec)
    state: ServerState = app.state.sparsec
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind or start
        raise SparsecError(f"the server could not start on {config.host}:{config.port} (see the log above)") from None
    if state.load_error is not None:
        raise SparsecError(f"the model could not be loaded on backend '{config.backend}': {state.load_error}")
    if not server.started:
        raise SparsecError(f"the server could not start on {config.host}:{config.port} (see the log above)")


DRAIN_LINGER_S = 0.25  # after the last in-flight request: time for requests already on the wire to get their 503


def _draining_server(config: Any, state: ServerState) -> Any:
    """A uvicorn server whose SIGTERM keeps open keep-alive connections open while in-flight requests
    finish: a request arriving on one gets 503 + `Connection: close` (see _GuardMiddleware) instead of
    a connection closed under it (uvicorn closes idle connections at once, dropping requests already
    sent on them). Then uvicorn's own graceful shutdown runs: idle connections closed, queue drained.
    With `--workers N` uvicorn builds its own servers: there the default shutdown applies."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            state.draining = True
            for server in self.servers:  # stop accepting connections; the open ones stay
                server.close()
            LOG.info("draining: %d request(s) in flight; new requests get 503 + Connection: close", state.in_flight)
            deadline = time.monotonic() + self.config.timeout_graceful_shutdown
            while state.in_flight > 0 and not self.force_exit and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(DRAIN_LINGER_S)
            await super().shutdown(sockets)

    return DrainingServer(config)
