"""A background thread that drives an LLMEngine, and a thread-safe streaming API on
top of it (what the HTTP server uses).

Callers ``submit`` a request and iterate its outputs; ``abort`` (e.g. on client
disconnect) stops it and frees its blocks. Engine calls are serialized by one lock;
the loop sleeps on a condition variable while there is no work.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Iterator, Sequence as Seq

from ..outputs import RequestOutput
from ..sampling_params import RequestError, SamplingParams
from .llm_engine import LLMEngine

logger = logging.getLogger("lmidist_jax")

_DONE = object()


class QueueFullError(RuntimeError):
    """The engine already holds job_queue_size requests."""


class EngineLoop:
    def __init__(self, engine: LLMEngine, *, job_queue_size: int = 1000):
        self.engine = engine
        self.job_queue_size = job_queue_size
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, queue.Queue] = {}
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lmidist-engine", daemon=True)
        self._thread.start()

    # -- public API (any thread) ------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stopped and self._thread.is_alive()

    def submit(self, request_id: str, prompt: str | Seq[int],
               params: SamplingParams | None = None, *, stream: bool = True) -> "RequestStream":
        """Queue a request; raises RequestError / QueueFullError before anything is queued.
        ``stream=False``: only the final output's text matters (decoded once at the end)."""
        q: queue.Queue = queue.Queue()
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the engine failed: {self.error}")
            if self._stopped:
                raise RuntimeError("the engine is shutting down")
            if len(self._queues) >= self.job_queue_size:
                raise QueueFullError(f"the request queue is full ({self.job_queue_size} requests)")
            self.engine.add_request(request_id, prompt, params, stream=stream)
            self._queues[request_id] = q
            self._wake.notify()
        return RequestStream(self, request_id, q)

    def abort(self, request_id: str) -> None:
        with self._lock:
            q = self._queues.pop(request_id, None)
            self.engine.abort(request_id)  # its final output finds no queue in _run: dropped
        if q is not None:
            q.put(_DONE)

    def stats(self) -> dict:
        with self._lock:
            bm = self.engine.block_manager
            return {
                "running": self.engine.num_running,
                "waiting": self.engine.num_waiting,
                "kv_blocks_used": bm.num_used_blocks,
                "kv_blocks_free": bm.num_free_blocks,
                "num_requests": len(self._queues),
            }

    def shutdown(self) -> None:
        """Stop the loop; open streams end with an error instead of waiting forever."""
        with self._lock:
            self._stopped = True
            self._fail_all(RuntimeError("the engine was shut down"))
            self._wake.notify()
        self._thread.join(timeout=10)

    def _fail_all(self, error: BaseException) -> None:
        for q in self._queues.values():
            q.put(error)
            q.put(_DONE)
        self._queues.clear()

    # -- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self.engine.has_unfinished_requests():
                    self._wake.wait()
                if self._stopped:
                    return
                try:
                    outputs = self.engine.step()
                except BaseException as e:  # a broken engine must not hang its clients
                    logger.exception("engine step failed")
                    self.error = e
                    self._fail_all(e)
                    return
                for out in outputs:
                    q = self._queues.get(out.request_id)
                    if q is None:
                        continue
                    q.put(out)
                    if out.finished:
                        q.put(_DONE)
                        del self._queues[out.request_id]


class RequestStream:
    """Iterator over one request's outputs; closing it early aborts the request."""

    def __init__(self, loop: EngineLoop, request_id: str, q: queue.Queue):
        self.loop = loop
        self.request_id = request_id
        self._queue = q
        self._done = False

    def __iter__(self) -> Iterator[RequestOutput]:
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    self._done = True
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed: {item}") from item
                yield item
        finally:
            if not self._done:
                self.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.loop.abort(self.request_id)


__all__ = ["EngineLoop", "RequestStream", "QueueFullError", "RequestError"]
