"""Runs one scheduler step on the device: packs a fixed-shape batch, calls ONE
jitted step (model + sampling) with the KV cache donated, returns sampled tokens.

Shapes are bucketed so that every step after warm-up reuses a compiled graph
("CUDA graphs" in JAX):
  * decode steps (every sequence has one new token): S = T = a sequence bucket;
  * mixed / prefill steps: T = a token bucket, S = min(T, largest sequence bucket).
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

from .. import parallel
from ..models.step_metadata import StepMetadata, StepMetadataBuilder
from ..models.loader import LoadedModel
from . import multihost
from .executable_cache import ExecutableCache, fresh_compiles
from .sampler import SampleOutput, SamplingBatch, sample
from .scheduler import SchedulerOutput

logger = logging.getLogger("lmidist_jax")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepBatch:
    input_ids: jax.Array        # [T] i32
    token_is_output: jax.Array  # [T] bool: generated (vs prompt) token, for penalty counts
    token_slots: jax.Array      # [T] i32 penalty-count row of each token (trash row for padding)
    md: StepMetadata
    slots: jax.Array            # [S] i32 penalty-count row of each sequence (trash row for padding)
    reset_slots: jax.Array      # [S] i32 rows to clear before this step (trash row = none)
    sampling: SamplingBatch
    prompt_targets: jax.Array   # [T] i32 next prompt token whose logprob is wanted (-1 = none)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptLogprobs:
    """What a step computes for the prompt tokens whose successor's logprob is wanted."""

    logprobs: jax.Array      # [T] f32 log p(next prompt token), 0 where not wanted
    top_ids: jax.Array       # [T, K] i32 top alternatives (rows whose sequence asked for top_n_tokens)
    top_logprobs: jax.Array  # [T, K] f32


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
    token_ids: np.ndarray      # [num_scheduled] (or [num_steps, num_scheduled])
    logprobs: np.ndarray       # same
    top_ids: np.ndarray        # [..., num_scheduled, K]
    top_logprobs: np.ndarray   # [..., num_scheduled, K]
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


