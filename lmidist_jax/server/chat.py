"""OpenAI chat completions' wire format (``/v1/chat/completions``, or an LMI route with a
``messages`` field): the request parsed into SamplingParams, RequestOutputs turned into
``chat.completion`` responses and ``chat.completion.chunk`` stream chunks; and what the
OpenAI completions format (``completions.py``) shares with it: the sampling fields,
``stream_options``, finish reasons, usage and logprob values.

Pure, like ``schema.py``: parsing raises `BadRequest` naming what was wrong.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from typing import Any

from ..outputs import RequestOutput, TokenLogprob
from ..sampling_params import SamplingParams
from .schema import (ADAPTER_FIELDS, INT32_MAX, SEED_MAX, BadRequest, Limits, check_adapter_fields, json_type,
                     read_bool, read_int, read_number, read_stop_list, read_token_ids, sampling_params)

logger = logging.getLogger("lmidist_jax.server")

# -- what chat and completions share ----------------------------------------------------

OPENAI_MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
_SAMPLING_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty")


def read_sampling_fields(body: dict, vocab_size: int, bools: tuple[str, ...]) -> dict[str, Any]:
    """SamplingParams fields from OpenAI's sampling fields and vLLM's extras (temperature
    defaults to OpenAI's 1); ``bools``: the boolean extras this route takes."""
    where = ""
    kwargs: dict[str, Any] = {"temperature": 1.0}
    for key in _SAMPLING_NUMBERS:
        if body.get(key) is not None:
            kwargs[key] = read_number(where, key, body[key])
    if not 0 <= kwargs["temperature"] <= OPENAI_MAX_TEMPERATURE:
        raise BadRequest(f"temperature={body['temperature']!r} is out of range: expected a number in "
                         f"[0, {OPENAI_MAX_TEMPERATURE:g}]")
    if body.get("seed") is not None:
        kwargs["seed"] = read_int(where, "seed", body["seed"], 0, SEED_MAX)
    if body.get("top_k") is not None:
        kwargs["top_k"] = max(read_int(where, "top_k", body["top_k"], -1, INT32_MAX), 0)  # vLLM: -1 disables
    if "stop" in body:
        kwargs["stop_sequences"] = read_stop_list(where, "stop", body["stop"])
    if body.get("stop_token_ids") is not None:
        kwargs["stop_token_ids"] = read_token_ids(where, "stop_token_ids", body["stop_token_ids"], vocab_size)
    for key in bools:
        if body.get(key) is not None:
            kwargs[key] = read_bool(where, key, body[key])
    return kwargs


def read_include_usage(body: dict) -> bool:
    """``stream_options.include_usage``: a last stream chunk carries the usage."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise BadRequest(f'"stream_options" must be an object, got {json_type(opts)}')
    if opts.get("include_usage") is None:
        return False
    return read_bool("", "stream_options.include_usage", opts["include_usage"])


def check_model_field(body: dict) -> None:
    """``model`` is not checked against the served model, only its type."""
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest(f'"model" must be a string, got {json_type(body["model"])}')


FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "abort": "stop"}


def finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason as OpenAI names it."""
    if reason is None:
        return None
    return FINISH_REASONS.get(reason, reason)


def openai_logprob(x: float) -> float:
    return float(x) if math.isfinite(x) else -9999.0  # OpenAI's floor for impossible tokens


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- chat (OpenAI) requests -----------------------------------------------------------

CHAT_FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
               "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "n", "stream",
               "stream_options", "user",
               # vLLM-style extras
               "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "skip_special_tokens"}


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict]
    kwargs: dict  # SamplingParams fields; max_new_tokens is added once the prompt length is known
    max_tokens: int | None
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    n: int
    dropped: list[str] = dataclasses.field(default_factory=list)

    def sampling_params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        kwargs = dict(self.kwargs)
        kwargs["max_new_tokens"] = (self.max_tokens if self.max_tokens is not None
                                    else max(1, max_model_len - prompt_len))
        return sampling_params(kwargs)


CHAT_ROLES = ("system", "user", "assistant", "tool")


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise BadRequest(f'"messages" must be a list of {{"role", "content"}} objects, got {json_type(value)}')
    if not value:
        raise BadRequest('"messages" is an empty list')
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRequest(f'"messages[{i}]" must be an object, got {json_type(m)}')
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(f'"messages[{i}].role" must be a non-empty string, got {json_type(role)}')
        if role not in CHAT_ROLES:
            raise BadRequest(f'"messages[{i}].role" is {role!r}: expected one of {", ".join(CHAT_ROLES)}')
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise BadRequest(f'"messages[{i}].content[{j}]" must be {{"type": "text", "text": str}} '
                                     f"(only text content is supported)")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise BadRequest(f'"messages[{i}].content" must be a string or a list of text parts, '
                             f"got {json_type(content)}")
        messages.append({**{k: v for k, v in m.items() if k not in ("role", "content")},
                         "role": role, "content": content})
    return messages


