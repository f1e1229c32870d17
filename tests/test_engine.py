"""Engine invariants: batch/preemption/chunking invariance, prefix caching, no leaks,
no recompilation after warm-up, over-length prompts failing alone."""

import jax
import numpy as np
import pytest

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.sampling_params import RequestError
from tiny_models import make_model

VOCAB = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_model(directory, "llama", num_key_value_heads=2)
    return str(directory)


def make_llm(model_dir, **options):
    defaults = dict(dtype="fp32", max_model_len=128, block_size=4, num_kv_blocks=400,
                    max_rolling_batch_size=32, max_rolling_batch_prefill_tokens=256, progress=False)
    return LLM(model_dir, **{**defaults, **options})


def mixed_prompts(n=32, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, n)
    return [list(map(int, rng.integers(0, VOCAB, k))) for k in lengths]


GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def shared_llm(model_dir):
    """One engine with the default test options, shared by the tests that leave it clean."""
    return make_llm(model_dir, warmup=True)


@pytest.fixture(scope="module")
def reference_outputs(shared_llm):
    """Each prompt run alone."""
    return [shared_llm.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in mixed_prompts()]


def assert_no_leaks(llm):
    engine = llm.engine
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants([])


def test_batch_invariance(shared_llm, reference_outputs):
    llm = shared_llm
    outs = llm.generate(mixed_prompts(), GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference_outputs
    assert all(len(o.token_ids) == 12 for o in outs)
    assert_no_leaks(llm)


def test_preemption_invariance(model_dir, reference_outputs):
    # 40 blocks of 4 tokens: far less than 32 sequences need, so sequences get preempted.
    llm = make_llm(model_dir, num_kv_blocks=40)
    outs = llm.generate(mixed_prompts(), GREEDY, use_tqdm=False)
    assert llm.engine.stats.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference_outputs
    assert_no_leaks(llm)


def test_chunked_prefill_invariance(model_dir, reference_outputs):
    llm = make_llm(model_dir, max_rolling_batch_prefill_tokens=16)
    seen_chunks = []
    scheduler = llm.engine.scheduler
    original = scheduler.schedule

    def spy():
        out = original()
        seen_chunks.extend(item.seq.request.request_id for item in out.scheduled
                           if item.seq.num_computed_tokens + item.num_new_tokens < item.seq.num_prompt_tokens)
        assert out.num_tokens <= 16
        return out

    scheduler.schedule = spy
    outs = llm.generate(mixed_prompts(), GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference_outputs
    # Some prompts (up to 59 tokens) were split over several steps (chunks that left
    # part of their prompt for a later step).
    assert len(set(seen_chunks)) > 1
    assert_no_leaks(llm)


def test_prefix_caching_same_outputs_fewer_tokens(model_dir, shared_llm):
    rng = np.random.default_rng(5)
    shared = list(map(int, rng.integers(0, VOCAB, 40)))
    prompts = [shared + list(map(int, rng.integers(0, VOCAB, k))) for k in (3, 7, 11, 2)]
    off = shared_llm
    on = make_llm(model_dir, enable_prefix_caching=True)
    computed_before = off.engine.stats.num_computed_prompt_tokens
    # Two waves so that the second finds the first's blocks cached.
    outs_off = [off.generate(prompts[:1], GREEDY, use_tqdm=False)[0]] + off.generate(prompts[1:], GREEDY, use_tqdm=False)
    outs_on = [on.generate(prompts[:1], GREEDY, use_tqdm=False)[0]] + on.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs_on] == [o.token_ids for o in outs_off]
    computed_off = off.engine.stats.num_computed_prompt_tokens - computed_before
    computed_on = on.engine.stats.num_computed_prompt_tokens
    assert computed_off == sum(map(len, prompts))
    assert computed_on <= computed_off - 3 * 40 + 3 * 4  # ~40 shared tokens each (whole blocks)
    assert_no_leaks(on)


def test_abort_midway_frees_blocks(shared_llm):
    llm = shared_llm
    engine = llm.engine
    for i, p in enumerate(mixed_prompts(8)):
        engine.add_request(f"r{i}", p, SamplingParams(max_new_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    for i in range(0, 8, 2):
        assert engine.abort(f"r{i}")
    finished = engine.run_until_done()
    reasons = {o.request_id: o.finish_reason for o in finished}
    assert all(reasons[f"r{i}"] == "abort" for i in range(0, 8, 2))
    assert all(reasons[f"r{i}"] == "length" for i in range(1, 8, 2))
    assert_no_leaks(llm)
    assert not engine.abort("r1")  # finished requests are gone


def test_no_compilation_after_warmup(shared_llm):
    llm = shared_llm
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        params = [SamplingParams(max_new_tokens=int(n), ignore_eos=True, temperature=t, top_p=0.9, seed=1,
                                 repetition_penalty=r, logprobs=True, top_n_tokens=3)
                  for n, t, r in zip(np.random.default_rng(0).integers(1, 20, 32), [0.0, 0.7] * 16, [1.0, 1.2, 1.0, 1.0] * 8)]
        llm.generate(mixed_prompts(), params, use_tqdm=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f"{len(compiles)} compilations after warm-up"


def test_over_length_prompt_fails_alone(shared_llm):
    llm = shared_llm
    prompts = mixed_prompts(3) + [[1] * 200]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert outs[3].finish_reason == "error"
    assert "200 tokens" in outs[3].error and "max_model_len is 128" in outs[3].error
    assert all(o.error is None and len(o.token_ids) == 12 for o in outs[:3])
    with pytest.raises(RequestError, match="max_model_len"):
        llm.engine.add_request("x", [1] * 128)


def test_output_is_capped_by_max_model_len(shared_llm):
    llm = shared_llm
    out = llm.generate([[3] * 120], SamplingParams(max_new_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_seeded_sampling_independent_of_batch(shared_llm):
    llm = shared_llm
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, seed=1234, ignore_eos=True)
    prompt = mixed_prompts(1, seed=9)[0]
    alone = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    others = mixed_prompts(12, seed=3)
    batch = llm.generate(others[:5] + [prompt] + others[5:],
                         [SamplingParams(max_new_tokens=7, temperature=1.0, ignore_eos=True)] * 5 + [params]
                         + [GREEDY] * 7, use_tqdm=False)
    assert batch[5].token_ids == alone
    unseeded = llm.generate([prompt] * 2, SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True),
                            use_tqdm=False)
    assert unseeded[0].token_ids != unseeded[1].token_ids


def test_n_and_best_of(shared_llm):
    llm = shared_llm
    out = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=7,
                                                   ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    best = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, temperature=1.0, n=1, best_of=4,
                                                    seed=7, ignore_eos=True), use_tqdm=False)[0]
    assert len(best.outputs) == 1
    assert_no_leaks(llm)


def test_stop_token_ids_and_logprobs(shared_llm):
    llm = shared_llm
    base = llm.generate([[9, 8, 7]], SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=True,
                                                    top_n_tokens=4), use_tqdm=False)[0]
    assert len(base.logprobs) == 10
    for entry in base.logprobs:
        assert entry.logprob <= 0 and len(entry.top) == 4
        assert entry.top[0][1] >= entry.logprob - 1e-5  # greedy token is the top-1
        assert entry.top[0][0] == entry.token_id
    stop_at = base.token_ids[3]
    first = base.token_ids.index(stop_at)
    out = llm.generate([[9, 8, 7]], SamplingParams(max_new_tokens=10, ignore_eos=True,
                                                   stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop_sequence"


def _reference_prompt_logprobs(llm, prompt):
    from lmidist_jax.models.scoring import prompt_logits

    logits = prompt_logits(llm.engine.runner.model, prompt)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return [None] + [float(logprobs[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]


def _assert_prompt_logprobs_close(got, want):
    assert got[0] is None and want[0] is None and len(got) == len(want)
    np.testing.assert_allclose(np.array(got[1:], np.float64), np.array(want[1:], np.float64), rtol=1e-4, atol=1e-4)


def test_prompt_logprobs_match_whole_prompt_forward(model_dir):
    """Prompt logprobs across chunked prefill (16-token budget, prompts up to 59 tokens),
    mixed with requests that do not ask for them, equal a whole-prompt forward pass;
    with prefix caching on, a cached prefix is recomputed so none is missing."""
    prompts = mixed_prompts(12, seed=3)
    llm = make_llm(model_dir, max_rolling_batch_prefill_tokens=16, enable_prefix_caching=True)
    wants = [i % 3 != 1 for i in range(len(prompts))]
    params = [SamplingParams(max_new_tokens=4, ignore_eos=True, prompt_logprobs=w) for w in wants]
    # A first wave caches the prefixes of the second.
    llm.generate([p for p in prompts], SamplingParams(max_new_tokens=1, ignore_eos=True), use_tqdm=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, want, out in zip(prompts, wants, outs):
        if not want:
            assert out.prompt_logprobs is None
            continue
        _assert_prompt_logprobs_close(out.prompt_logprobs, _reference_prompt_logprobs(llm, prompt))
    assert_no_leaks(llm)


def test_prompt_logprobs_survive_preemption(model_dir):
    prompts = mixed_prompts(8, seed=4)
    llm = make_llm(model_dir, num_kv_blocks=40)  # small pool: requests get preempted and recomputed
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, prompt_logprobs=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.stats.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        _assert_prompt_logprobs_close(out.prompt_logprobs, _reference_prompt_logprobs(llm, prompt))
