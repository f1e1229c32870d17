"""Fixtures and helpers for the HTTP server tests: a tiny random Llama with the real
SmolLM2 tokenizer, an in-process server on a free port, a ``serve()`` subprocess, and
strict parsers for JSON, JSON lines and server-sent events."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]

# Engine options of the test servers (serving.properties names).
ENGINE_OPTIONS = dict(dtype="fp32", max_model_len=512, block_size=16, num_kv_blocks=600,
                      max_rolling_batch_size=64, max_rolling_batch_prefill_tokens=64, max_logprobs=5)

_SKIP_FILES = {"config.json", "generation_config.json", "serving.properties"}


def make_tiny_model(directory: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the SmolLM2 tokenizer and chat template."""
    import torch
    import transformers

    from lmidist_jax.model_store import fetch_model

    source = Path(fetch_model("smollm2", progress=False))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    for f in source.iterdir():
        if f.is_file() and f.name not in _SKIP_FILES and not f.name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy(f, directory / f.name)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama_server"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """create_app + the server's waitress transport on a free port, in this process."""

    def __init__(self, app, loop=None, threads: int = 96):
        from lmidist_jax.server.http import HttpServer, HttpSettings

        self.app = app
        self.loop = loop
        self.server = HttpServer(app, "127.0.0.1", 0, HttpSettings(threads=threads))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_until_stopped, name="test-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.stop()
        self.thread.join(5)
        self.server.close(timeout=2)


def build_engine_loop(model_dir, warmup=True, **overrides):
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.engine_loop import EngineLoop
    from lmidist_jax.engine.factory import build_engine

    config = config_from_kwargs(str(model_dir), **{**ENGINE_OPTIONS, **overrides})
    engine = build_engine(config, warmup=warmup, progress=False)
    return EngineLoop(engine, job_queue_size=config.job_queue_size), config


def serve_in_process(model_dir, **overrides):
    """Generator for a module fixture: the app over a fresh engine loop, served in this
    process (``server.config``: the engine config); stopped when the fixture ends."""
    from lmidist_jax.server import create_app

    loop, config = build_engine_loop(model_dir, **overrides)
    srv = ServerThread(create_app(loop, config), loop)
    srv.config = config
    yield srv
    srv.close()
    loop.shutdown()


class ServeProcess:
    """``lmidist-jax serve`` in a subprocess. A watcher thread polls /ping from the start
    and records every status it sees until the first 200."""

    def __init__(self, model_dir: Path, log_path: Path, options: dict | None = None,
                 flags: list[str] | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "lmidist_jax.cli", "-v", "serve", "--model-dir", str(model_dir),
               "--port", str(self.port), *(flags or [])]
        for k, v in (options or {}).items():
            cmd += ["--option", f"{k}={v}"]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env or {})}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.ping_statuses: list[int] = []
        self.ready = threading.Event()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                status = requests.get(self.url + "/ping", timeout=5).status_code
            except requests.ConnectionError:
                time.sleep(0.02)
                continue
            if not self.ping_statuses or self.ping_statuses[-1] != status:
                self.ping_statuses.append(status)
            if status == 200:
                self.ready.set()
                return
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.5) and time.monotonic() < deadline and self.proc.poll() is None:
            pass
        if not self.ready.is_set():
            raise AssertionError(f"the server did not become ready (ping statuses {self.ping_statuses}); "
                                 f"log:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


# -- strict parsers -------------------------------------------------------------------


def strict_json(text: str):
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def parse_json_response(r: requests.Response):
    assert r.headers["Content-Type"] == "application/json", r.headers
    return strict_json(r.text)


def parse_jsonlines(r: requests.Response) -> list[dict]:
    """Every line a JSON object, no blank lines, a newline after the last one."""
    assert r.headers["Content-Type"] == "application/jsonlines", r.headers
    body = r.content.decode("utf-8")
    assert body.endswith("\n"), body[-200:]
    lines = body[:-1].split("\n")
    records = [strict_json(line) for line in lines]
    assert all(isinstance(rec, dict) for rec in records)
    return records


def parse_sse(r: requests.Response, *, done_marker: bool) -> list[dict]:
    """Every event exactly ``data: <JSON object>\\n\\n``; with done_marker the last one is
    ``data: [DONE]`` (and nothing else is)."""
    assert r.headers["Content-Type"] == "text/event-stream", r.headers
    body = r.content.decode("utf-8")
    assert body.endswith("\n\n"), body[-200:]
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events[:3]
    payloads = [e[len("data: "):] for e in events]
    if done_marker:
        assert payloads[-1] == "[DONE]", payloads[-1]
        payloads = payloads[:-1]
    assert "[DONE]" not in payloads
    records = [strict_json(p) for p in payloads]
    assert all(isinstance(rec, dict) for rec in records)
    return records


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (via prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


def error_message(r: requests.Response, status: int) -> str:
    """Asserts an error response of the documented shape; returns its message."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = parse_json_response(r)
    if r.request.path_url.startswith("/v1/"):
        assert set(body) == {"error"}, body
        err = body["error"]
        assert err["code"] == status and isinstance(err["message"], str) and err["message"], body
        return err["message"]
    assert set(body) == {"code", "error"}, body
    assert body["code"] == status and isinstance(body["error"], str) and body["error"], body
    return body["error"]
