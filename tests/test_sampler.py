"""The on-device sampler against exact supports and a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmidist_jax.engine.sampler import SamplingBatch, apply_penalties, sample, truncation_mask

V = 8
# A known distribution with distinct probabilities, best first after a shuffle.
PROBS = np.array([0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02])
ORDER = np.array([3, 0, 6, 1, 7, 2, 5, 4])  # token ORDER[i] has probability PROBS[i]


def batch(n, **kw):
    fields = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                  presence_penalty=0.0, frequency_penalty=0.0, seeds=0, sample_index=0, top_n=0)
    fields.update(kw)
    dtypes = dict(top_k=jnp.int32, seeds=jnp.uint32, sample_index=jnp.int32, top_n=jnp.int32)
    return SamplingBatch(**{k: jnp.asarray(np.broadcast_to(v, (n,)), dtypes.get(k, jnp.float32))
                            for k, v in fields.items()})


def logits_row():
    logits = np.zeros(V, np.float32)
    logits[ORDER] = np.log(PROBS)
    return logits


@pytest.mark.parametrize("kw,expected_top", [
    (dict(top_k=3), 3),
    (dict(top_p=0.5), 2),      # 0.30 + 0.25 reaches 0.5 at the 2nd token
    (dict(top_p=0.71), 4),     # 0.30+0.25+0.15 = 0.70 < 0.71 -> the 4th token crosses
    (dict(min_p=0.4), 3),      # p >= 0.12: tokens with 0.30, 0.25, 0.15
    (dict(top_k=5, top_p=0.9), 4),  # renormalised over top-5 (0.90): 0.333+0.278+0.167 < 0.9
    (dict(top_k=1), 1),
    (dict(), V),
])
def test_truncation_keeps_exact_support(kw, expected_top):
    mask = np.asarray(truncation_mask(jnp.asarray(logits_row())[None], batch(1, **kw)))[0]
    assert set(np.flatnonzero(mask)) == set(ORDER[:expected_top].tolist())


def test_samples_stay_in_support_and_follow_distribution():
    n = 4000
    logits = jnp.asarray(np.tile(logits_row(), (n, 1)))
    zeros_b = jnp.zeros((n, V), bool)
    zeros_i = jnp.zeros((n, V), jnp.int32)
    slots = jnp.arange(n)
    run = jax.jit(sample, static_argnums=5)
    params = batch(n, top_k=4, seeds=np.arange(n), sample_index=0)
    out = run(logits, zeros_b, zeros_i, slots, params, 0)
    tokens = np.asarray(out.token_ids)
    assert set(tokens.tolist()) <= set(ORDER[:4].tolist())
    freq = np.array([(tokens == t).mean() for t in ORDER[:4]])
    expected = PROBS[:4] / PROBS[:4].sum()
    assert np.abs(freq - expected).max() < 0.03
    # Same seeds and positions -> same samples; another position -> different.
    again = run(logits, zeros_b, zeros_i, slots, params, 0)
    assert (np.asarray(again.token_ids) == tokens).all()
    params2 = batch(n, top_k=4, seeds=np.arange(n), sample_index=1)
    other = run(logits, zeros_b, zeros_i, slots, params2, 0)
    assert (np.asarray(other.token_ids) != tokens).mean() > 0.3


def test_greedy_rows_take_argmax_and_logprobs_are_model_logprobs():
    logits = jnp.asarray(np.stack([logits_row(), logits_row()[::-1].copy()]))
    out = sample(logits, jnp.zeros((2, V), bool), jnp.zeros((2, V), jnp.int32), jnp.arange(2),
                 batch(2, temperature=0.0, top_n=3), 3)
    assert np.asarray(out.token_ids).tolist() == [ORDER[0], V - 1 - ORDER[0]]
    np.testing.assert_allclose(np.asarray(out.logprobs), np.log(PROBS[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[0], np.log(PROBS[:3]), rtol=1e-5)
    assert np.asarray(out.top_ids)[0].tolist() == ORDER[:3].tolist()


def numpy_penalties(logits, prompt_tokens, output_tokens, rep, presence, frequency):
    logits = logits.copy()
    seen = set(prompt_tokens) | set(output_tokens)
    for t in seen:
        logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
    for t in set(output_tokens):
        c = output_tokens.count(t)
        logits[t] -= frequency * c + presence
    return logits


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(0)
    rows, expected = [], []
    params = []
    for i in range(6):
        logits = rng.normal(size=V).astype(np.float32) * 3
        prompt = list(rng.integers(0, V, 4))
        output = list(rng.integers(0, V, 5))
        rep, pres, freq = [(1.0, 0, 0), (1.3, 0, 0), (1, 0.5, 0), (1, 0, 0.4), (1.2, -0.3, 0.7), (0.8, 1.0, -0.5)][i]
        expected.append(numpy_penalties(logits, prompt, output, rep, pres, freq))
        mask = np.zeros(V, bool)
        mask[prompt] = True
        counts = np.bincount(output, minlength=V).astype(np.int32)
        rows.append((logits, mask, counts))
        params.append((rep, pres, freq))
    logits, masks, counts = (jnp.asarray(np.stack(x)) for x in zip(*rows))
    rep, pres, freq = (np.array(x, np.float32) for x in zip(*params))
    got = apply_penalties(logits, masks, counts, batch(6, repetition_penalty=rep, presence_penalty=pres,
                                                        frequency_penalty=freq))
    np.testing.assert_allclose(np.asarray(got), np.stack(expected), rtol=1e-6, atol=1e-6)


def test_penalties_applied_through_sample_rows():
    """sample() picks each sequence's count row by slot, and skips rows without penalties."""
    logits = jnp.asarray(np.stack([logits_row(), logits_row()]))
    prompt_mask = np.zeros((3, V), bool)
    prompt_mask[2, ORDER[0]] = True  # row 2 = slot of sequence 0
    out = sample(logits, jnp.asarray(prompt_mask), jnp.zeros((3, V), jnp.int32), jnp.asarray([2, 0]),
                 batch(2, temperature=0.0, repetition_penalty=np.array([100.0, 1.0], np.float32)), 0)
    # The favourite token is penalized for sequence 0 only.
    assert np.asarray(out.token_ids).tolist() == [ORDER[1], ORDER[0]]
