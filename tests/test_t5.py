"""T5 (encoder-decoder) in the rolling batch against transformers: v1.0 (ReLU, tied and
scaled head) and v1.1 / Flan-T5 (gated GeLU, untied head) on tiny random checkpoints;
the relative-position buckets and the encoder's packed attention on their own; the
options T5 refuses."""

import numpy as np
import pytest

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.models.scoring import prompt_logits
from t5_models import VARIANTS, hf_greedy, hf_logits, make_t5, make_tokenizer

PROMPT_LENS = (5, 17, 40)
# A KV pool of 17 blocks of 8 tokens: one max_model_len sequence plus its encoder's, so
# the three requests (9 cross blocks + up to 5 decoder blocks each) must preempt. The
# budget of 48 tokens admits the 40-token prompt (encoder + one decoder token) only in a
# step of its own: the encoder input of the batch is split over steps. decode_steps=4:
# decode-only steps run 4 tokens per dispatch (cross-attention metadata carried along).
ENGINE = dict(dtype="fp32", max_model_len=64, block_size=8, num_kv_blocks=17, max_rolling_batch_size=4,
              max_rolling_batch_prefill_tokens=48, enable_prefix_caching=True, decode_steps=4, warmup=False,
              progress=False)


def prompts():
    rng = np.random.default_rng(2)
    return [list(map(int, rng.integers(3, 128, n))) for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def t5_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_t5(directory, request.param)
    make_tokenizer(directory)
    return request.param, hf, LLM(str(directory), **ENGINE)


def test_logits_and_greedy_tokens_match_transformers(t5_model):
    variant, hf, llm = t5_model
    engine = llm.engine
    prompt = prompts()[2]
    decoder_ids = [0] + hf_greedy(hf, prompt, 31)
    ours = prompt_logits(engine.runner.model, decoder_ids, encoder_token_ids=prompt)
    ref = hf_logits(hf, prompt, decoder_ids)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, f"{variant}: relative logit error {rel:.2e}"

    encoder_steps = []
    run_encoder = engine.runner._run_encoder

    def spy(ids, md):
        encoder_steps.append(int((np.asarray(md.token_seq_ids) >= 0).sum()))
        return run_encoder(ids, md)

    engine.runner._run_encoder = spy
    try:
        outs = llm.generate(prompts(), SamplingParams(max_new_tokens=32, ignore_eos=True), use_tqdm=False)
    finally:
        engine.runner._run_encoder = run_encoder
    for prompt, out in zip(prompts(), outs):
        assert out.token_ids == hf_greedy(hf, prompt, 32), variant
        assert out.finish_reason == "length"
    # The prompts went through the encoder over several steps, and again after preemption.
    assert engine.stats.num_preemptions > 0
    assert len(encoder_steps) >= 3 and sum(encoder_steps) > sum(PROMPT_LENS), encoder_steps
    assert engine.block_manager.num_used_blocks == 0  # decoder and cross blocks all freed


def test_text_prompt_returns_decoder_text(t5_model):
    variant, hf, llm = t5_model
    tokenizer = llm.engine.tokenizer
    text = "translate English to German: the cat is big"
    ids = tokenizer.encode(text)
    assert ids[-1] == 1  # T5's </s> ends every prompt
    out = llm.generate([text], SamplingParams(max_new_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    expected = hf_greedy(hf, ids, 12)
    assert out.token_ids == expected
    assert out.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_relative_position_buckets_match_transformers():
    import jax.numpy as jnp
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    from pallas_kernels.reference import RelativeBias

    rel = np.arange(-300, 300, dtype=np.int32)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (8, 20)):
            bias = RelativeBias(jnp.zeros((1, num_buckets)), num_buckets, max_distance, bidirectional)
            ours = np.asarray(bias.buckets(jnp.asarray(rel)))
            ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                        num_buckets=num_buckets, max_distance=max_distance)
            np.testing.assert_array_equal(ours, ref.numpy())


def test_encoder_attention_tiles_match_dense():
    """The encoder's packed attention (several prompts and padding in one step, queries in
    tiles) equals a dense per-prompt softmax with the bidirectional relative bias."""
    import jax.numpy as jnp

    from pallas_kernels.reference import RelativeBias
    from pallas_kernels.xla_attention import packed_bidirectional_attention

    rng = np.random.default_rng(0)
    lens, pad, heads, dim = (7, 19, 12), 5, 4, 8
    T = sum(lens) + pad
    q, k, v = (rng.standard_normal((T, heads, dim)).astype(np.float32) for _ in range(3))
    seq_ids = np.concatenate([np.full(n, i) for i, n in enumerate(lens)] + [np.full(pad, -1)]).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in lens] + [np.zeros(pad)]).astype(np.int32)
    bias = RelativeBias(jnp.asarray(rng.standard_normal((heads, 8)), jnp.float32), 8, 20, True)
    outs = [np.asarray(packed_bidirectional_attention(q, k, v, seq_ids, positions, seq_ids < 0, scale=1.0,
                                                      relative_bias=bias, query_tile=tile)) for tile in (8, 128)]
    start = 0
    for i, n in enumerate(lens):
        sl = slice(start, start + n)
        rel = positions[sl][None, :] - positions[sl][:, None]
        s = np.einsum("qhd,khd->hqk", q[sl], k[sl]) + np.asarray(bias.table)[:, np.asarray(bias.buckets(rel))]
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v[sl])
        for out in outs:
            np.testing.assert_allclose(out[sl], ref, rtol=1e-5, atol=1e-5)
        start += n


