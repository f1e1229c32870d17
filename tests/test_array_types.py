"""The array boundaries' jaxtyping annotations are checked when the suite runs
(tests/conftest.py installs jaxtyping's import hook with beartype): a wrong shape fails
with jaxtyping's message naming the dimension. Also: the typed step dataclasses stay
ordinary pytrees."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from jaxtyping import TypeCheckError

from lmidist_jax.engine.sampler import SamplingBatch, sample
from lmidist_jax.models.layers import Norm
from lmidist_jax.models.step_metadata import StepMetadata
from pallas_kernels import reference


def _metadata(num_tokens=4, num_seqs=2, max_blocks=3, slot_tokens=None):
    i32 = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    return StepMetadata(positions=i32(num_tokens), slot_mapping=i32(slot_tokens or num_tokens),
                        token_seq_ids=i32(num_tokens), block_tables=i32(num_seqs, max_blocks),
                        seq_lens=i32(num_seqs), logits_indices=i32(num_seqs))


def test_step_metadata_with_a_wrong_shape_names_the_dimension():
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'slot_mapping'.*tokens=4"):
        _metadata(num_tokens=4, slot_tokens=3)
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'positions'.*Actual value: f32\[4\].*Int32\[Array, 'tokens'\]"):
        StepMetadata(np.zeros(4, np.float32), *(np.zeros(4, np.int32),) * 2, np.zeros((2, 3), np.int32),
                     np.zeros(2, np.int32), np.zeros(2, np.int32))


def test_layer_with_a_wrong_shape_names_the_dimension():
    norm = Norm(8, norm_type="rms", eps=1e-6)
    x = jnp.ones((4, 8))
    assert norm.add_and_norm(x, jnp.ones((4, 8)))[1].shape == (4, 8)
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'delta'.*tokens=4"):
        norm.add_and_norm(x, jnp.ones((5, 8)))


def test_kernel_reference_with_a_wrong_shape_names_the_dimension():
    pages = jnp.zeros((2, 4, 4, 8))  # [kv_heads, num_blocks, block_size, head_dim]
    new = jnp.ones((3, 2, 8))        # [tokens, kv_heads, head_dim]
    slots = jnp.array([5, 6, 9], jnp.int32)
    k, _ = reference.write_kv_pages(pages, pages, new, new, slots)
    assert float(k.sum()) == 3 * 2 * 8
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'slot_mapping'.*tokens=3"):
        reference.write_kv_pages(pages, pages, new, new, jnp.arange(5, dtype=jnp.int32))
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'k_new'.*head_dim=8"):
        reference.write_kv_pages(pages, pages, jnp.ones((3, 2, 16)), new, slots)


def test_sampler_with_a_wrong_vocabulary_names_the_dimension():
    seqs, vocab = 2, 8
    f32 = lambda value: np.full(seqs, value, np.float32)  # noqa: E731
    i32 = lambda value: np.full(seqs, value, np.int32)  # noqa: E731
    params = SamplingBatch(f32(0), i32(0), f32(1), f32(0), f32(1), f32(0), f32(0), np.zeros(seqs, np.uint32),
                           i32(0), i32(0))
    logits, slots = jnp.ones((seqs, vocab)), jnp.arange(seqs, dtype=jnp.int32)
    counts = jnp.zeros((3, vocab), jnp.int32)
    assert sample(logits, counts > 0, counts, slots, params, 2).token_ids.shape == (seqs,)
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'prompt_mask'.*vocab=8"):
        sample(logits, jnp.zeros((3, 16), bool), counts, slots, params, 2)
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'top_k'.*Actual value: f32\[2\].*Int32\[ndarray, 'seqs'\]"):
        dataclasses.replace(params, top_k=f32(0))


def test_typed_dataclasses_stay_pytrees():
    """JAX unflattens with leaves of any kind (here shardings); only a construction by code
    is checked, so flattening, tree_map and jit see an ordinary pytree."""
    md = _metadata()
    specs = jax.tree_util.tree_map(lambda _: PartitionSpec(), md)
    assert isinstance(specs, StepMetadata) and specs.positions == PartitionSpec()
    leaves, treedef = jax.tree_util.tree_flatten(md)
    assert len(leaves) == 6 and jax.tree_util.tree_unflatten(treedef, leaves).backend == "xla"
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(md)[0]]
    assert paths[0] == ".positions"
    out = jax.jit(lambda m: m.decode_step(m.logits_indices, m.seq_lens + 1, m.seq_lens >= 0, 4))(md)
    assert out.decode_only and out.positions.shape == (2,)
