"""The step's metadata (an explicit pytree argument of the jitted step, never a global)
and the one place that assembles it on the host.

It says where each token of a step sits in the paged cache, and carries any other
per-token context a layer may need (a linear kind reads it through ``proj(x, md)``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Bool, Int32

from pallas_kernels.array_types import pytree_dataclass


@pytree_dataclass
@dataclasses.dataclass
class StepMetadata:
    """tokens = the token bucket T, seqs = the sequence bucket S, max_blocks = block-table
    columns W. Host (numpy) or device arrays. Padding tokens write into trash block 0;
    their outputs are never read."""

    positions: Int32[ArrayLike, "tokens"]       # absolute position of each token
    slot_mapping: Int32[ArrayLike, "tokens"]    # flat KV slot written by each token
    token_seq_ids: Int32[ArrayLike, "tokens"]   # row of block_tables for each token
    block_tables: Int32[ArrayLike, "seqs max_blocks"]
    seq_lens: Int32[ArrayLike, "seqs"]          # context length after this step (0 for padding)
    # The token index whose logits each sequence samples from (a verify row: its last
    # known token; its proposals follow it).
    logits_indices: Int32[ArrayLike, "seqs"]
    # LoRA adapter slot of each token (0 = none); None when LoRA is off.
    lora_slots: Int32[ArrayLike, "tokens"] | None = None
    # Encoder-decoder models (T5): each sequence's cross-attention K/V blocks (its second
    # block table) and its encoder length (0 for padding); None for decoder-only models.
    cross_block_tables: Int32[ArrayLike, "seqs max_blocks"] | None = None
    cross_lens: Int32[ArrayLike, "seqs"] | None = None
    # Static: every token is a decode query, attending through the decode kernel to its
    # sequence's keys up to its own position: a step of decode rows only (one token per
    # sequence, T == S, or a verify step: a sequence's last token and its draft's
    # proposals, each its own query). Steps with a prefill chunk run the mixed kernel.
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))
    backend: str = dataclasses.field(default="xla", metadata=dict(static=True))
    # Static: a pass with no KV cache (the model is called with None caches) attends among
    # the step's own tokens: causally (True: a training forward over a padded batch, see
    # `padded_batch_metadata`) or bidirectionally (False: an encoder pass).
    dense_causal: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def decode_queries(self, block_size: int) -> tuple[Int32[ArrayLike, "tokens max_blocks"],
                                                       Int32[ArrayLike, "tokens"]]:
        """(block_tables [T, W], context lengths [T]) of each token as its own decode query:
        its sequence's table and its position + 1 (0 for padding, which writes into
        trash block 0). For one token per sequence, the rows' own tables and seq_lens."""
        is_padding = self.slot_mapping < block_size
        return self.block_tables[self.token_seq_ids], jnp.where(is_padding, 0, self.positions + 1)

    def decode_step(self, token_index: Int32[ArrayLike, "seqs"], seq_lens: Int32[ArrayLike, "seqs"],
                    active: Bool[ArrayLike, "seqs"], block_size: int) -> StepMetadata:
        """The metadata of one decode token per row, computed on the device: row i's token
        sits at position seq_lens[i] - 1 and writes its K/V there (``active`` False: a
        padding row, writing into trash block 0). For the loops inside a step (several
        decode steps; the draft's proposals). ``token_index`` [S]: the token of this
        step each row continues (its LoRA slot carries over)."""
        rows = jnp.arange(seq_lens.shape[0], dtype=jnp.int32)
        positions = jnp.maximum(seq_lens - 1, 0)
        blocks = jnp.take_along_axis(self.block_tables, (positions // block_size)[:, None], axis=1)[:, 0]
        return dataclasses.replace(
            self, positions=positions, seq_lens=jnp.where(active, seq_lens, 0), token_seq_ids=rows,
            slot_mapping=jnp.where(active, blocks * block_size + positions % block_size, 0), logits_indices=rows,
            lora_slots=None if self.lora_slots is None else self.lora_slots[token_index], decode_only=True)


def padded_batch_metadata(lengths, seq_len: int, lora_slot: int | None = None) -> StepMetadata:
    """The metadata of a padded batch [B, seq_len] of whole sequences flattened to
    T = B * seq_len tokens (row b holds its ``lengths[b]`` tokens first, then padding),
    for a forward with no cache and dense causal attention (a training forward). Padding
    tokens have token_seq_ids -1 (no token sees them). ``lora_slot``: every token uses
    that adapter slot; None: no LoRA."""
    lengths = np.asarray(lengths, np.int32)
    num_seqs = len(lengths)
    if np.any(lengths < 1) or np.any(lengths > seq_len):
        raise ValueError(f"sequence lengths must lie in 1..{seq_len}, got {lengths.tolist()}")
    positions = np.tile(np.arange(seq_len, dtype=np.int32), num_seqs)
    rows = np.repeat(np.arange(num_seqs, dtype=np.int32), seq_len)
    token_seq_ids = np.where(positions < lengths[rows], rows, -1).astype(np.int32)
    num_tokens = num_seqs * seq_len
    lora_slots = None if lora_slot is None else np.full(num_tokens, lora_slot, np.int32)
    return StepMetadata(positions, np.zeros(num_tokens, np.int32), token_seq_ids,
                        np.zeros((num_seqs, 1), np.int32), lengths,
                        np.arange(num_seqs, dtype=np.int32) * seq_len + lengths - 1,
                        lora_slots=lora_slots, dense_causal=True)


class StepMetadataBuilder:
    """Fills the metadata of a step of ``num_tokens`` x ``num_seqs`` (padding included)
    one sequence at a time; what is not filled stays padding."""

    def __init__(self, num_tokens: int, num_seqs: int, max_blocks: int, block_size: int,
                 lora: bool = False, cross: bool = False):
        self.block_size = block_size
        self.cross_block_tables = np.zeros((num_seqs, max_blocks), np.int32) if cross else None
        self.cross_lens = np.zeros(num_seqs, np.int32) if cross else None
        self.lora_slots = np.zeros(num_tokens, np.int32) if lora else None
        self.positions = np.zeros(num_tokens, np.int32)
        self.slot_mapping = np.zeros(num_tokens, np.int32)  # padding writes into trash block 0
        self.token_seq_ids = np.full(num_tokens, num_seqs - 1, np.int32)
        self.block_tables = np.zeros((num_seqs, max_blocks), np.int32)
        self.seq_lens = np.zeros(num_seqs, np.int32)
        self.logits_indices = np.zeros(num_seqs, np.int32)
        self.num_tokens = 0  # tokens filled so far

    def add_sequence(self, row: int, block_ids, start: int, count: int, num_proposals: int = 0) -> slice:
        """Sequence ``row`` computes positions start .. start + count - 1 (its KV blocks
        are ``block_ids``); returns the slice of this step's tokens it occupies. The last
        ``num_proposals`` of them are draft proposals, filled in on the device: the row
        samples after its last known token."""
        t, bs = self.num_tokens, self.block_size
        pos = np.arange(start, start + count, dtype=np.int32)
        blocks = np.asarray(block_ids, np.int32)
        self.positions[t:t + count] = pos
        self.slot_mapping[t:t + count] = blocks[pos // bs] * bs + pos % bs
        self.token_seq_ids[t:t + count] = row
        self.block_tables[row, :len(blocks)] = blocks
        self.seq_lens[row] = start + count
        self.logits_indices[row] = t + count - 1 - num_proposals
        self.num_tokens = t + count
        return slice(t, t + count)

    def add_cross(self, row: int, cross_block_ids, encoder_len: int) -> None:
        """Sequence ``row`` reads its encoder's K/V (``encoder_len`` tokens) from ``cross_block_ids``."""
        self.cross_block_tables[row, :len(cross_block_ids)] = np.asarray(cross_block_ids, np.int32)
        self.cross_lens[row] = encoder_len

    def build(self, *, decode_only: bool = False, backend: str = "xla") -> StepMetadata:
        return StepMetadata(self.positions, self.slot_mapping, self.token_seq_ids, self.block_tables,
                            self.seq_lens, self.logits_indices, lora_slots=self.lora_slots,
                            cross_block_tables=self.cross_block_tables, cross_lens=self.cross_lens,
                            decode_only=decode_only, backend=backend)
