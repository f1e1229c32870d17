"""On-device sampling, run inside the jitted step: the sampler of ordinary rows, the
draft's proposal sampler and the rejection sampler that verifies proposals.

Order: penalties (repetition on prompt+output tokens, presence/frequency on output
tokens) -> temperature -> top-k -> top-p -> min-p -> Gumbel-max sample. Rows with
temperature 0 take the argmax of the penalized logits. Each row draws its noise from
its own key (request seed, output position), so a request's samples do not depend on
what else is in the batch.

Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): the draft samples each
proposal from q (temperature and truncation, no penalties: any q keeps the method
lossless, a closer one is only accepted more often); `rejection_sample` accepts proposal
j with probability min(1, p_j(d_j) / q_j(d_j)) (greedy rows: when it is the target's
argmax) and draws the token after the accepted run from normalize(max(p - q, 0)) at a
rejection, else from p: emitted tokens are distributed as the target's own samples. A
row without proposals samples exactly as `sample` does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Float32, Int32, UInt32

from pallas_kernels.array_types import pytree_dataclass

# Folded into a sequence's (seed, output position) key so that the draft's samples and
# the acceptance draws are independent of the target's own sampling noise.
DRAFT_SALT = 0x5D
ACCEPT_SALT = 0xAC


@pytree_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Per-sequence sampling parameters (host arrays when packed, device arrays in the step)."""

    temperature: Float32[ArrayLike, "seqs"]         # 0 = greedy
    top_k: Int32[ArrayLike, "seqs"]                 # 0 = off
    top_p: Float32[ArrayLike, "seqs"]               # 1 = off
    min_p: Float32[ArrayLike, "seqs"]               # 0 = off
    repetition_penalty: Float32[ArrayLike, "seqs"]  # 1 = off
    presence_penalty: Float32[ArrayLike, "seqs"]
    frequency_penalty: Float32[ArrayLike, "seqs"]
    seeds: UInt32[ArrayLike, "seqs"]
    sample_index: Int32[ArrayLike, "seqs"]          # number of output tokens so far (noise position)
    top_n: Int32[ArrayLike, "seqs"]                 # top alternatives wanted (0 = none)


@pytree_dataclass
@dataclasses.dataclass
class SampleOutput:
    """Per row: its sampled token(s); ``emitted`` is () for one token a row, (N,) where a
    row may emit several (decode steps, verified proposals + 1)."""

    token_ids: Int32[Array, "seqs *emitted"]
    logprobs: Float32[Array, "seqs *emitted"]           # of the sampled token (model distribution)
    top_ids: Int32[Array, "seqs *emitted top"]
    top_logprobs: Float32[Array, "seqs *emitted top"]
    # Tokens each row emits, for outputs of [S, N] (verified proposals + 1).
    num_tokens: Int32[Array, "seqs"] | None = None


def apply_penalties(logits: Float[Array, "seqs vocab"], prompt_mask: Bool[Array, "seqs vocab"],
                    output_counts: Int32[Array, "seqs vocab"], params: SamplingBatch) -> Float[Array, "seqs vocab"]:
    """Repetition, frequency and presence penalties of each row's counted tokens."""
    seen = prompt_mask | (output_counts > 0)
    rep = params.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    counts = output_counts.astype(jnp.float32)
    logits = logits - params.frequency_penalty[:, None] * counts
    logits = logits - params.presence_penalty[:, None] * (counts > 0)
    return logits


