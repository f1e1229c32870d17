"""LoRA adapters over HTTP (Flask test client over one engine loop): registration at
start from <model_dir>/adapters, the management routes, selection by body field, query
and header, and every bad case; adapter changes in /metrics."""

from __future__ import annotations

import shutil

import pytest

from server_fixtures import make_tiny_model

from test_lora import save_adapter  # noqa: E402

OPTIONS = dict(dtype="fp32", max_model_len=64, block_size=16, num_kv_blocks=64, max_rolling_batch_size=2,
               max_rolling_batch_prefill_tokens=16, enable_lora=True, max_loras=2, max_lora_rank=8)
JSON = {"Content-Type": "application/json"}
HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
GEN = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    import transformers

    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.engine_loop import EngineLoop
    from lmidist_jax.engine.factory import build_engine
    from lmidist_jax.server import create_app

    model_dir = make_tiny_model(tmp_path_factory.mktemp("lora_server_model"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    save_adapter(hf, model_dir / "adapters" / "shipped", 8, 16, ["q_proj", "v_proj", "down_proj"], 1, {})
    save_adapter(hf, model_dir / "extra" / "late", 4, 8, ["o_proj", "up_proj"], 2, {})
    outside = tmp_path_factory.mktemp("outside") / "evil"
    shutil.copytree(model_dir / "extra" / "late", outside)
    config = config_from_kwargs(str(model_dir), **OPTIONS)
    loop = EngineLoop(build_engine(config, warmup=True, progress=False))
    app = create_app(loop, config, model_name="tiny")
    yield app.test_client(), model_dir, outside, loop
    loop.shutdown()


def _text(client, body, **kwargs):
    r = client.post("/invocations", json=body, **kwargs)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def _metric(client, name):
    text = client.get("/metrics").get_data(as_text=True)
    line = next(l for l in text.splitlines() if l.startswith(name + " "))
    return float(line.split()[1])


def test_adapter_routes_and_selection(lora_server):
    client, model_dir, outside, loop = lora_server
    # Registered at start from <model_dir>/adapters.
    listed = client.get("/models/tiny/adapters").get_json()["adapters"]
    assert [a["name"] for a in listed] == ["shipped"]
    assert _metric(client, "lmidist_lora_adapters") == 1
    base = _text(client, {"inputs": "Hello there", "parameters": GEN})["generated_text"]
    shipped = _text(client, {"inputs": "Hello there", "parameters": GEN, "adapters": "shipped"})["generated_text"]
    assert shipped != base  # the adapter is applied (the comparison can fail)
    # The same adapter chosen by the LMI parameter, the query and the header.
    assert _text(client, {"inputs": "Hello there", "parameters": {**GEN, "adapters": "shipped"}})[
        "generated_text"] == shipped
    assert _text(client, {"inputs": "Hello there", "parameters": GEN},
                 query_string={"adapter": "shipped"})["generated_text"] == shipped
    assert _text(client, {"inputs": "Hello there", "parameters": GEN},
                 headers={HEADER: "shipped"})["generated_text"] == shipped
    # Register, inspect, use in a batch, delete.
    src = str(model_dir / "extra" / "late")
    r = client.post("/models/tiny/adapters", query_string={"name": "late", "src": src}, headers=JSON)
    assert r.status_code == 200, r.get_json()
    assert _metric(client, "lmidist_lora_adapters") == 2 and _metric(client, "lmidist_lora_adapters_registered") == 2
    one = client.get("/models/tiny/adapters/late").get_json()
    assert one["name"] == "late" and one["rank"] == 4 and one["src"].endswith("late")
    batch = _text(client, {"inputs": ["Hello there"] * 3, "parameters": GEN, "adapters": ["late", None, "shipped"]})
    assert batch[1]["generated_text"] == base and batch[2]["generated_text"] == shipped
    assert batch[0]["generated_text"] not in (base, shipped)
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 4, "temperature": 0, "adapters": "late"})
    assert chat.status_code == 200, chat.get_json()
    r = client.delete("/models/tiny/adapters/late")
    assert r.status_code == 200, r.get_json()
    assert [a["name"] for a in client.get("/models/tiny/adapters").get_json()["adapters"]] == ["shipped"]
    assert _metric(client, "lmidist_lora_adapters") == 1 and _metric(client, "lmidist_lora_adapters_removed") == 1


