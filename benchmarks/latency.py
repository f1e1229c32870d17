"""Batch-1 decode latency against the memory roofline, measured in the same run.

Roofline: every decode step must read the weights once (the embedding table excepted:
one row) plus the sequence's KV cache, so the fastest possible step is
(weight bytes + KV bytes) / the best device copy bandwidth measured in the same run
(XLA and torch copies; see ``common.device_copy_bandwidth``).

  python benchmarks/latency.py --shape llama3-8b --dtype bf16 --input-len 128 --output-len 256
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import numpy as np  # noqa: E402

from benchmarks.common import batch1_options, batch1_parser, device_copy_bandwidth, environment, random_engine, write_result  # noqa: E402


def matmul_flops(n: int = 8192, repeats: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


def main():
    parser = batch1_parser(__doc__, "latency")
    args = parser.parse_args()

    import jax

    from lmidist_jax import SamplingParams
    from converters.checkpoint import parse_dtype

    copies = device_copy_bandwidth() if jax.devices()[0].platform != "cpu" else device_copy_bandwidth(256 << 20, 5)
    bandwidth = copies["best"]
    t = time.perf_counter()
    options = batch1_options(args)
    config, spec, model, engine = random_engine(args.shape, options)
    startup = time.perf_counter() - t

    prompt = list(map(int, np.random.default_rng(0).integers(10, spec.vocab_size - 10, args.input_len)))
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    results = []
    for run in range(3):  # the first run is a warm-up
        engine.add_request(f"r{run}", prompt, params)
        t0 = time.perf_counter()
        times = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                times.extend([time.perf_counter()] * len(out.new_token_ids))
        ttft = times[0] - t0
        per_token = (times[-1] - times[0]) / (len(times) - 1)
        results.append((ttft, per_token))
    ttft, per_token = results[-1]

    itemsize = np.dtype(parse_dtype(args.dtype, {})).itemsize
    weight_bytes = model.num_parameter_bytes - (spec.vocab_size - 1) * spec.hidden_size * itemsize * (
        0 if spec.tie_word_embeddings else 1)
    mean_context = args.input_len + args.output_len / 2
    kv_bytes = 2 * spec.total_kv_heads * spec.head_dim * itemsize * mean_context
    # With tensor parallelism every device streams its share at the measured bandwidth.
    floor = (weight_bytes + kv_bytes) / (bandwidth * config.tensor_parallel_degree)
    result = {
        "benchmark": "latency", "shape": args.shape, "tensor_parallel_degree": config.tensor_parallel_degree, "dtype": args.dtype,
        "input_len": args.input_len, "output_len": args.output_len, "options": options,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "copy_bandwidth_by_method_GBps": {k: v / 1e9 for k, v in copies.items() if isinstance(v, float)},
        "weight_bytes": weight_bytes, "kv_bytes_mean": kv_bytes,
        "ttft_s": ttft, "decode_ms_per_token": per_token * 1e3,
        "decode_tokens_per_s": 1 / per_token,
        "roofline_ms_per_token": floor * 1e3, "roofline_tokens_per_s": 1 / floor,
        "fraction_of_roofline": floor / per_token,
        "achieved_GBps": (weight_bytes + kv_bytes) / per_token / 1e9,
        "startup_s": startup,
        "host_ms_per_step": 1e3 * (engine.stats.host_time + engine.stats.schedule_time
                                   + engine.stats.postprocess_time) / max(engine.stats.num_steps, 1),
        "device_ms_per_step": 1e3 * engine.stats.device_time / max(engine.stats.num_steps, 1),
        "environment": environment(),
    }
    print(f"batch-1 decode {result['decode_tokens_per_s']:.1f} tok/s ({per_token * 1e3:.2f} ms/token); "
          f"roofline {result['roofline_tokens_per_s']:.1f} tok/s -> {100 * result['fraction_of_roofline']:.0f}%; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; TTFT {ttft * 1e3:.1f} ms")
    print("wrote", write_result(args.name, result, args.out))


if __name__ == "__main__":
    main()
