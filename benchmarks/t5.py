"""T5 decode in the rolling batch: a Flan-T5-XL-shaped model (random weights; d_model
2048, d_ff 5120, 24 + 24 layers, 32 heads of 64, vocab 32128, gated GeLU) at batch 1 and
batch 32, against the memory roofline measured in the same run.

Each batch size: ``batch`` requests of ``--input-len`` encoder tokens and
``--output-len`` decoder tokens go in together (the encoder runs as they are admitted);
the decode rate is measured over the window where every sequence is decoding (from the
step that gives the last one its first token to the first finish). Roofline of one
decode step: the weights it reads (decoder self-attention, cross-attention q/o, MLP,
norms, LM head; not the encoder, nor the cross K/V projections, which run once per
request) + each sequence's self-attention KV (mean context) and cross-attention KV
(its encoder length), at the best copy bandwidth of the run
(``common.device_copy_bandwidth``). T5's relative position bias runs on the XLA
attention path (the Pallas kernels do not add it yet).

  python benchmarks/t5.py                          # Flan-T5-XL shape, batch 1 and 32, bf16
  python benchmarks/t5.py --option decode_steps=8  # several decode steps per dispatch
  python benchmarks/t5.py --tiny                   # small shapes, runs on a CPU (smoke test)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import numpy as np  # noqa: E402

from benchmarks.common import device_copy_bandwidth, environment, write_result  # noqa: E402

FLAN_T5_XL = dict(architectures=["T5ForConditionalGeneration"], model_type="t5", d_model=2048, d_ff=5120,
                  d_kv=64, num_layers=24, num_decoder_layers=24, num_heads=32, vocab_size=32128,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, layer_norm_epsilon=1e-6, n_positions=512,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
TINY_T5 = dict(FLAN_T5_XL, d_model=64, d_ff=96, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
               vocab_size=256)


def decode_step_bytes(model, batch: int, encoder_len: int, mean_context: float) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step of ``batch`` sequences reads."""
    from lmidist_jax.models.loader import variables

    spec = model.spec
    weights = 0
    for path, var in variables(model.state).items():
        names = [str(p) for p in path]
        if names[0].startswith("encoder") or "kv_proj" in names:
            continue  # the encoder and the cross K/V projections run once per request
        if names[0] == "embed":  # one row per sequence
            weights += batch * var.shape[-1] * var.dtype.itemsize
            continue
        weights += var.size * var.dtype.itemsize
    itemsize = np.dtype(model.dtype).itemsize
    kv = batch * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * itemsize * (mean_context + encoder_len)
    return weights, int(kv)


def run_batch(engine, batch: int, input_len: int, output_len: int, vocab: int, tag: str) -> dict:
    """Decode tokens/s over the window where all ``batch`` sequences decode."""
    from lmidist_jax import SamplingParams

    rng = np.random.default_rng(0)
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", list(map(int, rng.integers(3, vocab - 3, input_len))), params)
    started: set[str] = set()
    window_start = window_tokens = None
    window_end = None
    first_token_time = None
    steps_in_window = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        new = sum(len(o.new_token_ids) for o in outs)
        if first_token_time is None and new:
            first_token_time = now - t0
        if window_start is not None and window_end is None:
            window_tokens += new
            steps_in_window += 1
            if any(o.finished for o in outs):
                window_end = now
        started.update(o.request_id for o in outs if o.new_token_ids)
        if window_start is None and len(started) == batch:
            window_start, window_tokens = now, 0
    total = time.perf_counter() - t0
    elapsed = window_end - window_start
    return {"batch": batch, "decode_tokens_per_s": window_tokens / elapsed,
            "decode_ms_per_step": 1e3 * elapsed * batch / window_tokens, "window_tokens": window_tokens,
            "window_engine_steps": steps_in_window, "first_token_s": first_token_time,
            "all_prefill_s": window_start - t0, "total_s": total}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--input-len", type=int, default=128, help="encoder tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="decoder tokens per request")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default="t5")
    args = parser.parse_args()

    import jax

    from converters.checkpoint import parse_dtype
    from lmidist_jax import parallel
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.factory import engine_for_model
    from lmidist_jax.models.families import spec_from_hf_config
    from lmidist_jax.models.loader import random_model

    on_cpu = jax.devices()[0].platform == "cpu"
    copies = device_copy_bandwidth(256 << 20, 5) if on_cpu else device_copy_bandwidth()
    bandwidth = copies["best"]
    shape = TINY_T5 if args.tiny else FLAN_T5_XL
    spec = spec_from_hf_config(shape)
    batches = [int(b) for b in args.batches.split(",")]
    dtype = parse_dtype(args.dtype, {})
    options = dict(o.split("=", 1) for o in args.option)
    options.setdefault("max_model_len", max(args.input_len, args.output_len) + 16)
    # Batch 32 x (144 decoder + 128 encoder tokens) of Flan-T5-XL KV is ~1.7 GB: a fixed pool
    # keeps the two engines of the run from each claiming most of the device.
    if not args.tiny:
        options.setdefault("kv_cache_memory_gb", 8)
    options["dtype"] = args.dtype
    t = time.perf_counter()
    model = random_model(spec, dtype=dtype, mesh=parallel.make_mesh(1), max_model_len=int(options["max_model_len"]))
    load_s = time.perf_counter() - t

    runs = []
    for batch in batches:
        config = config_from_kwargs(None, **{"max_rolling_batch_size": batch, **options})
        t = time.perf_counter()
        engine = engine_for_model(model, None, config, max_model_len=config.max_model_len, progress=False)
        startup = time.perf_counter() - t
        run_batch(engine, batch, args.input_len, min(args.output_len, 16), spec.vocab_size, "warm")  # warm-up
        run = run_batch(engine, batch, args.input_len, args.output_len, spec.vocab_size, "run")
        weights, kv = decode_step_bytes(model, batch, args.input_len, args.output_len / 2)
        floor = (weights + kv) / bandwidth
        run.update(startup_s=startup, weight_bytes=weights, kv_bytes_mean=kv,
                   roofline_ms_per_step=1e3 * floor, fraction_of_roofline=floor / (run["decode_ms_per_step"] / 1e3),
                   achieved_GBps=(weights + kv) / (run["decode_ms_per_step"] / 1e3) / 1e9,
                   attention_backend=engine.runner.backend, num_kv_blocks=engine.runner.num_blocks)
        runs.append(run)
        print(f"batch {batch}: {run['decode_tokens_per_s']:.1f} tok/s, {run['decode_ms_per_step']:.2f} ms/step; "
              f"roofline {run['roofline_ms_per_step']:.2f} ms -> {100 * run['fraction_of_roofline']:.0f}%; "
              f"first token {run['first_token_s'] * 1e3:.0f} ms", flush=True)
        del engine
        gc.collect()  # the next engine's KV pool replaces this one's

    result = {"benchmark": "t5", "shape": "tiny-t5" if args.tiny else "flan-t5-xl", "dtype": args.dtype,
              "input_len": args.input_len, "output_len": args.output_len, "options": options,
              "parameter_bytes": model.num_parameter_bytes, "load_s": load_s,
              "copy_bandwidth_GBps": bandwidth / 1e9,
              "copy_bandwidth_by_method_GBps": {k: v / 1e9 for k, v in copies.items() if isinstance(v, float)},
              "runs": runs, "environment": environment()}
    print("wrote", write_result(args.name + ("-tiny" if args.tiny else ""), result, args.out))


if __name__ == "__main__":
    main()
