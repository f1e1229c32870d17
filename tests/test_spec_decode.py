"""Speculative decoding with a draft model: greedy outputs token-identical to the target
alone (mixed prompt lengths, chunked prefill, preemption, prefix caching), the rejection
sampler keeps the target's distribution, self-drafting accepts everything, verify rows
compute exactly what plain decode steps compute, records, stops inside an accepted run,
no leaked blocks, LoRA adapters and a GPTQ draft, compiled steps from the executable
cache, start-up refusals."""

import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.engine.sampler import SamplingBatch, rejection_sample
from lmidist_jax.engine.spec_decode import DraftModelError, write_layer_skip_draft
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
    out = jax.jit(rejection_sample, static_argnums=8)(
        jnp.broadcast_to(jnp.asarray(target_logits, jnp.float32), (rows, k + 1, vocab)),
        jnp.asarray(proposals, jnp.int32),
        jnp.broadcast_to(jnp.asarray(draft_probs, jnp.float32), (rows, k, vocab)),
        jnp.full(rows, k, jnp.int32), jnp.zeros((1, vocab), bool), jnp.zeros((1, vocab), jnp.int32),
        jnp.zeros(rows, jnp.int32), params, 0)
    tokens, accepted = np.asarray(out.token_ids), np.asarray(out.num_tokens) - 1
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
    assert not engine.runner.lazily_compiled  # warmed up: no step compiled on first use
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


def test_verify_rows_compute_exactly_what_decode_steps_compute(self_llm, reference):
    """A lone request: the plain engine decodes one token per step (the decode kernel over
    one query), the speculative one verifies 4 proposals per step (the decode kernel over
    5 queries of the sequence, beside 11 padding tokens). Same attention path and tiling:
    the target's log-probabilities are equal bit for bit, not only close (the mixed-batch
    path the verify rows took before differed in the last bits)."""
    params = SamplingParams(max_new_tokens=14, ignore_eos=True, logprobs=True)
    prompt = mixed_prompts()[1]
    ours = self_llm.generate([prompt], params, use_tqdm=False)[0]
    ref = reference.generate([prompt], params, use_tqdm=False)[0]
    assert ours.token_ids == ref.token_ids and ours.spec_decode["acceptance_history_len"] >= 2
    assert [e.logprob for e in ours.outputs[0].logprobs] == [e.logprob for e in ref.outputs[0].logprobs]


