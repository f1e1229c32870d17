"""What the three wire formats share (LMI in ``lmi.py``, OpenAI chat in ``chat.py``,
OpenAI completions in ``completions.py``): the errors a request is answered with and
their JSON bodies, the JSON body itself, the typed readers of request fields, and the
server's limits.

Everything here is pure (no Flask, no engine calls): parsing raises `BadRequest` with the
HTTP status and a message naming what was wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

from ..sampling_params import RequestError, SamplingParams

INT32_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1

# Media types of the responses.
JSON = "application/json"
JSONLINES = "application/jsonlines"
SSE = "text/event-stream"

# Where a request may name its LoRA adapter (``adapters.py`` takes them out of the body).
ADAPTER_FIELDS = ("adapters", "adapter_id", "adapter")


class BadRequest(Exception):
    """A request the server refuses; ``status`` is the HTTP status code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


class ServerError(Exception):
    """A request the server cannot serve because of its own state (5xx), or one whose
    client went away (499, logged only)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status
        self.message = message


# -- error bodies -----------------------------------------------------------------------


def error_body(status: int, message: str) -> dict:
    """LMI's error object."""
    return {"code": status, "error": message}


OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                      405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                      500: "internal_error", 503: "service_unavailable"}


def openai_error_body(status: int, message: str) -> dict:
    """OpenAI's error object (what the ``openai`` client shows)."""
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "error"), "param": None,
                      "code": status}}


def error_body_for(path: str | None) -> Callable[[int, str], dict]:
    """The error object of a route: OpenAI's shape under /v1/, LMI's elsewhere."""
    return openai_error_body if path and path.startswith("/v1/") else error_body


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
        raise BadRequest(f"the request body must be a JSON object, got {json_type(body)}")
    return body


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def json_type(value: Any) -> str:
    """How an error message names a JSON value's type."""
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


# -- typed field readers --------------------------------------------------------------
# ``where`` prefixes the field's name in messages ("parameters.", "inputs[1]: ", "").


def read_bool(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{where}{name} must be a boolean (true/false), got {json_type(value)} {value!r}")
    return value


def read_int(where: str, name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{where}{name} must be an integer, got {json_type(value)} {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"{where}{name}={value} is out of range: expected an integer in [{lo}, {hi}]")
    return value


def read_number(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{where}{name} must be a number, got {json_type(value)} {value!r}")
    if not math.isfinite(value) or abs(value) > 1e30:
        raise BadRequest(f"{where}{name}={value!r} is out of range")
    return float(value)


def read_stop_list(where: str, name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise BadRequest(f"{where}{name} must be a string or a list of strings, got {json_type(value)}")
    if any(not s for s in value):
        raise BadRequest(f"{where}{name} must not contain empty strings")
    return tuple(value)


def read_token_ids(where: str, name: str, value: Any, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"{where}{name} must be a list of token ids, got {json_type(value)}")
    return tuple(read_int(where, f"{name}[{i}]", t, 0, vocab_size - 1) for i, t in enumerate(value))


def check_adapter_fields(where: str, params: dict) -> None:
    """An adapter field still in a parsed body: the adapter routes took it out unless no
    adapter can be served."""
    for key in ADAPTER_FIELDS:
        if key in params and params[key] not in (None, "", []):
            raise BadRequest(f"unknown adapter {params[key]!r} ({where}{key}): "
                             f"no LoRA adapters are loaded on this server")


def sampling_params(kwargs: dict) -> SamplingParams:
    """SamplingParams(**kwargs), its own range checks as BadRequest(400)."""
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
