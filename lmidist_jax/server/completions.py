"""OpenAI completions' wire format (``POST /v1/completions``; the route is in ``app.py``):
request parsing, response and stream building.

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
import time
import uuid
from typing import Any, Callable

from ..outputs import CompletionOutput, RequestOutput, TokenLogprob
from ..sampling_params import SamplingParams
from .chat import check_model_field, finish_reason, openai_logprob, read_include_usage, read_sampling_fields, usage
from .schema import (ADAPTER_FIELDS, INT32_MAX, BadRequest, Limits, json_type, read_bool, read_int, read_token_ids,
                     sampling_params)

logger = logging.getLogger("lmidist_jax.server")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
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
        what = "an empty list" if value == [] else f"{json_type(value)}"
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
            prompts.append(list(read_token_ids("", f'"prompt[{i}]"', p, vocab_size)))
        return prompts
    if any(isinstance(p, (str, list, dict)) for p in value):
        raise BadRequest('"prompt" mixes kinds of items: give a list of strings, a list of token ids or a list of '
                         "token-id lists")
    return [list(read_token_ids("", '"prompt"', value, vocab_size))]


def parse_completion_request(body: dict, limits: Limits) -> CompletionRequest:
    """The request, or BadRequest(400) naming the field, its value and what is accepted."""
    if "prompt" not in body:
        raise BadRequest('the request has no "prompt" field: expected {"prompt": str | [str] | [int] | [[int]], ...}')
    prompts = _prompts(body["prompt"], limits.vocab_size)
    for key in ("suffix", "logit_bias"):
        if body.get(key) not in (None, {}, ""):
            raise BadRequest(f'"{key}" is not supported by this server; leave it out')
    check_model_field(body)
    where = ""
    echo = False if body.get("echo") is None else read_bool(where, "echo", body["echo"])
    max_tokens = (DEFAULT_MAX_TOKENS if body.get("max_tokens") is None
                  else read_int(where, "max_tokens", body["max_tokens"], 0, INT32_MAX))
    if max_tokens == 0 and not echo:
        raise BadRequest("max_tokens=0 generates nothing and returns nothing: set \"echo\": true to score the "
                         "prompt (with \"logprobs\"), or ask for at least 1 token")
    logprobs = None
    if body.get("logprobs") is not None:
        value = body["logprobs"]
        if isinstance(value, int) and not isinstance(value, bool) and value > limits.max_logprobs:
            raise BadRequest(f"logprobs={value} is over this server's limit: expected an integer in "
                             f"[0, {limits.max_logprobs}] (the engine option max_logprobs)")
        logprobs = read_int(where, "logprobs", value, 0, limits.max_logprobs)
    kwargs = read_sampling_fields(body, limits.vocab_size,
                                  ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"))
    n = 1 if body.get("n") is None else read_int(where, "n", body["n"], 1, limits.max_n)
    best_of = None if body.get("best_of") is None else read_int(where, "best_of", body["best_of"], 1, limits.max_n)
    if best_of is not None and best_of < n:
        raise BadRequest(f"best_of={best_of} must be >= n={n}")
    stream = False if body.get("stream") is None else read_bool(where, "stream", body["stream"])
    if stream and best_of is not None and best_of > n:
        raise BadRequest(f"best_of={best_of} > n={n} is not supported with \"stream\": true (the best sequences "
                         f"are only known at the end)")
    include_usage = read_include_usage(body)
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
    return CompletionRequest(prompts=prompts, params=sampling_params(kwargs), n=n, echo=echo, logprobs=logprobs,
                             stream=stream, include_usage=include_usage, dropped=dropped)


# -- responses --------------------------------------------------------------------------


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


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
            alternatives.setdefault(alt_text, openai_logprob(alt_logprob))
        alternatives.setdefault(text, openai_logprob(logprob))
        block["token_logprobs"].append(openai_logprob(logprob))
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
                        "logprobs": logprobs, "finish_reason": finish_reason(c.finish_reason)})
    return choices


def completion_usage(outs: list[RequestOutput], req: CompletionRequest) -> dict:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    completion_tokens = sum(len(c.token_ids) for o in outs for c in _choices_of(req, o))
    return usage(prompt_tokens, completion_tokens)


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
                "finish_reason": finish_reason(c.finish_reason) if done else None}]))
        if out.finished:
            self.finals[p] = out
        return result

    def usage_chunk(self) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = completion_usage([self.finals[p] for p in sorted(self.finals)], self.req)
        return chunk
