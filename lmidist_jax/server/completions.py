"""OpenAI completions (``POST /v1/completions``): request parsing, response and stream
building, and the route.

Fields (OpenAI's, plus vLLM's usual extras):

====================  ===============================================================
prompt                a string, a list of strings, a list of token ids, or a list of
                      token-id lists; each is one request of the rolling batch, and its
                      choices have indexes ``prompt_index * n + sample_index``
max_tokens            default 16; 0 only with ``echo`` (score the prompt, generate nothing)
temperature, top_p    default 1 and 1; temperature in [0, 2]
n, best_of            samples per prompt (best_of: the n with the highest cumulative
                      logprob of best_of; not with ``stream`` when best_of > n)
stop, seed            stop strings (cut from the text); per-request sampling seed
logprobs              k in [0, max_logprobs]: each token's logprob and its k best
                      alternatives (``top_logprobs``: text -> logprob, the chosen token
                      always included, as OpenAI does)
echo                  the prompt comes first in ``text`` and, with ``logprobs``, its tokens
                      in ``logprobs`` (the first token's logprob and alternatives are null).
                      ``echo`` + ``logprobs`` + ``max_tokens=0`` is how lm-eval's
                      ``local-completions`` scores loglikelihoods (it sends ``max_tokens=1``
                      and drops the last token, which works too)
stream                SSE ``text_completion`` chunks, ``data: [DONE]`` last; with
                      ``stream_options.include_usage`` a last chunk carries ``usage``
presence_penalty, frequency_penalty, user, model   as OpenAI (``model`` is not checked)
top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, skip_special_tokens,
include_stop_str_in_output                         vLLM's extras
====================  ===============================================================

``suffix`` and ``logit_bias`` are refused (400) rather than ignored; other unknown
fields are dropped with a warning. ``text_offset`` values are offsets into the choice's
``text``. Errors have OpenAI's shape (see app.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from typing import Any, Callable

from ..outputs import CompletionOutput, RequestOutput, TokenLogprob
from ..sampling_params import SamplingParams
from .schema import (CHAT_MAX_TEMPERATURE, INT32_MAX, SEED_MAX, BadRequest, Limits, _bool, _int, _json_type, _number,
                     _sampling_params, _stop_list, _token_ids, chat_finish_reason, chat_usage)

logger = logging.getLogger("lmidist_jax.server")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
ADAPTER_FIELDS = ("adapters", "adapter_id", "adapter")
COMPLETION_FIELDS = {"prompt", "model", "max_tokens", "temperature", "top_p", "n", "best_of", "stream",
                     "stream_options", "stop", "seed", "logprobs", "echo", "presence_penalty",
                     "frequency_penalty", "user", "suffix", "logit_bias",
                     # vLLM-style extras
                     "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids",
                     "skip_special_tokens", "include_stop_str_in_output"}

Prompt = str | list[int]


@dataclasses.dataclass
class CompletionRequest:
    prompts: list[Prompt]
    params: SamplingParams   # what the engine runs for each prompt
    n: int                   # choices per prompt in the response
    echo: bool
    logprobs: int | None     # top alternatives per token; None: no logprobs
    stream: bool
    include_usage: bool
    dropped: list[str] = dataclasses.field(default_factory=list)

    @property
    def scores_only(self) -> bool:
        return self.params.scores_only


def _prompts(value: Any, vocab_size: int) -> list[Prompt]:
    """The ``prompt`` field as a list of prompts (strings or token-id lists)."""
    if isinstance(value, str):
        if not value:
            raise BadRequest('"prompt" is an empty string')
        return [value]
    if not isinstance(value, list) or not value:
        what = "an empty list" if value == [] else f"{_json_type(value)}"
        raise BadRequest(f'"prompt" must be a string, a list of strings, a list of token ids or a list of '
                         f"token-id lists, got {what}")
    if all(isinstance(p, str) for p in value):
        for i, p in enumerate(value):
            if not p:
                raise BadRequest(f'"prompt[{i}]" is an empty string')
        return list(value)
    if all(isinstance(p, list) for p in value):
        prompts = []
        for i, p in enumerate(value):
            if not p:
                raise BadRequest(f'"prompt[{i}]" is an empty list of token ids')
            prompts.append(list(_token_ids("", f'"prompt[{i}]"', p, vocab_size)))
        return prompts
    if any(isinstance(p, (str, list, dict)) for p in value):
        raise BadRequest('"prompt" mixes kinds of items: give a list of strings, a list of token ids or a list of '
                         "token-id lists")
    return [list(_token_ids("", '"prompt"', value, vocab_size))]


def parse_completion_request(body: dict, limits: Limits) -> CompletionRequest:
    """The request, or BadRequest(400) naming the field, its value and what is accepted."""
    if "prompt" not in body:
        raise BadRequest('the request has no "prompt" field: expected {"prompt": str | [str] | [int] | [[int]], ...}')
    prompts = _prompts(body["prompt"], limits.vocab_size)
    for key in ("suffix", "logit_bias"):
        if body.get(key) not in (None, {}, ""):
            raise BadRequest(f'"{key}" is not supported by this server; leave it out')
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest(f'"model" must be a string, got {_json_type(body["model"])}')
    where = ""
    echo = False if body.get("echo") is None else _bool(where, "echo", body["echo"])
    max_tokens = (DEFAULT_MAX_TOKENS if body.get("max_tokens") is None
                  else _int(where, "max_tokens", body["max_tokens"], 0, INT32_MAX))
    if max_tokens == 0 and not echo:
        raise BadRequest("max_tokens=0 generates nothing and returns nothing: set \"echo\": true to score the "
                         "prompt (with \"logprobs\"), or ask for at least 1 token")
    logprobs = None
    if body.get("logprobs") is not None:
        value = body["logprobs"]
        if isinstance(value, int) and not isinstance(value, bool) and value > limits.max_logprobs:
            raise BadRequest(f"logprobs={value} is over this server's limit: expected an integer in "
                             f"[0, {limits.max_logprobs}] (the engine option max_logprobs)")
        logprobs = _int(where, "logprobs", value, 0, limits.max_logprobs)
    kwargs: dict[str, Any] = {"temperature": 1.0}
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        if body.get(key) is not None:
            kwargs[key] = _number(where, key, body[key])
    if not 0 <= kwargs["temperature"] <= CHAT_MAX_TEMPERATURE:
        raise BadRequest(f"temperature={body['temperature']!r} is out of range: expected a number in "
                         f"[0, {CHAT_MAX_TEMPERATURE:g}]")
    if body.get("seed") is not None:
        kwargs["seed"] = _int(where, "seed", body["seed"], 0, SEED_MAX)
    if body.get("top_k") is not None:
        kwargs["top_k"] = max(_int(where, "top_k", body["top_k"], -1, INT32_MAX), 0)  # vLLM: -1 disables
    if "stop" in body:
        kwargs["stop_sequences"] = _stop_list(where, "stop", body["stop"])
    if body.get("stop_token_ids") is not None:
        kwargs["stop_token_ids"] = _token_ids(where, "stop_token_ids", body["stop_token_ids"], limits.vocab_size)
    for key in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        if body.get(key) is not None:
            kwargs[key] = _bool(where, key, body[key])
    n = 1 if body.get("n") is None else _int(where, "n", body["n"], 1, limits.max_n)
    best_of = None if body.get("best_of") is None else _int(where, "best_of", body["best_of"], 1, limits.max_n)
    if best_of is not None and best_of < n:
        raise BadRequest(f"best_of={best_of} must be >= n={n}")
    stream = False if body.get("stream") is None else _bool(where, "stream", body["stream"])
    if stream and best_of is not None and best_of > n:
        raise BadRequest(f"best_of={best_of} > n={n} is not supported with \"stream\": true (the best sequences "
                         f"are only known at the end)")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise BadRequest(f'"stream_options" must be an object, got {_json_type(opts)}')
        if opts.get("include_usage") is not None:
            include_usage = _bool(where, "stream_options.include_usage", opts["include_usage"])
    kwargs["max_new_tokens"] = max_tokens
    if max_tokens == 0:
        # Scoring: one run of the prompt serves every choice (they would all be the same).
        kwargs["prompt_logprobs"] = True
    else:
        kwargs["n"] = n
        if best_of is not None:
            kwargs["best_of"] = best_of
    if logprobs is not None:
        kwargs["logprobs"] = True
        kwargs["top_n_tokens"] = logprobs
        if echo:
            kwargs["prompt_logprobs"] = True
    dropped = [k for k in body if k not in COMPLETION_FIELDS and k not in ADAPTER_FIELDS]
    if dropped:
        logger.warning("dropping unsupported completion request fields: %s", ", ".join(dropped))
    return CompletionRequest(prompts=prompts, params=_sampling_params(kwargs), n=n, echo=echo, logprobs=logprobs,
                             stream=stream, include_usage=include_usage, dropped=dropped)


# -- responses --------------------------------------------------------------------------


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _logprob(x: float) -> float:
    return float(x) if math.isfinite(x) else -9999.0  # OpenAI's floor for impossible tokens


class LogprobsBlock:
    """A choice's ``logprobs`` object, built token by token: ``tokens``,
    ``token_logprobs``, ``top_logprobs`` (text -> logprob, the token itself included)
    and ``text_offset`` (where each token starts in the choice's text)."""

    def __init__(self, offset: int = 0):
        self.offset = offset
        self.block: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, text: str, logprob: float | None, top: list[tuple[str, float]] | None) -> None:
        block = self.block
        block["tokens"].append(text)
        block["text_offset"].append(self.offset)
        self.offset += len(text)
        if logprob is None:  # the prompt's first token: nothing before it to predict it from
            block["token_logprobs"].append(None)
            block["top_logprobs"].append(None)
            return
        alternatives: dict[str, float] = {}
        for alt_text, alt_logprob in top or ():
            alternatives.setdefault(alt_text, _logprob(alt_logprob))
        alternatives.setdefault(text, _logprob(logprob))
        block["token_logprobs"].append(_logprob(logprob))
        block["top_logprobs"].append(alternatives)

    def add_prompt(self, out: RequestOutput, k: int, piece: Callable[[int], str]) -> None:
        lps = out.prompt_logprobs or []
        tops = out.prompt_top_logprobs
        for i, token in enumerate(out.prompt_token_ids):
            lp = lps[i] if i < len(lps) else None
            top = tops[i] if tops is not None and i < len(tops) else None
            self.add(piece(token), lp, [(piece(t), x) for t, x in (top or [])[:k]])

    def add_generated(self, entries: list[TokenLogprob], k: int) -> None:
        for e in entries:
            self.add(e.text, e.logprob, [(text, x) for _, x, text in e.top[:k]])

    def take(self) -> dict:
        """The tokens added since the last take (streaming), as a logprobs object."""
        block = self.block
        self.block = {key: [] for key in block}
        return block


