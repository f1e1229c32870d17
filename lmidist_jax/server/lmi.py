"""LMI's wire format (``/invocations``, ``/predictions/<model>``): the request
``{"inputs": str | [str], "parameters": {...}, "stream": bool}`` parsed into
SamplingParams, and RequestOutputs turned into LMI responses and stream records.

Pure, like ``schema.py``: parsing raises `BadRequest` naming what was wrong.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

from ..outputs import CompletionOutput, RequestOutput, TokenLogprob
from ..sampling_params import SamplingParams
from .schema import (INT32_MAX, SEED_MAX, BadRequest, Limits, check_adapter_fields, json_type, read_bool,
                     read_int, read_number, read_stop_list, read_token_ids, sampling_params)

logger = logging.getLogger("lmidist_jax.server")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


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
                raise BadRequest(f'"inputs[{i}]" must be a string, got {json_type(p)}')
    else:
        raise BadRequest(f'"inputs" must be a string or a list of strings, got {json_type(inputs)}')
    for i, p in enumerate(prompts):
        if not p:
            raise BadRequest('"inputs" is an empty string' if not batched else f'"inputs[{i}]" is an empty string')

    stream = body.get("stream", False)
    stream = False if stream is None else read_bool("", '"stream"', stream)
    params = body.get("parameters", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(f'"parameters" must be an object, got {json_type(params)}')
    dropped = [f"{k}" for k in body if k not in LMI_TOP_LEVEL]

    where = "parameters."
    check_adapter_fields(where, params)
    kwargs: dict[str, Any] = {}
    server: dict[str, bool] = {}
    n = best_of = None
    for key, value in params.items():
        if key in _LMI_INTS:
            field, lo, hi = _LMI_INTS[key]
            if value is None and key == "seed":
                continue
            kwargs[field] = read_int(where, key, value, lo, hi)
        elif key in _LMI_NUMBERS:
            kwargs[_LMI_NUMBERS[key]] = read_number(where, key, value)
        elif key in _LMI_BOOLS:
            kwargs[_LMI_BOOLS[key]] = read_bool(where, key, value)
        elif key in _LMI_SERVER_BOOLS:
            server[key] = read_bool(where, key, value)
        elif key in ("stop_sequences", "stop"):
            kwargs["stop_sequences"] = kwargs.get("stop_sequences", ()) + read_stop_list(where, key, value)
        elif key == "stop_token_ids":
            kwargs["stop_token_ids"] = read_token_ids(where, key, value, limits.vocab_size)
        elif key == "n":
            n = read_int(where, key, value, 1, limits.max_n)
        elif key == "best_of":
            if value is not None:
                best_of = read_int(where, key, value, 1, limits.max_n)
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
    return LmiRequest(inputs=prompts, batched=batched, params=sampling_params(kwargs), stream=stream,
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
