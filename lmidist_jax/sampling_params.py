"""Per-request generation settings (what to sample and when to stop), validated on creation."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence


MAX_INT32 = 2**31 - 1
MAX_SAMPLES = 64  # n / best_of: sequences per request


class RequestError(ValueError):
    """A problem with one request (bad parameter, prompt too long, unknown adapter).

    It fails only that request; the engine and the other requests carry on.
    """


@dataclasses.dataclass
class SamplingParams:
    """How to generate for one request.

    Greedy decoding when ``temperature == 0`` or ``do_sample is False``.
    Logprobs are those of the model's own distribution (log-softmax of the raw
    logits), before penalties, temperature or truncation.

    ``max_new_tokens=0`` with ``prompt_logprobs`` makes a scoring request: the prompt's
    logprobs (and, with ``top_n_tokens``, each prompt position's top alternatives) come
    back and nothing is generated; its last prompt token is never run (nothing follows
    it), so its prompt may be one token longer than max_model_len.
    """

    max_new_tokens: int = 30
    temperature: float = 0.0
    do_sample: bool | None = None
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_sequences: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: bool = False
    top_n_tokens: int = 0  # top alternatives per generated (and, with prompt_logprobs, prompt) token
    prompt_logprobs: bool = False  # logprob of every prompt token after the first (no prefix-cache hits)
    # With prompt_logprobs: only the logprobs of prompt tokens from this index on are wanted;
    # the tokens before it may come from the prefix cache (their entries are then None).
    prompt_logprobs_from: int = 0
    n: int = 1
    best_of: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop_sequences, str):
            self.stop_sequences = (self.stop_sequences,)
        self.stop_sequences = tuple(self.stop_sequences or ())
        self.stop_token_ids = tuple(self.stop_token_ids or ())
        if self.do_sample is False:
            self.temperature = 0.0
        elif self.do_sample is True and self.temperature == 0.0:
            # LMI semantics: do_sample with no temperature samples at 1.0.
            self.temperature = 1.0
        self.validate()

    def validate(self) -> None:
        def bad(name: str, accepted: str) -> RequestError:
            return RequestError(
                f"invalid sampling parameter {name}={getattr(self, name)!r}: expected {accepted}")

        if not _is_int(self.max_new_tokens) or not 0 <= self.max_new_tokens <= MAX_INT32:
            raise bad("max_new_tokens", "an integer >= 1")
        if self.max_new_tokens == 0 and not self.prompt_logprobs:
            raise bad("max_new_tokens", "an integer >= 1 (0 only with prompt_logprobs=True: score the prompt "
                                        "without generating)")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 1e6:
            raise bad("temperature", "a number in [0, 1e6]")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_INT32:
            raise bad("top_k", "an integer >= 0 (0 disables top-k)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "a number in (0, 1]")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "a number in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0 (1.0 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise bad(name, "a number in [-2, 2]")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise bad("seed", "an integer >= 0 or None")
        if not all(isinstance(s, str) and s for s in self.stop_sequences):
            raise bad("stop_sequences", "a list of non-empty strings")
        if not all(_is_int(t) and 0 <= t <= MAX_INT32 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of integers >= 0")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if not _is_int(self.prompt_logprobs_from) or self.prompt_logprobs_from < 0:
            raise bad("prompt_logprobs_from", "an integer >= 0 (a prompt token index)")
        if not _is_int(self.top_n_tokens) or self.top_n_tokens < 0:
            raise bad("top_n_tokens", "an integer >= 0")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_SAMPLES:
            raise bad("n", f"an integer in [1, {MAX_SAMPLES}]")
        if self.best_of is not None:
            if not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_SAMPLES:
                raise bad("best_of", f"an integer in [n ({self.n}), {MAX_SAMPLES}]")

    @property
    def num_samples(self) -> int:
        """How many sequences to generate (best_of, or n)."""
        return self.best_of or self.n

    @property
    def scores_only(self) -> bool:
        """A scoring request: prompt logprobs, no generated token."""
        return self.max_new_tokens == 0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy ints too


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
