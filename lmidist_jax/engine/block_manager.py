"""Host-side bookkeeping of the paged KV cache: which blocks each sequence holds,
reference counts, and the automatic prefix cache (full blocks keyed by a hash of
their tokens and of everything before them).

Block 0 is never handed out: padding tokens of a fixed-shape batch write into it.
"""

from __future__ import annotations

import collections
from typing import Sequence as Seq


class NoFreeBlocksError(RuntimeError):
    """Not enough free KV blocks; the scheduler preempts instead of letting this escape."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need at least 2 (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Blocks with refcount 0 and no cached content, handed out first.
        self._free: collections.deque[int] = collections.deque(range(1, num_blocks))
        # Blocks with refcount 0 that still hold a cached prefix, in LRU order.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}

    # -- queries ---------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - self.num_free_blocks

    def blocks_needed(self, block_ids: Seq[int], num_tokens: int) -> int:
        """Extra blocks a sequence holding ``block_ids`` needs to store num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(block_ids))

    # -- allocation ------------------------------------------------------------

    def _take_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._uncache(block)
        else:
            raise NoFreeBlocksError("out of KV cache blocks")
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def _uncache(self, block: int) -> None:
        h = self._block_to_hash.pop(block, None)
        if h is not None and self._hash_to_block.get(h) == block:
            del self._hash_to_block[h]

    def allocate(self, block_ids: list[int], num_tokens: int) -> None:
        """Grow ``block_ids`` in place so it can hold num_tokens tokens."""
        needed = self.blocks_needed(block_ids, num_tokens)
        if needed > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {needed} blocks, {self.num_free_blocks} free")
        for _ in range(needed):
            block_ids.append(self._take_block())

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block (in reverse, so a prefix's tail is evicted first)."""
        for block in reversed(block_ids):
            assert self.ref_counts[block] > 0, f"double free of block {block}"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self._block_to_hash:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_ids.clear()

    # -- prefix caching ---------------------------------------------------------

    @staticmethod
    def root_hash(extra_key=None) -> int:
        """Start of a sequence's hash chain: 0, or a hash of what else its KV depends on
        (its LoRA adapter), so that sequences computed differently never share blocks."""
        return 0 if extra_key is None else hash(("extra_key", extra_key))

    @staticmethod
    def block_hashes(token_ids: Seq[int], block_size: int, num_full_blocks: int, extra_key=None) -> list[int]:
        hashes, parent = [], BlockManager.root_hash(extra_key)
        for i in range(num_full_blocks):
            parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
            hashes.append(parent)
        return hashes

    def match_prefix(self, token_ids: Seq[int], block_ids: list[int], extra_key=None,
                     max_tokens: int | None = None) -> int:
        """For a sequence with no blocks yet: take the cached blocks of its longest cached
        prefix, of at most ``max_tokens`` tokens. Returns the number of tokens they cover.
        At least one token is always left to compute (its logits are needed)."""
        assert not block_ids
        if not self.enable_prefix_caching:
            return 0
        limit = len(token_ids) - 1 if max_tokens is None else min(max_tokens, len(token_ids) - 1)
        max_blocks = max(limit, 0) // self.block_size
        for h in self.block_hashes(token_ids, self.block_size, max_blocks, extra_key):  # noqa: B007
            block = self._hash_to_block.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1
            block_ids.append(block)
        return len(block_ids) * self.block_size

    def cache_full_blocks(self, token_ids: Seq[int], block_ids: Seq[int], num_computed_tokens: int,
                          hashes: list[int] | None = None, extra_key=None) -> None:
        """Register the full, computed blocks of a sequence in the prefix cache.

        ``hashes`` (the sequence's block-hash chain so far) is extended in place, so each
        block is hashed once in the sequence's life rather than at every step."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(min(num_computed_tokens, len(token_ids)) // bs, len(block_ids))
        if hashes is None:
            hashes = []
        start = len(hashes)
        parent = hashes[-1] if hashes else self.root_hash(extra_key)
        for i in range(start, num_full):
            parent = hash((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            hashes.append(parent)
        for i in range(start, num_full):
            h = hashes[i]
            block = block_ids[i]
            if block in self._block_to_hash:
                continue
            if h in self._hash_to_block:
                continue  # the same content is already cached in another block
            self._hash_to_block[h] = block
            self._block_to_hash[block] = h

    def check_invariants(self, held: Seq[Seq[int]] = ()) -> None:
        """Consistency check used by tests: counts match holders, no block is both free and used."""
        counts = [0] * self.num_blocks
        for blocks in held:
            for b in blocks:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts differ from the blocks sequences hold"
        free = set(self._free)
        evictable = set(self._evictable)
        assert len(free) == len(self._free) and not (free & evictable)
        assert 0 not in free and 0 not in evictable and self.ref_counts[0] == 0
        for b in range(1, self.num_blocks):
            assert (self.ref_counts[b] == 0) == (b in free or b in evictable), f"block {b} lost"
        assert all(self._block_to_hash.get(b) == h for h, b in self._hash_to_block.items())
