"""A background thread that drives an LLMEngine, and a thread-safe streaming API on
top of it (what the HTTP server uses).

Callers ``submit`` a request and iterate its outputs; ``abort`` (e.g. on client
disconnect) stops it and frees its blocks.

Only the loop thread touches the engine. Other threads talk to it through an inbox
(add / abort commands) that the loop drains between steps, so submitting, aborting
and reading ``stats()`` never wait for a step: the one lock here guards the inbox and
the per-request queues and is never held while the engine works. Tokenization runs in
the submitting thread on a tokenizer copy of its own (a small pool: HF fast tokenizers
are not meant to be shared between threads), so a huge prompt delays only its own
request; the loop's detokenizer uses the engine's tokenizer, which no other thread
touches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator, Sequence as Seq

from ..outputs import RequestOutput
from ..sampling_params import RequestError, SamplingParams
from .llm_engine import LLMEngine

logger = logging.getLogger("lmidist_jax")

_DONE = object()


class QueueFullError(RuntimeError):
    """The engine already holds job_queue_size requests."""


class EngineShutDown(RuntimeError):
    """The loop was stopped (server shutdown) before the request finished."""


class RequestCancelled(Exception):
    """Raised by a RequestStream whose ``cancelled`` check said the client went away
    (the request has been aborted)."""


# -- the inbox's commands (any thread -> the loop thread) ---------------------------------


@dataclasses.dataclass(frozen=True)
class AddRequest:
    """Queue a request in the engine (already tokenized and validated by ``submit``)."""

    request_id: str
    text: str | None
    token_ids: list[int]
    params: SamplingParams
    stream: bool
    adapter: str | None


@dataclasses.dataclass(frozen=True)
class AbortRequest:
    """Stop a request and free its blocks (its stream has already ended)."""

    request_id: str


@dataclasses.dataclass(frozen=True)
class CallOnEngine:
    """Run ``fn(engine)`` between two steps; its result or error goes into ``box`` and
    ``done`` is set."""

    fn: Callable[[LLMEngine], Any]
    done: threading.Event
    box: dict


Command = AddRequest | AbortRequest | CallOnEngine


class TokenizerPool:
    """Copies of a tokenizer for request threads: ``with pool.borrow() as tok:`` gives
    one copy to one thread at a time. None in, None out (models without a tokenizer)."""

    def __init__(self, tokenizer, size: int = 2):
        self._free: queue.LifoQueue = queue.LifoQueue()
        self.size = 0 if tokenizer is None else max(1, size)
        for _ in range(self.size):
            self._free.put(copy.deepcopy(tokenizer))

    @contextlib.contextmanager
    def borrow(self):
        if self.size == 0:
            yield None
            return
        tok = self._free.get()
        try:
            yield tok
        finally:
            self._free.put(tok)


def _lora_snapshot(lora) -> dict:
    """LoRA adapter counts for /metrics (nothing when LoRA is off)."""
    if lora is None:
        return {}
    st = lora.stats
    return {"lora_adapters": len(lora.registry), "lora_registered": st.registered, "lora_removed": st.removed,
            "lora_disk_reads": st.disk_reads, "lora_slot_loads": st.slot_loads}


class EngineLoop:
    def __init__(self, engine: LLMEngine, *, job_queue_size: int = 1000, num_tokenizers: int = 2):
        self.engine = engine
        self.job_queue_size = job_queue_size
        self.tokenizers = TokenizerPool(engine.tokenizer, num_tokenizers)
        self._lock = threading.Lock()  # guards the fields below; never held during a step
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)  # notified when _queues empties
        self._inbox: list[Command] = []
        self._queues: dict[str, queue.Queue] = {}
        self._submitted_at: dict[str, int] = {}  # request id -> steps done when it was queued
        self._steps_done = 0
        self._stopped = False
        self._draining = False
        self.error: BaseException | None = None
        self._snapshot = self._engine_snapshot()
        self._thread = threading.Thread(target=self._run, name="lmidist-engine", daemon=True)
        self._thread.start()

    # -- public API (any thread) ------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stopped and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._draining

    def _check_admission(self) -> None:
        """Raises when a new request cannot be taken now (call under the lock)."""
        if self.error is not None:
            raise RuntimeError(f"the engine failed: {self.error}")
        if self._stopped or self._draining:
            raise RuntimeError("the engine is shutting down")
        if len(self._queues) >= self.job_queue_size:
            raise QueueFullError(f"the request queue is full ({self.job_queue_size} requests)")

    def encode_chat(self, messages) -> list[int]:
        """Token ids of a conversation (see LLMEngine.encode_chat), on a pooled tokenizer."""
        with self.tokenizers.borrow() as tok:
            return self.engine.encode_chat(messages, tokenizer=tok)

    def decode(self, token_ids: Seq[int], **kwargs) -> str:
        """Text of token ids on a pooled tokenizer ("" for a model without one)."""
        with self.tokenizers.borrow() as tok:
            return "" if tok is None else tok.decode(list(token_ids), **kwargs)

    def submit(self, request_id: str, prompt: str | Seq[int],
               params: SamplingParams | None = None, *, stream: bool = True,
               adapter: str | None = None) -> "RequestStream":
        """Queue a request; raises RequestError / QueueFullError / RuntimeError (shutting
        down, failed) before anything is queued. ``stream=False``: only the final output's
        text matters (decoded once at the end). ``adapter``: a registered LoRA adapter."""
        params = params or SamplingParams()
        if adapter is not None:  # unknown, or LoRA off: refused before anything is queued
            self.engine.check_adapter(adapter)
        with self._lock:
            self._check_admission()  # before tokenizing: a full server does no work
        with self.tokenizers.borrow() as tok:
            text, ids = self.engine.encode(prompt, tokenizer=tok)
        self.engine.validate(ids, params)
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._check_admission()
            if request_id in self._queues:
                raise RequestError(f"request id {request_id!r} is already in use")
            self._queues[request_id] = q
            self._submitted_at[request_id] = self._steps_done
            self._inbox.append(AddRequest(request_id, text, ids, params, stream, adapter))
            self._wake.notify()
        return RequestStream(self, request_id, q)

    def call(self, fn, timeout: float | None = None):
        """Runs ``fn(engine)`` on the engine thread between two steps (the engine is never
        touched by two threads) and returns its result, or raises what it raised. Used to
        register and remove LoRA adapters while requests run."""
        done, box = threading.Event(), {}
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the engine failed: {self.error}")
            if self._stopped:
                raise RuntimeError("the engine is shutting down")
            self._inbox.append(CallOnEngine(fn, done, box))
            self._wake.notify()
        if not done.wait(timeout):
            raise TimeoutError(f"the engine did not run the call within {timeout} s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def abort(self, request_id: str) -> None:
        """Ends the request's stream at once; the engine frees its blocks before its next step."""
        with self._lock:
            q = self._queues.pop(request_id, None)
            self._submitted_at.pop(request_id, None)
            if q is None:
                return
            self._inbox.append(AbortRequest(request_id))
            self._wake.notify()
            if not self._queues:
                self._idle.notify_all()
        q.put(_DONE)

    def stats(self) -> dict:
        """Engine state as of the end of the last step (never waits for a step)."""
        with self._lock:
            return {**self._snapshot, "num_requests": len(self._queues)}

    def begin_drain(self) -> None:
        """Refuse new requests from now on; the ones in flight keep running."""
        with self._lock:
            self._draining = True

    def wait_idle(self, timeout: float | None) -> bool:
        """Waits until no request is in flight; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queues:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True

    def shutdown(self, join_timeout: float = 10.0, reason: str = "the engine was shut down") -> bool:
        """Stop the loop: open streams end with an error instead of waiting forever. Waits up
        to ``join_timeout`` s for the step in flight; returns whether the loop thread ended."""
        with self._lock:
            self._stopped = True
            self._fail_all(EngineShutDown(reason))
            self._wake.notify()
        self._thread.join(timeout=join_timeout)
        return not self._thread.is_alive()

    def _fail_all(self, error: BaseException) -> None:
        for q in self._queues.values():
            q.put(error)
            q.put(_DONE)
        self._queues.clear()
        self._submitted_at.clear()
        self._idle.notify_all()

    # -- the loop (the only thread that touches the engine) -----------------------------

    def _engine_snapshot(self) -> dict:
        engine = self.engine
        bm = engine.block_manager
        st = getattr(engine, "stats", None)
        return {
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "num_steps": self._steps_done,
            "num_preemptions": getattr(st, "num_preemptions", 0),
            # With a draft model (engine/spec_decode.py): proposals made and accepted so far.
            "spec_proposed_tokens": getattr(getattr(engine, "spec_stats", None), "num_proposed_tokens", 0),
            "spec_accepted_tokens": getattr(getattr(engine, "spec_stats", None), "num_accepted_tokens", 0),
            **_lora_snapshot(getattr(engine, "lora", None)),
        }

    def _apply(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, AbortRequest):
                self.engine.abort(command.request_id)  # its final output finds no queue: dropped
            elif isinstance(command, CallOnEngine):
                self._call(command)
            else:
                self._add(command)

    def _call(self, command: CallOnEngine) -> None:
        try:
            command.box["result"] = command.fn(self.engine)
        except Exception as e:  # handed to the caller
            command.box["error"] = e
        snapshot = self._engine_snapshot()  # /metrics sees the change at once
        with self._lock:
            self._snapshot = {**snapshot, "num_steps": self._steps_done}
        command.done.set()

    def _add(self, command: AddRequest) -> None:
        request_id = command.request_id
        try:
            self.engine.add_request(request_id, command.text if command.text is not None else command.token_ids,
                                    command.params, stream=command.stream, prompt_token_ids=command.token_ids,
                                    adapter=command.adapter)
        except RequestError as e:  # checked in submit already; kept for safety
            with self._lock:
                q = self._queues.pop(request_id, None)
                self._submitted_at.pop(request_id, None)
            if q is not None:
                q.put(e)
                q.put(_DONE)

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopped and not self._inbox and not self.engine.has_unfinished_requests():
                        self._wake.wait()
                    if self._stopped:
                        return
                    commands, self._inbox = self._inbox, []
                self._apply(commands)
                outputs = []
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    stats = getattr(self.engine, "stats", None)
                    steps = getattr(stats, "num_steps", None)
                    steps = self._steps_done + 1 if steps is None else steps
                else:
                    steps = self._steps_done
                snapshot = self._engine_snapshot()
                snapshot["num_steps"] = steps
                with self._lock:
                    self._steps_done = steps
                    self._snapshot = snapshot
                    self._deliver(outputs)
                # The lock is free here and the loop goes straight back to the engine; other
                # threads never need the engine itself, so nothing waits behind the next step.
        except BaseException as e:  # a broken engine must not hang its clients
            logger.exception("engine step failed")
            with self._lock:
                self.error = e
                self._fail_all(e)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hands outputs to their queues (under the lock, so an abort never races them)."""
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is None:
                continue
            q.put((out, self._steps_done))
            if out.finished:
                q.put(_DONE)
                del self._queues[out.request_id]
                self._submitted_at.pop(out.request_id, None)
                if not self._queues:
                    self._idle.notify_all()

    def submitted_at_step(self, request_id: str) -> int | None:
        with self._lock:
            return self._submitted_at.get(request_id)


