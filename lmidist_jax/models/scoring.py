"""Whole-prompt forward pass of one sequence, returning logits for every position.

For checks against other implementations and for scoring text in notebooks; the
serving path never uses it (it runs inside the engine's bucketed step instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .attention import AttentionMetadata
from .loader import LoadedModel


def prompt_logits(model: LoadedModel, token_ids, block_size: int = 16) -> np.ndarray:
    """token_ids [L] -> float32 logits [L, vocab] (position i predicts token i+1)."""
    spec = model.spec
    ids = np.asarray(token_ids, np.int32)
    length = len(ids)
    num_blocks = -(-length // block_size)
    # Blocks 1..n (block 0 is the trash block by convention).
    table = np.arange(1, num_blocks + 1, dtype=np.int32)
    pos = np.arange(length, dtype=np.int32)
    shape = (spec.num_kv_heads, num_blocks + 1, block_size, spec.head_dim)
    kv = [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype)) for _ in range(spec.num_layers)]
    md = AttentionMetadata(
        positions=jnp.asarray(pos), slot_mapping=jnp.asarray(table[pos // block_size] * block_size + pos % block_size),
        token_seq_ids=jnp.zeros(length, jnp.int32), block_tables=jnp.asarray(table[None]),
        seq_lens=jnp.asarray([length], jnp.int32), logits_indices=jnp.asarray([length - 1], jnp.int32))

    @jax.jit
    def run(state, kv, ids, md):
        from flax import nnx

        module = nnx.merge(model.graphdef, state)
        hidden, _ = module(ids, kv, md)
        return module.logits(hidden)

    return np.asarray(run(model.state, kv, jnp.asarray(ids), md))
