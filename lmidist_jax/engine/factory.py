"""Builds an LLMEngine from an EngineConfig: resolve and load the model, size the KV
cache, compile the step buckets."""

from __future__ import annotations

import logging
import math
import time

import jax
import jax.numpy as jnp

from .. import parallel
from ..models.loader import load_model
from ..models.families import map_checkpoint, spec_from_hf_config
from .llm_engine import LLMEngine
from .model_runner import ModelRunner, kv_cache_bytes_per_block

logger = logging.getLogger("lmidist_jax")

CPU_DEFAULT_KV_CACHE_GB = 1.0
# Prompt tokens per step when max_rolling_batch_prefill_tokens is unset: a longer
# prompt is prefilled in chunks, with the running requests' decode steps in between
# (on a 2-core CPU a 2048-token chunk of SmolLM2-135M takes a few seconds).
DEFAULT_PREFILL_TOKENS = 2048


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
    from transformers import AutoTokenizer

    from converters.remote_tokenizers import RemoteTokenizerError, load_remote_tokenizer, remote_tokenizer_class

    if remote_tokenizer_class(model_dir):
        # Qwen v1 / ChatGLM / InternLM2 / Baichuan: rebuilt from their data files, code never run.
        try:
            return load_remote_tokenizer(model_dir)
        except RemoteTokenizerError as e:
            logger.warning("the tokenizer of %s cannot be rebuilt (%s): prompts must be token ids", model_dir, e)
            return None
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
    from converters.checkpoint import iter_checkpoint_tensors, load_config, parse_dtype
    from converters import orbax_cache
    from ..models import converted_cache
    from ..model_store import DEFAULT_MODEL, resolve_model

    start = time.perf_counter()
    configure_compilation_cache(config.compilation_cache_dir)
    model_dir = resolve_model(config.model_id or DEFAULT_MODEL, config.revision)
    hf_config = load_config(model_dir)
    spec = spec_from_hf_config(hf_config)
    dtype = jnp.dtype(parse_dtype(config.dtype, hf_config))

    max_model_len = config.max_model_len or spec.max_model_len
    if max_model_len > spec.max_model_len:
        raise EngineConfigError(
            f"max_model_len={max_model_len} exceeds the model's limit of {spec.max_model_len} tokens "
            f"(max_position_embeddings with rope scaling)")
    mesh = parallel.make_mesh(config.tensor_parallel_degree)
    if orbax_cache.is_converted_dir(model_dir):
        model = converted_cache.load_converted(spec, model_dir, dtype=dtype, mesh=mesh, max_model_len=max_model_len)
    else:
        tensors = iter_checkpoint_tensors(model_dir, config.load_format, progress=progress)
        model = load_model(spec, map_checkpoint(spec, tensors), dtype=dtype, mesh=mesh,
                           max_model_len=max_model_len)
    load_time = time.perf_counter() - start
    save_dir = getattr(config, "save_converted", None)
    if save_dir:
        converted_cache.save_converted(model, hf_config, save_dir, tokenizer_dir=model_dir)
        logger.info("saved the converted parameters to %s", save_dir)
    tokenizer = load_tokenizer(model_dir)
    engine = engine_for_model(model, tokenizer, config, max_model_len=max_model_len,
                              warmup=warmup, progress=progress)
    logger.info("model %s loaded in %.1f s, ready in %.1f s", model_dir, load_time,
                time.perf_counter() - start)
    return engine


