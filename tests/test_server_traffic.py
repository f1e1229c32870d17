"""``lmidist-jax serve`` under real traffic, over real HTTP: a short request and /metrics
while a long one runs, a non-streaming client that disconnects, a chunked body over the
limit, slow-loris connections, and SIGTERM (drain, during warm-up, inside a step).

One server process serves every test but the SIGTERM ones that need a process of their
own; the drain test runs last on the shared one."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import statistics
import threading
import time

import pytest
import requests

from server_fixtures import ServeProcess, error_message, parse_metrics, tiny_model_dir

__all__ = ["tiny_model_dir"]  # the fixture, for pytest

pytestmark = pytest.mark.timeout(600)

SERVE_OPTIONS = dict(dtype="fp32", max_model_len=4096, block_size=16, num_kv_blocks=1200,
                     max_rolling_batch_size=4, max_rolling_batch_prefill_tokens=16)
DRAIN_SECONDS = 5
REQUEST_TIMEOUT = 3
LONG_TOKENS = 4000  # far more than a drain or a test needs: such a request only ends when cut


@pytest.fixture(scope="module")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with room for 4096 positions (rotary: the weights do not change)."""
    model_dir = tmp_path_factory.mktemp("tiny_llama_4096")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = SERVE_OPTIONS["max_model_len"]
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="module")
def served(long_model_dir, tmp_path_factory):
    proc = ServeProcess(long_model_dir, tmp_path_factory.mktemp("traffic_log") / "serve.log",
                        options=SERVE_OPTIONS,
                        flags=["--drain-seconds", str(DRAIN_SECONDS), "--request-timeout", str(REQUEST_TIMEOUT),
                               "--idle-timeout", "30", "--threads", "16"])
    proc.wait_ready()
    yield proc
    proc.stop()


def metrics(url) -> dict[str, float]:
    r = requests.get(url + "/metrics", timeout=30)
    assert r.status_code == 200
    return parse_metrics(r.text)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_idle(url, timeout=30.0) -> dict:
    def idle():
        m = metrics(url)
        ok = (m["lmidist_active_requests"] == 0 and m["lmidist_running_sequences"] == 0
              and m["lmidist_kv_blocks_used"] == 0)
        return m if ok else None

    return wait_for(idle, timeout, "the server to go idle")


def start_stream(url, max_new_tokens=LONG_TOKENS, prompt="Tell me a long story"):
    """A streaming request; returns (response, line iterator) after its first record."""
    r = requests.post(url + "/invocations", json={"inputs": prompt, "stream": True, "parameters": {
        "max_new_tokens": max_new_tokens, "ignore_eos_token": True}}, stream=True, timeout=120)
    assert r.status_code == 200, r.text
    lines = r.iter_lines()
    json.loads(next(lines))
    return r, lines


def raw_connection(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def server_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")


# -- concurrency ----------------------------------------------------------------------------


def test_short_request_and_metrics_do_not_wait_for_a_long_one(served):
    url = served.url
    r, lines = start_stream(url)
    try:
        before = metrics(url)
        # The short request's first (and only) token comes from the first step that can
        # include it: the one after the step in flight when it was queued.
        short = requests.post(url + "/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
                              timeout=60)
        assert short.status_code == 200, short.text
        after = metrics(url)
        assert after["lmidist_active_requests"] >= 1  # the long request is still running
        count = after["lmidist_steps_to_first_token_count"] - before["lmidist_steps_to_first_token_count"]
        within_two = (after['lmidist_steps_to_first_token_bucket{le="2.0"}']
                      - before['lmidist_steps_to_first_token_bucket{le="2.0"}'])
        assert count == 1 and within_two == 1, (count, within_two)
        assert after["lmidist_engine_steps"] > before["lmidist_engine_steps"]
        # /metrics reads a snapshot: it never waits for a step. The median of several
        # scrapes (one slow scrape on a loaded machine is scheduling, not waiting).
        timings = []
        for _ in range(10):
            t = time.perf_counter()
            requests.get(url + "/metrics", timeout=30).raise_for_status()
            timings.append(time.perf_counter() - t)
        assert statistics.median(timings) < 0.1, timings
        next(lines)  # and the long stream is still going
    finally:
        r.close()
    wait_idle(url)


def test_short_request_does_not_wait_for_a_long_prompt(served, long_model_dir):
    """A short request sent while a ~2,000-token prompt is being prefilled (125 chunks of
    the 16-token budget) gets its first token from the next step that can hold it, not
    after the long prefill; the long prompt's greedy tokens are those it gets alone."""
    from lmidist_jax.engine.fast_tokenizer import load_fast_tokenizer

    url = served.url
    long_text = " ".join(f"item{i}" for i in range(600))
    num_long_tokens = len(load_fast_tokenizer(long_model_dir).encode(long_text))
    assert 1500 < num_long_tokens < 3000, num_long_tokens
    body = {"inputs": long_text, "parameters": {"max_new_tokens": 6, "details": True}}

    def long_tokens(response):
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["details"]["tokens"]]

    alone = long_tokens(requests.post(url + "/invocations", json=body, timeout=300))
    before = metrics(url)
    result = {}

    def long_request():
        t = time.perf_counter()
        result["tokens"] = long_tokens(requests.post(url + "/invocations", json=body, timeout=300))
        result["seconds"] = time.perf_counter() - t

    thread = threading.Thread(target=long_request)
    thread.start()
    try:
        # The long prompt is in prefill once the engine runs steps for it.
        wait_for(lambda: metrics(url)["lmidist_engine_steps"] >= before["lmidist_engine_steps"] + 3, 60,
                 "the long prompt's first chunks")
        t = time.perf_counter()
        short = requests.post(url + "/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
                              timeout=60)
        short_seconds = time.perf_counter() - t
        assert short.status_code == 200, short.text
        assert thread.is_alive(), "the long prompt finished before the short request was answered"
    finally:
        thread.join(300)
    after = metrics(url)
    # Its first token came at most 2 steps after it was queued (the step in flight, then
    # its own), while the long prompt took over 100 steps.
    count = after["lmidist_steps_to_first_token_count"] - before["lmidist_steps_to_first_token_count"]
    within_two = (after['lmidist_steps_to_first_token_bucket{le="2.0"}']
                  - before['lmidist_steps_to_first_token_bucket{le="2.0"}'])
    assert count == 2 and within_two == 1, (count, within_two)  # the long one's first token: > 2
    assert after["lmidist_engine_steps"] - before["lmidist_engine_steps"] > num_long_tokens // 16
    assert short_seconds < result["seconds"] / 3, (short_seconds, result["seconds"])
    assert result["tokens"] == alone
    wait_idle(url)


