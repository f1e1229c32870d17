"""Runs one scheduler step on the device: packs a fixed-shape batch, calls ONE
jitted step (model + sampling) with the KV cache donated, returns sampled tokens.

With a draft model (speculative decoding) the same step has one more stage: the draft
proposes each decode row's spec tokens (a ``fori_loop`` of its decode steps), the
proposals take their places in the batch, the target runs it (verify rows beside other
rows' prefill chunks), the draft runs the same tokens (its paged cache uses the target's
block ids, so it always holds the positions the target's holds), and the rejection
sampler (engine/sampler.py) accepts a prefix of each row's proposals. Each row of the
output carries the tokens it emits: one for a plain row, accepted proposals + 1 for a
verify row, ``num_steps`` for a multi-step decode row.

Shapes are bucketed so that every step after warm-up reuses a compiled graph
("CUDA graphs" in JAX):
  * decode steps (every sequence has one new token): S = T = a sequence bucket;
  * mixed / prefill steps: T = a token bucket, S = min(T, largest sequence bucket);
  * with a draft every step has the mixed shapes; a step of decode rows only (each with
    its proposals) runs them through the decode kernel (a static flag of its bucket).
Block tables always have max_model_len / block_size columns; the attention kernels
only read the blocks a sequence uses.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jaxtyping import Array, ArrayLike, Bool, Float32, Int32

from pallas_kernels.array_types import pytree_dataclass

from .. import parallel
from ..models.step_metadata import StepMetadata, StepMetadataBuilder
from ..models.loader import LoadedModel
from . import multihost
from .executable_cache import ExecutableCache, fresh_compiles
from .sampler import SampleOutput, SamplingBatch, rejection_sample, sample, sample_proposal
from .scheduler import SchedulerOutput

logger = logging.getLogger("lmidist_jax")


@pytree_dataclass
@dataclasses.dataclass
class StepBatch:
    """A step's inputs (host arrays when packed, device arrays inside the step)."""

    input_ids: Int32[ArrayLike, "tokens"]
    token_is_output: Bool[ArrayLike, "tokens"]  # generated (vs prompt) token, for penalty counts
    token_slots: Int32[ArrayLike, "tokens"]     # penalty-count row of each token (trash row for padding)
    md: StepMetadata
    slots: Int32[ArrayLike, "seqs"]             # penalty-count row of each sequence (trash row for padding)
    reset_slots: Int32[ArrayLike, "seqs"]       # rows to clear before this step (trash row = none)
    sampling: SamplingBatch
    prompt_targets: Int32[ArrayLike, "tokens"]  # next prompt token whose logprob is wanted (-1 = none)
    # Draft proposals each row verifies, in the places after its last known token
    # (md.logits_indices); zeros without a draft.
    num_proposals: Int32[ArrayLike, "seqs"]


@pytree_dataclass
@dataclasses.dataclass
class PromptLogprobs:
    """What a step computes for the prompt tokens whose successor's logprob is wanted."""

    logprobs: Float32[Array, "tokens"]          # log p(next prompt token), 0 where not wanted
    # Top alternatives (rows whose sequence asked for top_n_tokens); None when no span of
    # the step wants them (not fetched to the host).
    top_ids: Int32[Array, "tokens top"] | None
    top_logprobs: Float32[Array, "tokens top"] | None


@dataclasses.dataclass
class PromptLogprobSpan:
    """One scheduled sequence's prompt logprobs from one step: those of its prompt tokens
    num_computed_tokens + 1 + skipped on."""

    row: int                         # index in sched.scheduled
    logprobs: np.ndarray             # [k]
    top_ids: np.ndarray | None       # [k, K], None when the sequence asked for no alternatives
    top_logprobs: np.ndarray | None  # [k, K]
    skipped: int = 0                 # positions of this step before the first wanted one


@dataclasses.dataclass
class ModelRunnerOutput:
    """Per scheduled row: up to N tokens (N = 1, the decode steps, or k + 1 with a draft)."""

    token_ids: np.ndarray      # [num_scheduled, N]
    logprobs: np.ndarray       # [num_scheduled, N]
    top_ids: np.ndarray        # [num_scheduled, N, K]
    top_logprobs: np.ndarray   # [num_scheduled, N, K]
    # [num_scheduled] tokens each row emits: 0 for a prompt chunk that samples nothing,
    # 1 for a plain row, num_steps for a multi-step decode row, accepted proposals + 1
    # for a verify row.
    num_tokens: np.ndarray
    host_time: float
    device_time: float
    prompt_logprobs: list[PromptLogprobSpan] = dataclasses.field(default_factory=list)


def _pow2_buckets(limit: int, start: int = 1) -> list[int]:
    buckets, b = [], start
    while b < limit:
        buckets.append(b)
        b *= 2
    buckets.append(limit)
    return buckets