def parse_chat_request(body: dict, limits: Limits) -> ChatRequest:
    messages = _messages(body.get("messages"))
    check_adapter_fields("", body)
    where = ""
    max_tokens = None
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            max_tokens = read_int(where, key, body[key], 1, INT32_MAX)
    kwargs = read_sampling_fields(body, limits.vocab_size, ("ignore_eos", "skip_special_tokens"))
    n = 1 if body.get("n") is None else read_int(where, "n", body["n"], 1, limits.max_n)
    kwargs["n"] = n
    logprobs = False if body.get("logprobs") is None else read_bool(where, "logprobs", body["logprobs"])
    top_logprobs = 0
    if body.get("top_logprobs") is not None:
        top_logprobs = read_int(where, "top_logprobs", body["top_logprobs"], 0, 20)
        if top_logprobs and not logprobs:
            raise BadRequest('"top_logprobs" requires "logprobs": true')
    kwargs["logprobs"] = logprobs
    kwargs["top_n_tokens"] = top_logprobs
    stream = False if body.get("stream") is None else read_bool(where, "stream", body["stream"])
    include_usage = read_include_usage(body)
    check_model_field(body)
    dropped = [k for k in body if k not in CHAT_FIELDS and k not in ADAPTER_FIELDS]
    if dropped:
        logger.warning("dropping unsupported chat request fields: %s", ", ".join(dropped))
    req = ChatRequest(messages=messages, kwargs=kwargs, max_tokens=max_tokens, stream=stream,
                      include_usage=include_usage, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
                      dropped=dropped)
    # Validate the sampling parameters now (before the template runs).
    req.sampling_params(1, max(2, limits.max_model_len))
    return req


# -- chat responses -------------------------------------------------------------------


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob], top_logprobs: int) -> dict:
    return {"content": [
        {"token": e.text, "logprob": openai_logprob(e.logprob), "bytes": _bytes(e.text),
         "top_logprobs": [{"token": text, "logprob": openai_logprob(lp), "bytes": _bytes(text)}
                          for t, lp, text in e.top[:top_logprobs]]}
        for e in entries]}


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_response(req: ChatRequest, out: RequestOutput, model: str, chat_id: str, created: int) -> dict:
    choices = []
    for c in out.outputs:
        choices.append({
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c.logprobs or [], req.top_logprobs) if req.logprobs else None,
            "finish_reason": finish_reason(c.finish_reason),
        })
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return {"id": chat_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(len(out.prompt_token_ids), completion_tokens)}


class ChatStreamBuilder:
    """Turns RequestOutputs into ``chat.completion.chunk`` dicts, per choice index, from
    each sequence's text delta (the engine holds back text that could still start a
    stop string)."""

    def __init__(self, req: ChatRequest, model: str, chat_id: str | None = None, created: int | None = None):
        self.req = req
        self.model = model
        self.id = chat_id or new_chat_id()
        self.created = created or int(time.time())
        self.tokens_sent = [0] * req.n
        self.finished = [False] * req.n
        self.started = False
        self.prompt_tokens = 0

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": choices}
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    def first(self) -> dict:
        self.started = True
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(self.req.n)])

    def chunks(self, out: RequestOutput) -> list[dict]:
        self.prompt_tokens = len(out.prompt_token_ids)
        result = []
        for c in out.outputs:
            i = c.index
            if i >= self.req.n or self.finished[i]:
                continue
            done = c.finish_reason is not None
            delta_text = c.text_delta
            new_entries = (c.logprobs or [])[self.tokens_sent[i]:]
            self.tokens_sent[i] = len(c.token_ids)
            if not delta_text and not done and not (self.req.logprobs and new_entries):
                continue
            choice = {"index": i, "delta": {"content": delta_text} if delta_text or not done else {},
                      "logprobs": chat_logprobs(new_entries, self.req.top_logprobs)
                      if self.req.logprobs and new_entries else None,
                      "finish_reason": finish_reason(c.finish_reason) if done else None}
            if done:
                self.finished[i] = True
            result.append(self._chunk([choice]))
        return result

    def usage_chunk(self) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = usage(self.prompt_tokens, sum(self.tokens_sent))
        return chunk
