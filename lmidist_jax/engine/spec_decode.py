"""Speculative decoding with a draft model, lossless, inside the rolling batch.

One engine step (one jitted dispatch, `SpecDecodeRunner.execute`):

1. the draft proposes up to ``speculative_length`` tokens for every running decode
   sequence (a ``fori_loop`` of decode steps on the draft, its run-time trip count the
   largest proposal of the batch);
2. the proposals are written into the target's batch on the device, where each decode
   sequence is a row of ``1 + k`` tokens (its last sampled token and its k proposals):
   for the phase-free scheduler a verify step is just "k + 1 new tokens";
3. the target runs that batch (prefill chunks of other sequences included), then the
   draft runs the very same tokens, so the draft's KV cache always holds exactly the
   positions the target's holds: both caches use the same block ids (one block
   manager), prefix-cache hits and preemption need nothing of their own;
4. rejection sampling (`verify`) accepts a prefix of each row's proposals and samples
   one more token: the correction at the first rejection, or the bonus after them all.

The target's distribution at each position goes through the engine's sampler steps
(penalties with the counts of the proposals before it, temperature, top-k, top-p,
min-p), so greedy rows give exactly the target's greedy tokens and sampled rows keep
the target's distribution (Leviathan et al. 2023, Chen et al. 2023). On the host
(`SpecDecodeEngine`) rejected positions are rolled back: ``num_computed_tokens`` counts
only accepted positions, and blocks past the sequence's new end go back to the pool.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from .. import parallel
from ..models.loader import LoadedModel
from .llm_engine import LLMEngine
from .model_runner import (ModelRunner, StepBatch, StepBatchBuilder, prompt_logprob_spans, step_prompt_logprobs,
                           wanted_prompt_logprobs)
from .sampler import SamplingBatch, apply_penalties, truncation_mask
from .scheduler import SchedulerOutput

logger = logging.getLogger("lmidist_jax")

# Folded into a sequence's (seed, output position) key so that the draft's samples and
# the acceptance draws are independent of the target's own sampling noise.
_DRAFT_SALT = 0x5D
_ACCEPT_SALT = 0xAC


class DraftModelError(ValueError):
    """The draft model cannot serve this target (vocabulary, placement)."""


def check_draft_compatible(target_spec, draft_spec, target_tokenizer, draft_tokenizer) -> None:
    """Draft and target must share one vocabulary: proposals are target token ids."""
    if draft_spec.vocab_size != target_spec.vocab_size:
        raise DraftModelError(
            f"speculative_draft_model has a vocabulary of {draft_spec.vocab_size} tokens, the target "
            f"{target_spec.vocab_size}: accepted only a draft with the target's vocabulary (same tokenizer)")
    if target_tokenizer is not None and draft_tokenizer is not None:
        if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
            raise DraftModelError(
                "speculative_draft_model's tokenizer maps tokens to other ids than the target's: accepted only "
                "a draft with the target's tokenizer vocabulary")


def load_draft_model(config, target: LoadedModel, target_tokenizer, *, max_model_len: int,
                     progress: bool = True) -> LoadedModel:
    """Loads ``speculative_draft_model`` like any model (a directory, a known name, an HF id
    in the local cache; the target's dtype).

    Placement: ``draft_model_tp_size`` = the target's TP degree shards the draft on the
    target's mesh; 1 (the default) keeps it whole and replicates it on every device of
    the target's mesh, so each device runs the whole draft next to its target shard (no
    collectives in the proposal loop; the draft costs its size once per device)."""
    from converters.checkpoint import iter_checkpoint_tensors, load_config

    from ..model_store import resolve_model
    from ..models.families import map_checkpoint, spec_from_hf_config
    from ..models.loader import load_model
    from . import multihost
    from .factory import EngineConfigError, load_tokenizer

    if multihost.is_multiprocess():
        raise EngineConfigError("speculative_draft_model is not supported in a multi-host run yet: accepted only "
                                "a single-process engine")
    if config.max_rolling_batch_prefill_tokens is not None and \
            config.max_rolling_batch_prefill_tokens < config.speculative_length + 1:
        raise EngineConfigError(
            f"max_rolling_batch_prefill_tokens={config.max_rolling_batch_prefill_tokens} cannot hold one verify "
            f"row of speculative_length + 1 = {config.speculative_length + 1} tokens: accepted at least that many")
    draft_dir = resolve_model(config.speculative_draft_model)
    draft_spec = spec_from_hf_config(load_config(draft_dir))
    check_draft_compatible(target.spec, draft_spec, target_tokenizer, load_tokenizer(draft_dir))
    if draft_spec.max_model_len < max_model_len:
        raise DraftModelError(f"speculative_draft_model handles {draft_spec.max_model_len} tokens, fewer than "
                              f"max_model_len={max_model_len}: accepted a draft with at least the target's context")
    tp = target.mesh.shape[parallel.TP_AXIS]
    draft_tp = config.draft_model_tp_size
    mesh = target.mesh if draft_tp == tp else parallel.make_mesh(1, target.mesh.devices.flat)
    tensors = iter_checkpoint_tensors(draft_dir, config.load_format, progress=progress)
    draft = load_model(draft_spec, map_checkpoint(draft_spec, tensors), dtype=target.dtype, mesh=mesh,
                       max_model_len=max_model_len)
    if mesh is not target.mesh:
        # Whole on every device of the target's mesh, so one jitted step holds both.
        replicated = parallel.replicated(target.mesh)
        # (``mesh`` stays the draft's own one-device mesh: its layers run unsharded.)
        draft = dataclasses.replace(draft, state=jax.device_put(draft.state, replicated))
    logger.info("draft model %s loaded (%d layers, TP %d)", draft_dir, draft_spec.num_layers, draft_tp)
    return draft


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecInputs:
    """Per-row inputs of a speculative step ([S] each, [T] for proposal_src)."""

    num_proposals: jax.Array  # i32 proposals to make and verify (0: plain sampling or a prefill chunk)
    draft_input: jax.Array    # i32 the row's last known token (the draft's first input)
    seq_len: jax.Array        # i32 tokens known before the step (that last token included)
    sample_base: jax.Array    # i32 index in the step's tokens of that last token
    proposal_src: jax.Array   # [T] i32 row * K + j for the token slot of proposal j (-1: a known token)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VerifyOutput:
    token_ids: jax.Array      # [S, K+1] i32 accepted proposals, then the correction/bonus token
    num_accepted: jax.Array   # [S] i32 accepted proposals (tokens emitted = num_accepted + 1)
    logprobs: jax.Array       # [S, K+1] f32 target log-probabilities of token_ids (raw model)
    top_ids: jax.Array        # [S, K+1, N] i32
    top_logprobs: jax.Array   # [S, K+1, N] f32


def _keys(seeds, positions, salt=None):
    """One PRNG key per (seed, output position[, salt]); seeds and positions broadcast."""
    def one(seed, position):
        key = jax.random.fold_in(jax.random.key(seed), position)
        return key if salt is None else jax.random.fold_in(key, salt)
    seeds, positions = jnp.broadcast_arrays(seeds, positions)
    flat = jax.vmap(one)(seeds.reshape(-1), positions.reshape(-1))
    return flat.reshape(seeds.shape)


def _scaled_truncated(logits, params: SamplingBatch):
    """Temperature, then top-k / top-p / min-p: the logits the sampler draws from."""
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits / temperature
    truncates = (params.temperature > 0) & ((params.top_k > 0) | (params.top_p < 1.0) | (params.min_p > 0.0))
    return jax.lax.cond(jnp.any(truncates), lambda x: jnp.where(truncation_mask(x, params), x, -jnp.inf),
                        lambda x: x, scaled)


def draft_sample(logits, params: SamplingBatch, positions):
    """The draft's proposal and the distribution q it was drawn from: logits [S, V] ->
    (tokens [S], q [S, V]). Greedy rows take the argmax (q is then unused). No penalties:
    any q keeps the method lossless; a closer one is only accepted more often."""
    scaled = _scaled_truncated(logits, params)
    q = jax.nn.softmax(scaled, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(scaled):
        keys = _keys(params.seeds, positions, _DRAFT_SALT)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, (scaled.shape[-1],), jnp.float32))(keys)
        return jnp.where(params.temperature > 0, jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32), greedy)

    tokens = jax.lax.cond(jnp.any(params.temperature > 0), sampled, lambda _: greedy, scaled)
    return tokens, q


def verify(logits, proposals, draft_probs, num_proposals, prompt_mask, output_counts, slots,
           params: SamplingBatch, num_top_logprobs: int) -> VerifyOutput:
    """Rejection sampling of the draft's proposals against the target.

    logits [S, K+1, V]: the target's logits after each of the row's known-last token and
    its proposals; proposals [S, K]; draft_probs [S, K, V] the draft's q at each proposal;
    num_proposals [S] (positions past it are ignored). prompt_mask / output_counts: the
    device-wide penalty rows, ``slots`` [S] picks each row's.

    Proposal j is accepted with probability min(1, p_j(d_j) / q_j(d_j)) (greedy rows:
    when it is the target's argmax); at the first rejection a token is drawn from
    normalize(max(p_j - q_j, 0)), after all of them from p_k. The emitted tokens are then
    distributed as the target's own samples."""
    num_rows, k1, vocab = logits.shape
    k = k1 - 1
    model_logprobs = jax.nn.log_softmax(logits, axis=-1)
    flat = logits.reshape(num_rows * k1, vocab)
    row_params = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k1, axis=0), params)

    def penalize(flat):
        # Position j sees the row's counted tokens plus its proposals before j, as the
        # target would have seen them had it generated them one at a time.
        onehot = jax.nn.one_hot(proposals, vocab, dtype=jnp.int32)  # [S, K, V]
        before = jnp.concatenate([jnp.zeros((num_rows, 1, vocab), jnp.int32), jnp.cumsum(onehot, axis=1)], axis=1)
        counts = (output_counts[slots][:, None, :] + before).reshape(num_rows * k1, vocab)
        return apply_penalties(flat, jnp.repeat(prompt_mask[slots], k1, axis=0), counts, row_params)

    penalized = ((params.repetition_penalty != 1.0) | (params.presence_penalty != 0.0)
                 | (params.frequency_penalty != 0.0))
    flat = jax.lax.cond(jnp.any(penalized), penalize, lambda x: x, flat)
    greedy = jnp.argmax(flat, axis=-1).astype(jnp.int32).reshape(num_rows, k1)
    scaled = _scaled_truncated(flat, row_params).reshape(num_rows, k1, vocab)
    target_probs = jax.nn.softmax(scaled, axis=-1)

    is_greedy = params.temperature <= 0
    j = jnp.arange(k)[None, :]
    positions = params.sample_index[:, None] + jnp.arange(k1)[None, :]  # output position of each slot
    p_d = jnp.take_along_axis(target_probs[:, :k], proposals[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(draft_probs, proposals[..., None], axis=-1)[..., 0]
    uniform = jax.vmap(jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32)))(
        _keys(params.seeds[:, None], positions[:, :k], _ACCEPT_SALT))
    # u < p/q, written without the division (q(d) > 0 for a token drawn from q).
    accept = jnp.where(is_greedy[:, None], proposals == greedy[:, :k], uniform * q_d < p_d)
    accept = accept & (j < num_proposals[:, None])
    num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # [S]

    # The token after the accepted run: the correction (from the residual) or the bonus.
    rows = jnp.arange(num_rows)
    p_last = target_probs[rows, num_accepted]  # [S, V]
    rejected = num_accepted < num_proposals
    q_last = draft_probs[rows, jnp.minimum(num_accepted, k - 1)]
    residual = jnp.where(rejected[:, None], jnp.maximum(p_last - q_last, 0.0), p_last)
    # p == q (up to rounding) leaves no residual mass; rejection then had probability ~0.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_last)
    last_keys = _keys(params.seeds, params.sample_index + num_accepted)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), jnp.float32))(last_keys)
    sampled_last = jnp.argmax(jnp.log(residual) + noise, axis=-1).astype(jnp.int32)
    last = jnp.where(is_greedy, greedy[rows, num_accepted], sampled_last)

    slot = jnp.arange(k1)[None, :]
    padded = jnp.concatenate([proposals, jnp.zeros((num_rows, 1), jnp.int32)], axis=1)
    tokens = jnp.where(slot < num_accepted[:, None], padded, jnp.where(slot == num_accepted[:, None], last[:, None], 0))
    logprobs = jnp.take_along_axis(model_logprobs, tokens[..., None], axis=-1)[..., 0]
    if num_top_logprobs > 0:
        def top(x):
            values, ids = jax.lax.top_k(x, num_top_logprobs)
            return values, ids.astype(jnp.int32)

        def no_top(x):
            return (jnp.zeros((num_rows, k1, num_top_logprobs), jnp.float32),
                    jnp.zeros((num_rows, k1, num_top_logprobs), jnp.int32))

        top_logprobs, top_ids = jax.lax.cond(jnp.any(params.top_n > 0), top, no_top, model_logprobs)
    else:
        top_logprobs = jnp.zeros((num_rows, k1, 0), jnp.float32)
        top_ids = jnp.zeros((num_rows, k1, 0), jnp.int32)
    return VerifyOutput(tokens, num_accepted.astype(jnp.int32), logprobs, top_ids, top_logprobs)


