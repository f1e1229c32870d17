"""Property tests of the host-side block manager."""

import pytest
from hypothesis import given, settings, strategies as st

from lmidist_jax.engine.block_manager import BlockManager, NoFreeBlocksError

BS = 4


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "grow", "free", "cache"]),
                          st.integers(0, 7), st.integers(1, 40)), max_size=60),
       st.booleans())
def test_block_manager_invariants(ops, prefix_caching):
    bm = BlockManager(num_blocks=24, block_size=BS, enable_prefix_caching=prefix_caching)
    seqs = {}  # id -> (tokens, blocks)
    for op, sid, n in ops:
        if op == "new" and sid not in seqs:
            tokens = [t % 3 for t in range(n)]  # few distinct prefixes -> cache hits
            blocks = []
            cached = bm.match_prefix(tokens, blocks)
            assert cached % BS == 0 and cached < len(tokens)
            try:
                bm.allocate(blocks, len(tokens))
            except NoFreeBlocksError:
                bm.free(blocks)
                continue
            seqs[sid] = (tokens, blocks)
        elif op == "grow" and sid in seqs:
            tokens, blocks = seqs[sid]
            tokens.extend([n % 3] * n)
            try:
                bm.allocate(blocks, len(tokens))
            except NoFreeBlocksError:
                del tokens[-n:]
        elif op == "cache" and sid in seqs:
            tokens, blocks = seqs[sid]
            bm.cache_full_blocks(tokens, blocks, len(tokens))
        elif op == "free" and sid in seqs:
            bm.free(seqs.pop(sid)[1])
        for tokens, blocks in seqs.values():
            assert len(blocks) * BS >= len(tokens)
        bm.check_invariants([b for _, b in seqs.values()])
    for _, blocks in seqs.values():
        bm.free(blocks)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks - 1


def test_prefix_cache_shares_full_blocks_only():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = list(range(10))
    blocks_a = []
    bm.allocate(blocks_a, len(a))
    bm.cache_full_blocks(a, blocks_a, len(a))  # 2 full blocks cached
    blocks_b = []
    assert bm.match_prefix(a[:9] + [99], blocks_b) == 8
    assert blocks_b == blocks_a[:2]
    assert bm.ref_counts[blocks_a[0]] == 2
    bm.free(blocks_a)
    bm.free(blocks_b)
    # Freed cached blocks stay matchable until evicted.
    blocks_c = []
    assert bm.match_prefix(a, blocks_c) == 8
    bm.free(blocks_c)
    bm.check_invariants([])


def test_block_zero_is_never_handed_out():
    bm = BlockManager(num_blocks=5, block_size=BS)
    blocks = []
    bm.allocate(blocks, 4 * BS)
    assert sorted(blocks) == [1, 2, 3, 4]
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(blocks, 5 * BS)