def prompt_text(prompt: Prompt, decode: Callable[[list[int]], str]) -> str:
    return prompt if isinstance(prompt, str) else decode(prompt)


def _choices_of(req: CompletionRequest, out: RequestOutput) -> list[CompletionOutput]:
    # A scoring request ran once for all of its n identical choices.
    if req.scores_only:
        return [dataclasses.replace(out.outputs[0], index=j) for j in range(req.n)]
    return out.outputs


def completion_choices(req: CompletionRequest, prompt_index: int, text: str, out: RequestOutput,
                       piece: Callable[[int], str]) -> list[dict]:
    """The choices of one prompt (``text``: the prompt's text, for echo)."""
    choices = []
    for c in _choices_of(req, out):
        logprobs = None
        if req.logprobs is not None:
            block = LogprobsBlock()
            if req.echo:
                block.add_prompt(out, req.logprobs, piece)
            block.add_generated(c.logprobs or [], req.logprobs)
            logprobs = block.take()
        choices.append({"index": prompt_index * req.n + c.index, "text": (text if req.echo else "") + c.text,
                        "logprobs": logprobs, "finish_reason": chat_finish_reason(c.finish_reason)})
    return choices


def completion_usage(outs: list[RequestOutput], req: CompletionRequest) -> dict:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    completion_tokens = sum(len(c.token_ids) for o in outs for c in _choices_of(req, o))
    return chat_usage(prompt_tokens, completion_tokens)