@pytest.mark.parametrize("backend", ["xla", "triton"])
def test_verify_queries_attend_exactly_as_decode_queries(backend):
    """Attention of a verify row (a sequence's last token and its 4 proposals, each a
    decode query over the keys up to its position) equals, bit for bit, the decode step
    of each position on its own: the XLA path the CPU runs, and the Pallas decode kernel
    (interpret mode), whose split-K is sized by the step's sequences, not its queries
    (16 queries would otherwise get 32 splits, one sequence 64)."""
    from pallas_kernels import paged_decode_attention
    from lmidist_jax.models.attention import paged_attention
    from lmidist_jax.models.step_metadata import StepMetadataBuilder

    rng = np.random.default_rng(0)
    block_size, max_blocks, kv_heads, heads, head_dim, context, k = 4, 64, 2, 4, 16, 150, 4
    blocks = rng.permutation(np.arange(1, max_blocks + 1))[:-(-context // block_size)]
    k_pages, v_pages = (jnp.asarray(rng.normal(size=(kv_heads, max_blocks + 1, block_size, head_dim)), jnp.float32)
                        for _ in range(2))
    q = jnp.asarray(rng.normal(size=(16, heads, head_dim)), jnp.float32)
    start = context - k - 1

    def attend(md, q):
        if backend == "xla":
            return paged_attention(q, k_pages, v_pages, md, mesh=None, scale=0.25)
        tables, lens = md.decode_queries(block_size)
        return paged_decode_attention(q, k_pages, v_pages, tables, lens, scale=0.25, num_seqs=md.block_tables.shape[0],
                                      pages_per_compute_block=1, interpret=True)

    verify = StepMetadataBuilder(16, 4, max_blocks, block_size)
    verify.add_sequence(0, blocks, start, k + 1, num_proposals=k)
    got = np.asarray(attend(verify.build(decode_only=True, backend=backend), q))[:k + 1]
    for j in range(k + 1):
        decode = StepMetadataBuilder(1, 1, max_blocks, block_size)
        decode.add_sequence(0, blocks, start + j, 1)
        want = np.asarray(attend(decode.build(decode_only=True, backend=backend), q[j:j + 1]))[0]
        np.testing.assert_array_equal(got[j], want)


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

    from lmidist_jax.engine.factory import load_draft

    directory = tmp_path_factory.mktemp("random_draft")
    make_model(directory, "llama", seed=7, vocab_size=VOCAB, num_hidden_layers=1, num_key_value_heads=2)
    config = dataclasses.replace(skip_llm.config, speculative_draft_model=str(directory))
    engine = skip_llm.engine
    return load_draft(config, engine.runner.model, engine.tokenizer, max_model_len=engine.max_model_len)


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
    runner = skip_llm.engine.runner
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


# -- LoRA adapters, a quantized draft -----------------------------------------------------


@pytest.fixture(scope="module")
def lora_llms(dirs, tmp_path_factory):
    """The target with LoRA (two PEFT adapters a1, a2) and prefix caching: alone, and with
    the layer-skip draft (which runs the base model)."""
    import transformers
    from test_lora import save_adapter

    root = tmp_path_factory.mktemp("spec_lora")
    hf = transformers.AutoModelForCausalLM.from_pretrained(dirs[0])
    save_adapter(hf, root / "a1", 8, 8, ["q_proj", "v_proj", "down_proj"], seed=10, extra={})
    save_adapter(hf, root / "a2", 4, 8, ["k_proj", "o_proj", "up_proj"], seed=20, extra={})
    options = {**OPTIONS, "enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "enable_prefix_caching": True}
    llms = []
    for draft in ({}, {"speculative_draft_model": dirs[1], "speculative_length": 3}):
        llm = LLM(dirs[0], **options, **draft)
        for name in ("a1", "a2"):
            llm.add_adapter(name, str(root / name))
        llms.append(llm)
    return llms


def test_lora_adapters_with_a_draft_and_prefix_caching(lora_llms):
    """LoRA with a draft (lmi-dist refused the pair): the target applies each request's
    adapter, the draft proposes with the base model. A batch mixing two adapters and the
    base model gives every request the greedy tokens of the target with its adapter
    alone. With prefix caching, full blocks are published under each request's adapter
    key, so a prompt cached under one adapter serves only that adapter (the speculative
    engine's own copy of the update rule published them without the key, and the base
    model then reused an adapter's KV)."""
    alone, drafted = lora_llms
    prompts, adapters = mixed_prompts()[:4], [None, "a1", "a2", "a1"]
    expected = [o.token_ids for o in alone.generate(prompts, GREEDY, use_tqdm=False, adapters=adapters)]
    base = [o.token_ids for o in alone.generate(prompts, GREEDY, use_tqdm=False)]
    assert all(e != b for e, b, a in zip(expected, base, adapters) if a)  # each adapter matters
    assert [o.token_ids for o in drafted.generate(prompts, GREEDY, use_tqdm=False, adapters=adapters)] == expected
    spec = drafted.engine.spec_stats
    assert 0 < spec.num_accepted_tokens < spec.num_proposed_tokens

    prompt = list(map(int, np.random.default_rng(7).integers(3, VOCAB, 30)))  # 7 full blocks of 4 + 2
    engine, computed = drafted.engine, []
    for adapter in ("a1", None, "a1", "a2", None):
        before = engine.stats.num_computed_prompt_tokens
        out = drafted.generate([prompt], GREEDY, use_tqdm=False, adapters=[adapter])[0]
        assert out.token_ids == alone.generate([prompt], GREEDY, use_tqdm=False, adapters=[adapter])[0].token_ids
        computed.append(engine.stats.num_computed_prompt_tokens - before)
    assert computed == [30, 30, 2, 30, 2], computed
    uid = engine.lora.registry["a1"].uid
    cached = engine.block_manager._hash_to_block
    assert all(h in cached for h in engine.block_manager.block_hashes(prompt, 4, 7, extra_key=uid))
    assert_no_leaks(drafted)


def test_gptq_draft_for_a_dense_target(tmp_path):
    """A 4-bit GPTQ checkpoint of the target as its draft (a real use: a quantized draft
    for a bf16 target), loaded by the factory's loader as a GPTQ model: the target's
    greedy tokens, its proposals mostly accepted."""
    from quant_formats import make_quantized
    from tiny_models import hf_greedy

    sizes = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=1,
                 vocab_size=VOCAB)
    target = make_model(tmp_path / "target", "llama", **sizes)
    make_quantized(tmp_path / "draft", "llama", "gptq", group_size=64, **sizes)
    llm = LLM(str(tmp_path / "target"), **{**OPTIONS, "speculative_draft_model": str(tmp_path / "draft"),
                                           "speculative_length": 3})
    assert llm.engine.runner.draft.spec.linear_kind.startswith("gptq")
    prompts = mixed_prompts()[:4]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(target, p, GREEDY.max_new_tokens) for p in prompts]
    spec = llm.engine.spec_stats
    assert spec.num_accepted_tokens > 0.5 * spec.num_proposed_tokens > 0


# A fresh process with a draft: its tokens and how it got its compiled steps.
CACHED_CHILD = """
import json, sys
from lmidist_jax import LLM, SamplingParams
llm = LLM(sys.argv[1], compilation_cache_dir=sys.argv[2], **json.loads(sys.argv[3]))
out = llm.generate([[5, 9, 17, 4, 22]], SamplingParams(max_new_tokens=8, ignore_eos=True), use_tqdm=False)[0]
runner = llm.engine.runner
print(json.dumps({"tokens": out.token_ids, "traces": runner.num_step_traces, "hits": runner.executable_cache.hits,
                  "accepted": llm.engine.spec_stats.num_accepted_tokens}))
"""


def test_second_process_loads_the_speculative_steps_from_the_executable_cache(dirs, reference, tmp_path):
    """The speculative step is the runner's one step: it goes through the executable
    cache like any other. The first process traces and stores its two buckets (the
    prefill and the verify step), the second loads them and traces nothing."""
    import os
    import subprocess
    import sys

    options = json.dumps({**OPTIONS, "speculative_draft_model": dirs[0], "speculative_length": 3})
    runs = [json.loads(subprocess.run([sys.executable, "-c", CACHED_CHILD, dirs[0], str(tmp_path), options],
                                      capture_output=True, text=True, check=True,
                                      cwd=os.path.dirname(__file__)).stdout.strip().splitlines()[-1])
            for _ in range(2)]
    expected = reference.generate([[5, 9, 17, 4, 22]], SamplingParams(max_new_tokens=8, ignore_eos=True),
                                  use_tqdm=False)[0].token_ids
    assert runs[0]["traces"] == 2 and runs[0]["hits"] == 0 and runs[0]["accepted"] > 0
    assert runs[1] == dict(runs[0], traces=0, hits=2) and runs[1]["tokens"] == expected


# -- start-up refusals ------------------------------------------------------------------


def test_draft_with_another_vocabulary_is_refused(dirs, tmp_path):
    make_model(tmp_path, "llama", vocab_size=VOCAB * 2, num_hidden_layers=1)
    with pytest.raises(DraftModelError, match=r"vocabulary of 64 tokens, the target 32"):
        LLM(dirs[0], **{**OPTIONS, "speculative_draft_model": str(tmp_path)})


def test_invalid_combinations_are_refused(dirs):
    from lmidist_jax.config import ConfigError
    from lmidist_jax.engine.factory import EngineConfigError

    with pytest.raises(EngineConfigError, match=r"max_rolling_batch_prefill_tokens=4 cannot hold one verify row"):
        LLM(dirs[0], **{**OPTIONS, "speculative_draft_model": dirs[1], "max_rolling_batch_prefill_tokens": 4})
    with pytest.raises(ConfigError, match=r"draft_model_tp_size=2 is not valid: accepted 1 or tensor_parallel"):
        LLM(dirs[0], **{**OPTIONS, "speculative_draft_model": dirs[1], "draft_model_tp_size": 2})
    with pytest.raises(ConfigError, match=r"decode_steps=4 with option.speculative_draft_model"):
        LLM(dirs[0], **{**OPTIONS, "speculative_draft_model": dirs[1], "decode_steps": 4})


# -- tensor parallelism ---------------------------------------------------------------------


def test_tensor_parallel_target_with_sharded_and_replicated_draft(dirs, reference_outputs):
    """TP=2 over two processes of one CPU device each (jax.distributed: the speculative
    step goes through the multi-host broadcast like any step), the draft sharded like the
    target (draft_model_tp_size=2: its cache split by KV heads as the target's); and TP=2
    on 2 devices of one process with the draft whole on both (1). Same greedy tokens."""
    import os
    import socket
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "spec_tp_worker.py")
    args = [sys.executable, worker, dirs[0], dirs[1], json.dumps(mixed_prompts()[:4])]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    hosts = [subprocess.Popen(args, env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                                             LMIDIST_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                             LMIDIST_NUM_PROCESSES="2", LMIDIST_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    (leader_out, leader_err), (follower_out, follower_err) = (p.communicate(timeout=600) for p in hosts)
    assert hosts[0].returncode == 0, leader_err[-3000:]
    assert hosts[1].returncode == 0 and "FOLLOWER DONE" in follower_out, follower_err[-3000:]
    one = subprocess.run(args, env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    reports = {**json.loads(leader_out.strip().splitlines()[-1]), **json.loads(one.stdout.strip().splitlines()[-1])}
    for draft_tp, expected_kv in (("2", "P('tp', None, None, None)"), ("1", "P()")):
        r = reports[draft_tp]
        assert r["tokens"] == reference_outputs[:4], draft_tp
        assert r["accepted"] > 0 and r["draft_devices"] == 2 and r["draft_kv"] == expected_kv
        assert r["target_kv"] == "P('tp', None, None, None)"