def truncation_mask(logits: Float[Array, "seqs vocab"], params: SamplingBatch) -> Bool[Array, "seqs vocab"]:
    """Boolean [S, V]: tokens allowed by top-k, top-p and min-p (on temperature-scaled logits)."""
    vocab = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)[:, None]
    sorted_logits = jnp.where(rank < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (rank < k) & ((mass_before < params.top_p[:, None]) | (params.top_p[:, None] >= 1.0))
    keep = keep & (probs >= params.min_p[:, None] * probs[:, :1])
    keep = keep.at[:, 0].set(True)
    # The smallest kept logit is the threshold for the unsorted row.
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return logits >= threshold


def _penalized(logits, count_rows, params: SamplingBatch):
    """Penalties applied, skipped at run time when no row asks for them. ``count_rows()``
    -> (prompt_mask, output_counts) rows [S, V], built only when needed."""
    penalized = ((params.repetition_penalty != 1.0) | (params.presence_penalty != 0.0)
                 | (params.frequency_penalty != 0.0))
    return jax.lax.cond(jnp.any(penalized), lambda x: apply_penalties(x, *count_rows(), params),
                        lambda x: x, logits)


def _scaled(logits, params: SamplingBatch):
    """Temperature, then top-k / top-p / min-p: the logits a sampled row draws from.
    Truncation needs a sort over the vocabulary, the costliest part of sampling: it is
    skipped (at run time) when no sampled row asks for top-k, top-p or min-p."""
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits / temperature
    truncates = (params.temperature > 0) & ((params.top_k > 0) | (params.top_p < 1.0) | (params.min_p > 0.0))
    return jax.lax.cond(jnp.any(truncates), lambda x: jnp.where(truncation_mask(x, params), x, -jnp.inf),
                        lambda x: x, scaled)


def _row_keys(seeds, positions, salt=None):
    """One PRNG key per (seed, output position[, salt]); seeds and positions broadcast."""
    def one(seed, position):
        key = jax.random.fold_in(jax.random.key(seed), position)
        return key if salt is None else jax.random.fold_in(key, salt)
    seeds, positions = jnp.broadcast_arrays(seeds, positions)
    return jax.vmap(one)(seeds.reshape(-1), positions.reshape(-1)).reshape(seeds.shape)


def _draw(scaled, greedy, params: SamplingBatch, positions, salt=None):
    """Gumbel-max draws from ``scaled`` [S, V] for rows with temperature > 0, ``greedy``
    [S] for the others; the [S, V] of noise is skipped (at run time) when every row is greedy."""
    def with_sampling(scaled):
        keys = _row_keys(params.seeds, positions, salt)
        noise = jax.vmap(lambda key: jax.random.gumbel(key, (scaled.shape[-1],), jnp.float32))(keys)
        sampled = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
        return jnp.where(params.temperature > 0, sampled, greedy)

    return jax.lax.cond(jnp.any(params.temperature > 0), with_sampling, lambda _: greedy, scaled)


def _top_logprobs(model_logprobs, params: SamplingBatch, num_top_logprobs: int):
    """(values, ids) [..., num_top_logprobs] of the model's best tokens, skipped (zeros) at
    run time when no row asks for alternatives."""
    shape = model_logprobs.shape[:-1] + (num_top_logprobs,)
    if num_top_logprobs == 0:
        return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32)

    def top(x):
        values, ids = jax.lax.top_k(x, num_top_logprobs)
        return values, ids.astype(jnp.int32)

    return jax.lax.cond(jnp.any(params.top_n > 0), top,
                        lambda x: (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32)), model_logprobs)


def _token_logprobs(model_logprobs, tokens):
    return jnp.take_along_axis(model_logprobs, tokens[..., None], axis=-1)[..., 0]


def sample(logits: Float32[Array, "seqs vocab"], prompt_mask: Bool[Array, "count_rows vocab"],
           output_counts: Int32[Array, "count_rows vocab"], slots: Int32[Array, "seqs"], params: SamplingBatch,
           num_top_logprobs: int) -> SampleOutput:
    """logits [S, V] float32 -> sampled tokens and logprobs.

    prompt_mask / output_counts are the device-wide count rows; ``slots`` [S] picks each
    sequence's row. Work that no row of the batch needs (penalties, truncation, top-n
    alternatives) is skipped at run time with lax.cond."""
    model_logprobs = jax.nn.log_softmax(logits, axis=-1)
    logits = _penalized(logits, lambda: (prompt_mask[slots], output_counts[slots]), params)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens = _draw(_scaled(logits, params), greedy, params, params.sample_index)
    top_logprobs, top_ids = _top_logprobs(model_logprobs, params, num_top_logprobs)
    return SampleOutput(tokens, _token_logprobs(model_logprobs, tokens), top_ids, top_logprobs)


def sample_proposal(logits: Float32[Array, "seqs vocab"], params: SamplingBatch, positions: Int32[Array, "seqs"]
                    ) -> tuple[Int32[Array, "seqs"], Float32[Array, "seqs vocab"]]:
    """The draft's proposal and the distribution q it was drawn from: logits [S, V] ->
    (tokens [S], q [S, V]). Greedy rows take the argmax (q is then unused)."""
    scaled = _scaled(logits, params)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _draw(scaled, greedy, params, positions, DRAFT_SALT), jax.nn.softmax(scaled, axis=-1)


