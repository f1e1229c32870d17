"""The budget rule of the scheduler. With default options a long prompt is prefilled in
chunks (max_rolling_batch_prefill_tokens defaults to 2048, 256 on the CPU) and the
requests already decoding get a token at every step of it; a long prompt's chunk leaves
room for shorter prompts (host-only tests below), without starving it."""

from __future__ import annotations

import pytest

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.engine.factory import CPU_DEFAULT_PREFILL_TOKENS
from tiny_models import make_model


def test_long_prompt_is_chunked_between_running_decodes(tmp_path):
    make_model(tmp_path, "llama", num_key_value_heads=2, max_position_embeddings=8192)
    llm = LLM(str(tmp_path), dtype="fp32", max_rolling_batch_size=4, num_kv_blocks=700, progress=False)
    engine = llm.engine
    budget = CPU_DEFAULT_PREFILL_TOKENS
    assert engine.max_model_len == 8192 and engine.runner.max_num_batched_tokens == budget
    scheduler = engine.scheduler
    steps = []
    schedule = scheduler.schedule

    def recording_schedule():
        out = schedule()
        steps.append({item.seq.request.request_id: item.num_new_tokens for item in out.scheduled})
        return out

    scheduler.schedule = recording_schedule
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"short{i}", [1, 2, 3, 4], params, stream=False)
    engine.step()  # the short prompts' prefill
    engine.add_request("long", [1 + i % 120 for i in range(4995)], SamplingParams(max_new_tokens=1), stream=False)
    while engine.has_unfinished_requests():
        engine.step()
    long_steps = [s for s in steps if "long" in s]
    chunk = budget - 3  # what the three decode rows leave
    assert [s["long"] for s in long_steps] == [chunk] * (4995 // chunk) + [4995 % chunk], long_steps
    # Every step of the long prompt's prefill also decodes each running request.
    assert all(s.get(f"short{i}") == 1 for s in long_steps for i in range(3)), long_steps


# -- the budget rule: a long prompt never holds up a short one (host only) -----------------

def _scheduler(budget=64, max_num_seqs=8, num_blocks=400):
    from lmidist_jax.engine.block_manager import BlockManager
    from lmidist_jax.engine.scheduler import Scheduler

    return Scheduler(BlockManager(num_blocks, 4), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def _add(scheduler, name, num_prompt_tokens, max_new_tokens=1):
    from lmidist_jax.engine.sequence import Request, Sequence

    prompt = [1 + i % 50 for i in range(num_prompt_tokens)]
    request = Request(name, None, prompt, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
    seq = Sequence(len(scheduler.running) + len(scheduler.waiting) + hash(name) % 10_000, request, 0,
                   list(prompt), seed=0)
    scheduler.add(seq)
    return seq


def _step(scheduler) -> dict[str, int]:
    """One scheduler step as the engine runs it: sampled sequences get a token and finish
    after max_new_tokens. Returns {request id: new tokens}."""
    out = scheduler.schedule()
    samples = [item.samples for item in out.scheduled]  # as the engine reads them: before after_step
    scheduler.after_step(out)
    for item, sampled in zip(out.scheduled, samples):
        seq = item.seq
        if sampled:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.request.sampling_params.max_new_tokens:
                scheduler.finish(seq)
    return {item.seq.request.request_id: item.num_new_tokens for item in out.scheduled}


def test_short_prompt_runs_in_the_next_step_beside_a_long_prefill():
    scheduler = _scheduler(budget=64)
    _add(scheduler, "long", 300)
    assert _step(scheduler) == {"long": 64}  # alone: the whole budget
    _add(scheduler, "short", 5)
    assert _step(scheduler) == {"long": 59, "short": 5}  # the long chunk takes what is left
    assert _step(scheduler) == {"long": 64}  # the short one finished (1 token)


def test_decode_rows_keep_their_token_behind_a_long_prefill():
    scheduler = _scheduler(budget=64)
    long = _add(scheduler, "long", 300)
    _step(scheduler)
    for i in range(3):
        _add(scheduler, f"chat{i}", 4, max_new_tokens=10)
    assert _step(scheduler) == {"long": 52, "chat0": 4, "chat1": 4, "chat2": 4}
    # Now decoding behind the long prompt in the running list: one token each, every step.
    while long.num_computed_tokens < long.num_prompt_tokens:
        step = _step(scheduler)
        assert [step[f"chat{i}"] for i in range(3)] == [1, 1, 1] or not scheduler.running[1:], step
        assert step["long"] == min(61, long.num_prompt_tokens - (long.num_computed_tokens - step["long"]))


def test_long_prompts_stay_first_come_first_served():
    """A waiting prompt no shorter than the running one's remainder reserves nothing: the
    older prompt keeps the whole budget (no slowdown for either)."""
    scheduler = _scheduler(budget=64)
    _add(scheduler, "first", 200)
    _step(scheduler)
    _add(scheduler, "second", 200)
    assert _step(scheduler) == {"first": 64}
    assert _step(scheduler) == {"first": 64}
    assert _step(scheduler) == {"first": 8, "second": 56}


def test_a_long_prompt_keeps_half_the_budget_when_shorter_ones_queue():
    """Shorter prompts together wanting more than half: the long one still gets half, the
    shorter ones are admitted first come first served in the other half."""
    scheduler = _scheduler(budget=64)
    _add(scheduler, "long", 300)
    _step(scheduler)
    for i in range(4):
        _add(scheduler, f"mid{i}", 20)
    assert _step(scheduler) == {"long": 32, "mid0": 20, "mid1": 12}


def test_waiting_long_prompt_admitted_beside_shorter_ones_behind_it():
    scheduler = _scheduler(budget=64)
    _add(scheduler, "long", 300)
    _add(scheduler, "short", 6)
    assert _step(scheduler) == {"long": 58, "short": 6}


@pytest.mark.parametrize("per_step", [2, 4])
def test_stream_of_short_prompts_does_not_starve_a_long_one(per_step):
    """New 12-token prompts (each decoding 3 tokens) arrive at every step while a
    1000-token prompt is prefilled. The long prompt gets at least ceil((B - D) / 2)
    tokens every step (D <= max_num_seqs - 1 decode rows), so it finishes within
    ceil(L / ceil((B - D) / 2)) steps. Two arrivals a step fit beside it and never wait;
    four want more than half the budget: they queue, first come first served."""
    budget, max_num_seqs, length = 64, 16, 1000
    scheduler = _scheduler(budget=budget, max_num_seqs=max_num_seqs, num_blocks=2000)
    long = _add(scheduler, "long", length)
    share = -(-(budget - (max_num_seqs - 1)) // 2)
    arrived, first_step = {}, {}
    steps = 0
    while long.num_computed_tokens < length:
        for i in range(per_step):
            arrived[f"s{steps:03d}-{i}"] = steps
            _add(scheduler, f"s{steps:03d}-{i}", 12, max_new_tokens=3)
        remaining = length - long.num_computed_tokens
        step = _step(scheduler)
        assert step["long"] >= min(share, remaining), step
        for name in step:
            first_step.setdefault(name, steps)
        steps += 1
    assert -(-length // budget) < steps <= -(-length // share)
    admitted = sorted(first_step, key=lambda name: (first_step[name], name))
    assert admitted[1:] == sorted(admitted[1:])  # first come first served
    delays = [first_step[name] - arrived[name] for name in arrived if name in first_step]
    if per_step == 2:
        assert len(delays) == len(arrived) and max(delays) == 0, delays
