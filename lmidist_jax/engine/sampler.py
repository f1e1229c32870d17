"""On-device sampling, run inside the jitted step.

Order: penalties (repetition on prompt+output tokens, presence/frequency on output
tokens) -> temperature -> top-k -> top-p -> min-p -> Gumbel-max sample. Rows with
temperature 0 take the argmax of the penalized logits. Each row draws its noise from
its own key (request seed, output position), so a request's samples do not depend on
what else is in the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Per-sequence sampling parameters, [S] each."""

    temperature: jax.Array       # f32, 0 = greedy
    top_k: jax.Array             # i32, 0 = off
    top_p: jax.Array             # f32, 1 = off
    min_p: jax.Array             # f32, 0 = off
    repetition_penalty: jax.Array  # f32, 1 = off
    presence_penalty: jax.Array  # f32
    frequency_penalty: jax.Array  # f32
    seeds: jax.Array             # u32
    sample_index: jax.Array      # i32 number of output tokens so far (noise position)
    top_n: jax.Array             # i32 top alternatives wanted (0 = none)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    token_ids: jax.Array     # [S] i32
    logprobs: jax.Array      # [S] f32 logprob of the sampled token (model distribution)
    top_ids: jax.Array       # [S, K] i32
    top_logprobs: jax.Array  # [S, K] f32


def apply_penalties(logits, prompt_mask, output_counts, params: SamplingBatch):
    """logits [S, V]; prompt_mask [S, V] bool; output_counts [S, V] int32."""
    seen = prompt_mask | (output_counts > 0)
    rep = params.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    counts = output_counts.astype(jnp.float32)
    logits = logits - params.frequency_penalty[:, None] * counts
    logits = logits - params.presence_penalty[:, None] * (counts > 0)
    return logits


def truncation_mask(logits, params: SamplingBatch):
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


def sample(logits, prompt_mask, output_counts, slots, params: SamplingBatch,
           num_top_logprobs: int) -> SampleOutput:
    """logits [S, V] float32 -> sampled tokens and logprobs.

    prompt_mask / output_counts are the device-wide count rows; ``slots`` [S] picks each
    sequence's row. Work that no row of the batch needs (penalties, truncation, top-n
    alternatives) is skipped at run time with lax.cond."""
    model_logprobs = jax.nn.log_softmax(logits, axis=-1)
    penalized = ((params.repetition_penalty != 1.0) | (params.presence_penalty != 0.0)
                 | (params.frequency_penalty != 0.0))
    logits = jax.lax.cond(
        jnp.any(penalized),
        lambda x: apply_penalties(x, prompt_mask[slots], output_counts[slots], params),
        lambda x: x,
        logits)
    greedy_tokens = jnp.argmax(logits, axis=-1)

    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits / temperature
    # Truncation needs a sort over the vocabulary, the costliest part of sampling:
    # skip it (at run time) when no sampled row asks for top-k, top-p or min-p.
    truncates = (params.temperature > 0) & ((params.top_k > 0) | (params.top_p < 1.0) | (params.min_p > 0.0))
    scaled = jax.lax.cond(
        jnp.any(truncates),
        lambda x: jnp.where(truncation_mask(x, params), x, -jnp.inf),
        lambda x: x,
        scaled)

    def row_noise(seed, index):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.gumbel(key, (logits.shape[-1],), jnp.float32)

    def with_sampling(scaled):
        noise = jax.vmap(row_noise)(params.seeds, params.sample_index)
        sampled = jnp.argmax(scaled + noise, axis=-1)
        return jnp.where(params.temperature > 0, sampled, greedy_tokens).astype(jnp.int32)

    # [S, V] of noise per step is skipped (at run time) when every row is greedy.
    tokens = jax.lax.cond(jnp.any(params.temperature > 0), with_sampling,
                          lambda _: greedy_tokens.astype(jnp.int32), scaled)
    token_logprobs = jnp.take_along_axis(model_logprobs, tokens[:, None], axis=-1)[:, 0]
    num_rows = logits.shape[0]
    if num_top_logprobs > 0:
        def top(x):
            values, ids = jax.lax.top_k(x, num_top_logprobs)
            return values, ids.astype(jnp.int32)

        def no_top(x):
            return (jnp.zeros((num_rows, num_top_logprobs), jnp.float32),
                    jnp.zeros((num_rows, num_top_logprobs), jnp.int32))

        top_logprobs, top_ids = jax.lax.cond(jnp.any(params.top_n > 0), top, no_top, model_logprobs)
    else:
        top_logprobs = jnp.zeros((num_rows, 0), jnp.float32)
        top_ids = jnp.zeros((num_rows, 0), jnp.int32)
    return SampleOutput(tokens, token_logprobs, top_ids, top_logprobs)
