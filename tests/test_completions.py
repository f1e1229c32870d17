"""POST /v1/completions (OpenAI completions) on the tiny random Llama with the SmolLM2
tokenizer: every request field, echo + logprobs against the model's own forward pass,
streaming, bad values (400 in OpenAI's shape), and the ``openai`` client."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from server_fixtures import (ServerThread, build_engine_loop, error_message, parse_json_response, parse_sse,
                             tiny_model_dir)

__all__ = ["tiny_model_dir"]  # the fixture, for pytest

pytestmark = pytest.mark.timeout(600)

MAX_LOGPROBS = 5  # server_fixtures.ENGINE_OPTIONS


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from lmidist_jax.server import create_app

    loop, config = build_engine_loop(tiny_model_dir)
    srv = ServerThread(create_app(loop, config), loop)
    srv.config = config
    yield srv
    srv.close()
    loop.shutdown()


def complete(server, **body) -> dict:
    r = requests.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return parse_json_response(r)


def encode(server, text: str) -> list[int]:
    return server.loop.engine.tokenizer.encode(text)


def reference_logprobs(server, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] log-softmax of a whole-prompt forward pass (position i predicts i + 1)."""
    import jax

    from lmidist_jax.models.scoring import prompt_logits

    return np.asarray(jax.nn.log_softmax(prompt_logits(server.loop.engine.runner.model, ids), axis=-1))


def assert_offsets(logprobs: dict, text: str) -> None:
    """text_offset: where each token's text starts in the choice's text."""
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    assert offsets == list(np.cumsum([0] + [len(t) for t in tokens[:-1]]))
    assert "".join(tokens) == text