# -- disconnects ----------------------------------------------------------------------------


def test_non_streaming_client_disconnect_aborts(served):
    url = served.url
    before = metrics(url)
    body = json.dumps({"inputs": "Go on", "parameters": {"max_new_tokens": LONG_TOKENS,
                                                          "ignore_eos_token": True}}).encode()
    sock = raw_connection(served.port)
    sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    wait_for(lambda: metrics(url)["lmidist_running_sequences"] == 1, 60, "the request to run")
    sock.close()
    after = wait_idle(url, timeout=30)
    assert after["lmidist_aborted_requests_total"] - before["lmidist_aborted_requests_total"] == 1
    generated = after["lmidist_generation_tokens_total"] - before["lmidist_generation_tokens_total"]
    assert generated < LONG_TOKENS  # it did not run to the end


# -- HTTP hardening -------------------------------------------------------------------------


def test_chunked_body_over_the_limit_is_413_and_closed(served):
    sock = raw_connection(served.port)
    sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    head = b'{"inputs": "x"}'
    sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
    received = bytearray()

    def read_all():
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                received.extend(data)
        except OSError:  # reset after the response: the server closed with our bytes unread
            return

    reader = threading.Thread(target=read_all)
    reader.start()
    chunk = b" " * 2**20
    sent = 0
    try:
        for _ in range(40):  # valid JSON followed by up to 40 MiB of whitespace
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except OSError:
        pass  # the server stopped reading and closed the connection
    reader.join(30)
    assert not reader.is_alive(), "the server left the connection open"
    sock.close()
    assert sent < 40 * 2**20, "the server read 40 MiB without refusing"
    text = bytes(received).decode("utf-8", "replace")
    assert text.startswith("HTTP/1.1 413"), text[:300]
    head, _, body = text.partition("\r\n\r\n")
    assert "application/json" in head.lower()
    error = json.loads(body)
    assert error["code"] == 413 and "too large" in error["error"] and str(8 * 2**20) in error["error"]
    assert requests.get(served.url + "/ping", timeout=30).status_code == 200


