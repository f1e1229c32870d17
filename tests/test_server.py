"""The HTTP server over real HTTP on 127.0.0.1: LMI requests (JSON, JSON lines, SSE),
OpenAI chat through the official client, a corpus of bad requests, warm-up and
engine-failure behaviour, 64 concurrent streams with disconnects (no leaked KV blocks),
and ``lmidist-jax serve`` in a subprocess (warm-up 503, serving.properties)."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest
import requests

from server_fixtures import (ENGINE_OPTIONS, ServeProcess, ServerThread, build_engine_loop, error_message,
                             parse_json_response, parse_jsonlines, parse_metrics, parse_sse, tiny_model_dir)

__all__ = ["tiny_model_dir"]  # the fixture, for pytest

pytestmark = pytest.mark.timeout(600)

SERVE_PROPERTIES = """\
engine=Python
job_queue_size=1
option.rolling_batch=lmi-dist
option.dtype=fp32
option.max_model_len=128
option.block_size=16
option.num_kv_blocks=64
option.max_rolling_batch_size=2
option.max_rolling_batch_prefill_tokens=16
option.output_formatter=sse
"""  # small limits: only 3 step buckets to compile at warm-up


@pytest.fixture(scope="module")
def serve_proc(tiny_model_dir, tmp_path_factory):
    """``lmidist-jax serve`` on a copy of the tiny model with a serving.properties.
    Started before the in-process engine is built so that the two warm-ups overlap."""
    import shutil

    model_dir = tmp_path_factory.mktemp("served_model")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    (model_dir / "serving.properties").write_text(SERVE_PROPERTIES)
    proc = ServeProcess(model_dir, tmp_path_factory.mktemp("serve_log") / "serve.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def server(tiny_model_dir, serve_proc):
    loop, config = build_engine_loop(tiny_model_dir)
    from lmidist_jax.server import create_app

    srv = ServerThread(create_app(loop, config), loop)
    srv.config = config
    yield srv
    srv.close()
    loop.shutdown()


@pytest.fixture(scope="module")
def sse_server(server, tiny_model_dir):
    """A second app (output_formatter=sse) over the same engine loop."""
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.server import create_app

    config = config_from_kwargs(str(tiny_model_dir), **ENGINE_OPTIONS, output_formatter="sse")
    srv = ServerThread(create_app(server.loop, config), server.loop)
    yield srv
    srv.close()


def post(url, path="/invocations", **kwargs):
    kwargs.setdefault("timeout", 120)
    return requests.post(url + path, **kwargs)


def wait_idle(loop, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = loop.stats()
        if (stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_used"] == 0
                and stats["num_requests"] == 0):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine did not go idle: {stats}")
        time.sleep(0.05)


def metrics(url) -> dict[str, float]:
    r = requests.get(url + "/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return parse_metrics(r.text)


# -- basics ----------------------------------------------------------------------------


def test_ping_models_metrics(server):
    r = requests.get(server.url + "/ping")
    assert r.status_code == 200 and parse_json_response(r) == {"status": "healthy"}
    models = parse_json_response(requests.get(server.url + "/models"))["models"]
    assert len(models) == 1 and models[0]["status"] == "READY"
    name = models[0]["modelName"]
    data = parse_json_response(requests.get(server.url + "/v1/models"))["data"]
    assert [m["id"] for m in data] == [name]
    m = metrics(server.url)
    for key in ("lmidist_running_sequences", "lmidist_waiting_sequences", "lmidist_kv_blocks_used",
                "lmidist_kv_blocks_free", "lmidist_generation_tokens_total", "lmidist_prompt_tokens_total",
                "lmidist_time_to_first_token_seconds_count", "lmidist_inter_token_latency_seconds_count",
                "lmidist_engine_healthy"):
        assert key in m, key
    assert m["lmidist_kv_blocks_free"] > 0 and m["lmidist_engine_healthy"] == 1
    # /predictions/<model> with the served name works too.
    r = post(server.url, f"/predictions/{name}", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and isinstance(parse_json_response(r)["generated_text"], str)


# -- LMI -------------------------------------------------------------------------------


def check_details(details, n_tokens, prompt, finish_reason="length"):
    assert details["finish_reason"] == finish_reason
    assert details["generated_tokens"] == n_tokens
    assert details["inputs"] == prompt
    assert len(details["tokens"]) == n_tokens
    for tok in details["tokens"]:
        assert set(tok) == {"id", "text", "log_prob"}
        assert isinstance(tok["id"], int) and isinstance(tok["text"], str)
        assert isinstance(tok["log_prob"], float) and tok["log_prob"] <= 0


def test_lmi_non_streaming(server):
    prompt = "The capital of France is"
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "ignore_eos_token": True, "details": True,
                                             "decoder_input_details": True, "top_n_tokens": 3}}
    r = post(server.url, json=body)
    assert r.status_code == 200, r.text
    out = parse_json_response(r)
    assert set(out) == {"generated_text", "details"}
    d = out["details"]
    check_details(d, 12, prompt)
    tokenizer = server.loop.engine.tokenizer
    assert [p["id"] for p in d["prefill"]] == list(tokenizer.encode(prompt))
    assert d["prefill"][0]["log_prob"] is None  # the first prompt token has no context
    assert all(isinstance(p["log_prob"], float) and p["log_prob"] <= 0 for p in d["prefill"][1:])
    assert len(d["top_tokens"]) == 12 and all(len(t) == 3 for t in d["top_tokens"])
    for chosen, top in zip(d["tokens"], d["top_tokens"]):
        assert top[0]["log_prob"] >= chosen["log_prob"] - 1e-5  # greedy: the top token or a tie
    assert tokenizer.decode([t["id"] for t in d["tokens"]], skip_special_tokens=True) == out["generated_text"]

    # Greedy is deterministic; return_full_text prepends the prompt; no details unless asked.
    r2 = post(server.url, json={"inputs": prompt, "parameters": {"max_new_tokens": 12, "ignore_eos_token": True,
                                                                "return_full_text": True}})
    out2 = parse_json_response(r2)
    assert out2 == {"generated_text": prompt + out["generated_text"]}

    # A list of inputs gives a list of results, in order, each with its own details.
    prompts = ["One", "Two three", "Four five six"]
    r3 = post(server.url, json={"inputs": prompts, "parameters": {"max_new_tokens": 5, "ignore_eos_token": True,
                                                                 "details": True, "do_sample": True, "seed": 3}})
    outs = parse_json_response(r3)
    assert isinstance(outs, list) and len(outs) == 3
    for p, o in zip(prompts, outs):
        check_details(o["details"], 5, p)
        assert o["details"]["seed"] == 3

    # n > 1: the other sequences come in best_of_sequences.
    r4 = post(server.url, json={"inputs": "Hi", "parameters": {"max_new_tokens": 4, "ignore_eos_token": True,
                                                              "n": 3, "do_sample": True, "details": True}})
    d4 = parse_json_response(r4)["details"]
    assert len(d4["best_of_sequences"]) == 2
    assert all(s["generated_tokens"] == 4 for s in d4["best_of_sequences"])


def test_lmi_sampling_256_tokens(server):
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 256, "do_sample": True,
                                                         "temperature": 0.8, "top_p": 0.9, "top_k": 50,
                                                         "seed": 11, "ignore_eos_token": True, "details": True}}
    out = parse_json_response(post(server.url, json=body))
    check_details(out["details"], 256, "Once upon a time")
    # The same request streamed gives the same tokens and text (same seed).
    r = post(server.url, json={**body, "stream": True}, stream=True)
    assert r.status_code == 200
    records = parse_jsonlines(r)
    assert len(records) == 256
    assert all(set(rec) == {"token"} for rec in records[:-1])
    assert set(records[-1]) == {"token", "generated_text", "details"}
    assert [rec["token"]["id"] for rec in records] == [t["id"] for t in out["details"]["tokens"]]
    assert "".join(rec["token"]["text"] for rec in records) == out["generated_text"]
    assert records[-1]["generated_text"] == out["generated_text"]
    wait_idle(server.loop)


def test_lmi_streaming_jsonlines(server):
    r = post(server.url, json={"inputs": "Hello", "stream": True,
                               "parameters": {"max_new_tokens": 20, "ignore_eos_token": True}}, stream=True)
    assert r.status_code == 200
    records = parse_jsonlines(r)
    assert len(records) == 20
    for rec in records:
        tok = rec["token"]
        assert set(tok) == {"id", "text", "log_prob"} and tok["log_prob"] <= 0
    assert set(records[-1]) == {"token", "generated_text"}  # no details unless asked
    assert "".join(rec["token"]["text"] for rec in records) == records[-1]["generated_text"]
    # Stop sequences cut the text; streamed text never shows the stop string.
    full = parse_json_response(post(server.url, json={"inputs": "Hello", "parameters": {
        "max_new_tokens": 20, "ignore_eos_token": True}}))["generated_text"]
    words = full.split()
    if len(words) > 3:
        stop = words[2]
        r = post(server.url, json={"inputs": "Hello", "stream": True, "parameters": {
            "max_new_tokens": 20, "ignore_eos_token": True, "stop_sequences": [stop], "details": True}}, stream=True)
        records = parse_jsonlines(r)
        text = records[-1]["generated_text"]
        assert text == full[:full.index(stop)]
        assert "".join(rec["token"]["text"] for rec in records) == text
        assert records[-1]["details"]["finish_reason"] == "stop_sequence"


def test_lmi_streaming_sse(sse_server):
    r = post(sse_server.url, json={"inputs": "Hello", "stream": True,
                                   "parameters": {"max_new_tokens": 10, "ignore_eos_token": True, "details": True,
                                                  "top_n_tokens": 2}}, stream=True)
    assert r.status_code == 200
    records = parse_sse(r, done_marker=False)
    assert len(records) == 10
    assert all(len(rec["top_tokens"]) == 2 for rec in records)
    check_details(records[-1]["details"], 10, "Hello")
    assert "".join(rec["token"]["text"] for rec in records) == records[-1]["generated_text"]


def test_unknown_parameters_dropped_with_warning(server, caplog):
    caplog.set_level(logging.WARNING, logger="lmidist_jax.server")
    r = post(server.url, json={"inputs": "Hi", "parameters": {"max_new_tokens": 3, "watermark": True,
                                                              "typical_p": 0.5}})
    assert r.status_code == 200
    assert "watermark" in caplog.text and "typical_p" in caplog.text


# -- chat ------------------------------------------------------------------------------


def test_chat_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    from lmidist_jax.server.app import _chat_prompt

    prompt_len = len(_chat_prompt(server.loop, messages))

    resp = client.chat.completions.create(model="anything", messages=messages, max_tokens=16, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert resp.object == "chat.completion" and len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert resp.usage.completion_tokens == 16 and resp.usage.prompt_tokens == prompt_len
    assert resp.usage.total_tokens == prompt_len + 16
    assert len(choice.logprobs.content) == 16
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in choice.logprobs.content)

    chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same reply
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].choices == []

    # n=2 sampled choices, each complete.
    resp = client.chat.completions.create(model="x", messages=messages, max_tokens=6, n=2, seed=5,
                                          extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1] and resp.usage.completion_tokens == 12

    # Errors reach the client with their message.
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "word " * 600}])


def test_chat_raw_http_and_invocations(server):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], "max_tokens": 8,
            "ignore_eos": True, "model": "ignored", "temperature": 0}
    r = post(server.url, "/v1/chat/completions", json={**body, "stream": True}, stream=True)
    assert r.status_code == 200
    chunks = parse_sse(r, done_marker=True)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # The same chat through /invocations (LMI route with "messages").
    r = post(server.url, "/invocations", json=body)
    out = parse_json_response(r)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["content"] == streamed
    assert out["usage"]["completion_tokens"] == 8


# -- bad requests ---------------------------------------------------------------------

BIG = 9 * 2**20
LONG = "hello " * 600  # > 512 tokens

# (id, method, path, request kwargs, status, words the message must contain)
BAD_REQUESTS = [
    ("malformed-json", "POST", "/invocations", dict(data="{bad json"), 400, ["not valid JSON"]),
    ("empty-body", "POST", "/invocations", dict(data=""), 400, ["empty"]),
    ("body-array", "POST", "/invocations", dict(data="[1, 2]"), 400, ["JSON object", "array"]),
    ("body-string", "POST", "/invocations", dict(data='"hi"'), 400, ["JSON object", "string"]),
    ("not-utf8", "POST", "/invocations", dict(data=b'{"inputs": "\xff\xfe"}'), 400, ["UTF-8"]),
    ("nan", "POST", "/invocations", dict(data='{"inputs": "x", "parameters": {"temperature": NaN}}'), 400,
     ["NaN"]),
    ("deep-nesting", "POST", "/invocations", dict(data="[" * 100000), 400, ["not valid JSON"]),
    ("missing-inputs", "POST", "/invocations", dict(json={"parameters": {}}), 400, ['"inputs"']),
    ("empty-inputs", "POST", "/invocations", dict(json={"inputs": ""}), 400, ['"inputs"', "empty"]),
    ("empty-input-list", "POST", "/invocations", dict(json={"inputs": []}), 400, ['"inputs"', "empty"]),
    ("inputs-number", "POST", "/invocations", dict(json={"inputs": 5}), 400, ['"inputs"', "string"]),
    ("inputs-mixed", "POST", "/invocations", dict(json={"inputs": ["a", 3]}), 400, ["inputs[1]"]),
    ("parameters-list", "POST", "/invocations", dict(json={"inputs": "x", "parameters": [1]}), 400,
     ['"parameters"', "object"]),
    ("max-new-tokens-negative", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"max_new_tokens": -1}}), 400, ["max_new_tokens"]),
    ("max-new-tokens-zero", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"max_new_tokens": 0}}), 400, ["max_new_tokens"]),
    ("max-new-tokens-string", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"max_new_tokens": "ten"}}), 400, ["max_new_tokens", "integer"]),
    ("max-new-tokens-huge", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"max_new_tokens": 2**40}}), 400, ["max_new_tokens", "range"]),
    ("temperature-negative", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"temperature": -0.5}}), 400, ["temperature"]),
    ("temperature-string", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"temperature": "hot"}}), 400, ["temperature", "number"]),
    ("temperature-huge", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"temperature": 1e300}}), 400, ["temperature"]),
    ("top-p-zero", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"top_p": 0}}), 400,
     ["top_p"]),
    ("top-p-big", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"top_p": 1.5}}), 400,
     ["top_p"]),
    ("top-k-negative", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"top_k": -3}}), 400,
     ["top_k"]),
    ("top-k-huge", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"top_k": 10**20}}), 400,
     ["top_k"]),
    ("min-p", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"min_p": 2}}), 400, ["min_p"]),
    ("repetition-penalty", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"repetition_penalty": 0}}), 400, ["repetition_penalty"]),
    ("presence-penalty", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"presence_penalty": 5}}), 400, ["presence_penalty"]),
    ("seed-negative", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"seed": -1}}), 400,
     ["seed"]),
    ("do-sample-string", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"do_sample": "yes"}}), 400, ["do_sample", "boolean"]),
    ("stop-numbers", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"stop_sequences": [1, 2]}}), 400, ["stop_sequences"]),
    ("stop-empty-string", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"stop": [""]}}), 400,
     ["stop", "empty"]),
    ("stop-token-negative", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"stop_token_ids": [-1]}}), 400, ["stop_token_ids[0]"]),
    ("stop-token-huge", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"stop_token_ids": [10**9]}}), 400, ["stop_token_ids[0]"]),
    ("top-n-over-max-logprobs", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"top_n_tokens": 50}}), 400, ["top_n_tokens", "max_logprobs"]),
    ("n-zero", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"n": 0}}), 400, ["n=0"]),
    ("n-huge", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"n": 10**6}}), 400, ["n="]),
    ("best-of-below-n", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"n": 2, "best_of": 1}}), 400, ["best_of"]),
    ("details-string", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"details": "true"}}),
     400, ["details", "boolean"]),
    ("stream-string", "POST", "/invocations", dict(json={"inputs": "x", "stream": "yes"}), 400, ["stream"]),
    ("stream-list", "POST", "/invocations", dict(json={"inputs": ["a", "b"], "stream": True}), 400,
     ["stream", "single input"]),
    ("prompt-too-long", "POST", "/invocations", dict(json={"inputs": LONG}), 400, ["max_model_len", "512"]),
    ("batch-item-too-long", "POST", "/invocations", dict(json={"inputs": ["ok", LONG]}), 400,
     ["inputs[1]", "max_model_len"]),
    ("unknown-adapter", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"adapters": "my-lora"}}), 400, ["unknown adapter", "my-lora",
                                                                              "no LoRA adapters"]),
    ("unknown-adapter-id", "POST", "/invocations",
     dict(json={"inputs": "x", "parameters": {"adapter_id": "a1"}}), 400, ["unknown adapter", "a1"]),
    ("oversized-body", "POST", "/invocations",
     dict(data=b'{"inputs": "' + b"a" * BIG + b'"}', headers={"Content-Type": "application/json"}), 413,
     ["too large"]),
    ("get-invocations", "GET", "/invocations", {}, 405, ["GET", "/invocations"]),
    ("delete-ping", "DELETE", "/ping", {}, 405, ["DELETE", "/ping"]),
    ("unknown-route", "GET", "/nope", {}, 404, ["/nope"]),
    ("unknown-route-post", "POST", "/generate", dict(json={"inputs": "x"}), 404, ["/generate"]),
    ("unknown-model", "POST", "/predictions/othermodel", dict(json={"inputs": "x"}), 404, ["othermodel"]),
    ("chat-messages-not-list", "POST", "/invocations", dict(json={"messages": "hi"}), 400, ['"messages"']),
    ("chat-messages-empty", "POST", "/invocations", dict(json={"messages": []}), 400, ['"messages"', "empty"]),
    ("chat-no-role", "POST", "/invocations", dict(json={"messages": [{"content": "hi"}]}), 400,
     ["messages[0].role"]),
    ("chat-content-number", "POST", "/invocations", dict(json={"messages": [{"role": "user", "content": 5}]}),
     400, ["messages[0].content"]),
    ("chat-image-part", "POST", "/invocations", dict(json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}), 400, ["messages[0].content[0]", "text"]),
    ("v1-no-messages", "POST", "/v1/chat/completions", dict(json={"model": "m"}), 400, ['"messages"']),
    ("v1-malformed-json", "POST", "/v1/chat/completions", dict(data="{"), 400, ["not valid JSON"]),
    ("v1-max-tokens-negative", "POST", "/v1/chat/completions",
     dict(json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}), 400, ["max_tokens"]),
    ("v1-temperature-string", "POST", "/v1/chat/completions",
     dict(json={"messages": [{"role": "user", "content": "hi"}], "temperature": "x"}), 400, ["temperature"]),
    ("v1-top-logprobs-alone", "POST", "/v1/chat/completions",
     dict(json={"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}), 400,
     ["top_logprobs", "logprobs"]),
    ("v1-top-logprobs-big", "POST", "/v1/chat/completions",
     dict(json={"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30}), 400,
     ["top_logprobs"]),
    ("v1-n-zero", "POST", "/v1/chat/completions",
     dict(json={"messages": [{"role": "user", "content": "hi"}], "n": 0}), 400, ["n"]),
    ("v1-stop-number", "POST", "/v1/chat/completions",
     dict(json={"messages": [{"role": "user", "content": "hi"}], "stop": 7}), 400, ["stop"]),
    ("v1-prompt-too-long", "POST", "/v1/chat/completions",
     dict(json={"messages": [{"role": "user", "content": LONG}]}), 400, ["max_model_len"]),
    ("v1-unknown-adapter", "POST", "/v1/chat/completions",
     dict(json={"messages": [{"role": "user", "content": "hi"}], "adapter_id": "zz"}), 400, ["unknown adapter"]),
    ("v1-unknown-route", "POST", "/v1/embeddings", dict(json={"input": "x"}), 404, ["/v1/embeddings"]),
    # Chat fields outside OpenAI's schema.
    ("chat-role-unknown", "POST", "/v1/chat/completions",
     dict(json={"messages": [{"role": "wizard", "content": "hi"}]}), 400,
     ["messages[0].role", "'wizard'", "system, user, assistant, tool"]),
    ("chat-role-unknown-invocations", "POST", "/invocations",
     dict(json={"messages": [{"role": "user", "content": "a"}, {"role": "function", "content": "b"}]}), 400,
     ["messages[1].role", "'function'"]),
    ("chat-temperature-over-2", "POST", "/v1/chat/completions",
     dict(json={"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}), 400,
     ["temperature=2.5", "[0, 2]"]),
    # n > 1 without details would drop every sequence but the first.
    ("n-without-details", "POST", "/invocations", dict(json={"inputs": "x", "parameters": {"n": 3}}), 400,
     ["n=3", '"details": true', "best_of_sequences"]),
    ("n-without-details-stream", "POST", "/invocations",
     dict(json={"inputs": "x", "stream": True, "parameters": {"n": 2}}), 400, ["n=2", "details"]),
    # A body must be declared JSON (a browser sends text/plain across origins unasked).
    ("text-plain-body", "POST", "/invocations",
     dict(data='{"inputs": "x"}', headers={"Content-Type": "text/plain"}), 415,
     ["'text/plain'", "application/json"]),
    ("form-body", "POST", "/v1/chat/completions",
     dict(data='{"messages": []}', headers={"Content-Type": "application/x-www-form-urlencoded"}), 415,
     ["application/x-www-form-urlencoded", "application/json"]),
    ("no-content-type", "POST", "/invocations", dict(data=b'{"inputs": "x"}', headers={}), 415,
     ["no Content-Type", "application/json"]),
]


def send(method, url, kwargs):
    """A raw body (``data=``) is sent as JSON unless the case sets its own headers."""
    if "data" in kwargs and "headers" not in kwargs:
        kwargs = {**kwargs, "headers": {"Content-Type": "application/json"}}
    return requests.request(method, url, timeout=60, **kwargs)


@pytest.mark.parametrize("method,path,kwargs,status,words", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(server, method, path, kwargs, status, words):
    r = send(method, server.url + path, kwargs)
    message = error_message(r, status)
    for word in words:
        assert word in message, (word, message)


def test_bad_requests_leave_the_server_serving(server):
    assert len(BAD_REQUESTS) >= 30
    for _, method, path, kwargs, status, _ in BAD_REQUESTS[:20]:
        send(method, server.url + path, kwargs)
    r = post(server.url, json={"inputs": "Still alive?", "parameters": {"max_new_tokens": 4,
                                                                        "ignore_eos_token": True}})
    assert r.status_code == 200 and parse_json_response(r)["generated_text"]
    assert requests.get(server.url + "/ping").status_code == 200
    wait_idle(server.loop)


def test_queue_full_is_503(server):
    loop = server.loop
    saved = loop.job_queue_size
    held = []
    try:
        loop.job_queue_size = 2
        for _ in range(2):
            r = post(server.url, json={"inputs": "Hold", "stream": True, "parameters": {
                "max_new_tokens": 400, "ignore_eos_token": True}}, stream=True)
            assert r.status_code == 200
            lines = r.iter_lines()  # (dropping this generator would close the connection)
            next(lines)
            held.append((r, lines))
        r = post(server.url, json={"inputs": "One more", "parameters": {"max_new_tokens": 2}})
        assert "queue is full" in error_message(r, 503)
    finally:
        loop.job_queue_size = saved
        for r, _ in held:
            r.close()
    wait_idle(loop)
    r = post(server.url, json={"inputs": "Now", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200


# -- warm-up and failures ---------------------------------------------------------------


def test_warming_up_then_ready(server):
    from lmidist_jax.server import create_app, set_engine_loop

    app = create_app(None, server.config)
    srv = ServerThread(app)
    try:
        r = requests.get(srv.url + "/ping")
        assert "warming up" in error_message(r, 503)
        assert "warming up" in error_message(post(srv.url, json={"inputs": "x"}), 503)
        assert parse_json_response(requests.get(srv.url + "/models"))["models"][0]["status"] == "LOADING"
        assert metrics(srv.url)["lmidist_engine_healthy"] == 0
        set_engine_loop(app, server.loop)
        assert requests.get(srv.url + "/ping").status_code == 200
        r = post(srv.url, json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200
    finally:
        srv.close()


class FailingEngine:
    """Enough of LLMEngine for EngineLoop: one token per step per request; the device
    'fails' once ``fail_when`` is set and ``num_requests`` requests have each had a token
    (an event, not a step count, so a slow machine cannot fail it before a client connects)."""

    def __init__(self, tokenizer, fail_when: threading.Event, num_requests: int):
        self.tokenizer = tokenizer
        self.spec = SimpleNamespace(vocab_size=len(tokenizer))
        self.max_model_len = 512
        self.block_manager = SimpleNamespace(num_used_blocks=0, num_free_blocks=10)
        self.num_running = self.num_waiting = 0
        self.requests = {}
        self._finished_outputs = []
        self.fail_when = fail_when
        self.num_requests = num_requests

    def encode(self, prompt, tokenizer=None):
        return (prompt if isinstance(prompt, str) else None), [1, 2]

    def validate(self, ids, params):
        pass

    def encode_chat(self, messages, add_generation_prompt=True, tokenizer=None):
        return [1, 2]

    def add_request(self, request_id, prompt, params=None, stream=True, prompt_token_ids=None, adapter=None):
        self.requests[request_id] = []

    def abort(self, request_id):
        return self.requests.pop(request_id, None) is not None

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        from lmidist_jax.outputs import CompletionOutput, RequestOutput, TokenLogprob

        if (self.fail_when.is_set() and len(self.requests) >= self.num_requests
                and all(self.requests.values())):
            raise RuntimeError("simulated device failure")
        time.sleep(0.01)
        outs = []
        for rid, toks in self.requests.items():
            toks.append(42)
            outs.append(RequestOutput(rid, "p", [1, 2], [CompletionOutput(0, "x" * len(toks), list(toks), None)],
                                      False, new_token_ids=[42], text_delta="x",
                                      new_logprobs=[TokenLogprob(42, -1.0, "x")]))
        return outs


def test_engine_failure(server):
    import openai

    from lmidist_jax.engine.engine_loop import EngineLoop
    from lmidist_jax.server import create_app

    fail_now = threading.Event()
    loop = EngineLoop(FailingEngine(server.loop.engine.tokenizer, fail_now, num_requests=3))
    srv = ServerThread(create_app(loop, server.config), loop)
    try:
        non_streaming = {}
        t = threading.Thread(target=lambda: non_streaming.setdefault(
            "r", post(srv.url, json={"inputs": "b", "parameters": {"max_new_tokens": 500}})))
        t.start()
        r1 = post(srv.url, json={"inputs": "a", "stream": True, "parameters": {"max_new_tokens": 500}}, stream=True)
        # An OpenAI chat stream ends with an error event that the client raises.
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        chunks = []
        with pytest.raises(openai.APIError, match="simulated device failure"):
            for chunk in client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=500, stream=True):
                chunks.append(chunk)
                fail_now.set()  # all three requests are in flight; fail once each has a token
        assert chunks and chunks[0].choices[0].delta.role == "assistant"
        t.join(60)
        r2 = non_streaming["r"]
        records = parse_jsonlines(r1)
        assert records[0]["token"]["id"] == 42
        assert set(records[-1]) == {"code", "error"} and records[-1]["code"] == 500
        assert "simulated device failure" in records[-1]["error"]
        assert "simulated device failure" in error_message(r2, 500)
        assert "engine failed" in error_message(requests.get(srv.url + "/ping"), 503)
        assert "engine failed" in error_message(post(srv.url, json={"inputs": "c"}), 503)
        assert metrics(srv.url)["lmidist_engine_healthy"] == 0
    finally:
        srv.close()
    # The real server is unaffected.
    assert requests.get(server.url + "/ping").status_code == 200


def test_shutdown_ends_open_streams(server):
    from lmidist_jax.engine.engine_loop import EngineLoop

    loop = EngineLoop(FailingEngine(server.loop.engine.tokenizer, threading.Event(), num_requests=1))
    outputs = iter(loop.submit("a", "p"))
    assert next(outputs).new_token_ids == [42]
    loop.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        for _ in outputs:
            pass
    with pytest.raises(RuntimeError, match="shutting down"):
        loop.submit("b", "p")


# -- concurrency -----------------------------------------------------------------------


def test_64_concurrent_streams_with_disconnects(server):
    before = metrics(server.url)
    n_clients, n_quitters, n_tokens = 64, 16, 24
    results: dict[int, object] = {}

    def client(i: int) -> None:
        quitter = i % 4 == 0
        try:
            body = {"inputs": f"Client {i} says", "stream": True,
                    "parameters": {"max_new_tokens": 300 if quitter else n_tokens, "ignore_eos_token": True,
                                   "do_sample": True, "seed": i}}
            r = requests.post(server.url + "/invocations", json=body, stream=True, timeout=180)
            if r.status_code != 200:
                results[i] = ("status", r.status_code, r.text)
                return
            if quitter:
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
                r.close()
                results[i] = "quit"
                return
            records = parse_jsonlines(r)
            results[i] = records
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = ("exception", repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert len(results) == n_clients
    for i, res in results.items():
        if i % 4 == 0:
            assert res == "quit", (i, res)
            continue
        assert isinstance(res, list), (i, res)
        assert len(res) == n_tokens and all("token" in rec for rec in res)
        assert "".join(rec["token"]["text"] for rec in res) == res[-1]["generated_text"]

    stats = wait_idle(server.loop)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    server.loop.engine.block_manager.check_invariants([])
    after = metrics(server.url)
    assert after["lmidist_kv_blocks_used"] == 0 and after["lmidist_running_sequences"] == 0
    assert after["lmidist_waiting_sequences"] == 0 and after["lmidist_active_requests"] == 0
    assert after["lmidist_kv_blocks_free"] == stats["kv_blocks_free"]
    assert after["lmidist_aborted_requests_total"] - before["lmidist_aborted_requests_total"] == n_quitters
    ok = 'lmidist_requests_total{status="200"}'
    assert after[ok] - before.get(ok, 0) >= n_clients
    generated = after["lmidist_generation_tokens_total"] - before["lmidist_generation_tokens_total"]
    assert (n_clients - n_quitters) * n_tokens <= generated < (n_clients - n_quitters) * n_tokens + n_quitters * 300
    assert after["lmidist_time_to_first_token_seconds_count"] - before[
        "lmidist_time_to_first_token_seconds_count"] == n_clients


# -- serve() in a subprocess --------------------------------------------------------------


def test_serve_subprocess(serve_proc):
    serve_proc.wait_ready()
    assert serve_proc.ping_statuses[0] == 503 and serve_proc.ping_statuses[-1] == 200, serve_proc.ping_statuses
    url = serve_proc.url
    log = serve_proc.log_text()
    assert log.count("effective config") == 1
    # output_formatter=sse from serving.properties.
    r = post(url, json={"inputs": "Hi", "stream": True, "parameters": {"max_new_tokens": 6,
                                                                       "ignore_eos_token": True}}, stream=True)
    records = parse_sse(r, done_marker=False)
    assert len(records) == 6 and "generated_text" in records[-1]
    # job_queue_size=1 from serving.properties: a second request while one runs gets 503.
    # The tiny model is fast: on a loaded machine the held request can finish before the
    # second arrives (then that one is served, 200). Try again until one overlaps.
    for _ in range(5):
        held = post(url, json={"inputs": "Hold", "stream": True, "parameters": {"max_new_tokens": 480,
                                                                                "ignore_eos_token": True}},
                    stream=True)
        assert held.status_code == 200
        lines = held.iter_lines()
        next(lines)
        second = post(url, json={"inputs": "x"})
        if second.status_code == 503:
            assert "queue is full" in error_message(second, 503)
            held.close()  # disconnect: the server aborts it
            break
        assert second.status_code == 200, second.text
        for _ in lines:  # let it finish normally (not an abort)
            pass
        held.close()
    else:
        pytest.fail("five held requests all finished before a second request arrived")
    deadline = time.monotonic() + 30
    while True:  # the held request is aborted once the server notices the disconnect
        r = post(url, json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    m = metrics(url)
    assert m["lmidist_kv_blocks_used"] == 0 and m["lmidist_aborted_requests_total"] == 1
    assert serve_proc.stop() == 0  # SIGTERM: drained (nothing in flight) and exited cleanly


# -- API key, streaming deltas, small items ------------------------------------------------


def test_api_key(server):
    from lmidist_jax.server import create_app

    srv = ServerThread(create_app(server.loop, server.config, api_key="s3cret"), server.loop)
    try:
        assert requests.get(srv.url + "/ping").status_code == 200  # health checks need no key
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        r = post(srv.url, json=body)
        assert "Authorization: Bearer" in error_message(r, 401) and "no Authorization" in error_message(r, 401)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = post(srv.url, json=body, headers={"Authorization": "Bearer wrong"})
        assert "wrong API key" in error_message(r, 401)
        for path in ("/metrics", "/models", "/v1/models"):
            assert requests.get(srv.url + path).status_code == 401, path
        ok = {"Authorization": "Bearer s3cret"}
        assert post(srv.url, json=body, headers=ok).status_code == 200
        assert requests.get(srv.url + "/metrics", headers=ok).status_code == 200
        import openai

        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).chat.completions.create(
                model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].finish_reason in ("length", "stop")
    finally:
        srv.close()


def test_every_chat_choice_streams_its_text(server):
    """n=2 sampled choices with a stop string: each choice's deltas add up to its text in
    the non-streamed reply (the same seed), and no delta shows the stop string."""
    base = {"messages": [{"role": "user", "content": "Tell me something"}], "max_tokens": 24, "n": 2,
            "seed": 7, "temperature": 1.0, "ignore_eos": True}
    full = parse_json_response(post(server.url, "/v1/chat/completions", json=base))
    texts = [c["message"]["content"] for c in sorted(full["choices"], key=lambda c: c["index"])]
    # A stop string that occurs in the second choice's text (so it is cut) but not at its start.
    words = [w for w in texts[1].split() if len(w) > 2 and texts[1].index(w) > 0]
    stop = words[0] if words else texts[1][1:3]
    body = {**base, "stop": [stop]}
    full = parse_json_response(post(server.url, "/v1/chat/completions", json=body))
    want = {c["index"]: c["message"]["content"] for c in full["choices"]}
    r = post(server.url, "/v1/chat/completions", json={**body, "stream": True}, stream=True)
    chunks = parse_sse(r, done_marker=True)
    got = {0: "", 1: ""}
    for c in chunks:
        for choice in c["choices"]:
            got[choice["index"]] += choice["delta"].get("content") or ""
    assert got == want
    assert stop not in got[1] and want[1] == texts[1][:texts[1].index(stop)]
    assert all(got[i] for i in (0, 1)), got  # both choices streamed text, not only choice 0


def test_engine_text_deltas_for_every_sequence(server):
    """The engine's CompletionOutput.text_delta of each sequence adds up to its text."""
    from lmidist_jax import SamplingParams

    stream = server.loop.submit("deltas-test", "Once upon", SamplingParams(
        max_new_tokens=16, n=3, temperature=1.0, seed=3, ignore_eos=True, stop_sequences=("the",)))
    got = {}
    final = None
    for out in stream:
        for c in out.outputs:
            got[c.index] = got.get(c.index, "") + c.text_delta
        final = out
    assert final.finished and len(final.outputs) == 3
    assert {c.index: c.text for c in final.outputs} == got
    assert sum(bool(t) for t in got.values()) >= 2


def test_huge_prompt_refused_without_tokenizing(server):
    prompt = "lorem ipsum " * 500_000  # 6 MB: seconds of tokenizing
    t = time.perf_counter()
    r = post(server.url, json={"inputs": prompt}, timeout=60)
    elapsed = time.perf_counter() - t
    message = error_message(r, 400)
    assert "characters" in message and "max_model_len=512" in message
    assert elapsed < 5, elapsed


def test_missing_tokenizer_json_names_the_file(tiny_model_dir, tmp_path):
    import shutil

    from lmidist_jax.engine.factory import load_tokenizer

    for f in tiny_model_dir.iterdir():
        if f.name != "tokenizer.json":
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)


def test_no_pytorch_notice_without_torch():
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None\nimport lmidist_jax\nimport transformers\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    assert "PyTorch was not found" not in out.stderr + out.stdout
