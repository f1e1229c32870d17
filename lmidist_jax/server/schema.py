"""Request parsing/validation and response building for the HTTP server.

Two request shapes:

* LMI (``/invocations``, ``/predictions/<model>``):
  ``{"inputs": str | [str], "parameters": {...}, "stream": bool}``
* OpenAI chat completions (``/v1/chat/completions``, or any of the above with a
  ``messages`` field).

Everything here is pure (no Flask, no engine calls): parsing raises `BadRequest`
with the HTTP status and a message naming what was wrong; the builders turn
`RequestOutput`s into JSON-ready dicts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from typing import Any, Callable

from ..outputs import CompletionOutput, RequestOutput, TokenLogprob
from ..sampling_params import RequestError, SamplingParams

logger = logging.getLogger("lmidist_jax.server")

INT32_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1


class BadRequest(Exception):
    """A request the server refuses; ``status`` is the HTTP status code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> dict:
    return {"code": status, "error": message}


# -- JSON -----------------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (non-finite numbers are not accepted)")


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object, or BadRequest(400)."""
    if not raw or not raw.strip():
        raise BadRequest("the request body is empty: expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not valid UTF-8: {e}") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# -- typed field readers --------------------------------------------------------------


def _bool(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{where}{name} must be a boolean (true/false), got {_json_type(value)} {value!r}")
    return value


def _int(where: str, name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{where}{name} must be an integer, got {_json_type(value)} {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"{where}{name}={value} is out of range: expected an integer in [{lo}, {hi}]")
    return value


def _number(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{where}{name} must be a number, got {_json_type(value)} {value!r}")
    if not math.isfinite(value) or abs(value) > 1e30:
        raise BadRequest(f"{where}{name}={value!r} is out of range")
    return float(value)


def _stop_list(where: str, name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise BadRequest(f"{where}{name} must be a string or a list of strings, got {_json_type(value)}")
    if any(not s for s in value):
        raise BadRequest(f"{where}{name} must not contain empty strings")
    return tuple(value)


def _token_ids(where: str, name: str, value: Any, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"{where}{name} must be a list of token ids, got {_json_type(value)}")
    return tuple(_int(where, f"{name}[{i}]", t, 0, vocab_size - 1) for i, t in enumerate(value))


def _check_adapters(where: str, params: dict) -> None:
    for key in ("adapters", "adapter_id", "adapter"):
        if key in params and params[key] not in (None, "", []):
            raise BadRequest(f"unknown adapter {params[key]!r} ({where}{key}): "
                             f"no LoRA adapters are loaded on this server")


def _sampling_params(kwargs: dict) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except RequestError as e:
        raise BadRequest(str(e)) from None
    except (TypeError, ValueError) as e:
        raise BadRequest(f"invalid parameters: {e}") from None


@dataclasses.dataclass
class Limits:
    """What the server enforces beyond SamplingParams' own checks."""

    vocab_size: int
    max_model_len: int
    max_n: int = 16
    max_logprobs: int = 20  # the engine's: top alternatives a request may ask for


# -- LMI requests ---------------------------------------------------------------------

LMI_TOP_LEVEL = {"inputs", "parameters", "stream"}

# LMI parameter name -> SamplingParams field (plain numeric/boolean ones).
_LMI_INTS = {"max_new_tokens": ("max_new_tokens", 1, INT32_MAX), "top_k": ("top_k", 0, INT32_MAX),
             "seed": ("seed", 0, SEED_MAX), "top_n_tokens": ("top_n_tokens", 0, INT32_MAX)}
