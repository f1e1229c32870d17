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


def prompt_logits(model: LoadedModel, token_ids, block_size: int = 16, encoder_token_ids=None) -> np.ndarray:
    """token_ids [L] -> float32 logits [L, vocab] (position i predicts token i+1).
    Encoder-decoder models: ``encoder_token_ids`` (the prompt) go through the encoder and
    ``token_ids`` are the decoder's inputs (from decoder_start_token_id)."""
    spec = model.spec
    ids = np.asarray(token_ids, np.int32)
    length = len(ids)
    num_blocks = -(-length // block_size)
    cross = spec.is_encoder_decoder
    if cross != (encoder_token_ids is not None):
        raise ValueError("encoder_token_ids are needed for, and only for, encoder-decoder models")
    encoder_len = len(encoder_token_ids) if cross else 0
    num_cross_blocks = -(-encoder_len // block_size)
    width = max(num_blocks, num_cross_blocks)
    # Blocks 1..n (block 0 is the trash block by convention), then the encoder's cross blocks.
    builder = StepMetadataBuilder(length, 1, width, block_size, cross=cross)
    builder.add_sequence(0, np.arange(1, num_blocks + 1), 0, length)
    cross_blocks = np.arange(num_blocks + 1, num_blocks + 1 + num_cross_blocks)
    encoder = None
    if cross:
        builder.add_cross(0, cross_blocks, encoder_len)
        encoder_builder = StepMetadataBuilder(encoder_len, 1, width, block_size)
        encoder_builder.add_sequence(0, cross_blocks, 0, encoder_len)
        encoder = (jnp.asarray(np.asarray(encoder_token_ids, np.int32)), encoder_builder.build())
    md = builder.build()
    total = num_blocks + num_cross_blocks + 1
    shapes = [(spec.layer_kv_heads(i), total, block_size, spec.head_dim) for i in range(spec.num_layers)]
    kv = [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype)) for shape in shapes]

    @jax.jit
    def run(state, kv, ids, md, encoder):
        from flax import nnx

        module = nnx.merge(model.graphdef, state)
        if encoder is not None:
            kv = module.encode(encoder[0], kv, encoder[1])
        hidden, _ = module(ids, kv, md)
        return module.logits(hidden, md)

    return np.asarray(run(model.state, kv, jnp.asarray(ids), md, encoder))
