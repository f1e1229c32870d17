"""The HTTP server under the Flask app: waitress, with bounded worker threads and
timeouts, errors in the app's JSON shape, and a way to notice a client that left.

What waitress gives, and what is added here:

- A fixed pool of ``threads`` workers runs the app (a streaming response holds one for
  its duration); connections are read and written by one asynchronous I/O thread, so a
  slow or idle client costs a socket, never a thread. At most ``connection_limit``
  connections are open at once (beyond it new ones wait in the listen backlog).
- Bodies are read by waitress before the app runs, and limited to ``max_body_bytes``
  whether sent with Content-Length or chunked: over it, 413 and the connection is closed.
- ``idle_timeout``: a connection with no request in progress and no activity for that
  long is closed. ``request_timeout`` (added here): a request whose headers and body
  have not fully arrived that many seconds after its first byte is dropped (slow-loris).
- Client disconnects: with ``channel_request_lookahead`` the channel keeps reading while
  the app works, so a closed socket is seen at once and
  ``environ["waitress.client_disconnected"]()`` turns True; the app polls it while a
  request waits for the engine (see ``streaming.py``).
- waitress's own errors (413, 431, malformed requests) get the app's JSON error shape.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from .schema import error_body_for

logger = logging.getLogger("lmidist_jax.server")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20


def max_body_bytes_from_env() -> int:
    """The request body limit of ``serve``: ``LMIDIST_JAX_MAX_BODY_BYTES``, else 8 MiB."""
    return int(os.environ.get("LMIDIST_JAX_MAX_BODY_BYTES") or DEFAULT_MAX_BODY_BYTES)


@dataclasses.dataclass
class HttpSettings:
    """Transport limits of ``lmidist-jax serve`` (the ``--threads`` / ``--*-timeout`` flags)."""

    threads: int = 64
    connection_limit: int = 512
    request_timeout: float = 30.0   # seconds to send one request's headers and body
    idle_timeout: float = 60.0      # seconds a keep-alive connection may sit idle
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def error_json(status: int, message: str, path: str | None) -> bytes:
    """The app's error body for ``path`` (OpenAI's shape under /v1/, LMI's elsewhere)."""
    return json.dumps(error_body_for(path)(status, message)).encode("utf-8")


class _JsonErrorTask(ErrorTask):
    """waitress's error responses (too large, malformed) as JSON; the connection closes."""

    def execute(self):
        e = self.request.error
        max_body = self.channel.adj.max_request_body_size - 1
        if e.code == 413:
            message = f"the request body is too large: the limit is {max_body} bytes"
        elif e.code == 431:
            message = f"the request headers are too large: {e.body}"
        else:
            message = f"{e.reason}: {e.body}"
        body = error_json(e.code, message, getattr(self.request, "path", None))
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    error_task_class = _JsonErrorTask
    request_started: float | None = None  # first byte of the request being received

    def received(self, data):
        if self.request is None and data:
            self.request_started = time.monotonic()
        result = super().received(data)
        if self.request is None:
            self.request_started = None
        return result


class _Server(TcpWSGIServer):
    channel_class = _Channel
    request_timeout = 30.0

    def maintenance(self, now):
        super().maintenance(now)  # idle connections (channel_timeout)
        cutoff = time.monotonic() - self.request_timeout
        for channel in list(self.active_channels.values()):
            started = getattr(channel, "request_started", None)
            if started is not None and started < cutoff and not channel.will_close:
                logger.info("dropping a connection from %s: its request did not arrive within %.0f s",
                            channel.addr, self.request_timeout)
                channel.will_close = True


class HttpServer:
    """waitress serving ``app`` on host:port. ``serve_until_stopped()`` runs the I/O loop
    (in any thread) until ``stop()``; ``close()`` then shuts the workers down."""

    def __init__(self, app, host: str, port: int, settings: HttpSettings | None = None):
        s = settings or HttpSettings()
        self.settings = s
        self._map: dict = {}
        self.adj = Adjustments(
            host=host, port=port, threads=s.threads, connection_limit=s.connection_limit,
            channel_timeout=max(1, int(s.idle_timeout)),
            # How often idle / slow requests are looked for.
            cleanup_interval=max(1, int(min(s.idle_timeout, s.request_timeout) / 4)),
            # waitress refuses a body of max_request_body_size bytes or more.
            max_request_body_size=s.max_body_bytes + 1,
            channel_request_lookahead=1,  # keep reading while the app works: see disconnects
            asyncore_use_poll=True,  # select() fails above 1024 file descriptors
            ident="lmidist-jax", expose_tracebacks=False, log_socket_errors=False)
        self.dispatcher = ThreadedTaskDispatcher()
        self.dispatcher.set_thread_count(s.threads)
        self.servers = [
            _Server(app, self._map, True, None, dispatcher=self.dispatcher, adj=self.adj, sockinfo=sockinfo)
            for sockinfo in self.adj.listen]
        for srv in self.servers:
            srv.request_timeout = s.request_timeout
        self.server_port = int(self.servers[0].effective_port)
        self._stop = threading.Event()

    def serve_until_stopped(self, poll_interval: float = 0.2) -> None:
        while not self._stop.is_set():
            wasyncore.loop(timeout=poll_interval, map=self._map, use_poll=True, count=1)

    def stop(self) -> None:
        """Makes serve_until_stopped return (within its poll interval)."""
        self._stop.set()

    def busy_workers(self) -> int:
        """Requests being served or waiting for a worker."""
        d = self.dispatcher
        with d.lock:
            return d.active_count + len(d.queue)

    def pending_output(self) -> bool:
        return any(getattr(ch, "total_outbufs_len", 0) for ch in list(self._map.values()))

    def close(self, timeout: float = 5.0) -> None:
        """Stops the workers (waiting up to ``timeout``) and closes every socket."""
        self.stop()
        self.dispatcher.shutdown(timeout=timeout)
        wasyncore.close_all(self._map)

    # werkzeug-server-like names (the tests' in-process servers)
    def serve_forever(self) -> None:
        self.serve_until_stopped()

    def shutdown(self) -> None:
        self.stop()

    def server_close(self) -> None:
        self.close()