def test_slow_clients_cost_no_threads_and_are_dropped(served):
    url = served.url
    threads_before = server_threads(served.proc.pid)
    slow = []
    for i in range(200):
        s = raw_connection(served.port)
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        slow.append(s)
    stop = threading.Event()

    def trickle():  # one header byte per connection per 0.5 s: never idle, never complete
        while not stop.is_set():
            for s in slow:
                try:
                    s.send(b"X")
                except OSError:
                    pass
            stop.wait(0.5)

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        time.sleep(1.0)
        # Served meanwhile, and the server did not grow a thread per connection.
        r = requests.post(url + "/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                          timeout=60)
        assert r.status_code == 200, r.text
        assert server_threads(served.proc.pid) <= threads_before + 4, (threads_before,
                                                                      server_threads(served.proc.pid))
        # Each is dropped once its request has not arrived within --request-timeout.
        for s in slow:
            s.settimeout(REQUEST_TIMEOUT + 20)
        closed = 0
        for s in slow:
            try:
                while s.recv(4096):
                    pass
                closed += 1
            except ConnectionResetError:
                closed += 1
            except socket.timeout:
                break
        assert closed == len(slow), f"{closed} of {len(slow)} slow connections were closed"
    finally:
        stop.set()
        trickler.join()
        for s in slow:
            s.close()
    assert requests.get(url + "/ping", timeout=30).status_code == 200


# -- SIGTERM --------------------------------------------------------------------------------


def _assert_clean_exit(proc: ServeProcess, started: float, limit: float) -> float:
    try:
        rc = proc.proc.wait(limit + 30)
    except Exception:
        proc.proc.kill()
        raise
    elapsed = time.monotonic() - started
    log = proc.log_text()
    assert rc == 0, f"exit status {rc}; log:\n{log[-3000:]}"
    assert "terminate called" not in log and "Traceback" not in log, log[-3000:]
    assert elapsed < limit, f"exited {elapsed:.1f} s after SIGTERM (limit {limit} s)"
    return elapsed


def test_sigterm_drains_then_exits_0(served):
    """Last on the shared server: a short stream in flight finishes, a long one is ended
    with an error record when the drain time is over, new requests get 503, exit 0."""
    url = served.url
    long_r, long_lines = start_stream(url)
    short_r, short_lines = start_stream(url, max_new_tokens=40, prompt="Count")
    started = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    try:
        wait_for(lambda: requests.get(url + "/ping", timeout=30).status_code == 503, 10, "/ping to answer 503")
        late = requests.post(url + "/invocations", json={"inputs": "late"}, timeout=30)
        assert "shutting down" in error_message(late, 503)
        short = [json.loads(line) for line in short_lines]
        assert len(short) == 39 and "generated_text" in short[-1], short[-2:]  # (+1 read before)
        rest = [json.loads(line) for line in long_lines]
        assert rest and set(rest[-1]) == {"code", "error"} and "shutting down" in rest[-1]["error"], rest[-2:]
        assert all("token" in rec for rec in rest[:-1])
    finally:
        long_r.close()
        short_r.close()
    from lmidist_jax.server.app import STEP_GRACE_SECONDS

    elapsed = _assert_clean_exit(served, started, DRAIN_SECONDS + STEP_GRACE_SECONDS)
    assert elapsed >= DRAIN_SECONDS - 0.5  # the long one was given the drain time


def test_sigterm_during_warmup_exits_0(long_model_dir, tmp_path_factory):
    """Also: a non-loopback address without an API key is warned about."""
    proc = ServeProcess(long_model_dir, tmp_path_factory.mktemp("warmup_log") / "serve.log",
                        options=SERVE_OPTIONS, flags=["--host", "0.0.0.0"], env={"LMIDIST_JAX_API_KEY": ""})
    try:
        wait_for(lambda: "warming up" in proc.log_text(), 120, "the server to start warming up", 0.1)
        time.sleep(1.0)  # into the build: loading, compiling
        assert not proc.ready.is_set(), "warm-up ended before the signal; the test needs a slower warm-up"
        assert "0.0.0.0 without an API key" in proc.log_text()
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        _assert_clean_exit(proc, started, 15)
    finally:
        proc.stop()


def test_sigterm_inside_a_step_exits_0(long_model_dir, tmp_path_factory):
    """enforce_eager: the first step compiles for its shape, seconds inside the step (the
    engine thread in XLA) when SIGTERM arrives."""
    proc = ServeProcess(long_model_dir, tmp_path_factory.mktemp("eager_log") / "serve.log",
                        options={**SERVE_OPTIONS, "enforce_eager": "true", "max_rolling_batch_prefill_tokens": 512},
                        flags=["--drain-seconds", "0.5"])
    try:
        proc.wait_ready()
        result = {}

        def client():
            try:
                r = requests.post(proc.url + "/invocations", json={"inputs": "word " * 400, "parameters": {
                    "max_new_tokens": 50, "ignore_eos_token": True}}, timeout=120)
                result["status"] = r.status_code
            except requests.RequestException as e:
                result["error"] = repr(e)

        t = threading.Thread(target=client)
        t.start()
        wait_for(lambda: metrics(proc.url)["lmidist_active_requests"] >= 1, 30, "the request to be admitted")
        time.sleep(0.3)
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        from lmidist_jax.server.app import STEP_GRACE_SECONDS

        _assert_clean_exit(proc, started, 0.5 + STEP_GRACE_SECONDS + 5)
        t.join(30)
        assert result.get("status") in (503, 200), result  # cut by the shutdown (503) or done; never hung
    finally:
        proc.stop()
