"""Mixture of experts on one device: a Mixtral-8x7B-shaped model (random bf16 weights,
~93 GB) and the grouped-matmul implementations at its expert shapes.

One invocation measures, and writes one JSON (benchmarks.common.write_result):
  kernels  per token count (1, 8, 64, 512, 4096 tokens, top-2 of 8 experts, random
           routing): the gate/up ([T*2, 4096] x [8, 4096, 28672]) and down
           ([T*2, 14336] x [8, 14336, 4096]) grouped matmuls with every implementation
           (pallas_kernels.grouped_matmul: xla reference, jax.lax.ragged_dot, Mosaic GPU
           ragged_dot, the Pallas kernel), each checked against the reference before it is
           timed (median of warm runs); achieved bandwidth counts the experts actually hit.
  batch1   batch-1 decode ms/token and its ratio to the roofline of the bytes one token
           reads: attention weights + KV + router + 2 of 8 experts per layer + norms + LM
           head (+ one embedding row), at the copy bandwidth measured in the same run.
  batch64  decode throughput with 64 sequences.
Each variant runs under try/except: a failing lowering is recorded, the rest go on.

  python benchmarks/moe.py                       # everything, on the GPU
  python benchmarks/moe.py --option decode_steps=8 --model-impls auto,pallas,ragged_dot
  python benchmarks/moe.py --kernels-only        # the grouped-matmul comparison only
  python benchmarks/moe.py --tiny                # small shapes, runs on a CPU (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import numpy as np  # noqa: E402

from benchmarks.common import device_copy_bandwidth, environment, write_result  # noqa: E402

MIXTRAL_8X7B = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768,
                    rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, torch_dtype="bfloat16",
                    bos_token_id=1, eos_token_id=2)
TINY_MIXTRAL = dict(MIXTRAL_8X7B, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024)


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (which returns device arrays) over warm runs."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def loop_ms(fn, lhs, rhs, group_sizes, inner: int, repeats: int) -> float:
    """Milliseconds per call of ``fn`` run ``inner`` times inside one jitted loop (each
    call's input depends on the previous output, so nothing is hoisted): the kernel's
    time without the per-call dispatch that a host-timed single call includes (~0.1 ms,
    as much as a one-token expert read)."""
    import jax
    import jax.numpy as jnp

    # The operands are arguments, not closure constants: captured, a 1.9 GB weight stack
    # became an HLO constant and the compile ran for minutes (H200 run, 2026-11-30).
    def looped(lhs, rhs, group_sizes):
        def body(_, carry):
            out = fn(lhs + carry, rhs, group_sizes)
            return (out[:, :1] * 0).astype(lhs.dtype)  # [M, 1]: a float x 0 XLA does not fold

        return jax.lax.fori_loop(0, inner, body, jnp.zeros((lhs.shape[0], 1), lhs.dtype))

    looped = jax.jit(looped)
    return median_ms(lambda: looped(lhs, rhs, group_sizes), repeats) / inner


def error_record(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {str(e)[:1500]}", "traceback": traceback.format_exc()[-2000:]}


def routed_inputs(num_tokens: int, num_experts: int, top_k: int, seed: int = 0):
    """group_sizes [E] of num_tokens tokens each picking top_k distinct random experts."""
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(num_tokens)])
    return np.bincount(picks.reshape(-1), minlength=num_experts).astype(np.int32)


def kernel_comparison(args, platform: str, bandwidth: float) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import grouped_matmul as gm

    cfg = TINY_MIXTRAL if args.tiny else MIXTRAL_8X7B
    hidden, inner = cfg["hidden_size"], cfg["intermediate_size"]
    num_experts, top_k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    dtype = jnp.bfloat16
    key = jax.random.key(0)
    weights = {
        "gate_up": (0.02 * jax.random.normal(key, (num_experts, hidden, 2 * inner), jnp.float32)).astype(dtype),
        "down": (0.02 * jax.random.normal(jax.random.fold_in(key, 1), (num_experts, inner, hidden),
                                          jnp.float32)).astype(dtype),
    }
    interpret = platform == "cpu"
    impls = {
        "xla": lambda lhs, rhs, gs: gm.grouped_matmul_reference(lhs, rhs, gs),
        "ragged_dot": lambda lhs, rhs, gs: gm.grouped_matmul_ragged_dot(lhs, rhs, gs),
        "mosaic_gpu": lambda lhs, rhs, gs: gm.grouped_matmul_mosaic(lhs, rhs, gs),
        "pallas": lambda lhs, rhs, gs: gm.grouped_matmul_pallas(lhs, rhs, gs, interpret=interpret),
        # A narrower-tile variant of the kernel for the decode shapes.
        "pallas_n64": lambda lhs, rhs, gs: gm.grouped_matmul_pallas(lhs, rhs, gs, block_n=64, interpret=interpret),
    }
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls.split(",")}
    results = []
    for num_tokens in args.tokens:
        group_sizes = jnp.asarray(routed_inputs(num_tokens, num_experts, top_k, seed=num_tokens))
        rows = num_tokens * top_k
        hit = int((np.asarray(group_sizes) > 0).sum())
        for name, rhs in weights.items():
            _, k_dim, n_dim = rhs.shape
            lhs = jax.random.normal(jax.random.fold_in(key, rows), (rows, k_dim), jnp.float32).astype(dtype)
            useful_bytes = (hit * k_dim * n_dim + rows * (k_dim + n_dim)) * 2
            entry = {"tokens": num_tokens, "rows": rows, "matmul": name, "K": k_dim, "N": n_dim,
                     "experts_hit": hit, "group_sizes": np.asarray(group_sizes).tolist(),
                     "bytes_hit_experts": useful_bytes, "roofline_ms": 1e3 * useful_bytes / bandwidth, "impls": {}}
            reference = jax.jit(gm.grouped_matmul_reference)(lhs, rhs, group_sizes)
            ref32 = np.asarray(reference, np.float32)
            scale = float(np.abs(ref32).max()) or 1.0
            for impl, fn in impls.items():
                record = {}
                try:
                    jitted = jax.jit(fn)
                    out = np.asarray(jitted(lhs, rhs, group_sizes), np.float32)
                    record["max_abs_error_rel"] = float(np.abs(out - ref32).max() / scale)
                    record["correct"] = bool(record["max_abs_error_rel"] < 2e-2)
                    if record["correct"]:
                        ms = median_ms(lambda: jitted(lhs, rhs, group_sizes), args.repeats)
                        record.update(ms=ms, achieved_GBps=useful_bytes / ms / 1e6,
                                      fraction_of_roofline=entry["roofline_ms"] / ms,
                                      TFLOPs=2 * rows * k_dim * n_dim / ms / 1e9)
                        # Without the host's per-call dispatch (what a model step sees).
                        loop = loop_ms(fn, lhs, rhs, group_sizes, args.inner, max(3, args.repeats // 4))
                        record.update(loop_ms=loop, loop_fraction_of_roofline=entry["roofline_ms"] / loop)
                except Exception as e:  # noqa: BLE001  (one lowering failing must not lose the rest)
                    record.update(error_record(e))
                entry["impls"][impl] = record
                status = (f"{record['ms']:.3f} ms ({100 * record['fraction_of_roofline']:.0f}% roofline); in a loop "
                          f"{record['loop_ms']:.3f} ms ({100 * record['loop_fraction_of_roofline']:.0f}%)"
                          if "ms" in record else record.get("error", "incorrect")[:120])
                print(f"tokens {num_tokens:5d} {name:8s} {impl:11s} {status}", flush=True)
            timed = {k: v["ms"] for k, v in entry["impls"].items() if "ms" in v}
            entry["fastest"] = min(timed, key=timed.get) if timed else None
            results.append(entry)
    return results


def pallas_sweep(args, platform: str, bandwidth: float) -> list[dict]:
    """The Pallas kernel's tile sizes and K splits at the decode shapes (--sweep-tokens)."""
    import itertools

    import jax
    import jax.numpy as jnp

    from pallas_kernels import grouped_matmul as gm

    cfg = TINY_MIXTRAL if args.tiny else MIXTRAL_8X7B
    hidden, inner = cfg["hidden_size"], cfg["intermediate_size"]
    num_experts, top_k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    key = jax.random.key(0)
    shapes = {"gate_up": (num_experts, hidden, 2 * inner), "down": (num_experts, inner, hidden)}
    results = []
    for name, shape in shapes.items():
        rhs = (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16)
        for num_tokens in args.sweep_tokens:
            group_sizes = jnp.asarray(routed_inputs(num_tokens, num_experts, top_k, seed=num_tokens))
            rows = num_tokens * top_k
            hit = int((np.asarray(group_sizes) > 0).sum())
            lhs = jax.random.normal(key, (rows, shape[1]), jnp.float32).astype(jnp.bfloat16)
            useful = (hit * shape[1] * shape[2] + rows * (shape[1] + shape[2])) * 2
            ref = np.asarray(jax.jit(gm.grouped_matmul_reference)(lhs, rhs, group_sizes), np.float32)
            scale = float(np.abs(ref).max()) or 1.0
            for block_n, block_k, k_splits in itertools.product((64, 128, 256), (64, 128), (1, 2, 4)):
                config = dict(block_n=block_n, block_k=block_k, k_splits=k_splits)
                record = {"matmul": name, "tokens": num_tokens, **config}
                try:
                    fn = jax.jit(lambda a, b, g, c=config: gm.grouped_matmul_pallas(
                        a, b, g, interpret=platform == "cpu", **c))
                    err = float(np.abs(np.asarray(fn(lhs, rhs, group_sizes), np.float32) - ref).max() / scale)
                    record["max_abs_error_rel"] = err
                    if err < 2e-2:
                        ms = median_ms(lambda: fn(lhs, rhs, group_sizes), args.repeats)
                        loop = loop_ms(lambda a, b, g, c=config: gm.grouped_matmul_pallas(
                            a, b, g, interpret=platform == "cpu", **c), lhs, rhs, group_sizes, args.inner,
                            max(3, args.repeats // 4))
                        record.update(ms=ms, fraction_of_roofline=useful / bandwidth * 1e3 / ms, loop_ms=loop,
                                      loop_fraction_of_roofline=useful / bandwidth * 1e3 / loop)
                except Exception as e:  # noqa: BLE001
                    record.update(error_record(e))
                results.append(record)
                print(f"sweep {name:8s} tokens {num_tokens:4d} n{block_n} k{block_k} s{k_splits}: "
                      f"{record.get('ms', float('nan')):.3f} ms "
                      f"({100 * record.get('fraction_of_roofline', 0):.0f}%), in a loop "
                      f"{record.get('loop_ms', float('nan')):.3f} ms "
                      f"({100 * record.get('loop_fraction_of_roofline', 0):.0f}%) {record.get('error', '')[:80]}",
                      flush=True)
    return results


def expected_experts_hit(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Distinct experts a layer reads for ``num_tokens`` tokens under uniform routing (each
    token picks ``top_k`` distinct experts): top_k for one token, all of them at batch 64."""
    return num_experts * (1 - (1 - top_k / num_experts) ** num_tokens)


def roofline_bytes_per_token(spec, itemsize: int, context: float, batch: int = 1) -> dict:
    """Bytes one decode step of ``batch`` sequences must read, by part (batch 1: one token)."""
    h, layers = spec.hidden_size, spec.num_layers
    attention = (h * (spec.q_size + 2 * spec.kv_size) + spec.q_size * h) * itemsize
    hit = expected_experts_hit(spec.num_experts, spec.num_experts_per_token, batch)
    experts = hit * 3 * h * spec.intermediate_size * itemsize
    router = h * spec.num_experts * itemsize
    norms = 2 * h * 4  # float32 scales... stored in the model dtype; a rounding error either way
    parts = {
        "attention_weights": layers * attention,
        "experts_read": layers * experts,
        "experts_hit_per_layer": hit,
        "router": layers * router,
        "norms": layers * norms + h * 4,
        "lm_head": spec.vocab_size * h * itemsize,
        "embedding_rows": batch * h * itemsize,
        "kv_cache": 2 * layers * spec.kv_size * itemsize * context * batch,
    }
    parts["total"] = sum(v for k, v in parts.items() if k != "experts_hit_per_layer")
    return parts


def model_benchmarks(args, bandwidth: float, out: dict, save) -> dict:
    """Fills ``out`` stage by stage, calling ``save()`` after each (a run stopped by its
    timeout keeps what it measured)."""
    import jax

    from converters.checkpoint import parse_dtype
    from lmidist_jax import SamplingParams, parallel
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.factory import engine_for_model
    from lmidist_jax.models import loader
    from lmidist_jax.models.families import spec_from_hf_config

    dtype = parse_dtype(args.dtype, {})
    config_json = dict(TINY_MIXTRAL if args.tiny else MIXTRAL_8X7B)
    if args.num_layers:
        config_json["num_hidden_layers"] = args.num_layers
    spec = spec_from_hf_config(config_json)
    max_model_len = args.input_len + args.output_len + 64
    t = time.perf_counter()
    model = loader.random_model(spec, dtype=dtype, mesh=parallel.make_mesh(1), max_model_len=max_model_len)
    jax.block_until_ready(jax.tree_util.tree_leaves(model.state))
    out.update({"spec": {k: v for k, v in dataclasses.asdict(spec).items() if not isinstance(v, (dict, tuple))},
                "parameter_bytes": model.num_parameter_bytes, "random_init_s": time.perf_counter() - t, "runs": {}})
    itemsize = np.dtype(dtype).itemsize
    rng = np.random.default_rng(0)
    for impl in args.model_impls.split(","):
        run = out["runs"].setdefault(impl, {})
        try:
            variant_spec = dataclasses.replace(spec, moe_impl=impl)
            graphdef, _ = loader.abstract_model(variant_spec, dtype, max_model_len)
            variant = dataclasses.replace(model, spec=variant_spec, graphdef=graphdef)
            # Bucketed steps compiled on first use (what `LLM()` does): enforce_eager would
            # compile every exact step shape, and the batch-64 stage's mixed prefill/decode
            # steps then spent the whole call compiling (H200 run, 2026-11-30).
            options = dict(dtype=args.dtype, max_model_len=max_model_len, max_rolling_batch_size=args.batch,
                           max_rolling_batch_prefill_tokens=args.prefill_tokens)
            options.update(dict(o.split("=", 1) for o in args.option))
            config = config_from_kwargs(None, **options)
            run["options"] = {k: str(v) for k, v in options.items()}
            t = time.perf_counter()
            engine = engine_for_model(variant, None, config, max_model_len=max_model_len, warmup=False,
                                      progress=False)
            run["engine_s"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001
            run["engine"] = error_record(e)
            print(f"model moe_impl={impl}: engine failed: {e}", flush=True)
            continue
        prompt = list(map(int, rng.integers(10, spec.vocab_size - 10, args.input_len)))
        params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
        try:  # (a) batch 1
            per_run = []
            for attempt in range(3):  # the first is a warm-up (compiles)
                engine.add_request(f"b1-{impl}-{attempt}", prompt, params)
                times = []
                while engine.has_unfinished_requests():
                    for o in engine.step():
                        times.extend([time.perf_counter()] * len(o.new_token_ids))
                per_run.append((times[-1] - times[0]) / (len(times) - 1))
            per_token = per_run[-1]
            context = args.input_len + args.output_len / 2
            parts = roofline_bytes_per_token(spec, itemsize, context)
            floor = parts["total"] / bandwidth
            run["batch1"] = {"decode_ms_per_token": 1e3 * per_token, "decode_tokens_per_s": 1 / per_token,
                             "bytes_per_token": parts, "roofline_ms_per_token": 1e3 * floor,
                             "fraction_of_roofline": floor / per_token,
                             "achieved_GBps": parts["total"] / per_token / 1e9}
            print(f"model moe_impl={impl}: batch-1 {1e3 * per_token:.2f} ms/token, roofline {1e3 * floor:.2f} ms "
                  f"-> {100 * floor / per_token:.0f}%", flush=True)
        except Exception as e:  # noqa: BLE001
            run["batch1"] = error_record(e)
            print(f"model moe_impl={impl}: batch-1 failed: {e}", flush=True)
        save()
        try:  # (b) batch 64 (or --batch)
            for attempt in range(2):  # warm-up (compiles the batch shapes), then measured
                for i in range(args.batch):
                    engine.add_request(f"b{args.batch}-{impl}-{attempt}-{i}",
                                       list(map(int, rng.integers(10, spec.vocab_size - 10, args.input_len))), params)
                started, decode_tokens, decode_time = set(), 0, 0.0
                t_all = time.perf_counter()
                total = 0
                while engine.has_unfinished_requests():
                    all_decoding = len(started) == args.batch
                    t = time.perf_counter()
                    outs = engine.step()
                    dt = time.perf_counter() - t
                    n = sum(len(o.new_token_ids) for o in outs)
                    total += n
                    if all_decoding:
                        decode_tokens += n
                        decode_time += dt
                    started.update(o.request_id for o in outs if o.new_token_ids)
                elapsed = time.perf_counter() - t_all
            # Roofline of an all-decoding step: every weight the batch's routing touches once,
            # plus each sequence's KV at the mean context.
            parts = roofline_bytes_per_token(spec, itemsize, args.input_len + args.output_len / 2, args.batch)
            roofline_tps = args.batch * bandwidth / parts["total"]
            decode_tps = decode_tokens / decode_time if decode_time else None
            run["batch"] = {"batch_size": args.batch, "output_tokens": total, "elapsed_s": elapsed,
                            "tokens_per_s_overall": total / elapsed, "decode_tokens_per_s": decode_tps,
                            "bytes_per_step": parts, "roofline_decode_tokens_per_s": roofline_tps,
                            "fraction_of_roofline": decode_tps / roofline_tps if decode_tps else None}
            print(f"model moe_impl={impl}: batch-{args.batch} decode "
                  f"{run['batch']['decode_tokens_per_s'] or 0:.0f} tok/s, overall {total / elapsed:.0f} tok/s",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            run["batch"] = error_record(e)
            print(f"model moe_impl={impl}: batch-{args.batch} failed: {e}", flush=True)
        save()
        del engine
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--kernels-only", action="store_true", help="only the grouped-matmul comparison")
    parser.add_argument("--skip-kernels", action="store_true", help="only the model runs")
    parser.add_argument("--tokens", default="1,8,64,512,4096", help="token counts of the kernel comparison")
    parser.add_argument("--impls", default="", help="comma-separated subset of the kernel implementations")
    parser.add_argument("--model-impls", default="auto", help="moe_impl values to run the model with")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--inner", type=int, default=20, help="calls per jitted loop for the loop timing")
    parser.add_argument("--sweep", action="store_true", help="also sweep the Pallas kernel's tiles (--sweep-tokens)")
    parser.add_argument("--sweep-tokens", default="1,64")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers than Mixtral-8x7B's 32")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="engine option for the model runs (e.g. decode_steps=8)")
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results)")
    parser.add_argument("--name", default="moe")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.sweep_tokens = [int(t) for t in args.sweep_tokens.split(",")]
    if args.tiny:
        args.repeats = min(args.repeats, 3)
        args.inner = min(args.inner, 2)
        args.tokens = [t for t in args.tokens if t <= 64]
        args.output_len = min(args.output_len, 16)
        args.input_len = min(args.input_len, 16)
        args.batch = min(args.batch, 4)

    import jax

    platform = jax.devices()[0].platform
    copies = device_copy_bandwidth() if platform != "cpu" else device_copy_bandwidth(64 << 20, 3)
    bandwidth = copies["best"]
    shape = "tiny-mixtral" if args.tiny else "mixtral-8x7b"
    if args.num_layers:
        shape += f"-{args.num_layers}-layers"
    result = {"benchmark": "moe", "shape": shape, "dtype": args.dtype,
              "copy_bandwidth_GBps": bandwidth / 1e9,
              "copy_bandwidth_by_method_GBps": {k: v / 1e9 for k, v in copies.items() if isinstance(v, float)},
              "input_len": args.input_len, "output_len": args.output_len, "environment": environment()}

    def save():
        return write_result(args.name + ("-tiny" if args.tiny else ""), result, args.out)

    if args.sweep:
        try:
            result["pallas_sweep"] = pallas_sweep(args, platform, bandwidth)
        except Exception as e:  # noqa: BLE001
            result["pallas_sweep"] = error_record(e)
    if not args.skip_kernels:
        try:
            result["kernels"] = kernel_comparison(args, platform, bandwidth)
        except Exception as e:  # noqa: BLE001
            result["kernels"] = error_record(e)
        save()
    if not args.kernels_only:
        try:
            result["model"] = {}
            model_benchmarks(args, bandwidth, result["model"], save)
        except Exception as e:  # noqa: BLE001
            result["model"] = error_record(e)
            print(f"model benchmark failed: {e}", flush=True)
    print("wrote", save())


if __name__ == "__main__":
    main()
