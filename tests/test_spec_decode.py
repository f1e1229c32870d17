"""Speculative decoding with a draft model: greedy outputs token-identical to the target
alone (mixed prompt lengths, chunked prefill, preemption, prefix caching), the rejection
sampler keeps the target's distribution, self-drafting accepts everything, records,
stops inside an accepted run, no leaked blocks, start-up refusals."""

import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.engine.sampler import SamplingBatch
from lmidist_jax.engine.spec_decode import DraftModelError, verify, write_layer_skip_draft
from tiny_models import make_model

VOCAB = 32  # small, so that sampled distributions can be compared with few samples
# Batch 4 and a 16-token step budget: prompts are prefilled in chunks, and each engine
# compiles few step buckets (the speculative step has one: 16 tokens x 4 sequences).
OPTIONS = dict(dtype="fp32", max_model_len=128, block_size=4, num_kv_blocks=400, max_rolling_batch_size=4,
               max_rolling_batch_prefill_tokens=16, progress=False)
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    target = tmp_path_factory.mktemp("target")
    make_model(target, "llama", vocab_size=VOCAB, num_key_value_heads=2)
    skip = write_layer_skip_draft(str(target), str(tmp_path_factory.mktemp("skip")), 1)
    return str(target), skip


def mixed_prompts(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(3, VOCAB, k))) for k in rng.integers(1, 60, n)]


@pytest.fixture(scope="module")
def reference(dirs):
    return LLM(dirs[0], **OPTIONS)


