"""Training examples -> token ids with a loss mask (1 on the tokens the model learns to
write), and padded batches of them.

An example is one of:

  {"messages": [{"role", "content"}, ...]}   a chat, through the model's chat template;
  [{"role", "content"}, ...]                  the model learns the assistant turns only
  {"prompt": ..., "completion": ...}          text or token ids; it learns the completion
                                              (followed by EOS), not the prompt
  {"text": ...}                               text or token ids; it learns all of it
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from ..sampling_params import RequestError

ACCEPTED = ('{"messages": [...]} (or the message list itself), {"prompt": ..., "completion": ...} '
            'or {"text": ...}, with text or token ids')


class TrainingDataError(ValueError):
    """An example cannot be used (the message names it and what is accepted)."""


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    token_ids: np.ndarray  # [n] int32
    loss_mask: np.ndarray  # [n] bool: True on the tokens the model is trained to produce

    def __len__(self) -> int:
        return len(self.token_ids)


def encode_examples(data: Sequence[Any], engine) -> list[EncodedExample]:
    """Encodes every example with the engine's tokenizer and chat template (see the
    module docstring). Raises TrainingDataError naming the first bad example."""
    if isinstance(data, (str, dict)) or not isinstance(data, Sequence) or not len(data):
        raise TrainingDataError(f"data must be a non-empty list of examples, each {ACCEPTED}; got "
                                f"{type(data).__name__}{'' if isinstance(data, (str, dict)) else ' (empty)'}")
    eos = list(engine.spec.eos_token_ids)[:1]  # a completion ends with the model's (first) EOS
    out = []
    for i, example in enumerate(data):
        try:
            encoded = _encode(example, engine, eos)
        except RequestError as e:
            raise TrainingDataError(f"example {i}: {e}") from None
        if not encoded.loss_mask[1:].any():
            raise TrainingDataError(f"example {i} has no token to learn (an empty completion or no assistant turn)")
        out.append(encoded)
    return out


def _ids(value, engine, what: str) -> list[int]:
    if isinstance(value, str):
        return list(engine.encode(value)[1])
    if isinstance(value, Sequence) and all(isinstance(t, (int, np.integer)) for t in value):
        vocab = engine.spec.vocab_size
        bad = [int(t) for t in value if not 0 <= t < vocab]
        if bad:
            raise TrainingDataError(f"{what} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return [int(t) for t in value]
    raise TrainingDataError(f"{what} must be text or a list of token ids, got {type(value).__name__}")


def _completion_ids(value, engine) -> list[int]:
    if isinstance(value, str):  # the rest of a sequence: no BOS or other special tokens in front
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise RequestError("this model has no tokenizer: pass the completion as a list of token ids")
        return list(tokenizer.encode(value, add_special_tokens=False))
    return _ids(value, engine, "completion")


def _encode(example, engine, eos: list[int]) -> EncodedExample:
    if isinstance(example, Sequence) and not isinstance(example, str) and example and isinstance(example[0], dict):
        example = {"messages": example}
    if not isinstance(example, dict):
        raise TrainingDataError(f"an example must be {ACCEPTED}; got {type(example).__name__}")
    keys = set(example)
    if keys == {"messages"}:
        return _encode_chat(example["messages"], engine)
    if keys == {"prompt", "completion"}:
        prompt = _ids(example["prompt"], engine, "prompt")
        completion = _completion_ids(example["completion"], engine) + eos
        return _example(prompt + completion, [False] * len(prompt) + [True] * len(completion))
    if keys == {"text"}:
        ids = _ids(example["text"], engine, "text")
        return _example(ids, [True] * len(ids))
    raise TrainingDataError(f"an example must be {ACCEPTED}; got one with keys {sorted(keys)}")


def _encode_chat(messages, engine) -> EncodedExample:
    """The conversation through the chat template; the tokens each assistant turn adds
    (its text and end-of-turn marker) are learned, the rest (system, user, the template's
    own headers) is context."""
    if (not isinstance(messages, Sequence) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise TrainingDataError('"messages" must be a non-empty list of {"role": str, "content": str}')
    full = list(engine.encode_chat(messages, add_generation_prompt=False))
    mask = [False] * len(full)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise TrainingDataError("the conversation has no assistant message to learn")
    for i in turns:
        before = list(engine.encode_chat(messages[:i], add_generation_prompt=True)) if i else []
        through = list(engine.encode_chat(messages[:i + 1], add_generation_prompt=False))
        if full[:len(through)] != through or through[:len(before)] != before:
            raise TrainingDataError(
                f"the chat template does not build the conversation turn by turn (the text up to message {i} "
                f"is not a prefix of the whole), so the assistant's tokens cannot be told apart")
        mask[len(before):len(through)] = [True] * (len(through) - len(before))
    return _example(full, mask)


def _example(ids, mask) -> EncodedExample:
    return EncodedExample(np.asarray(ids, np.int32), np.asarray(mask, bool))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """B examples padded to L tokens, and the C positions per row whose next token is
    learned (only there are logits computed: the LM head is a large part of the cost)."""

    token_ids: np.ndarray       # [B, L] int32 (padding: 0)
    lengths: np.ndarray         # [B] int32
    target_index: np.ndarray    # [B * C] int32 flat token index (row * L + t) of each learned position
    target_ids: np.ndarray      # [B * C] int32 the token to predict there (token t + 1)
    target_weights: np.ndarray  # [B * C] float32 1, or 0 for padding


def num_targets(example: EncodedExample) -> int:
    """Positions whose next token is learned."""
    return int(example.loss_mask[1:].sum())


def make_batch(examples: Sequence[EncodedExample], seq_len: int, targets_per_row: int) -> Batch:
    rows = len(examples)
    token_ids = np.zeros((rows, seq_len), np.int32)
    target_index = np.zeros((rows, targets_per_row), np.int32)
    target_ids = np.zeros((rows, targets_per_row), np.int32)
    target_weights = np.zeros((rows, targets_per_row), np.float32)
    for row, ex in enumerate(examples):
        token_ids[row, :len(ex)] = ex.token_ids
        positions = np.flatnonzero(ex.loss_mask[1:])  # t such that token t + 1 is learned
        count = len(positions)
        target_index[row, :count] = row * seq_len + positions
        target_ids[row, :count] = ex.token_ids[positions + 1]
        target_weights[row, :count] = 1.0
    return Batch(token_ids, np.asarray([len(ex) for ex in examples], np.int32), target_index.reshape(-1),
                 target_ids.reshape(-1), target_weights.reshape(-1))


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch_size] example indices: shuffled epochs, one after another."""
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    epochs = [rng.permutation(num_examples) for _ in range(-(-needed // num_examples))]
    return np.concatenate(epochs)[:needed].reshape(steps, batch_size)
