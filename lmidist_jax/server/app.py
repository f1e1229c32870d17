"""The HTTP server: LMI request schema + OpenAI chat completions, a Flask app served by
waitress (bounded threads, timeouts, body limits: see ``http.py``).

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

Streaming
---------
LMI: ``application/jsonlines`` (one ``{"token": {"id", "text", "log_prob"}}`` per line;
the last line also carries ``generated_text``, and ``details`` when asked), or
``text/event-stream`` (``data: {json}\\n\\n`` events, same objects) with
``output_formatter=sse`` (``json``, ``jsonlines`` or unset: JSON lines). Chat:
``chat.completion.chunk`` SSE events ending with ``data: [DONE]``. An error after the stream started ends it with a final
``{"code": N, "error": ...}`` record. A client that disconnects aborts its request
(its KV blocks are freed before the next engine step): a streaming one is noticed when
a write fails or, between tokens, through waitress's ``waitress.client_disconnected``
(the server keeps reading the socket while a request runs, so a closed connection is
seen at once); a non-streaming one through the same check, polled every 0.1 s while it
waits for the engine. Under another WSGI server without that hook, only streams notice.

Shutdown
--------
SIGTERM or SIGINT: new requests get 503 and ``/ping`` answers 503 while the requests in
flight run to their end for up to ``drain_seconds`` (option, ``--drain-seconds``); the
ones still running then end (streams with a final error record), the engine loop stops
after its step in flight (given at most ``STEP_GRACE_SECONDS`` more), and the process
exits 0. During warm-up nothing is drained: it exits at once. A second signal skips
the rest of the drain.

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

import dataclasses
import hmac
import ipaddress
import logging
import os
import signal
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..sampling_params import RequestError
from .metrics import ServerMetrics
from .schema import (BadRequest, ChatStreamBuilder, Limits, LmiRequest, LmiStreamBuilder, chat_response,
                     dumps, error_body, lmi_response, new_chat_id, parse_chat_request, parse_json_body,
                     parse_lmi_request)

if TYPE_CHECKING:
    from .http import HttpSettings

logger = logging.getLogger("lmidist_jax.server")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
JSON = "application/json"
JSONLINES = "application/jsonlines"
SSE = "text/event-stream"


class ServerError(Exception):
    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status
        self.message = message


class ServerState:
    """What the routes share. ``loop`` is None until the engine is ready."""

    def __init__(self, loop, config, metrics: ServerMetrics, model_name: str, max_body_bytes: int,
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

    @property
    def output_formatter(self) -> str | None:
        return getattr(self.config, "output_formatter", None)

    def limits(self, loop) -> Limits:
        engine = loop.engine
        max_n = getattr(self.config, "max_rolling_batch_size", None) or 16
        return Limits(vocab_size=engine.spec.vocab_size, max_model_len=engine.max_model_len,
                      max_n=max(1, int(max_n)), max_logprobs=getattr(engine, "max_logprobs", Limits.max_logprobs))


def served_model_name(config) -> str:
    name = getattr(config, "served_model_name", None) or getattr(config, "model_name", None)
    if name:
        return str(name)
    model_id = getattr(config, "model_id", None)
    if model_id:
        return os.path.basename(str(model_id).rstrip("/")) or str(model_id)
    from ..model_store import DEFAULT_MODEL

    return DEFAULT_MODEL


def _json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status=status, content_type=JSON)


_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                       405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                       500: "internal_error", 503: "service_unavailable"}


def openai_error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": _OPENAI_ERROR_TYPES.get(status, "error"), "param": None,
                      "code": status}}


def _error_record(status: int, message: str) -> dict:
    """The error object for the current route: OpenAI's shape under /v1/, LMI's elsewhere."""
    if request.path.startswith("/v1/"):
        return openai_error_body(status, message)
    return error_body(status, message)


def _error_response(status: int, message: str) -> Response:
    return _json_response(_error_record(status, message), status)


def state_of(app: Flask) -> ServerState:
    return app.extensions["lmidist"]


def set_engine_loop(app: Flask, loop) -> None:
    """Hand the app its engine loop once the engine is built (ends warm-up)."""
    state_of(app).loop = loop


def set_startup_error(app: Flask, error: BaseException | str) -> None:
    state_of(app).startup_error = str(error) or type(error).__name__


def max_body_bytes_of(config) -> int:
    return int(getattr(config, "max_body_bytes", None)
               or os.environ.get("LMIDIST_JAX_MAX_BODY_BYTES") or DEFAULT_MAX_BODY_BYTES)


def create_app(engine_loop, config, *, model_name: str | None = None, max_body_bytes: int | None = None,
               metrics: ServerMetrics | None = None, api_key: str | None = None) -> Flask:
    """The Flask app over an EngineLoop. ``engine_loop`` may be None while the engine
    warms up (``/ping`` answers 503 until `set_engine_loop`). ``api_key``: when set,
    every route but ``/ping`` requires ``Authorization: Bearer <api_key>``."""
    if max_body_bytes is None:
        max_body_bytes = max_body_bytes_of(config)
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
        return _json_response({"status": "healthy"})

    @app.get("/models")
    def models():
        status = "READY" if state.loop is not None and state.loop.healthy else (
            "FAILED" if state.startup_error or state.loop is not None else "LOADING")
        return _json_response({"models": [{"modelName": state.model_name,
                                           "modelUrl": str(getattr(config, "model_id", None) or ""),
                                           "status": status}]})

    @app.get("/v1/models")
    def openai_models():
        return _json_response({"object": "list", "data": [
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

    from .adapters import register_adapter_routes
    from .completions import register_completion_routes

    register_adapter_routes(app, state, _json_response)
    register_completion_routes(app, state)
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
    from .adapters import request_adapters

    chat = chat_only or "messages" in body
    inputs = body.get("inputs")
    batched = not chat and isinstance(inputs, list)
    adapters = request_adapters(loop, body, len(inputs) if batched and inputs else 1, batched)
    if chat:
        return _handle_chat(state, loop, body, limits, start, adapters[0])
    return _handle_lmi(state, loop, body, limits, start, adapters)


def _submit(loop, request_id: str, prompt, params, stream: bool, where: str = "", adapter: str | None = None):
    from ..engine.engine_loop import QueueFullError

    try:
        submitted = loop.submit(request_id, prompt, params, stream=stream, adapter=adapter)
    except RequestError as e:
        raise BadRequest(f"{where}{e}") from None
    except QueueFullError as e:
        raise ServerError(f"{e}; retry later", 503) from None
    except RuntimeError as e:  # the engine failed or is shutting down
        raise ServerError(str(e), 503) from None
    # waitress: True once the client closed its connection (see the module docstring).
    submitted.cancelled = request.environ.get("waitress.client_disconnected")
    return submitted


def _observe(state: ServerState, tracker, stream, out) -> None:
    tracker.observe(out)
    if stream.steps_to_first_token is not None and not getattr(tracker, "steps_recorded", False):
        tracker.steps_recorded = True
        state.metrics.steps_to_first_token.observe(stream.steps_to_first_token)


def _collect(state: ServerState, stream, tracker) -> Any:
    from ..engine.engine_loop import EngineShutDown, RequestCancelled

    final = None
    try:
        for out in stream:
            _observe(state, tracker, stream, out)
            final = out
    except EngineShutDown as e:
        raise ServerError(str(e), 503) from None
    except RequestCancelled:
        state.metrics.aborted.inc()
        logger.info("client went away: aborted %s", stream.request_id)
        raise ServerError("the client disconnected; the request was aborted", 499) from None
    if final is None or not final.finished:
        raise ServerError("the request ended without a result (aborted)", 500)
    if final.error:
        raise ServerError(f"the request failed: {final.error}", 500)
    return final


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
    streams = []
    try:
        for i, prompt in enumerate(req.inputs):
            where = f"inputs[{i}]: " if req.batched else ""
            streams.append(_submit(loop, _new_request_id("lmi"), prompt, req.params, req.stream, where,
                                   adapter=adapters[i]))
    except BaseException:
        for s in streams:
            s.close()
        raise
    piece, raw = _decoders(loop, req.params.skip_special_tokens)
    if req.stream:
        builder = LmiStreamBuilder(req, req.inputs[0], piece, raw)
        sse = state.output_formatter == "sse"

        def encode(record: dict) -> bytes:
            text = dumps(record)
            return (f"data: {text}\n\n" if sse else text + "\n").encode("utf-8")

        def produce(out) -> list[bytes]:
            return [encode(r) for r in builder.records(out)]

        body_iter = _StreamBody(state, streams[0], produce, lambda st, msg: encode(error_body(st, msg)),
                                state.metrics.tracker(start))
        return _stream_response(body_iter, SSE if sse else JSONLINES)
    try:
        results = []
        for s, prompt in zip(streams, req.inputs):
            final = _collect(state, s, state.metrics.tracker(start))
            results.append(lmi_response(req, prompt, final, raw))
    except RuntimeError as e:
        raise ServerError(str(e), 500) from None
    finally:
        for s in streams:
            s.close()
    return _json_response(results if req.batched else results[0])


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
    stream = _submit(loop, chat_id, prompt_ids, params, req.stream, adapter=adapter)
    model = state.model_name
    if req.stream:
        builder = ChatStreamBuilder(req, model, chat_id)

        def encode(record: dict) -> bytes:
            return f"data: {dumps(record)}\n\n".encode("utf-8")

        def produce(out) -> list[bytes]:
            chunks = [] if builder.started else [builder.first()]
            chunks += builder.chunks(out)
            frames = [encode(c) for c in chunks]
            if out.finished:
                if req.include_usage:
                    frames.append(encode(builder.usage_chunk()))
                frames.append(b"data: [DONE]\n\n")
            return frames

        error_record = openai_error_body if request.path.startswith("/v1/") else error_body
        return _stream_response(_StreamBody(state, stream, produce, lambda st, msg: encode(error_record(st, msg)),
                                            state.metrics.tracker(start)), SSE)
    try:
        final = _collect(state, stream, state.metrics.tracker(start))
    except RuntimeError as e:
        raise ServerError(str(e), 500) from None
    finally:
        stream.close()
    return _json_response(chat_response(req, final, model, chat_id, int(time.time())))


def _stream_response(body_iter: "_StreamBody", content_type: str) -> Response:
    response = Response(body_iter, status=200, content_type=content_type)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


class _StreamBody:
    """The body of a streaming response. Werkzeug calls ``close()`` when the response
    ends, including when the client went away mid-stream: that aborts the request so
    its KV blocks are freed (even if iteration never started).

    ``stream``: a RequestStream, or a list of them whose outputs are sent one stream after
    the other (their requests run together in the engine meanwhile); ``tracker``: one
    metrics tracker per stream likewise."""

    def __init__(self, state: ServerState, stream, produce: Callable[[Any], list[bytes]],
                 encode_error: Callable[[int, str], bytes], tracker):
        self.state = state
        self.streams = stream if isinstance(stream, list) else [stream]
        self.trackers = tracker if isinstance(tracker, list) else [tracker]
        self.produce = produce
        self.encode_error = encode_error
        self.finished = False
        self.closed = False
        self._gen: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        self._gen = self._generate()
        return self._gen

    def _generate(self) -> Iterator[bytes]:
        from ..engine.engine_loop import EngineShutDown, RequestCancelled

        stream = self.streams[0]
        try:
            for stream, tracker in zip(self.streams, self.trackers):
                stream_finished = False
                for out in stream:
                    _observe(self.state, tracker, stream, out)
                    frames = self.produce(out)
                    if out.finished:
                        stream_finished = True
                        self.finished = stream is self.streams[-1]
                    yield from frames
                if not stream_finished:
                    break
            if not self.finished and not self.closed:
                self.finished = True
                yield self.encode_error(500, "the request was aborted before it finished")
        except EngineShutDown as e:  # the drain time is over
            self.finished = True
            yield self.encode_error(503, str(e))
        except RequestCancelled:  # the client left between tokens: nothing more to send
            self.state.metrics.aborted.inc()
            self.finished = True
            logger.info("client went away: aborted %s", stream.request_id)
        except Exception as e:  # the engine failed mid-stream (GeneratorExit is not an Exception)
            self.finished = True
            logger.error("stream of %s failed: %s", stream.request_id, e)
            yield self.encode_error(500, str(e))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            self.state.metrics.aborted.inc()
            logger.info("client went away: aborting %s", ", ".join(s.request_id for s in self.streams))
        for stream in self.streams:  # a finished one ignores it
            stream.close()
        if self._gen is not None:
            self._gen.close()


# -- serve ---------------------------------------------------------------------------


def _config_summary(config) -> str:
    describe = getattr(config, "describe", None)
    if callable(describe):
        return "\n" + describe()
    if dataclasses.is_dataclass(config):
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(config).items())
    return repr(config)


# The step in flight when the drain ends gets this long to finish before the process
# exits without it (a long prefill must not hold a stopping server for minutes).
STEP_GRACE_SECONDS = 10.0
DEFAULT_DRAIN_SECONDS = 20.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _StopSignals:
    """SIGTERM / SIGINT -> a flag the serving thread polls (a handler must not take locks).
    The first asks for a drain; a second one skips what is left of it."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.count = 0
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.state.shutting_down = True  # refuse new requests from now on (a plain store: no lock)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def serve(properties: str | None = None, model_dir: str | None = None, host: str = "127.0.0.1",
          port: int = 8080, options: dict | None = None, *, api_key: str | None = None,
          http: "HttpSettings | None" = None) -> int:
    """Build the config (serving.properties + env + options, LMI rules), start the HTTP
    server at once (``/ping`` answers 503), build and warm up the engine in a background
    thread, then serve until SIGTERM / SIGINT, drain (see "Shutdown" above) and return 0.
    An engine that fails to start stops the server and the error is raised.

    ``api_key`` (else ``LMIDIST_JAX_API_KEY``): required as a bearer token on every route
    but /ping. The caller should end the process right after (``os._exit``, as the CLI
    does): the warm-up or a step may still be running in native code on another thread."""
    from ..config import EngineConfig
    from .http import HttpServer, HttpSettings

    config = EngineConfig.from_sources(options=options, properties_path=properties, model_dir=model_dir)
    logger.info("effective config: %s", _config_summary(config))
    api_key = api_key or os.environ.get("LMIDIST_JAX_API_KEY") or None
    if api_key is None and not is_loopback(host):
        logger.warning("serving on %s without an API key: anyone who can reach this address can use the model; "
                       "set --api-key or LMIDIST_JAX_API_KEY to require 'Authorization: Bearer <key>'", host)
    settings = http or HttpSettings()
    settings = dataclasses.replace(settings, max_body_bytes=max_body_bytes_of(config))
    app = create_app(None, config, api_key=api_key, max_body_bytes=settings.max_body_bytes)
    state = state_of(app)
    server = HttpServer(app, host, port, settings)
    logger.info("serving %s on http://%s:%d (warming up; %d HTTP worker threads)", state.model_name, host,
                server.server_port, settings.threads)
    failure: list[BaseException] = []
    engine_ready = threading.Event()

    def build() -> None:
        try:
            from ..engine.engine_loop import EngineLoop
            from ..engine.factory import build_engine

            engine = build_engine(config, warmup=True, progress=False)
            if state.shutting_down:
                return
            loop = EngineLoop(engine, job_queue_size=getattr(config, "job_queue_size", 1000) or 1000)
            set_engine_loop(app, loop)
            engine_ready.set()
            logger.info("engine ready: GET /ping answers 200")
        except BaseException as e:  # noqa: BLE001 - reported and re-raised by serve()
            logger.exception("the engine failed to start")
            failure.append(e)
            set_startup_error(app, e)

    signals = _StopSignals(state)
    signals.install()
    http_thread = threading.Thread(target=server.serve_until_stopped, name="lmidist-http", daemon=True)
    http_thread.start()
    builder = threading.Thread(target=build, name="lmidist-engine-build", daemon=True)
    builder.start()
    try:
        while not signals.count and not failure:
            time.sleep(0.1)
        if signals.count:
            _drain(state, server, signals, float(getattr(config, "drain_seconds", DEFAULT_DRAIN_SECONDS)))
    finally:
        state.shutting_down = True
        server.stop()
        http_thread.join(timeout=5)
        server.close(timeout=2)
        signals.restore()
        loop = state.loop
        if loop is not None and loop.healthy:
            loop.shutdown(join_timeout=STEP_GRACE_SECONDS, reason="the server is shutting down")
        logger.info("server stopped")
    if failure:
        raise failure[0]
    return 0