def completion_response(req: CompletionRequest, texts: list[str], outs: list[RequestOutput], model: str,
                        completion_id: str, created: int, piece: Callable[[int], str]) -> dict:
    choices = [choice for i, (text, out) in enumerate(zip(texts, outs))
               for choice in completion_choices(req, i, text, out, piece)]
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": completion_usage(outs, req)}


class CompletionStreamBuilder:
    """Turns the RequestOutputs of a request's prompts (identified by request id) into
    ``text_completion`` chunks: per choice, the echoed prompt first (with its logprobs),
    then each text delta with the logprobs of its new tokens, then the finish reason."""

    def __init__(self, req: CompletionRequest, model: str, completion_id: str, request_ids: list[str],
                 texts: list[str], piece: Callable[[int], str], created: int | None = None):
        self.req = req
        self.model = model
        self.id = completion_id
        self.created = created or int(time.time())
        self.prompt_of = {rid: i for i, rid in enumerate(request_ids)}
        self.texts = texts
        self.piece = piece
        self.started: set[int] = set()      # prompts whose first chunk went out
        self.finished: set[int] = set()     # choice indexes
        self.tokens_sent: dict[int, int] = {}
        self.offsets: dict[int, int] = {}
        self.finals: dict[int, RequestOutput] = {}

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.req.prompts) * self.req.n

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": choices}
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    def chunks(self, out: RequestOutput) -> list[dict]:
        req, p = self.req, self.prompt_of[out.request_id]
        result = []
        first = p not in self.started
        self.started.add(p)
        for c in _choices_of(req, out):
            index = p * req.n + c.index
            if index in self.finished:
                continue
            block = LogprobsBlock(self.offsets.get(index, 0))
            text = ""
            if first and req.echo:
                text = self.texts[p]
                if req.logprobs is not None:
                    block.add_prompt(out, req.logprobs, self.piece)
            sent = self.tokens_sent.get(index, 0)
            new_entries = (c.logprobs or [])[sent:]
            self.tokens_sent[index] = len(c.token_ids)
            if req.logprobs is not None:
                block.add_generated(new_entries, req.logprobs)
            text += c.text_delta
            done = c.finish_reason is not None
            if not text and not done and not (req.logprobs is not None and new_entries):
                continue
            # Offsets follow the token texts (a text delta may hold back a partial stop string).
            self.offsets[index] = block.offset
            if done:
                self.finished.add(index)
            result.append(self._chunk([{
                "index": index, "text": text, "logprobs": block.take() if req.logprobs is not None else None,
                "finish_reason": chat_finish_reason(c.finish_reason) if done else None}]))
        if out.finished:
            self.finals[p] = out
        return result

    def usage_chunk(self) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = completion_usage([self.finals[p] for p in sorted(self.finals)], self.req)
        return chunk


