"""What the engine hands back: per-step deltas (streaming) and finished results."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TokenLogprob:
    """One generated token with its log-probability and (optionally) top alternatives."""

    token_id: int
    logprob: float
    text: str = ""
    # [(token_id, logprob, text)] best first; empty unless top_n_tokens was asked.
    top: list[tuple[int, float, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (a request has ``n`` of them)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "eos_token" | "length" | "stop_sequence" | "error" | "abort"
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0
    # What this step added to this sequence (streaming): its text (a possible stop-string
    # start held back) and token ids.
    text_delta: str = ""
    new_token_ids: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RequestOutput:
    """The state of a request after an engine step.

    ``new_token_ids``/``text_delta`` hold what this step added (for streaming);
    ``outputs`` holds the full sequences so far.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    new_token_ids: list[int] = dataclasses.field(default_factory=list)
    text_delta: str = ""
    new_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    error: str | None = None
    # When asked for, once the prompt has run: one per prompt token (None for the first);
    # with top_n_tokens, each prompt token's best alternatives [(token id, logprob)] too.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    num_cached_tokens: int = 0
    # With a draft model, on the final output: {"id", "mean_acceptance",
    # "acceptance_history_len", "prompt_size", "output_size"} (engine/spec_decode.py).
    spec_decode: dict | None = None

    # Convenience for the common n=1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else None

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.outputs[0].logprobs if self.outputs else None
