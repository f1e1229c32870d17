"""The phase-free scheduler: every sequence has ``num_computed_tokens``; a step gives
each scheduled sequence a number of new tokens under a token budget and a sequence
cap. One rule covers prefill, chunked prefill, decode, prefix-cache hits and
speculative verification: a decode row may also run its draft's proposals (spec
tokens), and `after_step` advances each sequence by what the step accepted.

FCFS. When KV blocks run out, the newest running sequence is preempted by recompute
(its blocks are freed; it goes back to the front of the queue and later recomputes
prompt + generated tokens). Nothing is ever dropped.

The budget rule (a long prompt never holds up a short one): decode rows always get
their token; a prompt's chunk takes what is left after the decode rows and the
shorter prompts that could run this step (running or waiting), but never less than
half of what is left after the decode rows. Alone, a prompt takes the whole budget.
Bound: the oldest prompt in prefill gets at least ceil((B - D) / 2) tokens per step
(B the budget, D <= max_num_seqs - 1 decode rows), so its prefill takes at most about
twice the steps it would alone; every prompt becomes the oldest in turn (newcomers are
younger), so none starves.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclasses.dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens token_ids[num_computed : num_computed + n] run this step
    # Encoder-decoder: the encoder prompt's tokens run before them this step (0: none).
    num_encoder_tokens: int = 0
    # Speculative decoding: positions after the known tokens that the draft fills with
    # proposals and the target verifies this step (their KV blocks are reserved).
    num_spec_tokens: int = 0

    @property
    def samples(self) -> bool:
        """Whether this step completes the sequence's known tokens, so its logits sample."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens_to_compute


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens + s.num_spec_tokens for s in self.scheduled)

    @property
    def num_encoder_tokens(self) -> int:
        return sum(s.num_encoder_tokens for s in self.scheduled)

    @property
    def is_decode_only(self) -> bool:
        # A scoring request's one new token is a prompt token whose successor's logprob is wanted.
        return all(s.num_new_tokens == 1 and s.samples and not s.num_encoder_tokens
                   and not s.seq.request.sampling_params.scores_only for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 num_slots: int | None = None, max_loras: int | None = None):
        self.block_manager = block_manager
        # At most this many distinct LoRA adapters among running sequences (None: no LoRA).
        self.max_loras = max_loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        # Device-side penalty-count rows, one per running sequence.
        self._free_slots = list(range(num_slots if num_slots is not None else max_num_seqs))[::-1]

    # -- queue management ------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks (publishing its full
        blocks to the prefix cache first)."""
        self.block_manager.cache_full_blocks(seq.token_ids, seq.block_ids, seq.num_computed_tokens,
                                             seq.block_hashes, extra_key=seq.request.prefix_cache_key)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_ids)
        self.block_manager.free(seq.cross_block_ids)  # the encoder reruns if it comes back
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- the scheduling rule -----------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        bm = self.block_manager

        # 1. Running sequences first, oldest first: decodes and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens_to_compute - seq.num_computed_tokens, budget,
                    self._chunk_limit(seq, budget, itertools.islice(self.running, i + 1, None),
                                      () if preempted else self.waiting, self.max_num_seqs - len(self.running)))
            while bm.blocks_needed(seq.block_ids, seq.num_computed_tokens + n) > bm.num_free_blocks:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq itself was preempted: everything after it is gone too
            bm.allocate(seq.block_ids, seq.num_computed_tokens + n)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
            i += 1

        # 2. Waiting sequences, FCFS, when nothing had to be preempted this step. A sequence
        # whose LoRA adapter would exceed max_loras distinct adapters waits (in place) for
        # a later step; those behind it may go first.
        adapters = {s.request.adapter for s in self.running} - {None}
        skipped: list[Sequence] = []
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            adapter = seq.request.adapter
            if (self.max_loras is not None and adapter is not None and adapter not in adapters
                    and len(adapters) >= self.max_loras):
                skipped.append(self.waiting.popleft())
                continue
            # Encoder-decoder: the encoder prompt runs whole (its attention is bidirectional)
            # with at least one decoder token, in the same budget as prefill tokens; its
            # cross-attention K/V take blocks of their own.
            encoder_tokens = seq.num_encoder_tokens_to_run
            if encoder_tokens >= budget:
                break
            if not seq.block_ids and seq.num_computed_tokens == 0:
                limit = self._prefix_cache_limit(seq)
                cached = (bm.match_prefix(seq.token_ids, seq.block_ids, extra_key=seq.request.prefix_cache_key,
                                          max_tokens=limit) if limit > 0 else 0)
                seq.num_computed_tokens = cached
            n = min(seq.num_tokens_to_compute - seq.num_computed_tokens, budget - encoder_tokens,
                    self._chunk_limit(seq, budget - encoder_tokens, (), itertools.islice(self.waiting, 1, None),
                                      self.max_num_seqs - len(self.running) - 1))
            cross_blocks = bm.blocks_needed(seq.cross_block_ids, encoder_tokens)
            if bm.blocks_needed(seq.block_ids, seq.num_computed_tokens + n) + cross_blocks > bm.num_free_blocks:
                # Not enough room yet: give back any cached blocks it took and wait.
                bm.free(seq.block_ids)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            bm.allocate(seq.block_ids, seq.num_computed_tokens + n)
            bm.allocate(seq.cross_block_ids, encoder_tokens)
            seq.status = SequenceStatus.RUNNING
            seq.slot = self._free_slots.pop()
            seq.needs_slot_reset = True
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, n, encoder_tokens))
            budget -= n + encoder_tokens
            if adapter is not None:
                adapters.add(adapter)
        self.waiting.extendleft(reversed(skipped))
        return SchedulerOutput(scheduled, preempted)

    def _chunk_limit(self, seq: Sequence, budget: int, running_after, waiting_after, free_slots: int) -> int:
        """Most new tokens ``seq`` may take from ``budget`` under the budget rule (module
        docstring): the decode rows in ``running_after`` keep their token; the shorter
        prompts still to be scheduled this step (the rest of ``running_after``, and those
        among the next ``free_slots`` of ``waiting_after`` that the free KV blocks could
        hold) get theirs unless that leaves ``seq`` less than half."""
        remaining = seq.num_tokens_to_compute - seq.num_computed_tokens
        if remaining <= 1:
            return budget  # a decode row (or a prompt's last token)
        decodes = shorter = 0
        for other in running_after:
            left = other.num_tokens_to_compute - other.num_computed_tokens
            if left == 1:
                decodes += 1
            elif left < remaining:
                shorter += left
        free_blocks = self.block_manager.num_free_blocks
        for other in itertools.islice(waiting_after, max(free_slots, 0)):
            left = other.num_tokens_to_compute - other.num_computed_tokens + other.num_encoder_tokens_to_run
            blocks = self.block_manager.blocks_needed((), left)
            if left < remaining and blocks <= free_blocks:
                shorter += left
                free_blocks -= blocks
        available = budget - decodes
        return max(1, available - shorter, -(-available // 2))

    @staticmethod
    def _prefix_cache_limit(seq: Sequence) -> int:
        """How many leading tokens of ``seq`` may come from the prefix cache. Penalties count
        prompt tokens on the device as they are computed, and prompt logprobs come out of
        the prompt's forward pass: a prefix served from the cache would skip both, so such
        requests recompute (prompt logprobs: from the position before the first wanted one,
        SamplingParams.prompt_logprobs_from). At least one token is always left to run."""
        params = seq.request.sampling_params
        if params.uses_penalties:
            return 0
        limit = seq.num_tokens_to_compute - 1
        if params.prompt_logprobs:
            limit = min(limit, max(params.prompt_logprobs_from, 1) - 1)
        return limit

    def reserve_decode_steps(self, output: SchedulerOutput, num_steps: int, max_model_len: int) -> bool:
        """For a decode-only step: make room for ``num_steps`` tokens per sequence so the
        device can run several decode steps in one dispatch. False (nothing changed
        beyond harmless early allocation) when a sequence is near max_model_len, new
        requests are waiting, or blocks are short."""
        if num_steps <= 1 or not output.is_decode_only or self.waiting:
            return False
        bm = self.block_manager
        needed = 0
        for item in output.scheduled:
            seq = item.seq
            if seq.num_tokens + num_steps - 1 > max_model_len:
                return False
            needed += bm.blocks_needed(seq.block_ids, seq.num_computed_tokens + num_steps)
        if needed > bm.num_free_blocks:
            return False
        for item in output.scheduled:
            bm.allocate(item.seq.block_ids, item.seq.num_computed_tokens + num_steps)
        return True

    def reserve_spec_tokens(self, output: SchedulerOutput, wanted: list[int]) -> None:
        """Speculative decoding: give scheduled row i up to ``wanted[i]`` spec tokens (draft
        proposals to verify after its last token) within what prefill chunks left of the
        token budget, reserving their KV blocks; fewer when blocks are short (proposals
        never preempt anything)."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens - output.num_tokens
        for item, num in zip(output.scheduled, wanted):
            seq = item.seq
            num = min(num, budget)
            while num > 0 and bm.blocks_needed(seq.block_ids, seq.num_tokens + num) > bm.num_free_blocks:
                num -= 1
            if num > 0:
                bm.allocate(seq.block_ids, seq.num_tokens + num)
                item.num_spec_tokens = num
                budget -= num

    def after_step(self, output: SchedulerOutput, num_tokens=None) -> None:
        """The one update rule after a step. ``num_tokens[i]``: the tokens row i emitted
        (0: a prompt chunk that samples nothing; 1: a decode row; a verify row its
        accepted proposals + 1; a multi-step decode row its steps; None: one per row
        that samples). Each sequence's computed tokens advance by its known tokens plus
        the emitted tokens the step fed back (all but the last), so rejected proposals
        are not computed; blocks past the sequence's new end go back to the pool; newly
        full blocks whose tokens are all known are published to the prefix cache under
        the request's key (the rest follow at the next step or finish)."""
        bm = self.block_manager
        for i, item in enumerate(output.scheduled):
            seq = item.seq
            emitted = (1 if item.samples else 0) if num_tokens is None else int(num_tokens[i])
            seq.num_computed_tokens += item.num_new_tokens + max(emitted - 1, 0)
            if item.num_spec_tokens:  # blocks reserved for rejected proposals
                keep = -(-(seq.num_computed_tokens + 1) // bm.block_size)
                bm.free(seq.block_ids[keep:])
                del seq.block_ids[keep:]
            if seq.status is SequenceStatus.RUNNING:
                bm.cache_full_blocks(seq.token_ids, seq.block_ids, seq.num_computed_tokens, seq.block_hashes,
                                     extra_key=seq.request.prefix_cache_key)