_LMI_NUMBERS = {"temperature": "temperature", "top_p": "top_p", "min_p": "min_p",
                "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                "frequency_penalty": "frequency_penalty"}
_LMI_BOOLS = {"do_sample": "do_sample", "ignore_eos_token": "ignore_eos",
              "skip_special_tokens": "skip_special_tokens"}
_LMI_SERVER_BOOLS = ("return_full_text", "details", "decoder_input_details")


@dataclasses.dataclass
class LmiRequest:
    inputs: list[str]
    batched: bool  # "inputs" was a list: the response is a list
    params: SamplingParams
    stream: bool
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    top_n_tokens: int = 0
    dropped: list[str] = dataclasses.field(default_factory=list)


def parse_lmi_request(body: dict, limits: Limits) -> LmiRequest:
    if "inputs" not in body:
        raise BadRequest('the request has no "inputs" field: expected {"inputs": str | [str], '
                         '"parameters": {...}} (or "messages" for chat)')
    inputs = body["inputs"]
    if isinstance(inputs, str):
        batched, prompts = False, [inputs]
    elif isinstance(inputs, list):
        batched, prompts = True, inputs
        if not prompts:
            raise BadRequest('"inputs" is an empty list')
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise BadRequest(f'"inputs[{i}]" must be a string, got {_json_type(p)}')
    else:
        raise BadRequest(f'"inputs" must be a string or a list of strings, got {_json_type(inputs)}')
    for i, p in enumerate(prompts):
        if not p:
            raise BadRequest('"inputs" is an empty string' if not batched else f'"inputs[{i}]" is an empty string')

    stream = body.get("stream", False)
    stream = False if stream is None else _bool("", '"stream"', stream)
    params = body.get("parameters", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(f'"parameters" must be an object, got {_json_type(params)}')
    dropped = [f"{k}" for k in body if k not in LMI_TOP_LEVEL]

    where = "parameters."
    _check_adapters(where, params)
    kwargs: dict[str, Any] = {}
    server: dict[str, bool] = {}
    n = best_of = None
    for key, value in params.items():
        if key in _LMI_INTS:
            field, lo, hi = _LMI_INTS[key]
            if value is None and key == "seed":
                continue
            kwargs[field] = _int(where, key, value, lo, hi)
        elif key in _LMI_NUMBERS:
            kwargs[_LMI_NUMBERS[key]] = _number(where, key, value)
        elif key in _LMI_BOOLS:
            kwargs[_LMI_BOOLS[key]] = _bool(where, key, value)
        elif key in _LMI_SERVER_BOOLS:
            server[key] = _bool(where, key, value)
        elif key in ("stop_sequences", "stop"):
            kwargs["stop_sequences"] = kwargs.get("stop_sequences", ()) + _stop_list(where, key, value)
        elif key == "stop_token_ids":
            kwargs["stop_token_ids"] = _token_ids(where, key, value, limits.vocab_size)
        elif key == "n":
            n = _int(where, key, value, 1, limits.max_n)
        elif key == "best_of":
            if value is not None:
                best_of = _int(where, key, value, 1, limits.max_n)
        else:
            dropped.append(f"parameters.{key}")
    if best_of is not None and n is None:
        n = 1
    if n is not None:
        kwargs["n"] = n
        if best_of is not None:
            if best_of < n:
                raise BadRequest(f"parameters.best_of={best_of} must be >= n={n}")
            kwargs["best_of"] = best_of
    details = server.get("details", False)
    decoder_input_details = server.get("decoder_input_details", False)
    if n is not None and n > 1 and not details:
        # The LMI response has one "generated_text"; the other sequences only have a place
        # in details.best_of_sequences. Dropping them silently would waste their compute.
        raise BadRequest(f"parameters.n={n} asks for {n} sequences, but only the first is returned in "
                         f'"generated_text": set "details": true in "parameters" to get the others in '
                         f"details.best_of_sequences (or use n=1)")
    top_n = kwargs.get("top_n_tokens", 0)
    if stream and batched and len(prompts) > 1:
        raise BadRequest('"stream": true takes a single input; got a list of '
                         f"{len(prompts)} inputs (send them as separate requests)")
    if stream and best_of is not None and best_of > (n or 1):
        raise BadRequest("parameters.best_of > n is not supported with \"stream\": true "
                         "(the best sequences are only known at the end)")
    # Streamed tokens and details carry log-probabilities.
    kwargs["logprobs"] = bool(stream or details or top_n)
    if decoder_input_details:
        kwargs["prompt_logprobs"] = True
    if dropped:
        logger.warning("dropping unknown request fields: %s", ", ".join(dropped))
    return LmiRequest(inputs=prompts, batched=batched, params=_sampling_params(kwargs), stream=stream,
                      details=details, decoder_input_details=decoder_input_details,
                      return_full_text=server.get("return_full_text", False), top_n_tokens=top_n,
                      dropped=dropped)


# -- LMI responses --------------------------------------------------------------------


def _token_dict(token_id: int, text: str, logprob: float | None) -> dict:
    return {"id": int(token_id), "text": text, "log_prob": None if logprob is None else _finite(logprob)}


def _top_tokens(entry: TokenLogprob) -> list[dict]:
    return [_token_dict(t, text, lp) for t, lp, text in entry.top]


def _completion_details(c: CompletionOutput, top_n: int) -> dict:
    d: dict[str, Any] = {
        "finish_reason": c.finish_reason,
        "generated_tokens": len(c.token_ids),
        "tokens": [_token_dict(e.token_id, e.text, e.logprob) for e in (c.logprobs or [])],
    }
    if top_n:
        d["top_tokens"] = [_top_tokens(e) for e in (c.logprobs or [])]
    return d


def prefill_tokens(out: RequestOutput, decode: Callable[[int], str]) -> list[dict]:
    lps = out.prompt_logprobs
    return [_token_dict(t, decode(t), lps[i] if lps is not None and i < len(lps) else None)
            for i, t in enumerate(out.prompt_token_ids)]


def lmi_details(req: LmiRequest, prompt: str, out: RequestOutput, decode: Callable[[int], str]) -> dict:
    c = out.outputs[0]
    d = {"inputs": prompt, **_completion_details(c, req.top_n_tokens)}
    if req.params.seed is not None:
        d["seed"] = req.params.seed
    if req.decoder_input_details:
        d["prefill"] = prefill_tokens(out, decode)
    if len(out.outputs) > 1:
        d["best_of_sequences"] = [
            {"generated_text": _full_text(req, prompt, o.text), **_completion_details(o, req.top_n_tokens)}
            for o in out.outputs[1:]]
    return d


def _full_text(req: LmiRequest, prompt: str, text: str) -> str:
    return prompt + text if req.return_full_text else text


def lmi_response(req: LmiRequest, prompt: str, out: RequestOutput, decode: Callable[[int], str]) -> dict:
    resp: dict[str, Any] = {"generated_text": _full_text(req, prompt, out.text)}
    if req.details:
        resp["details"] = lmi_details(req, prompt, out, decode)
    return resp


class LmiStreamBuilder:
    """Turns one request's RequestOutputs into stream records (dicts), one per token:
    ``{"token": {"id", "text", "log_prob"}}``; the last one also has ``generated_text``
    (and ``details`` when asked). Concatenating the ``token.text`` values gives the
    generated text."""

    def __init__(self, req: LmiRequest, prompt: str, decode_piece: Callable[[int], str],
                 decode: Callable[[int], str]):
        self.req = req
        self.prompt = prompt
        self.decode_piece = decode_piece  # token text honouring skip_special_tokens
        self.decode = decode

    def records(self, out: RequestOutput) -> list[dict]:
        ids = out.new_token_ids
        lps = out.new_logprobs if len(out.new_logprobs) == len(ids) else [None] * len(ids)
        texts = self._split_text(ids, out.text_delta)
        records = []
        for i, (t, text) in enumerate(zip(ids, texts)):
            entry = lps[i]
            rec: dict[str, Any] = {"token": _token_dict(t, text, entry.logprob if entry else None)}
            if self.req.top_n_tokens and entry is not None:
                rec["top_tokens"] = _top_tokens(entry)
            records.append(rec)
        if out.finished:
            if not records:
                records.append({})
            last = records[-1]
            last["generated_text"] = _full_text(self.req, self.prompt, out.text)
            if self.req.details:
                last["details"] = lmi_details(self.req, self.prompt, out, self.decode)
        return records

    def _split_text(self, ids: list[int], delta: str) -> list[str]:
        if not ids:
            return []
        if len(ids) == 1:
            return [delta]
        pieces = [self.decode_piece(t) for t in ids]
        if "".join(pieces) == delta:
            return pieces
        return [""] * (len(ids) - 1) + [delta]


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
        return _sampling_params(kwargs)


CHAT_ROLES = ("system", "user", "assistant", "tool")
CHAT_MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise BadRequest(f'"messages" must be a list of {{"role", "content"}} objects, got {_json_type(value)}')
    if not value:
        raise BadRequest('"messages" is an empty list')
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRequest(f'"messages[{i}]" must be an object, got {_json_type(m)}')
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(f'"messages[{i}].role" must be a non-empty string, got {_json_type(role)}')
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
                             f"got {_json_type(content)}")
        messages.append({**{k: v for k, v in m.items() if k not in ("role", "content")},
                         "role": role, "content": content})
    return messages


def parse_chat_request(body: dict, limits: Limits) -> ChatRequest:
    messages = _messages(body.get("messages"))
    _check_adapters("", body)
    kwargs: dict[str, Any] = {"temperature": 1.0}
    where = ""
    max_tokens = None
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            max_tokens = _int(where, key, body[key], 1, INT32_MAX)
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        if body.get(key) is not None:
            kwargs[key] = _number(where, key, body[key])
    if not 0 <= kwargs["temperature"] <= CHAT_MAX_TEMPERATURE:
        raise BadRequest(f"temperature={body['temperature']!r} is out of range: expected a number in "
                         f"[0, {CHAT_MAX_TEMPERATURE:g}]")
    if body.get("seed") is not None:
        kwargs["seed"] = _int(where, "seed", body["seed"], 0, SEED_MAX)
    if body.get("top_k") is not None:
        top_k = _int(where, "top_k", body["top_k"], -1, INT32_MAX)
        kwargs["top_k"] = max(top_k, 0)  # vLLM: -1 disables
    if "stop" in body:
        kwargs["stop_sequences"] = _stop_list(where, "stop", body["stop"])
    if body.get("stop_token_ids") is not None:
        kwargs["stop_token_ids"] = _token_ids(where, "stop_token_ids", body["stop_token_ids"], limits.vocab_size)
    for key, field in (("ignore_eos", "ignore_eos"), ("skip_special_tokens", "skip_special_tokens")):
        if body.get(key) is not None:
            kwargs[field] = _bool(where, key, body[key])
    n = 1 if body.get("n") is None else _int(where, "n", body["n"], 1, limits.max_n)
    kwargs["n"] = n
    logprobs = False if body.get("logprobs") is None else _bool(where, "logprobs", body["logprobs"])
    top_logprobs = 0
    if body.get("top_logprobs") is not None:
        top_logprobs = _int(where, "top_logprobs", body["top_logprobs"], 0, 20)
        if top_logprobs and not logprobs:
            raise BadRequest('"top_logprobs" requires "logprobs": true')
    kwargs["logprobs"] = logprobs
    kwargs["top_n_tokens"] = top_logprobs
    stream = False if body.get("stream") is None else _bool(where, "stream", body["stream"])
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise BadRequest(f'"stream_options" must be an object, got {_json_type(opts)}')
        if opts.get("include_usage") is not None:
            include_usage = _bool(where, "stream_options.include_usage", opts["include_usage"])
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest(f'"model" must be a string, got {_json_type(body["model"])}')
    dropped = [k for k in body if k not in CHAT_FIELDS and k not in ("adapters", "adapter_id", "adapter")]
    if dropped:
        logger.warning("dropping unsupported chat request fields: %s", ", ".join(dropped))
    req = ChatRequest(messages=messages, kwargs=kwargs, max_tokens=max_tokens, stream=stream,
                      include_usage=include_usage, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
                      dropped=dropped)
    # Validate the sampling parameters now (before the template runs).
    req.sampling_params(1, max(2, limits.max_model_len))
    return req


# -- chat responses -------------------------------------------------------------------

FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "abort": "stop"}


