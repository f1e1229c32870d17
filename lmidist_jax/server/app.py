"""The HTTP server's routes and their handlers: the Flask app over an engine loop, speaking
LMI's schema and OpenAI's chat completions and completions (served by waitress, see
``http.py``; started and stopped by ``lifecycle.py``).

Routes
------
=================================  ====================================================
POST /invocations                  LMI ``{"inputs", "parameters", "stream"}``, or chat
POST /predictions/<model>          same (``<model>`` must be the served model's name)
POST /v1/chat/completions          OpenAI chat completions (``stream`` -> SSE)
POST /v1/completions               OpenAI completions (see ``completions.py``)
GET  /ping                         200 when the engine is ready, 503 while warming up
                                   or after it failed
GET  /models, GET /v1/models       the one model (DJL-style / OpenAI-style)
GET  /metrics                      Prometheus text (see ``metrics.py``)
/models/<model>/adapters[/<name>]  LoRA adapters: POST, GET, DELETE (see ``adapters.py``)
=================================  ====================================================

Status codes
------------
Every error is JSON ``{"code": N, "error": "<message naming what was wrong>"}``, except
under ``/v1/`` where it has OpenAI's shape ``{"error": {"message", "type", "param",
"code": N}}`` (so the ``openai`` client shows the message).
Rule: anything wrong with the request itself is **400**, whether it is the JSON, its
shape or a value (lmi-dist's 424 for parse errors is not used); the server's own
state gives 5xx.

=====  ==============================================================================
code   when
=====  ==============================================================================
400    body is not valid JSON (incl. NaN/Infinity) or not UTF-8, body is not an object,
       missing/empty ``inputs``, ``messages`` or ``prompt``, a field of the wrong type, a parameter
       out of range (SamplingParams' RequestError), a prompt at or over max_model_len
       or top_n_tokens over max_logprobs (RequestError from add_request), an unknown
       adapter (``adapters``/``adapter_id``, ``?adapter=``, the SageMaker adapter header;
       any of them while LoRA is off), a bad adapter registration, ``stream`` with a
       list of inputs, a chat template that fails on the messages
401    an API key is set (``--api-key`` / ``LMIDIST_JAX_API_KEY``) and the request has no
       ``Authorization: Bearer <key>`` header with it (every route but ``/ping``)
404    unknown route, ``/predictions/<model>`` or ``/models/<model>/adapters`` for a model
       this server does not serve, an unknown adapter name in an adapter route
405    known route, wrong method
409    DELETE of an adapter that unfinished requests use
413    request body over ``max_body_bytes`` (default 8 MiB, ``LMIDIST_JAX_MAX_BODY_BYTES``),
       sent with Content-Length or chunked; the connection is closed
415    a POST body whose Content-Type is not ``application/json`` (a browser can send
       ``text/plain`` across origins without asking first; JSON it cannot)
499    (logged only) the client of a non-streaming request disconnected: it was aborted
500    the engine failed while serving the request, or an unexpected server error
503    the engine is still warming up, has failed (the request is not admitted), the
       request queue is full (``job_queue_size`` requests in flight), or the server is
       shutting down (draining)
=====  ==============================================================================

Unknown LMI parameters and chat fields are dropped with a warning in the log (as
lmi-dist did). A failing request never affects the others.

Streaming bodies and client disconnects: see ``streaming.py``. Shutdown (SIGTERM /
SIGINT drain): see ``lifecycle.py``. The transport (threads, timeouts, body limit):
``http.py``. The wire formats: ``lmi.py``, ``chat.py``, ``completions.py``, and what they
share in ``schema.py``.

Details
-------
``details.prefill`` (with ``decoder_input_details``) lists the prompt tokens with their
ids, texts and ``log_prob`` (null for the first token, which has no context); such a
request is prefilled without prefix-cache hits. ``details.best_of_sequences`` holds the other sequences when
``n`` > 1; ``n`` > 1 without ``"details": true`` is refused (400) rather than answered with
the first sequence only. ``log_prob`` values are natural-log probabilities under the model's own
distribution (before penalties/temperature); a non-finite value is sent as null.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
import uuid
from typing import Any, Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..config import EngineConfig
from ..sampling_params import RequestError
from .adapters import register_adapter_routes, request_adapters
from .chat import ChatStreamBuilder, chat_response, new_chat_id, parse_chat_request
from .completions import (CompletionStreamBuilder, completion_response, new_completion_id, parse_completion_request,
                          prompt_text)
from .http import max_body_bytes_from_env
from .lmi import LmiRequest, LmiStreamBuilder, lmi_response, parse_lmi_request
from .metrics import ServerMetrics
from .schema import (JSON, JSONLINES, SSE, BadRequest, Limits, ServerError, dumps, error_body, error_body_for,
                     parse_json_body)
from .streaming import SSE_DONE, StreamBody, collect, sse_event, stream_response, submit

logger = logging.getLogger("lmidist_jax.server")


class ServerState:
    """What the routes share. ``loop`` is None until the engine is ready."""

    def __init__(self, loop, config: EngineConfig, metrics: ServerMetrics, model_name: str, max_body_bytes: int,
                 api_key: str | None = None):
        self.loop = loop
        self.config = config
        self.metrics = metrics
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.startup_error: str | None = None
        self.shutting_down = False
        self.created = int(time.time())

    def ready_loop(self):
        """The engine loop, or ServerError(503) while it cannot take requests."""
        if self.shutting_down:
            raise ServerError("the server is shutting down; send the request to another instance", 503)
        if self.startup_error is not None:
            raise ServerError(f"the engine failed to start: {self.startup_error}", 503)
        if self.loop is None:
            raise ServerError("the engine is warming up; retry when GET /ping answers 200", 503)
        if not self.loop.healthy:
            raise ServerError(f"the engine failed: {self.loop.error}", 503)
        return self.loop

    def limits(self, loop) -> Limits:
        engine = loop.engine
        return Limits(vocab_size=engine.spec.vocab_size, max_model_len=engine.max_model_len,
                      max_n=self.config.max_rolling_batch_size,
                      max_logprobs=getattr(engine, "max_logprobs", Limits.max_logprobs))


def served_model_name(config: EngineConfig) -> str:
    """The model's name in routes and responses: the last part of model_id."""
    if config.model_id:
        return os.path.basename(config.model_id.rstrip("/")) or config.model_id
    from ..model_store import DEFAULT_MODEL

    return DEFAULT_MODEL


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status=status, content_type=JSON)