# Prompt logprobs need full-vocabulary logits at every prompt token: computed this
# many tokens at a time so that a 128K vocabulary does not need [T, V] at once.
PROMPT_LOGPROBS_CHUNK = 256


def prompt_token_logprobs(module, hidden: Float[Array, "tokens embed"], targets: Int32[Array, "tokens"],
                          top_wanted: Bool[Array, "tokens"], num_top: int) -> PromptLogprobs:
    """Each token's log p(target) under the raw model distribution (no penalties or
    temperature; 0 where the target is -1: not wanted) and, where ``top_wanted``, the ``num_top`` best tokens and their logprobs (from the same
    log-softmax, so a target that is the best token has exactly the best logprob).

    The wanted tokens are moved to the front first and chunks without any are skipped (at
    run time): scoring a continuation after a long context costs the vocabulary projection
    of the continuation only."""
    num_tokens = hidden.shape[0]
    chunk = min(num_tokens, PROMPT_LOGPROBS_CHUNK)
    padded = -(-num_tokens // chunk) * chunk
    order = jnp.argsort(targets < 0, stable=True)  # wanted tokens first, in token order
    hidden = jnp.pad(hidden[order], ((0, padded - num_tokens), (0, 0)))
    top_wanted = jnp.pad((top_wanted & (targets >= 0))[order], (0, padded - num_tokens))
    targets = jnp.pad(targets[order], (0, padded - num_tokens), constant_values=-1)
    no_top = (jnp.zeros((chunk, num_top), jnp.float32), jnp.zeros((chunk, num_top), jnp.int32))
    empty = (jnp.zeros((chunk,), jnp.float32), no_top[1], no_top[0])

    def wanted_chunk(h, tgt, want_top):
        logprobs = jax.nn.log_softmax(module.logits(h), axis=-1)
        lp = jnp.take_along_axis(logprobs, jnp.maximum(tgt, 0)[:, None], axis=-1)[:, 0]
        top_lps, top_ids = no_top
        if num_top:  # the vocabulary-wide top-k only in chunks that hold a token asking for it
            top_lps, top_ids = jax.lax.cond(jnp.any(want_top), lambda x: tuple(jax.lax.top_k(x, num_top)),
                                            lambda x: no_top, logprobs)
        return jnp.where(tgt >= 0, lp, 0.0), top_ids.astype(jnp.int32), top_lps

    def one_chunk(_, xs):
        h, tgt, want_top = xs
        return None, jax.lax.cond(jnp.any(tgt >= 0), wanted_chunk, lambda *_: empty, h, tgt, want_top)

    xs = (hidden.reshape(-1, chunk, hidden.shape[-1]), targets.reshape(-1, chunk), top_wanted.reshape(-1, chunk))
    _, (lps, top_ids, top_lps) = jax.lax.scan(one_chunk, None, xs)
    # Back to token order.
    lps = jnp.zeros((num_tokens,), jnp.float32).at[order].set(lps.reshape(-1)[:num_tokens])
    top_ids = jnp.zeros((num_tokens, num_top), jnp.int32).at[order].set(top_ids.reshape(-1, num_top)[:num_tokens])
    top_lps = jnp.zeros((num_tokens, num_top), jnp.float32).at[order].set(
        top_lps.reshape(-1, num_top)[:num_tokens])
    return PromptLogprobs(lps, top_ids, top_lps)


def no_prompt_logprobs(num_tokens: int, num_top: int) -> PromptLogprobs:
    return PromptLogprobs(jnp.zeros((num_tokens,), jnp.float32), jnp.zeros((num_tokens, num_top), jnp.int32),
                          jnp.zeros((num_tokens, num_top), jnp.float32))


def step_prompt_logprobs(module, hidden, batch: "StepBatch", num_top: int) -> PromptLogprobs:
    """The step's prompt logprobs, skipped at run time unless a request in the batch asked
    for them (the plain and the speculative step both call this)."""
    top_wanted = batch.sampling.top_n[batch.md.token_seq_ids] > 0
    return jax.lax.cond(
        jnp.any(batch.prompt_targets >= 0),
        lambda h, tgt, top: prompt_token_logprobs(module, h, tgt, top, num_top),
        lambda h, tgt, top: no_prompt_logprobs(tgt.shape[0], num_top),
        hidden, batch.prompt_targets, top_wanted)


def wanted_prompt_logprobs(prompt: PromptLogprobs, spans: list[tuple[int, int, int, bool, int]]
                           ) -> PromptLogprobs | None:
    """What of the step's prompt logprobs the host needs: nothing without spans, the top
    alternatives only when a span asked for them (they are [T, K])."""
    if not spans:
        return None
    if any(span[3] for span in spans):
        return prompt
    return dataclasses.replace(prompt, top_ids=None, top_logprobs=None)


def prompt_logprob_spans(spans: list[tuple[int, int, int, bool, int]], prompt: PromptLogprobs | None
                         ) -> list[PromptLogprobSpan]:
    """Host side: cuts each (row, first token, count, wants top, skipped) span out of the
    step's prompt logprobs (already on the host)."""
    if not spans:
        return []
    return [PromptLogprobSpan(row, prompt.logprobs[t:t + k], prompt.top_ids[t:t + k] if top else None,
                              prompt.top_logprobs[t:t + k] if top else None, skipped)
            for row, t, k, top, skipped in spans]


def _bucket(value: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= value:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


class ModelRunner:
    def __init__(self, model: LoadedModel, *, block_size: int, num_blocks: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, backend: str = "xla",
                 max_logprobs: int = 20, enforce_eager: bool = False, decode_steps: int = 1,
                 draft: LoadedModel | None = None, num_speculative_tokens: int = 0):
        self.model = model
        self.spec = model.spec
        self.mesh = model.mesh
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.backend = backend
        self.num_top_logprobs = max_logprobs
        self.enforce_eager = enforce_eager
        self.decode_steps = decode_steps
        self.trash_slot = max_num_seqs
        self.seq_buckets = _pow2_buckets(max_num_seqs)
        self.token_buckets = _pow2_buckets(max_num_batched_tokens, start=16)
        self.num_compiled_steps = 0
        self.lazily_compiled: set[tuple[int, int, bool]] = set()  # buckets first compiled by a step
        # LoRA adapters (engine.lora_manager.LoraManager) when enabled: each token then
        # carries its adapter's slot in md.lora_slots.
        self.lora = None
        # Encoder-decoder (T5): steps that admit requests first run their prompts through the
        # encoder (a second jitted function, bucketed over encoder tokens), which writes the
        # cross-attention K/V into each sequence's cross blocks of the same paged cache.
        self.encoder_decoder = self.spec.is_encoder_decoder
        # Speculative decoding: the draft model (whole on every device, or sharded like the
        # target) and its paged cache, which has a block for every block of the target's.
        self.draft = draft
        self.num_speculative_tokens = num_speculative_tokens if draft is not None else 0

        self.kv_caches, self.kv_sharding = self._allocate_kv_cache(model)
        if draft is not None:
            self.draft_kv_caches, self.draft_kv_sharding = self._allocate_kv_cache(draft)
        vocab = self.spec.vocab_size
        rep = parallel.replicated(self.mesh)
        rows = max_num_seqs + 1
        self.prompt_mask = jax.jit(lambda: jnp.zeros((rows, vocab), jnp.bool_), out_shardings=rep)()
        self.output_counts = jax.jit(lambda: jnp.zeros((rows, vocab), jnp.int32), out_shardings=rep)()

        graphdef = model.graphdef
        num_top = self.num_top_logprobs  # top alternatives of sampled and of prompt tokens
        max_steps = max(1, self.decode_steps)
        k = self.num_speculative_tokens
        block_size = self.block_size
        draft_graphdef = draft.graphdef if draft is not None else None

        def logits_at(module, hidden, index, mesh):
            return parallel.gather_for_sampling(module.logits(hidden[index]), mesh)

        def forward(module, kv_caches, counts, input_ids, token_is_output, token_slots, md, batch=None):
            """The model over the step's tokens, and the penalty bookkeeping of its inputs.
            Returns (hidden, kv_caches, counts, prompt-token logprobs); ``batch`` None: no
            prompt tokens (decode steps)."""
            hidden, kv_caches = module(input_ids, kv_caches, md)
            if batch is None:
                prompt_lps = no_prompt_logprobs(input_ids.shape[0], num_top)
            else:  # skipped at run time unless a request in the batch asked for them
                prompt_lps = step_prompt_logprobs(module, hidden, batch, num_top)
            # Count this step's input tokens (prompt tokens in the mask, generated ones in
            # the counts) in their sequence's row; tokens of the trash row are not counted.
            prompt_mask, output_counts = counts
            trash = prompt_mask.shape[0] - 1
            prompt_rows = jnp.where(token_is_output, trash, token_slots)
            output_rows = jnp.where(token_is_output, token_slots, trash)
            counts = (prompt_mask.at[prompt_rows, input_ids].set(True),
                      output_counts.at[output_rows, input_ids].add(1))
            return hidden, kv_caches, counts, prompt_lps

        def forward_and_sample(module, kv_caches, counts, input_ids, token_is_output, md, batch: StepBatch,
                               sampling, prompt_tokens: bool = False):
            hidden, kv_caches, counts, prompt_lps = forward(module, kv_caches, counts, input_ids, token_is_output,
                                                            batch.token_slots, md, batch if prompt_tokens else None)
            out = sample(logits_at(module, hidden, md.logits_indices, self.mesh), *counts, batch.slots, sampling,
                         num_top)
            return kv_caches, counts, out, prompt_lps

        def mixed_step(module, kv_caches, counts, batch: StepBatch):
            kv_caches, counts, out, prompt_lps = forward_and_sample(
                module, kv_caches, counts, batch.input_ids, batch.token_is_output, batch.md, batch,
                batch.sampling, prompt_tokens=True)
            out = jax.tree_util.tree_map(lambda x: x[:, None], out)  # one token per row
            out = dataclasses.replace(out, num_tokens=jnp.ones(out.token_ids.shape[:1], jnp.int32))
            return kv_caches, counts, out, prompt_lps

        def decode_steps(module, kv_caches, counts, batch: StepBatch, num_steps):
            """num_steps decode steps (a traced scalar, up to max_steps) in one dispatch:
            each step's samples are the next step's inputs, positions and KV slots
            advance on the device (the host reserved the blocks). Host overhead is paid
            once per num_steps tokens."""
            md0 = batch.md
            num_seqs = batch.slots.shape[0]
            rows = jnp.arange(num_seqs, dtype=jnp.int32)
            outs = SampleOutput(
                jnp.zeros((num_seqs, max_steps), jnp.int32), jnp.zeros((num_seqs, max_steps), jnp.float32),
                jnp.zeros((num_seqs, max_steps, num_top), jnp.int32),
                jnp.zeros((num_seqs, max_steps, num_top), jnp.float32))

            def one_step(i, carry):
                kv_caches, counts, input_ids, outs = carry
                md = md0.decode_step(rows, md0.seq_lens + i, md0.seq_lens > 0, block_size)
                sampling = dataclasses.replace(batch.sampling, sample_index=batch.sampling.sample_index + i)
                token_is_output = jnp.where(i == 0, batch.token_is_output, True)
                kv_caches, counts, out, _ = forward_and_sample(module, kv_caches, counts, input_ids,
                                                               token_is_output, md, batch, sampling)
                outs = jax.tree_util.tree_map(lambda buf, x: buf.at[:, i].set(x), outs, out)
                return kv_caches, counts, out.token_ids, outs

            kv_caches, counts, _, outs = jax.lax.fori_loop(
                0, num_steps, one_step, (kv_caches, counts, batch.input_ids, outs))
            # Decode tokens are never prompt tokens (a recomputed prompt runs as a mixed step).
            outs = dataclasses.replace(outs, num_tokens=jnp.full((num_seqs,), num_steps, jnp.int32))
            return kv_caches, counts, outs, no_prompt_logprobs(batch.input_ids.shape[0], num_top)

        def propose(draft_module, draft_kv, batch: StepBatch, num_steps):
            """The draft's proposals [S, K] for each row (num_proposals of them; num_steps,
            a traced scalar, is the largest) and the distributions q [S, K, V] they were
            drawn from: decode steps of the draft from the row's last known token."""
            md0, sampling = batch.md, batch.sampling
            last = md0.logits_indices
            seq_lens = md0.positions[last] + 1
            num_seqs, vocab = last.shape[0], draft.spec.vocab_size

            def one(i, carry):
                draft_kv, tokens, proposals, probs = carry
                md = md0.decode_step(last, seq_lens + i, batch.num_proposals > i, block_size)
                hidden, draft_kv = draft_module(tokens, draft_kv, md)
                # draft.mesh: the target's when the draft is sharded like it, else the draft's
                # own one-device mesh (its logits are whole on every device already).
                new_tokens, q = sample_proposal(logits_at(draft_module, hidden, md.logits_indices, draft.mesh),
                                                sampling, sampling.sample_index + i)
                return draft_kv, new_tokens, proposals.at[:, i].set(new_tokens), probs.at[:, i].set(q)

            init = (draft_kv, batch.input_ids[last], jnp.zeros((num_seqs, k), jnp.int32),
                    jnp.zeros((num_seqs, k, vocab), jnp.float32))
            draft_kv, _, proposals, probs = jax.lax.fori_loop(0, num_steps, one, init)
            return draft_kv, proposals, probs

        def speculative_step(modules, kv_caches, counts, batch: StepBatch, num_steps):
            """Propose, verify beside the other rows' tokens, rejection-sample."""
            (module, draft_module), (kv_caches, draft_kv) = modules, kv_caches
            md = batch.md
            draft_kv, proposals, draft_probs = propose(draft_module, draft_kv, batch, num_steps)
            # The proposals take the places reserved for them after each row's last token.
            j = jnp.arange(k)[None, :]
            places = jnp.where(j < batch.num_proposals[:, None], md.logits_indices[:, None] + 1 + j,
                               batch.input_ids.shape[0])
            input_ids = batch.input_ids.at[places].set(proposals, mode="drop")
            # Proposals carry the trash row in token_slots: counted for penalties once accepted.
            hidden, kv_caches, counts, prompt_lps = forward(module, kv_caches, counts, input_ids,
                                                            batch.token_is_output, batch.token_slots, md, batch)
            # The draft computes the same positions, keeping its cache in step with the target's.
            _, draft_kv = draft_module(input_ids, draft_kv, md)
            verified = md.logits_indices[:, None] + jnp.minimum(jnp.arange(k + 1)[None, :],
                                                                batch.num_proposals[:, None])  # [S, K+1]
            logits = logits_at(module, hidden, verified.reshape(-1), self.mesh).reshape(verified.shape + (-1,))
            out = rejection_sample(logits, proposals, draft_probs, batch.num_proposals, *counts, batch.slots,
                                   batch.sampling, num_top)
            prompt_mask, output_counts = counts
            counted = jnp.where(j < out.num_tokens[:, None] - 1, batch.slots[:, None], prompt_mask.shape[0] - 1)
            counts = (prompt_mask, output_counts.at[counted, proposals].add(1))
            return (kv_caches, draft_kv), counts, out, prompt_lps

        def step_fn(state, kv_caches, prompt_mask, output_counts, batch: StepBatch, num_steps):
            """Returns outputs [S, N]: N = 1 for mixed batches, max_steps for decode-only
            batches (num_steps of them valid), k + 1 with a draft."""
            self.num_step_traces += 1  # Python runs only while JAX traces: counts traces
            # Clear the count rows of sequences placed since their last step.
            counts = (prompt_mask.at[batch.reset_slots].set(False), output_counts.at[batch.reset_slots].set(0))
            if draft_graphdef is not None:
                modules = (nnx.merge(graphdef, state[0]), nnx.merge(draft_graphdef, state[1]))
                kv_caches, counts, out, prompt_lps = speculative_step(modules, kv_caches, counts, batch, num_steps)
            elif batch.md.decode_only:
                kv_caches, counts, out, prompt_lps = decode_steps(nnx.merge(graphdef, state), kv_caches, counts,
                                                                  batch, num_steps)
            else:
                kv_caches, counts, out, prompt_lps = mixed_step(nnx.merge(graphdef, state), kv_caches, counts, batch)
            return (kv_caches, *counts, (out, prompt_lps))

        # Outputs keep the inputs' placements so that every step (and every ahead-of-time
        # compiled bucket) sees the same shardings.
        kv_sharding = self.kv_sharding if draft is None else (self.kv_sharding, self.draft_kv_sharding)
        self._step = jax.jit(step_fn, donate_argnums=(1, 2, 3), out_shardings=(kv_sharding, rep, rep, rep))
        self._compiled: dict[tuple[int, int, bool], object] = {}
        self.num_step_traces = 0
        # Compiled steps of earlier processes (None: off, with the compilation cache or eager).
        self.executable_cache = None if enforce_eager else ExecutableCache.from_jax_config(self._program())

        def encode_fn(state, kv_caches, encoder_ids, encoder_md):
            return nnx.merge(graphdef, state).encode(encoder_ids, kv_caches, encoder_md)

        self._encode = jax.jit(encode_fn, donate_argnums=(1,), out_shardings=self.kv_sharding)
        self._compiled_encode: dict[int, object] = {}

    # -- KV cache ------------------------------------------------------------------

    def _allocate_kv_cache(self, model: LoadedModel):
        """A paged cache for ``model`` (the target, or the draft: the same block ids) on the
        target's mesh: split by KV heads when the model is sharded like the target, whole
        on every device when it is kept whole (a draft with draft_model_tp_size=1).
        Returns (caches, sharding)."""
        spec = model.spec
        # One shape per layer (DeciLM's layers differ in KV heads). Every layer's head
        # count divides the TP degree (loader.spec_for_mesh), so one sharding fits all.
        shapes = [(spec.layer_kv_heads(i), self.num_blocks, self.block_size, spec.head_dim)
                  for i in range(spec.num_layers)]
        if model.mesh.shape[parallel.TP_AXIS] == self.mesh.shape[parallel.TP_AXIS]:
            sharding = NamedSharding(self.mesh, parallel.partition_spec(("kv_heads", None, None, None),
                                                                        shapes[0], self.mesh))
        else:
            sharding = parallel.replicated(self.mesh)
        zeros = {shape: jax.jit(lambda shape=shape: jnp.zeros(shape, model.dtype), out_shardings=sharding)
                 for shape in set(shapes)}
        caches = [(zeros[shape](), zeros[shape]()) for shape in shapes]
        logger.info("KV cache%s: %d blocks of %d tokens = %d tokens (%.2f GiB)",
                    "" if model is self.model else " of the draft", self.num_blocks, self.block_size,
                    (self.num_blocks - 1) * self.block_size,
                    kv_cache_bytes_per_block(spec, self.block_size, model.dtype) * self.num_blocks / 2**30)
        return caches, sharding

    # -- batch packing -------------------------------------------------------------

    def shapes_for(self, num_tokens: int, num_seqs: int, decode_only: bool) -> tuple[int, int]:
        if self.enforce_eager:
            return num_tokens, num_seqs
        if decode_only and self.draft is None:  # one token per sequence
            s = _bucket(num_seqs, self.seq_buckets)
            return s, s
        t = _bucket(num_tokens, self.token_buckets)
        return t, min(t, self.seq_buckets[-1])

    def _pack(self, sched: SchedulerOutput) -> tuple[StepBatch, list[tuple[int, int, int, bool, int]]]:
        """The step's batch, and the (item index, first token, count, wants top, skipped)
        spans of tokens whose next prompt token's logprob is wanted."""
        decode_only = sched.is_decode_only
        T, S = self.shapes_for(sched.num_tokens, len(sched.scheduled), decode_only)
        if self.lora is not None:  # the step's adapters into device slots
            self.lora.activate({item.seq.request.adapter for item in sched.scheduled})
        builder = StepBatchBuilder(self, T, S, cross=self.encoder_decoder)
        prompt_spans = []
        for row, item in enumerate(sched.scheduled):
            span = builder.add(row, item.seq, item.num_new_tokens, item.num_spec_tokens)
            if span is not None:
                prompt_spans.append(span)
        return builder.build(decode_only), prompt_spans

    def _pack_encoder(self, sched: SchedulerOutput):
        """(encoder token ids [E], metadata) of the prompts this step runs through the
        encoder (E a token bucket), or None. Each token's slot is its place in the
        sequence's cross blocks; padding tokens have token_seq_ids -1."""
        num_tokens = sched.num_encoder_tokens
        if not num_tokens:
            return None
        E = num_tokens if self.enforce_eager else _bucket(num_tokens, self.token_buckets)
        items = [item for item in sched.scheduled if item.num_encoder_tokens]
        builder = StepMetadataBuilder(E, min(E, self.seq_buckets[-1]), self.max_blocks_per_seq, self.block_size)
        ids = np.zeros(E, np.int32)
        for row, item in enumerate(items):
            tokens = builder.add_sequence(row, item.seq.cross_block_ids, 0, item.num_encoder_tokens)
            ids[tokens] = item.seq.request.encoder_prompt_token_ids
        builder.token_seq_ids[builder.num_tokens:] = -1
        return ids, builder.build(backend=self.backend)

    def _run_encoder(self, encoder_ids, encoder_md) -> None:
        key = encoder_ids.shape[0]
        encode = self._compiled_encode.get(key)
        if encode is None:  # not warmed up: jit compiles this bucket on its first use
            encode = self._encode
            self.lazily_compiled.add(("encoder", key))
        self.kv_caches = encode(self.model.state, self.kv_caches, encoder_ids, encoder_md)

    def dummy_encoder_batch(self, E: int):
        """An all-padding encoder batch of E tokens (writes go to trash block 0)."""
        builder = StepMetadataBuilder(E, min(E, self.seq_buckets[-1]), self.max_blocks_per_seq, self.block_size)
        builder.token_seq_ids[:] = -1
        return np.zeros(E, np.int32), builder.build(backend=self.backend)

    # -- execution -----------------------------------------------------------------

    def execute(self, sched: SchedulerOutput, num_steps: int = 1) -> ModelRunnerOutput:
        """Run the step; decode-only batches may run num_steps decode steps in one
        dispatch; with a draft, rows verify the spec tokens the scheduler gave them."""
        t0 = time.perf_counter()
        encoder_batch = self._pack_encoder(sched) if self.encoder_decoder else None
        batch, prompt_spans = self._pack(sched)
        if self.draft is not None:  # the draft's loop runs as often as the longest proposal
            num_steps = max((item.num_spec_tokens for item in sched.scheduled), default=0)
        if multihost.is_multiprocess():
            batch = multihost.broadcast_batch(batch, batch.input_ids.shape[0], batch.slots.shape[0],
                                              batch.md.decode_only, num_steps)
        t1 = time.perf_counter()
        if encoder_batch is not None:  # before the decoder step that reads its cross K/V
            self._run_encoder(*encoder_batch)
        out, prompt_lps = self._run(batch, num_steps)
        # One transfer of everything (blocks until the device is done).
        out, prompt_lps = jax.device_get((out, wanted_prompt_logprobs(prompt_lps, prompt_spans)))
        t2 = time.perf_counter()
        n = len(sched.scheduled)
        samples = np.array([item.samples for item in sched.scheduled], bool)
        return ModelRunnerOutput(out.token_ids[:n], out.logprobs[:n], out.top_ids[:n], out.top_logprobs[:n],
                                 num_tokens=np.where(samples, out.num_tokens[:n], 0),
                                 host_time=t1 - t0, device_time=t2 - t1,
                                 prompt_logprobs=prompt_logprob_spans(prompt_spans, prompt_lps))

    def _args(self, batch: StepBatch, num_steps: int):
        if self.draft is None:
            state, kv_caches = self.model.state, self.kv_caches
        else:
            state, kv_caches = (self.model.state, self.draft.state), (self.kv_caches, self.draft_kv_caches)
        return (state, kv_caches, self.prompt_mask, self.output_counts, batch, np.int32(num_steps))

    def _run(self, batch: StepBatch, num_steps: int = 1) -> tuple[SampleOutput, PromptLogprobs]:
        """Returns (samples [S, N, ...], prompt-token logprobs)."""
        key = (batch.input_ids.shape[0], batch.slots.shape[0], batch.md.decode_only)
        step = self._compiled.get(key)
        if step is None:  # not warmed up
            self.lazily_compiled.add(key)
            if self.executable_cache is None:  # jit compiles this bucket on its first use
                step = self._step
            else:  # loaded from an earlier process, or compiled now and stored for the next
                step = self._compiled[key] = self._compile_step(key, self._args(batch, num_steps))
        kv_caches, self.prompt_mask, self.output_counts, out = step(*self._args(batch, num_steps))
        if self.draft is None:
            self.kv_caches = kv_caches
        else:
            self.kv_caches, self.draft_kv_caches = kv_caches
        return out

    def _program(self) -> dict:
        """What shapes the step program besides its arguments (the executable cache's key)."""
        return {"runner": type(self).__qualname__, "spec": repr(self.spec), "dtype": str(self.model.dtype),
                "block_size": self.block_size, "num_blocks": self.num_blocks, "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens, "max_model_len": self.max_model_len,
                "backend": self.backend, "num_top_logprobs": self.num_top_logprobs,
                "decode_steps": self.decode_steps,
                "draft": None if self.draft is None else {
                    "spec": repr(self.draft.spec), "dtype": str(self.draft.dtype),
                    "tp": self.draft.mesh.shape[parallel.TP_AXIS],
                    "num_speculative_tokens": self.num_speculative_tokens}}

    def _compile_step(self, key, args):
        """The compiled step of bucket ``key``: from the executable cache, else traced,
        lowered and compiled (the persistent compilation cache may skip the compile) and stored."""
        cache = self.executable_cache
        compiled = cache.load(key, args) if cache is not None else None
        if compiled is None and cache is None:
            compiled = self._step.lower(*args).compile()
        elif compiled is None:
            with fresh_compiles():  # what is stored must not come from JAX's cache (see there)
                compiled = self._step.lower(*args).compile()
            cache.store(key, args, compiled)
        return compiled

    def warmup_shapes(self) -> list[tuple[int, int, bool]]:
        """(tokens, sequences, decode_only) of every compiled step."""
        most_seqs = self.seq_buckets[-1]
        if self.draft is None:
            shapes = [(s, s, True) for s in self.seq_buckets]
        else:  # decode rows, each with up to k proposals
            most = _bucket(min(most_seqs * (self.num_speculative_tokens + 1), self.max_num_batched_tokens),
                           self.token_buckets)
            shapes = [(t, min(t, most_seqs), True) for t in self.token_buckets if t <= most]
        shapes += [(t, min(t, most_seqs), False) for t in self.token_buckets]
        return shapes

    def largest_shapes(self) -> list[tuple[int, int, bool]]:
        """The largest decode-only and mixed buckets: their temporaries bound every step's."""
        shapes = self.warmup_shapes()
        return [max(s for s in shapes if s[2] is kind) for kind in (True, False)]

    def warmup(self, progress: bool = True, threads: int | None = None) -> None:
        """Compile every bucket ahead of time, several at once (XLA compiles in parallel
        threads), then run each once on padding (writes go to trash block 0)."""
        if self.lora is not None:
            self.lora.warmup()
        if self.enforce_eager:
            return
        import concurrent.futures
        import os

        from tqdm.auto import tqdm

        shapes = self.warmup_shapes()
        threads = threads or min(len(shapes), max(1, (os.cpu_count() or 2) // 2))

        def compile_one(shape):
            return shape, self._compile_step(shape, self._args(self.dummy_batch(*shape), 1))

        with concurrent.futures.ThreadPoolExecutor(threads) as pool, \
                tqdm(total=len(shapes), desc="compiling buckets", disable=not progress) as bar:
            for shape, compiled in pool.map(compile_one, shapes):
                self._compiled[shape] = compiled
                bar.update(1)
        for shape in shapes:
            jax.block_until_ready(self._run(self.dummy_batch(*shape), 1))
            self.num_compiled_steps += 1
        if self.encoder_decoder:  # the encoder's buckets: one per token bucket
            for E in tqdm(self.token_buckets, desc="compiling encoder buckets", disable=not progress):
                ids, md = self.dummy_encoder_batch(E)
                self._compiled_encode[E] = self._encode.lower(self.model.state, self.kv_caches, ids, md).compile()
                self._run_encoder(ids, md)
                self.num_compiled_steps += 1

    def dummy_batch(self, T: int, S: int, decode_only: bool) -> StepBatch:
        """An all-padding batch of the given bucket (for compiling and warm-up)."""
        return StepBatchBuilder(self, T, S, cross=self.encoder_decoder).build(decode_only)


class StepBatchBuilder:
    """The one place a step's inputs are assembled on the host: T tokens and S sequence
    rows, all padding until sequences are added."""

    def __init__(self, runner: ModelRunner, num_tokens: int, num_seqs: int, cross: bool = False):
        self.runner = runner
        T, S, trash = num_tokens, num_seqs, runner.trash_slot
        self.metadata = StepMetadataBuilder(T, S, runner.max_blocks_per_seq, runner.block_size,
                                            lora=runner.lora is not None, cross=cross)
        self.input_ids = np.zeros(T, np.int32)
        self.token_is_output = np.zeros(T, np.bool_)
        self.token_slots = np.full(T, trash, np.int32)
        self.slots = np.full(S, trash, np.int32)
        self.reset_slots = np.full(S, trash, np.int32)
        self.prompt_targets = np.full(T, -1, np.int32)
        self.num_proposals = np.zeros(S, np.int32)
        self.sampling = SamplingBatch(
            temperature=np.zeros(S, np.float32), top_k=np.zeros(S, np.int32), top_p=np.ones(S, np.float32),
            min_p=np.zeros(S, np.float32), repetition_penalty=np.ones(S, np.float32),
            presence_penalty=np.zeros(S, np.float32), frequency_penalty=np.zeros(S, np.float32),
            seeds=np.zeros(S, np.uint32), sample_index=np.zeros(S, np.int32), top_n=np.zeros(S, np.int32))

    def add(self, row: int, seq, num_new_tokens: int, num_proposals: int = 0) -> tuple[int, int, int, bool, int] | None:
        """Sequence ``seq`` computes its next ``num_new_tokens`` tokens in row ``row``, then
        verifies ``num_proposals`` draft proposals (put into the places after them on the
        device). Returns its (row, first token, count, wants top alternatives, positions skipped
        before the first) span of wanted prompt logprobs, if any."""
        start, n = seq.num_computed_tokens, num_new_tokens
        tokens = self.metadata.add_sequence(row, seq.block_ids, start, n + num_proposals, num_proposals)
        if self.metadata.cross_lens is not None:  # encoder-decoder: where its encoder's K/V are
            self.metadata.add_cross(row, seq.cross_block_ids, len(seq.request.encoder_prompt_token_ids))
        t = tokens.start
        if self.runner.lora is not None:
            self.metadata.lora_slots[tokens] = self.runner.lora.slot(seq.request.adapter)
        self.input_ids[t:t + n] = seq.token_ids[start:start + n]
        self.token_is_output[tokens] = np.arange(start, start + n + num_proposals) >= seq.num_prompt_tokens
        self.num_proposals[row] = num_proposals
        self.slots[row] = seq.slot
        p = seq.request.sampling_params
        if p.uses_penalties:  # only penalized sequences need their tokens counted
            # (proposals are counted on the device once accepted)
            self.token_slots[t:t + n] = seq.slot
        if seq.needs_slot_reset:
            self.reset_slots[row] = seq.slot
            seq.needs_slot_reset = False
        sampling = self.sampling
        sampling.temperature[row] = p.temperature
        sampling.top_k[row] = p.top_k
        sampling.top_p[row] = p.top_p
        sampling.min_p[row] = p.min_p
        sampling.repetition_penalty[row] = p.repetition_penalty
        sampling.presence_penalty[row] = p.presence_penalty
        sampling.frequency_penalty[row] = p.frequency_penalty
        sampling.seeds[row] = seq.seed
        sampling.sample_index[row] = seq.num_output_tokens
        sampling.top_n[row] = p.top_n_tokens
        if p.prompt_logprobs and seq.index == 0:
            # The token at position q predicts the prompt token at q + 1; positions before
            # prompt_logprobs_from - 1 predict nothing wanted.
            first = max(start, p.prompt_logprobs_from - 1)
            k = max(0, min(start + n, seq.num_prompt_tokens - 1) - first)
            t += first - start
            self.prompt_targets[t:t + k] = seq.token_ids[first + 1:first + 1 + k]
            if k:
                return row, t, k, p.top_n_tokens > 0, first - start
        return None

    def build(self, decode_only: bool) -> StepBatch:
        md = self.metadata.build(decode_only=decode_only, backend=self.runner.backend)
        return StepBatch(self.input_ids, self.token_is_output, self.token_slots, md, self.slots,
                         self.reset_slots, self.sampling, self.prompt_targets, self.num_proposals)


def kv_cache_bytes_per_block(spec, block_size: int, dtype) -> int:
    return 2 * spec.total_kv_heads * block_size * spec.head_dim * jnp.dtype(dtype).itemsize
