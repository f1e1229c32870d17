"""LoRA adapters over HTTP, as LMI serves them.

Management (``<model>``: the served model's name):

=======================================  ==============================================
POST   /models/<model>/adapters          register ``?name=<name>&src=<directory>`` (a PEFT
                                         LoRA directory under an allowed root: option
                                         ``adapter_roots``, by default the model directory)
GET    /models/<model>/adapters          the registered adapters
GET    /models/<model>/adapters/<name>   one adapter (404 when unknown)
DELETE /models/<model>/adapters/<name>   unregister (404 unknown; 409 while requests use it)
=======================================  ==============================================

The POST carries its arguments in the query but, like every POST of this server, needs
``Content-Type: application/json`` (a browser cannot send that across origins unasked).
Registration reads and checks the whole adapter on the engine thread between two steps;
a bad one changes nothing and answers 400 with the reason.

A generation request picks its adapter with the body field ``adapters`` (a name, or for
a batch of LMI inputs a list with a name or null per input), the LMI
``parameters.adapters`` / ``adapter_id``, the query ``?adapter=<name>``, or the header
``X-Amzn-SageMaker-Adapter-Identifier``. An unknown adapter is a 400 naming it, and so
is any adapter field while LoRA is off (the base model never answers in its place).
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request

from ..config import EngineConfig
from ..sampling_params import RequestError
from .schema import ADAPTER_FIELDS, BadRequest

ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"


def _found_adapters(body: dict) -> list[tuple[str, Any]]:
    """(where, value) of every adapter selection in the request, removed from ``body``
    (so that the request parsers never see them)."""
    found = []
    for key in ADAPTER_FIELDS:
        if key in body:
            found.append((key, body.pop(key)))
    params = body.get("parameters")
    if isinstance(params, dict):
        for key in ADAPTER_FIELDS:
            if key in params:
                found.append((f"parameters.{key}", params.pop(key)))
    if "adapter" in request.args:
        found.append(("?adapter=", request.args.get("adapter")))
    if ADAPTER_HEADER in request.headers:
        found.append((f"header {ADAPTER_HEADER}", request.headers.get(ADAPTER_HEADER)))
    return [(where, value) for where, value in found if value not in (None, "", [])]


def request_adapters(loop, body: dict, num_inputs: int, batched: bool) -> list[str | None]:
    """The adapter of each of ``num_inputs`` prompts (None: the base model); BadRequest
    when a selection names an unknown adapter, does not fit the inputs, or LoRA is off."""
    found = _found_adapters(body)
    if not found:
        return [None] * num_inputs
    engine = loop.engine
    where, value = found[0]
    if engine.lora is None:
        raise BadRequest(f"unknown adapter {value!r} ({where}): no LoRA adapters are loaded on this server "
                         f"(LoRA is off; start it with option.enable_lora=true)")
    for other_where, other in found[1:]:
        if other != value:
            raise BadRequest(f"the request selects adapter {value!r} ({where}) and {other!r} ({other_where}); "
                             f"give one")
    if isinstance(value, str):
        names = [value] * num_inputs
    elif isinstance(value, list):
        if not batched or len(value) != num_inputs:
            raise BadRequest(f"{where} is a list of {len(value)} adapters for {num_inputs} input(s): a list needs "
                             f'"inputs" to be a list of the same length; otherwise give one name')
        names = value
    else:
        raise BadRequest(f"{where} must be an adapter name (or a list of names for a list of inputs), "
                         f"got {type(value).__name__}")
    for i, name in enumerate(names):
        if name is not None and not isinstance(name, str):
            raise BadRequest(f"{where}[{i}] must be an adapter name or null, got {type(name).__name__}")
        try:
            engine.check_adapter(name)
        except RequestError as e:
            raise BadRequest(f"{e} ({where})") from None
    return names


def allowed_roots(config: EngineConfig) -> list[str]:
    if config.adapter_roots:
        return [os.path.realpath(r.strip()) for r in config.adapter_roots.split(",") if r.strip()]
    model_id = config.model_id
    return [os.path.realpath(model_id)] if model_id and os.path.isdir(model_id) else []


def _check_src(src: str, config: EngineConfig) -> str:
    roots = allowed_roots(config)
    path = os.path.realpath(src)
    if not roots:
        raise BadRequest("no directory is allowed for adapters: set option.adapter_roots")
    if not any(os.path.commonpath([path, root]) == root for root in roots):
        raise BadRequest(f"src {src!r} is not under an allowed adapter directory ({', '.join(roots)}); "
                         f"see option.adapter_roots")
    if not os.path.isdir(path):
        raise BadRequest(f"src {src!r} is not a directory")
    return path


def register_adapter_routes(app: Flask, state, json_response) -> None:
    """Adds the adapter management routes to ``app`` (``state``: the app's ServerState)."""
    from ..models.peft_adapter import AdapterError

    def lora_loop(model: str):
        if model != state.model_name:
            raise BadRequest(f"model {model!r} is not served here; this server serves {state.model_name!r}", 404)
        loop = state.ready_loop()
        if loop.engine.lora is None:
            raise BadRequest("LoRA adapters are not enabled on this server (option.enable_lora=true)")
        return loop

    def run(loop, fn, missing_status: int = 400):
        try:
            return loop.call(fn)
        except AdapterError as e:
            message = str(e)
            status = 404 if message.startswith("unknown adapter") else (409 if "in use" in message else missing_status)
            raise BadRequest(message, status) from None
        except RequestError as e:
            raise BadRequest(str(e)) from None

    @app.post("/models/<model>/adapters")
    def add_adapter(model: str):
        loop = lora_loop(model)
        name, src = request.args.get("name"), request.args.get("src")
        if not name or not src:
            raise BadRequest("register an adapter with POST /models/<model>/adapters?name=<name>&src=<directory>; "
                             f"missing {'name' if not name else 'src'}")
        path = _check_src(src, state.config)
        described = run(loop, lambda engine: engine.add_adapter(name, path))
        return json_response({"message": f"adapter {name} registered", "adapter": described})

    @app.get("/models/<model>/adapters")
    def list_adapters(model: str):
        loop = lora_loop(model)
        return json_response({"adapters": run(loop, lambda engine: engine.list_adapters())})

    @app.get("/models/<model>/adapters/<name>")
    def get_adapter(model: str, name: str):
        loop = lora_loop(model)
        return json_response(run(loop, lambda engine: engine.lora.describe(name)))

    @app.delete("/models/<model>/adapters/<name>")
    def delete_adapter(model: str, name: str):
        loop = lora_loop(model)
        run(loop, lambda engine: engine.remove_adapter(name))
        return json_response({"message": f"adapter {name} removed"})