def _drain(state: ServerState, server, signals: _StopSignals, drain_seconds: float) -> None:
    """Refuse new requests (503), let the ones in flight finish for up to ``drain_seconds``,
    end the rest, stop the engine loop, and give their final records time to be sent."""
    state.shutting_down = True
    loop = state.loop
    if loop is None:
        logger.info("stopping during warm-up: nothing to drain")
        return
    loop.begin_drain()
    stats = loop.stats()
    logger.info("shutting down: draining %d request(s) for up to %.0f s (new requests get 503)",
                stats["num_requests"], drain_seconds)
    deadline = time.monotonic() + drain_seconds
    first_signal = signals.count
    while time.monotonic() < deadline and signals.count == first_signal:
        if loop.wait_idle(timeout=min(0.2, max(0.0, deadline - time.monotonic()))):
            break
    left = loop.stats()["num_requests"]
    if left:
        logger.warning("drain over: ending %d request(s) still in flight", left)
    stopped = loop.shutdown(join_timeout=STEP_GRACE_SECONDS, reason="the server is shutting down")
    if not stopped:
        logger.warning("the engine step in flight did not end within %.0f s; exiting without it",
                       STEP_GRACE_SECONDS)
    # Let the HTTP workers write the final records of the ended streams.
    flush_deadline = time.monotonic() + 3.0
    while time.monotonic() < flush_deadline and (server.busy_workers() or server.pending_output()):
        time.sleep(0.05)