def test_refused_options_and_prompts(t5_model, tmp_path):
    from lmidist_jax.engine.factory import EngineConfigError
    from lmidist_jax.sampling_params import RequestError

    variant, hf, llm = t5_model
    model_dir = llm.config.model_id
    with pytest.raises(EngineConfigError, match="encoder-decoder.*enable_lora"):
        LLM(model_dir, **{**ENGINE, "enable_lora": True})
    with pytest.raises(EngineConfigError, match="encoder-decoder.*speculative_draft_model"):
        LLM(model_dir, **{**ENGINE, "decode_steps": 1, "speculative_draft_model": model_dir})
    # Tensor parallelism (this process has one device, so the check is called directly).
    from types import SimpleNamespace

    from lmidist_jax.engine.factory import check_encoder_decoder_options
    with pytest.raises(EngineConfigError, match=r"encoder-decoder.*tensor_parallel_degree=2 \(only 1\)"):
        check_encoder_decoder_options(llm.engine.runner.spec, SimpleNamespace(tensor_parallel_degree=2))
    with pytest.raises(RequestError, match="at most 47 tokens"):
        llm.engine.add_request("long", list(range(3, 51)))
    with pytest.raises(RequestError, match="prompt_logprobs"):
        llm.engine.add_request("lp", [3, 4, 5], SamplingParams(prompt_logprobs=True))
    assert not llm.engine.requests


def test_scheduler_budgets_encoder_and_keys_prefix_cache_by_encoder_prompt():
    """Host-side rules: the encoder prompt counts in the token budget and takes cross
    blocks; preemption frees both; decoder blocks are shared only between requests with the
    same encoder prompt (identical decoder tokens after different prompts mean different KV)."""
    from lmidist_jax.engine.block_manager import BlockManager
    from lmidist_jax.engine.scheduler import Scheduler
    from lmidist_jax.engine.sequence import Request, Sequence

    bm = BlockManager(32, 4, enable_prefix_caching=True)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32)
    decoder_tokens = [0, 9, 9, 9, 9, 9]

    def add(seq_id, encoder_ids):
        request = Request(str(seq_id), None, [0], SamplingParams(), encoder_prompt_token_ids=encoder_ids)
        seq = Sequence(seq_id, request, 0, list(decoder_tokens), seed=0)
        scheduler.add(seq)
        return seq

    first = add(0, [5, 6, 7, 8, 9])
    step = scheduler.schedule()
    assert [(s.num_new_tokens, s.num_encoder_tokens) for s in step.scheduled] == [(6, 5)]
    assert len(first.cross_block_ids) == 2 and len(first.block_ids) == 2 and not step.is_decode_only
    scheduler.after_step(step)
    # Budget 32: a 28-token prompt leaves room for 4 decoder tokens of the 6.
    long_prompt = add(1, list(range(3, 31)))
    step = scheduler.schedule()
    assert (1, 4, 28) in [(s.seq.seq_id, s.num_new_tokens, s.num_encoder_tokens) for s in step.scheduled]
    scheduler.after_step(step)
    for seq in (first, long_prompt):
        scheduler.finish(seq)
    assert bm.num_used_blocks == 0
    add(2, [5, 6, 7, 8, 10])  # a different prompt, the same decoder tokens
    same_prompt = add(3, [5, 6, 7, 8, 9])
    step = scheduler.schedule()
    computed = {s.seq.seq_id: s.seq.num_computed_tokens for s in step.scheduled}
    assert computed == {2: 0, 3: 4}  # only the same encoder prompt reuses the cached block
    # Preemption gives back both block tables; the encoder then runs again.
    scheduler._preempt(same_prompt)
    assert not same_prompt.cross_block_ids and not same_prompt.block_ids
    assert same_prompt.num_encoder_tokens_to_run == 5


def test_default_budget_holds_a_whole_prompt_beside_every_decode(t5_model):
    """Encoder prompts are never split over steps: unset, the prefill budget is
    min(2048, max_model_len) plus one decode token per sequence, so a prompt of up to
    max_model_len - 1 tokens is admitted while max_rolling_batch_size sequences decode."""
    variant, hf, llm = t5_model
    options = {k: v for k, v in ENGINE.items() if k != "max_rolling_batch_prefill_tokens"}
    engine = LLM(llm.config.model_id, **options).engine
    assert engine.scheduler.max_num_batched_tokens == ENGINE["max_model_len"] + ENGINE["max_rolling_batch_size"]
