"""Multi-LoRA decode cost: a batch of decoding sequences on a random-weight model
(Llama-3-8B shape by default), base model vs the same batch where the tokens use
``--adapters`` distinct rank-``--rank`` PEFT adapters (q/k/v/o/gate/up/down), and the
LoRA-enabled engine with no adapter in use. Also the grouped LoRA kernels (Pallas)
against the XLA reference on one projection's shapes.

  python benchmarks/lora.py --out benchmarks/results            # GPU, Llama-3-8B shape
  python benchmarks/lora.py --tiny --out /tmp/lora_bench         # CPU check, tiny shape

Writes ``lora-<device>-<date>.json`` into ``--out`` after each stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import SHAPES, environment, write_result  # noqa: E402

MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapter(directory: str, config_json: dict, rank: int, seed: int) -> None:
    """A random PEFT LoRA adapter on every projection of a Llama-shaped model (float16)."""
    from safetensors.numpy import save_file

    hidden, inter = config_json["hidden_size"], config_json["intermediate_size"]
    heads, kv_heads = config_json["num_attention_heads"], config_json["num_key_value_heads"]
    head_dim = hidden // heads
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config_json["num_hidden_layers"]):
        for block, names in MODULES.items():
            for name in names:
                fan_in, fan_out = shapes[name]
                prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, fan_in), np.float32)
                                                      / np.sqrt(fan_in)).astype(np.float16)
                tensors[f"{prefix}.lora_B.weight"] = (0.01 * rng.standard_normal((fan_out, rank), np.float32)
                                                      ).astype(np.float16)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                   "target_modules": [n for names in MODULES.values() for n in names]}, f)


def decode_step_ms(engine, prompts, params, adapters, batch: int) -> dict:
    """Runs ``batch`` requests to the end; the mean time of the steps where all of them
    decode (after one warm-up round that compiles the shapes)."""
    result = {}
    for attempt in range(2):
        for i in range(batch):
            engine.add_request(f"r{attempt}-{i}", prompts[i], params, adapter=adapters[i])
        started, step_times = set(), []
        while engine.has_unfinished_requests():
            all_decoding = len(started) == batch and engine.num_running == batch
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            if all_decoding:
                step_times.append(dt)
            started.update(o.request_id for o in outs if o.new_token_ids)
        if step_times:
            times = np.array(step_times[2:] or step_times)
            result = {"decode_steps": int(times.size), "step_ms_mean": 1e3 * float(times.mean()),
                      "step_ms_median": 1e3 * float(np.median(times)), "step_ms_min": 1e3 * float(times.min())}
    return result


def kernel_comparison(args, platform: str) -> dict:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.lora import lora_expand, lora_expand_pallas, lora_shrink, lora_shrink_pallas

    shape = SHAPES["tiny" if args.tiny else "llama3-8b"]
    in_features, out_features = shape["hidden_size"], shape["intermediate_size"]
    num_slots, tokens, rank = args.adapters + 1, args.batch, args.rank
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    x = jnp.asarray(rng.standard_normal((tokens, in_features)), dtype)
    a = jnp.asarray(rng.standard_normal((num_slots, in_features, rank)), dtype)
    b = jnp.asarray(rng.standard_normal((num_slots, rank, out_features)), dtype)
    slots = jnp.asarray(rng.integers(1, num_slots, tokens), jnp.int32)
    interpret = platform != "gpu"
    impls = {"xla": jax.jit(lambda x, a, b, s: lora_expand(lora_shrink(x, a, s), b, s, dtype)),
             "pallas": jax.jit(lambda x, a, b, s: lora_expand_pallas(lora_shrink_pallas(x, a, s, interpret=interpret),
                                                                    b, s, dtype, interpret=interpret))}
    out = {"tokens": tokens, "in_features": in_features, "out_features": out_features, "rank": rank,
           "num_slots": num_slots, "interpret": interpret}
    ref = None
    for name, fn in impls.items():
        try:
            y = jax.block_until_ready(fn(x, a, b, slots))
            times = []
            for _ in range(5 if args.tiny else 50):
                t = time.perf_counter()
                jax.block_until_ready(fn(x, a, b, slots))
                times.append(time.perf_counter() - t)
            ref = y if ref is None else ref
            err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32))))
            out[name] = {"ms_median": 1e3 * float(np.median(times)), "max_abs_diff_vs_xla": err}
        except Exception as e:  # noqa: BLE001 - a kernel that does not lower is a result too
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(f"kernels {name}: {out[name]}", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CPU check)")
    parser.add_argument("--out", default=None, help="result directory (default benchmarks/results)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.output_len, args.input_len = min(args.batch, 8), min(args.output_len, 12), 16

    import jax

    from converters.checkpoint import parse_dtype
    from lmidist_jax import SamplingParams, parallel
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.factory import engine_for_model
    from lmidist_jax.models import loader
    from lmidist_jax.models.families import spec_from_hf_config

    env = environment()
    result = {"environment": env, "args": vars(args), "stages": {}}

    def save():
        path = write_result("lora" + ("-tiny" if args.tiny else ""), result, args.out)
        print(f"wrote {path}", flush=True)

    platform = jax.devices()[0].platform
    result["stages"]["kernels"] = kernel_comparison(args, platform)
    save()

    config_json = SHAPES["tiny" if args.tiny else "llama3-8b"]
    spec = spec_from_hf_config(config_json)
    dtype = parse_dtype(args.dtype, {})
    max_model_len = args.input_len + args.output_len + 32
    model = loader.random_model(spec, dtype=dtype, mesh=parallel.make_mesh(1), max_model_len=max_model_len)
    jax.block_until_ready(jax.tree_util.tree_leaves(model.state))
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(10, spec.vocab_size - 10, args.input_len))) for _ in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    base_options = dict(dtype=args.dtype, max_model_len=max_model_len, max_rolling_batch_size=args.batch,
                        max_rolling_batch_prefill_tokens=max(256, args.input_len))
    workdir = tempfile.mkdtemp(prefix="lora_bench_")
    names = [f"adapter{i}" for i in range(args.adapters)]
    t = time.perf_counter()
    for i, name in enumerate(names):
        write_adapter(os.path.join(workdir, name), config_json, args.rank, seed=i)
    result["adapter_write_s"] = time.perf_counter() - t

    stages = [("base", {}, [None] * args.batch),
              ("lora_no_adapter", dict(enable_lora=True, max_loras=args.adapters, max_lora_rank=args.rank),
               [None] * args.batch),
              (f"lora_{args.adapters}_adapters", dict(enable_lora=True, max_loras=args.adapters,
                                                      max_lora_rank=args.rank),
               [names[i % args.adapters] for i in range(args.batch)])]
    for stage, extra, adapters in stages:
        try:
            config = config_from_kwargs(None, **base_options, **extra)
            t = time.perf_counter()
            engine = engine_for_model(model, None, config, max_model_len=max_model_len, warmup=False,
                                      progress=False)
            if engine.lora is not None:
                for name in names:
                    engine.add_adapter(name, os.path.join(workdir, name))
            record = {"engine_s": time.perf_counter() - t}
            record.update(decode_step_ms(engine, prompts, params, adapters, args.batch))
            if engine.lora is not None:
                record["lora_stats"] = dataclasses.asdict(engine.lora.stats)
            del engine
        except Exception as e:  # noqa: BLE001
            record = {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
        result["stages"][stage] = record
        print(f"{stage}: {record}", flush=True)
        save()
    base = result["stages"]["base"].get("step_ms_median")
    for stage, _, _ in stages[1:]:
        ms = result["stages"][stage].get("step_ms_median")
        if base and ms:
            result["stages"][stage]["overhead_vs_base"] = ms / base - 1
    save()


if __name__ == "__main__":
    main()