def allocate_kv_cache(model: LoadedModel, num_blocks: int, block_size: int, mesh):
    """A paged cache for ``model`` with the target's block count (block ids are shared),
    placed on ``mesh`` (split by KV heads; replicated when the model is)."""
    spec = model.spec
    shapes = [(spec.layer_kv_heads(i), num_blocks, block_size, spec.head_dim) for i in range(spec.num_layers)]
    if model.mesh.shape[parallel.TP_AXIS] == 1:  # an unsharded model: the whole cache on every device
        sharding = parallel.replicated(mesh)
    else:
        sharding = NamedSharding(mesh, parallel.partition_spec(("kv_heads", None, None, None), shapes[0], mesh))
    zeros = {shape: jax.jit(lambda shape=shape: jnp.zeros(shape, model.dtype), out_shardings=sharding)
             for shape in set(shapes)}
    return [(zeros[shape](), zeros[shape]()) for shape in shapes], sharding


@dataclasses.dataclass
class SpecRunnerOutput:
    token_ids: np.ndarray       # [num_scheduled, K+1]
    num_accepted: np.ndarray    # [num_scheduled]
    logprobs: np.ndarray        # [num_scheduled, K+1]
    top_ids: np.ndarray         # [num_scheduled, K+1, N]
    top_logprobs: np.ndarray
    host_time: float
    device_time: float
    prompt_logprobs: list = dataclasses.field(default_factory=list)


