"""The server process's life: ``serve`` builds the config, starts the HTTP transport at
once (``/ping`` answers 503), builds and warms up the engine in the background, serves,
and on a signal drains and stops.

Shutdown
--------
SIGTERM or SIGINT: new requests get 503 and ``/ping`` answers 503 while the requests in
flight run to their end for up to ``drain_seconds`` (option, ``--drain-seconds``); the
ones still running then end (streams with a final error record), the engine loop stops
after its step in flight (given at most ``STEP_GRACE_SECONDS`` more), and the process
exits 0. During warm-up nothing is drained: it exits at once. A second signal skips
the rest of the drain.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import threading
import time
from typing import Any

from ..config import EngineConfig
from .app import ServerState, create_app, set_engine_loop, set_startup_error, state_of
from .http import HttpServer, HttpSettings, max_body_bytes_from_env

logger = logging.getLogger("lmidist_jax.server")


# The step in flight when the drain ends gets this long to finish before the process
# exits without it (a long prefill must not hold a stopping server for minutes).
STEP_GRACE_SECONDS = 10.0


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
          http: HttpSettings | None = None) -> int:
    """Build the config (serving.properties + env + options, LMI rules), start the HTTP
    server at once (``/ping`` answers 503), build and warm up the engine in a background
    thread, then serve until SIGTERM / SIGINT, drain (see "Shutdown" above) and return 0.
    An engine that fails to start stops the server and the error is raised.

    ``api_key`` (else ``LMIDIST_JAX_API_KEY``): required as a bearer token on every route
    but /ping. The caller should end the process right after (``os._exit``, as the CLI
    does): the warm-up or a step may still be running in native code on another thread."""
    config = EngineConfig.from_sources(options=options, properties_path=properties, model_dir=model_dir)
    logger.info("effective config: \n%s", config.describe())
    api_key = api_key or os.environ.get("LMIDIST_JAX_API_KEY") or None
    if api_key is None and not is_loopback(host):
        logger.warning("serving on %s without an API key: anyone who can reach this address can use the model; "
                       "set --api-key or LMIDIST_JAX_API_KEY to require 'Authorization: Bearer <key>'", host)
    settings = http or HttpSettings()
    settings = dataclasses.replace(settings, max_body_bytes=max_body_bytes_from_env())
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
            loop = EngineLoop(engine, job_queue_size=config.job_queue_size)
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
            _drain(state, server, signals, config.drain_seconds)
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
