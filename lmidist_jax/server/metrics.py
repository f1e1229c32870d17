"""Prometheus metrics of one server, in a registry of its own (not the global one,
so several apps can live in one process, e.g. in tests).

Exported (``GET /metrics``):

=========================================  =========  ==========================================
name                                       type       meaning
=========================================  =========  ==========================================
lmidist_requests_total{status}             counter    HTTP responses by status code
lmidist_aborted_requests_total             counter    streams closed by the client before the end
lmidist_prompt_tokens_total                counter    prompt tokens of admitted requests
lmidist_generation_tokens_total            counter    generated tokens
lmidist_running_sequences                  gauge      sequences in the running batch
lmidist_waiting_sequences                  gauge      sequences waiting to be scheduled
lmidist_active_requests                    gauge      requests the engine loop is serving
lmidist_kv_blocks_used / _free             gauge      KV-cache blocks in use / free
lmidist_engine_healthy                     gauge      1 when the engine is ready and healthy
lmidist_engine_steps                       gauge      engine steps run so far
lmidist_spec_decode_proposed_tokens        gauge      draft tokens proposed so far (with a draft model)
lmidist_spec_decode_accepted_tokens        gauge      draft tokens the target accepted so far
lmidist_lora_adapters                      gauge      LoRA adapters registered now (with enable_lora)
lmidist_lora_adapters_registered / _removed  gauge    adapters registered / removed so far
lmidist_lora_adapter_disk_reads            gauge      adapter directories read (registrations and
                                                      re-reads after host-cache eviction)
lmidist_lora_adapter_slot_loads            gauge      adapters copied into a device slot
lmidist_steps_to_first_token               histogram  engine steps from a request's submission to
                                                      the step that gave its first token (1: the
                                                      next step; 2: it arrived during a step)
lmidist_time_to_first_token_seconds        histogram  request arrival -> first token
lmidist_inter_token_latency_seconds        histogram  gap between tokens (per token)
lmidist_request_latency_seconds            histogram  request arrival -> last token
=========================================  =========  ==========================================

The gauges are read from ``EngineLoop.stats()`` at scrape time: a snapshot the engine
loop takes after each step, so a scrape never waits for one.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
STEP_BUCKETS = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmidist_requests", "HTTP responses by status code", ["status"], registry=r)
        self.aborted = Counter("lmidist_aborted_requests", "Streams closed by the client before the end",
                               registry=r)
        self.prompt_tokens = Counter("lmidist_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("lmidist_generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("lmidist_running_sequences", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("lmidist_waiting_sequences", "Sequences waiting to be scheduled", registry=r)
        self.active = Gauge("lmidist_active_requests", "Requests the engine loop is serving", registry=r)
        self.kv_used = Gauge("lmidist_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_free = Gauge("lmidist_kv_blocks_free", "KV-cache blocks free", registry=r)
        self.healthy = Gauge("lmidist_engine_healthy", "1 when the engine is ready and healthy", registry=r)
        self.steps = Gauge("lmidist_engine_steps", "Engine steps run so far", registry=r)
        # Totals read from the engine's snapshot (a gauge: the engine owns the count).
        self.spec_proposed = Gauge("lmidist_spec_decode_proposed_tokens",
                                   "Draft tokens proposed so far (speculative decoding)", registry=r)
        self.spec_accepted = Gauge("lmidist_spec_decode_accepted_tokens",
                                   "Draft tokens accepted by the target so far (speculative decoding)", registry=r)
        self.lora_adapters = Gauge("lmidist_lora_adapters", "LoRA adapters registered now", registry=r)
        self.lora_registered = Gauge("lmidist_lora_adapters_registered", "LoRA adapters registered so far",
                                     registry=r)
        self.lora_removed = Gauge("lmidist_lora_adapters_removed", "LoRA adapters removed so far", registry=r)
        self.lora_disk_reads = Gauge("lmidist_lora_adapter_disk_reads", "LoRA adapter directories read so far",
                                     registry=r)
        self.lora_slot_loads = Gauge("lmidist_lora_adapter_slot_loads",
                                     "LoRA adapters copied into a device slot so far", registry=r)
        self.steps_to_first_token = Histogram(
            "lmidist_steps_to_first_token", "Engine steps from submission to the step that gave the first token",
            buckets=STEP_BUCKETS, registry=r)
        self.ttft = Histogram("lmidist_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmidist_inter_token_latency_seconds", "Gap between consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lmidist_request_latency_seconds", "Request arrival to last token",
                             buckets=REQUEST_BUCKETS, registry=r)

    def render(self, stats: dict | None, healthy: bool) -> bytes:
        s = stats or {}
        self.running.set(s.get("running", 0))
        self.waiting.set(s.get("waiting", 0))
        self.active.set(s.get("num_requests", 0))
        self.kv_used.set(s.get("kv_blocks_used", 0))
        self.kv_free.set(s.get("kv_blocks_free", 0))
        self.healthy.set(1 if healthy else 0)
        self.steps.set(s.get("num_steps", 0))
        self.spec_proposed.set(s.get("spec_proposed_tokens", 0))
        self.spec_accepted.set(s.get("spec_accepted_tokens", 0))
        self.lora_adapters.set(s.get("lora_adapters", 0))
        self.lora_registered.set(s.get("lora_registered", 0))
        self.lora_removed.set(s.get("lora_removed", 0))
        self.lora_disk_reads.set(s.get("lora_disk_reads", 0))
        self.lora_slot_loads.set(s.get("lora_slot_loads", 0))
        return generate_latest(self.registry)

    def tracker(self, start: float | None = None) -> "RequestTracker":
        return RequestTracker(self, start)


class RequestTracker:
    """Per-request timing: feed it each RequestOutput as it arrives."""

    def __init__(self, metrics: ServerMetrics, start: float | None = None):
        self.m = metrics
        self.start = start if start is not None else time.perf_counter()
        self.last: float | None = None
        self.prompt_counted = False
        self.tokens = 0
        self.done = False

    def observe(self, out) -> None:
        now = time.perf_counter()
        if not self.prompt_counted:
            self.prompt_counted = True
            self.m.prompt_tokens.inc(len(out.prompt_token_ids))
        total = sum(len(c.token_ids) for c in out.outputs)
        k = max(0, total - self.tokens)
        self.tokens = max(self.tokens, total)
        if k:
            self.m.generation_tokens.inc(k)
        # Latencies follow the first sequence (what a streaming client sees); several
        # tokens in one output (multi-step decode) share the gap.
        steps = len(out.new_token_ids)
        if steps:
            if self.last is None:
                self.m.ttft.observe(now - self.start)
                for _ in range(steps - 1):
                    self.m.itl.observe(0.0)
            else:
                gap = (now - self.last) / steps
                for _ in range(steps):
                    self.m.itl.observe(gap)
            self.last = now
        if out.finished and not self.done:
            self.done = True
            self.m.e2e.observe(now - self.start)
