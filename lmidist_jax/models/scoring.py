"""Whole-prompt forward pass of one sequence, returning logits for every position.

For checks against other implementations and for scoring text in notebooks; the
serving path never uses it (it runs inside the engine's bucketed step instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .loader import LoadedModel
from .step_metadata import StepMetadataBuilder


def prompt_logits(model: LoadedModel, token_ids, block_size: int = 16) -> np.ndarray:
    """token_ids [L] -> float32 logits [L, vocab] (position i predicts token i+1)."""
    spec = model.spec
    ids = np.asarray(token_ids, np.int32)
    length = len(ids)
    num_blocks = -(-length // block_size)
    # Blocks 1..n (block 0 is the trash block by convention).
    builder = StepMetadataBuilder(length, 1, num_blocks, block_size)
    builder.add_sequence(0, np.arange(1, num_blocks + 1), 0, length)
    md = builder.build()
    shapes = [(spec.layer_kv_heads(i), num_blocks + 1, block_size, spec.head_dim) for i in range(spec.num_layers)]
    kv = [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype)) for shape in shapes]

    @jax.jit
    def run(state, kv, ids, md):
        from flax import nnx

        module = nnx.merge(model.graphdef, state)
        hidden, _ = module(ids, kv, md)
        return module.logits(hidden, md)

    return np.asarray(run(model.state, kv, jnp.asarray(ids), md))