@pytest.fixture(scope="module")
def reference_outputs(reference):
    return [o.token_ids for o in reference.generate(mixed_prompts(), GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def skip_llm(dirs):
    """A weaker draft (the target's first layer), a KV pool too small for the batch
    (preemption) and prefix caching."""
    return LLM(dirs[0], warmup=True, **{**OPTIONS, "speculative_draft_model": dirs[1], "speculative_length": 3,
                                        "num_kv_blocks": 40, "enable_prefix_caching": True})


@pytest.fixture(scope="module")
def self_llm(dirs):
    return LLM(dirs[0], **{**OPTIONS, "speculative_draft_model": dirs[0], "speculative_length": 4,
                           "record_acceptance_rate": True})


def assert_no_leaks(llm):
    engine = llm.engine
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants([])


# -- the rejection sampler on its own ----------------------------------------------------


def test_rejection_sampler_keeps_target_distribution():
    """Fixed target (p) and draft (q) distributions over 6 tokens at 3 positions, 20k
    seeded rows: the first emitted token follows p_0 and, after an accepted first
    proposal, the second follows p_1 (a chi-square test a wrong rule fails: accepting
    every proposal gives q, resampling from p instead of the residual over-weights
    what the draft proposes)."""
    rows, vocab, k = 20000, 6, 2
    rng = np.random.default_rng(0)
    target_logits = rng.normal(size=(k + 1, vocab)) * 1.5
    draft_probs = np.asarray(jax.nn.softmax(rng.normal(size=(k, vocab)) * 1.5, axis=-1), np.float64)
    draft_probs /= draft_probs.sum(-1, keepdims=True)
    proposals = np.stack([rng.choice(vocab, size=rows, p=draft_probs[j]) for j in range(k)], axis=1)
    params = SamplingBatch(
        temperature=jnp.full(rows, 0.7, jnp.float32), top_k=jnp.zeros(rows, jnp.int32),
        top_p=jnp.ones(rows, jnp.float32), min_p=jnp.zeros(rows, jnp.float32),
        repetition_penalty=jnp.ones(rows, jnp.float32), presence_penalty=jnp.zeros(rows, jnp.float32),
        frequency_penalty=jnp.zeros(rows, jnp.float32), seeds=jnp.arange(rows, dtype=jnp.uint32),
        sample_index=jnp.zeros(rows, jnp.int32), top_n=jnp.zeros(rows, jnp.int32))
    out = jax.jit(verify, static_argnums=8)(
        jnp.broadcast_to(jnp.asarray(target_logits, jnp.float32), (rows, k + 1, vocab)),
        jnp.asarray(proposals, jnp.int32),
        jnp.broadcast_to(jnp.asarray(draft_probs, jnp.float32), (rows, k, vocab)),
        jnp.full(rows, k, jnp.int32), jnp.zeros((1, vocab), bool), jnp.zeros((1, vocab), jnp.int32),
        jnp.zeros(rows, jnp.int32), params, 0)
    tokens, accepted = np.asarray(out.token_ids), np.asarray(out.num_accepted)
    p = np.exp(target_logits / 0.7)
    p /= p.sum(-1, keepdims=True)
    first = np.bincount(tokens[:, 0], minlength=vocab)
    assert stats.chisquare(first, p[0] * first.sum()).pvalue > 1e-3, (first / rows, p[0])
    second = np.bincount(tokens[accepted >= 1, 1], minlength=vocab)
    assert stats.chisquare(second, p[1] * second.sum()).pvalue > 1e-3, (second / second.sum(), p[1])
    # Tokens past the emitted ones are zero, and acceptance happened at both positions.
    assert 0 < (accepted == 0).mean() < 1 and (accepted == 2).any()
    assert np.all(tokens[np.arange(k + 1)[None, :] > accepted[:, None]] == 0)


# -- greedy: token-identical to the target alone ------------------------------------------


def test_greedy_identical_with_weaker_draft_chunking_preemption_prefix_cache(skip_llm, reference_outputs):
    engine = skip_llm.engine
    outs = skip_llm.generate(mixed_prompts(), GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference_outputs
    assert engine.stats.num_preemptions > 0  # the small pool preempted and recomputed
    spec = engine.spec_stats
    assert 0 < spec.num_accepted_tokens < spec.num_proposed_tokens  # a weaker draft: some rejections
    assert not engine.spec_runner.lazily_compiled  # warmed up: no step compiled on first use
    assert_no_leaks(skip_llm)
    # A prompt again, its blocks now in the prefix cache: a hit, the same tokens.
    i = int(np.argmax([len(p) for p in mixed_prompts()]))
    prompt = mixed_prompts()[i]
    assert skip_llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids == reference_outputs[i]
    computed = engine.stats.num_computed_prompt_tokens
    assert skip_llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids == reference_outputs[i]
    assert engine.stats.num_computed_prompt_tokens - computed <= 4  # all but the last block cached
    assert_no_leaks(skip_llm)


def test_self_draft_accepts_everything_and_records(self_llm, reference_outputs, caplog):
    with caplog.at_level(logging.INFO, logger="lmidist_jax"):
        outs = self_llm.generate(mixed_prompts(), GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference_outputs
    spec = self_llm.engine.spec_stats
    assert spec.num_accepted_tokens / spec.num_proposed_tokens >= 0.95
    record = outs[3].spec_decode
    assert record["id"] == outs[3].request_id and record["mean_acceptance"] >= 0.95
    assert record["prompt_size"] == len(mixed_prompts()[3]) and record["output_size"] == 12
    assert 1 <= record["acceptance_history_len"] <= 11
    logged = [json.loads(r.getMessage().split(" ", 2)[2]) for r in caplog.records
              if r.getMessage().startswith("Speculative Decoding ")]
    assert record in logged and len(logged) == len(outs)
    # Alone: the prefill's token, then 5 + 5 (4 proposals, all accepted, + 1), then 1 without
    # proposals (they shrink to fit max_new_tokens).
    alone = self_llm.generate([mixed_prompts()[3]], GREEDY, use_tqdm=False)[0]
    assert alone.token_ids == reference_outputs[3] and alone.spec_decode["acceptance_history_len"] == 2
    assert_no_leaks(self_llm)


def test_stops_inside_an_accepted_run_and_length_limits(self_llm, reference, reference_outputs):
    prompt, ref = mixed_prompts()[5], reference_outputs[5]
    stop = next(t for t in ref[3:] if ref.index(t) >= 3)  # first seen at output position >= 3
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop])
    out = self_llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.token_ids == ref[:ref.index(stop) + 1] and out.finish_reason == "stop_sequence"
    # Near max_model_len (128): 120 prompt tokens leave 8.
    long_prompt = (mixed_prompts()[0] * 200)[:120]
    limit = SamplingParams(max_new_tokens=20, ignore_eos=True)
    expected = reference.generate([long_prompt], limit, use_tqdm=False)[0].token_ids
    out = self_llm.generate([long_prompt], limit, use_tqdm=False)[0]
    assert out.token_ids == expected and len(expected) == 8 and out.finish_reason == "length"
    assert_no_leaks(self_llm)


def test_penalties_see_the_proposals_before_each_position(self_llm, skip_llm, reference):
    """Greedy with repetition/presence/frequency penalties: position j of a verify row must
    count the proposals before it (the draft proposes without penalties, so it is
    rejected where they matter)."""
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, repetition_penalty=1.5,
                            presence_penalty=0.5, frequency_penalty=0.3)
    prompts = mixed_prompts()[6:10]
    expected = [o.token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    assert expected != [o.token_ids for o in reference.generate(prompts, GREEDY, use_tqdm=False)]
    for llm in (self_llm, skip_llm):
        assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        assert_no_leaks(llm)


def test_logprobs_are_the_targets(self_llm, reference):
    params = SamplingParams(max_new_tokens=9, ignore_eos=True, logprobs=True, top_n_tokens=3,
                            prompt_logprobs=True)
    prompts = mixed_prompts()[:3]
    for ours, ref in zip(self_llm.generate(prompts, params, use_tqdm=False),
                         reference.generate(prompts, params, use_tqdm=False)):
        assert ours.token_ids == ref.token_ids
        got, want = ours.outputs[0].logprobs, ref.outputs[0].logprobs
        np.testing.assert_allclose([e.logprob for e in got], [e.logprob for e in want], atol=1e-4)
        assert [[t for t, _, _ in e.top] for e in got] == [[t for t, _, _ in e.top] for e in want]
        assert ours.prompt_logprobs[0] is None and len(ours.prompt_logprobs) == len(ref.prompt_logprobs)
        np.testing.assert_allclose(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:], atol=1e-4)
        top_ids = lambda out: [[t for t, _ in e] for e in out.prompt_top_logprobs[1:]]  # noqa: E731
        assert ours.prompt_top_logprobs[0] is None and top_ids(ours) == top_ids(ref)


def test_streaming_abort_and_metrics(self_llm, reference_outputs):
    """Through the server's engine loop: streamed deltas (several tokens per output) add up
    to the target's tokens, an abort frees the blocks, /metrics counts proposals."""
    from lmidist_jax.engine.engine_loop import EngineLoop
    from lmidist_jax.server.metrics import ServerMetrics

    loop = EngineLoop(self_llm.engine)
    try:
        stream = loop.submit("s0", mixed_prompts()[2], GREEDY)
        deltas = [out.new_token_ids for out in stream]
        assert sum(deltas, []) == reference_outputs[2] and max(len(d) for d in deltas) > 1
        stream = loop.submit("s1", mixed_prompts()[4], SamplingParams(max_new_tokens=100, ignore_eos=True))
        for out in stream:
            if len(out.outputs[0].token_ids) >= 6:
                stream.close()
                break
        engine = self_llm.engine
        deadline = time.monotonic() + 30
        while (engine.scheduler.running or engine.block_manager.num_used_blocks) and time.monotonic() < deadline:
            time.sleep(0.05)  # the loop applies the abort between steps
        stats = loop.stats()
        text = ServerMetrics().render(stats, True).decode()
        assert stats["spec_proposed_tokens"] > 0
        assert f"lmidist_spec_decode_accepted_tokens {float(stats['spec_accepted_tokens'])}" in text
    finally:
        loop.shutdown()
    assert_no_leaks(self_llm)


# -- sampling through the engine ------------------------------------------------------------


@pytest.fixture(scope="module")
def random_draft(skip_llm, tmp_path_factory):
    """An unrelated 1-layer model of the same vocabulary (and layout as the layer-skip draft)."""
    import dataclasses

    from lmidist_jax.engine.spec_decode import load_draft_model

    directory = tmp_path_factory.mktemp("random_draft")
    make_model(directory, "llama", seed=7, vocab_size=VOCAB, num_hidden_layers=1, num_key_value_heads=2)
    config = dataclasses.replace(skip_llm.config, speculative_draft_model=str(directory))
    engine = skip_llm.engine
    return load_draft_model(config, engine.runner.model, engine.tokenizer, max_model_len=engine.max_model_len)


def test_sampled_tokens_follow_the_target_distribution(skip_llm, reference, random_draft):
    """600 seeded samples of 3 tokens with and without the draft: the 2nd and 3rd tokens
    (the ones the draft proposes) agree in distribution (two-sample chi-square). The draft
    here is an unrelated random model, swapped in for the layer-skip one (same structure:
    no recompilation; its cache then holds the other draft's keys, which only changes the
    proposals: any proposal distribution keeps the target's), so that many proposals are
    rejected and a wrong acceptance rule shows."""
    params = [SamplingParams(max_new_tokens=3, ignore_eos=True, temperature=0.3, top_k=20, seed=s)
              for s in range(600)]
    prompt = [5, 9, 17, 4]
    runner = skip_llm.engine.spec_runner
    layer_skip, runner.draft = runner.draft, random_draft
    try:
        ours = np.array([o.token_ids for o in skip_llm.generate([prompt] * 600, params, use_tqdm=False)])
        # Seeded: the same requests give the same tokens again.
        again = skip_llm.generate([prompt] * 3, params[:3], use_tqdm=False)
        assert [o.token_ids for o in again] == ours[:3].tolist()
    finally:
        runner.draft = layer_skip
    ref = np.array([o.token_ids for o in reference.generate([prompt] * 600, params, use_tqdm=False)])
    for position in (1, 2):
        table = np.stack([np.bincount(ours[:, position], minlength=VOCAB),
                          np.bincount(ref[:, position], minlength=VOCAB)])
        table = table[:, table.sum(0) > 0]
        assert stats.chi2_contingency(table).pvalue > 1e-3, table
    # n > 1 works.
    pair = skip_llm.generate([prompt], SamplingParams(max_new_tokens=5, n=2, temperature=1.0, seed=1,
                                                      ignore_eos=True), use_tqdm=False)[0]
    assert len(pair.outputs) == 2 and all(len(c.token_ids) == 5 for c in pair.outputs)
    assert skip_llm.engine.spec_stats.num_accepted_tokens > 0
    assert_no_leaks(skip_llm)


# -- start-up refusals ------------------------------------------------------------------


def test_draft_with_another_vocabulary_is_refused(dirs, tmp_path):
    make_model(tmp_path, "llama", vocab_size=VOCAB * 2, num_hidden_layers=1)
    with pytest.raises(DraftModelError, match=r"vocabulary of 64 tokens, the target 32"):
        LLM(dirs[0], **{**OPTIONS, "speculative_draft_model": str(tmp_path)})


def test_invalid_combinations_are_refused(dirs):
    from lmidist_jax.config import ConfigError

    with pytest.raises(ConfigError, match="Cannot enable lora and speculative decoding at the same time"):
        LLM(dirs[0], **{**OPTIONS, "speculative_draft_model": dirs[1], "enable_lora": True})
    with pytest.raises(ConfigError, match=r"draft_model_tp_size=2 is not valid: accepted 1 or tensor_parallel"):
        LLM(dirs[0], **{**OPTIONS, "speculative_draft_model": dirs[1], "draft_model_tp_size": 2})
    with pytest.raises(ConfigError, match=r"decode_steps=4 with option.speculative_draft_model"):
        LLM(dirs[0], **{**OPTIONS, "speculative_draft_model": dirs[1], "decode_steps": 4})


# -- tensor parallelism ---------------------------------------------------------------------


def test_tensor_parallel_target_with_sharded_and_replicated_draft(dirs, reference_outputs):
    """TP=2 on 2 fake CPU devices: draft_model_tp_size=2 shards the draft's cache by KV
    heads as the target's; 1 keeps the draft whole on both devices. Same greedy tokens."""
    import os
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "spec_tp_worker.py")
    prompts = mixed_prompts()[:4]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, worker, dirs[0], dirs[1], json.dumps(prompts)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for draft_tp, expected_kv in (("2", "P('tp', None, None, None)"), ("1", "P()")):
        r = report[draft_tp]
        assert r["tokens"] == reference_outputs[:4], draft_tp
        assert r["accepted"] > 0 and r["draft_devices"] == 2 and r["draft_kv"] == expected_kv
        assert r["target_kv"] == "P('tp', None, None, None)"
