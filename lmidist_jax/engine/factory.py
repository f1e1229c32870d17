"""Builds an LLMEngine from an EngineConfig: resolve and load the model (and a draft
model for speculative decoding, through the same loader), size the KV cache, compile
the step buckets."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import jax
import jax.numpy as jnp

from .. import parallel
from ..models.loader import load_model
from ..models.families import spec_from_hf_config
from .llm_engine import LLMEngine
from .model_runner import ModelRunner, kv_cache_bytes_per_block
from .spec_decode import check_draft_compatible

logger = logging.getLogger("lmidist_jax")

CPU_DEFAULT_KV_CACHE_GB = 1.0
# Prompt tokens per step when max_rolling_batch_prefill_tokens is unset: a longer
# prompt is prefilled in chunks, with the running requests' decode steps in between.
DEFAULT_PREFILL_TOKENS = 2048
# On the CPU a step takes time in proportion to its tokens, and every running stream and
# every request that arrives during a long prompt's prefill waits for the step in flight.
# Measured (benchmarks/cpu_path.py --phases chunks, SmolLM2-135M fp32, 2 shared cores, a
# 4,000-token prompt, budgets 256/512/1024/2048 round-robin): prefill 30.3/34.0/31.3/28.8 s
# (equal within the machine's noise), a 5-token request's time to first token beside it
# 2.5/3.9/9.1/32 s, a step 1.7/3.3/7.0/17 s.
CPU_DEFAULT_PREFILL_TOKENS = 256


def default_prefill_tokens(spec, max_num_seqs: int) -> int:
    """The prefill budget when max_rolling_batch_prefill_tokens is unset (before the
    max_model_len cap): DEFAULT_PREFILL_TOKENS, CPU_DEFAULT_PREFILL_TOKENS on the CPU,
    and at least one token per sequence. Encoder-decoder models keep
    DEFAULT_PREFILL_TOKENS everywhere: their encoder prompt runs whole, so the budget
    bounds the prompt length."""
    if getattr(spec, "is_encoder_decoder", False):
        return DEFAULT_PREFILL_TOKENS  # (plus one token per sequence: engine_for_model)
    on_cpu = jax.devices()[0].platform == "cpu"
    return max(CPU_DEFAULT_PREFILL_TOKENS if on_cpu else DEFAULT_PREFILL_TOKENS, max_num_seqs)


class EngineConfigError(ValueError):
    """The configuration cannot work for this model or machine (e.g. a too small KV cache)."""


def load_tokenizer(model_dir):
    """The model directory's tokenizer, or None when it has none we can load without
    running its code: lmidist-jax never executes a checkpoint's Python. The remote-code
    tokenizers of Qwen v1, ChatGLM2/3, InternLM2 and Baichuan are rebuilt from their data
    files (``converters.remote_tokenizers``); a model with another remote tokenizer takes
    prompts as token ids."""
    import os

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(model_dir, n)) for n in names):
        return None
    from converters.remote_tokenizers import RemoteTokenizerError, load_remote_tokenizer, remote_tokenizer_class

    from .fast_tokenizer import load_fast_tokenizer

    if remote_tokenizer_class(model_dir):
        # Qwen v1 / ChatGLM / InternLM2 / Baichuan: rebuilt from their data files, code never run.
        try:
            return load_remote_tokenizer(model_dir)
        except RemoteTokenizerError as e:
            logger.warning("the tokenizer of %s cannot be rebuilt (%s): prompts must be token ids", model_dir, e)
            return None
    fast = load_fast_tokenizer(model_dir)  # tokenizer.json as it is: no transformers (nor torch) import
    if fast is not None:
        return fast
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e) and "custom code" not in str(e):
            if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
                # transformers' own text ("install sentencepiece or tiktoken") hides the cause.
                present = ", ".join(sorted(n for n in os.listdir(model_dir) if "token" in n or "vocab" in n))
                raise EngineConfigError(
                    f"the tokenizer of {model_dir} cannot be loaded: tokenizer.json is missing (the directory "
                    f"has {present or 'no tokenizer files'}); copy tokenizer.json from the original "
                    f"model") from None
            raise
        logger.warning("the tokenizer of %s needs its own Python code, which lmidist-jax never runs: "
                       "prompts must be token ids (%s)", model_dir, str(e).splitlines()[0][:200])
        return None


def build_engine(config, *, warmup: bool = True, progress: bool = True) -> LLMEngine:
    from converters.checkpoint import load_config, parse_dtype
    from ..models import converted_cache
    from ..model_store import DEFAULT_MODEL, resolve_model

    start = time.perf_counter()
    configure_compilation_cache(config.compilation_cache_dir)
    model_dir = resolve_model(config.model_id or DEFAULT_MODEL, config.revision)
    hf_config = load_config(model_dir)
    spec = spec_from_hf_config(hf_config)
    check_encoder_decoder_options(spec, config)
    dtype = jnp.dtype(parse_dtype(config.dtype, hf_config))
    max_model_len = config.max_model_len or spec.max_model_len
    if max_model_len > spec.max_model_len:
        raise EngineConfigError(
            f"max_model_len={max_model_len} exceeds the model's limit of {spec.max_model_len} tokens "
            f"(max_position_embeddings with rope scaling)")
    model = load_weights(model_dir, hf_config, spec, quantize=getattr(config, "quantize", None), dtype=dtype,
                         mesh=parallel.make_mesh(config.tensor_parallel_degree), max_model_len=max_model_len,
                         load_format=config.load_format, progress=progress)
    load_time = time.perf_counter() - start
    save_dir = getattr(config, "save_converted", None)
    if save_dir:
        converted_cache.save_converted(model, hf_config, save_dir, tokenizer_dir=model_dir)
        logger.info("saved the converted parameters to %s", save_dir)
    tokenizer = load_tokenizer(model_dir)
    draft = None
    if getattr(config, "speculative_draft_model", None):
        draft = load_draft(config, model, tokenizer, max_model_len=max_model_len, progress=progress)
    engine = engine_for_model(model, tokenizer, config, max_model_len=max_model_len,
                              warmup=warmup, progress=progress, draft=draft)
    if getattr(config, "enable_lora", False):
        from .lora_manager import register_model_adapters

        register_model_adapters(engine, model_dir)
    logger.info("model %s loaded in %.1f s, ready in %.1f s", model_dir, load_time,
                time.perf_counter() - start)
    return engine


def load_weights(model_dir, hf_config: dict, spec, *, quantize: str | None, dtype, mesh, max_model_len: int,
                 load_format: str, progress: bool = True):
    """The model in ``model_dir`` placed on ``mesh``: a converted cache as it was saved,
    else its checkpoint, dense or quantized (AWQ / GPTQ / SqueezeLLM: detected from the
    checkpoint, or checked against the ``quantize`` option; the spec then names the
    registered quantized linear kind)."""
    from converters import orbax_cache
    from ..models import converted_cache, quantized

    spec, quantization = quantized.configure(spec, model_dir, hf_config, quantize, mesh.shape[parallel.TP_AXIS])
    if orbax_cache.is_converted_dir(model_dir):
        return converted_cache.load_converted(spec, model_dir, dtype=dtype, mesh=mesh, max_model_len=max_model_len)
    tensors = quantized.checkpoint_tensors(model_dir, load_format, quantization, progress=progress)
    return load_model(spec, quantized.map_checkpoint(spec, tensors, quantization), dtype=dtype, mesh=mesh,
                      max_model_len=max_model_len)


def load_draft(config, target, target_tokenizer, *, max_model_len: int, progress: bool = True):
    """``speculative_draft_model`` loaded like the target (a directory, a known name, an HF
    id in the local cache; a converted cache, a dense or a quantized checkpoint), in the
    target's dtype.

    Placement: ``draft_model_tp_size`` = the target's TP degree shards the draft on the
    target's mesh; 1 (the default) keeps it whole and replicates it on every device of
    the target's mesh, so each device runs the whole draft next to its target shard (no
    collectives in the proposal loop; the draft costs its size once per device)."""
    from converters.checkpoint import load_config

    from ..model_store import resolve_model
    from . import multihost

    if config.max_rolling_batch_prefill_tokens is not None and \
            config.max_rolling_batch_prefill_tokens < config.speculative_length + 1:
        raise EngineConfigError(
            f"max_rolling_batch_prefill_tokens={config.max_rolling_batch_prefill_tokens} cannot hold one verify "
            f"row of speculative_length + 1 = {config.speculative_length + 1} tokens: accepted at least that many")
    draft_dir = resolve_model(config.speculative_draft_model)
    hf_config = load_config(draft_dir)
    spec = spec_from_hf_config(hf_config)
    check_draft_compatible(target.spec, spec, target_tokenizer, load_tokenizer(draft_dir), max_model_len)
    tp = target.mesh.shape[parallel.TP_AXIS]
    whole = config.draft_model_tp_size != tp
    if whole and multihost.is_multiprocess():
        # A whole draft is loaded on one device, then copied to the others: one process
        # cannot read another's device.
        raise EngineConfigError(
            f"draft_model_tp_size={config.draft_model_tp_size} (the draft whole on every device) is not supported "
            f"with several processes (jax.distributed) yet: accepted draft_model_tp_size={tp} (sharded like the "
            f"target)")
    mesh = parallel.make_mesh(1, target.mesh.devices.flat) if whole else target.mesh
    draft = load_weights(draft_dir, hf_config, spec, quantize=None, dtype=target.dtype, mesh=mesh,
                         max_model_len=max_model_len, load_format=config.load_format, progress=progress)
    if whole:
        # Whole on every device of the target's mesh, so one jitted step holds both
        # (``mesh`` stays the draft's own one-device mesh: its layers run unsharded).
        draft = dataclasses.replace(draft, state=jax.device_put(draft.state, parallel.replicated(target.mesh)))
    logger.info("draft model %s loaded (%d layers, TP %d)", draft_dir, spec.num_layers, config.draft_model_tp_size)
    return draft


def engine_for_model(model, tokenizer, config, *, max_model_len: int, warmup: bool = True,
                     progress: bool = True, draft=None) -> LLMEngine:
    """Sizes the KV cache for an already-loaded model, compiles, and returns the engine.
    ``draft``: a loaded draft model for speculative decoding (a stage of the step)."""
    configure_compilation_cache(config.compilation_cache_dir)
    check_encoder_decoder_options(model.spec, config, draft)
    if getattr(config, "enable_lora", False):
        from ..models.lora_linear import with_lora
        from . import multihost

        if multihost.is_multiprocess():
            # Adapter slots are written by the leader only; followers would run stale ones.
            raise EngineConfigError("option.enable_lora=true is not supported with several processes "
                                    "(jax.distributed) yet: accepted on one host (any tensor_parallel_degree)")
        # max_loras slots for adapters + slot 0 (no adapter), as model state.
        model = with_lora(model, config.max_loras + 1, config.max_lora_rank, max_model_len)
    spec = model.spec
    block_size = config.block_size
    max_num_seqs = config.max_rolling_batch_size
    max_num_batched_tokens = (config.max_rolling_batch_prefill_tokens
                              or min(default_prefill_tokens(spec, max_num_seqs), max_model_len))
    if spec.is_encoder_decoder and not config.max_rolling_batch_prefill_tokens:
        # An encoder prompt is never split over steps: the default budget holds a whole
        # prompt beside one decode token of every running sequence (with the budget at
        # max_model_len, 16 decoding Flan-T5 requests kept every 128-token prompt waiting).
        max_num_batched_tokens += max_num_seqs
    num_blocks = _num_kv_blocks(config, model, max_model_len, max_num_seqs, max_num_batched_tokens, draft)
    min_blocks = math.ceil(max_model_len / block_size) + 1
    if spec.is_encoder_decoder:  # and as many for its encoder prompt's cross-attention K/V
        min_blocks += math.ceil(max_model_len / block_size)
    if num_blocks < min_blocks:
        raise EngineConfigError(
            f"the KV cache holds {num_blocks} blocks of {block_size} tokens, fewer than one "
            f"max_model_len={max_model_len} sequence needs ({min_blocks}); lower max_model_len "
            f"or give the cache more memory (num_kv_blocks / kv_cache_memory_gb / gpu_memory_utilization)")
    backend = _attention_backend(config.attention_backend, spec)
    runner = ModelRunner(model, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                         backend=backend, max_logprobs=config.max_logprobs,
                         enforce_eager=config.enforce_eager,
                         decode_steps=resolve_decode_steps(getattr(config, "decode_steps", "auto"), spec,
                                                           has_draft=draft is not None),
                         draft=draft, num_speculative_tokens=config.speculative_length)
    if getattr(config, "enable_lora", False):
        from .lora_manager import LoraManager

        runner.lora = LoraManager(model, max_loras=config.max_loras, max_rank=config.max_lora_rank,
                                  max_cpu_loras=config.max_cpu_loras)
    if warmup:
        t = time.perf_counter()
        runner.warmup(progress=progress)
        logger.info("compiled %d step buckets in %.1f s", runner.num_compiled_steps, time.perf_counter() - t)
    return LLMEngine(runner, tokenizer, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens,
                     enable_prefix_caching=config.enable_prefix_caching,
                     max_logprobs=config.max_logprobs, eos_token_ids=spec.eos_token_ids,
                     seed=config.seed, record_acceptance_rate=config.record_acceptance_rate)


def check_encoder_decoder_options(spec, config, draft=None) -> None:
    """Options an encoder-decoder model (T5) cannot use yet: a clear error naming them."""
    if not spec.is_encoder_decoder:
        return
    from . import multihost

    refused = []
    if draft is not None or getattr(config, "speculative_draft_model", None):
        refused.append("speculative_draft_model (speculative decoding)")
    if getattr(config, "enable_lora", False):
        refused.append("enable_lora=true (LoRA adapters)")
    if getattr(config, "tensor_parallel_degree", 1) not in (None, 1):
        refused.append(f"tensor_parallel_degree={config.tensor_parallel_degree} (only 1)")
    if multihost.is_multiprocess():
        refused.append("several processes (jax.distributed)")
    if refused:
        raise EngineConfigError(f"{spec.architecture} is an encoder-decoder model, which lmidist-jax does not run "
                                f"with {', '.join(refused)} yet; remove the option(s)")


def configure_compilation_cache(option: str | None) -> str | None:
    """Points JAX's persistent compilation cache at the directory the option names
    ("auto": beside the models, unless JAX was already given one; None: off), with
    JAX's size and compile-time thresholds at 0 so that the small programs of a CPU
    step are cached too. Call before the first compilation that should be cached.
    Returns the directory in use (None: off)."""
    from jax.experimental.compilation_cache import compilation_cache

    from ..model_store import compilation_cache_dir

    current = jax.config.jax_compilation_cache_dir
    if option == "auto":
        wanted = current or str(compilation_cache_dir())
    else:
        wanted = option
    if wanted != current:
        jax.config.update("jax_compilation_cache_dir", wanted)
        # JAX opens its cache once per process: make it reopen at the new place.
        compilation_cache.reset_cache()
    if wanted is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return wanted


# decode_steps=auto on a GPU: a batch-1 Llama-3-8B token took 7.68 ms with one decode
# step per dispatch and 4.84 ms with 8 (H200, step_profile-nvidia-h200-*.json): the
# per-dispatch host work and launch gaps are paid once per 8 tokens. The scheduler still
# runs single steps whenever a request waits, so admission is not delayed.
AUTO_DECODE_STEPS_GPU = 8


def resolve_decode_steps(value, spec, *, has_draft: bool) -> int:
    """The decode_steps option as the runner takes it: an integer, or "auto" resolved for
    this device and model (1 on the CPU, where a step's host work is small beside its
    compute; 1 with a draft model, whose steps already carry several tokens; 1 for
    encoder-decoder models; else AUTO_DECODE_STEPS_GPU)."""
    if value != "auto":
        return int(value or 1)
    if has_draft or getattr(spec, "is_encoder_decoder", False) or jax.devices()[0].platform == "cpu":
        return 1
    return AUTO_DECODE_STEPS_GPU


def _attention_backend(requested: str, spec=None) -> str:
    from pallas_kernels import select_backend

    backend = select_backend(jax.devices()[0].platform, requested)
    if spec is not None and spec.position_type == "relative" and backend != "xla":
        # The Pallas kernels do not add T5's relative-position bias yet: its XLA paths run on any device.
        if requested != "auto":
            raise EngineConfigError(f"attention_backend={requested!r} cannot run T5's relative position bias; "
                                    f"use 'xla' or 'auto' (which picks 'xla' for this model)")
        backend = "xla"
    return backend


def _num_kv_blocks(config, model, max_model_len, max_num_seqs, max_num_batched_tokens, draft=None) -> int:
    per_block = kv_cache_bytes_per_block(model.spec, config.block_size, model.dtype)
    if draft is not None:  # the draft's cache has a block for every block of the target's
        per_block += kv_cache_bytes_per_block(draft.spec, config.block_size, draft.dtype)
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if config.kv_cache_memory_gb:
        return int(config.kv_cache_memory_gb * 2**30 // per_block)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        # CPU: no meaningful device memory. Enough for every sequence at full length,
        # capped at CPU_DEFAULT_KV_CACHE_GB.
        # (encoder-decoder: as many again for the encoder prompt's cross-attention K/V).
        per_seq = math.ceil(max_model_len / config.block_size) * (2 if model.spec.is_encoder_decoder else 1)
        wanted = max_num_seqs * per_seq + 1
        cap = int(CPU_DEFAULT_KV_CACHE_GB * 2**30 // per_block)
        return max(min(wanted, cap), per_seq + 1)
    # Accelerator: utilization x capacity - weights (already resident) - activation peak.
    limit = stats["bytes_limit"]
    in_use = stats.get("bytes_in_use", 0)
    activation = _activation_peak_bytes(model, config, max_model_len, max_num_seqs, max_num_batched_tokens, draft)
    free = config.gpu_memory_utilization * limit - in_use - activation
    # The pool is split across the TP devices by KV heads: each holds 1/tp of a block.
    num = int(free * config.tensor_parallel_degree // per_block)
    logger.info("device memory %.1f GiB, in use %.1f GiB, activation peak %.2f GiB -> %d KV blocks",
                limit / 2**30, in_use / 2**30, activation / 2**30, num)
    return max(num, 0)


def _activation_peak_bytes(model, config, max_model_len, max_num_seqs, max_num_batched_tokens, draft=None) -> int:
    """Temporary memory of the largest step, measured from its compiled form with a
    small stand-in cache (the temporaries do not grow with the pool)."""
    probe = ModelRunner(model, block_size=config.block_size,
                        num_blocks=math.ceil(max_model_len / config.block_size) + 1,
                        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=max_model_len, backend=_attention_backend(config.attention_backend, model.spec),
                        max_logprobs=config.max_logprobs, draft=draft, num_speculative_tokens=config.speculative_length)
    peak = 0
    for shape in probe.largest_shapes():
        compiled = probe._step.lower(*probe._args(probe.dummy_batch(*shape), 1)).compile()
        analysis = compiled.memory_analysis()
        if analysis is not None:
            peak = max(peak, int(analysis.temp_size_in_bytes))
    del probe
    return peak