class SpecDecodeRunner:
    """The target's ModelRunner (its batch packing, caches, penalty rows and buckets)
    plus a draft model with its own paged cache over the same block ids."""

    def __init__(self, target: ModelRunner, draft: LoadedModel, num_speculative_tokens: int):
        self.target = target
        self.draft = draft
        self.num_speculative_tokens = k = num_speculative_tokens
        mesh = target.mesh
        self.draft_kv_caches, self.draft_kv_sharding = allocate_kv_cache(draft, target.num_blocks,
                                                                         target.block_size, mesh)
        self.lazily_compiled: set[tuple[int, int]] = set()
        self.num_compiled_steps = 0
        self._compiled: dict[tuple[int, int], object] = {}
        target_graphdef, draft_graphdef = target.model.graphdef, draft.graphdef
        block_size = target.block_size
        num_top = target.num_top_logprobs

        def propose(draft_module, draft_kv, md0, spec: SpecInputs, sampling: SamplingBatch, trip):
            num_seqs = spec.num_proposals.shape[0]
            vocab = draft.spec.vocab_size
            rows = jnp.arange(num_seqs, dtype=jnp.int32)

            def one(i, carry):
                draft_kv, tokens, proposals, probs = carry
                active = spec.num_proposals > i
                seq_lens = jnp.where(active, spec.seq_len + i, 0)
                positions = jnp.maximum(seq_lens - 1, 0)
                blocks = jnp.take_along_axis(md0.block_tables, (positions // block_size)[:, None], axis=1)[:, 0]
                md = dataclasses.replace(
                    md0, positions=positions, seq_lens=seq_lens, token_seq_ids=rows, logits_indices=rows,
                    slot_mapping=jnp.where(active, blocks * block_size + positions % block_size, 0),
                    decode_only=True)
                hidden, draft_kv = draft_module(tokens, draft_kv, md)
                # draft.mesh: the target's when the draft is sharded like it, else the draft's
                # own one-device mesh (its logits are whole on every device already).
                logits = parallel.gather_for_sampling(draft_module.logits(hidden), draft.mesh)
                new_tokens, q = draft_sample(logits, sampling, sampling.sample_index + i)
                proposals = proposals.at[:, i].set(new_tokens)
                probs = probs.at[:, i].set(q)
                return draft_kv, new_tokens, proposals, probs

            init = (draft_kv, spec.draft_input, jnp.zeros((num_seqs, k), jnp.int32),
                    jnp.zeros((num_seqs, k, vocab), jnp.float32))
            draft_kv, _, proposals, probs = jax.lax.fori_loop(0, trip, one, init)
            return draft_kv, proposals, probs

        def step_fn(target_state, draft_state, kv_caches, draft_kv, prompt_mask, output_counts,
                    batch: StepBatch, spec: SpecInputs, trip):
            target_module = nnx.merge(target_graphdef, target_state)
            draft_module = nnx.merge(draft_graphdef, draft_state)
            prompt_mask = prompt_mask.at[batch.reset_slots].set(False)
            output_counts = output_counts.at[batch.reset_slots].set(0)
            md = batch.md
            draft_kv, proposals, draft_probs = propose(draft_module, draft_kv, md, spec, batch.sampling, trip)
            src = spec.proposal_src
            input_ids = jnp.where(src >= 0, proposals.reshape(-1)[jnp.maximum(src, 0)], batch.input_ids)
            hidden, kv_caches = target_module(input_ids, kv_caches, md)
            # The draft computes the same positions, keeping its cache in step with the target's.
            _, draft_kv = draft_module(input_ids, draft_kv, md)
            prompt_lps = step_prompt_logprobs(target_module, hidden, batch, num_top)
            # Penalty counts of the known input tokens (proposal slots point to the trash row).
            trash = prompt_mask.shape[0] - 1
            prompt_rows = jnp.where(batch.token_is_output, trash, batch.token_slots)
            output_rows = jnp.where(batch.token_is_output, batch.token_slots, trash)
            prompt_mask = prompt_mask.at[prompt_rows, input_ids].set(True)
            output_counts = output_counts.at[output_rows, input_ids].add(1)
            index = spec.sample_base[:, None] + jnp.minimum(jnp.arange(k + 1)[None, :], spec.num_proposals[:, None])
            logits = parallel.gather_for_sampling(target_module.logits(hidden[index.reshape(-1)]), mesh)
            logits = logits.reshape(index.shape + (-1,))
            out = verify(logits, proposals, draft_probs, spec.num_proposals, prompt_mask, output_counts,
                         batch.slots, batch.sampling, num_top)
            # Accepted proposals are computed output tokens from now on: count them.
            counted = jnp.where(jnp.arange(k)[None, :] < out.num_accepted[:, None], batch.slots[:, None], trash)
            output_counts = output_counts.at[counted, proposals].add(1)
            return kv_caches, draft_kv, prompt_mask, output_counts, out, prompt_lps

        rep = parallel.replicated(mesh)
        self._step = jax.jit(step_fn, donate_argnums=(2, 3, 4, 5),
                             out_shardings=(target.kv_sharding, self.draft_kv_sharding, rep, rep, rep, rep))

    # -- the step --------------------------------------------------------------------

    def _pack(self, sched: SchedulerOutput, proposals: list[int]):
        target, k = self.target, self.num_speculative_tokens
        num_tokens = sched.num_tokens + sum(proposals)
        T, S = target.shapes_for(num_tokens, len(sched.scheduled), decode_only=False)
        builder = StepBatchBuilder(target, T, S)
        num_proposals = np.zeros(S, np.int32)
        draft_input = np.zeros(S, np.int32)
        seq_len = np.zeros(S, np.int32)
        sample_base = np.zeros(S, np.int32)
        proposal_src = np.full(T, -1, np.int32)
        prompt_spans = []
        for row, (item, num) in enumerate(zip(sched.scheduled, proposals)):
            seq = item.seq
            t = builder.metadata.num_tokens
            span = builder.add(row, seq, item.num_new_tokens + num)
            if span is not None:
                prompt_spans.append(span)
            last = t + item.num_new_tokens - 1  # the row's last known token
            sample_base[row] = last
            if num:
                num_proposals[row] = num
                draft_input[row] = seq.token_ids[-1]
                seq_len[row] = seq.num_tokens
                proposal_src[last + 1:last + 1 + num] = row * k + np.arange(num)
                # Proposals are counted for penalties only once accepted (on the device).
                builder.token_slots[last + 1:last + 1 + num] = target.trash_slot
        batch = builder.build(decode_only=False)
        spec = SpecInputs(num_proposals, draft_input, seq_len, sample_base, proposal_src)
        return batch, spec, prompt_spans, int(num_proposals.max(initial=0))

    def execute(self, sched: SchedulerOutput, proposals: list[int]) -> SpecRunnerOutput:
        t0 = time.perf_counter()
        batch, spec, prompt_spans, trip = self._pack(sched, proposals)
        t1 = time.perf_counter()
        out, prompt_lps = self._run(batch, spec, trip)
        out, prompt_lps = jax.device_get((out, wanted_prompt_logprobs(prompt_lps, prompt_spans)))
        t2 = time.perf_counter()
        n = len(sched.scheduled)
        return SpecRunnerOutput(out.token_ids[:n], out.num_accepted[:n], out.logprobs[:n], out.top_ids[:n],
                                out.top_logprobs[:n], host_time=t1 - t0, device_time=t2 - t1,
                                prompt_logprobs=prompt_logprob_spans(prompt_spans, prompt_lps))

    def _args(self, batch, spec, trip):
        t = self.target
        return (t.model.state, self.draft.state, t.kv_caches, self.draft_kv_caches, t.prompt_mask,
                t.output_counts, batch, spec, np.int32(trip))

    def _run(self, batch, spec, trip):
        key = (batch.input_ids.shape[0], batch.slots.shape[0])
        step = self._compiled.get(key)
        if step is None:
            step = self._step
            self.lazily_compiled.add(key)
        t = self.target
        t.kv_caches, self.draft_kv_caches, t.prompt_mask, t.output_counts, out, prompt_lps = step(
            *self._args(batch, spec, trip))
        return out, prompt_lps

    def _dummy(self, T: int, S: int):
        batch = self.target.dummy_batch(T, S, False)
        z = np.zeros(S, np.int32)
        return batch, SpecInputs(z, z, z, z, np.full(T, -1, np.int32))

    def warmup_shapes(self) -> list[tuple[int, int]]:
        return [(T, S) for T, S, decode_only in self.target.warmup_shapes() if not decode_only]

    def warmup(self, progress: bool = True) -> None:
        """Compile every (tokens, sequences) bucket of the speculative step ahead of time."""
        if self.target.enforce_eager:
            return
        from tqdm.auto import tqdm

        for shape in tqdm(self.warmup_shapes(), desc="compiling speculative buckets", disable=not progress):
            batch, spec = self._dummy(*shape)
            self._compiled[shape] = self._step.lower(*self._args(batch, spec, 0)).compile()
            jax.block_until_ready(self._run(batch, spec, 0))
            self.num_compiled_steps += 1


@dataclasses.dataclass
class SpecDecodeStats:
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verify_steps: int = 0  # sequence-steps with at least one proposal


class SpecDecodeEngine(LLMEngine):
    """The rolling-batch engine with a draft model: same requests, outputs and
    scheduling; a step verifies each running sequence's proposals and may give it up to
    ``speculative_length + 1`` tokens."""

    def __init__(self, runner: ModelRunner, draft: LoadedModel, tokenizer, *, speculative_length: int,
                 record_acceptance_rate: bool = False, **kwargs):
        super().__init__(runner, tokenizer, **kwargs)
        self.spec_runner = SpecDecodeRunner(runner, draft, speculative_length)
        self.speculative_length = speculative_length
        self.record_acceptance_rate = record_acceptance_rate
        self.spec_stats = SpecDecodeStats()
        # Per request: the fraction of proposals accepted at each verify step.
        self._acceptance: dict[str, list[float]] = {}

    # -- proposals -----------------------------------------------------------------

    def _proposal_lengths(self, sched: SchedulerOutput) -> list[int]:
        """Proposals per scheduled sequence, allocating their blocks. A decode row gets up
        to speculative_length, fewer near max_new_tokens / max_model_len, when the step's
        token budget is spent or blocks are short (never preempting for proposals)."""
        bm = self.block_manager
        budget = self.scheduler.max_num_batched_tokens - sched.num_tokens
        lengths = []
        for item in sched.scheduled:
            seq = item.seq
            num = 0
            if item.num_new_tokens == 1 and item.samples:
                params = seq.request.sampling_params
                # Each step emits accepted + 1 tokens: keep that within both limits.
                num = min(self.speculative_length, budget,
                          params.max_new_tokens - seq.num_output_tokens - 1,
                          self.max_model_len - seq.num_tokens - 1)
                while num > 0 and bm.blocks_needed(seq.block_ids, seq.num_tokens + num) > bm.num_free_blocks:
                    num -= 1
                num = max(num, 0)
                if num:
                    bm.allocate(seq.block_ids, seq.num_tokens + num)
                    budget -= num
            lengths.append(num)
        return lengths

    # -- the step --------------------------------------------------------------------

    def step(self):
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        self.stats.num_preemptions += len(sched.preempted)
        outputs, self._finished_outputs = self._finished_outputs, []
        if not sched.scheduled:
            return outputs
        samples = [item.samples for item in sched.scheduled]
        for item in sched.scheduled:
            seq = item.seq
            self.stats.num_computed_prompt_tokens += max(
                0, min(seq.num_prompt_tokens, seq.num_computed_tokens + item.num_new_tokens) - seq.num_computed_tokens)
        proposals = self._proposal_lengths(sched)
        t1 = time.perf_counter()
        result = self.spec_runner.execute(sched, proposals)
        self._record_prompt_logprobs(sched, result.prompt_logprobs)
        bm = self.block_manager
        for i, item in enumerate(sched.scheduled):
            seq, num = item.seq, proposals[i]
            accepted = int(result.num_accepted[i]) if samples[i] else 0
            # Only the accepted positions count as computed; rejected ones are overwritten later.
            seq.num_computed_tokens += item.num_new_tokens + accepted
            if num:
                keep = -(-(seq.num_computed_tokens + 1) // bm.block_size)
                extra = seq.block_ids[keep:]
                del seq.block_ids[keep:]
                bm.free(extra)
                self.spec_stats.num_proposed_tokens += num
                self.spec_stats.num_accepted_tokens += accepted
                self.spec_stats.num_verify_steps += 1
                self._acceptance.setdefault(seq.request.request_id, []).append(accepted / num)
            bm.cache_full_blocks(seq.token_ids, seq.block_ids, seq.num_computed_tokens, seq.block_hashes)
        t2 = time.perf_counter()
        outputs.extend(self._postprocess_spec(sched, result, samples))
        t3 = time.perf_counter()
        self._record_step(t1 - t0, result, t3 - t2)
        return outputs

    def _postprocess_spec(self, sched: SchedulerOutput, result: SpecRunnerOutput, samples) -> list:
        now = time.monotonic()
        new_tokens: dict[str, dict[int, list]] = {}
        for i, item in enumerate(sched.scheduled):
            seq = item.seq
            if not samples[i] or seq.is_finished:
                continue
            for j in range(int(result.num_accepted[i]) + 1):
                if seq.is_finished:
                    break  # a stop inside the accepted run: later tokens are dropped
                self._append_token(seq, int(result.token_ids[i, j]), float(result.logprobs[i, j]),
                                   result.top_ids[i, j], result.top_logprobs[i, j], now, new_tokens)
        outputs = []
        for request_id, per_seq in new_tokens.items():
            request = self.requests.get(request_id)
            if request is None:
                continue
            out = self._request_output(request, per_seq)
            if request.is_finished:
                request.finish_time = now
                del self.requests[request_id]
                out.spec_decode = self._acceptance_record(request)
            outputs.append(out)
        return outputs

    def abort(self, request_id: str) -> bool:
        self._acceptance.pop(request_id, None)
        return super().abort(request_id)

    def _acceptance_record(self, request) -> dict:
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


def spec_step_temp_bytes(probe: ModelRunner, draft: LoadedModel, speculative_length: int) -> int:
    """Temporary memory of the largest speculative step over ``probe`` (a runner with a
    small stand-in cache), from its compiled form: for sizing the KV pool."""
    runner = SpecDecodeRunner(probe, draft, speculative_length)
    T, S = runner.warmup_shapes()[-1]
    batch, spec = runner._dummy(T, S)
    analysis = runner._step.lower(*runner._args(batch, spec, 0)).compile().memory_analysis()
    return 0 if analysis is None else int(analysis.temp_size_in_bytes)