def rejection_sample(logits: Float32[Array, "seqs positions vocab"], proposals: Int32[Array, "seqs positions-1"],
                     draft_probs: Float32[Array, "seqs positions-1 vocab"], num_proposals: Int32[Array, "seqs"],
                     prompt_mask: Bool[Array, "count_rows vocab"], output_counts: Int32[Array, "count_rows vocab"],
                     slots: Int32[Array, "seqs"], params: SamplingBatch, num_top_logprobs: int) -> SampleOutput:
    """Verifies each row's proposals against the target (see the module docstring).

    logits [S, K+1, V]: the target's logits after the row's last known token and after
    each of its proposals; proposals [S, K]; draft_probs [S, K, V] the q each proposal
    was drawn from; num_proposals [S] (positions past it are ignored; 0: a plain row).
    Returns tokens [S, K+1] (the accepted proposals, then the correction or bonus token,
    then zeros) and num_tokens [S] = accepted + 1."""
    num_rows, k1, vocab = logits.shape
    k = k1 - 1
    model_logprobs = jax.nn.log_softmax(logits, axis=-1)
    row_params = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k1, axis=0), params)

    def count_rows():
        # Position j sees the row's counted tokens plus its proposals before j, as the
        # target would have seen them had it generated them one at a time.
        onehot = jax.nn.one_hot(proposals, vocab, dtype=jnp.int32)  # [S, K, V]
        before = jnp.concatenate([jnp.zeros((num_rows, 1, vocab), jnp.int32), jnp.cumsum(onehot, axis=1)], axis=1)
        counts = (output_counts[slots][:, None, :] + before).reshape(num_rows * k1, vocab)
        return jnp.repeat(prompt_mask[slots], k1, axis=0), counts

    flat = _penalized(logits.reshape(num_rows * k1, vocab), count_rows, row_params)
    greedy = jnp.argmax(flat, axis=-1).astype(jnp.int32).reshape(num_rows, k1)
    rows = jnp.arange(num_rows)
    proposed = jnp.arange(k)[None, :] < num_proposals[:, None]
    greedy_accept = proposals == greedy[:, :k]  # greedy rows: the target's argmax

    def accepted_run(accept):
        return jnp.sum(jnp.cumprod((accept & proposed).astype(jnp.int32), axis=1), axis=1)  # [S]

    def with_sampling(_):
        scaled = _scaled(flat, row_params).reshape(num_rows, k1, vocab)
        target_probs = jax.nn.softmax(scaled, axis=-1)
        # Acceptance: u < p/q, written without the division (q(d) > 0 for a token drawn from q).
        positions = params.sample_index[:, None] + jnp.arange(k)[None, :]  # output position of each proposal
        p_d = jnp.take_along_axis(target_probs[:, :k], proposals[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(draft_probs, proposals[..., None], axis=-1)[..., 0]
        uniform = jax.vmap(jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32)))(
            _row_keys(params.seeds[:, None], positions, ACCEPT_SALT))
        num_accepted = accepted_run(jnp.where((params.temperature <= 0)[:, None], greedy_accept, uniform * q_d < p_d))
        # The token after the accepted run: at a rejection from the residual max(p - q, 0),
        # else (every proposal accepted, or none made) from p as `sample` draws it.
        residual = jnp.maximum(target_probs[rows, num_accepted]
                               - draft_probs[rows, jnp.minimum(num_accepted, k - 1)], 0.0)
        # p == q (up to rounding) leaves no residual mass; rejection then had probability ~0.
        from_residual = (num_accepted < num_proposals) & (jnp.sum(residual, axis=-1) > 0)
        last_scaled = jnp.where(from_residual[:, None], jnp.log(residual), scaled[rows, num_accepted])
        return num_accepted, _draw(last_scaled, greedy[rows, num_accepted], params, params.sample_index + num_accepted)

    def greedy_only(_):
        num_accepted = accepted_run(greedy_accept)
        return num_accepted, greedy[rows, num_accepted]

    # The distributions over the vocabulary are skipped (at run time) when every row is greedy.
    num_accepted, last = jax.lax.cond(jnp.any(params.temperature > 0), with_sampling, greedy_only, None)

    slot = jnp.arange(k1)[None, :]
    padded = jnp.concatenate([proposals, jnp.zeros((num_rows, 1), jnp.int32)], axis=1)
    tokens = jnp.where(slot < num_accepted[:, None], padded, jnp.where(slot == num_accepted[:, None], last[:, None], 0))
    top_logprobs, top_ids = _top_logprobs(model_logprobs, params, num_top_logprobs)
    return SampleOutput(tokens, _token_logprobs(model_logprobs, tokens), top_ids, top_logprobs,
                        num_tokens=(num_accepted + 1).astype(jnp.int32))