BAD = [
    # (method, path, kwargs, status, words)
    ("post", "/invocations", dict(json={"inputs": "x", "adapters": "nope"}), 400,
     ["unknown adapter 'nope'", "registered adapters: shipped"]),
    ("post", "/invocations", dict(json={"inputs": "x"}, query_string={"adapter": "nope"}), 400,
     ["unknown adapter 'nope'", "?adapter="]),
    ("post", "/invocations", dict(json={"inputs": "x"}, headers={HEADER: "nope"}), 400, ["unknown adapter 'nope'", HEADER]),
    ("post", "/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": "x"}], "adapters": "nope"}),
     400, ["unknown adapter 'nope'"]),
    ("post", "/invocations", dict(json={"inputs": ["x", "y"], "adapters": ["shipped"]}), 400,
     ["list of 1 adapters for 2 input(s)"]),
    ("post", "/invocations", dict(json={"inputs": "x", "adapters": 3}), 400, ["must be an adapter name"]),
    ("post", "/invocations", dict(json={"inputs": "x", "adapters": "shipped"}, headers={HEADER: "other"}), 400,
     ["selects adapter 'shipped'", "'other'"]),
    ("post", "/models/tiny/adapters", dict(query_string={"name": "x"}, headers=JSON), 400, ["missing src"]),
    ("post", "/models/tiny/adapters", dict(query_string={"name": "x", "src": "/etc"}, headers=JSON), 400,
     ["src '/etc' is not under an allowed adapter directory"]),
    ("post", "/models/tiny/adapters", dict(query_string={"name": "x", "src": "OUTSIDE"}, headers=JSON), 400,
     ["is not under an allowed adapter directory"]),
    ("post", "/models/tiny/adapters", dict(query_string={"name": "x", "src": "MODEL/../../.."}, headers=JSON), 400,
     ["is not under an allowed adapter directory"]),
    ("post", "/models/tiny/adapters", dict(query_string={"name": "x", "src": "MODEL"}, headers=JSON), 400,
     ["has no adapter_config.json"]),
    ("post", "/models/tiny/adapters", dict(query_string={"name": "shipped", "src": "MODEL/adapters/shipped"},
                                           headers=JSON), 400, ["already registered"]),
    ("post", "/models/other/adapters", dict(query_string={"name": "x", "src": "MODEL"}, headers=JSON), 404,
     ["model 'other' is not served here"]),
    ("post", "/models/tiny/adapters", dict(query_string={"name": "x", "src": "MODEL"}), 415, ["Content-Type"]),
    ("get", "/models/tiny/adapters/nope", {}, 404, ["unknown adapter 'nope'"]),
    ("delete", "/models/tiny/adapters/nope", {}, 404, ["unknown adapter 'nope'"]),
]


@pytest.mark.parametrize("method,path,kwargs,status,words", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_adapter_requests(lora_server, method, path, kwargs, status, words):
    client, model_dir, outside, loop = lora_server
    query = dict(kwargs.get("query_string", {}))
    if "src" in query:
        query["src"] = query["src"].replace("MODEL", str(model_dir)).replace("OUTSIDE", str(outside))
        kwargs = {**kwargs, "query_string": query}
    before = client.get("/models/tiny/adapters").get_json()
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.get_json()
    message = r.get_json()["error"]
    message = message["message"] if isinstance(message, dict) else message
    for w in words:
        assert w in message, message
    assert client.get("/models/tiny/adapters").get_json() == before


def test_delete_in_use_is_409(lora_server):
    client, model_dir, outside, loop = lora_server
    from lmidist_jax import SamplingParams

    stream = loop.submit("busy", "Hello", SamplingParams(max_new_tokens=40, ignore_eos=True), adapter="shipped")
    try:
        r = client.delete("/models/tiny/adapters/shipped")
        assert r.status_code == 409, r.get_json()
        assert "in use by 1 unfinished request" in r.get_json()["error"]
    finally:
        loop.abort("busy")
        stream.close()


def test_adapters_while_lora_is_off_are_400(tmp_path):
    """Any adapter field without LoRA is refused (never answered by the base model)."""
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.server import create_app

    class NoLoraLoop:  # the routes refuse before anything reaches an engine
        healthy = True
        engine = type("E", (), {"lora": None, "spec": type("S", (), {"vocab_size": 100})(), "max_model_len": 64})()

    config = config_from_kwargs(str(tmp_path), dtype="fp32")
    client = create_app(NoLoraLoop(), config, model_name="tiny").test_client()
    for kwargs in (dict(json={"inputs": "x", "adapters": "a"}), dict(json={"inputs": "x"}, headers={HEADER: "a"}),
                   dict(json={"inputs": "x"}, query_string={"adapter": "a"})):
        r = client.post("/invocations", **kwargs)
        assert r.status_code == 400 and "no LoRA adapters are loaded" in r.get_json()["error"], r.get_json()
    r = client.get("/models/tiny/adapters")
    assert r.status_code == 400 and "not enabled" in r.get_json()["error"]
