"""Shared pieces of the benchmark scripts: model shapes, environment record, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

# Real model shapes for random-weight benchmarks (HF config.json fields).
SHAPES = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, torch_dtype="bfloat16",
                      bos_token_id=128000, eos_token_id=128001),
    "llama2-70b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192,
                       intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2),
    "tinyllama-1.1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                           intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                           rms_norm_eps=1e-5, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2),
    "tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024),
}


def environment() -> dict:
    import jax

    device = jax.devices()[0]
    return {
        "device": getattr(device, "device_kind", device.platform),
        "platform": device.platform,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def write_result(name: str, result: dict, out_dir: str | None) -> str:
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    env = result.setdefault("environment", environment())
    device = env["device"].replace(" ", "-").lower()
    stamp = env["date"][:10]
    path = os.path.join(out_dir, f"{name}-{device}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def percentiles(values, ps=(50, 90, 99)) -> dict:
    import numpy as np

    if len(values) == 0:
        return {f"p{p}": None for p in ps}
    arr = np.asarray(values, dtype=float)
    return {f"p{p}": float(np.percentile(arr, p)) for p in ps} | {"mean": float(arr.mean())}


def device_copy_bandwidth(num_bytes: int = 2 << 30, repeats: int = 20) -> dict:
    """Device memory bandwidth, measured every way available in this process: bytes read +
    written per second by a plain device-to-device copy (XLA elementwise copy; torch
    ``copy_`` when importable, which reaches ~4.2 TB/s on an H200 where XLA's reaches ~3.2),
    and bytes read per second by a sum over the buffer (XLA, torch): a read-only stream
    outruns a copy, and the kernels we divide by it mostly read (a grouped matmul measured
    102% of the copy figure, H200 2026-11-30). {"xla": .., "torch": .., "xla_read": ..,
    "torch_read": .., "best": ..}. The roofline divides by "best": a slower reference would
    flatter every ratio."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    def median_time(fn, sync):
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def xla_copy():
        x = jax.random.normal(jax.random.key(0), (num_bytes // 2,), jnp.bfloat16)
        f = jax.jit(lambda a: a * 2)
        last = {}
        return 2 * num_bytes / median_time(lambda: last.__setitem__("y", f(x)),
                                            lambda: jax.block_until_ready(last["y"]))

    def xla_read():
        x = jax.random.normal(jax.random.key(0), (num_bytes // 2,), jnp.bfloat16)
        f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
        last = {}
        return num_bytes / median_time(lambda: last.__setitem__("y", f(x)),
                                       lambda: jax.block_until_ready(last["y"]))

    out = {"xla": xla_copy(), "xla_read": xla_read()}
    if jax.devices()[0].platform == "gpu":
        try:
            import torch

            if torch.cuda.is_available():
                src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
                dst = torch.empty_like(src)
                out["torch"] = 2 * num_bytes / median_time(lambda: dst.copy_(src), torch.cuda.synchronize)
                out["torch_read"] = num_bytes / median_time(lambda: src.sum(dtype=torch.float32),
                                                            torch.cuda.synchronize)
                del src, dst
                torch.cuda.empty_cache()
        except Exception as e:  # torch missing or without CUDA: XLA's figures stand alone
            out["torch_error"] = str(e)[:200]
    out["best"] = max(v for k, v in out.items() if k in ("xla", "torch", "xla_read", "torch_read"))
    return out


def batch1_parser(description: str, name: str):
    """The arguments of the batch-1 decode benchmarks (latency.py, step_profile.py): a
    random-weight shape, dtype, prompt/output lengths, engine options, where to write."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default=name)
    return parser


def batch1_options(args, **defaults) -> dict:
    """Engine options of one request at a time: ``defaults``, then ``--option`` values,
    over max_rolling_batch_size=1 and a max_model_len that fits the request."""
    options = {"max_rolling_batch_size": 1, "max_model_len": args.input_len + args.output_len + 64, **defaults}
    options.update(o.split("=", 1) for o in args.option)
    options["dtype"] = args.dtype
    return options


def random_engine(shape: str, options: dict):
    """(config, spec, model, engine) with random weights of ``shape`` under ``options``."""
    from converters.checkpoint import parse_dtype
    from lmidist_jax import parallel
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.factory import engine_for_model
    from lmidist_jax.models.families import spec_from_hf_config
    from lmidist_jax.models.loader import random_model

    config = config_from_kwargs(None, **options)
    spec = spec_from_hf_config(SHAPES[shape])
    model = random_model(spec, dtype=parse_dtype(options["dtype"], {}),
                         mesh=parallel.make_mesh(config.tensor_parallel_degree), max_model_len=config.max_model_len)
    engine = engine_for_model(model, None, config, max_model_len=config.max_model_len)
    return config, spec, model, engine