def prompt_token_logprobs(module, hidden, targets, top_wanted, num_top: int) -> PromptLogprobs:
    """hidden [T, E], targets [T] (-1 = not wanted), top_wanted [T] bool -> log p(target)
    under the raw model distribution (no penalties or temperature; 0 where not wanted) and,
    where ``top_wanted``, the ``num_top`` best tokens and their logprobs (from the same
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
                 max_logprobs: int = 20, enforce_eager: bool = False, decode_steps: int = 1):
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

        self.kv_caches = self._allocate_kv_cache()
        vocab = self.spec.vocab_size
        rep = parallel.replicated(self.mesh)
        rows = max_num_seqs + 1
        self.prompt_mask = jax.jit(lambda: jnp.zeros((rows, vocab), jnp.bool_), out_shardings=rep)()
        self.output_counts = jax.jit(lambda: jnp.zeros((rows, vocab), jnp.int32), out_shardings=rep)()

        graphdef = model.graphdef
        num_top = self.num_top_logprobs  # top alternatives of sampled and of prompt tokens

        block_size = self.block_size

        def forward_and_sample(module, kv_caches, prompt_mask, output_counts, input_ids,
                               token_is_output, token_slots, md, slots, sampling, batch=None):
            hidden, kv_caches = module(input_ids, kv_caches, md)
            if batch is None:  # decode steps: no prompt tokens
                prompt_lps = no_prompt_logprobs(input_ids.shape[0], num_top)
            else:
                prompt_lps = step_prompt_logprobs(module, hidden, batch, num_top)
            # Penalty bookkeeping: count this step's input tokens (prompt tokens in the
            # mask, generated ones in the counts) in their sequence's row.
            trash = prompt_mask.shape[0] - 1
            prompt_rows = jnp.where(token_is_output, trash, token_slots)
            output_rows = jnp.where(token_is_output, token_slots, trash)
            prompt_mask = prompt_mask.at[prompt_rows, input_ids].set(True)
            output_counts = output_counts.at[output_rows, input_ids].add(1)
            logits = parallel.gather_for_sampling(module.logits(hidden[md.logits_indices]), self.mesh)
            out = sample(logits, prompt_mask, output_counts, slots, sampling, num_top)
            return kv_caches, prompt_mask, output_counts, out, prompt_lps

        max_steps = max(1, self.decode_steps)

        def step_fn(state, kv_caches, prompt_mask, output_counts, batch: StepBatch, num_steps):
            """Returns outputs stacked [steps, S, ...]: 1 step for mixed batches, up to
            max_steps (num_steps, a traced scalar) for decode-only batches."""
            self.num_step_traces += 1  # Python runs only while JAX traces: counts traces
            module = nnx.merge(graphdef, state)
            # Clear the count rows of sequences placed since their last step.
            prompt_mask = prompt_mask.at[batch.reset_slots].set(False)
            output_counts = output_counts.at[batch.reset_slots].set(0)
            if not batch.md.decode_only:
                kv_caches, prompt_mask, output_counts, out, prompt_lps = forward_and_sample(
                    module, kv_caches, prompt_mask, output_counts, batch.input_ids, batch.token_is_output,
                    batch.token_slots, batch.md, batch.slots, batch.sampling, batch)
                return (kv_caches, prompt_mask, output_counts,
                        (jax.tree_util.tree_map(lambda x: x[None], out), prompt_lps))
            # Decode: num_steps steps in one dispatch; each step's samples are the next
            # step's inputs, positions and KV slots advance on the device (the host
            # reserved the blocks). Host overhead is paid once per num_steps tokens.
            md0 = batch.md
            valid = md0.seq_lens > 0
            num_seqs = batch.slots.shape[0]
            outs = SampleOutput(
                jnp.zeros((max_steps, num_seqs), jnp.int32), jnp.zeros((max_steps, num_seqs), jnp.float32),
                jnp.zeros((max_steps, num_seqs, num_top), jnp.int32),
                jnp.zeros((max_steps, num_seqs, num_top), jnp.float32))

            def one_step(i, carry):
                kv_caches, prompt_mask, output_counts, input_ids, outs = carry
                seq_lens = jnp.where(valid, md0.seq_lens + i, 0)
                positions = jnp.maximum(seq_lens - 1, 0)
                blocks = jnp.take_along_axis(md0.block_tables, (positions // block_size)[:, None], axis=1)[:, 0]
                md = dataclasses.replace(md0, positions=positions, seq_lens=seq_lens,
                                         slot_mapping=jnp.where(valid, blocks * block_size + positions % block_size, 0))
                sampling = dataclasses.replace(batch.sampling, sample_index=batch.sampling.sample_index + i)
                token_is_output = jnp.where(i == 0, batch.token_is_output, True)
                kv_caches, prompt_mask, output_counts, out, _ = forward_and_sample(
                    module, kv_caches, prompt_mask, output_counts, input_ids, token_is_output,
                    batch.token_slots, md, batch.slots, sampling)
                outs = jax.tree_util.tree_map(lambda buf, x: buf.at[i].set(x), outs, out)
                return kv_caches, prompt_mask, output_counts, out.token_ids, outs

            kv_caches, prompt_mask, output_counts, _, outs = jax.lax.fori_loop(
                0, num_steps, one_step, (kv_caches, prompt_mask, output_counts, batch.input_ids, outs))
            # Decode tokens are never prompt tokens (a recomputed prompt runs as a mixed step).
            return (kv_caches, prompt_mask, output_counts,
                    (outs, no_prompt_logprobs(batch.input_ids.shape[0], num_top)))

        # Outputs keep the inputs' placements so that every step (and every ahead-of-time
        # compiled bucket) sees the same shardings.
        rep = parallel.replicated(self.mesh)
        self._step = jax.jit(step_fn, donate_argnums=(1, 2, 3),
                             out_shardings=(self.kv_sharding, rep, rep, rep))
        self._compiled: dict[tuple[int, int, bool], object] = {}
        self.num_step_traces = 0
        # Compiled steps of earlier processes (None: off, with the compilation cache or eager).
        self.executable_cache = None if enforce_eager else ExecutableCache.from_jax_config(self._program())

        def encode_fn(state, kv_caches, encoder_ids, encoder_md):
            return nnx.merge(graphdef, state).encode(encoder_ids, kv_caches, encoder_md)

        self._encode = jax.jit(encode_fn, donate_argnums=(1,), out_shardings=self.kv_sharding)
        self._compiled_encode: dict[int, object] = {}

    # -- KV cache ------------------------------------------------------------------

    def _allocate_kv_cache(self):
        spec = self.spec
        # One shape per layer (DeciLM's layers differ in KV heads). Every layer's head
        # count divides the TP degree (loader.spec_for_mesh), so one sharding fits all.
        shapes = [(spec.layer_kv_heads(i), self.num_blocks, self.block_size, spec.head_dim)
                  for i in range(spec.num_layers)]
        sharding = NamedSharding(self.mesh, parallel.partition_spec(("kv_heads", None, None, None),
                                                                    shapes[0], self.mesh))
        self.kv_sharding = sharding
        zeros = {shape: jax.jit(lambda shape=shape: jnp.zeros(shape, self.model.dtype), out_shardings=sharding)
                 for shape in set(shapes)}
        caches = [(zeros[shape](), zeros[shape]()) for shape in shapes]
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)", self.num_blocks,
                    self.block_size, (self.num_blocks - 1) * self.block_size,
                    kv_cache_bytes_per_block(spec, self.block_size, self.model.dtype) * self.num_blocks / 2**30)
        return caches

    # -- batch packing -------------------------------------------------------------

    def shapes_for(self, num_tokens: int, num_seqs: int, decode_only: bool) -> tuple[int, int]:
        if self.enforce_eager:
            return num_tokens, num_seqs
        if decode_only:
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
            span = builder.add(row, item.seq, item.num_new_tokens)
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
        dispatch. Outputs are [num_steps, num_scheduled, ...]."""
        t0 = time.perf_counter()
        encoder_batch = self._pack_encoder(sched) if self.encoder_decoder else None
        batch, prompt_spans = self._pack(sched)
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
        return ModelRunnerOutput(out.token_ids[:num_steps, :n], out.logprobs[:num_steps, :n],
                                 out.top_ids[:num_steps, :n], out.top_logprobs[:num_steps, :n],
                                 host_time=t1 - t0, device_time=t2 - t1,
                                 prompt_logprobs=prompt_logprob_spans(prompt_spans, prompt_lps))

    def _args(self, batch: StepBatch, num_steps: int):
        return (self.model.state, self.kv_caches, self.prompt_mask, self.output_counts, batch,
                np.int32(num_steps))

    def _run(self, batch: StepBatch, num_steps: int = 1) -> tuple[SampleOutput, PromptLogprobs]:
        """Returns (samples [steps, S, ...], prompt-token logprobs)."""
        key = (batch.input_ids.shape[0], batch.slots.shape[0], batch.md.decode_only)
        step = self._compiled.get(key)
        if step is None:  # not warmed up
            self.lazily_compiled.add(key)
            if self.executable_cache is None:  # jit compiles this bucket on its first use
                step = self._step
            else:  # loaded from an earlier process, or compiled now and stored for the next
                step = self._compiled[key] = self._compile_step(key, self._args(batch, num_steps))
        self.kv_caches, self.prompt_mask, self.output_counts, out = step(*self._args(batch, num_steps))
        return out

    def _program(self) -> dict:
        """What shapes the step program besides its arguments (the executable cache's key)."""
        return {"runner": type(self).__qualname__, "spec": repr(self.spec), "dtype": str(self.model.dtype),
                "block_size": self.block_size, "num_blocks": self.num_blocks, "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens, "max_model_len": self.max_model_len,
                "backend": self.backend, "num_top_logprobs": self.num_top_logprobs,
                "decode_steps": self.decode_steps}

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
        shapes = [(s, s, True) for s in self.seq_buckets]
        shapes += [(t, min(t, self.seq_buckets[-1]), False) for t in self.token_buckets]
        return shapes

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
        self.sampling = SamplingBatch(
            temperature=np.zeros(S, np.float32), top_k=np.zeros(S, np.int32), top_p=np.ones(S, np.float32),
            min_p=np.zeros(S, np.float32), repetition_penalty=np.ones(S, np.float32),
            presence_penalty=np.zeros(S, np.float32), frequency_penalty=np.zeros(S, np.float32),
            seeds=np.zeros(S, np.uint32), sample_index=np.zeros(S, np.int32), top_n=np.zeros(S, np.int32))

    def add(self, row: int, seq, num_new_tokens: int) -> tuple[int, int, int, bool, int] | None:
        """Sequence ``seq`` computes its next ``num_new_tokens`` tokens in row ``row``.
        Returns its (row, first token, count, wants top alternatives, positions skipped
        before the first) span of wanted prompt logprobs, if any."""
        start, n = seq.num_computed_tokens, num_new_tokens
        tokens = self.metadata.add_sequence(row, seq.block_ids, start, n)
        if self.metadata.cross_lens is not None:  # encoder-decoder: where its encoder's K/V are
            self.metadata.add_cross(row, seq.cross_block_ids, len(seq.request.encoder_prompt_token_ids))
        t = tokens.start
        if self.runner.lora is not None:
            self.metadata.lora_slots[tokens] = self.runner.lora.slot(seq.request.adapter)
        # Speculative rows run past the known tokens: the draft's proposals are put into
        # the remaining places on the device (engine/spec_decode.py).
        known = seq.token_ids[start:start + n]
        self.input_ids[t:t + len(known)] = known
        self.token_is_output[tokens] = np.arange(start, start + n) >= seq.num_prompt_tokens
        self.slots[row] = seq.slot
        p = seq.request.sampling_params
        if p.uses_penalties:  # only penalized sequences need their tokens counted
            self.token_slots[tokens] = seq.slot
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
                         self.reset_slots, self.sampling, self.prompt_targets)


def kv_cache_bytes_per_block(spec, block_size: int, dtype) -> int:
    return 2 * spec.total_kv_heads * block_size * spec.head_dim * jnp.dtype(dtype).itemsize
