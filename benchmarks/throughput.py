"""Offline throughput of the rolling-batch engine.

N requests with fixed (or sampled) input/output lengths, ``ignore_eos``, all queued at
once. Reports output and total tokens/s, time to first token and inter-token latency
percentiles, and host vs device time per step. Writes JSON to benchmarks/results/.

  python benchmarks/throughput.py --model smollm2 --num-requests 16 --input-len 64 --output-len 64
  python benchmarks/throughput.py --shape llama3-8b --dtype bf16 --num-requests 1000 \
      --input-len 1024 --output-len 128 --option max_rolling_batch_size=256
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import SHAPES, percentiles, write_result  # noqa: E402


def parse_option(text):
    name, value = text.split("=", 1)
    return name, value


def build_engine(args):
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.factory import build_engine as build, engine_for_model
    from converters.checkpoint import parse_dtype
    from lmidist_jax.models.loader import random_model
    from lmidist_jax.models.families import spec_from_hf_config
    from lmidist_jax import parallel

    options = dict(args.option)
    options.setdefault("dtype", args.dtype)
    if args.shape:
        config = config_from_kwargs(None, **options)
        spec = spec_from_hf_config(SHAPES[args.shape])
        max_model_len = config.max_model_len or spec.max_model_len
        t = time.perf_counter()
        model = random_model(spec, dtype=parse_dtype(config.dtype if config.dtype != "auto" else "bf16", {}),
                             mesh=parallel.make_mesh(config.tensor_parallel_degree), max_model_len=max_model_len)
        load = time.perf_counter() - t
        t = time.perf_counter()
        engine = engine_for_model(model, None, config, max_model_len=max_model_len, progress=True)
        return engine, {"load_s": load, "warmup_s": time.perf_counter() - t}
    config = config_from_kwargs(args.model, **options)
    t = time.perf_counter()
    engine = build(config, progress=True)
    return engine, {"load_and_warmup_s": time.perf_counter() - t}


def run(engine, prompts, output_lens):
    from lmidist_jax import SamplingParams

    start = time.perf_counter()
    token_times: dict[str, list[float]] = {}
    for i, (prompt, out_len) in enumerate(zip(prompts, output_lens)):
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=int(out_len), ignore_eos=True))
        token_times[str(i)] = []
    stats0 = dict(vars(engine.stats))
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            token_times[out.request_id].extend([now] * len(out.new_token_ids))
    elapsed = time.perf_counter() - start
    return elapsed, token_times, start, stats0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model dir / cached HF id / 'smollm2'")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random weights of a real model shape")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--sample-lengths", action="store_true",
                        help="draw lengths uniformly in [len/2, 3len/2] instead of fixed")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--option", action="append", type=parse_option, default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--name", default="throughput")
    args = parser.parse_args()

    engine, startup = build_engine(args)
    rng = np.random.default_rng(args.seed)
    vocab = engine.spec.vocab_size
    n = args.num_requests
    if args.sample_lengths:
        in_lens = rng.integers(max(1, args.input_len // 2), args.input_len * 3 // 2 + 1, n)
        out_lens = rng.integers(max(1, args.output_len // 2), args.output_len * 3 // 2 + 1, n)
    else:
        in_lens = np.full(n, args.input_len)
        out_lens = np.full(n, args.output_len)
    prompts = [list(map(int, rng.integers(10, vocab - 10, k))) for k in in_lens]

    elapsed, token_times, start, stats0 = run(engine, prompts, out_lens)
    st = engine.stats
    steps = st.num_steps - stats0["num_steps"]
    out_tokens = int(sum(len(v) for v in token_times.values()))
    in_tokens = int(in_lens.sum())
    ttft = [v[0] - start for v in token_times.values() if v]
    itl = np.concatenate([np.diff(v) for v in token_times.values() if len(v) > 1]) if out_tokens > n else []
    host = (st.host_time - stats0["host_time"] + st.schedule_time - stats0["schedule_time"]
            + st.postprocess_time - stats0["postprocess_time"])
    device = st.device_time - stats0["device_time"]
    result = {
        "benchmark": "throughput",
        "model": args.model or args.shape or "smollm2",
        "dtype": jnp.dtype(engine.runner.model.dtype).name,
        "num_requests": n, "input_len": args.input_len, "output_len": args.output_len,
        "sampled_lengths": args.sample_lengths,
        "options": dict(args.option),
        "elapsed_s": elapsed,
        "output_tokens": out_tokens, "input_tokens": in_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + in_tokens) / elapsed,
        "ttft_s": percentiles(ttft),
        "itl_s": percentiles(itl),
        "steps": steps,
        "host_ms_per_step": 1e3 * host / max(steps, 1),
        "device_ms_per_step": 1e3 * device / max(steps, 1),
        "preemptions": st.num_preemptions - stats0["num_preemptions"],
        "kv_blocks": engine.runner.num_blocks,
        "startup": startup,
    }
    import jax

    if jax.devices()[0].platform != "cpu":
        # The ceilings, measured in the same run: time the FLOPs and bytes allow.
        from benchmarks.common import device_copy_bandwidth
        from benchmarks.latency import matmul_flops

        params = engine.runner.model.num_parameter_bytes / jnp.dtype(engine.runner.model.dtype).itemsize
        flops = 2 * params * (in_tokens + out_tokens)
        rate, bandwidth = matmul_flops(), device_copy_bandwidth()["best"]
        floor = max(flops / rate, steps * engine.runner.model.num_parameter_bytes / bandwidth)
        result.update(matmul_tflops=rate / 1e12, copy_bandwidth_GBps=bandwidth / 1e9,
                      matmul_flops=flops, floor_s=floor, fraction_of_floor=floor / elapsed)
        print(f"floor {floor:.1f} s ({flops / 1e15:.1f} PFLOP at {rate / 1e12:.0f} TFLOP/s) "
              f"-> {100 * floor / elapsed:.0f}% of it")
    path = write_result(args.name, result, args.out)
    print(f"{out_tokens} output tokens in {elapsed:.2f} s: {result['output_tokens_per_s']:.1f} out tok/s, "
          f"{result['total_tokens_per_s']:.1f} total tok/s; TTFT p50 {result['ttft_s']['p50']:.3f} s; "
          f"host {result['host_ms_per_step']:.2f} ms / device {result['device_ms_per_step']:.2f} ms per step")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