# -- the route --------------------------------------------------------------------------


def register_completion_routes(app, state) -> None:
    @app.post("/v1/completions")
    def completions():
        return handle_completion(state)


def handle_completion(state):
    """POST /v1/completions: every prompt is submitted at once (they share the rolling
    batch), then their outputs are collected in order (or streamed one prompt after the
    other)."""
    from . import app as server
    from .adapters import request_adapters

    start = time.perf_counter()
    loop = state.ready_loop()
    body = server._read_body()
    limits = state.limits(loop)
    req = parse_completion_request(body, limits)
    adapters = request_adapters(loop, body, len(req.prompts), batched=len(req.prompts) > 1)
    completion_id = new_completion_id()
    streams = []
    try:
        for i, (prompt, adapter) in enumerate(zip(req.prompts, adapters)):
            where = f"prompt[{i}]: " if len(req.prompts) > 1 else ""
            streams.append(server._submit(loop, f"{completion_id}-{i}", prompt, req.params, req.stream, where,
                                          adapter=adapter))
    except BaseException:
        for s in streams:
            s.close()
        raise
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
        builder = CompletionStreamBuilder(req, model, completion_id, [s.request_id for s in streams], texts, piece)

        def encode(record: dict) -> bytes:
            return f"data: {server.dumps(record)}\n\n".encode("utf-8")

        def produce(out) -> list[bytes]:
            frames = [encode(c) for c in builder.chunks(out)]
            if builder.done and len(builder.finals) == len(req.prompts):
                if req.include_usage:
                    frames.append(encode(builder.usage_chunk()))
                frames.append(b"data: [DONE]\n\n")
            return frames

        body_iter = server._StreamBody(state, streams, produce,
                                       lambda st, msg: encode(server.openai_error_body(st, msg)),
                                       [state.metrics.tracker(start) for _ in streams])
        return server._stream_response(body_iter, server.SSE)
    try:
        outs = [server._collect(state, s, state.metrics.tracker(start)) for s in streams]
    except RuntimeError as e:
        raise server.ServerError(str(e), 500) from None
    finally:
        for s in streams:
            s.close()
    return server._json_response(completion_response(req, texts, outs, model, completion_id, int(time.time()),
                                                     piece))