class RequestStream:
    """Iterator over one request's outputs; closing it early aborts the request.

    ``cancelled``: a check polled every ``poll_interval`` s while no output arrives (the
    server passes "has the client disconnected?"); when it says yes the request is
    aborted and iteration raises RequestCancelled."""

    def __init__(self, loop: EngineLoop, request_id: str, q: queue.Queue):
        self.loop = loop
        self.request_id = request_id
        self._queue = q
        self._done = False
        self.cancelled: Callable[[], bool] | None = None
        self.poll_interval = 0.1
        self.submitted_at_step = loop.submitted_at_step(request_id) or 0
        # Engine steps from submission to the step that gave the first token (1: the next step).
        self.steps_to_first_token: int | None = None

    def __iter__(self) -> Iterator[RequestOutput]:
        try:
            while True:
                item = self._next_item()
                if item is _DONE:
                    self._done = True
                    return
                if isinstance(item, (RequestError, EngineShutDown)):
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed: {item}") from item
                out, step = item
                if self.steps_to_first_token is None and out.new_token_ids:
                    self.steps_to_first_token = step - self.submitted_at_step
                yield out
        finally:
            if not self._done:
                self.close()

    def _next_item(self):
        if self.cancelled is None:
            return self._queue.get()
        while True:  # checked before every output too: a running request always has more
            if self.cancelled():
                self.close()
                raise RequestCancelled(f"the client of {self.request_id} went away")
            try:
                return self._queue.get(timeout=self.poll_interval)
            except queue.Empty:
                pass

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.loop.abort(self.request_id)


__all__ = ["EngineLoop", "RequestStream", "QueueFullError", "RequestCancelled", "EngineShutDown", "RequestError", "TokenizerPool"]