def chat_finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return FINISH_REASONS.get(reason, reason)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _chat_logprob(x: float) -> float:
    return float(x) if math.isfinite(x) else -9999.0  # OpenAI's floor for impossible tokens


def chat_logprobs(entries: list[TokenLogprob], top_logprobs: int) -> dict:
    return {"content": [
        {"token": e.text, "logprob": _chat_logprob(e.logprob), "bytes": _bytes(e.text),
         "top_logprobs": [{"token": text, "logprob": _chat_logprob(lp), "bytes": _bytes(text)}
                          for t, lp, text in e.top[:top_logprobs]]}
        for e in entries]}


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(req: ChatRequest, out: RequestOutput, model: str, chat_id: str, created: int) -> dict:
    choices = []
    for c in out.outputs:
        choices.append({
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c.logprobs or [], req.top_logprobs) if req.logprobs else None,
            "finish_reason": chat_finish_reason(c.finish_reason),
        })
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return {"id": chat_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": chat_usage(len(out.prompt_token_ids), completion_tokens)}


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
                      "finish_reason": chat_finish_reason(c.finish_reason) if done else None}
            if done:
                self.finished[i] = True
            result.append(self._chunk([choice]))
        return result

    def usage_chunk(self) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = chat_usage(self.prompt_tokens, sum(self.tokens_sent))
        return chunk