def _error_response(status: int, message: str) -> Response:
    return json_response(error_body_for(request.path)(status, message), status)


def state_of(app: Flask) -> ServerState:
    return app.extensions["lmidist"]


def set_engine_loop(app: Flask, loop) -> None:
    """Hand the app its engine loop once the engine is built (ends warm-up)."""
    state_of(app).loop = loop


def set_startup_error(app: Flask, error: BaseException | str) -> None:
    state_of(app).startup_error = str(error) or type(error).__name__


def create_app(engine_loop, config, *, model_name: str | None = None, max_body_bytes: int | None = None,
               metrics: ServerMetrics | None = None, api_key: str | None = None) -> Flask:
    """The Flask app over an EngineLoop. ``engine_loop`` may be None while the engine
    warms up (``/ping`` answers 503 until `set_engine_loop`). ``config``: the
    EngineConfig (or a stand-in with some of its options as attributes). ``api_key``:
    when set, every route but ``/ping`` requires ``Authorization: Bearer <api_key>``."""
    config = EngineConfig.of(config)
    if max_body_bytes is None:
        max_body_bytes = max_body_bytes_from_env()
    app = Flask("lmidist_jax.server")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    state = ServerState(engine_loop, config, metrics or ServerMetrics(), model_name or served_model_name(config),
                        max_body_bytes, api_key=api_key or None)
    app.extensions["lmidist"] = state

    @app.before_request
    def _check_key_and_content_type():
        if state.api_key is not None and request.path != "/ping":
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
                what = "has no Authorization header" if not header else "has a wrong API key"
                response = _error_response(401, f"the request {what}: this server requires "
                                                "'Authorization: Bearer <key>' with its API key")
                response.headers["WWW-Authenticate"] = 'Bearer realm="lmidist-jax"'
                return response
        if request.method == "POST" and request.routing_exception is None:
            if request.mimetype != JSON:
                given = request.headers.get("Content-Type")
                what = f"Content-Type {given!r}" if given else "no Content-Type header"
                return _error_response(415, f"the request has {what}: send the body as JSON with "
                                            f"'Content-Type: {JSON}'")

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        status = e.code or 500
        if status == 404:
            message = f"no route {request.method} {request.path}; see GET /models and POST /invocations"
        elif status == 405:
            allowed = ", ".join(sorted(m for m in (e.valid_methods or []) if m not in ("HEAD", "OPTIONS")))
            message = f"method {request.method} is not allowed on {request.path} (allowed: {allowed})"
        elif status == 413:
            message = (f"the request body is too large: the limit is {state.max_body_bytes} bytes "
                       f"(got {request.content_length or 'more'})")
        else:
            message = f"{e.name}: {e.description}"
        return _error_response(status, message)

    @app.errorhandler(BadRequest)
    def _bad_request(e: BadRequest):
        return _error_response(e.status, e.message)

    @app.errorhandler(ServerError)
    def _server_error(e: ServerError):
        return _error_response(e.status, e.message)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        logger.exception("unexpected error serving %s %s", request.method, request.path)
        return _error_response(500, f"internal server error: {type(e).__name__}: {e}")

    @app.after_request
    def _count(response: Response):
        if request.path != "/metrics":
            state.metrics.requests.labels(status=str(response.status_code)).inc()
        return response

    # -- info routes ------------------------------------------------------------------

    @app.get("/ping")
    def ping():
        try:
            state.ready_loop()
        except ServerError as e:
            return _error_response(e.status, e.message)
        return json_response({"status": "healthy"})

    @app.get("/models")
    def models():
        status = "READY" if state.loop is not None and state.loop.healthy else (
            "FAILED" if state.startup_error or state.loop is not None else "LOADING")
        return json_response({"models": [{"modelName": state.model_name, "modelUrl": config.model_id or "",
                                          "status": status}]})

    @app.get("/v1/models")
    def openai_models():
        return json_response({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "lmidist-jax"}]})

    @app.get("/metrics")
    def metrics_route():  # never waits for an engine step: stats() is a snapshot
        loop = state.loop
        stats = loop.stats() if loop is not None else None
        body = state.metrics.render(stats, loop is not None and loop.healthy)
        return Response(body, content_type=state.metrics.content_type)

    # -- inference routes ----------------------------------------------------------------

    @app.post("/invocations")
    def invocations():
        return _handle(state, chat_only=False)

    @app.post("/predictions/<model>")
    def predictions(model: str):
        if model != state.model_name:
            raise BadRequest(f"model {model!r} is not served here; this server serves {state.model_name!r}", 404)
        return _handle(state, chat_only=False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return _handle(state, chat_only=True)

    @app.post("/v1/completions")
    def completions():
        return _handle_completion(state)

    register_adapter_routes(app, state, json_response)
    return app


# -- request handling ------------------------------------------------------------------


def _read_body() -> dict:
    raw = request.get_data(cache=False)  # raises 413 over MAX_CONTENT_LENGTH
    return parse_json_body(raw)


def _handle(state: ServerState, *, chat_only: bool) -> Response:
    start = time.perf_counter()
    loop = state.ready_loop()
    body = _read_body()
    limits = state.limits(loop)
    chat = chat_only or "messages" in body
    inputs = body.get("inputs")
    batched = not chat and isinstance(inputs, list)
    adapters = request_adapters(loop, body, len(inputs) if batched and inputs else 1, batched)
    if chat:
        return _handle_chat(state, loop, body, limits, start, adapters[0])
    return _handle_lmi(state, loop, body, limits, start, adapters)


def _submit_all(loop, request_ids: list[str], prompts: list, params, stream: bool, adapters: list[str | None],
                wheres: list[str]) -> list:
    """Every prompt submitted (they share the rolling batch), or none: a refused one
    closes those already queued. ``wheres``: how messages name each prompt."""
    streams = []
    try:
        for request_id, prompt, adapter, where in zip(request_ids, prompts, adapters, wheres):
            streams.append(submit(loop, request_id, prompt, params, stream, where, adapter=adapter))
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


def _collect_all(state: ServerState, streams: list, start: float) -> list:
    """The final outputs of ``streams`` in order; the streams are closed after."""
    try:
        return [collect(state.metrics, s, state.metrics.tracker(start)) for s in streams]
    except RuntimeError as e:
        raise ServerError(str(e), 500) from None
    finally:
        for s in streams:
            s.close()


def _decoders(loop, skip_special_tokens: bool) -> tuple[Callable[[int], str], Callable[[int], str]]:
    # The loop's pooled tokenizers: the engine's own belongs to the engine thread.
    piece = lambda t: loop.decode([t], skip_special_tokens=skip_special_tokens,  # noqa: E731
                                  clean_up_tokenization_spaces=False)
    raw = lambda t: loop.decode([t], skip_special_tokens=False)  # noqa: E731
    return piece, raw


def _new_request_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def _handle_lmi(state: ServerState, loop, body: dict, limits: Limits, start: float,
                adapters: list[str | None]) -> Response:
    req: LmiRequest = parse_lmi_request(body, limits)
    ids = [_new_request_id("lmi") for _ in req.inputs]
    wheres = [f"inputs[{i}]: " if req.batched else "" for i in range(len(req.inputs))]
    streams = _submit_all(loop, ids, req.inputs, req.params, req.stream, adapters, wheres)
    piece, raw = _decoders(loop, req.params.skip_special_tokens)
    if req.stream:
        builder = LmiStreamBuilder(req, req.inputs[0], piece, raw)
        sse = state.config.output_formatter == "sse"

        def encode(record: dict) -> bytes:
            return sse_event(record) if sse else (dumps(record) + "\n").encode("utf-8")

        def produce(out) -> list[bytes]:
            return [encode(r) for r in builder.records(out)]

        body_iter = StreamBody(state.metrics, streams[0], produce, lambda st, msg: encode(error_body(st, msg)),
                               state.metrics.tracker(start))
        return stream_response(body_iter, SSE if sse else JSONLINES)
    outs = _collect_all(state, streams, start)
    results = [lmi_response(req, prompt, final, raw) for prompt, final in zip(req.inputs, outs)]
    return json_response(results if req.batched else results[0])


def _chat_prompt(loop, messages: list[dict]) -> list[int]:
    try:
        return loop.encode_chat(messages)
    except RequestError as e:
        hint = ': send {"inputs": ...} instead of "messages"' if "no chat template" in str(e) else ""
        raise BadRequest(f"{e}{hint}") from None


def _handle_chat(state: ServerState, loop, body: dict, limits: Limits, start: float,
                 adapter: str | None = None) -> Response:
    req = parse_chat_request(body, limits)
    prompt_ids = _chat_prompt(loop, req.messages)
    params = req.sampling_params(len(prompt_ids), limits.max_model_len)
    chat_id = new_chat_id()
    stream = submit(loop, chat_id, prompt_ids, params, req.stream, adapter=adapter)
    model = state.model_name
    if req.stream:
        builder = ChatStreamBuilder(req, model, chat_id)

        def produce(out) -> list[bytes]:
            chunks = [] if builder.started else [builder.first()]
            chunks += builder.chunks(out)
            frames = [sse_event(c) for c in chunks]
            if out.finished:
                if req.include_usage:
                    frames.append(sse_event(builder.usage_chunk()))
                frames.append(SSE_DONE)
            return frames

        error_record = error_body_for(request.path)  # the stream outlives the request context
        return stream_response(StreamBody(state.metrics, stream, produce,
                                          lambda st, msg: sse_event(error_record(st, msg)),
                                          state.metrics.tracker(start)), SSE)
    final, = _collect_all(state, [stream], start)
    return json_response(chat_response(req, final, model, chat_id, int(time.time())))


def _handle_completion(state: ServerState) -> Response:
    """POST /v1/completions: every prompt is submitted at once (they share the rolling
    batch), then their outputs are collected in order (or streamed one prompt after the
    other)."""
    start = time.perf_counter()
    loop = state.ready_loop()
    body = _read_body()
    limits = state.limits(loop)
    req = parse_completion_request(body, limits)
    adapters = request_adapters(loop, body, len(req.prompts), batched=len(req.prompts) > 1)
    completion_id = new_completion_id()
    ids = [f"{completion_id}-{i}" for i in range(len(req.prompts))]
    wheres = [f"prompt[{i}]: " if len(req.prompts) > 1 else "" for i in range(len(req.prompts))]
    streams = _submit_all(loop, ids, req.prompts, req.params, req.stream, adapters, wheres)
    pieces: dict[int, str] = {}

    def piece(token: int) -> str:  # one token's text, as the logprobs show it
        text = pieces.get(token)
        if text is None:
            text = pieces[token] = loop.decode([token], skip_special_tokens=False)
        return text

    decode = lambda ids: loop.decode(ids, skip_special_tokens=False)  # noqa: E731
    texts = [prompt_text(p, decode) if req.echo else "" for p in req.prompts]
    model = state.model_name
    if req.stream:
        builder = CompletionStreamBuilder(req, model, completion_id, ids, texts, piece)

        def produce(out) -> list[bytes]:
            frames = [sse_event(c) for c in builder.chunks(out)]
            if builder.done and len(builder.finals) == len(req.prompts):
                if req.include_usage:
                    frames.append(sse_event(builder.usage_chunk()))
                frames.append(SSE_DONE)
            return frames

        error_record = error_body_for(request.path)
        body_iter = StreamBody(state.metrics, streams, produce, lambda st, msg: sse_event(error_record(st, msg)),
                               [state.metrics.tracker(start) for _ in streams])
        return stream_response(body_iter, SSE)
    outs = _collect_all(state, streams, start)
    return json_response(completion_response(req, texts, outs, model, completion_id, int(time.time()), piece))
