"""A request and its sequences (one per sample when n/best_of > 1), as the scheduler
and the engine see them."""

from __future__ import annotations

import dataclasses
import enum
import time

from ..outputs import TokenLogprob
from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One generated sequence. ``token_ids`` = prompt + output; the first
    ``num_computed_tokens`` of them have their K/V in the cache."""

    seq_id: int
    request: "Request"
    index: int  # sample index within the request
    token_ids: list[int]
    seed: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = dataclasses.field(default_factory=list)
    block_hashes: list[int] = dataclasses.field(default_factory=list)  # prefix-cache hash chain
    # Encoder-decoder models: the blocks holding the cross-attention K/V of the encoder
    # prompt (a second block table); empty until the encoder has run (again after preemption).
    cross_block_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    # Detokenizer state.
    text: str = ""
    emitted_text_len: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    # Penalty-count slot on the device while running (None when waiting).
    slot: int | None = None
    needs_slot_reset: bool = True
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_encoder_tokens_to_run(self) -> int:
        """Encoder tokens this sequence still needs run (its whole encoder prompt, or 0)."""
        encoder_ids = self.request.encoder_prompt_token_ids
        return len(encoder_ids) if encoder_ids is not None and not self.cross_block_ids else 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        """Tokens whose forward pass this sequence needs: all of them, except a scoring
        request's last prompt token (nothing is sampled after it, and its logprob comes
        from the position before)."""
        return len(self.token_ids) - self.request.sampling_params.scores_only

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    sequences: list[Sequence] = dataclasses.field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None
    aborted: bool = False
    # Detokenize as tokens arrive (streaming, stop strings); otherwise once at the end.
    incremental_text: bool = True
    # With SamplingParams.prompt_logprobs: [num_prompt_tokens], None for the first token;
    # with top_n_tokens too, each prompt token's top alternatives [(token id, logprob)].
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    # LoRA adapter name (None: the base model) and its registration's unique id, which
    # keys the prefix cache (a re-registered name gets a new id).
    adapter: str | None = None
    adapter_uid: int | None = None
    # Encoder-decoder models (T5): the prompt, run through the encoder; prompt_token_ids is
    # then the decoder's prompt ([decoder_start_token_id]).
    encoder_prompt_token_ids: list[int] | None = None

    @property
    def prefix_cache_key(self):
        """What the KV of this request's tokens depends on besides the tokens: its adapter,
        and (encoder-decoder) its encoder prompt. Keys the prefix cache's hash chains."""
        if self.encoder_prompt_token_ids is None:
            return self.adapter_uid
        return ("encoder", self.adapter_uid, tuple(self.encoder_prompt_token_ids))

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)
