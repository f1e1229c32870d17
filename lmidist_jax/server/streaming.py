"""A request's run through the engine loop, as the HTTP handlers see it: `submit` it
(engine refusals become HTTP errors), then either `collect` its final output or send its
outputs as a streaming response body (`StreamBody`).

LMI streams ``application/jsonlines`` (one ``{"token": {"id", "text", "log_prob"}}`` per
line; the last line also carries ``generated_text``, and ``details`` when asked), or
``text/event-stream`` (``data: {json}\\n\\n`` events, same objects) with
``output_formatter=sse`` (``json``, ``jsonlines`` or unset: JSON lines). Chat and
completions stream SSE chunks ending with ``data: [DONE]``. An error after the stream
started ends it with a final error record.

A client that disconnects aborts its request (its KV blocks are freed before the next
engine step): a streaming one is noticed when a write fails or, between tokens, through
waitress's ``waitress.client_disconnected`` (the server keeps reading the socket while a
request runs, so a closed connection is seen at once); a non-streaming one through the
same check, polled every 0.1 s while it waits for the engine. Under another WSGI server
without that hook, only streams notice.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from flask import Response, request

from ..sampling_params import RequestError
from .metrics import ServerMetrics
from .schema import BadRequest, ServerError, dumps

logger = logging.getLogger("lmidist_jax.server")

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(record: dict) -> bytes:
    return f"data: {dumps(record)}\n\n".encode("utf-8")


def submit(loop, request_id: str, prompt, params, stream: bool, where: str = "", adapter: str | None = None):
    """The request queued on the engine loop, as a RequestStream that notices the client
    leaving; BadRequest (400) / ServerError (503) when the engine refuses it."""
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


def _observe(metrics: ServerMetrics, tracker, stream, out) -> None:
    tracker.observe(out)
    if stream.steps_to_first_token is not None and not getattr(tracker, "steps_recorded", False):
        tracker.steps_recorded = True
        metrics.steps_to_first_token.observe(stream.steps_to_first_token)


def collect(metrics: ServerMetrics, stream, tracker) -> Any:
    """The request's final RequestOutput, or ServerError (499 client gone, 503 shutdown,
    500 failed)."""
    from ..engine.engine_loop import EngineShutDown, RequestCancelled

    final = None
    try:
        for out in stream:
            _observe(metrics, tracker, stream, out)
            final = out
    except EngineShutDown as e:
        raise ServerError(str(e), 503) from None
    except RequestCancelled:
        metrics.aborted.inc()
        logger.info("client went away: aborted %s", stream.request_id)
        raise ServerError("the client disconnected; the request was aborted", 499) from None
    if final is None or not final.finished:
        raise ServerError("the request ended without a result (aborted)", 500)
    if final.error:
        raise ServerError(f"the request failed: {final.error}", 500)
    return final


def stream_response(body_iter: "StreamBody", content_type: str) -> Response:
    response = Response(body_iter, status=200, content_type=content_type)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


class StreamBody:
    """The body of a streaming response. Werkzeug calls ``close()`` when the response
    ends, including when the client went away mid-stream: that aborts the request so
    its KV blocks are freed (even if iteration never started).

    ``stream``: a RequestStream, or a list of them whose outputs are sent one stream after
    the other (their requests run together in the engine meanwhile); ``tracker``: one
    metrics tracker per stream likewise."""

    def __init__(self, metrics: ServerMetrics, stream, produce: Callable[[Any], list[bytes]],
                 encode_error: Callable[[int, str], bytes], tracker):
        self.metrics = metrics
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
                    _observe(self.metrics, tracker, stream, out)
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
            self.metrics.aborted.inc()
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
            self.metrics.aborted.inc()
            logger.info("client went away: aborting %s", ", ".join(s.request_id for s in self.streams))
        for stream in self.streams:  # a finished one ignores it
            stream.close()
        if self._gen is not None:
            self._gen.close()
