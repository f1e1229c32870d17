"""What is speculative in speculative decoding with a draft model, beside the one step
that runs it: how many tokens each decode row proposes, the acceptance records, and the
checks and helpers of draft models.

The rest is the engine's own: the draft is a stage of the runner's step (it proposes in
a ``fori_loop`` of its decode steps, the target verifies the proposals beside other
rows' prefill chunks, engine/model_runner.py), the rejection sampler lives beside the
sampler (engine/sampler.py), the scheduler reserves the spec tokens and its one update
rule advances each sequence by what was accepted (engine/scheduler.py), and the draft
loads through the factory's loader (engine/factory.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

from .scheduler import SchedulerOutput

logger = logging.getLogger("lmidist_jax")


class DraftModelError(ValueError):
    """The draft model cannot serve this target (vocabulary, context length)."""


def check_draft_compatible(target_spec, draft_spec, target_tokenizer, draft_tokenizer, max_model_len: int) -> None:
    """Draft and target must share one vocabulary (proposals are target token ids), and
    the draft must handle the target's context."""
    if draft_spec.vocab_size != target_spec.vocab_size:
        raise DraftModelError(
            f"speculative_draft_model has a vocabulary of {draft_spec.vocab_size} tokens, the target "
            f"{target_spec.vocab_size}: accepted only a draft with the target's vocabulary (same tokenizer)")
    if target_tokenizer is not None and draft_tokenizer is not None:
        if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
            raise DraftModelError(
                "speculative_draft_model's tokenizer maps tokens to other ids than the target's: accepted only "
                "a draft with the target's tokenizer vocabulary")
    if draft_spec.max_model_len < max_model_len:
        raise DraftModelError(f"speculative_draft_model handles {draft_spec.max_model_len} tokens, fewer than "
                              f"max_model_len={max_model_len}: accepted a draft with at least the target's context")


@dataclasses.dataclass
class SpecDecodeStats:
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verify_steps: int = 0  # sequence-steps with at least one proposal


class SpeculativeDecoding:
    """The engine's speculative bookkeeping: proposal lengths before a step, acceptance
    after it, lmi-dist's per-request record when a request finishes."""

    def __init__(self, speculative_length: int, record_acceptance_rate: bool = False):
        self.speculative_length = speculative_length
        self.record_acceptance_rate = record_acceptance_rate
        self.stats = SpecDecodeStats()
        # Per request: the fraction of proposals accepted at each verify step.
        self._acceptance: dict[str, list[float]] = {}

    def proposal_lengths(self, sched: SchedulerOutput, max_model_len: int) -> list[int]:
        """Spec tokens wanted per scheduled row (the scheduler grants them within the
        token budget and the free blocks). A decode row (its earlier tokens all in the
        draft's cache) proposes up to speculative_length, fewer near max_new_tokens and
        max_model_len: a step emits the accepted proposals + 1."""
        lengths = []
        for item in sched.scheduled:
            seq = item.seq
            num = 0
            if item.num_new_tokens == 1 and item.samples:
                num = min(self.speculative_length,
                          seq.request.sampling_params.max_new_tokens - seq.num_output_tokens - 1,
                          max_model_len - seq.num_tokens - 1)
            lengths.append(max(num, 0))
        return lengths

    def record(self, sched: SchedulerOutput, num_tokens) -> None:
        """After a step: row i emitted ``num_tokens[i]`` = its accepted proposals + 1."""
        for item, emitted in zip(sched.scheduled, num_tokens):
            num = item.num_spec_tokens
            if num:
                accepted = int(emitted) - 1
                self.stats.num_proposed_tokens += num
                self.stats.num_accepted_tokens += accepted
                self.stats.num_verify_steps += 1
                self._acceptance.setdefault(item.seq.request.request_id, []).append(accepted / num)

    def forget(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)

    def finish(self, request) -> dict:
        """lmi-dist's per-request record; logged with record_acceptance_rate."""
        history = self._acceptance.pop(request.request_id, [])
        record = {"id": request.request_id,
                  "mean_acceptance": float(np.mean(history)) if history else 0.0,
                  "acceptance_history_len": len(history),
                  "prompt_size": len(request.prompt_token_ids),
                  "output_size": sum(s.num_output_tokens for s in request.sequences)}
        if self.record_acceptance_rate:
            logger.info("Speculative Decoding %s", json.dumps(record))
        return record


def write_layer_skip_draft(model_dir, out_dir, num_layers: int) -> str:
    """Writes a draft made of a model's first ``num_layers`` decoder layers (its own
    embeddings, final norm and head) as an HF directory: a cheap same-vocabulary draft.
    Works for checkpoints in safetensors whose layers are named ``*.layers.<i>.*``."""
    import os
    import re
    import shutil

    from safetensors.numpy import load_file, save_file

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no .safetensors files: accepted a safetensors checkpoint")
    os.makedirs(out_dir, exist_ok=True)
    layer = re.compile(r"\.layers\.(\d+)\.")
    kept = {}
    for name in files:
        for key, value in load_file(os.path.join(model_dir, name)).items():
            match = layer.search(key)
            if match is None or int(match.group(1)) < num_layers:
                kept[key] = value
    save_file(kept, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = num_layers
    for key in ("layer_types",):  # per-layer lists follow the layers kept
        if isinstance(config.get(key), list):
            config[key] = config[key][:num_layers]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    for name in os.listdir(model_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config",
                            "chat_template")):
            shutil.copy(os.path.join(model_dir, name), os.path.join(out_dir, name))
    return str(out_dir)
