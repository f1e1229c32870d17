"""Incremental detokenization and stop-string handling on the host.

Text is decoded from a small window of recent tokens (the usual prefix/read offset
scheme), so the cost per token stays flat; a multi-byte character split across
tokens is held back until complete. Stop strings are searched across token
boundaries, and streamed text holds back the last ``max_stop_len - 1`` characters
until they cannot start a stop string.
"""

from __future__ import annotations

from .sequence import Sequence

_INITIAL_WINDOW = 5


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, ids, skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def append(self, seq: Sequence) -> None:
        """Extend ``seq.text`` with the text of its newest output token(s)."""
        if self.tokenizer is None:
            return
        skip = seq.request.sampling_params.skip_special_tokens
        ids = seq.token_ids
        if seq.read_offset == 0:  # first output token: start the window inside the prompt
            seq.read_offset = seq.num_prompt_tokens
            seq.prefix_offset = max(seq.read_offset - _INITIAL_WINDOW, 0)
        prefix_text = self._decode(ids[seq.prefix_offset:seq.read_offset], skip)
        new_text = self._decode(ids[seq.prefix_offset:], skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            seq.text += new_text[len(prefix_text):]
            seq.prefix_offset = seq.read_offset
            seq.read_offset = len(ids)


def find_stop(seq: Sequence, previous_len: int) -> int | None:
    """Index in seq.text where the earliest stop string starts, looking only at text
    that could contain a stop string completed by the new characters."""
    stops = seq.request.sampling_params.stop_sequences
    if not stops:
        return None
    best = None
    for stop in stops:
        start = max(0, previous_len - len(stop) + 1)
        idx = seq.text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    if best is None:
        return None
    idx, stop = best
    return idx + len(stop) if seq.request.sampling_params.include_stop_str_in_output else idx


def streamable_length(seq: Sequence) -> int:
    """How much of seq.text may be streamed now (a possible stop-string prefix is held back)."""
    if seq.is_finished:
        return len(seq.text)
    stops = seq.request.sampling_params.stop_sequences
    if not stops:
        return len(seq.text)
    hold = max(len(s) for s in stops) - 1
    return max(seq.emitted_text_len, len(seq.text) - hold)
