"""The LMI server over a T5 model (tiny random Flan-T5-style checkpoint, a real word-level
tokenizer): /invocations answers with the decoder's text, streamed and not, and matches
transformers' greedy tokens."""

import pytest
import requests

from server_fixtures import error_message, parse_json_response, parse_jsonlines, serve_in_process
from t5_models import hf_greedy, make_t5, make_tokenizer

# Few buckets to compile at warm-up: sequences 1, 2; tokens (and encoder tokens) 16, 32.
OPTIONS = dict(max_model_len=64, num_kv_blocks=64, max_rolling_batch_size=2, max_rolling_batch_prefill_tokens=32)


def post(url, **kwargs):
    return requests.post(url + "/invocations", timeout=120, **kwargs)


@pytest.fixture(scope="module")
def t5_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5_server")
    hf = make_t5(directory, "t5_v11")
    make_tokenizer(directory)
    for srv in serve_in_process(directory, **OPTIONS):
        srv.hf = hf
        yield srv


def test_invocations_match_transformers(t5_server):
    tokenizer = t5_server.loop.engine.tokenizer
    prompts = ["translate English to German: the cat is big", "summarize: one two three four five",
               "hello world"]
    body = {"inputs": prompts, "parameters": {"max_new_tokens": 10, "ignore_eos_token": True, "details": True}}
    outs = parse_json_response(post(t5_server.url, json=body))
    assert isinstance(outs, list) and len(outs) == 3
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(t5_server.hf, tokenizer.encode(prompt), 10)
        assert [t["id"] for t in out["details"]["tokens"]] == expected
        assert out["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert out["details"]["finish_reason"] == "length" and out["details"]["generated_tokens"] == 10

    # Streamed: the same tokens, one JSON line each, the text at the end.
    r = post(t5_server.url, json={"inputs": prompts[0], "stream": True,
                                  "parameters": {"max_new_tokens": 10, "ignore_eos_token": True}}, stream=True)
    assert r.status_code == 200
    records = parse_jsonlines(r)
    assert [rec["token"]["id"] for rec in records] == [t["id"] for t in outs[0]["details"]["tokens"]]
    assert records[-1]["generated_text"] == outs[0]["generated_text"]
    assert "".join(rec["token"]["text"] for rec in records).strip() == outs[0]["generated_text"].strip()
    # Warm-up compiled every decoder and encoder bucket: serving compiled nothing more.
    assert not t5_server.loop.engine.runner.lazily_compiled


def test_prompt_details_refused_clearly(t5_server):
    r = post(t5_server.url, json={"inputs": "hello world", "parameters": {"max_new_tokens": 2,
                                                                         "decoder_input_details": True}})
    assert "encoder-decoder" in error_message(r, 400)
    r = post(t5_server.url, json={"inputs": " ".join(["the"] * 40), "parameters": {"max_new_tokens": 2}})
    assert "at most 31 tokens" in error_message(r, 400)