def test_echo_scores_the_prompt(server):
    """echo + logprobs + max_tokens=0 (how lm-eval scores): the prompt's tokens with the
    model's logprobs, the first one null, its top alternatives (the token itself
    included), nothing generated."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = encode(server, prompt)
    out = complete(server, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(ids)
    assert_offsets(lp, prompt)
    ref = reference_logprobs(server, ids)
    want = [ref[i, ids[i + 1]] for i in range(len(ids) - 1)]
    np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=1e-4)
    piece = lambda t: server.loop.decode([t], skip_special_tokens=False)  # noqa: E731
    for i, top in enumerate(lp["top_logprobs"][1:]):
        best = np.argsort(-ref[i])[:2]
        assert set(top) == {piece(int(t)) for t in best} | {lp["tokens"][i + 1]}
        for t in best:
            assert top[piece(int(t))] == pytest.approx(float(ref[i, t]), abs=1e-4)
        assert top[lp["tokens"][i + 1]] == lp["token_logprobs"][i + 1]


def test_prompt_forms_and_choice_indexes(server):
    """A string, a list of strings, token ids and token-id lists; choices are numbered
    prompt_index * n + sample_index; usage adds the prompts up."""
    a, b = "Once upon a time", "The capital of France is"
    ids_a, ids_b = encode(server, a), encode(server, b)
    greedy = dict(max_tokens=4, temperature=0, ignore_eos=True)
    single = complete(server, prompt=a, **greedy)["choices"][0]["text"]
    listed = complete(server, prompt=[a, b], **greedy)
    assert [c["index"] for c in listed["choices"]] == [0, 1]
    assert listed["choices"][0]["text"] == single
    assert listed["usage"] == {"prompt_tokens": len(ids_a) + len(ids_b), "completion_tokens": 8,
                               "total_tokens": len(ids_a) + len(ids_b) + 8}
    as_ids = complete(server, prompt=ids_a, **greedy)
    assert as_ids["choices"][0]["text"] == single
    id_lists = complete(server, prompt=[ids_a, ids_b], echo=True, **greedy)
    assert [c["text"] for c in id_lists["choices"]] == [a + single, b + listed["choices"][1]["text"]]
    sampled = complete(server, prompt=[a, b], max_tokens=3, n=2, seed=3, ignore_eos=True)
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2, 3]
    assert sampled["usage"]["completion_tokens"] == 12


def test_greedy_text_matches_lmi_route(server):
    """The same engine request as POST /invocations: same tokens, same text."""
    prompt = "List three colors: red,"
    out = complete(server, prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    r = requests.post(server.url + "/invocations", json={"inputs": prompt, "parameters": {
        "max_new_tokens": 12, "ignore_eos_token": True, "details": True}}, timeout=120)
    lmi = r.json()
    choice = out["choices"][0]
    assert choice["text"] == lmi["generated_text"] and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == [t["text"] for t in lmi["details"]["tokens"]]
    np.testing.assert_allclose(lp["token_logprobs"], [t["log_prob"] for t in lmi["details"]["tokens"]], atol=1e-6)
    assert all(list(top) == [tok] for top, tok in zip(lp["top_logprobs"], lp["tokens"]))  # logprobs=0: itself
    assert_offsets(lp, choice["text"])


def test_generated_logprobs_top_k(server):
    out = complete(server, prompt="Hello there", max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 5
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 3 <= len(top) <= 4 and top[token] == logprob
        assert logprob == max(top.values())  # greedy: the chosen token is the best one


def test_echo_with_generation_and_n(server):
    """echo with max_tokens > 0: the prompt's tokens first, then the generated ones; with
    n=2 every choice echoes the prompt."""
    prompt = "Numbers: one, two,"
    ids = encode(server, prompt)
    out = complete(server, prompt=prompt, max_tokens=3, echo=True, logprobs=1, n=2, seed=11, ignore_eos=True)
    assert len(out["choices"]) == 2
    for choice in out["choices"]:
        lp = choice["logprobs"]
        assert choice["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + 3
        assert lp["token_logprobs"][0] is None and all(x is not None for x in lp["token_logprobs"][1:])
        assert_offsets(lp, choice["text"])
    assert out["choices"][0]["logprobs"]["token_logprobs"][:len(ids)] == \
        out["choices"][1]["logprobs"]["token_logprobs"][:len(ids)]
    scored = complete(server, prompt=prompt, max_tokens=0, echo=True, logprobs=1, n=3)
    assert [c["index"] for c in scored["choices"]] == [0, 1, 2]
    assert all(c["text"] == prompt for c in scored["choices"]) and scored["usage"]["completion_tokens"] == 0


def test_seed_temperature_top_p_and_penalties(server):
    prompt = "Tell me a story about"
    body = dict(prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    first = complete(server, **body)["choices"][0]["text"]
    assert complete(server, **body)["choices"][0]["text"] == first  # seeded: reproducible
    others = {complete(server, **{**body, "seed": s})["choices"][0]["text"] for s in range(4)}
    assert len(others) > 1  # the seed matters
    greedy = complete(server, prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True)["choices"][0]["text"]
    penalized = complete(server, prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True,
                         presence_penalty=2.0, frequency_penalty=2.0)["choices"][0]["text"]
    assert isinstance(penalized, str) and greedy  # both ran; penalties validated by SamplingParams


def test_stop_strings(server):
    prompt = "Once upon a time, in a small village,"
    base = complete(server, prompt=prompt, max_tokens=16, temperature=0, ignore_eos=True)["choices"][0]["text"]
    stop = base[len(base) // 2:len(base) // 2 + 3]
    cut = base.index(stop)
    out = complete(server, prompt=prompt, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop, "zzzz"])
    choice = out["choices"][0]
    assert choice["text"] == base[:cut] and choice["finish_reason"] == "stop"
    single = complete(server, prompt=prompt, max_tokens=16, temperature=0, ignore_eos=True, stop=stop)
    assert single["choices"][0]["text"] == base[:cut]


def test_stream(server):
    """SSE text_completion chunks: per choice, the texts add up to the non-streamed text;
    with echo + logprobs the prompt comes first; usage last when asked; [DONE] at the end."""
    prompts = ["Once upon a time", "The capital of France is"]
    body = dict(prompt=prompts, max_tokens=6, temperature=0, ignore_eos=True, echo=True, logprobs=1)
    whole = complete(server, **body)
    r = requests.post(server.url + "/v1/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}},
                      stream=True, timeout=120)
    assert r.status_code == 200
    chunks = parse_sse(r, done_marker=True)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    for want in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == want["index"]]
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"] == [mine[-1]["finish_reason"]]
        for key in ("tokens", "token_logprobs", "text_offset", "top_logprobs"):
            assert sum((c["logprobs"][key] for c in mine), []) == want["logprobs"][key]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    plain = requests.post(server.url + "/v1/completions", json={"prompt": prompts[0], "max_tokens": 3,
                                                                "stream": True}, stream=True, timeout=120)
    plain_chunks = parse_sse(plain, done_marker=True)
    assert all("usage" not in c and c["choices"][0]["logprobs"] is None for c in plain_chunks)
    scored = requests.post(server.url + "/v1/completions", json={"prompt": prompts[0], "max_tokens": 0,
                                                                 "echo": True, "stream": True}, timeout=120)
    (only,) = parse_sse(scored, done_marker=True)
    assert only["choices"][0]["text"] == prompts[0] and only["choices"][0]["finish_reason"] == "length"


def test_model_and_unknown_fields(server):
    out = complete(server, prompt="hi", max_tokens=1, model="any-name", user="u1", unknown_field=3)
    assert out["model"] == server.app.extensions["lmidist"].model_name


LONG_IDS = [5] * 600  # over max_model_len=512


@pytest.mark.parametrize("body, status, fragments", [
    ({"prompt": "x", "max_tokens": -1}, 400, ["max_tokens=-1", "[0, "]),
    ({"prompt": "x", "max_tokens": 0}, 400, ["max_tokens=0", '"echo": true']),
    ({"prompt": "x", "max_tokens": "ten"}, 400, ["max_tokens", "integer"]),
    ({"prompt": "x", "logprobs": MAX_LOGPROBS + 1}, 400,
     [f"logprobs={MAX_LOGPROBS + 1}", f"[0, {MAX_LOGPROBS}]", "max_logprobs"]),
    ({"prompt": "x", "logprobs": -1}, 400, ["logprobs=-1"]),
    ({"prompt": "x", "logprobs": True}, 400, ["logprobs", "integer"]),
    ({"prompt": "x", "echo": "yes"}, 400, ["echo", "boolean"]),
    ({"prompt": "x", "n": 0}, 400, ["n=0"]),
    ({"prompt": "x", "n": 500}, 400, ["n=500"]),
    ({"prompt": "x", "n": 3, "best_of": 2}, 400, ["best_of=2", "n=3"]),
    ({"prompt": "x", "best_of": 3, "stream": True}, 400, ["best_of=3", "stream"]),
    ({"prompt": "x", "temperature": 2.5}, 400, ["temperature=2.5", "[0, 2]"]),
    ({"prompt": "x", "top_p": 0}, 400, ["top_p"]),
    ({"prompt": "x", "presence_penalty": 5}, 400, ["presence_penalty"]),
    ({"prompt": "x", "seed": -1}, 400, ["seed=-1"]),
    ({"prompt": "x", "stop": 7}, 400, ["stop"]),
    ({"prompt": "x", "stop": [""]}, 400, ["stop", "empty"]),
    ({"prompt": "x", "stream_options": []}, 400, ["stream_options"]),
    ({"prompt": "x", "suffix": "end"}, 400, ["suffix", "not supported"]),
    ({"prompt": "x", "logit_bias": {"5": 10}}, 400, ["logit_bias", "not supported"]),
    ({"prompt": "x", "model": 3}, 400, ['"model"', "string"]),
    ({}, 400, ['"prompt"']),
    ({"prompt": ""}, 400, ['"prompt" is an empty string']),
    ({"prompt": []}, 400, ['"prompt"', "empty list"]),
    ({"prompt": ["a", ""]}, 400, ['"prompt[1]" is an empty string']),
    ({"prompt": [[1, 2], []]}, 400, ['"prompt[1]"', "empty"]),
    ({"prompt": ["a", [1, 2]]}, 400, ["mixes"]),
    ({"prompt": {"text": "a"}}, 400, ['"prompt" must be']),
    ({"prompt": [1, 10**9]}, 400, ['"prompt"[1]', "out of range"]),
    ({"prompt": [[1, -3]]}, 400, ['"prompt[0]"[1]=-3']),
    ({"prompt": [1.5, 2]}, 400, ['"prompt"[0]', "integer"]),
    ({"prompt": ["fine", LONG_IDS]}, 400, ["mixes"]),
    ({"prompt": [[1, 2], LONG_IDS]}, 400, ["prompt[1]:", "600 tokens", "max_model_len"]),
    ({"prompt": LONG_IDS, "max_tokens": 0, "echo": True}, 400, ["600 tokens", "scoring request"]),
    ({"prompt": "x", "adapter_id": "zz"}, 400, ["unknown adapter"]),
])
def test_bad_values(server, body, status, fragments):
    r = requests.post(server.url + "/v1/completions", json=body, timeout=60)
    message = error_message(r, status)
    assert r.json()["error"]["type"] == "invalid_request_error"
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_failing_prompt_leaves_nothing_behind(server):
    """A bad prompt in a list fails the request before the others run; nothing leaks."""
    r = requests.post(server.url + "/v1/completions", json={"prompt": [[1, 2, 3], LONG_IDS], "max_tokens": 50},
                      timeout=60)
    assert r.status_code == 400
    assert server.loop.wait_idle(timeout=30)
    engine = server.loop.engine
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert complete(server, prompt="still fine", max_tokens=2)["choices"][0]["finish_reason"] in ("length", "stop")


def test_openai_client(server):
    """The official client, unchanged: several prompts in one request, echo + logprobs,
    max_tokens=0 scoring, and a stream."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    resp = client.completions.create(model="tiny", prompt=["Hello", "Good morning"], max_tokens=4, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    assert resp.object == "text_completion" and [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason == "length" and len(c.logprobs.tokens) == 4 for c in resp.choices)
    assert resp.usage.completion_tokens == 8
    scored = client.completions.create(model="tiny", prompt="Hello world", max_tokens=0, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "Hello world" and lp.token_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text
    with pytest.raises(openai.BadRequestError, match="max_tokens=-2"):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=-2)