def engine_for_model(model, tokenizer, config, *, max_model_len: int, warmup: bool = True,
                     progress: bool = True) -> LLMEngine:
    """Sizes the KV cache for an already-loaded model, compiles, and returns the engine."""
    configure_compilation_cache(config.compilation_cache_dir)
    spec = model.spec
    block_size = config.block_size
    max_num_seqs = config.max_rolling_batch_size
    max_num_batched_tokens = config.max_rolling_batch_prefill_tokens or min(DEFAULT_PREFILL_TOKENS, max_model_len)
    num_blocks = _num_kv_blocks(config, model, max_model_len, max_num_seqs, max_num_batched_tokens)
    min_blocks = math.ceil(max_model_len / block_size) + 1
    if num_blocks < min_blocks:
        raise EngineConfigError(
            f"the KV cache holds {num_blocks} blocks of {block_size} tokens, fewer than one "
            f"max_model_len={max_model_len} sequence needs ({min_blocks}); lower max_model_len "
            f"or give the cache more memory (num_kv_blocks / kv_cache_memory_gb / gpu_memory_utilization)")
    backend = _attention_backend(config.attention_backend)
    runner = ModelRunner(model, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                         backend=backend, max_logprobs=config.max_logprobs,
                         enforce_eager=config.enforce_eager,
                         decode_steps=getattr(config, "decode_steps", 1) or 1)
    if warmup:
        t = time.perf_counter()
        runner.warmup(progress=progress)
        logger.info("compiled %d step buckets in %.1f s", runner.num_compiled_steps, time.perf_counter() - t)
    return LLMEngine(runner, tokenizer, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens,
                     enable_prefix_caching=config.enable_prefix_caching,
                     max_logprobs=config.max_logprobs, eos_token_ids=spec.eos_token_ids,
                     seed=config.seed)


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


def _attention_backend(requested: str) -> str:
    from pallas_kernels import select_backend

    return select_backend(jax.devices()[0].platform, requested)


def _num_kv_blocks(config, model, max_model_len, max_num_seqs, max_num_batched_tokens) -> int:
    per_block = kv_cache_bytes_per_block(model.spec, config.block_size, model.dtype)
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if config.kv_cache_memory_gb:
        return int(config.kv_cache_memory_gb * 2**30 // per_block)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        # CPU: no meaningful device memory. Enough for every sequence at full length,
        # capped at CPU_DEFAULT_KV_CACHE_GB.
        wanted = max_num_seqs * math.ceil(max_model_len / config.block_size) + 1
        cap = int(CPU_DEFAULT_KV_CACHE_GB * 2**30 // per_block)
        return max(min(wanted, cap), math.ceil(max_model_len / config.block_size) + 1)
    # Accelerator: utilization x capacity - weights (already resident) - activation peak.
    limit = stats["bytes_limit"]
    in_use = stats.get("bytes_in_use", 0)
    activation = _activation_peak_bytes(model, config, max_model_len, max_num_seqs, max_num_batched_tokens)
    free = config.gpu_memory_utilization * limit - in_use - activation
    # The pool is split across the TP devices by KV heads: each holds 1/tp of a block.
    num = int(free * config.tensor_parallel_degree // per_block)
    logger.info("device memory %.1f GiB, in use %.1f GiB, activation peak %.2f GiB -> %d KV blocks",
                limit / 2**30, in_use / 2**30, activation / 2**30, num)
    return max(num, 0)


def _activation_peak_bytes(model, config, max_model_len, max_num_seqs, max_num_batched_tokens) -> int:
    """Temporary memory of the largest step, measured from its compiled form with a
    small stand-in cache (the temporaries do not grow with the pool)."""
    probe = ModelRunner(model, block_size=config.block_size,
                        num_blocks=math.ceil(max_model_len / config.block_size) + 1,
                        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=max_model_len, backend=_attention_backend(config.attention_backend),
                        max_logprobs=config.max_logprobs)
    peak = 0
    for T, S, decode_only in (probe.warmup_shapes()[-1], (probe.seq_buckets[-1],) * 2 + (True,)):
        batch = probe.dummy_batch(T, S, decode_only)
        compiled = probe._step.lower(*probe._args(batch, 1)).compile()
        analysis = compiled.memory_analysis()
        if analysis is not None:
            peak = max(peak, int(analysis.temp_size_in_bytes))
    del probe
    return peak
